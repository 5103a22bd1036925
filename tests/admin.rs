//! Admin access end to end (SPEC section 9.3): `admin.token` as Bearer or
//! as the password of Basic, `/healthz` and `/readyz` open, a 401 with a
//! Basic challenge otherwise, the token never in a log, and no open admin
//! listener on a non-loopback address unless `admin.insecure` says so.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;

const TOKEN: &str = "admin-token-7f3a9c1e5b";

fn with_auth(gw: &Gateway, method: &str, target: &str, auth: Option<&str>) -> RawResponse {
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let text = raw_request(
        gw.admin,
        format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    RawResponse::parse(&text).unwrap_or_else(|| panic!("no answer: {text:?}"))
}

#[test]
fn the_token_opens_every_endpoint_but_health_which_stays_open() {
    let up = TestUpstream::named("app");
    // A cache, so that `DELETE /cache` has something to purge.
    let body = format!(
        "cache: {{ max_size: 1MiB }}\nupstreams:\n  app: {{ targets: [{}] }}\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n    cache: {{ ttl: 30s }}\n",
        up.addr
    );
    let gw = gateway(&body)
        .env("ADMIN_TOKEN", TOKEN)
        .admin("token: ${ADMIN_TOKEN}")
        .start();
    for open in ["/healthz", "/readyz"] {
        assert_eq!(with_auth(&gw, "GET", open, None).status, 200, "{open}");
    }
    let basic = |creds: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(creds)
        )
    };
    let endpoints = [
        ("GET", "/metrics"),
        ("POST", "/reload"),
        ("GET", "/"),
        ("GET", "/status"),
        ("DELETE", "/cache"),
        ("GET", "/nope"),
    ];
    for (method, target) in endpoints {
        for refused in [
            None,
            Some("Bearer wrong-token-0000000000".to_string()),
            Some(basic(&format!("admin:{TOKEN}x"))),
            Some(format!("Token {TOKEN}")),
        ] {
            let r = with_auth(&gw, method, target, refused.as_deref());
            assert_eq!(r.status, 401, "{method} {target} with {refused:?}");
            assert_eq!(
                r.header("www-authenticate"),
                Some("Basic realm=\"gatehouse admin\"")
            );
            assert!(r
                .header("content-type")
                .unwrap()
                .starts_with("application/problem+json"));
        }
    }
    // What each endpoint answers once let in: its own content.
    let answers = [
        ("GET", "/metrics", "# HELP"),
        ("POST", "/reload", "\"reloaded\""),
        ("GET", "/", "<title>gatehouse</title>"),
        ("GET", "/status", "\"upstreams\""),
        ("DELETE", "/cache", "\"purged\""),
    ];
    for (method, target, content) in answers {
        for admitted in [
            format!("Bearer {TOKEN}"),
            basic(&format!("prometheus:{TOKEN}")),
            basic(&format!(":{TOKEN}")),
        ] {
            let r = with_auth(&gw, method, target, Some(&admitted));
            assert_eq!(
                r.status, 200,
                "{method} {target} with {admitted}: {}",
                r.body
            );
            assert!(r.body.contains(content), "{method} {target}: {}", r.body);
        }
    }
    let r = with_auth(&gw, "GET", "/nope", Some(&format!("Bearer {TOKEN}")));
    assert_eq!(r.status, 404);
    let log = gw.log_text();
    assert!(log.contains("refused: no valid admin token"), "{log}");
    assert!(!log.contains(TOKEN), "the token is in the log");
}

#[test]
fn an_open_admin_listener_off_loopback_is_a_config_error() {
    let base = "upstreams:\n  app: { targets: ['127.0.0.1:9'] }\nroutes:\n  - name: r\n    match: { path_prefix: / }\n    upstream: app\n";
    let config = |admin: &str| format!("listen: [127.0.0.1:0]\nadmin: {admin}\n{base}");
    let (code, _, stderr) = check_config(&config("{ listen: '0.0.0.0:9901' }"), &[]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("admin.listen") && stderr.contains("admin.token"),
        "{stderr}"
    );
    let (code, out, stderr) =
        check_config(&config("{ listen: '0.0.0.0:9901', insecure: true }"), &[]);
    assert_eq!(code, 0, "{out}{stderr}");
    let (code, out, stderr) = check_config(
        &config("{ listen: '0.0.0.0:9901', token: '${ADMIN_TOKEN}' }"),
        &[("ADMIN_TOKEN", TOKEN)],
    );
    assert_eq!(code, 0, "{out}{stderr}");
    let (code, _, stderr) = check_config(
        &config("{ listen: '127.0.0.1:9901', token: '${ADMIN_TOKEN}' }"),
        &[("ADMIN_TOKEN", "short-secret")],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("admin.token") && stderr.contains("at least 16"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("short-secret"),
        "the value is never printed"
    );
    let (code, _, stderr) = check_config(
        &config(&format!(
            "{{ listen: '127.0.0.1:9901', token: {TOKEN}, insecure: true }}"
        )),
        &[],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("admin.insecure"), "{stderr}");
}

#[test]
fn pages_elsewhere_cannot_use_the_admin_listener() {
    let up = TestUpstream::named("app");
    let body = format!(
        "upstreams:\n  app: {{ targets: [{}] }}\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n",
        up.addr
    );
    let send = |gw: &Gateway, head: &str| {
        let text = raw_request(
            gw.admin,
            format!("{head}Content-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        RawResponse::parse(&text).unwrap_or_else(|| panic!("no answer: {text:?}"))
    };
    // With a token: a browser that holds the Basic credentials is not
    // made to change anything from another site's page.
    let gw = gateway(&body)
        .env("ADMIN_TOKEN", TOKEN)
        .admin("token: ${ADMIN_TOKEN}")
        .start();
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
    for foreign in [
        "Origin: http://evil.example\r\n",
        "Sec-Fetch-Site: cross-site\r\n",
        "Sec-Fetch-Site: same-site\r\n",
    ] {
        let r = send(
            &gw,
            &format!("POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\n{bearer}{foreign}"),
        );
        assert_eq!(r.status, 403, "{foreign}");
    }
    let own = format!(
        "Origin: http://{}\r\nSec-Fetch-Site: same-origin\r\n",
        gw.admin
    );
    let r = send(
        &gw,
        &format!(
            "POST /reload HTTP/1.1\r\nHost: {}\r\n{bearer}{own}",
            gw.admin
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // The dashboard runs its own script only.
    let r = send(
        &gw,
        &format!("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n{bearer}"),
    );
    let csp = r.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'sha256-") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    drop(gw);
    // Without a token: only requests to an address or localhost (a name
    // made to resolve here by another site is refused); health stays open.
    let gw = gateway(&body).start();
    assert_eq!(
        send(&gw, "GET /metrics HTTP/1.1\r\nHost: evil.example:9901\r\n").status,
        403
    );
    assert_eq!(
        send(&gw, "GET /healthz HTTP/1.1\r\nHost: evil.example\r\n").status,
        200
    );
    assert_eq!(
        send(&gw, "GET /metrics HTTP/1.1\r\nHost: localhost:9901\r\n").status,
        200
    );
    assert_eq!(
        send(&gw, "GET /metrics HTTP/1.1\r\nHost: [::1]:9901\r\n").status,
        200
    );
}

#[test]
fn a_token_yaml_reads_as_a_number_is_refused_without_being_shown() {
    let base = "listen: [127.0.0.1:0]\nupstreams:\n  app: { targets: ['127.0.0.1:9'] }\nroutes:\n  - name: r\n    match: { path_prefix: / }\n    upstream: app\n";
    let secret = "73915020488327651209";
    let (code, out, stderr) = check_config(
        &format!("{base}admin:\n  listen: 127.0.0.1:9901\n  token: ${{ADMIN_TOKEN}}\n"),
        &[("ADMIN_TOKEN", secret)],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        stderr.contains("admin.token") && stderr.contains("quote it"),
        "{stderr}"
    );
    assert!(!stderr.contains(&secret[..8]), "{stderr}");
}

/// An address of this machine other than loopback: where a scraper on
/// another host (Prometheus in compose or Kubernetes) reaches the
/// listener. Found by the route to an outside address (no packet leaves).
fn network_address() -> std::net::IpAddr {
    for (bind, outside) in [
        ("0.0.0.0:0", "198.51.100.1:9"),
        ("[::]:0", "[2001:db8::1]:9"),
    ] {
        let Ok(socket) = std::net::UdpSocket::bind(bind) else {
            continue;
        };
        if socket.connect(outside).is_err() {
            continue;
        }
        if let Ok(local) = socket.local_addr() {
            let ip = local.ip();
            if !ip.is_loopback() && !ip.is_unspecified() {
                return ip;
            }
        }
    }
    panic!("this test needs an address other than loopback (a network interface with a route)");
}

#[test]
fn an_insecure_listener_answers_a_service_name_but_never_a_public_name() {
    let up = TestUpstream::named("app");
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let conf = dir.path().join("gatehouse.yaml");
    std::fs::write(
        &conf,
        format!(
            "server:\n  threads: 1\n  pid_file: {d}/gatehouse.pid\n  upgrade_sock: {d}/upgrade.sock\n  grace_period: 1s\n  graceful_shutdown_timeout: 1s\nlisten: [\"127.0.0.1:{port}\"]\nadmin: {{ listen: \"[::]:{admin_port}\", insecure: true }}\nupstreams:\n  app: {{ targets: [{}] }}\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n",
            up.addr,
            d = dir.path().display()
        ),
    )
    .unwrap();
    let log = dir.path().join("gatehouse.log");
    let child = std::process::Command::new(BIN)
        .arg("-c")
        .arg(&conf)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _gw = scopeguard(child);
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let network = std::net::SocketAddr::new(network_address(), admin_port);
    let send = |to: std::net::SocketAddr, head: &str| {
        let text = raw_request(
            to,
            format!("{head}Content-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        RawResponse::parse(&text)
    };
    eventually(Duration::from_secs(20), "the admin listener is up", || {
        send(loopback, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
            .is_some_and(|r| r.status == 200)
    });
    let answer = |to, head: &str| {
        send(to, head).unwrap_or_else(|| {
            panic!(
                "no answer to {head:?} at {to}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
    };
    // From the network, a scraper's or a colleague's name for the host.
    for (target, content) in [
        ("/metrics", "# HELP"),
        ("/status", "\"routes\""),
        ("/", "<title>gatehouse</title>"),
    ] {
        let r = answer(
            network,
            &format!("GET {target} HTTP/1.1\r\nHost: gatehouse:{admin_port}\r\n"),
        );
        assert_eq!(r.status, 200, "{target}: {}", r.body);
        assert!(r.body.contains(content), "{target}: {}", r.body);
    }
    // Another site's page still cannot make a browser change anything.
    let r = answer(
        network,
        &format!("POST /reload HTTP/1.1\r\nHost: gatehouse:{admin_port}\r\nOrigin: http://evil.example\r\n"),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    // A public name is what a rebinding page would send, over loopback or
    // over the network: the guard stays.
    for to in [loopback, network] {
        let r = answer(
            to,
            &format!("GET /metrics HTTP/1.1\r\nHost: evil.example:{admin_port}\r\n"),
        );
        assert_eq!(r.status, 403, "{to}: {}", r.body);
    }
    let r = answer(
        loopback,
        &format!("GET /metrics HTTP/1.1\r\nHost: localhost:{admin_port}\r\n"),
    );
    assert_eq!(r.status, 200);
}
