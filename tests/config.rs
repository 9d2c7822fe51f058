//! The YAML configuration file (`-c/--conf`, section `taskcluster_proxy:`) and `--test-conf`:
//! the sample file, precedence (flag > env > YAML > default) checked by proxying to the fake and
//! reading who signed, listeners (TCP v4/v6 and Unix sockets with their mode), credentials files,
//! and every error path (key name and line reported, non-zero exit).

mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use support::client::Conn;
use support::creds::{fresh_temp_creds, TempCreds};
use support::process::{connection_refused, free_addr, mode_of, yq, Proc, TestDir};
use support::proxy::{free_port, run_to_exit};
use support::{
    assert_auth_ok, default_client, FakeTc, FakeTcOptions, ProxyProcess, Response, ACCESS_TOKEN,
    ACCESS_TOKEN2, CLIENT2_ID, CLIENT_ID,
};

const ROOT_MSG: &str = "Root URL must be passed via environment variable TASKCLUSTER_ROOT_URL or command line option --root-url";
const TIMEOUT: Duration = Duration::from_secs(15);

fn sample_path() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/conf/taskcluster-proxy.yaml").to_string()
}

/// `credentials:` block (2-space indented, inside `taskcluster_proxy:`).
fn creds_yaml(client_id: &str, token: &str) -> String {
    format!(
        "  credentials:\n    client_id: {}\n    access_token: {}\n",
        yq(client_id),
        yq(token)
    )
}

/// A root URL nobody listens on: requests going there fail with 502.
fn dead_root() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// Write `proxy.yaml` = Pingora keys for `dir` + `taskcluster_proxy:` + `section`.
fn conf_with(dir: &TestDir, section: &str) -> String {
    dir.write(
        "proxy.yaml",
        &format!("{}taskcluster_proxy:\n{section}", dir.server_keys(1)),
    )
}

/// `root_url:` of `tc` + the default permanent `credentials:` + `extra`.
fn default_section(tc: &FakeTc, extra: &str) -> String {
    section_for(&tc.root_url(), CLIENT_ID, ACCESS_TOKEN, extra)
}

/// `root_url: root` + `credentials:` of `client_id` + `extra`.
fn section_for(root: &str, client_id: &str, token: &str, extra: &str) -> String {
    format!(
        "  root_url: {}\n{}{extra}",
        yq(root),
        creds_yaml(client_id, token)
    )
}

/// [`conf_with`] a [`default_section`].
fn default_conf(dir: &TestDir, tc: &FakeTc, extra: &str) -> String {
    conf_with(dir, &default_section(tc, extra))
}

/// Temporary credentials named `name`, issued by the default client with `queue:*`.
fn temp_creds(name: &str) -> TempCreds {
    fresh_temp_creds(&default_client(), Some(name), &["queue:*"])
}

/// [`conf_with`] `root_url:` of `tc` and `tmp` as inline `credentials:` with a certificate.
fn temp_creds_conf(dir: &TestDir, tc: &FakeTc, tmp: &TempCreds) -> String {
    conf_with(
        dir,
        &format!(
            "  root_url: {}\n  credentials:\n    client_id: {}\n    access_token: {}\n    certificate: {}\n",
            yq(&tc.root_url()),
            yq(&tmp.client_id),
            yq(&tmp.access_token),
            yq(&tmp.certificate)
        ),
    )
}

/// GET through the proxy at `addr`; asserts 200 and a signature the fake accepted.
#[track_caller]
fn whoami_at(addr: SocketAddr) -> Response {
    let r = support::send(addr, "GET", b"/queue/v1/whoami", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_auth_ok(&r.json());
    r
}

/// Start the proxy with `-c conf` and [`whoami_at`] it.
#[track_caller]
fn whoami_with_conf(conf: &str) -> Response {
    let proxy = ProxyProcess::spawn(&["-c", conf], &[]);
    whoami_at(proxy.addr())
}

fn signer(r: &Response) -> Value {
    r.json()["auth"]["clientId"].clone()
}

/// `X-Taskcluster-Authorized-Scopes` parsed as JSON (None when absent).
fn authorized_scopes_header(r: &Response) -> Option<Value> {
    r.header("x-taskcluster-authorized-scopes").map(|h| {
        serde_json::from_str(h).unwrap_or_else(|e| panic!("header {h:?} is not JSON: {e}"))
    })
}

/// Whether `text` contains `line <n>` not followed by another digit.
fn mentions_line(text: &str, n: usize) -> bool {
    let needle = format!("line {n}");
    text.match_indices(&needle).any(|(i, _)| {
        !text[i + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// 1-based number of the first line of `yaml` containing `needle`.
fn line_of(yaml: &str, needle: &str) -> usize {
    yaml.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in\n{yaml}"))
        + 1
}

/// `text` contains the word `ok` (case-insensitive), e.g. "configuration OK".
fn says_ok(text: &str) -> bool {
    text.to_ascii_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| w == "ok")
}

// ---------------------------------------------------------------------------------------------
// The sample file and --test-conf

#[test]
fn sample_configuration_passes_test_conf() {
    let path = sample_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("the sample configuration {path} is missing: {e}"));
    assert!(
        text.contains("taskcluster_proxy:"),
        "the sample must contain our section:\n{text}"
    );
    for args in [
        vec!["--test-conf", "-c", path.as_str()],
        vec!["--conf", path.as_str(), "--test-conf"],
    ] {
        let start = Instant::now();
        let (code, out, err) = run_to_exit(&args, &[], TIMEOUT);
        assert_eq!(
            code,
            Some(0),
            "{args:?} must exit 0\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
        );
        assert!(
            says_ok(&format!("{out}\n{err}")),
            "--test-conf should say the configuration is OK\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
        );
        eprintln!("{args:?}: exit 0 after {:?}", start.elapsed());
    }
}

#[test]
fn sample_configuration_documents_every_key() {
    let text = std::fs::read_to_string(sample_path()).expect("sample configuration");
    let mut missing = vec![];
    for key in [
        "version",
        "threads",
        "pid_file",
        "upgrade_sock",
        "daemon",
        "error_log",
        "grace_period_seconds",
        "graceful_shutdown_timeout_seconds",
        "upstream_keepalive_pool_size",
        "taskcluster_proxy",
        "listen",
        "address",
        "unix",
        "mode",
        "root_url",
        "credentials",
        "client_id",
        "access_token",
        "certificate",
        "credentials_file",
        "authorized_scopes",
        "task_id",
        "state_file",
        "ca_file",
        "connect_to",
        "log_level",
        "upstream_timeouts",
        "connect_seconds",
        "tls_seconds",
        "read_seconds",
        "write_seconds",
        "idle_seconds",
        "metrics_address",
        "access_log",
        "downstream_timeouts",
        "keepalive_seconds",
        "limits",
        "max_header_bytes",
        "max_path_bytes",
        "max_connections",
        "requests_per_second_per_client",
        "retries",
        "max_attempts",
        "max_seconds",
        "initial_backoff_ms",
        "credentials_endpoint",
        "admin_listen",
        "hostname_allowlist",
    ] {
        if !text.contains(&format!("{key}:")) {
            missing.push(key);
        }
    }
    assert!(
        missing.is_empty(),
        "the sample configuration should show (at least commented out) every key; missing: {missing:?}"
    );
}

#[test]
fn test_conf_validates_without_listening() {
    let tc = support::fake();
    let dir = TestDir::new();
    let addr = free_addr();
    let conf = dir.write_tcp_conf(
        1,
        addr,
        &tc.root_url(),
        &creds_yaml(CLIENT_ID, ACCESS_TOKEN),
    );
    let (code, out, err) = run_to_exit(&["--test-conf", "-c", &conf], &[], TIMEOUT);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(
        says_ok(&format!("{out}{err}")),
        "stdout: {out}\nstderr: {err}"
    );
    assert!(connection_refused(addr), "--test-conf must not listen");
    assert_eq!(
        tc.requests_seen(),
        0,
        "--test-conf must not contact the upstream"
    );

    // command-line settings only
    let (code, out, err) = run_to_exit(
        &[&["--test-conf"], support::SETTINGS_ARGS].concat(),
        &[],
        TIMEOUT,
    );
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");

    // the credential shape is validated too
    let conf = conf_with(
        &dir,
        &format!(
            "  root_url: {}\n  credentials:\n    client_id: c\n    access_token: t\n    certificate: '{{not json'\n",
            yq(&tc.root_url())
        ),
    );
    let (code, out, err) = run_to_exit(&["--test-conf", "-c", &conf], &[], TIMEOUT);
    assert!(
        code.is_some() && code != Some(0),
        "a certificate that is not JSON must fail --test-conf (code {code:?})\nstdout: {out}\nstderr: {err}"
    );
    assert!(err.contains("certificate"), "stderr: {err}");
}

// ---------------------------------------------------------------------------------------------
// Precedence: flag > env > YAML > default

#[test]
fn yaml_root_url_and_credentials_are_used() {
    let tc = support::fake();
    let dir = TestDir::new();
    let conf = default_conf(&dir, &tc, "");
    let proxy = ProxyProcess::spawn(&["-c", &conf], &[]);
    let r = whoami_at(proxy.addr());
    assert_eq!(signer(&r), json!(CLIENT_ID));
    assert_eq!(
        r.header("x-taskcluster-proxy-perm-clientid"),
        Some(CLIENT_ID)
    );
    assert_eq!(r.header("x-taskcluster-proxy-temp-clientid"), None);
    assert_eq!(
        authorized_scopes_header(&r),
        None,
        "authorized_scopes absent ⇒ no restriction"
    );
    assert_eq!(r.json()["auth"]["authorizedScopes"], Value::Null);
    let endpoint = format!("{}/api/queue/v1/whoami", tc.root_url());
    assert_eq!(r.header("x-taskcluster-endpoint"), Some(endpoint.as_str()));
}

#[test]
fn env_beats_yaml() {
    let tc = support::fake();
    let dir = TestDir::new();
    let conf = conf_with(
        &dir,
        &section_for(&dead_root(), CLIENT_ID, ACCESS_TOKEN, ""),
    );
    let root = tc.root_url();
    // root URL from the environment, credentials from the YAML file
    let proxy = ProxyProcess::spawn(&["-c", &conf], &[("TASKCLUSTER_ROOT_URL", &root)]);
    let r = whoami_at(proxy.addr());
    assert_eq!(signer(&r), json!(CLIENT_ID));
    drop(proxy);

    // root URL and credentials from the environment
    let proxy = ProxyProcess::spawn(
        &["-c", &conf],
        &[
            ("TASKCLUSTER_ROOT_URL", &root),
            ("TASKCLUSTER_CLIENT_ID", CLIENT2_ID),
            ("TASKCLUSTER_ACCESS_TOKEN", ACCESS_TOKEN2),
        ],
    );
    let r = whoami_at(proxy.addr());
    assert_eq!(signer(&r), json!(CLIENT2_ID));
    assert_eq!(
        r.header("x-taskcluster-proxy-perm-clientid"),
        Some(CLIENT2_ID)
    );
}

#[test]
fn flags_beat_env_and_yaml() {
    let tc = support::fake();
    let dir = TestDir::new();
    let conf = conf_with(
        &dir,
        &section_for(
            &dead_root(),
            CLIENT2_ID,
            ACCESS_TOKEN2,
            "  authorized_scopes: [\"queue:from-yaml\"]\n",
        ),
    );
    let root = tc.root_url();
    let dead = dead_root();
    let env = [
        ("TASKCLUSTER_ROOT_URL", dead.as_str()),
        ("TASKCLUSTER_CLIENT_ID", CLIENT2_ID),
        ("TASKCLUSTER_ACCESS_TOKEN", ACCESS_TOKEN2),
    ];
    let proxy = ProxyProcess::spawn(
        &[
            "-c",
            &conf,
            "--root-url",
            &root,
            "--client-id",
            CLIENT_ID,
            "--access-token",
            ACCESS_TOKEN,
        ],
        &env,
    );
    let r = whoami_at(proxy.addr());
    assert_eq!(signer(&r), json!(CLIENT_ID));
    assert_eq!(
        r.header("x-taskcluster-proxy-perm-clientid"),
        Some(CLIENT_ID)
    );
    assert_eq!(
        authorized_scopes_header(&r),
        Some(json!(["queue:from-yaml"])),
        "no positional scopes ⇒ the YAML authorized_scopes apply"
    );
    drop(proxy);

    // positional scopes on the command line replace the YAML list
    let proxy = ProxyProcess::spawn(&["-c", &conf, "--root-url", &root, "queue:from-cli"], &env);
    let r = whoami_at(proxy.addr());
    assert_eq!(
        signer(&r),
        json!(CLIENT2_ID),
        "credentials from the environment"
    );
    assert_eq!(
        authorized_scopes_header(&r),
        Some(json!(["queue:from-cli"]))
    );
    assert_eq!(
        r.json()["auth"]["authorizedScopes"],
        json!(["queue:from-cli"])
    );
}

#[test]
fn yaml_authorized_scopes_list_empty_and_absent() {
    let tc = support::fake();
    let root = yq(&tc.root_url());
    let creds = creds_yaml(CLIENT_ID, ACCESS_TOKEN);
    for (yaml, expected) in [
        (
            "  authorized_scopes:\n    - \"queue:a\"\n    - \"test:b\"\n",
            Some(json!(["queue:a", "test:b"])),
        ),
        (
            "  authorized_scopes: [\"queue:a\", \"test:b\"]\n",
            Some(json!(["queue:a", "test:b"])),
        ),
        ("  authorized_scopes: []\n", Some(json!([]))),
        ("", None),
    ] {
        let dir = TestDir::new();
        let conf = conf_with(&dir, &format!("  root_url: {root}\n{creds}{yaml}"));
        let proxy = ProxyProcess::spawn(&["-c", &conf], &[]);
        let r = whoami_at(proxy.addr());
        assert_eq!(authorized_scopes_header(&r), expected, "{yaml:?}");
        assert_eq!(
            r.json()["auth"]["authorizedScopes"],
            expected.clone().unwrap_or(Value::Null),
            "{yaml:?}: authorizedScopes as the fake saw them"
        );
        if expected == Some(json!([])) {
            // restricted to nothing: the fake's effective scopes are empty
            assert_eq!(r.json()["auth"]["scopes"], json!([]), "{yaml:?}");
        }
    }
}

#[test]
fn yaml_task_id_adds_the_task_scopes() {
    let tc = FakeTc::start(FakeTcOptions {
        clients: vec![default_client()],
        tasks: vec![("TaskFromYaml01".into(), vec!["queue:from-task".into()])],
        ..Default::default()
    });
    let dir = TestDir::new();
    let conf = default_conf(
        &dir,
        &tc,
        "  task_id: TaskFromYaml01\n  authorized_scopes: [\"queue:from-yaml\"]\n",
    );
    let proxy = ProxyProcess::spawn(&["-c", &conf], &[]);
    assert_eq!(tc.task_fetches(), 1, "the task is fetched once at start-up");
    let r = whoami_at(proxy.addr());
    let mut got: Vec<String> =
        serde_json::from_value(r.json()["auth"]["authorizedScopes"].clone()).unwrap();
    got.sort();
    assert_eq!(got, ["queue:from-task", "queue:from-yaml"]);
}

#[test]
fn yaml_inline_temporary_credentials() {
    let tc = support::fake();
    let tmp = temp_creds("proxy-test/temp/yaml");
    let dir = TestDir::new();
    let conf = temp_creds_conf(&dir, &tc, &tmp);
    let proxy = ProxyProcess::spawn(&["-c", &conf], &[]);
    let r = whoami_at(proxy.addr());
    assert_eq!(signer(&r), json!("proxy-test/temp/yaml"));
    assert_eq!(r.json()["auth"]["certificate"], tmp.certificate_json());
    assert_eq!(
        r.header("x-taskcluster-proxy-temp-clientid"),
        Some("proxy-test/temp/yaml")
    );
    assert_eq!(r.header("x-taskcluster-proxy-perm-clientid"), None);
}

#[test]
fn yaml_ca_file_and_connect_to() {
    let tc = FakeTc::start(FakeTcOptions {
        tls: true,
        dns_names: vec!["tc.example.com".into()],
        clients: vec![default_client()],
        ..Default::default()
    });
    let dir = TestDir::new();
    let ca = tc.ca_file().unwrap();
    let conf = conf_with(
        &dir,
        &format!(
            "  root_url: https://tc.example.com\n{}  ca_file: {}\n  connect_to:\n    - \"tc.example.com:443:127.0.0.1:{}\"\n",
            creds_yaml(CLIENT_ID, ACCESS_TOKEN),
            yq(&ca.to_string_lossy()),
            tc.port()
        ),
    );
    let r = whoami_with_conf(&conf);
    assert_eq!(r.json()["host"], json!("tc.example.com"));
    assert_eq!(signer(&r), json!(CLIENT_ID));
}

#[test]
fn yaml_upstream_read_timeout_applies() {
    let tc = support::fake();
    let dir = TestDir::new();
    let conf = default_conf(
        &dir,
        &tc,
        "  upstream_timeouts:\n    connect_seconds: 5\n    read_seconds: 1\n",
    );
    let proxy = ProxyProcess::spawn(&["-c", &conf], &[]);
    let mut conn =
        Conn::connect_with_timeout(proxy.addr(), Duration::from_secs(20)).expect("connect");
    let start = Instant::now();
    let r = conn
        .request("GET", b"/queue/v1/__hang", &[("Connection", "close")], b"")
        .expect("the proxy must answer once the 1 s upstream read timeout fires");
    let took = start.elapsed();
    eprintln!("__hang answered {} after {took:?}", r.status);
    assert!(r.status >= 500, "status {} {}", r.status, r.text());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "read_seconds: 1 should end the request after ~1 s, took {took:?}"
    );
}

#[test]
fn yaml_log_level() {
    if std::env::var_os("RUST_LOG").is_some() {
        eprintln!("RUST_LOG is set in the test environment; skipping");
        return;
    }
    let tc = support::fake();
    let dir = TestDir::new();
    let section = |level: &str| default_section(&tc, &format!("  log_level: {level}\n"));
    let conf = conf_with(&dir, &section("error"));
    let proxy = ProxyProcess::spawn(&["-c", &conf], &[]);
    whoami_at(proxy.addr());
    let quiet = proxy.stderr_text();
    drop(proxy);
    assert!(
        !quiet.contains("INFO") && !quiet.contains("WARN"),
        "log_level: error must silence info/warn messages:\n{quiet}"
    );

    // RUST_LOG overrides the file
    let proxy = ProxyProcess::spawn(&["-c", &conf], &[("RUST_LOG", "info")]);
    whoami_at(proxy.addr());
    let loud = proxy.stderr_text();
    drop(proxy);
    assert!(loud.contains("INFO"), "RUST_LOG=info must win:\n{loud}");

    let conf = conf_with(&dir, &section("debug"));
    let proxy = ProxyProcess::spawn(&["-c", &conf], &[]);
    whoami_at(proxy.addr());
    let debug = proxy.stderr_text();
    assert!(debug.contains("DEBUG"), "log_level: debug:\n{debug}");
}

// ---------------------------------------------------------------------------------------------
// Listeners

#[test]
fn listeners_tcp_v4_v6_and_unix_sockets_with_modes() {
    let tc = support::fake();
    let dir = TestDir::new();
    let v4 = free_addr();
    let v6: Option<SocketAddr> = std::net::TcpListener::bind("[::1]:0")
        .ok()
        .map(|l| l.local_addr().unwrap());
    if v6.is_none() {
        eprintln!("no IPv6 loopback here: testing IPv4 and Unix sockets only");
    }
    let sock_a = dir.path("a.sock");
    let sock_b = dir.path("b.sock");
    let sock_c = dir.path("c.sock");
    let mut listen = format!("  listen:\n    - address: \"{v4}\"\n");
    if let Some(v6) = v6 {
        listen.push_str(&format!("    - address: \"{v6}\"\n"));
    }
    listen.push_str(&format!(
        "    - unix: {}\n      mode: \"0660\"\n    - unix: {}\n      mode: 0o600\n    - unix: {}\n      mode: 432\n",
        yq(&sock_a.to_string_lossy()),
        yq(&sock_b.to_string_lossy()),
        yq(&sock_c.to_string_lossy()),
    ));
    let conf = conf_with(&dir, &format!("{listen}{}", default_section(&tc, "")));
    let mut p = Proc::start(&["-c", &conf], &[]);
    p.expect_tcp(v4);
    for addr in std::iter::once(v4).chain(v6) {
        let r = whoami_at(addr);
        assert_eq!(signer(&r), json!(CLIENT_ID), "via {addr}");
    }
    for (sock, mode) in [(&sock_a, 0o660), (&sock_b, 0o600), (&sock_c, 0o660)] {
        assert!(
            support::wait_until(Duration::from_secs(5), || sock.exists()),
            "{} not created",
            sock.display()
        );
        assert_eq!(
            mode_of(sock) & 0o777,
            mode,
            "mode of {} is {:o}",
            sock.display(),
            mode_of(sock)
        );
        let mut conn = Conn::connect_unix(sock)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", sock.display()));
        // two requests on one connection: keep-alive works over Unix sockets too
        for i in 0..2 {
            let target = format!("/queue/v1/over-unix/{i}");
            let r = conn
                .request("POST", target.as_bytes(), &[], b"{\"over\":\"unix\"}")
                .unwrap_or_else(|e| panic!("request over {}: {e}", sock.display()));
            let e = support::ok_echo(&r);
            assert_eq!(e["target"], json!(format!("/api/queue/v1/over-unix/{i}")));
            assert_eq!(e["body_len"], json!(15));
        }
    }
    assert!(p.is_running());
}

#[test]
fn stale_unix_socket_file_is_replaced() {
    // a socket file left behind by a process that was killed
    let tc = support::fake();
    let dir = TestDir::new();
    let sock = dir.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let addr = free_addr();
    let conf = conf_with(
        &dir,
        &format!(
            "  listen:\n    - address: \"{addr}\"\n    - unix: {}\n      mode: \"0600\"\n{}",
            yq(&sock.to_string_lossy()),
            default_section(&tc, "")
        ),
    );
    let mut p = Proc::start(&["-c", &conf], &[]);
    p.expect_tcp(addr);
    let mut conn = Conn::connect_unix(&sock).expect("connect to the re-created socket");
    let r = conn
        .request("GET", b"/queue/v1/stale", &[("Connection", "close")], b"")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_auth_ok(&r.json());
    assert_eq!(mode_of(&sock) & 0o777, 0o600);
}

#[test]
fn command_line_listen_replaces_yaml_listen() {
    let tc = support::fake();
    let dir = TestDir::new();
    let yaml_addr = free_addr();
    let sock = dir.path("yaml.sock");
    let conf = conf_with(
        &dir,
        &format!(
            "  listen:\n    - address: \"{yaml_addr}\"\n    - unix: {}\n{}",
            yq(&sock.to_string_lossy()),
            default_section(&tc, "")
        ),
    );
    let proxy = ProxyProcess::spawn(&["-c", &conf], &[]); // adds -p <free> -i 127.0.0.1
    whoami_at(proxy.addr());
    assert!(
        connection_refused(yaml_addr),
        "-p/-i replace the YAML listeners entirely ({yaml_addr} must not listen)"
    );
    assert!(
        !sock.exists(),
        "-p/-i replace the YAML listeners entirely ({} must not exist)",
        sock.display()
    );
}

// ---------------------------------------------------------------------------------------------
// credentials_file

fn creds_file_conf(dir: &TestDir, tc: &FakeTc, file: &str) -> String {
    conf_with(
        dir,
        &format!(
            "  root_url: {}\n  credentials_file: {}\n",
            yq(&tc.root_url()),
            yq(file)
        ),
    )
}

#[test]
fn credentials_file_with_mode_0600() {
    let tc = support::fake();
    let dir = TestDir::new();
    let file = dir.write_mode(
        "credentials.json",
        &json!({"clientId": CLIENT2_ID, "accessToken": ACCESS_TOKEN2}).to_string(),
        0o600,
    );
    let conf = creds_file_conf(&dir, &tc, &file);
    let (code, out, err) = run_to_exit(&["--test-conf", "-c", &conf], &[], TIMEOUT);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let r = whoami_with_conf(&conf);
    assert_eq!(signer(&r), json!(CLIENT2_ID));

    // temporary credentials in the file; 0400 is fine too
    let tmp = temp_creds("proxy-test/temp/file");
    let file = dir.write_mode(
        "temp-credentials.json",
        &json!({"clientId": tmp.client_id, "accessToken": tmp.access_token, "certificate": tmp.certificate}).to_string(),
        0o400,
    );
    let conf = creds_file_conf(&dir, &tc, &file);
    let proxy = ProxyProcess::spawn(&["-c", &conf], &[]);
    let r = whoami_at(proxy.addr());
    assert_eq!(signer(&r), json!("proxy-test/temp/file"));
    assert_eq!(r.json()["auth"]["certificate"], tmp.certificate_json());
}

#[test]
fn credentials_file_readable_by_group_or_others_is_refused() {
    let tc = support::fake();
    let dir = TestDir::new();
    for mode in [0o644, 0o640, 0o604, 0o660, 0o666] {
        let file = dir.write_mode(
            &format!("credentials-{mode:o}.json"),
            &json!({"clientId": CLIENT_ID, "accessToken": ACCESS_TOKEN}).to_string(),
            mode,
        );
        let conf = creds_file_conf(&dir, &tc, &file);
        expect_error_both_ways(&conf, &[&file, "readable"], None);
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Run the proxy with `-c conf` normally and with `--test-conf`; both must exit non-zero with
/// every string of `needles` on stderr (case-insensitive), and `line N` when `line` is given.
#[track_caller]
fn expect_error_both_ways(conf: &str, needles: &[&str], line: Option<usize>) {
    for args in [vec!["-c", conf], vec!["--test-conf", "-c", conf]] {
        let (code, out, err) = run_to_exit(&args, &[], TIMEOUT);
        let yaml = std::fs::read_to_string(conf).unwrap_or_default();
        let ctx = format!(
            "{args:?}\n--- config ---\n{yaml}\n--- stderr ---\n{err}\n--- stdout ---\n{out}"
        );
        assert!(code.is_some(), "did not exit within {TIMEOUT:?}: {ctx}");
        assert_ne!(code, Some(0), "must fail: {ctx}");
        let lower = err.to_lowercase();
        for n in needles {
            assert!(
                lower.contains(&n.to_lowercase()),
                "stderr should contain {n:?}: {ctx}"
            );
        }
        if let Some(n) = line {
            assert!(
                mentions_line(&err, n),
                "stderr should say `line {n}`: {ctx}"
            );
        }
    }
}

/// A complete, valid section except for `broken` (which replaces nothing; it is appended).
fn section_plus(dir: &TestDir, broken: &str) -> (String, String) {
    let addr = free_addr();
    let text = format!(
        "{}taskcluster_proxy:\n  listen:\n    - address: \"{addr}\"\n  root_url: https://tc.example.com\n{broken}",
        dir.server_keys(1)
    );
    (dir.write("proxy.yaml", &text), text)
}

#[test]
fn unknown_keys_are_errors_with_key_and_line() {
    let creds = creds_yaml("c", "t");
    let cases: Vec<(String, &str)> = vec![
        // top of our section
        (
            format!("{creds}  root_ur: https://tc.example.com\n"),
            "root_ur",
        ),
        (
            format!("{creds}  authorised_scopes: []\n"),
            "authorised_scopes",
        ),
        // nested
        (
            format!("{creds}  upstream_timeouts:\n    connect_seconds: 5\n    conect_seconds: 1\n"),
            "conect_seconds",
        ),
        (
            "  credentials:\n    client_id: c\n    acess_token: t\n".to_string(),
            "acess_token",
        ),
        (
            format!("{creds}  listen:\n    - unix: SOCK\n      permissions: \"0660\"\n"),
            "permissions",
        ),
    ];
    for (broken, key) in cases {
        let dir = TestDir::new();
        let broken = broken.replace("SOCK", &yq(&dir.p("x.sock")));
        // `listen` appears twice in one case; use a section without the default listener there
        let (conf, text) = if broken.contains("  listen:") {
            let text = format!(
                "{}taskcluster_proxy:\n  root_url: https://tc.example.com\n{broken}",
                dir.server_keys(1)
            );
            (dir.write("proxy.yaml", &text), text)
        } else {
            section_plus(&dir, &broken)
        };
        let line = line_of(&text, &format!("{key}:"));
        expect_error_both_ways(&conf, &[key], Some(line));
    }
}

#[test]
fn wrong_types_are_errors_with_key_and_line() {
    let creds = creds_yaml("c", "t");
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{creds}  upstream_timeouts:\n    read_seconds: \"soon\"\n"),
            "read_seconds",
        ),
        (
            format!("{creds}  authorized_scopes: \"queue:a\"\n"),
            "authorized_scopes",
        ),
        (format!("{creds}  connect_to: 5\n"), "connect_to"),
        (
            format!("{creds}  credentials_file: [a, b]\n"),
            "credentials_file",
        ),
    ];
    for (broken, key) in cases {
        let dir = TestDir::new();
        let (conf, text) = section_plus(&dir, &broken);
        let line = line_of(&text, &format!("{key}:"));
        expect_error_both_ways(&conf, &[key], Some(line));
    }

    // `listen: 5`
    let dir = TestDir::new();
    let text = format!(
        "{}taskcluster_proxy:\n  root_url: https://tc.example.com\n{creds}  listen: 5\n",
        dir.server_keys(1)
    );
    let conf = dir.write("proxy.yaml", &text);
    expect_error_both_ways(&conf, &["listen"], Some(line_of(&text, "listen:")));

    // a Pingora key with the wrong type
    let dir = TestDir::new();
    let text = format!(
        "version: 1\nthreads: many\npid_file: {}\nupgrade_sock: {}\ntaskcluster_proxy:\n  listen:\n    - address: \"{}\"\n  root_url: https://tc.example.com\n{creds}",
        dir.pid_file().display(),
        dir.upgrade_sock().display(),
        free_addr()
    );
    let conf = dir.write("proxy.yaml", &text);
    expect_error_both_ways(&conf, &["threads"], Some(2));

    // YAML syntax error
    let dir = TestDir::new();
    let (conf, text) = section_plus(&dir, &format!("{creds}  connect_to: [\"a:1:b:2\"\n"));
    let _ = text;
    expect_error_both_ways(&conf, &["line"], None);
}

#[test]
fn invalid_values_are_errors() {
    let creds = creds_yaml("c", "t");
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            format!("{creds}  listen:\n    - unix: SOCK\n      mode: \"rw-rw----\"\n"),
            vec!["mode"],
        ),
        (
            format!("{creds}  listen:\n    - address: \"not-an-address\"\n"),
            vec!["not-an-address"],
        ),
        (format!("{creds}  log_level: loud\n"), vec!["log_level"]),
        (
            "  credentials:\n    client_id: c\n".to_string(),
            vec!["access"],
        ),
    ];
    for (broken, needles) in cases {
        let dir = TestDir::new();
        let broken = broken.replace("SOCK", &yq(&dir.p("x.sock")));
        let text = format!(
            "{}taskcluster_proxy:\n  root_url: https://tc.example.com\n{broken}",
            dir.server_keys(1)
        );
        let text = if broken.contains("  listen:") {
            text
        } else {
            format!("{text}  listen:\n    - address: \"{}\"\n", free_addr())
        };
        let conf = dir.write("proxy.yaml", &text);
        expect_error_both_ways(&conf, &needles, None);
    }
}

#[test]
fn credentials_and_credentials_file_together_are_an_error() {
    let dir = TestDir::new();
    let file = dir.write_mode(
        "credentials.json",
        &json!({"clientId": CLIENT_ID, "accessToken": ACCESS_TOKEN}).to_string(),
        0o600,
    );
    let (conf, _) = section_plus(
        &dir,
        &format!(
            "{}  credentials_file: {}\n",
            creds_yaml(CLIENT_ID, ACCESS_TOKEN),
            yq(&file)
        ),
    );
    expect_error_both_ways(&conf, &["credentials_file"], None);
}

#[test]
fn missing_credentials_file_is_an_error() {
    let dir = TestDir::new();
    let missing = dir.p("no-such-credentials.json");
    let (conf, _) = section_plus(&dir, &format!("  credentials_file: {}\n", yq(&missing)));
    expect_error_both_ways(&conf, &[&missing], None);
}

#[test]
fn missing_root_url_gives_the_go_message() {
    let dir = TestDir::new();
    let text = format!(
        "{}taskcluster_proxy:\n  listen:\n    - address: \"{}\"\n{}",
        dir.server_keys(1),
        free_addr(),
        creds_yaml("c", "t")
    );
    let conf = dir.write("proxy.yaml", &text);
    expect_error_both_ways(&conf, &[ROOT_MSG], None);

    // a config file without our section at all
    let conf = dir.write("pingora-only.yaml", &dir.server_keys(1));
    let port = free_port().to_string();
    let (code, _, err) = run_to_exit(&["-c", &conf, "-p", &port, "-i", "127.0.0.1"], &[], TIMEOUT);
    assert!(code.is_some() && code != Some(0), "stderr: {err}");
    assert!(err.contains(ROOT_MSG), "stderr: {err}");
}

#[test]
fn nonexistent_config_file_is_an_error() {
    let dir = TestDir::new();
    let missing = dir.p("does-not-exist.yaml");
    for args in [
        vec!["-c", missing.as_str()],
        vec!["--conf", missing.as_str(), "--test-conf"],
        [&["-c", missing.as_str()], support::SETTINGS_ARGS].concat(),
    ] {
        let (code, out, err) = run_to_exit(&args, &[], TIMEOUT);
        assert!(
            code.is_some() && code != Some(0),
            "{args:?}: code {code:?}\nstderr: {err}\nstdout: {out}"
        );
        assert!(
            err.contains(&missing),
            "{args:?}: stderr should name {missing}\n{err}"
        );
    }
    assert!(!Path::new(&missing).exists());
}

/// Credentials are one unit: once the environment names a client, the file's certificate is
/// not mixed in (it belongs to another client and would break every signature).
#[test]
fn environment_credentials_do_not_mix_with_a_file_certificate() {
    let tc = support::fake();
    let tmp = temp_creds("proxy-test/temp/file");
    let dir = TestDir::new();
    let conf = temp_creds_conf(&dir, &tc, &tmp);
    let proxy = ProxyProcess::spawn(
        &["-c", &conf],
        &[
            ("TASKCLUSTER_CLIENT_ID", CLIENT2_ID),
            ("TASKCLUSTER_ACCESS_TOKEN", ACCESS_TOKEN2),
        ],
    );
    let r = whoami_at(proxy.addr());
    assert_eq!(signer(&r), json!(CLIENT2_ID));
    assert_eq!(r.json()["auth"]["certificate"], Value::Null);
    assert_eq!(
        r.header("x-taskcluster-proxy-perm-clientid"),
        Some(CLIENT2_ID)
    );
}

/// A Unix socket without a configured mode is private to the proxy's user.
#[test]
fn unix_socket_defaults_to_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let tc = support::fake();
    let dir = TestDir::new();
    let sock = dir.p("private.sock");
    let port = free_port();
    let conf = conf_with(
        &dir,
        &format!(
            "  listen:\n    - address: \"127.0.0.1:{port}\"\n    - unix: {}\n{}",
            yq(&sock),
            default_section(&tc, "")
        ),
    );
    let mut p = Proc::start(&["-c", &conf], &[]);
    p.wait_path(std::path::Path::new(&sock), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", p.stderr_text()));
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    p.signal(libc::SIGINT);
    p.wait_exit(Duration::from_secs(10));
}

/// A second instance on a taken address exits at once with advice, instead of waiting in
/// bind retries.
#[test]
fn second_instance_on_a_taken_address_fails_fast() {
    let tc = support::fake();
    let dir = TestDir::new();
    let port = free_port();
    let conf = conf_with(
        &dir,
        &format!(
            "  listen:\n    - address: \"127.0.0.1:{port}\"\n{}",
            default_section(&tc, "")
        ),
    );
    let mut first = Proc::start(&["-c", &conf], &[]);
    first.expect_tcp(format!("127.0.0.1:{port}").parse().unwrap());
    let start = std::time::Instant::now();
    let mut second = Proc::start(&["-c", &conf], &[]);
    let status = second.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| !s.success()),
        "second instance: {status:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let err = second.stderr_text();
    assert!(err.contains("-u"), "{err}");
    first.signal(libc::SIGINT);
    first.wait_exit(Duration::from_secs(10));
}
