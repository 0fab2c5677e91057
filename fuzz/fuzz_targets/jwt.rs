//! Token header and claims parsing: arbitrary tokens, and arbitrary
//! header and claims JSON signed with the provider's secret (so parsing
//! past the signature is reached), never panic the verifier, and what it
//! accepts has a subject.

#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use authgres_jwt::{KeySource, ProviderConfig, Verifier};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"a fuzzing secret of at least 32 bytes!!";
const ISSUER: &str = "https://issuer.example";

fn fixture() -> &'static (tokio::runtime::Runtime, Verifier) {
    static FIXTURE: OnceLock<(tokio::runtime::Runtime, Verifier)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut provider = ProviderConfig::new("fuzz", ISSUER, "", &["authenticated"]);
        provider.keys = KeySource::SharedSecretOnly;
        provider.shared_secret = Some(SECRET.to_vec());
        provider.algorithms = vec![jsonwebtoken::Algorithm::HS256];
        let verifier = Verifier::with_token_cache(vec![provider], 0).expect("verifier");
        (runtime, verifier)
    })
}

fn sign(header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, SECRET);
    let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

fuzz_target!(|data: &[u8]| {
    let (runtime, verifier) = fixture();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut tokens = vec![String::from_utf8_lossy(data).into_owned()];
    // Claims JSON from the fuzzer under a fixed header, and the fuzzer's
    // header over fixed claims.
    let claims = format!(r#"{{"iss":"{ISSUER}","exp":1800000600,"sub":"s"}}"#);
    tokens.push(sign(br#"{"alg":"HS256","typ":"JWT"}"#, data));
    tokens.push(sign(data, claims.as_bytes()));
    for token in tokens {
        if let Ok(identity) = runtime.block_on(verifier.verify(&token, "authenticated", now)) {
            assert!(serde_json::from_str::<serde_json::Value>(&identity.claims_json).is_ok());
        }
    }
});
