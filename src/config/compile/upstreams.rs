//! `upstreams`: targets resolved, balancing, TLS to the upstream, health
//! checks. An unchanged upstream carries over its health and pool.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::config::raw::*;
use crate::config::source::{index_path, key_path};
use crate::upstream::dns::split_host_port;
use crate::upstream::{
    BalanceKind, HashKey, HealthCheckSettings, TargetName, Upstream, UpstreamSpec, UpstreamTls,
};

/// A target as written: an address, or a name and what it resolved to.
pub(super) enum Resolved {
    Address(SocketAddr),
    Name(TargetName),
}

impl Compiler<'_> {
    pub(super) fn upstreams(&mut self, value: Option<&Value>) -> BTreeMap<String, Arc<Upstream>> {
        let map = match value {
            None | Some(Value::Null) => return BTreeMap::new(),
            Some(Value::Object(map)) => map,
            Some(_) => {
                self.error(
                    "upstreams",
                    "upstreams must be a mapping of names to upstreams",
                );
                return BTreeMap::new();
            }
        };
        self.carry_each("upstreams", "upstream", map, |cx, path, name, item| {
            let raw = cx.de::<RawUpstream>(path, item)?;
            let spec = cx.upstream_spec(path, name, raw)?;
            Upstream::new(spec).map_err(|e| cx.error(path, e)).ok()
        })
    }

    pub(super) fn upstream_spec(
        &mut self,
        path: &str,
        name: &str,
        raw: RawUpstream,
    ) -> Option<UpstreamSpec> {
        let errors_before = self.errors.0.len();
        let mut targets: Vec<(SocketAddr, usize)> = Vec::new();
        let mut names: Vec<TargetName> = Vec::new();
        let targets_path = key_path(path, "targets");
        if raw.targets.is_empty() {
            self.error(&targets_path, "an upstream needs at least one target");
        }
        let resolve_at_start = raw.resolve_at_start.unwrap_or(true);
        let resolve_interval = raw
            .resolve_interval
            .map_or(Duration::from_secs(30), |d| d.0);
        if resolve_interval.is_zero() {
            self.error(
                &key_path(path, "resolve_interval"),
                "resolve_interval must be above zero",
            );
        }
        for (i, item) in raw.targets.iter().enumerate() {
            let tpath = index_path(&targets_path, i);
            let (address, weight) = match item {
                Value::String(s) => (s.clone(), 1),
                _ => match self.de::<RawTarget>(&tpath, item) {
                    Some(t) => (t.address, t.weight.unwrap_or(1)),
                    None => continue,
                },
            };
            if !(1..=1000).contains(&weight) {
                self.error(
                    &key_path(&tpath, "weight"),
                    "weight must be between 1 and 1000",
                );
                continue;
            }
            let Some(target) = self.resolve_target(&tpath, &address, resolve_at_start) else {
                continue;
            };
            let addrs = match target {
                Resolved::Address(addr) => {
                    if targets.iter().any(|(a, _)| *a == addr) {
                        self.error(&tpath, format!("target {addr} is listed twice"));
                        continue;
                    }
                    vec![addr]
                }
                Resolved::Name(name) => {
                    if names
                        .iter()
                        .any(|n| n.host == name.host && n.port == name.port)
                    {
                        self.error(&tpath, format!("target {address} is listed twice"));
                        continue;
                    }
                    let name = TargetName { weight, ..name };
                    let addrs = name.loaded.clone();
                    names.push(name);
                    addrs
                }
            };
            // An address two targets lead to is one target (the first's weight).
            for addr in addrs {
                if !targets.iter().any(|(a, _)| *a == addr) {
                    targets.push((addr, weight));
                }
            }
        }
        let balance = match raw.balance.as_deref() {
            None => BalanceKind::RoundRobin,
            Some(b) => match BalanceKind::parse(b) {
                Some(k) => k,
                None => {
                    self.error(
                        &key_path(path, "balance"),
                        format!(
                            "unknown balance \"{b}\"; known: round_robin, random, consistent_hash, least_connections"
                        ),
                    );
                    BalanceKind::RoundRobin
                }
            },
        };
        let hash_key = match raw.hash_key.as_deref() {
            None => HashKey::ClientIp,
            Some(k) => {
                let kpath = key_path(path, "hash_key");
                if balance != BalanceKind::ConsistentHash {
                    self.error(&kpath, "hash_key applies only to balance: consistent_hash");
                }
                self.hash_key(&kpath, k).unwrap_or(HashKey::ClientIp)
            }
        };
        let tls = if raw.tls {
            let verify = raw.tls_verify.unwrap_or(true);
            let sni = raw.sni.clone().unwrap_or_default();
            if sni.is_empty() && verify {
                self.error(
                    &key_path(path, "sni"),
                    "tls needs an sni naming the targets' certificate (or tls_verify: false)",
                );
            }
            let ca = raw
                .ca_file
                .as_deref()
                .and_then(|f| self.load_ca(&key_path(path, "ca_file"), f));
            Some(UpstreamTls { sni, verify, ca })
        } else {
            for key in ["sni", "tls_verify", "ca_file"] {
                let set = match key {
                    "sni" => raw.sni.is_some(),
                    "tls_verify" => raw.tls_verify.is_some(),
                    _ => raw.ca_file.is_some(),
                };
                if set {
                    self.error(&key_path(path, key), format!("{key} needs tls: true"));
                }
            }
            None
        };
        let health_check = raw
            .health_check
            .and_then(|h| self.health_check(&key_path(path, "health_check"), h));
        let read_timeout = raw.read_timeout.map_or(Duration::from_secs(60), |d| d.0);
        let connect_timeout = raw.connect_timeout.map_or(Duration::from_secs(5), |d| d.0);
        for (key, d) in [
            ("read_timeout", read_timeout),
            ("connect_timeout", connect_timeout),
        ] {
            if d.is_zero() {
                self.error(&key_path(path, key), format!("{key} must be above zero"));
            }
        }
        let outlier = raw
            .outlier
            .and_then(|o| self.outlier(&key_path(path, "outlier"), o));
        let retry_on = self.retry_on(&key_path(path, "retry_on"), raw.retry_on.as_deref());
        let retry_budget_percent = match &raw.retry_budget {
            None => 20,
            Some(v) => self
                .percent(&key_path(path, "retry_budget"), v)
                .unwrap_or(20),
        };
        let retries = raw.retries.unwrap_or(2);
        if retries > 10 {
            self.error(&key_path(path, "retries"), "retries must be at most 10");
        }
        if self.errors.0.len() > errors_before {
            return None;
        }
        Some(UpstreamSpec {
            name: name.to_string(),
            targets,
            names,
            resolve_interval,
            balance,
            hash_key,
            connect_timeout,
            read_timeout,
            write_timeout: raw.write_timeout.map_or(read_timeout, |d| d.0),
            idle_timeout: raw.idle_timeout.map(|d| d.0),
            retries,
            tls,
            health_check,
            outlier,
            retry_on,
            retry_budget_percent,
        })
    }

    /// `ip:port`, or `host:port` looked up now (and again in the
    /// background). A name that does not resolve is an error unless
    /// `resolve_at_start: false`, when it starts with no address.
    pub(super) fn resolve_target(
        &mut self,
        path: &str,
        address: &str,
        resolve_at_start: bool,
    ) -> Option<Resolved> {
        if let Ok(a) = address.parse::<SocketAddr>() {
            return Some(Resolved::Address(a));
        }
        let Some((host, port)) = split_host_port(address) else {
            self.error(
                path,
                format!("target \"{address}\" needs a port, like {address}:80"),
            );
            return None;
        };
        let loaded = match (self.resolve)(self.resolver, address) {
            Ok(addrs) if !addrs.is_empty() => addrs,
            outcome if resolve_at_start => {
                let why = match outcome {
                    Err(e) => format!("cannot be resolved: {e}"),
                    Ok(_) => "resolves to no address".to_string(),
                };
                self.error(
                    path,
                    format!(
                        "target \"{address}\" {why} (resolve_at_start: false starts without it)"
                    ),
                );
                return None;
            }
            _ => Vec::new(),
        };
        Some(Resolved::Name(TargetName {
            host: host.to_string(),
            port,
            weight: 1,
            loaded,
        }))
    }

    pub(super) fn hash_key(&mut self, path: &str, key: &str) -> Option<HashKey> {
        match HashKey::parse(key, false, "hash_key") {
            Ok(k) => Some(k),
            Err(e) => {
                self.error(path, e);
                None
            }
        }
    }

    pub(super) fn load_ca(
        &mut self,
        path: &str,
        file: &str,
    ) -> Option<Arc<pingora_core::protocols::tls::CaType>> {
        let (_, certs) = self.read_certificates(path, file)?;
        Some(Arc::new(certs.into_boxed_slice()))
    }

    pub(super) fn health_check(
        &mut self,
        path: &str,
        raw: RawHealthCheck,
    ) -> Option<HealthCheckSettings> {
        let mut ok = true;
        if let Some(p) = &raw.path {
            if !p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
                self.error(
                    &key_path(path, "path"),
                    format!("health check path \"{p}\" must start with / and hold no spaces"),
                );
                ok = false;
            }
        }
        let interval = raw.interval.map_or(Duration::from_secs(5), |d| d.0);
        let timeout = raw.timeout.map_or(Duration::from_secs(1), |d| d.0);
        if interval.is_zero() {
            self.error(&key_path(path, "interval"), "interval must be above zero");
            ok = false;
        }
        if timeout.is_zero() {
            self.error(&key_path(path, "timeout"), "timeout must be above zero");
            ok = false;
        }
        let expect_status = raw.expect_status.unwrap_or(200);
        if !(100..=599).contains(&expect_status) {
            self.error(
                &key_path(path, "expect_status"),
                "expect_status must be an HTTP status (100-599)",
            );
            ok = false;
        }
        let healthy_after = raw.healthy_after.unwrap_or(1);
        let unhealthy_after = raw.unhealthy_after.unwrap_or(2);
        for (key, n) in [
            ("healthy_after", healthy_after),
            ("unhealthy_after", unhealthy_after),
        ] {
            if n == 0 {
                self.error(&key_path(path, key), format!("{key} must be at least 1"));
                ok = false;
            }
        }
        if raw.host.is_some() && raw.path.is_none() {
            self.error(
                &key_path(path, "host"),
                "host applies only to HTTP checks (set path)",
            );
            ok = false;
        }
        ok.then_some(HealthCheckSettings {
            path: raw.path,
            host: raw.host,
            interval,
            timeout,
            expect_status,
            healthy_after,
            unhealthy_after,
        })
    }
}
