//! Traffic management end to end (SPEC section 7): weighted splits,
//! sticky by a key (header, claim, consumer) across processes, a side that
//! cannot answer, routing by the verified token's claims (verified once)
//! and by the query, outlier detection beside active health checks,
//! retries and their budget, and mirroring.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::jwt::{self, claims};
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

fn side_of(gw: &Gateway, path: &str, user: Option<&str>) -> String {
    let mut req = client().get(gw.url(path));
    if let Some(u) = user {
        req = req.header("X-User", u);
    }
    let r = req.send().unwrap();
    assert_eq!(r.status(), 200);
    r.text().unwrap()
}

fn split_config(v1: &TestUpstream, v2: &TestUpstream, dead: u16) -> String {
    format!(
        "upstreams:
  v1: {{ targets: [{}] }}
  v2: {{ targets: [{}] }}
  dead: {{ targets: ['127.0.0.1:{dead}'], retries: 0 }}
routes:
  - name: sticky
    match: {{ path_prefix: /sticky }}
    split:
      by: header:X-User
      to:
        - {{ upstream: v1, weight: 90 }}
        - {{ upstream: v2, weight: 10 }}
  - name: random
    match: {{ path_prefix: /random }}
    split:
      to:
        - {{ upstream: v1, weight: 1 }}
        - {{ upstream: v2, weight: 3 }}
  - name: off
    match: {{ path_prefix: /off }}
    split:
      to:
        - {{ upstream: v1, weight: 0 }}
        - {{ upstream: v2 }}
  - name: canary
    match: {{ path_prefix: /canary }}
    split:
      by: header:X-User
      to:
        - {{ upstream: v1, weight: 1 }}
        - {{ upstream: dead, weight: 1 }}
  - name: canary-fallback
    match: {{ path_prefix: /with-fallback }}
    split:
      by: header:X-User
      to:
        - {{ upstream: v1, weight: 1 }}
        - {{ upstream: dead, weight: 1 }}
    fallback: {{ status: 200, body: 'served by the fallback' }}
",
        v1.addr, v2.addr
    )
}

#[test]
fn splits_follow_their_weights_and_keyed_ones_stick_across_processes() {
    let (v1, v2) = (TestUpstream::named("v1"), TestUpstream::named("v2"));
    let dead = free_port();
    let config = split_config(&v1, &v2, dead);
    let gw = gateway(&config).start();
    let users: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let mut first: HashMap<&str, String> = HashMap::new();
    for user in &users {
        let side = side_of(&gw, "/sticky/x", Some(user));
        for _ in 0..2 {
            assert_eq!(side_of(&gw, "/sticky/x", Some(user)), side, "{user} moved");
        }
        first.insert(user, side);
    }
    let on_v2 = first.values().filter(|s| *s == "v2").count();
    assert!(
        (12..=60).contains(&on_v2),
        "{on_v2} of 300 users on the 10% side"
    );

    // Another process (a restart, a second instance) sends each user the
    // same way: the hash is stable, not seeded per process.
    let other = gateway(&config).start();
    for user in &users {
        assert_eq!(
            side_of(&other, "/sticky/x", Some(user)),
            first[user.as_str()],
            "{user} changed sides in another process"
        );
    }

    // Without a key, each request draws by weight.
    let draws = 400;
    let on_v2 = (0..draws)
        .filter(|_| side_of(&gw, "/random/x", None) == "v2")
        .count();
    assert!(
        (250..=350).contains(&on_v2),
        "{on_v2} of {draws} on the 3/4 side"
    );
    // A side of weight 0 gets nothing.
    for _ in 0..20 {
        assert_eq!(side_of(&gw, "/off/x", None), "v2");
    }
}

#[test]
fn a_side_that_cannot_answer_is_never_replaced_by_the_other() {
    let (v1, v2) = (TestUpstream::named("v1"), TestUpstream::named("v2"));
    let gw = gateway(&split_config(&v1, &v2, free_port())).start();
    let (mut served, mut failed, mut fell_back) = (0, 0, 0);
    for i in 0..40 {
        let user = format!("u{i}");
        let r = client()
            .get(gw.url("/canary/x"))
            .header("X-User", &user)
            .send()
            .unwrap();
        match r.status().as_u16() {
            200 => {
                assert_eq!(r.text().unwrap(), "v1");
                served += 1;
            }
            502 => {
                assert_problem(r, 502);
                failed += 1;
            }
            other => panic!("{other}"),
        }
        let r = client()
            .get(gw.url("/with-fallback/x"))
            .header("X-User", &user)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        if r.text().unwrap() == "served by the fallback" {
            fell_back += 1;
        }
    }
    assert!(served > 5 && failed > 5, "{served} served, {failed} failed");
    assert_eq!(fell_back, failed, "the same users fall on the dead side");
    let metrics = metrics_text(&gw);
    assert!(
        metrics.contains("upstream=\"dead\""),
        "the dead side's connects are counted: {metrics}"
    );
}

fn token(extra: serde_json::Value) -> String {
    let mut c = claims("user-1");
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    jwt::mint(Algorithm::RS256, "rsa1.pem", None, &c)
}

fn claims_config(premium: &TestUpstream, beta: &TestUpstream, std: &TestUpstream) -> String {
    format!(
        "{}upstreams:
  premium: {{ targets: [{}] }}
  beta: {{ targets: [{}] }}
  std: {{ targets: [{}] }}
routes:
  - name: default
    match: {{ path_prefix: /api }}
    upstream: std
    auth: main
  - name: premium
    match: {{ path_prefix: /api, claims: {{ tier: premium }} }}
    upstream: premium
    auth: main
  - name: beta
    match: {{ path_prefix: /api, query: {{ version: 2 }} }}
    upstream: beta
",
        jwt::rs256_provider("main"),
        premium.addr,
        beta.addr,
        std.addr
    )
}

#[test]
fn claims_and_query_conditions_choose_routes_and_fall_through() {
    let (premium, beta, std) = (
        TestUpstream::named("premium"),
        TestUpstream::named("beta"),
        TestUpstream::named("std"),
    );
    let gw = gateway(&claims_config(&premium, &beta, &std)).start();
    let get = |path: &str, token: Option<&str>| {
        let mut req = client().get(gw.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().unwrap()
    };
    let gold = token(json!({ "tier": "premium" }));
    let listed = token(json!({ "tier": ["gold", "premium"] }));
    let basic = token(json!({ "tier": "basic" }));
    let untiered = token(json!({}));
    for (t, expect) in [
        (&gold, "premium"),
        (&listed, "premium"),
        (&basic, "std"),
        (&untiered, "std"),
    ] {
        let r = get("/api/orders", Some(t));
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().unwrap(), expect);
    }
    // The premium route forwards the identity it verified while routing.
    let recorded = premium.last();
    assert!(recorded.header("authorization").is_some());
    // No token, or a bad one: the claims route does not match; the default
    // route's own auth answers.
    assert_problem(get("/api/orders", None), 401);
    let forged = {
        let key = jwt::encoding_key(Algorithm::RS256, "rsa2.pem");
        let mut c = claims("user-1");
        c["tier"] = json!("premium");
        jwt::mint_with_header(jsonwebtoken::Header::new(Algorithm::RS256), &key, &c)
    };
    let r = get("/api/orders", Some(&forged));
    assert_eq!(r.status(), 401, "a forged premium token is refused");
    assert_eq!(premium.count(), 2, "only the two valid premium tokens");
    // The query condition, percent-decoded, any of the parameter's values.
    for query in ["?version=2", "?a=1&version=%32", "?version=1&version=2"] {
        let r = get(&format!("/api/orders{query}"), None);
        assert_eq!(r.status(), 200, "{query}");
        assert_eq!(r.text().unwrap(), "beta", "{query}");
    }
    for query in ["?version=3", "?version", "?xversion=2"] {
        assert_eq!(get(&format!("/api/orders{query}"), None).status(), 401);
    }
    // `gatehouse route` explains it, given the same header.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("g.yaml");
    let listed_config = format!(
        "listen: [127.0.0.1:0]\n{}",
        claims_config(&premium, &beta, &std)
    );
    std::fs::write(&conf, listed_config).unwrap();
    let explain = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("route")
            .arg("-c")
            .arg(&conf)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text + &String::from_utf8_lossy(&out.stderr)
    };
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    let out = explain(&["GET", "/api/orders", "-H", &bearer(&gold)]);
    assert!(out.contains("route: premium"), "{out}");
    assert!(out.contains("matches claim tier = \"premium\""), "{out}");
    let out = explain(&["GET", "/api/orders", "-H", &bearer(&basic)]);
    assert!(out.contains("route: default"), "{out}");
    assert!(
        out.contains("premium: claim tier = \"premium\" does not match"),
        "{out}"
    );
    let out = explain(&["GET", "/api/orders"]);
    assert!(
        out.contains("claim tier = \"premium\" (credentials: missing_token) does not match"),
        "{out}"
    );
    let out = explain(&["GET", "/api/orders?version=2"]);
    assert!(out.contains("route: beta"), "{out}");
    assert!(out.contains("matches query version=2"), "{out}");
}

#[test]
fn traffic_mistakes_are_config_errors_with_their_path() {
    let base = "listen: [127.0.0.1:0]\nupstreams:\n  a: { targets: ['127.0.0.1:9'] }\n  b: { targets: ['127.0.0.1:10'] }\n";
    let route = |body: &str| format!("{base}routes:\n  - name: r\n{body}");
    let cases = [
        (
            route("    match: { path_prefix: /, claims: { tier: gold } }\n    upstream: a\n"),
            "routes[0].match.claims",
            "needs auth",
        ),
        (
            route("    match: { path_prefix: /, claims: { tier: [a, b] } }\n    upstream: a\n"),
            "routes[0].match.claims.tier",
            "one value",
        ),
        (
            route("    match: { path_prefix: /, query: { v: { x: 1 } } }\n    upstream: a\n"),
            "routes[0].match.query.v",
            "one value",
        ),
        (
            route("    match: { path_prefix: / }\n    split: { to: [{ upstream: a }] }\n"),
            "routes[0].split.to",
            "at least two",
        ),
        (
            route("    match: { path_prefix: / }\n    split: { to: [{ upstream: a }, { upstream: c }] }\n"),
            "routes[0].split.to[1].upstream",
            "unknown upstream \"c\"",
        ),
        (
            route("    match: { path_prefix: / }\n    split: { to: [{ upstream: a }, { upstream: a }] }\n"),
            "routes[0].split.to[1].upstream",
            "already a side",
        ),
        (
            route("    match: { path_prefix: / }\n    split: { to: [{ upstream: a, weight: 0 }, { upstream: b, weight: 0 }] }\n"),
            "routes[0].split.to",
            "weight above zero",
        ),
        (
            route("    match: { path_prefix: / }\n    split: { by: cookie, to: [{ upstream: a }, { upstream: b }] }\n"),
            "routes[0].split.by",
            "unknown split key",
        ),
        (
            route("    match: { path_prefix: / }\n    upstream: a\n    split: { to: [{ upstream: a }, { upstream: b }] }\n"),
            "routes[0]",
            "not several",
        ),
        (
            route("    match: { path_prefix: / }\n    upstream: a\n    mirror: { upstream: z }\n"),
            "routes[0].mirror.upstream",
            "unknown upstream \"z\"",
        ),
        (
            route("    match: { path_prefix: / }\n    upstream: a\n    mirror: { upstream: b, percent: 150 }\n"),
            "routes[0].mirror.percent",
            "0% to 100%",
        ),
        (
            format!("{base}  c: {{ targets: ['127.0.0.1:11'], retry_on: [connect, 404] }}\n"),
            "upstreams.c.retry_on[1]",
            "not a 5xx status",
        ),
        (
            format!("{base}  c: {{ targets: ['127.0.0.1:11'], retry_budget: 120% }}\n"),
            "upstreams.c.retry_budget",
            "0% to 100%",
        ),
        (
            format!("{base}  c: {{ targets: ['127.0.0.1:11'], outlier: {{ consecutive_failures: 0, eject_for: 0s }} }}\n"),
            "upstreams.c.outlier.consecutive_failures",
            "at least 1",
        ),
        (
            format!("{base}  c: {{ targets: ['127.0.0.1:11'], outlier: {{ eject_for: 0s }} }}\n"),
            "upstreams.c.outlier.eject_for",
            "above zero",
        ),
        (
            format!("{base}  c: {{ targets: ['127.0.0.1:11'], outlier: {{ max_ejected: half }} }}\n"),
            "upstreams.c.outlier.max_ejected",
            "like 20%",
        ),
        (
            route("    match: { path_prefix: / }\n    split: { to: [{ upstream: a }, { upstream: b, share: 3 }] }\n"),
            "routes[0].split.to[1].share",
            "unknown key",
        ),
        (
            route("    match: { path_prefix: / }\n    split: { to: [{ upstream: a, weight: 10000 }, { upstream: b, weight: 10001 }] }\n"),
            "routes[0].split.to[1].weight",
            "between 0 and 10000",
        ),
        (
            route("    match: { path: \"/p/{id}\" }\n    mirror: { upstream: b }\n    aggregate:\n      parts:\n        - { key: x, upstream: a, path: \"/x/{id}\" }\n"),
            "routes[0].mirror",
            "an aggregate route sends its parts",
        ),
        (
            format!("{base}  c: {{ targets: ['127.0.0.1:11'], resolve_at_start: maybe }}\n"),
            "upstreams.c.resolve_at_start",
            "expected a boolean",
        ),
    ];
    assert_config_errors(&cases, None);
}

fn failing(name: &str, status: u16) -> TestUpstream {
    TestUpstream::with_handler(name, move |_| Reply::text(status, "down"))
}

fn metric(gw: &Gateway, line_start: &str) -> Option<f64> {
    metrics_text(gw)
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn failing_targets_are_ejected_return_and_a_reload_keeps_them_out() {
    let bad = failing("bad", 500);
    let (good1, good2) = (TestUpstream::named("good1"), TestUpstream::named("good2"));
    let config = format!(
        "upstreams:
  pool:
    targets: [{}, {}, {}]
    outlier: {{ consecutive_failures: 3, eject_for: 1s, max_ejected: 50% }}
routes:
  - name: r
    match: {{ path_prefix: / }}
    upstream: pool
",
        bad.addr, good1.addr, good2.addr
    );
    let gw = gateway(&config).start();
    let mut failures = 0;
    for _ in 0..30 {
        if client().get(gw.url("/x")).send().unwrap().status() == 500 {
            failures += 1;
        }
    }
    assert_eq!(failures, 3, "ejected after its third consecutive failure");
    assert_eq!(bad.count(), 3);
    let label = format!("target=\"{}\",upstream=\"pool\"", bad.addr);
    assert_eq!(
        metric(
            &gw,
            &format!("gatehouse_upstream_ejections_total{{{label}}}")
        ),
        Some(1.0)
    );
    eventually(Duration::from_secs(2), "healthy gauge at 0", || {
        metric(&gw, &format!("gatehouse_upstream_healthy{{{label}}}")) == Some(0.0)
    });
    assert!(gw
        .log_text()
        .contains("ejected for 1s after 3 consecutive failures"));
    // Back after eject_for, counting from zero; the next ejection lasts twice
    // as long.
    eventually(Duration::from_secs(3), "the target returns", || {
        client().get(gw.url("/x")).send().unwrap();
        bad.count() > 3
    });
    assert!(gw.log_text().contains("returns after its ejection"));
    for _ in 0..12 {
        client().get(gw.url("/x")).send().unwrap();
    }
    assert_eq!(bad.count(), 6, "three more failures, then out again");
    assert!(
        gw.log_text().contains("ejected for 2s"),
        "{}",
        gw.log_text()
    );
    // A reload that leaves the upstream as it is keeps it out.
    assert_eq!(admin(&gw, "POST", "/reload").0, 200);
    for _ in 0..12 {
        assert_eq!(client().get(gw.url("/x")).send().unwrap().status(), 200);
    }
    assert_eq!(bad.count(), 6);
}

#[test]
fn never_more_than_max_ejected_targets_are_out() {
    let (a, b) = (failing("a", 503), failing("b", 503));
    let config = format!(
        "upstreams:
  pool:
    targets: [{}, {}]
    outlier: {{ consecutive_failures: 2, eject_for: 30s, max_ejected: 50% }}
routes:
  - name: r
    match: {{ path_prefix: / }}
    upstream: pool
",
        a.addr, b.addr
    );
    let gw = gateway(&config).start();
    for _ in 0..20 {
        assert_eq!(client().get(gw.url("/x")).send().unwrap().status(), 503);
    }
    // One of the two is out; the other, though failing, keeps serving.
    let (ca, cb) = (a.count(), b.count());
    assert!(ca.min(cb) == 2 && ca.max(cb) == 18, "{ca} and {cb}");
    let ejections = metrics_text(&gw)
        .lines()
        .filter(|l| l.starts_with("gatehouse_upstream_ejections_total{"))
        .count();
    assert_eq!(ejections, 1);
}

fn retry_config(extra: &str, targets: &str) -> String {
    format!(
        "upstreams:
  pool:
    targets: [{targets}]
    retry_on: [connect, reset, 503]
{extra}routes:
  - name: r
    match: {{ path_prefix: / }}
    upstream: pool
"
    )
}

#[test]
fn listed_failures_are_retried_for_idempotent_methods_with_whole_bodies() {
    let down = failing("down", 503);
    let good = TestUpstream::with_handler("good", |req| {
        Reply::text(200, &format!("good {} {}", req.method, req.body.len()))
    });
    // A target that reads a request and closes without answering.
    let reset = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let reset_addr = reset.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in reset.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut s, &mut buf);
            drop(s);
        }
    });
    let targets = format!("{}, {}, {reset_addr}", down.addr, good.addr);
    let gw = gateway(&retry_config("", &targets)).start();
    for _ in 0..12 {
        let r = client().get(gw.url("/x")).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().unwrap(), "good GET 0");
    }
    // A small PUT body is replayed whole.
    for _ in 0..6 {
        let r = client()
            .put(gw.url("/x"))
            .body("x".repeat(1000))
            .send()
            .unwrap();
        assert_eq!(r.text().unwrap(), "good PUT 1000");
    }
    // POST is never retried once sent: the client gets what the target did.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..9 {
        seen.insert(
            client()
                .post(gw.url("/x"))
                .body("p")
                .send()
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(seen, [200, 502, 503].into_iter().collect(), "{seen:?}");
    // A PUT over the 64KiB replay buffer is not retried either.
    let mut big = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let r = client()
            .put(gw.url("/x"))
            .body("y".repeat(100_000))
            .send()
            .unwrap();
        big.insert(r.status().as_u16());
    }
    assert!(big.contains(&503) && big.contains(&200), "{big:?}");
    let retried = metric_sum(&gw, "gatehouse_upstream_requests_total{outcome=\"retry\"");
    assert!(retried >= 8.0, "{retried} retries counted");
    assert!(gw.log_text().contains("status 503 from"));
    assert!(gw.log_text().contains("connection reset from"));
}

#[test]
fn retries_stop_at_the_budget_and_without_retry_on_a_503_passes() {
    let down = failing("down", 503);
    let slow = TestUpstream::with_handler("slow", |_| {
        Reply::text(200, "slow").delayed(Duration::from_secs(2))
    });
    let targets = format!("{{ address: {}, weight: 200 }}, {}", down.addr, slow.addr);
    let gw = gateway(&retry_config("    retry_budget: 0%\n", &targets)).start();
    let url = gw.url("/x");
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|_| s.spawn(|| client().get(&url).send().unwrap().status().as_u16()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let passed = statuses.iter().filter(|s| **s == 503).count();
    assert!(passed >= 6, "{statuses:?}");
    let retried = metric_sum(&gw, "gatehouse_upstream_requests_total{outcome=\"retry\"");
    assert_eq!(
        retried, 3.0,
        "the budget's minimum of three in flight: {statuses:?}"
    );

    // Without 503 in retry_on the answer passes as it is.
    let plain = format!(
        "upstreams:\n  pool:\n    targets: [{}, {}]\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: pool\n",
        down.addr, slow.addr
    );
    let gw = gateway(&plain).start();
    let statuses: Vec<u16> = (0..2)
        .map(|_| client().get(gw.url("/x")).send().unwrap().status().as_u16())
        .collect();
    assert!(statuses.contains(&503), "{statuses:?}");
}

fn mirror_config(main: &TestUpstream, mirror_target: &str, percent: u32) -> String {
    format!(
        "upstreams:
  orders: {{ targets: [{}] }}
  next: {{ targets: ['{mirror_target}'], connect_timeout: 1s, read_timeout: 10s }}
routes:
  - name: orders
    match: {{ path_prefix: /orders }}
    upstream: orders
    strip_prefix: /orders
    add_prefix: /v2
    mirror: {{ upstream: next, percent: {percent} }}
",
        main.addr
    )
}

fn mirror_count(gw: &Gateway, result: &str) -> f64 {
    metric(
        gw,
        &format!("gatehouse_mirror_requests_total{{result=\"{result}\",route=\"orders\"}}"),
    )
    .unwrap_or(0.0)
}

#[test]
fn mirrors_get_a_copy_of_head_and_body_and_the_client_only_the_upstream_answer() {
    let main = TestUpstream::named("orders");
    let next = TestUpstream::with_handler("next", |_| Reply::text(500, "mirror says no"));
    let gw = gateway(&mirror_config(&main, &next.addr.to_string(), 100)).start();
    let r = client()
        .post(gw.url("/orders/7?x=1"))
        .header("Content-Type", "application/json")
        .body("{\"item\":1}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "orders");
    let r = client().get(gw.url("/orders/8")).send().unwrap();
    assert_eq!(r.text().unwrap(), "orders");
    eventually(Duration::from_secs(5), "both copies arrive", || {
        next.count() == 2
    });
    let copies = next.requests();
    let sent = main.requests();
    for (copy, original) in copies.iter().zip(&sent) {
        assert_eq!(copy.method, original.method);
        assert_eq!(copy.target, original.target, "the rewritten path");
        assert_eq!(copy.body, original.body);
        assert_eq!(copy.header("x-request-id"), original.header("x-request-id"));
    }
    assert_eq!(copies[0].target, "/v2/7?x=1");
    assert_eq!(copies[0].body, b"{\"item\":1}");
    eventually(Duration::from_secs(5), "counted as sent", || {
        mirror_count(&gw, "sent") == 2.0
    });
    // A body over 256KiB is not copied.
    let r = client()
        .put(gw.url("/orders/9"))
        .body(vec![b'z'; 300 * 1024])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(main.last().body.len(), 300 * 1024);
    eventually(Duration::from_secs(5), "counted as skipped", || {
        mirror_count(&gw, "skipped") == 1.0
    });
    assert_eq!(next.count(), 2);
}

#[test]
fn a_share_of_requests_is_mirrored() {
    let main = TestUpstream::named("orders");
    let next = TestUpstream::named("next");
    let gw = gateway(&mirror_config(&main, &next.addr.to_string(), 10)).start();
    for _ in 0..300 {
        assert_eq!(
            client().get(gw.url("/orders/1")).send().unwrap().status(),
            200
        );
    }
    eventually(Duration::from_secs(5), "copies answered", || {
        mirror_count(&gw, "sent") == next.count() as f64
    });
    assert!((10..=60).contains(&next.count()), "{} of 300", next.count());
}

#[test]
fn slow_and_dead_mirrors_cost_the_client_nothing() {
    let main = TestUpstream::named("orders");
    let slow = TestUpstream::with_handler("slow", |_| {
        Reply::text(200, "late").delayed(Duration::from_secs(5))
    });
    let gw = gateway(&mirror_config(&main, &slow.addr.to_string(), 100)).start();
    // Every answer comes while the copies still wait on the slow mirror:
    // past 100 in flight, copies are skipped.
    for _ in 0..130 {
        let r = client().get(gw.url("/orders/1")).send().unwrap();
        assert_eq!(r.text().unwrap(), "orders");
    }
    assert_eq!(mirror_count(&gw, "sent"), 0.0, "no copy answered yet");
    assert!(
        mirror_count(&gw, "skipped") >= 30.0,
        "{}",
        mirror_count(&gw, "skipped")
    );
    eventually(Duration::from_secs(5), "the slow mirror saw 100", || {
        slow.count() == 100
    });

    let dead = format!("127.0.0.1:{}", free_port());
    let gw = gateway(&mirror_config(&main, &dead, 100)).start();
    for _ in 0..10 {
        let r = client().post(gw.url("/orders/1")).body("x").send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().unwrap(), "orders");
    }
    eventually(Duration::from_secs(5), "copies counted as failed", || {
        mirror_count(&gw, "failed") == 10.0
    });
}

#[test]
fn a_client_that_hangs_up_neither_retries_nor_ejects() {
    let slow = |name: &'static str| {
        TestUpstream::with_handler(name, move |_| {
            Reply::text(200, name).delayed(Duration::from_secs(2))
        })
    };
    let (s1, s2) = (slow("s1"), slow("s2"));
    let config = format!(
        "upstreams:
  pool:
    targets: [{}, {}]
    retry_on: [connect, reset, timeout]
    outlier: {{ consecutive_failures: 2, eject_for: 30s }}
routes:
  - name: r
    match: {{ path_prefix: / }}
    upstream: pool
",
        s1.addr, s2.addr
    );
    let gw = gateway(&config).start();
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    for _ in 0..4 {
        assert!(impatient.get(gw.url("/x")).send().is_err());
    }
    eventually(Duration::from_secs(5), "four requests arrived", || {
        s1.count() + s2.count() >= 4
    });
    // Give the gateway a moment to notice the hang-ups: a fifth, patient
    // request after them is the sentinel.
    assert_eq!(client().get(gw.url("/x")).send().unwrap().status(), 200);
    assert_eq!(s1.count() + s2.count(), 5, "no hang-up was retried");
    let text = metrics_text(&gw);
    assert!(
        !text.contains("gatehouse_upstream_ejections_total{"),
        "{text}"
    );
    assert!(!text.contains("outcome=\"retry\""), "{text}");
}

#[test]
fn a_cached_split_keeps_each_side_its_own_answers() {
    let (v1, v2) = (TestUpstream::named("v1"), TestUpstream::named("v2"));
    let config = format!(
        "cache: {{ max_size: 4MiB }}
upstreams:
  v1: {{ targets: [{}] }}
  v2: {{ targets: [{}] }}
routes:
  - name: cached
    match: {{ path_prefix: / }}
    split:
      by: header:X-User
      to: [{{ upstream: v1 }}, {{ upstream: v2 }}]
    cache: {{ ttl: 60s }}
",
        v1.addr, v2.addr
    );
    let gw = gateway(&config).start();
    let users: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
    let first: Vec<String> = users.iter().map(|u| side_of(&gw, "/x", Some(u))).collect();
    assert!(first.contains(&"v1".to_string()) && first.contains(&"v2".to_string()));
    for (user, side) in users.iter().zip(&first) {
        assert_eq!(
            &side_of(&gw, "/x", Some(user)),
            side,
            "{user} got the other side's entry"
        );
    }
    assert_eq!(v1.count() + v2.count(), 2, "one entry per side");
}

#[test]
fn a_timeout_is_retried_for_a_get_and_answered_504_for_a_post() {
    let stalled = TestUpstream::with_handler("stalled", |_| {
        Reply::text(200, "late").delayed(Duration::from_secs(3))
    });
    let fast = TestUpstream::named("fast");
    let config = format!(
        "upstreams:
  pool:
    targets: [{}, {}]
    read_timeout: 300ms
    retry_on: [connect, timeout]
routes:
  - name: r
    match: {{ path_prefix: / }}
    upstream: pool
",
        stalled.addr, fast.addr
    );
    let gw = gateway(&config).start();
    for _ in 0..4 {
        let r = client().get(gw.url("/x")).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().unwrap(), "fast");
    }
    assert!(
        stalled.count() >= 1,
        "round robin sent some to the stalled one"
    );
    let statuses: BTreeSet<u16> = (0..4)
        .map(|_| {
            client()
                .post(gw.url("/x"))
                .body("p")
                .send()
                .unwrap()
                .status()
                .as_u16()
        })
        .collect();
    assert_eq!(
        statuses,
        [200, 504].into_iter().collect(),
        "POST is not retried"
    );
    assert!(gw.log_text().contains("timeout from"));
}

#[test]
fn a_refused_token_is_verified_once_though_a_claims_route_fell_through() {
    let (premium, std) = (TestUpstream::named("premium"), TestUpstream::named("std"));
    // After the first, every key set takes longer to come than the
    // early-refresh gap the gateway is given (1 s): each verification of a
    // token naming an unknown kid then makes a fetch of its own, so the
    // fetches count verifications.
    let keys = jwt::jwks(&[("rsa1.pem", "key-a")]);
    let served = AtomicUsize::new(0);
    let idp = TestUpstream::with_handler("idp", move |_| {
        let reply = Reply::typed(200, "application/json", &keys);
        match served.fetch_add(1, Ordering::SeqCst) {
            0 => reply,
            _ => reply.delayed(Duration::from_millis(1500)),
        }
    });
    let config = format!(
        "auth:
  jwt:
    idp:
      algorithms: [RS256]
      jwks_url: http://{}/jwks
      jwks_refresh: 1h
upstreams:
  premium: {{ targets: [{}] }}
  std: {{ targets: [{}] }}
routes:
  - name: default
    match: {{ path_prefix: /api }}
    upstream: std
    auth: idp
  - name: premium
    match: {{ path_prefix: /api, claims: {{ tier: premium }} }}
    upstream: premium
    auth: idp
",
        idp.addr, premium.addr, std.addr
    );
    let gw = gateway(&config)
        .env("GATEHOUSE_JWKS_EARLY_REFRESH_GAP", "1s")
        .start();
    let premium_token = |kid: &str| {
        let mut c = claims("user-1");
        c["tier"] = json!("premium");
        jwt::mint(Algorithm::RS256, "rsa1.pem", Some(kid), &c)
    };
    let get = |token: &str| {
        client()
            .get(gw.url("/api/orders"))
            .bearer_auth(token)
            .send()
            .unwrap()
    };
    let r = get(&premium_token("key-a"));
    assert_eq!(r.text().unwrap(), "premium");
    let fetches = idp.count();
    // A premium token naming a kid the identity provider never published:
    // routing verifies it for the claims route and falls through; the
    // default route (same provider) refuses it with that verdict.
    let r = get(&premium_token("key-gone"));
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    assert_problem(r, 401);
    assert_eq!(
        idp.count(),
        fetches + 1,
        "verified once, while routing: the default route's auth verified it again"
    );
    assert_eq!(
        metric(
            &gw,
            "gatehouse_auth_failures_total{reason=\"unknown_key\",route=\"default\"}"
        ),
        Some(1.0)
    );
    assert_eq!(metric_sum(&gw, "gatehouse_auth_failures_total{"), 1.0);
    assert_eq!((premium.count(), std.count()), (1, 0));
}

fn sha256_hex(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An HS256 token valid for an hour, for `sub` or (`None`) with no `sub`.
fn hs256_token(sub: Option<&str>) -> String {
    let mut c = claims(sub.unwrap_or_default());
    if sub.is_none() {
        c.as_object_mut().unwrap().remove("sub");
    }
    jwt::mint(Algorithm::HS256, jwt::SECRET, None, &c)
}

/// The side `c` is sent to for `path`, with these headers.
fn side_from(
    c: &reqwest::blocking::Client,
    gw: &Gateway,
    path: &str,
    headers: &[(&str, &str)],
) -> String {
    let mut req = c.get(gw.url(path));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let r = req.send().unwrap();
    assert_eq!(r.status(), 200, "{path} {headers:?}");
    r.text().unwrap()
}

#[test]
fn splits_by_claim_or_consumer_stick_per_user_and_fall_back_to_the_client_ip() {
    let (v1, v2) = (TestUpstream::named("v1"), TestUpstream::named("v2"));
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.yaml");
    let partner_key = |i: usize| format!("partner-key-{i:02}-0f3c9a1e77d24b5c");
    let keys: String = (0..40)
        .map(|i| {
            let digest = sha256_hex(&partner_key(i));
            format!("- {{ consumer: partner-{i}, sha256: \"{digest}\" }}\n")
        })
        .collect();
    std::fs::write(&keys_file, keys).unwrap();
    let sides = "      to:
        - { upstream: v1, weight: 90 }
        - { upstream: v2, weight: 10 }
";
    let config = format!(
        "auth:
  jwt:
    main:
      algorithms: [HS256]
      secret: ${{JWT_SECRET}}
  api_keys:
    partners:
      from: header:X-API-Key
      keys_file: {keys}
upstreams:
  v1: {{ targets: [{v1}] }}
  v2: {{ targets: [{v2}] }}
routes:
  - name: users
    match: {{ path_prefix: /users }}
    auth: main
    split:
      by: claim:sub
{sides}  - name: open
    match: {{ path_prefix: /open }}
    split:
      by: claim:sub
{sides}  - name: by-ip
    match: {{ path_prefix: /by-ip }}
    split:
      by: ip
{sides}  - name: partners
    match: {{ path_prefix: /partners }}
    auth: partners
    split:
      by: consumer
      to: [{{ upstream: v1 }}, {{ upstream: v2 }}]
",
        keys = keys_file.display(),
        v1 = v1.addr,
        v2 = v2.addr,
    );
    let gw = gateway(&config).env("JWT_SECRET", jwt::SECRET).start();
    let local = client();
    let elsewhere: Vec<_> = (2..7)
        .map(|i| client_from(&format!("127.0.0.{i}")))
        .collect();

    // The SPEC's own example: each user stays on one side, wherever they
    // connect from, and the users spread by the weights.
    let mut on_v2 = 0;
    for i in 0..200 {
        let bearer = format!("Bearer {}", hs256_token(Some(&format!("user-{i}"))));
        let auth = [("Authorization", bearer.as_str())];
        let side = side_from(&local, &gw, "/users/x", &auth);
        assert_eq!(side_from(&local, &gw, "/users/x", &auth), side, "user-{i}");
        assert_eq!(
            side_from(&elsewhere[i % 5], &gw, "/users/x", &auth),
            side,
            "user-{i} moved with the client address"
        );
        on_v2 += usize::from(side == "v2");
    }
    assert!(
        (6..=40).contains(&on_v2),
        "{on_v2} of 200 users on the 10% side"
    );

    // Without the claim (a token with no `sub`, or no token on a route
    // without auth) the key is the client IP: the side a `by: ip` split of
    // the same weights picks.
    let no_sub = format!("Bearer {}", hs256_token(None));
    let mut by_ip = BTreeSet::new();
    for i in 10..110 {
        let c = client_from(&format!("127.0.0.{i}"));
        let side = side_from(&c, &gw, "/by-ip/x", &[]);
        let auth = [("Authorization", no_sub.as_str())];
        assert_eq!(side_from(&c, &gw, "/users/x", &auth), side, "127.0.0.{i}");
        assert_eq!(side_from(&c, &gw, "/open/x", &[]), side, "127.0.0.{i}");
        by_ip.insert(side);
    }
    assert_eq!(by_ip.len(), 2, "the addresses fall on both sides");

    // `by: consumer`: each API key's consumer stays on one side.
    let mut seen = BTreeSet::new();
    for i in 0..40 {
        let key = partner_key(i);
        let header = [("X-API-Key", key.as_str())];
        let side = side_from(&local, &gw, "/partners/x", &header);
        assert_eq!(
            side_from(&elsewhere[i % 5], &gw, "/partners/x", &header),
            side,
            "partner-{i}"
        );
        seen.insert(side);
    }
    assert_eq!(seen.len(), 2, "the consumers fall on both sides");
}

#[test]
fn a_target_serves_only_while_neither_its_checks_nor_its_failures_count_against_it() {
    // Passes its health checks, fails every request.
    let flaky = failing("flaky", 500);
    // Fails its health checks, would answer every request.
    let down = TestUpstream::named("down");
    down.set_healthy(false);
    let good = TestUpstream::named("good");
    let config = format!(
        "upstreams:
  pool:
    targets: [{}, {}, {}]
    health_check: {{ path: /health, interval: 100ms, timeout: 500ms, unhealthy_after: 1, healthy_after: 1 }}
    outlier: {{ consecutive_failures: 2, eject_for: 30s, max_ejected: 50% }}
routes:
  - name: r
    match: {{ path_prefix: / }}
    upstream: pool
",
        flaky.addr, down.addr, good.addr
    );
    let gw = gateway(&config).start();
    let healthy = |t: &TestUpstream| {
        metric(
            &gw,
            &format!(
                "gatehouse_upstream_healthy{{target=\"{}\",upstream=\"pool\"}}",
                t.addr
            ),
        )
    };
    eventually(Duration::from_secs(5), "its check marks it down", || {
        healthy(&down) == Some(0.0)
    });
    let get = || client().get(gw.url("/x")).send().unwrap();
    let statuses: Vec<u16> = (0..20).map(|_| get().status().as_u16()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(flaky.count(), 2, "ejected after two failures");
    assert_eq!(
        down.count(),
        0,
        "never used, though no request of it ever failed"
    );
    assert_eq!(good.count(), 18);
    // The ejected target keeps passing its checks, and stays out.
    let checks = flaky.health_checks();
    eventually(Duration::from_secs(5), "more passing checks", || {
        flaky.health_checks() >= checks + 3
    });
    for _ in 0..10 {
        assert_eq!(get().text().unwrap(), "good");
    }
    assert_eq!(flaky.count(), 2);
    // Checks passing again, the target nothing counts against serves.
    down.set_healthy(true);
    eventually(
        Duration::from_secs(5),
        "the recovered target serves",
        || {
            assert_eq!(get().status(), 200);
            down.count() > 0
        },
    );
    assert_eq!(flaky.count(), 2);
}

/// Reads one message head off `s` (through its blank line) and the bytes
/// read past it; `None` once the peer closed.
fn read_head(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A target on 127.0.0.1:0, a thread per connection: `answer` gets each
/// request head (and the bytes read past it) with the connection, and says
/// whether to read another request on it.
fn serve_raw(
    answer: impl Fn(&str, &[u8], &mut TcpStream) -> bool + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let answer = Arc::clone(&answer);
            std::thread::spawn(move || {
                while let Some((head, rest)) = read_head(&mut s) {
                    if !answer(&head, &rest, &mut s) {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Two targets' shared gate: each first attempt is held until `held` have
/// arrived, then all are answered 503 at once; a later request (a retry)
/// is held until each first attempt is either retried or answered to its
/// client, then answered 200. So every retry is decided while all the
/// requests are in flight, and no retry ends before the last decision.
struct Gate {
    /// Requests arrived, and 503s the clients received.
    counts: Mutex<(usize, usize)>,
    changed: Condvar,
    held: usize,
}

impl Gate {
    fn target(gate: &Arc<Gate>) -> SocketAddr {
        let gate = Arc::clone(gate);
        serve_raw(move |_, _, s| {
            let wait = Duration::from_secs(10);
            let mut counts = gate.counts.lock().unwrap();
            counts.0 += 1;
            let first = counts.0 <= gate.held;
            gate.changed.notify_all();
            let reply: &[u8] = if first {
                let _all_here = gate
                    .changed
                    .wait_timeout_while(counts, wait, |c| c.0 < gate.held)
                    .unwrap();
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\ndown"
            } else {
                let _all_decided = gate
                    .changed
                    .wait_timeout_while(counts, wait, |c| c.0 - gate.held + c.1 < gate.held)
                    .unwrap();
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nretry"
            };
            s.write_all(reply).is_ok()
        })
    }

    fn given_up(&self) {
        self.counts.lock().unwrap().1 += 1;
        self.changed.notify_all();
    }
}

#[test]
fn retries_stop_at_their_share_of_the_requests_in_flight() {
    const REQUESTS: usize = 40;
    let gate = Arc::new(Gate {
        counts: Mutex::new((0, 0)),
        changed: Condvar::new(),
        held: REQUESTS,
    });
    let targets = format!("{}, {}", Gate::target(&gate), Gate::target(&gate));
    // 22% of 40 in flight: 8 retries, above the minimum of 3.
    let gw = gateway(&retry_config("    retry_budget: 22%\n", &targets)).start();
    let url = gw.url("/x");
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..REQUESTS)
            .map(|_| {
                s.spawn(|| {
                    let status = client().get(&url).send().unwrap().status().as_u16();
                    if status == 503 {
                        gate.given_up();
                    }
                    status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let retried = metric_sum(&gw, "gatehouse_upstream_requests_total{outcome=\"retry\"");
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(retried, 8.0, "{statuses:?}");
    assert_eq!(served, 8, "each retry answered: {statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        REQUESTS - 8,
        "past the budget the 503 is returned as it is"
    );
}

/// A target that answers `503` as soon as it has a request's head, before
/// a chunked body has arrived (a sized one it reads first); counts heads.
fn answers_before_the_body(heads: &Arc<AtomicUsize>) -> SocketAddr {
    let heads = Arc::clone(heads);
    serve_raw(move |head, rest, s| {
        heads.fetch_add(1, Ordering::SeqCst);
        let mut left = content_length(head).saturating_sub(rest.len());
        let mut buf = [0u8; 4096];
        while left > 0 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
        let answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndown";
        if s.write_all(answer).is_err() {
            return false;
        }
        // Whatever else comes (the rest of a chunked body) is read and
        // dropped until the gateway closes.
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        false
    })
}

#[test]
fn a_body_still_arriving_is_never_replayed() {
    let heads = Arc::new(AtomicUsize::new(0));
    let targets = format!(
        "{}, {}",
        answers_before_the_body(&heads),
        answers_before_the_body(&heads)
    );
    let gw = gateway(&retry_config("", &targets)).start();
    // A PUT whose chunked body is still coming when its target answers 503:
    // it cannot be replayed whole, so the client gets that 503.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"PUT /x HTTP/1.1\r\nHost: gateway.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
    )
    .unwrap();
    let (head, mut body) = read_head(&mut s).expect("an answer before the body ends");
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    let mut buf = [0u8; 64];
    while body.len() < content_length(&head) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    assert_eq!(body, b"down", "the target's own answer");
    let _ = s.write_all(b"0\r\n\r\n");
    drop(s);
    assert_eq!(heads.load(Ordering::SeqCst), 1, "the other target saw it");
    let retried = || metric_sum(&gw, "gatehouse_upstream_requests_total{outcome=\"retry\"");
    assert_eq!(retried(), 0.0);
    // The same PUT with its whole body is replayed on the other target.
    let r = client().put(gw.url("/x")).body("whole").send().unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(heads.load(Ordering::SeqCst), 3);
    assert_eq!(retried(), 1.0);
}

#[test]
fn a_retried_request_is_mirrored_once_and_a_retried_connect_stays_a_connect_error() {
    let down = failing("down", 503);
    let good = TestUpstream::with_handler("good", |req| {
        Reply::text(200, &format!("good {}", String::from_utf8_lossy(&req.body)))
    });
    let next = TestUpstream::named("next");
    let dead = free_port();
    let config = format!(
        "upstreams:
  orders:
    targets: [{down}, {good}]
    retry_on: [503]
  refusing:
    targets: ['127.0.0.1:{dead}', {good}]
  next: {{ targets: [{next}] }}
routes:
  - name: orders
    match: {{ path_prefix: /orders }}
    upstream: orders
    mirror: {{ upstream: next }}
  - name: refusing
    match: {{ path_prefix: /refusing }}
    upstream: refusing
    mirror: {{ upstream: next }}
",
        down = down.addr,
        good = good.addr,
        next = next.addr
    );
    let gw = gateway(&config).start();
    let mut bodies = BTreeSet::new();
    for i in 0..6 {
        let body = format!("put-{i}");
        let r = client()
            .put(gw.url("/orders/1"))
            .body(body.clone())
            .send()
            .unwrap();
        assert_eq!(r.text().unwrap(), format!("good {body}"));
        bodies.insert(body);
    }
    assert!(down.count() >= 2, "some went to the failing target first");
    for i in 0..4 {
        let body = format!("post-{i}");
        let r = client()
            .post(gw.url("/refusing/1"))
            .body(body.clone())
            .send()
            .unwrap();
        assert_eq!(r.text().unwrap(), format!("good {body}"));
        bodies.insert(body);
    }
    let sent = |route: &str| {
        metric(
            &gw,
            &format!("gatehouse_mirror_requests_total{{result=\"sent\",route=\"{route}\"}}"),
        )
    };
    eventually(Duration::from_secs(5), "every copy answered", || {
        sent("orders") == Some(6.0) && sent("refusing") == Some(4.0)
    });
    // One copy per request, retried or not, each with its whole body.
    let copies: Vec<String> = next
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(copies.len(), 10, "{copies:?}");
    assert_eq!(copies.into_iter().collect::<BTreeSet<_>>(), bodies);
    let text = metrics_text(&gw);
    assert!(!text.contains("result=\"skipped\""), "{text}");
    // A retried status counts as `retry`; a retried connect stays
    // `connect_error`.
    let retried = metric_sum(&gw, "gatehouse_upstream_requests_total{outcome=\"retry\"");
    assert_eq!(retried, down.count() as f64);
    let refused = format!(
        "gatehouse_upstream_requests_total{{outcome=\"connect_error\",target=\"127.0.0.1:{dead}\",upstream=\"refusing\"}}"
    );
    assert!(metric(&gw, &refused).is_some_and(|n| n >= 1.0), "{text}");
    assert!(
        !text.contains(&format!("outcome=\"retry\",target=\"127.0.0.1:{dead}\"")),
        "{text}"
    );
}
