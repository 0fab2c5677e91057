//! The Postgres listener: the front door ([`front_door`]) lets TCP
//! clients in, a session serves each to its end, and a refusal is an
//! ErrorResponse counted as a failed login.
//!
//! [`front_door`]: crate::front_door

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::error::SessionError;
use crate::front_door::{self, Door, EntryRules, Guest, TurnedAway};
use crate::proxy::Proxy;
use crate::session::{refuse, session_span};
use crate::transport::Transport;

/// Accepts Postgres clients on `listener` until the proxy's drain starts;
/// the sessions it started run on as tasks of the drain.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) {
    front_door::serve(Arc::new(PostgresDoor(proxy)), listener).await;
}

/// The Postgres listener's side of the front door.
struct PostgresDoor(Arc<Proxy>);

impl Door for PostgresDoor {
    fn proxy(&self) -> &Arc<Proxy> {
        &self.0
    }

    fn transport(&self) -> Transport {
        Transport::Wire
    }

    fn entry_rules(&self) -> EntryRules {
        let settings = self.0.settings();
        EntryRules {
            proxy_protocol_from: settings.config.proxy_protocol_from.clone(),
            timeout: settings.config.auth_timeout,
        }
    }

    fn span(&self, peer: SocketAddr, relayed_by: Option<IpAddr>) -> tracing::Span {
        session_span(peer, relayed_by, Transport::Wire)
    }

    fn serve(self: Arc<Self>, guest: Guest) -> impl Future<Output = ()> + Send + 'static {
        Arc::clone(&self.0).serve_tcp(guest)
    }

    async fn turn_away(self: Arc<Self>, mut tcp: TcpStream, why: TurnedAway) {
        let error = match why {
            TurnedAway::Full(_) => SessionError::TooManyConnections,
            TurnedAway::ProxyHeader(refusal) => SessionError::ProxyHeader(refusal),
        };
        self.0.metrics().login(Transport::Wire, Err(&error));
        refuse(&mut tcp, &error).await;
    }
}
