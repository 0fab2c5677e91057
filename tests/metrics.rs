//! `/metrics` of the real binary (issue 24): every family is there from
//! the start, with zero series where its labels are known (no dashboard
//! or alert waits for a first event), build and process metrics included;
//! the per-database totals move with a session and with `/sql`, and the
//! console's stats API reads the same totals.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a panic is a failing test"
)]

mod common;

use std::collections::BTreeSet;

use common::{DATABASE, Samples, Stack};

/// Families (as `# TYPE` names them) the exposition must have at start,
/// and whether they must have series already (their labels are known from
/// the configuration or are a closed set).
const FAMILIES: &[(&str, bool)] = &[
    ("authgres_build_info", true),
    ("process_start_time_seconds", true),
    ("process_cpu_seconds_total", true),
    ("process_resident_memory_bytes", true),
    ("process_virtual_memory_bytes", true),
    ("process_open_fds", true),
    ("process_max_fds", true),
    ("authgres_logins_total", true),
    ("authgres_token_verifications_total", true),
    ("authgres_token_verification_seconds", true),
    ("authgres_upstream_login_seconds", true),
    ("authgres_upstream_login_errors_total", true),
    ("authgres_pool_checkout_wait_seconds", true),
    ("authgres_pool_checkout_timeouts_total", true),
    ("authgres_transactions_total", true),
    ("authgres_queries_total", true),
    ("authgres_client_received_bytes_total", true),
    ("authgres_client_sent_bytes_total", true),
    ("authgres_transaction_duration_seconds", true),
    ("authgres_query_duration_seconds", true),
    ("authgres_client_wait_seconds_total", true),
    ("authgres_http_requests_total", true),
    ("authgres_cancel_requests_total", true),
    ("authgres_config_reloads_total", true),
    ("authgres_identity_limit_refusals_total", true),
    ("authgres_degraded", true),
    ("authgres_draining", true),
    ("authgres_clients", true),
    ("authgres_pool_connections", false),
    ("authgres_pool_waiting_clients", false),
    ("authgres_pool_size", false),
    ("authgres_jwks_fetches_total", false),
    ("authgres_jwks_fetch_failures_total", false),
    ("authgres_jwks_key_age_seconds", false),
    ("authgres_jwks_stale", false),
    ("authgres_jwks_usable", false),
    ("authgres_token_cache_hits_total", true),
    ("authgres_token_cache_misses_total", true),
];

/// The `# TYPE` names of an exposition.
fn families(text: &str) -> BTreeSet<&str> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect()
}

/// Whether `samples` has one of the family `name` (a histogram's
/// `_bucket`, `_count` and `_sum` count).
fn has_samples(samples: &Samples, name: &str) -> bool {
    samples.keys().any(|sample| {
        let base = sample.split('{').next().unwrap_or_default();
        base == name
            || ["_bucket", "_count", "_sum"]
                .iter()
                .any(|suffix| base.strip_suffix(suffix) == Some(name))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn every_family_is_there_right_after_start_with_zeros() {
    let stack = Stack::start().await;
    // No login, no request, no probe: straight after the start.
    let (status, text) = stack.admin_get("/metrics").await;
    assert_eq!(status, 200, "{text}");
    let found = families(&text);
    let samples = common::parse_metrics(&text);
    let mut missing = Vec::new();
    for (family, with_series) in FAMILIES {
        if !found.contains(family) {
            missing.push(format!("{family} (no # TYPE)"));
        } else if *with_series && !has_samples(&samples, family) {
            missing.push(format!("{family} (no series)"));
        }
    }
    assert!(missing.is_empty(), "missing: {missing:#?}\n{text}");

    let zero = |sample: &str| {
        assert_eq!(
            samples.get(sample).copied(),
            Some(0.0),
            "{sample} in {samples:#?}"
        );
    };
    zero("authgres_transactions_total{database=\"app\",role=\"authenticated\",transport=\"tcp\"}");
    zero("authgres_logins_total{outcome=\"ok\",reason=\"none\",transport=\"tcp\"}");
    zero("authgres_token_verifications_total{outcome=\"ok\",provider=\"sandbox\",reason=\"none\"}");
    zero("authgres_upstream_login_seconds_count{database=\"app\",role=\"authenticated\"}");
    zero("authgres_client_wait_seconds_total{database=\"app\",role=\"authenticated\"}");
    let build = format!(
        "authgres_build_info{{arch=\"{}\",os=\"{}\",profile=\"debug\",version=\"{}\"}}",
        std::env::consts::ARCH,
        std::env::consts::OS,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(samples.get(&build).copied(), Some(1.0), "{samples:#?}");
    assert!(samples["process_resident_memory_bytes"] > 1e6);
    assert!(samples["process_open_fds"] >= 3.0);
    let started = samples["process_start_time_seconds"];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!((now - 120.0..=now).contains(&started), "{started} vs {now}");
}

/// The histograms' buckets add up, a session's queries and transactions
/// land under its database and role, and the startup line names the
/// version and the configuration.
#[tokio::test(flavor = "multi_thread")]
async fn histograms_count_what_a_session_ran_and_the_start_is_logged() {
    let stack = Stack::start().await;
    stack.wait_ready().await;
    let client = stack.login("user_h").await;
    for _ in 0..3 {
        client.simple_query("select 1").await.expect("query");
    }
    client
        .batch_execute("begin; select 1; select 2; commit")
        .await
        .expect("transaction");
    let samples = stack.metrics().await;
    let labels = "database=\"app\",role=\"authenticated\",transport=\"tcp\"";
    let get = |name: &str| samples.get(&format!("{name}{{{labels}}}")).copied();
    // Three statements and one transaction block (the login's own
    // exchanges are the proxy's, not counted).
    assert_eq!(
        get("authgres_transactions_total"),
        Some(4.0),
        "{samples:#?}"
    );
    assert_eq!(
        get("authgres_transaction_duration_seconds_count"),
        Some(4.0)
    );
    // batch_execute sends one simple Query: one query.
    assert_eq!(get("authgres_queries_total"), Some(4.0));
    let inf = samples["authgres_query_duration_seconds_bucket{database=\"app\",le=\"+Inf\",role=\"authenticated\",transport=\"tcp\"}"];
    assert_eq!(inf, 4.0);
    assert!(get("authgres_query_duration_seconds_sum").expect("sum") > 0.0);

    let log = stack.log();
    let start = log
        .lines()
        .find(|l| l.contains("authgres starting"))
        .unwrap_or_else(|| panic!("no startup line:\n{log}"));
    assert!(start.contains(env!("CARGO_PKG_VERSION")), "{start}");
    assert!(
        start.contains(&format!("databases=[\"{DATABASE}\"]")),
        "{start}"
    );
    assert!(start.contains("sandbox"), "{start}");
    // The log is a file, not a terminal: no colour codes.
    assert!(!log.contains('\u{1b}'), "ANSI codes in a file:\n{log}");
    // Each session line names the user once.
    drop(client);
    stack.wait_log("session ended").await;
    let ended = stack.log();
    let line = ended
        .lines()
        .find(|l| l.contains("session ended") && l.contains("transactions="))
        .unwrap_or_else(|| panic!("no session end line:\n{ended}"));
    assert_eq!(line.matches("user=").count(), 1, "{line}");
    assert!(line.contains("transactions=4"), "{line}");
    assert!(line.contains("reason=\"client_terminated\""), "{line}");
}

/// A token from another issuer (a trailing slash here; a Clerk development
/// instance against a production one in the field) is refused, counted by
/// its reason, and logged with the presented and the expected `iss`,
/// never the token; `/sql` answers it 400 as Neon's endpoint does.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_issuer_is_counted_and_logged_with_both_issuers() {
    let stack = Stack::start().await;
    stack.wait_ready().await;
    let slashed = format!("{}/", stack.issuer.issuer());
    let token = stack
        .issuer
        .signer()
        .mint(&authgres_sandbox::TokenSpec::new("user_w").claim("iss", serde_json::json!(slashed)));
    let refused = stack.connect("authenticated", &token).await;
    assert!(refused.is_err());
    let response = stack
        .sql_post(&token, r#"{"query": "select 1", "params": []}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 400);
    let samples = stack.metrics().await;
    assert_eq!(
        samples.get(
            "authgres_logins_total{outcome=\"refused\",reason=\"unknown_issuer\",transport=\"tcp\"}"
        ),
        Some(&1.0),
        "{samples:#?}"
    );
    assert_eq!(
        samples.get(
            "authgres_token_verifications_total{outcome=\"refused\",provider=\"unknown\",reason=\"unknown_issuer\"}"
        ),
        Some(&2.0),
        "{samples:#?}"
    );
    stack.wait_log("expected one of").await;
    let log = stack.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("expected one of"))
        .collect();
    assert_eq!(lines.len(), 2, "the TCP and the /sql refusal:\n{log}");
    for line in lines {
        assert!(line.contains(&format!("{slashed:?}")), "{line}");
        assert!(!line.contains(&token), "the token is never logged: {line}");
    }
}
