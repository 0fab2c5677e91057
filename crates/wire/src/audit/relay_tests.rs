//! The audit log as the relay feeds it, over in-memory pipes: one line per
//! transaction from the bodies the relay frames, the first error's
//! SQLSTATE even behind a long message, and a line for the transaction a
//! client left open.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

use super::{AuditConfig, Counters, Facts, Hub, Output, Per, SessionAudit, Statements};
use crate::proto::framer::tests::message;
use crate::relay::{Observed, Relay, Stop};
use crate::transport::Transport;

async fn exchange(
    client: &mut DuplexStream,
    upstream: &mut DuplexStream,
    query: &str,
    reply: &[(u8, &[u8])],
) {
    let sent = message(b'Q', format!("{query}\0").as_bytes());
    client.write_all(&sent).await.expect("query");
    let mut got = vec![0; sent.len()];
    upstream.read_exact(&mut got).await.expect("forwarded");
    let reply: Vec<u8> = reply
        .iter()
        .flat_map(|(tag, body)| message(*tag, body))
        .collect();
    upstream.write_all(&reply).await.expect("reply");
    let mut got = vec![0; reply.len()];
    client.read_exact(&mut got).await.expect("relayed");
}

/// An audited relay between pipes, run in a task: (client peer, upstream
/// peer, the task, the hub), lines going to `path`.
fn audited(
    path: &std::path::Path,
) -> (
    DuplexStream,
    DuplexStream,
    tokio::task::JoinHandle<Result<Stop, crate::relay::RelayError>>,
    Hub,
) {
    let config = AuditConfig {
        per: Per::Transaction,
        statements: Statements::Normalized,
        max_statement_bytes: 4096,
        output: Output::File(path.to_owned()),
        queue: 64,
    };
    let hub = Hub::new(Counters::new(Counter::default(), Counter::default()));
    hub.configure(Some(&config));
    let facts = Facts {
        transport: Transport::WebSocket,
        encrypted: false,
        identity: None,
        role: "anonymous",
        database: "app",
        client: "127.0.0.1:9".parse().expect("address"),
    };
    let session = SessionAudit::new(&config, hub.sink().expect("runs"), &facts);
    let metrics = crate::metrics::Metrics::unregistered();
    let clients = Arc::new(crate::clients::Clients::default());
    let handle = clients.register(facts.client, Transport::WebSocket);
    let (mut client, client_peer) = tokio::io::duplex(4096);
    let (mut upstream, upstream_peer) = tokio::io::duplex(4096);
    let mut relay = Relay::new(None, tokio::time::Instant::now());
    relay.observe(std::sync::Arc::new(Observed {
        tally: metrics.tally(Transport::WebSocket, "app", "anonymous"),
        activity: handle.activity(),
        audit: Some(Arc::new(session)),
    }));
    let running = tokio::spawn(async move { relay.run(&mut client, &mut upstream).await });
    (client_peer, upstream_peer, running, hub)
}

#[tokio::test]
async fn a_relay_given_up_inside_a_transaction_still_writes_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    let (mut client, mut upstream, running, hub) = audited(&path);
    exchange(
        &mut client,
        &mut upstream,
        "begin",
        &[(b'C', b"BEGIN\0"), (b'Z', b"T")],
    )
    .await;
    running.abort();
    assert!(running.await.is_err(), "aborted");
    assert!(hub.flush(Duration::from_secs(5)).await);
    let text = std::fs::read_to_string(&path).expect("log");
    let line: Value = serde_json::from_str(text.trim()).expect("one JSON line");
    assert_eq!(line["ended"], "interrupted", "{text}");
    assert_eq!(line["statements"], json!(["begin"]));
}

#[tokio::test]
async fn an_audited_relay_writes_a_line_per_transaction_and_for_one_left_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    let (mut client_peer, mut upstream_peer, running, hub) = audited(&path);
    let (c, u) = (&mut client_peer, &mut upstream_peer);

    let insert = [(b'C', &b"INSERT 0 3\0"[..]), (b'Z', b"I")];
    exchange(c, u, "insert into t values ('a'), ('b'), ('c')", &insert).await;
    exchange(c, u, "begin", &[(b'C', b"BEGIN\0"), (b'Z', b"T")]).await;
    let select = [(b'C', &b"SELECT 2\0"[..]), (b'Z', b"T")];
    exchange(c, u, "select * from t where x = 'secret'", &select).await;
    let long = format!("SERROR\0C22012\0M{}\0\0", "division by zero ".repeat(20));
    let failed = [(b'E', long.as_bytes()), (b'Z', b"E")];
    exchange(c, u, "select 1/0", &failed).await;
    let second = [(b'E', &b"SERROR\0C25P02\0\0"[..]), (b'Z', b"E")];
    exchange(c, u, "select 2", &second).await;
    exchange(c, u, "rollback", &[(b'C', b"ROLLBACK\0"), (b'Z', b"I")]).await;
    exchange(c, u, "begin", &[(b'C', b"BEGIN\0"), (b'Z', b"T")]).await;
    drop(client_peer);
    assert_eq!(
        running.await.expect("join").expect("relay"),
        Stop::ClientClosed
    );

    assert!(hub.flush(Duration::from_secs(5)).await);
    let text = std::fs::read_to_string(&path).expect("log");
    assert!(!text.contains("secret"), "{text}");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let summary: Vec<Value> = lines
        .iter()
        .map(|l| json!([l["rows"], l["sqlstate"], l["statements"], l.get("ended")]))
        .collect();
    assert_eq!(
        summary,
        [
            json!([3, null, ["insert into t values (?), (?), (?)"], null]),
            json!([
                2,
                "22012",
                [
                    "begin",
                    "select * from t where x = ?",
                    "select ?/?",
                    "select ?",
                    "rollback"
                ],
                null
            ]),
            json!([0, null, ["begin"], "client_closed"]),
        ]
    );
    assert_eq!(lines[0]["transport"], "websocket");
}
