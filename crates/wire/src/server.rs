//! The TCP listener: accepts clients up to the connection limit and runs a
//! session task for each, until the proxy drains.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::error::SessionError;
use crate::session::{Proxy, refuse};

/// Accepts connections on `listener` until the proxy's drain starts; the
/// sessions it started run on as tasks of the drain.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = proxy.drain().draining() => return,
            accepted = accept(&listener) => accepted,
        };
        match proxy.budget().enter(peer.ip()) {
            Ok(entry) => {
                let session = Arc::clone(&proxy).serve_tcp(tcp, peer, entry);
                proxy.drain().spawn_client(session);
            }
            Err(full) => {
                proxy.log_refusal(peer, &full);
                let error = SessionError::TooManyConnections;
                proxy.metrics().login(crate::Transport::Wire, Err(&error));
                proxy.drain().spawn_client(async move {
                    let mut tcp = tcp;
                    refuse(&mut tcp, &error).await;
                });
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
