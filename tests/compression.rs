//! Response compression end to end (SPEC section 6.4): each encoding
//! decoded back to the exact upstream bytes, negotiation by q-value, the
//! pass-through cases, `off`, and compression with the cache. The `br`
//! decoder here is strict: a stream without its last block (what Pingora's
//! own brotli encoder sends, cloudflare/pingora#1013) fails to decode.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;

/// 6 KB of JSON that compresses well.
fn json_body() -> String {
    let items: Vec<String> = (0..120)
        .map(|i| format!("{{\"id\":{i},\"name\":\"user number {i}\",\"active\":true}}"))
        .collect();
    format!("{{\"items\":[{}]}}", items.join(","))
}

fn upstream() -> TestUpstream {
    TestUpstream::with_handler("app", |req| {
        let path = req.target.split('?').next().unwrap_or("");
        let json = json_body();
        match path.rsplit('/').next().unwrap_or("") {
            "small" => Reply::typed(200, "application/json", "{\"ok\":true}"),
            "png" => Reply::typed(200, "image/png", &json),
            "encoded" => gzipped(&json),
            // nginx with `gzip on` and no `gzip_vary`: encoded for those
            // who ask, and no `Vary` to tell a cache so.
            "negotiated"
                if req
                    .header("accept-encoding")
                    .is_some_and(|a| a.contains("gzip")) =>
            {
                gzipped(&json)
            }
            "notransform" => {
                Reply::typed(200, "application/json", &json).header("cache-control", "no-transform")
            }
            "partial" => Reply::typed(206, "application/json", &json[..2000])
                .header("content-range", &format!("bytes 0-1999/{}", json.len())),
            "etagged" if req.header("if-none-match") == Some("\"e1\"") => {
                Reply::text(304, "").header("etag", "\"e1\"")
            }
            "etagged" => Reply::typed(200, "application/json", &json).header("etag", "\"e1\""),
            "tagged" => Reply::typed(200, "application/json", &json)
                .header("etag", "\"v1\"")
                .header("accept-ranges", "bytes"),
            "streamed" => {
                let mut r = Reply::typed(200, "text/plain; charset=utf-8", &json);
                r.chunked = Some(1000);
                r
            }
            _ => Reply::typed(200, "application/json; charset=utf-8", &json),
        }
    })
}

fn gzipped(text: &str) -> Reply {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, text.as_bytes()).unwrap();
    let mut r = Reply::typed(200, "application/json", "");
    r.body = gz.finish().unwrap();
    r.header("content-encoding", "gzip")
}

fn body(up: &TestUpstream) -> String {
    format!(
        "compression: {{ min_size: 1KiB, level: 6 }}
cache:
  max_size: 4MiB
upstreams:
  app:
    targets: [{}]
routes:
  - name: api
    match: {{ path_prefix: /api }}
    upstream: app
  - name: cached
    match: {{ path_prefix: /cached }}
    upstream: app
    cache: {{ ttl: 60s }}
  - name: revalidated
    match: {{ path_prefix: /short }}
    upstream: app
    cache: {{ ttl: 1s }}
  - name: raw
    match: {{ path_prefix: /raw }}
    upstream: app
    compression: off
  - name: onlytext
    match: {{ path_prefix: /text }}
    upstream: app
    compression: {{ types: [\"text/*\"], min_size: 10 }}
",
        up.addr
    )
}

struct Got {
    status: u16,
    encoding: Option<String>,
    vary: Vec<String>,
    length: Option<String>,
    x_cache: Option<String>,
    body: Vec<u8>,
}

fn fetch(gw: &Gateway, path: &str, accept: Option<&str>) -> Got {
    let mut req = client().get(gw.url(path));
    if let Some(a) = accept {
        req = req.header("Accept-Encoding", a);
    }
    let r = req.send().unwrap();
    let h = r.headers().clone();
    Got {
        status: r.status().as_u16(),
        encoding: h
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_string()),
        vary: h
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap().to_ascii_lowercase())
            .collect(),
        length: h
            .get("content-length")
            .map(|v| v.to_str().unwrap().to_string()),
        x_cache: h.get("x-cache").map(|v| v.to_str().unwrap().to_string()),
        body: r.bytes().unwrap().to_vec(),
    }
}

fn decode(encoding: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(data, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => {
            out = zstd::decode_all(data).unwrap();
        }
        other => panic!("unexpected encoding {other}"),
    }
    out
}

fn varies(g: &Got) -> bool {
    g.vary.iter().any(|v| v.contains("accept-encoding"))
}

#[test]
fn each_encoding_decodes_to_the_upstream_bytes_and_q_values_choose() {
    let up = upstream();
    let gw = gateway(&body(&up)).start();
    let original = json_body().into_bytes();
    for (accept, expect) in [
        ("gzip", "gzip"),
        ("zstd", "zstd"),
        ("br", "br"),
        ("gzip, deflate, br, zstd", "br"),
        ("gzip, br", "br"),
        ("br;q=0.5, zstd", "zstd"),
        ("zstd;q=0.5, gzip;q=0.8", "gzip"),
        ("br;q=0, zstd;q=0, *", "gzip"),
        ("*", "br"),
    ] {
        let g = fetch(&gw, "/api/users", Some(accept));
        assert_eq!(g.status, 200);
        assert_eq!(g.encoding.as_deref(), Some(expect), "{accept}");
        assert!(varies(&g), "{accept}: {:?}", g.vary);
        assert_ne!(
            g.length.as_deref(),
            Some(original.len().to_string().as_str())
        );
        assert!(
            g.body.len() < original.len() / 2,
            "{accept}: {} bytes",
            g.body.len()
        );
        assert_eq!(decode(expect, &g.body), original, "{accept}");
    }
    // A streamed (chunked) text body is compressed too.
    for encoding in ["gzip", "br"] {
        let g = fetch(&gw, "/text/streamed", Some(encoding));
        assert_eq!(g.encoding.as_deref(), Some(encoding));
        assert_eq!(decode(encoding, &g.body), original, "{encoding}");
    }
    // A strong validator of the upstream's bytes becomes weak, and ranges
    // of the upstream's bytes are no longer offered.
    for encoding in ["gzip", "br"] {
        let r = client()
            .get(gw.url("/api/tagged"))
            .header("Accept-Encoding", encoding)
            .send()
            .unwrap();
        assert_eq!(r.headers()["content-encoding"], encoding);
        assert_eq!(r.headers()["etag"], "W/\"v1\"", "{encoding}");
        assert!(r.headers().get("accept-ranges").is_none(), "{encoding}");
        assert!(r.headers().get("content-length").is_none(), "{encoding}");
        assert_eq!(decode(encoding, &r.bytes().unwrap()), original);
    }
}

#[test]
fn what_must_pass_unchanged_passes_unchanged() {
    let up = upstream();
    let gw = gateway(&body(&up)).start();
    let original = json_body().into_bytes();
    let same = |g: &Got, what: &str| {
        assert_eq!(g.status, 200, "{what}");
        assert_eq!(g.encoding, None, "{what}");
        assert_eq!(g.body, original, "{what}");
    };
    // A client that accepts none of ours, or none at all: identity, Vary.
    for accept in [
        None,
        Some("identity"),
        Some("gzip;q=0, br;q=0, zstd;q=0"),
        Some("deflate"),
        Some("br;q=0"),
    ] {
        let g = fetch(&gw, "/api/users", accept);
        same(&g, &format!("{accept:?}"));
        assert!(varies(&g), "{accept:?}");
        assert_eq!(g.length, Some(original.len().to_string()));
    }
    // Too small, not a listed type, no-transform, compression: off.
    let g = fetch(&gw, "/api/small", Some("gzip"));
    assert_eq!((g.encoding, g.body), (None, b"{\"ok\":true}".to_vec()));
    same(&fetch(&gw, "/api/png", Some("gzip")), "image/png");
    same(
        &fetch(&gw, "/api/notransform", Some("gzip")),
        "no-transform",
    );
    same(&fetch(&gw, "/raw/users", Some("gzip, br")), "off");
    same(
        &fetch(&gw, "/text/users", Some("gzip")),
        "not a text type on a text-only route",
    );
    // Encoded by the upstream: never encoded twice, never decoded.
    let g = fetch(&gw, "/api/encoded", Some("br, gzip"));
    assert_eq!(g.encoding.as_deref(), Some("gzip"));
    assert_eq!(decode("gzip", &g.body), original);
    let g = fetch(&gw, "/api/encoded", Some("br"));
    assert_eq!(
        g.encoding.as_deref(),
        Some("gzip"),
        "passed as the upstream sent it"
    );
    // A 206 and a HEAD.
    let g = fetch(&gw, "/api/partial", Some("gzip"));
    assert_eq!(g.status, 206);
    assert_eq!((g.encoding, g.body), (None, original[..2000].to_vec()));
    let r = client()
        .head(gw.url("/api/users"))
        .header("Accept-Encoding", "gzip")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-encoding").is_none());
}

#[test]
fn the_cache_never_serves_an_encoding_the_client_did_not_accept() {
    let up = upstream();
    let gw = gateway(&body(&up)).start();
    let original = json_body().into_bytes();
    let g = fetch(&gw, "/cached/users", Some("gzip"));
    assert_eq!(g.encoding.as_deref(), Some("gzip"));
    assert_eq!(decode("gzip", &g.body), original);
    for (accept, expect) in [
        (None, None),
        (Some("br"), Some("br")),
        (Some("identity"), None),
        (Some("zstd;q=1, gzip;q=0.5"), Some("zstd")),
        (Some("gzip"), Some("gzip")),
    ] {
        let r = client().get(gw.url("/cached/users"));
        let r = match accept {
            Some(a) => r.header("Accept-Encoding", a),
            None => r,
        };
        let r = r.send().unwrap();
        assert_eq!(r.headers()["x-cache"], "HIT", "{accept:?}");
        let encoding = r
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(encoding.as_deref(), expect, "{accept:?}");
        let bytes = r.bytes().unwrap().to_vec();
        match expect {
            Some(e) => assert_eq!(decode(e, &bytes), original),
            None => assert_eq!(bytes, original),
        }
    }
    assert_eq!(up.count(), 1, "served from one cached entry");
}

#[test]
fn a_body_the_upstream_encoded_without_vary_is_never_replayed_to_a_client_that_cannot_decode_it() {
    let up = upstream();
    let gw = gateway(&body(&up)).start();
    let original = json_body().into_bytes();
    // What a client gets decodes to the upstream's bytes, in an encoding it
    // asked for.
    let check = |path: &str, accept: Option<&str>| {
        let g = fetch(&gw, path, accept);
        assert_eq!(g.status, 200);
        match g.encoding.as_deref() {
            None => assert_eq!(g.body, original, "{path} {accept:?}"),
            Some(e) => {
                assert!(
                    accept.is_some_and(|a| a.contains(e)),
                    "{path}: {e} for a client accepting {accept:?}"
                );
                assert_eq!(decode(e, &g.body), original, "{path} {accept:?}");
            }
        }
        g
    };
    // The gzip client first: its entry is the upstream's gzip body.
    let g = check("/cached/a/negotiated", Some("gzip"));
    assert_eq!(
        (g.encoding.as_deref(), g.x_cache.as_deref()),
        (Some("gzip"), Some("MISS"))
    );
    assert!(g.vary.is_empty(), "the upstream sent no Vary: {:?}", g.vary);
    let g = check("/cached/a/negotiated", Some("gzip, deflate"));
    assert_eq!(
        (g.encoding.as_deref(), g.x_cache.as_deref()),
        (Some("gzip"), Some("HIT"))
    );
    for accept in [Some("identity"), None, Some("br")] {
        check("/cached/a/negotiated", accept);
    }
    // The identity client first: nobody gets what it cannot decode either.
    let g = check("/cached/b/negotiated", Some("identity"));
    assert_eq!((g.encoding, g.x_cache.as_deref()), (None, Some("MISS")));
    check("/cached/b/negotiated", Some("gzip"));
    let g = check("/cached/b/negotiated", None);
    assert_eq!((g.encoding, g.x_cache.as_deref()), (None, Some("HIT")));
    check("/cached/b/negotiated", Some("br"));
}

#[test]
fn a_br_body_replayed_after_a_revalidation_is_a_finished_stream() {
    let up = upstream();
    let gw = gateway(&body(&up)).start();
    let original = json_body().into_bytes();
    let mut revalidated = false;
    eventually(Duration::from_secs(6), "a 304 revalidation", || {
        let g = fetch(&gw, "/short/etagged", Some("br"));
        assert_eq!(g.encoding.as_deref(), Some("br"));
        // Every answer, the one replayed from the revalidated entry too
        // (which Pingora ends with a Done task, not a last body chunk).
        assert_eq!(decode("br", &g.body), original);
        revalidated |= up
            .requests()
            .iter()
            .any(|r| r.header("if-none-match").is_some());
        revalidated
    });
    // The answer after the revalidation, once more.
    let g = fetch(&gw, "/short/etagged", Some("br"));
    assert_eq!(decode("br", &g.body), original);
}

#[test]
fn compression_mistakes_are_config_errors_with_their_path() {
    let base = "listen: [127.0.0.1:0]\nupstreams:\n  app: { targets: ['127.0.0.1:9'] }\n";
    let route = |extra: &str| {
        format!("routes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n{extra}")
    };
    let cases = [
        (
            format!("{base}compression: {{ level: 12 }}\n"),
            "compression.level",
            "from 1 to 9",
        ),
        (
            format!("{base}{}", route("    compression: { types: [json] }\n")),
            "routes[0].compression.types[0]",
            "not a media type",
        ),
        (
            format!("{base}{}", route("    compression: { types: [] }\n")),
            "routes[0].compression.types",
            "at least one",
        ),
        (
            format!(
                "{base}{}",
                route("    compression: { encodings: [lzma] }\n")
            ),
            "routes[0].compression.encodings",
            "unknown key",
        ),
        (
            format!("{base}{}", route("    compression: on\n")),
            "routes[0].compression",
            "mapping or off",
        ),
        (
            format!("{base}compression: {{ min_size: lots }}\n"),
            "compression.min_size",
            "",
        ),
    ];
    assert_config_errors(&cases, None);
}

#[test]
fn http2_clients_get_compressed_answers_too() {
    let up = upstream();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path(), &["gw.test"]);
    let gw = gateway(&body(&up)).tls(&cert, &key).start();
    let addr = gw.tls_addr.unwrap();
    for encoding in ["gzip", "zstd", "br"] {
        let r = common::h2client::get(
            addr,
            &cert,
            "gw.test",
            "/api/list",
            &[("accept-encoding", encoding)],
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), Some(encoding));
        assert!(r
            .header("content-length")
            .is_none_or(|l| l == r.body.len().to_string()));
        assert_eq!(
            decode(encoding, &r.body),
            json_body().as_bytes(),
            "{encoding}"
        );
    }
    let r = common::h2client::get(addr, &cert, "gw.test", "/api/list", &[]).unwrap();
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.body, json_body().as_bytes());
}
