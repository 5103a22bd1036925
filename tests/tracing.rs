//! Tracing end to end (SPEC section 9.1) against a real OTLP/HTTP receiver:
//! continued and new traces, span names and attributes, a client span per
//! upstream attempt and per aggregate part (a refused connection's too),
//! the sampling rules and a fractional share, batches, the bounded queue,
//! the flush as SIGTERM comes, an absent and a slow collector, `trace_id`
//! in the access log (a head the listener refused included), and no
//! `tracing` section at all.

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

/// The trace ids the upstream was sent, with each `traceparent`'s parent
/// span and sampled flag, in the order received.
fn sent_traces(up: &TestUpstream) -> Vec<(String, String, bool)> {
    up.requests()
        .iter()
        .map(|r| {
            let value = r
                .header("traceparent")
                .unwrap_or_else(|| panic!("no traceparent upstream: {r:?}"));
            fields(value)
        })
        .collect()
}

/// A sampled client trace sent after everything else, on `http`'s
/// connection (so the requests before it were done, spans queued): the
/// exporter sends spans in the order they were queued, so once its spans
/// have arrived, every span queued before them has too (or never will).
fn after_sentinel(
    http: &reqwest::blocking::Client,
    gw: &Gateway,
    collector: &Collector,
    trace: &str,
) -> Vec<Got> {
    let r = http
        .get(gw.url("/users/sentinel"))
        .header("traceparent", traceparent(trace, CLIENT_SPAN, true))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    eventually(Duration::from_secs(10), "the sentinel's spans", || {
        collector
            .spans()
            .iter()
            .filter(|s| s.trace_id == trace)
            .count()
            >= 2
    });
    collector.spans()
}

#[test]
fn spans_leave_in_batches_each_exactly_once() {
    let collector = Collector::start();
    let up = TestUpstream::named("app");
    let gw = traced(&collector.url(), 1.0, &routes(&up)).start();
    let http = client();
    for i in 0..50 {
        let r = http.get(gw.url(&format!("/users/{i}"))).send().unwrap();
        assert_eq!(r.status(), 200);
    }
    let sent = sent_traces(&up);
    assert_eq!(sent.len(), 50);
    let sentinel = "55555555555555555555555555555555";
    let spans = after_sentinel(&http, &gw, &collector, sentinel);
    // A server and a client span per request, the sentinel's included.
    assert_eq!(spans.len(), 2 * 51, "{spans:?}");
    let ids: std::collections::BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    assert_eq!(ids.len(), spans.len(), "a span sent twice: {spans:?}");
    for (trace, upstream_parent, sampled) in &sent {
        assert!(*sampled, "sample 1 records every new trace");
        let of_trace: Vec<&Got> = spans.iter().filter(|s| &s.trace_id == trace).collect();
        let server: Vec<&&Got> = of_trace.iter().filter(|s| s.kind == 2).collect();
        let upstream: Vec<&&Got> = of_trace.iter().filter(|s| s.kind == 3).collect();
        assert_eq!((server.len(), upstream.len()), (1, 1), "{of_trace:?}");
        assert_eq!(upstream[0].parent, server[0].span_id);
        assert_eq!(&upstream[0].span_id, upstream_parent);
    }
    // The exporter waits up to 500 ms for a fuller batch (of up to 512):
    // a few POSTs, not one per span or per request.
    let posts = collector.posts();
    assert!(
        (1..spans.len() / 4).contains(&posts),
        "{posts} POSTs for {} spans",
        spans.len()
    );
}

#[test]
fn a_fractional_sample_records_its_share_and_every_request_is_traced_upstream() {
    let collector = Collector::start();
    let up = TestUpstream::named("app");
    let gw = traced(&collector.url(), 0.25, &routes(&up)).start();
    let http = client();
    const N: usize = 400;
    for i in 0..N {
        let r = http.get(gw.url(&format!("/users/{i}"))).send().unwrap();
        assert_eq!(r.status(), 200);
    }
    let sent = sent_traces(&up);
    assert_eq!(sent.len(), N);
    let sentinel = "66666666666666666666666666666666";
    let spans = after_sentinel(&http, &gw, &collector, sentinel);
    let mut recorded = 0;
    for (trace, upstream_parent, sampled) in &sent {
        assert_ne!(trace, &"0".repeat(32));
        assert_ne!(upstream_parent, &"0".repeat(16));
        let server = spans
            .iter()
            .filter(|s| &s.trace_id == trace && s.kind == 2)
            .count();
        let upstream: Vec<&Got> = spans
            .iter()
            .filter(|s| &s.trace_id == trace && s.kind == 3)
            .collect();
        // The flag the upstream saw is the decision: set exactly when the
        // gateway exported the trace's spans.
        if *sampled {
            recorded += 1;
            assert_eq!(server, 1, "{trace} sampled but its server span: {server}");
            assert_eq!(upstream.len(), 1, "{trace}: {upstream:?}");
            assert_eq!(&upstream[0].span_id, upstream_parent);
        } else {
            assert_eq!(
                server + upstream.len(),
                0,
                "{trace} not sampled, yet exported"
            );
        }
    }
    let traces: std::collections::BTreeSet<&str> = sent.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(traces.len(), N, "each request its own new trace");
    assert_eq!(
        spans.len(),
        2 * recorded + 2,
        "nothing but the recorded traces and the sentinel: {spans:?}"
    );
    // Binomial(400, 0.25): mean 100, standard deviation 8.66; five of them.
    let (mean, sd) = (N as f64 * 0.25, (N as f64 * 0.25 * 0.75).sqrt());
    assert!(
        (recorded as f64 - mean).abs() <= 5.0 * sd,
        "{recorded} of {N} recorded at sample 0.25"
    );
}

/// Waits for `gw` to exit after a signal; false if it has not within `within`.
fn exited(gw: &mut Gateway, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = gw.child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

#[test]
fn spans_queued_as_sigterm_comes_are_sent_before_the_gateway_exits() {
    // SIGTERM gives the exporter the grace period (1 s here), then its
    // runtime ends. A request still in flight keeps the span queue open,
    // so the exporter must stop waiting its usual 500 ms for a fuller batch
    // on its own. The collector holds the first batch for 800 ms; SIGTERM
    // comes while it is held, with the last request's spans queued behind
    // it: they arrive about 750 ms after the signal if shutting down makes
    // the exporter send at once, and would be lost if it waited (1250 ms).
    let collector = Collector::start();
    collector.slow(Duration::from_millis(800));
    let up = TestUpstream::with_handler("app", |r| {
        let reply = Reply::text(200, "app");
        if r.target == "/users/slow" {
            reply.delayed(Duration::from_secs(5))
        } else {
            reply
        }
    });
    let mut gw = traced(&collector.url(), 0.0, &routes(&up)).start();
    let first = "77777777777777777777777777777777";
    let last = "88888888888888888888888888888888";
    let http = client();
    let r = http
        .get(gw.url("/users/first"))
        .header("traceparent", traceparent(first, CLIENT_SPAN, true))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let slow_url = gw.url("/users/slow");
    // Cut off by the exit; only its being in flight matters.
    let in_flight = std::thread::spawn(move || client().get(slow_url).send().map(|_| ()));
    eventually(Duration::from_secs(5), "the slow request upstream", || {
        up.requests().iter().any(|r| r.target == "/users/slow")
    });
    eventually(Duration::from_secs(5), "the first batch posted", || {
        collector.posts() >= 1
    });
    collector.slow(Duration::ZERO);
    let r = http
        .get(gw.url("/users/last"))
        .header("traceparent", traceparent(last, CLIENT_SPAN, true))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    signal(gw.child.id(), "TERM");
    assert!(
        exited(&mut gw, Duration::from_secs(10)),
        "not gone after SIGTERM"
    );
    assert!(in_flight.join().unwrap().is_err(), "cut off by the exit");
    // Whatever was sent is in by now: the collector answers at once.
    let spans = collector.spans();
    for trace in [first, last] {
        let kinds: Vec<i32> = spans
            .iter()
            .filter(|s| s.trace_id == trace)
            .map(|s| s.kind)
            .collect();
        assert!(
            kinds.contains(&2) && kinds.contains(&3),
            "{trace}: {spans:?}\n{}",
            gw.log_text()
        );
    }
}

#[test]
fn a_refused_connection_is_an_error_client_span_and_a_502_server_span() {
    let collector = Collector::start();
    // Bound a moment ago and closed: connecting is refused.
    let dead = free_port();
    let body = format!(
        "upstreams:\n  app: {{ targets: ['127.0.0.1:{dead}'] }}\nroutes:\n  - name: users\n    match: {{ path_prefix: /users }}\n    upstream: app\n"
    );
    let gw = traced(&collector.url(), 1.0, &body).start();
    assert_problem(client().get(gw.url("/users/1")).send().unwrap(), 502);
    eventually(Duration::from_secs(10), "the server span", || {
        collector.spans().iter().any(|s| s.kind == 2)
    });
    let spans = collector.spans();
    let server = spans.iter().find(|s| s.kind == 2).unwrap();
    assert_eq!(server.name, "GET users");
    assert_eq!(server.attrs["http.response.status_code"], "502");
    assert_eq!(
        server.attrs.get("error.type").map(String::as_str),
        Some("502"),
        "{server:?}"
    );
    assert_eq!(server.status, 2, "{server:?}");
    let attempts: Vec<&Got> = spans
        .iter()
        .filter(|s| s.kind == 3 && s.parent == server.span_id)
        .collect();
    assert!(!attempts.is_empty(), "{spans:?}");
    for attempt in attempts {
        assert_eq!(attempt.trace_id, server.trace_id);
        assert_eq!(attempt.status, 2, "an error span: {attempt:?}");
        assert_eq!(
            attempt.attrs.get("error.type").map(String::as_str),
            Some("ConnectRefused"),
            "{attempt:?}"
        );
        assert_eq!(attempt.attrs["server.port"], dead.to_string());
        assert!(
            !attempt.attrs.contains_key("http.response.status_code"),
            "no answer, no status: {attempt:?}"
        );
    }
}

#[test]
fn spans_past_the_queue_are_dropped_and_counted() {
    // What src/trace.rs sets: the queue's bound and one batch's size.
    const QUEUE: f64 = 8192.0;
    const BATCH: f64 = 512.0;
    let collector = Collector::start();
    collector.slow(Duration::from_secs(600));
    let up = TestUpstream::named("app");
    let gw = traced(&collector.url(), 1.0, &routes(&up)).start();
    // Two spans a request: 6000 requests queue 12000, far past the bound.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let url = gw.url(&format!("/users/{t}"));
            std::thread::spawn(move || {
                let http = client();
                for _ in 0..1500 {
                    assert_eq!(http.get(&url).send().unwrap().status(), 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let spans = 2.0 * 6000.0;
    let dropped = || metric_sum(&gw, "gatehouse_trace_spans_dropped_total ");
    // Every span not dropped is queued or in the one batch being sent.
    eventually(Duration::from_secs(5), "the overflow counted", || {
        dropped() >= spans - QUEUE - BATCH
    });
    // More than exports that timed out could have dropped (each at most a
    // batch, one per POST): the queue's bound did.
    let (dropped, posts) = (dropped(), collector.posts() as f64);
    assert!(dropped > BATCH * posts, "{dropped} dropped, {posts} POSTs");
    assert!(
        dropped <= spans - QUEUE + BATCH * posts,
        "the queue held {QUEUE} spans: {dropped} dropped of {spans}"
    );
}

/// The access-log lines of `log` once it has `n`, as JSON.
fn log_lines(log: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    eventually(Duration::from_secs(5), &format!("{n} log lines"), || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .count()
            >= n
    });
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_refused_head_has_a_fresh_trace_id_in_the_access_log() {
    // Two `Host` fields: refused by the listener before the proxy sees it.
    let refused = b"GET /users/1 HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n";
    let refuse_twice = |gw: &Gateway| {
        for _ in 0..2 {
            let answer = RawResponse::parse(&gw.raw(refused)).expect("an answer");
            assert_eq!(answer.status, 400);
            assert_eq!(
                answer.header("content-type"),
                Some("application/problem+json")
            );
        }
    };
    let collector = Collector::start();
    let up = TestUpstream::named("app");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let body = format!("access_log: {}\n{}", log.display(), routes(&up));
    let gw = traced(&collector.url(), 1.0, &body).start();
    refuse_twice(&gw);
    let lines = log_lines(&log, 2);
    let mut ids = std::collections::BTreeSet::new();
    for line in &lines {
        assert_eq!(line["status"], 400, "{line}");
        let id = line["trace_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no trace_id: {line}"));
        assert!(
            id.len() == 32
                && id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                && id != "0".repeat(32),
            "{line}"
        );
        ids.insert(id.to_string());
    }
    assert_eq!(ids.len(), 2, "a new trace each: {lines:?}");
    // Never recorded: the sentinel's are the only spans.
    let spans = after_sentinel(
        &client(),
        &gw,
        &collector,
        "99999999999999999999999999999999",
    );
    assert_eq!(spans.len(), 2, "{spans:?}");
    drop(gw);

    // Without `tracing`, no trace id there either.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let body = format!("access_log: {}\n{}", log.display(), routes(&up));
    let gw = gateway(&body).start();
    refuse_twice(&gw);
    for line in log_lines(&log, 2) {
        assert_eq!(line["status"], 400, "{line}");
        assert!(line.get("trace_id").is_none(), "{line}");
    }
}
