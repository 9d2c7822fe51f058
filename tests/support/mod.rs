//! Shared integration-test support: a fake Taskcluster upstream that verifies Hawk like the real
//! server, a raw HTTP client, and a helper to run the proxy binary.
#![allow(dead_code)]

pub mod admin;
pub mod client;
pub mod creds;
pub mod fake_tc;
pub mod pattern;
pub mod process;
pub mod proxy;
pub mod users;
pub mod verify;

#[allow(unused_imports)]
pub use client::{send, Conn, Response};
#[allow(unused_imports)]
pub use fake_tc::{FakeTc, FakeTcOptions};
#[allow(unused_imports)]
pub use proxy::ProxyProcess;
#[allow(unused_imports)]
pub use verify::Client;

/// The permanent client most tests configure the proxy with.
pub const CLIENT_ID: &str = "proxy-test/client";
pub const ACCESS_TOKEN: &str = "perm-token-0123456789abcdefghijklmnopqrstu";
/// Scopes of [`CLIENT_ID`].
pub const CLIENT_SCOPES: &[&str] = &[
    "queue:*",
    "test:*",
    "auth:create-client:proxy-test/temp/*",
    "assume:project:proxy-test",
];

/// A second permanent client (credential rotation tests).
pub const CLIENT2_ID: &str = "proxy-test/rotated";
pub const ACCESS_TOKEN2: &str = "second-token-zyxwvutsrqponmlkjihgfedcba98";

pub fn default_client() -> Client {
    Client::new(CLIENT_ID, ACCESS_TOKEN, CLIENT_SCOPES)
}

pub fn second_client() -> Client {
    Client::new(CLIENT2_ID, ACCESS_TOKEN2, &["queue:*", "test:*"])
}

/// Fake TC (plain HTTP) knowing the default and second client.
pub fn fake() -> FakeTc {
    FakeTc::start(FakeTcOptions {
        clients: vec![default_client(), second_client()],
        ..Default::default()
    })
}

/// Proxy pointing at `tc` with the default permanent credentials, plus `extra` args.
pub fn proxy_for(tc: &FakeTc, extra: &[&str]) -> ProxyProcess {
    let root = tc.root_url();
    let mut args = vec![
        "--root-url",
        root.as_str(),
        "--client-id",
        CLIENT_ID,
        "--access-token",
        ACCESS_TOKEN,
    ];
    let ca = tc.ca_file().map(|p| p.to_string_lossy().into_owned());
    if let Some(ca) = ca.as_deref() {
        args.push("--ca-file");
        args.push(ca);
    }
    args.extend_from_slice(extra);
    ProxyProcess::spawn(&args, &[])
}

/// Assert that an echo shows a successfully authenticated request.
#[track_caller]
pub fn assert_auth_ok(echo: &serde_json::Value) {
    assert_eq!(
        echo["auth"]["ok"],
        serde_json::Value::Bool(true),
        "fake TC rejected the request: {}",
        serde_json::to_string_pretty(echo).unwrap()
    );
}

/// The signed URL of an answer to `/bewit`: asserts a 303 whose body equals its Location
/// header (`what` names the request in failures).
#[track_caller]
pub fn bewit_location(r: &Response, what: &str) -> String {
    assert_eq!(r.status, 303, "{what}: {}", r.text());
    let location = r
        .header("location")
        .unwrap_or_else(|| panic!("{what}: no Location header: {:?}", r.headers))
        .to_string();
    assert_eq!(r.text(), location, "{what}: body must equal Location");
    location
}

/// Poll `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
