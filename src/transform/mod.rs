//! Rewriting what passes through: header rules on requests
//! (`upstream_request_filter`) and responses (`response_filter`), and body
//! rules (`body`, with the JSON field rules in `json` and content decoding
//! in `decode`) on the body phases.

pub mod body;
pub mod decode;
pub mod headers;
pub mod json;
