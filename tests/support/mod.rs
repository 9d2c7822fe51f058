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

/// Complete command-line settings (root URL and credentials) that never reach an upstream.
pub const SETTINGS_ARGS: &[&str] = &[
    "--root-url",
    "https://tc.example.com",
    "--client-id",
    "c",
    "--access-token",
    "t",
];

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

/// `--root-url root` and the default permanent credentials as flags, followed by `extra`.
pub fn default_args<'a>(root: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--root-url",
        root,
        "--client-id",
        CLIENT_ID,
        "--access-token",
        ACCESS_TOKEN,
    ];
    args.extend_from_slice(extra);
    args
}

/// Proxy pointing at `root` with the default permanent credentials, plus `extra` args and `envs`.
pub fn proxy_at(root: &str, extra: &[&str], envs: &[(&str, &str)]) -> ProxyProcess {
    ProxyProcess::spawn(&default_args(root, extra), envs)
}

/// Proxy pointing at `tc` with the default permanent credentials, plus `extra` args.
pub fn proxy_for(tc: &FakeTc, extra: &[&str]) -> ProxyProcess {
    let root = tc.root_url();
    let mut args = default_args(&root, &[]);
    let ca = tc.ca_file().map(|p| p.to_string_lossy().into_owned());
    if let Some(ca) = ca.as_deref() {
        args.push("--ca-file");
        args.push(ca);
    }
    args.extend_from_slice(extra);
    ProxyProcess::spawn(&args, &[])
}

/// Proxy pointing at `tc` with the temporary credentials `tmp` on the command line.
pub fn proxy_with_temp_creds(tc: &FakeTc, tmp: &creds::TempCreds) -> ProxyProcess {
    let root = tc.root_url();
    ProxyProcess::spawn(
        &[
            "--root-url",
            &root,
            "--client-id",
            &tmp.client_id,
            // `=` form: a base64url token may start with `-`
            &format!("--access-token={}", tmp.access_token),
            "--certificate",
            &tmp.certificate,
        ],
        &[],
    )
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

/// The echo of a successful response: asserts status 200 and [`assert_auth_ok`].
#[track_caller]
pub fn ok_echo(r: &Response) -> serde_json::Value {
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.json();
    assert_auth_ok(&e);
    e
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

/// The value of the Prometheus series line starting with `series` (exact name and labels).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
