//! Body rules: `remove_fields` and `rename_fields` on JSON bodies (dotted
//! paths, `items[]` walking arrays), and `xml_to_json` for XML responses.
//! Bodies are buffered only when a rule applies, up to a size cap; a body
//! over the cap, of another type, or malformed passes untouched.

use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value};

/// One step of a field path: `name`, or `name[]` for every element of the
/// array under `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Each(String),
}

/// `a.b.c` or `items[].ssn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(Vec<Step>);

impl FieldPath {
    pub fn parse(path: &str) -> Result<Self, String> {
        let mut steps = Vec::new();
        for part in path.split('.') {
            let step = match part.strip_suffix("[]") {
                Some(name) => Step::Each(name.to_string()),
                None => Step::Key(part.to_string()),
            };
            let name = match &step {
                Step::Key(n) | Step::Each(n) => n,
            };
            if name.is_empty() || name.contains(['[', ']']) {
                return Err(format!(
                    "field path \"{path}\": write it like a.b.c or items[].field"
                ));
            }
            steps.push(step);
        }
        Ok(FieldPath(steps))
    }

    /// Calls `f` on every object that holds the path's last field, with the
    /// field's name.
    fn visit<'v>(&self, value: &'v mut Value, f: &mut dyn FnMut(&mut Map<String, Value>, &str)) {
        visit(&self.0, value, f);
    }
}

fn visit(steps: &[Step], value: &mut Value, f: &mut dyn FnMut(&mut Map<String, Value>, &str)) {
    let Some((first, rest)) = steps.split_first() else {
        return;
    };
    let Value::Object(map) = value else {
        return;
    };
    match first {
        Step::Key(name) if rest.is_empty() => f(map, name),
        Step::Key(name) => {
            if let Some(child) = map.get_mut(name) {
                visit(rest, child, f);
            }
        }
        Step::Each(name) => {
            if let Some(Value::Array(items)) = map.get_mut(name) {
                for item in items {
                    if rest.is_empty() {
                        // `items[]` alone names the array's elements: nothing
                        // to remove by name there.
                        continue;
                    }
                    visit(rest, item, f);
                }
            }
        }
    }
}

/// `remove_fields` and `rename_fields` of one direction.
#[derive(Debug, Default)]
pub struct JsonRules {
    pub remove: Vec<FieldPath>,
    /// Field path -> new name of its last field.
    pub rename: Vec<(FieldPath, String)>,
}

impl JsonRules {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.rename.is_empty()
    }

    pub fn apply(&self, value: &mut Value) {
        // Fields keep their order: a client or upstream may care.
        for path in &self.remove {
            path.visit(value, &mut |map, field| {
                map.shift_remove(field);
            });
        }
        for (path, to) in &self.rename {
            path.visit(value, &mut |map, field| {
                let Some(at) = map.keys().position(|k| k == field) else {
                    return;
                };
                if let Some(v) = map.shift_remove(field) {
                    map.shift_remove(to.as_str());
                    let at = at.min(map.len());
                    map.shift_insert(at, to.clone(), v);
                }
            });
        }
    }
}

/// What a body is, by its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Xml,
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

/// Applies `rules` to a JSON body; `None` when it is not valid JSON.
pub fn rewrite_json(body: &[u8], rules: &JsonRules) -> Option<Bytes> {
    // A UTF-8 byte order mark is allowed before JSON text (RFC 8259 8.1 says
    // a parser may ignore it); serde does not take one.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let mut value: Value = serde_json::from_slice(body).ok()?;
    rules.apply(&mut value);
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

/// Converts an XML document to JSON: `{"root": ...}`, attributes as
/// `@name`, text beside attributes or children as `#text`, repeated
/// elements as arrays, an element with only text as that string, an empty
/// one as null. `None` when it is not well-formed UTF-8 XML.
pub fn xml_to_json(body: &[u8]) -> Option<Value> {
    use quick_xml::events::Event;
    let text = std::str::from_utf8(body).ok()?;
    let mut reader = quick_xml::Reader::from_str(text);
    reader.config_mut().trim_text(true);
    // Open elements: name and what they hold so far.
    let mut stack: Vec<(String, Map<String, Value>, String)> = Vec::new();
    let mut root: Option<(String, Value)> = None;
    loop {
        match reader.read_event().ok()? {
            // Deeper documents are refused: the JSON would be written and
            // dropped by recursion.
            Event::Start(_) if stack.len() >= MAX_XML_DEPTH => return None,
            Event::Start(e) => {
                let name = String::from_utf8(e.name().as_ref().to_vec()).ok()?;
                stack.push((name, attributes(&e)?, String::new()));
            }
            Event::Empty(e) => {
                let name = String::from_utf8(e.name().as_ref().to_vec()).ok()?;
                let value = element_value(attributes(&e)?, String::new());
                if !place(&mut stack, &mut root, name, value) {
                    return None;
                }
            }
            Event::Text(t) => {
                let s = t.unescape().ok()?;
                stack.last_mut()?.2.push_str(&s);
            }
            Event::CData(c) => {
                let s = std::str::from_utf8(&c).ok()?;
                stack.last_mut()?.2.push_str(s);
            }
            Event::End(_) => {
                let (name, map, text) = stack.pop()?;
                let value = element_value(map, text);
                if !place(&mut stack, &mut root, name, value) {
                    return None;
                }
            }
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) | Event::DocType(_) => {}
        }
    }
    if !stack.is_empty() {
        return None;
    }
    let (name, value) = root?;
    let mut out = Map::new();
    out.insert(name, value);
    Some(Value::Object(out))
}

fn attributes(e: &quick_xml::events::BytesStart<'_>) -> Option<Map<String, Value>> {
    let mut map = Map::new();
    for attr in e.attributes() {
        let attr = attr.ok()?;
        let key = std::str::from_utf8(attr.key.as_ref()).ok()?;
        let value = attr.unescape_value().ok()?;
        map.insert(format!("@{key}"), Value::String(value.into_owned()));
    }
    Some(map)
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

const MAX_XML_DEPTH: usize = 128;

/// A body being held back for a rule, up to `cap` bytes.
#[derive(Debug)]
pub struct BodyBuffer {
    buf: BytesMut,
    cap: usize,
    overflowed: bool,
}

/// What to do with a chunk fed to a [`BodyBuffer`].
#[derive(Debug, PartialEq, Eq)]
pub enum Feed {
    /// Hold it: send nothing yet.
    Hold,
    /// Send this on unchanged (the cap was passed: the body streams as is).
    Pass(Option<Bytes>),
    /// The whole body: rewrite it and send the result.
    Complete(Bytes),
}

impl BodyBuffer {
    pub fn new(cap: usize) -> Self {
        BodyBuffer {
            buf: BytesMut::new(),
            cap,
            overflowed: false,
        }
    }

    /// Whether the body went past the cap and passed untouched.
    #[cfg(test)]
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    pub fn feed(&mut self, chunk: Option<Bytes>, end: bool) -> Feed {
        if self.overflowed {
            return Feed::Pass(chunk);
        }
        if let Some(c) = chunk {
            if self.buf.len() + c.len() > self.cap {
                self.overflowed = true;
                let mut all = std::mem::take(&mut self.buf);
                all.extend_from_slice(&c);
                return Feed::Pass(Some(all.freeze()));
            }
            self.buf.extend_from_slice(&c);
        }
        if end {
            Feed::Complete(std::mem::take(&mut self.buf).freeze())
        } else {
            Feed::Hold
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(remove: &[&str], rename: &[(&str, &str)]) -> JsonRules {
        JsonRules {
            remove: remove
                .iter()
                .map(|p| FieldPath::parse(p).unwrap())
                .collect(),
            rename: rename
                .iter()
                .map(|(p, n)| (FieldPath::parse(p).unwrap(), n.to_string()))
                .collect(),
        }
    }

    #[test]
    fn nested_and_array_fields() {
        let mut v = json!({
            "password": "x",
            "user": {"password": "y", "userName": "ann"},
            "items": [{"ssn": 1, "id": 1}, {"ssn": 2, "id": 2}, "scalar"],
            "keep": true
        });
        rules(
            &["password", "user.password", "items[].ssn"],
            &[("user.userName", "user_name"), ("items[].id", "item_id")],
        )
        .apply(&mut v);
        assert_eq!(
            v,
            json!({
                "user": {"user_name": "ann"},
                "items": [{"item_id": 1}, {"item_id": 2}, "scalar"],
                "keep": true
            })
        );
        assert!(FieldPath::parse("a..b").is_err());
        assert!(FieldPath::parse("a[0]").is_err());
    }

    #[test]
    fn order_is_kept_and_a_bom_is_read() {
        let out = rewrite_json(
            b"\xEF\xBB\xBF{\"a\":1,\"drop\":2,\"b\":3,\"old\":4,\"c\":5}",
            &rules(&["drop"], &[("old", "new")]),
        )
        .unwrap();
        assert_eq!(out, Bytes::from_static(br#"{"a":1,"b":3,"new":4,"c":5}"#));
    }

    #[test]
    fn malformed_json_is_left_alone() {
        assert_eq!(rewrite_json(b"{not json", &rules(&["a"], &[])), None);
        assert_eq!(
            rewrite_json(br#"{"a":1,"b":2}"#, &rules(&["a"], &[])).unwrap(),
            Bytes::from_static(br#"{"b":2}"#)
        );
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
            xml_to_json(xml).unwrap(),
            json!({"order": {
                "@id": "7", "@status": "open",
                "item": [{"@sku": "a1", "#text": "Pen"}, {"@sku": "b2", "#text": "Ink"}],
                "note": "Fragile & urgent",
                "empty": null,
                "total": {"@currency": "EUR", "#text": "12.50"}
            }})
        );
        assert_eq!(xml_to_json(b"<a><b></a>"), None);
        assert_eq!(xml_to_json(b"<a/><b/>"), None);
        assert_eq!(xml_to_json(b"not xml at all"), None);
        let deep = format!("{}{}", "<a>".repeat(200), "</a>".repeat(200));
        assert_eq!(xml_to_json(deep.as_bytes()), None);
        let ok = format!("{}{}", "<a>".repeat(100), "</a>".repeat(100));
        assert!(xml_to_json(ok.as_bytes()).is_some());
    }

    #[test]
    fn buffers_up_to_the_cap_then_passes_through() {
        let mut b = BodyBuffer::new(10);
        assert_eq!(
            b.feed(Some(Bytes::from_static(b"12345")), false),
            Feed::Hold
        );
        assert_eq!(
            b.feed(Some(Bytes::from_static(b"678")), true),
            Feed::Complete(Bytes::from_static(b"12345678"))
        );
        let mut b = BodyBuffer::new(4);
        assert_eq!(b.feed(Some(Bytes::from_static(b"123")), false), Feed::Hold);
        assert_eq!(
            b.feed(Some(Bytes::from_static(b"456")), false),
            Feed::Pass(Some(Bytes::from_static(b"123456")))
        );
        assert!(b.overflowed());
        assert_eq!(
            b.feed(Some(Bytes::from_static(b"7")), true),
            Feed::Pass(Some(Bytes::from_static(b"7")))
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

/// A body being rewritten in flight: what it is and what has arrived.
#[derive(Debug)]
pub struct Rewrite {
    kind: BodyKind,
    /// How "nothing yet" is said: Pingora reads `None` on the request side
    /// as the end of the body, so requests hold with an empty chunk, which
    /// it does not write. On the response side `None` is nothing.
    hold: Option<Bytes>,
    buffer: BodyBuffer,
    /// Why the body passed untouched, if it did (for the access log).
    pub untouched: Option<&'static str>,
}

impl Rewrite {
    /// For a request body: `Some` when it is JSON, has a body, and is not
    /// declared larger than `cap`. The upstream request then loses its
    /// `Content-Length` (the rewritten body is sent chunked).
    pub fn for_request(
        rules: Option<&JsonRules>,
        client: &pingora_http::RequestHeader,
        upstream: &mut pingora_http::RequestHeader,
        cap: usize,
    ) -> Option<Self> {
        rules?;
        if body_kind(header(&client.headers, http::header::CONTENT_TYPE)) != BodyKind::Json {
            return None;
        }
        let declared = declared_length(&client.headers);
        let chunked = client.headers.contains_key(http::header::TRANSFER_ENCODING);
        match declared {
            Some(0) => return None,
            Some(n) if n > cap as u64 => return None,
            None if !chunked => return None,
            _ => {}
        }
        upstream.remove_header(&http::header::CONTENT_LENGTH);
        Some(Rewrite {
            kind: BodyKind::Json,
            hold: Some(Bytes::new()),
            buffer: BodyBuffer::new(cap),
            untouched: None,
        })
    }

    /// For a response: `Some` when a rule applies to its type, it has a
    /// body, it is not compressed, and it is not declared larger than
    /// `cap`. Its framing becomes chunked; XML to be converted is labelled
    /// JSON now, since the header leaves before the body arrives.
    pub fn for_response(
        rules: Option<&crate::routing::ResponseBodyRules>,
        head_request: bool,
        resp: &mut pingora_http::ResponseHeader,
        cap: usize,
    ) -> Option<Self> {
        let rules = rules?;
        let status = resp.status.as_u16();
        if head_request || status < 200 || status == 204 || status == 304 {
            return None;
        }
        if header(&resp.headers, http::header::CONTENT_ENCODING)
            .is_some_and(|e| !e.eq_ignore_ascii_case(b"identity"))
        {
            return None;
        }
        let kind = body_kind(header(&resp.headers, http::header::CONTENT_TYPE));
        let applies = match kind {
            BodyKind::Json => !rules.json.is_empty(),
            BodyKind::Xml => rules.xml_to_json,
            BodyKind::Other => false,
        };
        if !applies || declared_length(&resp.headers).is_some_and(|n| n > cap as u64) {
            return None;
        }
        resp.remove_header(&http::header::CONTENT_LENGTH);
        let _ = resp.insert_header(http::header::TRANSFER_ENCODING, "chunked");
        // The bytes change: a strong validator would claim otherwise.
        if let Some(etag) = resp.headers.get(http::header::ETAG).cloned() {
            if !etag.as_bytes().starts_with(b"W/") {
                let mut weak = b"W/".to_vec();
                weak.extend_from_slice(etag.as_bytes());
                if let Ok(v) = http::HeaderValue::from_bytes(&weak) {
                    let _ = resp.insert_header(http::header::ETAG, v);
                }
            }
        }
        if kind == BodyKind::Xml {
            let _ = resp.insert_header(http::header::CONTENT_TYPE, "application/json");
        }
        Some(Rewrite {
            kind,
            hold: None,
            buffer: BodyBuffer::new(cap),
            untouched: None,
        })
    }

    /// Feeds one chunk; `body` becomes what to send on now.
    pub fn on_chunk(&mut self, json: &JsonRules, body: &mut Option<Bytes>, end: bool) {
        match self.buffer.feed(body.take(), end) {
            Feed::Hold => *body = self.hold.clone(),
            Feed::Pass(chunk) => {
                self.untouched = Some("over max_transform_size");
                *body = chunk;
            }
            Feed::Complete(all) => {
                let rewritten = match self.kind {
                    BodyKind::Json => rewrite_json(&all, json),
                    BodyKind::Xml => xml_to_json(&all).and_then(|mut v| {
                        json.apply(&mut v);
                        serde_json::to_vec(&v).ok().map(Bytes::from)
                    }),
                    BodyKind::Other => None,
                };
                if rewritten.is_none() && !all.is_empty() {
                    self.untouched = Some("malformed body");
                }
                let out = rewritten.unwrap_or(all);
                *body = (!out.is_empty()).then_some(out);
            }
        }
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
