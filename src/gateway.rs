//! The live configuration: one `ArcSwap` so that a reload is a pointer swap.
//! A request loads the runtime once and keeps it to the end, so requests in
//! flight finish on the configuration they started with.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::auth::Provider;
use crate::route::Routes;
use crate::upstream::Upstream;

/// Everything a reload may replace.
#[derive(Debug, Default)]
pub struct Runtime {
    pub router: Routes,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub providers: BTreeMap<String, Arc<Provider>>,
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
