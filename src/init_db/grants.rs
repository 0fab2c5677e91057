//! What the login roles may do with the application's tables, and what
//! init-db tells the operator about them.
//!
//! The grants follow the Neon Authorize guide (use the `public` schema and
//! its tables; RLS policies decide which rows), with two defaults that do
//! not surprise: a role without a token reads only (`table_access`), and
//! tables without RLS are named, since every user of a login role sees
//! all of their rows.

use anyhow::Context as _;
use tokio_postgres::Transaction;

use super::sql::quote_ident;
use crate::config::TableAccess;

/// Grants `role` use of schema `public` and `access` to its tables and
/// sequences, now and for tables created later by init-db's user and by
/// each of `migration_roles`.
pub async fn public_schema(
    tx: &Transaction<'_>,
    role: &str,
    access: TableAccess,
    migration_roles: &[String],
) -> anyhow::Result<()> {
    let r = quote_ident(role);
    let privileges = match access {
        TableAccess::ReadWrite => "select, insert, update, delete",
        TableAccess::ReadOnly => "select",
        TableAccess::None => "",
    };
    // A role moved to less access loses what it had, for tables that exist
    // and those init-db's user and the migration roles create later.
    let taken = match access {
        TableAccess::ReadWrite => "",
        TableAccess::ReadOnly => "insert, update, delete, truncate",
        TableAccess::None => "all",
    };
    let mut revoke = String::new();
    if !taken.is_empty() {
        revoke.push_str(&format!(
            "revoke {taken} on all tables in schema public from {r};
             alter default privileges in schema public revoke {taken} on tables from {r};"
        ));
        for owner in migration_roles {
            revoke.push_str(&format!(
                "alter default privileges for role {} in schema public revoke {taken} on tables from {r};",
                quote_ident(owner)
            ));
        }
    }
    if privileges.is_empty() {
        return tx
            .batch_execute(&format!("{revoke} grant usage on schema public to {r}"))
            .await
            .with_context(|| format!("granting schema public to {role}"));
    }
    tx.batch_execute(&format!(
        "{revoke}
         grant usage on schema public to {r};
         grant {privileges} on all tables in schema public to {r};
         grant usage on all sequences in schema public to {r};
         alter default privileges in schema public grant {privileges} on tables to {r};
         alter default privileges in schema public grant usage on sequences to {r};"
    ))
    .await
    .with_context(|| format!("granting schema public to {role}"))?;
    for owner in migration_roles {
        let o = quote_ident(owner);
        tx.batch_execute(&format!(
            "alter default privileges for role {o} in schema public grant {privileges} on tables to {r};
             alter default privileges for role {o} in schema public grant usage on sequences to {r};"
        ))
        .await
        .with_context(|| {
            format!(
                "granting {role} what {owner} creates later (init-db's user must be a member of \
                 {owner}: `GRANT {o} TO <init-db user>`)"
            )
        })?;
    }
    Ok(())
}

/// A warning naming the tables in `public` without row-level security, if
/// any.
pub async fn without_rls(client: &tokio_postgres::Client) -> anyhow::Result<Vec<String>> {
    let tables: Vec<String> = client
        .query(
            "select c.relname::text from pg_catalog.pg_class c \
               join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
              where n.nspname = 'public' and c.relkind in ('r', 'p') and not c.relrowsecurity \
              order by 1",
            &[],
        )
        .await
        .context("listing tables without row-level security")?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![format!(
        "warning: tables in schema public without row-level security: {}. Every user of the \
         login roles reaches all of their rows (anonymous ones read them): enable RLS with \
         policies (`ALTER TABLE ... ENABLE ROW LEVEL SECURITY`) or revoke them",
        tables.join(", ")
    )])
}
