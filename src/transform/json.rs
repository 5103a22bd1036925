//! JSON field rules applied to a document as written: `remove_fields` and
//! `rename_fields`, with dotted paths (`a.b.c`) and `items[]` for every
//! element of an array.
//!
//! The document is validated whole (RFC 8259, UTF-8) but never built into
//! a tree. Only the objects along a rule's path are walked; every other
//! value is copied byte for byte. So numbers of any size, lone surrogate
//! escapes and nesting of any depth come out as they went in, and
//! rewriting a body costs about its own size again. serde_json does the
//! reading: its raw values skip a value without recursing, and its byte
//! keys accept lone surrogates.
//!
//! Field names match without case (Unicode case folding): Go's
//! `encoding/json`, ASP.NET Core and Jackson's case-insensitive mode bind
//! `{"ROLE": ...}` or `{"ſecret": ...}` to a field named `role` or `secret`,
//! so a rule removing `role` removes those too.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

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
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, step) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match step {
                Step::Key(n) => f.write_str(n)?,
                Step::Each(n) => write!(f, "{n}[]")?,
            }
        }
        Ok(())
    }
}

/// What the rules do to the fields of one object.
#[derive(Debug, Default)]
struct Node {
    fields: Vec<(String, Field)>,
}

#[derive(Debug, Default)]
struct Field {
    remove: bool,
    rename: Option<String>,
    /// Rules for the fields of this field's value, when it is an object.
    object: Option<Box<Node>>,
    /// Rules for each element of this field's value, when it is an array.
    each: Option<Box<Node>>,
}

impl Node {
    fn field_mut(&mut self, name: &str) -> &mut Field {
        let at = match self.fields.iter().position(|(n, _)| n == name) {
            Some(at) => at,
            None => {
                self.fields.push((name.to_string(), Field::default()));
                self.fields.len() - 1
            }
        };
        &mut self.fields[at].1
    }

    fn field(&self, name: &[u8]) -> Option<&Field> {
        self.fields
            .iter()
            .find(|(n, _)| same_name(n, name))
            .map(|(_, f)| f)
    }

    /// Adds a path whose last field gets `last`.
    fn add(&mut self, steps: &[Step], last: &dyn Fn(&mut Field)) {
        let Some((first, rest)) = steps.split_first() else {
            return;
        };
        match first {
            Step::Key(name) if rest.is_empty() => last(self.field_mut(name)),
            Step::Key(name) => self
                .field_mut(name)
                .object
                .get_or_insert_with(Box::default)
                .add(rest, last),
            // `items[]` alone names the array's elements: nothing to do by name.
            Step::Each(_) if rest.is_empty() => {}
            Step::Each(name) => self
                .field_mut(name)
                .each
                .get_or_insert_with(Box::default)
                .add(rest, last),
        }
    }

    fn renames(&self) -> bool {
        self.fields.iter().any(|(_, f)| f.rename.is_some())
    }
}

/// Whether a key (decoded, possibly WTF-8) names the rule's field: equal
/// without case, as binders compare them.
fn same_name(rule: &str, key: &[u8]) -> bool {
    if rule.as_bytes() == key {
        return true;
    }
    match std::str::from_utf8(key) {
        Ok(key) if key.is_ascii() && rule.is_ascii() => key.eq_ignore_ascii_case(rule),
        Ok(key) => unicase::eq(key, rule),
        // A lone surrogate is in no configured name.
        Err(_) => false,
    }
}

/// `remove_fields` and `rename_fields` of one direction. A field both
/// removed and renamed is removed; a renamed field replaces a field that
/// already had the new name.
#[derive(Debug, Default)]
pub struct JsonRules {
    pub remove: Vec<FieldPath>,
    /// Field path -> new name of its last field.
    pub rename: Vec<(FieldPath, String)>,
    root: Node,
}

/// Why a document could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("the body is not UTF-8")]
    NotUtf8,
    #[error("the body is not JSON: {0}")]
    Syntax(#[from] serde_json::Error),
}

impl JsonRules {
    pub fn new(remove: Vec<FieldPath>, rename: Vec<(FieldPath, String)>) -> Self {
        let mut root = Node::default();
        for path in &rename {
            let to = path.1.clone();
            root.add(&path.0 .0, &|f: &mut Field| f.rename = Some(to.clone()));
        }
        for path in &remove {
            root.add(&path.0, &|f: &mut Field| f.remove = true);
        }
        JsonRules {
            remove,
            rename,
            root,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.rename.is_empty()
    }

    /// Whether a rule removes fields: such a body must never pass unread.
    pub fn removes(&self) -> bool {
        !self.remove.is_empty()
    }

    /// The document with the rules applied, or the input itself when no
    /// rule touched it. A UTF-8 byte order mark is allowed before the text
    /// (RFC 8259 8.1 lets a parser ignore it).
    pub fn rewrite<'a>(&self, body: &'a [u8]) -> Result<Cow<'a, [u8]>, JsonError> {
        let unmarked = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
        let text = std::str::from_utf8(unmarked).map_err(|_| JsonError::NotUtf8)?;
        // One strict pass over the whole document first: below, keys are
        // read as bytes (to take lone surrogates), and serde_json does not
        // refuse raw control characters in those. (Found by fuzzing.)
        let mut de = serde_json::Deserializer::from_str(text);
        <&RawValue>::deserialize(&mut de)?;
        de.end()?;
        let mut out = Vec::with_capacity(text.len());
        let mut changed = false;
        // Only an object has fields; anything else is just checked.
        if text.trim_start().starts_with('{') {
            write_object(&mut out, text, &self.root, &mut changed)?;
        }
        Ok(if changed {
            Cow::Owned(out)
        } else {
            Cow::Borrowed(body)
        })
    }
}

use serde::Deserialize;

/// An object key, decoded; lone surrogates come as WTF-8.
struct Key<'de>(Cow<'de, [u8]>);

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key<'de>, D::Error> {
        d.deserialize_bytes(KeySeed)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Borrowed(v)))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(v.to_vec())))
    }
}

/// Writes an object with `node`'s rules applied. Renames may replace
/// fields already so named: when this object renames, a first pass finds
/// which renamed fields are present.
fn write_object(
    out: &mut Vec<u8>,
    text: &str,
    node: &Node,
    changed: &mut bool,
) -> Result<(), serde_json::Error> {
    let present = if node.renames() {
        present_renames(text, node)?
    } else {
        Vec::new()
    };
    let taken: Vec<&str> = node
        .fields
        .iter()
        .filter(|(name, f)| !f.remove && present.contains(&name.as_str()))
        .filter_map(|(_, f)| f.rename.as_deref())
        .collect();
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(ObjectWriter {
        out,
        node,
        changed,
        taken: &taken,
    })?;
    de.end()
}

/// The renamed fields present in an object.
fn present_renames<'n>(text: &str, node: &'n Node) -> Result<Vec<&'n str>, serde_json::Error> {
    struct Scan<'n>(&'n Node);
    impl<'de, 'n> Visitor<'de> for Scan<'n> {
        type Value = Vec<&'n str>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = Vec::new();
            while let Some(key) = map.next_key_seed(KeySeed)? {
                let _: de::IgnoredAny = map.next_value()?;
                if let Some((name, _)) = self
                    .0
                    .fields
                    .iter()
                    .find(|(n, f)| f.rename.is_some() && same_name(n, &key.0))
                {
                    found.push(name.as_str());
                }
            }
            Ok(found)
        }
    }
    serde_json::Deserializer::from_str(text).deserialize_map(Scan(node))
}

struct ObjectWriter<'o, 'n, 't> {
    out: &'o mut Vec<u8>,
    node: &'n Node,
    changed: &'o mut bool,
    /// Names a present renamed field takes: fields already so named go.
    taken: &'t [&'n str],
}

impl<'de> Visitor<'de> for ObjectWriter<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let ObjectWriter {
            out,
            node,
            changed,
            taken,
        } = self;
        out.push(b'{');
        let mut first = true;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value: &RawValue = map.next_value()?;
            let rule = node.field(&key.0);
            let name: Cow<'_, [u8]> = match rule {
                Some(f) if f.remove => {
                    *changed = true;
                    continue;
                }
                Some(Field {
                    rename: Some(to), ..
                }) => {
                    *changed = true;
                    Cow::Borrowed(to.as_bytes())
                }
                _ if taken.iter().any(|t| same_name(t, &key.0)) => {
                    *changed = true;
                    continue;
                }
                _ => key.0,
            };
            if !first {
                out.push(b',');
            }
            first = false;
            write_key(out, &name).map_err(de::Error::custom)?;
            out.push(b':');
            write_value(out, value, rule, changed).map_err(de::Error::custom)?;
        }
        out.push(b'}');
        Ok(())
    }
}

/// A field's value: walked when a rule reaches below it, else copied.
fn write_value(
    out: &mut Vec<u8>,
    value: &RawValue,
    rule: Option<&Field>,
    changed: &mut bool,
) -> Result<(), serde_json::Error> {
    let text = value.get();
    match (rule, text.as_bytes().first()) {
        (
            Some(Field {
                object: Some(node), ..
            }),
            Some(b'{'),
        ) => write_object(out, text, node, changed),
        (
            Some(Field {
                each: Some(node), ..
            }),
            Some(b'['),
        ) => {
            let mut de = serde_json::Deserializer::from_str(text);
            de.deserialize_seq(ElementsWriter { out, node, changed })?;
            de.end()
        }
        _ => {
            out.extend_from_slice(text.as_bytes());
            Ok(())
        }
    }
}

/// Writes an array whose object elements get `node`'s rules.
struct ElementsWriter<'o, 'n> {
    out: &'o mut Vec<u8>,
    node: &'n Node,
    changed: &'o mut bool,
}

impl<'de> Visitor<'de> for ElementsWriter<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.out.push(b'[');
        let mut first = true;
        while let Some(item) = seq.next_element::<&RawValue>()? {
            if !first {
                self.out.push(b',');
            }
            first = false;
            let text = item.get();
            if text.starts_with('{') {
                write_object(self.out, text, self.node, self.changed).map_err(de::Error::custom)?;
            } else {
                self.out.extend_from_slice(text.as_bytes());
            }
        }
        self.out.push(b']');
        Ok(())
    }
}

/// Writes a key as a JSON string. Keys come decoded as WTF-8 (UTF-8 that
/// may hold lone surrogates), which are written back as `\uXXXX`.
fn write_key(out: &mut Vec<u8>, key: &[u8]) -> Result<(), &'static str> {
    if let Ok(s) = std::str::from_utf8(key) {
        serde_json::to_writer(&mut *out, s).map_err(|_| "unwritable key")?;
        return Ok(());
    }
    out.push(b'"');
    let mut rest = key;
    while !rest.is_empty() {
        // The longest valid UTF-8 run, then one surrogate (ED A0..BF xx).
        match std::str::from_utf8(rest) {
            Ok(s) => {
                push_escaped(out, s);
                break;
            }
            Err(e) => {
                let (valid, tail) = rest.split_at(e.valid_up_to());
                push_escaped(out, std::str::from_utf8(valid).map_err(|_| "bad key")?);
                match tail {
                    [0xED, b1 @ 0xA0..=0xBF, b2 @ 0x80..=0xBF, ..] => {
                        let cp = 0xD000 | (u32::from(b1 & 0x3F) << 6) | u32::from(b2 & 0x3F);
                        out.extend_from_slice(format!("\\u{cp:04x}").as_bytes());
                        rest = &tail[3..];
                    }
                    _ => return Err("the key is not UTF-8"),
                }
            }
        }
    }
    out.push(b'"');
    Ok(())
}

/// A string's characters as they go inside JSON quotes.
fn push_escaped(out: &mut Vec<u8>, s: &str) {
    let quoted = serde_json::to_string(s).unwrap_or_default();
    if let Some(inner) = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')) {
        out.extend_from_slice(inner.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(remove: &[&str], rename: &[(&str, &str)]) -> JsonRules {
        JsonRules::new(
            remove
                .iter()
                .map(|p| FieldPath::parse(p).unwrap())
                .collect(),
            rename
                .iter()
                .map(|(p, n)| (FieldPath::parse(p).unwrap(), n.to_string()))
                .collect(),
        )
    }

    fn apply(r: &JsonRules, doc: &str) -> String {
        String::from_utf8(r.rewrite(doc.as_bytes()).unwrap().into_owned()).unwrap()
    }

    #[test]
    fn nested_and_array_fields() {
        let r = rules(
            &["password", "user.password", "items[].ssn"],
            &[("user.userName", "user_name"), ("items[].id", "item_id")],
        );
        let doc = r#"{"password":"x","user":{"password":"y","userName":"ann"},"items":[{"ssn":1,"id":1},{"ssn":2,"id":2},"scalar"],"keep":true}"#;
        assert_eq!(
            apply(&r, doc),
            r#"{"user":{"user_name":"ann"},"items":[{"item_id":1},{"item_id":2},"scalar"],"keep":true}"#
        );
        assert!(FieldPath::parse("a..b").is_err());
        assert!(FieldPath::parse("a[0]").is_err());
        assert_eq!(
            FieldPath::parse("items[].id").unwrap().to_string(),
            "items[].id"
        );
    }

    #[test]
    fn values_are_kept_as_written() {
        let r = rules(&["drop"], &[]);
        assert_eq!(
            apply(
                &r,
                r#"{"drop":1,"n":1e400,"m":-0.0000000000000000000001,"big":123456789012345678901234567890}"#
            ),
            r#"{"n":1e400,"m":-0.0000000000000000000001,"big":123456789012345678901234567890}"#
        );
        assert_eq!(apply(&r, r#"{"drop":1,"s":"\ud800"}"#), r#"{"s":"\ud800"}"#);
        assert_eq!(
            apply(&r, r#"{ "a" : [ 1 , 2 ] , "drop" : { } }"#),
            r#"{"a":[ 1 , 2 ]}"#
        );
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let doc = format!(r#"{{"drop":1,"d":{deep}}}"#);
        assert_eq!(apply(&r, &doc), format!(r#"{{"d":{deep}}}"#));
    }

    #[test]
    fn keys_are_compared_decoded_without_case_and_every_duplicate_goes() {
        let r = rules(&["role", "secret", "user.key"], &[]);
        assert_eq!(apply(&r, r#"{"r\u006fle":1,"ok":1}"#), r#"{"ok":1}"#);
        // As Go's encoding/json binds them: any case, and the Unicode folds.
        assert_eq!(apply(&r, r#"{"ROLE":1,"Role":2,"ok":1}"#), r#"{"ok":1}"#);
        assert_eq!(apply(&r, "{\"\u{17F}ecret\":1,\"ok\":1}"), r#"{"ok":1}"#);
        assert_eq!(
            apply(&r, r#"{"USER":{"\u212Aey":1,"id":2}}"#),
            r#"{"USER":{"id":2}}"#
        );
        assert_eq!(apply(&r, r#"{"role":1,"role":2,"ok":1}"#), r#"{"ok":1}"#);
        // A kept key with a lone surrogate keeps it.
        assert_eq!(apply(&r, r#"{"role":1,"\udead":1}"#), r#"{"\udead":1}"#);
        assert_eq!(
            apply(&r, r#"{"role":1,"a\ud83d\ude00b\u0000":1}"#),
            "{\"a\u{1F600}b\\u0000\":1}"
        );
    }

    #[test]
    fn untouched_documents_come_back_as_they_were() {
        let r = rules(&["x"], &[]);
        for doc in [
            r#"{"a": 1}"#,
            "[1, 2]",
            "\"x\"",
            " 17 ",
            "\u{FEFF}{\"a\":1}",
        ] {
            assert!(
                matches!(r.rewrite(doc.as_bytes()), Ok(Cow::Borrowed(_))),
                "{doc}"
            );
        }
    }

    #[test]
    fn anything_but_one_json_document_is_refused() {
        let r = rules(&["x"], &[]);
        for doc in [
            &b"{"[..],
            b"{\"x\":1} x",
            b"{\"x\":1}{}",
            b"",
            b"{\"a\":\"\xff\"}",
            b"{\"a\":01}",
            b"{'a':1}",
            b"{\"a\":1,}",
            b"[1,]",
            b"{\"a\":\"\\x\"}",
            b"NaN",
            b"{\"a\x06b\":1}",
            b"{\"a\":\"\x00\"}",
        ] {
            assert!(
                r.rewrite(doc).is_err(),
                "{:?}",
                String::from_utf8_lossy(doc)
            );
        }
    }

    #[test]
    fn renames_keep_the_place_and_replace_a_same_named_field() {
        let r = rules(&["drop"], &[("old", "new")]);
        assert_eq!(
            apply(&r, "\u{FEFF}{\"a\":1,\"drop\":2,\"b\":3,\"old\":4,\"c\":5}"),
            r#"{"a":1,"b":3,"new":4,"c":5}"#
        );
        assert_eq!(apply(&r, r#"{"new":0,"old":4}"#), r#"{"new":4}"#);
        assert_eq!(apply(&r, r#"{"new":0}"#), r#"{"new":0}"#);
        // Removal wins over a rename of the same field.
        let both = rules(&["old"], &[("old", "new")]);
        assert_eq!(apply(&both, r#"{"old":1,"new":2}"#), r#"{"new":2}"#);
        // A renamed object's own rules still apply.
        let nested = rules(&["user.secret"], &[("user", "account")]);
        assert_eq!(
            apply(&nested, r#"{"user":{"secret":1,"id":2}}"#),
            r#"{"account":{"id":2}}"#
        );
    }
}
