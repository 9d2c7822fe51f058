//! Bakes the git revision into the binary (`X-Taskcluster-Proxy-Revision`, `--version`).
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TASKCLUSTER_PROXY_REVISION");
    // HEAD names the branch; the branch ref (loose or packed) moves on every commit.
    println!("cargo:rerun-if-changed=.git/HEAD");
    if std::path::Path::new(".git/packed-refs").exists() {
        println!("cargo:rerun-if-changed=.git/packed-refs");
    }
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        if let Some(reference) = head.trim().strip_prefix("ref: ") {
            println!("cargo:rerun-if-changed=.git/{reference}");
        }
    }
    if std::env::var_os("TASKCLUSTER_PROXY_REVISION").is_some() {
        return;
    }
    let rev = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=TASKCLUSTER_PROXY_REVISION={rev}");
}
