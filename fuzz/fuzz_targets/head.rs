//! The HTTP/1 head check: never panics, finds the head's end where
//! httparse (Pingora's parser) does, and passes only heads whose authority
//! Pingora's own rules pass (so no head it lets through gets Pingora's bare
//! 400 instead).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pingora_http::RequestHeader;

/// The head as Pingora would hold it, when the parts make one.
fn pingora_request(head: &[u8]) -> Option<RequestHeader> {
    let mut fields = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut fields);
    req.parse(head).ok()?;
    let mut out = RequestHeader::build(req.method?, req.path?.as_bytes(), None).ok()?;
    if req.version == Some(0) {
        out.set_version(http::Version::HTTP_10);
    }
    for h in req.headers.iter() {
        out.append_header(h.name.to_string(), h.value).ok()?;
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let Some(end) = gatehouse::fuzzing::head_end(data) else {
        return;
    };
    assert!(end <= data.len());
    // Where the head ends is where Pingora's parser (httparse) ends it:
    // what follows is the body, or the next request, for both.
    let mut fields = [httparse::EMPTY_HEADER; 256];
    if let Ok(httparse::Status::Complete(n)) = httparse::Request::new(&mut fields).parse(data) {
        assert_eq!(n, end, "{:?}", String::from_utf8_lossy(data));
    }
    let head = &data[..end];
    if gatehouse::fuzzing::check_head(head, 100).is_ok() {
        if let Some(req) = pingora_request(head) {
            assert!(
                pingora_core::protocols::http::authority::validate_request_authority(&req).is_ok(),
                "passed a head Pingora refuses: {:?}",
                String::from_utf8_lossy(head)
            );
        }
    }
});
