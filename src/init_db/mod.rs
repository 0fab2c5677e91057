//! `authgres init-db`: secrets, roles, the `auth` schema and the claims key.
//!
//! Idempotent: secrets that exist are kept, roles are created or brought to
//! the required attributes, the schema is re-applied, the key is inserted
//! once. Passwords travel as SCRAM verifiers, so they never appear in the
//! server's statement log.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use authgres_wire::ClaimsKey;

use crate::config::Loaded;

mod admin;
mod grants;
mod identity;
mod policies;
mod roles;
mod shared_role;
mod sql;

pub use identity::{Choice as IdentityChoice, Path as IdentityPath};

/// The auth schema with the portable identity path, applied verbatim.
pub const AUTH_SQL: &str = include_str!("../../sql/auth.sql");

/// What `init-db` was asked to do besides installing.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Keep or remove claims keys other than the configured one.
    pub old_keys: OldKeys,
    /// Start a claims-key rotation first.
    pub rotate_claims_key: bool,
    /// Generate new passwords for roles that exist, and set them.
    pub reset_passwords: bool,
    /// Roles that create tables later (migrations): tables they create are
    /// granted to the login roles as they appear.
    pub migration_roles: Vec<String>,
    /// Which identity path to install: native where possible, or portable.
    pub identity: IdentityChoice,
}

/// Installs or repairs everything in the database the administrator's
/// connection (`admin_url`, or libpq's environment) names.
pub async fn run(config: &Path, admin_url: Option<&str>, options: &Options) -> anyhow::Result<()> {
    let loaded = Loaded::from_path(config)?;
    let client = admin::connect(admin_url).await?;
    check_server_version(&client).await?;
    let mut existing = HashMap::new();
    for name in loaded.file.roles.keys() {
        if let Some(role) = roles::Existing::read(&client, name).await? {
            existing.insert(name.clone(), role);
        }
    }
    let mut loaded = prepare_secrets(config, loaded, &existing, options.reset_passwords)?;
    if options.rotate_claims_key {
        loaded = rotate_claims_key(config, &loaded)?;
    }
    init_db(&loaded, client, &existing, options).await
}

/// Generates the missing secrets into the secrets file: the claims key,
/// each console user's password, and the password of each role that does
/// not exist yet (or every role's, with `reset_passwords`). A role that
/// exists keeps its password: a new one would lock out every proxy running
/// with the old.
fn prepare_secrets(
    config: &Path,
    loaded: Loaded,
    existing: &HashMap<String, roles::Existing>,
    reset_passwords: bool,
) -> anyhow::Result<Loaded> {
    let mut wanted = Vec::new();
    if loaded
        .secrets
        .get(&loaded.file.identity.claims_key_env)
        .is_none()
    {
        wanted.push((loaded.file.identity.claims_key_env.clone(), random_hex(32)));
    }
    if let Some(console) = &loaded.file.console {
        for secret in console
            .admin_users
            .values()
            .chain(console.stats_users.values())
        {
            if loaded.secrets.get(secret).is_none() && !wanted.iter().any(|(n, _)| n == secret) {
                wanted.push((secret.clone(), random_hex(24)));
            }
        }
    }
    let mut unknown = Vec::new();
    for (name, role) in &loaded.file.roles {
        let Some(var) = &role.password_env else {
            continue;
        };
        let missing = loaded.secrets.get(var).is_none();
        if reset_passwords || (missing && !existing.contains_key(name)) {
            wanted.push((var.clone(), random_hex(24)));
        } else if missing {
            unknown.push(format!("{name} ({var})"));
        }
    }
    if !unknown.is_empty() {
        bail!(
            "these roles exist in the database but their passwords are not in the secrets: {}\n  \
             copy them from the secrets file the proxies use, or run init-db with \
             --reset-passwords to set new ones (then reload every proxy: SIGHUP)",
            unknown.join(", ")
        );
    }
    if wanted.is_empty() {
        return Ok(loaded);
    }
    let Some(file) = loaded.secrets.file() else {
        let names: Vec<_> = wanted.iter().map(|(n, _)| n.as_str()).collect();
        bail!(
            "secrets {} are not set and no secrets_file is configured to generate them into",
            names.join(", ")
        );
    };
    for (name, value) in &wanted {
        if std::env::var_os(name).is_some() {
            bail!("{name} is set in the environment, which would hide the generated one; unset it");
        }
        replace_secret(file, name, value)?;
        eprintln!("generated {name} into {}", file.display());
    }
    Loaded::from_path(config)
}

/// What to do with claims keys other than the configured one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OldKeys {
    /// Keep accepting them (a rotation is under way).
    #[default]
    Keep,
    /// Remove them (the rotation is finished).
    Retire,
}

/// The schema version `sql/auth.sql` installs (4: the generation from
/// `currval`, the verified mark, `auth.session_claims()`, and the native
/// path beside it).
pub const SCHEMA_VERSION: i32 = 4;

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
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(error).with_context(|| format!("reading {}", file.display())),
    };
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

/// Installs everything through the administrator's `client`.
async fn init_db(
    loaded: &Loaded,
    mut client: tokio_postgres::Client,
    existing: &HashMap<String, roles::Existing>,
    options: &Options,
) -> anyhow::Result<()> {
    let key = loaded.claims_key()?;
    let administrator = Administrator::read(&client).await?;
    administrator.check()?;
    // Re-running is normal: "already exists, skipping" notices are noise.
    client
        .batch_execute("set client_min_messages = warning")
        .await?;
    let passwords = decide_passwords(
        loaded,
        &administrator.database,
        existing,
        options.reset_passwords,
    )
    .await?;
    let mut report = roles::Report::default();
    let mut tx = client.transaction().await?;
    for name in loaded.file.roles.keys() {
        let password = passwords
            .get(name)
            .map_or(roles::Password::Keep, |p| roles::Password::Set(p));
        roles::ensure(&tx, name, existing.get(name), password, &mut report).await?;
    }
    let path_before = identity::installed(&tx).await?;
    let previous = install_schema(&tx, &administrator.name).await?;
    let (path, path_line) = identity::install(
        &mut tx,
        path_before,
        administrator.superuser,
        options.identity,
    )
    .await?;
    let others = install_key(&tx, &key, options.old_keys).await?;
    for (name, role) in &loaded.file.roles {
        grants::public_schema(&tx, name, role.table_access(), &options.migration_roles).await?;
    }
    shared_role::close(&tx).await?;
    tx.commit().await?;
    // A new keys' epoch now that the keys above are visible: a portable
    // mark made meanwhile, under the keys before, is checked again.
    client
        .batch_execute("select pg_catalog.nextval('auth.keys_epoch_seq')")
        .await
        .context("starting a new keys' epoch")?;
    for line in &report.lines {
        eprintln!("{line}");
    }
    match previous {
        Some(v) if v == SCHEMA_VERSION => eprintln!("auth schema v{v} re-applied"),
        Some(v) => eprintln!("auth schema upgraded from v{v} to v{SCHEMA_VERSION}"),
        None => eprintln!("auth schema v{SCHEMA_VERSION} installed"),
    }
    if previous.is_some_and(|v| v < 4) && path == IdentityPath::Portable {
        // They have a generation but no verified mark (new in v4).
        eprintln!(
            "  sessions attached before this upgrade get an error from auth.*() until the proxy \
             attaches them again (their next client, or a reconnect)"
        );
    }
    eprintln!("{path_line}");
    if others > 0 {
        eprintln!(
            "{others} older claims key(s) still accepted: once every proxy runs with the new \
             key, run `authgres init-db --retire-old-keys`"
        );
    }
    let login_roles: Vec<String> = loaded.file.roles.keys().cloned().collect();
    for line in grants::without_rls(&client).await? {
        eprintln!("{line}");
    }
    if path == IdentityPath::Portable {
        for line in policies::unwrapped(&client).await? {
            eprintln!("{line}");
        }
    }
    if options.migration_roles.is_empty() {
        eprintln!(
            "tables created later by another role (migrations) are not granted to the login \
             roles: run init-db again after migrations, or pass --migration-role ROLE"
        );
    }
    let open = shared_role::check(&client, &login_roles).await?;
    for line in shared_role::explain(&open, administrator.superuser) {
        eprintln!("{line}");
    }
    eprintln!("roles and claims key installed");
    Ok(())
}

/// Installs (or upgrades, or re-applies) `sql/auth.sql` and records its
/// version; returns the version it found. `administrator` names who runs
/// init-db, for the error when the schema belongs to someone else.
async fn install_schema(
    tx: &tokio_postgres::Transaction<'_>,
    administrator: &str,
) -> anyhow::Result<Option<i32>> {
    let previous = installed_version(tx).await?;
    tx.batch_execute(AUTH_SQL).await.map_err(|error| {
        anyhow::anyhow!(
            "installing the auth schema: {}\n  the schema and its objects must be owned by \
             init-db's user ({administrator}) or a role it is a member of; on Supabase, schema \
             `auth` belongs to Supabase Auth (see docs/managed-postgres.md)",
            roles::db_message(&error),
        )
    })?;
    tx.execute(
        "insert into auth.schema_version (version) values ($1) \
         on conflict (singleton) do update set version = excluded.version, installed_at = now()",
        &[&SCHEMA_VERSION],
    )
    .await?;
    Ok(previous)
}

/// Who runs init-db, and what that allows.
struct Administrator {
    name: String,
    database: String,
    superuser: bool,
    may_create_schema: bool,
}

impl Administrator {
    async fn read(client: &tokio_postgres::Client) -> anyhow::Result<Self> {
        let row = client
            .query_one(
                "select current_user::text, r.rolsuper, \
                        pg_catalog.has_database_privilege(pg_catalog.current_database(), 'create'), \
                        pg_catalog.current_database()::text \
                   from pg_catalog.pg_roles r where r.rolname = current_user",
                &[],
            )
            .await
            .context("reading init-db's own privileges")?;
        Ok(Self {
            name: row.get(0),
            superuser: row.get(1),
            may_create_schema: row.get(2),
            database: row.get(3),
        })
    }

    /// Refuses, with what to do, when the schema cannot be installed.
    fn check(&self) -> anyhow::Result<()> {
        if !self.may_create_schema {
            bail!(
                "{} may not create schemas in this database; run init-db as the database owner, \
                 or have it run `GRANT CREATE ON DATABASE <database> TO {}`",
                self.name,
                sql::quote_ident(&self.name)
            );
        }
        Ok(())
    }
}

/// Which roles get their password set: new ones, all with
/// `reset_passwords`, and those whose configured password no longer logs
/// in (a client may have changed it: any role can change its own). An
/// existing role is tried with the proxy's own login, as `serve` would.
async fn decide_passwords(
    loaded: &Loaded,
    database: &str,
    existing: &HashMap<String, roles::Existing>,
    reset_passwords: bool,
) -> anyhow::Result<HashMap<String, String>> {
    let proxy = loaded.proxy_config()?;
    let mut decided = HashMap::new();
    for (name, role) in &loaded.file.roles {
        let Some(password) = role
            .password_env
            .as_ref()
            .and_then(|var| loaded.secrets.get(var))
        else {
            continue;
        };
        let set = if reset_passwords || !existing.contains_key(name) {
            true
        } else {
            match authgres_wire::connect_upstream(
                &proxy.upstream,
                name,
                database,
                Some(&password),
                &[],
            )
            .await
            {
                Ok(conn) => {
                    conn.terminate().await;
                    false
                }
                Err(authgres_wire::UpstreamError::LoginRefused { error, .. })
                    if error.code() == "28P01" =>
                {
                    eprintln!(
                        "role {name}: the proxy's password does not log in (a client of the role \
                         may have changed it); setting it back"
                    );
                    true
                }
                Err(error) => {
                    eprintln!(
                        "role {name}: could not try the proxy's login from here ({error}); \
                         its password is left as it is"
                    );
                    false
                }
            }
        };
        if set {
            decided.insert(name.clone(), password);
        }
    }
    Ok(decided)
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
