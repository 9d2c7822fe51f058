//! Runtime state that must survive a zero-downtime upgrade: the credentials rotated in with
//! `PUT /credentials` and the authorized scopes, or, in shared mode, the task registry.
//!
//! Every rotation is first written, atomically and mode 0600, to a state file with a
//! generation number one above anything written before (under an advisory lock, so two
//! processes rotating at once still get distinct generations). Each process polls the file
//! and adopts a newer generation, so during an upgrade a rotation answered by either the old
//! or the new process reaches the one that keeps serving. A process started with `--upgrade`
//! begins from the file rather than from its configuration.
//!
//! The shared-mode registry can hold thousands of tasks, so a change to one task is not a
//! rewrite of all: it is one line appended to a journal beside the state file (`*.journal`,
//! also 0600, fsynced), after the writer has caught up with every earlier line under the
//! same lock, so lines are in generation order and every process applies them alike. When
//! the journal outgrows the snapshot, the writer compacts it into a new snapshot and starts
//! an empty journal: O(1) per change, amortised.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::{Deserialize, Serialize};

use crate::credentials::{Credentials, CredentialsError};
use crate::registry::{Registry, StoredTask};

/// How often each process looks for a newer state.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Format of the file; bumped on incompatible changes.
const FORMAT: u32 = 1;

#[derive(Debug)]
pub enum StateError {
    Io(String, std::io::Error),
    Insecure(String, String),
    Corrupt(String, String),
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(path, e) => write!(f, "state file {path}: {e}"),
            Self::Insecure(path, why) => write!(f, "state file {path} ignored: {why}"),
            Self::Corrupt(path, why) => write!(f, "state file {path} is unreadable: {why}"),
        }
    }
}

impl std::error::Error for StateError {}

/// Credentials as written to the state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCredentials {
    client_id: String,
    access_token: String,
    #[serde(default)]
    certificate: Option<String>,
}

impl From<&Credentials> for StoredCredentials {
    fn from(credentials: &Credentials) -> Self {
        StoredCredentials {
            client_id: credentials.client_id.clone(),
            access_token: credentials.access_token().to_string(),
            certificate: credentials.certificate.as_ref().map(|c| c.to_json_string()),
        }
    }
}

impl StoredCredentials {
    pub fn to_credentials(&self) -> Result<Credentials, CredentialsError> {
        Credentials::new(
            &self.client_id,
            &self.access_token,
            self.certificate.as_deref(),
        )
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    format: u32,
    generation: u64,
    /// The single-task credentials; absent in shared mode.
    #[serde(default)]
    credentials: Option<StoredCredentials>,
    /// `null` = no restriction, `[]` = restricted to nothing.
    #[serde(default)]
    authorized_scopes: Option<Vec<String>>,
    /// The task registry of shared mode.
    #[serde(default)]
    tasks: Option<Vec<StoredTask>>,
}

/// Identity of a file version, to notice replacement without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    mtime_ns: i64,
    len: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            ino: meta.ino(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            len: meta.len(),
        }
    }
}

/// Atomically replaces `path` with a new private (0600) file holding `contents`, synced.
fn replace_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// One change to the task registry, as journalled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TaskOp {
    /// Register, replace or rotate a task (its whole record).
    Put(StoredTask),
    /// The task ended.
    Delete(String),
}

#[derive(Serialize, Deserialize)]
struct JournalLine {
    generation: u64,
    #[serde(flatten)]
    op: TaskOp,
}

/// How far this process has read the journal.
#[derive(Debug, Default)]
struct JournalCursor {
    ino: Option<u64>,
    offset: u64,
}

/// The journal is compacted once it is larger than the snapshot and at least this large.
const MIN_COMPACTION_BYTES: u64 = 256 * 1024;

/// One process's handle on the shared state file.
pub struct StateFile {
    path: PathBuf,
    /// The newest generation whose effect this process holds.
    generation: AtomicU64,
    last_seen: Mutex<Option<Stamp>>,
    journal: Mutex<JournalCursor>,
    compaction_floor: u64,
}

/// Credentials and scopes as stored.
pub type Snapshot = (Credentials, Option<Vec<String>>);

/// What a state file holds: one task's credentials, or the shared-mode registry.
#[derive(Debug, PartialEq)]
pub enum Stored {
    Single(Snapshot),
    Shared(Vec<StoredTask>),
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        StateFile {
            path,
            generation: AtomicU64::new(0),
            last_seen: Mutex::new(None),
            journal: Mutex::new(JournalCursor::default()),
            compaction_floor: MIN_COMPACTION_BYTES,
        }
    }

    /// Compacts the journal from this size on instead of the default (tests).
    pub fn with_compaction_floor(mut self, bytes: u64) -> Self {
        self.compaction_floor = bytes;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// Reads the file if it exists and is private to this user.
    fn read(&self) -> Result<Option<(Document, Stamp)>, StateError> {
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateError::Io(self.name(), e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| StateError::Io(self.name(), e))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid {
            return Err(StateError::Insecure(
                self.name(),
                format!("owned by uid {}, not {euid}", meta.uid()),
            ));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(StateError::Insecure(
                self.name(),
                format!("mode {:04o} is readable by others", meta.mode() & 0o7777),
            ));
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| StateError::Io(self.name(), e))?;
        let doc: Document = serde_json::from_str(&text)
            .map_err(|e| StateError::Corrupt(self.name(), e.to_string()))?;
        if doc.format != FORMAT {
            return Err(StateError::Corrupt(
                self.name(),
                format!("format {} is not {FORMAT}", doc.format),
            ));
        }
        Ok(Some((doc, Stamp::of(&meta))))
    }

    fn stored(&self, doc: Document) -> Result<Stored, StateError> {
        let corrupt = |e: String| StateError::Corrupt(self.name(), e);
        match (doc.credentials, doc.tasks) {
            (Some(c), None) => {
                let credentials = c.to_credentials().map_err(|e| corrupt(e.to_string()))?;
                Ok(Stored::Single((credentials, doc.authorized_scopes)))
            }
            (None, Some(tasks)) => Ok(Stored::Shared(tasks)),
            _ => Err(corrupt("holds neither credentials nor tasks".into())),
        }
    }

    /// Loads the stored state (used when taking over from a running process); a task
    /// registry comes with the journal's changes applied.
    pub fn load(&self) -> Result<Option<Stored>, StateError> {
        let Some((doc, stamp)) = self.read()? else {
            return Ok(None);
        };
        let mut generation = doc.generation;
        *self.last_seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamp);
        let mut stored = self.stored(doc)?;
        if let Stored::Shared(tasks) = &mut stored {
            let mut cursor = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            *cursor = JournalCursor::default();
            let mut by_id: std::collections::BTreeMap<String, StoredTask> =
                tasks.drain(..).map(|t| (t.task_id.clone(), t)).collect();
            for line in self.read_journal(&mut cursor)? {
                if line.generation <= generation {
                    continue;
                }
                generation = line.generation;
                match line.op {
                    TaskOp::Put(task) => {
                        by_id.insert(task.task_id.clone(), task);
                    }
                    TaskOp::Delete(id) => {
                        by_id.remove(&id);
                    }
                }
            }
            tasks.extend(by_id.into_values());
        }
        self.generation.store(generation, Ordering::SeqCst);
        Ok(Some(stored))
    }

    /// Records single-task credentials as a new generation. Blocking file I/O: call off the
    /// async runtime.
    pub fn persist(
        &self,
        credentials: &Credentials,
        authorized_scopes: Option<&[String]>,
    ) -> Result<u64, StateError> {
        self.write(
            Some(StoredCredentials::from(credentials)),
            authorized_scopes.map(<[String]>::to_vec),
            None,
        )
    }

    /// Starts a new shared-mode registry state (a snapshot of `tasks` and an empty journal)
    /// as a new generation. Blocking file I/O.
    pub fn persist_tasks(&self, tasks: Vec<StoredTask>) -> Result<u64, StateError> {
        self.ensure_dir()?;
        let lock = self.lock()?;
        // Above every journal line too, so none of them is replayed over this snapshot.
        let mut cursor = JournalCursor::default();
        let journalled = match self.read_journal(&mut cursor) {
            Ok(lines) => lines.iter().map(|l| l.generation).max().unwrap_or(0),
            Err(e) => {
                log::warn!("{e}; replacing it");
                0
            }
        };
        let generation = self.disk_generation().max(journalled) + 1;
        self.write_doc(generation, None, None, Some(tasks))?;
        self.reset_journal()?;
        drop(lock);
        Ok(generation)
    }

    fn write(
        &self,
        credentials: Option<StoredCredentials>,
        authorized_scopes: Option<Vec<String>>,
        tasks: Option<Vec<StoredTask>>,
    ) -> Result<u64, StateError> {
        self.ensure_dir()?;
        let lock = self.lock()?;
        let generation = self.disk_generation() + 1;
        self.write_doc(generation, credentials, authorized_scopes, tasks)?;
        drop(lock);
        Ok(generation)
    }

    fn ensure_dir(&self) -> Result<(), StateError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| StateError::Io(self.name(), e))?;
            }
        }
        Ok(())
    }

    /// The highest generation on disk or held here. Call under the lock.
    fn disk_generation(&self) -> u64 {
        let on_disk = match self.read() {
            Ok(Some((doc, _))) => doc.generation,
            Ok(None) => 0,
            Err(e) => {
                log::warn!("{e}; replacing it");
                0
            }
        };
        on_disk.max(self.generation.load(Ordering::SeqCst))
    }

    /// Atomically replaces the state file. Call under the lock.
    fn write_doc(
        &self,
        generation: u64,
        credentials: Option<StoredCredentials>,
        authorized_scopes: Option<Vec<String>>,
        tasks: Option<Vec<StoredTask>>,
    ) -> Result<(), StateError> {
        let io = |e| StateError::Io(self.name(), e);
        let doc = Document {
            format: FORMAT,
            generation,
            credentials,
            authorized_scopes,
            tasks,
        };
        let json = serde_json::to_vec(&doc).expect("state serialises");
        replace_file(&self.path, &json).map_err(io)?;
        self.generation.fetch_max(generation, Ordering::SeqCst);
        Ok(())
    }

    fn journal_path(&self) -> PathBuf {
        self.path.with_extension("journal")
    }

    /// Replaces the journal with an empty one (a new file: readers notice the new inode).
    fn reset_journal(&self) -> Result<(), StateError> {
        let path = self.journal_path();
        replace_file(&path, b"").map_err(|e| StateError::Io(path.display().to_string(), e))
    }

    /// The complete journal lines after `cursor` (from the start if the journal was
    /// replaced), advancing it. A line still being written is left for the next read.
    fn read_journal(&self, cursor: &mut JournalCursor) -> Result<Vec<JournalLine>, StateError> {
        use std::io::{Seek, SeekFrom};
        let path = self.journal_path();
        let name = path.display().to_string();
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StateError::Io(name, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| StateError::Io(name.clone(), e))?;
        if meta.mode() & 0o077 != 0 {
            return Err(StateError::Insecure(name, "readable by others".into()));
        }
        if cursor.ino != Some(meta.ino()) || meta.len() < cursor.offset {
            *cursor = JournalCursor {
                ino: Some(meta.ino()),
                offset: 0,
            };
        }
        if meta.len() == cursor.offset {
            return Ok(Vec::new());
        }
        file.seek(SeekFrom::Start(cursor.offset))
            .map_err(|e| StateError::Io(name.clone(), e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| StateError::Io(name.clone(), e))?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut lines = Vec::new();
        for line in bytes[..complete]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
        {
            let line: JournalLine = serde_json::from_slice(line)
                .map_err(|e| StateError::Corrupt(name.clone(), e.to_string()))?;
            lines.push(line);
        }
        cursor.offset += complete as u64;
        Ok(lines)
    }

    /// Shared mode: applies what other processes recorded since the last call (a newer
    /// snapshot, then journal lines). The caller holds `registry.writer`. Blocking file I/O.
    pub fn sync_tasks(&self, registry: &Registry) -> Result<bool, StateError> {
        let mut cursor = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        if let Some(stored) = self.poll()? {
            if let Stored::Shared(tasks) = stored {
                registry.adopt(tasks);
                changed = true;
            }
            // Journal lines up to the snapshot are in it; later ones follow.
            *cursor = JournalCursor::default();
        }
        for line in self.read_journal(&mut cursor)? {
            if line.generation <= self.generation.load(Ordering::SeqCst) {
                continue;
            }
            registry.apply(line.op);
            self.generation.store(line.generation, Ordering::SeqCst);
            changed = true;
        }
        Ok(changed)
    }

    /// Shared mode: records one change as the next generation, after catching up with
    /// other processes' changes, before the caller applies it. The caller holds
    /// `registry.writer`. Blocking file I/O.
    pub fn record_task(&self, registry: &Registry, op: TaskOp) -> Result<u64, StateError> {
        self.ensure_dir()?;
        let lock = self.lock()?;
        self.sync_tasks(registry)?;
        let generation = self.generation.load(Ordering::SeqCst) + 1;
        let mut line = serde_json::to_vec(&JournalLine { generation, op }).expect("serialises");
        line.push(b'\n');
        let path = self.journal_path();
        let io = |e| StateError::Io(path.display().to_string(), e);
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io)?;
        file.write_all(&line).map_err(io)?;
        file.sync_data().map_err(io)?;
        self.generation.store(generation, Ordering::SeqCst);
        drop(lock);
        Ok(generation)
    }

    /// Shared mode: folds the journal into a new snapshot once it is larger than the
    /// snapshot (so the work is amortised over as many changes as the registry is large).
    /// Call after applying a recorded change, holding `registry.writer`.
    pub fn compact_if_due(&self, registry: &Registry) -> Result<bool, StateError> {
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let journal = size(&self.journal_path());
        if journal < self.compaction_floor.max(size(&self.path)) {
            return Ok(false);
        }
        let lock = self.lock()?;
        self.sync_tasks(registry)?;
        let generation = self.generation.load(Ordering::SeqCst);
        self.write_doc(generation, None, None, Some(registry.stored()))?;
        // Our own snapshot need not be read back.
        if let Ok(Some(stamp)) = self.changed_stamp() {
            *self.last_seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamp);
        }
        self.reset_journal()?;
        drop(lock);
        log::info!("state journal compacted into generation {generation}");
        Ok(true)
    }

    /// The state file's stamp if it differs from the last one seen.
    fn changed_stamp(&self) -> Result<Option<Stamp>, StateError> {
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateError::Io(self.name(), e)),
        };
        let stamp = Stamp::of(&meta);
        let last_seen = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
        Ok((*last_seen != Some(stamp)).then_some(stamp))
    }

    /// Takes the advisory lock that serialises writers across processes.
    fn lock(&self) -> Result<File, StateError> {
        let path = self.path.with_extension("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| StateError::Io(path.display().to_string(), e))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own; it is released when `file` is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(StateError::Io(
                path.display().to_string(),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(file)
    }

    /// The file's state if another process wrote a newer generation since this process last
    /// read or wrote it. Blocking file I/O.
    pub fn poll(&self) -> Result<Option<Stored>, StateError> {
        if self.changed_stamp()?.is_none() {
            return Ok(None);
        }
        let Some((doc, stamp)) = self.read()? else {
            return Ok(None);
        };
        *self.last_seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamp);
        if doc.generation <= self.generation.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let generation = doc.generation;
        let stored = self.stored(doc)?;
        self.generation.store(generation, Ordering::SeqCst);
        log::info!("adopting state generation {generation} written by another process");
        Ok(Some(stored))
    }
}

/// Background service polling the state file.
pub struct StateWatcher {
    pub state: Arc<StateFile>,
    pub tenancy: crate::tenancy::Tenancy,
}

#[async_trait]
impl BackgroundService for StateWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut complained = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            match self.tenancy.sync(&self.state).await {
                Ok(()) => complained = false,
                Err(e) if !complained => {
                    log::error!("{e}");
                    complained = true;
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tcp-state-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("state.json")
    }

    fn single(stored: Option<Stored>) -> Option<Snapshot> {
        match stored {
            Some(Stored::Single(snapshot)) => Some(snapshot),
            None => None,
            Some(other) => panic!("{other:?}"),
        }
    }

    #[test]
    fn persist_load_and_adopt_across_handles() {
        let path = temp_path("adopt");
        let a = StateFile::new(path.clone());
        let b = StateFile::new(path.clone());
        let one = Credentials::new("one", "t1", None).unwrap();
        let two = Credentials::new("two", "t2", None).unwrap();
        assert_eq!(a.load().unwrap(), None);
        assert_eq!(a.persist(&one, Some(&[])).unwrap(), 1);
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let (creds, scopes) = single(b.load().unwrap()).unwrap();
        assert_eq!(creds, one);
        assert_eq!(scopes, Some(vec![]));

        assert_eq!(b.poll().unwrap(), None, "nothing new yet");
        assert_eq!(a.persist(&two, Some(&[])).unwrap(), 2);
        assert_eq!(single(b.poll().unwrap()).unwrap().0, two);
        assert_eq!(
            b.poll().unwrap(),
            None,
            "same generation is not adopted twice"
        );

        // b writes next: its generation is above a's, and a adopts it.
        assert_eq!(b.persist(&one, None).unwrap(), 3);
        assert_eq!(single(a.poll().unwrap()), Some((one, None)));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn task_registries_round_trip() {
        let path = temp_path("tasks");
        let a = StateFile::new(path.clone());
        let registry = crate::registry::Registry::new();
        let reg = crate::registry::Registration::from_json(
            br#"{"credentials":{"clientId":"c","accessToken":"t"},"identity":{"uid":5}}"#,
        )
        .unwrap();
        registry.insert(crate::registry::Registry::entry("T", reg, 1));
        let tasks = registry.stored();
        assert_eq!(a.persist_tasks(tasks.clone()).unwrap(), 1);
        assert_eq!(
            StateFile::new(path.clone()).load().unwrap(),
            Some(Stored::Shared(tasks))
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn refuses_files_others_can_read() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp_path("insecure");
        let s = StateFile::new(path.clone());
        s.persist(&Credentials::new("one", "t1", None).unwrap(), None)
            .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            StateFile::new(path.clone()).load(),
            Err(StateError::Insecure(..))
        ));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn certificates_round_trip() {
        let path = temp_path("cert");
        let cert = r#"{"version":1,"scopes":["a"],"start":1,"expiry":2,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"s","issuer":"x"}"#;
        let creds = Credentials::new("c", "t", Some(cert)).unwrap();
        let s = StateFile::new(path.clone());
        s.persist(&creds, None).unwrap();
        let (loaded, _) = single(StateFile::new(path.clone()).load().unwrap()).unwrap();
        assert_eq!(loaded, creds);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    fn task(id: &str, client: &str, uid: u32) -> StoredTask {
        let reg = crate::registry::Registration::from_json(
            format!(
                r#"{{"credentials":{{"clientId":"{client}","accessToken":"t"}},"identity":{{"uid":{uid}}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        crate::registry::Registry::entry(id, reg, 1).to_stored()
    }

    fn client_of(registry: &Registry, id: &str) -> Option<String> {
        registry
            .get(id)
            .map(|e| e.store.current().client_id().to_string())
    }

    /// Records and applies a change, as the admin API does.
    fn change(state: &StateFile, registry: &Registry, op: TaskOp) {
        state.record_task(registry, op.clone()).unwrap();
        registry.apply(op);
        state.compact_if_due(registry).unwrap();
    }

    #[test]
    fn journalled_changes_reach_the_other_process_in_order() {
        let path = temp_path("journal");
        let (a, ra) = (StateFile::new(path.clone()), Registry::new());
        let (b, rb) = (StateFile::new(path.clone()), Registry::new());
        a.persist_tasks(Vec::new()).unwrap();
        assert_eq!(b.load().unwrap(), Some(Stored::Shared(Vec::new())));

        change(&a, &ra, TaskOp::Put(task("T1", "one", 11)));
        assert!(b.sync_tasks(&rb).unwrap());
        assert_eq!(client_of(&rb, "T1").as_deref(), Some("one"));
        assert!(!b.sync_tasks(&rb).unwrap(), "nothing new");

        // Both change the same task without syncing first: recording catches up, so both
        // end with the change recorded last.
        change(&a, &ra, TaskOp::Put(task("T1", "from-a", 11)));
        change(&b, &rb, TaskOp::Put(task("T1", "from-b", 11)));
        a.sync_tasks(&ra).unwrap();
        b.sync_tasks(&rb).unwrap();
        assert_eq!(client_of(&ra, "T1").as_deref(), Some("from-b"));
        assert_eq!(client_of(&rb, "T1").as_deref(), Some("from-b"));

        change(&b, &rb, TaskOp::Put(task("T2", "two", 12)));
        change(&a, &ra, TaskOp::Delete("T1".into()));
        a.sync_tasks(&ra).unwrap();
        b.sync_tasks(&rb).unwrap();
        for r in [&ra, &rb] {
            assert_eq!(client_of(r, "T1"), None);
            assert_eq!(client_of(r, "T2").as_deref(), Some("two"));
        }
        // A process taking over replays snapshot and journal.
        let c = StateFile::new(path.clone());
        assert_eq!(
            c.load().unwrap(),
            Some(Stored::Shared(vec![task("T2", "two", 12)]))
        );
        let mode = std::fs::metadata(a.journal_path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn compaction_folds_the_journal_into_a_snapshot() {
        let path = temp_path("compact");
        let a = StateFile::new(path.clone()).with_compaction_floor(2048);
        let ra = Registry::new();
        let (b, rb) = (StateFile::new(path.clone()), Registry::new());
        a.persist_tasks(Vec::new()).unwrap();
        b.load().unwrap();
        for i in 0..40 {
            change(&a, &ra, TaskOp::Put(task(&format!("T{i}"), "c", 100 + i)));
        }
        for i in 0..30 {
            change(&a, &ra, TaskOp::Delete(format!("T{i}")));
        }
        let journal = std::fs::metadata(a.journal_path()).unwrap().len();
        assert!(journal < 4096, "compacted: journal is {journal} bytes");
        b.sync_tasks(&rb).unwrap();
        let ids = |r: &Registry| {
            r.tasks()
                .iter()
                .map(|t| t.task_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&rb), ids(&ra));
        assert_eq!(ra.len(), 10);
        let c = StateFile::new(path.clone());
        match c.load().unwrap() {
            Some(Stored::Shared(tasks)) => assert_eq!(tasks.len(), 10),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_fresh_registry_is_not_followed_by_stale_journal_lines() {
        let path = temp_path("fresh");
        let (a, ra) = (StateFile::new(path.clone()), Registry::new());
        a.persist_tasks(Vec::new()).unwrap();
        change(&a, &ra, TaskOp::Put(task("OLD", "old", 5)));
        // A new start (not an upgrade) begins empty, whatever the old journal says.
        let b = StateFile::new(path.clone());
        b.persist_tasks(Vec::new()).unwrap();
        let c = StateFile::new(path.clone());
        assert_eq!(c.load().unwrap(), Some(Stored::Shared(Vec::new())));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
