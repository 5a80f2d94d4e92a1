//! `breakwater check-limits`: validates a limits file offline and, given a
//! sample request, explains which rule governs it and what limits apply.

use std::path::Path;

use breakwater_limits::{RequestAttrs, Subject, ValidatedLimits, explain};

use crate::classify;
use crate::error::Chain;

/// Who asks, in a sample request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    /// The user name.
    pub user: &'a str,
    /// Its groups (`system:authenticated` is added).
    pub groups: &'a [String],
    /// The Pod its bound token names, if any.
    pub pod: Option<&'a str>,
    /// The node its bound token names, if any.
    pub node: Option<&'a str>,
}

/// The report, or every problem of the file (`FILE:LINE:COL: message (hint: …)`).
pub fn check_limits(
    file: &Path,
    request: Option<&str>,
    caller: &Caller<'_>,
) -> Result<String, String> {
    let user = caller.user;
    let limits = ValidatedLimits::load(file).map_err(|e| Chain(&e).to_string())?;
    let backend = match limits.backend() {
        breakwater_limits::Backend::Local => "local".to_string(),
        breakwater_limits::Backend::Redis(r) => format!(
            "redis {}:{} (aggregate limits shared by all replicas; lease {:?}; falls back to 1/{} each)",
            r.host,
            r.port,
            r.lease,
            limits.replicas()
        ),
    };
    let mut out = format!(
        "{}: valid ({} rules, replicas {}, backend {backend})\n",
        file.display(),
        limits.rules().len(),
        limits.replicas()
    );
    let Some(request) = request else {
        return Ok(out);
    };
    let (method, target) = request
        .trim()
        .split_once(' ')
        .ok_or_else(|| format!("--request {request:?}: expected \"METHOD /path?query\""))?;
    let method: http::Method = method
        .parse()
        .map_err(|_| format!("--request: {method:?} is not an HTTP method"))?;
    let (path, query) = match target.trim().split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target.trim(), None),
    };
    let info = classify::classify(&method, path, query);
    let mut groups = caller.groups.to_vec();
    if user != "system:anonymous" && !groups.iter().any(|g| g == "system:authenticated") {
        groups.push("system:authenticated".to_string());
    }
    let subject = Subject {
        user,
        groups: &groups,
        pod: caller.pod,
        node: caller.node,
    };
    let attrs = RequestAttrs {
        verb: info.verb.as_str(),
        api_group: &info.api_group,
        resource: &info.resource,
        subresource: &info.subresource,
        namespace: &info.namespace,
        is_resource_request: info.is_resource_request,
    };
    out.push_str(&format!(
        "request: verb={} group={:?} resource={} subresource={:?} namespace={:?} as {user} {groups:?}\n",
        info.verb.as_str(),
        info.api_group,
        info.resource,
        info.subresource,
        info.namespace,
    ));
    out.push_str(&explain(&limits, &subject, &attrs).to_string());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../docker/limits.yaml");

    fn example_file() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        std::io::Write::write_all(&mut f, EXAMPLE.as_bytes()).expect("write");
        f
    }

    #[test]
    fn a_watch_of_the_agent_matches_the_telemetry_rule() {
        let f = example_file();
        let out = check_limits(
            f.path(),
            Some("GET /api/v1/pods?watch=1&fieldSelector=spec.nodeName%3Dn1"),
            &Caller {
                user: "system:serviceaccount:monitoring:node-agent",
                groups: &["system:serviceaccounts".to_string()],
                ..Caller::default()
            },
        )
        .expect("valid");
        assert!(out.contains("telemetry-agents"), "{out}");
        assert!(out.contains("verb=watch"), "{out}");
        assert!(
            out.contains("charges upstream: only requests that reach"),
            "{out}"
        );
    }

    #[test]
    fn an_admin_matches_the_exempt_rule() {
        let f = example_file();
        let out = check_limits(
            f.path(),
            Some("GET /api/v1/namespaces"),
            &Caller {
                user: "kubernetes-admin",
                groups: &["system:masters".to_string()],
                ..Caller::default()
            },
        )
        .expect("valid");
        assert!(out.contains("admins"), "{out}");
    }

    #[test]
    fn an_invalid_file_reports_line_and_column() {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        std::io::Write::write_all(
            &mut f,
            b"apiVersion: breakwater/v1alpha1\nkind: Limits\nrules:\n  - name: x\n    perIdentity: {rate: 0, burst: 1}\n",
        )
        .expect("write");
        let err = check_limits(
            f.path(),
            None,
            &Caller {
                user: "u",
                ..Caller::default()
            },
        )
        .expect_err("invalid");
        assert!(err.contains(":5:"), "{err}");
    }

    #[test]
    fn a_per_pod_rule_explains_its_key_for_the_sample_pod() {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        std::io::Write::write_all(
            &mut f,
            b"apiVersion: breakwater/v1alpha1\nkind: Limits\nrules:\n  - name: agents\n    key: pod\n    onMissingKey: refuse\n    match: {serviceAccounts: [monitoring/node-agent]}\n    perIdentity: {watches: 2}\n",
        )
        .expect("write");
        let out = check_limits(
            f.path(),
            Some("GET /api/v1/pods?watch=1"),
            &Caller {
                user: "system:serviceaccount:monitoring:node-agent",
                pod: Some("node-agent-x7k2p"),
                ..Caller::default()
            },
        )
        .expect("valid");
        assert!(out.contains("per pod (key pod"), "{out}");
        assert!(
            out.contains("this request: pod monitoring/node-agent-x7k2p"),
            "{out}"
        );
    }

    #[test]
    fn the_fleet_example_with_pod_keys_and_a_redis_backend_is_valid() {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        std::io::Write::write_all(&mut f, include_bytes!("../../docker/limits-fleet.yaml"))
            .expect("write");
        let out = check_limits(
            f.path(),
            Some("GET /api/v1/pods?watch=1"),
            &Caller {
                user: "system:serviceaccount:monitoring:node-agent",
                pod: Some("node-agent-x7k2p"),
                node: Some("node-7"),
                ..Caller::default()
            },
        )
        .expect("valid");
        assert!(out.contains("backend redis 10.0.0.10:6379"), "{out}");
        assert!(out.contains("this request: node node-7"), "{out}");
    }
}
