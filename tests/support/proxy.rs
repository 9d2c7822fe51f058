//! Running the real `taskcluster-proxy` binary.

use super::process::{read_lossy, tail};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the binary under test (set by cargo for integration tests; the support module is
/// also compiled into the `fake-taskcluster` example, where it is not).
pub fn bin() -> &'static str {
    match option_env!("CARGO_BIN_EXE_taskcluster-proxy") {
        Some(path) => path,
        None => panic!("only integration tests run the proxy"),
    }
}

/// A port that was free a moment ago (bind 127.0.0.1:0 and drop).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The proxy binary with `args` and `envs` (inherited TASKCLUSTER_* variables removed), stdin null.
pub fn base_command(args: &[String], envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TASKCLUSTER_") {
            cmd.env_remove(&k);
        }
    }
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Spawn [`base_command`] with stdout and stderr captured in temporary files.
pub fn spawn_captured(
    args: &[String],
    envs: &[(&str, &str)],
) -> std::io::Result<(Child, tempfile::NamedTempFile, tempfile::NamedTempFile)> {
    let stdout = tempfile::NamedTempFile::new().unwrap();
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = base_command(args, envs);
    cmd.stdout(stdout.reopen().unwrap());
    cmd.stderr(stderr.reopen().unwrap());
    let child = cmd.spawn()?;
    Ok((child, stdout, stderr))
}

/// A running proxy; killed on drop.
pub struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    stdout: tempfile::NamedTempFile,
    stderr: tempfile::NamedTempFile,
    args: Vec<String>,
}

impl ProxyProcess {
    /// Start the proxy with `-p <free port> -i 127.0.0.1` + `args`, with `envs` (all inherited
    /// TASKCLUSTER_* variables removed), and wait until it accepts TCP connections. Panics (with
    /// the proxy's stderr) if it does not come up within 20 s.
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> ProxyProcess {
        ProxyProcess::try_spawn(args, envs).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`spawn`](Self::spawn) but returns the reason (incl. stderr) on failure.
    pub fn try_spawn(args: &[&str], envs: &[(&str, &str)]) -> Result<ProxyProcess, String> {
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let mut full: Vec<String> = vec![
                "-p".into(),
                port.to_string(),
                "-i".into(),
                "127.0.0.1".into(),
            ];
            full.extend(args.iter().map(|s| s.to_string()));
            let (child, stdout, stderr) =
                spawn_captured(&full, envs).map_err(|e| format!("cannot start {}: {e}", bin()))?;
            let mut p = ProxyProcess {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                stdout,
                stderr,
                args: full,
            };
            match p.wait_ready(Duration::from_secs(20)) {
                Ok(()) => return Ok(p),
                Err(e) => {
                    let text = p.stderr_text();
                    let clash = text.contains("in use") || text.contains("AddrInUse");
                    last_err = format!(
                        "proxy {:?} did not start: {e}\n--- stderr ---\n{text}\n--- stdout ---\n{}",
                        p.args,
                        p.stdout_text()
                    );
                    if !clash {
                        return Err(last_err);
                    }
                }
            }
        }
        Err(last_err)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("exited early with {status}"));
            }
            if super::process::owns_listener(self.child.id(), self.addr) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(format!("not listening on {} after {timeout:?}", self.addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stderr_text(&self) -> String {
        read_lossy(self.stderr.path())
    }

    pub fn stdout_text(&self) -> String {
        read_lossy(self.stdout.path())
    }

    fn status_field_kib(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        s.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_field_kib("VmHWM:")
    }

    /// Current resident set size (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_field_kib("VmRSS:")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- proxy {:?} stderr (test failed) ---\n{}",
                self.args,
                tail(&self.stderr_text(), 4000)
            );
        }
    }
}

/// Run the binary with exactly `args` (no port/address added) and wait for it to exit.
/// Returns (exit code, stdout, stderr); exit code None = killed after `timeout` (or by a
/// signal).
pub fn run_to_exit(
    args: &[&str],
    envs: &[(&str, &str)],
    timeout: Duration,
) -> (Option<i32>, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (mut child, stdout, stderr) = spawn_captured(&args, envs).expect("spawn proxy");
    let start = Instant::now();
    let code = loop {
        match child.try_wait().unwrap() {
            Some(st) => break st.code(),
            None if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    (code, read_lossy(stdout.path()), read_lossy(stderr.path()))
}
