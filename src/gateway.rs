//! The live configuration: one `ArcSwap` so that a reload is a pointer swap.
//! A request loads the runtime once and keeps it to the end, so requests in
//! flight finish on the configuration they started with.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use serde_json::Value;

use crate::auth::Provider;
use crate::cluster::Cluster;
use crate::ratelimit::RateLimit;
use crate::route::Routes;
use crate::upstream::Upstream;

/// Everything a reload may replace.
#[derive(Debug, Default)]
pub struct Runtime {
    pub router: Routes,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub providers: BTreeMap<String, Arc<Provider>>,
    /// The `cluster` section: the store shared with the other instances.
    pub cluster: Option<Arc<Cluster>>,
    /// Each TLS listener's certificates, chosen by SNI at each handshake.
    pub certificates: Vec<(std::net::SocketAddr, Arc<crate::tls::CertTable>)>,
    /// What the next reload may carry over.
    pub carried: Carried,
}

impl Runtime {
    /// The certificates of the TLS listener at `addr`.
    pub fn certificates_for(
        &self,
        addr: std::net::SocketAddr,
    ) -> Option<&Arc<crate::tls::CertTable>> {
        let found = self.certificates.iter().find(|(a, _)| *a == addr);
        found.map(|(_, table)| table)
    }
}

/// What a reload carries over while its configuration is unchanged: an
/// upstream's health and connection pool, a provider's fetched keys and
/// verified tokens, a route's rate-limit counts, the cluster's connection.
#[derive(Debug, Default)]
pub struct Carried {
    pub upstreams: Carry<Upstream>,
    pub providers: Carry<Provider>,
    /// By route name.
    pub rate_limits: Carry<RateLimit>,
    /// Under the name `cluster`: its connection and state.
    pub clusters: Carry<Cluster>,
}

/// Items by name, each with the configuration it was built from, compared
/// as a value (never as text).
pub struct Carry<T>(BTreeMap<String, (Value, Arc<T>)>);

impl<T> Default for Carry<T> {
    fn default() -> Self {
        Carry(BTreeMap::new())
    }
}

impl<T> std::fmt::Debug for Carry<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl<T> Carry<T> {
    /// The item `name` when it was built from exactly `source`.
    pub fn get(&self, name: &str, source: &Value) -> Option<&Arc<T>> {
        self.0
            .get(name)
            .filter(|(built_from, _)| built_from == source)
            .map(|(_, item)| item)
    }

    pub fn keep(&mut self, name: &str, source: &Value, item: &Arc<T>) {
        self.0
            .insert(name.to_owned(), (source.clone(), Arc::clone(item)));
    }
}

pub struct Gateway {
    current: ArcSwap<Runtime>,
    /// Bumped on every swap, for services that follow the configuration
    /// (health checks).
    generation: watch::Sender<u64>,
}

impl Gateway {
    pub fn new(runtime: Runtime) -> Self {
        Gateway {
            current: ArcSwap::from_pointee(runtime),
            generation: watch::Sender::new(0),
        }
    }

    pub fn current(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    /// A cheap borrow of the live runtime for synchronous use; do not hold
    /// it across an await.
    pub fn load(&self) -> arc_swap::Guard<Arc<Runtime>> {
        self.current.load()
    }

    pub fn swap(&self, runtime: Runtime) {
        self.current.store(Arc::new(runtime));
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
