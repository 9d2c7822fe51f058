//! A Pingora-based, drop-in replacement for Taskcluster's `taskcluster-proxy`.
//!
//! Tasks send plain HTTP to the proxy; it picks the upstream from the first path segment,
//! signs the request with Hawk using credentials the task never sees, and streams the
//! exchange through. Pure logic (routing, signing, credential validation, URL handling)
//! lives in its own modules so it is unit tested without sockets; `proxy` and `server`
//! hold the Pingora wiring.

pub mod accesslog;
pub mod admin;
pub mod admission;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod endpoints;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod registry;
pub mod resolver;
pub mod routing;
pub mod scopes;
pub mod server;
pub mod signing;
pub mod state;
pub mod task;
pub mod tenancy;
pub mod tls;
pub mod url;

/// Release version reported in `--version` and `X-Taskcluster-Proxy-Version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Git revision baked in at build time (empty when unknown), as the Go proxy does.
pub const REVISION: &str = match option_env!("TASKCLUSTER_PROXY_REVISION") {
    Some(rev) => rev,
    None => "",
};
