//! Runtime state that must survive a zero-downtime upgrade: the credentials rotated in with
//! `PUT /credentials` and the authorized scopes, or, in shared mode, the task registry.
//!
//! Every rotation is first written, atomically and mode 0600, to a state file with a
//! generation number one above anything written before (under an advisory lock, so two
//! processes rotating at once still get distinct generations). Each process polls the file
//! and adopts a newer generation, so during an upgrade a rotation answered by either the old
//! or the new process reaches the one that keeps serving. A process started with `--upgrade`
//! begins from the file rather than from its configuration.

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
use crate::registry::StoredTask;

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

/// One process's handle on the shared state file.
pub struct StateFile {
    path: PathBuf,
    generation: AtomicU64,
    last_seen: Mutex<Option<Stamp>>,
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
        }
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
        let stamp = Stamp {
            ino: meta.ino(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            len: meta.len(),
        };
        Ok(Some((doc, stamp)))
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

    /// Loads the stored state (used when taking over from a running process).
    pub fn load(&self) -> Result<Option<Stored>, StateError> {
        let Some((doc, stamp)) = self.read()? else {
            return Ok(None);
        };
        self.generation.store(doc.generation, Ordering::SeqCst);
        *self.last_seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamp);
        self.stored(doc).map(Some)
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

    /// Records the shared-mode registry as a new generation. Blocking file I/O.
    pub fn persist_tasks(&self, tasks: Vec<StoredTask>) -> Result<u64, StateError> {
        self.write(None, None, Some(tasks))
    }

    fn write(
        &self,
        credentials: Option<StoredCredentials>,
        authorized_scopes: Option<Vec<String>>,
        tasks: Option<Vec<StoredTask>>,
    ) -> Result<u64, StateError> {
        let io = |e| StateError::Io(self.name(), e);
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io)?;
            }
        }
        let lock = self.lock()?;
        let on_disk = match self.read() {
            Ok(Some((doc, _))) => doc.generation,
            Ok(None) => 0,
            Err(e) => {
                log::warn!("{e}; replacing it");
                0
            }
        };
        let generation = on_disk.max(self.generation.load(Ordering::SeqCst)) + 1;
        let doc = Document {
            format: FORMAT,
            generation,
            credentials,
            authorized_scopes,
            tasks,
        };
        let json = serde_json::to_vec(&doc).expect("state serialises");
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io)?;
        file.write_all(&json).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        self.generation.store(generation, Ordering::SeqCst);
        drop(lock);
        Ok(generation)
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
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateError::Io(self.name(), e)),
        };
        let stamp = Stamp {
            ino: meta.ino(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            len: meta.len(),
        };
        let mut last_seen = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
        if *last_seen == Some(stamp) {
            return Ok(None);
        }
        let Some((doc, stamp)) = self.read()? else {
            return Ok(None);
        };
        *last_seen = Some(stamp);
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
            let state = self.state.clone();
            match tokio::task::spawn_blocking(move || state.poll()).await {
                Ok(Ok(stored)) => {
                    complained = false;
                    if let Some(stored) = stored {
                        self.tenancy.adopt(stored).await;
                    }
                }
                Ok(Err(e)) if !complained => {
                    log::error!("{e}");
                    complained = true;
                }
                _ => {}
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
        let tasks = registry.stored_with("", None);
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
}
