//! Operating gatehouse: metrics after known traffic, readiness, the access
//! log, hot reload (API and SIGHUP, under load), zero-downtime upgrade,
//! graceful shutdown and `gatehouse route`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn body_with(up: &TestUpstream, extra_routes: &str) -> String {
    [
        format!("upstreams:\n  app:\n    targets: [{}]\n    health_check: {{ path: /health, interval: 100ms, unhealthy_after: 1 }}\n", up.addr),
        common::jwt::rs256_provider("main"),
        "cache:\n  max_size: 1MiB\n".to_string(),
        "routes:\n".to_string(),
        "  - name: r\n    match: { path_prefix: /r }\n    upstream: app\n".to_string(),
        "  - name: limited\n    match: { path_prefix: /limited }\n    upstream: app\n    rate_limit: { requests: 1, per: 1m }\n".to_string(),
        "  - name: private\n    match: { path_prefix: /private }\n    upstream: app\n    auth: main\n    cache: { ttl: 1m }\n".to_string(),
        extra_routes.to_string(),
    ]
    .concat()
}

#[test]
fn metrics_after_known_traffic() {
    let up = TestUpstream::named("app");
    let gw = gateway(&body_with(&up, "")).start();
    let c = client();
    for _ in 0..3 {
        assert_eq!(c.get(gw.url("/r/x")).send().unwrap().status(), 200);
    }
    assert_eq!(c.post(gw.url("/nowhere")).send().unwrap().status(), 404);
    assert_eq!(c.get(gw.url("/limited")).send().unwrap().status(), 200);
    assert_eq!(c.get(gw.url("/limited")).send().unwrap().status(), 429);
    assert_eq!(c.get(gw.url("/private")).send().unwrap().status(), 401);
    let token = jwt::rs256_token("u");
    for _ in 0..2 {
        c.get(gw.url("/private"))
            .bearer_auth(&token)
            .send()
            .unwrap();
    }
    let t = up.addr.to_string();
    let expect = [
        ("gatehouse_requests_total{method=\"GET\",route=\"r\",status=\"200\"}".to_string(), 3.0),
        ("gatehouse_requests_total{method=\"POST\",route=\"-\",status=\"404\"}".to_string(), 1.0),
        ("gatehouse_requests_total{method=\"GET\",route=\"limited\",status=\"429\"}".to_string(), 1.0),
        ("gatehouse_request_duration_seconds_count{route=\"r\"}".to_string(), 3.0),
        (format!("gatehouse_upstream_requests_total{{outcome=\"success\",target=\"{t}\",upstream=\"app\"}}"), 5.0),
        (format!("gatehouse_upstream_healthy{{target=\"{t}\",upstream=\"app\"}}"), 1.0),
        ("gatehouse_rate_limited_total{route=\"limited\"}".to_string(), 1.0),
        ("gatehouse_auth_failures_total{reason=\"missing_token\",route=\"private\"}".to_string(), 1.0),
        ("gatehouse_cache_requests_total{result=\"miss\",route=\"private\"}".to_string(), 1.0),
        ("gatehouse_cache_requests_total{result=\"hit\",route=\"private\"}".to_string(), 1.0),
        ("gatehouse_cache_requests_total{result=\"bypass\",route=\"private\"}".to_string(), 1.0),
    ];
    // A request is counted when Pingora's logging phase runs, just after
    // the client has its response: wait for the last ones to land.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (status, text) = loop {
        let (status, text) = admin(&gw, "GET", "/metrics");
        let all_counted = expect.iter().all(|(l, v)| metric(&text, l) == Some(*v));
        if all_counted || std::time::Instant::now() > deadline {
            break (status, text);
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    assert_eq!(status, 200);
    for (line, value) in &expect {
        assert_eq!(metric(&text, line), Some(*value), "{line}\n{text}");
    }
    // Labels are names, never raw paths.
    assert!(!text.contains("/r/x") && !text.contains("/nowhere"));
    assert_eq!(admin(&gw, "POST", "/reload").0, 200);
    let (_, text) = admin(&gw, "GET", "/metrics");
    assert_eq!(
        metric(&text, "gatehouse_config_reloads_total{result=\"success\"}"),
        Some(1.0)
    );
    // What a Prometheus user expects besides ours: the process family, of
    // this very process, and the version.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        metric(
            &text,
            &format!("gatehouse_build_info{{version=\"{version}\"}}")
        ),
        Some(1.0)
    );
    let rss = metric(&text, "process_resident_memory_bytes").unwrap();
    assert!(rss > 1e6 && rss < 1e9, "{rss}");
    assert!(metric(&text, "process_cpu_seconds_total").is_some());
    assert!(metric(&text, "process_open_fds").is_some_and(|n| n > 3.0));
    let started = metric(&text, "process_start_time_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        now - started < 600.0 && now >= started,
        "{started} vs {now}"
    );
    promtool_check_metrics(&text);
}

/// `promtool check metrics`: what Prometheus's own linter says of the text
/// (names, units, help, types); silent and successful when all is well.
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is not installed ({e}): run scripts/install-deps.sh (it installs Debian's prometheus, which ships promtool)"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );
}

/// With the kernel's transparent huge pages on, the allocator's regions would
/// fault in 2 MiB at a time and double the resident set; the gateway turns
/// them off for itself at start.
#[cfg(target_os = "linux")]
#[test]
fn the_gateway_runs_without_transparent_huge_pages() {
    let up = TestUpstream::named("app");
    let gw = gateway(&body_with(&up, "")).start();
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.child.id())).unwrap();
    let thp = status.lines().find(|l| l.starts_with("THP_enabled:"));
    assert_eq!(
        thp.map(|l| l.split_whitespace().nth(1)),
        Some(Some("0")),
        "{status}"
    );
}

#[test]
fn readyz_follows_target_health() {
    let mut up = TestUpstream::named("app");
    let gw = gateway(&body_with(&up, "")).start();
    eventually(Duration::from_secs(5), "ready", || {
        admin(&gw, "GET", "/readyz").0 == 200
    });
    up.stop();
    eventually(Duration::from_secs(5), "not ready", || {
        admin(&gw, "GET", "/readyz").0 == 503
    });
    let (_, body) = admin(&gw, "GET", "/readyz");
    assert!(
        body.contains("upstream app has no healthy target"),
        "{body}"
    );
    assert!(!body.contains("127.0.0.1"), "{body}");
    let gauge = format!(
        "gatehouse_upstream_healthy{{target=\"{}\",upstream=\"app\"}}",
        up.addr
    );
    eventually(Duration::from_secs(3), "the health gauge drops", || {
        metric(&admin(&gw, "GET", "/metrics").1, &gauge) == Some(0.0)
    });
}

#[test]
fn the_access_log_has_a_line_per_request_with_every_field() {
    let up = TestUpstream::named("app");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let body = format!("access_log: {}\n{}", log.display(), body_with(&up, ""));
    let gw = gateway(&body).start();
    let token = jwt::rs256_token("ann");
    let c = client();
    c.get(gw.url("/r/a?secret=1"))
        .header("X-Request-Id", "log-1")
        .send()
        .unwrap();
    c.get(gw.url("/private/x"))
        .bearer_auth(&token)
        .header("X-Request-Id", "log-2")
        .send()
        .unwrap();
    c.get(gw.url("/nowhere"))
        .header("X-Request-Id", "log-3")
        .send()
        .unwrap();
    let mut lines = Vec::new();
    eventually(Duration::from_secs(5), "three log lines", || {
        lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        lines.len() >= 3
    });
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for e in &entries {
        for field in [
            "ts",
            "request_id",
            "client",
            "method",
            "path",
            "route",
            "upstream",
            "target",
            "status",
            "duration_ms",
            "bytes_sent",
            "cache",
            "user",
        ] {
            assert!(e.get(field).is_some(), "{field} missing in {e}");
        }
    }
    let first = entries.iter().find(|e| e["request_id"] == "log-1").unwrap();
    assert_eq!(first["path"], "/r/a");
    assert_eq!(first["route"], "r");
    assert_eq!(first["upstream"], "app");
    assert_eq!(first["target"], up.addr.to_string());
    assert_eq!(first["status"], 200);
    assert_eq!(first["client"], "127.0.0.1");
    let second = entries.iter().find(|e| e["request_id"] == "log-2").unwrap();
    assert_eq!(second["user"], "ann");
    assert_eq!(second["cache"], "MISS");
    let third = entries.iter().find(|e| e["request_id"] == "log-3").unwrap();
    assert_eq!(third["route"], "-");
    assert_eq!(third["status"], 404);
    let all = lines.join("\n");
    assert!(
        !all.contains(&token) && !all.contains("secret=1"),
        "a token or query reached the log"
    );
}

#[test]
fn the_access_log_keeps_its_last_lines_when_the_gateway_stops() {
    let up = TestUpstream::named("app");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let body = format!("access_log: {}\n{}", log.display(), body_with(&up, ""));
    let mut gw = gateway(&body).start();
    let c = client();
    for i in 0..20 {
        let resp = c
            .get(gw.url("/r/x"))
            .header("X-Request-Id", format!("last-{i}"))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // A fast shutdown, right after the answers: lines still waiting for the
    // writer's next batch must reach the file before the process ends.
    signal(gw.child.id(), "INT");
    eventually(Duration::from_secs(10), "the gateway to exit", || {
        gw.child.try_wait().unwrap().is_some()
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let ids: Vec<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["request_id"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    for i in 0..20 {
        assert!(
            ids.contains(&format!("last-{i}")),
            "line for last-{i} lost at shutdown: {ids:?}"
        );
    }
}

#[test]
fn a_reload_says_what_only_an_upgrade_changes() {
    let up = TestUpstream::named("app");
    let gw = gateway(&body_with(&up, "")).start();
    let original = std::fs::read_to_string(&gw.conf).unwrap();
    let resized = format!(
        "access_log: off\n{}",
        original.replace("max_size: 1MiB", "max_size: 2MiB")
    );
    std::fs::write(&gw.conf, &resized).unwrap();
    let (status, body) = admin(&gw, "POST", "/reload");
    assert_eq!(status, 200, "{body}");
    for section in ["access_log", "cache.max_size"] {
        let note = format!("{section}: changes only by an upgrade");
        assert!(body.contains(&note), "{body}");
    }
    assert!(
        !body.contains("listen:") && !body.contains("server:"),
        "{body}"
    );
}

#[test]
fn reload_by_api_and_sighup_and_a_bad_file_changes_nothing() {
    let up = TestUpstream::named("app");
    let gw = gateway(&body_with(&up, "")).start();
    let c = client();
    assert_eq!(c.get(gw.url("/added")).send().unwrap().status(), 404);
    let original = std::fs::read_to_string(&gw.conf).unwrap();

    // A new route, by the API.
    let added = format!(
        "{original}  - name: added\n    match: {{ path_prefix: /added }}\n    upstream: app\n"
    );
    std::fs::write(&gw.conf, &added).unwrap();
    let (status, body) = admin(&gw, "POST", "/reload");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"routes\":4"), "{body}");
    assert!(body.contains("\"ignored\":[]"), "{body}");
    assert_eq!(c.get(gw.url("/added")).send().unwrap().status(), 200);

    // A broken file: 400 with the errors; the running config keeps serving.
    std::fs::write(
        &gw.conf,
        format!("{added}  - name: broken\n    match: {{ path: /b }}\n    upstream: nowhere\n"),
    )
    .unwrap();
    let (status, body) = admin(&gw, "POST", "/reload");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown upstream \\\"nowhere\\\""), "{body}");
    assert_eq!(c.get(gw.url("/added")).send().unwrap().status(), 200);
    assert!(gw.log_text().contains("reload refused"));

    // SIGHUP.
    let another =
        format!("{added}  - name: hup\n    match: {{ path_prefix: /hup }}\n    upstream: app\n");
    std::fs::write(&gw.conf, &another).unwrap();
    signal(gw.child.id(), "HUP");
    eventually(Duration::from_secs(5), "the SIGHUP reload", || {
        c.get(gw.url("/hup")).send().unwrap().status() == 200
    });
    let (_, text) = admin(&gw, "GET", "/metrics");
    assert_eq!(
        metric(&text, "gatehouse_config_reloads_total{result=\"success\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "gatehouse_config_reloads_total{result=\"failure\"}"),
        Some(1.0)
    );
}

#[test]
fn budgets_and_cache_entries_of_unchanged_routes_survive_a_reload() {
    let up = TestUpstream::named("app");
    let gw = gateway(&body_with(&up, "")).start();
    let c = client();
    let token = jwt::rs256_token("u");
    assert_eq!(c.get(gw.url("/limited")).send().unwrap().status(), 200);
    assert_eq!(
        c.get(gw.url("/private"))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .headers()["x-cache"],
        "MISS"
    );
    let original = std::fs::read_to_string(&gw.conf).unwrap();
    std::fs::write(
        &gw.conf,
        format!(
            "{original}  - name: other\n    match: {{ path_prefix: /other }}\n    upstream: app\n"
        ),
    )
    .unwrap();
    assert_eq!(admin(&gw, "POST", "/reload").0, 200);
    assert_eq!(
        c.get(gw.url("/limited")).send().unwrap().status(),
        429,
        "the budget was reset"
    );
    assert_eq!(
        c.get(gw.url("/private"))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .headers()["x-cache"],
        "HIT"
    );
}

#[test]
fn ten_reloads_under_load_fail_no_request() {
    let up = TestUpstream::named("app");
    let gw = gateway(&body_with(&up, "")).start();
    let original = std::fs::read_to_string(&gw.conf).unwrap();
    let variant = format!(
        "{original}  - name: extra\n    match: {{ path_prefix: /extra }}\n    upstream: app\n"
    );
    let load = Load::start(gw.addr, "/r/load", 2, 2);
    for i in 0..10 {
        std::fs::write(&gw.conf, if i % 2 == 0 { &variant } else { &original }).unwrap();
        let (status, body) = admin(&gw, "POST", "/reload");
        assert_eq!(status, 200, "{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, failures) = load.stop();
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests");
}

#[test]
fn an_upgrade_under_load_fails_no_request_and_the_old_process_leaves() {
    let up = TestUpstream::named("app");
    let mut old = gateway(&body_with(&up, "")).start();
    let load = Load::start(old.addr, "/r/upgrade", 2, 2);
    std::thread::sleep(Duration::from_millis(300));
    let (mut new, gone) = upgrade(&mut old);
    // Keep the load on the new process a little longer.
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failures) = load.stop();
    let new_log = std::fs::read_to_string(old.dir.path().join("new.log")).unwrap_or_default();
    assert!(gone, "the old process did not exit\n{}", old.log_text());
    assert!(
        failures.is_empty(),
        "{} failures: {:?}\nnew: {new_log}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests");
    // The new process serves on the same port.
    assert_eq!(
        client().get(old.url("/r/after")).send().unwrap().status(),
        200
    );
    assert!(
        new.0.try_wait().unwrap().is_none(),
        "the new process died:\n{new_log}"
    );
    old.child = Command::new("true").spawn().unwrap();
    let _ = &mut new;
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits() {
    let up = TestUpstream::with_handler("slow", |_| {
        Reply::text(200, "done").delayed(Duration::from_millis(800))
    });
    let mut gw = gateway(&body_with(&up, "")).start();
    let url = gw.url("/r/slow");
    let in_flight = std::thread::spawn(move || {
        client()
            .get(url)
            .send()
            .map(|r| (r.status().as_u16(), r.text().unwrap()))
    });
    eventually(
        Duration::from_secs(5),
        "the request reached the upstream",
        || up.count() == 1,
    );
    let t = Instant::now();
    signal(gw.child.id(), "TERM");
    let (status, body) = in_flight.join().unwrap().unwrap();
    assert_eq!((status, body.as_str()), (200, "done"));
    loop {
        if let Ok(Some(_)) = gw.child.try_wait() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "not gone within grace_period + graceful_shutdown_timeout"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn route_cli(conf: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("route")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn route_explains_the_choice() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("g.yaml");
    let yaml = [
        "listen: [127.0.0.1:8080]\n".to_string(),
        "upstreams:\n  users:\n    targets: [127.0.0.1:9001, { address: 127.0.0.1:9002, weight: 2 }]\n".to_string(),
        common::jwt::rs256_provider("main"),
        "routes:\n".to_string(),
        "  - name: me\n    match: { path: /v1/users/me }\n    upstream: users\n".to_string(),
        "  - name: users-v2\n    match: { path_prefix: /v1/users, headers: { Api-Version: \"2\" } }\n    upstream: users\n".to_string(),
        "  - name: users\n    match: { path_prefix: /v1/users, methods: [GET], host: api.example.com }\n    upstream: users\n".to_string(),
        "    strip_prefix: /v1\n    add_prefix: /api\n    auth: { jwt: main, require_scopes: [users:read] }\n".to_string(),
        "    rate_limit: { requests: 100, per: 1m }\n    cache: { ttl: 30s, vary: [Accept-Language] }\n".to_string(),
    ]
    .concat();
    std::fs::write(&conf, yaml).unwrap();
    let (code, out) = route_cli(&conf, &["GET", "http://api.example.com/v1/users/7?x=1"]);
    assert_eq!(code, 0, "{out}");
    for expected in [
        "route: users",
        "matches path_prefix /v1/users",
        "matches methods GET",
        "matches host api.example.com",
        "me: path /v1/users/me does not match",
        "upstream: users -> 127.0.0.1:9001, 127.0.0.1:9002 (weight 2)",
        "forwarded as: /api/users/7?x=1",
        "auth: jwt main; require_scopes users:read",
        "rate limit: 100 per 60s by ip",
        "cache: ttl 30s, vary accept-language",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    let (code, out) = route_cli(&conf, &["GET", "/v1/users/7", "-H", "Api-Version: 2"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("route: users-v2"), "{out}");
    assert!(
        out.contains("users: host api.example.com does not match"),
        "{out}"
    );
    // The host is taken as the proxy takes it, without the port.
    let (code, out) = route_cli(
        &conf,
        &["GET", "/v1/users/7", "-H", "Host: api.example.com:8443"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("route: users\n"), "{out}");
    let (code, out) = route_cli(&conf, &["POST", "http://api.example.com/v1/users/7"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("no route matches") && out.contains("nearest routes:"),
        "{out}"
    );
    assert!(out.contains("users: methods GET"), "{out}");
    let (code, out) = route_cli(&conf, &["GET", "/../etc"]);
    assert_eq!(code, 1);
    assert!(out.contains("400"), "{out}");
    // Path parameters are refused as the proxy refuses them, or kept.
    let (code, out) = route_cli(
        &conf,
        &["GET", "http://api.example.com/v1/users;jsessionid=1/7"],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("refused with 400") && out.contains("; parameter"),
        "{out}"
    );
    let keep = std::fs::read_to_string(&conf)
        .unwrap()
        .replace("listen:", "server:\n  path_params: keep\nlisten:");
    std::fs::write(&conf, keep).unwrap();
    let (code, out) = route_cli(
        &conf,
        &["GET", "http://api.example.com/v1/users;jsessionid=1/7"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("route: users\n"), "{out}");
    assert!(
        out.contains("forwarded as: /api/users;jsessionid=1/7"),
        "{out}"
    );
}
