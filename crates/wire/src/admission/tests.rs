use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use authgres_jwt::ProviderConfig;
use authgres_sandbox::{Issuer, TokenSpec};
use serde_json::json;

use super::*;
use crate::config::RoleConfig;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const REMOTE: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));

fn policy(cleartext_tokens: CleartextTokens, databases: &[&str]) -> Policy {
    let role = |requires_token| RoleConfig {
        password: None,
        requires_token,
        login: crate::config::TokenLogin::Password,
    };
    Policy {
        roles: HashMap::from([
            ("authenticated".to_owned(), role(true)),
            ("anonymous".to_owned(), role(false)),
            ("reporting".to_owned(), role(true)),
        ]),
        databases: databases.iter().map(|d| (*d).to_owned()).collect(),
        routes: HashMap::new(),
        cleartext_tokens,
        tls_offered: true,
    }
}

fn request<'a>(
    role: &'a str,
    database: &'a str,
    peer: IpAddr,
    encrypted: bool,
) -> LoginRequest<'a> {
    LoginRequest {
        role,
        database,
        peer,
        relayed_by: None,
        encrypted,
        transport: Transport::Wire,
    }
}

#[test]
fn through_a_balancer_cleartext_is_loopback_only_if_both_legs_are() {
    let policy = policy(CleartextTokens::LoopbackOnly, &["app"]);
    let relayed = |peer, balancer| LoginRequest {
        relayed_by: Some(balancer),
        ..request("authenticated", "app", peer, false)
    };
    // A balancer on this host: the header's address decides.
    assert_eq!(
        check(&policy, &relayed(LOOPBACK, LOOPBACK)),
        Ok(Need::Token)
    );
    assert_eq!(
        check(&policy, &relayed(REMOTE, LOOPBACK)),
        Err(Refusal::CleartextRefused(Transport::Wire))
    );
    // A client local to a balancer elsewhere still crosses the network.
    let balancer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(
        check(&policy, &relayed(LOOPBACK, balancer)),
        Err(Refusal::CleartextRefused(Transport::Wire))
    );
}

#[test]
fn roles_databases_and_the_cleartext_policy_over_the_whole_matrix() {
    use CleartextTokens::{Allow, LoopbackOnly, Refuse};
    for (cleartext, peer, encrypted, token_allowed) in [
        (Allow, REMOTE, false, true),
        (LoopbackOnly, LOOPBACK, false, true),
        (LoopbackOnly, REMOTE, false, false),
        (LoopbackOnly, REMOTE, true, true),
        (Refuse, LOOPBACK, false, false),
        (Refuse, LOOPBACK, true, true),
    ] {
        let policy = policy(cleartext, &["app"]);
        let asked = request("authenticated", "app", peer, encrypted);
        let expected = match token_allowed {
            true => Ok(Need::Token),
            false => Err(Refusal::CleartextRefused(Transport::Wire)),
        };
        assert_eq!(
            check(&policy, &asked),
            expected,
            "{cleartext:?} {peer} tls={encrypted}"
        );
        // An anonymous role needs no token, so no cleartext policy applies.
        let anonymous = request("anonymous", "app", peer, encrypted);
        assert_eq!(check(&policy, &anonymous), Ok(Need::Nothing));
        assert_eq!(
            check(&policy, &request("postgres", "app", peer, encrypted)),
            Err(Refusal::UnknownRole("postgres".into()))
        );
        assert_eq!(
            check(&policy, &request("authenticated", "other", peer, encrypted)),
            Err(Refusal::UnknownDatabase("other".into()))
        );
    }
    let any_database = policy(Allow, &[]);
    assert_eq!(
        check(
            &any_database,
            &request("authenticated", "whatever", REMOTE, false)
        ),
        Ok(Need::Token)
    );
}

async fn verifier(issuer: &Issuer, role_claim: Option<&str>) -> Verifier {
    let mut provider = ProviderConfig::new(
        "sandbox",
        issuer.issuer(),
        &issuer.jwks_url(),
        &["authenticated", "reporting"],
    );
    provider.role_claim = role_claim.map(|path| {
        let path = authgres_jwt::ClaimPath::parse(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        authgres_jwt::RoleClaim::new(path, "authenticated")
    });
    Verifier::new(vec![provider]).expect("provider")
}

#[tokio::test]
async fn tokens_are_verified_and_checked_against_the_clock() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier(&issuer, None).await;
    let policy = policy(CleartextTokens::LoopbackOnly, &["app"]);
    let asked = request("authenticated", "app", LOOPBACK, false);
    let now = SystemTime::now();

    let token = issuer.mint(&TokenSpec::new("user_1"));
    let admitted = admit(
        &policy,
        &verifier,
        &Metrics::default(),
        &asked,
        Some(&token),
        None,
        now,
    )
    .await
    .expect("admitted");
    assert_eq!(
        (admitted.role.as_str(), admitted.database.as_str()),
        ("authenticated", "app")
    );
    assert_eq!(
        admitted.identity.map(|i| i.subject),
        Some("user_1".to_owned())
    );

    for missing in [None, Some("")] {
        assert_eq!(
            admit(
                &policy,
                &verifier,
                &Metrics::default(),
                &asked,
                missing,
                None,
                now
            )
            .await
            .err(),
            Some(Refusal::MissingToken(
                "authenticated".into(),
                Transport::Wire
            ))
        );
    }
    let expired = issuer
        .mint(&TokenSpec::new("user_1").issued_at(now - std::time::Duration::from_secs(7200)));
    assert!(matches!(
        admit(
            &policy,
            &verifier,
            &Metrics::default(),
            &asked,
            Some(&expired),
            None,
            now
        )
        .await,
        Err(Refusal::Token(VerifyError::Expired))
    ));
}

#[tokio::test]
async fn a_role_claim_picks_the_role_anonymous_ignores_tokens_and_refusals_come_first() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier_with_role_claim = verifier(&issuer, Some("$.db_role")).await;
    let verifier = verifier(&issuer, None).await;
    let policy = policy(CleartextTokens::LoopbackOnly, &["app"]);
    let asked = request("authenticated", "app", LOOPBACK, false);
    let now = SystemTime::now();
    let token = issuer.mint(&TokenSpec::new("user_1"));
    // The token's role claim picks another served role.
    let reporting = issuer.mint(&TokenSpec::new("user_2").claim("db_role", json!("reporting")));
    let admitted = admit(
        &policy,
        &verifier_with_role_claim,
        &Metrics::default(),
        &asked,
        Some(&reporting),
        None,
        now,
    )
    .await
    .expect("admitted as reporting");
    assert_eq!(admitted.role, "reporting");
    // An anonymous login ignores a token and has no identity.
    let anonymous = request("anonymous", "app", LOOPBACK, false);
    let admitted = admit(
        &policy,
        &verifier,
        &Metrics::default(),
        &anonymous,
        Some("not a token"),
        None,
        now,
    )
    .await
    .expect("anonymous");
    assert!(admitted.identity.is_none());
    // Refusals come before verification.
    let remote = Policy {
        cleartext_tokens: CleartextTokens::Refuse,
        ..policy.clone()
    };
    assert_eq!(
        admit(
            &remote,
            &verifier,
            &Metrics::default(),
            &asked,
            Some(&token),
            None,
            now
        )
        .await
        .err(),
        Some(Refusal::CleartextRefused(Transport::Wire))
    );
}

#[tokio::test]
async fn a_claimed_role_the_proxy_does_not_serve_is_refused() {
    let issuer = Issuer::start().await.expect("issuer");
    let verifier = verifier(&issuer, Some("$.db_role")).await;
    let mut policy = policy(CleartextTokens::Allow, &[]);
    policy.roles.remove("reporting");
    let token = issuer.mint(&TokenSpec::new("user_2").claim("db_role", json!("reporting")));
    let asked = request("authenticated", "app", LOOPBACK, false);
    assert_eq!(
        admit(
            &policy,
            &verifier,
            &Metrics::default(),
            &asked,
            Some(&token),
            None,
            SystemTime::now()
        )
        .await
        .err(),
        Some(Refusal::ClaimedRoleNotServed("reporting".into()))
    );
}

#[test]
fn each_transport_words_a_refusal_its_own_way_with_one_code() {
    let wire = Refusal::MissingToken("authenticated".into(), Transport::Wire).client_view();
    let http = Refusal::MissingToken("authenticated".into(), Transport::Http).client_view();
    let (wire, http) = (wire.expect("view"), http.expect("view"));
    assert_eq!(wire.code, http.code);
    assert!(wire.message.contains("password") && http.message.contains("Bearer"));
    assert_eq!(
        Refusal::UnknownDatabase("x".into()).label(),
        "unknown_database"
    );
    assert_eq!(
        Refusal::Token(VerifyError::KeysUnavailable {
            provider: "p".into()
        })
        .severity(),
        Severity::Service
    );
    assert_eq!(
        Refusal::Token(VerifyError::Expired).severity(),
        Severity::Client
    );
}

#[test]
fn a_listener_without_tls_says_the_operator_must_add_it_not_the_client() {
    let without_tls = Policy {
        tls_offered: false,
        ..policy(CleartextTokens::LoopbackOnly, &[])
    };
    let refusal = check(
        &without_tls,
        &request("authenticated", "app", REMOTE, false),
    )
    .expect_err("refused");
    assert_eq!(refusal, Refusal::TlsNotConfigured);
    let view = crate::error::Classify::client_view(&refusal).expect("a view");
    let hint = view.hint.unwrap_or_default();
    assert!(hint.contains("tls_cert"), "{hint}");
    assert!(!hint.starts_with("connect with sslmode=require"), "{hint}");
    // With a certificate the client is the one to act.
    let with_tls = policy(CleartextTokens::LoopbackOnly, &[]);
    assert_eq!(
        check(&with_tls, &request("authenticated", "app", REMOTE, false)),
        Err(Refusal::CleartextRefused(Transport::Wire))
    );
}
