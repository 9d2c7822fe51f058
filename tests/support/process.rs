//! Running the proxy from a configuration file: processes that pick their own listeners (no
//! `-p/-i` added), signals, exit waits, daemons known only by their pid file, and per-test
//! directories holding the YAML file, pid file, upgrade socket and state file.

use super::proxy::{bin, spawn_captured};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// A proxy process started with exactly the given arguments; SIGKILLed on drop if still running.
pub struct Proc {
    child: Child,
    exit: Option<ExitStatus>,
    stdout: tempfile::NamedTempFile,
    stderr: tempfile::NamedTempFile,
    args: Vec<String>,
}

impl Proc {
    /// Start the binary with `args` (nothing added) and `envs` (inherited TASKCLUSTER_*
    /// variables removed). Does not wait for anything.
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (child, stdout, stderr) =
            spawn_captured(&args, envs).unwrap_or_else(|e| panic!("cannot start {}: {e}", bin()));
        Proc {
            child,
            exit: None,
            stdout,
            stderr,
            args,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Exit status if the process has exited (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exit = Some(st);
            }
        }
        self.exit
    }

    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Wait up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Send `sig` (e.g. `libc::SIGTERM`) — only while the child has not been reaped, so the pid
    /// cannot belong to anybody else.
    pub fn signal(&mut self, sig: i32) {
        assert!(
            self.is_running(),
            "cannot signal {:?}: it already exited with {:?}\n--- stderr ---\n{}",
            self.args,
            self.exit,
            self.stderr_text()
        );
        // SAFETY: kill(2) on our own, not yet reaped child.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    /// A new process for a zero-downtime upgrade (`-c conf -u`), waiting on the upgrade socket
    /// `sock` once this returns; `sock` must not exist before.
    pub fn start_upgrade(conf: &str, sock: &Path) -> Proc {
        assert!(
            !sock.exists(),
            "stale upgrade socket {} (test bug)",
            sock.display()
        );
        let mut p = Proc::start(&["-c", conf, "-u"], &[]);
        if let Err(e) = p.wait_path(sock, Duration::from_secs(20)) {
            panic!("the new process never waited on the upgrade socket: {e}");
        }
        p
    }

    /// Wait until `addr` accepts TCP connections; fails early if the process exits.
    pub fn wait_tcp(&mut self, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit() {
                return Err(format!(
                    "{:?} exited with {st} before listening on {addr}\n--- stderr ---\n{}",
                    self.args,
                    self.stderr_text()
                ));
            }
            if owns_listener(self.child.id(), addr) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{:?} not listening on {addr} after {timeout:?}\n--- stderr ---\n{}",
                    self.args,
                    self.stderr_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`wait_tcp`](Self::wait_tcp), panicking with the stderr on failure.
    #[track_caller]
    pub fn expect_tcp(&mut self, addr: SocketAddr) {
        if let Err(e) = self.wait_tcp(addr, Duration::from_secs(20)) {
            panic!("{e}");
        }
    }

    /// Wait until `path` exists; fails early if the process exits.
    pub fn wait_path(&mut self, path: &Path, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if path.exists() {
                return Ok(());
            }
            if let Some(st) = self.try_exit() {
                return Err(format!(
                    "{:?} exited with {st} before {} appeared\n--- stderr ---\n{}",
                    self.args,
                    path.display(),
                    self.stderr_text()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not appear within {timeout:?} ({:?})\n--- stderr ---\n{}",
                    path.display(),
                    self.args,
                    self.stderr_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr_text(&self) -> String {
        read_lossy(self.stderr.path())
    }

    pub fn stdout_text(&self) -> String {
        read_lossy(self.stdout.path())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- proxy {:?} (pid {}, exit {:?}) stderr (test failed) ---\n{}",
                self.args,
                self.pid(),
                self.exit,
                tail(&self.stderr_text(), 6000)
            );
        }
    }
}

/// A daemonized proxy, known by the pid in its pid file. SIGKILLed on drop if still alive and
/// still our binary running with `marker` (the config path) on its command line.
pub struct Daemon {
    pub pid: i32,
    marker: String,
    error_log: Option<PathBuf>,
}

impl Daemon {
    /// Read the pid from `pid_file` once it holds a live process whose command line contains
    /// `marker`; waits up to `timeout`.
    pub fn from_pid_file(
        pid_file: &Path,
        marker: &str,
        error_log: Option<PathBuf>,
        timeout: Duration,
    ) -> Result<Daemon, String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let Ok(text) = std::fs::read_to_string(pid_file) {
                last = text.clone();
                if let Ok(pid) = text.trim().parse::<i32>() {
                    if pid > 0 && is_alive(pid) && cmdline(pid).contains(marker) {
                        return Ok(Daemon {
                            pid,
                            marker: marker.to_string(),
                            error_log,
                        });
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no live daemon in {} after {timeout:?} (content {last:?})",
                    pid_file.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_alive(&self) -> bool {
        is_alive(self.pid) && cmdline(self.pid).contains(&self.marker)
    }

    pub fn signal(&self, sig: i32) {
        assert!(self.is_alive(), "daemon {} is gone", self.pid);
        // SAFETY: kill(2) on a process verified to be our daemon just above.
        unsafe { libc::kill(self.pid, sig) };
    }

    /// Wait until the process is gone (or a zombie).
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        super::wait_until(timeout, || !is_alive(self.pid))
    }

    pub fn error_log_text(&self) -> String {
        self.error_log
            .as_deref()
            .map(read_lossy)
            .unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.is_alive() {
            // SAFETY: the pid is alive and runs our binary with our config (checked above).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.wait_gone(Duration::from_secs(5));
        }
        if std::thread::panicking() {
            eprintln!(
                "--- daemon {} error log (test failed) ---\n{}",
                self.pid,
                tail(&self.error_log_text(), 6000)
            );
        }
    }
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // state is the field after the parenthesised command name
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// The NUL-separated command line of `pid`, joined with spaces ("" if unreadable).
pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// A per-test directory for the configuration file and the files the server creates.
pub struct TestDir {
    pub dir: tempfile::TempDir,
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl TestDir {
    pub fn new() -> TestDir {
        TestDir {
            dir: tempfile::Builder::new()
                .prefix("tc-proxy-test-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `path(name)` as a string (for YAML and arguments).
    pub fn p(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    pub fn pid_file(&self) -> PathBuf {
        self.path("proxy.pid")
    }

    pub fn upgrade_sock(&self) -> PathBuf {
        self.path("upgrade.sock")
    }

    pub fn state_file(&self) -> PathBuf {
        self.path("state.json")
    }

    pub fn error_log(&self) -> PathBuf {
        self.path("error.log")
    }

    /// Pingora's top-level keys with every file inside this directory:
    /// `version`, `threads: 2`, `pid_file`, `upgrade_sock`, `grace_period_seconds: grace`,
    /// `graceful_shutdown_timeout_seconds: 1`.
    pub fn server_keys(&self, grace: u64) -> String {
        format!(
            "version: 1\nthreads: 2\npid_file: {}\nupgrade_sock: {}\ngrace_period_seconds: {grace}\ngraceful_shutdown_timeout_seconds: 1\n",
            self.pid_file().display(),
            self.upgrade_sock().display()
        )
    }

    /// The `state_file` key of the `taskcluster_proxy` section (indented, with its newline)
    /// naming [`state_file`](Self::state_file); nothing when `explicit` is false (the default
    /// applies then).
    pub fn state_file_key(&self, explicit: bool) -> String {
        if explicit {
            format!(
                "  state_file: {}\n",
                yq(&self.state_file().to_string_lossy())
            )
        } else {
            String::new()
        }
    }

    /// Write `proxy.yaml`: [`server_keys`](Self::server_keys)`(grace)` and a
    /// `taskcluster_proxy` section with one TCP listener on `addr`, `root_url`, then `more`
    /// (further keys of the section, indented by two spaces). Returns its path.
    pub fn write_tcp_conf(
        &self,
        grace: u64,
        addr: SocketAddr,
        root_url: &str,
        more: &str,
    ) -> String {
        self.write(
            "proxy.yaml",
            &format!(
                "{}taskcluster_proxy:\n  listen:\n    - address: \"{addr}\"\n  root_url: {}\n{more}",
                self.server_keys(grace),
                yq(root_url)
            ),
        )
    }

    /// Write `name` with `text`, returning its path as a string.
    pub fn write(&self, name: &str, text: &str) -> String {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    }

    /// Write `name` with `text` and permission bits `mode`.
    pub fn write_mode(&self, name: &str, text: &str, mode: u32) -> String {
        use std::os::unix::fs::PermissionsExt;
        let p = self.write(name, text);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }
}

/// A YAML double-quoted scalar for `s` (JSON strings are valid YAML double-quoted scalars).
pub fn yq(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Permission bits of `path` (`mode & 0o7777`).
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], super::proxy::free_port()))
}

/// One row of the kernel's TCP socket table (`/proc/net/tcp{,6}`).
#[derive(Debug, Clone, Copy)]
pub struct TcpRow {
    pub local: SocketAddr,
    /// `0x0A` LISTEN, `0x06` TIME_WAIT, ...
    pub state: u8,
    pub inode: u64,
}

/// The IPv4 or IPv6 TCP sockets the kernel lists (empty if the table cannot be read).
pub fn tcp_rows(ipv6: bool) -> Vec<TcpRow> {
    let table = if ipv6 {
        "/proc/net/tcp6"
    } else {
        "/proc/net/tcp"
    };
    let text = std::fs::read_to_string(table).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            let (ip_hex, port_hex) = local.split_once(':')?;
            Some(TcpRow {
                local: SocketAddr::new(
                    proc_net_ip(ip_hex)?,
                    u16::from_str_radix(port_hex, 16).ok()?,
                ),
                state: u8::from_str_radix(state, 16).ok()?,
                inode: inode.parse().ok()?,
            })
        })
        .collect()
}

/// Whether process `pid` itself holds a listening TCP socket bound to `addr` (or to the
/// wildcard address on its port). A successful connect is not proof: with ports picked by
/// binding port 0 and releasing it, another server in the test process can end up on the
/// same port, and a test would then talk to it before the proxy has started.
pub fn owns_listener(pid: u32, addr: SocketAddr) -> bool {
    let inodes: Vec<String> = tcp_rows(addr.is_ipv6())
        .into_iter()
        .filter(|r| {
            r.state == 0x0A
                && r.local.port() == addr.port()
                && (r.local.ip() == addr.ip() || r.local.ip().is_unspecified())
        })
        .map(|r| format!("socket:[{}]", r.inode))
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// An address as `/proc/net/tcp{,6}` prints it: 32-bit words in native byte order.
fn proc_net_ip(hex: &str) -> Option<std::net::IpAddr> {
    let words: Option<Vec<[u8; 4]>> = (0..hex.len() / 8)
        .map(|i| {
            u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16)
                .ok()
                .map(u32::to_ne_bytes)
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    match bytes.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// Whether a TCP connection to `addr` is refused outright.
pub fn connection_refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        s
    } else {
        let mut i = s.len() - n;
        while !s.is_char_boundary(i) {
            i += 1;
        }
        &s[i..]
    }
}

/// The file at `p` as text (lossy), empty when it cannot be read.
pub fn read_lossy(p: &Path) -> String {
    let mut s = Vec::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_end(&mut s);
    }
    String::from_utf8_lossy(&s).into_owned()
}
