//! The response cache: pingora-cache is the engine, `storage` a bounded
//! in-memory store. Joins `request_cache_filter` (turn it on for GET/HEAD on
//! a cached route), `cache_key_callback` (the key), `response_cache_filter`
//! (store or not), `cache_vary_filter` (the upstream's `Vary`, and
//! `Accept-Encoding` for a body it encoded) and
//! `response_filter` (`X-Cache`). Authentication runs before the cache, so
//! an unauthenticated request never reaches an entry of a protected route.

pub mod storage;

use std::time::{Duration, SystemTime};

use http::header::{
    HeaderName, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, SET_COOKIE, VARY,
};
use http::Method;
use pingora_cache::cache_control::CacheControl;
use pingora_cache::key::HashBinary;
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora_cache::{CacheMeta, CachePhase, NoCacheReason, RespCacheable, VarianceBuilder};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

pub use storage::MemoryStorage;

/// How long a request waits for another one filling the same entry.
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// A route's `cache`.
#[derive(Debug, Clone)]
pub struct CachePolicy {
    pub ttl: Duration,
    /// Request headers whose values are part of the key.
    pub vary: Vec<HeaderName>,
    /// The route's name and a hash of its configuration: part of every key,
    /// so routes never share entries, and a route whose configuration
    /// changes (body rules, say) starts afresh on a reload while unchanged
    /// routes keep theirs.
    pub scope: String,
}

/// The process-wide cache: one storage and one lock table, created at start
/// and shared by every route (pingora-cache needs them `'static`).
#[derive(Clone, Copy)]
pub struct Cache {
    pub storage: &'static MemoryStorage,
    lock: &'static CacheKeyLockImpl,
    /// Answers the gateway builds itself (aggregation) being filled now.
    fills: &'static Fills,
}

/// One lock per key being filled outside pingora-cache, so concurrent
/// misses for one key make one fan-out.
#[derive(Default)]
pub struct Fills(
    std::sync::Mutex<std::collections::HashMap<HashBinary, std::sync::Arc<tokio::sync::Mutex<()>>>>,
);

/// Held while filling one key.
pub struct FillGuard {
    fills: &'static Fills,
    key: HashBinary,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        let mut map = self.fills.0.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference and the one our guard still holds: nobody
        // else waits.
        if map
            .get(&self.key)
            .is_some_and(|m| std::sync::Arc::strong_count(m) <= 2)
        {
            map.remove(&self.key);
        }
    }
}

impl Cache {
    /// The cache, holding at most `max_size`; fills also count against
    /// `buffered` (`server.max_buffered`) while in flight.
    pub fn new(max_size: u64, buffered: std::sync::Arc<crate::budget::Budget>) -> Self {
        let lock: Box<CacheKeyLockImpl> = CacheLock::new_boxed(LOCK_TIMEOUT);
        Cache {
            storage: Box::leak(Box::new(MemoryStorage::new(max_size, buffered))),
            lock: Box::leak(lock),
            fills: Box::leak(Box::default()),
        }
    }

    /// Waits until no other request is filling `key` (at most the lock
    /// timeout), then holds it; check the storage again after this.
    pub async fn fill(&self, key: HashBinary) -> Option<FillGuard> {
        let lock = {
            let mut map = self.fills.0.lock().unwrap_or_else(|p| p.into_inner());
            std::sync::Arc::clone(map.entry(key).or_default())
        };
        let held = tokio::time::timeout(LOCK_TIMEOUT, lock.lock_owned())
            .await
            .ok()?;
        Some(FillGuard {
            fills: self.fills,
            key,
            _held: held,
        })
    }

    /// Where the gateway's own answer (aggregation) is kept: `primary` is
    /// its [`primary_key`], `path` the routed path.
    pub fn slot(&self, primary: String, path: &str, policy: &CachePolicy) -> Slot<'_> {
        Slot {
            cache: self,
            key: entry_key(primary),
            path: path.to_owned(),
            ttl: policy.ttl,
        }
    }

    /// Turns the cache on for this request. Concurrent misses for one key
    /// wait on the lock, so only one goes upstream.
    pub fn enable(&self, session: &mut Session) {
        session
            .cache
            .enable(self.storage, None, None, Some(self.lock), None);
        // A declared length over the limit is not cached (and waiters on the
        // lock are let go at once); a longer body stops being stored.
        session
            .cache
            .set_max_file_size_bytes(self.storage.max_entry());
    }
}

/// Where an answer the gateway builds itself may be kept, and for how long
/// at most.
pub struct Slot<'a> {
    pub cache: &'a Cache,
    pub key: HashBinary,
    /// The routed path, for purges by prefix.
    pub path: String,
    pub ttl: Duration,
}

/// Whether a request may use the cache at all.
pub fn request_cacheable(method: &Method) -> bool {
    *method == Method::GET || *method == Method::HEAD
}

/// What the upstream is told of where a request was sent: the scheme and
/// the host with its port, as it receives them (`Host`, and
/// `X-Forwarded-Proto` and `-Host`, which may come from a trusted proxy),
/// and what else a trusted proxy told it (`Forwarded`, `X-Forwarded-Port`,
/// ...). An upstream may build links from any of them, so all are in the
/// key.
pub fn origin(forwarded: &crate::forwarding::Forwarded<'_>) -> String {
    let host = forwarded.host.as_ref().map_or(&b""[..], |h| h.as_bytes());
    let mut out = String::with_capacity(16 + 2 * host.len());
    out.push_str(&String::from_utf8_lossy(forwarded.proto().as_bytes()));
    out.push_str("://");
    // Host names compare without case; ports and all else exactly.
    out.push_str(&String::from_utf8_lossy(host).to_ascii_lowercase());
    if let Some(told) = forwarded.forwarded_host().filter(|h| h.as_bytes() != host) {
        out.push(' ');
        out.push_str(&String::from_utf8_lossy(told.as_bytes()).to_ascii_lowercase());
    }
    out.push_str(&forwarded.proxy_told());
    out
}

/// The primary key: method, origin (scheme and host with its port, see
/// [`origin`]), normalized path, query, the route's `vary` header values,
/// and the token's subject on a route with `auth`. One field a line (none
/// of them can hold a newline); the path is the third, which the storage
/// reads back for purges.
pub fn primary_key(
    req: &RequestHeader,
    origin: &str,
    path: &str,
    policy: &CachePolicy,
    subject: Option<&str>,
) -> String {
    let mut key = String::with_capacity(64 + origin.len() + path.len());
    key.push_str(req.method.as_str());
    key.push('\n');
    key.push_str(origin);
    key.push('\n');
    key.push_str(path);
    key.push('\n');
    key.push_str(req.uri.query().unwrap_or(""));
    for name in &policy.vary {
        key.push('\n');
        key.push_str(name.as_str());
        key.push('=');
        for v in req.headers.get_all(name) {
            key.push_str(&String::from_utf8_lossy(v.as_bytes()));
            key.push(',');
        }
    }
    key.push_str("\nsub=");
    key.push_str(subject.unwrap_or(""));
    key.push_str("\nroute=");
    key.push_str(&policy.scope);
    key
}

/// How long an upstream's `Cache-Control` lets a shared cache keep its
/// response: `None` not at all (`no-store`, `private`, `no-cache`),
/// `Some(None)` no limit given, else `s-maxage` (or `max-age`) less the
/// `Age` it already spent in caches.
pub fn origin_lifetime(resp: &ResponseHeader) -> Option<Option<Duration>> {
    let Some(cc) = CacheControl::from_resp_headers(resp) else {
        return Some(None);
    };
    if cc.no_store() || cc.private() || cc.no_cache() {
        return None;
    }
    let secs = cc
        .s_maxage()
        .ok()
        .flatten()
        .or_else(|| cc.max_age().ok().flatten());
    Some(secs.map(|secs| {
        let age: u64 = resp
            .headers
            .get(http::header::AGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Duration::from_secs(u64::from(secs).saturating_sub(age))
    }))
}

/// Whether and how long to keep a response: only 200; never `no-store`,
/// `private`, `no-cache`, `Vary: *`, `Set-Cookie`, or a content coding
/// [`CODINGS`] does not name or the client did not accept (an upstream
/// ignoring `Accept-Encoding` is not repeated to others); for as long as the
/// route's `ttl`, or a shorter `s-maxage`/`max-age`. A response to a
/// request with `Authorization` on a route the gateway does not
/// authenticate is kept only when marked `public`, `s-maxage` or
/// `must-revalidate` (RFC 9111 3.5).
pub fn cacheability(
    policy: &CachePolicy,
    req: &RequestHeader,
    resp: &ResponseHeader,
    gateway_auth: bool,
) -> RespCacheable {
    let no = |why: &'static str| RespCacheable::Uncacheable(NoCacheReason::Custom(why));
    if resp.status != 200 {
        return no("status");
    }
    if resp.headers.contains_key(SET_COOKIE) {
        return no("set-cookie");
    }
    if resp.headers.get_all(VARY).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii() == b"*")
    }) {
        return no("vary-star");
    }
    match content_codings(resp) {
        // An unencoded body serves every client.
        Some(0) => {}
        Some(codings) if codings & !accepted_codings(req) == 0 => {}
        _ => return no("content-encoding"),
    }
    let Some(origin_limit) = origin_lifetime(resp) else {
        return RespCacheable::Uncacheable(NoCacheReason::OriginNotCache);
    };
    if !gateway_auth && req.headers.contains_key(AUTHORIZATION) {
        let allowed = CacheControl::from_resp_headers(resp).is_some_and(|c| {
            c.public() || c.must_revalidate() || c.s_maxage().ok().flatten().is_some()
        });
        if !allowed {
            return no("authorization");
        }
    }
    let ttl = origin_limit.map_or(policy.ttl, |limit| policy.ttl.min(limit));
    if ttl.is_zero() {
        return no("ttl");
    }
    let now = SystemTime::now();
    RespCacheable::Cacheable(CacheMeta::new(now + ttl, now, 0, 0, resp.clone()))
}

/// The content codings the cache tells apart in a client's
/// `Accept-Encoding`, one bit each.
const CODINGS: [&str; 4] = ["br", "deflate", "gzip", "zstd"];

/// The upstream's `Vary`: the listed request headers' values split entries.
/// A body in a content coding varies by `Accept-Encoding` whether or not the
/// upstream says so (nginx's `gzip on` does not), or the cache would replay
/// it to clients that cannot decode it: by whether the client accepts that
/// coding, so every client that can decode it shares the one entry.
/// A listed `Accept-Encoding` is normalized, as Varnish does, to the
/// [`CODINGS`] the client accepts (`gzip, br` and `br;q=0.9, gzip` share an
/// entry). Either way an entry's value holds its own codings, so a client
/// whose value matches accepts them.
pub fn variance(meta: &CacheMeta, req: &RequestHeader) -> Option<HashBinary> {
    let resp = meta.response_header();
    let accept_encoding = ACCEPT_ENCODING.as_str();
    let mut listed = false;
    let names: Vec<String> = resp
        .headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| {
            // Normalized below, not taken as the client sent it.
            let is_accept_encoding = n == accept_encoding;
            listed |= is_accept_encoding;
            !n.is_empty() && !is_accept_encoding
        })
        .collect();
    // Unknown codings are never stored (`cacheability`).
    let codings = content_codings(resp).unwrap_or(u8::MAX);
    let mut builder = VarianceBuilder::new();
    if listed || codings != 0 {
        let accepted = accepted_codings(req);
        let set = usize::from(if listed { accepted } else { accepted & codings });
        builder.add_value(accept_encoding, &CODING_SETS[set..=set]);
    }
    for name in &names {
        let mut values = req.headers.get_all(name.as_str()).iter();
        let first = values.next().map_or(&b""[..], |v| v.as_bytes());
        match values.next() {
            // The usual case, one field or none: borrowed, not copied.
            None => builder.add_value(name, first),
            Some(second) => {
                let mut joined = [first, second.as_bytes()].join(&b","[..]);
                for v in values {
                    joined.push(b',');
                    joined.extend_from_slice(v.as_bytes());
                }
                builder.add_owned_value(name, joined);
            }
        }
    }
    builder.finalize()
}

/// Every set of [`CODINGS`] as one byte, to borrow a variance value from.
const CODING_SETS: [u8; 1 << CODINGS.len()] = {
    let mut sets = [0u8; 1 << CODINGS.len()];
    let mut i = 0;
    while i < sets.len() {
        sets[i] = i as u8;
        i += 1;
    }
    sets
};

/// The [`CODINGS`] a response's `Content-Encoding` applied (0: none, or
/// `identity`); `None` when it names another one.
fn content_codings(resp: &ResponseHeader) -> Option<u8> {
    let mut bits = 0;
    for value in resp.headers.get_all(CONTENT_ENCODING) {
        let text = value.to_str().ok()?;
        for coding in text.split(',').map(str::trim) {
            if coding.is_empty() || coding.eq_ignore_ascii_case("identity") {
                continue;
            }
            bits |= coding_bit(coding)?;
        }
    }
    Some(bits)
}

/// The [`CODINGS`] `req`'s `Accept-Encoding` accepts (RFC 9110 12.5.3): one
/// named with a weight above 0, or one not named when `*` has such a weight.
/// Without the field, none: that is what compressors (nginx's, ours) do.
fn accepted_codings(req: &RequestHeader) -> u8 {
    let (named, any) =
        crate::compression::weights(req.headers.get_all(ACCEPT_ENCODING).iter(), CODINGS);
    (0..CODINGS.len())
        .filter(|&i| named[i].or(any).unwrap_or(0) > 0)
        .fold(0, |bits, i| bits | 1 << i)
}

fn coding_bit(coding: &str) -> Option<u8> {
    CODINGS
        .iter()
        .position(|c| c.eq_ignore_ascii_case(coding))
        .map(|i| 1 << i)
}

/// `X-Cache` for a response of a cached route.
pub fn x_cache(phase: CachePhase) -> &'static str {
    match phase {
        CachePhase::Hit | CachePhase::Revalidated => "HIT",
        CachePhase::Miss | CachePhase::Expired | CachePhase::Stale | CachePhase::StaleUpdating => {
            "MISS"
        }
        _ => "BYPASS",
    }
}

/// The storage key of an answer built by the gateway itself (aggregation),
/// the same as pingora-cache would compute for a proxied response.
pub fn entry_key(primary: String) -> HashBinary {
    use pingora_cache::key::CacheHashKey;
    pingora_cache::CacheKey::new(primary, "").combined_bin()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(fields: &[(&str, &str)]) -> ResponseHeader {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for (name, value) in fields {
            resp.append_header(name.to_string(), *value).unwrap();
        }
        resp
    }

    fn request(accept_encoding: Option<&str>) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        if let Some(a) = accept_encoding {
            req.insert_header("Accept-Encoding", a).unwrap();
        }
        req
    }

    #[test]
    fn accept_encoding_is_read_by_weight_and_wildcard() {
        let bits = |a| accepted_codings(&request(a));
        let (br, deflate, gzip, zstd) = (1, 2, 4, 8);
        assert_eq!(bits(None), 0);
        assert_eq!(bits(Some("identity")), 0);
        assert_eq!(bits(Some("GZIP")), gzip);
        assert_eq!(bits(Some("gzip;q=0.5, br")), gzip | br);
        assert_eq!(bits(Some("gzip;q=0, br;q=0.000")), 0);
        assert_eq!(bits(Some("gzip;q=nonsense")), 0);
        // As compression reads it: a weight above 1 is no weight.
        assert_eq!(bits(Some("gzip;q=2")), 0);
        assert_eq!(bits(Some("*, zstd;q=0")), br | deflate | gzip);
        assert_eq!(bits(Some("*;q=0, gzip")), gzip);
        assert_eq!(bits(Some("compress")), 0);
        assert_eq!(bits(Some("zstd, deflate")), zstd | deflate);
    }

    #[test]
    fn an_encoded_body_varies_by_what_the_client_accepts() {
        let meta = |fields: &[(&str, &str)]| {
            let now = SystemTime::now();
            CacheMeta::new(now, now, 0, 0, response(fields))
        };
        let gzipped = meta(&[("Content-Encoding", "gzip")]);
        let v = |m: &CacheMeta, a| variance(m, &request(a));
        // Without the upstream's Vary, an encoded body still varies: by
        // whether the client can decode it.
        assert_ne!(v(&gzipped, Some("gzip")), v(&gzipped, None));
        assert_ne!(v(&gzipped, Some("gzip")), v(&gzipped, Some("br")));
        assert_eq!(
            v(&gzipped, Some("gzip")),
            v(&gzipped, Some("br;q=0.2, gzip, zstd"))
        );
        assert_eq!(v(&gzipped, None), v(&gzipped, Some("identity")));
        assert_eq!(v(&gzipped, None), v(&gzipped, Some("br")));
        assert!(v(&gzipped, None).is_some());
        // An identity body serves every client; a listed Vary is normalized.
        assert_eq!(v(&meta(&[]), Some("gzip")), None);
        let listed = meta(&[("Vary", "Accept-Encoding")]);
        assert_eq!(
            v(&listed, Some("gzip, br")),
            v(&listed, Some("br, gzip;q=0.9"))
        );
        assert_ne!(v(&listed, Some("gzip, br")), v(&listed, Some("gzip")));
        assert_eq!(v(&listed, Some("gzip")), v(&gzipped, Some("gzip")));
    }

    #[test]
    fn an_encoding_the_client_did_not_accept_is_not_stored() {
        let policy = CachePolicy {
            ttl: Duration::from_secs(60),
            vary: Vec::new(),
            scope: String::new(),
        };
        let stored = |a, ce: &str| {
            let resp = response(&[("Content-Encoding", ce)]);
            matches!(
                cacheability(&policy, &request(a), &resp, false),
                RespCacheable::Cacheable(_)
            )
        };
        assert!(stored(Some("gzip"), "gzip"));
        assert!(stored(None, "identity"));
        assert!(!stored(Some("br"), "gzip"));
        assert!(!stored(Some("gzip, compress"), "compress"));
        assert!(!stored(Some("gzip"), "gzip, br"));
    }

    #[test]
    fn origin_lifetime_reads_cache_control_and_age() {
        let secs = |s| Some(Some(Duration::from_secs(s)));
        assert_eq!(origin_lifetime(&response(&[])), Some(None));
        assert_eq!(
            origin_lifetime(&response(&[("Cache-Control", "max-age=60")])),
            secs(60)
        );
        assert_eq!(
            origin_lifetime(&response(&[("Cache-Control", "max-age=60, s-maxage=30")])),
            secs(30)
        );
        assert_eq!(
            origin_lifetime(&response(&[("Cache-Control", "max-age=60"), ("Age", "50")])),
            secs(10)
        );
        for refusal in ["no-store", "private", "no-cache"] {
            assert_eq!(
                origin_lifetime(&response(&[("Cache-Control", refusal)])),
                None
            );
        }
    }
}
