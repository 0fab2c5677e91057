//! `[upstream]`: the real Postgres, its pool, and the settings fixed
//! until a restart.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use authgres_wire::{PoolLimits, PoolMode, defaults as wire};
use serde::Deserialize;

use super::Loaded;

/// `[upstream]`: the real Postgres.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
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
}

impl Upstream {
    /// Pool limits with this many connections per (database, role).
    pub(super) fn pool_limits(&self, size: usize, checkout_timeout: Duration) -> PoolLimits {
        PoolLimits {
            max_per_key: size,
            checkout_timeout,
            idle_timeout: self.idle_timeout,
            server_lifetime: self.server_lifetime,
            health_check_after: self.health_check_after,
            internal_query_timeout: self.internal_query_timeout,
        }
    }
}

impl Default for Upstream {
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
        }
    }
}

/// `upstream.tls`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    Disable,
    VerifyFull,
}

/// What the upstream pools are built with, from the file: fixed until a
/// restart, so a reload names each change rather than applying it to some
/// connections and not others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamFixed {
    host: String,
    port: u16,
    connect_timeout: Duration,
    tls: UpstreamTlsMode,
    /// The contents of `tls_ca_file`: a new CA in the same file is a
    /// change.
    ca: Option<Vec<u8>>,
    /// `[listen] tcp_keepalive`, which upstream sockets use too.
    tcp_keepalive: Duration,
}

impl UpstreamFixed {
    /// The settings that differ in `new`, named as the file names them.
    pub fn changed(&self, new: &Self) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.host != new.host {
            changed.push("[upstream] host");
        }
        if self.port != new.port {
            changed.push("[upstream] port");
        }
        if self.connect_timeout != new.connect_timeout {
            changed.push("[upstream] connect_timeout");
        }
        if self.tls != new.tls {
            changed.push("[upstream] tls");
        } else if self.ca != new.ca {
            changed.push("[upstream] tls_ca_file");
        }
        if self.tcp_keepalive != new.tcp_keepalive {
            changed.push("[listen] tcp_keepalive (upstream connections)");
        }
        changed
    }
}

impl Loaded {
    /// What the upstream pools are built with, the CA file read.
    pub fn upstream_fixed(&self) -> anyhow::Result<UpstreamFixed> {
        let upstream = &self.file.upstream;
        let ca = match (upstream.tls, &upstream.tls_ca_file) {
            (UpstreamTlsMode::VerifyFull, Some(file)) => {
                let path = self.path(file);
                Some(
                    std::fs::read(&path)
                        .with_context(|| format!("[upstream] tls_ca_file {}", path.display()))?,
                )
            }
            _ => None,
        };
        Ok(UpstreamFixed {
            host: upstream.host.clone(),
            port: upstream.port,
            connect_timeout: upstream.connect_timeout,
            tls: upstream.tls,
            ca,
            tcp_keepalive: self.file.listen.tcp_keepalive,
        })
    }
}
