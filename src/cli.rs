//! Command line: the Go proxy's options and messages (wire spec §6), plus Pingora's server
//! options under names that do not clash with `-t/--task-id`.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::accesslog;
use crate::admin::AdminToken;
use crate::admission::Admission;
use crate::config::{
    ConfError, CredentialsEndpoint, Listener, LogLevel, ProxyConfig, RawCredentials,
};
use crate::credentials::{Credentials, CredentialsError};
use crate::limits::{DownstreamTimeouts, Limits, RetryPolicy};
use crate::proxy::Timeouts;
use crate::resolver::ConnectTo;
use crate::url::{RootUrl, UrlError};

#[derive(Parser, Debug, Default)]
#[command(
    name = "taskcluster-proxy",
    about = "Signs a task's Taskcluster API requests with credentials the task never sees.",
    disable_version_flag = true,
    args_override_self = true
)]
pub struct Cli {
    /// Port to listen on [default: 8080]. With -i, replaces the configuration file's listeners.
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    pub port: Option<String>,
    /// IPv4 or IPv6 address to listen on [default: all interfaces].
    #[arg(short = 'i', long = "ip-address", value_name = "ADDRESS")]
    pub ip_address: Option<String>,
    /// Restrict requests to the scopes of this task (fetched from the queue at start-up).
    #[arg(short = 't', long = "task-id", value_name = "TASK_ID")]
    pub task_id: Option<String>,
    /// Taskcluster root URL [env: TASKCLUSTER_ROOT_URL].
    #[arg(long = "root-url", value_name = "URL")]
    pub root_url: Option<String>,
    /// Client ID [env: TASKCLUSTER_CLIENT_ID].
    #[arg(
        long = "client-id",
        value_name = "CLIENT_ID",
        allow_hyphen_values = true
    )]
    pub client_id: Option<String>,
    /// Access token [env: TASKCLUSTER_ACCESS_TOKEN]; prefer the environment, argv is public.
    #[arg(
        long = "access-token",
        value_name = "TOKEN",
        allow_hyphen_values = true
    )]
    pub access_token: Option<String>,
    /// Temporary-credential certificate JSON [env: TASKCLUSTER_CERTIFICATE].
    #[arg(long = "certificate", value_name = "JSON", allow_hyphen_values = true)]
    pub certificate: Option<String>,
    /// OS user allowed to connect (root is always allowed).
    #[arg(long = "allowed-user", value_name = "USERNAME")]
    pub allowed_user: Option<String>,
    /// CIDR admitted when the peer's socket cannot be seen (e.g. a container network).
    #[arg(long = "allowed-network", value_name = "CIDR")]
    pub allowed_network: Option<String>,
    /// Extra CA certificates (PEM) trusted for upstream TLS, on top of the system roots.
    #[arg(long = "ca-file", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// Connect to ADDR:PORT whenever HOST:PORT is the upstream (curl semantics); repeatable.
    #[arg(long = "connect-to", value_name = "HOST:PORT:ADDR:PORT")]
    pub connect_to: Vec<String>,
    /// Serve /metrics, /healthz and /readyz on this separate address (never the task port).
    #[arg(long = "metrics-address", value_name = "HOST:PORT")]
    pub metrics_address: Option<SocketAddr>,
    /// Access log format: text, json or off [default: text].
    #[arg(long = "access-log", value_name = "FORMAT")]
    pub access_log: Option<accesslog::Format>,
    /// Shared mode: serve the task admin API on this Unix socket (mode 0600).
    #[arg(long = "admin-socket", value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Shared mode: serve the task admin API on this TCP address (needs --admin-token-file).
    #[arg(long = "admin-address", value_name = "HOST:PORT")]
    pub admin_address: Option<SocketAddr>,
    /// File holding the bearer token every admin API request must carry (mode 0600).
    #[arg(long = "admin-token-file", value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    /// Configuration file (YAML): Pingora's server keys and a `taskcluster_proxy:` section.
    #[arg(short = 'c', long = "conf", value_name = "PATH")]
    pub conf: Option<String>,
    /// Run in the background.
    #[arg(short = 'd', long = "daemon")]
    pub daemon: bool,
    /// Take over the listening sockets of a running instance (zero-downtime upgrade).
    #[arg(short = 'u', long = "upgrade")]
    pub upgrade: bool,
    /// Validate the configuration and exit.
    #[arg(long = "test-conf")]
    pub test_conf: bool,
    /// Print the version and exit.
    #[arg(long = "version")]
    pub version: bool,
    /// Print only the version number and exit.
    #[arg(long = "short-version")]
    pub short_version: bool,
    /// Scopes to restrict requests to (authorizedScopes).
    #[arg(value_name = "SCOPE")]
    pub scopes: Vec<String>,
}

/// Validated start-up settings.
#[derive(Debug)]
pub struct Settings {
    pub listen: Vec<Listener>,
    pub root_url: RootUrl,
    /// The credentials requests are signed with; `None` in shared mode (each task has its own).
    pub credentials: Option<Credentials>,
    /// Shared mode (one proxy, many tasks), when an admin API is configured.
    pub shared: Option<SharedSettings>,
    /// Positional scopes, else the file's; `authorizedScopes` is these plus the task's scopes,
    /// or absent when there are neither.
    pub scopes: Option<Vec<String>>,
    pub task_id: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub connect_to: Vec<ConnectTo>,
    pub state_file: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub log_level: Option<LogLevel>,
    pub access_log: accesslog::Format,
    pub metrics_address: Option<SocketAddr>,
    pub downstream_timeouts: DownstreamTimeouts,
    pub limits: Limits,
    pub retries: RetryPolicy,
    pub credentials_endpoint: CredentialsEndpoint,
    pub admin_listen: Vec<Listener>,
    pub hostname_allowlist: Option<Vec<String>>,
    /// Caller admission (`--allowed-user`, `--allowed-network`); `None` admits everyone.
    pub admission: Option<Admission>,
    /// Problems worth a warning once logging is set up.
    pub warnings: Vec<String>,
}

/// The admin API of shared mode.
#[derive(Debug)]
pub struct SharedSettings {
    pub admin_socket: Option<PathBuf>,
    pub admin_address: Option<SocketAddr>,
    pub admin_token: Option<AdminToken>,
}

/// A fatal start-up problem; `Display` is the message printed before exiting 1.
#[derive(Debug)]
pub enum ConfigError {
    PortSyntax(String),
    PortRange(i64),
    IpAddress(String),
    NetworkSyntax(String, String),
    NetworkTooBroad(String, u8),
    MissingRootUrl,
    InvalidRootUrl(String, UrlError),
    MissingClientId,
    MissingAccessToken,
    Credentials(CredentialsError),
    Verifier(String),
    ConnectTo(String),
    File(ConfError),
    Shared(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PortSyntax(p) => write!(f, "strconv.Atoi: parsing {p:?}: invalid syntax"),
            Self::PortRange(p) => write!(f, "port {p} is not in range [0,65535]"),
            Self::IpAddress(ip) => write!(
                f,
                "invalid IPv4/IPv6 address specified - cannot parse: {ip}"
            ),
            Self::NetworkSyntax(v, e) => write!(f, "invalid --allowed-network CIDR {v:?}: {e}"),
            Self::NetworkTooBroad(v, bits) => write!(
                f,
                "--allowed-network CIDR {v:?} is too broad (0/{bits} allows all addresses)"
            ),
            Self::MissingRootUrl => f.write_str(
                "Root URL must be passed via environment variable TASKCLUSTER_ROOT_URL or command line option --root-url",
            ),
            Self::InvalidRootUrl(url, e) => write!(f, "invalid root URL {url:?}: {e}"),
            Self::MissingClientId => f.write_str(
                "Client ID must be passed via environment variable TASKCLUSTER_CLIENT_ID or command line option --client-id",
            ),
            Self::MissingAccessToken => f.write_str(
                "Access token must be passed via environment variable TASKCLUSTER_ACCESS_TOKEN or command line option --access-token",
            ),
            Self::Credentials(e) => write!(f, "invalid credentials: {e}"),
            Self::Verifier(e) => write!(f, "Failed to create connection verifier: {e}"),
            Self::ConnectTo(e) => f.write_str(e),
            Self::File(e) => e.fmt(f),
            Self::Shared(e) => write!(f, "shared mode: {e}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Flag, else environment variable, else configuration file; empty values do not count
/// (a flag wins over its environment variable only when non-empty, as in the Go proxy).
fn first_set(flag: &Option<String>, var: &str, file: &Option<String>) -> Option<String> {
    let set = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
    set(flag)
        .or_else(|| set(&std::env::var(var).ok()))
        .or_else(|| set(file))
}

impl Cli {
    /// Reads the configuration file (if any) and validates everything in the Go proxy's
    /// order (spec §6.2), so the first error reported matches. Precedence for each setting:
    /// flag, environment variable, configuration file, default.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let file = match &self.conf {
            Some(path) => ProxyConfig::load(Path::new(path)).map_err(ConfigError::File)?,
            None => ProxyConfig::default(),
        };
        let listen = if self.port.is_some() || self.ip_address.is_some() || file.listen.is_empty() {
            let port = parse_port(self.port.as_deref().unwrap_or("8080"))?;
            vec![Listener::Tcp(listen_address(
                self.ip_address.as_deref().unwrap_or(""),
                port,
            )?)]
        } else {
            file.listen.clone()
        };
        if let Some(network) = &self.allowed_network {
            parse_cidr(network)?;
        }
        let root_text = first_set(&self.root_url, "TASKCLUSTER_ROOT_URL", &file.root_url)
            .ok_or(ConfigError::MissingRootUrl)?;
        let root_url = RootUrl::parse(&root_text)
            .map_err(|e| ConfigError::InvalidRootUrl(root_text.clone(), e))?;
        let shared = self.shared_settings(&file)?;
        let scopes = if self.scopes.is_empty() {
            file.authorized_scopes.clone()
        } else {
            Some(self.scopes.clone())
        };
        let task_id = self
            .task_id
            .clone()
            .or(file.task_id.clone())
            .filter(|t| !t.is_empty());
        let mut warnings = Vec::new();
        let credentials = match &shared {
            None => Some(self.credentials(&file, &mut warnings)?),
            Some(_) => {
                let given = self.credentials_on_command_line()
                    || file.credentials != RawCredentials::default();
                if given {
                    warnings.push(
                        "shared mode: the configured credentials are not used; each task's \
                         credentials come with its registration (PUT /tasks/{taskId})"
                            .to_string(),
                    );
                }
                None
            }
        };
        let admission = if self.allowed_user.is_some() || self.allowed_network.is_some() {
            match self.allowed_user.as_deref() {
                None | Some("") => {
                    return Err(ConfigError::Verifier(
                        "--allowed-network requires --allowed-user".into(),
                    ))
                }
                Some(user) => {
                    let network = self
                        .allowed_network
                        .as_deref()
                        .map(parse_cidr)
                        .transpose()?;
                    let tcp = listen.iter().filter_map(|l| match l {
                        Listener::Tcp(addr) => Some(*addr),
                        Listener::Unix(..) => None,
                    });
                    let admission = Admission::new(user, network)
                        .map_err(ConfigError::Verifier)?
                        .listening_on(tcp);
                    if admission
                        .listeners()
                        .iter()
                        .any(|a| a.ip().is_unspecified())
                    {
                        warnings.push(
                            "--allowed-user with a wildcard listen address: each new connection \
                             is checked by reading /proc/net/tcp (milliseconds, while accepting); \
                             listen on specific addresses (-i) for exact lookups"
                                .to_string(),
                        );
                    }
                    Some(admission)
                }
            }
        } else {
            None
        };
        let connect_to = if self.connect_to.is_empty() {
            &file.connect_to
        } else {
            &self.connect_to
        };
        let connect_to = connect_to
            .iter()
            .map(|c| c.parse().map_err(ConfigError::ConnectTo))
            .collect::<Result<_, _>>()?;
        Ok(Settings {
            listen,
            root_url,
            credentials,
            shared,
            scopes,
            task_id,
            ca_file: self.ca_file.clone().or(file.ca_file),
            connect_to,
            state_file: file.state_file,
            timeouts: file.timeouts,
            log_level: file.log_level,
            access_log: self.access_log.or(file.access_log).unwrap_or_default(),
            metrics_address: self.metrics_address.or(file.metrics_address),
            downstream_timeouts: file.downstream_timeouts,
            limits: file.limits,
            retries: file.retries,
            credentials_endpoint: file.credentials_endpoint,
            admin_listen: file.admin_listen,
            hostname_allowlist: file.hostname_allowlist,
            admission,
            warnings,
        })
    }

    /// The single-task credentials. Credentials are one unit: flags and environment
    /// (combined per field, as in the Go proxy) when any of them is set, else the file.
    fn credentials(
        &self,
        file: &ProxyConfig,
        warnings: &mut Vec<String>,
    ) -> Result<Credentials, ConfigError> {
        // Mixing a token from the environment with a certificate from the file would sign
        // with a mismatched set.
        let from_file = if self.credentials_on_command_line() {
            RawCredentials::default()
        } else {
            file.credentials.clone()
        };
        let client_id = first_set(
            &self.client_id,
            "TASKCLUSTER_CLIENT_ID",
            &from_file.client_id,
        )
        .ok_or(ConfigError::MissingClientId)?;
        let access_token = first_set(
            &self.access_token,
            "TASKCLUSTER_ACCESS_TOKEN",
            &from_file.access_token,
        )
        .ok_or(ConfigError::MissingAccessToken)?;
        let certificate = first_set(
            &self.certificate,
            "TASKCLUSTER_CERTIFICATE",
            &from_file.certificate,
        );
        if certificate.is_none() {
            warnings.push("no certificate given: assuming permanent credentials".to_string());
        }
        if self.access_token.as_deref().is_some_and(|t| !t.is_empty()) {
            warnings.push(
                "--access-token is visible to every local user in the process list; \
                 prefer TASKCLUSTER_ACCESS_TOKEN or a credentials file"
                    .to_string(),
            );
        }
        Credentials::new(&client_id, &access_token, certificate.as_deref())
            .map_err(ConfigError::Credentials)
    }

    /// Whether any credential is given by flag or environment variable.
    fn credentials_on_command_line(&self) -> bool {
        let none = None;
        [
            (&self.client_id, "TASKCLUSTER_CLIENT_ID"),
            (&self.access_token, "TASKCLUSTER_ACCESS_TOKEN"),
            (&self.certificate, "TASKCLUSTER_CERTIFICATE"),
        ]
        .iter()
        .any(|(flag, var)| first_set(flag, var, &none).is_some())
    }

    /// The admin API settings when shared mode is configured, checked for settings that
    /// only make sense for a single task.
    fn shared_settings(&self, file: &ProxyConfig) -> Result<Option<SharedSettings>, ConfigError> {
        let admin_socket = self.admin_socket.clone().or(file.admin_socket.clone());
        let admin_address = self.admin_address.or(file.admin_address);
        let token_file = self
            .admin_token_file
            .clone()
            .or(file.admin_token_file.clone());
        if admin_socket.is_none() && admin_address.is_none() {
            if token_file.is_some() {
                return Err(ConfigError::Shared(
                    "--admin-token-file needs --admin-socket or --admin-address".into(),
                ));
            }
            return Ok(None);
        }
        let bad = |e: &str| Err(ConfigError::Shared(e.to_string()));
        if admin_address.is_some() && token_file.is_none() {
            return bad("--admin-address (admin_address) needs --admin-token-file (admin_token_file): a TCP admin API must require a token");
        }
        if !self.scopes.is_empty() || file.authorized_scopes.is_some() {
            return bad("authorized scopes are per task (PUT /tasks/{taskId} \"authorizedScopes\"); remove the scopes from the command line or configuration");
        }
        if self.task_id.as_deref().is_some_and(|t| !t.is_empty()) || file.task_id.is_some() {
            return bad(
                "--task-id (task_id) does not apply: register each task through the admin API",
            );
        }
        if !file.admin_listen.is_empty()
            || file.credentials_endpoint != CredentialsEndpoint::TaskPort
        {
            return bad("admin_listen and credentials_endpoint are for single-task mode; tasks' credentials are rotated through the admin API");
        }
        let admin_token = token_file
            .map(|path| AdminToken::from_file(&path))
            .transpose()
            .map_err(|e| ConfigError::Shared(e.to_string()))?;
        Ok(Some(SharedSettings {
            admin_socket,
            admin_address,
            admin_token,
        }))
    }

    /// `--version` text: `Taskcluster proxy <ver>[ (git revision <rev>)]`.
    pub fn version_text() -> String {
        if crate::REVISION.is_empty() {
            format!("Taskcluster proxy {}", crate::VERSION)
        } else {
            format!(
                "Taskcluster proxy {} (git revision {})",
                crate::VERSION,
                crate::REVISION
            )
        }
    }
}

fn parse_port(text: &str) -> Result<u16, ConfigError> {
    let value: i64 = text
        .parse()
        .map_err(|_| ConfigError::PortSyntax(text.to_string()))?;
    u16::try_from(value).map_err(|_| ConfigError::PortRange(value))
}

/// Empty address means every interface: dual-stack `[::]` where IPv6 exists, else `0.0.0.0`.
fn listen_address(ip: &str, port: u16) -> Result<SocketAddr, ConfigError> {
    if ip.is_empty() {
        let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);
        let ip = if TcpListener::bind(any6).is_ok() {
            any6.ip()
        } else {
            IpAddr::from([0, 0, 0, 0])
        };
        return Ok(SocketAddr::new(ip, port));
    }
    let bare = ip.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = bare
        .parse()
        .map_err(|_| ConfigError::IpAddress(ip.to_string()))?;
    Ok(SocketAddr::new(ip, port))
}

/// Parses `addr/prefix`, refusing `/0`, which would admit everyone.
pub fn parse_cidr(text: &str) -> Result<(IpAddr, u8), ConfigError> {
    let err = |e: &str| ConfigError::NetworkSyntax(text.to_string(), e.to_string());
    let (addr, bits) = text
        .split_once('/')
        .ok_or_else(|| err("missing /prefix length"))?;
    let addr: IpAddr = addr.parse().map_err(|_| err("invalid IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let bits: u8 = bits
        .parse()
        .ok()
        .filter(|b| *b <= max)
        .ok_or_else(|| err("invalid prefix length"))?;
    if bits == 0 {
        return Err(ConfigError::NetworkTooBroad(text.to_string(), max));
    }
    Ok((addr, bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut full = vec!["taskcluster-proxy"];
        full.extend_from_slice(args);
        Cli::parse_from(full)
    }

    fn error(args: &[&str]) -> String {
        cli(args).settings().unwrap_err().to_string()
    }

    const CREDS: [&str; 6] = [
        "--root-url",
        "https://tc.example.com",
        "--client-id",
        "c",
        "--access-token",
        "t",
    ];

    #[test]
    fn defaults_and_positional_scopes() {
        let c = cli(&["-t", "abc", "scope:a", "scope:b"]);
        assert_eq!(c.task_id.as_deref(), Some("abc"));
        assert_eq!(c.scopes, ["scope:a", "scope:b"]);
        let s = cli(&CREDS).settings().unwrap();
        match s.listen.as_slice() {
            [Listener::Tcp(addr)] => {
                assert_eq!(addr.port(), 8080);
                assert!(addr.ip().is_unspecified());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.scopes, None);
    }

    #[test]
    fn go_messages_in_go_order() {
        assert_eq!(
            error(&["-p", "abc"]),
            r#"strconv.Atoi: parsing "abc": invalid syntax"#
        );
        assert_eq!(
            error(&["-p", "70000"]),
            "port 70000 is not in range [0,65535]"
        );
        assert_eq!(
            error(&["-i", "nope"]),
            "invalid IPv4/IPv6 address specified - cannot parse: nope"
        );
        assert_eq!(
            error(&["--allowed-network", "10.0.0.0/0"]),
            r#"--allowed-network CIDR "10.0.0.0/0" is too broad (0/32 allows all addresses)"#
        );
        assert!(
            error(&["--allowed-network", "10.0.0.0"]).starts_with("invalid --allowed-network CIDR")
        );
        assert!(error(&["-i", "127.0.0.1"]).starts_with("Root URL must be passed"));
    }

    #[test]
    fn tokens_may_start_with_a_hyphen() {
        let c = cli(&["--access-token", "-AGSx", "--client-id", "-c", "scope"]);
        assert_eq!(c.access_token.as_deref(), Some("-AGSx"));
        assert_eq!(c.client_id.as_deref(), Some("-c"));
        assert_eq!(c.scopes, ["scope"]);
    }

    #[test]
    fn ipv6_listen_address() {
        let mut args = vec!["-i", "::1", "-p", "9000"];
        args.extend_from_slice(&CREDS);
        assert_eq!(
            cli(&args).settings().unwrap().listen,
            vec![Listener::Tcp("[::1]:9000".parse().unwrap())]
        );
        let mut args = vec!["-i", "[::1]"];
        args.extend_from_slice(&CREDS);
        assert!(cli(&args).settings().is_ok());
    }

    #[test]
    fn admission_flags() {
        let mut args = CREDS.to_vec();
        args.extend_from_slice(&["-i", "127.0.0.1", "-p", "9000", "--allowed-user", "root"]);
        let admission = cli(&args).settings().unwrap().admission.unwrap();
        assert_eq!((admission.user(), admission.allowed_uid()), ("root", 0));
        assert_eq!(admission.listeners(), ["127.0.0.1:9000".parse().unwrap()]);
        assert_eq!(admission.network(), None);
        args.extend_from_slice(&["--allowed-network", "10.1.2.3/8"]);
        let admission = cli(&args).settings().unwrap().admission.unwrap();
        assert_eq!(admission.network(), Some(("10.1.2.3".parse().unwrap(), 8)));
        assert!(cli(&CREDS).settings().unwrap().admission.is_none());
        let mut args = CREDS.to_vec();
        args.extend_from_slice(&["--allowed-network", "10.0.0.0/8"]);
        assert_eq!(
            cli(&args).settings().unwrap_err().to_string(),
            "Failed to create connection verifier: --allowed-network requires --allowed-user"
        );
        let mut args = CREDS.to_vec();
        args.extend_from_slice(&["--allowed-user", "no-such-user-here"]);
        assert_eq!(
            cli(&args).settings().unwrap_err().to_string(),
            "Failed to create connection verifier: user: unknown user no-such-user-here"
        );
    }

    #[test]
    fn bad_certificate_refused_at_start() {
        let mut args = CREDS.to_vec();
        args.extend_from_slice(&["--certificate", "{not json"]);
        assert!(error(&args).starts_with("invalid credentials: invalid certificate"));
    }

    #[test]
    fn shared_mode_settings() {
        let root = ["--root-url", "https://tc.example.com"];
        let mut args = root.to_vec();
        args.extend_from_slice(&["--admin-socket", "/tmp/admin.sock"]);
        let s = cli(&args).settings().unwrap();
        assert!(s.credentials.is_none(), "no credentials needed");
        let shared = s.shared.unwrap();
        assert_eq!(shared.admin_socket.unwrap(), Path::new("/tmp/admin.sock"));
        assert!(shared.admin_token.is_none());

        // Credentials given anyway are ignored, with a warning.
        let mut with_creds = args.clone();
        with_creds.extend_from_slice(&["--client-id", "c", "--access-token", "t"]);
        let s = cli(&with_creds).settings().unwrap();
        assert!(s.credentials.is_none());
        assert!(s.warnings.iter().any(|w| w.contains("not used")));

        let mut scoped = args.clone();
        scoped.push("queue:*");
        assert!(error(&scoped).contains("per task"));
        let mut task = args.clone();
        task.extend_from_slice(&["-t", "abc"]);
        assert!(error(&task).contains("--task-id"));

        let mut tcp = root.to_vec();
        tcp.extend_from_slice(&["--admin-address", "127.0.0.1:9"]);
        assert!(error(&tcp).contains("--admin-token-file"));

        let dir = std::env::temp_dir().join(format!("tcp-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, "0123456789abcdef0123\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = token_file.to_string_lossy().into_owned();
        tcp.extend_from_slice(&["--admin-token-file", &path]);
        assert!(error(&tcp).contains("chmod 600"));
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let shared = cli(&tcp).settings().unwrap().shared.unwrap();
        assert!(shared
            .admin_token
            .unwrap()
            .accepts(Some(b"Bearer 0123456789abcdef0123")));
        std::fs::remove_dir_all(&dir).unwrap();

        // Without admin listeners a token file is a mistake, not a silent no-op.
        let mut stray = CREDS.to_vec();
        stray.extend_from_slice(&["--admin-token-file", "/nonexistent"]);
        assert!(error(&stray).contains("needs --admin-socket"));
    }
}
