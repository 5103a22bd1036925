//! Upstream pools: target selection with pingora-load-balancing, health
//! state, per-target in-flight counts and the prebuilt peers. Joins the
//! `upstream_peer` phase (pick a target, retrying on another one after a
//! failed connect) and runs health checks in the background (`health`).

pub mod health;
pub mod outlier;
pub mod retry;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora_core::upstreams::peer::HttpPeer;
use pingora_load_balancing::selection::{Consistent, Random, RoundRobin};
use pingora_load_balancing::{Backend, LoadBalancer};
use prometheus::{IntCounter, IntCounterVec};

use crate::metrics::{Series, UpstreamOutcome};

pub use health::HealthCheckSettings;
pub use outlier::OutlierSettings;
pub use retry::{AfterFailure, Failure, Replay, RetryHold, RetryOn};

/// How `balance: consistent_hash` keys a request: the request key rate
/// limits use too.
pub use crate::subject::RequestKey as HashKey;

/// One target of an upstream.
pub struct Target {
    pub addr: SocketAddr,
    /// `ip:port`, the label in logs and metrics.
    pub label: Arc<str>,
    pub weight: usize,
    backend: Backend,
    /// Cloned per request: building a peer (and its SNI string) once is
    /// cheaper than per request.
    peer: HttpPeer,
    inflight: AtomicUsize,
    /// The health checks' verdict, set as it flips (see
    /// `health::PublishHealthChange`). The load balancer's own record is a
    /// lookup that hashes the backend twice, more than the rest of a
    /// single-target pick; this flag is read per request instead.
    healthy: Arc<AtomicBool>,
    /// Its `gatehouse_upstream_requests_total` series, by outcome.
    request_series: [Series<IntCounter>; UpstreamOutcome::COUNT],
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (weight {})", self.label, self.weight)
    }
}

enum Balancer {
    RoundRobin(LoadBalancer<RoundRobin>),
    Random(LoadBalancer<Random>),
    Consistent(LoadBalancer<Consistent>),
    /// The load balancer here only holds health state; the choice is ours.
    LeastConnections {
        health: LoadBalancer<RoundRobin>,
        cursor: AtomicUsize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceKind {
    RoundRobin,
    Random,
    ConsistentHash,
    LeastConnections,
}

impl BalanceKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "round_robin" => Some(Self::RoundRobin),
            "random" => Some(Self::Random),
            "consistent_hash" => Some(Self::ConsistentHash),
            "least_connections" => Some(Self::LeastConnections),
            _ => None,
        }
    }
}

/// Everything needed to build an upstream; produced by `config::compile`.
pub struct UpstreamSpec {
    pub name: String,
    /// `(address, weight)`, addresses unique.
    pub targets: Vec<(SocketAddr, usize)>,
    pub balance: BalanceKind,
    pub hash_key: HashKey,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub retries: usize,
    pub tls: Option<UpstreamTls>,
    pub health_check: Option<HealthCheckSettings>,
    pub outlier: Option<OutlierSettings>,
    pub retry_on: RetryOn,
    pub retry_budget_percent: u32,
}

#[derive(Clone)]
pub struct UpstreamTls {
    pub sni: String,
    pub verify: bool,
    pub ca: Option<Arc<pingora_core::protocols::tls::CaType>>,
}

pub struct Upstream {
    pub name: Arc<str>,
    pub targets: Vec<Target>,
    balancer: Balancer,
    pub hash_key: HashKey,
    /// Further targets tried after a failure `retry_on` lists.
    pub retries: usize,
    pub retry_on: RetryOn,
    retry_budget_percent: u32,
    retries_in_flight: AtomicUsize,
    outliers: Option<outlier::Outliers>,
    pub read_timeout: Duration,
    health_interval: Option<Duration>,
    /// Where its health checks find the shared connector.
    health_connector: health::ConnectorSlot,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("targets", &self.targets)
            .finish()
    }
}

/// The outcome of choosing a target.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick {
    Target(usize),
    /// Every target is marked unhealthy.
    NoneHealthy,
    /// Every healthy target was already tried for this request.
    Exhausted,
}

fn build_lb<S>(backends: &[Backend]) -> LoadBalancer<S>
where
    S: pingora_load_balancing::selection::BackendSelection + 'static,
    S::Iter: pingora_load_balancing::selection::BackendIter,
{
    use futures::FutureExt;
    let discovery =
        pingora_load_balancing::discovery::Static::new(backends.iter().cloned().collect());
    let lb = LoadBalancer::from_backends(pingora_load_balancing::Backends::new(discovery));
    // Static discovery never waits and never fails.
    let _ = lb.update().now_or_never();
    lb
}

impl Upstream {
    pub fn new(spec: UpstreamSpec) -> Result<Self, String> {
        let mut targets = Vec::with_capacity(spec.targets.len());
        for (addr, weight) in &spec.targets {
            let label: Arc<str> = addr.to_string().into();
            let backend = Backend::new_with_weight(&label, *weight)
                .map_err(|e| format!("target {label}: {e}"))?;
            let (tls, sni) = match &spec.tls {
                Some(t) => (true, t.sni.clone()),
                None => (false, String::new()),
            };
            let mut peer = HttpPeer::new(*addr, tls, sni);
            peer.options.connection_timeout = Some(spec.connect_timeout);
            // The TCP connect and the TLS handshake together.
            peer.options.total_connection_timeout = Some(spec.connect_timeout);
            peer.options.read_timeout = Some(spec.read_timeout);
            peer.options.write_timeout = Some(spec.write_timeout);
            peer.options.idle_timeout = spec.idle_timeout;
            // The proxy strips these itself, in one pass; see
            // `strip_request_hop_by_hop`.
            peer.options.http_upstream_request_policy.strip_hop_by_hop = false;
            if let Some(t) = &spec.tls {
                peer.options.verify_cert = t.verify;
                peer.options.verify_hostname = t.verify;
                peer.options.ca = t.ca.clone();
            }
            targets.push(Target {
                addr: *addr,
                label,
                weight: *weight,
                backend,
                peer,
                inflight: AtomicUsize::new(0),
                // As Pingora has it: healthy until a check fails.
                healthy: Arc::new(AtomicBool::new(true)),
                request_series: Default::default(),
            });
        }
        let backends: Vec<Backend> = targets.iter().map(|t| t.backend.clone()).collect();
        let mut balancer = match spec.balance {
            BalanceKind::RoundRobin => Balancer::RoundRobin(build_lb(&backends)),
            BalanceKind::Random => Balancer::Random(build_lb(&backends)),
            BalanceKind::ConsistentHash => Balancer::Consistent(build_lb(&backends)),
            BalanceKind::LeastConnections => Balancer::LeastConnections {
                health: build_lb(&backends),
                cursor: AtomicUsize::new(0),
            },
        };
        let mut health_interval = None;
        let health_connector = health::ConnectorSlot::default();
        if let Some(settings) = &spec.health_check {
            let flags = targets
                .iter()
                .map(|t| (t.addr, Arc::clone(&t.healthy)))
                .collect();
            let check = settings.build(
                &spec.name,
                spec.tls.as_ref(),
                flags,
                Arc::clone(&health_connector),
            );
            match &mut balancer {
                Balancer::RoundRobin(lb) => lb.set_health_check(check),
                Balancer::Random(lb) => lb.set_health_check(check),
                Balancer::Consistent(lb) => lb.set_health_check(check),
                Balancer::LeastConnections { health, .. } => health.set_health_check(check),
            }
            health_interval = Some(settings.interval);
        }
        let outliers = spec
            .outlier
            .map(|settings| outlier::Outliers::new(settings, targets.len()));
        Ok(Upstream {
            name: spec.name.into(),
            targets,
            balancer,
            hash_key: spec.hash_key,
            retries: spec.retries,
            retry_on: spec.retry_on,
            retry_budget_percent: spec.retry_budget_percent,
            retries_in_flight: AtomicUsize::new(0),
            outliers,
            read_timeout: spec.read_timeout,
            health_interval,
            health_connector,
        })
    }

    fn backends(&self) -> &pingora_load_balancing::Backends {
        match &self.balancer {
            Balancer::RoundRobin(lb) => lb.backends(),
            Balancer::Random(lb) => lb.backends(),
            Balancer::Consistent(lb) => lb.backends(),
            Balancer::LeastConnections { health, .. } => health.backends(),
        }
    }

    /// Whether target `index` may be sent requests: its active health
    /// check (if any) and its outlier detection (if any) both say so.
    pub fn is_healthy(&self, index: usize) -> bool {
        let target = &self.targets[index];
        if !target.healthy.load(Ordering::Relaxed) {
            return false;
        }
        let Some(outliers) = &self.outliers else {
            return true;
        };
        !outliers.is_ejected(index, || {
            log::info!(
                "upstream {}: target {} returns after its ejection",
                self.name,
                target.label
            );
        })
    }

    /// Reports how a request to target `index` went, for outlier
    /// detection; an ejection is logged and counted in `ejections`.
    pub fn report(&self, index: usize, failed: bool, ejections: &IntCounterVec) {
        let Some(outliers) = &self.outliers else {
            return;
        };
        if !failed {
            outliers.success(index);
            return;
        }
        let target = &self.targets[index];
        match outliers.failure(index) {
            outlier::Change::None => {}
            outlier::Change::Ejected(lasts) => {
                log::warn!(
                    "upstream {}: target {} ejected for {lasts:?} after {} consecutive failures",
                    self.name,
                    target.label,
                    outliers.settings.consecutive_failures
                );
                ejections
                    .with_label_values(&[&self.name, &target.label])
                    .inc();
            }
            outlier::Change::Spared => log::debug!(
                "upstream {}: target {} kept: max_ejected targets are out",
                self.name,
                target.label
            ),
        }
    }

    pub fn has_healthy_target(&self) -> bool {
        (0..self.targets.len()).any(|i| self.is_healthy(i))
    }

    pub fn uses_hash_key(&self) -> bool {
        matches!(self.balancer, Balancer::Consistent(_))
    }

    /// The consistent-hashing key of a request (empty for the other
    /// algorithms, which do not read it).
    pub fn key_of(&self, subject: &crate::subject::Subject<'_>) -> [u8; 8] {
        if self.uses_hash_key() {
            self.hash_key.stable_hash(subject).to_le_bytes()
        } else {
            [0; 8]
        }
    }

    fn index_of(&self, backend: &Backend) -> Option<usize> {
        self.targets
            .iter()
            .position(|t| backend.addr.as_inet() == Some(&t.addr))
    }

    /// Chooses a healthy target not in `tried`. `key` feeds consistent
    /// hashing and is ignored by the other algorithms.
    pub fn pick(&self, key: &[u8], tried: &[usize]) -> Pick {
        // One target (a service VIP, a sidecar): nothing to balance, and the
        // selectors' walk costs more than the rest of the choice.
        if self.targets.len() == 1 {
            return match (self.is_healthy(0), tried.is_empty()) {
                (false, _) => Pick::NoneHealthy,
                (true, true) => Pick::Target(0),
                (true, false) => Pick::Exhausted,
            };
        }
        // `healthy` is Pingora's readiness (health and enablement); the flag
        // is the health verdict every other reader uses. Both must agree.
        let accept = |b: &Backend, healthy: bool| {
            healthy
                && self
                    .index_of(b)
                    .is_some_and(|i| self.is_healthy(i) && !tried.contains(&i))
        };
        // Enough steps for the selectors' fallback walks to meet every target.
        let steps = self.targets.len() * 4 + 16;
        let chosen = match &self.balancer {
            Balancer::RoundRobin(lb) => lb.select_with(key, steps, accept),
            Balancer::Random(lb) => lb.select_with(key, steps, accept),
            Balancer::Consistent(lb) => lb.select_with(key, steps, accept),
            Balancer::LeastConnections { cursor, .. } => {
                return self.pick_least_connections(cursor, tried);
            }
        };
        if let Some(i) = chosen.as_ref().and_then(|b| self.index_of(b)) {
            return Pick::Target(i);
        }
        // The selectors' walks are bounded; make sure no healthy target is left.
        match (0..self.targets.len()).find(|i| !tried.contains(i) && self.is_healthy(*i)) {
            Some(i) => Pick::Target(i),
            None if self.has_healthy_target() => Pick::Exhausted,
            None => Pick::NoneHealthy,
        }
    }

    /// Fewest requests in flight per unit of weight; ties are broken by a
    /// rotating start so equal targets share the load.
    fn pick_least_connections(&self, cursor: &AtomicUsize, tried: &[usize]) -> Pick {
        let n = self.targets.len();
        let start = cursor.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, usize)> = None;
        let mut any_healthy = false;
        for step in 0..n {
            let i = (start + step) % n;
            if !self.is_healthy(i) {
                continue;
            }
            any_healthy = true;
            if tried.contains(&i) {
                continue;
            }
            let t = &self.targets[i];
            // Compare load/weight without division: a*wb < b*wa.
            let load = t.inflight.load(Ordering::Relaxed);
            let better = match best {
                None => true,
                Some((j, best_load)) => load * self.targets[j].weight < best_load * t.weight,
            };
            if better {
                best = Some((i, load));
            }
        }
        match best {
            Some((i, _)) => Pick::Target(i),
            None if any_healthy => Pick::Exhausted,
            None => Pick::NoneHealthy,
        }
    }

    /// The peer for target `index`, with its read timeout capped at `deadline_left`.
    pub fn peer(&self, index: usize, deadline_left: Option<Duration>) -> Box<HttpPeer> {
        let mut peer = Box::new(self.targets[index].peer.clone());
        if let Some(left) = deadline_left {
            let cap = |d: Option<Duration>| Some(d.map_or(left, |d| d.min(left)));
            let o = &mut peer.options;
            o.read_timeout = Some(left);
            o.write_timeout = cap(o.write_timeout);
            o.connection_timeout = cap(o.connection_timeout);
            o.total_connection_timeout = cap(o.total_connection_timeout);
        }
        peer
    }

    /// Counts a request in flight to `index` until the guard is dropped.
    pub fn begin(self: &Arc<Self>, index: usize) -> InFlight {
        self.targets[index].inflight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            upstream: Arc::clone(self),
            index,
        }
    }

    /// Counts a request sent to target `index` in `family`
    /// (`gatehouse_upstream_requests_total`).
    pub fn count_request(&self, index: usize, outcome: UpstreamOutcome, family: &IntCounterVec) {
        let target = &self.targets[index];
        target.request_series[outcome as usize]
            .get(|| family.with_label_values(&[&self.name, &target.label, outcome.label()]))
            .inc();
    }

    pub fn in_flight(&self, index: usize) -> usize {
        self.targets[index].inflight.load(Ordering::Relaxed)
    }

    pub(crate) fn health_interval(&self) -> Option<Duration> {
        self.health_interval
    }

    pub(crate) async fn run_health_check_pass(&self, client: &crate::outbound::Client) {
        self.health_connector.get_or_init(|| client.clone());
        self.backends().run_health_check(true).await;
    }
}

/// Why a request found no target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoTarget {
    /// The route's deadline passed before a connect could be tried (504).
    DeadlinePassed,
    /// Every target is unhealthy (503).
    NoneHealthy,
    /// Every target failed to connect (502).
    Exhausted,
}

impl NoTarget {
    /// For the error log.
    pub fn why(self) -> &'static str {
        match self {
            NoTarget::DeadlinePassed => "the route's timeout passed before a connect",
            NoTarget::NoneHealthy => "no healthy target",
            NoTarget::Exhausted => "every target failed to connect",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            NoTarget::DeadlinePassed => 504,
            NoTarget::NoneHealthy => 503,
            NoTarget::Exhausted => 502,
        }
    }
}

impl Upstream {
    /// The target for a request's next attempt (not one in `tried`), keyed
    /// by `key` for consistent hashing, its timeouts cut to what is left
    /// before `deadline`; counted in flight until the returned guard drops.
    pub fn choose(
        self: &Arc<Self>,
        key: &[u8],
        tried: &[usize],
        deadline: Option<std::time::Instant>,
    ) -> Result<(InFlight, Box<HttpPeer>), NoTarget> {
        let left = match deadline {
            Some(deadline) => match deadline.checked_duration_since(std::time::Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Err(NoTarget::DeadlinePassed),
            },
            None => None,
        };
        match self.pick(key, tried) {
            Pick::Target(index) => Ok((self.begin(index), self.peer(index, left))),
            Pick::NoneHealthy => Err(NoTarget::NoneHealthy),
            Pick::Exhausted => Err(NoTarget::Exhausted),
        }
    }

    /// The retry rule, after the connect of `failed` failed: logged,
    /// counted (when `counted`), remembered in `tried`; true when another
    /// target should be tried. Nothing was sent, so any method may retry,
    /// up to `retries` times, while an untried healthy target is left.
    pub fn retry_after_failed_connect(
        &self,
        failed: InFlight,
        tried: &mut Vec<usize>,
        request_id: &str,
        why: &str,
        metrics: &crate::metrics::Metrics,
        counted: bool,
    ) -> bool {
        let index = failed.index();
        // No longer in flight: the next attempt counts its own.
        drop(failed);
        let failed = index;
        log::warn!(
            "request {request_id}: connect to {} (upstream {}) failed: {why}",
            self.targets[failed].label,
            self.name,
        );
        if counted {
            self.count_request(
                failed,
                UpstreamOutcome::ConnectError,
                &metrics.upstream_requests,
            );
        }
        self.report(failed, true, &metrics.upstream_ejections);
        tried.push(failed);
        self.retry_on.connect && self.another_target(tried)
    }

    /// Whether a further attempt is allowed (`retries`) and an untried
    /// healthy target is left for it.
    pub fn another_target(&self, tried: &[usize]) -> bool {
        let another = (0..self.targets.len()).any(|i| !tried.contains(&i) && self.is_healthy(i));
        tried.len() <= self.retries && another
    }
}

/// A request in flight to one target; see [`Upstream::begin`].
pub struct InFlight {
    upstream: Arc<Upstream>,
    index: usize,
}

impl InFlight {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn upstream(&self) -> &str {
        &self.upstream.name
    }

    pub fn target(&self) -> &str {
        &self.upstream.targets[self.index].label
    }

    /// Counts this request in `gatehouse_upstream_requests_total`.
    pub fn count(&self, outcome: UpstreamOutcome, family: &IntCounterVec) {
        self.upstream.count_request(self.index, outcome, family);
    }

    /// Reports the request's last attempt to outlier detection: failed
    /// on an upstream error (timeout, reset) or a 5xx status; a request the
    /// client gave up on says nothing of the target.
    pub fn finished(
        &self,
        e: Option<&pingora_core::Error>,
        status: Option<u16>,
        ejections: &IntCounterVec,
    ) {
        use pingora_core::ErrorSource;
        let failed = match e {
            Some(e) if e.esource() == &ErrorSource::Upstream => true,
            Some(_) => return,
            None => status.is_some_and(|s| s >= 500),
        };
        self.upstream.report(self.index, failed, ejections);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.targets[self.index]
            .inflight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(balance: BalanceKind, targets: &[(&str, usize)]) -> UpstreamSpec {
        UpstreamSpec {
            name: "users".into(),
            targets: targets
                .iter()
                .map(|(a, w)| (a.parse().unwrap(), *w))
                .collect(),
            balance,
            hash_key: HashKey::ClientIp,
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
            idle_timeout: None,
            retries: 2,
            tls: None,
            health_check: None,
            outlier: None,
            retry_on: RetryOn::default(),
            retry_budget_percent: 20,
        }
    }

    fn count(up: &Upstream, n: usize, key: &[u8]) -> Vec<usize> {
        let mut counts = vec![0; up.targets.len()];
        for _ in 0..n {
            match up.pick(key, &[]) {
                Pick::Target(i) => counts[i] += 1,
                other => panic!("{other:?}"),
            }
        }
        counts
    }

    #[test]
    fn weighted_round_robin_follows_weights() {
        let up = Upstream::new(spec(
            BalanceKind::RoundRobin,
            &[("127.0.0.1:1", 1), ("127.0.0.1:2", 3)],
        ))
        .unwrap();
        assert_eq!(count(&up, 400, b""), vec![100, 300]);
    }

    #[test]
    fn consistent_hash_is_sticky() {
        let up = Upstream::new(spec(
            BalanceKind::ConsistentHash,
            &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1), ("127.0.0.1:3", 1)],
        ))
        .unwrap();
        let a = count(&up, 50, b"client-a");
        assert_eq!(a.iter().filter(|c| **c == 50).count(), 1);
    }

    #[test]
    fn tried_targets_are_skipped_then_exhausted() {
        let up = Upstream::new(spec(
            BalanceKind::RoundRobin,
            &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)],
        ))
        .unwrap();
        let Pick::Target(first) = up.pick(b"", &[]) else {
            panic!()
        };
        let Pick::Target(second) = up.pick(b"", &[first]) else {
            panic!()
        };
        assert_ne!(first, second);
        assert_eq!(up.pick(b"", &[first, second]), Pick::Exhausted);
    }

    #[test]
    fn least_connections_prefers_the_idle_target() {
        let up = Arc::new(
            Upstream::new(spec(
                BalanceKind::LeastConnections,
                &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)],
            ))
            .unwrap(),
        );
        let busy = up.begin(0);
        let _busy2 = up.begin(0);
        for _ in 0..10 {
            assert_eq!(up.pick(b"", &[]), Pick::Target(1));
        }
        drop(busy);
        assert_eq!(up.in_flight(0), 1);
    }
}
