//! Body rules in flight: which bodies a rule reads, holding them back until
//! they are whole (up to `server.max_transform_size`, and within the shared
//! `server.max_buffered` budget), undoing their content coding, and
//! `xml_to_json` for XML responses. The JSON field rules themselves are in
//! [`super::json`].
//!
//! Joins `request_filter` (which request bodies to read, refused early
//! when they cannot be), `upstream_request_filter` (their framing),
//! `request_body_filter`, `upstream_response_filter` and
//! `upstream_response_body_filter`.
//!
//! On a route whose rules remove fields, a body is never passed on
//! unread: one that cannot be read, decoded, or held is refused (`400` for
//! a request, `502` for a response, `503` when the budget is spent). Where
//! the rules only rename, such a body passes untouched.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use pingora_http::{RequestHeader, ResponseHeader};
use serde_json::{Map, Value};

use super::decode::{self, Coding};
use super::headers::EditHeaders;
use super::json::JsonRules;
use crate::budget::{Budget, Held};

/// `response_body`: JSON field rules, and XML turned into JSON first.
#[derive(Debug)]
pub struct ResponseBodyRules {
    pub json: JsonRules,
    pub xml_to_json: bool,
}

impl ResponseBodyRules {
    /// Whether the rules remove fields: `Range` then never reaches the
    /// upstream, and its `206` is refused.
    pub fn removes(&self) -> bool {
        self.json.removes()
    }

    /// Before the upstream is asked: when fields are removed, the client's
    /// `Range` and `If-Range` go (a slice of the body would slip past the
    /// rules); the client gets the whole filtered body.
    pub fn drop_ranges(&self, req: &mut RequestHeader) {
        if !self.removes() {
            return;
        }
        for name in [http::header::RANGE, http::header::IF_RANGE] {
            if req.headers.contains_key(&name) {
                req.remove_header(&name);
            }
        }
    }
}

/// What a body is, by its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Xml,
    /// No type, or `text/plain`, on a request to a route whose rules
    /// remove fields: many frameworks decode such a body as JSON anyway,
    /// so it is read as JSON when it is, and passes when it is not.
    MaybeJson,
    Other,
}

pub fn body_kind(content_type: Option<&[u8]>) -> BodyKind {
    let Some(ct) = content_type.and_then(|c| std::str::from_utf8(c).ok()) else {
        return BodyKind::Other;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        BodyKind::Json
    } else if essence == "application/xml" || essence == "text/xml" {
        BodyKind::Xml
    } else {
        BodyKind::Other
    }
}

/// Why an XML document was not converted.
#[derive(Debug, PartialEq, Eq)]
pub enum XmlError {
    /// Not well-formed UTF-8 XML, more than one root, or too deep.
    Malformed,
    /// Its tree would cost more than the memory allowed for it.
    TooCostly,
}

/// What a node of the converted tree costs in memory, about: a `Value`, a
/// map entry and an allocation's overhead.
const XML_NODE_COST: usize = 128;
const MAX_XML_DEPTH: usize = 128;

/// Converts an XML document to JSON: `{"root": ...}`, attributes as
/// `@name`, text beside attributes or children as `#text`, repeated
/// elements as arrays, an element with only text as that string, an empty
/// one as null. `spend` is asked for the memory the tree takes as it grows
/// and refuses when it would pass its bound.
pub fn xml_to_json(body: &[u8], spend: &mut dyn FnMut(usize) -> bool) -> Result<Value, XmlError> {
    use quick_xml::events::Event;
    let text = std::str::from_utf8(body).map_err(|_| XmlError::Malformed)?;
    let mut reader = quick_xml::Reader::from_str(text);
    reader.config_mut().trim_text(true);
    // Open elements: name and what they hold so far.
    let mut stack: Vec<(String, Map<String, Value>, String)> = Vec::new();
    let mut root: Option<(String, Value)> = None;
    let mut charge = |n: usize| {
        if spend(n) {
            Ok(())
        } else {
            Err(XmlError::TooCostly)
        }
    };
    loop {
        match reader.read_event().map_err(|_| XmlError::Malformed)? {
            // Deeper documents are refused: the JSON would be written and
            // dropped by recursion.
            Event::Start(_) if stack.len() >= MAX_XML_DEPTH => return Err(XmlError::Malformed),
            Event::Start(e) => {
                let name = element_name(&e)?;
                let attrs = attributes(&e, &mut charge)?;
                charge(XML_NODE_COST + name.len())?;
                stack.push((name, attrs, String::new()));
            }
            Event::Empty(e) => {
                let name = element_name(&e)?;
                let attrs = attributes(&e, &mut charge)?;
                charge(XML_NODE_COST + name.len())?;
                let value = element_value(attrs, String::new());
                if !place(&mut stack, &mut root, name, value) {
                    return Err(XmlError::Malformed);
                }
            }
            Event::Text(t) => {
                let s = t.unescape().map_err(|_| XmlError::Malformed)?;
                charge(s.len())?;
                stack.last_mut().ok_or(XmlError::Malformed)?.2.push_str(&s);
            }
            Event::CData(c) => {
                let s = std::str::from_utf8(&c).map_err(|_| XmlError::Malformed)?;
                charge(s.len())?;
                stack.last_mut().ok_or(XmlError::Malformed)?.2.push_str(s);
            }
            Event::End(_) => {
                let (name, map, text) = stack.pop().ok_or(XmlError::Malformed)?;
                let value = element_value(map, text);
                if !place(&mut stack, &mut root, name, value) {
                    return Err(XmlError::Malformed);
                }
            }
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) | Event::DocType(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::Malformed);
    }
    let (name, value) = root.ok_or(XmlError::Malformed)?;
    let mut out = Map::new();
    out.insert(name, value);
    Ok(Value::Object(out))
}

fn element_name(e: &quick_xml::events::BytesStart<'_>) -> Result<String, XmlError> {
    String::from_utf8(e.name().as_ref().to_vec()).map_err(|_| XmlError::Malformed)
}

fn attributes(
    e: &quick_xml::events::BytesStart<'_>,
    charge: &mut dyn FnMut(usize) -> Result<(), XmlError>,
) -> Result<Map<String, Value>, XmlError> {
    let mut map = Map::new();
    for attr in e.attributes() {
        let attr = attr.map_err(|_| XmlError::Malformed)?;
        let key = std::str::from_utf8(attr.key.as_ref()).map_err(|_| XmlError::Malformed)?;
        let value = attr.unescape_value().map_err(|_| XmlError::Malformed)?;
        charge(XML_NODE_COST + key.len() + value.len())?;
        map.insert(format!("@{key}"), Value::String(value.into_owned()));
    }
    Ok(map)
}

fn element_value(mut map: Map<String, Value>, text: String) -> Value {
    if map.is_empty() {
        return if text.is_empty() {
            Value::Null
        } else {
            Value::String(text)
        };
    }
    if !text.is_empty() {
        map.insert("#text".into(), Value::String(text));
    }
    Value::Object(map)
}

/// Puts a finished element into its parent (repeated names become an
/// array), or makes it the root. False for a second root.
fn place(
    stack: &mut [(String, Map<String, Value>, String)],
    root: &mut Option<(String, Value)>,
    name: String,
    value: Value,
) -> bool {
    match stack.last_mut() {
        Some((_, parent, _)) => {
            match parent.get_mut(&name) {
                Some(Value::Array(items)) => items.push(value),
                Some(existing) => {
                    let first = existing.take();
                    *existing = Value::Array(vec![first, value]);
                }
                None => {
                    parent.insert(name, value);
                }
            }
            true
        }
        None if root.is_none() => {
            *root = Some((name, value));
            true
        }
        None => false,
    }
}

/// Which way a body travels: what a refusal answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

/// A body rule's refusal of a body: the status the client gets, and what
/// it is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub detail: &'static str,
}

impl Direction {
    fn unreadable(self) -> Refusal {
        match self {
            Direction::Request => Refusal {
                status: StatusCode::BAD_REQUEST,
                detail: "the request body cannot be read for this route's body rules",
            },
            Direction::Response => Refusal {
                status: StatusCode::BAD_GATEWAY,
                detail: "the upstream's answer cannot be read for this route's body rules",
            },
        }
    }

    fn too_large(self) -> Refusal {
        match self {
            Direction::Request => Refusal {
                status: StatusCode::BAD_REQUEST,
                detail: "the request body is too large for this route's body rules",
            },
            Direction::Response => Refusal {
                status: StatusCode::BAD_GATEWAY,
                detail: "the upstream's answer is too large for this route's body rules",
            },
        }
    }
}

/// Past `server.max_buffered`.
const BUSY: Refusal = Refusal {
    status: StatusCode::SERVICE_UNAVAILABLE,
    detail: "too many bodies are held in memory right now; retry later",
};

/// An upstream `206` on a route whose rules remove fields.
pub const PARTIAL_REFUSED: Refusal = Refusal {
    status: StatusCode::BAD_GATEWAY,
    detail: "the upstream answered with part of a body this route filters",
};

/// A body being rewritten in flight: what it is and what has arrived.
#[derive(Debug)]
pub struct Rewrite {
    kind: BodyKind,
    direction: Direction,
    /// The rules remove fields: never pass the body unread.
    strict: bool,
    codings: Vec<Coding>,
    /// How "nothing yet" is said: Pingora reads `None` on the request side
    /// as the end of the body, so requests hold with an empty chunk, which
    /// it does not write. On the response side `None` is nothing.
    hold: Option<Bytes>,
    buf: BytesMut,
    cap: usize,
    /// What this body holds of `max_buffered`: twice what arrived (the
    /// body and what it becomes), and its decoded and converted forms;
    /// given back once the body is passed on.
    held: Held,
    /// Over the cap on a route that only renames: streaming untouched.
    passing: bool,
    /// Why the body passed untouched, if it did (for the access log).
    pub untouched: Option<&'static str>,
}

/// No `Content-Type`, or `text/plain` (with any parameters).
fn is_untyped_or_plain(content_type: Option<&[u8]>) -> bool {
    match content_type {
        None => true,
        Some(ct) => std::str::from_utf8(ct).is_ok_and(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("text/plain")
        }),
    }
}

fn header(headers: &http::HeaderMap, name: http::HeaderName) -> Option<&[u8]> {
    headers.get(name).map(|v| v.as_bytes())
}

/// The `Content-Length` a message declares, if it is a number.
pub fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A request body held to its route's `max_body`: a declared length is
/// judged at once, a body without one is counted as it arrives.
#[derive(Debug, Default, Clone, Copy)]
pub struct BodyCount {
    /// Set when no length was declared.
    limit: Option<u64>,
    seen: u64,
}

impl BodyCount {
    /// `None` when the declared length is over `max_body` (a `413`).
    pub fn admit(headers: &http::HeaderMap, max_body: u64) -> Option<Self> {
        match declared_length(headers) {
            Some(len) if len > max_body => None,
            Some(_) => Some(BodyCount::default()),
            None => Some(BodyCount {
                limit: Some(max_body),
                seen: 0,
            }),
        }
    }

    /// Counts a chunk; false once the body is over the limit.
    pub fn on_chunk(&mut self, len: usize) -> bool {
        let Some(limit) = self.limit else {
            return true;
        };
        self.seen += len as u64;
        self.seen <= limit
    }

    /// Each attempt upstream replays the body from its start.
    pub fn restart(&mut self) {
        self.seen = 0;
    }
}

impl Rewrite {
    /// Decides whether a body is read, from its message's header; `None`
    /// when it passes as it is.
    #[allow(clippy::too_many_arguments)]
    fn plan(
        direction: Direction,
        kind: BodyKind,
        strict: bool,
        headers: &http::HeaderMap,
        has_body: bool,
        cap: usize,
        budget: &Arc<Budget>,
        reserve_declared: bool,
    ) -> Result<Option<Self>, Refusal> {
        if !has_body || kind == BodyKind::Other {
            return Ok(None);
        }
        let codings = match header(headers, http::header::CONTENT_ENCODING).map(decode::parse) {
            None => Vec::new(),
            Some(Ok(c)) => c,
            Some(Err(_)) if strict => return Err(direction.unreadable()),
            Some(Err(_)) => return Ok(None),
        };
        let declared = declared_length(headers);
        if declared.is_some_and(|n| n > cap as u64) {
            return if strict {
                Err(direction.too_large())
            } else {
                Ok(None)
            };
        }
        let upfront = if reserve_declared {
            declared.unwrap_or(0).saturating_mul(2)
        } else {
            0
        };
        let held = budget.reserve(upfront).ok_or(BUSY)?;
        Ok(Some(Rewrite {
            kind,
            direction,
            strict,
            codings,
            hold: match direction {
                Direction::Request => Some(Bytes::new()),
                Direction::Response => None,
            },
            buf: BytesMut::with_capacity(declared.unwrap_or(0) as usize),
            cap,
            held,
            passing: false,
            untouched: None,
        }))
    }

    /// For a request body (`has_body`: Pingora expects one; an HTTP/2
    /// request need not declare its length): `Some` when it is JSON, or, on
    /// a route whose rules remove fields, may be. Decided before the
    /// upstream is chosen, so a body that cannot be read is refused before
    /// anything is sent. Its budget is reserved as it arrives: a slow
    /// client declaring a large length holds nothing.
    pub fn for_request(
        rules: &JsonRules,
        client: &RequestHeader,
        has_body: bool,
        cap: usize,
        budget: &Arc<Budget>,
    ) -> Result<Option<Self>, Refusal> {
        let strict = rules.removes();
        let mut types = client.headers.get_all(http::header::CONTENT_TYPE).iter();
        let content_type = types.next().map(|v| v.as_bytes());
        if strict && types.next().is_some() {
            // Which one would the upstream read? Refuse to guess.
            return Err(Direction::Request.unreadable());
        }
        let kind = match body_kind(content_type) {
            BodyKind::Other if strict && is_untyped_or_plain(content_type) => BodyKind::MaybeJson,
            BodyKind::Json => BodyKind::Json,
            _ => BodyKind::Other,
        };
        Self::plan(
            Direction::Request,
            kind,
            strict,
            &client.headers,
            has_body,
            cap,
            budget,
            false,
        )
    }

    /// The upstream request carries the rewritten body: sent chunked, and
    /// decoded when it was encoded.
    pub fn prepare_request(&self, upstream: &mut impl EditHeaders) {
        upstream.remove(&http::header::CONTENT_LENGTH);
        if !self.codings.is_empty() {
            upstream.remove(&http::header::CONTENT_ENCODING);
        }
    }

    /// For a response: `Some` when a rule applies to its type and it has a
    /// body. Its framing becomes chunked, a coding is undone, and XML to be
    /// converted is labelled JSON now, since the header leaves before the
    /// body arrives.
    pub fn for_response(
        rules: &ResponseBodyRules,
        head_request: bool,
        resp: &mut ResponseHeader,
        cap: usize,
        budget: &Arc<Budget>,
    ) -> Result<Option<Self>, Refusal> {
        let status = resp.status.as_u16();
        if rules.removes() && status == 206 {
            return Err(PARTIAL_REFUSED);
        }
        let has_body = !(head_request || status < 200 || status == 204 || status == 304)
            && declared_length(&resp.headers) != Some(0);
        let kind = match body_kind(header(&resp.headers, http::header::CONTENT_TYPE)) {
            BodyKind::Json if !rules.json.is_empty() => BodyKind::Json,
            BodyKind::Xml if rules.xml_to_json => BodyKind::Xml,
            _ => BodyKind::Other,
        };
        // Reserved at once from a declared length: a 503 then comes while
        // the head is still held.
        let Some(rewrite) = Self::plan(
            Direction::Response,
            kind,
            rules.removes(),
            &resp.headers,
            has_body,
            cap,
            budget,
            true,
        )?
        else {
            return Ok(None);
        };
        resp.remove_header(&http::header::CONTENT_LENGTH);
        let _ = resp.insert_header(http::header::TRANSFER_ENCODING, "chunked");
        if !rewrite.codings.is_empty() {
            resp.remove_header(&http::header::CONTENT_ENCODING);
        }
        super::headers::weaken_etag(resp);
        if kind == BodyKind::Xml {
            let _ = resp.insert_header(http::header::CONTENT_TYPE, "application/json");
        }
        Ok(Some(rewrite))
    }

    /// Feeds one chunk; `body` becomes what to send on now.
    pub fn on_chunk(
        &mut self,
        rules: &JsonRules,
        body: &mut Option<Bytes>,
        end: bool,
    ) -> Result<(), Refusal> {
        if self.passing {
            return Ok(());
        }
        if let Some(chunk) = body.take() {
            if self.buf.len() + chunk.len() > self.cap {
                if self.strict || !self.codings.is_empty() {
                    return Err(self.direction.too_large());
                }
                // Only renames: the body streams on as it is.
                self.passing = true;
                self.untouched = Some("over max_transform_size");
                let mut all = std::mem::take(&mut self.buf);
                all.extend_from_slice(&chunk);
                *body = Some(all.freeze());
                return Ok(());
            }
            if !self.held.grow_to(2 * (self.buf.len() + chunk.len()) as u64) {
                return Err(BUSY);
            }
            self.buf.extend_from_slice(&chunk);
        }
        if !end {
            *body = self.hold.clone();
            return Ok(());
        }
        let all = std::mem::take(&mut self.buf).freeze();
        let out = self.finish(rules, all)?;
        // Passed on: no longer held by the rule.
        self.held.release();
        *body = (!out.is_empty()).then_some(out);
        Ok(())
    }

    /// The whole body, rewritten.
    fn finish(&mut self, rules: &JsonRules, all: Bytes) -> Result<Bytes, Refusal> {
        let plain = if self.codings.is_empty() {
            all
        } else {
            let decoded = decode::decode(&self.codings, &all, self.cap).map_err(|e| match e {
                decode::DecodeError::TooLarge(_) => self.direction.too_large(),
                _ => self.direction.unreadable(),
            })?;
            if !self.held.grow_to((all.len() + 2 * decoded.len()) as u64) {
                return Err(BUSY);
            }
            Bytes::from(decoded)
        };
        if plain.is_empty() {
            return Ok(plain);
        }
        let json = match self.kind {
            BodyKind::Xml => {
                let held = &mut self.held;
                match xml_to_json(&plain, &mut |n| held.grow(n as u64)) {
                    Ok(v) => Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
                    Err(XmlError::TooCostly) => return Err(BUSY),
                    Err(XmlError::Malformed) if self.strict => {
                        return Err(self.direction.unreadable())
                    }
                    Err(XmlError::Malformed) => {
                        self.untouched = Some("malformed body");
                        return Ok(plain);
                    }
                }
            }
            _ => plain,
        };
        match rules.rewrite(&json) {
            Ok(std::borrow::Cow::Borrowed(_)) => Ok(json),
            Ok(std::borrow::Cow::Owned(out)) => Ok(Bytes::from(out)),
            // Not JSON, and not said to be: not the rules' to refuse.
            Err(_) if self.kind == BodyKind::MaybeJson => {
                self.untouched = Some("not JSON");
                Ok(json)
            }
            Err(_) if self.strict => Err(self.direction.unreadable()),
            Err(_) => {
                self.untouched = Some("malformed body");
                Ok(json)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::json::FieldPath;
    use serde_json::json;

    fn rules(remove: &[&str]) -> JsonRules {
        JsonRules::new(
            remove
                .iter()
                .map(|p| FieldPath::parse(p).unwrap())
                .collect(),
            vec![],
        )
    }

    fn no_limit(_: usize) -> bool {
        true
    }

    #[test]
    fn xml_becomes_json() {
        let xml = br#"<?xml version="1.0"?>
<order id="7" status="open">
  <item sku="a1">Pen</item>
  <item sku="b2">Ink</item>
  <note>Fragile &amp; urgent</note>
  <empty/>
  <total currency="EUR">12.50</total>
</order>"#;
        assert_eq!(
            xml_to_json(xml, &mut no_limit).unwrap(),
            json!({"order": {
                "@id": "7", "@status": "open",
                "item": [{"@sku": "a1", "#text": "Pen"}, {"@sku": "b2", "#text": "Ink"}],
                "note": "Fragile & urgent",
                "empty": null,
                "total": {"@currency": "EUR", "#text": "12.50"}
            }})
        );
        let malformed = |x: &[u8]| xml_to_json(x, &mut no_limit) == Err(XmlError::Malformed);
        assert!(malformed(b"<a><b></a>"));
        assert!(malformed(b"<a/><b/>"));
        assert!(malformed(b"not xml at all"));
        let deep = format!("{}{}", "<a>".repeat(200), "</a>".repeat(200));
        assert!(malformed(deep.as_bytes()));
        let ok = format!("{}{}", "<a>".repeat(100), "</a>".repeat(100));
        assert!(xml_to_json(ok.as_bytes(), &mut no_limit).is_ok());
    }

    #[test]
    fn xml_trees_are_held_to_their_bound() {
        let doc = format!("<r>{}</r>", "<b/>".repeat(10_000));
        let mut spent = 0;
        assert!(xml_to_json(doc.as_bytes(), &mut |n| {
            spent += n;
            true
        })
        .is_ok());
        assert!(spent > 10_000 * XML_NODE_COST);
        let mut left = 100_000usize;
        assert_eq!(
            xml_to_json(doc.as_bytes(), &mut |n| match left.checked_sub(n) {
                Some(l) => {
                    left = l;
                    true
                }
                None => false,
            }),
            Err(XmlError::TooCostly)
        );
    }

    fn response(fields: &[(&str, &str)]) -> ResponseHeader {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for (n, v) in fields {
            resp.insert_header(n.to_string(), *v).unwrap();
        }
        resp
    }

    #[test]
    fn strict_rules_refuse_what_they_cannot_read() {
        let budget = Budget::new(1 << 20);
        let strict = ResponseBodyRules {
            json: rules(&["password"]),
            xml_to_json: false,
        };
        let mut big = response(&[
            ("content-type", "application/json"),
            ("content-length", "5000"),
        ]);
        assert_eq!(
            Rewrite::for_response(&strict, false, &mut big, 1000, &budget)
                .unwrap_err()
                .status,
            502
        );
        let mut odd = response(&[
            ("content-type", "application/json"),
            ("content-encoding", "compress"),
        ]);
        assert!(Rewrite::for_response(&strict, false, &mut odd, 1000, &budget).is_err());
        let mut partial = response(&[("content-type", "text/plain")]);
        partial.set_status(206).unwrap();
        assert_eq!(
            Rewrite::for_response(&strict, false, &mut partial, 1000, &budget).unwrap_err(),
            PARTIAL_REFUSED
        );
        // Malformed at the end.
        let mut ok = response(&[("content-type", "application/json")]);
        let mut rw = Rewrite::for_response(&strict, false, &mut ok, 1000, &budget)
            .unwrap()
            .unwrap();
        let mut chunk = Some(Bytes::from_static(b"{\"password\":"));
        rw.on_chunk(&strict.json, &mut chunk, false).unwrap();
        assert_eq!(chunk, None);
        let mut end = None;
        assert_eq!(
            rw.on_chunk(&strict.json, &mut end, true)
                .unwrap_err()
                .status,
            502
        );
    }

    #[test]
    fn renaming_rules_let_what_they_cannot_read_pass() {
        let budget = Budget::new(1 << 20);
        let lenient = ResponseBodyRules {
            json: JsonRules::new(vec![], vec![(FieldPath::parse("a").unwrap(), "b".into())]),
            xml_to_json: false,
        };
        let mut resp = response(&[("content-type", "application/json")]);
        let mut rw = Rewrite::for_response(&lenient, false, &mut resp, 4, &budget)
            .unwrap()
            .unwrap();
        let mut chunk = Some(Bytes::from_static(b"{\"a\":"));
        rw.on_chunk(&lenient.json, &mut chunk, false).unwrap();
        assert_eq!(chunk, Some(Bytes::from_static(b"{\"a\":")));
        assert_eq!(rw.untouched, Some("over max_transform_size"));
        let mut rest = Some(Bytes::from_static(b"1}"));
        rw.on_chunk(&lenient.json, &mut rest, true).unwrap();
        assert_eq!(rest, Some(Bytes::from_static(b"1}")));
    }

    #[test]
    fn bodies_hold_their_share_of_the_budget() {
        let budget = Budget::new(100);
        let strict = rules(&["x"]);
        let mut req = RequestHeader::build("POST", b"/", None).unwrap();
        req.insert_header("content-type", "application/json")
            .unwrap();
        req.insert_header("content-length", "40").unwrap();
        // A request reserves as its body arrives, not for its declared length.
        let mut rw = Rewrite::for_request(&strict, &req, true, 1000, &budget)
            .unwrap()
            .unwrap();
        assert_eq!(budget.used(), 0);
        let mut chunk = Some(Bytes::from(vec![b' '; 40]));
        rw.on_chunk(&strict, &mut chunk, false).unwrap();
        assert_eq!(
            chunk,
            Some(Bytes::new()),
            "requests hold with an empty chunk"
        );
        assert_eq!(budget.used(), 80);
        let mut more = Some(Bytes::from(vec![b' '; 20]));
        assert_eq!(rw.on_chunk(&strict, &mut more, false).unwrap_err(), BUSY);
        drop(rw);
        assert_eq!(budget.used(), 0);
        // Passed on, a body holds nothing.
        let mut rw = Rewrite::for_request(&strict, &req, true, 1000, &budget)
            .unwrap()
            .unwrap();
        let mut all = Some(Bytes::from_static(b"{\"x\":1,\"y\":2}"));
        rw.on_chunk(&strict, &mut all, true).unwrap();
        assert_eq!(all, Some(Bytes::from_static(b"{\"y\":2}")));
        assert_eq!(budget.used(), 0);
        // A response reserves its declared length at once.
        let response_rules = ResponseBodyRules {
            json: rules(&["x"]),
            xml_to_json: false,
        };
        let mut resp = response(&[
            ("content-type", "application/json"),
            ("content-length", "40"),
        ]);
        let rw = Rewrite::for_response(&response_rules, false, &mut resp, 1000, &budget)
            .unwrap()
            .unwrap();
        assert_eq!(budget.used(), 80);
        drop(rw);
    }

    #[test]
    fn requests_without_a_json_type_are_read_where_fields_are_removed() {
        let budget = Budget::new(1 << 20);
        let strict = rules(&["role"]);
        let lenient = JsonRules::new(vec![], vec![(FieldPath::parse("a").unwrap(), "b".into())]);
        let request = |ct: &[&str]| {
            let mut req = RequestHeader::build("POST", b"/", None).unwrap();
            for c in ct {
                req.append_header("content-type", *c).unwrap();
            }
            req
        };
        let run = |rules: &JsonRules, req: &RequestHeader, body: &'static [u8]| {
            let mut rw = Rewrite::for_request(rules, req, true, 1000, &budget)
                .unwrap()
                .expect("read");
            let mut b = Some(Bytes::from_static(body));
            rw.on_chunk(rules, &mut b, true).unwrap();
            b
        };
        for ct in [&[][..], &["text/plain"], &["Text/Plain; charset=utf-8"]] {
            let req = request(ct);
            assert_eq!(
                run(&strict, &req, br#"{"role":"admin","ok":1}"#),
                Some(Bytes::from_static(br#"{"ok":1}"#))
            );
            // Not JSON: not the rules' business.
            assert_eq!(
                run(&strict, &req, b"role=admin"),
                Some(Bytes::from_static(b"role=admin"))
            );
            assert!(Rewrite::for_request(&lenient, &req, true, 1000, &budget)
                .unwrap()
                .is_none());
        }
        assert!(
            Rewrite::for_request(&strict, &request(&["text/csv"]), true, 1000, &budget)
                .unwrap()
                .is_none()
        );
        // Two types: which would the upstream read?
        let two = request(&["text/plain", "application/json"]);
        assert_eq!(
            Rewrite::for_request(&strict, &two, true, 1000, &budget)
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn kinds() {
        assert_eq!(
            body_kind(Some(b"application/json; charset=utf-8")),
            BodyKind::Json
        );
        assert_eq!(body_kind(Some(b"application/problem+json")), BodyKind::Json);
        assert_eq!(body_kind(Some(b"text/xml")), BodyKind::Xml);
        assert_eq!(body_kind(Some(b"text/plain")), BodyKind::Other);
        assert_eq!(body_kind(None), BodyKind::Other);
    }
}
