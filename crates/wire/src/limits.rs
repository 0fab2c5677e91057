//! Limits per identity: how many client connections, and how many
//! transactions (upstream connections held for work), one user (its
//! `auth.user_id()`) and one tenant (its provider's `tenant_claim`) may
//! have at once, whichever transport they come over.
//!
//! Limits are configured per role and per provider ([`IdentityLimits`],
//! gathered in a [`LimitTable`]); when both set one, the smaller applies.
//! The counts live in the proxy's [`Limiter`] and survive reloads; a
//! reload replaces only the table, so lowering a limit refuses new work
//! above it and never ends running work. Anonymous sessions have no
//! identity and are not limited here (the connection budget and the pool
//! size bound them).
//!
//! A refusal ([`LimitRefusal`]) says which limit and whose: SQLSTATE
//! `53300` for connections, `53400` for transactions.

mod counts;

use std::collections::HashMap;

use crate::classify::{Classify, ClientView, Severity, SqlState};

pub use counts::{Limiter, Seat, Turn, Who};

/// The limits of one role or one provider; `None`: unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentityLimits {
    /// Client connections of one user at once.
    pub connections_per_user: Option<u32>,
    /// Transactions (upstream connections held) of one user at once.
    pub transactions_per_user: Option<u32>,
    /// Client connections of one tenant's users together.
    pub connections_per_tenant: Option<u32>,
    /// Transactions of one tenant's users together.
    pub transactions_per_tenant: Option<u32>,
}

impl IdentityLimits {
    /// Each limit the smaller of the two (unset counts as unlimited).
    pub fn tighter(self, other: Self) -> Self {
        fn min(a: Option<u32>, b: Option<u32>) -> Option<u32> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        Self {
            connections_per_user: min(self.connections_per_user, other.connections_per_user),
            transactions_per_user: min(self.transactions_per_user, other.transactions_per_user),
            connections_per_tenant: min(self.connections_per_tenant, other.connections_per_tenant),
            transactions_per_tenant: min(
                self.transactions_per_tenant,
                other.transactions_per_tenant,
            ),
        }
    }

    /// Whether a transaction limit is set.
    pub fn limits_transactions(&self) -> bool {
        self.transactions_per_user.is_some() || self.transactions_per_tenant.is_some()
    }
}

/// The configured limits: by role name and by provider name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitTable {
    /// `[roles.NAME]`'s limits.
    pub by_role: HashMap<String, IdentityLimits>,
    /// `[[providers]]`' limits, by provider name.
    pub by_provider: HashMap<String, IdentityLimits>,
}

impl LimitTable {
    /// The limits of a client logged in as `role` with a token of `provider`.
    pub fn resolve(&self, role: &str, provider: &str) -> IdentityLimits {
        let of_role = self.by_role.get(role).copied().unwrap_or_default();
        let of_provider = self.by_provider.get(provider).copied().unwrap_or_default();
        of_role.tighter(of_provider)
    }

    /// Whether any role or provider limits transactions: when none does,
    /// a transaction's checkout does no limit work at all.
    pub fn limits_transactions(&self) -> bool {
        self.by_role
            .values()
            .chain(self.by_provider.values())
            .any(IdentityLimits::limits_transactions)
    }
}

/// One of the four limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `max_connections_per_user`.
    ConnectionsPerUser,
    /// `max_transactions_per_user`.
    TransactionsPerUser,
    /// `max_connections_per_tenant`.
    ConnectionsPerTenant,
    /// `max_transactions_per_tenant`.
    TransactionsPerTenant,
}

impl Limit {
    /// Every limit, for the metrics' zero series.
    pub const ALL: [Self; 4] = [
        Self::ConnectionsPerUser,
        Self::TransactionsPerUser,
        Self::ConnectionsPerTenant,
        Self::TransactionsPerTenant,
    ];

    /// Its configuration key.
    pub fn key(self) -> &'static str {
        match self {
            Self::ConnectionsPerUser => "max_connections_per_user",
            Self::TransactionsPerUser => "max_transactions_per_user",
            Self::ConnectionsPerTenant => "max_connections_per_tenant",
            Self::TransactionsPerTenant => "max_transactions_per_tenant",
        }
    }

    /// Its metric label (and failure classification).
    pub fn label(self) -> &'static str {
        match self {
            Self::ConnectionsPerUser => "user_connection_limit",
            Self::TransactionsPerUser => "user_transaction_limit",
            Self::ConnectionsPerTenant => "tenant_connection_limit",
            Self::TransactionsPerTenant => "tenant_transaction_limit",
        }
    }

    fn is_connections(self) -> bool {
        matches!(self, Self::ConnectionsPerUser | Self::ConnectionsPerTenant)
    }

    fn is_tenant(self) -> bool {
        matches!(
            self,
            Self::ConnectionsPerTenant | Self::TransactionsPerTenant
        )
    }
}

/// Work refused because its user or tenant is at a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitRefusal {
    /// Which limit.
    pub limit: Limit,
    /// The user's id (`auth.user_id()`) or the tenant: the client's own.
    pub name: String,
    /// What it holds now.
    pub held: u32,
    /// The limit in force.
    pub max: u32,
}

impl std::fmt::Display for LimitRefusal {
    /// `user "u1" already has 50 connections (max_connections_per_user = 50)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let whose = if self.limit.is_tenant() {
            "tenant"
        } else {
            "user"
        };
        let what = if self.limit.is_connections() {
            "connections"
        } else {
            "transactions running"
        };
        write!(
            f,
            "{whose} {:?} already has {} {what} ({} = {})",
            self.name,
            self.held,
            self.limit.key(),
            self.max
        )
    }
}

impl std::error::Error for LimitRefusal {}

impl Classify for LimitRefusal {
    fn client_view(&self) -> Option<ClientView> {
        let (code, hint) = if self.limit.is_connections() {
            (
                SqlState::TooManyConnections,
                "close a connection first (a client-side pool smaller than the limit), or ask the \
                 operator to raise the limit",
            )
        } else {
            (
                SqlState::ConfigurationLimitExceeded,
                "wait for a running transaction to finish and retry, or ask the operator to raise \
                 the limit",
            )
        };
        ClientView::new(code, self.to_string(), Some(hint))
    }

    fn severity(&self) -> Severity {
        Severity::Client
    }

    fn label(&self) -> &'static str {
        self.limit.label()
    }
}

#[cfg(test)]
mod tests;
