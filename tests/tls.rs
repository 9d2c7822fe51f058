//! HTTPS upstreams: root URL over TLS with `--ca-file`, the hostname form
//! (`/<host.name>/<path>` → `https://host.name/<path>`) via `--connect-to`, and TLS failures.

mod support;

use serde_json::json;
use support::client::Conn;
use support::{
    assert_auth_ok, default_client, proxy_for, send, FakeTc, FakeTcOptions, ProxyProcess, CLIENT_ID,
};

fn tls_fake() -> FakeTc {
    FakeTc::start(FakeTcOptions {
        tls: true,
        dns_names: vec!["files.example.com".into()],
        clients: vec![default_client()],
        ..Default::default()
    })
}

#[test]
fn https_root_url_with_ca_file() {
    let tc = tls_fake();
    assert!(tc.root_url().starts_with("https://localhost:"));
    let proxy = proxy_for(&tc, &[]); // adds --ca-file
    let r = send(proxy.addr(), "POST", b"/queue/v1/x?y=%2F", &[], b"tls body");
    let e = support::ok_echo(&r);
    assert_eq!(e["host"], json!(tc.authority()));
    assert_eq!(e["target"], json!("/api/queue/v1/x?y=%2F"));
    assert_eq!(e["body_len"], json!(8));
    let endpoint = format!("{}/api/queue/v1/x?y=%2F", tc.root_url());
    assert_eq!(r.header("x-taskcluster-endpoint"), Some(endpoint.as_str()));
}

#[test]
fn https_without_trusted_ca_is_502() {
    let tc = tls_fake();
    let root = tc.root_url();
    let mut proxy = support::proxy_at(&root, &[], &[]);
    let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(!r.text().is_empty());
    assert_eq!(
        tc.requests_seen(),
        0,
        "no request may complete without a trusted certificate"
    );
    assert!(
        support::wait_until(std::time::Duration::from_secs(5), || tc.tls_failures() >= 1),
        "the proxy should have tried a TLS handshake"
    );
    assert!(proxy.is_running());
}

fn hostname_proxy(tc: &FakeTc) -> ProxyProcess {
    let connect_to = format!("files.example.com:443:127.0.0.1:{}", tc.port());
    proxy_for(tc, &["--connect-to", &connect_to])
}

#[test]
fn hostname_form_goes_to_https_443_via_connect_to() {
    let tc = tls_fake();
    let proxy = hostname_proxy(&tc);
    let cases = [
        ("/files.example.com/bar/baz?q=1", "/bar/baz?q=1"),
        ("/files.example.com", "/"),
        ("/files.example.com/", "/"),
        (
            "/files.example.com/a//b/%2F/%252F/../c?x=%20",
            "/a//b/%2F/%252F/../c?x=%20",
        ),
        ("/files.example.com/p?b=1&a=2", "/p?b=1&a=2"),
    ];
    for (sent, expected) in cases {
        let r = send(proxy.addr(), "GET", sent.as_bytes(), &[], b"");
        assert_eq!(r.status, 200, "{sent}: {}", r.text());
        let e = r.json();
        assert_auth_ok(&e);
        assert_eq!(e["target"], json!(expected), "{sent}");
        assert_eq!(e["host"], json!("files.example.com"), "{sent}: Host header");
        let endpoint = format!("https://files.example.com{expected}");
        assert_eq!(
            r.header("x-taskcluster-endpoint"),
            Some(endpoint.as_str()),
            "{sent}"
        );
    }
    let r = send(
        proxy.addr(),
        "PUT",
        b"/files.example.com/upload",
        &[],
        b"hello",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], json!(5));
    assert_eq!(r.json()["method"], json!("PUT"));
}

#[test]
fn hostname_form_with_mixed_case_host_is_signed_lower_case() {
    // The server lower-cases the host before checking the MAC (spec §1.2 line 6, §7.9).
    let tc = tls_fake();
    let proxy = hostname_proxy(&tc);
    let r = send(proxy.addr(), "GET", b"/Files.Example.COM/x", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_auth_ok(&r.json());
}

#[test]
fn bewit_for_https_url_verifies_on_default_port() {
    // The MAC of a bewit for `https://files.example.com/...` must use port 443; the fake checks
    // it over TLS with a Host header without port.
    let tc = tls_fake();
    let proxy = proxy_for(&tc, &[]);
    let url = "https://files.example.com/artifacts/public%2Flog.txt?b=1&a=2";
    let r = send(proxy.addr(), "POST", b"/bewit", &[], url.as_bytes());
    assert_eq!(r.status, 303, "{}", r.text());
    let signed = r.header("location").unwrap().to_string();
    let target = signed
        .strip_prefix("https://files.example.com")
        .unwrap_or_else(|| panic!("{signed}"));
    assert!(
        target.starts_with("/artifacts/public%2Flog.txt?b=1&a=2&bewit="),
        "{target}"
    );
    let mut c = Conn::connect_tls(tc.addr(), "files.example.com", tc.ca_pem().unwrap()).unwrap();
    let r = c
        .request(
            "GET",
            target.as_bytes(),
            &[("Host", "files.example.com")],
            b"",
        )
        .unwrap();
    let e = support::ok_echo(&r);
    assert_eq!(e["auth"]["scheme"], json!("bewit"));
    assert_eq!(e["auth"]["clientId"], json!(CLIENT_ID));
}
