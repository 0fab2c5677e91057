//! What the suite needs beyond Rust, provisioned on first use so that
//! `cargo nextest run --workspace` passes on a fresh clone.
//!
//! - System packages (the Postgres server, its headers, make and gcc for
//!   the native identity library, the client, a JRE and Debian's pgjdbc,
//!   node and npm, pip, HAProxy): when the suite runs as root and any is
//!   missing, the first test to need them installs all of them with apt;
//!   otherwise every test that needs them fails with the same one line
//!   naming all that is missing and how to install it.
//! - The node drivers (`tests/neon`, `tests/compat/node`): `npm ci` into
//!   their own ignored `node_modules`, pinned by `package-lock.json`.
//! - The Python drivers: `pip install --target` into the target directory,
//!   pinned by `tests/compat/python/requirements.txt`.
//!
//! Every step runs under one file lock, so parallel test processes wait
//! for the first one instead of racing it, and each is skipped when a stamp
//! shows it done for the same lockfile.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where provisioned clients and the lock live (inside `target/`).
fn state_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-clients");
    std::fs::create_dir_all(&dir).expect("create target/tmp/test-clients");
    dir
}

/// Holds the provisioning lock until dropped.
struct Lock(File);

impl Lock {
    fn take() -> Self {
        let file = File::create(state_dir().join(".lock")).expect("provisioning lock file");
        file.lock().expect("take the provisioning lock");
        Self(file)
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// A Debian package the suite needs, and how to tell it is present.
struct Need {
    package: &'static str,
    present: fn() -> bool,
}

fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

const NEEDS: &[Need] = &[
    Need {
        package: "postgresql",
        present: || {
            authgres_sandbox::find_postgres_bindir().is_ok()
                && (!is_root()
                    || nix::unistd::User::from_name("postgres").is_ok_and(|u| u.is_some()))
        },
    },
    // The headers of Debian's default server (postgresql-server-dev-15 on
    // bookworm) and make: the sandbox builds the native identity library
    // with them, so the suite runs the native path where Debian has a
    // server.
    Need {
        package: "postgresql-server-dev-all",
        present: || debian_server_headers() && on_path("make"),
    },
    Need {
        package: "gcc",
        present: || on_path("gcc"),
    },
    Need {
        package: "postgresql-client",
        present: || super::psql_path().is_file() || on_path("psql"),
    },
    Need {
        package: "default-jre-headless",
        present: || on_path("java"),
    },
    Need {
        package: "libpostgresql-jdbc-java",
        present: || Path::new(PGJDBC_JAR).is_file(),
    },
    Need {
        package: "nodejs",
        present: || on_path("node"),
    },
    Need {
        package: "npm",
        present: || on_path("npm"),
    },
    Need {
        package: "haproxy",
        present: || on_path("haproxy") || Path::new("/usr/sbin/haproxy").is_file(),
    },
    Need {
        package: "python3-pip",
        present: || {
            Command::new("python3")
                .args(["-m", "pip", "--version"])
                .output()
                .is_ok_and(|o| o.status.success())
        },
    },
];

/// Whether the newest Debian server (the one the sandbox picks when no
/// other is named) has its headers installed.
fn debian_server_headers() -> bool {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .max();
    let Some(major) = newest else {
        // Installed together with the postgresql package.
        return false;
    };
    Command::new(format!("/usr/lib/postgresql/{major}/bin/pg_config"))
        .arg("--includedir-server")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            Path::new(String::from_utf8_lossy(&o.stdout).trim())
                .join("postgres.h")
                .is_file()
        })
}

/// Debian's pgjdbc.
pub const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn missing() -> Vec<&'static str> {
    NEEDS
        .iter()
        .filter(|need| !(need.present)())
        .map(|need| need.package)
        .collect()
}

/// Makes sure every system package the suite needs is installed: as root
/// by installing what is missing, otherwise by failing with one line that
/// names all of it.
pub fn system() {
    if missing().is_empty() {
        return;
    }
    let _lock = Lock::take();
    let missing = missing();
    if missing.is_empty() {
        return;
    }
    let list = missing.join(" ");
    assert!(
        is_root(),
        "the test suite needs Debian packages that are not installed: {list}. Install them \
         with `sudo apt-get install --no-install-recommends {list}`, or run `sudo .ci/run`"
    );
    eprintln!("provisioning: apt-get install {list}");
    run(Command::new("apt-get").args(["update", "-qq"]));
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    let still = self::missing();
    assert!(still.is_empty(), "still missing after apt-get: {still:?}");
}

/// `tests/<dir>/node_modules`, installed with `npm ci` from its lockfile
/// unless it already holds exactly that lockfile's packages.
pub fn node_modules(dir: &str) -> PathBuf {
    system();
    let dir = root().join(dir);
    let lockfile = std::fs::read(dir.join("package-lock.json")).expect("package-lock.json");
    let stamp = dir.join("node_modules").join(".authgres-stamp");
    let wanted = fingerprint(&lockfile);
    let _lock = Lock::take();
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        eprintln!("provisioning: npm ci in {}", dir.display());
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir));
        std::fs::write(&stamp, &wanted).expect("write the npm stamp");
    }
    dir.join("node_modules")
}

/// A directory holding the Python drivers of
/// `tests/compat/python/requirements.txt`, for `PYTHONPATH`.
pub fn python_path() -> PathBuf {
    system();
    let requirements = root().join("tests/compat/python/requirements.txt");
    let text = std::fs::read(&requirements).expect("requirements.txt");
    let target = state_dir().join(format!("python-{}", fingerprint(&text)));
    let stamp = target.join(".authgres-stamp");
    let _lock = Lock::take();
    if !stamp.is_file() {
        eprintln!("provisioning: pip install into {}", target.display());
        let _ = std::fs::remove_dir_all(&target);
        run(Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--no-warn-script-location", "--target"])
            .arg(&target)
            .arg("-r")
            .arg(&requirements));
        std::fs::write(&stamp, "").expect("write the pip stamp");
    }
    target
}

/// A short hex digest of `bytes`, to key installs by their lockfile.
fn fingerprint(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
