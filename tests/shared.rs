//! Shared multi-tenant mode (`--admin-socket`, `--admin-address`): one proxy signs for many
//! tasks, each registered through the admin API with its own credentials and identity (a token
//! in `/_task/<token>/...`, the caller's uid, or its source address).
//!
//! What must hold: a request is only ever signed with the credentials of the task it belongs
//! to (never another task's, never after the task ended); requests that belong to no task get
//! a 403 without credential headers; the admin API is reachable only where configured and
//! only with the bearer token; secrets never appear in responses or logs; the registry
//! survives a zero-downtime upgrade.
//!
//! Tests running clients as other OS users need root (like `tests/admission.rs`); without it
//! they say so and pass without checking anything.

mod support;

use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use support::admin::{
    self, assert_json_error, assert_no_task, creds, new_token, response_contains, send_from,
    task_body, task_path, try_send_from, Admin,
};
use support::client::{self, Conn, Response};
use support::creds::fresh_temp_creds;
use support::process::{free_addr, mode_of, yq, Proc, TestDir};
use support::proxy::free_port;
use support::users::{euid, helper_main, run_helper, two_users, User};
use support::{
    default_client, metric, second_client, send, wait_until, Client, FakeTc, FakeTcOptions,
    ProxyProcess, ACCESS_TOKEN, ACCESS_TOKEN2, CLIENT2_ID, CLIENT_ID,
};

const THIRD_ID: &str = "proxy-test/third";
const THIRD_TOKEN: &str = "third-token-AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHH";
const FOURTH_ID: &str = "proxy-test/fourth";
const FOURTH_TOKEN: &str = "fourth-token-0000111122223333444455556666777";

fn third_client() -> Client {
    Client::new(THIRD_ID, THIRD_TOKEN, &["queue:*", "test:*"])
}

fn fourth_client() -> Client {
    Client::new(FOURTH_ID, FOURTH_TOKEN, &["queue:*"])
}

fn all_clients() -> Vec<Client> {
    vec![
        default_client(),
        second_client(),
        third_client(),
        fourth_client(),
    ]
}

fn lo(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A uid that is not ours (and not 0): requests from this process never carry it.
fn foreign_uid() -> u32 {
    if euid() == 54321 {
        54322
    } else {
        54321
    }
}

/// A fake Taskcluster knowing `clients`, a proxy in shared mode (`--root-url` + `--admin-socket`
/// in `dir`, plus `extra`) and an admin client for its socket.
struct Env {
    tc: FakeTc,
    dir: TestDir,
    proxy: ProxyProcess,
    admin: Admin,
}

impl Env {
    fn start() -> Env {
        Env::start_in(TestDir::new(), &[], &[])
    }

    /// [`Env::start`], then a task per `(id, client)` with the client's permanent credentials
    /// and a fresh identity token; returns the tokens in order.
    fn with_token_tasks<const N: usize>(tasks: [(&str, Client); N]) -> (Env, [String; N]) {
        let env = Env::start();
        let tokens = tasks.map(|(id, client)| env.token_task(id, &client));
        (env, tokens)
    }

    /// [`Env::start_in`] a new directory with `--admin-token-file` holding `token` (surrounded
    /// by whitespace, which is trimmed) and `extra`. The admin client sends no token.
    fn start_with_admin_token(token: &str, extra: &[&str], envs: &[(&str, &str)]) -> Env {
        let dir = TestDir::new();
        let token_file = dir.write_mode("admin.token", &format!("  {token}\n"), 0o600);
        let mut args = vec!["--admin-token-file", token_file.as_str()];
        args.extend_from_slice(extra);
        Env::start_in(dir, &args, envs)
    }

    fn start_in(dir: TestDir, extra: &[&str], envs: &[(&str, &str)]) -> Env {
        let tc = FakeTc::start(FakeTcOptions {
            clients: all_clients(),
            ..Default::default()
        });
        let sock = dir.p("admin.sock");
        let root = tc.root_url();
        let mut args = vec!["--root-url", root.as_str(), "--admin-socket", sock.as_str()];
        args.extend_from_slice(extra);
        let proxy = ProxyProcess::spawn(&args, envs);
        let admin = Admin::unix(&sock);
        assert!(
            wait_until(Duration::from_secs(10), || admin.is_up()),
            "the admin socket {sock} never accepted connections\n--- stderr ---\n{}",
            proxy.stderr_text()
        );
        Env {
            tc,
            dir,
            proxy,
            admin,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.addr()
    }

    /// GET `target` on the task listener (fresh connection).
    fn get(&self, target: &str) -> Response {
        send(self.addr(), "GET", target.as_bytes(), &[], b"")
    }

    /// GET `rest` under the task prefix of `token` (fresh connection).
    fn get_as(&self, token: &str, rest: &str) -> Response {
        get_as(self.addr(), token, rest)
    }

    /// Registers task `id` with `client`'s permanent credentials and a fresh identity token;
    /// returns the token.
    fn token_task(&self, id: &str, client: &Client) -> String {
        let token = new_token();
        self.admin.register(id, &token_body(client, &token));
        token
    }
}

/// GET `rest` under the task prefix of `token` on a fresh connection to `addr`.
fn try_get_as(addr: SocketAddr, token: &str, rest: &str) -> std::io::Result<Response> {
    client::try_send(addr, "GET", task_path(token, rest).as_bytes(), &[], b"")
}

fn get_as(addr: SocketAddr, token: &str, rest: &str) -> Response {
    send(addr, "GET", task_path(token, rest).as_bytes(), &[], b"")
}

/// A registration body: `client`'s permanent credentials and `identity`.
fn perm_body(client: &Client, identity: Value) -> Value {
    task_body(creds(client), identity)
}

/// A registration body: `client`'s permanent credentials, identity `{"token": token}`.
fn token_body(client: &Client, token: &str) -> Value {
    perm_body(client, json!({ "token": token }))
}

/// A 200 from the fake, whose signature it verified, made with `client_id`'s credentials, with
/// the matching credential header, and with no `/_task/` prefix upstream. Returns the echo.
#[track_caller]
fn assert_signed(r: &Response, client_id: &str, what: &str) -> Value {
    assert_eq!(
        r.status,
        200,
        "{what}: expected a signed 200, got {} {:?}",
        r.status,
        r.text()
    );
    let e = r.json();
    assert_eq!(
        e["auth"]["ok"],
        json!(true),
        "{what}: the fake rejected the request: {}",
        e["auth"]
    );
    assert_eq!(
        e["auth"]["clientId"],
        json!(client_id),
        "{what}: signed with the wrong task's credentials"
    );
    let perm = r.header("x-taskcluster-proxy-perm-clientid");
    let temp = r.header("x-taskcluster-proxy-temp-clientid");
    assert!(
        perm == Some(client_id) || temp == Some(client_id),
        "{what}: credential headers Perm-ClientId {perm:?} Temp-ClientId {temp:?}, expected {client_id}"
    );
    let target = e["target"].as_str().unwrap_or_default();
    assert!(
        !target.contains("_task"),
        "{what}: the upstream saw the task prefix: {target}"
    );
    e
}

/// [`assert_signed`] with `client_id`'s credentials, or with `None`: [`assert_no_task`].
#[track_caller]
fn assert_outcome(r: &Response, client_id: Option<&str>, what: &str) {
    match client_id {
        Some(client_id) => {
            assert_signed(r, client_id, what);
        }
        None => assert_no_task(r, what),
    }
}

/// Length of the slow downloads kept in flight while a task is changed.
const DOWNLOAD: u64 = 8 * 1024 * 1024;

/// Starts a slow download of [`DOWNLOAD`] bytes through the task of `token` (`what` names it)
/// and waits for its first bytes. The thread returns the download and when it ended.
fn start_slow_download(
    addr: SocketAddr,
    token: &str,
    what: &str,
) -> std::thread::JoinHandle<(client::Download, Instant)> {
    let (tx, rx) = mpsc::channel();
    let target = task_path(
        token,
        &format!("/api/queue/v1/__download/{DOWNLOAD}?slow_ms=15"),
    );
    let download = std::thread::spawn(move || {
        let mut started = false;
        let d = client::download_with_progress(addr, &target, &[], &mut |n| {
            if !started && n > 0 {
                started = true;
                let _ = tx.send(());
            }
        });
        (d, Instant::now())
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what}'s download did not start"));
    download
}

/// A download from [`start_slow_download`] that completed intact, signed with `client_id`'s
/// credentials.
#[track_caller]
fn assert_download_intact(d: &client::Download, client_id: &str, what: &str) {
    assert_eq!(d.status, 200, "{what}'s in-flight download");
    assert!(
        d.error.is_none(),
        "{what}'s in-flight download broke: {:?}",
        d.error
    );
    assert_eq!(d.len, DOWNLOAD, "{what}'s in-flight download was truncated");
    assert!(
        d.pattern_ok,
        "{what}'s in-flight download corrupted at {:?}",
        d.first_mismatch
    );
    assert_eq!(
        d.header("x-taskcluster-proxy-perm-clientid"),
        Some(client_id),
        "{what}'s in-flight download"
    );
}

fn body_with(mut body: Value, key: &str, value: Value) -> Value {
    body[key] = value;
    body
}

// ---------------------------------------------------------------------------------------------
// 1. Isolation under concurrent, interleaved load

struct IsoTask {
    token: String,
    client_id: String,
}

#[derive(Default)]
struct IsoResult {
    ok: usize,
    mismatches: Vec<String>,
    failures: Vec<String>,
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// `n` requests on one keep-alive connection, each for a task picked at random: API and
/// shortcut forms, GET and POST.
fn isolation_worker(id: usize, addr: SocketAddr, tasks: Arc<Vec<IsoTask>>, n: usize) -> IsoResult {
    let mut res = IsoResult::default();
    let mut rng = (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut conn: Option<Conn> = None;
    let mut answered = 0u32;
    for i in 0..n {
        let k = (xorshift(&mut rng) % tasks.len() as u64) as usize;
        let task = &tasks[k];
        let post = i % 4 == 3;
        let rest = format!("/queue/v1/iso/{id}/{i}");
        let expected_target = format!("/api{rest}");
        let target = if i % 2 == 1 {
            task_path(&task.token, &rest)
        } else {
            task_path(&task.token, &expected_target)
        };
        let (method, body) = if post {
            ("POST", format!("{{\"worker\":{id},\"i\":{i}}}"))
        } else {
            ("GET", String::new())
        };
        let headers: &[(&str, &str)] = if post {
            &[("Content-Type", "application/json")]
        } else {
            &[]
        };
        let mut retried = false;
        let response = loop {
            if conn.is_none() {
                match Conn::connect_with_timeout(addr, Duration::from_secs(30)) {
                    Ok(c) => {
                        conn = Some(c);
                        answered = 0;
                    }
                    Err(e) => break Err(format!("connect: {e}")),
                }
            }
            let c = conn.as_mut().unwrap();
            let before = c.bytes_received();
            match c.request(method, target.as_bytes(), headers, body.as_bytes()) {
                Ok(r) => {
                    answered += 1;
                    if c.is_closed() {
                        conn = None;
                    }
                    break Ok(r);
                }
                Err(e) => {
                    let nothing = c.bytes_received() == before;
                    conn = None;
                    // a reused keep-alive connection the server closed before answering
                    if answered > 0 && nothing && !retried {
                        retried = true;
                        continue;
                    }
                    break Err(format!("{method} {rest}: {e}"));
                }
            }
        };
        let r = match response {
            Ok(r) => r,
            Err(e) => {
                res.failures.push(e);
                continue;
            }
        };
        if r.status != 200 {
            res.failures.push(format!(
                "{method} {rest}: status {} {:?}",
                r.status,
                r.text()
            ));
            continue;
        }
        let e: Value = match serde_json::from_slice(&r.body) {
            Ok(v) => v,
            Err(err) => {
                res.failures
                    .push(format!("{method} {rest}: body is not JSON: {err}"));
                continue;
            }
        };
        if e["auth"]["ok"] != json!(true) {
            res.failures.push(format!(
                "{method} {rest}: the fake rejected the signature: {}",
                e["auth"]
            ));
            continue;
        }
        let signer = e["auth"]["clientId"].as_str().unwrap_or("<none>");
        let header = r.header("x-taskcluster-proxy-perm-clientid");
        if signer != task.client_id || header != Some(task.client_id.as_str()) {
            res.mismatches.push(format!(
                "{method} {rest} with the token of the task of {}: signed by {signer}, Perm-ClientId {header:?}",
                task.client_id
            ));
            continue;
        }
        if e["target"] != json!(expected_target) || e["method"] != json!(method) {
            res.failures.push(format!(
                "{method} {rest}: the upstream saw {} {}",
                e["method"], e["target"]
            ));
            continue;
        }
        if e["body_len"] != json!(body.len()) {
            res.failures.push(format!(
                "{method} {rest}: the upstream got {} body bytes of {}",
                e["body_len"],
                body.len()
            ));
            continue;
        }
        let text = String::from_utf8_lossy(&r.body);
        if tasks.iter().any(|t| text.contains(&t.token)) {
            res.failures.push(format!(
                "{method} {rest}: an identity token reached the upstream"
            ));
            continue;
        }
        res.ok += 1;
    }
    res
}

#[test]
fn isolation_under_concurrent_interleaved_load() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 1250;
    let env = Env::start();
    let mut tasks = vec![];
    for (i, c) in all_clients().iter().enumerate() {
        let id = format!("iso-{}", (b'A' + i as u8) as char);
        tasks.push(IsoTask {
            token: env.token_task(&id, c),
            client_id: c.client_id.clone(),
        });
    }
    let tasks = Arc::new(tasks);
    let before = env.tc.requests_seen();
    let start = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|id| {
            let tasks = tasks.clone();
            let addr = env.addr();
            std::thread::Builder::new()
                .name(format!("iso-{id}"))
                .spawn(move || isolation_worker(id, addr, tasks, PER_THREAD))
                .unwrap()
        })
        .collect();
    let results: Vec<IsoResult> = workers
        .into_iter()
        .map(|w| w.join().expect("isolation worker panicked"))
        .collect();
    let elapsed = start.elapsed();
    let total = THREADS * PER_THREAD;
    let ok: usize = results.iter().map(|r| r.ok).sum();
    let mismatches: Vec<&String> = results.iter().flat_map(|r| &r.mismatches).collect();
    let failures: Vec<&String> = results.iter().flat_map(|r| &r.failures).collect();
    let upstream = env.tc.requests_seen() - before;
    println!(
        "isolation: {total} requests ({ok} verified) for {} tasks over {THREADS} keep-alive \
         connections in {:.2} s ({:.0} req/s); {} signed for the wrong task, {} other failures; \
         the upstream saw {upstream}",
        tasks.len(),
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        mismatches.len(),
        failures.len()
    );
    for (problems, what) in [
        (&mismatches, "were signed for another task"),
        (&failures, "failed"),
    ] {
        assert!(
            problems.is_empty(),
            "{} of {total} requests {what}, e.g.:\n{}",
            problems.len(),
            problems
                .iter()
                .take(10)
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert_eq!(ok, total);
    assert!(total >= 10_000);
}

// ---------------------------------------------------------------------------------------------
// 2. Requests that belong to no live task

#[test]
fn unknown_tokens_deleted_tasks_and_identity_mismatches_get_403() {
    let (env, [ta, tb]) = Env::with_token_tasks([("A", default_client()), ("B", second_client())]);
    let addr = env.addr();
    assert_signed(&env.get_as(&ta, "/api/queue/v1/a"), CLIENT_ID, "A");
    assert_signed(&env.get_as(&tb, "/queue/v1/b"), CLIENT2_ID, "B");

    // unknown tokens and no token at all (only token-bound tasks exist)
    let seen = env.tc.requests_seen();
    let mut extended = ta.clone();
    extended.push('x');
    let unknown = [
        (
            "an unknown token",
            task_path(&new_token(), "/api/queue/v1/x"),
        ),
        (
            "a prefix of A's token",
            task_path(&ta[..40], "/api/queue/v1/x"),
        ),
        (
            "A's token plus a character",
            task_path(&extended, "/api/queue/v1/x"),
        ),
        ("a short unknown token", task_path("abc", "/api/queue/v1/x")),
        ("no token (API form)", "/api/queue/v1/x".to_string()),
        ("no token (shortcut form)", "/queue/v1/x".to_string()),
        ("no token, POST /bewit", "/bewit".to_string()),
    ];
    for (what, target) in &unknown {
        let method = if target.ends_with("/bewit") {
            "POST"
        } else {
            "GET"
        };
        let url = format!("{}/api/queue/v1/y", env.tc.root_url());
        let r = send(addr, method, target.as_bytes(), &[], url.as_bytes());
        assert_no_task(&r, what);
    }
    assert_eq!(
        env.tc.requests_seen(),
        seen,
        "a request that belongs to no task reached the upstream"
    );

    // a deleted task: 403 at once (also on a connection it used before), while its download
    // in flight completes intact
    let mut keepalive = Conn::connect(addr).unwrap();
    let r = keepalive
        .request(
            "GET",
            task_path(&ta, "/api/queue/v1/before-delete").as_bytes(),
            &[],
            b"",
        )
        .unwrap();
    assert_signed(&r, CLIENT_ID, "A before DELETE (keep-alive)");
    let download = start_slow_download(addr, &ta, "A");
    let r = env.admin.delete("A");
    assert_eq!(r.status, 204, "DELETE /tasks/A: {}", r.text());
    let deleted_at = Instant::now();
    assert_no_task(
        &env.get_as(&ta, "/api/queue/v1/after-delete"),
        "A's token after DELETE (new connection)",
    );
    match keepalive.request(
        "GET",
        task_path(&ta, "/api/queue/v1/after-delete").as_bytes(),
        &[],
        b"",
    ) {
        Ok(r) => assert_no_task(&r, "A's token after DELETE (keep-alive connection)"),
        Err(e) => panic!("A's keep-alive connection: no answer after DELETE: {e}"),
    }
    assert_signed(
        &env.get_as(&tb, "/api/queue/v1/b-after"),
        CLIENT2_ID,
        "B after A's deletion",
    );
    assert_json_error(&env.admin.get_task("A"), 404, "GET of a deleted task");
    assert_json_error(&env.admin.delete("A"), 404, "DELETE of a deleted task");
    assert_json_error(&env.admin.delete("never"), 404, "DELETE of an unknown task");
    let (d, finished_at) = download.join().expect("download thread panicked");
    assert_download_intact(&d, CLIENT_ID, "A");
    assert!(
        finished_at > deleted_at,
        "the download finished before the DELETE: the test proves nothing (make it slower)"
    );

    // token + ip: the token only counts from that address, and the address only with the token
    let tc_tok = new_token();
    env.admin.register(
        "C",
        &perm_body(&third_client(), json!({"token": tc_tok, "ip": "127.0.0.2"})),
    );
    let c_target = task_path(&tc_tok, "/api/queue/v1/c");
    let requests_from = |requests: &[(u8, &str, Option<&str>, &str)]| {
        for &(from, target, signer, what) in requests {
            assert_outcome(&send_from(lo(from), addr, "GET", target), signer, what);
        }
    };
    requests_from(&[
        (2, &c_target, Some(THIRD_ID), "C's token from C's address"),
        (3, &c_target, None, "C's token from 127.0.0.3"),
        (1, &c_target, None, "C's token from 127.0.0.1"),
        (2, "/api/queue/v1/c", None, "C's address without C's token"),
    ]);
    // an ip-only task on 127.0.0.3: found by address, but a token from there is never
    // resolved to it
    env.admin.register(
        "E",
        &perm_body(&fourth_client(), json!({"ip": "127.0.0.3"})),
    );
    let (c_at_e, unknown_at_e) = (
        task_path(&tc_tok, "/api/queue/v1/e"),
        task_path(&new_token(), "/api/queue/v1/e"),
    );
    requests_from(&[
        (3, "/api/queue/v1/e", Some(FOURTH_ID), "E by its address"),
        (
            3,
            "/queue/v1/e",
            Some(FOURTH_ID),
            "E by its address (shortcut form)",
        ),
        (3, &c_at_e, None, "C's token from E's address"),
        (3, &unknown_at_e, None, "an unknown token from E's address"),
        (
            1,
            "/api/queue/v1/e",
            None,
            "no token from 127.0.0.1 (E is bound to 127.0.0.3)",
        ),
        (4, "/api/queue/v1/e", None, "no token from 127.0.0.4"),
    ]);

    // token + uid of another user: the token from our uid is refused
    let td = new_token();
    env.admin.register(
        "D",
        &perm_body(&second_client(), json!({"token": td, "uid": foreign_uid()})),
    );
    assert_no_task(
        &env.get_as(&td, "/api/queue/v1/d"),
        "D's token from a process of another uid",
    );
    assert_signed(
        &env.get_as(&tb, "/api/queue/v1/b-end"),
        CLIENT2_ID,
        "B at the end",
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Rotation

#[test]
fn rotating_one_task_leaves_the_others_alone() {
    let (env, [ta, tb]) = Env::with_token_tasks([("A", default_client()), ("B", second_client())]);
    let addr = env.addr();

    // B: a slow download in flight and a stream of requests on a keep-alive connection
    let download = start_slow_download(addr, &tb, "B");
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let b_loop = {
        let (stop, sent, tb) = (stop.clone(), sent.clone(), tb.clone());
        std::thread::spawn(move || {
            let mut errors = vec![];
            let mut conn = Conn::connect(addr).unwrap();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let target = task_path(&tb, &format!("/api/queue/v1/b/{i}"));
                let reconnect = match conn.request("GET", target.as_bytes(), &[], b"") {
                    Ok(r) => {
                        let e: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                        if r.status != 200
                            || e["auth"]["ok"] != json!(true)
                            || e["auth"]["clientId"] != json!(CLIENT2_ID)
                            || r.header("x-taskcluster-proxy-perm-clientid") != Some(CLIENT2_ID)
                        {
                            errors.push(format!(
                                "B request {i}: status {} signed by {} {:?}",
                                r.status,
                                e["auth"]["clientId"],
                                r.header("x-taskcluster-proxy-perm-clientid")
                            ));
                        }
                        conn.is_closed()
                    }
                    Err(e) => {
                        errors.push(format!("B request {i}: {e}"));
                        true
                    }
                };
                if reconnect {
                    match Conn::connect(addr) {
                        Ok(c) => conn = c,
                        Err(e) => {
                            errors.push(format!("B reconnect: {e}"));
                            break;
                        }
                    }
                }
                sent.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
            errors
        })
    };
    assert!(wait_until(Duration::from_secs(20), || sent
        .load(Ordering::SeqCst)
        >= 20));

    // A: a keep-alive connection opened before the rotation
    let mut a_conn = Conn::connect(addr).unwrap();
    let r = a_conn
        .request("GET", task_path(&ta, "/queue/v1/a/0").as_bytes(), &[], b"")
        .unwrap();
    assert_signed(&r, CLIENT_ID, "A before the rotation");

    // rotate A to temporary credentials
    let tmp = fresh_temp_creds(
        &default_client(),
        Some("proxy-test/temp/rotated-a"),
        &["queue:*"],
    );
    let r = env.admin.rotate("A", &admin::temp_creds(&tmp));
    assert_eq!(r.status, 200, "PUT /tasks/A/credentials: {}", r.text());
    let t = r.json();
    assert_eq!(t["taskId"], json!("A"));
    assert_eq!(t["clientId"], json!(tmp.client_id));
    assert_eq!(t["temporary"], json!(true));
    assert_eq!(
        t["certificateExpiry"].as_f64(),
        tmp.certificate_json()["expiry"].as_f64(),
        "certificateExpiry after the rotation"
    );
    assert_eq!(t["identity"], json!({"token": true}));
    for secret in [&tmp.access_token, &ta, &tmp.certificate] {
        assert!(
            !response_contains(&r, secret),
            "the rotation answer holds a secret"
        );
    }
    // A's next requests, on the old keep-alive connection and on a new one
    let r = a_conn
        .request("GET", task_path(&ta, "/queue/v1/a/1").as_bytes(), &[], b"")
        .unwrap();
    let e = assert_signed(&r, &tmp.client_id, "A after the rotation (same connection)");
    assert_eq!(e["auth"]["certificate"], tmp.certificate_json());
    let e = assert_signed(
        &env.get_as(&ta, "/api/queue/v1/a/2"),
        &tmp.client_id,
        "A after the rotation (new connection)",
    );
    assert_eq!(e["auth"]["certificate"], tmp.certificate_json());
    // and to another permanent client
    let r = env.admin.rotate("A", &creds(&third_client()));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["clientId"], json!(THIRD_ID));
    assert_eq!(r.json()["temporary"], json!(false));
    assert_eq!(r.json()["certificateExpiry"], Value::Null);
    let r = a_conn
        .request("GET", task_path(&ta, "/queue/v1/a/3").as_bytes(), &[], b"")
        .unwrap();
    assert_signed(&r, THIRD_ID, "A after the second rotation");

    // refused rotations leave A alone
    for (id, credentials, status, what) in [
        (
            "nope",
            creds(&second_client()),
            404,
            "rotation of an unknown task",
        ),
        (
            "A",
            json!({"clientId": "proxy-test/x"}),
            400,
            "rotation without accessToken",
        ),
        (
            "A",
            json!({"clientId": "proxy-test/x", "accessToken": "t", "certificate": "{not json"}),
            400,
            "rotation with a broken certificate",
        ),
    ] {
        assert_json_error(&env.admin.rotate(id, &credentials), status, what);
    }
    assert_json_error(
        &env.admin.raw(
            "PUT",
            "/tasks/A/credentials",
            &[("Content-Type", "application/json")],
            b"{not json",
        ),
        400,
        "rotation with invalid JSON",
    );
    assert_signed(
        &env.get_as(&ta, "/api/queue/v1/a/4"),
        THIRD_ID,
        "A after refused rotations",
    );

    let b_before_stop = sent.load(Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(10), || sent
        .load(Ordering::SeqCst)
        >= b_before_stop + 10));
    stop.store(true, Ordering::SeqCst);
    let errors = b_loop.join().expect("B's request loop panicked");
    let (d, _) = download.join().expect("B's download panicked");
    println!(
        "rotation: B sent {} requests during A's rotations",
        sent.load(Ordering::SeqCst)
    );
    assert!(
        errors.is_empty(),
        "B was affected by A's rotation:\n{}",
        errors.join("\n")
    );
    assert_download_intact(&d, CLIENT2_ID, "B");
    assert_signed(
        &env.get_as(&tb, "/api/queue/v1/b/end"),
        CLIENT2_ID,
        "B at the end",
    );
    assert_eq!(
        env.admin.get_task("B").json()["clientId"],
        json!(CLIENT2_ID)
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Identity conflicts

#[test]
fn identity_conflicts_409_replacement_200_and_reuse_after_delete() {
    let env = Env::start();
    let a = &env.admin;
    let (t1, t2) = (new_token(), new_token());
    let uid = foreign_uid();
    let t = a.register("A", &token_body(&default_client(), &t1));
    assert_eq!(t["taskId"], json!("A"));
    assert_eq!(t["clientId"], json!(CLIENT_ID));

    // the same token for another task
    let r = a.put_task("B", &token_body(&second_client(), &t1));
    assert_json_error(&r, 409, "a second task with A's token");
    assert!(
        !response_contains(&r, &t1),
        "the 409 answer holds the token"
    );
    assert_json_error(&a.get_task("B"), 404, "the refused task B");
    // the same uid, the same address (with or without a new token)
    for (owner, owner_body, refused, conflicts) in [
        (
            "U",
            perm_body(&default_client(), json!({ "uid": uid })),
            "V",
            [
                (json!({ "uid": uid }), "a second task with U's uid"),
                (
                    json!({"token": t2, "uid": uid}),
                    "a second task with U's uid (and a new token)",
                ),
            ],
        ),
        (
            "I",
            perm_body(&third_client(), json!({"ip": "127.0.0.2"})),
            "J",
            [
                (json!({"ip": "127.0.0.2"}), "a second task with I's address"),
                (
                    json!({"token": t2, "ip": "127.0.0.2"}),
                    "a second task with I's address (and a new token)",
                ),
            ],
        ),
    ] {
        a.register(owner, &owner_body);
        for (identity, what) in conflicts {
            let r = a.put_task(refused, &perm_body(&second_client(), identity));
            assert_json_error(&r, 409, what);
        }
    }
    a.register("I6", &perm_body(&fourth_client(), json!({"ip": "::1"})));
    assert_eq!(a.task_ids(), ["A", "I", "I6", "U"]);
    // the refused tasks changed nothing
    assert_signed(
        &env.get_as(&t1, "/api/queue/v1/a"),
        CLIENT_ID,
        "A after the refused registrations",
    );
    assert_no_task(
        &env.get_as(&t2, "/api/queue/v1/x"),
        "the token of a refused registration",
    );
    assert_signed(
        &send_from(lo(2), env.addr(), "GET", "/api/queue/v1/i"),
        THIRD_ID,
        "I by its address after the refused registrations",
    );

    // replacing the same taskId: 200, with the same identity and then with a new token
    let t3 = new_token();
    for (token, what) in [
        (&t1, "its replacement"),
        (&t3, "its replacement with a new token"),
    ] {
        let r = a.put_task("A", &token_body(&second_client(), token));
        assert_eq!(r.status, 200, "A after {what}: {}", r.text());
        assert_eq!(r.json()["clientId"], json!(CLIENT2_ID), "A after {what}");
        assert_signed(
            &env.get_as(token, "/api/queue/v1/a"),
            CLIENT2_ID,
            &format!("A after {what}"),
        );
    }
    // which releases the old one
    assert_no_task(
        &env.get_as(&t1, "/api/queue/v1/a"),
        "A's former token after A was replaced with a new one",
    );
    a.register("B", &token_body(&third_client(), &t1));
    assert_signed(
        &env.get_as(&t1, "/api/queue/v1/b"),
        THIRD_ID,
        "B with A's former token",
    );

    // after DELETE each identity can be registered again
    for (deleted, id, body) in [
        ("B", "B2", token_body(&fourth_client(), &t1)),
        ("U", "V", perm_body(&second_client(), json!({ "uid": uid }))),
        (
            "I",
            "J",
            perm_body(&second_client(), json!({"ip": "127.0.0.2"})),
        ),
    ] {
        assert_eq!(a.delete(deleted).status, 204, "DELETE /tasks/{deleted}");
        a.register(id, &body);
    }
    assert_signed(
        &env.get_as(&t1, "/api/queue/v1/b2"),
        FOURTH_ID,
        "B2 with B's token",
    );
    assert_signed(
        &send_from(lo(2), env.addr(), "GET", "/api/queue/v1/j"),
        CLIENT2_ID,
        "J with I's former address",
    );
    assert_eq!(a.task_ids(), ["A", "B2", "I6", "J", "V"]);
}

// ---------------------------------------------------------------------------------------------
// 5. The admin API: where it is served, authentication, validation, what it reveals

#[test]
fn the_task_listener_does_not_serve_the_admin_api() {
    let (env, [ta]) = Env::with_token_tasks([("A", default_client())]);
    let addr = env.addr();
    let body = perm_body(&second_client(), json!({"token": new_token()})).to_string();
    let json_ct = [("Content-Type", "application/json")];
    // no task for this caller: refused before anything else
    for (method, target) in [
        ("PUT", "/tasks/x"),
        ("GET", "/tasks"),
        ("GET", "/tasks/A"),
        ("DELETE", "/tasks/A"),
        ("PUT", "/tasks/A/credentials"),
    ] {
        let r = send(addr, method, target.as_bytes(), &json_ct, body.as_bytes());
        assert_no_task(&r, &format!("{method} {target} on the task listener"));
    }
    // with a task's token it is an ordinary request of that task (proxied, never admin)
    for (method, target) in [
        ("PUT", "/tasks/x"),
        ("GET", "/tasks"),
        ("DELETE", "/tasks/A"),
    ] {
        let r = send(
            addr,
            method,
            task_path(&ta, target).as_bytes(),
            &json_ct,
            body.as_bytes(),
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        assert!(
            v.get("taskId").is_none()
                && v.get("tasks").is_none()
                && r.status != 201
                && r.status != 204,
            "{method} /_task/<token>{target} was answered like an admin request: {} {:?}",
            r.status,
            r.text()
        );
    }
    assert_eq!(
        env.admin.task_ids(),
        ["A"],
        "the task listener changed the registry"
    );
    assert_signed(
        &env.get_as(&ta, "/api/queue/v1/a"),
        CLIENT_ID,
        "A afterwards",
    );
}

#[test]
fn admin_requests_need_the_bearer_token_on_tcp_and_socket() {
    let token = new_token();
    let admin_addr = free_addr().to_string();
    let env = Env::start_with_admin_token(&token, &["--admin-address", &admin_addr], &[]);
    let tcp = Admin::tcp(admin_addr.parse().unwrap());
    assert!(
        wait_until(Duration::from_secs(10), || tcp.is_up()),
        "--admin-address {admin_addr} never accepted connections"
    );
    let body = perm_body(&default_client(), json!({"token": new_token()}));
    for (name, endpoint) in [("TCP", &tcp), ("socket", &env.admin)] {
        let bad_auth: Vec<(String, Option<String>)> = vec![
            ("no Authorization".into(), None),
            (
                "wrong token".into(),
                Some("Bearer wrong-token-0123456789abcdefghij".into()),
            ),
            (
                "a prefix of the token".into(),
                Some(format!("Bearer {}", &token[..20])),
            ),
            (
                "the token plus a character".into(),
                Some(format!("Bearer {token}x")),
            ),
            ("Basic scheme".into(), Some(format!("Basic {token}"))),
            ("token without scheme".into(), Some(token.clone())),
            ("empty bearer".into(), Some("Bearer ".into())),
        ];
        for (what, header) in &bad_auth {
            let headers: Vec<(&str, &str)> = header
                .as_deref()
                .map(|h| vec![("Authorization", h)])
                .unwrap_or_default();
            let admin = endpoint.with_token(None);
            let r = admin.raw("GET", "/tasks", &headers, b"");
            assert_json_error(&r, 401, &format!("{name}: GET /tasks with {what}"));
            assert!(
                !response_contains(&r, &token),
                "a 401 answer holds the admin token"
            );
            let mut h = headers.clone();
            h.push(("Content-Type", "application/json"));
            let r = admin.raw("PUT", "/tasks/intruder", &h, body.to_string().as_bytes());
            assert_json_error(&r, 401, &format!("{name}: PUT /tasks/intruder with {what}"));
            let r = admin.raw("DELETE", "/tasks/A", &headers, b"");
            assert_json_error(&r, 401, &format!("{name}: DELETE with {what}"));
        }
    }
    let tcp = tcp.with_token(Some(&token));
    let sock = env.admin.with_token(Some(&token));
    assert_eq!(
        tcp.task_ids(),
        Vec::<String>::new(),
        "a refused request registered a task"
    );
    // with the token: both endpoints manage the same registry
    let ta = new_token();
    tcp.register("A", &token_body(&default_client(), &ta));
    sock.register(
        "B",
        &perm_body(&second_client(), json!({"token": new_token()})),
    );
    assert_eq!(sock.task_ids(), ["A", "B"]);
    assert_eq!(tcp.task_ids(), ["A", "B"]);
    assert_signed(
        &env.get_as(&ta, "/api/queue/v1/a"),
        CLIENT_ID,
        "A registered over TCP",
    );
    assert_eq!(sock.delete("A").status, 204);
    assert_eq!(tcp.task_ids(), ["B"]);
    // the admin TCP listener is not a task listener either
    let r = send(
        tcp_addr(&tcp),
        "GET",
        task_path(&ta, "/api/queue/v1/x").as_bytes(),
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    );
    assert!(
        r.status == 404 || r.status == 405,
        "a task request on the admin listener: {} {:?}",
        r.status,
        r.text()
    );
}

fn tcp_addr(a: &Admin) -> SocketAddr {
    match a.endpoint {
        admin::Endpoint::Tcp(addr) => addr,
        admin::Endpoint::Unix(_) => unreachable!(),
    }
}

#[test]
fn admin_socket_mode_unknown_paths_and_wrong_methods() {
    let env = Env::start();
    let sock = env.dir.path("admin.sock");
    assert_eq!(
        mode_of(&sock) & 0o777,
        0o600,
        "admin socket {} mode",
        sock.display()
    );
    env.admin.register(
        "A",
        &perm_body(&default_client(), json!({"token": new_token()})),
    );
    for path in [
        "/",
        "/nope",
        "/task",
        "/tasks/A/nope",
        "/tasks/A/credentials/x",
        "/credentials",
    ] {
        assert_json_error(
            &env.admin.call("GET", path, None),
            404,
            &format!("GET {path}"),
        );
    }
    for (method, path) in [
        ("POST", "/tasks"),
        ("DELETE", "/tasks"),
        ("PUT", "/tasks"),
        ("POST", "/tasks/A"),
        ("PATCH", "/tasks/A"),
        ("GET", "/tasks/A/credentials"),
        ("DELETE", "/tasks/A/credentials"),
    ] {
        let body = if method == "GET" || method == "DELETE" {
            None
        } else {
            Some(json!({}))
        };
        assert_json_error(
            &env.admin.call(method, path, body.as_ref()),
            405,
            &format!("{method} {path}"),
        );
    }
    assert_eq!(env.admin.task_ids(), ["A"]);
}

#[test]
fn admin_refuses_invalid_registrations() {
    let env = Env::start();
    let a = &env.admin;
    let good_creds = creds(&default_client());
    let tok = new_token;
    let with = |identity: Value| task_body(good_creds.clone(), identity);
    let id65 = "t".repeat(65);
    let bad: Vec<(&str, &str, Vec<u8>)> = vec![
        ("invalid JSON", "t1", b"{not json".to_vec()),
        ("a JSON array", "t1", b"[]".to_vec()),
        ("an empty body", "t1", b"".to_vec()),
        (
            "no credentials",
            "t1",
            json!({"identity": {"token": tok()}}).to_string().into_bytes(),
        ),
        (
            "credentials without accessToken",
            "t1",
            task_body(json!({"clientId": CLIENT_ID}), json!({"token": tok()})).to_string().into_bytes(),
        ),
        (
            "credentials without clientId",
            "t1",
            task_body(json!({"accessToken": ACCESS_TOKEN}), json!({"token": tok()})).to_string().into_bytes(),
        ),
        (
            "an empty clientId",
            "t1",
            task_body(json!({"clientId": "", "accessToken": ACCESS_TOKEN}), json!({"token": tok()})).to_string().into_bytes(),
        ),
        (
            "a certificate that is not JSON",
            "t1",
            task_body(
                json!({"clientId": CLIENT_ID, "accessToken": ACCESS_TOKEN, "certificate": "not a cert"}),
                json!({"token": tok()}),
            )
            .to_string()
            .into_bytes(),
        ),
        ("no identity", "t1", json!({"credentials": good_creds.clone()}).to_string().into_bytes()),
        ("an empty identity", "t1", with(json!({})).to_string().into_bytes()),
        ("a null identity", "t1", with(Value::Null).to_string().into_bytes()),
        ("a 31-character token", "t1", with(json!({"token": "a".repeat(31)})).to_string().into_bytes()),
        ("a 257-character token", "t1", with(json!({"token": "a".repeat(257)})).to_string().into_bytes()),
        (
            "a token with '!'",
            "t1",
            with(json!({"token": format!("{}!", "a".repeat(40))})).to_string().into_bytes(),
        ),
        (
            "a token with '/'",
            "t1",
            with(json!({"token": format!("{}/{}", "a".repeat(20), "b".repeat(20))})).to_string().into_bytes(),
        ),
        (
            "a token with a space",
            "t1",
            with(json!({"token": format!("{} {}", "a".repeat(20), "b".repeat(20))})).to_string().into_bytes(),
        ),
        ("a numeric token", "t1", with(json!({"token": 12345678901234567890u64})).to_string().into_bytes()),
        ("uid 0", "t1", with(json!({"uid": 0})).to_string().into_bytes()),
        ("uid -1", "t1", with(json!({"uid": -1})).to_string().into_bytes()),
        ("uid as a string", "t1", with(json!({"uid": "1000"})).to_string().into_bytes()),
        ("uid 2^32", "t1", with(json!({"uid": 4294967296u64})).to_string().into_bytes()),
        ("ip 0.0.0.0", "t1", with(json!({"ip": "0.0.0.0"})).to_string().into_bytes()),
        ("ip ::", "t1", with(json!({"ip": "::"})).to_string().into_bytes()),
        ("ip not an address", "t1", with(json!({"ip": "not-an-ip"})).to_string().into_bytes()),
        ("ip with a port", "t1", with(json!({"ip": "127.0.0.2:80"})).to_string().into_bytes()),
        ("ip as a network", "t1", with(json!({"ip": "127.0.0.0/8"})).to_string().into_bytes()),
        (
            "authorizedScopes not a list",
            "t1",
            body_with(with(json!({"token": tok()})), "authorizedScopes", json!("queue:*")).to_string().into_bytes(),
        ),
        (
            "authorizedScopes with a number",
            "t1",
            body_with(with(json!({"token": tok()})), "authorizedScopes", json!([1])).to_string().into_bytes(),
        ),
        (
            "labels not an object",
            "t1",
            body_with(with(json!({"token": tok()})), "labels", json!(["x"])).to_string().into_bytes(),
        ),
        (
            "a label that is not a string",
            "t1",
            body_with(with(json!({"token": tok()})), "labels", json!({"k": 1})).to_string().into_bytes(),
        ),
        ("a 65-character taskId", &id65, with(json!({"token": tok()})).to_string().into_bytes()),
        ("a taskId with '.'", "a.b", with(json!({"token": tok()})).to_string().into_bytes()),
        ("a taskId with '~'", "a~b", with(json!({"token": tok()})).to_string().into_bytes()),
        ("a taskId with an escaped space", "a%20b", with(json!({"token": tok()})).to_string().into_bytes()),
        ("a taskId with '+'", "a+b", with(json!({"token": tok()})).to_string().into_bytes()),
    ];
    for (what, id, body) in &bad {
        let r = a.raw(
            "PUT",
            &format!("/tasks/{id}"),
            &[("Content-Type", "application/json")],
            body,
        );
        assert_json_error(&r, 400, &format!("PUT /tasks/{id} with {what}"));
    }
    // over 1 MiB
    let huge = body_with(
        with(json!({"token": tok()})),
        "labels",
        json!({"big": "x".repeat(1024 * 1024 + 16)}),
    );
    let r = a.raw(
        "PUT",
        "/tasks/huge",
        &[("Content-Type", "application/json")],
        huge.to_string().as_bytes(),
    );
    assert_json_error(&r, 413, "a body over 1 MiB");
    assert_eq!(
        a.task_ids(),
        Vec::<String>::new(),
        "an invalid registration was kept"
    );

    // the boundaries that are valid
    let id64 = "x".repeat(64);
    let valid: Vec<(&str, Value)> = vec![
        ("a 64-character taskId", with(json!({"token": tok()}))),
        (
            "a 32-character token",
            with(json!({"token": "b".repeat(32)})),
        ),
        (
            "a 256-character token",
            with(json!({"token": "c".repeat(256)})),
        ),
        (
            "a token with . _ ~ -",
            with(json!({"token": format!("A.b_C~d-{}", "e".repeat(30))})),
        ),
        ("an IPv6 address", with(json!({"ip": "::1"}))),
        ("uid 1", with(json!({"uid": 1}))),
        (
            "a certificate object",
            task_body(
                {
                    let t = fresh_temp_creds(&default_client(), None, &["queue:*"]);
                    json!({"clientId": t.client_id, "accessToken": t.access_token, "certificate": t.certificate_json()})
                },
                json!({"token": tok()}),
            ),
        ),
    ];
    let ids = [id64.as_str(), "v-2", "v-3", "v-4", "v-5", "v-6", "v_7"];
    for ((what, body), id) in valid.iter().zip(ids) {
        let r = a.put_task(id, body);
        assert_eq!(r.status, 201, "PUT /tasks/{id} with {what}: {}", r.text());
    }
    let mut expected: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(a.task_ids(), expected);
    let cert_task = a.get_task("v_7").json();
    assert_eq!(cert_task["temporary"], json!(true));
    assert!(cert_task["certificateExpiry"].is_number(), "{cert_task}");
}

/// Exact identity and labels, the other fields' types, `registered` a recent RFC 3339 time.
#[track_caller]
fn check_task_json(t: &Value, id: &str, client_id: &str, identity: Value, labels: Value) {
    assert_eq!(t["taskId"], json!(id), "{t}");
    assert_eq!(t["clientId"], json!(client_id), "{t}");
    assert_eq!(t["identity"], identity, "task {id}: identity");
    assert_eq!(t["labels"], labels, "task {id}: labels");
    assert!(t["temporary"].is_boolean(), "task {id}: temporary {t}");
    assert!(
        t["certificateExpiry"].is_null() || t["certificateExpiry"].is_number(),
        "task {id}: certificateExpiry {t}"
    );
    assert!(
        t["authorizedScopes"].is_null() || t["authorizedScopes"].is_array(),
        "task {id}: authorizedScopes {t}"
    );
    let registered = t["registered"]
        .as_str()
        .unwrap_or_else(|| panic!("task {id}: no registered time: {t}"));
    let at = chrono::DateTime::parse_from_rfc3339(registered)
        .unwrap_or_else(|e| panic!("task {id}: registered {registered:?} is not RFC 3339: {e}"));
    let age = chrono::Utc::now().signed_duration_since(at);
    assert!(
        age.num_seconds().abs() < 120,
        "task {id}: registered {registered} is not recent"
    );
}

#[test]
fn task_json_and_listing_never_reveal_secrets() {
    let env = Env::start();
    let a = &env.admin;
    let tmp = fresh_temp_creds(
        &default_client(),
        Some("proxy-test/temp/json"),
        &["queue:*"],
    );
    let tmp2 = fresh_temp_creds(&second_client(), None, &["queue:*"]);
    let (t1, t2, t3) = (new_token(), new_token(), new_token());
    let uid = foreign_uid();
    let mut answers = vec![];
    let mut put = |id: &str, body: Value| {
        let r = a.put_task(id, &body);
        assert_eq!(r.status, 201, "PUT /tasks/{id}: {}", r.text());
        answers.push(r);
    };
    put(
        "t-perm",
        body_with(
            token_body(&default_client(), &t1),
            "labels",
            json!({"worker": "w-1", "pool": "proxy-test/fake"}),
        ),
    );
    put(
        "t-temp",
        body_with(
            task_body(admin::temp_creds(&tmp), json!({"token": t2, "uid": uid})),
            "authorizedScopes",
            json!(["queue:get-artifact:x/*"]),
        ),
    );
    put(
        "t-obj",
        task_body(
            json!({"clientId": tmp2.client_id, "accessToken": tmp2.access_token, "certificate": tmp2.certificate_json()}),
            json!({"token": t3, "ip": "127.0.0.5"}),
        ),
    );
    put(
        "b-uid",
        perm_body(&third_client(), json!({ "uid": uid + 1 })),
    );
    put(
        "a-ip",
        perm_body(&fourth_client(), json!({"ip": "127.0.0.6"})),
    );
    let list = a.list();
    let ids: Vec<&str> = list.iter().map(|t| t["taskId"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["a-ip", "b-uid", "t-obj", "t-perm", "t-temp"],
        "sorted by taskId"
    );
    let by_id = |id: &str| {
        list.iter()
            .find(|t| t["taskId"] == json!(id))
            .unwrap()
            .clone()
    };
    check_task_json(
        &by_id("t-perm"),
        "t-perm",
        CLIENT_ID,
        json!({"token": true}),
        json!({"worker": "w-1", "pool": "proxy-test/fake"}),
    );
    assert_eq!(by_id("t-perm")["temporary"], json!(false));
    assert_eq!(by_id("t-perm")["certificateExpiry"], Value::Null);
    assert_eq!(by_id("t-perm")["authorizedScopes"], Value::Null);
    let temp = by_id("t-temp");
    check_task_json(
        &temp,
        "t-temp",
        "proxy-test/temp/json",
        json!({"token": true, "uid": uid}),
        json!({}),
    );
    assert_eq!(temp["temporary"], json!(true));
    assert_eq!(
        temp["certificateExpiry"].as_f64(),
        tmp.certificate_json()["expiry"].as_f64()
    );
    assert_eq!(temp["authorizedScopes"], json!(["queue:get-artifact:x/*"]));
    let obj = by_id("t-obj");
    check_task_json(
        &obj,
        "t-obj",
        CLIENT2_ID,
        json!({"token": true, "ip": "127.0.0.5"}),
        json!({}),
    );
    assert_eq!(
        obj["certificateExpiry"].as_f64(),
        tmp2.certificate_json()["expiry"].as_f64()
    );
    check_task_json(
        &by_id("b-uid"),
        "b-uid",
        THIRD_ID,
        json!({ "uid": uid + 1 }),
        json!({}),
    );
    check_task_json(
        &by_id("a-ip"),
        "a-ip",
        FOURTH_ID,
        json!({"ip": "127.0.0.6"}),
        json!({}),
    );
    for t in &list {
        let id = t["taskId"].as_str().unwrap();
        let single = a.get_task(id);
        assert_eq!(single.status, 200);
        assert_eq!(
            &single.json(),
            t,
            "GET /tasks/{id} differs from its GET /tasks entry"
        );
        answers.push(single);
    }
    answers.push(a.call("GET", "/tasks", None));
    answers.push(a.rotate("t-perm", &admin::temp_creds(&tmp)));
    let (cert1, cert2) = (tmp.certificate_json(), tmp2.certificate_json());
    let secrets: Vec<(&str, &str)> = vec![
        ("identity token 1", &t1),
        ("identity token 2", &t2),
        ("identity token 3", &t3),
        ("access token", ACCESS_TOKEN),
        ("third access token", THIRD_TOKEN),
        ("fourth access token", FOURTH_TOKEN),
        ("temporary access token", &tmp.access_token),
        ("temporary access token 2", &tmp2.access_token),
        ("certificate", &tmp.certificate),
        (
            "certificate signature",
            cert1["signature"].as_str().unwrap(),
        ),
        ("certificate seed", cert1["seed"].as_str().unwrap()),
        (
            "certificate 2 signature",
            cert2["signature"].as_str().unwrap(),
        ),
    ];
    for r in &answers {
        for (name, secret) in &secrets {
            assert!(
                !response_contains(r, secret),
                "an admin answer holds the {name}: {}",
                r.text()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 6. uid identities, with processes of other users (root only)

/// One request from a process running as `user` (`None`: as this process): this test binary
/// re-run in helper mode. `spec`: `{"tcp": addr} | {"unix": path}, "method", "target",
/// "body"`.
fn request_as(user: Option<&User>, spec: Value) -> Response {
    let line = run_helper(user, &spec.to_string());
    let v: Value = serde_json::from_str(&line).unwrap();
    if let Some(e) = v.get("error") {
        panic!("helper {spec} as {:?}: {e}", user.map(|u| &u.name));
    }
    Response {
        status: v["status"].as_u64().unwrap() as u16,
        reason: String::new(),
        headers: v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h[0].as_str().unwrap().to_string(),
                    h[1].as_str().unwrap().to_string(),
                )
            })
            .collect(),
        body: v["body"].as_str().unwrap().as_bytes().to_vec(),
    }
}

fn tcp_get(addr: SocketAddr, target: &str) -> Value {
    json!({"tcp": addr.to_string(), "method": "GET", "target": target, "body": ""})
}

/// Helper mode: one request described by the environment, the response printed as one JSON
/// line. Does nothing when run normally.
#[test]
#[ignore = "client helper, run as another user by the uid tests"]
fn client_helper() {
    helper_main(helper_request);
}

fn helper_request(spec: &str) -> String {
    let spec: Value = serde_json::from_str(spec).unwrap();
    // The admin client's raw requests (no token set: nothing added but `Connection: close`)
    // also read an answer the server gives before the whole body is sent: a refused caller
    // gets its 403 as soon as the head is read, and the body write may then fail.
    let client = match (spec["tcp"].as_str(), spec["unix"].as_str()) {
        (Some(addr), _) => Admin::tcp(addr.parse().unwrap()),
        (None, Some(path)) => Admin::unix(path),
        _ => panic!("bad helper spec {spec}"),
    };
    let method = spec["method"].as_str().unwrap();
    let target = spec["target"].as_str().unwrap();
    let body = spec["body"].as_str().unwrap_or_default();
    let headers: &[(&str, &str)] = if body.is_empty() {
        &[]
    } else {
        &[("Content-Type", "application/json")]
    };
    let out = match client.try_raw(method, target, headers, body.as_bytes()) {
        Ok(r) => json!({
            "status": r.status,
            "headers": r.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
            "body": r.text(),
        }),
        Err(e) => json!({"error": e.to_string()}),
    };
    out.to_string()
}

#[test]
fn uid_identities_with_processes_of_two_users() {
    let Some((u1, u2)) = two_users("uid_identities_with_processes_of_two_users") else {
        return;
    };
    let env = Env::start();
    let addr = env.addr();
    env.admin.register(
        "U1",
        &perm_body(&default_client(), json!({ "uid": u1.uid })),
    );
    env.admin
        .register("U2", &perm_body(&second_client(), json!({ "uid": u2.uid })));
    for (user, client_id) in [(&u1, CLIENT_ID), (&u2, CLIENT2_ID)] {
        for target in ["/api/queue/v1/uid", "/queue/v1/uid"] {
            assert_signed(
                &request_as(Some(user), tcp_get(addr, target)),
                client_id,
                &format!("{target} from a process of {}", user.name),
            );
        }
    }
    // root has no task
    assert_no_task(
        &request_as(None, tcp_get(addr, "/api/queue/v1/uid")),
        "an unprefixed request of root",
    );
    assert_no_task(
        &env.get("/api/queue/v1/uid"),
        "an unprefixed request of root (in-process)",
    );
    // a token + uid task: only that user with that token
    let t = new_token();
    assert_eq!(env.admin.delete("U1").status, 204);
    assert_no_task(
        &request_as(Some(&u1), tcp_get(addr, "/api/queue/v1/uid")),
        "U1's user after U1 was deleted",
    );
    env.admin.register(
        "U3",
        &perm_body(&third_client(), json!({"token": t, "uid": u1.uid})),
    );
    assert_signed(
        &request_as(
            Some(&u1),
            tcp_get(addr, &task_path(&t, "/api/queue/v1/uid")),
        ),
        THIRD_ID,
        "U3's token from U3's user",
    );
    assert_no_task(
        &request_as(Some(&u1), tcp_get(addr, "/api/queue/v1/uid")),
        "U3's user without U3's token",
    );
    assert_no_task(
        &request_as(
            Some(&u2),
            tcp_get(addr, &task_path(&t, "/api/queue/v1/uid")),
        ),
        "U3's token from the other user",
    );
    assert_no_task(
        &request_as(None, tcp_get(addr, &task_path(&t, "/api/queue/v1/uid"))),
        "U3's token from root",
    );
    assert_signed(
        &request_as(Some(&u2), tcp_get(addr, "/api/queue/v1/uid")),
        CLIENT2_ID,
        "U2 at the end",
    );
}

/// Without root: a task bound to this process's own uid (root's uid 0 cannot be registered;
/// as root the two-user test above covers uid identities).
#[test]
fn uid_identity_of_this_process_when_not_root() {
    let me = euid();
    if me == 0 {
        eprintln!(
            "uid_identity_of_this_process_when_not_root: skipped as root (uid 0 cannot be bound)"
        );
        return;
    }
    let env = Env::start();
    env.admin
        .register("self", &perm_body(&third_client(), json!({ "uid": me })));
    assert_signed(
        &env.get("/api/queue/v1/self"),
        THIRD_ID,
        "a request of this uid",
    );
    assert_signed(
        &env.get("/queue/v1/self"),
        THIRD_ID,
        "a request of this uid (shortcut form)",
    );
    assert_no_task(
        &env.get(&task_path(&new_token(), "/api/queue/v1/self")),
        "an unknown token from this uid",
    );
    assert_eq!(env.admin.delete("self").status, 204);
    assert_no_task(
        &env.get("/api/queue/v1/self"),
        "this uid after the task was deleted",
    );
}

#[test]
fn admin_socket_refuses_other_users() {
    let Some((u1, _)) = two_users("admin_socket_refuses_other_users") else {
        return;
    };
    let env = Env::start();
    // let everybody reach the socket, so that only the peer check stands in the way
    std::fs::set_permissions(env.dir.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = env.dir.p("admin.sock");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let body = perm_body(&default_client(), json!({ "uid": u1.uid })).to_string();
    let r = request_as(
        Some(&u1),
        json!({"unix": sock, "method": "PUT", "target": "/tasks/mine", "body": body}),
    );
    assert_json_error(
        &r,
        403,
        "PUT /tasks/mine from another user over the admin socket",
    );
    let r = request_as(
        Some(&u1),
        json!({"unix": sock, "method": "GET", "target": "/tasks", "body": ""}),
    );
    assert_json_error(
        &r,
        403,
        "GET /tasks from another user over the admin socket",
    );
    assert_eq!(env.admin.task_ids(), Vec::<String>::new());
    // root, in another process, may
    let r = request_as(
        None,
        json!({"unix": sock, "method": "PUT", "target": "/tasks/mine", "body": body}),
    );
    assert_eq!(r.status, 201, "root over the admin socket: {}", r.text());
}

// ---------------------------------------------------------------------------------------------
// 7. Bewits

#[test]
fn bewit_through_the_task_prefix_uses_that_tasks_credentials() {
    let env = Env::start();
    let addr = env.addr();
    let (ta, tb) = (new_token(), new_token());
    env.admin.register(
        "A",
        &body_with(
            token_body(&default_client(), &ta),
            "authorizedScopes",
            json!(["queue:get-artifact:a/*"]),
        ),
    );
    env.admin.register("B", &token_body(&second_client(), &tb));
    let root = env.tc.root_url();
    let check = |token: &str, client_id: &str, scopes: Value, what: &str| {
        let url = format!("{root}/api/queue/v1/task/x/artifacts/a/{what}");
        let r = send(
            addr,
            "POST",
            task_path(token, "/bewit").as_bytes(),
            &[],
            url.as_bytes(),
        );
        let location = support::bewit_location(&r, &format!("{what}: POST /_task/<token>/bewit"));
        assert!(
            location.starts_with(&format!("{url}?bewit=")),
            "{what}: {location}"
        );
        assert_eq!(
            r.header("x-taskcluster-proxy-perm-clientid"),
            Some(client_id),
            "{what}"
        );
        for t in [&ta, &tb] {
            assert!(
                !location.contains(t.as_str()),
                "{what}: a token in the bewit URL"
            );
        }
        let target = location.strip_prefix(&root).unwrap();
        let fetched = send(env.tc.addr(), "GET", target.as_bytes(), &[], b"");
        let e = fetched.echo();
        assert_eq!(
            fetched.status, 200,
            "{what}: the fake refused the bewit: {e}"
        );
        assert_eq!(e["auth"]["scheme"], json!("bewit"), "{what}");
        assert_eq!(e["auth"]["clientId"], json!(client_id), "{what}");
        assert_eq!(e["auth"]["authorizedScopes"], scopes, "{what}");
    };
    check(&ta, CLIENT_ID, json!(["queue:get-artifact:a/*"]), "a");
    check(&tb, CLIENT2_ID, Value::Null, "b");
    let r = env.admin.rotate("B", &creds(&third_client()));
    assert_eq!(r.status, 200);
    check(&tb, THIRD_ID, Value::Null, "b-rotated");
    let url = format!("{root}/api/queue/v1/x");
    assert_no_task(
        &send(
            addr,
            "POST",
            task_path(&new_token(), "/bewit").as_bytes(),
            &[],
            url.as_bytes(),
        ),
        "POST /bewit with an unknown token",
    );
    assert_no_task(
        &send(addr, "POST", b"/bewit", &[], url.as_bytes()),
        "POST /bewit without a token",
    );
}

// ---------------------------------------------------------------------------------------------
// 8. PUT /credentials

#[test]
fn put_credentials_is_refused_in_shared_mode() {
    let (env, [ta]) = Env::with_token_tasks([("A", default_client())]);
    let addr = env.addr();
    env.admin.register(
        "I",
        &perm_body(&second_client(), json!({"ip": "127.0.0.2"})),
    );
    let body = creds(&third_client()).to_string();
    let json_ct = [("Content-Type", "application/json")];
    for (what, r) in [
        (
            "PUT /credentials without a task",
            send(addr, "PUT", b"/credentials", &json_ct, body.as_bytes()),
        ),
        (
            "PUT /_task/<token>/credentials",
            send(
                addr,
                "PUT",
                task_path(&ta, "/credentials").as_bytes(),
                &json_ct,
                body.as_bytes(),
            ),
        ),
        (
            "PUT /credentials from an ip-bound task's address",
            try_send_from(
                lo(2),
                addr,
                "PUT",
                "/credentials",
                &json_ct,
                body.as_bytes(),
            )
            .unwrap(),
        ),
    ] {
        assert_eq!(r.status, 403, "{what}: {} {:?}", r.status, r.text());
        assert!(
            !response_contains(&r, THIRD_TOKEN),
            "{what}: the answer echoes the access token"
        );
    }
    assert_signed(
        &env.get_as(&ta, "/api/queue/v1/a"),
        CLIENT_ID,
        "A after PUT /credentials",
    );
    assert_signed(
        &send_from(lo(2), addr, "GET", "/api/queue/v1/i"),
        CLIENT2_ID,
        "I after PUT /credentials",
    );
    assert_eq!(env.admin.get_task("A").json()["clientId"], json!(CLIENT_ID));
    assert_eq!(
        env.admin.get_task("I").json()["clientId"],
        json!(CLIENT2_ID)
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Zero-downtime upgrade

const GRACE: u64 = 1;
/// Old process after SIGQUIT: ~5 s hand-over window, the grace period, the shutdown timeout,
/// with slack.
const OLD_EXIT_TIMEOUT: Duration = Duration::from_secs(5 + GRACE + 1 + 10);

fn upgrade_carries_the_registry(explicit_state_file: bool) {
    let tc = FakeTc::start(FakeTcOptions {
        clients: all_clients(),
        ..Default::default()
    });
    let dir = TestDir::new();
    let addr = free_addr();
    let sock = dir.p("admin.sock");
    let conf = dir.write_tcp_conf(
        GRACE,
        addr,
        &tc.root_url(),
        &format!(
            "  admin_socket: {}\n{}",
            yq(&sock),
            dir.state_file_key(explicit_state_file)
        ),
    );
    let mut old = Proc::start(&["-c", &conf], &[]);
    old.expect_tcp(addr);
    let admin = Admin::unix(&sock);
    assert!(
        wait_until(Duration::from_secs(10), || admin.is_up()),
        "admin_socket from the configuration file never accepted connections\n{}",
        old.stderr_text()
    );
    let (ta, tc_tok, td) = (new_token(), new_token(), new_token());
    admin.register(
        "A",
        &body_with(
            body_with(
                token_body(&default_client(), &ta),
                "authorizedScopes",
                json!(["queue:get-task:*"]),
            ),
            "labels",
            json!({"worker": "w-1"}),
        ),
    );
    admin.register(
        "B",
        &perm_body(&second_client(), json!({"ip": "127.0.0.2"})),
    );
    admin.register("C", &token_body(&third_client(), &tc_tok));
    let tmp = fresh_temp_creds(
        &default_client(),
        Some("proxy-test/temp/upgrade-c"),
        &["queue:*"],
    );
    assert_eq!(admin.rotate("C", &admin::temp_creds(&tmp)).status, 200);
    admin.register("D", &token_body(&fourth_client(), &td));
    assert_eq!(admin.delete("D").status, 204);
    let before = admin.list();
    if explicit_state_file {
        let state = dir.state_file();
        assert!(
            state.exists(),
            "no state file {} after registrations",
            state.display()
        );
        assert_eq!(mode_of(&state), 0o600, "state file mode");
    }

    let check_all = |what: &str| -> Result<(), String> {
        let a =
            try_get_as(addr, &ta, "/api/queue/v1/up-a").map_err(|e| format!("{what}: A: {e}"))?;
        let b = try_send_from(lo(2), addr, "GET", "/api/queue/v1/up-b", &[], b"")
            .map_err(|e| format!("{what}: B: {e}"))?;
        let c =
            try_get_as(addr, &tc_tok, "/queue/v1/up-c").map_err(|e| format!("{what}: C: {e}"))?;
        for (name, r, id) in [
            ("A", &a, CLIENT_ID),
            ("B", &b, CLIENT2_ID),
            ("C", &c, tmp.client_id.as_str()),
        ] {
            let e: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            if r.status != 200
                || e["auth"]["ok"] != json!(true)
                || e["auth"]["clientId"] != json!(id)
            {
                return Err(format!(
                    "{what}: {name}: status {} signed by {} (expected {id})",
                    r.status, e["auth"]["clientId"]
                ));
            }
        }
        let e = a.json();
        if e["auth"]["authorizedScopes"] != json!(["queue:get-task:*"]) {
            return Err(format!(
                "{what}: A's authorizedScopes {}",
                e["auth"]["authorizedScopes"]
            ));
        }
        let e = c.json();
        if e["auth"]["certificate"] != tmp.certificate_json() {
            return Err(format!(
                "{what}: C's certificate {}",
                e["auth"]["certificate"]
            ));
        }
        let d =
            try_get_as(addr, &td, "/api/queue/v1/up-d").map_err(|e| format!("{what}: D: {e}"))?;
        if d.status != 403 {
            return Err(format!(
                "{what}: the deleted task D: {} {:?}",
                d.status,
                d.text()
            ));
        }
        Ok(())
    };
    check_all("before the upgrade").unwrap();

    let mut new = Proc::start_upgrade(&conf, &dir.upgrade_sock());

    // requests on fresh connections throughout the hand-over
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop_prober = stop.clone();
        let check_all = &check_all;
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                let t0 = Instant::now();
                let mut rounds = 0;
                let mut failures = vec![];
                while !stop_prober.load(Ordering::SeqCst) {
                    if let Err(e) = check_all(&format!("{:.2} s", t0.elapsed().as_secs_f64())) {
                        failures.push(e);
                    }
                    rounds += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                (rounds, failures)
            });
            old.signal(libc::SIGQUIT);
            let st = old.wait_exit(OLD_EXIT_TIMEOUT);
            if st.is_some() {
                std::thread::sleep(Duration::from_millis(300));
            }
            stop.store(true, Ordering::SeqCst);
            (st, h.join().expect("prober panicked"))
        })
    };
    let (old_exit, (rounds, failures)) = prober;
    assert!(
        old_exit.is_some(),
        "old process still running {OLD_EXIT_TIMEOUT:?} after SIGQUIT\n{}",
        old.stderr_text()
    );
    assert_eq!(old_exit.unwrap().code(), Some(0), "old process exit");
    assert!(
        rounds >= 5,
        "only {rounds} probe rounds during the hand-over"
    );
    println!(
        "upgrade (state file {}): {rounds} rounds of 4 requests during the hand-over, {} failed",
        if explicit_state_file {
            "configured"
        } else {
            "implied"
        },
        failures.len()
    );
    assert!(
        new.is_running(),
        "the new process died\n{}",
        new.stderr_text()
    );
    assert!(
        failures.is_empty(),
        "requests failed during the hand-over:\n{}",
        failures.join("\n")
    );
    check_all("after the old process exited").unwrap();
    assert_no_task(
        &get_as(addr, &new_token(), "/api/queue/v1/x"),
        "an unknown token after the upgrade",
    );

    // the new process's admin API manages the same registry
    let mut last = String::new();
    let listed = wait_until(Duration::from_secs(20), || {
        match admin.try_raw("GET", "/tasks", &[], b"") {
            Ok(r) if r.status == 200 => true,
            Ok(r) => {
                last = format!("{} {:?}", r.status, r.text());
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    assert!(
        listed,
        "the admin socket does not answer after the upgrade: {last}\n{}",
        new.stderr_text()
    );
    let strip = |tasks: Vec<Value>| -> Vec<Value> {
        tasks
            .into_iter()
            .map(|mut t| {
                t.as_object_mut().unwrap().remove("registered");
                t
            })
            .collect()
    };
    assert_eq!(
        strip(admin.list()),
        strip(before),
        "the registry after the upgrade"
    );
    assert_eq!(admin.delete("B").status, 204);
    assert_no_task(
        &send_from(lo(2), addr, "GET", "/api/queue/v1/up-b"),
        "B after its deletion in the new process",
    );
    admin.register("E", &token_body(&fourth_client(), &td));
    assert_signed(
        &get_as(addr, &td, "/api/queue/v1/up-e"),
        FOURTH_ID,
        "E registered in the new process with D's former token",
    );
}

#[test]
fn upgrade_carries_the_registry_with_a_configured_state_file() {
    upgrade_carries_the_registry(true);
}

#[test]
fn upgrade_carries_the_registry_with_the_implied_state_file() {
    upgrade_carries_the_registry(false);
}

// ---------------------------------------------------------------------------------------------
// 10. Start-up

/// `--root-url root`, then `rest`.
fn with_root<'a>(root: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--root-url", root];
    args.extend_from_slice(rest);
    args
}

/// Runs the binary with `-p <free> -i 127.0.0.1` + `args` until it exits (15 s at most).
fn start_up(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let port = free_port().to_string();
    let mut full = vec!["-p", port.as_str(), "-i", "127.0.0.1"];
    full.extend_from_slice(args);
    let (code, out, err) = support::proxy::run_to_exit(&full, envs, Duration::from_secs(15));
    (code, format!("{err}{out}"))
}

#[test]
fn start_up_errors_in_shared_mode() {
    let tc = support::fake();
    let root = tc.root_url();
    let dir = TestDir::new();
    let sock = dir.p("admin.sock");
    let admin_addr = free_addr().to_string();
    let good_token = dir.write_mode("good.token", &format!("{}\n", new_token()), 0o600);
    let open_token = dir.write_mode("open.token", &new_token(), 0o644);
    let group_token = dir.write_mode("group.token", &new_token(), 0o640);
    let short_token = dir.write_mode("short.token", "  0123456789abcde \n", 0o600);
    let token_file_of = |file| ["--admin-address", &admin_addr, "--admin-token-file", file];
    let mut cases: Vec<(&str, Vec<&str>, Option<&str>)> = vec![
        (
            "--admin-address without --admin-token-file",
            with_root(&root, &["--admin-address", &admin_addr]),
            Some("admin-token-file"),
        ),
        (
            "positional scopes in shared mode",
            with_root(&root, &["--admin-socket", &sock, "queue:x"]),
            None,
        ),
        (
            "--task-id in shared mode",
            with_root(&root, &["--admin-socket", &sock, "--task-id", "abc"]),
            None,
        ),
        (
            "shared mode without a root URL",
            vec!["--admin-socket", &sock],
            None,
        ),
    ];
    for (what, file) in [
        ("a token file readable by others", &open_token),
        ("a token file readable by the group", &group_token),
        ("a token of 15 characters", &short_token),
    ] {
        cases.push((what, with_root(&root, &token_file_of(file)), None));
    }
    cases.push((
        "a missing token file",
        with_root(
            &root,
            &[
                "--admin-socket",
                &sock,
                "--admin-token-file",
                "/nonexistent/admin.token",
            ],
        ),
        None,
    ));
    for (what, args, mention) in &cases {
        let (code, output) = start_up(args, &[]);
        assert_eq!(
            code,
            Some(1),
            "{what}: expected a start-up error (exit 1)\n{output}"
        );
        if let Some(m) = mention {
            assert!(
                output.contains(m),
                "{what}: the message should mention {m}:\n{output}"
            );
        }
    }
    // the same key missing in the configuration file
    let conf = dir.write(
        "proxy.yaml",
        &format!(
            "{}taskcluster_proxy:\n  root_url: {}\n  admin_address: \"{admin_addr}\"\n",
            dir.server_keys(1),
            yq(&root)
        ),
    );
    let (code, output) = start_up(&["-c", &conf], &[]);
    assert_eq!(
        code,
        Some(1),
        "admin_address without admin_token_file in the file\n{output}"
    );
    assert!(
        output.contains("admin-token-file") || output.contains("admin_token_file"),
        "the message should name the token file setting:\n{output}"
    );
    // and a valid token file starts
    let mut p = ProxyProcess::try_spawn(&with_root(&root, &token_file_of(&good_token)), &[])
        .unwrap_or_else(|e| panic!("a valid --admin-address setup does not start: {e}"));
    assert!(p.is_running());
}

#[test]
fn shared_mode_ignores_single_task_credentials() {
    let tc = support::fake();
    let root = tc.root_url();
    let dir = TestDir::new();
    let sock = dir.p("admin.sock");
    for (credentials, envs) in [
        (
            vec!["--client-id", CLIENT_ID, "--access-token", ACCESS_TOKEN],
            vec![],
        ),
        (
            vec![],
            vec![
                ("TASKCLUSTER_CLIENT_ID", CLIENT_ID),
                ("TASKCLUSTER_ACCESS_TOKEN", ACCESS_TOKEN),
            ],
        ),
    ] {
        let mut args = with_root(&root, &["--admin-socket", &sock]);
        args.extend(credentials);
        let _ = std::fs::remove_file(&sock);
        let proxy = ProxyProcess::spawn(&args, &envs);
        let admin = Admin::unix(&sock);
        assert!(wait_until(Duration::from_secs(10), || admin.is_up()));
        let seen = tc.requests_seen();
        for target in ["/api/queue/v1/x", "/queue/v1/x"] {
            assert_no_task(
                &send(proxy.addr(), "GET", target.as_bytes(), &[], b""),
                &format!("{target} in shared mode started with single-task credentials"),
            );
        }
        assert_eq!(
            tc.requests_seen(),
            seen,
            "the ignored credentials were used"
        );
        let t = new_token();
        admin.register("A", &token_body(&second_client(), &t));
        assert_signed(
            &get_as(proxy.addr(), &t, "/api/queue/v1/a"),
            CLIENT2_ID,
            "a registered task",
        );
        let stderr = proxy.stderr_text();
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(" WARN ") && l.contains("credentials")),
            "no warning that the given credentials are not used:\n{stderr}"
        );
        assert!(
            !stderr.contains(ACCESS_TOKEN),
            "the access token is in the log"
        );
    }
}

#[test]
fn admin_settings_from_the_configuration_file() {
    let tc = support::fake();
    let dir = TestDir::new();
    let addr = free_addr();
    let admin_addr = free_addr();
    let token = new_token();
    let token_file = dir.write_mode("admin.token", &token, 0o600);
    let sock = dir.p("admin.sock");
    let conf = dir.write_tcp_conf(
        1,
        addr,
        &tc.root_url(),
        &format!(
            "  admin_socket: {}\n  admin_address: \"{admin_addr}\"\n  admin_token_file: {}\n",
            yq(&sock),
            yq(&token_file),
        ),
    );
    let mut p = Proc::start(&["-c", &conf], &[]);
    p.expect_tcp(addr);
    let tcp = Admin::tcp(admin_addr);
    let unix = Admin::unix(&sock);
    assert!(
        wait_until(Duration::from_secs(10), || tcp.is_up() && unix.is_up()),
        "{}",
        p.stderr_text()
    );
    assert_json_error(
        &tcp.call("GET", "/tasks", None),
        401,
        "TCP admin without the token",
    );
    assert_json_error(
        &unix.call("GET", "/tasks", None),
        401,
        "socket admin without the token",
    );
    let t = new_token();
    tcp.with_token(Some(&token))
        .register("A", &token_body(&default_client(), &t));
    assert_eq!(unix.with_token(Some(&token)).task_ids(), ["A"]);
    assert_eq!(mode_of(Path::new(&sock)) & 0o777, 0o600);
    assert_signed(
        &get_as(addr, &t, "/api/queue/v1/a"),
        CLIENT_ID,
        "a task registered through the file's admin_address",
    );
    assert!(p.is_running());
}

#[test]
fn without_admin_settings_the_single_task_mode_is_unchanged() {
    let tc = support::fake();
    let proxy = support::proxy_for(&tc, &[]);
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    assert_signed(&r, CLIENT_ID, "single-task mode");
    let t = new_token();
    let r = get_as(proxy.addr(), &t, "/api/queue/v1/x");
    assert_eq!(
        r.status,
        404,
        "/_task/... in single-task mode: {:?}",
        r.text()
    );
    assert_eq!(
        r.text().trim_end(),
        "Unkown taskcluster service: _task is not a valid taskcluster service"
    );
    let body = creds(&second_client()).to_string();
    let r = send(proxy.addr(), "PUT", b"/credentials", &[], body.as_bytes());
    assert_eq!(
        r.status,
        200,
        "PUT /credentials in single-task mode: {}",
        r.text()
    );
    assert_signed(
        &send(proxy.addr(), "GET", b"/queue/v1/y", &[], b""),
        CLIENT2_ID,
        "after the rotation",
    );
}

// ---------------------------------------------------------------------------------------------
// 11. No secret in logs or responses

#[test]
fn no_identity_or_access_token_in_logs_or_responses() {
    let admin_token = new_token();
    let mut env = Env::start_with_admin_token(&admin_token, &[], &[("RUST_LOG", "trace")]);
    env.admin = env.admin.with_token(Some(&admin_token));
    let addr = env.addr();
    let root = env.tc.root_url();
    let (ta, tb, tc_tok) = (new_token(), new_token(), new_token());
    let tmp = fresh_temp_creds(
        &default_client(),
        Some("proxy-test/temp/scan"),
        &["queue:*"],
    );
    let tmp2 = fresh_temp_creds(&second_client(), None, &["queue:*"]);
    let mut responses: Vec<Response> = vec![];
    let a = env.admin.clone();
    let mut admin_call = |r: Response| responses.push(r);
    admin_call(a.put_task(
        "A",
        &body_with(
            token_body(&default_client(), &ta),
            "labels",
            json!({"worker": "w"}),
        ),
    ));
    admin_call(a.put_task(
        "B",
        &body_with(
            task_body(admin::temp_creds(&tmp), json!({ "token": tb })),
            "authorizedScopes",
            json!(["queue:get-artifact:x/*"]),
        ),
    ));
    admin_call(a.put_task(
        "C",
        &perm_body(&third_client(), json!({"token": tc_tok, "ip": "127.0.0.2"})),
    ));
    admin_call(a.put_task("X", &token_body(&fourth_client(), &ta)));
    admin_call(a.put_task(
        "Y",
        &perm_body(&fourth_client(), json!({"token": "z".repeat(31)})),
    ));
    admin_call(
        a.with_token(Some("wrong-admin-token-0123456789"))
            .call("GET", "/tasks", None),
    );
    for r in &responses[..3] {
        assert_eq!(r.status, 201, "{}", r.text());
    }
    assert_eq!(responses[3].status, 409);
    assert_eq!(responses[4].status, 400);
    assert_eq!(responses[5].status, 401);

    let mut task_call = |r: Response| {
        responses.push(r.clone());
        r
    };
    let r = task_call(get_as(addr, &ta, "/api/queue/v1/scan-a-get"));
    assert_signed(&r, CLIENT_ID, "A");
    task_call(send(
        addr,
        "POST",
        task_path(&ta, "/queue/v1/scan-a-post").as_bytes(),
        &[("Content-Type", "application/json")],
        b"{\"a\":1}",
    ));
    task_call(get_as(addr, &ta, "/queue/v1/__status/500"));
    task_call(get_as(addr, &ta, "/queue/v1/__download/100000"));
    let r = task_call(send(
        addr,
        "POST",
        task_path(&ta, "/bewit").as_bytes(),
        &[],
        format!("{root}/api/queue/v1/scan-bewit").as_bytes(),
    ));
    assert_eq!(r.status, 303);
    let r = task_call(get_as(addr, &tb, "/api/queue/v1/scan-b"));
    assert_signed(&r, "proxy-test/temp/scan", "B");
    let r = task_call(send_from(
        lo(2),
        addr,
        "GET",
        &task_path(&tc_tok, "/api/queue/v1/scan-c"),
    ));
    assert_signed(&r, THIRD_ID, "C");
    task_call(send_from(
        lo(3),
        addr,
        "GET",
        &task_path(&tc_tok, "/api/queue/v1/scan-c-wrong-ip"),
    ));
    task_call(get_as(addr, &tc_tok, "/api/queue/v1/scan-c-wrong-ip"));
    task_call(get_as(addr, &new_token(), "/api/queue/v1/scan-unknown"));
    task_call(send(addr, "GET", b"/api/queue/v1/scan-none", &[], b""));
    let put = creds(&fourth_client()).to_string();
    task_call(send(
        addr,
        "PUT",
        task_path(&ta, "/credentials").as_bytes(),
        &[],
        put.as_bytes(),
    ));
    task_call(send(addr, "PUT", b"/credentials", &[], put.as_bytes()));
    // rotation and deletion
    responses.push(a.rotate("A", &admin::temp_creds(&tmp2)));
    let r = get_as(addr, &ta, "/api/queue/v1/scan-a-rotated");
    assert_signed(&r, CLIENT2_ID, "A after the rotation");
    responses.push(r);
    responses.push(a.delete("B"));
    let r = get_as(addr, &tb, "/api/queue/v1/scan-b-deleted");
    assert_no_task(&r, "B after DELETE");
    responses.push(r);
    responses.push(a.call("GET", "/tasks", None));
    responses.push(a.get_task("A"));
    responses.push(a.get_task("C"));
    std::thread::sleep(Duration::from_millis(300));

    let logs = env.proxy.stderr_text();
    assert!(
        logs.contains(" TRACE ") || logs.contains(" DEBUG "),
        "debug/trace logging is not on:\n{}",
        support::process::tail(&logs, 2000)
    );
    let secrets: Vec<(&str, &str)> = vec![
        ("A's identity token", &ta),
        ("B's identity token", &tb),
        ("C's identity token", &tc_tok),
        ("the default client's access token", ACCESS_TOKEN),
        ("the second client's access token", ACCESS_TOKEN2),
        ("the third client's access token", THIRD_TOKEN),
        ("the fourth client's access token", FOURTH_TOKEN),
        ("B's temporary access token", &tmp.access_token),
        ("A's rotated temporary access token", &tmp2.access_token),
        ("the admin token", &admin_token),
    ];
    let mut leaks = vec![];
    for (name, secret) in &secrets {
        for line in logs.lines().filter(|l| l.contains(secret)) {
            leaks.push(format!("{name} in the log: {line}"));
        }
        for r in &responses {
            if response_contains(r, secret) {
                leaks.push(format!("{name} in a {} response: {:?}", r.status, r.text()));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    // the access log shows task requests with the prefix redacted
    let line = logs
        .lines()
        .find(|l| l.starts_with("access ") && l.contains("/api/queue/v1/scan-a-get"))
        .unwrap_or_else(|| panic!("no access line for /api/queue/v1/scan-a-get:\n{logs}"));
    assert!(
        line.contains("/_task/"),
        "the access line does not show the (redacted) task prefix: {line}"
    );
    let lines = logs
        .lines()
        .filter(|l| l.starts_with("access ") && l.contains("scan-unknown"))
        .count();
    assert!(
        lines > 0,
        "no access line for the request with an unknown token"
    );
}

// ---------------------------------------------------------------------------------------------
// 12. Metrics

#[test]
fn registry_size_and_unknown_callers_are_counted() {
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics_arg = metrics.to_string();
    let env = Env::start_in(TestDir::new(), &["--metrics-address", &metrics_arg], &[]);
    let a = env.token_task("A", &default_client());
    env.token_task("B", &second_client());
    assert_eq!(env.admin.delete("B").status, 204);
    assert_signed(&env.get_as(&a, "/api/queue/v1/m"), CLIENT_ID, "A");
    for _ in 0..3 {
        assert_eq!(env.get_as(&new_token(), "/api/queue/v1/m").status, 403);
    }
    let text = support::client::get(metrics, "/metrics").text();
    assert_eq!(
        metric(&text, "taskcluster_proxy_tasks_registered"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"taskcluster_proxy_rejected_requests_total{reason="unknown_task"}"#
        ),
        Some(3.0),
        "{text}"
    );
    // Shared mode has a certificate per task: no process-wide expiry series, and ready.
    assert!(!text.contains("certificate_expiry_seconds"));
    assert_eq!(support::client::get(metrics, "/readyz").status, 200);
}
