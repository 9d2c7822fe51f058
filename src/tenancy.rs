//! Whose credentials a proxy signs with: one task's (the Go proxy's model) or, in shared
//! mode, each registered task's own.

use std::sync::Arc;

use crate::credentials::CredentialStore;
use crate::registry::Registry;
use crate::state::{StateError, StateFile, Stored};

#[derive(Clone)]
pub enum Tenancy {
    /// One set of credentials for every caller.
    Single(Arc<CredentialStore>),
    /// A registry of tasks, each caller mapped to exactly one of them.
    Shared(Arc<Registry>),
}

impl Tenancy {
    pub fn is_shared(&self) -> bool {
        matches!(self, Tenancy::Shared(_))
    }

    /// Adopts what another process recorded in the state file since the last call
    /// (zero-downtime upgrade hand-over).
    pub async fn sync(&self, state: &Arc<StateFile>) -> Result<(), StateError> {
        let state = state.clone();
        let joined = |e: tokio::task::JoinError| {
            StateError::Io(state.path().display().to_string(), std::io::Error::other(e))
        };
        match self {
            Tenancy::Single(store) => {
                let polling = state.clone();
                match tokio::task::spawn_blocking(move || polling.poll())
                    .await
                    .map_err(joined)??
                {
                    Some(Stored::Single((credentials, scopes))) => {
                        store.replace(&credentials, scopes)
                    }
                    Some(Stored::Shared(_)) => log::error!(
                        "state file holds a shared-mode task registry; this process serves one task: ignored"
                    ),
                    None => {}
                }
            }
            Tenancy::Shared(registry) => {
                // Held across the file read and the changes, like an admin request.
                let _writer = registry.writer.lock().await;
                let (syncing, registry) = (state.clone(), registry.clone());
                tokio::task::spawn_blocking(move || syncing.sync_tasks(&registry))
                    .await
                    .map_err(joined)??;
            }
        }
        Ok(())
    }
}
