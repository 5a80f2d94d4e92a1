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

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::proxy::Shared;
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
    note("serving-tls", tls.reload().map_err(|e| e.to_string()));
    note(
        "upstream-credentials",
        shared.upstream.reload().map_err(|e| e.to_string()),
    );
    note(
        "service-account-keys",
        shared.auth.reload_keys().map_err(|e| e.to_string()),
    );
    failed
}

/// Watches the directories of `files` until `stop`, calling `reload` after
/// each burst of changes.
pub fn spawn(
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
            if res.is_ok() {
                let _ = tx.try_send(());
            }
        },
    ) {
        Ok(w) => w,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch certificate files; rotation needs a restart");
            return None;
        }
    };
    for dir in &dirs {
        if let Err(err) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %err, "cannot watch directory");
        }
    }
    Some(tokio::spawn(async move {
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
