//! The configuration file as written: plain serde structs that refuse unknown
//! keys. Nothing here is validated beyond types; `compile` does the rest.
//!
//! Fields that may be written in two shapes (a string or a mapping) stay
//! `serde_json::Value` here and are read by `compile` with their own path.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::units::{ConfDuration, ConfSize};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub threads: Option<usize>,
    pub pid_file: Option<String>,
    pub upgrade_sock: Option<String>,
    pub grace_period: Option<ConfDuration>,
    pub graceful_shutdown_timeout: Option<ConfDuration>,
    pub max_body: Option<ConfSize>,
    pub header_timeout: Option<ConfDuration>,
    /// Longest pause between two reads of a request body.
    pub body_timeout: Option<ConfDuration>,
    /// All bodies held in memory at once.
    pub max_buffered: Option<ConfSize>,
    /// `reject` (default) or `keep` `;` path parameters.
    pub path_params: Option<String>,
    pub max_header_size: Option<ConfSize>,
    pub max_headers: Option<usize>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Idle time after which a client's keep-alive connection is closed.
    pub keepalive_timeout: Option<ConfDuration>,
    /// Idle upstream connections kept for reuse, per process.
    pub upstream_keepalive_pool_size: Option<usize>,
    /// Pingora's work-stealing scheduler; off by default (better tail latency).
    pub work_stealing: Option<bool>,
    /// Record Prometheus metrics (default true).
    pub metrics: Option<bool>,
    /// Largest body held back for a body rule; larger ones pass untouched.
    pub max_transform_size: Option<ConfSize>,
    /// Where the daemon writes its own log when started with `-d`.
    pub error_log: Option<String>,
    /// User and group the daemon drops to after binding.
    pub user: Option<String>,
    pub group: Option<String>,
    /// The DNS server for target names (`ip` or `ip:port`).
    pub resolver: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenTls {
    pub address: String,
    pub tls: Option<RawTls>,
}

/// A listener's `tls`: `cert` and `key` (one certificate) or
/// `certificates` (chosen by SNI), and the listener's TLS settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub certificates: Option<Vec<RawCertificate>>,
    pub client_ca: Option<String>,
    /// `optional` or `required`.
    pub client_cert: Option<String>,
    /// `"1.2"` or `"1.3"`.
    pub min_version: Option<Value>,
    pub ticket_keys: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: String,
    /// Text; read as a value so that a token YAML takes for a number is
    /// refused without serde echoing it.
    pub token: Option<Value>,
    /// Serve a non-loopback admin listener without a token, on purpose.
    pub insecure: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Each a string `host:port` or `{ address, weight }`.
    pub targets: Vec<Value>,
    pub balance: Option<String>,
    pub hash_key: Option<String>,
    pub health_check: Option<RawHealthCheck>,
    pub connect_timeout: Option<ConfDuration>,
    pub read_timeout: Option<ConfDuration>,
    pub write_timeout: Option<ConfDuration>,
    /// How long an idle pooled connection to a target is kept.
    pub idle_timeout: Option<ConfDuration>,
    pub retries: Option<usize>,
    /// `connect`, `reset`, `timeout` or 5xx statuses.
    pub retry_on: Option<Vec<Value>>,
    /// How often `host:port` targets are looked up again (default 30s).
    pub resolve_interval: Option<ConfDuration>,
    /// Whether `-t` and loading fail on a name that does not resolve.
    pub resolve_at_start: Option<bool>,
    /// A share like `20%`.
    pub retry_budget: Option<Value>,
    pub outlier: Option<RawOutlier>,
    #[serde(default)]
    pub tls: bool,
    pub sni: Option<String>,
    /// Verify the targets' certificates (default true).
    pub tls_verify: Option<bool>,
    /// PEM bundle of CAs trusted for the targets, instead of the system's.
    pub ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    pub consecutive_failures: Option<u32>,
    pub eject_for: Option<ConfDuration>,
    /// A share like `50%`.
    pub max_ejected: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub address: String,
    pub weight: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub path: Option<String>,
    pub interval: Option<ConfDuration>,
    pub timeout: Option<ConfDuration>,
    pub expect_status: Option<u16>,
    pub healthy_after: Option<usize>,
    pub unhealthy_after: Option<usize>,
    /// Host header of HTTP checks; default the target address.
    pub host: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RawMatch,
    pub upstream: Option<String>,
    pub strip_prefix: Option<String>,
    pub add_prefix: Option<String>,
    pub timeout: Option<ConfDuration>,
    pub max_body: Option<ConfSize>,
    pub auth: Option<Value>,
    pub rate_limit: Option<Value>,
    pub cache: Option<Value>,
    pub request_headers: Option<RawHeaderRules>,
    pub response_headers: Option<RawHeaderRules>,
    pub request_body: Option<Value>,
    pub response_body: Option<Value>,
    pub deprecation: Option<RawDeprecation>,
    pub fallback: Option<RawFallback>,
    pub aggregate: Option<Value>,
    /// A mapping, or `off` against the top-level default.
    pub cors: Option<Value>,
    pub ip_filter: Option<Value>,
    pub compression: Option<Value>,
    pub split: Option<RawSplit>,
    pub mirror: Option<RawMirror>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMirror {
    pub upstream: String,
    /// `10` or `10%`; default 100.
    pub percent: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub otlp: String,
    pub sample: Option<f64>,
    pub service_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSplit {
    pub by: Option<String>,
    pub to: Vec<RawSplitSide>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSplitSide {
    pub upstream: String,
    pub weight: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub path_regex: Option<String>,
    pub methods: Option<Vec<String>>,
    pub host: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    /// Values are scalars (`"2"` or `2`), compared as text.
    pub query: Option<BTreeMap<String, Value>>,
    /// Values are scalars, compared as JSON values.
    pub claims: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderRules {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeprecation {
    pub sunset: Option<String>,
    pub link: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    pub status: u16,
    pub content_type: Option<String>,
    #[serde(default)]
    pub body: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Each a `RawJwtProvider`, read with its own path.
    #[serde(default)]
    pub jwt: BTreeMap<String, Value>,
    /// Each a `RawApiKeys`.
    #[serde(default)]
    pub api_keys: BTreeMap<String, Value>,
}

/// One `auth.api_keys` provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKeys {
    /// `header:NAME` or `query:NAME`.
    pub from: String,
    pub keys_file: String,
    pub forward_consumer: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwtProvider {
    pub algorithms: Vec<String>,
    pub secret: Option<String>,
    pub public_key_file: Option<String>,
    pub jwks_file: Option<String>,
    pub jwks_url: Option<String>,
    pub jwks_refresh: Option<ConfDuration>,
    pub issuer: Option<String>,
    pub audience: Option<OneOrMany>,
    pub leeway: Option<ConfDuration>,
    pub token_from: Option<String>,
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
}

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `auth: { jwt: NAME | api_key: NAME, client_cert: true, require_claims:
/// {...}, require_scopes: [...] }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteAuth {
    pub jwt: Option<String>,
    pub api_key: Option<String>,
    #[serde(default)]
    pub client_cert: bool,
    /// Claim -> an accepted value or a list of them.
    #[serde(default)]
    pub require_claims: BTreeMap<String, Value>,
    #[serde(default)]
    pub require_scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests: u64,
    pub per: ConfDuration,
    pub key: Option<String>,
    /// `local` (default) or `cluster`.
    pub scope: Option<String>,
    /// `allow` (default) or `deny`, for `scope: cluster`.
    pub on_store_error: Option<String>,
}

/// The `cluster` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub redis: String,
    pub key_prefix: Option<String>,
    pub timeout: Option<ConfDuration>,
}

/// `request_body` / `response_body`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBodyRules {
    #[serde(default)]
    pub remove_fields: Vec<String>,
    #[serde(default)]
    pub rename_fields: BTreeMap<String, String>,
    #[serde(default)]
    pub xml_to_json: bool,
}

/// The top-level `cache`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheGlobal {
    pub max_size: Option<ConfSize>,
}

/// A route's `cache`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteCache {
    pub ttl: ConfDuration,
    #[serde(default)]
    pub vary: Vec<String>,
}

/// A route's `aggregate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAggregate {
    pub timeout: Option<ConfDuration>,
    pub parts: Vec<RawAggregatePart>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAggregatePart {
    pub key: String,
    pub upstream: String,
    pub path: String,
    pub required: Option<bool>,
}
