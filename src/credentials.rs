//! Credentials, their validation, and the lock-free store the hot path reads.
//!
//! Everything a request needs from the credentials (keyed HMAC, encoded `ext`, response
//! header values) is computed once per rotation into an [`Identity`]; requests take an
//! `Arc` snapshot with one atomic load and never hold a lock across upstream I/O.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
use serde::Deserialize;
use serde_json::Value;

use crate::signing::{self, HawkKey};

/// The server rejects `Authorization` headers longer than this (spec §1.4).
pub const SERVER_HEADER_LIMIT: usize = 4096;

/// Why credentials were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialsError {
    MissingClientId,
    MissingAccessToken,
    InvalidClientId,
    InvalidCertificate(String),
    InvalidJson(String),
}

impl fmt::Display for CredentialsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingClientId => f.write_str("clientId is missing or empty"),
            Self::MissingAccessToken => f.write_str("accessToken is missing or empty"),
            Self::InvalidClientId => f.write_str(
                "clientId contains characters Taskcluster does not allow (allowed: A-Z a-z 0-9 ! @ / : . + | _ -)",
            ),
            Self::InvalidCertificate(why) => write!(f, "invalid certificate: {why}"),
            Self::InvalidJson(why) => write!(f, "invalid JSON: {why}"),
        }
    }
}

impl std::error::Error for CredentialsError {}

/// A temporary-credential certificate, kept as the compact JSON text of the object it was
/// given as (key order and unknown keys preserved, unlike the Go proxy; shared, since a
/// shared proxy holds one per task) plus the fields the proxy reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Certificate {
    text: Arc<str>,
    scopes: Vec<String>,
    expiry_ms: f64,
}

impl Certificate {
    /// Parses and checks the shape the server requires (spec §2.3), so a bad certificate is
    /// refused when it is handed over rather than failing every later request.
    pub fn parse(text: &str) -> Result<Self, CredentialsError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| CredentialsError::InvalidCertificate(format!("not JSON: {e}")))?;
        Self::from_value(value)
    }

    pub fn from_value(value: Value) -> Result<Self, CredentialsError> {
        let bad = |why: &str| Err(CredentialsError::InvalidCertificate(why.to_string()));
        let Value::Object(object) = value else {
            return bad("must be a JSON object");
        };
        if object.get("version").and_then(Value::as_u64) != Some(1) {
            return bad("version must be 1");
        }
        match object.get("seed").and_then(Value::as_str) {
            Some(seed) if seed.len() == 44 => {}
            _ => return bad("seed must be a 44-character string"),
        }
        if !object.get("start").is_some_and(Value::is_number) {
            return bad("start must be a number");
        }
        let Some(expiry_ms) = object.get("expiry").and_then(Value::as_f64) else {
            return bad("expiry must be a number");
        };
        if !object.get("signature").is_some_and(Value::is_string) {
            return bad("signature must be a string");
        }
        if object.get("issuer").is_some_and(|i| !i.is_string()) {
            return bad("issuer must be a string");
        }
        let Some(scope_values) = object.get("scopes").and_then(Value::as_array) else {
            return bad("scopes must be an array of strings");
        };
        let mut scopes = Vec::with_capacity(scope_values.len());
        for scope in scope_values {
            match scope.as_str() {
                Some(s) => scopes.push(s.to_string()),
                None => return bad("scopes must be an array of strings"),
            }
        }
        Ok(Certificate {
            text: Value::Object(object).to_string().into(),
            scopes,
            expiry_ms,
        })
    }

    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// The certificate as compact JSON text, the form Taskcluster hands it out in.
    pub fn to_json_string(&self) -> String {
        self.text.to_string()
    }

    /// Expiry as Unix milliseconds.
    pub fn expiry_ms(&self) -> f64 {
        self.expiry_ms
    }
}

/// Taskcluster credentials. `Debug` never shows the access token.
#[derive(Clone, PartialEq)]
pub struct Credentials {
    pub client_id: String,
    access_token: String,
    pub certificate: Option<Certificate>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id)
            .field("access_token", &"<redacted>")
            .field("certificate", &self.certificate.is_some())
            .finish()
    }
}

/// Client IDs match `^[A-Za-z0-9!@/:.+|_-]+$`; this also keeps `"` and `\` out of the header.
fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!@/:.+|_-".contains(&b))
}

impl Credentials {
    /// Validates and builds credentials; an empty certificate means permanent credentials.
    pub fn new(
        client_id: &str,
        access_token: &str,
        certificate: Option<&str>,
    ) -> Result<Self, CredentialsError> {
        let certificate = match certificate.map(str::trim) {
            None | Some("") => None,
            Some(text) => Some(Certificate::parse(text)?),
        };
        Self::from_parts(client_id, access_token, certificate)
    }

    fn from_parts(
        client_id: &str,
        access_token: &str,
        certificate: Option<Certificate>,
    ) -> Result<Self, CredentialsError> {
        if client_id.is_empty() {
            return Err(CredentialsError::MissingClientId);
        }
        if !valid_client_id(client_id) {
            return Err(CredentialsError::InvalidClientId);
        }
        if access_token.is_empty() {
            return Err(CredentialsError::MissingAccessToken);
        }
        Ok(Credentials {
            client_id: client_id.to_string(),
            access_token: access_token.to_string(),
            certificate,
        })
    }

    pub fn access_token(&self) -> &str {
        &self.access_token
    }

    /// Parses a `PUT /credentials` body: `{"clientId", "accessToken", "certificate"?}`, where the
    /// certificate is the certificate JSON as a string (as Taskcluster hands it out) or, for
    /// convenience, the object itself. Unknown keys are ignored, like the Go proxy.
    pub fn from_json(body: &[u8]) -> Result<Self, CredentialsError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Body {
            client_id: Option<String>,
            access_token: Option<String>,
            certificate: Option<Value>,
        }
        let body: Body = serde_json::from_slice(body)
            .map_err(|e| CredentialsError::InvalidJson(e.to_string()))?;
        let certificate = match body.certificate {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) => Some(Certificate::parse(&s)?),
            Some(v @ Value::Object(_)) => Some(Certificate::from_value(v)?),
            Some(_) => {
                return Err(CredentialsError::InvalidCertificate(
                    "must be the certificate JSON (a string) or a JSON object".into(),
                ))
            }
        };
        Self::from_parts(
            body.client_id.as_deref().unwrap_or(""),
            body.access_token.as_deref().unwrap_or(""),
            certificate,
        )
    }
}

/// The `ext` JSON (spec §2.2): certificate as an object, then `authorizedScopes` when configured
/// (`[]` kept distinct from absent); `None` when neither applies, so no `ext` is sent at all.
pub fn ext_json(
    certificate: Option<&Certificate>,
    authorized_scopes: Option<&[String]>,
) -> Option<String> {
    if certificate.is_none() && authorized_scopes.is_none() {
        return None;
    }
    // Written out as serde_json writes a map with these keys in this order.
    let mut ext = String::from("{");
    if let Some(cert) = certificate {
        ext.push_str("\"certificate\":");
        ext.push_str(&cert.text);
    }
    if let Some(scopes) = authorized_scopes {
        if certificate.is_some() {
            ext.push(',');
        }
        ext.push_str("\"authorizedScopes\":");
        ext.push_str(&scopes_json(scopes).to_string());
    }
    ext.push('}');
    Some(ext)
}

fn scopes_json(scopes: &[String]) -> Value {
    Value::Array(scopes.iter().cloned().map(Value::String).collect())
}

/// Response headers describing the credentials (spec §5.5), as ready-made values.
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    pub list: Vec<(&'static str, HeaderValue)>,
}

/// Everything signing needs for one set of credentials, computed once per rotation.
pub struct Identity {
    credentials: Credentials,
    authorized_scopes: Option<Vec<String>>,
    client_id: String,
    key: HawkKey,
    ext: String,
    certificate_expiry_ms: Option<f64>,
    headers: IdentityHeaders,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("client_id", &self.client_id)
            .field("temporary", &self.certificate_expiry_ms.is_some())
            .finish_non_exhaustive()
    }
}

fn header_value(text: &str) -> HeaderValue {
    // JSON arrays of printable scopes and validated client ids are always valid values;
    // anything else (non-visible bytes in a scope) degrades to an empty value, never a panic.
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

impl Identity {
    pub fn new(credentials: &Credentials, authorized_scopes: Option<&[String]>) -> Self {
        let ext = ext_json(credentials.certificate.as_ref(), authorized_scopes)
            .map(|json| signing::encode_ext(&json))
            .unwrap_or_default();
        let mut list = vec![
            (
                "X-Taskcluster-Proxy-Version",
                HeaderValue::from_static(crate::VERSION),
            ),
            (
                "X-Taskcluster-Proxy-Revision",
                HeaderValue::from_static(crate::REVISION),
            ),
        ];
        match &credentials.certificate {
            None => list.push((
                "X-Taskcluster-Proxy-Perm-ClientId",
                header_value(&credentials.client_id),
            )),
            Some(cert) => {
                list.push((
                    "X-Taskcluster-Proxy-Temp-ClientId",
                    header_value(&credentials.client_id),
                ));
                list.push((
                    "X-Taskcluster-Proxy-Temp-Scopes",
                    header_value(&scopes_json(cert.scopes()).to_string()),
                ));
            }
        }
        if let Some(scopes) = authorized_scopes {
            list.push((
                "X-Taskcluster-Authorized-Scopes",
                header_value(&scopes_json(scopes).to_string()),
            ));
        }
        Identity {
            credentials: credentials.clone(),
            authorized_scopes: authorized_scopes.map(<[String]>::to_vec),
            client_id: credentials.client_id.clone(),
            key: HawkKey::new(&credentials.access_token),
            ext,
            certificate_expiry_ms: credentials.certificate.as_ref().map(Certificate::expiry_ms),
            headers: IdentityHeaders { list },
        }
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The credentials this identity signs with.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    pub fn authorized_scopes(&self) -> Option<&[String]> {
        self.authorized_scopes.as_deref()
    }

    /// Expiry of the temporary certificate (Unix ms); `None` for permanent credentials.
    pub fn certificate_expiry_ms(&self) -> Option<f64> {
        self.certificate_expiry_ms
    }

    pub fn headers(&self) -> &IdentityHeaders {
        &self.headers
    }

    /// The `Authorization` header for a request, with a fresh ts and nonce.
    pub fn authorization(&self, target: &signing::Target<'_>) -> String {
        signing::authorization_header(
            &self.client_id,
            &self.key,
            &self.ext,
            target,
            signing::unix_now(),
            &signing::nonce(),
        )
    }

    /// The `Authorization` header signed with an explicit encoded `ext` instead of this
    /// identity's own (per-request scope narrowing, see `scopes::narrow_identity`), with a
    /// fresh ts and nonce.
    pub fn authorization_with_ext(&self, ext: &str, target: &signing::Target<'_>) -> String {
        signing::authorization_header(
            &self.client_id,
            &self.key,
            ext,
            target,
            signing::unix_now(),
            &signing::nonce(),
        )
    }

    /// A bewit valid until `exp` (Unix seconds) for a GET of `resource` on `host:port`.
    pub fn bewit(&self, resource: &[u8], host: &str, port: u16, exp: u64) -> String {
        signing::bewit(
            &self.client_id,
            &self.key,
            &self.ext,
            resource,
            host,
            port,
            exp,
        )
    }

    /// Longest `Authorization` header these credentials can produce.
    pub fn max_header_len(&self) -> usize {
        signing::authorization_header_max_len(&self.client_id, &self.ext)
    }
}

/// The current credentials. Reads are one atomic load; a rotation swaps a new snapshot in
/// and never waits for in-flight requests, which keep the snapshot they started with.
pub struct CredentialStore {
    current: ArcSwap<Identity>,
}

impl CredentialStore {
    pub fn new(credentials: &Credentials, authorized_scopes: Option<Vec<String>>) -> Self {
        let identity = Identity::new(credentials, authorized_scopes.as_deref());
        warn_about_limits(&identity);
        CredentialStore {
            current: ArcSwap::from_pointee(identity),
        }
    }

    pub fn current(&self) -> Arc<Identity> {
        self.current.load_full()
    }

    /// Replaces the credentials; `authorizedScopes` are kept, as in the Go proxy.
    pub fn rotate(&self, credentials: &Credentials) {
        let scopes = self.current.load().authorized_scopes.clone();
        self.replace(credentials, scopes);
    }

    /// Replaces credentials and scopes together (state adopted from another process).
    pub fn replace(&self, credentials: &Credentials, authorized_scopes: Option<Vec<String>>) {
        let identity = Identity::new(credentials, authorized_scopes.as_deref());
        warn_about_limits(&identity);
        log::info!(
            "credentials rotated: clientId={} ({})",
            identity.client_id(),
            if identity.certificate_expiry_ms().is_some() {
                "temporary"
            } else {
                "permanent"
            }
        );
        self.current.store(Arc::new(identity));
        crate::metrics::METRICS.rotations.inc();
    }

    pub fn authorized_scopes(&self) -> Option<Vec<String>> {
        self.current.load().authorized_scopes.clone()
    }
}

/// Warn this long before a temporary certificate expires.
const EXPIRY_WARNING_MS: f64 = 10.0 * 60.0 * 1000.0;

fn warn_about_limits(identity: &Identity) {
    if let Some(expiry) = identity.certificate_expiry_ms() {
        let now_ms = signing::unix_now() as f64 * 1000.0;
        if expiry <= now_ms {
            log::error!(
                "the temporary certificate of clientId {} has expired: every request will fail \
                 with 401 until credentials are rotated (PUT /credentials)",
                identity.client_id()
            );
        } else if expiry - now_ms < EXPIRY_WARNING_MS {
            log::warn!(
                "the temporary certificate of clientId {} expires in {:.0} s",
                identity.client_id(),
                (expiry - now_ms) / 1000.0
            );
        }
    }
    let len = identity.max_header_len();
    if len > SERVER_HEADER_LIMIT {
        log::error!(
            "the Authorization header for clientId {} can reach {len} characters, over the \
             Taskcluster server's limit of {SERVER_HEADER_LIMIT}: requests will fail with 401 \
             (too many authorizedScopes or certificate scopes)",
            identity.client_id()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT_UNNAMED: &str = r#"{"version":1,"scopes":["scope/asd:fhjdf/X","scope/asd:fhjdf/XYZ*"],"start":1438964811744,"expiry":1439051211744,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"45AlB/hKZZZz4Tf3NaidutasfgBnr4t2AxwBiGDQF9Q="}"#;
    const CERT_NAMED: &str = r#"{"version":1,"scopes":["scope/asd:fhjdf/X","scope/asd:fhjdf/XYZ*"],"start":1438964811744,"expiry":1439051211744,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"nNEaLtZMiw627NuDbF5Z8HDFc57MGWCptXBQSYNFgBk=","issuer":"def/ghi@XXX"}"#;

    #[test]
    fn ext_matches_spec_vectors_h3_and_h5() {
        let named = Certificate::parse(CERT_NAMED).unwrap();
        let scopes = vec!["scope/asd:fhjdf/X".to_string()];
        assert_eq!(
            ext_json(Some(&named), Some(&scopes)).unwrap(),
            format!(r#"{{"certificate":{CERT_NAMED},"authorizedScopes":["scope/asd:fhjdf/X"]}}"#)
        );
        let unnamed = Certificate::parse(CERT_UNNAMED).unwrap();
        assert_eq!(
            signing::encode_ext(&ext_json(Some(&unnamed), None).unwrap()),
            "eyJjZXJ0aWZpY2F0ZSI6eyJ2ZXJzaW9uIjoxLCJzY29wZXMiOlsic2NvcGUvYXNkOmZoamRmL1giLCJzY29wZS9hc2Q6ZmhqZGYvWFlaKiJdLCJzdGFydCI6MTQzODk2NDgxMTc0NCwiZXhwaXJ5IjoxNDM5MDUxMjExNzQ0LCJzZWVkIjoiSllSNHd6TUNURzZYZURTMmNEVUNNd0gwUkZVWEdmUWpLN0xncUQtZTZsU1EiLCJzaWduYXR1cmUiOiI0NUFsQi9oS1paWno0VGYzTmFpZHV0YXNmZ0JucjR0MkF4d0JpR0RRRjlRPSJ9fQ=="
        );
    }

    #[test]
    fn ext_absent_vs_empty_scopes() {
        assert_eq!(ext_json(None, None), None);
        assert_eq!(
            ext_json(None, Some(&[])).unwrap(),
            r#"{"authorizedScopes":[]}"#
        );
    }

    #[test]
    fn certificate_whitespace_and_unknown_keys_survive_compactly() {
        let cert = Certificate::parse(
            "{ \"version\": 1, \"x-extra\": true, \"scopes\": [], \"start\": 1, \"expiry\": 2,\n \"seed\": \"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ\", \"signature\": \"s\" }",
        )
        .unwrap();
        assert_eq!(
            ext_json(Some(&cert), None).unwrap(),
            r#"{"certificate":{"version":1,"x-extra":true,"scopes":[],"start":1,"expiry":2,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"s"}}"#
        );
    }

    #[test]
    fn certificate_shape_is_checked() {
        for bad in [
            "not json",
            "[]",
            r#""a string""#,
            r#"{"version":2,"scopes":[],"start":1,"expiry":2,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"s"}"#,
            r#"{"version":1,"scopes":[],"start":1,"expiry":2,"seed":"short","signature":"s"}"#,
            r#"{"version":1,"scopes":[1],"start":1,"expiry":2,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"s"}"#,
            r#"{"version":1,"scopes":[],"start":"1","expiry":2,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"s"}"#,
            r#"{"version":1,"scopes":[],"start":1,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"s"}"#,
            r#"{"version":1,"scopes":[],"start":1,"expiry":2,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ"}"#,
            r#"{"version":1,"scopes":[],"start":1,"expiry":2,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"s","issuer":7}"#,
        ] {
            assert!(
                matches!(
                    Certificate::parse(bad),
                    Err(CredentialsError::InvalidCertificate(_))
                ),
                "accepted {bad}"
            );
        }
    }

    #[test]
    fn credentials_json_body() {
        let ok = Credentials::from_json(
            format!(
                r#"{{"clientId":"abc/def/ghi","accessToken":"t","certificate":{},"extra":1}}"#,
                serde_json::to_string(CERT_NAMED).unwrap()
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(ok.client_id, "abc/def/ghi");
        assert_eq!(ok.certificate.unwrap().scopes().len(), 2);

        let perm =
            Credentials::from_json(br#"{"clientId":"a","accessToken":"t","certificate":""}"#)
                .unwrap();
        assert!(perm.certificate.is_none());

        assert_eq!(
            Credentials::from_json(b"{}"),
            Err(CredentialsError::MissingClientId)
        );
        assert_eq!(
            Credentials::from_json(br#"{"clientId":"a"}"#),
            Err(CredentialsError::MissingAccessToken)
        );
        assert_eq!(
            Credentials::from_json(br#"{"clientId":"a\"b","accessToken":"t"}"#),
            Err(CredentialsError::InvalidClientId)
        );
        assert!(matches!(
            Credentials::from_json(b""),
            Err(CredentialsError::InvalidJson(_))
        ));
        assert!(matches!(
            Credentials::from_json(b"null"),
            Err(CredentialsError::InvalidJson(_))
        ));
        assert!(matches!(
            Credentials::from_json(br#"{"clientId":"a","accessToken":"t","certificate":"{}"}"#),
            Err(CredentialsError::InvalidCertificate(_))
        ));
        assert!(matches!(
            Credentials::from_json(br#"{"clientId":"a","accessToken":"t","certificate":5}"#),
            Err(CredentialsError::InvalidCertificate(_))
        ));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let creds = Credentials::new("a", "sekrit-token", None).unwrap();
        assert!(!format!("{creds:?}").contains("sekrit"));
        let identity = Identity::new(&creds, None);
        assert!(!format!("{identity:?}").contains("sekrit"));
    }

    #[test]
    fn headers_describe_perm_and_temp_credentials() {
        let perm = Identity::new(&Credentials::new("p", "t", None).unwrap(), None);
        let names: Vec<_> = perm.headers().list.iter().map(|(n, _)| *n).collect();
        assert!(names.contains(&"X-Taskcluster-Proxy-Perm-ClientId"));
        assert!(!names.contains(&"X-Taskcluster-Authorized-Scopes"));

        let scopes = vec!["a:b".to_string()];
        let temp = Identity::new(
            &Credentials::new("abc/def/ghi", "t", Some(CERT_NAMED)).unwrap(),
            Some(&scopes),
        );
        let get = |name: &str| {
            temp.headers()
                .list
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(
            get("X-Taskcluster-Proxy-Temp-ClientId").unwrap(),
            "abc/def/ghi"
        );
        assert_eq!(
            get("X-Taskcluster-Proxy-Temp-Scopes").unwrap(),
            r#"["scope/asd:fhjdf/X","scope/asd:fhjdf/XYZ*"]"#
        );
        assert_eq!(
            get("X-Taskcluster-Authorized-Scopes").unwrap(),
            r#"["a:b"]"#
        );
        assert!(get("X-Taskcluster-Proxy-Perm-ClientId").is_none());
    }

    #[test]
    fn rotation_swaps_snapshot_and_keeps_scopes() {
        let store = CredentialStore::new(
            &Credentials::new("one", "t1", None).unwrap(),
            Some(vec!["s".into()]),
        );
        let before = store.current();
        store.rotate(&Credentials::new("two", "t2", None).unwrap());
        assert_eq!(before.client_id(), "one");
        assert_eq!(store.current().client_id(), "two");
        assert_eq!(store.authorized_scopes(), Some(vec!["s".to_string()]));
    }
}
