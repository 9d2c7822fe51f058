//! Asynchronous, cached upstream name resolution.
//!
//! Lookups run `getaddrinfo` on Tokio's blocking pool (so `/etc/hosts` and nsswitch are
//! honoured and the runtime never blocks). Answers are cached for a bounded TTL in a
//! copy-on-write map: the hot path is one atomic load and a hash lookup, with no lock.
//! `--connect-to` overrides (curl semantics) redirect a `host:port` to another address while
//! the Host header, SNI and signature keep the original name.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

/// How long a resolved address is reused before it is looked up again.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// How long a stale answer may still be used when a refresh fails.
const STALE_GRACE: Duration = Duration::from_secs(300);
/// Bound on cached names, so hostname-form requests to many hosts cannot grow it forever.
const MAX_ENTRIES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    NotFound(String),
    Failed(String, String),
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound(host) => write!(f, "no addresses found for {host}"),
            Self::Failed(host, why) => write!(f, "cannot resolve {host}: {why}"),
        }
    }
}

impl std::error::Error for ResolveError {}

/// One `--connect-to HOST:PORT:ADDR:PORT` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectTo {
    pub host: String,
    pub port: u16,
    pub to_host: String,
    pub to_port: u16,
}

impl FromStr for ConnectTo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid --connect-to {s:?}: expected HOST:PORT:ADDR:PORT");
        // ADDR may be a bracketed IPv6 literal containing colons.
        let (front, to_port) = s.rsplit_once(':').ok_or_else(bad)?;
        let (host_port, to_host) = if let Some(stripped) = front.strip_suffix(']') {
            let open = stripped.rfind('[').ok_or_else(bad)?;
            (
                front[..open].strip_suffix(':').ok_or_else(bad)?,
                &stripped[open + 1..],
            )
        } else {
            front.rsplit_once(':').ok_or_else(bad)?
        };
        let (host, port) = host_port.rsplit_once(':').ok_or_else(bad)?;
        let parse_port = |p: &str| p.parse::<u16>().map_err(|_| bad());
        if host.is_empty() || to_host.is_empty() {
            return Err(bad());
        }
        Ok(ConnectTo {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase(),
            port: parse_port(port)?,
            to_host: to_host.to_string(),
            to_port: parse_port(to_port)?,
        })
    }
}

#[derive(Clone)]
struct Entry {
    addrs: Arc<[IpAddr]>,
    fetched: Instant,
}

pub struct Resolver {
    overrides: Vec<ConnectTo>,
    cache: ArcSwap<HashMap<String, Entry>>,
    ttl: Duration,
}

impl Resolver {
    pub fn new(overrides: Vec<ConnectTo>, ttl: Duration) -> Self {
        Resolver {
            overrides,
            cache: ArcSwap::from_pointee(HashMap::new()),
            ttl,
        }
    }

    /// Resolves `host` (no IPv6 brackets) for a connection to `port`.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, ResolveError> {
        let (host, port) = match self
            .overrides
            .iter()
            .find(|o| o.port == port && o.host.eq_ignore_ascii_case(host))
        {
            Some(o) => (o.to_host.as_str(), o.to_port),
            None => (host, port),
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        let cached = self.cache.load().get(host).cloned();
        if let Some(entry) = &cached {
            if entry.fetched.elapsed() < self.ttl {
                return Ok(SocketAddr::new(entry.addrs[0], port));
            }
        }
        match self.lookup(host, port).await {
            Ok(addrs) => {
                let first = addrs[0];
                self.store(host, addrs);
                Ok(SocketAddr::new(first, port))
            }
            Err(e) => match cached {
                Some(entry) if entry.fetched.elapsed() < self.ttl + STALE_GRACE => {
                    log::warn!("{e}; using the previous answer for {host}");
                    Ok(SocketAddr::new(entry.addrs[0], port))
                }
                _ => Err(e),
            },
        }
    }

    async fn lookup(&self, host: &str, port: u16) -> Result<Arc<[IpAddr]>, ResolveError> {
        let addrs: Vec<IpAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| ResolveError::Failed(host.to_string(), e.to_string()))?
            .map(|a| a.ip())
            .collect();
        if addrs.is_empty() {
            return Err(ResolveError::NotFound(host.to_string()));
        }
        Ok(addrs.into())
    }

    fn store(&self, host: &str, addrs: Arc<[IpAddr]>) {
        let entry = Entry {
            addrs,
            fetched: Instant::now(),
        };
        self.cache.rcu(|current| {
            let mut next = HashMap::clone(current);
            if next.len() >= MAX_ENTRIES {
                let ttl = self.ttl + STALE_GRACE;
                next.retain(|_, e| e.fetched.elapsed() < ttl);
                if next.len() >= MAX_ENTRIES {
                    next.clear();
                }
            }
            next.insert(host.to_string(), entry.clone());
            next
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connect_to() {
        assert_eq!(
            "Files.Example.com:443:127.0.0.1:8443".parse::<ConnectTo>(),
            Ok(ConnectTo {
                host: "files.example.com".into(),
                port: 443,
                to_host: "127.0.0.1".into(),
                to_port: 8443
            })
        );
        assert_eq!("h:443:[::1]:9".parse::<ConnectTo>().unwrap().to_host, "::1");
        assert!("h:443:127.0.0.1".parse::<ConnectTo>().is_err());
        assert!("h:x:127.0.0.1:1".parse::<ConnectTo>().is_err());
    }

    #[tokio::test]
    async fn literals_overrides_and_cache() {
        let r = Resolver::new(
            vec!["files.example.com:443:127.0.0.1:9999".parse().unwrap()],
            DEFAULT_TTL,
        );
        assert_eq!(
            r.resolve("files.example.com", 443).await.unwrap(),
            "127.0.0.1:9999".parse().unwrap()
        );
        assert_eq!(
            r.resolve("::1", 80).await.unwrap(),
            "[::1]:80".parse().unwrap()
        );
        let a = r.resolve("localhost", 81).await.unwrap();
        assert!(a.ip().is_loopback());
        assert_eq!(a.port(), 81);
        assert!(r.cache.load().contains_key("localhost"));
    }
}
