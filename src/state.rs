//! Runtime state that must survive a zero-downtime upgrade: the credentials rotated in with
//! `PUT /credentials` and the authorized scopes (later also the task registry).
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

use crate::credentials::{CredentialStore, Credentials};

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

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredCredentials {
    client_id: String,
    access_token: String,
    #[serde(default)]
    certificate: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    format: u32,
    generation: u64,
    credentials: StoredCredentials,
    /// `null` = no restriction, `[]` = restricted to nothing.
    authorized_scopes: Option<Vec<String>>,
    /// Reserved for the multi-tenant task registry.
    #[serde(default)]
    tasks: serde_json::Value,
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

    fn snapshot(&self, doc: Document) -> Result<Snapshot, StateError> {
        let c = doc.credentials;
        let credentials = Credentials::new(&c.client_id, &c.access_token, c.certificate.as_deref())
            .map_err(|e| StateError::Corrupt(self.name(), e.to_string()))?;
        Ok((credentials, doc.authorized_scopes))
    }

    /// Loads the stored state (used when taking over from a running process).
    pub fn load(&self) -> Result<Option<Snapshot>, StateError> {
        let Some((doc, stamp)) = self.read()? else {
            return Ok(None);
        };
        self.generation.store(doc.generation, Ordering::SeqCst);
        *self.last_seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamp);
        self.snapshot(doc).map(Some)
    }

    /// Writes a new generation. Blocking file I/O: call off the async runtime.
    pub fn persist(
        &self,
        credentials: &Credentials,
        authorized_scopes: Option<&[String]>,
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
            credentials: StoredCredentials {
                client_id: credentials.client_id.clone(),
                access_token: credentials.access_token().to_string(),
                certificate: credentials.certificate.as_ref().map(|c| c.to_json_string()),
            },
            authorized_scopes: authorized_scopes.map(<[String]>::to_vec),
            tasks: serde_json::Value::Null,
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

    /// Adopts the file's state if another process wrote a newer generation.
    /// Returns whether the credentials changed. Blocking file I/O.
    pub fn poll(&self, store: &CredentialStore) -> Result<bool, StateError> {
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StateError::Io(self.name(), e)),
        };
        let stamp = Stamp {
            ino: meta.ino(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            len: meta.len(),
        };
        let mut last_seen = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
        if *last_seen == Some(stamp) {
            return Ok(false);
        }
        let Some((doc, stamp)) = self.read()? else {
            return Ok(false);
        };
        *last_seen = Some(stamp);
        if doc.generation <= self.generation.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let generation = doc.generation;
        let (credentials, scopes) = self.snapshot(doc)?;
        self.generation.store(generation, Ordering::SeqCst);
        log::info!("adopting state generation {generation} written by another process");
        store.replace(&credentials, scopes);
        Ok(true)
    }
}

/// Background service polling the state file.
pub struct StateWatcher {
    pub state: Arc<StateFile>,
    pub store: Arc<CredentialStore>,
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
            let (state, store) = (self.state.clone(), self.store.clone());
            match tokio::task::spawn_blocking(move || state.poll(&store)).await {
                Ok(Ok(_)) => complained = false,
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

        let (creds, scopes) = b.load().unwrap().unwrap();
        assert_eq!(creds, one);
        assert_eq!(scopes, Some(vec![]));

        let store_b = CredentialStore::new(&creds, scopes);
        assert!(!b.poll(&store_b).unwrap(), "nothing new yet");
        assert_eq!(a.persist(&two, Some(&[])).unwrap(), 2);
        assert!(b.poll(&store_b).unwrap());
        assert_eq!(store_b.current().client_id(), "two");
        assert!(
            !b.poll(&store_b).unwrap(),
            "same generation is not adopted twice"
        );

        // b writes next: its generation is above a's, and a adopts it.
        let store_a = CredentialStore::new(&two, Some(vec![]));
        assert_eq!(b.persist(&one, None).unwrap(), 3);
        assert!(a.poll(&store_a).unwrap());
        assert_eq!(store_a.current().client_id(), "one");
        assert_eq!(store_a.authorized_scopes(), None);
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
        let (loaded, _) = StateFile::new(path.clone()).load().unwrap().unwrap();
        assert_eq!(loaded, creds);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
