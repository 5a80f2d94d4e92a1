//! A stream's subscribers, filed by the one field value they require.
//!
//! 5,000 node agents each watch `pods?fieldSelector=spec.nodeName=node-i` on
//! one shared upstream watch. Evaluating every agent's selector for every pod
//! change costs 5,000 selector checks per event, under the stream's lock. A
//! subscriber whose selector requires a field to equal one value can only
//! ever see objects with that value (before or after the change), so it is
//! filed under (field, value), and a change visits just the subscribers
//! filed under its old and new values — plus those filed under nothing
//! (identical watches, label selectors), which stay one flat list so the
//! plain fan-out of one event to 10,000 watchers is a straight scan.

use std::collections::HashMap;
use std::sync::Arc;

use crate::watch::fanout::QueueTx;
use crate::watch::filter::{FieldRef, Meta, Selector};

/// One subscriber as the stream sees it.
pub(crate) struct Sub {
    pub(crate) id: u64,
    pub(crate) sel: Arc<Selector>,
    pub(crate) bookmarks: bool,
    /// Events at or below this RV were already sent (or predate the join).
    pub(crate) min_rv: u64,
    /// Bounded; full = the client is not reading = evicted.
    pub(crate) tx: QueueTx,
}

/// Every subscriber of one stream.
#[derive(Default)]
pub(crate) struct Subs {
    /// Subscribers filed under no field value.
    flat: Vec<Sub>,
    /// field → value → subscribers; no empty lists or maps are kept, so the
    /// outer keys are exactly the fields subscribers are filed under.
    filed: HashMap<FieldRef, HashMap<Box<str>, Vec<Sub>>>,
}

impl Subs {
    /// How many (a walk over the files: for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.flat.len()
            + self
                .filed
                .values()
                .flat_map(HashMap::values)
                .map(Vec::len)
                .sum::<usize>()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.flat.is_empty() && self.filed.is_empty()
    }

    pub(crate) fn push(&mut self, sub: Sub) {
        match sub.sel.index_key() {
            None => self.flat.push(sub),
            Some((field, value)) => {
                let value: Box<str> = value.into();
                self.filed
                    .entry(field)
                    .or_default()
                    .entry(value)
                    .or_default()
                    .push(sub);
            }
        }
    }

    /// Removes subscriber `id`, whose selector is `sel`.
    pub(crate) fn remove(&mut self, id: u64, sel: &Selector) -> Option<Sub> {
        let Some((field, value)) = sel.index_key() else {
            let i = self.flat.iter().position(|s| s.id == id)?;
            return Some(self.flat.swap_remove(i));
        };
        let values = self.filed.get_mut(&field)?;
        let list = values.get_mut(value)?;
        let i = list.iter().position(|s| s.id == id)?;
        let sub = list.swap_remove(i);
        if list.is_empty() {
            values.remove(value);
            if values.is_empty() {
                self.filed.remove(&field);
            }
        }
        Some(sub)
    }

    pub(crate) fn find(&self, id: u64, sel: &Selector) -> Option<&Sub> {
        let list = match sel.index_key() {
            None => &self.flat,
            Some((field, value)) => self.filed.get(&field)?.get(value)?,
        };
        list.iter().find(|s| s.id == id)
    }

    /// Takes every subscriber out.
    pub(crate) fn take(&mut self) -> impl Iterator<Item = Sub> {
        let (flat, filed) = (
            std::mem::take(&mut self.flat),
            std::mem::take(&mut self.filed),
        );
        flat.into_iter()
            .chain(filed.into_values().flat_map(HashMap::into_values).flatten())
    }

    /// Keeps the subscribers for which `keep` says so.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Sub) -> bool) {
        self.flat.retain(&mut keep);
        self.filed.retain(|_, values| {
            values.retain(|_, list| {
                list.retain(&mut keep);
                !list.is_empty()
            });
            !values.is_empty()
        });
    }

    /// Like [`Subs::retain`], but visits only the subscribers that can see
    /// a change from `old` to `new`; the others are kept. Per event: no
    /// allocation, a lookup per filed field and side of the change.
    pub(crate) fn retain_seeing(
        &mut self,
        old: Option<&Meta>,
        new: Option<&Meta>,
        mut keep: impl FnMut(&Sub) -> bool,
    ) {
        self.flat.retain(&mut keep);
        self.filed.retain(|&field, values| {
            let old_value = old.map(|m| m.field(field));
            let new_value = new
                .map(|m| m.field(field))
                .filter(|v| Some(*v) != old_value);
            for value in [old_value, new_value].into_iter().flatten() {
                if let Some(list) = values.get_mut(value) {
                    list.retain(&mut keep);
                    if list.is_empty() {
                        values.remove(value);
                    }
                }
            }
            !values.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::fanout::queue;

    fn sub(id: u64, field: Option<&str>) -> Sub {
        let fields = ["spec.nodeName"];
        let sel = Selector::parse(None, field, &fields).expect("selector");
        Sub {
            id,
            sel: Arc::new(sel),
            bookmarks: false,
            min_rv: 0,
            tx: queue(4).0,
        }
    }

    fn pod(node: &str) -> Meta {
        Meta {
            namespace: "default".into(),
            name: "p".into(),
            rv: 1,
            labels: Vec::new(),
            fields: vec![node.into()],
        }
    }

    fn seen(subs: &mut Subs, old: Option<&Meta>, new: Option<&Meta>) -> Vec<u64> {
        let mut ids = Vec::new();
        subs.retain_seeing(old, new, |s| {
            ids.push(s.id);
            true
        });
        ids.sort_unstable();
        ids
    }

    #[test]
    fn a_change_visits_the_flat_list_and_the_old_and_new_values_only() {
        let mut subs = Subs::default();
        subs.push(sub(1, None));
        subs.push(sub(2, Some("spec.nodeName=a")));
        subs.push(sub(3, Some("spec.nodeName=b")));
        subs.push(sub(4, Some("spec.nodeName=c")));
        subs.push(sub(5, Some("spec.nodeName!=a")));
        assert_eq!(subs.len(), 5);
        let (a, b) = (pod("a"), pod("b"));
        assert_eq!(seen(&mut subs, Some(&a), Some(&b)), vec![1, 2, 3, 5]);
        assert_eq!(seen(&mut subs, None, Some(&a)), vec![1, 2, 5]);
        assert_eq!(seen(&mut subs, Some(&b), None), vec![1, 3, 5]);
    }

    #[test]
    fn removal_and_eviction_keep_the_count_and_the_files_in_step() {
        let mut subs = Subs::default();
        for i in 0..10 {
            let f = format!("spec.nodeName=n{}", i % 3);
            subs.push(sub(i, (i % 2 == 0).then_some(f.as_str())));
        }
        let s4 = subs.find(4, &subs_sel("spec.nodeName=n1")).map(|s| s.id);
        assert_eq!(s4, Some(4));
        assert!(subs.remove(4, &subs_sel("spec.nodeName=n1")).is_some());
        assert!(subs.remove(4, &subs_sel("spec.nodeName=n1")).is_none());
        assert!(subs.remove(1, &Selector::default()).is_some());
        assert_eq!(subs.len(), 8);
        subs.retain(|s| s.id % 3 != 0);
        assert_eq!(subs.len(), 4);
        let n2 = pod("n2");
        subs.retain_seeing(None, Some(&n2), |s| s.id != 8);
        assert_eq!(subs.len(), 3);
        let left: Vec<u64> = {
            let mut v: Vec<u64> = subs.take().map(|s| s.id).collect();
            v.sort_unstable();
            v
        };
        assert_eq!(left, vec![2, 5, 7]);
        assert!(subs.is_empty() && subs.filed.is_empty());
    }

    fn subs_sel(f: &str) -> Selector {
        Selector::parse(None, Some(f), &["spec.nodeName"]).expect("selector")
    }
}
