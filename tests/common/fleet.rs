//! More than one proxy, for the scale-out and handover tests: a plain
//! [`SecondProxy`], fleet [`Instance`]s with their own config sections
//! (restartable, with successors taking over), and [`Haproxy`] in front.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::stack::spawn_proxy;
use super::{Stack, free_port, provision};

impl Stack {
    /// A directory `name` inside the stack's with its secrets and
    /// certificates, and its config listening on `port` with a fresh HTTP
    /// port and the admin listener on `admin_port`, `extra` appended.
    fn fleet_dir(&self, name: &str, port: u16, admin_port: u16, extra: &str) -> PathBuf {
        let config = std::fs::read_to_string(self.config_path())
            .expect("config")
            .replace(
                &format!("\"127.0.0.1:{}\"", self.port),
                &format!("\"127.0.0.1:{port}\""),
            )
            .replace(
                &format!("\"127.0.0.1:{}\"", self.http_port),
                &format!("\"127.0.0.1:{}\"", free_port()),
            )
            .replace(
                &format!("\"127.0.0.1:{}\"", self.admin_port),
                &format!("\"127.0.0.1:{admin_port}\""),
            );
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        for file in ["authgres.env", "server.crt", "server.key", "ca.pem"] {
            std::fs::copy(self.dir.path().join(file), dir.join(file)).expect("copy");
        }
        std::fs::write(dir.join("proxy.toml"), config + extra).expect("config");
        dir
    }

    /// Starts another `authgres serve` with the same config on another
    /// port, as a second proxy in a fleet would run. Killed on drop.
    pub fn second_proxy(&self) -> SecondProxy {
        let port = free_port();
        let dir = self.fleet_dir(&format!("second-{port}"), port, free_port(), "");
        let child = spawn_proxy(&dir, self.json_logs);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "second proxy did not listen: {}",
                std::fs::read_to_string(dir.join("authgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        SecondProxy { child, port }
    }

    /// Another instance of the fleet on `port`: the stack's config with
    /// fresh HTTP and admin ports and `extra` appended (a `[cluster]`
    /// section). Started.
    pub fn instance(&self, port: u16, extra: &str) -> Instance {
        let admin_port = free_port();
        let dir = self.fleet_dir(&format!("instance-{port}"), port, admin_port, extra);
        let mut instance = Instance {
            port,
            admin_port,
            dir,
            child: None,
        };
        instance.start();
        instance
    }
}

/// One more `authgres serve` of a fleet: the stack's config with its own
/// ports and extra sections; killed on drop.
pub struct Instance {
    pub port: u16,
    pub admin_port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Instance {
    /// (Re)starts the process and waits until it listens.
    pub fn start(&mut self) {
        self.child = Some(spawn_proxy(&self.dir, false));
        wait_port(self.port, || self.log());
    }

    /// Starts another process on the same config without waiting (a
    /// successor taking over through the handover socket).
    pub fn spawn_successor(&self) -> Child {
        spawn_proxy(&self.dir, false)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            let pid = i32::try_from(child.id()).expect("pid");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Waits for the process to exit; its status.
    pub fn wait_exit(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until its `/readyz?strict` answers 200 (ready, not degraded).
    pub async fn wait_ready(&self) {
        let url = format!("http://127.0.0.1:{}/readyz?strict", self.admin_port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(response) = reqwest::get(&url).await
                && response.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "never ready: {}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Makes `child` (a successor that took over) this instance's process.
    pub fn adopt(&mut self, child: Child) {
        self.kill();
        self.child = Some(child);
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("authgres.log")).unwrap_or_default()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.dir.display(), self.log());
        }
    }
}

fn wait_port(port: u16, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "no listener on {port}: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Debian's HAProxy in TCP mode, round robin over `backends` (wire port,
/// admin port), health-checked on `/readyz` every 100 ms, retrying a
/// refused connection on another backend. With `send_proxy`, it connects
/// from [`HAPROXY_SOURCE`] and begins each connection with a PROXY protocol
/// v2 header (`send-proxy-v2`), as docs/scale-out.md configures it.
/// Stopped on drop.
pub struct Haproxy {
    pub port: u16,
    child: Child,
}

/// The address HAProxy connects to the backends from when it sends PROXY
/// headers: the one address the instances trust, so instances forwarding
/// cancels to each other from 127.0.0.1 are plain clients.
pub const HAPROXY_SOURCE: &str = "127.0.0.2";

impl Haproxy {
    pub fn start(dir: &Path, backends: &[(u16, u16)], send_proxy: bool) -> Self {
        provision::system();
        let port = free_port();
        let proxy = if send_proxy {
            format!(" send-proxy-v2 source {HAPROXY_SOURCE}")
        } else {
            String::new()
        };
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, (wire, admin))| {
                format!("  server authgres{i} 127.0.0.1:{wire} check port {admin}{proxy}\n")
            })
            .collect();
        let config = format!(
            "global\n  maxconn 2000\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 120s\n  timeout server 120s\n\
             \x20 retries 3\n  option redispatch 1\n\
             listen postgres\n  bind 127.0.0.1:{port}\n  balance roundrobin\n\
             \x20 option httpchk GET /readyz\n  http-check expect status 200\n\
             \x20 default-server inter 100ms fall 1 rise 2\n{servers}"
        );
        let path = dir.join(format!("haproxy-{port}.cfg"));
        std::fs::write(&path, config).expect("haproxy config");
        let log = std::fs::File::create(dir.join(format!("haproxy-{port}.log"))).expect("log");
        let binary = if Path::new("/usr/sbin/haproxy").is_file() {
            PathBuf::from("/usr/sbin/haproxy")
        } else {
            PathBuf::from("haproxy")
        };
        let child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start haproxy");
        wait_port(port, String::new);
        Self { port, child }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A second proxy process; killed on drop.
pub struct SecondProxy {
    child: Child,
    pub port: u16,
}

impl Drop for SecondProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
