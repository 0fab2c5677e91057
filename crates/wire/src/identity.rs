//! Signing the verified claims for the in-database identity check.
//!
//! After login the proxy stores the claims and an HMAC-SHA256 signature in
//! two session settings. The message signed is the *binding* returned by
//! `auth.begin_session()` (backend pid, a per-session generation the database
//! keeps in owner-only state, and the login role), a newline, and the claims
//! JSON. `auth.session()` recomputes the MAC in SQL with the same key (stored
//! as precomputed HMAC pads in an owner-only table), so a client that
//! rewrites the settings, or replays a pair captured on another backend or in
//! an earlier session, gets NULL. See `sql/auth.sql` and docs/security.md.

use std::sync::Arc;

use aws_lc_rs::hmac;

/// Setting that carries the claims JSON.
pub const CLAIMS_SETTING: &str = "authgres.claims";
/// Setting that carries the hex HMAC over binding and claims.
pub const SIGNATURE_SETTING: &str = "authgres.signature";
/// Length of a claims key in bytes.
pub const CLAIMS_KEY_LEN: usize = 32;
/// HMAC-SHA256 block size: the pads are this long.
const BLOCK: usize = 64;

/// The secret shared by the proxy and the database's `auth` schema.
#[derive(Clone)]
pub struct ClaimsKey {
    bytes: [u8; CLAIMS_KEY_LEN],
    key: hmac::Key,
    /// A MAC of a fixed text under the key ([`ClaimsKey::mark`]), shared
    /// by everything that names the key.
    mark: Arc<str>,
}

/// What [`ClaimsKey::mark`] is a MAC of.
const MARKED: &str = "authgres claims key mark";

impl std::fmt::Debug for ClaimsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClaimsKey(..)")
    }
}

/// A claims key that is not 64 hex characters.
#[derive(Debug, thiserror::Error)]
#[error("the claims key must be {} hex characters ({CLAIMS_KEY_LEN} bytes)", CLAIMS_KEY_LEN * 2)]
pub struct BadClaimsKey;

impl ClaimsKey {
    /// Parses a key written as 64 hex characters.
    pub fn from_hex(hex: &str) -> Result<Self, BadClaimsKey> {
        let hex = hex.trim();
        if hex.len() != CLAIMS_KEY_LEN * 2 || !hex.is_ascii() {
            return Err(BadClaimsKey);
        }
        let mut bytes = [0u8; CLAIMS_KEY_LEN];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| BadClaimsKey)?;
        }
        Ok(Self::from_bytes(bytes))
    }

    /// A key from raw bytes.
    pub fn from_bytes(bytes: [u8; CLAIMS_KEY_LEN]) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &bytes);
        let mark = Arc::from(hex(hmac::sign(&key, MARKED.as_bytes()).as_ref()));
        Self { bytes, key, mark }
    }

    /// Names the key without revealing it: equal for the same key, made
    /// once per key (every pooled session's shape carries it).
    pub fn mark(&self) -> &Arc<str> {
        &self.mark
    }

    /// The hex MAC of `binding` + `\n` + `claims_json`.
    pub fn sign(&self, binding: &str, claims_json: &str) -> String {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(binding.as_bytes());
        context.update(b"\n");
        context.update(claims_json.as_bytes());
        hex(context.sign().as_ref())
    }

    /// The HMAC inner and outer pads (key ⊕ 0x36, key ⊕ 0x5c), which is how
    /// the database stores the key: SQL then needs only `sha256()`.
    pub fn pads(&self) -> ([u8; BLOCK], [u8; BLOCK]) {
        let mut ipad = [0x36u8; BLOCK];
        let mut opad = [0x5cu8; BLOCK];
        for (i, byte) in self.bytes.iter().enumerate() {
            ipad[i] ^= byte;
            opad[i] ^= byte;
        }
        (ipad, opad)
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::digest::{SHA256, digest};

    #[test]
    fn pads_reproduce_the_hmac_with_plain_sha256() {
        let key = ClaimsKey::from_hex(&"0f".repeat(32)).expect("valid hex");
        let (ipad, opad) = key.pads();
        let message = b"authgres-v1:42:7:authenticated\n{\"sub\":\"user_1\"}";
        let inner = digest(&SHA256, &[&ipad[..], &message[..]].concat());
        let outer = digest(&SHA256, &[&opad[..], inner.as_ref()].concat());
        assert_eq!(
            hex(outer.as_ref()),
            key.sign("authgres-v1:42:7:authenticated", "{\"sub\":\"user_1\"}")
        );
    }

    #[test]
    fn rejects_malformed_keys() {
        assert!(ClaimsKey::from_hex("abc").is_err());
        assert!(ClaimsKey::from_hex(&"zz".repeat(32)).is_err());
        assert!(ClaimsKey::from_hex(&"é".repeat(32)).is_err());
    }
}
