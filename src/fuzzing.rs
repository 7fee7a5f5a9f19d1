//! Entry points for the fuzz targets in `fuzz/`: every parser that reads bytes from the
//! network or from a user, called on arbitrary bytes, with the properties each must keep
//! checked by assertion (a failed one is a crash the fuzzer reports). Not an API.

use crate::route::{http, sni};
use crate::wire::{enroll, proxy_header, stream};

/// The ClientHello peek: never panics; bytes after a complete hello change nothing.
pub fn sni_peek(data: &[u8]) {
    let first = sni::peek_sni(data);
    if let Ok(sni::SniPeek::Found(name)) = &first {
        let mut more = data.to_vec();
        more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        assert_eq!(
            sni::peek_sni(&more),
            first,
            "bytes after the hello mattered"
        );
        if let Some(name) = name {
            assert!(
                !name.is_empty() && name == &name.to_ascii_lowercase(),
                "{name:?}"
            );
        }
    }
}

/// The HTTP request head peek: never panics; bytes after a complete head change nothing;
/// a host is lower-cased and never empty.
pub fn http_peek(data: &[u8]) {
    let first = http::peek_host(data);
    if let Ok(http::HostPeek::Found(host)) = &first {
        assert!(
            !host.is_empty() && host == &host.to_ascii_lowercase(),
            "{host:?}"
        );
        let mut more = data.to_vec();
        more.extend_from_slice(b"body bytes\r\n\r\n");
        assert_eq!(
            http::peek_host(&more),
            first,
            "bytes after the head mattered"
        );
    }
}

/// A token as an operator pastes it: never panics; what parses, prints back to itself.
pub fn token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(token) = crate::ca::Token::parse(text) {
        let again = crate::ca::Token::parse(&token.encode()).expect("an encoded token parses");
        assert_eq!(again.encode(), token.encode());
    }
}

/// The QUIC stream header and answer: never panic, never claim more bytes than given,
/// and what parses encodes to bytes that parse to the same (names are case-folded, so
/// the bytes themselves may differ).
pub fn stream_frames(data: &[u8]) {
    if let Ok(Some((header, used))) = stream::StreamHeader::parse(data) {
        assert!(used <= data.len());
        let encoded = header.encode().expect("a parsed header encodes");
        let again = stream::StreamHeader::parse(&encoded);
        assert_eq!(
            again,
            Ok(Some((header, encoded.len()))),
            "header round trip"
        );
    }
    if let Ok(Some((answer, used))) = stream::Answer::parse(data) {
        assert!(used <= data.len());
        let encoded = answer.encode();
        let again = stream::Answer::parse(&encoded);
        assert_eq!(
            again,
            Ok(Some((answer, encoded.len()))),
            "answer round trip"
        );
    }
}

/// The PROXY header from a trusted load balancer: never panics, never claims more bytes
/// than given, and is decided by a prefix (more bytes after a header change nothing).
pub fn proxy_header(data: &[u8]) {
    let first = proxy_header::parse(data);
    if let proxy_header::Parsed::Header { len, .. } = &first {
        assert!(*len <= data.len(), "a header longer than the bytes");
        let mut more = data.to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(proxy_header::parse(&more), first);
    }
}

/// The enrollment and renewal request bodies, down to the CSR (as PEM inside the JSON,
/// and the raw bytes as DER): never panic.
pub fn enroll_bodies(data: &[u8]) {
    if let Ok(body) = serde_json::from_slice::<enroll::EnrollBody>(data) {
        let _ = crate::ca::csr_is_acceptable(&body.csr, body.csr.as_bytes());
    }
    if let Ok(body) = serde_json::from_slice::<enroll::RenewBody>(data) {
        let _ = crate::ca::csr_is_acceptable(&body.csr, body.csr.as_bytes());
    }
    let text = String::from_utf8_lossy(data);
    let _ = crate::ca::csr_is_acceptable(&text, data);
}

/// Both configuration files: never panic, whatever the text.
pub fn config_files(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = crate::config::ProxyConfig::from_toml(text) {
        if config.validate().is_ok() {
            let _ = config.listeners();
            let _ = config.routes();
            let _ = config.trusted_proxies();
            let _ = config.static_proxy_protocol();
        }
    }
    if let Ok(config) = crate::config::AgentConfig::from_toml(text) {
        let _ = config.validate();
    }
}
