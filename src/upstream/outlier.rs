//! Passive health (SPEC section 7.2, `outlier`): each proxied request's
//! outcome is reported for its target (a failed connect where it happens,
//! the rest in `logging`); a target whose last `consecutive_failures`
//! requests all failed is ejected for `eject_for`, doubled at each new
//! ejection up to ten times, reset by a success. Never more than
//! `max_ejected` of an upstream's targets are out at once.
//!
//! The state lives in each target, which an upstream kept by a reload
//! keeps, and which follows its address when a name's addresses change. A target is used only when neither its active
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

/// An upstream's outlier detection: its settings and clock; each target
/// holds its own record, so the record follows the target's address.
#[derive(Debug)]
pub(crate) struct Outliers {
    pub settings: OutlierSettings,
    epoch: Instant,
    /// Held while an ejection is decided: two targets failing at once must
    /// not both pass the `max_ejected` count. Taken only at the threshold.
    deciding: std::sync::Mutex<()>,
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
    pub fn new(settings: OutlierSettings) -> Self {
        Outliers {
            settings,
            epoch: Instant::now(),
            deciding: std::sync::Mutex::new(()),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the target of `record` is ejected now. The first reader
    /// after an ejection ends clears it (and is told so through `returned`).
    pub fn is_ejected(&self, record: &TargetRecord, returned: impl FnOnce()) -> bool {
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

    fn is_out(&self, record: &TargetRecord, now: u64) -> bool {
        let until = record.ejected_until.load(Ordering::Relaxed);
        until != 0 && now < until
    }

    pub fn success(&self, record: &TargetRecord) {
        record.failures.store(0, Ordering::Relaxed);
        if record.ejections.load(Ordering::Relaxed) != 0 {
            record.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A failure of the target of `record`, one of `all` (the upstream's
    /// targets now, for `max_ejected`: the share rounded down, but at
    /// least one).
    pub fn failure<'a>(
        &self,
        record: &TargetRecord,
        all: impl ExactSizeIterator<Item = &'a TargetRecord>,
    ) -> Change {
        let failures = record.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.settings.consecutive_failures {
            return Change::None;
        }
        if record.ejected_until.load(Ordering::Relaxed) != 0 {
            // Already out (a request that was in flight when it left).
            return Change::None;
        }
        let _deciding = self
            .deciding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = self.now_ms();
        let total = all.len();
        let out = all.filter(|r| self.is_out(r, now)).count();
        let max = (total * self.settings.max_ejected_percent as usize / 100).max(1);
        if out >= max {
            return Change::Spared;
        }
        let ejections = record.ejections.fetch_add(1, Ordering::Relaxed);
        let factor = 1u32
            .checked_shl(ejections)
            .unwrap_or(MAX_FACTOR)
            .min(MAX_FACTOR);
        let lasts = self.settings.eject_for * factor;
        let until = now + u64::try_from(lasts.as_millis()).unwrap_or(u64::MAX / 2);
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

    fn outliers(percent: u32) -> Outliers {
        Outliers::new(OutlierSettings {
            consecutive_failures: 3,
            eject_for: Duration::from_millis(40),
            max_ejected_percent: percent,
        })
    }

    fn records(n: usize) -> Vec<TargetRecord> {
        (0..n).map(|_| TargetRecord::default()).collect()
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets() {
        let (o, r) = (outliers(50), records(4));
        let fail = |i: usize| o.failure(&r[i], r.iter());
        assert_eq!(fail(0), Change::None);
        assert_eq!(fail(0), Change::None);
        o.success(&r[0]);
        assert_eq!(fail(0), Change::None);
        assert_eq!(fail(0), Change::None);
        assert_eq!(fail(0), Change::Ejected(Duration::from_millis(40)));
        assert!(o.is_ejected(&r[0], || panic!("still out")));
        assert!(!o.is_ejected(&r[1], || panic!("never out")));
    }

    #[test]
    fn ejections_double_up_to_ten_times_and_return() {
        let (mut o, r) = (outliers(50), records(2));
        // So that "until 1 ms" is in the past.
        o.epoch = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        let fail = |o: &Outliers| o.failure(&r[0], r.iter());
        let mut lasted = Vec::new();
        for _ in 0..6 {
            fail(&o);
            fail(&o);
            let Change::Ejected(d) = fail(&o) else {
                panic!("not ejected")
            };
            lasted.push(d.as_millis());
            // Forced back in, as when its time runs out.
            r[0].ejected_until.store(1, Ordering::Relaxed);
            let mut returned = false;
            assert!(!o.is_ejected(&r[0], || returned = true));
            assert!(returned, "the return is reported once");
        }
        assert_eq!(lasted, vec![40, 80, 160, 320, 400, 400]);
        o.success(&r[0]);
        fail(&o);
        fail(&o);
        assert_eq!(fail(&o), Change::Ejected(Duration::from_millis(40)));
    }

    #[test]
    fn max_ejected_rounds_down_but_allows_one() {
        let (o, r) = (outliers(50), records(4));
        for target in 0..3 {
            o.failure(&r[target], r.iter());
            o.failure(&r[target], r.iter());
            let expected = if target < 2 {
                Change::Ejected(Duration::from_millis(40))
            } else {
                Change::Spared
            };
            assert_eq!(o.failure(&r[target], r.iter()), expected, "target {target}");
        }
        let (single, one) = (outliers(10), records(1));
        single.failure(&one[0], one.iter());
        single.failure(&one[0], one.iter());
        assert!(matches!(
            single.failure(&one[0], one.iter()),
            Change::Ejected(_)
        ));
    }
}
