//! Hostile input against the policies: cache keys a client could poison,
//! body rules a client (or an upstream) could slip past, forwarding fields
//! a client could forge, key rotation and placeholder edge cases. Each test
//! is one attack, and checks what the client and the upstream actually see.

mod common;

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn x_cache(r: &RawResponse) -> &str {
    r.header("x-cache").unwrap_or("")
}

/// The cache key holds the host with its port, exactly as the upstream
/// receives it (HTTP/1 `Host`, HTTP/2 `:authority`), for proxied and
/// aggregated routes alike: a body built for one port is never served to
/// another.
#[test]
fn cache_keys_hold_the_port_the_upstream_sees() {
    let app = TestUpstream::with_handler("app", |r| {
        Reply::typed(
            200,
            "text/plain",
            &format!("http://{}/next", r.header("host").unwrap_or("")),
        )
    });
    let parts = TestUpstream::with_handler("parts", |r| {
        Reply::typed(
            200,
            "application/json",
            &json!({ "host": r.header("x-forwarded-host") }).to_string(),
        )
    });
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path(), &["gw.test"]);
    let body = [
        format!(
            "upstreams:\n  app:\n    targets: [{}]\n  parts:\n    targets: [{}]\n",
            app.addr, parts.addr
        ),
        "cache:\n  max_size: 4MiB\nroutes:\n".to_string(),
        "  - name: cached\n    match: { path_prefix: /c }\n    upstream: app\n    cache: { ttl: 30s }\n".to_string(),
        "  - name: agg\n    match: { path: /agg }\n    cache: { ttl: 30s }\n".to_string(),
        "    aggregate:\n      parts:\n        - { key: p, upstream: parts, path: /part }\n".to_string(),
    ]
    .concat();
    let gw = gateway(&body).tls(&cert, &key).start();

    let get = |path: &str, host: &str| send_raw(gw.addr, "GET", path, &[("Host", host)]);
    let poison = get("/c/page", "victim.test:6666");
    assert_eq!(x_cache(&poison), "MISS");
    assert_eq!(poison.body, "http://victim.test:6666/next");
    let victim = get("/c/page", "victim.test");
    assert_eq!(x_cache(&victim), "MISS", "{victim:?}");
    assert_eq!(victim.body, "http://victim.test/next");
    // Each host keeps its own entry.
    assert_eq!(x_cache(&get("/c/page", "victim.test:6666")), "HIT");
    let again = get("/c/page", "victim.test");
    assert_eq!(
        (x_cache(&again), again.body.as_str()),
        ("HIT", "http://victim.test/next")
    );

    // HTTP/2: the authority the upstream receives as Host.
    let tls = gw.tls_addr.unwrap();
    let h2 = |authority: &str| h2client::get(tls, &cert, authority, "/c/h2", &[]).unwrap();
    let poison = h2("victim.test:6666");
    assert_eq!(poison.header("x-cache"), Some("MISS"));
    let victim = h2("victim.test");
    assert_eq!(victim.header("x-cache"), Some("MISS"));
    assert_eq!(victim.body, b"http://victim.test/next");

    // The aggregate cache: the parts are told the client's host.
    let poison = get("/agg", "victim.test:6666");
    assert_eq!(x_cache(&poison), "MISS");
    let victim = get("/agg", "victim.test");
    assert_eq!(x_cache(&victim), "MISS", "{victim:?}");
    let v: Value = serde_json::from_str(&victim.body).unwrap();
    assert_eq!(v, json!({"p": {"host": "victim.test"}}));
}

/// A fill over plain HTTP is never served to an HTTPS client: the scheme
/// the upstream is told is part of the key.
#[test]
fn cache_keys_hold_the_scheme() {
    let app = TestUpstream::with_handler("app", |r| {
        Reply::typed(
            200,
            "text/plain",
            &format!(
                "{}://{}/next",
                r.header("x-forwarded-proto").unwrap_or(""),
                r.header("host").unwrap_or("")
            ),
        )
    });
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path(), &["gw.test"]);
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\ncache:\n  max_size: 4MiB\nroutes:\n  - name: cached\n    match: {{ path_prefix: /c }}\n    upstream: app\n    cache: {{ ttl: 30s }}\n",
        app.addr
    ))
    .tls(&cert, &key)
    .start();
    let plain = send_raw(gw.addr, "GET", "/c/s", &[("Host", "api.test")]);
    assert_eq!(
        (x_cache(&plain), plain.body.as_str()),
        ("MISS", "http://api.test/next")
    );
    let tls = gw.tls_addr.unwrap();
    let https = reqwest::blocking::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .http1_only()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap(),
        )
        .resolve("gw.test", tls)
        .build()
        .unwrap();
    let r = https
        .get(format!("https://gw.test:{}/c/s", tls.port()))
        .header("Host", "api.test")
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(r.text().unwrap(), "https://api.test/next");
    assert_eq!(app.count(), 2);
}

const SECRET_DOC: &str = r#"{"id":1,"password":"hunter2","name":"ann","pad":"0123456789"}"#;

/// `Range` cannot cut a removed field out of the filter's sight: on a
/// route whose rules remove fields the upstream never sees `Range` or
/// `If-Range`, the client gets the whole filtered `200`, and an upstream
/// `206` is refused.
#[test]
fn range_requests_cannot_slice_past_removed_fields() {
    let app = TestUpstream::with_handler("app", |r| {
        let ranged = r.header("range").is_some() || r.target == "/always206";
        if ranged {
            let part = &SECRET_DOC[1..];
            return Reply::typed(206, "application/json", part).header(
                "content-range",
                &format!("bytes 1-{}/{}", SECRET_DOC.len() - 1, SECRET_DOC.len()),
            );
        }
        Reply::typed(200, "application/json", SECRET_DOC)
    });
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\ncache:\n  max_size: 4MiB\nroutes:\n  - name: filtered\n    match: {{ path_prefix: / }}\n    upstream: app\n    response_body: {{ remove_fields: [password] }}\n  - name: cached\n    match: {{ path_prefix: /cached }}\n    upstream: app\n    cache: {{ ttl: 30s }}\n    response_body: {{ remove_fields: [password] }}\n",
        app.addr
    ))
    .start();
    let expected = json!({"id": 1, "name": "ann", "pad": "0123456789"});
    for path in ["/doc", "/cached/doc", "/cached/doc"] {
        let r = client()
            .get(gw.url(path))
            .header("Range", "bytes=1-")
            .header("If-Range", "\"v1\"")
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers().get("content-range").is_none(), "{path}");
        let text = r.text().unwrap();
        assert!(!text.contains("hunter2"), "{path}: {text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), expected);
    }
    for seen in app.requests() {
        assert_eq!(seen.header("range"), None, "{seen:?}");
        assert_eq!(seen.header("if-range"), None, "{seen:?}");
    }
    let before = app.count();
    let r = client().get(gw.url("/always206")).send().unwrap();
    assert_eq!(app.count(), before + 1);
    let body = assert_problem(r, 502);
    assert!(!body.to_string().contains("hunter2"));
}

/// What a client sees of a response: its status and whole body, or an
/// error when the gateway cut the response off.
fn outcome(r: reqwest::Result<reqwest::blocking::Response>) -> Result<(u16, String), String> {
    let r = r.map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let body = r.bytes().map_err(|e| e.to_string())?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn brotli_encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
    w.write_all(data).unwrap();
    drop(w);
    out
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// Request bodies on a route that removes fields: every RFC 8259 document
/// is read and filtered (numbers of any size as written, lone surrogate
/// escapes, deep nesting, encoded bodies); what cannot be read, or is over
/// `max_transform_size`, is refused with a 400 and never reaches the
/// upstream.
#[test]
fn request_body_rules_read_every_document_and_refuse_the_rest() {
    let app = TestUpstream::with_handler("app", |_| Reply::text(200, "ok"));
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: rules\n    match: {{ path_prefix: / }}\n    upstream: app\n    request_body: {{ remove_fields: [role, \"user.role\"] }}\n",
        app.addr
    ))
    .server("max_transform_size: 4KiB")
    .start();
    let deep = nested(1000);
    let read: Vec<(String, String)> = vec![
        (
            r#"{"role":"admin","n":1e400}"#.into(),
            r#"{"n":1e400}"#.into(),
        ),
        (
            r#"{"role":"admin","big":123456789012345678901234567890.5}"#.into(),
            r#"{"big":123456789012345678901234567890.5}"#.into(),
        ),
        (
            r#"{"role":"admin","s":"\ud800"}"#.into(),
            r#"{"s":"\ud800"}"#.into(),
        ),
        (
            r#"{"r\u006fle":"admin","ok":1}"#.into(),
            r#"{"ok":1}"#.into(),
        ),
        (
            r#"{"role":"user","role":"admin","ok":1}"#.into(),
            r#"{"ok":1}"#.into(),
        ),
        (
            format!(r#"{{"role":"admin","d":{deep}}}"#),
            format!(r#"{{"d":{deep}}}"#),
        ),
        (
            r#"{"user":{"role":"admin","id":7}}"#.into(),
            r#"{"user":{"id":7}}"#.into(),
        ),
    ];
    let c = client();
    for (sent, expected) in &read {
        let r = c
            .post(gw.url("/u"))
            .header("content-type", "application/json")
            .body(sent.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{sent}");
        assert_eq!(
            String::from_utf8_lossy(&app.last().body),
            *expected,
            "{sent}"
        );
    }
    // Field names match without case, as Go's encoding/json binds them.
    for (sent, expected) in [
        (r#"{"ROLE":"admin","ok":1}"#, r#"{"ok":1}"#),
        (r#"{"rOlE":"admin","ok":1}"#, r#"{"ok":1}"#),
        (r#"{"User":{"ROLE":"admin"}}"#, r#"{"User":{}}"#),
    ] {
        c.post(gw.url("/u"))
            .header("content-type", "application/json")
            .body(sent)
            .send()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&app.last().body),
            expected,
            "{sent}"
        );
    }
    // A JSON body sent as text/plain, or with no type, is read too (many
    // frameworks decode it as JSON anyway); one that is not JSON passes.
    for content_type in [Some("text/plain"), None] {
        let mut req = c.post(gw.url("/u")).body(r#"{"role":"admin","ok":1}"#);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        assert_eq!(req.send().unwrap().status(), 200);
        assert_eq!(app.last().body, br#"{"ok":1}"#, "{content_type:?}");
    }
    c.post(gw.url("/u"))
        .header("content-type", "text/plain")
        .body("role=admin")
        .send()
        .unwrap();
    assert_eq!(app.last().body, b"role=admin");
    // Encoded bodies are decoded, filtered and sent plain.
    let doc = br#"{"role":"admin","ok":true}"#;
    for (coding, bytes) in [
        ("gzip", gzip(doc)),
        ("deflate", deflate(doc)),
        ("br", brotli_encode(doc)),
    ] {
        let r = c
            .post(gw.url("/u"))
            .header("content-type", "application/json")
            .header("content-encoding", coding)
            .body(bytes)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{coding}");
        let seen = app.last();
        assert_eq!(seen.body, br#"{"ok":true}"#, "{coding}");
        assert_eq!(seen.header("content-encoding"), None, "{coding}");
    }
    // The rest is refused and never reaches the upstream.
    let over = json!({"role": "admin", "pad": "x".repeat(5000)}).to_string();
    let refused: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("malformed", br#"{"role":"admin","#.to_vec(), None),
        ("trailing garbage", br#"{"role":"admin"} x"#.to_vec(), None),
        (
            "invalid UTF-8",
            b"{\"role\":\"admin\",\"s\":\"\xff\"}".to_vec(),
            None,
        ),
        ("over the cap", over.clone().into_bytes(), None),
        ("unknown encoding", doc.to_vec(), Some("compress")),
        ("bad gzip", b"not gzip".to_vec(), Some("gzip")),
    ];
    let before = app.count();
    // Two types: which one would the upstream read?
    let r = send_raw(
        gw.addr,
        "POST",
        "/u",
        &[
            ("Content-Type", "text/plain"),
            ("Content-Type", "application/json"),
            ("Content-Length", "16"),
        ],
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(app.count(), before);
    for (what, body, coding) in refused {
        let mut req = c
            .post(gw.url("/u"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(coding) = coding {
            req = req.header("content-encoding", coding);
        }
        assert_problem(req.send().unwrap(), 400);
        assert_eq!(app.count(), before, "{what} reached the upstream");
    }
    // Over the cap without a declared length: refused the same way.
    let chunked = reqwest::blocking::Body::new(std::io::Cursor::new(over.into_bytes()));
    let r = c
        .post(gw.url("/u"))
        .header("content-type", "application/json")
        .body(chunked)
        .send()
        .unwrap();
    assert_problem(r, 400);
    // HTTP/2 need not declare a body's length: it is read all the same.
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path(), &["gw.test"]);
    let tls_gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: rules\n    match: {{ path_prefix: / }}\n    upstream: app\n    request_body: {{ remove_fields: [role] }}\n",
        app.addr
    ))
    .tls(&cert, &key)
    .start();
    let h2_req = http::Request::builder()
        .method("POST")
        .uri("https://gw.test/u")
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let r = h2client::send_with_body(
        tls_gw.tls_addr.unwrap(),
        &cert,
        h2_req,
        Some(br#"{"role":"admin","ok":2}"#.to_vec()),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(app.last().body, br#"{"ok":2}"#);
    let before = app.count();
    // A sentinel: the refused requests were never recorded, though the
    // upstream is alive.
    c.post(gw.url("/u"))
        .header("content-type", "application/json")
        .body(r#"{"sentinel":1}"#)
        .send()
        .unwrap();
    assert_eq!(app.count(), before + 1);
    assert_eq!(app.last().body, br#"{"sentinel":1}"#);
}

/// Response bodies on a route that removes fields: read whatever their
/// form, decoded when encoded; refused (502, or cut off when the head has
/// already gone) when they cannot be read, and never passed on with the
/// removed fields in them.
#[test]
fn response_body_rules_never_pass_removed_fields() {
    let deep = nested(1000);
    let deep_doc = format!(r#"{{"password":"x","d":{deep}}}"#);
    let plain = br#"{"password":"hunter2","ok":true}"#.to_vec();
    let big = json!({"password": "hunter2", "pad": "y".repeat(5000)}).to_string();
    let app = TestUpstream::with_handler("app", move |r| {
        let json = |body: &[u8]| {
            let mut rep = Reply::typed(200, "application/json", "");
            rep.body = body.to_vec();
            rep
        };
        match r.target.as_str() {
            "/number" => json(br#"{"password":"x","n":1e400}"#),
            "/surrogate" => json(br#"{"password":"x","s":"\udfff"}"#),
            "/deep" => json(deep_doc.as_bytes()),
            "/gzip" => json(&gzip(&plain)).header("content-encoding", "gzip"),
            "/deflate" => json(&deflate(&plain)).header("content-encoding", "deflate"),
            "/br" => json(&brotli_encode(&plain)).header("content-encoding", "br"),
            "/zstd" => {
                json(&zstd::encode_all(&plain[..], 3).unwrap()).header("content-encoding", "zstd")
            }
            "/compress" => json(&plain).header("content-encoding", "compress"),
            "/big" => json(big.as_bytes()),
            "/big-chunked" => {
                let mut rep = json(big.as_bytes());
                rep.chunked = Some(700);
                rep.chunk_delay = Duration::from_millis(20);
                rep
            }
            "/broken" => json(br#"{"password":"hunter2","#),
            "/broken-late" => {
                let mut rep = json(br#"{"ok":1,"password":"hunter2","#);
                rep.chunked = Some(8);
                rep.chunk_delay = Duration::from_millis(30);
                rep
            }
            _ => json(&plain),
        }
    });
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: rules\n    match: {{ path_prefix: / }}\n    upstream: app\n    response_body: {{ remove_fields: [password] }}\n",
        app.addr
    ))
    .server("max_transform_size: 4KiB")
    .start();
    let c = client();
    let read = [
        ("/number", r#"{"n":1e400}"#.to_string()),
        ("/surrogate", r#"{"s":"\udfff"}"#.to_string()),
        ("/deep", format!(r#"{{"d":{deep}}}"#)),
        ("/gzip", r#"{"ok":true}"#.to_string()),
        ("/deflate", r#"{"ok":true}"#.to_string()),
        ("/br", r#"{"ok":true}"#.to_string()),
        ("/zstd", r#"{"ok":true}"#.to_string()),
    ];
    for (path, expected) in read {
        let r = c.get(gw.url(path)).send().unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers().get("content-encoding").is_none(), "{path}");
        assert_eq!(r.text().unwrap(), expected, "{path}");
    }
    // Refused at the head: a clean 502.
    for path in ["/compress", "/big"] {
        let r = c.get(gw.url(path)).send().unwrap();
        let body = assert_problem(r, 502);
        assert!(!body.to_string().contains("hunter2"), "{path}");
    }
    // Found unreadable only in the body: a 502 when the head is still
    // held, else the response is cut off. Never the field.
    for path in ["/broken", "/big-chunked", "/broken-late"] {
        match outcome(c.get(gw.url(path)).send()) {
            Ok((status, body)) => {
                assert_eq!(status, 502, "{path}: {body}");
                assert!(!body.contains("hunter2"), "{path}: {body}");
            }
            Err(_cut_off) => {}
        }
    }
    // The gateway is fine afterwards.
    assert_eq!(
        c.get(gw.url("/plain")).send().unwrap().text().unwrap(),
        r#"{"ok":true}"#
    );
}

/// The upstream hears about the client only from the gateway: its own
/// `Forwarded` element and `X-Real-IP`; a client's `Forwarded` passes only
/// from a trusted proxy; `X-Original-URL` and `X-Rewrite-URL` never.
#[test]
fn forwarding_fields_are_the_gateways_own() {
    let app = TestUpstream::with_handler("app", |_| Reply::text(200, "ok"));
    let body = format!(
        "upstreams:\n  app:\n    targets: [{}]\nroutes:\n  - name: all\n    match: {{ path_prefix: / }}\n    upstream: app\n",
        app.addr
    );
    let forged = [
        ("Host", "gw.test"),
        ("Forwarded", "for=6.6.6.6;host=evil.test;proto=https"),
        ("X-Real-IP", "6.6.6.6"),
        ("X-Original-URL", "/admin"),
        ("X-Rewrite-URL", "/admin"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-Port", "6666"),
        ("X-Forwarded-Prefix", "/evil"),
        ("Front-End-Https", "on"),
    ];
    let gw = gateway(&body).start();
    assert_eq!(send_raw(gw.addr, "GET", "/a", &forged).status, 200);
    let seen = app.last();
    assert_eq!(
        seen.header_all("forwarded"),
        vec!["for=127.0.0.1;proto=http;host=gw.test"]
    );
    assert_eq!(seen.header_all("x-real-ip"), vec!["127.0.0.1"]);
    assert_eq!(seen.header("x-original-url"), None);
    assert_eq!(seen.header("x-rewrite-url"), None);
    for believed in ["x-forwarded-port", "x-forwarded-prefix", "front-end-https"] {
        assert_eq!(seen.header(believed), None, "{believed} from a client");
    }

    // Behind a trusted proxy, its chain is extended.
    let gw = gateway(&body)
        .server("trusted_proxies: [127.0.0.1]")
        .start();
    assert_eq!(send_raw(gw.addr, "GET", "/a", &forged).status, 200);
    let seen = app.last();
    assert_eq!(
        seen.header_all("forwarded"),
        vec!["for=6.6.6.6;host=evil.test;proto=https, for=127.0.0.1;proto=http;host=gw.test"]
    );
    assert_eq!(seen.header_all("x-real-ip"), vec!["203.0.113.7"]);
    assert_eq!(seen.header("x-original-url"), None);
    assert_eq!(seen.header("x-rewrite-url"), None);
    assert_eq!(seen.header("x-forwarded-port"), Some("6666"));
    assert_eq!(seen.header("x-forwarded-prefix"), Some("/evil"));
}

/// What a trusted proxy tells the upstream of the original request is in
/// the cache key too: a page built for one `X-Forwarded-Port` or
/// `Forwarded` host is not served for another.
#[test]
fn cache_keys_hold_what_a_trusted_proxy_told_the_upstream() {
    let app = TestUpstream::with_handler("app", |r| {
        let told = |n: &str| r.header(n).unwrap_or("-").to_string();
        Reply::typed(
            200,
            "text/plain",
            &format!("{} {}", told("x-forwarded-port"), told("forwarded")),
        )
    });
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\ncache:\n  max_size: 4MiB\nroutes:\n  - name: cached\n    match: {{ path_prefix: /c }}\n    upstream: app\n    cache: {{ ttl: 30s }}\n",
        app.addr
    ))
    .server("trusted_proxies: [127.0.0.1]")
    .start();
    let get = |extra: &[(&str, &str)]| {
        let mut h = vec![("Host", "api.test")];
        h.extend_from_slice(extra);
        send_raw(gw.addr, "GET", "/c/page", &h)
    };
    assert_eq!(x_cache(&get(&[("X-Forwarded-Port", "6666")])), "MISS");
    let other = get(&[("X-Forwarded-Port", "443")]);
    assert_eq!(x_cache(&other), "MISS");
    assert!(other.body.starts_with("443 "), "{other:?}");
    assert_eq!(x_cache(&get(&[("Forwarded", "host=evil.test")])), "MISS");
    let plain = get(&[]);
    assert_eq!(x_cache(&plain), "MISS");
    assert_eq!(x_cache(&get(&[])), "HIT");
}

/// A key published right after a scheduled JWK set fetch is found by an
/// early refresh: only early refreshes are spaced apart.
#[test]
fn a_key_rotated_right_after_a_scheduled_fetch_is_found() {
    use common::jwt::{claims, jwks, mint};
    use jsonwebtoken::Algorithm;
    let doc = Arc::new(Mutex::new(jwks(&[("rsa1.pem", "key-a")])));
    let served = Arc::clone(&doc);
    let idp = TestUpstream::with_handler("idp", move |_| {
        Reply::typed(200, "application/json", &served.lock().unwrap())
    });
    let app = TestUpstream::with_handler("app", |_| Reply::text(200, "ok"));
    let gw = gateway(&format!(
        "upstreams:\n  app:\n    targets: [{}]\nauth:\n  jwt:\n    idp:\n      algorithms: [RS256]\n      jwks_url: http://{}/keys\n      jwks_refresh: 10m\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n    auth: idp\n",
        app.addr, idp.addr
    ))
    .start();
    let get = |token: &str| {
        client()
            .get(gw.url("/x"))
            .bearer_auth(token)
            .send()
            .unwrap()
            .status()
    };
    let a = mint(Algorithm::RS256, "rsa1.pem", Some("key-a"), &claims("a"));
    assert_eq!(get(&a), 200);
    assert_eq!(idp.count(), 1, "one scheduled fetch so far");
    *doc.lock().unwrap() = jwks(&[("rsa1.pem", "key-a"), ("rsa2.pem", "key-b")]);
    let b = mint(Algorithm::RS256, "rsa2.pem", Some("key-b"), &claims("b"));
    assert_eq!(get(&b), 200, "the rotated key was not looked for");
    assert_eq!(idp.count(), 2);
    // Early refreshes stay spaced apart.
    let unknown = mint(Algorithm::RS256, "rsa2.pem", Some("key-c"), &claims("c"));
    assert_eq!(get(&unknown), 401);
    assert_eq!(idp.count(), 2);
}

/// A placeholder value that is a dot segment is the client's error.
#[test]
fn a_dot_placeholder_is_the_clients_error() {
    let parts =
        TestUpstream::with_handler("parts", |_| Reply::typed(200, "application/json", "{}"));
    let gw = gateway(&format!(
        "upstreams:\n  parts:\n    targets: [{}]\nroutes:\n  - name: agg\n    match: {{ path: /agg }}\n    aggregate:\n      parts:\n        - {{ key: a, upstream: parts, path: \"/orders/{{query.u}}\" }}\n        - {{ key: b, upstream: parts, path: /b, required: false }}\n",
        parts.addr
    ))
    .start();
    for q in ["u=.", "u=..", "u=%2e", "u=%2E%2E"] {
        let r = client().get(gw.url(&format!("/agg?{q}"))).send().unwrap();
        assert_problem(r, 400);
    }
    assert_eq!(parts.count(), 0);
    let r = client().get(gw.url("/agg?u=7")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(parts.count(), 2);
}

/// An aggregate answer is the route's response: its body rules apply to it
/// like to any other, before it is cached.
#[test]
fn body_rules_apply_to_aggregate_answers() {
    let parts = TestUpstream::with_handler("parts", |_| {
        Reply::typed(200, "application/json", r#"{"id":1,"password":"hunter2"}"#)
    });
    let gw = gateway(&format!(
        "upstreams:\n  parts:\n    targets: [{}]\ncache:\n  max_size: 4MiB\nroutes:\n  - name: agg\n    match: {{ path: /agg }}\n    cache: {{ ttl: 30s }}\n    response_body: {{ remove_fields: [\"user.password\", \"orders.password\"] }}\n    aggregate:\n      parts:\n        - {{ key: user, upstream: parts, path: /u }}\n        - {{ key: orders, upstream: parts, path: /o }}\n",
        parts.addr
    ))
    .start();
    for x_cache in ["MISS", "HIT"] {
        let r = client().get(gw.url("/agg")).send().unwrap();
        assert_eq!(r.headers()["x-cache"], x_cache);
        assert_eq!(r.text().unwrap(), r#"{"user":{"id":1},"orders":{"id":1}}"#);
    }
}
