//! What a route matches: a path pattern plus optional methods, host and
//! header conditions, and the ordering that makes the most specific route win.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;
use serde_json::Value;

/// One path condition.
#[derive(Debug)]
pub enum PathPattern {
    /// `path: /users/{id}`: the whole path, `{name}` binding one segment.
    Exact(Vec<Segment>),
    /// `path_regex`: anchored by the author; named groups become parameters.
    Regex(Regex),
    /// `path_prefix`: whole segments; stored without a trailing slash
    /// (the root prefix is stored as "").
    Prefix(String),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    Param(String),
}

/// Values bound by `{name}` segments or named regex groups.
pub type Params = Vec<(String, String)>;

impl PathPattern {
    pub fn exact(pattern: &str) -> Result<Self, String> {
        if !pattern.starts_with('/') {
            return Err(format!("path \"{pattern}\" must start with /"));
        }
        let mut segments = Vec::new();
        for s in pattern[1..].split('/') {
            if let Some(name) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                let valid = !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !valid {
                    return Err(format!("\"{{{name}}}\" is not a valid parameter name"));
                }
                if segments.contains(&Segment::Param(name.to_string())) {
                    return Err(format!("parameter {{{name}}} appears twice"));
                }
                segments.push(Segment::Param(name.to_string()));
            } else if s.contains(['{', '}']) {
                return Err(format!(
                    "segment \"{s}\": a parameter must be a whole segment, like /users/{{id}}"
                ));
            } else {
                segments.push(Segment::Literal(s.to_string()));
            }
        }
        Ok(PathPattern::Exact(segments))
    }

    pub fn prefix(prefix: &str) -> Result<Self, String> {
        if !prefix.starts_with('/') {
            return Err(format!("path_prefix \"{prefix}\" must start with /"));
        }
        Ok(PathPattern::Prefix(
            prefix.trim_end_matches('/').to_string(),
        ))
    }

    pub fn regex(source: &str) -> Result<Self, String> {
        Regex::new(source).map(PathPattern::Regex).map_err(|e| {
            // The library's message spans lines (pattern, caret, reason).
            let text = e.to_string();
            let reason = text
                .lines()
                .last()
                .unwrap_or("")
                .trim_start_matches("error: ");
            format!("invalid path_regex: {reason}")
        })
    }

    /// Whether `path` matches; bound parameters are pushed onto `params`
    /// only when `params` is given.
    pub fn matches(&self, path: &str, params: Option<&mut Params>) -> bool {
        match self {
            PathPattern::Prefix(prefix) => {
                prefix.is_empty()
                    || (path.starts_with(prefix.as_str())
                        && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
            }
            PathPattern::Exact(segments) => {
                let Some(rest) = path.strip_prefix('/') else {
                    return false;
                };
                let mut parts = rest.split('/');
                for segment in segments {
                    let Some(part) = parts.next() else {
                        return false;
                    };
                    match segment {
                        Segment::Literal(l) if l != part => return false,
                        Segment::Param(_) if part.is_empty() => return false,
                        _ => {}
                    }
                }
                if parts.next().is_some() {
                    return false;
                }
                if let Some(params) = params {
                    for (segment, part) in segments.iter().zip(rest.split('/')) {
                        if let Segment::Param(name) = segment {
                            params.push((name.clone(), part.to_string()));
                        }
                    }
                }
                true
            }
            PathPattern::Regex(re) => match params {
                None => re.is_match(path),
                Some(params) => {
                    let Some(caps) = re.captures(path) else {
                        return false;
                    };
                    for name in re.capture_names().flatten() {
                        if let Some(m) = caps.name(name) {
                            params.push((name.to_string(), m.as_str().to_string()));
                        }
                    }
                    true
                }
            },
        }
    }

    /// Sort key: exact before regex before prefix; among exact paths, more
    /// literal segments first; among prefixes, longer first.
    pub(crate) fn specificity(&self) -> (u8, isize) {
        match self {
            PathPattern::Exact(segments) => (
                0,
                segments
                    .iter()
                    .filter(|s| matches!(s, Segment::Param(_)))
                    .count() as isize,
            ),
            PathPattern::Regex(_) => (1, 0),
            PathPattern::Prefix(p) => (2, -(p.len() as isize)),
        }
    }
}

/// `host: api.example.com` or `host: *.example.com` (any subdomain).
#[derive(Debug)]
pub enum HostPattern {
    Exact(String),
    /// Stored as the suffix including its leading dot: `.example.com`.
    Wildcard(String),
}

impl HostPattern {
    pub fn parse(host: &str) -> Result<Self, String> {
        let host = host.to_ascii_lowercase();
        if let Some(suffix) = host.strip_prefix('*') {
            if !suffix.starts_with('.') || suffix.len() < 2 || suffix.contains('*') {
                return Err(format!(
                    "host \"{host}\": a wildcard must be a whole leading label, like *.example.com"
                ));
            }
            return Ok(HostPattern::Wildcard(suffix.to_string()));
        }
        if host.is_empty() || host.contains(['*', '/', ' ']) {
            return Err(format!("host \"{host}\" is not a valid host name"));
        }
        Ok(HostPattern::Exact(host))
    }

    /// `host` is the request's host without port, any case.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h.eq_ignore_ascii_case(host),
            HostPattern::Wildcard(suffix) => {
                host.len() > suffix.len()
                    && host.as_bytes()[host.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }
}

/// The methods a route accepts; a route that lists GET also answers HEAD.
#[derive(Debug)]
pub struct MethodSet {
    methods: Vec<Method>,
}

impl MethodSet {
    pub fn parse(names: &[String]) -> Result<Self, String> {
        let mut methods = Vec::new();
        for name in names {
            let upper = name.to_ascii_uppercase();
            let method = Method::from_bytes(upper.as_bytes())
                .map_err(|_| format!("\"{name}\" is not an HTTP method"))?;
            if !methods.contains(&method) {
                methods.push(method);
            }
        }
        if methods.contains(&Method::GET) && !methods.contains(&Method::HEAD) {
            methods.push(Method::HEAD);
        }
        if methods.is_empty() {
            return Err("methods must list at least one method".into());
        }
        Ok(MethodSet { methods })
    }

    pub fn contains(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Method> {
        self.methods.iter()
    }
}

/// All conditions of one route.
#[derive(Debug)]
pub struct RouteMatcher {
    pub path: PathPattern,
    pub methods: Option<MethodSet>,
    pub host: Option<HostPattern>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// `match.query`: each parameter has this value (one of its values,
    /// percent-decoded).
    pub query: Vec<(String, String)>,
    /// `match.claims`: each claim of the verified identity is this value
    /// (or, an array, holds it). Checked last, by the router's caller,
    /// which verifies the route's credentials to learn them.
    pub claims: Vec<(String, Value)>,
}

/// Whether a claim holds `expected`: equal, or an array holding it.
pub fn claim_matches(
    claims: &serde_json::Map<String, Value>,
    name: &str,
    expected: &Value,
) -> bool {
    match claims.get(name) {
        Some(Value::Array(items)) => items.contains(expected),
        Some(v) => v == expected,
        None => false,
    }
}

/// Whether any of the request's `name` fields is exactly `value`.
pub fn header_matches(headers: &HeaderMap, name: &HeaderName, value: &HeaderValue) -> bool {
    headers.get_all(name).iter().any(|v| v == value)
}

impl RouteMatcher {
    /// How many conditions beyond the path: more is more specific.
    pub fn condition_count(&self) -> usize {
        usize::from(self.methods.is_some())
            + usize::from(self.host.is_some())
            + self.headers.len()
            + self.query.len()
            + self.claims.len()
    }

    /// Every `match.query` condition holds for `query`.
    pub fn matches_query(&self, query: Option<&str>) -> bool {
        self.query.iter().all(|(name, value)| {
            query.is_some_and(|q| super::query_values(q, name).any(|v| v == value.as_str()))
        })
    }

    /// Every `match.claims` condition holds for `claims` (none: a request
    /// without a verified identity).
    pub fn matches_claims(&self, claims: Option<&serde_json::Map<String, Value>>) -> bool {
        self.claims.is_empty()
            || claims.is_some_and(|c| {
                self.claims
                    .iter()
                    .all(|(name, expected)| claim_matches(c, name, expected))
            })
    }

    /// Everything but the path and the method.
    pub fn matches_host_and_headers(&self, host: Option<&str>, headers: &HeaderMap) -> bool {
        if let Some(pattern) = &self.host {
            match host {
                Some(h) if pattern.matches(h) => {}
                _ => return false,
            }
        }
        self.headers
            .iter()
            .all(|(name, value)| header_matches(headers, name, value))
    }

    pub fn matches_method(&self, method: &Method) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matches_whole_segments() {
        let p = PathPattern::prefix("/v1/users").unwrap();
        assert!(p.matches("/v1/users", None));
        assert!(p.matches("/v1/users/", None));
        assert!(p.matches("/v1/users/7", None));
        assert!(!p.matches("/v1/usersx", None));
        assert!(!p.matches("/v1/user", None));
        let root = PathPattern::prefix("/").unwrap();
        assert!(root.matches("/anything/at/all", None));
        let slash = PathPattern::prefix("/v1/").unwrap();
        assert!(slash.matches("/v1", None) && slash.matches("/v1/x", None));
    }

    #[test]
    fn exact_paths_bind_parameters() {
        let p = PathPattern::exact("/users/{id}/orders/{order}").unwrap();
        let mut params = Params::new();
        assert!(p.matches("/users/7/orders/9", Some(&mut params)));
        assert_eq!(
            params,
            vec![("id".into(), "7".into()), ("order".into(), "9".into())]
        );
        assert!(!p.matches("/users/7/orders", None));
        assert!(!p.matches("/users/7/orders/9/x", None));
        assert!(!p.matches("/users//orders/9", None));
        assert!(PathPattern::exact("/users/{id").is_err());
        assert!(PathPattern::exact("/users/x{id}").is_err());
        assert!(PathPattern::exact("/a/{id}/{id}").is_err());
        assert!(PathPattern::exact("users").is_err());
        let root = PathPattern::exact("/").unwrap();
        assert!(root.matches("/", None));
        assert!(!root.matches("/a", None));
    }

    #[test]
    fn regex_named_groups_are_parameters() {
        let p = PathPattern::regex("^/files/(?P<rest>.*)$").unwrap();
        let mut params = Params::new();
        assert!(p.matches("/files/a/b.txt", Some(&mut params)));
        assert_eq!(params, vec![("rest".into(), "a/b.txt".into())]);
        assert!(PathPattern::regex("^/files/(").is_err());
    }

    #[test]
    fn hosts() {
        let exact = HostPattern::parse("API.example.com").unwrap();
        assert!(exact.matches("api.EXAMPLE.com"));
        assert!(!exact.matches("x.api.example.com"));
        let wild = HostPattern::parse("*.example.com").unwrap();
        assert!(wild.matches("a.example.com"));
        assert!(wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("badexample.com"));
        assert!(HostPattern::parse("a.*.com").is_err());
        assert!(HostPattern::parse("*example.com").is_err());
    }

    #[test]
    fn get_implies_head() {
        let m = MethodSet::parse(&["get".into()]).unwrap();
        assert!(m.contains(&Method::GET) && m.contains(&Method::HEAD));
        assert!(!m.contains(&Method::POST));
        assert!(MethodSet::parse(&["GE T".into()]).is_err());
    }
}
