//! The gateway's own HTTP requests: JWK set fetches, aggregate parts,
//! health probes and mirrored copies, over one client built on Pingora's connector, with one
//! error type. Callers choose the peer (and so the target, its timeouts and
//! TLS) and read the answer; the client makes the exchange.

use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::{RequestHeader, ResponseHeader};

/// Why an exchange gave no answer. The text is for logs, never a client.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("the request or its answer failed: {0}")]
    Exchange(String),
    #[error("the answer's body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the memory for held bodies is spent")]
    OverBudget,
}

/// What to do with an answer's body.
pub enum Body<'h> {
    /// Read and drop it (a health check reads the whole answer).
    Discard,
    /// Keep it, at most `cap` bytes, asking `hold` before it grows to each
    /// new total (a budget's reservation); it refuses: `OverBudget`.
    Keep {
        cap: usize,
        hold: &'h mut (dyn FnMut(usize) -> bool + Send),
    },
}

/// An answer: its head and (kept) body.
pub struct Answer {
    pub head: Box<ResponseHeader>,
    pub body: BytesMut,
}

impl Answer {
    pub fn status(&self) -> u16 {
        self.head.status.as_u16()
    }
}

/// A client for the gateway's own requests. Each Pingora connector loads
/// the system's CA certificates (measured at 1.8 MiB resident), so one is
/// made on first use and shared: one for aggregate parts and JWK set
/// fetches, one for all health checks. A configuration only checked (`-t`,
/// `route`) never makes one.
#[derive(Clone)]
pub struct Client {
    connector: Arc<OnceLock<Connector>>,
    /// Whether finished connections go back to the pool. Health checks keep
    /// none: each connects anew, testing the connect too, where a pooled
    /// connection would hide a target that no longer accepts any.
    reuse: bool,
}

impl Client {
    /// A client whose connections are pooled and reused.
    pub fn pooled() -> Self {
        Client {
            connector: Arc::default(),
            reuse: true,
        }
    }

    /// A client that connects anew for every request.
    pub fn fresh_connections() -> Self {
        Client {
            connector: Arc::default(),
            reuse: false,
        }
    }

    fn connector(&self) -> &Connector {
        self.connector.get_or_init(|| Connector::new(None))
    }

    /// A connection to `peer` (and its TLS handshake), given back at once:
    /// a TCP health check.
    pub async fn connect(&self, peer: &HttpPeer) -> Result<(), OutboundError> {
        self.connector()
            .get_http_session(peer)
            .await
            .map(drop)
            .map_err(|e| OutboundError::Connect(e.to_string()))
    }

    /// Sends `request` (no body) to `peer` and reads the answer. A pooled
    /// connection the peer closed meanwhile is retried once on a new one;
    /// the connection is pooled again once the answer is read whole.
    pub async fn send(
        &self,
        peer: &HttpPeer,
        request: &RequestHeader,
        body: Body<'_>,
    ) -> Result<Answer, OutboundError> {
        self.send_with_body(peer, request, None, body).await
    }

    /// As `send`, with a request body (its framing is the head's).
    pub async fn send_with_body(
        &self,
        peer: &HttpPeer,
        request: &RequestHeader,
        request_body: Option<bytes::Bytes>,
        mut body: Body<'_>,
    ) -> Result<Answer, OutboundError> {
        let mut stale_retry = true;
        loop {
            let (mut session, reused) = self
                .connector()
                .get_http_session(peer)
                .await
                .map_err(|e| OutboundError::Connect(e.to_string()))?;
            session.set_read_timeout(peer.options.read_timeout);
            session.set_write_timeout(peer.options.write_timeout);
            let sent = async {
                session
                    .write_request_header(Box::new(request.clone()))
                    .await?;
                if let Some(data) = request_body.clone().filter(|d| !d.is_empty()) {
                    session.write_request_body(data, true).await?;
                }
                session.finish_request_body().await?;
                session.read_response_header().await
            };
            if let Err(e) = sent.await {
                if reused && stale_retry {
                    stale_retry = false;
                    continue;
                }
                return Err(OutboundError::Exchange(e.to_string()));
            }
            let Some(head) = session.response_header().map(|h| Box::new(h.clone())) else {
                return Err(OutboundError::Exchange("no answer".into()));
            };
            let body = read_body(&mut session, &mut body).await?;
            if self.reuse {
                self.connector()
                    .release_http_session(session, peer, peer.options.idle_timeout)
                    .await;
            }
            return Ok(Answer { head, body });
        }
    }
}

async fn read_body(
    session: &mut HttpSession,
    body: &mut Body<'_>,
) -> Result<BytesMut, OutboundError> {
    let declared = session
        .response_header()
        .and_then(|r| crate::transform::body::declared_length(&r.headers));
    let mut out = match body {
        // A declared length is held (and allocated) at once.
        Body::Keep { cap, hold } => {
            let declared = declared.filter(|n| *n <= *cap as u64).unwrap_or(0) as usize;
            if !hold(declared) {
                return Err(OutboundError::OverBudget);
            }
            BytesMut::with_capacity(declared)
        }
        Body::Discard => BytesMut::new(),
    };
    while let Some(chunk) = session
        .read_response_body()
        .await
        .map_err(|e| OutboundError::Exchange(e.to_string()))?
    {
        let Body::Keep { cap, hold } = body else {
            continue;
        };
        let total = out.len() + chunk.len();
        if total > *cap {
            return Err(OutboundError::TooLarge(*cap));
        }
        if !hold(total) {
            return Err(OutboundError::OverBudget);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
