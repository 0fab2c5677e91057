//! Which identity path a database gets, and what init-db says about it.
//!
//! `sql/auth.sql` installs the portable path's functions (core SQL) with
//! the schema; `sql/identity_native.sql` replaces them with the native
//! ones, which answer from backend memory and need a superuser to create
//! `LANGUAGE C` functions and a server that can load the `authgres`
//! library from its `dynamic_library_path`. init-db applies it in a
//! savepoint and keeps the portable path when that fails, saying why. `CREATE OR
//! REPLACE` keeps the functions' OIDs, so policies keep working when a
//! database switches path in place, either way.

use anyhow::Context as _;
use tokio_postgres::error::SqlState;

/// The native path's functions, replacing the portable ones.
const NATIVE_SQL: &str = include_str!("../../sql/identity_native.sql");

/// An identity path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The `authgres` C library.
    Native,
    /// Core SQL only.
    Portable,
}

impl Path {
    fn describe(self) -> &'static str {
        match self {
            Path::Native => "native (the authgres library answers auth.*() from backend memory)",
            Path::Portable => "portable (core SQL)",
        }
    }
}

/// Which path init-db should install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// Native where it can be installed, portable otherwise.
    #[default]
    Best,
    /// Portable even where native could be installed (`--portable`).
    Portable,
}

/// Installs the chosen path in `tx`, where `sql/auth.sql` has just put
/// the portable one; returns the path installed and the line that says
/// which and why. `before` is the path the database had before this run.
pub async fn install(
    tx: &mut tokio_postgres::Transaction<'_>,
    before: Option<Path>,
    superuser: bool,
    choice: Choice,
) -> anyhow::Result<(Path, String)> {
    let native_refused = match (choice, superuser) {
        (Choice::Portable, _) => Some("--portable was given".to_owned()),
        (Choice::Best, false) => Some(
            "init-db's user is not a superuser (as on managed services), and only a superuser \
             may create LANGUAGE C functions"
                .to_owned(),
        ),
        (Choice::Best, true) => try_native(tx).await?,
    };
    let (path, mut line) = match native_refused {
        None => (
            Path::Native,
            format!("identity path: {}", Path::Native.describe()),
        ),
        Some(reason) => (
            Path::Portable,
            format!("identity path: {}: {reason}", Path::Portable.describe()),
        ),
    };
    if let Some(old) = before.filter(|old| *old != path) {
        line.push_str(&format!(
            "\n  switched from {}; both paths draw the generation alike, so attached sessions \
             and pooled backends keep their identity",
            old.describe()
        ));
    }
    Ok((path, line))
}

/// Tries the native functions in a savepoint: `None` when they are in,
/// else why not (the library is not on `dynamic_library_path`, or was
/// built for another server major).
async fn try_native(tx: &mut tokio_postgres::Transaction<'_>) -> anyhow::Result<Option<String>> {
    let savepoint = tx.savepoint("authgres_native").await?;
    match savepoint.batch_execute(NATIVE_SQL).await {
        Ok(()) => {
            savepoint.commit().await?;
            Ok(None)
        }
        Err(error) => {
            let Some(db) = error.as_db_error() else {
                return Err(error).context("installing the native identity functions");
            };
            let unusable = [
                SqlState::UNDEFINED_FILE,
                SqlState::UNDEFINED_FUNCTION,
                SqlState::INSUFFICIENT_PRIVILEGE,
            ]
            .contains(db.code())
                || db.message().starts_with("incompatible library");
            if !unusable {
                return Err(error).context("installing the native identity functions");
            }
            savepoint.rollback().await?;
            Ok(Some(format!(
                "the server cannot load the authgres library ({}); build and install it from \
                 native/ (`make && sudo make install`, see README.md) and run init-db again \
                 for the native path",
                db.message()
            )))
        }
    }
}

/// The path installed in the database, asked of the catalog: the language
/// of `auth.session()`. `None` without the auth schema.
pub async fn installed(
    client: &impl tokio_postgres::GenericClient,
) -> anyhow::Result<Option<Path>> {
    let row = client
        .query_opt(
            "select l.lanname::text from pg_catalog.pg_proc p \
               join pg_catalog.pg_language l on l.oid = p.prolang \
              where p.oid = pg_catalog.to_regprocedure('auth.session()')",
            &[],
        )
        .await
        .context("asking the catalog which identity path is installed")?;
    Ok(row.map(|row| {
        if row.get::<_, String>(0) == "c" {
            Path::Native
        } else {
            Path::Portable
        }
    }))
}
