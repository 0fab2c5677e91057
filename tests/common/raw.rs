//! [`RawClient`], a hand-driven Postgres wire client, and the byte-level
//! helpers ([`message`], [`error_fields`]) tests use with it.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::DATABASE;

/// A hand-driven Postgres client for what drivers will not do: watching a
/// connection close, sending bytes out of order, never answering.
pub struct RawClient {
    pub stream: tokio::net::TcpStream,
}

impl RawClient {
    pub async fn connect(port: u16) -> Self {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        Self { stream }
    }

    /// Connects from the loopback address `source` (127.0.0.0/8 is all
    /// local on Linux), to act as another host.
    pub async fn connect_from(port: u16, source: [u8; 4]) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind((std::net::Ipv4Addr::from(source), 0).into())
            .expect("bind");
        let stream = socket
            .connect(([127, 0, 0, 1], port).into())
            .await
            .expect("connect");
        Self { stream }
    }

    /// Logs in as `user` (with `token` when the role needs one) and reads
    /// up to the first ReadyForQuery.
    pub async fn login(port: u16, user: &str, token: Option<&str>) -> Self {
        let mut raw = Self::connect(port).await;
        raw.send_startup(&[("user", user), ("database", DATABASE)])
            .await;
        if let Some(token) = token {
            raw.send_password(token).await;
        }
        raw.read_until(b'Z').await;
        raw
    }

    /// Sends raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Reads messages up to and including one tagged `tag`; returns their
    /// tags.
    pub async fn read_until(&mut self, tag: u8) -> Vec<u8> {
        let mut tags = Vec::new();
        loop {
            let (got, body) = self
                .read_message()
                .await
                .unwrap_or_else(|| panic!("closed before {:?}; saw {tags:?}", char::from(tag)));
            if got == b'E' && tag != b'E' && error_fields(&body).0.starts_with("08") {
                panic!("connection error: {:?}", error_fields(&body));
            }
            tags.push(got);
            if got == tag {
                return tags;
            }
        }
    }

    pub async fn send_startup(&mut self, params: &[(&str, &str)]) {
        let mut buf = bytes::BytesMut::new();
        postgres_protocol::message::frontend::startup_message(params.iter().copied(), &mut buf)
            .expect("encode");
        self.stream.write_all(&buf).await.expect("write");
    }

    pub async fn send_password(&mut self, password: &str) {
        let mut buf = bytes::BytesMut::new();
        postgres_protocol::message::frontend::password_message(password.as_bytes(), &mut buf)
            .expect("encode");
        self.stream.write_all(&buf).await.expect("write");
    }

    /// Reads one backend message: (tag, body).
    pub async fn read_message(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        let read =
            tokio::time::timeout(Duration::from_secs(10), self.stream.read_exact(&mut header))
                .await
                .expect("no reply within 10s");
        read.ok()?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        self.stream.read_exact(&mut body).await.ok()?;
        Some((header[0], body))
    }

    /// Reads until an ErrorResponse; returns its SQLSTATE and message.
    pub async fn expect_error(&mut self) -> (String, String) {
        loop {
            let (tag, body) = self
                .read_message()
                .await
                .expect("an ErrorResponse before EOF");
            if tag == b'E' {
                return error_fields(&body);
            }
        }
    }

    /// Whether the server closed the connection (EOF) within `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(wait, self.stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// A frontend message: tag, length, body.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&u32::try_from(body.len() + 4).expect("fits").to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    (code, message)
}
