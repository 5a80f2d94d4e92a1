//! The subscriber queue and body, with tokio's paused clock.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;

use super::*;

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

#[test]
fn a_full_queue_refuses_and_a_closed_one_says_so() {
    let (tx, rx) = queue(2);
    assert_eq!(tx.try_send(b("1")), Ok(()));
    assert_eq!(tx.try_send(b("2")), Ok(()));
    assert_eq!(tx.try_send(b("3")), Err(SendError::Full), "not reading");
    drop(rx);
    assert_eq!(tx.try_send(b("4")), Err(SendError::Closed), "gone");
}

#[test]
fn draining_takes_a_batch_and_gives_memory_back_after_a_burst() {
    let (tx, rx) = queue(1000);
    for _ in 0..100 {
        tx.try_send(b("0123456789")).expect("room");
    }
    let cx = Context::from_waker(std::task::Waker::noop());
    let mut got = Vec::new();
    let ended = rx.0.drain(&cx, 55, |x| {
        got.push(x.clone());
        x.len()
    });
    assert!(!ended);
    assert_eq!(got.len(), 6, "about `max` bytes per drain: 6 × 10 ≥ 55");
    let ended = rx.0.drain(&cx, usize::MAX, |x| x.len());
    assert!(!ended, "open and empty: not the end");
    assert_eq!(
        rx.0.0.lock().items.capacity(),
        0,
        "an idle watcher holds no queue"
    );
    drop(tx);
    assert!(
        rx.0.drain(&cx, usize::MAX, |x| x.len()),
        "closed and empty: the end"
    );
}

/// A stream stand-in that records what bodies ask of it.
#[derive(Default)]
struct Recorder {
    asked: Mutex<Vec<&'static str>>,
}

impl Subscription for Recorder {
    fn request_bookmark(&self, _id: u64, _sel: &Selector) {
        self.asked.lock().expect("lock").push("bookmark");
    }
    fn remove(&self, _id: u64, _sel: &Selector) {
        self.asked.lock().expect("lock").push("remove");
    }
}

fn body(
    initial: Vec<Bytes>,
    bound: usize,
    timeout: Duration,
    stream: &Arc<Recorder>,
    stats: &Arc<Stats>,
) -> (QueueTx, SubBody) {
    let (tx, rx) = queue(bound);
    let weak: Weak<dyn Subscription> = Arc::downgrade(&(stream.clone() as Arc<dyn Subscription>));
    let handle = SubHandle {
        stream: weak,
        id: 1,
        sel: Arc::new(Selector::parse(None, None, &[]).expect("everything")),
    };
    (
        tx,
        SubBody::new(initial, rx, timeout, true, handle, stats.clone()),
    )
}

#[tokio::test(start_paused = true)]
async fn a_body_sends_the_snapshot_then_live_events_in_one_frame_per_wake() {
    let (rec, stats) = (Arc::new(Recorder::default()), Arc::new(Stats::default()));
    let (tx, mut body) = body(
        vec![b("a"), b("b")],
        8,
        Duration::from_secs(60),
        &rec,
        &stats,
    );
    assert_eq!(stats.subscribers.load(Ordering::Relaxed), 1);
    let first = body.frame().await.expect("a frame").expect("ok");
    assert_eq!(first.into_data().expect("data"), b("ab"));
    tx.try_send(b("c")).expect("room");
    tx.try_send(b("d")).expect("room");
    let next = body.frame().await.expect("a frame").expect("ok");
    assert_eq!(
        next.into_data().expect("data"),
        b("cd"),
        "a burst is one write"
    );
    drop(tx);
    assert!(
        body.frame().await.is_none(),
        "evicted or ended: a clean end"
    );
    drop(body);
    assert_eq!(*rec.asked.lock().expect("lock"), vec!["remove"]);
    assert_eq!(stats.subscribers.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn the_clients_timeout_ends_cleanly_after_a_bookmark_request() {
    let (rec, stats) = (Arc::new(Recorder::default()), Arc::new(Stats::default()));
    let (tx, mut body) = body(vec![], 8, Duration::from_secs(30), &rec, &stats);
    let started = tokio::time::Instant::now();
    // Nothing comes: the paused clock jumps to the pre-timeout bookmark,
    // then to the timeout.
    assert!(body.frame().await.is_none(), "timeoutSeconds: a clean end");
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    assert_eq!(*rec.asked.lock().expect("lock"), vec!["bookmark"]);
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_outlives_its_stream_ends_without_it() {
    let (rec, stats) = (Arc::new(Recorder::default()), Arc::new(Stats::default()));
    let (tx, mut body) = body(vec![b("a")], 8, Duration::from_secs(30), &rec, &stats);
    drop(rec);
    drop(tx);
    let first = body.frame().await.expect("a frame").expect("ok");
    assert_eq!(first.into_data().expect("data"), b("a"));
    assert!(body.frame().await.is_none());
    drop(body);
    assert_eq!(stats.subscribers.load(Ordering::Relaxed), 0);
}
