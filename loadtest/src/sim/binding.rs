//! `pods/binding`: how a scheduler puts a pending pod on a node.
//!
//! The apiserver's BindingREST: the pod of the URL gets `spec.nodeName`,
//! the binding's annotations, and a `PodScheduled=True` condition, in one
//! update. A pod already on a node, or being deleted, refuses with 409. A
//! `spec.nodeName=NODE` watch sees the pod arrive as ADDED (it enters the
//! selector), as fixtures/apiserver-v1.24-protobuf/watch-pods-node-a shows.

use serde_json::{Map, Value, json};

use super::auth::{format_timestamp, unix_now};
use super::resources::ResourceType;
use super::store::{Store, StoreError};

/// How often a binding retries an update that lost a race.
const ATTEMPTS: usize = 5;

/// Binds pod `namespace/name` as `binding` (a Binding object) says.
pub(crate) fn bind(
    store: &Store,
    pods: &'static ResourceType,
    namespace: &str,
    name: &str,
    binding: &Value,
) -> Result<(), StoreError> {
    let str_at = |p: &str| binding.pointer(p).and_then(Value::as_str).unwrap_or("");
    let named = str_at("/metadata/name");
    if !named.is_empty() && named != name {
        return Err(StoreError::BadRequest(
            "name in URL does not match name in Binding object".to_string(),
        ));
    }
    let node = str_at("/target/name");
    let invalid = |message: String| StoreError::Invalid {
        kind: "Binding".to_string(),
        name: name.to_string(),
        message,
    };
    if !matches!(str_at("/target/kind"), "" | "Node") {
        return Err(invalid(format!(
            "target.kind: Unsupported value: {:?}: supported values: \"Node\"",
            str_at("/target/kind")
        )));
    }
    if node.is_empty() {
        return Err(invalid("target.name: Required value".to_string()));
    }
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let pod = store.get(pods, Some(namespace), name)?;
        let refused = |why: String| StoreError::Refused {
            resource: "pods/binding".to_string(),
            name: name.to_string(),
            why,
        };
        match pod.pointer("/spec/nodeName").and_then(Value::as_str) {
            Some(bound) if !bound.is_empty() => {
                return Err(refused(format!(
                    "pod {name} is already assigned to node {bound:?}"
                )));
            }
            _ => {}
        }
        if pod
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null())
        {
            return Err(refused(format!(
                "pod {name} is being deleted, cannot be assigned to a host"
            )));
        }
        let next = assigned(&pod, node, binding.pointer("/metadata/annotations"));
        match store.update(pods, Some(namespace), name, next) {
            Ok(_) => return Ok(()),
            // Someone wrote the pod between our read and write: again.
            Err(e @ StoreError::Conflict { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| StoreError::Conflict {
        resource: "pods".to_string(),
        name: name.to_string(),
    }))
}

/// `pod` on `node`: nodeName, the binding's annotations, PodScheduled=True.
fn assigned(pod: &Value, node: &str, annotations: Option<&Value>) -> Value {
    let mut next = pod.clone();
    next["spec"]["nodeName"] = json!(node);
    if let Some(extra) = annotations.and_then(Value::as_object)
        && !extra.is_empty()
    {
        let meta = &mut next["metadata"];
        if !meta["annotations"].is_object() {
            meta["annotations"] = Value::Object(Map::new());
        }
        for (k, v) in extra {
            meta["annotations"][k] = v.clone();
        }
    }
    let now = format_timestamp(unix_now());
    if !next["status"]["conditions"].is_array() {
        next["status"]["conditions"] = json!([]);
    }
    if let Some(conditions) = next["status"]["conditions"].as_array_mut() {
        match conditions.iter_mut().find(|c| c["type"] == "PodScheduled") {
            Some(c) if c["status"] == "True" => {}
            Some(c) => {
                c["status"] = json!("True");
                c["lastTransitionTime"] = json!(now);
            }
            None => conditions.push(json!({
                "type": "PodScheduled",
                "status": "True",
                "lastProbeTime": null,
                "lastTransitionTime": now,
            })),
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::resources;

    fn setup() -> (Store, &'static ResourceType) {
        let store = Store::new(100, 100);
        let ns = resources::find("", "v1", "namespaces").expect("namespaces");
        store
            .create(ns, None, json!({"metadata": {"name": "d"}}))
            .expect("namespace");
        let pods = resources::find("", "v1", "pods").expect("pods");
        store
            .create(
                pods,
                Some("d"),
                json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]},
                       "status": {"phase": "Pending"}}),
            )
            .expect("pod");
        (store, pods)
    }

    #[test]
    fn binding_sets_the_node_and_the_scheduled_condition() {
        let (store, pods) = setup();
        let binding = json!({"metadata": {"name": "p", "annotations": {"a": "b"}},
                             "target": {"kind": "Node", "name": "n1"}});
        bind(&store, pods, "d", "p", &binding).expect("bound");
        let pod = store.get(pods, Some("d"), "p").expect("pod");
        assert_eq!(pod["spec"]["nodeName"], "n1");
        assert_eq!(pod["metadata"]["annotations"]["a"], "b");
        assert_eq!(pod["status"]["conditions"][0]["type"], "PodScheduled");
        assert_eq!(pod["status"]["conditions"][0]["status"], "True");
        assert_eq!(pod["status"]["phase"], "Pending");
    }

    #[test]
    fn a_bound_pod_refuses_another_binding_with_409() {
        let (store, pods) = setup();
        let to = |n: &str| json!({"metadata": {"name": "p"}, "target": {"name": n}});
        bind(&store, pods, "d", "p", &to("n1")).expect("bound");
        let err = bind(&store, pods, "d", "p", &to("n2")).expect_err("refused");
        assert_eq!(err.code(), 409);
        let status = err.to_status();
        assert_eq!(
            status["message"],
            "Operation cannot be fulfilled on pods/binding \"p\": pod p is already assigned to node \"n1\""
        );
        assert_eq!(status["reason"], "Conflict");
        assert_eq!(status["details"]["kind"], "pods/binding");
    }

    #[test]
    fn a_binding_must_name_its_pod_and_a_node() {
        let (store, pods) = setup();
        let wrong = json!({"metadata": {"name": "q"}, "target": {"name": "n1"}});
        assert_eq!(
            bind(&store, pods, "d", "p", &wrong).map_err(|e| e.code()),
            Err(400)
        );
        let no_node = json!({"metadata": {"name": "p"}, "target": {}});
        assert_eq!(
            bind(&store, pods, "d", "p", &no_node).map_err(|e| e.code()),
            Err(422)
        );
        let missing = json!({"target": {"name": "n1"}});
        assert_eq!(
            bind(&store, pods, "d", "nope", &missing).map_err(|e| e.code()),
            Err(404)
        );
    }
}
