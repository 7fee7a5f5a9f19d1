//! QUIC tunnels that outlive an upgrade (mvfst's "takeover"). Both processes hold the
//! agent port's UDP socket during a `serve --upgrade`, but only the new one reads it. Every
//! connection ID a process issues starts with its generation (one more than its
//! predecessor's on the same state directory, [`next_generation`]); a packet whose
//! connection ID names another generation belongs to a process that stepped aside, and
//! the new one forwards it over a local datagram socket, [`forward_path`] of that
//! generation, which the old process reads as if it were its UDP socket ([`Forwarded`]).
//! The old one still sends from its own copy of the UDP socket. Its agents are told to
//! move (a control message) and their open streams finish on the old connection.
//!
//! A generation whose socket is gone (its process ended) gets no more forwarding: its
//! packets go to this process's endpoint, which answers them with a stateless reset (the
//! agent reconnects at once).

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};

use tracing::{debug, info, warn};

/// Where the process stepping aside reads the packets of its generation.
pub(crate) fn forward_path(dir: &Path, generation: u8) -> PathBuf {
    dir.join(format!("quic-takeover-{generation}.sock"))
}

/// The file in the state directory that holds the last process's generation.
const GENERATION_FILE: &str = "quic-generation";

/// This process's generation: one more than the last one recorded in `dir` (which it
/// records in turn); a random one if the file cannot be read or written (forwarding then
/// only works by chance, and tunnels fall back to reconnecting).
pub(crate) fn next_generation(dir: &Path) -> u8 {
    let path = dir.join(GENERATION_FILE);
    let last = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok());
    let next = match last {
        Some(last) => last.wrapping_add(1),
        None => crate::runtime::random() as u8,
    };
    if let Err(e) = revproxy_ca::fsutil::write_atomic(&path, next.to_string().as_bytes(), 0o600) {
        warn!(path = %path.display(), error = %e, "cannot record the QUIC generation; QUIC tunnels may be cut at an upgrade");
    }
    // A socket left by a process of the same generation long ago (256 upgrades) is stale.
    let _ = std::fs::remove_file(forward_path(dir, next));
    next
}

/// Connection IDs of 8 bytes: the generation, 3 random bytes, and 4 bytes of a keyed
/// hash of the first 4 (so that a restarted process tells IDs a process of this state
/// directory issued, and answers them with a stateless reset, from anyone else's).
pub(crate) struct GenerationCids {
    key: ring::hmac::Key,
    generation: u8,
}

impl GenerationCids {
    pub(crate) fn new(key: &[u8], generation: u8) -> GenerationCids {
        GenerationCids {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            generation,
        }
    }

    fn signature(&self, head: &[u8]) -> [u8; 4] {
        let tag = ring::hmac::sign(&self.key, head);
        tag.as_ref()[..4].try_into().expect("4 bytes")
    }
}

impl quinn_proto::ConnectionIdGenerator for GenerationCids {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        use ring::rand::SecureRandom;
        let mut id = [0u8; CID_LEN];
        id[0] = self.generation;
        if ring::rand::SystemRandom::new().fill(&mut id[1..4]).is_err() {
            id[1..4].copy_from_slice(&crate::runtime::random().to_le_bytes()[..3]);
        }
        let signature = self.signature(&id[..4]);
        id[4..].copy_from_slice(&signature);
        quinn_proto::ConnectionId::new(&id)
    }

    fn validate(&self, cid: &quinn_proto::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        match cid.len() == CID_LEN && self.signature(&cid[..4]) == cid[4..] {
            true => Ok(()),
            false => Err(quinn_proto::InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

const CID_LEN: usize = 8;

/// The generation a packet's destination connection ID names, when it names one this
/// proxy issued: a short-header packet, or a Handshake packet (an Initial's ID is the
/// agent's choice: a new connection, always this process's).
pub(crate) fn generation_of(packet: &[u8]) -> Option<u8> {
    let first = *packet.first()?;
    if first & 0x80 == 0 {
        // Short header: the ID follows the first byte (its length is ours: CID_LEN).
        return packet.get(1).copied();
    }
    // Long header: type in bits 4-5 (2 = Handshake), version, then the ID's length.
    if (first >> 4) & 0x03 != 2 || packet.get(5).copied()? as usize != CID_LEN {
        return None;
    }
    packet.get(6).copied()
}

/// A forwarded packet: the agent's address (16 bytes of IPv6 or v4-mapped, 2 of port),
/// then the packet.
const HEADER: usize = 18;

fn encode(from: SocketAddr, packet: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let ip = match from.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&from.port().to_be_bytes());
    out.extend_from_slice(packet);
}

fn decode(datagram: &[u8]) -> Option<SocketAddr> {
    let ip: [u8; 16] = datagram.get(..16)?.try_into().ok()?;
    let port = u16::from_be_bytes(datagram.get(16..HEADER)?.try_into().ok()?);
    let ip = Ipv6Addr::from(ip);
    let ip = match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    };
    Some(SocketAddr::new(ip, port))
}

/// The new process's side: sends packets of earlier generations to their processes.
#[derive(Debug)]
pub(crate) struct Forwarder {
    dir: PathBuf,
    generation: u8,
    socket: UnixDatagram,
    /// Generations whose process is gone (their socket refused): not tried again.
    gone: Box<[AtomicBool; 256]>,
    buf: Mutex<Vec<u8>>,
}

impl Forwarder {
    pub(crate) fn new(dir: &Path, generation: u8) -> io::Result<Forwarder> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Forwarder {
            dir: dir.to_path_buf(),
            generation,
            socket,
            gone: Box::new(std::array::from_fn(|_| AtomicBool::new(false))),
            buf: Mutex::new(Vec::with_capacity(2048)),
        })
    }

    /// Forwards the received segments in `buf` (`meta.stride` apart) that belong to an
    /// earlier generation whose process still reads, and packs the rest to the front;
    /// returns the bytes left for this process.
    pub(crate) fn sift(&self, buf: &mut [u8], meta: &quinn::udp::RecvMeta) -> usize {
        let stride = meta.stride.max(1);
        let (mut kept, mut at) = (0, 0);
        while at < meta.len {
            let end = (at + stride).min(meta.len);
            if !self.forwarded(&buf[at..end], meta.addr) {
                buf.copy_within(at..end, kept);
                kept += end - at;
            }
            at = end;
        }
        kept
    }

    /// Whether `packet` went to the process of its generation.
    fn forwarded(&self, packet: &[u8], from: SocketAddr) -> bool {
        let Some(generation) = generation_of(packet) else {
            return false;
        };
        if generation == self.generation || self.gone[generation as usize].load(Ordering::Relaxed) {
            return false;
        }
        let mut out = self.buf.lock().expect("forward buffer");
        encode(from, packet, &mut out);
        match self
            .socket
            .send_to(&out, forward_path(&self.dir, generation))
        {
            Ok(_) => true,
            // Its reader is behind: dropped, as a full socket buffer would (QUIC resends).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(e) => {
                debug!(generation, error = %e, "the process of an earlier generation is gone; its packets are this one's now");
                self.gone[generation as usize].store(true, Ordering::Relaxed);
                false
            }
        }
    }
}

/// The old process's side: the packets the new process forwards, read in place of the
/// UDP socket once this process stepped aside.
#[derive(Debug)]
pub(crate) struct Forwarded {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
}

impl Forwarded {
    /// Binds this generation's socket in `dir` (before the new process reads the UDP
    /// socket, so that no packet of ours finds it missing). Needs a runtime.
    pub(crate) fn bind(dir: &Path, generation: u8) -> io::Result<Forwarded> {
        let path = forward_path(dir, generation);
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path)?;
        socket.set_nonblocking(true)?;
        // Room for bursts of a tunnel's packets, as on the UDP socket.
        let socket2 = socket2::SockRef::from(&socket);
        let _ = socket2.set_recv_buffer_size(super::UDP_BUFFER);
        info!(path = %path.display(), "reading the packets of this process's QUIC tunnels from the new process");
        Ok(Forwarded {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            path,
        })
    }

    /// Reads one forwarded packet into `buf` as the UDP socket would have given it.
    pub(crate) fn poll_recv(
        &self,
        cx: &mut Context,
        buf: &mut [u8],
        meta: &mut quinn::udp::RecvMeta,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut read = tokio::io::ReadBuf::new(buf);
            std::task::ready!(self.socket.poll_recv(cx, &mut read))?;
            let len = read.filled().len();
            let Some(from) = decode(&buf[..len]) else {
                continue; // not ours to read
            };
            buf.copy_within(HEADER..len, 0);
            let len = len - HEADER;
            *meta = quinn::udp::RecvMeta {
                addr: from,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            return Poll::Ready(Ok(()));
        }
    }
}

impl Drop for Forwarded {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn_proto::ConnectionIdGenerator;

    #[test]
    fn ids_carry_their_generation_and_validate_with_the_key() {
        let mut mine = GenerationCids::new(b"key", 7);
        let cid = mine.generate_cid();
        assert_eq!(cid.len(), 8);
        assert_eq!(cid[0], 7);
        assert!(mine.validate(&cid).is_ok());
        // Another generation of the same state directory: valid (a reset is owed).
        assert!(GenerationCids::new(b"key", 8).validate(&cid).is_ok());
        assert!(GenerationCids::new(b"other", 7).validate(&cid).is_err());
        let mut short = vec![0x40];
        short.extend_from_slice(&cid[..]);
        short.extend_from_slice(b"payload");
        assert_eq!(generation_of(&short), Some(7));
        let mut handshake = vec![0xe0, 0, 0, 0, 1, 8];
        handshake.extend_from_slice(&cid[..]);
        assert_eq!(generation_of(&handshake), Some(7));
        let initial = [0xc0, 0, 0, 0, 1, 8, 9, 9, 9, 9, 9, 9, 9, 9];
        assert_eq!(generation_of(&initial), None, "an Initial is always ours");
        assert_eq!(generation_of(&[]), None);
        assert_eq!(generation_of(&[0xe0, 0, 0]), None);
    }

    #[test]
    fn addresses_cross_whole() {
        let mut out = Vec::new();
        for from in ["192.0.2.1:4433", "[2001:db8::1]:443"] {
            let from: SocketAddr = from.parse().unwrap();
            encode(from, b"packet", &mut out);
            assert_eq!(decode(&out), Some(from));
            assert_eq!(&out[HEADER..], b"packet");
        }
        assert_eq!(decode(&[0; 5]), None);
    }

    #[tokio::test]
    async fn packets_of_an_earlier_generation_reach_its_process() {
        let dir = tempfile::tempdir().unwrap();
        let old = Forwarded::bind(dir.path(), 3).unwrap();
        let new = Forwarder::new(dir.path(), 4).unwrap();
        let from: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        // A batch of three segments: ours, the old process's, ours (shorter, last).
        let mut batch = Vec::new();
        batch.extend_from_slice(&[0x40, 4, 1, 1, 1]);
        batch.extend_from_slice(&[0x40, 3, 2, 2, 2]);
        batch.extend_from_slice(&[0x40, 4, 3]);
        let meta = quinn::udp::RecvMeta {
            addr: from,
            len: batch.len(),
            stride: 5,
            ecn: None,
            dst_ip: None,
        };
        let kept = new.sift(&mut batch, &meta);
        assert_eq!(&batch[..kept], &[0x40, 4, 1, 1, 1, 0x40, 4, 3]);
        let mut buf = [0u8; 64];
        let mut got = quinn::udp::RecvMeta::default();
        std::future::poll_fn(|cx| old.poll_recv(cx, &mut buf, &mut got))
            .await
            .unwrap();
        assert_eq!((got.addr, &buf[..got.len]), (from, &[0x40, 3, 2, 2, 2][..]));
        // Once the old process is gone its packets stay here.
        drop(old);
        let mut lone = vec![0x40, 3, 9];
        let meta = quinn::udp::RecvMeta {
            len: 3,
            stride: 3,
            ..meta
        };
        assert_eq!(new.sift(&mut lone, &meta), 3);
    }
}
