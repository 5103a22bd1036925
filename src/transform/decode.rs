//! Content codings a body rule reads through: `gzip`, `deflate`, `br` and
//! `zstd`, undone before the rule sees the body, with the decoded size
//! bounded (a small compressed body may unfold into a huge one).

use std::io::Read;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// HTTP's `deflate` is zlib; a raw deflate stream is accepted too, as
    /// browsers do.
    Deflate,
    Brotli,
    Zstd,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the content coding \"{0}\" is not supported")]
    Unsupported(String),
    #[error("the body does not decode as {0:?}")]
    Corrupt(Coding),
    #[error("the decoded body is larger than {0} bytes")]
    TooLarge(usize),
}

/// The codings of a `Content-Encoding` value, in the order they were
/// applied; `identity` is none.
pub fn parse(value: &[u8]) -> Result<Vec<Coding>, DecodeError> {
    let text = std::str::from_utf8(value).map_err(|_| DecodeError::Unsupported("?".into()))?;
    let mut out = Vec::new();
    for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let coding = match token.to_ascii_lowercase().as_str() {
            "identity" => continue,
            "gzip" | "x-gzip" => Coding::Gzip,
            "deflate" => Coding::Deflate,
            "br" => Coding::Brotli,
            "zstd" => Coding::Zstd,
            _ => return Err(DecodeError::Unsupported(token.chars().take(32).collect())),
        };
        out.push(coding);
    }
    Ok(out)
}

/// `body` with `codings` undone (last applied, first undone), at most
/// `limit` bytes.
pub fn decode(codings: &[Coding], body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut data = body.to_vec();
    for coding in codings.iter().rev() {
        data = decode_one(*coding, &data, limit)?;
    }
    Ok(data)
}

fn decode_one(coding: Coding, body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let read = |reader: &mut dyn Read| -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        reader
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|_| DecodeError::Corrupt(coding))?;
        if out.len() > limit {
            return Err(DecodeError::TooLarge(limit));
        }
        Ok(out)
    };
    match coding {
        Coding::Gzip => read(&mut flate2::read::MultiGzDecoder::new(body)),
        Coding::Deflate => match read(&mut flate2::read::ZlibDecoder::new(body)) {
            // Not zlib: perhaps raw deflate. (Too large is too large.)
            Err(DecodeError::Corrupt(_)) => read(&mut flate2::read::DeflateDecoder::new(body)),
            other => other,
        },
        Coding::Brotli => read(&mut brotli::Decompressor::new(body, 4096)),
        Coding::Zstd => {
            let mut d =
                zstd::stream::read::Decoder::new(body).map_err(|_| DecodeError::Corrupt(coding))?;
            read(&mut d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn codings_are_parsed_in_order() {
        assert_eq!(parse(b"identity"), Ok(vec![]));
        assert_eq!(parse(b"gzip, br"), Ok(vec![Coding::Gzip, Coding::Brotli]));
        assert_eq!(parse(b"X-GZIP"), Ok(vec![Coding::Gzip]));
        assert!(matches!(
            parse(b"compress"),
            Err(DecodeError::Unsupported(_))
        ));
    }

    #[test]
    fn bodies_decode_within_the_limit() {
        let doc = br#"{"a":1}"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(doc).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decode(&[Coding::Gzip], &gz, 100).unwrap(), doc);
        let raw = {
            let mut d = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            d.write_all(doc).unwrap();
            d.finish().unwrap()
        };
        assert_eq!(decode(&[Coding::Deflate], &raw, 100).unwrap(), doc);
        let z = zstd::encode_all(&doc[..], 1).unwrap();
        assert_eq!(decode(&[Coding::Zstd], &z, 100).unwrap(), doc);
        assert_eq!(
            decode(&[Coding::Gzip], b"not gzip", 100),
            Err(DecodeError::Corrupt(Coding::Gzip))
        );
        // A bomb: 10 MB of zeros in a few KB.
        let bomb = zstd::encode_all(&vec![0u8; 10 << 20][..], 3).unwrap();
        assert!(bomb.len() < 64 << 10);
        assert_eq!(
            decode(&[Coding::Zstd], &bomb, 1 << 20),
            Err(DecodeError::TooLarge(1 << 20))
        );
    }
}
