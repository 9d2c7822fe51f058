//! Trust anchors for upstream TLS.
//!
//! Without `--ca-file`, Pingora's rustls connector already trusts the platform roots
//! (honouring `SSL_CERT_FILE` and `SSL_CERT_DIR`). Pingora's own CA-file option *replaces*
//! those roots, but `--ca-file` must *add* to them, so the combined list is built once here
//! and attached to each upstream peer.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use pingora_core::protocols::tls::CaType;
use pingora_core::utils::tls::{parse_x509, WrappedX509};

#[derive(Debug)]
pub enum CaError {
    Read(String, std::io::Error),
    NoCertificates(String),
    BadPem(String),
}

impl fmt::Display for CaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read(path, e) => write!(f, "cannot read CA file {path}: {e}"),
            Self::NoCertificates(path) => write!(f, "CA file {path} holds no PEM certificate"),
            Self::BadPem(path) => write!(f, "CA file {path} holds a malformed PEM certificate"),
        }
    }
}

impl std::error::Error for CaError {}

/// A `CERTIFICATE` block that is unterminated or not base64.
#[derive(Debug, PartialEq, Eq)]
pub struct MalformedPem;

/// DER bodies of every `CERTIFICATE` block in a PEM text.
pub fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, MalformedPem> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut certs = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let body_start = start + BEGIN.len();
        let end = rest[body_start..].find(END).ok_or(MalformedPem)? + body_start;
        let b64: String = rest[body_start..end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        certs.push(STANDARD.decode(b64).map_err(|_| MalformedPem)?);
        rest = &rest[end + END.len()..];
    }
    Ok(certs)
}

/// Wraps DER certificates for Pingora, skipping any its X.509 parser would reject
/// (it panics on malformed input, and one odd platform root must not take the proxy down).
fn wrap(der: Vec<u8>) -> Option<WrappedX509> {
    std::panic::catch_unwind(|| WrappedX509::new(der, parse_x509)).ok()
}

/// Platform roots plus the certificates in `extra`, ready to attach to peers.
pub fn roots_with_extra(extra: &Path) -> Result<Arc<CaType>, CaError> {
    let name = extra.display().to_string();
    let pem = std::fs::read_to_string(extra).map_err(|e| CaError::Read(name.clone(), e))?;
    let extra = pem_certificates(&pem).map_err(|_| CaError::BadPem(name.clone()))?;
    if extra.is_empty() {
        return Err(CaError::NoCertificates(name));
    }
    let mut all = Vec::new();
    for der in extra {
        all.push(wrap(der).ok_or_else(|| CaError::BadPem(name.clone()))?);
    }
    match pingora_core::tls::load_native_certs() {
        Ok(native) => all.extend(native.into_iter().filter_map(|c| wrap(c.to_vec()))),
        Err(e) => log::warn!("cannot load the platform's CA certificates: {e}"),
    }
    Ok(all.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_pem_blocks() {
        let pem = "junk\n-----BEGIN CERTIFICATE-----\nAAEC\nAw==\n-----END CERTIFICATE-----\n\
                   -----BEGIN CERTIFICATE-----\nBA==\n-----END CERTIFICATE-----\n";
        assert_eq!(pem_certificates(pem), Ok(vec![vec![0, 1, 2, 3], vec![4]]));
        assert_eq!(pem_certificates("nothing"), Ok(vec![]));
        assert!(
            pem_certificates("-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----").is_err()
        );
        assert!(pem_certificates("-----BEGIN CERTIFICATE-----\nAAEC").is_err());
    }
}
