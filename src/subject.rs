//! Who a request comes from, as policies tell clients apart: its client IP,
//! the verified token's claims, and one key type for "which client is
//! this" (`ip | header:NAME | claim:NAME | consumer | route`), which rate
//! limits and consistent hashing (and splits to come) read the same way,
//! so they cannot disagree on who a client is. A leaf: it knows no policy.

use std::hash::Hasher;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName};
use serde_json::Value;

/// A verified token's claims.
pub type Claims = serde_json::Map<String, Value>;

/// What a request is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKey {
    ClientIp,
    /// A request header; a request without it is keyed by client IP.
    Header(HeaderName),
    /// A claim of the verified token; without one, by client IP.
    Claim(String),
    /// The API consumer; without one, by client IP.
    Consumer,
    /// One key for everyone (a route-wide rate limit).
    Route,
}

impl std::fmt::Display for RequestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestKey::ClientIp => f.write_str("ip"),
            RequestKey::Header(h) => write!(f, "header:{h}"),
            RequestKey::Claim(c) => write!(f, "claim:{c}"),
            RequestKey::Consumer => f.write_str("consumer"),
            RequestKey::Route => f.write_str("route"),
        }
    }
}

/// The facts about a request a key may be taken from.
pub struct Subject<'a> {
    pub client_ip: Option<IpAddr>,
    pub headers: &'a HeaderMap,
    pub claims: Option<&'a Claims>,
    pub consumer: Option<&'a str>,
}

/// Tags keep one kind of key from ever equalling another (a header value
/// from counting as someone's IP).
const TAG_IP: u8 = 0;
const TAG_HEADER: u8 = 1;
const TAG_CLAIM: u8 = 2;
const TAG_ROUTE: u8 = 3;
const TAG_CONSUMER: u8 = 4;

impl RequestKey {
    /// Reads `ip`, `header:NAME`, `claim:NAME`, `consumer` and (when
    /// `route` is allowed) `route`; `what` names it in an error.
    pub fn parse(s: &str, route: bool, what: &str) -> Result<Self, String> {
        let kinds = if route {
            "ip, header:NAME, claim:NAME, consumer or route"
        } else {
            "ip, header:NAME, claim:NAME or consumer"
        };
        match s {
            "ip" => Ok(RequestKey::ClientIp),
            "consumer" => Ok(RequestKey::Consumer),
            "route" if route => Ok(RequestKey::Route),
            _ => {
                if let Some(name) = s.strip_prefix("header:") {
                    HeaderName::from_bytes(name.trim().as_bytes())
                        .map(RequestKey::Header)
                        .map_err(|_| format!("\"{name}\" is not a valid header name"))
                } else if let Some(claim) = s.strip_prefix("claim:") {
                    if claim.is_empty() {
                        Err("claim: needs a claim name".into())
                    } else {
                        Ok(RequestKey::Claim(claim.to_string()))
                    }
                } else {
                    Err(format!("unknown {what} \"{s}\"; use {kinds}"))
                }
            }
        }
    }

    /// Whether the key needs a verified token (so counting waits for auth).
    /// Whether the key is known only once the request is authenticated.
    pub fn needs_identity(&self) -> bool {
        matches!(self, RequestKey::Claim(_) | RequestKey::Consumer)
    }

    /// Writes the key of `subject` into `hasher`: equal for the same
    /// client, tagged by kind. A missing header, claim or consumer falls
    /// back to the client IP: a missing key never means a key of its own.
    /// Nothing is allocated: this runs per request.
    pub fn hash_into<H: Hasher>(&self, subject: &Subject<'_>, hasher: &mut H) {
        match self {
            RequestKey::ClientIp => hash_ip(subject.client_ip, hasher),
            RequestKey::Route => hasher.write_u8(TAG_ROUTE),
            RequestKey::Header(name) => match subject.headers.get(name) {
                Some(v) => {
                    hasher.write_u8(TAG_HEADER);
                    hasher.write(v.as_bytes());
                }
                None => hash_ip(subject.client_ip, hasher),
            },
            RequestKey::Claim(name) => match subject.claims.and_then(|c| c.get(name)) {
                Some(Value::String(s)) => {
                    hasher.write_u8(TAG_CLAIM);
                    hasher.write(s.as_bytes());
                }
                Some(v) => {
                    hasher.write_u8(TAG_CLAIM);
                    hasher.write(v.to_string().as_bytes());
                }
                None => hash_ip(subject.client_ip, hasher),
            },
            RequestKey::Consumer => match subject.consumer {
                Some(c) => {
                    hasher.write_u8(TAG_CONSUMER);
                    hasher.write(c.as_bytes());
                }
                None => hash_ip(subject.client_ip, hasher),
            },
        }
    }

    /// The key of `subject` hashed with a fixed hasher: the same in every
    /// process, so instances behind one balancer agree (consistent
    /// hashing). Not for counting, where a client could aim keys at one
    /// value: a rate limit hashes with its own random keys.
    pub fn stable_hash(&self, subject: &Subject<'_>) -> u64 {
        let mut h = StableHasher::default();
        self.hash_into(subject, &mut h);
        h.finish()
    }
}

/// FNV-1a: fixed, simple, good enough to spread keys over a hash ring.
struct StableHasher(u64);

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for StableHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A client IP as a key: an IPv6 client by its /64, since one host usually
/// holds a whole /64 and could otherwise rotate addresses to be a new
/// client; an IPv4 one as its IPv4-mapped address.
fn hash_ip<H: Hasher>(ip: Option<IpAddr>, hasher: &mut H) {
    let octets = match ip {
        Some(IpAddr::V4(v4)) => v4.to_ipv6_mapped().octets(),
        Some(IpAddr::V6(v6)) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            o
        }
        None => [0; 16],
    };
    hasher.write_u8(TAG_IP);
    hasher.write(&octets);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject<'a>(ip: &str, headers: &'a HeaderMap, claims: Option<&'a Claims>) -> Subject<'a> {
        Subject {
            client_ip: Some(ip.parse().unwrap()),
            headers,
            claims,
            consumer: None,
        }
    }

    #[test]
    fn keys_parse_and_print() {
        for text in ["ip", "header:x-api-key", "claim:sub", "consumer", "route"] {
            assert_eq!(
                RequestKey::parse(text, true, "key").unwrap().to_string(),
                text
            );
        }
        assert!(RequestKey::parse("route", false, "key").is_err());
        assert!(RequestKey::parse("claim:", true, "key").is_err());
        assert!(RequestKey::parse("cookie:x", true, "rate limit key")
            .unwrap_err()
            .starts_with("unknown rate limit key \"cookie:x\""));
    }

    #[test]
    fn one_client_one_key() {
        let none = HeaderMap::new();
        let ip = RequestKey::ClientIp;
        let key = |k: &RequestKey, s: Subject<'_>| k.stable_hash(&s);
        // The /64 of an IPv6 client is one client; IPv4 as IPv4.
        assert_eq!(
            key(&ip, subject("2001:db8:1:2::1", &none, None)),
            key(&ip, subject("2001:db8:1:2:ffff::9", &none, None))
        );
        assert_ne!(
            key(&ip, subject("2001:db8:1:2::1", &none, None)),
            key(&ip, subject("2001:db8:1:3::1", &none, None))
        );
        assert_eq!(
            key(&ip, subject("10.0.0.1", &none, None)),
            key(
                &ip,
                subject("::ffff:10.0.0.1", &none, None).with_canonical()
            )
        );
        // A missing header or claim is the client IP.
        let header = RequestKey::Header(HeaderName::from_static("x-key"));
        assert_eq!(
            key(&header, subject("10.0.0.1", &none, None)),
            key(&ip, subject("10.0.0.1", &none, None))
        );
        let mut sent = HeaderMap::new();
        sent.insert("x-key", http::HeaderValue::from_static("k1"));
        assert_ne!(
            key(&header, subject("10.0.0.1", &sent, None)),
            key(&ip, subject("10.0.0.1", &none, None))
        );
        let mut claims = Claims::new();
        claims.insert("sub".into(), Value::from("ann"));
        let claim = RequestKey::Claim("sub".into());
        assert_ne!(
            key(&claim, subject("10.0.0.1", &none, Some(&claims))),
            key(&claim, subject("10.0.0.1", &none, None))
        );
        // Rate limits and hashing read one key: the same bytes go in.
        let mut a = std::collections::hash_map::DefaultHasher::new();
        let mut b = std::collections::hash_map::DefaultHasher::new();
        header.hash_into(&subject("10.0.0.1", &sent, None), &mut a);
        header.hash_into(&subject("10.9.9.9", &sent, None), &mut b);
        assert_eq!(a.finish(), b.finish());
    }

    impl<'a> Subject<'a> {
        fn with_canonical(mut self) -> Self {
            self.client_ip = self.client_ip.map(|ip| ip.to_canonical());
            self
        }
    }
}
