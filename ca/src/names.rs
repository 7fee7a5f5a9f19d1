//! Validation of agent names and host names (the names routing selects on), one at a time
//! and as the lists operators give. Which names an agent is granted is `grants.rs`.

use crate::error::CaError;

/// Longest agent name accepted; it becomes a certificate CN and a SPIFFE path segment.
pub const MAX_AGENT_NAME: usize = 64;
/// Longest DNS name accepted.
pub const MAX_HOST_NAME: usize = 253;
/// Most names one token may grant.
pub const MAX_HOSTS: usize = 100;

/// A name that cannot be used; the message says what a valid one looks like.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "invalid agent name {0:?}: use 1 to {MAX_AGENT_NAME} letters, digits, '.', '_' or '-'"
    )]
    Agent(String),
    #[error("invalid host name {0:?}: expected a DNS name like app.example.com or *.example.com")]
    Host(String),
    #[error("invalid port {0:?}: expected tcp:PORT or udp:PORT with PORT from 1 to 65535")]
    Port(String),
}

/// Checks an agent name: 1 to 64 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn validate_agent_name(name: &str) -> Result<(), NameError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > MAX_AGENT_NAME || !ok_chars || name.starts_with('.') {
        return Err(NameError::Agent(name.to_string()));
    }
    Ok(())
}

/// Normalizes and checks a host name: lower-cased DNS labels of `a-z 0-9 -`, optionally
/// preceded by a single `*.` wildcard label (`*.example.com`). A trailing dot is removed.
pub fn normalize_host(name: &str) -> Result<String, NameError> {
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    let bad = || NameError::Host(name.to_string());
    if lower.is_empty() || lower.len() > MAX_HOST_NAME {
        return Err(bad());
    }
    let rest = lower.strip_prefix("*.").unwrap_or(&lower);
    let labels_ok = rest.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    // A bare "*.com"-style wildcard over a single label is too broad to grant.
    if !labels_ok || (rest.len() != lower.len() && !rest.contains('.')) {
        return Err(bad());
    }
    Ok(lower)
}

/// Normalizes a name an agent may serve: a host name as [`normalize_host`], or a granted
/// port `tcp:PORT` or `udp:PORT` ([`crate::ports`]).
pub fn normalize_served(name: &str) -> Result<String, NameError> {
    let lower = name.trim().to_ascii_lowercase();
    let (port, named): (_, fn(u16) -> String) = match lower.split_once(':') {
        Some(("tcp", port)) => (port, crate::ports::tcp_name),
        Some(("udp", port)) => (port, crate::ports::udp_name),
        _ => return normalize_host(name),
    };
    match port.trim().parse::<u16>() {
        Ok(port) if port != 0 => Ok(named(port)),
        _ => Err(NameError::Port(name.to_string())),
    }
}

/// Whether the granted/served `pattern` covers the `name` a client asked for.
///
/// Both are lower-case DNS names. `*.example.com` covers exactly one more label
/// (`a.example.com`, not `example.com` nor `a.b.example.com`), as in RFC 6125.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

/// Normalizes the names given with `--host`: 1 to [`MAX_HOSTS`] of them, repeats dropped.
pub(crate) fn normalize_hosts(hosts: &[String]) -> Result<Vec<String>, CaError> {
    if hosts.is_empty() || hosts.len() > MAX_HOSTS {
        return Err(CaError::InvalidInput(format!(
            "give between 1 and {MAX_HOSTS} host names with --host"
        )));
    }
    normalize_names(hosts)
}

/// Normalizes names (any number up to [`MAX_HOSTS`]), dropping repeats.
pub(crate) fn normalize_names(hosts: &[String]) -> Result<Vec<String>, CaError> {
    normalize_each(hosts, normalize_host)
}

/// Normalizes names an agent may serve publicly: host names and granted ports
/// ([`normalize_served`]), any number up to [`MAX_HOSTS`], dropping repeats.
pub(crate) fn normalize_served_names(hosts: &[String]) -> Result<Vec<String>, CaError> {
    normalize_each(hosts, normalize_served)
}

fn normalize_each(
    hosts: &[String],
    normalize: fn(&str) -> Result<String, NameError>,
) -> Result<Vec<String>, CaError> {
    if hosts.len() > MAX_HOSTS {
        return Err(CaError::InvalidInput(format!(
            "give at most {MAX_HOSTS} names"
        )));
    }
    let mut out = Vec::with_capacity(hosts.len());
    for h in hosts {
        let h = normalize(h).map_err(|e| CaError::InvalidInput(e.to_string()))?;
        if !out.contains(&h) {
            out.push(h);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_names() {
        assert!(validate_agent_name("web-1").is_ok());
        assert!(validate_agent_name("a.b_c").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_agent_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_names() {
        assert_eq!(
            normalize_host("App.Example.COM.").unwrap(),
            "app.example.com"
        );
        assert_eq!(normalize_host("*.example.com").unwrap(), "*.example.com");
        assert_eq!(normalize_host("localhost").unwrap(), "localhost");
        for bad in [
            "", "*.com", "a..b", "-a.b", "a_b.c", "*", "a.*.b", "x.*", "é.com",
        ] {
            assert!(normalize_host(bad).is_err(), "{bad:?}");
        }
    }
}
