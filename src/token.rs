//! `authgres token`: mint a token from the running demo's issuer.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use authgres_sandbox::{Signer, TokenSpec};

/// Prints a token for `sub` signed with the demo issuer's key.
pub fn run(
    sub: &str,
    ttl: Duration,
    claims: &[String],
    state_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let dir = state_dir.unwrap_or_else(crate::demo::default_state_dir);
    let signer = Signer::load(&dir.join(crate::demo::ISSUER_FILE))
        .context("is `authgres demo` running? (its issuer keys were not found)")?;
    let mut spec = TokenSpec::new(sub).ttl(ttl);
    for claim in claims {
        let (key, value) = claim
            .split_once('=')
            .with_context(|| format!("--claim {claim:?} is not KEY=VALUE"))?;
        let value = serde_json::from_str(value)
            .unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
        spec = spec.claim(key, value);
    }
    println!("{}", signer.mint(&spec));
    Ok(())
}
