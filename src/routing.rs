//! Maps a task's request-target to an upstream (wire spec §4, §5.1, §5.2).
//!
//! Pure and byte-oriented: apart from the documented mapping, the request-target bytes are
//! passed through untouched (`//`, `%2F`, `%252F`, `..`, raw queries), because the MAC must
//! cover exactly what is sent.

use std::fmt;

use crate::url::{Origin, Scheme};

/// What the proxy does with a request, decided from its path alone.
#[derive(Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// `/bewit`: answered locally with a signed URL.
    Bewit,
    /// `/credentials`: answered locally, rotates the credentials.
    Credentials,
    /// Forwarded upstream.
    Proxy(Route),
}

/// The three ways a task names an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteForm {
    /// `/api/<svc>/<ver>/<path>`
    Api,
    /// `/<svc>/<ver>/<path>`
    Shortcut,
    /// `/<host.name>/<path>` → `https://host.name/<path>`
    Hostname,
}

impl RouteForm {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteForm::Api => "api",
            RouteForm::Shortcut => "shortcut",
            RouteForm::Hostname => "hostname",
        }
    }
}

/// Where a proxied request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub form: RouteForm,
    /// `None` for the root URL's origin, `Some` for a hostname-form origin.
    pub host: Option<Origin>,
    /// Upstream request-target: path plus `?query` when the query is non-empty.
    pub target: Vec<u8>,
    /// Where the service name sits in `target` (API and shortcut forms).
    pub service: Option<std::ops::Range<usize>>,
}

impl Route {
    /// The origin the request goes to: its own host, or the root URL's.
    pub fn origin<'a>(&'a self, root: &'a crate::url::RootUrl) -> &'a Origin {
        self.host.as_ref().unwrap_or(&root.origin)
    }

    /// The Taskcluster service named by an API or shortcut form request.
    pub fn service(&self) -> Option<&[u8]> {
        self.service.clone().map(|r| &self.target[r])
    }
}

/// Why a request-target maps to no upstream; `Display` is the 404 body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    InvalidApiPath,
    UnknownService(String),
    MissingVersion(String),
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidApiPath => f.write_str("invalid /api path"),
            // The typo "Unkown" is the Go proxy's, kept for clients that match on it.
            Self::UnknownService(seg) => write!(
                f,
                "Unkown taskcluster service: {seg} is not a valid taskcluster service"
            ),
            Self::MissingVersion(svc) => write!(
                f,
                "invalid path for taskcluster service {svc}: expected /{svc}/<version>/<path> or /api/{svc}/<version>/<path>"
            ),
        }
    }
}

impl std::error::Error for RouteError {}

/// Decides what to do with a request-target (path + optional `?query`, raw bytes).
///
/// `base_path` is the root URL's path prefix without trailing slashes (usually empty).
pub fn dispatch(base_path: &str, request_target: &[u8]) -> Result<Dispatch, RouteError> {
    let (path, query) = match request_target.iter().position(|&b| b == b'?') {
        Some(i) => (&request_target[..i], &request_target[i + 1..]),
        None => (request_target, &b""[..]),
    };
    match path {
        b"/bewit" => return Ok(Dispatch::Bewit),
        b"/credentials" => return Ok(Dispatch::Credentials),
        _ => {}
    }
    let rest = path.strip_prefix(b"/").unwrap_or(path);
    let (first, after_first) = split_segment(rest);

    if first == b"api" {
        // `^/api/([^/]*)/([^/]*)/(.*)$`; empty service or version are accepted, as in Go.
        let Some(after) = after_first else {
            return Err(RouteError::InvalidApiPath);
        };
        let (svc, after_svc) = split_segment(after);
        let (ver, rest) = match after_svc.map(split_segment) {
            Some((ver, Some(rest))) => (ver, rest),
            _ => return Err(RouteError::InvalidApiPath),
        };
        return Ok(Dispatch::Proxy(api_route(
            RouteForm::Api,
            base_path,
            svc,
            ver,
            rest,
            query,
        )));
    }

    let valid = is_hostname(first);
    if valid && first.contains(&b'.') {
        let host = std::str::from_utf8(first).expect("hostname is ASCII");
        let mut target = Vec::with_capacity(path.len() + query.len() + 2);
        target.push(b'/');
        target.extend_from_slice(after_first.unwrap_or_default());
        push_query(&mut target, query);
        return Ok(Dispatch::Proxy(Route {
            form: RouteForm::Hostname,
            host: Some(Origin::new(Scheme::Https, host, None)),
            target,
            service: None,
        }));
    }
    if first.starts_with(b"api") {
        // Go prefix-matches `/api`, so `/apiary/v1/x` is a bad API path, not a service.
        return Err(RouteError::InvalidApiPath);
    }
    if !valid {
        return Err(RouteError::UnknownService(
            String::from_utf8_lossy(first).into_owned(),
        ));
    }
    match after_first.map(split_segment) {
        Some((ver, Some(rest))) => Ok(Dispatch::Proxy(api_route(
            RouteForm::Shortcut,
            base_path,
            first,
            ver,
            rest,
            query,
        ))),
        // `/queue` and `/queue/v1`: the Go proxy panics here; answer clearly instead.
        _ => Err(RouteError::MissingVersion(
            String::from_utf8_lossy(first).into_owned(),
        )),
    }
}

/// Splits off the first `/`-separated segment; the remainder is `None` when there is no `/`.
fn split_segment(path: &[u8]) -> (&[u8], Option<&[u8]>) {
    match path.iter().position(|&b| b == b'/') {
        Some(i) => (&path[..i], Some(&path[i + 1..])),
        None => (path, None),
    }
}

/// taskcluster-lib-urls `api()`: root + `/api/<svc>/<ver>/` + path with leading `/`s removed.
fn api_route(
    form: RouteForm,
    base_path: &str,
    svc: &[u8],
    ver: &[u8],
    rest: &[u8],
    query: &[u8],
) -> Route {
    let rest = &rest[rest.iter().take_while(|&&b| b == b'/').count()..];
    let mut target =
        Vec::with_capacity(base_path.len() + svc.len() + ver.len() + rest.len() + query.len() + 9);
    target.extend_from_slice(base_path.as_bytes());
    target.extend_from_slice(b"/api/");
    let service = target.len()..target.len() + svc.len();
    target.extend_from_slice(svc);
    target.push(b'/');
    target.extend_from_slice(ver);
    target.push(b'/');
    target.extend_from_slice(rest);
    push_query(&mut target, query);
    Route {
        form,
        host: None,
        target,
        service: Some(service),
    }
}

/// Appends `?query` unless the query is empty (a bare trailing `?` is dropped, as in Go).
fn push_query(target: &mut Vec<u8>, query: &[u8]) {
    if !query.is_empty() {
        target.push(b'?');
        target.extend_from_slice(query);
    }
}

/// Dot-separated labels of letters, digits and hyphens, not starting or ending with `-`.
fn is_hostname(seg: &[u8]) -> bool {
    !seg.is_empty()
        && seg.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                && label[0] != b'-'
                && label[label.len() - 1] != b'-'
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(t: &str) -> String {
        target_with_base("", t)
    }

    fn target_with_base(base: &str, t: &str) -> String {
        match dispatch(base, t.as_bytes()) {
            Ok(Dispatch::Proxy(route)) => {
                let prefix = route
                    .host
                    .map(|o| o.to_string())
                    .unwrap_or_else(|| "ROOT".into());
                format!("{prefix}{}", String::from_utf8(route.target).unwrap())
            }
            other => format!("{other:?}"),
        }
    }

    fn error(t: &str) -> String {
        match dispatch("", t.as_bytes()) {
            Err(e) => e.to_string(),
            other => panic!("{t} routed: {other:?}"),
        }
    }

    #[test]
    fn spec_table_forms() {
        assert_eq!(
            target("/queue/v1/task/abc?x=1&y=%2F"),
            "ROOT/api/queue/v1/task/abc?x=1&y=%2F"
        );
        assert_eq!(
            target("/api/queue/v1/task/abc?x=1"),
            "ROOT/api/queue/v1/task/abc?x=1"
        );
        assert_eq!(
            target("/queue/v1/double//slash/encode1%2F/encode2%252F"),
            "ROOT/api/queue/v1/double//slash/encode1%2F/encode2%252F"
        );
        assert_eq!(
            target("/queue/v1/a/../b/./c"),
            "ROOT/api/queue/v1/a/../b/./c"
        );
        assert_eq!(target("/queue/v1/%2e%2e/y"), "ROOT/api/queue/v1/%2e%2e/y");
        assert_eq!(target("/queue/v1//double"), "ROOT/api/queue/v1/double");
        assert_eq!(target("/api/queue/v1//x"), "ROOT/api/queue/v1/x");
        assert_eq!(target("/api//v1/x"), "ROOT/api//v1/x");
        assert_eq!(target("/api/queue//x"), "ROOT/api/queue//x");
        assert_eq!(target("/queue/v1/x?"), "ROOT/api/queue/v1/x");
        assert_eq!(target("/queue/v1/"), "ROOT/api/queue/v1/");
        assert_eq!(
            target("/foo.example.com/bar/baz?q=1"),
            "https://foo.example.com/bar/baz?q=1"
        );
        assert_eq!(target("/foo.example.com"), "https://foo.example.com/");
        assert_eq!(
            target("/Foo.Example.COM/x"),
            "https://foo.example.com/x",
            "host lower-cased (the server lower-cases it for the MAC)"
        );
        assert_eq!(target("/localhost/v1/x"), "ROOT/api/localhost/v1/x");
        assert_eq!(
            target("/api.example.com/x"),
            "https://api.example.com/x",
            "hostname starting with api is a hostname, not a bad /api path"
        );
    }

    #[test]
    fn root_path_prefix_is_kept() {
        assert_eq!(
            target_with_base("/tc", "/queue/v1/ping"),
            "ROOT/tc/api/queue/v1/ping"
        );
    }

    #[test]
    fn spec_table_errors() {
        assert_eq!(error("/api/queue/v1"), "invalid /api path");
        assert_eq!(error("/api"), "invalid /api path");
        assert_eq!(error("/apiary/v1/x"), "invalid /api path");
        for (t, seg) in [
            ("/", ""),
            ("/x@/", "x@"),
            ("/-bad/v1/x", "-bad"),
            ("/h.example.com:8080/x", "h.example.com:8080"),
            ("/a..b/x", "a..b"),
            ("/under_score/v1/x", "under_score"),
        ] {
            assert_eq!(
                error(t),
                format!("Unkown taskcluster service: {seg} is not a valid taskcluster service")
            );
        }
        assert!(error("/queue").contains("expected /queue/<version>/<path>"));
        assert!(error("/queue/v1").contains("expected /queue/<version>/<path>"));
    }

    #[test]
    fn local_endpoints_match_exactly() {
        assert_eq!(dispatch("", b"/bewit"), Ok(Dispatch::Bewit));
        assert_eq!(dispatch("", b"/credentials"), Ok(Dispatch::Credentials));
        assert_eq!(dispatch("", b"/credentials?x=1"), Ok(Dispatch::Credentials));
        assert!(dispatch("", b"/bewitx").is_err());
        assert!(dispatch("", b"/credentials/x").is_err());
    }

    #[test]
    fn service_is_located_in_the_target() {
        for t in ["/queue/v1/x", "/api/queue/v1/x"] {
            match dispatch("/base", t.as_bytes()) {
                Ok(Dispatch::Proxy(r)) => assert_eq!(r.service(), Some(&b"queue"[..])),
                other => panic!("{other:?}"),
            }
        }
        match dispatch("", b"/h.example.com/x") {
            Ok(Dispatch::Proxy(r)) => assert_eq!(r.service(), None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn non_utf8_bytes_pass_through() {
        match dispatch("", b"/queue/v1/caf\xc3\xa9|{x}") {
            Ok(Dispatch::Proxy(r)) => assert_eq!(r.target, b"/api/queue/v1/caf\xc3\xa9|{x}"),
            other => panic!("{other:?}"),
        }
    }
}
