//! The last bearer token of one client connection, and whom it named.
//!
//! A client sends the same token on every request of a connection. Hashing
//! it (SHA-256 of ~1 KiB) and looking the hash up in the shared cache cost
//! more than the rest of the proxy's own work on a cached GET; the memo
//! compares the header's bytes instead. It answers for [`MEMO_TTL`] after
//! the full path did, so it can lag the caches (a key reload, an expiry,
//! a TokenReview's TTL) by at most that: a key reload also makes every memo
//! stale at once (the authenticator's generation).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderValue;

use super::Identity;

/// How long a memo answers without the caches.
pub const MEMO_TTL: Duration = Duration::from_secs(1);

/// One connection's memo (shared by its HTTP/2 streams).
#[derive(Default)]
pub struct TokenMemo(Mutex<Option<Memo>>);

struct Memo {
    /// A copy: the request's own header value shares the connection's read
    /// buffer, which it would keep alive.
    header: Box<[u8]>,
    identity: Arc<Identity>,
    until: Instant,
    generation: u64,
}

impl TokenMemo {
    /// The identity `header` named when it was last verified, if that was
    /// under [`MEMO_TTL`] ago and in `generation`.
    pub(super) fn get(
        &self,
        header: &HeaderValue,
        generation: u64,
        now: Instant,
    ) -> Option<Arc<Identity>> {
        let memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let m = memo.as_ref()?;
        (now < m.until && m.generation == generation && *m.header == *header.as_bytes())
            .then(|| m.identity.clone())
    }

    /// Remembers that `header` names `identity` (just verified).
    pub(super) fn set(
        &self,
        header: &HeaderValue,
        identity: &Arc<Identity>,
        generation: u64,
        now: Instant,
    ) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Memo {
            header: header.as_bytes().into(),
            identity: identity.clone(),
            until: now + MEMO_TTL,
            generation,
        });
    }
}
