//! Named regression tests for the token and key shapes real providers emit.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

use std::time::SystemTime;

use authgres_jwt::{KeySource, ProviderConfig, Verifier, VerifyError};
use authgres_sandbox::{Behavior, Issuer, KeyKind, TokenSpec};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

const ROLE: &str = "authenticated";

fn verifier_for(issuer: &Issuer, configure: impl FnOnce(&mut ProviderConfig)) -> Verifier {
    let mut provider = ProviderConfig::new("p", issuer.issuer(), &issuer.jwks_url(), &[ROLE]);
    configure(&mut provider);
    Verifier::new(vec![provider]).expect("valid provider")
}

fn exp() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        + 3600
}

#[tokio::test]
async fn regression_cognito_issuer_with_escaped_slashes() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier_for(&issuer, |_| {});
    // Cognito's payloads escape '/' as "\/", which is the same JSON string.
    let escaped_iss = issuer.issuer().replace('/', "\\/");
    let payload = format!(
        r#"{{"sub":"aaaa-bbbb","iss":"{escaped_iss}","token_use":"access","exp":{}}}"#,
        exp()
    );
    let token =
        issuer
            .signer()
            .sign_raw_json(r#"{"alg":"RS256","kid":"rsa-1"}"#, &payload, KeyKind::Rsa);
    let identity = verifier
        .verify(&token, ROLE, SystemTime::now())
        .await
        .expect("escaped issuer matches");
    assert_eq!(identity.subject, "aaaa-bbbb");
}

#[tokio::test]
async fn regression_keycloak_jwks_with_rsa_oaep_encryption_keys() {
    let issuer = Issuer::start().await.expect("issuer");
    let mut jwks = issuer.signer().jwks();
    let rsa = jwks["keys"][0].clone();
    // Keycloak publishes its encryption key beside the signing key.
    let mut enc = rsa.clone();
    enc["use"] = json!("enc");
    enc["alg"] = json!("RSA-OAEP");
    enc["kid"] = json!("enc-1");
    jwks["keys"].as_array_mut().expect("keys").insert(0, enc);
    issuer.set_behavior(Behavior::Document(jwks.to_string()));
    let verifier = verifier_for(&issuer, |_| {});
    verifier
        .verify(&issuer.token("kc-user"), ROLE, SystemTime::now())
        .await
        .expect("the signing key still verifies");
    let with_enc_kid = issuer.signer().sign_raw(
        &json!({"alg": "RS256", "kid": "enc-1"}),
        &json!({"sub": "x", "iss": issuer.issuer(), "exp": exp()}),
        KeyKind::Rsa,
    );
    assert_eq!(
        verifier
            .verify(&with_enc_kid, ROLE, SystemTime::now())
            .await,
        Err(VerifyError::UnknownKey {
            kid: Some("enc-1".into())
        })
    );
}

#[tokio::test]
async fn regression_auth0_audience_arrays() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier_for(&issuer, |p| {
        p.audience = vec!["https://api.example.com".into()]
    });
    let token = issuer.mint(&TokenSpec::new("auth0|123").claim(
        "aud",
        json!([
            "https://api.example.com",
            "https://tenant.auth0.com/userinfo"
        ]),
    ));
    let identity = verifier
        .verify(&token, ROLE, SystemTime::now())
        .await
        .expect("aud array");
    assert_eq!(identity.subject, "auth0|123");
}

#[tokio::test]
async fn regression_firebase_google_keys_with_x5c() {
    let issuer = Issuer::start().await.expect("issuer");
    let mut jwks = issuer.signer().jwks();
    for key in jwks["keys"].as_array_mut().expect("keys") {
        if key["kty"] == "RSA" {
            key["x5c"] = json!([URL_SAFE_NO_PAD.encode(b"not-a-real-certificate")]);
            key["x5t"] = json!("dGh1bWJwcmludA");
        }
    }
    issuer.set_behavior(Behavior::Document(jwks.to_string()));
    let verifier = verifier_for(&issuer, |p| {
        p.algorithms = vec![jsonwebtoken::Algorithm::RS256]
    });
    let token = issuer.mint(
        &TokenSpec::new("firebase-uid")
            .claim("aud", json!("my-project"))
            .claim("auth_time", json!(1_700_000_000u64))
            .claim("firebase", json!({"sign_in_provider": "password"})),
    );
    let identity = verifier
        .verify(&token, ROLE, SystemTime::now())
        .await
        .expect("x5c keys");
    assert_eq!(identity.subject, "firebase-uid");
}

#[tokio::test]
async fn regression_clerk_azp_and_sid_reach_sql() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier_for(&issuer, |_| {});
    let identity = verifier
        .verify(&issuer.token("user_2abc"), ROLE, SystemTime::now())
        .await
        .expect("clerk token");
    let claims: Value = serde_json::from_str(&identity.claims_json).expect("json");
    assert_eq!(claims["azp"], "http://localhost:3000");
    assert!(
        claims["sid"]
            .as_str()
            .is_some_and(|s| s.starts_with("sess_"))
    );
    assert_eq!(claims["sub"], "user_2abc");
}

#[tokio::test]
async fn regression_supabase_hs256_legacy_secret() {
    let issuer = Issuer::start().await.expect("issuer");
    let secret = b"super-secret-jwt-token-with-at-least-32-characters-long".to_vec();
    let mut provider =
        ProviderConfig::new("supabase", "https://ref.supabase.co/auth/v1", "", &[ROLE]);
    provider.keys = KeySource::SharedSecretOnly;
    provider.algorithms = vec![jsonwebtoken::Algorithm::HS256];
    provider.shared_secret = Some(secret.clone());
    let verifier = Verifier::new(vec![provider]).expect("valid");
    let sign = |key: &[u8], sub: &str| {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(
                json!({"sub": sub, "iss": "https://ref.supabase.co/auth/v1", "role": "authenticated",
                       "aud": "authenticated", "exp": exp()})
                .to_string()
            )
        );
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
        format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(aws_lc_rs::hmac::sign(&key, input.as_bytes()))
        )
    };
    let identity = verifier
        .verify(&sign(&secret, "uuid-1"), ROLE, SystemTime::now())
        .await
        .expect("HS256 with the configured secret");
    assert_eq!(identity.subject, "uuid-1");
    assert_eq!(
        verifier
            .verify(
                &sign(b"another-secret-that-is-also-32-bytes-long", "uuid-1"),
                ROLE,
                SystemTime::now()
            )
            .await,
        Err(VerifyError::BadSignature)
    );
    drop(issuer);
}

#[tokio::test]
async fn regression_supabase_asymmetric_es256_jwks() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier_for(&issuer, |p| p.audience = vec!["authenticated".into()]);
    let token = issuer.mint(
        &TokenSpec::new("6f1c9a4e-1d2b-4c3a-9e8f-0a1b2c3d4e5f")
            .key(KeyKind::Ec)
            .claim("aud", json!("authenticated"))
            .claim("role", json!("authenticated"))
            .claim("is_anonymous", json!(false)),
    );
    let identity = verifier
        .verify(&token, ROLE, SystemTime::now())
        .await
        .expect("ES256");
    assert_eq!(identity.subject, "6f1c9a4e-1d2b-4c3a-9e8f-0a1b2c3d4e5f");
}

#[tokio::test]
async fn rsa_keys_without_a_declared_alg_verify_ps256_and_rs512_but_a_declared_alg_binds() {
    let issuer = Issuer::start().await.expect("issuer");
    let now = SystemTime::now();
    let pss = issuer.mint(&TokenSpec::new("pss").key(KeyKind::RsaPss));
    let rs512 = issuer.mint(&TokenSpec::new("rs512").key(KeyKind::Rsa512));

    // The sandbox publishes its RSA key with "alg": "RS256": other RSA
    // algorithms do not fit that key.
    let declared = verifier_for(&issuer, |_| {});
    for token in [&pss, &rs512] {
        assert!(matches!(
            declared.verify(token, ROLE, now).await,
            Err(VerifyError::AlgorithmNotAllowed { .. })
        ));
    }

    // Without a declared alg, any RSA algorithm the provider allows fits.
    let mut jwks = issuer.signer().jwks();
    for key in jwks["keys"].as_array_mut().expect("keys") {
        if key["kty"] == "RSA" {
            key.as_object_mut().expect("object").remove("alg");
        }
    }
    issuer.set_behavior(Behavior::Document(jwks.to_string()));
    let open = verifier_for(&issuer, |_| {});
    assert_eq!(
        open.verify(&pss, ROLE, now).await.expect("PS256").subject,
        "pss"
    );
    assert_eq!(
        open.verify(&rs512, ROLE, now).await.expect("RS512").subject,
        "rs512"
    );
    // ...unless the allow-list says otherwise.
    let strict = verifier_for(&issuer, |p| {
        p.algorithms = vec![jsonwebtoken::Algorithm::RS256]
    });
    assert!(matches!(
        strict.verify(&pss, ROLE, now).await,
        Err(VerifyError::AlgorithmNotAllowed { .. })
    ));
}

/// Issue 21: a fractional `exp` (RFC 7519 allows it; some issuers send
/// one) is read by the same NumericDate parser as the expiry check, so the
/// identity's expiry is that time, not 0 ("long expired", which ended
/// sessions at once under `enforce_token_expiry`).
#[tokio::test]
async fn regression_a_fractional_exp_is_the_identitys_expiry() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier_for(&issuer, |_| {});
    let exp = exp();
    #[allow(clippy::cast_precision_loss, reason = "a time in seconds fits")]
    let fractional = exp as f64 + 0.5;
    let token = issuer.mint(&TokenSpec::new("fractional").claim("exp", json!(fractional)));
    let identity = verifier
        .verify(&token, ROLE, SystemTime::now())
        .await
        .expect("a fractional exp verifies");
    assert_eq!(identity.expires_at, exp);
}
