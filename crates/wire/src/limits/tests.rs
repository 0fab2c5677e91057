#![allow(clippy::expect_used, reason = "test code: a panic is a failing test")]

use std::sync::Arc;

use authgres_jwt::Identity;

use super::*;

fn identity(user: &str, tenant: Option<&str>) -> Identity {
    Identity {
        provider: Arc::from("clerk"),
        subject: user.to_owned(),
        user_id: user.to_owned(),
        role: "authenticated".to_owned(),
        claims_json: Arc::from("{}"),
        expires_at: 0,
        issuer: Arc::from("https://id.example"),
        token_id: None,
        tenant: tenant.map(str::to_owned),
    }
}

fn limits(user: Option<u32>, tenant: Option<u32>) -> IdentityLimits {
    IdentityLimits {
        connections_per_user: user,
        transactions_per_user: user,
        connections_per_tenant: tenant,
        transactions_per_tenant: tenant,
    }
}

fn table(role: IdentityLimits, provider: IdentityLimits) -> LimitTable {
    LimitTable {
        by_role: [("authenticated".to_owned(), role)].into(),
        by_provider: [("clerk".to_owned(), provider)].into(),
    }
}

#[test]
fn the_smaller_of_role_and_provider_applies_and_unset_is_unlimited() {
    let table = table(limits(Some(5), None), limits(Some(3), Some(7)));
    assert_eq!(
        table.resolve("authenticated", "clerk"),
        limits(Some(3), Some(7))
    );
    assert_eq!(table.resolve("other", "clerk"), limits(Some(3), Some(7)));
    assert_eq!(table.resolve("other", "auth0"), IdentityLimits::default());
    assert!(table.limits_transactions());
    assert!(!LimitTable::default().limits_transactions());
}

#[test]
fn a_user_at_its_limit_is_refused_with_its_name_and_the_key_and_others_go_on() {
    let limiter = Limiter::new(table(limits(Some(2), None), IdentityLimits::default()));
    let mut u1 = limiter.who(&identity("u1", None), "authenticated");
    let held = [
        limiter.connect(&mut u1).expect("first"),
        limiter.connect(&mut u1).expect("second"),
    ];
    let refused = limiter.connect(&mut u1).expect_err("third");
    assert_eq!(refused.limit, Limit::ConnectionsPerUser);
    assert_eq!(
        refused.to_string(),
        "user \"u1\" already has 2 connections (max_connections_per_user = 2)"
    );
    let view = refused.client_view().expect("told");
    assert_eq!(view.code.code(), "53300");
    let mut u2 = limiter.who(&identity("u2", None), "authenticated");
    let _other = limiter.connect(&mut u2).expect("another user");
    drop(held);
    let _again = limiter.connect(&mut u1).expect("a place came back");
}

#[test]
fn a_tenant_shares_its_limit_and_a_refusal_counts_nothing() {
    let limiter = Limiter::new(table(limits(Some(5), Some(2)), IdentityLimits::default()));
    let mut a = limiter.who(&identity("a", Some("org_1")), "authenticated");
    let mut b = limiter.who(&identity("b", Some("org_1")), "authenticated");
    let mut c = limiter.who(&identity("c", Some("org_2")), "authenticated");
    let t1 = limiter.begin(&mut a).expect("a").expect("counted");
    let t2 = limiter.begin(&mut b).expect("b").expect("counted");
    let refused = limiter.begin(&mut b).expect_err("org_1 is full");
    assert_eq!(refused.limit, Limit::TransactionsPerTenant);
    assert_eq!(refused.client_view().expect("told").code.code(), "53400");
    assert!(refused.to_string().starts_with("tenant \"org_1\""));
    let _t3 = limiter.begin(&mut c).expect("org_2 is not");
    // b's refused attempt took nothing: one place back lets one in.
    drop(t1);
    let _t4 = limiter.begin(&mut b).expect("b again").expect("counted");
    drop(t2);
    assert_eq!(limiter.active(), 4, "b, org_1, c, org_2");
}

#[test]
fn entries_go_when_nothing_is_held() {
    let limiter = Limiter::new(table(limits(Some(3), Some(3)), IdentityLimits::default()));
    let mut a = limiter.who(&identity("a", Some("org")), "authenticated");
    let seat = limiter.connect(&mut a).expect("seat");
    let turn = limiter.begin(&mut a).expect("turn");
    assert_eq!(limiter.active(), 2);
    drop(seat);
    assert_eq!(limiter.active(), 2, "the transaction is still held");
    drop(turn);
    assert_eq!(limiter.active(), 0);
}

#[test]
fn without_transaction_limits_nothing_is_counted_and_a_reload_changes_new_work_only() {
    let limiter = Limiter::new(LimitTable::default());
    let mut a = limiter.who(&identity("a", None), "authenticated");
    assert!(limiter.begin(&mut a).expect("unlimited").is_none());
    assert_eq!(limiter.active(), 0);
    limiter.configure(table(limits(Some(1), None), IdentityLimits::default()));
    let held = limiter.begin(&mut a).expect("first").expect("counted");
    limiter
        .begin(&mut a)
        .expect_err("the new limit holds for a Who resolved before it");
    limiter.configure(table(limits(Some(2), None), IdentityLimits::default()));
    let _second = limiter.begin(&mut a).expect("raised");
    limiter.configure(table(limits(Some(1), None), IdentityLimits::default()));
    let refused = limiter
        .begin(&mut a)
        .expect_err("lowered below what is held");
    assert_eq!(refused.held, 2);
    drop(held);
}
