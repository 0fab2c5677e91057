//! The audit log's one writer: a thread of its own that takes finished
//! lines from a bounded queue and appends them to stdout or a file, so a
//! slow disk never stalls a relay.
//!
//! Sessions hand lines over with [`Sink::send`], which never waits: when
//! the queue is full the line is dropped and counted
//! (`authgres_audit_dropped_total`, and a warning, limited). A file is
//! opened in append mode with mode 0600, and opened again by
//! [`Writer::reopen`] on every reload (SIGHUP), so logrotate's
//! `postrotate` can move it away. [`Writer::flush`] waits until every line
//! queued before it is written and flushed: the process calls it last
//! when it exits.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};

use crate::log_limit::LogLimiter;

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// The process's standard output (a container's log).
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

/// How long the writer waits after each batch before it looks at the
/// queue again: lines gather meanwhile, so a busy proxy wakes the thread
/// (a system call in the session that sends) about once per batch, not
/// once per line. A line reaches the output at most this much later.
const LINGER: Duration = Duration::from_millis(5);

/// What the writer thread is asked to do.
enum Message {
    /// One line, newline included.
    Line(Vec<u8>),
    /// Open the output again (it may have been rotated, or changed).
    Reopen(Output),
    /// Answer once everything before this is written and flushed.
    Flush(oneshot::Sender<()>),
}

/// A session's handle on the queue.
#[derive(Clone)]
pub struct Sink {
    queue: mpsc::Sender<Message>,
    counters: Arc<Counters>,
}

/// What the writer and the sinks count.
pub(crate) struct Counters {
    /// Lines written.
    pub(crate) lines: Counter,
    /// Lines lost: the queue was full, or the output failed.
    pub(crate) dropped: Counter,
    /// Warnings about lost lines, limited.
    warnings: LogLimiter,
}

impl Counters {
    pub(crate) fn new(lines: Counter, dropped: Counter) -> Self {
        Self {
            lines,
            dropped,
            warnings: LogLimiter::default(),
        }
    }

    fn lost(&self, why: &'static str) {
        self.dropped.inc();
        if let Some(suppressed) = self.warnings.allow(tokio::time::Instant::now()) {
            tracing::warn!(
                why,
                suppressed,
                dropped_total = self.dropped.get(),
                "audit line dropped"
            );
        }
    }
}

impl Sink {
    /// Queues `line` (a JSON object and its newline) without waiting; a
    /// full queue drops it and counts the loss.
    pub fn send(&self, line: Vec<u8>) {
        match self.queue.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.counters.lost("queue full"),
            Err(mpsc::error::TrySendError::Closed(_)) => self.counters.lost("writer stopped"),
        }
    }

    /// Waits, up to `wait`, until every line queued so far is written and
    /// flushed; whether it was.
    pub async fn flush(&self, wait: Duration) -> bool {
        let (done, flushed) = oneshot::channel();
        let asked = async {
            self.queue.send(Message::Flush(done)).await.ok()?;
            flushed.await.ok()
        };
        matches!(tokio::time::timeout(wait, asked).await, Ok(Some(())))
    }
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").finish_non_exhaustive()
    }
}

/// The running writer thread, through its queue.
pub(crate) struct Writer {
    sink: Sink,
    output: Output,
}

impl Writer {
    /// Opens `output` and starts the writer thread with a queue of
    /// `capacity` lines.
    pub(crate) fn start(
        output: Output,
        capacity: usize,
        counters: Arc<Counters>,
    ) -> io::Result<Self> {
        let target = Target::open(&output)?;
        let (queue, received) = mpsc::channel(capacity.max(1));
        let thread_counters = Arc::clone(&counters);
        std::thread::Builder::new()
            .name("authgres-audit".into())
            .spawn(move || write_lines(received, target, &thread_counters))?;
        Ok(Self {
            sink: Sink { queue, counters },
            output,
        })
    }

    /// A handle for a session.
    pub(crate) fn sink(&self) -> Sink {
        self.sink.clone()
    }

    /// The output it writes to.
    pub(crate) fn output(&self) -> &Output {
        &self.output
    }

    /// Opens `output` again (after a rotation) or anew (a reload moved
    /// it); lines queued before go to the old one. Never waits: with the
    /// queue full, the request waits in a task of its own.
    pub(crate) fn reopen(&mut self, output: Output) {
        self.output = output.clone();
        let message = Message::Reopen(output);
        if let Err(mpsc::error::TrySendError::Full(message)) = self.sink.queue.try_send(message)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let queue = self.sink.queue.clone();
            runtime.spawn(async move {
                let _ = queue.send(message).await;
            });
        }
    }
}

/// The open output.
struct Target {
    out: BufWriter<Box<dyn io::Write + Send>>,
}

impl Target {
    fn open(output: &Output) -> io::Result<Self> {
        let out: Box<dyn io::Write + Send> = match output {
            Output::Stdout => Box::new(io::stdout()),
            Output::File(path) => Box::new(open_file(path)?),
        };
        Ok(Self {
            out: BufWriter::with_capacity(64 * 1024, out),
        })
    }
}

/// Opens `path` for appending, creating it with mode 0600 (an existing
/// file keeps its mode).
fn open_file(path: &Path) -> io::Result<std::fs::File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", path.display())))
}

/// The writer thread: writes what arrives, flushing whenever the queue
/// runs dry (then lingering), until every sender is gone.
fn write_lines(mut received: mpsc::Receiver<Message>, mut target: Target, counters: &Counters) {
    while let Some(message) = received.blocking_recv() {
        let mut next = Some(message);
        while let Some(message) = next.take() {
            handle(message, &mut target, counters);
            next = received.try_recv().ok();
        }
        if let Err(error) = target.out.flush() {
            warn_output(&error);
        }
        std::thread::sleep(LINGER);
    }
    let _ = target.out.flush();
}

fn handle(message: Message, target: &mut Target, counters: &Counters) {
    match message {
        Message::Line(line) => match target.out.write_all(&line) {
            Ok(()) => {
                counters.lines.inc();
            }
            Err(error) => {
                warn_output(&error);
                counters.lost("output failed");
            }
        },
        Message::Reopen(output) => {
            let _ = target.out.flush();
            match Target::open(&output) {
                Ok(opened) => *target = opened,
                Err(error) => tracing::error!(
                    %error,
                    "the audit log could not be opened again: writing on to the old one"
                ),
            }
        }
        Message::Flush(done) => {
            if let Err(error) = target.out.flush() {
                warn_output(&error);
            }
            let _ = done.send(());
        }
    }
}

fn warn_output(error: &io::Error) {
    tracing::warn!(%error, "audit log write failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> Arc<Counters> {
        Arc::new(Counters::new(Counter::default(), Counter::default()))
    }

    #[tokio::test]
    async fn lines_are_appended_to_a_private_file_and_reopened_after_a_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let counters = counters();
        let mut writer =
            Writer::start(Output::File(path.clone()), 8, Arc::clone(&counters)).expect("start");
        writer.sink().send(b"{\"n\":1}\n".to_vec());
        assert!(writer.sink().flush(Duration::from_secs(5)).await);
        let mode = std::fs::metadata(&path).expect("file").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        std::fs::rename(&path, dir.path().join("audit.log.1")).expect("rotate");
        writer.reopen(Output::File(path.clone()));
        writer.sink().send(b"{\"n\":2}\n".to_vec());
        assert!(writer.sink().flush(Duration::from_secs(5)).await);
        let rotated = std::fs::read_to_string(dir.path().join("audit.log.1")).expect("old");
        assert_eq!(rotated, "{\"n\":1}\n");
        assert_eq!(std::fs::read_to_string(&path).expect("new"), "{\"n\":2}\n");
        assert_eq!((counters.lines.get(), counters.dropped.get()), (2, 0));
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let counters = counters();
        let (queue, _held) = mpsc::channel(2);
        let sink = Sink {
            queue,
            counters: Arc::clone(&counters),
        };
        for _ in 0..5 {
            sink.send(b"{}\n".to_vec());
        }
        assert_eq!(counters.dropped.get(), 3);
    }
}
