//! `[admin]`: metrics, health, pools, clients, reload.

use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use super::Loaded;

/// `[admin]`: metrics, health, pools, clients, reload.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// `host:port`, or `unix:PATH` (relative to this file) for a Unix
    /// socket only the proxy's user can connect to.
    pub address: String,
    /// Connections held at once; more are answered 503 and closed. Its own
    /// budget: a flood of admin connections takes no file descriptors
    /// from clients.
    pub max_connections: usize,
    /// Time to send a request's headers, and on a kept-alive connection
    /// to start the next request.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection with nothing read or written this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Names besides IP addresses and `localhost` that requests may give
    /// as their `Host` (a scraper's DNS name for the proxy); any other is
    /// refused, so a web page that rebinds its name to this host cannot
    /// read the admin routes.
    pub allowed_hosts: Vec<String>,
    /// Whether `/metrics`, `/pools`, `/clients` and `/reload` need a
    /// console user's credentials (HTTP Basic; `/reload` an admin user's).
    /// `/console` always does; `/healthz` and `/readyz` never.
    pub require_auth: bool,
}

impl Default for AdminSection {
    fn default() -> Self {
        let limits = crate::admin::Limits::default();
        Self {
            address: "127.0.0.1:9432".into(),
            max_connections: limits.max_connections,
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            allowed_hosts: Vec::new(),
            require_auth: limits.require_auth,
        }
    }
}

impl AdminSection {
    /// The address to listen on: a Unix socket's path resolved against
    /// the config file's directory.
    pub fn address(&self, loaded: &Loaded) -> String {
        match crate::admin::unix_path(&self.address) {
            Some(path) => format!("unix:{}", loaded.path(path).display()),
            None => self.address.clone(),
        }
    }

    /// The listener's limits, checked.
    pub fn limits(&self) -> anyhow::Result<crate::admin::Limits> {
        if self.max_connections == 0 {
            bail!("[admin] max_connections must be at least 1");
        }
        for (key, value) in [
            ("header_timeout", self.header_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                bail!("[admin] {key} must be longer than 0s");
            }
        }
        Ok(crate::admin::Limits {
            max_connections: self.max_connections,
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            allowed_hosts: self.allowed_hosts.clone(),
            require_auth: self.require_auth,
        })
    }
}
