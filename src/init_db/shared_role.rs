//! Closing what Postgres scopes to "the same role": every user of the proxy
//! logs in as the same role, so any view or function whose check is "a
//! session of the same role" is a channel between users.
//!
//! Read from the Postgres sources (13 to 18), those are:
//! * other sessions' activity, query text included: `pg_stat_activity`,
//!   `pg_stat_ssl`, `pg_stat_gssapi`, the `pg_stat_progress_*` views and the
//!   `pg_stat_get_backend_*` / `pg_stat_get_activity` /
//!   `pg_stat_get_progress_info` functions under them;
//! * `pg_stat_statements` (query texts of the same user), when installed;
//! * signalling another session: `pg_cancel_backend`,
//!   `pg_terminate_backend`;
//! * large objects, whose owner (the shared role) may read, write and
//!   unlink them.
//!
//! Each is revoked from PUBLIC, since a grant to PUBLIC cannot be taken
//! from one role alone, and granted back to the predefined role that
//! administrators' tools already use for it: `pg_read_all_stats` (in
//! `pg_monitor`) for statistics, `pg_signal_backend` for signals, and the
//! database owner for large objects. Superusers are not affected. Before
//! Postgres 15, PUBLIC may also CREATE in schema `public`; that is revoked
//! too, with CREATE granted back to the database owner.

use anyhow::Context as _;

/// Statistics functions that show other sessions of the same role, by
/// name; every `pg_stat_get_backend_*` function of the server is added from
/// its catalog ([`BACKEND_FUNCTIONS`]), so what a new major adds there
/// (PostgreSQL 18's `pg_stat_get_backend_io`, `_wal`) is closed too.
const ACTIVITY_FUNCTIONS: &[&str] = &["pg_stat_get_activity", "pg_stat_get_progress_info"];
/// The `LIKE` pattern of the per-backend statistics functions.
const BACKEND_FUNCTIONS: &str = "pg\\_stat\\_get\\_backend\\_%";
/// Views over them.
const ACTIVITY_VIEWS: &[&str] = &[
    "pg_stat_activity",
    "pg_stat_ssl",
    "pg_stat_gssapi",
    "pg_stat_progress_analyze",
    "pg_stat_progress_basebackup",
    "pg_stat_progress_cluster",
    "pg_stat_progress_copy",
    "pg_stat_progress_create_index",
    "pg_stat_progress_vacuum",
];
/// Functions that signal another session of the same role.
const SIGNAL_FUNCTIONS: &[&str] = &["pg_cancel_backend", "pg_terminate_backend"];
/// The large-object functions.
const LARGE_OBJECT_FUNCTIONS: &[&str] = &[
    "lo_open",
    "lo_close",
    "loread",
    "lowrite",
    "lo_lseek",
    "lo_lseek64",
    "lo_tell",
    "lo_tell64",
    "lo_truncate",
    "lo_truncate64",
    "lo_creat",
    "lo_create",
    "lo_unlink",
    "lo_import",
    "lo_export",
    "lo_from_bytea",
    "lo_get",
    "lo_put",
];

/// Revokes every channel from PUBLIC and grants it back to the roles
/// administrators use (see the module docs).
pub async fn close(tx: &tokio_postgres::Transaction<'_>) -> anyhow::Result<()> {
    let owner: String = tx
        .query_one(
            "select pg_catalog.quote_ident(r.rolname) from pg_catalog.pg_database d \
             join pg_catalog.pg_roles r on r.oid = d.datdba where d.datname = current_database()",
            &[],
        )
        .await?
        .get(0);
    let backend: Vec<String> = tx
        .query(
            "select distinct p.proname::text from pg_catalog.pg_proc p \
               join pg_catalog.pg_namespace n on n.oid = p.pronamespace \
              where n.nspname = 'pg_catalog' and p.proname like $1",
            &[&BACKEND_FUNCTIONS],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let activity: Vec<&str> = ACTIVITY_FUNCTIONS
        .iter()
        .copied()
        .chain(backend.iter().map(String::as_str))
        .collect();
    for (functions, grantee) in [
        (activity.as_slice(), "pg_read_all_stats"),
        (SIGNAL_FUNCTIONS, "pg_signal_backend"),
        (LARGE_OBJECT_FUNCTIONS, owner.as_str()),
    ] {
        revoke(tx, Kind::Functions, "pg_catalog", functions, grantee).await?;
    }
    revoke(
        tx,
        Kind::Views,
        "pg_catalog",
        ACTIVITY_VIEWS,
        "pg_read_all_stats",
    )
    .await?;
    close_statements(tx).await?;
    close_public_schema(tx, &owner).await
}

/// pg_stat_statements, wherever it was installed: one user's statements
/// are not another's to read.
async fn close_statements(tx: &tokio_postgres::Transaction<'_>) -> anyhow::Result<()> {
    let installed = tx
        .query_opt(
            "select n.nspname from pg_catalog.pg_extension e \
             join pg_catalog.pg_namespace n on n.oid = e.extnamespace \
             where e.extname = 'pg_stat_statements'",
            &[],
        )
        .await?;
    if let Some(row) = installed {
        let schema: String = row.get(0);
        let statements = &["pg_stat_statements"];
        revoke(
            tx,
            Kind::Functions,
            &schema,
            statements,
            "pg_read_all_stats",
        )
        .await?;
        revoke(tx, Kind::Views, &schema, statements, "pg_read_all_stats").await?;
    }
    Ok(())
}

/// Before Postgres 15 any role may create objects in `public`, where one
/// user's function or table could stand in for what another's statements
/// name: CREATE there goes to the database's `owner` only.
async fn close_public_schema(
    tx: &tokio_postgres::Transaction<'_>,
    owner: &str,
) -> anyhow::Result<()> {
    let owns_public = tx
        .query_opt(
            "select 1 from pg_catalog.pg_namespace \
              where nspname = 'public' and pg_catalog.pg_has_role(nspowner, 'usage')",
            &[],
        )
        .await?
        .is_some();
    if owns_public {
        tx.batch_execute(&format!(
            "revoke create on schema public from public; grant create on schema public to {owner}"
        ))
        .await
        .context("revoking CREATE on schema public from PUBLIC")?;
    }
    Ok(())
}

/// A channel between users of one login role that is still open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The login role.
    pub role: String,
    /// What it can still do to or see of another session of itself.
    pub channel: &'static str,
}

/// The channels, each with one object whose privilege shows whether it is
/// closed for a role (`$1`): the revokes above close all of an entry's
/// objects or none (they are made by the same grantor).
const PROBES: &[(&str, &str)] = &[
    (
        "other sessions' statements in pg_stat_activity",
        "not pg_catalog.has_table_privilege($1, 'pg_catalog.pg_stat_activity', 'select')",
    ),
    (
        "cancelling or terminating other sessions (pg_cancel_backend)",
        "not pg_catalog.has_function_privilege($1, 'pg_catalog.pg_cancel_backend(integer)', 'execute')",
    ),
    (
        "large objects of other sessions (lo_get, lo_put, lo_unlink)",
        "not pg_catalog.has_function_privilege($1, 'pg_catalog.lo_get(oid)', 'execute')",
    ),
    (
        "CREATE in schema public (objects that stand in for another user's names)",
        "not pg_catalog.has_schema_privilege($1, 'public', 'create')",
    ),
];

/// The channels still open for each of `roles` (see the module docs).
pub async fn check(client: &tokio_postgres::Client, roles: &[String]) -> anyhow::Result<Vec<Open>> {
    let mut open = Vec::new();
    for role in roles {
        for (channel, closed) in PROBES {
            let is_closed: bool = client
                .query_one(&format!("select {closed}"), &[role])
                .await
                .with_context(|| format!("checking {channel} for {role}"))?
                .get(0);
            if !is_closed {
                open.push(Open {
                    role: role.clone(),
                    channel,
                });
            }
        }
        // pg_stat_statements only where it is installed.
        let statements = client
            .query_opt(
                "select pg_catalog.has_function_privilege($1, p.oid, 'execute')                    from pg_catalog.pg_proc p where p.proname = 'pg_stat_statements' limit 1",
                &[role],
            )
            .await?;
        if statements.is_some_and(|row| row.get::<_, bool>(0)) {
            open.push(Open {
                role: role.clone(),
                channel: "other sessions' statements in pg_stat_statements",
            });
        }
    }
    Ok(open)
}

/// What to print about [`check`]'s findings.
pub fn explain(open: &[Open], superuser: bool) -> Vec<String> {
    if open.is_empty() {
        return vec![
            "isolation between users of a login role: every channel init-db knows is closed"
                .to_owned(),
        ];
    }
    let mut lines = vec![
        "warning: these channels between users of one login role stay open (only the \
         bootstrap superuser may revoke pg_catalog grants from PUBLIC; see \
         docs/managed-postgres.md):"
            .to_owned(),
    ];
    for entry in open {
        lines.push(format!("  {}: {}", entry.role, entry.channel));
    }
    if !superuser {
        lines.push(
            "  what holds regardless: each user's auth.user_id() and RLS; what does not: one \
             user may see or cancel another's statements of the same role"
                .to_owned(),
        );
    }
    lines
}

/// What [`revoke`] closes: functions (every overload) or views.
#[derive(Clone, Copy)]
enum Kind {
    Functions,
    Views,
}

impl Kind {
    /// The catalog query naming the objects `$2` in schema `$1` that
    /// exist, as SQL can name them again.
    fn lookup(self) -> &'static str {
        match self {
            Self::Functions => {
                "select p.oid::pg_catalog.regprocedure::pg_catalog.text from pg_catalog.pg_proc p \
                 join pg_catalog.pg_namespace n on n.oid = p.pronamespace \
                 where n.nspname = $1 and p.proname = any($2) \
                   and pg_catalog.pg_has_role(p.proowner, 'usage')"
            }
            Self::Views => {
                "select c.oid::pg_catalog.regclass::pg_catalog.text from pg_catalog.pg_class c \
                 join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
                 where n.nspname = $1 and c.relname = any($2) \
                   and pg_catalog.pg_has_role(c.relowner, 'usage')"
            }
        }
    }

    /// The privilege and object phrase of a GRANT on `object`.
    fn privilege_on(self, object: &str) -> String {
        match self {
            Self::Functions => format!("execute on function {object}"),
            Self::Views => format!("select on {object}"),
        }
    }
}

/// Revokes the privilege of `kind` on each of `names` in `schema` that
/// exists, and that init-db's user owns (only an owner's revoke changes
/// anything), from PUBLIC and grants it to `grantee`.
async fn revoke(
    tx: &tokio_postgres::Transaction<'_>,
    kind: Kind,
    schema: &str,
    names: &[&str],
    grantee: &str,
) -> anyhow::Result<()> {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let objects = tx.query(kind.lookup(), &[&schema, &names]).await?;
    for row in objects {
        let object: String = row.get(0);
        let privilege = kind.privilege_on(&object);
        tx.batch_execute(&format!(
            "revoke {privilege} from public; grant {privilege} to {grantee}"
        ))
        .await
        .with_context(|| format!("closing {object} to the login roles"))?;
    }
    Ok(())
}
