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

struct Setup {
    gw: Gateway,
    _good: TestUpstream,
    sick: TestUpstream,
    /// Answers 500: ejected by outlier detection after its second failure.
    bad: TestUpstream,
    fine: TestUpstream,
}

fn setup(admin: Option<&str>) -> Setup {
    let good = TestUpstream::named("good");
    let sick = TestUpstream::named("sick");
    sick.set_healthy(false);
    let bad = TestUpstream::with_handler("bad", |_| Reply::text(500, "bad"));
    let fine = TestUpstream::named("fine");
    let body = format!(
        "upstreams:
  good: {{ targets: [{}] }}
  sick:
    targets: [{}]
    health_check: {{ path: /health, interval: 100ms, unhealthy_after: 1 }}
  flaky:
    targets: [{}, {}]
    outlier: {{ consecutive_failures: 2, eject_for: 60s, max_ejected: 50% }}
routes:
  - name: limited
    match: {{ path_prefix: /limited }}
    upstream: good
    rate_limit: {{ requests: 1, per: 1m }}
  - name: fails
    match: {{ path_prefix: /sick }}
    upstream: sick
  - name: flaky
    match: {{ path_prefix: /flaky }}
    upstream: flaky
  - name: main
    match: {{ path_prefix: / }}
    upstream: good
",
        good.addr, sick.addr, bad.addr, fine.addr
    );
    let mut gw = gateway(&body);
    if let Some(token) = admin {
        gw = gw.env("ADMIN_TOKEN", token).admin("token: ${ADMIN_TOKEN}");
    }
    Setup {
        gw: gw.start(),
        _good: good,
        sick,
        bad,
        fine,
    }
}

/// The traffic both tests read back: 7 requests to `main`, 3 to `limited`
/// (2 refused), 1 to `fails` (no healthy target: 503) and 10 to `flaky`
/// (its bad target's 2 answers of 500 eject it). Done once this returns:
/// `/status` has counted every request and shows the ejection.
fn drive(s: &Setup) {
    let gw = &s.gw;
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
        target_state(&status(gw), &s.sick) == "unhealthy"
    });
    assert_eq!(
        client().get(gw.url("/sick/x")).send().unwrap().status(),
        503
    );
    let failed = (0..10)
        .filter(|_| client().get(gw.url("/flaky/x")).send().unwrap().status() == 500)
        .count();
    assert_eq!(failed, 2, "ejected after its second consecutive failure");
    assert_eq!(s.bad.count(), 2);
    eventually(Duration::from_secs(5), "every request counted", || {
        let st = status(gw);
        route(&st, "flaky")["requests_total"] == 10
            && route(&st, "fails")["requests_total"] == 1
            && target_state(&st, &s.bad) == "ejected"
    });
}

/// The state `/status` gives `target`.
fn target_state(s: &serde_json::Value, target: &TestUpstream) -> String {
    let address = target.addr.to_string();
    s["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|u| u["targets"].as_array().unwrap())
        .find(|t| t["address"] == address.as_str())
        .unwrap_or_else(|| panic!("no target {address} in {s}"))["state"]
        .as_str()
        .unwrap()
        .to_string()
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
    let setup = setup(None);
    drive(&setup);
    let gw = &setup.gw;
    let s = status(gw);
    let (_, metrics) = admin(gw, "GET", "/metrics");
    for (name, total, errors, limited) in [
        ("main", 7, 0, 0),
        ("limited", 3, 0, 2),
        ("fails", 1, 1, 0),
        ("flaky", 10, 2, 0),
    ] {
        let r = route(&s, name);
        assert_eq!(r["requests_total"], total, "{name}: {r}");
        assert_eq!(r["errors_total"], errors, "{name}: {r}");
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
        assert_eq!(r["limited"], limited, "{name}: within the last minute");
        assert!(r["rate"].as_f64().unwrap() > 0.0, "{name}: {r}");
        assert!(
            r["p50_ms"].as_f64().is_some() && r["p99_ms"].as_f64().is_some(),
            "{r}"
        );
        assert!(r["series"].is_array());
    }
    assert_eq!(route(&s, "fails")["error_share"], 1.0);
    assert_eq!(route(&s, "flaky")["error_share"], 0.2);
    assert_eq!(route(&s, "main")["error_share"], 0.0);
    // Each target's state: failing its health check, ejected by outlier
    // detection (as `/metrics` has it: not healthy), or healthy.
    assert_eq!(target_state(&s, &setup.sick), "unhealthy");
    assert_eq!(target_state(&s, &setup.bad), "ejected");
    assert_eq!(target_state(&s, &setup.fine), "healthy");
    let bad = format!("target=\"{}\",upstream=\"flaky\"", setup.bad.addr);
    assert_eq!(
        metric(
            &metrics,
            &format!("gatehouse_upstream_ejections_total{{{bad}}}")
        ),
        1.0
    );
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["config"]["loaded_at"].as_u64().unwrap() > 0);
    assert!(s["config"]["last_reload"].is_null());
    // A refused reload is what the page shows next.
    std::fs::write(&gw.conf, "routes: [ { name: broken } ]\n").unwrap();
    assert_eq!(admin(gw, "POST", "/reload").0, 400);
    let s = status(gw);
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

/// The `<tr>` the page drew for `name`.
fn row<'d>(dom: &'d str, name: &str) -> &'d str {
    let start = dom
        .find(&format!("<tr class=\"route\" data-route=\"{name}\">"))
        .unwrap_or_else(|| panic!("no row for {name}:\n{dom}"));
    let end = dom[start..].find("</tr>").unwrap();
    &dom[start..start + end]
}

/// A cell of `row`: its whole class attribute, its other attributes, and
/// its text.
fn cell<'r>(row: &'r str, class: &str) -> (&'r str, &'r str, &'r str) {
    let start = row
        .find(&format!("<td class=\"{class}"))
        .unwrap_or_else(|| panic!("no {class} cell in {row}"));
    let open = &row[start + "<td class=\"".len()..];
    let (classes, rest) = open.split_once('"').unwrap();
    let (attributes, rest) = rest.split_once('>').unwrap();
    let text = rest.split_once("</td>").unwrap().0;
    (classes, attributes.trim(), text)
}

/// A number as the page writes it: JavaScript's `toFixed(digits)`, or a
/// dash for none.
fn fixed(x: &serde_json::Value, digits: usize) -> String {
    match x.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "–".to_string(),
    }
}

/// Text as the DOM serializer writes it.
fn escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[test]
fn the_page_in_a_real_browser_shows_the_numbers_of_status_and_each_target_state() {
    let setup = setup(None);
    drive(&setup);
    let gw = &setup.gw;
    // A refused reload: the page shows the result and its errors.
    std::fs::write(&gw.conf, "routes: [ { name: broken } ]\n").unwrap();
    assert_eq!(admin(gw, "POST", "/reload").0, 400);
    let (code, page) = admin(gw, "GET", "/");
    assert_eq!(code, 200);
    // Nothing from elsewhere: no script, style, font or image to fetch.
    for outside in ["<script src", "<link", "@import", "url("] {
        assert!(!page.contains(outside), "the page loads {outside}");
    }
    assert!(page
        .match_indices("http")
        .all(|(i, _)| page[i..].starts_with("http://www.w3.org/2000/svg")));
    // No request arrives any more, so each figure but the rate stays as
    // it is for the minute; the rate only falls as the window grows, so
    // the page's lies between the readings before and after it.
    let before = status(gw);
    let dom = rendered(&format!("http://{}/", gw.admin));
    let after = status(gw);
    for name in ["main", "limited", "fails", "flaky"] {
        let (was, now) = (route(&before, name), route(&after, name));
        for stable in [
            "error_share",
            "p50_ms",
            "p99_ms",
            "limited",
            "requests_total",
        ] {
            assert_eq!(was[stable], now[stable], "{name}'s {stable} moved");
        }
        let row = row(&dom, name);
        let (_, _, rate) = cell(row, "rate");
        assert_eq!(
            rate,
            fixed(&rate.parse::<f64>().unwrap().into(), 2),
            "{row}"
        );
        let rate: f64 = rate.parse().unwrap();
        assert!(
            rate > 0.0
                && rate <= was["rate"].as_f64().unwrap()
                && rate >= now["rate"].as_f64().unwrap(),
            "{name}: the page's rate {rate} is not between {} and {}",
            was["rate"],
            now["rate"]
        );
        let share = now["error_share"].as_f64().unwrap();
        let (classes, _, errors) = cell(row, "errors");
        assert_eq!(errors, format!("{:.1}%", share * 100.0), "{name}: {row}");
        assert_eq!(classes == "errors high", share > 0.01, "{name}: {row}");
        assert_eq!(
            cell(row, "p50").2,
            fixed(&now["p50_ms"], 2),
            "{name}: {row}"
        );
        assert_eq!(
            cell(row, "p99").2,
            fixed(&now["p99_ms"], 2),
            "{name}: {row}"
        );
        let (_, attributes, limited) = cell(row, "limited");
        assert_eq!(limited, now["limited"].to_string(), "{name}: {row}");
        assert_eq!(
            attributes,
            format!("data-total=\"{}\"", now["limited_total"]),
            "{name}: {row}"
        );
        let total = now["requests_total"].to_string();
        assert_eq!(cell(row, "total").2, total, "{name}: {row}");
    }
    // The figures the traffic made, as the page writes them.
    let flaky = row(&dom, "flaky");
    assert_eq!(cell(flaky, "errors"), ("errors high", "", "20.0%"));
    assert_eq!(cell(row(&dom, "fails"), "errors").2, "100.0%");
    assert_eq!(cell(row(&dom, "main"), "errors"), ("errors", "", "0.0%"));
    assert_eq!(cell(row(&dom, "limited"), "limited").2, "2");
    // Each target with its state as its class (its colour).
    for (target, state) in [
        (&setup.sick, "unhealthy"),
        (&setup.bad, "ejected"),
        (&setup.fine, "healthy"),
    ] {
        assert_eq!(target_state(&after, target), state);
        let shown = format!(
            "class=\"target {state}\" data-address=\"{}\" data-state=\"{state}\"",
            target.addr
        );
        assert!(dom.contains(&shown), "{shown} missing:\n{dom}");
    }
    // The last reload: refused, with its errors.
    let last = &after["config"]["last_reload"];
    assert_eq!(last["result"], "failure");
    assert!(
        dom.contains("class=\"reload failure\" data-result=\"failure\""),
        "{dom}"
    );
    let notes = last["notes"].as_array().unwrap();
    assert!(!notes.is_empty());
    for note in notes {
        let note = format!("<li>{}</li>", escaped(note.as_str().unwrap()));
        assert!(dom.contains(&note), "{note} missing:\n{dom}");
    }
    assert!(
        dom.contains(&format!(">{}<", env!("CARGO_PKG_VERSION"))),
        "{dom}"
    );
    assert!(
        dom.contains("<p id=\"problem\" hidden=\"\">"),
        "the page reports a problem:\n{dom}"
    );
}

/// The README's screenshot command: with `admin.token`, Chromium opens
/// the page with the token as the password in the URL, and the page's own
/// requests for `/status` carry it too.
#[test]
fn a_browser_opens_the_page_with_the_token_in_its_url() {
    const TOKEN: &str = "dashboard-token-0123456789";
    let setup = setup(Some(TOKEN));
    let gw = &setup.gw;
    for _ in 0..3 {
        assert_eq!(client().get(gw.url("/x")).send().unwrap().status(), 200);
    }
    let dom = rendered(&format!("http://any:{TOKEN}@{}/", gw.admin));
    assert_eq!(cell(row(&dom, "main"), "total").2, "3", "{dom}");
    assert!(dom.contains("<p id=\"problem\" hidden=\"\">"), "{dom}");
    let refused = rendered(&format!("http://{}/", gw.admin));
    assert!(!refused.contains("data-route"), "{refused}");
}
