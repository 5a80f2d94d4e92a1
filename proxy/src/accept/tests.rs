//! The connection caps and the handshake slots, on real loopback sockets
//! where a socket matters.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

fn limits(max: usize, per_source: usize, rate: Option<(u32, u32)>) -> ConnectionLimits {
    ConnectionLimits {
        max_connections: NonZeroUsize::new(max).expect("non-zero"),
        max_connections_per_source: per_source,
        max_handshakes: NonZeroUsize::MIN,
        serving_threads: 0,
        accept_rate_per_source: rate.map(|(per_second, burst)| AcceptRate {
            per_second: NonZeroU32::new(per_second).expect("non-zero"),
            burst: NonZeroU32::new(burst).expect("non-zero"),
        }),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn the_global_cap_refuses_until_a_connection_closes() {
    let gate = Gate::new(limits(2, 0, None));
    let a = gate.admit(ip("10.0.0.1")).expect("first");
    let _b = gate.admit(ip("10.0.0.2")).expect("second");
    assert_eq!(
        gate.admit(ip("10.0.0.3")).err(),
        Some(Refused::MaxConnections)
    );
    drop(a);
    assert_eq!(gate.open(), 1);
    gate.admit(ip("10.0.0.3")).expect("room again");
}

#[test]
fn one_source_is_capped_and_others_are_not() {
    let gate = Gate::new(limits(100, 2, None));
    let held: Vec<_> = (0..2)
        .map(|_| gate.admit(ip("10.0.0.1")).expect("under the cap"))
        .collect();
    assert_eq!(gate.admit(ip("10.0.0.1")).err(), Some(Refused::PerSource));
    // IPv4-mapped IPv6 is the same host.
    assert_eq!(
        gate.admit(ip("::ffff:10.0.0.1")).err(),
        Some(Refused::PerSource)
    );
    gate.admit(ip("10.0.0.2")).expect("another source");
    drop(held);
    gate.admit(ip("10.0.0.1")).expect("room again");
    // Sources leave the map with their last connection.
    assert!(gate.open.lock().expect("lock").by_source.is_empty());
}

#[test]
fn per_source_zero_is_no_cap() {
    let gate = Gate::new(limits(100, 0, None));
    let held: Vec<_> = (0..50)
        .map(|_| gate.admit(ip("10.0.0.1")).expect("no per-source cap"))
        .collect();
    assert_eq!(gate.open(), 50);
    drop(held);
    assert_eq!(gate.open(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_source_over_its_accept_rate_is_refused_until_its_bucket_refills() {
    let gate = Gate::new(limits(100, 0, Some((2, 2))));
    let _a = gate.admit(ip("10.0.0.1")).expect("burst 1");
    let _b = gate.admit(ip("10.0.0.1")).expect("burst 2");
    assert_eq!(gate.admit(ip("10.0.0.1")).err(), Some(Refused::AcceptRate));
    // Others have their own bucket; refusals are not open connections.
    let _c = gate.admit(ip("10.0.0.2")).expect("another source");
    assert_eq!(gate.open(), 3);
    tokio::time::advance(Duration::from_millis(500)).await;
    let _d = gate.admit(ip("10.0.0.1")).expect("refilled");
    // Upkeep forgets the sources whose bucket is full again.
    tokio::time::advance(Duration::from_secs(5)).await;
    gate.upkeep();
    assert_eq!(gate.rate.as_ref().map(|r| r.len()), Some(0));
}

/// A connected pair on loopback: (our side, gated; the client's side).
async fn pair(slots: &Arc<Semaphore>) -> (SlotIo, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (server, _) = listener.accept().await.expect("accept");
    (SlotIo::new(server, slots.clone()), client)
}

#[tokio::test]
async fn a_silent_client_holds_no_handshake_slot() {
    let slots = Arc::new(Semaphore::new(1));
    let (mut silent, _silent_client) = pair(&slots).await;
    let (mut talking, mut client) = pair(&slots).await;
    let mut buf = [0u8; 16];
    // Waiting for bytes that never come takes no slot.
    let waited = tokio::time::timeout(Duration::from_millis(50), silent.read(&mut buf)).await;
    assert!(waited.is_err());
    assert_eq!(slots.available_permits(), 1);
    // Bytes in: the read takes the slot and keeps it while they are worked on.
    client.write_all(b"hello").await.expect("write");
    let n = talking.read(&mut buf).await.expect("read");
    assert_eq!(&buf[..n], b"hello");
    assert!(talking.holds_slot());
    assert_eq!(slots.available_permits(), 0);
    // The next read would wait for the network: the slot goes back.
    let waited = tokio::time::timeout(Duration::from_millis(50), talking.read(&mut buf)).await;
    assert!(waited.is_err());
    assert!(!talking.holds_slot());
    assert_eq!(slots.available_permits(), 1);
}

#[tokio::test]
async fn bytes_wait_for_a_slot_and_reads_skip_slots_after_the_handshake() {
    let slots = Arc::new(Semaphore::new(1));
    let (mut first, mut first_client) = pair(&slots).await;
    let (mut second, mut second_client) = pair(&slots).await;
    let mut buf = [0u8; 16];
    first_client.write_all(b"a").await.expect("write");
    assert_eq!(first.read(&mut buf).await.expect("read"), 1);
    assert!(first.holds_slot());
    // The other connection's bytes are there, but no slot is free.
    second_client.write_all(b"b").await.expect("write");
    let waited = tokio::time::timeout(Duration::from_millis(50), second.read(&mut buf)).await;
    assert!(waited.is_err(), "read without a slot");
    // The first handshake ends: its slot goes to the second.
    first.handshake_done();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .expect("a slot came free")
            .expect("read"),
        1
    );
    // After the handshake, reads take no slot even when none is free.
    first_client.write_all(b"c").await.expect("write");
    assert_eq!(first.read(&mut buf).await.expect("read"), 1);
    assert!(second.holds_slot());
}
