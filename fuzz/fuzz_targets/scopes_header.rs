//! Scope narrowing (`X-Taskcluster-Authorized-Scopes`) on arbitrary header values: never
//! panics, and whatever is accepted is satisfied by the configured scopes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskcluster_proxy::scopes;

fuzz_target!(|data: &[u8]| {
    let configured: Vec<String> = vec!["queue:*".into(), "secrets:get:project/x".into()];
    if let Ok(got) = scopes::narrow(Some(&configured), None, data) {
        for scope in &got {
            assert!(scopes::satisfies(&configured, scope));
        }
    }
    let _ = scopes::narrow(None, None, data);
});
