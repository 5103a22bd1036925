//! The admin listener (`admin.listen`), never served on a public listener:
//! `GET /metrics`, `GET /healthz`, `GET /readyz`, `POST /reload` and the
//! cache purges `DELETE /cache[?prefix=/path]`. Anything else is a
//! problem+json 404. `GET /` is the dashboard, `GET /status` its numbers
//! (`status`). With `admin.token`, every endpoint but `/healthz` and
//! `/readyz` asks for it (Bearer, or the password of Basic).

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

use crate::cache::Cache;
use crate::cluster::StoreState;
use crate::config::AdminToken;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::ratelimit::OnStoreError;
use crate::reload::Reloader;
use crate::status::Sampler;

pub struct AdminApp {
    gateway: Arc<Gateway>,
    cache: Option<Cache>,
    metrics: Arc<Metrics>,
    reloader: Arc<Reloader>,
    token: Option<AdminToken>,
    sampler: Arc<Sampler>,
    /// The dashboard's `Content-Security-Policy`: its own inline script
    /// (by hash) and nothing from anywhere else.
    dashboard_csp: http::HeaderValue,
}

/// The policy that lets the dashboard run exactly its own script.
fn dashboard_csp() -> http::HeaderValue {
    use base64::Engine;
    use sha2::Digest;
    let script = DASHBOARD
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map_or("", |(script, _)| script);
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
    let policy = format!(
        "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    );
    http::HeaderValue::from_str(&policy)
        .unwrap_or(http::HeaderValue::from_static("default-src 'none'"))
}

/// The dashboard (SPEC section 9.2): one page, its style and script inline,
/// drawing `GET /status` every two seconds.
const DASHBOARD: &str = include_str!("dashboard.html");

impl AdminApp {
    pub fn new(
        gateway: Arc<Gateway>,
        cache: Option<Cache>,
        metrics: Arc<Metrics>,
        reloader: Arc<Reloader>,
        token: Option<AdminToken>,
        sampler: Arc<Sampler>,
    ) -> Self {
        AdminApp {
            gateway,
            cache,
            metrics,
            reloader,
            token,
            sampler,
            dashboard_csp: dashboard_csp(),
        }
    }

    /// 200 while every upstream has a healthy target, else 503 naming each
    /// upstream without one. The cluster's store is listed; it fails
    /// readiness only while down for a route that refuses without it
    /// (`on_store_error: deny`).
    /// The served certificates' remaining lifetimes, as of this scrape (a
    /// reload may have replaced them).
    fn certificate_expiry(&self) {
        let gauge = &self.metrics.tls_certificate_expiry;
        gauge.reset();
        let now = crate::tls::now_unix();
        for (_, table) in &self.gateway.current().certificates {
            for cert in &table.certificates {
                gauge
                    .with_label_values(&[cert.label()])
                    .set(cert.not_after - now);
            }
        }
    }

    fn ready(&self) -> Response<Vec<u8>> {
        let runtime = self.gateway.current();
        let mut reasons: Vec<String> = runtime
            .upstreams
            .values()
            .filter(|u| !u.has_healthy_target())
            .map(|u| format!("upstream {} has no healthy target", u.name))
            .collect();
        let store = runtime.cluster.as_ref().map(|c| {
            let state = c.state();
            let denying = runtime.router.routes().iter().any(|r| {
                r.rate_limit
                    .as_ref()
                    .is_some_and(|l| l.on_store_error() == Some(OnStoreError::Deny))
            });
            // A blip of a few hundred milliseconds does not take the
            // instance out of its load balancer.
            let outage = c
                .down_for()
                .is_some_and(|d| d >= std::time::Duration::from_secs(1));
            if state != StoreState::Up && outage && denying {
                reasons.push(format!(
                    "the cluster store is {} and a route's rate limit refuses without it",
                    state.as_str()
                ));
            }
            serde_json::json!({
                "store": state.as_str(),
                "redis": c.shown_url,
                "last_error": c.last_error(),
                "hears_purges": c.hears_purges(),
            })
        });
        if reasons.is_empty() {
            let mut body = serde_json::json!({ "status": "ready" });
            if let Some(store) = store {
                body["cluster"] = store;
            }
            return reply(
                StatusCode::OK,
                "application/json",
                body.to_string().into_bytes(),
            );
        }
        let mut body = serde_json::json!({
            "type": "about:blank",
            "title": "Service Unavailable",
            "status": 503,
            "detail": reasons.join("; "),
            "reasons": reasons,
        });
        if let Some(store) = store {
            body["cluster"] = store;
        }
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "application/problem+json",
            body.to_string().into_bytes(),
        )
    }

    async fn reload(&self) -> Response<Vec<u8>> {
        match self.reloader.reload().await {
            Ok(summary) => {
                let body = serde_json::json!({ "status": "reloaded", "summary": summary });
                reply(
                    StatusCode::OK,
                    "application/json",
                    body.to_string().into_bytes(),
                )
            }
            Err(errors) => {
                let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                let body = serde_json::json!({
                    "type": "about:blank",
                    "title": "Bad Request",
                    "status": 400,
                    "detail": "the configuration file has errors; nothing was changed",
                    "errors": list,
                });
                reply(
                    StatusCode::BAD_REQUEST,
                    "application/problem+json",
                    body.to_string().into_bytes(),
                )
            }
        }
    }

    /// `DELETE /cache` empties the cache; `?prefix=/v1/users` drops only
    /// the paths under that prefix. With a `cluster`, the purge is published
    /// to every instance; if that fails, the answer is a 503 saying this
    /// instance purged and the others may not have (retry it).
    async fn purge(&self, query: Option<&str>) -> Response<Vec<u8>> {
        let Some(cache) = &self.cache else {
            return problem(StatusCode::NOT_FOUND, "no route caches responses");
        };
        let prefix = query
            .and_then(|q| crate::routing::query_values(q, "prefix").next())
            .map(|p| p.into_owned());
        let purged = match &prefix {
            Some(p) if !p.starts_with('/') => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "prefix must be a path starting with /",
                )
            }
            Some(p) => cache.storage.purge_prefix(p),
            None => cache.storage.purge_all(),
        };
        let mut body = serde_json::json!({ "purged": purged, "prefix": prefix });
        let cluster = self.gateway.current().cluster.clone();
        if let Some(cluster) = cluster {
            match cluster.publish_purge(prefix.as_deref()).await {
                // Counts this instance's own subscription too.
                Ok(subscribers) => {
                    body["cluster"] =
                        serde_json::json!({ "published": true, "subscribers": subscribers })
                }
                Err(e) => {
                    self.metrics
                        .cluster_store_errors
                        .with_label_values(&[e.reason()])
                        .inc();
                    let detail = format!(
                        "purged {purged} entries here, but {e}: the other instances may not have purged; retry"
                    );
                    return problem_with(e.status(), &detail, |p| p["purged"] = purged.into());
                }
            }
        }
        reply(
            StatusCode::OK,
            "application/json",
            body.to_string().into_bytes(),
        )
    }
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}

fn problem(status: StatusCode, detail: &str) -> Response<Vec<u8>> {
    problem_with(status, detail, |_| {})
}

/// A problem document with members of its own added by `extend`, and the
/// `X-Request-Id` its `request_id` names.
fn problem_with(
    status: StatusCode,
    detail: &str,
    extend: impl FnOnce(&mut serde_json::Value),
) -> Response<Vec<u8>> {
    let id = crate::forwarding::RequestId::generate();
    let body = crate::respond::Response::problem(status, detail, id.as_str()).body;
    let mut document: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    extend(&mut document);
    let mut resp = reply(
        status,
        "application/problem+json",
        document.to_string().into_bytes(),
    );
    if let Ok(v) = http::HeaderValue::from_str(id.as_str()) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

impl AdminApp {
    /// What a web page must not make a browser do here. A change (`POST`,
    /// `DELETE`) sent cross-site (`Sec-Fetch-Site`, or an `Origin` other
    /// than this host) is refused: a browser that opened the dashboard
    /// would attach its Basic credentials to it. Without a token, a `Host`
    /// that is not an address, `localhost` or a single label is refused: a
    /// page whose public name was made to resolve to this listener's
    /// address, loopback or private (DNS rebinding), cannot read it or
    /// change it, while a scraper's `Host: gatehouse:9901` (a container or
    /// service name, which no outside site can publish) is served.
    fn refuse_from_browsers(
        &self,
        req: &pingora_http::RequestHeader,
        open: bool,
    ) -> Option<Response<Vec<u8>>> {
        let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
        let host = header("host").map(crate::forwarding::strip_port);
        if self.token.is_none() && !open {
            let local = host.is_some_and(|h| {
                // One label (`localhost`, a container or service name).
                (!h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
                    || h.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok()
            });
            if !local {
                return Some(problem(
                    StatusCode::FORBIDDEN,
                    "without admin.token, the admin listener answers only a Host that is an address, localhost or a single name",
                ));
            }
        }
        if matches!(req.method, Method::GET | Method::HEAD) {
            return None;
        }
        let cross_site =
            header("sec-fetch-site").is_some_and(|s| s != "same-origin" && s != "none");
        let foreign_origin = header("origin").is_some_and(|origin| {
            let named = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            Some(named) != header("host")
        });
        (cross_site || foreign_origin).then(|| {
            problem(
                StatusCode::FORBIDDEN,
                "a change to the admin listener is not taken from another site's page",
            )
        })
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (method, path) = (req.method.clone(), req.uri.path().to_string());
        let open = matches!(path.as_str(), "/healthz" | "/readyz");
        if let Some(refused) = self.refuse_from_browsers(req, open) {
            return refused;
        }
        if let Some(token) = self.token.as_ref().filter(|_| !open) {
            if !token.admits(&req.headers) {
                log::warn!("admin: {method} {path} refused: no valid admin token");
                let mut resp = problem(
                    StatusCode::UNAUTHORIZED,
                    "the admin listener needs its token (Authorization: Bearer, or Basic with the token as password)",
                );
                resp.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Basic realm=\"gatehouse admin\""),
                );
                return resp;
            }
        }
        match (method, path.as_str()) {
            (Method::GET | Method::HEAD, "/healthz") => reply(
                StatusCode::OK,
                "application/json",
                br#"{"status":"ok"}"#.to_vec(),
            ),
            (_, "/healthz") => problem(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
            (Method::GET | Method::HEAD, "/readyz") => self.ready(),
            (Method::GET | Method::HEAD, "/metrics") => {
                self.certificate_expiry();
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.metrics.render(),
                )
            }
            (Method::GET | Method::HEAD, "/") => {
                let mut resp = reply(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    DASHBOARD.as_bytes().to_vec(),
                );
                // The page runs its own script only: nothing from elsewhere.
                resp.headers_mut().insert(
                    http::header::CONTENT_SECURITY_POLICY,
                    self.dashboard_csp.clone(),
                );
                resp
            }
            (Method::GET | Method::HEAD, "/status") => {
                let status = self
                    .sampler
                    .status(&self.gateway.current(), self.reloader.history());
                reply(
                    StatusCode::OK,
                    "application/json",
                    status.to_string().into_bytes(),
                )
            }
            (_, "/" | "/status") => problem(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
            (Method::POST, "/reload") => self.reload().await,
            (_, "/readyz" | "/metrics") => problem(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
            (_, "/reload") => problem(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
            (Method::DELETE, "/cache") => {
                let query = req.uri.query().map(str::to_owned);
                self.purge(query.as_deref()).await
            }
            (_, "/cache") => problem(StatusCode::METHOD_NOT_ALLOWED, "use DELETE"),
            _ => problem(StatusCode::NOT_FOUND, "no such admin endpoint"),
        }
    }
}
