//! What passes through a proxied route: header rules, request ids,
//! forwarding headers, hop-by-hop fields, body limits and bodies, keep-alive,
//! and the limits on a client's request head.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn simple(up: &TestUpstream, route_extra: &str) -> String {
    format!(
        "upstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n{route_extra}",
        up.addr
    )
}

#[test]
fn header_rules_run_on_requests_and_responses() {
    let up = TestUpstream::with_handler("app", |_| {
        Reply::text(200, "ok")
            .header("server", "upstream/1.0")
            .header("x-powered-by", "php")
            .header("x-internal", "42")
    });
    let gw = gateway(&simple(
        &up,
        concat!(
            "    request_headers:\n      set: { X-Gateway: gatehouse }\n      add: { X-Added: one }\n",
            "      remove: [Cookie]\n      rename: { X-Old: X-New }\n",
            "    response_headers:\n      remove: [Server, X-Powered-By]\n      rename: { X-Internal: X-Public }\n",
            "      set: { X-Frame-Options: DENY }\n      add: { X-Extra: \"yes\" }\n",
        ),
    ))
    .start();
    let r = client()
        .get(gw.url("/a"))
        .header("Cookie", "session=secret")
        .header("X-Old", "legacy")
        .header("X-Gateway", "spoofed")
        .header("X-Added", "client")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert!(h.get("server").is_none() && h.get("x-powered-by").is_none());
    assert!(h.get("x-internal").is_none());
    assert_eq!(h["x-public"], "42");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-extra"], "yes");
    let seen = up.last();
    assert_eq!(seen.header("cookie"), None);
    assert_eq!(seen.header("x-old"), None);
    assert_eq!(seen.header("x-new"), Some("legacy"));
    assert_eq!(seen.header("x-gateway"), Some("gatehouse"));
    assert_eq!(seen.header_all("x-added"), ["client", "one"]);
}

#[test]
fn request_ids_reach_the_upstream_and_come_back() {
    let up = TestUpstream::named("app");
    let gw = gateway(&simple(&up, "")).start();
    let c = client();
    let r = c
        .get(gw.url("/a"))
        .header("X-Request-Id", "req-123.abc")
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "req-123.abc");
    assert_eq!(up.last().header("x-request-id"), Some("req-123.abc"));

    for bad in ["has space", "<script>", &"x".repeat(200)] {
        let r = c
            .get(gw.url("/a"))
            .header("X-Request-Id", bad)
            .send()
            .unwrap();
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        assert_ne!(id, bad);
        assert_eq!(id.len(), 36, "a UUID is generated: {id}");
        assert_eq!(up.last().header("x-request-id"), Some(id.as_str()));
    }
    let a = c.get(gw.url("/a")).send().unwrap().headers()["x-request-id"].clone();
    let b = c.get(gw.url("/a")).send().unwrap().headers()["x-request-id"].clone();
    assert_ne!(a, b);
    // Errors made by the gateway carry one too.
    let r = send_raw(gw.addr, "GET", "/../x", &[("X-Request-Id", "err-1")]);
    assert_eq!(r.header("x-request-id"), Some("err-1"));
    assert!(r.body.contains("\"request_id\":\"err-1\""));
}

#[test]
fn forwarding_headers_are_set_by_the_gateway() {
    let up = TestUpstream::named("app");
    let gw = gateway(&simple(&up, "")).start();
    let r = send_raw(
        gw.addr,
        "GET",
        "/a",
        &[
            ("Host", "api.example.com:8443"),
            ("X-Forwarded-For", "203.0.113.1"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
        ],
    );
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.1, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some("api.example.com:8443")
    );
    assert_eq!(seen.header("host"), Some("api.example.com:8443"));
}

#[test]
fn a_dual_stack_listener_forwards_ipv4_clients_as_ipv4() {
    let up = TestUpstream::named("app");
    let gw = gateway(&simple(&up, "")).dual_stack().start();
    let r = send_raw(gw.addr, "GET", "/a", &[]);
    assert_eq!(r.status, 200);
    // Not ::ffff:127.0.0.1, the address the socket reports.
    assert_eq!(up.last().header("x-forwarded-for"), Some("127.0.0.1"));
}

#[test]
fn trusted_proxies_keep_their_forwarding_headers() {
    let up = TestUpstream::named("app");
    let gw = gateway(&simple(&up, ""))
        .server("trusted_proxies: [127.0.0.0/8]")
        .start();
    send_raw(
        gw.addr,
        "GET",
        "/a",
        &[
            ("X-Forwarded-For", "198.51.100.7"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "public.example.com"),
        ],
    );
    let seen = up.last();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("198.51.100.7, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-host"), Some("public.example.com"));
}

#[test]
fn hop_by_hop_fields_do_not_cross() {
    let up = TestUpstream::with_handler("app", |_| {
        Reply::text(200, "ok")
            .header("connection", "x-resp-hop")
            .header("x-resp-hop", "1")
            .header("keep-alive", "timeout=5")
    });
    let gw = gateway(&simple(&up, "")).start();
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=9\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-Sum\r\nProxy-Authorization: Basic cHJveHk6c2VjcmV0\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(!text.contains("x-resp-hop"), "{text}");
    assert!(!text.contains("timeout=5"), "{text}");
    let seen = up.last();
    assert_eq!(seen.header("x-hop"), None);
    assert_eq!(seen.header("keep-alive"), None);
    assert_eq!(seen.header("proxy-connection"), None);
    for field in [
        "te",
        "trailer",
        "proxy-authorization",
        "upgrade",
        "http2-settings",
    ] {
        assert_eq!(seen.header(field), None, "{field} crossed: {seen:?}");
    }
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
}

#[test]
fn bodies_over_max_body_get_413_before_the_upstream_sees_them() {
    let up = TestUpstream::named("app");
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: small\n    match: {{ path_prefix: /small }}\n    upstream: app\n    max_body: 1KiB\n  - name: default\n    match: {{ path_prefix: / }}\n    upstream: app\n",
        up.addr
    ))
    .server("max_body: 4KiB")
    .start();
    let c = client();
    assert_problem(
        c.post(gw.url("/small"))
            .body(vec![b'x'; 2000])
            .send()
            .unwrap(),
        413,
    );
    assert_problem(
        c.post(gw.url("/other"))
            .body(vec![b'x'; 5000])
            .send()
            .unwrap(),
        413,
    );
    assert_eq!(up.count(), 0, "the upstream was contacted");
    assert_eq!(
        c.post(gw.url("/small"))
            .body(vec![b'x'; 1024])
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.post(gw.url("/other"))
            .body(vec![b'x'; 4000])
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(up.count(), 2);

    // Without a declared length the body is counted as it streams: the
    // client gets 413 and the upstream never receives a complete request.
    let chunked = reqwest::blocking::Body::new(std::io::Cursor::new(vec![b'y'; 3000]));
    let r = c.post(gw.url("/small")).body(chunked).send().unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    common::sentinel(&gw, &up, "/other/sentinel");
    assert_eq!(
        up.count(),
        3,
        "a truncated body must not arrive as a request"
    );
}

#[test]
fn large_and_chunked_bodies_stream_intact_both_ways() {
    let up = TestUpstream::with_handler("echo", |r| Reply {
        status: 200,
        headers: vec![("content-type".into(), "application/octet-stream".into())],
        body: r.body.clone(),
        delay: Duration::ZERO,
        chunked: Some(10_000),
        chunk_delay: Duration::ZERO,
    });
    let gw = gateway(&simple(&up, "")).start();
    let payload: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let c = client();
    let r = c
        .post(gw.url("/echo"))
        .body(payload.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("content-length").is_none(),
        "the echo is chunked"
    );
    assert_eq!(r.bytes().unwrap().as_ref(), payload.as_slice());
    assert_eq!(up.last().body, payload);
    assert_eq!(up.last().header("content-length"), Some("1048576"));

    let r = c
        .put(gw.url("/echo"))
        .body(reqwest::blocking::Body::new(std::io::Cursor::new(
            payload.clone(),
        )))
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), payload.as_slice());
    let seen = up.last();
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
    assert_eq!(seen.body, payload);
}

/// Reads a message head, byte by byte so nothing after it is consumed.
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A WebSocket handshake is the one request that keeps `Connection` and
/// `Upgrade`; the 101 reaches the client with its own (but not the fields
/// its `Connection` names), and bytes then flow both ways over the upgraded
/// connection.
#[test]
fn websocket_handshakes_and_frames_pass_through() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let upstream = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let head = read_head(&mut s).to_ascii_lowercase();
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Internal\r\nX-Internal: secret\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n").unwrap();
        let mut frame = [0u8; 6];
        s.read_exact(&mut frame).unwrap();
        s.write_all(&frame).unwrap();
        head
    });
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{upstream_addr}]\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n"
    ))
    .start();
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let head = read_head(&mut s).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("sec-websocket-accept: "), "{head}");
    assert!(
        !head.contains("x-internal: "),
        "a nominated field crossed: {head}"
    );
    // An unmasked text frame "ping"; the upstream echoes it.
    s.write_all(b"\x81\x04ping").unwrap();
    let mut echo = [0u8; 6];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"\x81\x04ping");
    let seen = upstream.join().unwrap();
    assert!(seen.starts_with("get /chat http/1.1"), "{seen}");
    assert!(seen.contains("\r\nupgrade: websocket\r\n"), "{seen}");
    assert!(seen.contains("\r\nconnection: upgrade\r\n"), "{seen}");
    assert!(
        seen.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq=="),
        "{seen}"
    );
}

/// Reads one response with a Content-Length off a kept-alive connection.
fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let head = read_head(s);
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (head, body)
}

#[test]
fn fifty_requests_on_one_keep_alive_connection_reuse_upstream_connections() {
    let up = TestUpstream::with_handler("app", |r| Reply::text(200, &r.target));
    let gw = gateway(&simple(&up, "")).start();
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for i in 0..50 {
        s.write_all(format!("GET /n/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, format!("/n/{i}").as_bytes());
    }
    assert_eq!(up.count(), 50);
    assert_eq!(up.connections(), 1, "upstream connections were not pooled");
    // A gateway error keeps the connection usable too.
    s.write_all(b"GET /../x HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (head, _) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    s.write_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (head, body) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"/after");
}

#[test]
fn oversized_request_heads_get_431() {
    let up = TestUpstream::named("app");
    let gw = gateway(&simple(&up, ""))
        .server("max_header_size: 8KiB")
        .server("max_headers: 20")
        .start();
    let big = "v".repeat(9000);
    let r = send_raw(gw.addr, "GET", "/a", &[("X-Big", &big)]);
    assert_eq!(r.status, 431, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let huge = "v".repeat(70_000);
    let r = send_raw(gw.addr, "GET", "/a", &[("X-Huge", &huge)]);
    assert_eq!(r.status, 431);
    let many: Vec<(String, String)> = (0..25).map(|i| (format!("X-H{i}"), "1".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let r = send_raw(gw.addr, "GET", "/a", &many);
    assert_eq!(r.status, 431);
    assert_eq!(up.count(), 0);
    // Within the limits all is well, and the gateway is still serving.
    let r = send_raw(gw.addr, "GET", "/a", &many[..10]);
    assert_eq!(r.status, 200);
    // A head many times the reader's first buffer, yet within the limit,
    // reaches the upstream whole.
    let large = "w".repeat(7000);
    let r = send_raw(gw.addr, "GET", "/a", &[("X-Large", &large)]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.last().header("x-large"), Some(large.as_str()));
}

#[test]
fn a_trickled_request_head_is_cut_off_at_header_timeout() {
    let up = TestUpstream::named("app");
    let gw = gateway(&simple(&up, ""))
        .server("header_timeout: 600ms")
        .start();
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let start = Instant::now();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    // One byte every 100 ms: each read is quick, the whole head is not.
    for i in 0..40 {
        if s.write_all(if i % 2 == 0 { b"X" } else { b"-" }).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?} after {took:?}");
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    assert_eq!(up.count(), 0);

    // A connection that sends nothing is closed after header_timeout.
    let mut idle = TcpStream::connect(gw.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    assert_eq!(idle.read(&mut buf).unwrap_or(0), 0);
    assert!(start.elapsed() < Duration::from_millis(2000));
}

#[test]
fn keep_alive_connections_idle_on_keepalive_timeout_not_header_timeout() {
    let up = TestUpstream::named("app");
    let gw = gateway(&simple(&up, ""))
        .server("header_timeout: 300ms")
        .server("keepalive_timeout: 1500ms")
        .start();
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(read_response(&mut s).0.starts_with("HTTP/1.1 200"));
    // Idle longer than header_timeout: still served. Twice, so that the
    // second wait outlasts the first one's deadline: each wait has its own.
    for path in ["/2", "/3"] {
        std::thread::sleep(Duration::from_millis(1000));
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(request.as_bytes()).unwrap();
        assert!(
            read_response(&mut s).0.starts_with("HTTP/1.1 200"),
            "{path}"
        );
    }
    // Idle longer than keepalive_timeout: closed without a word.
    let start = Instant::now();
    let mut buf = [0u8; 64];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    let idle = start.elapsed();
    assert!(
        idle >= Duration::from_millis(1400) && idle < Duration::from_millis(3500),
        "{idle:?}"
    );
}

#[test]
fn header_timeout_counts_from_the_connection_start() {
    let up = TestUpstream::named("app");
    let gw = gateway(&simple(&up, ""))
        .server("header_timeout: 600ms")
        .start();
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(400));
    s.write_all(b"GET /a HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let _ = s.write_all(b"Host: x\r\n\r\n");
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    assert!(got.starts_with("HTTP/1.1 408"), "{got:?}");
    assert!(start.elapsed() < Duration::from_millis(1500));
    assert_eq!(up.count(), 0);
}

#[test]
fn malformed_heads_get_a_problem_document() {
    let up = TestUpstream::named("app");
    let gw = gateway(&simple(&up, "")).start();
    for request in [
        &b"GET /a b c HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET /a HTTP/1.1\r\nBad Header: 1\r\n\r\n",
        b"GET /a HTTP/9.9\r\nHost: x\r\n\r\n",
    ] {
        let r = RawResponse::parse(&gw.raw(request)).expect("a response");
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(request));
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
    }
    let r = RawResponse::parse(
        &gw.raw(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
    )
    .unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(up.count(), 0);
}

#[test]
fn a_smuggled_request_never_reaches_the_upstream() {
    let up = TestUpstream::with_handler("app", |r| Reply::text(200, &r.target));
    let gw = gateway(&simple(&up, "")).start();
    // Content-Length and Transfer-Encoding together: the chunked framing
    // wins and the connection is not reused, so the tail is never a request.
    let text = gw.raw(
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(text.starts_with("HTTP/1.1 "), "{text:?}");
    common::sentinel(&gw, &up, "/a/sentinel");
    assert!(
        up.requests().iter().all(|r| r.target != "/smuggled"),
        "{:?}",
        up.requests()
    );
    // Two different lengths are refused outright.
    let text = gw
        .raw(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde");
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
    assert!(up.requests().iter().all(|r| r.target != "/b"));
}

#[test]
fn route_timeout_cuts_a_trickling_body() {
    let up = TestUpstream::with_handler("slow-body", |_| Reply {
        status: 200,
        headers: vec![],
        body: vec![b'z'; 20],
        delay: Duration::ZERO,
        chunked: Some(1),
        chunk_delay: Duration::from_millis(100),
    });
    let gw = gateway(&simple(&up, "    timeout: 500ms\n")).start();
    let start = Instant::now();
    let result = client().get(gw.url("/a")).send().and_then(|r| r.bytes());
    let took = start.elapsed();
    assert!(
        result.is_err(),
        "a 2 s body came through a 500 ms route timeout"
    );
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[test]
fn early_answers_of_a_deprecated_route_carry_its_deprecation_headers() {
    let up = TestUpstream::named("app");
    let gw = gateway(&simple(
        &up,
        "    max_body: 10B\n    deprecation: { sunset: \"2027-06-30\" }\n",
    ))
    .start();
    let r = client()
        .post(gw.url("/a"))
        .body("more than ten bytes")
        .send()
        .unwrap();
    assert_eq!(r.headers()["deprecation"], "true");
    assert_eq!(r.headers()["sunset"], "Wed, 30 Jun 2027 00:00:00 GMT");
    assert_problem(r, 413);
}
