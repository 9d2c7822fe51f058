//! Hawk signing as Taskcluster's server verifies it (wire spec §1–§3).
//!
//! Pure: callers pass the clock and nonce in, so every vector of spec §8 is reproducible.
//! A [`HawkKey`] keeps the HMAC state keyed once; each signature clones it instead of
//! re-deriving the key schedule.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// An HMAC-SHA256 key (the access token's UTF-8 bytes, never base64-decoded).
#[derive(Clone)]
pub struct HawkKey(HmacSha256);

impl HawkKey {
    pub fn new(access_token: &str) -> Self {
        // HMAC accepts keys of any length; this cannot fail.
        HawkKey(HmacSha256::new_from_slice(access_token.as_bytes()).expect("HMAC takes any key"))
    }

    /// `base64_std_padded(HMAC(key, parts...))`
    fn mac(&self, parts: &[&[u8]]) -> String {
        let mut mac = self.0.clone();
        for part in parts {
            mac.update(part);
        }
        STANDARD.encode(mac.finalize().into_bytes())
    }
}

impl std::fmt::Debug for HawkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HawkKey(<redacted>)")
    }
}

/// What a signature covers besides the credentials: the request as the upstream sees it.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Upper-case method.
    pub method: &'a str,
    /// Request-target bytes exactly as sent: raw path plus `?query` if any.
    pub resource: &'a [u8],
    /// Lower-case host; IPv6 literals keep their brackets.
    pub host: &'a str,
    /// Explicit port, or the scheme default.
    pub port: u16,
}

/// The Hawk MAC over the `hawk.1.<kind>` normalized string (spec §1.2, §3.2).
fn normalized_mac(
    key: &HawkKey,
    kind: &str,
    ts: &str,
    nonce: &str,
    target: &Target<'_>,
    ext: &str,
) -> String {
    let port = target.port.to_string();
    key.mac(&[
        b"hawk.1.",
        kind.as_bytes(),
        b"\n",
        ts.as_bytes(),
        b"\n",
        nonce.as_bytes(),
        b"\n",
        target.method.as_bytes(),
        b"\n",
        target.resource,
        b"\n",
        target.host.as_bytes(),
        b"\n",
        port.as_bytes(),
        b"\n\n", // empty payload-hash line: the proxy never sends a hash, so bodies can stream
        ext.as_bytes(),
        b"\n",
    ])
}

/// Builds the `Authorization` header value: `Hawk id="…", mac="…", ts="…", nonce="…"[, ext="…"]`.
///
/// `ext` is the already-encoded ext string, empty when there is none (spec §2.2).
pub fn authorization_header(
    client_id: &str,
    key: &HawkKey,
    ext: &str,
    target: &Target<'_>,
    ts: u64,
    nonce: &str,
) -> String {
    let ts = ts.to_string();
    let mac = normalized_mac(key, "header", &ts, nonce, target, ext);
    let mut header = String::with_capacity(64 + client_id.len() + nonce.len() + ext.len());
    header.push_str("Hawk id=\"");
    header.push_str(client_id);
    header.push_str("\", mac=\"");
    header.push_str(&mac);
    header.push_str("\", ts=\"");
    header.push_str(&ts);
    header.push_str("\", nonce=\"");
    header.push_str(nonce);
    header.push('"');
    if !ext.is_empty() {
        header.push_str(", ext=\"");
        header.push_str(ext);
        header.push('"');
    }
    header
}

/// Upper bound of the header length for these credentials (ts and nonce at their widest),
/// to warn when the server's 4096-character limit would reject every request (spec §7.14).
pub fn authorization_header_max_len(client_id: &str, ext: &str) -> usize {
    let fixed = r#"Hawk id="", mac="", ts="", nonce="""#.len();
    let ext_part = if ext.is_empty() {
        0
    } else {
        r#", ext="""#.len() + ext.len()
    };
    fixed + client_id.len() + 44 + 20 + NONCE_LEN + ext_part
}

/// Builds a bewit (spec §3.1): `base64url_nopad(id \ exp \ mac \ ext)`, GET only.
pub fn bewit(
    client_id: &str,
    key: &HawkKey,
    ext: &str,
    resource: &[u8],
    host: &str,
    port: u16,
    exp: u64,
) -> String {
    let exp = exp.to_string();
    let target = Target {
        method: "GET",
        resource,
        host,
        port,
    };
    let mac = normalized_mac(key, "bewit", &exp, "", &target, ext);
    let raw = [client_id, exp.as_str(), mac.as_str(), ext].join("\\");
    URL_SAFE_NO_PAD.encode(raw)
}

/// `base64_std_padded(json)`, the ext encoding Taskcluster clients use.
pub fn encode_ext(json: &str) -> String {
    STANDARD.encode(json)
}

/// Length of the nonces [`Nonces`] produces.
pub const NONCE_LEN: usize = 11;

/// Fresh per-request nonces: 64 random bits, URL-safe base64 (no `+`/`/`/`=` to quote).
///
/// The server keeps no nonce cache, so uniqueness is courtesy, not security; a thread-local
/// seeded RNG keeps this off any shared state.
pub fn nonce() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Current Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMP_TOKEN: &str = "R4OVHWpIvy6KsqS4AWE51QwbvgLvsstS6e6UW8IfHUY";
    const H3_EXT: &str = "eyJjZXJ0aWZpY2F0ZSI6eyJ2ZXJzaW9uIjoxLCJzY29wZXMiOlsic2NvcGUvYXNkOmZoamRmL1giLCJzY29wZS9hc2Q6ZmhqZGYvWFlaKiJdLCJzdGFydCI6MTQzODk2NDgxMTc0NCwiZXhwaXJ5IjoxNDM5MDUxMjExNzQ0LCJzZWVkIjoiSllSNHd6TUNURzZYZURTMmNEVUNNd0gwUkZVWEdmUWpLN0xncUQtZTZsU1EiLCJzaWduYXR1cmUiOiJuTkVhTHRaTWl3NjI3TnVEYkY1WjhIREZjNTdNR1dDcHRYQlFTWU5GZ0JrPSIsImlzc3VlciI6ImRlZi9naGlAWFhYIn0sImF1dGhvcml6ZWRTY29wZXMiOlsic2NvcGUvYXNkOmZoamRmL1giXX0=";
    const H5_EXT: &str = "eyJjZXJ0aWZpY2F0ZSI6eyJ2ZXJzaW9uIjoxLCJzY29wZXMiOlsic2NvcGUvYXNkOmZoamRmL1giLCJzY29wZS9hc2Q6ZmhqZGYvWFlaKiJdLCJzdGFydCI6MTQzODk2NDgxMTc0NCwiZXhwaXJ5IjoxNDM5MDUxMjExNzQ0LCJzZWVkIjoiSllSNHd6TUNURzZYZURTMmNEVUNNd0gwUkZVWEdmUWpLN0xncUQtZTZsU1EiLCJzaWduYXR1cmUiOiI0NUFsQi9oS1paWno0VGYzTmFpZHV0YXNmZ0JucjR0MkF4d0JpR0RRRjlRPSJ9fQ==";

    #[allow(clippy::too_many_arguments)]
    fn sign(
        id: &str,
        key: &str,
        ext: &str,
        method: &str,
        resource: &str,
        host: &str,
        port: u16,
        ts: u64,
        nonce: &str,
    ) -> String {
        let target = Target {
            method,
            resource: resource.as_bytes(),
            host,
            port,
        };
        authorization_header(id, &HawkKey::new(key), ext, &target, ts, nonce)
    }

    #[test]
    fn vector_h1_permanent_no_ext() {
        assert_eq!(
            sign(
                "tester",
                "no-secret",
                "",
                "GET",
                "/api/queue/v1/task/DSlhVLpwQhS-3fLhmbo1eQ",
                "tc.example.com",
                443,
                1700000000,
                "kB3c9Yz1"
            ),
            r#"Hawk id="tester", mac="ifXNnkCSpZc9Tl/gdlm1rU1KoAoa9c42HG5ErsrBLdU=", ts="1700000000", nonce="kB3c9Yz1""#
        );
    }

    #[test]
    fn vector_h2_authorized_scopes_query_and_odd_nonce() {
        let ext = encode_ext(r#"{"authorizedScopes":["test:authenticate-post"]}"#);
        assert_eq!(
            ext,
            "eyJhdXRob3JpemVkU2NvcGVzIjpbInRlc3Q6YXV0aGVudGljYXRlLXBvc3QiXX0="
        );
        assert_eq!(
            sign(
                "tester",
                "no-secret",
                &ext,
                "POST",
                "/api/auth/v1/test-authenticate?a=1&b=x%2Fy",
                "tc.example.com",
                443,
                1700000000,
                "q+7/ab=Z"
            ),
            r#"Hawk id="tester", mac="TLIgvHzWYOPv9fUyJPHGOpbALHFSnoN9QhCOnDY9hAQ=", ts="1700000000", nonce="q+7/ab=Z", ext="eyJhdXRob3JpemVkU2NvcGVzIjpbInRlc3Q6YXV0aGVudGljYXRlLXBvc3QiXX0=""#
        );
    }

    #[test]
    fn vector_h3_named_temporary_plain_http() {
        assert_eq!(
            sign(
                "abc/def/ghi",
                TEMP_TOKEN,
                H3_EXT,
                "GET",
                "/api/auth/v1/test-authenticate-get/",
                "127.0.0.1",
                60024,
                1439000000,
                "Zm9vYmFy"
            ),
            format!(
                r#"Hawk id="abc/def/ghi", mac="bk4jRkxph1Z0bwYwDW95j88Wx8TiGyYupmuDg4wWfd8=", ts="1439000000", nonce="Zm9vYmFy", ext="{H3_EXT}""#
            )
        );
    }

    #[test]
    fn vector_h4_empty_scopes_explicit_port_raw_path() {
        let ext = encode_ext(r#"{"authorizedScopes":[]}"#);
        assert_eq!(ext, "eyJhdXRob3JpemVkU2NvcGVzIjpbXX0=");
        assert_eq!(
            sign(
                "tester",
                "no-secret",
                &ext,
                "DELETE",
                "/some//path%2Fx?q=1",
                "example.com",
                8443,
                1700000123,
                "AAAAAAAA"
            ),
            r#"Hawk id="tester", mac="/mM80TXNcfSaolu4vWUvZeb2EAZAwfOfdBg8P5V1t3I=", ts="1700000123", nonce="AAAAAAAA", ext="eyJhdXRob3JpemVkU2NvcGVzIjpbXX0=""#
        );
    }

    #[test]
    fn vector_h5_unnamed_temporary() {
        assert_eq!(
            sign(
                "def/ghi@XXX",
                TEMP_TOKEN,
                H5_EXT,
                "PUT",
                "/api/queue/v1/task/abc",
                "tc.example.com",
                443,
                1439000000,
                "Zm9vYmFy"
            ),
            format!(
                r#"Hawk id="def/ghi@XXX", mac="np5s+uoY0SUsw07LVbnrZZHr769Udv9iWbX4wnFkY6E=", ts="1439000000", nonce="Zm9vYmFy", ext="{H5_EXT}""#
            )
        );
    }

    #[test]
    fn vector_b1_bewit_permanent() {
        let b = bewit(
            "tester",
            &HawkKey::new("no-secret"),
            "",
            b"/api/auth/v1/test-authenticate-get/",
            "tc.example.com",
            443,
            1700003600,
        );
        assert_eq!(
            b,
            "dGVzdGVyXDE3MDAwMDM2MDBcK01QcW5IMVozMUFkdnVDT0F3Q0ZweFJzZnU0bEVPdEhBZnlERkRTWlZMZz1c"
        );
    }

    #[test]
    fn vector_b2_bewit_named_temporary() {
        let ext = "eyJjZXJ0aWZpY2F0ZSI6eyJ2ZXJzaW9uIjoxLCJzY29wZXMiOlsic2NvcGUvYXNkOmZoamRmL1giLCJzY29wZS9hc2Q6ZmhqZGYvWFlaKiJdLCJzdGFydCI6MTQzODk2NDgxMTc0NCwiZXhwaXJ5IjoxNDM5MDUxMjExNzQ0LCJzZWVkIjoiSllSNHd6TUNURzZYZURTMmNEVUNNd0gwUkZVWEdmUWpLN0xncUQtZTZsU1EiLCJzaWduYXR1cmUiOiJuTkVhTHRaTWl3NjI3TnVEYkY1WjhIREZjNTdNR1dDcHRYQlFTWU5GZ0JrPSIsImlzc3VlciI6ImRlZi9naGlAWFhYIn0sImF1dGhvcml6ZWRTY29wZXMiOlsic2NvcGUvYXNkOmZoamRmL1hZWmFiYyJdfQ==";
        let b = bewit(
            "abc/def/ghi",
            &HawkKey::new(TEMP_TOKEN),
            ext,
            b"/api/queue/v1/task/DSlhVLpwQhS-3fLhmbo1eQ/artifacts/public%2Flogs%2Flive.log?a=1",
            "tc.example.com",
            443,
            1439003600,
        );
        assert_eq!(b, "YWJjL2RlZi9naGlcMTQzOTAwMzYwMFx4K3BJeXkweUZncnNEc2dPNHcvekpqL1hua0toM3hURlpobW9peXVFSWJJPVxleUpqWlhKMGFXWnBZMkYwWlNJNmV5SjJaWEp6YVc5dUlqb3hMQ0p6WTI5d1pYTWlPbHNpYzJOdmNHVXZZWE5rT21ab2FtUm1MMWdpTENKelkyOXdaUzloYzJRNlptaHFaR1l2V0ZsYUtpSmRMQ0p6ZEdGeWRDSTZNVFF6T0RrMk5EZ3hNVGMwTkN3aVpYaHdhWEo1SWpveE5ETTVNRFV4TWpFeE56UTBMQ0p6WldWa0lqb2lTbGxTTkhkNlRVTlVSelpZWlVSVE1tTkVWVU5OZDBnd1VrWlZXRWRtVVdwTE4weG5jVVF0WlRac1UxRWlMQ0p6YVdkdVlYUjFjbVVpT2lKdVRrVmhUSFJhVFdsM05qSTNUblZFWWtZMVdqaElSRVpqTlRkTlIxZERjSFJZUWxGVFdVNUdaMEpyUFNJc0ltbHpjM1ZsY2lJNkltUmxaaTluYUdsQVdGaFlJbjBzSW1GMWRHaHZjbWw2WldSVFkyOXdaWE1pT2xzaWMyTnZjR1V2WVhOa09tWm9hbVJtTDFoWldtRmlZeUpkZlE9PQ");
    }

    #[test]
    fn nonces_are_fresh_and_quote_safe() {
        let a = nonce();
        let b = nonce();
        assert_eq!(a.len(), NONCE_LEN);
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }

    #[test]
    fn max_len_bounds_real_headers() {
        let ext = encode_ext(r#"{"authorizedScopes":["a"]}"#);
        let target = Target {
            method: "GET",
            resource: b"/x",
            host: "h",
            port: 443,
        };
        let real =
            authorization_header("id", &HawkKey::new("k"), &ext, &target, u64::MAX, &nonce());
        assert!(real.len() <= authorization_header_max_len("id", &ext));
        assert!(real.len() + 12 >= authorization_header_max_len("id", &ext));
    }
}
