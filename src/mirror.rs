//! A route's `mirror` (SPEC section 7.4): a copy of `percent` of its
//! requests, head and body as the upstream receives them, sent to another
//! upstream off the request's path, the answer thrown away. Joins
//! `upstream_request_filter` (sample, copy the head), `request_body_filter`
//! (copy the body; at its end the copy goes) and `upstream_peer` (a retry
//! drops an unfinished copy: the body would be fed twice).
//!
//! Bounded: at most `MAX_IN_FLIGHT` copies per route are out at once and a
//! copied body holds at most `MAX_BODY` bytes; beyond either the copy is
//! skipped and counted. A copy's exchange is bounded by the mirror
//! upstream's own timeouts, and nothing of it reaches the client: a slow
//! or dead mirror costs the client nothing but the copy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pingora_http::RequestHeader;
use prometheus::IntCounterVec;

use crate::metrics::UpstreamOutcome;
use crate::outbound::{Body, Client};
use crate::upstream::Upstream;

/// Copies out at once, per route.
pub const MAX_IN_FLIGHT: usize = 100;
/// The largest body copied.
pub const MAX_BODY: usize = 256 * 1024;

/// A compiled `mirror`.
#[derive(Debug)]
pub struct Mirror {
    pub upstream: Arc<Upstream>,
    pub percent: u32,
    in_flight: Arc<AtomicUsize>,
}

/// The counters a copy reports to: `gatehouse_mirror_requests_total` and
/// the mirror upstream's `gatehouse_upstream_requests_total`.
#[derive(Clone)]
pub struct MirrorMetrics {
    pub mirrors: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    /// `server.metrics`: the per-request upstream series.
    pub counted: bool,
}

/// Sends the copies: the client and the counters, held by the proxy.
pub struct Sender {
    pub client: Client,
    pub metrics: MirrorMetrics,
}

/// One request's copy, in its context.
#[derive(Default)]
pub struct Pending {
    copy: Option<Box<Copy>>,
    /// Sampled (or not) at the first attempt's head: a retry's head is
    /// never copied again.
    decided: bool,
}

impl Sender {
    /// At the head the upstream is sent (`upstream_request_filter`): the
    /// first attempt's is sampled and copied; one without a body goes now.
    pub fn on_head(
        &self,
        mirror: &Mirror,
        route: &Arc<str>,
        pending: &mut Pending,
        head: &RequestHeader,
        body_empty: bool,
    ) {
        if std::mem::replace(&mut pending.decided, true) {
            return;
        }
        let Some(copy) = mirror.copy(route, head, &self.metrics.mirrors) else {
            return;
        };
        if body_empty {
            copy.send(self);
        } else {
            pending.copy = Some(Box::new(copy));
        }
    }

    /// Each body chunk as the upstream is sent it; at the end the copy goes.
    pub fn on_body(&self, pending: &mut Pending, chunk: Option<&Bytes>, end: bool) {
        let Some(copy) = pending.copy.as_mut() else {
            return;
        };
        if !copy.add(chunk) {
            // Counted as skipped as it drops.
            pending.copy = None;
        } else if end {
            if let Some(copy) = pending.copy.take() {
                copy.send(self);
            }
        }
    }

    /// Another attempt starts (`upstream_peer`): a copy whose body was being
    /// taken would be fed twice, and is dropped.
    pub fn on_retry(&self, pending: &mut Pending) {
        // Counted as skipped as it drops.
        pending.copy = None;
    }
}

/// One copy being taken; holds its in-flight slot until it is sent and
/// answered, or dropped. Dropped unsent (over the body bound, cut off by a
/// retry, a refused or abandoned request), it is counted as skipped.
pub struct Copy {
    route: Arc<str>,
    upstream: Arc<Upstream>,
    /// `None` once sent.
    head: Option<RequestHeader>,
    body: BytesMut,
    slot: Option<Slot>,
    mirrors: IntCounterVec,
}

impl Drop for Copy {
    fn drop(&mut self) {
        if self.head.is_some() {
            self.mirrors
                .with_label_values(&[&self.route, "skipped"])
                .inc();
        }
    }
}

struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Mirror {
    pub fn new(upstream: Arc<Upstream>, percent: u32) -> Self {
        Mirror {
            upstream,
            percent,
            in_flight: Arc::default(),
        }
    }

    /// Whether this request is copied and, if so, its copy with the head
    /// the upstream is sent; a sampled request over the bound is counted
    /// as skipped.
    fn copy(
        &self,
        route: &Arc<str>,
        head: &RequestHeader,
        mirrors: &IntCounterVec,
    ) -> Option<Copy> {
        if self.percent < 100 && fastrand::u32(0..100) >= self.percent {
            return None;
        }
        let declared = crate::transform::body::declared_length(&head.headers);
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            mirrors.with_label_values(&[route, "skipped"]).inc();
            return None;
        }
        let taken = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_IN_FLIGHT).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            mirrors.with_label_values(&[route, "skipped"]).inc();
            return None;
        }
        Some(Copy {
            route: Arc::clone(route),
            upstream: Arc::clone(&self.upstream),
            head: Some(head.clone()),
            body: BytesMut::new(),
            slot: Some(Slot(Arc::clone(&self.in_flight))),
            mirrors: mirrors.clone(),
        })
    }
}

impl Copy {
    /// Adds a chunk of the body; false when the body is over `MAX_BODY`
    /// (the copy is then to be dropped, and counted as skipped).
    fn add(&mut self, chunk: Option<&Bytes>) -> bool {
        let Some(chunk) = chunk else { return true };
        if self.body.len() + chunk.len() > MAX_BODY {
            return false;
        }
        self.body.extend_from_slice(chunk);
        true
    }

    /// Sends the copy on the current runtime, off the request's path.
    fn send(mut self, sender: &Sender) {
        let (client, metrics) = (sender.client.clone(), sender.metrics.clone());
        let (Some(mut head), slot) = (self.head.take(), self.slot.take()) else {
            return;
        };
        let (route, upstream) = (Arc::clone(&self.route), Arc::clone(&self.upstream));
        let body = std::mem::take(&mut self.body);
        drop(self);
        tokio::spawn(async move {
            // The whole body is at hand: a length, whatever the framing was.
            head.remove_header(&http::header::TRANSFER_ENCODING);
            let length = body.len().to_string();
            let _ = head.insert_header(http::header::CONTENT_LENGTH, length);
            let result = match upstream.choose(&[0; 8], &[], None) {
                Err(none) => Err(none.why().to_string()),
                Ok((attempt, peer)) => {
                    let sent = client
                        .send_with_body(&peer, &head, Some(body.freeze()), Body::Discard)
                        .await;
                    let outcome = match &sent {
                        Ok(_) => UpstreamOutcome::Success,
                        Err(_) => UpstreamOutcome::Error,
                    };
                    if metrics.counted {
                        attempt.count(outcome, &metrics.upstream_requests);
                    }
                    sent.map(|_| ()).map_err(|e| e.to_string())
                }
            };
            let result = match result {
                Ok(()) => "sent",
                Err(why) => {
                    log::debug!("route {route}: mirror to {}: {why}", upstream.name);
                    "failed"
                }
            };
            metrics.mirrors.with_label_values(&[&route, result]).inc();
            drop(slot);
        });
    }
}
