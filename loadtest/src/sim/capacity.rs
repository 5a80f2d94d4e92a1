//! kube-sim's capacity model: what makes a storm saturate it the way it
//! saturates a real kube-apiserver.
//!
//! Without it kube-sim answers as fast as this machine can, so a storm of
//! thousands of LISTs only shows the load generator's own limits. With it
//! (`SimConfig::capacity`, or `loadtest sim --profile small-cluster`) every
//! resource request goes through two stages, both real queueing, not fixed
//! sleeps:
//!
//! 1. **Admission, like API Priority and Fairness.** At most
//!    `max_inflight` seats are taken (the apiserver's
//!    `--max-requests-inflight` + `--max-mutating-requests-inflight`, which APF
//!    turns into seats). The excess waits in the priority level's queues, as
//!    v1.24's queue set keeps them ([`super::apf`]): shuffle sharding onto a
//!    hand of queues per flow (user), fair queuing, a queue length enforced
//!    only while every seat is in use, and a wait limit (`queue_wait`) checked
//!    when a later request joins the queue; a refused request gets
//!    `429 Too Many Requests` with `Retry-After` and a `Status` body, as APF
//!    answers. `system:masters` is exempt (APF's `exempt` priority level), as
//!    are watches once their initial events are sent (APF frees a watch's
//!    seat then).
//! 2. **Service on a shared CPU.** Each admitted request then costs CPU
//!    seconds computed from what it does ([`CostModel`]): a fixed base, and for
//!    a LIST a per-object cost for every object of the resource it must scan
//!    (a consistent LIST reads the whole resource from etcd and filters; a
//!    `resourceVersion=0` LIST scans the watch cache, cheaper per object, and
//!    reads only the matches when an index serves its field selector, as the
//!    cacher's `spec.nodeName` index of pods does) plus a per-byte cost for
//!    what it serialises; every new connection's TLS handshake costs
//!    `tls_handshake` before the connection can speak; every watch event
//!    delivered costs a fixed dispatch cost plus its bytes; each open watch
//!    steals a little CPU all the time (its goroutines, timers and buffers)
//!    and holds `watch_memory_bytes` of memory. The CPU is scheduled like
//!    Go's runtime schedules goroutines: `cores` cores take runnable jobs
//!    from one FIFO run queue, and a job that runs longer than its time
//!    slice (Go preempts after 10–20 ms, see below) goes to the back of the
//!    queue. So short jobs finish in arrival order and long ones share the
//!    cores round-robin; a request that arrives behind thousands of queued
//!    handshakes waits for them — an admin GET that costs a third of a
//!    millisecond takes seconds in a handshake storm. Exempt requests skip
//!    the seats but not the CPU, which is why a real saturated apiserver is
//!    slow even for `system:masters`. etcd is a second Go process with its
//!    own run queue on the same cores (the kernel shares them between the
//!    two processes' threads): a consistent read or a write costs etcd its
//!    part there first ([`Work`]).
//!
//! **A request's passes through the run queue.** What puts a goroutine at
//! the back of a busy Go process's run queue is being woken by the network
//! or being preempted: a busy process polls the network only from `sysmon`
//! (its `P`s always find work in the run queues first), and `sysmon` puts
//! what it finds on the global run queue, where preempted goroutines go
//! too (`goschedImpl`). A goroutine woken by another over a channel runs
//! next instead (`runnext`). So a request waits a round of the queue once
//! per network wake-up on its path, a round being as long as the jobs
//! ahead take to use their time slices:
//!
//! - the apiserver: the request arrives (the connection's reader;
//!   [`Capacity::serve`] of the base cost before APF; the first request of
//!   a connection arrives with the client's TLS Finished and goes on from
//!   the handshake, [`Capacity::serve_next`]); for a request that reads or
//!   writes etcd, etcd's answer arrives ([`Capacity::serve_from_etcd`]: the
//!   gRPC client's reader, which hands the answer to the handler);
//! - etcd: the gRPC call arrives ([`Capacity::serve_etcd`]); the
//!   linearizable read's ReadIndex round and the handler's wake-up after
//!   it are channel hand-offs within etcd (`runnext`).
//!
//! A time slice is 10–20 ms, not 10 ([`CapacityConfig::sysmon_period`]):
//! Go preempts a goroutine only when `sysmon` sees it has run 10 ms, and a
//! busy process's `sysmon` wakes every 10 ms.
//!
//! **The garbage collector.** A consistent LIST of pods decodes every pod
//! etcd sends and keeps a node's few: tens of megabytes of garbage each, a
//! dozen a second. At GOGC=100 the apiserver's GC then starts a cycle about
//! as soon as it ends one, and while it marks, its background workers take
//! 25% of the process's CPU (`gcBackgroundUtilization`) before the run
//! queue's goroutines run. So while a consistent LIST's answer is being
//! decoded, [`CapacityConfig::gc_mark_share`] of the apiserver's cores go
//! to the GC (`gc_marking`); `decode_per_object` is lowered to match, so
//! a LIST costs the apiserver the same CPU and the storm's throughput holds,
//! but each round of the run queue is a third longer.
//!
//! The constants of the `small-cluster` preset and why they were chosen are in
//! docs/incident-lab.md.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::apf::{Decision, Enqueued, QueueSet, QueueSetConfig, Ticket};
use super::resources::ResourceType;
use super::server::ResBody;
use super::store::Store;

/// Scheduler tick: how often CPU time is handed out. 1 ms is tokio's timer
/// resolution; every request finishes on a tick boundary.
const TICK: Duration = Duration::from_millis(1);

/// What requests cost, in CPU seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct CostModel {
    /// Every request: authentication, authorization, decoding, admission.
    pub request_base: Duration,
    /// etcd's CPU for a read that reaches it (a consistent GET or LIST,
    /// resourceVersion unset) or a write, besides its keys: the gRPC call
    /// and, for a read, the linearizable ReadIndex round.
    pub etcd_request: Duration,
    /// etcd's CPU per key a range read returns: reading it from bbolt,
    /// copying it and marshalling it into the gRPC response (all the keys of
    /// the resource: etcd cannot filter by field).
    pub etcd_per_object: Duration,
    /// The apiserver's CPU per object it receives from etcd: unmarshalling
    /// the gRPC message, decoding the object (allocating it all, which its
    /// garbage collector then marks and sweeps) and filtering it.
    pub decode_per_object: Duration,
    /// A `resourceVersion=0` LIST from the watch cache: per object scanned
    /// and filtered.
    pub cache_per_object: Duration,
    /// Serialising a response or a watch event, per byte.
    pub serialize_per_byte: Duration,
    /// A new connection's TLS handshake (server side: key exchange and the
    /// serving key's signature; kubeadm's serving keys are RSA-2048).
    pub tls_handshake: Duration,
    /// A write (create, update, patch, delete): etcd's transaction (raft,
    /// WAL, apply), on etcd's CPU.
    pub write: Duration,
    /// Dispatching one watch event to one watcher, besides its bytes.
    pub watch_event: Duration,
    /// CPU each open watch costs per second of being open (a fraction of one
    /// core: 20 µs/s = 0.00002 cores).
    pub watch_idle_per_sec: Duration,
    /// Memory each open watch holds (buffers, goroutines); reported only.
    pub watch_memory_bytes: u64,
}

/// The capacity model's settings (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityConfig {
    /// Simulated CPU cores shared by all requests.
    pub cores: f64,
    /// Objects a LIST may process per seat it occupies (APF's work
    /// estimator: `objectsPerSeat` 100, at most `max_list_seats` seats).
    pub objects_per_seat: usize,
    pub max_list_seats: u32,
    /// How long a job runs before it goes to the back of the run queue
    /// (Go's scheduler preempts a goroutine after 10 ms).
    pub quantum: Duration,
    /// How often Go's `sysmon` looks for goroutines to preempt once it has
    /// nothing else to do (its sleep grows to 10 ms): a goroutine runs
    /// `quantum` plus up to this long before it is preempted (see `Cpu`).
    pub sysmon_period: Duration,
    /// The apiserver's CPU its garbage collector's background mark workers
    /// take while it marks (Go's `gcBackgroundUtilization`, 25%). It marks
    /// without rest while it decodes consistent LISTs (see [`Capacity`]'s
    /// scheduler); the jobs in its run queue share the rest.
    pub gc_mark_share: f64,
    /// Seats: concurrent non-exempt requests being served.
    pub max_inflight: usize,
    /// The priority level's queues (APF `queues`), of which each flow (one
    /// user) is dealt `hand_size` by shuffle sharding.
    pub queues: usize,
    pub hand_size: usize,
    /// Requests a queue holds before a new one gets 429 at once — only while
    /// every seat is in use (APF's `queueLengthLimit`; see [`super::apf`]).
    pub queue_length_limit: usize,
    /// How long a request may wait for a seat; a later arrival at its queue
    /// then rejects it with 429 (APF checks lazily, see [`super::apf`]).
    pub queue_wait: Duration,
    /// The deadline of a non-long-running request (`--request-timeout`,
    /// 60 s): one still queued then gets 504 from the timeout filter.
    pub request_timeout: Duration,
    /// The `Retry-After` a 429 carries (APF sends 1 s).
    pub retry_after_secs: u64,
    pub cost: CostModel,
}

impl CapacityConfig {
    /// A small control plane: a kube-apiserver v1.24 with etcd on 2 cores,
    /// calibrated against one (docs/incident-lab.md, "Calibration"). The
    /// seats and queue are APF's for the agents' priority level: the
    /// ServiceAccount flow schema maps them to `workload-low`, 100 of the
    /// 245 concurrency shares of the default 600 seats (400 read + 200
    /// mutating) = 245 seats; its 128 queues of 50, of which one flow (one
    /// ServiceAccount) shuffle-shards onto a hand of 6; a queued request
    /// waits a quarter of the 60 s request timeout before a later arrival at
    /// its queue rejects it (v1.24's queueset, [`super::apf`]).
    pub fn small_cluster() -> CapacityConfig {
        CapacityConfig {
            cores: 2.0,
            objects_per_seat: 100,
            max_list_seats: 10,
            quantum: Duration::from_millis(10),
            sysmon_period: Duration::from_millis(10),
            gc_mark_share: 0.25,
            max_inflight: 245,
            queues: 128,
            hand_size: 6,
            queue_length_limit: 50,
            queue_wait: Duration::from_secs(15),
            request_timeout: Duration::from_secs(60),
            retry_after_secs: 1,
            cost: CostModel {
                request_base: Duration::from_micros(300),
                etcd_request: Duration::from_micros(100),
                etcd_per_object: Duration::from_micros(5),
                decode_per_object: Duration::from_nanos(7_500),
                cache_per_object: Duration::from_nanos(500),
                serialize_per_byte: Duration::from_nanos(10),
                tls_handshake: Duration::from_micros(2500),
                write: Duration::from_millis(2),
                watch_event: Duration::from_micros(20),
                watch_idle_per_sec: Duration::from_micros(20),
                watch_memory_bytes: 32 * 1024,
            },
        }
    }

    /// A named preset (`small-cluster`).
    pub fn profile(name: &str) -> Option<CapacityConfig> {
        match name {
            "small-cluster" => Some(CapacityConfig::small_cluster()),
            _ => None,
        }
    }
}

impl CapacityConfig {
    /// The seats APF's list work estimator (v1.24) gives a LIST: the objects
    /// it may process over `objects_per_seat`, between 1 and
    /// `max_list_seats`. A LIST from the watch cache may process every stored
    /// object; one from etcd with a selector every stored object plus a page;
    /// one without, two pages.
    pub fn list_seats(
        &self,
        stored: usize,
        from_cache: bool,
        selectors: bool,
        limit: Option<usize>,
    ) -> u32 {
        let page = limit.filter(|&l| l > 0 && l < stored).unwrap_or(stored);
        let objects = if from_cache {
            stored
        } else if selectors {
            stored.saturating_add(page)
        } else {
            page.saturating_mul(2)
        };
        let seats = objects.div_ceil(self.objects_per_seat.max(1));
        u32::try_from(seats)
            .unwrap_or(u32::MAX)
            .clamp(1, self.max_list_seats.max(1))
    }
}

/// What a LIST reads, for [`CostModel::list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListSource {
    /// resourceVersion unset: a quorum read from etcd.
    Etcd,
    /// resourceVersion=0 (or any not-older-than RV): the watch cache.
    Cache,
}

/// The CPU a request costs each process: the apiserver's, and etcd's when
/// the request goes to etcd (a consistent read or a write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Work {
    pub apiserver: Duration,
    pub etcd: Option<Duration>,
}

impl Work {
    /// Both processes' CPU together.
    pub fn total(&self) -> Duration {
        self.apiserver + self.etcd.unwrap_or_default()
    }
}

impl CostModel {
    /// CPU for a LIST that scans `scanned` objects and returns `bytes`: a
    /// consistent one (`Etcd`) costs etcd its range and the apiserver the
    /// decoding; one from the watch cache costs the apiserver its scan.
    pub fn list(&self, source: ListSource, scanned: usize, bytes: usize) -> Work {
        let n = saturating_u32(scanned);
        match source {
            ListSource::Etcd => Work {
                apiserver: self.request_base + self.decode_per_object * n + self.bytes(bytes),
                etcd: Some(self.etcd_request + self.etcd_per_object * n),
            },
            ListSource::Cache => Work {
                apiserver: self.request_base + self.cache_per_object * n + self.bytes(bytes),
                etcd: None,
            },
        }
    }

    /// CPU for a GET (or any other read) answering `bytes`; a consistent
    /// GET (resourceVersion unset) reads its object from etcd.
    pub fn read(&self, consistent: bool, bytes: usize) -> Work {
        if consistent {
            Work {
                apiserver: self.request_base + self.decode_per_object + self.bytes(bytes),
                etcd: Some(self.etcd_request + self.etcd_per_object),
            }
        } else {
            Work {
                apiserver: self.request_base + self.bytes(bytes),
                etcd: None,
            }
        }
    }

    /// CPU for a write answering `bytes`.
    pub fn write(&self, bytes: usize) -> Work {
        Work {
            apiserver: self.request_base + self.bytes(bytes),
            etcd: Some(self.etcd_request + self.write),
        }
    }

    /// CPU to deliver one watch event of `bytes` to one watcher.
    pub fn event(&self, bytes: usize) -> Duration {
        self.watch_event + self.bytes(bytes)
    }

    fn bytes(&self, bytes: usize) -> Duration {
        self.serialize_per_byte * saturating_u32(bytes)
    }
}

/// What kind of work a request is, as far as the cost model cares.
#[derive(Debug, Clone, Copy)]
pub enum RequestKind {
    /// A LIST of `rt`; `consistent` when resourceVersion was unset (etcd).
    List {
        rt: &'static ResourceType,
        consistent: bool,
        /// Objects etcd reads at most: `limit + 1` for a paged LIST without
        /// selectors (the apiserver asks etcd for one page and one more key);
        /// `None` when it may read them all (selectors filter after reading).
        scan_bound: Option<usize>,
        /// A watch-cache LIST whose field selector an index serves (pods by
        /// `spec.nodeName`): it reads only the objects it returns.
        indexed: bool,
    },
    Write,
    /// A GET or another read; `consistent` when a GET had no
    /// resourceVersion (a quorum read from etcd).
    Read {
        consistent: bool,
    },
}

/// The CPU a finished request cost: its kind, the objects a LIST scanned
/// (every object of the type, or one page of them for a paged LIST without
/// selectors; a namespaced LIST is charged as a cluster-wide one, a slight
/// overestimate) and the bytes it answers.
pub fn request_cost(
    cost: &CostModel,
    store: &Store,
    kind: &RequestKind,
    resp: &Response<ResBody>,
) -> Work {
    let bytes = http_body::Body::size_hint(resp.body())
        .exact()
        .map_or(0, |b| usize::try_from(b).unwrap_or(usize::MAX));
    match *kind {
        RequestKind::List {
            rt,
            consistent,
            scan_bound,
            indexed,
        } => {
            let source = if consistent {
                ListSource::Etcd
            } else {
                ListSource::Cache
            };
            let all = store.count(rt);
            // An index lookup reads the matches only; their cost is in their
            // bytes (a node's few pods: nothing next to the base).
            let scanned = if indexed && !consistent {
                0
            } else {
                scan_bound.map_or(all, |b| b.min(all))
            };
            cost.list(source, scanned, bytes)
        }
        RequestKind::Write => cost.write(bytes),
        RequestKind::Read { consistent } => cost.read(consistent, bytes),
    }
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A point-in-time view of the model, for plots and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CapacityStats {
    /// Non-exempt requests holding a seat now.
    pub inflight: usize,
    /// Requests waiting for a seat now.
    pub queued: usize,
    /// Requests (exempt or not) and watch dispatches using the CPU now.
    pub runnable: usize,
    /// Watches open now (each steals CPU and holds memory).
    pub watches: usize,
    /// The highest `inflight` seen.
    pub peak_inflight: usize,
    /// The highest `queued` seen.
    pub peak_queued: usize,
    /// 429s answered so far.
    pub rejected: u64,
    /// CPU seconds consumed so far.
    pub cpu_seconds: f64,
    /// Memory the open watches hold, in bytes.
    pub watch_memory_bytes: u64,
}

/// The model at run time: seats, queues and the shared CPU.
#[derive(Debug)]
pub struct Capacity {
    cfg: CapacityConfig,
    /// The agents' priority level: its seats and queues.
    level: std::sync::Mutex<QueueSet>,
    inflight: AtomicUsize,
    watches: AtomicUsize,
    peak_inflight: AtomicUsize,
    peak_queued: AtomicUsize,
    rejected: AtomicU64,
    /// kube-apiserver's Go runtime: its run queue.
    cpu: Cpu,
    /// etcd's Go runtime, a process of its own on the same cores.
    etcd: Cpu,
}

/// A seat; dropping it frees the seat. Exempt requests get one without a ticket.
#[derive(Debug)]
pub struct Seat {
    held: Option<(Arc<Capacity>, Ticket, tokio::time::Instant)>,
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some((c, ticket, since)) = self.held.take() {
            c.inflight.fetch_sub(1, Ordering::Relaxed);
            let now = tokio::time::Instant::now();
            c.level().finish(ticket, now - since, now);
        }
    }
}

/// Held while a watch is open: counts it for the idle CPU and memory.
#[derive(Debug)]
pub struct WatchTicket(Arc<Capacity>);

impl Drop for WatchTicket {
    fn drop(&mut self) {
        self.0.watches.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Capacity {
    /// The model with its CPU scheduler running until `cancel`.
    pub fn start(cfg: CapacityConfig, cancel: CancellationToken) -> Arc<Capacity> {
        let level = QueueSet::new(
            QueueSetConfig {
                seats: cfg.max_inflight.max(1),
                queues: cfg.queues.max(1),
                hand_size: cfg.hand_size.max(1),
                queue_length_limit: cfg.queue_length_limit,
                request_wait_limit: cfg.queue_wait,
            },
            tokio::time::Instant::now(),
        );
        let cap = Arc::new(Capacity {
            level: std::sync::Mutex::new(level),
            inflight: AtomicUsize::new(0),
            watches: AtomicUsize::new(0),
            peak_inflight: AtomicUsize::new(0),
            peak_queued: AtomicUsize::new(0),
            rejected: AtomicU64::new(0),
            cpu: Cpu::new(cfg.quantum, cfg.sysmon_period),
            etcd: Cpu::new(cfg.quantum, cfg.sysmon_period),
            cfg,
        });
        tokio::spawn(scheduler(Arc::downgrade(&cap), cancel));
        cap
    }

    fn level(&self) -> std::sync::MutexGuard<'_, QueueSet> {
        self.level.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> &CapacityConfig {
        &self.cfg
    }

    pub fn cost(&self) -> &CostModel {
        &self.cfg.cost
    }

    /// APF-style admission of a one-seat request (see [`Capacity::admit_flow`]).
    pub async fn admit(self: &Arc<Self>, exempt: bool) -> Result<Seat, Response<ResBody>> {
        self.admit_flow(exempt, "", 1, false).await
    }

    /// Like [`Capacity::admit_flow`] for a non-long-running request of the
    /// anonymous flow.
    pub async fn admit_width(
        self: &Arc<Self>,
        exempt: bool,
        width: u32,
    ) -> Result<Seat, Response<ResBody>> {
        self.admit_flow(exempt, "", width, false).await
    }

    /// APF's admission of a request of `flow` (its user) that occupies
    /// `width` seats (APF's work estimate: a LIST takes up to 10): its seats
    /// once its queue is dispatched, or the 429 (queue full, or timed out in
    /// the queue) or 504 (a non-long-running request whose deadline passed
    /// in the queue) to send. Exempt callers always get a (ticket-less) seat.
    pub async fn admit_flow(
        self: &Arc<Self>,
        exempt: bool,
        flow: &str,
        width: u32,
        long_running: bool,
    ) -> Result<Seat, Response<ResBody>> {
        if exempt {
            return Ok(Seat { held: None });
        }
        let seats = usize::try_from(width).unwrap_or(usize::MAX);
        let enqueued = {
            let mut level = self.level();
            let e = level.enqueue(flow, seats, tokio::time::Instant::now());
            self.peak_queued
                .fetch_max(level.waiting(), Ordering::Relaxed);
            e
        };
        let (ticket, mut rx) = match enqueued {
            Enqueued::Waiting(t, rx) => (t, rx),
            Enqueued::Rejected => return Err(self.reject("the queue is full")),
        };
        let decision = if long_running {
            rx.await.ok()
        } else {
            match tokio::time::timeout(self.cfg.request_timeout, &mut rx).await {
                Ok(d) => d.ok(),
                Err(_) => {
                    let withdrawn = self.level().withdraw(ticket, tokio::time::Instant::now());
                    if withdrawn {
                        return Err(gateway_timeout());
                    }
                    // Dispatched meanwhile.
                    rx.try_recv().ok()
                }
            }
        };
        match decision {
            Some(Decision::Execute) => {}
            Some(Decision::TimedOut) => {
                return Err(self.reject("the request waited too long in queue"));
            }
            None => return Err(self.reject("shutting down")),
        }
        let now = self.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_inflight.fetch_max(now, Ordering::Relaxed);
        Ok(Seat {
            held: Some((Arc::clone(self), ticket, tokio::time::Instant::now())),
        })
    }

    fn reject(&self, why: &str) -> Response<ResBody> {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        too_many_requests(self.cfg.retry_after_secs, why)
    }

    /// Runs `cost` CPU seconds on the shared CPU, queued at the back of the
    /// run queue (a goroutine woken by the network); returns when done.
    pub async fn serve(&self, cost: Duration) {
        self.run_job(cost, false).await;
    }

    /// Runs `cost` CPU seconds on etcd's CPU (its own Go runtime, sharing
    /// the cores with the apiserver), queued at the back of its run queue: a
    /// request arriving from the network.
    pub async fn serve_etcd(&self, cost: Duration) {
        if cost.is_zero() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        self.etcd.submit(cost.as_secs_f64(), false, tx);
        let _ = rx.await;
    }

    /// A request's call to etcd and what the apiserver does with the
    /// answer: `etcd` on etcd's CPU (the call arrives from the network at
    /// the back of etcd's run queue), then `then` at the back of the
    /// apiserver's run queue. etcd's answer wakes the gRPC client's reader
    /// goroutine through the netpoller, and a busy Go process polls the
    /// network only from `sysmon`, which puts what it finds on the global
    /// run queue, behind the goroutines preempted before it (see
    /// docs/incident-lab.md, "A request's passes through the run queue").
    /// The reader then hands the message to the waiting handler, which
    /// runs next (`runnext`): both are one job here. A LIST's answer is
    /// every object of its range (`decodes_list`): decoding it keeps the
    /// garbage collector marking while it is runnable
    /// ([`CapacityConfig::gc_mark_share`]).
    pub async fn serve_from_etcd(&self, etcd: Duration, then: Duration, decodes_list: bool) {
        self.serve_etcd(etcd).await;
        if then.is_zero() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        self.cpu
            .submit_job(then.as_secs_f64(), false, decodes_list, tx);
        let _ = rx.await;
    }

    /// Like [`Capacity::serve`], for work that continues what just ran (the
    /// same goroutine going on after taking its seat): it runs next, at the
    /// head of the run queue, as Go's `runnext` does.
    pub async fn serve_next(&self, cost: Duration) {
        self.run_job(cost, true).await;
    }

    async fn run_job(&self, cost: Duration, next: bool) {
        if cost.is_zero() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        self.cpu.submit(cost.as_secs_f64(), next, tx);
        // A closed channel means the scheduler stopped (shutdown): go on.
        let _ = rx.await;
    }

    /// Counts an open watch until the ticket is dropped.
    pub fn watch_opened(self: &Arc<Self>) -> WatchTicket {
        self.watches.fetch_add(1, Ordering::Relaxed);
        WatchTicket(Arc::clone(self))
    }

    pub fn stats(&self) -> CapacityStats {
        let watches = self.watches.load(Ordering::Relaxed);
        CapacityStats {
            inflight: self.inflight.load(Ordering::Relaxed),
            queued: self.level().waiting(),
            runnable: self.cpu.runnable() + self.etcd.runnable(),
            watches,
            peak_inflight: self.peak_inflight.load(Ordering::Relaxed),
            peak_queued: self.peak_queued.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            cpu_seconds: self.cpu.consumed() + self.etcd.consumed(),
            watch_memory_bytes: self.cfg.cost.watch_memory_bytes * watches as u64,
        }
    }
}

/// The timeout filter's answer to a request whose deadline passed
/// (`apierrors.NewTimeoutError`): 504 with a `Status`.
pub fn gateway_timeout() -> Response<ResBody> {
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Timeout: request did not complete within the allotted timeout",
        "reason": "Timeout",
        "details": {},
        "code": 504,
    });
    let mut resp = Response::new(Full::new(Bytes::from(status.to_string())).boxed());
    *resp.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// APF's rejection: 429, `Retry-After`, a `Status` with `retryAfterSeconds`.
pub fn too_many_requests(retry_after_secs: u64, why: &str) -> Response<ResBody> {
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("Too many requests, please try again later. ({why})"),
        "reason": "TooManyRequests",
        "details": {"retryAfterSeconds": retry_after_secs},
        "code": 429,
    });
    let mut resp = Response::new(Full::new(Bytes::from(status.to_string())).boxed());
    *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    h.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(retry_after_secs),
    );
    resp
}

/// A CPU scheduled like Go's runtime: one FIFO run queue of jobs, each with
/// CPU seconds left; a job that used up its time slice goes to the back.
///
/// The time slice: Go preempts a goroutine that has run 10 ms
/// (`forcePreemptNS`), but only `sysmon` notices, and it measures from the
/// first of its wake-ups that saw the goroutine running
/// (`retake`: `pd.schedwhen` is set when sysmon first sees a new
/// `schedtick`). In a busy process sysmon has nothing else to do (no
/// long syscalls to retake) and sleeps its longest, 10 ms; a goroutine is
/// then first seen 0–10 ms after it started and preempted 10 ms after
/// that: it runs 10–20 ms, 15 ms on average. Each slice here is `quantum`
/// plus a fraction of `sysmon_period` drawn from an evenly spread
/// sequence (deterministic, no random source).
#[derive(Debug)]
struct Cpu {
    jobs: std::sync::Mutex<VecDeque<Job>>,
    /// Seconds a job runs at least before it is preempted.
    quantum: f64,
    /// sysmon's period in seconds: a slice is up to this much longer.
    sysmon: f64,
    /// Slices handed out so far (the index into the spread sequence).
    slices: AtomicU64,
    /// Runnable jobs that decode a LIST's answer from etcd (allocating).
    allocating: AtomicUsize,
    wake: Arc<Notify>,
    runnable: AtomicUsize,
    /// CPU seconds consumed, as f64 bits.
    consumed: AtomicU64,
}

#[derive(Debug)]
struct Job {
    left: f64,
    /// What is left of its current quantum.
    slice: f64,
    /// It decodes a LIST's answer from etcd (see [`Cpu::allocating`]).
    allocating: bool,
    done: oneshot::Sender<()>,
}

impl Cpu {
    fn new(quantum: Duration, sysmon: Duration) -> Cpu {
        Cpu {
            jobs: std::sync::Mutex::new(VecDeque::new()),
            quantum: quantum.as_secs_f64().max(1e-6),
            sysmon: sysmon.as_secs_f64(),
            slices: AtomicU64::new(0),
            allocating: AtomicUsize::new(0),
            wake: Arc::new(Notify::new()),
            runnable: AtomicUsize::new(0),
            consumed: AtomicU64::new(0),
        }
    }

    /// Queues a job at the back, or at the head when it runs `next`.
    fn submit(&self, secs: f64, next: bool, done: oneshot::Sender<()>) {
        self.submit_job(secs, next, false, done);
    }

    /// Like [`Cpu::submit`], for a job that decodes a LIST's answer from
    /// etcd when `allocating`.
    fn submit_job(&self, secs: f64, next: bool, allocating: bool, done: oneshot::Sender<()>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job {
            left: secs,
            slice: self.slice(),
            allocating,
            done,
        };
        if allocating {
            self.allocating.fetch_add(1, Ordering::Relaxed);
        }
        if next {
            jobs.push_front(job);
        } else {
            jobs.push_back(job);
        }
        self.runnable.store(jobs.len(), Ordering::Relaxed);
        drop(jobs);
        self.wake.notify_one();
    }

    /// A fresh time slice: `quantum` plus where in sysmon's period the
    /// goroutine was first seen, spread evenly over [0, 1) by the golden
    /// ratio's fractional part (a Weyl sequence).
    fn slice(&self) -> f64 {
        const GOLDEN_FRACTION: f64 = 0.618_033_988_749_894_9;
        let n = self.slices.fetch_add(1, Ordering::Relaxed);
        let seen = (n as f64 * GOLDEN_FRACTION).fract();
        self.quantum + self.sysmon * seen
    }

    fn runnable(&self) -> usize {
        self.runnable.load(Ordering::Relaxed)
    }

    /// Runnable jobs decoding a LIST's answer from etcd.
    fn allocating(&self) -> usize {
        self.allocating.load(Ordering::Relaxed)
    }

    /// Counts `secs` of CPU used outside the run queue (the GC's workers).
    fn burn(&self, secs: f64) {
        let _jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let total = self.consumed() + secs.max(0.0);
        self.consumed.store(total.to_bits(), Ordering::Relaxed);
    }

    fn consumed(&self) -> f64 {
        f64::from_bits(self.consumed.load(Ordering::Relaxed))
    }

    /// Hands out `dt` seconds of `cores` cores to the jobs at the head of
    /// the run queue, in order, at most `dt` each (a job is one goroutine,
    /// on one core at a time); finished jobs are woken, jobs that used up
    /// their quantum go to the back. Returns whether jobs remain.
    fn run(&self, dt: f64, cores: f64) -> bool {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.is_empty() {
            return false;
        }
        let mut budget = cores.max(0.0) * dt;
        let mut used = 0.0;
        // Jobs that ran and keep their place (quantum left), and jobs that
        // were preempted (to the back, after everything already queued).
        let mut kept = Vec::new();
        let mut preempted = Vec::new();
        while budget > 1e-12 {
            let Some(mut job) = jobs.pop_front() else {
                break;
            };
            let given = job.left.min(job.slice).min(dt).min(budget);
            job.left -= given;
            job.slice -= given;
            budget -= given;
            used += given;
            if job.left <= 1e-12 {
                if job.allocating {
                    self.allocating.fetch_sub(1, Ordering::Relaxed);
                }
                let _ = job.done.send(());
            } else if job.slice <= 1e-12 {
                job.slice = self.slice();
                preempted.push(job);
            } else {
                kept.push(job);
            }
        }
        for job in kept.into_iter().rev() {
            jobs.push_front(job);
        }
        jobs.extend(preempted);
        self.runnable.store(jobs.len(), Ordering::Relaxed);
        let total = self.consumed() + used;
        self.consumed.store(total.to_bits(), Ordering::Relaxed);
        !jobs.is_empty()
    }
}

/// Gives CPU time to runnable jobs every tick, sleeping while none are
/// runnable. Ends with the model or on `cancel`.
async fn scheduler(cap: std::sync::Weak<Capacity>, cancel: CancellationToken) {
    let mut last = tokio::time::Instant::now();
    loop {
        let Some(c) = cap.upgrade() else { return };
        let idle = c.cpu.runnable() == 0 && c.etcd.runnable() == 0;
        if idle {
            // Wait for work without keeping the model alive. A submit between
            // the emptiness check and here leaves a permit in the Notify
            // (notify_one stores one), so no wake-up is lost.
            let cpu_wake = Arc::clone(&c.cpu.wake);
            let etcd_wake = Arc::clone(&c.etcd.wake);
            drop(c);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = cpu_wake.notified() => {}
                _ = etcd_wake.notified() => {}
                // Re-check now and then, so a dropped model ends this task.
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            last = tokio::time::Instant::now();
            continue;
        }
        drop(c);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let Some(c) = cap.upgrade() else { return };
        let now = tokio::time::Instant::now();
        // Hand out the time that really passed, so a late tick (a busy
        // machine) does not slow the model down; capped so a long stall
        // does not finish everything at once.
        let dt = (now - last).as_secs_f64().min(0.05);
        last = now;
        let idle_watch_cores =
            c.watches.load(Ordering::Relaxed) as f64 * c.cfg.cost.watch_idle_per_sec.as_secs_f64();
        let (apiserver, etcd) = share_cores(
            c.cfg.cores - idle_watch_cores,
            c.cpu.runnable(),
            c.etcd.runnable(),
        );
        // While the apiserver decodes consistent LISTs its GC marks without
        // rest, and its background workers take their share of its CPU
        // before the run queue gets any.
        let (apiserver, gc) = gc_marking(apiserver, c.cpu.allocating(), c.cfg.gc_mark_share);
        c.cpu.burn(gc * dt);
        c.cpu.run(dt, apiserver);
        c.etcd.run(dt, etcd);
    }
}

/// The apiserver's `cores` split between its run queue and its GC's
/// background mark workers: while `allocating` jobs (decodes of consistent
/// LISTs) are runnable the GC marks without rest and takes `mark_share`
/// (Go's 25%) first. Returns (run queue, GC).
fn gc_marking(cores: f64, allocating: usize, mark_share: f64) -> (f64, f64) {
    if allocating == 0 {
        return (cores, 0.0);
    }
    let gc = cores * mark_share.clamp(0.0, 1.0);
    (cores - gc, gc)
}

/// How the kernel shares `cores` between the apiserver and etcd, two Go
/// processes with `apiserver_jobs` and `etcd_jobs` runnable goroutines: each
/// runs at most one thread per core (GOMAXPROCS = the cores) and the
/// kernel's fair scheduler gives every runnable thread the same share.
fn share_cores(cores: f64, apiserver_jobs: usize, etcd_jobs: usize) -> (f64, f64) {
    let cores = cores.max(0.0);
    let a = (apiserver_jobs as f64).min(cores.ceil());
    let e = (etcd_jobs as f64).min(cores.ceil());
    if a + e <= 0.0 {
        return (0.0, 0.0);
    }
    let fair = cores / (a + e);
    ((a * fair).min(a), (e * fair).min(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_cost_grows_with_the_objects_it_reads() {
        let m = CapacityConfig::small_cluster().cost;
        let small = m.list(ListSource::Cache, 100, 2_000).total();
        let big = m.list(ListSource::Cache, 100_000, 2_000).total();
        assert!(big > small * 10, "{big:?} vs {small:?}");
        // A consistent LIST of the same objects costs more than rv=0.
        assert!(m.list(ListSource::Etcd, 100_000, 2_000).total() > big);
        // Serialising more bytes costs more.
        assert!(m.list(ListSource::Cache, 100, 2_000_000).total() > small);
    }

    #[test]
    fn consistent_reads_and_writes_cost_etcd_its_share() {
        let cfg = CapacityConfig::small_cluster();
        let m = cfg.cost.clone();
        // A consistent LIST of 10,000 pods: 50 ms of etcd's range and 75 ms
        // of the apiserver's decoding, during which its GC's background
        // marking takes a quarter of the apiserver's CPU: 100 ms of it, and
        // 150 ms in all, a third of it etcd's.
        let list = m.list(ListSource::Etcd, 10_000, 0);
        let etcd = list.etcd.expect("etcd").as_secs_f64();
        let apiserver = list.apiserver.as_secs_f64() / (1.0 - cfg.gc_mark_share);
        assert!((etcd + apiserver - 0.1504).abs() < 1e-3, "{list:?}");
        assert!(apiserver > etcd * 1.9 && apiserver < etcd * 2.1, "{list:?}");
        // The watch cache and a GET with resourceVersion stay in the apiserver.
        assert_eq!(m.list(ListSource::Cache, 10_000, 0).etcd, None);
        assert_eq!(m.read(false, 500).etcd, None);
        assert!(m.read(true, 500).etcd.is_some());
        assert!(m.write(500).etcd.expect("etcd") >= m.write);
    }

    #[test]
    fn the_gc_marks_while_consistent_lists_decode() {
        // Nothing allocating: the run queue has the cores.
        assert_eq!(gc_marking(2.0, 0, 0.25), (2.0, 0.0));
        // A LIST's answer decoding: the mark workers take a quarter first.
        assert_eq!(gc_marking(2.0, 3, 0.25), (1.5, 0.5));
        assert_eq!(gc_marking(1.0, 1, 0.25), (0.75, 0.25));
    }

    #[test]
    fn the_kernel_shares_the_cores_between_apiserver_and_etcd() {
        // Alone, a process gets one core per runnable goroutine, at most all.
        assert_eq!(share_cores(2.0, 5, 0), (2.0, 0.0));
        assert_eq!(share_cores(2.0, 1, 0), (1.0, 0.0));
        assert_eq!(share_cores(2.0, 0, 3), (0.0, 2.0));
        // Both busy: two threads each, a core each.
        assert_eq!(share_cores(2.0, 24, 10), (1.0, 1.0));
        // etcd with one runnable goroutine: one thread of three.
        let (a, e) = share_cores(2.0, 24, 1);
        assert!((a - 4.0 / 3.0).abs() < 1e-9 && (e - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(share_cores(2.0, 0, 0), (0.0, 0.0));
    }

    #[test]
    fn list_seats_follow_apf_list_work_estimator() {
        let cfg = CapacityConfig::small_cluster();
        // From the watch cache: every stored object may be processed.
        assert_eq!(cfg.list_seats(10_000, true, true, Some(500)), 10);
        assert_eq!(cfg.list_seats(150, true, true, Some(500)), 2);
        // From etcd with a selector: everything plus a page.
        assert_eq!(cfg.list_seats(250, false, true, Some(100)), 4);
        // From etcd without one: two pages.
        assert_eq!(cfg.list_seats(10_000, false, false, Some(1)), 1);
        assert_eq!(cfg.list_seats(10_000, false, false, Some(120)), 3);
        assert_eq!(cfg.list_seats(0, true, false, None), 1);
    }

    #[test]
    fn short_jobs_finish_in_arrival_order() {
        let cpu = Cpu::new(Duration::from_millis(10), Duration::ZERO);
        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        cpu.submit(0.003, false, a);
        cpu.submit(0.001, false, b);
        // One core: a runs first, b waits although it is shorter.
        for _ in 0..2 {
            assert!(cpu.run(0.001, 1.0));
            assert!(ra.try_recv().is_err() && rb.try_recv().is_err());
        }
        assert!(cpu.run(0.001, 1.0));
        assert!(ra.try_recv().is_ok());
        assert!(rb.try_recv().is_err());
        assert!(!cpu.run(0.001, 1.0));
        assert!(rb.try_recv().is_ok());
        assert!((cpu.consumed() - 0.004).abs() < 1e-9);
    }

    #[test]
    fn a_slice_is_the_quantum_and_up_to_one_sysmon_period() {
        let cpu = Cpu::new(Duration::from_millis(10), Duration::from_millis(10));
        let slices: Vec<f64> = (0..1000).map(|_| cpu.slice()).collect();
        assert!(slices.iter().all(|&s| (0.010..0.020).contains(&s)));
        // Spread evenly: 15 ms on average, short and long ones alike.
        let mean = slices.iter().sum::<f64>() / slices.len() as f64;
        assert!((mean - 0.015).abs() < 2e-4, "{mean}");
        assert!(slices.iter().any(|&s| s < 0.011) && slices.iter().any(|&s| s > 0.019));
        // Without sysmon's delay a slice is the quantum.
        let plain = Cpu::new(Duration::from_millis(10), Duration::ZERO);
        assert!((0..10).all(|_| (plain.slice() - 0.010).abs() < 1e-12));
    }

    #[test]
    fn a_job_runs_its_whole_slice_before_it_is_preempted() {
        let cpu = Cpu::new(Duration::from_millis(10), Duration::from_millis(10));
        // The second slice drawn is 16.2 ms (0.618 of sysmon's period).
        let _ = cpu.slice();
        let (a, _ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        cpu.submit(0.100, false, a);
        cpu.submit(0.001, false, b);
        for _ in 0..16 {
            assert!(cpu.run(0.001, 1.0));
        }
        assert!(rb.try_recv().is_err(), "a keeps the core for 16.2 ms");
        cpu.run(0.001, 1.0);
        cpu.run(0.001, 1.0);
        assert!(rb.try_recv().is_ok(), "then b runs");
    }

    #[test]
    fn a_continuation_runs_next() {
        let cpu = Cpu::new(Duration::from_millis(10), Duration::ZERO);
        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        cpu.submit(0.001, false, a);
        cpu.submit(0.001, true, b);
        assert!(cpu.run(0.001, 1.0));
        assert!(rb.try_recv().is_ok() && ra.try_recv().is_err());
    }

    #[test]
    fn a_long_job_is_preempted_after_its_quantum() {
        let cpu = Cpu::new(Duration::from_millis(10), Duration::ZERO);
        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        cpu.submit(0.030, false, a);
        cpu.submit(0.001, false, b);
        for _ in 0..10 {
            assert!(cpu.run(0.001, 1.0));
        }
        assert!(rb.try_recv().is_err(), "b waits for a's quantum");
        assert!(cpu.run(0.001, 1.0));
        assert!(rb.try_recv().is_ok(), "then b runs, before the rest of a");
        assert!(ra.try_recv().is_err());
    }

    #[test]
    fn each_core_runs_one_job_at_a_time() {
        let cpu = Cpu::new(Duration::from_millis(10), Duration::ZERO);
        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        let (c, mut rc) = oneshot::channel();
        cpu.submit(0.002, false, a);
        cpu.submit(0.002, false, b);
        cpu.submit(0.001, false, c);
        // Two cores: a and b run side by side (at most one core each).
        assert!(cpu.run(0.001, 2.0));
        assert!(cpu.run(0.001, 2.0));
        assert!(ra.try_recv().is_ok() && rb.try_recv().is_ok());
        assert!(rc.try_recv().is_err());
        assert!(!cpu.run(0.001, 2.0));
        assert!(rc.try_recv().is_ok());
    }

    #[tokio::test]
    async fn inflight_bound_yields_429_with_retry_after() {
        let cancel = CancellationToken::new();
        let cfg = CapacityConfig {
            max_inflight: 1,
            queue_length_limit: 0,
            ..CapacityConfig::small_cluster()
        };
        let cap = Capacity::start(cfg, cancel.clone());
        let seat = cap.admit(false).await.expect("first takes the seat");
        let resp = cap.admit(false).await.expect_err("second is refused");
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let status: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(status["reason"], "TooManyRequests");
        assert_eq!(status["details"]["retryAfterSeconds"], 1);
        // Exempt callers are never refused.
        let _exempt = cap.admit(true).await.expect("exempt");
        assert_eq!(cap.stats().rejected, 1);
        assert_eq!(cap.stats().inflight, 1);
        drop(seat);
        assert_eq!(cap.stats().inflight, 0);
        let _again = cap.admit(false).await.expect("seat freed");
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_queued_request_gets_the_freed_seat_and_a_late_one_gets_429() {
        let cancel = CancellationToken::new();
        let cfg = CapacityConfig {
            max_inflight: 1,
            hand_size: 1,
            queue_length_limit: 1,
            queue_wait: Duration::from_millis(200),
            ..CapacityConfig::small_cluster()
        };
        let cap = Capacity::start(cfg, cancel.clone());
        let seat = cap.admit(false).await.expect("seat");
        let waiter = tokio::spawn({
            let cap = Arc::clone(&cap);
            async move { cap.admit(false).await.map(drop).map_err(|r| r.status()) }
        });
        tokio::task::yield_now().await;
        // The queue (1) is full and the seat in use: a third is refused.
        assert!(cap.admit(false).await.is_err());
        drop(seat);
        assert_eq!(waiter.await.expect("join"), Ok(()));
        // Now hold the seat and let a queued request wait too long: the
        // next arrival at its queue rejects it (APF checks lazily).
        let _seat = cap.admit(false).await.expect("seat");
        let late = tokio::spawn({
            let cap = Arc::clone(&cap);
            async move { cap.admit(false).await.map(drop).map_err(|r| r.status()) }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!late.is_finished(), "still queued: nothing arrived");
        let next = tokio::spawn({
            let cap = Arc::clone(&cap);
            async move { cap.admit(false).await.map(drop).map_err(|r| r.status()) }
        });
        assert_eq!(
            late.await.expect("join"),
            Err(StatusCode::TOO_MANY_REQUESTS)
        );
        next.abort();
        cancel.cancel();
    }

    #[tokio::test]
    async fn etcds_answer_waits_behind_the_apiservers_run_queue() {
        let cancel = CancellationToken::new();
        let cfg = CapacityConfig {
            cores: 1.0,
            sysmon_period: Duration::ZERO,
            ..CapacityConfig::small_cluster()
        };
        let cap = Capacity::start(cfg, cancel.clone());
        // Three LISTs decoding on the apiserver (100 ms each, 10 ms slices).
        for _ in 0..3 {
            let cap = Arc::clone(&cap);
            tokio::spawn(async move { cap.serve(Duration::from_millis(100)).await });
        }
        tokio::task::yield_now().await;
        // A consistent GET: 1 ms of etcd, then 1 ms of the apiserver. Its
        // answer arrives from the network and waits for a slice of each
        // LIST before it (about 30 ms of CPU on one core), where
        // a hand-off (`runnext`) would wait for the running slice only.
        let start = tokio::time::Instant::now();
        cap.serve_from_etcd(Duration::from_millis(1), Duration::from_millis(1), false)
            .await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(25), "{took:?}");
        cancel.cancel();
    }

    #[tokio::test]
    async fn latency_rises_with_the_number_of_runnable_requests() {
        let cancel = CancellationToken::new();
        let cfg = CapacityConfig {
            cores: 1.0,
            ..CapacityConfig::small_cluster()
        };
        let cap = Capacity::start(cfg, cancel.clone());
        let start = tokio::time::Instant::now();
        cap.serve(Duration::from_millis(2)).await;
        let alone = start.elapsed();
        // Ten 20 ms jobs queued before it on one core: the same 2 ms job now
        // waits for a quantum of each.
        for _ in 0..10 {
            let cap = Arc::clone(&cap);
            tokio::spawn(async move { cap.serve(Duration::from_millis(20)).await });
        }
        tokio::task::yield_now().await;
        let start = tokio::time::Instant::now();
        cap.serve(Duration::from_millis(2)).await;
        let loaded = start.elapsed();
        // Behind ten jobs on one core, 2 ms of CPU waits for ten quanta
        // (100 ms of wall time: the scheduler never hands out more than the
        // time that really passed); alone it needs 2 ms and a tick or two.
        assert!(
            loaded >= Duration::from_millis(20) && loaded > alone,
            "alone {alone:?}, loaded {loaded:?}"
        );
        cancel.cancel();
    }
}
