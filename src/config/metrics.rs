//! `[metrics]`: what is counted per identity and tenant, with bounded
//! cardinality: the heaviest identities tracker and the tenants that get
//! Prometheus series of their own.

use std::time::Duration;

use anyhow::bail;
use authgres_wire::UsageConfig;
use serde::{Deserialize, Serialize};

use super::Loaded;

/// Tenants named for series at most: each is a few series in every scrape.
const MAX_TENANT_SERIES: usize = 1000;

/// `[metrics]`; every key has a default.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Identities (and, apart, tenants) the heaviest-identities tracker
    /// holds.
    #[serde(default = "top_identities")]
    pub top_identities: usize,
    /// The window `SHOW IDENTITIES` covers: the last full one and the
    /// current one so far.
    #[serde(default = "top_window", with = "humantime_serde")]
    pub top_window: Duration,
    /// Tenants (values of a provider's `tenant_claim`) with Prometheus
    /// series of their own.
    #[serde(default)]
    pub tenants: Vec<String>,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            top_identities: top_identities(),
            top_window: top_window(),
            tenants: Vec::new(),
        }
    }
}

fn top_identities() -> usize {
    authgres_wire::usage_defaults::TOP_IDENTITIES
}
fn top_window() -> Duration {
    authgres_wire::usage_defaults::TOP_WINDOW
}

impl Loaded {
    /// `[metrics]`, checked.
    pub(super) fn usage(&self) -> anyhow::Result<UsageConfig> {
        let section = &self.file.metrics;
        if section.top_identities == 0 {
            bail!("[metrics] top_identities must be at least 1");
        }
        if section.top_window < Duration::from_secs(1) {
            bail!("[metrics] top_window must be at least 1s");
        }
        if section.tenants.len() > MAX_TENANT_SERIES {
            bail!(
                "[metrics] tenants names {} tenants; at most {MAX_TENANT_SERIES} get series of \
                 their own (SHOW TENANTS lists the heaviest of all)",
                section.tenants.len()
            );
        }
        Ok(UsageConfig {
            top_identities: section.top_identities,
            top_window: section.top_window,
            tenants: section.tenants.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::loaded;

    #[test]
    fn defaults_and_limits() {
        let usage = loaded("").usage().expect("valid");
        assert_eq!(usage, authgres_wire::UsageConfig::default());
        let named = loaded("[metrics]\ntenants = [\"org_a\"]\ntop_window = \"5m\"\n")
            .usage()
            .expect("valid");
        assert_eq!(named.tenants, ["org_a"]);
        assert_eq!(named.top_window.as_secs(), 300);
        assert!(loaded("[metrics]\ntop_identities = 0\n").usage().is_err());
    }
}
