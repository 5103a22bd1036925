//! Background work that follows the live configuration: the health checks
//! of every upstream and the JWKS refreshes of every provider with a
//! `jwks_url`. After a reload, work for what is gone stops on its own and
//! work for what is new starts; what is unchanged keeps running.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::auth::jwks::RemoteJwks;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::outbound::Client;
use crate::upstream::{health, Upstream};

pub struct ConfigFollower {
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    /// For JWK set fetches (shared with aggregate parts).
    client: Client,
    /// For every upstream's health checks. Their own, so its pool stays
    /// empty (a check never returns its connection): each check connects
    /// anew, testing the connect too, where a connection an aggregate part
    /// had pooled would hide a target that no longer accepts any.
    health_checks: Client,
}

impl ConfigFollower {
    pub fn new(gateway: Arc<Gateway>, metrics: Arc<Metrics>, client: Client) -> Self {
        ConfigFollower {
            gateway,
            metrics,
            client,
            health_checks: Client::fresh_connections(),
        }
    }
}

/// `gatehouse_upstream_healthy` for every target of the live configuration;
/// targets gone after a reload are dropped from it.
async fn publish_health(gateway: Arc<Gateway>, metrics: Arc<Metrics>) {
    let mut published: Vec<(String, String)> = Vec::new();
    loop {
        let runtime = gateway.current();
        let mut now = Vec::new();
        for up in runtime.upstreams.values() {
            for (i, t) in up.targets.iter().enumerate() {
                metrics
                    .upstream_healthy
                    .with_label_values(&[&up.name, &t.label])
                    .set(i64::from(up.is_healthy(i)));
                now.push((up.name.to_string(), t.label.to_string()));
            }
        }
        drop(runtime);
        for (u, t) in published.iter().filter(|p| !now.contains(p)) {
            let _ = metrics.upstream_healthy.remove_label_values(&[u, t]);
        }
        published = now;
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Pointers to what already has a task, so nothing is started twice.
#[derive(Default)]
struct Started {
    upstreams: Vec<Weak<Upstream>>,
    jwks: Vec<Weak<RemoteJwks>>,
}

/// Whether `item` is new to `seen`, which then remembers it; entries whose
/// item is gone are dropped on the way.
fn first_sight<T>(seen: &mut Vec<Weak<T>>, item: &Arc<T>) -> bool {
    seen.retain(|w| w.strong_count() > 0);
    let weak = Arc::downgrade(item);
    if seen.iter().any(|w| w.ptr_eq(&weak)) {
        return false;
    }
    seen.push(weak);
    true
}

#[async_trait]
impl BackgroundService for ConfigFollower {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut changes = self.gateway.subscribe();
        let mut started = Started::default();
        tokio::spawn(publish_health(
            Arc::clone(&self.gateway),
            Arc::clone(&self.metrics),
        ));
        loop {
            let runtime = self.gateway.current();
            for upstream in runtime.upstreams.values() {
                if let Some(interval) = upstream.health_interval() {
                    if first_sight(&mut started.upstreams, upstream) {
                        tokio::spawn(health::check_forever(
                            Arc::downgrade(upstream),
                            interval,
                            self.health_checks.clone(),
                        ));
                    }
                }
            }
            for provider in runtime.providers.values() {
                if let Some(remote) = provider.remote_jwks() {
                    if first_sight(&mut started.jwks, remote) {
                        tokio::spawn(Arc::clone(remote).run(self.client.clone()));
                    }
                }
            }
            drop(runtime);
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
    }
}
