//! Rewriting what passes through: header rules on requests
//! (`upstream_request_filter`) and responses (`upstream_response_filter`).

pub mod body;
pub mod headers;
