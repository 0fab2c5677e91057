//! `[databases.<name>]`: names clients connect to that lead elsewhere than
//! the `[upstream]` server's database of the same name: another server,
//! another database, or one database per tenant (pgbouncer's
//! `[databases]`, with the token's tenant as the key).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use authgres_wire::{DatabaseName, DatabaseRoute, PoolMode, UpstreamConfig, UpstreamTls};
use serde::{Deserialize, Serialize};

use super::{Loaded, UpstreamTlsMode};

/// One `[databases.<name>]` entry. Unset keys take `[upstream]`'s values.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSection {
    /// The server's host.
    pub host: Option<String>,
    /// The server's port.
    pub port: Option<u16>,
    /// TLS to that server.
    pub tls: Option<UpstreamTlsMode>,
    /// The CA of that server's certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// The database on the server; `{tenant}` puts the token's tenant in
    /// it. Default: the entry's name.
    pub dbname: Option<String>,
    /// The pool mode of the entry's clients.
    pub pool_mode: Option<PoolMode>,
    /// Tenants sent to other entries: `{ org_123 = "acme" }`. Those
    /// entries are then reached only through this map.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, String>,
}

impl Loaded {
    /// The `[databases]` entries as routes, and the pool modes they set.
    pub(super) fn routes(
        &self,
        upstream: &UpstreamConfig,
    ) -> anyhow::Result<(HashMap<String, DatabaseRoute>, HashMap<String, PoolMode>)> {
        let entries = &self.file.databases;
        let mut routes = HashMap::new();
        let mut pool_modes = HashMap::new();
        for (name, entry) in entries {
            let context = || format!("[databases.{name}]");
            if self.file.upstream.databases.contains(name) {
                bail!(
                    "[databases.{name}] is also listed in [upstream] databases: name it in one place"
                );
            }
            for (tenant, target) in &entry.tenants {
                match entries.get(target) {
                    None => bail!(
                        "[databases.{name}] tenants: {tenant:?} names {target:?}, which is not a [databases] entry"
                    ),
                    Some(target_entry) if !target_entry.tenants.is_empty() => bail!(
                        "[databases.{name}] tenants: {target:?} has a tenants map of its own; \
                         a tenant map leads to a database, not to another map"
                    ),
                    Some(_) => {}
                }
            }
            let dbname = DatabaseName::parse(entry.dbname.as_deref().unwrap_or(name))
                .map_err(anyhow::Error::msg)
                .with_context(context)?;
            let direct = !entries
                .values()
                .any(|e| e.tenants.values().any(|t| t == name));
            routes.insert(
                name.clone(),
                DatabaseRoute {
                    server: self.entry_server(entry, upstream).with_context(context)?,
                    dbname,
                    tenants: entry.tenants.clone().into_iter().collect(),
                    direct,
                },
            );
            if let Some(mode) = entry.pool_mode {
                pool_modes.insert(name.clone(), mode);
            }
        }
        // A map's pool mode is its tenants' unless their entry sets one.
        for entry in entries.values() {
            if let Some(mode) = entry.pool_mode.filter(|_| !entry.tenants.is_empty()) {
                for target in entry.tenants.values() {
                    pool_modes.entry(target.clone()).or_insert(mode);
                }
            }
        }
        Ok((routes, pool_modes))
    }

    /// The entry's server, or `None` when it is `[upstream]`'s.
    fn entry_server(
        &self,
        entry: &DatabaseSection,
        upstream: &UpstreamConfig,
    ) -> anyhow::Result<Option<Arc<UpstreamConfig>>> {
        if entry.host.is_none()
            && entry.port.is_none()
            && entry.tls.is_none()
            && entry.tls_ca_file.is_none()
        {
            return Ok(None);
        }
        let tls = match entry.tls.unwrap_or(self.file.upstream.tls) {
            UpstreamTlsMode::Disable => UpstreamTls::Disable,
            UpstreamTlsMode::VerifyFull => UpstreamTls::verify_full(
                entry
                    .tls_ca_file
                    .as_ref()
                    .or(self.file.upstream.tls_ca_file.as_ref())
                    .map(|p| self.path(p))
                    .as_deref(),
            )
            .context("tls")?,
        };
        Ok(Some(Arc::new(UpstreamConfig {
            host: entry.host.clone().unwrap_or_else(|| upstream.host.clone()),
            port: entry.port.unwrap_or(upstream.port),
            tls,
            ..upstream.clone()
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::loaded;

    fn routes_of(text: &str) -> anyhow::Result<Vec<(String, bool, Option<String>)>> {
        let loaded = loaded(text);
        let upstream = loaded.upstream_config()?;
        let (routes, _) = loaded.routes(&upstream)?;
        let mut seen: Vec<_> = routes
            .into_iter()
            .map(|(name, r)| (name, r.direct, r.server.map(|s| s.address())))
            .collect();
        seen.sort();
        Ok(seen)
    }

    #[test]
    fn entries_name_their_server_and_map_targets_are_not_served_directly() {
        let seen = routes_of(
            "[upstream]\nport = 5432\n\
             [databases.b2b]\ntenants = { acme = \"acme\" }\n\
             [databases.acme]\nhost = \"10.0.0.9\"\ndbname = \"acme_prod\"\n\
             [databases.app]\ndbname = \"app_{tenant}\"\n",
        )
        .expect("valid");
        assert_eq!(
            seen,
            vec![
                ("acme".into(), false, Some("10.0.0.9:5432".into())),
                ("app".into(), true, None),
                ("b2b".into(), true, None),
            ]
        );
    }

    #[test]
    fn maps_to_nowhere_chains_and_names_in_two_places_are_refused() {
        for (text, says) in [
            (
                "[databases.b2b]\ntenants = { acme = \"nope\" }\n",
                "not a [databases] entry",
            ),
            (
                "[databases.a]\ntenants = { x = \"b\" }\n[databases.b]\ntenants = { y = \"c\" }\n[databases.c]\n",
                "a tenants map of its own",
            ),
            (
                "[upstream]\ndatabases = [\"app\"]\n[databases.app]\n",
                "name it in one place",
            ),
            ("[databases.app]\ndbname = \"{org}\"\n", "only placeholder"),
        ] {
            let error = routes_of(text).expect_err(text);
            assert!(format!("{error:#}").contains(says), "{text}: {error:#}");
        }
    }
}
