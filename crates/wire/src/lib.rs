//! The Postgres wire protocol side of authgres.
//!
//! A client connects as if to Postgres ([`server::serve`]); its session
//! ([`Proxy`]) negotiates the transport ([`transport`]), parses the startup
//! packets ([`frontend`]), asks for a cleartext password that is the JWT,
//! has it verified (`authgres-jwt`), logs in to the real Postgres as the
//! requested role ([`upstream`]), attaches the signed identity
//! ([`identity`]), replays the upstream's startup replies with the proxy's own
//! cancel key ([`backend`], [`cancel`]) and then relays bytes ([`relay`]),
//! holding a pooled connection ([`pool`]) for the whole session or, in
//! transaction pooling, one transaction at a time ([`transaction`]).
//!
//! Protocol reference: <https://www.postgresql.org/docs/current/protocol.html>.

pub mod backend;
pub mod cancel;
pub mod error;
pub mod frontend;
pub mod identity;
pub mod params;
pub mod pool;
pub mod relay;
pub mod scan;
pub mod server;
mod session;
pub mod track;
pub mod transaction;
pub mod transport;
pub mod upstream;

pub use error::{ClientView, SessionError, SqlState};
pub use identity::ClaimsKey;
pub use session::{CleartextTokens, PoolMode, Proxy, ProxyConfig, RoleConfig};
pub use upstream::UpstreamConfig;
