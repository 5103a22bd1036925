//! From the parsed document to runtime types. Each section and each list
//! item is read on its own so that every error in the file is reported.
//! One file per section; what they share (the error list, serde with
//! paths, names, files, carrying state over a reload) is here.

mod api_keys;
mod carry;
mod cluster;
mod edge;
mod policies;
mod providers;
mod routes;
mod server;
mod tls;
mod traffic;
mod upstreams;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::header::HeaderName;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ConfigErrors;
use super::source::{key_path, Document};
use super::Config;
use crate::gateway::{Carried, Runtime};
use crate::routing::Router;
use crate::upstream::Upstream;

const SECTIONS: &[&str] = &[
    "server",
    "listen",
    "admin",
    "access_log",
    "cache",
    "cluster",
    "cors",
    "ip_filter",
    "compression",
    "tracing",
    "upstreams",
    "auth",
    "routes",
];

/// Resolves a `host:port` target with `server.resolver` (hickory, see
/// `upstream::dns`), or as a test or fuzz target says.
pub type Resolve<'a> = &'a dyn Fn(Option<SocketAddr>, &str) -> std::io::Result<Vec<SocketAddr>>;

/// The gateway's resolver: `server` (`server.resolver`) or the system's
/// configuration.
pub fn system_resolve(
    server: Option<SocketAddr>,
    address: &str,
) -> std::io::Result<Vec<SocketAddr>> {
    crate::upstream::dns::resolve_blocking(server, address)
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
        previous: previous.map(|p| &p.carried),
        resolve,
        resolver: None,
        errors: ConfigErrors::default(),
        carried: Carried::default(),
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
    let tracing = cx.tracing(root.get("tracing"));
    let (listeners, certificates) = cx.listeners(root.get("listen"));
    let admin = cx.admin(root.get("admin"), &listeners);
    let upstreams = cx.upstreams(root.get("upstreams"));
    let auth = cx.providers(root.get("auth"));
    let identity_headers: Arc<[HeaderName]> = {
        let mut names: Vec<HeaderName> = auth
            .jwt
            .values()
            .flat_map(|p| p.forward_claims.iter().map(|(_, h)| h.clone()))
            .chain(
                auth.api_keys
                    .values()
                    .filter_map(|k| k.forward_consumer.clone()),
            )
            .collect();
        // Said by the gateway of a verified client certificate only: a
        // client's own values never pass, on any listener.
        names.extend([
            crate::tls::CLIENT_CERT_SUBJECT,
            crate::tls::CLIENT_CERT_SHA256,
        ]);
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        names.into()
    };
    let cluster = cx.cluster(root.get("cluster"));
    let edge = cx.edge_defaults(root);
    let shared = Shared {
        cluster: cluster.as_ref(),
        edge: &edge,
        upstreams: &upstreams,
        auth: &auth,
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
        tracing,
        runtime: Runtime {
            router: Router::new(routes.into_iter().map(Arc::new).collect()),
            upstreams,
            providers: auth.jwt,
            cluster: cluster.map(|c| c.cluster),
            certificates,
            carried: cx.carried,
        },
    })
}

/// What routes refer to by name.
struct Shared<'a> {
    cluster: Option<&'a cluster::ClusterSection>,
    /// The top-level `cors` and `ip_filter`.
    edge: &'a edge::EdgeDefaults,
    upstreams: &'a BTreeMap<String, Arc<Upstream>>,
    auth: &'a providers::Providers,
    identity_headers: &'a Arc<[HeaderName]>,
}

struct Compiler<'d> {
    doc: &'d Document,
    base: &'d Path,
    /// On a reload, what the running configuration built: what did not
    /// change is carried over with its state.
    previous: Option<&'d Carried>,
    /// What this configuration built, for the next reload.
    carried: Carried,
    resolve: Resolve<'d>,
    /// `server.resolver`, once `server` is compiled.
    resolver: Option<SocketAddr>,
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

    /// The file named at `path` (relative to the configuration's folder),
    /// read whole; an error at `path` when it cannot be.
    fn read_file(&mut self, path: &str, file: &str) -> Option<(PathBuf, Vec<u8>)> {
        let resolved = self.resolve_file(file);
        match std::fs::read(&resolved) {
            Ok(bytes) => Some((resolved, bytes)),
            Err(e) => {
                self.error(path, format!("cannot read {}: {e}", resolved.display()));
                None
            }
        }
    }
}

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
    use crate::config::{load_str, ConfigErrors};
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
