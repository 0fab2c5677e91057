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
//!
//! Whoever holds the listening sockets sees every client's token, so the
//! handover socket is the proxy's user's alone: mode 0600 from the moment
//! it exists ([`PrivateSocket`]), and each side checks that the other runs
//! as the same user (SO_PEERCRED) before anything is handed over.

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
use tokio::io::AsyncReadExt as _;

/// Most listeners handed over (wire, HTTP, admin).
const MAX_LISTENERS: usize = 3;
/// How long either side waits for the other.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// What the new process sends once it accepts on the sockets.
const READY: &[u8] = b"ready";
/// How long to wait before accepting again after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

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
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(error) => {
            return Err(error).with_context(|| format!("connecting to {}", path.display()));
        }
    };
    same_user(&stream).with_context(|| format!("the process serving {}", path.display()))?;
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

/// Serves the handover path for the next process: hands it the listeners
/// when it asks, and only to a process of this one's user.
pub struct Offer {
    socket: PrivateSocket,
}

impl Offer {
    /// Binds `path`, owner-only; fails when it cannot (a missing
    /// directory, another process serving it), so a restart path that
    /// would not work is noticed at start.
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        let socket = PrivateSocket::bind(path, false)
            .with_context(|| format!("[listen] handover_socket {}", path.display()))?;
        Ok(Self { socket })
    }

    /// Hands `listeners` (role and socket) to the first process that asks
    /// and says it accepts on them; returns then, with the path removed,
    /// so the caller can drain. A caller that stops waiting (a drain)
    /// drops the offer, which closes the socket and removes the path.
    pub async fn serve(self, listeners: Vec<(String, OwnedFd)>) {
        loop {
            let mut stream = match self.socket.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, most likely: try again soon.
                    tracing::warn!(%error, "accepting on the handover socket failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            };
            match hand_over(&mut stream, &listeners).await {
                Ok(()) => {
                    self.socket.remove();
                    return;
                }
                // Another user, or a successor that failed to start: keep
                // serving, and offer again to the next one.
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "the listeners were not handed over; still serving"
                ),
            }
        }
    }
}

/// One handover, on a connection from a would-be successor.
async fn hand_over(
    stream: &mut tokio::net::UnixStream,
    listeners: &[(String, OwnedFd)],
) -> anyhow::Result<()> {
    same_user(&*stream).context("a process asked for the listeners")?;
    let names: Vec<&str> = listeners.iter().map(|(role, _)| role.as_str()).collect();
    let names = names.join(",");
    let send = stream.async_io(tokio::io::Interest::WRITABLE, || {
        let fds: Vec<_> = listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        rustix::net::sendmsg(
            &*stream,
            &[IoSlice::new(names.as_bytes())],
            &mut control,
            SendFlags::empty(),
        )
        .map_err(std::io::Error::from)
    });
    let sent = tokio::time::timeout(STEP_TIMEOUT, send)
        .await
        .context("handing the listeners over: no progress")?
        .context("handing the listeners over")?;
    anyhow::ensure!(sent == names.len(), "the listener names were cut short");
    let mut answer = [0u8; READY.len()];
    tokio::time::timeout(STEP_TIMEOUT, stream.read_exact(&mut answer))
        .await
        .context("the new process did not say it accepts")?
        .context("the new process did not say it accepts")?;
    anyhow::ensure!(answer == READY, "the new process answered something else");
    Ok(())
}

/// Fails unless the process at the other end of `socket` runs as this
/// process's user (SO_PEERCRED): another local user must not take the
/// listeners, nor hand this process sockets of its choosing.
fn same_user(socket: impl AsFd) -> anyhow::Result<()> {
    let peer = rustix::net::sockopt::socket_peercred(socket).context("SO_PEERCRED")?;
    let me = rustix::process::geteuid();
    anyhow::ensure!(
        peer.uid == me,
        "its user (uid {}) is not this process's (uid {}): refused",
        peer.uid.as_raw(),
        me.as_raw()
    );
    Ok(())
}

/// A listening Unix socket that only this process's user can connect to,
/// removed from the file system when dropped (unless another process has
/// put its own socket at the path since).
pub struct PrivateSocket {
    /// The socket.
    pub listener: tokio::net::UnixListener,
    path: PathBuf,
    /// Device and inode of what was bound: what `remove` may unlink.
    id: (u64, u64),
}

impl PrivateSocket {
    /// Binds a socket at `path`, mode 0600 from the moment it is
    /// reachable: it is bound in a new 0700 directory beside `path`, made
    /// owner-only, then renamed into place, so no umask and no moment
    /// leaves it open to other users. A stale socket at `path` (nobody
    /// answering) is replaced; a live one is an error unless `take_over`
    /// (this process replaces the one serving it).
    pub fn bind(path: &Path, take_over: bool) -> anyhow::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
        let name = path
            .file_name()
            .with_context(|| format!("{} names no file", path.display()))?;
        anyhow::ensure!(
            take_over || UnixStream::connect(path).is_err(),
            "another process serves {}",
            path.display()
        );
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|error| anyhow::anyhow!("randomness: {error}"))?;
        let private = parent.join(format!(".authgres-{}", hex::encode(nonce)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .with_context(|| format!("creating {}", private.display()))?;
        let staged = private.join(name);
        let bound = (|| -> std::io::Result<UnixListener> {
            // A umask may have taken the owner's bits too.
            std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
            let listener = UnixListener::bind(&staged)?;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&staged, path)?;
            Ok(listener)
        })();
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir(&private);
        let listener = bound.with_context(|| format!("listening on {}", path.display()))?;
        let bound = std::fs::symlink_metadata(path)
            .with_context(|| format!("reading back {}", path.display()))?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener: tokio::net::UnixListener::from_std(listener)?,
            path: path.to_owned(),
            id: (bound.dev(), bound.ino()),
        })
    }

    /// Where it is bound.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unlinks the path if it is still this socket.
    fn remove(&self) {
        use std::os::unix::fs::MetadataExt as _;
        if let Ok(found) = std::fs::symlink_metadata(&self.path)
            && (found.dev(), found.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for PrivateSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Takes `path` once the old process has let go of it (it unlinks it when
/// it starts draining), for the next restart.
pub fn wait_free(path: &Path) {
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    while path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}
