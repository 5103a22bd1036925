//! JSON body rules: never panic; every document serde_json reads is read
//! (never refused), what comes out is one JSON document, and no removed
//! field is left in it (top level, nested, in array elements), however the
//! key is spelled, cased or repeated.
#![no_main]

use std::fmt;

use libfuzzer_sys::fuzz_target;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The decoded keys of an object's fields (`None` for a key that is not
/// UTF-8, a lone surrogate), with their raw values.
struct Fields;

impl<'de> Visitor<'de> for Fields {
    type Value = Vec<(Option<String>, &'de RawValue)>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(key) = map.next_key_seed(KeyBytes)? {
            let value: &RawValue = map.next_value()?;
            out.push((String::from_utf8(key).ok(), value));
        }
        Ok(out)
    }
}

struct KeyBytes;

impl<'de> DeserializeSeed<'de> for KeyBytes {
    type Value = Vec<u8>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<u8>, D::Error> {
        struct B;
        impl<'de> Visitor<'de> for B {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
        }
        d.deserialize_bytes(B)
    }
}

fn fields(text: &str) -> Option<Vec<(Option<String>, &RawValue)>> {
    if !text.trim_start().starts_with('{') {
        return None;
    }
    serde_json::Deserializer::from_str(text)
        .deserialize_map(Fields)
        .ok()
}

/// Whether a key names `name` as a binder that ignores case reads it.
fn names(key: &Option<String>, name: &str) -> bool {
    key.as_deref().is_some_and(|k| k.to_lowercase() == name)
}

/// The fields of the object `text` named `name` (in any case).
fn under<'t>(text: &'t str, name: &str) -> Vec<&'t RawValue> {
    fields(text)
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| names(k, name))
        .map(|(_, v)| v)
        .collect()
}

/// No `password` at the top, none in `user`, no `ssn` in an element of
/// `items`.
fn assert_removed(text: &str) {
    let top = fields(text).unwrap_or_default();
    for (key, _) in &top {
        assert!(!names(key, "password"), "password left in {text}");
    }
    for user in under(text, "user") {
        assert!(
            under(user.get(), "password").is_empty(),
            "user.password left in {text}"
        );
    }
    for items in under(text, "items") {
        let Ok(elements) = serde_json::from_str::<Vec<&RawValue>>(items.get()) else {
            continue;
        };
        for element in elements {
            assert!(
                under(element.get(), "ssn").is_empty(),
                "items[].ssn left in {text}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(rules) = gatehouse::fuzzing::json_rules(
        &["password", "user.password", "items[].ssn"],
        &[("name", "full_name"), ("user.id", "uid")],
    ) else {
        return;
    };
    let body = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    let readable = serde_json::from_slice::<&RawValue>(body).is_ok();
    match gatehouse::fuzzing::rewrite_json(&rules, data) {
        Some(out) => {
            let out = std::str::from_utf8(&out).expect("the output is UTF-8");
            let out = out.strip_prefix('\u{FEFF}').unwrap_or(out);
            assert!(
                serde_json::from_str::<&RawValue>(out).is_ok(),
                "not one JSON document: {out:?}"
            );
            assert_removed(out);
        }
        None => assert!(
            !readable,
            "refused a document serde_json reads: {:?}",
            String::from_utf8_lossy(data)
        ),
    }
});
