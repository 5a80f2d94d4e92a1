//! A stream's cache and ring: pure and synchronous, no I/O and no clock.
//!
//! The cache holds the collection as of `rv` (a LIST, then every event
//! applied); the ring holds the last changes, so a watch from a recent RV
//! is replayed locally. Both answer three questions: the objects at the
//! stream's RV, the changes after an RV as one subscriber's selector sees
//! them, and whether an RV is still servable (or 410, or older than what
//! this stream saw). The stream wraps it in a lock and fans out what
//! [`Cache::apply`] returns; everything that decides what a client gets is
//! here, and tested without a network.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::watch::codec::{Codec, EventType};
use crate::watch::filter::{FieldRef, Meta, Selector, Transition};
use crate::watch::object::TypeMeta;

/// An object in the cache: its bytes and what was parsed of it.
///
/// The bytes are the object as a watch event carries it, with kind and
/// apiVersion: an upstream event's object exactly as it came; a LIST item
/// as it came when it has both (custom resources), else with the missing
/// ones put in front (built-in types). Never re-encoded.
pub struct Obj {
    pub bytes: Bytes,
    pub meta: Meta,
    /// Its ADDED event, built at most once, shared by every client that
    /// gets this object as ADDED.
    added: OnceLock<Bytes>,
}

impl Obj {
    pub fn new(bytes: Bytes, meta: Meta) -> Obj {
        Obj {
            bytes,
            meta,
            added: OnceLock::new(),
        }
    }

    fn added(&self, codec: Codec) -> Bytes {
        self.added
            .get_or_init(|| codec.event(EventType::Added, &self.bytes))
            .clone()
    }
}

/// One upstream change, kept in the ring for replay.
pub struct Change {
    pub rv: u64,
    /// The upstream event frame, as it came.
    frame: Bytes,
    old: Option<Arc<Obj>>,
    new: Option<Arc<Obj>>,
    /// DELETED with the old object at this RV, for subscribers the object
    /// leaves: built at most once, shared.
    leave: OnceLock<Bytes>,
}

impl Change {
    /// The frame a subscriber with `sel` gets for this change, if any: the
    /// apiserver's transitions (the upstream frame as it is, ADDED for an
    /// object entering the selection, DELETED for one leaving it).
    pub fn frame_for(&self, sel: &Selector, codec: Codec) -> Option<Bytes> {
        match sel.transition(self.old_meta(), self.new_meta()) {
            Transition::AsIs => Some(self.frame.clone()),
            Transition::Enter => self.new.as_ref().map(|n| n.added(codec)),
            Transition::Leave => {
                let old = self.old.as_ref()?;
                Some(
                    self.leave
                        .get_or_init(|| {
                            let at = codec.at_resource_version(&old.bytes, self.rv);
                            codec.event(EventType::Deleted, &at)
                        })
                        .clone(),
                )
            }
            Transition::Nothing => None,
        }
    }

    pub fn old_meta(&self) -> Option<&Meta> {
        self.old.as_ref().map(|o| &o.meta)
    }

    pub fn new_meta(&self) -> Option<&Meta> {
        self.new.as_ref().map(|n| &n.meta)
    }
}

/// Whether LIST items carry kind and apiVersion, from the items seen so far.
#[derive(Debug, Default, Clone, Copy)]
pub enum TypeMetaSeen {
    #[default]
    NoItems,
    Uniform(bool),
    Mixed,
}

impl TypeMetaSeen {
    pub fn saw(&mut self, item: TypeMeta) {
        *self = match (&*self, item.uniform()) {
            (_, None) | (TypeMetaSeen::Mixed, _) => TypeMetaSeen::Mixed,
            (TypeMetaSeen::NoItems, Some(t)) => TypeMetaSeen::Uniform(t),
            (TypeMetaSeen::Uniform(a), Some(b)) if *a == b => TypeMetaSeen::Uniform(b),
            (TypeMetaSeen::Uniform(_), Some(_)) => TypeMetaSeen::Mixed,
        }
    }

    /// What a stream records after a LIST that saw `self`, having recorded
    /// `before`: items without agreement leave it unknown (cached LISTs are
    /// then forwarded); a LIST without items tells nothing new.
    pub fn record(self, before: Option<bool>) -> Option<bool> {
        match self {
            TypeMetaSeen::NoItems => before,
            TypeMetaSeen::Uniform(t) => Some(t),
            TypeMetaSeen::Mixed => None,
        }
    }
}

/// A LIST, complete.
pub struct Listed {
    /// The encoding the apiserver answered in.
    pub codec: Codec,
    pub rv: u64,
    pub kind: String,
    pub api_version: String,
    /// Each item as the cache keeps it (see [`Obj`]).
    pub items: Vec<(Meta, Bytes)>,
    pub type_meta: TypeMetaSeen,
}

/// Where a watch from an RV stands against this cache.
#[derive(Debug, PartialEq, Eq)]
pub enum Since {
    /// Replayable from the ring.
    Ring,
    /// The apiserver said this far back is gone: 410, with the oldest RV
    /// the stream can replay from.
    Expired { oldest: u64 },
    /// Older than what this stream saw, but the apiserver may still have
    /// it: a catch-up (or the apiserver) must answer.
    Predates { floor: u64 },
}

/// The collection, as of `rv`, and its recent changes.
pub struct Cache {
    codec: Codec,
    ring_cap: usize,
    /// Every change up to here is applied.
    pub rv: u64,
    /// Confirmed by a probe: no change of this collection up to this RV,
    /// though no event or bookmark has carried `rv` there.
    pub fresh: u64,
    pub kind: String,
    pub api_version: String,
    /// Whether the apiserver's LIST items of this collection carry kind and
    /// apiVersion (custom resources: yes; built-in types: no), as the
    /// stream's LISTs showed: a LIST from the cache writes its items the
    /// same way. `None` until a LIST had an item to tell.
    pub item_type_meta: Option<bool>,
    /// `namespace/name` → object: the order of the apiserver's storage keys
    /// (`/registry/pods/a-b/x` sorts before `/registry/pods/a/x`), which is
    /// the order of its consistent LISTs.
    objects: BTreeMap<String, Arc<Obj>>,
    /// The same objects by the value of one selectable field (see
    /// [`crate::watch::filter::indexed_field`]), each in storage-key order.
    index: Option<Index>,
    bytes: usize,
    ring: VecDeque<Arc<Change>>,
    /// Every change after this RV is in the ring: replays from an RV below
    /// it are not local.
    ring_floor: u64,
    /// The upstream answered 410 for this RV: any RV up to it is expired.
    expired_below: u64,
    /// A probe saw a change in `(n, floor]`: any gap that contains it holds
    /// changes too, so it needs no probe (a catch-up reads it anyway).
    nonempty_gap: Option<(u64, u64)>,
}

impl Cache {
    pub fn new(codec: Codec, ring_cap: usize) -> Cache {
        Cache {
            codec,
            ring_cap: ring_cap.max(1),
            rv: 0,
            fresh: 0,
            kind: String::new(),
            api_version: String::new(),
            item_type_meta: None,
            objects: BTreeMap::new(),
            index: None,
            bytes: 0,
            ring: VecDeque::new(),
            ring_floor: 0,
            expired_below: 0,
            nonempty_gap: None,
        }
    }

    /// Indexes the objects by the selectable field at `field` (a position
    /// in [`Meta::fields`]), if any.
    pub fn indexed(mut self, field: Option<usize>) -> Cache {
        self.index = field.map(|field| Index {
            field,
            by_value: HashMap::new(),
        });
        self
    }

    /// (objects, bytes): this cache's share of the hub's totals.
    pub fn size(&self) -> (u64, u64) {
        (self.objects.len() as u64, self.bytes as u64)
    }

    /// How far the cache is known to be complete: `rv`, or further when a
    /// probe confirmed nothing changed.
    pub fn position(&self) -> u64 {
        self.rv.max(self.fresh)
    }

    /// Replaces everything with a fresh LIST; the ring restarts at its RV.
    pub fn install(&mut self, listed: Listed) {
        self.objects.clear();
        if let Some(index) = &mut self.index {
            index.by_value.clear();
        }
        self.bytes = 0;
        for (meta, bytes) in listed.items {
            self.bytes += bytes.len();
            let key = object_key(&meta);
            let obj = Arc::new(Obj::new(bytes, meta));
            if let Some(index) = &mut self.index {
                index.insert(&key, &obj);
            }
            self.objects.insert(key, obj);
        }
        self.codec = listed.codec;
        self.rv = listed.rv;
        self.kind = listed.kind;
        self.api_version = listed.api_version;
        self.item_type_meta = listed.type_meta.record(self.item_type_meta);
        self.ring.clear();
        self.ring_floor = listed.rv;
        self.fresh = 0;
    }

    /// A BOOKMARK at `rv`: true when it moved the cache on.
    pub fn bookmark(&mut self, rv: u64) -> bool {
        if rv <= self.rv {
            return false;
        }
        self.rv = rv;
        true
    }

    /// Applies one upstream change (`ty` is ADDED, MODIFIED or DELETED);
    /// `None` when it was already applied (a re-watch overlapping what the
    /// stream saw). `frame` is the upstream event frame, `object` its
    /// object (a slice of it).
    pub fn apply(
        &mut self,
        ty: EventType,
        meta: Meta,
        object: Bytes,
        frame: Bytes,
    ) -> Option<Arc<Change>> {
        let rv = meta.rv;
        if rv <= self.rv {
            return None;
        }
        let key = object_key(&meta);
        let obj = Arc::new(Obj::new(object, meta));
        if ty == EventType::Added {
            // The upstream frame is this object's ADDED event.
            let _ = obj.added.set(frame.clone());
        }
        let deleted = ty == EventType::Deleted;
        let cached = if deleted {
            self.objects.remove(&key)
        } else {
            self.objects.insert(key.clone(), obj.clone())
        };
        if let Some(index) = &mut self.index {
            if let Some(old) = &cached {
                index.remove(&key, old);
            }
            if !deleted {
                index.insert(&key, &obj);
            }
        }
        let removed = cached.as_ref().map_or(0, |o| o.bytes.len());
        let added = if deleted { 0 } else { obj.bytes.len() };
        self.bytes = (self.bytes + added).saturating_sub(removed);
        // A deletion of an object the cache never had is judged on the
        // deleted object itself.
        let old = match (deleted, cached) {
            (true, None) => Some(obj.clone()),
            (_, cached) => cached,
        };
        let change = Arc::new(Change {
            rv,
            frame,
            old,
            new: (!deleted).then_some(obj),
            leave: OnceLock::new(),
        });
        self.ring.push_back(change.clone());
        while self.ring.len() > self.ring_cap {
            if let Some(c) = self.ring.pop_front() {
                self.ring_floor = c.rv;
            }
        }
        self.rv = rv;
        Some(change)
    }

    /// The upstream said 410: every RV up to the stream's is gone.
    pub fn expire(&mut self) {
        self.expired_below = self.expired_below.max(self.rv);
    }

    /// Where a watch from `n` stands.
    pub fn since(&self, n: u64) -> Since {
        if n <= self.expired_below {
            Since::Expired {
                oldest: self.ring_floor,
            }
        } else if n < self.ring_floor {
            Since::Predates {
                floor: self.ring_floor,
            }
        } else {
            Since::Ring
        }
    }

    /// The ring's floor, when `n` is below it but not known to be expired:
    /// the gap a probe of the apiserver could confirm empty.
    pub fn gap_below(&self, n: u64) -> Option<u64> {
        (n < self.ring_floor && n > self.expired_below).then_some(self.ring_floor)
    }

    /// Whether `(n, floor]` is known to hold a change (it contains a gap a
    /// probe found one in).
    pub fn gap_known_nonempty(&self, n: u64, floor: u64) -> bool {
        self.nonempty_gap
            .is_some_and(|(n0, f0)| n <= n0 && floor >= f0)
    }

    /// A probe saw a change in `(n, floor]`.
    pub fn note_nonempty_gap(&mut self, n: u64, floor: u64) {
        self.nonempty_gap = Some((n, floor));
    }

    /// The apiserver confirmed nothing changed in `(n, floor]`: the ring
    /// reaches back to `n`, unless a relist or the ring moved the floor.
    pub fn extend_floor(&mut self, n: u64, floor: u64) {
        if self.ring_floor == floor {
            self.ring_floor = n;
        }
    }

    /// The objects `sel` selects, in storage-key order: from the index
    /// when `sel` requires one value of the indexed field, else a scan.
    pub fn snapshot<'a>(&'a self, sel: &'a Selector) -> impl Iterator<Item = &'a Arc<Obj>> {
        let indexed = match (&self.index, sel.index_key()) {
            (Some(index), Some((FieldRef::At(i), value))) if i == index.field => {
                Some(index.by_value.get(value))
            }
            _ => None,
        };
        let candidates: Box<dyn Iterator<Item = &'a Arc<Obj>> + 'a> = match indexed {
            Some(Some(objects)) => Box::new(objects.values()),
            Some(None) => Box::new(std::iter::empty()),
            None => Box::new(self.objects.values()),
        };
        candidates.filter(|o| sel.matches(&o.meta))
    }

    /// The ADDED frames of [`Cache::snapshot`].
    pub fn snapshot_frames(&self, sel: &Selector) -> Vec<Bytes> {
        self.snapshot(sel).map(|o| o.added(self.codec)).collect()
    }

    /// The frames a subscriber with `sel` gets for the changes after
    /// `from` (which [`Cache::since`] found in the ring).
    pub fn replay(&self, from: u64, sel: &Selector) -> Vec<Bytes> {
        self.ring
            .iter()
            .filter(|c| c.rv > from)
            .filter_map(|c| c.frame_for(sel, self.codec))
            .collect()
    }

    /// A BOOKMARK frame at the cache's position.
    pub fn bookmark_frame(&self, initial_end: bool) -> Bytes {
        self.codec
            .bookmark(&self.kind, &self.api_version, self.position(), initial_end)
    }

    /// Drops everything (the stream ended).
    pub fn clear(&mut self) {
        self.objects.clear();
        if let Some(index) = &mut self.index {
            index.by_value.clear();
        }
        self.ring.clear();
        self.bytes = 0;
    }
}

/// The cache's objects by the value of one selectable field.
struct Index {
    /// The position of the field in [`Meta::fields`].
    field: usize,
    by_value: HashMap<String, BTreeMap<String, Arc<Obj>>>,
}

impl Index {
    fn value<'a>(&self, obj: &'a Obj) -> &'a str {
        obj.meta.field(FieldRef::At(self.field))
    }

    fn insert(&mut self, key: &str, obj: &Arc<Obj>) {
        let value = self.value(obj);
        match self.by_value.get_mut(value) {
            Some(objects) => {
                objects.insert(key.to_string(), obj.clone());
            }
            None => {
                let objects = BTreeMap::from([(key.to_string(), obj.clone())]);
                self.by_value.insert(value.to_string(), objects);
            }
        }
    }

    fn remove(&mut self, key: &str, obj: &Obj) {
        let value = self.value(obj);
        if let Some(objects) = self.by_value.get_mut(value) {
            objects.remove(key);
            if objects.is_empty() {
                self.by_value.remove(value);
            }
        }
    }
}

/// The cache's key of an object: its storage key below the resource prefix.
fn object_key(meta: &Meta) -> String {
    format!("{}/{}", meta.namespace, meta.name)
}

#[cfg(test)]
mod tests;
