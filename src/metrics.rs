//! Prometheus metrics and the side listener that serves them with `/healthz` and `/readyz`.
//!
//! Counters are atomics; the per-request label lookup goes through a table of lazily
//! created series, so after the first request of a kind no lock is taken on the hot path.
//! Labels are bounded: route form, a fixed list of services, method class, status class.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use http::{Response, StatusCode};
use once_cell::sync::Lazy;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::credentials::CredentialStore;
use crate::routing::RouteForm;
use crate::tenancy::Tenancy;

/// Route forms as metric labels, including the locally answered and failed ones.
pub const FORMS: [&str; 6] = [
    "api",
    "shortcut",
    "hostname",
    "bewit",
    "credentials",
    "invalid",
];
/// Taskcluster services named as such in labels; anything else is `other`.
pub const SERVICES: [&str; 11] = [
    "auth",
    "github",
    "hooks",
    "index",
    "notify",
    "object",
    "purge-cache",
    "queue",
    "secrets",
    "worker-manager",
    "web-server",
];
const SERVICE_LABELS: usize = SERVICES.len() + 2; // + other, none
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
];
const STATUSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];
/// Kinds of upstream failure.
pub const ERROR_KINDS: [&str; 5] = ["refused", "timeout", "tls", "resolve", "other"];

/// What a request was, as label indexes.
#[derive(Debug, Clone, Copy)]
pub struct Labels {
    form: usize,
    service: usize,
    method: usize,
}

/// Not routed (yet): `invalid`, no service, method `OTHER`.
impl Default for Labels {
    fn default() -> Self {
        Labels::new(Form::Invalid, None, "")
    }
}

impl Labels {
    pub fn new(form: Form, service: Option<&[u8]>, method: &str) -> Self {
        let service = match service {
            None => SERVICES.len() + 1, // none
            Some(s) => SERVICES
                .iter()
                .position(|known| known.as_bytes() == s)
                .unwrap_or(SERVICES.len()), // other
        };
        Labels {
            form: form as usize,
            service,
            method: METHODS[..7].iter().position(|m| *m == method).unwrap_or(7),
        }
    }

    pub fn form(&self) -> &'static str {
        FORMS[self.form]
    }

    pub fn service(&self) -> &'static str {
        match self.service {
            i if i < SERVICES.len() => SERVICES[i],
            i if i == SERVICES.len() => "other",
            _ => "none",
        }
    }
}

/// The `form` label of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Form {
    Api = 0,
    Shortcut = 1,
    Hostname = 2,
    Bewit = 3,
    Credentials = 4,
    #[default]
    Invalid = 5,
}

impl From<RouteForm> for Form {
    fn from(f: RouteForm) -> Self {
        match f {
            RouteForm::Api => Form::Api,
            RouteForm::Shortcut => Form::Shortcut,
            RouteForm::Hostname => Form::Hostname,
        }
    }
}

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_series: Box<[OnceLock<IntCounter>]>,
    upstream_duration: Vec<Histogram>,
    request_bytes: Vec<IntCounter>,
    response_bytes: Vec<IntCounter>,
    pub in_flight: IntGauge,
    pub downstream_connections: IntGauge,
    upstream_connections: [IntCounter; 2],
    pub retries: IntCounter,
    pub rejected_connections: IntCounter,
    pub rejected_body_too_large: IntCounter,
    pub rejected_header_too_large: IntCounter,
    pub rejected_path_too_long: IntCounter,
    pub rejected_too_many_connections: IntCounter,
    pub rejected_rate_limited: IntCounter,
    pub rejected_forbidden: IntCounter,
    pub rejected_unknown_task: IntCounter,
    pub replay_refused: IntCounter,
    pub tasks_registered: IntGauge,
    pub rotations: IntCounter,
    pub signing_errors: IntCounter,
    upstream_errors: Vec<IntCounter>,
}

fn name(n: &str) -> String {
    format!("taskcluster_proxy_{n}")
}

fn counter_vec(registry: &Registry, n: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name(n), help), labels).expect("valid metric");
    registry
        .register(Box::new(vec.clone()))
        .expect("unique metric");
    vec
}

fn counter(registry: &Registry, n: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name(n), help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, n: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name(n), help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let requests = counter_vec(
            &registry,
            "requests_total",
            "Requests answered, by route form, service, method and status class.",
            &["form", "service", "method", "status"],
        );
        let series = FORMS.len() * SERVICE_LABELS * METHODS.len() * STATUSES.len();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                name("upstream_duration_seconds"),
                "Time from sending a request upstream to its response header.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["form"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(duration.clone()))
            .expect("unique metric");
        let request_bytes = counter_vec(
            &registry,
            "request_bytes_total",
            "Request body bytes received from tasks.",
            &["form"],
        );
        let response_bytes = counter_vec(
            &registry,
            "response_bytes_total",
            "Response body bytes sent to tasks.",
            &["form"],
        );
        let upstream_connections = counter_vec(
            &registry,
            "upstream_connections_total",
            "Upstream connections used, by whether they were reused from the pool.",
            &["reused"],
        );
        let rejected_requests = counter_vec(
            &registry,
            "rejected_requests_total",
            "Requests refused by a limit, by reason.",
            &["reason"],
        );
        let upstream_errors = counter_vec(
            &registry,
            "upstream_errors_total",
            "Requests that failed to reach an upstream, by kind.",
            &["kind"],
        );
        let per_form =
            |v: &IntCounterVec| FORMS.iter().map(|f| v.with_label_values(&[*f])).collect();
        Metrics {
            request_series: (0..series).map(|_| OnceLock::new()).collect(),
            upstream_duration: FORMS[..3]
                .iter()
                .map(|f| duration.with_label_values(&[*f]))
                .collect(),
            request_bytes: per_form(&request_bytes),
            response_bytes: per_form(&response_bytes),
            in_flight: gauge(&registry, "requests_in_flight", "Requests being handled."),
            downstream_connections: gauge(
                &registry,
                "downstream_connections",
                "Open task connections that have sent at least one request.",
            ),
            upstream_connections: [
                upstream_connections.with_label_values(&["false"]),
                upstream_connections.with_label_values(&["true"]),
            ],
            retries: counter(
                &registry,
                "upstream_retries_total",
                "Upstream attempts beyond the first.",
            ),
            rejected_connections: counter(
                &registry,
                "rejected_connections_total",
                "Connections refused by caller admission.",
            ),
            rejected_body_too_large: rejected_requests.with_label_values(&["body_too_large"]),
            rejected_header_too_large: rejected_requests.with_label_values(&["header_too_large"]),
            rejected_path_too_long: rejected_requests.with_label_values(&["path_too_long"]),
            rejected_too_many_connections: rejected_requests
                .with_label_values(&["too_many_connections"]),
            rejected_rate_limited: rejected_requests.with_label_values(&["rate_limited"]),
            rejected_forbidden: rejected_requests.with_label_values(&["forbidden"]),
            rejected_unknown_task: rejected_requests.with_label_values(&["unknown_task"]),
            replay_refused: counter(
                &registry,
                "retry_replay_refused_total",
                "Idempotent requests sent without a replay copy of their body because the \
                 replay budget was in use (not retried after sending).",
            ),
            tasks_registered: gauge(
                &registry,
                "tasks_registered",
                "Tasks registered in shared mode.",
            ),
            rotations: counter(
                &registry,
                "credential_rotations_total",
                "Credential changes (PUT /credentials or adopted from another process).",
            ),
            signing_errors: counter(
                &registry,
                "signing_errors_total",
                "Requests that could not be signed.",
            ),
            upstream_errors: ERROR_KINDS
                .iter()
                .map(|k| upstream_errors.with_label_values(&[*k]))
                .collect(),
            requests,
            registry,
        }
    }

    /// Counts one answered request; `status` 0 means no response was sent.
    pub fn request(&self, labels: Labels, status: u16, bytes_in: u64, bytes_out: u64) {
        let status_idx = match status {
            100..=599 => usize::from(status / 100) - 1,
            _ => 5,
        };
        let idx = ((labels.form * SERVICE_LABELS + labels.service) * METHODS.len() + labels.method)
            * STATUSES.len()
            + status_idx;
        self.request_series[idx]
            .get_or_init(|| {
                self.requests.with_label_values(&[
                    labels.form(),
                    labels.service(),
                    METHODS[labels.method],
                    STATUSES[status_idx],
                ])
            })
            .inc();
        self.request_bytes[labels.form].inc_by(bytes_in);
        self.response_bytes[labels.form].inc_by(bytes_out);
    }

    pub fn upstream_duration(&self, form: Form, seconds: f64) {
        if let Some(h) = self.upstream_duration.get(form as usize) {
            h.observe(seconds);
        }
    }

    pub fn upstream_connection(&self, reused: bool) {
        self.upstream_connections[usize::from(reused)].inc();
    }

    pub fn upstream_error(&self, kind: usize) {
        self.upstream_errors[kind.min(ERROR_KINDS.len() - 1)].inc();
    }

    /// The exposition text, with the certificate expiry of `store` when it is temporary
    /// (single-task mode; shared mode has one certificate per task).
    pub fn render(&self, store: Option<&CredentialStore>) -> String {
        let mut families = self.registry.gather();
        if let Some(expiry_ms) = store.and_then(|s| s.current().certificate_expiry_ms()) {
            let gauge = Gauge::new(
                name("certificate_expiry_seconds"),
                "Seconds until the temporary certificate expires (negative: expired).",
            )
            .expect("valid metric");
            gauge.set(expiry_ms / 1000.0 - now_secs());
            let extra = Registry::new();
            extra.register(Box::new(gauge)).expect("unique metric");
            families.extend(extra.gather());
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("text encoding");
        String::from_utf8(out).unwrap_or_default()
    }
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The process's metrics.
pub static METRICS: Lazy<Metrics> = Lazy::new(Metrics::new);

/// Counts an open task connection for as long as it lives.
pub struct ConnectionGuard;

impl ConnectionGuard {
    pub fn new() -> Arc<Self> {
        METRICS.downstream_connections.inc();
        Arc::new(ConnectionGuard)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        METRICS.downstream_connections.dec();
    }
}

/// Why the proxy is not ready, if it is not.
pub fn not_ready(store: Option<&CredentialStore>) -> Option<String> {
    let expiry_ms = store?.current().certificate_expiry_ms()?;
    let left = expiry_ms / 1000.0 - now_secs();
    (left <= 0.0).then(|| {
        format!(
            "not ready: the temporary certificate expired {:.0} s ago; rotate credentials with PUT /credentials",
            -left
        )
    })
}

/// The side listener: `/metrics`, `/healthz`, `/readyz`.
pub struct MetricsApp {
    pub tenancy: Tenancy,
}

impl MetricsApp {
    fn store(&self) -> Option<&CredentialStore> {
        match &self.tenancy {
            Tenancy::Single(store) => Some(store),
            Tenancy::Shared(_) => None,
        }
    }
}

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let method = &session.req_header().method;
        let known = matches!(path.as_str(), "/metrics" | "/healthz" | "/readyz");
        let (status, content_type, body) = match path.as_str() {
            _ if known && method != http::Method::GET && method != http::Method::HEAD => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET and HEAD\n".to_string(),
            ),
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                METRICS.render(self.store()),
            ),
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            "/readyz" => match not_ready(self.store()) {
                None => (StatusCode::OK, "text/plain", "ready\n".to_string()),
                Some(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", why + "\n"),
            },
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /metrics, /healthz or /readyz\n".to_string(),
            ),
        };
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body.into_bytes())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::Credentials;

    #[test]
    fn labels_are_bounded() {
        let l = Labels::new(Form::Api, Some(b"queue"), "GET");
        assert_eq!(
            (l.form(), l.service(), METHODS[l.method]),
            ("api", "queue", "GET")
        );
        let l = Labels::new(Form::Shortcut, Some(b"made-up-by-a-task"), "BREW");
        assert_eq!((l.service(), METHODS[l.method]), ("other", "OTHER"));
        let l = Labels::new(Form::Bewit, None, "POST");
        assert_eq!(l.service(), "none");
    }

    #[test]
    fn renders_counts_and_expiry() {
        let m = Metrics::new();
        let l = Labels::new(Form::Api, Some(b"auth"), "PUT");
        m.request(l, 204, 10, 20);
        m.request(l, 204, 1, 2);
        m.request(l, 0, 0, 0);
        let perm = CredentialStore::new(&Credentials::new("c", "t", None).unwrap(), None);
        let text = m.render(Some(&perm));
        assert!(text.contains(
            r#"taskcluster_proxy_requests_total{form="api",method="PUT",service="auth",status="2xx"} 2"#
        ), "{text}");
        assert!(text.contains(r#"status="none"} 1"#));
        assert!(text.contains(r#"taskcluster_proxy_request_bytes_total{form="api"} 11"#));
        assert!(!text.contains("certificate_expiry_seconds"));
        assert!(not_ready(Some(&perm)).is_none());

        let cert = r#"{"version":1,"scopes":[],"start":0,"expiry":1000,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"s"}"#;
        let temp = CredentialStore::new(&Credentials::new("c", "t", Some(cert)).unwrap(), None);
        assert!(m
            .render(Some(&temp))
            .contains("taskcluster_proxy_certificate_expiry_seconds -"));
        assert!(not_ready(Some(&temp)).unwrap().contains("expired"));
    }
}
