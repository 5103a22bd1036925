//! The `cluster` section (SPEC section 8): the Redis store the instances
//! share rate limits and cache purges through.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::Compiler;
use crate::cluster::Cluster;
use crate::config::raw::RawCluster;
use crate::config::source::key_path;

/// The compiled section, with what it was built from (cluster-scoped rate
/// limits are carried over a reload only with their cluster unchanged).
pub(super) struct ClusterSection {
    pub cluster: Arc<Cluster>,
    pub source: Value,
}

impl Compiler<'_> {
    pub(super) fn cluster(&mut self, value: Option<&Value>) -> Option<ClusterSection> {
        let value = value.filter(|v| !v.is_null())?;
        let cluster = self.carry("cluster", value, |cx| cx.build_cluster(value))?;
        Some(ClusterSection {
            cluster,
            source: value.clone(),
        })
    }

    fn build_cluster(&mut self, value: &Value) -> Option<Cluster> {
        let raw = self.de::<RawCluster>("cluster", value)?;
        let timeout = raw.timeout.map_or(Duration::from_millis(50), |t| t.0);
        let mut ok = true;
        if timeout.is_zero() || timeout > Duration::from_secs(10) {
            self.error(
                "cluster.timeout",
                "timeout must be above zero and at most 10s",
            );
            ok = false;
        }
        let key_prefix = raw.key_prefix.unwrap_or_else(|| "gatehouse:".into());
        if key_prefix.is_empty()
            || key_prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            self.error(
                "cluster.key_prefix",
                "key_prefix must be non-empty, without spaces or control characters",
            );
            ok = false;
        }
        match Cluster::new(&raw.redis, key_prefix, timeout) {
            Ok(cluster) if ok => Some(cluster),
            Ok(_) => None,
            Err(e) => {
                self.error(&key_path("cluster", "redis"), e);
                None
            }
        }
    }
}
