//! Taskcluster scope satisfaction and per-request scope narrowing (Taskcluster issue #3122).
//!
//! A task may restrict one request to fewer scopes than the proxy's credentials carry by
//! sending `X-Taskcluster-Authorized-Scopes: ["scope", ...]`. The proxy checks the request
//! against what it knows of its own scopes and signs that one request with those scopes as
//! `authorizedScopes` in `ext` (spec §2.2, §2.3), so the server grants exactly them.
//!
//! What the proxy can check (no role expansion here, unlike the server):
//! - configured `authorizedScopes` (positional scopes / `--task-id`): every requested scope
//!   must be satisfied by them — a task can narrow, never widen;
//! - otherwise, temporary credentials: every requested scope must be satisfied by the
//!   certificate's scopes;
//! - otherwise (permanent credentials, no configured `authorizedScopes`) the proxy does not
//!   know the client's scopes, so the request is accepted as asked and **the server enforces**
//!   it: a scope the client lacks makes the server answer 401/403 (`Supplied credentials do not
//!   satisfy authorizedScopes`). Narrowing can only ever reduce what the server grants.
//!
//! Because nothing is role-expanded, a scope that the configured scopes grant only through an
//! `assume:<role>` scope (or through `assume:anonymous`) is refused here although the server
//! would accept it; request the `assume:` scope itself instead.

use std::fmt;

use crate::credentials::{self, Credentials, Identity, SERVER_HEADER_LIMIT};
use crate::signing;

/// Request header carrying the scopes a task wants this one request restricted to.
pub const HEADER: &str = "X-Taskcluster-Authorized-Scopes";
/// Most scopes accepted in the header.
pub const MAX_SCOPES: usize = 1000;
/// Largest header value accepted, in bytes.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Whether `have` satisfies `want`: an equal scope, or a scope ending in `*` whose prefix
/// (before the `*`) starts `want`. No role expansion.
pub fn satisfies(have: &[String], want: &str) -> bool {
    have.iter().any(|h| match h.strip_suffix('*') {
        Some(prefix) => want.starts_with(prefix),
        None => h == want,
    })
}

/// The first scope of `wants` that `have` does not satisfy, if any.
pub fn first_unsatisfied<'a>(have: &[String], wants: &'a [String]) -> Option<&'a str> {
    wants
        .iter()
        .map(String::as_str)
        .find(|w| !satisfies(have, w))
}

/// A valid Taskcluster scope: printable ASCII (`\x20`–`\x7e`), possibly empty.
pub fn is_valid_scope(scope: &str) -> bool {
    scope.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// What the requested scopes were checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authority {
    /// The proxy's configured `authorizedScopes`.
    AuthorizedScopes,
    /// The temporary credentials' certificate scopes.
    Certificate,
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Authority::AuthorizedScopes => "the proxy's authorized scopes",
            Authority::Certificate => "the temporary credentials' scopes",
        })
    }
}

/// Why a narrowing request was refused. [`status`](Self::status) gives the HTTP status;
/// `Display` is a plain-text body naming no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarrowError {
    /// The header was sent more than once.
    Repeated,
    /// The header value is larger than [`MAX_HEADER_BYTES`].
    TooLarge { len: usize },
    /// Not JSON (message from the parser).
    NotJson(String),
    /// JSON, but not an array.
    NotArray,
    /// An element is not a string.
    NotString { index: usize },
    /// An element contains characters outside printable ASCII.
    InvalidScope { index: usize },
    /// More than [`MAX_SCOPES`] scopes.
    TooMany { count: usize },
    /// A requested scope is not satisfied by what the proxy holds.
    NotSatisfied { scope: String, authority: Authority },
    /// Signing with these scopes would exceed the server's `Authorization` header limit.
    HeaderTooLong { len: usize },
}

impl NarrowError {
    /// 403 when the scopes are well-formed but not held, 400 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            NarrowError::NotSatisfied { .. } => 403,
            _ => 400,
        }
    }
}

impl fmt::Display for NarrowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{HEADER}: ")?;
        match self {
            Self::Repeated => f.write_str("header sent more than once"),
            Self::TooLarge { len } => write!(
                f,
                "header value is {len} bytes, more than the {MAX_HEADER_BYTES} accepted"
            ),
            Self::NotJson(why) => write!(f, "expected a JSON array of scope strings: {why}"),
            Self::NotArray => f.write_str("expected a JSON array of scope strings"),
            Self::NotString { index } => {
                write!(f, "element {index} is not a string")
            }
            Self::InvalidScope { index } => write!(
                f,
                "scope {index} contains characters other than printable ASCII"
            ),
            Self::TooMany { count } => {
                write!(f, "{count} scopes, more than the {MAX_SCOPES} accepted")
            }
            Self::NotSatisfied { scope, authority } => {
                write!(f, "scope {scope:?} is not satisfied by {authority}")
            }
            Self::HeaderTooLong { len } => write!(
                f,
                "signing with these scopes makes a {len}-character Authorization header; \
                 Taskcluster rejects headers over {SERVER_HEADER_LIMIT}"
            ),
        }
    }
}

impl std::error::Error for NarrowError {}

/// The header's value, `None` when absent; [`NarrowError::Repeated`] when sent more than once.
pub fn requested(headers: &http::HeaderMap) -> Result<Option<&[u8]>, NarrowError> {
    let mut values = headers.get_all(HEADER).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(NarrowError::Repeated);
    }
    Ok(first.map(http::HeaderValue::as_bytes))
}

/// Parses the header value: a JSON array of at most [`MAX_SCOPES`] printable-ASCII strings.
pub fn parse(header: &[u8]) -> Result<Vec<String>, NarrowError> {
    if header.len() > MAX_HEADER_BYTES {
        return Err(NarrowError::TooLarge { len: header.len() });
    }
    let value: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| NarrowError::NotJson(e.to_string()))?;
    let serde_json::Value::Array(items) = value else {
        return Err(NarrowError::NotArray);
    };
    if items.len() > MAX_SCOPES {
        return Err(NarrowError::TooMany { count: items.len() });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| match item {
            serde_json::Value::String(s) if is_valid_scope(&s) => Ok(s),
            serde_json::Value::String(_) => Err(NarrowError::InvalidScope { index }),
            _ => Err(NarrowError::NotString { index }),
        })
        .collect()
}

/// Checks a narrowing request (see the module documentation for the rules) and returns the
/// requested scopes, which become this request's `authorizedScopes`.
///
/// `configured` is the proxy's `authorizedScopes` (`Some(&[])` restricts to nothing);
/// `cert_scopes` the certificate's scopes for temporary credentials, `None` for permanent ones.
pub fn narrow(
    configured: Option<&[String]>,
    cert_scopes: Option<&[String]>,
    header: &[u8],
) -> Result<Vec<String>, NarrowError> {
    let requested = parse(header)?;
    let authority = match (configured, cert_scopes) {
        (Some(have), _) => Some((have, Authority::AuthorizedScopes)),
        (None, Some(have)) => Some((have, Authority::Certificate)),
        // Permanent credentials, nothing configured: the server enforces.
        (None, None) => None,
    };
    if let Some((have, authority)) = authority {
        if let Some(scope) = first_unsatisfied(have, &requested) {
            return Err(NarrowError::NotSatisfied {
                scope: scope.to_string(),
                authority,
            });
        }
    }
    Ok(requested)
}

/// The encoded `ext` for `credentials` restricted to `scopes` (certificate as given, then
/// `authorizedScopes`), as [`Identity`] builds it for configured scopes.
pub fn narrowed_ext(credentials: &Credentials, scopes: &[String]) -> String {
    credentials::ext_json(credentials.certificate.as_ref(), Some(scopes))
        .map(|json| signing::encode_ext(&json))
        .unwrap_or_default()
}

/// A checked narrowing: the scopes and the `ext` to sign this request with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Narrowed {
    pub scopes: Vec<String>,
    pub ext: String,
}

/// One call for the proxy: checks `header` against `identity` (its configured scopes or its
/// certificate), builds the ext, and refuses lists whose `Authorization` header the server
/// would reject as too long (spec §1.4).
pub fn narrow_identity(identity: &Identity, header: &[u8]) -> Result<Narrowed, NarrowError> {
    let credentials = identity.credentials();
    let scopes = narrow(
        identity.authorized_scopes(),
        credentials.certificate.as_ref().map(|c| c.scopes()),
        header,
    )?;
    let ext = narrowed_ext(credentials, &scopes);
    let len = signing::authorization_header_max_len(identity.client_id(), &ext);
    if len > SERVER_HEADER_LIMIT {
        return Err(NarrowError::HeaderTooLong { len });
    }
    Ok(Narrowed { scopes, ext })
}

/// Request-time check for the proxy: `Ok(None)` without the header, `Ok(Some(raw))` when it
/// is present and acceptable for `identity` (keep `raw` and sign each attempt with
/// [`narrow_identity`] on the identity current then), the error to answer otherwise.
pub fn check_request(
    identity: &Identity,
    headers: &http::HeaderMap,
) -> Result<Option<Vec<u8>>, NarrowError> {
    match requested(headers)? {
        None => Ok(None),
        Some(raw) => narrow_identity(identity, raw).map(|_| Some(raw.to_vec())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn satisfaction_rules() {
        let have = s(&["queue:get-task:*", "exact", "auth:*", "a*b*"]);
        assert!(satisfies(&have, "queue:get-task:abc"));
        assert!(satisfies(&have, "queue:get-task:"));
        assert!(satisfies(&have, "queue:get-task:*"));
        assert!(satisfies(&have, "queue:get-task:x*"));
        assert!(!satisfies(&have, "queue:get-task"));
        assert!(satisfies(&have, "exact"));
        assert!(!satisfies(&have, "exactly"));
        assert!(!satisfies(&have, "exac"));
        assert!(
            !satisfies(&have, "exact*"),
            "`exact` does not grant `exact*`"
        );
        assert!(satisfies(&have, "auth:"));
        // Only the trailing `*` is special; the inner one is literal.
        assert!(satisfies(&have, "a*b"));
        assert!(satisfies(&have, "a*bcd"));
        assert!(!satisfies(&have, "axb"));
        assert!(satisfies(&s(&["*"]), "anything at all"));
        assert!(satisfies(&s(&["*"]), ""));
        assert!(!satisfies(&[], "x"));
        assert!(satisfies(&s(&[""]), ""));
        assert!(!satisfies(&s(&[""]), "x"));
        assert_eq!(
            first_unsatisfied(&have, &s(&["exact", "nope", "later"])),
            Some("nope")
        );
        assert_eq!(first_unsatisfied(&have, &[]), None);
    }

    #[test]
    fn parse_accepts_json_arrays_of_printable_strings() {
        assert_eq!(parse(b"[]").unwrap(), Vec::<String>::new());
        assert_eq!(
            parse(br#" [ "a:b" , "c*", "", "a:b" ] "#).unwrap(),
            s(&["a:b", "c*", "", "a:b"])
        );
        // JSON escapes decoding to printable ASCII are fine.
        assert_eq!(parse(br#"["\u0041\/"]"#).unwrap(), s(&["A/"]));
    }

    #[test]
    fn parse_rejects_malformed_values() {
        for (input, want) in [
            (&b""[..], "json"),
            (b"[", "json"),
            (b"queue:*", "json"),
            (b"[\"a\"] x", "json"),
            (b"\xff", "json"),
            (br#""a""#, "array"),
            (br#"{"a":1}"#, "array"),
            (b"null", "array"),
            (br#"["a", 1]"#, "string"),
            (br#"["a", ["b"]]"#, "string"),
            (br#"["a", null]"#, "string"),
            (br#"["tab\there"]"#, "invalid"),
            (br#"["nl\n"]"#, "invalid"),
            ("[\"caf\u{e9}\"]".as_bytes(), "invalid"),
            (br#"["\u0000"]"#, "invalid"),
            (br#"["\u007f"]"#, "invalid"),
        ] {
            let err = parse(input).unwrap_err();
            let kind = match err {
                NarrowError::NotJson(_) => "json",
                NarrowError::NotArray => "array",
                NarrowError::NotString { .. } => "string",
                NarrowError::InvalidScope { .. } => "invalid",
                other => panic!("{other:?}"),
            };
            assert_eq!(kind, want, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(err.status(), 400);
        }
        assert_eq!(
            parse(br#"["a", 1]"#).unwrap_err(),
            NarrowError::NotString { index: 1 }
        );
    }

    #[test]
    fn parse_limits() {
        let many = serde_json::to_vec(&vec!["x"; MAX_SCOPES]).unwrap();
        assert_eq!(parse(&many).unwrap().len(), MAX_SCOPES);
        let too_many = serde_json::to_vec(&vec!["x"; MAX_SCOPES + 1]).unwrap();
        assert_eq!(
            parse(&too_many),
            Err(NarrowError::TooMany {
                count: MAX_SCOPES + 1
            })
        );
        let big = serde_json::to_vec(&vec!["y".repeat(MAX_HEADER_BYTES)]).unwrap();
        assert_eq!(parse(&big), Err(NarrowError::TooLarge { len: big.len() }));
        // Deep nesting is a parse error, not a stack overflow.
        let deep = "[".repeat(MAX_HEADER_BYTES / 2);
        assert!(matches!(
            parse(deep.as_bytes()),
            Err(NarrowError::NotJson(_))
        ));
    }

    #[test]
    fn narrowing_against_configured_scopes() {
        let configured = s(&["queue:*", "secrets:get:project/x"]);
        let cert = s(&["*"]);
        let ok = narrow(
            Some(&configured),
            Some(&cert),
            br#"["queue:get-task:abc", "secrets:get:project/x"]"#,
        )
        .unwrap();
        assert_eq!(ok, s(&["queue:get-task:abc", "secrets:get:project/x"]));
        // Configured scopes win over a broader certificate: narrowing never widens.
        let err = narrow(Some(&configured), Some(&cert), br#"["queue:x", "auth:*"]"#).unwrap_err();
        assert_eq!(
            err,
            NarrowError::NotSatisfied {
                scope: "auth:*".into(),
                authority: Authority::AuthorizedScopes
            }
        );
        assert_eq!(err.status(), 403);
        assert!(err.to_string().contains("\"auth:*\""), "{err}");
        // `[]` configured restricts to nothing: only an empty request passes.
        assert_eq!(
            narrow(Some(&[]), None, b"[]").unwrap(),
            Vec::<String>::new()
        );
        assert!(narrow(Some(&[]), None, br#"["a"]"#).is_err());
        // Wildcard requests need a wildcard at least as broad.
        assert!(narrow(Some(&configured), None, br#"["queue:*"]"#).is_ok());
        assert!(narrow(Some(&configured), None, br#"["secrets:*"]"#).is_err());
    }

    #[test]
    fn narrowing_against_certificate_scopes() {
        let cert = s(&["queue:get-task:*"]);
        assert!(narrow(None, Some(&cert), br#"["queue:get-task:1"]"#).is_ok());
        assert_eq!(
            narrow(None, Some(&cert), br#"["queue:create-task:1"]"#),
            Err(NarrowError::NotSatisfied {
                scope: "queue:create-task:1".into(),
                authority: Authority::Certificate
            })
        );
    }

    #[test]
    fn permanent_credentials_without_configured_scopes_defer_to_the_server() {
        assert_eq!(
            narrow(None, None, br#"["anything:*", "x"]"#).unwrap(),
            s(&["anything:*", "x"])
        );
        // Malformed headers are still refused.
        assert!(narrow(None, None, b"nope").is_err());
    }

    fn decode_ext(ext: &str) -> serde_json::Value {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(ext)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    const CERT: &str = r#"{"version":1,"scopes":["scope/asd:fhjdf/X","scope/asd:fhjdf/XYZ*"],"start":1438964811744,"expiry":1439051211744,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"nNEaLtZMiw627NuDbF5Z8HDFc57MGWCptXBQSYNFgBk=","issuer":"def/ghi@XXX"}"#;

    #[test]
    fn narrowed_ext_matches_the_spec_layout() {
        // Spec §2.2 example.
        let perm = Credentials::new("tester", "no-secret", None).unwrap();
        assert_eq!(
            narrowed_ext(&perm, &s(&["test:authenticate-post"])),
            "eyJhdXRob3JpemVkU2NvcGVzIjpbInRlc3Q6YXV0aGVudGljYXRlLXBvc3QiXX0="
        );
        assert_eq!(narrowed_ext(&perm, &[]), "eyJhdXRob3JpemVkU2NvcGVzIjpbXX0=");
        // Spec §8.3 B2: certificate kept as an object, then the narrowed scopes.
        let temp = Credentials::new(
            "abc/def/ghi",
            "R4OVHWpIvy6KsqS4AWE51QwbvgLvsstS6e6UW8IfHUY",
            Some(CERT),
        )
        .unwrap();
        assert_eq!(
            narrowed_ext(&temp, &s(&["scope/asd:fhjdf/XYZabc"])),
            "eyJjZXJ0aWZpY2F0ZSI6eyJ2ZXJzaW9uIjoxLCJzY29wZXMiOlsic2NvcGUvYXNkOmZoamRmL1giLCJzY29wZS9hc2Q6ZmhqZGYvWFlaKiJdLCJzdGFydCI6MTQzODk2NDgxMTc0NCwiZXhwaXJ5IjoxNDM5MDUxMjExNzQ0LCJzZWVkIjoiSllSNHd6TUNURzZYZURTMmNEVUNNd0gwUkZVWEdmUWpLN0xncUQtZTZsU1EiLCJzaWduYXR1cmUiOiJuTkVhTHRaTWl3NjI3TnVEYkY1WjhIREZjNTdNR1dDcHRYQlFTWU5GZ0JrPSIsImlzc3VlciI6ImRlZi9naGlAWFhYIn0sImF1dGhvcml6ZWRTY29wZXMiOlsic2NvcGUvYXNkOmZoamRmL1hZWmFiYyJdfQ=="
        );
    }

    #[test]
    fn narrow_identity_uses_configured_then_certificate_scopes() {
        let temp = Credentials::new(
            "abc/def/ghi",
            "R4OVHWpIvy6KsqS4AWE51QwbvgLvsstS6e6UW8IfHUY",
            Some(CERT),
        )
        .unwrap();
        let identity = Identity::new(&temp, None);
        let n = narrow_identity(&identity, br#"["scope/asd:fhjdf/XYZabc"]"#).unwrap();
        assert_eq!(n.scopes, s(&["scope/asd:fhjdf/XYZabc"]));
        let ext = decode_ext(&n.ext);
        assert_eq!(ext["authorizedScopes"], serde_json::json!(n.scopes));
        assert_eq!(ext["certificate"]["issuer"], "def/ghi@XXX");
        assert_eq!(
            narrow_identity(&identity, br#"["scope/asd:fhjdf/Y"]"#)
                .unwrap_err()
                .status(),
            403
        );

        let configured = s(&["scope/asd:fhjdf/X"]);
        let identity = Identity::new(&temp, Some(&configured));
        assert!(narrow_identity(&identity, br#"["scope/asd:fhjdf/X"]"#).is_ok());
        assert!(
            narrow_identity(&identity, br#"["scope/asd:fhjdf/XYZabc"]"#).is_err(),
            "configured scopes are narrower than the certificate"
        );
    }

    #[test]
    fn narrow_identity_refuses_headers_the_server_would_reject() {
        let perm = Credentials::new("tester", "no-secret", None).unwrap();
        let identity = Identity::new(&perm, None);
        let scopes: Vec<String> = (0..200).map(|i| format!("queue:scope-{i:04}")).collect();
        let header = serde_json::to_vec(&scopes).unwrap();
        let err = narrow_identity(&identity, &header).unwrap_err();
        assert!(matches!(err, NarrowError::HeaderTooLong { len } if len > SERVER_HEADER_LIMIT));
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn check_request_keeps_the_raw_header() {
        let perm = Credentials::new("tester", "no-secret", None).unwrap();
        let configured = s(&["queue:*"]);
        let identity = Identity::new(&perm, Some(&configured));
        let mut map = http::HeaderMap::new();
        assert_eq!(check_request(&identity, &map), Ok(None));
        map.insert(HEADER, http::HeaderValue::from_static(r#"["queue:x"]"#));
        assert_eq!(
            check_request(&identity, &map),
            Ok(Some(br#"["queue:x"]"#.to_vec()))
        );
        map.insert(HEADER, http::HeaderValue::from_static(r#"["auth:x"]"#));
        assert_eq!(check_request(&identity, &map).unwrap_err().status(), 403);
        map.insert(HEADER, http::HeaderValue::from_static("x"));
        assert_eq!(check_request(&identity, &map).unwrap_err().status(), 400);
    }

    #[test]
    fn repeated_header_is_refused() {
        let mut map = http::HeaderMap::new();
        assert_eq!(requested(&map), Ok(None));
        map.append(HEADER, http::HeaderValue::from_static(r#"["a"]"#));
        assert_eq!(requested(&map), Ok(Some(&br#"["a"]"#[..])));
        map.append(HEADER, http::HeaderValue::from_static(r#"["b"]"#));
        assert_eq!(requested(&map), Err(NarrowError::Repeated));
    }
}
