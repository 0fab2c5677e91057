//! The two identity paths (issue 23): which one init-db installs and says,
//! switching in place, and the per-row footgun it points out on the
//! portable path. The attacks on what the paths remember are in
//! tests/attacks.rs; CI runs both files on both paths
//! (`AUTHGRES_TEST_IDENTITY`, see tests/common/installer.rs).

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

mod common;

use common::{IdentityRequest, Stack, identity_path, user_id};

const ALICE: &str = "user_alice";
const BOB: &str = "user_bob";

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
