//! Configuration: one YAML file, parsed once (`source`, `raw`), then compiled
//! into the runtime types the request path uses (`compile`): regexes built,
//! upstream names resolved, files read. Every error found is reported with its
//! YAML path and line; nothing here panics on bad input.

mod admin_token;
mod compile;

pub use admin_token::AdminToken;
pub use compile::Resolve;
pub mod error;
pub mod raw;
pub mod source;
pub mod units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

pub use crate::routing::PathParams;

pub use error::{ConfigError, ConfigErrors, LoadError, Position};

use crate::gateway::Runtime;

/// A fully validated configuration.
pub struct Config {
    pub server: ServerSettings,
    pub access_log: crate::access_log::Sink,
    /// `cache.max_size`, when any route caches.
    pub cache_max_size: Option<u64>,
    pub listeners: Vec<Listener>,
    pub admin: Option<AdminSettings>,
    /// `tracing`: fixed at start, like the access log.
    pub tracing: Option<crate::trace::TraceSettings>,
    pub runtime: Runtime,
}

/// `server:` keys. They change only by an upgrade, never by a reload.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    pub threads: usize,
    pub pid_file: String,
    pub upgrade_sock: String,
    pub grace_period: Duration,
    pub graceful_shutdown_timeout: Duration,
    pub max_body: u64,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// Bytes of bodies held in memory at once: body rules, aggregate parts,
    /// cache fills.
    pub max_buffered: u64,
    pub path_params: PathParams,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub trusted_proxies: Vec<IpNet>,
    pub keepalive_timeout: Duration,
    pub upstream_keepalive_pool_size: usize,
    pub work_stealing: bool,
    pub max_transform_size: usize,
    pub metrics: bool,
    pub error_log: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// `server.resolver`: the DNS server for target names; `None`, the
    /// system's configuration.
    pub resolver: Option<SocketAddr>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pid_file: "/tmp/gatehouse.pid".into(),
            upgrade_sock: "/tmp/gatehouse_upgrade.sock".into(),
            grace_period: Duration::from_secs(5),
            graceful_shutdown_timeout: Duration::from_secs(5),
            max_body: 10 << 20,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            max_buffered: 64 << 20,
            path_params: PathParams::Reject,
            max_header_size: 32 << 10,
            max_headers: 100,
            trusted_proxies: Vec::new(),
            keepalive_timeout: Duration::from_secs(60),
            upstream_keepalive_pool_size: 1024,
            work_stealing: false,
            max_transform_size: 1 << 20,
            metrics: true,
            error_log: None,
            user: None,
            group: None,
            resolver: None,
        }
    }
}

/// A public listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub addr: SocketAddr,
    /// What a TLS listener fixes at start; its certificates are in the
    /// runtime (`Runtime::certificates`), read again on every reload.
    pub tls: Option<crate::tls::ListenerTls>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// `admin.token`: what every endpoint but `/healthz` and `/readyz`
    /// asks for.
    pub token: Option<AdminToken>,
}

/// Reads and compiles the file at `path`, with `${NAME}` from the process
/// environment.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    load_after(path, None)
}

/// As [`load`], on a reload: what did not change in `previous` carries
/// over with its state.
pub fn load_after(path: &Path, previous: Option<&Runtime>) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    compile_text(
        &text,
        &base,
        &|name| std::env::var(name).ok(),
        previous,
        &compile::system_resolve,
    )
    .map_err(LoadError::Invalid)
}

/// Compiles configuration text; relative file paths are taken from `base`.
pub fn load_str(
    text: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    compile_text(text, base, env, None, &compile::system_resolve)
}

/// As [`load_str`], resolving target names with `resolve`.
pub fn load_str_resolving(
    text: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    resolve: compile::Resolve<'_>,
) -> Result<Config, ConfigErrors> {
    compile_text(text, base, env, None, resolve)
}

fn compile_text(
    text: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    previous: Option<&Runtime>,
    resolve: compile::Resolve<'_>,
) -> Result<Config, ConfigErrors> {
    let doc = source::Document::parse(text, env).map_err(ConfigErrors)?;
    compile::compile(&doc, base, previous, resolve)
}
