//! From the parsed document to runtime types. Each section and each list
//! item is read on its own so that every error in the file is reported.

use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ConfigErrors;
use super::raw::*;
use super::source::{index_path, key_path, Document};
use super::{AdminSettings, Config, Listener, ServerSettings, TlsFiles};
use crate::access_log::Sink;
use crate::aggregate::{Aggregate, Part as AggregatePart, PathTemplate};
use crate::auth::jwks::{JwksUrl, RemoteJwks};
use crate::auth::keys::{self, KeySet};
use crate::auth::{KeyStore, Provider, RouteAuth, TokenSource};
use crate::cache::CachePolicy;
use crate::gateway::Runtime;
use crate::metrics::Series;
use crate::ratelimit::{LimitKey, RateLimit};
use crate::respond::StaticResponse;
use crate::route::{Route, Target};
use crate::routing::{
    HostPattern, MethodSet, PathPattern, PathRewrite, RouteMatcher, Router, Segment,
};
use crate::transform::body::ResponseBodyRules;
use crate::transform::headers::{Deprecation, HeaderRules};
use crate::transform::json::{FieldPath, JsonRules};
use crate::upstream::{
    BalanceKind, HashKey, HealthCheckSettings, Upstream, UpstreamSpec, UpstreamTls,
};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

const SECTIONS: &[&str] = &[
    "server",
    "listen",
    "admin",
    "access_log",
    "cache",
    "upstreams",
    "auth",
    "routes",
];

/// Resolves a `host:port` target (the system's resolver, or one a test or
/// fuzz target gives).
pub type Resolve<'a> = &'a dyn Fn(&str) -> std::io::Result<Vec<SocketAddr>>;

/// The system's resolver.
pub fn system_resolve(address: &str) -> std::io::Result<Vec<SocketAddr>> {
    address.to_socket_addrs().map(Iterator::collect)
}

pub(super) fn compile(
    doc: &Document,
    base: &Path,
    previous: Option<&Runtime>,
    resolve: Resolve<'_>,
) -> Result<Config, ConfigErrors> {
    let mut cx = Compiler {
        doc,
        base,
        previous,
        resolve,
        errors: ConfigErrors::default(),
    };
    let empty = serde_json::Map::new();
    let root = match &doc.root {
        Value::Object(map) => map,
        Value::Null => &empty,
        _ => {
            cx.error(
                "",
                "the file must be a mapping of sections (server, listen, routes, ...)",
            );
            return Err(cx.errors);
        }
    };
    for key in root.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            cx.error(
                key,
                format!("unknown section \"{key}\"; known: {}", SECTIONS.join(", ")),
            );
        }
    }
    let server = cx.server(root.get("server"));
    let access_log = cx.access_log(root.get("access_log"));
    let listeners = cx.listeners(root.get("listen"));
    let admin = cx.admin(root.get("admin"), &listeners);
    let upstreams = cx.upstreams(root.get("upstreams"));
    let providers = cx.providers(root.get("auth"));
    let identity_headers: Arc<[HeaderName]> = {
        let mut names: Vec<HeaderName> = providers
            .values()
            .flat_map(|p| p.forward_claims.iter().map(|(_, h)| h.clone()))
            .collect();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        names.into()
    };
    let declared_providers: Vec<String> = match root.get("auth").and_then(|a| a.get("jwt")) {
        Some(Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    };
    let shared = Shared {
        upstreams: &upstreams,
        providers: &providers,
        declared_providers: &declared_providers,
        identity_headers: &identity_headers,
    };
    let declared: Vec<String> = match root.get("upstreams") {
        Some(Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    };
    let routes = cx.routes(root.get("routes"), &shared, &declared, &server);
    let cache_max_size =
        cx.cache_section(root.get("cache"), routes.iter().any(|r| r.cache.is_some()));
    if !cx.errors.is_empty() {
        cx.errors.sort();
        return Err(cx.errors);
    }
    Ok(Config {
        server,
        access_log,
        cache_max_size,
        listeners,
        admin,
        runtime: Runtime {
            router: Router::new(routes.into_iter().map(Arc::new).collect()),
            upstreams,
            providers,
        },
    })
}

/// What routes refer to by name.
struct Shared<'a> {
    upstreams: &'a BTreeMap<String, Arc<Upstream>>,
    providers: &'a BTreeMap<String, Arc<Provider>>,
    /// Every provider named in the file, valid or not.
    declared_providers: &'a [String],
    identity_headers: &'a Arc<[HeaderName]>,
}

struct Compiler<'d> {
    doc: &'d Document,
    base: &'d Path,
    /// The running configuration, on a reload: what did not change is
    /// carried over with its state.
    previous: Option<&'d Runtime>,
    resolve: Resolve<'d>,
    errors: ConfigErrors,
}

impl Compiler<'_> {
    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(self.doc.error(path, message));
    }

    /// Deserializes `value` (found at `path`) into `T`, recording the error
    /// with the exact path serde stopped at.
    fn de<T: DeserializeOwned>(&mut self, path: &str, value: &Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let mut full = path.to_string();
                let inner = e.path().to_string();
                if inner != "." {
                    for segment in inner.split('.') {
                        if segment.starts_with('[') {
                            full.push_str(segment);
                        } else {
                            full = key_path(&full, segment);
                        }
                    }
                }
                let mut message = e.inner().to_string();
                if let Some(field) = unknown_field(&message) {
                    if !full.ends_with(&format!(".{field}")) && full != field {
                        full = key_path(&full, &field);
                    }
                    message = message.replacen("unknown field", "unknown key", 1);
                }
                if full.ends_with(".secret") {
                    message = "the secret must be a string".to_string();
                } else if self.doc.is_from_env(&full) {
                    message = redact_quoted(&message);
                }
                self.errors.push(self.doc.error(full, message));
                None
            }
        }
    }

    /// `access_log: stdout | off | PATH` (default stdout).
    fn access_log(&mut self, value: Option<&Value>) -> Sink {
        match value {
            None | Some(Value::Null) => Sink::Stdout,
            Some(Value::String(s)) if s == "stdout" => Sink::Stdout,
            Some(Value::String(s)) if s == "off" => Sink::Off,
            Some(Value::Bool(false)) => Sink::Off,
            Some(Value::String(s)) if !s.is_empty() => Sink::File(self.resolve_file(s)),
            Some(_) => {
                self.error("access_log", "access_log is stdout, off, or a file path");
                Sink::Off
            }
        }
    }

    /// Names label metrics and logs: letters, digits, `-`, `_` and `.`.
    fn check_name(&mut self, path: &str, kind: &str, name: &str) -> bool {
        if valid_name(name) {
            return true;
        }
        self.error(
            path,
            format!("{kind} name \"{name}\" may hold only letters, digits, '-', '_' and '.'"),
        );
        false
    }

    fn resolve_file(&self, file: &str) -> PathBuf {
        let p = Path::new(file);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn server(&mut self, value: Option<&Value>) -> ServerSettings {
        let mut s = ServerSettings::default();
        let Some(value) = value.filter(|v| !v.is_null()) else {
            return s;
        };
        let Some(raw) = self.de::<RawServer>("server", value) else {
            return s;
        };
        if let Some(t) = raw.threads {
            if t == 0 || t > 1024 {
                self.error("server.threads", "threads must be between 1 and 1024");
            } else {
                s.threads = t;
            }
        }
        if let Some(p) = raw.pid_file {
            s.pid_file = self.resolve_file(&p).display().to_string();
        }
        if let Some(p) = raw.upgrade_sock {
            s.upgrade_sock = self.resolve_file(&p).display().to_string();
        }
        if let Some(d) = raw.grace_period {
            s.grace_period = d.0;
        }
        if let Some(d) = raw.graceful_shutdown_timeout {
            s.graceful_shutdown_timeout = d.0;
        }
        if let Some(b) = raw.max_body {
            s.max_body = b.0;
        }
        if let Some(d) = raw.header_timeout {
            if d.0.is_zero() {
                self.error("server.header_timeout", "header_timeout must be above zero");
            }
            s.header_timeout = d.0;
        }
        if let Some(d) = raw.body_timeout {
            if d.0.is_zero() {
                self.error("server.body_timeout", "body_timeout must be above zero");
            }
            s.body_timeout = d.0;
        }
        if let Some(b) = raw.max_buffered {
            if b.0 < 1 << 20 {
                self.error("server.max_buffered", "max_buffered must be at least 1MiB");
            } else {
                s.max_buffered = b.0;
            }
        }
        match raw.path_params.as_deref() {
            None | Some("reject") => {}
            Some("keep") => s.path_params = crate::config::PathParams::Keep,
            Some(other) => self.error(
                "server.path_params",
                format!("unknown path_params \"{other}\"; use reject or keep"),
            ),
        }
        if let Some(b) = raw.max_header_size {
            if !(1024..=1 << 20).contains(&b.0) {
                self.error(
                    "server.max_header_size",
                    "max_header_size must be between 1KiB and 1MiB",
                );
            } else {
                s.max_header_size = b.0 as usize;
            }
        }
        if let Some(n) = raw.max_headers {
            if !(1..=250).contains(&n) {
                self.error(
                    "server.max_headers",
                    "max_headers must be between 1 and 250",
                );
            } else {
                s.max_headers = n;
            }
        }
        for (i, cidr) in raw.trusted_proxies.iter().enumerate() {
            let parsed = cidr
                .parse::<IpNet>()
                .or_else(|_| cidr.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => s.trusted_proxies.push(net),
                Err(_) => self.error(
                    &index_path("server.trusted_proxies", i),
                    format!("\"{cidr}\" is not an IP address or CIDR range like 10.0.0.0/8"),
                ),
            }
        }
        if let Some(d) = raw.keepalive_timeout {
            s.keepalive_timeout = d.0;
        }
        if let Some(n) = raw.upstream_keepalive_pool_size {
            s.upstream_keepalive_pool_size = n;
        }
        if let Some(w) = raw.work_stealing {
            s.work_stealing = w;
        }
        if let Some(m) = raw.metrics {
            s.metrics = m;
        }
        if let Some(m) = raw.max_transform_size {
            if m.0 > 64 << 20 {
                self.error(
                    "server.max_transform_size",
                    "max_transform_size must be at most 64MiB",
                );
            } else {
                s.max_transform_size = m.0 as usize;
            }
        }
        // A body under a rule holds itself and what it becomes.
        if 2 * s.max_transform_size as u64 > s.max_buffered {
            let at = if raw.max_buffered.is_some() {
                "server.max_buffered"
            } else {
                "server.max_transform_size"
            };
            self.error(
                at,
                format!(
                    "max_buffered ({} bytes) must hold twice max_transform_size ({} bytes)",
                    s.max_buffered, s.max_transform_size
                ),
            );
        }
        s.error_log = raw
            .error_log
            .map(|p| self.resolve_file(&p).display().to_string());
        s.user = raw.user;
        s.group = raw.group;
        s
    }

    fn listeners(&mut self, value: Option<&Value>) -> Vec<Listener> {
        let mut out: Vec<Listener> = Vec::new();
        let items = match value {
            None | Some(Value::Null) => {
                self.error(
                    "listen",
                    "listen must name at least one address, like 0.0.0.0:8080",
                );
                return out;
            }
            Some(Value::Array(items)) => items.as_slice(),
            Some(one @ Value::String(_)) => std::slice::from_ref(one),
            Some(_) => {
                self.error("listen", "listen must be a list of addresses");
                return out;
            }
        };
        if items.is_empty() {
            self.error(
                "listen",
                "listen must name at least one address, like 0.0.0.0:8080",
            );
        }
        for (i, item) in items.iter().enumerate() {
            let path = if matches!(value, Some(Value::Array(_))) {
                index_path("listen", i)
            } else {
                "listen".to_string()
            };
            let (address, tls) = match item {
                Value::String(s) => (s.clone(), None),
                _ => match self.de::<RawListenTls>(&path, item) {
                    Some(raw) => (raw.address, raw.tls),
                    None => continue,
                },
            };
            let Some(addr) = self.socket_addr(&path, &address) else {
                continue;
            };
            if out.iter().any(|l| l.addr == addr) {
                self.error(&path, format!("{addr} is listed twice"));
                continue;
            }
            let tls = tls.and_then(|t| self.tls_files(&key_path(&path, "tls"), &t));
            out.push(Listener { addr, tls });
        }
        out
    }

    fn socket_addr(&mut self, path: &str, address: &str) -> Option<SocketAddr> {
        match address.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    path,
                    format!("\"{address}\" is not an address like 0.0.0.0:8080 or [::1]:8080"),
                );
                None
            }
        }
    }

    /// Checks that the certificate and key can be read and parsed now, so
    /// `-t` catches what would otherwise fail at start.
    fn tls_files(&mut self, path: &str, raw: &RawTls) -> Option<TlsFiles> {
        use pingora_core::tls::{pkey::PKey, x509::X509};
        let cert = self.resolve_file(&raw.cert);
        let key = self.resolve_file(&raw.key);
        let mut ok = true;
        match std::fs::read(&cert) {
            Ok(pem) => {
                if X509::stack_from_pem(&pem).map_or(true, |c| c.is_empty()) {
                    self.error(
                        &key_path(path, "cert"),
                        format!("{} holds no PEM certificate", cert.display()),
                    );
                    ok = false;
                }
            }
            Err(e) => {
                self.error(
                    &key_path(path, "cert"),
                    format!("cannot read {}: {e}", cert.display()),
                );
                ok = false;
            }
        }
        match std::fs::read(&key) {
            // The key's content never appears in a message.
            Ok(pem) => {
                if PKey::private_key_from_pem(&pem).is_err() {
                    self.error(
                        &key_path(path, "key"),
                        format!("{} holds no PEM private key", key.display()),
                    );
                    ok = false;
                }
            }
            Err(e) => {
                self.error(
                    &key_path(path, "key"),
                    format!("cannot read {}: {e}", key.display()),
                );
                ok = false;
            }
        }
        ok.then_some(TlsFiles { cert, key })
    }

    fn admin(&mut self, value: Option<&Value>, listeners: &[Listener]) -> Option<AdminSettings> {
        let value = value.filter(|v| !v.is_null())?;
        let raw = self.de::<RawAdmin>("admin", value)?;
        let listen = self.socket_addr("admin.listen", &raw.listen)?;
        if listeners.iter().any(|l| l.addr.port() == listen.port()) {
            self.error(
                "admin.listen",
                format!(
                    "the admin listener must not share port {} with a public listener",
                    listen.port()
                ),
            );
            return None;
        }
        Some(AdminSettings { listen })
    }

    fn upstreams(&mut self, value: Option<&Value>) -> BTreeMap<String, Arc<Upstream>> {
        let mut out = BTreeMap::new();
        let map = match value {
            None | Some(Value::Null) => return out,
            Some(Value::Object(map)) => map,
            Some(_) => {
                self.error(
                    "upstreams",
                    "upstreams must be a mapping of names to upstreams",
                );
                return out;
            }
        };
        for (name, item) in map {
            let path = key_path("upstreams", name);
            if !self.check_name(&path, "upstream", name) {
                continue;
            }
            let fingerprint = item.to_string();
            let unchanged = self
                .previous
                .and_then(|p| p.upstreams.get(name))
                .filter(|old| old.fingerprint == fingerprint);
            if let Some(old) = unchanged {
                out.insert(name.clone(), Arc::clone(old));
                continue;
            }
            let Some(raw) = self.de::<RawUpstream>(&path, item) else {
                continue;
            };
            if let Some(spec) = self.upstream_spec(&path, name, raw) {
                match Upstream::new(spec) {
                    Ok(mut up) => {
                        up.fingerprint = fingerprint;
                        out.insert(name.clone(), Arc::new(up));
                    }
                    Err(e) => self.error(&path, e),
                }
            }
        }
        out
    }

    fn upstream_spec(&mut self, path: &str, name: &str, raw: RawUpstream) -> Option<UpstreamSpec> {
        let errors_before = self.errors.0.len();
        let mut targets: Vec<(SocketAddr, usize)> = Vec::new();
        let targets_path = key_path(path, "targets");
        if raw.targets.is_empty() {
            self.error(&targets_path, "an upstream needs at least one target");
        }
        for (i, item) in raw.targets.iter().enumerate() {
            let tpath = index_path(&targets_path, i);
            let (address, weight) = match item {
                Value::String(s) => (s.clone(), 1),
                _ => match self.de::<RawTarget>(&tpath, item) {
                    Some(t) => (t.address, t.weight.unwrap_or(1)),
                    None => continue,
                },
            };
            if !(1..=1000).contains(&weight) {
                self.error(
                    &key_path(&tpath, "weight"),
                    "weight must be between 1 and 1000",
                );
                continue;
            }
            let Some(addr) = self.resolve_target(&tpath, &address) else {
                continue;
            };
            if targets.iter().any(|(a, _)| *a == addr) {
                self.error(&tpath, format!("target {addr} is listed twice"));
                continue;
            }
            targets.push((addr, weight));
        }
        let balance = match raw.balance.as_deref() {
            None => BalanceKind::RoundRobin,
            Some(b) => match BalanceKind::parse(b) {
                Some(k) => k,
                None => {
                    self.error(
                        &key_path(path, "balance"),
                        format!(
                            "unknown balance \"{b}\"; known: round_robin, random, consistent_hash, least_connections"
                        ),
                    );
                    BalanceKind::RoundRobin
                }
            },
        };
        let hash_key = match raw.hash_key.as_deref() {
            None => HashKey::ClientIp,
            Some(k) => {
                let kpath = key_path(path, "hash_key");
                if balance != BalanceKind::ConsistentHash {
                    self.error(&kpath, "hash_key applies only to balance: consistent_hash");
                }
                self.hash_key(&kpath, k).unwrap_or(HashKey::ClientIp)
            }
        };
        let tls = if raw.tls {
            let verify = raw.tls_verify.unwrap_or(true);
            let sni = raw.sni.clone().unwrap_or_default();
            if sni.is_empty() && verify {
                self.error(
                    &key_path(path, "sni"),
                    "tls needs an sni naming the targets' certificate (or tls_verify: false)",
                );
            }
            let ca = raw
                .ca_file
                .as_deref()
                .and_then(|f| self.load_ca(&key_path(path, "ca_file"), f));
            Some(UpstreamTls { sni, verify, ca })
        } else {
            for key in ["sni", "tls_verify", "ca_file"] {
                let set = match key {
                    "sni" => raw.sni.is_some(),
                    "tls_verify" => raw.tls_verify.is_some(),
                    _ => raw.ca_file.is_some(),
                };
                if set {
                    self.error(&key_path(path, key), format!("{key} needs tls: true"));
                }
            }
            None
        };
        let health_check = raw
            .health_check
            .and_then(|h| self.health_check(&key_path(path, "health_check"), h));
        let read_timeout = raw.read_timeout.map_or(Duration::from_secs(60), |d| d.0);
        let connect_timeout = raw.connect_timeout.map_or(Duration::from_secs(5), |d| d.0);
        for (key, d) in [
            ("read_timeout", read_timeout),
            ("connect_timeout", connect_timeout),
        ] {
            if d.is_zero() {
                self.error(&key_path(path, key), format!("{key} must be above zero"));
            }
        }
        let retries = raw.retries.unwrap_or(2);
        if retries > 10 {
            self.error(&key_path(path, "retries"), "retries must be at most 10");
        }
        if self.errors.0.len() > errors_before {
            return None;
        }
        Some(UpstreamSpec {
            name: name.to_string(),
            targets,
            balance,
            hash_key,
            connect_timeout,
            read_timeout,
            write_timeout: raw.write_timeout.map_or(read_timeout, |d| d.0),
            idle_timeout: raw.idle_timeout.map(|d| d.0),
            retries,
            tls,
            health_check,
        })
    }

    /// `ip:port`, or `host:port` resolved once now (and at each reload).
    fn resolve_target(&mut self, path: &str, address: &str) -> Option<SocketAddr> {
        if let Ok(a) = address.parse::<SocketAddr>() {
            return Some(a);
        }
        if !address.contains(':') {
            self.error(
                path,
                format!("target \"{address}\" needs a port, like {address}:80"),
            );
            return None;
        }
        match (self.resolve)(address) {
            Ok(addrs) => match addrs.into_iter().next() {
                Some(a) => Some(a),
                None => {
                    self.error(path, format!("target \"{address}\" resolves to no address"));
                    None
                }
            },
            Err(e) => {
                self.error(
                    path,
                    format!("target \"{address}\" cannot be resolved: {e}"),
                );
                None
            }
        }
    }

    fn hash_key(&mut self, path: &str, key: &str) -> Option<HashKey> {
        match HashKey::parse(key, false, "hash_key") {
            Ok(k) => Some(k),
            Err(e) => {
                self.error(path, e);
                None
            }
        }
    }

    fn load_ca(
        &mut self,
        path: &str,
        file: &str,
    ) -> Option<Arc<pingora_core::protocols::tls::CaType>> {
        use pingora_core::tls::x509::X509;
        let resolved = self.resolve_file(file);
        match std::fs::read(&resolved) {
            Ok(pem) => match X509::stack_from_pem(&pem) {
                Ok(certs) if !certs.is_empty() => Some(Arc::new(certs.into_boxed_slice())),
                _ => {
                    self.error(
                        path,
                        format!("{} holds no PEM certificate", resolved.display()),
                    );
                    None
                }
            },
            Err(e) => {
                self.error(path, format!("cannot read {}: {e}", resolved.display()));
                None
            }
        }
    }

    fn health_check(&mut self, path: &str, raw: RawHealthCheck) -> Option<HealthCheckSettings> {
        let mut ok = true;
        if let Some(p) = &raw.path {
            if !p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
                self.error(
                    &key_path(path, "path"),
                    format!("health check path \"{p}\" must start with / and hold no spaces"),
                );
                ok = false;
            }
        }
        let interval = raw.interval.map_or(Duration::from_secs(5), |d| d.0);
        let timeout = raw.timeout.map_or(Duration::from_secs(1), |d| d.0);
        if interval.is_zero() {
            self.error(&key_path(path, "interval"), "interval must be above zero");
            ok = false;
        }
        if timeout.is_zero() {
            self.error(&key_path(path, "timeout"), "timeout must be above zero");
            ok = false;
        }
        let expect_status = raw.expect_status.unwrap_or(200);
        if !(100..=599).contains(&expect_status) {
            self.error(
                &key_path(path, "expect_status"),
                "expect_status must be an HTTP status (100-599)",
            );
            ok = false;
        }
        let healthy_after = raw.healthy_after.unwrap_or(1);
        let unhealthy_after = raw.unhealthy_after.unwrap_or(2);
        for (key, n) in [
            ("healthy_after", healthy_after),
            ("unhealthy_after", unhealthy_after),
        ] {
            if n == 0 {
                self.error(&key_path(path, key), format!("{key} must be at least 1"));
                ok = false;
            }
        }
        if raw.host.is_some() && raw.path.is_none() {
            self.error(
                &key_path(path, "host"),
                "host applies only to HTTP checks (set path)",
            );
            ok = false;
        }
        ok.then_some(HealthCheckSettings {
            path: raw.path,
            host: raw.host,
            interval,
            timeout,
            expect_status,
            healthy_after,
            unhealthy_after,
        })
    }

    fn routes(
        &mut self,
        value: Option<&Value>,
        shared: &Shared<'_>,
        declared: &[String],
        server: &ServerSettings,
    ) -> Vec<Route> {
        let mut out = Vec::new();
        let items = match value {
            None | Some(Value::Null) => return out,
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.error("routes", "routes must be a list");
                return out;
            }
        };
        let mut names: HashSet<String> = HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let path = index_path("routes", i);
            let Some(raw) = self.de::<RawRoute>(&path, item) else {
                continue;
            };
            let npath = key_path(&path, "name");
            if self.check_name(&npath, "route", &raw.name) && !names.insert(raw.name.clone()) {
                self.error(
                    &npath,
                    format!("route name \"{}\" is used by an earlier route", raw.name),
                );
            }
            let scope = {
                use std::hash::{BuildHasher, BuildHasherDefault};
                let hash =
                    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                        .hash_one(item.to_string());
                format!("{}#{hash:016x}", raw.name)
            };
            if let Some(route) = self.route(&path, raw, shared, declared, server, &scope) {
                out.push(route);
            }
        }
        out
    }

    fn route(
        &mut self,
        path: &str,
        raw: RawRoute,
        shared: &Shared<'_>,
        declared: &[String],
        server: &ServerSettings,
        scope: &str,
    ) -> Option<Route> {
        let upstreams = shared.upstreams;
        let errors_before = self.errors.0.len();
        let matcher = self.matcher(&key_path(path, "match"), raw.matcher);
        let target = match (raw.upstream.as_deref(), &raw.aggregate) {
            (Some(_), Some(_)) => {
                self.error(path, "a route has an upstream or an aggregate, not both");
                None
            }
            (None, None) => {
                self.error(path, "a route needs an upstream (or an aggregate)");
                None
            }
            (Some(name), None) => self
                .upstream_ref(&key_path(path, "upstream"), name, upstreams, declared)
                .map(Target::Upstream),
            (None, Some(agg)) => self
                .aggregate(
                    &key_path(path, "aggregate"),
                    agg,
                    matcher.as_ref(),
                    raw.auth.is_some(),
                    upstreams,
                    declared,
                )
                .map(Target::Aggregate),
        };
        for (key, value) in [
            ("strip_prefix", &raw.strip_prefix),
            ("add_prefix", &raw.add_prefix),
        ] {
            if let Some(v) = value {
                if !v.starts_with('/') || v.contains(['?', '#', ' ']) {
                    self.error(
                        &key_path(path, key),
                        format!("{key} \"{v}\" must be a path starting with /"),
                    );
                }
            }
        }
        let request_headers =
            self.header_rules(&key_path(path, "request_headers"), raw.request_headers);
        // Identity headers carry verified claims only: no rule may write one.
        let written = request_headers
            .rename
            .iter()
            .map(|(_, to)| to)
            .chain(request_headers.set.iter().map(|(n, _)| n))
            .chain(request_headers.add.iter().map(|(n, _)| n));
        for name in written {
            if shared.identity_headers.contains(name) {
                self.error(
                    &key_path(path, "request_headers"),
                    format!("{name} carries verified claims (forward_claims); a header rule cannot write it"),
                );
            }
        }
        let response_headers =
            self.header_rules(&key_path(path, "response_headers"), raw.response_headers);
        let deprecation = raw.deprecation.and_then(|d| {
            match Deprecation::new(d.sunset.as_deref(), d.link.as_deref()) {
                Ok(dep) => Some(dep),
                Err(e) => {
                    self.error(&key_path(path, "deprecation"), e);
                    None
                }
            }
        });
        let fallback = raw
            .fallback
            .and_then(|f| self.fallback(&key_path(path, "fallback"), f));
        let request_body = raw
            .request_body
            .as_ref()
            .and_then(|v| self.body_rules(&key_path(path, "request_body"), v, false))
            .map(|(json, _)| json);
        let response_body = raw
            .response_body
            .as_ref()
            .and_then(|v| self.body_rules(&key_path(path, "response_body"), v, true))
            .map(|(json, xml_to_json)| ResponseBodyRules { json, xml_to_json });
        let cache = raw
            .cache
            .as_ref()
            .and_then(|c| self.route_cache(&key_path(path, "cache"), c, scope));
        let auth = raw
            .auth
            .as_ref()
            .and_then(|a| self.route_auth(&key_path(path, "auth"), a, shared));
        let rate_limit = raw.rate_limit.as_ref().and_then(|r| {
            // Budgets of a route whose limit did not change survive a reload.
            let fingerprint = format!("{}\n{r}", raw.name);
            let unchanged = self.previous.and_then(|p| {
                p.router
                    .routes()
                    .iter()
                    .filter_map(|route| route.rate_limit.as_ref())
                    .find(|l| l.fingerprint == fingerprint)
                    .cloned()
            });
            unchanged.or_else(|| self.rate_limit(&key_path(path, "rate_limit"), r, fingerprint))
        });
        if let Some(t) = raw.timeout {
            if t.0.is_zero() {
                self.error(&key_path(path, "timeout"), "timeout must be above zero");
            }
        }
        if self.errors.0.len() > errors_before {
            return None;
        }
        Some(Route {
            name: raw.name.into(),
            matcher: matcher?,
            target: target?,
            rewrite: PathRewrite {
                strip_prefix: raw
                    .strip_prefix
                    .map(|p| p.trim_end_matches('/').to_string())
                    .filter(|p| !p.is_empty()),
                add_prefix: raw.add_prefix,
            },
            timeout: raw.timeout.map(|d| d.0),
            max_body: raw.max_body.map_or(server.max_body, |s| s.0),
            request_headers,
            response_headers,
            deprecation,
            fallback,
            auth,
            rate_limit,
            identity_headers: Arc::clone(shared.identity_headers),
            request_body,
            response_body,
            cache,
            duration_series: Series::default(),
        })
    }

    /// An upstream named by a route or an aggregate part.
    fn upstream_ref(
        &mut self,
        path: &str,
        name: &str,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        declared: &[String],
    ) -> Option<Arc<Upstream>> {
        if let Some(up) = upstreams.get(name) {
            return Some(Arc::clone(up));
        }
        // Declared but invalid: its own errors are already reported.
        if declared.iter().any(|d| d == name) {
            return None;
        }
        let known = known_names(declared, "none are defined");
        self.error(path, format!("unknown upstream \"{name}\"; {known}"));
        None
    }

    fn aggregate(
        &mut self,
        path: &str,
        value: &Value,
        matcher: Option<&RouteMatcher>,
        has_auth: bool,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        declared: &[String],
    ) -> Option<Aggregate> {
        let raw = self.de::<RawAggregate>(path, value)?;
        let before = self.errors.0.len();
        let timeout = raw.timeout.map_or(Duration::from_secs(10), |d| d.0);
        if timeout.is_zero() {
            self.error(&key_path(path, "timeout"), "timeout must be above zero");
        }
        if raw.parts.is_empty() {
            self.error(
                &key_path(path, "parts"),
                "an aggregate needs at least one part",
            );
        }
        // The parameters the route's path binds.
        let params: Vec<String> = match matcher.map(|m| &m.path) {
            Some(PathPattern::Exact(segments)) => segments
                .iter()
                .filter_map(|s| match s {
                    Segment::Param(n) => Some(n.clone()),
                    Segment::Literal(_) => None,
                })
                .collect(),
            Some(PathPattern::Regex(re)) => {
                re.capture_names().flatten().map(str::to_string).collect()
            }
            _ => Vec::new(),
        };
        let mut parts = Vec::new();
        let mut keys = HashSet::new();
        for (i, part) in raw.parts.into_iter().enumerate() {
            let ppath = index_path(&key_path(path, "parts"), i);
            if part.key.is_empty() || !keys.insert(part.key.clone()) {
                self.error(
                    &key_path(&ppath, "key"),
                    format!("part key \"{}\" is empty or used twice", part.key),
                );
            }
            let template = match PathTemplate::parse(&part.path) {
                Ok(t) => t,
                Err(e) => {
                    self.error(&key_path(&ppath, "path"), e);
                    continue;
                }
            };
            for p in template.params() {
                if !params.iter().any(|n| n == p) {
                    self.error(
                        &key_path(&ppath, "path"),
                        format!("{{{p}}} is not a parameter of the route's path"),
                    );
                }
            }
            if template.needs_claims() && !has_auth {
                self.error(
                    &key_path(&ppath, "path"),
                    "{claim.NAME} needs auth on the route",
                );
            }
            let Some(upstream) = self.upstream_ref(
                &key_path(&ppath, "upstream"),
                &part.upstream,
                upstreams,
                declared,
            ) else {
                continue;
            };
            parts.push(AggregatePart {
                key: part.key,
                upstream,
                path: template,
                required: part.required.unwrap_or(true),
            });
        }
        (self.errors.0.len() == before).then_some(Aggregate { timeout, parts })
    }

    fn route_cache(&mut self, path: &str, value: &Value, scope: &str) -> Option<CachePolicy> {
        let raw = self.de::<RawRouteCache>(path, value)?;
        if raw.ttl.0.is_zero() {
            self.error(&key_path(path, "ttl"), "ttl must be above zero");
            return None;
        }
        let mut vary = Vec::new();
        for (i, name) in raw.vary.iter().enumerate() {
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => vary.push(h),
                Err(_) => self.error(
                    &index_path(&key_path(path, "vary"), i),
                    format!("\"{name}\" is not a valid header name"),
                ),
            }
        }
        Some(CachePolicy {
            ttl: raw.ttl.0,
            vary,
            scope: scope.to_string(),
        })
    }

    /// `cache.max_size`, needed only when a route caches.
    fn cache_section(&mut self, value: Option<&Value>, used: bool) -> Option<u64> {
        let raw = match value.filter(|v| !v.is_null()) {
            Some(v) => self.de::<RawCacheGlobal>("cache", v)?,
            None => RawCacheGlobal::default(),
        };
        let size = raw.max_size.map_or(256 << 20, |s| s.0);
        if size < 1 << 20 {
            self.error("cache.max_size", "max_size must be at least 1MiB");
            return None;
        }
        used.then_some(size)
    }

    /// A body rule block; `None` when it is empty or invalid.
    fn body_rules(
        &mut self,
        path: &str,
        value: &Value,
        response: bool,
    ) -> Option<(JsonRules, bool)> {
        let raw = self.de::<RawBodyRules>(path, value)?;
        if raw.xml_to_json && !response {
            self.error(
                &key_path(path, "xml_to_json"),
                "xml_to_json applies to response_body only",
            );
            return None;
        }
        let mut remove = Vec::new();
        let mut rename = Vec::new();
        for (i, field) in raw.remove_fields.iter().enumerate() {
            match FieldPath::parse(field) {
                Ok(p) => remove.push(p),
                Err(e) => self.error(&index_path(&key_path(path, "remove_fields"), i), e),
            }
        }
        for (from, to) in &raw.rename_fields {
            let rpath = key_path(&key_path(path, "rename_fields"), from);
            if to.is_empty() || to.contains(['.', '[', ']']) {
                self.error(
                    &rpath,
                    format!("the new name \"{to}\" must be a plain field name"),
                );
                continue;
            }
            match FieldPath::parse(from) {
                Ok(p) => rename.push((p, to.clone())),
                Err(e) => self.error(&rpath, e),
            }
        }
        let rules = JsonRules::new(remove, rename);
        if rules.is_empty() && !raw.xml_to_json {
            return None;
        }
        Some((rules, raw.xml_to_json))
    }

    fn route_auth(&mut self, path: &str, value: &Value, shared: &Shared<'_>) -> Option<RouteAuth> {
        let raw = match value {
            Value::String(name) => RawRouteAuth {
                jwt: name.clone(),
                require_claims: BTreeMap::new(),
                require_scopes: Vec::new(),
            },
            _ => self.de::<RawRouteAuth>(path, value)?,
        };
        let name_path = if value.is_string() {
            path.to_string()
        } else {
            key_path(path, "jwt")
        };
        let Some(provider) = shared.providers.get(&raw.jwt) else {
            // Declared but invalid: its own errors are already reported.
            if shared.declared_providers.contains(&raw.jwt) {
                return None;
            }
            let known = known_names(
                shared.declared_providers.iter(),
                "none are defined under auth.jwt",
            );
            self.error(
                &name_path,
                format!("unknown auth provider \"{}\"; {known}", raw.jwt),
            );
            return None;
        };
        let mut require_claims = Vec::new();
        for (claim, accepted) in raw.require_claims {
            let cpath = key_path(&key_path(path, "require_claims"), &claim);
            let values = match accepted {
                Value::Array(items) => items,
                v => vec![v],
            };
            if values.is_empty()
                || values
                    .iter()
                    .any(|v| v.is_array() || v.is_object() || v.is_null())
            {
                self.error(
                    &cpath,
                    "list the accepted values: strings, numbers or booleans",
                );
                continue;
            }
            require_claims.push((claim, values));
        }
        if raw
            .require_scopes
            .iter()
            .any(|s| s.is_empty() || s.contains(' '))
        {
            self.error(
                &key_path(path, "require_scopes"),
                "a scope is one word without spaces",
            );
        }
        Some(RouteAuth {
            provider: Arc::clone(provider),
            require_claims,
            require_scopes: raw.require_scopes,
        })
    }

    fn rate_limit(
        &mut self,
        path: &str,
        value: &Value,
        fingerprint: String,
    ) -> Option<Arc<RateLimit>> {
        let raw = self.de::<RawRateLimit>(path, value)?;
        if raw.requests == 0 {
            self.error(&key_path(path, "requests"), "requests must be at least 1");
            return None;
        }
        if raw.per.0 < Duration::from_millis(100) {
            self.error(&key_path(path, "per"), "per must be at least 100ms");
            return None;
        }
        let key = match raw.key.as_deref() {
            None => LimitKey::ClientIp,
            Some(k) => match LimitKey::parse(k, true, "rate limit key") {
                Ok(k) => k,
                Err(e) => {
                    self.error(&key_path(path, "key"), e);
                    return None;
                }
            },
        };
        let mut limit = RateLimit::new(raw.requests, raw.per.0, key);
        limit.fingerprint = fingerprint;
        Some(Arc::new(limit))
    }

    fn providers(&mut self, value: Option<&Value>) -> BTreeMap<String, Arc<Provider>> {
        let mut out = BTreeMap::new();
        let Some(value) = value.filter(|v| !v.is_null()) else {
            return out;
        };
        let Some(raw) = self.de::<RawAuth>("auth", value) else {
            return out;
        };
        for (name, item) in &raw.jwt {
            let path = key_path("auth.jwt", name);
            if !self.check_name(&path, "provider", name) {
                continue;
            }
            // A provider fetching its keys keeps them (and its verified
            // tokens) while its configuration does not change.
            let fingerprint = item.to_string();
            let unchanged = self
                .previous
                .and_then(|p| p.providers.get(name))
                .filter(|old| old.remote_jwks().is_some() && old.fingerprint == fingerprint);
            if let Some(old) = unchanged {
                out.insert(name.clone(), Arc::clone(old));
                continue;
            }
            let Some(raw) = self.de::<RawJwtProvider>(&path, item) else {
                continue;
            };
            if let Some(mut p) = self.provider(&path, name, raw) {
                p.fingerprint = fingerprint;
                out.insert(name.clone(), Arc::new(p));
            }
        }
        out
    }

    fn provider(&mut self, path: &str, name: &str, raw: RawJwtProvider) -> Option<Provider> {
        let before = self.errors.0.len();
        let apath = key_path(path, "algorithms");
        let mut algorithms: Vec<Algorithm> = Vec::new();
        if raw.algorithms.is_empty() {
            self.error(&apath, "list the accepted algorithms, like [RS256]");
        }
        for (i, a) in raw.algorithms.iter().enumerate() {
            match a.parse::<Algorithm>() {
                Ok(alg) if !algorithms.contains(&alg) => algorithms.push(alg),
                Ok(_) => {}
                Err(_) => self.error(
                    &index_path(&apath, i),
                    format!("unknown algorithm \"{a}\"; supported: HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"),
                ),
            }
        }
        let families: Vec<AlgorithmFamily> = {
            let mut f: Vec<AlgorithmFamily> = algorithms.iter().map(|a| a.family()).collect();
            f.dedup();
            f
        };
        let sources = [
            raw.secret.is_some(),
            raw.public_key_file.is_some(),
            raw.jwks_file.is_some(),
            raw.jwks_url.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            self.error(
                path,
                "give exactly one of secret, public_key_file, jwks_file or jwks_url",
            );
            return None;
        }
        if raw.jwks_refresh.is_some() && raw.jwks_url.is_none() {
            self.error(
                &key_path(path, "jwks_refresh"),
                "jwks_refresh applies only to jwks_url",
            );
        }
        let keys = if let Some(secret) = &raw.secret {
            let spath = key_path(path, "secret");
            if families.iter().any(|f| *f != AlgorithmFamily::Hmac) {
                self.error(
                    &apath,
                    "a secret verifies only HS256, HS384 and HS512 tokens",
                );
            }
            // The secret's content never appears in a message; its length may.
            for alg in &algorithms {
                let need = keys::min_secret_len(*alg);
                if secret.len() < need {
                    self.error(
                        &spath,
                        format!(
                            "{alg:?} needs a secret of at least {need} bytes; this one has {}",
                            secret.len()
                        ),
                    );
                }
            }
            KeyStore::Fixed(KeySet::new(vec![keys::VerifyKey {
                kid: None,
                alg: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
            }]))
        } else if let Some(file) = &raw.public_key_file {
            let fpath = key_path(path, "public_key_file");
            if families.len() != 1 || families[0] == AlgorithmFamily::Hmac {
                self.error(&apath, "a public_key_file holds one key: list algorithms of one family (RS/PS, ES or EdDSA)");
                return None;
            }
            let resolved = self.resolve_file(file);
            let pem = match std::fs::read(&resolved) {
                Ok(p) => p,
                Err(e) => {
                    self.error(&fpath, format!("cannot read {}: {e}", resolved.display()));
                    return None;
                }
            };
            match keys::from_pem(&pem, families[0]) {
                Ok(key) => KeyStore::Fixed(KeySet::new(vec![keys::VerifyKey {
                    kid: None,
                    alg: None,
                    key,
                }])),
                Err(e) => {
                    self.error(&fpath, format!("{}: {e}", resolved.display()));
                    return None;
                }
            }
        } else if let Some(file) = &raw.jwks_file {
            let fpath = key_path(path, "jwks_file");
            let resolved = self.resolve_file(file);
            let json = match std::fs::read(&resolved) {
                Ok(j) => j,
                Err(e) => {
                    self.error(&fpath, format!("cannot read {}: {e}", resolved.display()));
                    return None;
                }
            };
            match KeySet::from_jwks(&json, &algorithms) {
                Ok(set) => KeyStore::Fixed(set),
                Err(e) => {
                    self.error(&fpath, format!("{}: {e}", resolved.display()));
                    return None;
                }
            }
        } else {
            let url = raw.jwks_url.as_deref().unwrap_or_default();
            let upath = key_path(path, "jwks_url");
            let parsed = match JwksUrl::parse(url) {
                Ok(u) => u,
                Err(e) => {
                    self.error(&upath, e);
                    return None;
                }
            };
            let refresh = raw.jwks_refresh.map_or(Duration::from_secs(600), |d| d.0);
            if refresh < Duration::from_secs(1) {
                self.error(
                    &key_path(path, "jwks_refresh"),
                    "jwks_refresh must be at least 1s",
                );
            }
            KeyStore::Remote(Arc::new(RemoteJwks::new(
                parsed,
                algorithms.clone(),
                refresh,
            )))
        };
        let audience = raw.audience.map(OneOrMany::into_vec).unwrap_or_default();
        if audience.iter().any(String::is_empty) {
            self.error(&key_path(path, "audience"), "an audience cannot be empty");
        }
        if raw.issuer.as_deref() == Some("") {
            self.error(&key_path(path, "issuer"), "the issuer cannot be empty");
        }
        let leeway = raw.leeway.map_or(Duration::from_secs(30), |d| d.0);
        if leeway > Duration::from_secs(300) {
            self.error(&key_path(path, "leeway"), "leeway must be at most 5m");
        }
        let token_from = match raw.token_from.as_deref() {
            None => TokenSource::Header,
            Some(t) => match TokenSource::parse(t) {
                Ok(t) => t,
                Err(e) => {
                    self.error(&key_path(path, "token_from"), e);
                    TokenSource::Header
                }
            },
        };
        let mut forward_claims = Vec::new();
        for (claim, header) in &raw.forward_claims {
            let cpath = key_path(&key_path(path, "forward_claims"), claim);
            match HeaderName::from_bytes(header.as_bytes()) {
                Ok(h) if !RESERVED_HEADERS.contains(&h.as_str()) => {
                    forward_claims.push((claim.clone(), h))
                }
                Ok(_) => self.error(&cpath, format!("{header} cannot carry a claim")),
                Err(_) => self.error(&cpath, format!("\"{header}\" is not a valid header name")),
            }
        }
        if self.errors.0.len() > before {
            return None;
        }
        Some(Provider::new(
            name.to_string(),
            algorithms,
            keys,
            raw.issuer,
            audience,
            leeway,
            token_from,
            forward_claims,
        ))
    }

    fn matcher(&mut self, path: &str, raw: RawMatch) -> Option<RouteMatcher> {
        let given = [
            raw.path.is_some(),
            raw.path_prefix.is_some(),
            raw.path_regex.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            self.error(
                path,
                "a route matches exactly one of path, path_prefix or path_regex",
            );
            return None;
        }
        let pattern = if let Some(p) = &raw.path {
            PathPattern::exact(p).map_err(|e| (key_path(path, "path"), e))
        } else if let Some(p) = &raw.path_prefix {
            PathPattern::prefix(p).map_err(|e| (key_path(path, "path_prefix"), e))
        } else {
            let source = raw.path_regex.as_deref().unwrap_or_default();
            PathPattern::regex(source).map_err(|e| (key_path(path, "path_regex"), e))
        };
        let pattern = match pattern {
            Ok(p) => Some(p),
            Err((p, e)) => {
                self.error(&p, e);
                None
            }
        };
        let methods = match &raw.methods {
            None => None,
            Some(list) => match MethodSet::parse(list) {
                Ok(m) => Some(m),
                Err(e) => {
                    self.error(&key_path(path, "methods"), e);
                    return None;
                }
            },
        };
        let host = match &raw.host {
            None => None,
            Some(h) => match HostPattern::parse(h) {
                Ok(h) => Some(h),
                Err(e) => {
                    self.error(&key_path(path, "host"), e);
                    return None;
                }
            },
        };
        let mut headers = Vec::new();
        for (name, value) in raw.headers.unwrap_or_default() {
            let hpath = key_path(&key_path(path, "headers"), &name);
            match (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                (Ok(n), Ok(v)) => headers.push((n, v)),
                (Err(_), _) => self.error(&hpath, format!("\"{name}\" is not a valid header name")),
                (_, Err(_)) => self.error(&hpath, "the value is not a valid header value"),
            }
        }
        Some(RouteMatcher {
            path: pattern?,
            methods,
            host,
            headers,
        })
    }

    fn header_rules(&mut self, path: &str, raw: Option<RawHeaderRules>) -> HeaderRules {
        let mut rules = HeaderRules::default();
        let Some(raw) = raw else {
            return rules;
        };
        let name = |cx: &mut Self, p: &str, n: &str| -> Option<HeaderName> {
            match HeaderName::from_bytes(n.as_bytes()) {
                Ok(h) => Some(h),
                Err(_) => {
                    cx.error(p, format!("\"{n}\" is not a valid header name"));
                    None
                }
            }
        };
        for (i, n) in raw.remove.iter().enumerate() {
            if let Some(h) = name(self, &index_path(&key_path(path, "remove"), i), n) {
                rules.remove.push(h);
            }
        }
        // Framing and connection fields belong to each hop and the gateway
        // writes them itself: a rule that wrote one could frame a body twice
        // (`Transfer-Encoding` next to `Content-Length`), and one that
        // renamed one would pass a hop's field on under another name.
        let framing = |cx: &mut Self, p: &str, h: &HeaderName| {
            let is_framing = FRAMING_HEADERS.contains(&h.as_str());
            if is_framing {
                cx.error(
                    p,
                    format!("{h} frames the message or the connection; the gateway sets it and a header rule cannot write or rename it"),
                );
            }
            !is_framing
        };
        for (from, to) in &raw.rename {
            let p = key_path(&key_path(path, "rename"), from);
            if let (Some(f), Some(t)) = (name(self, &p, from), name(self, &p, to)) {
                // Both checked, so both are reported.
                let (from_ok, to_ok) = (framing(self, &p, &f), framing(self, &p, &t));
                if from_ok && to_ok {
                    rules.rename.push((f, t));
                }
            }
        }
        for (key, map) in [("set", &raw.set), ("add", &raw.add)] {
            for (n, v) in map {
                let p = key_path(&key_path(path, key), n);
                let Some(h) = name(self, &p, n) else { continue };
                if !framing(self, &p, &h) {
                    continue;
                }
                match HeaderValue::from_str(v) {
                    Ok(value) if key == "set" => rules.set.push((h, value)),
                    Ok(value) => rules.add.push((h, value)),
                    Err(_) => self.error(&p, "the value is not a valid header value"),
                }
            }
        }
        rules
    }

    fn fallback(&mut self, path: &str, raw: RawFallback) -> Option<StaticResponse> {
        let status = match StatusCode::from_u16(raw.status) {
            Ok(s) if (200..=599).contains(&raw.status) && !matches!(raw.status, 204 | 304) => s,
            _ => {
                self.error(
                    &key_path(path, "status"),
                    "status must be an HTTP status between 200 and 599 that carries a body (not 204 or 304)",
                );
                return None;
            }
        };
        let content_type = raw
            .content_type
            .as_deref()
            .unwrap_or("text/plain; charset=utf-8");
        let Ok(content_type) = HeaderValue::from_str(content_type) else {
            self.error(
                &key_path(path, "content_type"),
                "content_type is not a valid header value",
            );
            return None;
        };
        Some(StaticResponse {
            status,
            content_type,
            body: Bytes::from(raw.body),
        })
    }
}

/// Fields that frame a message or describe one connection.
const FRAMING_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers that frame or route a request; a claim never replaces them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "authorization",
    "cookie",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// "known: a, b" (sorted), or `none` when there are no names.
fn known_names<'a>(names: impl IntoIterator<Item = &'a String>, none: &str) -> String {
    let mut known: Vec<&str> = names.into_iter().map(String::as_str).collect();
    if known.is_empty() {
        return none.to_string();
    }
    known.sort_unstable();
    format!("known: {}", known.join(", "))
}

/// The field named by serde's "unknown field `x`, expected ..." message.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// Hides quoted text, which may be a value taken from the environment.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for c in message.chars() {
        if c == '"' {
            if inside {
                out.push_str("(hidden)\"");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{load_str, ConfigErrors};
    use std::path::Path;

    fn env(name: &str) -> Option<String> {
        (name == "SECRET").then(|| "s3cr3t-value".to_string())
    }

    fn errors(yaml: &str) -> ConfigErrors {
        match load_str(yaml, Path::new("."), &env) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e,
        }
    }

    const BASE: &str =
        "listen: [127.0.0.1:8080]\nupstreams:\n  users:\n    targets: [127.0.0.1:9001]\n";

    #[test]
    fn a_minimal_file_compiles() {
        let yaml = format!(
            "{BASE}routes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: users\n"
        );
        let config = load_str(&yaml, Path::new("."), &env).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.runtime.router.routes().len(), 1);
        assert_eq!(config.listeners[0].addr.port(), 8080);
    }

    #[test]
    fn header_rules_cannot_write_framing_fields() {
        let yaml = format!(
            "{BASE}routes:\n  - name: r\n    match: {{ path: /x }}\n    upstream: users\n    request_headers:\n      set: {{ Transfer-Encoding: chunked, X-Ok: \"1\" }}\n      rename: {{ TE: Trailer }}\n    response_headers:\n      rename: {{ Connection: X-Was-Connection }}\n      add: {{ Content-Length: \"5\" }}\n      remove: [Connection]\n"
        );
        let e = errors(&yaml);
        let found: Vec<(&str, &str)> = e
            .iter()
            .map(|e| (e.path.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(found.len(), 5, "{e}");
        for (path, name) in [
            (
                "routes[0].request_headers.set.Transfer-Encoding",
                "transfer-encoding",
            ),
            ("routes[0].request_headers.rename.TE", "te"),
            ("routes[0].request_headers.rename.TE", "trailer"),
            ("routes[0].response_headers.rename.Connection", "connection"),
            (
                "routes[0].response_headers.add.Content-Length",
                "content-length",
            ),
        ] {
            assert!(
                found
                    .iter()
                    .any(|(p, m)| *p == path && m.starts_with(&format!("{name} frames"))),
                "{path}: {e}"
            );
        }
    }

    #[test]
    fn unknown_upstream_names_the_known_ones() {
        let yaml = format!("{BASE}  orders:\n    targets: [127.0.0.1:9002]\nroutes:\n  - name: r\n    match: {{ path: /x }}\n    upstream: userz\n");
        let e = errors(&yaml);
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].path, "routes[0].upstream");
        assert_eq!(
            e.0[0].message,
            "unknown upstream \"userz\"; known: orders, users"
        );
        assert_eq!(e.0[0].position.unwrap().line, 10);
    }

    #[test]
    fn every_error_is_collected_with_its_place() {
        let yaml = concat!(
            "listen: [127.0.0.1:8080]\n",
            "server:\n  max_body: 10 furlongs\n",
            "upstreams:\n  users:\n    targets: [127.0.0.1:9001]\n    read_timeout: 5\n",
            "routes:\n",
            "  - name: a\n    match: { path_regex: \"^/(\" }\n    upstream: users\n",
            "  - name: a\n    match: { path: /x, pathx: 1 }\n    upstream: users\n",
            "  - name: b\n    match: { path: /y }\n    upstream: users\n    colour: blue\n",
        );
        let e = errors(yaml);
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server.max_body",
                "upstreams.users.read_timeout",
                "routes[0].match.path_regex",
                "routes[1].match.pathx",
                "routes[2].colour",
            ],
            "{e}"
        );
        assert!(e.0[0].message.contains("invalid size"), "{e}");
        assert!(e.0[1].message.contains("has no unit"), "{e}");
        assert!(e.0[3].message.starts_with("unknown key `pathx`"), "{e}");
        assert_eq!(e.0[4].position.unwrap().line, 18);
    }

    #[test]
    fn duplicate_route_names_and_unset_env() {
        let yaml = format!("{BASE}  x: {{ targets: [\"${{NOPE}}\"] }}\nroutes:\n  - name: r\n    match: {{ path: /a }}\n    upstream: users\n  - name: r\n    match: {{ path: /b }}\n    upstream: users\n");
        let e = errors(&yaml);
        // The env error stops the parse before compile.
        assert_eq!(e.0[0].path, "upstreams.x.targets[0]");
        assert!(e.0[0].message.contains("NOPE is not set"));
        let yaml = format!("{BASE}routes:\n  - name: r\n    match: {{ path: /a }}\n    upstream: users\n  - name: r\n    match: {{ path: /b }}\n    upstream: users\n");
        let e = errors(&yaml);
        assert_eq!(e.0[0].path, "routes[1].name");
        assert!(e.0[0].message.contains("used by an earlier route"));
    }

    #[test]
    fn secrets_from_the_environment_never_appear_in_errors() {
        let yaml = format!("{BASE}server:\n  threads: \"${{SECRET}}\"\n");
        let e = errors(&yaml);
        let text = e.to_string();
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("server.threads"), "{text}");
    }

    #[test]
    fn access_log_targets() {
        use crate::access_log::Sink;
        let cfg = |v: &str| {
            load_str(
                &format!("{BASE}access_log: {v}\n"),
                Path::new("/etc/gh"),
                &env,
            )
        };
        assert_eq!(cfg("stdout").map(|c| c.access_log).ok(), Some(Sink::Stdout));
        assert_eq!(cfg("off").map(|c| c.access_log).ok(), Some(Sink::Off));
        assert_eq!(
            cfg("logs/access.log").map(|c| c.access_log).ok(),
            Some(Sink::File("/etc/gh/logs/access.log".into()))
        );
        assert!(cfg("[1, 2]").is_err());
    }
}
