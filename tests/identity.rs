//! The two identity paths (issue 23): which one init-db installs and says,
//! switching in place, the per-row footgun it points out, and the attacks
//! that aim at what the paths remember between calls (the native path's
//! backend memory, the portable path's verified mark): a remembered pair
//! must never answer for a replayed, altered or re-keyed one.
//!
//! The attacks run on whichever path this run installs
//! (`AUTHGRES_TEST_IDENTITY`, see tests/common/installer.rs); CI runs this
//! file on both.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

mod common;

use common::{IdentityRequest, Options, Stack, backend_pid, identity_path, user_id};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

const ALICE: &str = "user_alice";
const BOB: &str = "user_bob";

/// One pooled backend: every client lands on the same one, after a reset.
fn one_backend() -> Options {
    Options {
        upstream_extra: "pool_size = 1",
        ..Default::default()
    }
}

/// The claims and signature this session holds.
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

async fn set_pair(client: &Client, claims: &str, signature: &str) {
    client
        .query(
            "select set_config('authgres.claims', $1, false), set_config('authgres.signature', $2, false)",
            &[&claims, &signature],
        )
        .await
        .expect("settings are writable; they just must not verify");
}

/// The language of `auth.session()`: which path the catalog has.
async fn catalog_path(stack: &Stack) -> String {
    stack
        .installer()
        .await
        .query_one(
            "select l.lanname::text from pg_proc p join pg_language l on l.oid = p.prolang \
              where p.oid = 'auth.session()'::regprocedure",
            &[],
        )
        .await
        .expect("language of auth.session()")
        .get(0)
}

/// The OIDs of the identity functions, which policies refer to.
async fn function_oids(stack: &Stack) -> Vec<u32> {
    stack
        .installer()
        .await
        .query(
            "select p.oid from pg_proc p join pg_namespace n on n.oid = p.pronamespace \
              where n.nspname = 'auth' and p.proname in \
                    ('begin_session', 'session', 'jwt', 'user_id', 'uid', 'issuer', 'session_claims') \
              order by p.proname",
            &[],
        )
        .await
        .expect("oids")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

// ---- which path, and saying so ----------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn init_db_installs_native_where_it_can_and_says_which() {
    let stack = Stack::start().await;
    let said = identity_path(&stack.init_db_output);
    let expected = if stack.installer.managed() {
        assert!(
            stack.init_db_output.contains("not a superuser"),
            "{}",
            stack.init_db_output
        );
        "portable"
    } else if IdentityRequest::from_env() == IdentityRequest::Portable {
        "portable"
    } else if stack.cluster.native_library_dir().is_some() {
        "native"
    } else {
        assert!(
            stack
                .init_db_output
                .contains("cannot load the authgres library"),
            "{}",
            stack.init_db_output
        );
        "portable"
    };
    eprintln!("this run's identity path: {said}");
    assert_eq!(said, expected, "{}", stack.init_db_output);
    let language = catalog_path(&stack).await;
    assert_eq!(
        language == "c",
        said == "native",
        "auth.session() is {language}"
    );
    let alice = stack.login(ALICE).await;
    assert_eq!(user_id(&alice).await.as_deref(), Some(ALICE));
}

#[tokio::test(flavor = "multi_thread")]
async fn switching_paths_in_place_keeps_policies_and_identities() {
    let stack = Stack::start().await;
    if stack.installer.managed()
        || stack.cluster.native_library_dir().is_none()
        || IdentityRequest::from_env() == IdentityRequest::Portable
    {
        eprintln!("no native path in this run: nothing to switch");
        return;
    }
    // Start native whatever AUTHGRES_TEST_IDENTITY says (no --portable).
    let native_first = stack.init_db(&[]);
    let oids = function_oids(&stack).await;
    let survivor = stack.login(ALICE).await;
    for (args, path) in [
        (&["--portable"][..], "portable"),
        (&[][..], "native"),
        (&["--portable"][..], "portable"),
    ] {
        let out = stack.init_db(args);
        assert_eq!(identity_path(&out), path, "{native_first}\n{out}");
        assert!(out.contains("switched from"), "{out}");
        assert_eq!(
            function_oids(&stack).await,
            oids,
            "CREATE OR REPLACE keeps OIDs"
        );
        // A new session gets its identity, and the policies still apply.
        let bob = stack.login(BOB).await;
        assert_eq!(user_id(&bob).await.as_deref(), Some(BOB), "{path}");
        bob.batch_execute("insert into todos (task) values ('after the switch')")
            .await
            .expect("insert through the policies");
        let theirs: i64 = bob
            .query_one(
                "select count(*) from todos where user_id <> auth.user_id()",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(theirs, 0, "{path}: bob sees someone else's rows");
    }
    // Both paths draw the generation alike: a session attached before
    // the switches keeps its identity.
    assert_eq!(user_id(&survivor).await.as_deref(), Some(ALICE));
}

#[tokio::test(flavor = "multi_thread")]
async fn portable_init_db_lists_policies_that_call_auth_per_row() {
    let stack = Stack::start().await;
    stack
        .installer()
        .await
        .batch_execute(
            "create policy \"per row\" on todos for select to authenticated
                 using (user_id = auth.user_id());
             create policy \"per row check\" on todos for insert to authenticated
                 with check (user_id = (select auth.user_id()) and auth.jwt() ->> 'org' is null);",
        )
        .await
        .expect("policies");
    let out = stack.init_db(&["--portable"]);
    assert!(
        out.contains(
            "ALTER POLICY \"per row\" ON \"public\".\"todos\" USING ((user_id = (select auth.user_id())));"
        ),
        "{out}"
    );
    assert!(
        out.contains("WITH CHECK (((user_id = ( SELECT auth.user_id() AS user_id)) AND (((select auth.jwt()) ->> 'org'::text) IS NULL)))"),
        "{out}"
    );
    // The demo's own policies are wrapped already: not listed.
    assert!(!out.contains("Individuals can"), "{out}");
    if !stack.installer.managed()
        && stack.cluster.native_library_dir().is_some()
        && IdentityRequest::from_env() != IdentityRequest::Portable
    {
        let out = stack.init_db(&[]);
        assert!(
            !out.contains("ALTER POLICY"),
            "native needs no rewrite: {out}"
        );
    }
}

// ---- what the paths remember must not answer for anything else -----------

#[tokio::test(flavor = "multi_thread")]
async fn a_verified_pair_does_not_survive_a_reset_of_its_backend() {
    let stack = Stack::start_with(one_backend()).await;
    let alice = stack.login(ALICE).await;
    let pid = backend_pid(&alice).await;
    // Verified and remembered in this backend.
    assert_eq!(user_id(&alice).await.as_deref(), Some(ALICE));
    let (claims, signature) = capture(&alice).await;
    drop(alice);
    let bob = stack.login(BOB).await;
    assert_eq!(backend_pid(&bob).await, pid, "one pooled backend");
    set_pair(&bob, &claims, &signature).await;
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
    let carol = stack.login("user_carol").await;
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
        set_pair(&carol, c, s).await;
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
        set_pair(&carol, &claims, &signature).await;
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
    let alice = stack.login(ALICE).await;
    let bob = stack.login(BOB).await;
    assert_eq!(user_id(&alice).await.as_deref(), Some(ALICE));
    let (claims, signature) = capture(&alice).await;
    let binding: String = alice
        .query_one("select auth.begin_session()", &[])
        .await
        .expect("begin_session")
        .get(0);
    assert!(binding.starts_with("authgres-v1:"), "{binding}");
    assert_eq!(user_id(&alice).await, None, "the old generation's pair");
    set_pair(&alice, &claims, &signature).await;
    assert_eq!(user_id(&alice).await, None, "the old pair, set again");
    assert_eq!(user_id(&bob).await.as_deref(), Some(BOB), "bob keeps his");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_client_callable_function_takes_a_generation_or_a_key() {
    let stack = Stack::start().await;
    let carol = stack.login("user_carol").await;
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
    // Nor can a client reach the library's entry points itself.
    for statement in [
        "create function pg_temp.x() returns text language c as 'authgres', 'authgres_session'",
        "load 'authgres'",
        "select auth.verify_session()",
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
async fn a_key_deleted_by_hand_ends_the_identities_it_verified() {
    let stack = Stack::start().await;
    let alice = stack.login(ALICE).await;
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
    let bob = stack.login(BOB).await;
    assert_eq!(user_id(&bob).await.as_deref(), Some(BOB));
}
