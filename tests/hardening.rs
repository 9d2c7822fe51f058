//! Timeouts, retries, limits and the admin-only credentials endpoint, against the real binary.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use support::process::{yq, TestDir};
use support::proxy::free_port;
use support::{assert_auth_ok, fake, send, ProxyProcess, ACCESS_TOKEN, CLIENT2_ID, CLIENT_ID};

/// A proxy configured by `section` (inside `taskcluster_proxy:`) with the default credentials.
fn proxy_with(dir: &TestDir, root: &str, section: &str) -> ProxyProcess {
    let conf = dir.write(
        "proxy.yaml",
        &format!(
            "{}taskcluster_proxy:\n  root_url: {}\n  credentials:\n    client_id: {}\n    access_token: {}\n{section}",
            dir.server_keys(1),
            yq(root),
            yq(CLIENT_ID),
            yq(ACCESS_TOKEN)
        ),
    );
    ProxyProcess::spawn(&["-c", &conf], &[])
}

/// Reads one request head (up to the blank line) from `s`.
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[test]
fn hung_upstream_gives_504_within_the_read_timeout_and_proxy_keeps_serving() {
    let tc = fake();
    let dir = TestDir::new();
    let proxy = proxy_with(
        &dir,
        &tc.root_url(),
        "  upstream_timeouts:\n    read_seconds: 1\n",
    );
    let start = Instant::now();
    let r = send(proxy.addr(), "GET", b"/queue/v1/__hang", &[], b"");
    let took = start.elapsed();
    eprintln!("hung upstream answered {} after {took:?}", r.status);
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(took < Duration::from_secs(5), "{took:?}");
    let ok = send(proxy.addr(), "GET", b"/queue/v1/after", &[], b"");
    assert_eq!(ok.status, 200);
    assert_auth_ok(&ok.json());
}

#[test]
fn connect_failure_is_retried_and_succeeds_when_the_upstream_comes_up() {
    let port = free_port();
    let dir = TestDir::new();
    let proxy = proxy_with(
        &dir,
        &format!("http://127.0.0.1:{port}"),
        "  retries:\n    max_attempts: 6\n    initial_backoff_ms: 100\n    max_seconds: 10\n",
    );
    let addr = proxy.addr();
    let client = thread::spawn(move || {
        let start = Instant::now();
        let r = send(addr, "POST", b"/queue/v1/task", &[], b"payload");
        (r, start.elapsed())
    });
    // The upstream appears after the first attempts failed.
    thread::sleep(Duration::from_millis(250));
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    let head = read_head(&mut conn);
    let mut body = [0u8; 7];
    conn.read_exact(&mut body).unwrap();
    conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        .unwrap();
    let (r, took) = client.join().unwrap();
    eprintln!("POST succeeded after {took:?} of retries");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, b"ok");
    assert_eq!(&body, b"payload");
    assert!(
        head.to_ascii_lowercase().contains("authorization: hawk "),
        "{head}"
    );
}

#[test]
fn connect_retries_stop_at_the_budget() {
    let port = free_port();
    let dir = TestDir::new();
    let proxy = proxy_with(
        &dir,
        &format!("http://127.0.0.1:{port}"),
        "  retries:\n    max_attempts: 3\n    initial_backoff_ms: 50\n",
    );
    let start = Instant::now();
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    assert_eq!(r.status, 502);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

/// An upstream that reads `keep` bytes of each request body, then drops the connection,
/// counting connections.
fn dropping_upstream(keep: usize) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            c.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                read_head(&mut conn);
                let mut left = keep;
                let mut buf = vec![0u8; 64 * 1024];
                while left > 0 {
                    match conn.read(&mut buf[..left.min(64 * 1024)]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => left -= n,
                    }
                }
            });
        }
    });
    (port, count)
}

#[test]
fn large_post_is_never_replayed_after_a_mid_stream_failure() {
    let (port, connections) = dropping_upstream(1024 * 1024);
    let dir = TestDir::new();
    let proxy = proxy_with(&dir, &format!("http://127.0.0.1:{port}"), "");
    let mut s = TcpStream::connect(proxy.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let len = 100 * 1024 * 1024;
    write!(
        s,
        "POST /queue/v1/upload HTTP/1.1\r\nHost: p\r\nContent-Length: {len}\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![7u8; 1024 * 1024];
    for _ in 0..100 {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "the 100 MiB POST was sent upstream more than once"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 5"),
        "unexpected answer {text:?}"
    );
    // The proxy is still serving.
    assert_eq!(send(proxy.addr(), "GET", b"/-bad/x", &[], b"").status, 404);
}

#[test]
fn client_disconnect_cancels_the_upstream_request_without_retry() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = TestDir::new();
    let proxy = proxy_with(&dir, &format!("http://127.0.0.1:{port}"), "");
    let mut client = TcpStream::connect(proxy.addr()).unwrap();
    client
        .write_all(b"GET /queue/v1/slow HTTP/1.1\r\nHost: p\r\n\r\n")
        .unwrap();
    let (mut upstream, _) = listener.accept().unwrap();
    read_head(&mut upstream);
    drop(client);
    upstream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = upstream.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "upstream connection should be closed");
    assert!(start.elapsed() < Duration::from_secs(5));
    listener.set_nonblocking(true).unwrap();
    thread::sleep(Duration::from_millis(500));
    assert!(
        listener.accept().is_err(),
        "a retry started after the client left"
    );
}

#[test]
fn path_and_header_limits() {
    let tc = fake();
    let dir = TestDir::new();
    let proxy = proxy_with(
        &dir,
        &tc.root_url(),
        "  limits:\n    max_path_bytes: 100\n    max_header_bytes: 2000\n",
    );
    let long = format!("/queue/v1/{}", "a".repeat(200));
    let r = send(proxy.addr(), "GET", long.as_bytes(), &[], b"");
    assert_eq!(r.status, 414, "{}", r.text());
    let big = "x".repeat(3000);
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[("X-Big", &big)], b"");
    assert_eq!(r.status, 431, "{}", r.text());
    assert_eq!(tc.requests_seen(), 0);
    let r = send(proxy.addr(), "GET", b"/queue/v1/fine", &[], b"");
    assert_eq!(r.status, 200);
}

#[test]
fn per_client_rate_limit() {
    let tc = fake();
    let dir = TestDir::new();
    let proxy = proxy_with(
        &dir,
        &tc.root_url(),
        "  limits:\n    requests_per_second_per_client: 5\n",
    );
    let statuses: Vec<u16> = (0..12)
        .map(|_| send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"").status)
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses[..5].iter().all(|s| *s == 200), "{statuses:?}");
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"").status,
        200
    );
}

#[test]
fn connection_limit_answers_503() {
    let tc = fake();
    let dir = TestDir::new();
    let proxy = proxy_with(&dir, &tc.root_url(), "  limits:\n    max_connections: 1\n");
    // The first connection stays open (keep-alive) and counted.
    let mut first = support::Conn::connect(proxy.addr()).unwrap();
    assert_eq!(
        first
            .request("GET", b"/queue/v1/a", &[], b"")
            .unwrap()
            .status,
        200
    );
    let r = send(proxy.addr(), "GET", b"/queue/v1/b", &[], b"");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        first
            .request("GET", b"/queue/v1/c", &[], b"")
            .unwrap()
            .status,
        200
    );
    drop(first);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        send(proxy.addr(), "GET", b"/queue/v1/d", &[], b"").status,
        200
    );
}

#[test]
fn credentials_only_on_the_admin_listener_when_configured() {
    let tc = fake();
    let dir = TestDir::new();
    let admin_port = free_port();
    let proxy = proxy_with(
        &dir,
        &tc.root_url(),
        &format!(
            "  credentials_endpoint: admin\n  admin_listen:\n    - address: \"127.0.0.1:{admin_port}\"\n"
        ),
    );
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let body = json!({"clientId": CLIENT2_ID, "accessToken": support::ACCESS_TOKEN2}).to_string();
    let r = send(proxy.addr(), "PUT", b"/credentials", &[], body.as_bytes());
    assert_eq!(r.status, 403, "{}", r.text());
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    assert_eq!(r.json()["auth"]["clientId"], json!(CLIENT_ID));

    let r = send(admin, "PUT", b"/credentials", &[], body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(admin, "GET", b"/queue/v1/x", &[], b"");
    assert_eq!(r.status, 404, "the admin listener proxies nothing");
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    assert_eq!(r.json()["auth"]["clientId"], json!(CLIENT2_ID));
}

#[test]
fn expiring_certificate_is_warned_about() {
    let tc = fake();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let tmp = support::creds::make_temp_creds(
        &support::default_client(),
        None,
        &["queue:*"],
        now_ms - 60_000,
        now_ms + 5 * 60_000,
        &support::creds::random_seed(),
    );
    let root = tc.root_url();
    let proxy = ProxyProcess::spawn(
        &[
            "--root-url",
            &root,
            "--client-id",
            &tmp.client_id,
            "--certificate",
            &tmp.certificate,
        ],
        &[("TASKCLUSTER_ACCESS_TOKEN", &tmp.access_token)],
    );
    assert!(support::wait_until(Duration::from_secs(5), || proxy
        .stderr_text()
        .contains("expires in")));
    assert!(!proxy.stderr_text().contains(&tmp.access_token));
}

#[test]
fn hostname_allowlist_limits_the_hostname_form() {
    let tc = support::FakeTc::start(support::FakeTcOptions {
        tls: true,
        dns_names: vec!["files.example.com".into(), "other.example.org".into()],
        clients: vec![support::default_client()],
        ..Default::default()
    });
    let dir = TestDir::new();
    let ca = tc.ca_file().unwrap();
    let section = format!(
        "  ca_file: {}\n  connect_to:\n    - \"files.example.com:443:127.0.0.1:{port}\"\n    - \"other.example.org:443:127.0.0.1:{port}\"\n  hostname_allowlist: [\"*.example.com\"]\n",
        yq(&ca.to_string_lossy()),
        port = tc.port()
    );
    let proxy = proxy_with(&dir, &tc.root_url(), &section);
    let r = send(proxy.addr(), "GET", b"/Files.Example.com/x", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_auth_ok(&r.json());
    let seen = tc.requests_seen();
    let r = send(proxy.addr(), "GET", b"/other.example.org/x", &[], b"");
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("other.example.org"));
    assert_eq!(tc.requests_seen(), seen, "a refused host was contacted");
    // API and shortcut forms are not affected.
    assert_eq!(
        send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"").status,
        200
    );

    // An empty list refuses every hostname-form request; a bad pattern stops start-up.
    let dir = TestDir::new();
    let proxy = proxy_with(&dir, &tc.root_url(), "  hostname_allowlist: []\n");
    assert_eq!(
        send(proxy.addr(), "GET", b"/files.example.com/x", &[], b"").status,
        403
    );
    let conf = dir.write(
        "bad.yaml",
        &format!(
            "{}taskcluster_proxy:\n  hostname_allowlist: [\"a.*.com\"]\n",
            dir.server_keys(1)
        ),
    );
    let (code, _, err) =
        support::proxy::run_to_exit(&["-c", &conf, "--test-conf"], &[], Duration::from_secs(10));
    assert_ne!(code, Some(0));
    assert!(err.contains("hostname_allowlist"), "{err}");
}

/// Runs a full scenario at trace level and scans every log line and every response for the
/// access tokens (permanent, rotated, and temporary).
#[test]
fn no_secret_in_trace_logs_or_responses() {
    let tc = fake();
    let tmp = support::creds::fresh_temp_creds(
        &support::default_client(),
        Some("proxy-test/temp/scan"),
        &["queue:*"],
    );
    let root = tc.root_url();
    let proxy = ProxyProcess::spawn(
        &["--root-url", &root, "--client-id", CLIENT_ID, "queue:x"],
        &[
            ("TASKCLUSTER_ACCESS_TOKEN", ACCESS_TOKEN),
            ("RUST_LOG", "trace"),
        ],
    );
    let a = proxy.addr();
    let mut responses = vec![
        send(a, "GET", b"/queue/v1/x?bewit=abc", &[], b""),
        send(
            a,
            "POST",
            b"/api/auth/v1/y",
            &[("Authorization", "Bearer task")],
            b"{}",
        ),
        send(a, "GET", b"/-bad/v1/x", &[], b""),
        send(a, "POST", b"/bewit", &[], b"https://tc.example.com/x?a=1"),
        send(a, "POST", b"/bewit", &[], b"not a url"),
        send(a, "PUT", b"/credentials", &[], b"{\"clientId\":\"x\"}"),
    ];
    let rotate = json!({"clientId": CLIENT2_ID, "accessToken": support::ACCESS_TOKEN2}).to_string();
    responses.push(send(a, "PUT", b"/credentials", &[], rotate.as_bytes()));
    responses.push(send(a, "GET", b"/queue/v1/__status/500", &[], b""));
    let temp = json!({"clientId": tmp.client_id, "accessToken": tmp.access_token, "certificate": tmp.certificate}).to_string();
    responses.push(send(a, "PUT", b"/credentials", &[], temp.as_bytes()));
    responses.push(send(a, "GET", b"/queue/v1/z", &[], b""));
    assert_auth_ok(&responses.last().unwrap().json());
    // an upstream failure path too
    let dead = ProxyProcess::spawn(
        &[
            "--root-url",
            &format!("http://127.0.0.1:{}", free_port()),
            "--client-id",
            CLIENT_ID,
        ],
        &[
            ("TASKCLUSTER_ACCESS_TOKEN", ACCESS_TOKEN),
            ("RUST_LOG", "trace"),
        ],
    );
    responses.push(send(dead.addr(), "GET", b"/queue/v1/x", &[], b""));
    thread::sleep(Duration::from_millis(300));

    let logs = proxy.stderr_text() + &dead.stderr_text();
    assert!(
        logs.contains(" TRACE ") && logs.contains(" DEBUG "),
        "trace logging is not on"
    );
    for secret in [
        ACCESS_TOKEN,
        support::ACCESS_TOKEN2,
        tmp.access_token.as_str(),
    ] {
        assert!(!logs.contains(secret), "a token appears in the logs");
        for r in &responses {
            let headers: String = r
                .headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}\n"))
                .collect();
            assert!(
                !headers.contains(secret) && !r.text().contains(secret),
                "a token appears in a response"
            );
        }
    }
    let leaks: Vec<&str> = logs.lines().filter(|l| l.contains("bewit=abc")).collect();
    assert!(leaks.is_empty(), "a bewit appears in the logs: {leaks:#?}");
}

#[test]
fn idempotent_5xx_is_retried_and_the_last_answer_relayed() {
    // A flaky task fetch: the first answer is 500, the retry succeeds.
    let tc = support::FakeTc::start(support::FakeTcOptions {
        clients: vec![support::default_client()],
        tasks: vec![("flaky".into(), vec!["queue:x".into()])],
        ..Default::default()
    });
    let dir = TestDir::new();
    let proxy = proxy_with(
        &dir,
        &tc.root_url(),
        "  retries:\n    max_attempts: 3\n    initial_backoff_ms: 20\n",
    );
    tc.fail_next_task_fetches(1);
    let r = send(proxy.addr(), "GET", b"/queue/v1/task/flaky", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tc.task_fetches(), 2, "one failed attempt, one retry");

    // Always 503: GET is tried max_attempts times and the final 503 reaches the task intact.
    let seen = tc.requests_seen();
    let r = send(proxy.addr(), "GET", b"/queue/v1/__status/503", &[], b"");
    assert_eq!(r.status, 503);
    assert_auth_ok(&r.json());
    assert_eq!(tc.requests_seen() - seen, 3);

    // POST is not idempotent: one attempt only.
    let seen = tc.requests_seen();
    let r = send(proxy.addr(), "POST", b"/queue/v1/__status/503", &[], b"{}");
    assert_eq!(r.status, 503);
    assert_eq!(tc.requests_seen() - seen, 1);

    // A PUT with a small body is replayed intact.
    let seen = tc.requests_seen();
    let r = send(
        proxy.addr(),
        "PUT",
        b"/queue/v1/__status/502",
        &[],
        b"replay me",
    );
    assert_eq!(r.status, 502);
    assert_eq!(tc.requests_seen() - seen, 3);
    assert_eq!(
        r.json()["echo"]["body_len"]
            .as_u64()
            .or(r.json()["body_len"].as_u64()),
        Some(9)
    );
}

/// `credentials_endpoint: root`: the worker (root) may rotate, a task running as another
/// user may not, even on the same port.
#[test]
fn credentials_only_from_root_when_configured() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot run a client as another user; skipping");
        return;
    }
    let user = "tcp-admission-other";
    if !std::process::Command::new("id")
        .args(["-u", user])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let status = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                user,
            ])
            .status()
            .expect("useradd");
        assert!(status.success(), "useradd {user}");
    }
    let tc = fake();
    let dir = TestDir::new();
    let proxy = proxy_with(&dir, &tc.root_url(), "  credentials_endpoint: root\n");
    let url = format!("http://{}/credentials", proxy.addr());
    let body = json!({"clientId": CLIENT2_ID, "accessToken": support::ACCESS_TOKEN2}).to_string();
    let as_other = std::process::Command::new("runuser")
        .args([
            "-u",
            user,
            "--",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-X", "PUT", "--data", &body, &url])
        .output()
        .expect("runuser curl");
    assert_eq!(String::from_utf8_lossy(&as_other.stdout), "403");
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    assert_eq!(
        r.json()["auth"]["clientId"],
        json!(CLIENT_ID),
        "rotation refused"
    );

    let r = send(proxy.addr(), "PUT", b"/credentials", &[], body.as_bytes());
    assert_eq!(r.status, 200, "root may rotate: {}", r.text());
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    assert_eq!(r.json()["auth"]["clientId"], json!(CLIENT2_ID));
}
