//! Renewing the slots a replica holds, and what a renewal finds: slots
//! Redis dropped while this replica could not renew them (lapsed leases)
//! are taken back only where the cap has room.

use super::scripts::{NO_ROOM, RENEWED, TAKEN};
use super::*;

/// What one renewal found.
#[derive(Debug, Default)]
struct Found {
    /// Slots Redis had, and no longer had.
    lapsed: u64,
    /// Of those, taken back.
    retaken: u64,
    /// Slots held here that Redis does not count after the renewal.
    unregistered: u64,
}

impl Global {
    /// Extends every held slot's lease, one script call per slot set
    /// ([`RENEW_SCRIPT`]), and registers those Redis does not have where
    /// their cap allows.
    ///
    /// Redis may lack a slot this replica holds: taken while Redis was
    /// away, forgotten by a restarted Redis, or *lapsed*: this replica
    /// could not renew it within the lease (a stall longer than
    /// `leaseSeconds`: a paused process, a VM migration, a network cut),
    /// and Redis dropped it, so the fleet may have admitted someone else
    /// in its place. Such a slot is taken again only where the cap leaves
    /// room, never past it; the rest stay held here, uncounted in Redis
    /// (`breakwater_global_limits_unregistered`), and are tried again at
    /// every renewal until they end. A released slot is never brought
    /// back: Redis only renews what it still has, and a slot taken again
    /// by a renewal that raced its release is released again.
    pub(super) async fn renew(&self) -> Result<(), GlobalError> {
        let mut conn = self.connection()?;
        let leases: Vec<(u64, Lease)> = self
            .inner
            .held()
            .iter()
            .map(|(id, l)| (*id, l.clone()))
            .collect();
        metrics::gauge!("breakwater_global_limits_leases").set(leases.len() as f64);
        let mut sets: HashMap<Arc<str>, Vec<(u64, Lease)>> = HashMap::new();
        for (id, l) in leases {
            sets.entry(Arc::clone(&l.key)).or_default().push((id, l));
        }
        let lease_us = u64::try_from(self.inner.cfg.lease.as_micros()).unwrap_or(u64::MAX);
        let timeout = self.inner.cfg.timeout.max(Duration::from_millis(500));
        let mut found = Found::default();
        for (key, set) in &sets {
            for chunk in set.chunks(1000) {
                // The cap in force for the newest slot (a reload may have
                // changed it since older ones were taken).
                let cap = chunk
                    .iter()
                    .max_by_key(|(id, _)| *id)
                    .map_or(0, |(_, l)| l.cap);
                let mut call = self.inner.renew_script.key(&**key);
                call.arg(lease_us).arg(cap);
                for (_, l) in chunk {
                    call.arg(&*l.member);
                }
                let codes: Vec<i64> = tokio::time::timeout(timeout, call.invoke_async(&mut conn))
                    .await
                    .map_err(|_| GlobalError::Timeout(timeout))?
                    .map_err(GlobalError::Redis)?;
                if codes.len() != chunk.len() {
                    return Err(GlobalError::Answer(codes));
                }
                self.settle(chunk, &codes, &mut found);
            }
        }
        self.report(&found);
        Ok(())
    }

    /// Records what a renewal found for `chunk`: registered or not, lapsed
    /// or not; releases again a slot taken back after its release.
    fn settle(&self, chunk: &[(u64, Lease)], codes: &[i64], found: &mut Found) {
        let mut again = Vec::new();
        {
            let mut held = self.inner.held();
            for ((id, lease), &code) in chunk.iter().zip(codes) {
                if lease.registered && code != RENEWED {
                    found.lapsed += 1;
                    if code == TAKEN {
                        found.retaken += 1;
                    }
                }
                match held.get_mut(id) {
                    Some(l) => {
                        l.registered = code != NO_ROOM;
                        if !l.registered {
                            found.unregistered += 1;
                        }
                    }
                    // Released while this renewal ran: if the renewal took
                    // it back after the release, release it again.
                    None if code == TAKEN => again.push(lease.clone()),
                    None => {}
                }
            }
        }
        for lease in again {
            if self.inner.releases.try_send(lease).is_err() {
                metrics::counter!("breakwater_global_limits_releases_dropped_total").increment(1);
            }
        }
    }

    /// Publishes a renewal's findings; logs lapsed slots once per stall.
    fn report(&self, found: &Found) {
        metrics::gauge!("breakwater_global_limits_unregistered").set(found.unregistered as f64);
        if found.lapsed > 0 {
            metrics::counter!("breakwater_global_limits_lapsed_total").increment(found.lapsed);
            tracing::warn!(
                lapsed = found.lapsed,
                retaken = found.retaken,
                not_retaken = found.lapsed - found.retaken,
                lease = ?self.inner.cfg.lease,
                "slots this replica holds were gone from Redis (not renewed within the lease: a stalled process or a cut network; or Redis restarted); took back those the limits had room for, the others stay held, uncounted in Redis, until they end or room frees"
            );
        }
        let was = self
            .inner
            .unregistered
            .swap(found.unregistered, Ordering::Relaxed);
        if was > 0 && found.unregistered == 0 {
            tracing::info!("every slot this replica holds is counted in Redis again");
        }
    }
}
