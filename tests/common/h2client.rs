//! A raw HTTP/2 client over TLS, for requests an ordinary client never
//! sends: any `:authority`, a `host` field beside it, huge header blocks.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// What came back: a response, or the stream was reset (`Err` with the reason).
#[derive(Debug)]
pub struct H2Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl H2Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends `req` (its URI's authority becomes `:authority`) on a new HTTP/2
/// connection to `addr`, trusting the certificate in `cert` for `gw.test`.
pub fn send(addr: SocketAddr, cert: &Path, req: http::Request<()>) -> Result<H2Response, String> {
    send_with_body(addr, cert, req, None)
}

/// As [`send`], with a body in DATA frames (and no `content-length`
/// unless `req` carries one).
pub fn send_with_body(
    addr: SocketAddr,
    cert: &Path,
    req: http::Request<()>,
    body: Option<Vec<u8>>,
) -> Result<H2Response, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = client_config(cert, b"h2");
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("gw.test").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut client, conn) = h2::client::Builder::new()
            .max_header_list_size(16 << 20)
            .handshake::<_, bytes::Bytes>(tls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let (response, mut stream) = client
            .send_request(req, body.is_none())
            .map_err(|e| e.to_string())?;
        if let Some(body) = body {
            stream
                .send_data(bytes::Bytes::from(body), true)
                .map_err(|e| e.to_string())?;
        }
        let response = tokio::time::timeout(std::time::Duration::from_secs(10), response)
            .await
            .map_err(|_| "no response in 10 s".to_string())?
            .map_err(|e| e.to_string())?;
        let (parts, mut body) = response.into_parts();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        Ok(H2Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: bytes,
        })
    })
}

/// A GET with this `:authority` and extra header fields.
pub fn get(
    addr: SocketAddr,
    cert: &Path,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<H2Response, String> {
    let mut req = http::Request::builder()
        .method("GET")
        .uri(format!("https://{authority}{path}"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    send(addr, cert, req.body(()).unwrap())
}

/// Completes a TLS handshake offering `alpn`, then sends nothing: how long
/// the server keeps the connection open (`None`: still open after 20 s).
pub fn silent_after_handshake(
    addr: SocketAddr,
    cert: &Path,
    alpn: &[u8],
) -> Option<std::time::Duration> {
    use tokio::io::AsyncReadExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = client_config(cert, alpn);
    rt.block_on(async move {
        let started = std::time::Instant::now();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("gw.test").unwrap(), tcp)
            .await
            .expect("the handshake");
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            // The server's session tickets or settings may come first.
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        read.ok().map(|_| started.elapsed())
    })
}

/// A TLS client trusting only `cert`, offering `alpn`.
fn client_config(cert: &Path, alpn: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(cert).expect("read the test certificate"))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}
