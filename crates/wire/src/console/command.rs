//! Console commands as an operator types them (pgbouncer's words): parsed
//! from a simple query, sans-IO.

/// What `SHOW` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// The commands.
    Help,
    /// Each pool: clients and servers by (database, role).
    Pools,
    /// Each client connection.
    Clients,
    /// Each server connection.
    Servers,
    /// Totals by database and role.
    Stats,
    /// The running configuration.
    Config,
    /// The proxy's version.
    Version,
    /// Each database served.
    Databases,
    /// Each role served.
    Users,
    /// Counts of what the proxy holds.
    Lists,
    /// pgbouncer's allocator caches: authgres has none.
    Mem,
    /// The heaviest identities (users) over the `[metrics]` window.
    Identities,
    /// The heaviest tenants over the same window.
    Tenants,
}

/// A console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `SHOW ...`.
    Show(Show),
    /// `PAUSE [db]`: new transactions wait, running ones finish.
    Pause(Option<String>),
    /// `RESUME [db]`: undoes PAUSE.
    Resume(Option<String>),
    /// `RECONNECT [db]`: every server connection is replaced as it comes
    /// free.
    Reconnect(Option<String>),
    /// `WAIT_CLOSE [db]`: waits until the connections RECONNECT retired
    /// are closed.
    WaitClose(Option<String>),
    /// `DISABLE db`: new logins to it are refused.
    Disable(String),
    /// `ENABLE db`: undoes DISABLE.
    Enable(String),
    /// `KILL_CLIENT id`: closes one client connection now.
    KillClient(u64),
    /// `RELOAD`: reads the configuration again.
    Reload,
    /// `SHUTDOWN`: drains and exits, as SIGTERM.
    Shutdown,
    /// `SET ...`: accepted and ignored, as pgbouncer does, so drivers that
    /// set parameters on connecting can use the console.
    Set,
}

/// Why a command was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a console command.
    #[error("invalid command {0:?}, use SHOW HELP;")]
    Unknown(String),
    /// A command that needs an argument got none.
    #[error("{0} needs {1}")]
    Missing(&'static str, &'static str),
    /// An argument that is not what the command takes.
    #[error("{0}: {1}")]
    BadArgument(&'static str, String),
}

impl Command {
    /// Whether only admin users may run it (stats users may run SHOW).
    pub fn needs_admin(&self) -> bool {
        !matches!(self, Self::Show(_) | Self::Set)
    }

    /// The tag of its CommandComplete.
    pub fn tag(&self) -> &'static str {
        match self {
            Self::Show(_) => "SHOW",
            Self::Pause(_) => "PAUSE",
            Self::Resume(_) => "RESUME",
            Self::Reconnect(_) => "RECONNECT",
            Self::WaitClose(_) => "WAIT_CLOSE",
            Self::Disable(_) => "DISABLE",
            Self::Enable(_) => "ENABLE",
            Self::KillClient(_) => "KILL_CLIENT",
            Self::Reload => "RELOAD",
            Self::Shutdown => "SHUTDOWN",
            Self::Set => "SET",
        }
    }
}

/// The statements of one simple query, split at semicolons; empty ones
/// are dropped.
pub fn statements(query: &str) -> impl Iterator<Item = &str> {
    query.split(';').map(str::trim).filter(|s| !s.is_empty())
}

/// Parses one statement.
pub fn parse(statement: &str) -> Result<Command, ParseError> {
    let mut words = statement.split_whitespace();
    let verb = words.next().unwrap_or_default().to_ascii_uppercase();
    let argument = words.next().map(unquote);
    let unknown = || ParseError::Unknown(statement.chars().take(100).collect());
    if words.next().is_some() && verb != "SET" {
        return Err(unknown());
    }
    let database = |name: &'static str| {
        argument
            .clone()
            .ok_or(ParseError::Missing(name, "a database"))
    };
    Ok(match verb.as_str() {
        "SHOW" => Command::Show(show(argument.as_deref().unwrap_or_default()).ok_or_else(unknown)?),
        "PAUSE" => Command::Pause(argument),
        "RESUME" => Command::Resume(argument),
        "RECONNECT" => Command::Reconnect(argument),
        "WAIT_CLOSE" => Command::WaitClose(argument),
        "DISABLE" => Command::Disable(database("DISABLE")?),
        "ENABLE" => Command::Enable(database("ENABLE")?),
        "KILL_CLIENT" => {
            let id = argument.ok_or(ParseError::Missing("KILL_CLIENT", "a client id"))?;
            let parsed = id.parse().map_err(|_| {
                ParseError::BadArgument(
                    "KILL_CLIENT",
                    format!("{id:?} is not a client id (SHOW CLIENTS lists them)"),
                )
            })?;
            Command::KillClient(parsed)
        }
        "RELOAD" if argument.is_none() => Command::Reload,
        "SHUTDOWN" if argument.is_none() => Command::Shutdown,
        "SET" => Command::Set,
        _ => return Err(unknown()),
    })
}

fn show(what: &str) -> Option<Show> {
    Some(match what.to_ascii_uppercase().as_str() {
        "HELP" => Show::Help,
        "POOLS" => Show::Pools,
        "CLIENTS" => Show::Clients,
        "SERVERS" => Show::Servers,
        "STATS" => Show::Stats,
        "CONFIG" => Show::Config,
        "VERSION" => Show::Version,
        "DATABASES" => Show::Databases,
        "USERS" => Show::Users,
        "LISTS" => Show::Lists,
        "MEM" => Show::Mem,
        "IDENTITIES" => Show::Identities,
        "TENANTS" => Show::Tenants,
        _ => return None,
    })
}

/// An identifier without its double quotes (`"app"` is `app`).
fn unquote(word: &str) -> String {
    word.strip_prefix('"')
        .and_then(|w| w.strip_suffix('"'))
        .unwrap_or(word)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_as_pgbouncer_spells_them() {
        assert_eq!(parse("show pools"), Ok(Command::Show(Show::Pools)));
        assert_eq!(parse("  SHOW   Clients "), Ok(Command::Show(Show::Clients)));
        assert_eq!(parse("PAUSE"), Ok(Command::Pause(None)));
        assert_eq!(
            parse("pause \"app\""),
            Ok(Command::Pause(Some("app".into())))
        );
        assert_eq!(parse("KILL_CLIENT 42"), Ok(Command::KillClient(42)));
        assert_eq!(
            parse("show identities"),
            Ok(Command::Show(Show::Identities))
        );
        assert_eq!(parse("SHOW TENANTS"), Ok(Command::Show(Show::Tenants)));
        assert_eq!(parse("set application_name = 'x'"), Ok(Command::Set));
        let statements: Vec<_> = statements("show pools; ;SHOW VERSION;").collect();
        assert_eq!(statements, ["show pools", "SHOW VERSION"]);
    }

    #[test]
    fn what_is_not_a_command_is_refused_with_the_reason() {
        assert!(matches!(parse("select 1"), Err(ParseError::Unknown(_))));
        assert!(matches!(parse("show tables"), Err(ParseError::Unknown(_))));
        assert!(matches!(parse("pause a b"), Err(ParseError::Unknown(_))));
        assert!(matches!(parse("DISABLE"), Err(ParseError::Missing(..))));
        assert!(matches!(
            parse("KILL_CLIENT x"),
            Err(ParseError::BadArgument(..))
        ));
        assert!(matches!(parse("RELOAD now"), Err(ParseError::Unknown(_))));
    }

    #[test]
    fn only_show_and_set_are_for_stats_users() {
        assert!(!parse("SHOW STATS").expect("show").needs_admin());
        assert!(!parse("SHOW IDENTITIES").expect("show").needs_admin());
        assert!(parse("PAUSE").expect("pause").needs_admin());
        assert!(parse("KILL_CLIENT 1").expect("kill").needs_admin());
    }
}
