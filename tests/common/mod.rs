//! The shared harness of the integration tests (each `tests/*.rs` has
//! `mod common;`), one file per concern:
//!
//! - [`stack`]: the [`Stack`] (sandbox Postgres, issuer, `authgres serve`)
//!   and its [`Options`];
//! - [`clients`]: connecting to the stack's proxy (tokio-postgres, TLS, psql);
//! - [`admin`]: the admin listener, `/readyz` and `/metrics`;
//! - [`fleet`]: second proxies, fleet [`Instance`]s, [`Haproxy`];
//! - [`raw`]: [`RawClient`], a hand-driven wire client;
//! - [`installer`]: who installs authgres, `create database`, `init-db`;
//! - [`queries`]: small questions asked of a session or the database;
//! - [`provision`]: what the suite needs beyond Rust, installed on first use.
//!
//! Everything tests use is re-exported here as `common::X`; the small
//! helpers below are shared by all of them.

#![allow(dead_code, missing_docs)]

use std::path::{Path, PathBuf};

mod admin;
mod clients;
mod fleet;
mod installer;
pub mod provision;
mod queries;
mod raw;
mod stack;

// Each test binary uses a few of these; the rest would be unused imports.
#[allow(unused_imports)]
pub use self::{
    admin::{Samples, parse_metrics},
    fleet::{HAPROXY_SOURCE, Haproxy, Instance, SecondProxy},
    installer::{IdentityRequest, Installer, connect_admin, identity_path},
    queries::{
        active_statements, backend_pid, console_client_ids, grant_role_to_authenticated,
        kill_client, listening_client, pgbench_rls, spawn_pgbench, todos_of, user_id,
    },
    raw::{RawClient, error_fields, message},
    stack::{Options, Stack},
};

pub const DATABASE: &str = "app";
/// The console's database name (the default) and its users' passwords in
/// the test stack.
pub const CONSOLE_DATABASE: &str = "authgres";
pub const CONSOLE_OPS_PASSWORD: &str = "ops-console-password-0123456789";
pub const CONSOLE_GRAFANA_PASSWORD: &str = "grafana-console-password-0123456789";
pub const BIN: &str = env!("CARGO_BIN_EXE_authgres");

pub fn psql_path() -> PathBuf {
    if let Ok(dir) = authgres_sandbox::find_postgres_bindir()
        && dir.join("psql").is_file()
    {
        return dir.join("psql");
    }
    PathBuf::from("psql")
}

/// A free loopback port (see [`authgres_sandbox::free_port`]).
pub fn free_port() -> u16 {
    authgres_sandbox::free_port().expect("a free port")
}

pub fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

pub fn path_exists(path: &Path) -> bool {
    path.exists()
}

/// Runs `authgres check-config` on the config at `path`, with no secrets
/// from the environment: whether it passed, and stdout then stderr.
pub fn check_config(path: &Path) -> (bool, String) {
    let output = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(path)
        .env_remove("AUTHGRES_CLAIMS_KEY")
        .env_remove("AUTHGRES_AUTHENTICATED_PASSWORD")
        .output()
        .expect("check-config");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}
