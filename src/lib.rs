//! gatehouse: an HTTP API gateway on Cloudflare's Pingora.
//!
//! # Layout
//!
//! Start at `server` (the Pingora services put together) and `proxy` (the
//! chart of a request's life: one hook per phase, each calling the modules
//! below in order). A request meets them in this order:
//!
//! 1. `listener`: the connection's gate (TLS within `header_timeout`), the
//!    HTTP/1 head read and checked as it arrives, pipelined requests one at
//!    a time; HTTP/2 head limits.
//! 2. `request`: what the gateway knows of the request (`RequestCtx`): its
//!    id, peer and client address (`forwarding`), route, claims, counts.
//! 3. `route`: the compiled `Route` and its policies, in their order
//!    (`route::select` asks `routing`, which only matches and rewrites;
//!    `route::edge` runs `ip_filter` and `cors`; `route::guard` runs
//!    `ratelimit` and `auth`, keyed by `subject`).
//! 4. `transform`: body rules prepared (`transform::body`, `json`, `decode`),
//!    held within `budget` (`server.max_buffered`).
//! 5. `aggregate` answers from its parts (through `outbound`), or `cache`
//!    answers a hit, or `upstream` picks a target (balancing, retries,
//!    health checks).
//! 6. On the way up and back: `forwarding` fields, identity headers
//!    (`auth`), header and body rules (`transform`).
//! 7. `respond`: every answer the gateway writes itself (problem+json),
//!    and the error that ended a request mapped to its status.
//! 8. `observe`: the request's metrics (`metrics`) and access log line
//!    (`access_log`).
//!
//! Beside the request path: `config` reads the YAML file once and compiles
//! it (one file per section under `config/compile/`) into the `gateway`'s
//! runtime, which `reload` swaps whole; `background` runs health checks and
//! key refreshes for the live configuration and stops them on one signal;
//! `admin` serves `/metrics`, `/healthz`, `/readyz`, reloads and purges;
//! `cluster` shares rate-limit counts and purges between instances
//! through Redis.
//!
//! No module imports one that imports it back (`scripts/module-deps.py`).

pub(crate) mod access_log;
pub(crate) mod admin;
pub(crate) mod aggregate;
pub(crate) mod auth;
pub(crate) mod background;
pub(crate) mod budget;
pub(crate) mod cache;
pub(crate) mod cluster;
pub(crate) mod compression;
pub mod config;
pub(crate) mod cors;
pub mod forwarding;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod gateway;
pub(crate) mod ip_filter;
pub(crate) mod listener;
pub(crate) mod metrics;
pub(crate) mod mirror;
pub(crate) mod observe;
pub(crate) mod outbound;
pub(crate) mod proxy;
pub(crate) mod ratelimit;
pub(crate) mod reload;
pub(crate) mod request;
pub(crate) mod respond;
pub mod route;
pub mod routing;
pub mod server;
pub(crate) mod split;
pub(crate) mod status;
pub(crate) mod subject;
pub mod tls;
pub(crate) mod trace;
pub(crate) mod transform;
pub(crate) mod upstream;
