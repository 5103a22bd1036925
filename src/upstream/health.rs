//! Active health checks: HTTP (`path` set) or TCP connect, with thresholds,
//! run in the background (see `background`) for every upstream of the live
//! configuration. A target marked unhealthy gets no traffic while a healthy
//! one exists, and gets it back once it passes `healthy_after` checks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType};
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::HealthCheck;
use pingora_load_balancing::Backend;

use super::{Target, Upstream, UpstreamTls};
use crate::outbound::{Body, Client, OutboundError};
use tokio_util::sync::CancellationToken;

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

/// A target's consecutive check results. The verdict (`Target::healthy`)
/// is kept here rather than in Pingora's load balancer: it lives with the
/// target, so it follows the address when a name's addresses change and
/// the pool (and its balancer) is rebuilt.
#[derive(Debug, Default)]
pub(crate) struct Streak {
    successes: AtomicUsize,
    failures: AtomicUsize,
}

/// Records one check of `target` and flips its verdict at the thresholds;
/// each flip is logged.
fn record(
    upstream: &str,
    target: &Target,
    passed: bool,
    healthy_after: usize,
    unhealthy_after: usize,
) {
    let streak = &target.checks;
    let (same, other, threshold) = if passed {
        (&streak.successes, &streak.failures, healthy_after)
    } else {
        (&streak.failures, &streak.successes, unhealthy_after)
    };
    other.store(0, Ordering::Relaxed);
    let run = same.fetch_add(1, Ordering::Relaxed) + 1;
    if run < threshold || target.healthy.load(Ordering::Relaxed) == passed {
        return;
    }
    target.healthy.store(passed, Ordering::Relaxed);
    if passed {
        log::info!(
            "upstream {upstream}: target {} is healthy again",
            target.label
        );
    } else {
        log::warn!("upstream {upstream}: target {} is unhealthy", target.label);
    }
}

/// What a check asks of a target.
enum Probe {
    /// A TCP connection (and TLS handshake, for a TLS upstream).
    Connect,
    /// An HTTP answer with this status.
    Http {
        request: Box<RequestHeader>,
        expect: u16,
    },
}

/// Where an upstream's checks find the client they share with every other
/// upstream's (`Client::fresh_connections`); filled by the background
/// checker before its first pass.
pub(crate) type ConnectorSlot = Arc<OnceLock<Client>>;

/// One upstream's check, run by Pingora's load balancer for each target.
struct TargetCheck {
    probe: Probe,
    /// Timeouts and TLS settings; the address is the target's.
    peer_template: HttpPeer,
    /// The whole check, not only each step: Pingora's own timeouts bound the
    /// connect and each read, so a target trickling its answer a byte at a
    /// time would pass, and would stall the pass (and every later one).
    timeout: Duration,
    healthy_after: usize,
    unhealthy_after: usize,
    connector: ConnectorSlot,
    upstream: String,
    /// The pool's targets, whose verdicts the checks set.
    targets: Vec<Arc<Target>>,
}

impl TargetCheck {
    async fn probe(&self, target: &Backend) -> pingora_error::Result<()> {
        let Some(client) = self.connector.get() else {
            return Error::e_explain(ErrorType::InternalError, "no health check connector");
        };
        let mut peer = self.peer_template.clone();
        peer._address = target.addr.clone();
        let failed = |e: OutboundError| {
            Error::explain(ErrorType::Custom("HealthCheckFailed"), e.to_string())
        };
        // A new connection: checks never give theirs back to the pool.
        let (request, expect) = match &self.probe {
            Probe::Connect => return client.connect(&peer).await.map_err(failed),
            Probe::Http { request, expect } => (request, *expect),
        };
        // The whole answer, within the timeout.
        let answer = client
            .send(&peer, request, Body::Discard)
            .await
            .map_err(failed)?;
        if answer.status() != expect {
            return Error::e_explain(
                ErrorType::CustomCode("unexpected health check status", answer.status()),
                format!("expected {expect}"),
            );
        }
        Ok(())
    }
}

#[async_trait]
impl HealthCheck for TargetCheck {
    async fn check(&self, target: &Backend) -> pingora_error::Result<()> {
        let result = match tokio::time::timeout(self.timeout, self.probe(target)).await {
            Ok(result) => result,
            Err(_) => Error::e_explain(
                ErrorType::Custom("HealthCheckTimedout"),
                "the health check did not finish within its timeout",
            ),
        };
        // Published as each target's check ends, so a slow check of one
        // target never holds back another's verdict.
        if let Some(t) = self
            .targets
            .iter()
            .find(|t| target.addr.as_inet() == Some(&t.addr))
        {
            let (up, down) = (self.healthy_after, self.unhealthy_after);
            record(&self.upstream, t, result.is_ok(), up, down);
        }
        result
    }

    // Pingora's own record is not read (see `Streak`).
    fn health_threshold(&self, _success: bool) -> usize {
        1
    }
}

impl HealthCheckSettings {
    /// The check for one pool of an upstream.
    pub(crate) fn build(
        &self,
        upstream: &str,
        tls: Option<&UpstreamTls>,
        targets: Vec<Arc<Target>>,
        connector: ConnectorSlot,
    ) -> Box<dyn HealthCheck + Send + Sync> {
        let sni = tls.map_or_else(String::new, |t| t.sni.clone());
        // The address is replaced by each target's.
        let mut peer_template = HttpPeer::new("0.0.0.0:1", tls.is_some(), sni);
        let options = &mut peer_template.options;
        options.connection_timeout = Some(self.timeout);
        options.total_connection_timeout = Some(self.timeout);
        options.read_timeout = Some(self.timeout);
        options.write_timeout = Some(self.timeout);
        if let Some(t) = tls {
            options.verify_cert = t.verify;
            options.verify_hostname = t.verify;
            options.ca = t.ca.clone();
        }
        let probe = match &self.path {
            None => Probe::Connect,
            Some(path) => {
                let host = self
                    .host
                    .clone()
                    .or_else(|| tls.map(|t| t.sni.clone()))
                    .unwrap_or_else(|| "localhost".to_string());
                match RequestHeader::build("GET", path.as_bytes(), None) {
                    Ok(mut request) => {
                        let _ = request.insert_header("Host", host.as_str());
                        let _ = request.insert_header("User-Agent", "gatehouse-health-check");
                        Probe::Http {
                            request: Box::new(request),
                            expect: self.expect_status,
                        }
                    }
                    // The path was validated when the configuration was compiled.
                    Err(e) => {
                        log::error!("upstream {upstream}: health check path {path:?}: {e}; checking connections only");
                        Probe::Connect
                    }
                }
            }
        };
        Box::new(TargetCheck {
            probe,
            peer_template,
            timeout: self.timeout,
            healthy_after: self.healthy_after,
            unhealthy_after: self.unhealthy_after,
            connector,
            upstream: upstream.to_string(),
            targets,
        })
    }
}

/// Checks `upstream` every `interval` until `stop` (the upstream left the
/// configuration, or the gateway stopped).
pub async fn check_until(
    upstream: Arc<Upstream>,
    interval: Duration,
    client: Client,
    stop: CancellationToken,
) {
    let checking = async {
        loop {
            upstream.run_health_check_pass(&client).await;
            tokio::time::sleep(interval).await;
        }
    };
    tokio::select! {
        () = stop.cancelled() => {}
        () = checking => {}
    }
}
