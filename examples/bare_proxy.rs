//! The floor Pingora sets: a proxy that does nothing but forward to one
//! prebuilt upstream peer, built with gatehouse's allocator, release profile,
//! server options and listener buffer setting (`bench/run.sh` turns its
//! transparent huge pages off, as gatehouse does for itself). The bench runs
//! it beside gatehouse so the cost of the gateway's own work (routing, header
//! rules, request ids, forwarding headers, metrics, logs) is separated from
//! the cost of Pingora itself.
//!
//! Run: `cargo run --release --example bare_proxy -- LISTEN_ADDR UPSTREAM_ADDR`

use async_trait::async_trait;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    // Gatehouse drops Pingora's compression module too; keep the floor comparable.
    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora_error::Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: bare_proxy LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
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
    let peer = HttpPeer::new(upstream.as_str(), false, String::new());
    let mut service = pingora_proxy::http_proxy_service(&server.configuration, Bare { peer });
    // As gatehouse's plain listeners: reads land straight in Pingora's buffers.
    service.add_listener(
        ListenerConfig::tcp(listen.as_str()).l4_buffer(L4BufferSettings::default().read(0)),
    );
    server.add_service(service);
    server.run_forever();
}
