//! The YAML configuration file: Pingora's server keys at the top level, ours under
//! `taskcluster_proxy:`. Our section is strict (unknown keys and wrong types are errors that
//! name the key and line); Pingora reads the same file for its own keys.

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::limits::{DownstreamTimeouts, Limits, RetryPolicy};
use crate::proxy::Timeouts;

/// The name of our section in the file.
pub const SECTION: &str = "taskcluster_proxy";

#[derive(Debug)]
pub enum ConfError {
    Read(String, std::io::Error),
    Parse(String, String),
    Invalid(String, String),
    CredentialsFile(String, String),
}

impl fmt::Display for ConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read(path, e) => write!(f, "cannot read configuration file {path}: {e}"),
            Self::Parse(path, e) => write!(f, "{path}: {e}"),
            Self::Invalid(path, e) => write!(f, "{path}: {e}"),
            Self::CredentialsFile(path, e) => write!(f, "credentials file {path}: {e}"),
        }
    }
}

impl std::error::Error for ConfError {}

/// The top level: only our section is read here; Pingora's keys are ignored.
#[derive(Deserialize, Default)]
struct File {
    #[serde(default)]
    taskcluster_proxy: Option<Section>,
}

/// `taskcluster_proxy:` as written.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct Section {
    #[serde(default)]
    listen: Vec<ListenEntry>,
    root_url: Option<String>,
    credentials: Option<RawCredentials>,
    credentials_file: Option<PathBuf>,
    authorized_scopes: Option<Vec<String>>,
    task_id: Option<String>,
    state_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    connect_to: Vec<String>,
    log_level: Option<LogLevel>,
    access_log: Option<crate::accesslog::Format>,
    metrics_address: Option<String>,
    #[serde(default)]
    upstream_timeouts: TimeoutsEntry,
    #[serde(default)]
    downstream_timeouts: DownstreamTimeouts,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    retries: RetryPolicy,
    #[serde(default)]
    credentials_endpoint: CredentialsEndpoint,
    #[serde(default)]
    admin_listen: Vec<ListenEntry>,
    hostname_allowlist: Option<Vec<String>>,
    admin_socket: Option<PathBuf>,
    admin_address: Option<String>,
    admin_token_file: Option<PathBuf>,
}

/// Where `PUT /credentials` is accepted.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CredentialsEndpoint {
    /// On the task-facing listeners, like the Go proxy.
    #[default]
    TaskPort,
    /// Only on the `admin_listen` listeners, so a task cannot replace the credentials its own
    /// requests are signed with.
    Admin,
    /// On the task-facing listeners, but only from processes running as root (the worker),
    /// identified by the connection's socket (`SO_PEERCRED`, or the exact TCP 4-tuple).
    Root,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ListenEntry {
    address: Option<String>,
    unix: Option<PathBuf>,
    mode: Option<ModeEntry>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum ModeEntry {
    Number(u32),
    Text(String),
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct TimeoutsEntry {
    connect_seconds: Option<f64>,
    tls_seconds: Option<f64>,
    read_seconds: Option<f64>,
    write_seconds: Option<f64>,
    idle_seconds: Option<f64>,
}

/// Credential fields as found in the file (inline or in `credentials_file`); each may be
/// overridden by a flag or environment variable.
#[derive(Deserialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawCredentials {
    #[serde(alias = "clientId")]
    pub client_id: Option<String>,
    #[serde(alias = "accessToken")]
    pub access_token: Option<String>,
    pub certificate: Option<String>,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// Where the proxy listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listener {
    Tcp(SocketAddr),
    /// Unix socket path and optional permission bits.
    Unix(PathBuf, Option<u32>),
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listener::Tcp(addr) => addr.fmt(f),
            Listener::Unix(path, _) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Our section, validated.
#[derive(Debug, Default)]
pub struct ProxyConfig {
    pub listen: Vec<Listener>,
    pub root_url: Option<String>,
    pub credentials: RawCredentials,
    pub authorized_scopes: Option<Vec<String>>,
    pub task_id: Option<String>,
    pub state_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub connect_to: Vec<String>,
    pub log_level: Option<LogLevel>,
    pub access_log: Option<crate::accesslog::Format>,
    pub metrics_address: Option<SocketAddr>,
    pub timeouts: Timeouts,
    pub downstream_timeouts: DownstreamTimeouts,
    pub limits: Limits,
    pub retries: RetryPolicy,
    pub credentials_endpoint: CredentialsEndpoint,
    pub admin_listen: Vec<Listener>,
    pub hostname_allowlist: Option<Vec<String>>,
    /// Shared mode's admin API listeners and token.
    pub admin_socket: Option<PathBuf>,
    pub admin_address: Option<SocketAddr>,
    pub admin_token_file: Option<PathBuf>,
}

impl ProxyConfig {
    /// Reads and validates our section of the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfError::Read(name.clone(), e))?;
        Self::parse(&name, &text)
    }

    pub fn parse(name: &str, text: &str) -> Result<Self, ConfError> {
        // serde_yaml reports unknown keys and wrong types with the key path and line.
        let file: File = serde_yaml::from_str(text)
            .map_err(|e| ConfError::Parse(name.to_string(), e.to_string()))?;
        let section = file.taskcluster_proxy.unwrap_or_default();
        let invalid = |e: String| ConfError::Invalid(name.to_string(), e);

        let mut listen = Vec::new();
        for (i, entry) in section.listen.into_iter().enumerate() {
            listen
                .push(listener(entry).map_err(|e| invalid(format!("{SECTION}.listen[{i}]: {e}")))?);
        }
        let mut admin_listen = Vec::new();
        for (i, entry) in section.admin_listen.into_iter().enumerate() {
            admin_listen.push(
                listener(entry)
                    .map_err(|e| invalid(format!("{SECTION}.admin_listen[{i}]: {e}")))?,
            );
        }
        if section.credentials_endpoint == CredentialsEndpoint::Admin && admin_listen.is_empty() {
            return Err(invalid(format!(
                "{SECTION}.credentials_endpoint: admin needs at least one admin_listen entry"
            )));
        }
        if let Some(patterns) = &section.hostname_allowlist {
            crate::policy::HostAllowlist::new(patterns)
                .map_err(|e| invalid(format!("{SECTION}.hostname_allowlist: {e}")))?;
        }
        if section.retries.max_attempts == 0 {
            return Err(invalid(format!(
                "{SECTION}.retries.max_attempts: must be at least 1"
            )));
        }
        if section.retries.replay_buffer_bytes > section.retries.replay_budget_bytes {
            return Err(invalid(format!(
                "{SECTION}.retries.replay_buffer_bytes: {} is more than replay_budget_bytes ({}), \
                 so no body could ever be kept for replay",
                section.retries.replay_buffer_bytes, section.retries.replay_budget_bytes
            )));
        }
        let credentials = match (section.credentials, section.credentials_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "{SECTION}: give either credentials or credentials_file, not both"
                )))
            }
            (Some(inline), None) => inline,
            (None, Some(file)) => read_credentials_file(&file)?,
            (None, None) => RawCredentials::default(),
        };
        let t = section.upstream_timeouts;
        let defaults = Timeouts::default();
        let seconds = |key: &str, value: Option<f64>, default: Duration| match value {
            None => Ok(default),
            Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
            Some(s) => Err(invalid(format!(
                "{SECTION}.upstream_timeouts.{key}: {s} is not a number of seconds in (0, 86400]"
            ))),
        };
        let timeouts = Timeouts {
            connect: seconds("connect_seconds", t.connect_seconds, defaults.connect)?,
            total_connect: seconds("tls_seconds", t.tls_seconds, defaults.total_connect)?,
            read: seconds("read_seconds", t.read_seconds, defaults.read)?,
            write: seconds("write_seconds", t.write_seconds, defaults.write)?,
            idle: seconds("idle_seconds", t.idle_seconds, defaults.idle)?,
        };
        Ok(ProxyConfig {
            listen,
            root_url: section.root_url,
            credentials,
            authorized_scopes: section.authorized_scopes,
            task_id: section.task_id,
            state_file: section.state_file,
            ca_file: section.ca_file,
            connect_to: section.connect_to,
            log_level: section.log_level,
            access_log: section.access_log,
            metrics_address: socket_address("metrics_address", section.metrics_address)
                .map_err(invalid)?,
            timeouts,
            downstream_timeouts: section.downstream_timeouts,
            limits: section.limits,
            retries: section.retries,
            credentials_endpoint: section.credentials_endpoint,
            admin_listen,
            hostname_allowlist: section.hostname_allowlist,
            admin_socket: section.admin_socket,
            admin_address: socket_address("admin_address", section.admin_address)
                .map_err(invalid)?,
            admin_token_file: section.admin_token_file,
        })
    }
}

/// An optional `IP:PORT` setting of our section.
fn socket_address(key: &str, value: Option<String>) -> Result<Option<SocketAddr>, String> {
    value
        .map(|a| {
            a.parse::<SocketAddr>()
                .map_err(|_| format!("{SECTION}.{key}: {a:?} is not IP:PORT"))
        })
        .transpose()
}

fn listener(entry: ListenEntry) -> Result<Listener, String> {
    match (entry.address, entry.unix, entry.mode) {
        (Some(addr), None, None) => addr
            .parse::<SocketAddr>()
            .map(Listener::Tcp)
            .map_err(|_| format!("address {addr:?} is not IP:PORT (IPv6 in brackets)")),
        (None, Some(path), mode) => {
            let mode = mode.map(parse_mode).transpose()?;
            Ok(Listener::Unix(path, mode))
        }
        (Some(_), Some(_), _) => Err("give either address or unix, not both".into()),
        (Some(_), None, Some(_)) => Err("mode applies to unix listeners only".into()),
        (None, None, _) => Err("needs address (IP:PORT) or unix (socket path)".into()),
    }
}

/// File permission bits, from an octal string ("0660") or a YAML integer (0660 and 0o660
/// are octal to serde_yaml; a decimal beyond 0o777 is refused).
fn parse_mode(mode: ModeEntry) -> Result<u32, String> {
    let bits = match &mode {
        ModeEntry::Number(n) => Some(*n),
        ModeEntry::Text(t) => {
            let t = t.trim();
            u32::from_str_radix(t.strip_prefix("0o").unwrap_or(t), 8).ok()
        }
    };
    bits.filter(|b| *b <= 0o777).ok_or_else(|| match mode {
        ModeEntry::Number(n) => format!(
            "mode {n} (decimal) is not a permission: write it in octal, e.g. \"0660\" or 0o660"
        ),
        ModeEntry::Text(t) => format!("mode {t:?} is not an octal permission like \"0660\""),
    })
}

/// Reads a file holding secrets, refusing it unless only its owner can read it.
pub fn read_private_file(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "mode {:04o} lets group or others read it; it must not be group/world readable (chmod 600)",
            meta.mode() & 0o7777
        ));
    }
    std::fs::read_to_string(path).map_err(|e| e.to_string())
}

/// Reads `{"clientId","accessToken","certificate"?}` from a file only its owner can read.
fn read_credentials_file(path: &Path) -> Result<RawCredentials, ConfError> {
    let err = |e: String| ConfError::CredentialsFile(path.display().to_string(), e);
    let text = read_private_file(path).map_err(err)?;
    // JSON is YAML, so one parser reads both forms.
    serde_yaml::from_str(&text).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ProxyConfig, String> {
        ProxyConfig::parse("test.yaml", text).map_err(|e| e.to_string())
    }

    #[test]
    fn pingora_keys_are_left_alone_and_section_is_optional() {
        let c = parse("version: 1\nthreads: 4\nsomething_else: [1]\n").unwrap();
        assert!(c.listen.is_empty());
        assert!(c.root_url.is_none());
    }

    #[test]
    fn full_section() {
        let c = parse(
            r#"
version: 1
taskcluster_proxy:
  listen:
    - address: "127.0.0.1:8080"
    - address: "[::1]:8081"
    - unix: /tmp/p.sock
      mode: "0660"
  root_url: https://tc.example.com
  credentials:
    client_id: a
    access_token: b
  authorized_scopes: []
  log_level: debug
  upstream_timeouts:
    read_seconds: 1.5
"#,
        )
        .unwrap();
        assert_eq!(
            c.listen,
            vec![
                Listener::Tcp("127.0.0.1:8080".parse().unwrap()),
                Listener::Tcp("[::1]:8081".parse().unwrap()),
                Listener::Unix("/tmp/p.sock".into(), Some(0o660)),
            ]
        );
        assert_eq!(c.credentials.client_id.as_deref(), Some("a"));
        assert_eq!(c.authorized_scopes, Some(vec![]));
        assert_eq!(c.log_level, Some(LogLevel::Debug));
        assert_eq!(c.timeouts.read, Duration::from_millis(1500));
        assert_eq!(c.timeouts.connect, Timeouts::default().connect);
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_key_and_line() {
        let e = parse("taskcluster_proxy:\n  root_url: x\n  rot_url: y\n").unwrap_err();
        assert!(e.contains("rot_url") && e.contains("line 3"), "{e}");
        let e =
            parse("taskcluster_proxy:\n  upstream_timeouts:\n    conect_seconds: 1\n").unwrap_err();
        assert!(e.contains("conect_seconds") && e.contains("line 3"), "{e}");
        let e = parse("taskcluster_proxy:\n  upstream_timeouts:\n    read_seconds: soon\n")
            .unwrap_err();
        assert!(e.contains("read_seconds") && e.contains("line 3"), "{e}");
        let e = parse("taskcluster_proxy:\n  listen: 5\n").unwrap_err();
        assert!(e.contains("listen") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let c = parse("taskcluster_proxy:\n  listen:\n    - unix: /x\n      mode: 0660\n").unwrap();
        assert_eq!(c.listen, vec![Listener::Unix("/x".into(), Some(0o660))]);
        let e =
            parse("taskcluster_proxy:\n  listen:\n    - unix: /x\n      mode: 660\n").unwrap_err();
        assert!(e.contains("listen[0]") && e.contains("\"0660\""), "{e}");
        let e = parse("taskcluster_proxy:\n  listen:\n    - address: nope\n").unwrap_err();
        assert!(e.contains("listen[0]"), "{e}");
        let e =
            parse("taskcluster_proxy:\n  upstream_timeouts:\n    idle_seconds: -1\n").unwrap_err();
        assert!(e.contains("idle_seconds"), "{e}");
        let e =
            parse("taskcluster_proxy:\n  credentials: {client_id: a}\n  credentials_file: /x\n")
                .unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = parse(
            "taskcluster_proxy:\n  retries:\n    replay_buffer_bytes: 2048\n    replay_budget_bytes: 1024\n",
        )
        .unwrap_err();
        assert!(
            e.contains("replay_buffer_bytes") && e.contains("1024"),
            "{e}"
        );
    }

    #[test]
    fn replay_and_header_deadline_keys() {
        let c = parse(
            "taskcluster_proxy:\n  retries:\n    replay_buffer_bytes: 4096\n    replay_budget_bytes: 8192\n  downstream_timeouts:\n    header_seconds: 5\n",
        )
        .unwrap();
        assert_eq!(c.retries.replay_buffer_bytes, 4096);
        assert_eq!(c.retries.replay_budget_bytes, 8192);
        assert_eq!(c.retries.max_attempts, RetryPolicy::default().max_attempts);
        assert_eq!(c.downstream_timeouts.header_seconds, 5);
        assert_eq!(c.downstream_timeouts.read_seconds, 60);
        let d = parse("taskcluster_proxy: {}\n").unwrap();
        assert_eq!(d.retries.replay_buffer_bytes, 1024 * 1024);
        assert_eq!(d.downstream_timeouts.header_seconds, 30);
    }

    #[test]
    fn credentials_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tcp-conf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("creds.json");
        std::fs::write(&file, r#"{"clientId":"a","accessToken":"b"}"#).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let yaml = format!(
            "taskcluster_proxy:\n  credentials_file: {}\n",
            file.display()
        );
        let e = parse(&yaml).unwrap_err();
        assert!(e.contains("group/world readable"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = parse(&yaml).unwrap();
        assert_eq!(c.credentials.access_token.as_deref(), Some("b"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shared_mode_keys() {
        let c = parse(
            "taskcluster_proxy:\n  admin_socket: /run/p/tasks.sock\n  admin_address: \"127.0.0.1:8081\"\n  admin_token_file: /etc/p/token\n",
        )
        .unwrap();
        assert_eq!(c.admin_socket.unwrap(), Path::new("/run/p/tasks.sock"));
        assert_eq!(c.admin_address.unwrap().port(), 8081);
        assert_eq!(c.admin_token_file.unwrap(), Path::new("/etc/p/token"));
        let e = parse("taskcluster_proxy:\n  admin_address: localhost\n").unwrap_err();
        assert!(e.contains("admin_address"), "{e}");
    }
}
