//! Several instances on one real `redis-server` (SPEC section 8): one
//! shared rate-limit budget, cluster-wide `RateLimit-Remaining`, local
//! scope still per instance, Redis killed, stalled and restarted, purges
//! broadcast to every instance, reloads, and the config errors.

mod common;

use std::time::{Duration, Instant};

use common::redis::Redis;
use common::*;

/// The upstreams, cache and routes every instance of a test shares.
fn cluster_body(redis: &Redis, up: &TestUpstream, timeout: &str) -> String {
    format!(
        "cluster:
  redis: {url}
  timeout: {timeout}
cache:
  max_size: 4MiB
upstreams:
  app:
    targets: [{addr}]
routes:
  - name: shared
    match: {{ path_prefix: /shared }}
    upstream: app
    rate_limit: {{ requests: 10, per: 1m, scope: cluster }}
  - name: burst
    match: {{ path_prefix: /burst }}
    upstream: app
    rate_limit: {{ requests: 50, per: 1m, scope: cluster }}
  - name: busy
    match: {{ path_prefix: /busy }}
    upstream: app
    rate_limit: {{ requests: 500, per: 1m, scope: cluster }}
  - name: local
    match: {{ path_prefix: /local }}
    upstream: app
    rate_limit: {{ requests: 3, per: 1m }}
  - name: lenient
    match: {{ path_prefix: /lenient }}
    upstream: app
    rate_limit: {{ requests: 3, per: 1m, scope: cluster, on_store_error: allow }}
  - name: strict
    match: {{ path_prefix: /strict }}
    upstream: app
    rate_limit: {{ requests: 3, per: 1m, scope: cluster, on_store_error: deny }}
  - name: cached
    match: {{ path_prefix: /c }}
    upstream: app
    cache: {{ ttl: 60s }}
",
        url = redis.url(),
        addr = up.addr,
    )
}

fn instances(n: usize, body: &str) -> Vec<Gateway> {
    let gateways: Vec<Gateway> = (0..n).map(|_| gateway(body).start()).collect();
    for gw in &gateways {
        wait_store(gw, "up");
        eventually(Duration::from_secs(15), "subscribed to purges", || {
            admin_json(gw, "GET", "/readyz").1["cluster"]["hears_purges"] == true
        });
    }
    gateways
}

fn admin_json(gw: &Gateway, method: &str, path: &str) -> (u16, serde_json::Value) {
    let r = client()
        .request(
            method.parse().unwrap(),
            format!("http://{}{path}", gw.admin),
        )
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or_default())
}

/// Waits until `/readyz` reports the store in `state`.
fn wait_store(gw: &Gateway, state: &str) {
    eventually(
        Duration::from_secs(15),
        &format!("the cluster store is {state}"),
        || admin_json(gw, "GET", "/readyz").1["cluster"]["store"] == state,
    );
}

fn store_errors(gw: &Gateway) -> u64 {
    metrics_text(gw)
        .lines()
        .filter(|l| l.starts_with("gatehouse_cluster_store_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn get(gw: &Gateway, path: &str) -> reqwest::blocking::Response {
    client().get(gw.url(path)).send().unwrap()
}

fn remaining(r: &reqwest::blocking::Response) -> u64 {
    r.headers()["ratelimit-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn three_instances_share_one_budget_and_report_what_the_cluster_has_left() {
    let redis = Redis::start();
    let up = TestUpstream::named("app");
    let gws = instances(3, &cluster_body(&redis, &up, "1s"));
    // Round-robin over the instances, one client after another.
    let mut admitted = 0;
    for i in 0..30 {
        let r = get(&gws[i % 3], "/shared");
        match r.status().as_u16() {
            200 => {
                admitted += 1;
                assert_eq!(r.headers()["ratelimit-limit"], "10");
                // What the whole cluster has left, not this instance.
                assert_eq!(remaining(&r), 10 - admitted, "request {i}");
            }
            429 => {
                assert_eq!(remaining(&r), 0);
                let retry: u64 = r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=68).contains(&retry), "{retry}");
                let problem = assert_problem(r, 429);
                assert!(problem["detail"].as_str().unwrap().contains("10 requests"));
            }
            other => panic!("request {i}: {other}"),
        }
    }
    assert_eq!(admitted, 10, "three instances admitted the budget once");
    assert_eq!(
        up.requests()
            .iter()
            .filter(|r| r.target == "/shared")
            .count(),
        10
    );

    // Concurrent clients on every instance at once: still one budget.
    let ok = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..9 {
            let (gw, ok) = (&gws[t % 3], &ok);
            s.spawn(move || {
                let c = client();
                for _ in 0..20 {
                    let status = c.get(gw.url("/burst")).send().unwrap().status().as_u16();
                    assert!(status == 200 || status == 429, "{status}");
                    if status == 200 {
                        ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let ok = ok.into_inner();
    assert!(
        (50..=52).contains(&ok),
        "{ok} of 180 admitted for a budget of 50"
    );
    // The count above came from the store, not from a fallback.
    for gw in &gws {
        assert_eq!(store_errors(gw), 0);
    }
    // The store holds digests of keys, never the keys themselves.
    let keys = redis.command(&["KEYS", "*"]);
    assert!(keys.contains("gatehouse:rl:shared:60000000:"), "{keys}");
    assert!(!keys.contains("127.0.0.1"), "{keys}");
}

#[test]
fn a_busy_key_takes_leases_and_the_cluster_still_admits_at_most_its_budget() {
    let redis = Redis::start();
    let up = TestUpstream::named("app");
    let gws = instances(3, &cluster_body(&redis, &up, "1s"));
    let calls = || -> u64 {
        let stats = redis.command(&["INFO", "commandstats"]);
        stats
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    };
    let before = calls();
    let ok = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..6 {
            let (gw, ok) = (&gws[t % 3], &ok);
            s.spawn(move || {
                let c = client();
                for _ in 0..150 {
                    let status = c.get(gw.url("/busy")).send().unwrap().status().as_u16();
                    assert!(status == 200 || status == 429, "{status}");
                    if status == 200 {
                        ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let ok = ok.into_inner();
    // Never more than the budget plus 2%; at most a lease (2% of it) per
    // instance and client left unspent.
    assert!(ok <= 510, "{ok} of 900 admitted for a budget of 500");
    assert!(
        ok >= 500 - 6 * 10,
        "{ok} of 900 admitted for a budget of 500"
    );
    let spent = calls() - before;
    eprintln!("{ok} of 900 admitted for 500 with {spent} store calls");
    assert!(
        spent < ok / 2,
        "{spent} store calls for {ok} admissions and {} refusals: leases and remembered refusals should save calls",
        900 - ok
    );
    for gw in &gws {
        assert_eq!(store_errors(gw), 0);
    }
}

#[test]
fn a_local_limit_still_counts_per_instance() {
    let redis = Redis::start();
    let up = TestUpstream::named("app");
    let gws = instances(3, &cluster_body(&redis, &up, "1s"));
    let codes: Vec<u16> = (0..12)
        .map(|i| get(&gws[i % 3], "/local").status().as_u16())
        .collect();
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 9, "{codes:?}");
    assert_eq!(&codes[9..], &[429, 429, 429]);
}

#[test]
fn redis_down_falls_back_or_refuses_and_shared_counting_returns_with_it() {
    let mut redis = Redis::start();
    let up = TestUpstream::named("app");
    let gws = instances(2, &cluster_body(&redis, &up, "1s"));
    // One request counted in the store before it goes.
    assert_eq!(get(&gws[0], "/lenient").status(), 200);
    redis.kill();
    // allow: each instance counts alone, with the same budget (never
    // unlimited); deny: 503.
    for gw in &gws {
        let started = Instant::now();
        let codes: Vec<u16> = (0..5)
            .map(|_| get(gw, "/lenient").status().as_u16())
            .collect();
        assert_eq!(codes, [200, 200, 200, 429, 429]);
        let r = get(gw, "/strict");
        assert_eq!(r.headers()["retry-after"], "1");
        let problem = assert_problem(r, 503);
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("cluster store"),
            "{problem}"
        );
        // Nobody waited on a dead store: six requests in well under the
        // time six timeouts would take.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(store_errors(gw) >= 1);
        wait_store(gw, "down");
        // Past a second down, a deny route cannot be served: not ready.
        eventually(
            Duration::from_secs(5),
            "not ready while the store is down",
            || admin_json(gw, "GET", "/readyz").0 == 503,
        );
        let (_, ready) = admin_json(gw, "GET", "/readyz");
        assert!(
            ready["detail"].as_str().unwrap().contains("cluster store"),
            "{ready}"
        );
    }
    // Redis comes back (empty): shared counting again, across instances.
    redis.restart();
    for gw in &gws {
        wait_store(gw, "up");
        assert_eq!(admin_json(gw, "GET", "/readyz").0, 200);
    }
    let codes: Vec<u16> = (0..6)
        .map(|i| get(&gws[i % 2], "/strict").status().as_u16())
        .collect();
    assert_eq!(codes, [200, 200, 200, 429, 429, 429]);
    for gw in &gws {
        assert!(
            gw.log_text().contains("cluster store redis://127.0.0.1:"),
            "the outage is logged"
        );
    }
}

#[test]
fn a_stalled_redis_costs_a_request_no_more_than_the_timeout() {
    let redis = Redis::start();
    let up = TestUpstream::named("app");
    let gws = instances(1, &cluster_body(&redis, &up, "100ms"));
    let gw = &gws[0];
    assert_eq!(get(gw, "/lenient").status(), 200);
    let stall = redis.stall(4);
    let started = Instant::now();
    let r = get(gw, "/lenient");
    let first = started.elapsed();
    assert_eq!(r.status(), 200, "counted here while the store stalls");
    let r = get(gw, "/strict");
    assert_problem(r, 503);
    // The first request waited the timeout (100ms), the next none: far
    // less than the stall.
    assert!(first < Duration::from_millis(1500), "{first:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    stall.join().unwrap();
    wait_store(gw, "up");
    // Back to the store (a slow first answer on a busy machine may still
    // find it stalled: ask until it counts).
    eventually(
        Duration::from_secs(10),
        "the deny route served again",
        || get(gw, "/strict").status() == 200,
    );
}

fn x_cache(gw: &Gateway, path: &str) -> String {
    get(gw, path).headers()["x-cache"]
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_purge_on_one_instance_purges_every_instance() {
    let redis = Redis::start();
    let up = TestUpstream::named("app");
    let gws = instances(3, &cluster_body(&redis, &up, "1s"));
    for gw in &gws {
        for path in ["/c/a", "/c/b"] {
            assert_eq!(x_cache(gw, path), "MISS");
            assert_eq!(x_cache(gw, path), "HIT");
        }
    }
    // By prefix: only /c/a goes, on every instance.
    let (status, body) = admin_json(&gws[0], "DELETE", "/cache?prefix=/c/a");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["purged"], 1);
    assert_eq!(body["cluster"]["published"], true);
    assert_eq!(body["cluster"]["subscribers"], 3, "{body}");
    assert_eq!(x_cache(&gws[0], "/c/a"), "MISS");
    for gw in &gws[1..] {
        eventually(
            Duration::from_secs(1),
            "the purge reached another instance",
            || x_cache(gw, "/c/a") == "MISS",
        );
        assert_eq!(x_cache(gw, "/c/b"), "HIT");
    }
    // Everything, from another instance.
    let (status, body) = admin_json(&gws[2], "DELETE", "/cache");
    assert_eq!(status, 200, "{body}");
    for gw in &gws {
        eventually(Duration::from_secs(1), "everything purged", || {
            x_cache(gw, "/c/b") == "MISS"
        });
    }
}

#[test]
fn an_instance_cut_off_from_its_purges_drops_its_cache_on_return() {
    let mut redis = Redis::start();
    let up = TestUpstream::named("app");
    let gws = instances(2, &cluster_body(&redis, &up, "200ms"));
    for gw in &gws {
        assert_eq!(x_cache(gw, "/c/x"), "MISS");
        assert_eq!(x_cache(gw, "/c/x"), "HIT");
    }
    redis.kill();
    wait_store(&gws[0], "down");
    // A purge that cannot be published says so (and still purges here).
    let r = client()
        .delete(format!("http://{}/cache", gws[0].admin))
        .send()
        .unwrap();
    let problem = assert_problem(r, 503);
    assert_eq!(problem["purged"], 1, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("retry"));
    assert_eq!(x_cache(&gws[1], "/c/x"), "HIT", "still cut off");
    eventually(
        Duration::from_secs(5),
        "the subscription is seen lost",
        || admin_json(&gws[1], "GET", "/readyz").1["cluster"]["hears_purges"] == false,
    );
    redis.restart();
    // Back on the store, the other instance may have missed purges: it
    // serves nothing it held from before.
    eventually(
        Duration::from_secs(10),
        "the cache dropped on reconnect",
        || x_cache(&gws[1], "/c/x") == "MISS",
    );
}

#[test]
fn a_reload_keeps_an_unchanged_cluster_and_a_changed_prefix_counts_afresh() {
    let redis = Redis::start();
    let up = TestUpstream::named("app");
    let body = cluster_body(&redis, &up, "1s");
    let gws = instances(1, &body);
    let gw = &gws[0];
    assert_eq!(remaining(&get(gw, "/shared")), 9);
    let clients = || redis.command(&["CLIENT", "LIST"]).lines().count();
    let before = clients();
    let reload = || {
        let (status, body) = admin_json(gw, "POST", "/reload");
        assert_eq!(status, 200, "{body}");
    };
    reload();
    assert_eq!(remaining(&get(gw, "/shared")), 8);
    assert_eq!(clients(), before, "the same connections after a reload");
    // Another prefix is another cluster: its counts start afresh.
    let text = std::fs::read_to_string(&gw.conf).unwrap();
    let changed = text.replace(
        "  timeout: 1s\n",
        "  timeout: 1s\n  key_prefix: \"other:\"\n",
    );
    assert_ne!(text, changed);
    std::fs::write(&gw.conf, changed).unwrap();
    reload();
    wait_store(gw, "up");
    assert_eq!(remaining(&get(gw, "/shared")), 9);
    assert!(redis
        .command(&["KEYS", "other:rl:*"])
        .contains("other:rl:shared:"));
}

#[test]
fn cluster_mistakes_are_config_errors_with_their_path() {
    let base = "listen: [127.0.0.1:0]\nupstreams:\n  app: { targets: ['127.0.0.1:9'] }\n";
    let route = |limit: &str| {
        format!("routes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n    rate_limit: {limit}\n")
    };
    let cases = [
        (
            format!(
                "{base}{}",
                route("{ requests: 5, per: 1m, scope: cluster }")
            ),
            "routes[0].rate_limit.scope",
            "needs a cluster section",
        ),
        (
            format!(
                "{base}cluster: {{ redis: 'redis://127.0.0.1:6379' }}\n{}",
                route("{ requests: 5, per: 1m, scope: global }")
            ),
            "routes[0].rate_limit.scope",
            "use local or cluster",
        ),
        (
            format!(
                "{base}cluster: {{ redis: 'redis://127.0.0.1:6379' }}\n{}",
                route("{ requests: 5, per: 1m, on_store_error: deny }")
            ),
            "routes[0].rate_limit.on_store_error",
            "scope: cluster only",
        ),
        (
            format!(
                "{base}cluster: {{ redis: 'redis://127.0.0.1:6379' }}\n{}",
                route("{ requests: 5, per: 1m, scope: cluster, on_store_error: maybe }")
            ),
            "routes[0].rate_limit.on_store_error",
            "use allow or deny",
        ),
        (
            format!("{base}cluster: {{ redis: 'http://:hunter2@cache:6379' }}\n"),
            "cluster.redis",
            "redis:// or rediss://",
        ),
        (
            format!("{base}cluster: {{ redis: 'redis://127.0.0.1:6379', timeout: 0s }}\n"),
            "cluster.timeout",
            "above zero",
        ),
        (
            format!("{base}cluster: {{ redis: 'redis://127.0.0.1:6379', pool: 4 }}\n"),
            "cluster.pool",
            "unknown key",
        ),
    ];
    assert_config_errors(&cases, Some("hunter2"));
    // A URL from the environment; -t does not need Redis to be up.
    let yaml = format!(
        "{base}cluster: {{ redis: '${{REDIS_URL}}' }}\n{}",
        route("{ requests: 5, per: 1m, scope: cluster }")
    );
    let (code, out, err) = check_config(&yaml, &[("REDIS_URL", "redis://:s3cret@127.0.0.1:1/0")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!format!("{out}{err}").contains("s3cret"));
}

#[test]
fn a_rediss_store_is_shared_over_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::pki::Ca::new("redis CA");
    let (cert, key) = ca
        .issue(&["localhost"], "redis", None, None)
        .write(dir.path(), "redis");
    let ca_file = ca.write(dir.path(), "ca");
    let redis = Redis::start_tls(&cert, &key);
    let up = TestUpstream::named("app");
    let body = format!(
        "cluster:\n  redis: {}\n  key_prefix: \"tls:\"\n  timeout: 2s\nupstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: shared\n    match: {{ path_prefix: /shared }}\n    upstream: app\n    rate_limit: {{ requests: 4, per: 1m, scope: cluster, on_store_error: deny }}\n",
        redis.tls_url(),
        up.addr
    );
    // The gateways trust the test CA (OpenSSL reads SSL_CERT_FILE).
    let ca_path = ca_file.display().to_string();
    let gateways: Vec<Gateway> = (0..2)
        .map(|_| gateway(&body).env("SSL_CERT_FILE", &ca_path).start())
        .collect();
    for gw in &gateways {
        wait_store(gw, "up");
    }
    // One budget of 4 across both instances, over TLS only (the
    // gateways know no other port).
    let mut admitted = 0;
    for i in 0..8 {
        let r = client().get(gateways[i % 2].url("/shared")).send().unwrap();
        if r.status() == 200 {
            admitted += 1;
        } else {
            assert_problem(r, 429);
        }
    }
    assert_eq!(admitted, 4);
    let keys = redis.command(&["KEYS", "tls:*"]);
    assert!(keys.contains("tls:rl:shared:"), "{keys}");

    // A gateway that does not trust the CA never talks to the store: on
    // a deny route it refuses rather than counting alone.
    let untrusting = gateway(&body).start();
    eventually(Duration::from_secs(10), "a refused store call", || {
        client()
            .get(untrusting.url("/shared"))
            .send()
            .unwrap()
            .status()
            == 503
    });
    wait_store(&untrusting, "down");
    let (_, ready) = admin_json(&untrusting, "GET", "/readyz");
    assert!(ready["cluster"]["last_error"].is_string(), "{ready}");
}
