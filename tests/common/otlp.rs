//! A real OTLP/HTTP receiver for the tracing tests: `POST`s of protobuf
//! `ExportTraceServiceRequest`s on 127.0.0.1:0, decoded with the
//! `opentelemetry-proto` crate; optionally slow to answer.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::service::service_fn;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// One span as received.
#[derive(Debug, Clone)]
pub struct Got {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent: String,
    pub name: String,
    /// 2 server, 3 client.
    pub kind: i32,
    pub attrs: BTreeMap<String, String>,
    /// 2 error.
    pub status: i32,
}

#[derive(Default)]
struct State {
    spans: Mutex<Vec<Got>>,
    posts: AtomicUsize,
    delay_ms: AtomicU64,
}

pub struct Collector {
    pub addr: SocketAddr,
    /// `https` when started with [`Collector::start_tls`].
    scheme: &'static str,
    state: Arc<State>,
    _runtime: tokio::runtime::Runtime,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

impl Collector {
    pub fn start() -> Self {
        Self::serve(None)
    }

    /// A receiver that speaks HTTPS with `cert_pem`/`key_pem` (a certificate
    /// for 127.0.0.1).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Self::serve(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }

    fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let runtime = super::server_runtime();
        let st = Arc::clone(&state);
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = Arc::clone(&st);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let st = Arc::clone(&st);
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            st.posts.fetch_add(1, Ordering::SeqCst);
                            let delay = st.delay_ms.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            if let Ok(export) = ExportTraceServiceRequest::decode(body) {
                                let mut spans = st.spans.lock().unwrap();
                                for rs in export.resource_spans {
                                    let service = rs
                                        .resource
                                        .iter()
                                        .flat_map(|r| &r.attributes)
                                        .find(|kv| kv.key == "service.name")
                                        .map(|kv| text(&kv.value))
                                        .unwrap_or_default();
                                    for ss in rs.scope_spans {
                                        for s in ss.spans {
                                            spans.push(Got {
                                                service: service.clone(),
                                                trace_id: hex(&s.trace_id),
                                                span_id: hex(&s.span_id),
                                                parent: hex(&s.parent_span_id),
                                                name: s.name,
                                                kind: s.kind,
                                                attrs: s
                                                    .attributes
                                                    .iter()
                                                    .map(|kv| (kv.key.clone(), text(&kv.value)))
                                                    .collect(),
                                                status: s.status.map_or(0, |st| st.code),
                                            });
                                        }
                                    }
                                }
                            }
                            Ok::<_, hyper::Error>(
                                hyper::Response::builder()
                                    .status(200)
                                    .header("content-type", "application/x-protobuf")
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = http.serve_connection(io, service).await;
                        }
                        Some(tls) => {
                            let Ok(stream) = tls.accept(stream).await else {
                                return;
                            };
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = http.serve_connection(io, service).await;
                        }
                    }
                });
            }
        });
        Collector {
            addr,
            scheme,
            state,
            _runtime: runtime,
        }
    }

    pub fn url(&self) -> String {
        format!("{}://{}/v1/traces", self.scheme, self.addr)
    }

    pub fn spans(&self) -> Vec<Got> {
        self.state.spans.lock().unwrap().clone()
    }

    pub fn posts(&self) -> usize {
        self.state.posts.load(Ordering::SeqCst)
    }

    /// Answers each post only after `delay`.
    pub fn slow(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}
