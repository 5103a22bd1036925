//! Reading a response the gateway fetched for itself (aggregate parts, JWK
//! sets) through Pingora's client, with a size cap.

use bytes::BytesMut;
use pingora_core::protocols::http::client::HttpSession;

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
