//! `[cluster]`: this instance's id and its peers, for cancel requests.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context as _, bail};
use authgres_wire::ClusterConfig;
use serde::{Deserialize, Serialize};

use super::Loaded;

/// `[cluster]`: this instance's id and its peers, for cancel requests.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub instance_id: u16,
    /// `ID = "host:port"` for every instance, this one included.
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    /// A `host:port` name resolving to every instance.
    pub peer_dns: Option<String>,
}

impl Loaded {
    /// `[cluster]`, checked.
    pub(super) fn cluster(&self) -> anyhow::Result<ClusterConfig> {
        let Some(cluster) = &self.file.cluster else {
            return Ok(ClusterConfig::default());
        };
        let id_range = 1..=authgres_wire::MAX_INSTANCE_ID;
        let check = |id: u16, what: &str| {
            if id_range.contains(&id) {
                Ok(id)
            } else {
                bail!("[cluster] {what} must be between 1 and {}", id_range.end())
            }
        };
        let instance_id = check(cluster.instance_id, "instance_id")?;
        let mut peers = HashMap::new();
        for (id, address) in &cluster.peers {
            let parsed = id
                .parse::<u16>()
                .ok()
                .with_context(|| format!("[cluster.peers] key {id:?} is not an instance id"))?;
            peers.insert(check(parsed, "peer ids")?, address.clone());
        }
        if cluster.peers.is_empty() && cluster.peer_dns.is_none() {
            bail!("[cluster] needs peers or peer_dns: where the other instances are");
        }
        Ok(ClusterConfig {
            instance_id,
            peers,
            peer_dns: cluster.peer_dns.clone(),
        })
    }
}
