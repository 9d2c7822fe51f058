//! Whose credentials a proxy signs with: one task's (the Go proxy's model) or, in shared
//! mode, each registered task's own.

use std::sync::Arc;

use crate::credentials::CredentialStore;
use crate::registry::Registry;
use crate::state::Stored;

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

    /// Applies state written by another process (zero-downtime upgrade hand-over).
    pub async fn adopt(&self, stored: Stored) {
        match (self, stored) {
            (Tenancy::Single(store), Stored::Single((credentials, scopes))) => {
                store.replace(&credentials, scopes)
            }
            (Tenancy::Shared(registry), Stored::Shared(tasks)) => {
                let _writer = registry.writer.lock().await;
                registry.adopt(tasks);
            }
            (Tenancy::Single(_), Stored::Shared(_)) => {
                log::error!("state file holds a shared-mode task registry; this process serves one task: ignored")
            }
            (Tenancy::Shared(_), Stored::Single(_)) => {
                log::error!("state file holds single-task credentials; this process is in shared mode: ignored")
            }
        }
    }
}
