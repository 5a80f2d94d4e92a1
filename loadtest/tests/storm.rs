//! The incident lab, small: 200 agents for ~2 s, direct and through the real
//! `breakwater` binary, asserting invariants (never timings): through
//! Breakwater kube-sim sees a bounded number of pod watches and LISTs, every
//! agent's final view equals kube-sim's truth, the admin probe never fails,
//! the rollback succeeds.
//!
//! The breakwater binary: `cargo test --workspace` (the CI command) builds it
//! into `target/debug/` before any test runs, because the proxy crate has
//! integration tests; we find it next to this test's executable
//! (`proc::find_breakwater`, or `$BREAKWATER_BIN`). When it is missing (e.g.
//! `cargo test -p breakwater-loadtest` alone on a fresh clone) we run
//! `cargo build -p breakwater` once, bounded in time, and fail with a clear
//! message if that does not produce it.

mod common;

use std::time::Duration;

use breakwater_loadtest::storm::{self, Mode, StormOpts};

const AGENTS: usize = 200;

fn opts() -> StormOpts {
    StormOpts {
        agents: AGENTS,
        pods_per_node: 2,
        churn: 20.0,
        rollback_after: Duration::from_secs(2),
        max_duration: Duration::from_secs(40),
        breakwater: Some(common::breakwater_bin()),
        progress: false,
        ..StormOpts::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_storm_keeps_invariants_direct_and_through_breakwater() {
    storm::raise_nofile_limit();
    let opts = opts();
    let c = storm::run_compare(&opts).await.expect("both runs");
    for r in [&c.direct, &c.breakwater] {
        let m = &r.metrics;
        let name = r.mode.name();
        // Every agent's final view equals kube-sim's truth.
        assert_eq!(m.events_lost, 0, "{name}: {m:?}");
        assert_eq!(m.agents_not_synced, 0, "{name}: {m:?}");
        assert!(m.all_watching_s.is_some(), "{name}: {m:?}");
        // The admin probe never fails, and it ran.
        assert!(m.admin_probes > 0, "{name}: {m:?}");
        assert_eq!(m.admin_failures, 0, "{name}: {m:?}");
        // The rollback got through.
        assert!(m.rollback_ms.is_some(), "{name}: {m:?}");
    }
    // Direct, every agent's LIST reaches kube-sim (through Breakwater the
    // hub may answer rv=0 LISTs from its cache).
    let d = &c.direct.metrics;
    assert!(d.upstream_lists >= AGENTS as u64, "direct: {d:?}");
    let b = &c.breakwater.metrics;
    assert_eq!(c.breakwater.mode, Mode::Breakwater);
    // Through Breakwater, the node-scoped pod watches of every agent share
    // one upstream watch (two while a re-watch overlaps the old stream):
    // what the multiplexer promises. The figure is printed so a run records it.
    eprintln!(
        "through breakwater: peak upstream pod watches {} (agents {AGENTS}), upstream LISTs {}, WATCH requests {}",
        b.peak_upstream_watches, b.upstream_lists, b.upstream_watches
    );
    assert!(
        b.peak_upstream_watches <= 2,
        "{AGENTS} agents cost {} upstream pod watches; the multiplexer shares them in one",
        b.peak_upstream_watches
    );
    // LISTs are bounded: each agent lists once, plus a re-list per 410
    // (rare), never a retry storm reaching kube-sim.
    assert!(
        b.upstream_lists <= AGENTS as u64 + b.relists_410,
        "upstream LISTs {} for {AGENTS} agents ({} re-lists)",
        b.upstream_lists,
        b.relists_410
    );
    // Breakwater's pacing keeps kube-sim's queue empty and never makes it
    // answer 429 itself.
    assert_eq!(b.upstream_429s, 0, "{b:?}");
    assert_eq!(b.peak_queued, 0, "{b:?}");
}

/// The same storm with agents that ask for protobuf, as kubelet does: the
/// hub shares and caches their watches and LISTs as it does JSON ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_protobuf_storm_costs_one_upstream_watch_through_breakwater() {
    storm::raise_nofile_limit();
    let opts = StormOpts {
        protobuf: true,
        ..opts()
    };
    let r = storm::run_storm(&opts, Mode::Breakwater)
        .await
        .expect("the protobuf run");
    let m = &r.metrics;
    assert_eq!(m.events_lost, 0, "{m:?}");
    assert_eq!(m.agents_not_synced, 0, "{m:?}");
    assert!(m.all_watching_s.is_some(), "{m:?}");
    assert!(
        m.protobuf_answers >= 2 * AGENTS as u64,
        "every agent's LIST and WATCH answered in protobuf: {m:?}"
    );
    assert_eq!(m.admin_failures, 0, "{m:?}");
    assert!(m.rollback_ms.is_some(), "{m:?}");
    eprintln!(
        "protobuf through breakwater: peak upstream pod watches {} (agents {AGENTS}), upstream LISTs {}",
        m.peak_upstream_watches, m.upstream_lists
    );
    assert!(
        m.peak_upstream_watches <= 2,
        "{AGENTS} protobuf agents cost {} upstream pod watches",
        m.peak_upstream_watches
    );
    assert!(
        m.upstream_lists <= 10 + m.relists_410,
        "{AGENTS} protobuf agents cost {} upstream LISTs",
        m.upstream_lists
    );
}
