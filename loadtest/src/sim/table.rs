//! Server-side printing: `meta.k8s.io/v1` Tables for `kubectl get`.
//!
//! kubectl asks for `Accept: application/json;as=Table;v=v1;g=meta.k8s.io,…`
//! and prints whatever columns the server sends, so the columns and cell
//! formats here follow the apiserver's printers
//! (pkg/printers/internalversion/printers.go) for the covered types, and the
//! default table convertor (Name, Created At) for the rest. Ages use the
//! apiserver's `HumanDuration` rounding (k8s.io/apimachinery/pkg/util/duration).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};

use crate::sim::resources::ResourceType;

/// What each row's `object` holds (`?includeObject=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IncludeObject {
    /// No `object` field.
    None,
    /// A `PartialObjectMetadata` (the default).
    #[default]
    Metadata,
    /// The full object.
    Object,
}

/// Parses `includeObject` from a raw query (no leading '?'); Metadata by default.
pub fn include_object(query: Option<&str>) -> IncludeObject {
    let Some(query) = query else {
        return IncludeObject::Metadata;
    };
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == "includeObject" {
            return match v.as_ref() {
                "None" => IncludeObject::None,
                "Object" => IncludeObject::Object,
                _ => IncludeObject::Metadata,
            };
        }
    }
    IncludeObject::Metadata
}

/// A Table for a list response; `list_metadata` = {"resourceVersion":..,"continue":..,"remainingItemCount":..}.
/// Null or empty `continue`/`remainingItemCount` are dropped, like the apiserver's omitempty.
pub fn list_table(
    rt: &ResourceType,
    items: &[Arc<Value>],
    list_metadata: Value,
    include: IncludeObject,
) -> Value {
    let mut meta = Map::new();
    if let Value::Object(m) = list_metadata {
        for (k, v) in m {
            let empty = v.is_null() || v.as_str() == Some("");
            if !empty {
                meta.insert(k, v);
            }
        }
    }
    let now = SystemTime::now();
    let rows: Vec<Value> = items.iter().map(|o| row(rt, o, include, now)).collect();
    table(rt, Value::Object(meta), rows)
}

/// A one-row Table for a watch event object (fixtures/watch-table-kubectl.jsonl).
///
/// Carries the column definitions; the apiserver sends them only with the
/// first event of a watch (later events have `"columnDefinitions": null`),
/// which the watch handler can reproduce with [`strip_column_definitions`].
pub fn event_table(rt: &ResourceType, object: &Value, include: IncludeObject) -> Value {
    object_table(rt, object, include)
}

/// A Table for a single GET.
pub fn object_table(rt: &ResourceType, object: &Value, include: IncludeObject) -> Value {
    let mut meta = Map::new();
    if let Some(rv) = object.pointer("/metadata/resourceVersion") {
        meta.insert("resourceVersion".into(), rv.clone());
    }
    let row = row(rt, object, include, SystemTime::now());
    table(rt, Value::Object(meta), vec![row])
}

/// Sets `columnDefinitions` to null, as the apiserver does for every watch
/// event after the first.
pub fn strip_column_definitions(table: &mut Value) {
    if let Some(obj) = table.as_object_mut() {
        obj.insert("columnDefinitions".into(), Value::Null);
    }
}

fn table(rt: &ResourceType, metadata: Value, rows: Vec<Value>) -> Value {
    let columns: Vec<Value> = columns(rt)
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "type": c.type_,
                "format": c.format,
                "description": c.description,
                "priority": c.priority,
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": columns,
        "rows": rows,
    })
}

fn row(rt: &ResourceType, obj: &Value, include: IncludeObject, now: SystemTime) -> Value {
    let mut row = Map::new();
    row.insert("cells".into(), Value::Array(cells(rt, obj, now)));
    match include {
        IncludeObject::None => {}
        IncludeObject::Metadata => {
            row.insert(
                "object".into(),
                json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
                }),
            );
        }
        IncludeObject::Object => {
            let mut full = obj.clone();
            // List items are stored without kind/apiVersion in some paths;
            // an embedded object must say what it is.
            if let Some(o) = full.as_object_mut() {
                o.entry("kind").or_insert_with(|| json!(rt.kind));
                o.entry("apiVersion")
                    .or_insert_with(|| json!(rt.api_version()));
            }
            row.insert("object".into(), full);
        }
    }
    Value::Object(row)
}

/// One column as `TableColumnDefinition`.
struct Column {
    name: &'static str,
    type_: &'static str,
    format: &'static str,
    description: &'static str,
    priority: u8,
}

const fn col(name: &'static str, description: &'static str) -> Column {
    Column {
        name,
        type_: "string",
        format: "",
        description,
        priority: 0,
    }
}

const fn wide(name: &'static str, description: &'static str) -> Column {
    Column {
        name,
        type_: "string",
        format: "",
        description,
        priority: 1,
    }
}

const fn int(name: &'static str, description: &'static str) -> Column {
    Column {
        name,
        type_: "integer",
        format: "",
        description,
        priority: 0,
    }
}

const NAME_DOC: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: http://kubernetes.io/docs/user-guide/identifiers#names";
const CREATED_DOC: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";
const NODE_ADDRESSES_DOC: &str = "List of addresses reachable to the node. Queried from cloud provider, if available. More info: https://kubernetes.io/docs/concepts/nodes/node/#addresses Note: This field is declared as mergeable, but the merge key is not sufficiently unique, which can cause data corruption when it is merged. Callers should instead use a full-replacement patch. See http://pr.k8s.io/79391 for an example.";
const CONTAINERS_DOC: &str = "Names of each container in the template.";
const IMAGES_DOC: &str = "Images referenced by each container in the template.";
const SELECTOR_DOC: &str = "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment. It must match the pod template's labels.";

const NAME: Column = Column {
    name: "Name",
    type_: "string",
    format: "name",
    description: NAME_DOC,
    priority: 0,
};
const AGE: Column = col("Age", CREATED_DOC);

const POD_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Ready",
        "The aggregate readiness state of this pod for accepting traffic.",
    ),
    col(
        "Status",
        "The aggregate status of the containers in this pod.",
    ),
    col(
        "Restarts",
        "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
    ),
    AGE,
    wide(
        "IP",
        "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
    ),
    wide(
        "Node",
        "NodeName is a request to schedule this pod onto a specific node. If it is non-empty, the scheduler simply schedules this pod onto that node, assuming that it fits resource requirements.",
    ),
    wide(
        "Nominated Node",
        "nominatedNodeName is set only when this pod preempts other pods on the node, but it cannot be scheduled right away as preemption victims receive their graceful termination periods. This field does not guarantee that the pod will be scheduled on this node. Scheduler may decide to place the pod elsewhere if other nodes become available sooner. Scheduler may also decide to give the resources on this node to a higher priority pod that is created after preemption. As a result, this field may be different than PodSpec.nodeName when the pod is scheduled.",
    ),
    wide(
        "Readiness Gates",
        "If specified, all readiness gates will be evaluated for pod readiness. A pod is ready when all its containers are ready AND all conditions specified in the readiness gates have status equal to \"True\" More info: https://git.k8s.io/enhancements/keps/sig-network/580-pod-readiness-gates",
    ),
];

const CONFIGMAP_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Data",
        "Data contains the configuration data. Each key must consist of alphanumeric characters, '-', '_' or '.'. Values with non-UTF-8 byte sequences must use the BinaryData field. The keys stored in Data must not overlap with the keys in the BinaryData field, this is enforced during validation process.",
    ),
    AGE,
];

const NAMESPACE_COLUMNS: &[Column] = &[NAME, col("Status", "The status of the namespace"), AGE];

const NODE_COLUMNS: &[Column] = &[
    NAME,
    col("Status", "The status of the node"),
    col("Roles", "The roles of the node"),
    AGE,
    col("Version", "Kubelet Version reported by the node."),
    wide("Internal-IP", NODE_ADDRESSES_DOC),
    wide("External-IP", NODE_ADDRESSES_DOC),
    wide(
        "OS-Image",
        "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).",
    ),
    wide(
        "Kernel-Version",
        "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).",
    ),
    wide(
        "Container-Runtime",
        "ContainerRuntime Version reported by the node through runtime remote API (e.g. docker://1.5.0).",
    ),
];

const SERVICE_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Type",
        "type determines how the Service is exposed. Defaults to ClusterIP. Valid options are ExternalName, ClusterIP, NodePort, and LoadBalancer.",
    ),
    col(
        "Cluster-IP",
        "clusterIP is the IP address of the service and is usually assigned randomly.",
    ),
    col(
        "External-IP",
        "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.",
    ),
    col(
        "Port(s)",
        "The list of ports that are exposed by this service.",
    ),
    AGE,
    wide(
        "Selector",
        "Route service traffic to pods with label keys and values matching this selector.",
    ),
];

const SERVICEACCOUNT_COLUMNS: &[Column] = &[
    NAME,
    int(
        "Secrets",
        "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use.",
    ),
    AGE,
];

const SECRET_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Type",
        "Used to facilitate programmatic handling of secret data.",
    ),
    col(
        "Data",
        "Data contains the secret data. Each key must consist of alphanumeric characters, '-', '_' or '.'.",
    ),
    AGE,
];

const EVENT_COLUMNS: &[Column] = &[
    col(
        "Last Seen",
        "The time at which the most recent occurrence of this event was recorded.",
    ),
    col(
        "Type",
        "Type of this event (Normal, Warning), new types could be added in the future",
    ),
    col(
        "Reason",
        "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
    ),
    col("Object", "The object that this event is about."),
    wide(
        "Subobject",
        "If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement, such as desiredState.manifest.containers[2].",
    ),
    wide(
        "Source",
        "The component reporting this event. Should be a short machine understandable string.",
    ),
    col(
        "Message",
        "A human-readable description of the status of this operation.",
    ),
    wide(
        "First Seen",
        "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)",
    ),
    wide("Count", "The number of times this event has occurred."),
    Column {
        name: "Name",
        type_: "string",
        format: "name",
        description: NAME_DOC,
        priority: 1,
    },
];

const DEPLOYMENT_COLUMNS: &[Column] = &[
    NAME,
    col("Ready", "Number of the pod with ready state"),
    int(
        "Up-to-date",
        "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
    ),
    int(
        "Available",
        "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
    ),
    AGE,
    wide("Containers", CONTAINERS_DOC),
    wide("Images", IMAGES_DOC),
    wide("Selector", SELECTOR_DOC),
];

const DAEMONSET_COLUMNS: &[Column] = &[
    NAME,
    int(
        "Desired",
        "The total number of nodes that should be running the daemon pod (including nodes correctly running the daemon pod).",
    ),
    int(
        "Current",
        "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod.",
    ),
    int(
        "Ready",
        "numberReady is the number of nodes that should be running the daemon pod and have one or more of the daemon pod running with a Ready Condition.",
    ),
    int(
        "Up-to-date",
        "The total number of nodes that are running updated daemon pod",
    ),
    int(
        "Available",
        "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available (ready for at least spec.minReadySeconds)",
    ),
    col(
        "Node Selector",
        "NodeSelector is a selector which must be true for the pod to fit on a node. Selector which must match a node's labels for the pod to be scheduled on that node. More info: https://kubernetes.io/docs/concepts/configuration/assign-pod-node/",
    ),
    AGE,
    wide("Containers", CONTAINERS_DOC),
    wide("Images", IMAGES_DOC),
    wide("Selector", SELECTOR_DOC),
];

const LEASE_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Holder",
        "holderIdentity contains the identity of the holder of a current lease. If Coordinated Leader Election is used, the holder identity must be equal to the elected LeaseCandidate.metadata.name field.",
    ),
    AGE,
];

/// A custom resource without `additionalPrinterColumns`: the CRD default
/// Age column (type date, printed as an age) after Name (the CRD table
/// convertor of apiextensions-apiserver).
const CUSTOM_RESOURCE_COLUMNS: &[Column] = &[
    NAME,
    Column {
        name: "Age",
        type_: "date",
        format: "",
        description: "Custom resource definition column (in JSONPath format): .metadata.creationTimestamp",
        priority: 0,
    },
];

/// The default table convertor's columns (types without a printer).
const DEFAULT_COLUMNS: &[Column] = &[
    NAME,
    Column {
        name: "Created At",
        type_: "date",
        format: "",
        description: CREATED_DOC,
        priority: 0,
    },
];

fn columns(rt: &ResourceType) -> &'static [Column] {
    if rt.custom {
        return CUSTOM_RESOURCE_COLUMNS;
    }
    match (rt.group, rt.plural) {
        ("", "pods") => POD_COLUMNS,
        ("", "configmaps") => CONFIGMAP_COLUMNS,
        ("", "namespaces") => NAMESPACE_COLUMNS,
        ("", "nodes") => NODE_COLUMNS,
        ("", "services") => SERVICE_COLUMNS,
        ("", "serviceaccounts") => SERVICEACCOUNT_COLUMNS,
        ("", "secrets") => SECRET_COLUMNS,
        ("", "events") => EVENT_COLUMNS,
        ("apps", "deployments") => DEPLOYMENT_COLUMNS,
        ("apps", "daemonsets") => DAEMONSET_COLUMNS,
        ("coordination.k8s.io", "leases") => LEASE_COLUMNS,
        _ => DEFAULT_COLUMNS,
    }
}

fn cells(rt: &ResourceType, o: &Value, now: SystemTime) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    let age = json!(age(o.pointer("/metadata/creationTimestamp"), now));
    if rt.custom {
        return vec![name, age];
    }
    match (rt.group, rt.plural) {
        ("", "pods") => pod_cells(o, name, age),
        ("", "configmaps") => vec![name, json!(len(o, "/data") + len(o, "/binaryData")), age],
        ("", "namespaces") => vec![name, json!(s(o, "/status/phase")), age],
        ("", "nodes") => node_cells(o, name, age),
        ("", "services") => service_cells(o, name, age),
        ("", "serviceaccounts") => vec![name, json!(len(o, "/secrets")), age],
        ("", "secrets") => {
            let data = len(o, "/data") + len(o, "/stringData");
            // The apiserver defaults an empty type to Opaque on create.
            let type_ = match s(o, "/type") {
                "" => "Opaque",
                t => t,
            };
            vec![name, json!(type_), json!(data), age]
        }
        ("", "events") => event_cells(o, name, now),
        ("apps", "deployments") => {
            let desired = int_at(o, "/spec/replicas");
            let ready = int_at(o, "/status/readyReplicas");
            vec![
                name,
                json!(format!("{ready}/{desired}")),
                json!(int_at(o, "/status/updatedReplicas")),
                json!(int_at(o, "/status/availableReplicas")),
                age,
                json!(template_containers(o, "name")),
                json!(template_containers(o, "image")),
                json!(selector(o.pointer("/spec/selector/matchLabels"))),
            ]
        }
        ("apps", "daemonsets") => vec![
            name,
            json!(int_at(o, "/status/desiredNumberScheduled")),
            json!(int_at(o, "/status/currentNumberScheduled")),
            json!(int_at(o, "/status/numberReady")),
            json!(int_at(o, "/status/updatedNumberScheduled")),
            json!(int_at(o, "/status/numberAvailable")),
            json!(selector(o.pointer("/spec/template/spec/nodeSelector"))),
            age,
            json!(template_containers(o, "name")),
            json!(template_containers(o, "image")),
            json!(selector(o.pointer("/spec/selector/matchLabels"))),
        ],
        ("coordination.k8s.io", "leases") => {
            vec![name, json!(s(o, "/spec/holderIdentity")), age]
        }
        _ => vec![name, json!(s(o, "/metadata/creationTimestamp"))],
    }
}

fn pod_cells(o: &Value, name: Value, age: Value) -> Vec<Value> {
    let statuses = arr(o, "/status/containerStatuses");
    let total = arr(o, "/spec/containers").len();
    let ready = statuses
        .iter()
        .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
        .count();
    let restarts: i64 = statuses
        .iter()
        .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
        .sum();
    // The printer's precedence: terminating, then a pod-level reason, then
    // the first container that is waiting or terminated, then the phase.
    let mut status = if let Some(r) = o.pointer("/status/reason").and_then(Value::as_str) {
        r.to_string()
    } else {
        let phase = s(o, "/status/phase");
        if phase.is_empty() {
            "Pending".to_string()
        } else {
            phase.to_string()
        }
    };
    for c in statuses {
        if let Some(r) = c.pointer("/state/waiting/reason").and_then(Value::as_str) {
            status = r.to_string();
        } else if let Some(r) = c
            .pointer("/state/terminated/reason")
            .and_then(Value::as_str)
        {
            status = r.to_string();
        }
    }
    if o.pointer("/metadata/deletionTimestamp").is_some() {
        status = "Terminating".to_string();
    }
    let gates = arr(o, "/spec/readinessGates");
    let gates_cell = if gates.is_empty() {
        "<none>".to_string()
    } else {
        let conditions = arr(o, "/status/conditions");
        let true_gates = gates
            .iter()
            .filter(|g| {
                conditions.iter().any(|c| {
                    c.get("type") == g.get("conditionType")
                        && c.get("status").and_then(Value::as_str) == Some("True")
                })
            })
            .count();
        format!("{true_gates}/{}", gates.len())
    };
    vec![
        name,
        json!(format!("{ready}/{total}")),
        json!(status),
        json!(restarts.to_string()),
        age,
        json!(or_none(s(o, "/status/podIP"))),
        json!(or_none(s(o, "/spec/nodeName"))),
        json!(or_none(s(o, "/status/nominatedNodeName"))),
        json!(gates_cell),
    ]
}

fn node_cells(o: &Value, name: Value, age: Value) -> Vec<Value> {
    let ready = arr(o, "/status/conditions")
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        .and_then(|c| c.get("status").and_then(Value::as_str));
    let mut status = match ready {
        Some("True") => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    let mut roles: Vec<String> = Vec::new();
    if let Some(labels) = o.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if let Some(role) = k.strip_prefix("node-role.kubernetes.io/") {
                if !role.is_empty() {
                    roles.push(role.to_string());
                }
            } else if k == "kubernetes.io/role"
                && let Some(role) = v.as_str()
                && !role.is_empty()
            {
                roles.push(role.to_string());
            }
        }
    }
    roles.sort();
    roles.dedup();
    let roles = if roles.is_empty() {
        "<none>".to_string()
    } else {
        roles.join(",")
    };
    let address = |kind: &str| {
        arr(o, "/status/addresses")
            .iter()
            .find(|a| a.get("type").and_then(Value::as_str) == Some(kind))
            .and_then(|a| a.get("address").and_then(Value::as_str))
            .unwrap_or("<none>")
            .to_string()
    };
    let unknown = |p: &str| {
        let v = s(o, p);
        if v.is_empty() { "<unknown>" } else { v }.to_string()
    };
    vec![
        name,
        json!(status),
        json!(roles),
        age,
        json!(s(o, "/status/nodeInfo/kubeletVersion")),
        json!(address("InternalIP")),
        json!(address("ExternalIP")),
        json!(unknown("/status/nodeInfo/osImage")),
        json!(unknown("/status/nodeInfo/kernelVersion")),
        json!(unknown("/status/nodeInfo/containerRuntimeVersion")),
    ]
}

fn service_cells(o: &Value, name: Value, age: Value) -> Vec<Value> {
    let svc_type = match s(o, "/spec/type") {
        "" => "ClusterIP",
        t => t,
    };
    let external: Vec<String> = arr(o, "/spec/externalIPs")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let external = match svc_type {
        "ExternalName" => s(o, "/spec/externalName").to_string(),
        "LoadBalancer" => {
            let mut ips: Vec<String> = arr(o, "/status/loadBalancer/ingress")
                .iter()
                .filter_map(|i| {
                    i.get("ip")
                        .or_else(|| i.get("hostname"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .collect();
            ips.extend(external);
            if ips.is_empty() {
                "<pending>".to_string()
            } else {
                ips.join(",")
            }
        }
        _ if external.is_empty() => "<none>".to_string(),
        _ => external.join(","),
    };
    let ports: Vec<String> = arr(o, "/spec/ports")
        .iter()
        .map(|p| {
            let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) if np != 0 => format!("{port}:{np}/{proto}"),
                _ => format!("{port}/{proto}"),
            }
        })
        .collect();
    let ports = if ports.is_empty() {
        "<none>".to_string()
    } else {
        ports.join(",")
    };
    vec![
        name,
        json!(svc_type),
        json!(or_none(s(o, "/spec/clusterIP"))),
        json!(external),
        json!(ports),
        age,
        json!(selector(o.pointer("/spec/selector"))),
    ]
}

fn event_cells(o: &Value, name: Value, now: SystemTime) -> Vec<Value> {
    // core/v1 Events from newer reporters carry eventTime instead of the
    // timestamps; the printer falls back the same way.
    let last = o
        .pointer("/lastTimestamp")
        .filter(|v| !v.is_null())
        .or_else(|| o.pointer("/eventTime"));
    let first = o
        .pointer("/firstTimestamp")
        .filter(|v| !v.is_null())
        .or_else(|| o.pointer("/eventTime"));
    let object = format!(
        "{}/{}",
        s(o, "/involvedObject/kind").to_lowercase(),
        s(o, "/involvedObject/name")
    );
    let component = s(o, "/source/component");
    let host = s(o, "/source/host");
    let source = match (component, host) {
        ("", _) => s(o, "/reportingComponent").to_string(),
        (c, "") => c.to_string(),
        (c, h) => format!("{c}, {h}"),
    };
    vec![
        json!(age(last, now)),
        json!(s(o, "/type")),
        json!(s(o, "/reason")),
        json!(object),
        json!(s(o, "/involvedObject/fieldPath")),
        json!(source),
        json!(s(o, "/message").trim()),
        json!(age(first, now)),
        json!(o.pointer("/count").and_then(Value::as_i64).unwrap_or(1)),
        name,
    ]
}

/// String at a JSON pointer, "" when absent.
fn s<'a>(o: &'a Value, pointer: &str) -> &'a str {
    o.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn arr<'a>(o: &'a Value, pointer: &str) -> &'a [Value] {
    o.pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Number of entries of a map or list at `pointer`.
fn len(o: &Value, pointer: &str) -> usize {
    match o.pointer(pointer) {
        Some(Value::Object(m)) => m.len(),
        Some(Value::Array(a)) => a.len(),
        _ => 0,
    }
}

fn int_at(o: &Value, pointer: &str) -> i64 {
    o.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(v: &str) -> &str {
    if v.is_empty() { "<none>" } else { v }
}

/// Comma-joined `field` of the pod template's containers.
fn template_containers(o: &Value, field: &str) -> String {
    arr(o, "/spec/template/spec/containers")
        .iter()
        .filter_map(|c| c.get(field).and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join(",")
}

/// `k=v,k2=v2` sorted by key, or `<none>` (labels.FormatLabels).
fn selector(map: Option<&Value>) -> String {
    let Some(m) = map.and_then(Value::as_object).filter(|m| !m.is_empty()) else {
        return "<none>".to_string();
    };
    let mut pairs: Vec<String> = m
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    pairs.sort();
    pairs.join(",")
}

/// The printer's `translateTimestampSince`: "<unknown>" without a timestamp.
fn age(ts: Option<&Value>, now: SystemTime) -> String {
    let Some(ts) = ts.and_then(Value::as_str) else {
        return "<unknown>".to_string();
    };
    let Ok(t) = humantime::parse_rfc3339_weak(ts) else {
        return "<unknown>".to_string();
    };
    match now.duration_since(t) {
        Ok(d) => human_duration(d),
        // In the future: the apiserver tolerates a second of clock skew.
        Err(e) if e.duration() < Duration::from_secs(2) => "0s".to_string(),
        Err(_) => "<invalid>".to_string(),
    }
}

/// k8s.io/apimachinery/pkg/util/duration.HumanDuration for a non-negative
/// duration: precise when short, coarser as it grows ("5m12s", "3h7m", "3d").
pub fn human_duration(d: Duration) -> String {
    let seconds = d.as_secs();
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::resources;
    use std::collections::BTreeSet;

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/apiserver-v1.24/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).expect("fixture exists")
    }

    fn fixture_json(name: &str) -> Value {
        serde_json::from_str(&fixture(name)).expect("fixture is JSON")
    }

    fn rt(group: &str, plural: &str) -> &'static ResourceType {
        resources::RESOURCES
            .iter()
            .find(|r| r.group == group && r.plural == plural)
            .expect("type in the table")
    }

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// A fixture object as stored (kind/apiVersion set), with the given
    /// creation timestamp so the age cell is predictable.
    fn stored(mut obj: Value, kind: &str, created: SystemTime) -> Arc<Value> {
        obj["kind"] = json!(kind);
        obj["apiVersion"] = json!("v1");
        obj["metadata"]["creationTimestamp"] =
            json!(humantime::format_rfc3339_seconds(created).to_string());
        Arc::new(obj)
    }

    #[test]
    fn include_object_defaults_to_metadata() {
        assert_eq!(include_object(None), IncludeObject::Metadata);
        assert_eq!(include_object(Some("limit=500")), IncludeObject::Metadata);
        assert_eq!(
            include_object(Some("includeObject=None")),
            IncludeObject::None
        );
        assert_eq!(
            include_object(Some("limit=1&includeObject=Object")),
            IncludeObject::Object
        );
    }

    #[test]
    fn human_duration_rounds_like_the_apiserver() {
        let cases = [
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (312, "5m12s"),
            (600, "10m"),
            (3 * 3600 - 1, "179m"),
            (3 * 3600 + 7 * 60, "3h7m"),
            (8 * 3600, "8h"),
            (47 * 3600, "47h"),
            (3 * 86400, "3d"),
            (3 * 86400 + 5 * 3600, "3d5h"),
            (30 * 86400, "30d"),
            (3 * 365 * 86400 + 86400, "3y1d"),
            (9 * 365 * 86400, "9y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(Duration::from_secs(secs)), want, "{secs}s");
        }
    }

    #[test]
    fn pod_table_matches_fixture() {
        let f = fixture_json("list-pods-table.body");
        let pod = fixture_json("get-pod.body");
        let created = SystemTime::now() - Duration::from_secs(340);
        let items = vec![stored(pod, "Pod", created)];
        let t = list_table(
            rt("", "pods"),
            &items,
            f["metadata"].clone(),
            IncludeObject::Metadata,
        );
        assert_eq!(keys(&t), keys(&f));
        assert_eq!(t["metadata"], f["metadata"]);
        assert_eq!(t["columnDefinitions"], f["columnDefinitions"]);
        // Same pod as the fixture's first row; only the age differs by when it ran.
        let (ours, theirs) = (&t["rows"][0], &f["rows"][0]);
        assert_eq!(ours["cells"], theirs["cells"]);
        assert_eq!(keys(ours), keys(theirs));
        assert_eq!(ours["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(ours["object"]["apiVersion"], "meta.k8s.io/v1");
        assert_eq!(
            ours["object"]["metadata"]["uid"],
            theirs["object"]["metadata"]["uid"]
        );
    }

    #[test]
    fn configmap_table_matches_fixture() {
        let f = fixture_json("list-configmaps-table.body");
        let cm = fixture_json("get-configmap.body");
        let created = SystemTime::now() - Duration::from_secs(1);
        let items = vec![stored(cm, "ConfigMap", created)];
        let t = list_table(
            rt("", "configmaps"),
            &items,
            json!({"resourceVersion": "209", "continue": null, "remainingItemCount": null}),
            IncludeObject::Metadata,
        );
        assert_eq!(t["metadata"], f["metadata"]);
        assert_eq!(t["columnDefinitions"], f["columnDefinitions"]);
        assert_eq!(t["rows"][0]["cells"], json!(["cm-a", 1, "1s"]));
        assert_eq!(keys(&t["rows"][0]), keys(&f["rows"][0]));
    }

    #[test]
    fn empty_node_table_matches_fixture() {
        let f = fixture_json("list-nodes-table-empty.body");
        let t = list_table(
            rt("", "nodes"),
            &[],
            json!({"resourceVersion": "14595"}),
            IncludeObject::Metadata,
        );
        assert_eq!(t, f);
    }

    #[test]
    fn watch_event_table_matches_fixture_shape() {
        let text = fixture("watch-table-kubectl.jsonl");
        let first: Value =
            serde_json::from_str(text.lines().next().expect("a line")).expect("JSON");
        let f = &first["object"];
        let mut obj = f["rows"][0]["object"].clone();
        obj["kind"] = json!("ConfigMap");
        obj["apiVersion"] = json!("v1");
        obj["data"] = json!({"k": "v"});
        obj["metadata"]["creationTimestamp"] =
            json!(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
        let t = event_table(rt("", "configmaps"), &obj, IncludeObject::Metadata);
        assert_eq!(keys(&t), keys(f));
        assert_eq!(t["metadata"], f["metadata"]);
        assert_eq!(t["columnDefinitions"], f["columnDefinitions"]);
        assert_eq!(t["rows"][0]["cells"], f["rows"][0]["cells"]);
        let mut later = t.clone();
        strip_column_definitions(&mut later);
        let second: Value =
            serde_json::from_str(text.lines().nth(1).expect("a line")).expect("JSON");
        assert_eq!(
            later["columnDefinitions"],
            second["object"]["columnDefinitions"]
        );
    }

    #[test]
    fn include_object_controls_the_row_object() {
        let obj = json!({"kind": "Lease", "apiVersion": "coordination.k8s.io/v1",
            "metadata": {"name": "l", "resourceVersion": "7"}, "spec": {"holderIdentity": "me"}});
        let lease = rt("coordination.k8s.io", "leases");
        let none = object_table(lease, &obj, IncludeObject::None);
        assert!(none["rows"][0].get("object").is_none());
        assert_eq!(none["rows"][0]["cells"], json!(["l", "me", "<unknown>"]));
        assert_eq!(none["metadata"], json!({"resourceVersion": "7"}));
        let full = object_table(lease, &obj, IncludeObject::Object);
        assert_eq!(full["rows"][0]["object"], obj);
    }

    #[test]
    fn every_type_has_cells_for_each_column() {
        let obj = json!({"metadata": {"name": "x", "creationTimestamp": "2020-01-01T00:00:00Z"}});
        for r in resources::RESOURCES {
            let t = object_table(r, &obj, IncludeObject::None);
            let cols = t["columnDefinitions"].as_array().expect("columns").len();
            let cells = t["rows"][0]["cells"].as_array().expect("cells").len();
            assert_eq!(cols, cells, "{}", r.plural);
        }
    }

    #[test]
    fn custom_resources_get_name_and_age_like_a_crd_without_printer_columns() {
        let def = crate::sim::crd::TypeSpec {
            group: "example.com".into(),
            version: "v1".into(),
            plural: "widgets".into(),
            singular: "widget".into(),
            kind: "Widget".into(),
            namespaced: true,
            short_names: vec![],
            categories: vec![],
            status: false,
        };
        let widgets = crate::sim::crd::intern(&def).expect("interned");
        let created = SystemTime::now() - Duration::from_secs(300);
        let obj = json!({"metadata": {"name": "w", "creationTimestamp":
            humantime::format_rfc3339_seconds(created).to_string()}});
        let t = object_table(widgets, &obj, IncludeObject::None);
        assert_eq!(t["rows"][0]["cells"], json!(["w", "5m"]));
        assert_eq!(t["columnDefinitions"][1]["name"], "Age");
        assert_eq!(t["columnDefinitions"][1]["type"], "date");
    }

    #[test]
    fn types_without_a_printer_get_name_and_created_at() {
        let obj = json!({"metadata": {"name": "x", "creationTimestamp": "2020-01-01T00:00:00Z"}});
        let t = object_table(
            rt("authentication.k8s.io", "tokenreviews"),
            &obj,
            IncludeObject::None,
        );
        assert_eq!(t["rows"][0]["cells"], json!(["x", "2020-01-01T00:00:00Z"]));
        assert_eq!(t["columnDefinitions"][1]["type"], "date");
    }

    #[test]
    fn node_and_service_cells_follow_the_printers() {
        let node = json!({"metadata": {"name": "n1", "labels": {"node-role.kubernetes.io/control-plane": ""}},
            "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                "nodeInfo": {"kubeletVersion": "v1.32.0"}}});
        let t = object_table(rt("", "nodes"), &node, IncludeObject::None);
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "n1",
                "Ready,SchedulingDisabled",
                "control-plane",
                "<unknown>",
                "v1.32.0",
                "10.0.0.1",
                "<none>",
                "<unknown>",
                "<unknown>",
                "<unknown>"
            ])
        );
        let svc = json!({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
            "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}],
            "selector": {"b": "2", "a": "1"}}});
        let t = object_table(rt("", "services"), &svc, IncludeObject::None);
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "s",
                "NodePort",
                "10.96.0.10",
                "<none>",
                "80:30080/TCP,53/UDP",
                "<unknown>",
                "a=1,b=2"
            ])
        );
    }
}
