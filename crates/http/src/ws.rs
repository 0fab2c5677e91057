//! The Postgres protocol over WebSocket (`/v2`, the Neon serverless
//! driver's `Pool` and `Client`) as a plain byte stream.
//!
//! Frames are not reassembled into messages: the payload of each data
//! frame (binary, text or continuation) is handed on as it arrives, and
//! each write becomes one binary frame of at most [`MAX_FRAME`] bytes. So a
//! connection never holds more than a small read buffer, however large the
//! frames a client announces, before or after it authenticates; Postgres
//! message boundaries are the session's business, not the transport's.
//! Pings are answered, from the read side too, so an idle session answers
//! them; only the latest unanswered ping is kept. A Close is echoed and
//! ends the stream. Headers are
//! parsed by tungstenite's [`FrameHeader`]
//! ([RFC 6455](https://www.rfc-editor.org/rfc/rfc6455)).

use std::io::{self, Cursor};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// Largest frame the proxy writes.
pub const MAX_FRAME: usize = 64 * 1024;
/// The read buffer: headers and control frames, and data arriving with
/// them.
const READ_BUFFER: usize = 4 * 1024;
/// Largest control frame payload (RFC 6455, 5.5).
const MAX_CONTROL: u64 = 125;
/// The GUID that makes a `Sec-WebSocket-Accept`.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` answering a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{GUID}").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// A data frame being read: what is left of its payload, and its mask.
#[derive(Debug, Clone, Copy)]
struct Incoming {
    remaining: u64,
    mask: [u8; 4],
    /// Payload bytes unmasked so far (the mask repeats every four).
    offset: usize,
}

/// A WebSocket as a byte stream (see the module docs).
pub struct WsStream<IO> {
    io: IO,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    frame: Option<Incoming>,
    /// The client sent Close (or broke the protocol): reads end.
    read_closed: bool,
    /// Control frames being sent, between data frames: at most a pong and
    /// the Close.
    control: Vec<u8>,
    /// The payload of the latest ping not yet answered. Only the latest is
    /// kept (RFC 6455, 5.5.3): a client that pings and never reads cannot
    /// make the proxy queue pongs.
    pong: Option<Vec<u8>>,
    /// Header of the data frame being written, and how much of it is out.
    header: [u8; 10],
    header_len: usize,
    header_sent: usize,
    /// Payload bytes the current outgoing frame still needs.
    write_remaining: usize,
    close_queued: bool,
}

impl<IO> WsStream<IO> {
    /// A stream over an upgraded connection.
    pub fn new(io: IO) -> Self {
        Self {
            io,
            buf: vec![0; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            frame: None,
            read_closed: false,
            control: Vec::new(),
            pong: None,
            header: [0; 10],
            header_len: 0,
            header_sent: 0,
            write_remaining: 0,
            close_queued: false,
        }
    }

    fn buffered(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or_default()
    }

    /// Queues a control frame (server frames are not masked).
    fn queue_control(&mut self, control: Control, payload: &[u8]) {
        let header = FrameHeader {
            opcode: OpCode::Control(control),
            ..FrameHeader::default()
        };
        let length = u64::try_from(payload.len()).unwrap_or(MAX_CONTROL);
        if header.format(length, &mut self.control).is_ok() {
            self.control.extend_from_slice(payload);
        }
    }
}

fn protocol_error(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl<IO: AsyncRead + Unpin> WsStream<IO> {
    /// Reads more into the buffer; `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        let free = self.buf.get_mut(self.end..).unwrap_or_default();
        if free.is_empty() {
            return Poll::Ready(Err(protocol_error("a WebSocket header that does not fit")));
        }
        let mut read = ReadBuf::new(free);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        self.end += n;
        Poll::Ready(Ok(n))
    }

    /// Reads the next frame header and handles control frames; returns
    /// `Ok(false)` when the stream has ended.
    fn poll_header(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            let mut cursor = Cursor::new(self.buffered());
            let parsed = FrameHeader::parse(&mut cursor)
                .map_err(|_| protocol_error("a malformed WebSocket frame header"))?;
            let Some((header, length)) = parsed else {
                if ready!(self.poll_fill(cx))? == 0 {
                    return Poll::Ready(Ok(false));
                }
                continue;
            };
            let used = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Poll::Ready(Err(protocol_error(
                    "a WebSocket extension nobody agreed on",
                )));
            }
            let Some(mask) = header.mask else {
                return Poll::Ready(Err(protocol_error("an unmasked client frame")));
            };
            let control = match header.opcode {
                OpCode::Data(Data::Binary | Data::Text | Data::Continue) => {
                    self.start += used;
                    self.frame = Some(Incoming {
                        remaining: length,
                        mask,
                        offset: 0,
                    });
                    return Poll::Ready(Ok(true));
                }
                OpCode::Control(control @ (Control::Ping | Control::Pong | Control::Close)) => {
                    control
                }
                _ => return Poll::Ready(Err(protocol_error("a reserved WebSocket opcode"))),
            };
            if length > MAX_CONTROL || !header.is_final {
                return Poll::Ready(Err(protocol_error("an oversized control frame")));
            }
            let total = used + usize::try_from(length).unwrap_or(usize::MAX);
            if self.buffered().len() < total {
                if ready!(self.poll_fill(cx))? == 0 {
                    return Poll::Ready(Ok(false));
                }
                continue;
            }
            let mut payload = self
                .buffered()
                .get(used..total)
                .unwrap_or_default()
                .to_vec();
            unmask(&mut payload, mask, 0);
            self.start += total;
            match control {
                Control::Ping if !self.close_queued => self.pong = Some(payload),
                Control::Close => {
                    if !self.close_queued {
                        self.close_queued = true;
                        // Nothing follows a Close.
                        self.pong = None;
                        self.queue_control(Control::Close, payload.get(..2).unwrap_or_default());
                    }
                    self.read_closed = true;
                    return Poll::Ready(Ok(false));
                }
                _ => {}
            }
        }
    }
}

/// Unmasks `bytes`, which start `offset` bytes into a frame's payload.
fn unmask(bytes: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte ^= mask.get((offset + i) % 4).copied().unwrap_or(0);
    }
}

/// A WebSocket may hold a frame's bytes it has read: it cannot tell.
impl<IO> authgres_wire::ReadHint for WsStream<IO> {}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<IO> {
    /// Reads payload bytes; pings that arrive are answered from here too,
    /// between data frames, so an idle session (one that only reads)
    /// answers them. So read and write from one task, as the session does.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = self.poll_read_payload(cx, out);
        let this = &mut *self;
        if this.write_remaining == 0 && (this.pong.is_some() || !this.control.is_empty()) {
            let answered = this.poll_control(cx);
            if let Poll::Ready(Ok(())) = answered {
                // A TLS stream holds what it was given until flushed.
                let _ = Pin::new(&mut this.io).poll_flush(cx);
            }
            if let (Poll::Pending, Poll::Ready(Err(error))) = (&read, answered) {
                return Poll::Ready(Err(error));
            }
        }
        read
    }
}

impl<IO: AsyncRead + Unpin> WsStream<IO> {
    /// Reads payload bytes of data frames, handling control frames met on
    /// the way.
    fn poll_read_payload(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            let Some(mut frame) = this.frame.filter(|frame| frame.remaining > 0) else {
                this.frame = None;
                if !ready!(this.poll_header(cx))? {
                    this.read_closed = true;
                }
                continue;
            };
            let want = usize::try_from(frame.remaining)
                .unwrap_or(usize::MAX)
                .min(out.remaining());
            let n = if this.buffered().is_empty() {
                // Straight from the socket into the caller's buffer.
                let dst = out.initialize_unfilled_to(want);
                let mut read = ReadBuf::new(dst);
                ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
                let n = read.filled().len();
                if n == 0 {
                    this.read_closed = true;
                    return Poll::Ready(Ok(()));
                }
                unmask(
                    dst.get_mut(..n).unwrap_or_default(),
                    frame.mask,
                    frame.offset,
                );
                out.advance(n);
                n
            } else {
                let n = want.min(this.buffered().len());
                let start = out.filled().len();
                out.put_slice(this.buffered().get(..n).unwrap_or_default());
                let filled = out.filled_mut().get_mut(start..).unwrap_or_default();
                unmask(filled, frame.mask, frame.offset);
                this.start += n;
                n
            };
            frame.remaining -= u64::try_from(n).unwrap_or(frame.remaining);
            frame.offset = (frame.offset + n) % 4;
            this.frame = Some(frame);
            return Poll::Ready(Ok(()));
        }
    }
}

impl<IO: AsyncWrite + Unpin> WsStream<IO> {
    /// Sends the pending pong and queued control frames; only between
    /// data frames.
    fn poll_control(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.control.is_empty() {
                let Some(payload) = self.pong.take() else {
                    return Poll::Ready(Ok(()));
                };
                self.queue_control(Control::Pong, &payload);
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.control))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.control.drain(..n);
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WsStream<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_remaining == 0 {
            ready!(this.poll_control(cx))?;
            let length = buf.len().min(MAX_FRAME);
            let header = FrameHeader {
                opcode: OpCode::Data(Data::Binary),
                ..FrameHeader::default()
            };
            let mut cursor = Cursor::new(&mut this.header[..]);
            header
                .format(u64::try_from(length).unwrap_or(0), &mut cursor)
                .map_err(|_| protocol_error("a frame header that does not fit"))?;
            this.header_len = usize::try_from(cursor.position()).unwrap_or(0);
            this.header_sent = 0;
            this.write_remaining = length;
        }
        while this.header_sent < this.header_len {
            let pending = this
                .header
                .get(this.header_sent..this.header_len)
                .unwrap_or_default();
            let n = ready!(Pin::new(&mut this.io).poll_write(cx, pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            this.header_sent += n;
        }
        let payload = buf
            .get(..this.write_remaining.min(buf.len()))
            .unwrap_or_default();
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, payload))?;
        this.write_remaining -= n;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_remaining == 0 {
            ready!(self.poll_control(cx))?;
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_remaining == 0 {
            if !self.close_queued {
                self.close_queued = true;
                self.queue_control(Control::Close, &1000u16.to_be_bytes());
            }
            ready!(self.poll_control(cx))?;
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
