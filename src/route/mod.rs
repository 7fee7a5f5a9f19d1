//! Routing: what a public connection's first bytes say (SNI, `Host`) and which names a
//! pattern covers. Pure functions; the sockets live in `proxy::public`.

pub mod http;
pub mod sni;

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

#[cfg(test)]
mod tests {
    use super::name_matches;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("app.example.com", "app.example.com"));
        assert!(!name_matches("app.example.com", "x.app.example.com"));
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", ".example.com"));
    }
}
