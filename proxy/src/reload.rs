//! Certificate and key rotation: when a watched file changes, the serving
//! certificate and client CA, the proxy's upstream client certificate and
//! token, and the ServiceAccount keys are re-read and swapped in.
//!
//! The parent directories are watched, not the files: Kubernetes updates a
//! mounted Secret by swapping a symlink in its directory, which a watch on the
//! old file would never see. Any change in a watched directory re-reads
//! everything (a handful of small files); a part that fails to load keeps its
//! current value and the error is logged, so a half-written file never takes
//! the proxy down. Open connections keep what they negotiated; new ones get
//! the new material.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::Chain;
use crate::proxy::Shared;
use crate::tasks::TaskTracker;
use crate::tls::ServerTls;

/// Re-reads every rotatable file once. Returns how many parts failed.
pub fn reload_all(tls: &ServerTls, shared: &Shared) -> usize {
    let mut failed = 0;
    let mut note = |what: &'static str, res: Result<(), String>| match res {
        Ok(()) => {
            metrics::counter!("breakwater_reloads_total", "what" => what, "result" => "ok")
                .increment(1);
        }
        Err(err) => {
            failed += 1;
            metrics::counter!("breakwater_reloads_total", "what" => what, "result" => "error")
                .increment(1);
            tracing::warn!(what, error = %err, "reload failed; keeping the current one");
        }
    };
    note(
        "serving-tls",
        tls.reload().map_err(|e| Chain(&e).to_string()),
    );
    note(
        "upstream-credentials",
        shared.upstream.reload().map_err(|e| Chain(&e).to_string()),
    );
    note(
        "service-account-keys",
        shared.auth.reload_keys().map_err(|e| Chain(&e).to_string()),
    );
    failed
}

/// Whether a file event can change what a reload reads. Not reads: the
/// reload itself opens and reads the watched files, and on Linux inotify
/// reports those as access events — reacting to them would reload forever.
fn is_change(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
    )
}

/// Watches the directories of `files` until `stop`, calling `reload` after
/// each burst of changes; the task runs on `tasks`.
pub fn spawn(
    tasks: &TaskTracker,
    files: Vec<PathBuf>,
    stop: CancellationToken,
    reload: impl Fn() + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    let dirs: BTreeSet<PathBuf> = files
        .iter()
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            }
        })
        .collect();
    if dirs.is_empty() {
        return None;
    }
    // Bounded at 1: a pending signal already means "reload"; more add nothing.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = match notify::recommended_watcher(
        move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|ev| is_change(&ev.kind)) {
                let _ = tx.try_send(());
            }
        },
    ) {
        Ok(w) => w,
        Err(err) => {
            tracing::warn!(error = %Chain(&err), "cannot watch certificate files; rotation needs a restart");
            return None;
        }
    };
    for dir in &dirs {
        if let Err(err) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %Chain(&err), "cannot watch directory");
        }
    }
    Some(tasks.spawn(async move {
        // The watcher lives as long as this task.
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                got = rx.recv() => {
                    if got.is_none() {
                        break;
                    }
                    // Let a burst of writes (cert, then key) settle.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while rx.try_recv().is_ok() {}
                    tracing::info!("watched files changed; reloading");
                    reload();
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, ModifyKind};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn reads_are_not_changes() {
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
    }

    /// A reload reads the watched files; that must not trigger the next
    /// one (it did: the demo reloaded five times a second, forever).
    #[tokio::test]
    async fn one_write_is_one_reload_even_though_the_reload_reads_the_files() {
        let dir = std::env::temp_dir().join(format!("bw-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("tls.crt");
        std::fs::write(&file, "one").expect("write");
        let reloads = Arc::new(AtomicUsize::new(0));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let task = spawn(&TaskTracker::new(), vec![file.clone()], stop.clone(), {
            let (reloads, file) = (reloads.clone(), file.clone());
            move || {
                // As reload_all does: read what is watched.
                let _ = std::fs::read(&file);
                reloads.fetch_add(1, Ordering::SeqCst);
                let _ = done_tx.send(());
            }
        })
        .expect("watching");
        std::fs::write(&file, "two").expect("rotate");
        tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
            .await
            .expect("reloaded after the write");
        // The reload's own reads would show up within the 200 ms settle
        // time; give them five times that.
        let again = tokio::time::timeout(Duration::from_secs(1), done_rx.recv()).await;
        assert!(again.is_err(), "a reload triggered another reload");
        assert_eq!(reloads.load(Ordering::SeqCst), 1);
        stop.cancel();
        task.await.expect("watcher task");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
