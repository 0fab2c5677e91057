//! The verifier against a real local issuer (JWKS over HTTP on loopback),
//! with time injected so expiry checks are exact.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use authgres_jwt::{ProviderConfig, Verifier, VerifyError};
use authgres_sandbox::{Issuer, KeyKind, TokenSpec};
use serde_json::json;

fn verifier(issuer: &Issuer, configure: impl FnOnce(&mut ProviderConfig)) -> Verifier {
    let mut provider = ProviderConfig::new(
        "sandbox",
        issuer.issuer(),
        &issuer.jwks_url(),
        &["authenticated"],
    );
    configure(&mut provider);
    Verifier::new(vec![provider]).expect("valid provider")
}

#[tokio::test]
async fn verifies_rs256_es256_es384_and_eddsa_into_an_identity() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier(&issuer, |_| {});
    for kind in [KeyKind::Rsa, KeyKind::Ec, KeyKind::Ec384, KeyKind::Ed25519] {
        let token = issuer.mint(&TokenSpec::new("user_1").key(kind));
        let identity = verifier
            .verify(&token, "authenticated", SystemTime::now())
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert_eq!(identity.subject, "user_1");
        assert_eq!(&*identity.provider, "sandbox");
        let claims: serde_json::Value =
            serde_json::from_str(&identity.claims_json).expect("claims json");
        assert_eq!(claims["iss"], issuer.issuer());
        assert!(
            claims["sid"]
                .as_str()
                .is_some_and(|s| s.starts_with("sess_"))
        );
    }
}

#[tokio::test]
async fn expiry_and_not_before_follow_the_injected_clock_with_leeway() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier(&issuer, |p| p.leeway = Duration::from_secs(30));
    let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let token = issuer.mint(
        &TokenSpec::new("u")
            .issued_at(issued)
            .ttl(Duration::from_secs(60)),
    );
    let at = |secs: u64| issued + Duration::from_secs(secs);
    let before = |secs: u64| issued - Duration::from_secs(secs);
    let check = |now| verifier.verify(&token, "authenticated", now);
    assert!(check(at(0)).await.is_ok());
    assert!(check(at(89)).await.is_ok(), "exp + leeway - 1s");
    assert_eq!(check(at(90)).await, Err(VerifyError::Expired));
    // nbf is iat - 10 for Clerk-shaped tokens.
    assert!(check(before(40)).await.is_ok(), "nbf - leeway");
    assert_eq!(check(before(41)).await, Err(VerifyError::NotYetValid));
}

#[tokio::test]
async fn audience_may_be_a_string_or_a_list() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier(&issuer, |p| p.audience = vec!["api://app".into()]);
    let now = SystemTime::now();
    let with_aud = |aud| issuer.mint(&TokenSpec::new("u").claim("aud", aud));
    let verifier = &verifier;
    let check = |token: String| async move { verifier.verify(&token, "authenticated", now).await };
    assert!(check(with_aud(json!("api://app"))).await.is_ok());
    assert!(check(with_aud(json!(["other", "api://app"]))).await.is_ok());
    // The refusal carries what was presented and what was expected, for
    // the operator's log (issue 24).
    let wrong = |presented: &str| {
        Err(VerifyError::WrongAudience {
            presented: presented.to_owned(),
            expected: vec!["api://app".to_owned()],
        })
    };
    assert_eq!(check(with_aud(json!("other"))).await, wrong("\"other\""));
    assert_eq!(check(with_aud(json!([]))).await, wrong("[]"));
    let refused = check(issuer.mint(&TokenSpec::new("u"))).await;
    assert_eq!(refused, wrong("absent"));
    let diagnosis = refused.err().and_then(|e| e.diagnosis());
    assert_eq!(
        diagnosis.as_deref(),
        Some("aud absent, expected one of [\"api://app\"]")
    );
}

#[tokio::test]
async fn roles_are_checked_against_the_provider() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier(&issuer, |_| {});
    let token = issuer.token("u");
    assert_eq!(
        verifier.verify(&token, "postgres", SystemTime::now()).await,
        Err(VerifyError::RoleNotAllowed {
            provider: "sandbox".into(),
            role: "postgres".into()
        })
    );
}

#[tokio::test]
async fn algorithms_outside_the_allow_list_are_refused() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier(&issuer, |p| {
        p.algorithms = vec![jsonwebtoken::Algorithm::RS256]
    });
    let token = issuer.mint(&TokenSpec::new("u").key(KeyKind::Ec));
    assert!(matches!(
        verifier
            .verify(&token, "authenticated", SystemTime::now())
            .await,
        Err(VerifyError::AlgorithmNotAllowed { .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_cold_connections_causes_one_fetch() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = Arc::new(verifier(&issuer, |_| {}));
    let token = Arc::new(issuer.token("u"));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (verifier, token) = (Arc::clone(&verifier), Arc::clone(&token));
            tokio::spawn(async move {
                verifier
                    .verify(&token, "authenticated", SystemTime::now())
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("join").expect("verified");
    }
    assert_eq!(issuer.jwks_fetches(), 1);
}

#[tokio::test]
async fn unknown_kids_refetch_at_most_once_per_interval() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier(&issuer, |_| {});
    let start = SystemTime::now();
    verifier
        .verify(&issuer.token("u"), "authenticated", start)
        .await
        .expect("warm");
    assert_eq!(issuer.jwks_fetches(), 1);
    let forged = |i: usize| {
        issuer.signer().sign_raw(
            &json!({"alg": "RS256", "kid": format!("kid-{i}")}),
            &json!({"sub": "u", "iss": issuer.issuer(), "exp": 4_000_000_000u64}),
            KeyKind::Rsa,
        )
    };
    for i in 0..1000 {
        let result = verifier.verify(&forged(i), "authenticated", start).await;
        assert!(matches!(result, Err(VerifyError::UnknownKey { .. })));
    }
    assert_eq!(issuer.jwks_fetches(), 2, "one refetch in the first window");
    let later = start + Duration::from_secs(31);
    for i in 0..100 {
        let _ = verifier.verify(&forged(i), "authenticated", later).await;
    }
    assert_eq!(issuer.jwks_fetches(), 3, "one more in the next window");
    // Known keys keep working without any fetch.
    verifier
        .verify(&issuer.token("u"), "authenticated", later)
        .await
        .expect("known key");
    assert_eq!(issuer.jwks_fetches(), 3);
}

#[tokio::test]
async fn an_unreachable_jwks_is_reported_as_unavailable_keys() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let issuer = Issuer::start().await.expect("issuer");
    let mut provider = ProviderConfig::new(
        "down",
        issuer.issuer(),
        &format!("http://127.0.0.1:{port}/jwks"),
        &["authenticated"],
    );
    provider.leeway = Duration::from_secs(0);
    let verifier = Verifier::new(vec![provider]).expect("valid");
    assert_eq!(
        verifier
            .verify(&issuer.token("u"), "authenticated", SystemTime::now())
            .await,
        Err(VerifyError::KeysUnavailable {
            provider: "down".into()
        })
    );
}

/// Issue 24: a Clerk development instance against a production one, or a
/// trailing slash, must be visible in the operator's log.
#[tokio::test]
async fn an_unknown_issuer_names_the_presented_and_the_expected_one() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier(&issuer, |_| {});
    let slashed = format!("{}/", issuer.issuer());
    let token = issuer.mint(&TokenSpec::new("u").claim("iss", json!(slashed)));
    let refused = verifier
        .verify(&token, "authenticated", SystemTime::now())
        .await
        .expect_err("another issuer");
    assert_eq!(refused.reason(), "unknown_issuer");
    assert_eq!(
        refused.diagnosis(),
        Some(format!(
            "iss {slashed:?}, expected one of [{:?}]",
            issuer.issuer()
        ))
    );
    // Neither the presented issuer nor the expected one reaches the client.
    assert!(!refused.to_string().contains(issuer.issuer()));
    assert_eq!(verifier.provider_of(&token), None);
    assert_eq!(
        verifier.provider_of(&issuer.token("u")).as_deref(),
        Some("sandbox")
    );
}
