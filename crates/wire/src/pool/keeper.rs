//! The keeper: one connection per login role kept out of circulation, so
//! that a password a client changed (any role may change its own) can be
//! set back even when every other connection of the role is busy.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Idle, Slot, UpstreamPool};
use crate::upstream::{self, Owner, Upstream};

/// The `application_name` of a keeper connection (see `keepers`), so an
/// operator sees in `pg_stat_activity` what it is.
const KEEPER_NAME: &str = "authgres keeper";

/// How long after a keeper's failed login the next is tried: a role whose
/// logins fail would otherwise start one with every client's login.
const KEEPER_RETRY: Duration = Duration::from_secs(30);

/// A login role's keeper connection (see `UpstreamPool::keepers`).
pub(super) enum Keeper {
    /// Its login, or a repair on it, is under way (one at a time).
    Busy,
    /// Logged in, waiting to repair.
    Ready(Box<Upstream>),
    /// Its login failed then; the next waits for [`KEEPER_RETRY`].
    Failed(Instant),
}

impl UpstreamPool {
    /// Starts the login of `role`'s keeper connection if it has none and
    /// none is under way (see `keepers`), beside the client's checkout,
    /// which does not wait for it. Best effort: a failed login is tried
    /// again at a later login of the role, [`KEEPER_RETRY`] after it.
    pub(super) fn ensure_keeper(self: &Arc<Self>, database: &str, role: &str, password: &str) {
        {
            let mut keepers = self.keepers();
            match keepers.get(role) {
                Some(Keeper::Busy | Keeper::Ready(_)) => return,
                Some(Keeper::Failed(at)) if at.elapsed() < KEEPER_RETRY => return,
                Some(Keeper::Failed(_)) | None => {}
            }
            keepers.insert(role.to_owned(), Keeper::Busy);
        }
        let pool = Arc::downgrade(self);
        let (database, role, password) =
            (database.to_owned(), role.to_owned(), password.to_owned());
        let config = self.config.clone();
        tokio::spawn(async move {
            let name = [("application_name".to_owned(), KEEPER_NAME.to_owned())];
            let connected =
                upstream::connect(&config, &role, &database, Some(&password), &name).await;
            let Some(pool) = pool.upgrade() else {
                return;
            };
            let mut keepers = pool.keepers();
            match connected {
                Ok(keeper) => {
                    keepers.insert(role, Keeper::Ready(Box::new(keeper)));
                }
                Err(error) => {
                    tracing::debug!(%error, role, "no keeper connection for the role");
                    keepers.insert(role, Keeper::Failed(Instant::now()));
                }
            }
        });
    }

    fn keepers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Keeper>> {
        self.keepers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets `role`'s password back to `password` from its keeper
    /// connection, else from one of its idle connections (reset first if a
    /// client's session is in it); returns whether one did. Connections
    /// that fail are closed.
    pub(super) async fn restore_password(
        &self,
        role: &str,
        password: &str,
        deadline: Instant,
    ) -> bool {
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        let keeper = {
            let mut keepers = self.keepers();
            match keepers.remove(role) {
                Some(Keeper::Ready(keeper)) => {
                    keepers.insert(role.to_owned(), Keeper::Busy);
                    Some(keeper)
                }
                Some(other) => {
                    keepers.insert(role.to_owned(), other);
                    None
                }
                None => None,
            }
        };
        if let Some(mut keeper) = keeper {
            if keeper.restore_password(&verifier, deadline).await.is_ok() {
                log_restored(role);
                self.keepers()
                    .insert(role.to_owned(), Keeper::Ready(keeper));
                return true;
            }
            // Dead or refused: a later login of the role starts another.
            self.keepers().remove(role);
        }
        while let Some((slot, mut idle)) = self.take_idle_of_role(role) {
            let restored = async {
                if idle.conn.owner() != Owner::Nobody {
                    idle.conn.reset(deadline).await?;
                }
                idle.conn.restore_password(&verifier, deadline).await
            }
            .await;
            match restored {
                Ok(()) => {
                    log_restored(role);
                    idle.since = Instant::now();
                    slot.connections().idle.push(idle);
                    return true;
                }
                Err(error) => tracing::debug!(%error, "restoring the password failed here"),
            }
        }
        tracing::warn!(
            role,
            "the proxy's password for this role is refused and no live connection of the \
             role can set it back; run `authgres init-db` to repair the role"
        );
        false
    }

    /// Removes an idle connection of `role` (any database), if any.
    fn take_idle_of_role(&self, role: &str) -> Option<(Arc<Slot>, Idle)> {
        let slots = self
            .state()
            .slots()
            .filter(|slot| slot.role == role)
            .cloned()
            .collect::<Vec<_>>();
        slots.into_iter().find_map(|slot| {
            let idle = slot.connections().idle.pop()?;
            Some((slot, idle))
        })
    }
}

/// The warning that a login role's password was set back.
fn log_restored(role: &str) {
    tracing::warn!(
        role,
        "the login role's password no longer matched the proxy's (a client may have changed \
         it: any role can change its own); set it back"
    );
}
