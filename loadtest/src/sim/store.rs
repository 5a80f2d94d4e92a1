//! kube-sim's object store: etcd plus the apiserver's watch cache, in memory.
//!
//! One global resourceVersion counter (like etcd's revision) orders every
//! write. Each resource type has its own mutex guarding its objects (a
//! `BTreeMap` keyed by namespace/name, so lists come out in etcd key order),
//! a bounded window of recent changes (for watch-from-RV, paginated lists and
//! `resourceVersionMatch=Exact`) and its watchers. A write allocates its RV,
//! appends to the window and fans out to the watchers inside one critical
//! section, so each watcher sees strictly increasing RVs with no gaps or
//! duplicates, and a watch registered under the same lock continues exactly
//! where its initial events end. The store is synchronous: no lock is ever
//! held across an `.await` (watchers get events through bounded channels with
//! `try_send`; a full queue closes that watcher, like the apiserver closing a
//! slow watcher, and the client re-watches from its last RV).
//!
//! Custom resources: the types a CRD defines (see [`crd`](crate::sim::crd))
//! are registered per store, under the CRD type's lock, before the CRD write
//! commits; their states live in an `RwLock`ed map beside the fixed map of
//! built-in types (whose lookups take no lock). A CRD's versions share one
//! state, each reader and watcher getting objects in its own version.
//!
//! Lock order: a write never holds two type locks at once (a namespaced create
//! checks its namespace first, then takes its own type's lock; creating a
//! Namespace creates its "default" ServiceAccount after releasing the lock),
//! except a CRD write, which holds the CRD type's lock, then briefly the
//! custom-type registry, then (deleting a CRD's objects) that type's lock;
//! nothing takes these the other way round.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::sim::crd;
use crate::sim::resources::{self, RESOURCES, ResourceType, SelfSubjectReviewVersion};
use crate::sim::selectors::{FieldSelector, LabelSelector, is_dns1123_subdomain};

mod patch;

/// A resourceVersion as the apiserver's integers (opaque strings to clients).
pub type Rv = u64;

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
    Bookmark,
}

impl EventType {
    /// The `type` field of the watch event JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
            EventType::Bookmark => "BOOKMARK",
        }
    }
}

/// One watch event. `object` is the full object with metadata.resourceVersion == rv.
/// DELETED carries the last state with the deletion's RV. Selector transitions follow
/// KUBE-SEMANTICS.md: leaving the selector = DELETED carrying the OLD object with the NEW rv;
/// entering = ADDED. BOOKMARK object = {"kind":K,"apiVersion":V,"metadata":{"resourceVersion":"N"}}
/// (+ annotations {"k8s.io/initial-events-end":"true"} for the end of initial events).
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventType,
    pub object: Arc<Value>,
    pub rv: Rv,
}

/// Parsed list/watch query options.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub label_selector: LabelSelector,
    pub field_selector: FieldSelector,
    /// Raw `resourceVersion` query value; None = unset.
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub send_initial_events: Option<bool>,
    pub allow_bookmarks: bool,
    pub timeout_seconds: Option<u64>,
    pub watch: bool,
}

fn parse_bool(name: &str, v: &str) -> Result<bool, StoreError> {
    match v {
        "true" | "1" | "t" | "T" | "TRUE" | "True" => Ok(true),
        "false" | "0" | "f" | "F" | "FALSE" | "False" | "" => Ok(false),
        _ => Err(StoreError::BadRequest(format!(
            "failed to parse {name}: strconv.ParseBool: parsing \"{v}\": invalid syntax"
        ))),
    }
}

fn parse_int(name: &str, v: &str) -> Result<i64, StoreError> {
    v.parse::<i64>().map_err(|_| {
        StoreError::BadRequest(format!(
            "failed to parse {name}: strconv.ParseInt: parsing \"{v}\": invalid syntax"
        ))
    })
}

impl ListOptions {
    /// Parses a raw query string (no leading '?'). Bad selectors, unsupported field labels
    /// for `rt` (400 "field label not supported: X", see fixtures/error-400-bad-fieldselector),
    /// bad numbers -> StoreError::BadRequest.
    pub fn from_query(rt: &ResourceType, query: &str) -> Result<ListOptions, StoreError> {
        let mut o = ListOptions::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "labelSelector" => {
                    o.label_selector =
                        LabelSelector::parse(&v).map_err(|e| StoreError::BadRequest(e.0))?;
                }
                "fieldSelector" => {
                    o.field_selector = FieldSelector::parse_for(rt.kind, &v)
                        .map_err(|e| StoreError::BadRequest(e.0))?;
                }
                "resourceVersion" => o.resource_version = Some(v.into_owned()),
                "resourceVersionMatch" if !v.is_empty() => {
                    o.resource_version_match = Some(v.into_owned());
                }
                "limit" => {
                    let n = parse_int("limit", &v)?;
                    // limit <= 0 means "no limit", as in the apiserver.
                    o.limit = usize::try_from(n).ok().filter(|n| *n > 0);
                }
                "continue" if !v.is_empty() => {
                    o.continue_token = Some(v.into_owned());
                }
                "sendInitialEvents" => {
                    o.send_initial_events = Some(parse_bool("sendInitialEvents", &v)?)
                }
                "allowWatchBookmarks" => o.allow_bookmarks = parse_bool("allowWatchBookmarks", &v)?,
                "timeoutSeconds" => {
                    let n = parse_int("timeoutSeconds", &v)?;
                    o.timeout_seconds = u64::try_from(n).ok();
                }
                "watch" => o.watch = !matches!(v.as_ref(), "false" | "0"),
                _ => {}
            }
        }
        if let Some(m) = &o.resource_version_match
            && m != "Exact"
            && m != "NotOlderThan"
        {
            return Err(StoreError::BadRequest(format!(
                "resourceVersionMatch: Unsupported value: \"{m}\": supported values: \"Exact\", \"NotOlderThan\""
            )));
        }
        Ok(o)
    }
}

/// One page of a LIST.
#[derive(Debug)]
pub struct ListResult {
    pub items: Vec<Arc<Value>>,
    pub resource_version: Rv,
    pub continue_token: Option<String>,
    pub remaining_item_count: Option<u64>,
}

/// An open watch.
pub struct Watch {
    /// Events to send first: synthetic ADDED (rv unset/"0"), or the replay from the window
    /// (rv=N), already selector-filtered; when send_initial_events=true and allow_bookmarks,
    /// ends with the initial-events-end BOOKMARK.
    pub initial: Vec<Event>,
    /// Live events after `initial`, filtered with transition rules. Closed when the store ends
    /// the watch (close_watches hook, slow consumer whose bounded queue overflowed, shutdown).
    pub rx: mpsc::Receiver<Event>,
    shared: Arc<Shared>,
    rt: &'static ResourceType,
    id: u64,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("resource", &self.rt.plural)
            .field("id", &self.id)
            .field("initial", &self.initial.len())
            .finish()
    }
}

impl Watch {
    /// Ask the store to queue a BOOKMARK with the current RV into THIS watch's queue, in order
    /// with its other events (no-op unless allow_bookmarks). Used before the timeout.
    pub fn request_bookmark(&self) {
        let Ok(slot) = self.shared.slot(self.rt) else {
            return;
        };
        let mut ts = slot.lock();
        let rv = self.shared.rv.load(Ordering::SeqCst);
        let bookmark = Event {
            kind: EventType::Bookmark,
            object: Arc::new(bookmark_object(self.rt, rv, false)),
            rv,
        };
        let id = self.id;
        ts.watchers.retain(|w| {
            if w.id != id || !w.allow_bookmarks {
                return true;
            }
            w.tx.try_send(bookmark.clone()).is_ok()
        });
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let id = self.id;
        // A custom type whose CRD is gone took its watchers with it.
        if let Ok(slot) = self.shared.slot(self.rt) {
            slot.lock().watchers.retain(|w| w.id != id);
        }
    }
}

/// Why a store operation failed; `to_status` renders the apiserver's Status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// 404. `resource` is `plural` or `plural.group` (as in the apiserver's message).
    #[error("{resource} \"{name}\" not found")]
    NotFound { resource: String, name: String },
    /// 409 on create of an existing name.
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists { resource: String, name: String },
    /// 409 on update with a stale metadata.resourceVersion.
    #[error(
        "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
    )]
    Conflict { resource: String, name: String },
    /// 409 for a write the object's state refuses (`why`), as
    /// `errors.NewConflict(resource, name, why)` (pods/binding of a bound pod).
    #[error("Operation cannot be fulfilled on {resource} \"{name}\": {why}")]
    Refused {
        resource: String,
        name: String,
        why: String,
    },
    /// 422. `message` is `field: Invalid value: ...` / `field: Required value: ...`.
    #[error("{kind} \"{name}\" is invalid: {message}")]
    Invalid {
        kind: String,
        name: String,
        message: String,
    },
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 410: a watch or exact list from an RV older than the retained window.
    #[error("too old resource version: {requested} ({oldest})")]
    Expired { requested: Rv, oldest: Rv },
    /// 410: a continue token whose RV is no longer reconstructible.
    #[error(
        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list."
    )]
    ContinueExpired,
    /// 404 for a namespaced create into a missing namespace.
    #[error("namespaces \"{0}\" not found")]
    NamespaceNotFound(String),
    /// 404: a custom resource type whose CRD is gone (or was never created
    /// in this kube-sim), as the apiserver answers an unknown resource.
    #[error("the server could not find the requested resource")]
    NotServed,
}

/// `details` of a Status naming a resource: `plural.group` splits into kind + group.
fn resource_details(resource: &str, name: &str) -> Value {
    let mut d = Map::new();
    d.insert("name".into(), Value::String(name.to_string()));
    match resource.split_once('.') {
        Some((plural, group)) => {
            d.insert("group".into(), Value::String(group.to_string()));
            d.insert("kind".into(), Value::String(plural.to_string()));
        }
        None => {
            d.insert("kind".into(), Value::String(resource.to_string()));
        }
    }
    Value::Object(d)
}

impl StoreError {
    /// The HTTP status code.
    pub fn code(&self) -> u16 {
        match self {
            StoreError::NotFound { .. }
            | StoreError::NamespaceNotFound(_)
            | StoreError::NotServed => 404,
            StoreError::AlreadyExists { .. }
            | StoreError::Conflict { .. }
            | StoreError::Refused { .. } => 409,
            StoreError::Invalid { .. } => 422,
            StoreError::BadRequest(_) => 400,
            StoreError::Expired { .. } | StoreError::ContinueExpired => 410,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. }
            | StoreError::NamespaceNotFound(_)
            | StoreError::NotServed => "NotFound",
            StoreError::AlreadyExists { .. } => "AlreadyExists",
            StoreError::Conflict { .. } | StoreError::Refused { .. } => "Conflict",
            StoreError::Invalid { .. } => "Invalid",
            StoreError::BadRequest(_) => "BadRequest",
            StoreError::Expired { .. } | StoreError::ContinueExpired => "Expired",
        }
    }

    /// The Status object exactly as the apiserver shapes it (see fixtures/error-*.body).
    pub fn to_status(&self) -> Value {
        let details = match self {
            StoreError::NotFound { resource, name }
            | StoreError::AlreadyExists { resource, name }
            | StoreError::Conflict { resource, name }
            | StoreError::Refused { resource, name, .. } => Some(resource_details(resource, name)),
            StoreError::NamespaceNotFound(ns) => Some(resource_details("namespaces", ns)),
            StoreError::Invalid {
                kind,
                name,
                message,
            } => {
                let (field, cause) = message.split_once(": ").unwrap_or(("", message.as_str()));
                let reason = if cause.starts_with("Required value") {
                    "FieldValueRequired"
                } else if cause.starts_with("Unsupported value") {
                    "FieldValueNotSupported"
                } else {
                    "FieldValueInvalid"
                };
                Some(json!({
                    "name": name,
                    "kind": kind,
                    "causes": [{"reason": reason, "message": cause, "field": field}],
                }))
            }
            StoreError::NotServed => Some(json!({})),
            StoreError::BadRequest(_)
            | StoreError::Expired { .. }
            | StoreError::ContinueExpired => None,
        };
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        if let (Some(d), Some(obj)) = (details, s.as_object_mut()) {
            obj.insert("details".into(), d);
        }
        s
    }
}

/// How a PATCH body is applied.
#[derive(Debug, Clone, Copy)]
pub enum PatchKind {
    /// RFC 7386 JSON merge patch.
    Merge,
    /// Treated as a JSON merge patch, after removing the `$patch`-style directives.
    StrategicMerge,
    /// RFC 6902 JSON patch.
    Json,
}

/// (namespace or "" for cluster-scoped, name): the etcd key order.
/// (namespace, name); "" namespace for cluster-scoped objects. Ordered as
/// etcd orders the apiserver's storage keys `…/<namespace>/<name>`: byte
/// order of `namespace + "/" + name`, so namespace `a-b` (`-` < `/`) sorts
/// before `a`. LISTs and initial watch events come in this order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key(String, String);

impl Ord for Key {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        use std::cmp::Ordering::Equal;
        let (a, b) = (self.0.as_bytes(), o.0.as_bytes());
        let n = a.len().min(b.len());
        match a[..n].cmp(&b[..n]) {
            Equal if a.len() == b.len() => self.1.cmp(&o.1),
            // One namespace is a prefix of the other: the shorter one goes on with '/'.
            Equal if a.len() < b.len() => b'/'.cmp(&b[n]),
            Equal => a[n].cmp(&b'/'),
            other => other,
        }
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// One committed change, retained in the type's window.
struct Change {
    rv: Rv,
    key: Key,
    /// State before (None for a create).
    old: Option<Arc<Value>>,
    /// State after (None for a delete).
    new: Option<Arc<Value>>,
    /// `old` re-stamped with this change's RV: what DELETED carries (for a
    /// delete, and for an update that leaves a watcher's selector). Built at
    /// most once, lazily, as most updates never need it.
    old_at_rv: OnceLock<Arc<Value>>,
}

impl Change {
    fn old_at_rv(&self) -> Option<Arc<Value>> {
        let old = self.old.as_ref()?;
        Some(
            self.old_at_rv
                .get_or_init(|| Arc::new(with_rv(old, self.rv)))
                .clone(),
        )
    }
}

/// A registered watcher: its filter and its bounded queue.
struct Watcher {
    id: u64,
    /// The type (version) watched: a custom type's versions share one
    /// `TypeState`, and each watcher gets objects in its own version.
    rt: &'static ResourceType,
    namespace: Option<String>,
    label: LabelSelector,
    field: FieldSelector,
    allow_bookmarks: bool,
    /// Bounded; a full queue removes the watcher (its receiver then ends).
    tx: mpsc::Sender<Event>,
}

impl Watcher {
    fn sees(&self, key: &Key) -> bool {
        self.namespace.as_deref().is_none_or(|ns| key.0 == ns)
    }
}

/// Whether an object passes a label + field selector pair.
fn selected(label: &LabelSelector, field: &FieldSelector, obj: &Value) -> bool {
    label.matches(obj) && field.matches(obj)
}

/// The event a watcher with these selectors gets for `c` (transition rules).
fn transition(c: &Change, label: &LabelSelector, field: &FieldSelector) -> Option<Event> {
    let m = |o: &Arc<Value>| selected(label, field, o);
    let (kind, object) = match (&c.old, &c.new) {
        (None, Some(n)) => (EventType::Added, m(n).then(|| n.clone())?),
        (Some(o), Some(n)) => match (m(o), m(n)) {
            (true, true) => (EventType::Modified, n.clone()),
            (false, true) => (EventType::Added, n.clone()),
            (true, false) => (EventType::Deleted, c.old_at_rv()?),
            (false, false) => return None,
        },
        (Some(o), None) => (EventType::Deleted, m(o).then(|| c.old_at_rv())??),
        (None, None) => return None,
    };
    Some(Event {
        kind,
        object,
        rv: c.rv,
    })
}

/// State of one resource type.
struct TypeState {
    objects: BTreeMap<Key, Arc<Value>>,
    /// The keys of the objects on each node (`spec.nodeName`), like the
    /// v1.24 cacher's `f:spec.nodeName` index of pods: a node's pods are
    /// listed without scanning the others.
    by_node: HashMap<String, BTreeSet<Key>>,
    window: VecDeque<Change>,
    /// Set once any change was dropped from the window (or compacted): the
    /// highest dropped RV (or the RV at compaction).
    dropped: Option<Rv>,
    watchers: Vec<Watcher>,
}

impl TypeState {
    fn new() -> TypeState {
        TypeState {
            objects: BTreeMap::new(),
            by_node: HashMap::new(),
            window: VecDeque::new(),
            dropped: None,
            watchers: Vec::new(),
        }
    }

    /// The lowest RV from which the window replays completely (the
    /// apiserver's `oldest-1`); None when nothing was ever dropped.
    fn oldest_servable(&self) -> Option<Rv> {
        let dropped = self.dropped?;
        Some(
            self.window
                .front()
                .map(|c| c.rv.saturating_sub(1).max(dropped))
                .unwrap_or(dropped),
        )
    }

    fn check_not_expired(&self, requested: Rv) -> Result<(), StoreError> {
        match self.oldest_servable() {
            Some(oldest) if requested < oldest => Err(StoreError::Expired { requested, oldest }),
            _ => Ok(()),
        }
    }

    /// The objects as they were at `rv` (undoing newer changes in the window).
    /// The caller checked `rv` is servable.
    fn snapshot_at(&self, rv: Rv) -> std::borrow::Cow<'_, BTreeMap<Key, Arc<Value>>> {
        if self.window.back().is_none_or(|c| c.rv <= rv) {
            return std::borrow::Cow::Borrowed(&self.objects);
        }
        let mut objects = self.objects.clone();
        for c in self.window.iter().rev().take_while(|c| c.rv > rv) {
            match &c.old {
                Some(o) => {
                    objects.insert(c.key.clone(), o.clone());
                }
                None => {
                    objects.remove(&c.key);
                }
            }
        }
        std::borrow::Cow::Owned(objects)
    }
}

struct Shared {
    /// The global revision; only advanced under the lock of the type written,
    /// so within one type RVs are allocated in commit order.
    rv: AtomicU64,
    next_watcher: AtomicU64,
    /// The built-in types' states, fixed at construction: read without a lock.
    types: HashMap<(&'static str, &'static str), Mutex<TypeState>>,
    /// The custom resource types this kube-sim's CRDs define (per instance:
    /// several kube-sims in one process must not see each other's CRDs).
    custom: RwLock<CustomTypes>,
    /// The built-in types served ([`resources::builtin`]).
    builtin: Vec<&'static ResourceType>,
    window: usize,
    watcher_queue: usize,
}

/// Custom resource types, registered and unregistered by CRD writes.
#[derive(Default)]
struct CustomTypes {
    /// (CRD name, the types of its served versions, storage version first),
    /// in creation order: discovery lists them in this order.
    crds: Vec<(String, Vec<&'static ResourceType>)>,
    /// One state per (group, plural): a CRD's versions share their objects.
    states: HashMap<(&'static str, &'static str), Arc<Mutex<TypeState>>>,
}

impl CustomTypes {
    fn types(&self) -> impl Iterator<Item = &'static ResourceType> + '_ {
        self.crds
            .iter()
            .flat_map(|(_, types)| types.iter().copied())
    }

    /// Why `def`'s names cannot be accepted for CRD `name`: another CRD
    /// serves the same plural or kind in the group.
    fn conflict(&self, name: &str, def: &crd::Definition) -> Option<String> {
        let other = self
            .crds
            .iter()
            .filter(|(n, _)| n != name)
            .flat_map(|(_, types)| types.iter())
            .find(|t| t.group == def.group && (t.plural == def.plural || t.kind == def.kind))?;
        Some(if other.plural == def.plural {
            format!("\"{}\" is already in use", def.plural)
        } else {
            format!("\"{}\" is already in use", def.kind)
        })
    }

    /// Serves `types` for CRD `name` (replacing what it served before);
    /// returns the states of (group, plural)s it no longer serves.
    fn register(
        &mut self,
        name: &str,
        types: Vec<&'static ResourceType>,
    ) -> Vec<Arc<Mutex<TypeState>>> {
        for t in &types {
            self.states
                .entry((t.group, t.plural))
                .or_insert_with(|| Arc::new(Mutex::new(TypeState::new())));
        }
        match self.crds.iter_mut().find(|(n, _)| n == name) {
            Some((_, old)) => *old = types,
            None => self.crds.push((name.to_string(), types)),
        }
        self.collect_unserved()
    }

    /// Stops serving CRD `name`'s types; returns their states.
    fn unregister(&mut self, name: &str) -> Vec<Arc<Mutex<TypeState>>> {
        self.crds.retain(|(n, _)| n != name);
        self.collect_unserved()
    }

    fn collect_unserved(&mut self) -> Vec<Arc<Mutex<TypeState>>> {
        let served: Vec<(&'static str, &'static str)> =
            self.types().map(|t| (t.group, t.plural)).collect();
        let gone: Vec<_> = self
            .states
            .keys()
            .filter(|k| !served.contains(k))
            .copied()
            .collect();
        gone.iter().filter_map(|k| self.states.remove(k)).collect()
    }
}

/// Where a type's state lives: borrowed for a built-in type, shared for a
/// custom one (whose entry a CRD deletion may remove meanwhile).
enum Slot<'a> {
    Builtin(&'a Mutex<TypeState>),
    Custom(Arc<Mutex<TypeState>>),
}

impl Slot<'_> {
    fn lock(&self) -> MutexGuard<'_, TypeState> {
        let m = match self {
            Slot::Builtin(m) => m,
            Slot::Custom(m) => &**m,
        };
        lock_state(m)
    }
}

fn lock_state(m: &Mutex<TypeState>) -> MutexGuard<'_, TypeState> {
    // A panic while holding the lock leaves consistent data (every
    // mutation is a single insert/push), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The state of `rt`; `NotServed` for a custom type this kube-sim does not
    /// (or no longer) serve.
    fn slot(&self, rt: &ResourceType) -> Result<Slot<'_>, StoreError> {
        if !rt.custom {
            let m = self
                .types
                .get(&(rt.group, rt.plural))
                .expect("every built-in ResourceType comes from RESOURCES");
            return Ok(Slot::Builtin(m));
        }
        self.custom
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .states
            .get(&(rt.group, rt.plural))
            .cloned()
            .map(Slot::Custom)
            .ok_or(StoreError::NotServed)
    }

    /// A built-in type's state (unit tests inspect watchers with it).
    #[cfg(test)]
    fn lock(&self, rt: &ResourceType) -> MutexGuard<'_, TypeState> {
        lock_state(
            self.types
                .get(&(rt.group, rt.plural))
                .expect("a built-in type"),
        )
    }

    fn custom(&self) -> std::sync::RwLockReadGuard<'_, CustomTypes> {
        // Every mutation of CustomTypes completes before it could panic.
        self.custom.read().unwrap_or_else(|e| e.into_inner())
    }

    fn custom_mut(&self) -> std::sync::RwLockWriteGuard<'_, CustomTypes> {
        self.custom.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Every state: built-in ones, then custom ones.
    fn all_slots(&self) -> Vec<Slot<'_>> {
        let mut out: Vec<Slot<'_>> = self.types.values().map(Slot::Builtin).collect();
        out.extend(self.custom().states.values().cloned().map(Slot::Custom));
        out
    }

    /// Commits a change under `ts`'s lock: window, then fan-out to watchers.
    fn commit(&self, ts: &mut TypeState, change: Change) {
        let node_of = |o: &Option<Arc<Value>>| {
            o.as_ref()
                .and_then(|o| o.pointer("/spec/nodeName"))
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .map(str::to_string)
        };
        let (old_node, new_node) = (node_of(&change.old), node_of(&change.new));
        if old_node != new_node {
            if let Some(n) = old_node
                && let Some(keys) = ts.by_node.get_mut(&n)
            {
                keys.remove(&change.key);
                if keys.is_empty() {
                    ts.by_node.remove(&n);
                }
            }
            if let Some(n) = new_node {
                ts.by_node.entry(n).or_default().insert(change.key.clone());
            }
        }
        match &change.new {
            Some(n) => {
                ts.objects.insert(change.key.clone(), n.clone());
            }
            None => {
                ts.objects.remove(&change.key);
            }
        }
        ts.watchers.retain(|w| {
            if !w.sees(&change.key) {
                return true;
            }
            match transition(&change, &w.label, &w.field) {
                // Full or closed: drop the watcher, which closes its stream.
                Some(mut ev) => {
                    if w.rt.custom {
                        ev.object = as_version(w.rt, ev.object);
                    }
                    w.tx.try_send(ev).is_ok()
                }
                None => true,
            }
        });
        ts.window.push_back(change);
        while ts.window.len() > self.window {
            if let Some(c) = ts.window.pop_front() {
                ts.dropped = Some(ts.dropped.unwrap_or(0).max(c.rv));
            }
        }
    }

    fn next_rv(&self) -> Rv {
        self.rv.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// The in-memory store. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("rv", &self.current_rv())
            .finish()
    }
}

/// `plural` or `plural.group`, as the apiserver names a resource in messages.
fn resource_name(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        rt.plural.to_string()
    } else {
        format!("{}.{}", rt.plural, rt.group)
    }
}

/// `obj` as `rt`'s version: a custom resource is stored in the version it
/// was written in and read in any served version of its CRD, converting by
/// `apiVersion` alone (the CRD `None` conversion strategy).
fn as_version(rt: &ResourceType, obj: Arc<Value>) -> Arc<Value> {
    if !rt.custom {
        return obj;
    }
    let want = rt.api_version();
    if obj.get("apiVersion").and_then(Value::as_str) == Some(want.as_str()) {
        return obj;
    }
    let mut o = (*obj).clone();
    if let Some(m) = o.as_object_mut() {
        m.insert("apiVersion".into(), Value::String(want));
    }
    Arc::new(o)
}

/// Whether `metadata.generation` moves from `old` to `new`: on a change of
/// the spec for apps types; for custom resources and CRDs on a change of
/// anything but metadata (and status when it is a subresource), as their
/// registry strategies do.
fn generation_changes(rt: &ResourceType, old: &Value, new: &Value) -> bool {
    if rt.group == "apps" {
        return new.get("spec") != old.get("spec");
    }
    let status_is_separate = !rt.subresources.is_empty();
    let body = |o: &Value| -> Map<String, Value> {
        o.as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| match k.as_str() {
                        "metadata" | "apiVersion" | "kind" => false,
                        "status" => !status_is_separate,
                        _ => true,
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    body(old) != body(new)
}

/// Types whose objects carry `metadata.generation`.
fn has_generation(rt: &ResourceType) -> bool {
    rt.group == "apps" || rt.custom || rt.kind == CRD_KIND
}

/// The kind whose writes register custom resource types.
const CRD_KIND: &str = "CustomResourceDefinition";

fn is_crd(rt: &ResourceType) -> bool {
    !rt.custom && rt.kind == CRD_KIND
}

fn with_rv(obj: &Value, rv: Rv) -> Value {
    let mut o = obj.clone();
    set_meta(&mut o, "resourceVersion", Value::String(rv.to_string()));
    o
}

fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj).and_then(|m| m.get(field)).and_then(Value::as_str)
}

fn set_meta(obj: &mut Value, field: &str, v: Value) {
    if let Some(o) = obj.as_object_mut() {
        let m = o
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if !m.is_object() {
            *m = Value::Object(Map::new());
        }
        if let Some(m) = m.as_object_mut() {
            m.insert(field.to_string(), v);
        }
    }
}

fn remove_meta(obj: &mut Value, field: &str) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove(field);
    }
}

fn rv_of(obj: &Value) -> Rv {
    meta_str(obj, "resourceVersion")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A BOOKMARK's object, shaped like the apiserver's (fixtures/watch-from-rv.jsonl).
fn bookmark_object(rt: &ResourceType, rv: Rv, initial_events_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_events_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta})
}

fn random_uid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The 5-character suffix of generateName (alphabet of k8s.io/apimachinery/pkg/util/rand).
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && is_dns1123_subdomain(s)
}

/// The name rule of a kind (most use RFC 1123 subdomains).
fn validate_name(rt: &ResourceType, name: &str) -> Result<(), StoreError> {
    let invalid = |msg: &str| StoreError::Invalid {
        kind: rt.kind.to_string(),
        name: name.to_string(),
        message: format!("metadata.name: Invalid value: \"{name}\": {msg}"),
    };
    if rt.custom {
        // Custom resources: the generic rule, whatever their kind is called.
        return if is_dns1123_subdomain(name) {
            Ok(())
        } else {
            Err(invalid(SUBDOMAIN_MSG))
        };
    }
    match rt.kind {
        "Namespace" if !is_dns1123_label(name) => Err(invalid(LABEL_MSG)),
        "Service"
            if !(is_dns1123_label(name) && name.starts_with(|c: char| c.is_ascii_lowercase())) =>
        {
            Err(invalid(DNS1035_MSG))
        }
        // RBAC objects take any path segment name (`system:discovery`):
        // ValidatePathSegmentName.
        "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding" => match name {
            "." => Err(invalid("may not be '.'")),
            ".." => Err(invalid("may not be '..'")),
            n if n.contains('/') => Err(invalid("may not contain '/'")),
            n if n.contains('%') => Err(invalid("may not contain '%'")),
            _ => Ok(()),
        },
        _ if !is_dns1123_subdomain(name) => Err(invalid(SUBDOMAIN_MSG)),
        _ => Ok(()),
    }
}

/// Checks kind/apiVersion of a body against `rt` (filling them when absent).
fn check_type(rt: &ResourceType, obj: &mut Value) -> Result<(), StoreError> {
    let Some(o) = obj.as_object_mut() else {
        return Err(StoreError::BadRequest(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml".into(),
        ));
    };
    let want_av = rt.api_version();
    match o.get("apiVersion").and_then(Value::as_str) {
        Some(av) if av != want_av => {
            return Err(StoreError::BadRequest(format!(
                "the API version in the data ({av}) does not match the expected API version ({want_av})"
            )));
        }
        _ => {
            o.insert("apiVersion".into(), Value::String(want_av));
        }
    }
    match o.get("kind").and_then(Value::as_str) {
        Some(k) if k != rt.kind => {
            return Err(StoreError::BadRequest(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
        _ => {
            o.insert("kind".into(), Value::String(rt.kind.to_string()));
        }
    }
    if !o.get("metadata").is_none_or(Value::is_object) {
        return Err(StoreError::BadRequest(
            "metadata: expected an object".into(),
        ));
    }
    Ok(())
}

/// The key of an object of `rt` in `namespace` (ignored for cluster-scoped types).
fn key_of(rt: &ResourceType, namespace: Option<&str>, name: &str) -> Result<Key, StoreError> {
    if rt.namespaced {
        match namespace {
            Some(ns) if !ns.is_empty() => Ok(Key(ns.to_string(), name.to_string())),
            _ => Err(StoreError::BadRequest(
                "the server could not find the requested resource".into(),
            )),
        }
    } else {
        Ok(Key(String::new(), name.to_string()))
    }
}

/// Decoded continue token: `{"v":"meta.k8s.io/v1","rv":N,"start":"<key>\u0000"}`.
fn encode_continue(rv: Rv, start: &str) -> String {
    // Built by hand to keep the apiserver's field order (serde_json sorts keys).
    let start = Value::String(format!("{start}\u{0}"));
    let json = format!(r#"{{"v":"meta.k8s.io/v1","rv":{rv},"start":{start}}}"#);
    patch::base64url_encode(json.as_bytes())
}

fn decode_continue(token: &str) -> Result<(Rv, String), StoreError> {
    let bad = || StoreError::BadRequest(format!("continue key is not valid: {token}"));
    let bytes = patch::base64url_decode(token).ok_or_else(bad)?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    let last = start.strip_suffix('\u{0}').unwrap_or(start);
    Ok((rv, last.to_string()))
}

impl Store {
    /// `window`: events retained per resource type for watch-from-RV (older -> 410).
    /// `watcher_queue`: bounded queue per watcher; overflow closes that watcher.
    pub fn new(window: usize, watcher_queue: usize) -> Store {
        Store::serving(window, watcher_queue, SelfSubjectReviewVersion::default())
    }

    /// [`Store::new`], serving SelfSubjectReview at `self_subject_review`
    /// (an older apiserver's version, or none).
    pub fn serving(
        window: usize,
        watcher_queue: usize,
        self_subject_review: SelfSubjectReviewVersion,
    ) -> Store {
        let types = RESOURCES
            .iter()
            .map(|rt| ((rt.group, rt.plural), Mutex::new(TypeState::new())))
            .collect();
        Store {
            shared: Arc::new(Shared {
                rv: AtomicU64::new(0),
                next_watcher: AtomicU64::new(1),
                types,
                custom: RwLock::new(CustomTypes::default()),
                builtin: resources::builtin(self_subject_review),
                window,
                watcher_queue: watcher_queue.max(1),
            }),
        }
    }

    /// The latest committed resourceVersion (global across types).
    pub fn current_rv(&self) -> Rv {
        self.shared.rv.load(Ordering::SeqCst)
    }

    /// Every type served now: the built-in ones, then those of the CRDs
    /// in creation order (each CRD's storage version first).
    pub fn types(&self) -> Vec<&'static ResourceType> {
        let mut out = self.shared.builtin.clone();
        out.extend(self.shared.custom().types());
        out
    }

    /// Looks a served type up by group, version and plural (custom ones included).
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
        let builtin = self
            .shared
            .builtin
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .copied();
        builtin.or_else(|| {
            self.shared
                .custom()
                .types()
                .find(|r| r.group == group && r.version == version && r.plural == plural)
        })
    }

    /// Looks a served type up by `apiVersion` and `kind` (custom ones included).
    pub fn find_kind(&self, api_version: &str, kind: &str) -> Option<&'static ResourceType> {
        let builtin = self
            .shared
            .builtin
            .iter()
            .find(|r| r.kind == kind && r.api_version() == api_version)
            .copied();
        builtin.or_else(|| {
            self.shared
                .custom()
                .types()
                .find(|r| r.kind == kind && r.api_version() == api_version)
        })
    }

    /// The distinct group/versions served now, in discovery order (core first).
    pub fn group_versions(&self) -> Vec<(&'static str, &'static str)> {
        resources::group_versions_of(self.types())
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        let rt = namespaces_type();
        let Ok(slot) = self.shared.slot(rt) else {
            return false;
        };
        slot.lock()
            .objects
            .contains_key(&Key(String::new(), ns.to_string()))
    }

    /// CRD `name` was written: accept its names unless another CRD holds
    /// them, serve its types (before the CRD is committed, so a client that
    /// sees it Established can use them at once) and write its status.
    /// Called under the CRD type's lock, which orders all CRD writes.
    fn establish(
        &self,
        name: &str,
        def: &crd::Definition,
        obj: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), StoreError> {
        let conflict = self.shared.custom().conflict(name, def);
        let unserved = match conflict {
            None => {
                let types = def
                    .types
                    .iter()
                    .map(crd::intern)
                    .collect::<Result<Vec<_>, _>>()?;
                self.shared.custom_mut().register(name, types)
            }
            Some(_) => self.shared.custom_mut().unregister(name),
        };
        self.purge(unserved);
        crd::set_status(obj, def, old, conflict.as_deref(), &now_rfc3339());
        Ok(())
    }

    /// The apiextensions finalizer's job for types no longer served: delete
    /// every object (watchers see each DELETED), then end the watches.
    /// Lock order: CRD type lock, then the custom registry (released), then
    /// each custom type's lock; nothing takes them the other way round.
    fn purge(&self, states: Vec<Arc<Mutex<TypeState>>>) {
        for state in states {
            let mut ts = lock_state(&state);
            let keys: Vec<Key> = ts.objects.keys().cloned().collect();
            for key in keys {
                if let Some(old) = ts.objects.get(&key).cloned() {
                    Self::delete_existing(&self.shared, &mut ts, key, old);
                }
            }
            ts.watchers.clear();
        }
    }

    /// Creates an object: fills uid, resourceVersion, creationTimestamp,
    /// namespace, generateName, generation (apps types).
    pub fn create(
        &self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        mut obj: Value,
    ) -> Result<Arc<Value>, StoreError> {
        check_type(rt, &mut obj)?;
        let name = match meta_str(&obj, "name").filter(|n| !n.is_empty()) {
            Some(n) => n.to_string(),
            None => match meta_str(&obj, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => format!("{prefix}{}", random_suffix()),
                None => {
                    return Err(StoreError::Invalid {
                        kind: rt.kind.to_string(),
                        name: String::new(),
                        message: "metadata.name: Required value: name or generateName is required"
                            .into(),
                    });
                }
            },
        };
        validate_name(rt, &name)?;
        if rt.namespaced {
            let Some(ns) = namespace.filter(|n| !n.is_empty()) else {
                return Err(StoreError::BadRequest(
                    "the server could not find the requested resource".into(),
                ));
            };
            if let Some(body_ns) = meta_str(&obj, "namespace").filter(|n| !n.is_empty())
                && body_ns != ns
            {
                return Err(StoreError::BadRequest(
                        "the namespace of the provided object does not match the namespace sent on the request".into(),
                    ));
            }
            if !self.namespace_exists(ns) {
                return Err(StoreError::NamespaceNotFound(ns.to_string()));
            }
            set_meta(&mut obj, "namespace", Value::String(ns.to_string()));
        } else {
            remove_meta(&mut obj, "namespace");
        }
        set_meta(&mut obj, "name", Value::String(name.clone()));
        set_meta(&mut obj, "uid", Value::String(random_uid()));
        set_meta(&mut obj, "creationTimestamp", Value::String(now_rfc3339()));
        remove_meta(&mut obj, "deletionTimestamp");
        if has_generation(rt) {
            set_meta(&mut obj, "generation", json!(1));
        }
        let definition = if is_crd(rt) {
            Some(crd::validate(&mut obj)?)
        } else {
            None
        };
        if !rt.custom && rt.kind == "Namespace" {
            // What the namespace registry strategy fills in.
            if obj.get("spec").and_then(|s| s.get("finalizers")).is_none() {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
            }
            obj["status"] = json!({"phase": "Active"});
        }
        let key = key_of(rt, namespace, &name)?;
        let created = {
            let slot = self.shared.slot(rt)?;
            let mut ts = slot.lock();
            if ts.objects.contains_key(&key) {
                return Err(StoreError::AlreadyExists {
                    resource: resource_name(rt),
                    name,
                });
            }
            if let Some(def) = &definition {
                self.establish(&name, def, &mut obj, None)?;
            }
            let rv = self.shared.next_rv();
            set_meta(&mut obj, "resourceVersion", Value::String(rv.to_string()));
            let created = Arc::new(obj);
            self.shared.commit(
                &mut ts,
                Change {
                    rv,
                    key,
                    old: None,
                    new: Some(created.clone()),
                    old_at_rv: OnceLock::new(),
                },
            );
            created
        };
        if !rt.custom && rt.kind == "Namespace" {
            // The ServiceAccount controller's job: every namespace has "default".
            if let Some(sa) = resources::find("", "v1", "serviceaccounts") {
                let body = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}});
                match self.create(sa, Some(&name), body) {
                    Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, namespace = %name, "creating default ServiceAccount")
                    }
                }
            }
        }
        Ok(created)
    }

    /// Reads one object.
    pub fn get(
        &self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, StoreError> {
        let key = key_of(rt, namespace, name)?;
        let slot = self.shared.slot(rt)?;
        let found = slot.lock().objects.get(&key).cloned();
        found
            .map(|o| as_version(rt, o))
            .ok_or_else(|| StoreError::NotFound {
                resource: resource_name(rt),
                name: name.to_string(),
            })
    }

    /// Replaces an object. A body resourceVersion different from the stored
    /// one is a 409 Conflict; without one the update is unconditional. A no-op
    /// update keeps the RV and emits no event.
    pub fn update(
        &self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        name: &str,
        mut obj: Value,
    ) -> Result<Arc<Value>, StoreError> {
        check_type(rt, &mut obj)?;
        match meta_str(&obj, "name") {
            Some(n) if n != name => {
                return Err(StoreError::BadRequest(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => set_meta(&mut obj, "name", Value::String(name.to_string())),
        }
        if rt.namespaced
            && let (Some(body_ns), Some(ns)) = (meta_str(&obj, "namespace"), namespace)
            && !body_ns.is_empty()
            && body_ns != ns
        {
            return Err(StoreError::BadRequest(
                        "the namespace of the provided object does not match the namespace sent on the request".into(),
                    ));
        }
        let key = key_of(rt, namespace, name)?;
        let slot = self.shared.slot(rt)?;
        let mut ts = slot.lock();
        self.update_locked(rt, &mut ts, key, obj)
    }

    /// The shared tail of update and patch, under the type lock. Returns the
    /// stored object in `rt`'s version.
    fn update_locked(
        &self,
        rt: &'static ResourceType,
        ts: &mut TypeState,
        key: Key,
        mut obj: Value,
    ) -> Result<Arc<Value>, StoreError> {
        let name = key.1.clone();
        let Some(old) = ts.objects.get(&key).cloned() else {
            return Err(StoreError::NotFound {
                resource: resource_name(rt),
                name,
            });
        };
        let old_rv = meta_str(&old, "resourceVersion")
            .unwrap_or_default()
            .to_string();
        if let Some(rv) = meta_str(&obj, "resourceVersion").filter(|r| !r.is_empty())
            && rv != old_rv
        {
            return Err(StoreError::Conflict {
                resource: resource_name(rt),
                name,
            });
        }
        // Fields the apiserver keeps from the stored object.
        for f in ["uid", "creationTimestamp", "namespace", "generation"] {
            match meta(&old).and_then(|m| m.get(f)) {
                Some(v) => set_meta(&mut obj, f, v.clone()),
                None => remove_meta(&mut obj, f),
            }
        }
        set_meta(&mut obj, "resourceVersion", Value::String(old_rv));
        if rt.custom
            && let (Some(o), Some(av)) = (obj.as_object_mut(), old.get("apiVersion"))
        {
            // Stays in the version it was stored in (see `as_version`), so
            // that rewriting it unchanged through another version is a no-op.
            o.insert("apiVersion".into(), av.clone());
        }
        if is_crd(rt) {
            let def = crd::validate(&mut obj)?;
            self.establish(&name, &def, &mut obj, Some(&old))?;
        }
        if has_generation(rt) && generation_changes(rt, &old, &obj) {
            let generation = meta(&old)
                .and_then(|m| m.get("generation"))
                .and_then(Value::as_i64)
                .unwrap_or(0);
            set_meta(&mut obj, "generation", json!(generation + 1));
        }
        if obj == *old {
            // A no-op write: same RV, no event (like the apiserver).
            return Ok(as_version(rt, old));
        }
        let rv = self.shared.next_rv();
        set_meta(&mut obj, "resourceVersion", Value::String(rv.to_string()));
        let new = Arc::new(obj);
        self.shared.commit(
            ts,
            Change {
                rv,
                key,
                old: Some(old),
                new: Some(new.clone()),
                old_at_rv: OnceLock::new(),
            },
        );
        Ok(as_version(rt, new))
    }

    /// Applies a patch to the stored object and stores the result (a
    /// resourceVersion in the patched result is a precondition, as for update).
    pub fn patch(
        &self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
        kind: PatchKind,
    ) -> Result<Arc<Value>, StoreError> {
        let key = key_of(rt, namespace, name)?;
        let slot = self.shared.slot(rt)?;
        let mut ts = slot.lock();
        let Some(old) = ts.objects.get(&key).cloned() else {
            return Err(StoreError::NotFound {
                resource: resource_name(rt),
                name: name.to_string(),
            });
        };
        // The patch applies to the object as the client reads it.
        let mut obj = (*as_version(rt, old)).clone();
        match kind {
            PatchKind::Merge => patch::merge_patch(&mut obj, patch),
            PatchKind::StrategicMerge => {
                patch::merge_patch(&mut obj, &patch::strip_directives(patch))
            }
            PatchKind::Json => {
                patch::json_patch(&mut obj, patch).map_err(StoreError::BadRequest)?
            }
        }
        check_type(rt, &mut obj)?;
        if meta_str(&obj, "name") != Some(name) {
            return Err(StoreError::BadRequest(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&obj, "name").unwrap_or_default()
            )));
        }
        self.update_locked(rt, &mut ts, key, obj)
    }

    /// Deletes an object; returns its last state stamped with the deletion's RV.
    pub fn delete(
        &self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, StoreError> {
        let key = key_of(rt, namespace, name)?;
        let slot = self.shared.slot(rt)?;
        let mut ts = slot.lock();
        if is_crd(rt) && ts.objects.contains_key(&key) {
            self.remove_crd_types(name);
        }
        Self::delete_locked(&self.shared, rt, &mut ts, key).map(|o| as_version(rt, o))
    }

    /// What deleting CRD `name` does before the CRD itself goes (under the
    /// CRD type's lock): its objects are deleted, its types unserved.
    fn remove_crd_types(&self, name: &str) {
        let unserved = self.shared.custom_mut().unregister(name);
        self.purge(unserved);
    }

    fn delete_locked(
        shared: &Shared,
        rt: &'static ResourceType,
        ts: &mut TypeState,
        key: Key,
    ) -> Result<Arc<Value>, StoreError> {
        let Some(old) = ts.objects.get(&key).cloned() else {
            return Err(StoreError::NotFound {
                resource: resource_name(rt),
                name: key.1,
            });
        };
        Ok(Self::delete_existing(shared, ts, key, old))
    }

    /// Commits the deletion of `old`, stored at `key`; returns the tombstone.
    fn delete_existing(
        shared: &Shared,
        ts: &mut TypeState,
        key: Key,
        old: Arc<Value>,
    ) -> Arc<Value> {
        let rv = shared.next_rv();
        let tomb = Arc::new(with_rv(&old, rv));
        let old_at_rv = OnceLock::new();
        let _ = old_at_rv.set(tomb.clone());
        shared.commit(
            ts,
            Change {
                rv,
                key,
                old: Some(old),
                new: None,
                old_at_rv,
            },
        );
        tomb
    }

    /// Deletes every object the selectors match (in `namespace` if given).
    pub fn delete_collection(
        &self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        opts: &ListOptions,
    ) -> Result<Vec<Arc<Value>>, StoreError> {
        let slot = self.shared.slot(rt)?;
        let mut ts = slot.lock();
        let keys: Vec<Key> = ts
            .objects
            .iter()
            .filter(|(k, o)| {
                namespace.is_none_or(|ns| !rt.namespaced || k.0 == ns)
                    && selected(&opts.label_selector, &opts.field_selector, o)
            })
            .map(|(k, _)| k.clone())
            .collect();
        keys.into_iter()
            .map(|k| {
                if is_crd(rt) {
                    self.remove_crd_types(&k.1);
                }
                Self::delete_locked(&self.shared, rt, &mut ts, k).map(|o| as_version(rt, o))
            })
            .collect()
    }

    /// LIST with the apiserver's resourceVersion / limit / continue semantics.
    ///
    /// - rv unset / NotOlderThan: the latest state; rv "0": the latest state
    ///   served "from the watch cache", which ignores `limit` (as the v1.24
    ///   cacher does: informers get everything in one page).
    /// - rv N with Exact (or legacy rv N with a limit): the state at N,
    ///   rebuilt from the window; 410 Expired when the window no longer covers N.
    /// - continue: the next page at the first page's RV; 410 when expired.
    pub fn list(
        &self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        opts: &ListOptions,
    ) -> Result<ListResult, StoreError> {
        let rv_param = opts.resource_version.as_deref().filter(|s| !s.is_empty());
        let exact = opts.resource_version_match.as_deref() == Some("Exact");
        if opts.resource_version_match.is_some() && rv_param.is_none() {
            return Err(StoreError::BadRequest(
                "resourceVersionMatch is forbidden unless resourceVersion is provided".into(),
            ));
        }
        if opts.continue_token.is_some() && rv_param.is_some_and(|r| r != "0") {
            return Err(StoreError::BadRequest(
                "specifying resource version is not allowed when using continue".into(),
            ));
        }
        let requested: Option<Rv> =
            match rv_param {
                None => None,
                Some(s) => Some(s.parse().map_err(|_| {
                    StoreError::BadRequest(format!("invalid resource version: {s}"))
                })?),
            };
        if exact && requested == Some(0) {
            return Err(StoreError::BadRequest(
                "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"".into(),
            ));
        }
        let slot = self.shared.slot(rt)?;
        let ts = slot.lock();
        let current = self.shared.rv.load(Ordering::SeqCst);
        let mut limit = opts.limit;
        let mut after: Option<String> = None;
        let at: Rv = if let Some(token) = &opts.continue_token {
            let (rv, last) = decode_continue(token)?;
            if ts.check_not_expired(rv).is_err() {
                return Err(StoreError::ContinueExpired);
            }
            after = Some(last);
            rv.min(current)
        } else {
            match requested {
                None => current,
                Some(0) => {
                    limit = None;
                    current
                }
                Some(n) if exact || (opts.resource_version_match.is_none() && limit.is_some()) => {
                    ts.check_not_expired(n)?;
                    n.min(current)
                }
                Some(_) => current,
            }
        };
        let objects = ts.snapshot_at(at);
        let all_namespaces = rt.namespaced && namespace.is_none();
        let key_str = |k: &Key| {
            if all_namespaces {
                format!("{}/{}", k.0, k.1)
            } else {
                k.1.clone()
            }
        };
        let ns_key = if rt.namespaced {
            namespace.unwrap_or_default().to_string()
        } else {
            String::new()
        };
        let lower: Bound<Key> = match &after {
            Some(last) if all_namespaces => {
                let (ns, name) = last.split_once('/').unwrap_or((last.as_str(), ""));
                Bound::Excluded(Key(ns.to_string(), name.to_string()))
            }
            Some(last) => Bound::Excluded(Key(ns_key.clone(), last.clone())),
            None if all_namespaces => Bound::Unbounded,
            None => Bound::Included(Key(ns_key.clone(), String::new())),
        };
        let selectors_empty = opts.label_selector.is_empty() && opts.field_selector.is_empty();
        // `spec.nodeName=X` on the current state: only that node's objects
        // are candidates (the index holds the current state only).
        let node_keys = match (&objects, opts.field_selector.exact_value("spec.nodeName")) {
            (std::borrow::Cow::Borrowed(_), Some(node)) if rt.kind == "Pod" => {
                Some(ts.by_node.get(node))
            }
            _ => None,
        };
        let candidates: Box<dyn Iterator<Item = (&Key, &Arc<Value>)>> = match node_keys {
            Some(Some(keys)) => Box::new(
                keys.range((lower, Bound::Unbounded))
                    .filter_map(|k| objects.get_key_value(k)),
            ),
            Some(None) => Box::new(std::iter::empty()),
            None => Box::new(objects.range((lower, Bound::Unbounded))),
        };
        let mut matching = candidates
            .take_while(|(k, _)| all_namespaces || k.0 == ns_key)
            .filter(|(_, o)| selected(&opts.label_selector, &opts.field_selector, o));
        let mut items = Vec::new();
        let mut last_key = None;
        for (k, o) in matching.by_ref() {
            items.push(as_version(rt, o.clone()));
            last_key = Some(k);
            if limit.is_some_and(|l| items.len() >= l) {
                break;
            }
        }
        let (mut continue_token, mut remaining_item_count) = (None, None);
        if limit.is_some_and(|l| items.len() >= l) {
            let remaining = matching.count() as u64;
            if remaining > 0 {
                if let Some(k) = last_key {
                    continue_token = Some(encode_continue(at, &key_str(k)));
                }
                if selectors_empty {
                    remaining_item_count = Some(remaining);
                }
            }
        }
        Ok(ListResult {
            items,
            resource_version: at,
            continue_token,
            remaining_item_count,
        })
    }

    /// Opens a watch (see `Watch`). The initial events and the registration
    /// happen under one lock, so the live stream continues without gaps.
    pub fn watch(
        &self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        opts: &ListOptions,
    ) -> Result<Watch, StoreError> {
        let rv_param = opts.resource_version.as_deref().filter(|s| !s.is_empty());
        let from: Option<Rv> =
            match rv_param {
                None | Some("0") => None,
                Some(s) => Some(s.parse().map_err(|_| {
                    StoreError::BadRequest(format!("invalid resource version: {s}"))
                })?),
            };
        // rv unset/"0" means "current state first" unless sendInitialEvents=false;
        // sendInitialEvents=true asks for it whatever the rv.
        let send_initial = opts.send_initial_events.unwrap_or(from.is_none());
        let ns = namespace
            .filter(|n| rt.namespaced && !n.is_empty())
            .map(str::to_string);
        let in_ns = |k: &Key| ns.as_deref().is_none_or(|n| k.0 == n);
        let (label, field) = (&opts.label_selector, &opts.field_selector);

        let slot = self.shared.slot(rt)?;
        let mut ts = slot.lock();
        let current = self.shared.rv.load(Ordering::SeqCst);
        let mut initial = Vec::new();
        if send_initial {
            for (k, o) in &ts.objects {
                if in_ns(k) && selected(label, field, o) {
                    initial.push(Event {
                        kind: EventType::Added,
                        object: as_version(rt, o.clone()),
                        rv: rv_of(o),
                    });
                }
            }
            if opts.send_initial_events == Some(true) && opts.allow_bookmarks {
                initial.push(Event {
                    kind: EventType::Bookmark,
                    object: Arc::new(bookmark_object(rt, current, true)),
                    rv: current,
                });
            }
        } else if let Some(n) = from {
            ts.check_not_expired(n)?;
            for c in ts.window.iter().filter(|c| c.rv > n && in_ns(&c.key)) {
                if let Some(mut ev) = transition(c, label, field) {
                    ev.object = as_version(rt, ev.object);
                    initial.push(ev);
                }
            }
        }
        let (tx, rx) = mpsc::channel(self.shared.watcher_queue);
        let id = self.shared.next_watcher.fetch_add(1, Ordering::Relaxed);
        ts.watchers.push(Watcher {
            id,
            rt,
            namespace: ns.clone(),
            label: label.clone(),
            field: field.clone(),
            allow_bookmarks: opts.allow_bookmarks,
            tx,
        });
        drop(ts);
        drop(slot);
        Ok(Watch {
            initial,
            rx,
            shared: self.shared.clone(),
            rt,
            id,
        })
    }

    /// Queue a BOOKMARK (current RV) into every live watcher that allowed bookmarks.
    pub fn send_bookmarks(&self) {
        // Per type, not per state: the versions of a custom type share a
        // state, and each watcher's bookmark names its own version.
        for rt in self.types() {
            let Ok(slot) = self.shared.slot(rt) else {
                continue;
            };
            let mut ts = slot.lock();
            if ts.watchers.is_empty() {
                continue;
            }
            let rv = self.shared.rv.load(Ordering::SeqCst);
            let bookmark = Event {
                kind: EventType::Bookmark,
                object: Arc::new(bookmark_object(rt, rv, false)),
                rv,
            };
            ts.watchers.retain(|w| {
                w.rt.version != rt.version
                    || !w.allow_bookmarks
                    || w.tx.try_send(bookmark.clone()).is_ok()
            });
        }
    }

    /// Test hook: forget the event window of `rt` (a watch from an older RV gets 410).
    pub fn compact(&self, rt: &'static ResourceType) {
        if let Ok(slot) = self.shared.slot(rt) {
            let mut ts = slot.lock();
            ts.window.clear();
            ts.dropped = Some(self.shared.rv.load(Ordering::SeqCst));
        }
    }

    /// Test hook: end every open watch stream (their rx close).
    pub fn close_watches(&self) {
        for slot in self.shared.all_slots() {
            slot.lock().watchers.clear();
        }
    }

    /// Number of objects of a type (all namespaces); 0 for a type not served.
    pub fn count(&self, rt: &'static ResourceType) -> usize {
        self.shared
            .slot(rt)
            .map(|slot| slot.lock().objects.len())
            .unwrap_or(0)
    }
}

fn namespaces_type() -> &'static ResourceType {
    resources::find("", "v1", "namespaces").expect("namespaces is in RESOURCES")
}

#[cfg(test)]
mod tests;
