//! Memory budgets for bodies held whole in memory. Body rules, aggregate
//! parts and cache fills each reserve what they hold from one budget,
//! `server.max_buffered`, before holding it, and release it when done, so
//! many such bodies at once cannot take more than the configuration allows
//! (the cache keeps a second budget of its own for fills in flight).
//!
//! A reservation that does not fit is refused, never waited for: the
//! caller answers 503, or (a cache fill) goes on without storing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A number of bytes that may be held at once.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Budget {
            limit,
            used: AtomicU64::new(0),
        })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// A reservation of `n` bytes, if they fit.
    pub fn reserve(self: &Arc<Self>, n: u64) -> Option<Held> {
        self.take(n).then(|| Held {
            budget: Arc::clone(self),
            bytes: n,
        })
    }
}

/// Bytes reserved from a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Held {
    /// Reserves `n` more bytes; false (and nothing more reserved) when
    /// they do not fit.
    pub fn grow(&mut self, n: u64) -> bool {
        if n == 0 {
            return true;
        }
        if self.budget.take(n) {
            self.bytes += n;
            true
        } else {
            false
        }
    }

    /// Makes the reservation at least `n` bytes in all.
    pub fn grow_to(&mut self, n: u64) -> bool {
        self.grow(n.saturating_sub(self.bytes))
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Gives everything back, keeping the (empty) reservation.
    pub fn release(&mut self) {
        self.budget.give_back(self.bytes);
        self.bytes = 0;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_fit_the_limit_and_are_given_back() {
        let b = Budget::new(100);
        let mut a = b.reserve(60).unwrap();
        assert!(b.reserve(50).is_none());
        assert!(!a.grow(41));
        assert_eq!(a.bytes(), 60);
        assert!(a.grow(40));
        assert_eq!(b.used(), 100);
        drop(a);
        assert_eq!(b.used(), 0);
        let mut c = b.reserve(0).unwrap();
        assert!(c.grow_to(100));
        assert!(c.grow_to(10));
        assert_eq!(c.bytes(), 100);
        c.release();
        assert_eq!(b.used(), 0);
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn concurrent_reservations_never_pass_the_limit() {
        let b = Budget::new(1000);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if let Some(h) = b.reserve(7) {
                            assert!(b.used() <= 1000);
                            drop(h);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.used(), 0);
    }
}
