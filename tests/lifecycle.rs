//! Process life cycle (Pingora's): `-d`/`daemon: true` daemonizes and writes the pid file;
//! SIGTERM stops accepting at once, lets in-flight transfers finish within the grace period and
//! exits 0; SIGINT exits at once.

mod support;

use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::client;
use support::process::{connection_refused, free_addr, yq, Daemon, Proc, TestDir};
use support::{send, FakeTc, ACCESS_TOKEN, CLIENT_ID};

/// Our section: one TCP listener, the fake as root URL, the default client.
fn section(tc: &FakeTc, addr: std::net::SocketAddr) -> String {
    format!(
        "taskcluster_proxy:\n  listen:\n    - address: \"{addr}\"\n  root_url: {}\n  credentials:\n    client_id: {}\n    access_token: {}\n",
        yq(&tc.root_url()),
        yq(CLIENT_ID),
        yq(ACCESS_TOKEN)
    )
}

/// `proxy.yaml` for a daemon: Pingora keys, `top` (more top-level keys), `error_log:` and
/// [`section`].
fn daemon_conf(dir: &TestDir, tc: &FakeTc, addr: SocketAddr, top: &str) -> String {
    dir.write(
        "proxy.yaml",
        &format!(
            "{}{top}error_log: {}\n{}",
            dir.server_keys(1),
            yq(&dir.error_log().to_string_lossy()),
            section(tc, addr)
        ),
    )
}

/// Start the proxy in the foreground with a `grace` s grace period; returns once it listens.
fn start_foreground(tc: &FakeTc, dir: &TestDir, grace: u64) -> (SocketAddr, Proc) {
    let addr = free_addr();
    let conf = dir.write(
        "proxy.yaml",
        &format!("{}{}", dir.server_keys(grace), section(tc, addr)),
    );
    let mut p = Proc::start(&["-c", &conf], &[]);
    p.expect_tcp(addr);
    (addr, p)
}

/// A keep-alive connection to `addr` that has served one request and is now idle.
fn idle_keepalive(addr: SocketAddr) -> client::Conn {
    let mut conn = client::Conn::connect(addr).unwrap();
    let r = conn.request("GET", b"/queue/v1/idle", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    conn
}

/// Send `sig` to `p` and wait up to `timeout` for it to exit; returns the status and the time
/// taken.
fn signal_and_wait(
    p: &mut Proc,
    sig: i32,
    timeout: Duration,
) -> (Option<std::process::ExitStatus>, Duration) {
    let t0 = Instant::now();
    p.signal(sig);
    let status = p.wait_exit(timeout);
    (status, t0.elapsed())
}

#[track_caller]
fn assert_serves(addr: std::net::SocketAddr) {
    let r = send(addr, "GET", b"/queue/v1/alive", &[], b"");
    let e = support::ok_echo(&r);
    assert_eq!(e["auth"]["clientId"], json!(CLIENT_ID));
}

/// Start `args`, expect the foreground command to return 0 promptly, then find the daemon.
fn start_daemon(dir: &TestDir, conf: &str, args: &[&str]) -> Daemon {
    let mut launcher = Proc::start(args, &[]);
    let start = Instant::now();
    let status = launcher.wait_exit(Duration::from_secs(10));
    let took = start.elapsed();
    assert!(
        status.is_some(),
        "{args:?}: the launching process must return promptly when daemonizing\n--- stderr ---\n{}",
        launcher.stderr_text()
    );
    assert!(
        status.unwrap().success(),
        "{args:?}: launcher exited with {status:?}\n--- stderr ---\n{}",
        launcher.stderr_text()
    );
    eprintln!("{args:?}: launcher returned after {took:?}");
    let daemon = Daemon::from_pid_file(
        &dir.pid_file(),
        conf,
        Some(dir.error_log()),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n--- launcher stderr ---\n{}\n--- error log ---\n{}",
            launcher.stderr_text(),
            std::fs::read_to_string(dir.error_log()).unwrap_or_default()
        )
    });
    assert_ne!(
        daemon.pid,
        launcher.pid(),
        "the pid file must hold the daemon, not the launcher"
    );
    daemon
}

fn wait_serving(daemon: &Daemon, addr: std::net::SocketAddr) {
    let ok = support::wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
    assert!(
        ok,
        "daemon {} not listening on {addr}\n--- error log ---\n{}",
        daemon.pid,
        daemon.error_log_text()
    );
}

fn stop_daemon(daemon: &Daemon) {
    daemon.signal(libc::SIGINT);
    assert!(
        daemon.wait_gone(Duration::from_secs(5)),
        "daemon {} still running 5 s after SIGINT",
        daemon.pid
    );
}

#[test]
fn daemon_flag_daemonizes_and_writes_pid_file() {
    let tc = support::fake();
    let dir = TestDir::new();
    let addr = free_addr();
    let conf = daemon_conf(&dir, &tc, addr, "");
    let daemon = start_daemon(&dir, &conf, &["-d", "-c", &conf]);
    wait_serving(&daemon, addr);
    assert_serves(addr);
    assert!(daemon.is_alive());
    stop_daemon(&daemon);
    assert!(connection_refused(addr));
}

#[test]
fn yaml_daemon_true_daemonizes() {
    let tc = support::fake();
    let dir = TestDir::new();
    let addr = free_addr();
    let conf = daemon_conf(&dir, &tc, addr, "daemon: true\n");
    let daemon = start_daemon(&dir, &conf, &["--conf", &conf]);
    wait_serving(&daemon, addr);
    assert_serves(addr);
    stop_daemon(&daemon);
}

#[test]
fn daemon_with_command_line_credentials() {
    // -d with only Pingora keys in the file; listener and credentials on the command line
    let tc = support::fake();
    let dir = TestDir::new();
    let addr = free_addr();
    let conf = dir.write(
        "pingora.yaml",
        &format!(
            "{}error_log: {}\n",
            dir.server_keys(1),
            yq(&dir.error_log().to_string_lossy())
        ),
    );
    let port = addr.port().to_string();
    let root = tc.root_url();
    let daemon = start_daemon(
        &dir,
        &conf,
        &support::default_args(
            &root,
            &["-c", &conf, "--daemon", "-p", &port, "-i", "127.0.0.1"],
        ),
    );
    wait_serving(&daemon, addr);
    assert_serves(addr);
    stop_daemon(&daemon);
}

#[test]
fn sigterm_finishes_in_flight_download_refuses_new_connections_and_exits_zero() {
    const GRACE: u64 = 3;
    const CHUNK: u64 = 64 * 1024;
    const N: u64 = 30 * CHUNK; // 30 chunks 50 ms apart: ~1.5 s
    let tc = support::fake();
    let dir = TestDir::new();
    let (addr, mut p) = start_foreground(&tc, &dir, GRACE);
    assert_serves(addr);

    let (downloader, progress) =
        client::slow_download(addr, N, 50, CHUNK, "the download did not start streaming");
    let t0 = Instant::now();
    let at_signal = progress.load(Ordering::SeqCst);
    p.signal(libc::SIGTERM);

    // new connections are refused shortly after the signal
    let refused = support::wait_until(Duration::from_secs(1), || connection_refused(addr));
    let refused_after = t0.elapsed();
    assert!(
        refused,
        "new connections still accepted 1 s after SIGTERM\n--- stderr ---\n{}",
        p.stderr_text()
    );
    eprintln!("new connections refused {refused_after:?} after SIGTERM");
    assert!(
        progress.load(Ordering::SeqCst) < N,
        "the download finished before connections were refused; the test proves nothing"
    );

    // the in-flight download completes intact
    let d = downloader.join().unwrap();
    let download_done = t0.elapsed();
    eprintln!(
        "download: {} of {N} bytes ({at_signal} before SIGTERM), done {download_done:?} after SIGTERM, error {:?}",
        d.len, d.error
    );
    assert_eq!(d.status, 200);
    assert_eq!(d.error, None, "the in-flight download was cut");
    assert_eq!(d.len, N);
    assert!(d.pattern_ok, "corrupted at {:?}", d.first_mismatch);

    // exits 0 after the grace period
    let status = p.wait_exit(Duration::from_secs(GRACE + 10));
    let exited = t0.elapsed();
    assert!(
        status.is_some(),
        "still running {:?} after SIGTERM (grace period {GRACE} s)",
        exited
    );
    let status = status.unwrap();
    eprintln!("exited with {status} {exited:?} after SIGTERM (grace period {GRACE} s)");
    assert_eq!(status.code(), Some(0), "graceful shutdown must exit 0");
    assert!(
        exited < Duration::from_secs(GRACE + 5),
        "took {exited:?} to exit after SIGTERM with a {GRACE} s grace period"
    );
}

#[test]
fn sigint_exits_at_once_even_with_a_download_in_flight() {
    const CHUNK: u64 = 64 * 1024;
    let tc = support::fake();
    let dir = TestDir::new();
    // a long grace period that SIGINT must not wait for
    let (addr, mut p) = start_foreground(&tc, &dir, 30);
    assert_serves(addr);
    let (downloader, _) = client::slow_download(
        addr,
        400 * CHUNK,
        50,
        CHUNK,
        "the download did not start streaming",
    ); // ~20 s
    let (status, took) = signal_and_wait(&mut p, libc::SIGINT, Duration::from_secs(5));
    assert!(status.is_some(), "still running 5 s after SIGINT");
    eprintln!("SIGINT: exited with {:?} after {took:?}", status.unwrap());
    assert!(
        took < Duration::from_millis(1500),
        "SIGINT should exit at once, took {took:?}"
    );
    let d = downloader.join().unwrap();
    assert!(d.len < 400 * CHUNK, "the download cannot have completed");
    assert!(connection_refused(addr));
}

#[test]
fn sigint_exits_at_once_when_idle() {
    let tc = support::fake();
    let dir = TestDir::new();
    let (addr, mut p) = start_foreground(&tc, &dir, 30);
    // an idle keep-alive connection must not hold the process either
    let _conn = idle_keepalive(addr);
    let (status, took) = signal_and_wait(&mut p, libc::SIGINT, Duration::from_secs(5));
    assert!(status.is_some(), "still running 5 s after SIGINT");
    eprintln!(
        "SIGINT (idle): exited with {:?} after {took:?}",
        status.unwrap()
    );
    assert!(
        took < Duration::from_millis(1500),
        "SIGINT should exit at once, took {took:?}"
    );
}

#[test]
fn sigterm_with_idle_keepalive_connection_exits_after_grace() {
    const GRACE: u64 = 2;
    let tc = support::fake();
    let dir = TestDir::new();
    let (addr, mut p) = start_foreground(&tc, &dir, GRACE);
    let _conn = idle_keepalive(addr);
    let (status, took) = signal_and_wait(&mut p, libc::SIGTERM, Duration::from_secs(GRACE + 10));
    assert!(status.is_some(), "still running {took:?} after SIGTERM");
    eprintln!(
        "SIGTERM (idle keep-alive connection): exited with {:?} after {took:?}",
        status.unwrap()
    );
    assert_eq!(status.unwrap().code(), Some(0));
    assert!(took < Duration::from_secs(GRACE + 5), "took {took:?}");
}

/// A connection accepted just before SIGTERM, whose request arrives just after, is served
/// (in an upgrade, the old process accepts until the moment it shuts down); an idle
/// keep-alive connection is closed once that short grace is over.
#[test]
fn a_request_arriving_just_after_sigterm_on_an_accepted_connection_is_served() {
    let tc = support::fake();
    let dir = TestDir::new();
    let (addr, mut p) = start_foreground(&tc, &dir, 10);
    let mut fresh = client::Conn::connect(addr).unwrap();
    let mut idle = idle_keepalive(addr);
    // Let the proxy accept the fresh connection before it stops accepting.
    std::thread::sleep(Duration::from_millis(200));
    p.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        connection_refused(addr),
        "still accepting 300 ms after SIGTERM"
    );
    let r = fresh
        .request("GET", b"/queue/v1/late", &[], b"")
        .expect("the accepted connection was dropped instead of served");
    assert_eq!(r.status, 200, "{}", r.text());
    support::assert_auth_ok(&r.json());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        idle.request("GET", b"/queue/v1/idle-again", &[], b"")
            .is_err(),
        "idle keep-alive connection still served 1.8 s after SIGTERM"
    );
    p.signal(libc::SIGINT);
}
