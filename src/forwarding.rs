//! Who the client is and what the upstream is told about it: the request id,
//! the client IP (believing `X-Forwarded-For` only from trusted proxies), and
//! the forwarding fields (`X-Forwarded-*`, `X-Real-IP`, RFC 7239
//! `Forwarded`). Joins `request_filter` (identify) and
//! `upstream_request_filter` (tell).

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use ipnet::IpNet;
use pingora_http::RequestHeader;

use crate::transform::headers::{remove_fields, EditHeaders};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// Fields some frameworks route by (IIS, Symfony, Laravel): a client's
/// would choose the upstream's route past the gateway's.
pub const X_ORIGINAL_URL: HeaderName = HeaderName::from_static("x-original-url");
pub const X_REWRITE_URL: HeaderName = HeaderName::from_static("x-rewrite-url");

/// Forwarding fields the gateway does not set but frameworks believe
/// (Spring's ForwardedHeaderFilter, Tomcat's RemoteIpValve, Rack, Werkzeug's
/// ProxyFix build links and redirects from them): passed on only from a
/// trusted proxy, and then part of the cache key.
pub const BELIEVED_FROM_PROXIES: [&str; 9] = [
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-server",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-original-host",
    "front-end-https",
];

/// The request id's name as a response sends it: a response head keeps its
/// fields' case, and Pingora takes a `&'static str` name without the copy
/// it makes of a `HeaderName`'s.
pub mod sent {
    pub const X_REQUEST_ID: &str = "X-Request-Id";
}

/// A request's id: the client's `X-Request-Id` when it is sane (1-128
/// characters of letters, digits and `-_.:`), else a new UUID. Kept as a
/// header value so that sending it costs no copy.
#[derive(Clone, Debug)]
pub struct RequestId(HeaderValue);

impl RequestId {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        if let Some(v) = headers.get(REQUEST_ID) {
            let b = v.as_bytes();
            if !b.is_empty()
                && b.len() <= 128
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
            {
                return RequestId(v.clone());
            }
        }
        Self::generate()
    }

    pub fn generate() -> Self {
        let mut buf = uuid::Uuid::encode_buffer();
        let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
        RequestId(HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("-")))
    }

    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever kept (checked or generated).
        self.0.to_str().unwrap_or("-")
    }
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId(HeaderValue::from_static(""))
    }
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
            let Ok(ip) = part.trim().parse::<IpAddr>().map(|ip| ip.to_canonical()) else {
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
    /// The connecting peer, IPv4-mapped addresses made plain.
    pub peer: Option<IpAddr>,
    pub peer_trusted: bool,
    /// The client as `client_ip` found it (`X-Real-IP`).
    pub client_ip: Option<IpAddr>,
    pub tls: bool,
    /// The client's request headers, whose forwarding fields are extended.
    pub client: &'a HeaderMap,
    /// The client's host as sent (HTTP/2 authority, or `Host`).
    pub host: Option<HeaderValue>,
}

impl Forwarded<'_> {
    /// A trusted proxy's own value of `name`; nobody else's is believed.
    fn trusted(&self, name: &HeaderName) -> Option<HeaderValue> {
        // Looked up only for a trusted peer: the common case costs nothing.
        self.peer_trusted
            .then(|| self.client.get(name).cloned())
            .flatten()
    }

    /// The scheme the upstream is told (`X-Forwarded-Proto`).
    pub fn proto(&self) -> HeaderValue {
        self.trusted(&X_FORWARDED_PROTO)
            .unwrap_or_else(|| HeaderValue::from_static(if self.tls { "https" } else { "http" }))
    }

    /// The host the upstream is told (`X-Forwarded-Host`).
    pub fn forwarded_host(&self) -> Option<HeaderValue> {
        self.trusted(&X_FORWARDED_HOST)
            .or_else(|| self.host.clone())
    }

    /// Sets `X-Forwarded-For` to the client's chain with the peer appended,
    /// `-Proto` and `-Host` (a trusted proxy's own are passed on),
    /// `X-Real-IP`, and `Forwarded` with the gateway's own element (after a
    /// trusted proxy's chain; a client's own is dropped). `X-Original-URL`
    /// and `X-Rewrite-URL` never pass. Works on a copy of the client's
    /// request and on a request the gateway builds itself (an aggregate
    /// part) alike.
    pub fn apply(&self, req: &mut impl EditHeaders) {
        // Before the inserts, so the pass sees only the client's fields.
        let trusted = self.peer_trusted;
        remove_fields(req, |n| {
            *n == X_ORIGINAL_URL
                || *n == X_REWRITE_URL
                || (!trusted && BELIEVED_FROM_PROXIES.contains(&n.as_str()))
        });
        // The peer's address is written once, at the end of the chain, and
        // shared from there by `Forwarded` and `X-Real-IP` (the peer itself
        // unless a trusted proxy named the client).
        let chain = self.peer.map(|peer| {
            let mut chain = String::with_capacity(64);
            for v in self.client.get_all(X_FORWARDED_FOR).iter() {
                if let Ok(s) = v.to_str() {
                    chain.push_str(s.trim());
                    chain.push_str(", ");
                }
            }
            let at = chain.len();
            push_ip(&mut chain, peer);
            (chain, at)
        });
        let forwarded = self.forwarded_field(chain.as_ref().map(|(c, at)| &c[*at..]));
        set_bytes(req, &FORWARDED, Bytes::from(forwarded));
        if let Some((chain, at)) = chain {
            let chain = Bytes::from(chain);
            if self.client_ip == self.peer {
                set_bytes(req, &X_REAL_IP, chain.slice(at..));
            }
            set_bytes(req, &X_FORWARDED_FOR, chain);
        }
        if let Some(ip) = self.client_ip.filter(|ip| Some(*ip) != self.peer) {
            let mut text = String::with_capacity(40);
            push_ip(&mut text, ip);
            set_bytes(req, &X_REAL_IP, Bytes::from(text));
        }
        req.insert(&X_FORWARDED_PROTO, self.proto());
        match self.forwarded_host() {
            Some(h) => req.insert(&X_FORWARDED_HOST, h),
            None => req.remove(&X_FORWARDED_HOST),
        }
    }

    /// What a trusted proxy told the upstream of the original request
    /// beyond scheme and host (its `Forwarded` chain and the fields of
    /// [`BELIEVED_FROM_PROXIES`]), as one line for the cache key; empty
    /// for any other peer, whose fields never pass.
    pub fn proxy_told(&self) -> String {
        let mut out = String::new();
        if !self.peer_trusted {
            return out;
        }
        let names = std::iter::once("forwarded").chain(BELIEVED_FROM_PROXIES);
        for name in names {
            for v in self.client.get_all(name) {
                out.push(' ');
                out.push_str(name);
                out.push('=');
                out.push_str(&String::from_utf8_lossy(v.as_bytes()));
            }
        }
        out
    }

    /// `Forwarded` (RFC 7239): a trusted proxy's elements, then ours,
    /// describing the hop from the peer to the gateway.
    /// `peer` is the peer's address as `X-Forwarded-For` ends with it.
    fn forwarded_field(&self, peer: Option<&str>) -> String {
        let mut out = String::with_capacity(64);
        if self.peer_trusted {
            for v in self.client.get_all(FORWARDED).iter() {
                if let Ok(s) = v.to_str() {
                    let s = s.trim();
                    if !s.is_empty() {
                        out.push_str(s);
                        out.push_str(", ");
                    }
                }
            }
        }
        out.push_str("for=");
        match (self.peer, peer) {
            (Some(IpAddr::V6(_)), Some(text)) => {
                out.push_str("\"[");
                out.push_str(text);
                out.push_str("]\"");
            }
            (_, Some(text)) => out.push_str(text),
            (_, None) => out.push_str("unknown"),
        }
        out.push_str(if self.tls {
            ";proto=https"
        } else {
            ";proto=http"
        });
        if let Some(host) = self.host.as_ref().and_then(|h| h.to_str().ok()) {
            out.push_str(";host=");
            push_token_or_quoted(&mut out, host);
        }
        out
    }
}

/// A value built from the client's (already valid) fields and the
/// gateway's own text; one that is not a valid value leaves the field out.
fn set_bytes(req: &mut impl EditHeaders, name: &HeaderName, text: Bytes) {
    match HeaderValue::from_maybe_shared(text) {
        Ok(value) => req.insert(name, value),
        Err(_) => req.remove(name),
    }
}

/// A `Forwarded` parameter value: a token as it is, anything else quoted
/// (RFC 7230 quoted-string; `"` and `\` escaped).
fn push_token_or_quoted(out: &mut String, value: &str) {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !value.is_empty() && value.bytes().all(tchar) {
        out.push_str(value);
        return;
    }
    out.push('"');
    if !value.contains(['"', '\\']) {
        out.push_str(value);
    } else {
        for c in value.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out.push('"');
}

/// `ip` in its usual text form. IPv4, the common case, skips the formatting
/// machinery, which costs about a tenth of the header it feeds.
pub(crate) fn push_ip(out: &mut impl TextSink, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push_text(".");
                }
                out.push_text(digits.format(octet));
            }
        }
        IpAddr::V6(v6) => out.push_text(&v6.to_string()),
    }
}

/// Where [`push_ip`] writes: a header value being built, or a log line.
pub(crate) trait TextSink {
    fn push_text(&mut self, text: &str);
}

impl TextSink for String {
    fn push_text(&mut self, text: &str) {
        self.push_str(text);
    }
}

impl TextSink for Vec<u8> {
    fn push_text(&mut self, text: &str) {
        self.extend_from_slice(text.as_bytes());
    }
}

/// The request's host as sent, port included: the URI authority of an
/// HTTP/2 or absolute-form request (which wins, as Pingora sends it
/// upstream), else the `Host` header.
pub fn raw_host_value(req: &RequestHeader) -> Option<HeaderValue> {
    match req.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => req.headers.get(http::header::HOST).cloned(),
    }
}

/// [`raw_host_value`] as text.
pub fn raw_host(req: &RequestHeader) -> Option<&str> {
    req.uri.authority().map(|a| a.as_str()).or_else(|| {
        req.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

/// The request's host without its port, for routing.
pub fn request_host(req: &RequestHeader) -> Option<&str> {
    raw_host(req).map(strip_port)
}

/// `host:port` or `[v6]:port` without the port (and brackets).
pub fn strip_port(host: &str) -> &str {
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
    fn ip_text_matches_the_standard_form() {
        for text in ["0.0.0.0", "127.0.0.1", "10.20.255.9", "::1", "2001:db8::7"] {
            let mut out = String::from("x, ");
            push_ip(&mut out, text.parse().unwrap());
            assert_eq!(out, format!("x, {text}"));
        }
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123.x:y"));
        assert_eq!(RequestId::from_headers(&h).as_str(), "abc-123.x:y");
        h.insert("x-request-id", HeaderValue::from_static("bad id<script>"));
        let generated = RequestId::from_headers(&h);
        assert_eq!(generated.as_str().len(), 36);
        assert_ne!(
            RequestId::from_headers(&HeaderMap::new()).as_str(),
            generated.as_str()
        );
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
    fn mapped_ipv4_addresses_are_plain_ipv4() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mapped: IpAddr = "::ffff:10.1.1.1".parse().unwrap();
        let chain = headers(&["::ffff:198.51.100.7"]);
        assert_eq!(
            client_ip(mapped.to_canonical(), &chain, &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn forwarding_headers() {
        let mut client = RequestHeader::build("GET", b"/", None).unwrap();
        client.insert_header("X-Forwarded-For", "1.1.1.1").unwrap();
        client.insert_header("X-Forwarded-Proto", "https").unwrap();
        client
            .insert_header("X-Forwarded-Host", "spoofed.example")
            .unwrap();
        let forwarded = |peer_trusted| Forwarded {
            peer: Some("127.0.0.1".parse().unwrap()),
            peer_trusted,
            client_ip: Some("127.0.0.1".parse().unwrap()),
            tls: false,
            client: &client.headers,
            host: Some(HeaderValue::from_static("api.example.com")),
        };
        let mut req = client.clone();
        forwarded(false).apply(&mut req);
        assert_eq!(req.headers["x-forwarded-for"], "1.1.1.1, 127.0.0.1");
        assert_eq!(req.headers["x-forwarded-proto"], "http");
        assert_eq!(req.headers["x-forwarded-host"], "api.example.com");
        // A request built from scratch gets the same, and a trusted proxy's
        // own fields are passed on.
        let mut part = RequestHeader::build("GET", b"/part", None).unwrap();
        forwarded(true).apply(&mut part);
        assert_eq!(part.headers["x-forwarded-for"], "1.1.1.1, 127.0.0.1");
        assert_eq!(part.headers["x-forwarded-proto"], "https");
        assert_eq!(part.headers["x-forwarded-host"], "spoofed.example");
    }

    #[test]
    fn the_forwarded_field_is_the_gateways_own() {
        let mut client = RequestHeader::build("GET", b"/", None).unwrap();
        client
            .insert_header("Forwarded", "for=6.6.6.6;proto=https")
            .unwrap();
        client.insert_header("X-Original-URL", "/admin").unwrap();
        let at = |peer: &str, peer_trusted, host: &'static str| {
            let f = Forwarded {
                peer: Some(peer.parse().unwrap()),
                peer_trusted,
                client_ip: Some(peer.parse().unwrap()),
                tls: true,
                client: &client.headers,
                host: Some(HeaderValue::from_static(host)),
            };
            let mut req = client.clone();
            f.apply(&mut req);
            assert!(req.headers.get("x-original-url").is_none());
            req.headers["forwarded"].to_str().unwrap().to_string()
        };
        assert_eq!(
            at("10.1.1.1", false, "api.test"),
            "for=10.1.1.1;proto=https;host=api.test"
        );
        assert_eq!(
            at("2001:db8::1", false, "api.test:8443"),
            "for=\"[2001:db8::1]\";proto=https;host=\"api.test:8443\""
        );
        assert_eq!(
            at("10.1.1.1", true, "api.test"),
            "for=6.6.6.6;proto=https, for=10.1.1.1;proto=https;host=api.test"
        );
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(strip_port("a.example.com:8080"), "a.example.com");
        assert_eq!(strip_port("a.example.com"), "a.example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
