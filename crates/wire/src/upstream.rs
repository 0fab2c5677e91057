//! The proxy's own login to the real Postgres, and the identity attach.
//!
//! Logs in as the role the client asked for with the proxy's credential for
//! that role (SCRAM-SHA-256, MD5, cleartext or trust), collects the server's
//! ParameterStatus and BackendKeyData, then stores the signed claims in the
//! session (see [`crate::identity`]). Message codecs come from
//! `postgres-protocol`; this module only drives them over a socket.

use std::time::Duration;

use bytes::{BufMut as _, BytesMut};
use fallible_iterator::FallibleIterator as _;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::error::{ClientView, SqlState};
use crate::identity::ClaimsKey;
use crate::transport::{MaybeTls, UpstreamStream, UpstreamTls};

/// Where the real Postgres is.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Time allowed to connect and log in.
    pub connect_timeout: Duration,
    /// Whether and how to use TLS to the server.
    pub tls: UpstreamTls,
}

/// Why the upstream login or identity attach failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The server could not be reached.
    #[error("cannot connect to upstream {address}: {source}")]
    Connect {
        /// host:port tried.
        address: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Connecting and logging in took longer than the configured timeout.
    #[error("upstream login timed out")]
    Timeout,
    /// The connection failed mid-conversation.
    #[error("upstream I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The server refused the login.
    #[error("upstream refused login as {role:?}: {code} {message}")]
    Refused {
        /// Role we tried to log in as.
        role: String,
        /// SQLSTATE from the server.
        code: String,
        /// Server's message.
        message: String,
    },
    /// TLS to the server is configured and the server refused or failed it.
    #[error("upstream TLS: {0}")]
    Tls(String),
    /// The server asked for an authentication method we cannot do.
    #[error("upstream asked for unsupported authentication {0}")]
    UnsupportedAuth(&'static str),
    /// The server asked for a password but the proxy has none for the role.
    #[error("upstream wants a password for role {0:?}, and none is configured")]
    NoPassword(String),
    /// The identity could not be attached (auth schema missing or broken).
    #[error("attaching the identity failed: {code} {message}")]
    Attach {
        /// SQLSTATE from the server.
        code: String,
        /// Server's message.
        message: String,
    },
    /// The server sent something out of protocol.
    #[error("upstream protocol error: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// What the client may see. Credentials and addresses stay in the log.
    pub fn client_view(&self) -> ClientView {
        let unreachable = |message: &str| ClientView {
            code: SqlState::UnableToConnect,
            message: message.to_owned(),
            hint: None,
        };
        match self {
            Self::Connect { .. } | Self::Timeout | Self::Tls(_) => {
                unreachable("authgres could not reach the database server")
            }
            Self::Io(_) | Self::Protocol(_) => ClientView {
                code: SqlState::ConnectionFailure,
                message: "the database server connection failed during login".into(),
                hint: None,
            },
            Self::Refused {
                role,
                code,
                message,
            } => match code.as_str() {
                // Wrong proxy credentials are the operator's problem, not the
                // client's token: never answer 28P01 for them.
                "28P01" | "28000" => ClientView {
                    code: SqlState::UnableToConnect,
                    message: format!(
                        "authgres could not log in to the database as \"{role}\": {message}"
                    ),
                    hint: Some(
                        "the proxy's credentials for this role are wrong; run `authgres init-db`",
                    ),
                },
                _ => ClientView {
                    code: upstream_code(code),
                    message: message.clone(),
                    hint: None,
                },
            },
            Self::UnsupportedAuth(_) | Self::NoPassword(_) => {
                unreachable("authgres is not configured to log in to the database as this role")
            }
            Self::Attach { .. } => ClientView {
                code: SqlState::Internal,
                message: "authgres could not attach the identity to the session".into(),
                hint: Some("is the auth schema installed in this database? run `authgres init-db`"),
            },
        }
    }
}

fn upstream_code(code: &str) -> SqlState {
    match <[u8; 5]>::try_from(code.as_bytes()) {
        Ok(bytes) if bytes.iter().all(u8::is_ascii_alphanumeric) => SqlState::Upstream(bytes),
        _ => SqlState::Internal,
    }
}

/// A logged-in upstream connection, before relaying.
pub struct Upstream {
    /// The connection, TLS when configured.
    pub stream: UpstreamStream,
    /// Bytes read past the last message handled (forwarded to the client).
    pub read_buf: BytesMut,
    /// ParameterStatus values, replayed to the client.
    pub parameters: Vec<(String, String)>,
    /// The backend's process id (for cancel).
    pub pid: i32,
    /// The backend's cancel key (never shown to the client).
    pub secret_key: i32,
    /// A binding drawn ahead by `auth.begin_session()` and not used yet:
    /// pooled connections draw the next generation while they are reset,
    /// so a request needs no extra round trip for it.
    pub next_binding: Option<String>,
    /// Whose session state the connection holds.
    pub owner: Owner,
    /// The claims and signature the proxy last attached.
    attached: (Option<String>, Option<String>),
    /// Notifications (LISTEN) that arrived while the proxy ran its own
    /// queries, re-encoded for the client they belong to.
    notifications: BytesMut,
}

/// A process-unique id for a client of the pool (see [`Upstream::claim`]).
pub fn next_client_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Whose session state (identity, settings, statements) a pooled
/// connection holds. Only a reset or a fresh login makes it [`Owner::Nobody`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Clean: freshly logged in or reset.
    Nobody,
    /// This client's (transaction pooling, between its transactions).
    Client(u64),
    /// Someone's: it must be reset before anyone uses it.
    Unknown,
}

/// Connects and logs in as `role` to `database`.
pub async fn connect(
    config: &UpstreamConfig,
    role: &str,
    database: &str,
    password: Option<&str>,
    parameters: &[(String, String)],
) -> Result<Upstream, UpstreamError> {
    tokio::time::timeout(
        config.connect_timeout,
        login(config, role, database, password, parameters),
    )
    .await
    .map_err(|_| UpstreamError::Timeout)?
}

async fn login(
    config: &UpstreamConfig,
    role: &str,
    database: &str,
    password: Option<&str>,
    parameters: &[(String, String)],
) -> Result<Upstream, UpstreamError> {
    let address = format!("{}:{}", config.host, config.port);
    let stream = TcpStream::connect(&address)
        .await
        .map_err(|source| UpstreamError::Connect {
            address: address.clone(),
            source,
        })?;
    stream.set_nodelay(true)?;
    let stream = secure(stream, config).await?;
    let mut conn = Upstream {
        stream,
        read_buf: BytesMut::with_capacity(8192),
        parameters: Vec::new(),
        pid: 0,
        secret_key: 0,
        next_binding: None,
        owner: Owner::Nobody,
        attached: (None, None),
        notifications: BytesMut::new(),
    };
    let mut out = BytesMut::new();
    let startup = [("user", role), ("database", database)]
        .into_iter()
        .chain(parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    frontend::startup_message(startup, &mut out)?;
    conn.send(&mut out).await?;

    let password_for = |role: &str| password.ok_or_else(|| UpstreamError::NoPassword(role.into()));
    let mut scram: Option<ScramSha256> = None;
    loop {
        match conn.next_message().await? {
            Message::AuthenticationOk => break,
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(password_for(role)?.as_bytes(), &mut out)?;
                conn.send(&mut out).await?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = postgres_protocol::authentication::md5_hash(
                    role.as_bytes(),
                    password_for(role)?.as_bytes(),
                    body.salt(),
                );
                frontend::password_message(hash.as_bytes(), &mut out)?;
                conn.send(&mut out).await?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut offered = false;
                while let Some(mechanism) = mechanisms.next()? {
                    offered |= mechanism == SCRAM_SHA_256;
                }
                if !offered {
                    return Err(UpstreamError::UnsupportedAuth("SASL without SCRAM-SHA-256"));
                }
                let state = ScramSha256::new(
                    password_for(role)?.as_bytes(),
                    ChannelBinding::unsupported(),
                );
                frontend::sasl_initial_response(SCRAM_SHA_256, state.message(), &mut out)?;
                conn.send(&mut out).await?;
                scram = Some(state);
            }
            Message::AuthenticationSaslContinue(body) => {
                let state = scram
                    .as_mut()
                    .ok_or_else(|| UpstreamError::Protocol("SASL continue before start".into()))?;
                state.update(body.data())?;
                frontend::sasl_response(state.message(), &mut out)?;
                conn.send(&mut out).await?;
            }
            Message::AuthenticationSaslFinal(body) => {
                // Verifies the server's signature: a server that does not
                // know the verifier cannot impersonate the database.
                scram
                    .as_mut()
                    .ok_or_else(|| UpstreamError::Protocol("SASL final before start".into()))?
                    .finish(body.data())?;
            }
            Message::ErrorResponse(body) => {
                let (code, message) = error_fields(&body)?;
                return Err(UpstreamError::Refused {
                    role: role.to_owned(),
                    code,
                    message,
                });
            }
            Message::NoticeResponse(_) => {}
            Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGss
            | Message::AuthenticationGssContinue(_)
            | Message::AuthenticationSspi => {
                return Err(UpstreamError::UnsupportedAuth("GSS/SSPI/Kerberos"));
            }
            _ => {
                return Err(UpstreamError::Protocol(
                    "unexpected message during login".into(),
                ));
            }
        }
    }
    loop {
        match conn.next_message().await? {
            Message::ParameterStatus(body) => {
                conn.parameters
                    .push((body.name()?.to_owned(), body.value()?.to_owned()));
            }
            Message::BackendKeyData(body) => {
                conn.pid = body.process_id();
                conn.secret_key = body.secret_key();
            }
            Message::ReadyForQuery(_) => return Ok(conn),
            Message::NoticeResponse(_) => {}
            Message::ErrorResponse(body) => {
                let (code, message) = error_fields(&body)?;
                return Err(UpstreamError::Refused {
                    role: role.to_owned(),
                    code,
                    message,
                });
            }
            _ => {
                return Err(UpstreamError::Protocol(
                    "unexpected message after login".into(),
                ));
            }
        }
    }
}

/// Negotiates TLS with SSLRequest when configured.
async fn secure(
    mut tcp: TcpStream,
    config: &UpstreamConfig,
) -> Result<UpstreamStream, UpstreamError> {
    let UpstreamTls::VerifyFull(tls) = &config.tls else {
        return Ok(MaybeTls::Plain(tcp));
    };
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    tcp.write_all(&out).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return Err(UpstreamError::Tls("the server does not accept TLS".into()));
    }
    let name = rustls::pki_types::ServerName::try_from(config.host.clone())
        .map_err(|e| UpstreamError::Tls(format!("host {:?}: {e}", config.host)))?;
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| UpstreamError::Tls(e.to_string()))?;
    Ok(MaybeTls::Tls(Box::new(stream)))
}

/// The statement that starts a new identity generation for this backend and
/// returns the binding to sign. Schema-qualified: no search_path can divert it.
pub const BEGIN_SESSION: &str = "select auth.begin_session()";

/// Clears what a client can leave in a session and draws the identity
/// generation of the connection's next user, in one message. It does what
/// `DISCARD ALL` does except `DISCARD PLANS` (cached plans hold no client
/// state, and keeping them spares re-planning `auth.session()` for every
/// user) and `SET SESSION AUTHORIZATION DEFAULT` (a login role without
/// superuser cannot change its session authorization), which it replaces
/// with `RESET ROLE`: `RESET ALL` leaves the role alone, and init-db gives
/// the login roles no role to `SET ROLE` to, but an operator may grant one.
/// Inside an open transaction it runs inside it: roll back first.
pub const RESET_SESSION: &str = "CLOSE ALL; RESET ROLE; RESET ALL; DEALLOCATE ALL; UNLISTEN *; \
                                 SELECT pg_advisory_unlock_all(); DISCARD TEMP; \
                                 DISCARD SEQUENCES; SELECT auth.begin_session()";

/// ReadyForQuery status outside any transaction.
pub const IDLE: u8 = b'I';

/// The statement that stores claims and signature for the session. Explicit
/// `pg_catalog` and typed parameters: no shadow function or operator applies.
const ATTACH: &str = "select pg_catalog.set_config('authgres.claims', $1::pg_catalog.text, false), \
                      pg_catalog.set_config('authgres.signature', $2::pg_catalog.text, false)";

/// Text type OID, for the attach statement's parameters.
const TEXT_OID: u32 = 25;

impl Upstream {
    /// Prepares a pooled connection for a new client in one round trip:
    /// applies the client's startup settings with `set_config` (values as
    /// parameters, never spliced into SQL) and attaches the identity, signed
    /// for the generation the last reset drew. Returns the ParameterStatus
    /// values the client should see.
    pub async fn attach_for_client(
        &mut self,
        key: &ClaimsKey,
        claims: Option<&str>,
        settings: &[(String, String)],
    ) -> Result<Vec<(String, String)>, UpstreamError> {
        let binding = match self.next_binding.take() {
            Some(binding) => binding,
            None => self.begin_session().await?,
        };
        let mut out = BytesMut::new();
        let bind_texts = |sql: &str, values: &[&str], out: &mut BytesMut| {
            frontend::parse("", sql, std::iter::repeat_n(TEXT_OID, values.len()), out)?;
            bind_text(values, out)?;
            frontend::execute("", 0, out)?;
            Ok::<_, UpstreamError>(())
        };
        for (name, value) in settings {
            bind_texts(
                "select pg_catalog.set_config($1::pg_catalog.text, $2::pg_catalog.text, false)",
                &[name, value],
                &mut out,
            )?;
        }
        self.attached = (None, None);
        if claims.is_none() && settings.is_empty() {
            return Ok(self.parameters.clone());
        }
        if let Some(claims) = claims {
            let signature = key.sign(&binding, claims);
            bind_texts(ATTACH, &[claims, &signature], &mut out)?;
            self.attached = (Some(claims.to_owned()), Some(signature));
        }
        frontend::sync(&mut out);
        self.send(&mut out).await?;
        let mut parameters = self.parameters.clone();
        let mut failure = None;
        loop {
            match self.next_message().await? {
                Message::ParameterStatus(body) => {
                    let (name, value) = (body.name()?.to_owned(), body.value()?.to_owned());
                    match parameters.iter_mut().find(|(n, _)| *n == name) {
                        Some(entry) => entry.1 = value,
                        None => parameters.push((name, value)),
                    }
                }
                Message::ErrorResponse(body) => {
                    failure.get_or_insert(error_fields(&body)?);
                }
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match failure {
            // A bad client setting (e.g. an unknown DateStyle) is the
            // client's to see, as Postgres would report it at startup.
            Some((code, message)) => Err(UpstreamError::Refused {
                role: String::new(),
                code,
                message,
            }),
            None => Ok(parameters),
        }
    }

    /// Starts a new identity generation for this backend and returns the
    /// binding to sign (see `sql/auth.sql`).
    pub async fn begin_session(&mut self) -> Result<String, UpstreamError> {
        let mut out = BytesMut::new();
        frontend::query(BEGIN_SESSION, &mut out)?;
        self.send(&mut out).await?;
        self.single_text_result().await
    }

    /// Checks that the server still answers: an empty query.
    pub async fn ping(&mut self) -> Result<(), UpstreamError> {
        let mut out = BytesMut::new();
        frontend::query("", &mut out)?;
        self.send(&mut out).await?;
        loop {
            match self.next_message().await? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    let (code, message) = error_fields(&body)?;
                    return Err(UpstreamError::Protocol(format!("{code} {message}")));
                }
                _ => {}
            }
        }
    }

    /// Rolls back whatever is open and resets the session for the next
    /// user (see [`RESET_SESSION`]); fails unless the connection ends idle
    /// with the next generation drawn, in which case it must not be reused.
    pub async fn reset(&mut self) -> Result<(), UpstreamError> {
        let mut out = BytesMut::new();
        frontend::query("ROLLBACK", &mut out)?;
        frontend::query(RESET_SESSION, &mut out)?;
        self.send(&mut out).await?;
        self.finish_reset(2).await
    }

    /// Reads the replies of `count` simple queries ending with
    /// [`RESET_SESSION`], keeping the binding it drew for the next user.
    pub async fn finish_reset(&mut self, count: usize) -> Result<(), UpstreamError> {
        let mut failure = None;
        let mut binding = None;
        let mut status = IDLE;
        for _ in 0..count {
            loop {
                match self.next_message().await? {
                    Message::ReadyForQuery(body) => {
                        status = body.status();
                        break;
                    }
                    Message::DataRow(row) => {
                        let mut ranges = row.ranges();
                        if let Some(Some(range)) = ranges.next()? {
                            let text = String::from_utf8_lossy(&row.buffer()[range]);
                            if text.starts_with("authgres-v1:") {
                                binding = Some(text.into_owned());
                            }
                        }
                    }
                    Message::ErrorResponse(body) => {
                        failure.get_or_insert(error_fields(&body)?);
                    }
                    _ => {}
                }
            }
        }
        if let Some((code, message)) = failure {
            return Err(UpstreamError::Protocol(format!(
                "resetting the connection failed: {code} {message}"
            )));
        }
        if status != IDLE || binding.is_none() {
            return Err(UpstreamError::Protocol(
                "the connection did not return to idle after its reset".into(),
            ));
        }
        self.next_binding = binding;
        self.owner = Owner::Nobody;
        self.attached = (None, None);
        // The previous client's, and it is gone.
        self.notifications.clear();
        Ok(())
    }

    /// What the server sent for the client while the proxy ran its own
    /// queries: notifications, then whatever arrived after the last reply
    /// read. The client must get these before anything the relay reads.
    pub fn take_for_client(&mut self) -> BytesMut {
        let mut bytes = std::mem::take(&mut self.notifications);
        bytes.extend_from_slice(&self.read_buf);
        self.read_buf.clear();
        bytes
    }

    /// Runs one statement with text parameters (extended protocol, values
    /// never spliced into SQL) and returns its rows as text; fails with the
    /// server's error if it reports one.
    pub async fn query_text(
        &mut self,
        sql: &str,
        params: &[&str],
    ) -> Result<Vec<Vec<Option<String>>>, UpstreamError> {
        let mut out = BytesMut::new();
        frontend::parse(
            "",
            sql,
            std::iter::repeat_n(TEXT_OID, params.len()),
            &mut out,
        )?;
        bind_text(params, &mut out)?;
        frontend::execute("", 0, &mut out)?;
        frontend::sync(&mut out);
        self.send(&mut out).await?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            match self.next_message().await? {
                Message::DataRow(row) => {
                    let buffer = row.buffer();
                    rows.push(
                        row.ranges()
                            .map(|range| {
                                Ok(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned()))
                            })
                            .collect()?,
                    );
                }
                Message::ErrorResponse(body) => {
                    failure.get_or_insert(error_fields(&body)?);
                }
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match failure {
            Some((code, message)) => Err(UpstreamError::Protocol(format!("{code} {message}"))),
            None => Ok(rows),
        }
    }

    /// Where a cancel request for this backend goes.
    pub fn cancel_key(&self) -> crate::cancel::UpstreamKey {
        crate::cancel::UpstreamKey {
            pid: self.pid,
            secret_key: self.secret_key,
        }
    }

    /// The claims and signature the proxy attached for the current client.
    pub fn attached_identity(&self) -> (Option<String>, Option<String>) {
        self.attached.clone()
    }

    /// Prepares statements again from the Parse messages that created them
    /// on another connection, each followed by its own Sync so one failure
    /// does not skip the rest. A statement that no longer parses is left
    /// out, as its client would find on any new connection.
    pub async fn replay_statements<'a>(
        &mut self,
        parses: impl Iterator<Item = &'a [u8]>,
    ) -> Result<(), UpstreamError> {
        let mut out = BytesMut::new();
        let mut count = 0;
        for parse in parses {
            out.extend_from_slice(parse);
            frontend::sync(&mut out);
            count += 1;
        }
        if count == 0 {
            return Ok(());
        }
        self.send(&mut out).await?;
        for _ in 0..count {
            loop {
                match self.next_message().await? {
                    Message::ReadyForQuery(_) => break,
                    Message::ErrorResponse(body) => {
                        let (code, message) = error_fields(&body)?;
                        tracing::debug!(%code, %message, "a tracked statement did not prepare again");
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Readies a pooled connection for `client`: one holding anyone else's
    /// session is reset first. Returns whether it already holds this
    /// client's session (identity, settings and statements in place).
    pub async fn claim(&mut self, client: u64) -> Result<bool, UpstreamError> {
        let held = match self.owner {
            Owner::Client(id) if id == client => true,
            Owner::Nobody => false,
            Owner::Client(_) | Owner::Unknown => {
                self.reset().await?;
                false
            }
        };
        // Whatever happens next happens in this client's session.
        self.owner = Owner::Client(client);
        Ok(held)
    }

    /// Reads the replies to one statement up to ReadyForQuery, returning the
    /// first column of its first row.
    async fn single_text_result(&mut self) -> Result<String, UpstreamError> {
        let mut value = None;
        let mut failure = None;
        loop {
            match self.next_message().await? {
                Message::DataRow(row) if value.is_none() => {
                    let mut ranges = row.ranges();
                    if let Some(Some(range)) = ranges.next()? {
                        value = Some(String::from_utf8_lossy(&row.buffer()[range]).into_owned());
                    }
                }
                Message::ErrorResponse(body) => failure = Some(error_fields(&body)?),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        if let Some((code, message)) = failure {
            return Err(UpstreamError::Attach { code, message });
        }
        value.ok_or_else(|| UpstreamError::Attach {
            code: "XX000".into(),
            message: "no value returned".into(),
        })
    }

    /// Writes `out` to the server and clears it.
    pub async fn send(&mut self, out: &mut BytesMut) -> Result<(), UpstreamError> {
        self.stream.write_all(out).await?;
        out.clear();
        Ok(())
    }

    /// Reads the next message from the server.
    /// A notification is not the reply of any query the proxy runs: it is
    /// kept for the client ([`Upstream::take_for_client`]).
    pub async fn next_message(&mut self) -> Result<Message, UpstreamError> {
        loop {
            match Message::parse(&mut self.read_buf)? {
                Some(Message::NotificationResponse(body)) => {
                    let (channel, payload) = (body.channel()?, body.message()?);
                    let out = &mut self.notifications;
                    out.put_u8(b'A');
                    out.put_i32((4 + 4 + channel.len() + 1 + payload.len() + 1) as i32);
                    out.put_i32(body.process_id());
                    for text in [channel, payload] {
                        out.put_slice(text.as_bytes());
                        out.put_u8(0);
                    }
                    continue;
                }
                Some(message) => return Ok(message),
                None => {}
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(UpstreamError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

/// Binds text values to the unnamed statement, results in text.
fn bind_text(values: &[&str], out: &mut BytesMut) -> Result<(), UpstreamError> {
    frontend::bind(
        "",
        "",
        [0i16],
        values.iter(),
        |value, buf| {
            buf.extend_from_slice(value.as_bytes());
            Ok(postgres_protocol::IsNull::No)
        },
        [0i16],
        out,
    )
    .map_err(|e| match e {
        frontend::BindError::Conversion(e) => UpstreamError::Protocol(e.to_string()),
        frontend::BindError::Serialization(e) => UpstreamError::Io(e),
    })
}

/// SQLSTATE and message of an ErrorResponse.
pub fn error_fields(
    body: &postgres_protocol::message::backend::ErrorResponseBody,
) -> Result<(String, String), UpstreamError> {
    let mut fields = body.fields();
    let (mut code, mut message) = (String::new(), String::new());
    while let Some(field) = fields.next()? {
        match field.type_() {
            b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            _ => {}
        }
    }
    Ok((code, message))
}

/// Forwards a cancel request to the upstream backend.
pub async fn cancel(config: &UpstreamConfig, pid: i32, secret_key: i32) -> std::io::Result<()> {
    let address = format!("{}:{}", config.host, config.port);
    let mut stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(&address))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, secret_key, &mut out);
    stream.write_all(&out).await?;
    // The server closes the connection once it has read the request.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(config.connect_timeout, stream.read(&mut sink)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{CLAIMS_SETTING, SIGNATURE_SETTING};

    #[test]
    fn the_attach_statement_sets_the_settings_sql_reads() {
        assert!(ATTACH.contains(&format!("'{CLAIMS_SETTING}'")));
        assert!(ATTACH.contains(&format!("'{SIGNATURE_SETTING}'")));
    }
}
