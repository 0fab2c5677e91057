//! The JWKS cache and fetcher against a live local provider over HTTPS
//! (certificate from a test CA), with time injected: rotation, unknown-kid
//! storms, outages, slowness, bad responses, discovery, and the
//! verified-token cache.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use authgres_jwt::{
    ClaimPath, KeySource, LastToken, ProviderConfig, RoleClaim, Verifier, VerifyError,
};
use authgres_sandbox::tls::TestCerts;
use authgres_sandbox::{Behavior, Issuer, KeyKind, TokenSpec};
use serde_json::json;

const ROLE: &str = "authenticated";

async fn https_issuer() -> (Issuer, TestCerts) {
    let certs = TestCerts::generate().expect("certs");
    let issuer = Issuer::start_https(&certs).await.expect("issuer");
    (issuer, certs)
}

fn provider(issuer: &Issuer, certs: &TestCerts) -> ProviderConfig {
    let mut provider = ProviderConfig::new("test", issuer.issuer(), &issuer.jwks_url(), &[ROLE]);
    provider.fetch.ca_pem = Some(certs.ca_pem.clone().into_bytes());
    provider.fetch.retries = 0;
    provider
}

fn token_at(issuer: &Issuer, sub: &str, at: SystemTime) -> String {
    issuer.mint(
        &TokenSpec::new(sub)
            .issued_at(at)
            .ttl(Duration::from_secs(24 * 3600)),
    )
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[tokio::test(flavor = "multi_thread")]
async fn https_jwks_needs_the_configured_ca() {
    let (issuer, certs) = https_issuer().await;
    let verifier = Verifier::new(vec![provider(&issuer, &certs)]).expect("verifier");
    let token = issuer.token("user_1");
    let identity = verifier
        .verify(&token, ROLE, SystemTime::now())
        .await
        .expect("verified");
    assert_eq!(identity.subject, "user_1");

    let mut untrusted = provider(&issuer, &certs);
    untrusted.fetch.ca_pem = None;
    let verifier = Verifier::new(vec![untrusted]).expect("verifier");
    assert!(matches!(
        verifier.verify(&token, ROLE, SystemTime::now()).await,
        Err(VerifyError::KeysUnavailable { .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn key_rotation_is_accepted_after_one_refetch_and_retired_keys_stop_working() {
    let (issuer, certs) = https_issuer().await;
    let verifier = Verifier::new(vec![provider(&issuer, &certs)]).expect("verifier");
    let t0 = SystemTime::now();
    let old = token_at(&issuer, "user_old", t0);
    verifier.verify(&old, ROLE, t0).await.expect("old key");
    assert_eq!(issuer.jwks_fetches(), 1);

    let new_kid = issuer.signer().rotate_rsa(false).expect("rotate");
    assert_eq!(new_kid, "rsa-2");
    let new = token_at(&issuer, "user_new", t0);
    verifier
        .verify(&new, ROLE, t0)
        .await
        .expect("new key after one refetch");
    assert_eq!(issuer.jwks_fetches(), 2);

    // The old token was cached, but its key left the JWKS: refused now.
    assert_eq!(
        verifier.verify(&old, ROLE, t0).await,
        Err(VerifyError::UnknownKey {
            kid: Some("rsa-1".into())
        })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_unknown_kids_cause_at_most_one_fetch_per_window() {
    let (issuer, certs) = https_issuer().await;
    let verifier = Verifier::new(vec![provider(&issuer, &certs)]).expect("verifier");
    let t0 = SystemTime::now();
    verifier
        .verify(&issuer.token("warm"), ROLE, t0)
        .await
        .expect("warm");
    let forged = |i: usize| {
        issuer.signer().sign_raw(
            &json!({"alg": "RS256", "kid": format!("forged-{i}")}),
            &json!({"sub": "x", "iss": issuer.issuer(), "exp": 4_000_000_000u64}),
            KeyKind::Rsa,
        )
    };
    for window in 0..3u64 {
        let now = t0 + secs(31 * window);
        for i in 0..10_000 / 3 {
            let result = verifier.verify(&forged(i), ROLE, now).await;
            assert!(
                matches!(result, Err(VerifyError::UnknownKey { .. })),
                "{result:?}"
            );
        }
        assert_eq!(issuer.jwks_fetches() as u64, 2 + window, "window {window}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_down_for_an_hour_still_verifies_known_keys() {
    let (issuer, certs) = https_issuer().await;
    let mut config = provider(&issuer, &certs);
    config.fetch.max_staleness = secs(6 * 3600);
    let verifier = Verifier::new(vec![config]).expect("verifier");
    let t0 = SystemTime::now();
    verifier
        .verify(&token_at(&issuer, "a", t0), ROLE, t0)
        .await
        .expect("warm");

    issuer.set_behavior(Behavior::Down);
    let later = t0 + secs(3600);
    let fresh = token_at(&issuer, "b", later);
    let (logs, identity) = capture_logs(|| async {
        let identity = verifier.verify(&fresh, ROLE, later).await;
        verifier.settle().await;
        identity
    })
    .await;
    assert_eq!(identity.expect("stale keys still verify").subject, "b");
    assert!(logs.contains("could not fetch JWKS"), "{logs}");
    assert!(
        logs.contains("still verifying with the last good keys"),
        "{logs}"
    );

    // Past max_staleness the old keys are no longer trusted.
    let much_later = t0 + secs(6 * 3600 + 1);
    assert!(matches!(
        verifier
            .verify(&token_at(&issuer, "c", much_later), ROLE, much_later)
            .await,
        Err(VerifyError::KeysUnavailable { .. })
    ));
    // And when the provider is back, everything recovers.
    issuer.set_behavior(Behavior::Normal);
    verifier
        .verify(&token_at(&issuer, "d", much_later), ROLE, much_later)
        .await
        .expect("recovered");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_provider_never_delays_tokens_whose_keys_are_cached() {
    let (issuer, certs) = https_issuer().await;
    let verifier = Verifier::new(vec![provider(&issuer, &certs)]).expect("verifier");
    let t0 = SystemTime::now();
    verifier
        .verify(&token_at(&issuer, "a", t0), ROLE, t0)
        .await
        .expect("warm");
    issuer.set_behavior(Behavior::Slow(secs(3)));
    // In the refresh window (last fifth of the 300 s lifetime), and past it.
    for (i, offset) in [250u64, 400].into_iter().enumerate() {
        let now = t0 + secs(offset);
        let started = Instant::now();
        verifier
            .verify(&token_at(&issuer, &format!("user_{i}"), now), ROLE, now)
            .await
            .expect("verified with cached keys");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a login waited {:?} on a slow provider",
            started.elapsed()
        );
    }
    verifier.settle().await;
    assert_eq!(issuer.jwks_fetches(), 2, "one background refresh");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversize_malformed_and_cross_origin_redirect_responses_are_refused() {
    let (issuer, certs) = https_issuer().await;
    let cases = [
        (Behavior::Oversize, "response body exceeds 65536 bytes"),
        (Behavior::Malformed, "response is not a valid JWKS document"),
        (
            Behavior::Redirect("https://127.0.0.1:9/jwks".into()),
            "redirect refused",
        ),
    ];
    for (behavior, expected) in cases {
        issuer.set_behavior(behavior.clone());
        let verifier = Verifier::new(vec![provider(&issuer, &certs)]).expect("verifier");
        let (logs, result) = capture_logs(|| async {
            verifier
                .verify(&issuer.token("u"), ROLE, SystemTime::now())
                .await
        })
        .await;
        assert!(
            matches!(result, Err(VerifyError::KeysUnavailable { .. })),
            "{behavior:?}: {result:?}"
        );
        assert!(logs.contains(expected), "{behavior:?}: {logs}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_control_max_age_is_honoured_within_bounds() {
    let (issuer, certs) = https_issuer().await;
    for (max_age, fresh_for) in [
        (Some(10), 300u64),
        (Some(7200), 3600),
        (None, 300),
        (Some(900), 900),
    ] {
        issuer.set_max_age(max_age);
        let verifier = Verifier::new(vec![provider(&issuer, &certs)]).expect("verifier");
        let t0 = SystemTime::now();
        let before = issuer.jwks_fetches();
        verifier
            .verify(&token_at(&issuer, "a", t0), ROLE, t0)
            .await
            .expect("warm");
        // Before the refresh window: no fetch at all.
        let quiet = t0 + secs(fresh_for * 4 / 5 - 1);
        verifier
            .verify(&token_at(&issuer, "b", quiet), ROLE, quiet)
            .await
            .expect("cached");
        verifier.settle().await;
        assert_eq!(issuer.jwks_fetches(), before + 1, "max-age {max_age:?}");
        // Past the lifetime: a refresh.
        let stale = t0 + secs(fresh_for + 1);
        verifier
            .verify(&token_at(&issuer, "c", stale), ROLE, stale)
            .await
            .expect("stale ok");
        verifier.settle().await;
        assert_eq!(issuer.jwks_fetches(), before + 2, "max-age {max_age:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oidc_discovery_finds_the_jwks() {
    let (issuer, certs) = https_issuer().await;
    let mut config = provider(&issuer, &certs);
    config.keys = KeySource::Discovery;
    let verifier = Verifier::new(vec![config]).expect("verifier");
    let identity = verifier
        .verify(&issuer.token("user_discovered"), ROLE, SystemTime::now())
        .await
        .expect("verified through discovery");
    assert_eq!(identity.subject, "user_discovered");
}

#[tokio::test(flavor = "multi_thread")]
async fn verified_tokens_are_remembered_but_checked_for_time_and_role() {
    let (issuer, certs) = https_issuer().await;
    let verifier = Verifier::new(vec![provider(&issuer, &certs)]).expect("verifier");
    let t0 = SystemTime::now();
    let token = issuer.mint(&TokenSpec::new("u").issued_at(t0).ttl(secs(60)));
    verifier.verify(&token, ROLE, t0).await.expect("first");
    assert_eq!(verifier.verified_tokens(), 1);
    verifier
        .verify(&token, ROLE, t0 + secs(10))
        .await
        .expect("hit");
    assert_eq!(verifier.verified_tokens(), 1);
    assert!(matches!(
        verifier.verify(&token, "postgres", t0).await,
        Err(VerifyError::RoleNotAllowed { .. })
    ));
    assert_eq!(
        verifier.verify(&token, ROLE, t0 + secs(91)).await,
        Err(VerifyError::Expired)
    );

    // Failures never enter the cache.
    let impostor = authgres_sandbox::Signer::generate(issuer.issuer()).expect("keys");
    let forged = impostor.mint(&TokenSpec::new("u"));
    for _ in 0..2 {
        assert_eq!(
            verifier.verify(&forged, ROLE, t0).await,
            Err(VerifyError::BadSignature)
        );
    }
    assert_eq!(verifier.verified_tokens(), 1);
}

/// A connection's last token (what `/sql` compares each request's token
/// with, instead of hashing it for the shared cache) answers only for the
/// same token, byte for byte, on the verifier that remembered it, and
/// passes every check a hit in the shared cache passes.
#[tokio::test(flavor = "multi_thread")]
async fn a_connections_last_token_answers_only_for_the_same_token_and_verifier() {
    let (issuer, certs) = https_issuer().await;
    let verifier = Verifier::new(vec![provider(&issuer, &certs)]).expect("verifier");
    let t0 = SystemTime::now();
    let token = issuer.mint(&TokenSpec::new("u").issued_at(t0).ttl(secs(60)));
    let mut last = LastToken::default();
    let hits = |v: &Verifier| v.token_cache_stats().hits;
    let verified = verifier.verify_remembering(&token, ROLE, t0, Some(&mut last));
    assert_eq!(verified.await.expect("first").subject, "u");
    let remembered = verifier.verify_remembering(&token, ROLE, t0 + secs(10), Some(&mut last));
    assert_eq!(remembered.await.expect("remembered").subject, "u");
    assert_eq!(hits(&verifier), 1);

    // Another signature over the same header and claims is not the token
    // remembered.
    let (signed, signature) = token.rsplit_once('.').expect("three parts");
    let mut forged = signature.as_bytes().to_vec();
    forged[0] = if forged[0] == b'A' { b'B' } else { b'A' };
    let forged = format!("{signed}.{}", String::from_utf8(forged).expect("ascii"));
    assert_eq!(
        verifier
            .verify_remembering(&forged, ROLE, t0, Some(&mut last))
            .await,
        Err(VerifyError::BadSignature)
    );
    // Time and role are checked again; the token stays remembered.
    assert!(matches!(
        verifier
            .verify_remembering(&token, "postgres", t0, Some(&mut last))
            .await,
        Err(VerifyError::RoleNotAllowed { .. })
    ));
    assert_eq!(
        verifier
            .verify_remembering(&token, ROLE, t0 + secs(91), Some(&mut last))
            .await,
        Err(VerifyError::Expired)
    );

    // A reload's verifier does not take the last one's word for it: the
    // identity follows the configuration it was verified under.
    let mut changed = provider(&issuer, &certs);
    changed.user_ids.prefix = Some("test:".into());
    let reloaded = verifier
        .reconfigured(vec![changed], 1000)
        .expect("reloaded");
    let identity = reloaded.verify_remembering(&token, ROLE, t0, Some(&mut last));
    assert_eq!(identity.await.expect("reloaded").user_id, "test:u");

    // Its key left the JWKS: refused, as a hit in the shared cache is.
    let mut last = LastToken::default();
    verifier
        .verify_remembering(&token, ROLE, t0, Some(&mut last))
        .await
        .expect("remembered again");
    issuer.signer().rotate_rsa(false).expect("rotate");
    let new = issuer.mint(&TokenSpec::new("v").issued_at(t0).ttl(secs(60)));
    verifier
        .verify(&new, ROLE, t0)
        .await
        .expect("new key after a refetch");
    assert_eq!(
        verifier
            .verify_remembering(&token, ROLE, t0, Some(&mut last))
            .await,
        Err(VerifyError::UnknownKey {
            kid: Some("rsa-1".into())
        })
    );

    // Without a token cache nothing is remembered: every request is
    // verified in full.
    let uncached =
        Verifier::with_token_cache(vec![provider(&issuer, &certs)], 0).expect("verifier");
    let mut last = LastToken::default();
    for _ in 0..2 {
        (uncached.verify_remembering(&new, ROLE, t0, Some(&mut last)))
            .await
            .expect("verified");
    }
    assert_eq!(hits(&uncached), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn role_claim_required_claims_and_max_token_age() {
    let (issuer, certs) = https_issuer().await;
    let mut config = provider(&issuer, &certs);
    config.roles = vec![ROLE.into(), "reporting".into()];
    config.role_claim = Some(RoleClaim::new(
        ClaimPath::parse("$.metadata.db_role").expect("path"),
        ROLE,
    ));
    config.required_claims = vec!["org_id".into()];
    config.max_token_age = Some(secs(600));
    let verifier = Verifier::new(vec![config]).expect("verifier");
    let t0 = SystemTime::now();
    let mint = |claims: serde_json::Value, at: SystemTime| {
        let mut spec = TokenSpec::new("u").issued_at(at);
        for (k, v) in claims.as_object().expect("object") {
            spec = spec.claim(k, v.clone());
        }
        issuer.mint(&spec)
    };
    let ok = mint(
        json!({"org_id": "org_1", "metadata": {"db_role": "reporting"}}),
        t0,
    );
    let identity = verifier.verify(&ok, ROLE, t0).await.expect("verified");
    assert_eq!(identity.role, "reporting");

    let no_role = mint(json!({"org_id": "org_1"}), t0);
    assert!(matches!(
        verifier.verify(&no_role, ROLE, t0).await,
        Err(VerifyError::RoleNotGranted { .. })
    ));
    let superuser = mint(
        json!({"org_id": "o", "metadata": {"db_role": "postgres"}}),
        t0,
    );
    assert!(matches!(
        verifier.verify(&superuser, ROLE, t0).await,
        Err(VerifyError::RoleNotGranted { .. })
    ));
    let no_org = mint(json!({"metadata": {"db_role": "reporting"}}), t0);
    assert_eq!(
        verifier.verify(&no_org, ROLE, t0).await,
        Err(VerifyError::MissingClaim("org_id".into()))
    );
    assert_eq!(
        verifier.verify(&ok, ROLE, t0 + secs(600 + 31)).await,
        Err(VerifyError::TooOld)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_claim_issuer_and_jti_reach_the_identity() {
    let (issuer, certs) = https_issuer().await;
    let mut config = provider(&issuer, &certs);
    config.tenant_claim = Some(ClaimPath::parse("$.o.id").expect("path"));
    let verifier = Verifier::new(vec![config]).expect("verifier");
    let t0 = SystemTime::now();
    let mint = |claims: serde_json::Value| {
        let mut spec = TokenSpec::new("u");
        for (k, v) in claims.as_object().expect("object") {
            spec = spec.claim(k, v.clone());
        }
        issuer.mint(&spec)
    };
    let acme = mint(json!({"o": {"id": "org_acme"}, "jti": "t-1"}));
    let identity = verifier.verify(&acme, ROLE, t0).await.expect("verified");
    assert_eq!(identity.tenant.as_deref(), Some("org_acme"));
    assert_eq!(identity.token_id.as_deref(), Some("t-1"));
    assert_eq!(&*identity.issuer, issuer.issuer());

    let numbered = mint(json!({"o": {"id": 42}}));
    let identity = verifier
        .verify(&numbered, ROLE, t0)
        .await
        .expect("verified");
    assert_eq!(identity.tenant.as_deref(), Some("42"));
    assert_eq!(identity.token_id, None);

    let none = mint(json!({}));
    assert_eq!(
        verifier
            .verify(&none, ROLE, t0)
            .await
            .expect("verified")
            .tenant,
        None
    );

    // A tenant is a key: a list, an object or an overlong string is refused,
    // never turned into one.
    for odd in [json!(["a", "b"]), json!({"x": 1}), json!("x".repeat(129))] {
        let token = mint(json!({"o": {"id": odd}}));
        assert!(matches!(
            verifier.verify(&token, ROLE, t0).await,
            Err(VerifyError::MissingClaim(_))
        ));
    }
}

/// The role-claim rule: the claim grants (a string or a list, mapped),
/// the startup user chooses among what it grants, `authenticated` lets
/// the token choose, the default is a floor, and nothing escalates.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_claim_grants_and_the_startup_user_must_agree() {
    let (issuer, certs) = https_issuer().await;
    let mut config = provider(&issuer, &certs);
    config.roles = vec![ROLE.into(), "editor".into(), "reader".into()];
    let mut rule = RoleClaim::new(ClaimPath::parse("$.org_role").expect("path"), ROLE);
    rule.values = [
        ("org:admin", "editor"),
        ("org:member", "reader"),
        ("org:root", "postgres"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    rule.default = Some("reader".into());
    config.role_claim = Some(rule.clone());
    // A mapping to a role the provider does not list is a config error.
    assert!(Verifier::new(vec![config.clone()]).is_err());
    rule.values.remove("org:root");
    config.role_claim = Some(rule);
    let verifier = Verifier::new(vec![config]).expect("verifier");
    let t0 = SystemTime::now();
    let with_role =
        |role: serde_json::Value| issuer.mint(&TokenSpec::new("u").claim("org_role", role));
    let role = |token: String, requested: &'static str| {
        let verifier = &verifier;
        async move { verifier.verify(&token, requested, t0).await.map(|i| i.role) }
    };
    let admin = with_role(json!("org:admin"));
    // The token chooses when the client asks for `authenticated`.
    assert_eq!(role(admin.clone(), ROLE).await, Ok("editor".into()));
    // The client may ask for what the claim grants, or for the floor.
    assert_eq!(role(admin.clone(), "editor").await, Ok("editor".into()));
    assert_eq!(role(admin.clone(), "reader").await, Ok("reader".into()));
    // A member asking for editor is refused, never escalated.
    let member = with_role(json!("org:member"));
    assert_eq!(
        role(member.clone(), "editor").await,
        Err(VerifyError::RoleNotGranted {
            requested: "editor".into(),
            granted: vec!["reader".into()],
        })
    );
    // A list grants each mapped value; the first one is the token's choice.
    let both = with_role(json!(["org:unknown", "org:member", "org:admin"]));
    assert_eq!(role(both.clone(), ROLE).await, Ok("reader".into()));
    assert_eq!(role(both, "editor").await, Ok("editor".into()));
    // Unmapped, unknown or odd values grant nothing: the default applies.
    for odd in [
        json!("org:root"),
        json!("editor"),
        json!(7),
        json!({"r": "editor"}),
    ] {
        assert_eq!(
            role(with_role(odd.clone()), ROLE).await,
            Ok("reader".into()),
            "{odd}"
        );
        assert!(matches!(
            role(with_role(odd), "editor").await,
            Err(VerifyError::RoleNotGranted { .. })
        ));
    }
    let none = issuer.mint(&TokenSpec::new("u"));
    assert_eq!(role(none, ROLE).await, Ok("reader".into()));
}

/// Runs `f` and returns what was logged meanwhile. The subscriber is
/// process-global (nextest runs one test per process) so that background
/// refreshes on other threads log into it too.
async fn capture_logs<F, Fut, T>(f: F) -> (String, T)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static LOGS: std::sync::OnceLock<Buffer> = std::sync::OnceLock::new();
    let buffer = LOGS.get_or_init(|| {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
        buffer
    });
    let start = buffer.0.lock().expect("lock").len();
    let result = f().await;
    let logs = String::from_utf8_lossy(&buffer.0.lock().expect("lock")[start..]).into_owned();
    (logs, result)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconfigured_verifier_keeps_the_keys_of_unchanged_providers_and_reports_them() {
    let (issuer, certs) = https_issuer().await;
    let (other, other_certs) = https_issuer().await;
    let verifier = Verifier::new(vec![provider(&issuer, &certs)]).expect("verifier");
    let t0 = SystemTime::now();
    let token = token_at(&issuer, "a", t0);
    verifier.verify(&token, ROLE, t0).await.expect("warm");
    verifier.verify(&token, ROLE, t0).await.expect("cached");
    let status = verifier.key_status(t0 + secs(10));
    assert_eq!(status.len(), 1);
    assert_eq!((status[0].fetches, status[0].failures), (1, 0));
    assert_eq!(status[0].age, Some(secs(10)));
    assert!(status[0].usable && !status[0].stale);

    // A reload that adds a provider and changes the first one's roles:
    // the first one's keys stay, the new one starts cold and unusable.
    let mut changed = provider(&issuer, &certs);
    changed.roles.push("reader".into());
    let mut added = provider(&other, &other_certs);
    added.name = "other".into();
    // Its users are not the first provider's: a second provider names them.
    added.user_ids.prefix = Some("other:".into());
    let reloaded = verifier
        .reconfigured(vec![changed, added], 1000)
        .expect("reconfigured");
    reloaded
        .verify(&token_at(&issuer, "b", t0), "reader", t0)
        .await
        .expect("new role, old keys");
    assert_eq!(
        issuer.jwks_fetches(),
        1,
        "no refetch for an unchanged key source"
    );
    let status = reloaded.key_status(t0);
    assert!(status[0].usable);
    assert_eq!(status[1].provider, "other");
    assert!(!status[1].usable && status[1].age.is_none());
    let stats = reloaded.token_cache_stats();
    assert_eq!((stats.hits, stats.misses), (1, 2), "counters carried over");

    // Keys past their lifetime are stale; past max_staleness unusable.
    issuer.set_behavior(Behavior::Down);
    let status = reloaded.key_status(t0 + secs(400));
    assert!(status[0].stale && status[0].usable);
    let status = reloaded.key_status(t0 + secs(25 * 3600));
    assert!(!status[0].usable);
}

/// Issue 21, 6: a reload left every replaced verifier's token cache (up to
/// 100,000 tokens) resident for as long as one of its sessions lived.
#[tokio::test(flavor = "multi_thread")]
async fn a_retired_verifier_forgets_its_tokens_and_remembers_no_more() {
    let (issuer, certs) = https_issuer().await;
    let verifier = Verifier::new(vec![provider(&issuer, &certs)]).expect("verifier");
    let t0 = SystemTime::now();
    let first = issuer.mint(&TokenSpec::new("u").issued_at(t0).ttl(secs(60)));
    verifier.verify(&first, ROLE, t0).await.expect("first");
    assert_eq!(verifier.verified_tokens(), 1);
    verifier.retire();
    assert_eq!(verifier.verified_tokens(), 0);
    // A login still under way on it verifies in full, and is not kept.
    let second = issuer.mint(&TokenSpec::new("v").issued_at(t0).ttl(secs(60)));
    verifier.verify(&second, ROLE, t0).await.expect("second");
    verifier
        .verify(&first, ROLE, t0)
        .await
        .expect("first again");
    assert_eq!(verifier.verified_tokens(), 0);
}

/// Issue 21 item 5: two providers, one `sub`. The identity was a sub
/// without its issuer, so provider B's "user_1" was provider A's.
#[tokio::test(flavor = "multi_thread")]
async fn two_providers_give_the_same_sub_distinct_user_ids() {
    let (a, certs_a) = https_issuer().await;
    let (b, certs_b) = https_issuer().await;
    let named = |issuer: &Issuer, certs: &TestCerts, name: &str, prefix: Option<&str>| {
        let mut config = provider(issuer, certs);
        config.name = name.to_owned();
        config.user_ids.prefix = prefix.map(str::to_owned);
        config
    };
    let now = SystemTime::now();

    // Neither prefixed nor shared: refused, both named.
    let refused = Verifier::new(vec![
        named(&a, &certs_a, "a", None),
        named(&b, &certs_b, "b", None),
    ])
    .err()
    .expect("two bare providers are refused");
    let text = refused.to_string();
    assert!(text.contains("\"a\"") && text.contains("\"b\""), "{text}");

    // Prefixed: the same sub is two users, in the identity and in the
    // claims the proxy signs.
    let verifier = Verifier::new(vec![
        named(&a, &certs_a, "a", Some("a:")),
        named(&b, &certs_b, "b", Some("b:")),
    ])
    .expect("prefixed providers");
    let from_a = verifier
        .verify(&a.token("user_1"), ROLE, now)
        .await
        .expect("a");
    let from_b = verifier
        .verify(&b.token("user_1"), ROLE, now)
        .await
        .expect("b");
    assert_eq!(
        (from_a.subject.as_str(), from_a.user_id.as_str()),
        ("user_1", "a:user_1")
    );
    assert_eq!(from_b.user_id, "b:user_1");
    let signed: serde_json::Value = serde_json::from_str(&from_b.claims_json).expect("json");
    assert_eq!(signed["sub"], "b:user_1");
    assert_eq!(signed["iss"], b.issuer());

    // Shared on both: one namespace, the token's claims unchanged.
    let mut shared_a = named(&a, &certs_a, "a", None);
    let mut shared_b = named(&b, &certs_b, "b", None);
    shared_a.user_ids.shared = true;
    shared_b.user_ids.shared = true;
    let verifier = Verifier::new(vec![shared_a, shared_b]).expect("shared providers");
    let from_b = verifier
        .verify(&b.token("user_1"), ROLE, now)
        .await
        .expect("b");
    assert_eq!(from_b.user_id, "user_1");
    assert!(from_b.claims_json.contains("\"sub\":\"user_1\""));

    // A bare provider beside a prefixed one keeps its ids, and refuses a
    // sub that would be one of the other's.
    let verifier = Verifier::new(vec![
        named(&a, &certs_a, "a", None),
        named(&b, &certs_b, "b", Some("b:")),
    ])
    .expect("bare beside prefixed");
    let plain = verifier
        .verify(&a.token("user_1"), ROLE, now)
        .await
        .expect("a");
    assert_eq!(plain.user_id, "user_1");
    assert_eq!(
        verifier.verify(&a.token("b:user_1"), ROLE, now).await,
        Err(VerifyError::SubjectInOtherNamespace)
    );
}
