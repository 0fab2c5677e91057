//! Verifies identity-provider JWTs and turns them into database identities.
//!
//! A [`Verifier`] holds the configured [`ProviderConfig`]s. For each token it
//! picks the provider by the token's `iss`, finds the signing key in that
//! provider's JWKS (fetched over HTTP(S) with safety limits, see
//! [`fetch`], and cached, see the `keystore` module docs), checks the
//! signature with an algorithm decided by the key and the provider's
//! allow-list, validates `exp`/`nbf`/`iat`/`aud`/required claims against an
//! injected clock, and resolves the database role. Tokens that verified are
//! remembered (by SHA-256) until they expire, so reconnects skip the
//! signature check. The user id a token names carries its issuer when
//! several providers are configured (see the `user_id` module docs).
//!
//! Specs: [RFC 7519](https://www.rfc-editor.org/rfc/rfc7519) (JWT),
//! [RFC 7517](https://www.rfc-editor.org/rfc/rfc7517) (JWK),
//! [RFC 8037](https://www.rfc-editor.org/rfc/rfc8037) (EdDSA in JOSE),
//! [OpenID Connect Discovery](https://openid.net/specs/openid-connect-discovery-1_0.html).

mod claim_path;
mod claims_json;
mod error;
pub mod fetch;
pub mod jwks;
mod keystore;
mod provider;
mod token_cache;
mod user_id;
mod verify;

pub use claim_path::{BadClaimPath, ClaimPath};
pub use error::{FailureClass, VerifyError};
pub use keystore::KeyStatus;
pub use provider::{
    ConfigError, DEFAULT_LEEWAY, FetchSettings, KeySource, ProviderConfig, RoleClaim,
};
pub use token_cache::{DEFAULT_CAPACITY as DEFAULT_TOKEN_CACHE_CAPACITY, LastToken};
pub use user_id::{MAX_USER_ID_PREFIX_LEN, UserIdConflict, UserIds, check_user_ids};
pub use verify::{Identity, MAX_TENANT_LEN, MAX_TOKEN_LEN, TokenCacheStats, Verifier};
