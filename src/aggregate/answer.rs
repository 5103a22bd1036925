//! Answering an aggregate route: from the cache when it can (concurrent
//! misses for one key wait for the first to fill it), else from its parts,
//! with the route's body rules applied, and a complete answer cached.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use pingora_cache::CacheMeta;
use pingora_http::ResponseHeader;

use super::{failure, Aggregate, Answer, Input};
use crate::budget::{Budget, Held};
use crate::cache::Slot;
use crate::outbound::Client;
use crate::respond::Response;
use crate::transform::json::JsonRules;

/// What an aggregate request asks for.
pub struct Asked<'a> {
    pub input: Input<'a>,
    pub cache: Option<Slot<'a>>,
    /// Whether a complete answer may be kept for others: never a
    /// credentialed one on a route the gateway does not authenticate.
    pub shareable: bool,
    /// The route's `response_body` field rules.
    pub rules: Option<&'a JsonRules>,
    pub request_id: &'a str,
}

/// The answer, its `X-Cache`, and its share of `max_buffered` (kept until
/// it is sent).
pub struct Answered {
    pub response: Response,
    pub x_cache: Option<&'static str>,
    pub held: Option<Held>,
}

impl Aggregate {
    pub async fn answer(
        &self,
        asked: Asked<'_>,
        client: &Client,
        budget: &Arc<Budget>,
    ) -> Answered {
        // Held until the answer is stored: concurrent misses wait for it.
        let mut _filling = None;
        if let Some(slot) = &asked.cache {
            let mut hit = slot.cache.storage.get_fresh(&slot.key);
            if hit.is_none() {
                _filling = slot.cache.fill(slot.key).await;
                // Filled while we waited?
                hit = slot.cache.storage.get_fresh(&slot.key);
            }
            if let Some(body) = hit {
                let answer = Answer {
                    body,
                    missing: vec![],
                    cacheable_for: None,
                };
                return Answered {
                    response: answer.response(),
                    x_cache: Some("HIT"),
                    held: None,
                };
            }
        }
        let mut held = None;
        let outcome = self.run(client, &asked.input, budget, &mut held).await;
        // The gateway's own errors are not cache misses: they say BYPASS.
        let mut answer = match outcome {
            Ok(answer) => answer,
            Err(f) => {
                return Answered {
                    response: failure(&f, asked.request_id),
                    x_cache: None,
                    held,
                }
            }
        };
        // The answer is the route's response: its body rules apply.
        if let Some(rules) = asked.rules {
            match rules.rewrite(&answer.body) {
                Ok(std::borrow::Cow::Owned(out)) => answer.body = Bytes::from(out),
                Ok(std::borrow::Cow::Borrowed(_)) => {}
                // The parts were each checked to be JSON: not seen.
                Err(_) => {
                    return Answered {
                        response: Response::problem(
                            StatusCode::BAD_GATEWAY,
                            "the parts' answer cannot be read for this route's body rules",
                            asked.request_id,
                        ),
                        x_cache: None,
                        held,
                    }
                }
            }
        }
        if let Some(slot) = &asked.cache {
            // Only a complete answer the parts allow to be kept.
            let ttl = answer
                .cacheable_for
                .map(|t| t.min(slot.ttl))
                .filter(|t| !t.is_zero());
            if let (true, true, Some(ttl)) = (answer.missing.is_empty(), asked.shareable, ttl) {
                if let Ok(mut head) = ResponseHeader::build(200, Some(1)) {
                    let _ = head.insert_header(http::header::CONTENT_TYPE, "application/json");
                    let now = std::time::SystemTime::now();
                    let meta = CacheMeta::new(now + ttl, now, 0, 0, head);
                    slot.cache
                        .storage
                        .put(slot.key, &meta, answer.body.clone(), &slot.path);
                }
            }
        }
        Answered {
            response: answer.response(),
            x_cache: asked.cache.as_ref().map(|_| "MISS"),
            held,
        }
    }
}
