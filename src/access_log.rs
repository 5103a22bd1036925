//! The access log: one JSON object a line per request, to stdout or a file.
//! A request only formats its line and hands it to a bounded queue; a
//! writer thread does the I/O, so a slow disk never slows requests (when
//! the queue is full, lines are dropped and counted in
//! `gatehouse_access_log_dropped_total`). Joins the `logging` phase.
//!
//! The path is logged without its query, and no header is logged, so a
//! token or secret never reaches the log.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::Serialize;

use crate::metrics::Metrics;

const QUEUE: usize = 64 * 1024;
/// How often queued lines are written.
const BATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Off,
    Stdout,
    File(PathBuf),
}

/// One request, as logged.
#[derive(Serialize)]
pub struct Entry<'a> {
    pub ts: String,
    pub request_id: &'a str,
    pub client: Option<std::net::IpAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub upstream: Option<&'a str>,
    pub target: Option<&'a str>,
    pub status: u16,
    pub duration_ms: f64,
    pub bytes_sent: usize,
    pub cache: Option<&'static str>,
    pub user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<&'static str>,
}

/// The request side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<Vec<u8>>>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// The request side and the writer to run as a background service.
    pub fn new(sink: Sink, metrics: Arc<Metrics>) -> (AccessLog, Option<Writer>) {
        if sink == Sink::Off {
            return (AccessLog { tx: None, metrics }, None);
        }
        let (tx, rx) = sync_channel(QUEUE);
        (
            AccessLog {
                tx: Some(tx),
                metrics,
            },
            Some(Writer {
                sink,
                rx: Mutex::new(Some(rx)),
            }),
        )
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn write(&self, entry: &Entry<'_>) {
        let Some(tx) = &self.tx else {
            return;
        };
        // Sized for a typical line, so serializing never reallocates.
        let mut line = Vec::with_capacity(384);
        if serde_json::to_writer(&mut line, entry).is_err() {
            return;
        }
        line.push(b'\n');
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.access_log_dropped.inc();
            }
        }
    }
}

/// Drains the queue on its own thread, started with the server (after a
/// daemon has forked).
pub struct Writer {
    sink: Sink,
    rx: Mutex<Option<Receiver<Vec<u8>>>>,
}

/// Writes what has queued up every `BATCH_EVERY`. Waking on each line
/// would cost a thread wake-up per request; sleeping between batches
/// costs none, and a batch is one write.
fn drain(rx: Receiver<Vec<u8>>, mut out: Box<dyn Write + Send>) {
    loop {
        std::thread::sleep(BATCH_EVERY);
        let mut wrote = false;
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    let _ = out.write_all(&line);
                    wrote = true;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if wrote {
            let _ = out.flush();
        }
    }
}

#[async_trait]
impl BackgroundService for Writer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(rx) = self.rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let out: Box<dyn Write + Send> = match &self.sink {
            Sink::Off => return,
            Sink::Stdout => Box::new(std::io::BufWriter::new(std::io::stdout())),
            Sink::File(path) => match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(f) => Box::new(std::io::BufWriter::new(f)),
                Err(e) => {
                    log::error!("access log {}: {e}; lines will be dropped", path.display());
                    return;
                }
            },
        };
        let _ = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || drain(rx, out));
        let _ = shutdown.changed().await;
    }
}

/// Now, as RFC 3339 with milliseconds.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
