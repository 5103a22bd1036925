//! Verification keys: a secret, a PEM public key, or a JWK set. A key is
//! chosen only from these, by the token's `kid` where there are several;
//! never from the token's own `jwk`, `jku` or `x5u`.

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

pub struct VerifyKey {
    pub kid: Option<String>,
    /// When the JWK names its algorithm, only that one is accepted with it.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

impl VerifyKey {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.key.family() == alg.family() && self.alg.is_none_or(|a| a == alg)
    }
}

/// The keys of one provider at one moment.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<VerifyKey>,
}

/// Why no key was found for a token.
#[derive(Debug, PartialEq, Eq)]
pub enum NoKey {
    /// The token names a `kid` this set does not have.
    UnknownKid,
    /// No `kid`, and more than one key could verify the token.
    Ambiguous,
    /// No key of the token's algorithm family.
    NoneForAlgorithm,
}

impl KeySet {
    pub fn new(keys: Vec<VerifyKey>) -> Self {
        KeySet { keys }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn select(&self, kid: Option<&str>, alg: Algorithm) -> Result<&VerifyKey, NoKey> {
        match kid {
            Some(kid) if self.keys.iter().any(|k| k.kid.is_some()) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid) && k.accepts(alg))
                .ok_or(NoKey::UnknownKid),
            // A single key without a kid verifies any token of its family;
            // with several, the token must say which.
            _ => {
                let mut fitting = self.keys.iter().filter(|k| k.accepts(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => Ok(k),
                    (Some(_), Some(_)) => Err(NoKey::Ambiguous),
                    (None, _) => Err(NoKey::NoneForAlgorithm),
                }
            }
        }
    }

    /// Builds the set from a JWKS document, keeping the keys usable with
    /// `algorithms`. Keys of other kinds are skipped, not errors: identity
    /// providers publish keys for several purposes.
    pub fn from_jwks(json: &[u8], algorithms: &[Algorithm]) -> Result<KeySet, String> {
        let set: JwkSet =
            serde_json::from_slice(json).map_err(|e| format!("not a JWK set: {e}"))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            // Only keys meant for verifying signatures.
            let common = &jwk.common;
            if common
                .public_key_use
                .as_ref()
                .is_some_and(|u| *u != PublicKeyUse::Signature)
            {
                continue;
            }
            if common
                .key_operations
                .as_ref()
                .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
            {
                continue;
            }
            let declared = common
                .key_algorithm
                .map(|a| a.to_string().parse::<Algorithm>());
            // An algorithm that is not a signing one (RSA-OAEP...) rules it out.
            if matches!(declared, Some(Err(_))) {
                continue;
            }
            if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_))
                && !algorithms
                    .iter()
                    .any(|a| a.family() == AlgorithmFamily::Hmac)
            {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let alg = declared.and_then(Result::ok);
            if !algorithms.iter().any(|a| a.family() == key.family()) {
                continue;
            }
            if alg.is_some_and(|a| !algorithms.contains(&a)) {
                continue;
            }
            keys.push(VerifyKey {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            });
        }
        if keys.is_empty() {
            return Err("the JWK set holds no key usable with the configured algorithms".into());
        }
        Ok(KeySet { keys })
    }
}

/// Reads one PEM public key for `family`.
pub fn from_pem(pem: &[u8], family: AlgorithmFamily) -> Result<DecodingKey, String> {
    let key = match family {
        AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem),
        AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem),
        AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem),
        AlgorithmFamily::Hmac => return Err("an HMAC key is a secret, not a PEM file".into()),
    };
    key.map_err(|e| format!("not a PEM public key for these algorithms: {e}"))
}

/// The shortest secret accepted for an HMAC algorithm (RFC 7518 3.2: at
/// least the hash size).
pub fn min_secret_len(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsa_jwk(extra: &str) -> String {
        // A 2048-bit RSA public key (tests/keys/rsa1.pub.pem), as a JWK.
        let pem =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/rsa1.pem")).unwrap();
        let enc = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap();
        let mut jwk = serde_json::to_value(
            jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::RS256).unwrap(),
        )
        .unwrap();
        jwk.as_object_mut().unwrap().remove("alg");
        let extra: serde_json::Value = serde_json::from_str(extra).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            jwk[k] = v.clone();
        }
        serde_json::json!({ "keys": [jwk] }).to_string()
    }

    #[test]
    fn only_signature_keys_are_taken() {
        let algs = [Algorithm::RS256];
        assert_eq!(
            KeySet::from_jwks(rsa_jwk(r#"{"kid":"a","use":"sig"}"#).as_bytes(), &algs)
                .unwrap()
                .len(),
            1
        );
        assert!(
            KeySet::from_jwks(rsa_jwk(r#"{"kid":"a","use":"enc"}"#).as_bytes(), &algs).is_err()
        );
        assert!(
            KeySet::from_jwks(rsa_jwk(r#"{"kid":"a","alg":"RSA-OAEP"}"#).as_bytes(), &algs)
                .is_err()
        );
        assert!(KeySet::from_jwks(
            rsa_jwk(r#"{"kid":"a","key_ops":["encrypt"]}"#).as_bytes(),
            &algs
        )
        .is_err());
        // An RSA key is no use to an ES256-only provider.
        assert!(
            KeySet::from_jwks(rsa_jwk(r#"{"kid":"a"}"#).as_bytes(), &[Algorithm::ES256]).is_err()
        );
    }
}
