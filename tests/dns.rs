//! Target names end to end (SPEC section 7.3), against the tests' own DNS
//! server (`server.resolver`): answers changing under a running gateway
//! (targets on 127.0.0.2 and 127.0.0.3), a dropped address drained, health
//! checks and outlier state following each address, a failed lookup
//! keeping the last addresses, A and AAAA, a truncated UDP answer asked
//! again over TCP, and `-t` on names that do not resolve.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    start_with(dns.addr, port, extra)
}

fn start_with(resolver: SocketAddr, port: u16, extra: &str) -> Gateway {
    gateway(&config(port, extra))
        .server(&format!("resolver: '{resolver}'"))
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

/// A DNS server for one name on one port over UDP and TCP, behaving as a
/// server whose answer does not fit a datagram: over UDP only the first
/// record, with the TC bit set; over TCP every record. `common::dns` is
/// UDP only, so this is its own.
struct TruncatingDns {
    addr: SocketAddr,
    state: Arc<TruncatingState>,
    _runtime: tokio::runtime::Runtime,
}

struct TruncatingState {
    name: String,
    addrs: Mutex<Vec<IpAddr>>,
    udp_queries: AtomicUsize,
    tcp_queries: AtomicUsize,
}

impl TruncatingDns {
    fn start(name: &str, addrs: &[&str]) -> Self {
        // The resolver asks TCP on the port it asked UDP on.
        let (udp, tcp) = loop {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        udp.set_nonblocking(true).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let state = Arc::new(TruncatingState {
            name: format!("{name}."),
            addrs: Mutex::new(Vec::new()),
            udp_queries: AtomicUsize::new(0),
            tcp_queries: AtomicUsize::new(0),
        });
        let runtime = common::server_runtime();
        let st = Arc::clone(&state);
        runtime.spawn(async move {
            let socket = tokio::net::UdpSocket::from_std(udp).unwrap();
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                st.udp_queries.fetch_add(1, Ordering::SeqCst);
                if let Some(reply) = st.reply(&buf[..n], true) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        let st = Arc::clone(&state);
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(tcp).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve_dns_over_tcp(stream, Arc::clone(&st)));
            }
        });
        let dns = TruncatingDns {
            addr,
            state,
            _runtime: runtime,
        };
        dns.set(addrs);
        dns
    }

    fn set(&self, addrs: &[&str]) {
        *self.state.addrs.lock().unwrap() = addrs.iter().map(|a| a.parse().unwrap()).collect();
    }
}

impl TruncatingState {
    fn reply(&self, packet: &[u8], over_udp: bool) -> Option<Vec<u8>> {
        let query = Message::from_vec(packet).ok()?;
        let question = query.queries.first()?.clone();
        let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.metadata.authoritative = true;
        reply.add_query(question.clone());
        if !question.name().to_string().eq_ignore_ascii_case(&self.name) {
            reply.metadata.response_code = ResponseCode::NXDomain;
            return reply.to_vec().ok();
        }
        let records: Vec<Record> = self
            .addrs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|ip| match (ip, question.query_type()) {
                (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                _ => None,
            })
            .map(|data| Record::from_rdata(question.name().clone(), 1, data))
            .collect();
        // What did not fit is left out, and the TC bit says so.
        let shown = if over_udp {
            records.len().min(1)
        } else {
            records.len()
        };
        reply.metadata.truncation = over_udp;
        for record in records.into_iter().take(shown) {
            reply.add_answer(record);
        }
        reply.to_vec().ok()
    }
}

/// DNS over TCP: each message behind its two-byte length, several on one
/// connection.
async fn serve_dns_over_tcp(mut stream: tokio::net::TcpStream, st: Arc<TruncatingState>) {
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut packet = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut packet).await.is_err() {
            return;
        }
        st.tcp_queries.fetch_add(1, Ordering::SeqCst);
        let Some(reply) = st.reply(&packet, false) else {
            return;
        };
        let mut framed = u16::try_from(reply.len()).unwrap().to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

#[test]
fn a_truncated_udp_answer_is_asked_again_over_tcp() {
    let (_a, _b, port) = two_hosts();
    // Over UDP only 127.0.0.2 fits; 127.0.0.3 is in the TCP answer alone.
    let dns = TruncatingDns::start("svc.test", &["127.0.0.2", "127.0.0.3"]);
    let gw = start_with(dns.addr, port, "");
    let both: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
    assert_eq!(served_by(&gw, 8), both, "the load used the TCP answer");
    assert!(
        dns.state.udp_queries.load(Ordering::SeqCst) > 0,
        "UDP first"
    );
    assert!(dns.state.tcp_queries.load(Ordering::SeqCst) > 0);
    // The background refresh falls back to TCP too: from 127.0.0.2 alone
    // to both, a change the UDP answer (127.0.0.2 first) does not show.
    dns.set(&["127.0.0.2"]);
    eventually(Duration::from_secs(5), "only a", || {
        served_by(&gw, 6) == ["a".to_string()].into()
    });
    dns.set(&["127.0.0.2", "127.0.0.3"]);
    eventually(Duration::from_secs(5), "b back", || {
        served_by(&gw, 8) == both
    });
}

/// Upstreams named `names[i]` on 127.0.0.(2+i), one port; the first
/// answers 503 while the flag returned is set.
fn failing_first_of(names: &[&str]) -> (Vec<TestUpstream>, Arc<AtomicBool>, u16) {
    let failing = Arc::new(AtomicBool::new(false));
    loop {
        let fails = Arc::clone(&failing);
        let first_name = names[0].to_string();
        let first =
            TestUpstream::with_handler_at(names[0], "127.0.0.2:0".parse().unwrap(), move |_| {
                if fails.load(Ordering::SeqCst) {
                    Reply::text(503, "down")
                } else {
                    Reply::text(200, &first_name)
                }
            });
        let port = first.addr.port();
        let mut all = vec![first];
        for (i, name) in names.iter().enumerate().skip(1) {
            let addr: SocketAddr = format!("127.0.0.{}:{port}", 2 + i).parse().unwrap();
            if std::net::TcpListener::bind(addr).is_err() {
                break;
            }
            all.push(TestUpstream::named_at(name, addr));
        }
        if all.len() == names.len() {
            return (all, failing, port);
        }
    }
}

#[test]
fn an_ejection_follows_its_address_through_dns_changes() {
    let (ups, failing, port) = failing_first_of(&["a", "b", "c"]);
    let a = &ups[0];
    let dns = TestDns::start();
    dns.set("svc.test", &["127.0.0.2", "127.0.0.3"]);
    let gw = start(
        &dns,
        port,
        "    outlier: { consecutive_failures: 3, eject_for: 60s }\n",
    );
    failing.store(true, Ordering::SeqCst);
    for _ in 0..20 {
        if a.count() >= 3 {
            break;
        }
        client().get(gw.url("/x")).send().unwrap();
    }
    assert_eq!(a.count(), 3);
    let ejected = format!("gatehouse_upstream_ejections_total{{target=\"127.0.0.2:{port}\"");
    // Counted once the third failure's response has been logged.
    eventually(Duration::from_secs(5), "a ejected", || {
        metric_sum(&gw, &ejected) == 1.0
    });
    // From here on `a` would answer well: only its ejection keeps it out.
    failing.store(false, Ordering::SeqCst);

    // It stays in the answer while another address joins: still out.
    dns.set("svc.test", &["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
    eventually(Duration::from_secs(5), "c joins", || {
        served_by(&gw, 4).contains("c")
    });
    let b_and_c: BTreeSet<String> = ["b".to_string(), "c".to_string()].into();
    assert_eq!(served_by(&gw, 12), b_and_c);
    assert_eq!(a.count(), 3, "the ejected address is still out");

    // An address that leaves and comes back is a new target (README: an
    // address that stays keeps its ejection; one that appears is added,
    // trusted once it passes a health check): its ejection is not kept.
    dns.set("svc.test", &["127.0.0.3", "127.0.0.4"]);
    let dropped = format!("targets now [127.0.0.3:{port}, 127.0.0.4:{port}]");
    eventually(Duration::from_secs(5), "a left the targets", || {
        gw.log_text().contains(&dropped)
    });
    dns.set("svc.test", &["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
    eventually(
        Duration::from_secs(5),
        "a back long before eject_for",
        || served_by(&gw, 6).contains("a"),
    );
    assert_eq!(metric_sum(&gw, &ejected), 1.0, "not ejected again");
}
