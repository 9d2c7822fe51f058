//! Self-tests of the test support code (no proxy involved): the fake Taskcluster server must
//! accept the wire-spec §8 vectors, reject small corruptions, and its helpers must work.

mod support;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::client::{self, Conn, Response};
use support::creds;
use support::fake_tc::{sha256_hex, FakeTc, FakeTcOptions};
use support::pattern;
use support::verify::{self, host_port, strip_bewit, verify_request, Client};

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn spec_clients() -> Vec<Client> {
    vec![
        Client::new(
            "tester",
            "no-secret",
            &["test:*", "auth:create-client:test:*"],
        ),
        Client::new(
            "def/ghi@XXX",
            "tokenABCDEFGH",
            &["scope/asd:fhjdf/*", "auth:create-client:abc/def/ghi"],
        ),
    ]
}

const TEMP_TOKEN: &str = "R4OVHWpIvy6KsqS4AWE51QwbvgLvsstS6e6UW8IfHUY";
const SEED: &str = "JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ";

const H1: &str = r#"Hawk id="tester", mac="ifXNnkCSpZc9Tl/gdlm1rU1KoAoa9c42HG5ErsrBLdU=", ts="1700000000", nonce="kB3c9Yz1""#;
const H1_TARGET: &str = "/api/queue/v1/task/DSlhVLpwQhS-3fLhmbo1eQ";
const H2: &str = r#"Hawk id="tester", mac="TLIgvHzWYOPv9fUyJPHGOpbALHFSnoN9QhCOnDY9hAQ=", ts="1700000000", nonce="q+7/ab=Z", ext="eyJhdXRob3JpemVkU2NvcGVzIjpbInRlc3Q6YXV0aGVudGljYXRlLXBvc3QiXX0=""#;
const H2_TARGET: &str = "/api/auth/v1/test-authenticate?a=1&b=x%2Fy";
const H3: &str = r#"Hawk id="abc/def/ghi", mac="bk4jRkxph1Z0bwYwDW95j88Wx8TiGyYupmuDg4wWfd8=", ts="1439000000", nonce="Zm9vYmFy", ext="eyJjZXJ0aWZpY2F0ZSI6eyJ2ZXJzaW9uIjoxLCJzY29wZXMiOlsic2NvcGUvYXNkOmZoamRmL1giLCJzY29wZS9hc2Q6ZmhqZGYvWFlaKiJdLCJzdGFydCI6MTQzODk2NDgxMTc0NCwiZXhwaXJ5IjoxNDM5MDUxMjExNzQ0LCJzZWVkIjoiSllSNHd6TUNURzZYZURTMmNEVUNNd0gwUkZVWEdmUWpLN0xncUQtZTZsU1EiLCJzaWduYXR1cmUiOiJuTkVhTHRaTWl3NjI3TnVEYkY1WjhIREZjNTdNR1dDcHRYQlFTWU5GZ0JrPSIsImlzc3VlciI6ImRlZi9naGlAWFhYIn0sImF1dGhvcml6ZWRTY29wZXMiOlsic2NvcGUvYXNkOmZoamRmL1giXX0=""#;
const H3_TARGET: &str = "/api/auth/v1/test-authenticate-get/";
const H4: &str = r#"Hawk id="tester", mac="/mM80TXNcfSaolu4vWUvZeb2EAZAwfOfdBg8P5V1t3I=", ts="1700000123", nonce="AAAAAAAA", ext="eyJhdXRob3JpemVkU2NvcGVzIjpbXX0=""#;
const H4_TARGET: &str = "/some//path%2Fx?q=1";
const H5: &str = r#"Hawk id="def/ghi@XXX", mac="np5s+uoY0SUsw07LVbnrZZHr769Udv9iWbX4wnFkY6E=", ts="1439000000", nonce="Zm9vYmFy", ext="eyJjZXJ0aWZpY2F0ZSI6eyJ2ZXJzaW9uIjoxLCJzY29wZXMiOlsic2NvcGUvYXNkOmZoamRmL1giLCJzY29wZS9hc2Q6ZmhqZGYvWFlaKiJdLCJzdGFydCI6MTQzODk2NDgxMTc0NCwiZXhwaXJ5IjoxNDM5MDUxMjExNzQ0LCJzZWVkIjoiSllSNHd6TUNURzZYZURTMmNEVUNNd0gwUkZVWEdmUWpLN0xncUQtZTZsU1EiLCJzaWduYXR1cmUiOiI0NUFsQi9oS1paWno0VGYzTmFpZHV0YXNmZ0JucjR0MkF4d0JpR0RRRjlRPSJ9fQ==""#;
const H5_TARGET: &str = "/api/queue/v1/task/abc";
const B1_TARGET: &str = "/api/auth/v1/test-authenticate-get/?bewit=dGVzdGVyXDE3MDAwMDM2MDBcK01QcW5IMVozMUFkdnVDT0F3Q0ZweFJzZnU0bEVPdEhBZnlERkRTWlZMZz1c";
const B2_TARGET: &str = "/api/queue/v1/task/DSlhVLpwQhS-3fLhmbo1eQ/artifacts/public%2Flogs%2Flive.log?a=1&bewit=YWJjL2RlZi9naGlcMTQzOTAwMzYwMFx4K3BJeXkweUZncnNEc2dPNHcvekpqL1hua0toM3hURlpobW9peXVFSWJJPVxleUpqWlhKMGFXWnBZMkYwWlNJNmV5SjJaWEp6YVc5dUlqb3hMQ0p6WTI5d1pYTWlPbHNpYzJOdmNHVXZZWE5rT21ab2FtUm1MMWdpTENKelkyOXdaUzloYzJRNlptaHFaR1l2V0ZsYUtpSmRMQ0p6ZEdGeWRDSTZNVFF6T0RrMk5EZ3hNVGMwTkN3aVpYaHdhWEo1SWpveE5ETTVNRFV4TWpFeE56UTBMQ0p6WldWa0lqb2lTbGxTTkhkNlRVTlVSelpZWlVSVE1tTkVWVU5OZDBnd1VrWlZXRWRtVVdwTE4weG5jVVF0WlRac1UxRWlMQ0p6YVdkdVlYUjFjbVVpT2lKdVRrVmhUSFJhVFdsM05qSTNUblZFWWtZMVdqaElSRVpqTlRkTlIxZERjSFJZUWxGVFdVNUdaMEpyUFNJc0ltbHpjM1ZsY2lJNkltUmxaaTluYUdsQVdGaFlJbjBzSW1GMWRHaHZjbWw2WldSVFkyOXdaWE1pT2xzaWMyTnZjR1V2WVhOa09tWm9hbVJtTDFoWldtRmlZeUpkZlE9PQ";

struct Vector {
    name: &'static str,
    method: &'static str,
    host: &'static str,
    port: u16,
    target: &'static str,
    authorization: Option<&'static str>,
    now: u64,
}

fn vectors() -> Vec<Vector> {
    vec![
        Vector {
            name: "H1",
            method: "GET",
            host: "tc.example.com",
            port: 443,
            target: H1_TARGET,
            authorization: Some(H1),
            now: 1_700_000_001,
        },
        Vector {
            name: "H2",
            method: "POST",
            host: "tc.example.com",
            port: 443,
            target: H2_TARGET,
            authorization: Some(H2),
            now: 1_700_000_001,
        },
        Vector {
            name: "H3",
            method: "GET",
            host: "127.0.0.1",
            port: 60024,
            target: H3_TARGET,
            authorization: Some(H3),
            now: 1_439_000_001,
        },
        Vector {
            name: "H4",
            method: "DELETE",
            host: "example.com",
            port: 8443,
            target: H4_TARGET,
            authorization: Some(H4),
            now: 1_700_000_124,
        },
        Vector {
            name: "H5",
            method: "PUT",
            host: "tc.example.com",
            port: 443,
            target: H5_TARGET,
            authorization: Some(H5),
            now: 1_439_000_001,
        },
        Vector {
            name: "B1",
            method: "GET",
            host: "tc.example.com",
            port: 443,
            target: B1_TARGET,
            authorization: None,
            now: 1_700_000_000,
        },
        Vector {
            name: "B2",
            method: "GET",
            host: "tc.example.com",
            port: 443,
            target: B2_TARGET,
            authorization: None,
            now: 1_439_000_000,
        },
    ]
}

fn verify_vec(v: &Vector) -> Result<verify::AuthInfo, String> {
    verify_request(
        &spec_clients(),
        v.method,
        v.host,
        v.port,
        v.target,
        v.authorization,
        at(v.now),
    )
}

/// `method B1_TARGET` for `tc.example.com:443` with `authorization`, verified at `now`.
fn verify_b1(
    method: &str,
    authorization: Option<&str>,
    now: u64,
) -> Result<verify::AuthInfo, String> {
    verify_request(
        &spec_clients(),
        method,
        "tc.example.com",
        443,
        B1_TARGET,
        authorization,
        at(now),
    )
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn spec_vectors_verify_as_pure_functions() {
    for v in vectors() {
        let info = verify_vec(&v).unwrap_or_else(|e| panic!("{} should verify: {e}", v.name));
        match v.name {
            "H1" => {
                assert_eq!(info.scheme, "hawk");
                assert_eq!(info.client_id.as_deref(), Some("tester"));
                assert_eq!(info.authorized_scopes, None);
                assert_eq!(info.ext, None);
            }
            "H2" => {
                assert_eq!(
                    info.authorized_scopes,
                    Some(strs(&["test:authenticate-post"]))
                );
                assert_eq!(info.scopes, strs(&["test:authenticate-post"]));
            }
            "H3" => {
                assert_eq!(info.client_id.as_deref(), Some("abc/def/ghi"));
                assert_eq!(info.scopes, strs(&["scope/asd:fhjdf/X"]));
                assert_eq!(
                    info.certificate.as_ref().unwrap()["issuer"],
                    json!("def/ghi@XXX")
                );
            }
            "H4" => {
                assert_eq!(info.authorized_scopes, Some(vec![]));
                assert!(info.scopes.is_empty());
            }
            "H5" => {
                assert_eq!(
                    info.scopes,
                    strs(&["scope/asd:fhjdf/X", "scope/asd:fhjdf/XYZ*"])
                );
                assert_eq!(info.authorized_scopes, None);
                assert!(info.certificate.is_some());
            }
            "B1" => {
                assert_eq!(info.scheme, "bewit");
                assert_eq!(info.client_id.as_deref(), Some("tester"));
            }
            "B2" => {
                assert_eq!(info.scheme, "bewit");
                assert_eq!(info.scopes, strs(&["scope/asd:fhjdf/XYZabc"]));
            }
            _ => unreachable!(),
        }
    }
}

/// Change one character of `s` at byte index `i` (to a different base64-ish character).
fn flip(s: &str, i: usize) -> String {
    let mut b = s.as_bytes().to_vec();
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

#[test]
fn one_character_changes_fail() {
    for v in vectors() {
        let mut cases: Vec<(String, Vector)> = vec![];
        if let Some(h) = v.authorization {
            let mac_at = h.find("mac=\"").unwrap() + 5;
            cases.push((
                "mac".into(),
                Vector {
                    authorization: Some(Box::leak(flip(h, mac_at + 3).into_boxed_str())),
                    ..clone_vec(&v)
                },
            ));
            let nonce_at = h.find("nonce=\"").unwrap() + 7;
            cases.push((
                "nonce".into(),
                Vector {
                    authorization: Some(Box::leak(flip(h, nonce_at).into_boxed_str())),
                    ..clone_vec(&v)
                },
            ));
            if let Some(e) = h.find("ext=\"") {
                // change a character inside the JSON's base64 (keeps it decodable in most cases)
                cases.push((
                    "ext".into(),
                    Vector {
                        authorization: Some(Box::leak(flip(h, e + 5 + 20).into_boxed_str())),
                        ..clone_vec(&v)
                    },
                ));
            }
        } else {
            let b = v.target.find("bewit=").unwrap() + 6;
            cases.push((
                "bewit".into(),
                Vector {
                    target: Box::leak(flip(v.target, b + 30).into_boxed_str()),
                    ..clone_vec(&v)
                },
            ));
        }
        cases.push((
            "target".into(),
            Vector {
                target: Box::leak(flip(v.target, 3).into_boxed_str()),
                ..clone_vec(&v)
            },
        ));
        cases.push((
            "host".into(),
            Vector {
                host: Box::leak(format!("x{}", &v.host[1..]).into_boxed_str()),
                ..clone_vec(&v)
            },
        ));
        cases.push((
            "port".into(),
            Vector {
                port: v.port + 1,
                ..clone_vec(&v)
            },
        ));
        if v.authorization.is_some() {
            let m = if v.method == "GET" { "POST" } else { "GET" };
            cases.push((
                "method".into(),
                Vector {
                    method: m,
                    ..clone_vec(&v)
                },
            ));
        }
        for (what, c) in cases {
            assert!(
                verify_vec(&c).is_err(),
                "{} with a changed {what} must not verify",
                v.name
            );
        }
    }
}

fn clone_vec(v: &Vector) -> Vector {
    Vector {
        name: v.name,
        method: v.method,
        host: v.host,
        port: v.port,
        target: v.target,
        authorization: v.authorization,
        now: v.now,
    }
}

#[test]
fn negative_checks_of_spec_8_4() {
    let h1 = |now: u64, port: u16| {
        verify_request(
            &spec_clients(),
            "GET",
            "tc.example.com",
            port,
            H1_TARGET,
            Some(H1),
            at(now),
        )
    };
    assert!(h1(1_700_000_840, 443).is_ok());
    assert_eq!(h1(1_700_000_960, 443).unwrap_err(), "Stale timestamp");
    assert_eq!(h1(1_700_000_001, 80).unwrap_err(), "Bad mac");
    // method is upper-cased by the server
    assert!(verify_request(
        &spec_clients(),
        "get",
        "tc.example.com",
        443,
        H1_TARGET,
        Some(H1),
        at(1_700_000_001)
    )
    .is_ok());
    // host is lower-cased by the server
    assert!(verify_request(
        &spec_clients(),
        "GET",
        "TC.Example.com",
        443,
        H1_TARGET,
        Some(H1),
        at(1_700_000_001)
    )
    .is_ok());

    let h3 = verify_request(
        &spec_clients(),
        "GET",
        "127.0.0.1",
        60024,
        H3_TARGET,
        Some(H3),
        UNIX_EPOCH + Duration::from_millis(1_439_051_571_744),
    );
    let e = h3.unwrap_err();
    assert!(e.contains("ext.certificate.expiry < now"), "{e}");

    let b1 = verify_b1("GET", None, 1_700_003_600);
    assert_eq!(b1.unwrap_err(), "Access expired");
    let b1 = verify_b1("GET", None, 1_700_003_599);
    assert!(b1.is_ok());
    // bewits are only for GET/HEAD
    assert!(verify_b1("HEAD", None, 1_700_000_000).is_ok());
    assert!(verify_b1("POST", None, 1_700_000_000).is_err());
    // header + bewit at once
    assert!(verify_b1("GET", Some(H1), 1_700_000_000).is_err());

    // Bewit query rewriting (what the Go proxy does) breaks the MAC; appending keeps it.
    let tester = hawk::Credentials {
        id: "tester".into(),
        key: hawk::Key::new(b"no-secret", hawk::SHA256).unwrap(),
    };
    let exp = SystemTime::now() + Duration::from_secs(3600);
    let bewit_for = |resource: &str| {
        hawk::RequestBuilder::new("GET", "tc.example.com", 443, resource)
            .request()
            .make_bewit(&tester, exp)
            .unwrap()
            .to_str()
    };
    let now = SystemTime::now();
    let check =
        |t: String| verify_request(&spec_clients(), "GET", "tc.example.com", 443, &t, None, now);
    let b = bewit_for("/p?b=1&a=2");
    assert_eq!(
        check(format!("/p?a=2&b=1&bewit={b}")).unwrap_err(),
        "Bad mac"
    );
    assert!(check(format!("/p?b=1&a=2&bewit={b}")).is_ok());
    let b = bewit_for("/p?scope=queue:get");
    assert_eq!(
        check(format!("/p?bewit={b}&scope=queue%3Aget")).unwrap_err(),
        "Bad mac"
    );
    assert!(check(format!("/p?scope=queue:get&bewit={b}")).is_ok());
    let b = bewit_for("/p?c=1");
    assert!(check(format!("/p?bewit={b}&c=1")).is_ok());

    // Oversized header
    let long = format!(
        "Hawk id=\"tester\", mac=\"x\", ts=\"1\", nonce=\"n\", ext=\"{}\"",
        "A".repeat(5000)
    );
    assert_eq!(
        verify_request(&spec_clients(), "GET", "h", 80, "/", Some(&long), now).unwrap_err(),
        "Header length too long"
    );
    // Duplicate / unknown attributes
    assert!(verify_request(
        &spec_clients(),
        "GET",
        "tc.example.com",
        443,
        H1_TARGET,
        Some(&format!("{H1}, id=\"tester\"")),
        at(1_700_000_001)
    )
    .unwrap_err()
    .contains("Duplicate"));
    assert!(verify_request(
        &spec_clients(),
        "GET",
        "tc.example.com",
        443,
        H1_TARGET,
        Some(&format!("{H1}, foo=\"x\"")),
        at(1_700_000_001)
    )
    .unwrap_err()
    .contains("Unknown attribute"));
    // Scheme is case-insensitive
    let lower = H1.replacen("Hawk", "hawk", 1);
    assert!(verify_request(
        &spec_clients(),
        "GET",
        "tc.example.com",
        443,
        H1_TARGET,
        Some(&lower),
        at(1_700_000_001)
    )
    .is_ok());
}

#[test]
fn certificate_vectors_of_spec_8_1() {
    let scopes = strs(&["scope/asd:fhjdf/X", "scope/asd:fhjdf/XYZ*"]);
    assert_eq!(verify::temp_access_token("tokenABCDEFGH", SEED), TEMP_TOKEN);
    assert_eq!(
        verify::certificate_signature(
            "tokenABCDEFGH",
            "def/ghi@XXX",
            None,
            SEED,
            "1438964811744",
            "1439051211744",
            &scopes
        ),
        "45AlB/hKZZZz4Tf3NaidutasfgBnr4t2AxwBiGDQF9Q="
    );
    assert_eq!(
        verify::certificate_signature(
            "tokenABCDEFGH",
            "abc/def/ghi",
            Some("def/ghi@XXX"),
            SEED,
            "1438964811744",
            "1439051211744",
            &scopes
        ),
        "nNEaLtZMiw627NuDbF5Z8HDFc57MGWCptXBQSYNFgBk="
    );
    let issuer = Client::new("def/ghi@XXX", "tokenABCDEFGH", &[]);
    let unnamed = creds::make_temp_creds(
        &issuer,
        None,
        &["scope/asd:fhjdf/X", "scope/asd:fhjdf/XYZ*"],
        1438964811744,
        1439051211744,
        SEED,
    );
    let expected1: Value = serde_json::from_str(r#"{"version":1,"scopes":["scope/asd:fhjdf/X","scope/asd:fhjdf/XYZ*"],"start":1438964811744,"expiry":1439051211744,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"45AlB/hKZZZz4Tf3NaidutasfgBnr4t2AxwBiGDQF9Q="}"#).unwrap();
    assert_eq!(unnamed.certificate_json(), expected1);
    assert_eq!(unnamed.access_token, TEMP_TOKEN);
    assert_eq!(unnamed.client_id, "def/ghi@XXX");
    let named = creds::make_temp_creds(
        &issuer,
        Some("abc/def/ghi"),
        &["scope/asd:fhjdf/X", "scope/asd:fhjdf/XYZ*"],
        1438964811744,
        1439051211744,
        SEED,
    );
    let mut expected2 = expected1.clone();
    expected2["signature"] = json!("nNEaLtZMiw627NuDbF5Z8HDFc57MGWCptXBQSYNFgBk=");
    expected2["issuer"] = json!("def/ghi@XXX");
    assert_eq!(named.certificate_json(), expected2);
    assert_eq!(named.access_token, TEMP_TOKEN);
}

#[test]
fn strip_bewit_follows_server_regex() {
    let s = strip_bewit;
    assert_eq!(
        s("/p?a=1&bewit=X&b=2"),
        Some(("/p?a=1&b=2".into(), "X".into()))
    );
    assert_eq!(s("/p?bewit=X&c=1"), Some(("/p?c=1".into(), "X".into())));
    assert_eq!(s("/p?bewit=X"), Some(("/p".into(), "X".into())));
    assert_eq!(
        s("/p?bewit=A&bewit=B"),
        Some(("/p?bewit=A".into(), "B".into()))
    );
    assert_eq!(s("/p?bewit=X&"), None);
    assert_eq!(s("/p?xbewit=X"), None);
    assert_eq!(s("/p?a=1"), None);
}

#[test]
fn scope_satisfaction() {
    let have = strs(&["queue:*", "auth:create-client:a/b", "x"]);
    assert!(verify::scope_satisfied(&have, "queue:get-task:abc"));
    assert!(verify::scope_satisfied(&have, "queue:"));
    assert!(!verify::scope_satisfied(&have, "queue"));
    assert!(verify::scope_satisfied(&have, "auth:create-client:a/b"));
    assert!(!verify::scope_satisfied(&have, "auth:create-client:a/bc"));
    assert!(verify::scope_satisfied(&have, "x"));
    assert!(!verify::scope_satisfied(&have, "x*"));
    assert!(verify::scope_satisfied(&strs(&["*"]), "anything"));
}

/// `host_port(args)` succeeds with `want`.
#[track_caller]
fn assert_host_port(args: (Option<&str>, Option<&str>, Option<&str>, bool), want: (&str, u16)) {
    let (host, forwarded_port, forwarded_proto, tls) = args;
    assert_eq!(
        host_port(host, forwarded_port, forwarded_proto, tls).unwrap(),
        (want.0.into(), want.1)
    );
}

#[test]
fn host_and_port_rules() {
    assert_host_port(
        (Some("Example.COM:8443"), None, None, false),
        ("example.com", 8443),
    );
    assert_host_port(
        (Some("example.com"), None, None, false),
        ("example.com", 80),
    );
    assert_host_port(
        (Some("example.com"), None, None, true),
        ("example.com", 443),
    );
    assert_host_port(
        (Some("example.com:80"), None, None, true),
        ("example.com", 443),
    );
    assert_host_port((Some("[::1]:8080"), None, None, false), ("[::1]", 8080));
    assert_host_port((Some("[::1]"), None, None, true), ("[::1]", 443));
    assert_host_port((Some("h:8080"), Some("443, 80"), None, false), ("h", 443));
    assert_host_port((Some("h"), None, Some("https"), false), ("h", 443));
    assert_host_port((Some("h:8080"), None, Some("http"), false), ("h", 8080));
    assert!(host_port(None, None, None, false).is_err());
}

/// `method target` to `a` with only an `Authorization` header.
fn send_auth(a: SocketAddr, method: &str, target: &str, auth: &str, body: &[u8]) -> Response {
    client::send(
        a,
        method,
        target.as_bytes(),
        &[("Authorization", auth)],
        body,
    )
}

/// Bodiless `method target` to `a` with `Host: host` and `Authorization: auth`.
fn send_to_host(a: SocketAddr, method: &str, target: &str, host: &str, auth: &str) -> Response {
    client::send(
        a,
        method,
        target.as_bytes(),
        &[("Host", host), ("Authorization", auth)],
        b"",
    )
}

/// `method target` to `a` as if for `https://tc.example.com` (`X-Forwarded-Proto: https`).
fn send_https(a: SocketAddr, method: &str, target: &str, auth: &str, body: &[u8]) -> Response {
    client::send(
        a,
        method,
        target.as_bytes(),
        &[
            ("Host", "tc.example.com"),
            ("X-Forwarded-Proto", "https"),
            ("Authorization", auth),
        ],
        body,
    )
}

/// Unsigned GET of `target` (a bewit URL) as if for `tc.example.com` on port 443.
fn get_forwarded_443(a: SocketAddr, target: &str) -> Response {
    client::send(
        a,
        "GET",
        target.as_bytes(),
        &[("Host", "tc.example.com"), ("X-Forwarded-Port", "443")],
        b"",
    )
}

/// Hawk credentials of the `perm` client of [`live_fake`].
fn perm_credentials() -> hawk::Credentials {
    hawk::Credentials {
        id: "perm".into(),
        key: hawk::Key::new(b"perm-token", hawk::SHA256).unwrap(),
    }
}

fn pinned_fake(now: u64) -> FakeTc {
    FakeTc::start(FakeTcOptions {
        clients: spec_clients(),
        now: Some(at(now)),
        ..Default::default()
    })
}

#[test]
fn server_accepts_spec_vectors_over_http() {
    let tc = pinned_fake(1_700_000_001);
    let a = tc.addr();
    // H1: task endpoint of an unknown task -> 404, but auth must have succeeded
    let r = send_https(a, "GET", H1_TARGET, H1, b"");
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(tc.last_request().unwrap()["auth"]["ok"], json!(true));
    // H1 with a changed MAC character -> 401 Bad mac
    let bad = flip(H1, H1.find("mac=\"").unwrap() + 8);
    let r = send_https(a, "GET", H1_TARGET, &bad, b"");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["code"], json!("AuthenticationFailed"));
    assert_eq!(r.json()["message"], json!("Bad mac"));
    // H1 on plain http without forwarding headers: port 80 -> Bad mac
    let r = send_to_host(a, "GET", H1_TARGET, "tc.example.com", H1);
    assert_eq!(r.status, 401);

    // H2 with a body
    let r = client::send(
        a,
        "POST",
        H2_TARGET.as_bytes(),
        &[
            ("Host", "tc.example.com"),
            ("X-Forwarded-Port", "443"),
            ("Authorization", H2),
            ("Content-Type", "application/json"),
        ],
        br#"{"a":1}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.json();
    assert_eq!(
        e["auth"]["authorizedScopes"],
        json!(["test:authenticate-post"])
    );
    assert_eq!(e["body_len"], json!(7));
    assert_eq!(e["body_sha256"], json!(sha256_hex(br#"{"a":1}"#)));
    assert_eq!(e["target"], json!(H2_TARGET));

    // H4: DELETE with `//` and `%2F`
    let r = send_to_host(a, "DELETE", H4_TARGET, "example.com:8443", H4);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["auth"]["authorizedScopes"], json!([]));
    assert_eq!(r.json()["auth"]["scopes"], json!([]));
    assert_eq!(r.json()["target"], json!(H4_TARGET));

    // B1: bewit
    let r = get_forwarded_443(a, B1_TARGET);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["auth"]["scheme"], json!("bewit"));
    assert_eq!(r.json()["auth"]["clientId"], json!("tester"));
    let bad = flip(B1_TARGET, B1_TARGET.len() - 20);
    let r = get_forwarded_443(a, &bad);
    assert_eq!(r.status, 401, "{}", r.text());
}

#[test]
fn server_accepts_temp_credential_vectors_over_http() {
    let tc = pinned_fake(1_439_000_001);
    let a = tc.addr();
    let r = send_to_host(a, "GET", H3_TARGET, "127.0.0.1:60024", H3);
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.json();
    assert_eq!(e["auth"]["clientId"], json!("abc/def/ghi"));
    assert_eq!(e["auth"]["scopes"], json!(["scope/asd:fhjdf/X"]));
    assert_eq!(e["auth"]["certificate"]["issuer"], json!("def/ghi@XXX"));

    let r = send_https(a, "PUT", H5_TARGET, H5, b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["auth"]["scopes"],
        json!(["scope/asd:fhjdf/X", "scope/asd:fhjdf/XYZ*"])
    );
    assert_eq!(r.json()["auth"]["authorizedScopes"], Value::Null);

    // B2's `now` is issue time (exp-3600); the fake is pinned 1 s later, still valid.
    let r = get_forwarded_443(a, B2_TARGET);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["auth"]["scopes"],
        json!(["scope/asd:fhjdf/XYZabc"])
    );

    let bad = flip(H5, H5.find("ext=\"").unwrap() + 40);
    let r = send_https(a, "PUT", H5_TARGET, &bad, b"{}");
    assert_eq!(r.status, 401, "{}", r.text());
}

fn live_fake() -> FakeTc {
    FakeTc::start(FakeTcOptions {
        clients: vec![
            Client::new(
                "perm",
                "perm-token",
                &["queue:*", "auth:create-client:named/*"],
            ),
            Client::new("limited", "limited-token", &["queue:get-task:*"]),
        ],
        tasks: vec![("TASK1".into(), strs(&["queue:foo", "queue:bar"]))],
        ..Default::default()
    })
}

fn signed(
    tc: &FakeTc,
    id: &str,
    key: &str,
    method: &str,
    target: &str,
    ext: Option<&Value>,
) -> String {
    let ext = ext.map(|e| STANDARD.encode(e.to_string()));
    creds::hawk_header(
        id,
        key,
        method,
        "127.0.0.1",
        tc.port(),
        target,
        ext.as_deref(),
    )
}

/// `ext` carrying the certificate of `tmp` as a JSON object.
fn cert_ext(tmp: &creds::TempCreds) -> Value {
    json!({"certificate": tmp.certificate_json()})
}

/// A `GET t` header for `tmp`'s client signed with `key`, carrying `tmp`'s certificate.
fn signed_with_cert(tc: &FakeTc, tmp: &creds::TempCreds, key: &str, t: &str) -> String {
    signed(tc, &tmp.client_id, key, "GET", t, Some(&cert_ext(tmp)))
}

/// `GET t` from `tc` signed as `id` with `key` and `ext`.
fn get_signed(tc: &FakeTc, t: &str, id: &str, key: &str, ext: Option<&Value>) -> Response {
    send_auth(
        tc.addr(),
        "GET",
        t,
        &signed(tc, id, key, "GET", t, ext),
        b"",
    )
}

#[test]
fn raw_request_targets_are_echoed_verbatim() {
    let tc = live_fake();
    for t in [
        "//a//b/%2F/%252F/../x/./y?y=%20&z&q=a/b?c",
        "/x?",
        "/api/queue/v1/%2e%2e/y",
        "/p?b=1&a=2&scope=queue:get",
        "/api/queue/v1/x/y/z~!$'()*,;=:@?q=a/b?c&&e=",
    ] {
        let auth = signed(&tc, "perm", "perm-token", "GET", t, None);
        let r = client::send(
            tc.addr(),
            "GET",
            t.as_bytes(),
            &[("Authorization", &auth)],
            b"",
        );
        assert_eq!(r.status, 200, "{t}: {}", r.text());
        assert_eq!(r.json()["target"], json!(t));
        assert_eq!(r.json()["auth"]["ok"], json!(true));
    }
    // anonymous
    let r = client::get(tc.addr(), "/api/auth/v1/x");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["auth"]["scheme"], json!("none"));
    assert_eq!(r.json()["auth"]["scopes"], json!([]));
    assert_eq!(tc.requests_seen(), 6);
}

#[test]
fn ext_processing_and_temp_credentials_live() {
    let tc = live_fake();
    let a = tc.addr();
    let t = "/api/queue/v1/echo";
    let issuer = Client::new("perm", "perm-token", &[]);
    for named in [None, Some("named/one")] {
        let tmp = creds::fresh_temp_creds(&issuer, named, &["queue:x", "queue:y*"]);
        let auth = signed_with_cert(&tc, &tmp, &tmp.access_token, t);
        let r = send_auth(a, "GET", t, &auth, b"");
        assert_eq!(r.status, 200, "{named:?}: {}", r.text());
        assert_eq!(r.json()["auth"]["clientId"], json!(tmp.client_id));
        assert_eq!(r.json()["auth"]["scopes"], json!(["queue:x", "queue:y*"]));
        // certificate embedded as a string is rejected
        let ext = json!({"certificate": tmp.certificate});
        let auth = signed(&tc, &tmp.client_id, &tmp.access_token, "GET", t, Some(&ext));
        let r = send_auth(a, "GET", t, &auth, b"");
        assert_eq!(r.status, 401);
        if named.is_none() {
            // (for named creds the issuer cannot be read from a string, so the lookup of the
            // temp clientId fails first -- as in signaturevalidator.js)
            assert_eq!(
                r.json()["message"],
                json!("ext.certificate must be a JSON object")
            );
        }
        // signing with the issuer's token instead of the temp token fails
        let auth = signed_with_cert(&tc, &tmp, "perm-token", t);
        let r = send_auth(a, "GET", t, &auth, b"");
        assert_eq!(r.status, 401);
    }
    // named temp creds for a name the issuer may not create
    let tmp = creds::fresh_temp_creds(&issuer, Some("other/name"), &["queue:x"]);
    let auth = signed_with_cert(&tc, &tmp, &tmp.access_token, t);
    let r = send_auth(a, "GET", t, &auth, b"");
    assert_eq!(r.status, 401);
    // cert scopes not satisfied by issuer
    let tmp = creds::fresh_temp_creds(&issuer, None, &["auth:foo"]);
    let auth = signed_with_cert(&tc, &tmp, &tmp.access_token, t);
    assert_eq!(send_auth(a, "GET", t, &auth, b"").status, 401);
    // expired certificate
    let now = creds::now_ms();
    let tmp = creds::make_temp_creds(
        &issuer,
        None,
        &["queue:x"],
        now - 7_200_000,
        now - 3_600_000,
        &creds::random_seed(),
    );
    let auth = signed_with_cert(&tc, &tmp, &tmp.access_token, t);
    let r = send_auth(a, "GET", t, &auth, b"");
    assert_eq!(r.json()["message"], json!("ext.certificate.expiry < now"));
    // authorizedScopes: absent vs [] vs satisfied vs unsatisfied
    let r = get_signed(&tc, t, "perm", "perm-token", None);
    assert_eq!(r.json()["auth"]["authorizedScopes"], Value::Null);
    let r = get_signed(
        &tc,
        t,
        "perm",
        "perm-token",
        Some(&json!({"authorizedScopes": []})),
    );
    assert_eq!(r.json()["auth"]["authorizedScopes"], json!([]));
    let r = get_signed(
        &tc,
        t,
        "perm",
        "perm-token",
        Some(&json!({"authorizedScopes": ["queue:a"]})),
    );
    assert_eq!(r.json()["auth"]["scopes"], json!(["queue:a"]));
    let r = get_signed(
        &tc,
        t,
        "limited",
        "limited-token",
        Some(&json!({"authorizedScopes": ["queue:a"]})),
    );
    assert_eq!(r.status, 401);
    // wrong key / unknown client
    let r = get_signed(&tc, t, "perm", "nope", None);
    assert_eq!(r.json()["message"], json!("Bad mac"));
    let r = get_signed(&tc, t, "ghost", "x", None);
    assert_eq!(r.status, 401);
    // stale timestamp built by hand
    let creds_perm = perm_credentials();
    let old = SystemTime::now() - Duration::from_secs(1000);
    let h = hawk::RequestBuilder::new("GET", "127.0.0.1", tc.port(), t)
        .request()
        .make_header_full(&creds_perm, old, "abc")
        .unwrap();
    let r = client::send(
        a,
        "GET",
        t.as_bytes(),
        &[("Authorization", &format!("Hawk {h}"))],
        b"",
    );
    assert_eq!(r.json()["message"], json!("Stale timestamp"));
}

#[test]
fn payload_hash_is_checked_when_present() {
    let tc = live_fake();
    let t = "/api/queue/v1/x";
    let body = br#"{"a":1}"#;
    let mut ph = verify::PayloadHasher::new(Some("application/json; charset=utf-8"));
    ph.update(body);
    let hash = ph.finish();
    assert_eq!(
        STANDARD.encode(&hash),
        "qKG2AtsqLMhIdy7+OrxWG0bU8wTDncYSW0gmNukAKpI="
    );
    let creds_perm = perm_credentials();
    let h = hawk::RequestBuilder::new("POST", "127.0.0.1", tc.port(), t)
        .hash(&hash[..])
        .request()
        .make_header(&creds_perm)
        .unwrap();
    let auth = format!("Hawk {h}");
    let hdrs = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json; charset=utf-8"),
    ];
    let r = client::send(tc.addr(), "POST", t.as_bytes(), &hdrs, body);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = client::send(tc.addr(), "POST", t.as_bytes(), &hdrs, br#"{"a":2}"#);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["message"], json!("Invalid payload hash"));
}

#[test]
fn markers_and_task_endpoint() {
    let tc = live_fake();
    let a = tc.addr();
    let hdr = |m: &str, t: &str| signed(&tc, "perm", "perm-token", m, t, None);

    let t = "/api/queue/v1/__status/418";
    let r = send_auth(a, "PUT", t, &hdr("PUT", t), b"x");
    assert_eq!(r.status, 418);
    assert_eq!(r.json()["method"], json!("PUT"));

    let t = "/api/queue/v1/__redirect";
    let r = send_auth(a, "GET", t, &hdr("GET", t), b"");
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some("https://elsewhere.example.com/target")
    );

    let t = "/api/queue/v1/__cookies";
    let r = send_auth(a, "GET", t, &hdr("GET", t), b"");
    assert_eq!(r.header_all("set-cookie"), vec!["a=1", "b=2"]);

    // bad auth never reaches the marker behaviour
    let r = send_auth(a, "GET", t, &hdr("GET", "/other"), b"");
    assert_eq!(r.status, 401);
    assert!(r.header_all("set-cookie").is_empty());

    let t = "/api/queue/v1/task/TASK1";
    let r = send_auth(a, "GET", t, &hdr("GET", t), b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["scopes"], json!(["queue:foo", "queue:bar"]));
    assert_eq!(r.json()["taskId"], json!("TASK1"));
    assert_eq!(
        client::get(a, t).status,
        403,
        "anonymous task fetch must be refused"
    );
    let t2 = "/api/queue/v1/task/NOPE";
    let r = send_auth(a, "GET", t2, &hdr("GET", t2), b"");
    assert_eq!(r.status, 404);
    tc.fail_next_task_fetches(2);
    for expected in [500, 500, 200] {
        let r = send_auth(a, "GET", t, &hdr("GET", t), b"");
        assert_eq!(r.status, expected);
    }
    assert_eq!(tc.task_fetches(), 6);
}

#[test]
fn streaming_helpers_against_the_fake() {
    let tc = live_fake();
    let a = tc.addr();
    let hdr = |m: &str, t: &str| signed(&tc, "perm", "perm-token", m, t, None);

    let n = 3 * 1024 * 1024 + 17;
    let t = format!("/api/queue/v1/__download/{n}");
    let d = client::download(a, &t, &[("Authorization", &hdr("GET", &t))]);
    assert_eq!(
        (d.status, d.len, d.pattern_ok, d.error.clone()),
        (200, n, true, None)
    );
    assert_eq!(d.header("content-length"), Some(n.to_string().as_str()));

    let t = format!("/api/queue/v1/__download/{n}?chunked=1");
    let d = client::download(a, &t, &[("Authorization", &hdr("GET", &t))]);
    assert_eq!((d.status, d.len, d.pattern_ok), (200, n, true));
    assert_eq!(d.header("content-length"), None);
    assert_eq!(d.header("transfer-encoding"), Some("chunked"));

    let t = "/api/queue/v1/__download/200000?slow_ms=20";
    let start = std::time::Instant::now();
    let d = client::download(a, t, &[("Authorization", &hdr("GET", t))]);
    assert_eq!((d.len, d.pattern_ok), (200000, true));
    assert!(start.elapsed() >= Duration::from_millis(60));

    let expected_sha = sha256_hex(&pattern::bytes(n as usize));
    for chunked in [false, true] {
        let t = "/api/queue/v1/upload";
        let r = client::upload(
            a,
            "PUT",
            t,
            &[("Authorization", &hdr("PUT", t))],
            n,
            chunked,
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.json();
        assert_eq!(e["body_len"], json!(n));
        assert_eq!(e["body_pattern"], json!(true));
        assert_eq!(e["body_sha256"], json!(expected_sha));
        assert_eq!(e["headers"].get("transfer-encoding").is_some(), chunked);
    }
    let t = "/api/queue/v1/upload";
    let r = send_auth(a, "POST", t, &hdr("POST", t), b"\x00\x01\x03");
    assert_eq!(r.json()["body_pattern"], json!(false));

    // HEAD and keep-alive on one connection
    let mut c = Conn::connect(a).unwrap();
    for m in ["GET", "HEAD", "POST", "GET"] {
        let t = "/api/queue/v1/ka";
        let r = c
            .request(m, t.as_bytes(), &[("Authorization", &hdr(m, t))], b"")
            .unwrap();
        assert_eq!(r.status, 200);
        if m == "HEAD" {
            assert!(r.body.is_empty());
        } else {
            assert_eq!(r.json()["method"], json!(m));
        }
    }
    assert!(!c.is_closed());
}

#[test]
fn tls_fake_serves_localhost_and_extra_names() {
    let tc = FakeTc::start(FakeTcOptions {
        tls: true,
        dns_names: vec!["files.example.com".into()],
        clients: vec![Client::new("perm", "perm-token", &["*"])],
        ..Default::default()
    });
    assert!(tc.root_url().starts_with("https://localhost:"));
    let ca = std::fs::read_to_string(tc.ca_file().unwrap()).unwrap();
    assert!(ca.contains("BEGIN CERTIFICATE"));
    let t = "/api/queue/v1/x";
    let mut c = Conn::connect_tls(tc.addr(), "localhost", &ca).unwrap();
    let h = creds::hawk_header("perm", "perm-token", "GET", "localhost", tc.port(), t, None);
    let r = c
        .request("GET", t.as_bytes(), &[("Authorization", &h)], b"")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["host"], json!(format!("localhost:{}", tc.port())));

    // hostname-form style: Host without port over TLS => port 443 in the MAC
    let mut c = Conn::connect_tls(tc.addr(), "files.example.com", &ca).unwrap();
    let h = creds::hawk_header(
        "perm",
        "perm-token",
        "GET",
        "files.example.com",
        443,
        "/bar",
        None,
    );
    let r = c
        .request(
            "GET",
            b"/bar",
            &[("Host", "files.example.com"), ("Authorization", &h)],
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["auth"]["ok"], json!(true));

    // an unknown name does not verify
    assert!(Conn::connect_tls(tc.addr(), "other.example.com", &ca)
        .and_then(|mut c| c.request("GET", b"/", &[], b""))
        .is_err());
    assert!(support::wait_until(Duration::from_secs(5), || tc
        .tls_failures()
        >= 1));
}

/// A one-shot raw server answering with `response` bytes, then closing.
fn raw_server(response: &'static [u8]) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(response).unwrap();
    });
    addr
}

#[test]
fn client_parses_close_delimited_chunked_and_interim_responses() {
    let a =
        raw_server(b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello world");
    let r = client::get(a, "/");
    assert_eq!((r.status, r.text()), (200, "hello world".to_string()));
    assert_eq!(r.header_all("x-a"), vec!["1", "2"]);

    let a = raw_server(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    );
    let r = client::get(a, "/");
    assert_eq!((r.status, r.text()), (201, "hello world".to_string()));

    let a = raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort");
    assert!(
        client::try_send(a, "GET", b"/", &[], b"").is_err(),
        "truncated body must be an error"
    );

    let a = raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
    let r = client::try_send(a, "HEAD", b"/", &[], b"").unwrap();
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), Some("10"));
}
