//! Traffic management (SPEC section 7) in routes: `split` and the
//! `match.query` / `match.claims` conditions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::config::raw::{RawMirror, RawOutlier, RawSplit};
use crate::config::source::{index_path, key_path};
use crate::mirror::Mirror;
use crate::split::{Side, Split};
use crate::subject::RequestKey;
use crate::upstream::{OutlierSettings, RetryOn, Upstream};

impl Compiler<'_> {
    pub(super) fn split(
        &mut self,
        path: &str,
        raw: &RawSplit,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        declared: &[String],
    ) -> Option<Split> {
        let errors_before = self.errors.0.len();
        let by = raw.by.as_deref().and_then(|b| {
            RequestKey::parse(b, false, "split key")
                .map_err(|e| self.error(&key_path(path, "by"), e))
                .ok()
        });
        let to = key_path(path, "to");
        if raw.to.len() < 2 {
            self.error(&to, "a split needs at least two sides");
        }
        let mut sides: Vec<Side> = Vec::new();
        for (i, side) in raw.to.iter().enumerate() {
            let side_path = index_path(&to, i);
            let weight = side.weight.unwrap_or(1);
            if weight > 10_000 {
                self.error(
                    &key_path(&side_path, "weight"),
                    "weight must be between 0 and 10000",
                );
            }
            let upstream_path = key_path(&side_path, "upstream");
            if sides.iter().any(|s| *s.upstream.name == *side.upstream) {
                self.error(
                    &upstream_path,
                    format!("upstream \"{}\" is already a side", side.upstream),
                );
                continue;
            }
            if let Some(upstream) =
                self.upstream_ref(&upstream_path, &side.upstream, upstreams, declared)
            {
                sides.push(Side { upstream, weight });
            }
        }
        if self.errors.0.len() > errors_before {
            return None;
        }
        let split = Split::new(by, sides);
        if split.is_none() {
            self.error(&to, "at least one side needs a weight above zero");
        }
        split
    }

    pub(super) fn mirror(
        &mut self,
        path: &str,
        raw: &RawMirror,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        declared: &[String],
    ) -> Option<Mirror> {
        let percent = match &raw.percent {
            None => Some(100),
            Some(v) => self.percent(&key_path(path, "percent"), v),
        };
        let upstream = self.upstream_ref(
            &key_path(path, "upstream"),
            &raw.upstream,
            upstreams,
            declared,
        );
        Some(Mirror::new(upstream?, percent?))
    }

    /// `match.query`: scalar values, compared as text.
    pub(super) fn match_query(
        &mut self,
        path: &str,
        raw: Option<BTreeMap<String, Value>>,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, value) in raw.unwrap_or_default() {
            let item = key_path(path, &name);
            if name.is_empty() || name.contains(['&', '=', '#', ' ']) {
                self.error(&item, format!("\"{name}\" is not a query parameter name"));
                continue;
            }
            match scalar_text(&value) {
                Some(text) => out.push((name, text)),
                None => self.error(&item, "a query condition is one value (text or number)"),
            }
        }
        out
    }

    /// `match.claims`: scalar values, compared as JSON values.
    pub(super) fn match_claims(
        &mut self,
        path: &str,
        raw: Option<BTreeMap<String, Value>>,
    ) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for (name, value) in raw.unwrap_or_default() {
            if scalar_text(&value).is_none() {
                self.error(
                    &key_path(path, &name),
                    "a claim condition is one value (text, number or true/false)",
                );
                continue;
            }
            out.push((name, value));
        }
        out
    }
}

impl Compiler<'_> {
    /// A share: `20%` (or the number `20`), from 0 to 100.
    pub(super) fn percent(&mut self, path: &str, value: &Value) -> Option<u32> {
        let number = match value {
            Value::String(s) => s
                .trim()
                .strip_suffix('%')
                .and_then(|n| n.trim().parse::<u32>().ok()),
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            _ => None,
        };
        match number {
            Some(n) if n <= 100 => Some(n),
            _ => {
                self.error(path, "a share is written like 20% (0% to 100%)");
                None
            }
        }
    }

    pub(super) fn outlier(&mut self, path: &str, raw: RawOutlier) -> Option<OutlierSettings> {
        let errors_before = self.errors.0.len();
        let consecutive_failures = raw.consecutive_failures.unwrap_or(5);
        if consecutive_failures == 0 {
            self.error(
                &key_path(path, "consecutive_failures"),
                "consecutive_failures must be at least 1",
            );
        }
        let eject_for = raw.eject_for.map_or(Duration::from_secs(30), |d| d.0);
        if eject_for.is_zero() {
            self.error(&key_path(path, "eject_for"), "eject_for must be above zero");
        }
        let max_ejected_percent = match &raw.max_ejected {
            None => Some(50),
            Some(v) => self.percent(&key_path(path, "max_ejected"), v),
        };
        if self.errors.0.len() > errors_before {
            return None;
        }
        Some(OutlierSettings {
            consecutive_failures,
            eject_for,
            max_ejected_percent: max_ejected_percent?,
        })
    }

    pub(super) fn retry_on(&mut self, path: &str, raw: Option<&[Value]>) -> RetryOn {
        match raw {
            None => RetryOn::default(),
            Some(items) => RetryOn::parse(items).unwrap_or_else(|(i, e)| {
                self.error(&index_path(path, i), e);
                RetryOn::default()
            }),
        }
    }
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}
