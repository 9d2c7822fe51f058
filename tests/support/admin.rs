//! Shared multi-tenant mode from the test side: a client for the admin API (`--admin-socket`,
//! `--admin-address`), request bodies, identity tokens, the checks every "no task" answer must
//! pass, and requests sent from a chosen loopback source address (for `ip` identities).

use super::client::{Conn, Framing, Response};
use super::creds::TempCreds;
use super::users::connect_from;
use super::verify::Client;
use serde_json::{json, Value};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

/// Where the admin API listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// An admin API client; every request goes on a fresh connection (`Connection: close`) and
/// carries `Authorization: Bearer <token>` when a token is set.
#[derive(Clone, Debug)]
pub struct Admin {
    pub endpoint: Endpoint,
    pub token: Option<String>,
}

impl Admin {
    pub fn unix(path: impl Into<PathBuf>) -> Admin {
        Admin {
            endpoint: Endpoint::Unix(path.into()),
            token: None,
        }
    }

    pub fn tcp(addr: SocketAddr) -> Admin {
        Admin {
            endpoint: Endpoint::Tcp(addr),
            token: None,
        }
    }

    /// The same endpoint with `token` as the bearer token (`None`: no Authorization header).
    pub fn with_token(&self, token: Option<&str>) -> Admin {
        Admin {
            endpoint: self.endpoint.clone(),
            token: token.map(str::to_string),
        }
    }

    pub fn connect(&self) -> io::Result<Conn> {
        match &self.endpoint {
            Endpoint::Unix(path) => Conn::connect_unix(path),
            Endpoint::Tcp(addr) => Conn::connect(*addr),
        }
    }

    /// Whether the endpoint accepts connections.
    pub fn is_up(&self) -> bool {
        match &self.endpoint {
            Endpoint::Unix(path) => std::os::unix::net::UnixStream::connect(path).is_ok(),
            Endpoint::Tcp(addr) => {
                TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok()
            }
        }
    }

    /// One request with exactly `headers` (plus `Connection: close`, and the bearer token if
    /// set and no Authorization header is given). A failed body write is ignored (the server
    /// may answer early, e.g. 413, and stop reading): the response is read anyway.
    pub fn try_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let mut conn = self.connect()?;
        let bearer = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut h: Vec<(&str, &str)> = headers.to_vec();
        if let Some(b) = bearer.as_deref() {
            if !h
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            {
                h.push(("Authorization", b));
            }
        }
        h.push(("Connection", "close"));
        conn.write_head(method, path.as_bytes(), &h, Framing::of_body(method, body))?;
        let written = if body.is_empty() {
            Ok(())
        } else {
            conn.write_raw(body).and_then(|()| conn.flush())
        };
        match conn.read_response(method) {
            Ok(r) => Ok(r),
            Err(e) => Err(match written {
                Err(we) => io::Error::new(we.kind(), format!("write failed: {we}; then read: {e}")),
                Ok(()) => e,
            }),
        }
    }

    #[track_caller]
    pub fn raw(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        self.try_raw(method, path, headers, body)
            .unwrap_or_else(|e| panic!("admin {method} {path} via {:?}: {e}", self.endpoint))
    }

    /// A request with an optional JSON body.
    #[track_caller]
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        match body {
            Some(v) => self.raw(
                method,
                path,
                &[("Content-Type", "application/json")],
                v.to_string().as_bytes(),
            ),
            None => self.raw(method, path, &[], b""),
        }
    }

    /// `PUT /tasks/{id}`.
    #[track_caller]
    pub fn put_task(&self, id: &str, body: &Value) -> Response {
        self.call("PUT", &format!("/tasks/{id}"), Some(body))
    }

    /// `PUT /tasks/{id}`, asserting 201; returns the task JSON.
    #[track_caller]
    pub fn register(&self, id: &str, body: &Value) -> Value {
        let r = self.put_task(id, body);
        assert_eq!(r.status, 201, "PUT /tasks/{id}: {}", r.text());
        r.json()
    }

    /// `PUT /tasks/{id}/credentials` with a single-mode `PUT /credentials` body.
    #[track_caller]
    pub fn rotate(&self, id: &str, credentials: &Value) -> Response {
        self.call(
            "PUT",
            &format!("/tasks/{id}/credentials"),
            Some(credentials),
        )
    }

    /// `DELETE /tasks/{id}`.
    #[track_caller]
    pub fn delete(&self, id: &str) -> Response {
        self.call("DELETE", &format!("/tasks/{id}"), None)
    }

    /// `GET /tasks/{id}`.
    #[track_caller]
    pub fn get_task(&self, id: &str) -> Response {
        self.call("GET", &format!("/tasks/{id}"), None)
    }

    /// `GET /tasks`, asserting 200 and the `{"tasks": [...]}` shape; returns the list.
    #[track_caller]
    pub fn list(&self) -> Vec<Value> {
        let r = self.call("GET", "/tasks", None);
        assert_eq!(r.status, 200, "GET /tasks: {}", r.text());
        r.json()["tasks"]
            .as_array()
            .unwrap_or_else(|| panic!("GET /tasks: no \"tasks\" array: {}", r.text()))
            .clone()
    }

    /// The taskIds `GET /tasks` lists, in its order.
    #[track_caller]
    pub fn task_ids(&self) -> Vec<String> {
        self.list()
            .iter()
            .map(|t| t["taskId"].as_str().unwrap_or("<no taskId>").to_string())
            .collect()
    }
}

/// `{"clientId", "accessToken"}` of a permanent client.
pub fn creds(client: &Client) -> Value {
    json!({"clientId": client.client_id, "accessToken": client.access_token})
}

/// `{"clientId", "accessToken", "certificate"}` of temporary credentials (certificate as the
/// JSON text, as `PUT /credentials` takes it).
pub fn temp_creds(t: &TempCreds) -> Value {
    json!({"clientId": t.client_id, "accessToken": t.access_token, "certificate": t.certificate})
}

/// A `PUT /tasks/{id}` body.
pub fn task_body(credentials: Value, identity: Value) -> Value {
    json!({"credentials": credentials, "identity": identity})
}

/// A fresh identity token (44 characters of `[A-Za-z0-9_-]`).
pub fn new_token() -> String {
    super::creds::random_seed()
}

/// `/_task/{token}{rest}`.
pub fn task_path(token: &str, rest: &str) -> String {
    format!("/_task/{token}{rest}")
}

/// An admin error: `status`, `Content-Type: application/json`, body `{"error": "<message>"}`.
#[track_caller]
pub fn assert_json_error(r: &Response, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: body {:?}", r.text());
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: Content-Type {ct:?}, expected application/json (body {:?})",
        r.text()
    );
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {:?}", r.text()));
    assert!(
        v["error"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: expected {{\"error\": \"message\"}}, got {v}"
    );
}

/// The answer to a request that belongs to no live task: 403, a plain-text body starting
/// `taskcluster-proxy:`, and no credential headers.
#[track_caller]
pub fn assert_no_task(r: &Response, what: &str) {
    assert_eq!(
        r.status,
        403,
        "{what}: expected 403 (no task), got {} {:?} headers {:?}",
        r.status,
        r.text(),
        r.headers
    );
    assert!(
        r.text().starts_with("taskcluster-proxy:"),
        "{what}: 403 body must start with \"taskcluster-proxy:\": {:?}",
        r.text()
    );
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("text/plain"),
        "{what}: 403 Content-Type {ct:?}, expected text/plain"
    );
    for h in [
        "x-taskcluster-proxy-perm-clientid",
        "x-taskcluster-proxy-temp-clientid",
    ] {
        assert!(
            r.header(h).is_none(),
            "{what}: a 403 without a task carries {h}: {:?}",
            r.header(h)
        );
    }
}

/// Whether `needle` occurs in the response's headers or body.
pub fn response_contains(r: &Response, needle: &str) -> bool {
    r.headers
        .iter()
        .any(|(k, v)| k.contains(needle) || v.contains(needle))
        || String::from_utf8_lossy(&r.body).contains(needle)
}

/// One request (`Connection: close`) from source address `from`; the whole response is read.
pub fn try_send_from(
    from: IpAddr,
    to: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let stream = connect_from(to, SocketAddr::new(from, 0))?;
    let mut conn = Conn::from_tcp(stream, Duration::from_secs(60))?;
    let mut h = headers.to_vec();
    h.push(("Connection", "close"));
    conn.request(method, target.as_bytes(), &h, body)
}

#[track_caller]
pub fn send_from(from: IpAddr, to: SocketAddr, method: &str, target: &str) -> Response {
    try_send_from(from, to, method, target, &[], b"")
        .unwrap_or_else(|e| panic!("{method} {target} from {from} to {to}: {e}"))
}
