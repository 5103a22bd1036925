//! Active health checks: HTTP (`path` set) or TCP connect, with thresholds,
//! run in the background (see `background`) for every upstream of the live
//! configuration. A target marked unhealthy gets no traffic while a healthy
//! one exists, and gets it back once it passes `healthy_after` checks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use pingora_error::{Error, ErrorType};
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::{
    HealthCheck, HealthObserve, HttpHealthCheck, TcpHealthCheck,
};
use pingora_load_balancing::Backend;

use super::{Upstream, UpstreamTls};

/// A compiled `health_check` block.
#[derive(Debug, Clone)]
pub struct HealthCheckSettings {
    /// HTTP GET path; `None` checks that a TCP connection can be made.
    pub path: Option<String>,
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub expect_status: u16,
    pub healthy_after: usize,
    pub unhealthy_after: usize,
}

/// Logs each flip and publishes it to the target's flag, which the proxy
/// reads per request (see `Upstream::is_healthy`). Pingora calls this right
/// after it flips its own record, target by target, so a slow check of one
/// target never holds back another's verdict.
struct PublishHealthChange {
    upstream: String,
    flags: Vec<(SocketAddr, Arc<AtomicBool>)>,
}

#[async_trait]
impl HealthObserve for PublishHealthChange {
    async fn observe(&self, target: &Backend, healthy: bool) {
        if let Some((_, flag)) = self
            .flags
            .iter()
            .find(|(addr, _)| target.addr.as_inet() == Some(addr))
        {
            flag.store(healthy, Ordering::Relaxed);
        }
        if healthy {
            log::info!(
                "upstream {}: target {} is healthy again",
                self.upstream,
                target.addr
            );
        } else {
            log::warn!(
                "upstream {}: target {} is unhealthy",
                self.upstream,
                target.addr
            );
        }
    }
}

/// Holds a whole check to `timeout`. Pingora's own timeouts bound the
/// connect and each read, so a target trickling its answer a byte at a time
/// would pass, and would stall the pass (and every later one) meanwhile.
struct Bounded {
    inner: Box<dyn HealthCheck + Send + Sync>,
    timeout: Duration,
}

#[async_trait]
impl HealthCheck for Bounded {
    async fn check(&self, target: &Backend) -> pingora_error::Result<()> {
        match tokio::time::timeout(self.timeout, self.inner.check(target)).await {
            Ok(result) => result,
            Err(_) => Error::e_explain(
                ErrorType::Custom("HealthCheckTimedout"),
                "the health check did not finish within its timeout",
            ),
        }
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        self.inner.health_status_change(target, healthy).await;
    }

    fn backend_summary(&self, target: &Backend) -> String {
        self.inner.backend_summary(target)
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.inner.health_threshold(success)
    }
}

impl HealthCheckSettings {
    /// The check for one upstream; `flags` are its targets' health flags.
    pub(crate) fn build(
        &self,
        upstream: &str,
        tls: Option<&UpstreamTls>,
        flags: Vec<(SocketAddr, Arc<AtomicBool>)>,
    ) -> Box<dyn HealthCheck + Send + Sync> {
        let observer = Box::new(PublishHealthChange {
            upstream: upstream.to_string(),
            flags,
        });
        let inner: Box<dyn HealthCheck + Send + Sync> = match &self.path {
            None => {
                let mut check = match tls {
                    Some(t) => TcpHealthCheck::new_tls(&t.sni),
                    None => TcpHealthCheck::new(),
                };
                check.consecutive_success = self.healthy_after;
                check.consecutive_failure = self.unhealthy_after;
                check.peer_template.options.connection_timeout = Some(self.timeout);
                check.peer_template.options.total_connection_timeout = Some(self.timeout);
                if let Some(t) = tls {
                    check.peer_template.options.verify_cert = t.verify;
                    check.peer_template.options.verify_hostname = t.verify;
                    check.peer_template.options.ca = t.ca.clone();
                }
                check.health_changed_callback = Some(observer);
                check
            }
            Some(path) => {
                let host = self
                    .host
                    .clone()
                    .or_else(|| tls.map(|t| t.sni.clone()))
                    .unwrap_or_else(|| "localhost".to_string());
                let mut check = HttpHealthCheck::new(&host, tls.is_some());
                check.consecutive_success = self.healthy_after;
                check.consecutive_failure = self.unhealthy_after;
                // The path was validated when the configuration was compiled.
                if let Ok(mut req) = RequestHeader::build("GET", path.as_bytes(), None) {
                    let _ = req.insert_header("Host", host.as_str());
                    let _ = req.insert_header("User-Agent", "gatehouse-health-check");
                    check.req = req;
                }
                let options = &mut check.peer_template.options;
                options.connection_timeout = Some(self.timeout);
                options.total_connection_timeout = Some(self.timeout);
                options.read_timeout = Some(self.timeout);
                options.write_timeout = Some(self.timeout);
                if let Some(t) = tls {
                    options.verify_cert = t.verify;
                    options.verify_hostname = t.verify;
                    options.ca = t.ca.clone();
                }
                let expect = self.expect_status;
                check.validator = Some(Box::new(move |resp| {
                    if resp.status.as_u16() == expect {
                        Ok(())
                    } else {
                        Error::e_explain(
                            ErrorType::CustomCode(
                                "unexpected health check status",
                                resp.status.as_u16(),
                            ),
                            format!("expected {expect}"),
                        )
                    }
                }));
                check.health_changed_callback = Some(observer);
                Box::new(check)
            }
        };
        Box::new(Bounded {
            inner,
            timeout: self.timeout,
        })
    }
}

/// Checks `upstream` every `interval` until no configuration holds it.
pub async fn check_forever(upstream: Weak<Upstream>, interval: Duration) {
    loop {
        let Some(up) = upstream.upgrade() else {
            return;
        };
        up.run_health_check_pass().await;
        drop(up);
        tokio::time::sleep(interval).await;
    }
}
