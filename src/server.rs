//! Assembling the Pingora server from a validated configuration: the proxy
//! service on the public listeners, the admin service, and health checks.

use std::sync::Arc;

use pingora_core::apps::http_app::HttpServer;
use pingora_core::apps::HttpServerOptions;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;
use pingora_core::tls::x509::X509;
use pingora_proxy::HttpProxy;

use crate::access_log::{AccessLog, LogCloser};
use crate::admin::AdminApp;
use crate::background::ConfigFollower;
use crate::cache::Cache;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::listener::{Gate, HeadGuard, HeadLimits};
use crate::metrics::Metrics;
use crate::observe::Observer;
use crate::outbound::Client;
use crate::proxy::Proxy;
use crate::reload::{Reloader, SighupService};
use crate::route::Route;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS listener {addr}: {message}")]
    Tls { addr: String, message: String },
}

/// What the command line asked for.
pub struct RunOptions {
    pub upgrade: bool,
    pub daemon: bool,
    /// The configuration file, read again on a reload.
    pub conf: std::path::PathBuf,
}

/// The HTTP/2 layer's own bound on a decoded header block: well above
/// `max_header_size`, so that heads over it reach the proxy's check and get
/// its problem document, yet bounded (each open stream may hold one).
fn h2_header_list_limit(max_header_size: usize) -> u32 {
    (max_header_size.max(64 << 10) + (64 << 10)).min(u32::MAX as usize) as u32
}

fn seconds_ceil(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The assembled server, ready to run.
pub struct Gatehouse {
    server: Server,
    log: Option<LogCloser>,
    /// The one stop signal of all background work (`background`, the
    /// access log's writer).
    stop: CancellationToken,
}

impl Gatehouse {
    /// Serves until a signal stops the server (a fast or graceful shutdown,
    /// or an upgrade's handover), then writes out the access log's last
    /// lines.
    pub fn run(self) {
        self.server.run(RunArgs::default());
        self.stop.cancel();
        if let Some(log) = self.log {
            log.join();
        }
    }
}

pub fn build(config: Config, options: &RunOptions) -> Result<Gatehouse, StartError> {
    let s = &config.server;
    let conf = ServerConf {
        threads: s.threads,
        work_stealing: s.work_stealing,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        grace_period_seconds: Some(seconds_ceil(s.grace_period)),
        graceful_shutdown_timeout_seconds: Some(seconds_ceil(s.graceful_shutdown_timeout)),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        error_log: s.error_log.clone(),
        user: s.user.clone(),
        group: s.group.clone(),
        daemon: options.daemon,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: options.upgrade,
        daemon: options.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    let conf = Arc::clone(&server.configuration);

    let settings = Arc::new(config.server.clone());
    let fixed_at_start = crate::reload::FixedParts::of(&config);
    let gateway = Arc::new(Gateway::new(config.runtime));
    // Bodies held whole (body rules, aggregate parts, cache fills) share it.
    let buffered = crate::budget::Budget::new(config.server.max_buffered);
    let cache = config
        .cache_max_size
        .map(|size| Cache::new(size, std::sync::Arc::clone(&buffered)));
    let metrics = Arc::new(Metrics::new());
    let stop = CancellationToken::new();
    let (log, log_writer) = AccessLog::new(
        config.access_log.clone(),
        Arc::clone(&metrics),
        config.server.threads,
        stop.clone(),
    );
    // With `tracing`: the tracer requests hand spans to, and the exporter
    // that sends them from a background service of its own.
    let (tracer, trace_export) = match &config.tracing {
        Some(settings) => {
            let dropped = metrics.trace_spans_dropped.clone();
            let (tracer, spans) = crate::trace::Tracer::new(settings, dropped.clone());
            let export =
                crate::trace::TraceExport::new(settings.clone(), spans, dropped, stop.clone());
            (Some(Arc::new(tracer)), Some(export))
        }
        None => (None, None),
    };
    // One client for aggregate parts and JWK set fetches (see `outbound`).
    let client = Client::pooled();
    let reloader = Arc::new(Reloader::new(
        options.conf.clone(),
        Arc::clone(&gateway),
        Arc::clone(&metrics),
        fixed_at_start,
    ));

    let mut proxy = HttpProxy::new(
        Proxy {
            gateway: Arc::clone(&gateway),
            settings: Arc::clone(&settings),
            cache,
            observer: Observer::new(Arc::clone(&metrics), log.clone(), settings.metrics),
            parts: client.clone(),
            buffered,
            unmatched: Arc::new(Route::unmatched()),
            mirrors: crate::mirror::Sender {
                client: client.clone(),
                metrics: crate::mirror::MirrorMetrics {
                    mirrors: metrics.mirror_requests.clone(),
                    upstream_requests: metrics.upstream_requests.clone(),
                    counted: settings.metrics,
                },
            },
            tracer: tracer.clone(),
        },
        conf,
    );
    proxy.handle_init_modules();
    // HTTP/1 idle connections are timed by HeadGuard; HTTP/2 ones here.
    let mut server_options = HttpServerOptions::default();
    server_options.h2_idle_timeout = Some(settings.keepalive_timeout);
    proxy.server_options = Some(server_options);
    // HTTP/2 heads are held to max_header_size by the proxy, with a problem
    // document; the HTTP/2 layer answers a bare 431 only past this.
    let mut h2 = pingora_core::protocols::http::v2::server::default_h2_options();
    h2.max_header_list_size(h2_header_list_limit(settings.max_header_size));
    proxy.h2_options = Some(h2);
    let guarded = HeadGuard::new(
        proxy,
        HeadLimits {
            header_timeout: settings.header_timeout,
            max_header_size: settings.max_header_size,
            max_headers: settings.max_headers,
            keepalive_timeout: settings.keepalive_timeout,
        },
        log,
        Arc::clone(&metrics),
        config.tracing.is_some(),
    );
    let mut tls = Vec::new();
    let mut addrs = Vec::new();
    for listener in &config.listeners {
        let addr = listener.addr.to_string();
        match &listener.tls {
            // Plain HTTP/1 reads land straight in Pingora's own head and
            // body buffers; an L4 read buffer would only add a copy, and
            // Pingora's default one is 64 KiB, zeroed, per connection.
            None => {
                addrs.push(ListenerConfig::tcp(addr).l4_buffer(L4BufferSettings::default().read(0)))
            }
            // TLS is accepted by the gate, within header_timeout.
            Some(settings) => {
                let client_ca = match &settings.client_ca {
                    Some((file, _)) => std::fs::read(file)
                        .map_err(|e| e.to_string())
                        .and_then(|pem| X509::stack_from_pem(&pem).map_err(|e| e.to_string())),
                    None => Ok(Vec::new()),
                };
                // Each handshake reads the live configuration's
                // certificates and ticket keys for this listener.
                let Some(initial) = gateway.load().certificates_for(listener.addr).cloned() else {
                    return Err(StartError::Tls {
                        addr: addr.clone(),
                        message: "no certificates were loaded".into(),
                    });
                };
                let (live, at) = (Arc::clone(&gateway), listener.addr);
                let table = Arc::new(crate::tls::LiveTable {
                    lookup: Box::new(move || live.load().certificates_for(at).cloned()),
                    initial,
                });
                let ticket_keys = settings.ticket_keys.then(|| {
                    let table = Arc::clone(&table);
                    let lookup: crate::tls::tickets::KeysLookup =
                        Box::new(move || table.current().ticket_keys.clone());
                    lookup
                });
                let acceptor = client_ca
                    .and_then(|ca| crate::tls::acceptor(settings, &ca, ticket_keys))
                    .map_err(|message| StartError::Tls {
                        addr: addr.clone(),
                        message,
                    })?;
                let handshake = crate::tls::Handshake {
                    table,
                    verifies_clients: settings.client_cert != crate::tls::ClientCertMode::Off,
                };
                let callbacks: Arc<dyn pingora_core::listeners::TlsAccept + Send + Sync> =
                    Arc::new(handshake);
                tls.push((listener.addr, acceptor, callbacks));
                addrs.push(ListenerConfig::tcp(addr));
            }
        }
    }
    let mut public = Service::new(
        "gatehouse proxy".to_string(),
        Gate::new(guarded, tls, settings.header_timeout),
    );
    for listener in addrs {
        public.add_listener(listener);
    }
    server.add_service(public);

    // The dashboard's minute of counter readings (`status`).
    let sampler = Arc::new(crate::status::Sampler::new(Arc::clone(&metrics)));
    if let Some(admin) = &config.admin {
        let mut service = Service::new(
            "gatehouse admin".to_string(),
            HttpServer::new_app(AdminApp::new(
                Arc::clone(&gateway),
                cache,
                Arc::clone(&metrics),
                Arc::clone(&reloader),
                admin.token.clone(),
                Arc::clone(&sampler),
            )),
        );
        service.add_tcp(&admin.listen.to_string());
        service.threads = Some(1);
        server.add_service(service);
    }

    server.add_service(background_service(
        "health checks, name lookups, key refreshes and the cluster's store",
        ConfigFollower::new(
            Arc::clone(&gateway),
            Arc::clone(&metrics),
            client,
            cache,
            settings.resolver,
            sampler,
            stop.clone(),
        ),
    ));
    if let Some(export) = trace_export {
        server.add_service(background_service("trace export", export));
    }
    server.add_service(background_service(
        "reload on SIGHUP",
        SighupService::new(reloader),
    ));
    let log = log_writer.map(|writer| {
        let closer = writer.closer();
        server.add_service(background_service("access log", writer));
        closer
    });
    Ok(Gatehouse { server, log, stop })
}
