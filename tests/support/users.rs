//! Callers other than this process: clients running as other OS users (root only), and TCP
//! connections from a chosen local address.
//!
//! A client runs as another user as this test binary re-run in helper mode: [`run_helper`]
//! starts `<this binary> client_helper --exact --ignored` under the user's uid with the request
//! in [`HELPER_ENV`]. Every test binary that calls `run_helper` therefore defines an ignored
//! test named `client_helper` (see [`HELPER_TEST`]) that calls [`helper_main`] with its own
//! request code; `helper_main` prints the answer as one line, which `run_helper` returns.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Mutex;

/// The two unprivileged users the tests run clients as (created by `scripts/setup.sh`, or by
/// [`ensure_user`] when missing).
pub const USER1: &str = "tcp-admission-test";
pub const USER2: &str = "tcp-admission-other";

/// Name of the ignored test every binary using [`run_helper`] defines for helper mode.
pub const HELPER_TEST: &str = "client_helper";
/// Environment variable that switches a test binary into helper mode (holding the request).
pub const HELPER_ENV: &str = "TC_PROXY_CLIENT_HELPER";
/// Prefix of the helper's one line of output.
const RESULT: &str = "CLIENT-HELPER-RESULT ";

#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

pub fn is_root() -> bool {
    euid() == 0
}

/// Root is required; otherwise the test reports the skip and returns `false`.
pub fn can_run(test: &str) -> bool {
    if !is_root() {
        eprintln!("{test}: skipped, needs root to create users and run clients as them");
    }
    is_root()
}

/// [`USER1`] and [`USER2`], created if missing; `None` (the test reports the skip, see
/// [`can_run`]) without root.
pub fn two_users(test: &str) -> Option<(User, User)> {
    can_run(test).then(|| (ensure_user(USER1), ensure_user(USER2)))
}

pub fn lookup_user(name: &str) -> Option<User> {
    let out = Command::new("getent")
        .args(["passwd", name])
        .output()
        .ok()?;
    let line = String::from_utf8(out.stdout).ok()?;
    let fields: Vec<&str> = line.trim().split(':').collect();
    Some(User {
        name: name.to_string(),
        uid: fields.get(2)?.parse().ok()?,
        gid: fields.get(3)?.parse().ok()?,
    })
}

/// The user `name`, created (system account, no home, no login shell) if missing. Safe to call
/// from parallel tests and processes: a lost creation race is noticed by the second lookup.
pub fn ensure_user(name: &str) -> User {
    static CREATE: Mutex<()> = Mutex::new(());
    let _serial = CREATE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(user) = lookup_user(name) {
        return user;
    }
    let status = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .status();
    lookup_user(name).unwrap_or_else(|| panic!("cannot create user {name} (useradd: {status:?})"))
}

/// Runs this test binary in helper mode, as `user` (`None`: as this process), with the request
/// `spec`; returns the helper's answer (trimmed). Panics with the helper's output if it gave
/// none.
pub fn run_helper(user: Option<&User>, spec: &str) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        HELPER_TEST,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(HELPER_ENV, spec);
    if let Some(user) = user {
        cmd.uid(user.uid).gid(user.gid);
    }
    let out = cmd.output().expect("run the client helper");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // With --nocapture the line may follow the harness's "test client_helper ... " on one line.
    let answer = stdout
        .lines()
        .find_map(|l| l.split_once(RESULT).map(|(_, answer)| answer.trim()))
        .unwrap_or_else(|| {
            panic!(
                "helper ({spec}) as {:?} gave no result: {}\nstdout:\n{stdout}\nstderr:\n{}",
                user.map(|u| &u.name),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    answer.to_string()
}

/// The body of a binary's `client_helper` test: in helper mode prints `answer(request)` as the
/// result line; does nothing when the test binary runs normally.
pub fn helper_main(answer: impl FnOnce(&str) -> String) {
    if let Ok(spec) = std::env::var(HELPER_ENV) {
        println!("{RESULT}{}", answer(&spec));
    }
}

/// A TCP connection to `to` from the local address `from` (port 0: the kernel picks one;
/// `127.0.0.2` etc. are local on Linux, so a loopback client can pose as another address).
/// SO_REUSEADDR is set, so a TIME_WAIT socket on the same address (left by an earlier
/// connection made here) does not stop the bind.
pub fn connect_from(to: SocketAddr, from: SocketAddr) -> io::Result<TcpStream> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stream = runtime.block_on(async {
        let socket = if from.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(from)?;
        socket.connect(to).await
    })?;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}
