//! Route selection end to end: every match rule, the specificity order,
//! API versions, 404/405, rewrites and path normalization, checked by what
//! the client gets and what the upstream receives.

mod common;

use common::*;

/// One upstream that answers with the `X-Route` header the matched route set.
fn setup() -> (TestUpstream, Gateway) {
    let up = TestUpstream::with_handler("app", |r| {
        Reply::text(200, r.header("x-route").unwrap_or("none"))
    });
    let routes = [
        ("prefix-short", "{ path_prefix: /v1 }", ""),
        ("prefix-long", "{ path_prefix: /v1/users }", ""),
        ("exact-param", "{ path: \"/v1/users/{id}\" }", ""),
        ("exact-literal", "{ path: /v1/users/me }", ""),
        ("regex", "{ path_regex: \"^/v1/users/[0-9]+/orders$\" }", ""),
        (
            "prefix-long-conditions",
            "{ path_prefix: /v1/users, methods: [GET], headers: { X-Beta: \"1\" } }",
            "",
        ),
        ("tie-first", "{ path_prefix: /tie }", ""),
        ("tie-second", "{ path_prefix: /tie }", ""),
        ("writes-only", "{ path: /submit, methods: [POST, put] }", ""),
        ("deletes-only", "{ path: /submit, methods: [DELETE] }", ""),
        ("host-exact", "{ path_prefix: /h, host: api.example.com }", ""),
        ("host-wildcard", "{ path_prefix: /h, host: \"*.example.com\" }", ""),
        ("host-any", "{ path_prefix: /h }", ""),
        ("api-v1", "{ path_prefix: /api/v1 }", "    strip_prefix: /api/v1\n"),
        ("api-v2", "{ path_prefix: /api/v2 }", "    strip_prefix: /api/v2\n    add_prefix: /v2\n"),
        ("items-v2", "{ path_prefix: /items, headers: { Api-Version: \"2\" } }", ""),
        (
            "items-v1",
            "{ path_prefix: /items, headers: { Api-Version: \"1\" } }",
            "    deprecation: { sunset: \"2027-06-30\", link: \"https://docs.example.com/migrate\" }\n",
        ),
        ("items-default", "{ path_prefix: /items }", ""),
    ];
    let mut body = format!("upstreams:\n  app:\n    targets: [{}]\nroutes:\n", up.addr);
    for (name, m, extra) in routes {
        body.push_str(&format!(
            "  - name: {name}\n    match: {m}\n    upstream: app\n    request_headers: {{ set: {{ X-Route: {name} }} }}\n{extra}"
        ));
    }
    let gw = gateway(&body).start();
    (up, gw)
}

fn route_of(gw: &Gateway, method: &str, target: &str, headers: &[(&str, &str)]) -> String {
    let r = send_raw(gw.addr, method, target, headers);
    assert_eq!(r.status, 200, "{method} {target}: {r:?}");
    r.body
}

#[test]
fn specificity_order_and_conditions() {
    let (up, gw) = setup();
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("GET", "/v1/users/me", &[], "exact-literal"),
        ("GET", "/v1/users/42", &[], "exact-param"),
        ("GET", "/v1/users/42/orders", &[], "regex"),
        ("GET", "/v1/users/42/x", &[], "prefix-long"),
        ("GET", "/v1/users", &[], "prefix-long"),
        (
            "GET",
            "/v1/users/42/x",
            &[("X-Beta", "1")],
            "prefix-long-conditions",
        ),
        ("POST", "/v1/users/42/x", &[("X-Beta", "1")], "prefix-long"),
        ("GET", "/v1/usersx", &[], "prefix-short"),
        ("GET", "/v1", &[], "prefix-short"),
        ("GET", "/tie/a", &[], "tie-first"),
        ("POST", "/submit", &[], "writes-only"),
        ("PUT", "/submit", &[], "writes-only"),
        ("DELETE", "/submit", &[], "deletes-only"),
        ("GET", "/h/x", &[("Host", "api.example.com")], "host-exact"),
        (
            "GET",
            "/h/x",
            &[("Host", "API.Example.com:8080")],
            "host-exact",
        ),
        ("GET", "/h/x", &[("Host", "a.example.com")], "host-wildcard"),
        (
            "GET",
            "/h/x",
            &[("Host", "a.b.example.com")],
            "host-wildcard",
        ),
        ("GET", "/h/x", &[("Host", "example.com")], "host-any"),
        ("GET", "/h/x", &[("Host", "other.org")], "host-any"),
    ];
    for (method, target, headers, expected) in cases {
        assert_eq!(
            route_of(&gw, method, target, headers),
            *expected,
            "{method} {target} {headers:?}"
        );
    }
    assert_eq!(up.count(), cases.len());
}

#[test]
fn not_found_and_method_not_allowed() {
    let (up, gw) = setup();
    let c = client();
    let body = assert_problem(c.get(gw.url("/v1x")).send().unwrap(), 404);
    assert!(body["detail"].as_str().unwrap().contains("no route"));
    assert_problem(c.get(gw.url("/nothing/here")).send().unwrap(), 404);
    let resp = c.get(gw.url("/submit")).send().unwrap();
    assert_eq!(resp.headers()["allow"], "DELETE, POST, PUT");
    assert_problem(resp, 405);
    assert_eq!(
        up.count(),
        0,
        "refused requests must not reach the upstream"
    );
}

#[test]
fn api_versions_by_path_and_by_header() {
    let (up, gw) = setup();
    let c = client();
    assert_eq!(
        c.get(gw.url("/api/v1/things?a=1"))
            .send()
            .unwrap()
            .text()
            .unwrap(),
        "api-v1"
    );
    assert_eq!(up.last().target, "/things?a=1");
    assert_eq!(
        c.get(gw.url("/api/v2/things"))
            .send()
            .unwrap()
            .text()
            .unwrap(),
        "api-v2"
    );
    assert_eq!(up.last().target, "/v2/things");
    assert_eq!(
        c.get(gw.url("/api/v1")).send().unwrap().text().unwrap(),
        "api-v1"
    );
    assert_eq!(up.last().target, "/");

    let v2 = c
        .get(gw.url("/items/1"))
        .header("Api-Version", "2")
        .send()
        .unwrap();
    assert!(v2.headers().get("deprecation").is_none());
    assert_eq!(v2.text().unwrap(), "items-v2");
    // Header names match in any case.
    let v1 = c
        .get(gw.url("/items/1"))
        .header("api-version", "1")
        .send()
        .unwrap();
    assert_eq!(v1.headers()["deprecation"], "true");
    assert_eq!(v1.headers()["sunset"], "Wed, 30 Jun 2027 00:00:00 GMT");
    assert_eq!(
        v1.headers()["link"],
        "<https://docs.example.com/migrate>; rel=\"deprecation\""
    );
    assert_eq!(v1.text().unwrap(), "items-v1");
    let default = c.get(gw.url("/items/1")).send().unwrap();
    assert_eq!(default.text().unwrap(), "items-default");
    let unknown = c
        .get(gw.url("/items/1"))
        .header("Api-Version", "9")
        .send()
        .unwrap();
    assert_eq!(unknown.text().unwrap(), "items-default");
}

#[test]
fn paths_are_normalized_before_matching_and_forwarded_normalized() {
    let (up, gw) = setup();
    for target in [
        "/v1/users/./me",
        "/v1/users/x/../me",
        "/v1//users///me",
        "/v1/%75sers/%6De",
        "/v1/users/%2e/me",
        "/v1/users/x/%2E%2E/me",
    ] {
        assert_eq!(
            route_of(&gw, "GET", target, &[]),
            "exact-literal",
            "{target}"
        );
        assert_eq!(up.last().target, "/v1/users/me", "{target}");
    }
    // The query passes untouched.
    assert_eq!(
        route_of(&gw, "GET", "/v1/other/./x?a=1&b=%2F", &[]),
        "prefix-short"
    );
    assert_eq!(up.last().target, "/v1/other/x?a=1&b=%2F");
    // Reserved escapes stay escaped; a double-encoded dot is not a dot.
    assert_eq!(
        route_of(&gw, "GET", "/v1/%252e%252e/x", &[]),
        "prefix-short"
    );
    assert_eq!(up.last().target, "/v1/%252e%252e/x");

    let before = up.count();
    for target in [
        "/../etc/passwd",
        "/v1/../../etc",
        "/v1/%2e%2e/%2e%2e/etc",
        "/v1/a%2Fb",
        "/v1/a%2fb",
        "/v1/a%00b",
        "/v1/a%0d%0ab",
        "/v1/bad%zzescape",
    ] {
        let r = send_raw(gw.addr, "GET", target, &[]);
        assert_eq!(r.status, 400, "{target}: {r:?}");
        assert_eq!(
            r.header("content-type"),
            Some("application/problem+json"),
            "{target}"
        );
    }
    // Backslashes and dot segments with parameters could leave the prefix
    // on some upstreams (IIS, Tomcat): refused.
    for target in [
        "/v1/users/..\\..\\admin",
        "/v1/..;/admin",
        "/v1/.;/x",
        "/v1/..%3b/admin",
    ] {
        let r = send_raw(gw.addr, "GET", target, &[]);
        assert_eq!(r.status, 400, "{target}: {r:?}");
    }
    // A path that is not UTF-8 (an overlong "..") is refused.
    let r = RawResponse::parse(
        &gw.raw(b"GET /v1/\xC0\xAE\xC0\xAE/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
    )
    .unwrap();
    assert_eq!(r.status, 400);
    // A raw control character is refused before any route is tried.
    let r = send_raw(gw.addr, "GET", "/v1/a\x01b", &[]);
    assert_eq!(r.status, 400);
    assert_eq!(
        up.count(),
        before,
        "refused paths must never reach the upstream"
    );
}

#[test]
fn absolute_form_targets_are_forwarded_as_origin_form() {
    let (up, gw) = setup();
    assert_eq!(
        route_of(&gw, "GET", "http://gateway.test/v1/users/./me", &[]),
        "exact-literal"
    );
    assert_eq!(up.last().target, "/v1/users/me");
    assert_eq!(
        route_of(&gw, "GET", "http://gateway.test/v1/other?q=1", &[]),
        "prefix-short"
    );
    assert_eq!(up.last().target, "/v1/other?q=1");
}
