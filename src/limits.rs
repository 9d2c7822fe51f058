//! Resource limits, downstream timeouts and the upstream retry policy, with the defaults a
//! shared proxy serving untrusted tasks should have.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Total time for a request header once its first byte arrived (0: no total limit), so
    /// a client trickling a header cannot keep a connection forever.
    pub header_seconds: u64,
}

impl Default for DownstreamTimeouts {
    fn default() -> Self {
        DownstreamTimeouts {
            read_seconds: 60,
            keepalive_seconds: 60,
            header_seconds: 30,
        }
    }
}

/// Upstream retries (`taskcluster_proxy.retries`). Connection failures (nothing sent yet)
/// are retried for any method; a 5xx, or the connection breaking after sending, only for
/// idempotent requests whose body was kept for replay (see [`ReplayBudget`]).
/// Larger streamed bodies are never replayed.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1: no retries).
    pub max_attempts: u32,
    /// No retry starts after this many seconds since the first attempt.
    pub max_seconds: f64,
    /// First back-off; doubled per retry, with ±50 % jitter.
    pub initial_backoff_ms: u64,
    /// Largest request body kept for replay (idempotent methods only).
    pub replay_buffer_bytes: usize,
    /// Body bytes kept for replay across all requests in flight; a request that would
    /// exceed it is sent without a replay copy, so it is not retried after sending.
    pub replay_budget_bytes: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            max_seconds: 10.0,
            initial_backoff_ms: 100,
            replay_buffer_bytes: 1024 * 1024,
            replay_budget_bytes: 64 * 1024 * 1024,
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

/// How a request body is framed, as far as replay is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    Empty,
    Length(u64),
    Chunked,
}

impl RetryPolicy {
    /// Bytes to set aside for replaying a request body: none for methods that are never
    /// replayed after sending, for empty bodies, and for bodies that cannot fit (so nothing
    /// is copied in vain); the declared length, or the whole allowance when chunked.
    pub fn replay_capacity(&self, idempotent: bool, body: BodyFraming) -> usize {
        match body {
            _ if !idempotent => 0,
            BodyFraming::Empty => 0,
            BodyFraming::Length(n) => usize::try_from(n)
                .ok()
                .filter(|&n| n <= self.replay_buffer_bytes)
                .unwrap_or(0),
            BodyFraming::Chunked => self.replay_buffer_bytes,
        }
    }
}

/// Bytes of request bodies that may be held for replay at once, across all requests: a
/// burst of large idempotent uploads cannot grow memory beyond it. Lock-free.
#[derive(Debug)]
pub struct ReplayBudget {
    free: AtomicUsize,
}

impl ReplayBudget {
    pub fn new(bytes: usize) -> Arc<Self> {
        Arc::new(ReplayBudget {
            free: AtomicUsize::new(bytes),
        })
    }

    /// Sets `bytes` aside until the reservation is dropped; `None` when not enough is free.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Option<ReplayReservation> {
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |free| {
                free.checked_sub(bytes)
            })
            .ok()?;
        Some(ReplayReservation {
            budget: Arc::clone(self),
            bytes,
        })
    }

    pub fn free(&self) -> usize {
        self.free.load(Ordering::Acquire)
    }
}

/// A share of the [`ReplayBudget`], given back on drop (end of the request, whatever path
/// it ended on).
#[derive(Debug)]
pub struct ReplayReservation {
    budget: Arc<ReplayBudget>,
    bytes: usize,
}

impl ReplayReservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for ReplayReservation {
    fn drop(&mut self) {
        self.budget.free.fetch_add(self.bytes, Ordering::AcqRel);
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
    fn replay_capacity_by_method_and_framing() {
        let p = RetryPolicy {
            replay_buffer_bytes: 1000,
            ..RetryPolicy::default()
        };
        assert_eq!(p.replay_capacity(true, BodyFraming::Length(1000)), 1000);
        assert_eq!(p.replay_capacity(true, BodyFraming::Length(10)), 10);
        assert_eq!(
            p.replay_capacity(true, BodyFraming::Length(1001)),
            0,
            "cannot fit"
        );
        assert_eq!(p.replay_capacity(true, BodyFraming::Length(u64::MAX)), 0);
        assert_eq!(p.replay_capacity(true, BodyFraming::Chunked), 1000);
        assert_eq!(p.replay_capacity(true, BodyFraming::Empty), 0);
        assert_eq!(p.replay_capacity(false, BodyFraming::Length(10)), 0, "POST");
        assert_eq!(p.replay_capacity(false, BodyFraming::Chunked), 0);
    }

    #[test]
    fn replay_budget_is_given_back_on_drop() {
        let budget = ReplayBudget::new(100);
        let a = budget.reserve(60).expect("fits");
        assert!(budget.reserve(41).is_none(), "only 40 left");
        let b = budget.reserve(40).expect("exactly fits");
        assert_eq!(budget.free(), 0);
        drop(a);
        assert_eq!(budget.free(), 60);
        drop(b);
        assert_eq!(budget.free(), 100);
        // Concurrent reservers never overdraw.
        let held: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..100)
                            .filter_map(|_| budget.reserve(3))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(held.len(), 33);
        assert_eq!(budget.free(), 1);
        drop(held);
        assert_eq!(budget.free(), 100);
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
