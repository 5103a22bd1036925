//! The gateway's handling of hostile input, one function per piece, for
//! the fuzz targets in `fuzz/` and the property tests: each runs exactly
//! the code a request or a configuration file goes through, and returns
//! what it decided in plain types. Not an API for anything else.

use std::net::SocketAddr;
use std::path::Path;

use crate::aggregate::{Input, PathTemplate};
use crate::transform::body::XmlError;
use crate::transform::json::{FieldPath, JsonRules};

/// The HTTP/1 head check: `Ok` with the body framing (`Length(n)`,
/// `Chunked`, `Upgrade` as text) or the refusal's status.
pub fn check_head(head: &[u8], max_headers: usize) -> Result<String, u16> {
    crate::listener::check_head_for_fuzzing(head, max_headers)
}

/// Where a head ends, if it has.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    crate::listener::head_end_for_fuzzing(buf)
}

/// Path normalization, as routing sees it.
pub fn normalize_path(path: &str) -> Result<String, String> {
    crate::routing::normalize_path(path)
        .map(|p| p.into_owned())
        .map_err(|e| e.to_string())
}

/// Whether a prefix route for `prefix` matches `path` (whole segments).
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    crate::routing::PathPattern::prefix(prefix).is_ok_and(|p| p.matches(path, None))
}

/// Field rules, compiled as a route's `remove_fields` and `rename_fields`.
pub fn json_rules(remove: &[&str], rename: &[(&str, &str)]) -> Option<JsonRules> {
    let remove = remove
        .iter()
        .map(|p| FieldPath::parse(p))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let rename = rename
        .iter()
        .map(|(p, to)| FieldPath::parse(p).map(|p| (p, to.to_string())))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some(JsonRules::new(remove, rename))
}

/// A body through the rules: the rewritten document, or `None` when it is
/// refused as unreadable.
pub fn rewrite_json(rules: &JsonRules, body: &[u8]) -> Option<Vec<u8>> {
    rules.rewrite(body).ok().map(|b| b.into_owned())
}

/// XML to JSON, with the tree held to `budget` bytes: the JSON text, or
/// why not ("malformed", "too costly").
pub fn xml_to_json(body: &[u8], budget: usize) -> Result<String, &'static str> {
    let mut left = budget;
    let spend = &mut |n: usize| match left.checked_sub(n) {
        Some(l) => {
            left = l;
            true
        }
        None => false,
    };
    match crate::transform::body::xml_to_json(body, spend) {
        Ok(v) => Ok(v.to_string()),
        Err(XmlError::Malformed) => Err("malformed"),
        Err(XmlError::TooCostly) => Err("too costly"),
    }
}

/// An aggregate part's path template filled with these values: the path,
/// or why not.
pub fn fill_template(
    template: &str,
    params: &[(String, String)],
    query: Option<&str>,
    claim: Option<&str>,
) -> Result<String, String> {
    let template = PathTemplate::parse(template)?;
    let mut claims = crate::auth::Claims::new();
    if let Some(c) = claim {
        claims.insert("sub".into(), serde_json::Value::from(c));
    }
    let params = params.to_vec();
    let input = Input {
        params: &params,
        query,
        claims: Some(&claims),
        headers: vec![],
        forwarded: None,
        trace: None,
    };
    template.fill(&input).map_err(|e| format!("{e:?}"))
}

/// A configuration file compiled with no environment and no resolver
/// (a name that needs resolving is an error): the number of errors.
pub fn load_config(text: &str) -> Result<(), usize> {
    let no_names = |_: Option<SocketAddr>, _: &str| -> std::io::Result<Vec<SocketAddr>> {
        Err(std::io::Error::other("no resolver while fuzzing"))
    };
    crate::config::load_str_resolving(text, Path::new("/nonexistent"), &|_| None, &no_names)
        .map(|_| ())
        .map_err(|e| e.0.len())
}
