//! The QUIC tunnel's stream header and answer: pure, bounded codecs with no I/O.
//!
//! The proxy starts every QUIC stream with a [`StreamHeader`] (which name, for which
//! client); the agent answers with an [`Answer`]; then the stream carries raw bytes. The
//! parsers take the bytes received so far and say "need more" or how many bytes the frame
//! took, so the reading loop in `tunnel::quic` stays trivial and the parsers can be tested
//! on every prefix and fuzzed. Wire format in `docs/protocol.md`.

use bytes::{BufMut, Bytes, BytesMut};

/// The only header version this build speaks.
pub const VERSION: u8 = 1;
/// Longest header or answer accepted, prefix included.
pub const MAX_FRAME: usize = 2048;
/// Longest reason text in an answer.
pub const MAX_REASON: usize = 1024;

/// The first bytes of each stream: proxy → agent for a client's stream, and agent → proxy
/// for a stream an agent opens to reach a private name (the mesh).
///
/// ```text
/// u8  version (1)
/// u16 length of the rest, big-endian
/// u8  name length, name (ASCII host name the client asked for)
/// u8  address length, address (the client's `ip:port`, UTF-8; may be empty)
/// optional, proxy → agent on a mesh stream only:
/// u8  caller length, caller (the calling agent's SPIFFE identity, UTF-8)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub name: String,
    pub client: String,
    /// The calling agent's identity on a mesh stream; empty otherwise (and then not sent,
    /// so a public stream's header is what it always was).
    pub caller: String,
}

/// The agent's answer, agent → proxy.
///
/// ```text
/// u16 status, big-endian (the HTTP status codes of the h2 transport: 200, 404, 502, 504)
/// u16 reason length, big-endian, then the reason (UTF-8, at most 1024 bytes; empty on 200,
///     but for the answer to a proxy's question about a service's protocols)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub reason: String,
}

/// Why a header or answer was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unsupported tunnel stream version {0}")]
    Version(u8),
    #[error("stream header too long ({0} bytes)")]
    TooLong(usize),
    #[error("malformed stream header: {0}")]
    Malformed(&'static str),
}

impl StreamHeader {
    /// Encodes the header; `None` if a field does not fit its one-byte length.
    pub fn encode(&self) -> Option<Bytes> {
        let (name, client) = (self.name.as_bytes(), self.client.as_bytes());
        let caller = self.caller.as_bytes();
        if name.is_empty() || name.len() > 255 || client.len() > 255 || caller.len() > 255 {
            return None;
        }
        let caller_len = if caller.is_empty() {
            0
        } else {
            1 + caller.len()
        };
        let rest = 2 + name.len() + client.len() + caller_len;
        let mut out = BytesMut::with_capacity(3 + rest);
        out.put_u8(VERSION);
        out.put_u16(rest as u16);
        out.put_u8(name.len() as u8);
        out.put_slice(name);
        out.put_u8(client.len() as u8);
        out.put_slice(client);
        if !caller.is_empty() {
            out.put_u8(caller.len() as u8);
            out.put_slice(caller);
        }
        Some(out.freeze())
    }

    /// Parses a header from the start of `buf`: `Ok(None)` if more bytes are needed,
    /// otherwise the header and how many bytes it took. Never reads past [`MAX_FRAME`].
    pub fn parse(buf: &[u8]) -> Result<Option<(StreamHeader, usize)>, FrameError> {
        let Some(&version) = buf.first() else {
            return Ok(None);
        };
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        if buf.len() < 3 {
            return Ok(None);
        }
        let rest = u16::from_be_bytes([buf[1], buf[2]]) as usize;
        if 3 + rest > MAX_FRAME {
            return Err(FrameError::TooLong(3 + rest));
        }
        let Some(mut body) = buf.get(3..3 + rest) else {
            return Ok(None);
        };
        let name = take_field(&mut body).ok_or(FrameError::Malformed("name"))?;
        let client = take_field(&mut body).ok_or(FrameError::Malformed("client address"))?;
        let caller = if body.is_empty() {
            &[][..]
        } else {
            take_field(&mut body).ok_or(FrameError::Malformed("caller"))?
        };
        if !body.is_empty() {
            return Err(FrameError::Malformed("trailing bytes"));
        }
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
            return Err(FrameError::Malformed("name is not an ASCII host name"));
        }
        let client =
            std::str::from_utf8(client).map_err(|_| FrameError::Malformed("client address"))?;
        let caller = std::str::from_utf8(caller).map_err(|_| FrameError::Malformed("caller"))?;
        let header = StreamHeader {
            name: String::from_utf8_lossy(name).to_ascii_lowercase(),
            client: client.to_string(),
            caller: caller.to_string(),
        };
        Ok(Some((header, 3 + rest)))
    }
}

fn take_field<'a>(body: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (&len, rest) = body.split_first()?;
    let field = rest.get(..len as usize)?;
    *body = &rest[len as usize..];
    Some(field)
}

impl Answer {
    pub fn ok() -> Answer {
        Answer {
            status: 200,
            reason: String::new(),
        }
    }

    /// Encodes the answer; a reason longer than [`MAX_REASON`] is cut at a char boundary.
    pub fn encode(&self) -> Bytes {
        let mut end = self.reason.len().min(MAX_REASON);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        let reason = &self.reason.as_bytes()[..end];
        let mut out = BytesMut::with_capacity(4 + reason.len());
        out.put_u16(self.status);
        out.put_u16(reason.len() as u16);
        out.put_slice(reason);
        out.freeze()
    }

    /// Parses an answer from the start of `buf`, like [`StreamHeader::parse`].
    pub fn parse(buf: &[u8]) -> Result<Option<(Answer, usize)>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let status = u16::from_be_bytes([buf[0], buf[1]]);
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        if len > MAX_REASON {
            return Err(FrameError::TooLong(4 + len));
        }
        if !(100..600).contains(&status) {
            return Err(FrameError::Malformed("status"));
        }
        let Some(reason) = buf.get(4..4 + len) else {
            return Ok(None);
        };
        let reason = std::str::from_utf8(reason).map_err(|_| FrameError::Malformed("reason"))?;
        Ok(Some((
            Answer {
                status,
                reason: reason.to_string(),
            },
            4 + len,
        )))
    }
}

/// A pure parser of a frame at the start of a buffer (see [`StreamHeader::parse`]).
pub type Parse<T> = fn(&[u8]) -> Result<Option<(T, usize)>, FrameError>;

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, client: &str) -> StreamHeader {
        StreamHeader {
            name: name.into(),
            client: client.into(),
            caller: String::new(),
        }
    }

    #[test]
    fn a_mesh_header_carries_the_caller_and_a_public_one_is_unchanged() {
        let public = header("app.example.com", "203.0.113.9:51234");
        let plain = public.encode().unwrap();
        assert_eq!(plain.len(), 3 + 2 + 15 + 17, "no caller field at all");
        let mesh = StreamHeader {
            caller: "spiffe://revproxy.local/agent/laptop".into(),
            ..public
        };
        let bytes = mesh.encode().unwrap();
        assert_eq!(StreamHeader::parse(&bytes), Ok(Some((mesh, bytes.len()))));
        for cut in 0..bytes.len() {
            assert!(
                matches!(StreamHeader::parse(&bytes[..cut]), Ok(None)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn header_round_trips_and_reports_its_length() {
        let h = header("app.example.com", "203.0.113.9:51234");
        let mut bytes = h.encode().unwrap().to_vec();
        let len = bytes.len();
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(StreamHeader::parse(&bytes), Ok(Some((h, len))));
    }

    #[test]
    fn every_prefix_of_a_header_asks_for_more() {
        let bytes = header("a.example", "[::1]:9").encode().unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(StreamHeader::parse(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(StreamHeader::parse(&[2, 0, 0]), Err(FrameError::Version(2)));
        assert_eq!(
            StreamHeader::parse(&[1, 0xff, 0xff]),
            Err(FrameError::TooLong(3 + 0xffff))
        );
        // A name running past the declared length.
        assert!(StreamHeader::parse(&[1, 0, 2, 5, b'a']).is_err());
        // Trailing bytes inside the declared length.
        assert!(StreamHeader::parse(&[1, 0, 4, 1, b'a', 0, 9]).is_err());
        // Empty name, non-ASCII name, non-UTF-8 address.
        assert!(StreamHeader::parse(&[1, 0, 2, 0, 0]).is_err());
        assert!(StreamHeader::parse(&[1, 0, 3, 1, 0xc3, 0]).is_err());
        assert!(StreamHeader::parse(&[1, 0, 4, 1, b'a', 1, 0xff]).is_err());
        assert_eq!(header("", "x").encode(), None);
        assert_eq!(header(&"a".repeat(256), "").encode(), None);
    }

    #[test]
    fn names_are_lowercased() {
        let bytes = header("App.Example.COM", "").encode().unwrap();
        let (h, _) = StreamHeader::parse(&bytes).unwrap().unwrap();
        assert_eq!(h.name, "app.example.com");
    }

    #[test]
    fn answers_round_trip_and_long_reasons_are_cut() {
        let a = Answer {
            status: 502,
            reason: "backend 127.0.0.1:1: Connection refused".into(),
        };
        let bytes = a.encode();
        assert_eq!(Answer::parse(&bytes), Ok(Some((a, bytes.len()))));
        for cut in 0..bytes.len() {
            assert_eq!(Answer::parse(&bytes[..cut]), Ok(None));
        }
        let long = Answer {
            status: 502,
            reason: "é".repeat(MAX_REASON),
        };
        let (parsed, _) = Answer::parse(&long.encode()).unwrap().unwrap();
        assert!(parsed.reason.len() <= MAX_REASON && parsed.reason.chars().all(|c| c == 'é'));
        assert!(Answer::parse(&[0, 200, 0xff, 0xff]).is_err());
        assert!(Answer::parse(&[0, 7, 0, 0]).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_claim_more_than_given() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            let mut bytes: Vec<u8> = (0..len)
                .map(|i| (x.rotate_left(i as u32 * 7) & 0xff) as u8)
                .collect();
            if let Some(b) = bytes.first_mut() {
                *b = if x & 1 == 0 { VERSION } else { *b };
            }
            if let Ok(Some((_, used))) = StreamHeader::parse(&bytes) {
                assert!(used <= bytes.len());
            }
            if let Ok(Some((_, used))) = Answer::parse(&bytes) {
                assert!(used <= bytes.len());
            }
        }
    }
}
