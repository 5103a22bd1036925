//! `admin.token` (SPEC section 9.3): compiled with the `admin` section,
//! checked by the admin listener on each request.

/// `admin.token`, kept as its SHA-256 digest: a presented credential is
/// digested and compared in constant time (whatever its length), and the
/// token itself is never printed (`Debug` shows nothing of it).
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken([u8; 32]);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// A token shorter than this is refused: it could be guessed.
const MIN_TOKEN_LEN: usize = 16;

impl AdminToken {
    pub fn new(token: &str) -> Result<Self, String> {
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the admin token must be at least {MIN_TOKEN_LEN} characters (openssl rand -hex 32 makes one)"
            ));
        }
        if token.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err("the admin token must be printable characters without spaces".into());
        }
        Ok(AdminToken(Self::digest(token.as_bytes())))
    }

    fn digest(bytes: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(bytes).into()
    }

    fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        Self::digest(presented).ct_eq(&self.0).into()
    }

    /// Whether the request's `Authorization` carries the token: `Bearer
    /// TOKEN`, or Basic with the token as the password (any user name).
    pub fn admits(&self, headers: &http::HeaderMap) -> bool {
        use base64::Engine;
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        let scheme_is = |scheme: &str| {
            value.len() > scheme.len()
                && value[..scheme.len()].eq_ignore_ascii_case(scheme.as_bytes())
                && value[scheme.len()] == b' '
        };
        if scheme_is("Bearer") {
            return self.matches(value["Bearer ".len()..].trim_ascii());
        }
        if scheme_is("Basic") {
            let encoded = value["Basic ".len()..].trim_ascii();
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
                return false;
            };
            let password = match decoded.iter().position(|b| *b == b':') {
                Some(colon) => &decoded[colon + 1..],
                None => return false,
            };
            return self.matches(password);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn headers(value: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn the_token_is_taken_as_bearer_or_as_a_basic_password() {
        let token = AdminToken::new("s3cret-admin-token-0123").unwrap();
        let basic = |creds: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(creds)
            )
        };
        assert!(token.admits(&headers("Bearer s3cret-admin-token-0123")));
        assert!(token.admits(&headers("bearer s3cret-admin-token-0123")));
        assert!(token.admits(&headers(&basic("anyone:s3cret-admin-token-0123"))));
        assert!(token.admits(&headers(&basic(":s3cret-admin-token-0123"))));
        assert!(!token.admits(&headers("Bearer s3cret-admin-token-012")));
        assert!(!token.admits(&headers(&basic("s3cret-admin-token-0123"))));
        assert!(!token.admits(&headers(&basic("s3cret-admin-token-0123:x"))));
        assert!(!token.admits(&headers("Basic !!!")));
        assert!(!token.admits(&headers("Token s3cret-admin-token-0123")));
        assert!(!token.admits(&http::HeaderMap::new()));
        assert_eq!(format!("{token:?}"), "AdminToken(..)");
        assert!(AdminToken::new("short").is_err());
        assert!(AdminToken::new("has a space in it, long").is_err());
    }
}
