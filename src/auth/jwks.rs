//! A JWK set fetched from `jwks_url`: at start and every `jwks_refresh`, in
//! the background. A token naming an unknown `kid` asks for an early
//! refresh, granted at most once per `EARLY_REFRESH_GAP`, so a flood of
//! random kids cannot flood the identity provider. A failed fetch keeps the
//! last good set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::outbound::{Body, Client};
use arc_swap::ArcSwap;
use bytes::BytesMut;
use jsonwebtoken::Algorithm;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::keys::KeySet;

/// The shortest time between two fetches asked for by unknown kids, unless
/// the environment's `GATEHOUSE_JWKS_EARLY_REFRESH_GAP` says otherwise.
pub const EARLY_REFRESH_GAP: Duration = Duration::from_secs(5);
/// After a failed fetch, the next try comes this soon (or at the refresh
/// interval, when shorter).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_JWKS_SIZE: usize = 1 << 20;

/// A parsed `jwks_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path_and_query: String,
}

impl JwksUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|_| format!("\"{url}\" is not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("\"{url}\" must start with https://")),
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("\"{url}\" names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        // Keys fetched in the clear could be swapped by anyone on the path.
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !tls && !loopback {
            return Err(format!(
                "\"{url}\": keys must be fetched over https:// (http:// only from loopback)"
            ));
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path_and_query = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        Ok(JwksUrl {
            tls,
            host,
            port,
            path_and_query,
        })
    }
}

pub struct RemoteJwks {
    url: JwksUrl,
    algorithms: Vec<Algorithm>,
    refresh: Duration,
    /// The shortest time between two early refreshes.
    early_gap: Duration,
    keys: ArcSwap<KeySet>,
    /// Bumped after every fetch attempt, for requests waiting on one.
    fetched: watch::Sender<u64>,
    /// When the last early refresh was asked for.
    last_early: Mutex<Option<Instant>>,
    /// Early refreshes asked for so far.
    asked: AtomicU64,
    /// How many of those the last finished fetch answers: the `asked`
    /// count when it started. A fetch already under way when a refresh is
    /// asked for answers none of it (it may hold the old keys).
    answered: watch::Sender<u64>,
    wake: Notify,
    /// Bumped each time a different key set is stored.
    generation: AtomicU64,
    /// What the last good fetch returned, to tell a change from a refresh.
    last_body: Mutex<Option<bytes::Bytes>>,
    /// The refresher's stop, once it runs: a request still holding this
    /// provider after a reload removed it asks nobody for an early fetch.
    refresher: OnceLock<CancellationToken>,
}

impl RemoteJwks {
    pub fn new(
        url: JwksUrl,
        algorithms: Vec<Algorithm>,
        refresh: Duration,
        early_gap: Duration,
    ) -> Self {
        RemoteJwks {
            url,
            algorithms,
            refresh,
            early_gap,
            keys: ArcSwap::from_pointee(KeySet::default()),
            fetched: watch::Sender::new(0),
            last_early: Mutex::new(None),
            asked: AtomicU64::new(0),
            answered: watch::Sender::new(0),
            wake: Notify::new(),
            generation: AtomicU64::new(0),
            last_body: Mutex::new(None),
            refresher: OnceLock::new(),
        }
    }

    pub fn keys(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// Waits, at most `wait`, for the first fetch to have been tried: a
    /// request arriving as the gateway starts is not refused for want of keys.
    pub async fn loaded(&self, wait: Duration) {
        let mut rx = self.fetched.subscribe();
        if *rx.borrow() > 0 {
            return;
        }
        let _ = tokio::time::timeout(wait, rx.wait_for(|n| *n > 0)).await;
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Asks for an early fetch and waits, at most `wait`, for a fetch that
    /// started after the asking. False when another early fetch was asked
    /// for too recently (nothing is fetched, nothing waited for).
    pub async fn refresh_now(&self, wait: Duration) -> bool {
        if self
            .refresher
            .get()
            .is_some_and(CancellationToken::is_cancelled)
        {
            return false;
        }
        {
            let mut last = self.last_early.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < self.early_gap) {
                return false;
            }
            *last = Some(Instant::now());
        }
        let mine = self.asked.fetch_add(1, Ordering::AcqRel) + 1;
        let mut answered = self.answered.subscribe();
        self.wake.notify_one();
        let _ = tokio::time::timeout(wait, answered.wait_for(|n| *n >= mine)).await;
        true
    }

    /// Fetches now, then on schedule or when woken, until `stop` (the
    /// provider left the configuration, or the gateway stopped).
    pub async fn run_until(self: Arc<Self>, client: Client, stop: CancellationToken) {
        let _ = self.refresher.set(stop.clone());
        tokio::select! {
            () = stop.cancelled() => {}
            () = self.refresh_forever(&client) => {}
        }
    }

    async fn refresh_forever(&self, client: &Client) {
        loop {
            // Only early refreshes are spaced apart (`refresh_now`): a key
            // published right after a scheduled fetch is still looked for.
            let answers = self.asked.load(Ordering::Acquire);
            let next = match self.fetch(client).await {
                Ok((set, body)) => {
                    let mut last = self.last_body.lock().unwrap_or_else(|p| p.into_inner());
                    // Unchanged keys keep the token cache warm.
                    if last.as_ref() != Some(&body) {
                        log::info!("JWKS {}: {} key(s) loaded", self.url.host, set.len());
                        self.keys.store(Arc::new(set));
                        self.generation.fetch_add(1, Ordering::Release);
                        *last = Some(body);
                    }
                    self.refresh
                }
                Err(e) => {
                    log::warn!(
                        "JWKS {}: fetch failed, keeping the last good key set: {e}",
                        self.url.host
                    );
                    self.refresh.min(RETRY_AFTER_FAILURE)
                }
            };
            self.fetched.send_modify(|n| *n += 1);
            self.answered.send_modify(|n| *n = (*n).max(answers));
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    async fn fetch(&self, client: &Client) -> Result<(KeySet, bytes::Bytes), String> {
        let body = tokio::time::timeout(FETCH_TIMEOUT, self.get(client))
            .await
            .map_err(|_| "timed out".to_string())??
            .freeze();
        Ok((KeySet::from_jwks(&body, &self.algorithms)?, body))
    }

    async fn get(&self, client: &Client) -> Result<BytesMut, String> {
        let u = &self.url;
        let addr = tokio::net::lookup_host((u.host.as_str(), u.port))
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", u.host))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", u.host))?;
        let mut peer = HttpPeer::new(addr, u.tls, u.host.clone());
        peer.options.connection_timeout = Some(FETCH_TIMEOUT);
        peer.options.total_connection_timeout = Some(FETCH_TIMEOUT);
        peer.options.read_timeout = Some(FETCH_TIMEOUT);
        let mut req = RequestHeader::build("GET", u.path_and_query.as_bytes(), None)
            .map_err(|e| e.to_string())?;
        let name = if u.host.contains(':') {
            format!("[{}]", u.host)
        } else {
            u.host.clone()
        };
        let host = if (u.tls && u.port == 443) || (!u.tls && u.port == 80) {
            name
        } else {
            format!("{name}:{}", u.port)
        };
        let headers = [
            ("Host", host.as_str()),
            ("Accept", "application/json"),
            ("User-Agent", "gatehouse"),
        ];
        for (n, v) in headers {
            req.insert_header(n, v).map_err(|e| e.to_string())?;
        }
        let answer = client
            .send(
                &peer,
                &req,
                Body::Keep {
                    cap: MAX_JWKS_SIZE,
                    hold: &mut |_| true,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        if answer.status() != 200 {
            return Err(format!("status {}", answer.status()));
        }
        Ok(answer.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = JwksUrl::parse("https://idp.example.com/.well-known/jwks.json").unwrap();
        assert_eq!(
            u,
            JwksUrl {
                tls: true,
                host: "idp.example.com".into(),
                port: 443,
                path_and_query: "/.well-known/jwks.json".into()
            }
        );
        let u = JwksUrl::parse("http://127.0.0.1:8080/keys?x=1").unwrap();
        assert_eq!(
            (u.tls, u.port, u.path_and_query.as_str()),
            (false, 8080, "/keys?x=1")
        );
        assert!(JwksUrl::parse("http://idp.example.com/keys")
            .unwrap_err()
            .contains("https"));
        assert!(JwksUrl::parse("http://localhost:9000/keys").is_ok());
        assert!(JwksUrl::parse("ftp://x/y").is_err());
        assert!(JwksUrl::parse("/just/a/path").is_err());
    }

    #[tokio::test]
    async fn early_refreshes_are_rate_limited() {
        let jwks = RemoteJwks::new(
            JwksUrl::parse("http://127.0.0.1:1/").unwrap(),
            vec![Algorithm::RS256],
            Duration::from_secs(600),
            EARLY_REFRESH_GAP,
        );
        let no_wait = Duration::ZERO;
        assert!(jwks.refresh_now(no_wait).await);
        for _ in 0..100 {
            assert!(!jwks.refresh_now(no_wait).await);
        }
    }
}
