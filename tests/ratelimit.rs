//! Rate limits end to end: per client IP (from a second loopback address),
//! behind trusted proxies, per header, per claim and per route, with the
//! `RateLimit-*` headers and problem+json 429s.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;

fn from(ip: &str) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn limited(up: &TestUpstream, limit: &str, extra: &str) -> String {
    format!(
        "upstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: limited\n    match: {{ path_prefix: / }}\n    upstream: app\n    rate_limit: {limit}\n{extra}",
        up.addr
    )
}

/// Sends `n` requests and returns their statuses.
fn statuses(n: usize, send: impl Fn() -> reqwest::blocking::Response) -> Vec<u16> {
    (0..n).map(|_| send().status().as_u16()).collect()
}

fn admitted(codes: &[u16]) -> usize {
    codes.iter().filter(|c| **c == 200).count()
}

#[test]
fn per_ip_with_headers_and_a_429_problem() {
    let up = TestUpstream::named("app");
    let gw = gateway(&limited(&up, "{ requests: 5, per: 1m, key: ip }", "")).start();
    let a = from("127.0.0.1");
    let url = gw.url("/x");
    for i in 0..5 {
        let r = a.get(&url).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["ratelimit-limit"], "5");
        assert_eq!(
            r.headers()["ratelimit-remaining"],
            (4 - i).to_string().as_str()
        );
        let reset: u64 = r.headers()["ratelimit-reset"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=68).contains(&reset), "{reset}");
    }
    let r = a.get(&url).send().unwrap();
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=68).contains(&retry), "{retry}");
    assert_problem(r, 429);
    assert_eq!(up.count(), 5, "a refused request reached the upstream");

    // Another client address has its own budget.
    let b = from("127.0.0.2");
    assert_eq!(admitted(&statuses(6, || b.get(&url).send().unwrap())), 5);
    // Sending X-Forwarded-For does not make a new client.
    let spoofed = statuses(3, || {
        a.get(&url)
            .header("X-Forwarded-For", "203.0.113.9")
            .send()
            .unwrap()
    });
    assert_eq!(admitted(&spoofed), 0);
}

#[test]
fn behind_trusted_proxies_the_forwarded_client_is_counted() {
    let up = TestUpstream::named("app");
    let gw = gateway(&limited(&up, "{ requests: 2, per: 1m }", ""))
        .server("trusted_proxies: [127.0.0.1/32]")
        .start();
    let proxy = from("127.0.0.1");
    let url = gw.url("/x");
    let as_client = |chain: &str| {
        proxy
            .get(&url)
            .header("X-Forwarded-For", chain)
            .send()
            .unwrap()
    };
    assert_eq!(admitted(&statuses(3, || as_client("198.51.100.1"))), 2);
    assert_eq!(admitted(&statuses(3, || as_client("198.51.100.2"))), 2);
    // What the client prepends itself does not matter: the rightmost
    // untrusted address is the client.
    assert_eq!(
        admitted(&statuses(2, || as_client("6.6.6.6, 198.51.100.1"))),
        0
    );
    // An untrusted peer's header is ignored: 127.0.0.2 is counted as itself.
    let other = from("127.0.0.2");
    let r = statuses(3, || {
        other
            .get(&url)
            .header("X-Forwarded-For", "198.51.100.9")
            .send()
            .unwrap()
    });
    assert_eq!(admitted(&r), 2);
}

#[test]
fn per_header_falls_back_to_the_client_ip() {
    let up = TestUpstream::named("app");
    let gw = gateway(&limited(
        &up,
        "{ requests: 2, per: 1m, key: \"header:X-Api-Key\" }",
        "",
    ))
    .start();
    let c = client();
    let url = gw.url("/x");
    let with_key = |k: &str| c.get(&url).header("X-Api-Key", k).send().unwrap();
    assert_eq!(admitted(&statuses(3, || with_key("key-1"))), 2);
    assert_eq!(admitted(&statuses(3, || with_key("key-2"))), 2);
    // No header: counted by IP, never unlimited.
    assert_eq!(admitted(&statuses(4, || c.get(&url).send().unwrap())), 2);
}

#[test]
fn per_claim_and_per_route() {
    let up = TestUpstream::named("app");
    let body = [
        format!("upstreams:\n  app:\n    targets: [{}]\n", up.addr),
        common::jwt::rs256_provider("main"),
        "routes:\n".to_string(),
        "  - name: per-user\n    match: { path_prefix: /user }\n    upstream: app\n    auth: main\n".to_string(),
        "    rate_limit: { requests: 2, per: 1m, key: \"claim:sub\" }\n".to_string(),
        "  - name: shared\n    match: { path_prefix: /shared }\n    upstream: app\n".to_string(),
        "    rate_limit: { requests: 3, per: 1m, key: route }\n".to_string(),
        "  - name: unauthenticated-claim\n    match: { path_prefix: /anon }\n    upstream: app\n".to_string(),
        "    rate_limit: { requests: 1, per: 1m, key: \"claim:sub\" }\n".to_string(),
    ]
    .concat();
    let gw = gateway(&body).start();
    let c = client();
    let alice = jwt::rs256_token("alice");
    let bob = jwt::rs256_token("bob");
    let as_user = |t: &str| c.get(gw.url("/user")).bearer_auth(t).send().unwrap();
    assert_eq!(admitted(&statuses(3, || as_user(&alice))), 2);
    assert_eq!(admitted(&statuses(3, || as_user(&bob))), 2);
    // A refused token is answered 401 and counted against the client IP,
    // with the headers of the limit.
    let r = c.get(gw.url("/user")).send().unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["ratelimit-limit"], "2");
    assert_eq!(c.get(gw.url("/user")).send().unwrap().status(), 401);
    assert_eq!(c.get(gw.url("/user")).send().unwrap().status(), 429);

    let a = from("127.0.0.1");
    let b = from("127.0.0.2");
    let shared = [
        a.get(gw.url("/shared")).send().unwrap().status(),
        b.get(gw.url("/shared")).send().unwrap().status(),
        a.get(gw.url("/shared")).send().unwrap().status(),
        b.get(gw.url("/shared")).send().unwrap().status(),
    ];
    assert_eq!(
        shared.iter().filter(|s| **s == 200).count(),
        3,
        "{shared:?}"
    );

    // claim: on a route without auth counts by IP: still limited.
    assert_eq!(
        admitted(&statuses(3, || c.get(gw.url("/anon")).send().unwrap())),
        1
    );
}

#[test]
fn the_window_slides() {
    let up = TestUpstream::named("app");
    let gw = gateway(&limited(&up, "{ requests: 3, per: 1s }", "")).start();
    let c = client();
    let url = gw.url("/x");
    assert_eq!(admitted(&statuses(5, || c.get(&url).send().unwrap())), 3);
    // After the window (and a sub-window) has passed, the budget is back.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(admitted(&statuses(5, || c.get(&url).send().unwrap())), 3);
}

#[test]
fn every_response_of_a_limited_route_carries_the_headers() {
    let dead = free_port();
    let body = format!(
        "upstreams:\n  gone:\n    targets: [127.0.0.1:{dead}]\nroutes:\n  - name: limited\n    match: {{ path: /x, methods: [GET] }}\n    upstream: gone\n    rate_limit: {{ requests: 10, per: 1m }}\n"
    );
    let gw = gateway(&body).start();
    let r = client().get(gw.url("/x")).send().unwrap();
    assert_eq!(r.headers()["ratelimit-limit"], "10");
    assert_eq!(r.headers()["ratelimit-remaining"], "9");
    assert_problem(r, 502);
}
