//! Rate-limit counts shared by the cluster: the same sliding rule as a
//! local limit (`ratelimit`), counted in Redis by one script call per
//! request, so instances never read-then-write.
//!
//! Each key is one hash, `PREFIXrl:ROUTE:PER_US:DIGEST`, whose fields are
//! sub-window numbers (Redis's clock divided by `per / SUB_WINDOWS`) and
//! whose values are the requests admitted in them. The script drops the
//! sub-windows that left the window, sums the rest, admits the request
//! only if the sum is under the limit (a refused request spends nothing),
//! and lets the hash expire with the window. One clock (the server's)
//! serves every instance, so their sub-windows agree.
//!
//! The key's digest is SHA-256 of what the limit is keyed by: a header
//! value (an API key, say) never reaches the store, and no client can aim
//! two keys at one count.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{Cluster, StoreError};

/// `KEYS[1]` the key's hash; `ARGV` the limit, the sub-window length in
/// microseconds and the number of sub-windows a window spans. Answers
/// `{admitted, used, reset_us, retry_us}`: whether the request was counted,
/// the window's count after it, when the newest sub-window leaves (the
/// whole budget is back) and when the oldest does (one more request fits).
const COUNT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local sub = tonumber(ARGV[2])
local slots = tonumber(ARGV[3])
local period = math.floor(now / sub)
local fields = redis.call('HGETALL', KEYS[1])
local used, oldest = 0, period
for i = 1, #fields, 2 do
  local p = tonumber(fields[i])
  if p <= period - slots then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    used = used + tonumber(fields[i + 1])
    if p < oldest then oldest = p end
  end
end
local function leaves(p) return (p + slots) * sub - now end
if used >= limit then
  return {0, used, leaves(period), leaves(oldest)}
end
redis.call('HINCRBY', KEYS[1], period, 1)
redis.call('PEXPIRE', KEYS[1], math.ceil(slots * sub / 1000))
return {1, used + 1, leaves(period), 0}
";

/// What the store counted for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub admitted: bool,
    /// Requests in the window, this one included if admitted.
    pub used: u64,
    pub reset: Duration,
    pub retry_after: Duration,
}

/// One route's limit counted in the cluster's store.
pub struct SharedCount {
    pub cluster: Arc<Cluster>,
    /// `PREFIXrl:ROUTE:PER_US:`, before each key's digest: a changed `per`
    /// counts afresh (its sub-windows are numbered differently).
    key_base: String,
    sub_us: u64,
    slots: u64,
    script: redis::Script,
}

impl std::fmt::Debug for SharedCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shared count {} on {:?}", self.key_base, self.cluster)
    }
}

impl SharedCount {
    /// Counts for `route` with sub-windows of `sub_len`, `slots` of them to
    /// a window.
    pub fn new(
        cluster: Arc<Cluster>,
        route: &str,
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
            script: redis::Script::new(COUNT),
        }
    }

    /// A hasher for the key: feed it what `RequestKey::hash_into` feeds.
    pub fn key_hasher() -> KeyDigest {
        KeyDigest(Sha256::new())
    }

    /// Counts one request of the key `digest` against `limit`.
    pub async fn count(&self, digest: KeyDigest, limit: u64) -> Result<Counted, StoreError> {
        let key = digest.key(&self.key_base);
        let answer: (u64, u64, i64, i64) = self
            .cluster
            .call(|mut connection| async move {
                self.script
                    .key(key)
                    .arg(limit)
                    .arg(self.sub_us)
                    .arg(self.slots)
                    .invoke_async(&mut connection)
                    .await
            })
            .await?;
        let micros = |us: i64| Duration::from_micros(us.max(0) as u64);
        Ok(Counted {
            admitted: answer.0 == 1,
            used: answer.1,
            reset: micros(answer.2),
            retry_after: micros(answer.3),
        })
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
