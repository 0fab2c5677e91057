//! Why a token was refused. Messages never contain the token itself.

/// A token that could not be turned into an identity.
///
/// Deliberately exhaustive: the wire crate maps every variant to a SQLSTATE,
/// so a new variant must be classified there.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    /// Not a well-formed JWT (bad base64, bad JSON, wrong shape, `alg: none`).
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// No configured provider has the token's `iss`.
    #[error("token issuer is not a configured identity provider")]
    UnknownIssuer,
    /// The provider's key set has no key with the token's `kid`. The
    /// message does not repeat the `kid`: it is the client's text.
    #[error("token was signed with a key the identity provider does not publish")]
    UnknownKey {
        /// The `kid` from the token header, if any (for logs and tests).
        kid: Option<String>,
    },
    /// The header's `alg` does not fit the key or is not allowed.
    #[error("token algorithm {alg} is not allowed for its key")]
    AlgorithmNotAllowed {
        /// The algorithm named in the token header.
        alg: String,
    },
    /// The signature does not verify.
    #[error("token signature is invalid")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// `aud` does not name any configured audience.
    #[error("token audience is not accepted")]
    WrongAudience,
    /// A claim that must be present is missing or has the wrong type.
    #[error("token lacks a valid {0:?} claim")]
    MissingClaim(String),
    /// `iat` is older than the provider's maximum token age.
    #[error("token was issued too long ago")]
    TooOld,
    /// The provider may not log in as the requested role.
    #[error("identity provider {provider:?} may not log in as role {role:?}")]
    RoleNotAllowed {
        /// Provider that issued the token.
        provider: String,
        /// Role the client asked for.
        role: String,
    },
    /// The token's `sub`, from a provider without a `user_id_prefix`,
    /// starts with another provider's prefix: as a user id it would be
    /// one of that provider's users. The message does not repeat the
    /// `sub`: it is the client's text.
    #[error("token subject falls among another identity provider's user ids")]
    SubjectInOtherNamespace,
    /// The provider's keys could not be fetched and none are cached.
    #[error("signing keys of identity provider {provider:?} are unavailable")]
    KeysUnavailable {
        /// Provider whose JWKS could not be fetched.
        provider: String,
    },
}

/// What kind of failure a [`VerifyError`] is, for callers that answer in
/// their own protocol (a SQLSTATE, an HTTP status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The token is not acceptable: the client needs another token.
    BadToken,
    /// The token is fine but may not log in as the requested role.
    RoleNotAllowed,
    /// The provider's keys are unavailable: try again later.
    KeysUnavailable,
}

impl VerifyError {
    /// The failure's class. Exhaustive: a new variant must be classified.
    pub fn class(&self) -> FailureClass {
        match self {
            Self::Malformed(_)
            | Self::UnknownIssuer
            | Self::UnknownKey { .. }
            | Self::AlgorithmNotAllowed { .. }
            | Self::BadSignature
            | Self::Expired
            | Self::NotYetValid
            | Self::WrongAudience
            | Self::MissingClaim(_)
            | Self::TooOld
            | Self::SubjectInOtherNamespace => FailureClass::BadToken,
            Self::RoleNotAllowed { .. } => FailureClass::RoleNotAllowed,
            Self::KeysUnavailable { .. } => FailureClass::KeysUnavailable,
        }
    }
}
