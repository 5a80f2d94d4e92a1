//! `breakwater run` configuration: command-line flags and/or a YAML file.
//!
//! One struct serves both (`RunOptions`): every field is optional there, a
//! flag overrides the file, and [`RunOptions::validate`] turns the merge into
//! the [`ProxyConfig`] the server accepts, or says what is missing.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::accept::{AcceptRate, ConnectionLimits};
use crate::identity::AuthConfig;
use crate::tls::UpstreamTls;
use crate::upstream::{
    AuthMode, DEFAULT_PROXY_USER, LaneLimits, Lanes, Timeouts, UnaryProtocol, UpstreamConfig,
};

/// Flags of `breakwater run`, and the fields of its `--config` file.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RunOptions {
    /// YAML file with any of these options (camelCase keys); flags win.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address for client TLS connections [default: 127.0.0.1:6443].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Serving certificate (PEM, may include the chain).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// Serving private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// CA that signs client certificates; without it client certificates are not requested.
    #[arg(long)]
    pub client_ca: Option<PathBuf>,
    /// The apiserver, e.g. https://127.0.0.1:6444.
    #[arg(long)]
    pub upstream: Option<String>,
    /// CA bundle for the apiserver's serving certificate.
    #[arg(long)]
    pub upstream_ca: Option<PathBuf>,
    /// The proxy's client certificate for the apiserver (PEM).
    #[arg(long)]
    pub upstream_client_cert: Option<PathBuf>,
    /// Key of --upstream-client-cert (PEM).
    #[arg(long)]
    pub upstream_client_key: Option<PathBuf>,
    /// A bearer token file with the proxy's own credentials (re-read when it changes).
    #[arg(long)]
    pub upstream_token_file: Option<PathBuf>,
    /// How the apiserver learns who the client is: passthrough (forward the client's
    /// Authorization), front-proxy (X-Remote-* over the proxy's front-proxy certificate),
    /// impersonate (the proxy's credentials plus Impersonate-*) or auto (token clients
    /// as passthrough, certificate clients as front-proxy; needs the front-proxy
    /// certificate) [default: passthrough].
    #[arg(long, value_enum)]
    pub upstream_auth: Option<AuthMode>,
    /// In front-proxy and auto modes, the user the proxy's own requests (TokenReview) carry
    /// [default: system:serviceaccount:kube-system:breakwater].
    #[arg(long)]
    pub proxy_user: Option<String>,
    /// Public keys that verify ServiceAccount tokens (PEM or JWKS); repeatable.
    #[arg(long)]
    #[serde(default)]
    pub service_account_key_file: Vec<PathBuf>,
    /// Accepted ServiceAccount token issuers; repeatable. Without one, every token goes to TokenReview.
    #[arg(long)]
    #[serde(default)]
    pub service_account_issuer: Vec<String>,
    /// Accepted token audiences; repeatable [default: the issuers].
    #[arg(long)]
    #[serde(default)]
    pub api_audiences: Vec<String>,
    /// Most TokenReviews in flight upstream at once; a new token past it gets 429
    /// [default: 8].
    #[arg(long)]
    pub token_review_max_concurrent: Option<usize>,
    /// TokenReviews started per second, sustained; a new token past it gets 429 with
    /// Retry-After [default: 100].
    #[arg(long)]
    pub token_review_rate: Option<u32>,
    /// TokenReviews that may start at once after a quiet spell [default: 20].
    #[arg(long)]
    pub token_review_burst: Option<u32>,
    /// The limits file (YAML, breakwater/v1alpha1 Limits); re-read on change and on SIGHUP.
    #[arg(long)]
    pub limits: Option<PathBuf>,
    /// Where emergency blocks persist (JSON) so they survive a restart.
    #[arg(long)]
    pub blocks_file: Option<PathBuf>,
    /// Send the IETF draft RateLimit-Policy / RateLimit headers on governed responses.
    #[arg(long, action = clap::ArgAction::Set)]
    pub rate_limit_headers: Option<bool>,
    /// Requests without credentials proceed as system:anonymous (true) or get 401 (false) [default: true].
    #[arg(long, action = clap::ArgAction::Set)]
    pub anonymous_auth: Option<bool>,
    /// Also serve plain HTTP (HTTP/1.1 and HTTP/2 with prior knowledge) on this loopback
    /// address, for clients on the same host or in the same pod (as `kubectl proxy` does);
    /// callers authenticate with bearer tokens only. Refused unless the address is loopback.
    #[arg(long)]
    pub plain_listen: Option<SocketAddr>,
    /// Also serve TLS on this address for privileged callers (identities an exempt rule
    /// names): its connections are accepted, handshaken and served on the privileged
    /// thread, so an admin's kubectl, which dials anew for every command, never queues
    /// behind a storm's handshakes. Point admins' kubeconfigs at it; any other caller
    /// that connects there is served as on --listen.
    #[arg(long)]
    pub privileged_listen: Option<SocketAddr>,
    /// Most open client connections, all listeners together; past it a new connection is
    /// closed at once [default: 20000].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Most open client connections from one IP address (0 = no cap); past it a new
    /// connection from that address is closed at once [default: 0 = off;
    /// behind NAT or a load balancer one address carries a whole fleet].
    #[arg(long)]
    pub max_connections_per_source: Option<usize>,
    /// TLS handshakes doing work at once; the others wait (without CPU) within the 10 s
    /// handshake timeout [default: the number of cores].
    #[arg(long)]
    pub max_tls_handshakes: Option<usize>,
    /// Threads that serve client connections, each a runtime of its own: a connection
    /// stays on one from accept to close, as on an nginx worker. A new one goes to the
    /// first thread under half busy (at most 8 connections over the one with the
    /// fewest), else to the one with the fewest; 0 serves them on the shared
    /// work-stealing runtime instead [default: the number of cores].
    #[arg(long)]
    pub serving_threads: Option<usize>,
    /// New connections per second from one IP address (0 = no cap); past it a new
    /// connection is closed at once [default: 0].
    #[arg(long)]
    pub accept_rate_per_source: Option<u32>,
    /// New connections from one IP address that may come at once [default: the rate].
    #[arg(long)]
    pub accept_burst_per_source: Option<u32>,
    /// Plain-HTTP admin listener: /healthz /livez /readyz /metrics [default: 127.0.0.1:9444].
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// How long SIGTERM waits for in-flight requests before ending watch streams [default: 30s].
    #[arg(long)]
    pub shutdown_grace: Option<String>,
    /// Response-header timeout for requests that are not long-running [default: 60s].
    #[arg(long)]
    pub upstream_timeout: Option<String>,
    /// Upstream connections for unary requests, in HTTP/2 terms: each carries as many
    /// streams as the apiserver allows (250); over HTTP/1.1, 250 connections each [default: 8].
    #[arg(long)]
    pub upstream_max_connections_unary: Option<usize>,
    /// How unary requests reach the apiserver: http1 (keep-alive connections, one
    /// request at a time each; up to 250 per --upstream-max-connections-unary) or http2
    /// (multiplexed) [default: http1].
    #[arg(long, value_enum)]
    pub upstream_unary_protocol: Option<UnaryProtocol>,
    /// Upstream connections for long-running requests (forwarded watches, logs -f,
    /// proxy) [default: 64].
    #[arg(long)]
    pub upstream_max_connections_long_running: Option<usize>,
    /// Upstream connections reserved for requests of exempt rules [default: 8].
    #[arg(long)]
    pub upstream_max_connections_exempt: Option<usize>,
    /// How long a request waits for an upstream stream when its lane is at its cap,
    /// before a 429 [default: 1s].
    #[arg(long)]
    pub upstream_stream_wait: Option<String>,
    /// Share identical and node-scoped watches (and serve LIST rv=0) from one upstream
    /// stream per collection and identity [default: true].
    #[arg(long, action = clap::ArgAction::Set)]
    pub watch_cache: Option<bool>,
    /// How long a shared upstream watch without subscribers stays open [default: 30s].
    #[arg(long)]
    pub watch_linger: Option<String>,
    /// Let different identities share one upstream watch, each after a SubjectAccessReview
    /// (needs the proxy's own credentials) [default: true].
    #[arg(long, action = clap::ArgAction::Set)]
    pub watch_share_across_identities: Option<bool>,
}

/// A configuration the server accepts.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// Plain HTTP on loopback (`--plain-listen`).
    pub plain_listen: Option<SocketAddr>,
    /// TLS for privileged callers, on the privileged thread
    /// (`--privileged-listen`).
    pub privileged_listen: Option<SocketAddr>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub admin_listen: SocketAddr,
    pub shutdown_grace: Duration,
    pub limits: LimitsConfig,
    /// The watch multiplexer.
    pub watch: crate::watch::HubConfig,
    /// Caps on new client connections and TLS handshakes.
    pub connections: ConnectionLimits,
}

/// Where the limits and the blocks come from.
#[derive(Debug, Clone, Default)]
pub struct LimitsConfig {
    /// None: no limits (blocks still work).
    pub file: Option<PathBuf>,
    pub blocks_file: Option<PathBuf>,
    pub rate_limit_headers: bool,
}

/// What is wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--plain-listen {0}: plain HTTP is served on loopback addresses only (127.0.0.1, ::1); \
         clients from elsewhere must use TLS on --listen"
    )]
    PlainNotLoopback(SocketAddr),
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("missing required option --{0} (or `{1}` in the config file)")]
    Missing(&'static str, &'static str),
    #[error("--{option}: {value:?} is not a duration like 30s or 2m")]
    Duration {
        option: &'static str,
        value: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    #[error("--upstream-client-cert and --upstream-client-key go together")]
    HalfClientCert,
}

impl RunOptions {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<RunOptions, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_yaml_ng::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// `self` (flags) over `file`.
    pub fn over(self, file: RunOptions) -> RunOptions {
        RunOptions {
            config: self.config,
            listen: self.listen.or(file.listen),
            plain_listen: self.plain_listen.or(file.plain_listen),
            privileged_listen: self.privileged_listen.or(file.privileged_listen),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            client_ca: self.client_ca.or(file.client_ca),
            upstream: self.upstream.or(file.upstream),
            upstream_ca: self.upstream_ca.or(file.upstream_ca),
            upstream_client_cert: self.upstream_client_cert.or(file.upstream_client_cert),
            upstream_client_key: self.upstream_client_key.or(file.upstream_client_key),
            upstream_token_file: self.upstream_token_file.or(file.upstream_token_file),
            upstream_auth: self.upstream_auth.or(file.upstream_auth),
            proxy_user: self.proxy_user.or(file.proxy_user),
            service_account_key_file: or_vec(
                self.service_account_key_file,
                file.service_account_key_file,
            ),
            service_account_issuer: or_vec(
                self.service_account_issuer,
                file.service_account_issuer,
            ),
            api_audiences: or_vec(self.api_audiences, file.api_audiences),
            token_review_max_concurrent: self
                .token_review_max_concurrent
                .or(file.token_review_max_concurrent),
            token_review_rate: self.token_review_rate.or(file.token_review_rate),
            token_review_burst: self.token_review_burst.or(file.token_review_burst),
            anonymous_auth: self.anonymous_auth.or(file.anonymous_auth),
            limits: self.limits.or(file.limits),
            blocks_file: self.blocks_file.or(file.blocks_file),
            rate_limit_headers: self.rate_limit_headers.or(file.rate_limit_headers),
            max_connections: self.max_connections.or(file.max_connections),
            max_connections_per_source: self
                .max_connections_per_source
                .or(file.max_connections_per_source),
            max_tls_handshakes: self.max_tls_handshakes.or(file.max_tls_handshakes),
            serving_threads: self.serving_threads.or(file.serving_threads),
            accept_rate_per_source: self.accept_rate_per_source.or(file.accept_rate_per_source),
            accept_burst_per_source: self
                .accept_burst_per_source
                .or(file.accept_burst_per_source),
            admin_listen: self.admin_listen.or(file.admin_listen),
            shutdown_grace: self.shutdown_grace.or(file.shutdown_grace),
            upstream_timeout: self.upstream_timeout.or(file.upstream_timeout),
            upstream_max_connections_unary: self
                .upstream_max_connections_unary
                .or(file.upstream_max_connections_unary),
            upstream_unary_protocol: self
                .upstream_unary_protocol
                .or(file.upstream_unary_protocol),
            upstream_max_connections_long_running: self
                .upstream_max_connections_long_running
                .or(file.upstream_max_connections_long_running),
            upstream_max_connections_exempt: self
                .upstream_max_connections_exempt
                .or(file.upstream_max_connections_exempt),
            upstream_stream_wait: self.upstream_stream_wait.or(file.upstream_stream_wait),
            watch_cache: self.watch_cache.or(file.watch_cache),
            watch_linger: self.watch_linger.or(file.watch_linger),
            watch_share_across_identities: self
                .watch_share_across_identities
                .or(file.watch_share_across_identities),
        }
    }

    /// Flags merged over the `--config` file, if one is named.
    pub fn resolve(self) -> Result<ProxyConfig, ConfigError> {
        let merged = match &self.config {
            Some(path) => {
                let file = RunOptions::from_file(path)?;
                self.over(file)
            }
            None => self,
        };
        merged.validate()
    }

    /// Checks required fields and parses durations.
    pub fn validate(self) -> Result<ProxyConfig, ConfigError> {
        let client_cert = match (self.upstream_client_cert, self.upstream_client_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(ConfigError::HalfClientCert),
        };
        let defaults = Timeouts::default();
        if let Some(a) = self.plain_listen
            && !a.ip().is_loopback()
        {
            return Err(ConfigError::PlainNotLoopback(a));
        }
        Ok(ProxyConfig {
            plain_listen: self.plain_listen,
            privileged_listen: self.privileged_listen,
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 6443))),
            tls_cert: self
                .tls_cert
                .ok_or(ConfigError::Missing("tls-cert", "tlsCert"))?,
            tls_key: self
                .tls_key
                .ok_or(ConfigError::Missing("tls-key", "tlsKey"))?,
            client_ca: self.client_ca,
            upstream: UpstreamConfig {
                url: self
                    .upstream
                    .ok_or(ConfigError::Missing("upstream", "upstream"))?,
                tls: UpstreamTls {
                    ca: self.upstream_ca,
                    client_cert,
                },
                token_file: self.upstream_token_file,
                mode: self.upstream_auth.unwrap_or_default(),
                proxy_user: self
                    .proxy_user
                    .unwrap_or_else(|| DEFAULT_PROXY_USER.to_string()),
                timeouts: Timeouts {
                    response: duration(
                        "upstream-timeout",
                        self.upstream_timeout,
                        defaults.response,
                    )?,
                    ..defaults
                },
                lanes: {
                    let d = Lanes::default();
                    let wait = duration(
                        "upstream-stream-wait",
                        self.upstream_stream_wait,
                        d.unary.wait,
                    )?;
                    let lane = |option, value: Option<usize>, default: LaneLimits| match value {
                        Some(0) => Err(ConfigError::Zero(option)),
                        v => Ok(LaneLimits {
                            max_connections: v.unwrap_or(default.max_connections),
                            wait,
                        }),
                    };
                    Lanes {
                        unary: lane(
                            "upstream-max-connections-unary",
                            self.upstream_max_connections_unary,
                            d.unary,
                        )?,
                        long_running: lane(
                            "upstream-max-connections-long-running",
                            self.upstream_max_connections_long_running,
                            d.long_running,
                        )?,
                        exempt: lane(
                            "upstream-max-connections-exempt",
                            self.upstream_max_connections_exempt,
                            d.exempt,
                        )?,
                        unary_protocol: self.upstream_unary_protocol.unwrap_or_default(),
                    }
                },
            },
            auth: {
                let d = AuthConfig::default();
                AuthConfig {
                    service_account_key_files: self.service_account_key_file,
                    service_account_issuers: self.service_account_issuer,
                    api_audiences: self.api_audiences,
                    anonymous: self.anonymous_auth.unwrap_or(true),
                    review_max_concurrent: non_zero(
                        "token-review-max-concurrent",
                        self.token_review_max_concurrent,
                        d.review_max_concurrent,
                    )?,
                    review_rate: non_zero(
                        "token-review-rate",
                        self.token_review_rate,
                        d.review_rate,
                    )?,
                    review_burst: non_zero(
                        "token-review-burst",
                        self.token_review_burst,
                        d.review_burst,
                    )?,
                    ..d
                }
            },
            admin_listen: self
                .admin_listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9444))),
            shutdown_grace: duration(
                "shutdown-grace",
                self.shutdown_grace,
                Duration::from_secs(30),
            )?,
            limits: LimitsConfig {
                file: self.limits,
                blocks_file: self.blocks_file,
                rate_limit_headers: self.rate_limit_headers.unwrap_or(false),
            },
            connections: {
                let d = ConnectionLimits::default();
                let accept_rate_per_source = match self.accept_rate_per_source {
                    None | Some(0) => None,
                    Some(rate) => Some(AcceptRate {
                        per_second: non_zero(
                            "accept-rate-per-source",
                            Some(rate),
                            NonZeroU32::MIN,
                        )?,
                        burst: non_zero(
                            "accept-burst-per-source",
                            Some(self.accept_burst_per_source.unwrap_or(rate)),
                            NonZeroU32::MIN,
                        )?,
                    }),
                };
                ConnectionLimits {
                    max_connections: non_zero(
                        "max-connections",
                        self.max_connections,
                        d.max_connections,
                    )?,
                    max_connections_per_source: self
                        .max_connections_per_source
                        .unwrap_or(d.max_connections_per_source),
                    max_handshakes: non_zero(
                        "max-tls-handshakes",
                        self.max_tls_handshakes,
                        d.max_handshakes,
                    )?,
                    serving_threads: self.serving_threads.unwrap_or(d.serving_threads),
                    accept_rate_per_source,
                }
            },
            watch: crate::watch::HubConfig {
                enabled: self.watch_cache.unwrap_or(true),
                linger: duration("watch-linger", self.watch_linger, Duration::from_secs(30))?,
                share_across_identities: self.watch_share_across_identities.unwrap_or(true),
                ..crate::watch::HubConfig::default()
            },
        })
    }
}

fn or_vec<T>(flags: Vec<T>, file: Vec<T>) -> Vec<T> {
    if flags.is_empty() { file } else { flags }
}

/// `value` if given and not zero, else `default`; zero is an error.
fn non_zero<N: TryFrom<T>, T>(
    option: &'static str,
    value: Option<T>,
    default: N,
) -> Result<N, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => N::try_from(v).map_err(|_| ConfigError::Zero(option)),
    }
}

fn duration(
    option: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(&v).map_err(|source| ConfigError::Duration {
            option,
            value: v,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let file: RunOptions = serde_yaml_ng::from_str(
            "upstream: https://10.0.0.1:6443\ntlsCert: /f/cert\ntlsKey: /f/key\nshutdownGrace: 5s\nprivilegedListen: 10.0.0.2:6444\nservingThreads: 3\n",
        )
        .expect("parse");
        let flags = RunOptions {
            tls_cert: Some("/flag/cert".into()),
            ..RunOptions::default()
        };
        let cfg = flags.over(file).validate().expect("valid");
        assert_eq!(cfg.tls_cert, PathBuf::from("/flag/cert"));
        assert_eq!(cfg.tls_key, PathBuf::from("/f/key"));
        assert_eq!(cfg.upstream.url, "https://10.0.0.1:6443");
        assert_eq!(cfg.upstream.mode, AuthMode::Passthrough);
        assert!(cfg.auth.anonymous);
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(5));
        assert_eq!(cfg.connections.serving_threads, 3);
        assert_eq!(cfg.listen, "127.0.0.1:6443".parse().expect("addr"));
        assert_eq!(
            cfg.privileged_listen,
            Some("10.0.0.2:6444".parse().expect("addr"))
        );
    }

    #[test]
    fn the_example_config_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/config.yaml");
        let cfg = RunOptions::from_file(&path)
            .expect("docker/config.yaml parses")
            .validate()
            .expect("docker/config.yaml is valid");
        assert_eq!(cfg.upstream.mode, AuthMode::Passthrough);
        // Its commented ServiceAccount-key lines are right when switched on.
        let text = std::fs::read_to_string(&path).expect("read");
        let on = text.replace("# serviceAccount", "serviceAccount");
        let cfg = serde_yaml_ng::from_str::<RunOptions>(&on)
            .expect("parses with the key lines on")
            .validate()
            .expect("valid with the key lines on");
        assert_eq!(cfg.auth.service_account_key_files.len(), 1);
        assert_eq!(cfg.auth.service_account_issuers.len(), 1);
    }

    #[test]
    fn unknown_file_fields_are_refused() {
        let err = serde_yaml_ng::from_str::<RunOptions>("upstreem: x\n").expect_err("unknown");
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn plain_http_is_refused_off_loopback() {
        let opts = |listen: &str| RunOptions {
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            upstream: Some("https://127.0.0.1:6444".into()),
            plain_listen: Some(listen.parse().expect("addr")),
            ..RunOptions::default()
        };
        let err = opts("0.0.0.0:8001").validate().expect_err("not loopback");
        assert!(err.to_string().contains("loopback"), "{err}");
        assert!(opts("10.0.0.1:8001").validate().is_err());
        for ok in ["127.0.0.1:8001", "[::1]:8001"] {
            let cfg = opts(ok).validate().expect("loopback");
            assert_eq!(cfg.plain_listen, Some(ok.parse().expect("addr")));
        }
    }

    #[test]
    fn token_review_caps_default_and_refuse_zero() {
        let opts = |concurrent: Option<usize>| RunOptions {
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            upstream: Some("https://127.0.0.1:6444".into()),
            token_review_max_concurrent: concurrent,
            token_review_rate: Some(7),
            ..RunOptions::default()
        };
        let cfg = opts(None).validate().expect("valid");
        assert_eq!(cfg.auth.review_max_concurrent.get(), 8);
        assert_eq!(cfg.auth.review_rate.get(), 7);
        assert_eq!(cfg.auth.review_burst.get(), 20);
        let err = opts(Some(0)).validate().expect_err("zero");
        assert!(
            err.to_string().contains("--token-review-max-concurrent"),
            "{err}"
        );
    }

    #[test]
    fn connection_caps_default_and_parse() {
        let base = || RunOptions {
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            upstream: Some("https://127.0.0.1:6444".into()),
            ..RunOptions::default()
        };
        let cfg = base().validate().expect("valid");
        assert_eq!(cfg.connections, ConnectionLimits::default());
        assert_eq!(cfg.connections.max_connections.get(), 20_000);
        assert_eq!(cfg.connections.max_connections_per_source, 0);
        assert_eq!(cfg.connections.accept_rate_per_source, None);
        let cfg = RunOptions {
            max_connections_per_source: Some(0),
            max_tls_handshakes: Some(3),
            accept_rate_per_source: Some(50),
            ..base()
        }
        .validate()
        .expect("valid");
        assert_eq!(cfg.connections.max_connections_per_source, 0);
        assert_eq!(cfg.connections.max_handshakes.get(), 3);
        let rate = cfg.connections.accept_rate_per_source.expect("on");
        assert_eq!((rate.per_second.get(), rate.burst.get()), (50, 50));
        let err = RunOptions {
            max_tls_handshakes: Some(0),
            ..base()
        }
        .validate()
        .expect_err("zero");
        assert!(err.to_string().contains("--max-tls-handshakes"), "{err}");
        let off = RunOptions {
            accept_rate_per_source: Some(0),
            accept_burst_per_source: Some(9),
            ..base()
        };
        assert_eq!(
            off.validate()
                .expect("valid")
                .connections
                .accept_rate_per_source,
            None
        );
    }

    #[test]
    fn a_missing_upstream_is_named() {
        let opts = RunOptions {
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            ..RunOptions::default()
        };
        let err = opts.validate().expect_err("missing");
        assert!(err.to_string().contains("--upstream"), "{err}");
    }
}
