//! HTTP/1.x request head `Host` peeking.
//!
//! An HTTP listener routes on the first request's `Host` header without terminating or
//! rewriting HTTP. In the data path this module sits between the public socket and the
//! route lookup: `proxy::public` appends each read to one buffer and calls [`peek_host`] on
//! all of it until the answer is not [`HostPeek::NeedMore`]. Then it replays the buffered
//! bytes to the backend verbatim.
//!
//! Only the first request head is read. Later requests on a kept-alive connection go to the
//! same backend whatever their `Host` says, as with any TCP-level router.
//!
//! Everything here is a pure function of the bytes: no I/O and no state between calls.
//! The parser is deliberately stricter than a general HTTP server (CRLF only, no line
//! folding, exactly one `Host`), because a head the proxy and the backend could read
//! differently is a way to reach a backend the route did not choose.

use std::net::Ipv6Addr;

/// Largest request head accepted, request line and headers up to and including the blank line.
pub const MAX_HEAD: usize = 16 * 1024;

/// Longest method token accepted. Real methods are far shorter; the bound lets a non-HTTP
/// client be turned away after a few bytes.
const MAX_METHOD: usize = 16;
/// Longest DNS name in text form, without a trailing dot.
const MAX_HOST: usize = 253;

/// What the bytes received so far say about the request's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPeek {
    /// More bytes are needed to decide.
    NeedMore,
    /// Lower-cased host without port
    ///
    /// A DNS name or IPv4 address has its trailing dot removed; an IPv6 literal comes
    /// without brackets, in the canonical text form of RFC 5952.
    Found(String),
}

/// Why the bytes can never yield a host, however many more arrive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The first bytes cannot start an HTTP/1.x request line: the client speaks something
    /// else, so an HTTP error response would mean nothing to it.
    #[error("not an HTTP/1.x request")]
    NotHttp,
    /// A request head that breaks HTTP/1.x syntax or the rules above; the text names the
    /// part.
    #[error("malformed HTTP request: {0}")]
    Malformed(&'static str),
    /// No end of the head within [`MAX_HEAD`] bytes.
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
    /// A complete head with no `Host` header.
    #[error("request has no Host header")]
    NoHost,
    /// A complete head with more than one `Host` header, even if they agree.
    #[error("request has more than one Host header")]
    DuplicateHost,
}

/// Finds the `Host` of the HTTP/1.x request head that starts `buf`.
///
/// `buf` is every byte received from the client so far (the caller appends and calls
/// again on [`HostPeek::NeedMore`]). Bytes after the head's blank line, such as a body,
/// are ignored.
///
/// [`HostError::NotHttp`] is decided from the first bytes; [`HostError::TooLarge`] as soon
/// as `buf` is longer than [`MAX_HEAD`] without a complete head, so this never asks for
/// more than `MAX_HEAD + 1` bytes.
pub fn peek_host(buf: &[u8]) -> Result<HostPeek, HostError> {
    check_method_prefix(buf)?;
    match find_head(buf)? {
        Some(head) => parse_head(head).map(HostPeek::Found),
        None if buf.len() > MAX_HEAD => Err(HostError::TooLarge),
        None => Ok(HostPeek::NeedMore),
    }
}

/// Rejects, from as few bytes as possible, anything that cannot begin `METHOD SP`.
fn check_method_prefix(buf: &[u8]) -> Result<(), HostError> {
    let letters = buf
        .iter()
        .take(MAX_METHOD + 1)
        .take_while(|b| b.is_ascii_uppercase())
        .count();
    if letters > MAX_METHOD {
        return Err(HostError::NotHttp);
    }
    match buf.get(letters) {
        None => Ok(()),
        Some(b' ') if letters > 0 => Ok(()),
        Some(_) => Err(HostError::NotHttp),
    }
}

/// The head through its blank line, once it is within the first [`MAX_HEAD`] bytes.
///
/// Line endings are checked as they arrive, so a client using bare LF is refused without
/// waiting for a blank line that this parser would never recognize.
fn find_head(buf: &[u8]) -> Result<Option<&[u8]>, HostError> {
    let window = buf.get(..MAX_HEAD).unwrap_or(buf);
    let mut line_start = 0;
    let mut prev = None;
    for (i, &byte) in window.iter().enumerate() {
        match byte {
            b'\n' if prev != Some(b'\r') => {
                return Err(HostError::Malformed("line ends in a bare LF"));
            }
            b'\n' => {
                // An empty line (just CRLF) ends the head.
                if i + 1 - line_start == 2 {
                    return Ok(window.get(..=i));
                }
                line_start = i + 1;
            }
            _ if prev == Some(b'\r') => {
                return Err(HostError::Malformed("CR not followed by LF"));
            }
            _ => {}
        }
        prev = Some(byte);
    }
    Ok(None)
}

/// Checks a complete head and returns its normalized host.
fn parse_head(head: &[u8]) -> Result<String, HostError> {
    // find_head guarantees the CRLF CRLF ending and that every CR is followed by LF, so
    // splitting on LF and dropping one CR yields exactly the CRLF-delimited lines.
    let lines = head.strip_suffix(b"\r\n\r\n").unwrap_or(head);
    let mut lines = lines
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    check_request_line(lines.next().unwrap_or_default())?;
    let mut host = None;
    for line in lines {
        let (name, value) = header(line)?;
        if name.eq_ignore_ascii_case(b"host") && host.replace(value).is_some() {
            return Err(HostError::DuplicateHost);
        }
    }
    parse_host(host.ok_or(HostError::NoHost)?)
}

/// `METHOD SP request-target SP HTTP/1.x`, with single spaces as RFC 9112 requires.
fn check_request_line(line: &[u8]) -> Result<(), HostError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HostError::Malformed(
            "request line is not METHOD SP target SP version",
        ));
    };
    if method.is_empty() || method.len() > MAX_METHOD || !method.iter().all(u8::is_ascii_uppercase)
    {
        return Err(HostError::Malformed("bad method"));
    }
    if target.is_empty() || !target.iter().all(u8::is_ascii_graphic) {
        return Err(HostError::Malformed("bad request target"));
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(HostError::Malformed("version is not HTTP/1.0 or HTTP/1.1"));
    }
    Ok(())
}

/// Splits a header line into its name and its value without surrounding whitespace.
fn header(line: &[u8]) -> Result<(&[u8], &[u8]), HostError> {
    // A continuation line could hide a second Host from us but not from the backend.
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(HostError::Malformed("obsolete line folding"));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(HostError::Malformed("header line without a colon"))?;
    let (name, value) = line.split_at(colon);
    let value = value.get(1..).unwrap_or_default();
    // The token rule also refuses whitespace before the colon, which RFC 9112 says must
    // be rejected rather than guessed at.
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(HostError::Malformed("bad header name"));
    }
    if !value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
    {
        return Err(HostError::Malformed("control character in a header value"));
    }
    Ok((name, value.trim_ascii()))
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `host [":" port]` from a `Host` value, as the name routes are keyed by.
fn parse_host(value: &[u8]) -> Result<String, HostError> {
    if let Some(rest) = value.strip_prefix(b"[") {
        let close = rest
            .iter()
            .position(|&b| b == b']')
            .ok_or(HostError::Malformed("unclosed IPv6 literal in Host"))?;
        let (literal, after) = rest.split_at(close);
        match after.get(1..).unwrap_or_default() {
            [] => {}
            [b':', port @ ..] => check_port(port)?,
            _ => return Err(HostError::Malformed("bytes after the IPv6 literal in Host")),
        }
        // Canonical form, so that every spelling of one address finds the same route.
        return std::str::from_utf8(literal)
            .ok()
            .and_then(|s| s.parse::<Ipv6Addr>().ok())
            .map(|addr| addr.to_string())
            .ok_or(HostError::Malformed("invalid IPv6 literal in Host"));
    }
    let name = match value.iter().position(|&b| b == b':') {
        Some(colon) => {
            let (name, port) = value.split_at(colon);
            check_port(port.get(1..).unwrap_or_default())?;
            name
        }
        None => value,
    };
    normalize(name)
}

/// A port must be 1 to 5 digits naming a TCP port; anything else would be read differently
/// by different backends.
fn check_port(port: &[u8]) -> Result<(), HostError> {
    let valid = port.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(port)
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
            .is_some();
    if valid {
        Ok(())
    } else {
        Err(HostError::Malformed("bad port in Host"))
    }
}

/// Checks a host name and puts it in the form routes are keyed by: the same rule as the
/// SNI parser, so one name routes alike over HTTP and TLS.
fn normalize(name: &[u8]) -> Result<String, HostError> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > MAX_HOST {
        return Err(HostError::Malformed("Host empty or longer than 253 bytes"));
    }
    if !name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(HostError::Malformed(
            "Host has characters not allowed in a DNS name",
        ));
    }
    Ok(name
        .iter()
        .map(|&b| char::from(b.to_ascii_lowercase()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(host: &str) -> Result<HostPeek, HostError> {
        Ok(HostPeek::Found(host.to_string()))
    }

    fn malformed(result: Result<HostPeek, HostError>) -> bool {
        matches!(result, Err(HostError::Malformed(_)))
    }

    fn get(headers: &str) -> Vec<u8> {
        format!("GET / HTTP/1.1\r\n{headers}\r\n").into_bytes()
    }

    /// A tiny xorshift64 generator, so the mutation test needs no crates and is repeatable.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
        }
    }

    #[test]
    fn simple_get() {
        assert_eq!(
            peek_host(&get("Host: app.example.com\r\n")),
            found("app.example.com")
        );
        let with_body = b"POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 2\r\n\r\nhi";
        assert_eq!(peek_host(with_body), found("a.example"));
    }

    #[test]
    fn header_name_is_case_insensitive() {
        let head = get("User-Agent: t\r\nhOsT: a.example\r\nAccept: */*\r\n");
        assert_eq!(peek_host(&head), found("a.example"));
    }

    #[test]
    fn port_and_whitespace_are_stripped() {
        assert_eq!(
            peek_host(&get("Host: a.example:8080\r\n")),
            found("a.example")
        );
        assert_eq!(
            peek_host(&get("Host:\t a.example:80 \t\r\n")),
            found("a.example")
        );
        assert_eq!(peek_host(&get("Host:a.example\r\n")), found("a.example"));
        assert_eq!(peek_host(&get("Host: 10.0.0.1:80\r\n")), found("10.0.0.1"));
    }

    #[test]
    fn ipv6_literal() {
        assert_eq!(peek_host(&get("Host: [::1]:8080\r\n")), found("::1"));
        assert_eq!(
            peek_host(&get("Host: [2001:DB8:0::1]\r\n")),
            found("2001:db8::1")
        );
        for bad in [
            "[::1",
            "[::1]x",
            "[::1]:",
            "[fe80::1%25eth0]",
            "[v1.x]",
            "[]",
            "::1",
        ] {
            assert!(
                malformed(peek_host(&get(&format!("Host: {bad}\r\n")))),
                "{bad}"
            );
        }
    }

    #[test]
    fn host_is_lowercased_and_trailing_dot_removed() {
        assert_eq!(
            peek_host(&get("Host: App.EXAMPLE.com.\r\n")),
            found("app.example.com")
        );
        assert_eq!(
            peek_host(&get("Host: under_score-1.example\r\n")),
            found("under_score-1.example")
        );
    }

    #[test]
    fn bad_hosts_are_malformed() {
        let long = "a".repeat(254);
        for bad in [
            "",
            ".",
            "a b",
            "a/b",
            "user@a.example",
            "a.example:x",
            "a.example:65536",
            "a:1:2",
            "ex\u{e4}mple",
            &long,
        ] {
            assert!(
                malformed(peek_host(&get(&format!("Host: {bad}\r\n")))),
                "{bad:?}"
            );
        }
        let longest = format!("Host: {}.:443\r\n", "a".repeat(253));
        assert_eq!(peek_host(&get(&longest)), found(&"a".repeat(253)));
    }

    #[test]
    fn two_host_headers_are_rejected() {
        let head = get("Host: a.example\r\nHost: a.example\r\n");
        assert_eq!(peek_host(&head), Err(HostError::DuplicateHost));
        let head = get("Host: a.example\r\nX: y\r\nHOST: b.example\r\n");
        assert_eq!(peek_host(&head), Err(HostError::DuplicateHost));
    }

    #[test]
    fn missing_host() {
        assert_eq!(peek_host(&get("Accept: */*\r\n")), Err(HostError::NoHost));
        assert_eq!(peek_host(b"GET / HTTP/1.0\r\n\r\n"), Err(HostError::NoHost));
        assert_eq!(
            peek_host(&get("X-Host: a.example\r\n")),
            Err(HostError::NoHost)
        );
    }

    #[test]
    fn fed_byte_by_byte() {
        let head = get("Host: a.example\r\nAccept: */*\r\n");
        for end in 0..head.len() {
            assert_eq!(
                peek_host(&head[..end]),
                Ok(HostPeek::NeedMore),
                "prefix {end}"
            );
        }
        assert_eq!(peek_host(&head), found("a.example"));
    }

    #[test]
    fn head_size_limit() {
        let big = get(&format!(
            "Host: a.example\r\nX-Big: {}\r\n",
            "a".repeat(17 * 1024)
        ));
        assert_eq!(peek_host(&big), Err(HostError::TooLarge));
        assert_eq!(peek_host(&big[..MAX_HEAD]), Ok(HostPeek::NeedMore));
        assert_eq!(peek_host(&big[..=MAX_HEAD]), Err(HostError::TooLarge));

        let mut unterminated = b"GET / HTTP/1.1\r\nHost: a.example\r\nX: ".to_vec();
        unterminated.resize(20 * 1024, b'a');
        assert_eq!(peek_host(&unterminated), Err(HostError::TooLarge));

        // A head of exactly MAX_HEAD bytes is accepted; one byte more is not.
        let prefix = "GET / HTTP/1.1\r\nHost: a.example\r\nX: ";
        let exact = format!(
            "{prefix}{}\r\n\r\n",
            "a".repeat(MAX_HEAD - prefix.len() - 4)
        );
        assert_eq!(exact.len(), MAX_HEAD);
        assert_eq!(peek_host(exact.as_bytes()), found("a.example"));
        let over = format!(
            "{prefix}{}\r\n\r\n",
            "a".repeat(MAX_HEAD - prefix.len() - 3)
        );
        assert_eq!(peek_host(over.as_bytes()), Err(HostError::TooLarge));
    }

    #[test]
    fn not_http_is_rejected_from_the_first_bytes() {
        assert_eq!(peek_host(b""), Ok(HostPeek::NeedMore));
        assert_eq!(peek_host(b"GE"), Ok(HostPeek::NeedMore));
        assert_eq!(peek_host(&[0x16]), Err(HostError::NotHttp));
        assert_eq!(peek_host(&[0x16, 3, 1, 0, 200, 1]), Err(HostError::NotHttp));
        assert_eq!(peek_host(b"get / HTTP/1.1\r\n"), Err(HostError::NotHttp));
        assert_eq!(peek_host(b" GET"), Err(HostError::NotHttp));
        assert_eq!(peek_host(b"GET\t"), Err(HostError::NotHttp));
        assert_eq!(peek_host(b"ABCDEFGHIJKLMNOPQ"), Err(HostError::NotHttp));
        assert_eq!(peek_host(b"ABCDEFGHIJKLMNOP "), Ok(HostPeek::NeedMore));
        assert_eq!(peek_host(b"SSH-2.0-OpenSSH\r\n"), Err(HostError::NotHttp));
    }

    #[test]
    fn hello_world_is_refused() {
        let result = peek_host(b"hello world\r\n\r\n");
        assert!(matches!(
            result,
            Err(HostError::NotHttp | HostError::Malformed(_))
        ));
        assert!(malformed(peek_host(b"HELLO world\r\n\r\n")));
    }

    #[test]
    fn malformed_heads() {
        for head in [
            &b"GET / HTTP/1.1\nHost: a.example\n\n"[..],
            b"GET / HTTP/1.1\r\nHost: a.example\n",
            b"GET / HTTP/1.1\r\nHost: a.example\rX",
            b"GET / HTTP/2.0\r\nHost: a.example\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET  / HTTP/1.1\r\nHost: a.example\r\n\r\n",
            b"GET / HTTP/1.1 \r\nHost: a.example\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\nHost: a.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.example\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: y\r\n\tHost: b.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\nHost: a.example\r\n\r\n",
            b"GET / HTTP/1.1\r\n: empty name\r\nHost: a.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.exa\0mple\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: \x7f\r\nHost: a.example\r\n\r\n",
        ] {
            assert!(
                malformed(peek_host(head)),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn garbage_with_nul_bytes_is_an_error() {
        for garbage in [
            &b"\0\0\0\0"[..],
            b"GET \0\0\0\r\n\r\n",
            b"G\0",
            b"GET / HTTP/1.1\r\n\0\r\n\r\n",
        ] {
            assert!(peek_host(garbage).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn mutations_never_panic() {
        let base = get("Host: [2001:db8::1]:8443\r\nUser-Agent: test\r\nhost2: x.example:80\r\n");
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let interesting = b" :\r\n[]0.Hh\0\t\xff";
        for _ in 0..2000 {
            let mut bytes = base.clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(bytes.len());
                let byte = match rng.below(2) {
                    0 => interesting[rng.below(interesting.len())],
                    _ => u8::try_from(rng.below(256)).unwrap(),
                };
                match rng.below(4) {
                    0 => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    2 => bytes.truncate(at.max(1)),
                    _ => {
                        bytes.remove(at);
                        if bytes.is_empty() {
                            bytes.push(byte);
                        }
                    }
                }
            }
            if let Ok(HostPeek::Found(host)) = peek_host(&bytes) {
                assert!(!host.is_empty() && host.len() <= MAX_HOST, "{host:?}");
                assert!(host.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'-' | b'.' | b'_' | b':')));
            }
        }
    }
}
