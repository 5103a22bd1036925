//! TLS at the edge end to end (SPEC 6.5, 6.6): certificates chosen by SNI
//! (exact names, wildcards, the first by default), a reload serving renewed
//! files to new connections while an open one keeps its own,
//! `min_version`, the ALPN refusal, the expiry metric; client certificates
//! `required` and `optional`, routes needing one, the subject and
//! fingerprint headers set only from a verified certificate and always
//! stripped from client input, refusals for want of one counted; `-t`
//! errors with their path and line.

mod common;

use std::path::Path;

use common::pki::{all_versions, handshake, request_resuming, Ca, Issued};
use common::*;
use sha2::{Digest, Sha256};
use tokio_rustls::rustls;

fn upstream() -> TestUpstream {
    TestUpstream::with_handler("app", |_| Reply::text(200, "ok"))
}

fn routes(up: &TestUpstream) -> String {
    format!(
        "{jwt}upstreams:
  app:
    targets: [{addr}]
routes:
  - name: open
    match: {{ path_prefix: /open }}
    upstream: app
  - name: certified
    match: {{ path_prefix: /certified }}
    upstream: app
    auth: {{ client_cert: true }}
  - name: both
    match: {{ path_prefix: /both }}
    upstream: app
    auth: {{ jwt: main, client_cert: true }}
",
        jwt = common::jwt::rs256_provider("main"),
        addr = up.addr
    )
}

/// An HTTPS client trusting `ca`, reaching the gateway's TLS listener as
/// `name`, with a client certificate when given.
fn https(
    ca: &Ca,
    gw: &Gateway,
    name: &str,
    identity: Option<&Issued>,
) -> reqwest::blocking::Client {
    let mut b = reqwest::blocking::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .resolve(name, gw.tls_addr.unwrap())
        .timeout(std::time::Duration::from_secs(10));
    if let Some(id) = identity {
        b = b.identity(id.identity());
    }
    b.build().unwrap()
}

fn url(gw: &Gateway, name: &str, path: &str) -> String {
    format!("https://{name}:{}{path}", gw.tls_addr.unwrap().port())
}

fn hex_sha256(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A folder holding `api.test`'s certificate and key (`api.pem`,
/// `api.key`), issued by a new CA.
fn api_site() -> (tempfile::TempDir, Ca) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    ca.issue(&["api.test"], "api", None, None)
        .write(dir.path(), "api");
    (dir, ca)
}

/// A gateway on [`routes`] whose TLS listener serves `api.test` from
/// `dir`, with `extra` settings after its certificates (`, min_version: ...`).
fn api_gateway(up: &TestUpstream, dir: &Path, extra: &str) -> Gateway {
    gateway(&routes(up))
        .tls_block(&format!(
            "{{ certificates: [{}]{extra} }}",
            pair(dir, "api")
        ))
        .start()
}

fn pair(dir: &Path, name: &str) -> String {
    format!(
        "{{ cert: {}, key: {} }}",
        dir.join(format!("{name}.pem")).display(),
        dir.join(format!("{name}.key")).display()
    )
}

#[test]
fn sni_picks_each_certificate_and_the_first_one_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let api = ca.issue(&["api.test"], "api", None, None);
    let shop = ca.issue(&["*.shop.test", "shop.test"], "shop", None, None);
    api.write(dir.path(), "api");
    shop.write(dir.path(), "shop");
    let up = upstream();
    let gw = gateway(&routes(&up))
        .tls_block(&format!(
            "{{ certificates: [{}, {}] }}",
            pair(dir.path(), "api"),
            pair(dir.path(), "shop")
        ))
        .start();
    let addr = gw.tls_addr.unwrap();
    let served = |sni: &str| handshake(addr, sni, &[b"h2"], &all_versions()).unwrap().0;
    assert_eq!(served("api.test"), api.der);
    assert_eq!(served("API.Test"), api.der);
    assert_eq!(served("www.shop.test"), shop.der);
    assert_eq!(served("shop.test"), shop.der);
    // A wildcard covers one label only; an unknown name gets the first.
    assert_eq!(served("a.b.shop.test"), api.der);
    assert_eq!(served("elsewhere.test"), api.der);

    // And a real client verifies each by its name.
    for name in ["api.test", "www.shop.test"] {
        let r = https(&ca, &gw, name, None)
            .get(url(&gw, name, "/open"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
    }

    // Each certificate's lifetime is exported.
    let m = metrics_text(&gw);
    for name in ["api.test", "*.shop.test"] {
        let line = m
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "gatehouse_tls_certificate_expiry_seconds{{name=\"{name}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("{name} in\n{m}"));
        let secs: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(secs > 86_400.0 * 365.0, "{line}");
    }
}

/// One HTTP/1.1 connection over TLS, kept alive from request to request,
/// verifying the server's certificate by `ca` as a browser would.
struct KeptAlive {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    name: String,
}

impl KeptAlive {
    fn open(addr: std::net::SocketAddr, ca: &Ca, name: &str) -> Self {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), server).unwrap();
        let sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        KeptAlive {
            tls: rustls::StreamOwned::new(conn, sock),
            name: name.to_string(),
        }
    }

    /// `GET path` on this connection: the status line, once the whole
    /// answer (framed by `Content-Length`) is read and the connection may
    /// carry the next request.
    fn get(&mut self, path: &str) -> String {
        use std::io::{Read, Write};
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.name);
        self.tls.write_all(request.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = self.tls.read(&mut buf).unwrap();
            assert!(n > 0, "the connection was closed");
            answer.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&answer[..head_end]).into_owned();
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no Content-Length in {head}"));
        while answer.len() < head_end + length {
            let n = self.tls.read(&mut buf).unwrap();
            assert!(n > 0, "the connection was closed mid-body");
            answer.extend_from_slice(&buf[..n]);
        }
        assert_eq!(answer.len(), head_end + length, "more than one answer");
        head.lines().next().unwrap_or("").to_string()
    }

    fn peer_certificate(&self) -> Vec<u8> {
        self.tls.conn.peer_certificates().unwrap()[0].to_vec()
    }
}

#[test]
fn a_reload_serves_renewed_certificates_and_keeps_them_when_files_fail() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let first = ca.issue(&["api.test"], "api", None, None);
    first.write(dir.path(), "api");
    let up = upstream();
    let gw = api_gateway(&up, dir.path(), "");
    let addr = gw.tls_addr.unwrap();
    let served = || {
        handshake(addr, "api.test", &[b"h2"], &all_versions())
            .unwrap()
            .0
    };
    assert_eq!(served(), first.der);
    // A connection opened before the reload, kept alive across it.
    let mut kept = KeptAlive::open(addr, &ca, "api.test");
    assert_eq!(kept.get("/open"), "HTTP/1.1 200 OK");
    assert_eq!(kept.peer_certificate(), first.der);

    let renewed = ca.issue(&["api.test"], "api", None, None);
    renewed.write(dir.path(), "api");
    let (status, body) = admin(&gw, "POST", "/reload");
    assert_eq!(status, 200, "{body}");
    assert_eq!(served(), renewed.der);
    // The same socket and session: still served, on the old certificate.
    assert_eq!(kept.get("/open"), "HTTP/1.1 200 OK");
    assert_eq!(kept.peer_certificate(), first.der);
    assert_eq!(up.count(), 2);
    let r = https(&ca, &gw, "api.test", None)
        .get(url(&gw, "api.test", "/open"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "a new client verifies the renewed one");

    // A key that is not the certificate's: the reload is refused and the
    // renewed certificate stays.
    let other = ca.issue(&["api.test"], "api", None, None);
    std::fs::write(dir.path().join("api.key"), &other.key_pem).unwrap();
    let (status, body) = admin(&gw, "POST", "/reload");
    assert_ne!(status, 200, "{body}");
    assert!(
        body.contains("the key does not match the certificate"),
        "{body}"
    );
    assert_eq!(served(), renewed.der);
}

#[test]
fn alpn_without_h2_or_http1_is_refused_and_min_version_holds() {
    let (dir, _ca) = api_site();
    let up = upstream();
    let gw = api_gateway(&up, dir.path(), ", min_version: \"1.3\"");
    let addr = gw.tls_addr.unwrap();
    match handshake(addr, "api.test", &[b"spdy/3", b"foo"], &all_versions()) {
        Err(rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)) => {}
        other => panic!("expected the no_application_protocol alert, got {other:?}"),
    }
    let (_, chosen) = handshake(addr, "api.test", &[b"foo", b"http/1.1"], &all_versions()).unwrap();
    assert_eq!(chosen.as_deref(), Some(&b"http/1.1"[..]));
    let (_, chosen) = handshake(addr, "api.test", &[b"http/1.1", b"h2"], &all_versions()).unwrap();
    assert_eq!(chosen.as_deref(), Some(&b"h2"[..]));
    // No ALPN at all: served (HTTP/1.1).
    let (_, chosen) = handshake(addr, "api.test", &[], &all_versions()).unwrap();
    assert_eq!(chosen, None);
    // TLS 1.2 only, on a 1.3 listener: refused.
    assert!(handshake(addr, "api.test", &[b"h2"], &[&rustls::version::TLS12]).is_err());
    assert!(handshake(addr, "api.test", &[b"h2"], &[&rustls::version::TLS13]).is_ok());
}

#[test]
fn required_client_certificates_are_verified_and_described_upstream() {
    let (dir, ca) = api_site();
    let clients = Ca::new("clients CA");
    let stranger_ca = Ca::new("another CA");
    let clients_pem = clients.write(dir.path(), "clients");
    let up = upstream();
    let gw = api_gateway(
        &up,
        dir.path(),
        &format!(
            ", client_ca: {}, client_cert: required",
            clients_pem.display()
        ),
    );
    let alice = clients.issue(&[], "alice", Some("Acme, Inc."), None);
    let r = https(&ca, &gw, "api.test", Some(&alice))
        .get(url(&gw, "api.test", "/open"))
        .header("X-Client-Cert-Subject", "CN=admin")
        .header("X-Client-Cert-Sha256", "00")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.last();
    assert_eq!(
        seen.header_all("x-client-cert-subject"),
        ["CN=alice,O=Acme\\, Inc."]
    );
    let fingerprint = hex_sha256(&alice.der);
    assert_eq!(
        seen.header_all("x-client-cert-sha256"),
        [fingerprint.as_str()]
    );

    // No certificate, or one another CA signed: no handshake, no request.
    let before = up.count();
    assert!(https(&ca, &gw, "api.test", None)
        .get(url(&gw, "api.test", "/open"))
        .send()
        .is_err());
    let mallory = stranger_ca.issue(&[], "alice", Some("Acme, Inc."), None);
    assert!(https(&ca, &gw, "api.test", Some(&mallory))
        .get(url(&gw, "api.test", "/open"))
        .send()
        .is_err());
    assert_eq!(up.count(), before);

    // An edited CA file changes nothing until an upgrade, and the reload
    // says so: alice still passes, a client of the new CA still does not.
    stranger_ca.write(dir.path(), "clients");
    let (status, body) = admin(&gw, "POST", "/reload");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("listen: changes only by an upgrade"),
        "{body}"
    );
    let r = https(&ca, &gw, "api.test", Some(&alice))
        .get(url(&gw, "api.test", "/open"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(https(&ca, &gw, "api.test", Some(&mallory))
        .get(url(&gw, "api.test", "/open"))
        .send()
        .is_err());
}

#[test]
fn optional_client_certificates_let_routes_ask_for_one() {
    let (dir, ca) = api_site();
    let clients = Ca::new("clients CA");
    let stranger_ca = Ca::new("another CA");
    let clients_pem = clients.write(dir.path(), "clients");
    let up = upstream();
    let gw = api_gateway(
        &up,
        dir.path(),
        &format!(
            ", client_ca: {}, client_cert: optional",
            clients_pem.display()
        ),
    );
    let bob = clients.issue(&[], "bob", None, None);
    let mallory = stranger_ca.issue(&[], "bob", None, None);
    let anonymous = https(&ca, &gw, "api.test", None);
    let with_bob = https(&ca, &gw, "api.test", Some(&bob));
    let with_mallory = https(&ca, &gw, "api.test", Some(&mallory));

    // Without a certificate: served, and a forged subject never passes.
    let r = anonymous
        .get(url(&gw, "api.test", "/open"))
        .header("X-Client-Cert-Subject", "CN=bob")
        .header("X_Client_Cert_Sha256", "00")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.last();
    assert_eq!(seen.header("x-client-cert-subject"), None);
    assert_eq!(seen.header("x_client_cert_sha256"), None);
    let r = anonymous
        .get(url(&gw, "api.test", "/certified"))
        .send()
        .unwrap();
    let p = assert_problem(r, 401);
    assert_eq!(p["detail"], "a verified client certificate is required");
    let missing = |route: &str| {
        metric_sum(
            &gw,
            &format!(
                "gatehouse_auth_failures_total{{reason=\"missing_client_cert\",route=\"{route}\"}}"
            ),
        )
    };
    assert_eq!(missing("certified"), 1.0);

    // A certificate that does not verify is served as none.
    let r = with_mallory
        .get(url(&gw, "api.test", "/open"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.last().header("x-client-cert-subject"), None);
    assert_problem(
        with_mallory
            .get(url(&gw, "api.test", "/certified"))
            .send()
            .unwrap(),
        401,
    );

    // A verified one passes and is described.
    let r = with_bob
        .get(url(&gw, "api.test", "/certified"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.last().header("x-client-cert-subject"), Some("CN=bob"));

    // Beside a JWT: both are needed.
    let token = common::jwt::rs256_token("bob");
    let r = with_bob.get(url(&gw, "api.test", "/both")).send().unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_problem(r, 401);
    assert_problem(
        anonymous
            .get(url(&gw, "api.test", "/both"))
            .bearer_auth(&token)
            .send()
            .unwrap(),
        401,
    );
    let r = with_bob
        .get(url(&gw, "api.test", "/both"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);

    // The plain listener strips the headers too.
    let r = client()
        .get(gw.url("/open"))
        .header("X-Client-Cert-Subject", "CN=bob")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.last().header("x-client-cert-subject"), None);
    assert_problem(client().get(gw.url("/certified")).send().unwrap(), 401);
    // Each refusal for want of a certificate is counted as one, by route:
    // anonymous, mallory's and the plain listener's on `certified`, the
    // token without a certificate on `both` (bob's certificate without a
    // token is a missing token).
    assert_eq!(missing("certified"), 3.0);
    assert_eq!(missing("both"), 1.0);
    assert_eq!(
        metric_sum(
            &gw,
            "gatehouse_auth_failures_total{reason=\"missing_token\",route=\"both\"}"
        ),
        1.0
    );
}

/// `n` random-looking 80-byte ticket keys, each named by its first byte.
fn ticket_keys(names: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for name in names {
        let key: Vec<u8> = (0..80u32)
            .map(|i| {
                (i as u8)
                    .wrapping_mul(31)
                    .wrapping_add(*name)
                    .rotate_left(3)
            })
            .collect();
        let mut key = key;
        key[0] = *name;
        out.extend(key);
    }
    out
}

#[test]
fn shared_ticket_keys_resume_sessions_in_another_process() {
    let (dir, _ca) = api_site();
    let up = upstream();
    let start = |keys: Option<&Path>| {
        let extra = keys.map_or(String::new(), |k| format!(", ticket_keys: {}", k.display()));
        api_gateway(&up, dir.path(), &extra)
    };
    let old_keys = dir.path().join("old.key");
    std::fs::write(&old_keys, ticket_keys(&[1])).unwrap();
    // The next process has a new key first and the old one after it, as
    // keys rotate.
    let rotated = dir.path().join("rotated.key");
    std::fs::write(&rotated, ticket_keys(&[2, 1])).unwrap();

    for versions in [vec![&rustls::version::TLS13], vec![&rustls::version::TLS12]] {
        let label = format!("{:?}", versions[0].version);
        // Without ticket_keys: each process its own keys; no resumption
        // from one to the other.
        let (a, b) = (start(None), start(None));
        let client = common::pki::resuming_client(&versions);
        let (resumed, status) = request_resuming(&client, a.tls_addr.unwrap(), "api.test");
        assert!(
            !resumed && status.starts_with("HTTP/1.1 200"),
            "{label}: {status}"
        );
        // Within one process a session resumes.
        let (resumed, _) = request_resuming(&client, a.tls_addr.unwrap(), "api.test");
        assert!(resumed, "{label}: the same process resumes");
        let (resumed, _) = request_resuming(&client, b.tls_addr.unwrap(), "api.test");
        assert!(!resumed, "{label}: another process's keys cannot resume it");
        drop((a, b));

        // With the same keys: a ticket of the first process resumes in the
        // second, which decrypts it with its second key.
        let (a, b) = (start(Some(&old_keys)), start(Some(&rotated)));
        let client = common::pki::resuming_client(&versions);
        let (resumed, _) = request_resuming(&client, a.tls_addr.unwrap(), "api.test");
        assert!(!resumed, "{label}");
        let (resumed, status) = request_resuming(&client, b.tls_addr.unwrap(), "api.test");
        assert!(resumed, "{label}: resumed across processes");
        assert!(status.starts_with("HTTP/1.1 200"), "{label}: {status}");
    }
}

#[test]
fn a_session_never_resumes_where_clients_verify_otherwise() {
    // Two instances share ticket keys; one asks for no client certificate,
    // the other requires one. A ticket from the first must not let a
    // client without a certificate into the second.
    let (dir, ca) = api_site();
    let clients = ca.write(dir.path(), "clients");
    let keys = dir.path().join("tickets.key");
    std::fs::write(&keys, ticket_keys(&[5])).unwrap();
    let up = upstream();
    let open = api_gateway(
        &up,
        dir.path(),
        &format!(", ticket_keys: {}", keys.display()),
    );
    let strict = api_gateway(
        &up,
        dir.path(),
        &format!(
            ", ticket_keys: {}, client_ca: {}, client_cert: required",
            keys.display(),
            clients.display()
        ),
    );
    for versions in [vec![&rustls::version::TLS13], vec![&rustls::version::TLS12]] {
        let client = common::pki::resuming_client(&versions);
        let (_, status) = request_resuming(&client, open.tls_addr.unwrap(), "api.test");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let (resumed, status) = request_resuming(&client, strict.tls_addr.unwrap(), "api.test");
        assert!(
            !resumed,
            "{versions:?}: resumed into a listener that requires certificates"
        );
        assert!(
            !status.starts_with("HTTP/1.1 200"),
            "{versions:?}: {status}"
        );
    }
}

#[test]
fn ticket_keys_resume_sessions_across_an_upgrade() {
    let (dir, _ca) = api_site();
    let keys = dir.path().join("tickets.key");
    std::fs::write(&keys, ticket_keys(&[9])).unwrap();
    let up = upstream();
    let mut gw = api_gateway(
        &up,
        dir.path(),
        &format!(", ticket_keys: {}", keys.display()),
    );
    let addr = gw.tls_addr.unwrap();
    let client = common::pki::resuming_client(&[&rustls::version::TLS13]);
    let (resumed, status) = request_resuming(&client, addr, "api.test");
    assert!(!resumed && status.starts_with("HTTP/1.1 200"), "{status}");

    let (mut new, gone) = upgrade(&mut gw);
    assert!(gone, "the old process did not leave\n{}", gw.log_text());
    let (resumed, status) = request_resuming(&client, addr, "api.test");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(resumed, "the new process resumes the old one's session");
    assert!(new.0.try_wait().unwrap().is_none(), "the new process died");
    // The old process is gone: the gateway's guard must not kill a reused pid.
    gw.child = std::process::Command::new("true").spawn().unwrap();
}

#[test]
fn tls_mistakes_are_config_errors_with_their_paths() {
    let (dir, ca) = api_site();
    ca.issue(&["api.test", "www.test"], "dup", None, None)
        .write(dir.path(), "dup");
    ca.issue(&["old.test"], "old", None, Some((2020, 1, 1)))
        .write(dir.path(), "old");
    let mismatched = ca.issue(&["x.test"], "x", None, None);
    mismatched.write(dir.path(), "x");
    std::fs::write(
        dir.path().join("x.key"),
        ca.issue(&["x.test"], "x", None, None).key_pem,
    )
    .unwrap();
    let ca_pem = ca.write(dir.path(), "ca");
    let short_keys = dir.path().join("short.key");
    std::fs::write(&short_keys, [7u8; 48]).unwrap();
    let yaml = |tls: &str| {
        format!(
            "listen:\n  - address: 127.0.0.1:8443\n    tls: {tls}\nupstreams:\n  app:\n    targets: [127.0.0.1:9]\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n"
        )
    };
    let d = dir.path();
    let cases = vec![
        (
            yaml(&format!(
                "{{ certificates: [{}, {}] }}",
                pair(d, "api"),
                pair(d, "dup")
            )),
            "listen[0].tls.certificates",
            "certificates 1 and 2 both claim api.test",
        ),
        (
            yaml(&format!("{{ certificates: [{}] }}", pair(d, "old"))),
            "listen[0].tls.certificates[0].cert",
            "has expired",
        ),
        (
            yaml(&format!("{{ certificates: [{}] }}", pair(d, "x"))),
            "listen[0].tls.certificates[0].key",
            "the key does not match the certificate",
        ),
        (
            yaml(&format!("{{ certificates: [{}] }}", pair(d, "missing"))),
            "listen[0].tls.certificates[0].cert",
            "cannot read",
        ),
        (
            yaml(&format!(
                "{{ certificates: [{}], min_version: \"1.1\" }}",
                pair(d, "api")
            )),
            "listen[0].tls.min_version",
            "use \"1.2\" or \"1.3\"",
        ),
        (
            yaml(&format!(
                "{{ certificates: [{}], client_cert: required }}",
                pair(d, "api")
            )),
            "listen[0].tls.client_ca",
            "client_cert needs client_ca",
        ),
        (
            yaml(&format!(
                "{{ certificates: [{}], client_ca: {}, client_cert: sometimes }}",
                pair(d, "api"),
                ca_pem.display()
            )),
            "listen[0].tls.client_cert",
            "use optional or required",
        ),
        (
            yaml(&format!(
                "{{ certificates: [{}], ticket_keys: {} }}",
                pair(d, "api"),
                short_keys.display()
            )),
            "listen[0].tls.ticket_keys",
            "holds 48 bytes; a ticket-key file holds one or more 80-byte keys",
        ),
        (
            yaml("{ client_cert: optional }"),
            "listen[0].tls",
            "give cert and key, or certificates",
        ),
    ];
    assert_config_errors(&cases, Some("PRIVATE KEY"));
    // With the line and column of the key, in a block mapping.
    let yaml = format!(
        "listen:\n  - address: 127.0.0.1:8443\n    tls:\n      certificates: [{}]\n      min_version: \"1.1\"\nupstreams:\n  app:\n    targets: [127.0.0.1:9]\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n",
        pair(d, "api")
    );
    let (code, out, err) = check_config(&yaml, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("listen[0].tls.min_version (line 5, column 7): min_version \"1.1\": use \"1.2\" or \"1.3\""),
        "{err}"
    );
}

#[test]
fn a_reload_rotates_ticket_keys_from_the_edited_file() {
    let (dir, _ca) = api_site();
    let up = upstream();
    let start = |keys: &Path| {
        api_gateway(
            &up,
            dir.path(),
            &format!(", ticket_keys: {}", keys.display()),
        )
    };
    let live = dir.path().join("live.key");
    let old = dir.path().join("old.key");
    std::fs::write(&live, ticket_keys(&[1])).unwrap();
    std::fs::write(&old, ticket_keys(&[1])).unwrap();
    let (gw, stale) = (start(&live), start(&old));
    let (addr, stale_addr) = (gw.tls_addr.unwrap(), stale.tls_addr.unwrap());
    for versions in [vec![&rustls::version::TLS13], vec![&rustls::version::TLS12]] {
        let label = format!("{:?}", versions[0].version);
        // Before the rotation, a process with the old keys resumes the
        // gateway's sessions.
        let client = common::pki::resuming_client(&versions);
        assert!(!request_resuming(&client, addr, "api.test").0, "{label}");
        assert!(
            request_resuming(&client, stale_addr, "api.test").0,
            "{label}"
        );
    }

    // A new first key, the old one kept after it for the tickets out there.
    let before = common::pki::resuming_client(&[&rustls::version::TLS13]);
    assert!(!request_resuming(&before, addr, "api.test").0);
    std::fs::write(&live, ticket_keys(&[2, 1])).unwrap();
    let (status, body) = admin(&gw, "POST", "/reload");
    assert_eq!(status, 200, "{body}");

    // A ticket issued before the reload still resumes: every key decrypts.
    let (resumed, status) = request_resuming(&before, addr, "api.test");
    assert!(resumed && status.starts_with("HTTP/1.1 200"), "{status}");
    for versions in [vec![&rustls::version::TLS13], vec![&rustls::version::TLS12]] {
        let label = format!("{:?}", versions[0].version);
        let client = common::pki::resuming_client(&versions);
        assert!(!request_resuming(&client, addr, "api.test").0, "{label}");
        // The gateway resumes its new tickets...
        assert!(request_resuming(&client, addr, "api.test").0, "{label}");
        // ...which the new key encrypted: the old keys cannot open them.
        let (resumed, status) = request_resuming(&client, stale_addr, "api.test");
        assert!(
            !resumed,
            "{label}: a ticket issued after the reload opened with the old keys"
        );
        assert!(status.starts_with("HTTP/1.1 200"), "{label}: {status}");
    }
}

/// The civil date (year, month, day) `days` after 1970-01-01.
fn civil_date(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year as i32, month as u8, day as u8)
}

/// A configuration with one TLS listener whose `tls` value is `tls`.
fn tls_config(tls: &str) -> String {
    format!(
        "listen:\n  - address: 127.0.0.1:8443\n    tls: {tls}\nupstreams:\n  app:\n    targets: [127.0.0.1:9]\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n"
    )
}

#[test]
fn a_certificate_expiring_within_14_days_is_a_warning_of_dash_t() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / 86_400;
    ca.issue(&["soon.test"], "soon", None, Some(civil_date(today + 7)))
        .write(dir.path(), "soon");
    ca.issue(&["later.test"], "later", None, Some(civil_date(today + 30)))
        .write(dir.path(), "later");
    let d = dir.path();
    let yaml = tls_config(&format!(
        "{{ certificates: [{}, {}] }}",
        pair(d, "later"),
        pair(d, "soon")
    ));
    let (code, out, err) = check_config(&yaml, &[]);
    let text = format!("{out}{err}");
    assert_eq!(code, 0, "a warning, not an error:\n{text}");
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("expires in")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains("listen[0].tls.certificates[1].cert")
            && warnings[0].contains("soon.pem")
            && (warnings[0].contains("expires in 6 days")
                || warnings[0].contains("expires in 7 days")),
        "{text}"
    );
}

/// `openssl s_client` against `addr` with `flags`: whether the handshake
/// completed, and what it printed.
fn s_client(addr: std::net::SocketAddr, flags: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(["-servername", "api.test"])
        .args(flags)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A session without a cipher is a handshake that did not complete.
    let done = out.status.success() && !text.contains("Cipher is (NONE)");
    (done, text)
}

#[test]
fn tls_1_0_and_1_1_are_refused_and_1_2_is_served() {
    let (dir, _ca) = api_site();
    let up = upstream();
    let gw = api_gateway(&up, dir.path(), "");
    let addr = gw.tls_addr.unwrap();
    // The system's OpenSSL offers the old versions only at security
    // level 0; the gateway must refuse them all the same.
    for version in ["-tls1", "-tls1_1"] {
        let (done, text) = s_client(addr, &[version, "-cipher", "DEFAULT@SECLEVEL=0"]);
        assert!(!done, "{version} was served:\n{text}");
        // The server's protocol_version alert: the client did offer it.
        assert!(
            text.contains("alert protocol version"),
            "{version} not refused by the server:\n{text}"
        );
    }
    let (done, text) = s_client(addr, &["-tls1_2"]);
    assert!(done, "{text}");
    assert!(text.contains("TLSv1.2"), "{text}");
}

#[test]
fn an_unreadable_client_ca_is_a_config_error_with_its_path() {
    let (dir, _ca) = api_site();
    let d = dir.path();
    let not_pem = d.join("not-a-ca.pem");
    std::fs::write(&not_pem, "no certificate here\n").unwrap();
    let with_ca = |ca: &Path| {
        tls_config(&format!(
            "{{ certificates: [{}], client_ca: {}, client_cert: required }}",
            pair(d, "api"),
            ca.display()
        ))
    };
    let cases = vec![
        (
            with_ca(&d.join("missing.pem")),
            "listen[0].tls.client_ca",
            "cannot read",
        ),
        // A folder where the file should be.
        (with_ca(d), "listen[0].tls.client_ca", "cannot read"),
        (
            with_ca(&not_pem),
            "listen[0].tls.client_ca",
            "holds no PEM certificate",
        ),
    ];
    assert_config_errors(&cases, Some("PRIVATE KEY"));
}
