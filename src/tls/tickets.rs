//! Session-ticket keys (`ticket_keys`): one file of 80-byte keys in the
//! format of nginx's `ssl_session_ticket_key` (16 bytes of name, 32 of
//! HMAC-SHA256 key, 32 of AES-256-CBC key). The first key encrypts new
//! tickets, every key decrypts, so keys rotate by prepending; instances
//! sharing the file, and the process after an upgrade, resume each other's
//! sessions. The keys are read with the configuration, so a reload rotates
//! them.
//!
//! OpenSSL takes ticket keys through a C callback that rust-openssl does
//! not bind. The unsafe code is this file's `install` and `ticket_key`
//! only: the callback finds the keys through the context's ex_data slot
//! (the one process-wide item here, an index OpenSSL hands out once), and
//! touches only the buffers and contexts OpenSSL passes it.

use std::ffi::{c_int, c_uchar};
use std::sync::{Arc, OnceLock};

use openssl::ex_data::Index;
use openssl::ssl::{SslAcceptorBuilder, SslContext};
use openssl_sys as ffi;

/// One key: its name (sent with the ticket) and its two secrets.
struct TicketKey {
    name: [u8; 16],
    hmac: [u8; 32],
    aes: [u8; 32],
}

/// A file's keys, the first encrypting.
pub struct TicketKeys(Vec<TicketKey>);

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets are never printed; the count may be.
        write!(f, "TicketKeys({} keys)", self.0.len())
    }
}

pub const KEY_LEN: usize = 80;

impl TicketKeys {
    /// The keys of a file's bytes: one or more 80-byte keys.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(KEY_LEN) {
            return Err(format!(
                "holds {} bytes; a ticket-key file holds one or more {KEY_LEN}-byte keys (openssl rand 80 > FILE)",
                bytes.len()
            ));
        }
        let keys = bytes
            .chunks_exact(KEY_LEN)
            .map(|k| {
                let mut key = TicketKey {
                    name: [0; 16],
                    hmac: [0; 32],
                    aes: [0; 32],
                };
                key.name.copy_from_slice(&k[..16]);
                key.hmac.copy_from_slice(&k[16..48]);
                key.aes.copy_from_slice(&k[48..80]);
                key
            })
            .collect::<Vec<_>>();
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].iter().any(|k| k.name == key.name) {
                return Err(format!("keys {} has the name of an earlier key", i + 1));
            }
        }
        Ok(TicketKeys(keys))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Where a listener's callback finds the live keys.
pub type KeysLookup = Box<dyn Fn() -> Option<Arc<TicketKeys>> + Send + Sync>;

fn lookup_index() -> Option<Index<SslContext, KeysLookup>> {
    static INDEX: OnceLock<Option<Index<SslContext, KeysLookup>>> = OnceLock::new();
    *INDEX.get_or_init(|| SslContext::new_ex_index::<KeysLookup>().ok())
}

/// `SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB` of `ssl.h`, behind the
/// `SSL_CTX_set_tlsext_ticket_key_cb` macro.
const SET_TICKET_KEY_CB: c_int = 72;

/// Makes the acceptor encrypt and decrypt tickets with the keys `lookup`
/// returns at each handshake.
pub fn install(builder: &mut SslAcceptorBuilder, lookup: KeysLookup) -> Result<(), String> {
    let index = lookup_index().ok_or("OpenSSL gave no ex_data index")?;
    builder.set_ex_data(index, lookup);
    type Callback = unsafe extern "C" fn(
        *mut ffi::SSL,
        *mut c_uchar,
        *mut c_uchar,
        *mut ffi::EVP_CIPHER_CTX,
        *mut ffi::HMAC_CTX,
        c_int,
    ) -> c_int;
    let callback: Callback = ticket_key;
    // SAFETY: OpenSSL calls a ticket key callback with exactly this
    // signature; the cast to a generic function pointer is how
    // SSL_CTX_callback_ctrl takes every callback.
    let done = unsafe {
        let generic = std::mem::transmute::<Callback, unsafe extern "C" fn()>(callback);
        ffi::SSL_CTX_callback_ctrl__fixed_rust(builder.as_ptr(), SET_TICKET_KEY_CB, Some(generic))
    };
    if done == 1 {
        Ok(())
    } else {
        Err("OpenSSL refused the ticket key callback".into())
    }
}

/// OpenSSL's ticket key callback: `encrypt` 1 sets up a new ticket with
/// the first key (1: done, 0: issue none); 0 finds the key a ticket names
/// (0: unknown, a full handshake; 1: found; 2: found, and renew the ticket
/// under the first key). -1 is an error.
unsafe extern "C" fn ticket_key(
    ssl: *mut ffi::SSL,
    name: *mut c_uchar,
    iv: *mut c_uchar,
    cipher: *mut ffi::EVP_CIPHER_CTX,
    hmac: *mut ffi::HMAC_CTX,
    encrypt: c_int,
) -> c_int {
    // No panic may cross into C: everything below returns instead.
    let Some(index) = lookup_index() else {
        return -1;
    };
    // SAFETY: OpenSSL passes a live SSL; its context holds, at `index`,
    // the `KeysLookup` `install` stored (rust-openssl boxes ex_data).
    let lookup = unsafe {
        let ctx = ffi::SSL_get_SSL_CTX(ssl);
        let data = ffi::SSL_CTX_get_ex_data(ctx, index.as_raw()) as *const KeysLookup;
        match data.as_ref() {
            Some(lookup) => lookup,
            None => return -1,
        }
    };
    // No keys (cannot happen while ticket_keys is fixed at start, but a
    // missing table must not fail handshakes): issue no ticket, and treat
    // a presented one as unknown, a full handshake.
    let Some(keys) = lookup() else {
        return 0;
    };
    let Some(first) = keys.0.first() else {
        return 0;
    };
    // SAFETY: `name` is 16 bytes and `iv` EVP_MAX_IV_LENGTH (16) bytes,
    // both OpenSSL's buffers; the contexts are OpenSSL's, initialized here
    // with a 32-byte AES-256 key, a 16-byte IV and a 32-byte HMAC key.
    unsafe {
        if encrypt == 1 {
            if ffi::RAND_bytes(iv, 16) != 1 {
                return -1;
            }
            std::ptr::copy_nonoverlapping(first.name.as_ptr(), name, 16);
            let ok = ffi::EVP_EncryptInit_ex(
                cipher,
                ffi::EVP_aes_256_cbc(),
                std::ptr::null_mut(),
                first.aes.as_ptr(),
                iv,
            ) == 1
                && ffi::HMAC_Init_ex(
                    hmac,
                    first.hmac.as_ptr().cast(),
                    32,
                    ffi::EVP_sha256(),
                    std::ptr::null_mut(),
                ) == 1;
            return if ok { 1 } else { -1 };
        }
        let sent = std::slice::from_raw_parts(name, 16);
        let Some((i, key)) = keys.0.iter().enumerate().find(|(_, k)| k.name == sent) else {
            return 0;
        };
        let ok = ffi::HMAC_Init_ex(
            hmac,
            key.hmac.as_ptr().cast(),
            32,
            ffi::EVP_sha256(),
            std::ptr::null_mut(),
        ) == 1
            && ffi::EVP_DecryptInit_ex(
                cipher,
                ffi::EVP_aes_256_cbc(),
                std::ptr::null_mut(),
                key.aes.as_ptr(),
                iv,
            ) == 1;
        match (ok, i) {
            (false, _) => -1,
            (true, 0) => 1,
            (true, _) => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_hold_whole_keys_with_distinct_names() {
        assert!(TicketKeys::parse(&[]).is_err());
        assert!(TicketKeys::parse(&[1; 79]).is_err());
        assert_eq!(TicketKeys::parse(&[1; 80]).unwrap().len(), 1);
        let mut two = vec![1u8; 160];
        assert!(TicketKeys::parse(&two).is_err(), "same name twice");
        two[80] = 2;
        assert_eq!(TicketKeys::parse(&two).unwrap().len(), 2);
        let text = format!("{:?}", TicketKeys::parse(&two).unwrap());
        assert_eq!(text, "TicketKeys(2 keys)");
    }
}
