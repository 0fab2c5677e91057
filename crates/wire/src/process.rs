//! The process's own metrics, under the names every Prometheus client
//! library uses (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_open_fds`, ...), read from `/proc/self` at scrape time: nothing
//! runs between scrapes. Where `/proc` is missing (not Linux), only the
//! start time is reported.
//!
//! Reference: `proc(5)`, the `stat`, `status`, `fd` and `limits` entries.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::metrics::emit;

/// Clock ticks per second of the times in `/proc/self/stat`: `USER_HZ`,
/// which Linux fixes at 100 for user space on every architecture it runs
/// on (whatever the kernel's own `HZ`).
const USER_HZ: f64 = 100.0;

/// Reads the process's resources when Prometheus asks.
#[derive(Debug)]
pub(crate) struct Process {
    /// When the process started, as seconds since the epoch.
    started: f64,
}

impl Process {
    /// A collector for this process, which started about now (the
    /// registry is built at start).
    pub(crate) fn started_now() -> Self {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        Self { started }
    }
}

/// `utime + stime` from `/proc/self/stat`, in seconds.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields from the last ')'.
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = after.split_whitespace();
    // After the name: state (3), ..., utime (14), stime (15).
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// A `kB` line of `/proc/self/status` (`VmRSS`, `VmSize`), in bytes.
fn status_bytes(status: &str, name: &str) -> Option<i64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    let kib: i64 = line
        .get(name.len()..)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib.saturating_mul(1024))
}

/// Open file descriptors, counted in `/proc/self/fd`.
fn open_fds() -> Option<i64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    // One of them is the directory being read.
    Some(
        i64::try_from(entries.count())
            .unwrap_or(i64::MAX)
            .saturating_sub(1),
    )
}

/// The soft limit on open files, from `/proc/self/limits`.
fn max_fds() -> Option<i64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.get("Max open files".len()..)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl prometheus_client::collector::Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        emit(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            &ConstGauge::new(self.started),
        )?;
        if let Some(cpu) = cpu_seconds() {
            emit(
                &mut encoder,
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                &ConstCounter::new(cpu),
            )?;
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        for (name, field, help) in [
            (
                "process_resident_memory_bytes",
                "VmRSS:",
                "Resident memory size, in bytes",
            ),
            (
                "process_virtual_memory_bytes",
                "VmSize:",
                "Virtual memory size, in bytes",
            ),
        ] {
            if let Some(bytes) = status_bytes(&status, field) {
                emit(&mut encoder, name, help, &ConstGauge::new(bytes))?;
            }
        }
        if let Some(fds) = open_fds() {
            emit(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                &ConstGauge::new(fds),
            )?;
        }
        if let Some(fds) = max_fds() {
            emit(
                &mut encoder,
                "process_max_fds",
                "Most file descriptors the process may open",
                &ConstGauge::new(fds),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_reads_what_the_process_holds() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            eprintln!("skipped: no /proc here");
            return;
        }
        assert!(cpu_seconds().is_some_and(|cpu| cpu >= 0.0));
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        assert!(status_bytes(&status, "VmRSS:").is_some_and(|rss| rss > 1024 * 1024));
        // Standard input, output and error at least.
        let open = open_fds().expect("fds");
        assert!(open >= 3, "{open}");
        assert!(max_fds().is_some_and(|max| max >= open));
    }
}
