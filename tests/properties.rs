//! Property tests (proptest) over the pure request-handling code: routing (spec §5.1, §5.2),
//! `/bewit` URL signing (§3, §5.6, verified with the independent `hawk` crate), credential
//! parsing (§5.7) and scope narrowing. Case counts are set per property below and can be
//! raised for a longer run with `PROPTEST_CASES=100000 cargo test --test properties`.

use std::str::FromStr;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{json, Value};

use taskcluster_proxy::credentials::{Credentials, Identity};
use taskcluster_proxy::endpoints::{signed_url, BEWIT_TTL_SECS};
use taskcluster_proxy::routing::{dispatch, Dispatch, RouteForm};
use taskcluster_proxy::scopes;
use taskcluster_proxy::signing::{self, Target};

/// `cases` unless `PROPTEST_CASES` is set.
fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c
}

/// Bytes biased towards the ones routing and URLs care about, plus any byte at all.
fn byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        6 => prop::sample::select(b"/%.?#&=+:-_~aAzZ09 \\@".to_vec()),
        2 => any::<u8>(),
        1 => prop::sample::select(vec![0u8, b'\r', b'\n', 0x7f, 0x80, 0xc3, 0xa9, 0xff]),
    ]
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(byte(), 0..max)
}

/// Bytes without `/` or `?` (one path segment).
fn segment(max: usize) -> impl Strategy<Value = Vec<u8>> {
    bytes(max).prop_map(|v| {
        v.into_iter()
            .map(|b| if b == b'/' || b == b'?' { b'x' } else { b })
            .collect()
    })
}

/// Bytes without `?` (the rest of a path).
fn path_rest(max: usize) -> impl Strategy<Value = Vec<u8>> {
    bytes(max).prop_map(|v| {
        v.into_iter()
            .map(|b| if b == b'?' { b'/' } else { b })
            .collect()
    })
}

/// A root URL path prefix as `RootUrl` keeps it: empty or `/a/b` without a trailing slash.
fn base_path() -> impl Strategy<Value = String> {
    prop_oneof![3 => Just(String::new()), 1 => "(/[a-z0-9%._-]{1,6}){1,2}"]
}

fn label() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?"
}

fn hostname() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 2..5).prop_map(|l| l.join("."))
}

fn with_query(mut target: Vec<u8>, query: &Option<Vec<u8>>) -> Vec<u8> {
    if let Some(q) = query {
        target.push(b'?');
        target.extend_from_slice(q);
    }
    target
}

/// `prefix` + `ver` + `/` + `rest`, then [`with_query`].
fn versioned_target(
    mut prefix: Vec<u8>,
    ver: &[u8],
    rest: &[u8],
    query: &Option<Vec<u8>>,
) -> Vec<u8> {
    prefix.extend_from_slice(ver);
    prefix.push(b'/');
    prefix.extend_from_slice(rest);
    with_query(prefix, query)
}

fn expected_api(base: &str, svc: &[u8], ver: &[u8], rest: &[u8], q: &Option<Vec<u8>>) -> Vec<u8> {
    let mut t = base.as_bytes().to_vec();
    t.extend_from_slice(b"/api/");
    t.extend_from_slice(svc);
    t.push(b'/');
    t.extend_from_slice(ver);
    t.push(b'/');
    t.extend(rest.iter().skip_while(|&&b| b == b'/'));
    if let Some(q) = q.as_ref().filter(|q| !q.is_empty()) {
        t.push(b'?');
        t.extend_from_slice(q);
    }
    t
}

fn is_hostname(seg: &[u8]) -> bool {
    seg.split(|&b| b == b'.').all(|l| {
        !l.is_empty()
            && l.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && l[0] != b'-'
            && l[l.len() - 1] != b'-'
    })
}

proptest! {
    #![proptest_config(config(4000))]

    /// Any request-target: no panic, and whatever is proxied keeps the query byte for byte,
    /// stays under `/api/` on the root URL, or names a valid dotted host.
    #[test]
    fn dispatch_total_and_conservative(base in base_path(), input in bytes(200)) {
        let (path, query) = match input.iter().position(|&b| b == b'?') {
            Some(i) => (&input[..i], &input[i + 1..]),
            None => (&input[..], &b""[..]),
        };
        match dispatch(&base, &input) {
            Ok(Dispatch::Proxy(route)) => {
                let target = &route.target;
                let q_start = target.iter().position(|&b| b == b'?');
                if query.is_empty() {
                    prop_assert_eq!(q_start, None);
                } else {
                    prop_assert_eq!(&target[q_start.unwrap() + 1..], query);
                }
                let upstream_path = &target[..q_start.unwrap_or(target.len())];
                match &route.host {
                    None => {
                        let mut prefix = base.as_bytes().to_vec();
                        prefix.extend_from_slice(b"/api/");
                        prop_assert!(upstream_path.starts_with(&prefix));
                        prop_assert!(route.form != RouteForm::Hostname);
                        prop_assert!(route.service().is_some());
                    }
                    Some(origin) => {
                        prop_assert_eq!(route.form, RouteForm::Hostname);
                        prop_assert!(origin.is_tls() && origin.port == 443);
                        prop_assert!(origin.host.contains('.'));
                        prop_assert!(is_hostname(origin.host.as_bytes()));
                        prop_assert_eq!(origin.host.to_ascii_lowercase(), origin.host.clone());
                        prop_assert!(upstream_path.starts_with(b"/"));
                        // The upstream path is the request's path after the host segment.
                        prop_assert!(path.ends_with(&upstream_path[1..]));
                    }
                }
            }
            Ok(Dispatch::Bewit) => prop_assert_eq!(path, b"/bewit"),
            Ok(Dispatch::Credentials) => prop_assert_eq!(path, b"/credentials"),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// `/api/<svc>/<ver>/<rest>[?q]` → root + `/api/<svc>/<ver>/` + rest without leading
    /// slashes + `?q` when non-empty (taskcluster-lib-urls `api()`), bytes untouched.
    #[test]
    fn api_form_maps_exactly(
        base in base_path(),
        svc in segment(12),
        ver in segment(8),
        rest in path_rest(60),
        query in prop::option::of(bytes(40)),
    ) {
        let mut prefix = b"/api/".to_vec();
        prefix.extend_from_slice(&svc);
        prefix.push(b'/');
        let input = versioned_target(prefix, &ver, &rest, &query);
        match dispatch(&base, &input) {
            Ok(Dispatch::Proxy(route)) => {
                prop_assert_eq!(route.form, RouteForm::Api);
                prop_assert!(route.host.is_none());
                prop_assert_eq!(route.service(), Some(&svc[..]));
                prop_assert_eq!(route.target.clone(), expected_api(&base, &svc, &ver, &rest, &query));
            }
            other => prop_assert!(false, "{:?} → {:?}", String::from_utf8_lossy(&input), other),
        }
    }

    /// `/<svc>/<ver>/<rest>[?q]` with a dot-less service name maps like the API form.
    #[test]
    fn shortcut_form_maps_exactly(
        base in base_path(),
        svc in label().prop_filter("api prefix is the API form", |s| !s.starts_with("api")),
        ver in segment(8),
        rest in path_rest(60),
        query in prop::option::of(bytes(40)),
    ) {
        let input = versioned_target(format!("/{svc}/").into_bytes(), &ver, &rest, &query);
        match dispatch(&base, &input) {
            Ok(Dispatch::Proxy(route)) => {
                prop_assert_eq!(route.form, RouteForm::Shortcut);
                prop_assert!(route.host.is_none());
                prop_assert_eq!(route.service(), Some(svc.as_bytes()));
                prop_assert_eq!(
                    route.target.clone(),
                    expected_api(&base, svc.as_bytes(), &ver, &rest, &query)
                );
            }
            other => prop_assert!(false, "{:?} → {:?}", String::from_utf8_lossy(&input), other),
        }
    }

    /// `/<host.name>[/<rest>][?q]` → `https://<host.name lower-cased>/<rest>[?q]`, the rest
    /// byte for byte (leading slashes kept), the root URL's prefix not involved.
    #[test]
    fn hostname_form_maps_exactly(
        base in base_path(),
        host in hostname(),
        rest in prop::option::of(path_rest(60)),
        query in prop::option::of(bytes(40)),
    ) {
        let mut input = format!("/{host}").into_bytes();
        if let Some(rest) = &rest {
            input.push(b'/');
            input.extend_from_slice(rest);
        }
        let input = with_query(input, &query);
        match dispatch(&base, &input) {
            Ok(Dispatch::Proxy(route)) => {
                prop_assert_eq!(route.form, RouteForm::Hostname);
                let origin = route.host.clone().unwrap();
                prop_assert_eq!(&origin.host, &host.to_ascii_lowercase());
                prop_assert_eq!(origin.port, 443);
                prop_assert!(origin.is_tls());
                let mut expected = b"/".to_vec();
                expected.extend_from_slice(rest.as_deref().unwrap_or_default());
                if let Some(q) = query.as_ref().filter(|q| !q.is_empty()) {
                    expected.push(b'?');
                    expected.extend_from_slice(q);
                }
                prop_assert_eq!(route.target, expected);
            }
            other => prop_assert!(false, "{:?} → {:?}", String::from_utf8_lossy(&input), other),
        }
    }
}

const TEMP_TOKEN: &str = "R4OVHWpIvy6KsqS4AWE51QwbvgLvsstS6e6UW8IfHUY";
const CERT: &str = r#"{"version":1,"scopes":["scope/asd:fhjdf/X","scope/asd:fhjdf/XYZ*"],"start":1438964811744,"expiry":1439051211744,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"nNEaLtZMiw627NuDbF5Z8HDFc57MGWCptXBQSYNFgBk=","issuer":"def/ghi@XXX"}"#;

/// (identity, client id, access token, expected encoded ext)
fn identities() -> Vec<(Identity, &'static str, &'static str, String)> {
    let perm = Credentials::new("tester", "no-secret", None).unwrap();
    let temp = Credentials::new("abc/def/ghi", TEMP_TOKEN, Some(CERT)).unwrap();
    let scopes = vec!["scope/asd:fhjdf/XYZabc".to_string()];
    vec![
        (
            Identity::new(&perm, None),
            "tester",
            "no-secret",
            String::new(),
        ),
        (
            Identity::new(&perm, Some(&[])),
            "tester",
            "no-secret",
            scopes::narrowed_ext(&perm, &[]),
        ),
        (
            Identity::new(&temp, Some(&scopes)),
            "abc/def/ghi",
            TEMP_TOKEN,
            scopes::narrowed_ext(&temp, &scopes),
        ),
    ]
}

/// A URL made of the characters `AbsoluteUrl` accepts, with its parts.
#[derive(Debug, Clone)]
struct GenUrl {
    scheme: String,
    host: String,
    port: Option<u16>,
    path: String,
    query: Option<String>,
    fragment: Option<String>,
    ws_before: String,
    ws_after: String,
}

impl GenUrl {
    fn text(&self) -> String {
        let mut s = format!("{}{}://{}", self.ws_before, self.scheme, self.host);
        if let Some(p) = self.port {
            s.push_str(&format!(":{p}"));
        }
        s.push_str(&self.path);
        if let Some(q) = &self.query {
            s.push('?');
            s.push_str(q);
        }
        if let Some(f) = &self.fragment {
            s.push('#');
            s.push_str(f);
        }
        s.push_str(&self.ws_after);
        s
    }

    /// What the signature covers: the path (`/` when empty) and the query as given.
    fn resource(&self) -> String {
        let mut r = if self.path.is_empty() {
            "/".to_string()
        } else {
            self.path.clone()
        };
        if let Some(q) = &self.query {
            r.push('?');
            r.push_str(q);
        }
        r
    }

    fn sign_port(&self) -> u16 {
        self.port
            .unwrap_or(if self.scheme.eq_ignore_ascii_case("https") {
                443
            } else {
                80
            })
    }
}

fn gen_url() -> impl Strategy<Value = GenUrl> {
    let scheme = prop::sample::select(vec!["http", "https", "HTTPS", "Http"]);
    let host = prop_oneof![
        4 => hostname(),
        1 => label(),
        1 => Just("127.0.0.1".to_string()),
        1 => Just("[::1]".to_string()),
        1 => Just("[2001:DB8::1]".to_string()),
    ];
    let port = prop::option::of(1u16..=65535);
    let seg = prop_oneof![
        6 => "[A-Za-z0-9._~:@!$'()*,;=+-]{0,8}",
        1 => Just("%2F".to_string()),
        1 => Just("%2f%252F".to_string()),
        1 => Just("..".to_string()),
        1 => Just(".".to_string()),
        1 => Just("caf%C3%A9".to_string()),
    ];
    let path = prop_oneof![
        1 => Just(String::new()),
        6 => prop::collection::vec(seg, 1..6).prop_map(|s| format!("/{}", s.join("/"))),
    ];
    let query = prop::option::of(prop_oneof![
        3 => "[A-Za-z0-9._~:@!$'()*,;=+/?&%-]{0,24}",
        1 => prop::collection::vec(("[a-z]{1,3}", "[A-Za-z0-9:%+/ ]{0,6}"), 0..5)
            .prop_map(|kv| kv.into_iter()
                .map(|(k, v)| format!("{k}={}", v.replace(' ', "+")))
                .collect::<Vec<_>>()
                .join("&")),
        1 => Just("scope=queue:get&b=x%2Fy&a=1".to_string()),
    ]);
    let fragment = prop::option::of("[A-Za-z0-9?/#&=:-]{0,10}");
    let ws = "[ \t\r\n]{0,2}";
    (scheme, host, port, path, query, fragment, ws, ws).prop_map(
        |(scheme, host, port, path, query, fragment, ws_before, ws_after)| GenUrl {
            scheme: scheme.to_string(),
            host,
            port,
            path,
            query,
            fragment,
            ws_before,
            ws_after,
        },
    )
}

fn unix_now() -> u64 {
    signing::unix_now()
}

proptest! {
    #![proptest_config(config(3000))]

    /// Any body: an error or a URL, never a panic.
    #[test]
    fn signed_url_total(body in bytes(300), which in 0usize..3) {
        let (identity, ..) = identities().swap_remove(which);
        if let Ok(url) = signed_url(&identity, &body, 1_700_000_000) {
            prop_assert!(url.contains("bewit="));
        }
    }

    /// Same, with bodies shaped like URLs (so parsing gets further).
    #[test]
    fn signed_url_total_on_url_like_text(
        prefix in prop::sample::select(vec!["http://", "https://", "HTTP://", "ftp://", "://", "https:/", ""]),
        rest in "[ -~]{0,60}",
        which in 0usize..3,
    ) {
        let (identity, ..) = identities().swap_remove(which);
        let body = format!("{prefix}{rest}");
        let _ = signed_url(&identity, body.as_bytes(), 1_700_000_000);
    }

    /// Valid URLs: the output is the (trimmed) input with `?bewit=`/`&bewit=` inserted before
    /// any fragment (and `/` for an empty path), and the bewit verifies with the `hawk` crate
    /// over path + query exactly as given, lower-case host and the URL's port.
    #[test]
    fn signed_url_appends_a_verifiable_bewit(url in gen_url(), which in 0usize..3) {
        let (identity, client_id, token, ext) = identities().swap_remove(which);
        let now = unix_now();
        let text = url.text();
        let signed = signed_url(&identity, text.as_bytes(), now)
            .unwrap_or_else(|e| panic!("{text:?}: {e}"));

        let mut expected_prefix = format!("{}://{}", url.scheme, url.host);
        if let Some(p) = url.port {
            expected_prefix.push_str(&format!(":{p}"));
        }
        expected_prefix.push_str(&url.resource());
        expected_prefix.push_str(if url.query.is_some() { "&bewit=" } else { "?bewit=" });
        prop_assert!(signed.starts_with(&expected_prefix), "{} does not start with {}", signed, expected_prefix);
        let after = &signed[expected_prefix.len()..];
        let (bewit, fragment) = match after.split_once('#') {
            Some((b, f)) => (b, Some(f)),
            None => (after, None),
        };
        prop_assert_eq!(fragment, url.fragment.as_deref());
        prop_assert!(!bewit.is_empty());
        prop_assert!(bewit.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));

        let parsed = hawk::Bewit::from_str(bewit).unwrap();
        prop_assert_eq!(parsed.id(), client_id);
        prop_assert_eq!(parsed.ext().unwrap_or(""), ext.as_str());
        prop_assert_eq!(
            parsed.exp(),
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(now + BEWIT_TTL_SECS)
        );
        let key = hawk::Key::new(token.as_bytes(), hawk::SHA256).unwrap();
        let host = url.host.to_ascii_lowercase();
        let resource = url.resource();
        let request = hawk::RequestBuilder::new("GET", &host, url.sign_port(), &resource).request();
        prop_assert!(request.validate_bewit(&parsed, &key), "bewit does not verify for {}", text);
        // And not for a different resource (the MAC really covers it).
        let other = format!("{resource}x");
        let request = hawk::RequestBuilder::new("GET", &host, url.sign_port(), &other).request();
        prop_assert!(!request.validate_bewit(&parsed, &key));
    }
}

/// JSON values shaped like `PUT /credentials` bodies, with certificates nested as strings.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "clientId",
            "accessToken",
            "certificate",
            "version",
            "scopes",
            "start",
            "expiry",
            "seed",
            "signature",
            "issuer",
            "authorizedScopes",
        ])
        .prop_map(str::to_string),
        "[a-zA-Z]{0,6}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(json!(1)),
        Just(json!("JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ")),
        "[ -~]{0,12}".prop_map(Value::from),
        ".{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner.clone()), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            // A certificate-ish object nested as a JSON string.
            prop::collection::vec((key.clone(), inner), 0..8)
                .prop_map(|kv| Value::String(Value::Object(kv.into_iter().collect()).to_string())),
        ]
    })
}

fn credentials_body() -> impl Strategy<Value = Vec<u8>> {
    let cert = prop_oneof![
        Just(Value::String(CERT.to_string())),
        Just(serde_json::from_str::<Value>(CERT).unwrap()),
        json_value(),
        Just(Value::String(String::new())),
    ];
    prop_oneof![
        2 => bytes(200),
        2 => json_value().prop_map(|v| v.to_string().into_bytes()),
        3 => (
            prop::option::of(prop_oneof!["[ -~]{0,12}".prop_map(Value::from), json_value()]),
            prop::option::of(prop_oneof!["[ -~]{0,12}".prop_map(Value::from), json_value()]),
            prop::option::of(cert),
            bytes(8),
        )
            .prop_map(|(id, token, cert, trailing)| {
                let mut o = serde_json::Map::new();
                if let Some(id) = id { o.insert("clientId".into(), id); }
                if let Some(t) = token { o.insert("accessToken".into(), t); }
                if let Some(c) = cert { o.insert("certificate".into(), c); }
                let mut body = Value::Object(o).to_string().into_bytes();
                body.extend_from_slice(&trailing);
                body
            }),
    ]
}

proptest! {
    #![proptest_config(config(4000))]

    /// Any body: an error or valid credentials that can sign, never a panic.
    #[test]
    fn credentials_from_json_total(body in credentials_body()) {
        if let Ok(creds) = Credentials::from_json(&body) {
            prop_assert!(!creds.client_id.is_empty());
            prop_assert!(!creds.access_token().is_empty());
            if let Some(cert) = &creds.certificate {
                prop_assert!(taskcluster_proxy::credentials::Certificate::parse(&cert.to_json_string()).is_ok());
            }
            let identity = Identity::new(&creds, None);
            let header = identity.authorization(&Target {
                method: "GET",
                resource: b"/x",
                host: "h",
                port: 443,
            });
            prop_assert!(header.len() <= identity.max_header_len());
            prop_assert!(http::HeaderValue::from_str(&header).is_ok());
        }
    }

    /// Narrowing never widens: whatever is accepted is satisfied by the configured scopes
    /// (or the certificate's), and malformed headers are 400s, unsatisfied ones 403s.
    #[test]
    fn narrowing_never_widens(
        configured in prop::option::of(prop::collection::vec("[a-c:*]{0,4}", 0..4)),
        cert in prop::option::of(prop::collection::vec("[a-c:*]{0,4}", 0..4)),
        requested in prop_oneof![
            3 => prop::collection::vec("[a-c:*]{0,4}", 0..4)
                .prop_map(|v| serde_json::to_vec(&v).unwrap()),
            1 => bytes(40),
        ],
    ) {
        match scopes::narrow(configured.as_deref(), cert.as_deref(), &requested) {
            Ok(got) => {
                prop_assert_eq!(serde_json::from_slice::<Vec<String>>(&requested).unwrap(), got.clone());
                if let Some(have) = configured.as_deref().or(cert.as_deref()) {
                    for s in &got {
                        prop_assert!(scopes::satisfies(have, s));
                    }
                }
            }
            Err(e) => {
                let status = e.status();
                prop_assert!(status == 400 || status == 403);
                if status == 403 {
                    prop_assert!(configured.is_some() || cert.is_some());
                }
            }
        }
    }
}
