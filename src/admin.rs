//! The admin API of shared mode, served on its own listeners (a Unix socket and/or a TCP
//! address with a bearer token), never on the task-facing ones:
//!
//! - `PUT /tasks/{taskId}`: register or replace a task (201 / 200)
//! - `PUT /tasks/{taskId}/credentials`: rotate that task's credentials
//! - `DELETE /tasks/{taskId}`: the task ended; its identity is refused from now on
//! - `GET /tasks`, `GET /tasks/{taskId}`: listings without secrets
//!
//! Every change is recorded in the state file before it takes effect, so a 2xx promises
//! that it survives a zero-downtime upgrade.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::credentials::Credentials;
use crate::registry::{valid_task_id, Registered, Registration, Registry, RegistryError};
use crate::state::{StateError, StateFile, StoredCredentials, TaskOp};

/// Largest admin request body (certificates with many scopes are large, but not this large).
pub const MAX_ADMIN_BODY: usize = 1024 * 1024;
/// Shortest admin token accepted from the token file.
pub const MIN_ADMIN_TOKEN: usize = 16;

/// The bearer token admin requests must carry. `Debug` never shows it.
#[derive(Clone)]
pub struct AdminToken(String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Why the admin token file was refused.
#[derive(Debug)]
pub struct AdminTokenError(pub String);

impl fmt::Display for AdminTokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AdminTokenError {}

impl AdminToken {
    /// Reads the token file: private to its owner, at least [`MIN_ADMIN_TOKEN`] characters
    /// once surrounding whitespace is trimmed.
    pub fn from_file(path: &Path) -> Result<Self, AdminTokenError> {
        let err =
            |why: String| AdminTokenError(format!("admin token file {}: {why}", path.display()));
        let text = crate::config::read_private_file(path).map_err(err)?;
        Self::new(text.trim()).map_err(|e| err(e.0))
    }

    pub fn new(token: &str) -> Result<Self, AdminTokenError> {
        if token.len() < MIN_ADMIN_TOKEN || token.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(AdminTokenError(format!(
                "the token must be at least {MIN_ADMIN_TOKEN} printable characters without spaces"
            )));
        }
        Ok(AdminToken(token.to_string()))
    }

    /// Whether an `Authorization` header value carries this token (constant time).
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(given) = authorization.and_then(|v| v.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let expected = self.0.as_bytes();
        given.len() == expected.len()
            && given
                .iter()
                .zip(expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// An admin request, routed.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminRoute<'a> {
    List,
    Task(&'a str),
    TaskCredentials(&'a str),
}

impl AdminRoute<'_> {
    pub fn parse(path: &str) -> Option<AdminRoute<'_>> {
        let rest = path.strip_prefix("/tasks")?;
        match rest.trim_end_matches('/') {
            "" => Some(AdminRoute::List),
            rest => {
                let rest = rest.strip_prefix('/')?;
                match rest.split_once('/') {
                    None => Some(AdminRoute::Task(rest)),
                    Some((id, "credentials")) => Some(AdminRoute::TaskCredentials(id)),
                    Some(_) => None,
                }
            }
        }
    }

    fn allowed(&self) -> &'static str {
        match self {
            AdminRoute::List => "GET, HEAD",
            AdminRoute::Task(_) => "GET, HEAD, PUT, DELETE",
            AdminRoute::TaskCredentials(_) => "PUT",
        }
    }
}

/// An answer: status and JSON body (`None` for 204).
struct Answer {
    status: StatusCode,
    body: Option<Value>,
    allow: Option<&'static str>,
}

impl Answer {
    fn ok(status: StatusCode, body: Value) -> Self {
        Answer {
            status,
            body: Some(body),
            allow: None,
        }
    }

    fn error(status: StatusCode, message: impl fmt::Display) -> Self {
        Answer::ok(status, json!({ "error": message.to_string() }))
    }

    fn registry(e: RegistryError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
        Answer::error(status, e)
    }
}

/// The admin API service.
pub struct AdminApp {
    pub registry: Arc<Registry>,
    pub state: Option<Arc<StateFile>>,
    /// Required on every admin request when set.
    pub token: Option<AdminToken>,
}

impl AdminApp {
    /// Unix-socket callers must be root or this process's user (the socket's mode already
    /// says so; this holds even if someone loosens it).
    fn caller_allowed(session: &ServerSession) -> bool {
        // Decided by the socket itself: Pingora reports no client address for Unix clients
        // that never bound a path, so the address cannot tell TCP from Unix callers.
        let Some(fd) = session.stream().map(|s| s.id()) else {
            return false;
        };
        match crate::admission::socket_family(fd) {
            Ok(libc::AF_INET) | Ok(libc::AF_INET6) => return true,
            Ok(libc::AF_UNIX) => {}
            _ => return false,
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        matches!(crate::admission::peer_uid(fd), Ok(uid) if uid == 0 || uid == euid)
    }

    async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Answer> {
        let too_large = || {
            Answer::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {MAX_ADMIN_BODY} bytes"),
            )
        };
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_ADMIN_BODY {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(e) => {
                    return Err(Answer::error(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the request body: {:?}", e.etype()),
                    ))
                }
            }
        }
    }

    /// Runs `f` on the state file off the async runtime; `None` without a state file.
    async fn with_state<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StateFile, &Registry) -> Result<T, StateError> + Send + 'static,
    ) -> Option<Result<T, String>> {
        let state = self.state.clone()?;
        let registry = self.registry.clone();
        let joined = tokio::task::spawn_blocking(move || f(&state, &registry)).await;
        Some(match joined {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        })
    }

    /// Records a change before it is applied; a failure leaves everything unchanged.
    /// Also brings in changes recorded by another process (during an upgrade).
    async fn record(&self, op: TaskOp) -> Result<(), Answer> {
        match self
            .with_state(move |state, registry| state.record_task(registry, op))
            .await
        {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(failure)) => {
                log::error!("admin change not applied: {failure}");
                Err(Answer::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "could not record the change for upgrade hand-over; nothing was changed",
                ))
            }
        }
    }

    /// Folds the journal into a snapshot when due; the change is already safe either way.
    async fn compact(&self) {
        let compacted = self
            .with_state(|state, registry| state.compact_if_due(registry))
            .await;
        if let Some(Err(e)) = compacted {
            log::error!("state journal not compacted: {e}");
        }
    }

    async fn register(&self, session: &mut ServerSession, task_id: &str) -> Answer {
        let body = match Self::read_body(session).await {
            Ok(body) => body,
            Err(answer) => return answer,
        };
        let registration = match Registration::from_json(&body) {
            Ok(r) => r,
            Err(e) => return Answer::registry(e),
        };
        let _writer = self.registry.writer.lock().await;
        if let Err(e) = self.registry.conflict(task_id, &registration.binding) {
            return Answer::registry(e);
        }
        let entry = Registry::entry(task_id, registration, unix_ms());
        if let Err(answer) = self.record(TaskOp::Put(entry.to_stored())).await {
            return answer;
        }
        let outcome = self.registry.insert(entry.clone());
        self.compact().await;
        log::info!(
            "task {task_id} {} with clientId {} ({} tasks)",
            if outcome == Registered::Created {
                "registered"
            } else {
                "replaced"
            },
            entry.store.current().client_id(),
            self.registry.len()
        );
        let status = match outcome {
            Registered::Created => StatusCode::CREATED,
            Registered::Replaced => StatusCode::OK,
        };
        Answer::ok(status, entry.summary())
    }

    async fn rotate(&self, session: &mut ServerSession, task_id: &str) -> Answer {
        let body = match Self::read_body(session).await {
            Ok(body) => body,
            Err(answer) => return answer,
        };
        let credentials = match Credentials::from_json(&body) {
            Ok(c) => c,
            Err(e) => return Answer::registry(RegistryError::Credentials(e)),
        };
        let _writer = self.registry.writer.lock().await;
        let Some(entry) = self.registry.get(task_id) else {
            return Answer::registry(RegistryError::UnknownTask(task_id.to_string()));
        };
        let mut stored = entry.to_stored();
        stored.credentials = StoredCredentials::from(&credentials);
        if let Err(answer) = self.record(TaskOp::Put(stored)).await {
            return answer;
        }
        entry.store.rotate(&credentials);
        self.compact().await;
        Answer::ok(StatusCode::OK, entry.summary())
    }

    async fn delete(&self, task_id: &str) -> Answer {
        let _writer = self.registry.writer.lock().await;
        if self.registry.get(task_id).is_none() {
            return Answer::registry(RegistryError::UnknownTask(task_id.to_string()));
        }
        if let Err(answer) = self.record(TaskOp::Delete(task_id.to_string())).await {
            return answer;
        }
        self.registry.remove(task_id);
        self.compact().await;
        log::info!("task {task_id} ended ({} tasks)", self.registry.len());
        Answer {
            status: StatusCode::NO_CONTENT,
            body: None,
            allow: None,
        }
    }

    async fn answer(&self, session: &mut ServerSession) -> Answer {
        if !Self::caller_allowed(session) {
            return Answer::error(
                StatusCode::FORBIDDEN,
                "the admin socket serves root and the proxy's own user only",
            );
        }
        if let Some(token) = &self.token {
            let given = session
                .req_header()
                .headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            if !token.accepts(given) {
                return Answer::error(
                    StatusCode::UNAUTHORIZED,
                    "admin requests need Authorization: Bearer <admin token>",
                );
            }
        }
        let path = session.req_header().uri.path().to_string();
        let method = session.req_header().method.clone();
        let Some(route) = AdminRoute::parse(&path) else {
            return Answer::error(
                StatusCode::NOT_FOUND,
                "not found: the admin API serves /tasks and /tasks/{taskId}[/credentials]",
            );
        };
        let task_id = match &route {
            AdminRoute::List => None,
            AdminRoute::Task(id) | AdminRoute::TaskCredentials(id) => Some(*id),
        };
        if task_id.is_some_and(|id| !valid_task_id(id)) {
            return Answer::registry(RegistryError::InvalidTaskId);
        }
        let read = method == Method::GET || method == Method::HEAD;
        match (route, method) {
            (AdminRoute::List, _) if read => {
                let tasks: Vec<Value> = self.registry.tasks().iter().map(|t| t.summary()).collect();
                Answer::ok(StatusCode::OK, json!({ "tasks": tasks }))
            }
            (AdminRoute::Task(id), _) if read => match self.registry.get(id) {
                Some(entry) => Answer::ok(StatusCode::OK, entry.summary()),
                None => Answer::registry(RegistryError::UnknownTask(id.to_string())),
            },
            (AdminRoute::Task(id), Method::PUT) => self.register(session, id).await,
            (AdminRoute::Task(id), Method::DELETE) => self.delete(id).await,
            (AdminRoute::TaskCredentials(id), Method::PUT) => self.rotate(session, id).await,
            (route, _) => Answer {
                allow: Some(route.allowed()),
                ..Answer::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("method not allowed; allowed: {}", route.allowed()),
                )
            },
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let answer = self.answer(session).await;
        // An unread body would be taken for the next request.
        if !session.is_body_done() {
            session.set_keepalive(None);
        }
        let body = answer
            .body
            .map(|v| {
                let mut text = v.to_string().into_bytes();
                text.push(b'\n');
                text
            })
            .unwrap_or_default();
        let mut response = Response::builder().status(answer.status);
        if answer.status != StatusCode::NO_CONTENT {
            response = response
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::CONTENT_LENGTH, body.len());
        }
        if let Some(allow) = answer.allow {
            response = response.header(http::header::ALLOW, allow);
        }
        if answer.status == StatusCode::UNAUTHORIZED {
            response = response.header(http::header::WWW_AUTHENTICATE, "Bearer");
        }
        response.body(body).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(AdminRoute::parse("/tasks"), Some(AdminRoute::List));
        assert_eq!(AdminRoute::parse("/tasks/"), Some(AdminRoute::List));
        assert_eq!(
            AdminRoute::parse("/tasks/abc"),
            Some(AdminRoute::Task("abc"))
        );
        assert_eq!(
            AdminRoute::parse("/tasks/abc/credentials"),
            Some(AdminRoute::TaskCredentials("abc"))
        );
        assert_eq!(AdminRoute::parse("/tasks/abc/other"), None);
        assert_eq!(AdminRoute::parse("/tasksx"), None);
        assert_eq!(AdminRoute::parse("/credentials"), None);
    }

    #[test]
    fn bearer_tokens() {
        assert!(AdminToken::new("short").is_err());
        assert!(AdminToken::new("has a space in it, long enough").is_err());
        let token = AdminToken::new("0123456789abcdef").unwrap();
        assert!(token.accepts(Some(b"Bearer 0123456789abcdef")));
        assert!(!token.accepts(Some(b"Bearer 0123456789abcdeF")));
        assert!(!token.accepts(Some(b"Bearer 0123456789abcde")));
        assert!(!token.accepts(Some(b"0123456789abcdef")));
        assert!(!token.accepts(None));
        assert!(!format!("{token:?}").contains("0123"));
    }
}
