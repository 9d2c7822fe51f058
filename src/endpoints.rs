//! The two endpoints the proxy answers itself: `/bewit` and `/credentials` (spec §5.6, §5.7).
//!
//! Pure request → outcome functions; `proxy` does the socket I/O around them.

use std::fmt;

use crate::credentials::Identity;
use crate::url::{AbsoluteUrl, UrlError};

/// Bewits from `/bewit` are valid for one hour, as in the Go proxy.
pub const BEWIT_TTL_SECS: u64 = 3600;
/// Largest body accepted by `/bewit` and `/credentials`.
pub const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum BewitError {
    NotUtf8,
    Empty,
    Url(UrlError),
}

impl fmt::Display for BewitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUtf8 => f.write_str("bewit: the request body must be a URL in UTF-8"),
            Self::Empty => f.write_str("bewit: the request body must be the URL to sign"),
            Self::Url(e) => write!(f, "bewit: cannot sign this URL: {e}"),
        }
    }
}

impl std::error::Error for BewitError {}

/// Signs the URL in a `/bewit` body: the bewit is appended as `?bewit=` or `&bewit=` and the
/// rest of the URL is left byte-for-byte as given (the Go proxy re-sorts and re-escapes the
/// query, which invalidates the MAC). A fragment is not sent to servers, so it is neither
/// signed nor displaced: it stays at the end.
pub fn signed_url(identity: &Identity, body: &[u8], now: u64) -> Result<String, BewitError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| BewitError::NotUtf8)?
        .trim();
    if text.is_empty() {
        return Err(BewitError::Empty);
    }
    let url = AbsoluteUrl::parse(text).map_err(BewitError::Url)?;
    let path = if url.path.is_empty() { "/" } else { url.path };
    let mut resource = String::with_capacity(path.len() + url.query.map_or(0, |q| q.len() + 1));
    resource.push_str(path);
    if let Some(query) = url.query {
        resource.push('?');
        resource.push_str(query);
    }
    let bewit = identity.bewit(
        resource.as_bytes(),
        &url.origin.host,
        url.origin.port,
        now + BEWIT_TTL_SECS,
    );
    let mut signed = String::with_capacity(text.len() + bewit.len() + 9);
    signed.push_str(url.prefix);
    signed.push_str(&resource);
    signed.push_str(if url.query.is_some() {
        "&bewit="
    } else {
        "?bewit="
    });
    signed.push_str(&bewit);
    if let Some(fragment) = url.fragment {
        signed.push('#');
        signed.push_str(fragment);
    }
    Ok(signed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::Credentials;
    use crate::signing::{bewit, HawkKey};

    fn identity() -> Identity {
        Identity::new(
            &Credentials::new("tester", "no-secret", None).unwrap(),
            None,
        )
    }

    #[test]
    fn b1_vector_through_the_endpoint() {
        let url = signed_url(
            &identity(),
            b"  https://tc.example.com/api/auth/v1/test-authenticate-get/\n",
            1700000000,
        )
        .unwrap();
        assert_eq!(
            url,
            "https://tc.example.com/api/auth/v1/test-authenticate-get/?bewit=dGVzdGVyXDE3MDAwMDM2MDBcK01QcW5IMVozMUFkdnVDT0F3Q0ZweFJzZnU0bEVPdEhBZnlERkRTWlZMZz1c"
        );
    }

    #[test]
    fn query_is_kept_verbatim_and_signed_as_given() {
        let key = HawkKey::new("no-secret");
        for (input, resource, joiner) in [
            ("https://h/p?b=1&a=2", "/p?b=1&a=2", "&"),
            ("https://h/p?scope=queue:get", "/p?scope=queue:get", "&"),
            ("https://h/p?", "/p?", "&"),
            ("https://h", "/", "?"),
        ] {
            let url = signed_url(&identity(), input.as_bytes(), 100).unwrap();
            let expected = bewit("tester", &key, "", resource.as_bytes(), "h", 443, 3700);
            let base = if input == "https://h" {
                "https://h/"
            } else {
                input
            };
            assert_eq!(url, format!("{base}{joiner}bewit={expected}"));
        }
    }

    #[test]
    fn fragment_stays_last_and_unsigned() {
        let key = HawkKey::new("no-secret");
        let url = signed_url(&identity(), b"http://H:8080/p?x=1#top", 0).unwrap();
        let expected = bewit("tester", &key, "", b"/p?x=1", "h", 8080, 3600);
        assert_eq!(url, format!("http://H:8080/p?x=1&bewit={expected}#top"));
    }

    #[test]
    fn unusable_bodies() {
        assert_eq!(signed_url(&identity(), b"", 0), Err(BewitError::Empty));
        assert_eq!(
            signed_url(&identity(), b"\xff", 0),
            Err(BewitError::NotUtf8)
        );
        assert!(matches!(
            signed_url(&identity(), b"/relative/path", 0),
            Err(BewitError::Url(UrlError::NotAbsolute))
        ));
        assert!(matches!(
            signed_url(&identity(), b"ftp://h/p", 0),
            Err(BewitError::Url(UrlError::UnsupportedScheme(_)))
        ));
    }
}
