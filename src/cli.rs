//! Command-line interface.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Postgres proxy: log in with your identity provider's JWT as the password,
/// enforce Row-Level Security on its claims.
#[derive(Parser)]
#[command(name = "authgres", version, about)]
pub struct Cli {
    /// Log lines as `text` (default) or `json` (one object per line).
    #[arg(
        long,
        global = true,
        env = "AUTHGRES_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Threads that run client sessions: 1 runs everything on one thread
    /// (no cross-thread wake-ups); more, a work-stealing pool of that
    /// many. Default: 1 on machines of up to 2 cores, else one per core.
    #[arg(long, global = true, env = "AUTHGRES_THREADS")]
    pub threads: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// Configuration file.
        #[arg(long, env = "AUTHGRES_CONFIG", default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Install or upgrade the auth schema, the roles and the claims key in a database.
    InitDb {
        /// Configuration file (roles, secrets).
        #[arg(long, env = "AUTHGRES_CONFIG", default_value = "proxy.toml")]
        config: PathBuf,
        /// The administrator's connection: a postgres:// URL or a libpq
        /// key=value string (the database owner, or any role with
        /// CREATEROLE and CREATE on the database; no superuser needed).
        /// Without it, libpq's PGHOST, PGPORT, PGUSER, PGDATABASE. The
        /// password comes from the string, PGPASSWORD or ~/.pgpass.
        #[arg(long, env = "AUTHGRES_INIT_DB_URL")]
        admin_url: Option<String>,
        /// Generate new passwords for login roles that exist and set them
        /// (every proxy must then reload its secrets: SIGHUP).
        #[arg(long)]
        reset_passwords: bool,
        /// A role that creates tables later (migrations): what it creates
        /// in schema public is granted to the login roles as it appears.
        #[arg(long = "migration-role", value_name = "ROLE")]
        migration_roles: Vec<String>,
        /// Start a claims-key rotation: generate a new key into the secrets
        /// file and install it beside the current one. Restart the proxies,
        /// then finish with --retire-old-keys.
        #[arg(long, conflicts_with = "retire_old_keys")]
        rotate_claims_key: bool,
        /// Finish a rotation: remove every claims key but the configured one.
        #[arg(long)]
        retire_old_keys: bool,
        /// Install the portable identity path (core SQL) even where the
        /// native one (the authgres library, from native/) could be: by
        /// default init-db installs native when it runs as a superuser and
        /// the server can load the library, and says which it chose.
        #[arg(long)]
        portable: bool,
    },
    /// Validate a configuration file and explain what it does.
    CheckConfig {
        /// Configuration file.
        #[arg(long, env = "AUTHGRES_CONFIG", default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Start a throwaway Postgres, a local token issuer and the proxy; Ctrl-C removes all.
    Demo {
        /// Also write PGHOST, PGPORT, ..., AUTHGRES_TOKEN_A/B to this file.
        #[arg(long)]
        env: Option<PathBuf>,
        /// Address the demo proxy listens on.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: String,
        /// Address of the demo's HTTP endpoint (/sql and WebSocket /v2).
        #[arg(long, default_value = "127.0.0.1:8432")]
        http_listen: String,
        /// Address of the demo's admin listener (/metrics, /readyz, ...).
        #[arg(long, default_value = "127.0.0.1:9432")]
        admin_listen: String,
        /// Directory for the demo's state (issuer keys, config).
        #[arg(long, env = "AUTHGRES_DEMO_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Mint a token from the running demo's issuer (development only).
    Token {
        /// The `sub` claim (user id).
        #[arg(long)]
        sub: String,
        /// Lifetime, e.g. 60s, 1h.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Extra claim as key=value (value parsed as JSON when it is JSON).
        #[arg(long = "claim", value_name = "KEY=VALUE")]
        claims: Vec<String>,
        /// The demo's state directory.
        #[arg(long, env = "AUTHGRES_DEMO_DIR")]
        state_dir: Option<PathBuf>,
    },
}

/// Runs the chosen command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => crate::serve::serve(&config).await,
        Command::InitDb {
            config,
            admin_url,
            rotate_claims_key,
            retire_old_keys,
            reset_passwords,
            migration_roles,
            portable,
        } => {
            let options = crate::init_db::Options {
                old_keys: if retire_old_keys {
                    crate::init_db::OldKeys::Retire
                } else {
                    crate::init_db::OldKeys::Keep
                },
                rotate_claims_key,
                reset_passwords,
                migration_roles,
                identity: if portable {
                    crate::init_db::IdentityChoice::Portable
                } else {
                    crate::init_db::IdentityChoice::Best
                },
            };
            crate::init_db::run(&config, admin_url.as_deref(), &options).await
        }
        Command::CheckConfig { config } => crate::check::check_config(&config),
        Command::Demo {
            env,
            listen,
            http_listen,
            admin_listen,
            state_dir,
        } => {
            let addresses = crate::demo::Addresses {
                wire: listen,
                http: http_listen,
                admin: admin_listen,
            };
            crate::demo::run(env, &addresses, state_dir).await
        }
        Command::Token {
            sub,
            ttl,
            claims,
            state_dir,
        } => crate::token::run(&sub, ttl, &claims, state_dir),
    }
}
