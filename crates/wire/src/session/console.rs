//! A session with the operators' console (its commands are
//! [`crate::console`]): a client that asked for the console's database
//! logs in with a console user's password, under the same rule as tokens
//! (cleartext only where a token may travel), then runs simple queries
//! until it leaves. Nothing here reaches the upstream server.

use std::time::SystemTime;

use bytes::{Buf as _, BytesMut};
use tokio::io::AsyncReadExt as _;
use tokio::time::timeout_at;

use super::{ClientIo, Session, write_flush};
use crate::admission::{self, Refusal};
use crate::clients::ClientLogin;
use crate::config::{ConsoleAccess, ConsoleConfig};
use crate::console::{self, Reply, command};
use crate::error::{ProtocolViolation, SessionError};
use crate::proto::backend;
use crate::proto::negotiate::Startup;

/// The largest message the console reads: commands are short.
const MAX_MESSAGE: usize = 64 * 1024;

/// The `server_version` the console reports, as pgbouncer's does.
fn server_version() -> String {
    format!("{}/authgres", env!("CARGO_PKG_VERSION"))
}

impl<S: ClientIo> Session<'_, S> {
    /// Logs the client in to the console and serves it to the end.
    pub(super) async fn console(
        &mut self,
        startup: &Startup,
        console: &ConsoleConfig,
    ) -> Result<(), SessionError> {
        let deadline = self.auth_deadline;
        let login = match timeout_at(deadline, self.console_login(startup, console)).await {
            Ok(login) => login,
            Err(_) => Err(SessionError::AuthTimeout(self.settings.config.auth_timeout)),
        };
        let (user, access) = match login {
            Ok(login) => login,
            Err(error) => {
                self.proxy.metrics.login(self.transport, Err(&error));
                return Err(error);
            }
        };
        self.ticket.authenticated();
        self.registered.logged_in(ClientLogin {
            role: user.clone(),
            database: console.database.clone(),
            provider: None,
            subject: None,
            pool_mode: "console",
            application_name: startup.parameters.get("application_name").cloned(),
            tls: self.encrypted,
            pool_client: 0,
            requested_role: None,
        });
        tracing::info!(?access, "console session started");
        let mut out = BytesMut::new();
        backend::authentication_ok(&mut out);
        for (name, value) in [
            ("server_version", server_version().as_str()),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
            ("application_name", ""),
        ] {
            backend::parameter_status(name, value, &mut out);
        }
        backend::ready_for_query_idle(&mut out);
        write_flush(&mut self.client, &out)
            .await
            .map_err(SessionError::ClientIo)?;
        self.serve_console(access).await
    }

    /// Reads and checks a console user's password: the user and what it
    /// may run.
    async fn console_login(
        &mut self,
        startup: &Startup,
        console: &ConsoleConfig,
    ) -> Result<(String, ConsoleAccess), SessionError> {
        self.negotiate_version(startup).await?;
        let user = startup
            .parameters
            .get("user")
            .filter(|user| !user.is_empty())
            .ok_or(SessionError::MissingUser)?
            .clone();
        tracing::Span::current().record("user", user.as_str());
        tracing::Span::current().record("db", console.database.as_str());
        let policy = &self.settings.config.admission;
        if !admission::cleartext_allowed(policy, self.peer.ip(), self.relayed_by, self.encrypted) {
            return Err(if policy.tls_offered {
                Refusal::CleartextRefused(self.transport).into()
            } else {
                Refusal::TlsNotConfigured.into()
            });
        }
        let password = self.ask_token().await?;
        match console.authenticate(&user, &password) {
            Some(access) => Ok((user, access)),
            None => Err(SessionError::ConsoleLogin(user)),
        }
    }

    /// Answers the client's queries until it leaves, the drain reaches
    /// it, or it is killed.
    async fn serve_console(&mut self, access: ConsoleAccess) -> Result<(), SessionError> {
        let mut skipping_to_sync = false;
        loop {
            let Some((tag, body)) = self.read_console_message().await? else {
                return Ok(());
            };
            let mut out = BytesMut::new();
            match tag {
                b'X' => return Ok(()),
                b'Q' if !skipping_to_sync => {
                    let query = query_text(&body)?;
                    self.registered
                        .set_state(crate::clients::ClientState::Active);
                    for statement in command::statements(&query) {
                        if !self.console_statement(access, statement, &mut out).await {
                            break;
                        }
                    }
                    if command::statements(&query).next().is_none() {
                        backend::empty_query(&mut out);
                    }
                    self.registered.set_state(crate::clients::ClientState::Idle);
                    backend::ready_for_query_idle(&mut out);
                }
                b'S' => {
                    skipping_to_sync = false;
                    backend::ready_for_query_idle(&mut out);
                }
                b'H' => {}
                _ if skipping_to_sync => {}
                _ => {
                    skipping_to_sync = true;
                    let message = "the console takes simple queries only (psql, or \
                                   simple_query in a driver)";
                    backend::error(
                        crate::classify::SqlState::FeatureNotSupported,
                        message,
                        &mut out,
                    );
                }
            }
            write_flush(&mut self.client, &out)
                .await
                .map_err(SessionError::ClientIo)?;
        }
    }

    /// Runs one statement into `out`; false if it failed (the rest of the
    /// query is skipped, as Postgres does).
    async fn console_statement(
        &mut self,
        access: ConsoleAccess,
        statement: &str,
        out: &mut BytesMut,
    ) -> bool {
        let started = SystemTime::now();
        let result = match command::parse(statement) {
            Ok(command) => {
                let running = console::run(self.proxy, access, &command);
                tokio::select! {
                    result = running => result,
                    () = self.registered.closing() => return false,
                }
            }
            Err(error) => Err(error.into()),
        };
        match result {
            Ok(reply) => {
                tracing::info!(
                    command = statement,
                    took = ?started.elapsed().unwrap_or_default(),
                    "console command"
                );
                write_reply(&reply, out);
                true
            }
            Err(failed) => {
                tracing::info!(command = statement, error = %failed, "console command failed");
                backend::error(failed.code, &failed.message, out);
                false
            }
        }
    }

    /// The client's next message (tag and body); `None` when it has left,
    /// the drain reached it between commands, or it was killed.
    async fn read_console_message(&mut self) -> Result<Option<(u8, BytesMut)>, SessionError> {
        loop {
            if let Some(message) = take_message(&mut self.inbox)? {
                return Ok(Some(message));
            }
            let registered = &self.registered;
            let read = tokio::select! {
                biased;
                () = registered.closing() => return Err(SessionError::ShuttingDown),
                () = registered.draining() => return Err(SessionError::ShuttingDown),
                read = self.client.read_buf(&mut self.inbox) => read,
            };
            if read.map_err(SessionError::ClientIo)? == 0 {
                return Ok(None);
            }
        }
    }
}

/// Encodes a command's answer.
fn write_reply(reply: &Reply, out: &mut BytesMut) {
    for notice in &reply.notices {
        backend::notice(notice, out);
    }
    let mut tag = reply.tag.to_owned();
    if let Some(table) = &reply.table {
        backend::row_description(&table.columns, out);
        for row in &table.rows {
            backend::data_row(row.iter().map(Option::as_deref), out);
        }
        if reply.tag == "SHOW" {
            tag = format!("SHOW {}", table.rows.len());
        }
    }
    backend::command_complete(&tag, out);
}

/// One whole message from `inbox`, if one has arrived.
fn take_message(inbox: &mut BytesMut) -> Result<Option<(u8, BytesMut)>, SessionError> {
    let Some(&[tag, a, b, c, d]) = inbox.get(..5) else {
        return Ok(None);
    };
    let length = u32::from_be_bytes([a, b, c, d]) as usize;
    if !(4..=MAX_MESSAGE).contains(&length) {
        return Err(ProtocolViolation::ConsoleMessage(length).into());
    }
    if inbox.len() < 1 + length {
        return Ok(None);
    }
    inbox.advance(5);
    Ok(Some((tag, inbox.split_to(length - 4))))
}

/// The text of a Query message.
fn query_text(body: &[u8]) -> Result<String, SessionError> {
    let text = body.strip_suffix(&[0]).unwrap_or(body);
    String::from_utf8(text.to_vec())
        .map_err(|_| ProtocolViolation::ConsoleMessage(body.len()).into())
}
