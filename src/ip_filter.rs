//! The IP filter (SPEC section 6.2), a route's `ip_filter` or the
//! top-level default. Joins `request_filter`, before CORS, the route's
//! `max_body`, rate limits and authentication. The client IP is the one
//! `forwarding` found: `X-Forwarded-For` counts only from a peer in
//! `server.trusted_proxies`, so a client cannot name its own address.
//! `deny` wins over `allow`; with `allow` set, every other address is
//! refused.

use std::net::IpAddr;

use http::StatusCode;
use ipnet::IpNet;

use crate::respond::Response;

#[derive(Debug, Default)]
pub struct IpFilter {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl IpFilter {
    /// `None` to admit `client`, else the 403.
    pub fn check(&self, client: Option<IpAddr>, request_id: &str) -> Option<Response> {
        let refuse = || {
            Some(Response::problem(
                StatusCode::FORBIDDEN,
                "this client address may not use this route",
                request_id,
            ))
        };
        // An IPv4 client on a dual-stack listener is matched as IPv4.
        let Some(ip) = client.map(|ip| ip.to_canonical()) else {
            return if self.allow.is_empty() {
                None
            } else {
                refuse()
            };
        };
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return refuse();
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&ip)) {
            return refuse();
        }
        None
    }
}

/// A CIDR or a single address (`/32` or `/128`).
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "\"{text}\" has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("\"{text}\" is not an IP address or CIDR"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(allow: &[&str], deny: &[&str]) -> IpFilter {
        IpFilter {
            allow: allow.iter().map(|n| parse_net(n).unwrap()).collect(),
            deny: deny.iter().map(|n| parse_net(n).unwrap()).collect(),
        }
    }

    fn admits(f: &IpFilter, ip: &str) -> bool {
        f.check(Some(ip.parse().unwrap()), "id").is_none()
    }

    #[test]
    fn deny_wins_and_allow_refuses_the_rest() {
        let f = filter(
            &["10.0.0.0/8", "2001:db8::/32", "192.168.1.7"],
            &["10.6.6.0/24"],
        );
        assert!(admits(&f, "10.1.2.3"));
        assert!(!admits(&f, "10.6.6.9"));
        assert!(admits(&f, "192.168.1.7"));
        assert!(!admits(&f, "192.168.1.8"));
        assert!(admits(&f, "2001:db8:5::1"));
        assert!(!admits(&f, "2001:db9::1"));
        assert!(admits(&f, "::ffff:10.1.2.3"), "IPv4-mapped is IPv4");
        assert!(f.check(None, "id").is_some());
        let deny_only = filter(&[], &["127.0.0.0/8"]);
        assert!(!admits(&deny_only, "127.0.0.1"));
        assert!(admits(&deny_only, "8.8.8.8"));
        assert!(parse_net("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(parse_net("10.0.0.300").is_err());
    }
}
