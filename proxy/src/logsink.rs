//! Where the proxy's log goes: stderr, through one buffer, and the access
//! log's lines formatted here rather than by `tracing`'s formatter.
//!
//! The access log writes a line per request. Through `tracing`'s `fmt`
//! layer that line cost 18,700 instructions (field visitors, `Debug`
//! quoting, ANSI styling objects even with colours off, the timestamp) and
//! one `write(2)` to stderr: 18% more instructions per proxied GET than
//! with the log filtered out (docs/benchmarks.md, §1f). Here it costs a
//! small fraction of that, and lines are written in batches.
//!
//! **Order and delay.** Every line of the process goes through one
//! [`Sink`] under one lock, so lines appear in the order they were made.
//! Access lines wait in the buffer until it holds [`BATCH`] bytes, another
//! log line comes (warnings and errors are written at once, after the
//! access lines before them), or [`MAX_DELAY`] has passed (a flusher thread
//! sees to that). The process flushes at exit; a crash or SIGKILL loses at
//! most that last fraction of a second of access lines, as nginx's
//! `access_log … buffer=` does.
//!
//! **The same line.** The format is `tracing`'s default (`Full`, colours
//! off): `2026-12-06T20:12:44.908537Z  INFO breakwater::access: method=GET
//! path="/api/v1/…" …`, so nothing that reads the log changes. The filter
//! still decides: `BREAKWATER_LOG=breakwater::access=off` turns it off. On
//! a terminal (colours on) the line goes through `tracing` as before.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Buffered access lines are written once they reach this many bytes.
pub const BATCH: usize = 16 * 1024;
/// ... or once the oldest of them is this old.
pub const MAX_DELAY: Duration = Duration::from_millis(100);

/// The process's log sink (stderr), once installed by [`install`].
static SINK: OnceLock<Sink> = OnceLock::new();

/// Buffered, ordered writes to an output (stderr in the binary).
pub struct Sink {
    state: Mutex<State>,
    /// Wakes the flusher when the buffer stops being empty.
    pending: Condvar,
    out: Out,
}

/// Where a batch goes.
type Out = Box<dyn Fn(&[u8]) + Send + Sync>;

struct State {
    buf: Vec<u8>,
    /// When the oldest buffered line was added.
    since: Option<Instant>,
}

impl Sink {
    /// A sink that hands its batches to `out`.
    pub fn new(out: impl Fn(&[u8]) + Send + Sync + 'static) -> Sink {
        Sink {
            state: Mutex::new(State {
                buf: Vec::with_capacity(BATCH + 1024),
                since: None,
            }),
            pending: Condvar::new(),
            out: Box::new(out),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while writing a log line leaves a buffer worth writing.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a line (or several) to the buffer; written at once if
    /// `urgent`, or when the buffer is full (the flusher writes it once old).
    pub fn append(&self, line: &[u8], urgent: bool) {
        let mut st = self.lock();
        if st.buf.is_empty() && !urgent {
            st.since = Some(Instant::now());
            self.pending.notify_one();
        }
        st.buf.extend_from_slice(line);
        // The delay is the flusher's to keep: no clock read per line.
        if urgent || st.buf.len() >= BATCH {
            self.write_out(&mut st);
        }
    }

    /// Writes out what the buffer holds.
    pub fn flush(&self) {
        let mut st = self.lock();
        self.write_out(&mut st);
    }

    fn write_out(&self, st: &mut State) {
        if !st.buf.is_empty() {
            (self.out)(&st.buf);
            st.buf.clear();
        }
        st.since = None;
    }

    /// The flusher's loop: writes a buffer out once its oldest line is
    /// [`MAX_DELAY`] old, and sleeps while the buffer is empty.
    fn flush_when_due(&self) {
        let mut st = self.lock();
        loop {
            match st.since {
                None => {
                    st = self.pending.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                Some(since) => {
                    let left = MAX_DELAY.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        self.write_out(&mut st);
                    } else {
                        st = self
                            .pending
                            .wait_timeout(st, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
            }
        }
    }
}

/// Installs the process's sink on stderr and starts its flusher thread;
/// `plain` (no colours) lets the access log use the fast line. Returns the
/// writer for `tracing_subscriber::fmt().with_writer(..)`.
pub fn install(plain: bool) -> &'static Sink {
    if plain {
        FAST.store(true, Ordering::Relaxed);
    }
    let mut first = false;
    let sink = SINK.get_or_init(|| {
        first = true;
        Sink::new(|bytes| {
            let _ = std::io::stderr().lock().write_all(bytes);
        })
    });
    if first {
        let started = std::thread::Builder::new()
            .name("bw-log".into())
            .spawn(move || sink.flush_when_due());
        if let Err(err) = started {
            // No flusher: access lines wait for a fuller buffer or the
            // next warning; say so rather than fail to start.
            eprintln!("breakwater: log flusher thread not started: {err}");
        }
        // Buffered lines before a panic's message (and its abort).
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Not if the panic is the sink's own, under its lock.
            if let Ok(mut st) = sink.state.try_lock() {
                sink.write_out(&mut st);
            }
            previous(info);
        }));
    }
    sink
}

/// Set when the installed sink takes fast access lines (colours off).
static FAST: AtomicBool = AtomicBool::new(false);

/// Writes out the buffered lines (at exit, before a panic's message).
pub fn flush() {
    if let Some(sink) = SINK.get() {
        sink.flush();
    }
}

/// One access-log line's fields.
pub struct AccessLine<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub verb: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    pub namespace: &'a str,
    pub user: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    pub bytes: u64,
    pub duration: Duration,
    pub peer: SocketAddr,
}

/// Writes the line through the installed sink; `false` when there is none
/// that takes fast lines (tests, a terminal): the caller logs through
/// `tracing` instead.
pub fn access(line: &AccessLine<'_>) -> bool {
    let Some(sink) = SINK.get().filter(|_| FAST.load(Ordering::Relaxed)) else {
        return false;
    };
    LINE.with_borrow_mut(|buf| {
        buf.clear();
        format_access(buf, SystemTime::now(), line);
        sink.append(buf, false);
    });
    true
}

thread_local! {
    /// A line's bytes, reused.
    static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The last second's `YYYY-MM-DDTHH:MM:SS`, and that second.
    static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
}

/// Formats `line` as `tracing`'s default formatter would (colours off).
pub fn format_access(buf: &mut Vec<u8>, now: SystemTime, line: &AccessLine<'_>) {
    fn text(buf: &mut Vec<u8>, name: &[u8], value: &str) {
        buf.extend_from_slice(name);
        quoted(buf, value);
    }
    fn number(buf: &mut Vec<u8>, name: &[u8], value: u64) {
        buf.extend_from_slice(name);
        decimal(buf, value);
    }
    timestamp(buf, now);
    buf.extend_from_slice(b"  INFO breakwater::access: method=");
    buf.extend_from_slice(line.method.as_bytes());
    text(buf, b" path=", line.path);
    text(buf, b" verb=", line.verb);
    buf.extend_from_slice(b" resource=");
    buf.extend_from_slice(line.resource.as_bytes());
    if !line.subresource.is_empty() {
        buf.push(b'/');
        buf.extend_from_slice(line.subresource.as_bytes());
    }
    text(buf, b" namespace=", line.namespace);
    text(buf, b" user=", line.user);
    number(buf, b" status=", u64::from(line.status));
    text(buf, b" outcome=", line.outcome);
    number(buf, b" bytes=", line.bytes);
    // Milliseconds with microseconds: `duration_ms=0.153`.
    let micros = line.duration.as_micros();
    number(buf, b" duration_ms=", (micros / 1000) as u64);
    buf.push(b'.');
    pad3(buf, (micros % 1000) as u32);
    buf.extend_from_slice(b" peer=");
    match line.peer {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                decimal(buf, u64::from(octet));
            }
            buf.push(b':');
            decimal(buf, u64::from(v4.port()));
        }
        SocketAddr::V6(v6) => {
            let _ = write!(buf, "{v6}");
        }
    }
    buf.push(b'\n');
}

/// `"value"`, escaped as `Debug` escapes a `str` (the fast path when
/// nothing needs it, which is every Kubernetes path and name).
fn quoted(buf: &mut Vec<u8>, value: &str) {
    if value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        buf.push(b'"');
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'"');
    } else {
        let _ = write!(buf, "{value:?}");
    }
}

/// `n` in decimal (core's formatter costs a few hundred instructions a
/// number through `fmt::write`).
fn decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
}

fn pad3(buf: &mut Vec<u8>, n: u32) {
    buf.extend_from_slice(&[
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]);
}

/// RFC 3339 UTC with microseconds, as `tracing_subscriber`'s `SystemTime`:
/// `2026-12-06T20:12:44.908537Z`.
fn timestamp(buf: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        text = civil(secs);
        SECOND.set((secs, text));
    }
    buf.extend_from_slice(&text);
    let micros = since.subsec_micros();
    buf.push(b'.');
    pad3(buf, micros / 1000);
    pad3(buf, micros % 1000);
    buf.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time.
fn civil(secs: u64) -> [u8; 19] {
    // Once a second: `2026-12-06T20:12:44Z` without its `Z`.
    let text =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string();
    let mut out = [0u8; 19];
    if let Some(head) = text.as_bytes().get(..19) {
        out.copy_from_slice(head);
    }
    out
}

/// `tracing`'s writer: every other line is written at once (after the
/// access lines before it).
#[derive(Clone, Copy)]
pub struct Writer(&'static Sink);

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf, true);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for &'static Sink {
    type Writer = Writer;

    fn make_writer(&'a self) -> Writer {
        Writer(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn line() -> AccessLine<'static> {
        AccessLine {
            method: "GET",
            path: "/api/v1/namespaces/demo/pods/agent-node-1",
            verb: "get",
            resource: "pods",
            subresource: "",
            namespace: "demo",
            user: "system:serviceaccount:demo:viewer",
            status: 200,
            outcome: "complete",
            bytes: 659,
            duration: Duration::from_micros(152_923),
            peer: "127.0.0.1:36950".parse().expect("an address"),
        }
    }

    #[test]
    fn the_line_is_tracings_default_format() {
        let mut buf = Vec::new();
        let at = UNIX_EPOCH + Duration::from_micros(1_796_588_964_908_537);
        format_access(&mut buf, at, &line());
        assert_eq!(
            String::from_utf8(buf).expect("UTF-8"),
            "2026-12-06T20:29:24.908537Z  INFO breakwater::access: method=GET \
             path=\"/api/v1/namespaces/demo/pods/agent-node-1\" verb=\"get\" resource=pods \
             namespace=\"demo\" user=\"system:serviceaccount:demo:viewer\" status=200 \
             outcome=\"complete\" bytes=659 duration_ms=152.923 peer=127.0.0.1:36950\n"
        );
    }

    #[test]
    fn dates_match_a_calendar() {
        // Leap days, the turn of a century, the epoch.
        for (secs, text) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (4_107_542_399, "2100-02-28T23:59:59"),
            (4_107_542_400, "2100-03-01T00:00:00"),
            (1_709_164_800, "2024-02-29T00:00:00"),
            (1_798_761_599, "2026-12-31T23:59:59"),
        ] {
            assert_eq!(
                std::str::from_utf8(&civil(secs)).expect("ASCII"),
                text,
                "{secs}"
            );
        }
    }

    #[test]
    fn odd_values_are_escaped_as_debug_does() {
        let mut l = line();
        l.user = "CN=\"ops\" \\ team\u{7}é";
        l.subresource = "status";
        let mut buf = Vec::new();
        format_access(&mut buf, UNIX_EPOCH, &l);
        let text = String::from_utf8(buf).expect("UTF-8");
        assert!(text.contains(&format!(" user={:?} ", l.user)), "{text}");
        assert!(text.contains(" resource=pods/status "), "{text}");
        l.peer = "[::1]:6443".parse().expect("an address");
        l.bytes = u64::MAX;
        l.status = 0;
        l.duration = Duration::from_micros(7);
        let mut buf = Vec::new();
        format_access(&mut buf, UNIX_EPOCH, &l);
        let text = String::from_utf8(buf).expect("UTF-8");
        assert!(
            text.ends_with(&format!(
                " status=0 outcome=\"complete\" bytes={} duration_ms=0.007 peer=[::1]:6443\n",
                u64::MAX
            )),
            "{text}"
        );
    }

    #[test]
    fn access_lines_wait_for_a_batch_and_other_lines_flush_them_in_order() {
        let written = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let out = written.clone();
        let sink = Sink::new(move |b| out.lock().expect("lock").push(b.to_vec()));
        sink.append(b"a1\n", false);
        sink.append(b"a2\n", false);
        assert!(
            written.lock().expect("lock").is_empty(),
            "access lines are buffered"
        );
        sink.append(b"warn\n", true);
        assert_eq!(
            *written.lock().expect("lock"),
            vec![b"a1\na2\nwarn\n".to_vec()]
        );
        // A full batch goes at once.
        let big = vec![b'x'; BATCH];
        sink.append(&big, false);
        assert_eq!(written.lock().expect("lock").len(), 2);
        // And what is left goes at a flush.
        sink.append(b"a3\n", false);
        sink.flush();
        assert_eq!(
            written.lock().expect("lock").last().expect("a batch"),
            b"a3\n"
        );
    }

    #[test]
    fn the_flusher_writes_an_old_line_without_more_traffic() {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let tx = Mutex::new(tx);
        let sink: &'static Sink = Box::leak(Box::new(Sink::new(move |b| {
            let _ = tx.lock().expect("lock").send(b.to_vec());
        })));
        std::thread::spawn(move || sink.flush_when_due());
        let added = Instant::now();
        sink.append(b"lonely\n", false);
        let got = rx.recv_timeout(Duration::from_secs(10)).expect("flushed");
        assert_eq!(got, b"lonely\n");
        assert!(added.elapsed() >= MAX_DELAY, "not before its delay");
    }
}
