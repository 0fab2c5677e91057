//! What a reload cannot change: the settings a running process keeps from
//! the config it started with, and [`restart_diff`], which names each one
//! a new config changes so the operator is told rather than having some
//! connections use the old value and some the new.

use std::time::Duration;

use anyhow::Context as _;

use super::{Loaded, UpstreamTlsMode};
use crate::admin::Limits as AdminLimits;

/// The settings fixed until a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixed {
    /// `[listen] address`.
    pub wire_address: String,
    /// `[http] address`, when HTTP is on.
    pub http_address: Option<String>,
    /// `[admin] address`: `host:port` or `unix:PATH` (resolved).
    pub admin_address: Option<String>,
    /// `[admin]`'s limits, when the admin listener is on.
    pub admin_limits: Option<AdminLimits>,
    /// What the upstream pools are built with.
    upstream: UpstreamFixed,
    /// `[http] tls`.
    http_tls: Option<bool>,
    /// `[http] max_request_bytes_total`: the size of the body budget.
    http_body_budget: Option<usize>,
    /// `[cluster] instance_id`: handed-out cancel keys name it.
    instance_id: u16,
}

/// What the upstream pools are built with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UpstreamFixed {
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

impl Loaded {
    /// The settings of this config that are fixed until a restart (the
    /// upstream CA file read, the admin limits checked).
    pub fn fixed(&self) -> anyhow::Result<Fixed> {
        let file = &self.file;
        let admin = file.admin.as_ref();
        if admin.is_some_and(|a| a.require_auth) && file.console.is_none() {
            anyhow::bail!(
                "[admin] require_auth = true needs a [console]: its users' credentials are the \
                 admin API's"
            );
        }
        Ok(Fixed {
            wire_address: file.listen.address.clone(),
            http_address: file.http.as_ref().map(|h| h.address.clone()),
            admin_address: admin.map(|a| a.address(self)),
            admin_limits: admin.map(super::AdminSection::limits).transpose()?,
            upstream: self.upstream_fixed()?,
            http_tls: file.http.as_ref().map(|h| h.tls),
            http_body_budget: file.http.as_ref().map(|h| h.max_request_bytes_total),
            instance_id: self.cluster()?.instance_id,
        })
    }

    fn upstream_fixed(&self) -> anyhow::Result<UpstreamFixed> {
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

/// The keys (as `section.key`; `section.*` for a whole section) that a
/// reload cannot change: what [`restart_diff`] compares.
pub const FIXED_KEYS: &[&str] = &[
    "listen.address",
    "listen.tcp_keepalive",
    "http.address",
    "http.tls",
    "http.max_request_bytes_total",
    "admin.*",
    "upstream.host",
    "upstream.port",
    "upstream.connect_timeout",
    "upstream.tls",
    "upstream.tls_ca_file",
    "cluster.instance_id",
    "audit.queue",
];

/// Whether a reload changes `key` (`section.key`).
pub fn changeable(key: &str) -> bool {
    !FIXED_KEYS
        .iter()
        .any(|fixed| match fixed.strip_suffix('*') {
            Some(section) => key.starts_with(section),
            None => key == *fixed,
        })
}

/// The fixed settings that differ between `old` (running) and `new` (a
/// reloaded file), named as the file names them.
pub fn restart_diff(old: &Fixed, new: &Fixed) -> Vec<&'static str> {
    let both_http = old.http_address.is_some() && new.http_address.is_some();
    let (old_up, new_up) = (&old.upstream, &new.upstream);
    let checks = [
        (old.wire_address != new.wire_address, "[listen] address"),
        (
            old.http_address.is_some() != new.http_address.is_some(),
            "[http]",
        ),
        (
            both_http && old.http_address != new.http_address,
            "[http] address",
        ),
        (both_http && old.http_tls != new.http_tls, "[http] tls"),
        (
            both_http && old.http_body_budget != new.http_body_budget,
            "[http] max_request_bytes_total",
        ),
        (old.admin_address != new.admin_address, "[admin] address"),
        (old_up.host != new_up.host, "[upstream] host"),
        (old_up.port != new_up.port, "[upstream] port"),
        (
            old_up.connect_timeout != new_up.connect_timeout,
            "[upstream] connect_timeout",
        ),
        (old_up.tls != new_up.tls, "[upstream] tls"),
        (
            old_up.tls == new_up.tls && old_up.ca != new_up.ca,
            "[upstream] tls_ca_file",
        ),
        (
            old_up.tcp_keepalive != new_up.tcp_keepalive,
            "[listen] tcp_keepalive (upstream connections)",
        ),
        (old.instance_id != new.instance_id, "[cluster] instance_id"),
    ];
    let mut changed: Vec<_> = checks
        .into_iter()
        .filter_map(|(differs, name)| differs.then_some(name))
        .collect();
    if let (Some(old), Some(new)) = (&old.admin_limits, &new.admin_limits) {
        changed.extend(old.changed(new));
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::loaded;

    const BASE: &str = "[listen]\naddress = \"127.0.0.1:6432\"\n\
                        [http]\naddress = \"127.0.0.1:8432\"\n\
                        [cluster]\ninstance_id = 1\npeers = { 1 = \"a:1\", 2 = \"b:1\" }\n";

    fn diff(old: &str, new: &str) -> Vec<&'static str> {
        let fixed = |text: &str| loaded(text).fixed().expect("fixed settings");
        restart_diff(&fixed(old), &fixed(new))
    }

    #[test]
    fn an_unchanged_config_needs_no_restart() {
        assert_eq!(diff(BASE, BASE), Vec::<&str>::new());
    }

    #[test]
    fn each_fixed_setting_is_named_when_it_changes() {
        let cases = [
            ("127.0.0.1:6432", "127.0.0.1:6433", "[listen] address"),
            ("127.0.0.1:8432", "127.0.0.1:8433", "[http] address"),
            (
                "instance_id = 1",
                "instance_id = 2",
                "[cluster] instance_id",
            ),
            (
                "[http]\n",
                "[http]\nmax_request_bytes_total = 1024\n",
                "[http] max_request_bytes_total",
            ),
            (
                "[listen]\n",
                "[upstream]\nport = 5433\n[listen]\n",
                "[upstream] port",
            ),
            (
                "[listen]\n",
                "[listen]\ntcp_keepalive = \"1s\"\n",
                "[listen] tcp_keepalive (upstream connections)",
            ),
        ];
        for (from, to, named) in cases {
            assert_eq!(diff(BASE, &BASE.replace(from, to)), [named], "{to}");
        }
    }

    #[test]
    fn every_setting_a_reload_names_is_listed_as_not_changeable() {
        let names = [
            "[listen] address",
            "[http] address",
            "[http] tls",
            "[http] max_request_bytes_total",
            "[admin] address",
            "[admin] max_connections",
            "[upstream] host",
            "[upstream] port",
            "[upstream] connect_timeout",
            "[upstream] tls",
            "[upstream] tls_ca_file",
            "[cluster] instance_id",
        ];
        for name in names {
            let key = name.trim_start_matches('[').replacen("] ", ".", 1);
            assert!(!changeable(&key), "{key}");
        }
        assert!(changeable("upstream.pool_size") && changeable("listen.auth_timeout"));
    }

    #[test]
    fn turning_http_on_or_off_is_named_once() {
        let without = BASE.replace("[http]\naddress = \"127.0.0.1:8432\"\n", "");
        assert_eq!(diff(BASE, &without), ["[http]"]);
        assert_eq!(diff(&without, BASE), ["[http]"]);
    }
}
