//! The brake's second half: the register of open long-running requests
//! (watches, `logs -f`, exec/attach/port-forward), so that a block with
//! `terminate: true` ends the ones it matches, not only the ones to come.
//!
//! In a storm the watches already open are the load, and a rollback has to
//! get through them. Every long-running request the proxy answers, forwarded
//! or served by the hub, is registered here from admission until its
//! response ends, with its own [`CancellationToken`]: a child of the
//! proxy's shutdown token, so one token ends the stream for either reason.
//! The response body ends at the next event boundary when it fires
//! ([`Ending`]); an upgraded stream closes. Unary requests are never
//! registered: cutting a request half done helps no one.
//!
//! A block added while a matching request is between admission and its
//! registration would miss it; [`OpenStreams::register`] therefore checks
//! the terminating blocks in force after registering (the sweep runs after
//! the block is in force, so one of the two sees the other).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use breakwater_limits::{ActiveBlock, Blocks};
use bytes::Bytes;
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::classify::RequestInfo;
use crate::identity::Identity;

/// How long a stream told to end mid-event may take to finish that event
/// before it is cut (then as an error, so the client sees a break rather
/// than a clean end after half an event).
pub const FINISH_EVENT_WITHIN: Duration = Duration::from_millis(500);

/// One registered request.
struct Open {
    identity: Arc<Identity>,
    info: Arc<RequestInfo>,
    rule: Option<Arc<str>>,
    exempt: bool,
    end: CancellationToken,
}

/// The open long-running requests.
#[derive(Default)]
pub struct OpenStreams {
    next: AtomicU64,
    open: DashMap<u64, Open>,
}

/// A registration; dropping it (when the response ends) unregisters.
pub struct Registration {
    streams: Arc<OpenStreams>,
    id: u64,
    end: CancellationToken,
    shutdown: CancellationToken,
}

impl Registration {
    /// Fires when the stream must end: shutdown, or a terminating block.
    pub fn token(&self) -> &CancellationToken {
        &self.end
    }

    /// Is the proxy shutting down (rather than a block ending this one)?
    pub fn is_shutdown(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.streams.open.remove(&self.id);
    }
}

impl OpenStreams {
    /// Registers a long-running request. `shutdown` is the proxy's
    /// stream-ending token. `with_blocks` reads the blocks in force; they
    /// are checked once after registering (see the module docs).
    pub fn register(
        self: &Arc<Self>,
        identity: Arc<Identity>,
        info: Arc<RequestInfo>,
        permit: &breakwater_limits::Permit,
        shutdown: &CancellationToken,
        with_blocks: impl FnOnce(&mut dyn FnMut(&Blocks)),
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let end = shutdown.child_token();
        self.open.insert(
            id,
            Open {
                identity,
                info,
                rule: permit.rule_arc(),
                exempt: permit.is_exempt(),
                end: end.clone(),
            },
        );
        if let Some(open) = self.open.get(&id) {
            with_blocks(&mut |blocks| {
                let now = std::time::SystemTime::now();
                if blocks
                    .active()
                    .any(|b| b.block().terminate && !b.block().is_expired(now) && open.matches(b))
                {
                    terminated(open.rule.as_deref());
                    open.end.cancel();
                }
            });
        }
        Registration {
            streams: self.clone(),
            id,
            end,
            shutdown: shutdown.clone(),
        }
    }

    /// Ends every open request `block` applies to; returns how many.
    pub fn terminate(&self, block: &ActiveBlock) -> u64 {
        let mut n = 0;
        for entry in self.open.iter() {
            let open = entry.value();
            if !open.end.is_cancelled() && open.matches(block) {
                open.end.cancel();
                terminated(open.rule.as_deref());
                n += 1;
            }
        }
        block.count_terminated(n);
        if n > 0 {
            tracing::warn!(id = %block.block().id, streams = n, "emergency block ended open streams");
        }
        n
    }

    /// How many are open.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// None open?
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

impl Open {
    fn matches(&self, block: &ActiveBlock) -> bool {
        let subject = crate::admit::subject(&self.identity);
        let attrs = crate::admit::attrs(&self.info);
        block.applies(&subject, &attrs, self.rule.as_deref(), self.exempt)
    }
}

/// Terminations are counted by rule, never by identity (a storm has
/// thousands).
fn terminated(rule: Option<&str>) {
    let rule = rule.unwrap_or("-").to_string();
    metrics::counter!("breakwater_block_terminations_total", "rule" => rule).increment(1);
}

/// How a response stream is cut into events, so that it ends between two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Newline-delimited JSON (watch events, Tables included).
    Lines,
    /// Protobuf watch frames: a 4-byte big-endian length, then the message.
    LengthPrefixed,
    /// Anything else (`logs -f`, the proxy verb): any byte is a boundary.
    Bytes,
}

impl Framing {
    /// The framing of a response: watch events by their content type
    /// (`application/vnd.kubernetes.protobuf;stream=watch` or JSON),
    /// everything else as bytes.
    pub fn of(is_watch: bool, content_type: Option<&http::HeaderValue>) -> Framing {
        if !is_watch {
            return Framing::Bytes;
        }
        let ct = content_type.and_then(|v| v.to_str().ok()).unwrap_or("");
        // JSON (Tables included) is newline-delimited; the apiserver streams
        // watches in no other text encoding, and whatever else comes is
        // not cut mid-line either.
        if ct.starts_with("application/vnd.kubernetes.protobuf") {
            Framing::LengthPrefixed
        } else {
            Framing::Lines
        }
    }
}

/// Tracks where the events of a stream begin and end, and cuts a chunk at
/// the end of the event in progress.
#[derive(Debug, Clone)]
pub struct Boundary {
    framing: Framing,
    /// Lines: inside a line. LengthPrefixed: bytes of the 4-byte header
    /// seen (0..4) while `left` is 0, else bytes of the message left.
    mid: bool,
    header: [u8; 4],
    header_seen: usize,
    left: u64,
}

impl Boundary {
    /// At the start of a stream.
    pub fn new(framing: Framing) -> Boundary {
        Boundary {
            framing,
            mid: false,
            header: [0; 4],
            header_seen: 0,
            left: 0,
        }
    }

    /// Between two events?
    pub fn at_boundary(&self) -> bool {
        match self.framing {
            Framing::Bytes => true,
            Framing::Lines => !self.mid,
            Framing::LengthPrefixed => self.header_seen == 0 && self.left == 0,
        }
    }

    /// Takes in a chunk sent to the client.
    pub fn advance(&mut self, chunk: &[u8]) {
        self.split(chunk, false);
    }

    /// How much of `chunk` completes the event in progress (all of it if
    /// it does not). The state moves past that prefix.
    pub fn finish(&mut self, chunk: &[u8]) -> usize {
        self.split(chunk, true)
    }

    /// Walks `chunk`; with `stop_at_end`, stops at the first boundary
    /// reached after its start and returns the bytes walked.
    fn split(&mut self, chunk: &[u8], stop_at_end: bool) -> usize {
        match self.framing {
            Framing::Bytes => {
                if stop_at_end {
                    0
                } else {
                    chunk.len()
                }
            }
            Framing::Lines => {
                if stop_at_end {
                    if !self.mid {
                        return 0;
                    }
                    match chunk.iter().position(|&b| b == b'\n') {
                        Some(i) => {
                            self.mid = false;
                            i + 1
                        }
                        None => chunk.len(),
                    }
                } else {
                    if let Some(&last) = chunk.last() {
                        self.mid = last != b'\n';
                    }
                    chunk.len()
                }
            }
            Framing::LengthPrefixed => {
                let mut i = 0;
                while i < chunk.len() {
                    if stop_at_end && self.at_boundary() {
                        return i;
                    }
                    if self.left > 0 {
                        let take = (self.left).min((chunk.len() - i) as u64) as usize;
                        self.left -= take as u64;
                        i += take;
                    } else {
                        self.header[self.header_seen] = chunk[i];
                        self.header_seen += 1;
                        i += 1;
                        if self.header_seen == 4 {
                            self.header_seen = 0;
                            self.left = u64::from(u32::from_be_bytes(self.header));
                        }
                    }
                }
                i
            }
        }
    }
}

/// Ends a response stream cleanly once its token fires: at once if the
/// stream is between events, else after the event in progress (within
/// [`FINISH_EVENT_WITHIN`]; past that the stream breaks with an error).
pub struct Ending {
    boundary: Boundary,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Ending {
    /// For a stream of this framing.
    pub fn new(framing: Framing) -> Ending {
        Ending {
            boundary: Boundary::new(framing),
            deadline: None,
        }
    }

    /// Takes in a chunk sent normally.
    pub fn sent(&mut self, chunk: &[u8]) {
        self.boundary.advance(chunk);
    }

    /// The end was asked: may the stream end now?
    pub fn can_end_now(&self) -> bool {
        self.boundary.at_boundary()
    }

    /// The end was asked and a chunk came: the part of it that finishes
    /// the event in progress (all of it if the event goes on). Once the
    /// event is whole, [`Ending::can_end_now`] says so.
    pub fn cut(&mut self, mut chunk: Bytes) -> Bytes {
        let n = self.boundary.finish(&chunk);
        chunk.truncate(n);
        chunk
    }

    /// The end was asked mid-event: has the event had its time?
    pub fn poll_overdue(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(FINISH_EVENT_WITHIN)))
            .as_mut()
            .poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_end_after_the_line_in_progress() {
        let mut b = Boundary::new(Framing::Lines);
        assert!(b.at_boundary());
        b.advance(b"{\"type\":\"ADDED\"}\n{\"type\":");
        assert!(!b.at_boundary());
        assert_eq!(b.finish(b"\"MODIFIED\"}\n{\"next\""), 12);
        assert!(b.at_boundary());
        b.advance(b"{}\n");
        assert!(b.at_boundary());
        assert_eq!(b.finish(b"{}\n"), 0);
    }

    #[test]
    fn protobuf_frames_end_after_the_frame_in_progress() {
        let mut b = Boundary::new(Framing::LengthPrefixed);
        // A 3-byte frame, then a 5-byte frame split across chunks, with its
        // header split too.
        b.advance(&[0, 0, 0, 3, 1, 2, 3, 0, 0]);
        assert!(!b.at_boundary());
        b.advance(&[0, 5, 9, 9]);
        assert!(!b.at_boundary());
        assert_eq!(b.finish(&[9, 9, 9, 0, 0, 0, 1, 7]), 3);
        assert!(b.at_boundary());
        b.advance(&[0, 0, 0, 0]);
        assert!(b.at_boundary(), "an empty frame is a whole frame");
    }

    #[test]
    fn other_streams_end_anywhere() {
        let mut b = Boundary::new(Framing::Bytes);
        b.advance(b"half a log li");
        assert!(b.at_boundary());
        assert_eq!(b.finish(b"ne\n"), 0);
    }

    #[test]
    fn framing_follows_the_watch_content_type() {
        let pb = http::HeaderValue::from_static("application/vnd.kubernetes.protobuf;stream=watch");
        let json = http::HeaderValue::from_static("application/json");
        assert_eq!(Framing::of(true, Some(&pb)), Framing::LengthPrefixed);
        assert_eq!(Framing::of(true, Some(&json)), Framing::Lines);
        assert_eq!(Framing::of(false, Some(&json)), Framing::Bytes);
    }
}
