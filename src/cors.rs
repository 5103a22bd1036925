//! CORS (SPEC section 6.1), a route's `cors` or the top-level default.
//! Joins `request_filter` (a preflight is answered here, before rate
//! limits, authentication and the upstream; an actual request's origin is
//! judged once) and every response the route gives, the gateway's own
//! errors included (`RequestCtx::decorate`): browsers hide a response
//! without the fields from the page, so a 401 or 429 would look like a
//! network failure.
//!
//! Origins are compiled once into patterns: an exact origin, or one whose
//! leftmost labels are `*` (one or more DNS labels), scheme and port
//! compared exactly. `["*"]` admits every origin but `null` (sandboxed
//! documents and files), which only an explicit `null` admits.

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use pingora_http::ResponseHeader;

use crate::respond::Response;

/// One entry of `allow_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    Exact(String),
    /// `scheme://*.rest[:port]`: `suffix` is `.rest[:port]`.
    Labels {
        scheme: String,
        suffix: String,
    },
}

impl OriginPattern {
    /// Parses one `allow_origins` entry (not `*`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        if lower == "null" {
            return Ok(OriginPattern::Exact(lower));
        }
        let Some((scheme, rest)) = lower.split_once("://") else {
            return Err(format!(
                "\"{text}\" is not an origin: write scheme://host[:port]"
            ));
        };
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Err(format!("\"{text}\" has no valid scheme"));
        }
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!(
                "\"{text}\" is not an origin: no path, query or user, only scheme://host[:port]"
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => (h, Some(p)),
            _ => (rest, None),
        };
        if let Some(p) = port {
            if p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()) || p.parse::<u16>().is_err() {
                return Err(format!("\"{text}\" has an invalid port"));
            }
        }
        if let Some(rest_host) = host.strip_prefix("*.") {
            if rest_host.contains('*') || !valid_host(rest_host) || !rest_host.contains('.') {
                return Err(format!(
                    "\"{text}\": `*` may only stand for the leftmost labels of a domain with at least two labels after it"
                ));
            }
            let suffix = match port {
                Some(p) => format!(".{rest_host}:{p}"),
                None => format!(".{rest_host}"),
            };
            return Ok(OriginPattern::Labels {
                scheme: scheme.to_string(),
                suffix,
            });
        }
        if host.contains('*') {
            return Err(format!(
                "\"{text}\": `*` may only stand for whole leftmost labels (https://*.example.com)"
            ));
        }
        if !(valid_host(host) || (host.starts_with('[') && host.ends_with(']'))) {
            return Err(format!("\"{text}\" has an invalid host"));
        }
        Ok(OriginPattern::Exact(lower))
    }

    /// `origin` is lowercase.
    fn matches(&self, origin: &str) -> bool {
        match self {
            OriginPattern::Exact(o) => o == origin,
            OriginPattern::Labels { scheme, suffix } => {
                let Some(rest) = origin
                    .strip_prefix(scheme.as_str())
                    .and_then(|r| r.strip_prefix("://"))
                else {
                    return false;
                };
                let Some(labels) = rest.strip_suffix(suffix.as_str()) else {
                    return false;
                };
                // One or more whole labels, nothing else (no port, no path).
                !labels.is_empty() && labels.split('.').all(valid_label)
            }
        }
    }
}

fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

fn valid_host(host: &str) -> bool {
    !host.is_empty() && host.split('.').all(valid_label)
}

/// Which origins a route admits.
#[derive(Debug)]
pub enum Origins {
    /// `["*"]`: any origin but `null`.
    Any,
    List(Vec<OriginPattern>),
}

/// Which methods a preflight may ask for.
#[derive(Debug)]
pub enum AllowedMethods {
    /// Any (a route without `methods` and no `allow_methods`): the
    /// preflight's method is echoed.
    Any,
    List {
        methods: Vec<Method>,
        value: HeaderValue,
    },
}

/// A route's compiled `cors`.
#[derive(Debug)]
pub struct Cors {
    pub origins: Origins,
    pub methods: AllowedMethods,
    /// Lowercase; a preflight asking for another header is refused.
    pub allow_headers: Vec<HeaderName>,
    pub allow_headers_value: Option<HeaderValue>,
    pub expose_headers: Option<HeaderValue>,
    pub allow_credentials: bool,
    pub max_age: Option<HeaderValue>,
}

const ACAO: HeaderName = header::ACCESS_CONTROL_ALLOW_ORIGIN;

/// What CORS decided for a request.
#[derive(Debug, Clone)]
pub enum Admitted {
    /// An actual request: the origin its responses allow, if any.
    Origin(Option<HeaderValue>),
    /// A preflight: its answer carries its own fields (or, refused, none).
    Preflight,
}

impl Default for Admitted {
    fn default() -> Self {
        Admitted::Origin(None)
    }
}

/// Whether `req` is a preflight: `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`.
pub fn preflight_method(method: &Method, headers: &HeaderMap) -> Option<Method> {
    if method != Method::OPTIONS || !headers.contains_key(header::ORIGIN) {
        return None;
    }
    let asked = headers.get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
    Method::from_bytes(asked.as_bytes()).ok()
}

impl Cors {
    fn origin_allowed(&self, origin: &HeaderValue) -> bool {
        let Ok(text) = origin.to_str() else {
            return false;
        };
        let lower = text.to_ascii_lowercase();
        match &self.origins {
            Origins::Any => lower != "null" && !lower.is_empty(),
            Origins::List(patterns) => patterns.iter().any(|p| p.matches(&lower)),
        }
    }

    /// The answer to a preflight (`None` when `req` is not one): `204` with
    /// the fields, or `403` without any.
    pub fn preflight(
        &self,
        method: &Method,
        headers: &HeaderMap,
        request_id: &str,
    ) -> Option<Result<Response, Response>> {
        let asked = preflight_method(method, headers)?;
        let refuse = |why: &str| {
            Err(Response::problem(
                StatusCode::FORBIDDEN,
                &format!("CORS preflight refused: {why}"),
                request_id,
            )
            .with_header(header::VARY, HeaderValue::from_static("Origin")))
        };
        let origin = headers.get(header::ORIGIN)?;
        if !self.origin_allowed(origin) {
            return Some(refuse("the origin is not allowed"));
        }
        let methods = match &self.methods {
            AllowedMethods::Any => HeaderValue::from_str(asked.as_str()).ok()?,
            AllowedMethods::List { methods, value } => {
                if !methods.contains(&asked) {
                    return Some(refuse(&format!("the method {asked} is not allowed")));
                }
                value.clone()
            }
        };
        for value in headers.get_all(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            let Ok(list) = value.to_str() else {
                return Some(refuse("the requested headers are not readable"));
            };
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let known = self
                    .allow_headers
                    .iter()
                    .any(|h| h.as_str().eq_ignore_ascii_case(name));
                if !known {
                    return Some(refuse(&format!("the header {name} is not allowed")));
                }
            }
        }
        let mut answer = Response::empty(StatusCode::NO_CONTENT)
            .with_header(ACAO, origin.clone())
            .with_header(header::ACCESS_CONTROL_ALLOW_METHODS, methods)
            .with_header(header::VARY, HeaderValue::from_static("Origin"));
        if let Some(v) = &self.allow_headers_value {
            answer = answer.with_header(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        if let Some(v) = &self.max_age {
            answer = answer.with_header(header::ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        if self.allow_credentials {
            answer = answer.with_header(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        Some(Ok(answer))
    }

    /// The origin an actual request's responses allow, if it is allowed.
    pub fn admit(&self, headers: &HeaderMap) -> Admitted {
        Admitted::Origin(
            headers
                .get(header::ORIGIN)
                .filter(|o| self.origin_allowed(o))
                .cloned(),
        )
    }

    /// The fields on every response of the route: `Vary: Origin` always,
    /// any other `Access-Control-*` field removed (an upstream's own could
    /// contradict the policy), and this policy's for an allowed origin. A
    /// preflight's answer is left as it was built.
    pub fn decorate(&self, admitted: &Admitted, resp: &mut ResponseHeader) {
        let Admitted::Origin(origin) = admitted else {
            return;
        };
        let theirs: Vec<HeaderName> = resp
            .headers
            .keys()
            .filter(|n| n.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in theirs {
            resp.remove_header(&name);
        }
        let varies = resp.headers.get_all(header::VARY).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|n| n.trim().eq_ignore_ascii_case("origin") || n.trim() == "*")
            })
        });
        if !varies {
            let _ = resp.append_header(header::VARY, "Origin");
        }
        let Some(origin) = origin else {
            return;
        };
        for (name, value) in self.allowed(origin) {
            let _ = resp.insert_header(name, value);
        }
    }

    /// A refusal routing made before the request had a route (`405`, or
    /// `404` when `match.claims` failed), on a path whose first route (in
    /// the order routes are tried) has this policy: the fields `decorate`
    /// would have set, or the page could not read why it was refused.
    pub fn on_refusal(&self, headers: &HeaderMap, refusal: Response) -> Response {
        let mut refusal = refusal.with_header(header::VARY, HeaderValue::from_static("Origin"));
        if let Admitted::Origin(Some(origin)) = self.admit(headers) {
            for (name, value) in self.allowed(&origin) {
                refusal = refusal.with_header(name, value);
            }
        }
        refusal
    }

    /// The fields of a response to an allowed origin.
    fn allowed<'a>(
        &'a self,
        origin: &HeaderValue,
    ) -> impl Iterator<Item = (HeaderName, HeaderValue)> + 'a {
        let expose = self
            .expose_headers
            .clone()
            .map(|v| (header::ACCESS_CONTROL_EXPOSE_HEADERS, v));
        let credentials = self.allow_credentials.then(|| {
            (
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            )
        });
        std::iter::once((ACAO, origin.clone()))
            .chain(expose)
            .chain(credentials)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, origin: &str) -> bool {
        OriginPattern::parse(pattern).unwrap().matches(origin)
    }

    #[test]
    fn origin_patterns_match_whole_labels_scheme_and_port() {
        assert!(matches(
            "https://app.example.com",
            "https://app.example.com"
        ));
        assert!(matches(
            "HTTPS://App.Example.com",
            "https://app.example.com"
        ));
        assert!(!matches(
            "https://app.example.com",
            "http://app.example.com"
        ));
        assert!(!matches(
            "https://app.example.com",
            "https://app.example.com:8443"
        ));
        assert!(matches("https://*.example.com", "https://a.example.com"));
        assert!(matches("https://*.example.com", "https://a.b.example.com"));
        assert!(!matches("https://*.example.com", "https://example.com"));
        assert!(!matches(
            "https://*.example.com",
            "https://evil-example.com"
        ));
        assert!(!matches(
            "https://*.example.com",
            "https://a.example.com.evil.io"
        ));
        assert!(!matches(
            "https://*.example.com",
            "https://a.example.com:444"
        ));
        assert!(!matches("https://*.example.com", "http://a.example.com"));
        assert!(matches(
            "https://*.example.com:8443",
            "https://a.example.com:8443"
        ));
        assert!(!matches(
            "https://*.example.com:8443",
            "https://a.example.com"
        ));
        assert!(!matches("https://*.example.com", "https://a_b.example.com"));
        for bad in [
            "app.example.com",
            "https://app.example.com/path",
            "https://*example.com",
            "https://a.*.example.com",
            "https://*.com",
            "https://app.example.com:99999",
            "https://user@app.example.com",
        ] {
            assert!(OriginPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
