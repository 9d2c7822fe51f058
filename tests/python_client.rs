//! A real Taskcluster client (the Python `taskcluster` package) talks to the proxy as if it were
//! a root URL without credentials; the fake upstream verifies what the proxy signs.

mod support;

use serde_json::{json, Value};
use std::process::Command;
use support::{default_client, proxy_for, FakeTc, FakeTcOptions, CLIENT_ID};

const SCRIPT: &str = r#"
import json, sys
import taskcluster
root = sys.argv[1]
out = {}
auth = taskcluster.Auth({'rootUrl': root})
out['get'] = auth.testAuthenticateGet()
out['post'] = auth.testAuthenticate({'clientScopes': ['test:a'], 'requiredScopes': ['test:a']})
queue = taskcluster.Queue({'rootUrl': root})
out['task'] = queue.task('PyTaskAAAAAAAAAAAAAAAA')
print(json.dumps(out))
"#;

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn require_taskcluster_module() {
    let out = Command::new(python())
        .args(["-c", "import taskcluster"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; install Python 3 and `pip install taskcluster`",
                python()
            )
        });
    assert!(
        out.status.success(),
        "the Python `taskcluster` package is missing: run `pip install taskcluster` \
         (stderr: {})",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn python_taskcluster_client_through_proxy() {
    require_taskcluster_module();
    let tc = FakeTc::start(FakeTcOptions {
        clients: vec![default_client()],
        tasks: vec![(
            "PyTaskAAAAAAAAAAAAAAAA".into(),
            vec!["queue:py-scope".into()],
        )],
        ..Default::default()
    });
    let proxy = proxy_for(&tc, &[]);
    let mut cmd = Command::new(python());
    cmd.args(["-c", SCRIPT, &proxy.url()]);
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKCLUSTER_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed:\nstdout: {stdout}\nstderr: {}\nfake log: {:#?}",
        String::from_utf8_lossy(&out.stderr),
        tc.requests()
    );
    let v: Value = serde_json::from_str(stdout.trim()).expect("script output JSON");

    let get = &v["get"];
    support::assert_auth_ok(get);
    assert_eq!(get["method"], json!("GET"));
    // (the Python client drops the route's trailing slash itself)
    assert_eq!(
        get["target"].as_str().unwrap().trim_end_matches('/'),
        "/api/auth/v1/test-authenticate-get"
    );
    assert_eq!(get["auth"]["clientId"], json!(CLIENT_ID));

    let post = &v["post"];
    support::assert_auth_ok(post);
    assert_eq!(post["method"], json!("POST"));
    assert_eq!(post["target"], json!("/api/auth/v1/test-authenticate"));
    assert!(post["body_len"].as_u64().unwrap() > 0);
    assert_eq!(post["auth"]["clientId"], json!(CLIENT_ID));

    assert_eq!(v["task"]["scopes"], json!(["queue:py-scope"]));
    let fetch = tc
        .requests()
        .into_iter()
        .find(|e| e["target"] == json!("/api/queue/v1/task/PyTaskAAAAAAAAAAAAAAAA"))
        .expect("task fetch reached the fake");
    support::assert_auth_ok(&fetch);
    assert_eq!(fetch["auth"]["scheme"], json!("hawk"));
}
