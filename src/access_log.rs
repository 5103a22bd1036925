//! The access log: one JSON object a line per request, to stdout or a file.
//! A request only formats its line onto the end of a shared batch (one
//! buffer per worker thread); a writer thread takes the batch every `BATCH_EVERY` and
//! does the I/O, so a slow disk never slows requests (when the batch is full,
//! lines are dropped and counted in `gatehouse_access_log_dropped_total`).
//! Joins the `logging` phase.
//!
//! The path is logged without its query, and no header is logged, so a
//! token or secret never reaches the log.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How much may wait for the writer: about a second of lines at full load,
/// so only a stalled disk loses any.
const MAX_BATCH: usize = 8 << 20;
/// A batch's capacity kept between writes; a burst's larger buffer is let go.
const KEEP_CAPACITY: usize = 256 << 10;
/// How often the batch is written.
const BATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Off,
    Stdout,
    File(PathBuf),
}

/// One request, as logged.
pub struct Entry<'a> {
    pub ts: std::time::SystemTime,
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
    /// Left out when `None`.
    pub error: Option<&'a str>,
    /// Left out when `None`.
    pub body: Option<&'static str>,
    /// With `tracing`; left out when `None`.
    pub trace_id: Option<&'a str>,
}

impl Entry<'_> {
    /// The entry as one JSON object, keys in a fixed order. Laid out here
    /// rather than derived: a derived serializer escapes every key as well as
    /// every value, which cost half of the line. Every string value still
    /// goes through serde_json's escaping.
    pub fn write_json(&self, out: &mut Vec<u8>, stamp: &mut Stamp) -> std::io::Result<()> {
        out.extend_from_slice(b"{\"ts\":\"");
        stamp.write(out, self.ts);
        out.extend_from_slice(b"\",\"request_id\":");
        json_str(out, self.request_id)?;
        out.extend_from_slice(b",\"client\":");
        match self.client {
            Some(ip) => {
                out.push(b'"');
                crate::forwarding::push_ip(out, ip);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"method\":");
        json_str(out, self.method)?;
        out.extend_from_slice(b",\"path\":");
        json_str(out, self.path)?;
        out.extend_from_slice(b",\"route\":");
        json_str(out, self.route)?;
        out.extend_from_slice(b",\"upstream\":");
        json_opt_str(out, self.upstream)?;
        out.extend_from_slice(b",\"target\":");
        json_opt_str(out, self.target)?;
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(digits.format(self.status).as_bytes());
        out.extend_from_slice(b",\"duration_ms\":");
        serde_json::to_writer(&mut *out, &self.duration_ms)?;
        out.extend_from_slice(b",\"bytes_sent\":");
        out.extend_from_slice(digits.format(self.bytes_sent).as_bytes());
        out.extend_from_slice(b",\"cache\":");
        json_opt_str(out, self.cache)?;
        out.extend_from_slice(b",\"user\":");
        json_opt_str(out, self.user)?;
        if let Some(error) = self.error {
            out.extend_from_slice(b",\"error\":");
            json_str(out, error)?;
        }
        if let Some(body) = self.body {
            out.extend_from_slice(b",\"body\":");
            json_str(out, body)?;
        }
        if let Some(trace_id) = self.trace_id {
            out.extend_from_slice(b",\"trace_id\":");
            json_str(out, trace_id)?;
        }
        out.push(b'}');
        Ok(())
    }
}

/// The RFC 3339 text of the last second a line was written in, kept so
/// that lines of the same second (most of them, under load) copy it rather
/// than format the date again; only the milliseconds are new per line.
#[derive(Default)]
pub struct Stamp {
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS`, without the `Z`.
    text: String,
}

impl Stamp {
    fn write(&mut self, out: &mut Vec<u8>, ts: std::time::SystemTime) {
        let since_epoch = ts.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let second = since_epoch.as_secs();
        if self.second != Some(second) {
            use std::fmt::Write as _;
            self.text.clear();
            let whole = std::time::UNIX_EPOCH + std::time::Duration::from_secs(second);
            let _ = write!(self.text, "{}", humantime::format_rfc3339_seconds(whole));
            self.text.pop(); // the `Z`, written after the milliseconds
            self.second = Some(second);
        }
        out.extend_from_slice(self.text.as_bytes());
        let millis = since_epoch.subsec_millis();
        let digits = [
            b'.',
            b'0' + (millis / 100) as u8,
            b'0' + (millis / 10 % 10) as u8,
            b'0' + (millis % 10) as u8,
            b'Z',
        ];
        out.extend_from_slice(&digits);
    }
}

fn json_str(out: &mut Vec<u8>, s: &str) -> std::io::Result<()> {
    serde_json::to_writer(out, s).map_err(std::io::Error::from)
}

fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) -> std::io::Result<()> {
    match s {
        Some(s) => json_str(out, s),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

/// The request side: cheap to clone, never waits on I/O.
#[derive(Clone)]
pub struct AccessLog {
    batch: Option<Arc<Batch>>,
    metrics: Arc<Metrics>,
}

/// Lines not yet written. Buffers appended in place: a line per request
/// costs no allocation of its own and no hand-over between threads. One
/// buffer per worker thread, so workers do not queue on one lock.
struct Batch {
    shards: Box<[Mutex<Shard>]>,
    /// Bytes in all shards, held to `MAX_BATCH`; changed under a shard's
    /// lock, with the bytes it counts.
    pending: AtomicUsize,
    /// Spreads threads over the shards.
    thread_hash: ahash::RandomState,
}

/// One worker's lines, and the time text they share.
#[derive(Default)]
struct Shard {
    lines: Vec<u8>,
    stamp: Stamp,
}

impl Batch {
    fn new(shards: usize) -> Batch {
        Batch {
            shards: (0..shards.max(1)).map(|_| Mutex::default()).collect(),
            pending: AtomicUsize::new(0),
            thread_hash: ahash::RandomState::new(),
        }
    }

    /// A free shard, this thread's own first.
    fn lock_any(&self) -> MutexGuard<'_, Shard> {
        let n = self.shards.len();
        let first = if n == 1 {
            0
        } else {
            self.thread_hash.hash_one(std::thread::current().id()) as usize % n
        };
        (0..n)
            .find_map(|k| {
                let shard = &self.shards[(first + k) % n];
                match shard.try_lock() {
                    Ok(lines) => Some(lines),
                    Err(TryLockError::Poisoned(e)) => Some(recover(shard, e.into_inner())),
                    Err(TryLockError::WouldBlock) => None,
                }
            })
            .unwrap_or_else(|| lock(&self.shards[first]))
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard
        .lock()
        .unwrap_or_else(|e| recover(shard, e.into_inner()))
}

/// A thread panicked while writing a line into `shard`: drop the part
/// line, so the next one does not run into it, and keep logging.
fn recover<'a>(shard: &Mutex<Shard>, mut held: MutexGuard<'a, Shard>) -> MutexGuard<'a, Shard> {
    let lines = &mut held.lines;
    let whole = lines.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    lines.truncate(whole);
    shard.clear_poison();
    held
}

impl AccessLog {
    /// The request side and the writer to run as a background service;
    /// `workers` is the proxy's worker thread count (`server.threads`).
    /// The log, and its writer (none when `sink` is off), which ends once
    /// `stop` is given and [`LogCloser::join`] wakes it.
    pub fn new(
        sink: Sink,
        metrics: Arc<Metrics>,
        workers: usize,
        stop: CancellationToken,
    ) -> (AccessLog, Option<Writer>) {
        if sink == Sink::Off {
            return (
                AccessLog {
                    batch: None,
                    metrics,
                },
                None,
            );
        }
        let batch = Arc::new(Batch::new(workers));
        (
            AccessLog {
                batch: Some(Arc::clone(&batch)),
                metrics: Arc::clone(&metrics),
            },
            Some(Writer {
                sink,
                batch,
                metrics,
                running: Arc::new(Running {
                    thread: Mutex::new(None),
                    stop,
                }),
            }),
        )
    }

    pub fn enabled(&self) -> bool {
        self.batch.is_some()
    }

    pub fn write(&self, entry: &Entry<'_>) {
        let Some(batch) = &self.batch else {
            return;
        };
        let mut shard = batch.lock_any();
        if batch.pending.load(Ordering::Relaxed) >= MAX_BATCH {
            drop(shard);
            self.metrics.access_log_dropped.inc();
            return;
        }
        let Shard { lines, stamp } = &mut *shard;
        let start = lines.len();
        if entry.write_json(lines, stamp).is_err() {
            lines.truncate(start);
            return;
        }
        lines.push(b'\n');
        batch
            .pending
            .fetch_add(lines.len() - start, Ordering::Relaxed);
    }
}

/// Writes the batch on its own thread, started with the server (after a
/// daemon has forked).
pub struct Writer {
    sink: Sink,
    batch: Arc<Batch>,
    metrics: Arc<Metrics>,
    running: Arc<Running>,
}

/// The writer thread, once started, and the gateway's stop signal.
#[derive(Default)]
struct Running {
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: CancellationToken,
}

/// Waits for the log's last lines once the gateway has stopped.
pub struct LogCloser(Arc<Running>);

impl Writer {
    /// The handle to keep until the server has stopped serving.
    pub fn closer(&self) -> LogCloser {
        LogCloser(Arc::clone(&self.running))
    }
}

impl LogCloser {
    /// Once the stop signal is given (no request is left), wakes the writer
    /// for its last batch and waits for it: lines logged since the batch
    /// before would otherwise go with the process.
    pub fn join(self) {
        // Given already by the gateway; joining without it would wait forever.
        self.0.stop.cancel();
        let thread = self.0.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// Takes each shard's lines every `BATCH_EVERY` and writes them. Waking on
/// each line would cost a thread wake-up per request; sleeping between
/// batches costs none, and a shard's lines are one write. Ends, after one
/// last pass, once the stop signal is given.
fn drain(batch: Arc<Batch>, mut out: Box<dyn Write + Send>, running: &Running, metrics: &Metrics) {
    let mut taken = Vec::new();
    loop {
        std::thread::park_timeout(BATCH_EVERY);
        let last = running.stop.is_cancelled();
        for shard in batch.shards.iter() {
            std::mem::swap(&mut lock(shard).lines, &mut taken);
            if taken.is_empty() {
                continue;
            }
            batch.pending.fetch_sub(taken.len(), Ordering::Relaxed);
            if out.write_all(&taken).and_then(|()| out.flush()).is_err() {
                let lines = memchr::memchr_iter(b'\n', &taken).count();
                metrics.access_log_dropped.inc_by(lines as u64);
            }
            taken.clear();
            taken.shrink_to(KEEP_CAPACITY);
        }
        if last {
            return;
        }
    }
}

#[async_trait]
impl BackgroundService for Writer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let batch = Arc::clone(&self.batch);
        let out: Box<dyn Write + Send> = match &self.sink {
            Sink::Off => return,
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::File(path) => match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(f) => Box::new(f),
                Err(e) => {
                    log::error!("access log {}: {e}; lines will be dropped", path.display());
                    return;
                }
            },
        };
        let running = Arc::clone(&self.running);
        let metrics = Arc::clone(&self.metrics);
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || drain(batch, out, &running, &metrics));
        match spawned {
            Ok(thread) => {
                if let Ok(mut slot) = self.running.thread.lock() {
                    *slot = Some(thread);
                }
            }
            Err(e) => {
                log::error!("access log: cannot start its writer: {e}; lines will be dropped")
            }
        }
        let _ = shutdown.changed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer's state once told to finish: `drain` makes one pass and ends.
    fn finished() -> Running {
        let running = Running::default();
        running.stop.cancel();
        running
    }

    fn entry<'a>(path: &'a str, route: &'a str, user: Option<&'a str>) -> Entry<'a> {
        Entry {
            ts: std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_764_000_000_123),
            request_id: "req-1",
            client: Some("2001:db8::7".parse().unwrap()),
            method: "GET",
            path,
            route,
            upstream: Some("users"),
            target: None,
            status: 404,
            duration_ms: 1.25,
            bytes_sent: 42,
            cache: Some("MISS"),
            user,
            trace_id: None,
            error: None,
            body: Some("over max_transform_size"),
        }
    }

    #[test]
    fn the_kept_second_gives_the_same_text_as_formatting_each_time() {
        use std::time::{Duration, UNIX_EPOCH};
        let mut stamp = Stamp::default();
        // Within one second, into the next, back to an earlier one (a clock
        // step), and the millisecond digits' edges.
        for ms in [
            1_764_820_229_000u64,
            1_764_820_229_007,
            1_764_820_229_070,
            1_764_820_229_999,
            1_764_820_230_000,
            1_764_820_230_500,
            946_684_799_999,
            0,
        ] {
            let ts = UNIX_EPOCH + Duration::from_millis(ms);
            let mut out = Vec::new();
            stamp.write(&mut out, ts);
            let expected = humantime::format_rfc3339_millis(ts).to_string();
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{ms}");
        }
    }

    #[test]
    fn lines_are_json_with_every_field_and_hostile_text_escaped() {
        let path = "/a\"b\\c\u{1}\u{7f}\nd/é";
        let route = "r\"1";
        let user = "alice\",\"admin\":true,\"x\":\"";
        let mut line = Vec::new();
        entry(path, route, Some(user))
            .write_json(&mut line, &mut Stamp::default())
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "ts",
                "request_id",
                "client",
                "method",
                "path",
                "route",
                "upstream",
                "target",
                "status",
                "duration_ms",
                "bytes_sent",
                "cache",
                "user",
                "body"
            ]
        );
        assert_eq!(v["ts"], "2025-11-24T16:00:00.123Z");
        assert_eq!(v["client"], "2001:db8::7");
        assert_eq!(v["path"], path);
        assert_eq!(v["route"], route);
        assert_eq!(v["user"], user);
        assert_eq!(v["target"], serde_json::Value::Null);
        assert_eq!(v["status"], 404);
        assert_eq!(v["duration_ms"], 1.25);
        assert_eq!(v["bytes_sent"], 42);
        assert!(v.get("error").is_none());

        let mut line = Vec::new();
        let mut e = entry("/", "r", None);
        e.error = Some("ConnectRefused");
        e.body = None;
        e.client = None;
        e.write_json(&mut line, &mut Stamp::default()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["error"], "ConnectRefused");
        assert_eq!(v["user"], serde_json::Value::Null);
        assert_eq!(v["client"], serde_json::Value::Null);
        assert!(v.get("body").is_none());
    }

    /// Collects what the writer thread writes.
    #[derive(Clone, Default)]
    struct Collected(Arc<Mutex<Vec<u8>>>);

    impl Write for Collected {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_batch_drops_and_counts_lines_and_the_writer_writes_whole_lines() {
        let metrics = Arc::new(Metrics::new());
        let (log, writer) = AccessLog::new(
            Sink::Stdout,
            Arc::clone(&metrics),
            1,
            CancellationToken::new(),
        );
        let batch = Arc::clone(&writer.unwrap().batch);
        let shard = || lock(&batch.shards[0]).lines.clone();
        log.write(&entry("/first", "r", None));
        let one_line = shard().len();
        assert!(one_line > 100 && shard().ends_with(b"\n"));

        assert_eq!(batch.pending.load(Ordering::Relaxed), one_line);

        // At the bound, the next line is refused whole and counted.
        batch.pending.store(MAX_BATCH, Ordering::Relaxed);
        log.write(&entry("/over", "r", None));
        assert_eq!(shard().len(), one_line);
        assert_eq!(metrics.access_log_dropped.get(), 1);

        // The writer, told to finish, takes the batch, writes it and ends.
        batch.pending.store(one_line, Ordering::Relaxed);
        log.write(&entry("/second", "r", None));
        let out = Collected::default();
        let thread = {
            let out = out.clone();
            std::thread::spawn(move || drain(batch, Box::new(out), &finished(), &Metrics::new()))
        };
        thread.join().unwrap();
        let written = out.0.lock().unwrap().clone();
        let lines: Vec<serde_json::Value> = written
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["path"], "/first");
        assert_eq!(lines[1]["path"], "/second");
        assert_eq!(metrics.access_log_dropped.get(), 1);
    }

    #[test]
    fn lines_from_many_threads_all_arrive_whole() {
        let metrics = Arc::new(Metrics::new());
        let (log, writer) = AccessLog::new(
            Sink::Stdout,
            Arc::clone(&metrics),
            3,
            CancellationToken::new(),
        );
        let batch = Arc::clone(&writer.unwrap().batch);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        log.write(&entry(&format!("/{t}/{i}"), "r", None));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let out = Collected::default();
        let sink = out.clone();
        std::thread::spawn(move || drain(batch, Box::new(sink), &finished(), &Metrics::new()))
            .join()
            .unwrap();
        let written = out.0.lock().unwrap().clone();
        let mut paths: Vec<String> = written
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_slice(l).unwrap();
                v["path"].as_str().unwrap().to_owned()
            })
            .collect();
        paths.sort();
        let mut expected: Vec<String> = (0..4)
            .flat_map(|t| (0..200).map(move |i| format!("/{t}/{i}")))
            .collect();
        expected.sort();
        assert_eq!(paths, expected);
        assert_eq!(metrics.access_log_dropped.get(), 0);
    }

    #[tokio::test]
    async fn closing_writes_the_last_lines_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let metrics = Arc::new(Metrics::new());
        let stop_log = CancellationToken::new();
        let sink = Sink::File(path.clone());
        let (log, writer) = AccessLog::new(sink, Arc::clone(&metrics), 1, stop_log.clone());
        let writer = Arc::new(writer.unwrap());
        let closer = writer.closer();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let service = {
            let writer = Arc::clone(&writer);
            tokio::spawn(async move { writer.start(shutdown).await })
        };
        // The writer thread is running once the service has handed it over.
        while writer.running.thread.lock().unwrap().is_none() {
            tokio::task::yield_now().await;
        }
        log.write(&entry("/last", "r", None));
        // Not waiting for the next batch: stopping writes it and returns after.
        stop_log.cancel();
        closer.join();
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["path"], "/last");
        let _ = stop.send(true);
        service.await.unwrap();
    }

    #[test]
    fn a_line_cut_short_by_a_panic_is_dropped_and_logging_goes_on() {
        let metrics = Arc::new(Metrics::new());
        let (log, writer) = AccessLog::new(Sink::Stdout, metrics, 1, CancellationToken::new());
        let batch = Arc::clone(&writer.unwrap().batch);
        log.write(&entry("/before", "r", None));
        let poisoner = Arc::clone(&batch);
        let panicked = std::thread::spawn(move || {
            let mut shard = poisoner.lock_any();
            shard.lines.extend_from_slice(b"{\"ts\":\"");
            panic!("mid-line");
        })
        .join();
        assert!(panicked.is_err() && batch.shards[0].is_poisoned());
        log.write(&entry("/after", "r", None));
        let text = String::from_utf8(lock(&batch.shards[0]).lines.clone()).unwrap();
        let paths: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["path"].to_string())
            .collect();
        assert_eq!(paths, ["\"/before\"", "\"/after\""]);
        assert!(!batch.shards[0].is_poisoned());
    }
}
