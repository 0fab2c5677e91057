//! Which clients may take a connection another client's session is in
//! without a reset: those of the same identity, whose session would be
//! made exactly the same.
//!
//! In transaction pooling a connection goes back to the pool still holding
//! its client's session, and anyone else gets it only after a reset and a
//! fresh attach (two round trips). Many clients often present the very
//! same token (an app's connection pool, a user's tabs, a benchmark): for
//! them the reset would rebuild what the connection already holds. A
//! connection whose session holds exactly a client's verified claims (the
//! same JSON, so the same `sub`, `iss` and `jti`), its settings, and no
//! named prepared statement is handed to that client as it is.
//!
//! Clients of different identities never share a session, nor anonymous
//! clients (no claims: anyone). What a client leaves that the proxy
//! cannot see (a session advisory lock, a random seed) passes to another
//! client holding the same token, as pgbouncer passes it to any client;
//! it never passes to another identity.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::identity::ClaimsKey;

/// What a transaction-pooled client's session on a connection consists
/// of, shared between the client and the connections it made so.
#[derive(Debug)]
pub struct SessionShape {
    claims: String,
    /// Which claims key signed them (a MAC of a fixed text under the key,
    /// not the key): after a reload that rotates the key, a session signed
    /// with the old one is reset and signed again, not passed on until the
    /// old key is retired and its identity stops verifying.
    signed_by: Arc<str>,
    /// Sorted: the server lists a session's settings in its own order.
    settings: Vec<(String, String)>,
    /// Set once the client prepared a named statement: the connections it
    /// used may hold it, and another client's Parse of the same name would
    /// fail there.
    statements: AtomicBool,
}

impl SessionShape {
    /// The shape of a session with `claims` attached, signed with `key`,
    /// and `settings` applied; `None` for an anonymous client, which never
    /// shares.
    pub fn new(
        claims: Option<&str>,
        key: &ClaimsKey,
        settings: &[(String, String)],
    ) -> Option<Arc<Self>> {
        Some(Arc::new(Self {
            claims: claims?.to_owned(),
            signed_by: Arc::clone(key.mark()),
            settings: sorted(settings),
            statements: AtomicBool::new(false),
        }))
    }

    /// The same session with `settings` instead (after its client changed
    /// them); a client that prepared named statements still has them.
    pub fn with_settings(&self, settings: &[(String, String)]) -> Arc<Self> {
        Arc::new(Self {
            claims: self.claims.clone(),
            signed_by: Arc::clone(&self.signed_by),
            settings: sorted(settings),
            statements: AtomicBool::new(self.has_statements()),
        })
    }

    /// Notes that its client prepared a named statement: no connection
    /// made so is shared from now on.
    pub fn prepared_statements(&self) {
        self.statements.store(true, Ordering::Relaxed);
    }

    /// The verified claims (JSON) attached in it.
    pub fn claims(&self) -> &str {
        &self.claims
    }

    /// Whether its client prepared a named statement.
    pub fn has_statements(&self) -> bool {
        self.statements.load(Ordering::Relaxed)
    }

    /// Whether a connection holding `self` may be handed as it is to a
    /// client whose session would be `wanted`.
    pub fn serves(&self, wanted: &Self) -> bool {
        !self.has_statements()
            && !wanted.has_statements()
            && self.claims == wanted.claims
            && self.signed_by == wanted.signed_by
            && self.settings == wanted.settings
    }
}

fn sorted(settings: &[(String, String)]) -> Vec<(String, String)> {
    let mut settings = settings.to_vec();
    settings.sort();
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shaped(
        claims: Option<&str>,
        key: u8,
        settings: &[(String, String)],
    ) -> Option<Arc<SessionShape>> {
        let key = ClaimsKey::from_bytes([key; crate::identity::CLAIMS_KEY_LEN]);
        SessionShape::new(claims, &key, settings)
    }

    fn shape(claims: &str, settings: &[(&str, &str)]) -> Arc<SessionShape> {
        let settings: Vec<_> = (settings.iter())
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        shaped(Some(claims), 1, &settings).unwrap_or_else(|| unreachable!())
    }

    #[test]
    fn only_the_same_claims_and_settings_without_statements_share() {
        let a = shape(r#"{"sub":"a"}"#, &[("DateStyle", "ISO")]);
        assert!(a.serves(&shape(r#"{"sub":"a"}"#, &[("DateStyle", "ISO")])));
        assert!(!a.serves(&shape(r#"{"sub":"b"}"#, &[("DateStyle", "ISO")])));
        assert!(!a.serves(&shape(r#"{"sub":"a"}"#, &[])));
        let two = [("DateStyle", "ISO"), ("TimeZone", "UTC")];
        let swapped = [("TimeZone", "UTC"), ("DateStyle", "ISO")];
        assert!(
            shape("{}", &two).serves(&shape("{}", &swapped)),
            "the order matters not"
        );
        let other = shape(r#"{"sub":"a"}"#, &[("DateStyle", "ISO")]);
        other.prepared_statements();
        assert!(!a.serves(&other) && !other.serves(&a));
        assert!(shaped(None, 1, &[]).is_none(), "anonymous never shares");
        let iso = [("DateStyle".to_owned(), "ISO".to_owned())];
        let rotated = shaped(Some(r#"{"sub":"a"}"#), 2, &iso).unwrap_or_else(|| unreachable!());
        assert!(!a.serves(&rotated), "signed with another key");
    }
}
