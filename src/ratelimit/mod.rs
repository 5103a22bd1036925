//! Per-client rate limits. Joins `request_filter` (count the request, or
//! answer 429) and `response_filter` (the `RateLimit-*` headers).
//!
//! The window slides: it is cut into `SUB_WINDOWS` sub-windows, and a request
//! is admitted only if the sub-windows overlapping the last `per` hold fewer
//! than `requests`. Those sub-windows cover the last `per` and a little more,
//! so no key ever gets more than `requests` in any window of length `per`
//! (the steady rate a client can sustain is `SUB_WINDOWS / (SUB_WINDOWS+1)`
//! of the limit). Counts live in pingora-limits' count-min sketches, whose
//! size is fixed however many keys there are; a sketch only ever
//! over-counts, so collisions can refuse early but never admit too much.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderName;
use pingora_limits::estimator::Estimator;

pub const SUB_WINDOWS: u64 = 8;
const SKETCH_HASHES: usize = 4;
const SKETCH_SLOTS: usize = 4096;

/// What a limit is counted per.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    ClientIp,
    /// A request header; a request without it is counted by client IP.
    Header(HeaderName),
    /// A claim of the verified token; without one, by client IP.
    Claim(String),
    /// One budget for the whole route.
    Route,
}

impl std::fmt::Display for LimitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitKey::ClientIp => f.write_str("ip"),
            LimitKey::Header(h) => write!(f, "header:{h}"),
            LimitKey::Claim(c) => write!(f, "claim:{c}"),
            LimitKey::Route => f.write_str("route"),
        }
    }
}

impl LimitKey {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "ip" => Ok(LimitKey::ClientIp),
            "route" => Ok(LimitKey::Route),
            _ => {
                if let Some(name) = s.strip_prefix("header:") {
                    HeaderName::from_bytes(name.trim().as_bytes())
                        .map(LimitKey::Header)
                        .map_err(|_| format!("\"{name}\" is not a valid header name"))
                } else if let Some(claim) = s.strip_prefix("claim:") {
                    if claim.is_empty() {
                        Err("claim: needs a claim name".into())
                    } else {
                        Ok(LimitKey::Claim(claim.to_string()))
                    }
                } else {
                    Err(format!(
                        "unknown rate limit key \"{s}\"; use ip, header:NAME, claim:NAME or route"
                    ))
                }
            }
        }
    }
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

struct SubWindow {
    /// Which sub-window period this slot holds now.
    period: AtomicU64,
    counts: Estimator,
}

/// One route's `rate_limit`.
pub struct RateLimit {
    /// Route and configuration as written: equal on a reload means unchanged.
    pub fingerprint: String,
    pub requests: u64,
    pub per: Duration,
    pub key: LimitKey,
    sub_len: Duration,
    slots: Vec<SubWindow>,
    epoch: Instant,
    /// The newest period seen: a request that read the clock just before a
    /// boundary counts in the period others have moved on to.
    latest: AtomicU64,
    rotate: Mutex<()>,
    key_hasher: ahash::RandomState,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} per {:?} by {:?}", self.requests, self.per, self.key)
    }
}

const EMPTY: u64 = u64::MAX;

impl RateLimit {
    pub fn new(requests: u64, per: Duration, key: LimitKey) -> Self {
        let sub_len = (per / SUB_WINDOWS as u32).max(Duration::from_millis(1));
        let slots = (0..=SUB_WINDOWS)
            .map(|_| SubWindow {
                period: AtomicU64::new(EMPTY),
                counts: Estimator::new(SKETCH_HASHES, SKETCH_SLOTS),
            })
            .collect();
        RateLimit {
            fingerprint: String::new(),
            requests,
            per,
            key,
            sub_len,
            slots,
            epoch: Instant::now(),
            latest: AtomicU64::new(0),
            rotate: Mutex::new(()),
            key_hasher: ahash::RandomState::new(),
        }
    }

    fn slot(&self, period: u64) -> &SubWindow {
        &self.slots[(period % (SUB_WINDOWS + 1)) as usize]
    }

    /// Makes the current period's slot hold this period, clearing what an
    /// older period left in it.
    fn current(&self, period: u64) -> &SubWindow {
        let slot = self.slot(period);
        if slot.period.load(Ordering::Acquire) != period {
            let _guard = self.rotate.lock().unwrap_or_else(|p| p.into_inner());
            if slot.period.load(Ordering::Acquire) != period {
                slot.counts.reset();
                slot.period.store(period, Ordering::Release);
            }
        }
        slot
    }

    /// Counts one request for `key` at `now`.
    pub fn check_at<K: Hash>(&self, key: K, now: Instant) -> Decision {
        // Each of the nine sub-window sketches hashes the key once per row;
        // a u64 is far cheaper to hash than the key itself, which may be a
        // long header value. Keyed per limit, so a client cannot aim keys at
        // a collision, and the sketches conflate keys far more often anyway.
        let key = self.key_hasher.hash_one(key);
        let elapsed = now.saturating_duration_since(self.epoch);
        let sub_nanos = self.sub_len.as_nanos();
        let period = (elapsed.as_nanos() / sub_nanos) as u64;
        let period = self.latest.fetch_max(period, Ordering::AcqRel).max(period);
        let current = self.current(period);
        // Count first, so concurrent requests see each other.
        let mine = current.counts.incr(key, 1).max(0) as u64;
        let mut used = mine;
        let mut oldest_used = period;
        for back in 1..=SUB_WINDOWS.min(period) {
            let p = period - back;
            let slot = self.slot(p);
            if slot.period.load(Ordering::Acquire) == p {
                let n = slot.counts.get(key).max(0) as u64;
                if n > 0 {
                    used += n;
                    oldest_used = p;
                }
            }
        }
        // A sub-window's counts leave the window when it is SUB_WINDOWS+1
        // periods old: the oldest frees the first request, the current one
        // the last.
        let leaves = |p: u64| {
            let at = (p + SUB_WINDOWS + 1) as u128 * sub_nanos;
            let at = Duration::from_nanos(at.min(u64::MAX as u128) as u64);
            let left = at.saturating_sub(elapsed);
            (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1)
        };
        if used > self.requests {
            // A refused request does not spend budget.
            current.counts.decr(key, 1);
            return Decision {
                allowed: false,
                limit: self.requests,
                remaining: 0,
                reset: leaves(period),
                retry_after: leaves(oldest_used),
            };
        }
        Decision {
            allowed: true,
            limit: self.requests,
            remaining: self.requests - used,
            reset: leaves(period),
            retry_after: 0,
        }
    }

    pub fn check<K: Hash>(&self, key: K) -> Decision {
        self.check_at(key, Instant::now())
    }
}

/// What a limit key may be taken from.
pub struct Subject<'a> {
    pub client_ip: Option<std::net::IpAddr>,
    pub headers: &'a http::HeaderMap,
    pub claims: Option<&'a crate::auth::Claims>,
}

impl LimitKey {
    /// Whether the key needs a verified token (so counting waits for auth).
    pub fn needs_claims(&self) -> bool {
        matches!(self, LimitKey::Claim(_))
    }
}

/// An IPv6 client is counted by its /64: one host usually holds a whole
/// /64 and could otherwise rotate addresses to escape its limit.
fn ip_key(ip: Option<std::net::IpAddr>) -> [u8; 16] {
    match ip {
        Some(std::net::IpAddr::V4(v4)) => v4.to_ipv6_mapped().octets(),
        Some(std::net::IpAddr::V6(v6)) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            o
        }
        None => [0; 16],
    }
}

impl RateLimit {
    /// Counts a request of `subject`. A missing header or claim falls back
    /// to the client IP: a missing key never means unlimited.
    pub fn admit(&self, subject: &Subject<'_>) -> Decision {
        let ip = ip_key(subject.client_ip);
        // The tag keeps a header value from ever counting as someone's IP.
        match &self.key {
            LimitKey::ClientIp => self.check((0u8, &ip[..])),
            LimitKey::Route => self.check((3u8, &[] as &[u8])),
            LimitKey::Header(name) => match subject.headers.get(name) {
                Some(v) => self.check((1u8, v.as_bytes())),
                None => self.check((0u8, &ip[..])),
            },
            LimitKey::Claim(name) => match subject.claims.and_then(|c| c.get(name)) {
                Some(serde_json::Value::String(s)) => self.check((2u8, s.as_bytes())),
                Some(v) => {
                    let text = v.to_string();
                    self.check((2u8, text.as_bytes()))
                }
                None => self.check((0u8, &ip[..])),
            },
        }
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
    fn keys() {
        assert_eq!(LimitKey::parse("ip"), Ok(LimitKey::ClientIp));
        assert_eq!(LimitKey::parse("route"), Ok(LimitKey::Route));
        assert_eq!(
            LimitKey::parse("claim:sub"),
            Ok(LimitKey::Claim("sub".into()))
        );
        assert!(matches!(
            LimitKey::parse("header:X-Api-Key"),
            Ok(LimitKey::Header(_))
        ));
        assert!(LimitKey::parse("cookie:x").is_err());
    }
}
