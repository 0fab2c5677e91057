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

pub(super) fn run_init_db(config: &Path, admin_url: &str, args: &[&str]) -> String {
    let init = Command::new(BIN)
        .args(["init-db", "--config"])
        .arg(config)
        .args(["--admin-url", admin_url])
        .args(args)
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run init-db");
    let stderr = String::from_utf8_lossy(&init.stderr).into_owned();
    assert!(init.status.success(), "init-db {args:?} failed: {stderr}");
    stderr
}
