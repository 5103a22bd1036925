//! Per-client rate limits. Joins `request_filter` (count the request, or
//! answer 429) and `response_filter` (the `RateLimit-*` headers).
//!
//! The window slides: it is cut into `SUB_WINDOWS` sub-windows, and a request
//! is admitted only if the sub-windows overlapping the last `per` hold fewer
//! than `requests`. Those sub-windows cover the last `per` and a little more,
//! so no key ever gets more than `requests` in any window of length `per`
//! (the steady rate a client can sustain is `SUB_WINDOWS / (SUB_WINDOWS+1)`
//! of the limit).
//!
//! Each key is counted exactly, in a table of at most `MAX_KEYS` keys per
//! limit. When it is full the coldest keys are forgotten (quick_cache's
//! CLOCK-Pro: a key seen once goes before a key seen again), which may let
//! a forgotten key start afresh but never counts one key's requests against
//! another: a flood of distinct keys costs the flooder, never the others.
//! An estimate (a count-min sketch) would be the wrong tool here, since it
//! only ever over-counts and a flood saturates it for everyone.
//!
//! A limit with `scope: cluster` counts in the cluster's store instead
//! (`cluster::limit`, the same rule); when the store fails it counts here,
//! with the same budget, or refuses (`on_store_error`).

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const SUB_WINDOWS: u64 = 8;
/// Keys counted at once per limit; about 100 bytes each when full.
pub const MAX_KEYS: u64 = 65_536;
const SLOTS: usize = SUB_WINDOWS as usize + 1;

/// What a limit is counted per: the request key every keyed policy shares.
pub use crate::subject::RequestKey as LimitKey;
pub use crate::subject::Subject;

use crate::cluster::limit::SharedCount;
use crate::cluster::StoreError;
use crate::metrics::Metrics;

/// What a cluster-scoped limit does when the store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Count on this instance alone, with the same budget.
    Allow,
    /// Answer 503.
    Deny,
}

/// A limit counted by the whole cluster.
#[derive(Debug)]
pub struct Shared {
    pub count: SharedCount,
    pub on_error: OnStoreError,
}

/// The outcome of counting one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the budget is whole again (`RateLimit-Reset`).
    pub reset: u64,
    /// Seconds until one more request would be admitted (`Retry-After`).
    pub retry_after: u64,
}

/// One key's counts: slot `p % SLOTS` holds sub-window `p`, for the
/// `SLOTS` sub-windows up to `latest`.
#[derive(Debug, Clone, Copy)]
struct KeyWindow {
    latest: u64,
    counts: [u32; SLOTS],
}

impl KeyWindow {
    /// Moves the window on to `period`, clearing the sub-windows that left.
    fn advance(&mut self, period: u64) {
        if period <= self.latest {
            return;
        }
        let gone = (period - self.latest).min(SLOTS as u64);
        for back in 0..gone {
            self.counts[((period - back) % SLOTS as u64) as usize] = 0;
        }
        self.latest = period;
    }
}

type KeyTable = quick_cache::sync::Cache<u64, KeyWindow>;

/// One route's `rate_limit`.
pub struct RateLimit {
    pub requests: u64,
    pub per: Duration,
    pub key: LimitKey,
    sub_len: Duration,
    keys: KeyTable,
    epoch: Instant,
    /// The newest period seen: a request that read the clock just before a
    /// boundary counts in the period others have moved on to.
    latest: AtomicU64,
    key_hasher: ahash::RandomState,
    /// `scope: cluster`: counted in the store; the table above is then the
    /// fallback while the store fails.
    shared: Option<Shared>,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} per {:?} by {:?}", self.requests, self.per, self.key)?;
        match &self.shared {
            Some(shared) => write!(f, " ({:?}, {:?})", shared.count, shared.on_error),
            None => Ok(()),
        }
    }
}

impl RateLimit {
    pub fn new(requests: u64, per: Duration, key: LimitKey) -> Self {
        Self::with_capacity(requests, per, key, MAX_KEYS)
    }

    fn with_capacity(requests: u64, per: Duration, key: LimitKey, capacity: u64) -> Self {
        let sub_len = (per / SUB_WINDOWS as u32).max(Duration::from_millis(1));
        // Grows as keys arrive: an idle limit costs next to nothing.
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(64)
            .weight_capacity(capacity)
            .build();
        let keys = match options {
            Ok(o) => KeyTable::with_options(
                o,
                Default::default(),
                Default::default(),
                Default::default(),
            ),
            Err(_) => KeyTable::new(capacity as usize),
        };
        RateLimit {
            requests,
            per,
            key,
            sub_len,
            keys,
            epoch: Instant::now(),
            latest: AtomicU64::new(0),
            key_hasher: ahash::RandomState::new(),
            shared: None,
        }
    }

    /// The same limit counted by `cluster` for the route `route`.
    pub fn shared(
        mut self,
        cluster: Arc<crate::cluster::Cluster>,
        route: &str,
        on_error: OnStoreError,
    ) -> Self {
        let count = SharedCount::new(
            cluster,
            route,
            self.requests,
            self.per,
            self.sub_len,
            SLOTS as u64,
        );
        self.shared = Some(Shared { count, on_error });
        self
    }

    /// What a shared limit does when its store fails; `None` for a local
    /// one.
    pub fn on_store_error(&self) -> Option<OnStoreError> {
        self.shared.as_ref().map(|s| s.on_error)
    }

    /// Counts one request for `key` at `now`.
    pub fn check_at<K: Hash>(&self, key: K, now: Instant) -> Decision {
        self.count_hashed(self.key_hasher.hash_one(key), now)
    }

    /// Counts one request for a key hashed with `key_hasher`: keyed per
    /// limit, so a client cannot aim two keys at one hash, and 64 bits make
    /// an accidental collision among the keys held negligible.
    fn count_hashed(&self, key: u64, now: Instant) -> Decision {
        let elapsed = now.saturating_duration_since(self.epoch);
        let sub_nanos = self.sub_len.as_nanos();
        let period = (elapsed.as_nanos() / sub_nanos) as u64;
        let period = self.latest.fetch_max(period, Ordering::AcqRel).max(period);
        let count = |w: &mut KeyWindow| self.count(w, period, elapsed);
        match self.keys.entry(&key, None, |_, w| {
            quick_cache::sync::EntryAction::Retain(count(w))
        }) {
            quick_cache::sync::EntryResult::Retained(decision) => decision,
            quick_cache::sync::EntryResult::Vacant(guard) => {
                let mut w = KeyWindow {
                    latest: period,
                    counts: [0; SLOTS],
                };
                let decision = count(&mut w);
                let _ = guard.insert(w);
                decision
            }
            // Not returned for an entry that is only retained, nor without a
            // timeout; counted afresh, as a forgotten key would be.
            _ => {
                let mut w = KeyWindow {
                    latest: period,
                    counts: [0; SLOTS],
                };
                count(&mut w)
            }
        }
    }

    /// Counts a request in `w` at `period`, unless it is over the limit.
    fn count(&self, w: &mut KeyWindow, period: u64, elapsed: Duration) -> Decision {
        w.advance(period);
        let period = w.latest;
        let used: u64 = w.counts.iter().map(|c| u64::from(*c)).sum();
        let sub_nanos = self.sub_len.as_nanos();
        // A sub-window's counts leave the window when it is SUB_WINDOWS+1
        // periods old: the oldest frees the first request, the current one
        // the last.
        let leaves = |p: u64| {
            let at = (p + SUB_WINDOWS + 1) as u128 * sub_nanos;
            let at = Duration::from_nanos(at.min(u64::MAX as u128) as u64);
            let left = at.saturating_sub(elapsed);
            (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1)
        };
        if used >= self.requests {
            // A refused request does not spend budget.
            let oldest = (0..SLOTS as u64)
                .rev()
                .filter(|back| *back <= period)
                .map(|back| period - back)
                .find(|p| w.counts[(p % SLOTS as u64) as usize] > 0)
                .unwrap_or(period);
            return Decision {
                allowed: false,
                limit: self.requests,
                remaining: 0,
                reset: leaves(period),
                retry_after: leaves(oldest),
            };
        }
        let slot = &mut w.counts[(period % SLOTS as u64) as usize];
        *slot = slot.saturating_add(1);
        Decision {
            allowed: true,
            limit: self.requests,
            remaining: self.requests - used - 1,
            reset: leaves(period),
            retry_after: 0,
        }
    }

    pub fn check<K: Hash>(&self, key: K) -> Decision {
        self.check_at(key, Instant::now())
    }

    /// Keys counted now.
    #[cfg(test)]
    fn keys_held(&self) -> usize {
        self.keys.len()
    }
}

impl RateLimit {
    /// Counts a request of `subject`: in the cluster's store for a shared
    /// limit, else here. `Err` only when the store failed and the limit
    /// refuses then (`on_store_error: deny`); store errors are counted in
    /// `metrics`.
    pub async fn admit(
        &self,
        subject: &Subject<'_>,
        metrics: &Metrics,
    ) -> Result<Decision, StoreError> {
        let Some(shared) = &self.shared else {
            return Ok(self.admit_here(subject));
        };
        use std::hash::BuildHasher;
        let mut local = self.key_hasher.build_hasher();
        self.key.hash_into(subject, &mut local);
        let local = std::hash::Hasher::finish(&local);
        // The digest only for a call to the store, not for a spent lease.
        let digest = || {
            let mut digest = SharedCount::key_hasher();
            self.key.hash_into(subject, &mut digest);
            digest
        };
        match shared.count.count(local, digest, self.requests).await {
            Ok(counted) => Ok(self.decision_of(counted)),
            Err(e) => {
                metrics
                    .cluster_store_errors
                    .with_label_values(&[e.reason()])
                    .inc();
                match shared.on_error {
                    OnStoreError::Allow => Ok(self.admit_here(subject)),
                    OnStoreError::Deny => Err(e),
                }
            }
        }
    }

    fn decision_of(&self, counted: crate::cluster::limit::Counted) -> Decision {
        let seconds = |d: Duration| (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1);
        Decision {
            allowed: counted.admitted,
            limit: self.requests,
            remaining: counted.remaining,
            reset: seconds(counted.reset),
            retry_after: if counted.admitted {
                0
            } else {
                seconds(counted.retry_after)
            },
        }
    }

    /// Counts a request of `subject` on this instance, by the limit's key
    /// (a missing header or claim falls back to the client IP: a missing
    /// key never means unlimited).
    pub fn admit_here(&self, subject: &Subject<'_>) -> Decision {
        use std::hash::BuildHasher;
        let mut hasher = self.key_hasher.build_hasher();
        self.key.hash_into(subject, &mut hasher);
        self.count_hashed(std::hash::Hasher::finish(&hasher), Instant::now())
    }
}

impl Decision {
    /// `RateLimit-Limit`, `-Remaining` and `-Reset` on a response of the
    /// route, and `Retry-After` on a refusal.
    pub fn headers(&self, resp: &mut pingora_http::ResponseHeader) {
        let _ = resp.insert_header("ratelimit-limit", self.limit);
        let _ = resp.insert_header("ratelimit-remaining", self.remaining);
        let _ = resp.insert_header("ratelimit-reset", self.reset);
        if !self.allowed {
            let _ = resp.insert_header(http::header::RETRY_AFTER, self.retry_after);
        }
    }

    /// The 503 of a limit that refuses while the store fails.
    pub fn store_refusal(error: StoreError, request_id: &str) -> crate::respond::Response {
        crate::respond::Response::problem(
            error.status(),
            &format!(
                "{error}, and this route's rate limit is shared by the cluster; retry shortly"
            ),
            request_id,
        )
        .with_header(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        )
    }

    pub fn refusal(&self, request_id: &str) -> crate::respond::Response {
        crate::respond::Response::problem(
            http::StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "the rate limit of {} requests is used up; retry in {} s",
                self.limit, self.retry_after
            ),
            request_id,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_window_of_length_per_ever_holds_more_than_the_limit() {
        let limit = RateLimit::new(10, Duration::from_secs(8), LimitKey::ClientIp);
        let t0 = limit.epoch;
        // One attempt every 100 ms for 40 s; remember the admitted ones.
        let mut admitted = Vec::new();
        for i in 0..400u64 {
            let at = t0 + Duration::from_millis(i * 100);
            if limit.check_at("client", at).allowed {
                admitted.push(i * 100);
            }
        }
        for (i, start) in admitted.iter().enumerate() {
            let in_window = admitted[i..]
                .iter()
                .take_while(|t| **t < start + 8000)
                .count();
            assert!(
                in_window <= 10,
                "{in_window} admitted in 8 s from {start} ms"
            );
        }
        // And the limit is not starved: at least 8/9 of it in steady state.
        assert!(admitted.len() >= 40, "{}", admitted.len());
    }

    #[test]
    fn a_burst_is_cut_at_the_limit_and_keys_are_separate() {
        let limit = RateLimit::new(3, Duration::from_secs(60), LimitKey::ClientIp);
        let d: Vec<Decision> = (0..5).map(|_| limit.check("a")).collect();
        assert_eq!(d.iter().filter(|d| d.allowed).count(), 3);
        assert_eq!(d[0].remaining, 2);
        assert_eq!(d[2].remaining, 0);
        assert!(!d[3].allowed && d[3].retry_after >= 1 && d[3].retry_after <= 68);
        assert!(limit.check("b").allowed);
    }

    #[test]
    fn refused_requests_do_not_spend_budget() {
        let limit = RateLimit::new(2, Duration::from_secs(8), LimitKey::ClientIp);
        let t0 = limit.epoch;
        assert!(limit.check_at("a", t0).allowed);
        assert!(limit.check_at("a", t0).allowed);
        for _ in 0..100 {
            assert!(!limit.check_at("a", t0 + Duration::from_secs(1)).allowed);
        }
        // 9 s later both admitted requests have left the window.
        assert!(limit.check_at("a", t0 + Duration::from_secs(9)).allowed);
        assert!(limit.check_at("a", t0 + Duration::from_secs(9)).allowed);
    }

    #[test]
    fn a_flood_of_distinct_keys_never_refuses_another_key() {
        let limit = RateLimit::with_capacity(2, Duration::from_secs(60), LimitKey::ClientIp, 1000);
        let t0 = limit.epoch;
        assert!(limit.check_at("steady", t0).allowed);
        assert!(limit.check_at("steady", t0).allowed);
        for i in 0..50_000u32 {
            assert!(limit.check_at(("flood", i), t0).allowed);
            // The flooder keeps trying its limited key: it stays counted.
            if i % 100 == 0 {
                assert!(!limit.check_at("steady", t0).allowed, "after {i}");
            }
        }
        assert!(limit.keys_held() <= 1000);
        for i in 0..100u32 {
            assert!(limit.check_at(("honest", i), t0).allowed);
        }
    }
}
