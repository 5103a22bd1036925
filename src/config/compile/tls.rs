//! A listener's `tls`: its certificates (loaded, checked and indexed by
//! name on every load, so a reload serves renewed files), and the settings
//! fixed at start (minimum version, client certificates).

use std::sync::Arc;

use pingora_core::tls::pkey::PKey;
use pingora_core::tls::ssl::SslVersion;

use super::*;
use crate::config::raw::RawTls;
use crate::config::source::index_path;
use crate::tls::tickets::TicketKeys;
use crate::tls::{now_unix, CertTable, Certificate, ClientCertMode, ListenerTls};

/// A certificate expiring sooner than this is a warning.
const EXPIRY_WARNING_SECS: i64 = 14 * 86_400;

impl Compiler<'_> {
    pub(super) fn listener_tls(
        &mut self,
        path: &str,
        raw: &RawTls,
    ) -> Option<(ListenerTls, Arc<CertTable>)> {
        let before = self.errors.0.len();
        let pairs: Vec<(String, &str, &str)> = match (&raw.cert, &raw.key, &raw.certificates) {
            (Some(cert), Some(key), None) => vec![(path.to_string(), cert, key)],
            (None, None, Some(list)) if !list.is_empty() => list
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let p = index_path(&key_path(path, "certificates"), i);
                    (p, c.cert.as_str(), c.key.as_str())
                })
                .collect(),
            _ => {
                self.error(
                    path,
                    "give cert and key, or certificates: [{ cert, key }, ...]",
                );
                return None;
            }
        };
        let mut certificates = Vec::new();
        for (cpath, cert, key) in pairs {
            if let Some(c) = self.certificate(&cpath, cert, key) {
                certificates.push(c);
            }
        }
        let min_version = match &raw.min_version {
            None => SslVersion::TLS1_2,
            Some(v) => match v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
                .as_str()
            {
                "1.2" => SslVersion::TLS1_2,
                "1.3" => SslVersion::TLS1_3,
                other => {
                    self.error(
                        &key_path(path, "min_version"),
                        format!("min_version \"{other}\": use \"1.2\" or \"1.3\" (TLS 1.0 and 1.1 are never offered)"),
                    );
                    SslVersion::TLS1_2
                }
            },
        };
        let client_cert = match raw.client_cert.as_deref() {
            None => ClientCertMode::Off,
            Some("optional") => ClientCertMode::Optional,
            Some("required") => ClientCertMode::Required,
            Some(other) => {
                self.error(
                    &key_path(path, "client_cert"),
                    format!("client_cert \"{other}\": use optional or required"),
                );
                ClientCertMode::Off
            }
        };
        let client_ca = match (&raw.client_ca, client_cert) {
            (Some(file), ClientCertMode::Optional | ClientCertMode::Required) => {
                let cpath = key_path(path, "client_ca");
                self.read_certificates(&cpath, file)
                    .map(|(resolved, certs)| {
                        use sha2::{Digest, Sha256};
                        let mut h = Sha256::new();
                        for c in &certs {
                            h.update(c.to_der().unwrap_or_default());
                        }
                        (resolved, h.finalize().into())
                    })
            }
            (Some(_), ClientCertMode::Off) => {
                self.error(
                    &key_path(path, "client_cert"),
                    "client_ca needs client_cert: optional or required",
                );
                None
            }
            (None, ClientCertMode::Off) => None,
            (None, _) => {
                self.error(
                    &key_path(path, "client_ca"),
                    "client_cert needs client_ca, the CA that signs client certificates",
                );
                None
            }
        };
        let ticket_keys = raw.ticket_keys.as_deref().and_then(|file| {
            let tpath = key_path(path, "ticket_keys");
            let (resolved, bytes) = self.read_file(&tpath, file)?;
            match TicketKeys::parse(&bytes) {
                Ok(keys) => Some(Arc::new(keys)),
                Err(e) => {
                    self.error(&tpath, format!("{}: {e}", resolved.display()));
                    None
                }
            }
        });
        if self.errors.0.len() > before {
            return None;
        }
        let mut table = match CertTable::new(certificates) {
            Ok(t) => t,
            Err(e) => {
                self.error(&key_path(path, "certificates"), e);
                return None;
            }
        };
        let settings = ListenerTls {
            min_version,
            client_cert,
            client_ca,
            ticket_keys: ticket_keys.is_some(),
        };
        table.ticket_keys = ticket_keys;
        Some((settings, Arc::new(table)))
    }

    /// One certificate: read, its key matched, its validity checked.
    fn certificate(&mut self, path: &str, cert: &str, key: &str) -> Option<Certificate> {
        let chain = self.read_certificates(&key_path(path, "cert"), cert);
        let kpath = key_path(path, "key");
        let key = self.read_file(&kpath, key).and_then(|(resolved, pem)| {
            // The key's content never appears in a message.
            match PKey::private_key_from_pem(&pem) {
                Ok(k) => Some(k),
                Err(_) => {
                    let message = format!("{} holds no PEM private key", resolved.display());
                    self.error(&kpath, message);
                    None
                }
            }
        });
        let ((resolved, chain), key) = (chain?, key?);
        let shown = resolved.display().to_string();
        let cert = match Certificate::new(chain, key) {
            Ok(c) => c,
            Err(e) => {
                self.error(&kpath, format!("{shown}: {e}"));
                return None;
            }
        };
        let left = cert.not_after - now_unix();
        if left <= 0 {
            self.error(&key_path(path, "cert"), format!("{shown} has expired"));
            return None;
        }
        if left < EXPIRY_WARNING_SECS {
            log::warn!("{path}.cert: {shown} expires in {} days", left / 86_400);
        }
        Some(cert)
    }
}
