//! Shared helpers for the end-to-end tests: real upstream servers on
//! 127.0.0.1:0 that record what they receive, and the real `gatehouse`
//! binary started on a generated configuration.

#![allow(dead_code)]

pub mod dns;
pub mod h2client;
pub mod jwt;
pub mod otlp;
pub mod pki;
pub mod redis;

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;

pub const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

/// A request as an upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query, exactly as received.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What an upstream answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Send the body in chunks of this size with chunked framing.
    pub chunked: Option<usize>,
    /// Pause between chunks.
    pub chunk_delay: Duration,
}

impl Reply {
    pub fn text(status: u16, body: &str) -> Self {
        Reply {
            status,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: body.as_bytes().to_vec(),
            delay: Duration::ZERO,
            chunked: None,
            chunk_delay: Duration::ZERO,
        }
    }

    /// A reply with this content type and no other.
    pub fn typed(status: u16, content_type: &str, body: &str) -> Self {
        let mut r = Reply::text(status, body);
        r.headers = vec![("content-type".into(), content_type.into())];
        r
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

struct UpstreamState {
    name: String,
    requests: Mutex<Vec<Recorded>>,
    healthy: AtomicBool,
    health_checks: AtomicUsize,
    connections: AtomicUsize,
    handler: Handler,
}

/// A real HTTP/1.1 server on 127.0.0.1:0. `GET /health` answers 200 or 503
/// as set by [`TestUpstream::set_healthy`] and is counted apart; every other
/// request is recorded and answered by the handler.
pub struct TestUpstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestUpstream {
    /// Answers every request with `200` and the upstream's name as body,
    /// and an `X-Upstream` header naming it.
    pub fn named(name: &str) -> Self {
        let n = name.to_string();
        Self::with_handler(name, move |_| Reply::text(200, &n).header("x-upstream", &n))
    }

    pub fn with_handler(
        name: &str,
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        Self::serve(name, listener, Arc::new(handler))
    }

    /// [`TestUpstream::named`] on a given address (127.0.0.2:PORT, [::1]:PORT):
    /// the addresses a DNS name of the tests resolves to.
    pub fn named_at(name: &str, addr: SocketAddr) -> Self {
        let n = name.to_string();
        Self::with_handler_at(name, addr, move |_| {
            Reply::text(200, &n).header("x-upstream", &n)
        })
    }

    pub fn with_handler_at(
        name: &str,
        addr: SocketAddr,
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind(addr).expect("bind upstream");
        Self::serve(name, listener, Arc::new(handler))
    }

    fn serve(name: &str, listener: TcpListener, handler: Handler) -> Self {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            name: name.to_string(),
            requests: Mutex::new(Vec::new()),
            healthy: AtomicBool::new(true),
            health_checks: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            handler,
        });
        let runtime = server_runtime();
        let st = Arc::clone(&state);
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = Arc::clone(&st);
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(Arc::clone(&st), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestUpstream {
            addr,
            state,
            runtime: Some(runtime),
        }
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .expect("the upstream received no request")
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn health_checks(&self) -> usize {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection: the target is dead.
    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

type Chunks =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;
type ReplyBody = http_body_util::Either<Full<Bytes>, StreamBody<Chunks>>;

async fn handle(
    st: Arc<UpstreamState>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<ReplyBody>, Infallible> {
    let method = req.method().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let headers = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    if target == "/health" {
        st.health_checks.fetch_add(1, Ordering::SeqCst);
        let ok = st.healthy.load(Ordering::SeqCst);
        let mut resp = hyper::Response::new(http_body_util::Either::Left(Full::new(Bytes::from(
            if ok { "ok" } else { "down" },
        ))));
        *resp.status_mut() = if ok { 200 } else { 503 }.try_into().unwrap();
        return Ok(resp);
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => {
            return Ok(hyper::Response::new(http_body_util::Either::Left(
                Full::default(),
            )))
        }
    };
    let recorded = Recorded {
        method,
        target,
        headers,
        body,
    };
    let reply = (st.handler)(&recorded);
    st.requests.lock().unwrap().push(recorded);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let body = match reply.chunked {
        None => http_body_util::Either::Left(Full::new(Bytes::from(reply.body))),
        Some(size) => {
            let pause = reply.chunk_delay;
            let frames: Vec<Bytes> = reply
                .body
                .chunks(size.max(1))
                .map(Bytes::copy_from_slice)
                .collect();
            let stream =
                futures::StreamExt::then(futures::stream::iter(frames), move |chunk| async move {
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                    Ok::<_, Infallible>(Frame::data(chunk))
                });
            let chunks: Chunks = Box::pin(stream);
            http_body_util::Either::Right(StreamBody::new(chunks))
        }
    };
    let mut resp = hyper::Response::new(body);
    *resp.status_mut() = reply.status.try_into().unwrap();
    for (n, v) in &reply.headers {
        resp.headers_mut().append(
            hyper::header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    Ok(resp)
}

/// A port that was free a moment ago.
/// The runtime a test server (upstream, DNS, collector) runs on: one
/// worker, timers and I/O, apart from the test's own thread.
pub fn server_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A configuration for the real binary: `body` holds the upstreams and
/// routes; the harness adds `server`, `listen` and `admin`.
pub struct GatewayBuilder {
    body: String,
    server_extra: Vec<String>,
    admin_extra: Vec<String>,
    tls: Option<(PathBuf, PathBuf)>,
    /// A TLS listener's whole `tls` value (a YAML flow mapping), instead
    /// of `tls`.
    tls_block: Option<String>,
    env: Vec<(String, String)>,
    /// The plain listener's host: `127.0.0.1`, or `[::]` (IPv4 clients
    /// then arrive as IPv4-mapped IPv6 addresses).
    listen_host: &'static str,
}

pub fn gateway(body: &str) -> GatewayBuilder {
    GatewayBuilder {
        body: body.to_string(),
        server_extra: Vec::new(),
        admin_extra: Vec::new(),
        tls: None,
        tls_block: None,
        env: Vec::new(),
        listen_host: "127.0.0.1",
    }
}

impl GatewayBuilder {
    /// Adds a `server:` key, e.g. `"max_body: 1KiB"`.
    /// A line under `admin:` (`token: ...`).
    pub fn admin(mut self, line: &str) -> Self {
        self.admin_extra.push(line.to_string());
        self
    }

    pub fn server(mut self, line: &str) -> Self {
        self.server_extra.push(line.to_string());
        self
    }

    /// Adds a TLS listener with this certificate and key.
    pub fn tls(mut self, cert: &Path, key: &Path) -> Self {
        self.tls = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }

    /// Adds a TLS listener with this `tls` value, e.g.
    /// `{ certificates: [...], client_cert: required, client_ca: ca.pem }`.
    pub fn tls_block(mut self, block: &str) -> Self {
        self.tls_block = Some(block.to_string());
        self
    }

    /// Listens on `[::]`; the tests still connect to 127.0.0.1.
    pub fn dual_stack(mut self) -> Self {
        self.listen_host = "[::]";
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    pub fn start(self) -> Gateway {
        let mut last_log = String::new();
        // A port picked free may be taken before the gateway binds it: retry.
        for _ in 0..3 {
            match self.try_start() {
                Ok(g) => return g,
                Err(log) => last_log = log,
            }
        }
        panic!("gatehouse did not start:\n{last_log}");
    }

    fn try_start(&self) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let admin_port = free_port();
        let tls_port = (self.tls.is_some() || self.tls_block.is_some()).then(free_port);
        let mut yaml = format!(
            "server:\n  threads: 1\n  pid_file: {d}/gatehouse.pid\n  upgrade_sock: {d}/upgrade.sock\n  grace_period: 1s\n  graceful_shutdown_timeout: 1s\n",
            d = dir.path().display()
        );
        for line in &self.server_extra {
            yaml.push_str(&format!("  {line}\n"));
        }
        yaml.push_str(&format!("listen:\n  - \"{}:{port}\"\n", self.listen_host));
        if let (Some((cert, key)), Some(p)) = (&self.tls, tls_port) {
            yaml.push_str(&format!(
                "  - address: 127.0.0.1:{p}\n    tls: {{ cert: {}, key: {} }}\n",
                cert.display(),
                key.display()
            ));
        }
        if let (Some(block), Some(p)) = (&self.tls_block, tls_port) {
            yaml.push_str(&format!("  - address: 127.0.0.1:{p}\n    tls: {block}\n"));
        }
        yaml.push_str(&format!("admin:\n  listen: 127.0.0.1:{admin_port}\n"));
        for line in &self.admin_extra {
            yaml.push_str(&format!("  {line}\n"));
        }
        yaml.push_str(&self.body);
        let conf = dir.path().join("gatehouse.yaml");
        std::fs::write(&conf, &yaml).unwrap();
        let log = dir.path().join("gatehouse.log");
        let mut cmd = Command::new(BIN);
        cmd.arg("-c")
            .arg(&conf)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(
                std::fs::File::create(dir.path().join("stdout.log")).unwrap(),
            ))
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
        for (n, v) in &self.env {
            cmd.env(n, v);
        }
        let child = cmd.spawn().expect("spawn gatehouse");
        let mut gw = Gateway {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            tls_addr: tls_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            conf,
            log,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = gw.child.try_wait() {
                return Err(format!("{yaml}\n---\n{}", gw.log_text()));
            }
            let public_up = TcpStream::connect(gw.addr).is_ok();
            let admin_up = raw_request(
                gw.admin,
                b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            )
            .starts_with("HTTP/1.1 200");
            if public_up && admin_up {
                return Ok(gw);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("not ready in 20s\n{yaml}\n---\n{}", gw.log_text()))
    }
}

/// The real `gatehouse` process; killed when dropped.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub conf: PathBuf,
    pub log: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The gateway's resident memory now and its peak so far, in KiB (from
    /// `/proc`).
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Sends raw bytes on a new connection and returns everything the
    /// gateway sent back before closing (or going quiet for 3 s).
    pub fn raw(&self, request: &[u8]) -> String {
        raw_request(self.addr, request)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- gatehouse log ----\n{}", self.log_text());
        }
    }
}

pub fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    if s.write_all(request).is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A blocking client that keeps connections alive and ignores proxies.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Polls `check` until it holds, for at most `within`.
pub fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("not true within {within:?}: {what}");
}

/// Asserts a gateway-made error response: status, problem+json body with
/// the request id, and that the body names no address.
pub fn assert_problem(resp: reqwest::blocking::Response, status: u16) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "a gateway error must be problem+json"
    );
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["status"], status);
    assert_eq!(body["type"], "about:blank");
    assert_eq!(body["request_id"], id.as_str());
    let text = body.to_string();
    assert!(
        !text.contains("127.0.0.1"),
        "problem leaks an address: {text}"
    );
    body
}

/// A self-signed certificate for `names`, written as PEM files in `dir`.
pub fn self_signed(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// Runs `gatehouse -t -c FILE` on `yaml` and returns (exit code, stdout, stderr).
pub fn check_config(yaml: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("gatehouse.yaml");
    std::fs::write(&conf, yaml).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("-t").arg("-c").arg(&conf);
    for (n, v) in env {
        cmd.env(n, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn parse(text: &str) -> Option<RawResponse> {
        let (head, body) = text.split_once("\r\n\r\n")?;
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Some(RawResponse {
            status,
            headers,
            body: body.to_string(),
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request with a raw target (not normalized by any client
/// library) and `Connection: close`.
pub fn send_raw(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> RawResponse {
    let mut req = format!("{method} {target} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req.push_str("Host: gateway.test\r\n");
    }
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    let text = raw_request(addr, req.as_bytes());
    RawResponse::parse(&text)
        .unwrap_or_else(|| panic!("no HTTP response to {method} {target}: {text:?}"))
}

/// Sends `signal` (like "HUP", "QUIT", "TERM") to a process.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// An admin request: (status, body).
pub fn admin(gw: &Gateway, method: &str, target: &str) -> (u16, String) {
    let text = raw_request(
        gw.admin,
        format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    let r = RawResponse::parse(&text).unwrap_or_else(|| panic!("no admin answer: {text:?}"));
    (r.status, r.body)
}

/// Continuous load from several threads until stopped: returns the
/// number of requests that succeeded and the failures seen.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl Load {
    /// `fresh` threads open a new connection per request; `kept` threads
    /// keep one connection alive, reopening it (and resending, as HTTP
    /// clients do for idempotent requests) only when the server closed it
    /// before answering.
    pub fn start(addr: SocketAddr, path: &str, fresh: usize, kept: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..fresh + kept {
            let stop = Arc::clone(&stop);
            let path = path.to_string();
            let keep = i >= fresh;
            threads.push(std::thread::spawn(move || {
                let mut ok = 0;
                let mut failures = Vec::new();
                let mut conn: Option<TcpStream> = None;
                while !stop.load(Ordering::SeqCst) {
                    match one_request(addr, &path, keep, &mut conn) {
                        Ok(200) => ok += 1,
                        Ok(status) => failures.push(format!("status {status}")),
                        Err(e) => failures.push(e),
                    }
                }
                (ok, failures)
            }));
        }
        Load { stop, threads }
    }

    pub fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut ok = 0;
        let mut failures = Vec::new();
        for t in self.threads {
            let (o, f) = t.join().unwrap();
            ok += o;
            failures.extend(f);
        }
        (ok, failures)
    }
}

fn read_one(s: &mut TcpStream) -> Result<(u16, bool), String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(0) => {
                return Err(if head.is_empty() {
                    "closed".into()
                } else {
                    "truncated head".into()
                })
            }
            Ok(_) => head.push(byte[0]),
            Err(e) => {
                return Err(if head.is_empty() {
                    "closed".into()
                } else {
                    e.to_string()
                })
            }
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
    Ok((status, head.contains("connection: close")))
}

fn one_request(
    addr: SocketAddr,
    path: &str,
    keep: bool,
    conn: &mut Option<TcpStream>,
) -> Result<u16, String> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: load\r\n{}\r\n",
        if keep { "" } else { "Connection: close\r\n" }
    );
    for attempt in 0..2 {
        let reused = conn.is_some();
        if conn.is_none() {
            let s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).ok();
            *conn = Some(s);
        }
        let s = conn.as_mut().unwrap();
        let result = s
            .write_all(request.as_bytes())
            .map_err(|_| "closed".to_string())
            .and_then(|_| read_one(s));
        match result {
            Ok((status, close)) => {
                if close || !keep {
                    *conn = None;
                }
                return Ok(status);
            }
            // A kept-alive connection the server closed before answering:
            // reopen and resend once.
            Err(e) if reused && attempt == 0 && e == "closed" => {
                *conn = None;
            }
            Err(e) => {
                *conn = None;
                return Err(e);
            }
        }
    }
    Err("closed twice".into())
}

/// A sentinel request: `path` sent through `gw` on a fresh connection,
/// answered by `up`. What the gateway sent `up` before it (a smuggled or
/// truncated request) has arrived by the time it is answered, so a test
/// checks that nothing arrived after this instead of after a sleep.
pub fn sentinel(gw: &Gateway, up: &TestUpstream, path: &str) {
    let status = client().get(gw.url(path)).send().unwrap().status();
    assert_eq!(status, 200, "the sentinel {path} was not answered");
    assert!(
        up.requests().iter().any(|r| r.target == path),
        "the sentinel {path} did not reach {}",
        up.name()
    );
}

/// A client whose connections come from `ip` (a loopback address).
pub fn client_from(ip: &str) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The gateway's `/metrics` text.
pub fn metrics_text(gw: &Gateway) -> String {
    client()
        .get(format!("http://{}/metrics", gw.admin))
        .send()
        .unwrap()
        .text()
        .unwrap()
}

/// The sum of the `/metrics` series whose line starts with `line_start`
/// (0 when there is none).
pub fn metric_sum(gw: &Gateway, line_start: &str) -> f64 {
    metrics_text(gw)
        .lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Asserts `gatehouse -t` refuses each YAML, naming the path and the
/// message given, and never printing `secret`.
pub fn assert_config_errors(cases: &[(String, &str, &str)], secret: Option<&str>) {
    for (yaml, path, message) in cases {
        let (code, out, err) = check_config(yaml, &[]);
        let text = format!("{out}{err}");
        assert_ne!(code, 0, "{yaml}");
        assert!(text.contains(path), "{path} in:\n{text}");
        assert!(text.contains(message), "{message} in:\n{text}");
        if let Some(secret) = secret {
            assert!(!text.contains(secret), "{text}");
        }
    }
}

/// Kills the child when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn scopeguard(c: Child) -> Guard {
    Guard(c)
}

/// Starts `gatehouse -u` on `gw`'s configuration (its log in the
/// gateway's folder as `new.log`) and sends the old process SIGQUIT; true
/// once the old process has left, within 20 s.
pub fn upgrade(gw: &mut Gateway) -> (Guard, bool) {
    let new = Command::new(BIN)
        .arg("-u")
        .arg("-c")
        .arg(&gw.conf)
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(gw.dir.path().join("new.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let new = scopeguard(new);
    signal(gw.child.id(), "QUIT");
    let start = Instant::now();
    let gone = loop {
        if let Ok(Some(_)) = gw.child.try_wait() {
            break true;
        }
        if start.elapsed() > Duration::from_secs(20) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (new, gone)
}
