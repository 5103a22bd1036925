//! Tokens minted for the tests, with the keys in `tests/keys/`, and raw
//! tokens built by hand for the cases no library would sign.

use std::path::PathBuf;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!!";

pub fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

/// The `auth:` section of a config with one RS256 provider named `name`,
/// verifying with `rsa1.pub.pem`; more provider keys may follow it.
pub fn rs256_provider(name: &str) -> String {
    format!(
        "auth:\n  jwt:\n    {name}:\n      algorithms: [RS256]\n      public_key_file: {}\n",
        key_path("rsa1.pub.pem").display()
    )
}

/// A valid token (see [`claims`]) for `sub`, signed with `rsa1.pem`: what
/// the provider of [`rs256_provider`] accepts.
pub fn rs256_token(sub: &str) -> String {
    mint(Algorithm::RS256, "rsa1.pem", None, &claims(sub))
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(key_path(name)).unwrap()
}

pub fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Claims valid for an hour, for issuer `https://idp.test` and audience `orders-api`.
pub fn claims(sub: &str) -> Value {
    json!({
        "sub": sub,
        "iss": "https://idp.test",
        "aud": "orders-api",
        "exp": now() + 3600,
        "iat": now(),
    })
}

pub fn encoding_key(alg: Algorithm, key: &str) -> EncodingKey {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(key.as_bytes())
        }
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem(key)).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem(key)).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem(key)).unwrap(),
    }
}

/// A token signed with `key` (a file in tests/keys, or the secret itself for HS*).
pub fn mint(alg: Algorithm, key: &str, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &encoding_key(alg, key)).unwrap()
}

pub fn mint_with_header(header: Header, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token assembled from raw parts: `header` and `claims` as given, and
/// an HMAC-SHA256 signature with `secret` (or none).
pub fn raw_token(header: &Value, claims: &Value, secret: Option<&[u8]>) -> String {
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = match secret {
        None => String::new(),
        Some(s) => jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &EncodingKey::from_secret(s),
            Algorithm::HS256,
        )
        .unwrap(),
    };
    format!("{signing_input}.{signature}")
}

/// A JWK set (as JSON) holding the public halves of `keys`: (file, kid).
pub fn jwks(keys: &[(&str, &str)]) -> String {
    let mut out = Vec::new();
    for (file, kid) in keys {
        let enc = encoding_key(Algorithm::RS256, file);
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::RS256).unwrap();
        jwk.common.key_id = Some(kid.to_string());
        out.push(serde_json::to_value(jwk).unwrap());
    }
    json!({ "keys": out }).to_string()
}
