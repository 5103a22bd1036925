//! Cache purges for the whole cluster: `DELETE /cache` on one instance
//! publishes the purge on `PREFIXpurge`, and every instance subscribed
//! there applies it (Redis pub/sub, delivered in well under a second).
//!
//! Pub/sub delivers only to instances connected when it is published, so
//! an instance that was cut off may have missed purges: each time its
//! subscription is (re)established it empties its own cache, and serves
//! nothing a purge removed while it was away. The subscription is pinged
//! every `PING_EVERY`: one that no longer answers (a peer gone without a
//! word) counts as lost.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Cluster, StoreError};

/// How often the subscription is checked, and how long its answer may take.
const PING_EVERY: Duration = Duration::from_secs(2);
const PING_WITHIN: Duration = Duration::from_secs(1);
use crate::cache::Cache;

/// One purge, as published.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Purge {
    /// The instance that purged (it has already applied it).
    pub from: String,
    /// `None` purges everything.
    pub prefix: Option<String>,
}

impl Cluster {
    fn purge_channel(&self) -> String {
        format!("{}purge", self.key_prefix)
    }

    /// Publishes a purge this instance has applied; answers how many
    /// subscribers (this instance's own included) received it.
    pub async fn publish_purge(&self, prefix: Option<&str>) -> Result<u64, StoreError> {
        let message = serde_json::to_string(&Purge {
            from: self.instance.clone(),
            prefix: prefix.map(str::to_owned),
        })
        .map_err(|_| StoreError::Refused)?;
        let channel = self.purge_channel();
        self.call(|mut connection| async move {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(message)
                .query_async::<u64>(&mut connection)
                .await
        })
        .await
    }

    /// Applies the purges other instances publish to `cache`, until `stop`.
    /// Runs on the background runtime.
    pub async fn follow_purges(self: Arc<Self>, cache: Cache, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Some(subscription) = self.subscribe(&stop).await {
                backoff = Duration::from_millis(100);
                // Purges published while this instance was not subscribed
                // are lost to it: start from an empty cache.
                let dropped = cache.storage.purge_all();
                if dropped > 0 {
                    log::info!("cache: {dropped} entries dropped on joining the cluster's purges");
                }
                self.set_hears_purges(true);
                let (mut sink, mut messages) = subscription.split();
                let mut checks = tokio::time::interval(PING_EVERY);
                checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => {
                            self.set_hears_purges(false);
                            return;
                        }
                        m = messages.next() => {
                            let Some(message) = m else { break };
                            if let Ok(payload) = message.get_payload::<String>() {
                                self.apply(&cache, &payload);
                            }
                        }
                        _ = checks.tick() => {
                            let ping = tokio::time::timeout(PING_WITHIN, sink.ping::<redis::Value>());
                            if !matches!(ping.await, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                self.set_hears_purges(false);
                log::warn!("cluster store {}: purge subscription lost", self.shown_url);
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn subscribe(&self, stop: &CancellationToken) -> Option<redis::aio::PubSub> {
        let connect = async {
            let mut pubsub = self.client().get_async_pubsub().await?;
            pubsub.subscribe(self.purge_channel()).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        tokio::select! {
            () = stop.cancelled() => None,
            s = tokio::time::timeout(Duration::from_secs(5), connect) => match s {
                Ok(Ok(pubsub)) => Some(pubsub),
                Ok(Err(e)) => {
                    log::debug!("cluster store {}: subscribe: {}", self.shown_url, e.category());
                    None
                }
                Err(_) => None,
            },
        }
    }

    fn apply(&self, cache: &Cache, payload: &str) {
        let Ok(purge) = serde_json::from_str::<Purge>(payload) else {
            log::warn!(
                "cluster store {}: a purge message that is not one",
                self.shown_url
            );
            return;
        };
        if purge.from == self.instance {
            return;
        }
        let purged = match &purge.prefix {
            Some(prefix) if prefix.starts_with('/') => cache.storage.purge_prefix(prefix),
            Some(_) => return,
            None => cache.storage.purge_all(),
        };
        log::info!(
            "cache: purged {purged} entries{} for another instance",
            purge
                .prefix
                .as_deref()
                .map(|p| format!(" under {p}"))
                .unwrap_or_default()
        );
    }
}
