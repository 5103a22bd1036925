//! Response compression (SPEC section 6.4), a route's `compression` or the
//! top-level default, done by Pingora's own module
//! (`pingora_core::modules::http::compression`), which gatehouse installs
//! switched off (level 0) so that a route without compression pays one
//! check. Joins `response_filter`: this module decides (type, size,
//! status, method, `no-transform`, an encoding the upstream already
//! applied) and negotiates the encoding by the q-values of the client's
//! `Accept-Encoding` (Pingora's own parser ignores them: it is handed
//! the one encoding chosen here), then switches the module on for this
//! response at the route's level. The module encodes the body as it
//! streams, drops `Content-Length` and weakens the `ETag`.
//!
//! `br` is encoded by a downstream module of our own (`BrotliModule`,
//! installed beside Pingora's, switched on per response the same way) with
//! the `brotli` crate Pingora uses: Pingora 0.9's own brotli encoder ends a
//! body with a flush, never the stream's last block
//! (cloudflare/pingora#1013), which strict decoders (Node's `fetch`, the
//! `brotli` tool) reject. Ours finishes the stream, in the last body chunk
//! or in `response_done_filter` (a body that ends with trailers, or a
//! revalidated cache entry, ends there); `zstd` and `gzip` stay with
//! Pingora's module.
//!
//! The cache stores what the upstream sent; compression happens after it,
//! per response, so a cached entry is never served in an encoding the
//! client did not accept.

use std::io::Write;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use pingora_core::modules::http::compression::ResponseCompression;
use pingora_core::modules::http::{HttpModule, HttpModuleBuilder, Module};
use pingora_core::{ErrorType, OrErr};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use crate::transform::headers::weaken_etag;

/// The encodings gatehouse produces, best first on equal q-values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Brotli,
    Zstd,
    Gzip,
}

impl Encoding {
    const ALL: [Encoding; 3] = [Encoding::Brotli, Encoding::Zstd, Encoding::Gzip];

    pub fn token(self) -> &'static str {
        match self {
            Encoding::Brotli => "br",
            Encoding::Zstd => "zstd",
            Encoding::Gzip => "gzip",
        }
    }
}

/// One entry of `types`: `application/json` or `text/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypePattern {
    Exact(String),
    /// `text/*`: the part before the `/`.
    AnySubtype(String),
}

impl TypePattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let lower = text.trim().to_ascii_lowercase();
        let Some((top, sub)) = lower.split_once('/') else {
            return Err(format!("\"{text}\" is not a media type (type/subtype)"));
        };
        let token = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "!#$&-^_.+".contains(c))
        };
        if !token(top) || (sub != "*" && !token(sub)) {
            return Err(format!("\"{text}\" is not a media type (type/subtype)"));
        }
        Ok(if sub == "*" {
            TypePattern::AnySubtype(top.to_string())
        } else {
            TypePattern::Exact(lower)
        })
    }

    /// `essence` is lowercase, without parameters.
    fn matches(&self, essence: &str) -> bool {
        match self {
            TypePattern::Exact(t) => t == essence,
            TypePattern::AnySubtype(top) => essence
                .split_once('/')
                .is_some_and(|(t, sub)| t == top && !sub.is_empty()),
        }
    }
}

/// A route's compiled `compression`.
#[derive(Debug)]
pub struct Compression {
    pub min_size: u64,
    pub types: Vec<TypePattern>,
    pub level: u32,
}

/// The encoding `accept_encoding` rates highest among ours: by q-value,
/// then `br`, `zstd`, `gzip`; `q=0` refuses one, `*` stands for those not
/// named. `None`: none acceptable (or no `Accept-Encoding`).
pub fn negotiate<'a>(accept_encoding: impl Iterator<Item = &'a HeaderValue>) -> Option<Encoding> {
    let (named, any) = weights(accept_encoding, Encoding::ALL.map(Encoding::token));
    let mut best: Option<(u16, Encoding)> = None;
    for (i, encoding) in Encoding::ALL.iter().enumerate() {
        let q = named[i].or(any).unwrap_or(0);
        if q > 0 && best.is_none_or(|(b, _)| q > b) {
            best = Some((q, *encoding));
        }
    }
    best.map(|(_, e)| e)
}

/// The weights (thousandths) an `Accept-Encoding` gives each of `codings`
/// by name (the last entry for it counts), and the one it gives `*`;
/// `None` where it names none. A weight that cannot be read accepts
/// nothing (0). Shared by compression and the cache, so that both read a
/// client's wishes alike.
pub fn weights<'a, const N: usize>(
    accept_encoding: impl Iterator<Item = &'a HeaderValue>,
    codings: [&str; N],
) -> ([Option<u16>; N], Option<u16>) {
    let mut named = [None; N];
    let mut any = None;
    for value in accept_encoding {
        let Ok(text) = value.to_str() else { continue };
        for entry in text.split(',') {
            let mut parts = entry.split(';');
            let coding = parts.next().unwrap_or("").trim();
            if coding.is_empty() {
                continue;
            }
            let mut q = 1000u16;
            for param in parts {
                let (name, value) = param.split_once('=').unwrap_or((param, ""));
                if name.trim().eq_ignore_ascii_case("q") {
                    q = parse_q(value.trim()).unwrap_or_default();
                }
            }
            if coding == "*" {
                any = Some(q);
            } else if let Some(i) = codings.iter().position(|c| c.eq_ignore_ascii_case(coding)) {
                named[i] = Some(q);
            }
        }
    }
    (named, any)
}

/// An RFC 9110 weight as thousandths: `0`, `0.5`, `1`, `1.000`.
fn parse_q(text: &str) -> Option<u16> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 3 || !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let thousandths: u16 = format!("{frac:0<3}").parse().ok()?;
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

impl Compression {
    /// Whether this response is one to compress (or, for `Vary`, one that
    /// would be for another client).
    fn compressible(&self, req: &RequestHeader, resp: &ResponseHeader) -> bool {
        if resp.status != StatusCode::OK || req.method == Method::HEAD {
            return false;
        }
        let headers = &resp.headers;
        if headers.contains_key(header::CONTENT_ENCODING)
            || headers.contains_key(header::CONTENT_RANGE)
        {
            return false;
        }
        let no_transform = headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
            })
        });
        if no_transform {
            return false;
        }
        let essence = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        let Some(essence) = essence else {
            return false;
        };
        if !self.types.iter().any(|t| t.matches(&essence)) {
            return false;
        }
        // Without a length (a streamed body) it is compressed: it may be
        // large, and it is streamed either way.
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        length.is_none_or(|n| n >= self.min_size)
    }

    /// Decides for the response about to go out and, when it is to be
    /// compressed, switches Pingora's module (or, for `br`, ours) on with
    /// the encoding chosen.
    pub fn respond(&self, session: &mut Session, resp: &mut ResponseHeader) -> Option<()> {
        if !self.compressible(session.req_header(), resp) {
            return None;
        }
        // The answer depends on Accept-Encoding, whoever asks.
        add_vary_accept_encoding(resp);
        let encoding = negotiate(
            session
                .req_header()
                .headers
                .get_all(header::ACCEPT_ENCODING)
                .iter(),
        )?;
        if encoding == Encoding::Brotli {
            let module = session.downstream_modules_ctx.get_mut::<BrotliModule>()?;
            // What Pingora's module does to the head of a body it encodes.
            resp.remove_header(&header::CONTENT_LENGTH);
            resp.remove_header(&header::ACCEPT_RANGES);
            let _ = resp.insert_header(header::TRANSFER_ENCODING, "chunked");
            let _ = resp.insert_header(header::CONTENT_ENCODING, encoding.token());
            weaken_etag(resp);
            module.0 = Some(BrotliBody::new(self.level));
            return Some(());
        }
        let module = session
            .downstream_modules_ctx
            .get_mut::<ResponseCompression>()?;
        if !module.is_header_phase() {
            return None;
        }
        module.adjust_level(self.level);
        module.adjust_decompression(false);
        let mut asked = RequestHeader::build(Method::GET, b"/", Some(1)).ok()?;
        asked
            .insert_header(header::ACCEPT_ENCODING, encoding.token())
            .ok()?;
        module.request_filter(&asked);
        Some(())
    }
}

/// The downstream module that encodes `br` bodies; off (`None`) unless
/// `Compression::respond` chose `br` for this response.
pub struct BrotliModule(Option<BrotliBody>);

#[async_trait::async_trait]
impl HttpModule for BrotliModule {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn response_body_filter(
        &mut self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> pingora_core::Result<()> {
        if let Some(encoder) = self.0.as_mut() {
            encoder
                .encode(body, end_of_stream)
                .or_err(ErrorType::InternalError, "while encoding br")?;
        }
        Ok(())
    }

    fn response_done_filter(&mut self) -> pingora_core::Result<Option<Bytes>> {
        let Some(encoder) = self.0.as_mut() else {
            return Ok(None);
        };
        let mut rest = None;
        encoder
            .encode(&mut rest, true)
            .or_err(ErrorType::InternalError, "while finishing br")?;
        Ok(rest)
    }
}

/// Installs [`BrotliModule`], off until a response asks for it.
pub struct BrotliModuleBuilder;

impl HttpModuleBuilder for BrotliModuleBuilder {
    fn init(&self) -> Module {
        Box::new(BrotliModule(None))
    }
}

/// A response body being encoded as `br`; `None` once its stream is
/// finished.
pub struct BrotliBody(Option<brotli::CompressorWriter<Vec<u8>>>);

impl BrotliBody {
    /// Window and buffer as Pingora's own brotli encoder has them; the
    /// level is the route's (1 to 9 of brotli's 0 to 11).
    fn new(level: u32) -> Self {
        const BUFFER: usize = 4096;
        const WINDOW_BITS: u32 = 19;
        BrotliBody(Some(brotli::CompressorWriter::new(
            Vec::new(),
            BUFFER,
            level,
            WINDOW_BITS,
        )))
    }

    /// Replaces `body` by what the encoder has ready (nothing, often, until
    /// its buffer fills); at the end of the stream by the rest and the
    /// stream's last block.
    pub fn encode(&mut self, body: &mut Option<Bytes>, end: bool) -> std::io::Result<()> {
        let Some(writer) = self.0.as_mut() else {
            return Ok(());
        };
        if let Some(chunk) = body.as_deref() {
            writer.write_all(chunk)?;
        }
        let ready = if end {
            // Finishing is what `into_inner` does (and what Pingora's
            // encoder never reaches).
            self.0.take().map(|w| w.into_inner()).unwrap_or_default()
        } else {
            std::mem::take(writer.get_mut())
        };
        *body = (!ready.is_empty()).then(|| Bytes::from(ready));
        Ok(())
    }
}

fn add_vary_accept_encoding(resp: &mut ResponseHeader) {
    let present = resp.headers.get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|n| {
                let n = n.trim();
                n == "*" || n.eq_ignore_ascii_case("accept-encoding")
            })
        })
    });
    if !present {
        let _ = resp.append_header(header::VARY, "Accept-Encoding");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_br_body_is_a_finished_stream_in_any_chunking() {
        let original: Vec<u8> = (0..20_000u32)
            .flat_map(|i| format!("{{\"n\":{i}}}").into_bytes())
            .collect();
        for chunk in [1usize, 700, 5000, original.len()] {
            let mut encoder = BrotliBody::new(6);
            let mut encoded = Vec::new();
            let pieces: Vec<&[u8]> = original.chunks(chunk).collect();
            for piece in &pieces {
                let mut body = Some(Bytes::copy_from_slice(piece));
                encoder.encode(&mut body, false).unwrap();
                encoded.extend(body.unwrap_or_default());
            }
            // Pingora ends a body with an empty call.
            let mut last = None;
            encoder.encode(&mut last, true).unwrap();
            encoded.extend(last.expect("the stream's last block"));
            let mut decoded = Vec::new();
            brotli::Decompressor::new(&encoded[..], 4096)
                .read_to_end(&mut decoded)
                .unwrap();
            assert_eq!(decoded, original, "chunks of {chunk}");
            assert!(encoded.len() < original.len() / 4);
            let mut after = Some(Bytes::from_static(b"x"));
            encoder.encode(&mut after, true).unwrap();
            assert_eq!(after.as_deref(), Some(&b"x"[..]), "finished: untouched");
        }
        // An empty body is still a whole (empty) stream.
        let mut encoder = BrotliBody::new(6);
        let mut body = None;
        encoder.encode(&mut body, true).unwrap();
        let mut decoded = Vec::new();
        brotli::Decompressor::new(&body.unwrap()[..], 4096)
            .read_to_end(&mut decoded)
            .unwrap();
        assert!(decoded.is_empty());
    }

    fn pick(value: &str) -> Option<&'static str> {
        let v = HeaderValue::from_str(value).unwrap();
        negotiate(std::iter::once(&v)).map(Encoding::token)
    }

    #[test]
    fn the_highest_q_value_wins_then_br_zstd_gzip() {
        assert_eq!(pick("gzip"), Some("gzip"));
        assert_eq!(pick("gzip, br"), Some("br"));
        assert_eq!(pick("br;q=0.9, zstd"), Some("zstd"));
        assert_eq!(pick("gzip, zstd, br"), Some("br"));
        assert_eq!(pick("gzip, zstd"), Some("zstd"));
        assert_eq!(pick("zstd;q=0.5, gzip"), Some("gzip"));
        assert_eq!(pick("gzip;q=0.5, zstd;q=0.5"), Some("zstd"));
        assert_eq!(pick("zstd;q=0, gzip;q=0.1"), Some("gzip"));
        assert_eq!(pick("*"), Some("br"));
        assert_eq!(pick("*;q=0.2, br;q=0, zstd;q=0"), Some("gzip"));
        assert_eq!(pick("identity"), None);
        assert_eq!(pick("gzip;q=0"), None);
        assert_eq!(pick("deflate, compress"), None);
        assert_eq!(pick("GZIP;Q=1.0"), Some("gzip"));
        assert_eq!(
            pick("gzip;q=2"),
            None,
            "an unreadable weight accepts nothing"
        );
        assert_eq!(pick(""), None);
    }

    #[test]
    fn types_match_their_essence() {
        let json = TypePattern::parse("application/json").unwrap();
        let text = TypePattern::parse("text/*").unwrap();
        assert!(json.matches("application/json"));
        assert!(!json.matches("application/jsonx"));
        assert!(text.matches("text/html"));
        assert!(!text.matches("textual/html"));
        assert!(TypePattern::parse("json").is_err());
        assert!(TypePattern::parse("*/*").is_err());
    }
}
