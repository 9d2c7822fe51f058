//! Test-side construction of Taskcluster temporary credentials (spec §2.1, §2.4) and of Hawk
//! headers, independent of the crate under test.

use super::verify::{certificate_signature, temp_access_token, Client};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Temporary credentials as a worker would hand them to the proxy.
#[derive(Clone, Debug)]
pub struct TempCreds {
    pub client_id: String,
    pub access_token: String,
    /// The certificate JSON text (what `--certificate` / `TASKCLUSTER_CERTIFICATE` take).
    pub certificate: String,
    pub scopes: Vec<String>,
}

impl TempCreds {
    pub fn certificate_json(&self) -> Value {
        serde_json::from_str(&self.certificate).unwrap()
    }
}

/// Build temporary credentials issued by `issuer`. `named` = Some(new clientId) for named temp
/// credentials (certificate carries `issuer`), None for unnamed (clientId = issuer's).
pub fn make_temp_creds(
    issuer: &Client,
    named: Option<&str>,
    scopes: &[&str],
    start_ms: u64,
    expiry_ms: u64,
    seed: &str,
) -> TempCreds {
    let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
    let client_id = named.unwrap_or(&issuer.client_id).to_string();
    let issuer_field = named.map(|_| issuer.client_id.as_str());
    let signature = certificate_signature(
        &issuer.access_token,
        &client_id,
        issuer_field,
        seed,
        &start_ms.to_string(),
        &expiry_ms.to_string(),
        &scopes,
    );
    let mut cert = json!({
        "version": 1,
        "scopes": scopes,
        "start": start_ms,
        "expiry": expiry_ms,
        "seed": seed,
        "signature": signature,
    });
    if let Some(iss) = issuer_field {
        cert["issuer"] = json!(iss);
    }
    TempCreds {
        client_id,
        access_token: temp_access_token(&issuer.access_token, seed),
        certificate: serde_json::to_string(&cert).unwrap(),
        scopes,
    }
}

/// A fresh 44-character seed (two 22-character slugid-like strings).
pub fn random_seed() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = String::new();
    for _ in 0..2 {
        let mut h = Sha256::new();
        h.update(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                .to_le_bytes(),
        );
        h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        h.update(std::process::id().to_le_bytes());
        out.push_str(&URL_SAFE_NO_PAD.encode(h.finalize())[..22]);
    }
    out
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Temporary credentials valid from one minute ago for one hour.
pub fn fresh_temp_creds(issuer: &Client, named: Option<&str>, scopes: &[&str]) -> TempCreds {
    let now = now_ms();
    make_temp_creds(
        issuer,
        named,
        scopes,
        now - 60_000,
        now + 3_600_000,
        &random_seed(),
    )
}

/// A Hawk Authorization header value built with the `hawk` crate (for tests that talk to the
/// fake directly).
pub fn hawk_header(
    id: &str,
    key: &str,
    method: &str,
    host: &str,
    port: u16,
    target: &str,
    ext: Option<&str>,
) -> String {
    let creds = hawk::Credentials {
        id: id.to_string(),
        key: hawk::Key::new(key.as_bytes(), hawk::SHA256).unwrap(),
    };
    let header = hawk::RequestBuilder::new(method, host, port, target)
        .ext(ext)
        .request()
        .make_header(&creds)
        .unwrap();
    format!("Hawk {header}")
}
