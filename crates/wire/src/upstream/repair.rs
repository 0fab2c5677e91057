//! Undoing what a client can do to its own login role.
//!
//! Postgres lets every role change its own password and its own session
//! defaults (`ALTER ROLE CURRENT_USER PASSWORD ...`, `... SET ...`), and
//! no privilege can be revoked to stop it. Every user of the proxy shares
//! a login role, so one client could otherwise break or bend every later
//! session of the role for everyone. The proxy does not trust the role to
//! be as `init-db` left it; it proves it before use and repairs it:
//!
//! - every login pins [`PINNED_STARTUP`]: settings a role default could
//!   use to make the login itself fail (a `local_preload_libraries` that
//!   does not load), so the proxy always gets in to repair;
//! - `auth.begin_session()`, run on every fresh login and every reset,
//!   refuses with [`ROLE_DEFAULTS_SQLSTATE`] while the role has session
//!   defaults of its own; the proxy then clears them on that backend
//!   ([`Upstream::clear_role_defaults`]) and closes it, so no client ever
//!   runs under them;
//! - a login refused for its password is retried once after an idle
//!   backend of the role sets the password back to the proxy's
//!   ([`Upstream::restore_password`]; the pool decides when).
//!
//! Each repair runs in a read-write transaction with its own timeouts off,
//! so the defaults being repaired (a read-only default, a tiny
//! `statement_timeout`) cannot stop it.

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::time::Instant;

use super::Upstream;
use crate::error::UpstreamError;

/// Startup parameters of every login, after the client's: a role default
/// naming a library that does not load would otherwise fail every login.
/// And an `idle_session_timeout` would end the backend before the proxy's
/// first query reached it (pooled backends must not time out while idle
/// anyway).
pub const PINNED_STARTUP: &[(&str, &str)] = &[
    ("local_preload_libraries", ""),
    ("idle_session_timeout", "0"),
];

/// The SQLSTATE `auth.begin_session()` raises while the login role carries
/// session defaults of its own.
pub const ROLE_DEFAULTS_SQLSTATE: &str = "AG001";

/// Opens the repair's transaction: writable, whatever the role's defaults
/// say, and with no timeout of theirs in the way. The ROLLBACK ends the
/// failed `auth.begin_session()` transaction the repair follows (a
/// warning, harmless, when there is none).
const REPAIR_BEGIN: &str = "ROLLBACK; BEGIN READ WRITE; SET LOCAL statement_timeout = 0; \
                            SET LOCAL lock_timeout = 0; \
                            SET LOCAL idle_in_transaction_session_timeout = 0";

/// Fails the repair when defaults remain after `RESET ALL`: a role can
/// remove only the settings it may set itself, so one an administrator set
/// (superuser-only, or an extension's) stays, and every session would
/// otherwise be refused and repaired again, in a loop.
const STILL_SET: &str = "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_catalog.pg_db_role_setting s \
     WHERE s.setrole OPERATOR(pg_catalog.=) (SELECT r.oid FROM pg_catalog.pg_roles r \
     WHERE r.rolname OPERATOR(pg_catalog.=) SESSION_USER) \
     AND s.setdatabase OPERATOR(pg_catalog.=) ANY (ARRAY[0::pg_catalog.oid, (SELECT d.oid FROM \
     pg_catalog.pg_database d WHERE d.datname OPERATOR(pg_catalog.=) \
     pg_catalog.current_database())])) THEN RAISE EXCEPTION 'authgres: login role % has \
     session defaults only an administrator can remove', SESSION_USER USING HINT = \
     'run authgres init-db, or have a superuser run ALTER ROLE ... RESET ALL'; END IF; END $$";

impl Upstream {
    /// Removes every session default the login role set for itself, in
    /// every database and in `database` (this backend's), then marks the
    /// connection broken: it started under those defaults.
    pub async fn clear_role_defaults(
        &mut self,
        database: &str,
        deadline: Instant,
    ) -> Result<(), UpstreamError> {
        let sql = format!(
            "{REPAIR_BEGIN}; ALTER ROLE SESSION_USER RESET ALL; \
             ALTER ROLE SESSION_USER IN DATABASE {} RESET ALL; {STILL_SET}; COMMIT",
            quote_ident(database)
        );
        let result = self.repair(&sql, deadline).await;
        self.broken = true;
        result
    }

    /// Sets the login role's password back to `verifier` (a SCRAM
    /// verifier: the password itself never reaches the server's log). The
    /// connection must be clean (no client's `SET ROLE`).
    pub async fn restore_password(
        &mut self,
        verifier: &str,
        deadline: Instant,
    ) -> Result<(), UpstreamError> {
        let sql = format!(
            "{REPAIR_BEGIN}; ALTER ROLE SESSION_USER PASSWORD {}; COMMIT",
            quote_literal(verifier)
        );
        self.repair(&sql, deadline).await
    }

    async fn repair(&mut self, sql: &str, deadline: Instant) -> Result<(), UpstreamError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(UpstreamError::Encode)?;
        let reply = self.exchange(&out, deadline).await?;
        match reply.error {
            None if reply.status == super::IDLE => Ok(()),
            error => {
                self.broken = true;
                Err(UpstreamError::Repair(error.unwrap_or_default()))
            }
        }
    }
}

/// `name` as an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `value` as an SQL string literal (standard_conforming_strings, which
/// every supported server has on and a role default cannot turn off here:
/// the value never holds a backslash).
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
