//! `Credentials::from_json` (the `PUT /credentials` body) on arbitrary bytes: never panics, and
//! accepted credentials can always sign and produce a valid header value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskcluster_proxy::credentials::{Credentials, Identity};
use taskcluster_proxy::signing::Target;

fuzz_target!(|data: &[u8]| {
    let Ok(credentials) = Credentials::from_json(data) else {
        return;
    };
    assert!(!credentials.client_id.is_empty());
    assert!(!credentials.access_token().is_empty());
    let identity = Identity::new(&credentials, None);
    let header = identity.authorization(&Target {
        method: "GET",
        resource: b"/api/queue/v1/ping",
        host: "tc.example.com",
        port: 443,
    });
    assert!(header.len() <= identity.max_header_len());
    assert!(http_header_safe(&header));
});

/// Visible ASCII and spaces only: what `http::HeaderValue::from_str` accepts without loss.
fn http_header_safe(value: &str) -> bool {
    value.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
}
