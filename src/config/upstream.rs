//! `[upstream]`: the real Postgres, its pool, and the settings fixed
//! until a restart.

use std::path::PathBuf;
use std::time::Duration;

use authgres_wire::{PoolLimits, PoolMode, defaults as wire};
use serde::{Deserialize, Serialize};

/// `[upstream]`: the real Postgres.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSection {
    pub host: String,
    pub port: u16,
    pub databases: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub tls: UpstreamTlsMode,
    pub tls_ca_file: Option<PathBuf>,
    pub pool_mode: PoolMode,
    pub pool_mode_by_database: std::collections::HashMap<String, PoolMode>,
    pub pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub server_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub health_check_after: Duration,
    #[serde(with = "humantime_serde")]
    pub internal_query_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub keep_between_transactions: Duration,
}

impl UpstreamSection {
    /// Pool limits with this many connections per (database, role).
    pub(super) fn pool_limits(&self, size: usize, checkout_timeout: Duration) -> PoolLimits {
        PoolLimits {
            max_per_key: size,
            checkout_timeout,
            idle_timeout: self.idle_timeout,
            server_lifetime: self.server_lifetime,
            health_check_after: self.health_check_after,
            internal_query_timeout: self.internal_query_timeout,
            keep_between_transactions: self.keep_between_transactions,
        }
    }
}

impl Default for UpstreamSection {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 5432,
            databases: Vec::new(),
            connect_timeout: wire::CONNECT_TIMEOUT,
            tls: UpstreamTlsMode::Disable,
            tls_ca_file: None,
            pool_mode: PoolMode::Session,
            pool_mode_by_database: std::collections::HashMap::new(),
            pool_size: wire::POOL_SIZE,
            checkout_timeout: wire::CHECKOUT_TIMEOUT,
            idle_timeout: wire::IDLE_TIMEOUT,
            server_lifetime: wire::SERVER_LIFETIME,
            health_check_after: wire::HEALTH_CHECK_AFTER,
            internal_query_timeout: wire::INTERNAL_QUERY_TIMEOUT,
            keep_between_transactions: wire::KEEP_BETWEEN_TRANSACTIONS,
        }
    }
}

/// `upstream.tls`.
#[derive(Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    Disable,
    VerifyFull,
}
