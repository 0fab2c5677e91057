//! The login roles: created, or checked and brought to what the proxy needs,
//! with only the privileges a managed service gives its administrator.
//!
//! Nobody is superuser on Neon, Supabase, RDS, Cloud SQL or Azure. Their
//! administrator has CREATEROLE (and, from PostgreSQL 16, ADMIN OPTION on
//! the roles it created), which is enough to create a role and to change
//! what the proxy needs changed, but not to name the SUPERUSER, BYPASSRLS
//! or REPLICATION attributes at all, even to turn them off. So a role is
//! created with every attribute spelled out, an existing one is read first
//! and only what differs is altered, and an attribute that cannot be
//! changed from here is refused with the statement that would fix it.

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use tokio_postgres::Transaction;

use super::sql::{quote_ident, quote_literal};

/// What `pg_roles` says of a role.
#[derive(Debug, Clone)]
pub struct Existing {
    superuser: bool,
    bypassrls: bool,
    replication: bool,
    createrole: bool,
    createdb: bool,
    login: bool,
    inherit: bool,
}

impl Existing {
    /// The role `name`, if it exists.
    pub async fn read(client: &tokio_postgres::Client, name: &str) -> anyhow::Result<Option<Self>> {
        let row = client
            .query_opt(
                "select rolsuper, rolbypassrls, rolreplication, rolcreaterole, rolcreatedb, \
                        rolcanlogin, rolinherit \
                   from pg_catalog.pg_roles where rolname = $1",
                &[&name],
            )
            .await
            .with_context(|| format!("reading role {name}"))?;
        Ok(row.map(|row| Self {
            superuser: row.get(0),
            bypassrls: row.get(1),
            replication: row.get(2),
            createrole: row.get(3),
            createdb: row.get(4),
            login: row.get(5),
            inherit: row.get(6),
        }))
    }

    /// Attributes that make the role unfit as a login role and that only a
    /// superuser may remove, as the statements that would.
    fn unfixable(&self, name: &str) -> Vec<String> {
        let ident = quote_ident(name);
        [
            (
                self.superuser,
                "NOSUPERUSER",
                "is a superuser: RLS never applies to it",
            ),
            (
                self.bypassrls,
                "NOBYPASSRLS",
                "has BYPASSRLS: RLS never applies to it",
            ),
            (self.replication, "NOREPLICATION", "has REPLICATION"),
        ]
        .into_iter()
        .filter(|(set, _, _)| *set)
        .map(|(_, fix, why)| {
            format!("role {name} {why}; as a superuser run `ALTER ROLE {ident} {fix}`")
        })
        .collect()
    }

    /// The attributes to alter (each one this administrator may change).
    fn changes(&self) -> Vec<&'static str> {
        [
            (self.createrole, "NOCREATEROLE"),
            (self.createdb, "NOCREATEDB"),
            (!self.login, "LOGIN"),
            (!self.inherit, "INHERIT"),
        ]
        .into_iter()
        .filter(|(differs, _)| *differs)
        .map(|(_, attribute)| attribute)
        .collect()
    }
}

/// What the caller decided about a role's password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Password<'a> {
    /// Set it to this (a new role, `--reset-passwords`, or the proxy's
    /// password no longer logs in).
    Set(&'a str),
    /// Leave it: it works, or there is none.
    Keep,
}

/// What [`ensure`] did that the operator should hear about.
#[derive(Debug, Default)]
pub struct Report {
    /// Lines to print.
    pub lines: Vec<String>,
}

/// Creates `name` or brings it to LOGIN, INHERIT, nothing privileged, no
/// memberships and no session defaults of its own, with `password`.
pub async fn ensure(
    tx: &Transaction<'_>,
    name: &str,
    existing: Option<&Existing>,
    password: Password<'_>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let ident = quote_ident(name);
    let password_clause = match password {
        Password::Set(password) => {
            let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
            format!(" PASSWORD {}", quote_literal(&verifier))
        }
        Password::Keep => String::new(),
    };
    let Some(existing) = existing else {
        tx.batch_execute(&format!(
            "CREATE ROLE {ident} LOGIN INHERIT NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB \
             NOREPLICATION{password_clause}"
        ))
        .await
        .map_err(|error| privilege_error(error, name, "create"))?;
        report.lines.push(format!("created role {name}"));
        return Ok(());
    };
    let unfixable = existing.unfixable(name);
    if !unfixable.is_empty() {
        bail!(
            "role {name} cannot serve as a login role:\n  {}",
            unfixable.join("\n  ")
        );
    }
    let changes = existing.changes();
    if !changes.is_empty() || !password_clause.is_empty() {
        tx.batch_execute(&format!(
            "ALTER ROLE {ident} WITH {}{password_clause}",
            changes.join(" ")
        ))
        .await
        .map_err(|error| privilege_error(error, name, "alter"))?;
        if !changes.is_empty() {
            report
                .lines
                .push(format!("role {name}: set {}", changes.join(" ")));
        }
        if !password_clause.is_empty() {
            report
                .lines
                .push(format!("role {name}: password set to the proxy's"));
        }
    }
    revoke_memberships(tx, name, report).await?;
    clear_defaults(tx, name, report).await
}

/// Membership in another role would give `SET ROLE` somewhere to go.
async fn revoke_memberships(
    tx: &Transaction<'_>,
    name: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let memberships = tx
        .query(
            "select r.rolname from pg_catalog.pg_auth_members m \
               join pg_catalog.pg_roles r on r.oid = m.roleid \
               join pg_catalog.pg_roles u on u.oid = m.member where u.rolname = $1",
            &[&name],
        )
        .await?;
    for row in memberships {
        let granted: String = row.get(0);
        tx.batch_execute(&format!(
            "REVOKE {} FROM {}",
            quote_ident(&granted),
            quote_ident(name)
        ))
        .await
        .map_err(|error| {
            anyhow::anyhow!(
                "role {name} is a member of {granted}, which would let its clients SET ROLE \
                 {granted}, and revoking it failed: {}\n  \
                 run `REVOKE {} FROM {}` as a role with ADMIN OPTION on {granted}",
                db_message(&error),
                quote_ident(&granted),
                quote_ident(name)
            )
        })?;
        report
            .lines
            .push(format!("role {name}: revoked its membership in {granted}"));
    }
    // From PostgreSQL 16 a REVOKE removes only this grantor's grant; one
    // made by another role stays, with nothing but a warning.
    let left = tx
        .query_one(
            "select count(*) from pg_catalog.pg_auth_members m \
               join pg_catalog.pg_roles u on u.oid = m.member where u.rolname = $1",
            &[&name],
        )
        .await?
        .get::<_, i64>(0);
    if left > 0 {
        bail!(
            "role {name} is still a member of another role (granted by someone else); \
             run `REVOKE <role> FROM {} GRANTED BY <grantor>` as that grantor or a superuser",
            quote_ident(name)
        );
    }
    Ok(())
}

/// Session defaults of the role itself (`ALTER ROLE ... SET`) are cleared:
/// any client of the role could have set them, for every later session.
/// Settings an operator wants go in proxy.toml, out of clients' reach.
async fn clear_defaults(
    tx: &Transaction<'_>,
    name: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let rows = tx
        .query(
            "select coalesce(d.datname, ''), pg_catalog.array_to_string(s.setconfig, ', ') \
               from pg_catalog.pg_db_role_setting s \
               left join pg_catalog.pg_database d on d.oid = s.setdatabase \
              where s.setrole = (select oid from pg_catalog.pg_roles where rolname = $1)",
            &[&name],
        )
        .await?;
    let ident = quote_ident(name);
    for row in rows {
        let (database, settings): (String, String) = (row.get(0), row.get(1));
        let scope = if database.is_empty() {
            String::new()
        } else {
            format!(" IN DATABASE {}", quote_ident(&database))
        };
        tx.batch_execute(&format!("ALTER ROLE {ident}{scope} RESET ALL"))
            .await
            .map_err(|error| privilege_error(error, name, "alter"))?;
        let mut line = format!("role {name}: cleared its session defaults ({settings})");
        if !database.is_empty() {
            let _ = write!(line, " in database {database}");
        }
        line.push_str(
            ": a client of the role can set these for everyone; \
             put the ones you meant in proxy.toml [roles.NAME] settings",
        );
        report.lines.push(line);
    }
    // A non-superuser's RESET ALL skips what it may not set itself.
    let left: Option<String> = tx
        .query_one(
            "select pg_catalog.string_agg(pg_catalog.array_to_string(s.setconfig, ', '), ', ') \
               from pg_catalog.pg_db_role_setting s \
              where s.setrole = (select oid from pg_catalog.pg_roles where rolname = $1)",
            &[&name],
        )
        .await?
        .get(0);
    if let Some(left) = left {
        bail!(
            "role {name} keeps session defaults init-db's user may not remove ({left}); \
             a superuser (or the provider's support) must run `ALTER ROLE {ident} RESET ALL`"
        );
    }
    Ok(())
}

/// A refused role statement, with the privilege it needs and who can give
/// it.
fn privilege_error(error: tokio_postgres::Error, name: &str, what: &str) -> anyhow::Error {
    let message = db_message(&error);
    let ident = quote_ident(name);
    let hint = match what {
        "create" => format!(
            "init-db's user needs CREATEROLE to create the login role {name}; have an \
             administrator run `ALTER ROLE <init-db user> CREATEROLE`, or create it yourself: \
             `CREATE ROLE {ident} LOGIN` and run init-db again"
        ),
        _ => format!(
            "init-db's user needs CREATEROLE and, from PostgreSQL 16, ADMIN OPTION on {name} \
             (a role's creator has it): have the role's creator or an administrator run \
             `GRANT {ident} TO <init-db user> WITH ADMIN OPTION`"
        ),
    };
    anyhow::anyhow!("{what} role {name}: {message}\n  {hint}")
}

/// The server's message of a database error, or the error itself.
pub fn db_message(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_owned(),
        },
        None => error.to_string(),
    }
}
