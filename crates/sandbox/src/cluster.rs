//! A throwaway Postgres cluster on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Name of the superuser created by `initdb`.
pub const SUPERUSER: &str = "postgres";
/// Name of the administrator [`Cluster::create_managed_owner`] creates.
pub const MANAGED_OWNER: &str = "app_owner";
/// How long a cluster may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before the postmaster is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running Postgres cluster that is stopped and deleted on drop.
pub struct Cluster {
    /// Keeps the data directory alive; removed on drop.
    dir: tempfile::TempDir,
    /// The postmaster while it runs; stopped on drop.
    postmaster: Option<Child>,
    port: u16,
    password: String,
    /// How to start the server again.
    server: Server,
    /// Where the native identity library built for this server is, when
    /// it could be built (see [`crate::native`]).
    native_library: Option<PathBuf>,
}

/// What starting the server takes.
struct Server {
    bindir: PathBuf,
    owner: OsUser,
    data: PathBuf,
    /// `postgres` arguments besides `-D` and `-p`.
    args: Vec<String>,
}

impl Cluster {
    /// Creates and starts a cluster with SCRAM authentication on TCP.
    ///
    /// As root, `initdb` and `postgres` run as the `postgres` OS user.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_inner(None, &[])
    }

    /// Like [`start`](Self::start), with `ssl = on` using `certs`' server
    /// certificate (for `localhost`, `127.0.0.1`, `::1`).
    pub fn start_with_tls(certs: &crate::tls::TestCerts) -> anyhow::Result<Self> {
        Self::start_inner(Some(certs), &[])
    }

    /// Like [`start`](Self::start), with extra server settings
    /// (`name=value`, as `postgres -c` takes them), e.g.
    /// `shared_preload_libraries=pg_stat_statements`.
    pub fn start_with_settings(settings: &[&str]) -> anyhow::Result<Self> {
        Self::start_inner(None, settings)
    }

    fn start_inner(tls: Option<&crate::tls::TestCerts>, settings: &[&str]) -> anyhow::Result<Self> {
        let bindir = find_postgres_bindir()?;
        let native_library = crate::native::library_dir(&bindir)?;
        let owner = OsUser::for_postgres()?;
        let dir = tempfile::Builder::new()
            .prefix("authgres-pg-")
            .tempdir()
            .context("creating a temporary directory for the cluster")?;
        owner.give(dir.path())?;
        let password = random_hex(16);
        let data = dir.path().join("data");
        init(&bindir, &owner, dir.path(), &data, &password)?;
        let mut args = server_args(&owner, dir.path(), tls)?;
        if let Some(library) = &native_library {
            // Searched first for `LANGUAGE C AS 'authgres'`; the server's
            // own directory after it.
            args.extend([
                "-c".to_owned(),
                format!("dynamic_library_path={}:$libdir", library.display()),
            ]);
        }
        for setting in settings {
            args.extend(["-c".to_owned(), (*setting).to_owned()]);
        }
        let mut cluster = Self {
            dir,
            postmaster: None,
            port: 0,
            password,
            server: Server {
                bindir,
                owner,
                data,
                args,
            },
            native_library,
        };
        let mut last_error = None;
        for _ in 0..3 {
            cluster.port = free_port()?;
            match cluster.spawn() {
                Ok(()) => return Ok(cluster),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("postgres did not start"))
            .context(format!("postgres log:\n{}", cluster.log())))
    }

    /// Starts the postmaster on the cluster's port and waits until it is
    /// ready.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let server = &self.server;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))?;
        let mut postmaster = server
            .owner
            .command(&server.bindir.join("postgres"))
            .arg("-D")
            .arg(&server.data)
            .args(["-p", &self.port.to_string()])
            .args(&server.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        match wait_ready(&server.data, &mut postmaster) {
            Ok(()) => {
                self.postmaster = Some(postmaster);
                Ok(())
            }
            Err(error) => {
                let _ = postmaster.kill();
                let _ = postmaster.wait();
                Err(error)
            }
        }
    }

    /// Restarts the server as `pg_ctl restart -m fast` does: every backend
    /// is ended, then a new postmaster starts on the same port and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn().context("restarting postgres")
    }

    /// Starts the server again after [`Cluster::stop`], on the same port
    /// and data; does nothing if it runs.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.postmaster.is_some() {
            return Ok(());
        }
        self.spawn().context("starting postgres again")
    }

    /// Stops the server (fast shutdown), bounded; kills it if it lingers.
    pub fn stop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let Some(mut postmaster) = self.postmaster.take() else {
            return;
        };
        let Ok(raw) = i32::try_from(postmaster.id()) else {
            let _ = postmaster.kill();
            let _ = postmaster.wait();
            return;
        };
        // SIGINT is Postgres' "fast shutdown": backends are ended too, so no
        // orphaned server process survives.
        let _ = kill(Pid::from_raw(raw), Signal::SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(postmaster.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = postmaster.kill();
        let _ = postmaster.wait();
    }

    /// The directory on this server's `dynamic_library_path` that holds the
    /// native identity library, when one could be built for it: init-db
    /// run as superuser then installs the native path.
    pub fn native_library_dir(&self) -> Option<&Path> {
        self.native_library.as_deref()
    }

    /// The loopback address the cluster listens on.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password.
    pub fn superuser_password(&self) -> &str {
        &self.password
    }

    /// A `postgres://` URL for the superuser in database `db`.
    pub fn admin_url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// Connects as the superuser to `db`; the connection runs on a spawned task.
    pub async fn admin(&self, db: &str) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) =
            tokio_postgres::connect(&self.admin_url(db), tokio_postgres::NoTls)
                .await
                .context("connecting to the sandbox cluster as superuser")?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "sandbox admin connection ended");
            }
        });
        Ok(client)
    }

    /// Creates database `db` owned by a role with what a managed service's
    /// administrator has instead of a superuser (Neon, Supabase, RDS, Cloud
    /// SQL, Azure): LOGIN, CREATEROLE, CREATEDB, and membership in
    /// `predefined` roles (for example `pg_read_all_stats`,
    /// `pg_signal_backend`, `pg_monitor`). Returns its `postgres://` URL.
    pub async fn create_managed_owner(
        &self,
        db: &str,
        predefined: &[&str],
    ) -> anyhow::Result<String> {
        let password = random_hex(16);
        let admin = self.admin("postgres").await?;
        for statement in [
            format!("create role {MANAGED_OWNER} login createrole createdb password '{password}'"),
            format!("create database {db} owner {MANAGED_OWNER}"),
        ] {
            admin
                .batch_execute(&statement)
                .await
                .context("creating the managed-service owner")?;
        }
        for role in predefined {
            admin
                .batch_execute(&format!("grant {role} to {MANAGED_OWNER}"))
                .await
                .with_context(|| format!("granting {role} to the owner"))?;
        }
        Ok(format!(
            "postgres://{MANAGED_OWNER}:{password}@127.0.0.1:{}/{db}",
            self.port
        ))
    }

    /// The server log so far (for failing tests).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates the data directory: SCRAM for TCP and the local socket (owner
/// only), the superuser's password from a file removed after.
fn init(
    bindir: &Path,
    owner: &OsUser,
    dir: &Path,
    data: &Path,
    password: &str,
) -> anyhow::Result<()> {
    let pwfile = dir.join("pwfile");
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pwfile)?;
        writeln!(file, "{password}")?;
    }
    owner.give(&pwfile)?;
    let initdb = bindir.join("initdb");
    let mut command = owner.command(&initdb);
    command
        .arg("-D")
        .arg(data)
        .args([
            "-U",
            SUPERUSER,
            "--auth-host=scram-sha-256",
            // Not trust: any local user could become superuser of the
            // cluster (and read the claims key) through the socket.
            "--auth-local=scram-sha-256",
        ])
        // 1 MB WAL segments: initdb writes (and tests copy) far less.
        .args(["--no-sync", "--no-locale", "-E", "UTF8", "--wal-segsize=1"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .stdin(Stdio::null());
    // `--no-instructions` exists from Postgres 14 on.
    if major_version(&initdb)? >= 14 {
        command.arg("--no-instructions");
    }
    let output = command.output().context("running initdb");
    let _ = std::fs::remove_file(&pwfile);
    let output = output?;
    if !output.status.success() {
        bail!(
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The major version of a Postgres program (`initdb (PostgreSQL) 15.8`).
fn major_version(program: &Path) -> anyhow::Result<u32> {
    let output = Command::new(program)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", program.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .last()
        .and_then(|version| version.split('.').next())
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("{} --version said {text:?}", program.display()))
}

/// The server's arguments: loopback only, the socket in `dir`, durability
/// off (throwaway data), TLS with `certs` when given.
fn server_args(
    owner: &OsUser,
    dir: &Path,
    tls: Option<&crate::tls::TestCerts>,
) -> anyhow::Result<Vec<String>> {
    let socket = dir.join("socket");
    std::fs::create_dir(&socket)?;
    owner.give(&socket)?;
    let mut args: Vec<String> = [
        "-k",
        &socket.display().to_string(),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "fsync=off",
        "-c",
        "synchronous_commit=off",
        "-c",
        "full_page_writes=off",
        "-c",
        "max_connections=300",
        "-c",
        "unix_socket_permissions=0700",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    if let Some(certs) = tls {
        let cert = dir.join("server.crt");
        let key = dir.join("server.key");
        std::fs::write(&cert, &certs.cert_pem)?;
        std::fs::write(&key, &certs.key_pem)?;
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        owner.give(&cert)?;
        owner.give(&key)?;
        args.extend([
            "-c".to_owned(),
            "ssl=on".to_owned(),
            "-c".to_owned(),
            format!("ssl_cert_file={}", cert.display()),
            "-c".to_owned(),
            format!("ssl_key_file={}", key.display()),
        ]);
    }
    Ok(args)
}

/// Waits until `postmaster.pid` says "ready" (Postgres 10+), bounded.
fn wait_ready(data: &Path, postmaster: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = postmaster.try_wait()? {
            bail!("postgres exited during startup with {status}");
        }
        if let Ok(pid_file) = std::fs::read_to_string(data.join("postmaster.pid"))
            && pid_file.lines().nth(7).is_some_and(|l| l.trim() == "ready")
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("postgres did not become ready within {START_TIMEOUT:?}")
}

/// Finds the directory holding `initdb` and `postgres`: `$AUTHGRES_PG_BINDIR`,
/// then `PATH`, then `pg_config --bindir`, then the newest
/// `/usr/lib/postgresql/*/bin` (Debian).
pub fn find_postgres_bindir() -> anyhow::Result<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("AUTHGRES_PG_BINDIR").map(PathBuf::from) {
        if has_both(&dir) {
            return Ok(dir);
        }
        bail!(
            "AUTHGRES_PG_BINDIR={} has no initdb and postgres",
            dir.display()
        );
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_both(&dir) {
                return Ok(dir);
            }
        }
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output()
        && output.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if has_both(&dir) {
            return Ok(dir);
        }
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_both(dir))
        .collect();
    debian.sort();
    debian.pop().map(|(_, dir)| dir).context(
        "no Postgres server binaries found (initdb, postgres): install Debian's `postgresql` \
         package or set AUTHGRES_PG_BINDIR",
    )
}

/// The OS user that runs the cluster: ourselves, or `postgres` when root.
struct OsUser {
    ids: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
}

impl OsUser {
    fn for_postgres() -> anyhow::Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(Self { ids: None });
        }
        let user = nix::unistd::User::from_name("postgres")?.context(
            "running as root needs the `postgres` OS user (Debian's postgresql package creates it)",
        )?;
        Ok(Self {
            ids: Some((user.uid, user.gid)),
        })
    }

    fn give(&self, path: &Path) -> anyhow::Result<()> {
        if let Some((uid, gid)) = self.ids {
            std::os::unix::fs::chown(path, Some(uid.as_raw()), Some(gid.as_raw()))
                .with_context(|| format!("chown {} to postgres", path.display()))?;
        }
        Ok(())
    }

    fn command(&self, program: &Path) -> Command {
        use std::os::unix::process::CommandExt as _;
        let mut command = Command::new(program);
        if let Some((uid, gid)) = self.ids {
            command.uid(uid.as_raw()).gid(gid.as_raw());
            command.env("HOME", "/tmp");
        }
        command
    }
}

/// A loopback port that is free now and that no other test process on
/// this machine will pick, for a server a test starts.
///
/// Chosen below Linux's ephemeral range (32768-60999 by default): a port
/// the kernel hands out by `bind(0)` is also one it hands to the next
/// outgoing connection, so a test's own client traffic could take it
/// before the server binds. Tests run in parallel processes, and a bind
/// check alone leaves a window between the check and the server's own
/// bind in which another process can pick the same port; so each pick is
/// also claimed with an exclusive lock on a file named after the port,
/// held until this process exits (the kernel drops it even on a crash).
pub fn free_port() -> anyhow::Result<u16> {
    const FIRST: u16 = 15_000;
    const LAST: u16 = 32_000;
    let claims = std::env::temp_dir().join("authgres-test-ports");
    std::fs::create_dir_all(&claims).with_context(|| format!("creating {}", claims.display()))?;
    for _ in 0..200 {
        let mut bytes = [0u8; 2];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
        let port = FIRST + u16::from_le_bytes(bytes) % (LAST - FIRST);
        if claim_port(&claims, port)? && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port between {FIRST} and {LAST} after 200 tries")
}

/// Takes the cross-process claim on `port`: false when another live
/// process holds it (or this one already does).
fn claim_port(claims: &Path, port: u16) -> anyhow::Result<bool> {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let path = claims.join(port.to_string());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            HELD.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(file);
            Ok(true)
        }
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("locking {}", path.display()))
        }
    }
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    #[allow(
        clippy::expect_used,
        reason = "nothing here can go on without the system RNG"
    )]
    aws_lc_rs::rand::fill(&mut buf).expect("the system RNG is available");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
