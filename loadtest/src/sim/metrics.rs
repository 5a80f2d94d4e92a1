//! kube-sim's own request counters, exposed in Prometheus text format.
//!
//! kube-sim reproduces the two apiserver series the load tests and dashboards
//! read: `apiserver_request_total` (a counter per verb/resource/code) and
//! `apiserver_longrunning_requests` (open watches and exec sessions). The
//! labels match the apiserver's (`CleanVerb`: LIST, WATCH, GET, POST, …; scope
//! resource/namespace/cluster) so the same queries work against both.
//!
//! The counters live in this struct, not in the global `metrics` recorder: the
//! proxy may embed kube-sim in its own process for the demo, and the proxy
//! owns the global recorder. Every label value is a `&'static str` taken from
//! the resource table, so the maps are bounded by the table's size.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

/// The labels of one request series (without `code` and `component`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestLabels {
    /// Upper case as the apiserver reports it: GET, LIST, WATCH, POST, PUT,
    /// PATCH, DELETE, DELETECOLLECTION, CONNECT.
    pub verb: &'static str,
    pub group: &'static str,
    pub version: &'static str,
    pub resource: &'static str,
    pub subresource: &'static str,
    /// `resource` (named object or create), `namespace`, `cluster`, or "" for
    /// non-resource requests.
    pub scope: &'static str,
}

/// Request counters and the long-running gauge.
#[derive(Debug, Default)]
pub struct SimMetrics {
    // Plain mutexes: each critical section is one map lookup and an add, far
    // cheaper than the request it counts; no guard is held across an await.
    requests: Mutex<HashMap<(RequestLabels, u16), u64>>,
    longrunning: Mutex<HashMap<RequestLabels, i64>>,
}

/// Decrements `apiserver_longrunning_requests` and counts the request in
/// `apiserver_request_total` when dropped, however the long-running request
/// ends (timeout, client gone, shutdown).
pub struct LongRunningGuard {
    metrics: Arc<SimMetrics>,
    labels: RequestLabels,
    code: u16,
}

impl Drop for LongRunningGuard {
    fn drop(&mut self) {
        self.metrics.add_longrunning(self.labels, -1);
        self.metrics.record(self.labels, self.code);
    }
}

impl SimMetrics {
    /// Counts one finished request.
    pub fn record(&self, labels: RequestLabels, code: u16) {
        let mut map = self.requests.lock().expect("metrics lock poisoned");
        *map.entry((labels, code)).or_insert(0) += 1;
    }

    /// Marks a long-running request as open until the guard drops; it is then
    /// counted in `apiserver_request_total` with `code`.
    pub fn long_running(self: &Arc<Self>, labels: RequestLabels, code: u16) -> LongRunningGuard {
        self.add_longrunning(labels, 1);
        LongRunningGuard {
            metrics: Arc::clone(self),
            labels,
            code,
        }
    }

    fn add_longrunning(&self, labels: RequestLabels, delta: i64) {
        let mut map = self.longrunning.lock().expect("metrics lock poisoned");
        *map.entry(labels).or_insert(0) += delta;
    }

    /// `apiserver_request_total` summed over codes and every other label for
    /// `verb` and `resource`.
    pub fn request_count(&self, verb: &str, resource: &str) -> u64 {
        let map = self.requests.lock().expect("metrics lock poisoned");
        map.iter()
            .filter(|((l, _), _)| l.verb == verb && l.resource == resource)
            .map(|(_, n)| *n)
            .sum()
    }

    /// `apiserver_longrunning_requests{verb, resource}` summed over the other labels.
    pub fn longrunning(&self, verb: &str, resource: &str) -> i64 {
        let map = self.longrunning.lock().expect("metrics lock poisoned");
        map.iter()
            .filter(|(l, _)| l.verb == verb && l.resource == resource)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Both series in the Prometheus text exposition format (labels sorted by
    /// name, as client_golang writes them).
    pub fn render(&self) -> String {
        let mut requests: Vec<((RequestLabels, u16), u64)> = {
            let map = self.requests.lock().expect("metrics lock poisoned");
            map.iter().map(|(k, v)| (*k, *v)).collect()
        };
        requests.sort();
        let mut longrunning: Vec<(RequestLabels, i64)> = {
            let map = self.longrunning.lock().expect("metrics lock poisoned");
            map.iter().map(|(k, v)| (*k, *v)).collect()
        };
        longrunning.sort();

        let mut out = String::with_capacity(256 + 200 * (requests.len() + longrunning.len()));
        out.push_str(
            "# HELP apiserver_longrunning_requests [STABLE] Gauge of all active long-running \
             apiserver requests broken out by verb, group, version, resource, scope and \
             component. Not all requests are tracked this way.\n\
             # TYPE apiserver_longrunning_requests gauge\n",
        );
        for (l, n) in &longrunning {
            let _ = writeln!(
                out,
                "apiserver_longrunning_requests{{component=\"apiserver\",group=\"{}\",resource=\"{}\",scope=\"{}\",subresource=\"{}\",verb=\"{}\",version=\"{}\"}} {}",
                l.group, l.resource, l.scope, l.subresource, l.verb, l.version, n
            );
        }
        out.push_str(
            "# HELP apiserver_request_total [STABLE] Counter of apiserver requests broken out \
             for each verb, dry run value, group, version, resource, scope, component, and \
             HTTP response code.\n\
             # TYPE apiserver_request_total counter\n",
        );
        for ((l, code), n) in &requests {
            let _ = writeln!(
                out,
                "apiserver_request_total{{code=\"{}\",component=\"apiserver\",group=\"{}\",resource=\"{}\",scope=\"{}\",subresource=\"{}\",verb=\"{}\",version=\"{}\"}} {}",
                code, l.group, l.resource, l.scope, l.subresource, l.verb, l.version, n
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(verb: &'static str) -> RequestLabels {
        RequestLabels {
            verb,
            group: "",
            version: "v1",
            resource: "pods",
            subresource: "",
            scope: "cluster",
        }
    }

    #[test]
    fn a_long_running_request_is_counted_when_it_ends() {
        let m = Arc::new(SimMetrics::default());
        let guard = m.long_running(labels("WATCH"), 200);
        assert_eq!(m.longrunning("WATCH", "pods"), 1);
        assert_eq!(m.request_count("WATCH", "pods"), 0);
        drop(guard);
        assert_eq!(m.longrunning("WATCH", "pods"), 0);
        assert_eq!(m.request_count("WATCH", "pods"), 1);
    }

    #[test]
    fn render_writes_sorted_labels_and_type_lines() {
        let m = SimMetrics::default();
        m.record(labels("LIST"), 200);
        m.record(labels("LIST"), 200);
        let text = m.render();
        assert!(text.contains("# TYPE apiserver_request_total counter\n"));
        assert!(text.contains(
            "apiserver_request_total{code=\"200\",component=\"apiserver\",group=\"\",resource=\"pods\",scope=\"cluster\",subresource=\"\",verb=\"LIST\",version=\"v1\"} 2\n"
        ));
        assert_eq!(m.request_count("LIST", "pods"), 2);
    }
}
