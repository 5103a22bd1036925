//! The admin listener (`admin.listen`), never served on a public listener.
//! For now it answers `GET /healthz`; everything else is a problem+json 404.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

use crate::gateway::Gateway;

pub struct AdminApp {
    #[allow(dead_code)]
    gateway: Arc<Gateway>,
}

impl AdminApp {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        AdminApp { gateway }
    }
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}

fn problem(status: StatusCode, detail: &str) -> Response<Vec<u8>> {
    let id = uuid::Uuid::new_v4().hyphenated().to_string();
    let body = crate::respond::Response::problem(status, detail, &id)
        .body
        .to_vec();
    reply(status, "application/problem+json", body)
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (method, path) = (req.method.clone(), req.uri.path().to_string());
        match (method, path.as_str()) {
            (Method::GET | Method::HEAD, "/healthz") => reply(
                StatusCode::OK,
                "application/json",
                br#"{"status":"ok"}"#.to_vec(),
            ),
            (_, "/healthz") => problem(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
            _ => problem(StatusCode::NOT_FOUND, "no such admin endpoint"),
        }
    }
}
