//! The Pingora `ProxyHttp` implementation: routing in `request_filter`/`upstream_peer`,
//! Hawk signing in `upstream_request_filter`, `/bewit` and `/credentials` answered locally.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use pingora_core::protocols::tls::CaType;
use pingora_core::protocols::Digest;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::accesslog;
use crate::config::CredentialsEndpoint;
use crate::credentials::{CredentialStore, Credentials, Identity};
use crate::endpoints::{self, MAX_BODY};
use crate::limits::{
    BodyFraming, DownstreamTimeouts, Limits, RateLimiter, ReplayBudget, ReplayReservation,
    RetryPolicy,
};
use crate::metrics::{ConnectionGuard, Form, Labels, METRICS};
use crate::policy::HostAllowlist;
use crate::registry::{self, Caller, TaskEntry, TokenHash};
use crate::resolver::Resolver;
use crate::routing::{self, Dispatch, Route};
use crate::scopes;
use crate::signing::{self, Target};
use crate::state::StateFile;
use crate::tenancy::Tenancy;
use crate::url::{Origin, RootUrl};

/// Timeouts applied to every upstream connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// TCP connect plus TLS handshake.
    pub total_connect: Duration,
    /// Longest silence while reading the upstream's answer.
    pub read: Duration,
    /// Longest stall while writing the request to the upstream.
    pub write: Duration,
    /// How long an unused pooled connection is kept.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            total_connect: Duration::from_secs(30),
            read: Duration::from_secs(300),
            write: Duration::from_secs(300),
            idle: Duration::from_secs(60),
        }
    }
}

/// Builds Pingora peers for upstream origins: resolution, TLS trust, timeouts.
pub struct Upstreams {
    pub resolver: Resolver,
    /// Platform roots plus `--ca-file`; `None` leaves Pingora's platform roots in charge.
    pub ca: Option<Arc<CaType>>,
    pub timeouts: Timeouts,
}

impl Upstreams {
    pub async fn peer(&self, origin: &Origin) -> Result<HttpPeer> {
        let addr = self
            .resolver
            .resolve(origin.bare_host(), origin.port)
            .await
            .map_err(|e| Error::explain(ErrorType::ConnectNoRoute, e.to_string()))?;
        // SNI is always set: Pingora skips certificate verification when it is empty.
        let mut peer = HttpPeer::new(addr, origin.is_tls(), origin.bare_host().to_string());
        let options = &mut peer.options;
        options.connection_timeout = Some(self.timeouts.connect);
        options.total_connection_timeout = Some(self.timeouts.total_connect);
        options.read_timeout = Some(self.timeouts.read);
        options.write_timeout = Some(self.timeouts.write);
        options.idle_timeout = Some(self.timeouts.idle);
        options.ca = self.ca.clone();
        Ok(peer)
    }
}

/// Shared state of the proxy service.
pub struct TaskclusterProxy {
    pub root_url: RootUrl,
    /// One task's credentials, or the shared-mode task registry.
    pub tenancy: Tenancy,
    pub upstreams: Arc<Upstreams>,
    /// Where rotations are recorded for a process taking over in an upgrade.
    pub state: Option<Arc<StateFile>>,
    /// Serialises `PUT /credentials` so the recorded and the in-memory order agree.
    pub rotation: Arc<tokio::sync::Mutex<()>>,
    pub access_log: accesslog::Format,
    pub limits: Limits,
    pub retries: RetryPolicy,
    /// Memory for request bodies kept for replay, shared by all requests.
    pub replay: Arc<ReplayBudget>,
    pub downstream: DownstreamTimeouts,
    pub rate: Option<RateLimiter>,
    /// Task-facing or admin listener.
    pub role: Role,
    pub credentials_endpoint: CredentialsEndpoint,
    /// Hosts the hostname form may reach; `None` allows all (Go-compatible), an empty list
    /// none.
    pub hostnames: Option<Arc<HostAllowlist>>,
    /// Caller admission for Unix-socket callers (TCP callers are filtered on accept).
    pub admission: Option<Arc<crate::admission::Admission>>,
}

/// Which listeners a proxy service instance serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Task-facing: proxying, `/bewit`, and `/credentials` unless restricted to admin.
    Task,
    /// Admin listener: only `PUT /credentials`.
    Admin,
}

/// State of one task connection, carried across its keep-alive requests.
#[derive(Clone)]
struct ConnectionState {
    /// Keeps the connection counted while it is open.
    _guard: Arc<ConnectionGuard>,
    /// The peer's OS uid once looked up (shared mode, uid-bound tasks).
    peer_uid: Option<Option<u32>>,
}

/// Per-request state.
pub struct RequestCtx {
    route: Option<Route>,
    /// Shared mode: the task this request belongs to.
    task: Option<Arc<TaskEntry>>,
    /// The credentials this request was signed with (or answered under).
    identity: Option<Arc<Identity>>,
    labels: Labels,
    start: Instant,
    /// When the current upstream attempt was sent.
    upstream_start: Option<Instant>,
    upstream_reused: Option<bool>,
    attempts: u32,
    in_flight: bool,
    /// Carried across keep-alive requests of one connection.
    connection: Option<ConnectionState>,
    /// `X-Taskcluster-Authorized-Scopes` as sent (checked in `request_filter`, re-checked
    /// and signed per attempt against the credentials current at that moment).
    narrow: Option<Vec<u8>>,
    /// The scopes the last attempt was signed with, for the response header.
    narrowed_scopes: Option<Vec<String>>,
    /// This request's share of the replay budget, held until the request ends.
    replay: Option<ReplayReservation>,
}

impl RequestCtx {
    fn origin<'a>(&'a self, root: &'a RootUrl) -> Option<&'a Origin> {
        self.route.as_ref().map(|r| r.origin(root))
    }
}

/// The request's `Content-Length`, if it is a number.
fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The request body's framing, from headers Pingora has already validated (it drops
/// `Content-Length` when `Transfer-Encoding` is present).
fn body_framing(req: &RequestHeader) -> BodyFraming {
    if req.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return BodyFraming::Chunked;
    }
    match declared_length(req) {
        Some(0) | None => BodyFraming::Empty,
        Some(n) => BodyFraming::Length(n),
    }
}

/// Describes the credentials in the response; nothing when the request was not attributed
/// to a task (shared mode), so a stranger learns nobody's client id.
fn add_identity_headers(resp: &mut ResponseHeader, identity: Option<&Identity>) -> Result<()> {
    for (name, value) in identity.iter().flat_map(|i| &i.headers().list) {
        resp.insert_header(*name, value.clone())?;
    }
    Ok(())
}

impl TaskclusterProxy {
    /// The credentials a request is signed with: the process's, or its task's.
    fn store<'a>(&'a self, ctx: &'a RequestCtx) -> Option<&'a CredentialStore> {
        match &self.tenancy {
            Tenancy::Single(store) => Some(store),
            Tenancy::Shared(_) => ctx.task.as_ref().map(|t| &t.store),
        }
    }

    fn current_identity(&self, ctx: &RequestCtx) -> Option<Arc<Identity>> {
        self.store(ctx).map(CredentialStore::current)
    }

    /// The task a shared-mode request belongs to (token prefix, caller uid or address), and
    /// the offset of the path after the `/_task/<token>` prefix.
    async fn identify_task(
        &self,
        registry: &registry::Registry,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> std::result::Result<(Arc<TaskEntry>, usize), registry::Unidentified> {
        let raw = session.req_header().raw_path();
        // Hashed once: the digest is what the registry keys and compares.
        let (token, offset) = match registry::split_task_prefix(raw) {
            Some((token, rest)) => (Some(TokenHash::of(token)), raw.len() - rest.len()),
            None => (None, 0),
        };
        let needs_uid = match &token {
            Some(token) => registry
                .by_token(token)
                .is_some_and(|e| e.binding.uid.is_some()),
            None => registry.has_uid_bindings(),
        };
        let uid = match ctx.connection.as_ref().and_then(|c| c.peer_uid) {
            Some(known) => known,
            None if needs_uid => {
                let uid = caller_uid(session).await;
                if let Some(connection) = ctx.connection.as_mut() {
                    connection.peer_uid = Some(uid);
                }
                uid
            }
            None => None,
        };
        let ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_canonical());
        let entry = registry.identify(token.as_ref(), &Caller { uid, ip })?;
        Ok((entry, offset))
    }

    /// Sizes this request's replay buffer before Pingora reads any of the body: up to
    /// `retries.replay_buffer_bytes` for an idempotent request if the shared budget allows,
    /// otherwise none, so the body is streamed once and never replayed.
    fn keep_body_for_replay(&self, session: &mut Session, ctx: &mut RequestCtx) {
        let req = session.req_header();
        let capacity = self
            .retries
            .replay_capacity(req.method.is_idempotent(), body_framing(req));
        let reservation = match capacity {
            0 => None,
            n => self.replay.reserve(n).or_else(|| {
                METRICS.replay_refused.inc();
                None
            }),
        };
        let capacity = reservation.as_ref().map_or(0, ReplayReservation::bytes);
        session
            .as_downstream_mut()
            .enable_retry_buffering_with_capacity(capacity);
        ctx.replay = reservation;
    }

    /// The limit a request breaks, if any: status, the counter to bump, and the message.
    fn over_limit(
        &self,
        session: &Session,
        new_connection: bool,
    ) -> Option<(u16, &'static prometheus::IntCounter, String)> {
        let limits = &self.limits;
        if new_connection && METRICS.downstream_connections.get() > limits.max_connections {
            return Some((
                503,
                &METRICS.rejected_too_many_connections,
                format!(
                    "taskcluster-proxy: too many connections (limit {})",
                    limits.max_connections
                ),
            ));
        }
        let req = session.req_header();
        if req.raw_path().len() > limits.max_path_bytes {
            return Some((
                414,
                &METRICS.rejected_path_too_long,
                format!(
                    "taskcluster-proxy: request-target longer than {} bytes",
                    limits.max_path_bytes
                ),
            ));
        }
        let header_bytes: usize = req
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if header_bytes > limits.max_header_bytes {
            return Some((
                431,
                &METRICS.rejected_header_too_large,
                format!(
                    "taskcluster-proxy: request headers larger than {} bytes",
                    limits.max_header_bytes
                ),
            ));
        }
        if let (Some(rate), Some(ip)) = (
            &self.rate,
            session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
        ) {
            if !rate.allow(ip, Instant::now()) {
                return Some((
                    429,
                    &METRICS.rejected_rate_limited,
                    "taskcluster-proxy: too many requests from this client".to_string(),
                ));
            }
        }
        None
    }

    /// Writes a complete locally generated response.
    async fn respond(
        &self,
        session: &mut Session,
        identity: Option<&Identity>,
        status: u16,
        extra: &[(&'static str, HeaderValue)],
        body: Bytes,
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(status, Some(8))?;
        add_identity_headers(&mut resp, identity)?;
        for (name, value) in extra {
            resp.insert_header(*name, value.clone())?;
        }
        if !body.is_empty() {
            resp.insert_header("Content-Type", "text/plain; charset=utf-8")?;
        }
        resp.insert_header("Content-Length", body.len().to_string())?;
        // An unread request body would be taken for the next request: close instead.
        if !session.is_body_done() {
            session.set_keepalive(None);
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }

    /// Reads a small request body, or `None` if it is larger than `limit`.
    async fn read_small_body(session: &mut Session, limit: usize) -> Result<Option<Vec<u8>>> {
        if declared_length(session.req_header()).is_some_and(|len| len > limit as u64) {
            METRICS.rejected_body_too_large.inc();
            return Ok(None);
        }
        let mut body = Vec::new();
        while let Some(chunk) = session.read_request_body().await? {
            if body.len() + chunk.len() > limit {
                METRICS.rejected_body_too_large.inc();
                return Ok(None);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Some(body))
    }

    async fn handle_bewit(&self, session: &mut Session, identity: &Identity) -> Result<()> {
        let id = Some(identity);
        let Some(body) = Self::read_small_body(session, MAX_BODY).await? else {
            let msg = format!("bewit: request body larger than {MAX_BODY} bytes");
            return self.respond(session, id, 413, &[], msg.into()).await;
        };
        let signed = endpoints::signed_url(identity, &body, signing::unix_now()).and_then(|url| {
            HeaderValue::from_str(&url)
                .map(|v| (url, v))
                .map_err(|_| endpoints::BewitError::NotUtf8)
        });
        match signed {
            Ok((url, location)) => {
                self.respond(session, id, 303, &[("Location", location)], url.into())
                    .await
            }
            Err(e) => {
                self.respond(session, id, 400, &[], e.to_string().into())
                    .await
            }
        }
    }

    async fn handle_credentials(
        &self,
        session: &mut Session,
        store: &CredentialStore,
        identity: &Identity,
    ) -> Result<()> {
        let identity = Some(identity);
        if session.req_header().method != http::Method::PUT {
            let allow = [("Allow", HeaderValue::from_static("PUT"))];
            let msg = "credentials: only PUT is allowed";
            return self
                .respond(session, identity, 405, &allow, msg.into())
                .await;
        }
        let Some(body) = Self::read_small_body(session, MAX_BODY).await? else {
            let msg = format!("credentials: request body larger than {MAX_BODY} bytes");
            return self.respond(session, identity, 413, &[], msg.into()).await;
        };
        let credentials = match Credentials::from_json(&body) {
            Ok(credentials) => credentials,
            Err(e) => {
                log::warn!("rejected credential update: {e}");
                let msg = format!("credentials: {e}; the previous credentials stay in force");
                return self.respond(session, identity, 400, &[], msg.into()).await;
            }
        };
        let _rotation = self.rotation.lock().await;
        // Recorded before it takes effect: a 200 promises the rotation survives an upgrade.
        if let Some(state) = &self.state {
            let (state, creds) = (state.clone(), credentials.clone());
            let scopes = store.authorized_scopes();
            let persisted =
                tokio::task::spawn_blocking(move || state.persist(&creds, scopes.as_deref())).await;
            let failure = match persisted {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(e) = failure {
                log::error!("credential update not applied: {e}");
                let msg = "credentials: could not record the new credentials for hand-over; \
                           the previous credentials stay in force";
                return self.respond(session, identity, 500, &[], msg.into()).await;
            }
        }
        store.rotate(&credentials);
        self.respond(session, identity, 200, &[], Bytes::new())
            .await
    }
}

/// The OS uid of the task connection's peer, if it can be determined.
async fn caller_uid(session: &Session) -> Option<u32> {
    let downstream = session.as_downstream();
    let fd = downstream.stream()?.id();
    let socket = downstream.digest()?.socket_digest.clone()?;
    let inet = |a: Option<&pingora_core::protocols::l4::socket::SocketAddr>| {
        a.and_then(|a| a.as_inet()).copied()
    };
    let (peer, local) = (inet(socket.peer_addr()), inet(socket.local_addr()));
    tokio::task::spawn_blocking(move || crate::admission::caller_uid(fd, peer, local))
        .await
        .ok()
        .flatten()
}

/// Index of the TLS kind in [`crate::metrics::ERROR_KINDS`].
const KIND_TLS: usize = 2;

/// Status, plain-text reason and metrics kind (index into [`crate::metrics::ERROR_KINDS`])
/// of a failure to reach the upstream. Only the error type is described: error contexts can
/// carry request details, and bodies must never carry secrets.
fn classify_failure(e: &Error) -> (u16, &'static str, Option<usize>) {
    use ErrorType::*;
    match e.etype() {
        HTTPStatus(code) => (*code, "error", None),
        ConnectTimedout => (504, "timed out connecting to upstream", Some(1)),
        TLSHandshakeTimedout => (504, "timed out in the TLS handshake with upstream", Some(1)),
        ReadTimedout => (504, "timed out waiting for upstream", Some(1)),
        WriteTimedout => (504, "timed out sending to upstream", Some(1)),
        ConnectRefused => (502, "connection refused by upstream", Some(0)),
        ConnectNoRoute => (502, "cannot resolve or reach upstream", Some(3)),
        TLSHandshakeFailure | InvalidCert | HandshakeError => {
            (502, "TLS handshake failed with upstream", Some(KIND_TLS))
        }
        _ => match e.esource() {
            ErrorSource::Upstream => (502, "upstream connection failed for", Some(4)),
            ErrorSource::Downstream => (400, "bad request", None),
            _ => (500, "internal error while proxying to", None),
        },
    }
}

#[async_trait]
impl ProxyHttp for TaskclusterProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            route: None,
            task: None,
            identity: None,
            labels: Labels::default(),
            start: Instant::now(),
            upstream_start: None,
            upstream_reused: None,
            attempts: 0,
            in_flight: false,
            connection: None,
            narrow: None,
            narrowed_scopes: None,
            replay: None,
        }
    }

    fn on_connection_reuse(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
        prev_ctx: Box<dyn Any + Send + Sync>,
    ) {
        if let Ok(state) = prev_ctx.downcast::<ConnectionState>() {
            ctx.connection = Some(*state);
        }
    }

    fn persist_connection_context(
        &self,
        _session: &Session,
        ctx: &Self::CTX,
    ) -> Option<Box<dyn Any + Send + Sync>> {
        ctx.connection
            .clone()
            .map(|state| Box::new(state) as Box<dyn Any + Send + Sync>)
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        if let Some(admission) = &self.admission {
            // Unix-socket callers are checked by their peer credentials (two system calls, so
            // per request); TCP callers were admitted by the connection filter on accept.
            // `id()` of a downstream stream is its file descriptor.
            // Only HTTP/2 and subrequests have no stream, and neither is served here.
            let admitted = match session.as_downstream().stream() {
                Some(stream) => admission.check_downstream(stream.id()).is_accept(),
                None => false,
            };
            if !admitted {
                // No identity headers: they would tell a stranger whose credentials these are.
                session.set_keepalive(None);
                let mut resp = ResponseHeader::build(403, Some(2))?;
                resp.insert_header("Content-Length", "0")?;
                session.write_response_header(Box::new(resp), true).await?;
                return Ok(true);
            }
        }
        session.set_read_timeout(Some(Duration::from_secs(self.downstream.read_seconds)));
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(self.downstream.keepalive_seconds));
        }
        let new_connection = ctx.connection.is_none();
        if new_connection {
            ctx.connection = Some(ConnectionState {
                _guard: ConnectionGuard::new(),
                peer_uid: None,
            });
        }
        METRICS.in_flight.inc();
        ctx.in_flight = true;
        // Until routed: requests refused before routing count as `invalid`.
        ctx.labels = Labels::new(Form::Invalid, None, session.req_header().method.as_str());
        if let Some((status, counter, msg)) = self.over_limit(session, new_connection) {
            counter.inc();
            let identity = self.current_identity(ctx);
            let extra: &[(&'static str, HeaderValue)] = if status == 429 {
                &[("Retry-After", HeaderValue::from_static("1"))]
            } else {
                &[]
            };
            if status == 503 || status == 431 || status == 414 {
                session.set_keepalive(None);
            }
            self.respond(session, identity.as_deref(), status, extra, msg.into())
                .await?;
            ctx.identity = identity;
            return Ok(true);
        }
        if !session.req_header().raw_path().starts_with(b"/") {
            // Absolute-form (`GET http://host/`), authority-form (`CONNECT host:443`),
            // asterisk-form and slash-less targets (`GET evil.example/x`, which routing would
            // otherwise take for `/evil.example/x`) are not requests for this proxy.
            let identity = self.current_identity(ctx);
            session.set_keepalive(None);
            let msg = "taskcluster-proxy: the request-target must be a path starting with /";
            self.respond(session, identity.as_deref(), 400, &[], msg.into())
                .await?;
            ctx.identity = identity;
            return Ok(true);
        }
        let mut offset = 0;
        if let Tenancy::Shared(registry) = &self.tenancy {
            match self.identify_task(registry, session, ctx).await {
                Ok((entry, path_offset)) => {
                    ctx.task = Some(entry);
                    offset = path_offset;
                }
                Err(e) => {
                    METRICS.rejected_unknown_task.inc();
                    self.respond(session, None, 403, &[], e.to_string().into())
                        .await?;
                    return Ok(true);
                }
            }
        }
        let Some(store) = self.store(ctx) else {
            return Err(Error::explain(ErrorType::InternalError, "no credentials"));
        };
        let identity = store.current();
        let path = &session.req_header().raw_path()[offset..];
        if !path.starts_with(b"/") {
            let msg = "taskcluster-proxy: expected /_task/<token>/<path>";
            self.respond(session, Some(&identity), 404, &[], msg.into())
                .await?;
            ctx.identity = Some(identity);
            return Ok(true);
        }
        let dispatch = routing::dispatch(&self.root_url.base_path, path);
        let method = session.req_header().method.as_str();
        ctx.labels = match &dispatch {
            Ok(Dispatch::Proxy(route)) => Labels::new(route.form.into(), route.service(), method),
            Ok(Dispatch::Bewit) => Labels::new(Form::Bewit, None, method),
            Ok(Dispatch::Credentials) => Labels::new(Form::Credentials, None, method),
            Err(_) => Labels::new(Form::Invalid, None, method),
        };
        let id = Some(&*identity);
        match dispatch {
            Ok(Dispatch::Credentials)
                if self.role == Role::Task
                    && self.credentials_endpoint == CredentialsEndpoint::Admin =>
            {
                METRICS.rejected_forbidden.inc();
                let msg = "credentials: rotation is only accepted on the admin listener";
                self.respond(session, id, 403, &[], msg.into()).await?
            }
            Ok(Dispatch::Credentials)
                if self.role == Role::Task
                    && self.credentials_endpoint == CredentialsEndpoint::Root
                    && caller_uid(session).await != Some(0) =>
            {
                METRICS.rejected_forbidden.inc();
                let msg = "credentials: only root may rotate credentials";
                self.respond(session, id, 403, &[], msg.into()).await?
            }
            Ok(Dispatch::Credentials) => match &self.tenancy {
                Tenancy::Single(store) => {
                    self.handle_credentials(session, store, &identity).await?
                }
                Tenancy::Shared(_) => {
                    METRICS.rejected_forbidden.inc();
                    let msg = "credentials: in shared mode each task's credentials are rotated \
                               through the admin API (PUT /tasks/{taskId}/credentials)";
                    self.respond(session, id, 403, &[], msg.into()).await?
                }
            },
            _ if self.role == Role::Admin => {
                let msg = "admin listener: only PUT /credentials is served here";
                self.respond(session, id, 404, &[], msg.into()).await?
            }
            Ok(Dispatch::Proxy(route)) => {
                let refused = route.host.as_ref().filter(|host| {
                    log::info!("hostname-form request to {}", host.host);
                    self.hostnames.as_ref().is_some_and(|list| {
                        list.is_unrestricted() || !list.allows(host.bare_host())
                    })
                });
                if let Some(host) = refused {
                    METRICS.rejected_forbidden.inc();
                    let msg = format!(
                        "taskcluster-proxy: hostname-form requests to {} are not allowed (hostname_allowlist)",
                        host.host
                    );
                    self.respond(session, id, 403, &[], msg.into()).await?;
                } else {
                    // Per-request scope narrowing: refused here (400 malformed, 403 not
                    // held) before anything reaches the upstream.
                    match scopes::check_request(&identity, &session.req_header().headers) {
                        Ok(narrow) => {
                            if log::log_enabled!(log::Level::Debug) {
                                let target = String::from_utf8_lossy(&route.target);
                                let origin = route.origin(&self.root_url);
                                log::debug!(
                                    "{} route to {origin}{}",
                                    route.form.as_str(),
                                    redact_bewit(&target)
                                );
                            }
                            ctx.narrow = narrow;
                            ctx.route = Some(route);
                            self.keep_body_for_replay(session, ctx);
                            return Ok(false);
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            self.respond(session, id, e.status(), &[], msg.into())
                                .await?;
                        }
                    }
                }
            }
            Ok(Dispatch::Bewit) => self.handle_bewit(session, &identity).await?,
            Err(e) => {
                self.respond(session, id, 404, &[], e.to_string().into())
                    .await?
            }
        }
        ctx.identity = Some(identity);
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        ctx.attempts += 1;
        if ctx.attempts > 1 {
            METRICS.retries.inc();
            let jitter = rand::random::<f64>();
            let budget = Duration::from_secs_f64(self.retries.max_seconds)
                .saturating_sub(ctx.start.elapsed());
            tokio::time::sleep(self.retries.backoff(ctx.attempts, jitter).min(budget)).await;
        }
        let origin = ctx
            .origin(&self.root_url)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route"))?;
        Ok(Box::new(self.upstreams.peer(origin).await?))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let route = ctx
            .route
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route"))?;
        let origin = route.origin(&self.root_url);
        upstream_request.set_raw_path(&route.target)?;
        upstream_request.insert_header(http::header::HOST, origin.authority())?;
        // The task's own credentials never travel upstream, and forwarding headers from the
        // task would change the port the server puts into the MAC (spec §1.3).
        upstream_request.remove_header(&http::header::AUTHORIZATION);
        upstream_request.remove_header("X-Forwarded-Port");
        upstream_request.remove_header("X-Forwarded-Proto");
        upstream_request.remove_header(scopes::HEADER);
        // Nor may a task tell the upstream which host it was asked for.
        upstream_request.remove_header("X-Forwarded-Host");
        upstream_request.remove_header("Forwarded");

        // Signed per attempt with the credentials current at that moment.
        let identity = self
            .current_identity(ctx)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no credentials"))?;
        let method = upstream_request.method.as_str();
        let upper;
        let method = if method.bytes().any(|b| b.is_ascii_lowercase()) {
            upper = method.to_ascii_uppercase();
            upper.as_str()
        } else {
            method
        };
        let target = Target {
            method,
            resource: &route.target,
            host: &origin.host,
            port: origin.port,
        };
        let authorization = match &ctx.narrow {
            None => identity.authorization(&target),
            Some(raw) => {
                // Re-checked against the credentials signing this attempt (a rotation may
                // have changed the certificate's scopes since `request_filter`).
                let narrowed = scopes::narrow_identity(&identity, raw).map_err(|e| {
                    Error::explain(ErrorType::HTTPStatus(e.status()), e.to_string())
                })?;
                let authorization = identity.authorization_with_ext(&narrowed.ext, &target);
                ctx.narrowed_scopes = Some(narrowed.scopes);
                authorization
            }
        };
        upstream_request
            .insert_header(http::header::AUTHORIZATION, authorization)
            .inspect_err(|_| METRICS.signing_errors.inc())?;
        log::trace!(
            "attempt {} signed for clientId {}{}",
            ctx.attempts,
            identity.client_id(),
            if ctx.narrow.is_some() {
                " with narrowed scopes"
            } else {
                ""
            }
        );
        ctx.identity = Some(identity);
        ctx.upstream_start = Some(Instant::now());
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&Digest>,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        METRICS.upstream_connection(reused);
        ctx.upstream_reused = Some(reused);
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if !upstream_response.status.is_informational() {
            if let Some(start) = ctx.upstream_start.take() {
                let form = ctx.route.as_ref().map_or(Form::Invalid, |r| r.form.into());
                METRICS.upstream_duration(form, start.elapsed().as_secs_f64());
            }
        }
        // A 5xx to an idempotent request whose body can be replayed is retried (nothing has
        // reached the task yet); the last attempt's answer is relayed as it is.
        let status = upstream_response.status.as_u16();
        if status >= 500
            && session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none()
            && self.retries.may_retry(ctx.attempts, ctx.start.elapsed())
        {
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                format!("upstream answered {status}; retrying"),
            );
            e.set_retry(true);
            return Err(e.into_up());
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        if ctx.in_flight {
            METRICS.in_flight.dec();
            ctx.in_flight = false;
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let downstream = session.as_downstream();
        let (bytes_in, bytes_out) = (
            downstream.body_bytes_read() as u64,
            downstream.body_bytes_sent() as u64,
        );
        METRICS.request(ctx.labels, status, bytes_in, bytes_out);
        if self.access_log == accesslog::Format::Off
            || !log::log_enabled!(target: accesslog::TARGET, log::Level::Info)
        {
            return;
        }
        let req = session.req_header();
        let path = String::from_utf8_lossy(req.raw_path());
        let upstream = ctx
            .origin(&self.root_url)
            .map(Origin::host_port)
            .unwrap_or_default();
        let client = session
            .client_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let record = accesslog::Record {
            time: accesslog::now_rfc3339(),
            method: req.method.as_str(),
            form: ctx.labels.form(),
            service: ctx.labels.service(),
            upstream: &upstream,
            path: &redact_target(&path),
            status,
            bytes_in,
            bytes_out,
            duration_ms: ctx.start.elapsed().as_secs_f64() * 1000.0,
            upstream_reused: ctx.upstream_reused,
            retries: ctx.attempts.saturating_sub(1),
            client: &client,
            task: ctx.task.as_ref().map(|t| t.task_id.as_str()),
        };
        if let Some(line) = record.line(self.access_log) {
            log::info!(target: accesslog::TARGET, "{line}");
        }
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let identity = ctx.identity.clone().or_else(|| self.current_identity(ctx));
        // Ours overwrite any same-named upstream headers.
        add_identity_headers(upstream_response, identity.as_deref())?;
        if let Some(narrowed) = &ctx.narrowed_scopes {
            let value = serde_json::Value::from(narrowed.clone()).to_string();
            if let Ok(value) = HeaderValue::from_str(&value) {
                upstream_response.insert_header(scopes::HEADER, value)?;
            }
        }
        if let (Some(route), Some(origin)) = (&ctx.route, ctx.origin(&self.root_url)) {
            let mut endpoint = origin.to_string().into_bytes();
            endpoint.extend_from_slice(&route.target);
            if let Ok(value) = HeaderValue::from_bytes(&endpoint) {
                upstream_response.insert_header("X-Taskcluster-Endpoint", value)?;
            }
        }
        Ok(())
    }

    /// Nothing reached the upstream yet: any method may be retried (re-signed by
    /// `upstream_request_filter`), within the attempt and time budget.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Certificate and handshake errors will not go away by themselves.
        let transient = classify_failure(&e).2 != Some(KIND_TLS);
        let retry = transient && self.retries.may_retry(ctx.attempts, ctx.start.elapsed());
        e.set_retry(retry);
        e
    }

    /// After sending: only idempotent requests whose body was kept whole for replay, before
    /// anything reached the task, within the budget. The upstream connection breaking
    /// mid-request (reset, closed, a failed read or write) is retried on any connection;
    /// other errors as Pingora decides (e.g. a closed pooled connection), and timeouts never,
    /// so a hung upstream still answers 504 after one read timeout.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let replayable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none()
            && self.retries.may_retry(ctx.attempts, ctx.start.elapsed());
        let broken_upstream = *e.esource() == ErrorSource::Upstream
            && matches!(
                e.etype(),
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
            );
        if !replayable {
            e.set_retry(false);
        } else if broken_upstream {
            e.set_retry(true);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    /// Our deliberate 5xx retries are not worth a warning each; the final outcome is logged.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &Self::CTX,
        error: &Error,
        _context: pingora_proxy::ProxyWarnLogContext,
    ) -> bool {
        matches!(error.etype(), ErrorType::HTTPStatus(_)) && error.retry()
    }

    /// Pingora's error logs name the request; bewits in queries are credentials, so redact them.
    fn request_summary(&self, session: &Session, _ctx: &Self::CTX) -> String {
        let req = session.req_header();
        let target = String::from_utf8_lossy(req.raw_path());
        format!("{} {}", req.method, redact_target(&target))
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy
    where
        Self::CTX: Send + Sync,
    {
        let (mut code, reason, kind) = classify_failure(e);
        if let Some(kind) = kind {
            METRICS.upstream_error(kind);
        }
        let downstream_gone = e.esource() == &ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
            );
        if downstream_gone {
            code = 0;
        }
        if code > 0 && session.response_written().is_none() {
            let host = ctx
                .origin(&self.root_url)
                .map(Origin::authority)
                .unwrap_or_default();
            log::warn!("{code} for {host}: {reason}: {:?}", e.etype());
            let body = match e.etype() {
                ErrorType::HTTPStatus(_) => format!("taskcluster-proxy: HTTP {code}\n"),
                _ => format!("taskcluster-proxy: {reason} {host}\n"),
            };
            let identity = ctx.identity.clone().or_else(|| self.current_identity(ctx));
            if let Err(write_err) = self
                .respond(session, identity.as_deref(), code, &[], body.into())
                .await
            {
                log::debug!("failed to send error response: {write_err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

/// A request-target fit for logs: the shared-mode task token and bewits redacted.
pub fn redact_target(target: &str) -> String {
    redact_bewit(&registry::redact_task_token(target)).into_owned()
}

/// Replaces the value of every `bewit=` query parameter with `REDACTED`.
pub fn redact_bewit(target: &str) -> std::borrow::Cow<'_, str> {
    let Some((path, query)) = target.split_once('?') else {
        return target.into();
    };
    if !query.split('&').any(|p| p.starts_with("bewit=")) {
        return target.into();
    }
    let query: Vec<&str> = query
        .split('&')
        .map(|p| {
            if p.starts_with("bewit=") {
                "bewit=REDACTED"
            } else {
                p
            }
        })
        .collect();
    format!("{path}?{}", query.join("&")).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bewits_are_redacted() {
        assert_eq!(
            redact_bewit("/a?x=1&bewit=abc&y"),
            "/a?x=1&bewit=REDACTED&y"
        );
        assert_eq!(redact_bewit("/a?bewit=abc"), "/a?bewit=REDACTED");
        assert_eq!(redact_bewit("/a?notbewit=1"), "/a?notbewit=1");
        assert_eq!(redact_bewit("/a"), "/a");
    }

    #[test]
    fn failure_classes() {
        let e = Error::new(ErrorType::ConnectRefused);
        assert_eq!(classify_failure(&e).0, 502);
        let e = Error::new(ErrorType::ReadTimedout);
        assert_eq!(classify_failure(&e).0, 504);
        let e = Error::new(ErrorType::InvalidCert);
        assert_eq!(classify_failure(&e).0, 502);
        let e = Error::new(ErrorType::HTTPStatus(413));
        assert_eq!(classify_failure(&e).0, 413);
    }
}
