//! gatehouse: an HTTP API gateway on Cloudflare's Pingora.
//!
//! `config` reads and compiles the YAML file into the runtime types of the
//! other modules; `server` assembles the Pingora services; `proxy` sequences
//! the request phases.

pub mod access_log;
pub mod admin;
pub mod aggregate;
pub mod auth;
pub mod background;
pub mod budget;
pub mod cache;
pub mod config;
pub mod forwarding;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod listener;
pub mod metrics;
pub mod observe;
pub mod outbound;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod request;
pub mod respond;
pub mod route;
pub mod routing;
pub mod server;
pub mod subject;
pub mod transform;
pub mod upstream;
