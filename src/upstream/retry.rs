//! Retries beyond a failed connect (SPEC section 7.4, `retry_on` and
//! `retry_budget`): an answer with a listed status, a reset or a timeout is
//! tried again on another target, but only for `GET`, `HEAD`, `OPTIONS`,
//! `PUT` and `DELETE` whose body was fully received and fits the replay
//! buffer (64KiB), and only while the upstream's retries in flight stay
//! within its budget, so a failing upstream is not hit harder by the
//! gateway. Joins `upstream_response_filter` (a status) and
//! `error_while_proxy` (a reset or a timeout).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::Method;

use super::{InFlight, Upstream};
use crate::metrics::{Metrics, UpstreamOutcome};

/// What follows a failed attempt.
pub enum AfterFailure {
    /// Tried again on another target: the attempt is counted and reported.
    Retry,
    /// Returned to the client as it is; the attempt is the request's last.
    GiveUp(InFlight),
}

/// What a compiled `retry_on` retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryOn {
    pub connect: bool,
    pub reset: bool,
    pub timeout: bool,
    /// Statuses from 500 to 599.
    pub statuses: Vec<u16>,
}

impl Default for RetryOn {
    /// `[connect]`.
    fn default() -> Self {
        RetryOn {
            connect: true,
            reset: false,
            timeout: false,
            statuses: Vec::new(),
        }
    }
}

impl RetryOn {
    /// The conditions of `items`; an error names the item's index.
    pub fn parse(items: &[serde_json::Value]) -> Result<Self, (usize, String)> {
        let mut on = RetryOn {
            connect: false,
            ..RetryOn::default()
        };
        for (i, item) in items.iter().enumerate() {
            match item {
                serde_json::Value::String(s) if s == "connect" => on.connect = true,
                serde_json::Value::String(s) if s == "reset" => on.reset = true,
                serde_json::Value::String(s) if s == "timeout" => on.timeout = true,
                serde_json::Value::Number(n) => match n.as_u64() {
                    Some(status @ 500..=599) => on.statuses.push(status as u16),
                    _ => return Err((i, format!("{n} is not a 5xx status"))),
                },
                other => {
                    return Err((
                        i,
                        format!("unknown retry condition {other}; use connect, reset, timeout or a 5xx status"),
                    ))
                }
            }
        }
        Ok(on)
    }

    /// Whether `failure` is one of these.
    pub fn lists(&self, failure: Failure) -> bool {
        match failure {
            Failure::Status(status) => self.statuses.contains(&status),
            Failure::Reset => self.reset,
            Failure::Timeout => self.timeout,
        }
    }
}

/// Why an attempt that reached the upstream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Status(u16),
    Reset,
    Timeout,
}

impl Failure {
    /// What an error in the exchange (after the connect) says of the
    /// target: only the upstream's failures count; a client that hung up
    /// says nothing of it.
    pub fn of(e: &pingora_core::Error) -> Option<Failure> {
        use pingora_core::{ErrorSource, ErrorType};
        match (e.esource(), e.etype()) {
            (ErrorSource::Upstream, ErrorType::ReadTimedout | ErrorType::WriteTimedout) => {
                Some(Failure::Timeout)
            }
            (
                ErrorSource::Upstream,
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError,
            ) => Some(Failure::Reset),
            _ => None,
        }
    }
}

/// What the request allows: a replay needs its whole body at hand.
pub struct Replay<'a> {
    pub method: &'a Method,
    /// The body was read to its end and fits the replay buffer.
    pub body_replayable: bool,
}

/// The retries one request holds against its upstream's budget, released
/// when the request ends.
pub struct RetryHold {
    upstream: Arc<Upstream>,
    count: usize,
}

impl Drop for RetryHold {
    fn drop(&mut self) {
        self.upstream
            .retries_in_flight
            .fetch_sub(self.count, Ordering::Relaxed);
    }
}

impl Upstream {
    /// After attempt `failed` reached the upstream and ended in `failure`:
    /// tried again on another target when `retry_on` lists it, the request
    /// may be replayed, `retries` and an untried healthy target are left
    /// and the budget allows; then logged, counted as `retry`, reported to
    /// outlier detection and remembered in `tried`.
    #[allow(clippy::too_many_arguments)]
    pub fn retry_after(
        self: &Arc<Self>,
        failed: InFlight,
        failure: Failure,
        replay: &Replay<'_>,
        tried: &mut Vec<std::net::SocketAddr>,
        hold: &mut Option<RetryHold>,
        request_id: &str,
        metrics: &Metrics,
        counted: bool,
    ) -> AfterFailure {
        let target = Arc::clone(&failed.target);
        let mut with_failed = tried.clone();
        with_failed.push(target.addr);
        if !self.retries_on(failure, replay)
            || !self.another_target(&with_failed)
            || !self.take_retry(hold)
        {
            return AfterFailure::GiveUp(failed);
        }
        drop(failed);
        log::warn!(
            "request {request_id}: {} from {} (upstream {}): trying another target",
            match failure {
                Failure::Status(s) => format!("status {s}"),
                Failure::Reset => "connection reset".to_string(),
                Failure::Timeout => "timeout".to_string(),
            },
            target.label,
            self.name,
        );
        if counted {
            self.count_request(&target, UpstreamOutcome::Retry, &metrics.upstream_requests);
        }
        self.report(&target, true, &metrics.upstream_ejections);
        *tried = with_failed;
        AfterFailure::Retry
    }
}

/// The smallest budget, whatever the share: a quiet upstream still gets
/// its retries.
const MIN_BUDGET: usize = 3;

impl Upstream {
    /// Whether `failure` of a request is one `retry_on` lists, for a
    /// request that may be replayed.
    pub fn retries_on(&self, failure: Failure, replay: &Replay<'_>) -> bool {
        let listed = self.retry_on.lists(failure);
        let method = matches!(
            *replay.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        );
        listed && method && replay.body_replayable
    }

    /// Takes one retry from the budget into `hold`; false when the
    /// upstream's retries in flight are at its share of its requests in
    /// flight.
    pub fn take_retry(self: &Arc<Self>, hold: &mut Option<RetryHold>) -> bool {
        let requests = self.requests_in_flight();
        let budget = (requests * self.retry_budget_percent as usize / 100).max(MIN_BUDGET);
        let taken = self
            .retries_in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < budget).then_some(n + 1)
            })
            .is_ok();
        if taken {
            match hold {
                Some(h) => h.count += 1,
                None => {
                    *hold = Some(RetryHold {
                        upstream: Arc::clone(self),
                        count: 1,
                    })
                }
            }
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions_parse_and_refuse_what_is_not_one() {
        let on = RetryOn::parse(&[json!("reset"), json!(503), json!("timeout")]).unwrap();
        assert!(!on.connect && on.reset && on.timeout);
        assert_eq!(on.statuses, vec![503]);
        assert!(RetryOn::parse(&[json!(404)]).is_err());
        assert!(RetryOn::parse(&[json!("refused")]).is_err());
        let default = RetryOn::default();
        assert!(default.connect && !default.lists(Failure::Reset));
        assert!(!default.lists(Failure::Status(503)));
    }
}
