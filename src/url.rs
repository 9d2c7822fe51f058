//! Minimal absolute-URL handling that never normalises.
//!
//! The Hawk MAC must cover the request-target byte for byte (spec §9.1), so general URL
//! libraries (which drop dot segments and re-encode) are unsuitable. This splits an
//! `http(s)://authority/path?query#fragment` string into the pieces signing needs.

use std::fmt;
use std::net::Ipv6Addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Scheme, host and port of an upstream, normalised the way the server computes them
/// (spec §1.3): host lower-cased (IPv6 literals keep brackets), port explicit or default.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub scheme: Scheme,
    /// Lower-case host; IPv6 literals in brackets.
    pub host: String,
    pub port: u16,
}

impl Origin {
    pub fn new(scheme: Scheme, host: &str, port: Option<u16>) -> Self {
        Origin {
            scheme,
            host: host.to_ascii_lowercase(),
            port: port.unwrap_or(scheme.default_port()),
        }
    }

    /// The `Host` header value: the port only when it is not the scheme default.
    pub fn authority(&self) -> String {
        if self.port == self.scheme.default_port() {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// `host:port` with the port always present (for logs).
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Host without IPv6 brackets, for DNS and TLS SNI.
    pub fn bare_host(&self) -> &str {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
    }

    pub fn is_tls(&self) -> bool {
        self.scheme == Scheme::Https
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.authority())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlError {
    NotAbsolute,
    UnsupportedScheme(String),
    MissingHost,
    UserInfo,
    InvalidHost(String),
    InvalidPort(String),
    InvalidCharacter,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAbsolute => f.write_str("expected an absolute http:// or https:// URL"),
            Self::UnsupportedScheme(s) => {
                write!(f, "unsupported URL scheme {s:?} (only http and https)")
            }
            Self::MissingHost => f.write_str("URL has no host"),
            Self::UserInfo => f.write_str("URLs with user information are not supported"),
            Self::InvalidHost(h) => write!(f, "invalid host {h:?}"),
            Self::InvalidPort(p) => write!(f, "invalid port {p:?}"),
            Self::InvalidCharacter => {
                f.write_str("URL contains whitespace, control or non-ASCII characters")
            }
        }
    }
}

impl std::error::Error for UrlError {}

/// An absolute URL split into its parts; borrowed slices of the original text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsoluteUrl<'a> {
    pub origin: Origin,
    /// `scheme://authority` exactly as written.
    pub prefix: &'a str,
    /// Path exactly as written (may be empty).
    pub path: &'a str,
    /// Query without the `?`; `None` when there is no `?` at all.
    pub query: Option<&'a str>,
    /// Fragment without the `#`.
    pub fragment: Option<&'a str>,
}

impl<'a> AbsoluteUrl<'a> {
    pub fn parse(text: &'a str) -> Result<Self, UrlError> {
        if text.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(UrlError::InvalidCharacter);
        }
        let (scheme_text, rest) = text.split_once("://").ok_or(UrlError::NotAbsolute)?;
        let scheme = if scheme_text.eq_ignore_ascii_case("https") {
            Scheme::Https
        } else if scheme_text.eq_ignore_ascii_case("http") {
            Scheme::Http
        } else if !scheme_text.is_empty()
            && scheme_text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            return Err(UrlError::UnsupportedScheme(scheme_text.to_string()));
        } else {
            return Err(UrlError::NotAbsolute);
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        let prefix = &text[..scheme_text.len() + 3 + authority_end];
        let (host, port) = split_authority(authority)?;
        let mut tail = &rest[authority_end..];
        let fragment = match tail.split_once('#') {
            Some((before, frag)) => {
                tail = before;
                Some(frag)
            }
            None => None,
        };
        let (path, query) = match tail.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (tail, None),
        };
        Ok(AbsoluteUrl {
            origin: Origin::new(scheme, host, port),
            prefix,
            path,
            query,
            fragment,
        })
    }
}

/// Splits `host[:port]`, validating the host as a DNS name, IPv4 or bracketed IPv6 literal.
fn split_authority(authority: &str) -> Result<(&str, Option<u16>), UrlError> {
    if authority.contains('@') {
        return Err(UrlError::UserInfo);
    }
    let (host, port) = if authority.starts_with('[') {
        let end = authority
            .find(']')
            .ok_or_else(|| UrlError::InvalidHost(authority.to_string()))?;
        let host = &authority[..=end];
        if host[1..end].parse::<Ipv6Addr>().is_err() {
            return Err(UrlError::InvalidHost(host.to_string()));
        }
        match &authority[end + 1..] {
            "" => (host, None),
            p => match p.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return Err(UrlError::InvalidHost(authority.to_string())),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(UrlError::MissingHost);
    }
    if !host.starts_with('[')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
    {
        return Err(UrlError::InvalidHost(host.to_string()));
    }
    let port = match port {
        None | Some("") => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| UrlError::InvalidPort(p.to_string()))?,
        ),
    };
    Ok((host, port))
}

/// A configured root URL: the origin plus any path prefix, with trailing slashes removed as
/// taskcluster-lib-urls does (spec §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootUrl {
    pub origin: Origin,
    pub base_path: String,
}

impl RootUrl {
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        let url = AbsoluteUrl::parse(text.trim())?;
        if url.query.is_some() || url.fragment.is_some() {
            return Err(UrlError::InvalidCharacter);
        }
        Ok(RootUrl {
            origin: url.origin,
            base_path: url.path.trim_end_matches('/').to_string(),
        })
    }
}

impl fmt::Display for RootUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.origin, self.base_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_without_normalising() {
        let u = AbsoluteUrl::parse("HTTPS://Tc.Example.COM/a/../b//%2F?q=a:b&c#frag").unwrap();
        assert_eq!(u.origin, Origin::new(Scheme::Https, "tc.example.com", None));
        assert_eq!(u.origin.port, 443);
        assert_eq!(u.prefix, "HTTPS://Tc.Example.COM");
        assert_eq!(u.path, "/a/../b//%2F");
        assert_eq!(u.query, Some("q=a:b&c"));
        assert_eq!(u.fragment, Some("frag"));
    }

    #[test]
    fn ports_and_ipv6() {
        let u = AbsoluteUrl::parse("http://[::1]:8080").unwrap();
        assert_eq!(u.origin.host, "[::1]");
        assert_eq!(u.origin.bare_host(), "::1");
        assert_eq!(u.origin.port, 8080);
        assert_eq!(u.path, "");
        assert_eq!(u.origin.authority(), "[::1]:8080");
        let u = AbsoluteUrl::parse("http://h:80/x?").unwrap();
        assert_eq!(u.origin.authority(), "h");
        assert_eq!(u.query, Some(""));
    }

    #[test]
    fn rejects_what_cannot_be_signed() {
        assert_eq!(AbsoluteUrl::parse("/relative"), Err(UrlError::NotAbsolute));
        assert_eq!(
            AbsoluteUrl::parse("tc.example.com/x"),
            Err(UrlError::NotAbsolute)
        );
        assert!(matches!(
            AbsoluteUrl::parse("ftp://h/p"),
            Err(UrlError::UnsupportedScheme(_))
        ));
        assert_eq!(AbsoluteUrl::parse("https:///p"), Err(UrlError::MissingHost));
        assert_eq!(
            AbsoluteUrl::parse("https://u:p@h/"),
            Err(UrlError::UserInfo)
        );
        assert!(matches!(
            AbsoluteUrl::parse("https://h:99999/"),
            Err(UrlError::InvalidPort(_))
        ));
        assert!(matches!(
            AbsoluteUrl::parse("https://[nope]/"),
            Err(UrlError::InvalidHost(_))
        ));
        assert_eq!(
            AbsoluteUrl::parse("https://h/a b"),
            Err(UrlError::InvalidCharacter)
        );
    }

    #[test]
    fn root_url_strips_trailing_slashes() {
        let r = RootUrl::parse("https://tc.example.com//").unwrap();
        assert_eq!(r.base_path, "");
        assert_eq!(r.to_string(), "https://tc.example.com");
        let r = RootUrl::parse("http://127.0.0.1:9000/prefix/").unwrap();
        assert_eq!(r.base_path, "/prefix");
        assert_eq!(r.to_string(), "http://127.0.0.1:9000/prefix");
        assert!(RootUrl::parse("https://h/?x").is_err());
    }
}
