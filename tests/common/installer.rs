//! Who installs authgres in the sandbox ([`Installer`]), the test database
//! created as they would have it, and `authgres init-db` run as them.

use std::path::Path;
use std::process::Command;

use authgres_sandbox::Cluster;

use super::{BIN, DATABASE};

/// Who installs authgres in the sandbox: `AUTHGRES_TEST_ADMIN` =
/// `superuser` (the default: a self-hosted server), `owner` (a database
/// owner with CREATEROLE, as a managed service gives), or `owner-stats`
/// (that owner also in pg_read_all_stats, pg_signal_backend and
/// pg_monitor, as on RDS and Neon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installer {
    Superuser,
    Owner,
    OwnerWithStats,
}

impl Installer {
    /// The one `AUTHGRES_TEST_ADMIN` selects.
    pub fn from_env() -> Self {
        match std::env::var("AUTHGRES_TEST_ADMIN").as_deref() {
            Ok("owner") => Self::Owner,
            Ok("owner-stats") => Self::OwnerWithStats,
            Ok("superuser") | Err(_) => Self::Superuser,
            Ok(other) => panic!("AUTHGRES_TEST_ADMIN={other}: superuser, owner or owner-stats"),
        }
    }

    /// Whether init-db runs without a superuser.
    pub fn managed(self) -> bool {
        self != Self::Superuser
    }
}

/// Creates the test database as `installer` would have it; returns the
/// URL init-db and the schema run with.
pub(super) async fn create_database(cluster: &Cluster, installer: Installer) -> String {
    let predefined: &[&str] = match installer {
        Installer::Superuser => {
            cluster
                .admin("postgres")
                .await
                .expect("admin")
                .batch_execute(&format!("create database {DATABASE}"))
                .await
                .expect("create database");
            return cluster.admin_url(DATABASE);
        }
        Installer::Owner => &[],
        Installer::OwnerWithStats => &["pg_read_all_stats", "pg_signal_backend", "pg_monitor"],
    };
    cluster
        .create_managed_owner(DATABASE, predefined)
        .await
        .expect("managed owner")
}

/// A connection to `url`, run on a spawned task.
pub async fn connect_admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("administrator connects");
    tokio::spawn(connection);
    client
}

/// Which identity path the tests ask init-db for:
/// `AUTHGRES_TEST_IDENTITY` = `native` (init-db must choose it, or the
/// test fails), `portable` (every init-db gets `--portable`, so CI can run
/// the attack suites on it where native is available), unset: whatever
/// init-db chooses (native on a superuser install where the sandbox could
/// build the library).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityRequest {
    Chosen,
    Native,
    Portable,
}

impl IdentityRequest {
    /// The one `AUTHGRES_TEST_IDENTITY` selects.
    pub fn from_env() -> Self {
        match std::env::var("AUTHGRES_TEST_IDENTITY").as_deref() {
            Ok("native") => Self::Native,
            Ok("portable") => Self::Portable,
            Ok("") | Err(_) => Self::Chosen,
            Ok(other) => panic!("AUTHGRES_TEST_IDENTITY={other}: native or portable"),
        }
    }
}

/// The identity path init-db's output says it installed: "native" or
/// "portable".
pub fn identity_path(init_db_output: &str) -> &'static str {
    if init_db_output.contains("identity path: native") {
        "native"
    } else {
        assert!(
            init_db_output.contains("identity path: portable"),
            "init-db did not say which identity path it installed: {init_db_output}"
        );
        "portable"
    }
}

pub(super) fn run_init_db(config: &Path, admin_url: &str, args: &[&str]) -> String {
    let request = IdentityRequest::from_env();
    let mut command = Command::new(BIN);
    command
        .args(["init-db", "--config"])
        .arg(config)
        .args(["--admin-url", admin_url])
        .args(args)
        .env("PGSSLMODE", "disable");
    if request == IdentityRequest::Portable && !args.contains(&"--portable") {
        command.arg("--portable");
    }
    let init = command.output().expect("run init-db");
    let stderr = String::from_utf8_lossy(&init.stderr).into_owned();
    assert!(init.status.success(), "init-db {args:?} failed: {stderr}");
    let path = identity_path(&stderr);
    // Which path this test runs on, for whoever reads its output.
    eprintln!("init-db installed the {path} identity path");
    if request == IdentityRequest::Native && !args.contains(&"--portable") {
        assert_eq!(
            path, "native",
            "AUTHGRES_TEST_IDENTITY=native, but init-db installed the portable path: {stderr}"
        );
    }
    stderr
}
