//! The task registry of shared mode: task id → credentials, authorized scopes, identity
//! binding and labels, and the lookups that map a caller to exactly one live task.
//!
//! Lookups take one shard's read lock (64 shards per index, no global lock); each task has
//! its own lock-free [`CredentialStore`], so rotating one task touches no index at all and
//! registering or removing one is a handful of O(1) map operations. Identity tokens are kept
//! only as SHA-256 digests: in memory, in the state file and in comparisons.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::credentials::{CredentialStore, Credentials, CredentialsError};
use crate::state::{StoredCredentials, TaskOp};

/// Shortest identity token accepted: 32 characters carry ≥ 128 bits even as hex.
pub const MIN_TOKEN_LEN: usize = 32;
pub const MAX_TOKEN_LEN: usize = 256;
const MAX_TASK_ID_LEN: usize = 64;
const MAX_LABELS: usize = 32;
const MAX_LABEL_KEY: usize = 64;
const MAX_LABEL_VALUE: usize = 256;

/// Why a registration or rotation was refused; `Display` is the message sent back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    InvalidTaskId,
    InvalidJson(String),
    Credentials(CredentialsError),
    InvalidIdentity(String),
    InvalidLabels(String),
    /// The identity is bound to another live task.
    Conflict {
        field: &'static str,
        task_id: String,
    },
    UnknownTask(String),
}

impl RegistryError {
    pub fn status(&self) -> u16 {
        match self {
            Self::Conflict { .. } => 409,
            Self::UnknownTask(_) => 404,
            _ => 400,
        }
    }
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidTaskId => write!(
                f,
                "taskId must be 1-{MAX_TASK_ID_LEN} characters of A-Z a-z 0-9 _ -"
            ),
            Self::InvalidJson(e) => write!(f, "invalid JSON: {e}"),
            Self::Credentials(e) => write!(f, "credentials: {e}"),
            Self::InvalidIdentity(e) => write!(f, "identity: {e}"),
            Self::InvalidLabels(e) => write!(f, "labels: {e}"),
            Self::Conflict { field, task_id } => write!(
                f,
                "identity: this {field} is bound to live task {task_id}; delete that task first"
            ),
            Self::UnknownTask(id) => write!(f, "no registered task {id}"),
        }
    }
}

impl std::error::Error for RegistryError {}

/// SHA-256 of an identity token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &[u8]) -> Self {
        TokenHash(Sha256::digest(token).into())
    }

    fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(TokenHash(out))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

/// Tokens travel in URL paths: unreserved characters only.
pub fn valid_token(token: &[u8]) -> bool {
    (MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&token.len())
        && token
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(b))
}

pub fn valid_task_id(id: &str) -> bool {
    (1..=MAX_TASK_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// What identifies a task's requests; every part that is set must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Binding {
    pub token: Option<TokenHash>,
    pub uid: Option<u32>,
    pub ip: Option<IpAddr>,
}

/// What is known about the caller of one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller {
    pub uid: Option<u32>,
    pub ip: Option<IpAddr>,
}

impl Binding {
    /// Whether a request with `token` (hashed) from `caller` belongs to this binding.
    pub fn admits(&self, token: Option<&TokenHash>, caller: &Caller) -> bool {
        self.token.as_ref() == token
            && self.uid.is_none_or(|uid| caller.uid == Some(uid))
            && self.ip.is_none_or(|ip| caller.ip == Some(ip))
    }
}

/// Why a request could not be attributed to a task; `Display` is the 403 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unidentified {
    UnknownToken,
    WrongCaller,
    NoMatch,
    Ambiguous,
}

impl fmt::Display for Unidentified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UnknownToken => {
                "taskcluster-proxy: unknown or ended task: no live task has this token"
            }
            Self::WrongCaller => {
                "taskcluster-proxy: this task's token is bound to another caller (uid or address)"
            }
            Self::NoMatch => {
                "taskcluster-proxy: no live task is registered for this caller; \
                 use the task's /_task/<token>/ URL or the user or address it was registered with"
            }
            Self::Ambiguous => {
                "taskcluster-proxy: this caller matches more than one task (one by uid, one by \
                 address); use the task's /_task/<token>/ URL"
            }
        })
    }
}

/// One registered task.
pub struct TaskEntry {
    pub task_id: String,
    /// This task's credentials; rotated without touching the registry's indexes.
    pub store: CredentialStore,
    pub binding: Binding,
    pub labels: BTreeMap<String, String>,
    /// Unix milliseconds.
    pub registered_ms: u64,
    ended: AtomicBool,
}

impl fmt::Debug for TaskEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskEntry")
            .field("task_id", &self.task_id)
            .field("binding", &self.binding)
            .finish_non_exhaustive()
    }
}

impl TaskEntry {
    /// Whether the task was deleted (its in-flight requests may still be finishing).
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    /// The listing shown by the admin API: no access token, identity token or certificate.
    pub fn summary(&self) -> Value {
        let identity = self.store.current();
        let mut binding = serde_json::Map::new();
        if self.binding.token.is_some() {
            binding.insert("token".into(), Value::Bool(true));
        }
        if let Some(uid) = self.binding.uid {
            binding.insert("uid".into(), uid.into());
        }
        if let Some(ip) = self.binding.ip {
            binding.insert("ip".into(), ip.to_string().into());
        }
        serde_json::json!({
            "taskId": self.task_id,
            "clientId": identity.client_id(),
            "temporary": identity.certificate_expiry_ms().is_some(),
            "certificateExpiry": identity.certificate_expiry_ms().map(json_number),
            "authorizedScopes": identity.authorized_scopes(),
            "identity": binding,
            "labels": self.labels,
            "registered": crate::accesslog::rfc3339(self.registered_ms),
        })
    }

    /// The form written to the state file.
    pub fn to_stored(&self) -> StoredTask {
        let identity = self.store.current();
        StoredTask {
            task_id: self.task_id.clone(),
            credentials: StoredCredentials::from(identity.credentials()),
            authorized_scopes: identity.authorized_scopes().map(<[String]>::to_vec),
            identity: StoredBinding {
                token_sha256: self.binding.token.map(TokenHash::to_hex),
                uid: self.binding.uid,
                ip: self.binding.ip,
            },
            labels: self.labels.clone(),
            registered_ms: self.registered_ms,
        }
    }

    fn from_stored(stored: StoredTask) -> Result<TaskEntry, String> {
        let credentials = stored
            .credentials
            .to_credentials()
            .map_err(|e| e.to_string())?;
        let token = match &stored.identity.token_sha256 {
            None => None,
            Some(hex) => Some(TokenHash::from_hex(hex).ok_or("bad token digest")?),
        };
        Ok(TaskEntry {
            task_id: stored.task_id,
            store: CredentialStore::new(&credentials, stored.authorized_scopes),
            binding: Binding {
                token,
                uid: stored.identity.uid,
                ip: stored.identity.ip,
            },
            labels: stored.labels,
            registered_ms: stored.registered_ms,
            ended: AtomicBool::new(false),
        })
    }
}

/// Whole milliseconds as a JSON integer, as Taskcluster writes them.
fn json_number(ms: f64) -> Value {
    if ms.fract() == 0.0 && ms.abs() < 9.0e15 {
        Value::from(ms as i64)
    } else {
        Value::from(ms)
    }
}

/// A task as recorded in the state file (identity token as its digest only).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoredTask {
    pub task_id: String,
    pub credentials: StoredCredentials,
    pub authorized_scopes: Option<Vec<String>>,
    pub identity: StoredBinding,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub registered_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoredBinding {
    pub token_sha256: Option<String>,
    pub uid: Option<u32>,
    pub ip: Option<IpAddr>,
}

/// A validated `PUT /tasks/{taskId}` body.
#[derive(Debug)]
pub struct Registration {
    pub credentials: Credentials,
    pub authorized_scopes: Option<Vec<String>>,
    pub binding: Binding,
    pub labels: BTreeMap<String, String>,
}

impl Registration {
    /// Parses and validates a registration body.
    pub fn from_json(body: &[u8]) -> Result<Self, RegistryError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        struct Body {
            credentials: Option<Value>,
            authorized_scopes: Option<Vec<String>>,
            identity: Option<IdentityBody>,
            #[serde(default)]
            labels: BTreeMap<String, String>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct IdentityBody {
            token: Option<String>,
            uid: Option<u32>,
            ip: Option<String>,
        }
        let body: Body =
            serde_json::from_slice(body).map_err(|e| RegistryError::InvalidJson(e.to_string()))?;
        let credentials = match body.credentials {
            Some(value @ Value::Object(_)) => Credentials::from_json(value.to_string().as_bytes())
                .map_err(RegistryError::Credentials)?,
            _ => {
                return Err(RegistryError::InvalidJson(
                    "credentials must be an object {clientId, accessToken, certificate?}".into(),
                ))
            }
        };
        let bad = |why: &str| Err(RegistryError::InvalidIdentity(why.to_string()));
        let Some(identity) = body.identity else {
            return bad(
                "required: {\"token\": ...}, {\"uid\": ...}, {\"ip\": ...} or a combination",
            );
        };
        let token = match identity.token {
            None => None,
            Some(token) if valid_token(token.as_bytes()) => Some(TokenHash::of(token.as_bytes())),
            Some(_) => {
                return bad(&format!(
                "token must be {MIN_TOKEN_LEN}-{MAX_TOKEN_LEN} characters of A-Z a-z 0-9 . _ ~ - \
                     (at least 128 bits of randomness)"
            ))
            }
        };
        if identity.uid == Some(0) {
            return bad("uid 0 (root) cannot identify a task");
        }
        let ip = match identity.ip {
            None => None,
            Some(text) => match text.parse::<IpAddr>() {
                Ok(ip) if !ip.is_unspecified() => Some(ip.to_canonical()),
                _ => return bad(&format!("ip {text:?} is not a specific IP address")),
            },
        };
        if token.is_none() && identity.uid.is_none() && ip.is_none() {
            return bad("give at least one of token, uid and ip");
        }
        if body.labels.len() > MAX_LABELS
            || body
                .labels
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > MAX_LABEL_KEY || v.len() > MAX_LABEL_VALUE)
        {
            return Err(RegistryError::InvalidLabels(format!(
                "at most {MAX_LABELS} labels, keys 1-{MAX_LABEL_KEY} and values up to {MAX_LABEL_VALUE} bytes"
            )));
        }
        Ok(Registration {
            credentials,
            authorized_scopes: body.authorized_scopes,
            binding: Binding {
                token,
                uid: identity.uid,
                ip,
            },
            labels: body.labels,
        })
    }
}

const SHARDS: usize = 64;

/// A hash map split into independently locked shards: readers of one key never wait for
/// writers of another shard, and writers hold a shard only for one map operation.
pub struct ShardedMap<K, V> {
    hasher: RandomState,
    shards: Box<[RwLock<HashMap<K, V>>]>,
}

impl<K: Hash + Eq, V: Clone> ShardedMap<K, V> {
    pub fn new() -> Self {
        ShardedMap {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &K) -> &RwLock<HashMap<K, V>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let shard = self.shard(key).read().unwrap_or_else(|e| e.into_inner());
        shard.get(key).cloned()
    }

    pub fn insert(&self, key: K, value: V) -> Option<V> {
        let mut shard = self.shard(&key).write().unwrap_or_else(|e| e.into_inner());
        shard.insert(key, value)
    }

    pub fn remove(&self, key: &K) -> Option<V> {
        let mut shard = self.shard(key).write().unwrap_or_else(|e| e.into_inner());
        shard.remove(key)
    }

    /// Removes the value at `key` if `pred` holds for it.
    pub fn remove_if(&self, key: &K, pred: impl FnOnce(&V) -> bool) {
        let mut shard = self.shard(key).write().unwrap_or_else(|e| e.into_inner());
        if shard.get(key).is_some_and(pred) {
            shard.remove(key);
        }
    }

    /// Every value (one shard locked at a time).
    pub fn values(&self) -> Vec<V> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read().unwrap_or_else(|e| e.into_inner());
            out.extend(shard.values().cloned());
        }
        out
    }
}

impl<K: Hash + Eq, V: Clone> Default for ShardedMap<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a registration created a task or replaced one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    Created,
    Replaced,
}

/// All registered tasks and their identity indexes.
///
/// Writers (admin API, state adoption) serialise on [`Registry::writer`] so a check for
/// conflicts, the state-file write and the change itself happen as one step; readers never
/// take it.
#[derive(Default)]
pub struct Registry {
    by_task: ShardedMap<String, Arc<TaskEntry>>,
    by_token: ShardedMap<TokenHash, Arc<TaskEntry>>,
    by_uid: ShardedMap<u32, Arc<TaskEntry>>,
    by_ip: ShardedMap<IpAddr, Arc<TaskEntry>>,
    len: AtomicUsize,
    uid_bindings: AtomicUsize,
    pub writer: tokio::sync::Mutex<()>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether any task is bound to a uid (otherwise callers' uids need not be looked up).
    pub fn has_uid_bindings(&self) -> bool {
        self.uid_bindings.load(Ordering::Relaxed) > 0
    }

    pub fn get(&self, task_id: &str) -> Option<Arc<TaskEntry>> {
        self.by_task.get(&task_id.to_string())
    }

    /// The task holding `token`, if any (to learn whether its binding needs the caller's uid).
    pub fn by_token(&self, token: &TokenHash) -> Option<Arc<TaskEntry>> {
        self.by_token.get(token)
    }

    /// The one live task a request belongs to. With a token only the token's task is
    /// considered; without, the tasks bound to the caller's uid or address, which must agree.
    pub fn identify(
        &self,
        token: Option<&TokenHash>,
        caller: &Caller,
    ) -> Result<Arc<TaskEntry>, Unidentified> {
        if let Some(hash) = token {
            let entry = self.by_token.get(hash).ok_or(Unidentified::UnknownToken)?;
            return if entry.binding.admits(Some(hash), caller) {
                Ok(entry)
            } else {
                Err(Unidentified::WrongCaller)
            };
        }
        let by_uid = caller.uid.and_then(|uid| self.by_uid.get(&uid));
        let by_ip = caller.ip.and_then(|ip| self.by_ip.get(&ip));
        let admitted = |e: &Option<Arc<TaskEntry>>| {
            e.as_ref()
                .filter(|e| e.binding.admits(None, caller))
                .cloned()
        };
        match (admitted(&by_uid), admitted(&by_ip)) {
            (Some(a), Some(b)) if !Arc::ptr_eq(&a, &b) => Err(Unidentified::Ambiguous),
            (Some(a), _) | (None, Some(a)) => Ok(a),
            (None, None) => Err(Unidentified::NoMatch),
        }
    }

    /// The first part of `binding` held by a live task other than `task_id`.
    pub fn conflict(&self, task_id: &str, binding: &Binding) -> Result<(), RegistryError> {
        let other = |e: Option<Arc<TaskEntry>>| e.filter(|e| e.task_id != task_id);
        let found = [
            (
                "token",
                binding.token.and_then(|t| other(self.by_token.get(&t))),
            ),
            ("uid", binding.uid.and_then(|u| other(self.by_uid.get(&u)))),
            ("ip", binding.ip.and_then(|i| other(self.by_ip.get(&i)))),
        ];
        match found.into_iter().find_map(|(f, e)| e.map(|e| (f, e))) {
            Some((field, entry)) => Err(RegistryError::Conflict {
                field,
                task_id: entry.task_id.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Builds the entry a registration would create (credentials checked, not yet visible).
    pub fn entry(task_id: &str, registration: Registration, now_ms: u64) -> Arc<TaskEntry> {
        Arc::new(TaskEntry {
            task_id: task_id.to_string(),
            store: CredentialStore::new(&registration.credentials, registration.authorized_scopes),
            binding: registration.binding,
            labels: registration.labels,
            registered_ms: now_ms,
            ended: AtomicBool::new(false),
        })
    }

    /// Makes `entry` live, replacing a task with the same id. The caller holds the writer
    /// lock and has checked [`conflict`](Self::conflict).
    pub fn insert(&self, entry: Arc<TaskEntry>) -> Registered {
        let replaced = self.remove_entry(&entry.task_id, false);
        let b = entry.binding;
        if let Some(token) = b.token {
            self.by_token.insert(token, entry.clone());
        }
        if let Some(uid) = b.uid {
            self.by_uid.insert(uid, entry.clone());
            self.uid_bindings.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(ip) = b.ip {
            self.by_ip.insert(ip, entry.clone());
        }
        self.by_task.insert(entry.task_id.clone(), entry);
        self.len.fetch_add(1, Ordering::Relaxed);
        crate::metrics::METRICS
            .tasks_registered
            .set(self.len() as i64);
        if replaced.is_some() {
            Registered::Replaced
        } else {
            Registered::Created
        }
    }

    /// Ends a task: its identity is refused from now on; requests holding the entry finish.
    pub fn remove(&self, task_id: &str) -> Option<Arc<TaskEntry>> {
        let removed = self.remove_entry(task_id, true);
        crate::metrics::METRICS
            .tasks_registered
            .set(self.len() as i64);
        removed
    }

    fn remove_entry(&self, task_id: &str, end: bool) -> Option<Arc<TaskEntry>> {
        let entry = self.by_task.remove(&task_id.to_string())?;
        let b = entry.binding;
        // Only this entry's own index slots are cleared.
        let same = |e: &Arc<TaskEntry>| Arc::ptr_eq(e, &entry);
        if let Some(token) = b.token {
            self.by_token.remove_if(&token, same);
        }
        if let Some(uid) = b.uid {
            self.by_uid.remove_if(&uid, same);
            self.uid_bindings.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(ip) = b.ip {
            self.by_ip.remove_if(&ip, same);
        }
        self.len.fetch_sub(1, Ordering::Relaxed);
        if end {
            entry.ended.store(true, Ordering::Relaxed);
        }
        Some(entry)
    }

    /// Every task, sorted by id.
    pub fn tasks(&self) -> Vec<Arc<TaskEntry>> {
        let mut tasks = self.by_task.values();
        tasks.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        tasks
    }

    /// The registry as stored, sorted by task id.
    pub fn stored(&self) -> Vec<StoredTask> {
        self.tasks().iter().map(|e| e.to_stored()).collect()
    }

    /// Makes the registry equal to `tasks` (state written by another process). Unchanged
    /// tasks keep their entries, so their in-flight requests are untouched; a task whose
    /// only change is its credentials is rotated in place. The caller holds the writer lock.
    pub fn adopt(&self, tasks: Vec<StoredTask>) {
        let mut keep = std::collections::HashSet::new();
        for stored in tasks {
            keep.insert(stored.task_id.clone());
            self.put_stored(stored);
        }
        for entry in self.tasks() {
            if !keep.contains(&entry.task_id) {
                self.remove(&entry.task_id);
            }
        }
    }

    /// Applies one change recorded by another process. The caller holds the writer lock.
    pub fn apply(&self, op: TaskOp) {
        match op {
            TaskOp::Put(stored) => self.put_stored(stored),
            TaskOp::Delete(task_id) => {
                self.remove(&task_id);
            }
        }
    }

    /// Makes one stored task live: an unchanged task is left alone, a change of credentials
    /// only is a rotation in place (requests in flight keep theirs), anything else a new
    /// entry.
    fn put_stored(&self, stored: StoredTask) {
        if let Some(current) = self.get(&stored.task_id) {
            let now = current.to_stored();
            if now == stored {
                return;
            }
            let same_except_credentials = StoredTask {
                credentials: stored.credentials.clone(),
                ..now
            } == stored;
            if same_except_credentials {
                if let Ok(credentials) = stored.credentials.to_credentials() {
                    current
                        .store
                        .replace(&credentials, stored.authorized_scopes);
                    return;
                }
            }
        }
        let id = stored.task_id.clone();
        match TaskEntry::from_stored(stored) {
            Ok(entry) => {
                self.insert(Arc::new(entry));
            }
            Err(e) => log::error!("state file: task {id} skipped: {e}"),
        }
    }
}

/// Splits `/_task/<token>/rest` into the token and `/rest` (the task-facing URL prefix of
/// shared mode). `None` when the target does not start with `/_task/`.
pub fn split_task_prefix(target: &[u8]) -> Option<(&[u8], &[u8])> {
    let after = target.strip_prefix(b"/_task/")?;
    let end = after
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(after.len());
    Some((&after[..end], &after[end..]))
}

/// Replaces the token of a `/_task/<token>/...` target with `REDACTED`.
pub fn redact_task_token(target: &str) -> std::borrow::Cow<'_, str> {
    match split_task_prefix(target.as_bytes()) {
        Some((_, rest)) => format!("/_task/REDACTED{}", String::from_utf8_lossy(rest)).into(),
        None => target.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaAAAA";
    const TOKEN_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbBBBB";

    fn tok(token: &str) -> TokenHash {
        TokenHash::of(token.as_bytes())
    }

    fn registration(client: &str, identity: &str) -> Registration {
        Registration::from_json(
            format!(
                r#"{{"credentials":{{"clientId":"{client}","accessToken":"t-{client}"}},"identity":{identity}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn register(r: &Registry, id: &str, client: &str, identity: &str) -> Registered {
        let reg = registration(client, identity);
        r.conflict(id, &reg.binding).unwrap();
        r.insert(Registry::entry(id, reg, 0))
    }

    fn caller(uid: Option<u32>, ip: Option<&str>) -> Caller {
        Caller {
            uid,
            ip: ip.map(|i| i.parse().unwrap()),
        }
    }

    #[test]
    fn tokens_identify_only_their_task_and_only_with_their_binding() {
        let r = Registry::new();
        let a = format!(r#"{{"token":"{TOKEN_A}"}}"#);
        let b = format!(r#"{{"token":"{TOKEN_B}","ip":"10.0.0.2"}}"#);
        assert_eq!(register(&r, "A", "a", &a), Registered::Created);
        assert_eq!(register(&r, "B", "b", &b), Registered::Created);
        let anyone = caller(Some(1000), Some("10.0.0.9"));
        let found = r.identify(Some(&tok(TOKEN_A)), &anyone).unwrap();
        assert_eq!(found.store.current().client_id(), "a");
        assert_eq!(
            r.identify(Some(&tok(TOKEN_B)), &anyone).unwrap_err(),
            Unidentified::WrongCaller
        );
        let from_b = caller(None, Some("10.0.0.2"));
        assert_eq!(
            r.identify(Some(&tok(TOKEN_B)), &from_b).unwrap().task_id,
            "B"
        );
        // B's address alone is not enough: B is token-bound.
        assert_eq!(
            r.identify(None, &from_b).unwrap_err(),
            Unidentified::NoMatch
        );
        assert_eq!(
            r.identify(Some(&tok("cccccccccccccccccccccccccccccccccccc")), &anyone)
                .unwrap_err(),
            Unidentified::UnknownToken
        );
    }

    #[test]
    fn uid_and_ip_bindings_never_fall_back() {
        let r = Registry::new();
        register(&r, "U", "u", r#"{"uid":1001}"#);
        register(&r, "I", "i", r#"{"ip":"::ffff:10.0.0.3"}"#);
        assert!(r.has_uid_bindings());
        assert_eq!(
            r.identify(None, &caller(Some(1001), None)).unwrap().task_id,
            "U"
        );
        // The IPv4-mapped form registered is matched by the plain IPv4 caller.
        assert_eq!(
            r.identify(None, &caller(None, Some("10.0.0.3")))
                .unwrap()
                .task_id,
            "I"
        );
        assert_eq!(
            r.identify(None, &caller(Some(1002), Some("10.0.0.4")))
                .unwrap_err(),
            Unidentified::NoMatch
        );
        assert_eq!(
            r.identify(None, &caller(Some(1001), Some("10.0.0.3")))
                .unwrap_err(),
            Unidentified::Ambiguous
        );
    }

    #[test]
    fn conflicts_replacement_and_removal() {
        let r = Registry::new();
        let a = format!(r#"{{"token":"{TOKEN_A}","uid":7}}"#);
        register(&r, "A", "a", &a);
        let clash = registration("x", &format!(r#"{{"token":"{TOKEN_A}"}}"#));
        assert_eq!(
            r.conflict("X", &clash.binding),
            Err(RegistryError::Conflict {
                field: "token",
                task_id: "A".into()
            })
        );
        let clash = registration("x", r#"{"uid":7}"#);
        assert_eq!(r.conflict("X", &clash.binding).unwrap_err().status(), 409);
        // The same task may re-register its own identity.
        assert_eq!(register(&r, "A", "a2", &a), Registered::Replaced);
        assert_eq!(r.len(), 1);
        let held = r.get("A").unwrap();
        assert!(r.remove("A").is_some());
        assert!(held.has_ended());
        assert!(r.is_empty());
        assert!(!r.has_uid_bindings());
        assert_eq!(
            r.identify(Some(&tok(TOKEN_A)), &Caller::default())
                .unwrap_err(),
            Unidentified::UnknownToken
        );
        // Released: another task may take it now.
        r.conflict("X", &registration("x", &a).binding).unwrap();
    }

    #[test]
    fn replacing_with_a_new_identity_releases_the_old_one() {
        let r = Registry::new();
        register(&r, "A", "a", &format!(r#"{{"token":"{TOKEN_A}"}}"#));
        register(&r, "A", "a", &format!(r#"{{"token":"{TOKEN_B}"}}"#));
        assert!(r.by_token(&tok(TOKEN_A)).is_none());
        assert_eq!(r.by_token(&tok(TOKEN_B)).unwrap().task_id, "A");
    }

    #[test]
    fn registration_bodies_are_validated() {
        let ok = r#""credentials":{"clientId":"c","accessToken":"t"}"#;
        for (body, fragment) in [
            ("{".to_string(), "invalid JSON"),
            (format!(r#"{{{ok}}}"#), "identity"),
            (format!(r#"{{{ok},"identity":{{}}}}"#), "at least one"),
            (
                format!(r#"{{{ok},"identity":{{"token":"short"}}}}"#),
                "token must be",
            ),
            (
                format!(r#"{{{ok},"identity":{{"token":"{TOKEN_A}/x"}}}}"#),
                "token must be",
            ),
            (format!(r#"{{{ok},"identity":{{"uid":0}}}}"#), "root"),
            (format!(r#"{{{ok},"identity":{{"ip":"0.0.0.0"}}}}"#), "ip"),
            (format!(r#"{{{ok},"identity":{{"ip":"nope"}}}}"#), "ip"),
            (
                format!(r#"{{{ok},"identity":{{"uid":5,"extra":1}}}}"#),
                "unknown field",
            ),
            (r#"{"identity":{"uid":5}}"#.to_string(), "credentials must"),
            (
                r#"{"credentials":{"clientId":"c"},"identity":{"uid":5}}"#.to_string(),
                "accessToken",
            ),
        ] {
            let err = Registration::from_json(body.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(fragment), "{body}: {err}");
            assert_eq!(err.status(), 400);
        }
        let full = Registration::from_json(
            format!(
                r#"{{{ok},"authorizedScopes":["a"],"identity":{{"token":"{TOKEN_A}","uid":5,"ip":"10.1.2.3"}},"labels":{{"worker":"w1"}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(full.binding.uid, Some(5));
        assert_eq!(full.authorized_scopes, Some(vec!["a".to_string()]));
        assert_eq!(full.labels["worker"], "w1");
    }

    #[test]
    fn summaries_and_stored_forms_hold_no_secrets() {
        let r = Registry::new();
        register(&r, "A", "a", &format!(r#"{{"token":"{TOKEN_A}"}}"#));
        let entry = r.get("A").unwrap();
        let summary = entry.summary().to_string();
        assert!(
            !summary.contains(TOKEN_A) && !summary.contains("t-a"),
            "{summary}"
        );
        assert!(summary.contains(r#""token":true"#));
        let stored = serde_json::to_string(&entry.to_stored()).unwrap();
        assert!(!stored.contains(TOKEN_A), "{stored}");
    }

    #[test]
    fn adopt_rotates_in_place_and_removes_missing_tasks() {
        let r = Registry::new();
        register(&r, "A", "a", &format!(r#"{{"token":"{TOKEN_A}"}}"#));
        register(&r, "B", "b", r#"{"uid":9}"#);
        let held_a = r.get("A").unwrap();
        let mut stored = r.stored();
        stored.retain(|t| t.task_id != "B");
        stored[0].credentials =
            StoredCredentials::from(&Credentials::new("a2", "t2", None).unwrap());
        r.adopt(stored);
        assert!(r.get("B").is_none() && !r.has_uid_bindings());
        assert!(
            Arc::ptr_eq(&held_a, &r.get("A").unwrap()),
            "rotated in place"
        );
        assert_eq!(held_a.store.current().client_id(), "a2");
        // Round trip through the stored form: the token still identifies the task.
        let other = Registry::new();
        other.adopt(r.stored());
        assert_eq!(
            other
                .identify(Some(&tok(TOKEN_A)), &Caller::default())
                .unwrap()
                .task_id,
            "A"
        );
    }

    #[test]
    fn task_prefix() {
        assert_eq!(
            split_task_prefix(b"/_task/abc/api/queue/v1/x?y"),
            Some((&b"abc"[..], &b"/api/queue/v1/x?y"[..]))
        );
        assert_eq!(
            split_task_prefix(b"/_task/abc"),
            Some((&b"abc"[..], &b""[..]))
        );
        assert_eq!(
            split_task_prefix(b"/_task/abc?q"),
            Some((&b"abc"[..], &b"?q"[..]))
        );
        assert_eq!(split_task_prefix(b"/queue/v1/x"), None);
        assert_eq!(
            redact_task_token("/_task/secret/bewit"),
            "/_task/REDACTED/bewit"
        );
        assert_eq!(redact_task_token("/queue/v1"), "/queue/v1");
        assert!(valid_task_id("fN1tXkPdRNGVrFH0ixvdaQ") && !valid_task_id("a/b"));
    }
}
