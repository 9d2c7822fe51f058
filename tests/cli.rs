//! Command-line validation (wire spec §6.1, §6.2) and version flags.

mod support;

use std::time::Duration;
use support::proxy::{free_port, run_to_exit};

const ROOT_MSG: &str = "Root URL must be passed via environment variable TASKCLUSTER_ROOT_URL or command line option --root-url";
const CLIENT_MSG: &str = "Client ID must be passed via environment variable TASKCLUSTER_CLIENT_ID or command line option --client-id";
const TOKEN_MSG: &str = "Access token must be passed via environment variable TASKCLUSTER_ACCESS_TOKEN or command line option --access-token";

const TIMEOUT: Duration = Duration::from_secs(20);

/// Run with `-p <free> -i 127.0.0.1` + args; expect a non-zero exit with `msg` on stderr.
#[track_caller]
fn expect_failure(args: &[&str], envs: &[(&str, &str)], msg: &str) {
    let port = free_port().to_string();
    let mut full = vec!["-p", port.as_str(), "-i", "127.0.0.1"];
    full.extend_from_slice(args);
    expect_failure_raw(&full, envs, msg);
}

#[track_caller]
fn expect_failure_raw(args: &[&str], envs: &[(&str, &str)], msg: &str) {
    let (code, out, err) = run_to_exit(args, envs, TIMEOUT);
    assert!(
        code.is_some(),
        "{args:?}: did not exit within {TIMEOUT:?} (stderr: {err})"
    );
    assert_ne!(
        code,
        Some(0),
        "{args:?}: must fail (stdout: {out}, stderr: {err})"
    );
    assert!(
        err.contains(msg),
        "{args:?}: stderr should contain {msg:?}\n--- stderr ---\n{err}\n--- stdout ---\n{out}"
    );
}

#[test]
fn missing_root_url() {
    expect_failure(&["--client-id", "c", "--access-token", "t"], &[], ROOT_MSG);
    // root URL is checked first
    expect_failure(&[], &[], ROOT_MSG);
}

#[test]
fn missing_client_id() {
    expect_failure(
        &[
            "--root-url",
            "https://tc.example.com",
            "--access-token",
            "t",
        ],
        &[],
        CLIENT_MSG,
    );
    // root URL from the environment is honoured; the next check fails
    expect_failure(
        &["--access-token", "t"],
        &[("TASKCLUSTER_ROOT_URL", "https://tc.example.com")],
        CLIENT_MSG,
    );
    // an empty flag counts as missing
    expect_failure(
        &[
            "--root-url",
            "https://tc.example.com",
            "--client-id",
            "",
            "--access-token",
            "t",
        ],
        &[],
        CLIENT_MSG,
    );
}

#[test]
fn missing_access_token() {
    expect_failure(
        &["--root-url", "https://tc.example.com", "--client-id", "c"],
        &[],
        TOKEN_MSG,
    );
    expect_failure(
        &[],
        &[
            ("TASKCLUSTER_ROOT_URL", "https://tc.example.com"),
            ("TASKCLUSTER_CLIENT_ID", "c"),
        ],
        TOKEN_MSG,
    );
}

const GOOD: &[&str] = support::SETTINGS_ARGS;

#[test]
fn invalid_ip_address() {
    let port = free_port().to_string();
    let mut args = vec!["-p", port.as_str(), "-i", "not-an-ip"];
    args.extend_from_slice(GOOD);
    expect_failure_raw(
        &args,
        &[],
        "invalid IPv4/IPv6 address specified - cannot parse: not-an-ip",
    );
    let mut args = vec!["-p", port.as_str(), "--ip-address", "300.1.1.1"];
    args.extend_from_slice(GOOD);
    expect_failure_raw(
        &args,
        &[],
        "invalid IPv4/IPv6 address specified - cannot parse: 300.1.1.1",
    );
}

#[test]
fn invalid_port() {
    let mut args = vec!["-p", "70000", "-i", "127.0.0.1"];
    args.extend_from_slice(GOOD);
    expect_failure_raw(&args, &[], "port 70000 is not in range [0,65535]");
    let mut args = vec!["--port", "65536", "-i", "127.0.0.1"];
    args.extend_from_slice(GOOD);
    expect_failure_raw(&args, &[], "port 65536 is not in range [0,65535]");
    let mut args = vec!["-p", "abc", "-i", "127.0.0.1"];
    args.extend_from_slice(GOOD);
    expect_failure_raw(&args, &[], "abc");
}

#[test]
fn allowed_user_and_network_are_validated() {
    let mut a = vec!["--allowed-user", "no-such-user-here"];
    a.extend_from_slice(GOOD);
    expect_failure(
        &a,
        &[],
        "Failed to create connection verifier: user: unknown user no-such-user-here",
    );
    let mut a = vec!["--allowed-network", "10.0.0.0/8"];
    a.extend_from_slice(GOOD);
    expect_failure(
        &a,
        &[],
        "Failed to create connection verifier: --allowed-network requires --allowed-user",
    );
    let mut a = vec!["--allowed-user", "nobody", "--allowed-network", "nonsense"];
    a.extend_from_slice(GOOD);
    expect_failure(&a, &[], "invalid --allowed-network CIDR \"nonsense\"");
    let mut a = vec!["--allowed-user", "nobody", "--allowed-network", "0.0.0.0/0"];
    a.extend_from_slice(GOOD);
    expect_failure(&a, &[], "is too broad");
}

#[test]
fn version_flags() {
    let (code, out, err) = run_to_exit(&["--version"], &[], TIMEOUT);
    assert_eq!(code, Some(0), "stderr: {err}");
    let version_line = out.trim().to_string();
    assert!(
        version_line.starts_with("Taskcluster proxy "),
        "--version output: {out:?}"
    );
    let (code, out, err) = run_to_exit(&["--short-version"], &[], TIMEOUT);
    assert_eq!(code, Some(0), "stderr: {err}");
    let short = out.trim();
    assert!(
        !short.is_empty() && !short.contains(char::is_whitespace),
        "{out:?}"
    );
    assert!(
        version_line.contains(short),
        "--version ({version_line:?}) should contain --short-version ({short:?})"
    );
}

#[test]
fn help_exits_zero_and_lists_options() {
    let (code, out, err) = run_to_exit(&["--help"], &[], TIMEOUT);
    assert_eq!(code, Some(0), "stderr: {err}");
    let text = format!("{out}{err}");
    for opt in [
        "--root-url",
        "--client-id",
        "--access-token",
        "--task-id",
        "--port",
    ] {
        assert!(text.contains(opt), "help should mention {opt}: {text}");
    }
}

#[test]
fn valid_configuration_starts_and_listens() {
    let tc = support::fake();
    let proxy = support::proxy_for(&tc, &[]);
    let r = support::client::try_send(proxy.addr(), "GET", b"/queue/v1/ping", &[], b"")
        .expect("proxy answers");
    assert_eq!(r.status, 200);
}
