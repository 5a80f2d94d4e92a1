//! kube-sim: a simulated kube-apiserver.
//!
//! Good enough that kubectl, client-go and kube-rs cannot tell the difference
//! for the covered surface: discovery and OpenAPI, CRUD on the types in
//! [`resources`], list with selectors and pagination, watch with the
//! apiserver's resourceVersion semantics, bookmarks and 410,
//! CustomResourceDefinitions (their types served once created, [`crd`]), x509,
//! front-proxy and ServiceAccount token authentication, impersonation, RBAC,
//! and the review APIs. The tests, the
//! demo and the load tests all run it in-process with [`KubeSim::start`].
//!
//! Layout: [`store`] holds the objects and the watch fan-out, [`server`]
//! speaks HTTP (TLS, routing, handlers), [`negotiate`] picks each answer's
//! encoding from the Accept header and `respond` writes it (JSON, Table or
//! [`protobuf`]), [`auth`] answers "who is this", [`rbac`] answers "may they",
//! [`metrics`] counts requests like the apiserver does, and the
//! discovery/openapi/table/exec modules shape the rest of the surface.

pub mod apf;
pub mod auth;
mod binding;
pub mod capacity;
pub mod crd;
pub mod discovery;
pub mod exec;
pub mod metrics;
pub mod negotiate;
pub mod openapi;
pub mod protobuf;
pub mod rbac;
pub mod resources;
mod respond;
pub mod selectors;
pub mod server;
pub mod store;
pub mod table;
pub mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pki::{Ca, CertPair, PkiError};

pub use rbac::Authorization;
pub use resources::SelfSubjectReviewVersion;

/// The CN of the front-proxy client certificate (kubeadm's name), the
/// default `--requestheader-allowed-names`.
pub const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

/// Go's http2 server default for SETTINGS_MAX_CONCURRENT_STREAMS, which the
/// apiserver keeps when `--http2-max-streams-per-connection` is 0.
pub const GO_HTTP2_MAX_STREAMS: u32 = 250;

/// How long [`KubeSim::shutdown`] waits for connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// kube-sim's certificates and ServiceAccount signing key.
pub struct SimPki {
    /// Signs the serving certificate (kubeconfig `certificate-authority-data`).
    pub serving_ca: Ca,
    /// The serving certificate.
    pub server: CertPair,
    /// Signs x509 client certificates (users: CN = name, O = groups).
    pub client_ca: Ca,
    /// `--requestheader-client-ca-file`: signs front-proxy client certificates,
    /// whose connections may name the user in X-Remote-* headers.
    pub front_proxy_ca: Ca,
    /// ServiceAccount token signing key (PKCS#8 PEM, ECDSA P-256).
    pub sa_key_pem: String,
    /// Its public key (SPKI PEM), what a verifier of SA tokens needs.
    pub sa_public_pem: String,
}

impl std::fmt::Debug for SimPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("SimPki").finish_non_exhaustive()
    }
}

/// The DNS names of the `kubernetes` Service, in every apiserver serving
/// certificate (kubeadm's and the apiserver's self-signed one).
pub const APISERVER_SERVICE_NAMES: &[&str] = &[
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

impl SimPki {
    /// Fresh CAs, a serving cert for `server_names` (DNS names / IPs) and an SA signing key.
    pub fn generate(server_names: &[&str]) -> Result<SimPki, PkiError> {
        let serving_ca = Ca::new("kube-sim-serving-ca")?;
        // Besides the caller's: the names the apiserver always puts in its
        // serving certificate (the `kubernetes` Service's), which clients
        // that reach it by IP, such as nginx's proxy_ssl_name, verify.
        let mut names = server_names.to_vec();
        for name in APISERVER_SERVICE_NAMES {
            if !names.contains(name) {
                names.push(name);
            }
        }
        let server = serving_ca.issue_server(&names)?;
        let client_ca = Ca::new("kube-sim-client-ca")?;
        let front_proxy_ca = Ca::new("kube-sim-front-proxy-ca")?;
        let (sa_key_pem, sa_public_pem) = crate::pki::signing_key_pem()?;
        Ok(SimPki {
            serving_ca,
            server,
            client_ca,
            front_proxy_ca,
            sa_key_pem,
            sa_public_pem,
        })
    }

    /// CN=kubernetes-admin, O=system:masters, signed by client_ca.
    pub fn admin_client(&self) -> Result<CertPair, PkiError> {
        self.client_ca
            .issue_client("kubernetes-admin", &["system:masters"])
    }

    /// CN=front-proxy-client, signed by front_proxy_ca: what a front proxy
    /// (Breakwater in `front-proxy` mode) presents upstream.
    pub fn front_proxy_client(&self) -> Result<CertPair, PkiError> {
        self.front_proxy_ca.issue_client(FRONT_PROXY_CLIENT, &[])
    }
}

/// kube-sim's settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Listen address; port 0 picks a free one (see [`KubeSim::addr`]).
    pub listen: SocketAddr,
    /// Events retained per resource type for watch-from-RV (older -> 410).
    pub window: usize,
    /// Bounded event queue per watcher; a watcher that overflows it is closed.
    pub watcher_queue: usize,
    /// How often watchers that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// The apiserver's `--min-request-timeout`: a watch without
    /// `timeoutSeconds` ends after this × a random factor in [1, 2).
    pub min_request_timeout: Duration,
    /// ServiceAccount token issuer (`iss`).
    pub issuer: String,
    /// Audiences a token must carry to authenticate (`--api-audiences`).
    pub api_audiences: Vec<String>,
    /// `--requestheader-allowed-names`: CNs of front-proxy certificates whose
    /// X-Remote-* headers are trusted (empty: any CN from the front-proxy CA).
    pub requestheader_allowed_names: Vec<String>,
    /// `--authorization-mode`: RBAC (default) or AlwaysAllow.
    pub authorization: Authorization,
    /// The capacity model (seats, queue, CPU cost); `None` = unlimited.
    pub capacity: Option<capacity::CapacityConfig>,
    /// `--http2-max-streams-per-connection`: the SETTINGS_MAX_CONCURRENT_STREAMS
    /// kube-sim advertises on each HTTP/2 connection; 0 means Go's default,
    /// 250 ([`GO_HTTP2_MAX_STREAMS`]), as in the apiserver. A client that puts
    /// every request on one connection waits for a free stream beyond it.
    pub http2_max_streams_per_connection: u32,
    /// `--anonymous-auth`: a request with no credentials at all runs as
    /// `system:anonymous` (group `system:unauthenticated`) when true, the
    /// apiserver's default; when false it gets the 401 Status a bad
    /// credential gets.
    pub anonymous_auth: bool,
    /// Talk like the apiserver's Go `net/http` server ([`transport`]): its
    /// HTTP/2 windows and frame sizes, its response headers (`Audit-Id`,
    /// the APF uids) and its HTTP/2 flushing (HEADERS and DATA in separate
    /// writes). On by default: a proxy's measured cost depends on it.
    pub go_like_transport: bool,
    /// Where SelfSubjectReview is served: `v1` (1.28 and later, the
    /// default), `v1beta1` (1.27), `v1alpha1` (1.26 with its feature gate)
    /// or not at all, as a v1.24 apiserver.
    pub self_subject_review: resources::SelfSubjectReviewVersion,
}

impl SimConfig {
    /// The stream limit actually advertised: `http2_max_streams_per_connection`
    /// with 0 resolved to Go's default.
    pub fn effective_http2_max_streams(&self) -> u32 {
        match self.http2_max_streams_per_connection {
            0 => GO_HTTP2_MAX_STREAMS,
            n => n,
        }
    }
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        let issuer = "https://kubernetes.default.svc.cluster.local".to_string();
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            window: 1000,
            watcher_queue: 10_000,
            bookmark_interval: Duration::from_secs(60),
            min_request_timeout: Duration::from_secs(1800),
            api_audiences: vec![issuer.clone()],
            issuer,
            requestheader_allowed_names: vec![FRONT_PROXY_CLIENT.to_string()],
            authorization: Authorization::Rbac,
            capacity: None,
            http2_max_streams_per_connection: GO_HTTP2_MAX_STREAMS,
            anonymous_auth: true,
            go_like_transport: true,
            self_subject_review: resources::SelfSubjectReviewVersion::default(),
        }
    }
}

/// Why kube-sim could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid PEM in {what}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS configuration")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot seed the bootstrap RBAC policy")]
    Bootstrap(#[from] store::StoreError),
}

/// A running kube-sim. Dropping it stops the server without waiting;
/// [`KubeSim::shutdown`] stops it gracefully.
pub struct KubeSim {
    addr: SocketAddr,
    pki: SimPki,
    state: Arc<server::State>,
    tracker: TaskTracker,
}

impl std::fmt::Debug for KubeSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSim")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl KubeSim {
    /// Binds `cfg.listen` and serves HTTPS (h2 and HTTP/1.1) until shutdown.
    /// The store starts with the bootstrap RBAC policy
    /// ([`rbac::seed_bootstrap`]).
    pub async fn start(cfg: SimConfig, pki: SimPki) -> Result<KubeSim, SimError> {
        let tls = server::tls_config(&pki)?;
        let front_proxy_verifier = server::client_verifier(
            &[("front-proxy CA", pki.front_proxy_ca.cert_pem())],
            &Arc::new(rustls::crypto::ring::default_provider()),
        )?;
        let auth = auth::Authenticator::new(
            &pki.sa_key_pem,
            &pki.sa_public_pem,
            cfg.issuer.clone(),
            cfg.api_audiences.clone(),
        )?;
        let listener = listen(cfg.listen).map_err(|source| SimError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| SimError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let tracker = TaskTracker::new();
        let store = store::Store::serving(cfg.window, cfg.watcher_queue, cfg.self_subject_review);
        rbac::seed_bootstrap(&store)?;
        let cancel = CancellationToken::new();
        let capacity = cfg
            .capacity
            .clone()
            .map(|c| capacity::Capacity::start(c, cancel.clone()));
        let state = Arc::new(server::State {
            authz: rbac::Authorizer::new(cfg.authorization, store.clone()),
            front_proxy_verifier,
            requestheader_allowed_names: cfg.requestheader_allowed_names.clone(),
            store,
            auth,
            metrics: Arc::new(metrics::SimMetrics::default()),
            min_request_timeout: cfg.min_request_timeout,
            cancel,
            tracker: tracker.clone(),
            capacity,
            http2_max_streams: cfg.effective_http2_max_streams(),
            anonymous_auth: std::sync::atomic::AtomicBool::new(cfg.anonymous_auth),
            auth_record: auth::AuthRecord::default(),
            go_like: cfg.go_like_transport.then(transport::ApiserverHeaders::new),
        });
        tracker.spawn(server::accept_loop(
            listener,
            tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            Arc::clone(&state),
        ));
        tracker.spawn(server::bookmark_loop(
            Arc::clone(&state),
            cfg.bookmark_interval,
        ));
        tracing::info!(%addr, "kube-sim listening");
        Ok(KubeSim {
            addr,
            pki,
            state,
            tracker,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Turns `--anonymous-auth` on or off for the requests that follow.
    pub fn set_anonymous_auth(&self, on: bool) {
        self.state
            .anonymous_auth
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn pki(&self) -> &SimPki {
        &self.pki
    }

    pub fn store(&self) -> &store::Store {
        &self.state.store
    }

    /// A ServiceAccount token signed like `kubectl create token` makes (ES256
    /// JWT, API audiences). The SA need not exist; its uid is used when it does.
    pub fn issue_token(&self, namespace: &str, name: &str, ttl: Duration) -> String {
        let uid = sa_uid(&self.state.store, namespace, name).unwrap_or_default();
        self.state
            .auth
            .issue(namespace, name, &uid, &[], ttl)
            .expect("invariant: the SA key loaded at start signs ES256")
            .token
    }

    /// A legacy ServiceAccount token, as a `kubernetes.io/service-account-
    /// token` Secret held before TokenRequest (issuer
    /// `kubernetes/serviceaccount`, no expiry, no audience). kube-sim keeps
    /// it until [`KubeSim::revoke_legacy_token`], where the apiserver looks
    /// its Secret up.
    pub fn issue_legacy_token(&self, namespace: &str, name: &str) -> String {
        // The token controller writes tokens for existing ServiceAccounts
        // only; one that does not exist gets a made-up uid.
        let uid = sa_uid(&self.state.store, namespace, name)
            .unwrap_or_else(|| format!("sa-uid-{namespace}-{name}"));
        self.state
            .auth
            .issue_legacy(namespace, name, &uid, &format!("{name}-token"))
            .expect("invariant: the SA key loaded at start signs ES256")
    }

    /// Refuses a legacy token from now on, as deleting its Secret does.
    pub fn revoke_legacy_token(&self, token: &str) {
        self.state.auth.revoke_legacy(token);
    }

    /// A token bound to Pod `pod` (and, when given, node `node`), as a
    /// Pod's projected ServiceAccount token is on Kubernetes 1.30+: its
    /// `kubernetes.io` claim names the Pod and node, so the identity carries
    /// `authentication.kubernetes.io/pod-name` and `node-name` extras. The
    /// objects need not exist (their uids are made up when they do not).
    pub fn issue_bound_token(
        &self,
        namespace: &str,
        name: &str,
        pod: &str,
        node: Option<&str>,
        ttl: Duration,
    ) -> String {
        let uid = sa_uid(&self.state.store, namespace, name).unwrap_or_default();
        let binding = auth::Binding {
            pod: Some(auth::ObjectRef {
                name: pod.to_string(),
                uid: format!("pod-uid-{namespace}-{pod}"),
            }),
            node: node.map(|n| auth::ObjectRef {
                name: n.to_string(),
                uid: format!("node-uid-{n}"),
            }),
        };
        self.state
            .auth
            .issue_bound(namespace, name, &uid, &[], ttl, &binding)
            .expect("invariant: the SA key loaded at start signs ES256")
            .token
    }

    /// How many of `user`'s requests each authenticator accepted (the user
    /// as authenticated, before impersonation): a front proxy's callers
    /// show as [`auth::AuthPath::RequestHeader`], passed-through tokens as
    /// [`auth::AuthPath::Token`].
    pub fn auth_paths(&self, user: &str) -> std::collections::BTreeMap<auth::AuthPath, u64> {
        self.state.auth_record.of(user)
    }

    /// Prometheus text of /metrics.
    pub fn metrics_text(&self) -> String {
        self.state.metrics.render()
    }

    /// apiserver_request_total summed over codes for verb (e.g. "LIST","WATCH","GET") and resource.
    pub fn request_count(&self, verb: &str, resource: &str) -> u64 {
        self.state.metrics.request_count(verb, resource)
    }

    /// apiserver_longrunning_requests{verb="WATCH",resource} now.
    pub fn open_watches(&self, resource: &str) -> i64 {
        self.state.metrics.longrunning("WATCH", resource)
    }

    /// The capacity model's counters now; `None` without a model.
    pub fn capacity_stats(&self) -> Option<capacity::CapacityStats> {
        self.state.capacity.as_ref().map(|c| c.stats())
    }

    /// Stops accepting, ends every watch and asks connections to close, then
    /// waits for them (at most a few seconds).
    pub async fn shutdown(self) {
        self.state.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("kube-sim: connections still open after the shutdown grace period");
        }
    }
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        // A test that forgets shutdown() must not leave the server running.
        self.state.cancel.cancel();
    }
}

/// What a TokenRequest's `boundObjectRef` binds the token to: for a Pod
/// that exists, the Pod and the node it is scheduled on (Kubernetes 1.30+
/// adds the node); otherwise nothing.
pub(crate) fn token_binding(store: &store::Store, namespace: &str, body: &Value) -> auth::Binding {
    let Some(r) = body.pointer("/spec/boundObjectRef") else {
        return auth::Binding::default();
    };
    if r.get("kind").and_then(Value::as_str) != Some("Pod") {
        return auth::Binding::default();
    }
    let Some(name) = r.get("name").and_then(Value::as_str) else {
        return auth::Binding::default();
    };
    let Some(rt) = resources::find("", "v1", "pods") else {
        return auth::Binding::default();
    };
    let Ok(pod) = store.get(rt, Some(namespace), name) else {
        return auth::Binding::default();
    };
    let uid = pod
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("");
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(|n| auth::ObjectRef {
            name: n.to_string(),
            uid: String::new(),
        });
    auth::Binding {
        pod: Some(auth::ObjectRef {
            name: name.to_string(),
            uid: uid.to_string(),
        }),
        node,
    }
}

/// The uid of ServiceAccount `namespace/name`, if it exists.
pub(crate) fn sa_uid(store: &store::Store, namespace: &str, name: &str) -> Option<String> {
    let rt = resources::find("", "v1", "serviceaccounts")?;
    let sa = store.get(rt, Some(namespace), name).ok()?;
    sa.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Creates ServiceAccount `default` in `namespace` unless it exists (the
/// apiserver's serviceaccount controller does this for every namespace).
pub(crate) fn ensure_default_service_account(
    store: &store::Store,
    namespace: &str,
) -> Result<(), store::StoreError> {
    let rt = resource("serviceaccounts");
    match store.create(
        rt,
        Some(namespace),
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "default", "namespace": namespace},
        }),
    ) {
        Ok(_) | Err(store::StoreError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A core/v1 or apps/v1 type the seed uses.
fn resource(plural: &str) -> &'static resources::ResourceType {
    resources::RESOURCES
        .iter()
        .find(|r| r.plural == plural)
        .expect("invariant: the seeded types are in the resource table")
}

/// The demo's admin ServiceAccount (kube-system), bound to cluster-admin:
/// the through-the-proxy kubeconfig of the demo uses its token.
pub const DEMO_ADMIN_SA: &str = "breakwater-demo-admin";

/// Seeds namespaces (default, kube-system, kube-public, kube-node-lease, demo), 3 nodes,
/// a few pods on them (status.phase Running), configmaps, ServiceAccount demo/agent,
/// ServiceAccount kube-system/breakwater-demo-admin bound to cluster-admin, and
/// ServiceAccount demo/viewer with Role demo/pod-viewer (get/list/watch pods in demo
/// only), so a user can meet a 403.
pub fn seed_demo(store: &store::Store) -> Result<(), store::StoreError> {
    let namespaces = [
        "default",
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "demo",
    ];
    for ns in namespaces {
        create_unless_exists(
            store,
            resource("namespaces"),
            None,
            json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }),
        )?;
        ensure_default_service_account(store, ns)?;
    }
    let nodes = ["node-1", "node-2", "node-3"];
    for (i, node) in nodes.iter().enumerate() {
        create_unless_exists(
            store,
            resource("nodes"),
            None,
            json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": node,
                    "labels": {
                        "kubernetes.io/hostname": node,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                    },
                },
                "spec": {"podCIDR": format!("10.244.{}.0/24", i + 1)},
                "status": {
                    "addresses": [{"type": "InternalIP", "address": format!("172.18.0.{}", i + 2)}],
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                    "nodeInfo": {"kubeletVersion": "v1.32.0", "osImage": "kube-sim", "architecture": "amd64", "operatingSystem": "linux"},
                },
            }),
        )?;
    }
    let pods = [
        ("demo", "web-0", "web", "nginx:1.27", 0),
        ("demo", "web-1", "web", "nginx:1.27", 1),
        ("demo", "web-2", "web", "nginx:1.27", 2),
        ("demo", "agent-node-1", "agent", "telemetry-agent:1.0", 0),
        ("demo", "agent-node-2", "agent", "telemetry-agent:1.0", 1),
        ("demo", "agent-node-3", "agent", "telemetry-agent:1.0", 2),
        ("kube-system", "coredns-0", "coredns", "coredns:1.11", 0),
        ("kube-system", "coredns-1", "coredns", "coredns:1.11", 1),
    ];
    for (n, (ns, name, app, image, node)) in pods.iter().enumerate() {
        create_unless_exists(
            store,
            resource("pods"),
            Some(ns),
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
                "spec": {
                    "nodeName": nodes[*node],
                    "serviceAccountName": if *app == "agent" { "agent" } else { "default" },
                    "containers": [{"name": app, "image": image}],
                    "restartPolicy": "Always",
                },
                "status": {
                    "phase": "Running",
                    "hostIP": format!("172.18.0.{}", node + 2),
                    "podIP": format!("10.244.{}.{}", node + 1, n + 10),
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "containerStatuses": [{
                        "name": app,
                        "image": image,
                        "ready": true,
                        "started": true,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": auth::format_timestamp(auth::unix_now())}},
                    }],
                },
            }),
        )?;
    }
    let configmaps = [
        (
            "demo",
            "app-config",
            json!({"log-level": "info", "feature-x": "on"}),
        ),
        ("demo", "agent-config", json!({"interval": "10s"})),
        ("kube-system", "kube-proxy", json!({"mode": "iptables"})),
        (
            "kube-public",
            "cluster-info",
            json!({"cluster": "kube-sim"}),
        ),
    ];
    for (ns, name, data) in configmaps {
        create_unless_exists(
            store,
            resource("configmaps"),
            Some(ns),
            json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": ns},
                "data": data,
            }),
        )?;
    }
    create_unless_exists(
        store,
        resource("serviceaccounts"),
        Some("demo"),
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "agent", "namespace": "demo"},
        }),
    )?;
    seed_demo_rbac(store)
}

/// The demo's identities: an all-powerful SA and a narrow one.
fn seed_demo_rbac(store: &store::Store) -> Result<(), store::StoreError> {
    for (ns, name) in [("kube-system", DEMO_ADMIN_SA), ("demo", "viewer")] {
        create_unless_exists(
            store,
            resource("serviceaccounts"),
            Some(ns),
            json!({
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": name, "namespace": ns},
            }),
        )?;
    }
    rbac::bind_cluster_role(
        store,
        DEMO_ADMIN_SA,
        "cluster-admin",
        json!([{"kind": "ServiceAccount", "name": DEMO_ADMIN_SA, "namespace": "kube-system"}]),
        false,
    )?;
    let rbac_type = |plural| {
        resources::find("rbac.authorization.k8s.io", "v1", plural)
            .expect("invariant: RBAC types are in the resource table")
    };
    create_unless_exists(
        store,
        rbac_type("roles"),
        Some("demo"),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-viewer", "namespace": "demo"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        }),
    )?;
    create_unless_exists(
        store,
        rbac_type("rolebindings"),
        Some("demo"),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "viewer-pod-viewer", "namespace": "demo"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-viewer"},
            "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": "demo"}],
        }),
    )
}

/// Seeding twice (or over objects the store made itself) is not an error.
fn create_unless_exists(
    store: &store::Store,
    rt: &'static resources::ResourceType,
    namespace: Option<&str>,
    obj: Value,
) -> Result<(), store::StoreError> {
    match store.create(rt, namespace, obj) {
        Ok(_) | Err(store::StoreError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Binds with the backlog Go's net/http uses (`net.core.somaxconn`; the
/// kernel caps what is asked at it), not tokio's 1024: the apiserver takes
/// 5,000 simultaneous connects without dropping a SYN, and so must a
/// stand-in for it.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(65_535)
}
