//! Which user a verified token names: the identity is the pair (issuer,
//! `sub`), because a `sub` is unique only among its own issuer's users
//! ([OpenID Connect Core §2](https://openid.net/specs/openid-connect-core-1_0.html#IDToken):
//! "locally unique and never reassigned within the Issuer").
//!
//! RLS policies compare one text, `auth.user_id()`, so with two providers
//! the proxy must make that text carry the issuer, or be told that it need
//! not. Each provider's user ids live in a namespace named by its
//! `user_id_prefix` (none: the bare `sub`, as with a single provider):
//!
//! - the user id the proxy signs is the prefix followed by `sub`;
//! - two providers with the same prefix (or both none) give the same user
//!   id to the same `sub`; that is allowed only when both say
//!   `shared_user_ids` (one person, two issuers: a migration);
//! - two prefixes may not start with one another, so their namespaces
//!   cannot overlap;
//! - a provider without a prefix beside prefixed ones refuses a token whose
//!   `sub` starts with another provider's prefix (its user id would be one
//!   of theirs), so existing user ids stay as they are when a second,
//!   prefixed provider is added.
//!
//! [`check_user_ids`] checks a set of providers; [`Namespaces`] applies the
//! rule to each token. Every login path (password, OAUTHBEARER, `/sql`)
//! gets its identity from [`crate::Verifier`], which uses both.

use crate::error::VerifyError;

/// Longest `user_id_prefix` accepted, in bytes.
pub const MAX_USER_ID_PREFIX_LEN: usize = 64;

/// How one provider's users are named in `auth.user_id()`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserIds {
    /// Put before `sub` in the user id the proxy signs, so another
    /// provider's equal `sub` is another user. `None`: the bare `sub`.
    pub prefix: Option<String>,
    /// The operator's statement that another provider with the same
    /// prefix (or none) names the same people with the same `sub`.
    pub shared: bool,
}

impl UserIds {
    /// The prefix, `""` when none.
    fn prefix(&self) -> &str {
        self.prefix.as_deref().unwrap_or("")
    }
}

/// Why a set of providers would give one user id to different people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UserIdConflict {
    /// A prefix that cannot work.
    #[error("provider #{provider}: user_id_prefix {reason}")]
    BadPrefix {
        /// Index of the provider.
        provider: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two providers pass `sub` into the same namespace and not both say
    /// `shared_user_ids`.
    #[error("providers #{first} and #{second} give the same user id to the same sub")]
    SameNamespace {
        /// Index of the provider listed first.
        first: usize,
        /// Index of the provider listed second.
        second: usize,
    },
    /// One provider's prefix starts with another's.
    #[error("the user_id_prefix of provider #{first} or #{second} starts with the other")]
    NestedPrefixes {
        /// Index of the provider listed first.
        first: usize,
        /// Index of the provider listed second.
        second: usize,
    },
}

/// Checks that no two of `providers` (in configuration order) can give the
/// same user id to different people.
pub fn check_user_ids(providers: &[&UserIds]) -> Result<(), UserIdConflict> {
    for (index, ids) in providers.iter().enumerate() {
        if let Some(prefix) = &ids.prefix {
            let reason = if prefix.is_empty() {
                Some("is empty: omit it to keep the bare sub")
            } else if prefix.len() > MAX_USER_ID_PREFIX_LEN {
                Some("is longer than 64 bytes")
            } else if prefix.chars().any(char::is_control) {
                Some("holds a control character")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(UserIdConflict::BadPrefix {
                    provider: index,
                    reason,
                });
            }
        }
    }
    for (second, b) in providers.iter().enumerate() {
        for (first, a) in providers[..second].iter().enumerate() {
            let (pa, pb) = (a.prefix(), b.prefix());
            if pa == pb {
                if !(a.shared && b.shared) {
                    return Err(UserIdConflict::SameNamespace { first, second });
                }
            } else if !pa.is_empty() && !pb.is_empty() && (pa.starts_with(pb) || pb.starts_with(pa))
            {
                return Err(UserIdConflict::NestedPrefixes { first, second });
            }
        }
    }
    Ok(())
}

/// Each provider's prefix and the prefixes its bare ids must stay out of.
#[derive(Debug, Default)]
pub(crate) struct Namespaces {
    /// Per provider (same order as the verifier's): its prefix, and the
    /// longer prefixes of other providers that extend it.
    providers: Vec<(String, Vec<String>)>,
}

impl Namespaces {
    /// The namespaces of providers already checked by [`check_user_ids`].
    pub(crate) fn new(providers: &[&UserIds]) -> Self {
        let providers = providers
            .iter()
            .map(|ids| {
                let own = ids.prefix();
                let foreign = providers
                    .iter()
                    .map(|other| other.prefix())
                    .filter(|other| other.len() > own.len() && other.starts_with(own))
                    .map(str::to_owned)
                    .collect();
                (own.to_owned(), foreign)
            })
            .collect();
        Self { providers }
    }

    /// The user id of `sub` from provider `index`, or the refusal when it
    /// would fall into another provider's namespace.
    pub(crate) fn user_id(&self, index: usize, sub: &str) -> Result<String, VerifyError> {
        // The verifier's own index; were it out of range, fail closed.
        let Some((own, foreign)) = self.providers.get(index) else {
            return Err(VerifyError::UnknownIssuer {
                presented: String::new(),
                expected: Vec::new(),
            });
        };
        let user_id = format!("{own}{sub}");
        if foreign
            .iter()
            .any(|prefix| user_id.starts_with(prefix.as_str()))
        {
            return Err(VerifyError::SubjectInOtherNamespace);
        }
        Ok(user_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(prefix: Option<&str>, shared: bool) -> UserIds {
        UserIds {
            prefix: prefix.map(str::to_owned),
            shared,
        }
    }

    #[test]
    fn one_provider_needs_nothing() {
        assert_eq!(check_user_ids(&[&ids(None, false)]), Ok(()));
        let one = Namespaces::new(&[&ids(None, false)]);
        assert_eq!(one.user_id(0, "user_1").as_deref(), Ok("user_1"));
    }

    #[test]
    fn two_bare_providers_are_refused_unless_both_share() {
        let bare = ids(None, false);
        let shared = ids(None, true);
        let conflict = Err(UserIdConflict::SameNamespace {
            first: 0,
            second: 1,
        });
        assert_eq!(check_user_ids(&[&bare, &bare]), conflict);
        assert_eq!(check_user_ids(&[&shared, &bare]), conflict);
        assert_eq!(check_user_ids(&[&shared, &shared]), Ok(()));
        let same = ids(Some("x:"), false);
        assert_eq!(check_user_ids(&[&same, &same]), conflict);
    }

    #[test]
    fn prefixes_must_not_nest() {
        let (a, ab) = (ids(Some("a:"), false), ids(Some("a:b"), false));
        assert_eq!(
            check_user_ids(&[&a, &ab]),
            Err(UserIdConflict::NestedPrefixes {
                first: 0,
                second: 1
            })
        );
        assert_eq!(check_user_ids(&[&a, &ids(Some("b:"), false)]), Ok(()));
    }

    #[test]
    fn bad_prefixes_are_named() {
        for prefix in ["", "a\nb", &"x".repeat(65)] {
            assert!(matches!(
                check_user_ids(&[&ids(Some(prefix), false)]),
                Err(UserIdConflict::BadPrefix { provider: 0, .. })
            ));
        }
    }

    #[test]
    fn a_bare_provider_beside_prefixed_ones_keeps_out_of_their_ids() {
        let (bare, kc) = (ids(None, false), ids(Some("kc:"), false));
        assert_eq!(check_user_ids(&[&bare, &kc]), Ok(()));
        let spaces = Namespaces::new(&[&bare, &kc]);
        assert_eq!(spaces.user_id(0, "user_1").as_deref(), Ok("user_1"));
        assert_eq!(spaces.user_id(1, "user_1").as_deref(), Ok("kc:user_1"));
        // Provider 0's "kc:user_1" would be provider 1's "user_1".
        assert_eq!(
            spaces.user_id(0, "kc:user_1"),
            Err(VerifyError::SubjectInOtherNamespace)
        );
        // Inside its own namespace anything goes.
        assert_eq!(spaces.user_id(1, "kc:x").as_deref(), Ok("kc:kc:x"));
    }
}
