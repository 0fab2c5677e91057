//! The TCP listener: accepts clients up to the connection limit and runs a
//! session task for each until shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::error::SessionError;
use crate::session::{Proxy, refuse};

/// Accepts connections on `listener` until `shutdown` completes.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = accept(&listener) => accepted,
        };
        match proxy.budget().enter(peer.ip()) {
            Ok(entry) => {
                tokio::spawn(Arc::clone(&proxy).serve_tcp(tcp, peer, entry));
            }
            Err(full) => {
                proxy.log_refusal(peer, &full);
                tokio::spawn(async move {
                    let mut tcp = tcp;
                    refuse(&mut tcp, &SessionError::TooManyConnections).await;
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
