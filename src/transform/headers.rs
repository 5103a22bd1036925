//! Header rules (`remove`, `rename`, `set`, `add`, run in that order), the
//! hop-by-hop fields that never cross the gateway, and deprecation headers.

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use pingora_http::{RequestHeader, ResponseHeader};

/// For a body whose bytes the gateway changes: a strong validator would
/// claim they are the upstream's, so it becomes weak (`W/"…"`); one that is
/// not a quoted tag at all is dropped (RFC 9110 8.8.3), as nginx does.
pub fn weaken_etag(resp: &mut ResponseHeader) {
    let Some(etag) = resp.headers.get(http::header::ETAG) else {
        return;
    };
    let tag = etag.as_bytes();
    if tag.starts_with(b"W/") {
        return;
    }
    let weak = tag
        .starts_with(b"\"")
        .then(|| HeaderValue::from_bytes(&[b"W/", tag].concat()).ok())
        .flatten();
    match weak {
        Some(weak) => {
            let _ = resp.insert_header(http::header::ETAG, weak);
        }
        None => {
            resp.remove_header(&http::header::ETAG);
        }
    }
}

/// Requests and responses both carry a case-preserving header map that must
/// be edited through its own methods; this trait lets one rule set edit both.
pub trait EditHeaders {
    fn header_map(&self) -> &HeaderMap;
    fn remove(&mut self, name: &HeaderName);
    fn insert(&mut self, name: &HeaderName, value: HeaderValue);
    fn append(&mut self, name: &HeaderName, value: HeaderValue);
}

macro_rules! edit_headers_for {
    ($t:ty) => {
        impl EditHeaders for $t {
            fn header_map(&self) -> &HeaderMap {
                &self.headers
            }
            fn remove(&mut self, name: &HeaderName) {
                self.remove_header(name);
            }
            fn insert(&mut self, name: &HeaderName, value: HeaderValue) {
                // Valid names and values cannot fail to insert.
                let _ = self.insert_header(name, value);
            }
            fn append(&mut self, name: &HeaderName, value: HeaderValue) {
                let _ = self.append_header(name, value);
            }
        }
    };
}
edit_headers_for!(RequestHeader);
edit_headers_for!(ResponseHeader);

/// Removes every field `doomed` picks, in one pass over the fields present:
/// per message, most candidate names are absent, and a hashed removal per
/// candidate costs more than the pass. Nothing is allocated when none
/// matches, the usual case.
pub fn remove_fields<H: EditHeaders>(target: &mut H, doomed: impl Fn(&HeaderName) -> bool) {
    let names: Vec<HeaderName> = target
        .header_map()
        .keys()
        .filter(|n| doomed(n))
        .cloned()
        .collect();
    for name in &names {
        target.remove(name);
    }
}

/// One `request_headers` or `response_headers` block, compiled.
#[derive(Debug, Default)]
pub struct HeaderRules {
    pub remove: Vec<HeaderName>,
    pub rename: Vec<(HeaderName, HeaderName)>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderRules {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.rename.is_empty()
            && self.set.is_empty()
            && self.add.is_empty()
    }

    pub fn apply(&self, target: &mut impl EditHeaders) {
        for name in &self.remove {
            target.remove(name);
        }
        for (from, to) in &self.rename {
            let values: Vec<HeaderValue> =
                target.header_map().get_all(from).iter().cloned().collect();
            if values.is_empty() {
                continue;
            }
            target.remove(from);
            target.remove(to);
            for v in values {
                target.append(to, v);
            }
        }
        for (name, value) in &self.set {
            target.insert(name, value.clone());
        }
        for (name, value) in &self.add {
            target.append(name, value.clone());
        }
    }
}

/// Response fields that describe one connection, not the message: an
/// upstream's must not reach the client.
pub fn strip_hop_by_hop(resp: &mut ResponseHeader) {
    use http::header::{CONNECTION, PROXY_AUTHENTICATE, TE, TRAILER, UPGRADE};
    // A 101 keeps `Connection: Upgrade` and `Upgrade`: they are the
    // handshake the client waits for.
    let switching = resp.status == http::StatusCode::SWITCHING_PROTOCOLS;
    // Pingora replaces `Connection` (HTTP/1) or drops it (HTTP/2) as it
    // writes a final response head, so removing it here would only be undone;
    // an informational head is written as it is.
    let drop_connection = resp.status.is_informational() && !switching;
    // `keep-alive`, `close` and `upgrade` are options, not field names:
    // leaving them out keeps the usual list empty, and an empty list is not
    // allocated.
    let nominated: Vec<HeaderName> = resp
        .headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.eq_ignore_ascii_case("keep-alive")
                && !t.eq_ignore_ascii_case("close")
                && !t.eq_ignore_ascii_case("upgrade")
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    remove_fields(resp, |n| {
        if *n == CONNECTION {
            return drop_connection;
        }
        if *n == UPGRADE {
            return !switching;
        }
        *n == TE
            || *n == TRAILER
            || *n == PROXY_AUTHENTICATE
            || n.as_str() == "keep-alive"
            || n.as_str() == "proxy-connection"
            || nominated.contains(n)
    });
}

/// A request's own framing and proxy fields, which describe the client's hop
/// only. Pingora is told not to remove these itself (`strip_hop_by_hop: false`
/// on every peer): it would do so with ten hashed removals of names that are
/// almost never present, the largest per-request cost it adds to a plain
/// request. It still drops the fields a `Connection` header nominates, and
/// `Connection`, `Upgrade` and `HTTP2-Settings` unless the request is a
/// WebSocket handshake, so those are left to it. With `Transfer-Encoding`
/// gone, Pingora frames a request body again after the filters run.
pub fn strip_request_hop_by_hop(req: &mut RequestHeader) {
    use http::header::{PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING};
    remove_fields(req, |n| {
        *n == TRANSFER_ENCODING
            || *n == TE
            || *n == TRAILER
            || *n == PROXY_AUTHORIZATION
            || *n == PROXY_AUTHENTICATE
            || n.as_str() == "keep-alive"
            || n.as_str() == "proxy-connection"
    });
}

/// `deprecation:` on a route: RFC 9745 `Deprecation`, RFC 8594 `Sunset` and
/// a `Link` with `rel="deprecation"` on every response.
#[derive(Debug)]
pub struct Deprecation {
    pub sunset: Option<HeaderValue>,
    pub link: Option<HeaderValue>,
}

impl Deprecation {
    pub fn apply(&self, resp: &mut impl EditHeaders) {
        resp.insert(
            &HeaderName::from_static("deprecation"),
            HeaderValue::from_static("true"),
        );
        if let Some(sunset) = &self.sunset {
            resp.insert(&HeaderName::from_static("sunset"), sunset.clone());
        }
        if let Some(link) = &self.link {
            resp.append(&http::header::LINK, link.clone());
        }
    }

    /// `sunset` is a date (`2027-06-30`), an RFC 3339 time, or already an
    /// HTTP date; it is sent as an HTTP date.
    pub fn new(sunset: Option<&str>, link: Option<&str>) -> Result<Self, String> {
        let sunset = match sunset {
            None => None,
            Some(s) => {
                let time = parse_sunset(s)?;
                Some(
                    HeaderValue::from_str(&httpdate::fmt_http_date(time))
                        .map_err(|e| e.to_string())?,
                )
            }
        };
        let link = match link {
            None => None,
            Some(url) => {
                if url.contains(['<', '>', '"', '\r', '\n']) || url.is_empty() {
                    return Err(format!("link \"{url}\" is not a valid URL"));
                }
                Some(
                    HeaderValue::from_str(&format!("<{url}>; rel=\"deprecation\""))
                        .map_err(|_| format!("link \"{url}\" is not a valid URL"))?,
                )
            }
        };
        Ok(Deprecation { sunset, link })
    }
}

fn parse_sunset(s: &str) -> Result<std::time::SystemTime, String> {
    let bad = || {
        format!("sunset \"{s}\" is not a date; write it like 2027-06-30 or 2027-06-30T00:00:00Z")
    };
    if let Ok(t) = httpdate::parse_http_date(s) {
        return Ok(t);
    }
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_string()
    };
    humantime::parse_rfc3339_weak(&full).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &'static str) -> HeaderName {
        HeaderName::from_static(s)
    }

    #[test]
    fn rules_run_remove_rename_set_add() {
        let rules = HeaderRules {
            remove: vec![name("cookie")],
            rename: vec![(name("x-old"), name("x-new"))],
            set: vec![(name("x-gateway"), HeaderValue::from_static("gatehouse"))],
            add: vec![(name("x-new"), HeaderValue::from_static("added"))],
        };
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("Cookie", "a=1").unwrap();
        req.append_header("X-Old", "1").unwrap();
        req.append_header("X-Old", "2").unwrap();
        req.insert_header("X-Gateway", "client").unwrap();
        rules.apply(&mut req);
        assert!(req.headers.get("cookie").is_none());
        assert!(req.headers.get("x-old").is_none());
        let new: Vec<_> = req.headers.get_all("x-new").iter().collect();
        assert_eq!(new, ["1", "2", "added"]);
        assert_eq!(req.headers.get("x-gateway").unwrap(), "gatehouse");
    }

    #[test]
    fn hop_by_hop_fields_are_dropped_from_responses() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("Connection", "close, X-Secret-Hop")
            .unwrap();
        resp.insert_header("X-Secret-Hop", "1").unwrap();
        resp.insert_header("Keep-Alive", "timeout=5").unwrap();
        resp.insert_header("X-Kept", "1").unwrap();
        for name in [
            "Upgrade",
            "Trailer",
            "TE",
            "Proxy-Connection",
            "Proxy-Authenticate",
        ] {
            resp.insert_header(name, "x").unwrap();
        }
        strip_hop_by_hop(&mut resp);
        for name in [
            "upgrade",
            "trailer",
            "te",
            "proxy-connection",
            "proxy-authenticate",
        ] {
            assert!(resp.headers.get(name).is_none(), "{name} kept");
        }
        // Left for Pingora to replace as it writes the head (the end-to-end
        // test `hop_by_hop_fields_do_not_cross` sees what the client gets).
        assert!(resp.headers.get("connection").is_some());
        assert!(resp.headers.get("x-secret-hop").is_none());
        assert!(resp.headers.get("keep-alive").is_none());
        assert!(resp.headers.get("x-kept").is_some());

        let mut early = ResponseHeader::build(103, None).unwrap();
        early.insert_header("Connection", "X-Secret-Hop").unwrap();
        early.insert_header("X-Secret-Hop", "1").unwrap();
        early
            .insert_header("Link", "</a.css>; rel=preload")
            .unwrap();
        strip_hop_by_hop(&mut early);
        assert!(early.headers.get("connection").is_none());
        assert!(early.headers.get("x-secret-hop").is_none());
        assert!(early.headers.get("link").is_some());

        let mut switching = ResponseHeader::build(101, None).unwrap();
        switching
            .insert_header("Connection", "Upgrade, X-Secret-Hop")
            .unwrap();
        switching.insert_header("Upgrade", "websocket").unwrap();
        switching.insert_header("X-Secret-Hop", "1").unwrap();
        switching.insert_header("Keep-Alive", "timeout=5").unwrap();
        strip_hop_by_hop(&mut switching);
        assert!(switching.headers.get("connection").is_some());
        assert_eq!(switching.headers["upgrade"], "websocket");
        assert!(switching.headers.get("x-secret-hop").is_none());
        assert!(switching.headers.get("keep-alive").is_none());
    }

    #[test]
    fn deprecation_headers() {
        let d =
            Deprecation::new(Some("2027-06-30"), Some("https://docs.example.com/migrate")).unwrap();
        let mut resp = ResponseHeader::build(200, None).unwrap();
        d.apply(&mut resp);
        assert_eq!(resp.headers.get("deprecation").unwrap(), "true");
        assert_eq!(
            resp.headers.get("sunset").unwrap(),
            "Wed, 30 Jun 2027 00:00:00 GMT"
        );
        assert_eq!(
            resp.headers.get("link").unwrap(),
            "<https://docs.example.com/migrate>; rel=\"deprecation\""
        );
        assert!(Deprecation::new(Some("soon"), None).is_err());
        assert!(Deprecation::new(None, Some("a>b")).is_err());
    }
}
