//! A real `redis-server` for a test: its own process on a free port, no
//! persistence, killed when dropped; killed and restarted on the same port
//! to test failures. Commands are sent as raw RESP, so the tests need no
//! Redis client of their own.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// With [`Redis::start_tls`]: the TLS port (the plain one stays, for
    /// the test's own commands) and the server's TLS arguments.
    pub tls_port: Option<u16>,
    tls_args: Vec<String>,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts `redis-server` on a free port; fails naming the install
    /// script when it is missing (never skips).
    pub fn start() -> Redis {
        Self::start_with(None)
    }

    /// Starts it with a TLS port too, serving `cert` and `key` (clients
    /// are not asked for certificates).
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Redis {
        Self::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&std::path::Path, &std::path::Path)>) -> Redis {
        let mut redis = Redis {
            child: None,
            port: 0,
            tls_port: None,
            tls_args: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        for _ in 0..3 {
            redis.port = super::free_port();
            if let Some((cert, key)) = tls {
                let port = super::free_port();
                redis.tls_port = Some(port);
                redis.tls_args = vec![
                    "--tls-port".into(),
                    port.to_string(),
                    "--tls-cert-file".into(),
                    cert.display().to_string(),
                    "--tls-key-file".into(),
                    key.display().to_string(),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ];
            }
            if redis.spawn() {
                return redis;
            }
        }
        panic!(
            "redis-server did not start on a free port:\n{}",
            redis.log()
        );
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--enable-debug-command", "local"])
            .args(["--dir", &self.dir.path().display().to_string()])
            .args(["--logfile", &self.log_path()])
            .args(&self.tls_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed: run scripts/install-deps.sh (it installs Debian's redis-server)"
            ),
            Err(e) => panic!("start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            if self.try_command(&["PING"]).as_deref() == Some("PONG") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn log_path(&self) -> String {
        self.dir.path().join("redis.log").display().to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The `rediss://` URL of the TLS port, by the name its certificate
    /// holds.
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("started with start_tls");
        format!("rediss://localhost:{port}/0")
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart:\n{}",
            self.log()
        );
    }

    /// Sends one command; the reply as text (a status, bulk string or
    /// integer; an array's items joined by newlines).
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args)
            .unwrap_or_else(|| panic!("redis command {args:?} failed"))
    }

    fn try_command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        stream.write_all(&encode(args)).ok()?;
        read_reply(&mut BufReader::new(stream))
    }

    /// Makes the server stall for `seconds` (`DEBUG SLEEP`), from a thread
    /// of its own; returns once the stall has begun.
    pub fn stall(&self, seconds: u32) -> std::thread::JoinHandle<()> {
        let port = self.port;
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .write_all(&encode(&["DEBUG", "SLEEP", &seconds.to_string()]))
            .unwrap();
        let handle = std::thread::spawn(move || {
            stream
                .set_read_timeout(Some(Duration::from_secs(u64::from(seconds) + 10)))
                .unwrap();
            let mut buf = [0u8; 16];
            let _ = stream.read(&mut buf);
        });
        // The stall has begun once a second connection's PING goes
        // unanswered for a while.
        let mut probe = TcpStream::connect(("127.0.0.1", port)).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        loop {
            probe.write_all(&encode(&["PING"])).unwrap();
            let mut line = String::new();
            if BufReader::new(&probe).read_line(&mut line).is_err() {
                break;
            }
        }
        handle
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

fn read_reply(reader: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(1.min(line.len()));
    match kind {
        "+" | ":" => Some(rest.to_string()),
        "-" => Some(format!("ERR {rest}")),
        "$" => {
            let len: i64 = rest.parse().ok()?;
            if len < 0 {
                return Some(String::new());
            }
            let mut buf = vec![0u8; len as usize + 2];
            reader.read_exact(&mut buf).ok()?;
            buf.truncate(len as usize);
            Some(String::from_utf8_lossy(&buf).into_owned())
        }
        "*" => {
            let n: i64 = rest.parse().ok()?;
            let mut items = Vec::new();
            for _ in 0..n.max(0) {
                items.push(read_reply(reader)?);
            }
            Some(items.join("\n"))
        }
        _ => None,
    }
}
