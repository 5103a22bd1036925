//! `auth.api_keys`: API key providers, each with its keys file read on
//! every load (so a reload picks up an edited file, and `-t` checks it).
//! Nothing is carried between loads: a provider holds no state but its file.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::header::HeaderName;
use serde_json::Value;

use super::*;
use crate::auth::api_key::{parse_keys_file, ApiKeys, KeySource};
use crate::config::raw::RawApiKeys;
use crate::config::source::{index_path, Document};

impl Compiler<'_> {
    pub(super) fn api_key_providers(
        &mut self,
        raw: &BTreeMap<String, Value>,
        jwt_names: &[String],
    ) -> BTreeMap<String, Arc<ApiKeys>> {
        let mut out = BTreeMap::new();
        for (name, item) in raw {
            let path = key_path("auth.api_keys", name);
            if !self.check_name(&path, "provider", name) {
                continue;
            }
            if jwt_names.contains(name) {
                self.error(
                    &path,
                    format!("\"{name}\" is also an auth.jwt provider; JWT and API key providers share one namespace"),
                );
                continue;
            }
            let Some(raw) = self.de::<RawApiKeys>(&path, item) else {
                continue;
            };
            if let Some(keys) = self.api_keys(&path, name, raw) {
                out.insert(name.clone(), Arc::new(keys));
            }
        }
        out
    }

    fn api_keys(&mut self, path: &str, name: &str, raw: RawApiKeys) -> Option<ApiKeys> {
        let before = self.errors.0.len();
        let from = match KeySource::parse(&raw.from) {
            Ok(KeySource::Header(h)) if super::providers::is_reserved(&h) => {
                self.error(
                    &key_path(path, "from"),
                    format!("{h} cannot carry an API key"),
                );
                None
            }
            Ok(from) => Some(from),
            Err(e) => {
                self.error(&key_path(path, "from"), e);
                None
            }
        };
        let forward_consumer = raw.forward_consumer.as_deref().and_then(|header| {
            let fpath = key_path(path, "forward_consumer");
            match HeaderName::from_bytes(header.as_bytes()) {
                Ok(h) if super::providers::is_reserved(&h) => {
                    self.error(&fpath, format!("{h} cannot carry the consumer"));
                    None
                }
                Ok(h) if matches!(&from, Some(KeySource::Header(k)) if *k == h) => {
                    self.error(&fpath, "the consumer cannot replace the key's own header");
                    None
                }
                Ok(h) => Some(h),
                Err(_) => {
                    self.error(&fpath, format!("\"{header}\" is not a valid header name"));
                    None
                }
            }
        });
        let entries = self.keys_file(&key_path(path, "keys_file"), &raw.keys_file);
        if self.errors.0.len() > before {
            return None;
        }
        Some(ApiKeys::new(
            name.to_string(),
            from?,
            forward_consumer,
            entries?,
        ))
    }

    /// The consumers of a keys file; its mistakes are errors at `path`,
    /// each naming the entry and its line in the file.
    fn keys_file(
        &mut self,
        path: &str,
        file: &str,
    ) -> Option<Vec<([u8; 32], crate::auth::api_key::Consumer)>> {
        let (resolved, bytes) = self.read_file(path, file)?;
        let shown = resolved.display().to_string();
        let Ok(text) = String::from_utf8(bytes) else {
            self.error(path, format!("{shown} is not UTF-8 text"));
            return None;
        };
        // No `${NAME}` in a keys file: it holds digests, not settings.
        let doc = match Document::parse(&text, &|_| None) {
            Ok(doc) => doc,
            Err(errors) => {
                for e in errors {
                    let at = e
                        .position
                        .map_or(String::new(), |p| format!(" line {}", p.line));
                    self.error(path, format!("{shown}{at}: {}", e.message));
                }
                return None;
            }
        };
        let line = |i: usize| doc.position(&index_path("", i)).map(|p| p.line);
        match parse_keys_file(&doc.root, &line) {
            Ok(entries) => Some(entries),
            Err(errors) => {
                for e in errors {
                    self.error(path, format!("{shown}: {e}"));
                }
                None
            }
        }
    }
}
