//! The limits per identity of `[roles.NAME]` and `[[providers]]`
//! (`max_connections_per_user`, `max_transactions_per_user`,
//! `max_connections_per_tenant`, `max_transactions_per_tenant`), gathered
//! into the wire crate's table. Where a role and a provider both set one,
//! the smaller applies; that rule is the wire crate's.

use anyhow::bail;
use authgres_wire::{IdentityLimits, LimitTable};

use super::Loaded;
use super::providers::Provider;
use super::roles::Role;

/// The four keys of one role or provider, as written.
struct Keys {
    connections_per_user: Option<u32>,
    transactions_per_user: Option<u32>,
    connections_per_tenant: Option<u32>,
    transactions_per_tenant: Option<u32>,
}

impl From<&Role> for Keys {
    fn from(role: &Role) -> Self {
        Self {
            connections_per_user: role.max_connections_per_user,
            transactions_per_user: role.max_transactions_per_user,
            connections_per_tenant: role.max_connections_per_tenant,
            transactions_per_tenant: role.max_transactions_per_tenant,
        }
    }
}

impl From<&Provider> for Keys {
    fn from(provider: &Provider) -> Self {
        Self {
            connections_per_user: provider.max_connections_per_user,
            transactions_per_user: provider.max_transactions_per_user,
            connections_per_tenant: provider.max_connections_per_tenant,
            transactions_per_tenant: provider.max_transactions_per_tenant,
        }
    }
}

impl Keys {
    /// The limits, or which key is zero (a limit of zero would refuse
    /// everyone: leaving the key out is "unlimited").
    fn limits(&self, owner: &str) -> anyhow::Result<IdentityLimits> {
        for (key, value) in [
            ("max_connections_per_user", self.connections_per_user),
            ("max_transactions_per_user", self.transactions_per_user),
            ("max_connections_per_tenant", self.connections_per_tenant),
            ("max_transactions_per_tenant", self.transactions_per_tenant),
        ] {
            if value == Some(0) {
                bail!("{owner}: {key} = 0 would refuse everyone; leave it out for no limit");
            }
        }
        Ok(IdentityLimits {
            connections_per_user: self.connections_per_user,
            transactions_per_user: self.transactions_per_user,
            connections_per_tenant: self.connections_per_tenant,
            transactions_per_tenant: self.transactions_per_tenant,
        })
    }
}

impl Loaded {
    /// The limits per identity of every role and provider that sets one.
    pub(super) fn identity_limits(&self) -> anyhow::Result<LimitTable> {
        let mut table = LimitTable::default();
        for (name, role) in &self.file.roles {
            let limits = Keys::from(role).limits(&format!("role {name:?}"))?;
            if limits != IdentityLimits::default() {
                table.by_role.insert(name.clone(), limits);
            }
        }
        for provider in &self.file.providers {
            let owner = format!("provider {:?}", provider.name);
            let limits = Keys::from(provider).limits(&owner)?;
            if limits != IdentityLimits::default() {
                table.by_provider.insert(provider.name.clone(), limits);
            }
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::loaded;
    use super::*;

    #[test]
    fn roles_and_providers_set_limits_and_zero_is_refused() {
        let text = "[roles.authenticated]\nmax_connections_per_user = 5\n\
                    max_transactions_per_tenant = 40\n\
                    [[providers]]\nname = \"a\"\nissuer = \"https://id.example/\"\n\
                    jwks_url = \"https://id.example/jwks\"\nmax_connections_per_user = 3\n";
        let table = loaded(text).identity_limits().expect("valid");
        let limits = table.resolve("authenticated", "a");
        assert_eq!(limits.connections_per_user, Some(3));
        assert_eq!(limits.transactions_per_tenant, Some(40));
        assert_eq!(limits.transactions_per_user, None);
        let zero = "[roles.authenticated]\nmax_transactions_per_user = 0\n";
        let error = loaded(zero).identity_limits().expect_err("refused");
        assert!(
            error.to_string().contains("max_transactions_per_user = 0"),
            "{error}"
        );
        assert_eq!(
            loaded("").identity_limits().expect("none"),
            LimitTable::default()
        );
    }
}
