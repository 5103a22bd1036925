//! Target names (SPEC section 7.3): a `host:port` target is every address
//! its name resolves to (A and AAAA), looked up when the configuration is
//! loaded and again every `resolve_interval` in the background, with
//! hickory-resolver against `server.resolver` (UDP, then TCP) or the
//! system's `/etc/resolv.conf`. Requests never wait on a lookup: they
//! read the upstream's current pool, which a changed answer replaces
//! (`Upstream::set_targets`: kept addresses keep their state, dropped ones
//! drain). A failed lookup keeps the last addresses and is counted.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;

use super::Upstream;

/// One `host:port` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetName {
    pub host: String,
    pub port: u16,
    pub weight: usize,
    /// What it resolved to when the file was loaded.
    pub loaded: Vec<SocketAddr>,
}

/// A name's latest addresses, by family: a lookup of one family that
/// fails keeps that family's last addresses (a passing AAAA timeout must
/// not drain every IPv6 target).
#[derive(Debug, Clone, Default)]
pub(crate) struct Addresses {
    v4: Vec<SocketAddr>,
    v6: Vec<SocketAddr>,
}

impl Addresses {
    pub fn of(addrs: &[SocketAddr]) -> Self {
        let (v6, v4) = addrs.iter().partition(|a| a.is_ipv6());
        Addresses { v4, v6 }
    }

    fn all(&self) -> impl Iterator<Item = &SocketAddr> {
        self.v4.iter().chain(&self.v6)
    }
}

/// The most addresses one name makes targets of: an answer listing more
/// (spoofed, or a misconfigured zone) cannot grow a pool without bound.
pub const MAX_ADDRESSES_PER_NAME: usize = 64;

/// Addresses no upstream is at: an answer holding one is ignored for it.
fn routable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

/// Why a lookup gave no address. The text is for logs.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("the resolver cannot be set up: {0}")]
    Setup(String),
    #[error("{0}")]
    Lookup(String),
    #[error("no A or AAAA record")]
    NoAddress,
}

/// A resolver: `server.resolver`, or the system's configuration.
pub struct Dns {
    resolver: TokioResolver,
}

/// Each lookup's wait for an answer, and its tries per server: a dead
/// server costs a refresh seconds, never a request anything.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
const LOOKUP_ATTEMPTS: usize = 2;

impl Dns {
    /// Built inside a tokio runtime (the one its lookups run on).
    pub fn new(server: Option<SocketAddr>) -> Result<Self, DnsError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = match server {
            Some(addr) => {
                let at = |mut c: ConnectionConfig| {
                    c.port = addr.port();
                    c
                };
                let connections = vec![at(ConnectionConfig::udp()), at(ConnectionConfig::tcp())];
                let server = NameServerConfig::new(addr.ip(), true, connections);
                let config = ResolverConfig::from_parts(None, Vec::new(), vec![server]);
                TokioResolver::builder_with_config(config, provider)
            }
            None => TokioResolver::builder(provider).map_err(|e| DnsError::Setup(e.to_string()))?,
        };
        let options = builder.options_mut();
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.timeout = LOOKUP_TIMEOUT;
        options.attempts = LOOKUP_ATTEMPTS;
        // Answers are asked anew at each interval, not served from a cache.
        options.cache_size = 0;
        let resolver = builder
            .build()
            .map_err(|e| DnsError::Setup(e.to_string()))?;
        Ok(Dns { resolver })
    }

    /// Every address of `host` with `port`, sorted (A before AAAA), at
    /// most `MAX_ADDRESSES_PER_NAME`.
    pub async fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DnsError> {
        let (v4, v6) = self.lookup_families(host, port).await;
        let mut addrs: Vec<SocketAddr> = Vec::new();
        let mut failure = None;
        for family in [v4, v6] {
            match family {
                Ok(found) => addrs.extend(found),
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            Some(e) if addrs.is_empty() => Err(e),
            _ if addrs.is_empty() => Err(DnsError::NoAddress),
            _ => {
                addrs.truncate(MAX_ADDRESSES_PER_NAME);
                Ok(addrs)
            }
        }
    }

    /// The A and the AAAA lookups, each on its own: an empty answer is no
    /// address (`Ok`), a failure is `Err`.
    async fn lookup_families(
        &self,
        host: &str,
        port: u16,
    ) -> (
        Result<Vec<SocketAddr>, DnsError>,
        Result<Vec<SocketAddr>, DnsError>,
    ) {
        let family =
            |found: Result<hickory_resolver::lookup::Lookup, hickory_resolver::net::NetError>| {
                match found {
                    Ok(lookup) => {
                        let mut addrs: Vec<SocketAddr> = lookup
                            .answers()
                            .iter()
                            .filter_map(|r| r.data.ip_addr())
                            .filter(|ip| routable(*ip))
                            .map(|ip| SocketAddr::new(ip, port))
                            .collect();
                        addrs.sort();
                        addrs.dedup();
                        Ok(addrs)
                    }
                    Err(e) if e.is_no_records_found() => Ok(Vec::new()),
                    Err(e) => Err(DnsError::Lookup(e.to_string())),
                }
            };
        let (v4, v6) = tokio::join!(
            self.resolver.ipv4_lookup(host),
            self.resolver.ipv6_lookup(host)
        );
        (family(v4), family(v6))
    }

    /// Brings `last` up to date for `host`: each family that answers
    /// replaces its addresses; one that fails keeps them. The error of a
    /// failure, for the caller to count; an answer with no address at all
    /// keeps everything and is a failure too.
    async fn refresh_name(
        &self,
        host: &str,
        port: u16,
        last: &mut Addresses,
    ) -> Result<(), DnsError> {
        let (v4, v6) = self.lookup_families(host, port).await;
        if matches!((&v4, &v6), (Ok(a), Ok(b)) if a.is_empty() && b.is_empty()) {
            return Err(DnsError::NoAddress);
        }
        let mut failure = Ok(());
        match v4 {
            Ok(addrs) => last.v4 = addrs,
            Err(e) => failure = Err(e),
        }
        match v6 {
            Ok(addrs) => last.v6 = addrs,
            Err(e) => failure = Err(e),
        }
        let keep_v6 =
            MAX_ADDRESSES_PER_NAME.saturating_sub(last.v4.len().min(MAX_ADDRESSES_PER_NAME));
        last.v4.truncate(MAX_ADDRESSES_PER_NAME);
        last.v6.truncate(keep_v6);
        failure
    }
}

/// `host:port` split; `[v6]:port` is an address, not a name.
pub fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty() && host.parse::<IpAddr>().is_err() && !host.starts_with('['))
        .then_some((host, port))
}

/// A lookup for loading a configuration (`-t`, start, reload): on a thread
/// of its own with its own runtime, so it works inside or outside one.
pub fn resolve_blocking(
    server: Option<SocketAddr>,
    address: &str,
) -> std::io::Result<Vec<SocketAddr>> {
    let Some((host, port)) = split_host_port(address) else {
        return Err(std::io::Error::other(format!(
            "\"{address}\" is not host:port"
        )));
    };
    let lookup = || -> Result<Vec<SocketAddr>, DnsError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DnsError::Setup(e.to_string()))?;
        runtime.block_on(async { Dns::new(server)?.lookup(host, port).await })
    };
    std::thread::scope(|s| s.spawn(lookup).join())
        .map_err(|_| std::io::Error::other("the lookup thread failed"))?
        .map_err(std::io::Error::other)
}

impl Upstream {
    /// The targets the names' latest addresses make, with the fixed ones:
    /// each address once, with the weight of the first target naming it.
    fn wanted(&self, resolved: &[Addresses]) -> Vec<(SocketAddr, usize)> {
        let mut out: Vec<(SocketAddr, usize)> = Vec::new();
        let named = self
            .names
            .iter()
            .zip(resolved)
            .flat_map(|(n, addrs)| addrs.all().map(|a| (*a, n.weight)));
        for (addr, weight) in self.fixed.iter().copied().chain(named) {
            if !out.iter().any(|(a, _)| *a == addr) {
                out.push((addr, weight));
            }
        }
        out
    }

    /// Looks every name up once: a changed answer replaces the pool; a
    /// failed one keeps the name's last addresses and is counted.
    pub async fn refresh(&self, dns: &Dns, failures: &IntCounterVec) {
        let mut latest = match self.resolved.lock() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        for (name, last) in self.names.iter().zip(latest.iter_mut()) {
            if let Err(e) = dns.refresh_name(&name.host, name.port, last).await {
                failures.with_label_values(&[&self.name]).inc();
                log::warn!(
                    "upstream {}: looking up {} failed ({e}); keeping {:?}",
                    self.name,
                    name.host,
                    last.all().collect::<Vec<_>>()
                );
            }
        }
        let wanted = self.wanted(&latest);
        match self.set_targets(&wanted) {
            Ok(true) => log::info!(
                "upstream {}: targets now {:?}",
                self.name,
                wanted.iter().map(|(a, _)| a).collect::<Vec<_>>()
            ),
            Ok(false) => {}
            Err(e) => log::warn!("upstream {}: {e}", self.name),
        }
        match self.resolved.lock() {
            Ok(mut r) => *r = latest,
            Err(poisoned) => *poisoned.into_inner() = latest,
        }
    }
}

/// Re-resolves `upstream`'s names every `resolve_interval` until `stop`.
pub async fn refresh_until(
    upstream: Arc<Upstream>,
    dns: Arc<Dns>,
    failures: IntCounterVec,
    stop: CancellationToken,
) {
    let refreshing = async {
        loop {
            tokio::time::sleep(upstream.resolve_interval).await;
            upstream.refresh(&dns, &failures).await;
        }
    };
    tokio::select! {
        () = stop.cancelled() => {}
        () = refreshing => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_told_from_addresses() {
        assert_eq!(
            split_host_port("users.internal:8080"),
            Some(("users.internal", 8080))
        );
        assert_eq!(split_host_port("10.0.0.1:80"), None);
        assert_eq!(split_host_port("[::1]:80"), None);
        assert_eq!(split_host_port("users"), None);
        assert_eq!(split_host_port("users:http"), None);
    }
}
