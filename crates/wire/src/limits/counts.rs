//! The counts behind the limits per identity: connections and
//! transactions held, per user and per tenant, under one short lock.
//!
//! An entry exists only while its user or tenant holds something, so the
//! map is as large as the set of active identities. A [`Seat`] (a client
//! connection) or a [`Turn`] (a transaction) gives its place back when
//! dropped. Connections are counted for every identity (a login is rare
//! next to a transaction); transactions only while some limit on them is
//! configured, so with none the per-transaction path reads one atomic
//! flag and nothing else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use authgres_jwt::Identity;

use super::{IdentityLimits, Limit, LimitRefusal, LimitTable};

/// What is counted: a user (by `auth.user_id()`) or a tenant (by provider
/// and tenant: two providers' tenants are distinct).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    User(Arc<str>),
    Tenant(Arc<str>, Arc<str>),
}

/// What one user or tenant holds.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    connections: u32,
    transactions: u32,
}

impl Held {
    fn get(&self, connections: bool) -> u32 {
        if connections {
            self.connections
        } else {
            self.transactions
        }
    }

    fn get_mut(&mut self, connections: bool) -> &mut u32 {
        if connections {
            &mut self.connections
        } else {
            &mut self.transactions
        }
    }
}

/// The counts, shared by every [`Seat`] and [`Turn`].
#[derive(Debug, Default)]
struct Counts {
    held: Mutex<HashMap<Scope, Held>>,
}

impl Counts {
    /// Takes a place for `who` (its user and tenant) if neither is at its
    /// limit: both or neither are counted.
    fn take(
        &self,
        who: &Who,
        connections: bool,
        limits: [(Limit, Option<u32>); 2],
    ) -> Result<(), LimitRefusal> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let scopes = [Some(&who.user), who.tenant.as_ref()];
        for (scope, (limit, max)) in scopes.into_iter().zip(limits) {
            let (Some(scope), Some(max)) = (scope, max) else {
                continue;
            };
            let now = held.get(scope).map_or(0, |h| h.get(connections));
            if now >= max {
                return Err(LimitRefusal {
                    limit,
                    name: match scope {
                        Scope::User(name) | Scope::Tenant(_, name) => name.to_string(),
                    },
                    held: now,
                    max,
                });
            }
        }
        for scope in scopes.into_iter().flatten() {
            let count = held.entry(scope.clone()).or_default().get_mut(connections);
            *count = count.saturating_add(1);
        }
        Ok(())
    }

    /// Gives back what [`Counts::take`] took; entries that hold nothing
    /// more are removed.
    fn give_back(&self, user: &Scope, tenant: Option<&Scope>, connections: bool) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        for scope in [Some(user), tenant].into_iter().flatten() {
            if let Some(entry) = held.get_mut(scope) {
                let count = entry.get_mut(connections);
                *count = count.saturating_sub(1);
                if entry.connections == 0 && entry.transactions == 0 {
                    held.remove(scope);
                }
            }
        }
    }
}

/// The limits of every identity: the table in force and the counts. One
/// per proxy; its counts outlive reloads.
#[derive(Debug, Default)]
pub struct Limiter {
    table: RwLock<Arc<LimitTable>>,
    /// Bumped by each [`Limiter::configure`]: a [`Who`] resolved under an
    /// older table resolves again.
    generation: AtomicU64,
    /// Whether any transaction limit is configured: read first on every
    /// transaction.
    transactions: AtomicBool,
    counts: Arc<Counts>,
}

impl Limiter {
    /// A limiter with `table` in force.
    pub fn new(table: LimitTable) -> Self {
        let limiter = Self::default();
        limiter.configure(table);
        limiter
    }

    /// Puts `table` in force for the checks that follow; what is held
    /// stays held.
    pub fn configure(&self, table: LimitTable) {
        let transactions = table.limits_transactions();
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        self.transactions.store(transactions, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The identity a session or request is counted as, with its limits
    /// for logging in as `role`.
    pub fn who(&self, identity: &Identity, role: &str) -> Who {
        let provider: Arc<str> = Arc::clone(&identity.provider);
        let mut who = Who {
            user: Scope::User(Arc::from(identity.user_id.as_str())),
            tenant: identity
                .tenant
                .as_deref()
                .map(|tenant| Scope::Tenant(Arc::clone(&provider), Arc::from(tenant))),
            role: Arc::from(role),
            provider,
            generation: u64::MAX,
            limits: IdentityLimits::default(),
        };
        self.refresh(&mut who);
        who
    }

    /// Resolves `who`'s limits again if the table changed since.
    fn refresh(&self, who: &mut Who) {
        let generation = self.generation.load(Ordering::Acquire);
        if who.generation != generation {
            let table = Arc::clone(&self.table.read().unwrap_or_else(PoisonError::into_inner));
            who.limits = table.resolve(&who.role, &who.provider);
            who.generation = generation;
        }
    }

    /// A client connection for `who`, unless its user or tenant holds
    /// its limit of connections.
    pub fn connect(&self, who: &mut Who) -> Result<Seat, LimitRefusal> {
        self.refresh(who);
        let limits = [
            (Limit::ConnectionsPerUser, who.limits.connections_per_user),
            (
                Limit::ConnectionsPerTenant,
                who.limits.connections_per_tenant,
            ),
        ];
        self.counts.take(who, true, limits)?;
        Ok(Seat(Place::new(&self.counts, who, true)))
    }

    /// A transaction for `who`, unless its user or tenant holds its limit
    /// of transactions; `None` (nothing to give back) when no limit
    /// applies to it. With no transaction limit configured at all this
    /// reads one flag.
    pub fn begin(&self, who: &mut Who) -> Result<Option<Turn>, LimitRefusal> {
        if !self.transactions.load(Ordering::Acquire) {
            return Ok(None);
        }
        self.refresh(who);
        if !who.limits.limits_transactions() {
            return Ok(None);
        }
        let limits = [
            (Limit::TransactionsPerUser, who.limits.transactions_per_user),
            (
                Limit::TransactionsPerTenant,
                who.limits.transactions_per_tenant,
            ),
        ];
        self.counts.take(who, false, limits)?;
        Ok(Some(Turn(Box::new(Place::new(&self.counts, who, false)))))
    }

    /// A transaction for one request of `identity` as `role` (`/sql`):
    /// [`Limiter::begin`] for a [`Who`] built only when a transaction
    /// limit is configured at all.
    pub fn begin_request(
        &self,
        identity: &Identity,
        role: &str,
    ) -> Result<Option<Turn>, LimitRefusal> {
        if !self.transactions.load(Ordering::Acquire) {
            return Ok(None);
        }
        self.begin(&mut self.who(identity, role))
    }

    /// How many users and tenants hold something now (the map's size).
    pub fn active(&self) -> usize {
        self.counts
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// An identity as the limiter counts it, with its limits as last resolved.
#[derive(Debug, Clone)]
pub struct Who {
    user: Scope,
    tenant: Option<Scope>,
    role: Arc<str>,
    provider: Arc<str>,
    /// The table generation `limits` were resolved under.
    generation: u64,
    limits: IdentityLimits,
}

/// A place counted for an identity, given back on drop.
#[derive(Debug)]
struct Place {
    counts: Arc<Counts>,
    user: Scope,
    tenant: Option<Scope>,
    connections: bool,
}

impl Place {
    fn new(counts: &Arc<Counts>, who: &Who, connections: bool) -> Self {
        Self {
            counts: Arc::clone(counts),
            user: who.user.clone(),
            tenant: who.tenant.clone(),
            connections,
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.counts
            .give_back(&self.user, self.tenant.as_ref(), self.connections);
    }
}

/// A client connection counted against its user and tenant.
#[derive(Debug)]
pub struct Seat(#[allow(dead_code, reason = "held for its Drop")] Place);

/// A transaction counted against its user and tenant (boxed: a turn is
/// held in every transaction's future, and in sessions that keep their
/// connection, and most identities have no limit to count against).
#[derive(Debug)]
pub struct Turn(#[allow(dead_code, reason = "held for its Drop")] Box<Place>);
