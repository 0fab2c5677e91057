//! `authgres demo` and `authgres token` as a new user runs them: the printed
//! env file drives psql, each user sees only their own todos, and SIGTERM
//! removes everything.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, psql_path};

#[test]
fn demo_serves_two_users_and_cleans_up_on_sigterm() {
    common::provision::system();
    let scratch = tempfile::tempdir().expect("tempdir");
    let state = scratch.path().join("state");
    let env_file = scratch.path().join("demo.env");
    let screen = scratch.path().join("screen.out");
    let log = scratch.path().join("screen.err");
    let mut demo = Command::new(BIN)
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--env",
        ])
        .arg(&env_file)
        .arg("--state-dir")
        .arg(&state)
        // What a new user sees: the default log level.
        .env_remove("AUTHGRES_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&screen).expect("stdout file"))
        .stderr(std::fs::File::create(&log).expect("stderr file"))
        .spawn()
        .expect("start demo");
    let guard = KillOnDrop(&mut demo);

    let deadline = Instant::now() + Duration::from_secs(90);
    let env = loop {
        if let Ok(text) = std::fs::read_to_string(&env_file)
            && text.contains("AUTHGRES_HTTP_URL")
        {
            break authgres_env(&text);
        }
        assert!(Instant::now() < deadline, "demo did not write its env file");
        std::thread::sleep(Duration::from_millis(50));
    };
    let psql = |token: &str, sql: &str| {
        let output = Command::new(psql_path())
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("PGPASSWORD", token)
            .output()
            .expect("psql");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    let get = |name: &str| env.iter().find(|(k, _)| k == name).expect(name).1.clone();
    let (a, b) = (get("AUTHGRES_TOKEN_A"), get("AUTHGRES_TOKEN_B"));
    assert_eq!(
        psql(
            &a,
            "insert into todos (task) values ('from a') returning user_id"
        ),
        "user_alice\nINSERT 0 1"
    );
    assert_eq!(psql(&b, "select count(*) from todos"), "0");
    assert_eq!(psql(&a, "select count(*) from todos"), "1");

    // The first screen has nothing alarming the user did not cause.
    let first_screen = std::fs::read_to_string(&log).expect("stderr");
    for alarming in ["NOTICE", "WARN", "ERROR", "skipping"] {
        assert!(
            !first_screen.contains(alarming),
            "the demo's own setup printed {alarming}:\n{first_screen}"
        );
    }

    // "More tokens: ..." works exactly as printed.
    let printed = std::fs::read_to_string(&screen).expect("stdout");
    let command = printed
        .lines()
        .find_map(|line| line.strip_prefix("More tokens: "))
        .unwrap_or_else(|| panic!("no token command in:\n{printed}"));
    let minted = Command::new("sh")
        .args(["-c", command])
        .output()
        .expect("run the printed token command");
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let carol = String::from_utf8_lossy(&minted.stdout).trim().to_owned();
    assert_eq!(psql(&carol, "select auth.user_id()"), "user_carol");

    // The HTTP endpoint answers as the Neon driver expects.
    let http_url = get("AUTHGRES_HTTP_URL");
    let body = post_sql(&http_url, &b, "select auth.user_id() as me");
    assert!(body.contains(r#""rows":[{"me":"user_bob"}]"#), "{body}");

    drop(guard);
    assert!(!state.exists(), "the demo left its state directory behind");
}

/// A minimal HTTP/1.1 POST to /sql, enough for one request.
fn post_sql(url: &str, token: &str, query: &str) -> String {
    use std::io::{Read as _, Write as _};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').expect("path");
    let body = format!(r#"{{"query": "{query}"}}"#);
    let request = format!(
        "POST /{path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {token}\r\n\
         neon-connection-string: postgresql://authenticated@{host}/app\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = std::net::TcpStream::connect(host).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

/// Parses the `export KEY=VALUE` lines the demo writes.
fn authgres_env(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Sends SIGTERM and waits, bounded; kills if the demo does not exit.
struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
