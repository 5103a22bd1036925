//! The response cache's storage for pingora-cache: in memory, bounded by
//! `cache.max_size` (bodies and headers together), evicting the least
//! recently and least frequently used entries first (quick_cache's
//! CLOCK-Pro). Entries remember their path so a prefix can be purged.
//!
//! A fill holds its body in memory until it is complete. `max_size` bounds
//! all the cache holds: three quarters for stored entries, a quarter for
//! fills in flight. A fill reserves what it holds from that quarter and
//! from `server.max_buffered`; one that does not fit goes on without being
//! stored, so any number of concurrent misses cannot hold more.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_cache::key::{CacheHashKey, CompactCacheKey, HashBinary};
use pingora_cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
    PurgeType, Storage,
};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta};
use pingora_error::{Error, ErrorType, Result};

use crate::budget::{Budget, Held};

struct Entry {
    meta: (Vec<u8>, Vec<u8>),
    body: Bytes,
    /// The request path, for purges by prefix.
    path: Box<str>,
}

#[derive(Clone)]
struct EntrySize;

impl quick_cache::Weighter<HashBinary, Arc<Entry>> for EntrySize {
    fn weight(&self, _key: &HashBinary, e: &Arc<Entry>) -> u64 {
        (e.body.len() + e.meta.0.len() + e.meta.1.len() + e.path.len() + 96) as u64
    }
}

pub struct MemoryStorage {
    entries: quick_cache::sync::Cache<HashBinary, Arc<Entry>, EntrySize>,
    /// The largest single response kept: an eighth of the whole, so one
    /// response never empties the cache.
    max_entry: usize,
    /// Bodies of fills in flight: a quarter of `max_size`.
    fills: Arc<Budget>,
    /// `server.max_buffered`, shared with the other held bodies.
    buffered: Arc<Budget>,
}

impl MemoryStorage {
    pub fn new(configured: u64, buffered: Arc<Budget>) -> Self {
        let fills = configured / 4;
        let max_size = configured - fills;
        // A few shards: each holds an equal share of `max_size` and refuses
        // an entry heavier than about that share, so the shard count bounds
        // the largest response (and quick_cache's recency is per shard).
        let options = quick_cache::OptionsBuilder::new()
            .shards(4)
            .estimated_items_capacity((max_size / 4096).clamp(128, 1 << 20) as usize)
            .weight_capacity(max_size)
            .build();
        let entries = match options {
            Ok(o) => quick_cache::sync::Cache::with_options(
                o,
                EntrySize,
                Default::default(),
                Default::default(),
            ),
            Err(_) => quick_cache::sync::Cache::with_weighter(1024, max_size, EntrySize),
        };
        let shard = entries.shard_capacity();
        MemoryStorage {
            max_entry: ((configured / 8).min(shard * 9 / 10)) as usize,
            entries,
            fills: Budget::new(fills),
            buffered,
        }
    }

    /// Reserves `n` bytes for a fill from both budgets.
    fn reserve_fill(&self, n: u64) -> Option<(Held, Held)> {
        let fill = self.fills.reserve(n)?;
        let shared = self.buffered.reserve(n)?;
        Some((fill, shared))
    }

    /// The largest response kept.
    pub fn max_entry(&self) -> usize {
        self.max_entry
    }

    /// Bytes held now.
    #[cfg(test)]
    pub fn size(&self) -> u64 {
        self.entries.weight()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops every entry; returns how many there were.
    pub fn purge_all(&self) -> usize {
        let n = self.entries.len();
        self.entries.clear();
        n
    }

    /// Drops the entries whose path is `prefix` or below it (whole
    /// segments); returns how many.
    pub fn purge_prefix(&self, prefix: &str) -> usize {
        let prefix = prefix.trim_end_matches('/');
        let before = self.entries.len();
        self.entries.retain(|_, e| {
            let p = &*e.path;
            let under = prefix.is_empty()
                || (p.starts_with(prefix)
                    && matches!(p.as_bytes().get(prefix.len()), None | Some(b'/')));
            !under
        });
        before.saturating_sub(self.entries.len())
    }

    /// A fresh entry's body, for answers the gateway builds itself
    /// (aggregation), which do not pass through pingora-cache.
    pub fn get_fresh(&self, key: &HashBinary) -> Option<Bytes> {
        let entry = self.get(key)?;
        let meta = CacheMeta::deserialize(&entry.meta.0, &entry.meta.1).ok()?;
        meta.is_fresh(std::time::SystemTime::now())
            .then(|| entry.body.clone())
    }

    /// Stores such an answer.
    pub fn put(&self, key: HashBinary, meta: &CacheMeta, body: Bytes, path: &str) {
        if body.len() > self.max_entry {
            return;
        }
        if let Ok(meta) = meta.serialize() {
            self.entries.insert(
                key,
                Arc::new(Entry {
                    meta,
                    body,
                    path: path.into(),
                }),
            );
        }
    }

    fn get(&self, key: &HashBinary) -> Option<Arc<Entry>> {
        self.entries.get(key)
    }
}

/// The path part of a primary key written by `super::primary_key`.
fn path_of(key: &CacheKey) -> Box<str> {
    String::from_utf8_lossy(key.primary_key())
        .split('\n')
        .nth(2)
        .unwrap_or("")
        .into()
}

struct Hit {
    body: Option<Bytes>,
}

#[async_trait]
impl HandleHit for Hit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        Ok(self.body.take())
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

struct Miss {
    storage: &'static MemoryStorage,
    key: HashBinary,
    path: Box<str>,
    meta: (Vec<u8>, Vec<u8>),
    body: BytesMut,
    /// What the body holds of the fill and shared budgets; `None` once
    /// the fill gave up: past `max_entry`, or past a budget. It is then
    /// finished without being stored.
    held: Option<(Held, Held)>,
}

impl Miss {
    fn give_up(&mut self) {
        self.held = None;
        self.body = BytesMut::new();
    }
}

#[async_trait]
impl HandleMiss for Miss {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        let Some((fill, shared)) = self.held.as_mut() else {
            return Ok(());
        };
        let total = self.body.len() + data.len();
        if total > self.storage.max_entry {
            self.give_up();
            return Ok(());
        }
        if total > self.body.capacity() {
            // Grown by doubling, but what is reserved is what is allocated.
            let capacity = total
                .max(self.body.capacity() * 2)
                .min(self.storage.max_entry);
            if !fill.grow_to(capacity as u64) || !shared.grow_to(capacity as u64) {
                self.give_up();
                return Ok(());
            }
            self.body.reserve(capacity - self.body.len());
        }
        self.body.extend_from_slice(&data);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        if self.held.is_none() {
            return Ok(MissFinishType::Created(0));
        }
        let size = self.body.len();
        // The entry keeps what it holds: the slack of a doubled buffer is
        // given back.
        let body = if self.body.capacity() > size + size / 8 {
            Bytes::copy_from_slice(&self.body)
        } else {
            self.body.freeze()
        };
        let entry = Entry {
            meta: self.meta,
            body,
            path: self.path,
        };
        self.storage.entries.insert(self.key, Arc::new(entry));
        Ok(MissFinishType::Created(size))
    }
}

#[async_trait]
impl Storage for MemoryStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let Some(entry) = self.get(&key.combined_bin()) else {
            return Ok(None);
        };
        let meta = CacheMeta::deserialize(&entry.meta.0, &entry.meta.1)?;
        Ok(Some((
            meta,
            Box::new(Hit {
                body: Some(entry.body.clone()),
            }),
        )))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        // A declared length is reserved at once, and the body sized for it.
        let declared = crate::transform::body::declared_length(&meta.response_header().headers)
            .filter(|n| *n <= self.max_entry as u64)
            .unwrap_or(0);
        let held = self.reserve_fill(declared);
        let body = match held {
            Some(_) => BytesMut::with_capacity(declared as usize),
            None => BytesMut::new(),
        };
        Ok(Box::new(Miss {
            storage: self,
            key: key.combined_bin(),
            path: path_of(key),
            meta: meta.serialize()?,
            body,
            held,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let key: &CompactCacheKey = target.key();
        Ok(match self.entries.remove(&key.combined_bin()) {
            Some(_) => PurgeOutcome::Purged(None),
            None => PurgeOutcome::NotFound,
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let hash = key.combined_bin();
        let Some(old) = self.get(&hash) else {
            return Error::e_explain(ErrorType::InternalError, "no cached entry to update");
        };
        let entry = Entry {
            meta: meta.serialize()?,
            body: old.body.clone(),
            path: old.path.clone(),
        };
        self.entries.insert(hash, Arc::new(entry));
        Ok(true)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, size: usize) -> Arc<Entry> {
        Arc::new(Entry {
            meta: (vec![], vec![]),
            body: Bytes::from(vec![0u8; size]),
            path: path.into(),
        })
    }

    #[test]
    fn purge_by_prefix_takes_whole_segments() {
        let s = MemoryStorage::new(1 << 20, Budget::new(1 << 20));
        for (i, p) in ["/v1/users", "/v1/users/7", "/v1/usersx", "/v2/users"]
            .iter()
            .enumerate()
        {
            s.entries.insert([i as u8; 16], entry(p, 10));
        }
        assert_eq!(s.purge_prefix("/v1/users"), 2);
        assert_eq!(s.len(), 2);
        assert_eq!(s.purge_all(), 2);
        assert!(s.is_empty());
    }

    #[tokio::test]
    async fn fills_in_flight_share_the_budgets() {
        let shared = Budget::new(1 << 20);
        let s: &'static MemoryStorage =
            Box::leak(Box::new(MemoryStorage::new(8 << 20, Arc::clone(&shared))));
        let meta = |len: usize| {
            let mut h = pingora_http::ResponseHeader::build(200, None).unwrap();
            h.insert_header("content-length", len).unwrap();
            let now = std::time::SystemTime::now();
            CacheMeta::new(now + std::time::Duration::from_secs(60), now, 0, 0, h)
        };
        let span = pingora_cache::trace::Span::inactive().handle();
        let key = |i: u8| CacheKey::new(format!("GET\nhttp://a\n/{i}"), "");
        // Two fills of 600 KiB: the second does not fit max_buffered's MiB.
        let mut a = s
            .get_miss_handler(&key(1), &meta(600 << 10), &span)
            .await
            .unwrap();
        let mut b = s
            .get_miss_handler(&key(2), &meta(600 << 10), &span)
            .await
            .unwrap();
        assert_eq!(shared.used(), 600 << 10);
        a.write_body(Bytes::from(vec![1u8; 600 << 10]), true)
            .await
            .unwrap();
        b.write_body(Bytes::from(vec![2u8; 600 << 10]), true)
            .await
            .unwrap();
        assert!(matches!(a.finish().await.unwrap(), MissFinishType::Created(n) if n == 600 << 10));
        assert!(matches!(
            b.finish().await.unwrap(),
            MissFinishType::Created(0)
        ));
        assert_eq!(shared.used(), 0, "finished fills give their bytes back");
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn it_stays_within_max_size() {
        let s = MemoryStorage::new(64 * 1024, Budget::new(1 << 20));
        for i in 0..200u8 {
            s.entries.insert([i; 16], entry("/x", 4000));
        }
        assert!(s.size() <= 64 * 1024, "{}", s.size());
        assert!(s.len() < 20);
    }
}
