//! Durations (`250ms`, `2s`, `5m`, `1h`) and sizes (`512KiB`, `1MiB`) as they
//! are written in the configuration file.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration that must carry a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfDuration(pub Duration);

impl<'de> Deserialize<'de> for ConfDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ConfDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with a unit, like 250ms, 2s, 5m or 1h")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ConfDuration, E> {
                parse_duration(s).map(ConfDuration).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ConfDuration, E> {
                Err(E::custom(format!(
                    "duration {n} has no unit; write it like {n}s or {n}ms"
                )))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ConfDuration, E> {
                self.visit_i64(n as i64)
            }
        }
        d.deserialize_any(V)
    }
}

const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let trimmed = s.trim();
    if trimmed.is_empty() || trimmed.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "invalid duration \"{s}\": it needs a unit, like 250ms, 2s, 5m or 1h"
        ));
    }
    let d = humantime::parse_duration(trimmed).map_err(|e| {
        format!("invalid duration \"{s}\" ({e}); write it like 250ms, 2s, 5m or 1h")
    })?;
    // Deadlines are computed from it; keep them far from overflow.
    if d > MAX_DURATION {
        return Err(format!(
            "duration \"{s}\" is too long; the most is 365 days"
        ));
    }
    Ok(d)
}

/// A size in bytes, written with a unit (`B`, `KiB`, `MiB`, `GiB`, or the
/// decimal `KB`, `MB`, `GB`) or as a plain number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfSize(pub u64);

impl<'de> Deserialize<'de> for ConfSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ConfSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like 512KiB or 10MiB")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ConfSize, E> {
                parse_size(s).map(ConfSize).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ConfSize, E> {
                Ok(ConfSize(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ConfSize, E> {
                u64::try_from(n)
                    .map(ConfSize)
                    .map_err(|_| E::custom(format!("invalid size {n}: sizes cannot be negative")))
            }
        }
        d.deserialize_any(V)
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size \"{s}\"; write it like 512KiB, 10MiB or 1GiB");
    let trimmed = s.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    number.checked_mul(multiplier).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("500000000000y")
            .unwrap_err()
            .contains("too long"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("10MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2KB"), Ok(2000));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("10 furlongs").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }
}
