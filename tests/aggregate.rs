//! Aggregation end to end: parts called concurrently with placeholders and
//! forwarded headers, answers in the configured order, optional and required
//! failures, the overall timeout, and auth, limits and cache on the route.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn json_reply(v: Value) -> Reply {
    Reply::typed(200, "application/json", &v.to_string())
}

struct Setup {
    users: TestUpstream,
    orders: TestUpstream,
    recs: TestUpstream,
    gw: Gateway,
}

fn setup() -> Setup {
    let users = TestUpstream::with_handler("users", |r| {
        if r.target.starts_with("/users/slow") {
            return json_reply(json!({"slow": true})).delayed(Duration::from_millis(400));
        }
        if r.target.starts_with("/users/broken") {
            return Reply::text(500, "boom");
        }
        json_reply(json!({"id": r.target.trim_start_matches("/users/")}))
    });
    let orders = TestUpstream::with_handler("orders", |r| {
        if r.target.contains("user=slow") {
            return json_reply(json!(["late"])).delayed(Duration::from_millis(400));
        }
        if r.target.contains("user=text") {
            return Reply::text(200, "not json");
        }
        if r.target.contains("user=never") {
            return json_reply(json!([])).delayed(Duration::from_secs(3));
        }
        json_reply(json!([{"order": 1, "target": r.target}]))
    });
    let recs = TestUpstream::with_handler("recs", |r| {
        let reply = json_reply(json!({"for": r.target.trim_start_matches("/recs/")}));
        if r.target.contains("slow") {
            reply.delayed(Duration::from_millis(400))
        } else {
            reply
        }
    });
    let dead = free_port();
    let body = [
        format!(
            "upstreams:\n  users: {{ targets: [{}] }}\n  orders: {{ targets: [{}] }}\n  recs: {{ targets: [{}] }}\n  gone: {{ targets: [127.0.0.1:{dead}] }}\n",
            users.addr, orders.addr, recs.addr
        ),
        common::jwt::rs256_provider("main"),
        "      forward_claims: { sub: X-User-Id }\n".to_string(),
        "cache:\n  max_size: 1MiB\n".to_string(),
        "routes:\n".to_string(),
        "  - name: profile\n    match: { path: \"/profile/{id}\", methods: [GET] }\n    auth: main\n".to_string(),
        "    rate_limit: { requests: 100, per: 1m }\n".to_string(),
        "    aggregate:\n      timeout: 2s\n      parts:\n".to_string(),
        "        - { key: user, upstream: users, path: \"/users/{id}\" }\n".to_string(),
        "        - { key: orders, upstream: orders, path: \"/orders?user={id}&page={query.page}\", required: false }\n".to_string(),
        "        - { key: recs, upstream: recs, path: \"/recs/{claim.sub}\", required: false }\n".to_string(),
        "  - name: fragile\n    match: { path: \"/fragile/{id}\" }\n".to_string(),
        "    aggregate:\n      timeout: 300ms\n      parts:\n".to_string(),
        "        - { key: user, upstream: users, path: \"/users/{id}\" }\n".to_string(),
        "        - { key: orders, upstream: orders, path: \"/orders?user={id}\", required: false }\n".to_string(),
        "        - { key: gone, upstream: gone, path: /x, required: false }\n".to_string(),
        "  - name: cached\n    match: { path: \"/cached/{id}\" }\n    cache: { ttl: 1h }\n".to_string(),
        "    aggregate:\n      parts:\n".to_string(),
        "        - { key: user, upstream: users, path: \"/users/{id}\" }\n".to_string(),
    ]
    .concat();
    let gw = gateway(&body).start();
    Setup {
        users,
        orders,
        recs,
        gw,
    }
}

#[test]
fn parts_in_order_with_placeholders_and_forwarded_headers() {
    let s = setup();
    let r = client()
        .get(s.gw.url("/profile/42?page=3"))
        .bearer_auth(jwt::rs256_token("ann"))
        .header("X-Request-Id", "agg-1")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.headers()["x-request-id"], "agg-1");
    assert!(r.headers().get("x-aggregate-missing").is_none());
    let text = r.text().unwrap();
    // Keys in the order written.
    let (u, o, c) = (
        text.find("\"user\"").unwrap(),
        text.find("\"orders\"").unwrap(),
        text.find("\"recs\"").unwrap(),
    );
    assert!(u < o && o < c, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["user"], json!({"id": "42"}));
    assert_eq!(v["orders"][0]["target"], "/orders?user=42&page=3");
    assert_eq!(v["recs"], json!({"for": "ann"}));
    for up in [&s.users, &s.orders, &s.recs] {
        let seen = up.last();
        // Each part is addressed to its own target, told who asked.
        assert_eq!(
            seen.header("host"),
            Some(up.addr.to_string().as_str()),
            "{}",
            up.name()
        );
        assert!(
            seen.header("x-forwarded-host")
                .unwrap()
                .starts_with("127.0.0.1:"),
            "{}",
            up.name()
        );
        assert_eq!(
            seen.header("x-forwarded-for"),
            Some("127.0.0.1"),
            "{}",
            up.name()
        );
        assert_eq!(
            seen.header("x-forwarded-proto"),
            Some("http"),
            "{}",
            up.name()
        );
        assert_eq!(seen.header("x-request-id"), Some("agg-1"), "{}", up.name());
        assert_eq!(seen.header("x-user-id"), Some("ann"), "{}", up.name());
        assert!(
            seen.header("authorization").unwrap().starts_with("Bearer "),
            "{}",
            up.name()
        );
    }
}

#[test]
fn parts_run_concurrently() {
    let s = setup();
    let t = Instant::now();
    let r = client()
        .get(s.gw.url("/profile/slow?page=1"))
        .bearer_auth(jwt::rs256_token("slow"))
        .send()
        .unwrap();
    let took = t.elapsed();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(v["user"], json!({"slow": true}));
    assert_eq!(v["orders"], json!(["late"]));
    assert_eq!(v["recs"], json!({"for": "slow"}));
    // Three 400 ms parts, one after another, would take 1.2 s.
    assert!(took < Duration::from_millis(1000), "{took:?}");
}

#[test]
fn failed_parts_are_null_or_a_502() {
    let s = setup();
    let c = client();
    let r = c.get(s.gw.url("/fragile/7")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aggregate-missing"], "gone");
    let v: Value = r.json().unwrap();
    assert_eq!(v["gone"], Value::Null);
    let r = c.get(s.gw.url("/fragile/text")).send().unwrap();
    assert_eq!(r.headers()["x-aggregate-missing"], "orders, gone");
    // A required part answering 500: 502, naming the part.
    let body = assert_problem(c.get(s.gw.url("/fragile/broken")).send().unwrap(), 502);
    assert!(
        body["detail"].as_str().unwrap().contains("\"user\""),
        "{body}"
    );
}

#[test]
fn the_whole_fan_out_is_bounded_by_its_timeout() {
    let s = setup();
    let c = client();
    let t = Instant::now();
    let r = c.get(s.gw.url("/fragile/never")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aggregate-missing"], "orders, gone");
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    // A required part too slow for the 300 ms timeout.
    let t = Instant::now();
    assert_problem(c.get(s.gw.url("/fragile/slow")).send().unwrap(), 502);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(1000),
        "{took:?}"
    );
}

#[test]
fn auth_limits_and_cache_apply() {
    let s = setup();
    let c = client();
    let r = c.get(s.gw.url("/profile/1")).send().unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["ratelimit-limit"], "100");
    assert_eq!(s.users.count() + s.orders.count() + s.recs.count(), 0);

    let first = c.get(s.gw.url("/cached/9")).send().unwrap();
    assert_eq!(first.headers()["x-cache"], "MISS");
    let first = first.text().unwrap();
    let second = c.get(s.gw.url("/cached/9")).send().unwrap();
    assert_eq!(second.headers()["x-cache"], "HIT");
    assert_eq!(second.text().unwrap(), first);
    assert_eq!(s.users.count(), 1);
}

#[test]
fn placeholder_values_cannot_walk_the_parts_upstream() {
    let s = setup();
    let r = client()
        .get(s.gw.url("/profile/42?page=..%2F..%2Fadmin%26role%3Dadmin"))
        .bearer_auth(jwt::rs256_token("ann"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // The value arrives as one encoded query value, not as a path.
    assert_eq!(
        s.orders.last().target,
        "/orders?user=42&page=..%2F..%2Fadmin%26role%3Dadmin"
    );
    // A dot segment as a value is the client's error, whichever part it
    // is for (issue 11: it used to fail the part).
    let before = s.orders.count();
    let r = client()
        .get(s.gw.url("/profile/42?page=.."))
        .bearer_auth(jwt::rs256_token("ann"))
        .send()
        .unwrap();
    assert_problem(r, 400);
    assert_eq!(s.orders.count(), before);
}

#[test]
fn credentialed_answers_of_an_unauthenticated_route_are_not_shared() {
    let s = setup();
    let c = client();
    let first = c
        .get(s.gw.url("/cached/5"))
        .header("Authorization", "Bearer someone")
        .send()
        .unwrap();
    assert_eq!(first.headers()["x-cache"], "MISS");
    let again = c.get(s.gw.url("/cached/5")).send().unwrap();
    assert_eq!(
        again.headers()["x-cache"],
        "MISS",
        "an answer fetched with credentials was shared"
    );
    assert_eq!(s.users.count(), 2);
}

#[test]
fn concurrent_misses_of_a_cached_aggregate_make_one_fan_out() {
    let s = setup();
    let url = s.gw.url("/cached/slow");
    let threads: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || client().get(url).send().unwrap().text().unwrap())
        })
        .collect();
    let bodies: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(bodies.iter().all(|b| b == &bodies[0]), "{bodies:?}");
    assert_eq!(s.users.count(), 1);
}
