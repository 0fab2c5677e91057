//! `[listen]`: the client-facing side, its TLS certificate, and which
//! load balancers may name the client (PROXY protocol).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use authgres_wire::{CleartextTokens, defaults as wire};
use serde::{Deserialize, Serialize};

use super::Loaded;

/// `[listen]`: the client-facing side.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenSection {
    pub address: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    pub max_connections: usize,
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_source: usize,
    pub cleartext_tokens: CleartextTokens,
    pub enforce_token_expiry: bool,
    /// "0s" disables each of these.
    #[serde(with = "humantime_serde")]
    pub idle_transaction_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub client_write_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// How long a drain waits for clients to reach a boundary and leave.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// After SIGTERM, how long to keep serving with /readyz at 503 before
    /// the drain starts (for load balancers to notice).
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Unix socket through which a new process takes over the listeners.
    pub handover_socket: Option<PathBuf>,
    /// Load balancers (addresses or CIDR blocks) whose connections begin
    /// with a PROXY protocol v2 header naming the client.
    pub proxy_protocol_from: Vec<Trusted>,
}

impl Default for ListenSection {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:6432".into(),
            tls_cert: None,
            tls_key: None,
            auth_timeout: wire::AUTH_TIMEOUT,
            max_connections: wire::MAX_CONNECTIONS,
            max_unauthenticated: wire::MAX_UNAUTHENTICATED,
            max_unauthenticated_per_source: wire::MAX_UNAUTHENTICATED_PER_SOURCE,
            cleartext_tokens: CleartextTokens::LoopbackOnly,
            enforce_token_expiry: false,
            idle_transaction_timeout: wire::IDLE_TRANSACTION_TIMEOUT,
            client_write_timeout: wire::CLIENT_WRITE_TIMEOUT,
            tcp_keepalive: wire::TCP_KEEPALIVE,
            shutdown_timeout: wire::SHUTDOWN_TIMEOUT,
            drain_delay: Duration::ZERO,
            handover_socket: None,
            proxy_protocol_from: Vec::new(),
        }
    }
}

/// An entry of `proxy_protocol_from`: an address or CIDR block, checked as
/// the file is parsed (so a mistake is reported at its line and column).
#[derive(Debug, Clone, Copy)]
pub struct Trusted(pub authgres_wire::AddressBlock);

impl<'de> Deserialize<'de> for Trusted {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map(Self).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Trusted {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// The peers a listener trusts to send a PROXY header.
pub fn proxy_protocol_from(entries: &[Trusted]) -> authgres_wire::ProxyProtocolFrom {
    authgres_wire::ProxyProtocolFrom::new(entries.iter().map(|t| t.0).collect())
}

impl Loaded {
    /// The wire listener's TLS acceptor, when a certificate and key are
    /// configured.
    pub fn tls(&self) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
        self.tls_with_alpn(authgres_wire::ALPN_POSTGRESQL)
    }

    /// The same certificate for HTTPS (ALPN http/1.1).
    pub fn http_tls(&self) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
        self.tls_with_alpn(authgres_wire::ALPN_HTTP1)
    }

    pub(super) fn tls_with_alpn(
        &self,
        alpn: &[u8],
    ) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
        match (&self.file.listen.tls_cert, &self.file.listen.tls_key) {
            (Some(cert), Some(key)) => {
                authgres_wire::tls_acceptor(&self.path(cert), &self.path(key), alpn)
                    .map(Some)
                    .context("[listen] tls_cert and tls_key")
            }
            (None, None) => Ok(None),
            _ => bail!("[listen] needs both tls_cert and tls_key, or neither"),
        }
    }
}
