//! The floor Pingora sets: a proxy that does nothing but forward to one
//! prebuilt upstream peer, built with gatehouse's allocator, release profile,
//! server options and listener buffer setting (`bench/run.sh` turns its
//! transparent huge pages off, as gatehouse does for itself). The bench runs
//! it beside gatehouse so the cost of the gateway's own work (routing, header
//! rules, request ids, forwarding headers, metrics, logs) is separated from
//! the cost of Pingora itself.
//!
//! With a third argument `minimum` it does, with Pingora's own API and
//! nothing more, the least SPEC 2.3 asks of every request: upstream connect,
//! read and write timeouts, the five forwarding fields (`X-Forwarded-For`,
//! `-Proto`, `-Host`, `X-Real-IP`, `Forwarded`), `X-Original-URL` and
//! `X-Rewrite-URL` removed, and an `X-Request-Id` generated for the upstream
//! and returned to the client. No routing, metrics, logs, trusted-proxy
//! checks or validation: what any Pingora gateway meeting the SPEC pays at the
//! least, so the bench can say how much of gatehouse's cost the SPEC sets.
//!
//! Run: `cargo run --release --example bare_proxy -- LISTEN_ADDR UPSTREAM_ADDR [minimum]`

use std::time::Duration;

use async_trait::async_trait;
use http::header::{HeaderName, HeaderValue, FORWARDED, HOST};
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{ErrorType::InvalidHTTPHeader, OrErr};
use pingora_proxy::{ProxyHttp, Session};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    peer: HttpPeer,
    minimum: bool,
}

/// Per request, in the `minimum` mode: the request id sent upstream and back.
type RequestId = Option<HeaderValue>;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = RequestId;

    fn new_ctx(&self) -> Self::CTX {
        None
    }

    // Gatehouse drops Pingora's compression module too; keep the floor comparable.
    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora_error::Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        request: &mut pingora_http::RequestHeader,
        request_id: &mut Self::CTX,
    ) -> pingora_error::Result<()> {
        if !self.minimum {
            return Ok(());
        }
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let host = request.headers.get(HOST).cloned();
        let forwarded = match host.as_ref().and_then(|h| h.to_str().ok()) {
            Some(host) => format!("for={client};proto=http;host={host}"),
            None => format!("for={client};proto=http"),
        };
        let client = HeaderValue::try_from(client).or_err(InvalidHTTPHeader, "client")?;
        let mut buf = uuid::Uuid::encode_buffer();
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
        let id = HeaderValue::from_str(id).or_err(InvalidHTTPHeader, "request id")?;
        request.remove_header("X-Original-URL");
        request.remove_header("X-Rewrite-URL");
        request.insert_header(X_FORWARDED_FOR, client.clone())?;
        request.insert_header(X_FORWARDED_PROTO, HeaderValue::from_static("http"))?;
        if let Some(host) = host {
            request.insert_header(X_FORWARDED_HOST, host)?;
        }
        request.insert_header(X_REAL_IP, client)?;
        request.insert_header(FORWARDED, forwarded)?;
        request.insert_header(X_REQUEST_ID, id.clone())?;
        *request_id = Some(id);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut pingora_http::ResponseHeader,
        request_id: &mut Self::CTX,
    ) -> pingora_error::Result<()> {
        if let Some(id) = request_id.take() {
            response.insert_header(X_REQUEST_ID, id)?;
        }
        Ok(())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: bare_proxy LISTEN_ADDR UPSTREAM_ADDR [minimum]");
        std::process::exit(2);
    };
    let minimum = args.get(3).is_some_and(|a| a == "minimum");
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        upstream_keepalive_pool_size: 1024,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: false,
        daemon: false,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    let mut peer = HttpPeer::new(upstream.as_str(), false, String::new());
    if minimum {
        // gatehouse's defaults (SPEC 2.1): a gateway without them hangs on a
        // silent upstream.
        peer.options.connection_timeout = Some(Duration::from_secs(2));
        peer.options.total_connection_timeout = Some(Duration::from_secs(2));
        peer.options.read_timeout = Some(Duration::from_secs(30));
        peer.options.write_timeout = Some(Duration::from_secs(30));
    }
    let bare = Bare { peer, minimum };
    let mut service = pingora_proxy::http_proxy_service(&server.configuration, bare);
    // As gatehouse's plain listeners: reads land straight in Pingora's buffers.
    service.add_listener(
        ListenerConfig::tcp(listen.as_str()).l4_buffer(L4BufferSettings::default().read(0)),
    );
    server.add_service(service);
    server.run_forever();
}
