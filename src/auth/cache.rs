//! Verified tokens, so that a client reusing its token does not pay an RSA
//! or ECDSA verification per request. Bounded; an entry is never used past
//! the token's `exp`; a hash collision cannot hand one token's claims to
//! another, since the stored token is compared in full.

use std::sync::Arc;

use super::Claims;

struct Verified {
    token: Box<str>,
    claims: Arc<Claims>,
    exp: u64,
    /// The key set it was verified with; a new set (a rotation that may
    /// have withdrawn a key) makes it verify again.
    keys: u64,
}

/// Weighs an entry by the bytes it holds, roughly.
#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<u64, Arc<Verified>> for ByBytes {
    fn weight(&self, _key: &u64, v: &Arc<Verified>) -> u64 {
        (v.token.len() + 64 * v.claims.len() + 128) as u64
    }
}

pub struct TokenCache {
    entries: quick_cache::sync::Cache<u64, Arc<Verified>, ByBytes>,
    // Keyed per process, so nobody can aim tokens at one slot. aHash, not
    // SipHash: a token is a few hundred bytes, hashed on every request, and
    // the stored token is compared in full anyway.
    hasher: ahash::RandomState,
}

impl TokenCache {
    /// A cache holding about `bytes` of tokens and claims.
    pub fn new(bytes: usize) -> Self {
        TokenCache {
            entries: quick_cache::sync::Cache::with_weighter(bytes / 512, bytes as u64, ByBytes),
            hasher: ahash::RandomState::new(),
        }
    }

    pub fn get(&self, token: &str, now: u64, keys: u64) -> Option<Arc<Claims>> {
        let key = self.hasher.hash_one(token);
        let hit = self.entries.get(&key)?;
        if &*hit.token != token {
            return None;
        }
        if now >= hit.exp || hit.keys != keys {
            self.entries.remove(&key);
            return None;
        }
        Some(Arc::clone(&hit.claims))
    }

    pub fn insert(&self, token: &str, claims: Arc<Claims>, exp: u64, keys: u64) {
        let key = self.hasher.hash_one(token);
        self.entries.insert(
            key,
            Arc::new(Verified {
                token: token.into(),
                claims,
                exp,
                keys,
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_with_the_token_and_never_cross_tokens() {
        let cache = TokenCache::new(64 * 1024);
        let claims = Arc::new(Claims::new());
        cache.insert("a.b.c", Arc::clone(&claims), 100, 1);
        assert!(cache.get("a.b.c", 99, 1).is_some());
        assert!(cache.get("a.b.d", 99, 1).is_none());
        assert!(
            cache.get("a.b.c", 99, 2).is_none(),
            "a new key set verifies again"
        );
        cache.insert("a.b.c", Arc::clone(&claims), 100, 1);
        assert!(cache.get("a.b.c", 100, 1).is_none());
        assert!(
            cache.get("a.b.c", 50, 1).is_none(),
            "an expired entry is dropped"
        );
    }

    #[test]
    fn it_is_bounded() {
        let cache = TokenCache::new(64 * 1024);
        for i in 0..10_000 {
            cache.insert(
                &format!("token-{i:0>1000}"),
                Arc::new(Claims::new()),
                u64::MAX,
                0,
            );
        }
        assert!(
            cache.entries.weight() <= 64 * 1024,
            "{}",
            cache.entries.weight()
        );
        assert!(cache.entries.len() < 100, "{}", cache.entries.len());
    }
}
