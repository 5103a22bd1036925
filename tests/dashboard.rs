//! The dashboard end to end (SPEC section 9.2): `GET /status` against the
//! counters `/metrics` serves, and the page itself loaded in a real
//! headless Chromium, whose rendered DOM must show the routes, the numbers
//! of `/status` and an unhealthy target.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn setup() -> (Gateway, TestUpstream, TestUpstream) {
    let good = TestUpstream::named("good");
    let sick = TestUpstream::named("sick");
    sick.set_healthy(false);
    let body = format!(
        "upstreams:
  good: {{ targets: [{}] }}
  sick:
    targets: [{}]
    health_check: {{ path: /health, interval: 100ms, unhealthy_after: 1 }}
routes:
  - name: limited
    match: {{ path_prefix: /limited }}
    upstream: good
    rate_limit: {{ requests: 1, per: 1m }}
  - name: fails
    match: {{ path_prefix: /sick }}
    upstream: sick
  - name: main
    match: {{ path_prefix: / }}
    upstream: good
",
        good.addr, sick.addr
    );
    let gw = gateway(&body).start();
    (gw, good, sick)
}

fn status(gw: &Gateway) -> serde_json::Value {
    let (code, body) = admin(gw, "GET", "/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn route<'s>(s: &'s serde_json::Value, name: &str) -> &'s serde_json::Value {
    s["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no route {name} in {s}"))
}

#[test]
fn status_shows_what_metrics_count() {
    let (gw, _good, _sick) = setup();
    for _ in 0..7 {
        assert_eq!(client().get(gw.url("/x")).send().unwrap().status(), 200);
    }
    let limited: Vec<u16> = (0..3)
        .map(|_| {
            client()
                .get(gw.url("/limited"))
                .send()
                .unwrap()
                .status()
                .as_u16()
        })
        .collect();
    assert_eq!(limited, [200, 429, 429]);
    eventually(Duration::from_secs(5), "the sick target is marked", || {
        status(&gw)["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["name"] == "sick" && u["targets"][0]["state"] == "unhealthy")
    });
    assert_eq!(
        client().get(gw.url("/sick/x")).send().unwrap().status(),
        503
    );
    eventually(Duration::from_secs(5), "every request counted", || {
        route(&status(&gw), "fails")["requests_total"] == 1
    });
    let s = status(&gw);
    let (_, metrics) = admin(&gw, "GET", "/metrics");
    for (name, total, limited) in [("main", 7, 0), ("limited", 3, 2), ("fails", 1, 0)] {
        let r = route(&s, name);
        assert_eq!(r["requests_total"], total, "{name}: {r}");
        let counted = metric(
            &metrics,
            &format!("gatehouse_requests_total{{method=\"GET\",route=\"{name}\""),
        );
        assert_eq!(
            r["requests_total"].as_f64(),
            Some(counted),
            "{name} as /metrics counts it"
        );
        assert_eq!(r["limited_total"], limited, "{name}");
        assert!(r["rate"].as_f64().unwrap() > 0.0, "{name}: {r}");
        assert!(
            r["p50_ms"].as_f64().is_some() && r["p99_ms"].as_f64().is_some(),
            "{r}"
        );
        assert!(r["series"].is_array());
    }
    assert_eq!(route(&s, "fails")["error_share"], 1.0);
    assert_eq!(route(&s, "main")["error_share"], 0.0);
    assert_eq!(route(&s, "limited")["limited"], 2, "within the last minute");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["config"]["loaded_at"].as_u64().unwrap() > 0);
    assert!(s["config"]["last_reload"].is_null());
    // A refused reload is what the page shows next.
    std::fs::write(&gw.conf, "routes: [ { name: broken } ]\n").unwrap();
    assert_eq!(admin(&gw, "POST", "/reload").0, 400);
    let s = status(&gw);
    assert_eq!(s["config"]["last_reload"]["result"], "failure");
    assert!(!s["config"]["last_reload"]["notes"]
        .as_array()
        .unwrap()
        .is_empty());
}

/// Headless Chromium's DOM of `url` once its scripts have run.
fn rendered(url: &str) -> String {
    let Ok(found) = Command::new("chromium").arg("--version").output() else {
        panic!("chromium is missing: run scripts/install-deps.sh (Debian's chromium package)");
    };
    assert!(
        found.status.success(),
        "chromium does not start: run scripts/install-deps.sh"
    );
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_page_in_a_real_browser_shows_routes_numbers_and_an_unhealthy_target() {
    let (gw, _good, _sick) = setup();
    for _ in 0..5 {
        client().get(gw.url("/x")).send().unwrap();
    }
    eventually(Duration::from_secs(5), "the sick target is marked", || {
        status(&gw)["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["name"] == "sick" && u["targets"][0]["state"] == "unhealthy")
    });
    eventually(Duration::from_secs(5), "counted", || {
        route(&status(&gw), "main")["requests_total"] == 5
    });
    let (code, page) = admin(&gw, "GET", "/");
    assert_eq!(code, 200);
    // Nothing from elsewhere: no script, style, font or image to fetch.
    for outside in ["<script src", "<link", "@import", "url("] {
        assert!(!page.contains(outside), "the page loads {outside}");
    }
    assert!(page
        .match_indices("http")
        .all(|(i, _)| page[i..].starts_with("http://www.w3.org/2000/svg")));
    let dom = rendered(&format!("http://{}/", gw.admin));
    let s = status(&gw);
    for name in ["main", "limited", "fails"] {
        assert!(
            dom.contains(&format!("data-route=\"{name}\"")),
            "{name} missing:\n{dom}"
        );
    }
    let total = route(&s, "main")["requests_total"].as_u64().unwrap();
    assert!(
        dom.contains(&format!(
            "<td class=\"total\" data-total=\"{total}\">{total}</td>"
        )),
        "main's total {total} missing:\n{dom}"
    );
    let sick = s["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "sick")
        .unwrap()["targets"][0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        dom.contains(&format!(
            "class=\"target unhealthy\" data-address=\"{sick}\" data-state=\"unhealthy\""
        )),
        "the unhealthy target is not shown as such:\n{dom}"
    );
    assert!(dom.contains("class=\"target healthy\""), "{dom}");
    assert!(
        dom.contains(&format!(">{}<", env!("CARGO_PKG_VERSION"))),
        "{dom}"
    );
}
