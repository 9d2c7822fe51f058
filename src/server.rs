//! Server wiring: settings → credential store, upstreams, Pingora server and listener.

use std::fmt;
use std::sync::Arc;

use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_proxy::http_proxy_service;

use crate::cli::{Cli, ConfigError};
use crate::credentials::{CredentialStore, Identity};
use crate::proxy::{TaskclusterProxy, Timeouts, Upstreams};
use crate::resolver::{Resolver, DEFAULT_TTL};
use crate::task::fetch_task_scopes;
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

/// Pingora settings when no `--conf` file is given: one worker thread per core and a
/// keep-alive pool large enough for a shared proxy, files named after the port so several
/// proxies (one per task, as generic-worker runs them) can share a host.
fn default_server_conf(port: u16) -> Result<ServerConf, StartError> {
    let mut conf =
        ServerConf::new().ok_or_else(|| StartError::Server("default configuration".into()))?;
    conf.threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    conf.upstream_keepalive_pool_size = 1024;
    conf.pid_file = format!("/tmp/taskcluster-proxy-{port}.pid");
    conf.upgrade_sock = format!("/tmp/taskcluster-proxy-{port}-upgrade.sock");
    Ok(conf)
}

/// Validates everything, then serves until told to stop. Returns only on a start-up error.
pub fn run(cli: Cli) -> Result<(), StartError> {
    let settings = cli.settings()?;
    let ca = match &settings.ca_file {
        Some(path) => Some(tls::roots_with_extra(path).map_err(StartError::Ca)?),
        None => None,
    };
    let upstreams = Arc::new(Upstreams {
        resolver: Resolver::new(settings.connect_to.clone(), DEFAULT_TTL),
        ca,
        timeouts: Timeouts::default(),
    });

    let mut scopes = settings.scopes.clone();
    if let (Some(task_id), false) = (&settings.task_id, cli.test_conf) {
        let identity = Identity::new(&settings.credentials, None);
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
        scopes.extend(task_scopes);
    }
    // No task and no positional scopes: the credentials' full power (authorizedScopes absent).
    let authorized_scopes = (settings.task_id.is_some() || !scopes.is_empty()).then_some(scopes);
    let credentials = Arc::new(CredentialStore::new(
        &settings.credentials,
        authorized_scopes,
    ));

    let conf = match &cli.conf {
        Some(path) => {
            ServerConf::load_from_yaml(path).map_err(|e| StartError::Server(e.to_string()))?
        }
        None => default_server_conf(settings.listen.port())?,
    };
    let opt = Opt {
        upgrade: cli.upgrade,
        daemon: cli.daemon,
        nocapture: false,
        test: cli.test_conf,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let proxy = TaskclusterProxy {
        root_url: settings.root_url.clone(),
        credentials,
        upstreams,
    };
    let mut service = http_proxy_service(&server.configuration, proxy);
    service.add_tcp(&settings.listen.to_string());
    log::info!(
        "taskcluster-proxy {} listening on {} for {}",
        crate::VERSION,
        settings.listen,
        settings.root_url
    );
    server.add_service(service);
    server.run_forever()
}
