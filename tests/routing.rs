//! Request routing (wire spec §5.1, §5.2): API form, shortcut form, 404s, and exact forwarding
//! of request-target bytes.

mod support;

use serde_json::json;
use support::{fake, proxy_for, send};

/// (request-target sent to the proxy, request-target the upstream must receive)
const FORWARDED: &[(&str, &str)] = &[
    // §5.2 table
    (
        "/queue/v1/task/abc?x=1&y=%2F",
        "/api/queue/v1/task/abc?x=1&y=%2F",
    ),
    ("/api/queue/v1/task/abc?x=1", "/api/queue/v1/task/abc?x=1"),
    (
        "/queue/v1/double//slash/encode1%2F/encode2%252F",
        "/api/queue/v1/double//slash/encode1%2F/encode2%252F",
    ),
    ("/queue/v1/a/../b/./c", "/api/queue/v1/a/../b/./c"),
    ("/queue/v1/%2e%2e/y", "/api/queue/v1/%2e%2e/y"),
    ("/queue/v1//double", "/api/queue/v1/double"),
    ("/api/queue/v1//x", "/api/queue/v1/x"),
    ("/api//v1/x", "/api//v1/x"),
    ("/api/queue//x", "/api/queue//x"),
    ("/queue/v1/x?", "/api/queue/v1/x"),
    ("/api/queue/v1/x?", "/api/queue/v1/x"),
    ("/localhost/v1/x", "/api/localhost/v1/x"),
    // more raw bytes that must survive untouched
    (
        "/api/queue/v1/a%2Fb%2fc%41/..%2F./d",
        "/api/queue/v1/a%2Fb%2fc%41/..%2F./d",
    ),
    ("/api/queue/v1/double//slash", "/api/queue/v1/double//slash"),
    ("/queue/v1/x?b=1&a=2&a=3", "/api/queue/v1/x?b=1&a=2&a=3"),
    (
        "/queue/v1/x?scope=queue:get&s=%20+x",
        "/api/queue/v1/x?scope=queue:get&s=%20+x",
    ),
    ("/queue/v1/x?q=a/b?c&&e=", "/api/queue/v1/x?q=a/b?c&&e="),
    ("/queue/v1/x?%2F=%252F", "/api/queue/v1/x?%2F=%252F"),
    ("/queue/v1/", "/api/queue/v1/"),
    ("/api/queue/v1/", "/api/queue/v1/"),
    ("/queue/v1/?a=1", "/api/queue/v1/?a=1"),
    (
        "/auth/v1/test-authenticate-get/",
        "/api/auth/v1/test-authenticate-get/",
    ),
    (
        "/purge-cache/v1/purge-requests",
        "/api/purge-cache/v1/purge-requests",
    ),
    (
        "/queue/v1/x/y/z~!$'()*,;=:@",
        "/api/queue/v1/x/y/z~!$'()*,;=:@",
    ),
];

#[test]
fn api_and_shortcut_forms_forward_exact_targets() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let mut failures = vec![];
    for (sent, expected) in FORWARDED {
        let before = tc.requests_seen();
        let r = match support::client::try_send(proxy.addr(), "GET", sent.as_bytes(), &[], b"") {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{sent}: transport error {e}"));
                continue;
            }
        };
        // The fake's own record of the request (its response body is not always the echo,
        // e.g. `/api/queue/v1/task/abc` is answered by the fake queue).
        if tc.requests_seen() != before + 1 {
            failures.push(format!(
                "{sent}: status {} {:?}, did not reach upstream",
                r.status,
                r.text()
            ));
            continue;
        }
        let echo = tc.last_request().unwrap();
        if echo["status"] != json!(r.status) {
            failures.push(format!(
                "{sent}: status {} but upstream answered {}",
                r.status, echo["status"]
            ));
        }
        if echo["target"] != json!(expected) {
            failures.push(format!(
                "{sent}: upstream got {} expected {expected}",
                echo["target"]
            ));
        }
        if echo["auth"]["ok"] != json!(true) {
            failures.push(format!(
                "{sent}: upstream rejected signature: {}",
                echo["auth"]
            ));
        }
        if echo["host"] != json!(tc.authority()) {
            failures.push(format!(
                "{sent}: Host header {} != {}",
                echo["host"],
                tc.authority()
            ));
        }
        let endpoint = format!("{}{expected}", tc.root_url());
        if r.header("x-taskcluster-endpoint") != Some(endpoint.as_str()) {
            failures.push(format!(
                "{sent}: X-Taskcluster-Endpoint {:?} expected {endpoint:?}",
                r.header("x-taskcluster-endpoint")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "routing failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn root_url_with_trailing_slashes_and_path_joining() {
    let tc = fake();
    let root = format!("{}//", tc.root_url());
    let proxy = support::ProxyProcess::spawn(
        &[
            "--root-url",
            &root,
            "--client-id",
            support::CLIENT_ID,
            "--access-token",
            support::ACCESS_TOKEN,
        ],
        &[],
    );
    let r = send(proxy.addr(), "GET", b"/auth/v1//ping", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["target"], json!("/api/auth/v1/ping"));
    support::assert_auth_ok(&r.json());
}

fn assert_404(proxy: &support::ProxyProcess, target: &str, expected_body: &str) {
    let r = send(proxy.addr(), "GET", target.as_bytes(), &[], b"");
    assert_eq!(r.status, 404, "{target}: body {:?}", r.text());
    assert_eq!(
        r.text().trim_end_matches('\n'),
        expected_body,
        "{target}: unexpected 404 body"
    );
}

#[test]
fn invalid_api_paths_are_404() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    for t in ["/api/queue/v1", "/apiary/v1/x", "/api/queue"] {
        assert_404(&proxy, t, "invalid /api path");
    }
    assert_eq!(tc.requests_seen(), 0, "nothing may reach the upstream");
}

#[test]
fn invalid_service_names_are_404() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    for (t, seg) in [
        ("/", ""),
        ("/x@/", "x@"),
        ("/-bad/v1/x", "-bad"),
        ("/h.example.com:8080/x", "h.example.com:8080"),
        ("/bad_name/v1/x", "bad_name"),
        ("/bad-.example.com/x", "bad-.example.com"),
    ] {
        assert_404(
            &proxy,
            t,
            &format!("Unkown taskcluster service: {seg} is not a valid taskcluster service"),
        );
    }
    assert_eq!(tc.requests_seen(), 0, "nothing may reach the upstream");
}

#[test]
fn service_without_version_or_path_is_404_not_a_crash() {
    // Go panics here (slice out of range); we want a clean 404 with an explanation.
    let tc = fake();
    let mut proxy = proxy_for(&tc, &[]);
    for t in ["/queue", "/queue/v1"] {
        let r = support::client::try_send(proxy.addr(), "GET", t.as_bytes(), &[], b"")
            .unwrap_or_else(|e| panic!("{t}: no HTTP response: {e}"));
        assert_eq!(r.status, 404, "{t}: {:?}", r.text());
        assert!(!r.text().trim().is_empty(), "{t}: 404 body should explain");
    }
    assert_eq!(tc.requests_seen(), 0);
    assert!(proxy.is_running());
    // and the proxy keeps serving
    let r = send(proxy.addr(), "GET", b"/queue/v1/ok", &[], b"");
    assert_eq!(r.status, 200);
}
