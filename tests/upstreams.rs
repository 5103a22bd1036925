//! Upstream pools end to end: balancing, health checks, retries after a
//! failed connect, timeouts, fallbacks and the errors a client sees.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

fn route_to(upstream: &str) -> String {
    format!("routes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: {upstream}\n")
}

fn targets(ups: &[&TestUpstream]) -> String {
    ups.iter()
        .map(|u| u.addr.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sends `n` requests and counts answers by the upstream that gave them.
fn spread(gw: &Gateway, n: usize) -> HashMap<String, usize> {
    let c = client();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = c.get(gw.url("/x")).send().unwrap();
        assert_eq!(r.status(), 200);
        *counts.entry(r.text().unwrap()).or_insert(0) += 1;
    }
    counts
}

#[test]
fn round_robin_spreads_evenly() {
    let (a, b, c) = (
        TestUpstream::named("a"),
        TestUpstream::named("b"),
        TestUpstream::named("c"),
    );
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets: [{}]\n    balance: round_robin\n{}",
        targets(&[&a, &b, &c]),
        route_to("pool")
    ))
    .start();
    let counts = spread(&gw, 30);
    assert_eq!(counts["a"], 10, "{counts:?}");
    assert_eq!(counts["b"], 10, "{counts:?}");
    assert_eq!(counts["c"], 10, "{counts:?}");
}

#[test]
fn weights_shape_the_distribution() {
    let (a, b) = (TestUpstream::named("a"), TestUpstream::named("b"));
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets:\n      - {}\n      - {{ address: {}, weight: 3 }}\n{}",
        a.addr,
        b.addr,
        route_to("pool")
    ))
    .start();
    let counts = spread(&gw, 40);
    assert_eq!(counts["a"], 10, "{counts:?}");
    assert_eq!(counts["b"], 30, "{counts:?}");
}

#[test]
fn random_reaches_every_target() {
    let (a, b) = (TestUpstream::named("a"), TestUpstream::named("b"));
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets: [{}]\n    balance: random\n{}",
        targets(&[&a, &b]),
        route_to("pool")
    ))
    .start();
    let counts = spread(&gw, 60);
    assert!(counts["a"] > 5 && counts["b"] > 5, "{counts:?}");
}

#[test]
fn consistent_hash_keeps_a_key_on_one_target() {
    let (a, b, c) = (
        TestUpstream::named("a"),
        TestUpstream::named("b"),
        TestUpstream::named("c"),
    );
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets: [{}]\n    balance: consistent_hash\n    hash_key: header:X-User\n{}",
        targets(&[&a, &b, &c]),
        route_to("pool")
    ))
    .start();
    let cl = client();
    let mut used = std::collections::HashSet::new();
    for user in 0..30 {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let r = cl
                .get(gw.url("/x"))
                .header("X-User", format!("user-{user}"))
                .send()
                .unwrap();
            seen.insert(r.text().unwrap());
        }
        assert_eq!(seen.len(), 1, "user-{user} moved between targets: {seen:?}");
        used.extend(seen);
    }
    assert!(
        used.len() >= 2,
        "30 keys all hashed to one target: {used:?}"
    );
}

#[test]
fn least_connections_avoids_the_busy_target() {
    let handler = |name: &'static str| {
        move |r: &Recorded| {
            let reply = Reply::text(200, name);
            if r.target == "/slow" {
                reply.delayed(Duration::from_millis(1500))
            } else {
                reply
            }
        }
    };
    let a = TestUpstream::with_handler("a", handler("a"));
    let b = TestUpstream::with_handler("b", handler("b"));
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets: [{}]\n    balance: least_connections\n{}",
        targets(&[&a, &b]),
        route_to("pool")
    ))
    .start();
    let url = gw.url("/slow");
    let slow = std::thread::spawn(move || client().get(url).send().unwrap().text().unwrap());
    eventually(
        Duration::from_secs(5),
        "the slow request reached a target",
        || a.count() + b.count() == 1,
    );
    let busy = if a.count() == 1 { "a" } else { "b" };
    let counts = spread(&gw, 10);
    assert_eq!(
        counts.get(busy),
        None,
        "requests went to the busy target: {counts:?}"
    );
    assert_eq!(slow.join().unwrap(), busy);
}

#[test]
fn unhealthy_targets_get_no_traffic_until_they_recover() {
    let (a, b) = (TestUpstream::named("a"), TestUpstream::named("b"));
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets: [{}]\n    health_check: {{ path: /health, interval: 100ms, timeout: 500ms, unhealthy_after: 2, healthy_after: 2 }}\n{}",
        targets(&[&a, &b]),
        route_to("pool")
    ))
    .start();
    eventually(Duration::from_secs(5), "health checks run", || {
        a.health_checks() >= 2
    });
    assert_eq!(spread(&gw, 10)["a"], 5);

    a.set_healthy(false);
    let seen = a.health_checks();
    // Two failed checks flip it; wait for a third to be sure.
    eventually(Duration::from_secs(5), "a fails its checks", || {
        a.health_checks() >= seen + 3
    });
    let before = a.count();
    let counts = spread(&gw, 20);
    assert_eq!(counts.get("a"), None, "{counts:?}");
    assert_eq!(counts["b"], 20);
    assert_eq!(a.count(), before);

    a.set_healthy(true);
    eventually(Duration::from_secs(5), "a gets traffic again", || {
        spread(&gw, 4).contains_key("a")
    });
}

/// A target that answers its health check a byte at a time passes every
/// per-read timeout; the check's `timeout` bounds the whole answer, so it
/// fails, and traffic goes to nobody rather than to it.
#[test]
fn a_health_check_answered_too_slowly_fails() {
    let a = TestUpstream::with_handler("a", |r| {
        if r.target == "/trickle" {
            Reply {
                status: 200,
                headers: vec![("content-type".into(), "text/plain".into())],
                body: b"ok, eventually".to_vec(),
                delay: Duration::ZERO,
                chunked: Some(1),
                chunk_delay: Duration::from_millis(100),
            }
        } else {
            Reply::text(200, "a")
        }
    });
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets: [{}]\n    health_check: {{ path: /trickle, interval: 100ms, timeout: 400ms, unhealthy_after: 1 }}\n{}",
        a.addr,
        route_to("pool")
    ))
    .start();
    eventually(
        Duration::from_secs(10),
        "the slow target is refused",
        || client().get(gw.url("/x")).send().unwrap().status() == 503,
    );
    let r = client().get(gw.url("/x")).send().unwrap();
    assert_problem(r, 503);
}

#[test]
fn a_target_killed_between_checks_costs_the_client_nothing() {
    let mut a = TestUpstream::named("a");
    let b = TestUpstream::named("b");
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets: [{}]\n    health_check: {{ path: /health, interval: 1h }}\n    retries: 1\n{}",
        targets(&[&a, &b]),
        route_to("pool")
    ))
    .start();
    assert_eq!(spread(&gw, 4).len(), 2);
    a.stop();
    let counts = spread(&gw, 20);
    assert_eq!(counts["b"], 20, "{counts:?}");
    // The failed connects are counted against the dead target.
    let (_, metrics) = admin(&gw, "GET", "/metrics");
    let dead = format!("gatehouse_upstream_requests_total{{outcome=\"connect_error\",target=\"{}\",upstream=\"pool\"}}", a.addr);
    assert!(
        metrics.lines().any(|l| l.starts_with(&dead)),
        "{dead}\n{metrics}"
    );
    // POST is retried too: nothing was sent on a connection that failed.
    let r = client().post(gw.url("/x")).body("payload").send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(b.last().body, b"payload");
}

#[test]
fn connect_failure_is_502_and_names_no_address() {
    let dead1 = free_port();
    let dead2 = free_port();
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets: [127.0.0.1:{dead1}, 127.0.0.1:{dead2}]\n{}",
        route_to("pool")
    ))
    .start();
    let body = assert_problem(client().get(gw.url("/x")).send().unwrap(), 502);
    assert!(!body.to_string().contains(&dead1.to_string()));
}

#[test]
fn slow_upstreams_get_504_near_the_configured_time() {
    let slow = TestUpstream::with_handler("slow", |_| {
        Reply::text(200, "late").delayed(Duration::from_secs(4))
    });
    let gw = gateway(&format!(
        "upstreams:\n  by-read:\n    targets: [{a}]\n    read_timeout: 300ms\n  by-route:\n    targets: [{a}]\n    read_timeout: 30s\n\
routes:\n  - name: read\n    match: {{ path_prefix: /read }}\n    upstream: by-read\n  - name: route\n    match: {{ path_prefix: /route }}\n    upstream: by-route\n    timeout: 600ms\n",
        a = slow.addr
    ))
    .start();
    let c = client();
    let t = Instant::now();
    assert_problem(c.get(gw.url("/read")).send().unwrap(), 504);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    let t = Instant::now();
    assert_problem(c.get(gw.url("/route")).send().unwrap(), 504);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(580) && took < Duration::from_millis(1800),
        "{took:?}"
    );
}

#[test]
fn fallback_answers_when_no_target_can() {
    let dead = free_port();
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets: [127.0.0.1:{dead}]\n\
routes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: pool\n    fallback: {{ status: 503, content_type: application/json, body: '{{\"error\":\"users unavailable\"}}' }}\n"
    ))
    .start();
    let r = client().get(gw.url("/x")).send().unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(r.text().unwrap(), "{\"error\":\"users unavailable\"}");
}

#[test]
fn every_target_unhealthy_is_a_fast_503() {
    let a = TestUpstream::named("a");
    a.set_healthy(false);
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets: [{}]\n    health_check: {{ path: /health, interval: 100ms, unhealthy_after: 1 }}\n{}",
        a.addr,
        route_to("pool")
    ))
    .start();
    eventually(Duration::from_secs(5), "a is checked", || {
        a.health_checks() >= 2
    });
    let t = Instant::now();
    assert_problem(client().get(gw.url("/x")).send().unwrap(), 503);
    assert!(t.elapsed() < Duration::from_millis(500));
    assert_eq!(a.count(), 0);
}

#[test]
fn tcp_health_checks_mark_a_closed_port_down() {
    let a = TestUpstream::named("a");
    let dead = free_port();
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets: [{}, 127.0.0.1:{dead}]\n    retries: 0\n    health_check: {{ interval: 100ms, timeout: 200ms, unhealthy_after: 1 }}\n{}",
        a.addr,
        route_to("pool")
    ))
    .start();
    // With retries off, only a health check keeps requests off the dead port.
    eventually(
        Duration::from_secs(5),
        "the dead target is marked down",
        || (0..6).all(|_| client().get(gw.url("/x")).send().unwrap().status() == 200),
    );
    assert_eq!(spread(&gw, 10)["a"], 10);
}

#[test]
fn retries_zero_means_one_attempt() {
    let a = TestUpstream::named("a");
    let dead = free_port();
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets: [{}, 127.0.0.1:{dead}]\n    retries: 0\n{}",
        a.addr,
        route_to("pool")
    ))
    .start();
    let c = client();
    let statuses: Vec<u16> = (0..4)
        .map(|_| c.get(gw.url("/x")).send().unwrap().status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(a.count(), 2);
}

#[test]
fn a_tls_handshake_that_never_finishes_is_cut_at_connect_timeout() {
    // Accepts TCP, then says nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().take(4) {
            held.push(s);
        }
        std::thread::sleep(Duration::from_secs(10));
    });
    let gw = gateway(&format!(
        "upstreams:\n  pool:\n    targets: [{addr}]\n    tls: true\n    tls_verify: false\n    connect_timeout: 300ms\n    retries: 0\n{}",
        route_to("pool")
    ))
    .start();
    let t = Instant::now();
    let r = client().get(gw.url("/x")).send().unwrap();
    let took = t.elapsed();
    assert!(matches!(r.status().as_u16(), 502 | 504), "{}", r.status());
    assert!(took < Duration::from_millis(1500), "{took:?}");
    drop(keep);
}

#[test]
fn health_checks_expect_the_configured_status() {
    // The targets answer /health with 200; a check expecting 204 fails them.
    let a = TestUpstream::named("a");
    let gw = gateway(&format!(
        "upstreams:\n  strict:\n    targets: [{a}]\n    health_check: {{ path: /health, interval: 100ms, expect_status: 204, unhealthy_after: 1 }}\n  plain:\n    targets: [{a}]\n    health_check: {{ path: /health, interval: 100ms, expect_status: 200, unhealthy_after: 1 }}\n\
routes:\n  - name: strict\n    match: {{ path_prefix: /strict }}\n    upstream: strict\n  - name: plain\n    match: {{ path_prefix: /plain }}\n    upstream: plain\n",
        a = a.addr
    ))
    .start();
    eventually(Duration::from_secs(5), "checks ran", || {
        a.health_checks() >= 4
    });
    let c = client();
    assert_problem(c.get(gw.url("/strict")).send().unwrap(), 503);
    assert_eq!(c.get(gw.url("/plain")).send().unwrap().status(), 200);
}
