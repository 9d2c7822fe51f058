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

/// Sends `PUT target` with `body` (as `Content-Length`, or chunked in 64 KiB chunks) and
/// returns the status and the fake upstream's echo records of the attempts it caused.
fn put_attempts(
    tc: &support::FakeTc,
    proxy: SocketAddr,
    target: &str,
    body: &[u8],
    chunked: bool,
) -> (u16, Vec<serde_json::Value>) {
    let before = tc.requests().len();
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {}", body.len())
    };
    write!(
        s,
        "PUT {target} HTTP/1.1\r\nHost: p\r\nConnection: close\r\n{framing}\r\n\r\n"
    )
    .unwrap();
    if chunked {
        for chunk in body.chunks(64 * 1024) {
            write!(s, "{:x}\r\n", chunk.len()).unwrap();
            s.write_all(chunk).unwrap();
            s.write_all(b"\r\n").unwrap();
        }
        s.write_all(b"0\r\n\r\n").unwrap();
    } else {
        s.write_all(body).unwrap();
    }
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let status = String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, tc.requests()[before..].to_vec())
}

/// Every attempt carried the whole body and its own valid signature.
fn assert_replayed_intact(attempts: &[serde_json::Value], body: &[u8]) {
    let sha = support::fake_tc::sha256_hex(body);
    let mut authorizations = std::collections::HashSet::new();
    for a in attempts {
        assert_eq!(a["body_len"].as_u64(), Some(body.len() as u64), "{a}");
        assert_eq!(a["body_sha256"].as_str(), Some(sha.as_str()));
        assert_auth_ok(a);
        authorizations.insert(
            a["headers"]["authorization"][0]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(
        authorizations.len(),
        attempts.len(),
        "each attempt is signed afresh"
    );
}

#[test]
fn idempotent_bodies_up_to_the_replay_buffer_are_replayed_intact() {
    let tc = fake();
    let dir = TestDir::new();
    // Default replay_buffer_bytes: 1 MiB, 16 times Pingora's own 64 KiB.
    let proxy = proxy_with(
        &dir,
        &tc.root_url(),
        "  retries:\n    max_attempts: 3\n    initial_backoff_ms: 10\n",
    );
    let mib: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();

    let (status, attempts) = put_attempts(&tc, proxy.addr(), "/queue/v1/__status/503", &mib, false);
    assert_eq!(status, 503);
    assert_eq!(attempts.len(), 3, "a 1 MiB PUT is replayed on 5xx");
    assert_replayed_intact(&attempts, &mib);

    let chunked = &mib[..700 * 1024];
    let (status, attempts) =
        put_attempts(&tc, proxy.addr(), "/queue/v1/__status/502", chunked, true);
    assert_eq!(status, 502);
    assert_eq!(attempts.len(), 3, "a chunked 700 KiB PUT is replayed too");
    assert_replayed_intact(&attempts, chunked);

    // One byte over: streamed once, never replayed.
    let mut over = mib.clone();
    over.push(0);
    let (status, attempts) =
        put_attempts(&tc, proxy.addr(), "/queue/v1/__status/503", &over, false);
    assert_eq!(status, 503);
    assert_eq!(
        attempts.len(),
        1,
        "a body over the replay buffer is not replayed"
    );
    assert_eq!(attempts[0]["body_len"].as_u64(), Some(over.len() as u64));

    // A chunked body that turns out larger than the buffer: not replayed either.
    let (status, attempts) = put_attempts(&tc, proxy.addr(), "/queue/v1/__status/503", &over, true);
    assert_eq!(status, 503);
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["body_len"].as_u64(), Some(over.len() as u64));

    // The buffer is configurable.
    let small = proxy_with(
        &TestDir::new(),
        &tc.root_url(),
        "  retries:\n    max_attempts: 2\n    initial_backoff_ms: 10\n    replay_buffer_bytes: 1000\n",
    );
    let (_, attempts) = put_attempts(
        &tc,
        small.addr(),
        "/queue/v1/__status/503",
        &mib[..1000],
        false,
    );
    assert_eq!(attempts.len(), 2);
    let (_, attempts) = put_attempts(
        &tc,
        small.addr(),
        "/queue/v1/__status/503",
        &mib[..1001],
        false,
    );
    assert_eq!(attempts.len(), 1);
}

#[test]
fn replay_budget_bounds_the_bodies_held_at_once() {
    let tc = fake();
    let dir = TestDir::new();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = proxy_with(
        &dir,
        &tc.root_url(),
        &format!(
            "  metrics_address: \"{metrics}\"\n  retries:\n    max_attempts: 3\n    initial_backoff_ms: 10\n    replay_budget_bytes: 1048576\n"
        ),
    );
    let refused = || {
        let text = support::client::get(metrics, "/metrics").text();
        support::metric(&text, "taskcluster_proxy_retry_replay_refused_total")
    };
    assert_eq!(refused(), Some(0.0));
    let body = vec![5u8; 200 * 1024];
    // A 1 MiB PUT in flight (half its body sent) holds the whole budget.
    let mut holder = TcpStream::connect(proxy.addr()).unwrap();
    write!(
        holder,
        "PUT /queue/v1/slow-upload HTTP/1.1\r\nHost: p\r\nContent-Length: 1048576\r\n\r\n"
    )
    .unwrap();
    holder.write_all(&vec![1u8; 512 * 1024]).unwrap();
    // Once its head reached the upstream, the proxy has reserved its share.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tc.requests_seen() == 0 {
        assert!(
            Instant::now() < deadline,
            "the upload never reached the upstream"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let (status, attempts) =
        put_attempts(&tc, proxy.addr(), "/queue/v1/__status/503", &body, false);
    assert_eq!(status, 503);
    assert_eq!(
        attempts.len(),
        1,
        "sent without a replay copy, so not retried"
    );
    assert_eq!(attempts[0]["body_len"].as_u64(), Some(body.len() as u64));
    // The upload ends (the client gives up): its share comes back.
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, attempts) =
            put_attempts(&tc, proxy.addr(), "/queue/v1/__status/503", &body, false);
        assert_eq!(status, 503);
        if attempts.len() == 3 {
            assert_replayed_intact(&attempts, &body);
            break;
        }
        assert!(Instant::now() < deadline, "the budget was never given back");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `bytes` one at a time, `gap` apart, until the peer closes; returns how long the
/// connection stayed open, or `None` if it outlived `limit`.
fn trickle_until_closed(
    s: &mut TcpStream,
    bytes: &[u8],
    gap: Duration,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(gap)).unwrap();
    for b in bytes.iter().cycle() {
        if start.elapsed() > limit {
            return None;
        }
        if s.write_all(&[*b]).is_err() {
            return Some(start.elapsed());
        }
        let mut buf = [0u8; 256];
        match s.read(&mut buf) {
            Ok(0) | Err(_) if start.elapsed() > limit => return None,
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => panic!("the proxy answered a request that never ended"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    unreachable!()
}

#[test]
fn a_trickled_request_header_is_cut_off_at_the_header_deadline() {
    let tc = fake();
    let dir = TestDir::new();
    let proxy = proxy_with(
        &dir,
        &tc.root_url(),
        "  downstream_timeouts:\n    header_seconds: 1\n",
    );
    // One byte every 100 ms: never silent long enough for the 60 s per-read timeout.
    let mut s = TcpStream::connect(proxy.addr()).unwrap();
    s.write_all(b"GET /queue/v1/x HTTP/1.1\r\n").unwrap();
    let open = trickle_until_closed(
        &mut s,
        b"X-Slow: aaaaaaaaaaaaaaaaaaaa\r\n",
        Duration::from_millis(100),
        Duration::from_secs(10),
    )
    .expect("a trickling client kept its connection past 10 s");
    eprintln!("trickled header cut off after {open:?}");
    assert!(open >= Duration::from_millis(800), "{open:?}");
    assert!(open < Duration::from_secs(4), "{open:?}");

    // The deadline starts with a request's first byte: an idle keep-alive connection
    // longer than header_seconds still gets its next request served.
    let mut c = support::Conn::connect(proxy.addr()).unwrap();
    let r = c.request("GET", b"/queue/v1/first", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    thread::sleep(Duration::from_millis(1500));
    let r = c.request("GET", b"/queue/v1/second", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert_auth_ok(&r.json());

    // Without the deadline (0), the same trickle is only bound by the per-read timeout.
    let off = proxy_with(
        &TestDir::new(),
        &tc.root_url(),
        "  downstream_timeouts:\n    header_seconds: 0\n",
    );
    let mut s = TcpStream::connect(off.addr()).unwrap();
    s.write_all(b"GET /queue/v1/x HTTP/1.1\r\n").unwrap();
    assert_eq!(
        trickle_until_closed(
            &mut s,
            b"X-Slow: a\r\n",
            Duration::from_millis(100),
            Duration::from_secs(3)
        ),
        None,
        "with header_seconds: 0 the connection should stay open"
    );
}

/// An upstream whose first connection answers one request, then drops the next one part-way
/// through its body (a pooled connection dying mid-request); later connections read whole
/// bodies and answer `200` with the number of body bytes received.
fn upstream_dropping_second_request(drop_after: usize) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let c = connections.clone();
    let content_length = |head: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0)
    };
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let first = c.fetch_add(1, Ordering::SeqCst) == 0;
            thread::spawn(move || loop {
                let head = read_head(&mut conn);
                if head.is_empty() {
                    return;
                }
                let len = content_length(&head);
                let mut left = if first { len.min(drop_after) } else { len };
                let mut got = 0;
                let mut buf = vec![0u8; 64 * 1024];
                while left > 0 {
                    match conn.read(&mut buf[..left.min(64 * 1024)]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            left -= n;
                            got += n;
                        }
                    }
                }
                if first && len > drop_after {
                    return; // dropped mid-body
                }
                let body = format!("got {got}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if conn.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            });
        }
    });
    (port, connections)
}

#[test]
fn a_put_over_64_kib_is_replayed_after_its_upstream_connection_dies_mid_body() {
    // 512 KiB: eight times Pingora's own replay limit. Kept (default 1 MiB buffer): one
    // retry on a new connection. Not kept (a 256 KiB buffer): the failure reaches the task.
    let body = vec![9u8; 512 * 1024];
    for (section, status, connections_used) in
        [("", 200, 2), ("    replay_buffer_bytes: 262144\n", 502, 1)]
    {
        let (port, connections) = upstream_dropping_second_request(100 * 1024);
        let dir = TestDir::new();
        let proxy = proxy_with(
            &dir,
            &format!("http://127.0.0.1:{port}"),
            &format!("  retries:\n    initial_backoff_ms: 10\n{section}"),
        );
        let mut c = support::Conn::connect(proxy.addr()).unwrap();
        let r = c.request("GET", b"/queue/v1/warm", &[], b"").unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let r = c.request("PUT", b"/queue/v1/put", &[], &body).unwrap();
        assert_eq!(r.status, status, "{}\n{}", r.text(), proxy.stderr_text());
        if status == 200 {
            assert_eq!(r.text(), format!("got {}", body.len()));
        }
        assert_eq!(connections.load(Ordering::SeqCst), connections_used);
    }
}
