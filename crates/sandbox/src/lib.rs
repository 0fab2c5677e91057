//! Throwaway infrastructure for authgres tests, benchmarks and the demo.
//!
//! - [`Cluster`]: a real Postgres cluster from the system's `initdb` and
//!   `postgres`, in a temporary directory on a free loopback port, removed on
//!   drop (also when a test panics).
//! - [`Issuer`]: a local identity provider with RSA, EC and Ed25519 keys that
//!   serves its JWKS over HTTP on loopback and mints Clerk-shaped tokens.
//! - [`tls`]: a test CA and a localhost certificate.
//! - [`native_library_dir`]: the native identity library (`native/`) built
//!   for a server, which every [`Cluster`] puts on its
//!   `dynamic_library_path` where it can be built.
//!
//! Everything here is for development only: keys and passwords are generated
//! per run and never meant to protect anything.

mod cluster;
mod issuer;
mod native;
mod signer;
pub mod tls;

pub use cluster::{Cluster, find_postgres_bindir, free_port};
pub use issuer::{Behavior, Issuer};
pub use native::library_dir as native_library_dir;
pub use signer::{KeyKind, Signer, TokenSpec};
