//! CORS and the IP filter end to end (SPEC sections 6.1 and 6.2): preflights
//! answered by the gateway (allowed and refused by origin, method, header,
//! wildcard labels, scheme and port), the fields on actual requests and on
//! the gateway's own errors, the upstream's own fields removed, top-level
//! defaults and `off`; the fields on routing's own refusals (405, and 404
//! by `match.claims`); IP allow and deny with and without trusted proxies.

mod common;

use common::*;

fn body(up: &TestUpstream) -> String {
    format!(
        "cors:
  allow_origins: [https://app.example.com, \"https://*.example.org\", \"http://localhost:3000\"]
  allow_headers: [Authorization, Content-Type]
  expose_headers: [X-Request-Id]
  allow_credentials: true
  max_age: 10m
upstreams:
  app:
    targets: [{addr}]
{provider}routes:
  - name: api
    match: {{ path_prefix: /api, methods: [GET, POST] }}
    upstream: app
    auth: main
    rate_limit: {{ requests: 2, per: 1m, key: header:x-client }}
  - name: open
    match: {{ path_prefix: /open }}
    upstream: app
    cors: {{ allow_origins: [\"*\"] }}
  - name: nocors
    match: {{ path_prefix: /nocors }}
    upstream: app
    cors: off
",
        addr = up.addr,
        provider = common::jwt::rs256_provider("main"),
    )
}

fn upstream() -> TestUpstream {
    // The upstream sends CORS fields of its own, which must not pass.
    TestUpstream::with_handler("app", |_| {
        Reply::text(200, "ok")
            .header("Access-Control-Allow-Origin", "*")
            .header("Access-Control-Allow-Methods", "DELETE")
            .header("Vary", "Accept-Encoding")
    })
}

fn preflight(
    gw: &Gateway,
    path: &str,
    origin: &str,
    method: &str,
    headers: Option<&str>,
) -> reqwest::blocking::Response {
    let mut req = client()
        .request(reqwest::Method::OPTIONS, gw.url(path))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", method);
    if let Some(h) = headers {
        req = req.header("Access-Control-Request-Headers", h);
    }
    req.send().unwrap()
}

fn cors_fields(r: &reqwest::blocking::Response) -> Vec<String> {
    r.headers()
        .keys()
        .filter(|k| k.as_str().starts_with("access-control-"))
        .map(|k| k.to_string())
        .collect()
}

fn varies_by_origin(r: &reqwest::blocking::Response) -> bool {
    r.headers()
        .get_all("vary")
        .iter()
        .any(|v| v.to_str().unwrap().to_ascii_lowercase().contains("origin"))
}

#[test]
fn preflights_are_answered_by_the_gateway_and_refused_by_origin_method_or_header() {
    let up = upstream();
    let gw = gateway(&body(&up)).start();
    // Allowed: no token needed, never reaches the upstream, even though the
    // route's methods do not list OPTIONS.
    let r = preflight(
        &gw,
        "/api/users",
        "https://app.example.com",
        "POST",
        Some("authorization, content-type"),
    );
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-methods"], "GET, POST, HEAD");
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert!(varies_by_origin(&r));
    assert!(h.get("content-length").is_none());
    // Wildcard labels: one or more.
    for origin in [
        "https://a.example.org",
        "https://a.b.example.org",
        "http://localhost:3000",
    ] {
        let r = preflight(&gw, "/api/x", origin, "GET", None);
        assert_eq!(r.status(), 204, "{origin}");
        assert_eq!(r.headers()["access-control-allow-origin"], origin);
    }
    assert_eq!(up.count(), 0, "no preflight reached the upstream");
    // Refused: 403 problem+json without any Access-Control-* field.
    let refused = [
        ("https://evil.example.com", "GET", None),
        ("http://app.example.com", "GET", None), // scheme
        ("https://app.example.com:8443", "GET", None), // port
        ("https://example.org", "GET", None),    // no label for `*`
        ("https://a.example.org.evil.io", "GET", None),
        ("http://localhost:3001", "GET", None),
        ("null", "GET", None),
        ("https://app.example.com", "DELETE", None), // method
        ("https://app.example.com", "GET", Some("x-secret")), // header
    ];
    for (origin, method, headers) in refused {
        let r = preflight(&gw, "/api/x", origin, method, headers);
        assert!(
            cors_fields(&r).is_empty(),
            "{origin} {method}: {:?}",
            cors_fields(&r)
        );
        let problem = assert_problem(r, 403);
        assert!(
            problem["detail"].as_str().unwrap().contains("CORS"),
            "{problem}"
        );
    }
    assert_eq!(up.count(), 0);
    let metrics = metrics_text(&gw);
    assert!(
        metrics.contains("gatehouse_cors_refused_total{route=\"api\"} 9"),
        "{metrics}"
    );
    // `*` admits any origin but null, and never with credentials.
    let r = preflight(&gw, "/open", "https://anything.test", "PUT", None);
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://anything.test"
    );
    assert_eq!(r.headers()["access-control-allow-methods"], "PUT");
    assert!(r
        .headers()
        .get("access-control-allow-credentials")
        .is_none());
    assert_eq!(preflight(&gw, "/open", "null", "GET", None).status(), 403);
    // `cors: off`: an OPTIONS like any other request, to the upstream.
    let r = preflight(&gw, "/nocors", "https://app.example.com", "GET", None);
    assert_eq!(r.status(), 200);
    assert_eq!(up.count(), 1);
}

#[test]
fn actual_requests_carry_the_fields_on_every_response_the_gateway_errors_included() {
    let up = upstream();
    let gw = gateway(&body(&up)).start();
    let token = common::jwt::rs256_token("alice");
    let get = |path: &str, origin: Option<&str>, auth: bool| {
        let mut req = client().get(gw.url(path)).header("x-client", "c1");
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        if auth {
            req = req.header("Authorization", format!("Bearer {token}"));
        }
        req.send().unwrap()
    };
    let r = get("/api/x", Some("https://a.example.org"), true);
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://a.example.org");
    assert_eq!(h["access-control-expose-headers"], "x-request-id");
    assert_eq!(h["access-control-allow-credentials"], "true");
    // The upstream's own fields are gone; its Vary stays, with Origin.
    assert!(h.get("access-control-allow-methods").is_none());
    assert_eq!(h.get_all("access-control-allow-origin").iter().count(), 1);
    assert!(h.get_all("vary").iter().any(|v| v == "Accept-Encoding"));
    assert!(varies_by_origin(&r));
    // The gateway's own errors: 401 without a token (it spends the second
    // of the client's two requests), then 429.
    let r = get("/api/x", Some("https://app.example.com"), false);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_problem(r, 401);
    let r = get("/api/x", Some("https://app.example.com"), true);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers()["access-control-expose-headers"], "x-request-id");
    assert_problem(r, 429);
    // Another origin, or none: no field at all, but Vary: Origin.
    for origin in [Some("https://evil.test"), None] {
        let r = get("/open", origin, false);
        let expect_allowed = origin.is_some();
        assert_eq!(r.status(), 200);
        assert!(varies_by_origin(&r));
        if expect_allowed {
            assert_eq!(
                r.headers()["access-control-allow-origin"],
                "https://evil.test"
            );
        } else {
            assert!(cors_fields(&r).is_empty(), "{:?}", cors_fields(&r));
        }
    }
    let r = client()
        .get(gw.url("/api/x"))
        .header("Origin", "https://evil.test")
        .header("Authorization", format!("Bearer {token}"))
        .header("x-client", "c2")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(cors_fields(&r).is_empty(), "{:?}", cors_fields(&r));
    assert!(varies_by_origin(&r));
    // Without cors the upstream's fields pass untouched.
    let r = get("/nocors", Some("https://app.example.com"), false);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
}

#[test]
fn routing_refusals_carry_the_cors_fields_of_the_route_the_path_led_to() {
    let up = TestUpstream::named("app");
    let body = format!(
        "upstreams:
  app:
    targets: [{addr}]
{provider}routes:
  - name: reads
    match: {{ path_prefix: /multi, methods: [GET] }}
    upstream: app
    cors: {{ allow_origins: [https://a.example.com], expose_headers: [X-Request-Id], allow_credentials: true }}
  - name: writes
    match: {{ path_prefix: /multi, methods: [POST] }}
    upstream: app
    cors: {{ allow_origins: [https://b.example.com] }}
  - name: elsewhere
    match: {{ path_prefix: /multi, host: elsewhere.test, methods: [PATCH] }}
    upstream: app
    cors: {{ allow_origins: [https://c.example.com] }}
  - name: premium
    match: {{ path_prefix: /premium, claims: {{ tier: premium }} }}
    upstream: app
    auth: main
    cors: {{ allow_origins: [https://a.example.com] }}
  - name: plain
    match: {{ path_prefix: /plain, methods: [GET] }}
    upstream: app
",
        addr = up.addr,
        provider = common::jwt::rs256_provider("main"),
    );
    let gw = gateway(&body).start();
    let put = |path: &str, origin: Option<&str>| {
        let mut req = client().put(gw.url(path));
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        req.send().unwrap()
    };
    // The path matched, the method did not: the 405 follows the first route
    // tried for the path (`reads`: file order breaks the tie), so the page
    // can read it.
    let r = put("/multi/x", Some("https://a.example.com"));
    let h = r.headers();
    assert_eq!(h["allow"], "GET, HEAD, POST");
    assert_eq!(h["access-control-allow-origin"], "https://a.example.com");
    assert_eq!(h["access-control-expose-headers"], "x-request-id");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert!(varies_by_origin(&r));
    assert_problem(r, 405);
    // An origin only a later route (`writes`) or a route for another host
    // (`elsewhere`) admits, or none at all: no field, but Vary: Origin.
    for origin in ["https://b.example.com", "https://c.example.com"] {
        let r = put("/multi/x", Some(origin));
        assert!(
            cors_fields(&r).is_empty(),
            "{origin}: {:?}",
            cors_fields(&r)
        );
        assert!(varies_by_origin(&r), "{origin}");
        assert_problem(r, 405);
    }
    // Without an Origin nothing is added (the answer is no-store).
    let r = put("/multi/x", None);
    assert!(cors_fields(&r).is_empty() && !varies_by_origin(&r));
    assert_problem(r, 405);
    // A route without cors adds nothing.
    let r = put("/plain", Some("https://a.example.com"));
    assert!(cors_fields(&r).is_empty() && !varies_by_origin(&r));
    assert_problem(r, 405);
    // A 404 because the token lacks the route's claims: the route's fields.
    let token = common::jwt::rs256_token("alice");
    let r = client()
        .get(gw.url("/premium"))
        .header("Origin", "https://a.example.com")
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://a.example.com"
    );
    assert!(varies_by_origin(&r));
    assert_problem(r, 404);
    // A preflight for that path (no credentials, so no claims hold) is
    // refused, and a refused preflight carries no CORS field.
    let r = preflight(&gw, "/premium", "https://a.example.com", "GET", None);
    assert!(!r.status().is_success(), "{}", r.status());
    assert!(cors_fields(&r).is_empty(), "{:?}", cors_fields(&r));
    // No route for the path at all: nothing to follow.
    let r = client()
        .get(gw.url("/nowhere"))
        .header("Origin", "https://a.example.com")
        .send()
        .unwrap();
    assert!(cors_fields(&r).is_empty() && !varies_by_origin(&r));
    assert_problem(r, 404);
    assert_eq!(up.count(), 0);

    // `allow_methods` defaults to the route's methods: HEAD only where the
    // route serves it (a GET route does, as routing answers HEAD for GET).
    let r = preflight(&gw, "/multi", "https://b.example.com", "POST", None);
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["access-control-allow-methods"], "POST");
    let r = preflight(&gw, "/multi", "https://a.example.com", "HEAD", None);
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["access-control-allow-methods"], "GET, HEAD");
    assert_eq!(
        client().head(gw.url("/multi")).send().unwrap().status(),
        200
    );
}

#[test]
fn the_ip_filter_allows_denies_and_cannot_be_fooled_by_forwarded_headers() {
    let up = TestUpstream::named("app");
    let body = format!(
        "ip_filter: {{ allow: [127.0.0.0/8], deny: [127.0.0.2] }}
upstreams:
  app:
    targets: [{}]
routes:
  - name: default
    match: {{ path_prefix: /d }}
    upstream: app
  - name: office
    match: {{ path_prefix: /office }}
    upstream: app
    ip_filter: {{ allow: [\"10.1.0.0/16\", \"127.0.0.3\"] }}
  - name: public
    match: {{ path_prefix: /public }}
    upstream: app
    ip_filter: off
",
        up.addr
    );
    let gw = gateway(&body).start();
    let status = |ip: &str, path: &str, xff: Option<&str>| {
        let mut req = client_from(ip).get(gw.url(path));
        if let Some(x) = xff {
            req = req.header("X-Forwarded-For", x);
        }
        req.send().unwrap().status().as_u16()
    };
    // The default: deny wins over allow.
    assert_eq!(status("127.0.0.1", "/d", None), 200);
    assert_eq!(status("127.0.0.2", "/d", None), 403);
    // A route's own filter replaces the default whole.
    assert_eq!(status("127.0.0.3", "/office", None), 200);
    assert_eq!(status("127.0.0.1", "/office", None), 403);
    // A spoofed X-Forwarded-For from an untrusted peer changes nothing.
    assert_eq!(status("127.0.0.1", "/office", Some("10.1.2.3")), 403);
    assert_eq!(status("127.0.0.2", "/d", Some("127.0.0.1")), 403);
    // off: everyone.
    assert_eq!(status("127.0.0.2", "/public", None), 200);
    let r = client_from("127.0.0.2").get(gw.url("/d")).send().unwrap();
    let problem = assert_problem(r, 403);
    assert!(!problem.to_string().contains("127.0.0.2"), "{problem}");
    let metrics = metrics_text(&gw);
    assert!(
        metrics.contains("gatehouse_ip_filtered_total{route=\"default\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gatehouse_ip_filtered_total{route=\"office\"} 2"),
        "{metrics}"
    );

    // Behind a trusted proxy, the client is the address it forwards.
    let gw = gateway(&body)
        .server("trusted_proxies: [127.0.0.1/32]")
        .start();
    let status = |ip: &str, path: &str, xff: Option<&str>| {
        let mut req = client_from(ip).get(gw.url(path));
        if let Some(x) = xff {
            req = req.header("X-Forwarded-For", x);
        }
        req.send().unwrap().status().as_u16()
    };
    assert_eq!(status("127.0.0.1", "/office", Some("10.1.2.3")), 200);
    assert_eq!(status("127.0.0.1", "/office", Some("10.2.0.1")), 403);
    // The rightmost untrusted address counts: prepending one does not help.
    assert_eq!(
        status("127.0.0.1", "/office", Some("10.1.2.3, 10.2.0.1")),
        403
    );
    // A peer that is not trusted is judged by its own address.
    assert_eq!(status("127.0.0.3", "/office", Some("10.9.9.9")), 200);
    assert_eq!(status("127.0.0.2", "/d", Some("127.0.0.1")), 403);
}

#[test]
fn edge_policy_mistakes_are_config_errors_with_their_path() {
    let base = "listen: [127.0.0.1:0]\nupstreams:\n  app: { targets: ['127.0.0.1:9'] }\n";
    let route = |extra: &str| {
        format!("routes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n{extra}")
    };
    let cases = [
        (format!("{base}cors: {{ allow_origins: ['*'], allow_credentials: true }}\n"), "cors.allow_credentials", "cannot go with"),
        (format!("{base}{}", route("    cors: { allow_origins: ['https://*example.com'] }\n")), "routes[0].cors.allow_origins[0]", "leftmost labels"),
        (format!("{base}{}", route("    cors: { allow_origins: ['https://a.com/path'] }\n")), "routes[0].cors.allow_origins[0]", "no path"),
        (format!("{base}{}", route("    cors: { allow_origins: ['https://a.com'], allow_methods: [G T] }\n")), "routes[0].cors.allow_methods", "not an HTTP method"),
        (format!("{base}{}", route("    cors: { allow_origins: ['https://a.com'], allow_headers: ['bad header'] }\n")), "routes[0].cors.allow_headers[0]", "not a valid header name"),
        (format!("{base}{}", route("    cors: { allow_origins: [] }\n")), "routes[0].cors.allow_origins", "at least one"),
        (format!("{base}{}", route("    cors: maybe\n")), "routes[0].cors", "mapping or off"),
        (format!("{base}{}", route("    ip_filter: { allow: [10.0.0.0/33] }\n")), "routes[0].ip_filter.allow[0]", "not an IP address or CIDR"),
        (format!("{base}ip_filter: {{ deny: [10.0.0.1/8] }}\n"), "ip_filter.deny[0]", "host bits"),
        (format!("{base}ip_filter: {{ }}\n"), "ip_filter", "needs allow or deny"),
        (format!("{base}ip_filter: {{ allow: [10.0.0.0/8], block: [] }}\n"), "ip_filter.block", "unknown key"),
    ];
    assert_config_errors(&cases, None);
    // And the line and column of the mistake, in a block list.
    let yaml = format!(
        "{base}{}",
        route("    ip_filter:\n      allow:\n        - 10.0.0.0/8\n        - 10.0.0.0/33\n")
    );
    let (code, out, err) = check_config(&yaml, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("routes[0].ip_filter.allow[1] (line 11, column 11): \"10.0.0.0/33\" is not an IP address or CIDR"),
        "{err}"
    );
}

#[test]
fn the_gateways_413_and_502_carry_the_cors_fields() {
    let up = TestUpstream::named("app");
    let body = format!(
        "cors: {{ allow_origins: [https://app.example.com], expose_headers: [X-Request-Id] }}
upstreams:
  app:
    targets: [{}]
  dead:
    targets: [127.0.0.1:{}]
routes:
  - name: upload
    match: {{ path_prefix: /upload }}
    upstream: app
    max_body: 1KiB
  - name: gone
    match: {{ path_prefix: /gone }}
    upstream: dead
",
        up.addr,
        free_port()
    );
    let gw = gateway(&body).start();
    let origin = "https://app.example.com";
    let allowed = |r: &reqwest::blocking::Response, what: &str| {
        let h = r.headers();
        assert_eq!(
            h.get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap()),
            Some(origin),
            "{what}"
        );
        assert_eq!(h["access-control-expose-headers"], "x-request-id", "{what}");
        assert!(varies_by_origin(r), "{what}");
    };
    // A declared length over max_body, refused before the upstream.
    let r = client()
        .post(gw.url("/upload"))
        .header("Origin", origin)
        .body(vec![b'x'; 2000])
        .send()
        .unwrap();
    allowed(&r, "413");
    assert_problem(r, 413);
    assert_eq!(up.count(), 0);
    // Within it, the upstream answers, with the fields too.
    let r = client()
        .post(gw.url("/upload"))
        .header("Origin", origin)
        .body(vec![b'x'; 1000])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    allowed(&r, "200");
    // An upstream that refuses connections.
    let r = client()
        .get(gw.url("/gone"))
        .header("Origin", origin)
        .send()
        .unwrap();
    allowed(&r, "502");
    assert_problem(r, 502);
    // Another origin learns nothing from either.
    for r in [
        client()
            .post(gw.url("/upload"))
            .header("Origin", "https://evil.test")
            .body(vec![b'x'; 2000])
            .send()
            .unwrap(),
        client()
            .get(gw.url("/gone"))
            .header("Origin", "https://evil.test")
            .send()
            .unwrap(),
    ] {
        assert!(cors_fields(&r).is_empty(), "{:?}", cors_fields(&r));
        assert!(varies_by_origin(&r));
    }
}

#[test]
fn a_refused_address_gets_403_before_authentication_and_max_body() {
    let up = TestUpstream::named("app");
    let body = format!(
        "upstreams:
  app:
    targets: [{addr}]
{provider}routes:
  - name: guarded
    match: {{ path_prefix: /guarded }}
    upstream: app
    auth: main
    max_body: 1KiB
    ip_filter: {{ deny: [127.0.0.2] }}
    cors: {{ allow_origins: [https://app.example.com] }}
",
        addr = up.addr,
        provider = common::jwt::rs256_provider("main"),
    );
    let gw = gateway(&body).start();
    let token = common::jwt::rs256_token("alice");
    let post = |ip: &str, size: usize, token: Option<&str>| {
        let mut req = client_from(ip)
            .post(gw.url("/guarded"))
            .header("Origin", "https://app.example.com")
            .body(vec![b'x'; size]);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        req.send().unwrap()
    };
    // Whatever else is wrong with the request, the address is refused
    // first, and the page can read why.
    for (size, token) in [(2000, None), (10, None), (2000, Some(token.as_str()))] {
        let r = post("127.0.0.2", size, token);
        assert_eq!(
            r.headers()["access-control-allow-origin"],
            "https://app.example.com"
        );
        assert!(r.headers().get("www-authenticate").is_none());
        assert_problem(r, 403);
    }
    assert!(
        metrics_text(&gw).contains("gatehouse_ip_filtered_total{route=\"guarded\"} 3"),
        "{}",
        metrics_text(&gw)
    );
    // Another address meets the other refusals.
    assert_problem(post("127.0.0.1", 10, None), 401);
    assert_problem(post("127.0.0.1", 2000, Some(&token)), 413);
    assert_eq!(post("127.0.0.1", 10, Some(&token)).status(), 200);
    assert_eq!(up.count(), 1);
}
