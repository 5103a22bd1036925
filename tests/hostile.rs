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
    std::thread::sleep(Duration::from_millis(300));
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
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    .starts_with("HTTP/1.1 200"));
    assert_eq!(
        client().get(gw.url("/public/ok")).send().unwrap().status(),
        200
    );
    assert_eq!(up.count(), 1);
}
