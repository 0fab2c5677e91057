//! `[http]`: the `/sql` endpoint and the WebSocket transport.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Loaded;
use super::listen::Trusted;
use super::listen::proxy_protocol_from;

/// `[http]`: the /sql endpoint and WebSocket transport.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    pub address: String,
    #[serde(default)]
    pub tls: bool,
    #[serde(default = "http_defaults::max_bytes")]
    pub max_request_bytes: usize,
    #[serde(default = "http_defaults::max_request_bytes_total")]
    pub max_request_bytes_total: usize,
    #[serde(default = "http_defaults::max_bytes")]
    pub max_response_bytes: usize,
    #[serde(default = "http_defaults::pool_size")]
    pub pool_size: usize,
    #[serde(default = "http_defaults::checkout_timeout", with = "humantime_serde")]
    pub checkout_timeout: Duration,
    #[serde(default = "http_defaults::header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    #[serde(default = "http_defaults::body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    #[serde(default = "http_defaults::statement_timeout", with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Load balancers whose connections begin with a PROXY protocol v2
    /// header (as `[listen] proxy_protocol_from`, for this listener).
    #[serde(default)]
    pub proxy_protocol_from: Vec<Trusted>,
}

pub(super) mod http_defaults {
    use std::time::Duration;

    pub fn header_timeout() -> Duration {
        authgres_http::DEFAULT_HEADER_TIMEOUT
    }
    pub fn body_timeout() -> Duration {
        authgres_http::DEFAULT_BODY_TIMEOUT
    }
    pub fn statement_timeout() -> Duration {
        authgres_http::DEFAULT_STATEMENT_TIMEOUT
    }

    pub fn max_bytes() -> usize {
        authgres_http::DEFAULT_MAX_BYTES
    }
    pub fn max_request_bytes_total() -> usize {
        authgres_http::DEFAULT_MAX_REQUEST_BYTES_TOTAL
    }
    pub fn pool_size() -> usize {
        authgres_http::DEFAULT_POOL_SIZE
    }
    pub fn checkout_timeout() -> Duration {
        authgres_wire::defaults::CHECKOUT_TIMEOUT
    }
}

impl Loaded {
    /// HTTP settings, when `[http]` is present.
    pub fn http(&self) -> Option<authgres_http::HttpConfig> {
        self.file.http.as_ref().map(|h| authgres_http::HttpConfig {
            max_request_bytes: h.max_request_bytes,
            max_request_bytes_total: h.max_request_bytes_total,
            max_response_bytes: h.max_response_bytes,
            pool: authgres_wire::PoolLimits {
                // Each `/sql` request is a transaction of its own client:
                // nothing to keep between them.
                keep_between_transactions: std::time::Duration::ZERO,
                ..self
                    .file
                    .upstream
                    .pool_limits(h.pool_size, h.checkout_timeout)
            },
            header_timeout: h.header_timeout,
            body_timeout: h.body_timeout,
            statement_timeout: h.statement_timeout,
            proxy_protocol_from: proxy_protocol_from(&h.proxy_protocol_from),
        })
    }
}
