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

/// Why a response body was not read whole.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0} is larger than {1} bytes")]
    TooLarge(String, usize),
    #[error("the memory for bodies is spent")]
    OverBudget,
    #[error("{0}")]
    Failed(String),
}

/// The whole body, or an error once it passes `cap` bytes.
pub async fn read_body(
    session: &mut HttpSession,
    cap: usize,
    what: &str,
) -> Result<BytesMut, String> {
    read_body_within(session, cap, what, &mut |_| true)
        .await
        .map_err(|e| e.to_string())
}

/// As [`read_body`], asking `hold` before the body grows to each new total
/// (a budget's reservation), and giving up when it refuses.
pub async fn read_body_within(
    session: &mut HttpSession,
    cap: usize,
    what: &str,
    hold: &mut (dyn FnMut(usize) -> bool + Send),
) -> Result<BytesMut, ReadError> {
    let declared = session
        .response_header()
        .and_then(|r| crate::transform::body::declared_length(&r.headers))
        .filter(|n| *n <= cap as u64)
        .unwrap_or(0);
    let mut body = BytesMut::with_capacity(declared as usize);
    while let Some(chunk) = session
        .read_response_body()
        .await
        .map_err(|e| ReadError::Failed(e.to_string()))?
    {
        let total = body.len() + chunk.len();
        if total > cap {
            return Err(ReadError::TooLarge(what.to_string(), cap));
        }
        if !hold(total) {
            return Err(ReadError::OverBudget);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
