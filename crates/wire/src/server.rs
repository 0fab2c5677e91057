//! The TCP listener: accepts clients up to the connection limit and runs a
//! session task for each, until the proxy drains. A connection from a peer
//! in `proxy_protocol_from` first has its PROXY header read ([`proxied`]),
//! and is admitted and served as the client the header names.
//!
//! [`proxied`]: crate::proxied

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::error::SessionError;
use crate::proxied::HeaderReads;
use crate::proxy::Proxy;
use crate::session::refuse;

/// Accepts connections on `listener` until the proxy's drain starts; the
/// sessions it started run on as tasks of the drain.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) {
    let headers = Arc::new(HeaderReads::default());
    loop {
        let (tcp, peer) = tokio::select! {
            () = proxy.drain().draining() => return,
            accepted = accept(&listener) => accepted,
        };
        let settings = proxy.settings();
        if !settings.config.proxy_protocol_from.contains(peer.ip()) {
            let session = enter(&proxy, tcp, peer, None);
            proxy.drain().spawn_client(session);
            continue;
        }
        let timeout = settings.config.auth_timeout;
        let session = {
            let (proxy, headers) = (Arc::clone(&proxy), Arc::clone(&headers));
            async move {
                let mut tcp = tcp;
                match headers.client_address(&mut tcp, peer, timeout).await {
                    Ok(client) => enter(&proxy, tcp, client, Some(peer.ip())).await,
                    Err(refusal) => {
                        proxy.log_refusal(peer, &refusal);
                        let error = SessionError::ProxyHeader(refusal);
                        proxy.metrics().login(crate::Transport::Wire, Err(&error));
                        refuse(&mut tcp, &error).await;
                    }
                }
            }
        };
        proxy.drain().spawn_client(session);
    }
}

/// Takes the connection of `client` (relayed by a balancer at
/// `relayed_by`, if one sent a PROXY header) into the budget and serves
/// it, or tells it there is no room.
fn enter(
    proxy: &Arc<Proxy>,
    tcp: TcpStream,
    client: SocketAddr,
    relayed_by: Option<IpAddr>,
) -> impl Future<Output = ()> + Send + 'static {
    let entered = proxy.budget().enter(client.ip());
    let proxy = Arc::clone(proxy);
    async move {
        match entered {
            Ok(entry) => proxy.serve_tcp(tcp, client, relayed_by, entry).await,
            Err(full) => {
                proxy.log_refusal(client, &full);
                let error = SessionError::TooManyConnections;
                proxy.metrics().login(crate::Transport::Wire, Err(&error));
                let mut tcp = tcp;
                refuse(&mut tcp, &error).await;
            }
        }
    }
}

/// The next connection; accept errors (EMFILE and friends) are logged and
/// retried after a short pause instead of spinning or ending the listener.
pub async fn accept(listener: &TcpListener) -> (tokio::net::TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
