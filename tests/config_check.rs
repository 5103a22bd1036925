//! `gatehouse -t`: every kind of configuration error is reported with its
//! YAML path and line, all at once, and nothing is bound.

mod common;

use common::*;

const UPSTREAMS: &str = "upstreams:\n  users:\n    targets: [127.0.0.1:9001]\n  orders:\n    targets: [127.0.0.1:9002]\n";

fn with_listen(rest: &str) -> String {
    format!("listen: [127.0.0.1:18080]\n{UPSTREAMS}{rest}")
}

fn route(extra: &str) -> String {
    with_listen(&format!(
        "routes:\n  - name: r\n    match: {{ path_prefix: /v1 }}\n    upstream: users\n{extra}"
    ))
}

/// Runs `-t` on a bad file and returns its error lines.
fn errors_of(yaml: &str) -> Vec<String> {
    let (code, stdout, stderr) = check_config(yaml, &[]);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stdout.contains("config OK"));
    stderr
        .lines()
        .filter(|l| l.contains(": error: "))
        .map(str::to_string)
        .collect()
}

fn single_error(yaml: &str) -> String {
    let errors = errors_of(yaml);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors.into_iter().next().unwrap()
}

#[test]
fn a_valid_file_passes_and_binds_nothing() {
    // The configured port is taken: -t must not try to bind it.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let yaml = format!(
        "listen: [127.0.0.1:{port}]\n{UPSTREAMS}routes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: users\n"
    );
    let (code, stdout, stderr) = check_config(&yaml, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "config OK");
}

#[test]
fn unknown_keys_are_errors_with_their_place() {
    let e = single_error(&route("    colour: blue\n"));
    assert!(
        e.contains("routes[0].colour (line 11, column 5): unknown key `colour`"),
        "{e}"
    );
    let e = single_error(&with_listen("servers:\n  threads: 2\n"));
    assert!(
        e.contains("servers (line 7, column 1): unknown section \"servers\""),
        "{e}"
    );
    let e = single_error(&format!("{}server:\n  thread: 2\n", with_listen("")));
    assert!(
        e.contains("server.thread (line 8, column 3): unknown key `thread`"),
        "{e}"
    );
}

#[test]
fn bad_durations_and_sizes() {
    let e = single_error(&route("    timeout: 10 parsecs\n"));
    assert!(
        e.contains("routes[0].timeout (line 11, column 5): invalid duration \"10 parsecs\""),
        "{e}"
    );
    let e = single_error(&route("    timeout: 10\n"));
    assert!(
        e.contains("routes[0].timeout") && e.contains("has no unit"),
        "{e}"
    );
    let e = single_error(&route("    max_body: 1 MiBs\n"));
    assert!(
        e.contains("routes[0].max_body (line 11, column 5): invalid size \"1 MiBs\""),
        "{e}"
    );
}

#[test]
fn unknown_upstreams_name_the_known_ones() {
    let yaml = with_listen("routes:\n  - name: r\n    match: { path: /x }\n    upstream: userz\n");
    let e = single_error(&yaml);
    assert!(
        e.contains("routes[0].upstream (line 10, column 5): unknown upstream \"userz\"; known: orders, users"),
        "{e}"
    );
}

#[test]
fn bad_regexes_and_duplicate_names() {
    let yaml = with_listen("routes:\n  - name: a\n    match: { path_regex: \"^/files/(\" }\n    upstream: users\n  - name: a\n    match: { path: /b }\n    upstream: users\n");
    let errors = errors_of(&yaml);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].contains("routes[0].match.path_regex (line 9")
            && errors[0].contains("invalid path_regex"),
        "{errors:#?}"
    );
    assert!(
        errors[1].contains(
            "routes[1].name (line 11, column 5): route name \"a\" is used by an earlier route"
        ),
        "{errors:#?}"
    );
}

#[test]
fn unset_environment_variables() {
    let yaml = with_listen(
        "routes:\n  - name: r\n    match: { path: /x }\n    upstream: ${UPSTREAM_NAME}\n",
    );
    let e = single_error(&yaml);
    assert!(e.contains("routes[0].upstream (line 10, column 15): environment variable UPSTREAM_NAME is not set"), "{e}");
    let (code, stdout, _) = check_config(&yaml, &[("UPSTREAM_NAME", "orders")]);
    assert_eq!((code, stdout.trim()), (0, "config OK"));
}

#[test]
fn syntax_errors_have_a_line() {
    let e = single_error("listen: [127.0.0.1:8080\nroutes: []\n");
    assert!(
        e.contains("YAML syntax error") && e.contains("(line "),
        "{e}"
    );
}

#[test]
fn files_and_addresses_are_checked() {
    let yaml = format!(
        "listen:\n  - 127.0.0.1:8080\n  - address: 127.0.0.1:8443\n    tls: {{ cert: missing-cert.pem, key: missing-key.pem }}\n  - localhost:80\n{UPSTREAMS}"
    );
    let errors = errors_of(&yaml);
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors[0].contains("listen[1].tls.cert") && errors[0].contains("cannot read"),
        "{errors:#?}"
    );
    assert!(errors[1].contains("listen[1].tls.key"), "{errors:#?}");
    assert!(
        errors[2].contains("listen[2] (line 5")
            && errors[2].contains("\"localhost:80\" is not an address"),
        "{errors:#?}"
    );
}

#[test]
fn upstream_errors() {
    let yaml = "listen: [127.0.0.1:8080]\nupstreams:\n  a:\n    targets: []\n  b:\n    targets: [127.0.0.1:1]\n    balance: fastest\n  c:\n    targets: [\"no-port\"]\n    health_check: { interval: 0s, unhealthy_after: 0 }\n";
    let errors = errors_of(yaml);
    let joined = errors.join("\n");
    assert!(
        joined.contains(
            "upstreams.a.targets (line 4, column 5): an upstream needs at least one target"
        ),
        "{joined}"
    );
    assert!(joined.contains("upstreams.b.balance (line 7, column 5): unknown balance \"fastest\"; known: round_robin"), "{joined}");
    assert!(
        joined.contains("upstreams.c.targets[0]") && joined.contains("needs a port"),
        "{joined}"
    );
    assert!(
        joined.contains("upstreams.c.health_check.interval") && joined.contains("above zero"),
        "{joined}"
    );
    assert!(
        joined.contains("upstreams.c.health_check.unhealthy_after"),
        "{joined}"
    );
}

#[test]
fn all_errors_are_reported_together() {
    let yaml = "listen: [nowhere]\nserver:\n  grace_period: soon\nupstreams:\n  u:\n    targets: [127.0.0.1:1]\nroutes:\n  - name: a\n    match: { path: relative }\n    upstream: u\n  - name: b\n    match: { path_prefix: /b, methods: [\"GE T\"] }\n    upstream: nope\n";
    let (code, _, stderr) = check_config(yaml, &[]);
    assert_eq!(code, 1);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains(": error: ")).collect();
    assert_eq!(errors.len(), 5, "{stderr}");
    assert!(stderr.contains("5 errors found"), "{stderr}");
    // In file order.
    assert!(errors[0].contains("listen[0]"));
    assert!(errors[1].contains("server.grace_period"));
    assert!(errors[2].contains("routes[0].match.path"));
    assert!(errors[3].contains("routes[1].match.methods"));
    assert!(errors[4].contains("routes[1].upstream"));
}

#[test]
fn secrets_from_the_environment_are_never_printed() {
    let yaml = "listen: [127.0.0.1:8080]\nserver:\n  threads: \"${SECRET_VALUE}\"\n";
    let (code, stdout, stderr) = check_config(yaml, &[("SECRET_VALUE", "hunter2-very-secret")]);
    assert_eq!(code, 1);
    assert!(stderr.contains("server.threads"), "{stderr}");
    assert!(
        !stderr.contains("hunter2") && !stdout.contains("hunter2"),
        "{stderr}"
    );
}

#[test]
fn a_missing_file_is_an_error() {
    let out = std::process::Command::new(BIN)
        .args(["-t", "-c", "/nonexistent/gatehouse.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn auth_and_rate_limit_errors() {
    let keys = common::jwt::key_path("");
    let k = keys.display().to_string();
    let k = k.trim_end_matches('/');
    let yaml = [
        "listen: [127.0.0.1:8080]\nupstreams:\n  u:\n    targets: [127.0.0.1:1]\n".to_string(),
        "auth:\n  jwt:\n".to_string(),
        "    none-alg:\n      algorithms: [none]\n      secret: a-secret-that-is-long-enough-to-pass-32\n".to_string(),
        "    short:\n      algorithms: [HS512]\n      secret: tooshort-but-secret\n".to_string(),
        format!("    confused:\n      algorithms: [HS256]\n      public_key_file: {k}/rsa1.pub.pem\n"),
        "    two-sources:\n      algorithms: [RS256]\n      jwks_url: https://idp.test/jwks\n      jwks_file: jwks.json\n".to_string(),
        "    missing-file:\n      algorithms: [ES256]\n      public_key_file: nowhere.pem\n".to_string(),
        "    bad-claim-header:\n      algorithms: [RS256]\n      jwks_url: https://idp.test/jwks\n      forward_claims: { sub: Host }\n".to_string(),
        "    good:\n      algorithms: [RS256]\n      jwks_url: https://idp.test/jwks\n      forward_claims: { sub: X-User-Id }\n".to_string(),
        "routes:\n".to_string(),
        "  - name: a\n    match: { path: /a }\n    upstream: u\n    auth: mian\n".to_string(),
        "  - name: b\n    match: { path: /b }\n    upstream: u\n    rate_limit: { requests: 0, per: 1m }\n".to_string(),
        "  - name: c\n    match: { path: /c }\n    upstream: u\n    rate_limit: { requests: 5, per: 1m, key: \"cookie:x\" }\n".to_string(),
        "  - name: d\n    match: { path: /d }\n    upstream: u\n    request_headers: { rename: { X-Client: X-User-Id } }\n".to_string(),
    ]
    .concat();
    let (code, _, stderr) = check_config(&yaml, &[]);
    assert_eq!(code, 1);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains(": error: ")).collect();
    let has = |path: &str, text: &str| {
        assert!(
            errors.iter().any(|e| e.contains(path) && e.contains(text)),
            "no error at {path} saying {text:?}:\n{stderr}"
        )
    };
    has(
        "auth.jwt.none-alg.algorithms[0]",
        "unknown algorithm \"none\"",
    );
    has(
        "auth.jwt.short.secret",
        "HS512 needs a secret of at least 64 bytes",
    );
    has(
        "auth.jwt.confused.algorithms",
        "a public_key_file holds one key",
    );
    has(
        "auth.jwt.two-sources",
        "exactly one of secret, public_key_file, jwks_file or jwks_url",
    );
    has("auth.jwt.missing-file.public_key_file", "cannot read");
    has(
        "auth.jwt.bad-claim-header.forward_claims.sub",
        "Host cannot carry a claim",
    );
    has(
        "routes[0].auth",
        "unknown auth provider \"mian\"; known: bad-claim-header, confused, good, missing-file, none-alg, short, two-sources",
    );
    has("routes[1].rate_limit.requests", "at least 1");
    has(
        "routes[2].rate_limit.key",
        "unknown rate limit key \"cookie:x\"",
    );
    has(
        "routes[3].request_headers",
        "x-user-id carries verified claims",
    );
    assert!(
        !stderr.contains("tooshort-but-secret"),
        "a secret was printed:\n{stderr}"
    );
}

#[test]
fn cache_body_and_aggregate_errors() {
    let yaml = [
        "listen: [127.0.0.1:8080]\ncache: { max_size: 1KiB }\n".to_string(),
        "upstreams:\n  u:\n    targets: [127.0.0.1:1]\n".to_string(),
        "routes:\n".to_string(),
        "  - name: a\n    match: { path: /a }\n    upstream: u\n    cache: { ttl: 0s, vary: [\"bad header\"] }\n".to_string(),
        "  - name: b\n    match: { path: /b }\n    upstream: u\n    request_body: { xml_to_json: true, remove_fields: [\"a..b\"] }\n".to_string(),
        "    response_body: { rename_fields: { \"x\": \"y.z\" } }\n".to_string(),
        "  - name: c\n    match: { path: \"/c/{id}\" }\n    upstream: u\n    aggregate: { parts: [] }\n".to_string(),
        "  - name: d\n    match: { path: \"/d/{id}\" }\n".to_string(),
        "    aggregate:\n      parts:\n".to_string(),
        "        - { key: p, upstream: nope, path: \"/x/{id}\" }\n".to_string(),
        "        - { key: p, upstream: u, path: \"/y/{name}\" }\n".to_string(),
        "        - { key: q, upstream: u, path: \"/z/{claim.sub}\" }\n".to_string(),
    ]
    .concat();
    let (code, _, stderr) = check_config(&yaml, &[]);
    assert_eq!(code, 1);
    let has = |path: &str, text: &str| {
        assert!(
            stderr.lines().any(|e| e.contains(path) && e.contains(text)),
            "no error at {path} saying {text:?}:\n{stderr}"
        )
    };
    has("cache.max_size", "at least 1MiB");
    has("routes[0].cache.ttl", "above zero");
    has("routes[1].request_body.xml_to_json", "response_body only");
    has(
        "routes[1].response_body.rename_fields.x",
        "plain field name",
    );
    has(
        "routes[2]",
        "one of upstream, split or aggregate, not several",
    );
    has(
        "routes[3].aggregate.parts[0].upstream",
        "unknown upstream \"nope\"",
    );
    has("routes[3].aggregate.parts[1].key", "used twice");
    has(
        "routes[3].aggregate.parts[1].path",
        "{name} is not a parameter",
    );
    has("routes[3].aggregate.parts[2].path", "needs auth");
}

#[test]
fn hostile_input_settings_are_checked() {
    let server = |lines: &str| format!("server:\n{lines}{}", route(""));
    let e = single_error(&server("  path_params: strip\n"));
    assert!(
        e.contains("server.path_params") && e.contains("use reject or keep"),
        "{e}"
    );
    let e = single_error(&server("  body_timeout: 0s\n"));
    assert!(e.contains("server.body_timeout"), "{e}");
    let e = single_error(&server("  max_buffered: 512KiB\n"));
    assert!(
        e.contains("server.max_buffered") && e.contains("at least 1MiB"),
        "{e}"
    );
    // One body under a rule holds itself and what it becomes.
    let e = single_error(&server(
        "  max_buffered: 4MiB\n  max_transform_size: 3MiB\n",
    ));
    assert!(
        e.contains("server.max_buffered") && e.contains("twice max_transform_size"),
        "{e}"
    );
    let (code, stdout, stderr) = check_config(
        &server("  path_params: keep\n  body_timeout: 5s\n  max_buffered: 8MiB\n"),
        &[],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
}
