//! TLS on both sides: a TLS listener speaking HTTP/2 and HTTP/1.1 by ALPN,
//! and HTTPS to upstream targets with SNI and certificate verification.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio_rustls::rustls;

fn https_client(cert_pem: &[u8], addr: SocketAddr, h1_only: bool) -> reqwest::blocking::Client {
    let mut b = reqwest::blocking::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem).unwrap())
        .resolve("gw.test", addr);
    if h1_only {
        b = b.http1_only();
    }
    b.build().unwrap()
}

#[test]
fn tls_listener_serves_http2_and_http1_by_alpn() {
    let up = TestUpstream::named("app");
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path(), &["gw.test"]);
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: r\n    match: {{ path_prefix: /hello }}\n    upstream: app\n  - name: plain\n    match: {{ path_prefix: /plain }}\n    upstream: app\n",
        up.addr
    ))
    .tls(&cert, &key)
    .start();
    let tls_addr = gw.tls_addr.unwrap();
    let pem = std::fs::read(&cert).unwrap();
    let url = format!("https://gw.test:{}/hello", tls_addr.port());

    let h2 = https_client(&pem, tls_addr, false)
        .get(&url)
        .send()
        .unwrap();
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    assert_eq!(h2.status(), 200);
    assert!(h2.headers().contains_key("x-request-id"));
    assert_eq!(h2.text().unwrap(), "app");
    let seen = up.last();
    assert_eq!(seen.target, "/hello");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    // An HTTP/2 request has an authority, not a Host: the HTTP/1 upstream
    // gets it as both.
    let authority = format!("gw.test:{}", tls_addr.port());
    assert_eq!(seen.header("host"), Some(authority.as_str()));
    assert_eq!(seen.header("x-forwarded-host"), Some(authority.as_str()));

    let h1 = https_client(&pem, tls_addr, true).get(&url).send().unwrap();
    assert_eq!(h1.version(), reqwest::Version::HTTP_11);
    assert_eq!(h1.text().unwrap(), "app");

    // Gateway errors over HTTP/2 are problem+json too.
    let missing = https_client(&pem, tls_addr, false)
        .get(format!("https://gw.test:{}/nope", tls_addr.port()))
        .send()
        .unwrap();
    assert_eq!(missing.version(), reqwest::Version::HTTP_2);
    assert_problem(missing, 404);
    // The plain listener still answers in the clear.
    assert_eq!(client().get(gw.url("/plain")).send().unwrap().status(), 200);
}

/// An HTTPS upstream that records the SNI each client asked for.
struct TlsUpstream {
    addr: SocketAddr,
    snis: Arc<Mutex<Vec<Option<String>>>>,
    /// Path and `Host` of each request served.
    requests: Arc<Mutex<Vec<(String, String)>>>,
    _runtime: tokio::runtime::Runtime,
}

fn tls_upstream(cert_der: Vec<u8>, key_der: Vec<u8>) -> TlsUpstream {
    use hyper::service::service_fn;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(cert_der)],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key_der.into()),
        )
        .unwrap();
    let config = Arc::new(config);
    let runtime = common::server_runtime();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let snis = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&snis);
    let requests = Arc::new(Mutex::new(Vec::new()));
    let served = Arc::clone(&requests);
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let config = Arc::clone(&config);
            let recorded = Arc::clone(&recorded);
            let served = Arc::clone(&served);
            tokio::spawn(async move {
                let acceptor =
                    tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
                let Ok(start) = acceptor.await else { return };
                let sni = start.client_hello().server_name().map(str::to_string);
                recorded.lock().unwrap().push(sni);
                let Ok(tls) = start.into_stream(config).await else {
                    return;
                };
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let host = req
                        .headers()
                        .get("host")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    served
                        .lock()
                        .unwrap()
                        .push((req.uri().path().to_string(), host));
                    async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"secure")),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    TlsUpstream {
        addr,
        snis,
        requests,
        _runtime: runtime,
    }
}

#[test]
fn https_upstreams_get_sni_and_are_verified() {
    let ck = rcgen::generate_simple_self_signed(vec!["upstream.test".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let up = tls_upstream(ck.cert.der().to_vec(), ck.key_pair.serialize_der());
    let body = [
        format!("upstreams:\n  good:\n    targets: [{}]\n    tls: true\n    sni: upstream.test\n    ca_file: {}\n", up.addr, ca.display()),
        format!("  wrong-name:\n    targets: [{}]\n    tls: true\n    sni: other.test\n    ca_file: {}\n", up.addr, ca.display()),
        format!("  unverified:\n    targets: [{}]\n    tls: true\n    tls_verify: false\n", up.addr),
        "routes:\n  - name: good\n    match: { path_prefix: /good }\n    upstream: good\n".to_string(),
        "  - name: wrong\n    match: { path_prefix: /wrong }\n    upstream: wrong-name\n".to_string(),
        "  - name: unverified\n    match: { path_prefix: /unverified }\n    upstream: unverified\n".to_string(),
    ]
    .concat();
    let gw = gateway(&body).start();
    let c = client();
    let r = c.get(gw.url("/good")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "secure");
    assert!(up
        .snis
        .lock()
        .unwrap()
        .contains(&Some("upstream.test".into())));

    // A certificate that does not match the SNI is refused: 502.
    assert_problem(c.get(gw.url("/wrong")).send().unwrap(), 502);
    assert!(up.snis.lock().unwrap().contains(&Some("other.test".into())));

    assert_eq!(c.get(gw.url("/unverified")).send().unwrap().status(), 200);
}

#[test]
fn https_health_checks_verify_the_upstream_certificate() {
    let ck = rcgen::generate_simple_self_signed(vec!["upstream.test".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let up = tls_upstream(ck.cert.der().to_vec(), ck.key_pair.serialize_der());
    let tls = |sni: &str| {
        format!(
            "    targets: [{}]\n    tls: true\n    sni: {sni}\n    ca_file: {}\n",
            up.addr,
            ca.display()
        )
    };
    let http_check = "    health_check: { path: /health, interval: 100ms, unhealthy_after: 1 }\n";
    let strict_check = "    health_check: { path: /strict, interval: 100ms, expect_status: 204, unhealthy_after: 1 }\n";
    let tcp_check = "    health_check: { interval: 100ms, unhealthy_after: 1 }\n";
    let body = [
        "upstreams:\n".to_string(),
        format!("  http-good:\n{}{http_check}", tls("upstream.test")),
        format!("  http-wrong:\n{}{http_check}", tls("other.test")),
        format!("  tcp-good:\n{}{tcp_check}", tls("upstream.test")),
        format!("  tcp-wrong:\n{}{tcp_check}", tls("other.test")),
        format!("  http-strict:\n{}{strict_check}", tls("upstream.test")),
        "routes:\n  - name: r\n    match: { path_prefix: / }\n    upstream: http-good\n"
            .to_string(),
    ]
    .concat();
    let gw = gateway(&body).start();
    let t = up.addr.to_string();
    let healthy = |text: &str, upstream: &str| -> Option<f64> {
        let series =
            format!("gatehouse_upstream_healthy{{target=\"{t}\",upstream=\"{upstream}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
    };
    let mut text = String::new();
    // Each check's TLS handshake verifies the certificate against the SNI:
    // a wrong name fails the HTTP and the TCP check alike. An answer with
    // another status than the one expected fails too (this one is 200).
    eventually(Duration::from_secs(10), "the bad checks to fail", || {
        text = admin(&gw, "GET", "/metrics").1;
        ["http-wrong", "tcp-wrong", "http-strict"]
            .iter()
            .all(|u| healthy(&text, u) == Some(0.0))
    });
    // The good name's HTTP check went through the verified handshake and was
    // answered, more than once, asking the check's path with the SNI as `Host`.
    eventually(
        Duration::from_secs(10),
        "two answered health checks",
        || {
            let served = up.requests.lock().unwrap();
            served
                .iter()
                .filter(|(path, host)| path == "/health" && host == "upstream.test")
                .count()
                >= 2
        },
    );
    let text = admin(&gw, "GET", "/metrics").1;
    assert_eq!(healthy(&text, "http-good"), Some(1.0), "{text}");
    assert_eq!(healthy(&text, "tcp-good"), Some(1.0), "{text}");
    let snis = up.snis.lock().unwrap().clone();
    assert!(snis.contains(&Some("upstream.test".into())), "{snis:?}");
    assert!(snis.contains(&Some("other.test".into())), "{snis:?}");
}

#[test]
fn http2_request_heads_are_held_to_the_same_limits() {
    let up = TestUpstream::named("app");
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path(), &["gw.test"]);
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n",
        up.addr
    ))
    .server("max_headers: 20")
    .tls(&cert, &key)
    .start();
    let tls_addr = gw.tls_addr.unwrap();
    let c = https_client(&std::fs::read(&cert).unwrap(), tls_addr, false);
    let url = format!("https://gw.test:{}/a", tls_addr.port());
    let mut req = c.get(&url);
    for i in 0..30 {
        req = req.header(format!("x-h{i}"), "1");
    }
    let r = req.send().unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_problem(r, 431);
    assert_eq!(up.count(), 0);
    assert_eq!(c.get(&url).send().unwrap().status(), 200);
}
