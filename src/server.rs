//! Server wiring: settings → credential store, state hand-over, upstreams, Pingora server
//! and listeners.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use pingora_core::apps::HttpServerOptions;
use pingora_core::listeners::TcpSocketOptions;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;
use pingora_proxy::http_proxy_service;

use crate::admin::AdminApp;
use crate::cli::{Cli, ConfigError, Settings};
use crate::config::Listener;
use crate::credentials::{CredentialStore, Credentials, Identity};
use crate::limits::{DownstreamTimeouts, RateLimiter, ReplayBudget};
use crate::metrics::MetricsApp;
use crate::policy::HostAllowlist;
use crate::proxy::{Role, TaskclusterProxy, Upstreams};
use crate::registry::Registry;
use crate::resolver::{Resolver, DEFAULT_TTL};
use crate::state::{StateFile, StateWatcher, Stored};
use crate::task::fetch_task_scopes;
use crate::tenancy::Tenancy;
use crate::tls::{self, CaError};

/// Why the proxy could not start; `Display` is the message printed before exiting 1.
#[derive(Debug)]
pub enum StartError {
    Config(ConfigError),
    Ca(CaError),
    Task(String, String),
    Server(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => e.fmt(f),
            Self::Ca(e) => e.fmt(f),
            Self::Task(id, e) => write!(f, "could not fetch taskcluster task '{id}' : {e}"),
            Self::Server(e) => write!(f, "cannot start the server: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        StartError::Config(e)
    }
}

/// Pingora settings when no configuration file is given: one worker thread per core, a
/// keep-alive pool large enough for a shared proxy, a one-minute drain on SIGTERM, and files
/// named after the port so several proxies (one per task, as generic-worker runs them) can
/// share a host.
fn default_server_conf(port: u16) -> Result<ServerConf, StartError> {
    let mut conf =
        ServerConf::new().ok_or_else(|| StartError::Server("default configuration".into()))?;
    conf.threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    conf.upstream_keepalive_pool_size = 1024;
    conf.grace_period_seconds = Some(60);
    conf.graceful_shutdown_timeout_seconds = Some(5);
    conf.pid_file = format!("/tmp/taskcluster-proxy-{port}.pid");
    conf.upgrade_sock = format!("/tmp/taskcluster-proxy-{port}-upgrade.sock");
    Ok(conf)
}

fn server_conf(cli: &Cli, settings: &Settings) -> Result<ServerConf, StartError> {
    match &cli.conf {
        Some(path) => {
            ServerConf::load_from_yaml(path).map_err(|e| StartError::Server(format!("{path}: {e}")))
        }
        None => {
            let port = settings
                .listen
                .iter()
                .find_map(|l| match l {
                    Listener::Tcp(addr) => Some(addr.port()),
                    Listener::Unix(..) => None,
                })
                .unwrap_or(0);
            default_server_conf(port)
        }
    }
}

/// The state file: configured, else beside the upgrade socket when a configuration file is
/// used, else (shared mode) beside the admin socket, whose directory is the operator's.
/// Other command-line runs keep state in memory only (nothing secret written to /tmp).
fn state_path(cli: &Cli, settings: &Settings, conf: &ServerConf) -> Option<PathBuf> {
    let beside = |path: &str| PathBuf::from(format!("{path}.state.json"));
    settings
        .state_file
        .clone()
        .or_else(|| cli.conf.as_ref().map(|_| beside(&conf.upgrade_sock)))
        .or_else(|| {
            let socket = settings.shared.as_ref()?.admin_socket.as_ref()?;
            Some(beside(&socket.to_string_lossy()))
        })
}

/// Serves with validated settings until told to stop. Returns only on a start-up error.
pub fn run(cli: Cli, settings: Settings) -> Result<(), StartError> {
    for warning in &settings.warnings {
        log::warn!("{warning}");
    }
    let conf = server_conf(&cli, &settings)?;
    let ca = match &settings.ca_file {
        Some(path) => Some(tls::roots_with_extra(path).map_err(StartError::Ca)?),
        None => None,
    };
    if cli.test_conf {
        println!("configuration OK");
        return Ok(());
    }
    let upstreams = Arc::new(Upstreams {
        resolver: Resolver::new(settings.connect_to.clone(), DEFAULT_TTL),
        ca,
        timeouts: settings.timeouts,
    });

    let mut scopes = settings.scopes.clone();
    if let (Some(task_id), Some(credentials)) = (&settings.task_id, &settings.credentials) {
        let identity = Identity::new(credentials, None);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StartError::Server(e.to_string()))?;
        let task_scopes = runtime
            .block_on(fetch_task_scopes(
                &upstreams,
                &settings.root_url,
                &identity,
                task_id,
            ))
            .map_err(|e| StartError::Task(task_id.clone(), e.to_string()))?;
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        log::info!("task {task_id} grants {} scopes", task_scopes.len());
        scopes.get_or_insert_with(Vec::new).extend(task_scopes);
    }

    let task_admin_listen: Vec<Listener> = settings
        .shared
        .iter()
        .flat_map(|shared| {
            let socket = shared
                .admin_socket
                .clone()
                .map(|path| Listener::Unix(path, Some(0o600)));
            socket
                .into_iter()
                .chain(shared.admin_address.map(Listener::Tcp))
        })
        .collect();
    if !cli.upgrade {
        ensure_listeners_free(&settings.listen)?;
        ensure_listeners_free(&settings.admin_listen)?;
        ensure_listeners_free(&task_admin_listen)?;
    }
    let state = state_path(&cli, &settings, &conf).map(|p| Arc::new(StateFile::new(p)));
    let tenancy = match &settings.credentials {
        Some(credentials) => Tenancy::Single(Arc::new(initial_credentials(
            &cli,
            credentials,
            scopes,
            state.as_deref(),
        )?)),
        None => Tenancy::Shared(Arc::new(initial_registry(&cli, state.as_deref())?)),
    };

    let opt = Opt {
        upgrade: cli.upgrade,
        daemon: cli.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let hostnames = match &settings.hostname_allowlist {
        None => None,
        Some(patterns) => {
            Some(Arc::new(HostAllowlist::new(patterns).map_err(|e| {
                StartError::Server(format!("hostname_allowlist: {e}"))
            })?))
        }
    };
    let rotation = Arc::new(tokio::sync::Mutex::new(()));
    let admission = settings.admission.clone().map(Arc::new);
    let replay = ReplayBudget::new(settings.retries.replay_budget_bytes);
    let conf = server.configuration.clone();
    // Every proxy service, task-facing or admin, gets the same connection options.
    let proxy_service = |role| {
        let mut service = http_proxy_service(
            &conf,
            TaskclusterProxy {
                root_url: settings.root_url.clone(),
                tenancy: tenancy.clone(),
                upstreams: upstreams.clone(),
                state: state.clone(),
                rotation: rotation.clone(),
                access_log: settings.access_log,
                limits: settings.limits,
                retries: settings.retries,
                replay: replay.clone(),
                downstream: settings.downstream_timeouts,
                rate: RateLimiter::new(settings.limits.requests_per_second_per_client),
                role,
                credentials_endpoint: settings.credentials_endpoint,
                hostnames: hostnames.clone(),
                // Unix-socket callers of the task listeners are checked per request.
                admission: admission.clone().filter(|_| role == Role::Task),
            },
        );
        if let Some(proxy) = service.app_logic_mut() {
            proxy.server_options = Some(server_options(&settings.downstream_timeouts));
        }
        service
    };
    let mut service = proxy_service(Role::Task);
    add_listeners(&mut service, &settings.listen, "tasks");
    if let Some(admission) = &admission {
        // TCP callers are checked when accepted, before anything is read; rejected
        // connections are closed without a response.
        service.set_connection_filter(admission.clone());
        log::info!(
            "admitting callers running as root or {} (UID {}){}",
            admission.user(),
            admission.allowed_uid(),
            match admission.network() {
                Some((addr, bits)) =>
                    format!(", or from {addr}/{bits} when their socket is not visible"),
                None => String::new(),
            }
        );
    }
    if let (Some(shared), Tenancy::Shared(registry)) = (&settings.shared, &tenancy) {
        let mut admin = Service::new(
            "admin API".to_string(),
            AdminApp {
                registry: registry.clone(),
                state: state.clone(),
                token: shared.admin_token.clone(),
            },
        );
        add_listeners(&mut admin, &task_admin_listen, "task admin API");
        if shared.admin_address.is_some_and(|a| !a.ip().is_loopback()) {
            log::warn!(
                "the task admin API listens on a non-loopback address; only its bearer token \
                 protects every task's credentials"
            );
        }
        if state.is_none() {
            log::warn!(
                "shared mode without a state file: the task registry will not survive an \
                 upgrade (-u); set state_file, use -c, or use --admin-socket"
            );
        }
        log::info!(
            "shared mode: {} tasks registered{}",
            registry.len(),
            if shared.admin_token.is_some() {
                "; admin requests need the bearer token"
            } else {
                ""
            }
        );
        server.add_service(admin);
    }
    if !settings.admin_listen.is_empty() {
        let mut admin = proxy_service(Role::Admin);
        add_listeners(&mut admin, &settings.admin_listen, "PUT /credentials");
        server.add_service(admin);
    }
    log::info!(
        "taskcluster-proxy {} serving {}",
        crate::VERSION,
        settings.root_url
    );
    server.add_service(service);
    if let Some(addr) = settings.metrics_address {
        let mut metrics = Service::new(
            "metrics".to_string(),
            MetricsApp {
                tenancy: tenancy.clone(),
            },
        );
        metrics.add_tcp(&addr.to_string());
        log::info!("metrics, /healthz and /readyz on {addr}");
        server.add_service(metrics);
    }
    if let Some(state) = state {
        log::info!("state hand-over file: {}", state.path().display());
        server.add_service(background_service(
            "state watcher",
            StateWatcher { state, tenancy },
        ));
    }
    server.run_forever()
}

/// Connection-level HTTP options: the total request-header deadline (carried Pingora patch,
/// see vendor/README.md).
fn server_options(timeouts: &DownstreamTimeouts) -> HttpServerOptions {
    let mut options = HttpServerOptions::default();
    options.header_read_timeout = (timeouts.header_seconds > 0)
        .then(|| std::time::Duration::from_secs(timeouts.header_seconds));
    options
}

fn add_listeners<A>(service: &mut Service<A>, listeners: &[Listener], purpose: &str) {
    for listener in listeners {
        match listener {
            Listener::Tcp(addr) => {
                let mut options = TcpSocketOptions::default();
                if addr.is_ipv6() && addr.ip().is_unspecified() {
                    // `[::]` serves IPv4 too, like Go's ":port".
                    options.ipv6_only = Some(false);
                }
                service.add_tcp_with_settings(&addr.to_string(), options);
            }
            // Owner-only unless configured: the socket signs requests with our credentials.
            Listener::Unix(path, mode) => service.add_uds(
                &path.to_string_lossy(),
                Some(std::fs::Permissions::from_mode(mode.unwrap_or(0o600))),
            ),
        }
        log::info!("listening on {listener} ({purpose})");
    }
}

/// Fails fast when a listen address is taken, typically by a running instance: without this
/// a second start would wait in Pingora's bind retries and, meanwhile, record its configured
/// credentials as the state the running instance adopts. Upgrades use `-u` instead.
fn ensure_listeners_free(listeners: &[Listener]) -> Result<(), StartError> {
    for listener in listeners {
        let taken = match listener {
            Listener::Tcp(addr) => std::net::TcpListener::bind(addr)
                .err()
                .filter(|e| e.kind() == std::io::ErrorKind::AddrInUse)
                .map(|e| e.to_string()),
            Listener::Unix(path, _) => std::os::unix::net::UnixStream::connect(path)
                .ok()
                .map(|_| "a process is accepting connections on it".to_string()),
        };
        if let Some(why) = taken {
            return Err(StartError::Server(format!(
                "cannot listen on {listener}: {why}; is another taskcluster-proxy running? \
                 To replace it without downtime, start this one with -u and send SIGQUIT to the old one"
            )));
        }
    }
    Ok(())
}

/// The credentials to start with: when taking over from a running process, the state it
/// handed over; otherwise the configured ones, recorded as the new state.
fn initial_credentials(
    cli: &Cli,
    configured: &Credentials,
    scopes: Option<Vec<String>>,
    state: Option<&StateFile>,
) -> Result<CredentialStore, StartError> {
    let Some(state) = state else {
        return Ok(CredentialStore::new(configured, scopes));
    };
    if cli.upgrade {
        match state.load() {
            Ok(Some(Stored::Single((credentials, scopes)))) => {
                log::info!(
                    "taking over credentials of clientId {} from {}",
                    credentials.client_id,
                    state.path().display()
                );
                return Ok(CredentialStore::new(&credentials, scopes));
            }
            Ok(Some(Stored::Shared(_))) => log::warn!(
                "{} holds a shared-mode task registry: using the configured credentials",
                state.path().display()
            ),
            Ok(None) => log::warn!(
                "upgrade without a state file at {}: using the configured credentials",
                state.path().display()
            ),
            Err(e) => log::error!("{e}; using the configured credentials"),
        }
    }
    state
        .persist(configured, scopes.as_deref())
        .map_err(|e| StartError::Server(e.to_string()))?;
    Ok(CredentialStore::new(configured, scopes))
}

/// The task registry to start shared mode with: when taking over from a running process,
/// the one it handed over; otherwise empty, recorded as the new state.
fn initial_registry(cli: &Cli, state: Option<&StateFile>) -> Result<Registry, StartError> {
    let registry = Registry::new();
    let Some(state) = state else {
        return Ok(registry);
    };
    if cli.upgrade {
        match state.load() {
            Ok(Some(Stored::Shared(tasks))) => {
                registry.adopt(tasks);
                log::info!(
                    "taking over {} registered tasks from {}",
                    registry.len(),
                    state.path().display()
                );
                return Ok(registry);
            }
            Ok(Some(Stored::Single(_))) => log::warn!(
                "{} holds single-task credentials: starting with no tasks",
                state.path().display()
            ),
            Ok(None) => log::warn!(
                "upgrade without a state file at {}: starting with no tasks",
                state.path().display()
            ),
            Err(e) => log::error!("{e}; starting with no tasks"),
        }
    }
    state
        .persist_tasks(Vec::new())
        .map_err(|e| StartError::Server(e.to_string()))?;
    Ok(registry)
}
