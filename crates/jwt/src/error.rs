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
    /// No configured provider has the token's `iss`. The message does
    /// not repeat either field (the client sees it); [`VerifyError::diagnosis`]
    /// gives them to the log.
    #[error("token issuer is not a configured identity provider")]
    UnknownIssuer {
        /// The token's `iss`, cut to [`MAX_DIAGNOSED`] characters.
        presented: String,
        /// The configured issuers.
        expected: Vec<String>,
    },
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
    WrongAudience {
        /// The token's `aud` (a string, a list, or absent), cut to
        /// [`MAX_DIAGNOSED`] characters.
        presented: String,
        /// The provider's accepted audiences.
        expected: Vec<String>,
    },
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
    /// The token's role claim does not grant the role the client asked
    /// for (and the role is not the provider's floor, `role_claim_default`).
    #[error("the token grants {}, not role {requested:?}", granted_list(.granted))]
    RoleNotGranted {
        /// Role the client asked for (the startup `user`).
        requested: String,
        /// Roles the claim grants that the provider allows, cut to a few.
        granted: Vec<String>,
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
            | Self::UnknownIssuer { .. }
            | Self::UnknownKey { .. }
            | Self::AlgorithmNotAllowed { .. }
            | Self::BadSignature
            | Self::Expired
            | Self::NotYetValid
            | Self::WrongAudience { .. }
            | Self::MissingClaim(_)
            | Self::TooOld
            | Self::SubjectInOtherNamespace => FailureClass::BadToken,
            Self::RoleNotAllowed { .. } | Self::RoleNotGranted { .. } => {
                FailureClass::RoleNotAllowed
            }
            Self::KeysUnavailable { .. } => FailureClass::KeysUnavailable,
        }
    }

    /// The failure's name as a metric label: one per variant, so a
    /// dashboard tells an expired token from a wrong audience.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UnknownIssuer { .. } => "unknown_issuer",
            Self::UnknownKey { .. } => "unknown_key",
            Self::AlgorithmNotAllowed { .. } => "algorithm_not_allowed",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongAudience { .. } => "wrong_audience",
            Self::MissingClaim(_) => "missing_claim",
            Self::TooOld => "too_old",
            Self::RoleNotAllowed { .. } => "role_not_allowed",
            Self::RoleNotGranted { .. } => "role_not_granted",
            Self::SubjectInOtherNamespace => "subject_in_other_namespace",
            Self::KeysUnavailable { .. } => "keys_unavailable",
        }
    }

    /// What an operator needs to see why the token was refused, beyond
    /// the client's message: the presented and the expected `iss` or
    /// `aud` (a Clerk development instance against a production one, a
    /// trailing slash), the unknown `kid`. Never the token or a secret.
    pub fn diagnosis(&self) -> Option<String> {
        match self {
            Self::UnknownIssuer {
                presented,
                expected,
            } => Some(format!("iss {presented:?}, expected one of {expected:?}")),
            Self::WrongAudience {
                presented,
                expected,
            } => Some(format!("aud {presented}, expected one of {expected:?}")),
            Self::UnknownKey { kid: Some(kid) } => Some(format!("kid {:?}", cut(kid))),
            Self::Malformed(_)
            | Self::UnknownKey { kid: None }
            | Self::AlgorithmNotAllowed { .. }
            | Self::BadSignature
            | Self::Expired
            | Self::NotYetValid
            | Self::MissingClaim(_)
            | Self::TooOld
            | Self::RoleNotAllowed { .. }
            | Self::RoleNotGranted { .. }
            | Self::SubjectInOtherNamespace
            | Self::KeysUnavailable { .. } => None,
        }
    }
}

/// The roles a claim granted, for a message: `no role` or `role(s) "a", "b"`.
fn granted_list(granted: &[String]) -> String {
    match granted {
        [] => "no role this proxy serves".to_owned(),
        [one] => format!("role {one:?}"),
        many => {
            let names: Vec<String> = many.iter().map(|r| format!("{r:?}")).collect();
            format!("roles {}", names.join(", "))
        }
    }
}

/// Most characters of a client's claim kept for a log line.
pub const MAX_DIAGNOSED: usize = 200;

/// `text` cut to [`MAX_DIAGNOSED`] characters: it is the client's, and a
/// log line is not the place for a megabyte of it.
pub(crate) fn cut(text: &str) -> String {
    match text.char_indices().nth(MAX_DIAGNOSED) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}
