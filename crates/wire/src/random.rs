//! The system's random source, for what must be unguessable: cancel keys,
//! SCRAM nonces, reset markers, random seeds. Code that needs exact tests
//! takes randomness as a parameter; these are the production sources.

use base64::Engine as _;

/// Fills `bytes` from the system RNG.
pub(crate) fn fill(bytes: &mut [u8]) {
    // A security proxy cannot go on without a working RNG: this is the
    // one panic on a system failure rather than on input.
    #[allow(
        clippy::expect_used,
        reason = "the system RNG failing is not recoverable"
    )]
    getrandom::fill(bytes).expect("the system random number generator is available");
}

/// A random u32.
pub(crate) fn u32() -> u32 {
    let mut bytes = [0u8; 4];
    fill(&mut bytes);
    u32::from_le_bytes(bytes)
}

/// A random u64.
pub(crate) fn u64() -> u64 {
    let mut bytes = [0u8; 8];
    fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// `bytes` random bytes as lowercase hex.
pub(crate) fn hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    fill(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A SCRAM client nonce: 18 random bytes in base64 (printable, no commas).
pub(crate) fn scram_nonce() -> String {
    let mut buf = [0u8; 18];
    fill(&mut buf);
    base64::engine::general_purpose::STANDARD.encode(buf)
}
