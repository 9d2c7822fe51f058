//! Resource limits, downstream timeouts and the upstream retry policy, with the defaults a
//! shared proxy serving untrusted tasks should have.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Request limits (`taskcluster_proxy.limits`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Request header block larger than this → 431.
    pub max_header_bytes: usize,
    /// Request-target longer than this → 414.
    pub max_path_bytes: usize,
    /// Task connections beyond this get 503 and are closed.
    pub max_connections: i64,
    /// Requests per second allowed per client IP (0: unlimited), with a burst of as many.
    pub requests_per_second_per_client: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_path_bytes: 16 * 1024,
            max_connections: 20_000,
            requests_per_second_per_client: 0,
        }
    }
}

/// Timeouts towards tasks (`taskcluster_proxy.downstream_timeouts`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownstreamTimeouts {
    /// Longest silence while reading a request (headers or body) from a task.
    pub read_seconds: u64,
    /// How long an idle keep-alive connection waits for its next request.
    pub keepalive_seconds: u64,
}

impl Default for DownstreamTimeouts {
    fn default() -> Self {
        DownstreamTimeouts {
            read_seconds: 60,
            keepalive_seconds: 60,
        }
    }
}

/// Upstream retries (`taskcluster_proxy.retries`). Connection failures (nothing sent yet)
/// are retried for any method; failures after sending only for idempotent requests on a
/// reused connection whose body fitted in Pingora's 64 KiB replay buffer (larger streamed
/// bodies are never replayed).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1: no retries).
    pub max_attempts: u32,
    /// No retry starts after this many seconds since the first attempt.
    pub max_seconds: f64,
    /// First back-off; doubled per retry, with ±50 % jitter.
    pub initial_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            max_seconds: 10.0,
            initial_backoff_ms: 100,
        }
    }
}

impl RetryPolicy {
    /// Whether another attempt may start, given the attempts made and the time spent.
    pub fn may_retry(&self, attempts_made: u32, elapsed: Duration) -> bool {
        attempts_made < self.max_attempts && elapsed.as_secs_f64() < self.max_seconds
    }

    /// Back-off before attempt number `attempt` (2 = first retry), jittered by `jitter` in
    /// [0, 1): base × 2^(attempt-2) × (0.5 + jitter).
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = attempt.saturating_sub(2).min(16);
        let base = self.initial_backoff_ms as f64 * f64::from(1u32 << exp);
        Duration::from_secs_f64(base * (0.5 + jitter.clamp(0.0, 1.0)) / 1000.0)
    }
}

/// Per-client token buckets, sharded so clients on different shards never contend.
pub struct RateLimiter {
    per_second: f64,
    shards: Vec<Mutex<HashMap<IpAddr, Bucket>>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

const SHARDS: usize = 64;
/// Buckets kept per shard before idle ones are dropped.
const MAX_BUCKETS_PER_SHARD: usize = 1024;

impl RateLimiter {
    pub fn new(per_second: u32) -> Option<Self> {
        (per_second > 0).then(|| RateLimiter {
            per_second: f64::from(per_second),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    /// Takes one token for `client`; false when its bucket is empty.
    pub fn allow(&self, client: IpAddr, now: Instant) -> bool {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        client.hash(&mut hasher);
        let shard = &self.shards[hasher.finish() as usize % SHARDS];
        let mut buckets = shard.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_BUCKETS_PER_SHARD && !buckets.contains_key(&client) {
            let full = Duration::from_secs_f64(1.0);
            buckets.retain(|_, b| now.duration_since(b.last) < full);
        }
        let rate = self.per_second;
        let bucket = buckets.entry(client).or_insert(Bucket {
            tokens: rate,
            last: now,
        });
        let refill = now.duration_since(bucket.last).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(rate);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_bounds_and_backoff() {
        let p = RetryPolicy::default();
        assert!(p.may_retry(1, Duration::ZERO));
        assert!(p.may_retry(2, Duration::from_secs(1)));
        assert!(!p.may_retry(3, Duration::ZERO));
        assert!(!p.may_retry(1, Duration::from_secs(11)));
        assert_eq!(p.backoff(2, 0.5), Duration::from_millis(100));
        assert_eq!(p.backoff(3, 0.5), Duration::from_millis(200));
        assert_eq!(p.backoff(3, 0.0), Duration::from_millis(100));
        assert!(p.backoff(40, 0.99) <= Duration::from_secs(10_000));
    }

    #[test]
    fn token_buckets_per_client() {
        let r = RateLimiter::new(2).unwrap();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        assert!(r.allow(a, t0));
        assert!(r.allow(a, t0));
        assert!(!r.allow(a, t0), "burst of 2 used up");
        assert!(r.allow(b, t0), "other clients are not affected");
        assert!(r.allow(a, t0 + Duration::from_millis(600)), "refilled");
        assert!(RateLimiter::new(0).is_none());
    }
}
