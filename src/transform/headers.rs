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

/// A bare map keeps no second map of name spellings: the cheap target for
/// edits (see [`OpenRequest`]).
impl EditHeaders for HeaderMap {
    fn header_map(&self) -> &HeaderMap {
        self
    }
    fn remove(&mut self, name: &HeaderName) {
        HeaderMap::remove(self, name);
    }
    fn insert(&mut self, name: &HeaderName, value: HeaderValue) {
        // Past http's limit of 32,768 fields the field is not added rather
        // than the process aborted; the head limits refuse far fewer.
        let _ = self.try_insert(name.clone(), value);
    }
    fn append(&mut self, name: &HeaderName, value: HeaderValue) {
        let _ = self.try_append(name.clone(), value);
    }
}

/// The upstream request taken apart for the gateway's edits, then put
/// back. Pingora's request head keeps every name twice (a map of values and
/// a map of the client's spellings) and parses the name again on each
/// insert; a cloned head also has no spare room, so the first inserts grow
/// both maps. The gateway sets some ten fields on every request, and done
/// through that API they were a tenth of a plain request's instructions.
/// Opened, the head is one map with room for them, edited by `HeaderName`.
///
/// The price: names reach an HTTP/1 upstream in canonical form (standard
/// names title-cased, others lower-cased), as HAProxy and Envoy send them
/// and as an HTTP/2 client's arrive anyway; field names are
/// case-insensitive (RFC 9110 5.1).
pub struct OpenRequest {
    parts: http::request::Parts,
    /// The target as the client sent it, when the URI does not give it
    /// back byte for byte (absolute form, bytes that are not UTF-8).
    raw_target: Option<Vec<u8>>,
    send_end_stream: Option<bool>,
}

/// Fields the gateway may add to a request: the five forwarding fields,
/// the request id, trace context, identity and a route's own rules.
const ROOM_FOR_GATEWAY_FIELDS: usize = 16;

impl OpenRequest {
    pub fn open(req: &mut RequestHeader) -> Self {
        let raw = req.raw_path();
        let round_trips = req.uri.path_and_query().map(|p| p.as_str().as_bytes()) == Some(raw);
        let raw_target = (!round_trips).then(|| raw.to_vec());
        let send_end_stream = req.send_end_stream();
        let empty = RequestHeader::from(http::Request::new(()).into_parts().0);
        let mut parts: http::request::Parts = std::mem::replace(req, empty).into();
        // Past http's limit there is no room to make; the inserts then fail
        // one by one, as they would have.
        let _ = parts.headers.try_reserve(ROOM_FOR_GATEWAY_FIELDS);
        OpenRequest {
            parts,
            raw_target,
            send_end_stream,
        }
    }

    /// Puts the edited head back where it was taken from.
    pub fn close(self, req: &mut RequestHeader) -> pingora_core::Result<()> {
        let mut head = RequestHeader::from(self.parts);
        if let Some(raw) = &self.raw_target {
            head.set_raw_path(raw)?;
        }
        if let Some(end) = self.send_end_stream {
            head.set_send_end_stream(end);
        }
        *req = head;
        Ok(())
    }
}

impl EditHeaders for OpenRequest {
    fn header_map(&self) -> &HeaderMap {
        &self.parts.headers
    }
    fn remove(&mut self, name: &HeaderName) {
        EditHeaders::remove(&mut self.parts.headers, name);
    }
    fn insert(&mut self, name: &HeaderName, value: HeaderValue) {
        EditHeaders::insert(&mut self.parts.headers, name, value);
    }
    fn append(&mut self, name: &HeaderName, value: HeaderValue) {
        EditHeaders::append(&mut self.parts.headers, name, value);
    }
}

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
pub fn strip_request_hop_by_hop(req: &mut impl EditHeaders) {
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

    fn wire(req: &RequestHeader) -> String {
        let mut out = Vec::new();
        req.header_to_h1_wire(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn an_opened_request_keeps_its_fields_target_and_framing() {
        for target in [
            &b"/a/b?c=d"[..],
            b"http://example.com/abs?x=1",
            b"/caf\xe9/raw",
            b"*",
        ] {
            let mut req = RequestHeader::build("GET", target, Some(2)).unwrap();
            req.append_header("Host", "example.com").unwrap();
            req.append_header("X-Client", "1").unwrap();
            req.append_header("X-Client", "2").unwrap();
            let mut head = OpenRequest::open(&mut req);
            head.insert(
                &name("x-forwarded-for"),
                HeaderValue::from_static("10.0.0.1"),
            );
            head.remove(&name("x-client"));
            head.append(&name("x-client"), HeaderValue::from_static("3"));
            head.close(&mut req).unwrap();
            assert_eq!(
                req.raw_path(),
                target,
                "{}",
                String::from_utf8_lossy(target)
            );
            assert_eq!(req.headers.get("host").unwrap(), "example.com");
            assert_eq!(req.headers.get("x-forwarded-for").unwrap(), "10.0.0.1");
            let clients: Vec<_> = req.headers.get_all("x-client").iter().collect();
            assert_eq!(clients, ["3"]);
            // Names leave in canonical form: standard ones title-cased.
            let text = wire(&req);
            assert!(text.contains("Host: example.com\r\n"), "{text}");
            assert!(text.contains("x-forwarded-for: 10.0.0.1\r\n"), "{text}");
        }
    }

    #[test]
    fn an_opened_http2_request_keeps_its_end_of_stream_choice() {
        for end in [true, false] {
            let mut req = RequestHeader::build_no_case("POST", b"/up", None).unwrap();
            req.set_version(http::Version::HTTP_2);
            req.set_send_end_stream(end);
            let head = OpenRequest::open(&mut req);
            head.close(&mut req).unwrap();
            assert_eq!(req.version, http::Version::HTTP_2);
            assert_eq!(req.send_end_stream(), Some(end));
        }
    }

    #[test]
    fn a_full_map_refuses_fields_without_aborting() {
        let mut map = HeaderMap::new();
        for i in 0..40_000 {
            let n = HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap();
            EditHeaders::insert(&mut map, &n, HeaderValue::from_static("v"));
        }
        assert!(map.len() < 40_000);
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
