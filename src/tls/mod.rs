//! TLS at the door (SPEC 6.5, 6.6). Each TLS listener has an acceptor whose
//! settings are fixed at start (protocol versions, Mozilla's intermediate
//! suites, ALPN, client-certificate verification), and a certificate table
//! that lives in the runtime configuration: Pingora's TLS accept callback
//! (`TlsAccept`) picks the certificate by SNI from the table of the live
//! configuration, so a reload serves renewed files to new connections and
//! leaves open ones alone. After the handshake the same callback records a
//! verified client certificate on the connection, where `request` reads it.
//! Session-ticket keys (`tickets`) are read with the certificates. A leaf:
//! it knows nothing of routes.

pub mod tickets;

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use http::header::{HeaderName, HeaderValue};
use pingora_core::listeners::TlsAccept;
use pingora_core::protocols::tls::TlsRef;
use pingora_core::tls::ext;
use pingora_core::tls::hash::MessageDigest;
use pingora_core::tls::pkey::{PKey, Private};
use pingora_core::tls::ssl::{
    select_next_proto, AlpnError, NameType, SslAcceptor, SslMethod, SslVerifyMode, SslVersion,
};
use pingora_core::tls::x509::{X509NameRef, X509VerifyResult, X509};

pub const CLIENT_CERT_SUBJECT: HeaderName = HeaderName::from_static("x-client-cert-subject");
pub const CLIENT_CERT_SHA256: HeaderName = HeaderName::from_static("x-client-cert-sha256");

/// `client_cert` of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientCertMode {
    /// Not asked for.
    Off,
    /// Asked for; a connection without one (or with one that does not
    /// verify) is served, unverified.
    Optional,
    /// A handshake without a certificate signed by `client_ca` fails.
    Required,
}

/// What a TLS listener fixes at start: a change needs an upgrade.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTls {
    pub min_version: SslVersion,
    pub client_cert: ClientCertMode,
    /// The client CA file, already checked to hold certificates, and the
    /// SHA-256 of its content: an edited file is a change only an upgrade
    /// makes, and a reload says so.
    pub client_ca: Option<(std::path::PathBuf, [u8; 32])>,
    /// Whether tickets use `ticket_keys` (the keys themselves are read
    /// again on every reload).
    pub ticket_keys: bool,
}

/// One certificate with its chain and key, and the names it serves.
pub struct Certificate {
    /// The leaf first, then its chain.
    pub chain: Vec<X509>,
    pub key: PKey<Private>,
    /// SAN DNS names, lowercased; `*.example.com` for a wildcard.
    pub names: Vec<String>,
    /// The end of its validity, Unix seconds.
    pub not_after: i64,
}

impl Certificate {
    /// A certificate from its PEM chain and key; an error when the key is
    /// not the certificate's.
    pub fn new(chain: Vec<X509>, key: PKey<Private>) -> Result<Self, String> {
        let leaf = chain.first().ok_or("the file holds no certificate")?;
        let public = leaf.public_key().map_err(|e| e.to_string())?;
        if !public.public_eq(&key) {
            return Err("the key does not match the certificate".into());
        }
        let names = leaf
            .subject_alt_names()
            .map(|sans| {
                sans.iter()
                    .filter_map(|n| n.dnsname().map(str::to_ascii_lowercase))
                    .collect()
            })
            .unwrap_or_default();
        let not_after = unix_seconds(leaf.not_after()).ok_or("unreadable notAfter")?;
        Ok(Certificate {
            chain,
            key,
            names,
            not_after,
        })
    }

    /// The name the expiry metric labels it by: its first SAN, or `default`.
    pub fn label(&self) -> &str {
        self.names.first().map_or("default", String::as_str)
    }
}

/// Seconds since the epoch of an ASN.1 time.
fn unix_seconds(t: &openssl::asn1::Asn1TimeRef) -> Option<i64> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).ok()?;
    let d = epoch.diff(t).ok()?;
    Some(i64::from(d.days) * 86_400 + i64::from(d.secs))
}

/// Now, in Unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A listener's certificates by name: exact names, then one-label
/// wildcards, then the first certificate.
pub struct CertTable {
    pub certificates: Vec<Certificate>,
    by_name: HashMap<String, usize>,
    /// The listener's `ticket_keys`, when it has them.
    pub ticket_keys: Option<Arc<tickets::TicketKeys>>,
}

impl std::fmt::Debug for CertTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are never printed.
        let names: Vec<&str> = self.certificates.iter().map(Certificate::label).collect();
        f.debug_struct("CertTable")
            .field("certificates", &names)
            .finish()
    }
}

impl CertTable {
    /// The table; an error names a DNS name two certificates claim.
    pub fn new(certificates: Vec<Certificate>) -> Result<Self, String> {
        let mut by_name = HashMap::new();
        for (i, cert) in certificates.iter().enumerate() {
            for name in &cert.names {
                if let Some(first) = by_name.insert(name.clone(), i) {
                    if first != i {
                        return Err(format!(
                            "certificates {} and {} both claim {name}",
                            first + 1,
                            i + 1
                        ));
                    }
                }
            }
        }
        if certificates.is_empty() {
            return Err("no certificate".into());
        }
        Ok(CertTable {
            certificates,
            by_name,
            ticket_keys: None,
        })
    }

    /// The certificate for a client's SNI.
    pub fn select(&self, sni: Option<&str>) -> &Certificate {
        let found = sni.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            self.by_name.get(&name).copied().or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.by_name.get(&format!("*.{parent}")).copied()
            })
        });
        &self.certificates[found.unwrap_or(0)]
    }
}

/// A verified client certificate, as the upstream is told of it.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub subject: HeaderValue,
    pub sha256: HeaderValue,
}

impl ClientCert {
    fn of(cert: &X509) -> Option<Self> {
        let digest = cert.digest(MessageDigest::sha256()).ok()?;
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Some(ClientCert {
            subject: HeaderValue::from_str(&rfc4514(cert.subject_name())?).ok()?,
            sha256: HeaderValue::from_str(&hex).ok()?,
        })
    }

    /// Sets the two headers upstream (the client's own are removed by the
    /// caller beforehand).
    pub fn headers(&self) -> [(HeaderName, HeaderValue); 2] {
        [
            (CLIENT_CERT_SUBJECT, self.subject.clone()),
            (CLIENT_CERT_SHA256, self.sha256.clone()),
        ]
    }
}

/// A name in RFC 4514 form: the last RDN first, `SHORT=value`, the
/// attributes of one multi-valued RDN joined by `+`, with the special
/// characters escaped.
fn rfc4514(name: &X509NameRef) -> Option<String> {
    let mut attributes: Vec<String> = Vec::new();
    for entry in name.entries() {
        let nid = entry.object().nid();
        let key = nid
            .short_name()
            .map(str::to_string)
            .unwrap_or_else(|_| entry.object().to_string());
        // A value that cannot be read would change who the subject names:
        // then no subject at all.
        let value = escape_rfc4514(&entry.data().to_string().ok()?);
        attributes.push(format!("{key}={value}"));
    }
    // The entries come in the DER's order; its SETs say which share an RDN.
    let sizes = rdn_sizes(&name.to_der().ok()?)?;
    if sizes.iter().sum::<usize>() != attributes.len() {
        return None;
    }
    let mut rest = attributes.as_slice();
    let mut rdns: Vec<String> = Vec::with_capacity(sizes.len());
    for size in sizes {
        let (rdn, after) = rest.split_at(size);
        rdns.push(rdn.join("+"));
        rest = after;
    }
    rdns.reverse();
    Some(rdns.join(","))
}

/// One DER element at the start of `der`: its tag, its contents, and what
/// follows it.
fn der_element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 3 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |l, b| (l << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The number of attributes of each RDN of a DER `Name` (a SEQUENCE of
/// SETs of SEQUENCEs), in order.
fn rdn_sizes(der: &[u8]) -> Option<Vec<usize>> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    let (tag, mut sets, rest) = der_element(der)?;
    if tag != SEQUENCE || !rest.is_empty() {
        return None;
    }
    let mut sizes = Vec::new();
    while !sets.is_empty() {
        let (tag, mut attributes, after) = der_element(sets)?;
        if tag != SET {
            return None;
        }
        let mut count = 0;
        while !attributes.is_empty() {
            let (tag, _, after) = der_element(attributes)?;
            if tag != SEQUENCE {
                return None;
            }
            count += 1;
            attributes = after;
        }
        sizes.push(count);
        sets = after;
    }
    Some(sizes)
}

fn escape_rfc4514(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
            out.push(c);
        } else if c.is_control() {
            // Never a raw control character in a header.
            for b in c.to_string().bytes() {
                out.push_str(&format!("\\{b:02x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The acceptor of a TLS listener. `client_ca` holds the CA certificates
/// when client certificates are asked for.
pub fn acceptor(
    settings: &ListenerTls,
    client_ca: &[X509],
    ticket_keys: Option<tickets::KeysLookup>,
) -> Result<SslAcceptor, String> {
    let mut b =
        SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(|e| e.to_string())?;
    b.set_min_proto_version(Some(settings.min_version))
        .map_err(|e| e.to_string())?;
    // HTTP/2 preferred. A client offering ALPN without either protocol is
    // refused with `no_application_protocol` (RFC 7301), not served HTTP/1.1.
    b.set_alpn_select_callback(|_, offered| {
        select_next_proto(b"\x02h2\x08http/1.1", offered).ok_or(AlpnError::ALERT_FATAL)
    });
    // A resumed session skips the certificate request and keeps the
    // verification it had: it may resume only where the same clients would
    // verify. The context is the client-certificate mode and CAs, so a
    // session (or shared ticket) from a listener or instance that verifies
    // otherwise starts a full handshake instead.
    b.set_session_id_context(&session_context(settings.client_cert, client_ca))
        .map_err(|e| e.to_string())?;
    if settings.client_cert != ClientCertMode::Off {
        for ca in client_ca {
            b.cert_store_mut()
                .add_cert(ca.clone())
                .map_err(|e| e.to_string())?;
            b.add_client_ca(ca).map_err(|e| e.to_string())?;
        }
    }
    if let Some(lookup) = ticket_keys {
        tickets::install(&mut b, lookup)?;
    }
    match settings.client_cert {
        ClientCertMode::Off => {}
        // As nginx's `optional`: the handshake goes on whatever the
        // verification found; the result is read after it, and only a
        // certificate that verified counts.
        ClientCertMode::Optional => b.set_verify_callback(SslVerifyMode::PEER, |_, _| true),
        ClientCertMode::Required => {
            b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT)
        }
    }
    Ok(b.build())
}

/// SHA-256 of what decides whether a client verifies here: 32 bytes,
/// OpenSSL's limit for a session id context.
fn session_context(mode: ClientCertMode, client_ca: &[X509]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"gatehouse client certificates:");
    h.update([mode as u8]);
    if mode != ClientCertMode::Off {
        for ca in client_ca {
            let der = ca.to_der().unwrap_or_default();
            h.update((der.len() as u64).to_be_bytes());
            h.update(&der);
        }
    }
    h.finalize().into()
}

/// A listener's certificate table (and ticket keys) as of now: the live
/// configuration's, read at each handshake.
pub struct LiveTable {
    pub lookup: Box<dyn Fn() -> Option<Arc<CertTable>> + Send + Sync>,
    /// The table the process started with: a reload that drops or moves
    /// this listener (a change only an upgrade makes) leaves it serving.
    pub initial: Arc<CertTable>,
}

impl LiveTable {
    pub fn current(&self) -> Arc<CertTable> {
        (self.lookup)().unwrap_or_else(|| Arc::clone(&self.initial))
    }
}

/// The TLS accept callbacks of one listener.
pub struct Handshake {
    pub table: Arc<LiveTable>,
    pub verifies_clients: bool,
}

#[async_trait]
impl TlsAccept for Handshake {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let table = self.table.current();
        let cert = table.select(ssl.servername(NameType::HOST_NAME));
        // A failure leaves the handshake without a certificate: it fails.
        let mut ok = ext::ssl_use_certificate(ssl, &cert.chain[0]).is_ok()
            && ext::ssl_use_private_key(ssl, &cert.key).is_ok();
        for extra in &cert.chain[1..] {
            ok = ok && ext::ssl_add_chain_cert(ssl, extra).is_ok();
        }
        if !ok {
            log::warn!("TLS: could not use the certificate for {}", cert.label());
        }
    }

    async fn handshake_complete_callback(
        &self,
        ssl: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        if !self.verifies_clients {
            return None;
        }
        let peer = ssl.peer_certificate()?;
        if ssl.verify_result() != X509VerifyResult::OK {
            return None;
        }
        Some(Arc::new(ClientCert::of(&peer)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_escaped_as_rfc_4514_says() {
        assert_eq!(escape_rfc4514("Acme, Inc."), "Acme\\, Inc.");
        assert_eq!(escape_rfc4514("#1 "), "\\#1\\ ");
        assert_eq!(escape_rfc4514("a+b=c"), "a\\+b=c");
        assert_eq!(escape_rfc4514("x\ny"), "x\\0ay");
    }

    #[test]
    fn a_multi_valued_rdn_is_joined_with_plus() {
        // Name: SET{CN=a, OU=b}, SET{O=c}; as a subject, the last RDN first.
        let attribute = |oid: &[u8], value: &[u8]| {
            let mut inner = vec![0x06, oid.len() as u8];
            inner.extend_from_slice(oid);
            inner.extend_from_slice(&[0x0c, value.len() as u8]);
            inner.extend_from_slice(value);
            let mut seq = vec![0x30, inner.len() as u8];
            seq.extend(inner);
            seq
        };
        let set = |attrs: Vec<Vec<u8>>| {
            let body: Vec<u8> = attrs.concat();
            let mut out = vec![0x31, body.len() as u8];
            out.extend(body);
            out
        };
        let (cn, ou, o) = (
            &[0x55, 0x04, 0x03][..],
            &[0x55, 0x04, 0x0b][..],
            &[0x55, 0x04, 0x0a][..],
        );
        let sets = [
            set(vec![attribute(cn, b"a"), attribute(ou, b"b")]),
            set(vec![attribute(o, b"c")]),
        ]
        .concat();
        let mut der = vec![0x30, sets.len() as u8];
        der.extend(sets);
        assert_eq!(rdn_sizes(&der), Some(vec![2, 1]));
        let name = openssl::x509::X509Name::from_der(&der).unwrap();
        assert_eq!(rfc4514(&name).as_deref(), Some("O=c,CN=a+OU=b"));
        // Single-valued RDNs, as most certificates have them.
        let mut simple = openssl::x509::X509NameBuilder::new().unwrap();
        simple.append_entry_by_text("O", "Acme, Inc.").unwrap();
        simple.append_entry_by_text("CN", "client-1").unwrap();
        assert_eq!(
            rfc4514(&simple.build()).as_deref(),
            Some("CN=client-1,O=Acme\\, Inc.")
        );
        assert_eq!(rdn_sizes(&[0x30, 0x05, 0x31]), None, "a truncated name");
    }
}
