//! TLS ClientHello server name (SNI) peeking.
//!
//! An SNI listener has to pick a backend before any TLS happens, because the proxy passes
//! TLS through untouched and never holds the backend's keys. So it reads the client's first
//! records and routes on the ClientHello's `server_name`. In the data path this module sits
//! between the public socket and the route lookup: `proxy::public` appends each read to one
//! buffer and calls [`peek_sni`] on all of it until the answer is not
//! [`SniPeek::NeedMore`]. Then it replays the buffered bytes to the backend verbatim.
//!
//! Everything here is a pure function of the bytes: no I/O and no state between calls.
//! That keeps the parser easy to test and fuzz, and keeps the socket code trivial.

use std::borrow::Cow;

/// Largest ClientHello handshake message accepted (a post-quantum hello is >1 KiB; some exceed 4 KiB).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// Largest record payload accepted: 2^14 of plaintext plus the 2048 bytes of expansion TLS
/// allows ciphertext records. Clients never need more, and it caps what a single record
/// header can make us wait for.
const MAX_RECORD: usize = 16384 + 2048;
const RECORD_HEADER: usize = 5;
const HANDSHAKE_HEADER: usize = 4;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST_NAME: u8 = 0;
const MAX_SESSION_ID: usize = 32;
/// Longest DNS name in text form, without a trailing dot.
const MAX_NAME: usize = 253;

/// What the bytes received so far say about the client's server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniPeek {
    /// More bytes are needed to decide.
    NeedMore,
    /// A complete ClientHello; its server_name (host_name type), lower-cased, trailing dot removed, or None if it has no SNI extension.
    Found(Option<String>),
}

/// Why the bytes can never yield a server name, however many more arrive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    /// The first record is not a TLS handshake record: the client speaks something else.
    #[error("not a TLS handshake")]
    NotTls,
    /// A TLS handshake that starts with some message other than a ClientHello.
    #[error("TLS handshake does not start with a ClientHello")]
    NotClientHello,
    /// Records or a ClientHello no conforming client sends; the text names the part.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The ClientHello declares a length above [`MAX_CLIENT_HELLO`].
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
}

/// Finds the server name in the ClientHello that starts `buf`.
///
/// `buf` is every byte received from the client so far (the caller appends and calls again on NeedMore).
///
/// The hello may be fragmented over any number of handshake records. Errors are reported
/// as soon as the bytes so far prove them: a non-TLS first byte, a non-ClientHello
/// handshake type or an oversized declared length are rejected without waiting for more.
/// Bytes after the ClientHello are ignored.
pub fn peek_sni(buf: &[u8]) -> Result<SniPeek, SniError> {
    match hello_length(buf)? {
        None => Ok(SniPeek::NeedMore),
        Some(len) => {
            let message = reassemble(buf, HANDSHAKE_HEADER + len)?;
            let body = message.get(HANDSHAKE_HEADER..).unwrap_or_default();
            server_name(body).map(SniPeek::Found)
        }
    }
}

/// The ClientHello body's length once all of it has arrived, `None` while it has not.
///
/// This pass only looks at record headers and the 4-byte handshake header, so the caller's
/// repeated calls on a growing buffer cost no copying until the hello is complete.
fn hello_length(buf: &[u8]) -> Result<Option<usize>, SniError> {
    let mut records = Records::new(buf);
    let mut header = [0u8; HANDSHAKE_HEADER];
    let mut seen = 0usize;
    while let Some(fragment) = records.next_fragment()? {
        // The handshake header itself may be split over records.
        for (slot, &byte) in header.iter_mut().skip(seen).zip(fragment) {
            *slot = byte;
        }
        seen += fragment.len();
        if seen == 0 {
            continue;
        }
        if header[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(SniError::NotClientHello);
        }
        if seen >= HANDSHAKE_HEADER {
            let len =
                usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
            // Decided from the header alone, so a client cannot make us buffer 16 MiB first.
            if len > MAX_CLIENT_HELLO {
                return Err(SniError::TooLarge);
            }
            if seen >= HANDSHAKE_HEADER + len {
                return Ok(Some(len));
            }
        }
    }
    Ok(None)
}

/// The first `total` handshake bytes, borrowed when one record holds them all (the usual
/// case), copied together from the fragments otherwise.
fn reassemble(buf: &[u8], total: usize) -> Result<Cow<'_, [u8]>, SniError> {
    let mut records = Records::new(buf);
    let mut message = Vec::new();
    while let Some(fragment) = records.next_fragment()? {
        if message.is_empty() {
            if let Some(whole) = fragment.get(..total) {
                return Ok(Cow::Borrowed(whole));
            }
            message.reserve_exact(total);
        }
        let wanted = total.saturating_sub(message.len()).min(fragment.len());
        message.extend_from_slice(fragment.get(..wanted).unwrap_or_default());
        if message.len() >= total {
            return Ok(Cow::Owned(message));
        }
    }
    // hello_length saw `total` bytes in these same records, so this is not reached.
    Err(SniError::Malformed("handshake message ends early"))
}

/// Walks the TLS records in a buffer, yielding each one's payload.
struct Records<'a> {
    rest: &'a [u8],
    first: bool,
}

impl<'a> Records<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Records {
            rest: buf,
            first: true,
        }
    }

    /// The next record's payload, or as much of it as has arrived; `None` when the buffer
    /// ends before the next payload byte could start.
    fn next_fragment(&mut self) -> Result<Option<&'a [u8]>, SniError> {
        // Only the very first record tells TLS from other protocols; a bad record later
        // is a broken TLS client.
        let wrong = |later: &'static str| {
            if self.first {
                SniError::NotTls
            } else {
                SniError::Malformed(later)
            }
        };
        let Some(&content_type) = self.rest.first() else {
            return Ok(None);
        };
        if content_type != CONTENT_HANDSHAKE {
            return Err(wrong("non-handshake record before the ClientHello ended"));
        }
        if self.rest.get(1).is_some_and(|&major| major != 3) {
            return Err(wrong("record version is not 3.x"));
        }
        let Some((&[_, _, _, len_hi, len_lo], payload)) =
            self.rest.split_first_chunk::<RECORD_HEADER>()
        else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if len == 0 || len > MAX_RECORD {
            return Err(SniError::Malformed("record length out of range"));
        }
        let (fragment, rest) = payload.split_at(len.min(payload.len()));
        self.rest = rest;
        self.first = false;
        Ok(Some(fragment))
    }
}

/// Parses a ClientHello body and returns its normalized host_name, if it has one.
fn server_name(body: &[u8]) -> Result<Option<String>, SniError> {
    let mut hello = Cursor::new(body);
    let [major, _minor] = hello.array("legacy_version truncated")?;
    if major != 3 {
        return Err(SniError::Malformed("legacy_version is not 3.x"));
    }
    hello.take(32, "random truncated")?;
    let session_id = hello.vec8("session_id overruns the ClientHello")?;
    if session_id.len() > MAX_SESSION_ID {
        return Err(SniError::Malformed("session_id longer than 32 bytes"));
    }
    let suites = hello.vec16("cipher_suites overrun the ClientHello")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("cipher_suites length is zero or odd"));
    }
    if hello
        .vec8("compression_methods overrun the ClientHello")?
        .is_empty()
    {
        return Err(SniError::Malformed("no compression_methods"));
    }
    // Pre-TLS-1.2 clients may end the hello here; such a hello cannot carry SNI.
    if hello.is_empty() {
        return Ok(None);
    }
    let mut extensions = Cursor::new(hello.vec16("extensions overrun the ClientHello")?);
    if !hello.is_empty() {
        return Err(SniError::Malformed("bytes after the extensions"));
    }
    let mut name = None;
    let mut seen_server_name = false;
    // Every extension is walked, not just up to server_name, so that a later duplicate or
    // an overrun anywhere is caught: the backend would reject that hello anyway.
    while !extensions.is_empty() {
        let [kind_hi, kind_lo] = extensions.array("extension header truncated")?;
        let data = extensions.vec16("extension overruns the extensions block")?;
        if u16::from_be_bytes([kind_hi, kind_lo]) == EXT_SERVER_NAME {
            if seen_server_name {
                return Err(SniError::Malformed("duplicate server_name extension"));
            }
            seen_server_name = true;
            name = host_name(data)?;
        }
    }
    Ok(name)
}

/// The first host_name in a server_name extension's data (RFC 6066, section 3).
fn host_name(data: &[u8]) -> Result<Option<String>, SniError> {
    let mut ext = Cursor::new(data);
    let mut list = Cursor::new(ext.vec16("server_name_list overruns the extension")?);
    if !ext.is_empty() {
        return Err(SniError::Malformed("bytes after server_name_list"));
    }
    if list.is_empty() {
        return Err(SniError::Malformed("empty server_name_list"));
    }
    let mut found = None;
    while !list.is_empty() {
        let [name_type] = list.array("server_name entry truncated")?;
        let name = list.vec16("server name overruns server_name_list")?;
        if name_type == NAME_TYPE_HOST_NAME && found.is_none() {
            found = Some(normalize(name)?);
        }
    }
    Ok(found)
}

/// Checks a host_name and puts it in the form routes are keyed by.
///
/// `_` is allowed because real host names carry it even though DNS host rules do not.
fn normalize(name: &[u8]) -> Result<String, SniError> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(SniError::Malformed(
            "host_name empty or longer than 253 bytes",
        ));
    }
    if !name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(SniError::Malformed(
            "host_name has characters not allowed in a DNS name",
        ));
    }
    Ok(name
        .iter()
        .map(|&b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// Checked reads over a byte slice. Each length-prefixed read is bounded by the enclosing
/// structure, and an overrun becomes `Malformed` with the caller's description, so a lying
/// length can never cause a panic or a read past its structure.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize, overrun: &'static str) -> Result<&'a [u8], SniError> {
        let (head, tail) = self
            .rest
            .split_at_checked(n)
            .ok_or(SniError::Malformed(overrun))?;
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, overrun: &'static str) -> Result<[u8; N], SniError> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(SniError::Malformed(overrun))?;
        self.rest = tail;
        Ok(*head)
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, overrun: &'static str) -> Result<&'a [u8], SniError> {
        let [len] = self.array(overrun)?;
        self.take(usize::from(len), overrun)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, overrun: &'static str) -> Result<&'a [u8], SniError> {
        let len = u16::from_be_bytes(self.array(overrun)?);
        self.take(usize::from(len), overrun)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXT_PADDING: u16 = 21;
    const EXT_SUPPORTED_VERSIONS: u16 = 43;
    /// Offsets in a single-record hello from [`Hello`], for corrupting one field.
    const SESSION_ID_LEN_AT: usize = RECORD_HEADER + HANDSHAKE_HEADER + 2 + 32;
    const EXTENSIONS_LEN_AT: usize = SESSION_ID_LEN_AT + 1 + 32 + 2 + 4 + 1 + 1;
    const SNI_EXT_LEN_AT: usize = EXTENSIONS_LEN_AT + 2 + 2;
    const SNI_LIST_LEN_AT: usize = SNI_EXT_LEN_AT + 2;

    /// Builds ClientHello records the way a real client lays them out.
    struct Hello {
        sni: Option<Vec<u8>>,
        /// Extensions after server_name, as (type, data).
        extra: Vec<(u16, Vec<u8>)>,
        /// Pad (extension 21) until the handshake message is at least this long.
        pad_to: usize,
        /// Largest record payload; the message is split into records of this size.
        fragment: usize,
        /// Leave out the extensions block entirely, like an old client.
        no_extensions: bool,
    }

    impl Hello {
        fn new(sni: Option<&str>) -> Self {
            Hello {
                sni: sni.map(|s| s.as_bytes().to_vec()),
                extra: vec![(EXT_SUPPORTED_VERSIONS, vec![2, 3, 4])],
                pad_to: 0,
                fragment: 16384,
                no_extensions: false,
            }
        }

        fn pad_to(mut self, size: usize) -> Self {
            self.pad_to = size;
            self
        }

        fn fragment(mut self, size: usize) -> Self {
            self.fragment = size;
            self
        }

        fn server_name_data(name: &[u8]) -> Vec<u8> {
            let mut entry = vec![NAME_TYPE_HOST_NAME];
            entry.extend(u16_be(name.len()));
            entry.extend_from_slice(name);
            let mut data = u16_be(entry.len()).to_vec();
            data.extend(entry);
            data
        }

        /// The handshake message: header and ClientHello body.
        fn message(&self) -> Vec<u8> {
            let mut body = vec![3, 3];
            body.extend([7u8; 32]);
            body.push(32);
            body.extend([9u8; 32]);
            body.extend([0, 4, 0x13, 0x01, 0x13, 0x02]);
            body.extend([1, 0]);
            if !self.no_extensions {
                let mut exts = Vec::new();
                let push = |exts: &mut Vec<u8>, kind: u16, data: &[u8]| {
                    exts.extend(kind.to_be_bytes());
                    exts.extend(u16_be(data.len()));
                    exts.extend_from_slice(data);
                };
                if let Some(name) = &self.sni {
                    push(&mut exts, EXT_SERVER_NAME, &Self::server_name_data(name));
                }
                for (kind, data) in &self.extra {
                    push(&mut exts, *kind, data);
                }
                // The padding extension itself costs 4 header bytes.
                let so_far = HANDSHAKE_HEADER + body.len() + 2 + exts.len();
                if self.pad_to >= so_far + 4 {
                    push(&mut exts, EXT_PADDING, &vec![0; self.pad_to - so_far - 4]);
                }
                body.extend(u16_be(exts.len()));
                body.extend(exts);
            }
            let mut message = vec![HANDSHAKE_CLIENT_HELLO];
            message.extend(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
            message.extend(body);
            message
        }

        /// The message split into handshake records.
        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            for chunk in self.message().chunks(self.fragment) {
                out.extend([CONTENT_HANDSHAKE, 3, 1]);
                out.extend(u16_be(chunk.len()));
                out.extend_from_slice(chunk);
            }
            out
        }
    }

    fn u16_be(n: usize) -> [u8; 2] {
        u16::try_from(n).unwrap().to_be_bytes()
    }

    fn found(name: &str) -> Result<SniPeek, SniError> {
        Ok(SniPeek::Found(Some(name.to_string())))
    }

    fn malformed(result: Result<SniPeek, SniError>) -> bool {
        matches!(result, Err(SniError::Malformed(_)))
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
    fn simple_hello() {
        let bytes = Hello::new(Some("app.example.com")).build();
        assert_eq!(peek_sni(&bytes), found("app.example.com"));
    }

    #[test]
    fn trailing_bytes_after_the_hello_are_ignored() {
        let mut bytes = Hello::new(Some("a.example")).build();
        bytes.extend([23, 3, 3, 0, 5, 1, 2, 3]);
        assert_eq!(peek_sni(&bytes), found("a.example"));
    }

    #[test]
    fn no_sni_is_found_none() {
        let bytes = Hello::new(None).build();
        assert_eq!(peek_sni(&bytes), Ok(SniPeek::Found(None)));
        let mut old = Hello::new(None);
        old.no_extensions = true;
        assert_eq!(peek_sni(&old.build()), Ok(SniPeek::Found(None)));
    }

    #[test]
    fn name_is_lowercased_and_trailing_dot_removed() {
        let bytes = Hello::new(Some("App.EXAMPLE.com.")).build();
        assert_eq!(peek_sni(&bytes), found("app.example.com"));
        let bytes = Hello::new(Some("under_score-1.example")).build();
        assert_eq!(peek_sni(&bytes), found("under_score-1.example"));
    }

    #[test]
    fn first_host_name_entry_wins_over_other_types() {
        let mut data = Vec::new();
        for (kind, name) in [
            (7u8, &b"\xff\xfe"[..]),
            (0, b"first.example"),
            (0, b"second.example"),
        ] {
            data.push(kind);
            data.extend(u16_be(name.len()));
            data.extend_from_slice(name);
        }
        let mut ext = u16_be(data.len()).to_vec();
        ext.extend(data);
        let mut hello = Hello::new(None);
        hello.extra.push((EXT_SERVER_NAME, ext));
        assert_eq!(peek_sni(&hello.build()), found("first.example"));
    }

    #[test]
    fn large_hello_in_1k_records_byte_by_byte() {
        let hello = Hello::new(Some("big.example"))
            .pad_to(6 * 1024)
            .fragment(1024);
        assert_eq!(hello.message().len(), 6 * 1024);
        let bytes = hello.build();
        assert_eq!(bytes.len(), 6 * 1024 + 6 * RECORD_HEADER);
        for end in 0..bytes.len() {
            assert_eq!(
                peek_sni(&bytes[..end]),
                Ok(SniPeek::NeedMore),
                "prefix {end}"
            );
        }
        assert_eq!(peek_sni(&bytes), found("big.example"));
    }

    #[test]
    fn largest_allowed_hello_in_tiny_records() {
        let hello = Hello::new(Some("max.example")).pad_to(HANDSHAKE_HEADER + MAX_CLIENT_HELLO);
        assert_eq!(peek_sni(&hello.build()), found("max.example"));
        assert_eq!(peek_sni(&hello.fragment(7).build()), found("max.example"));
    }

    #[test]
    fn oversized_hello_is_rejected_from_its_header() {
        let bytes = Hello::new(Some("x.example"))
            .pad_to(20 * 1024)
            .fragment(4096)
            .build();
        let header_end = RECORD_HEADER + HANDSHAKE_HEADER;
        assert_eq!(peek_sni(&bytes[..header_end - 1]), Ok(SniPeek::NeedMore));
        assert_eq!(peek_sni(&bytes[..header_end]), Err(SniError::TooLarge));
        assert_eq!(peek_sni(&bytes), Err(SniError::TooLarge));
        // Also when the handshake header itself straddles records.
        let bytes = Hello::new(Some("x.example"))
            .pad_to(20 * 1024)
            .fragment(2)
            .build();
        assert_eq!(
            peek_sni(&bytes[..2 * (RECORD_HEADER + 2) - 1]),
            Ok(SniPeek::NeedMore)
        );
        assert_eq!(
            peek_sni(&bytes[..2 * (RECORD_HEADER + 2)]),
            Err(SniError::TooLarge)
        );
    }

    #[test]
    fn every_prefix_of_a_valid_hello_needs_more() {
        for hello in [
            Hello::new(Some("a.example")),
            Hello::new(None),
            Hello::new(Some("frag.example")).fragment(3),
            Hello::new(Some("pad.example")).pad_to(2000).fragment(500),
        ] {
            let bytes = hello.build();
            for end in 0..bytes.len() {
                assert_eq!(
                    peek_sni(&bytes[..end]),
                    Ok(SniPeek::NeedMore),
                    "prefix {end}"
                );
            }
            assert!(matches!(peek_sni(&bytes), Ok(SniPeek::Found(_))));
        }
    }

    #[test]
    fn garbage_lengths_are_malformed() {
        let good = Hello::new(Some("a.example")).build();
        let patched = |at: usize, value: &[u8]| {
            let mut bytes = good.clone();
            bytes[at..at + value.len()].copy_from_slice(value);
            peek_sni(&bytes)
        };
        assert!(malformed(patched(SESSION_ID_LEN_AT, &[200])));
        assert!(malformed(patched(SESSION_ID_LEN_AT, &[33])));
        assert!(malformed(patched(EXTENSIONS_LEN_AT, &[0xff, 0xff])));
        assert!(malformed(patched(EXTENSIONS_LEN_AT, &[0, 1])));
        assert!(malformed(patched(SNI_EXT_LEN_AT, &[0xff, 0xff])));
        assert!(malformed(patched(SNI_LIST_LEN_AT, &[0x10, 0])));
        assert!(malformed(patched(SNI_LIST_LEN_AT, &[0, 0])));
        // A handshake length that overruns its own hello body.
        assert!(malformed(patched(RECORD_HEADER + 1, &[0, 0, 20])));
    }

    #[test]
    fn odd_or_empty_cipher_suites_are_malformed() {
        let mut message = Hello::new(Some("a.example")).message();
        let at = HANDSHAKE_HEADER + 2 + 32 + 1 + 32 + 1;
        message[at] = 3;
        let mut bytes = vec![CONTENT_HANDSHAKE, 3, 1];
        bytes.extend(u16_be(message.len()));
        bytes.extend(message);
        assert!(malformed(peek_sni(&bytes)));
    }

    #[test]
    fn duplicate_server_name_is_malformed() {
        let mut hello = Hello::new(Some("a.example"));
        hello
            .extra
            .push((EXT_SERVER_NAME, Hello::server_name_data(b"b.example")));
        assert!(malformed(peek_sni(&hello.build())));
    }

    #[test]
    fn bad_names_are_malformed() {
        for name in [
            &b"ex\xc3\xa4mple.com"[..],
            b"a b.example",
            b"",
            b".",
            b"a/b",
            b"a\0b",
        ] {
            let mut hello = Hello::new(None);
            hello.sni = Some(name.to_vec());
            assert!(malformed(peek_sni(&hello.build())), "{name:?}");
        }
        let long = "a".repeat(254);
        assert!(malformed(peek_sni(&Hello::new(Some(&long)).build())));
        let longest = format!("{}.", "a".repeat(253));
        assert_eq!(
            peek_sni(&Hello::new(Some(&longest)).build()),
            found(&longest[..253])
        );
    }

    #[test]
    fn non_tls_is_rejected_from_the_first_bytes() {
        assert_eq!(peek_sni(b""), Ok(SniPeek::NeedMore));
        assert_eq!(peek_sni(b"G"), Err(SniError::NotTls));
        assert_eq!(peek_sni(b"GET / HTTP/1.1\r\n"), Err(SniError::NotTls));
        assert_eq!(peek_sni(&[21]), Err(SniError::NotTls));
        assert_eq!(peek_sni(&[21, 3, 3, 0, 2, 2, 40]), Err(SniError::NotTls));
        assert_eq!(peek_sni(&[22, 2]), Err(SniError::NotTls));
        assert_eq!(peek_sni(&[0x80, 0x2e, 1]), Err(SniError::NotTls));
    }

    #[test]
    fn other_handshake_messages_are_not_client_hellos() {
        let mut bytes = Hello::new(Some("a.example")).build();
        bytes[RECORD_HEADER] = 2;
        assert_eq!(
            peek_sni(&bytes[..RECORD_HEADER + 1]),
            Err(SniError::NotClientHello)
        );
        assert_eq!(peek_sni(&bytes), Err(SniError::NotClientHello));
    }

    #[test]
    fn bad_records_are_malformed() {
        assert!(malformed(peek_sni(&[22, 3, 1, 0, 0])));
        assert!(malformed(peek_sni(&[22, 3, 1, 0x48, 1])));
        // A non-handshake record, or a non-3.x one, in the middle of a fragmented hello.
        let bytes = Hello::new(Some("a.example")).fragment(10).build();
        let second = RECORD_HEADER + 10;
        for (at, value) in [(second, 23), (second + 1, 2)] {
            let mut bad = bytes.clone();
            bad[at] = value;
            assert!(malformed(peek_sni(&bad[..=at])));
            assert!(malformed(peek_sni(&bad)));
        }
    }

    #[test]
    fn mutations_never_panic() {
        let base = Hello::new(Some("mutate.example"))
            .pad_to(600)
            .fragment(200)
            .build();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let mut bytes = base.clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(bytes.len());
                match rng.below(4) {
                    0 => bytes[at] ^= 1 << rng.below(8),
                    1 => bytes[at] = u8::try_from(rng.below(256)).unwrap(),
                    2 => bytes.truncate(at.max(1)),
                    _ => {
                        bytes.insert(at, u8::try_from(rng.below(256)).unwrap());
                    }
                }
            }
            if let Ok(SniPeek::Found(Some(name))) = peek_sni(&bytes) {
                assert!(!name.is_empty() && name.len() <= MAX_NAME);
                assert!(name.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'-' | b'.' | b'_')));
            }
        }
    }
}
