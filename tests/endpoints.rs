//! The proxy's own endpoints: `/bewit` (wire spec §5.6, §3) and `/credentials` (§5.7), plus
//! upstream failures.

mod support;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::client::{self, try_send};
use support::creds::fresh_temp_creds;
use support::{
    assert_auth_ok, default_client, fake, proxy_for, send, FakeTc, ProxyProcess, ACCESS_TOKEN,
    ACCESS_TOKEN2, CLIENT2_ID, CLIENT_ID,
};

/// POST /bewit with `url`, check the 303 and return the signed URL.
fn bewit(proxy: &ProxyProcess, body: &str) -> String {
    let r = send(proxy.addr(), "POST", b"/bewit", &[], body.as_bytes());
    let location = support::bewit_location(&r, &format!("POST /bewit {body:?}"));
    assert!(
        r.header("x-taskcluster-proxy-version").is_some(),
        "/bewit responses carry the proxy headers too"
    );
    location
}

/// Decode the bewit in a signed URL: (id, exp, mac, ext).
fn decode_bewit(url: &str) -> (String, u64, String, String) {
    let b = url.rsplit_once("bewit=").expect("bewit in URL").1;
    assert!(
        b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
        "bewit must be unpadded base64url: {b}"
    );
    let raw = URL_SAFE_NO_PAD.decode(b).expect("base64url");
    let raw = String::from_utf8(raw).unwrap();
    let parts: Vec<&str> = raw.split('\\').collect();
    assert_eq!(parts.len(), 4, "raw bewit {raw:?}");
    (
        parts[0].to_string(),
        parts[1].parse().unwrap(),
        parts[2].to_string(),
        parts[3].to_string(),
    )
}

/// GET the signed URL's path+query directly from the fake (without the proxy).
fn fetch_from_fake(tc: &FakeTc, signed: &str) -> Value {
    let prefix = tc.root_url();
    let target = signed
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{signed} does not start with {prefix}"));
    let r = send(tc.addr(), "GET", target.as_bytes(), &[], b"");
    let e = r.echo();
    assert_eq!(r.status, 200, "fake rejected bewit URL {signed}: {e}");
    e
}

#[test]
fn bewit_urls_verify_including_unsorted_and_unescaped_queries() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let root = tc.root_url();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for path in [
        "/api/auth/v1/test-authenticate-get/",
        "/api/queue/v1/task/abc/artifacts/public%2Flogs%2Flive.log",
        "/api/queue/v1/x?c=1",
        "/api/queue/v1/x?b=1&a=2",
        "/api/queue/v1/x?scope=queue:get",
        "/api/queue/v1/x?a=%20b&c=d+e&f",
        "/api/queue/v1/a//b/../c",
    ] {
        let url = format!("{root}{path}");
        let signed = bewit(&proxy, &url);
        let sep = if path.contains('?') { '&' } else { '?' };
        assert!(
            signed.starts_with(&format!("{url}{sep}bewit=")),
            "the URL must be kept verbatim and the bewit appended: {signed}"
        );
        let (id, exp, _mac, ext) = decode_bewit(&signed);
        assert_eq!(id, CLIENT_ID);
        assert!(ext.is_empty(), "no ext without authorizedScopes: {ext}");
        assert!(
            (now + 3500..=now + 3700).contains(&exp),
            "bewit should be valid ~1 h: exp {exp} now {now}"
        );
        let e = fetch_from_fake(&tc, &signed);
        assert_eq!(e["auth"]["scheme"], json!("bewit"));
        assert_eq!(e["auth"]["clientId"], json!(CLIENT_ID));
    }
}

#[test]
fn bewit_body_whitespace_is_trimmed_and_any_method_works() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let url = format!("{}/api/queue/v1/trim", tc.root_url());
    let signed = bewit(&proxy, &format!("  {url}\n"));
    assert!(signed.starts_with(&format!("{url}?bewit=")), "{signed}");
    fetch_from_fake(&tc, &signed);
    let r = send(proxy.addr(), "PUT", b"/bewit", &[], url.as_bytes());
    assert_eq!(r.status, 303);
}

#[test]
fn bewit_carries_authorized_scopes() {
    let tc = fake();
    let proxy = proxy_for(&tc, &["queue:get-artifact:x/*"]);
    let signed = bewit(&proxy, &format!("{}/api/queue/v1/y", tc.root_url()));
    let (_, _, _, ext) = decode_bewit(&signed);
    assert!(
        !ext.is_empty(),
        "ext expected when authorizedScopes are configured"
    );
    let e = fetch_from_fake(&tc, &signed);
    assert_eq!(
        e["auth"]["authorizedScopes"],
        json!(["queue:get-artifact:x/*"])
    );
}

#[test]
fn bewit_with_temporary_credentials() {
    let tc = fake();
    let tmp = fresh_temp_creds(
        &default_client(),
        Some("proxy-test/temp/bewit"),
        &["queue:*"],
    );
    let root = tc.root_url();
    let proxy = support::proxy_with_temp_creds(&tc, &tmp);
    let signed = bewit(&proxy, &format!("{root}/api/queue/v1/z?b=2&a=1"));
    let e = fetch_from_fake(&tc, &signed);
    assert_eq!(e["auth"]["clientId"], json!("proxy-test/temp/bewit"));
    assert_eq!(e["auth"]["certificate"], tmp.certificate_json());
}

#[test]
fn bewit_errors() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    for bad in ["http://[::1/x", "://nohost"] {
        let r = send(proxy.addr(), "POST", b"/bewit", &[], bad.as_bytes());
        assert_eq!(r.status, 400, "{bad:?}: {} {:?}", r.status, r.text());
    }
    let huge = format!(
        "{}/api/queue/v1/x?q={}",
        tc.root_url(),
        "a".repeat(70 * 1024)
    );
    let r = try_send(proxy.addr(), "POST", b"/bewit", &[], huge.as_bytes())
        .expect("an HTTP response to an oversized /bewit body");
    assert_eq!(r.status, 413);
    // still alive
    bewit(&proxy, &format!("{}/api/queue/v1/x", tc.root_url()));
    assert_eq!(
        tc.requests_seen(),
        0,
        "/bewit must not contact the upstream"
    );
}

fn client_id_seen(proxy: &ProxyProcess) -> Value {
    let r = send(proxy.addr(), "GET", b"/queue/v1/whoami", &[], b"");
    let e = support::ok_echo(&r);
    e["auth"]["clientId"].clone()
}

fn put_credentials(proxy: &ProxyProcess, body: &[u8]) -> support::Response {
    try_send(
        proxy.addr(),
        "PUT",
        b"/credentials",
        &[("Content-Type", "application/json")],
        body,
    )
    .expect("HTTP response from PUT /credentials")
}

#[test]
fn credentials_rotation() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    assert_eq!(client_id_seen(&proxy), json!(CLIENT_ID));

    let body = json!({"clientId": CLIENT2_ID, "accessToken": ACCESS_TOKEN2}).to_string();
    let r = put_credentials(&proxy, body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(proxy.addr(), "GET", b"/queue/v1/whoami", &[], b"");
    assert_auth_ok(&r.json());
    assert_eq!(r.json()["auth"]["clientId"], json!(CLIENT2_ID));
    assert_eq!(
        r.header("x-taskcluster-proxy-perm-clientid"),
        Some(CLIENT2_ID)
    );

    // temporary credentials
    let tmp = fresh_temp_creds(&default_client(), Some("proxy-test/temp/rot"), &["queue:*"]);
    let body = json!({"clientId": tmp.client_id, "accessToken": tmp.access_token, "certificate": tmp.certificate}).to_string();
    let r = put_credentials(&proxy, body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(proxy.addr(), "GET", b"/queue/v1/whoami", &[], b"");
    let e = r.json();
    assert_auth_ok(&e);
    assert_eq!(e["auth"]["clientId"], json!("proxy-test/temp/rot"));
    assert_eq!(e["auth"]["certificate"], tmp.certificate_json());
    assert_eq!(
        r.header("x-taskcluster-proxy-temp-clientid"),
        Some("proxy-test/temp/rot")
    );
    assert_eq!(r.header("x-taskcluster-proxy-perm-clientid"), None);

    // and back to permanent ones (certificate omitted)
    let body = json!({"clientId": CLIENT_ID, "accessToken": ACCESS_TOKEN}).to_string();
    assert_eq!(put_credentials(&proxy, body.as_bytes()).status, 200);
    let r = send(proxy.addr(), "GET", b"/queue/v1/whoami", &[], b"");
    assert_eq!(r.json()["auth"]["clientId"], json!(CLIENT_ID));
    assert_eq!(r.json()["auth"]["certificate"], Value::Null);
    assert_eq!(
        r.header("x-taskcluster-proxy-perm-clientid"),
        Some(CLIENT_ID)
    );
    assert_eq!(r.header("x-taskcluster-proxy-temp-clientid"), None);

    // the new credentials are used for /bewit too
    let body = json!({"clientId": CLIENT2_ID, "accessToken": ACCESS_TOKEN2}).to_string();
    assert_eq!(put_credentials(&proxy, body.as_bytes()).status, 200);
    let signed = bewit(&proxy, &format!("{}/api/queue/v1/b", tc.root_url()));
    assert_eq!(
        fetch_from_fake(&tc, &signed)["auth"]["clientId"],
        json!(CLIENT2_ID)
    );
}

#[test]
fn credentials_keeps_authorized_scopes() {
    let tc = fake();
    let proxy = proxy_for(&tc, &["queue:keep"]);
    let body = json!({"clientId": CLIENT2_ID, "accessToken": ACCESS_TOKEN2}).to_string();
    assert_eq!(put_credentials(&proxy, body.as_bytes()).status, 200);
    let r = send(proxy.addr(), "GET", b"/queue/v1/whoami", &[], b"");
    let e = r.json();
    assert_auth_ok(&e);
    assert_eq!(e["auth"]["clientId"], json!(CLIENT2_ID));
    assert_eq!(e["auth"]["authorizedScopes"], json!(["queue:keep"]));
}

#[test]
fn credentials_wrong_methods_are_405() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let body = json!({"clientId": CLIENT2_ID, "accessToken": ACCESS_TOKEN2}).to_string();
    for m in ["GET", "POST", "DELETE"] {
        let r = send(proxy.addr(), m, b"/credentials", &[], body.as_bytes());
        assert_eq!(r.status, 405, "{m}");
    }
    assert_eq!(client_id_seen(&proxy), json!(CLIENT_ID));
}

#[test]
fn credentials_bad_requests_are_400_and_keep_old_credentials() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let bad: Vec<String> = vec![
        "{".into(),
        "".into(),
        "not json".into(),
        "[]".into(),
        "{}".into(),
        json!({"clientId": CLIENT2_ID}).to_string(),
        json!({"accessToken": ACCESS_TOKEN2}).to_string(),
        json!({"clientId": "", "accessToken": ACCESS_TOKEN2}).to_string(),
        json!({"clientId": CLIENT2_ID, "accessToken": 5}).to_string(),
        json!({"clientId": CLIENT2_ID, "accessToken": ACCESS_TOKEN2, "certificate": "not json"}).to_string(),
        json!({"clientId": CLIENT2_ID, "accessToken": ACCESS_TOKEN2, "certificate": "[1,2]"}).to_string(),
        json!({"clientId": CLIENT2_ID, "accessToken": ACCESS_TOKEN2, "certificate": {"version": 1}}).to_string(),
    ];
    let mut failures = vec![];
    for b in &bad {
        let r = put_credentials(&proxy, b.as_bytes());
        if r.status != 400 {
            failures.push(format!("{b:?}: status {} {:?}", r.status, r.text()));
        }
        let seen = client_id_seen(&proxy);
        if seen != json!(CLIENT_ID) {
            failures.push(format!("{b:?}: credentials changed to {seen}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let huge = format!(
        "{{\"clientId\":\"{CLIENT2_ID}\",\"accessToken\":\"{ACCESS_TOKEN2}\",\"pad\":\"{}\"}}",
        "x".repeat(70 * 1024)
    );
    let r = put_credentials(&proxy, huge.as_bytes());
    assert_eq!(r.status, 413);
    assert_eq!(client_id_seen(&proxy), json!(CLIENT_ID));
}

#[test]
fn credentials_rotation_does_not_wait_for_in_flight_download() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    const N: u64 = 40 * 64 * 1024; // 40 chunks, 25 ms apart: ~1 s
    let addr = proxy.addr();
    let (downloader, received) =
        client::slow_download(addr, N, 25, 64 * 1024, "download did not start streaming");
    let body = json!({"clientId": CLIENT2_ID, "accessToken": ACCESS_TOKEN2}).to_string();
    let start = Instant::now();
    let r = put_credentials(&proxy, body.as_bytes());
    let took = start.elapsed();
    let progress_at_put = received.load(Ordering::SeqCst);
    eprintln!("PUT /credentials during a download answered in {took:?}");
    assert_eq!(r.status, 200);
    assert!(
        took < Duration::from_millis(100),
        "PUT /credentials took {took:?} during an in-flight download"
    );
    assert!(
        progress_at_put < N,
        "the download had already finished when the credentials changed (not streamed?)"
    );
    let d = downloader.join().unwrap();
    assert_eq!(d.status, 200);
    assert_eq!(d.error, None);
    assert_eq!(d.len, N);
    assert!(d.pattern_ok, "download corrupted at {:?}", d.first_mismatch);
    // the download was signed with the old credentials, later requests with the new ones
    let dl = tc
        .requests()
        .into_iter()
        .find(|e| e["target"].as_str().unwrap_or("").contains("__download"))
        .unwrap();
    assert_eq!(dl["auth"]["clientId"], json!(CLIENT_ID));
    assert_eq!(client_id_seen(&proxy), json!(CLIENT2_ID));
}

#[test]
fn upstream_down_gives_502_and_proxy_survives() {
    let closed_port = support::proxy::free_port();
    let root = format!("http://127.0.0.1:{closed_port}");
    let mut proxy = support::proxy_at(&root, &[], &[]);
    for _ in 0..2 {
        let start = Instant::now();
        let r = send(proxy.addr(), "GET", b"/queue/v1/x", &[], b"");
        assert_eq!(r.status, 502, "{:?}", r.text());
        let text = r.text();
        assert!(text.len() < 1024, "502 body should be short: {text:?}");
        assert!(
            text.contains("127.0.0.1"),
            "502 body should name the upstream: {text:?}"
        );
        if let Some(ct) = r.header("content-type") {
            assert!(ct.starts_with("text/plain"), "content-type {ct}");
        }
        eprintln!("502 after {:?}: {text:?}", start.elapsed());
    }
    assert!(proxy.is_running());
    let r = send(
        proxy.addr(),
        "POST",
        b"/bewit",
        &[],
        format!("{root}/x").as_bytes(),
    );
    assert_eq!(r.status, 303);
}
