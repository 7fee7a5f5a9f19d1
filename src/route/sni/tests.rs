//! The SNI peek against real and hand-broken ClientHellos.

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
