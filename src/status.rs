//! `GET /status` on the admin listener (SPEC section 9.2), what the
//! dashboard shows: per route the request rate, 5xx share, p50/p99 and
//! rate-limited count over the last minute, with a sparkline of it; per
//! upstream each target's state and requests in flight; the configuration's
//! load time and the last reload; version and uptime.
//!
//! Computed from the very counters `/metrics` serves (no second
//! bookkeeping on the request path): a background task reads them every
//! `EVERY` and keeps a minute of readings; a `/status` request reads them
//! once more and takes the differences.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus::core::Collector;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::gateway::Runtime;
use crate::metrics::Metrics;

/// How often the counters are read, and so a sparkline's step.
pub const EVERY: Duration = Duration::from_secs(2);
/// The window of the figures.
pub const WINDOW: Duration = Duration::from_secs(60);

/// One route's counters at one reading.
#[derive(Debug, Clone, Default, PartialEq)]
struct RouteCounts {
    requests: u64,
    errors: u64,
    limited: u64,
    /// The duration histogram: `(upper bound in seconds, cumulative count)`.
    buckets: Vec<(f64, u64)>,
}

/// Every route's counters at one moment.
#[derive(Debug, Clone)]
struct Reading {
    at: Instant,
    routes: BTreeMap<String, RouteCounts>,
}

/// The readings of the last minute.
pub struct Sampler {
    metrics: Arc<Metrics>,
    readings: Mutex<VecDeque<Reading>>,
    started: Instant,
    started_wall: SystemTime,
}

fn label<'m>(metric: &'m prometheus::proto::Metric, name: &str) -> &'m str {
    metric
        .get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

impl Sampler {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Sampler {
            metrics,
            readings: Mutex::new(VecDeque::new()),
            started: Instant::now(),
            started_wall: SystemTime::now(),
        }
    }

    fn read(&self) -> Reading {
        let mut routes: BTreeMap<String, RouteCounts> = BTreeMap::new();
        for family in self.metrics.requests.collect() {
            for m in family.get_metric() {
                let counts = routes.entry(label(m, "route").to_string()).or_default();
                let n = m.get_counter().get_value() as u64;
                counts.requests += n;
                if label(m, "status").starts_with('5') {
                    counts.errors += n;
                }
            }
        }
        for family in self.metrics.rate_limited.collect() {
            for m in family.get_metric() {
                let counts = routes.entry(label(m, "route").to_string()).or_default();
                counts.limited += m.get_counter().get_value() as u64;
            }
        }
        for family in self.metrics.duration.collect() {
            for m in family.get_metric() {
                let counts = routes.entry(label(m, "route").to_string()).or_default();
                let histogram = m.get_histogram();
                let mut buckets: Vec<(f64, u64)> = histogram
                    .get_bucket()
                    .iter()
                    .map(|b| (b.upper_bound(), b.cumulative_count()))
                    .collect();
                buckets.push((f64::INFINITY, histogram.get_sample_count()));
                counts.buckets = buckets;
            }
        }
        Reading {
            at: Instant::now(),
            routes,
        }
    }

    /// Takes a reading and forgets those older than the window.
    fn record(&self) {
        let reading = self.read();
        let mut readings = self.readings.lock().unwrap_or_else(|p| p.into_inner());
        while readings
            .front()
            .is_some_and(|r| reading.at.duration_since(r.at) > WINDOW + EVERY)
        {
            readings.pop_front();
        }
        readings.push_back(reading);
    }

    /// Reads the counters every `EVERY` until `stop`.
    pub async fn run_until(self: Arc<Self>, stop: CancellationToken) {
        loop {
            self.record();
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(EVERY) => {}
            }
        }
    }

    /// The `/status` document for `runtime`, with `reloads` as the
    /// reloader tells them.
    pub fn status(&self, runtime: &Runtime, reloads: Value) -> Value {
        let now = self.read();
        let readings: Vec<Reading> = {
            let kept = self.readings.lock().unwrap_or_else(|p| p.into_inner());
            kept.iter()
                .filter(|r| now.at.duration_since(r.at) <= WINDOW)
                .cloned()
                .collect()
        };
        // Before the first reading, the window starts at zero, at start.
        let base = readings.first().cloned().unwrap_or_else(|| Reading {
            at: self.started,
            routes: BTreeMap::new(),
        });
        let seconds = now.at.duration_since(base.at).as_secs_f64().max(0.001);
        let mut names: Vec<String> = runtime
            .router
            .routes()
            .iter()
            .map(|r| r.name.to_string())
            .collect();
        if now.routes.contains_key("-") {
            names.push("-".to_string());
        }
        let empty = RouteCounts::default();
        let routes: Vec<Value> = names
            .iter()
            .map(|name| {
                let current = now.routes.get(name).unwrap_or(&empty);
                let before = base.routes.get(name).unwrap_or(&empty);
                let requests = current.requests.saturating_sub(before.requests);
                let errors = current.errors.saturating_sub(before.errors);
                let mut series: Vec<f64> = readings
                    .iter()
                    .chain(std::iter::once(&now))
                    .collect::<Vec<_>>()
                    .windows(2)
                    .map(|w| {
                        let count = |r: &Reading| r.routes.get(name).map_or(0, |c| c.requests);
                        let dt = w[1].at.duration_since(w[0].at).as_secs_f64().max(0.001);
                        round2(count(w[1]).saturating_sub(count(w[0])) as f64 / dt)
                    })
                    .collect();
                let keep_from = series.len().saturating_sub(30);
                series.drain(..keep_from);
                json!({
                    "name": name,
                    "rate": round2(requests as f64 / seconds),
                    "error_share": if requests == 0 { 0.0 } else { round4(errors as f64 / requests as f64) },
                    "p50_ms": quantile_ms(before, current, 0.5),
                    "p99_ms": quantile_ms(before, current, 0.99),
                    "limited": current.limited.saturating_sub(before.limited),
                    "requests_total": current.requests,
                    "errors_total": current.errors,
                    "limited_total": current.limited,
                    "series": series,
                })
            })
            .collect();
        let upstreams: Vec<Value> = runtime
            .upstreams
            .values()
            .map(|u| {
                let targets: Vec<Value> = u
                    .target_states()
                    .into_iter()
                    .map(|t| json!({ "address": &*t.label, "state": t.state, "in_flight": t.in_flight }))
                    .collect();
                json!({ "name": &*u.name, "targets": targets })
            })
            .collect();
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": unix(self.started_wall),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "window_seconds": round2(seconds),
            "step_seconds": EVERY.as_secs(),
            "config": reloads,
            "routes": routes,
            "upstreams": upstreams,
        })
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// The `q` quantile of the durations counted between two readings, in ms,
/// interpolated within its bucket as Prometheus's `histogram_quantile`
/// does; `None` without a request.
fn quantile_ms(before: &RouteCounts, after: &RouteCounts, q: f64) -> Option<f64> {
    let delta: Vec<(f64, u64)> = after
        .buckets
        .iter()
        .map(|(bound, count)| {
            let was = before
                .buckets
                .iter()
                .find(|(b, _)| b == bound)
                .map_or(0, |(_, c)| *c);
            (*bound, count.saturating_sub(was))
        })
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for (bound, count) in &delta {
        if *count as f64 >= rank {
            if bound.is_infinite() {
                // Past the last finite bound: that bound is the best answer.
                return Some(round2(lower.0 * 1000.0));
            }
            let within = (*count - lower.1) as f64;
            let share = if within == 0.0 {
                1.0
            } else {
                (rank - lower.1 as f64) / within
            };
            return Some(round2((lower.0 + (bound - lower.0) * share) * 1000.0));
        }
        lower = (*bound, *count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(buckets: &[(f64, u64)]) -> RouteCounts {
        RouteCounts {
            buckets: buckets.to_vec(),
            ..RouteCounts::default()
        }
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_of_the_window() {
        let before = counts(&[(0.001, 10), (0.01, 10), (f64::INFINITY, 10)]);
        // In the window: 10 under 1ms, 10 between 1 and 10ms.
        let after = counts(&[(0.001, 20), (0.01, 30), (f64::INFINITY, 30)]);
        assert_eq!(quantile_ms(&before, &after, 0.5), Some(1.0));
        assert_eq!(quantile_ms(&before, &after, 0.99), Some(9.82));
        assert_eq!(quantile_ms(&after, &after, 0.5), None, "no request");
        let slow = counts(&[(0.001, 0), (0.01, 0), (f64::INFINITY, 4)]);
        assert_eq!(quantile_ms(&RouteCounts::default(), &slow, 0.5), Some(10.0));
    }
}
