//! The Postgres wire protocol over WebSocket binary frames (`/v2`, the
//! Neon serverless driver's `Pool` and `Client`): the frames are adapted to
//! a byte stream and handed to the same session code as TCP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::ws::{Message, WebSocket};
use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A WebSocket as a byte stream: reads concatenate binary (and text)
/// frames; each write is one binary frame.
pub struct WsStream {
    socket: WebSocket,
    /// Unread rest of the last frame.
    pending: Bytes,
}

impl WsStream {
    /// Wraps an upgraded socket.
    pub fn new(socket: WebSocket) -> Self {
        Self {
            socket,
            pending: Bytes::new(),
        }
    }
}

fn to_io(error: axum::Error) -> io::Error {
    io::Error::other(error)
}

impl AsyncRead for WsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.socket).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Text(text))) => {
                    self.pending = Bytes::from(text.as_str().to_owned())
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(error)) => return Poll::Ready(Err(to_io(error))),
            }
        }
    }
}

impl AsyncWrite for WsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let socket = Pin::new(&mut self.socket);
        ready!(Sink::<Message>::poll_ready(socket, cx)).map_err(to_io)?;
        Pin::new(&mut self.socket)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Sink::<Message>::poll_flush(Pin::new(&mut self.socket), cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Sink::<Message>::poll_close(Pin::new(&mut self.socket), cx).map_err(to_io)
    }
}
