//! Per-request scope narrowing (Taskcluster issue #3122): `X-Taskcluster-Authorized-Scopes`
//! restricts one request to the listed scopes, which the proxy signs as `authorizedScopes`
//! (spec §2.2) after checking them against its configured scopes or certificate
//! (`src/scopes.rs`); the fake upstream verifies the result like the real server (§2.3).

mod support;

use serde_json::{json, Value};
use support::creds::fresh_temp_creds;
use support::{assert_auth_ok, default_client, fake, proxy_for, send, ProxyProcess};

const HEADER: &str = "X-Taskcluster-Authorized-Scopes";

fn narrowed(proxy: &ProxyProcess, target: &str, scopes: &str) -> support::Response {
    send(
        proxy.addr(),
        "GET",
        target.as_bytes(),
        &[(HEADER, scopes)],
        b"",
    )
}

#[test]
fn permanent_credentials_without_configured_scopes_narrow_and_the_server_enforces() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);

    let r = narrowed(
        &proxy,
        "/queue/v1/task/abc/status",
        r#"["queue:status:abc"]"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.echo();
    assert_auth_ok(&echo);
    assert_eq!(
        echo["auth"]["authorizedScopes"],
        json!(["queue:status:abc"])
    );
    assert_eq!(echo["auth"]["scopes"], json!(["queue:status:abc"]));
    assert!(
        echo["headers"]
            .get("x-taskcluster-authorized-scopes")
            .is_none(),
        "the narrowing header is for the proxy, not the upstream: {}",
        echo["headers"]
    );
    assert_eq!(
        r.header(HEADER),
        Some(r#"["queue:status:abc"]"#),
        "the response reports the scopes this request was signed with"
    );

    // `[]`: this request carries no scopes at all.
    let r = narrowed(&proxy, "/queue/v1/x", "[]");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo()["auth"]["authorizedScopes"], json!([]));

    // The proxy cannot know the client's scopes here: it forwards, the server refuses.
    let before = tc.requests_seen();
    let r = narrowed(&proxy, "/queue/v1/x", r#"["auth:create-client:x"]"#);
    assert_eq!(tc.requests_seen(), before + 1);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(
        r.text().contains("do not satisfy authorizedScopes"),
        "{}",
        r.text()
    );

    // Without the header nothing changes.
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    assert_auth_ok(&r.echo());
    assert_eq!(r.echo()["auth"]["authorizedScopes"], Value::Null);
    assert!(r.header(HEADER).is_none());
}

#[test]
fn configured_scopes_bound_what_a_request_may_ask_for() {
    let tc = fake();
    let proxy = proxy_for(&tc, &["queue:*", "test:authenticate-get"]);

    let r = narrowed(&proxy, "/queue/v1/x", r#"["queue:get-task:1"]"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.echo()["auth"]["authorizedScopes"],
        json!(["queue:get-task:1"])
    );

    let before = tc.requests_seen();
    let r = narrowed(
        &proxy,
        "/queue/v1/x",
        r#"["queue:get-task:1", "test:other", "secrets:get:x"]"#,
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("\"test:other\""), "{}", r.text());
    assert!(
        r.header("x-taskcluster-proxy-version").is_some(),
        "local answers carry the proxy headers"
    );
    assert_eq!(
        tc.requests_seen(),
        before,
        "refused requests never reach the upstream"
    );
}

#[test]
fn temporary_credentials_are_bounded_by_the_certificate() {
    let tc = fake();
    let temp = fresh_temp_creds(&default_client(), None, &["queue:get-task:*"]);
    let root = tc.root_url();
    let proxy = ProxyProcess::spawn(
        &[
            "--root-url",
            &root,
            "--client-id",
            &temp.client_id,
            "--access-token",
            &temp.access_token,
            "--certificate",
            &temp.certificate,
        ],
        &[],
    );
    let r = narrowed(&proxy, "/queue/v1/x", r#"["queue:get-task:42"]"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.echo();
    assert_auth_ok(&echo);
    assert_eq!(
        echo["auth"]["authorizedScopes"],
        json!(["queue:get-task:42"])
    );
    assert!(echo["auth"]["certificate"].is_object());

    let before = tc.requests_seen();
    let r = narrowed(&proxy, "/queue/v1/x", r#"["queue:create-task:42"]"#);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(tc.requests_seen(), before);
}

#[test]
fn malformed_narrowing_headers_are_400_and_never_forwarded() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let before = tc.requests_seen();
    for bad in [
        "queue:*",
        "[\"a\",",
        "{\"scopes\":[]}",
        "[1]",
        "[\"tab\\there\"]",
        "null",
        "",
    ] {
        let r = narrowed(&proxy, "/queue/v1/x", bad);
        assert_eq!(r.status, 400, "{bad:?}: {}", r.text());
        assert!(r.text().contains(HEADER), "{bad:?}: {}", r.text());
    }
    let r = send(
        proxy.addr(),
        "GET",
        b"/queue/v1/x",
        &[(HEADER, "[\"a\"]"), (HEADER, "[\"b\"]")],
        b"",
    );
    assert_eq!(r.status, 400, "repeated header: {}", r.text());
    let huge = serde_json::to_string(&vec!["x"; 1001]).unwrap();
    assert_eq!(narrowed(&proxy, "/queue/v1/x", &huge).status, 400);
    assert_eq!(tc.requests_seen(), before);
}
