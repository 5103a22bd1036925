//! Request path normalization, done once before any route is matched: the
//! upstream receives exactly the path that was matched and authorized.
//!
//! Percent-encoded unreserved characters are decoded (`%61` is `a`), `.` and
//! `..` segments are resolved, and `//` is collapsed. A path that climbs above
//! `/`, or holds an encoded `/` (`%2F`), a NUL or a control character (raw or
//! encoded), is refused.
//!
//! `;` path parameters (`/admin;jsessionid=1/secret`) are stripped by Java
//! servers before they route, so a gateway that matched the path with them
//! would authorize one path and forward another: [`path_params`] finds
//! them, and [`without_params`] gives the path routes match when they are
//! kept (`server.path_params: keep`).

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target must be an absolute path")]
    NotAbsolute,
    #[error("the path climbs above the root")]
    AboveRoot,
    #[error("the path holds an encoded slash or a backslash")]
    EncodedSlash,
    #[error("the path holds a dot segment with parameters")]
    DotSegmentParams,
    #[error("the path holds a control character")]
    ControlCharacter,
    #[error("the path holds a malformed percent-encoding")]
    BadEncoding,
}

/// Normalizes `path` (without its query). Borrows when nothing changes, which
/// is the common case.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut needs_work = false;
    for (i, &b) in bytes.iter().enumerate() {
        if b < 0x20 || b == 0x7f {
            return Err(PathError::ControlCharacter);
        }
        // Some upstreams (IIS, .NET) take a backslash for a slash.
        if b == b'\\' {
            return Err(PathError::EncodedSlash);
        }
        if b == b'%' || (b == b'/' && matches!(bytes.get(i + 1), Some(b'/') | Some(b'.'))) {
            needs_work = true;
        }
    }
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    Ok(Cow::Owned(resolve_segments(&decoded)?))
}

/// What `;` path parameters (`/a;jsessionid=1/b`) do (`server.path_params`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathParams {
    /// `400`: Java servers strip them before routing, so a route matched
    /// with them would not be the route the upstream serves.
    Reject,
    /// Routes match the path as Tomcat and Spring read it; the upstream
    /// receives it unchanged.
    Keep,
}

/// What `;` path parameters a normalized path holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Params {
    None,
    /// Raw `;` in some segment.
    Present,
    /// Only an encoded `%3B`, which servers that decode before splitting
    /// read as a parameter too.
    Encoded,
}

pub fn path_params(path: &str) -> Params {
    let bytes = path.as_bytes();
    if memchr::memchr(b';', bytes).is_some() {
        return Params::Present;
    }
    let encoded = memchr::memchr_iter(b'%', bytes)
        .any(|i| matches!(bytes.get(i + 1..i + 3), Some(b"3B" | b"3b")));
    if encoded {
        Params::Encoded
    } else {
        Params::None
    }
}

/// A segment without its parameters: up to its first `;`, or `%3B`, which
/// servers that decode before splitting read as one too.
pub fn segment_name(segment: &str) -> &str {
    let raw = segment.find(';').unwrap_or(segment.len());
    let encoded = segment
        .as_bytes()
        .windows(3)
        .position(|w| w[0] == b'%' && w[1] == b'3' && (w[2] == b'B' || w[2] == b'b'))
        .unwrap_or(segment.len());
    &segment[..raw.min(encoded)]
}

/// The path with each segment's parameters removed, as Tomcat and Spring
/// read it: a segment that was only parameters (`/;x/admin`) is gone, so
/// `/;x/admin/secret` routes as `/admin/secret`. What routes match under
/// `path_params: keep`.
pub fn without_params(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        let name = segment_name(segment);
        if name.is_empty() && segments.peek().is_some() {
            continue;
        }
        out.push('/');
        out.push_str(name);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// `..;x` or `.;x`: Tomcat and Spring drop `;` parameters and then resolve
/// the dot segment, which would take a request out of the matched prefix.
fn is_dot_with_params(segment: &str) -> bool {
    let name = segment.split(';').next().unwrap_or(segment);
    let name = match name.find("%3B").or_else(|| name.find("%3b")) {
        Some(i) => &name[..i],
        None => name,
    };
    (name == "." || name == "..") && name.len() < segment.len()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes `%XX` for unreserved characters; keeps other escapes, with their
/// hex digits upper-cased so equal paths are spelled the same way.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            // The input is a &str, so copying whole UTF-8 runs keeps it valid.
            let next = path[i..].find('%').map_or(bytes.len(), |n| i + n);
            out.push_str(&path[i..next]);
            i = next;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEncoding);
        };
        let value = hi << 4 | lo;
        if value == b'/' || value == b'\\' {
            return Err(PathError::EncodedSlash);
        }
        if value < 0x20 || value == 0x7f {
            return Err(PathError::ControlCharacter);
        }
        if is_unreserved(value) {
            out.push(value as char);
        } else {
            out.push('%');
            out.push(bytes[i + 1].to_ascii_uppercase() as char);
            out.push(bytes[i + 2].to_ascii_uppercase() as char);
        }
        i += 3;
    }
    Ok(out)
}

/// Resolves `.` and `..` and drops empty segments, keeping a trailing slash.
fn resolve_segments(path: &str) -> Result<String, PathError> {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        trailing_slash = false;
        if is_dot_with_params(segment) {
            return Err(PathError::DotSegmentParams);
        }
        match segment {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize_path(p).map(|c| c.into_owned())
    }

    #[test]
    fn plain_paths_are_borrowed() {
        assert!(matches!(
            normalize_path("/v1/users/7"),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(normalize_path("/v1/users/"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize_path("/a.b/c"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn dot_segments_and_double_slashes() {
        assert_eq!(n("/a/./b"), Ok("/a/b".into()));
        assert_eq!(n("/a/../b"), Ok("/b".into()));
        assert_eq!(n("/a//b"), Ok("/a/b".into()));
        assert_eq!(n("//a///b//"), Ok("/a/b/".into()));
        assert_eq!(n("/a/b/.."), Ok("/a/".into()));
        assert_eq!(n("/a/."), Ok("/a/".into()));
        assert_eq!(n("/.."), Err(PathError::AboveRoot));
        assert_eq!(n("/a/../../b"), Err(PathError::AboveRoot));
        assert_eq!(n("/a/.../b"), Ok("/a/.../b".into()));
    }

    #[test]
    fn unreserved_escapes_are_decoded_before_resolving() {
        assert_eq!(n("/%61dmin"), Ok("/admin".into()));
        assert_eq!(n("/a/%2e%2e/admin"), Ok("/admin".into()));
        assert_eq!(n("/a/%2E/b"), Ok("/a/b".into()));
        assert_eq!(n("/%2e%2e/x"), Err(PathError::AboveRoot));
        // Reserved escapes stay encoded, normalized to upper case.
        assert_eq!(n("/a%3fb"), Ok("/a%3Fb".into()));
        assert_eq!(n("/%252e%252e/x"), Ok("/%252e%252e/x".into()));
        assert_eq!(n("/caf%C3%A9"), Ok("/caf%C3%A9".into()));
    }

    #[test]
    fn path_parameters() {
        assert_eq!(path_params("/a/b"), Params::None);
        assert_eq!(path_params("/a%20b"), Params::None);
        assert_eq!(path_params("/admin;jsessionid=1/x"), Params::Present);
        assert_eq!(path_params("/admin%3bx/x"), Params::Encoded);
        assert_eq!(
            without_params("/admin;jsessionid=1/secret"),
            "/admin/secret"
        );
        assert_eq!(without_params("/a;x/b;y=1;z/c/"), "/a/b/c/");
        assert_eq!(without_params("/a/b"), "/a/b");
        // A segment of parameters only is gone, as Tomcat collapses it.
        assert_eq!(without_params("/;x/admin/secret"), "/admin/secret");
        assert_eq!(without_params("/;x"), "/");
        assert_eq!(without_params("/a/;x/"), "/a/");
        assert_eq!(without_params("/admin%3Bx/secret"), "/admin/secret");
        assert_eq!(without_params("/admin%3bx"), "/admin");
    }

    #[test]
    fn refused_paths() {
        assert_eq!(n("/a%2Fb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/a%5Cb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/a%00b"), Err(PathError::ControlCharacter));
        assert_eq!(n("/a%0Ab"), Err(PathError::ControlCharacter));
        assert_eq!(n("/a\u{1}b"), Err(PathError::ControlCharacter));
        assert_eq!(n("/a%zz"), Err(PathError::BadEncoding));
        assert_eq!(n("/a%2"), Err(PathError::BadEncoding));
        assert_eq!(n("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(n("/v1/..\\..\\admin"), Err(PathError::EncodedSlash));
        assert_eq!(n("/public/..;/internal"), Err(PathError::DotSegmentParams));
        assert_eq!(
            n("/public/..;x=1/internal"),
            Err(PathError::DotSegmentParams)
        );
        assert_eq!(n("/public/.;/internal"), Err(PathError::DotSegmentParams));
        assert_eq!(
            n("/public/..%3B/internal"),
            Err(PathError::DotSegmentParams)
        );
        assert_eq!(
            n("/public/%2e%2e;/internal"),
            Err(PathError::DotSegmentParams)
        );
        assert_eq!(n("/public/a;b/c"), Ok("/public/a;b/c".into()));
        assert_eq!(n("*"), Err(PathError::NotAbsolute));
    }

    /// An independent statement of what the normalized path must be: the
    /// unreserved escapes decoded (others upper-cased), then RFC 3986
    /// 5.2.4's dot-segment removal over the segments with empty ones
    /// dropped; `None` when it climbs above the root.
    fn reference(path: &str) -> Option<String> {
        let mut decoded = String::new();
        let b = path.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                let v = u8::from_str_radix(&path[i + 1..i + 3], 16).ok()?;
                if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                    decoded.push(v as char);
                } else {
                    decoded.push('%');
                    decoded.push_str(&path[i + 1..i + 3].to_ascii_uppercase());
                }
                i += 3;
            } else {
                let ch = path[i..].chars().next()?;
                decoded.push(ch);
                i += ch.len_utf8();
            }
        }
        let mut out: Vec<&str> = Vec::new();
        let mut trailing = false;
        for seg in decoded.split('/').skip(1) {
            trailing = matches!(seg, "" | "." | "..");
            match seg {
                "" | "." => {}
                ".." => {
                    out.pop()?;
                }
                s => out.push(s),
            }
        }
        let mut text: String = out.iter().map(|s| format!("/{s}")).collect();
        if text.is_empty() || trailing {
            text.push('/');
        }
        Some(text)
    }

    fn prefix_matches(prefix: &str, path: &str) -> bool {
        let prefix = prefix.trim_end_matches('/');
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    fn segment() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("a".to_string()),
            Just("admin".to_string()),
            Just("public".to_string()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("".to_string()),
            Just("%2e".to_string()),
            Just("%2E%2e".to_string()),
            Just(".%2e".to_string()),
            Just("%61dmin".to_string()),
            Just("%7E".to_string()),
            Just("%3F".to_string()),
            Just("%25".to_string()),
            Just("%252e".to_string()),
            Just("x;y".to_string()),
            Just("caf%C3%A9".to_string()),
            "[a-z0-9._~%-]{0,6}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

        /// Normalizing twice changes nothing.
        #[test]
        fn normalizing_is_idempotent(segs in proptest::collection::vec(segment(), 0..8)) {
            let path = format!("/{}", segs.join("/"));
            if let Ok(once) = normalize_path(&path) {
                let twice = normalize_path(&once).map(|p| p.into_owned());
                proptest::prop_assert_eq!(twice, Ok(once.clone().into_owned()));
            }
        }

        /// The result never climbs above the root, holds no dot or empty
        /// segment, and is what an upstream resolving the path itself
        /// would reach; a path that climbs above the root is refused.
        #[test]
        fn normalizing_resolves_like_the_rfc_and_never_climbs(
            segs in proptest::collection::vec(segment(), 0..8)
        ) {
            let path = format!("/{}", segs.join("/"));
            let reference = reference(&path);
            match normalize_path(&path) {
                Ok(n) => {
                    proptest::prop_assert!(n.starts_with('/'));
                    let inner = n.trim_end_matches('/');
                    for seg in inner.split('/').skip(1) {
                        proptest::prop_assert!(!matches!(seg, "" | "." | ".."), "{n}");
                    }
                    proptest::prop_assert_eq!(Some(n.into_owned()), reference);
                }
                Err(PathError::AboveRoot) => proptest::prop_assert!(reference.is_none()),
                // Refused for what it holds (encoded slash, bad escape, ...).
                Err(_) => {}
            }
        }

        /// A prefix route sees the path as the upstream will resolve it: a
        /// path matches a prefix after normalizing exactly when its
        /// resolution does.
        #[test]
        fn prefix_matches_see_the_resolved_path(
            segs in proptest::collection::vec(segment(), 0..8),
            prefix in proptest::sample::select(vec!["/", "/admin", "/public", "/a", "/admin/a"]),
        ) {
            let path = format!("/{}", segs.join("/"));
            if let (Ok(n), Some(r)) = (normalize_path(&path), reference(&path)) {
                proptest::prop_assert_eq!(prefix_matches(prefix, &n), prefix_matches(prefix, &r));
            }
        }
    }
}
