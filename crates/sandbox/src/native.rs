//! The native identity library (`native/authgres.c`) built for the
//! sandbox's server, so that clusters, and through them the tests and
//! `authgres demo`, get the native identity path where it can be had.
//!
//! It builds with PGXS against the server's own `pg_config` into a cache
//! directory under the system's temporary directory (never into the
//! server's directories), once per content: the directory is named after a
//! hash of the source, the Makefile and `pg_config --version`. Parallel
//! test processes wait on a file lock for the first one's build. The
//! source is compiled into this crate, so an installed `authgres` binary
//! builds it too. A server without `pg_config` or without its headers
//! (the relocatable npm builds; Debian without `postgresql-server-dev-N`)
//! gets no library, and init-db then installs the portable path.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The library's source.
const SOURCE: &str = include_str!("../../../native/authgres.c");
/// Its PGXS Makefile.
const MAKEFILE: &str = include_str!("../../../native/Makefile");
/// The file `make` produces, which `dynamic_library_path` must find.
const LIBRARY: &str = "authgres.so";

/// The directory holding `authgres.so` built for the server in `bindir`,
/// building it first if needed; `None` when that server has no
/// `pg_config`, no headers or no compiler (the reason is logged).
pub fn library_dir(bindir: &Path) -> anyhow::Result<Option<PathBuf>> {
    // The server's own directory: `bindir` may hold symlinks to it.
    let server = std::fs::canonicalize(bindir.join("postgres"))
        .with_context(|| format!("resolving {}", bindir.join("postgres").display()))?;
    let pg_config = server.with_file_name("pg_config");
    if !pg_config.is_file() {
        tracing::info!(bindir = %bindir.display(), "no pg_config: the portable identity path only");
        return Ok(None);
    }
    let headers = PathBuf::from(pg_config_output(&pg_config, "--includedir-server")?);
    if !headers.join("postgres.h").is_file() {
        tracing::info!(
            headers = %headers.display(),
            "no server headers (Debian: postgresql-server-dev-N): the portable identity path only"
        );
        return Ok(None);
    }
    let cc = pg_config_output(&pg_config, "--cc")?;
    let compiler = cc.split_whitespace().next().unwrap_or("cc").to_owned();
    for program in [compiler.as_str(), "make"] {
        if !on_path(program) {
            tracing::warn!(program, "not installed: the portable identity path only");
            return Ok(None);
        }
    }
    let version = pg_config_output(&pg_config, "--version")?;
    let root = std::env::temp_dir().join("authgres-native");
    create_readable_dir(&root)?;
    let dir = root.join(content_key(&version));
    if dir.join(LIBRARY).is_file() {
        return Ok(Some(dir));
    }
    let lock = std::fs::File::create(root.join(".lock"))
        .with_context(|| format!("creating {}", root.join(".lock").display()))?;
    lock.lock().context("taking the native build lock")?;
    if !dir.join(LIBRARY).is_file() {
        build(&pg_config, &dir)?;
    }
    let _ = lock.unlock();
    Ok(Some(dir))
}

/// Builds into a scratch directory and renames it to `dir` when done, so
/// a directory named `dir` always holds a complete build.
fn build(pg_config: &Path, dir: &Path) -> anyhow::Result<()> {
    let scratch = dir.with_extension(format!("build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    create_readable_dir(&scratch)?;
    std::fs::write(scratch.join("authgres.c"), SOURCE)?;
    std::fs::write(scratch.join("Makefile"), MAKEFILE)?;
    let started = std::time::Instant::now();
    let output = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&scratch)
        .arg(format!("PG_CONFIG={}", pg_config.display()))
        // No LLVM bitcode: the sandbox does not install, and it needs clang.
        .arg("with_llvm=no")
        .output()
        .context("running make for the native identity library")?;
    if !output.status.success() {
        bail!(
            "building native/authgres.c with {} failed:\n{}{}",
            pg_config.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The server may run as another OS user (root runs it as postgres).
    std::fs::set_permissions(
        scratch.join(LIBRARY),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    std::fs::rename(&scratch, dir)
        .with_context(|| format!("moving the native build to {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), elapsed = ?started.elapsed(), "built the native identity library");
    Ok(())
}

/// A short hex digest naming one build: same inputs, same directory.
fn content_key(version: &str) -> String {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in [version, SOURCE, MAKEFILE] {
        context.update(part.as_bytes());
        context.update(&[0]);
    }
    context.finish().as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `pg_config OPTION`, trimmed.
fn pg_config_output(pg_config: &Path, option: &str) -> anyhow::Result<String> {
    let output = Command::new(pg_config)
        .arg(option)
        .output()
        .with_context(|| format!("running {} {option}", pg_config.display()))?;
    if !output.status.success() {
        bail!("{} {option} failed", pg_config.display());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Creates `dir` (and parents) readable and searchable by every user.
fn create_readable_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Another user's directory keeps its mode; it must already be usable.
    let _ = std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    Ok(())
}

/// Whether `program` is found on PATH (or is a path that exists).
fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
