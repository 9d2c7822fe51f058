//! `routing::dispatch` on arbitrary request-targets: never panics, and whatever it forwards
//! keeps the query byte for byte and stays under `/api/` on the root URL or names a dotted host.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskcluster_proxy::routing::{dispatch, Dispatch};

/// Root URL path prefixes, chosen by the first input byte.
const BASES: [&str; 3] = ["", "/tc", "/a/b%2F"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, target)) = data.split_first() else {
        return;
    };
    let base = BASES[usize::from(selector) % BASES.len()];
    let query = target
        .iter()
        .position(|&b| b == b'?')
        .map_or(&b""[..], |i| &target[i + 1..]);
    if let Ok(Dispatch::Proxy(route)) = dispatch(base, target) {
        let sent = &route.target;
        if query.is_empty() {
            assert!(!sent.contains(&b'?'), "query invented");
        } else {
            assert!(sent.ends_with(query), "query altered");
        }
        match &route.host {
            None => assert!(sent.starts_with(format!("{base}/api/").as_bytes())),
            Some(origin) => {
                assert!(origin.host.contains('.'));
                assert!(origin.host.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b == b'-'
                    || b == b'.'));
                assert!(sent.starts_with(b"/"));
            }
        }
    }
});
