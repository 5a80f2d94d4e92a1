//! Decodes Kubernetes protobuf request bodies for the few built-in types
//! kubectl writes with its typed clients.
//!
//! Since client-go 1.31 the typed clientset sends bodies as
//! `application/vnd.kubernetes.protobuf` (kubectl create configmap/secret/
//! namespace/serviceaccount/role/clusterrole/rolebinding/clusterrolebinding,
//! `kubectl create token`, `kubectl auth whoami`, `kubectl auth can-i`), with
//! no JSON fallback. kube-sim stores JSON, so it
//! turns those bodies into the JSON the same client would have sent: the
//! `k8s\0` envelope (runtime.Unknown: typeMeta, raw) around the object's
//! protobuf message, decoded with a hand-written schema per type (field
//! numbers from k8s.io/api's generated.proto). Responses stay JSON, which
//! those clients also accept. Unknown fields are skipped; a kind without a
//! schema is refused so the caller can answer 415.

use serde_json::{Map, Value};

/// The content type of a protobuf body.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// The envelope prefix of every Kubernetes protobuf body.
const MAGIC: &[u8] = b"k8s\0";

/// Why a protobuf body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("protobuf body does not start with the k8s envelope")]
    NoEnvelope,
    #[error("truncated or malformed protobuf")]
    Malformed,
    #[error("kube-sim cannot decode protobuf for kind {0:?}; send JSON")]
    UnknownKind(String),
}

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Bool,
    Int,
    /// meta/v1 Time {seconds, nanos}, RFC 3339 in JSON (null when empty).
    Time,
    Msg(&'static [Field]),
    MapStr,
    MapBytes,
    RepStr,
    RepMsg(&'static [Field]),
}

struct Field {
    num: u64,
    name: &'static str,
    kind: Kind,
}

const fn f(num: u64, name: &'static str, kind: Kind) -> Field {
    Field { num, name, kind }
}

const OWNER_REFERENCE: &[Field] = &[
    f(5, "apiVersion", Kind::Str),
    f(1, "kind", Kind::Str),
    f(3, "name", Kind::Str),
    f(4, "uid", Kind::Str),
    f(6, "controller", Kind::Bool),
    f(7, "blockOwnerDeletion", Kind::Bool),
];

const OBJECT_META: &[Field] = &[
    f(1, "name", Kind::Str),
    f(2, "generateName", Kind::Str),
    f(3, "namespace", Kind::Str),
    f(5, "uid", Kind::Str),
    f(6, "resourceVersion", Kind::Str),
    f(7, "generation", Kind::Int),
    f(8, "creationTimestamp", Kind::Time),
    f(11, "labels", Kind::MapStr),
    f(12, "annotations", Kind::MapStr),
    f(13, "ownerReferences", Kind::RepMsg(OWNER_REFERENCE)),
    f(14, "finalizers", Kind::RepStr),
];

const META: Field = f(1, "metadata", Kind::Msg(OBJECT_META));

const CONFIG_MAP: &[Field] = &[
    META,
    f(2, "data", Kind::MapStr),
    f(3, "binaryData", Kind::MapBytes),
    f(4, "immutable", Kind::Bool),
];

const SECRET: &[Field] = &[
    META,
    f(2, "data", Kind::MapBytes),
    f(3, "type", Kind::Str),
    f(4, "stringData", Kind::MapStr),
    f(5, "immutable", Kind::Bool),
];

const NAMESPACE: &[Field] = &[
    META,
    f(2, "spec", Kind::Msg(&[f(1, "finalizers", Kind::RepStr)])),
    f(3, "status", Kind::Msg(&[f(1, "phase", Kind::Str)])),
];

const OBJECT_REFERENCE: &[Field] = &[
    f(1, "kind", Kind::Str),
    f(2, "namespace", Kind::Str),
    f(3, "name", Kind::Str),
    f(4, "uid", Kind::Str),
    f(5, "apiVersion", Kind::Str),
    f(6, "resourceVersion", Kind::Str),
    f(7, "fieldPath", Kind::Str),
];

const SERVICE_ACCOUNT: &[Field] = &[
    META,
    f(2, "secrets", Kind::RepMsg(OBJECT_REFERENCE)),
    f(
        3,
        "imagePullSecrets",
        Kind::RepMsg(&[f(1, "name", Kind::Str)]),
    ),
    f(4, "automountServiceAccountToken", Kind::Bool),
];

const TOKEN_REQUEST: &[Field] = &[
    META,
    f(
        2,
        "spec",
        Kind::Msg(&[
            f(1, "audiences", Kind::RepStr),
            f(4, "expirationSeconds", Kind::Int),
            f(
                3,
                "boundObjectRef",
                Kind::Msg(&[
                    f(1, "kind", Kind::Str),
                    f(2, "apiVersion", Kind::Str),
                    f(3, "name", Kind::Str),
                    f(4, "uid", Kind::Str),
                ]),
            ),
        ]),
    ),
];

const TOKEN_REVIEW: &[Field] = &[
    META,
    f(
        2,
        "spec",
        Kind::Msg(&[f(1, "token", Kind::Str), f(2, "audiences", Kind::RepStr)]),
    ),
];

const SELF_SUBJECT_REVIEW: &[Field] = &[META];

const RESOURCE_ATTRIBUTES: &[Field] = &[
    f(1, "namespace", Kind::Str),
    f(2, "verb", Kind::Str),
    f(3, "group", Kind::Str),
    f(4, "version", Kind::Str),
    f(5, "resource", Kind::Str),
    f(6, "subresource", Kind::Str),
    f(7, "name", Kind::Str),
    // Selectors (1.31+) are decoded so the review echoes them; kube-sim's
    // RBAC ignores them, as RBAC does.
    f(8, "fieldSelector", Kind::Msg(SELECTOR_ATTRIBUTES)),
    f(9, "labelSelector", Kind::Msg(SELECTOR_ATTRIBUTES)),
];

/// FieldSelectorAttributes and LabelSelectorAttributes share field numbers.
const SELECTOR_ATTRIBUTES: &[Field] = &[
    f(1, "rawSelector", Kind::Str),
    f(
        2,
        "requirements",
        Kind::RepMsg(&[
            f(1, "key", Kind::Str),
            f(2, "operator", Kind::Str),
            f(3, "values", Kind::RepStr),
        ]),
    ),
];

/// rbac/v1 PolicyRule.
const POLICY_RULE: &[Field] = &[
    f(1, "verbs", Kind::RepStr),
    f(2, "apiGroups", Kind::RepStr),
    f(3, "resources", Kind::RepStr),
    f(4, "resourceNames", Kind::RepStr),
    f(5, "nonResourceURLs", Kind::RepStr),
];

const LABEL_SELECTOR_REQUIREMENT: &[Field] = &[
    f(1, "key", Kind::Str),
    f(2, "operator", Kind::Str),
    f(3, "values", Kind::RepStr),
];

const LABEL_SELECTOR: &[Field] = &[
    f(1, "matchLabels", Kind::MapStr),
    f(
        2,
        "matchExpressions",
        Kind::RepMsg(LABEL_SELECTOR_REQUIREMENT),
    ),
];

const ROLE: &[Field] = &[META, f(2, "rules", Kind::RepMsg(POLICY_RULE))];

const CLUSTER_ROLE: &[Field] = &[
    META,
    f(2, "rules", Kind::RepMsg(POLICY_RULE)),
    f(
        3,
        "aggregationRule",
        Kind::Msg(&[f(1, "clusterRoleSelectors", Kind::RepMsg(LABEL_SELECTOR))]),
    ),
];

const SUBJECT: &[Field] = &[
    f(1, "kind", Kind::Str),
    f(2, "apiGroup", Kind::Str),
    f(3, "name", Kind::Str),
    f(4, "namespace", Kind::Str),
];

const ROLE_REF: &[Field] = &[
    f(1, "apiGroup", Kind::Str),
    f(2, "kind", Kind::Str),
    f(3, "name", Kind::Str),
];

/// RoleBinding and ClusterRoleBinding have the same fields.
const BINDING: &[Field] = &[
    META,
    f(2, "subjects", Kind::RepMsg(SUBJECT)),
    f(3, "roleRef", Kind::Msg(ROLE_REF)),
];

const NON_RESOURCE_ATTRIBUTES: &[Field] = &[f(1, "path", Kind::Str), f(2, "verb", Kind::Str)];

const SELF_SUBJECT_ACCESS_REVIEW: &[Field] = &[
    META,
    f(
        2,
        "spec",
        Kind::Msg(&[
            f(1, "resourceAttributes", Kind::Msg(RESOURCE_ATTRIBUTES)),
            f(
                2,
                "nonResourceAttributes",
                Kind::Msg(NON_RESOURCE_ATTRIBUTES),
            ),
        ]),
    ),
];

const SUBJECT_ACCESS_REVIEW: &[Field] = &[
    META,
    f(
        2,
        "spec",
        Kind::Msg(&[
            f(1, "resourceAttributes", Kind::Msg(RESOURCE_ATTRIBUTES)),
            f(
                2,
                "nonResourceAttributes",
                Kind::Msg(NON_RESOURCE_ATTRIBUTES),
            ),
            f(3, "user", Kind::Str),
            f(4, "groups", Kind::RepStr),
            f(6, "uid", Kind::Str),
        ]),
    ),
];

fn schema(kind: &str) -> Option<&'static [Field]> {
    Some(match kind {
        "ConfigMap" => CONFIG_MAP,
        "Secret" => SECRET,
        "Namespace" => NAMESPACE,
        "ServiceAccount" => SERVICE_ACCOUNT,
        "TokenRequest" => TOKEN_REQUEST,
        "TokenReview" => TOKEN_REVIEW,
        "SelfSubjectReview" => SELF_SUBJECT_REVIEW,
        "SelfSubjectAccessReview" => SELF_SUBJECT_ACCESS_REVIEW,
        "SubjectAccessReview" => SUBJECT_ACCESS_REVIEW,
        "Role" => ROLE,
        "ClusterRole" => CLUSTER_ROLE,
        "RoleBinding" | "ClusterRoleBinding" => BINDING,
        _ => return None,
    })
}

/// Whether a Content-Type (without parameters, lower case) is protobuf.
pub fn is_protobuf(content_type: &str) -> bool {
    content_type == CONTENT_TYPE
}

/// Decodes an enveloped protobuf body into the object's JSON form
/// (with kind/apiVersion from the envelope).
pub fn decode(body: &[u8]) -> Result<Value, ProtoError> {
    let envelope = body.strip_prefix(MAGIC).ok_or(ProtoError::NoEnvelope)?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for item in Reader(envelope) {
        match item? {
            (1, Wire::Len(type_meta)) => {
                for tm in Reader(type_meta) {
                    match tm? {
                        (1, Wire::Len(v)) => api_version = utf8(v)?,
                        (2, Wire::Len(v)) => kind = utf8(v)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Len(v)) => raw = v,
            _ => {}
        }
    }
    let fields = schema(&kind).ok_or_else(|| ProtoError::UnknownKind(kind.clone()))?;
    let mut obj = message(raw, fields)?;
    obj.insert("apiVersion".to_string(), Value::String(api_version));
    obj.insert("kind".to_string(), Value::String(kind));
    Ok(Value::Object(obj))
}

/// One protobuf message as JSON. Zero values are left out, as the JSON
/// encoder's `omitempty` would (gogo protobuf writes them explicitly).
fn message(buf: &[u8], fields: &[Field]) -> Result<Map<String, Value>, ProtoError> {
    let mut out = Map::new();
    for item in Reader(buf) {
        let (num, wire) = item?;
        let Some(field) = fields.iter().find(|fd| fd.num == num) else {
            continue;
        };
        let name = field.name.to_string();
        match (field.kind, wire) {
            (Kind::Str, Wire::Len(v)) => {
                if !v.is_empty() {
                    out.insert(name, Value::String(utf8(v)?));
                }
            }
            (Kind::Bool, Wire::Varint(v)) => {
                out.insert(name, Value::Bool(v != 0));
            }
            (Kind::Int, Wire::Varint(v)) => {
                if v != 0 {
                    // int64 fields are two's complement varints.
                    out.insert(name, Value::from(v as i64));
                }
            }
            (Kind::Time, Wire::Len(v)) => {
                out.insert(name, time(v)?);
            }
            (Kind::Msg(inner), Wire::Len(v)) => {
                out.insert(name, Value::Object(message(v, inner)?));
            }
            (Kind::MapStr | Kind::MapBytes, Wire::Len(v)) => {
                let (key, value) = map_entry(v, matches!(field.kind, Kind::MapBytes))?;
                let entry = out.entry(name).or_insert_with(|| Value::Object(Map::new()));
                if let Some(m) = entry.as_object_mut() {
                    m.insert(key, value);
                }
            }
            (Kind::RepStr, Wire::Len(v)) => push(&mut out, name, Value::String(utf8(v)?)),
            (Kind::RepMsg(inner), Wire::Len(v)) => {
                push(&mut out, name, Value::Object(message(v, inner)?));
            }
            _ => return Err(ProtoError::Malformed),
        }
    }
    Ok(out)
}

fn push(out: &mut Map<String, Value>, name: String, v: Value) {
    let entry = out.entry(name).or_insert_with(|| Value::Array(Vec::new()));
    if let Some(a) = entry.as_array_mut() {
        a.push(v);
    }
}

fn map_entry(buf: &[u8], bytes_value: bool) -> Result<(String, Value), ProtoError> {
    let mut key = String::new();
    let mut value = Value::String(String::new());
    for item in Reader(buf) {
        match item? {
            (1, Wire::Len(v)) => key = utf8(v)?,
            (2, Wire::Len(v)) => {
                value = Value::String(if bytes_value { base64(v) } else { utf8(v)? });
            }
            _ => {}
        }
    }
    Ok((key, value))
}

fn time(buf: &[u8]) -> Result<Value, ProtoError> {
    let mut seconds = 0i64;
    for item in Reader(buf) {
        if let (1, Wire::Varint(v)) = item? {
            seconds = v as i64;
        }
    }
    if seconds <= 0 {
        return Ok(Value::Null);
    }
    Ok(Value::String(super::auth::format_timestamp(
        seconds.unsigned_abs(),
    )))
}

fn utf8(v: &[u8]) -> Result<String, ProtoError> {
    String::from_utf8(v.to_vec()).map_err(|_| ProtoError::Malformed)
}

/// A protobuf field value by wire type.
enum Wire<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Fixed,
}

/// Iterates the (field number, value) pairs of a message.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, ProtoError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first().ok_or(ProtoError::Malformed)?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ProtoError::Malformed)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.0.len() {
            return Err(ProtoError::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn field(&mut self) -> Result<(u64, Wire<'a>), ProtoError> {
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| ProtoError::Malformed)?;
                Wire::Len(self.take(n)?)
            }
            5 => {
                self.take(4)?;
                Wire::Fixed
            }
            _ => return Err(ProtoError::Malformed),
        };
        Ok((key >> 3, wire))
    }
}

impl<'a> Iterator for Reader<'a> {
    type Item = Result<(u64, Wire<'a>), ProtoError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let item = self.field();
        if item.is_err() {
            // Stop after the first error.
            self.0 = &[];
        }
        Some(item)
    }
}

/// Standard base64 with padding (how JSON carries `[]byte`).
fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn len_field(num: u64, body: &[u8]) -> Vec<u8> {
        let mut out = vec![((num << 3) | 2) as u8, body.len() as u8];
        out.extend_from_slice(body);
        out
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut tm = len_field(1, api_version.as_bytes());
        tm.extend(len_field(2, kind.as_bytes()));
        let mut unknown = len_field(1, &tm);
        unknown.extend(len_field(2, raw));
        let mut out = MAGIC.to_vec();
        out.extend(unknown);
        out
    }

    #[test]
    fn a_configmap_decodes_to_its_json_form() {
        // metadata {name: "x", generateName: "", creationTimestamp: {}} data {a: b}
        let mut meta = len_field(1, b"x");
        meta.extend(len_field(2, b""));
        meta.extend(len_field(8, b""));
        let mut raw = len_field(1, &meta);
        let mut entry = len_field(1, b"a");
        entry.extend(len_field(2, b"b"));
        raw.extend(len_field(2, &entry));
        let v = decode(&envelope("v1", "ConfigMap", &raw)).expect("decode");
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "x", "creationTimestamp": null},
                   "data": {"a": "b"}})
        );
    }

    #[test]
    fn token_request_expiration_is_a_varint() {
        let mut spec = len_field(1, b"aud-1");
        spec.extend([4 << 3, 0x90, 0x1c]); // 3600
        let mut raw = len_field(1, &[]);
        raw.extend(len_field(2, &spec));
        let v =
            decode(&envelope("authentication.k8s.io/v1", "TokenRequest", &raw)).expect("decode");
        assert_eq!(
            v["spec"],
            json!({"audiences": ["aud-1"], "expirationSeconds": 3600})
        );
    }

    #[test]
    fn a_role_binding_decodes_subjects_and_role_ref() {
        let mut subject = len_field(1, b"ServiceAccount");
        subject.extend(len_field(3, b"viewer"));
        subject.extend(len_field(4, b"demo"));
        let mut role_ref = len_field(1, b"rbac.authorization.k8s.io");
        role_ref.extend(len_field(2, b"Role"));
        role_ref.extend(len_field(3, b"pod-reader"));
        let mut raw = len_field(1, &len_field(1, b"rb"));
        raw.extend(len_field(2, &subject));
        raw.extend(len_field(3, &role_ref));
        let v = decode(&envelope(
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            &raw,
        ))
        .expect("decode");
        assert_eq!(
            v,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "rb"},
                   "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": "demo"}],
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"}})
        );
    }

    #[test]
    fn a_role_decodes_its_rules() {
        let mut rule = len_field(1, b"get");
        rule.extend(len_field(1, b"list"));
        rule.extend(len_field(2, b""));
        rule.extend(len_field(3, b"pods"));
        let mut raw = len_field(1, &len_field(1, b"r"));
        raw.extend(len_field(2, &rule));
        let v = decode(&envelope("rbac.authorization.k8s.io/v1", "Role", &raw)).expect("decode");
        assert_eq!(
            v["rules"],
            json!([{"verbs": ["get", "list"], "apiGroups": [""], "resources": ["pods"]}])
        );
    }

    #[test]
    fn unknown_kinds_and_garbage_are_refused() {
        assert_eq!(
            decode(&envelope("v1", "Pod", &[])),
            Err(ProtoError::UnknownKind("Pod".to_string()))
        );
        assert_eq!(decode(b"{}"), Err(ProtoError::NoEnvelope));
        assert_eq!(decode(b"k8s\0\x0a\x05ab"), Err(ProtoError::Malformed));
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(b"fooba"), "Zm9vYmE=");
    }
}
