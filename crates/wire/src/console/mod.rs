//! The operators' console: pgbouncer's admin database for authgres. An
//! operator connects with psql to the console's database name (`psql
//! "dbname=authgres user=ops ..."`) and runs `SHOW POOLS`, `PAUSE`,
//! `KILL_CLIENT 17`, ...; the commands and their column names are
//! pgbouncer's where they mean the same, so scripts and dashboards carry
//! over. [`command`] parses, [`run`] executes against the proxy's state
//! and answers with [`Reply`]; the session side (login, the protocol
//! loop) is `session/console.rs`.

pub mod command;
mod tables;
mod usage;

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::classify::SqlState;
use crate::config::ConsoleAccess;
use crate::control::ControlRequest;
use crate::proto::backend::ColumnType;
use crate::proxy::Proxy;
use command::{Command, Show};

/// How long the console waits for the process to answer a control
/// request (a reload reads files and may fetch nothing, so it is quick).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// A result set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Column names and types.
    pub columns: Vec<(&'static str, ColumnType)>,
    /// Rows of text values (`None`: NULL).
    pub rows: Vec<Vec<Option<String>>>,
}

/// What a command answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Notices sent before the result.
    pub notices: Vec<String>,
    /// The result set, for SHOW.
    pub table: Option<Table>,
    /// The CommandComplete tag.
    pub tag: &'static str,
}

impl Reply {
    fn done(command: &Command) -> Self {
        Self {
            notices: Vec::new(),
            table: None,
            tag: command.tag(),
        }
    }

    fn notice(mut self, notice: String) -> Self {
        self.notices.push(notice);
        self
    }
}

/// Why a command failed; the console goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failed {
    /// Its SQLSTATE.
    pub code: SqlState,
    /// What the operator reads.
    pub message: String,
}

impl Failed {
    fn new(code: SqlState, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<command::ParseError> for Failed {
    fn from(error: command::ParseError) -> Self {
        Self::new(SqlState::SyntaxError, error.to_string())
    }
}

/// Runs `command` for a user with `access`.
pub async fn run(proxy: &Proxy, access: ConsoleAccess, command: &Command) -> Result<Reply, Failed> {
    if command.needs_admin() && access != ConsoleAccess::Admin {
        return Err(Failed::new(
            SqlState::InsufficientPrivilege,
            format!(
                "{} is for admin users; this user may run SHOW only",
                command.tag()
            ),
        ));
    }
    let done = Reply::done(command);
    match command {
        Command::Show(what) => show(proxy, *what).await.map(|table| Reply {
            table: Some(table),
            ..done
        }),
        Command::Set => Ok(done),
        Command::Pause(database) => {
            check_database(proxy, database.as_deref())?;
            proxy.gates.pause(database.as_deref());
            for pool in proxy.pools() {
                pool.recall_kept(database.as_deref());
            }
            for pool in proxy.pools() {
                pool.wait_idle(database.as_deref(), far_future()).await;
            }
            Ok(done)
        }
        Command::Resume(database) => {
            check_database(proxy, database.as_deref())?;
            if proxy.gates.resume(database.as_deref()) {
                Ok(done)
            } else {
                Err(Failed::new(SqlState::InvalidParameterValue, "not paused"))
            }
        }
        Command::Reconnect(database) => {
            check_database(proxy, database.as_deref())?;
            let closed: usize = proxy
                .pools()
                .iter()
                .map(|pool| pool.reconnect(database.as_deref()))
                .sum();
            Ok(done.notice(format!(
                "closed {closed} idle server connections; the others are replaced as they come free"
            )))
        }
        Command::WaitClose(database) => {
            check_database(proxy, database.as_deref())?;
            for pool in proxy.pools() {
                pool.wait_closed(database.as_deref(), far_future()).await;
            }
            Ok(done)
        }
        Command::Disable(database) => {
            check_database(proxy, Some(database))?;
            proxy.gates.disable(database);
            Ok(done)
        }
        Command::Enable(database) => {
            if proxy.gates.enable(database) {
                Ok(done)
            } else {
                Err(Failed::new(
                    SqlState::InvalidParameterValue,
                    format!("database {database:?} is not disabled"),
                ))
            }
        }
        Command::KillClient(id) => {
            let http = proxy
                .clients
                .snapshot()
                .iter()
                .any(|c| c.id == *id && c.transport == crate::Transport::Http.label());
            if http {
                return Err(Failed::new(
                    SqlState::FeatureNotSupported,
                    format!(
                        "client {id} is an HTTP connection: its /sql requests end on their own \
                         ([http] statement_timeout)"
                    ),
                ));
            }
            if proxy.clients.kill(*id) {
                Ok(done)
            } else {
                Err(Failed::new(
                    SqlState::InvalidParameterValue,
                    format!("no client with id {id} (SHOW CLIENTS lists them)"),
                ))
            }
        }
        Command::Reload => {
            let restart = ask(proxy, ControlRequest::Reload)
                .await?
                .map_err(|error| Failed::new(SqlState::InvalidParameterValue, error))?;
            Ok(if restart.is_empty() {
                done
            } else {
                done.notice(format!(
                    "these changes take effect only after a restart: {}",
                    restart.join(", ")
                ))
            })
        }
        Command::Shutdown => {
            let control = proxy.control().ok_or_else(no_control)?;
            control
                .send(ControlRequest::Shutdown)
                .await
                .map_err(|_| no_control())?;
            Ok(done)
        }
    }
}

/// The SHOW commands' tables.
async fn show(proxy: &Proxy, what: Show) -> Result<Table, Failed> {
    Ok(match what {
        Show::Help => tables::help(),
        Show::Pools => tables::pools(proxy),
        Show::Clients => tables::clients(proxy),
        Show::Servers => tables::servers(proxy),
        Show::Stats => tables::stats(proxy),
        Show::Config => tables::config(ask(proxy, ControlRequest::ShowConfig).await?),
        Show::Version => tables::version(),
        Show::Databases => tables::databases(proxy),
        Show::Users => tables::users(proxy),
        Show::Lists => tables::lists(proxy),
        Show::Identities => crate::console::usage::identities(proxy),
        Show::Tenants => crate::console::usage::tenants(proxy),
        Show::Mem => {
            return Err(Failed::new(
                SqlState::FeatureNotSupported,
                "SHOW MEM lists pgbouncer's allocator caches; authgres has none: its memory is \
                 process_resident_memory_bytes in /metrics",
            ));
        }
    })
}

/// Refuses a database the proxy does not serve.
fn check_database(proxy: &Proxy, database: Option<&str>) -> Result<(), Failed> {
    let Some(database) = database else {
        return Ok(());
    };
    if proxy.settings().config.admission.serves_database(database) {
        Ok(())
    } else {
        Err(Failed::new(
            SqlState::UnknownDatabase,
            format!("no such database: {database}"),
        ))
    }
}

/// Asks the process, and waits for its answer.
async fn ask<T>(
    proxy: &Proxy,
    request: impl FnOnce(oneshot::Sender<T>) -> ControlRequest,
) -> Result<T, Failed> {
    let control = proxy.control().ok_or_else(no_control)?;
    let (reply, answer) = oneshot::channel();
    control
        .send(request(reply))
        .await
        .map_err(|_| no_control())?;
    tokio::time::timeout(CONTROL_TIMEOUT, answer)
        .await
        .map_err(|_| Failed::new(SqlState::Internal, "the process did not answer in time"))?
        .map_err(|_| no_control())
}

fn no_control() -> Failed {
    Failed::new(
        SqlState::AdminShutdown,
        "the process is draining or takes no control requests",
    )
}

/// A deadline the console's waits never reach: they end when their
/// condition holds or the console session closes.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}
