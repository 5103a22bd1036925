//! JWT authentication end to end, with tokens minted here (RS256, ES256,
//! EdDSA, HS256), a local JWKS server that rotates keys and counts fetches,
//! and an upstream that records what it was sent.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::jwt::{self, claims, mint, now, raw_token, SECRET};
use common::*;
use jsonwebtoken::{Algorithm, Header};
use serde_json::json;

struct Setup {
    up: TestUpstream,
    jwks_server: TestUpstream,
    jwks_doc: Arc<Mutex<(u16, String)>>,
    gw: Gateway,
}

/// Past the early-refresh gap the setup gives the gateway (2 s).
const EARLY_GAP_PASSED: Duration = Duration::from_millis(2100);

fn setup() -> Setup {
    let up = TestUpstream::with_handler("app", |_| Reply::text(200, "ok"));
    let jwks_doc = Arc::new(Mutex::new((200u16, jwt::jwks(&[("rsa1.pem", "key-a")]))));
    let doc = Arc::clone(&jwks_doc);
    let jwks_server = TestUpstream::with_handler("idp", move |_| {
        let (status, body) = doc.lock().unwrap().clone();
        Reply::typed(status, "application/json", &body)
    });
    let keys = jwt::key_path("");
    let routes = [
        ("rs", "rs"),
        (
            "admin",
            "{ jwt: rs, require_claims: { role: [admin, editor] } }",
        ),
        (
            "scoped",
            "{ jwt: rs, require_scopes: [\"users:write\", \"users:read\"] }",
        ),
        ("es", "es"),
        ("ed", "ed"),
        ("hs", "hs"),
        ("q", "q"),
        ("jwks", "remote"),
    ];
    let k = keys.display().to_string();
    let k = k.trim_end_matches('/');
    let mut body = [
        format!("upstreams:\n  app:\n    targets: [{}]\n", up.addr),
        "auth:\n  jwt:\n".to_string(),
        "    rs:\n      algorithms: [RS256]\n".to_string(),
        format!("      public_key_file: {k}/rsa1.pub.pem\n"),
        "      issuer: https://idp.test\n      audience: [orders-api]\n".to_string(),
        "      forward_claims: { sub: X-User-Id, role: X-User-Role }\n".to_string(),
        format!("    es:\n      algorithms: [ES256]\n      public_key_file: {k}/ec256.pub.pem\n"),
        format!("    ed:\n      algorithms: [EdDSA]\n      public_key_file: {k}/ed25519.pub.pem\n"),
        "    hs:\n      algorithms: [HS256]\n      secret: ${JWT_SECRET}\n      token_from: cookie:session\n".to_string(),
        "    q:\n      algorithms: [HS256]\n      secret: ${JWT_SECRET}\n      token_from: query:access_token\n".to_string(),
        format!("    remote:\n      algorithms: [RS256]\n      jwks_url: http://{}/jwks\n", jwks_server.addr),
        "      jwks_refresh: 1h\n      forward_claims: { sub: X-User-Id }\n".to_string(),
        "routes:\n  - name: open\n    match: { path_prefix: /open }\n    upstream: app\n".to_string(),
    ]
    .concat();
    for (name, auth) in routes {
        body.push_str(&format!(
            "  - name: {name}\n    match: {{ path_prefix: /{name} }}\n    upstream: app\n    auth: {auth}\n"
        ));
    }
    let gw = gateway(&body)
        .env("JWT_SECRET", SECRET)
        .env("GATEHOUSE_JWKS_EARLY_REFRESH_GAP", "2s")
        .start();
    Setup {
        up,
        jwks_server,
        jwks_doc,
        gw,
    }
}

fn get(gw: &Gateway, path: &str, token: Option<&str>) -> reqwest::blocking::Response {
    let mut r = client().get(gw.url(path));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().unwrap()
}

/// A 401 for a token that was sent: invalid_token, problem+json, and the
/// upstream not reached.
fn assert_invalid(s: &Setup, path: &str, token: &str, why: &str) {
    let before = s.up.count();
    let r = get(&s.gw, path, Some(token));
    assert_eq!(r.status(), 401, "{why}");
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\"",
        "{why}"
    );
    assert_problem(r, 401);
    assert_eq!(s.up.count(), before, "{why}: the upstream was reached");
}

#[test]
fn missing_tokens_get_401_with_a_bearer_challenge() {
    let s = setup();
    let r = get(&s.gw, "/rs", None);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_problem(r, 401);
    let r = client()
        .get(s.gw.url("/rs"))
        .header("Authorization", "Basic dTpw")
        .send()
        .unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(s.up.count(), 0);
}

#[test]
fn valid_tokens_of_every_algorithm_pass_and_claims_are_forwarded() {
    let s = setup();
    let mut c = claims("user-1");
    c["role"] = json!("admin");
    let token = mint(Algorithm::RS256, "rsa1.pem", None, &c);
    let r = client()
        .get(s.gw.url("/rs/x"))
        .bearer_auth(&token)
        .header("X-User-Id", "someone-else")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = s.up.last();
    assert_eq!(seen.header_all("x-user-id"), ["user-1"]);
    assert_eq!(seen.header("x-user-role"), Some("admin"));

    let es = mint(Algorithm::ES256, "ec256.pem", None, &claims("u-es"));
    assert_eq!(get(&s.gw, "/es", Some(&es)).status(), 200);
    let ed = mint(Algorithm::EdDSA, "ed25519.pem", None, &claims("u-ed"));
    assert_eq!(get(&s.gw, "/ed", Some(&ed)).status(), 200);

    let hs = mint(Algorithm::HS256, SECRET, None, &claims("u-hs"));
    let r = client()
        .get(s.gw.url("/hs"))
        .header("Cookie", format!("theme=dark; session={hs}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // The cookie provider does not read the Authorization header.
    assert_eq!(
        get(&s.gw, "/hs", Some(&hs)).headers()["www-authenticate"],
        "Bearer"
    );
    let r = client()
        .get(s.gw.url(&format!("/q?x=1&access_token={hs}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn identity_headers_from_clients_never_reach_upstreams() {
    let s = setup();
    // On an auth route, a claim the token lacks is not taken from the client.
    let token = jwt::rs256_token("user-9");
    let r = client()
        .get(s.gw.url("/rs"))
        .bearer_auth(&token)
        .header("X-User-Role", "admin")
        .header("X_User_Role", "admin")
        .header("x_user_id", "admin")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = s.up.last();
    assert_eq!(seen.header_all("x-user-id"), ["user-9"]);
    assert_eq!(seen.header("x-user-role"), None);
    assert!(
        seen.headers.iter().all(|(n, _)| !n.contains('_')),
        "{:?}",
        seen.headers
    );
    let r = client()
        .get(s.gw.url("/open"))
        .header("X-User-Id", "admin")
        .header("X-User-Role", "admin")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = s.up.last();
    assert_eq!(seen.header("x-user-id"), None);
    assert_eq!(seen.header("x-user-role"), None);
}

#[test]
fn expiry_not_before_and_leeway() {
    let s = setup();
    let mut c = claims("u");
    c["exp"] = json!(now() - 300);
    assert_invalid(
        &s,
        "/rs",
        &mint(Algorithm::RS256, "rsa1.pem", None, &c),
        "expired 5 min ago",
    );
    c["exp"] = json!(now() - 45);
    assert_invalid(
        &s,
        "/rs",
        &mint(Algorithm::RS256, "rsa1.pem", None, &c),
        "45 s past exp, leeway 30 s",
    );
    c["exp"] = json!(now() - 10);
    let within_leeway = mint(Algorithm::RS256, "rsa1.pem", None, &c);
    assert_eq!(
        get(&s.gw, "/rs", Some(&within_leeway)).status(),
        200,
        "10 s past exp is within the 30 s leeway"
    );
    let mut c = claims("u");
    c.as_object_mut().unwrap().remove("exp");
    assert_invalid(
        &s,
        "/rs",
        &mint(Algorithm::RS256, "rsa1.pem", None, &c),
        "no exp",
    );
    let mut c = claims("u");
    c["exp"] = json!("9999999999");
    assert_invalid(
        &s,
        "/rs",
        &mint(Algorithm::RS256, "rsa1.pem", None, &c),
        "exp as a string",
    );
    let mut c = claims("u");
    c["nbf"] = json!(now() + 3600);
    assert_invalid(
        &s,
        "/rs",
        &mint(Algorithm::RS256, "rsa1.pem", None, &c),
        "nbf in an hour",
    );
}

#[test]
fn issuer_and_audience_are_enforced() {
    let s = setup();
    let cases: Vec<(&str, serde_json::Value)> = vec![
        ("wrong issuer", json!({"iss": "https://evil.test"})),
        ("issuer as a number", json!({"iss": 42})),
        (
            "issuer as an array",
            json!({"iss": ["https://idp.test", "https://evil.test"]}),
        ),
        ("wrong audience", json!({"aud": "billing-api"})),
        ("audience as a number", json!({"aud": 123})),
    ];
    for (why, patch) in cases {
        let mut c = claims("u");
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        assert_invalid(
            &s,
            "/rs",
            &mint(Algorithm::RS256, "rsa1.pem", None, &c),
            why,
        );
    }
    for missing in ["iss", "aud"] {
        let mut c = claims("u");
        c.as_object_mut().unwrap().remove(missing);
        assert_invalid(
            &s,
            "/rs",
            &mint(Algorithm::RS256, "rsa1.pem", None, &c),
            missing,
        );
    }
    let mut c = claims("u");
    c["aud"] = json!(["other", "orders-api"]);
    assert_eq!(
        get(
            &s.gw,
            "/rs",
            Some(&mint(Algorithm::RS256, "rsa1.pem", None, &c))
        )
        .status(),
        200
    );
}

#[test]
fn forged_and_confused_tokens_are_refused() {
    let s = setup();
    let c = claims("attacker");
    // alg "none", in any spelling, unsigned.
    for none in ["none", "None", "NONE", "nOnE"] {
        let t = raw_token(&json!({"alg": none, "typ": "JWT"}), &c, None);
        assert_invalid(&s, "/rs", &t, none);
    }
    // HS256 signed with the RSA public key as the secret (key confusion).
    let public_pem = std::fs::read(jwt::key_path("rsa1.pub.pem")).unwrap();
    let confused = raw_token(
        &json!({"alg": "HS256", "typ": "JWT"}),
        &c,
        Some(&public_pem),
    );
    assert_invalid(&s, "/rs", &confused, "HS256 with the public key");
    // A pinned provider refuses another RSA algorithm, even with the right key.
    assert_invalid(
        &s,
        "/rs",
        &mint(Algorithm::RS384, "rsa1.pem", None, &c),
        "RS384 on RS256",
    );
    // The attacker's own key, offered in the header, is never used.
    let attacker = jwt::encoding_key(Algorithm::RS256, "rsa2.pem");
    let mut h = Header::new(Algorithm::RS256);
    h.jwk = Some(jsonwebtoken::jwk::Jwk::from_encoding_key(&attacker, Algorithm::RS256).unwrap());
    h.jku = Some("https://evil.test/jwks.json".into());
    h.x5u = Some("https://evil.test/cert.pem".into());
    assert_invalid(
        &s,
        "/rs",
        &jwt::mint_with_header(h, &attacker, &c),
        "jwk/jku/x5u in the header",
    );
    // A crit header is refused (RFC 7515 4.1.11).
    let mut h = Header::new(Algorithm::RS256);
    h.crit = Some(vec!["exp".into()]);
    let key = jwt::encoding_key(Algorithm::RS256, "rsa1.pem");
    assert_invalid(&s, "/rs", &jwt::mint_with_header(h, &key, &c), "crit");
    // A bad signature, and garbage.
    // A genuine signature over other claims.
    let genuine = mint(Algorithm::RS256, "rsa1.pem", None, &c);
    let parts: Vec<&str> = genuine.split('.').collect();
    let mut elevated = c.clone();
    elevated["sub"] = json!("admin");
    let forged_payload = raw_token(&json!({}), &elevated, None);
    let forged_payload = forged_payload.split('.').nth(1).unwrap();
    let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert_invalid(
        &s,
        "/rs",
        &tampered,
        "claims changed under a genuine signature",
    );
    assert_invalid(&s, "/rs", "not.a.token", "garbage");
    // Two Authorization headers: which would the upstream read? Refused.
    let good = mint(Algorithm::RS256, "rsa1.pem", None, &c);
    let r = client()
        .get(s.gw.url("/rs"))
        .header("Authorization", format!("Bearer {good}"))
        .header("Authorization", "Bearer forged.token.here")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_invalid(&s, "/rs", &"x".repeat(9000), "9 KB token");
}

#[test]
fn required_claims_and_scopes_give_403() {
    let s = setup();
    let with = |patch: serde_json::Value| {
        let mut c = claims("u");
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        mint(Algorithm::RS256, "rsa1.pem", None, &c)
    };
    let r = get(&s.gw, "/admin", Some(&with(json!({"role": "viewer"}))));
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer error=\"insufficient_scope\""
    );
    assert_problem(r, 403);
    assert_problem(get(&s.gw, "/admin", Some(&with(json!({})))), 403);
    assert_eq!(
        get(&s.gw, "/admin", Some(&with(json!({"role": "editor"})))).status(),
        200
    );
    assert_eq!(
        get(
            &s.gw,
            "/admin",
            Some(&with(json!({"role": ["viewer", "admin"]})))
        )
        .status(),
        200
    );

    assert_eq!(
        get(
            &s.gw,
            "/scoped",
            Some(&with(json!({"scope": "users:read users:write"})))
        )
        .status(),
        200
    );
    assert_eq!(
        get(
            &s.gw,
            "/scoped",
            Some(&with(json!({"scp": ["users:write", "users:read"]})))
        )
        .status(),
        200
    );
    assert_problem(
        get(
            &s.gw,
            "/scoped",
            Some(&with(json!({"scope": "users:read"}))),
        ),
        403,
    );
    assert_problem(
        get(
            &s.gw,
            "/scoped",
            Some(&with(json!({"scope": "users:read users:writer"}))),
        ),
        403,
    );
}

#[test]
fn jwks_rotation_with_bounded_refreshes() {
    let s = setup();
    let token_a = mint(Algorithm::RS256, "rsa1.pem", Some("key-a"), &claims("a"));
    assert_eq!(get(&s.gw, "/jwks", Some(&token_a)).status(), 200);
    assert_eq!(s.up.last().header("x-user-id"), Some("a"));
    let fetches = s.jwks_server.count();
    assert!(fetches >= 1);

    // The identity provider rotates: key-b replaces key-a. A token naming
    // key-b triggers one early refresh and passes.
    *s.jwks_doc.lock().unwrap() = (200, jwt::jwks(&[("rsa2.pem", "key-b")]));
    std::thread::sleep(EARLY_GAP_PASSED);
    let token_b = mint(Algorithm::RS256, "rsa2.pem", Some("key-b"), &claims("b"));
    assert_eq!(get(&s.gw, "/jwks", Some(&token_b)).status(), 200);
    assert_eq!(s.jwks_server.count(), fetches + 1);
    // key-a was withdrawn: its token, though verified before, is refused.
    assert_invalid(&s, "/jwks", &token_a, "a withdrawn key");

    // A flood of unknown kids does not flood the identity provider.
    let before = s.jwks_server.count();
    for i in 0..30 {
        let t = mint(
            Algorithm::RS256,
            "rsa2.pem",
            Some(&format!("random-{i}")),
            &claims("x"),
        );
        assert_eq!(get(&s.gw, "/jwks", Some(&t)).status(), 401);
    }
    assert!(
        s.jwks_server.count() <= before + 1,
        "{} fetches for 30 unknown kids",
        s.jwks_server.count() - before
    );

    // A failing identity provider: the last good key set is kept.
    let before = s.jwks_server.count();
    *s.jwks_doc.lock().unwrap() = (500, "oops".into());
    std::thread::sleep(EARLY_GAP_PASSED);
    let unknown = mint(Algorithm::RS256, "rsa2.pem", Some("key-c"), &claims("c"));
    assert_eq!(get(&s.gw, "/jwks", Some(&unknown)).status(), 401);
    eventually(Duration::from_secs(3), "the failed fetch happened", || {
        s.jwks_server.count() > before
    });
    // A token never seen before (not in the token cache) verifies with key-b.
    let fresh = mint(
        Algorithm::RS256,
        "rsa2.pem",
        Some("key-b"),
        &claims("after-failure"),
    );
    assert_eq!(get(&s.gw, "/jwks", Some(&fresh)).status(), 200);
}

#[test]
fn jwks_files_choose_by_kid_and_pss_and_periodic_refresh_work() {
    let up = TestUpstream::named("app");
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        jwt::jwks(&[("rsa1.pem", "one"), ("rsa2.pem", "two")]),
    )
    .unwrap();
    let doc = Arc::new(Mutex::new(jwt::jwks(&[("rsa1.pem", "one")])));
    let served = Arc::clone(&doc);
    let idp = TestUpstream::with_handler("idp", move |_| Reply::text(200, &served.lock().unwrap()));
    let k = jwt::key_path("").display().to_string();
    let body = [
        format!("upstreams:\n  app:\n    targets: [{}]\n", up.addr),
        "auth:\n  jwt:\n".to_string(),
        format!("    file:\n      algorithms: [RS256, PS256]\n      jwks_file: {}\n", jwks.display()),
        format!("    pss:\n      algorithms: [PS256]\n      public_key_file: {}/rsa1.pub.pem\n", k.trim_end_matches('/')),
        format!("    polled:\n      algorithms: [RS256]\n      jwks_url: http://{}/keys\n      jwks_refresh: 1s\n", idp.addr),
        "routes:\n".to_string(),
        "  - name: file\n    match: { path_prefix: /file }\n    upstream: app\n    auth: file\n".to_string(),
        "  - name: pss\n    match: { path_prefix: /pss }\n    upstream: app\n    auth: pss\n".to_string(),
        "  - name: polled\n    match: { path_prefix: /polled }\n    upstream: app\n    auth: polled\n".to_string(),
    ]
    .concat();
    let gw = gateway(&body).start();
    let c = claims("u");
    assert_eq!(
        get(
            &gw,
            "/file",
            Some(&mint(Algorithm::RS256, "rsa1.pem", Some("one"), &c))
        )
        .status(),
        200
    );
    assert_eq!(
        get(
            &gw,
            "/file",
            Some(&mint(Algorithm::RS256, "rsa2.pem", Some("two"), &c))
        )
        .status(),
        200
    );
    // The JWK says "alg": "RS256": the same key is not taken for PS256.
    assert_eq!(
        get(
            &gw,
            "/file",
            Some(&mint(Algorithm::PS256, "rsa2.pem", Some("two"), &c))
        )
        .status(),
        401
    );
    // Signed by key two but naming key one.
    assert_eq!(
        get(
            &gw,
            "/file",
            Some(&mint(Algorithm::RS256, "rsa2.pem", Some("one"), &c))
        )
        .status(),
        401
    );
    // Without a kid, which of two keys is meant is unknown: refused.
    assert_eq!(
        get(
            &gw,
            "/file",
            Some(&mint(Algorithm::RS256, "rsa1.pem", None, &c))
        )
        .status(),
        401
    );
    assert_eq!(
        get(
            &gw,
            "/file",
            Some(&mint(Algorithm::RS256, "rsa1.pem", Some("three"), &c))
        )
        .status(),
        401
    );

    assert_eq!(
        get(
            &gw,
            "/pss",
            Some(&mint(Algorithm::PS256, "rsa1.pem", None, &c))
        )
        .status(),
        200
    );
    assert_eq!(
        get(
            &gw,
            "/pss",
            Some(&mint(Algorithm::RS256, "rsa1.pem", None, &c))
        )
        .status(),
        401
    );

    // jwks_refresh: 1s fetches on its own, without any request asking.
    assert_eq!(
        get(
            &gw,
            "/polled",
            Some(&mint(Algorithm::RS256, "rsa1.pem", Some("one"), &c))
        )
        .status(),
        200
    );
    let seen = idp.count();
    eventually(Duration::from_secs(5), "two scheduled refreshes", || {
        idp.count() >= seen + 2
    });
}
