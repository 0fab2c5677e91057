//! Verifies identity-provider JWTs and turns them into database identities.
//!
//! A [`Verifier`] holds the configured [`ProviderConfig`]s. For each token it
//! picks the provider by the token's `iss`, finds the signing key in that
//! provider's JWKS (fetched over HTTP(S) and cached, see [`jwks`]), checks the
//! signature with an algorithm decided by the key and the provider's
//! allow-list, validates `exp`/`nbf`/`aud` against an injected clock, and
//! checks that the provider may log in as the requested database role.
//!
//! Specs: [RFC 7519](https://www.rfc-editor.org/rfc/rfc7519) (JWT),
//! [RFC 7517](https://www.rfc-editor.org/rfc/rfc7517) (JWK),
//! [RFC 8037](https://www.rfc-editor.org/rfc/rfc8037) (EdDSA in JOSE).

mod error;
pub mod jwks;
mod provider;
mod verify;

pub use error::VerifyError;
pub use provider::{ConfigError, ProviderConfig};
pub use verify::{Identity, Verifier};
