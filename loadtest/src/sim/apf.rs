//! The queues of one APF priority level, as kube-apiserver v1.24 keeps them
//! (k8s.io/apiserver/pkg/util/flowcontrol/fairqueuing/queueset/queueset.go).
//!
//! What matters for a storm, and what a single FIFO with a fixed wait limit
//! gets wrong:
//!
//! - **Shuffle sharding.** A flow (the FlowSchema and, for `ByUser`
//!   schemas, the user: all agents of a DaemonSet share their ServiceAccount,
//!   so they are one flow) is dealt a hand of `hand_size` of the level's
//!   `queues` queues from the hash of its name; each new request joins the
//!   queue of its hand with the least work waiting in it (`shuffleShardLocked`).
//! - **Queue length.** A new request is rejected only when its queue holds
//!   `queue_length_limit` requests *and* every seat of the level is in use
//!   (`rejectOrEnqueueToBoundLocked`). 24 LISTs of 10 seats use 240 of 245
//!   seats: the queues may then grow without bound.
//! - **The wait limit is checked lazily.** A queued request that waited
//!   longer than `request_wait_limit` (a quarter of the request timeout) is
//!   rejected only when a new request is put into the *same* queue
//!   (`removeTimedOutRequestsFromQueueToBoundLocked`: "currently timeout is
//!   only checked for each new request"). New requests go to the queue with
//!   the least work, so the longest queues of a hand are not swept while
//!   their requests go on waiting to be served. (The request's own context
//!   deadline, 60 s for a non-long-running request, ends its wait as well.)
//! - **Fair queuing.** A request is dispatched from the non-empty queue
//!   whose oldest request has the least virtual finish time
//!   (`nextDispatchR` + its seats × the estimated 3 ms service time), only if
//!   its seats are free: a 10-seat LIST at the head blocks the level until
//!   10 seats are free (`findDispatchQueueToBoundLocked`).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// What the queue set decided for a waiting request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Dispatched: it holds its seats now.
    Execute,
    /// Waited longer than the wait limit (found so by a later arrival).
    TimedOut,
}

/// The settings of one priority level's queue set.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSetConfig {
    /// Seats of the level (its concurrency limit).
    pub seats: usize,
    /// Queues of the level (`queues`, 128 for `workload-low`).
    pub queues: usize,
    /// Queues dealt to each flow (`handSize`, 6).
    pub hand_size: usize,
    /// Requests a queue holds before new ones are rejected, while every seat
    /// is in use (`queueLengthLimit`, 50).
    pub queue_length_limit: usize,
    /// How long a request may wait in its queue (`--request-timeout` / 4).
    pub request_wait_limit: Duration,
}

/// APF's assumed service time of a request (`estimatedServiceDuration`):
/// 3 ms since v1.23 (kubernetes/kubernetes#104806, "Change execution
/// duration guess from 1 minute to 3 milliseconds"), so v1.24's. A queue
/// is charged this much virtual time per seat when a request starts and
/// corrected to the real service time when it ends; with 3 s, a queue that
/// a time-out sweep has just emptied was served first for about a second
/// of virtual time, and the storm's stale queues waited longer (session 11:
/// the consistent storm's 429s fell from 1,591 to 1,211–1,256).
const ESTIMATED_SERVICE_SECS: f64 = 0.003;

#[derive(Debug)]
struct Waiter {
    id: u64,
    seats: usize,
    arrival: Instant,
    arrival_r: f64,
    decision: oneshot::Sender<Decision>,
}

#[derive(Debug, Default)]
struct Queue {
    waiting: VecDeque<Waiter>,
    next_dispatch_r: f64,
    seats_in_use: usize,
    executing: usize,
}

impl Queue {
    fn waiting_seats(&self) -> usize {
        self.waiting.iter().map(|w| w.seats).sum()
    }

    /// Anti-windup (`boundNextDispatchLocked`): dispatch in the virtual
    /// world never precedes the arrival of the oldest waiting request.
    fn bound(&mut self) {
        if let Some(w) = self.waiting.front() {
            self.next_dispatch_r = self.next_dispatch_r.max(w.arrival_r);
        }
    }
}

/// Where a request was put, to finish or withdraw it later.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    pub queue: usize,
    pub id: u64,
    pub seats: usize,
}

/// What [`QueueSet::enqueue`] did.
#[derive(Debug)]
pub enum Enqueued {
    /// Queued (possibly already dispatched): wait for the decision.
    Waiting(Ticket, oneshot::Receiver<Decision>),
    /// Its queue is full and every seat is in use: 429 at once.
    Rejected,
}

/// One priority level's queues and seats.
#[derive(Debug)]
pub struct QueueSet {
    cfg: QueueSetConfig,
    queues: Vec<Queue>,
    seats_in_use: usize,
    waiting: usize,
    current_r: f64,
    last: Instant,
    robin: usize,
    enqueues: usize,
    next_id: u64,
    /// Requests rejected because they waited too long (found by an arrival).
    pub timed_out: u64,
}

impl QueueSet {
    pub fn new(cfg: QueueSetConfig, now: Instant) -> QueueSet {
        let n = cfg.queues.max(1);
        QueueSet {
            queues: (0..n).map(|_| Queue::default()).collect(),
            cfg,
            seats_in_use: 0,
            waiting: 0,
            current_r: 0.0,
            last: now,
            robin: 0,
            enqueues: 0,
            next_id: 0,
            timed_out: 0,
        }
    }

    pub fn seats_in_use(&self) -> usize {
        self.seats_in_use
    }

    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// The queues of `flow`'s hand: shuffle sharding's dealer
    /// (`shufflesharding.Dealer`) on the 64-bit FNV-1a hash of the flow.
    pub fn hand(&self, flow: &str) -> Vec<usize> {
        let deck = self.queues.len();
        let size = self.cfg.hand_size.clamp(1, deck);
        let mut rem = fnv1a64(flow.as_bytes());
        let mut hand: Vec<usize> = Vec::with_capacity(size);
        for i in 0..size {
            let left = (deck - i) as u64;
            let mut card = usize::try_from(rem % left).unwrap_or(0);
            rem /= left;
            // The card-th queue not yet dealt.
            let mut sorted = hand.clone();
            sorted.sort_unstable();
            for dealt in sorted {
                if card >= dealt {
                    card += 1;
                }
            }
            hand.push(card);
        }
        hand
    }

    /// Advances the virtual clock R (`syncTimeLocked`): it runs at the seats
    /// the busy queues could use, shared among them.
    fn sync(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let mut active = 0usize;
        let mut requested = 0usize;
        for q in &self.queues {
            requested += q.seats_in_use + q.waiting_seats();
            if !q.waiting.is_empty() || q.executing > 0 {
                active += 1;
            }
        }
        if active > 0 {
            let ratio = requested.min(self.cfg.seats) as f64 / active as f64;
            self.current_r += ratio * dt;
        }
    }

    /// A new request of `flow` needing `seats`: joins the least-loaded queue
    /// of the flow's hand, after that queue's timed-out requests are rejected;
    /// or is rejected when that queue is full and every seat is in use. Then
    /// dispatches what it can.
    pub fn enqueue(&mut self, flow: &str, seats: usize, now: Instant) -> Enqueued {
        self.sync(now);
        let seats = seats.clamp(1, self.cfg.seats.max(1));
        let hand = self.hand(flow);
        let offset = self.enqueues % hand.len();
        self.enqueues += 1;
        let mut best = hand[offset];
        let mut least = usize::MAX;
        for i in 0..hand.len() {
            let q = hand[(offset + i) % hand.len()];
            // Work waiting: seats × the same assumed service time.
            let work = self.queues[q].waiting_seats();
            if work < least {
                least = work;
                best = q;
            }
        }
        self.time_out_old(best, now);
        if self.seats_in_use >= self.cfg.seats
            && self.queues[best].waiting.len() >= self.cfg.queue_length_limit
        {
            self.queues[best].bound();
            return Enqueued::Rejected;
        }
        let (tx, rx) = oneshot::channel();
        let id = self.next_id;
        self.next_id += 1;
        let queue = &mut self.queues[best];
        if queue.waiting.is_empty() && queue.executing == 0 {
            queue.next_dispatch_r = self.current_r;
        }
        queue.waiting.push_back(Waiter {
            id,
            seats,
            arrival: now,
            arrival_r: self.current_r,
            decision: tx,
        });
        queue.bound();
        self.waiting += 1;
        self.dispatch();
        Enqueued::Waiting(
            Ticket {
                queue: best,
                id,
                seats,
            },
            rx,
        )
    }

    /// Rejects the requests at the head of `queue` that waited too long.
    fn time_out_old(&mut self, queue: usize, now: Instant) {
        let limit = self.cfg.request_wait_limit;
        let q = &mut self.queues[queue];
        while let Some(w) = q.waiting.front() {
            if now.saturating_duration_since(w.arrival) <= limit {
                break;
            }
            if let Some(w) = q.waiting.pop_front() {
                let _ = w.decision.send(Decision::TimedOut);
                self.waiting -= 1;
                self.timed_out += 1;
            }
        }
    }

    /// Dispatches as much as possible (`dispatchAsMuchAsPossibleLocked`).
    fn dispatch(&mut self) {
        while self.waiting > 0 && self.seats_in_use < self.cfg.seats {
            let n = self.queues.len();
            let mut min: Option<(usize, f64)> = None;
            for _ in 0..n {
                self.robin = (self.robin + 1) % n;
                let q = &self.queues[self.robin];
                if let Some(w) = q.waiting.front() {
                    let finish = q.next_dispatch_r + w.seats as f64 * ESTIMATED_SERVICE_SECS;
                    if min.is_none_or(|(_, f)| finish < f) {
                        min = Some((self.robin, finish));
                    }
                }
            }
            let Some((qi, _)) = min else { return };
            let seats = self.queues[qi].waiting.front().map_or(1, |w| w.seats);
            if self.seats_in_use + seats > self.cfg.seats {
                // The head of the fairest queue waits for its seats.
                return;
            }
            self.robin = qi;
            let Some(w) = self.queues[qi].waiting.pop_front() else {
                return;
            };
            self.waiting -= 1;
            let q = &mut self.queues[qi];
            q.bound();
            if w.decision.send(Decision::Execute).is_err() {
                // Its caller is gone: the seats stay free.
                continue;
            }
            self.seats_in_use += seats;
            q.seats_in_use += seats;
            q.executing += 1;
            q.next_dispatch_r += seats as f64 * ESTIMATED_SERVICE_SECS;
        }
    }

    /// A dispatched request finished after `served`: its seats are free,
    /// its queue's virtual start corrected for the real service time.
    pub fn finish(&mut self, t: Ticket, served: Duration, now: Instant) {
        self.sync(now);
        self.seats_in_use = self.seats_in_use.saturating_sub(t.seats);
        let q = &mut self.queues[t.queue];
        q.seats_in_use = q.seats_in_use.saturating_sub(t.seats);
        q.executing = q.executing.saturating_sub(1);
        q.next_dispatch_r -= t.seats as f64 * (ESTIMATED_SERVICE_SECS - served.as_secs_f64());
        q.bound();
        self.dispatch();
    }

    /// A waiting request gave up (its context ended): out of its queue.
    /// Returns false if it was no longer waiting (dispatched meanwhile).
    pub fn withdraw(&mut self, t: Ticket, now: Instant) -> bool {
        self.sync(now);
        let q = &mut self.queues[t.queue];
        let Some(pos) = q.waiting.iter().position(|w| w.id == t.id) else {
            return false;
        };
        q.waiting.remove(pos);
        q.bound();
        self.waiting -= 1;
        self.dispatch();
        true
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> QueueSetConfig {
        QueueSetConfig {
            seats: 20,
            queues: 128,
            hand_size: 6,
            queue_length_limit: 2,
            request_wait_limit: Duration::from_secs(15),
        }
    }

    fn ticket(e: Enqueued) -> (Ticket, oneshot::Receiver<Decision>) {
        match e {
            Enqueued::Waiting(t, rx) => (t, rx),
            Enqueued::Rejected => panic!("rejected"),
        }
    }

    #[test]
    fn a_flow_gets_a_hand_of_distinct_queues() {
        let qs = QueueSet::new(cfg(), Instant::now());
        let hand = qs.hand("system:serviceaccount:kube-system:agent");
        assert_eq!(hand.len(), 6);
        let mut sorted = hand.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 6, "{hand:?}");
        assert!(hand.iter().all(|&q| q < 128));
        assert_eq!(hand, qs.hand("system:serviceaccount:kube-system:agent"));
    }

    #[test]
    fn queues_grow_past_their_limit_while_seats_are_free() {
        let now = Instant::now();
        let mut qs = QueueSet::new(cfg(), now);
        // Two 10-seat LISTs hold all 20 seats: the hand's 6 queues of 2 fill,
        // then a request is rejected.
        for _ in 0..2 {
            let (_, mut rx) = ticket(qs.enqueue("agents", 10, now));
            assert_eq!(rx.try_recv(), Ok(Decision::Execute));
        }
        let queued: Vec<_> = (0..12)
            .map(|_| ticket(qs.enqueue("agents", 10, now)))
            .collect();
        assert_eq!(queued.len(), 12);
        assert!(matches!(qs.enqueue("agents", 10, now), Enqueued::Rejected));
        // With 19 of 20 seats in use, full queues take more (APF rejects
        // only when every seat is in use).
        let mut qs = QueueSet::new(cfg(), now);
        let _busy = ticket(qs.enqueue("agents", 19, now));
        for _ in 0..30 {
            assert!(matches!(
                qs.enqueue("agents", 10, now),
                Enqueued::Waiting(..)
            ));
        }
        assert_eq!(qs.waiting(), 30);
    }

    #[test]
    fn a_timed_out_request_is_rejected_only_by_an_arrival_at_its_queue() {
        let t0 = Instant::now();
        let mut qs = QueueSet::new(
            QueueSetConfig {
                hand_size: 1,
                ..cfg()
            },
            t0,
        );
        let (busy, _) = ticket(qs.enqueue("agents", 20, t0));
        let (_, mut old) = ticket(qs.enqueue("agents", 1, t0));
        // Long past the wait limit it still waits: nothing arrived.
        let late = t0 + Duration::from_secs(40);
        qs.sync(late);
        assert!(old.try_recv().is_err());
        assert_eq!(qs.waiting(), 1);
        // An arrival at the same queue rejects it.
        let (_, mut new) = ticket(qs.enqueue("agents", 1, late));
        assert_eq!(old.try_recv(), Ok(Decision::TimedOut));
        assert_eq!(qs.timed_out, 1);
        qs.finish(busy, Duration::from_secs(40), late);
        assert_eq!(new.try_recv(), Ok(Decision::Execute));
    }

    #[test]
    fn a_wide_request_at_the_head_waits_for_its_seats() {
        let now = Instant::now();
        let mut qs = QueueSet::new(
            QueueSetConfig {
                hand_size: 1,
                ..cfg()
            },
            now,
        );
        let (a, _) = ticket(qs.enqueue("agents", 15, now));
        let (_, mut wide) = ticket(qs.enqueue("agents", 10, now));
        let (_, mut narrow) = ticket(qs.enqueue("agents", 1, now));
        // 5 seats are free, but the 10-seat request is first: both wait.
        assert!(wide.try_recv().is_err() && narrow.try_recv().is_err());
        qs.finish(a, Duration::from_millis(100), now);
        assert_eq!(wide.try_recv(), Ok(Decision::Execute));
        assert_eq!(narrow.try_recv(), Ok(Decision::Execute));
        assert_eq!(qs.seats_in_use(), 11);
    }
}
