//! Tracing end to end (SPEC section 9.1) against a real OTLP/HTTP receiver:
//! continued and new traces, span names and attributes, a client span per
//! upstream attempt and per aggregate part, the sampling rules, an absent
//! and a slow collector, `trace_id` in the access log, and no `tracing`
//! section at all.

mod common;

use std::time::Duration;

use common::otlp::{Collector, Got};
use common::*;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn traced(collector: &str, sample: f64, body: &str) -> GatewayBuilder {
    gateway(&format!(
        "tracing: {{ otlp: '{collector}', sample: {sample}, service_name: edge-test }}\n{body}"
    ))
}

fn routes(up: &TestUpstream) -> String {
    format!(
        "upstreams:\n  app: {{ targets: [{}] }}\nroutes:\n  - name: users\n    match: {{ path_prefix: /users }}\n    upstream: app\n",
        up.addr
    )
}

fn traceparent(trace: &str, span: &str, sampled: bool) -> String {
    format!("00-{trace}-{span}-{}", if sampled { "01" } else { "00" })
}

/// `(trace id, parent span id, sampled)` of a traceparent.
fn fields(value: &str) -> (String, String, bool) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00");
    (parts[1].to_string(), parts[2].to_string(), parts[3] == "01")
}

fn wait_spans(collector: &Collector, n: usize) -> Vec<Got> {
    eventually(
        Duration::from_secs(10),
        &format!("{n} spans exported"),
        || collector.spans().len() >= n,
    );
    collector.spans()
}

#[test]
fn a_client_trace_is_continued_with_a_server_span_and_a_client_span() {
    let collector = Collector::start();
    let up = TestUpstream::with_handler("app", |r| {
        if r.target.starts_with("/users/broken") {
            Reply::text(500, "broken")
        } else {
            Reply::text(200, "app")
        }
    });
    let gw = traced(&collector.url(), 0.0, &routes(&up)).start();
    let r = client()
        .get(gw.url("/users/7?access_token=secret-in-query"))
        .header("traceparent", traceparent(CLIENT_TRACE, CLIENT_SPAN, true))
        .header("tracestate", "vendor=opaque")
        .header("tracestate", "other=x")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let sent = up.last();
    let (trace, parent, sampled) = fields(sent.header("traceparent").unwrap());
    assert_eq!(trace, CLIENT_TRACE, "the client's trace id kept");
    assert_ne!(parent, CLIENT_SPAN, "the gateway's span is the parent");
    assert!(sampled);
    assert_eq!(
        sent.header_all("tracestate"),
        ["vendor=opaque,other=x"],
        "two fields are one list"
    );

    let spans = wait_spans(&collector, 2);
    let server = spans.iter().find(|s| s.kind == 2).expect("a server span");
    let upstream = spans.iter().find(|s| s.kind == 3).expect("a client span");
    assert_eq!(server.service, "edge-test");
    assert_eq!(server.trace_id, CLIENT_TRACE);
    assert_eq!(server.parent, CLIENT_SPAN);
    assert_eq!(server.name, "GET users");
    for (key, value) in [
        ("http.request.method", "GET"),
        ("http.route", "users"),
        ("url.path", "/users/7"),
        ("url.scheme", "http"),
        ("http.response.status_code", "200"),
        ("client.address", "127.0.0.1"),
    ] {
        assert_eq!(
            server.attrs.get(key).map(String::as_str),
            Some(value),
            "{key}: {server:?}"
        );
    }
    assert!(!server.attrs.contains_key("error.type"), "{server:?}");
    assert!(!upstream.attrs.contains_key("error.type"), "{upstream:?}");
    assert_eq!(upstream.trace_id, CLIENT_TRACE);
    assert_eq!(upstream.parent, server.span_id);
    assert_eq!(
        upstream.span_id, parent,
        "the upstream's parent is the attempt's span"
    );
    assert_eq!(upstream.attrs["server.address"], "127.0.0.1");
    assert_eq!(upstream.attrs["server.port"], up.addr.port().to_string());
    assert_eq!(upstream.attrs["http.response.status_code"], "200");
    // A 5xx: the server span and the client span are errors whose
    // `error.type` is the status code.
    let failed_trace = "33333333333333333333333333333333";
    let r = client()
        .get(gw.url("/users/broken"))
        .header("traceparent", traceparent(failed_trace, CLIENT_SPAN, true))
        .send()
        .unwrap();
    assert_eq!(r.status(), 500);
    let spans = wait_spans(&collector, 4);
    let of_failed = |kind| {
        spans
            .iter()
            .find(|s| s.trace_id == failed_trace && s.kind == kind)
            .unwrap_or_else(|| panic!("a span of kind {kind} in {spans:?}"))
    };
    for span in [of_failed(2), of_failed(3)] {
        assert_eq!(span.attrs["http.response.status_code"], "500", "{span:?}");
        assert_eq!(
            span.attrs.get("error.type").map(String::as_str),
            Some("500"),
            "{span:?}"
        );
        assert_eq!(span.status, 2, "an error span: {span:?}");
    }
    // No query, token or header value in any span.
    for span in &spans {
        for value in span.attrs.values() {
            assert!(
                !value.contains("secret") && !value.contains("opaque"),
                "{span:?}"
            );
        }
    }
}

#[test]
fn sampling_follows_the_client_and_the_share_for_new_traces() {
    let collector = Collector::start();
    let up = TestUpstream::named("app");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let body = format!("access_log: {}\n{}", log.display(), routes(&up));
    let gw = traced(&collector.url(), 0.0, &body).start();
    // New traces at sample 0: none recorded, but the upstream still gets a
    // traceparent (not sampled) and the log line its trace id.
    let r = client().get(gw.url("/users/1")).send().unwrap();
    assert_eq!(r.status(), 200);
    let (new_trace, _, sampled) = fields(up.last().header("traceparent").unwrap());
    assert!(!sampled);
    assert_ne!(new_trace, "0".repeat(32));
    // A client trace not sampled stays unrecorded; a sampled one is
    // recorded whatever `sample` says.
    let unsampled = "11111111111111111111111111111111";
    client()
        .get(gw.url("/users/2"))
        .header("traceparent", traceparent(unsampled, CLIENT_SPAN, false))
        .send()
        .unwrap();
    assert!(!fields(up.last().header("traceparent").unwrap()).2);
    client()
        .get(gw.url("/users/3"))
        .header("traceparent", traceparent(CLIENT_TRACE, CLIENT_SPAN, true))
        .send()
        .unwrap();
    // A malformed traceparent starts a new trace.
    client()
        .get(gw.url("/users/4"))
        .header("traceparent", "00-not-a-trace-01")
        .send()
        .unwrap();
    let (fresh, _, _) = fields(up.last().header("traceparent").unwrap());
    assert_ne!(fresh, CLIENT_TRACE);
    let spans = wait_spans(&collector, 2);
    // Only the sampled client trace was recorded (after a sentinel wait).
    client()
        .get(gw.url("/users/5"))
        .header(
            "traceparent",
            traceparent("22222222222222222222222222222222", CLIENT_SPAN, true),
        )
        .send()
        .unwrap();
    wait_spans(&collector, 4);
    let traces: std::collections::BTreeSet<String> = collector
        .spans()
        .iter()
        .map(|s| s.trace_id.clone())
        .collect();
    assert_eq!(
        traces,
        [CLIENT_TRACE.to_string(), "2".repeat(32)]
            .into_iter()
            .collect(),
        "{spans:?}"
    );
    // Every access-log line has its trace id.
    eventually(Duration::from_secs(5), "five log lines", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
            >= 5
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("\"trace_id\":\"{new_trace}\"")),
        "{text}"
    );
    assert!(
        text.contains(&format!("\"trace_id\":\"{unsampled}\"")),
        "{text}"
    );
    drop(gw);

    // At sample 1 every new trace is recorded.
    let collector = Collector::start();
    let gw = traced(&collector.url(), 1.0, &routes(&up)).start();
    for _ in 0..3 {
        client().get(gw.url("/users/1")).send().unwrap();
    }
    let spans = wait_spans(&collector, 6);
    let roots = spans
        .iter()
        .filter(|s| s.kind == 2 && s.parent.is_empty())
        .count();
    assert_eq!(roots, 3, "{spans:?}");
}

#[test]
fn each_upstream_attempt_and_each_aggregate_part_is_a_client_span() {
    let collector = Collector::start();
    let down = TestUpstream::with_handler("down", |_| Reply::text(503, "down"));
    let good = TestUpstream::named("good");
    let parts = TestUpstream::with_handler("parts", |r| {
        Reply::typed(
            200,
            "application/json",
            &format!("{{\"at\":\"{}\"}}", r.target),
        )
    });
    let body = format!(
        "upstreams:
  pool:
    targets: [{}, {}]
    retry_on: [503]
  parts: {{ targets: [{}] }}
routes:
  - name: retried
    match: {{ path_prefix: /retried }}
    upstream: pool
  - name: combined
    match: {{ path: \"/combined/{{id}}\" }}
    aggregate:
      parts:
        - {{ key: a, upstream: parts, path: \"/a/{{id}}\" }}
        - {{ key: b, upstream: parts, path: \"/b/{{id}}\" }}
",
        down.addr, good.addr, parts.addr
    );
    let gw = traced(&collector.url(), 1.0, &body).start();
    for _ in 0..4 {
        assert_eq!(
            client().get(gw.url("/retried/x")).send().unwrap().status(),
            200
        );
    }
    eventually(Duration::from_secs(10), "four server spans", || {
        collector.spans().iter().filter(|s| s.kind == 2).count() >= 4
    });
    let spans = collector.spans();
    // Each request: one client span per attempt, under its server span; a
    // 503 (an error span, the failing target's port) then the 200.
    let mut retried = 0;
    for server in spans.iter().filter(|s| s.kind == 2) {
        let attempts: Vec<&Got> = spans
            .iter()
            .filter(|s| s.kind == 3 && s.parent == server.span_id)
            .collect();
        let codes: Vec<&str> = attempts
            .iter()
            .map(|s| s.attrs["http.response.status_code"].as_str())
            .collect();
        match codes.as_slice() {
            ["200"] => {}
            ["503", "200"] | ["200", "503"] => {
                retried += 1;
                let failed = attempts
                    .iter()
                    .find(|s| s.attrs["http.response.status_code"] == "503")
                    .unwrap();
                assert_eq!(failed.status, 2, "an error span");
                assert_eq!(failed.attrs["error.type"], "503");
                assert_eq!(failed.attrs["server.port"], down.addr.port().to_string());
            }
            other => panic!("attempts {other:?} in {spans:?}"),
        }
    }
    assert!(retried >= 1, "{spans:?}");

    let r = client().get(gw.url("/combined/9")).send().unwrap();
    assert_eq!(r.status(), 200);
    eventually(Duration::from_secs(10), "the aggregate's spans", || {
        let spans = collector.spans();
        spans
            .iter()
            .find(|s| s.name == "GET combined")
            .is_some_and(|server| spans.iter().filter(|s| s.parent == server.span_id).count() >= 2)
    });
    let spans = collector.spans();
    let server = spans.iter().find(|s| s.name == "GET combined").unwrap();
    let part_spans: Vec<&Got> = spans
        .iter()
        .filter(|s| s.kind == 3 && s.parent == server.span_id)
        .collect();
    assert_eq!(part_spans.len(), 2, "{spans:?}");
    for request in parts.requests() {
        let (trace, parent, _) = fields(request.header("traceparent").unwrap());
        assert_eq!(trace, server.trace_id);
        assert!(part_spans.iter().any(|s| s.span_id == parent));
    }
}

#[test]
fn an_absent_or_slow_collector_costs_requests_nothing() {
    let up = TestUpstream::named("app");
    let dead = format!("http://127.0.0.1:{}/v1/traces", free_port());
    let gw = traced(&dead, 1.0, &routes(&up)).start();
    let patient_for_a_second = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    for _ in 0..20 {
        let r = patient_for_a_second.get(gw.url("/users/1")).send().unwrap();
        assert_eq!(r.status(), 200);
    }
    let dropped = || metric_sum(&gw, "gatehouse_trace_spans_dropped_total ");
    eventually(Duration::from_secs(10), "the lost spans counted", || {
        dropped() >= 40.0
    });

    // A collector that takes 10 s per batch: every request is still served
    // within the second.
    let slow = Collector::start();
    slow.slow(Duration::from_secs(10));
    let gw = traced(&slow.url(), 1.0, &routes(&up)).start();
    for _ in 0..30 {
        let r = patient_for_a_second.get(gw.url("/users/1")).send().unwrap();
        assert_eq!(r.status(), 200);
    }
    eventually(Duration::from_secs(5), "a batch under way", || {
        slow.posts() >= 1
    });
    assert!(slow.spans().is_empty(), "none answered yet");
}

#[test]
fn without_tracing_the_clients_traceparent_passes_untouched() {
    let up = TestUpstream::named("app");
    let parts = TestUpstream::with_handler("parts", |_| {
        Reply::typed(200, "application/json", "{\"ok\":true}")
    });
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let aggregate = "  - name: combined
    match: { path: \"/combined/{id}\" }
    aggregate:
      parts:
        - { key: a, upstream: parts, path: \"/a/{id}\" }
        - { key: b, upstream: parts, path: \"/b/{id}\" }
";
    let body = format!(
        "access_log: {}\n{}{aggregate}",
        log.display(),
        routes(&up).replace(
            "upstreams:\n",
            &format!("upstreams:\n  parts: {{ targets: [{}] }}\n", parts.addr)
        )
    );
    let gw = gateway(&body).start();
    let theirs = traceparent(CLIENT_TRACE, CLIENT_SPAN, true);
    client()
        .get(gw.url("/users/1"))
        .header("traceparent", &theirs)
        .header("tracestate", "vendor=opaque")
        .send()
        .unwrap();
    assert_eq!(up.last().header("traceparent"), Some(theirs.as_str()));
    assert_eq!(up.last().header("tracestate"), Some("vendor=opaque"));
    client().get(gw.url("/users/2")).send().unwrap();
    assert_eq!(up.last().header("traceparent"), None, "none made up");
    // Each aggregate part is sent the client's trace context as it came.
    let r = client()
        .get(gw.url("/combined/9"))
        .header("traceparent", &theirs)
        .header("tracestate", "vendor=opaque")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let sent = parts.requests();
    assert_eq!(sent.len(), 2);
    for part in &sent {
        assert_eq!(
            part.header_all("traceparent"),
            [theirs.as_str()],
            "{part:?}"
        );
        assert_eq!(part.header_all("tracestate"), ["vendor=opaque"], "{part:?}");
    }
    assert_eq!(
        client()
            .get(gw.url("/combined/10"))
            .send()
            .unwrap()
            .status(),
        200
    );
    for part in &parts.requests()[2..] {
        assert_eq!(part.header("traceparent"), None, "none made up: {part:?}");
        assert_eq!(part.header("tracestate"), None, "{part:?}");
    }
    eventually(Duration::from_secs(5), "four log lines", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
            >= 4
    });
    assert!(!std::fs::read_to_string(&log).unwrap().contains("trace_id"));
}

#[test]
fn tracing_mistakes_are_config_errors_with_their_path() {
    let base = "listen: [127.0.0.1:0]\nupstreams:\n  a: { targets: ['127.0.0.1:9'] }\nroutes:\n  - name: r\n    match: { path_prefix: / }\n    upstream: a\n";
    let cases = [
        (
            format!("{base}tracing: {{ otlp: 'ftp://collector:4318/v1/traces' }}\n"),
            "tracing.otlp",
            "http:// or https:// URL",
        ),
        (
            format!("{base}tracing: {{ otlp: 'collector' }}\n"),
            "tracing.otlp",
            "http:// or https:// URL",
        ),
        (
            format!("{base}tracing: {{ otlp: 'http://c:4318/v1/traces', sample: 1.5 }}\n"),
            "tracing.sample",
            "from 0 to 1",
        ),
        (
            format!("{base}tracing: {{ otlp: 'http://c:4318/v1/traces', rate: 1 }}\n"),
            "tracing.rate",
            "unknown key",
        ),
    ];
    assert_config_errors(&cases, None);
}

#[test]
fn spans_reach_an_https_collector_that_the_gateway_trusts_and_no_other() {
    let ca = common::pki::Ca::new("collector test CA");
    let issued = ca.issue(&["127.0.0.1"], "collector", None, None);
    let collector = Collector::start_tls(&issued.cert_pem, &issued.key_pem);
    assert!(collector.url().starts_with("https://127.0.0.1:"));
    let up = TestUpstream::named("app");
    let dir = tempfile::tempdir().unwrap();
    let ca_path = ca.write(dir.path(), "ca");

    // Trusting the CA (OpenSSL reads SSL_CERT_FILE), the spans arrive.
    let gw = traced(&collector.url(), 1.0, &routes(&up))
        .env("SSL_CERT_FILE", ca_path.to_str().unwrap())
        .start();
    let r = client().get(gw.url("/users/7")).send().unwrap();
    assert_eq!(r.status(), 200);
    let spans = wait_spans(&collector, 2);
    assert!(
        spans.iter().any(|s| s.kind == 2 && s.name == "GET users"),
        "{spans:?}"
    );
    drop(gw);

    // A gateway that does not trust it never hands spans to that server:
    // its export fails verification and the spans are counted as dropped.
    let stranger = Collector::start_tls(&issued.cert_pem, &issued.key_pem);
    let gw = traced(&stranger.url(), 1.0, &routes(&up)).start();
    let r = client().get(gw.url("/users/7")).send().unwrap();
    assert_eq!(r.status(), 200);
    let dropped = || metric_sum(&gw, "gatehouse_trace_spans_dropped_total ");
    eventually(
        Duration::from_secs(10),
        "the refused export counted",
        || dropped() >= 2.0,
    );
    assert!(stranger.spans().is_empty(), "{:?}", stranger.spans());
}
