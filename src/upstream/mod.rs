//! Upstream pools: target selection with pingora-load-balancing, health
//! state, per-target in-flight counts and the prebuilt peers. Joins the
//! `upstream_peer` phase (pick a target, retrying on another one after a
//! failed connect) and runs health checks in the background (`health`).

pub mod dns;
pub mod health;
pub mod outlier;
pub mod retry;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_load_balancing::selection::{Consistent, Random, RoundRobin};
use pingora_load_balancing::{Backend, LoadBalancer};
use prometheus::{IntCounter, IntCounterVec};

use crate::metrics::{Series, UpstreamOutcome};

pub use dns::TargetName;
pub use health::HealthCheckSettings;
pub use outlier::OutlierSettings;
pub use retry::{AfterFailure, Failure, Replay, RetryHold, RetryOn};

/// How `balance: consistent_hash` keys a request: the request key rate
/// limits use too.
pub use crate::subject::RequestKey as HashKey;

/// One target of an upstream: one address. Shared by every pool that
/// holds its address, so its health, ejection and counts follow the
/// address when a name's addresses change, and a pool that drops it keeps
/// it alive until its requests in flight finish (drained, not cut).
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
    /// The active health checks' verdict, read per request (the load
    /// balancer's own record is a lookup that hashes the backend twice).
    healthy: AtomicBool,
    /// Consecutive check results, toward `healthy_after`/`unhealthy_after`.
    checks: health::Streak,
    outlier: outlier::TargetRecord,
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
    /// The load balancer here only runs the health checks; the choice is ours.
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
    /// `(address, weight)` of the `ip:port` targets and of the addresses
    /// the names resolved to when the file was loaded; addresses unique.
    pub targets: Vec<(SocketAddr, usize)>,
    /// The `host:port` targets, re-resolved every `resolve_interval`.
    pub names: Vec<TargetName>,
    pub resolve_interval: Duration,
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

/// How the peers of new targets are built.
struct PeerSettings {
    connect_timeout: Duration,
    read_timeout: Duration,
    write_timeout: Duration,
    idle_timeout: Option<Duration>,
    tls: Option<UpstreamTls>,
}

/// The targets an upstream sends to now, and their balancer. Replaced
/// whole when a name's addresses change.
pub struct Pool {
    pub targets: Vec<Arc<Target>>,
    balancer: Balancer,
}

pub struct Upstream {
    pub name: Arc<str>,
    pool: ArcSwap<Pool>,
    balance: BalanceKind,
    peers: PeerSettings,
    pub hash_key: HashKey,
    /// Further targets tried after a failure `retry_on` lists.
    pub retries: usize,
    pub retry_on: RetryOn,
    retry_budget_percent: u32,
    retries_in_flight: AtomicUsize,
    outliers: Option<outlier::Outliers>,
    pub read_timeout: Duration,
    health_check: Option<HealthCheckSettings>,
    /// Where its health checks find the shared connector.
    health_connector: health::ConnectorSlot,
    /// The `ip:port` targets, fixed; the names and their last addresses.
    fixed: Vec<(SocketAddr, usize)>,
    pub names: Vec<TargetName>,
    resolved: Mutex<Vec<dns::Addresses>>,
    pub resolve_interval: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("targets", &self.pool.load().targets)
            .finish()
    }
}

/// One target as `/status` shows it.
pub struct TargetState {
    pub label: Arc<str>,
    pub state: &'static str,
    pub in_flight: usize,
}

/// The outcome of choosing a target in a pool.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick {
    /// Its index in the pool.
    Target(usize),
    /// Every target is marked unhealthy (or there is none).
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

impl PeerSettings {
    fn target(&self, addr: SocketAddr, weight: usize) -> Result<Target, String> {
        let label: Arc<str> = addr.to_string().into();
        let backend =
            Backend::new_with_weight(&label, weight).map_err(|e| format!("target {label}: {e}"))?;
        let (tls, sni) = match &self.tls {
            Some(t) => (true, t.sni.clone()),
            None => (false, String::new()),
        };
        let mut peer = HttpPeer::new(addr, tls, sni);
        peer.options.connection_timeout = Some(self.connect_timeout);
        // The TCP connect and the TLS handshake together.
        peer.options.total_connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(self.write_timeout);
        peer.options.idle_timeout = self.idle_timeout;
        // The proxy strips these itself, in one pass; see
        // `strip_request_hop_by_hop`.
        peer.options.http_upstream_request_policy.strip_hop_by_hop = false;
        if let Some(t) = &self.tls {
            peer.options.verify_cert = t.verify;
            peer.options.verify_hostname = t.verify;
            peer.options.ca = t.ca.clone();
        }
        Ok(Target {
            addr,
            label,
            weight,
            backend,
            peer,
            inflight: AtomicUsize::new(0),
            // As Pingora has it: healthy until a check fails.
            healthy: AtomicBool::new(true),
            checks: health::Streak::default(),
            outlier: outlier::TargetRecord::default(),
            request_series: Default::default(),
        })
    }
}

impl Upstream {
    pub fn new(spec: UpstreamSpec) -> Result<Self, String> {
        let peers = PeerSettings {
            connect_timeout: spec.connect_timeout,
            read_timeout: spec.read_timeout,
            write_timeout: spec.write_timeout,
            idle_timeout: spec.idle_timeout,
            tls: spec.tls,
        };
        let mut targets = Vec::with_capacity(spec.targets.len());
        for (addr, weight) in &spec.targets {
            targets.push(Arc::new(peers.target(*addr, *weight)?));
        }
        // What the names resolved to at load: the fixed targets are the
        // others.
        let fixed = spec
            .targets
            .iter()
            .filter(|(a, _)| !spec.names.iter().any(|n| n.loaded.contains(a)))
            .copied()
            .collect();
        let resolved = spec
            .names
            .iter()
            .map(|n| dns::Addresses::of(&n.loaded))
            .collect();
        let upstream = Upstream {
            name: spec.name.into(),
            pool: ArcSwap::from_pointee(Pool {
                targets: Vec::new(),
                balancer: Balancer::RoundRobin(build_lb(&[])),
            }),
            balance: spec.balance,
            peers,
            hash_key: spec.hash_key,
            retries: spec.retries,
            retry_on: spec.retry_on,
            retry_budget_percent: spec.retry_budget_percent,
            retries_in_flight: AtomicUsize::new(0),
            outliers: spec.outlier.map(outlier::Outliers::new),
            read_timeout: spec.read_timeout,
            health_check: spec.health_check,
            health_connector: health::ConnectorSlot::default(),
            fixed,
            names: spec.names,
            resolved: Mutex::new(resolved),
            resolve_interval: spec.resolve_interval,
        };
        upstream.pool.store(Arc::new(upstream.pool_of(targets)));
        Ok(upstream)
    }

    /// A pool of `targets`, with its balancer and health check.
    fn pool_of(&self, targets: Vec<Arc<Target>>) -> Pool {
        let backends: Vec<Backend> = targets.iter().map(|t| t.backend.clone()).collect();
        let mut balancer = match self.balance {
            BalanceKind::RoundRobin => Balancer::RoundRobin(build_lb(&backends)),
            BalanceKind::Random => Balancer::Random(build_lb(&backends)),
            BalanceKind::ConsistentHash => Balancer::Consistent(build_lb(&backends)),
            BalanceKind::LeastConnections => Balancer::LeastConnections {
                health: build_lb(&backends),
                cursor: AtomicUsize::new(0),
            },
        };
        if let Some(settings) = &self.health_check {
            let check = settings.build(
                &self.name,
                self.peers.tls.as_ref(),
                targets.clone(),
                Arc::clone(&self.health_connector),
            );
            match &mut balancer {
                Balancer::RoundRobin(lb) => lb.set_health_check(check),
                Balancer::Random(lb) => lb.set_health_check(check),
                Balancer::Consistent(lb) => lb.set_health_check(check),
                Balancer::LeastConnections { health, .. } => health.set_health_check(check),
            }
        }
        Pool { targets, balancer }
    }

    /// The targets now.
    pub fn pool(&self) -> Arc<Pool> {
        self.pool.load_full()
    }

    /// Replaces the targets by `wanted` (`(address, weight)`): an address
    /// kept keeps its target (health, ejection, counts, connections); one
    /// dropped is drained by the requests that hold it. A new address of an
    /// upstream with health checks gets requests once it passes one (an
    /// answer, spoofed or not, is not trusted before). False when nothing
    /// changed.
    pub fn set_targets(&self, wanted: &[(SocketAddr, usize)]) -> Result<bool, String> {
        let current = self.pool.load();
        let same = current.targets.len() == wanted.len()
            && current
                .targets
                .iter()
                .zip(wanted)
                .all(|(t, (a, w))| t.addr == *a && t.weight == *w);
        if same {
            return Ok(false);
        }
        let mut targets = Vec::with_capacity(wanted.len());
        for (addr, weight) in wanted {
            let kept = current
                .targets
                .iter()
                .find(|t| t.addr == *addr && t.weight == *weight);
            targets.push(match kept {
                Some(t) => Arc::clone(t),
                None => {
                    let target = self.peers.target(*addr, *weight)?;
                    if self.health_check.is_some() {
                        target.healthy.store(false, Ordering::Relaxed);
                    }
                    Arc::new(target)
                }
            });
        }
        drop(current);
        self.pool.store(Arc::new(self.pool_of(targets)));
        Ok(true)
    }

    /// Whether `target` may be sent requests: its active health check (if
    /// any) and its outlier detection (if any) both say so.
    pub fn is_target_healthy(&self, target: &Target) -> bool {
        if !target.healthy.load(Ordering::Relaxed) {
            return false;
        }
        let Some(outliers) = &self.outliers else {
            return true;
        };
        !outliers.is_ejected(&target.outlier, || {
            log::info!(
                "upstream {}: target {} returns after its ejection",
                self.name,
                target.label
            );
        })
    }

    /// Each target's state now, for `/status`: `unhealthy` (its health
    /// check), `ejected` (outlier detection) or `healthy`.
    pub fn target_states(&self) -> Vec<TargetState> {
        let pool = self.pool.load();
        pool.targets
            .iter()
            .map(|t| TargetState {
                label: Arc::clone(&t.label),
                state: if !t.healthy.load(Ordering::Relaxed) {
                    "unhealthy"
                } else if !self.is_target_healthy(t) {
                    "ejected"
                } else {
                    "healthy"
                },
                in_flight: t.inflight.load(Ordering::Relaxed),
            })
            .collect()
    }

    pub fn has_healthy_target(&self) -> bool {
        let pool = self.pool.load();
        pool.targets.iter().any(|t| self.is_target_healthy(t))
    }

    /// Reports how a request to `target` went, for outlier detection; an
    /// ejection is logged and counted in `ejections`.
    pub fn report(&self, target: &Target, failed: bool, ejections: &IntCounterVec) {
        let Some(outliers) = &self.outliers else {
            return;
        };
        if !failed {
            outliers.success(&target.outlier);
            return;
        }
        let pool = self.pool.load();
        let others = pool.targets.iter().map(|t| &t.outlier);
        match outliers.failure(&target.outlier, others) {
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

    pub fn uses_hash_key(&self) -> bool {
        self.balance == BalanceKind::ConsistentHash
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

    /// Chooses a healthy target of `pool` whose address is not in `tried`.
    /// `key` feeds consistent hashing and is ignored by the other
    /// algorithms.
    pub fn pick(&self, pool: &Pool, key: &[u8], tried: &[SocketAddr]) -> Pick {
        let targets = &pool.targets;
        let usable = |t: &Target| self.is_target_healthy(t);
        // One target (a service VIP, a sidecar): nothing to balance, and the
        // selectors' walk costs more than the rest of the choice.
        if targets.len() == 1 {
            return match (usable(&targets[0]), tried.contains(&targets[0].addr)) {
                (false, _) => Pick::NoneHealthy,
                (true, false) => Pick::Target(0),
                (true, true) => Pick::Exhausted,
            };
        }
        let index_of = |b: &Backend| {
            targets
                .iter()
                .position(|t| b.addr.as_inet() == Some(&t.addr))
        };
        // The verdict is ours (`Target::healthy` and outlier detection);
        // the load balancer only walks its ring or list.
        let accept = |b: &Backend, _: bool| {
            index_of(b).is_some_and(|i| usable(&targets[i]) && !tried.contains(&targets[i].addr))
        };
        // Enough steps for the selectors' fallback walks to meet every target.
        let steps = targets.len() * 4 + 16;
        let chosen = match &pool.balancer {
            Balancer::RoundRobin(lb) => lb.select_with(key, steps, accept),
            Balancer::Random(lb) => lb.select_with(key, steps, accept),
            Balancer::Consistent(lb) => lb.select_with(key, steps, accept),
            Balancer::LeastConnections { cursor, .. } => {
                return self.pick_least_connections(targets, cursor, tried);
            }
        };
        if let Some(i) = chosen.as_ref().and_then(index_of) {
            return Pick::Target(i);
        }
        // The selectors' walks are bounded; make sure no healthy target is left.
        match targets
            .iter()
            .position(|t| !tried.contains(&t.addr) && usable(t))
        {
            Some(i) => Pick::Target(i),
            None if targets.iter().any(|t| usable(t)) => Pick::Exhausted,
            None => Pick::NoneHealthy,
        }
    }

    /// Fewest requests in flight per unit of weight; ties are broken by a
    /// rotating start so equal targets share the load.
    fn pick_least_connections(
        &self,
        targets: &[Arc<Target>],
        cursor: &AtomicUsize,
        tried: &[SocketAddr],
    ) -> Pick {
        let n = targets.len();
        let start = cursor.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, usize)> = None;
        let mut any_healthy = false;
        for step in 0..n {
            let i = (start + step) % n;
            let t = &targets[i];
            if !self.is_target_healthy(t) {
                continue;
            }
            any_healthy = true;
            if tried.contains(&t.addr) {
                continue;
            }
            // Compare load/weight without division: a*wb < b*wa.
            let load = t.inflight.load(Ordering::Relaxed);
            let better = match best {
                None => true,
                Some((j, best_load)) => load * targets[j].weight < best_load * t.weight,
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

    /// The peer for `target`, with its read timeout capped at `deadline_left`.
    fn peer(target: &Target, deadline_left: Option<Duration>) -> Box<HttpPeer> {
        let mut peer = Box::new(target.peer.clone());
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

    /// Counts a request in flight to `target` until the guard is dropped.
    pub fn begin(self: &Arc<Self>, target: &Arc<Target>) -> InFlight {
        target.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            upstream: Arc::clone(self),
            target: Arc::clone(target),
        }
    }

    /// Counts a request sent to `target` in `family`
    /// (`gatehouse_upstream_requests_total`).
    pub fn count_request(&self, target: &Target, outcome: UpstreamOutcome, family: &IntCounterVec) {
        target.request_series[outcome as usize]
            .get(|| family.with_label_values(&[&self.name, &target.label, outcome.label()]))
            .inc();
    }

    /// Requests in flight to the targets now.
    pub fn requests_in_flight(&self) -> usize {
        let pool = self.pool.load();
        pool.targets
            .iter()
            .map(|t| t.inflight.load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn health_interval(&self) -> Option<Duration> {
        self.health_check.as_ref().map(|h| h.interval)
    }

    pub(crate) async fn run_health_check_pass(&self, client: &crate::outbound::Client) {
        self.health_connector.get_or_init(|| client.clone());
        let pool = self.pool();
        let backends = match &pool.balancer {
            Balancer::RoundRobin(lb) => lb.backends(),
            Balancer::Random(lb) => lb.backends(),
            Balancer::Consistent(lb) => lb.backends(),
            Balancer::LeastConnections { health, .. } => health.backends(),
        };
        backends.run_health_check(true).await;
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
        tried: &[SocketAddr],
        deadline: Option<std::time::Instant>,
    ) -> Result<(InFlight, Box<HttpPeer>), NoTarget> {
        let left = match deadline {
            Some(deadline) => match deadline.checked_duration_since(std::time::Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Err(NoTarget::DeadlinePassed),
            },
            None => None,
        };
        let pool = self.pool.load();
        match self.pick(&pool, key, tried) {
            Pick::Target(index) => {
                let target = &pool.targets[index];
                Ok((self.begin(target), Self::peer(target, left)))
            }
            Pick::NoneHealthy => Err(NoTarget::NoneHealthy),
            Pick::Exhausted => Err(NoTarget::Exhausted),
        }
    }

    /// The retry rule, after the connect of `failed` failed: logged,
    /// counted (when `counted`), reported, remembered in `tried`; true when
    /// another target should be tried. Nothing was sent, so any method may
    /// retry, up to `retries` times, while an untried healthy target is
    /// left (and `retry_on` has `connect`).
    pub fn retry_after_failed_connect(
        &self,
        failed: InFlight,
        tried: &mut Vec<SocketAddr>,
        request_id: &str,
        why: &str,
        metrics: &crate::metrics::Metrics,
        counted: bool,
    ) -> bool {
        let target = Arc::clone(&failed.target);
        // No longer in flight: the next attempt counts its own.
        drop(failed);
        log::warn!(
            "request {request_id}: connect to {} (upstream {}) failed: {why}",
            target.label,
            self.name,
        );
        if counted {
            self.count_request(
                &target,
                UpstreamOutcome::ConnectError,
                &metrics.upstream_requests,
            );
        }
        self.report(&target, true, &metrics.upstream_ejections);
        tried.push(target.addr);
        self.retry_on.connect && self.another_target(tried)
    }

    /// Whether a further attempt is allowed (`retries`) and an untried
    /// healthy target is left for it.
    pub fn another_target(&self, tried: &[SocketAddr]) -> bool {
        let pool = self.pool.load();
        let another = pool
            .targets
            .iter()
            .any(|t| !tried.contains(&t.addr) && self.is_target_healthy(t));
        tried.len() <= self.retries && another
    }
}

/// A request in flight to one target; see [`Upstream::begin`].
pub struct InFlight {
    upstream: Arc<Upstream>,
    target: Arc<Target>,
}

impl InFlight {
    pub fn addr(&self) -> SocketAddr {
        self.target.addr
    }

    pub fn upstream(&self) -> &str {
        &self.upstream.name
    }

    pub fn target(&self) -> &str {
        &self.target.label
    }

    /// Counts this request in `gatehouse_upstream_requests_total`.
    pub fn count(&self, outcome: UpstreamOutcome, family: &IntCounterVec) {
        self.upstream.count_request(&self.target, outcome, family);
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
        self.upstream.report(&self.target, failed, ejections);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.target.inflight.fetch_sub(1, Ordering::Relaxed);
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
            names: Vec::new(),
            resolve_interval: Duration::from_secs(30),
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
        let pool = up.pool();
        let mut counts = vec![0; pool.targets.len()];
        for _ in 0..n {
            match up.pick(&pool, key, &[]) {
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
        let pool = up.pool();
        let addr = |i: usize| pool.targets[i].addr;
        let Pick::Target(first) = up.pick(&pool, b"", &[]) else {
            panic!()
        };
        let Pick::Target(second) = up.pick(&pool, b"", &[addr(first)]) else {
            panic!()
        };
        assert_ne!(first, second);
        assert_eq!(
            up.pick(&pool, b"", &[addr(first), addr(second)]),
            Pick::Exhausted
        );
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
        let pool = up.pool();
        let busy = up.begin(&pool.targets[0]);
        let _busy2 = up.begin(&pool.targets[0]);
        for _ in 0..10 {
            assert_eq!(up.pick(&pool, b"", &[]), Pick::Target(1));
        }
        drop(busy);
        assert_eq!(up.requests_in_flight(), 1);
    }

    #[test]
    fn new_targets_keep_the_state_of_addresses_that_stay() {
        let up = Arc::new(
            Upstream::new(spec(
                BalanceKind::RoundRobin,
                &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)],
            ))
            .unwrap(),
        );
        let old = up.pool();
        old.targets[1].healthy.store(false, Ordering::Relaxed);
        let draining = up.begin(&old.targets[0]);
        let wanted: Vec<(SocketAddr, usize)> = ["127.0.0.1:2", "127.0.0.1:3"]
            .iter()
            .map(|a| (a.parse().unwrap(), 1))
            .collect();
        assert!(up.set_targets(&wanted).unwrap());
        assert!(!up.set_targets(&wanted).unwrap(), "unchanged");
        let new = up.pool();
        assert!(Arc::ptr_eq(&old.targets[1], &new.targets[0]), "kept");
        assert!(
            !up.is_target_healthy(&new.targets[0]),
            "its health follows it"
        );
        assert_eq!(up.pick(&new, b"", &[]), Pick::Target(1));
        // The dropped address drains: its request still holds it.
        assert_eq!(draining.target(), "127.0.0.1:1");
        assert_eq!(old.targets[0].inflight.load(Ordering::Relaxed), 1);
        drop(draining);
        assert_eq!(old.targets[0].inflight.load(Ordering::Relaxed), 0);
    }
}
