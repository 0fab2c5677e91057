//! Restarting on one host without refusing a connection: the running
//! process hands its listening sockets to its successor over a Unix
//! socket (`[listen] handover_socket`), then drains.
//!
//! ```text
//! new process                         old process
//!   connect(handover_socket) ───────►  accept
//!                            ◄───────  the listeners' fds (SCM_RIGHTS)
//!   accept on them (both serve)
//!   "ready" ────────────────────────►  unlink the path, start draining
//!                            ◄───────  close
//!   bind handover_socket for the next one
//! ```
//!
//! The sockets themselves move, not copies bound to the same port, so the
//! connections queued in their backlog are accepted by the new process:
//! nothing queued is reset when the old one stops accepting (as it would
//! be with two SO_REUSEPORT sockets when one of them closes).

use std::io::{IoSlice, IoSliceMut, Read as _, Write as _};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Most listeners handed over (wire, HTTP, admin).
const MAX_LISTENERS: usize = 3;
/// How long either side waits for the other.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// What the new process sends once it accepts on the sockets.
const READY: &[u8] = b"ready";

/// Listeners by role, as handed over.
pub struct Inherited {
    /// (role, listener): `wire`, `http`, `admin`.
    pub listeners: Vec<(String, std::net::TcpListener)>,
    /// The old process, waiting for [`Inherited::ready`].
    stream: UnixStream,
}

impl Inherited {
    /// Takes the listener handed over for `role`.
    pub fn take(&mut self, role: &str) -> Option<std::net::TcpListener> {
        let at = self.listeners.iter().position(|(r, _)| r == role)?;
        Some(self.listeners.remove(at).1)
    }

    /// Tells the old process the new one accepts now; returns once it has
    /// let go of the handover path (or stopped answering).
    pub fn ready(mut self) {
        if let Err(error) = self.stream.write_all(READY) {
            tracing::warn!(%error, "could not tell the old process to drain");
            return;
        }
        let mut rest = Vec::new();
        let _ = self.stream.read_to_end(&mut rest);
    }
}

/// Asks the process serving `path` for its listeners; `None` when none
/// answers (the first start, or the old process is gone).
pub fn inherit(path: &Path) -> anyhow::Result<Option<Inherited>> {
    let stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(_) => return Ok(None),
    };
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    let mut names = [0u8; 256];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut names)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .context("receiving the listeners from the running process")?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    let names = std::str::from_utf8(names.get(..received.bytes).unwrap_or_default())
        .context("the running process sent no listener names")?;
    let roles: Vec<&str> = names.split(',').filter(|r| !r.is_empty()).collect();
    anyhow::ensure!(
        roles.len() == fds.len(),
        "the running process sent {} names for {} sockets",
        roles.len(),
        fds.len()
    );
    let listeners = roles
        .into_iter()
        .zip(fds)
        .map(|(role, fd)| (role.to_owned(), std::net::TcpListener::from(fd)))
        .collect();
    Ok(Some(Inherited { listeners, stream }))
}

/// Serves `path` for the next process: hands it `listeners` (role and
/// socket) when it asks, and returns once it is ready, so the caller can
/// drain.
pub async fn offer(path: PathBuf, listeners: Vec<(String, OwnedFd)>) -> anyhow::Result<()> {
    // A path left by a process that died is in the way of bind.
    if path.exists() && UnixStream::connect(&path).is_err() {
        std::fs::remove_file(&path)
            .with_context(|| format!("removing the stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("listening for a successor on {}", path.display()))?;
    let offered = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        loop {
            let (mut stream, _) = listener.accept()?;
            stream.set_read_timeout(Some(STEP_TIMEOUT))?;
            stream.set_write_timeout(Some(STEP_TIMEOUT))?;
            let names: Vec<&str> = listeners.iter().map(|(role, _)| role.as_str()).collect();
            let names = names.join(",");
            let fds: Vec<_> = listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            control.push(SendAncillaryMessage::ScmRights(&fds));
            if let Err(error) = rustix::net::sendmsg(
                &stream,
                &[IoSlice::new(names.as_bytes())],
                &mut control,
                SendFlags::empty(),
            ) {
                tracing::warn!(%error, "handing the listeners over failed");
                continue;
            }
            let mut answer = [0u8; READY.len()];
            match stream.read_exact(&mut answer) {
                Ok(()) if answer == READY => {
                    let _ = std::fs::remove_file(&path);
                    return Ok(());
                }
                // The successor failed to start: keep serving, and offer
                // again to the next one.
                _ => tracing::warn!("the new process did not take over; still serving"),
            }
        }
    });
    offered.await.context("the handover task")?
}

/// Takes `path` once the old process has let go of it (it unlinks it when
/// it starts draining), for the next restart.
pub fn wait_free(path: &Path) {
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    while path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}
