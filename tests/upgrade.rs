//! Zero-downtime upgrade (Pingora's `-u` + SIGQUIT) with credential state hand-over:
//! no request fails or goes unsigned while a new process takes over the listening socket,
//! credentials rotated in the old process (before or during the upgrade) are used by the new
//! one, and a 1 GiB download in flight on the old process completes.

mod support;

use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use support::client::{self, Conn};
use support::creds::fresh_temp_creds;
use support::process::{free_addr, mode_of, yq, Proc, TestDir};
use support::{
    assert_auth_ok, default_client, send, FakeTc, Response, ACCESS_TOKEN, ACCESS_TOKEN2,
    CLIENT2_ID, CLIENT_ID,
};

const GRACE: u64 = 3;
const GIB: u64 = 1024 * 1024 * 1024;
/// Pace of the 1 GiB download in the load test (reads are throttled to this duration).
const DOWNLOAD_SECS: f64 = 6.5;
/// Old process after SIGQUIT: ~5 s hand-over window, the grace period, then at most
/// `graceful_shutdown_timeout_seconds` (1) — with generous slack.
const OLD_EXIT_TIMEOUT: Duration = Duration::from_secs(5 + GRACE + 1 + 10);

struct Setup {
    tc: FakeTc,
    dir: TestDir,
    addr: SocketAddr,
    conf: String,
}

impl Setup {
    /// Fake knowing both clients; config with one TCP listener, the first client, and
    /// `state_file` (unless `explicit_state_file` is false: then the default applies).
    fn new(explicit_state_file: bool) -> Setup {
        let tc = support::fake();
        let dir = TestDir::new();
        let addr = free_addr();
        let conf = dir.write_tcp_conf(
            GRACE,
            addr,
            &tc.root_url(),
            &format!(
                "  credentials:\n    client_id: {}\n    access_token: {}\n{}",
                yq(CLIENT_ID),
                yq(ACCESS_TOKEN),
                dir.state_file_key(explicit_state_file)
            ),
        );
        Setup {
            tc,
            dir,
            addr,
            conf,
        }
    }

    /// A process without `-u`, serving once this returns.
    fn start_fresh(&self) -> Proc {
        let mut p = Proc::start(&["-c", &self.conf], &[]);
        p.expect_tcp(self.addr);
        p
    }

    /// A process with `-u`, waiting on the upgrade socket once this returns.
    fn start_upgrade(&self) -> Proc {
        Proc::start_upgrade(&self.conf, &self.dir.upgrade_sock())
    }
}

fn creds_body(client_id: &str, token: &str, certificate: Option<&str>) -> Vec<u8> {
    let mut v = json!({"clientId": client_id, "accessToken": token});
    if let Some(c) = certificate {
        v["certificate"] = json!(c);
    }
    v.to_string().into_bytes()
}

/// `PUT /credentials` on a fresh connection; asserts 200.
#[track_caller]
fn put_credentials(addr: SocketAddr, body: &[u8]) {
    let r = send(
        addr,
        "PUT",
        b"/credentials",
        &[("Content-Type", "application/json")],
        body,
    );
    assert_eq!(r.status, 200, "PUT /credentials: {}", r.text());
}

/// GET on a fresh connection; asserts 200 + accepted signature; returns the response.
#[track_caller]
fn whoami(addr: SocketAddr) -> Response {
    let r = send(addr, "GET", b"/queue/v1/whoami", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_auth_ok(&r.json());
    r
}

fn signer(r: &Response) -> Value {
    r.json()["auth"]["clientId"].clone()
}

// ---------------------------------------------------------------------------------------------
// Load generator

struct Shared {
    stop: AtomicBool,
    completed: AtomicUsize,
}

/// One request as the client saw it.
struct Rec {
    worker: usize,
    keepalive: bool,
    method: &'static str,
    target: String,
    start: Instant,
    end: Instant,
    /// Re-sends after a reused keep-alive connection closed before any response byte.
    retries: u32,
    /// Empty when everything checked out.
    error: Option<String>,
}

/// Checks one response: 200, accepted signature by the second client, the request as sent.
fn check_response(r: &Response, method: &str, target: &str, body_len: usize) -> Option<String> {
    if r.status != 200 {
        let t = r.text();
        return Some(format!("status {} {:?}", r.status, &t[..t.len().min(300)]));
    }
    let e: Value = match serde_json::from_slice(&r.body) {
        Ok(v) => v,
        Err(err) => return Some(format!("body is not JSON: {err}")),
    };
    if e["auth"]["ok"] != json!(true) {
        return Some(format!("fake rejected the signature: {}", e["auth"]));
    }
    if e["auth"]["clientId"] != json!(CLIENT2_ID) {
        return Some(format!(
            "signed by {} instead of {CLIENT2_ID}",
            e["auth"]["clientId"]
        ));
    }
    if r.header("x-taskcluster-proxy-perm-clientid") != Some(CLIENT2_ID) {
        return Some(format!(
            "X-Taskcluster-Proxy-Perm-ClientId {:?}",
            r.header("x-taskcluster-proxy-perm-clientid")
        ));
    }
    if e["target"] != json!(format!("/api{target}")) || e["method"] != json!(method) {
        return Some(format!("upstream saw {} {}", e["method"], e["target"]));
    }
    if e["body_len"] != json!(body_len) {
        return Some(format!(
            "upstream got {} body bytes, sent {body_len}",
            e["body_len"]
        ));
    }
    None
}

/// Sends requests until told to stop: GET and POST (small JSON body) alternately, either all on
/// one keep-alive connection (re-opened when the server closes it) or one connection each.
fn worker(id: usize, keepalive: bool, addr: SocketAddr, shared: Arc<Shared>) -> Vec<Rec> {
    const IO_TIMEOUT: Duration = Duration::from_secs(10);
    let mut recs = Vec::new();
    let mut conn: Option<Conn> = None;
    let mut answered_on_conn = 0u32;
    let mut seq = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        seq += 1;
        let post = seq % 2 == 0;
        let method = if post { "POST" } else { "GET" };
        let target = format!("/queue/v1/load/{id}/{seq}");
        let body = if post {
            format!("{{\"worker\":{id},\"seq\":{seq}}}")
        } else {
            String::new()
        };
        let mut headers: Vec<(&str, &str)> = vec![];
        if post {
            headers.push(("Content-Type", "application/json"));
        }
        if !keepalive {
            headers.push(("Connection", "close"));
        }
        let start = Instant::now();
        let mut retries = 0u32;
        let error = loop {
            if conn.is_none() {
                match Conn::connect_with_timeout(addr, IO_TIMEOUT) {
                    Ok(c) => {
                        conn = Some(c);
                        answered_on_conn = 0;
                    }
                    Err(e) => break Some(format!("connect: {e}")),
                }
            }
            let reused = answered_on_conn > 0;
            let c = conn.as_mut().unwrap();
            let before = c.bytes_received();
            match c.request(method, target.as_bytes(), &headers, body.as_bytes()) {
                Ok(r) => {
                    answered_on_conn += 1;
                    if !keepalive || c.is_closed() {
                        conn = None;
                    }
                    break check_response(&r, method, &target, body.len());
                }
                Err(e) => {
                    let nothing_arrived = c.bytes_received() == before;
                    conn = None;
                    if reused && nothing_arrived && retries < 3 {
                        retries += 1;
                        continue;
                    }
                    break Some(format!(
                        "{} connection ({} earlier responses on it), {} response bytes before the error: {e}",
                        if reused { "reused" } else { "new" },
                        answered_on_conn,
                        if nothing_arrived { "no" } else { "some" },
                    ));
                }
            }
        };
        recs.push(Rec {
            worker: id,
            keepalive,
            method,
            target,
            start,
            end: Instant::now(),
            retries,
            error,
        });
        shared.completed.fetch_add(1, Ordering::SeqCst);
    }
    recs
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Time of `t` relative to `origin` in seconds (negative if before).
fn rel(t: Instant, origin: Instant) -> f64 {
    if t >= origin {
        secs(t - origin)
    } else {
        -secs(origin - t)
    }
}

#[test]
fn upgrade_under_load_with_rotated_credentials() {
    const KEEPALIVE_WORKERS: usize = 3;
    const FRESH_WORKERS: usize = 3;
    const MIN_REQUESTS: usize = 2000;
    let test_start = Instant::now();
    let s = Setup::new(true);
    let mut old = s.start_fresh();
    let old_pid = old.pid();
    assert_eq!(signer(&whoami(s.addr)), json!(CLIENT_ID));

    // rotate before the upgrade
    put_credentials(s.addr, &creds_body(CLIENT2_ID, ACCESS_TOKEN2, None));
    assert_eq!(signer(&whoami(s.addr)), json!(CLIENT2_ID));
    let state = s.dir.state_file();
    assert!(
        state.exists(),
        "PUT /credentials must persist {}",
        state.display()
    );
    assert_eq!(mode_of(&state), 0o600, "state file mode");
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(
        text.contains(CLIENT2_ID),
        "the state file must hold the rotated credentials once PUT /credentials answered 200: {}",
        state.display()
    );

    // load
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        completed: AtomicUsize::new(0),
    });
    let mut workers = vec![];
    for id in 0..KEEPALIVE_WORKERS + FRESH_WORKERS {
        let keepalive = id < KEEPALIVE_WORKERS;
        let sh = shared.clone();
        let addr = s.addr;
        workers.push(
            std::thread::Builder::new()
                .name(format!("load-{id}"))
                .spawn(move || worker(id, keepalive, addr, sh))
                .unwrap(),
        );
    }
    assert!(
        support::wait_until(Duration::from_secs(20), || shared
            .completed
            .load(Ordering::SeqCst)
            >= 100),
        "the load generator does not get responses from the old process"
    );

    let mut new = s.start_upgrade();
    let new_pid = new.pid();

    // a 1 GiB download from the old process, started just before SIGQUIT; read at a pace that
    // makes it last ~DOWNLOAD_SECS, past the moment the old process stops accepting (~5 s) but
    // inside its grace period
    let (tx, rx) = mpsc::channel();
    let addr = s.addr;
    let download = std::thread::spawn(move || {
        let mut signalled = false;
        let start = Instant::now();
        let bytes_per_sec = GIB as f64 / DOWNLOAD_SECS;
        let d = client::download_with_progress(
            addr,
            &format!("/queue/v1/__download/{GIB}"),
            &[],
            &mut |n| {
                if !signalled && n > 0 {
                    signalled = true;
                    let _ = tx.send(());
                }
                let due = start + Duration::from_secs_f64(n as f64 / bytes_per_sec);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            },
        );
        (d, start, Instant::now())
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the 1 GiB download did not start");

    let t_quit = Instant::now();
    let sent_before_quit = shared.completed.load(Ordering::SeqCst);
    old.signal(libc::SIGQUIT);
    let old_status = old.wait_exit(OLD_EXIT_TIMEOUT);
    let t_old_exit = Instant::now();
    let old_stderr = old.stderr_text();
    assert!(
        old_status.is_some(),
        "old process {old_pid} still running {OLD_EXIT_TIMEOUT:?} after SIGQUIT\n--- old stderr ---\n{old_stderr}"
    );
    let at_old_exit = shared.completed.load(Ordering::SeqCst);

    // keep going: at least MIN_REQUESTS in total, and a batch served by the new process alone
    let enough = support::wait_until(Duration::from_secs(20), || {
        let n = shared.completed.load(Ordering::SeqCst);
        n >= MIN_REQUESTS && n >= at_old_exit + 200
    });
    shared.stop.store(true, Ordering::SeqCst);
    let recs: Vec<Rec> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("load worker panicked"))
        .collect();
    let (d, download_start, download_end) = download.join().expect("download thread panicked");
    let new_running = new.is_running();

    // ---- numbers
    let total = recs.len();
    let failures: Vec<&Rec> = recs.iter().filter(|r| r.error.is_some()).collect();
    let retried: Vec<&Rec> = recs.iter().filter(|r| r.retries > 0).collect();
    let retries_get: u32 = retried
        .iter()
        .filter(|r| r.method == "GET")
        .map(|r| r.retries)
        .sum();
    let retries_post: u32 = retried
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.retries)
        .sum();
    let handover: Vec<&Rec> = recs
        .iter()
        .filter(|r| r.end >= t_quit && r.start <= t_old_exit)
        .collect();
    let longest = |set: &[&Rec]| {
        set.iter()
            .max_by_key(|r| r.end - r.start)
            .map(|r| (r.end - r.start, r.target.clone(), rel(r.start, t_quit)))
    };
    let all_refs: Vec<&Rec> = recs.iter().collect();
    let longest_handover = longest(&handover);
    let longest_all = longest(&all_refs);
    let after_exit = recs.iter().filter(|r| r.start > t_old_exit).count();
    let keepalive_count = recs.iter().filter(|r| r.keepalive).count();
    println!("upgrade under load:");
    println!(
        "  requests: {total} ({keepalive_count} on keep-alive connections, {} one per connection); {sent_before_quit} before SIGQUIT, {} during the hand-over, {after_exit} after the old process exited",
        total - keepalive_count,
        handover.len()
    );
    println!("  failures: {}", failures.len());
    println!(
        "  retries (reused keep-alive connection closed before any response byte): {} requests, {retries_get} GET + {retries_post} POST re-sends",
        retried.len()
    );
    if let Some((lat, target, at)) = &longest_handover {
        println!(
            "  longest request latency during the hand-over: {:.1} ms ({target}, started {at:+.3} s after SIGQUIT)",
            lat.as_secs_f64() * 1000.0
        );
    }
    if let Some((lat, target, at)) = &longest_all {
        println!(
            "  longest request latency overall: {:.1} ms ({target}, started {at:+.3} s after SIGQUIT)",
            lat.as_secs_f64() * 1000.0
        );
    }
    println!(
        "  old process {old_pid} exited {:.2} s after SIGQUIT with {:?}; new process {new_pid} running: {new_running}",
        secs(t_old_exit - t_quit),
        old_status
    );
    println!(
        "  1 GiB download from the old process: {} bytes, pattern ok {}, error {:?}, {:.1} s, finished {:+.2} s after SIGQUIT",
        d.len,
        d.pattern_ok,
        d.error,
        secs(download_end - download_start),
        rel(download_end, t_quit)
    );
    println!("  whole test so far: {:.1} s", secs(test_start.elapsed()));
    for r in retried.iter().take(10) {
        println!(
            "  retried: worker {} {} {} x{} at {:+.3} s",
            r.worker,
            r.method,
            r.target,
            r.retries,
            rel(r.start, t_quit)
        );
    }

    // ---- assertions
    let failure_lines: Vec<String> = failures
        .iter()
        .take(30)
        .map(|r| {
            format!(
                "worker {} ({}) {} {} started {:+.3} s after SIGQUIT: {}",
                r.worker,
                if r.keepalive { "keep-alive" } else { "fresh" },
                r.method,
                r.target,
                rel(r.start, t_quit),
                r.error.as_deref().unwrap_or("")
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed:\n{}\n--- old stderr ---\n{}\n--- new stderr ---\n{}",
        failures.len(),
        failure_lines.join("\n"),
        support::process::tail(&old_stderr, 3000),
        support::process::tail(&new.stderr_text(), 3000)
    );
    assert!(enough, "only {total} requests completed");
    assert!(total >= MIN_REQUESTS, "only {total} requests");
    assert!(
        after_exit > 0,
        "no request was served after the old process exited"
    );

    // every request reached the upstream exactly once (retries never duplicated one)
    let mut seen: HashMap<String, usize> = HashMap::new();
    for e in s.tc.requests() {
        if let Some(t) = e["target"].as_str() {
            if t.starts_with("/api/queue/v1/load/") {
                *seen.entry(t.to_string()).or_default() += 1;
            }
        }
    }
    let dups: Vec<String> = recs
        .iter()
        .filter_map(|r| {
            let n = seen.get(&format!("/api{}", r.target)).copied().unwrap_or(0);
            (n != 1).then(|| format!("{} {} reached the upstream {n} times", r.method, r.target))
        })
        .take(20)
        .collect();
    assert!(dups.is_empty(), "{}", dups.join("\n"));

    assert_eq!(
        old_status.unwrap().code(),
        Some(0),
        "the old process must exit 0 after the upgrade\n--- old stderr ---\n{old_stderr}"
    );
    assert!(new_running, "the new process died:\n{}", new.stderr_text());

    assert_eq!(d.status, 200);
    assert_eq!(
        d.error, None,
        "the 1 GiB download from the old process was cut after {} bytes",
        d.len
    );
    assert_eq!(d.len, GIB);
    assert!(d.pattern_ok, "download corrupted at {:?}", d.first_mismatch);

    // the new process, alone now, signs with the rotated credentials
    let r = whoami(s.addr);
    assert_eq!(signer(&r), json!(CLIENT2_ID));
    let took = test_start.elapsed();
    println!("  whole test: {:.1} s", secs(took));
    assert!(took < Duration::from_secs(90), "the test took {took:?}");
}

#[test]
fn put_credentials_to_old_process_after_takeover_reaches_new_process() {
    let s = Setup::new(true);
    let mut old = s.start_fresh();
    // a keep-alive connection to the old process, opened before the upgrade
    let mut ka = Conn::connect_with_timeout(s.addr, Duration::from_secs(10)).unwrap();
    let r = ka.request("GET", b"/queue/v1/before", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(signer(&r), json!(CLIENT_ID));

    let mut new = s.start_upgrade();
    old.signal(libc::SIGQUIT);
    let t_quit = Instant::now();
    // the new process receives the sockets right away; give it time to start serving
    std::thread::sleep(Duration::from_millis(1500));
    assert!(new.is_running(), "new process died:\n{}", new.stderr_text());
    assert!(old.is_running(), "old process exited too early");

    // rotate through the old process, on the connection it still serves
    let r = ka
        .request(
            "PUT",
            b"/credentials",
            &[("Content-Type", "application/json")],
            &creds_body(CLIENT2_ID, ACCESS_TOKEN2, None),
        )
        .expect("the old process must still serve its keep-alive connection");
    assert_eq!(r.status, 200, "{}", r.text());
    let put_at = t_quit.elapsed();

    // fresh connections (either process while both accept) soon use the new credentials
    std::thread::sleep(Duration::from_millis(500));
    let mut wrong = vec![];
    for i in 0..40 {
        let r = whoami(s.addr);
        if signer(&r) != json!(CLIENT2_ID) {
            wrong.push(format!("request {i}: {}", signer(&r)));
        }
    }
    assert!(
        wrong.is_empty(),
        "PUT at {put_at:?} after SIGQUIT; 500 ms later fresh requests were still signed by the old client:\n{}",
        wrong.join("\n")
    );

    // once the old process is gone, only the new one answers
    let st = old.wait_exit(OLD_EXIT_TIMEOUT);
    assert!(st.is_some(), "old process still running");
    for _ in 0..20 {
        assert_eq!(signer(&whoami(s.addr)), json!(CLIENT2_ID));
    }
    assert!(new.is_running());
}

#[test]
fn upgrade_starts_from_state_file_with_temporary_credentials() {
    let s = Setup::new(true);
    let mut old = s.start_fresh();
    let tmp = fresh_temp_creds(
        &default_client(),
        Some("proxy-test/temp/upgrade"),
        &["queue:*"],
    );
    put_credentials(
        s.addr,
        &creds_body(&tmp.client_id, &tmp.access_token, Some(&tmp.certificate)),
    );
    assert_eq!(signer(&whoami(s.addr)), json!("proxy-test/temp/upgrade"));
    assert_eq!(mode_of(&s.dir.state_file()), 0o600);

    let mut new = s.start_upgrade();
    old.signal(libc::SIGQUIT);
    let st = old.wait_exit(OLD_EXIT_TIMEOUT);
    assert!(st.is_some(), "old process still running");
    assert_eq!(st.unwrap().code(), Some(0));
    assert!(new.is_running(), "{}", new.stderr_text());
    for _ in 0..5 {
        let r = whoami(s.addr);
        let e = r.json();
        assert_eq!(e["auth"]["clientId"], json!("proxy-test/temp/upgrade"));
        assert_eq!(e["auth"]["certificate"], tmp.certificate_json());
        assert_eq!(
            r.header("x-taskcluster-proxy-temp-clientid"),
            Some("proxy-test/temp/upgrade")
        );
    }
    // and it keeps accepting rotations
    put_credentials(s.addr, &creds_body(CLIENT2_ID, ACCESS_TOKEN2, None));
    assert_eq!(signer(&whoami(s.addr)), json!(CLIENT2_ID));
}

#[test]
fn fresh_start_without_upgrade_uses_config_credentials() {
    let s = Setup::new(true);
    let mut first = s.start_fresh();
    put_credentials(s.addr, &creds_body(CLIENT2_ID, ACCESS_TOKEN2, None));
    assert_eq!(signer(&whoami(s.addr)), json!(CLIENT2_ID));
    first.signal(libc::SIGINT);
    assert!(first.wait_exit(Duration::from_secs(5)).is_some());
    let state = s.dir.state_file();
    assert!(state.exists());
    let before = std::fs::read(&state).unwrap();

    let second = s.start_fresh();
    assert_eq!(
        signer(&whoami(s.addr)),
        json!(CLIENT_ID),
        "without -u the configured credentials apply"
    );
    // several polling intervals later it must not have adopted the old state file
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(signer(&whoami(s.addr)), json!(CLIENT_ID));
    let after = std::fs::read(&state).unwrap();
    assert_ne!(before, after, "a fresh start overwrites the state file");
    assert_eq!(mode_of(&state), 0o600);
    // rotation still works after the restart
    put_credentials(s.addr, &creds_body(CLIENT2_ID, ACCESS_TOKEN2, None));
    assert_eq!(signer(&whoami(s.addr)), json!(CLIENT2_ID));
    drop(second);
}

#[test]
fn default_state_file_is_next_to_the_upgrade_socket() {
    let s = Setup::new(false);
    let _p = s.start_fresh();
    put_credentials(s.addr, &creds_body(CLIENT2_ID, ACCESS_TOKEN2, None));
    let default = s.dir.path("upgrade.sock.state.json");
    assert!(
        default.exists(),
        "{} missing; directory holds {:?}",
        default.display(),
        std::fs::read_dir(s.dir.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>()
    );
    assert_eq!(mode_of(&default), 0o600);
    // written atomically (temporary file + rename): no temporary file left next to it (a lock
    // file may stay)
    let leftovers: Vec<_> = std::fs::read_dir(s.dir.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp") || n.ends_with('~'))
        .collect();
    assert!(leftovers.is_empty(), "leftover files: {leftovers:?}");
}

#[test]
fn test_conf_leaves_the_running_state_alone() {
    let s = Setup::new(true);
    let _p = s.start_fresh();
    put_credentials(s.addr, &creds_body(CLIENT2_ID, ACCESS_TOKEN2, None));
    let state = s.dir.state_file();
    let before = std::fs::read(&state).unwrap();
    let (code, out, err) = support::proxy::run_to_exit(
        &["--test-conf", "-c", &s.conf],
        &[],
        Duration::from_secs(15),
    );
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        std::fs::read(&state).unwrap(),
        before,
        "--test-conf must not write the state file of the running instance"
    );
    assert_eq!(signer(&whoami(s.addr)), json!(CLIENT2_ID));
}

#[test]
fn upgrade_hands_over_a_unix_socket_listener() {
    let tc = support::fake();
    let dir = TestDir::new();
    let addr = free_addr();
    let sock = dir.path("proxy.sock");
    let conf = dir.write(
        "proxy.yaml",
        &format!(
            "{}taskcluster_proxy:\n  listen:\n    - address: \"{addr}\"\n    - unix: {}\n      mode: \"0660\"\n  root_url: {}\n  credentials:\n    client_id: {}\n    access_token: {}\n  state_file: {}\n",
            dir.server_keys(GRACE),
            yq(&sock.to_string_lossy()),
            yq(&tc.root_url()),
            yq(CLIENT_ID),
            yq(ACCESS_TOKEN),
            yq(&dir.state_file().to_string_lossy())
        ),
    );
    let unix_whoami = |what: &str| -> Value {
        let mut c = Conn::connect_unix(&sock)
            .unwrap_or_else(|e| panic!("{what}: connect to {}: {e}", sock.display()));
        let r = c
            .request(
                "GET",
                b"/queue/v1/over-unix",
                &[("Connection", "close")],
                b"",
            )
            .unwrap_or_else(|e| panic!("{what}: request over {}: {e}", sock.display()));
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_auth_ok(&r.json());
        signer(&r)
    };
    let mut old = Proc::start(&["-c", &conf], &[]);
    old.expect_tcp(addr);
    assert!(support::wait_until(Duration::from_secs(5), || sock.exists()));
    assert_eq!(unix_whoami("before"), json!(CLIENT_ID));
    put_credentials(addr, &creds_body(CLIENT2_ID, ACCESS_TOKEN2, None));

    let sock_path = dir.upgrade_sock();
    assert!(!sock_path.exists());
    let mut new = Proc::start(&["-c", &conf, "-u"], &[]);
    new.wait_path(&sock_path, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    old.signal(libc::SIGQUIT);
    let t_quit = Instant::now();
    // requests over the Unix socket keep working throughout
    let mut n = 0;
    while old.is_running() {
        assert_eq!(
            unix_whoami(&format!("{:.2} s after SIGQUIT", secs(t_quit.elapsed()))),
            json!(CLIENT2_ID)
        );
        n += 1;
        assert!(
            t_quit.elapsed() < OLD_EXIT_TIMEOUT,
            "old process still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(old.try_exit().unwrap().code(), Some(0));
    eprintln!("{n} requests over the Unix socket during the hand-over");
    // the new process, alone, still answers on the same path, with the same mode
    for i in 0..5 {
        assert_eq!(
            unix_whoami(&format!("after the old exit #{i}")),
            json!(CLIENT2_ID)
        );
    }
    assert_eq!(mode_of(&sock) & 0o777, 0o660);
    assert_eq!(signer(&whoami(addr)), json!(CLIENT2_ID));
    assert!(new.is_running());
}

#[test]
fn upgrade_without_a_state_file_uses_the_configured_credentials() {
    let s = Setup::new(true);
    let mut old = s.start_fresh();
    assert_eq!(signer(&whoami(s.addr)), json!(CLIENT_ID));
    // e.g. upgrading from a version that did not write one
    let _ = std::fs::remove_file(s.dir.state_file());
    let mut new = s.start_upgrade();
    old.signal(libc::SIGQUIT);
    let st = old.wait_exit(OLD_EXIT_TIMEOUT);
    assert!(st.is_some(), "old process still running");
    assert!(new.is_running(), "{}", new.stderr_text());
    assert_eq!(signer(&whoami(s.addr)), json!(CLIENT_ID));
    put_credentials(s.addr, &creds_body(CLIENT2_ID, ACCESS_TOKEN2, None));
    assert_eq!(signer(&whoami(s.addr)), json!(CLIENT2_ID));
}

/// The reload procedure of `conf/taskcluster-proxy.service`, with daemons as systemd runs them:
/// `ExecStart=… -d`, then the unit's `ExecReload=` lines in order (read from the file).
/// Requests on fresh connections keep going throughout; none may fail, and the new daemon
/// must serve with the rotated credentials once the old one is gone.
#[test]
fn systemd_style_reload_with_daemons() {
    use support::process::Daemon;
    let s = Setup::new(true);
    // daemons need an error log to be diagnosable
    let text = std::fs::read_to_string(&s.conf).unwrap().replacen(
        "version: 1\n",
        &format!(
            "version: 1\nerror_log: {}\n",
            yq(&s.dir.error_log().to_string_lossy())
        ),
        1,
    );
    std::fs::write(&s.conf, text).unwrap();

    let mut launcher = Proc::start(&["-c", &s.conf, "-d"], &[]);
    let st = launcher.wait_exit(Duration::from_secs(10));
    assert!(
        st.is_some_and(|st| st.success()),
        "ExecStart: {st:?}\n{}",
        launcher.stderr_text()
    );
    let old = Daemon::from_pid_file(
        &s.dir.pid_file(),
        &s.conf,
        Some(s.dir.error_log()),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(support::wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(s.addr).is_ok()
    }));
    put_credentials(s.addr, &creds_body(CLIENT2_ID, ACCESS_TOKEN2, None));
    assert_eq!(signer(&whoami(s.addr)), json!(CLIENT2_ID));

    // a client sending requests on fresh connections the whole time
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let addr = s.addr;
    let prober = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut results: Vec<(f64, Result<Value, String>)> = vec![];
        while !stop2.load(Ordering::SeqCst) {
            let r = client::try_send(addr, "GET", b"/queue/v1/probe", &[], b"")
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    if r.status == 200 {
                        Ok(r.json()["auth"]["clientId"].clone())
                    } else {
                        Err(format!("status {}", r.status))
                    }
                });
            results.push((secs(t0.elapsed()), r));
            std::thread::sleep(Duration::from_millis(20));
        }
        results
    });

    // The unit's ExecReload lines, in order, stopping at the first failure as systemd does;
    // only the binary and configuration paths are replaced.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conf/taskcluster-proxy.service"
    ))
    .unwrap();
    let script = unit
        .lines()
        .filter_map(|l| l.strip_prefix("ExecReload="))
        .map(|l| {
            l.replace("/usr/local/bin/taskcluster-proxy", "\"$BIN\"")
                .replace("/etc/taskcluster-proxy/taskcluster-proxy.yaml", "\"$CONF\"")
        })
        .collect::<Vec<_>>()
        .join(" && ");
    assert!(
        script.contains("-u"),
        "no upgrade step in ExecReload: {script}"
    );
    let script = script.as_str();
    let old_pid = old.pid.to_string();
    let start = Instant::now();
    let reload = std::process::Command::new("/bin/sh")
        .args(["-c", script])
        .env("BIN", support::proxy::bin())
        .env("CONF", &s.conf)
        .env("MAINPID", &old_pid)
        .output()
        .expect("run the reload script");
    eprintln!(
        "reload script exited with {} after {:?}\n--- its stderr ---\n{}",
        reload.status,
        start.elapsed(),
        String::from_utf8_lossy(&reload.stderr)
    );
    let gone = old.wait_gone(OLD_EXIT_TIMEOUT);
    // a little more traffic with the new daemon alone
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let results = prober.join().unwrap();
    let new = Daemon::from_pid_file(
        &s.dir.pid_file(),
        &s.conf,
        Some(s.dir.error_log()),
        Duration::from_secs(2),
    )
    .ok()
    .filter(|d| d.pid != old.pid);

    let failures: Vec<String> = results
        .iter()
        .filter_map(|(t, r)| match r {
            Ok(id) if *id == json!(CLIENT2_ID) => None,
            Ok(id) => Some(format!("{t:.2} s: signed by {id}")),
            Err(e) => Some(format!("{t:.2} s: {e}")),
        })
        .collect();
    println!(
        "systemd-style reload: {} probes, {} failed; reload script {}; old daemon gone: {gone}; new daemon: {:?}",
        results.len(),
        failures.len(),
        reload.status,
        new.as_ref().map(|d| d.pid)
    );
    assert!(
        reload.status.success(),
        "the reload script failed ({}):\n{}\n--- error log ---\n{}",
        reload.status,
        String::from_utf8_lossy(&reload.stderr),
        support::process::tail(&old.error_log_text(), 4000)
    );
    assert!(gone, "the old daemon {} is still running", old.pid);
    assert!(
        new.is_some(),
        "no new daemon in the pid file after the reload\n--- error log ---\n{}",
        support::process::tail(&old.error_log_text(), 4000)
    );
    assert!(
        failures.is_empty(),
        "{} of {} probes failed during the reload:\n{}",
        failures.len(),
        results.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(signer(&whoami(s.addr)), json!(CLIENT2_ID));
}

/// Starting the same configuration again without `-u` while an instance runs (an operator's
/// mistake, a second `systemctl start`, a supervisor retry) cannot get the busy listener (Pingora
/// retries the bind for 30 s, then gives up); meanwhile it must not take the running instance's
/// rotated credentials away by overwriting the state file.
#[test]
fn second_start_without_upgrade_does_not_revert_the_running_credentials() {
    let s = Setup::new(true);
    let _running = s.start_fresh();
    put_credentials(s.addr, &creds_body(CLIENT2_ID, ACCESS_TOKEN2, None));
    assert_eq!(signer(&whoami(s.addr)), json!(CLIENT2_ID));

    let mut second = Proc::start(&["-c", &s.conf], &[]);
    // until it is stuck on the busy address (or gave up)
    support::wait_until(Duration::from_secs(10), || {
        second.stderr_text().contains("in use") || !second.is_running()
    });
    // several polling intervals
    std::thread::sleep(Duration::from_millis(500));
    let r = whoami(s.addr);
    assert_eq!(
        signer(&r),
        json!(CLIENT2_ID),
        "the running instance went back to the configured credentials because a second instance \
         (pid {}, not serving) overwrote the state file",
        second.pid()
    );
}
