//! Which hosts hostname-form requests (`/<host.name>/<path>`, spec §5.2) may reach.
//!
//! The Go proxy signs a request to any host a task names, handing the task's credentials'
//! signature to that host. An allowlist limits this to known hosts. Patterns are exact host
//! names (case-insensitive) or `*.suffix` wildcards that match any host *below* the suffix
//! (`*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`).
//! An allowlist without patterns allows every host (the Go proxy's behaviour); a caller that
//! wants a configured-but-empty list to mean "no hostname-form requests at all" checks
//! [`HostAllowlist::is_unrestricted`] itself. Requests to the root URL are not subject to the
//! allowlist.

use std::collections::HashSet;
use std::fmt;

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternError {
    /// An empty pattern.
    Empty,
    /// `*` or `*.` alone: it would allow every host; use an empty list instead.
    BareWildcard(String),
    /// `*` anywhere but as the whole first label (`a.*.com`, `*a.com`, `a*`).
    MisplacedWildcard(String),
    /// An empty label (`a..com`, `.a.com`, `a.com.`).
    EmptyLabel(String),
    /// A label with characters other than letters, digits and `-`, or starting or ending
    /// with `-` (such hosts cannot be named in a hostname-form request anyway).
    InvalidLabel(String),
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("empty host pattern"),
            Self::BareWildcard(p) => write!(
                f,
                "host pattern {p:?} would allow every host; leave the allowlist empty instead"
            ),
            Self::MisplacedWildcard(p) => write!(
                f,
                "host pattern {p:?}: `*` is only allowed as the whole first label, as in `*.example.com`"
            ),
            Self::EmptyLabel(p) => write!(f, "host pattern {p:?} has an empty label"),
            Self::InvalidLabel(p) => write!(
                f,
                "host pattern {p:?}: labels are letters, digits and `-`, not starting or ending with `-`"
            ),
        }
    }
}

impl std::error::Error for PatternError {}

/// Hosts that hostname-form requests may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAllowlist {
    /// Lower-case exact names.
    exact: HashSet<String>,
    /// Lower-case suffixes including the leading dot (`.example.com` for `*.example.com`).
    suffixes: Vec<String>,
}

impl HostAllowlist {
    /// An allowlist that allows every host.
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Builds an allowlist from patterns; the first invalid pattern is the error.
    pub fn new<I, S>(patterns: I) -> Result<Self, PatternError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = Self::default();
        for pattern in patterns {
            match validate(pattern.as_ref())? {
                Pattern::Exact(host) => {
                    list.exact.insert(host);
                }
                Pattern::Suffix(suffix) => {
                    if !list.suffixes.contains(&suffix) {
                        list.suffixes.push(suffix);
                    }
                }
            }
        }
        Ok(list)
    }

    /// Whether no restriction applies (no patterns).
    pub fn is_unrestricted(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty()
    }

    /// Whether a hostname-form request may go to `host` (compared case-insensitively; a
    /// trailing dot is not removed, so `example.com.` matches no pattern).
    pub fn allows(&self, host: &str) -> bool {
        if self.is_unrestricted() {
            return true;
        }
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        self.exact.contains(host)
            || self
                .suffixes
                .iter()
                .any(|suffix| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
    }
}

enum Pattern {
    Exact(String),
    Suffix(String),
}

fn validate(pattern: &str) -> Result<Pattern, PatternError> {
    let trimmed = pattern.trim();
    if trimmed.is_empty() {
        return Err(PatternError::Empty);
    }
    if trimmed == "*" || trimmed == "*." {
        return Err(PatternError::BareWildcard(pattern.to_string()));
    }
    let (wildcard, name) = match trimmed.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, trimmed),
    };
    for label in name.split('.') {
        if label.is_empty() {
            return Err(PatternError::EmptyLabel(pattern.to_string()));
        }
        if label.contains('*') {
            return Err(PatternError::MisplacedWildcard(pattern.to_string()));
        }
        let valid = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return Err(PatternError::InvalidLabel(pattern.to_string()));
        }
    }
    let name = name.to_ascii_lowercase();
    Ok(if wildcard {
        Pattern::Suffix(format!(".{name}"))
    } else {
        Pattern::Exact(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(p: &[&str]) -> HostAllowlist {
        HostAllowlist::new(p).unwrap()
    }

    #[test]
    fn empty_list_allows_everything() {
        let l = list(&[]);
        assert!(l.is_unrestricted());
        assert!(l.allows("anything.example"));
        assert!(l.allows(""));
        assert!(HostAllowlist::allow_all().allows("x.y"));
    }

    #[test]
    fn exact_names_are_case_insensitive() {
        let l = list(&["Artifacts.Example.COM", "10.0.0.1"]);
        assert!(!l.is_unrestricted());
        assert!(l.allows("artifacts.example.com"));
        assert!(l.allows("ARTIFACTS.example.com"));
        assert!(l.allows("10.0.0.1"));
        assert!(!l.allows("x.artifacts.example.com"));
        assert!(!l.allows("example.com"));
        assert!(!l.allows("artifacts.example.com."));
        assert!(!l.allows("artifacts.example.co"));
        assert!(!l.allows("10.0.0.10"));
        assert!(!l.allows(""));
    }

    #[test]
    fn wildcards_match_strictly_below_the_suffix() {
        let l = list(&["*.Example.com"]);
        assert!(l.allows("a.example.com"));
        assert!(l.allows("a.b.example.com"));
        assert!(l.allows("A.EXAMPLE.COM"));
        assert!(!l.allows("example.com"));
        assert!(!l.allows(".example.com"));
        assert!(!l.allows("badexample.com"));
        assert!(!l.allows("example.com.evil"));
        assert!(!l.allows("a.example.com.evil.net"));
        let both = list(&["*.example.com", "example.com"]);
        assert!(both.allows("example.com"));
        assert!(both.allows("x.example.com"));
    }

    #[test]
    fn invalid_patterns() {
        for (p, want) in [
            ("", PatternError::Empty),
            ("  ", PatternError::Empty),
            ("*", PatternError::BareWildcard("*".into())),
            ("*.", PatternError::BareWildcard("*.".into())),
            ("a.*.com", PatternError::MisplacedWildcard("a.*.com".into())),
            ("*a.com", PatternError::MisplacedWildcard("*a.com".into())),
            ("a.com*", PatternError::MisplacedWildcard("a.com*".into())),
            ("*.*.com", PatternError::MisplacedWildcard("*.*.com".into())),
            ("a..com", PatternError::EmptyLabel("a..com".into())),
            (".a.com", PatternError::EmptyLabel(".a.com".into())),
            ("a.com.", PatternError::EmptyLabel("a.com.".into())),
            ("*..com", PatternError::EmptyLabel("*..com".into())),
            ("-a.com", PatternError::InvalidLabel("-a.com".into())),
            ("a-.com", PatternError::InvalidLabel("a-.com".into())),
            ("a_b.com", PatternError::InvalidLabel("a_b.com".into())),
            ("a.com:443", PatternError::InvalidLabel("a.com:443".into())),
            ("a b.com", PatternError::InvalidLabel("a b.com".into())),
            ("café.com", PatternError::InvalidLabel("café.com".into())),
        ] {
            assert_eq!(HostAllowlist::new([p]), Err(want.clone()), "{p:?}");
            assert!(!want.to_string().is_empty());
        }
        // The first bad pattern is reported even after good ones.
        assert_eq!(
            HostAllowlist::new(["ok.example.com", "*"]),
            Err(PatternError::BareWildcard("*".into()))
        );
    }

    #[test]
    fn surrounding_whitespace_is_ignored() {
        let l = list(&[" a.example.com ", "\t*.b.example.com\n"]);
        assert!(l.allows("a.example.com"));
        assert!(l.allows("x.b.example.com"));
    }
}
