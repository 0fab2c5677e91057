//! The Postgres protocol, sans-IO: bytes in, messages or decisions out, no
//! sockets. Everything here parses what a client or a server controls, so
//! slicing is checked (`clippy::indexing_slicing`) and every piece is
//! fuzzed (`fuzz/`).
//!
//! - [`startup`]: the packets a client sends before it is authenticated;
//! - [`negotiate`]: what the proxy answers to SSLRequest and friends;
//! - [`backend`]: the messages the proxy itself sends to clients;
//! - [`framer`]: message boundaries in a relayed byte stream;
//! - [`ledger`]: which of a client's messages the server still owes a
//!   reply, so a backend is handed on only when it is idle;
//! - [`oauthbearer`]: the SASL mechanism Postgres 18 clients log in
//!   with a bearer token by;
//! - [`login`] and [`scram`]: the proxy's own login to the upstream server;
//! - [`server_error`]: ErrorResponse fields;
//! - [`request_end`]: where a request the proxy answers itself ends;
//! - [`proxy_header`]: the PROXY protocol v2 header a load balancer sends
//!   before the client's first byte.
//!
//! Reference: <https://www.postgresql.org/docs/current/protocol.html>.

#![warn(clippy::indexing_slicing)]

pub mod backend;
pub mod framer;
pub mod ledger;
pub mod login;
pub mod negotiate;
pub mod oauthbearer;
pub mod proxy_header;
pub mod request_end;
pub mod scram;
pub mod server_error;
pub mod startup;
