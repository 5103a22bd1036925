//! Hot reload: `SIGHUP` or `POST /reload` on the admin listener reads the
//! file again and swaps routes, upstreams, auth and limits in one pointer
//! swap. Requests in flight finish on the configuration they started with.
//! A file that fails validation changes nothing; its errors are logged and
//! returned. What did not change carries over: an upstream keeps its health
//! state and connection pool, a provider its keys and verified tokens, a
//! route its rate-limit budgets (and the cache keeps its entries).
//! Listeners, `server`, `admin`, `access_log` and the cache's size change
//! only by an upgrade; a reload that changes them says so.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::Serialize;

use crate::access_log::Sink;
use crate::config::{
    self, AdminSettings, Config, ConfigErrors, Listener, LoadError, ServerSettings,
};
use crate::gateway::Gateway;
use crate::metrics::Metrics;

/// What a successful reload loaded.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub routes: usize,
    pub upstreams: usize,
    pub providers: usize,
    /// Changes that need an upgrade to take effect.
    pub ignored: Vec<String>,
}

pub struct Reloader {
    path: PathBuf,
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    /// The parts fixed at start.
    started: FixedParts,
    /// One reload at a time.
    busy: tokio::sync::Mutex<()>,
    /// When the live configuration was loaded, and the last reload's end.
    history: std::sync::Mutex<History>,
}

struct History {
    loaded_at: std::time::SystemTime,
    last: Option<LastReload>,
}

struct LastReload {
    at: std::time::SystemTime,
    succeeded: bool,
    /// The errors of a refused file, or what a loaded one could not change.
    notes: Vec<String>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        gateway: Arc<Gateway>,
        metrics: Arc<Metrics>,
        started: FixedParts,
    ) -> Self {
        Reloader {
            path,
            gateway,
            metrics,
            started,
            busy: tokio::sync::Mutex::new(()),
            history: std::sync::Mutex::new(History {
                loaded_at: std::time::SystemTime::now(),
                last: None,
            }),
        }
    }

    fn remember(&self, succeeded: bool, notes: Vec<String>) {
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let at = std::time::SystemTime::now();
        if succeeded {
            history.loaded_at = at;
        }
        history.last = Some(LastReload {
            at,
            succeeded,
            notes,
        });
    }

    /// For `/status`: when the live configuration was loaded, and how the
    /// last reload went (`null` before one).
    pub fn history(&self) -> serde_json::Value {
        let unix = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let last = history.last.as_ref().map(|l| {
            serde_json::json!({
                "at": unix(l.at),
                "result": if l.succeeded { "success" } else { "failure" },
                "notes": l.notes,
            })
        });
        serde_json::json!({ "loaded_at": unix(history.loaded_at), "last_reload": last })
    }

    pub async fn reload(&self) -> Result<Summary, ConfigErrors> {
        let _one_at_a_time = self.busy.lock().await;
        let path = self.path.clone();
        let previous = self.gateway.current();
        // Reading files and resolving names blocks: not on a worker thread.
        let loaded =
            tokio::task::spawn_blocking(move || config::load_after(&path, Some(&previous)))
                .await
                .unwrap_or_else(|e| {
                    Err(LoadError::Read {
                        path: self.path.display().to_string(),
                        source: std::io::Error::other(e.to_string()),
                    })
                });
        let config = match loaded {
            Ok(c) => c,
            Err(e) => {
                self.metrics.reloads.with_label_values(&["failure"]).inc();
                let errors = match e {
                    LoadError::Invalid(errors) => errors,
                    LoadError::Read { .. } => ConfigErrors(vec![config::ConfigError {
                        path: String::new(),
                        position: None,
                        message: e.to_string(),
                    }]),
                };
                for error in errors.iter() {
                    log::error!("reload refused: {error}");
                }
                self.remember(false, errors.iter().map(|e| e.to_string()).collect());
                return Err(errors);
            }
        };
        let ignored: Vec<String> = (self.started)
            .changed_in(&config)
            .map(|section| format!("{section}: changes only by an upgrade"))
            .collect();
        for note in &ignored {
            log::warn!("reload: {note}");
        }
        let summary = Summary {
            routes: config.runtime.router.routes().len(),
            upstreams: config.runtime.upstreams.len(),
            providers: config.runtime.providers.len(),
            ignored,
        };
        self.gateway.swap(config.runtime);
        self.metrics.reloads.with_label_values(&["success"]).inc();
        log::info!(
            "configuration reloaded: {} routes, {} upstreams",
            summary.routes,
            summary.upstreams
        );
        self.remember(true, summary.ignored.clone());
        Ok(summary)
    }
}

/// What a reload cannot change: the running process built its listeners,
/// threads, log writer and cache from them.
pub struct FixedParts {
    listen: Vec<Listener>,
    server: ServerSettings,
    admin: Option<AdminSettings>,
    access_log: Sink,
    cache_max_size: Option<u64>,
    tracing: Option<crate::trace::TraceSettings>,
}

impl FixedParts {
    pub fn of(config: &Config) -> Self {
        FixedParts {
            listen: config.listeners.clone(),
            server: config.server.clone(),
            admin: config.admin.clone(),
            access_log: config.access_log.clone(),
            cache_max_size: config.cache_max_size,
            tracing: config.tracing.clone(),
        }
    }

    /// The sections `config` sets otherwise.
    pub fn changed_in(&self, config: &Config) -> impl Iterator<Item = &'static str> {
        [
            ("listen", self.listen != config.listeners),
            ("server", self.server != config.server),
            ("admin", self.admin != config.admin),
            ("access_log", self.access_log != config.access_log),
            (
                "cache.max_size",
                self.cache_max_size != config.cache_max_size,
            ),
            ("tracing", self.tracing != config.tracing),
        ]
        .into_iter()
        .filter_map(|(section, changed)| changed.then_some(section))
    }
}

/// Reloads on `SIGHUP`.
pub struct SighupService {
    reloader: Arc<Reloader>,
}

impl SighupService {
    pub fn new(reloader: Arc<Reloader>) -> Self {
        SighupService { reloader }
    }
}

#[async_trait]
impl BackgroundService for SighupService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    log::info!("SIGHUP: reloading the configuration");
                    let _ = self.reloader.reload().await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
