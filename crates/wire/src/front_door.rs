//! The front door of every listener, the Postgres one and HTTP alike:
//! accepting until the drain, the PROXY header of a trusted balancer, the
//! connection budget (entry, then waiting for a place), the client
//! registry, refusals logged under one limit, and every connection run as
//! a task of the drain.
//!
//! ```text
//! accept ─► PROXY header? ─► budget.enter ─► register ─► admit ─► Door::serve
//!             (trusted        (per source,                (a place, or wait
//!              peers only)     unauthenticated)            until the deadline)
//!                 └──────────────────┴──────────────────────────┴─► Door::turn_away
//! ```
//!
//! What differs between listeners is only what they serve and how they
//! word a refusal (an ErrorResponse, an HTTP status): the [`Door`] trait.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::budget::{Full, Ticket};
use crate::clients::ClientHandle;
use crate::proxied::{HeaderReads, HeaderRefusal, ProxyProtocolFrom};
use crate::proxy::Proxy;
use crate::transport::Transport;

/// A listener behind the front door: what it serves, and how it tells a
/// connection it was turned away.
pub trait Door: Send + Sync + 'static {
    /// The proxy whose budget, client registry, drain and logs it uses.
    fn proxy(&self) -> &Arc<Proxy>;

    /// What its connections are registered as.
    fn transport(&self) -> Transport;

    /// The rules in force for a connection accepted now.
    fn entry_rules(&self) -> EntryRules;

    /// The span a connection's task runs in, from its first byte.
    fn span(&self, peer: SocketAddr, relayed_by: Option<IpAddr>) -> tracing::Span;

    /// Serves a connection that holds its place, to its end.
    fn serve(self: Arc<Self>, guest: Guest) -> impl Future<Output = ()> + Send + 'static;

    /// Tells a connection why it was turned away (the front door has
    /// logged it), and closes it.
    fn turn_away(
        self: Arc<Self>,
        tcp: TcpStream,
        why: TurnedAway,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// How a listener lets connections in.
#[derive(Debug, Clone)]
pub struct EntryRules {
    /// Peers (load balancers) whose connections begin with a PROXY
    /// protocol v2 header naming the client.
    pub proxy_protocol_from: ProxyProtocolFrom,
    /// Time a connection has to send its PROXY header, and then to get a
    /// place in the budget; the second span is the [`Guest::deadline`].
    pub timeout: Duration,
}

/// A connection the front door let in.
pub struct Guest {
    /// The connection.
    pub tcp: TcpStream,
    /// The client's address (the one a PROXY header named, if one did).
    pub peer: SocketAddr,
    /// The balancer whose PROXY header named `peer`.
    pub relayed_by: Option<IpAddr>,
    /// When the client's wait for a place began plus the entry timeout:
    /// the Postgres listener's deadline to authenticate.
    pub deadline: Instant,
    /// Its place in the connection budget.
    pub ticket: Ticket,
    /// Its entry in the client registry.
    pub client: ClientHandle,
    /// The span its log lines go in ([`Door::span`]). The door enters it
    /// where it logs, not on every poll: a span entered per poll costs
    /// more than a pooled transaction's own work.
    pub span: tracing::Span,
}

/// Why the front door turned a connection away.
#[derive(Debug, thiserror::Error)]
pub enum TurnedAway {
    /// The budget had no place for it (in time).
    #[error(transparent)]
    Full(#[from] Full),
    /// A trusted balancer sent no usable PROXY header.
    #[error(transparent)]
    ProxyHeader(#[from] HeaderRefusal),
}

/// Accepts connections on `listener` until the proxy's drain starts, each
/// let in (or turned away) and served as a task of the drain.
pub async fn serve<D: Door>(door: Arc<D>, listener: TcpListener) {
    let proxy = Arc::clone(door.proxy());
    let drain = proxy.drain();
    let headers = Arc::new(HeaderReads::default());
    loop {
        let (tcp, peer) = tokio::select! {
            () = drain.draining() => return,
            accepted = accept(&listener) => accepted,
        };
        let rules = door.entry_rules();
        let proxied = rules.proxy_protocol_from.contains(peer.ip());
        let arrival = Box::new(Arrival {
            tcp,
            peer,
            timeout: rules.timeout,
            headers: proxied.then(|| Arc::clone(&headers)),
        });
        drain.spawn_client(enter(Arc::clone(&door), arrival));
    }
}

/// A connection just accepted: what letting it in takes.
struct Arrival {
    tcp: TcpStream,
    /// Its peer: the client, or a trusted balancer.
    peer: SocketAddr,
    /// The entry timeout ([`EntryRules::timeout`]).
    timeout: Duration,
    /// Where the PROXY headers of trusted balancers are read, when the
    /// peer is one.
    headers: Option<Arc<HeaderReads>>,
}

/// A connection's task: let in, then served to its end.
///
/// Every idle client holds this future for its life, so it holds
/// nothing of the way in once the client is in: the arrival comes boxed
/// (an async fn keeps its arguments for its whole life), and the entry's
/// own state lives in [`admit`]'s future, gone before serving starts.
async fn enter<D: Door>(door: Arc<D>, arrival: Box<Arrival>) {
    // Not `if let`: its scrutinee would live, in this future, as long
    // as the session.
    let Some(guest) = admit(&door, arrival).await else {
        return;
    };
    door.serve(guest).await;
}

/// Reads a trusted balancer's PROXY header, then takes the connection
/// into the budget and the client registry; `None` when it was turned
/// away (no usable header, or no place within the entry timeout).
async fn admit<D: Door>(door: &Arc<D>, arrival: Box<Arrival>) -> Option<Guest> {
    let Arrival {
        mut tcp,
        peer,
        timeout,
        headers,
    } = *arrival;
    let (client, relayed_by) = match headers {
        None => (peer, None),
        Some(headers) => match headers.client_address(&mut tcp, peer, timeout).await {
            Ok(client) => (client, Some(peer.ip())),
            Err(refusal) => {
                turn_away(Arc::clone(door), tcp, peer, refusal.into()).await;
                return None;
            }
        },
    };
    let span = door.span(client, relayed_by);
    let entry = match door.proxy().budget().enter(client.ip()) {
        Ok(entry) => entry,
        Err(full) => {
            turn_away(Arc::clone(door), tcp, client, full.into()).await;
            return None;
        }
    };
    let registered = door.proxy().clients().register(client, door.transport());
    let deadline = Instant::now() + timeout;
    let ticket = match entry.admit(deadline).await {
        Ok(ticket) => ticket,
        Err(full) => {
            turn_away(Arc::clone(door), tcp, client, full.into()).await;
            return None;
        }
    };
    Some(Guest {
        tcp,
        peer: client,
        relayed_by,
        deadline,
        ticket,
        client: registered,
        span,
    })
}

/// Logs why `peer` was turned away (refusals share one rate limit) and
/// lets the door tell it.
async fn turn_away<D: Door>(door: Arc<D>, tcp: TcpStream, peer: SocketAddr, why: TurnedAway) {
    door.proxy().log_refusal(peer, &why);
    door.turn_away(tcp, why).await;
}

/// The next connection; accept errors (EMFILE and friends) are logged and
/// retried after a short pause instead of spinning or ending the listener.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
