//! `authgres init-db`: secrets, roles, the `auth` schema and the claims key.
//!
//! Idempotent: secrets that exist are kept, roles are created or brought to
//! the required attributes, the schema is re-applied, the key is inserted
//! once. Passwords travel as SCRAM verifiers, so they never appear in the
//! server's statement log.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use authgres_wire::ClaimsKey;

use crate::config::Loaded;

/// The auth schema, applied verbatim.
pub const AUTH_SQL: &str = include_str!("../sql/auth.sql");

/// Loads the config and generates any missing secret into the secrets file.
pub fn prepare_secrets(config: &Path) -> anyhow::Result<Loaded> {
    let loaded = Loaded::from_path(config)?;
    let mut wanted = vec![(loaded.file.identity.claims_key_env.clone(), random_hex(32))];
    for role in loaded.file.roles.values() {
        if let Some(var) = &role.password_env {
            wanted.push((var.clone(), random_hex(24)));
        }
    }
    let missing: Vec<_> = wanted
        .into_iter()
        .filter(|(name, _)| loaded.secrets.get(name).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(loaded);
    }
    let Some(file) = loaded.secrets.file() else {
        let names: Vec<_> = missing.iter().map(|(n, _)| n.as_str()).collect();
        bail!(
            "secrets {} are not set and no secrets_file is configured to generate them into",
            names.join(", ")
        );
    };
    let mut out = std::fs::OpenOptions::new();
    out.append(true).create(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut out, 0o600);
    let mut out = out
        .open(file)
        .with_context(|| format!("writing secrets to {}", file.display()))?;
    for (name, value) in &missing {
        writeln!(out, "{name}={value}")?;
        eprintln!("generated {name} into {}", file.display());
    }
    drop(out);
    Loaded::from_path(config)
}

/// Installs everything into the database at `admin_url`.
pub async fn init_db(loaded: &Loaded, admin_url: &str) -> anyhow::Result<()> {
    let key = loaded.claims_key()?;
    let (mut client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .context("connecting with --admin-url")?;
    let connection = tokio::spawn(connection);
    let tx = client.transaction().await?;
    for (name, role) in &loaded.file.roles {
        let password = match &role.password_env {
            Some(var) => Some(
                loaded
                    .secrets
                    .get(var)
                    .with_context(|| format!("{var} is not set"))?,
            ),
            None => None,
        };
        ensure_role(&tx, name, password.as_deref()).await?;
    }
    tx.batch_execute(AUTH_SQL)
        .await
        .context("installing the auth schema")?;
    install_key(&tx, &key).await?;
    for name in loaded.file.roles.keys() {
        grant_public_schema(&tx, name).await?;
    }
    tx.commit().await?;
    drop(client);
    let _ = connection.await;
    eprintln!("auth schema, roles and claims key installed");
    Ok(())
}

/// Creates the role or resets its attributes: LOGIN and nothing privileged.
async fn ensure_role(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
    password: Option<&str>,
) -> anyhow::Result<()> {
    let ident = quote_ident(name);
    let exists = tx
        .query_opt("select 1 from pg_roles where rolname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        tx.batch_execute(&format!("create role {ident}")).await?;
    }
    let mut attributes =
        "login nosuperuser nobypassrls nocreaterole nocreatedb noreplication inherit".to_owned();
    if let Some(password) = password {
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        attributes.push_str(&format!(" password {}", quote_literal(&verifier)));
    }
    tx.batch_execute(&format!("alter role {ident} with {attributes}"))
        .await
        .with_context(|| format!("configuring role {name}"))?;
    // Membership in another role would give SET ROLE somewhere to go.
    let memberships = tx
        .query(
            "select r.rolname from pg_auth_members m join pg_roles r on r.oid = m.roleid \
             join pg_roles u on u.oid = m.member where u.rolname = $1",
            &[&name],
        )
        .await?;
    for row in memberships {
        let granted: String = row.get(0);
        tracing::warn!(role = name, member_of = %granted, "revoking role membership");
        tx.batch_execute(&format!("revoke {} from {ident}", quote_ident(&granted)))
            .await?;
    }
    Ok(())
}

async fn install_key(tx: &tokio_postgres::Transaction<'_>, key: &ClaimsKey) -> anyhow::Result<()> {
    let (ipad, opad) = key.pads();
    // One key at a time for now: replacing the key invalidates sessions
    // signed with the old one the next time they call auth.session().
    tx.execute(
        "delete from auth.claims_keys where (ipad, opad) <> ($1, $2)",
        &[&&ipad[..], &&opad[..]],
    )
    .await?;
    tx.execute(
        "insert into auth.claims_keys (ipad, opad) values ($1, $2) on conflict do nothing",
        &[&&ipad[..], &&opad[..]],
    )
    .await?;
    Ok(())
}

/// The grants of the Neon Authorize guide: use the public schema and its
/// tables; RLS policies decide which rows.
async fn grant_public_schema(
    tx: &tokio_postgres::Transaction<'_>,
    role: &str,
) -> anyhow::Result<()> {
    let r = quote_ident(role);
    tx.batch_execute(&format!(
        "grant usage on schema public to {r};
         grant select, insert, update, delete on all tables in schema public to {r};
         grant usage on all sequences in schema public to {r};
         alter default privileges in schema public
             grant select, insert, update, delete on tables to {r};
         alter default privileges in schema public grant usage on sequences to {r};"
    ))
    .await
    .with_context(|| format!("granting public schema access to {role}"))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the system random number generator is available");
    hex::encode(buf)
}
