//! Rate-limit counts shared by the cluster: the same sliding rule as a
//! local limit (`ratelimit`), counted in Redis by one script call, so
//! instances never read-then-write.
//!
//! Each key is one hash, `PREFIXrl:ROUTE:PER_US:DIGEST`, whose fields are
//! sub-window numbers (Redis's clock divided by `per / SUB_WINDOWS`) and
//! whose values are the requests admitted in them. The script drops the
//! sub-windows that left the window, sums the rest, admits only what fits
//! under the limit (a refused request spends nothing), and lets the hash
//! expire with the window. One clock (the server's) serves every instance,
//! so their sub-windows agree.
//!
//! **Leases.** A busy key would cost a round trip per request, so an
//! instance may take several admissions at once (a lease), counted in
//! Redis when taken, in the sub-window it was taken in, and spent only
//! before that sub-window ends (by this instance's clock, measured from
//! when the call was sent, so never after Redis's end of it). Every
//! admission is thus counted in Redis in the sub-window it happens in,
//! before it happens: the bound of the sliding rule holds exactly across
//! any number of instances; a lease can only make the cluster admit less,
//! never more. To keep that small, a lease starts at one admission, doubles
//! while a key uses its leases up within a sub-window (halves after one
//! that lapsed), never exceeds 2% of the limit (so a limit under 100 is
//! counted one request at a time), and what a lapsed lease did not spend
//! is given back to its sub-window with the next call. A refusal is
//! remembered until the sub-window ends (the window moves on only then), so
//! a client hammering a spent budget costs the store one call per
//! sub-window, not one per request.
//!
//! The key's digest is SHA-256 of what the limit is keyed by: a header
//! value (an API key, say) never reaches the store, and no client can aim
//! two keys at one count.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{Cluster, StoreError};

/// `KEYS[1]` the key's hash; `ARGV`: the limit, the sub-window length in
/// microseconds, the sub-windows a window spans, the admissions wanted, and
/// a sub-window and count to give back (a lapsed lease's rest; count 0 for
/// none). Answers `{granted, used, reset_us, retry_us, lease_us, period}`:
/// the admissions counted (0: refused), the window's count after them, when
/// the newest sub-window leaves (the whole budget is back), when the oldest
/// does (one more request fits), how long the current sub-window still
/// lasts, and its number.
const COUNT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local sub = tonumber(ARGV[2])
local slots = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local back = tonumber(ARGV[6])
local period = math.floor(now / sub)
if back > 0 then
  local held = tonumber(redis.call('HGET', KEYS[1], ARGV[5]) or '0')
  if held > 0 then
    redis.call('HINCRBY', KEYS[1], ARGV[5], -math.min(held, back))
  end
end
local fields = redis.call('HGETALL', KEYS[1])
local used, oldest = 0, period
for i = 1, #fields, 2 do
  local p = tonumber(fields[i])
  local n = tonumber(fields[i + 1])
  if p <= period - slots then
    redis.call('HDEL', KEYS[1], fields[i])
  elseif n > 0 then
    used = used + n
    if p < oldest then oldest = p end
  end
end
local function leaves(p) return (p + slots) * sub - now end
local lasts = (period + 1) * sub - now
local grant = math.min(want, limit - used)
if grant <= 0 then
  return {0, used, leaves(period), leaves(oldest), lasts, period}
end
redis.call('HINCRBY', KEYS[1], period, grant)
redis.call('PEXPIRE', KEYS[1], math.ceil(slots * sub / 1000))
return {grant, used + grant, leaves(period), 0, lasts, period}
";

/// The largest lease, whatever the limit.
const MAX_LEASE: u64 = 1024;
/// Keys holding a lease at once, per limit.
const MAX_LEASED_KEYS: u64 = 65_536;

/// What the store (or this instance's lease) decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub admitted: bool,
    /// What the cluster has left, as far as this instance knows.
    pub remaining: u64,
    pub reset: Duration,
    pub retry_after: Duration,
}

/// Admissions taken from the store for one key, to spend before `expires`.
#[derive(Debug, Clone, Copy)]
struct Lease {
    period: u64,
    expires: Instant,
    left: u64,
    /// What the cluster had left once this lease was counted.
    cluster_left: u64,
    /// When the whole budget is back, as of the lease.
    reset_at: Instant,
    /// The store refused: until `expires`, so does this instance (the
    /// window moves on only when a sub-window ends, so nothing frees up
    /// before, but for a lapsed lease given back).
    refused: bool,
    /// When one more request would fit, for a refusal.
    retry_at: Instant,
    /// The size of the next lease.
    next: u64,
}

/// What a key's lease said before a call to the store.
enum Leased {
    Spent(Counted),
    Ask {
        want: u64,
        give_back: Option<(u64, u64)>,
    },
}

/// One route's limit counted in the cluster's store.
pub struct SharedCount {
    pub cluster: Arc<Cluster>,
    /// `PREFIXrl:ROUTE:PER_US:`, before each key's digest: a changed `per`
    /// counts afresh (its sub-windows are numbered differently).
    key_base: String,
    sub_us: u64,
    slots: u64,
    /// The largest lease: 2% of the limit, at least 1.
    max_lease: u64,
    leases: quick_cache::sync::Cache<u64, Lease>,
    script: Arc<redis::Script>,
}

impl std::fmt::Debug for SharedCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shared count {} on {:?}", self.key_base, self.cluster)
    }
}

impl SharedCount {
    /// Counts `limit` for `route` with sub-windows of `sub_len`, `slots` of
    /// them to a window of `per`.
    pub fn new(
        cluster: Arc<Cluster>,
        route: &str,
        limit: u64,
        per: Duration,
        sub_len: Duration,
        slots: u64,
    ) -> Self {
        let key_base = format!("{}rl:{route}:{}:", cluster.key_prefix, per.as_micros());
        SharedCount {
            cluster,
            key_base,
            sub_us: (sub_len.as_micros() as u64).max(1),
            slots,
            max_lease: (limit / 50).clamp(1, MAX_LEASE),
            leases: quick_cache::sync::Cache::new(MAX_LEASED_KEYS as usize),
            script: Arc::new(redis::Script::new(COUNT)),
        }
    }

    /// A hasher for the key: feed it what `RequestKey::hash_into` feeds.
    pub fn key_hasher() -> KeyDigest {
        KeyDigest(Sha256::new())
    }

    /// Counts one request of a key against `limit`: `local` is its hash in
    /// this process (the lease table), `digest` makes its digest when the
    /// store is asked.
    pub async fn count(
        &self,
        local: u64,
        digest: impl FnOnce() -> KeyDigest,
        limit: u64,
    ) -> Result<Counted, StoreError> {
        let now = Instant::now();
        let leased = match self.leases.get(&local) {
            Some(_) => self.spend(local, now),
            None => Leased::Ask {
                want: 1,
                give_back: None,
            },
        };
        let (want, give_back) = match leased {
            Leased::Spent(counted) => return Ok(counted),
            Leased::Ask { want, give_back } => (want, give_back),
        };
        let key = digest().key(&self.key_base);
        let (back_period, back) = give_back.unwrap_or((0, 0));
        let sent = Instant::now();
        let (script, sub_us, slots) = (Arc::clone(&self.script), self.sub_us, self.slots);
        let answer: (u64, u64, i64, i64, i64, u64) = self
            .cluster
            .call(move |mut connection| async move {
                script
                    .key(key)
                    .arg(limit)
                    .arg(sub_us)
                    .arg(slots)
                    .arg(want)
                    .arg(back_period)
                    .arg(back)
                    .invoke_async(&mut connection)
                    .await
            })
            .await?;
        let micros = |us: i64| Duration::from_micros(us.max(0) as u64);
        let (granted, used, reset, retry, lasts, period) = answer;
        let remaining = limit.saturating_sub(used);
        self.keep_lease(
            local,
            Lease {
                period,
                expires: sent + micros(lasts),
                left: granted.saturating_sub(1),
                cluster_left: remaining,
                reset_at: sent + micros(reset),
                refused: granted == 0,
                retry_at: sent + micros(retry),
                next: if granted == 0 {
                    1
                } else {
                    (want * 2).min(self.max_lease)
                },
            },
        );
        Ok(Counted {
            admitted: granted > 0,
            remaining: remaining + granted.saturating_sub(1),
            reset: micros(reset),
            retry_after: micros(retry),
        })
    }

    /// Spends one admission of the key's lease, or says what to ask the
    /// store for.
    fn spend(&self, local: u64, now: Instant) -> Leased {
        let result = self.leases.entry(&local, None, |_, lease| {
            if now < lease.expires && lease.refused {
                return quick_cache::sync::EntryAction::Retain(Leased::Spent(Counted {
                    admitted: false,
                    remaining: 0,
                    reset: lease.reset_at.saturating_duration_since(now),
                    retry_after: lease.retry_at.saturating_duration_since(now),
                }));
            }
            if now < lease.expires && lease.left > 0 {
                lease.left -= 1;
                return quick_cache::sync::EntryAction::Retain(Leased::Spent(Counted {
                    admitted: true,
                    remaining: lease.cluster_left + lease.left,
                    reset: lease.reset_at.saturating_duration_since(now),
                    retry_after: Duration::ZERO,
                }));
            }
            let lapsed = now >= lease.expires;
            let give_back = (lapsed && lease.left > 0).then_some((lease.period, lease.left));
            lease.left = 0;
            // Used up within its sub-window: a bigger one; lapsed: smaller.
            let want = if lapsed {
                (lease.next / 2).max(1)
            } else {
                lease.next
            };
            quick_cache::sync::EntryAction::Retain(Leased::Ask { want, give_back })
        });
        match result {
            quick_cache::sync::EntryResult::Retained(leased) => leased,
            _ => Leased::Ask {
                want: 1,
                give_back: None,
            },
        }
    }

    /// Stores a new lease; one taken by a concurrent request for the same
    /// sub-window adds to it rather than replacing it, and a refusal does
    /// not replace a lease that still holds admissions.
    fn keep_lease(&self, local: u64, new: Lease) {
        let result = self.leases.entry(&local, None, |_, lease| {
            if new.period > lease.period {
                *lease = new;
            } else if new.period < lease.period {
                // A late answer from an earlier sub-window: its admissions
                // have lapsed already.
            } else if new.refused {
                // A concurrent lease still holds admissions: keep them.
                if lease.left == 0 {
                    *lease = new;
                }
            } else {
                lease.left += new.left;
                lease.refused = false;
                lease.cluster_left = lease.cluster_left.min(new.cluster_left);
                lease.next = lease.next.max(new.next);
            }
            quick_cache::sync::EntryAction::Retain(())
        });
        if let quick_cache::sync::EntryResult::Vacant(guard) = result {
            let _ = guard.insert(new);
        }
    }
}

/// The digest of a request's key (see the module's doc).
pub struct KeyDigest(Sha256);

impl KeyDigest {
    fn key(self, base: &str) -> String {
        use std::fmt::Write;
        let digest = self.0.finalize();
        let mut key = String::with_capacity(base.len() + 32);
        key.push_str(base);
        // 128 bits: no collision among any number of keys a store holds.
        for b in &digest[..16] {
            let _ = write!(key, "{b:02x}");
        }
        key
    }
}

impl std::hash::Hasher for KeyDigest {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// Unused: the key is the whole digest (`key`).
    fn finish(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::Hasher;

    #[test]
    fn keys_are_digests_of_what_the_limit_counts_by() {
        let key = |bytes: &[u8]| {
            let mut d = SharedCount::key_hasher();
            d.write(bytes);
            d.key("gatehouse:rl:r:60000000:")
        };
        let a = key(b"secret-api-key");
        assert!(a.starts_with("gatehouse:rl:r:60000000:"));
        assert_eq!(a.len(), "gatehouse:rl:r:60000000:".len() + 32);
        assert!(!a.contains("secret"));
        assert_eq!(a, key(b"secret-api-key"), "the same on every instance");
        assert_ne!(a, key(b"secret-api-kez"));
    }
}
