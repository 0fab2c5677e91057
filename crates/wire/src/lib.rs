//! The Postgres wire protocol side of authgres: a client connects as if to
//! Postgres, logs in with a JWT, and is relayed to the real server as its
//! role with its identity attached.
//!
//! A connection's life is [`session`]'s (negotiate, handshake, lease,
//! hold or transactions), over the sans-IO protocol pieces of `proto`.
//! Around it: [`admission`] decides who may log in, for every transport;
//! `upstream` is one connection to the real Postgres and the exchanges
//! the proxy runs on it; `pool` keeps those connections; `relay` moves
//! bytes and follows message boundaries; `transaction` carries a
//! transaction-pooled client's session between connections; [`server`]
//! accepts TCP clients, reading a load balancer's PROXY header first where
//! one is trusted to send it ([`ProxyProtocolFrom`]). For operations: a [`Drain`] every session
//! follows at shutdown, the [`Clients`] registry, and [`metrics`].
//!
//! Protocol reference: <https://www.postgresql.org/docs/current/protocol.html>.

mod admission;
pub mod audit;
mod budget;
mod cancel;
mod capacity;
mod classify;
mod clients;
mod config;
pub mod console;
pub mod control;
mod drain;
mod error;
mod heavy;
mod identity;
mod limits;
mod log_limit;
pub mod metrics;
mod params;
mod pool;
mod process;
mod proto;
mod proxied;
mod proxy;
mod random;
mod relay;
mod routing;
mod session;
mod stats;
mod transaction;
mod transport;
mod upstream;
mod usage;
mod waker_id;

pub mod front_door;
pub mod server;

pub use admission::{Admitted, LoginRequest, Refusal, admit};
pub use budget::Ticket;
pub use cancel::MAX_INSTANCE_ID;
pub use clients::{ClientHandle, ClientState};
pub use config::{
    CleartextTokens, ClientLimits, ClusterConfig, ConnectionLimits, ConsoleAccess, ConsoleConfig,
    ConsoleUser, DatabaseName, DatabaseRoute, Policy, PoolLimits, PoolMode, ProxyConfig,
    RoleConfig, TokenLogin, defaults,
};
pub use error::{Classify, UpstreamError};
pub use identity::ClaimsKey;
pub use limits::{IdentityLimits, Limit, LimitRefusal, LimitTable, Limiter, Seat, Turn, Who};
pub use log_limit::LogLimiter;
pub use metrics::Metrics;
pub use pool::{
    Attempts, CheckoutError, Fairness, PoolKey, ReadyFailure, ServerPools, UpstreamPool, reap,
};
pub use proto::server_error::ServerError;
pub use proxied::{AddressBlock, ProxyProtocolFrom};
pub use proxy::{Collector, Proxy, Settings};
pub use relay::ReadHint;
pub use routing::{Destination, NoRoute};
pub use stats::DatabaseStats;
pub use transaction::Tracker;
pub use transport::{ALPN_HTTP1, ALPN_POSTGRESQL, Transport, UpstreamTls, tls_acceptor};
pub use upstream::{
    Envelope, PendingReset, Reply, RequestIdentity, SessionShape, Upstream, UpstreamConfig,
    UpstreamKey, append_described, connect as connect_upstream, next_client_id,
};
pub use usage::{IdentityUsage, UsageConfig, defaults as usage_defaults};

/// The message-level pieces the fuzz targets and benchmarks drive, behind
/// the `internals` feature. Not a stable API.
#[cfg(feature = "internals")]
pub mod internals {
    pub use crate::proto::backend;
    pub use crate::proto::framer::{Frame, Framer, TagSet};
    pub use crate::proto::ledger::{InFlight, Ledger, Outcome, model};
    pub use crate::proto::login::{Step, UpstreamLogin, startup_message};
    pub use crate::proto::negotiate::{Negotiation, Next};
    pub use crate::proto::oauthbearer;
    pub use crate::proto::proxy_header;
    pub use crate::proto::startup;
    pub use crate::relay::{Relay, Stop};
    pub use crate::transaction::Tracker;
}
