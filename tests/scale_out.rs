//! Several instances behind a load balancer, on loopback: three
//! `authgres serve` behind Debian's HAProxy in TCP mode, one sandbox
//! Postgres. Cancels from anywhere, rolling restarts and a killed instance
//! without a failed transaction, a restart on one port by socket
//! hand-over, and identities that never cross instances.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a panic is a failing test"
)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{DATABASE, Haproxy, Instance, Options, Stack, free_port, psql_path};
use nix::sys::signal::Signal;

/// Three instances that know each other, each with `extra` config.
fn fleet(stack: &Stack, extra: &str) -> Vec<Instance> {
    let ports = [free_port(), free_port(), free_port()];
    let peers: String = ports
        .iter()
        .enumerate()
        .map(|(i, port)| format!("{} = \"127.0.0.1:{port}\"\n", i + 1))
        .collect();
    ports
        .iter()
        .enumerate()
        .map(|(i, &port)| {
            let cluster = format!(
                "\n[cluster]\ninstance_id = {}\n[cluster.peers]\n{peers}",
                i + 1
            );
            stack.instance(port, &format!("{extra}{cluster}"))
        })
        .collect()
}

/// Waits until a `pg_sleep(30)` runs on the server, so a cancel has
/// something to cancel.
async fn wait_sleeping(stack: &Stack) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running = common::active_statements(stack, "select pg_sleep(30)").await;
        if running > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the query never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stack whose instances trust HAProxy's PROXY headers: HAProxy connects
/// from `common::HAPROXY_SOURCE`, and only that address is trusted.
async fn stack_behind_haproxy() -> Stack {
    Stack::start_with(Options {
        listen_extra: "proxy_protocol_from = [\"127.0.0.2\"]\n",
        ..Default::default()
    })
    .await
}

fn backends(instances: &[Instance]) -> Vec<(u16, u16)> {
    instances.iter().map(|i| (i.port, i.admin_port)).collect()
}

async fn connect(
    stack: &Stack,
    port: u16,
    sub: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    stack
        .connect_port(port, "authenticated", &stack.issuer.token(sub))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn cancels_through_the_load_balancer_reach_whichever_instance_holds_the_session() {
    let stack = stack_behind_haproxy().await;
    let instances = fleet(&stack, "");
    for instance in &instances {
        instance.wait_ready().await;
    }
    let haproxy = Haproxy::start(stack.dir.path(), &backends(&instances), true);

    // A driver: tokio-postgres's cancel token, sent through HAProxy.
    for i in 0..10 {
        let client = connect(&stack, haproxy.port, &format!("user_{i}"))
            .await
            .expect("login through haproxy");
        let token = client.cancel_token();
        let sleeping =
            tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = Instant::now();
        token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("cancel sent");
        let error = tokio::time::timeout(Duration::from_secs(1), sleeping)
            .await
            .unwrap_or_else(|_| panic!("query {i} not cancelled within 1s"))
            .expect("join")
            .expect_err("cancelled");
        assert_eq!(
            error.as_db_error().map(|e| e.code().code()),
            Some("57014"),
            "{error}"
        );
        assert!(sent.elapsed() < Duration::from_secs(1));
    }

    // psql: Ctrl-C is SIGINT, and psql sends the CancelRequest itself.
    for i in 0..10 {
        let mut psql = Command::new(psql_path())
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-c", "select pg_sleep(30)"])
            .arg(format!(
                "host=127.0.0.1 port={} dbname={DATABASE} user=authenticated",
                haproxy.port
            ))
            .env("PGPASSWORD", stack.issuer.token(&format!("psql_{i}")))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("psql");
        wait_sleeping(&stack).await;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(psql.id()).expect("pid"));
        let sent = Instant::now();
        nix::sys::signal::kill(pid, Signal::SIGINT).expect("Ctrl-C");
        let deadline = Instant::now() + Duration::from_secs(1);
        while psql.try_wait().expect("wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "psql {i} was not cancelled within 1s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let output = psql.wait_with_output().expect("output");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("canceling statement due to user request"),
            "psql {i} after {:?}: {stderr}",
            sent.elapsed()
        );
    }
    // Round robin sent some cancels to an instance that did not hold the
    // session: they were forwarded to the one that did.
    let forwarded: usize = instances
        .iter()
        .map(|i| i.log().matches("cancel request sent to the peer").count())
        .sum();
    assert!(
        forwarded >= 5,
        "only {forwarded} of 20 cancels needed a peer"
    );
    // HAProxy's PROXY headers named the client; peers forwarding cancels
    // from 127.0.0.1 needed none.
    for instance in &instances {
        let log = instance.log();
        assert!(log.contains("peer=127.0.0.1:"), "{log}");
        assert!(log.contains("via=127.0.0.2"), "{log}");
    }
}

/// pgbench with a connection per transaction through `port`, for
/// `seconds`; returns its report after checking nothing failed.
fn pgbench_connect_per_transaction(stack: &Stack, port: u16, seconds: u32) -> std::process::Child {
    let script = stack.dir.path().join(format!("connect-{port}.sql"));
    std::fs::write(&script, "select auth.user_id();\n").expect("script");
    Command::new(psql_path().with_file_name("pgbench"))
        .args(["-n", "-C", "-c", "4", "-j", "2", "-M", "simple", "-T"])
        .arg(seconds.to_string())
        .arg("-f")
        .arg(&script)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "authenticated", DATABASE])
        .env("PGPASSWORD", stack.issuer.token("user_bench"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench")
}

fn assert_nothing_failed(pgbench: std::process::Child) -> String {
    let output = pgbench.wait_with_output().expect("pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && !stderr.contains("error"),
        "pgbench saw failures:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "{stdout}"
    );
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_behind_haproxy_fails_no_transaction() {
    let stack = stack_behind_haproxy().await;
    // Readiness turns false half a second before each drain: HAProxy checks
    // every 100 ms.
    let mut instances = fleet(&stack, "");
    for instance in &mut instances {
        instance.wait_ready().await;
        let config = instance.dir.join("proxy.toml");
        let text = std::fs::read_to_string(&config).expect("config");
        std::fs::write(
            &config,
            text.replacen("[listen]\n", "[listen]\ndrain_delay = \"500ms\"\n", 1),
        )
        .expect("config");
    }
    for instance in &mut instances {
        instance.signal(Signal::SIGHUP);
    }
    let haproxy = Haproxy::start(stack.dir.path(), &backends(&instances), true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pgbench = pgbench_connect_per_transaction(&stack, haproxy.port, 12);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for instance in &mut instances {
        instance.signal(Signal::SIGTERM);
        let status = instance
            .wait_exit(Duration::from_secs(10))
            .expect("drained and exited");
        assert!(status.success());
        instance.start();
        instance.wait_ready().await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let report = assert_nothing_failed(pgbench);
    assert!(
        report.contains("number of transactions actually processed"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_one_instance_leaves_the_others_and_new_connections_alone() {
    let stack = stack_behind_haproxy().await;
    let mut instances = fleet(&stack, "");
    for instance in &instances {
        instance.wait_ready().await;
    }
    let haproxy = Haproxy::start(stack.dir.path(), &backends(&instances), true);
    let first = connect(&stack, instances[0].port, "user_first")
        .await
        .expect("first");
    let third = connect(&stack, instances[2].port, "user_third")
        .await
        .expect("third");
    first.batch_execute("begin").await.expect("begin");
    instances[1].kill();
    // New connections through HAProxy: a refused connect is retried on
    // another instance, and the health check takes the dead one out.
    let started = Instant::now();
    for i in 0..12 {
        let client = connect(&stack, haproxy.port, &format!("new_{i}"))
            .await
            .unwrap_or_else(|e| panic!("connection {i} through haproxy: {e}"));
        assert_eq!(common::user_id(&client).await, Some(format!("new_{i}")));
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // The sessions on the others never noticed.
    first
        .batch_execute("commit")
        .await
        .expect("commit on the first");
    assert_eq!(common::user_id(&first).await.as_deref(), Some("user_first"));
    assert_eq!(common::user_id(&third).await.as_deref(), Some("user_third"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_process_takes_over_the_port_without_a_refused_connection() {
    let stack = Stack::start().await;
    let port = free_port();
    // The handover socket goes in [listen]; restart with it.
    let mut instance = instance_with_handover(&stack, port, "handover.sock");
    instance.start();
    instance.wait_ready().await;
    let pgbench = pgbench_connect_per_transaction(&stack, port, 8);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut retired = Vec::new();
    for _ in 0..2 {
        // The successor takes the listening sockets over; the old process
        // drains and exits.
        let successor = instance.spawn_successor();
        let log_before = instance.log().matches("took over the listeners").count();
        let deadline = Instant::now() + Duration::from_secs(10);
        while instance.log().matches("took over the listeners").count() == log_before {
            assert!(Instant::now() < deadline, "no takeover: {}", instance.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = instance
            .wait_exit(Duration::from_secs(10))
            .expect("the old process exits");
        assert!(status.success());
        retired.push(status);
        instance.adopt(successor);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert_nothing_failed(pgbench);
    assert_eq!(retired.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_sharing_users_never_see_each_others_identities() {
    for mode in ["session", "transaction"] {
        let stack = Stack::start_with(Options {
            upstream_extra: if mode == "session" {
                "pool_mode = \"session\"\n"
            } else {
                "pool_mode = \"transaction\"\n"
            },
            ..Options::default()
        })
        .await;
        let instances = fleet(&stack, "");
        let mut tasks = Vec::new();
        for round in 0..8 {
            for (n, instance) in instances.iter().enumerate() {
                let sub = format!("user_{n}_{round}");
                let client = connect(&stack, instance.port, &sub).await.expect("login");
                tasks.push(tokio::spawn(async move {
                    for _ in 0..20 {
                        let seen = common::user_id(&client).await;
                        assert_eq!(seen.as_deref(), Some(sub.as_str()), "{mode}");
                        client
                            .batch_execute("begin; select 1; commit")
                            .await
                            .expect("tx");
                    }
                }));
            }
        }
        for task in tasks {
            task.await.expect("no identity crossed instances");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_instance_fetches_each_jwks_once_not_once_per_connection() {
    let stack = Stack::start().await;
    stack.wait_ready().await;
    let before = stack.issuer.jwks_fetches();
    let instances = fleet(&stack, "");
    for instance in &instances {
        instance.wait_ready().await;
    }
    for round in 0..10 {
        for instance in &instances {
            let client = connect(&stack, instance.port, &format!("user_{round}"))
                .await
                .expect("login");
            drop(client);
        }
    }
    assert_eq!(
        stack.issuer.jwks_fetches() - before,
        3,
        "one fetch per instance"
    );
}

/// Runs `authgres serve` on `dir`'s config under `umask`, logging to its
/// `authgres.log` as the stack's processes do.
fn spawn_with_umask(dir: &std::path::Path, umask: &str) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("authgres.log"))
        .expect("log file");
    Command::new("sh")
        .args([
            "-c",
            &format!("umask {umask} && exec \"$0\" serve --config \"$1\""),
        ])
        .arg(common::BIN)
        .arg(dir.join("proxy.toml"))
        .env("AUTHGRES_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn authgres serve")
}

/// An instance of the stack on `port`, stopped, whose config has
/// `handover_socket` set to `path`.
fn instance_with_handover(stack: &Stack, port: u16, path: &str) -> Instance {
    let mut instance = stack.instance(port, "");
    instance.kill();
    let config = instance.dir.join("proxy.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replacen(
            "[listen]\n",
            &format!("[listen]\nhandover_socket = \"{path}\"\n"),
            1,
        ),
    )
    .expect("config");
    instance
}

/// Waits until `port` accepts or `child` exits.
fn wait_listening_or_exit(port: u16, child: &mut std::process::Child, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("authgres exited ({status}) before listening: {}", log());
        }
        assert!(Instant::now() < deadline, "no listener: {}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 21, 5.1: under umask 000 the handover socket was world-writable
/// and handed the listening sockets to whoever asked: the user `nobody`
/// took them and the real proxy drained and exited 0.
#[tokio::test(flavor = "multi_thread")]
async fn the_handover_socket_is_owner_only_and_hands_nothing_to_another_user() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;

    let stack = Stack::start().await;
    let mut instance = instance_with_handover(&stack, free_port(), "handover.sock");
    let mut proxy = spawn_with_umask(&instance.dir, "000");
    wait_listening_or_exit(instance.port, &mut proxy, || instance.log());
    let socket = instance.dir.join("handover.sock");
    let mode = std::fs::metadata(&socket)
        .expect("handover socket")
        .permissions()
        .mode()
        & 0o777;

    // Past the file mode (root may open it for another user): the peer's
    // uid is checked too.
    for dir in [stack.dir.path(), instance.dir.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let nobody = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import socket, sys\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.settimeout(5)\n\
             s.connect(sys.argv[1])\n\
             try:\n    _, fds, _, _ = socket.recv_fds(s, 256, 3)\n\
             except OSError:\n    fds = []\n\
             print(len(fds))\n\
             try:\n    s.sendall(b'ready'); s.recv(1)\n\
             except OSError:\n    pass\n",
        )
        .arg(&socket)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("python as nobody");
    let taken = String::from_utf8_lossy(&nobody.stdout).trim().to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still_serving = proxy.try_wait().expect("try_wait").is_none()
        && stack
            .connect_port(
                instance.port,
                "authenticated",
                &stack.issuer.token("user_a"),
            )
            .await
            .is_ok();
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert!(
        mode == 0o600 && taken == "0" && still_serving,
        "socket mode {mode:o} (want 600); sockets nobody received: {taken:?} ({}); \
         the proxy still serves: {still_serving}\n{}",
        String::from_utf8_lossy(&nobody.stderr),
        instance.log()
    );
    assert!(
        instance.log().contains("not this process's"),
        "{}",
        instance.log()
    );
    instance.kill();
}

/// Issue 21, 5.1: a handover path that could not be bound made the proxy
/// start, "drain" at once and exit 0: a restart path that does not work
/// must stop the start, loudly.
#[tokio::test(flavor = "multi_thread")]
async fn a_handover_socket_that_cannot_be_bound_fails_the_start() {
    let stack = Stack::start().await;
    let instance = instance_with_handover(&stack, free_port(), "no-such-directory/handover.sock");
    let mut proxy = spawn_with_umask(&instance.dir, "022");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = proxy.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = proxy.kill();
    let _ = proxy.wait();
    let status = status.unwrap_or_else(|| panic!("kept running: {}", instance.log()));
    assert!(!status.success(), "exited {status}: {}", instance.log());
    assert!(
        instance.log().contains("handover_socket"),
        "{}",
        instance.log()
    );
}
