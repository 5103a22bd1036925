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
//! `keep` pings it at once and every `DOWN_PING_EVERY` after, and marks it
//! up on the first answer. While down, each policy does what its configuration says
//! (`on_store_error`).

pub mod limit;
pub mod purge;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

/// How often a store that is down is asked again.
const DOWN_PING_EVERY: Duration = Duration::from_millis(200);
/// How often a store that is up is checked (so `/readyz` notices a store
/// that went away while no request asked it).
const UP_PING_EVERY: Duration = Duration::from_secs(1);
/// Unanswered pings in a row after which the connection is replaced.
const REPLACE_AFTER_FAILED_PINGS: u32 = 5;
/// The least time between two log lines about refused calls.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

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
    /// Since when the store is down or connecting.
    down_since: Mutex<Option<Instant>>,
    /// Wakes `keep` when a call finds the store down.
    wake: tokio::sync::Notify,
    /// The background runtime, where calls run (set by `keep`).
    runtime: OnceLock<tokio::runtime::Handle>,
    refusal_logged: Mutex<Option<Instant>>,
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
            down_since: Mutex::new(Some(Instant::now())),
            wake: tokio::sync::Notify::new(),
            runtime: OnceLock::new(),
            refusal_logged: Mutex::new(None),
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
            match &error {
                Some(e) => log::warn!("cluster store {}: {}: {e}", self.shown_url, state.as_str()),
                None => log::info!("cluster store {}: {}", self.shown_url, state.as_str()),
            }
            let mut since = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
            *since = (state != StoreState::Up).then(Instant::now);
            if state == StoreState::Down {
                // Ping it now, not after the rest of a quiet interval.
                self.wake.notify_one();
            }
        }
        if error.is_some() {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
        }
    }

    /// How long the store has been down (or connecting); `None` while up.
    pub fn down_for(&self) -> Option<Duration> {
        let since = *self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        since.map(|s| s.elapsed())
    }

    /// An answer that was an error: the store is up, but says no (a
    /// read-only replica after a failover, out of memory). Logged at most
    /// every `REFUSAL_LOG_EVERY`, and shown in `/readyz`.
    fn refused(&self, e: &redis::RedisError) {
        let what = match e.detail() {
            Some(detail) => format!("{}: {detail}", e.category()),
            None => e.category().to_string(),
        };
        let mut logged = self
            .refusal_logged
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if logged.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
            log::warn!("cluster store {}: refused a call: {what}", self.shown_url);
            *logged = Some(Instant::now());
        }
        drop(logged);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(what);
    }

    /// Runs `call` on the store within `timeout`, unless the store is known
    /// to be down. A failure marks it down. The call itself runs on the
    /// background runtime, so whatever redis-rs spawns for it (a
    /// reconnection) lives there and not on a request's runtime.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        if self.state() != StoreState::Up {
            return Err(StoreError::Unavailable);
        }
        let (Some(connection), Some(runtime)) = (self.connection.load_full(), self.runtime.get())
        else {
            return Err(StoreError::Unavailable);
        };
        let task = runtime.spawn(call(ConnectionManager::clone(&connection)));
        let abort = task.abort_handle();
        match tokio::time::timeout(self.timeout, task).await {
            Ok(Ok(Ok(answer))) => Ok(answer),
            Ok(Ok(Err(e))) if is_refusal(&e) => {
                self.refused(&e);
                Err(StoreError::Refused)
            }
            Ok(Ok(Err(e))) => {
                self.set_state(StoreState::Down, Some(e.category().to_string()));
                Err(StoreError::Unavailable)
            }
            // The background runtime is shutting down.
            Ok(Err(_)) => Err(StoreError::Unavailable),
            Err(_) => {
                abort.abort();
                self.set_state(
                    StoreState::Down,
                    Some(format!("no answer within {:?}", self.timeout)),
                );
                Err(StoreError::Timeout)
            }
        }
    }

    /// Connects, then watches the store until `stop`: pings it at once when
    /// a call found it down and every `DOWN_PING_EVERY` after, marks it up
    /// when it answers, and replaces a connection that stopped answering
    /// altogether (a peer gone without a word: a failover, a dropped NAT
    /// entry). Runs on the background runtime (see the module's doc).
    pub async fn keep(self: Arc<Self>, stop: CancellationToken) {
        let _ = self.runtime.set(tokio::runtime::Handle::current());
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_secs(1))))
            .set_response_timeout(Some(self.timeout.max(Duration::from_millis(500))))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(2);
        loop {
            if !self.connect(&config, &stop).await {
                break;
            }
            let mut failed_pings = 0;
            loop {
                let every = match self.state() {
                    StoreState::Up => UP_PING_EVERY,
                    _ => DOWN_PING_EVERY,
                };
                tokio::select! {
                    () = stop.cancelled() => {
                        self.connection.store(None);
                        return;
                    }
                    () = tokio::time::sleep(every) => {}
                    () = self.wake.notified() => {}
                }
                if self.ping().await {
                    failed_pings = 0;
                } else {
                    failed_pings += 1;
                }
                if failed_pings >= REPLACE_AFTER_FAILED_PINGS {
                    log::warn!("cluster store {}: connecting anew", self.shown_url);
                    self.connection.store(None);
                    break;
                }
            }
        }
        self.connection.store(None);
    }

    /// Connects (retrying with a growing pause); false when stopped first.
    async fn connect(&self, config: &ConnectionManagerConfig, stop: &CancellationToken) -> bool {
        let mut backoff = DOWN_PING_EVERY;
        loop {
            let connect = self
                .client
                .get_connection_manager_with_config(config.clone());
            let connected = tokio::select! {
                () = stop.cancelled() => return false,
                c = tokio::time::timeout(Duration::from_secs(5), connect) => c,
            };
            match connected {
                Ok(Ok(manager)) => {
                    self.connection.store(Some(Arc::new(manager)));
                    self.set_state(StoreState::Up, None);
                    return true;
                }
                Ok(Err(e)) => self.set_state(StoreState::Down, Some(e.category().to_string())),
                Err(_) => self.set_state(StoreState::Down, Some("connect timed out".into())),
            }
            tokio::select! {
                () = stop.cancelled() => return false,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Whether the store answered a ping.
    async fn ping(&self) -> bool {
        let Some(connection) = self.connection.load_full() else {
            return false;
        };
        let mut connection = ConnectionManager::clone(&connection);
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        match tokio::time::timeout(self.timeout.max(Duration::from_millis(500)), ping).await {
            Ok(Ok(_)) => {
                self.set_state(StoreState::Up, None);
                true
            }
            Ok(Err(e)) => {
                self.set_state(StoreState::Down, Some(e.category().to_string()));
                false
            }
            Err(_) => {
                self.set_state(StoreState::Down, Some("ping timed out".into()));
                false
            }
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
