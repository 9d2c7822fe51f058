//! Signing of proxied requests (wire spec §1, §2, §5.3, §5.5, §6.3): methods and bodies,
//! credential kinds, authorizedScopes, `--task-id`, response headers and pass-through.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;
use support::client::Conn;
use support::creds::fresh_temp_creds;
use support::fake_tc::sha256_hex;
use support::{
    assert_auth_ok, default_client, fake, proxy_for, send, FakeTc, FakeTcOptions, ProxyProcess,
    ACCESS_TOKEN, CLIENT_ID,
};

fn header_json(r: &support::Response, name: &str) -> Value {
    let v = r
        .header(name)
        .unwrap_or_else(|| panic!("missing response header {name}; headers: {:?}", r.headers));
    serde_json::from_str(v).unwrap_or_else(|e| panic!("{name}: {v:?} is not JSON: {e}"))
}

fn set(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn all_methods_are_signed_and_bodies_arrive_intact() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("GET", vec![]),
        ("POST", br#"{"hello":"world"}"#.to_vec()),
        ("POST", vec![]),
        ("PUT", big.clone()),
        ("DELETE", vec![]),
        ("DELETE", b"x".to_vec()),
        ("PATCH", b"patch".to_vec()),
    ];
    for (method, body) in &cases {
        let r = send(
            proxy.addr(),
            method,
            b"/queue/v1/some/thing?x=y",
            &[("Content-Type", "application/octet-stream")],
            body,
        );
        assert_eq!(r.status, 200, "{method}: {}", r.text());
        let e = r.json();
        assert_auth_ok(&e);
        assert_eq!(e["method"], json!(method));
        assert_eq!(e["auth"]["scheme"], json!("hawk"));
        assert_eq!(e["auth"]["clientId"], json!(CLIENT_ID));
        assert_eq!(e["body_len"], json!(body.len()), "{method}");
        assert_eq!(e["body_sha256"], json!(sha256_hex(body)), "{method}");
        assert_eq!(e["target"], json!("/api/queue/v1/some/thing?x=y"));
    }

    // HEAD: no body comes back, but the upstream saw a signed HEAD.
    let before = tc.requests_seen();
    let r = send(proxy.addr(), "HEAD", b"/queue/v1/head/check", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(tc.requests_seen(), before + 1);
    let last = tc.last_request().unwrap();
    assert_eq!(last["method"], json!("HEAD"));
    assert_eq!(last["target"], json!("/api/queue/v1/head/check"));
    assert_auth_ok(&last);
}

#[test]
fn task_supplied_authorization_is_replaced_and_other_headers_pass() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let r = send(
        proxy.addr(),
        "POST",
        b"/queue/v1/x",
        &[
            (
                "Authorization",
                r#"Hawk id="evil", mac="AAAA", ts="1", nonce="n""#,
            ),
            ("X-Custom-Header", "hello"),
            ("Content-Type", "text/plain; charset=latin1"),
            ("Accept", "application/json"),
        ],
        b"payload",
    );
    let e = support::ok_echo(&r);
    assert_eq!(e["auth"]["clientId"], json!(CLIENT_ID));
    let authz = e["headers"]["authorization"].as_array().unwrap();
    assert_eq!(
        authz.len(),
        1,
        "exactly one Authorization header upstream: {authz:?}"
    );
    let authz = authz[0].as_str().unwrap();
    assert!(authz.starts_with("Hawk "), "{authz}");
    assert!(!authz.contains("evil"), "{authz}");
    assert!(
        !authz.contains("hash="),
        "proxy must not send a payload hash: {authz}"
    );
    assert_eq!(e["headers"]["x-custom-header"], json!(["hello"]));
    assert_eq!(
        e["headers"]["content-type"],
        json!(["text/plain; charset=latin1"])
    );
    assert_eq!(e["headers"]["accept"], json!(["application/json"]));
}

#[test]
fn response_headers_with_permanent_credentials() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let r = send(proxy.addr(), "GET", b"/queue/v1/ping?x=1", &[], b"");
    assert_eq!(r.status, 200);
    let version = r
        .header("x-taskcluster-proxy-version")
        .expect("version header");
    assert!(!version.is_empty());
    assert!(
        r.header("x-taskcluster-proxy-revision").is_some(),
        "revision header must be present (may be empty): {:?}",
        r.headers
    );
    assert_eq!(
        r.header("x-taskcluster-proxy-perm-clientid"),
        Some(CLIENT_ID)
    );
    assert_eq!(r.header("x-taskcluster-proxy-temp-clientid"), None);
    assert_eq!(r.header("x-taskcluster-proxy-temp-scopes"), None);
    assert_eq!(r.header("x-taskcluster-authorized-scopes"), None);
    let endpoint = format!("{}/api/queue/v1/ping?x=1", tc.root_url());
    assert_eq!(r.header("x-taskcluster-endpoint"), Some(endpoint.as_str()));
    // no authorizedScopes configured -> no ext at all
    let e = r.json();
    assert_eq!(e["auth"]["ext"], Value::Null, "ext must be omitted: {e}");
    assert_eq!(e["auth"]["authorizedScopes"], Value::Null);
    let authz = e["headers"]["authorization"][0].as_str().unwrap();
    assert!(!authz.contains("ext="), "no ext expected: {authz}");
}

#[test]
fn positional_scopes_become_authorized_scopes() {
    let tc = fake();
    let proxy = proxy_for(&tc, &["queue:get-task:abc", "test:foo"]);
    let r = send(proxy.addr(), "GET", b"/queue/v1/task/abc/status", &[], b"");
    let e = support::ok_echo(&r);
    assert_eq!(
        e["auth"]["authorizedScopes"],
        json!(["queue:get-task:abc", "test:foo"])
    );
    assert_eq!(
        e["auth"]["scopes"],
        json!(["queue:get-task:abc", "test:foo"])
    );
    assert_eq!(e["auth"]["certificate"], Value::Null);
    assert_eq!(
        header_json(&r, "x-taskcluster-authorized-scopes"),
        json!(["queue:get-task:abc", "test:foo"])
    );
    assert_eq!(
        r.header("x-taskcluster-proxy-perm-clientid"),
        Some(CLIENT_ID)
    );
}

fn check_temp_creds(named: Option<&str>) {
    let tc = fake();
    let tmp = fresh_temp_creds(&default_client(), named, &["queue:get-task:*", "test:x"]);
    let proxy = support::proxy_with_temp_creds(&tc, &tmp);
    let r = send(proxy.addr(), "GET", b"/queue/v1/task/abc", &[], b"");
    // not a configured task -> the fake's queue answers 404, but check the auth in its log
    let e = tc.last_request().unwrap();
    assert_auth_ok(&e);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(e["auth"]["clientId"], json!(tmp.client_id));
    assert_eq!(e["auth"]["scopes"], json!(["queue:get-task:*", "test:x"]));
    assert_eq!(e["auth"]["certificate"], tmp.certificate_json());
    assert_eq!(e["auth"]["authorizedScopes"], Value::Null);

    assert_eq!(
        r.header("x-taskcluster-proxy-temp-clientid"),
        Some(tmp.client_id.as_str())
    );
    assert_eq!(
        header_json(&r, "x-taskcluster-proxy-temp-scopes"),
        json!(["queue:get-task:*", "test:x"])
    );
    assert_eq!(r.header("x-taskcluster-proxy-perm-clientid"), None);
    assert_eq!(r.header("x-taskcluster-authorized-scopes"), None);
}

#[test]
fn unnamed_temporary_credentials() {
    check_temp_creds(None);
}

#[test]
fn named_temporary_credentials() {
    check_temp_creds(Some("proxy-test/temp/worker-1"));
}

#[test]
fn temporary_credentials_from_environment_with_authorized_scopes() {
    let tc = fake();
    let tmp = fresh_temp_creds(
        &default_client(),
        Some("proxy-test/temp/env"),
        &["queue:*", "test:x"],
    );
    let root = tc.root_url();
    let proxy = ProxyProcess::spawn(
        &["test:x"],
        &[
            ("TASKCLUSTER_ROOT_URL", &root),
            ("TASKCLUSTER_CLIENT_ID", &tmp.client_id),
            ("TASKCLUSTER_ACCESS_TOKEN", &tmp.access_token),
            ("TASKCLUSTER_CERTIFICATE", &tmp.certificate),
        ],
    );
    let r = send(proxy.addr(), "POST", b"/api/queue/v1/thing", &[], b"{}");
    let e = support::ok_echo(&r);
    assert_eq!(e["auth"]["clientId"], json!("proxy-test/temp/env"));
    assert_eq!(e["auth"]["scopes"], json!(["test:x"]));
    assert_eq!(e["auth"]["authorizedScopes"], json!(["test:x"]));
    assert_eq!(e["auth"]["certificate"]["issuer"], json!(CLIENT_ID));
    assert_eq!(
        header_json(&r, "x-taskcluster-authorized-scopes"),
        json!(["test:x"])
    );
    assert_eq!(
        r.header("x-taskcluster-proxy-temp-clientid"),
        Some("proxy-test/temp/env")
    );
}

#[test]
fn permanent_credentials_from_environment() {
    let tc = fake();
    let root = tc.root_url();
    let proxy = ProxyProcess::spawn(
        &[],
        &[
            ("TASKCLUSTER_ROOT_URL", &root),
            ("TASKCLUSTER_CLIENT_ID", CLIENT_ID),
            ("TASKCLUSTER_ACCESS_TOKEN", ACCESS_TOKEN),
        ],
    );
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_auth_ok(&r.json());
    assert_eq!(r.json()["auth"]["clientId"], json!(CLIENT_ID));
}

#[test]
fn flags_win_over_environment() {
    let tc = fake();
    let root = tc.root_url();
    let proxy = support::proxy_at(
        &root,
        &[],
        &[
            ("TASKCLUSTER_ROOT_URL", "http://127.0.0.1:9"),
            ("TASKCLUSTER_CLIENT_ID", support::CLIENT2_ID),
            ("TASKCLUSTER_ACCESS_TOKEN", support::ACCESS_TOKEN2),
        ],
    );
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["auth"]["clientId"], json!(CLIENT_ID));
}

fn fake_with_tasks(tasks: Vec<(&str, Vec<&str>)>, fail: usize) -> FakeTc {
    FakeTc::start(FakeTcOptions {
        clients: vec![default_client()],
        tasks: tasks
            .into_iter()
            .map(|(t, s)| (t.to_string(), s.into_iter().map(String::from).collect()))
            .collect(),
        fail_task_fetches: fail,
        ..Default::default()
    })
}

fn task_fetches_in_log(tc: &FakeTc, task_id: &str) -> Vec<Value> {
    let target = format!("/api/queue/v1/task/{task_id}");
    tc.requests()
        .into_iter()
        .filter(|e| e["target"] == json!(target))
        .collect()
}

#[test]
fn task_id_adds_task_scopes_and_fetch_is_signed() {
    let tc = fake_with_tasks(
        vec![("TaskAAAAAAAAAAAAAAAAAA", vec!["queue:a", "queue:b"])],
        0,
    );
    let proxy = proxy_for(&tc, &["--task-id", "TaskAAAAAAAAAAAAAAAAAA", "queue:c"]);
    let fetches = task_fetches_in_log(&tc, "TaskAAAAAAAAAAAAAAAAAA");
    assert!(!fetches.is_empty(), "the task was never fetched");
    for f in &fetches {
        assert_eq!(f["method"], json!("GET"));
        assert_eq!(
            f["auth"]["scheme"],
            json!("hawk"),
            "task fetch must be signed: {f}"
        );
        assert_auth_ok(f);
    }
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    let e = support::ok_echo(&r);
    let expected: BTreeSet<String> = ["queue:a", "queue:b", "queue:c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(set(&e["auth"]["authorizedScopes"]), expected);
    assert_eq!(
        set(&header_json(&r, "x-taskcluster-authorized-scopes")),
        expected
    );
}

#[test]
fn task_without_scopes_gives_empty_authorized_scopes() {
    let tc = fake_with_tasks(vec![("EmptyTask", vec![])], 0);
    let proxy = proxy_for(&tc, &["--task-id", "EmptyTask"]);
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    let e = support::ok_echo(&r);
    assert_eq!(
        e["auth"]["authorizedScopes"],
        json!([]),
        "must be [] not absent: {e}"
    );
    assert_eq!(e["auth"]["scopes"], json!([]));
    assert_eq!(
        header_json(&r, "x-taskcluster-authorized-scopes"),
        json!([])
    );
}

#[test]
fn task_fetch_is_retried_on_500() {
    let tc = fake_with_tasks(vec![("RetryTask", vec!["queue:r"])], 2);
    let proxy = proxy_for(&tc, &["--task-id", "RetryTask"]);
    assert_eq!(tc.task_fetches(), 3, "2 failures then success");
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    assert_eq!(r.json()["auth"]["authorizedScopes"], json!(["queue:r"]));
}

#[test]
fn unknown_task_id_fails_start_up() {
    let tc = fake_with_tasks(vec![], 0);
    let port = support::proxy::free_port().to_string();
    let root = tc.root_url();
    let (code, _out, err) = support::proxy::run_to_exit(
        &support::default_args(
            &root,
            &["-p", &port, "-i", "127.0.0.1", "--task-id", "NoSuchTask"],
        ),
        &[],
        Duration::from_secs(60),
    );
    assert!(
        code.is_some(),
        "proxy did not exit within 60 s; stderr: {err}"
    );
    assert_ne!(code, Some(0), "stderr: {err}");
    assert!(
        err.contains("NoSuchTask"),
        "stderr should name the task: {err}"
    );
    assert!(tc.task_fetches() >= 1);
}

#[test]
fn keep_alive_connection_serves_several_requests() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let mut c = Conn::connect(proxy.addr()).unwrap();
    for (i, m) in ["GET", "POST", "PUT", "GET"].iter().enumerate() {
        let target = format!("/queue/v1/ka/{i}");
        let body = if *m == "GET" {
            String::new()
        } else {
            format!("body{i}")
        };
        let r = c
            .request(m, target.as_bytes(), &[], body.as_bytes())
            .unwrap_or_else(|e| panic!("request {i} on kept-alive connection: {e}"));
        assert_eq!(r.status, 200);
        let e = r.json();
        assert_auth_ok(&e);
        assert_eq!(e["target"], json!(format!("/api/queue/v1/ka/{i}")));
        assert_eq!(e["body_len"], json!(body.len()));
    }
}

#[test]
fn upstream_status_and_body_pass_through() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    for code in [201u16, 400, 403, 404, 409] {
        let t = format!("/queue/v1/__status/{code}");
        let r = send(proxy.addr(), "POST", t.as_bytes(), &[], b"abc");
        assert_eq!(r.status, code);
        let e = r.json();
        assert_eq!(e["target"], json!(format!("/api{t}")));
        assert_eq!(e["body_len"], json!(3));
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
}

#[test]
fn multiple_set_cookie_headers_survive() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let r = send(proxy.addr(), "GET", b"/queue/v1/__cookies", &[], b"");
    assert_eq!(r.status, 200);
    let mut cookies = r.header_all("set-cookie");
    cookies.sort();
    assert_eq!(cookies, vec!["a=1", "b=2"], "headers: {:?}", r.headers);
}

#[test]
fn redirects_are_returned_not_followed() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let r = send(proxy.addr(), "GET", b"/queue/v1/__redirect", &[], b"");
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some("https://elsewhere.example.com/target")
    );
    assert_eq!(r.text(), "redirecting to elsewhere");
    assert_eq!(tc.requests_seen(), 1);
}

#[test]
fn each_request_gets_a_fresh_nonce() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let mut nonces = BTreeSet::new();
    for _ in 0..5 {
        let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
        let authz = r.json()["headers"]["authorization"][0]
            .as_str()
            .unwrap()
            .to_string();
        let h = parse_hawk(&authz);
        nonces.insert(h.nonce.unwrap());
    }
    assert_eq!(nonces.len(), 5, "nonces must differ: {nonces:?}");
}

fn parse_hawk(authorization: &str) -> hawk::Header {
    use std::str::FromStr;
    let attrs = authorization
        .strip_prefix("Hawk ")
        .unwrap_or_else(|| panic!("not a Hawk header: {authorization}"));
    hawk::Header::from_str(attrs).expect("parse Hawk header")
}

#[test]
fn timestamps_use_the_current_clock() {
    // Sanity: the proxy's timestamp is close to our clock (±60 s), far inside the 900 s skew.
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    let authz = r.json()["headers"]["authorization"][0]
        .as_str()
        .unwrap()
        .to_string();
    let h = parse_hawk(&authz);
    let ts = h.ts.unwrap();
    let now = std::time::SystemTime::now();
    let skew = now.duration_since(ts).unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(60), "ts skew {skew:?}");
}

#[test]
fn wrong_credentials_are_rejected_by_the_upstream() {
    // Guard against a fake that accepts anything: a wrong token or unknown client must fail,
    // and the upstream's 401 reaches the task unchanged.
    let tc = fake();
    let root = tc.root_url();
    for (id, token) in [
        (CLIENT_ID, "not-the-token"),
        ("unknown/client", ACCESS_TOKEN),
    ] {
        let proxy = ProxyProcess::spawn(
            &[
                "--root-url",
                &root,
                "--client-id",
                id,
                "--access-token",
                token,
            ],
            &[],
        );
        let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
        assert_eq!(r.status, 401, "{id}: {}", r.text());
        assert_eq!(r.json()["code"], json!("AuthenticationFailed"));
        assert_eq!(r.header("www-authenticate"), Some("hawk"));
    }
    // authorizedScopes the credentials do not satisfy
    let proxy = proxy_for(&tc, &["auth:not-granted"]);
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .starts_with("Supplied credentials do not satisfy authorizedScopes"));
}

#[test]
fn task_supplied_forwarding_headers_do_not_break_verification() {
    // The API server derives the port from X-Forwarded-Port/-Proto (spec §1.3); if the task's
    // values reached it unchanged, the MAC would be checked against the wrong port.
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    for h in [
        ("X-Forwarded-Port", "1"),
        ("X-Forwarded-Proto", "https"),
        ("Host", "evil.example.com:444"),
    ] {
        let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[h], b"");
        let e = r.echo();
        assert_eq!(r.status, 200, "{h:?}: {e}");
        assert_auth_ok(&e);
        assert_eq!(e["host"], json!(tc.authority()), "{h:?}");
    }
}
