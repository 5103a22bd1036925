//! Background work that follows the live configuration: the health checks
//! of every upstream, the lookups of its target names, the JWKS refreshes of every provider with a
//! `jwks_url`, the `gatehouse_upstream_healthy` gauges, the dashboard's
//! readings of the counters (`status`), and the cluster's
//! store (its connection, kept on this service's runtime, and the purges
//! other instances publish).
//!
//! All of it stops on one signal, the gateway's `stop` token. Each piece
//! of work holds a child of it, cancelled when a reload removes what the
//! work is for (what is new starts, what is unchanged keeps running; a
//! request still holding a removed provider asks it for no early fetch).
//! The token itself is given once the server has stopped serving, so
//! requests draining still meet live health and keys; Pingora has shut its
//! runtimes down by then, so it is the access log's writer thread, which
//! outlives them, that it still stops.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio_util::sync::CancellationToken;

use crate::auth::jwks::RemoteJwks;
use crate::cache::Cache;
use crate::cluster::Cluster;
use crate::gateway::{Gateway, Runtime};
use crate::metrics::Metrics;
use crate::outbound::Client;
use crate::upstream::dns::{self, Dns};
use crate::upstream::{health, Upstream};

/// How often the health gauges are brought up to date.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

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
    /// What purges from other instances of the cluster apply to.
    cache: Option<Cache>,
    /// `server.resolver`, for the resolver made on this service's runtime.
    resolver: Option<std::net::SocketAddr>,
    /// The dashboard's readings of the counters.
    sampler: Arc<crate::status::Sampler>,
    stop: CancellationToken,
}

impl ConfigFollower {
    pub fn new(
        gateway: Arc<Gateway>,
        metrics: Arc<Metrics>,
        client: Client,
        cache: Option<Cache>,
        resolver: Option<std::net::SocketAddr>,
        sampler: Arc<crate::status::Sampler>,
        stop: CancellationToken,
    ) -> Self {
        ConfigFollower {
            gateway,
            metrics,
            client,
            health_checks: Client::fresh_connections(),
            cache,
            resolver,
            sampler,
            stop,
        }
    }
}

/// `gatehouse_upstream_healthy` for every target of the live configuration;
/// targets gone after a reload are dropped from it.
async fn publish_health(gateway: Arc<Gateway>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut published: Vec<(String, String)> = Vec::new();
    loop {
        let runtime = gateway.current();
        let mut now = Vec::new();
        for up in runtime.upstreams.values() {
            for t in &up.pool().targets {
                metrics
                    .upstream_healthy
                    .with_label_values(&[&up.name, &t.label])
                    .set(i64::from(up.is_target_healthy(t)));
                now.push((up.name.to_string(), t.label.to_string()));
            }
        }
        drop(runtime);
        for (u, t) in published.iter().filter(|p| !now.contains(p)) {
            let _ = metrics.upstream_healthy.remove_label_values(&[u, t]);
        }
        published = now;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(PUBLISH_EVERY) => {}
        }
    }
}

/// Work started for items of the configuration, each with its own stop.
struct Working<T>(Vec<(Arc<T>, CancellationToken)>);

impl<T> Working<T> {
    /// Stops the work for items not in `live`, and starts it, with a child
    /// of `stop`, for items of `live` that have none.
    fn follow<'a>(
        &mut self,
        live: impl Iterator<Item = &'a Arc<T>>,
        stop: &CancellationToken,
        mut start: impl FnMut(&Arc<T>, CancellationToken),
    ) where
        T: 'a,
    {
        let live: Vec<&Arc<T>> = live.collect();
        self.0.retain(|(item, token)| {
            let kept = live.iter().any(|l| Arc::ptr_eq(l, item));
            if !kept {
                token.cancel();
            }
            kept
        });
        for item in live {
            if !self.0.iter().any(|(known, _)| Arc::ptr_eq(known, item)) {
                let token = stop.child_token();
                start(item, token.clone());
                self.0.push((Arc::clone(item), token));
            }
        }
    }
}

impl<T> Working<T> {
    fn stop_all(&mut self) {
        for (_, token) in self.0.drain(..) {
            token.cancel();
        }
    }
}

/// What is being worked on, for the live configuration.
struct Following {
    health_checks: Working<Upstream>,
    lookups: Working<Upstream>,
    /// Made on this service's runtime, at its start.
    dns: Option<Arc<Dns>>,
    key_refreshes: Working<RemoteJwks>,
    clusters: Working<Cluster>,
}

impl ConfigFollower {
    fn follow(&self, runtime: &Runtime, following: &mut Following) {
        let checked = runtime.upstreams.values();
        let checked = checked.filter(|u| u.health_interval().is_some());
        following
            .health_checks
            .follow(checked, &self.stop, |upstream, stop| {
                if let Some(interval) = upstream.health_interval() {
                    let client = self.health_checks.clone();
                    let check = health::check_until(Arc::clone(upstream), interval, client, stop);
                    tokio::spawn(check);
                }
            });
        if let Some(dns) = following.dns.clone() {
            let named = runtime.upstreams.values().filter(|u| !u.names.is_empty());
            let failures = &self.metrics.dns_failures;
            following
                .lookups
                .follow(named, &self.stop, |upstream, stop| {
                    let (upstream, dns) = (Arc::clone(upstream), Arc::clone(&dns));
                    tokio::spawn(dns::refresh_until(upstream, dns, failures.clone(), stop));
                });
        }
        let remote = runtime.providers.values().filter_map(|p| p.remote_jwks());
        following
            .key_refreshes
            .follow(remote, &self.stop, |remote, stop| {
                tokio::spawn(Arc::clone(remote).run_until(self.client.clone(), stop));
            });
        following
            .clusters
            .follow(runtime.cluster.iter(), &self.stop, |cluster, stop| {
                tokio::spawn(Arc::clone(cluster).keep(stop.clone()));
                if let Some(cache) = self.cache {
                    tokio::spawn(Arc::clone(cluster).follow_purges(cache, stop));
                }
            });
    }
}

#[async_trait]
impl BackgroundService for ConfigFollower {
    // Pingora's shutdown watch fires when graceful shutdown begins; the
    // work goes on until `stop`, so requests still draining meet live
    // health and keys.
    async fn start(&self, _shutdown: ShutdownWatch) {
        let mut changes = self.gateway.subscribe();
        let dns = match Dns::new(self.resolver) {
            Ok(dns) => Some(Arc::new(dns)),
            Err(e) => {
                log::error!("target names will not be looked up again: {e}");
                None
            }
        };
        let mut following = Following {
            health_checks: Working(Vec::new()),
            lookups: Working(Vec::new()),
            dns,
            key_refreshes: Working(Vec::new()),
            clusters: Working(Vec::new()),
        };
        let (gateway, metrics) = (Arc::clone(&self.gateway), Arc::clone(&self.metrics));
        tokio::spawn(publish_health(gateway, metrics, self.stop.clone()));
        tokio::spawn(Arc::clone(&self.sampler).run_until(self.stop.clone()));
        loop {
            self.follow(&self.gateway.current(), &mut following);
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                () = self.stop.cancelled() => break,
            }
        }
        // The gateway is gone: so is the configuration the work was for.
        following.health_checks.stop_all();
        following.lookups.stop_all();
        following.key_refreshes.stop_all();
        following.clusters.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_stops_when_its_item_leaves_or_the_gateway_stops() {
        let stop = CancellationToken::new();
        let (a, b, c) = (Arc::new(1), Arc::new(2), Arc::new(3));
        let mut working = Working(Vec::new());
        let mut started = Vec::new();
        let mut follow = |working: &mut Working<i32>, live: &[&Arc<i32>]| {
            working.follow(live.iter().copied(), &stop, |item, token| {
                started.push((**item, token))
            });
        };
        follow(&mut working, &[&a, &b]);
        // A reload: b goes, c comes, a stays (and is not started twice).
        follow(&mut working, &[&a, &c]);
        let status: Vec<(i32, bool)> = started
            .iter()
            .map(|(i, t)| (*i, t.is_cancelled()))
            .collect();
        assert_eq!(status, [(1, false), (2, true), (3, false)]);
        stop.cancel();
        assert!(started.iter().all(|(_, t)| t.is_cancelled()));
    }
}
