//! `--task-id`: fetch the task's scopes from the queue at start-up (spec §6.3).
//!
//! Unlike the Go proxy the request is signed with the configured credentials (so it does not
//! depend on the anonymous role) and retries are bounded to seconds, not 15 minutes.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_http::RequestHeader;

use crate::credentials::Identity;
use crate::proxy::Upstreams;
use crate::signing::Target;
use crate::url::RootUrl;

/// Attempts before giving up, and the first back-off (doubled each time).
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// A task definition is a few KiB; refuse to buffer anything absurd.
const MAX_TASK_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug)]
pub enum TaskError {
    /// Worth retrying: transport failure or 5xx.
    Transient(String),
    /// Not worth retrying: 4xx or an unusable answer.
    Permanent(String),
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transient(e) | Self::Permanent(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for TaskError {}

/// Escapes a task id for use as one path segment.
fn escape_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Extracts `scopes` from a task definition (missing means none).
pub fn scopes_of_task(body: &[u8]) -> Result<Vec<String>, TaskError> {
    #[derive(serde::Deserialize)]
    struct Task {
        #[serde(default)]
        scopes: Vec<String>,
    }
    serde_json::from_slice::<Task>(body)
        .map(|t| t.scopes)
        .map_err(|e| TaskError::Permanent(format!("unexpected task definition: {e}")))
}

/// Fetches the task's scopes, retrying transient failures a bounded number of times.
pub async fn fetch_task_scopes(
    upstreams: &Upstreams,
    root: &RootUrl,
    identity: &Identity,
    task_id: &str,
) -> Result<Vec<String>, TaskError> {
    let connector = Connector::new(None);
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match fetch_once(&connector, upstreams, root, identity, task_id).await {
            Ok(body) => return scopes_of_task(&body),
            Err(TaskError::Transient(e)) if attempt < ATTEMPTS => {
                log::warn!("fetching task {task_id} (attempt {attempt}/{ATTEMPTS}): {e}");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn fetch_once(
    connector: &Connector,
    upstreams: &Upstreams,
    root: &RootUrl,
    identity: &Identity,
    task_id: &str,
) -> Result<Bytes, TaskError> {
    let transient = |e: pingora_core::BError| TaskError::Transient(e.to_string());
    let origin = &root.origin;
    let path = format!(
        "{}/api/queue/v1/task/{}",
        root.base_path,
        escape_segment(task_id)
    );
    let peer = upstreams.peer(origin).await.map_err(transient)?;
    let mut req = RequestHeader::build("GET", path.as_bytes(), Some(3)).map_err(transient)?;
    req.insert_header(http::header::HOST, origin.authority())
        .map_err(transient)?;
    let authorization = identity.authorization(&Target {
        method: "GET",
        resource: path.as_bytes(),
        host: &origin.host,
        port: origin.port,
    });
    req.insert_header(http::header::AUTHORIZATION, authorization)
        .map_err(transient)?;
    req.insert_header(http::header::ACCEPT, "application/json")
        .map_err(transient)?;

    let (mut session, _reused) = connector.get_http_session(&peer).await.map_err(transient)?;
    session.set_read_timeout(Some(upstreams.timeouts.read));
    session
        .write_request_header(Box::new(req))
        .await
        .map_err(transient)?;
    session.finish_request_body().await.map_err(transient)?;
    session.read_response_header().await.map_err(transient)?;
    let status = session
        .response_header()
        .map(|r| r.status.as_u16())
        .unwrap_or(0);
    let mut body = Vec::new();
    while let Some(chunk) = session.read_response_body().await.map_err(transient)? {
        if body.len() + chunk.len() > MAX_TASK_BYTES {
            return Err(TaskError::Permanent("task definition too large".into()));
        }
        body.extend_from_slice(&chunk);
    }
    let snippet = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    match status {
        200..=299 => Ok(body.into()),
        500..=599 => Err(TaskError::Transient(format!(
            "HTTP {status}: {}",
            snippet()
        ))),
        _ => Err(TaskError::Permanent(format!(
            "HTTP {status}: {}",
            snippet()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_scopes() {
        assert_eq!(
            scopes_of_task(br#"{"taskId":"x","scopes":["a","b*"]}"#).unwrap(),
            ["a", "b*"]
        );
        assert!(scopes_of_task(br#"{"taskId":"x"}"#).unwrap().is_empty());
        assert!(scopes_of_task(b"<html>").is_err());
    }

    #[test]
    fn escapes_task_ids() {
        assert_eq!(
            escape_segment("DSlhVLpwQhS-3fLhmbo1eQ"),
            "DSlhVLpwQhS-3fLhmbo1eQ"
        );
        assert_eq!(escape_segment("a/b c"), "a%2Fb%20c");
    }
}
