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
mod tests;
