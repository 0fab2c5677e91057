//! The attack suite: a hostile client behind authgres tries to forge,
//! replay or escape its identity with SQL. Every attack must be refused or
//! fail closed: `auth.user_id()` is the caller's own id or NULL, never
//! anyone else's. Runs against a real Postgres through the real binary.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

mod common;

use std::time::Duration;

use authgres_sandbox::TokenSpec;
use common::{Stack, backend_pid, user_id};
use serde_json::json;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

const ALICE: &str = "user_alice";
const BOB: &str = "user_bob";

async fn login(stack: &Stack, sub: &str) -> Client {
    stack.login(sub).await
}

/// The identity is the caller's own or NULL, never anyone else's.
async fn assert_not_forged(client: &Client, own: &str, attack: &str) {
    let seen = user_id(client).await;
    assert!(
        seen.is_none() || seen.as_deref() == Some(own),
        "{attack}: auth.user_id() became {seen:?}"
    );
    let jwt: Option<String> = client
        .query_one("select auth.jwt()::text", &[])
        .await
        .expect("auth.jwt()")
        .get(0);
    if let Some(jwt) = jwt {
        let jwt: serde_json::Value = serde_json::from_str(&jwt).expect("jwt json");
        assert_eq!(jwt["sub"], own, "{attack}: auth.jwt() names someone else");
    }
}

/// Alice's claims and signature as her session holds them.
async fn capture(client: &Client) -> (String, String) {
    let row = client
        .query_one(
            "select current_setting('authgres.claims'), current_setting('authgres.signature')",
            &[],
        )
        .await
        .expect("own settings are readable");
    (row.get(0), row.get(1))
}

async fn replay(client: &Client, claims: &str, signature: &str) {
    client
        .query(
            "select set_config('authgres.claims', $1, false), set_config('authgres.signature', $2, false)",
            &[&claims, &signature],
        )
        .await
        .expect("settings are writable; they just must not verify");
}

/// A token that still logs in for about two seconds: its `exp` passed 28 s
/// ago, inside the default 30 s leeway.
fn almost_expired(stack: &Stack, sub: &str) -> String {
    let hour = Duration::from_secs(3600);
    stack.issuer.mint(
        &TokenSpec::new(sub)
            .issued_at(std::time::SystemTime::now() - hour)
            .ttl(hour - Duration::from_secs(28)),
    )
}

/// Whether init-db installed the native identity path for this stack.
fn native(stack: &Stack) -> bool {
    common::identity_path(&stack.init_db_output) == "native"
}

fn forged_claims(sub: &str) -> String {
    json!({"sub": sub, "iss": "whatever", "exp": 4_000_000_000u64}).to_string()
}

fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

// ---- rewriting the claim settings ----------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn set_claims_outside_a_transaction() {
    let stack = Stack::start().await;
    let carol = login(&stack, "user_carol").await;
    carol
        .batch_execute(&format!(
            "set authgres.claims = {}",
            sql_literal(&forged_claims(BOB))
        ))
        .await
        .expect("set");
    assert_not_forged(&carol, "user_carol", "SET authgres.claims").await;
    assert_eq!(
        user_id(&carol).await,
        None,
        "a rewritten claim fails closed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn set_config_of_claims_and_signature() {
    let stack = Stack::start().await;
    let carol = login(&stack, "user_carol").await;
    let (_, signature) = capture(&carol).await;
    for (claims, sig) in [
        (forged_claims(BOB), signature.clone()),
        (forged_claims(BOB), "0".repeat(64)),
        (forged_claims(BOB), String::new()),
        (forged_claims(BOB), "zz".repeat(32)),
    ] {
        replay(&carol, &claims, &sig).await;
        assert_not_forged(&carol, "user_carol", "set_config").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn set_local_and_set_config_local_inside_a_transaction() {
    let stack = Stack::start().await;
    let mut carol = login(&stack, "user_carol").await;
    for statement in [
        format!(
            "set local authgres.claims = {}",
            sql_literal(&forged_claims(BOB))
        ),
        format!(
            "select set_config('authgres.claims', {}, true)",
            sql_literal(&forged_claims(BOB))
        ),
        "set local authgres.signature = ''".to_owned(),
    ] {
        let tx = carol.transaction().await.expect("begin");
        tx.batch_execute(&statement).await.expect(&statement);
        let inside: Option<String> = tx
            .query_one("select auth.user_id()", &[])
            .await
            .expect("inside")
            .get(0);
        assert_eq!(inside, None, "{statement}");
        tx.rollback().await.expect("rollback");
        assert_eq!(
            user_id(&carol).await.as_deref(),
            Some("user_carol"),
            "{statement}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_of_each_setting_and_reset_all_inside_and_outside_transactions() {
    let stack = Stack::start().await;
    for statement in [
        "reset authgres.claims",
        "reset authgres.signature",
        "reset all",
        "begin; reset all; commit",
        "begin; set local authgres.claims = '{}'; reset all; commit",
    ] {
        let carol = login(&stack, "user_carol").await;
        carol.batch_execute(statement).await.expect(statement);
        assert_not_forged(&carol, "user_carol", statement).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn discard_all_and_discard_temp() {
    let stack = Stack::start().await;
    for statement in [
        "discard all",
        "discard temp",
        "discard plans",
        "discard sequences",
    ] {
        let carol = login(&stack, "user_carol").await;
        carol.batch_execute(statement).await.expect(statement);
        if statement == "discard sequences" {
            // Without this backend's currval of the generation sequence
            // the functions raise until the next attach (the native path
            // answers on if it had read the generation before).
            match carol.query_one("select auth.user_id()", &[]).await {
                Err(error) => {
                    assert_eq!(
                        error.code(),
                        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
                    );
                    continue;
                }
                Ok(row) => assert!(
                    native(&stack),
                    "portable answered {:?}",
                    row.get::<_, Option<String>>(0)
                ),
            }
        }
        assert_not_forged(&carol, "user_carol", statement).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn do_blocks_functions_and_multi_statement_strings() {
    let stack = Stack::start().await;
    let carol = login(&stack, "user_carol").await;
    let forged = sql_literal(&forged_claims(BOB));
    carol
        .batch_execute(&format!(
            "do $$ begin perform set_config('authgres.claims', {forged}, false); end $$"
        ))
        .await
        .expect("DO");
    assert_not_forged(&carol, "user_carol", "DO block").await;
    carol
        .batch_execute(&format!(
            "create function pg_temp.become() returns void language sql as \
             $$ select set_config('authgres.claims', {forged}, false) $$; \
             select pg_temp.become(); select auth.user_id()"
        ))
        .await
        .expect("temp function");
    assert_not_forged(&carol, "user_carol", "function in pg_temp").await;
    // The same through the extended protocol.
    let statement = carol
        .prepare("select set_config('authgres.claims', $1, false)")
        .await
        .expect("prepare");
    carol
        .query(&statement, &[&forged_claims(BOB)])
        .await
        .expect("execute");
    assert_not_forged(&carol, "user_carol", "extended protocol").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_reports_only_the_own_identity() {
    let stack = Stack::start().await;
    let carol = login(&stack, "user_carol").await;
    use futures_util::StreamExt as _;
    let stream = carol
        .copy_out("copy (select auth.user_id()) to stdout")
        .await
        .expect("copy out");
    let chunks: Vec<_> = stream.collect().await;
    let text: Vec<u8> = chunks
        .into_iter()
        .flat_map(|c| c.expect("chunk").to_vec())
        .collect();
    assert_eq!(String::from_utf8_lossy(&text), "user_carol\n");
}

// ---- escaping the role ---------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn set_role_to_any_other_role_is_refused() {
    let stack = Stack::start().await;
    let carol = login(&stack, "user_carol").await;
    for role in [
        "postgres",
        "anonymous",
        "reporting",
        "pg_read_all_data",
        "pg_signal_backend",
    ] {
        let error = carol
            .batch_execute(&format!("set role {role}"))
            .await
            .expect_err(role);
        assert_eq!(
            error.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{role}: {error}"
        );
        let error = carol
            .query(&format!("select set_config('role', '{role}', false)"), &[])
            .await
            .expect_err(role);
        assert_eq!(
            error.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{role}: {error}"
        );
    }
    let current: String = carol
        .query_one("select current_user::text", &[])
        .await
        .expect("current_user")
        .get(0);
    assert_eq!(current, "authenticated");
}

#[tokio::test(flavor = "multi_thread")]
async fn set_role_none_and_reset_role_have_nothing_to_escape_to() {
    let stack = Stack::start().await;
    let carol = login(&stack, "user_carol").await;
    for statement in ["set role none", "reset role", "set role authenticated"] {
        carol.batch_execute(statement).await.expect(statement);
        let row = carol
            .query_one("select current_user::text, session_user::text", &[])
            .await
            .expect("users");
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, String>(1)),
            ("authenticated".into(), "authenticated".into())
        );
        assert_eq!(
            user_id(&carol).await.as_deref(),
            Some("user_carol"),
            "{statement}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn set_session_authorization_is_refused() {
    let stack = Stack::start().await;
    let carol = login(&stack, "user_carol").await;
    for target in ["postgres", "anonymous"] {
        let error = carol
            .batch_execute(&format!("set session authorization {target}"))
            .await
            .expect_err(target);
        assert_eq!(
            error.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{target}: {error}"
        );
    }
    assert_eq!(user_id(&carol).await.as_deref(), Some("user_carol"));
}

#[tokio::test(flavor = "multi_thread")]
async fn login_roles_are_unprivileged_and_belong_to_no_role() {
    let stack = Stack::start().await;
    let admin = stack.cluster.admin(common::DATABASE).await.expect("admin");
    for role in ["authenticated", "anonymous"] {
        let row = admin
            .query_one(
                "select rolcanlogin, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication, \
                 (select count(*) from pg_auth_members m where m.member = r.oid) \
                 from pg_roles r where rolname = $1",
                &[&role],
            )
            .await
            .expect(role);
        let flags: Vec<bool> = (0..6).map(|i| row.get(i)).collect();
        assert_eq!(flags, [true, false, false, false, false, false], "{role}");
        assert_eq!(row.get::<_, i64>(6), 0, "{role} is a member of some role");
    }
}

// ---- replaying a captured claims + signature pair -------------------------

#[tokio::test(flavor = "multi_thread")]
async fn replay_on_another_backend() {
    let stack = Stack::start().await;
    let alice = login(&stack, ALICE).await;
    let (claims, signature) = capture(&alice).await;
    let bob = login(&stack, BOB).await;
    replay(&bob, &claims, &signature).await;
    assert_not_forged(&bob, BOB, "replay on another backend").await;
    assert_eq!(user_id(&bob).await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_on_the_same_backend_in_a_later_generation() {
    let stack = Stack::start().await;
    let alice = login(&stack, ALICE).await;
    let (claims, signature) = capture(&alice).await;
    // A new identity generation on this backend, as the proxy starts for
    // every session (and, with pooling, for every reuse of the backend).
    alice
        .batch_execute("select auth.begin_session()")
        .await
        .expect("begin_session");
    replay(&alice, &claims, &signature).await;
    assert_eq!(
        user_id(&alice).await,
        None,
        "an old generation's pair verified"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_after_the_token_expired() {
    let stack = Stack::start().await;
    let short = almost_expired(&stack, ALICE);
    let alice = stack.connect("authenticated", &short).await.expect("alice");
    let (claims, signature) = capture(&alice).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The expired token itself no longer logs in...
    let error = stack
        .connect("authenticated", &short)
        .await
        .expect_err("expired token");
    assert_eq!(error.code(), Some(&SqlState::INVALID_PASSWORD));
    // ...and its captured pair does not verify in anyone else's session.
    let carol = login(&stack, "user_carol").await;
    replay(&carol, &claims, &signature).await;
    assert_eq!(user_id(&carol).await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_after_reconnecting_as_anonymous() {
    let stack = Stack::start().await;
    let alice = login(&stack, ALICE).await;
    let (claims, signature) = capture(&alice).await;
    let anonymous = stack.connect("anonymous", "").await.expect("anonymous");
    assert_eq!(user_id(&anonymous).await, None);
    replay(&anonymous, &claims, &signature).await;
    assert_eq!(user_id(&anonymous).await, None, "anonymous became alice");
}

// ---- shadowing -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn shadow_objects_in_pg_temp_and_search_path_changes() {
    let stack = Stack::start().await;
    let carol = login(&stack, "user_carol").await;
    carol
        .batch_execute(
            "create temp table session_generations (pid int, login_role name, generation bigint);
             insert into pg_temp.session_generations values (pg_backend_pid(), 'authenticated', 1);
             create temp table claims_keys (ipad bytea, opad bytea);
             create function pg_temp.sha256(bytea) returns bytea language sql as $$ select $1 $$;
             create function pg_temp.current_setting(text, boolean) returns text language sql
                 as $$ select '{\"sub\":\"user_bob\"}' $$;
             create function pg_temp.pg_backend_pid() returns int language sql as $$ select 1 $$;
             create function pg_temp.decode(text, text) returns bytea language sql as $$ select ''::bytea $$;
             set search_path = pg_temp, public, auth;",
        )
        .await
        .expect("shadow objects");
    assert_not_forged(&carol, "user_carol", "pg_temp shadows").await;
    assert_eq!(user_id(&carol).await.as_deref(), Some("user_carol"));
    // Operators too, where the server lets a client create them.
    let operator = carol
        .batch_execute(
            "create function pg_temp.always(bytea, bytea) returns boolean language sql as $$ select true $$;
             create operator pg_temp.= (leftarg = bytea, rightarg = bytea, function = pg_temp.always);",
        )
        .await;
    if operator.is_ok() {
        carol
            .batch_execute(&format!(
                "set authgres.claims = {}",
                sql_literal(&forged_claims(BOB))
            ))
            .await
            .expect("set");
        assert_eq!(user_id(&carol).await, None, "a shadow = operator was used");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_functions_in_public_are_refused_or_ignored() {
    let stack = Stack::start().await;
    let carol = login(&stack, "user_carol").await;
    let created = carol
        .batch_execute(
            "create function public.current_setting(text, boolean) returns text language sql
                 as $$ select '{\"sub\":\"user_bob\"}' $$;
             set search_path = public, pg_catalog;",
        )
        .await;
    if let Err(error) = &created {
        assert_eq!(
            error.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{error}"
        );
    }
    assert_not_forged(&carol, "user_carol", "public shadow").await;
    // Nothing can be created in the auth schema.
    let error = carol
        .batch_execute("create function auth.user_id(int) returns text language sql as $$ select 'user_bob' $$")
        .await
        .expect_err("create in auth");
    assert_eq!(
        error.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{error}"
    );
}

// ---- reading or changing the key and the internal state ------------------

#[tokio::test(flavor = "multi_thread")]
async fn the_key_table_and_internal_state_are_out_of_reach() {
    let stack = Stack::start().await;
    let carol = login(&stack, "user_carol").await;
    for statement in [
        "select * from auth.claims_keys",
        "insert into auth.claims_keys (ipad, opad) values (decode(repeat('00', 64), 'hex'), decode(repeat('00', 64), 'hex'))",
        "delete from auth.claims_keys",
        "select nextval('auth.generation_seq')",
        "select setval('auth.generation_seq', 1)",
        "select currval('auth.generation_seq')",
        "select setval('auth.verified_seq', 1)",
        "select currval('auth.verified_seq')",
        // The portable path's internals (absent on the native path).
        "select auth.verify_session()",
        "select auth.claims_mark(1, '{}', '')",
        "select auth.generation_drawn()",
        // The native library's entry points, reached another way.
        "create function pg_temp.x() returns text language c as 'authgres', 'authgres_session'",
        "load 'authgres'",
        "alter function auth.session() owner to authenticated",
        "create or replace function auth.session() returns jsonb language sql as $$ select '{\"sub\":\"user_bob\"}'::jsonb $$",
        "drop function auth.session()",
    ] {
        let error = carol.batch_execute(statement).await.expect_err(statement);
        assert!(
            matches!(error.code(), Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE || *c == SqlState::UNDEFINED_FUNCTION),
            "{statement}: {error}"
        );
    }
    assert_eq!(user_id(&carol).await.as_deref(), Some("user_carol"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_never_shows_in_catalogs_settings_activity_statements_plans_or_errors() {
    let stack = Stack::start_with(common::Options {
        server_settings: &["shared_preload_libraries=pg_stat_statements"],
        ..Default::default()
    })
    .await;
    stack
        .cluster
        .admin(common::DATABASE)
        .await
        .expect("admin")
        .batch_execute("create extension pg_stat_statements")
        .await
        .expect("pg_stat_statements");
    // init-db closes pg_stat_statements to the login roles once it exists.
    stack.init_db(&[]);
    let key_hex = stack.secret("AUTHGRES_CLAIMS_KEY");
    let key = authgres_wire::ClaimsKey::from_hex(&key_hex).expect("key");
    let (ipad, opad) = key.pads();
    let secrets = [key_hex.clone(), hex(&ipad), hex(&opad)];
    let carol = login(&stack, "user_carol").await;
    let alice = login(&stack, ALICE).await;
    let mut seen = String::new();
    for query in [
        "select string_agg(coalesce(prosrc, ''), ' ') from pg_proc where pronamespace = 'auth'::regnamespace",
        "select string_agg(coalesce(array_to_string(proconfig, ','), ''), ' ') from pg_proc",
        "select string_agg(name || '=' || setting, ' ') from pg_settings",
        "select current_setting('authgres.claims') || current_setting('authgres.signature')",
        "select string_agg(obj_description(oid), ' ') from pg_class where relnamespace = 'auth'::regnamespace",
    ] {
        for row in carol.simple_query(query).await.expect(query) {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = row {
                seen.push_str(row.get(0).unwrap_or(""));
            }
        }
    }
    // Activity and statement statistics are closed to the login roles
    // altogether where init-db could close them (tests/hostile.rs); what
    // they refuse, nobody reads. Where it could not (no superuser), what
    // they show is searched for the key with the rest.
    for query in [
        "select string_agg(coalesce(query, ''), ' ') from pg_stat_activity",
        "select string_agg(query, ' ') from pg_stat_statements",
    ] {
        if stack.installer.managed() {
            for row in carol.simple_query(query).await.expect(query) {
                if let tokio_postgres::SimpleQueryMessage::Row(row) = row {
                    seen.push_str(row.get(0).unwrap_or(""));
                }
            }
            continue;
        }
        let error = carol.simple_query(query).await.expect_err(query);
        assert_eq!(
            error.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{query}: {error}"
        );
    }
    // The statements are there, for the operator.
    let admin = stack.cluster.admin(common::DATABASE).await.expect("admin");
    for row in admin
        .simple_query("select string_agg(query, ' ') from pg_stat_statements")
        .await
        .expect("operator reads pg_stat_statements")
    {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = row {
            seen.push_str(row.get(0).unwrap_or(""));
        }
    }
    for query in [
        "explain (verbose, costs off) select auth.user_id()",
        "show all",
    ] {
        for row in carol.simple_query(query).await.expect(query) {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = row {
                for i in 0..row.len() {
                    seen.push_str(row.get(i).unwrap_or(""));
                }
            }
        }
    }
    for bad in [
        "set authgres.signature = 'not hex'",
        "select auth.session('x')",
        "select * from auth.claims_keys",
    ] {
        if let Err(error) = carol.batch_execute(bad).await {
            seen.push_str(&error.to_string());
            if let Some(db) = error.as_db_error() {
                seen.push_str(db.detail().unwrap_or(""));
                seen.push_str(db.hint().unwrap_or(""));
            }
        }
    }
    assert!(
        seen.contains("set_config"),
        "pg_stat_statements shows the attach statement"
    );
    let (_, alice_signature) = capture(&alice).await;
    assert!(
        !seen.contains(&alice_signature),
        "another session's signature leaked"
    );
    for secret in &secrets {
        assert!(!seen.contains(secret.as_str()), "the claims key leaked");
    }
    assert!(
        !stack.log().contains(&key_hex),
        "the claims key is in the proxy log"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- claims with hostile content -------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn unusual_subjects_round_trip_exactly() {
    let stack = Stack::start().await;
    let long = format!("user_{}", "x".repeat(4000));
    let subjects = [
        "o'brien",
        "back\\slash\\\\",
        "quote\"d",
        "'; drop table todos; --",
        "$$ select 1 $$",
        "line\nbreak\ttab",
        "ünïcødé 日本語 😀",
        "\\u0041 is not A",
        "e'\\x41'",
        long.as_str(),
        "6f1c9a4e-1d2b-4c3a-9e8f-0a1b2c3d4e5f",
    ];
    for sub in subjects {
        let client = stack
            .connect("authenticated", &stack.issuer.token(sub))
            .await
            .unwrap_or_else(|e| panic!("{sub:?}: {e}"));
        assert_eq!(user_id(&client).await.as_deref(), Some(sub), "sub {sub:?}");
    }
    let client = stack
        .connect(
            "authenticated",
            &stack.issuer.token("6f1c9a4e-1d2b-4c3a-9e8f-0a1b2c3d4e5f"),
        )
        .await
        .expect("uuid sub");
    let uid: Option<String> = client
        .query_one("select auth.uid()::text", &[])
        .await
        .expect("uid")
        .get(0);
    assert_eq!(uid.as_deref(), Some("6f1c9a4e-1d2b-4c3a-9e8f-0a1b2c3d4e5f"));
    let client = login(&stack, "user_not_a_uuid").await;
    let uid: Option<String> = client
        .query_one("select auth.uid()::text", &[])
        .await
        .expect("uid")
        .get(0);
    assert_eq!(uid, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn overlong_claims_work_up_to_the_limit_and_are_refused_beyond() {
    let stack = Stack::start().await;
    let big = stack.issuer.mint(
        &TokenSpec::new("user_big").claim("org_memberships", json!(vec!["org_0123456789"; 1500])),
    );
    assert!(big.len() > 16 * 1024, "token of {} bytes", big.len());
    let client = stack
        .connect("authenticated", &big)
        .await
        .expect("a 30 KB token");
    assert_eq!(user_id(&client).await.as_deref(), Some("user_big"));
    let huge = stack
        .issuer
        .mint(&TokenSpec::new("user_huge").claim("padding", json!("p".repeat(70 * 1024))));
    let error = stack
        .connect("authenticated", &huge)
        .await
        .expect_err("over the limit");
    assert_eq!(error.code(), Some(&SqlState::PROTOCOL_VIOLATION), "{error}");
}

// ---- token lifetime --------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn by_default_a_session_outlives_its_token() {
    let stack = Stack::start().await;
    let short = almost_expired(&stack, ALICE);
    let alice = stack.connect("authenticated", &short).await.expect("alice");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let error = stack
        .connect("authenticated", &short)
        .await
        .expect_err("expired");
    assert_eq!(error.code(), Some(&SqlState::INVALID_PASSWORD), "{error}");
    assert_eq!(user_id(&alice).await.as_deref(), Some(ALICE));
}

#[tokio::test(flavor = "multi_thread")]
async fn enforced_expiry_ends_the_session_at_the_transaction_boundary() {
    let stack = Stack::start_with(common::Options {
        enforce_token_expiry: true,
        ..Default::default()
    })
    .await;
    let short = stack
        .issuer
        .mint(&TokenSpec::new(ALICE).ttl(Duration::from_secs(3)));
    let mut alice = stack.connect("authenticated", &short).await.expect("alice");
    let tx = alice.transaction().await.expect("begin");
    tx.batch_execute("insert into todos (task) values ('before expiry')")
        .await
        .expect("insert");
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Inside the transaction the session lives on, and may commit.
    tx.batch_execute("insert into todos (task) values ('after expiry, same transaction')")
        .await
        .expect("insert in the open transaction");
    let committed = tx.commit().await;
    // The commit's result arrives; then the session ends.
    committed.expect("commit");
    let error = alice
        .batch_execute("select 1")
        .await
        .expect_err("session ended");
    assert!(
        alice.is_closed() || error.is_closed() || error.code() == Some(&SqlState::INVALID_PASSWORD),
        "{error}"
    );
    assert_eq!(
        common::todos_of(&stack, ALICE).await,
        2,
        "the transaction committed whole"
    );
}

// ---- claims key rotation and schema upgrades --------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn the_claims_key_rotates_without_downtime() {
    let stack = Stack::start().await;
    let alice = login(&stack, ALICE).await;
    let old_key = stack.secret("AUTHGRES_CLAIMS_KEY");
    let out = stack.init_db(&["--rotate-claims-key"]);
    assert!(out.contains("older claims key(s) still accepted"), "{out}");
    let new_key = stack.secret("AUTHGRES_CLAIMS_KEY");
    assert_ne!(old_key, new_key);

    // The running proxy still signs with the old key: still accepted.
    let bob_old = login(&stack, BOB).await;
    assert_eq!(user_id(&bob_old).await.as_deref(), Some(BOB));
    assert_eq!(user_id(&alice).await.as_deref(), Some(ALICE));
    // A proxy started now signs with the new key: accepted too.
    let second = stack.second_proxy();
    let carol = stack
        .connect_port(
            second.port,
            "authenticated",
            &stack.issuer.token("user_carol"),
        )
        .await
        .expect("carol via the new proxy");
    assert_eq!(user_id(&carol).await.as_deref(), Some("user_carol"));

    // Retiring the old key: sessions signed with it fail closed, new ones work.
    stack.init_db(&["--retire-old-keys"]);
    assert_eq!(user_id(&alice).await, None);
    assert_eq!(user_id(&bob_old).await, None);
    assert_eq!(user_id(&carol).await.as_deref(), Some("user_carol"));
}

#[tokio::test(flavor = "multi_thread")]
async fn init_db_upgrades_an_older_weaker_schema_in_place() {
    let stack = Stack::start().await;
    let admin = stack.cluster.admin(common::DATABASE).await.expect("admin");
    // An older install: user_id() trusts a plain setting, no version table.
    admin
        .batch_execute(
            "drop table auth.schema_version;
             create or replace function auth.user_id() returns text language sql stable
                 as $$ select nullif(current_setting('authgres.claims', true), '')::jsonb ->> 'sub' $$;",
        )
        .await
        .expect("downgrade");
    let carol = login(&stack, "user_carol").await;
    carol
        .batch_execute(&format!(
            "set authgres.claims = {}",
            sql_literal(&forged_claims(BOB))
        ))
        .await
        .expect("set");
    assert_eq!(
        user_id(&carol).await.as_deref(),
        Some(BOB),
        "the old schema was weak"
    );

    let out = stack.init_db(&[]);
    assert!(out.contains("upgraded from v0 to v4"), "{out}");
    let carol = login(&stack, "user_carol").await;
    carol
        .batch_execute(&format!(
            "set authgres.claims = {}",
            sql_literal(&forged_claims(BOB))
        ))
        .await
        .expect("set");
    assert_eq!(user_id(&carol).await, None);
    let out = stack.init_db(&[]);
    assert!(out.contains("re-applied"), "{out}");
}

// ---- transaction pooling: connections change hands between transactions --

/// Transaction pooling with one connection: every transaction of one
/// client runs on the backend the other client's last one used.
async fn one_shared_connection(enforce_token_expiry: bool) -> Stack {
    Stack::start_with(common::Options {
        upstream_extra: "pool_mode = \"transaction\"\npool_size = 1",
        enforce_token_expiry,
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn transaction_pooling_never_hands_an_identity_to_the_next_client() {
    let stack = one_shared_connection(false).await;
    let alice = login(&stack, ALICE).await;
    let bob = login(&stack, BOB).await;
    let (claims, signature) = capture(&alice).await;
    let attacks: &[(&str, &str)] = &[
        (
            "forged claims",
            "set authgres.claims = '{\"sub\":\"user_bob\"}'",
        ),
        (
            "claims set with set_config",
            "select set_config('authgres.claims', '{\"sub\":\"user_bob\"}', false)",
        ),
        ("DISCARD ALL", "discard all"),
        ("RESET ALL", "reset all"),
        (
            "a new generation drawn by hand",
            "select auth.begin_session()",
        ),
        ("an open transaction left behind", "begin; select 1"),
    ];
    for (attack, sql) in attacks {
        alice.batch_execute(sql).await.expect(attack);
        assert_not_forged(&alice, ALICE, attack).await;
        alice.batch_execute("rollback").await.expect("rollback");
        // Bob's transactions take the only connection from Alice.
        assert_eq!(user_id(&bob).await.as_deref(), Some(BOB), "after {attack}");
        assert_not_forged(&bob, BOB, attack).await;
        // Alice's captured pair, replayed on the connection Bob just used.
        replay(&alice, &claims, &signature).await;
        assert_not_forged(&alice, ALICE, attack).await;
        assert_eq!(
            user_id(&bob).await.as_deref(),
            Some(BOB),
            "after Alice's replay following {attack}"
        );
    }
    // Whatever Alice did, each of her transactions on a connection she
    // gets back from Bob carries her own identity again.
    assert_eq!(user_id(&alice).await.as_deref(), Some(ALICE));
}

#[tokio::test(flavor = "multi_thread")]
async fn transaction_pooling_refuses_the_first_transaction_after_an_enforced_expiry() {
    let stack = one_shared_connection(true).await;
    let short = stack
        .issuer
        .mint(&TokenSpec::new(ALICE).ttl(Duration::from_secs(3)));
    let alice = stack.connect("authenticated", &short).await.expect("alice");
    assert_eq!(user_id(&alice).await.as_deref(), Some(ALICE));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let error = alice
        .batch_execute("insert into todos (task) values ('after expiry')")
        .await
        .expect_err("the token expired");
    assert!(
        alice.is_closed() || error.code() == Some(&SqlState::INVALID_PASSWORD),
        "{error}"
    );
    assert_eq!(
        common::todos_of(&stack, ALICE).await,
        0,
        "a transaction ran after the token expired"
    );
}

// ---- what the identity paths remember ------------------------------------
//
// The native path keeps the last verified pair in backend memory, the
// portable path a mark of it in a sequence: neither may answer for a
// replayed, altered or re-keyed pair.

#[tokio::test(flavor = "multi_thread")]
async fn a_verified_pair_does_not_survive_a_reset_of_its_backend() {
    let stack = Stack::start_with(common::Options {
        upstream_extra: "pool_size = 1",
        ..Default::default()
    })
    .await;
    let alice = login(&stack, ALICE).await;
    let pid = backend_pid(&alice).await;
    // Verified and remembered in this backend.
    assert_eq!(user_id(&alice).await.as_deref(), Some(ALICE));
    let (claims, signature) = capture(&alice).await;
    drop(alice);
    let bob = login(&stack, BOB).await;
    assert_eq!(backend_pid(&bob).await, pid, "one pooled backend");
    replay(&bob, &claims, &signature).await;
    assert_eq!(user_id(&bob).await, None, "alice's pair after the reset");
    let jwt: Option<String> = bob
        .query_one("select auth.session()::text", &[])
        .await
        .expect("session")
        .get(0);
    assert_eq!(jwt, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_verified_pair_answers_only_for_itself() {
    let stack = Stack::start().await;
    let carol = login(&stack, "user_carol").await;
    assert_eq!(user_id(&carol).await.as_deref(), Some("user_carol"));
    let (claims, signature) = capture(&carol).await;
    let forged = claims.replace("user_carol", BOB);
    let mut other = signature.clone().into_bytes();
    other[0] = if other[0] == b'0' { b'1' } else { b'0' };
    let other = String::from_utf8(other).expect("hex");
    for (label, c, s) in [
        (
            "forged claims, remembered signature",
            forged.as_str(),
            signature.as_str(),
        ),
        (
            "remembered claims, another signature",
            claims.as_str(),
            other.as_str(),
        ),
        (
            "remembered claims, upper-case signature",
            claims.as_str(),
            &signature.to_uppercase(),
        ),
        ("remembered claims, no signature", claims.as_str(), ""),
        (
            "remembered claims plus a space",
            &format!("{claims} "),
            signature.as_str(),
        ),
    ] {
        replay(&carol, c, s).await;
        for call in [
            "auth.user_id()",
            "auth.session() ->> 'sub'",
            "auth.jwt() ->> 'sub'",
        ] {
            let seen: Option<String> = carol
                .query_one(&format!("select {call}"), &[])
                .await
                .expect(call)
                .get(0);
            assert_eq!(seen, None, "{label}: {call}");
        }
        // Restoring the verified pair restores the identity.
        replay(&carol, &claims, &signature).await;
        assert_eq!(
            user_id(&carol).await.as_deref(),
            Some("user_carol"),
            "{label}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn begin_session_by_the_client_ends_only_its_own_identity() {
    let stack = Stack::start().await;
    let alice = login(&stack, ALICE).await;
    let bob = login(&stack, BOB).await;
    assert_eq!(user_id(&alice).await.as_deref(), Some(ALICE));
    let (claims, signature) = capture(&alice).await;
    let binding: String = alice
        .query_one("select auth.begin_session()", &[])
        .await
        .expect("begin_session")
        .get(0);
    assert!(binding.starts_with("authgres-v1:"), "{binding}");
    assert_eq!(user_id(&alice).await, None, "the old generation's pair");
    replay(&alice, &claims, &signature).await;
    assert_eq!(user_id(&alice).await, None, "the old pair, set again");
    assert_eq!(user_id(&bob).await.as_deref(), Some(BOB), "bob keeps his");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_client_callable_function_takes_an_argument() {
    let stack = Stack::start().await;
    let carol = login(&stack, "user_carol").await;
    // Every auth function a login role may execute takes no argument.
    let callable: Vec<String> = carol
        .query(
            "select p.oid::regprocedure::text from pg_proc p \
               join pg_namespace n on n.oid = p.pronamespace \
              where n.nspname = 'auth' and has_function_privilege(p.oid, 'execute') \
                and p.pronargs > 0",
            &[],
        )
        .await
        .expect("callable functions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(callable.is_empty(), "callable with arguments: {callable:?}");
    // The library's entry points: see the_key_table_and_internal_state_are_out_of_reach.
    assert_eq!(user_id(&carol).await.as_deref(), Some("user_carol"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_deleted_by_hand_ends_the_identities_it_verified() {
    let stack = Stack::start().await;
    let alice = login(&stack, ALICE).await;
    assert_eq!(user_id(&alice).await.as_deref(), Some(ALICE));
    // Not through init-db: the trigger on the key table must tell both
    // paths' memories.
    stack
        .installer()
        .await
        .batch_execute("delete from auth.claims_keys")
        .await
        .expect("delete keys");
    assert_eq!(user_id(&alice).await, None, "remembered after its key went");
    stack.init_db(&[]);
    let bob = login(&stack, BOB).await;
    assert_eq!(user_id(&bob).await.as_deref(), Some(BOB));
}

// ---- /sql: a token's requests share a session, nobody else's do --------

/// `/sql` with one pooled connection: every request runs on the backend
/// the request before it used.
async fn one_sql_connection() -> Stack {
    Stack::start_with(common::Options {
        http_extra: "pool_size = 1",
        ..Default::default()
    })
    .await
}

/// A `/sql` request as `role` (rows as arrays of text): status and body.
async fn sql(
    stack: &Stack,
    token: Option<&str>,
    role: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new()
        .post(stack.http_url())
        .header(
            "Neon-Connection-String",
            format!(
                "postgresql://{role}@127.0.0.1:{}/{}",
                stack.port,
                common::DATABASE
            ),
        )
        .header("Neon-Array-Mode", "true")
        .header("Neon-Raw-Text-Output", "true")
        .json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("/sql request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// What a request sees of its session: who it is, whose rows RLS shows
/// it, what earlier requests may have planted, and its backend.
const WHO_AND_WHAT: &str = "select auth.user_id(), \
     (select coalesce(string_agg(distinct user_id, ','), '') from todos), \
     current_setting('application_name'), \
     coalesce(current_setting('app.planted', true), ''), \
     current_setting('statement_timeout'), \
     coalesce(current_setting('authgres.claims', true), ''), \
     pg_backend_pid()";

/// The row [`WHO_AND_WHAT`] gives `token`'s request, checked to be its
/// own (`me`) and free of anything planted; returns the backend's pid.
async fn sees_only_itself(stack: &Stack, token: &str, me: &str, after: &str) -> String {
    let (status, body) = sql(
        stack,
        Some(token),
        "authenticated",
        json!({ "query": WHO_AND_WHAT }),
    )
    .await;
    assert_eq!(status, 200, "{me} after {after}: {body}");
    let row = &body["rows"][0];
    assert_eq!(row[0], me, "{me}'s identity after {after}: {body}");
    assert_eq!(row[1], me, "{me}'s rows after {after}: {body}");
    assert_ne!(row[2], "planted", "{me}: application_name after {after}");
    assert_eq!(row[3], "", "{me}: a custom setting after {after}");
    assert_ne!(row[4], "4242s", "{me}: statement_timeout after {after}");
    let claims = row[5].as_str().unwrap_or_default();
    assert!(
        claims.contains(&format!("\"sub\":\"{me}\"")),
        "{me}: the claims in the session after {after}: {claims}"
    );
    row[6].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_requests_alternating_between_users_never_share_a_session() {
    let stack = one_sql_connection().await;
    let alice = stack.issuer.token(ALICE);
    let bob = stack.issuer.token(BOB);
    for (token, task) in [(&alice, "alice's"), (&bob, "bob's")] {
        let insert = json!({"query": "insert into todos (task) values ($1)", "params": [task]});
        let (status, body) = sql(&stack, Some(token), "authenticated", insert).await;
        assert_eq!(status, 200, "{body}");
    }
    // What one request may leave in its session, each as a request of
    // its own (or a batch); the last ones forge or drop the identity.
    let plants = [
        json!({"query": "set application_name = 'planted'"}),
        json!({"query": "select set_config('application_name', 'planted', false)"}),
        json!({"query": "select pg_catalog.set_config('app.planted', 'yes', false)"}),
        json!({"queries": [
            {"query": "set statement_timeout = '4242s'"},
            {"query": "select 1"},
        ]}),
        json!({"queries": [
            {"query": "select set_config('app.planted', 'yes', false)"},
            {"query": "select 1/0"},
        ]}),
        json!({"query": "set authgres.claims = '{\"sub\":\"user_mallory\"}'"}),
        json!({"query": "select set_config('authgres.claims', '{\"sub\":\"user_mallory\"}', false)"}),
        json!({"query": "reset all"}),
        json!({"query": "discard all"}),
        json!({"query": "select auth.begin_session()"}),
        json!({"query": "rollback"}),
        json!({"query": "begin"}),
    ];
    let mut pids = std::collections::BTreeSet::new();
    for plant in &plants {
        for (me, token, other, other_token) in
            [(ALICE, &alice, BOB, &bob), (BOB, &bob, ALICE, &alice)]
        {
            let after = format!("{me}'s {plant}");
            sql(&stack, Some(token), "authenticated", plant.clone()).await;
            // The other user first, then the planter itself: each starts
            // clean of what the request before it set.
            pids.insert(sees_only_itself(&stack, other_token, other, &after).await);
            sql(&stack, Some(token), "authenticated", plant.clone()).await;
            pids.insert(sees_only_itself(&stack, token, me, &after).await);
            pids.insert(sees_only_itself(&stack, token, me, &after).await);
            pids.insert(sees_only_itself(&stack, other_token, other, &after).await);
        }
    }
    assert_eq!(pids.len(), 1, "one pooled connection served every request");
    // An anonymous request, with a token or without, has no identity.
    for token in [None, Some(alice.as_str())] {
        let who = json!({"query": "select auth.user_id() is null, (select count(*) from todos)"});
        let (status, body) = sql(&stack, token, "anonymous", who).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["rows"][0][0], "t", "{body}");
        assert_eq!(body["rows"][0][1], "0", "{body}");
    }
}
