//! Throwaway infrastructure for authgres tests, benchmarks and the demo.
//!
//! - [`Cluster`]: a real Postgres cluster from the system's `initdb` and
//!   `postgres`, in a temporary directory on a free loopback port, removed on
//!   drop (also when a test panics).
//! - [`Issuer`]: a local identity provider with RSA, EC and Ed25519 keys that
//!   serves its JWKS over HTTP on loopback and mints Clerk-shaped tokens.
//! - [`tls`]: a test CA and a localhost certificate.
//!
//! Everything here is for development only: keys and passwords are generated
//! per run and never meant to protect anything.

mod cluster;
mod issuer;
mod signer;
pub mod tls;

pub use cluster::{Cluster, find_postgres_bindir, free_port};
pub use issuer::{Behavior, Issuer};
pub use signer::{KeyKind, Signer, TokenSpec};
