//! Attacks on the gateway's memory and on shared budgets: huge aggregate
//! parts, many transformed bodies at once, many concurrent cache fills, and
//! floods of distinct rate-limit keys. Memory is read from `/proc` (peak
//! resident size) and held to a bound derived from the configuration; the
//! README's "Memory" section states the same bounds.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const MIB: u64 = 1024;

/// `n` clients at once, each running `f`.
fn at_once<T: Send + 'static>(n: usize, f: impl Fn(usize) -> T + Send + Sync + 'static) -> Vec<T> {
    let f = std::sync::Arc::new(f);
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let f = std::sync::Arc::clone(&f);
            std::thread::spawn(move || f(i))
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// A JSON array of `len` bytes: `[0,0,...,0]`.
fn zeros(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.push(b'[');
    while v.len() < len - 2 {
        v.extend_from_slice(b"0,");
    }
    v.push(b'0');
    v.push(b']');
    v
}

/// Aggregate parts are checked and spliced, never built into a tree: four
/// parts of 4 MB each cost about their size, and all bodies held at once
/// stay within `server.max_buffered` (past it: 503).
#[test]
fn aggregate_parts_cost_their_size_and_share_one_budget() {
    let part = zeros(4_000_000);
    let answer_len = 4 * part.len() + r#"{"a":,"b":,"c":,"d":}"#.len();
    let parts = TestUpstream::with_handler("parts", move |_| {
        let mut r = Reply::typed(200, "application/json", "");
        r.body = part.clone();
        r
    });
    let mut body = format!(
        "upstreams:\n  parts:\n    targets: [{}]\nroutes:\n  - name: agg\n    match: {{ path: /agg }}\n    aggregate:\n      timeout: 20s\n      parts:\n",
        parts.addr
    );
    for k in ["a", "b", "c", "d"] {
        body.push_str(&format!(
            "        - {{ key: {k}, upstream: parts, path: /{k} }}\n"
        ));
    }
    let gw = gateway(&body).server("max_buffered: 40MiB").start();
    let (base, _) = gw.memory_kib();
    let url = gw.url("/agg");
    let one = client().get(&url).send().unwrap();
    assert_eq!(one.status(), 200);
    let bytes = one.bytes().unwrap();
    assert!(bytes.starts_with(b"{\"a\":[0,0,") && bytes.ends_with(b"0]}"));
    assert_eq!(bytes.len(), answer_len);
    let statuses = at_once(6, move |_| {
        let r = client().get(&url).send().unwrap();
        let status = r.status().as_u16();
        let body = r.bytes().unwrap();
        if status == 200 {
            assert_eq!(body.len(), answer_len);
        }
        status
    });
    assert!(
        statuses.iter().all(|s| [200, 503].contains(s)),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&503),
        "six answers of 32 MB at once fit 40 MiB? {statuses:?}"
    );
    let (_, peak) = gw.memory_kib();
    let grew = peak.saturating_sub(base);
    assert!(
        grew < 40 * MIB + 24 * MIB,
        "peak grew by {} MiB over {} MiB at start",
        grew / MIB,
        base / MIB
    );
}

/// Transformed bodies: each costs about twice its size, and all of them
/// together stay within `max_buffered`; the rest get 503.
#[test]
fn transformed_bodies_share_one_budget() {
    let mut doc = String::from("{\"password\":\"x\",\"items\":[");
    while doc.len() < 1_000_000 {
        doc.push_str("{\"id\":1,\"name\":\"abcdefgh\"},");
    }
    doc.push_str("{\"id\":2}]}");
    let app =
        TestUpstream::with_handler("app", move |_| Reply::typed(200, "application/json", &doc));
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: rules\n    match: {{ path_prefix: / }}\n    upstream: app\n    response_body: {{ remove_fields: [password] }}\n",
        app.addr
    ))
    .server("max_transform_size: 2MiB")
    .server("max_buffered: 8MiB")
    .start();
    let (base, _) = gw.memory_kib();
    let url = gw.url("/doc");
    let statuses = at_once(24, move |_| {
        let r = client().get(&url).send().unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        if status == 200 {
            assert!(!text.contains("password"));
            assert!(text.ends_with("{\"id\":2}]}"));
        } else {
            assert_eq!(status, 503, "{text}");
        }
        status
    });
    assert!(statuses.contains(&200), "{statuses:?}");
    let (_, peak) = gw.memory_kib();
    let grew = peak.saturating_sub(base);
    assert!(
        grew < 8 * MIB + 24 * MIB,
        "peak grew by {} MiB for 24 transforms of 1 MB",
        grew / MIB
    );
}

/// Concurrent cache fills are accounted against `cache.max_size`: past it
/// a response is served without being stored.
#[test]
fn concurrent_cache_fills_stay_within_the_cache_budget() {
    let body = vec![b'x'; 3_500_000];
    let app = TestUpstream::with_handler("app", move |_| {
        let mut r = Reply::typed(200, "application/octet-stream", "");
        r.body = body.clone();
        r.chunked = Some(256 * 1024);
        r.chunk_delay = Duration::from_millis(10);
        r
    });
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\ncache:\n  max_size: 32MiB\nroutes:\n  - name: files\n    match: {{ path_prefix: /f }}\n    upstream: app\n    cache: {{ ttl: 60s }}\n",
        app.addr
    ))
    .start();
    let (base, _) = gw.memory_kib();
    let addr = gw.addr;
    let lens = at_once(40, move |i| {
        let r = client().get(format!("http://{addr}/f/{i}")).send().unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().unwrap().len()
    });
    assert!(lens.iter().all(|n| *n == 3_500_000));
    let (_, peak) = gw.memory_kib();
    let grew = peak.saturating_sub(base);
    // The cache's max_size (entries and fills in flight together), plus
    // what 40 responses streaming at once cost without a cache (measured:
    // 27 MiB).
    assert!(
        grew < 32 * MIB + 40 * MIB,
        "peak grew by {} MiB for 40 fills of 3.5 MB",
        grew / MIB
    );
    // What was stored is served.
    let hits = (0..40)
        .filter(|i| {
            client()
                .get(gw.url(&format!("/f/{i}")))
                .send()
                .unwrap()
                .headers()["x-cache"]
                == "HIT"
        })
        .count();
    assert!(hits >= 1, "nothing was stored");
}

/// Keep-alive connection that sends requests and reads status codes.
struct Conn(TcpStream, Vec<u8>);

impl Conn {
    fn open(addr: std::net::SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn(s, Vec::new())
    }

    /// Sends a GET with these headers; the status.
    fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> u16 {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.0.write_all(req.as_bytes()).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = self.1.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.1[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if self.1.len() >= end + 4 + len {
                    let status = head[9..12].parse().unwrap();
                    self.1.drain(..end + 4 + len);
                    return status;
                }
            }
            let n = self.0.read(&mut buf).unwrap();
            assert!(n > 0, "the gateway closed the connection");
            self.1.extend_from_slice(&buf[..n]);
        }
    }
}

/// A flood of distinct keys costs the flooder, never other keys: after
/// tens of thousands of random keys, every honest key that was never seen
/// gets its first request through, and a key that spent its budget during
/// the flood is still refused.
#[test]
fn a_flood_of_distinct_keys_locks_nobody_else_out() {
    let app = TestUpstream::with_handler("app", |_| Reply::text(200, "ok"));
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: keyed\n    match: {{ path_prefix: /keyed }}\n    upstream: app\n    rate_limit: {{ requests: 2, per: 1m, key: \"header:X-Api-Key\" }}\n  - name: by-ip\n    match: {{ path_prefix: /by-ip }}\n    upstream: app\n    rate_limit: {{ requests: 2, per: 1m, key: ip }}\n",
        app.addr
    ))
    .server("trusted_proxies: [127.0.0.1]")
    .start();
    let addr = gw.addr;
    let mut steady = Conn::open(addr);
    let key = [("X-Api-Key", "steady")];
    assert_eq!(steady.get("/keyed", &key), 200);
    assert_eq!(steady.get("/keyed", &key), 200);
    assert_eq!(steady.get("/keyed", &key), 429);
    let ip6 = [("X-Forwarded-For", "2001:db8:ffff:1::1")];
    assert_eq!(steady.get("/by-ip", &ip6), 200);
    assert_eq!(steady.get("/by-ip", &ip6), 200);
    assert_eq!(steady.get("/by-ip", &ip6), 429);

    // The flood: random API keys, and IPv6 clients rotating through the
    // /64s of one /48.
    let per_thread = 3_000;
    at_once(4, move |t| {
        let mut c = Conn::open(addr);
        for i in 0..per_thread {
            let n = t * per_thread + i;
            let k = format!("flood-{n}-{}", n.wrapping_mul(2654435761));
            c.get("/keyed", &[("X-Api-Key", &k)]);
            let ip = format!("2001:db8:1:{:x}::1", n % 65536);
            c.get("/by-ip", &[("X-Forwarded-For", &ip)]);
        }
    });
    // Honest, never-seen keys pass their first request.
    let mut honest = Conn::open(addr);
    for i in 0..40 {
        let k = format!("honest-{i}");
        assert_eq!(honest.get("/keyed", &[("X-Api-Key", &k)]), 200, "{k}");
        let ip = format!("2001:db8:{:x}::7", 0x100 + i);
        assert_eq!(
            honest.get("/by-ip", &[("X-Forwarded-For", &ip)]),
            200,
            "{ip}"
        );
    }
    // The keys that spent their budget before the flood are still refused.
    assert_eq!(steady.get("/keyed", &key), 429);
    assert_eq!(steady.get("/by-ip", &ip6), 429);
}
