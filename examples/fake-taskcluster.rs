//! Runs the test suite's fake Taskcluster service on its own, to try the proxy offline.
//!
//! Prints shell assignments (root URL and the credentials it accepts) on stdout, then serves
//! until killed. Every request is checked like the real server would (Hawk MAC, temporary
//! credentials, authorizedScopes) and answered with a JSON echo of what arrived.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;

fn main() {
    let tc = support::fake();
    let mut out = std::io::stdout();
    writeln!(
        out,
        "TASKCLUSTER_ROOT_URL={}\nTASKCLUSTER_CLIENT_ID={}\nTASKCLUSTER_ACCESS_TOKEN={}",
        tc.root_url(),
        support::CLIENT_ID,
        support::ACCESS_TOKEN
    )
    .and_then(|()| out.flush())
    .expect("stdout");
    loop {
        std::thread::park();
    }
}
