//! Authentication at the door: JWTs, API keys (`api_key`) and client
//! certificates. Joins `request_filter` (find the credential, verify it,
//! check required claims and scopes: 401 or 403) and
//! `upstream_request_filter` (credentials of API keys removed; identity
//! headers removed from every client request, then set from what was
//! verified only).
//!
//! jsonwebtoken is permissive by default; here every provider pins its
//! algorithms, requires `exp`, checks `nbf`, requires and checks `iss` and
//! `aud` when they are configured, refuses a `crit` header, and takes keys
//! only from its own configuration.

pub mod api_key;
mod cache;
pub mod jwks;
pub mod keys;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, Validation};
use pingora_http::RequestHeader;
use serde_json::Value;

use api_key::{ApiKeys, Consumer, KeyCheck};
use cache::TokenCache;
use jwks::RemoteJwks;
use keys::{KeySet, NoKey};

use crate::tls::ClientCert;
use crate::transform::headers::{remove_fields, EditHeaders};

pub use crate::subject::Claims;

/// Tokens longer than this are refused unread.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// How long a request may wait for an early JWKS refresh after an unknown kid.
const KID_REFRESH_WAIT: Duration = Duration::from_secs(2);
/// Bytes of verified tokens and claims kept per provider.
const TOKEN_CACHE_BYTES: usize = 8 << 20;

/// Where a provider finds the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`.
    Header,
    Cookie(String),
    Query(String),
}

impl TokenSource {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "header" {
            return Ok(TokenSource::Header);
        }
        let named = |rest: &str, kind: &str| {
            if rest.is_empty() || rest.contains([';', '=', '&', ' ']) {
                Err(format!(
                    "token_from \"{s}\": {kind} name is missing or invalid"
                ))
            } else {
                Ok(rest.to_string())
            }
        };
        if let Some(rest) = s.strip_prefix("cookie:") {
            return named(rest, "the cookie").map(TokenSource::Cookie);
        }
        if let Some(rest) = s.strip_prefix("query:") {
            return named(rest, "the query parameter").map(TokenSource::Query);
        }
        Err(format!(
            "unknown token_from \"{s}\"; use header, cookie:NAME or query:NAME"
        ))
    }

    /// The token in `req`, if any. A present but empty or oversized token
    /// is still returned, to be refused as invalid.
    fn find<'r>(&self, req: &'r RequestHeader) -> Option<Cow<'r, str>> {
        match self {
            TokenSource::Header => {
                let mut all = req.headers.get_all(http::header::AUTHORIZATION).iter();
                let first = all.next()?;
                if all.next().is_some() {
                    // Which one would the upstream read? Refuse to guess.
                    return Some(Cow::Borrowed(""));
                }
                let (scheme, token) = first.to_str().ok()?.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| Cow::Borrowed(token.trim()))
            }
            TokenSource::Cookie(name) => only_one(
                req.headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .filter_map(|pair| pair.trim().split_once('='))
                    .filter(|(n, _)| n == name)
                    .map(|(_, v)| Cow::Borrowed(v.trim_matches('"'))),
            ),
            TokenSource::Query(name) => {
                only_one(crate::routing::query_values(req.uri.query()?, name))
            }
        }
    }
}

/// The one token among `candidates`; two or more are refused as invalid
/// (an empty token), since the upstream might read another than the one
/// verified.
fn only_one<'r>(mut candidates: impl Iterator<Item = Cow<'r, str>>) -> Option<Cow<'r, str>> {
    let first = candidates.next()?;
    match candidates.next() {
        Some(_) => Some(Cow::Borrowed("")),
        None => Some(first),
    }
}

/// The keys of a provider: fixed at load, or fetched from a URL.
pub enum KeyStore {
    Fixed(KeySet),
    Remote(Arc<RemoteJwks>),
}

/// One `auth.jwt` provider, compiled.
pub struct Provider {
    pub name: String,
    pub algorithms: Vec<Algorithm>,
    pub keys: KeyStore,
    pub issuer: Option<String>,
    pub audience: Vec<String>,
    pub leeway: Duration,
    pub token_from: TokenSource,
    /// Claim -> header sent upstream.
    pub forward_claims: Vec<(String, HeaderName)>,
    cache: TokenCache,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys and secrets are never printed.
        f.debug_struct("Provider")
            .field("name", &self.name)
            .finish()
    }
}

/// The credentials a route accepts, for the challenge of a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Schemes {
    pub bearer: bool,
    pub api_key: bool,
}

/// Why a request was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No credential: 401 with the challenges of the route's schemes.
    Missing(Schemes),
    /// A token that does not verify: 401 with `error="invalid_token"`.
    Invalid(&'static str),
    /// An API key no consumer holds: 401, `WWW-Authenticate: ApiKey`.
    UnknownKey,
    /// No verified client certificate on a route that needs one: 401.
    NoClientCert,
    /// Valid credentials without the required claims or scopes: 403.
    Forbidden(&'static str),
}

impl AuthError {
    pub fn status(&self) -> http::StatusCode {
        match self {
            AuthError::Forbidden(_) => http::StatusCode::FORBIDDEN,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }

    /// A short, stable reason: the metric label and the problem detail.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing(s) if s.bearer && s.api_key => "missing_credentials",
            AuthError::Missing(s) if s.api_key => "missing_api_key",
            AuthError::Missing(_) => "missing_token",
            AuthError::UnknownKey => "unknown_api_key",
            AuthError::NoClientCert => "missing_client_cert",
            AuthError::Invalid(r) | AuthError::Forbidden(r) => r,
        }
    }

    /// The challenge; none for a missing client certificate, for which
    /// HTTP has no scheme.
    pub fn www_authenticate(&self) -> Option<HeaderValue> {
        Some(HeaderValue::from_static(match self {
            AuthError::Missing(s) if s.bearer && s.api_key => "Bearer, ApiKey",
            AuthError::Missing(s) if s.api_key => "ApiKey",
            AuthError::Missing(_) => "Bearer",
            AuthError::Invalid(_) => "Bearer error=\"invalid_token\"",
            AuthError::UnknownKey => "ApiKey",
            AuthError::NoClientCert => return None,
            AuthError::Forbidden(_) => "Bearer error=\"insufficient_scope\"",
        }))
    }
}

fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

impl Provider {
    /// The `forward_claims` headers for a verified token's claims.
    pub fn claim_headers<'a>(
        &'a self,
        claims: &'a Claims,
    ) -> impl Iterator<Item = (&'a HeaderName, HeaderValue)> + 'a {
        self.forward_claims.iter().filter_map(|(claim, header)| {
            claims
                .get(claim)
                .and_then(claim_header_value)
                .map(|value| (header, value))
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        algorithms: Vec<Algorithm>,
        keys: KeyStore,
        issuer: Option<String>,
        audience: Vec<String>,
        leeway: Duration,
        token_from: TokenSource,
        forward_claims: Vec<(String, HeaderName)>,
    ) -> Self {
        Provider {
            name,
            algorithms,
            keys,
            issuer,
            audience,
            leeway,
            token_from,
            forward_claims,
            cache: TokenCache::new(TOKEN_CACHE_BYTES),
        }
    }

    pub fn remote_jwks(&self) -> Option<&Arc<RemoteJwks>> {
        match &self.keys {
            KeyStore::Remote(r) => Some(r),
            KeyStore::Fixed(_) => None,
        }
    }

    /// Verifies the request's token and returns its claims.
    pub async fn authenticate(&self, req: &RequestHeader) -> Result<Arc<Claims>, AuthError> {
        let token = self
            .token_from
            .find(req)
            .ok_or(AuthError::Missing(Schemes {
                bearer: true,
                api_key: false,
            }))?;
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Invalid("malformed_token"));
        }
        self.verify(&token).await
    }

    async fn verify(&self, token: &str) -> Result<Arc<Claims>, AuthError> {
        let keys = self.remote_jwks().map_or(0, |r| r.generation());
        if let Some(claims) = self.cache.get(token, now_secs(), keys) {
            return Ok(claims);
        }
        // `alg: none` in any spelling, or any unknown alg, fails here.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed_token"))?;
        if header.crit.is_some() {
            return Err(AuthError::Invalid("unsupported_crit"));
        }
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::Invalid("algorithm_not_allowed"));
        }
        let kid = header.kid.as_deref();
        let claims = match &self.keys {
            KeyStore::Fixed(set) => self.check(token, header.alg, set, kid)?,
            KeyStore::Remote(remote) => {
                remote.loaded(KID_REFRESH_WAIT).await;
                let set = remote.keys();
                match self.check(token, header.alg, &set, kid) {
                    Err(AuthError::Invalid("unknown_key")) => {
                        drop(set);
                        // The identity provider may have rotated its keys.
                        if !remote.refresh_now(KID_REFRESH_WAIT).await {
                            return Err(AuthError::Invalid("unknown_key"));
                        }
                        self.check(token, header.alg, &remote.keys(), kid)?
                    }
                    other => other?,
                }
            }
        };
        let exp = claims
            .get("exp")
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
            .unwrap_or(0);
        let claims = Arc::new(claims);
        // The generation read before verifying: a set that changed meanwhile
        // makes the entry verify again.
        self.cache.insert(token, Arc::clone(&claims), exp, keys);
        Ok(claims)
    }

    fn check(
        &self,
        token: &str,
        alg: Algorithm,
        set: &KeySet,
        kid: Option<&str>,
    ) -> Result<Claims, AuthError> {
        let key = set.select(kid, alg).map_err(|e| match e {
            NoKey::UnknownKid | NoKey::NoneForAlgorithm => AuthError::Invalid("unknown_key"),
            NoKey::Ambiguous => AuthError::Invalid("missing_kid"),
        })?;
        let mut v = Validation::new(alg);
        v.leeway = self.leeway.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = &self.issuer {
            v.set_issuer(&[issuer]);
            required.push("iss");
        }
        if self.audience.is_empty() {
            // Not configured: not checked (a token may still carry one).
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audience);
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            AuthError::Invalid(match e.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not_yet_valid",
                ErrorKind::InvalidIssuer => "wrong_issuer",
                ErrorKind::InvalidAudience => "wrong_audience",
                ErrorKind::MissingRequiredClaim(_) => "missing_claim",
                ErrorKind::InvalidSignature => "bad_signature",
                _ => "invalid_token",
            })
        })?;
        // A NumericDate is a number; anything else is refused.
        if !data.claims.get("exp").is_some_and(Value::is_number) {
            return Err(AuthError::Invalid("missing_claim"));
        }
        // The library also takes an array of issuers; the issuer is one string.
        if let Some(issuer) = &self.issuer {
            if data.claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str()) {
                return Err(AuthError::Invalid("wrong_issuer"));
            }
        }
        Ok(data.claims)
    }
}

impl AuthError {
    /// The 401 or 403 answer, with `WWW-Authenticate`.
    pub fn response(&self, request_id: &str) -> crate::respond::Response {
        let detail = match self {
            AuthError::Missing(s) if s.bearer && s.api_key => {
                "a bearer token or an API key is required"
            }
            AuthError::Missing(s) if s.api_key => "an API key is required",
            AuthError::Missing(_) => "a bearer token is required",
            AuthError::Invalid(_) => "the token is not valid",
            AuthError::UnknownKey => "the API key is not valid",
            AuthError::NoClientCert => "a verified client certificate is required",
            AuthError::Forbidden(_) => "the credentials do not grant access to this route",
        };
        let response = crate::respond::Response::problem(self.status(), detail, request_id);
        match self.www_authenticate() {
            Some(challenge) => response.with_header(http::header::WWW_AUTHENTICATE, challenge),
            None => response,
        }
    }
}

/// `sent` is `identity` once dashes and underscores count as one character,
/// as a CGI-style upstream counts them.
fn same_but_underscores(sent: &str, identity: &str) -> bool {
    let separator = |b: u8| b == b'-' || b == b'_';
    sent.len() == identity.len()
        && sent
            .bytes()
            .zip(identity.bytes())
            .all(|(s, i)| s == i || (separator(s) && separator(i)))
}

/// Who a request was verified as.
#[derive(Debug, Clone)]
pub enum Identity {
    Token {
        provider: Arc<Provider>,
        claims: Arc<Claims>,
    },
    Consumer {
        keys: Arc<ApiKeys>,
        consumer: Arc<Consumer>,
    },
}

impl Identity {
    /// The token's claims, or the consumer's fields: what `require_claims`,
    /// `claim:NAME` keys and `{claim.NAME}` placeholders read.
    pub fn claims(&self) -> &Claims {
        match self {
            Identity::Token { claims, .. } => claims,
            Identity::Consumer { consumer, .. } => &consumer.fields,
        }
    }

    /// The consumer as rate limits key it: scoped by its provider.
    pub fn consumer(&self) -> Option<&str> {
        match self {
            Identity::Consumer { consumer, .. } => Some(&consumer.scoped),
            Identity::Token { .. } => None,
        }
    }

    /// Who the cache keeps entries per: the kind, the provider and the
    /// user, so a token's `sub` never shares an entry with a consumer of
    /// the same name (or another provider's user). `None` without a user.
    pub fn cache_subject(&self) -> Option<String> {
        let (kind, provider, user) = match self {
            Identity::Token { provider, .. } => ("jwt", provider.name.as_str(), self.user()?),
            Identity::Consumer { keys, consumer } => {
                ("key", keys.name.as_str(), consumer.name.as_str())
            }
        };
        // Length-prefixed: a `sub` cannot forge the fields after it.
        Some(format!("{kind}:{provider}:{}:{user}", user.len()))
    }

    /// The access log's `user` and the cache's per-user key: the token's
    /// `sub` (when a string) or the consumer.
    pub fn user(&self) -> Option<&str> {
        match self {
            Identity::Token { claims, .. } => claims.get("sub")?.as_str(),
            Identity::Consumer { consumer, .. } => Some(&consumer.name),
        }
    }

    /// Hands each identity header sent upstream to `set` (no list built:
    /// this runs per request).
    pub fn each_header(&self, mut set: impl FnMut(&HeaderName, HeaderValue)) {
        match self {
            Identity::Token { provider, claims } => {
                for (name, value) in provider.claim_headers(claims) {
                    set(name, value);
                }
            }
            Identity::Consumer { keys, consumer } => {
                if let Some((name, value)) = keys.consumer_header(consumer) {
                    set(name, value);
                }
            }
        }
    }
}

/// What a request's credentials came to, once verified. Routing
/// (`match.claims`) may verify them before `guard` does; whatever it found,
/// an identity or a refusal, `guard` takes instead of verifying again, so a
/// forged token costs one verification (and an unknown kid one early JWKS
/// fetch) whichever route is chosen.
#[derive(Debug, Clone, Default)]
pub enum Verdict {
    /// Not verified yet, or nothing the route verifies (a route asking only
    /// for a client certificate).
    #[default]
    Unverified,
    Verified(Identity),
    Refused(AuthError),
}

impl Verdict {
    /// The verdict of [`RouteAuth::identify`]'s result.
    pub fn of(identified: Result<Option<Identity>, AuthError>) -> Self {
        match identified {
            Ok(Some(identity)) => Verdict::Verified(identity),
            Ok(None) => Verdict::Unverified,
            Err(e) => Verdict::Refused(e),
        }
    }

    /// The identity the credentials verified as, if they did.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Verdict::Verified(identity) => Some(identity),
            Verdict::Unverified | Verdict::Refused(_) => None,
        }
    }
}

/// Identity headers on the upstream request: whatever the client sent
/// under those names is dropped, then the verified identity's are set.
pub fn forward_identity(
    identity_headers: &[HeaderName],
    verified: Option<&Identity>,
    client_cert: Option<&ClientCert>,
    upstream: &mut impl EditHeaders,
) {
    if identity_headers.is_empty() {
        return;
    }
    // CGI-style upstreams read X_User_Id as X-User-Id, so such spellings go
    // too.
    remove_fields(upstream, |sent| {
        identity_headers
            .iter()
            .any(|identity| same_but_underscores(sent.as_str(), identity.as_str()))
    });
    if let Some(identity) = verified {
        identity.each_header(|header, value| upstream.insert(header, value));
    }
    for (header, value) in client_cert.into_iter().flat_map(ClientCert::headers) {
        upstream.insert(&header, value);
    }
}

/// What a request the gateway makes on a client's behalf (an aggregate
/// part) carries of who asked: the request id, the client's
/// `Authorization`, and the verified identity's headers (never an API key).
pub fn part_headers(
    request_id: &HeaderValue,
    authorization: Option<&HeaderValue>,
    verified: Option<&Identity>,
    client_cert: Option<&ClientCert>,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = vec![(crate::forwarding::REQUEST_ID, request_id.clone())];
    headers.extend(authorization.map(|v| (http::header::AUTHORIZATION, v.clone())));
    if let Some(identity) = verified {
        identity.each_header(|name, value| headers.push((name.clone(), value)));
    }
    headers.extend(client_cert.into_iter().flat_map(ClientCert::headers));
    headers
}

/// One credential a route accepts.
#[derive(Debug, Clone)]
pub enum Method {
    Jwt(Arc<Provider>),
    ApiKey(Arc<ApiKeys>),
}

/// A route's `auth`: the credentials it accepts (any one of them), the
/// claims and scopes they must carry, and whether a verified client
/// certificate is needed as well.
#[derive(Debug)]
pub struct RouteAuth {
    /// Tokens first, then keys: a token sent beside a key is tried first
    /// and its identity wins.
    pub methods: Vec<Method>,
    pub require_claims: Vec<(String, Vec<Value>)>,
    pub require_scopes: Vec<String>,
    pub client_cert: bool,
}

impl RouteAuth {
    /// Whether `other` verifies the same credentials the same way (the same
    /// providers, in the same order): one's identity is the other's.
    pub fn same_credentials(&self, other: &RouteAuth) -> bool {
        self.methods.len() == other.methods.len()
            && self
                .methods
                .iter()
                .zip(&other.methods)
                .all(|pair| match pair {
                    (Method::Jwt(a), Method::Jwt(b)) => Arc::ptr_eq(a, b),
                    (Method::ApiKey(a), Method::ApiKey(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                })
    }

    /// The identity a request's credentials verify as (`None` on a route
    /// that asks only for a client certificate, checked with
    /// `client_cert_verified`).
    /// `verified`: what routing already found these credentials to be (for
    /// `match.claims`), valid or not, so they are not verified twice.
    pub async fn authorize(
        &self,
        req: &RequestHeader,
        client_cert_verified: bool,
        verified: Verdict,
    ) -> Result<Option<Identity>, AuthError> {
        if self.client_cert && !client_cert_verified {
            return Err(AuthError::NoClientCert);
        }
        let identity = match verified {
            Verdict::Verified(identity) => identity,
            Verdict::Refused(e) => return Err(e),
            Verdict::Unverified => match self.identify(req).await? {
                Some(identity) => identity,
                None => return Ok(None),
            },
        };
        let claims = identity.claims();
        for (name, accepted) in &self.require_claims {
            let ok = match claims.get(name) {
                Some(Value::Array(items)) => items.iter().any(|i| accepted.contains(i)),
                Some(v) => accepted.contains(v),
                None => false,
            };
            if !ok {
                return Err(AuthError::Forbidden("claim_not_allowed"));
            }
        }
        if !self.require_scopes.is_empty() {
            let granted = scopes(claims);
            if !self
                .require_scopes
                .iter()
                .all(|s| granted.contains(&s.as_str()))
            {
                return Err(AuthError::Forbidden("insufficient_scope"));
            }
        }
        Ok(Some(identity))
    }

    /// The first credential sent that verifies; the first failure when
    /// none does; `Missing` when none was sent.
    pub async fn identify(&self, req: &RequestHeader) -> Result<Option<Identity>, AuthError> {
        if self.methods.is_empty() {
            return Ok(None);
        }
        let mut first_failure = None;
        for method in &self.methods {
            let outcome = match method {
                Method::Jwt(provider) => match provider.authenticate(req).await {
                    Ok(claims) => Ok(Identity::Token {
                        provider: Arc::clone(provider),
                        claims,
                    }),
                    Err(AuthError::Missing(_)) => continue,
                    Err(e) => Err(e),
                },
                Method::ApiKey(keys) => match keys.check(req) {
                    KeyCheck::Valid(consumer) => Ok(Identity::Consumer {
                        keys: Arc::clone(keys),
                        consumer,
                    }),
                    KeyCheck::Missing => continue,
                    KeyCheck::Unknown => Err(AuthError::UnknownKey),
                },
            };
            match outcome {
                Ok(identity) => return Ok(Some(identity)),
                Err(e) => {
                    first_failure.get_or_insert(e);
                }
            }
        }
        Err(first_failure.unwrap_or(AuthError::Missing(self.schemes())))
    }

    fn schemes(&self) -> Schemes {
        Schemes {
            bearer: self.methods.iter().any(|m| matches!(m, Method::Jwt(_))),
            api_key: self.methods.iter().any(|m| matches!(m, Method::ApiKey(_))),
        }
    }

    /// Removes the route's API keys from the upstream request.
    pub fn strip_keys(&self, upstream: &mut RequestHeader) {
        for method in &self.methods {
            if let Method::ApiKey(keys) = method {
                keys.strip(upstream);
            }
        }
    }
}

/// The space-separated `scope` claim, or the `scp` array.
fn scopes(claims: &Claims) -> Vec<&str> {
    match (claims.get("scope"), claims.get("scp")) {
        (Some(Value::String(s)), _) => s.split_whitespace().collect(),
        (_, Some(Value::Array(items))) => items.iter().filter_map(Value::as_str).collect(),
        (_, Some(Value::String(s))) => s.split_whitespace().collect(),
        _ => Vec::new(),
    }
}

/// A claim as a header value: strings as they are, numbers and booleans as
/// text, arrays of strings joined by commas; anything else, or a value that
/// cannot be a header, is not sent.
pub fn claim_header_value(value: &Value) -> Option<HeaderValue> {
    let text = match value {
        Value::String(s) => Cow::Borrowed(s.as_str()),
        Value::Number(n) => Cow::Owned(n.to_string()),
        Value::Bool(b) => Cow::Owned(b.to_string()),
        Value::Array(items) => Cow::Owned(
            items
                .iter()
                .map(|i| i.as_str())
                .collect::<Option<Vec<_>>>()?
                .join(","),
        ),
        _ => return None,
    };
    HeaderValue::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)], path: &str) -> RequestHeader {
        let mut r = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn identity_spellings_with_underscores_are_the_same_field() {
        for sent in ["x-user-id", "x_user_id", "x-user_id"] {
            assert!(same_but_underscores(sent, "x-user-id"), "{sent}");
        }
        for sent in ["x-user-idx", "x-user", "x_user-ie", "x-user-id_"] {
            assert!(!same_but_underscores(sent, "x-user-id"), "{sent}");
        }
        // Either way round: an identity header may itself use underscores.
        assert!(same_but_underscores("x-user-id", "x_user_id"));
    }

    #[test]
    fn tokens_are_found_where_configured() {
        let r = req(&[("Authorization", "bearer abc.def.ghi")], "/");
        assert_eq!(TokenSource::Header.find(&r).as_deref(), Some("abc.def.ghi"));
        let r = req(&[("Authorization", "Basic dXNlcjpwdw==")], "/");
        assert_eq!(TokenSource::Header.find(&r), None);
        let r = req(&[("Cookie", "a=1; session=tok.en.x; b=2")], "/");
        let cookie = TokenSource::parse("cookie:session").unwrap();
        assert_eq!(cookie.find(&r).as_deref(), Some("tok.en.x"));
        let r = req(&[], "/x?a=1&access_token=q.t.x");
        let query = TokenSource::parse("query:access_token").unwrap();
        assert_eq!(query.find(&r).as_deref(), Some("q.t.x"));
        assert!(TokenSource::parse("cookie:").is_err());
        assert!(TokenSource::parse("body").is_err());
    }

    #[test]
    fn scopes_from_scope_or_scp() {
        let mut c = Claims::new();
        c.insert("scope".into(), Value::from("a b  c"));
        assert_eq!(scopes(&c), ["a", "b", "c"]);
        let mut c = Claims::new();
        c.insert("scp".into(), serde_json::json!(["x", "y"]));
        assert_eq!(scopes(&c), ["x", "y"]);
    }

    #[test]
    fn claims_as_headers() {
        assert_eq!(claim_header_value(&Value::from("u-1")).unwrap(), "u-1");
        assert_eq!(claim_header_value(&Value::from(42)).unwrap(), "42");
        assert_eq!(
            claim_header_value(&serde_json::json!(["a", "b"])).unwrap(),
            "a,b"
        );
        assert!(claim_header_value(&serde_json::json!({"a": 1})).is_none());
        assert!(claim_header_value(&Value::from("bad\r\nX-Injected: 1")).is_none());
    }
}
