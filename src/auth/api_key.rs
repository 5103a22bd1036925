//! API keys (`auth.api_keys`): a provider finds a key in a header or a
//! query parameter, hashes it with SHA-256 and looks the digest up among
//! its consumers. Files hold digests only, so a leaked file or config dump
//! gives no usable key. The lookup is by the digest of what the client
//! sent, which an attacker cannot steer toward a stored one; the match is
//! then confirmed in constant time. The key is removed before forwarding
//! and never logged (the access log has no headers and no query).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use pingora_http::RequestHeader;
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{only_one, Claims, MAX_TOKEN_LEN};

/// Where a provider finds the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Header(HeaderName),
    Query(String),
}

impl KeySource {
    /// Reads `header:NAME` or `query:NAME`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(name) = s.strip_prefix("header:") {
            return HeaderName::from_bytes(name.as_bytes())
                .map(KeySource::Header)
                .map_err(|_| format!("\"{name}\" is not a valid header name"));
        }
        if let Some(name) = s.strip_prefix("query:") {
            // Names are compared as sent: `%` and `+` would be spelled
            // otherwise by some clients, and a key found under one spelling
            // must be the one stripped.
            if name.is_empty() || name.contains(['&', '=', ' ', '#', '%', '+']) {
                return Err(format!("\"{name}\" is not a valid query parameter name"));
            }
            return Ok(KeySource::Query(name.to_string()));
        }
        Err(format!(
            "unknown from \"{s}\"; use header:NAME or query:NAME"
        ))
    }

    /// The key in `req`, if any; two of them are returned as an empty key,
    /// refused as invalid (the upstream might read the other one).
    fn find<'r>(&self, req: &'r RequestHeader) -> Option<Cow<'r, str>> {
        match self {
            KeySource::Header(name) => only_one(
                req.headers
                    .get_all(name)
                    .iter()
                    .map(|v| Cow::Borrowed(v.to_str().unwrap_or("").trim())),
            ),
            KeySource::Query(name) => {
                only_one(crate::routing::query_values(req.uri.query()?, name))
            }
        }
    }
}

/// One consumer of a keys file: its name and its other fields, which
/// `require_claims` matches as it matches a token's claims.
#[derive(Debug)]
pub struct Consumer {
    pub name: String,
    pub fields: Claims,
    /// The provider's name and the consumer's, as one key: consumers of two
    /// providers may share a name, never a rate-limit count or a cache entry.
    pub scoped: String,
}

/// One `auth.api_keys` provider, compiled with its keys file.
pub struct ApiKeys {
    pub name: String,
    pub from: KeySource,
    /// Header set upstream to the consumer's name.
    pub forward_consumer: Option<HeaderName>,
    consumers: HashMap<[u8; 32], Arc<Consumer>, ahash::RandomState>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests are not printed either.
        f.debug_struct("ApiKeys")
            .field("name", &self.name)
            .field("consumers", &self.consumers.len())
            .finish()
    }
}

/// What a provider made of a request.
pub enum KeyCheck {
    /// No key was sent.
    Missing,
    /// A key no consumer holds (or two keys).
    Unknown,
    Valid(Arc<Consumer>),
}

impl ApiKeys {
    pub fn new(
        name: String,
        from: KeySource,
        forward_consumer: Option<HeaderName>,
        entries: Vec<([u8; 32], Consumer)>,
    ) -> Self {
        let consumers = entries
            .into_iter()
            .map(|(digest, mut consumer)| {
                consumer.scoped = format!("{name}\0{}", consumer.name);
                (digest, Arc::new(consumer))
            })
            .collect();
        ApiKeys {
            name,
            from,
            forward_consumer,
            consumers,
        }
    }

    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    pub fn check(&self, req: &RequestHeader) -> KeyCheck {
        let Some(key) = self.from.find(req) else {
            return KeyCheck::Missing;
        };
        if key.is_empty() || key.len() > MAX_TOKEN_LEN {
            return KeyCheck::Unknown;
        }
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        match self.consumers.get_key_value(&digest) {
            Some((stored, consumer)) if bool::from(stored.ct_eq(&digest)) => {
                KeyCheck::Valid(Arc::clone(consumer))
            }
            _ => KeyCheck::Unknown,
        }
    }

    /// Removes the key from the upstream request: its header, or its
    /// query parameter (every occurrence, whatever else the query holds).
    pub fn strip(&self, upstream: &mut RequestHeader) {
        match &self.from {
            KeySource::Header(name) => {
                upstream.remove_header(name);
            }
            KeySource::Query(name) => {
                let Some(query) = upstream.uri.query() else {
                    return;
                };
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| !query_pair_is(pair, name))
                    .collect();
                if kept.len() == query.split('&').count() {
                    return;
                }
                let mut uri = upstream.uri.path().to_string();
                if !kept.is_empty() {
                    uri.push('?');
                    uri.push_str(&kept.join("&"));
                }
                let _ = upstream.set_raw_path(uri.as_bytes());
            }
        }
    }

    /// The header naming the consumer upstream.
    pub fn consumer_header(&self, consumer: &Consumer) -> Option<(&HeaderName, HeaderValue)> {
        let header = self.forward_consumer.as_ref()?;
        HeaderValue::from_str(&consumer.name)
            .ok()
            .map(|value| (header, value))
    }
}

/// Whether a `name=value` pair of a query is parameter `name`, its name
/// percent-decoded: more than `routing::query_values` finds (it compares
/// names as sent), so any spelling of the key's name is stripped.
fn query_pair_is(pair: &str, name: &str) -> bool {
    let raw = pair.split_once('=').map_or(pair, |(n, _)| n);
    let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    decoded.replace('+', " ") == name
}

/// A keys file's entries, or every mistake in it (each with the entry's
/// index; `line` gives an entry's line in the file). Digests are checked for
/// form and uniqueness; a key in clear is refused.
pub fn parse_keys_file(
    entries: &Value,
    line: &dyn Fn(usize) -> Option<usize>,
) -> Result<Vec<([u8; 32], Consumer)>, Vec<String>> {
    let Some(items) = entries.as_array() else {
        return Err(vec![
            "the keys file must be a list of { consumer, sha256, ... } entries".into(),
        ]);
    };
    let mut errors = Vec::new();
    let mut out: Vec<([u8; 32], Consumer)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = match line(i) {
            Some(l) => format!("entry {} (line {l})", i + 1),
            None => format!("entry {}", i + 1),
        };
        let Some(map) = item.as_object() else {
            errors.push(format!("{at}: expected {{ consumer, sha256, ... }}"));
            continue;
        };
        let name = match map.get("consumer") {
            Some(Value::String(s)) if !s.is_empty() && HeaderValue::from_str(s).is_ok() => {
                s.clone()
            }
            _ => {
                errors.push(format!("{at}: consumer must be a non-empty name"));
                continue;
            }
        };
        let digest = match map.get("sha256").and_then(Value::as_str).map(parse_digest) {
            Some(Some(d)) => d,
            _ => {
                // The value is never echoed: it might be a key in clear.
                errors.push(format!(
                    "{at} ({name}): sha256 must be the key's SHA-256 as 64 hex digits"
                ));
                continue;
            }
        };
        if out.iter().any(|(d, _)| *d == digest) {
            errors.push(format!("{at} ({name}): this digest is already listed"));
            continue;
        }
        if out.iter().any(|(_, c)| c.name == name) {
            errors.push(format!("{at}: consumer \"{name}\" is already listed"));
            continue;
        }
        let mut fields = Claims::new();
        for (field, value) in map {
            if field == "consumer" || field == "sha256" {
                continue;
            }
            let scalar = |v: &Value| v.is_string() || v.is_number() || v.is_boolean();
            let ok = match value {
                Value::Array(items) => items.iter().all(scalar),
                v => scalar(v),
            };
            if !ok {
                errors.push(format!(
                    "{at} ({name}): field \"{field}\" must be a string, number, boolean or a list of them"
                ));
            }
            fields.insert(field.clone(), value.clone());
        }
        out.push((
            digest,
            Consumer {
                name,
                fields,
                scoped: String::new(),
            },
        ));
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn provider(from: &str) -> ApiKeys {
        let entries = parse_keys_file(
            &json!([
                // sha256("test")
                {"consumer": "acme", "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "tier": "gold"}
            ]),
            &|_| None,
        )
        .unwrap();
        ApiKeys::new(
            "partners".into(),
            KeySource::parse(from).unwrap(),
            None,
            entries,
        )
    }

    fn req(path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn keys_are_found_by_digest() {
        let p = provider("header:X-API-Key");
        match p.check(&req("/", &[("x-api-key", "test")])) {
            KeyCheck::Valid(c) => {
                assert_eq!(c.name, "acme");
                assert_eq!(c.fields["tier"], "gold");
            }
            _ => panic!("the key is valid"),
        }
        assert!(matches!(
            p.check(&req("/", &[("x-api-key", "tesT")])),
            KeyCheck::Unknown
        ));
        assert!(matches!(p.check(&req("/", &[])), KeyCheck::Missing));
        // Two keys: which would the upstream read?
        let two = req("/", &[("x-api-key", "test"), ("x-api-key", "test")]);
        assert!(matches!(p.check(&two), KeyCheck::Unknown));
    }

    #[test]
    fn a_query_key_is_stripped_and_the_rest_kept() {
        let p = provider("query:api_key");
        assert!(matches!(
            p.check(&req("/x?a=1&api_key=test", &[])),
            KeyCheck::Valid(_)
        ));
        let mut r = req("/x?a=1&api%5Fkey=test&b=2&api_key=again", &[]);
        p.strip(&mut r);
        assert_eq!(r.uri.to_string(), "/x?a=1&b=2");
        let mut r = req("/x?api_key=test", &[]);
        p.strip(&mut r);
        assert_eq!(r.uri.to_string(), "/x");
        let mut r = req("/x?api_keyx=1", &[]);
        p.strip(&mut r);
        assert_eq!(r.uri.to_string(), "/x?api_keyx=1");
    }

    #[test]
    fn bad_files_name_each_entry_and_never_echo_a_value() {
        let errors = parse_keys_file(
            &json!([
                {"consumer": "a", "sha256": "my-secret-key"},
                {"sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"},
                {"consumer": "b", "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"},
                {"consumer": "c", "sha256": "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"},
                {"consumer": "d", "sha256": "1f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "x": {"y": 1}},
            ]),
            &|i| Some(i + 2),
        )
        .unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with("entry 1 (line 2)"), "{errors:?}");
        assert!(errors.iter().all(|e| !e.contains("my-secret-key")));
        assert!(errors[2].contains("already listed"), "{errors:?}");
        assert!(errors[3].contains("field \"x\""), "{errors:?}");
    }
}
