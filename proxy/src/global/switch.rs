//! Changing backends on reload: the backend a reload brings in adopts
//! the slots held before it took over, and releases them as their
//! requests end; the one it replaces steps down (see
//! `Admission::switch_backend`).

use super::*;

impl Global {
    /// Takes over from whatever enforced the aggregate limits before (the
    /// local limiter, or another backend): the slots `held` counts that no
    /// hold of this backend stands for belong to requests admitted
    /// before; they get leases here, registered (within the caps) when
    /// Redis answers, and released as those requests end (each renewal
    /// compares the leases with the counts again, `Global::reconcile`).
    pub fn adopt(&self, held: &[GlobalHeld]) {
        let counts = self.counts(held);
        let mut map = self.inner.held();
        let mut tracked: HashMap<&str, u64> = HashMap::new();
        for l in map.values() {
            *tracked.entry(&*l.key).or_default() += 1;
        }
        let mut adopted = Vec::new();
        for (key, cap, count) in counts {
            let untracked = count.saturating_sub(tracked.get(&*key).copied().unwrap_or(0));
            for _ in 0..untracked {
                adopted.push((key.clone(), cap));
            }
        }
        drop(tracked);
        let n = adopted.len();
        for (key, cap) in adopted {
            let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
            map.insert(
                id,
                Lease {
                    key,
                    member: Arc::from(format!("{}:{id}", self.inner.replica)),
                    cap,
                    registered: false,
                    adopted: true,
                },
            );
        }
        if n > 0 {
            tracing::info!(
                slots = n,
                "the new limits backend takes over the slots of requests admitted before it"
            );
        }
    }

    /// Releases adopted leases whose requests ended: per slot set, as many
    /// as the count there exceeds the holds of this backend's own requests.
    /// Reads the counts before the holds, and a permit drops its hold
    /// before its counts, so a request ending or starting meanwhile can
    /// only make this keep a lease one round longer, never drop one too
    /// many.
    pub(super) fn reconcile(&self, limiter: &Limiter) {
        let counts = self.counts(&limiter.global_held());
        let mut gone = Vec::new();
        {
            let mut map = self.inner.held();
            if !map.values().any(|l| l.adopted) {
                return;
            }
            let mut excess: HashMap<Arc<str>, usize> = HashMap::new();
            for (key, _, count) in &counts {
                let (mut own, mut adopted) = (0usize, 0usize);
                for l in map.values().filter(|l| l.key == *key) {
                    if l.adopted {
                        adopted += 1;
                    } else {
                        own += 1;
                    }
                }
                let keep = usize::try_from(*count)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(own);
                excess.insert(Arc::clone(key), adopted.saturating_sub(keep));
            }
            // Adopted leases of a rule that is gone (or lost its cap) stand
            // for nothing any more: all of them go.
            let ids: Vec<u64> = map
                .iter()
                .filter(|(_, l)| l.adopted)
                .filter_map(|(id, l)| match excess.get_mut(&l.key) {
                    None => Some(*id),
                    Some(0) => None,
                    Some(n) => {
                        *n -= 1;
                        Some(*id)
                    }
                })
                .collect();
            for id in ids {
                if let Some(l) = map.remove(&id) {
                    gone.push(l);
                }
            }
        }
        for lease in gone.into_iter().filter(|l| l.registered) {
            if self.inner.releases.try_send(lease).is_err() {
                metrics::counter!("breakwater_global_limits_releases_dropped_total").increment(1);
            }
        }
    }

    /// `held` as (slot set key, cap, count).
    pub(super) fn counts(&self, held: &[GlobalHeld]) -> Vec<(Arc<str>, u64, u64)> {
        let mut out = Vec::new();
        for h in held {
            if let Some((cap, count)) = h.watches {
                out.push((Arc::from(self.key(&h.rule, "watches")), cap, count));
            }
            if let Some((cap, count)) = h.inflight {
                out.push((Arc::from(self.key(&h.rule, "inflight")), cap, count));
            }
        }
        out
    }

    /// Steps down for another backend: never hands the limits to
    /// `limiter` again (and takes them back now), removes every slot it
    /// holds from its Redis (the requests stay open; the next backend
    /// counts them), and ends its tasks. Dropping a permit afterwards
    /// releases nothing here.
    pub fn retire(&self, limiter: &Limiter) {
        {
            let mut retired = self
                .inner
                .retired
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *retired = true;
            limiter.set_global(false);
        }
        if self.inner.up.swap(false, Ordering::Relaxed) {
            metrics::gauge!("breakwater_global_limits_up").set(0.0);
        }
        self.drop_quotas(limiter, true, true);
        let leases: Vec<Lease> = self
            .inner
            .held()
            .drain()
            .map(|(_, l)| l)
            .filter(|l| l.registered)
            .collect();
        if !self.inner.abandoned.load(Ordering::Relaxed) {
            for lease in leases {
                if self.inner.releases.try_send(lease).is_err() {
                    metrics::counter!("breakwater_global_limits_releases_dropped_total")
                        .increment(1);
                }
            }
        }
        // The release loop sends what is queued before it ends.
        if let Some(stop) = self
            .inner
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            stop.cancel();
        }
    }
}
