//! The gateway's own requests (health checks, aggregate parts, JWK sets):
//! the client they share, and reading a response through it with a size cap.

use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;

/// A connector for requests the gateway makes for itself, made on first
/// use and shared: one for aggregate parts and JWK set fetches, one for all
/// health checks. Each Pingora connector loads the system's CA certificates
/// (measured at 1.8 MiB resident), so one per upstream, provider or
/// aggregate would cost that much each; a configuration only checked
/// (`-t`, `route`) never makes one.
#[derive(Clone, Default)]
pub struct SharedConnector(Arc<OnceLock<Connector>>);

impl SharedConnector {
    pub fn connector(&self) -> &Connector {
        self.0.get_or_init(|| Connector::new(None))
    }
}

/// The whole body, or an error once it passes `cap` bytes.
pub async fn read_body(
    session: &mut HttpSession,
    cap: usize,
    what: &str,
) -> Result<BytesMut, String> {
    let mut body = BytesMut::new();
    while let Some(chunk) = session
        .read_response_body()
        .await
        .map_err(|e| e.to_string())?
    {
        if body.len() + chunk.len() > cap {
            return Err(format!("{what} is larger than {cap} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
