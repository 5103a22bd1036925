//! The edge policies a route may set, or take from the top-level default
//! of the same name (SPEC section 6): `cors`, `ip_filter` and
//! `compression`. A route's own
//! setting replaces the default whole; `off` switches the default off for
//! one route.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::Method;
use serde::Deserialize;
use serde_json::Value;

use super::Compiler;
use crate::compression::{Compression, TypePattern};
use crate::config::source::{index_path, key_path};
use crate::config::units::{ConfDuration, ConfSize};
use crate::cors::{AllowedMethods, Cors, OriginPattern, Origins};
use crate::ip_filter::{parse_net, IpFilter};
use crate::routing::MethodSet;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCors {
    allow_origins: Vec<String>,
    allow_methods: Option<Vec<String>>,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    #[serde(default)]
    allow_credentials: bool,
    max_age: Option<ConfDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompression {
    min_size: Option<ConfSize>,
    types: Option<Vec<String>>,
    level: Option<u32>,
}

/// Compressed when `types` is not given.
const DEFAULT_TYPES: &[&str] = &[
    "application/json",
    "application/javascript",
    "application/xml",
    "application/problem+json",
    "image/svg+xml",
    "text/*",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIpFilter {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// The top-level defaults, as written (each route compiles its own: a
/// `cors` without `allow_methods` takes the route's methods).
#[derive(Default)]
pub(super) struct EdgeDefaults {
    pub cors: Option<Value>,
    pub ip_filter: Option<Arc<IpFilter>>,
    pub compression: Option<Arc<Compression>>,
}

fn is_off(value: &Value) -> bool {
    value.as_str() == Some("off")
}

impl Compiler<'_> {
    pub(super) fn edge_defaults(&mut self, root: &serde_json::Map<String, Value>) -> EdgeDefaults {
        let mut defaults = EdgeDefaults::default();
        if let Some(v) = root.get("cors").filter(|v| !v.is_null()) {
            // Checked once here, with the top-level path; compiled per route.
            if is_off(v) || self.cors("cors", v, None).is_some() {
                defaults.cors = Some(v.clone()).filter(|v| !is_off(v));
            }
        }
        if let Some(v) = root.get("ip_filter").filter(|v| !v.is_null() && !is_off(v)) {
            defaults.ip_filter = self.ip_filter("ip_filter", v).map(Arc::new);
        }
        if let Some(v) = root
            .get("compression")
            .filter(|v| !v.is_null() && !is_off(v))
        {
            defaults.compression = self.compression("compression", v).map(Arc::new);
        }
        defaults
    }

    /// A route's `cors`: its own (`path`), else the default.
    pub(super) fn route_cors(
        &mut self,
        path: &str,
        own: Option<&Value>,
        defaults: &EdgeDefaults,
        methods: Option<&MethodSet>,
    ) -> Option<Arc<Cors>> {
        match own {
            Some(v) if is_off(v) => None,
            Some(v) => self.cors(path, v, methods).map(Arc::new),
            None => {
                let v = defaults.cors.as_ref()?;
                self.cors("cors", v, methods).map(Arc::new)
            }
        }
    }

    /// A route's `ip_filter`: its own, else the default.
    pub(super) fn route_ip_filter(
        &mut self,
        path: &str,
        own: Option<&Value>,
        defaults: &EdgeDefaults,
    ) -> Option<Arc<IpFilter>> {
        match own {
            Some(v) if is_off(v) => None,
            Some(v) => self.ip_filter(path, v).map(Arc::new),
            None => defaults.ip_filter.clone(),
        }
    }

    /// A route's `compression`: its own, else the default.
    pub(super) fn route_compression(
        &mut self,
        path: &str,
        own: Option<&Value>,
        defaults: &EdgeDefaults,
    ) -> Option<Arc<Compression>> {
        match own {
            Some(v) if is_off(v) => None,
            Some(v) => self.compression(path, v).map(Arc::new),
            None => defaults.compression.clone(),
        }
    }

    fn compression(&mut self, path: &str, value: &Value) -> Option<Compression> {
        if let Value::String(s) = value {
            self.error(
                path,
                format!("compression must be a mapping or off, not \"{s}\""),
            );
            return None;
        }
        let raw = self.de::<RawCompression>(path, value)?;
        let level = raw.level.unwrap_or(6);
        let mut ok = true;
        // One level for every encoding (Pingora's module): 1-9 is valid
        // for gzip, brotli and zstd alike.
        if !(1..=9).contains(&level) {
            self.error(&key_path(path, "level"), "level must be from 1 to 9");
            ok = false;
        }
        let mut types = Vec::new();
        match &raw.types {
            Some(list) if list.is_empty() => {
                self.error(
                    &key_path(path, "types"),
                    "types must list at least one media type",
                );
                ok = false;
            }
            Some(list) => {
                for (i, t) in list.iter().enumerate() {
                    match TypePattern::parse(t) {
                        Ok(p) => types.push(p),
                        Err(e) => {
                            self.error(&index_path(&key_path(path, "types"), i), e);
                            ok = false;
                        }
                    }
                }
            }
            None => {
                types = DEFAULT_TYPES
                    .iter()
                    .filter_map(|t| TypePattern::parse(t).ok())
                    .collect();
            }
        }
        ok.then(|| Compression {
            min_size: raw.min_size.map_or(1024, |s| s.0),
            types,
            level,
        })
    }

    fn cors(
        &mut self,
        path: &str,
        value: &Value,
        route_methods: Option<&MethodSet>,
    ) -> Option<Cors> {
        if let Value::String(s) = value {
            self.error(path, format!("cors must be a mapping or off, not \"{s}\""));
            return None;
        }
        let raw = self.de::<RawCors>(path, value)?;
        let mut ok = true;
        let opath = key_path(path, "allow_origins");
        let origins = if raw.allow_origins.iter().any(|o| o == "*") {
            if raw.allow_origins.len() > 1 {
                self.error(
                    &opath,
                    "\"*\" admits every origin: list nothing else with it",
                );
                ok = false;
            }
            if raw.allow_credentials {
                self.error(
                    &key_path(path, "allow_credentials"),
                    "allow_credentials cannot go with allow_origins [\"*\"]: any site could then read answers meant for the user; list the origins",
                );
                ok = false;
            }
            Origins::Any
        } else {
            if raw.allow_origins.is_empty() {
                self.error(
                    &opath,
                    "allow_origins must list at least one origin (or \"*\")",
                );
                ok = false;
            }
            let mut patterns = Vec::new();
            for (i, o) in raw.allow_origins.iter().enumerate() {
                match OriginPattern::parse(o) {
                    Ok(p) => patterns.push(p),
                    Err(e) => {
                        self.error(&index_path(&opath, i), e);
                        ok = false;
                    }
                }
            }
            Origins::List(patterns)
        };
        let methods = match (&raw.allow_methods, route_methods) {
            (Some(names), _) => match MethodSet::parse(names) {
                Ok(set) => list_methods(set.iter().cloned().collect()),
                Err(e) => {
                    self.error(&key_path(path, "allow_methods"), e);
                    ok = false;
                    AllowedMethods::Any
                }
            },
            (None, Some(set)) => list_methods(set.iter().cloned().collect()),
            (None, None) => AllowedMethods::Any,
        };
        let names = |cx: &mut Self, key: &str, list: &[String]| -> Option<Vec<HeaderName>> {
            let mut out = Vec::new();
            for (i, n) in list.iter().enumerate() {
                match HeaderName::from_bytes(n.trim().as_bytes()) {
                    Ok(h) => out.push(h),
                    Err(_) => {
                        cx.error(
                            &index_path(&key_path(path, key), i),
                            format!("\"{n}\" is not a valid header name"),
                        );
                        return None;
                    }
                }
            }
            Some(out)
        };
        let allow_headers = names(self, "allow_headers", &raw.allow_headers);
        let expose_headers = names(self, "expose_headers", &raw.expose_headers);
        let (Some(allow_headers), Some(expose_headers)) = (allow_headers, expose_headers) else {
            return None;
        };
        if !ok {
            return None;
        }
        let joined = |names: &[HeaderName]| {
            (!names.is_empty())
                .then(|| {
                    let text: Vec<&str> = names.iter().map(HeaderName::as_str).collect();
                    HeaderValue::from_str(&text.join(", ")).ok()
                })
                .flatten()
        };
        Some(Cors {
            origins,
            methods,
            allow_headers_value: joined(&allow_headers),
            expose_headers: joined(&expose_headers),
            allow_headers,
            allow_credentials: raw.allow_credentials,
            max_age: raw
                .max_age
                .and_then(|d| HeaderValue::from_str(&d.0.as_secs().to_string()).ok()),
        })
    }

    fn ip_filter(&mut self, path: &str, value: &Value) -> Option<IpFilter> {
        if let Value::String(s) = value {
            self.error(
                path,
                format!("ip_filter must be a mapping or off, not \"{s}\""),
            );
            return None;
        }
        let raw = self.de::<RawIpFilter>(path, value)?;
        let mut filter = IpFilter::default();
        let mut ok = true;
        for (key, list, out) in [
            ("allow", &raw.allow, &mut filter.allow),
            ("deny", &raw.deny, &mut filter.deny),
        ] {
            for (i, text) in list.iter().enumerate() {
                match parse_net(text) {
                    Ok(net) => out.push(net),
                    Err(e) => {
                        self.error(&index_path(&key_path(path, key), i), e);
                        ok = false;
                    }
                }
            }
        }
        if ok && filter.allow.is_empty() && filter.deny.is_empty() {
            self.error(path, "ip_filter needs allow or deny (or write off)");
            ok = false;
        }
        ok.then_some(filter)
    }
}

fn list_methods(methods: Vec<Method>) -> AllowedMethods {
    let text: Vec<&str> = methods.iter().map(Method::as_str).collect();
    let value = HeaderValue::from_str(&text.join(", ")).unwrap_or(HeaderValue::from_static("GET"));
    AllowedMethods::List { methods, value }
}
