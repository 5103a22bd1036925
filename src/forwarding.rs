//! Who the client is and what the upstream is told about it: the request id,
//! the client IP (believing `X-Forwarded-For` only from trusted proxies), and
//! the `X-Forwarded-*` headers. Joins `request_filter` (identify) and
//! `upstream_request_filter` (tell).

use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use ipnet::IpNet;
use pingora_http::RequestHeader;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The client's `X-Request-Id` when it is sane (1-128 characters of
/// letters, digits and `-_.:`), else a new UUID.
pub fn request_id(headers: &HeaderMap) -> String {
    if let Some(v) = headers.get(crate::respond::REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
        {
            // Checked ASCII above.
            return String::from_utf8_lossy(b).into_owned();
        }
    }
    uuid::Uuid::new_v4().hyphenated().to_string()
}

pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// The TCP peer, or, when the peer is a trusted proxy, the rightmost
/// `X-Forwarded-For` address that is not itself trusted. A client cannot
/// choose its own address by sending the header.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut leftmost = peer;
    let values: Vec<&HeaderValue> = headers.get_all(X_FORWARDED_FOR).iter().collect();
    for value in values.iter().rev() {
        let Ok(text) = value.to_str() else {
            return leftmost;
        };
        for part in text.rsplit(',') {
            let Ok(ip) = part.trim().parse::<IpAddr>() else {
                // Garbage from an untrusted hop: stop at the last good one.
                return leftmost;
            };
            if !is_trusted(ip, trusted) {
                return ip;
            }
            leftmost = ip;
        }
    }
    leftmost
}

/// What the upstream is told about the original request.
pub struct Forwarded<'a> {
    pub peer: Option<IpAddr>,
    pub peer_trusted: bool,
    pub tls: bool,
    /// The client's Host (or HTTP/2 authority).
    pub host: Option<&'a str>,
}

impl Forwarded<'_> {
    /// Appends the peer to `X-Forwarded-For` and sets `-Proto` and `-Host`;
    /// a trusted proxy's own `-Proto` and `-Host` are kept.
    pub fn apply(&self, req: &mut RequestHeader) {
        if let Some(peer) = self.peer {
            let mut chain = String::new();
            for v in req.headers.get_all(X_FORWARDED_FOR).iter() {
                if let Ok(s) = v.to_str() {
                    if !chain.is_empty() {
                        chain.push_str(", ");
                    }
                    chain.push_str(s.trim());
                }
            }
            if !chain.is_empty() {
                chain.push_str(", ");
            }
            chain.push_str(&peer.to_string());
            let _ = req.insert_header(X_FORWARDED_FOR, chain);
        }
        if !(self.peer_trusted && req.headers.contains_key(X_FORWARDED_PROTO)) {
            let proto = if self.tls { "https" } else { "http" };
            let _ = req.insert_header(X_FORWARDED_PROTO, proto);
        }
        if !(self.peer_trusted && req.headers.contains_key(X_FORWARDED_HOST)) {
            match self.host.and_then(|h| HeaderValue::from_str(h).ok()) {
                Some(h) => {
                    let _ = req.insert_header(X_FORWARDED_HOST, h);
                }
                None => {
                    req.remove_header(&X_FORWARDED_HOST);
                }
            }
        }
    }
}

/// The request's host without its port: the `Host` header, or the URI
/// authority of an HTTP/2 or absolute-form request.
pub fn request_host(req: &RequestHeader) -> Option<&str> {
    let raw = req.uri.authority().map(|a| a.as_str()).or_else(|| {
        req.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    })?;
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append(X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123.x:y"));
        assert_eq!(request_id(&h), "abc-123.x:y");
        h.insert("x-request-id", HeaderValue::from_static("bad id<script>"));
        let generated = request_id(&h);
        assert_eq!(generated.len(), 36);
        assert_ne!(request_id(&HeaderMap::new()), generated);
    }

    #[test]
    fn client_ip_believes_only_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let spoof = headers(&["1.2.3.4"]);
        let outside: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_ip(outside, &spoof, &trusted), outside);
        let proxy: IpAddr = "10.1.1.1".parse().unwrap();
        // The client prepended a fake address; the proxy appended the real one.
        let chain = headers(&["6.6.6.6, 198.51.100.7", "10.2.2.2"]);
        assert_eq!(
            client_ip(proxy, &chain, &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
        let garbage = headers(&["nonsense"]);
        assert_eq!(client_ip(proxy, &garbage, &trusted), proxy);
    }

    #[test]
    fn forwarding_headers() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("X-Forwarded-For", "1.1.1.1").unwrap();
        req.insert_header("X-Forwarded-Proto", "https").unwrap();
        Forwarded {
            peer: Some("127.0.0.1".parse().unwrap()),
            peer_trusted: false,
            tls: false,
            host: Some("api.example.com"),
        }
        .apply(&mut req);
        assert_eq!(req.headers["x-forwarded-for"], "1.1.1.1, 127.0.0.1");
        assert_eq!(req.headers["x-forwarded-proto"], "http");
        assert_eq!(req.headers["x-forwarded-host"], "api.example.com");
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(strip_port("a.example.com:8080"), "a.example.com");
        assert_eq!(strip_port("a.example.com"), "a.example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
