//! The response cache end to end: MISS, HIT and expiry; what separates
//! entries (query, Vary, Host, subject); what is never stored; one upstream
//! request for concurrent misses; purges; and the size bound.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// An upstream that numbers its answers, so a cached one is recognizable.
fn numbered(extra: fn(&Recorded, Reply) -> Reply) -> TestUpstream {
    let n = Arc::new(AtomicUsize::new(0));
    TestUpstream::with_handler("app", move |r| {
        let i = n.fetch_add(1, Ordering::SeqCst) + 1;
        extra(r, Reply::text(200, &format!("answer-{i}")))
    })
}

fn plain(_: &Recorded, r: Reply) -> Reply {
    r
}

fn cached(up: &TestUpstream, extra_routes: &str) -> Gateway {
    let body = [
        format!("upstreams:\n  app:\n    targets: [{}]\n", up.addr),
        common::jwt::rs256_provider("main"),
        "cache:\n  max_size: 4MiB\n".to_string(),
        "routes:\n".to_string(),
        "  - name: cached\n    match: { path_prefix: /c }\n    upstream: app\n".to_string(),
        "    cache: { ttl: 30s, vary: [Accept-Language] }\n".to_string(),
        "  - name: short\n    match: { path_prefix: /short }\n    upstream: app\n    cache: { ttl: 1s }\n".to_string(),
        "  - name: private\n    match: { path_prefix: /me }\n    upstream: app\n    auth: main\n    cache: { ttl: 30s }\n".to_string(),
        "  - name: uncached\n    match: { path_prefix: /u }\n    upstream: app\n".to_string(),
        extra_routes.to_string(),
    ]
    .concat();
    gateway(&body).start()
}

/// GET `path` with `headers`: (X-Cache, body).
fn fetch(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> (String, String) {
    let mut req = client().get(gw.url(path));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let r = req.send().unwrap();
    let x = r
        .headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (x, r.text().unwrap())
}

#[test]
fn miss_then_hit_then_expiry() {
    let up = numbered(plain);
    let gw = cached(&up, "");
    assert_eq!(fetch(&gw, "/c/a", &[]), ("MISS".into(), "answer-1".into()));
    assert_eq!(fetch(&gw, "/c/a", &[]), ("HIT".into(), "answer-1".into()));
    assert_eq!(
        fetch(&gw, "/c/./a", &[]),
        ("HIT".into(), "answer-1".into()),
        "the key uses the normalized path"
    );
    assert_eq!(up.count(), 1);
    assert_eq!(fetch(&gw, "/short/x", &[]).0, "MISS");
    assert_eq!(fetch(&gw, "/short/x", &[]).0, "HIT");
    std::thread::sleep(Duration::from_millis(1300));
    let (x, body) = fetch(&gw, "/short/x", &[]);
    assert_eq!(x, "MISS");
    assert_eq!(body, "answer-3");
    // A route without cache never says anything.
    assert_eq!(fetch(&gw, "/u/x", &[]).0, "");
}

#[test]
fn query_vary_and_host_separate_entries() {
    fn vary_tenant(_: &Recorded, r: Reply) -> Reply {
        r.header("vary", "X-Tenant")
    }
    let up = numbered(vary_tenant);
    let gw = cached(&up, "");
    let a = fetch(&gw, "/c/q?page=1", &[]).1;
    assert_ne!(fetch(&gw, "/c/q?page=2", &[]).1, a);
    assert_eq!(fetch(&gw, "/c/q?page=1", &[]).1, a);
    // The route's vary header.
    let en = fetch(&gw, "/c/lang", &[("Accept-Language", "en")]).1;
    let fr = fetch(&gw, "/c/lang", &[("Accept-Language", "fr")]).1;
    assert_ne!(en, fr);
    assert_eq!(
        fetch(&gw, "/c/lang", &[("Accept-Language", "en")]),
        ("HIT".into(), en)
    );
    // The upstream's Vary header.
    let t1 = fetch(&gw, "/c/tenant", &[("X-Tenant", "one")]).1;
    let t2 = fetch(&gw, "/c/tenant", &[("X-Tenant", "two")]).1;
    assert_ne!(t1, t2);
    assert_eq!(fetch(&gw, "/c/tenant", &[("X-Tenant", "one")]).1, t1);
    // Host.
    let h1 = fetch(&gw, "/c/host", &[("Host", "a.example.com")]).1;
    let h2 = fetch(&gw, "/c/host", &[("Host", "b.example.com")]).1;
    assert_ne!(h1, h2);
    assert_eq!(fetch(&gw, "/c/host", &[("Host", "A.example.com")]).1, h1);
}

#[test]
fn subjects_never_share_an_entry_and_anonymous_requests_never_see_one() {
    let up = numbered(plain);
    let gw = cached(&up, "");
    let alice = format!("Bearer {}", jwt::rs256_token("alice"));
    let bob = format!("Bearer {}", jwt::rs256_token("bob"));
    let a = fetch(&gw, "/me", &[("Authorization", &alice)]);
    assert_eq!(a.0, "MISS");
    assert_eq!(
        fetch(&gw, "/me", &[("Authorization", &alice)]),
        ("HIT".into(), a.1.clone())
    );
    let b = fetch(&gw, "/me", &[("Authorization", &bob)]);
    assert_eq!(b.0, "MISS");
    assert_ne!(b.1, a.1);
    let r = client().get(gw.url("/me")).send().unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-cache"], "BYPASS");
    assert!(!r.text().unwrap().contains("answer"));
}

#[test]
fn what_is_never_stored() {
    fn by_path(r: &Recorded, reply: Reply) -> Reply {
        match r.target.as_str() {
            "/c/no-store" => reply.header("cache-control", "no-store"),
            "/c/private" => reply.header("cache-control", "private, max-age=60"),
            "/c/cookie" => reply.header("set-cookie", "session=1"),
            "/c/error" => Reply {
                status: 500,
                ..reply
            },
            "/c/max-age" => reply.header("cache-control", "max-age=1"),
            "/c/public" => reply.header("cache-control", "public, max-age=60"),
            _ => reply,
        }
    }
    let up = numbered(by_path);
    let gw = cached(&up, "");
    for path in ["/c/no-store", "/c/private", "/c/cookie", "/c/error"] {
        let first = fetch(&gw, path, &[]);
        let second = fetch(&gw, path, &[]);
        // Looked up, but not storable: the cache was bypassed.
        assert_eq!(second.0, "BYPASS", "{path}");
        assert_ne!(first.1, second.1, "{path} was served from the cache");
    }
    // A shorter max-age wins over the route's 30 s.
    let first = fetch(&gw, "/c/max-age", &[]).1;
    assert_eq!(fetch(&gw, "/c/max-age", &[]).1, first);
    std::thread::sleep(Duration::from_millis(1300));
    assert_ne!(fetch(&gw, "/c/max-age", &[]).1, first);
    // POST is not cached.
    let r = client().post(gw.url("/c/a")).body("x").send().unwrap();
    assert_eq!(r.headers()["x-cache"], "BYPASS");
    let r = client().post(gw.url("/c/a")).body("x").send().unwrap();
    assert_eq!(r.headers()["x-cache"], "BYPASS");
    // With Authorization on a route the gateway does not authenticate,
    // only responses marked public are shared.
    let creds = [("Authorization", "Basic dTpw")];
    let first = fetch(&gw, "/c/plain-auth", &creds).1;
    assert_ne!(fetch(&gw, "/c/plain-auth", &creds).1, first);
    let first = fetch(&gw, "/c/public", &creds).1;
    assert_eq!(fetch(&gw, "/c/public", &creds).1, first);
}

#[test]
fn concurrent_misses_make_one_upstream_request() {
    fn slow(_: &Recorded, r: Reply) -> Reply {
        r.delayed(Duration::from_millis(400))
    }
    let up = numbered(slow);
    let gw = cached(&up, "");
    let url = gw.url("/c/stampede");
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || client().get(url).send().unwrap().text().unwrap())
        })
        .collect();
    let bodies: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(bodies.iter().all(|b| b == "answer-1"), "{bodies:?}");
    assert_eq!(up.count(), 1);
}

fn admin_delete(gw: &Gateway, target: &str) -> serde_json::Value {
    let (status, body) = admin(gw, "DELETE", target);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn purges_by_prefix_and_all() {
    let up = numbered(plain);
    let gw = cached(&up, "");
    for p in ["/c/users/1", "/c/users/2", "/c/usersx", "/c/orders/1"] {
        assert_eq!(fetch(&gw, p, &[]).0, "MISS");
        assert_eq!(fetch(&gw, p, &[]).0, "HIT");
    }
    assert_eq!(admin_delete(&gw, "/cache?prefix=/c/users")["purged"], 2);
    assert_eq!(fetch(&gw, "/c/users/1", &[]).0, "MISS");
    assert_eq!(fetch(&gw, "/c/usersx", &[]).0, "HIT");
    assert_eq!(fetch(&gw, "/c/orders/1", &[]).0, "HIT");
    assert_eq!(admin_delete(&gw, "/cache")["purged"], 3);
    assert_eq!(fetch(&gw, "/c/orders/1", &[]).0, "MISS");
    // The public listener knows nothing of purges.
    let r = client().delete(gw.url("/cache")).send().unwrap();
    assert_eq!(r.status(), 404);
}

#[test]
fn the_cache_stays_within_max_size() {
    fn big(_: &Recorded, r: Reply) -> Reply {
        Reply {
            body: vec![b'x'; 100 * 1024],
            ..r
        }
    }
    let up = numbered(big);
    let body = format!(
        "upstreams:\n  app:\n    targets: [{}]\ncache:\n  max_size: 1MiB\nroutes:\n  - name: c\n    match: {{ path_prefix: / }}\n    upstream: app\n    cache: {{ ttl: 1h }}\n",
        up.addr
    );
    let gw = gateway(&body).start();
    for i in 0..30 {
        assert_eq!(fetch(&gw, &format!("/big/{i}"), &[]).1.len(), 100 * 1024);
    }
    // Older entries were evicted: at most 1 MiB is held.
    let purged = admin_delete(&gw, "/cache")["purged"].as_u64().unwrap();
    assert!(
        (1..=10).contains(&purged),
        "{purged} entries of 100 KiB kept in 1 MiB"
    );
    assert_eq!(up.count(), 30);
}

#[test]
fn errors_of_a_cached_route_say_bypass() {
    let dead = free_port();
    let body = format!(
        "upstreams:\n  gone:\n    targets: [127.0.0.1:{dead}]\ncache:\n  max_size: 1MiB\nroutes:\n  - name: c\n    match: {{ path_prefix: / }}\n    upstream: gone\n    cache: {{ ttl: 1h }}\n"
    );
    let gw = gateway(&body).start();
    let r = client().get(gw.url("/x")).send().unwrap();
    assert_eq!(r.headers()["x-cache"], "BYPASS");
    assert_problem(r, 502);

    // An aggregate route's own failure is no miss either.
    let body = format!(
        "upstreams:\n  gone:\n    targets: [127.0.0.1:{dead}]\ncache:\n  max_size: 1MiB\nroutes:\n  - name: a\n    match: {{ path: \"/agg/{{id}}\" }}\n    cache: {{ ttl: 1h }}\n    aggregate:\n      parts:\n        - {{ key: user, upstream: gone, path: \"/users/{{id}}\" }}\n"
    );
    let gw = gateway(&body).start();
    let r = client().get(gw.url("/agg/7")).send().unwrap();
    assert_eq!(r.headers()["x-cache"], "BYPASS");
    assert_problem(r, 502);
}

#[test]
fn transformed_bodies_are_cached_transformed() {
    let up = TestUpstream::with_handler("app", |_| {
        Reply::typed(200, "application/json", r#"{"id":1,"password":"x"}"#)
    });
    let body = format!(
        "upstreams:\n  app:\n    targets: [{}]\ncache:\n  max_size: 1MiB\nroutes:\n  - name: c\n    match: {{ path_prefix: / }}\n    upstream: app\n    cache: {{ ttl: 1h }}\n    response_body: {{ remove_fields: [password] }}\n",
        up.addr
    );
    let gw = gateway(&body).start();
    for expected in ["MISS", "HIT", "HIT"] {
        let r = client().get(gw.url("/doc")).send().unwrap();
        assert_eq!(r.headers()["x-cache"], expected);
        let declared = r
            .headers()
            .get("content-length")
            .map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
        let text = r.text().unwrap();
        assert_eq!(text, r#"{"id":1}"#);
        if let Some(n) = declared {
            assert_eq!(n, text.len());
        }
    }
    // HEAD is answered from the cache too (its own entry).
    let r = client().head(gw.url("/doc")).send().unwrap();
    assert_eq!(r.status(), 200);
    let r = client().head(gw.url("/doc")).send().unwrap();
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(up.count(), 2);
}

#[test]
fn routes_never_share_entries() {
    let up = numbered(plain);
    let body = format!(
        "upstreams:\n  app:\n    targets: [{}]\ncache:\n  max_size: 1MiB\nroutes:\n  - name: beta\n    match: {{ path_prefix: /, headers: {{ X-Beta: \"1\" }} }}\n    upstream: app\n    cache: {{ ttl: 1h }}\n  - name: main\n    match: {{ path_prefix: / }}\n    upstream: app\n    cache: {{ ttl: 1h }}\n",
        up.addr
    );
    let gw = gateway(&body).start();
    let beta = fetch(&gw, "/doc", &[("X-Beta", "1")]);
    let main = fetch(&gw, "/doc", &[]);
    assert_eq!((beta.0.as_str(), main.0.as_str()), ("MISS", "MISS"));
    assert_ne!(beta.1, main.1);
    assert_eq!(fetch(&gw, "/doc", &[("X-Beta", "1")]).1, beta.1);
    assert_eq!(fetch(&gw, "/doc", &[]).1, main.1);
}
