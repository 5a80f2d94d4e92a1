//! The Lua scripts the Redis backend runs. Each reads and changes one
//! rule's keys atomically, with Redis' own clock (`TIME`), so replicas'
//! clocks do not matter.

use breakwater_limits::RateLimit;

/// Checks and takes a request's slot and tokens, all or nothing.
///
/// KEYS: 1 watch slots, 2 in-flight slots (sorted sets: member = lease,
/// score = expiry in µs), 3 rate TAT, 4 watch-open TAT (strings, µs).
/// ARGV: 1 lease member, 2 lease µs, 3 watch cap, 4 in-flight cap (-1: not
/// taken), 5/6 rate emission/tolerance µs, 7/8 the same for watch opens
/// (tolerance -1: not taken). Returns {0, 0} granted, or {reason, wait µs}
/// with reason 1 watches, 2 in-flight, 3 rate, 4 watch opens.
///
/// Numbers leave Lua through `string.format('%.0f')`: Redis would format
/// them with 14 significant digits, losing microseconds.
pub(super) const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[2])
local function full(key, cap)
  if cap < 0 then return false end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', now))
  return redis.call('ZCARD', key) >= cap
end
local wcap = tonumber(ARGV[3])
if full(KEYS[1], wcap) then return {1, 0} end
local icap = tonumber(ARGV[4])
if full(KEYS[2], icap) then return {2, 0} end
local function gcra(key, emission, tolerance)
  if tolerance < 0 then return 0, nil end
  local tat = tonumber(redis.call('GET', key) or '0')
  local new = math.max(tat, now) + emission
  if new - now > tolerance then return new - now - tolerance, nil end
  return 0, new
end
local rwait, rnew = gcra(KEYS[3], tonumber(ARGV[5]), tonumber(ARGV[6]))
if rwait > 0 then return {3, rwait} end
local wwait, wnew = gcra(KEYS[4], tonumber(ARGV[7]), tonumber(ARGV[8]))
if wwait > 0 then return {4, wwait} end
local expiry = string.format('%.0f', now + lease)
if wcap >= 0 then redis.call('ZADD', KEYS[1], expiry, ARGV[1]) end
if icap >= 0 then redis.call('ZADD', KEYS[2], expiry, ARGV[1]) end
if rnew then
  redis.call('SET', KEYS[3], string.format('%.0f', rnew), 'PX', math.ceil((rnew - now) / 1000) + 1000)
end
if wnew then
  redis.call('SET', KEYS[4], string.format('%.0f', wnew), 'PX', math.ceil((wnew - now) / 1000) + 1000)
end
return {0, 0}
"#;

/// Renews this replica's slots in one sorted set, and takes back those
/// Redis no longer has where the cap allows.
///
/// KEYS: 1 the slot set. ARGV: 1 lease µs, 2 the cap, 3.. lease members.
/// Returns one code per member: 0 renewed (Redis had it), 1 taken (Redis
/// did not have it: it had lapsed, or was taken while Redis was away, and
/// there was room), 2 not taken (no room under the cap).
///
/// Members Redis has are renewed first, so that the room left is counted
/// with them; a member is only ever added when the set, without expired
/// members, is below the cap.
pub(super) const RENEW_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local expiry = string.format('%.0f', now + tonumber(ARGV[1]))
local cap = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
local out = {}
for i = 3, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
    out[i - 2] = 0
  else
    out[i - 2] = 2
  end
end
local count = redis.call('ZCARD', KEYS[1])
for i = 3, #ARGV do
  if out[i - 2] == 2 and count < cap then
    redis.call('ZADD', KEYS[1], expiry, ARGV[i])
    count = count + 1
    out[i - 2] = 1
  end
end
return out
"#;

/// Takes up to ARGV[3] tokens at once from a GCRA bucket (a local quota's
/// batch), as many as its burst allows now.
///
/// KEYS: 1 the bucket's TAT. ARGV: 1 emission µs, 2 tolerance µs, 3 the
/// most wanted. Returns {taken, 0}, or {0, wait µs} when not one is there.
pub(super) const TOKENS_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local e = tonumber(ARGV[1])
local tol = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local base = math.max(tat, now)
local k = math.min(math.floor((tol - (base - now)) / e), tonumber(ARGV[3]))
if k < 1 then return {0, math.ceil(base + e - now - tol)} end
local new = base + k * e
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
return {k, 0}
"#;

/// Gives back ARGV[2] unspent tokens to a GCRA bucket (never below now).
///
/// KEYS: 1 the bucket's TAT. ARGV: 1 emission µs, 2 tokens.
pub(super) const REFUND_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat <= now then return 0 end
local new = math.max(now, tat - tonumber(ARGV[1]) * tonumber(ARGV[2]))
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
return 1
"#;

/// Leases a block of in-flight slots for a local quota: adds the members
/// while the set, without expired members, is below the cap.
///
/// KEYS: 1 the slot set. ARGV: 1 lease µs, 2 the cap, 3.. members.
/// Returns how many were added (the first ones).
pub(super) const SLOTS_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local expiry = string.format('%.0f', now + tonumber(ARGV[1]))
local cap = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
local count = redis.call('ZCARD', KEYS[1])
local added = 0
for i = 3, #ARGV do
  if count >= cap then break end
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
  count = count + 1
  added = added + 1
end
return added
"#;

/// A bucket's GCRA constants in whole µs: (emission interval, tolerance),
/// rounded up like the local bucket's ns.
pub(super) fn gcra(r: &RateLimit) -> (i64, i64) {
    let e = r.emission_interval();
    let emission = i64::try_from(e.as_micros()).unwrap_or(i64::MAX).max(1)
        + i64::from(!e.subsec_nanos().is_multiple_of(1000));
    (
        emission,
        emission.saturating_mul(i64::try_from(r.burst).unwrap_or(i64::MAX)),
    )
}

/// What a renewal found for one held slot ([`RENEW_SCRIPT`]'s codes).
pub(super) const RENEWED: i64 = 0;
pub(super) const TAKEN: i64 = 1;
pub(super) const NO_ROOM: i64 = 2;
