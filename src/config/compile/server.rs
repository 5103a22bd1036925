//! `server`, `listen`, `admin` and `access_log`: the parts a reload
//! cannot change (see `reload`).

use std::net::SocketAddr;

use ipnet::IpNet;
use serde_json::Value;

use super::*;
use crate::access_log::Sink;
use crate::config::raw::*;
use crate::config::source::{index_path, key_path};
use crate::config::{AdminSettings, Listener, ServerSettings};

/// Each TLS listener's certificate table.
pub(super) type Certificates = Vec<(std::net::SocketAddr, std::sync::Arc<crate::tls::CertTable>)>;

impl Compiler<'_> {
    /// `access_log: stdout | off | PATH` (default stdout).
    /// `tracing`: an `http://` or `https://` collector URL, a share, a service name.
    pub(super) fn tracing(&mut self, value: Option<&Value>) -> Option<crate::trace::TraceSettings> {
        let value = value.filter(|v| !v.is_null())?;
        let raw = self.de::<crate::config::raw::RawTracing>("tracing", value)?;
        let errors_before = self.errors.0.len();
        match raw.otlp.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
            // Not echoed: a collector URL may carry credentials.
            _ => self.error(
                "tracing.otlp",
                "this is not an http:// or https:// URL, like http://127.0.0.1:4318/v1/traces",
            ),
        }
        let sample = raw.sample.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample) {
            self.error("tracing.sample", "sample is a share from 0 to 1, like 0.1");
        }
        let service_name = raw.service_name.unwrap_or_else(|| "gatehouse".to_string());
        if service_name.trim().is_empty() {
            self.error("tracing.service_name", "service_name must not be empty");
        }
        (self.errors.0.len() == errors_before).then_some(crate::trace::TraceSettings {
            otlp: raw.otlp,
            sample,
            service_name,
        })
    }

    pub(super) fn access_log(&mut self, value: Option<&Value>) -> Sink {
        match value {
            None | Some(Value::Null) => Sink::Stdout,
            Some(Value::String(s)) if s == "stdout" => Sink::Stdout,
            Some(Value::String(s)) if s == "off" => Sink::Off,
            Some(Value::Bool(false)) => Sink::Off,
            Some(Value::String(s)) if !s.is_empty() => Sink::File(self.resolve_file(s)),
            Some(_) => {
                self.error("access_log", "access_log is stdout, off, or a file path");
                Sink::Off
            }
        }
    }

    pub(super) fn server(&mut self, value: Option<&Value>) -> ServerSettings {
        let mut s = ServerSettings::default();
        let Some(value) = value.filter(|v| !v.is_null()) else {
            return s;
        };
        let Some(raw) = self.de::<RawServer>("server", value) else {
            return s;
        };
        if let Some(t) = raw.threads {
            if t == 0 || t > 1024 {
                self.error("server.threads", "threads must be between 1 and 1024");
            } else {
                s.threads = t;
            }
        }
        if let Some(p) = raw.pid_file {
            s.pid_file = self.resolve_file(&p).display().to_string();
        }
        if let Some(p) = raw.upgrade_sock {
            s.upgrade_sock = self.resolve_file(&p).display().to_string();
        }
        if let Some(d) = raw.grace_period {
            s.grace_period = d.0;
        }
        if let Some(d) = raw.graceful_shutdown_timeout {
            s.graceful_shutdown_timeout = d.0;
        }
        if let Some(b) = raw.max_body {
            s.max_body = b.0;
        }
        if let Some(d) = raw.header_timeout {
            if d.0.is_zero() {
                self.error("server.header_timeout", "header_timeout must be above zero");
            }
            s.header_timeout = d.0;
        }
        if let Some(d) = raw.body_timeout {
            if d.0.is_zero() {
                self.error("server.body_timeout", "body_timeout must be above zero");
            }
            s.body_timeout = d.0;
        }
        if let Some(b) = raw.max_buffered {
            if b.0 < 1 << 20 {
                self.error("server.max_buffered", "max_buffered must be at least 1MiB");
            } else {
                s.max_buffered = b.0;
            }
        }
        match raw.path_params.as_deref() {
            None | Some("reject") => {}
            Some("keep") => s.path_params = crate::config::PathParams::Keep,
            Some(other) => self.error(
                "server.path_params",
                format!("unknown path_params \"{other}\"; use reject or keep"),
            ),
        }
        if let Some(b) = raw.max_header_size {
            if !(1024..=1 << 20).contains(&b.0) {
                self.error(
                    "server.max_header_size",
                    "max_header_size must be between 1KiB and 1MiB",
                );
            } else {
                s.max_header_size = b.0 as usize;
            }
        }
        if let Some(n) = raw.max_headers {
            if !(1..=250).contains(&n) {
                self.error(
                    "server.max_headers",
                    "max_headers must be between 1 and 250",
                );
            } else {
                s.max_headers = n;
            }
        }
        for (i, cidr) in raw.trusted_proxies.iter().enumerate() {
            let parsed = cidr
                .parse::<IpNet>()
                .or_else(|_| cidr.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => s.trusted_proxies.push(net),
                Err(_) => self.error(
                    &index_path("server.trusted_proxies", i),
                    format!("\"{cidr}\" is not an IP address or CIDR range like 10.0.0.0/8"),
                ),
            }
        }
        if let Some(d) = raw.keepalive_timeout {
            s.keepalive_timeout = d.0;
        }
        if let Some(n) = raw.upstream_keepalive_pool_size {
            s.upstream_keepalive_pool_size = n;
        }
        if let Some(w) = raw.work_stealing {
            s.work_stealing = w;
        }
        if let Some(m) = raw.metrics {
            s.metrics = m;
        }
        if let Some(m) = raw.max_transform_size {
            if m.0 > 64 << 20 {
                self.error(
                    "server.max_transform_size",
                    "max_transform_size must be at most 64MiB",
                );
            } else {
                s.max_transform_size = m.0 as usize;
            }
        }
        // A body under a rule holds itself and what it becomes.
        if 2 * s.max_transform_size as u64 > s.max_buffered {
            let at = if raw.max_buffered.is_some() {
                "server.max_buffered"
            } else {
                "server.max_transform_size"
            };
            self.error(
                at,
                format!(
                    "max_buffered ({} bytes) must hold twice max_transform_size ({} bytes)",
                    s.max_buffered, s.max_transform_size
                ),
            );
        }
        s.error_log = raw
            .error_log
            .map(|p| self.resolve_file(&p).display().to_string());
        s.user = raw.user;
        s.group = raw.group;
        if let Some(r) = &raw.resolver {
            let addr = r.parse::<SocketAddr>().or_else(|_| {
                r.parse::<std::net::IpAddr>()
                    .map(|ip| SocketAddr::new(ip, 53))
            });
            match addr {
                Ok(a) => s.resolver = Some(a),
                Err(_) => self.error(
                    "server.resolver",
                    format!("\"{r}\" is not a DNS server address, like 127.0.0.1:53"),
                ),
            }
        }
        self.resolver = s.resolver;
        s
    }

    /// The listeners, and each TLS listener's certificates.
    pub(super) fn listeners(&mut self, value: Option<&Value>) -> (Vec<Listener>, Certificates) {
        let mut out: Vec<Listener> = Vec::new();
        let mut certificates = Vec::new();
        let items = match value {
            None | Some(Value::Null) => {
                self.error(
                    "listen",
                    "listen must name at least one address, like 0.0.0.0:8080",
                );
                return (out, certificates);
            }
            Some(Value::Array(items)) => items.as_slice(),
            Some(one @ Value::String(_)) => std::slice::from_ref(one),
            Some(_) => {
                self.error("listen", "listen must be a list of addresses");
                return (out, certificates);
            }
        };
        if items.is_empty() {
            self.error(
                "listen",
                "listen must name at least one address, like 0.0.0.0:8080",
            );
        }
        for (i, item) in items.iter().enumerate() {
            let path = if matches!(value, Some(Value::Array(_))) {
                index_path("listen", i)
            } else {
                "listen".to_string()
            };
            let (address, tls) = match item {
                Value::String(s) => (s.clone(), None),
                _ => match self.de::<RawListenTls>(&path, item) {
                    Some(raw) => (raw.address, raw.tls),
                    None => continue,
                },
            };
            let Some(addr) = self.socket_addr(&path, &address) else {
                continue;
            };
            if out.iter().any(|l| l.addr == addr) {
                self.error(&path, format!("{addr} is listed twice"));
                continue;
            }
            let tls = tls.and_then(|t| self.listener_tls(&key_path(&path, "tls"), &t));
            let tls = tls.map(|(settings, table)| {
                certificates.push((addr, table));
                settings
            });
            out.push(Listener { addr, tls });
        }
        (out, certificates)
    }

    pub(super) fn socket_addr(&mut self, path: &str, address: &str) -> Option<SocketAddr> {
        match address.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    path,
                    format!("\"{address}\" is not an address like 0.0.0.0:8080 or [::1]:8080"),
                );
                None
            }
        }
    }

    /// The PEM certificates of the file named at `path` (one at least).
    pub(super) fn read_certificates(
        &mut self,
        path: &str,
        file: &str,
    ) -> Option<(PathBuf, Vec<pingora_core::tls::x509::X509>)> {
        let (resolved, pem) = self.read_file(path, file)?;
        match pingora_core::tls::x509::X509::stack_from_pem(&pem) {
            Ok(certs) if !certs.is_empty() => Some((resolved, certs)),
            _ => {
                let message = format!("{} holds no PEM certificate", resolved.display());
                self.error(path, message);
                None
            }
        }
    }

    pub(super) fn admin(
        &mut self,
        value: Option<&Value>,
        listeners: &[Listener],
    ) -> Option<AdminSettings> {
        let value = value.filter(|v| !v.is_null())?;
        let raw = self.de::<RawAdmin>("admin", value)?;
        let listen = self.socket_addr("admin.listen", &raw.listen)?;
        if listeners.iter().any(|l| l.addr.port() == listen.port()) {
            self.error(
                "admin.listen",
                format!(
                    "the admin listener must not share port {} with a public listener",
                    listen.port()
                ),
            );
            return None;
        }
        let token = match &raw.token {
            None => None,
            Some(Value::String(t)) => crate::config::AdminToken::new(t)
                .map_err(|e| self.error("admin.token", e))
                .ok(),
            // Never echoed: it is a secret, whatever YAML made of it.
            Some(_) => {
                self.error(
                    "admin.token",
                    "the admin token must be text: quote it, like token: \"${ADMIN_TOKEN}\"",
                );
                None
            }
        };
        if raw.token.is_none() && !listen.ip().is_loopback() && raw.insecure != Some(true) {
            self.error(
                "admin.listen",
                format!(
                    "the admin listener {listen} is reachable from other machines: set admin.token (or admin.insecure: true to serve it open on purpose)"
                ),
            );
            return None;
        }
        if raw.token.is_some() && raw.insecure == Some(true) {
            self.error("admin.insecure", "insecure applies only without a token");
        }
        Some(AdminSettings { listen, token })
    }
}
