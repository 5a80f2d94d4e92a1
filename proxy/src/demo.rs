//! `breakwater demo`: kube-sim behind Breakwater on loopback, with
//! kubeconfigs that kubectl can use at once.
//!
//! Everything is made fresh in the demo directory: kube-sim's CAs and
//! serving certificate, the proxy's own CA and certificate, an admin client
//! certificate, and a ServiceAccount token. The kubeconfigs are written only
//! once both servers answer, so a script that waits for the file can use it
//! straight away.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use breakwater_loadtest::pki::{Ca, PkiError};
use breakwater_loadtest::sim::{self, KubeSim, SimConfig, SimPki};
use serde_json::json;

use crate::config::{LimitsConfig, ProxyConfig};
use crate::error::Chain;
use crate::identity::AuthConfig;
use crate::server::{self, ProxyHandle, StartError};
use crate::tls::UpstreamTls;
use crate::upstream::{AuthMode, DEFAULT_PROXY_USER, Timeouts, UpstreamConfig};

/// Options of `breakwater demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where certificates and kubeconfigs go.
    pub dir: PathBuf,
    /// The proxy's port on 127.0.0.1 (0 = any free port).
    pub port: u16,
    /// kube-sim's port on 127.0.0.1 (0 = any free port).
    pub sim_port: u16,
    /// The admin listener's port on 127.0.0.1 (0 = any free port).
    pub admin_port: u16,
    /// A limits file for the proxy (none: no limits).
    pub limits: Option<PathBuf>,
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("generating certificates")]
    Pki(#[from] PkiError),
    #[error("kube-sim: {0}")]
    Sim(String),
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the proxy")]
    Start(#[from] StartError),
    #[error("the proxy did not become ready: {0}")]
    NotReady(String),
}

/// A running demo: kube-sim and the proxy.
pub struct Demo {
    pub sim: KubeSim,
    pub proxy: ProxyHandle,
    /// `DIR/kubeconfig`: the admin (client certificate, system:masters)
    /// through the proxy.
    pub kubeconfig: PathBuf,
    /// `DIR/kubeconfig-direct`: the same admin straight to kube-sim.
    pub kubeconfig_direct: PathBuf,
    /// `DIR/kubeconfig-viewer`: ServiceAccount demo/viewer (may only read
    /// pods in namespace demo) through the proxy.
    pub kubeconfig_viewer: PathBuf,
    /// A token of ServiceAccount kube-system/breakwater-demo-admin (bound to
    /// cluster-admin), for clients that want a bearer token.
    pub token: String,
    /// The CA clients trust for the proxy, PEM.
    pub proxy_ca_pem: String,
}

const DEMO_ADMIN_NS: &str = "kube-system";
const DEMO_ADMIN_SA: &str = "breakwater-demo-admin";

impl Demo {
    /// Starts kube-sim and the proxy and writes the kubeconfigs.
    pub async fn start(opts: &DemoOptions) -> Result<Demo, DemoError> {
        let dir = &opts.dir;
        std::fs::create_dir_all(dir).map_err(|source| DemoError::Write {
            path: dir.clone(),
            source,
        })?;
        let dir = std::fs::canonicalize(dir).map_err(|source| DemoError::Write {
            path: dir.clone(),
            source,
        })?;
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);

        // kube-sim, seeded.
        let pki = SimPki::generate(&["localhost", "127.0.0.1"])?;
        let admin = pki.admin_client()?;
        let sim_cfg = SimConfig {
            listen: SocketAddr::new(loopback, opts.sim_port),
            ..SimConfig::default()
        };
        let sim = KubeSim::start(sim_cfg, pki)
            .await
            .map_err(|e| DemoError::Sim(Chain(&e).to_string()))?;
        sim::seed_demo(sim.store()).map_err(|e| DemoError::Sim(Chain(&e).to_string()))?;
        let sa = sim::resources::find("", "v1", "serviceaccounts")
            .ok_or_else(|| DemoError::Sim("serviceaccounts type missing".into()))?;
        let sa_obj = json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": DEMO_ADMIN_SA, "namespace": DEMO_ADMIN_NS}});
        // Already there when the demo directory is reused against a seeded store: fine.
        let _ = sim.store().create(sa, Some(DEMO_ADMIN_NS), sa_obj);
        // The proxy's own identity (its TokenReviews in front-proxy mode)
        // needs what kube-apiserver's system:auth-delegator role grants.
        let _ = sim.store().create(
            sa,
            Some("kube-system"),
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": "breakwater", "namespace": "kube-system"}}),
        );
        sim::rbac::bind_cluster_role(
            sim.store(),
            "breakwater-auth-delegator",
            "system:auth-delegator",
            json!([{"kind": "ServiceAccount", "name": "breakwater", "namespace": "kube-system"}]),
            false,
        )
        .map_err(|e| DemoError::Sim(Chain(&e).to_string()))?;
        let week = Duration::from_secs(7 * 24 * 3600);
        let token = sim.issue_token(DEMO_ADMIN_NS, DEMO_ADMIN_SA, week);
        let viewer_token = sim.issue_token("demo", "viewer", week);
        let front_proxy = sim.pki().front_proxy_client()?;

        // The proxy's own PKI: clients trust this CA for the proxy.
        let proxy_ca = Ca::new("breakwater-demo-ca")?;
        let serving = proxy_ca.issue_server(&["localhost", "127.0.0.1"])?;
        let files = [
            ("proxy-ca.crt", proxy_ca.cert_pem().to_string()),
            ("proxy.crt", serving.cert_pem.clone()),
            ("proxy.key", serving.key_pem.clone()),
            (
                "kube-sim-ca.crt",
                sim.pki().serving_ca.cert_pem().to_string(),
            ),
            ("admin.crt", admin.cert_pem.clone()),
            ("admin.key", admin.key_pem.clone()),
            ("client-ca.crt", sim.pki().client_ca.cert_pem().to_string()),
            ("front-proxy-client.crt", front_proxy.cert_pem.clone()),
            ("front-proxy-client.key", front_proxy.key_pem.clone()),
            ("sa.pub", sim.pki().sa_public_pem.clone()),
        ];
        for (name, content) in &files {
            write_private(&dir.join(name), content)?;
        }

        // Front-proxy mode: the proxy verifies client certificates against
        // the cluster's client CA and ServiceAccount tokens with the
        // cluster's keys, and tells kube-sim who is calling in X-Remote-*
        // headers over its front-proxy certificate.
        let proxy = server::start(ProxyConfig {
            plain_listen: None,
            privileged_listen: None,
            listen: SocketAddr::new(loopback, opts.port),
            tls_cert: dir.join("proxy.crt"),
            tls_key: dir.join("proxy.key"),
            client_ca: Some(dir.join("client-ca.crt")),
            upstream: UpstreamConfig {
                url: sim.url(),
                tls: UpstreamTls {
                    ca: Some(dir.join("kube-sim-ca.crt")),
                    client_cert: Some((
                        dir.join("front-proxy-client.crt"),
                        dir.join("front-proxy-client.key"),
                    )),
                },
                token_file: None,
                mode: AuthMode::FrontProxy,
                proxy_user: DEFAULT_PROXY_USER.to_string(),
                timeouts: Timeouts::default(),
                lanes: Default::default(),
            },
            auth: AuthConfig {
                service_account_key_files: vec![dir.join("sa.pub")],
                service_account_issuers: vec![SimConfig::default().issuer],
                ..AuthConfig::default()
            },
            admin_listen: SocketAddr::new(loopback, opts.admin_port),
            shutdown_grace: Duration::from_secs(5),
            limits: LimitsConfig {
                file: opts.limits.clone(),
                blocks_file: Some(dir.join("blocks.json")),
                rate_limit_headers: true,
            },
            watch: Default::default(),
            connections: Default::default(),
        })
        .await?;

        wait_ready(proxy.admin_addr()).await?;

        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let admin_user = format!(
            "client-certificate-data: {}\n    client-key-data: {}",
            b64(&admin.cert_pem),
            b64(&admin.key_pem)
        );
        let proxy_url = format!("https://{}", proxy.addr());
        let via_proxy = kubeconfig(
            "breakwater-demo",
            &proxy_url,
            &b64(proxy_ca.cert_pem()),
            &admin_user,
        );
        let direct = kubeconfig(
            "kube-sim-direct",
            &sim.url(),
            &b64(sim.pki().serving_ca.cert_pem()),
            &admin_user,
        );
        let viewer = kubeconfig(
            "breakwater-demo-viewer",
            &proxy_url,
            &b64(proxy_ca.cert_pem()),
            &format!("token: {viewer_token}"),
        );
        let kubeconfig = dir.join("kubeconfig");
        let kubeconfig_direct = dir.join("kubeconfig-direct");
        let kubeconfig_viewer = dir.join("kubeconfig-viewer");
        write_private(&kubeconfig_direct, &direct)?;
        write_private(&kubeconfig_viewer, &viewer)?;
        // Last: scripts may wait for this file to appear.
        write_private(&kubeconfig, &via_proxy)?;
        Ok(Demo {
            sim,
            proxy,
            kubeconfig,
            kubeconfig_direct,
            kubeconfig_viewer,
            token,
            proxy_ca_pem: proxy_ca.cert_pem().to_string(),
        })
    }

    /// Stops the proxy, then kube-sim.
    pub async fn shutdown(self) {
        self.proxy.shutdown().await;
        self.sim.shutdown().await;
    }
}

/// Runs the demo until `stop` resolves (Ctrl-C in the CLI).
pub async fn run(
    opts: DemoOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), DemoError> {
    let demo = Demo::start(&opts).await?;
    println!(
        "Breakwater demo is up.\n\
         \n  proxy     https://{proxy}   (metrics: http://{admin}/metrics)\
         \n  kube-sim  {sim}\
         \n\nUse kubectl through Breakwater:\
         \n\n  export KUBECONFIG={kc}\
         \n  kubectl get pods -A -w\
         \n\nWho is loading the apiserver, live (q quits; --once prints one snapshot):\
         \n\n  breakwater top --admin http://{admin}\
         \n\nThe emergency brake: block the viewer below for 5 minutes, ending its open\
         \nwatches (its kubectl then gets 429), list the blocks, and lift it again:\
         \n\n  breakwater block serviceaccount demo/viewer --terminate --for 5m --id demo-viewer --admin http://{admin}\
         \n  breakwater blocks --admin http://{admin}\
         \n  breakwater unblock demo-viewer --admin http://{admin}\
         \n\nA ServiceAccount that may only read pods in namespace demo (try a 403):\
         \n\n  KUBECONFIG={kcv} kubectl get configmaps -n demo\
         \n\nWatch sharing — informer-style (JSON) watches share one upstream watch\
         \n(kubectl get -w asks for Tables, which pass through unshared):\
         \n\n  for i in 1 2 3 4 5; do kubectl get --raw '/api/v1/pods?watch=1' >/dev/null & done\
         \n  curl -s http://{admin}/metrics | grep -E 'breakwater_watch_(shared_ratio|upstream_streams|subscribers) '\
         \n\nOr straight to kube-sim, for comparison:\
         \n\n  KUBECONFIG={kcd} kubectl get pods -A\
         \n\nCtrl-C stops both.",
        proxy = demo.proxy.addr(),
        admin = demo.proxy.admin_addr(),
        sim = demo.sim.url(),
        kc = demo.kubeconfig.display(),
        kcd = demo.kubeconfig_direct.display(),
        kcv = demo.kubeconfig_viewer.display(),
    );
    stop.await;
    println!("stopping…");
    demo.shutdown().await;
    Ok(())
}

/// Polls the proxy's /readyz (which checks kube-sim through the proxy's
/// upstream client) until it answers 200, for up to 10 s.
async fn wait_ready(admin: SocketAddr) -> Result<(), DemoError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut last = String::new();
    for _ in 0..100 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(admin).await {
            let req = format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
            if s.write_all(req.as_bytes()).await.is_ok() {
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                last = String::from_utf8_lossy(&buf).into_owned();
                if last.starts_with("HTTP/1.1 200") {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(DemoError::NotReady(last))
}

fn kubeconfig(name: &str, server: &str, ca_b64: &str, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca_b64}\nusers:\n- name: {name}-admin\n  user:\n    {user}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}-admin\ncurrent-context: {name}\n"
    )
}

/// Writes a file only its owner can read (it may hold a key or a token),
/// replacing any previous one atomically.
fn write_private(path: &Path, content: &str) -> Result<(), DemoError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let err = |source| DemoError::Write {
        path: path.to_owned(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(&tmp).map_err(err)?;
    f.write_all(content.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
