//! Hostile input: path tricks around a protected prefix, HTTP/1 framing
//! games and header floods. The upstream records everything it receives;
//! nothing refused, and nothing unauthenticated under /admin, may be there.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn setup() -> (TestUpstream, Gateway) {
    let up = TestUpstream::with_handler("app", |r| Reply::text(200, &r.target));
    let body = [
        format!("upstreams:\n  app:\n    targets: [{}]\n", up.addr),
        common::jwt::rs256_provider("main"),
        "routes:\n".to_string(),
        "  - name: admin\n    match: { path_prefix: /admin }\n    upstream: app\n    auth: main\n"
            .to_string(),
        "  - name: public\n    match: { path_prefix: /public }\n    upstream: app\n".to_string(),
    ]
    .concat();
    let gw = gateway(&body).server("max_header_size: 64KiB").start();
    (up, gw)
}

/// Nothing under /admin may ever have reached the upstream.
fn assert_admin_untouched(up: &TestUpstream) {
    let leaked: Vec<String> = up
        .requests()
        .into_iter()
        .map(|r| r.target)
        .filter(|t| t.to_ascii_lowercase().contains("admin") && !t.starts_with("/public/%252e"))
        .collect();
    assert!(leaked.is_empty(), "reached the upstream: {leaked:?}");
}

#[test]
fn path_tricks_around_a_protected_prefix() {
    let (up, gw) = setup();
    let cases: &[(&str, u16)] = &[
        ("/admin", 401),
        ("/admin/", 401),
        ("/admin?debug=1", 401),
        ("/public/../admin", 401),
        ("/public/%2e%2e/admin", 401),
        ("/public/%2E%2E/admin/users", 401),
        ("/public/.%2e/admin", 401),
        ("//admin", 401),
        ("/./admin", 401),
        ("/%61dmin", 401),
        ("/%61%64%6d%69%6e/x", 401),
        ("http://gateway.test/public/../admin", 401),
        ("/public/%2fadmin", 400),
        ("/public%2f..%2fadmin", 400),
        ("/admin%00", 400),
        ("/public/..;/admin", 400),
        ("/public/..\\admin", 400),
        ("/public/../../admin", 400),
        ("/ADMIN", 404),
    ];
    for (target, status) in cases {
        let r = send_raw(gw.addr, "GET", target, &[]);
        assert_eq!(r.status, *status, "{target}: {r:?}");
    }
    // Encoded twice is not a dot segment: it reaches /public as written.
    let r = send_raw(gw.addr, "GET", "/public/%252e%252e/admin", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(up.last().target, "/public/%252e%252e/admin");
    assert_admin_untouched(&up);
}

/// Sends `request` followed by a smuggled request on the same connection.
fn smuggle(gw: &Gateway, request: &str) -> String {
    let full = format!("{request}GET /admin/smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
    gw.raw(full.as_bytes())
}

#[test]
fn ambiguous_framing_is_refused_or_made_unambiguous() {
    let (up, gw) = setup();
    let refused = [
        "POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        "POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nabcde",
        "POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nabcde",
        "POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        "POST /public/a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        "GET /public/a HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
        "GET /public/a HTTP/1.1\r\nHost : x\r\n\r\n",
    ];
    for request in refused {
        let text = smuggle(&gw, request);
        let r = RawResponse::parse(&text).unwrap_or_else(|| panic!("{request:?} -> {text:?}"));
        assert_eq!(r.status, 400, "{request:?} -> {text:?}");
        assert_eq!(
            r.header("content-type"),
            Some("application/problem+json"),
            "{request:?}"
        );
    }
    // Accepted, but only as one unambiguous request.
    for request in [
        "POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 50\r\n\r\n0\r\n\r\n",
        "POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    ] {
        let text = smuggle(&gw, request);
        assert!(text.starts_with("HTTP/1.1 "), "{request:?} -> {text:?}");
    }
    common::sentinel(&gw, &up, "/public/sentinel");
    assert_admin_untouched(&up);
    assert!(up.requests().iter().all(|r| r.target != "/admin/smuggled"));
}

#[test]
fn header_floods_are_answered_quickly_and_the_gateway_stays_healthy() {
    let (up, gw) = setup();
    let t = Instant::now();
    let huge = "v".repeat(70 * 1024);
    let r = send_raw(gw.addr, "GET", "/public/a", &[("X-Huge", &huge)]);
    assert_eq!(r.status, 431);
    let many: Vec<(String, String)> = (0..300).map(|i| (format!("X-H{i}"), "1".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(send_raw(gw.addr, "GET", "/public/a", &many).status, 431);
    let token = format!("Bearer {}", "t".repeat(100 * 1024));
    assert_eq!(
        send_raw(gw.addr, "GET", "/admin", &[("Authorization", &token)]).status,
        431
    );
    // A big token that fits the head is refused unread.
    let token = format!(
        "Bearer {}.{}.{}",
        "a".repeat(8000),
        "b".repeat(8000),
        "c".repeat(8000)
    );
    let r = send_raw(gw.addr, "GET", "/admin", &[("Authorization", &token)]);
    assert_eq!(r.status, 401);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // Many at once, then the gateway still serves.
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let addr = gw.addr;
            let huge = huge.clone();
            std::thread::spawn(move || {
                send_raw(addr, "GET", "/public/a", &[("X-Huge", &huge)]).status
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 431);
    }
    assert!(raw_request(
        gw.admin,
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .starts_with("HTTP/1.1 200"));
    assert_eq!(
        client().get(gw.url("/public/ok")).send().unwrap().status(),
        200
    );
    assert_eq!(up.count(), 1);
}

/// A gateway with a protected `/admin`, an open catch-all and an access
/// log, for the attacks below; `server` lines are added to its config.
fn with_catch_all(server: &[&str]) -> (TestUpstream, Gateway, tempfile::TempDir) {
    let up = TestUpstream::with_handler("app", |r| {
        let reply = Reply::text(200, &r.target);
        if r.target.ends_with("/slow") {
            return reply.delayed(Duration::from_millis(400));
        }
        reply
    });
    let logs = tempfile::tempdir().unwrap();
    let body = [
        format!("access_log: {}/access.log\n", logs.path().display()),
        format!("upstreams:\n  app:\n    targets: [{}]\n", up.addr),
        common::jwt::rs256_provider("main"),
        "routes:\n".to_string(),
        "  - name: admin\n    match: { path_prefix: /admin }\n    upstream: app\n    auth: main\n"
            .to_string(),
        "  - name: api\n    match: { path_prefix: /api }\n    upstream: app\n    strip_prefix: /api\n"
            .to_string(),
        "  - name: open\n    match: { path_prefix: / }\n    upstream: app\n".to_string(),
    ]
    .concat();
    let mut b = gateway(&body);
    for line in server {
        b = b.server(line);
    }
    (up, b.start(), logs)
}

/// The access log's lines so far, as JSON.
fn log_lines(logs: &tempfile::TempDir) -> Vec<serde_json::Value> {
    std::fs::read_to_string(logs.path().join("access.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `;` path parameters (which Java servers strip before routing) are
/// refused by default; with `path_params: keep` routes match the path
/// without them and the upstream receives it unchanged.
#[test]
fn path_parameters_cannot_route_past_an_auth_prefix() {
    let (up, gw, _logs) = with_catch_all(&[]);
    for target in [
        "/admin;jsessionid=1/secret",
        "/admin;/secret",
        "/admin%3Bjsessionid=1/secret",
        "/open/a;b",
    ] {
        let r = send_raw(gw.addr, "GET", target, &[]);
        assert_eq!(r.status, 400, "{target}: {r:?}");
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
    }
    assert_eq!(up.count(), 0);

    let (up, gw, _logs) = with_catch_all(&["path_params: keep"]);
    // However the parameters are written, /admin is matched as Tomcat
    // reads it, and meets its auth.
    for target in [
        "/admin;jsessionid=1/secret",
        "/;x/admin/secret",
        "/admin%3Bx/secret",
        "/admin;/secret",
    ] {
        let r = send_raw(gw.addr, "GET", target, &[]);
        assert_eq!(r.status, 401, "{target}: {r:?}");
    }
    assert_eq!(up.count(), 0);
    let token = format!("Bearer {}", common::jwt::rs256_token("ann"));
    let r = send_raw(
        gw.addr,
        "GET",
        "/admin;jsessionid=1/secret",
        &[("Authorization", &token)],
    );
    assert_eq!(r.status, 200);
    assert_eq!(up.last().target, "/admin;jsessionid=1/secret");
    let r = send_raw(gw.addr, "GET", "/api;v=2/users;x=1/7", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(up.last().target, "/users;x=1/7");
}

/// Host fields Pingora itself would refuse get the gateway's own answer
/// (problem+json with a request id) and an access log line; an HTTP/1.1
/// request without `Host` is refused too.
#[test]
fn ambiguous_hosts_get_the_gateways_own_answer() {
    let (up, gw, logs) = with_catch_all(&[]);
    let refused = [
        "GET /a HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        "GET http://other.test/a HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        "GET /a HTTP/1.1\r\nHost: user@gw.test\r\n\r\n",
        "GET http://user@gw.test/a HTTP/1.1\r\nHost: user@gw.test\r\n\r\n",
        "GET /a HTTP/1.1\r\nUser-Agent: x\r\n\r\n",
    ];
    let mut ids = Vec::new();
    for request in refused {
        let text = gw.raw(request.as_bytes());
        let r = RawResponse::parse(&text).unwrap_or_else(|| panic!("{request:?} -> {text:?}"));
        assert_eq!(r.status, 400, "{request:?} -> {text:?}");
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        let id = r.header("x-request-id").expect("a request id").to_string();
        let problem: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(problem["request_id"], id.as_str());
        ids.push(id);
    }
    // Allowed: HTTP/1.0 without Host, and an absolute form that agrees.
    for request in [
        "GET /ok HTTP/1.0\r\n\r\n",
        "GET http://gw.test/ok HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n",
    ] {
        let text = gw.raw(request.as_bytes());
        assert!(text.starts_with("HTTP/1.1 200"), "{request:?} -> {text:?}");
    }
    assert_eq!(up.count(), 2);
    eventually(Duration::from_secs(3), "a log line per refusal", || {
        let lines = log_lines(&logs);
        ids.iter().all(|id| {
            lines
                .iter()
                .any(|l| l["request_id"] == id.as_str() && l["status"] == 400)
        })
    });
}

/// HTTP/2 heads over Pingora's 64 KiB default get the gateway's own 431;
/// an `:authority` that disagrees with `host` never reaches the upstream.
#[test]
fn http2_heads_get_the_gateways_own_answer() {
    let up = TestUpstream::named("app");
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path(), &["gw.test"]);
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n",
        up.addr
    ))
    .tls(&cert, &key)
    .start();
    let tls = gw.tls_addr.unwrap();
    let huge = "v".repeat(70 * 1024);
    let r = common::h2client::get(tls, &cert, "gw.test", "/a", &[("x-huge", &huge)]).unwrap();
    assert_eq!(r.status, 431);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(
        r.json()["request_id"].as_str(),
        r.header("x-request-id"),
        "{r:?}"
    );
    let r = common::h2client::get(tls, &cert, "gw.test", "/a", &[("host", "other.test")]).unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(up.count(), 0);
    let r = common::h2client::get(tls, &cert, "gw.test", "/a", &[]).unwrap();
    assert_eq!(r.status, 200);
}

/// A TLS client that never finishes its handshake is cut at
/// `header_timeout`, not at Pingora's fixed 60 s.
#[test]
fn a_silent_tls_client_is_cut_at_header_timeout() {
    use std::io::{Read, Write};
    let up = TestUpstream::named("app");
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path(), &["gw.test"]);
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n",
        up.addr
    ))
    .server("header_timeout: 1s")
    .tls(&cert, &key)
    .start();
    let tls = gw.tls_addr.unwrap();
    // Silent, and a ClientHello that stops after its record header.
    for opening in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00][..]] {
        let started = Instant::now();
        let mut s = std::net::TcpStream::connect(tls).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(opening).unwrap();
        let mut buf = [0u8; 64];
        let closed = matches!(s.read(&mut buf), Ok(0) | Err(_));
        assert!(closed);
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "{opening:?}: the connection lived {took:?}"
        );
    }
    // A TLS client that says nothing after its handshake: an HTTP/2 one
    // (whose preface Pingora would wait for forever) and an HTTP/1 one.
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let lived = common::h2client::silent_after_handshake(tls, &cert, alpn);
        assert!(
            lived.is_some_and(|t| t < Duration::from_secs(5)),
            "{}: the connection lived {lived:?}",
            String::from_utf8_lossy(alpn)
        );
    }
    // A real client in time is served.
    let c = reqwest::blocking::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap(),
        )
        .resolve("gw.test", tls)
        .build()
        .unwrap();
    let r = c
        .get(format!("https://gw.test:{}/x", tls.port()))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A request body that pauses longer than `body_timeout` is answered 408
/// and its half never completes at the upstream.
#[test]
fn slow_request_bodies_are_cut_at_body_timeout() {
    use std::io::{Read, Write};
    let (up, gw, _logs) = with_catch_all(&["body_timeout: 1s"]);
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 10\r\n\r\nab")
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // A byte every 2 s: each pause is longer than body_timeout.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(2000));
        if s.write_all(b"c").is_err() {
            break;
        }
    }
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&out);
    let r = RawResponse::parse(&text).unwrap_or_else(|| panic!("{text:?}"));
    assert_eq!(r.status, 408, "{text}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert!(started.elapsed() < Duration::from_secs(8));
    // A sentinel request is recorded; the cut one never was.
    assert_eq!(
        client().get(gw.url("/sentinel")).send().unwrap().status(),
        200
    );
    let targets: Vec<String> = up.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, vec!["/sentinel"]);
}

/// Reads `n` responses (with `Content-Length` bodies) off one connection.
fn read_responses(s: &mut std::net::TcpStream, n: usize) -> Vec<RawResponse> {
    use std::io::Read;
    let mut data = Vec::new();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while out.len() < n {
        // Parse what is complete.
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if data.len() >= end + 4 + len {
                let text = String::from_utf8_lossy(&data[..end + 4 + len]).to_string();
                out.push(RawResponse::parse(&text).unwrap());
                data.drain(..end + 4 + len);
                continue;
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => data.extend_from_slice(&buf[..k]),
        }
    }
    out
}

/// Pipelined requests are answered in order on the same connection
/// (RFC 9112 9.3.2), whether they arrive together or while the first is
/// still at the upstream; none reaches the upstream half read.
#[test]
fn pipelined_requests_are_answered_in_order() {
    use std::io::Write;
    let (up, gw, _logs) = with_catch_all(&[]);
    let connect = || {
        let s = std::net::TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let bodies = |rs: &[RawResponse]| -> Vec<(u16, String)> {
        rs.iter().map(|r| (r.status, r.body.clone())).collect()
    };

    // Both in one write.
    let mut s = connect();
    s.write_all(
        b"GET /p/1 HTTP/1.1\r\nHost: gw.test\r\n\r\nGET /p/2 HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    )
    .unwrap();
    let rs = read_responses(&mut s, 2);
    assert_eq!(
        bodies(&rs),
        vec![(200, "/p/1".into()), (200, "/p/2".into())]
    );

    // The second arrives while the first is at the upstream.
    let mut s = connect();
    s.write_all(b"GET /p/slow HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    s.write_all(b"GET /p/after HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .unwrap();
    let rs = read_responses(&mut s, 2);
    assert_eq!(
        bodies(&rs),
        vec![(200, "/p/slow".into()), (200, "/p/after".into())]
    );

    // A body, then a request right behind it.
    let mut s = connect();
    s.write_all(b"POST /p/post HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\n\r\nhelloGET /p/next HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .unwrap();
    let rs = read_responses(&mut s, 2);
    assert_eq!(
        bodies(&rs),
        vec![(200, "/p/post".into()), (200, "/p/next".into())]
    );
    let post = up
        .requests()
        .into_iter()
        .find(|r| r.target == "/p/post")
        .unwrap();
    assert_eq!(post.body, b"hello");

    // After a chunked body the first is answered and the connection
    // closed (it says so): the second never reaches the upstream torn,
    // whether it came with the body or while the first was upstream.
    use std::io::Read;
    for (first, second) in [
        (
            "POST /p/chunked HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /p/last HTTP/1.1\r\nHost: gw.test\r\n\r\n",
            "",
        ),
        (
            "POST /p/chunked/slow HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "GET /p/torn HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        ),
        (
            "POST /p/upgrade HTTP/1.1\r\nHost: gw.test\r\nUpgrade: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /p/after-upgrade HTTP/1.1\r\nHost: gw.test\r\n\r\n",
            "",
        ),
    ] {
        let mut s = connect();
        s.write_all(first.as_bytes()).unwrap();
        if !second.is_empty() {
            std::thread::sleep(Duration::from_millis(150));
            s.write_all(second.as_bytes()).unwrap();
        }
        let rs = read_responses(&mut s, 1);
        assert_eq!(rs.len(), 1, "{first:?}");
        assert_eq!(rs[0].status, 200, "{first:?}");
        assert_eq!(rs[0].header("connection"), Some("close"), "{first:?}");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "more after a close: {:?}", String::from_utf8_lossy(&rest));
    }
    let targets: Vec<String> = up.requests().into_iter().map(|r| r.target).collect();
    for t in &targets {
        assert!(
            [
                "/p/1",
                "/p/2",
                "/p/slow",
                "/p/after",
                "/p/post",
                "/p/next",
                "/p/chunked",
                "/p/chunked/slow",
                "/p/upgrade",
            ]
            .contains(&t.as_str()),
            "{targets:?}"
        );
    }
}
