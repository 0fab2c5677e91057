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
        if !rules.proxy_protocol_from.contains(peer.ip()) {
            let span = door.span(peer, None);
            let entering = let_in(Arc::clone(&door), tcp, peer, None, rules.timeout, span);
            drain.spawn_client(entering);
            continue;
        }
        let (door, headers) = (Arc::clone(&door), Arc::clone(&headers));
        drain.spawn_client(async move {
            let mut tcp = tcp;
            match headers.client_address(&mut tcp, peer, rules.timeout).await {
                Ok(client) => {
                    let span = door.span(client, Some(peer.ip()));
                    let_in(door, tcp, client, Some(peer.ip()), rules.timeout, span).await;
                }
                Err(refusal) => turn_away(door, tcp, peer, refusal.into()).await,
            }
        });
    }
}

/// Takes the connection of `peer` into the budget and the client registry
/// and serves it, or turns it away when there is no place within
/// `timeout`.
async fn let_in<D: Door>(
    door: Arc<D>,
    tcp: TcpStream,
    peer: SocketAddr,
    relayed_by: Option<IpAddr>,
    timeout: Duration,
    span: tracing::Span,
) {
    let entry = match door.proxy().budget().enter(peer.ip()) {
        Ok(entry) => entry,
        Err(full) => return turn_away(door, tcp, peer, full.into()).await,
    };
    let client = door.proxy().clients().register(peer, door.transport());
    let deadline = Instant::now() + timeout;
    let ticket = match entry.admit(deadline).await {
        Ok(ticket) => ticket,
        Err(full) => return turn_away(door, tcp, peer, full.into()).await,
    };
    let guest = Guest {
        tcp,
        peer,
        relayed_by,
        deadline,
        ticket,
        client,
        span,
    };
    door.serve(guest).await;
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
