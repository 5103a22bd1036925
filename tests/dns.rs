//! Target names end to end (SPEC section 7.3), against the tests' own DNS
//! server (`server.resolver`): answers changing under a running gateway
//! (targets on 127.0.0.2 and 127.0.0.3), a dropped address drained, health
//! checks following each address, a failed lookup keeping the last
//! addresses, A and AAAA, and `-t` on names that do not resolve.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::dns::TestDns;
use common::*;

/// `a` on 127.0.0.2 (answering as `make_a` says) and `b` on 127.0.0.3,
/// on one port.
fn hosts_with(make_a: impl Fn(SocketAddr) -> TestUpstream) -> (TestUpstream, TestUpstream, u16) {
    loop {
        let a = make_a("127.0.0.2:0".parse().unwrap());
        let port = a.addr.port();
        let b_addr: SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
        if std::net::TcpListener::bind(b_addr).is_ok() {
            return (a, TestUpstream::named_at("b", b_addr), port);
        }
    }
}

fn two_hosts() -> (TestUpstream, TestUpstream, u16) {
    hosts_with(|addr| TestUpstream::named_at("a", addr))
}

fn start(dns: &TestDns, port: u16, extra: &str) -> Gateway {
    gateway(&config(port, extra))
        .server(&format!("resolver: '{}'", dns.addr))
        .start()
}

fn config(port: u16, extra: &str) -> String {
    format!(
        "upstreams:
  svc:
    targets: ['svc.test:{port}']
    resolve_interval: 100ms
    health_check: {{ path: /health, interval: 100ms }}
{extra}routes:
  - name: r
    match: {{ path_prefix: / }}
    upstream: svc
"
    )
}

fn served_by(gw: &Gateway, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|_| client().get(gw.url("/x")).send().unwrap().text().unwrap())
        .collect()
}

#[test]
fn changed_answers_change_the_targets_and_dropped_addresses_drain() {
    let (a, b, port) = two_hosts();
    let dns = TestDns::start();
    dns.set("svc.test", &["127.0.0.2"]);
    let gw = start(&dns, port, "");
    assert_eq!(served_by(&gw, 6), ["a".to_string()].into());

    // A new address is not trusted before it passes a health check.
    b.set_healthy(false);
    dns.set("svc.test", &["127.0.0.2", "127.0.0.3"]);
    eventually(Duration::from_secs(5), "b is checked", || {
        b.health_checks() >= 3
    });
    assert_eq!(
        served_by(&gw, 8),
        ["a".to_string()].into(),
        "b failing its checks"
    );
    b.set_healthy(true);
    eventually(Duration::from_secs(5), "b joins", || {
        served_by(&gw, 4).contains("b")
    });
    assert_eq!(served_by(&gw, 8), ["a".to_string(), "b".to_string()].into());
    // The new address is health-checked too.
    eventually(Duration::from_secs(5), "b is checked", || {
        b.health_checks() > 0
    });
    assert!(gw.log_text().contains("targets now"));

    dns.set("svc.test", &["127.0.0.3"]);
    eventually(Duration::from_secs(5), "only b", || {
        served_by(&gw, 6) == ["b".to_string()].into()
    });
    let a_before = a.count();
    assert_eq!(served_by(&gw, 10), ["b".to_string()].into());
    assert_eq!(a.count(), a_before, "a gets nothing once it left");

    // A failed lookup keeps the last addresses, and is counted.
    dns.fail("svc.test");
    let failures = || metric_sum(&gw, "gatehouse_dns_failures_total{upstream=\"svc\"}");
    eventually(Duration::from_secs(10), "failures counted", || {
        failures() >= 2.0
    });
    assert_eq!(served_by(&gw, 6), ["b".to_string()].into());
    assert!(gw.log_text().contains("keeping [127.0.0.3:"));
    // And recovers when the name answers again.
    dns.set("svc.test", &["127.0.0.2"]);
    eventually(Duration::from_secs(5), "back to a", || {
        served_by(&gw, 4) == ["a".to_string()].into()
    });
}

#[test]
fn a_dropped_address_finishes_its_requests() {
    let (slow, _b, port) = hosts_with(|addr| {
        TestUpstream::with_handler_at("slow-a", addr, |_| {
            Reply::text(200, "slow a").delayed(Duration::from_millis(1500))
        })
    });
    let dns = TestDns::start();
    dns.set("svc.test", &["127.0.0.2"]);
    let gw = start(&dns, port, "");
    let url = gw.url("/x");
    let pending = std::thread::spawn(move || {
        let r = client().get(&url).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    });
    eventually(Duration::from_secs(5), "the request reached a", || {
        slow.count() == 1
    });
    dns.set("svc.test", &["127.0.0.3"]);
    eventually(Duration::from_secs(5), "a left the targets", || {
        served_by(&gw, 2) == ["b".to_string()].into()
    });
    assert_eq!(
        pending.join().unwrap(),
        (200, "slow a".to_string()),
        "drained, not cut"
    );
}

#[test]
fn every_a_and_aaaa_record_is_a_target() {
    let dns = TestDns::start();
    dns.set("dual.test", &["127.0.0.2", "127.0.0.3", "::1"]);
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("g.yaml");
    let yaml = format!(
        "listen: [127.0.0.1:0]\nserver: {{ resolver: '{}' }}\nupstreams:\n  svc: {{ targets: ['dual.test:8080'] }}\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: svc\n",
        dns.addr
    );
    std::fs::write(&conf, yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["route", "-c"])
        .arg(&conf)
        .args(["GET", "/x"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("upstream: svc -> 127.0.0.2:8080, 127.0.0.3:8080, [::1]:8080"),
        "{text}"
    );
}

#[test]
fn names_that_do_not_resolve_fail_the_check_unless_allowed() {
    let dns = TestDns::start();
    dns.fail("broken.test");
    let base = |extra: &str| {
        format!(
            "listen: [127.0.0.1:0]\nserver: {{ resolver: '{}' }}\nupstreams:\n  svc: {{ targets: ['nowhere.test:80', 'broken.test:80']{extra} }}\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: svc\n",
            dns.addr
        )
    };
    let (code, _, stderr) = check_config(&base(""), &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("upstreams.svc.targets[0]") && stderr.contains("nowhere.test:80"),
        "{stderr}"
    );
    assert!(stderr.contains("upstreams.svc.targets[1]"), "{stderr}");
    assert!(stderr.contains("resolve_at_start: false"), "{stderr}");
    let (code, stdout, stderr) = check_config(&base(", resolve_at_start: false"), &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (code, _, stderr) = check_config(
        "listen: [127.0.0.1:0]\nserver: { resolver: 'dns.example' }\nupstreams:\n  svc: { targets: ['127.0.0.1:1'], resolve_interval: 0s }\nroutes:\n  - name: r\n    match: { path_prefix: / }\n    upstream: svc\n",
        &[],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("server.resolver"), "{stderr}");
    assert!(
        stderr.contains("upstreams.svc.resolve_interval"),
        "{stderr}"
    );
    assert!(dns.queries() > 0, "the configured server was asked");
}

#[test]
fn an_upstream_whose_name_is_unresolved_at_start_answers_once_it_resolves() {
    let (_a, b, port) = two_hosts();
    let dns = TestDns::start();
    let gw = start(&dns, port, "    resolve_at_start: false\n");
    let r = client().get(gw.url("/x")).send().unwrap();
    assert_problem(r, 503);
    dns.set("svc.test", &["127.0.0.3"]);
    eventually(Duration::from_secs(5), "b serves", || {
        client().get(gw.url("/x")).send().unwrap().status() == 200
    });
    assert!(b.count() >= 1);
}

#[test]
fn a_failing_aaaa_lookup_keeps_the_ipv6_targets() {
    let (a, v6, port) = loop {
        let (a, _b, port) = two_hosts();
        let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
        if std::net::TcpListener::bind(v6).is_ok() {
            break (a, TestUpstream::named_at("v6", v6), port);
        }
    };
    let dns = TestDns::start();
    dns.set("svc.test", &["127.0.0.2", "::1"]);
    let gw = start(&dns, port, "");
    let both: BTreeSet<String> = ["a".to_string(), "v6".to_string()].into();
    assert_eq!(served_by(&gw, 8), both);
    dns.fail_v6("svc.test", &["127.0.0.2"]);
    let failures = || metric_sum(&gw, "gatehouse_dns_failures_total{upstream=\"svc\"}");
    eventually(Duration::from_secs(10), "AAAA failures counted", || {
        failures() >= 3.0
    });
    assert_eq!(served_by(&gw, 8), both, "the IPv6 target stays");
    assert!(v6.count() > 0 && a.count() > 0);
}
