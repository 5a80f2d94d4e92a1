//! Global limits on Redis: a rule's aggregate limits held across every
//! Breakwater replica (`backend: {redis: ...}` in the limits file).
//!
//! The limits crate decides locally and stays free of I/O; when this
//! backend is up it hands the aggregate limits over
//! ([`Limiter::set_global`]) and tells us, per admitted request, what they
//! would take ([`Limiter::global_demand`]). We take it in Redis:
//!
//! - **One round trip per decision.** One Lua script checks and takes
//!   everything a request needs at once (a watch or in-flight slot, a rate
//!   token, a watch-open token), all or nothing, with Redis' own clock
//!   (`TIME`), so replicas' clocks do not matter. Token buckets are GCRA,
//!   as in the limits crate: one number (the theoretical arrival time) per
//!   bucket.
//! - **Slots are leases.** A slot is a member of a sorted set scored by its
//!   expiry. Every replica renews the slots it holds every third of the
//!   lease and removes them when the request ends; the script drops
//!   expired members before counting, so a dead replica's slots free
//!   within one lease. A replica stalled past its lease finds some of its
//!   slots gone: it takes them back only where the cap has room
//!   (`RENEW_SCRIPT`) and counts the rest until they end.
//! - **Fail static.** A Redis error or a call slower than `timeoutMillis`
//!   hands the limits back to the local limiter at once
//!   ([`Limiter::set_global`]`(false)`): this replica then enforces its
//!   `replicas` share against the counts it really holds (it kept counting
//!   them), never more, and the request that saw the failure is decided
//!   that way. Exempt rules never reach Redis. A probe reconnects every
//!   250 ms; on success the replica first registers every slot it holds
//!   again (a restarted Redis has forgotten them; the same script, within
//!   the caps), then takes global
//!   enforcement back. `breakwater_global_limits_up` says which mode is in
//!   force.
//!
//! - **Backends change on reload.** A reload that changes `backend`
//!   retires this backend ([`Global::retire`]: its slots leave its Redis)
//!   and the next one adopts the slots held then ([`Global::adopt`]),
//!   releasing them as their requests end (see
//!   `Admission::switch_backend`).
//!
//! - **Local quotas for the second step.** `charges: upstream` rules take
//!   their `rate`, `inflight` and `watchOpens` only when a request goes
//!   upstream, often inside the watch hub, which cannot wait for Redis.
//!   They spend local quotas ([`breakwater_limits::quota`]) that
//!   [`Global::fill`] keeps topped up from Redis off the request path: a
//!   batch of tokens from the same GCRA bucket (`TOKENS_SCRIPT`), a block
//!   of in-flight leases (`SLOTS_SCRIPT`), spares past a block returned.
//!   Nothing is spent that Redis did not grant first; the slack is what
//!   replicas hold unspent.
//!
//! What stays local even with Redis up: per-identity limits (an identity's
//! connection lands on one replica) and the upstream seat cap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use breakwater_limits::{
    CONCURRENCY_RETRY_AFTER, GlobalDemand, GlobalHeld, Limiter, RateLimit, RedisBackend,
    RejectReason, Unit,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use crate::error::Chain;

mod quota;
mod renew;
mod scripts;
mod switch;

use quota::QuotaBook;
use scripts::{REFUND_SCRIPT, RENEW_SCRIPT, SCRIPT, SLOTS_SCRIPT, TOKENS_SCRIPT, gcra};

/// How often a replica without Redis tries again.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Releases queued at most; past it a release is dropped and its lease
/// lapses by itself (the slot frees within one lease instead of at once).
const RELEASE_QUEUE: usize = 16_384;

/// Why the backend could not be set up or asked.
#[derive(Debug, thiserror::Error)]
pub enum GlobalError {
    #[error("reading the Redis password file {path}")]
    PasswordFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the Redis CA file {path}")]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Redis client")]
    Client(#[source] redis::RedisError),
    #[error("no connection to Redis yet")]
    NotConnected,
    #[error("connecting to Redis at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: redis::RedisError,
    },
    /// Redis said no to the username and password (never printed).
    #[error(
        "Redis at {addr} refused the credentials of user `{user}` (password from {password_file})"
    )]
    Auth {
        addr: String,
        user: String,
        password_file: String,
        #[source]
        source: redis::RedisError,
    },
    /// The TLS handshake failed: most often a `caFile` that did not sign
    /// the server's certificate, or a host name the certificate lacks.
    #[error(
        "TLS with Redis at {addr} failed (does {ca} hold the CA that signed its certificate, for this address?)"
    )]
    Tls {
        addr: String,
        ca: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis call failed")]
    Redis(#[source] redis::RedisError),
    #[error("unexpected script answer {0:?}")]
    Answer(Vec<i64>),
}

/// What Redis said about a request.
#[derive(Debug)]
pub enum Outcome {
    /// Taken; the hold (if a slot was taken) releases it when dropped.
    Granted(Option<Hold>),
    /// Refused by an aggregate limit, with the wait.
    Refused(RejectReason, Duration),
}

/// A slot lease in Redis.
#[derive(Debug, Clone)]
struct Lease {
    key: Arc<str>,
    member: Arc<str>,
    /// The cap of the slot's set (the rule's limit for all replicas when
    /// the slot was taken): a renewal takes back a lapsed slot only below
    /// it.
    cap: u64,
    /// Redis has it (taken there, or registered by a renewal); a slot taken
    /// locally while Redis was away has not, nor one that lapsed in Redis
    /// and found no room to be taken back.
    registered: bool,
    /// Stands for a request admitted before this backend took over (see
    /// [`Global::adopt`]), not for one request of its own.
    adopted: bool,
}

/// The Redis backend of one replica. Cheap to share.
#[derive(Clone)]
pub struct Global {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RedisBackend,
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    script: redis::Script,
    renew_script: redis::Script,
    tokens_script: redis::Script,
    refund_script: redis::Script,
    slots_script: redis::Script,
    /// Local quotas (see [`breakwater_limits::quota`]): the lease ids of
    /// each in-flight slot set's pooled slots, and when each bucket may be
    /// asked again (it was empty). One filler at a time.
    quotas: Mutex<QuotaBook>,
    filling: tokio::sync::Mutex<()>,
    /// Wakes the quota filler (a quota ran out).
    quota_wake: Arc<tokio::sync::Notify>,
    /// Held slots Redis did not count at the last renewal.
    unregistered: AtomicU64,
    /// This process, in lease members (random: a restarted replica must
    /// not renew its predecessor's slots).
    replica: String,
    next: AtomicU64,
    /// Slots this replica holds, by lease id: renewed while here.
    held: Mutex<HashMap<u64, Lease>>,
    releases: tokio::sync::mpsc::Sender<Lease>,
    release_rx: Mutex<Option<tokio::sync::mpsc::Receiver<Lease>>>,
    up: AtomicBool,
    /// The last failure logged at WARN: the next identical one goes to
    /// DEBUG (a probe fails every 250 ms while Redis is away).
    last_error: Mutex<Option<String>>,
    /// Neither renew nor release any more, as if the process had died.
    abandoned: AtomicBool,
    /// Replaced by another backend (a reload changed `backend`): it never
    /// hands the limits to the limiter again. The lock orders that against
    /// this backend's own [`Limiter::set_global`] calls.
    retired: Mutex<bool>,
    /// Ends this backend's tasks (a child of the proxy's shutdown token,
    /// once [`Global::run`] started).
    stop: Mutex<Option<CancellationToken>>,
}

impl Inner {
    /// The slots this replica holds (poison-tolerant).
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Lease>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The local quotas' book (poison-tolerant).
    fn quotas(&self) -> std::sync::MutexGuard<'_, QuotaBook> {
        self.quotas.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a newer backend replaced this one (poison-tolerant; held
    /// while acting on the answer, so retiring waits for it).
    fn retired(&self) -> std::sync::MutexGuard<'_, bool> {
        self.retired.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Global")
            .field("host", &self.inner.cfg.host)
            .field("port", &self.inner.cfg.port)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

/// A request's slot in Redis: released when dropped (with its permit).
pub struct Hold {
    inner: Arc<Inner>,
    id: u64,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold").field("id", &self.id).finish()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let lease = self.inner.held().remove(&self.id);
        if let Some(lease) = lease
            && !self.inner.abandoned.load(Ordering::Relaxed)
            && self.inner.releases.try_send(lease).is_err()
        {
            // Full (or shutting down): the lease lapses by itself.
            metrics::counter!("breakwater_global_limits_releases_dropped_total").increment(1);
        }
    }
}

impl Global {
    /// Sets the backend up; connects later, in [`Global::run`]. Until then
    /// the replica enforces its share.
    pub fn new(cfg: &RedisBackend) -> Result<Global, GlobalError> {
        let mut redis_info = redis::RedisConnectionInfo::default();
        if let Some(user) = &cfg.username {
            redis_info = redis_info.set_username(user);
        }
        if let Some(path) = &cfg.password_file {
            let password =
                std::fs::read_to_string(path).map_err(|source| GlobalError::PasswordFile {
                    path: path.clone(),
                    source,
                })?;
            redis_info = redis_info.set_password(password.trim_end_matches(['\r', '\n']));
        }
        let addr = match &cfg.tls {
            None => redis::ConnectionAddr::Tcp(cfg.host.clone(), cfg.port),
            Some(_) => redis::ConnectionAddr::TcpTls {
                host: cfg.host.clone(),
                port: cfg.port,
                insecure: false,
                tls_params: None,
            },
        };
        let info = redis::IntoConnectionInfo::into_connection_info(addr)
            .map_err(GlobalError::Client)?
            .set_redis_settings(redis_info);
        let client = match &cfg.tls {
            Some(Some(ca)) => {
                let pem = std::fs::read(ca).map_err(|source| GlobalError::CaFile {
                    path: ca.clone(),
                    source,
                })?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
            _ => redis::Client::open(info),
        }
        .map_err(GlobalError::Client)?;
        let (tx, rx) = tokio::sync::mpsc::channel(RELEASE_QUEUE);
        let replica = format!("{:016x}", rand::random::<u64>());
        Ok(Global {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                client,
                conn: ArcSwapOption::empty(),
                script: redis::Script::new(SCRIPT),
                renew_script: redis::Script::new(RENEW_SCRIPT),
                tokens_script: redis::Script::new(TOKENS_SCRIPT),
                refund_script: redis::Script::new(REFUND_SCRIPT),
                slots_script: redis::Script::new(SLOTS_SCRIPT),
                quotas: Mutex::new(QuotaBook::default()),
                filling: tokio::sync::Mutex::new(()),
                quota_wake: Arc::new(tokio::sync::Notify::new()),
                unregistered: AtomicU64::new(0),
                replica,
                next: AtomicU64::new(0),
                held: Mutex::new(HashMap::new()),
                releases: tx,
                release_rx: Mutex::new(Some(rx)),
                up: AtomicBool::new(false),
                last_error: Mutex::new(None),
                abandoned: AtomicBool::new(false),
                retired: Mutex::new(false),
                stop: Mutex::new(None),
            }),
        })
    }

    /// Is Redis enforcing the aggregate limits now?
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// Slots this replica holds in Redis.
    pub fn leases(&self) -> usize {
        self.inner.held().len()
    }

    /// Stops renewing and releasing this replica's slots, as if the process
    /// had died (for tests of lease expiry); decisions continue.
    pub fn abandon(&self) {
        self.inner.abandoned.store(true, Ordering::Relaxed);
    }

    fn key(&self, rule: &str, what: &str) -> String {
        // The hash tag keeps a rule's keys in one Redis Cluster slot, so
        // one script may touch them all.
        format!("{}{{{rule}}}:{what}", self.inner.cfg.key_prefix)
    }

    /// A handle on the Redis connection (cheap: the manager is shared).
    fn connection(&self) -> Result<ConnectionManager, GlobalError> {
        let conn = self
            .inner
            .conn
            .load_full()
            .ok_or(GlobalError::NotConnected)?;
        Ok((*conn).clone())
    }

    /// Takes what `demand` asks for, in one round trip.
    pub async fn acquire(&self, demand: &GlobalDemand) -> Result<Outcome, GlobalError> {
        let mut conn = self.connection()?;
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let member: Arc<str> = Arc::from(format!("{}:{id}", self.inner.replica));
        let (watches, inflight) = (
            self.key(&demand.rule, "watches"),
            self.key(&demand.rule, "inflight"),
        );
        let cap = |c: Option<u64>| c.map_or(-1, |c| i64::try_from(c).unwrap_or(i64::MAX));
        let us = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        let bucket = |r: Option<RateLimit>| r.map_or((0, -1), |r| gcra(&r));
        let (re, rt) = bucket(demand.rate);
        let (we, wt) = bucket(demand.watch_opens);
        let mut call = self.inner.script.key(&watches);
        call.key(&inflight)
            .key(self.key(&demand.rule, "rate"))
            .key(self.key(&demand.rule, "watch_opens"))
            .arg(&*member)
            .arg(us(self.inner.cfg.lease))
            .arg(cap(demand.watches))
            .arg(cap(demand.inflight))
            .arg(re)
            .arg(rt)
            .arg(we)
            .arg(wt);
        let answer: Vec<i64> =
            tokio::time::timeout(self.inner.cfg.timeout, call.invoke_async(&mut conn))
                .await
                .map_err(|_| GlobalError::Timeout(self.inner.cfg.timeout))?
                .map_err(GlobalError::Redis)?;
        let wait = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        match answer.as_slice() {
            [0, _] => {
                let (key, cap) = match (demand.watches, demand.inflight) {
                    (Some(c), _) => (watches, c),
                    (None, Some(c)) => (inflight, c),
                    (None, None) => return Ok(Outcome::Granted(None)),
                };
                self.inner.held().insert(
                    id,
                    Lease {
                        key: Arc::from(key),
                        member,
                        cap,
                        registered: true,
                        adopted: false,
                    },
                );
                Ok(Outcome::Granted(Some(Hold {
                    inner: Arc::clone(&self.inner),
                    id,
                })))
            }
            [1, _] => Ok(Outcome::Refused(
                RejectReason::AggregateWatches,
                CONCURRENCY_RETRY_AFTER,
            )),
            [2, _] => Ok(Outcome::Refused(
                RejectReason::AggregateInflight,
                CONCURRENCY_RETRY_AFTER,
            )),
            [3, w] => Ok(Outcome::Refused(RejectReason::AggregateRate, wait(*w))),
            [4, w] => Ok(Outcome::Refused(
                RejectReason::AggregateWatchOpens,
                wait(*w),
            )),
            _ => Err(GlobalError::Answer(answer)),
        }
    }

    /// The slot of a request admitted locally while Redis is away: held
    /// and renewed like any other, so that it is registered when Redis
    /// returns (before global enforcement resumes) and counts there.
    pub fn hold_unregistered(&self, demand: &GlobalDemand) -> Option<Hold> {
        let (what, cap) = match (demand.watches, demand.inflight) {
            (Some(c), _) => ("watches", c),
            (None, Some(c)) => ("inflight", c),
            (None, None) => return None,
        };
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            key: Arc::from(self.key(&demand.rule, what)),
            member: Arc::from(format!("{}:{id}", self.inner.replica)),
            cap,
            registered: false,
            adopted: false,
        };
        self.inner.held().insert(id, lease);
        Some(Hold {
            inner: Arc::clone(&self.inner),
            id,
        })
    }

    /// Hands the limits back to the local limiter (fail static), once per
    /// outage.
    pub fn fall_back(&self, limiter: &Limiter, err: &GlobalError) {
        if self.hand_over(limiter, false) {
            self.drop_quotas(limiter, false, false);
            self.mark_down(err);
        }
    }

    /// Hands the aggregate limits to this backend or takes them back,
    /// unless it was retired: then a newer backend (or the local limiter)
    /// owns that switch.
    /// Returns whether it did.
    fn hand_over(&self, limiter: &Limiter, on: bool) -> bool {
        let retired = self.inner.retired();
        if !*retired {
            limiter.set_global(on);
        }
        !*retired
    }

    fn mark_down(&self, err: &GlobalError) {
        if self.inner.up.swap(false, Ordering::Relaxed) {
            metrics::gauge!("breakwater_global_limits_up").set(0.0);
            metrics::counter!("breakwater_global_limits_fallbacks_total").increment(1);
            self.log_failure(err);
        }
    }

    /// Logs why Redis is not in charge: at WARN when the reason is new
    /// (an outage begins, the replica starts without Redis, or the cause
    /// changes, e.g. from "refused" to "wrong password"), else at DEBUG.
    fn log_failure(&self, err: &GlobalError) {
        let text = Chain(err).to_string();
        let mut last = self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.as_deref() == Some(text.as_str()) {
            tracing::debug!(error = %text, "Redis still unavailable");
        } else {
            tracing::warn!(error = %text,
                "Redis unavailable: enforcing this replica's share of the aggregate limits until it returns");
            *last = Some(text);
        }
    }

    /// What went wrong connecting, in the operator's terms: the
    /// credentials, TLS, or the connection itself.
    fn connect_error(&self, source: redis::RedisError) -> GlobalError {
        let cfg = &self.inner.cfg;
        let addr = format!("{}:{}", cfg.host, cfg.port);
        if source.kind() == redis::ErrorKind::AuthenticationFailed
            || source
                .code()
                .is_some_and(|c| c == "WRONGPASS" || c == "NOAUTH")
        {
            return GlobalError::Auth {
                addr,
                user: cfg
                    .username
                    .clone()
                    .unwrap_or_else(|| "default".to_string()),
                password_file: cfg.password_file.as_ref().map_or_else(
                    || "nowhere: no passwordFile".to_string(),
                    |p| p.display().to_string(),
                ),
                source,
            };
        }
        if cfg.tls.is_some() && is_tls_failure(&source) {
            return GlobalError::Tls {
                addr,
                ca: match &cfg.tls {
                    Some(Some(ca)) => ca.display().to_string(),
                    _ => "the system's roots".to_string(),
                },
                source,
            };
        }
        GlobalError::Connect { addr, source }
    }

    /// Keeps the backend going until `stop` (or [`Global::retire`]):
    /// connects, renews held slots while up, probes while down, and removes
    /// released slots. It hands `limiter`'s aggregate limits to Redis when
    /// Redis answers and back when it fails ([`Limiter::set_global`]),
    /// never once retired.
    pub async fn run(self, limiter: Arc<Limiter>, stop: CancellationToken) {
        let stop = stop.child_token();
        {
            let retired = self.inner.retired();
            if *retired {
                return;
            }
            *self
                .inner
                .stop
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(stop.clone());
        }
        metrics::gauge!("breakwater_global_limits_up").set(0.0);
        let releases = self
            .inner
            .release_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // The release loop outlives the others: what they release on the
        // way out still goes.
        let release_stop = CancellationToken::new();
        let drain =
            releases.map(|rx| tokio::spawn(self.clone().release_loop(rx, release_stop.clone())));
        let quotas = tokio::spawn(self.clone().quota_loop(Arc::clone(&limiter), stop.clone()));
        let renew_every = self.inner.cfg.lease / 3;
        loop {
            let wait = if self.is_up() {
                renew_every
            } else {
                PROBE_EVERY
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            if self.inner.abandoned.load(Ordering::Relaxed) {
                continue;
            }
            self.reconcile(&limiter);
            if self.is_up() {
                if let Err(err) = self.renew().await {
                    metrics::counter!("breakwater_global_limits_errors_total", "op" => "renew")
                        .increment(1);
                    if self.hand_over(&limiter, false) {
                        self.drop_quotas(&limiter, false, false);
                        self.mark_down(&err);
                    }
                }
            } else if let Err(err) = self.recover().await {
                self.log_failure(&err);
            } else {
                *self
                    .inner
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                // Quotas first, so the second step finds them filled.
                if let Err(err) = self.fill(&limiter, None).await {
                    tracing::debug!(error = %Chain(&err), "filling the local quotas failed");
                }
                self.inner.up.store(true, Ordering::Relaxed);
                if !self.hand_over(&limiter, true) {
                    // Retired meanwhile: the next backend is in charge.
                    self.inner.up.store(false, Ordering::Relaxed);
                    break;
                }
                metrics::gauge!("breakwater_global_limits_up").set(1.0);
                tracing::info!(
                    host = %self.inner.cfg.host,
                    port = self.inner.cfg.port,
                    "Redis reachable: aggregate limits are global"
                );
            }
        }
        let _ = quotas.await;
        // Shutting down (a retired backend did this already, and the
        // quotas are its successor's now): requests still draining are
        // decided at the share, the unspent tokens go back to their
        // buckets and the spare slots to Redis.
        if self.is_up() && self.hand_over(&limiter, false) {
            self.inner.up.store(false, Ordering::Relaxed);
            self.drop_quotas(&limiter, true, true);
        }
        self.refund_tokens().await;
        release_stop.cancel();
        if let Some(drain) = drain {
            let _ = drain.await;
        }
    }

    /// Connects if needed, checks Redis answers, and registers every slot
    /// held again (Redis may have restarted empty, or lapsed them while we
    /// could not renew).
    async fn recover(&self) -> Result<(), GlobalError> {
        if self.inner.conn.load().is_none() {
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(
                    self.inner.cfg.timeout.max(Duration::from_millis(200)),
                ))
                .set_response_timeout(Some(self.inner.cfg.timeout.max(Duration::from_millis(200))))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1));
            let conn = tokio::time::timeout(
                Duration::from_secs(2),
                ConnectionManager::new_with_config(self.inner.client.clone(), cfg),
            )
            .await
            .map_err(|_| GlobalError::Timeout(Duration::from_secs(2)))?
            .map_err(|e| self.connect_error(e))?;
            self.inner.conn.store(Some(Arc::new(conn)));
        }
        self.renew().await
    }

    /// Removes released slots, a batch per round trip; errors are left to
    /// the lease.
    async fn release_loop(
        self,
        mut rx: tokio::sync::mpsc::Receiver<Lease>,
        stop: CancellationToken,
    ) {
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => None,
                l = rx.recv() => l,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < 512
                && let Ok(l) = rx.try_recv()
            {
                batch.push(l);
            }
            self.release(&batch).await;
        }
        // Shutting down: what was released so far still goes.
        let mut batch = Vec::new();
        while let Ok(l) = rx.try_recv() {
            batch.push(l);
        }
        if !batch.is_empty() {
            self.release(&batch).await;
        }
    }

    async fn release(&self, batch: &[Lease]) {
        if self.inner.abandoned.load(Ordering::Relaxed) {
            return;
        }
        let Some(conn) = self.inner.conn.load_full() else {
            return;
        };
        let mut conn = (*conn).clone();
        let mut pipe = redis::pipe();
        for l in batch {
            pipe.zrem(&*l.key, &*l.member).ignore();
        }
        let timeout = self.inner.cfg.timeout.max(Duration::from_millis(500));
        match tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {}
            _ => {
                metrics::counter!("breakwater_global_limits_errors_total", "op" => "release")
                    .increment(1);
            }
        }
    }
}

/// Did `err` come from rustls (a handshake or certificate failure)?
/// redis-rs keeps the I/O error behind an `Arc<dyn Error>`, and
/// `io::Error::source` skips the error it wraps, so both are opened here.
fn is_tls_failure(err: &redis::RedisError) -> bool {
    type Shared = Arc<dyn std::error::Error + Send + Sync>;
    fn rustls(e: &(dyn std::error::Error + 'static)) -> bool {
        if e.is::<rustls::Error>() {
            return true;
        }
        if let Some(shared) = e.downcast_ref::<Shared>() {
            let inner: &(dyn std::error::Error + 'static) = &**shared;
            return rustls(inner);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            let inner: &(dyn std::error::Error + 'static) = inner;
            return rustls(inner);
        }
        false
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if rustls(e) {
            return true;
        }
        cause = e.source();
    }
    false
}
