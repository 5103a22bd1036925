//! Responses the gateway writes itself: RFC 9457 problems, route fallbacks,
//! the `Phase` result that every module returns from a request phase, and
//! the answer to an error that ended a request (`fail_to_proxy`).

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::StatusCode;
use pingora_core::{Error, ErrorSource, ErrorType};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use serde::Serialize;

/// What a module decided in a request phase.
#[must_use]
pub enum Phase {
    /// Go on to the next module, and then upstream.
    Continue,
    /// Answer the client now with this response.
    Respond(Response),
}

/// A complete response written by the gateway.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    request_id: &'a str,
}

impl Response {
    /// An `application/problem+json` answer. `detail` is shown to the
    /// client: it must never hold an address, a secret or a token.
    pub fn problem(status: StatusCode, detail: &str, request_id: &str) -> Self {
        let title = status.canonical_reason().unwrap_or("Error");
        let body = serde_json::to_vec(&Problem {
            kind: "about:blank",
            title,
            status: status.as_u16(),
            detail,
            request_id,
        })
        .unwrap_or_default();
        Response {
            status,
            headers: vec![(
                CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            )],
            body: Bytes::from(body),
        }
    }

    /// An answer without a body (a CORS preflight's `204`).
    pub fn empty(status: StatusCode) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The response header, with `Content-Length` so the connection can be
    /// kept alive.
    pub fn header(&self, request_id: &str) -> pingora_core::Result<ResponseHeader> {
        let mut resp = ResponseHeader::build(self.status, Some(self.headers.len() + 3))?;
        for (name, value) in &self.headers {
            resp.append_header(name, value.clone())?;
        }
        // A 204 carries no Content-Length (RFC 9110, 8.6).
        if self.status != StatusCode::NO_CONTENT {
            resp.insert_header(CONTENT_LENGTH, self.body.len())?;
        }
        resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        if let Ok(id) = HeaderValue::from_str(request_id) {
            resp.insert_header(crate::forwarding::sent::X_REQUEST_ID, id)?;
        }
        Ok(resp)
    }

    /// Writes the response; `extra` may add headers (deprecation, rate
    /// limits) before it goes out.
    pub async fn write(
        self,
        session: &mut Session,
        request_id: &str,
        extra: impl FnOnce(&mut ResponseHeader),
    ) -> pingora_core::Result<()> {
        let mut header = self.header(request_id)?;
        extra(&mut header);
        let is_head = session.req_header().method == http::Method::HEAD;
        let empty = is_head || self.body.is_empty();
        session
            .write_response_header(Box::new(header), empty)
            .await?;
        if !empty {
            session.write_response_body(Some(self.body), true).await?;
        }
        Ok(())
    }
}

/// A route's `fallback`: served when no target can answer.
#[derive(Debug, Clone)]
pub struct StaticResponse {
    pub status: StatusCode,
    pub content_type: HeaderValue,
    pub body: Bytes,
}

impl StaticResponse {
    pub fn to_response(&self) -> Response {
        Response {
            status: self.status,
            headers: vec![(CONTENT_TYPE, self.content_type.clone())],
            body: self.body.clone(),
        }
    }
}

/// The status for an error that ended a request, and whether it is the
/// upstream's fault (a route fallback may then answer instead). `0`: the
/// client is gone, nothing to answer.
pub fn classify(e: &Error) -> (u16, bool) {
    match e.etype() {
        ErrorType::HTTPStatus(code) => (*code, matches!(code, 502..=504)),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if e.esource() == &ErrorSource::Upstream =>
        {
            (504, true)
        }
        _ => match e.esource() {
            ErrorSource::Upstream => (502, true),
            ErrorSource::Downstream => match e.etype() {
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => {
                    (0, false)
                }
                ErrorType::ReadTimedout => (408, false),
                _ => (400, false),
            },
            ErrorSource::Internal | ErrorSource::Unset => (500, false),
        },
    }
}

fn detail_for(status: u16) -> &'static str {
    match status {
        400 => "the request is malformed",
        408 => "the request was not received in time",
        413 => "the request body is too large",
        502 => "the upstream could not be reached",
        503 => "no healthy upstream target is available",
        504 => "the upstream did not answer in time",
        _ => "the request could not be processed",
    }
}

/// The answer to an error that ended a request with `status`: a body
/// rule's own refusal (never a fallback: the upstream did not fail), the
/// route's `fallback` when the upstream is at fault, else a problem.
pub fn failure(
    status: u16,
    upstream_fault: bool,
    refusal: Option<(StatusCode, &str)>,
    fallback: Option<&StaticResponse>,
    request_id: &str,
) -> Response {
    match (refusal, fallback) {
        (Some((status, detail)), _) => Response::problem(status, detail, request_id),
        (None, Some(fallback)) if upstream_fault => fallback.to_response(),
        (None, _) => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            Response::problem(code, detail_for(status), request_id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_body_is_rfc9457() {
        let r = Response::problem(StatusCode::NOT_FOUND, "no route for GET /x", "abc");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["type"], "about:blank");
        assert_eq!(v["title"], "Not Found");
        assert_eq!(v["status"], 404);
        assert_eq!(v["detail"], "no route for GET /x");
        assert_eq!(v["request_id"], "abc");
        let h = r.header("abc").unwrap();
        assert_eq!(h.headers["content-type"], "application/problem+json");
        assert_eq!(
            h.headers["content-length"],
            r.body.len().to_string().as_str()
        );
        assert_eq!(h.headers["x-request-id"], "abc");
    }
}
