//! Passive health (SPEC section 7.2, `outlier`): each proxied request's
//! outcome is reported for its target (a failed connect where it happens,
//! the rest in `logging`); a target whose last `consecutive_failures`
//! requests all failed is ejected for `eject_for`, doubled at each new
//! ejection up to ten times, reset by a success. Never more than
//! `max_ejected` of an upstream's targets are out at once.
//!
//! The state lives in the upstream, so a reload that keeps the upstream
//! keeps its ejections. A target is used only when neither its active
//! health check nor this says it is bad (`Upstream::is_healthy`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A compiled `outlier` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierSettings {
    pub consecutive_failures: u32,
    pub eject_for: Duration,
    /// Percent of the targets that may be ejected at once (at least one).
    pub max_ejected_percent: u32,
}

/// How many times `eject_for` an ejection lasts at most.
const MAX_FACTOR: u32 = 10;

/// One target's record.
#[derive(Debug, Default)]
pub(crate) struct TargetRecord {
    failures: AtomicU32,
    /// Milliseconds since the upstream's epoch until which the target is
    /// out; 0 while it is in.
    ejected_until: AtomicU64,
    /// Ejections since its last success: the next lasts
    /// `eject_for << ejections` (capped).
    ejections: AtomicU32,
}

/// An upstream's outlier detection: its settings and one record per target.
#[derive(Debug)]
pub(crate) struct Outliers {
    pub settings: OutlierSettings,
    records: Vec<TargetRecord>,
    epoch: Instant,
}

/// What a report changed, for the caller to log and count.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Change {
    None,
    Ejected(Duration),
    /// Would be ejected, but `max_ejected` targets already are.
    Spared,
}

impl Outliers {
    pub fn new(settings: OutlierSettings, targets: usize) -> Self {
        Outliers {
            settings,
            records: (0..targets).map(|_| TargetRecord::default()).collect(),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether target `index` is ejected now. The first reader after an
    /// ejection ends clears it (and is told so through `returned`).
    pub fn is_ejected(&self, index: usize, returned: impl FnOnce()) -> bool {
        let record = &self.records[index];
        let until = record.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if self.now_ms() < until {
            return true;
        }
        let cleared =
            record
                .ejected_until
                .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        if cleared.is_ok() {
            // A returning target counts its failures from zero.
            record.failures.store(0, Ordering::Relaxed);
            returned();
        }
        false
    }

    fn ejected_count(&self) -> usize {
        let now = self.now_ms();
        self.records
            .iter()
            .filter(|r| {
                let until = r.ejected_until.load(Ordering::Relaxed);
                until != 0 && now < until
            })
            .count()
    }

    /// The most targets that may be out at once: the share rounded down,
    /// but at least one.
    fn max_ejected(&self) -> usize {
        let share = self.records.len() * self.settings.max_ejected_percent as usize / 100;
        share.max(1)
    }

    pub fn success(&self, index: usize) {
        let record = &self.records[index];
        record.failures.store(0, Ordering::Relaxed);
        if record.ejections.load(Ordering::Relaxed) != 0 {
            record.ejections.store(0, Ordering::Relaxed);
        }
    }

    pub fn failure(&self, index: usize) -> Change {
        let record = &self.records[index];
        let failures = record.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.settings.consecutive_failures {
            return Change::None;
        }
        if record.ejected_until.load(Ordering::Relaxed) != 0 {
            // Already out (a request that was in flight when it left).
            return Change::None;
        }
        if self.ejected_count() >= self.max_ejected() {
            return Change::Spared;
        }
        let ejections = record.ejections.fetch_add(1, Ordering::Relaxed);
        let factor = 1u32
            .checked_shl(ejections)
            .unwrap_or(MAX_FACTOR)
            .min(MAX_FACTOR);
        let lasts = self.settings.eject_for * factor;
        let until = self.now_ms() + u64::try_from(lasts.as_millis()).unwrap_or(u64::MAX / 2);
        // Only one reporter ejects it; the others see it out.
        if record
            .ejected_until
            .compare_exchange(0, until.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return Change::None;
        }
        record.failures.store(0, Ordering::Relaxed);
        Change::Ejected(lasts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outliers(targets: usize, percent: u32) -> Outliers {
        Outliers::new(
            OutlierSettings {
                consecutive_failures: 3,
                eject_for: Duration::from_millis(40),
                max_ejected_percent: percent,
            },
            targets,
        )
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets() {
        let o = outliers(4, 50);
        assert_eq!(o.failure(0), Change::None);
        assert_eq!(o.failure(0), Change::None);
        o.success(0);
        assert_eq!(o.failure(0), Change::None);
        assert_eq!(o.failure(0), Change::None);
        assert_eq!(o.failure(0), Change::Ejected(Duration::from_millis(40)));
        assert!(o.is_ejected(0, || panic!("still out")));
        assert!(!o.is_ejected(1, || panic!("never out")));
    }

    #[test]
    fn ejections_double_up_to_ten_times_and_return() {
        let mut o = outliers(2, 50);
        // So that "until 1 ms" is in the past.
        o.epoch = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        let mut lasted = Vec::new();
        for _ in 0..6 {
            for _ in 0..2 {
                o.failure(0);
            }
            let Change::Ejected(d) = o.failure(0) else {
                panic!("not ejected")
            };
            lasted.push(d.as_millis());
            // Forced back in, as when its time runs out.
            o.records[0].ejected_until.store(1, Ordering::Relaxed);
            let mut returned = false;
            assert!(!o.is_ejected(0, || returned = true));
            assert!(returned, "the return is reported once");
        }
        assert_eq!(lasted, vec![40, 80, 160, 320, 400, 400]);
        o.success(0);
        for _ in 0..2 {
            o.failure(0);
        }
        assert_eq!(o.failure(0), Change::Ejected(Duration::from_millis(40)));
    }

    #[test]
    fn max_ejected_rounds_down_but_allows_one() {
        let o = outliers(4, 50);
        for target in 0..3 {
            for _ in 0..2 {
                o.failure(target);
            }
            let expected = if target < 2 {
                Change::Ejected(Duration::from_millis(40))
            } else {
                Change::Spared
            };
            assert_eq!(o.failure(target), expected, "target {target}");
        }
        let single = outliers(1, 10);
        for _ in 0..2 {
            single.failure(0);
        }
        assert!(matches!(single.failure(0), Change::Ejected(_)));
    }
}
