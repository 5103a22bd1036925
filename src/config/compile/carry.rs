//! Carrying state over a reload: what was built from configuration that
//! did not change is kept, with its state (see `gateway::Carried`); the
//! one rule for upstreams, providers and rate limits.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use super::Compiler;
use crate::auth::Provider;
use crate::config::source::key_path;
use crate::gateway::{Carried, Carry};
use crate::ratelimit::RateLimit;
use crate::upstream::Upstream;

/// What a reload may carry over, and where `Carried` keeps it.
pub(super) trait Carriable: Sized {
    fn table(carried: &Carried) -> &Carry<Self>;
    fn table_mut(carried: &mut Carried) -> &mut Carry<Self>;
    /// Whether the next reload may keep this one.
    fn carries(&self) -> bool {
        true
    }
}

impl Carriable for Upstream {
    fn table(carried: &Carried) -> &Carry<Self> {
        &carried.upstreams
    }
    fn table_mut(carried: &mut Carried) -> &mut Carry<Self> {
        &mut carried.upstreams
    }
}

impl Carriable for Provider {
    fn table(carried: &Carried) -> &Carry<Self> {
        &carried.providers
    }
    fn table_mut(carried: &mut Carried) -> &mut Carry<Self> {
        &mut carried.providers
    }
    /// A provider reading key files reads them again on every reload (they
    /// may have changed with the configuration unchanged); one fetching a
    /// JWK set keeps its keys and verified tokens.
    fn carries(&self) -> bool {
        self.remote_jwks().is_some()
    }
}

impl Carriable for crate::cluster::Cluster {
    fn table(carried: &Carried) -> &Carry<Self> {
        &carried.clusters
    }
    fn table_mut(carried: &mut Carried) -> &mut Carry<Self> {
        &mut carried.clusters
    }
}

impl Carriable for RateLimit {
    fn table(carried: &Carried) -> &Carry<Self> {
        &carried.rate_limits
    }
    fn table_mut(carried: &mut Carried) -> &mut Carry<Self> {
        &mut carried.rate_limits
    }
}

impl Compiler<'_> {
    /// The item the running configuration built from the same `source`
    /// under `name`, with its state; else the one `build` makes. Either is
    /// kept for the next reload.
    /// Each item of a named section (`section.NAME`), its name checked,
    /// carried over or built by `build(cx, path, name, item)`.
    pub(super) fn carry_each<'v, T: Carriable>(
        &mut self,
        section: &str,
        kind: &str,
        items: impl IntoIterator<Item = (&'v String, &'v Value)>,
        mut build: impl FnMut(&mut Self, &str, &str, &Value) -> Option<T>,
    ) -> BTreeMap<String, Arc<T>> {
        let mut out = BTreeMap::new();
        for (name, item) in items {
            let path = key_path(section, name);
            if !self.check_name(&path, kind, name) {
                continue;
            }
            if let Some(built) = self.carry(name, item, |cx| build(cx, &path, name, item)) {
                out.insert(name.clone(), built);
            }
        }
        out
    }

    pub(super) fn carry<T: Carriable>(
        &mut self,
        name: &str,
        source: &Value,
        build: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<Arc<T>> {
        let old = self.previous.and_then(|p| T::table(p).get(name, source));
        let item = match old {
            Some(old) => Arc::clone(old),
            None => Arc::new(build(self)?),
        };
        if item.carries() {
            T::table_mut(&mut self.carried).keep(name, source, &item);
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use crate::config::{compile::system_resolve, compile_text, Config};

    const FILE: &str = "listen: [127.0.0.1:8080]
upstreams:
  users: { targets: [127.0.0.1:9001] }
  orders: { targets: [127.0.0.1:9002] }
auth:
  jwt:
    remote: { algorithms: [RS256], jwks_url: 'http://127.0.0.1:9/keys' }
    local: { algorithms: [HS256], secret: a-secret-that-is-long-enough-to-pass-32 }
routes:
  - name: a
    match: { path_prefix: /a }
    upstream: users
    rate_limit: { requests: 5, per: 1m }
  - name: b
    match: { path_prefix: /b }
    upstream: orders
    rate_limit: { requests: 5, per: 1m }
";

    fn load(text: &str, previous: Option<&Config>) -> Config {
        let env = |_: &str| None;
        let previous = previous.map(|c| &c.runtime);
        match compile_text(text, Path::new("."), &env, previous, &system_resolve) {
            Ok(config) => config,
            Err(e) => panic!("{e}"),
        }
    }

    fn limit<'a>(config: &'a Config, route: &str) -> &'a Arc<crate::ratelimit::RateLimit> {
        let routes = config.runtime.router.routes();
        let found = routes.iter().find(|r| &*r.name == route).unwrap();
        found.rate_limit.as_ref().unwrap()
    }

    #[test]
    fn what_did_not_change_is_carried_with_its_state() {
        let first = load(FILE, None);
        // Only the values count, not how the YAML spells them.
        let reordered = FILE.replace(
            "users: { targets: [127.0.0.1:9001] }",
            "users:\n    targets: ['127.0.0.1:9001']",
        );
        let second = load(&reordered, Some(&first));
        let (up1, up2) = (&first.runtime.upstreams, &second.runtime.upstreams);
        assert!(Arc::ptr_eq(&up1["users"], &up2["users"]));
        assert!(Arc::ptr_eq(&up1["orders"], &up2["orders"]));
        let (p1, p2) = (&first.runtime.providers, &second.runtime.providers);
        assert!(Arc::ptr_eq(&p1["remote"], &p2["remote"]));
        // Key files and secrets are read again on every reload.
        assert!(!Arc::ptr_eq(&p1["local"], &p2["local"]));
        assert!(Arc::ptr_eq(limit(&first, "a"), limit(&second, "a")));

        let changed = reordered
            .replace("127.0.0.1:9002", "127.0.0.1:9003")
            .replace(
                "requests: 5, per: 1m }\n  - name: b",
                "requests: 6, per: 1m }\n  - name: b",
            );
        let third = load(&changed, Some(&second));
        let up3 = &third.runtime.upstreams;
        assert!(Arc::ptr_eq(&up2["users"], &up3["users"]));
        assert!(!Arc::ptr_eq(&up2["orders"], &up3["orders"]));
        assert!(!Arc::ptr_eq(limit(&second, "a"), limit(&third, "a")));
        assert!(Arc::ptr_eq(limit(&second, "b"), limit(&third, "b")));
    }

    #[test]
    fn a_limit_is_carried_by_its_route_name() {
        let first = load(FILE, None);
        // Route a renamed c keeps its settings but starts new counts.
        let renamed = FILE.replace("name: a\n", "name: c\n");
        let second = load(&renamed, Some(&first));
        assert!(!Arc::ptr_eq(limit(&first, "a"), limit(&second, "c")));
        assert!(Arc::ptr_eq(limit(&first, "b"), limit(&second, "b")));
    }
}
