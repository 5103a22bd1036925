//! API keys end to end (SPEC section 6.3): keys by header and by query
//! parameter, stored as digests; the key removed before forwarding and
//! never logged; the consumer forwarded (the client's own value replaced),
//! as the access log's `user`, for `require_claims` and per-consumer rate
//! limits; routes taking a JWT or a key; a reload picking up an edited
//! keys file (and a broken one changing nothing); `-t` errors.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

const ACME_KEY: &str = "acme-key-0f3c9a1e77d24b5c";
const BOB_KEY: &str = "bob-key-5d81e0c3aa9f4e27";
const CAROL_KEY: &str = "carol-key-c27d1f90b3e4a658";

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn write_keys(path: &Path, consumers: &[(&str, &str, &str)]) {
    let mut text = String::new();
    for (consumer, key, tier) in consumers {
        text.push_str(&format!(
            "- {{ consumer: {consumer}, sha256: \"{}\", tier: {tier} }}\n",
            sha256_hex(key)
        ));
    }
    std::fs::write(path, text).unwrap();
}

fn config(up: &TestUpstream, keys: &Path, access_log: &Path) -> String {
    format!(
        "access_log: {log}
{provider}      forward_claims: {{ sub: X-User }}
  api_keys:
    partners:
      from: header:X-API-Key
      keys_file: {keys}
      forward_consumer: X-Consumer
    by_query:
      from: query:api_key
      keys_file: {keys}
      forward_consumer: X-Consumer
upstreams:
  app:
    targets: [{addr}]
  nowhere:
    targets: [127.0.0.1:9]
    retries: 0
routes:
  - name: header
    match: {{ path_prefix: /h }}
    upstream: app
    auth: partners
  - name: query
    match: {{ path_prefix: /q }}
    upstream: app
    auth: by_query
  - name: gold
    match: {{ path_prefix: /gold }}
    upstream: app
    auth: {{ api_key: partners, require_claims: {{ tier: [gold] }} }}
  - name: either
    match: {{ path_prefix: /either }}
    upstream: app
    auth: [main, partners]
  - name: limited
    match: {{ path_prefix: /limited }}
    upstream: app
    auth: partners
    rate_limit: {{ requests: 2, per: 1m, key: consumer }}
  - name: cached
    match: {{ path_prefix: /cached }}
    upstream: app
    auth: [main, partners]
    cache: {{ ttl: 30s }}
  - name: dead
    match: {{ path_prefix: /dead }}
    upstream: nowhere
    auth: by_query
cache:
  max_size: 1MiB
",
        log = access_log.display(),
        provider = common::jwt::rs256_provider("main"),
        keys = keys.display(),
        addr = up.addr,
    )
}

struct Setup {
    up: TestUpstream,
    gw: Gateway,
    keys: std::path::PathBuf,
    access_log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("partners.yaml");
    write_keys(
        &keys,
        &[("acme", ACME_KEY, "gold"), ("bob", BOB_KEY, "silver")],
    );
    let access_log = dir.path().join("access.log");
    // Each answer numbered, so a cached one is recognizable.
    let n = std::sync::atomic::AtomicUsize::new(0);
    let up = TestUpstream::with_handler("app", move |_| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Reply::text(200, &format!("answer {i}"))
    });
    let gw = gateway(&config(&up, &keys, &access_log)).start();
    Setup {
        up,
        gw,
        keys,
        access_log,
        _dir: dir,
    }
}

fn with_key(gw: &Gateway, path: &str, key: &str) -> reqwest::blocking::Response {
    client()
        .get(gw.url(path))
        .header("X-API-Key", key)
        .send()
        .unwrap()
}

fn access_lines(path: &Path, at_least: usize) -> Vec<Value> {
    let mut lines = Vec::new();
    eventually(Duration::from_secs(5), "access log lines", || {
        lines = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        lines.len() >= at_least
    });
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn keys_by_header_pass_as_their_consumer_and_never_reach_the_upstream() {
    let s = setup();
    let gw = &s.gw;

    // No key, an unknown key, two keys: 401 with the ApiKey challenge, and
    // the upstream never asked.
    let r = client().get(gw.url("/h/a")).send().unwrap();
    assert_eq!(r.headers()["www-authenticate"], "ApiKey");
    let p = assert_problem(r, 401);
    assert_eq!(p["detail"], "an API key is required");
    let r = with_key(gw, "/h/a", "not-a-key");
    assert_eq!(r.headers()["www-authenticate"], "ApiKey");
    assert_problem(r, 401);
    // The digest itself is not a key.
    assert_problem(with_key(gw, "/h/a", &sha256_hex(ACME_KEY)), 401);
    let two = client()
        .get(gw.url("/h/a"))
        .header("X-API-Key", ACME_KEY)
        .header("X-API-Key", "other")
        .send()
        .unwrap();
    assert_problem(two, 401);
    assert_eq!(s.up.count(), 0);

    // A valid key: the consumer goes upstream (the client's own value of
    // that header replaced, underscore spellings too); the key does not.
    let r = client()
        .get(gw.url("/h/a"))
        .header("X-API-Key", ACME_KEY)
        .header("X-Consumer", "admin")
        .header("X_Consumer", "admin")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = s.up.last();
    assert_eq!(seen.header_all("x-consumer"), ["acme"]);
    assert_eq!(seen.header("x_consumer"), None);
    assert_eq!(seen.header("x-api-key"), None);

    // Where a token passed, the client's X-Consumer is removed all the
    // same: the header is set only from a verified key.
    let r = client()
        .get(gw.url("/either/x"))
        .header("X-Consumer", "admin")
        .bearer_auth(common::jwt::rs256_token("ann"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.up.last().header("x-consumer"), None);

    // The access log names the consumer and holds no key.
    let lines = access_lines(&s.access_log, 6);
    let text = std::fs::read_to_string(&s.access_log).unwrap();
    assert!(
        !text.contains(ACME_KEY) && !text.contains("not-a-key"),
        "{text}"
    );
    let passed: Vec<&Value> = lines.iter().filter(|l| l["status"] == 200).collect();
    assert_eq!(passed[0]["user"], "acme", "{lines:?}");

    // The failures are counted by reason.
    let m = metrics_text(gw);
    assert!(
        m.contains("reason=\"missing_api_key\"") && m.contains("reason=\"unknown_api_key\""),
        "{m}"
    );
}

#[test]
fn keys_by_query_are_removed_from_the_query_the_upstream_sees() {
    let s = setup();
    let gw = &s.gw;
    let r = client()
        .get(gw.url(&format!("/q/items?a=1&api_key={BOB_KEY}&b=2")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = s.up.last();
    assert_eq!(seen.target, "/q/items?a=1&b=2");
    assert_eq!(seen.header("x-consumer"), Some("bob"));
    let r = client()
        .get(gw.url(&format!("/q/items?api_key={BOB_KEY}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.up.last().target, "/q/items");
    // In a header it is not this provider's key.
    let r = with_key(gw, "/q/items", BOB_KEY);
    assert_problem(r, 401);
    assert_problem(
        client()
            .get(gw.url("/q/items?api_key=wrong"))
            .send()
            .unwrap(),
        401,
    );
    let text = std::fs::read_to_string(&s.access_log).unwrap_or_default();
    assert!(!text.contains(BOB_KEY), "{text}");

    // An upstream failure is logged by the gateway, naming the request
    // without its query.
    let r = client()
        .get(gw.url(&format!("/dead/x?api_key={BOB_KEY}")))
        .send()
        .unwrap();
    assert_problem(r, 502);
    eventually(Duration::from_secs(5), "the failure logged", || {
        gw.log_text().contains("/dead/x")
    });
    let log = gw.log_text();
    assert!(!log.contains(BOB_KEY), "{log}");
}

#[test]
fn require_claims_match_the_consumers_fields() {
    let s = setup();
    assert_eq!(with_key(&s.gw, "/gold/x", ACME_KEY).status(), 200);
    let r = with_key(&s.gw, "/gold/x", BOB_KEY);
    assert_problem(r, 403);
    assert_eq!(s.up.count(), 1);
}

#[test]
fn a_route_takes_a_token_or_a_key_and_the_token_wins() {
    let s = setup();
    let gw = &s.gw;
    let token = common::jwt::rs256_token("ann");

    let r = client().get(gw.url("/either/1")).send().unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer, ApiKey");
    assert_problem(r, 401);

    let r = client()
        .get(gw.url("/either/1"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = s.up.last();
    assert_eq!(seen.header("x-user"), Some("ann"));
    assert_eq!(seen.header("x-consumer"), None);

    assert_eq!(with_key(gw, "/either/2", ACME_KEY).status(), 200);
    let seen = s.up.last();
    assert_eq!(seen.header("x-consumer"), Some("acme"));
    assert_eq!(seen.header("x-user"), None);

    // Both: the token is tried first and its identity wins; the key is
    // still not forwarded.
    let r = client()
        .get(gw.url("/either/3"))
        .bearer_auth(&token)
        .header("X-API-Key", ACME_KEY)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = s.up.last();
    assert_eq!(seen.header("x-user"), Some("ann"));
    assert_eq!(seen.header("x-consumer"), None);
    assert_eq!(seen.header("x-api-key"), None);

    // Either valid credential passes: a bad token beside a good key.
    let r = client()
        .get(gw.url("/either/4"))
        .bearer_auth("not.a.token")
        .header("X-API-Key", ACME_KEY)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.up.last().header("x-consumer"), Some("acme"));

    // Neither valid: the token's refusal.
    let r = client()
        .get(gw.url("/either/5"))
        .bearer_auth("not.a.token")
        .header("X-API-Key", "wrong")
        .send()
        .unwrap();
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    assert_problem(r, 401);
}

#[test]
fn a_consumer_keyed_limit_counts_each_consumer_apart() {
    let s = setup();
    let gw = &s.gw;
    for _ in 0..2 {
        assert_eq!(with_key(gw, "/limited", ACME_KEY).status(), 200);
    }
    let r = with_key(gw, "/limited", ACME_KEY);
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    assert_problem(r, 429);
    // Same client IP, another consumer: a budget of its own.
    for _ in 0..2 {
        let r = with_key(gw, "/limited", BOB_KEY);
        assert_eq!(r.status(), 200);
    }
    assert_problem(with_key(gw, "/limited", BOB_KEY), 429);
    assert_eq!(s.up.count(), 4);
}

#[test]
fn the_cache_keeps_an_entry_per_consumer() {
    let s = setup();
    let get = |key: &str| {
        let r = with_key(&s.gw, "/cached/x", key);
        assert_eq!(r.status(), 200);
        let x = r.headers()["x-cache"].to_str().unwrap().to_string();
        (x, r.text().unwrap())
    };
    let (x, acme) = get(ACME_KEY);
    assert_eq!(x, "MISS");
    assert_eq!(get(ACME_KEY), ("HIT".to_string(), acme.clone()));
    let (x, bob) = get(BOB_KEY);
    assert_eq!(x, "MISS");
    assert_ne!(bob, acme);
    // A token whose `sub` is a consumer's name is someone else: its own
    // entry.
    let r = client()
        .get(s.gw.url("/cached/x"))
        .bearer_auth(common::jwt::rs256_token("acme"))
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_ne!(r.text().unwrap(), acme);
    // No key, no entry: refused before the cache.
    assert_problem(client().get(s.gw.url("/cached/x")).send().unwrap(), 401);
    assert_eq!(s.up.count(), 3);
}

#[test]
fn a_reload_reads_the_edited_keys_file_and_a_broken_one_changes_nothing() {
    let s = setup();
    let gw = &s.gw;
    assert_eq!(with_key(gw, "/h/1", ACME_KEY).status(), 200);
    assert_problem(with_key(gw, "/h/1", CAROL_KEY), 401);

    // Acme's key is revoked, carol's added.
    write_keys(
        &s.keys,
        &[("carol", CAROL_KEY, "gold"), ("bob", BOB_KEY, "silver")],
    );
    let (status, body) = admin(gw, "POST", "/reload");
    assert_eq!(status, 200, "{body}");
    assert_problem(with_key(gw, "/h/1", ACME_KEY), 401);
    assert_eq!(with_key(gw, "/h/1", CAROL_KEY).status(), 200);
    assert_eq!(s.up.last().header("x-consumer"), Some("carol"));

    // A keys file that does not load: the reload is refused, naming the
    // entry, and the running keys stay.
    std::fs::write(&s.keys, "- { consumer: dave, sha256: \"dave-in-clear\" }\n").unwrap();
    let (status, body) = admin(gw, "POST", "/reload");
    assert_ne!(status, 200, "{body}");
    assert!(body.contains("entry 1 (line 1)"), "{body}");
    assert!(!body.contains("dave-in-clear"), "{body}");
    assert_eq!(with_key(gw, "/h/1", CAROL_KEY).status(), 200);
}

#[test]
fn mistakes_in_api_keys_are_config_errors_with_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    write_keys(&good, &[("acme", ACME_KEY, "gold")]);
    let clear = dir.path().join("clear.yaml");
    std::fs::write(
        &clear,
        "- { consumer: acme, sha256: \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\" }\n- { consumer: eve, sha256: \"my-plain-secret-key\" }\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.yaml");
    let yaml = |api_keys: &str, route_auth: &str| {
        format!(
            "listen: [\"127.0.0.1:8080\"]\n{jwt}  api_keys:\n{api_keys}upstreams:\n  app:\n    targets: [127.0.0.1:9]\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n    auth: {route_auth}\n",
            jwt = common::jwt::rs256_provider("main"),
        )
    };
    let provider = |from: &str, file: &Path| {
        format!(
            "    partners:\n      from: {from}\n      keys_file: {}\n",
            file.display()
        )
    };
    let cases = vec![
        (
            yaml(&provider("header:X-API-Key", &clear), "partners"),
            "auth.api_keys.partners.keys_file",
            "entry 2 (line 2) (eve): sha256 must be the key's SHA-256 as 64 hex digits",
        ),
        (
            yaml(&provider("header:X-API-Key", &missing), "partners"),
            "auth.api_keys.partners.keys_file",
            "cannot read",
        ),
        (
            yaml(&provider("cookie:k", &good), "partners"),
            "auth.api_keys.partners.from",
            "use header:NAME or query:NAME",
        ),
        (
            yaml(&provider("header:Host", &good), "partners"),
            "auth.api_keys.partners.from",
            "cannot carry an API key",
        ),
        (
            yaml(&provider("header:X-API-Key", &good), "[main, nobody]"),
            "routes[0].auth[1]",
            "unknown auth provider \"nobody\"; known: main, partners",
        ),
        (
            yaml(
                &provider("header:X-API-Key", &good),
                "{ client_cert: true, require_claims: { tier: [gold] } }",
            ),
            "routes[0].auth",
            "a client certificate has no claims",
        ),
        (
            yaml(&provider("query:api+key", &good), "partners"),
            "auth.api_keys.partners.from",
            "is not a valid query parameter name",
        ),
        (
            yaml(&provider("header:X-API-Key", &good), "{ jwt: partners }"),
            "routes[0].auth.jwt",
            "\"partners\" is a provider of auth.api_keys",
        ),
        (
            yaml(
                &format!(
                    "    main:\n      from: header:X-Key\n      keys_file: {}\n",
                    good.display()
                ),
                "main",
            ),
            "auth.api_keys.main",
            "share one namespace",
        ),
    ];
    assert_config_errors(&cases, Some("my-plain-secret-key"));

    // And a good one passes `-t`.
    let (code, out, err) = check_config(
        &yaml(&provider("header:X-API-Key", &good), "[main, partners]"),
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
}
