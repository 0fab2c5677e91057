//! Opening an upstream connection: TCP, TLS when configured (SSLRequest,
//! then verify-full), and the login driven over the socket. Also the
//! CancelRequest the proxy forwards to a backend.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::backend::Header;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use super::{Attached, Owner, Upstream, UpstreamKey};
use crate::error::UpstreamError;
use crate::proto::login::{self, Step, UpstreamLogin};
use crate::transport::{MaybeTls, UpstreamStream, UpstreamTls};

/// Where the real Postgres is and how to reach it.
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
    /// Idle time before TCP keepalive probes (`None`: the system's).
    pub tcp_keepalive: Option<Duration>,
}

impl UpstreamConfig {
    /// `host:port`.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Largest message accepted during login (the server's are small).
const MAX_LOGIN_MESSAGE: usize = 64 * 1024;

/// Connects and logs in as `role` to `database` with `password` (`None`:
/// trust) and the startup `parameters`, within `connect_timeout`.
pub async fn connect(
    config: &UpstreamConfig,
    role: &str,
    database: &str,
    password: Option<&str>,
    parameters: &[(String, String)],
) -> Result<Upstream, UpstreamError> {
    let deadline = Instant::now() + config.connect_timeout;
    let address = config.address();
    let tcp = match timeout_at(deadline, TcpStream::connect(&address)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) => return Err(UpstreamError::Connect { address, source }),
        Err(_) => return Err(UpstreamError::ConnectTimeout),
    };
    crate::transport::tune(&tcp, config.tcp_keepalive);
    let stream = timeout_at(deadline, secure(tcp, config))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout)??;
    let mut conn = Upstream {
        stream,
        inbox: BytesMut::with_capacity(8192),
        key: UpstreamKey {
            pid: 0,
            secret: Arc::from(&[][..]),
            address: Arc::from(address.as_str()),
            connect_timeout: config.connect_timeout,
        },
        role: role.to_owned(),
        database: database.to_owned(),
        parameters: Arc::from([]),
        next_binding: None,
        owner: Owner::Nobody,
        shape: None,
        attached: Attached::default(),
        for_client: BytesMut::new(),
        broken: false,
    };
    match timeout_at(
        deadline,
        log_in(&mut conn, role, database, password, parameters),
    )
    .await
    {
        Ok(result) => result.map(|()| conn),
        Err(_) => Err(UpstreamError::ConnectTimeout),
    }
}

async fn log_in(
    conn: &mut Upstream,
    role: &str,
    database: &str,
    password: Option<&str>,
    parameters: &[(String, String)],
) -> Result<(), UpstreamError> {
    let mut out = BytesMut::new();
    let pinned = super::PINNED_STARTUP
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()));
    let parameters: Vec<(String, String)> = parameters.iter().cloned().chain(pinned).collect();
    login::startup_message(role, database, &parameters, 0, &mut out);
    let mut login = UpstreamLogin::new(role, password, 0, crate::random::scram_nonce());
    loop {
        if !out.is_empty() {
            conn.stream.write_all(&out).await?;
            out.clear();
        }
        let (tag, body) = read_frame(conn).await?;
        match login.message(tag, &body, &mut out) {
            Ok(Step::Continue) => {}
            Ok(Step::Ready) => break,
            Err(error) => return Err(UpstreamError::login(role, error)),
        }
    }
    let established = login.established();
    conn.parameters = shared(established.parameters);
    conn.key.pid = established.pid;
    conn.key.secret = Arc::from(established.cancel_key);
    Ok(())
}

/// Parameter sets a login on this thread reported that are still held, at
/// most [`SHARED_PARAMETER_SETS`].
type Recent = Vec<std::sync::Weak<[(String, String)]>>;

/// Distinct parameter sets looked among for a login's.
const SHARED_PARAMETER_SETS: usize = 16;

thread_local! {
    /// The ParameterStatus sets of this thread's logins that some
    /// connection still holds. The backends of one server and role report
    /// the same values, and a session-pooled client keeps one backend
    /// while idle: a set shared is a kilobyte and a half less per backend
    /// (issue 26).
    static RECENT_PARAMETERS: std::cell::RefCell<Recent> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// `parameters`, shared with a connection still holding the same ones.
fn shared(parameters: Vec<(String, String)>) -> Arc<[(String, String)]> {
    let same = RECENT_PARAMETERS
        .try_with(|recent| {
            let mut recent = recent.borrow_mut();
            recent.retain(|set| set.strong_count() > 0);
            recent
                .iter()
                .filter_map(std::sync::Weak::upgrade)
                .find(|set| **set == *parameters)
        })
        .ok()
        .flatten();
    if let Some(same) = same {
        return same;
    }
    let set: Arc<[(String, String)]> = parameters.into();
    // During thread teardown the set is simply not shared.
    let _ = RECENT_PARAMETERS.try_with(|recent| {
        let mut recent = recent.borrow_mut();
        if recent.len() < SHARED_PARAMETER_SETS {
            recent.push(Arc::downgrade(&set));
        }
    });
    set
}

/// Reads one whole message off the connection during login.
async fn read_frame(conn: &mut Upstream) -> Result<(u8, BytesMut), UpstreamError> {
    loop {
        if let Some(header) = Header::parse(&conn.inbox)
            .map_err(|_| UpstreamError::Protocol("a malformed message header"))?
        {
            let length = usize::try_from(header.len()).unwrap_or(usize::MAX);
            if length > MAX_LOGIN_MESSAGE {
                return Err(UpstreamError::Protocol("an oversized login message"));
            }
            if conn.inbox.len() > length {
                let mut frame = conn.inbox.split_to(length + 1);
                let body = frame.split_off(5);
                return Ok((header.tag(), body));
            }
        }
        if conn.stream.read_buf(&mut conn.inbox).await? == 0 {
            return Err(UpstreamError::Closed);
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
    postgres_protocol::message::frontend::ssl_request(&mut out);
    tcp.write_all(&out).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer != [b'S'] {
        return Err(UpstreamError::TlsRefused);
    }
    let name = rustls::pki_types::ServerName::try_from(config.host.clone())
        .map_err(|_| UpstreamError::TlsName(config.host.clone()))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
        .connect(name, tcp)
        .await
        .map_err(UpstreamError::Tls)?;
    Ok(MaybeTls::Tls(Box::new(stream)))
}

impl UpstreamKey {
    /// Forwards a CancelRequest for this backend to its server, within
    /// the server's `connect_timeout`: for a client's cancel, and for
    /// callers that give up on a statement they sent (a deadline passed,
    /// their client left) and must not leave it running.
    pub async fn cancel(&self) -> Result<(), UpstreamError> {
        let deadline = Instant::now() + self.connect_timeout;
        crate::transport::send_cancel_request(&self.address, self.pid, &self.secret, deadline)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::TimedOut => UpstreamError::ConnectTimeout,
                _ => UpstreamError::Connect {
                    address: self.address.to_string(),
                    source,
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(version: &str) -> Vec<(String, String)> {
        vec![
            ("server_version".to_owned(), version.to_owned()),
            ("TimeZone".to_owned(), "UTC".to_owned()),
        ]
    }

    #[test]
    fn logins_that_report_the_same_parameters_share_them_while_held() {
        let first = shared(set("15.8"));
        let again = shared(set("15.8"));
        assert!(Arc::ptr_eq(&first, &again));
        let other = shared(set("16.4"));
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(&*other, &set("16.4")[..]);
        drop((first, again));
        // No longer held: a new login's set is its own.
        let later = shared(set("15.8"));
        assert_eq!(&*later, &set("15.8")[..]);
    }
}
