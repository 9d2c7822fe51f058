//! A fake Taskcluster deployment: an HTTP/1.1 (optionally TLS) server on 127.0.0.1:0, running on
//! its own thread and tokio runtime, that authenticates every request the way Taskcluster's API
//! server does (see `verify.rs`) and answers with an "echo" of what it received.
//!
//! Echo JSON:
//! `{"method","target","host","headers":{name:[values]},"auth":{"scheme","ok","clientId",
//!   "scopes","authorizedScopes","certificate","ext"},"body_len","body_sha256","body_pattern"}`
//! (`body_sha256` is null for bodies over 16 MiB; `body_pattern` says whether the body is the
//! `i % 251` pattern). Auth failures: 401 `{"code":"AuthenticationFailed","message","echo"}`.
//!
//! Marker path segments (anywhere in the path, after successful auth):
//! `__download/<n>` (`?chunked=1`, `?slow_ms=<m>`), `__status/<code>`, `__redirect`,
//! `__cookies`, `__hang`; and `GET /api/queue/v1/task/<taskId>` for configured tasks.

use super::pattern;
use super::verify::{self, AuthInfo, Client, PayloadHasher};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio_rustls::rustls;

/// Bodies up to this size get a SHA-256 in the echo (hashing is slow in debug builds).
pub const SHA256_LIMIT: u64 = 16 * 1024 * 1024;

#[derive(Clone, Debug, Default)]
pub struct FakeTcOptions {
    /// Serve HTTPS with a certificate from a fresh test CA.
    pub tls: bool,
    /// Extra DNS names for the certificate (besides `localhost` and `127.0.0.1`).
    pub dns_names: Vec<String>,
    /// Known clients (permanent credentials).
    pub clients: Vec<Client>,
    /// Known tasks: (taskId, task scopes).
    pub tasks: Vec<(String, Vec<String>)>,
    /// Answer the first N task fetches with 500.
    pub fail_task_fetches: usize,
    /// Pin the server clock (for old test vectors).
    pub now: Option<SystemTime>,
}

struct State {
    clients: Vec<Client>,
    tasks: HashMap<String, Vec<String>>,
    fail_task_fetches: AtomicUsize,
    task_fetches: AtomicUsize,
    requests_seen: AtomicUsize,
    tls_failures: AtomicUsize,
    log: Mutex<Vec<Value>>,
    now: Option<SystemTime>,
    tls: bool,
}

pub struct FakeTc {
    addr: SocketAddr,
    tls: bool,
    ca_pem: Option<String>,
    ca_file: Option<tempfile::NamedTempFile>,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeTc {
    pub fn start(opts: FakeTcOptions) -> FakeTc {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake tc");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();

        let (acceptor, ca_pem) = if opts.tls {
            let (cfg, ca_pem) = tls_config(&opts.dns_names);
            (
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))),
                Some(ca_pem),
            )
        } else {
            (None, None)
        };
        let ca_file = ca_pem.as_ref().map(|pem| {
            let mut f = tempfile::Builder::new()
                .prefix("fake-tc-ca-")
                .suffix(".pem")
                .tempfile()
                .unwrap();
            f.write_all(pem.as_bytes()).unwrap();
            f.flush().unwrap();
            f
        });

        let state = Arc::new(State {
            clients: opts.clients.clone(),
            tasks: opts.tasks.iter().cloned().collect(),
            fail_task_fetches: AtomicUsize::new(opts.fail_task_fetches),
            task_fetches: AtomicUsize::new(0),
            requests_seen: AtomicUsize::new(0),
            tls_failures: AtomicUsize::new(0),
            log: Mutex::new(vec![]),
            now: opts.now,
            tls: opts.tls,
        });

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fake-tc-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(accept_loop(std_listener, acceptor, st, rx));
                rt.shutdown_background();
            })
            .unwrap();

        FakeTc {
            addr,
            tls: opts.tls,
            ca_pem,
            ca_file,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT` or `https://localhost:PORT`.
    pub fn root_url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://127.0.0.1:{}", self.addr.port())
        }
    }

    /// The authority part of the root URL (what the Host header should be).
    pub fn authority(&self) -> String {
        self.root_url().split("://").nth(1).unwrap().to_string()
    }

    pub fn ca_file(&self) -> Option<PathBuf> {
        self.ca_file.as_ref().map(|f| f.path().to_path_buf())
    }

    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Number of HTTP requests that reached the fake.
    pub fn requests_seen(&self) -> usize {
        self.state.requests_seen.load(Ordering::SeqCst)
    }

    /// Number of TLS handshakes that failed.
    pub fn tls_failures(&self) -> usize {
        self.state.tls_failures.load(Ordering::SeqCst)
    }

    /// Number of `GET /api/queue/v1/task/<id>` requests (including failed ones).
    pub fn task_fetches(&self) -> usize {
        self.state.task_fetches.load(Ordering::SeqCst)
    }

    /// Make the next `n` task fetches fail with 500.
    pub fn fail_next_task_fetches(&self, n: usize) {
        self.state.fail_task_fetches.store(n, Ordering::SeqCst);
    }

    /// Echo records (plus `"status"`) of every request so far, in completion order.
    pub fn requests(&self) -> Vec<Value> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn last_request(&self) -> Option<Value> {
        self.state.log.lock().unwrap().last().cloned()
    }
}

impl Drop for FakeTc {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn tls_config(extra_dns: &[String]) -> (rustls::ServerConfig, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "taskcluster-proxy test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();

    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    sans.extend(extra_dns.iter().cloned());
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(sans).unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();

    let cfg = rustls::ServerConfig::builder_with_provider(super::client::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
                leaf_key.serialize_der(),
            )),
        )
        .unwrap();
    (cfg, ca_cert.pem())
}

async fn accept_loop(
    std_listener: std::net::TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => {
                let Ok((stream, _)) = r else { continue };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let tls = acceptor.is_some();
                    let st = state.clone();
                    let svc = hyper::service::service_fn(move |req| handle(req, st.clone(), tls));
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acc) => match acc.accept(stream).await {
                            Ok(s) => {
                                let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                            }
                            Err(_) => {
                                state.tls_failures.fetch_add(1, Ordering::SeqCst);
                            }
                        },
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        }
    }
}

/// Response body: either a fixed buffer or a stream of chunks fed by a producer task.
pub struct RespBody {
    full: Option<Bytes>,
    rx: Option<mpsc::Receiver<Bytes>>,
}

impl RespBody {
    fn full(b: impl Into<Bytes>) -> RespBody {
        RespBody {
            full: Some(b.into()),
            rx: None,
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(rx) = this.rx.as_mut() {
            return rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))));
        }
        Poll::Ready(this.full.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.rx.is_none() && self.full.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.rx, &self.full) {
            (None, Some(b)) => SizeHint::with_exact(b.len() as u64),
            (None, None) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

fn first_header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn query_param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let q = target.split_once('?')?.1;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

fn json_response(status: u16, v: &Value) -> Response<RespBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(RespBody::full(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
    tls: bool,
) -> Result<Response<RespBody>, Infallible> {
    state.requests_seen.fetch_add(1, Ordering::SeqCst);
    let method = req.method().as_str().to_string();
    let target = match req.uri().path_and_query() {
        Some(pq) if req.uri().scheme().is_none() => pq.as_str().to_string(),
        _ => req.uri().to_string(),
    };
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let host_header = first_header(&req, "host").map(str::to_string);
    let authorization = first_header(&req, "authorization").map(str::to_string);
    let content_type = first_header(&req, "content-type").map(str::to_string);
    let now = state.now.unwrap_or_else(SystemTime::now);

    let auth: Result<AuthInfo, String> = verify::host_port(
        host_header.as_deref(),
        first_header(&req, "x-forwarded-port"),
        first_header(&req, "x-forwarded-proto"),
        tls,
    )
    .and_then(|(host, port)| {
        if req.headers().get_all("authorization").iter().count() > 1 {
            return Err("Multiple Authorization headers".into());
        }
        verify::verify_request(
            &state.clients,
            &method,
            &host,
            port,
            &target,
            authorization.as_deref(),
            now,
        )
    });

    // Consume the body, streaming: length, SHA-256 (small bodies), pattern check, payload hash.
    let mut payload_hasher = match &auth {
        Ok(a) if a.payload_hash.is_some() => Some(PayloadHasher::new(content_type.as_deref())),
        _ => None,
    };
    let mut sha = Some(Sha256::new());
    let mut checker = pattern::Checker::new();
    let mut body_error: Option<String> = None;
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    if checker.len() + d.len() as u64 > SHA256_LIMIT {
                        sha = None;
                    }
                    if let Some(s) = sha.as_mut() {
                        s.update(d);
                    }
                    if let Some(p) = payload_hasher.as_mut() {
                        p.update(d);
                    }
                    checker.update(d);
                }
            }
            Err(e) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }
    let body_sha256 = sha.map(|s| hex(&s.finalize()));

    let auth = auth.and_then(|a| {
        if let (Some(expected), Some(h)) = (&a.payload_hash, payload_hasher.take()) {
            if &h.finish() != expected {
                return Err("Invalid payload hash".into());
            }
        }
        Ok(a)
    });

    let auth_json = match &auth {
        Ok(a) => a.to_json(),
        Err(e) => {
            let scheme = if authorization.is_some() {
                "hawk"
            } else if target.contains("bewit=") {
                "bewit"
            } else {
                "none"
            };
            json!({"scheme": scheme, "ok": false, "error": e})
        }
    };
    let mut echo = json!({
        "method": method,
        "target": target,
        "host": host_header,
        "headers": headers,
        "auth": auth_json,
        "body_len": checker.len(),
        "body_sha256": body_sha256,
        "body_pattern": checker.ok(),
        "body_error": body_error,
    });

    let response = match auth {
        Err(e) => {
            let mut r = json_response(
                401,
                &json!({"code": "AuthenticationFailed", "message": e, "echo": echo}),
            );
            r.headers_mut()
                .insert("www-authenticate", "hawk".parse().unwrap());
            r
        }
        Ok(a) => dispatch(&state, &method, &target, &a, &echo).await,
    };
    echo["status"] = json!(response.status().as_u16());
    state.log.lock().unwrap().push(echo);
    Ok(response)
}

async fn dispatch(
    state: &State,
    method: &str,
    target: &str,
    auth: &AuthInfo,
    echo: &Value,
) -> Response<RespBody> {
    let path = target.split('?').next().unwrap_or("");
    let segs: Vec<&str> = path.split('/').collect();
    let marker = segs
        .iter()
        .position(|s| s.starts_with("__"))
        .map(|i| (segs[i], segs.get(i + 1).copied().unwrap_or("")));

    if let Some(task_id) = path.strip_prefix("/api/queue/v1/task/") {
        if method.eq_ignore_ascii_case("GET") && !task_id.is_empty() && !task_id.contains('/') {
            return task_response(state, task_id, auth);
        }
    }

    match marker {
        Some(("__download", n)) => {
            let n: u64 = match n.parse() {
                Ok(n) => n,
                Err(_) => return json_response(400, &json!({"message": "bad __download size"})),
            };
            let chunked = query_param(target, "chunked") == Some("1");
            let slow_ms: u64 = query_param(target, "slow_ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (tx, rx) = mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let mut pos = 0u64;
                while pos < n {
                    let len = (n - pos).min(pattern::CHUNK as u64) as usize;
                    if tx
                        .send(Bytes::from_static(pattern::static_chunk(pos, len)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    pos += len as u64;
                    if slow_ms > 0 && pos < n {
                        tokio::time::sleep(Duration::from_millis(slow_ms)).await;
                    }
                }
            });
            let mut b = Response::builder()
                .status(200)
                .header("content-type", "application/octet-stream");
            if !chunked {
                b = b.header("content-length", n.to_string());
            }
            b.body(RespBody {
                full: None,
                rx: Some(rx),
            })
            .unwrap()
        }
        Some(("__status", code)) => {
            let code: u16 = code.parse().unwrap_or(400);
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
            json_response(status.as_u16(), echo)
        }
        Some(("__redirect", _)) => Response::builder()
            .status(302)
            .header("location", "https://elsewhere.example.com/target")
            .header("content-type", "text/plain")
            .body(RespBody::full("redirecting to elsewhere"))
            .unwrap(),
        Some(("__cookies", _)) => {
            let mut r = json_response(200, echo);
            r.headers_mut().append("set-cookie", "a=1".parse().unwrap());
            r.headers_mut().append("set-cookie", "b=2".parse().unwrap());
            r
        }
        Some(("__hang", _)) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            json_response(504, echo)
        }
        _ => json_response(200, echo),
    }
}

fn task_response(state: &State, task_id: &str, auth: &AuthInfo) -> Response<RespBody> {
    state.task_fetches.fetch_add(1, Ordering::SeqCst);
    if auth.scheme == "none" {
        return json_response(
            403,
            &json!({"code": "InsufficientScopes", "message": "fake queue requires authentication for task()"}),
        );
    }
    let remaining = state.fail_task_fetches.load(Ordering::SeqCst);
    if remaining > 0 {
        state
            .fail_task_fetches
            .store(remaining - 1, Ordering::SeqCst);
        return json_response(
            500,
            &json!({"code": "InternalServerError", "message": "injected failure"}),
        );
    }
    match state.tasks.get(task_id) {
        Some(scopes) => json_response(
            200,
            &json!({
                "taskId": task_id,
                "provisionerId": "proxy-test",
                "workerType": "fake",
                "schedulerId": "-",
                "taskGroupId": task_id,
                "dependencies": [],
                "requires": "all-completed",
                "routes": [],
                "priority": "lowest",
                "retries": 5,
                "created": "2024-01-01T00:00:00.000Z",
                "deadline": "2024-01-02T00:00:00.000Z",
                "expires": "2025-01-01T00:00:00.000Z",
                "scopes": scopes,
                "payload": {},
                "metadata": {"name": "t", "description": "d", "owner": "o@example.com", "source": "https://example.com"},
                "tags": {},
                "extra": {}
            }),
        ),
        None => json_response(
            404,
            &json!({"code": "ResourceNotFound", "message": format!("task `{task_id}` not found!")}),
        ),
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Hex SHA-256 of a byte slice (for comparing with the echo's `body_sha256`).
pub fn sha256_hex(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}
