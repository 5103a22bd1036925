//! Demo upstreams for the example configuration: `users` on 127.0.0.1:9001
//! and 127.0.0.1:9002, `orders` on 127.0.0.1:9003. Each answers JSON naming
//! itself, the path it received and the headers the gateway added, and
//! `GET /health` with 200.
//!
//! Run: `cargo run --example demo_upstreams`

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};

async fn answer(
    name: &'static str,
    addr: SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let body = if path == "/health" {
        serde_json::json!({ "status": "ok" })
    } else {
        let seen = |h: &str| {
            req.headers()
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        serde_json::json!({
            "service": name,
            "instance": addr.to_string(),
            "method": req.method().as_str(),
            "path": path,
            "request_id": seen("x-request-id"),
            "forwarded_for": seen("x-forwarded-for"),
            "gateway": seen("x-gateway"),
        })
    };
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        "x-powered-by",
        hyper::header::HeaderValue::from_static("demo"),
    );
    Ok(resp)
}

async fn serve(name: &'static str, addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("demo upstream {name} listening on {addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(name, addr, req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let servers = [
        ("users", "127.0.0.1:9001"),
        ("users", "127.0.0.1:9002"),
        ("orders", "127.0.0.1:9003"),
    ];
    let mut tasks = Vec::new();
    for (name, addr) in servers {
        let addr: SocketAddr = addr.parse().expect("static address");
        tasks.push(tokio::spawn(serve(name, addr)));
    }
    for t in tasks {
        t.await.expect("server task")?;
    }
    Ok(())
}
