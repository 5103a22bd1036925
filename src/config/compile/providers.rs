//! `auth.jwt`: token providers, their algorithms, keys (files or a JWK
//! set URL) and the claims they forward. A provider fetching its keys
//! carries them over while its configuration is unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use serde_json::Value;

use super::*;
use crate::auth::jwks::{JwksUrl, RemoteJwks, EARLY_REFRESH_GAP};
use crate::auth::keys::{self, KeySet};
use crate::auth::{KeyStore, Provider, TokenSource};
use crate::config::raw::*;
use crate::config::source::{index_path, key_path};
use crate::config::units::parse_duration;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

/// Headers that frame or route a request; a claim never replaces them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "authorization",
    "cookie",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// The compiled `auth` section.
#[derive(Default)]
pub(super) struct Providers {
    pub jwt: BTreeMap<String, Arc<Provider>>,
    pub api_keys: BTreeMap<String, Arc<crate::auth::api_key::ApiKeys>>,
    /// Every provider named in the file, valid or not.
    pub declared: Vec<String>,
}

/// Whether `header` frames or routes a request, so no credential or
/// identity may be read from or written to it.
pub(super) fn is_reserved(header: &HeaderName) -> bool {
    RESERVED_HEADERS.contains(&header.as_str())
}

impl Compiler<'_> {
    /// The `auth` section: JWT providers and API key providers.
    pub(super) fn providers(&mut self, value: Option<&Value>) -> Providers {
        let Some(value) = value.filter(|v| !v.is_null()) else {
            return Providers::default();
        };
        let Some(raw) = self.de::<RawAuth>("auth", value) else {
            return Providers::default();
        };
        let jwt = self.carry_each("auth.jwt", "provider", &raw.jwt, |cx, path, name, item| {
            let raw = cx.de::<RawJwtProvider>(path, item)?;
            cx.provider(path, name, raw)
        });
        let jwt_names: Vec<String> = raw.jwt.keys().cloned().collect();
        let api_keys = self.api_key_providers(&raw.api_keys, &jwt_names);
        let mut declared = jwt_names;
        declared.extend(raw.api_keys.keys().cloned());
        Providers {
            jwt,
            api_keys,
            declared,
        }
    }

    pub(super) fn provider(
        &mut self,
        path: &str,
        name: &str,
        raw: RawJwtProvider,
    ) -> Option<Provider> {
        let before = self.errors.0.len();
        let apath = key_path(path, "algorithms");
        let mut algorithms: Vec<Algorithm> = Vec::new();
        if raw.algorithms.is_empty() {
            self.error(&apath, "list the accepted algorithms, like [RS256]");
        }
        for (i, a) in raw.algorithms.iter().enumerate() {
            match a.parse::<Algorithm>() {
                Ok(alg) if !algorithms.contains(&alg) => algorithms.push(alg),
                Ok(_) => {}
                Err(_) => self.error(
                    &index_path(&apath, i),
                    format!("unknown algorithm \"{a}\"; supported: HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"),
                ),
            }
        }
        let families: Vec<AlgorithmFamily> = {
            let mut f: Vec<AlgorithmFamily> = algorithms.iter().map(|a| a.family()).collect();
            f.dedup();
            f
        };
        let sources = [
            raw.secret.is_some(),
            raw.public_key_file.is_some(),
            raw.jwks_file.is_some(),
            raw.jwks_url.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            self.error(
                path,
                "give exactly one of secret, public_key_file, jwks_file or jwks_url",
            );
            return None;
        }
        if raw.jwks_refresh.is_some() && raw.jwks_url.is_none() {
            self.error(
                &key_path(path, "jwks_refresh"),
                "jwks_refresh applies only to jwks_url",
            );
        }
        let keys = if let Some(secret) = &raw.secret {
            let spath = key_path(path, "secret");
            if families.iter().any(|f| *f != AlgorithmFamily::Hmac) {
                self.error(
                    &apath,
                    "a secret verifies only HS256, HS384 and HS512 tokens",
                );
            }
            // The secret's content never appears in a message; its length may.
            for alg in &algorithms {
                let need = keys::min_secret_len(*alg);
                if secret.len() < need {
                    self.error(
                        &spath,
                        format!(
                            "{alg:?} needs a secret of at least {need} bytes; this one has {}",
                            secret.len()
                        ),
                    );
                }
            }
            KeyStore::Fixed(KeySet::new(vec![keys::VerifyKey {
                kid: None,
                alg: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
            }]))
        } else if let Some(file) = &raw.public_key_file {
            let fpath = key_path(path, "public_key_file");
            if families.len() != 1 || families[0] == AlgorithmFamily::Hmac {
                self.error(&apath, "a public_key_file holds one key: list algorithms of one family (RS/PS, ES or EdDSA)");
                return None;
            }
            let (resolved, pem) = self.read_file(&fpath, file)?;
            match keys::from_pem(&pem, families[0]) {
                Ok(key) => KeyStore::Fixed(KeySet::new(vec![keys::VerifyKey {
                    kid: None,
                    alg: None,
                    key,
                }])),
                Err(e) => {
                    self.error(&fpath, format!("{}: {e}", resolved.display()));
                    return None;
                }
            }
        } else if let Some(file) = &raw.jwks_file {
            let fpath = key_path(path, "jwks_file");
            let (resolved, json) = self.read_file(&fpath, file)?;
            match KeySet::from_jwks(&json, &algorithms) {
                Ok(set) => KeyStore::Fixed(set),
                Err(e) => {
                    self.error(&fpath, format!("{}: {e}", resolved.display()));
                    return None;
                }
            }
        } else {
            let url = raw.jwks_url.as_deref().unwrap_or_default();
            let upath = key_path(path, "jwks_url");
            let parsed = match JwksUrl::parse(url) {
                Ok(u) => u,
                Err(e) => {
                    self.error(&upath, e);
                    return None;
                }
            };
            let refresh = raw.jwks_refresh.map_or(Duration::from_secs(600), |d| d.0);
            if refresh < Duration::from_secs(1) {
                self.error(
                    &key_path(path, "jwks_refresh"),
                    "jwks_refresh must be at least 1s",
                );
            }
            KeyStore::Remote(Arc::new(RemoteJwks::new(
                parsed,
                algorithms.clone(),
                refresh,
                early_refresh_gap(),
            )))
        };
        let audience = raw.audience.map(OneOrMany::into_vec).unwrap_or_default();
        if audience.iter().any(String::is_empty) {
            self.error(&key_path(path, "audience"), "an audience cannot be empty");
        }
        if raw.issuer.as_deref() == Some("") {
            self.error(&key_path(path, "issuer"), "the issuer cannot be empty");
        }
        let leeway = raw.leeway.map_or(Duration::from_secs(30), |d| d.0);
        if leeway > Duration::from_secs(300) {
            self.error(&key_path(path, "leeway"), "leeway must be at most 5m");
        }
        let token_from = match raw.token_from.as_deref() {
            None => TokenSource::Header,
            Some(t) => match TokenSource::parse(t) {
                Ok(t) => t,
                Err(e) => {
                    self.error(&key_path(path, "token_from"), e);
                    TokenSource::Header
                }
            },
        };
        let mut forward_claims = Vec::new();
        for (claim, header) in &raw.forward_claims {
            let cpath = key_path(&key_path(path, "forward_claims"), claim);
            match HeaderName::from_bytes(header.as_bytes()) {
                Ok(h) if !RESERVED_HEADERS.contains(&h.as_str()) => {
                    forward_claims.push((claim.clone(), h))
                }
                Ok(_) => self.error(&cpath, format!("{header} cannot carry a claim")),
                Err(_) => self.error(&cpath, format!("\"{header}\" is not a valid header name")),
            }
        }
        if self.errors.0.len() > before {
            return None;
        }
        Some(Provider::new(
            name.to_string(),
            algorithms,
            keys,
            raw.issuer,
            audience,
            leeway,
            token_from,
            forward_claims,
        ))
    }
}

/// `GATEHOUSE_JWKS_EARLY_REFRESH_GAP` (a duration of 1 s or more, such as
/// `2s`), for tests and for identity providers that rotate keys often;
/// else 5 s. Never shorter: the gap is what keeps a flood of unknown kids
/// from flooding the identity provider.
fn early_refresh_gap() -> Duration {
    let Ok(text) = std::env::var("GATEHOUSE_JWKS_EARLY_REFRESH_GAP") else {
        return EARLY_REFRESH_GAP;
    };
    match parse_duration(&text) {
        Ok(gap) if gap >= Duration::from_secs(1) => gap,
        Ok(_) => {
            log::warn!("GATEHOUSE_JWKS_EARLY_REFRESH_GAP is below 1s; using 5s");
            EARLY_REFRESH_GAP
        }
        Err(e) => {
            log::warn!("GATEHOUSE_JWKS_EARLY_REFRESH_GAP: {e}; using 5s");
            EARLY_REFRESH_GAP
        }
    }
}
