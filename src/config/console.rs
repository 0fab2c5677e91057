//! `[console]`: the operators' console on the Postgres listener
//! (pgbouncer's admin database), and who may log in to it.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use authgres_wire::{ConsoleAccess, ConsoleConfig, ConsoleUser};
use serde::{Deserialize, Serialize};

use super::Loaded;

/// `[console]`: absent, there is no console.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSection {
    /// The database name that reaches the console instead of Postgres.
    #[serde(default = "default_database")]
    pub database: String,
    /// Users who may run every command: name → the secret (environment
    /// variable or secrets-file key) holding the password.
    #[serde(default)]
    pub admin_users: BTreeMap<String, String>,
    /// Users who may run SHOW only, the same way.
    #[serde(default)]
    pub stats_users: BTreeMap<String, String>,
}

/// pgbouncer's is `pgbouncer`; ours names the proxy.
fn default_database() -> String {
    "authgres".to_owned()
}

impl Loaded {
    /// `[console]` with its passwords, checked: `None` without the section.
    pub(super) fn console(&self) -> anyhow::Result<Option<ConsoleConfig>> {
        let Some(section) = &self.file.console else {
            return Ok(None);
        };
        if section.database.is_empty() {
            bail!("[console] database must not be empty");
        }
        if self.file.upstream.databases.contains(&section.database) {
            bail!(
                "[console] database {:?} is also in [upstream] databases: choose another name \
                 for the console",
                section.database
            );
        }
        let mut users = Vec::new();
        let groups = [
            ("admin_users", &section.admin_users, ConsoleAccess::Admin),
            ("stats_users", &section.stats_users, ConsoleAccess::Stats),
        ];
        for (key, group, access) in groups {
            for (name, secret) in group {
                let password = self.secrets.get(secret).with_context(|| {
                    format!(
                        "[console] {key}.{name}: no password in {secret} (the environment or the \
                         secrets file)"
                    )
                })?;
                if password.len() < 16 {
                    bail!(
                        "[console] {key}.{name}: the password in {secret} is shorter than 16 \
                         characters; use a random one (openssl rand -hex 24)"
                    );
                }
                users.push(ConsoleUser {
                    name: name.clone(),
                    password,
                    access,
                });
            }
        }
        if users.is_empty() {
            bail!("[console] needs admin_users or stats_users: nobody could log in");
        }
        Ok(Some(ConsoleConfig {
            database: section.database.clone(),
            users,
        }))
    }
}
