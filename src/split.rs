//! A route's weighted `split` (SPEC section 7.1): which of its upstreams a
//! request goes to. Chosen once per request, when the first upstream peer
//! is asked for (`upstream_peer`), so a `by: claim:` or `consumer` key sees
//! the verified identity; retries stay on the side chosen.
//!
//! With `by`, the side is a stable hash of the key (the same hash in every
//! process and after a restart, see `subject::RequestKey::stable_hash`), so
//! a user stays on one side as long as the weights stand; without it, each
//! request draws by weight.

use std::sync::Arc;

use crate::subject::{RequestKey, Subject};
use crate::upstream::Upstream;

/// One side of a split.
#[derive(Debug)]
pub struct Side {
    pub upstream: Arc<Upstream>,
    pub weight: u32,
}

#[derive(Debug)]
pub struct Split {
    pub by: Option<RequestKey>,
    /// In the order written; at least one has a weight above zero.
    pub sides: Vec<Side>,
    total: u64,
}

impl Split {
    /// `None` when no side has a weight above zero.
    pub fn new(by: Option<RequestKey>, sides: Vec<Side>) -> Option<Self> {
        let total = sides.iter().map(|s| u64::from(s.weight)).sum();
        (total > 0).then_some(Split { by, sides, total })
    }

    /// The upstream of the request `subject` describes.
    pub fn choose(&self, subject: &Subject<'_>) -> &Arc<Upstream> {
        let point = match &self.by {
            // Mixed: the key hash's low bits alone spread short keys badly.
            Some(key) => mix(key.stable_hash(subject)) % self.total,
            None => fastrand::u64(0..self.total),
        };
        self.side_at(point)
    }

    fn side_at(&self, mut point: u64) -> &Arc<Upstream> {
        for side in &self.sides {
            let weight = u64::from(side.weight);
            if point < weight {
                return &side.upstream;
            }
            point -= weight;
        }
        // `point` is below the total, so the loop returned; the last side
        // with a weight is the honest answer if it ever did not.
        let last = self.sides.iter().rev().find(|s| s.weight > 0);
        &last.unwrap_or(&self.sides[0]).upstream
    }
}

/// SplitMix64's finalizer: every input bit moves every output bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{BalanceKind, HashKey, UpstreamSpec};
    use std::time::Duration;

    fn upstream(name: &str) -> Arc<Upstream> {
        Arc::new(
            Upstream::new(UpstreamSpec {
                name: name.into(),
                targets: vec![("127.0.0.1:1".parse().unwrap(), 1)],
                names: Vec::new(),
                resolve_interval: Duration::from_secs(30),
                balance: BalanceKind::RoundRobin,
                hash_key: HashKey::ClientIp,
                connect_timeout: Duration::from_secs(1),
                read_timeout: Duration::from_secs(1),
                write_timeout: Duration::from_secs(1),
                idle_timeout: None,
                retries: 0,
                tls: None,
                health_check: None,
                outlier: None,
                retry_on: crate::upstream::RetryOn::default(),
                retry_budget_percent: 20,
            })
            .unwrap(),
        )
    }

    fn split(by: Option<RequestKey>, weights: &[u32]) -> Split {
        let sides = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Side {
                upstream: upstream(&format!("side{i}")),
                weight: *w,
            })
            .collect();
        Split::new(by, sides).unwrap()
    }

    #[test]
    fn keyed_sides_follow_the_weights_and_stick() {
        let s = split(
            Some(RequestKey::Header("x-user".parse().unwrap())),
            &[90, 10],
        );
        let mut second = 0;
        for i in 0..10_000 {
            let mut headers = http::HeaderMap::new();
            headers.insert("x-user", format!("user-{i}").parse().unwrap());
            let subject = Subject {
                client_ip: None,
                headers: &headers,
                claims: None,
                consumer: None,
            };
            let first = s.choose(&subject).name.clone();
            for _ in 0..3 {
                assert_eq!(s.choose(&subject).name, first, "sticky");
            }
            second += usize::from(&*first == "side1");
        }
        assert!((800..1200).contains(&second), "{second} of 10000");
    }

    #[test]
    fn random_sides_follow_the_weights_and_zero_gets_nothing() {
        let s = split(None, &[1, 0, 3]);
        let subject = Subject {
            client_ip: None,
            headers: &http::HeaderMap::new(),
            claims: None,
            consumer: None,
        };
        let mut counts = [0usize; 3];
        for _ in 0..8000 {
            let name = s.choose(&subject).name.clone();
            counts[name[4..].parse::<usize>().unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        assert!((1700..2300).contains(&counts[0]), "{counts:?}");
        assert!(Split::new(None, Vec::new()).is_none());
    }
}
