//! Local quotas for the second admission step of `charges: upstream`
//! rules: units of their global limits taken from Redis ahead of time
//! (a batch of tokens, a block of in-flight leases), spent by the limiter
//! without a round trip ([`breakwater_limits::quota`]), topped up here
//! off the request path.

use super::scripts::gcra;
use super::*;

/// How often local quotas are looked at (besides when one runs out).
const QUOTA_TICK: Duration = Duration::from_millis(50);

/// Tokens a replica takes at once for a local quota: a twentieth of a
/// second of the rate, at most half its share of the burst, at least 1.
fn token_batch(r: &RateLimit, replicas: u32) -> u64 {
    let by_rate = (r.rate * 0.05).ceil() as u64;
    let by_burst = r.burst / (2 * u64::from(replicas.max(1)));
    by_rate.min(by_burst).max(1)
}

/// In-flight slots a replica keeps spare for a local quota: a quarter of
/// its share of the cap, at most 8, at least 1.
fn slot_block(cap: u64, replicas: u32) -> u64 {
    (cap / (4 * u64::from(replicas.max(1)))).clamp(1, 8)
}

/// The quota filler's memory.
#[derive(Debug, Default)]
pub(super) struct QuotaBook {
    /// Pooled in-flight leases (ids in `held`) per slot set.
    pool: HashMap<Arc<str>, Vec<u64>>,
    /// Per bucket key: not before (it was empty).
    retry_at: HashMap<Arc<str>, tokio::time::Instant>,
    /// Unspent tokens to give back to their buckets (key, emission µs,
    /// tokens) before the filler ends (the backend retired).
    refunds: Vec<(Arc<str>, i64, u64)>,
}

impl Global {
    /// Keeps the local quotas of `charges: upstream` rules filled while
    /// Redis is in charge: every [`QUOTA_TICK`], and at once when one runs
    /// out.
    pub(super) async fn quota_loop(self, limiter: Arc<Limiter>, stop: CancellationToken) {
        let wake = Arc::clone(&self.inner.quota_wake);
        limiter.set_quota_hook(Arc::new(move || wake.notify_one()));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.inner.quota_wake.notified() => {}
                _ = tokio::time::sleep(QUOTA_TICK) => {}
            }
            if !self.is_up() || !limiter.global_active() {
                continue;
            }
            if let Err(err) = self.fill(&limiter, None).await {
                metrics::counter!("breakwater_global_limits_errors_total", "op" => "quota")
                    .increment(1);
                tracing::debug!(error = %Chain(&err), "filling the local quotas failed");
            }
        }
    }

    /// Gives the unspent tokens [`Global::drop_quotas`] set aside back to
    /// their buckets (the backend is ending: retired, or shutting down).
    pub(super) async fn refund_tokens(&self) {
        let refunds = std::mem::take(&mut self.inner.quotas().refunds);
        if refunds.is_empty() {
            return;
        }
        let Some(conn) = self.inner.conn.load_full() else {
            return;
        };
        let mut conn = (*conn).clone();
        for (key, emission, n) in refunds {
            let mut call = self.inner.refund_script.key(&*key);
            call.arg(emission).arg(n);
            let _ = tokio::time::timeout(
                self.inner.cfg.timeout.max(Duration::from_millis(200)),
                call.invoke_async::<i64>(&mut conn),
            )
            .await;
        }
    }

    /// Tops up the local quotas of every `charges: upstream` rule: a batch
    /// of tokens when a bucket's quota is empty, a block of in-flight
    /// leases when no slot is free, and gives back free slots past one
    /// block. With `only`, for a request that found that rule's quota
    /// empty and waits: one more batch and block whatever is left (others
    /// may have taken what a fill before left for it). Fills run one at a
    /// time.
    pub async fn fill(&self, limiter: &Limiter, only: Option<&str>) -> Result<(), GlobalError> {
        let _one = self.inner.filling.lock().await;
        let mut conn = self.connection()?;
        let replicas = limiter.limits().replicas();
        let timeout = self.inner.cfg.timeout;
        let forced = only.is_some();
        for q in limiter.upstream_quotas() {
            if only.is_some_and(|r| r != &*q.rule) {
                continue;
            }
            for (unit, what, limit) in [
                (Unit::Rate, "rate", q.rate),
                (Unit::WatchOpen, "watch_opens", q.watch_opens),
            ] {
                let Some(r) = limit else { continue };
                if q.quota.available(unit) > 0 && !forced {
                    continue;
                }
                let key: Arc<str> = Arc::from(self.key(&q.rule, what));
                let now = tokio::time::Instant::now();
                let not_before = self.inner.quotas().retry_at.get(&key).copied();
                if not_before.is_some_and(|t| t > now) {
                    continue;
                }
                let (emission, tolerance) = gcra(&r);
                let mut call = self.inner.tokens_script.key(&*key);
                call.arg(emission)
                    .arg(tolerance)
                    .arg(token_batch(&r, replicas));
                let answer: Vec<i64> = tokio::time::timeout(timeout, call.invoke_async(&mut conn))
                    .await
                    .map_err(|_| GlobalError::Timeout(timeout))?
                    .map_err(GlobalError::Redis)?;
                match answer.as_slice() {
                    [k, _] if *k > 0 => {
                        // Not into the quotas of the backend that replaced
                        // this one (they lapse with the bucket instead).
                        let retired = self.inner.retired();
                        if !*retired {
                            q.quota.grant(unit, u64::try_from(*k).unwrap_or(0));
                        }
                        drop(retired);
                        self.inner.quotas().retry_at.remove(&key);
                    }
                    [_, wait] => {
                        let wait = Duration::from_micros(u64::try_from(*wait).unwrap_or(0));
                        self.inner.quotas().retry_at.insert(key, now + wait);
                    }
                    _ => return Err(GlobalError::Answer(answer)),
                }
            }
            if let Some(cap) = q.inflight {
                let key: Arc<str> = Arc::from(self.key(&q.rule, "inflight"));
                let block = slot_block(cap, replicas);
                let free = q.quota.available(Unit::Inflight);
                if free == 0 || forced {
                    let ids: Vec<u64> = (0..block)
                        .map(|_| self.inner.next.fetch_add(1, Ordering::Relaxed))
                        .collect();
                    let members: Vec<String> = ids
                        .iter()
                        .map(|id| format!("{}:{id}", self.inner.replica))
                        .collect();
                    let mut call = self.inner.slots_script.key(&*key);
                    call.arg(u64::try_from(self.inner.cfg.lease.as_micros()).unwrap_or(u64::MAX))
                        .arg(cap);
                    for m in &members {
                        call.arg(m);
                    }
                    let added: u64 = tokio::time::timeout(timeout, call.invoke_async(&mut conn))
                        .await
                        .map_err(|_| GlobalError::Timeout(timeout))?
                        .map_err(GlobalError::Redis)?;
                    let added = usize::try_from(added).unwrap_or(0).min(ids.len());
                    let retired = self.inner.retired();
                    // Retired meanwhile: the leases lapse in the old Redis.
                    if added > 0 && !*retired {
                        let mut held = self.inner.held();
                        let mut book = self.inner.quotas();
                        for (id, member) in ids.iter().zip(members).take(added) {
                            held.insert(
                                *id,
                                Lease {
                                    key: Arc::clone(&key),
                                    member: Arc::from(member),
                                    cap,
                                    registered: true,
                                    adopted: false,
                                },
                            );
                            book.pool.entry(Arc::clone(&key)).or_default().push(*id);
                        }
                        q.quota.grant(Unit::Inflight, added as u64);
                    }
                } else if free > block {
                    let n = q.quota.take_back(Unit::Inflight, free - block);
                    let gone: Vec<Lease> = {
                        let mut held = self.inner.held();
                        let mut book = self.inner.quotas();
                        let pool = book.pool.entry(Arc::clone(&key)).or_default();
                        let keep = pool.len().saturating_sub(usize::try_from(n).unwrap_or(0));
                        pool.split_off(keep)
                            .into_iter()
                            .filter_map(|id| held.remove(&id))
                            .collect()
                    };
                    for lease in gone.into_iter().filter(|l| l.registered) {
                        if self.inner.releases.try_send(lease).is_err() {
                            metrics::counter!("breakwater_global_limits_releases_dropped_total")
                                .increment(1);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Forgets the local quotas (Redis failed, or this backend retired):
    /// the second step is local again; pooled slots leave `held` (sent to
    /// be released if `release`, else they lapse); unspent tokens are
    /// kept for a refund when `refund`.
    pub(super) fn drop_quotas(&self, limiter: &Limiter, release: bool, refund: bool) {
        let mut refunds = Vec::new();
        for q in limiter.upstream_quotas() {
            let (rate, watch_opens) = q.quota.reset();
            for (n, what, limit) in [
                (rate, "rate", q.rate),
                (watch_opens, "watch_opens", q.watch_opens),
            ] {
                if let (true, Some(r)) = (n > 0, limit) {
                    refunds.push((Arc::from(self.key(&q.rule, what)), gcra(&r).0, n));
                }
            }
        }
        let pool: Vec<u64> = {
            let mut book = self.inner.quotas();
            if refund {
                book.refunds.extend(refunds);
            }
            book.retry_at.clear();
            book.pool.drain().flat_map(|(_, ids)| ids).collect()
        };
        let gone: Vec<Lease> = {
            let mut held = self.inner.held();
            pool.iter().filter_map(|id| held.remove(id)).collect()
        };
        if release {
            for lease in gone.into_iter().filter(|l| l.registered) {
                if self.inner.releases.try_send(lease).is_err() {
                    metrics::counter!("breakwater_global_limits_releases_dropped_total")
                        .increment(1);
                }
            }
        }
    }
}
