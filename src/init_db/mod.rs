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

mod shared_role;

/// The auth schema, applied verbatim.
pub const AUTH_SQL: &str = include_str!("../../sql/auth.sql");

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

/// What to do with claims keys other than the configured one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKeys {
    /// Keep accepting them (a rotation is under way).
    Keep,
    /// Remove them (the rotation is finished).
    Retire,
}

/// The schema version `sql/auth.sql` installs.
pub const SCHEMA_VERSION: i32 = 1;

/// Writes a fresh claims key into the secrets file, replacing the current
/// one there; the database keeps accepting the old key until
/// `--retire-old-keys`.
pub fn rotate_claims_key(config: &Path, loaded: &Loaded) -> anyhow::Result<Loaded> {
    let name = &loaded.file.identity.claims_key_env;
    let Some(file) = loaded.secrets.file() else {
        bail!("--rotate-claims-key needs a secrets_file to write the new key into");
    };
    if std::env::var_os(name).is_some() {
        bail!(
            "{name} is set in the environment, which would override the rotated key; \
             unset it or rotate by setting it yourself"
        );
    }
    replace_secret(file, name, &random_hex(32))?;
    eprintln!("wrote a new {name} into {}", file.display());
    Loaded::from_path(config)
}

/// Rewrites `name=...` in a KEY=VALUE file atomically, keeping mode 0600.
fn replace_secret(file: &Path, name: &str, value: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut lines: Vec<String> = text
        .lines()
        .filter(|line| {
            let line = line.trim_start().trim_start_matches("export ");
            line.split_once('=')
                .is_none_or(|(key, _)| key.trim() != name)
        })
        .map(str::to_owned)
        .collect();
    lines.push(format!("{name}={value}"));
    let tmp = file.with_extension("tmp");
    let mut out = std::fs::OpenOptions::new();
    out.write(true).create(true).truncate(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut out, 0o600);
    let mut out = out
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    writeln!(out, "{}", lines.join("\n"))?;
    out.sync_all()?;
    std::fs::rename(&tmp, file).with_context(|| format!("replacing {}", file.display()))?;
    Ok(())
}

/// The oldest Postgres major authgres supports: the oldest CI proves (13
/// reached end of life in November 2025).
pub const OLDEST_MAJOR: i32 = 14;

/// Refuses a server older than [`OLDEST_MAJOR`], with what to do.
async fn check_server_version(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    let row = client
        .query_one(
            "select current_setting('server_version_num')::int, current_setting('server_version')",
            &[],
        )
        .await
        .context("reading the server version")?;
    let (number, version): (i32, String) = (row.get(0), row.get(1));
    if number / 10000 < OLDEST_MAJOR {
        anyhow::bail!(
            "this server runs PostgreSQL {version}; authgres supports PostgreSQL {OLDEST_MAJOR} \
             and later (upgrade the server; 13 is past its end of life)"
        );
    }
    Ok(())
}

/// Installs everything into the database at `admin_url`.
pub async fn init_db(loaded: &Loaded, admin_url: &str, old_keys: OldKeys) -> anyhow::Result<()> {
    let key = loaded.claims_key()?;
    let (mut client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .context("connecting with --admin-url")?;
    let connection = tokio::spawn(connection);
    check_server_version(&client).await?;
    // Re-running is normal: "already exists, skipping" notices are noise.
    client
        .batch_execute("set client_min_messages = warning")
        .await?;
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
    let previous = installed_version(&tx).await?;
    tx.batch_execute(AUTH_SQL)
        .await
        .context("installing the auth schema")?;
    tx.execute(
        "insert into auth.schema_version (version) values ($1) \
         on conflict (singleton) do update set version = excluded.version, installed_at = now()",
        &[&SCHEMA_VERSION],
    )
    .await?;
    let others = install_key(&tx, &key, old_keys).await?;
    for name in loaded.file.roles.keys() {
        grant_public_schema(&tx, name).await?;
    }
    shared_role::close(&tx).await?;
    tx.commit().await?;
    drop(client);
    let _ = connection.await;
    match previous {
        Some(v) if v == SCHEMA_VERSION => eprintln!("auth schema v{v} re-applied"),
        Some(v) => eprintln!("auth schema upgraded from v{v} to v{SCHEMA_VERSION}"),
        None => eprintln!("auth schema v{SCHEMA_VERSION} installed"),
    }
    if others > 0 {
        eprintln!(
            "{others} older claims key(s) still accepted: once every proxy runs with the new \
             key, run `authgres init-db --retire-old-keys`"
        );
    }
    eprintln!("roles and claims key installed");
    Ok(())
}

/// The schema version installed before this run: `None` for a database
/// without the auth schema, 0 for one from before versioning.
async fn installed_version(tx: &tokio_postgres::Transaction<'_>) -> anyhow::Result<Option<i32>> {
    let has_schema = tx
        .query_opt("select 1 from pg_namespace where nspname = 'auth'", &[])
        .await?
        .is_some();
    if !has_schema {
        return Ok(None);
    }
    let has_table = tx
        .query_one("select to_regclass('auth.schema_version') is not null", &[])
        .await?
        .get::<_, bool>(0);
    if !has_table {
        return Ok(Some(0));
    }
    let row = tx
        .query_opt("select version from auth.schema_version", &[])
        .await?;
    Ok(Some(row.map_or(0, |r| r.get(0))))
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

/// Installs the configured key; returns how many other keys remain.
async fn install_key(
    tx: &tokio_postgres::Transaction<'_>,
    key: &ClaimsKey,
    old_keys: OldKeys,
) -> anyhow::Result<i64> {
    let (ipad, opad) = key.pads();
    tx.execute(
        "insert into auth.claims_keys (ipad, opad) values ($1, $2) on conflict do nothing",
        &[&&ipad[..], &&opad[..]],
    )
    .await?;
    if old_keys == OldKeys::Retire {
        let retired = tx
            .execute(
                "delete from auth.claims_keys where (ipad, opad) <> ($1, $2)",
                &[&&ipad[..], &&opad[..]],
            )
            .await?;
        eprintln!("retired {retired} older claims key(s)");
    }
    let others = tx
        .query_one(
            "select count(*) from auth.claims_keys where (ipad, opad) <> ($1, $2)",
            &[&&ipad[..], &&opad[..]],
        )
        .await?
        .get(0);
    Ok(others)
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
    #[allow(
        clippy::expect_used,
        reason = "secrets cannot be generated without the system RNG"
    )]
    getrandom::fill(&mut buf).expect("the system random number generator is available");
    hex::encode(buf)
}
