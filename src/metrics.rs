//! Prometheus metrics, served on the admin listener at `GET /metrics`.
//! Labels are route and upstream names (never raw paths), `-` for a request
//! that matched no route. Recorded in the `logging` phase (requests,
//! upstreams, cache) and where a module decides (auth, limits, reloads).

use std::sync::OnceLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_healthy: IntGaugeVec,
    /// Seconds each TLS certificate has left, set at each scrape.
    pub tls_certificate_expiry: IntGaugeVec,
    pub rate_limited: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub cache_requests: IntCounterVec,
    pub reloads: IntCounterVec,
    pub cluster_store_errors: IntCounterVec,
    pub ip_filtered: IntCounterVec,
    pub cors_refused: IntCounterVec,
    pub upstream_ejections: IntCounterVec,
    pub dns_failures: IntCounterVec,
    pub mirror_requests: IntCounterVec,
    pub access_log_dropped: IntCounter,
    pub trace_spans_dropped: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        // The standard `process_*` family (CPU, memory, open files, start
        // time), read from /proc at each scrape.
        let process = prometheus::process_collector::ProcessCollector::for_self();
        registry
            .register(Box::new(process))
            .expect("metric names are unique");
        let build_info = prometheus::IntGaugeVec::new(
            Opts::new(
                "gatehouse_build_info",
                "Always 1; the version of the running binary is its label.",
            ),
            &["version"],
        )
        .expect("static metric definition");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry
            .register(Box::new(build_info))
            .expect("metric names are unique");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "gatehouse_request_duration_seconds",
                "Time from the request head to the end of the response.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["route"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(duration.clone()))
            .expect("metric names are unique");
        let tls_certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "gatehouse_tls_certificate_expiry_seconds",
                "Seconds until each served TLS certificate expires, by its first DNS name.",
            ),
            &["name"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(tls_certificate_expiry.clone()))
            .expect("unique metric");
        let upstream_healthy = IntGaugeVec::new(
            Opts::new(
                "gatehouse_upstream_healthy",
                "1 while a target is healthy, 0 while its health checks fail.",
            ),
            &["upstream", "target"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(upstream_healthy.clone()))
            .expect("metric names are unique");
        let trace_spans_dropped = IntCounter::new(
            "gatehouse_trace_spans_dropped_total",
            "Spans not exported: the queue to the exporter was full, or the collector refused or did not answer.",
        )
        .expect("static metric definition");
        registry
            .register(Box::new(trace_spans_dropped.clone()))
            .expect("metric names are unique");
        let access_log_dropped = IntCounter::new(
            "gatehouse_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind.",
        )
        .expect("static metric definition");
        registry
            .register(Box::new(access_log_dropped.clone()))
            .expect("metric names are unique");
        Metrics {
            requests: counter(
                &registry,
                "gatehouse_requests_total",
                "Requests answered, by route, method and status.",
                &["route", "method", "status"],
            ),
            duration,
            upstream_requests: counter(
                &registry,
                "gatehouse_upstream_requests_total",
                "Requests sent to upstream targets, by outcome.",
                &["upstream", "target", "outcome"],
            ),
            upstream_healthy,
            tls_certificate_expiry,
            rate_limited: counter(
                &registry,
                "gatehouse_rate_limited_total",
                "Requests refused by a rate limit.",
                &["route"],
            ),
            auth_failures: counter(
                &registry,
                "gatehouse_auth_failures_total",
                "Requests refused by authentication, by reason.",
                &["route", "reason"],
            ),
            cache_requests: counter(
                &registry,
                "gatehouse_cache_requests_total",
                "Requests of cached routes, by result (hit, miss, bypass).",
                &["route", "result"],
            ),
            reloads: counter(
                &registry,
                "gatehouse_config_reloads_total",
                "Configuration reloads, by result (success, failure).",
                &["result"],
            ),
            cluster_store_errors: counter(
                &registry,
                "gatehouse_cluster_store_errors_total",
                "Calls to the cluster's store that failed, by reason (timeout, unavailable, refused).",
                &["reason"],
            ),
            upstream_ejections: counter(
                &registry,
                "gatehouse_upstream_ejections_total",
                "Targets ejected by outlier detection (consecutive failures).",
                &["upstream", "target"],
            ),
            dns_failures: counter(
                &registry,
                "gatehouse_dns_failures_total",
                "Failed lookups of an upstream's target names (the last addresses are kept).",
                &["upstream"],
            ),
            mirror_requests: counter(
                &registry,
                "gatehouse_mirror_requests_total",
                "Mirrored copies of requests, by result (sent, failed, skipped).",
                &["route", "result"],
            ),
            ip_filtered: counter(
                &registry,
                "gatehouse_ip_filtered_total",
                "Requests refused by a route's ip_filter.",
                &["route"],
            ),
            cors_refused: counter(
                &registry,
                "gatehouse_cors_refused_total",
                "CORS preflights refused (origin, method or header not allowed).",
                &["route"],
            ),
            access_log_dropped,
            trace_spans_dropped,
            registry,
        }
    }

    /// The Prometheus text format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One labelled series of a family, looked up on first use and kept:
/// `with_label_values` hashes every label value and takes the family's lock
/// on each call, which the request path should not pay. Held by what the
/// labels name (a route, a target), so it goes when that does.
#[derive(Debug)]
pub struct Series<T>(OnceLock<T>);

// Derived, `Default` would ask it of `T` too.
impl<T> Default for Series<T> {
    fn default() -> Self {
        Series(OnceLock::new())
    }
}

impl<T> Series<T> {
    pub fn get(&self, look_up: impl FnOnce() -> T) -> &T {
        self.0.get_or_init(look_up)
    }
}

/// A route's `gatehouse_requests_total` series, by method and status. Most
/// answers have one of a few statuses; their counters are found on first
/// use and kept, so a request costs no label hashing. Any other status is
/// looked up each time. A method's row is allocated once that method is
/// seen on the route.
#[derive(Default)]
pub struct RouteRequests {
    rows: [OnceLock<Box<StatusRow>>; METHODS.len()],
}

type StatusRow = [Series<IntCounter>; COMMON_STATUSES.len()];

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
];
const COMMON_STATUSES: [u16; 16] = [
    200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 413, 429, 500, 502, 504,
];

impl std::fmt::Debug for RouteRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteRequests")
    }
}

impl RouteRequests {
    /// Counts one request of `route` in `family` (`gatehouse_requests_total`).
    pub fn count(&self, family: &IntCounterVec, route: &str, method: &http::Method, status: u16) {
        let row = method_index(method);
        let mut digits = [0u8; 3];
        let look_up = |digits: &mut [u8; 3]| {
            family.with_label_values(&[route, METHODS[row], status_label(status, digits)])
        };
        match COMMON_STATUSES.iter().position(|s| *s == status) {
            Some(column) => self.rows[row].get_or_init(Box::default)[column]
                .get(|| look_up(&mut digits))
                .inc(),
            None => look_up(&mut digits).inc(),
        }
    }
}

fn method_index(method: &http::Method) -> usize {
    match *method {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::POST => 2,
        http::Method::PUT => 3,
        http::Method::DELETE => 4,
        http::Method::PATCH => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

/// The `outcome` label of `gatehouse_upstream_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    Success,
    Aborted,
    Timeout,
    Error,
    ConnectError,
    /// Failed, and tried again on another target (`retry_on`).
    Retry,
}

impl UpstreamOutcome {
    pub const COUNT: usize = 6;

    pub fn label(self) -> &'static str {
        match self {
            UpstreamOutcome::Success => "success",
            UpstreamOutcome::Aborted => "aborted",
            UpstreamOutcome::Timeout => "timeout",
            UpstreamOutcome::Error => "error",
            UpstreamOutcome::ConnectError => "connect_error",
            UpstreamOutcome::Retry => "retry",
        }
    }
}

/// The method as a bounded label: the standard methods, else `OTHER`.
pub fn method_label(method: &http::Method) -> &'static str {
    METHODS[method_index(method)]
}

/// A status as a label, written into `buf` (no allocation).
pub fn status_label(status: u16, buf: &mut [u8; 3]) -> &str {
    if !(100..=999).contains(&status) {
        return "000";
    }
    buf[0] = b'0' + (status / 100) as u8;
    buf[1] = b'0' + (status / 10 % 10) as u8;
    buf[2] = b'0' + (status % 10) as u8;
    std::str::from_utf8(buf).unwrap_or("000")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routes_kept_series_count_as_looking_each_up_would() {
        let m = Metrics::new();
        let (a, b) = (RouteRequests::default(), RouteRequests::default());
        let get = http::Method::GET;
        let purge = http::Method::from_bytes(b"PURGE").unwrap();
        for _ in 0..3 {
            a.count(&m.requests, "a", &get, 200);
        }
        a.count(&m.requests, "a", &get, 418); // not kept: looked up
        a.count(&m.requests, "a", &get, 418);
        a.count(&m.requests, "a", &purge, 504);
        a.count(&m.requests, "a", &http::Method::HEAD, 200);
        b.count(&m.requests, "b", &get, 200);
        let n = |labels: &[&str]| m.requests.with_label_values(labels).get();
        assert_eq!(n(&["a", "GET", "200"]), 3);
        assert_eq!(n(&["a", "GET", "418"]), 2);
        assert_eq!(n(&["a", "OTHER", "504"]), 1);
        assert_eq!(n(&["a", "HEAD", "200"]), 1);
        assert_eq!(n(&["b", "GET", "200"]), 1);
        assert_eq!(n(&["b", "HEAD", "200"]), 0);
    }

    #[test]
    fn labels() {
        let mut b = [0u8; 3];
        assert_eq!(status_label(200, &mut b), "200");
        assert_eq!(status_label(599, &mut b), "599");
        assert_eq!(status_label(0, &mut b), "000");
        assert_eq!(
            method_label(&http::Method::from_bytes(b"PURGE").unwrap()),
            "OTHER"
        );
    }

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.requests.with_label_values(&["r", "GET", "200"]).inc();
        m.duration.with_label_values(&["r"]).observe(0.01);
        m.upstream_requests
            .with_label_values(&["u", "127.0.0.1:1", "success"])
            .inc();
        m.upstream_healthy
            .with_label_values(&["u", "127.0.0.1:1"])
            .set(1);
        m.rate_limited.with_label_values(&["r"]).inc();
        m.auth_failures.with_label_values(&["r", "expired"]).inc();
        m.cache_requests.with_label_values(&["r", "hit"]).inc();
        m.reloads.with_label_values(&["success"]).inc();
        let text = String::from_utf8(m.render()).unwrap();
        for family in [
            "gatehouse_requests_total{method=\"GET\",route=\"r\",status=\"200\"} 1",
            "gatehouse_request_duration_seconds_bucket",
            "gatehouse_upstream_requests_total{outcome=\"success\"",
            "gatehouse_upstream_healthy{",
            "gatehouse_rate_limited_total{route=\"r\"} 1",
            "gatehouse_auth_failures_total{reason=\"expired\",route=\"r\"} 1",
            "gatehouse_cache_requests_total{result=\"hit\",route=\"r\"} 1",
            "gatehouse_config_reloads_total{result=\"success\"} 1",
        ] {
            assert!(text.contains(family), "{family} missing:\n{text}");
        }
    }
}
