//! `endpoints::signed_url` (the `/bewit` body) on arbitrary bytes: never panics, and a signed
//! URL is the input with the bewit added, never anything else.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use taskcluster_proxy::credentials::{Credentials, Identity};
use taskcluster_proxy::endpoints::signed_url;

const CERT: &str = r#"{"version":1,"scopes":["scope/asd:fhjdf/X","scope/asd:fhjdf/XYZ*"],"start":1438964811744,"expiry":1439051211744,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"nNEaLtZMiw627NuDbF5Z8HDFc57MGWCptXBQSYNFgBk=","issuer":"def/ghi@XXX"}"#;

fn identities() -> &'static [Identity; 2] {
    static IDS: OnceLock<[Identity; 2]> = OnceLock::new();
    IDS.get_or_init(|| {
        let perm = Credentials::new("tester", "no-secret", None).unwrap();
        let temp = Credentials::new(
            "abc/def/ghi",
            "R4OVHWpIvy6KsqS4AWE51QwbvgLvsstS6e6UW8IfHUY",
            Some(CERT),
        )
        .unwrap();
        let scopes = vec!["scope/asd:fhjdf/X".to_string()];
        [
            Identity::new(&perm, None),
            Identity::new(&temp, Some(&scopes)),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let identity = &identities()[usize::from(selector) % 2];
    let Ok(url) = signed_url(identity, body, 1_700_000_000) else {
        return;
    };
    let input = std::str::from_utf8(body).unwrap().trim();
    // The bewit goes before the first `#`; the fragment is kept as it was.
    let (main, fragment) = split_fragment(&url);
    let (input_main, input_fragment) = split_fragment(input);
    assert_eq!(fragment, input_fragment);
    let (before, bewit) = main.rsplit_once("bewit=").unwrap();
    assert!(!bewit.is_empty());
    assert!(bewit
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    let joiner = if input_main.contains('?') { '&' } else { '?' };
    let before = before.strip_suffix(joiner).unwrap();
    // The rest is the input, except for the `/` added to an empty path.
    if before != input_main {
        let i = before
            .bytes()
            .zip(input_main.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(input_main.len());
        assert_eq!(&before[i..i + 1], "/", "{input:?} became {url:?}");
        assert_eq!(format!("{}{}", &before[..i], &before[i + 1..]), input_main);
    }
});

fn split_fragment(url: &str) -> (&str, Option<&str>) {
    match url.split_once('#') {
        Some((main, fragment)) => (main, Some(fragment)),
        None => (url, None),
    }
}
