//! State shared by the instances of a cluster through Redis (the `cluster`
//! section, SPEC section 8): rate-limit counts (`cluster::limit`, asked by
//! `ratelimit` in `request_filter`) and cache purges (`cluster::purge`,
//! published by `admin`, applied by every instance).
//!
//! The connection is a redis-rs `ConnectionManager` (one multiplexed
//! connection, reconnected by the crate), created by `keep` on the
//! background service's runtime, which lasts as long as the process: the
//! crate spawns its connection and reconnection tasks on the runtime that
//! created it, and Pingora's request runtimes must not own them.
//!
//! A request never waits on the store longer than `cluster.timeout`. After
//! a call fails (no answer in time, connection lost), the store counts as
//! down and requests stop asking it (no request pays the timeout again);
//! `keep` pings it every `DOWN_PING_EVERY` and marks it up on the first
//! answer. While down, each policy does what its configuration says
//! (`on_store_error`).

pub mod limit;
pub mod purge;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

/// How often a store that is down is asked again.
const DOWN_PING_EVERY: Duration = Duration::from_millis(200);
/// How often a store that is up is checked (so `/readyz` notices a store
/// that went away while no request asked it).
const UP_PING_EVERY: Duration = Duration::from_secs(1);

/// Why a call to the store failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No answer within `cluster.timeout`.
    #[error("the cluster store did not answer in time")]
    Timeout,
    /// Not connected (down, or not yet connected since start).
    #[error("the cluster store is unavailable")]
    Unavailable,
    /// Connected, but it answered the call with an error.
    #[error("the cluster store refused the call")]
    Refused,
}

impl StoreError {
    /// The `reason` label of `gatehouse_cluster_store_errors_total`.
    pub fn reason(self) -> &'static str {
        match self {
            StoreError::Timeout => "timeout",
            StoreError::Unavailable => "unavailable",
            StoreError::Refused => "refused",
        }
    }

    pub fn status(self) -> http::StatusCode {
        http::StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The store's state, for `/readyz` and for requests deciding whether to
/// ask it at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StoreState {
    Connecting = 0,
    Up = 1,
    Down = 2,
}

impl StoreState {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreState::Connecting => "connecting",
            StoreState::Up => "up",
            StoreState::Down => "down",
        }
    }
}

/// The compiled `cluster` section and its connection.
pub struct Cluster {
    /// The URL without its password, for logs and `/readyz`.
    pub shown_url: String,
    /// Before every key and channel: instances with the same Redis and
    /// prefix share state.
    pub key_prefix: String,
    pub timeout: Duration,
    client: redis::Client,
    connection: ArcSwapOption<ConnectionManager>,
    state: AtomicU8,
    /// Why the store last failed, for `/readyz` (never holds the URL's
    /// password: redis-rs errors name the address at most).
    last_error: Mutex<Option<String>>,
    /// This instance, so it does not apply its own purges twice.
    pub instance: String,
    /// Whether this instance hears the cluster's purges now.
    subscribed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cluster on {} ({})", self.shown_url, self.key_prefix)
    }
}

impl Cluster {
    /// The cluster for `url` (`redis://` or `rediss://`); not connected
    /// until `keep` runs.
    pub fn new(url: &str, key_prefix: String, timeout: Duration) -> Result<Self, String> {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err("must be a redis:// or rediss:// URL".into());
        }
        let shown_url = redact(url);
        let client = redis::Client::open(url)
            .map_err(|e| format!("{shown_url} is not a valid Redis URL ({})", e.category()))?;
        Ok(Cluster {
            shown_url,
            key_prefix,
            timeout,
            client,
            connection: ArcSwapOption::empty(),
            state: AtomicU8::new(StoreState::Connecting as u8),
            last_error: Mutex::new(None),
            instance: uuid::Uuid::new_v4().to_string(),
            subscribed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn state(&self) -> StoreState {
        match self.state.load(Ordering::Acquire) {
            1 => StoreState::Up,
            2 => StoreState::Down,
            _ => StoreState::Connecting,
        }
    }

    /// Whether purges published by other instances reach this one now.
    pub fn hears_purges(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    fn set_hears_purges(&self, subscribed: bool) {
        self.subscribed.store(subscribed, Ordering::Release);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_state(&self, state: StoreState, error: Option<String>) {
        let before = self.state.swap(state as u8, Ordering::AcqRel);
        if before != state as u8 {
            match (&error, state) {
                (Some(e), _) => {
                    log::warn!("cluster store {}: {}: {e}", self.shown_url, state.as_str())
                }
                (None, _) => log::info!("cluster store {}: {}", self.shown_url, state.as_str()),
            }
        }
        if error.is_some() {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
        }
    }

    /// Runs `call` on the store within `timeout`, unless the store is known
    /// to be down. A failure marks it down.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if self.state() != StoreState::Up {
            return Err(StoreError::Unavailable);
        }
        let Some(connection) = self.connection.load_full() else {
            return Err(StoreError::Unavailable);
        };
        let connection = ConnectionManager::clone(&connection);
        match tokio::time::timeout(self.timeout, call(connection)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) if is_refusal(&e) => Err(StoreError::Refused),
            Ok(Err(e)) => {
                self.set_state(StoreState::Down, Some(e.category().to_string()));
                Err(StoreError::Unavailable)
            }
            Err(_) => {
                self.set_state(
                    StoreState::Down,
                    Some(format!("no answer within {:?}", self.timeout)),
                );
                Err(StoreError::Timeout)
            }
        }
    }

    /// Connects, then watches the store until `stop`: pings it while it is
    /// down and marks it up when it answers. Runs on the background
    /// runtime (see the module's doc).
    pub async fn keep(self: Arc<Self>, stop: CancellationToken) {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_secs(1))))
            .set_response_timeout(Some(self.timeout.max(Duration::from_millis(500))))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(2);
        let mut backoff = DOWN_PING_EVERY;
        loop {
            let connect = self
                .client
                .get_connection_manager_with_config(config.clone());
            let connected = tokio::select! {
                () = stop.cancelled() => return,
                c = tokio::time::timeout(Duration::from_secs(5), connect) => c,
            };
            match connected {
                Ok(Ok(manager)) => {
                    self.connection.store(Some(Arc::new(manager)));
                    self.set_state(StoreState::Up, None);
                    break;
                }
                Ok(Err(e)) => self.set_state(StoreState::Down, Some(e.category().to_string())),
                Err(_) => self.set_state(StoreState::Down, Some("connect timed out".into())),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        loop {
            let every = match self.state() {
                StoreState::Up => UP_PING_EVERY,
                _ => DOWN_PING_EVERY,
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
            self.ping().await;
        }
        self.connection.store(None);
    }

    async fn ping(&self) {
        let Some(connection) = self.connection.load_full() else {
            return;
        };
        let mut connection = ConnectionManager::clone(&connection);
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        match tokio::time::timeout(self.timeout.max(Duration::from_millis(500)), ping).await {
            Ok(Ok(_)) => self.set_state(StoreState::Up, None),
            Ok(Err(e)) => self.set_state(StoreState::Down, Some(e.category().to_string())),
            Err(_) => self.set_state(StoreState::Down, Some("ping timed out".into())),
        }
    }

    /// The client, for connections of their own (pub/sub).
    fn client(&self) -> &redis::Client {
        &self.client
    }
}

/// An error the server answered with, as opposed to a lost connection.
fn is_refusal(e: &redis::RedisError) -> bool {
    !(e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() || e.is_timeout())
}

/// `redis://user:secret@host` shown as `redis://user:***@host`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redact("redis://:hunter2@10.0.0.1:6379/0"),
            "redis://:***@10.0.0.1:6379/0"
        );
        assert_eq!(
            redact("rediss://app:p@ss@cache:6380"),
            "rediss://app:***@cache:6380"
        );
        assert_eq!(redact("redis://127.0.0.1/1"), "redis://127.0.0.1/1");
        let err = Cluster::new("http://x", "g:".into(), Duration::from_millis(50)).unwrap_err();
        assert!(err.contains("redis://"), "{err}");
        let err = Cluster::new(
            "redis://:hunter2@[bad",
            "g:".into(),
            Duration::from_millis(50),
        )
        .unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[tokio::test]
    async fn a_store_never_connected_answers_unavailable_at_once() {
        let cluster =
            Cluster::new("redis://127.0.0.1:1", "g:".into(), Duration::from_secs(5)).unwrap();
        let started = std::time::Instant::now();
        let answer = cluster
            .call(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await;
        assert_eq!(answer, Err(StoreError::Unavailable));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(cluster.state(), StoreState::Connecting);
    }
}
