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

use quinn_proto::ConnectionIdGenerator;

use super::steer::Steer;
use tracing::{debug, info, warn};

/// Where the process stepping aside reads the packets of its generation: in a private
/// (0700) folder of the state directory, so that no other user can send it packets.
/// One per socket of the QUIC port's group (`steer.rs`): the new process's endpoint
/// `index` forwards to the old one's endpoint `index`, which read the same socket.
pub(crate) fn forward_path(dir: &Path, generation: u8, index: u8) -> PathBuf {
    let name = match index {
        0 => format!("{generation}.sock"),
        _ => format!("{generation}-{index}.sock"),
    };
    dir.join(FORWARD_DIR).join(name)
}

/// The folder of the forwarding sockets in the state directory.
const FORWARD_DIR: &str = "quic-takeover";

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
    next
}

/// Connection IDs of 8 bytes: the generation, 3 random bytes (the first of which also
/// names the endpoint's socket in the port's group, `steer.rs`), and 4 bytes of a keyed
/// hash of the first 4 (so that a restarted process tells IDs a process of this state
/// directory issued, and answers them with a stateless reset, from anyone else's).
pub(crate) struct GenerationCids {
    key: ring::hmac::Key,
    generation: u8,
    steer: Steer,
}

impl GenerationCids {
    pub(crate) fn new(key: &[u8], generation: u8) -> GenerationCids {
        GenerationCids {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            generation,
            steer: Steer::ALONE,
        }
    }

    /// IDs whose packets the port's steering program gives to the socket `steer` names.
    pub(crate) fn steered(self, steer: Steer) -> GenerationCids {
        GenerationCids { steer, ..self }
    }

    /// Whether `id` is one this process issued (its generation, a valid signature).
    pub(crate) fn issued_here(&self, id: &[u8]) -> bool {
        id.len() == CID_LEN && id[0] == self.generation && self.signature(&id[..4]) == id[4..]
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
        id[1] = self.steer.byte(id[1]);
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

/// The length of the connection IDs this proxy issues.
pub(crate) const CID_LEN: usize = 8;

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

/// A forwarded batch: the agent's address exactly as the socket gave it (4 for IPv4 or 6
/// for IPv6, 16 bytes of address, 2 of port, 4 of flow info, 4 of scope id: a changed
/// address would look like a migration to the connection), the size of each packet but
/// the last (`stride`, 2 bytes), then the packets back to back, as GRO gives them.
const HEADER: usize = 29;

fn encode_header(from: SocketAddr, stride: usize, out: &mut Vec<u8>) {
    out.clear();
    let (family, ip, flow, scope) = match from {
        SocketAddr::V4(v4) => (4u8, v4.ip().to_ipv6_mapped(), 0, 0),
        SocketAddr::V6(v6) => (6u8, *v6.ip(), v6.flowinfo(), v6.scope_id()),
    };
    out.push(family);
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&from.port().to_be_bytes());
    out.extend_from_slice(&flow.to_be_bytes());
    out.extend_from_slice(&scope.to_be_bytes());
    out.extend_from_slice(&(stride.min(u16::MAX as usize) as u16).to_be_bytes());
}

/// The address and stride of a batch.
fn decode_header(datagram: &[u8]) -> Option<(SocketAddr, usize)> {
    let header = datagram.get(..HEADER)?;
    let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&header[1..17]).ok()?);
    let port = u16::from_be_bytes([header[17], header[18]]);
    let flow = u32::from_be_bytes(header[19..23].try_into().ok()?);
    let scope = u32::from_be_bytes(header[23..27].try_into().ok()?);
    let stride = u16::from_be_bytes([header[27], header[28]]) as usize;
    let addr = match header[0] {
        4 => SocketAddr::new(IpAddr::V4(ip.to_ipv4_mapped()?), port),
        6 => SocketAddr::V6(std::net::SocketAddrV6::new(ip, port, flow, scope)),
        _ => return None,
    };
    Some((addr, stride.max(1)))
}

/// The new process's side: sends packets of earlier generations to their processes.
#[derive(Debug)]
pub(crate) struct Forwarder {
    dir: PathBuf,
    generation: u8,
    index: u8,
    /// Only IDs this state directory's processes issued are forwarded (anyone may send
    /// packets naming a generation).
    ids: GenerationCids,
    socket: UnixDatagram,
    /// Generations whose process is gone (their socket refused): not tried again.
    gone: Box<[AtomicBool; 256]>,
    /// A batch being gathered for each generation.
    batches: Mutex<Vec<(u8, Vec<u8>)>>,
}

impl std::fmt::Debug for GenerationCids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GenerationCids({})", self.generation)
    }
}

/// What the forwarding socket may hold unsent: batches queue here while the old process
/// reads (its receiving queue's depth is `net.unix.max_dgram_qlen` batches).
const FORWARD_BUFFER: usize = 4 * 1024 * 1024;

impl Forwarder {
    /// `key`: the connection-ID key ([`GenerationCids::new`]); `index`: the socket in the
    /// port's group this forwarder's endpoint reads ([`forward_path`]).
    pub(crate) fn new(dir: &Path, generation: u8, key: &[u8], index: u8) -> io::Result<Forwarder> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        let _ = socket2::SockRef::from(&socket).set_send_buffer_size(FORWARD_BUFFER);
        Ok(Forwarder {
            dir: dir.to_path_buf(),
            generation,
            index,
            ids: GenerationCids::new(key, generation),
            socket,
            gone: Box::new(std::array::from_fn(|_| AtomicBool::new(false))),
            batches: Mutex::new(Vec::new()),
        })
    }

    /// Forwards the received segments in `buf` (`meta.stride` apart) that belong to an
    /// earlier generation whose process still reads (one batch per generation), and packs
    /// the rest to the front; returns the bytes left for this process.
    pub(crate) fn sift(&self, buf: &mut [u8], meta: &quinn::udp::RecvMeta) -> usize {
        let stride = meta.stride.max(1);
        // Every packet on the socket passes here: most are this process's, left in place.
        let foreign = (0..meta.len)
            .step_by(stride)
            .any(|at| self.owner(&buf[at..(at + stride).min(meta.len)]).is_some());
        if !foreign {
            return meta.len;
        }
        let mut batches = self.batches.lock().expect("forward batches");
        let (mut kept, mut at) = (0, 0);
        while at < meta.len {
            let end = (at + stride).min(meta.len);
            match self.owner(&buf[at..end]) {
                Some(generation) => {
                    let i = match batches.iter().position(|(g, _)| *g == generation) {
                        Some(i) => i,
                        None => {
                            batches.push((generation, Vec::new()));
                            batches.len() - 1
                        }
                    };
                    let batch = &mut batches[i].1;
                    if batch.is_empty() {
                        encode_header(meta.addr, stride, batch);
                    }
                    batch.extend_from_slice(&buf[at..end]);
                }
                None => {
                    if kept != at {
                        buf.copy_within(at..end, kept);
                    }
                    kept += end - at;
                }
            }
            at = end;
        }
        // Sent, or given back to this process if their process is gone (only full-size
        // packets came before the last, so they pack as they were).
        for (generation, batch) in batches.iter_mut().filter(|(_, b)| !b.is_empty()) {
            if !self.send(*generation, batch) {
                for packet in batch[HEADER..].chunks(stride) {
                    buf[kept..kept + packet.len()].copy_from_slice(packet);
                    kept += packet.len();
                }
            }
            batch.clear();
        }
        kept
    }

    /// The earlier generation whose process should have `packet`, if any.
    fn owner(&self, packet: &[u8]) -> Option<u8> {
        let generation = generation_of(packet)?;
        let gone = self.gone[generation as usize].load(Ordering::Relaxed);
        if generation == self.generation || gone {
            return None;
        }
        let id = match packet[0] & 0x80 {
            0 => packet.get(1..1 + CID_LEN)?,
            _ => packet.get(6..6 + CID_LEN)?,
        };
        let id = quinn_proto::ConnectionId::new(id);
        self.ids.validate(&id).is_ok().then_some(generation)
    }

    /// Sends a batch to its generation's process; `false` if that process is gone.
    fn send(&self, generation: u8, batch: &[u8]) -> bool {
        match self
            .socket
            .send_to(batch, forward_path(&self.dir, generation, self.index))
        {
            Ok(_) => true,
            // Its reader is behind: dropped, as a full socket buffer would (QUIC resends).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(e) => {
                let gone = matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                );
                debug!(generation, error = %e, gone, "could not forward packets to the process of an earlier generation");
                if gone {
                    self.gone[generation as usize].store(true, Ordering::Relaxed);
                }
                !gone
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
    /// The socket file's inode: only our own file is removed at the end.
    ino: u64,
}

impl Forwarded {
    /// Binds this generation's socket in `dir` (before the new process reads the UDP
    /// socket, so that no packet of ours finds it missing), for the endpoint reading
    /// socket `index` of the port's group. Needs a runtime.
    pub(crate) fn bind(dir: &Path, generation: u8, index: u8) -> io::Result<Forwarded> {
        use std::os::unix::fs::MetadataExt;
        revproxy_ca::fsutil::create_private_dir(&dir.join(FORWARD_DIR))?;
        let path = forward_path(dir, generation, index);
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path)?;
        socket.set_nonblocking(true)?;
        let ino = std::fs::metadata(&path)?.ino();
        info!(path = %path.display(), "ready to read this process's QUIC packets from its successor");
        Ok(Forwarded {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            path,
            ino,
        })
    }

    /// Reads one forwarded batch into `buf` as the UDP socket would have given it.
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
            let Some((from, stride)) = decode_header(&buf[..len]) else {
                continue; // not ours to read
            };
            buf.copy_within(HEADER..len, 0);
            *meta = quinn::udp::RecvMeta {
                addr: from,
                len: len - HEADER,
                stride,
                ecn: None,
                dst_ip: None,
            };
            return Poll::Ready(Ok(()));
        }
    }
}

impl Drop for Forwarded {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        // A later bind of the same generation replaced the file: that one is not ours.
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Steered to socket 2 of 3: every ID names it, and validates as any other.
        let steer = Steer { index: 2, count: 3 };
        let mut steered = GenerationCids::new(b"key", 7).steered(steer);
        for _ in 0..64 {
            let cid = steered.generate_cid();
            assert_eq!((cid[0], cid[1] % 3), (7, 2));
            assert!(mine.validate(&cid).is_ok());
        }
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
    fn addresses_cross_exactly() {
        let mut out = Vec::new();
        for from in [
            "192.0.2.1:4433",
            "[2001:db8::1]:443",
            "[::ffff:192.0.2.1]:4433",
        ] {
            let from: SocketAddr = from.parse().unwrap();
            encode_header(from, 1200, &mut out);
            assert_eq!(decode_header(&out), Some((from, 1200)), "{from}");
        }
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap(),
            443,
            7,
            3,
        ));
        encode_header(scoped, 1, &mut out);
        assert_eq!(decode_header(&out), Some((scoped, 1)));
        assert_eq!(decode_header(&[4; 5]), None);
        let mut bad = out.clone();
        bad[0] = 9;
        assert_eq!(decode_header(&bad), None);
    }

    /// A packet of generation `generation` with a valid ID under `key`, `len` bytes.
    fn packet(key: &[u8], generation: u8, len: usize) -> Vec<u8> {
        let cid = GenerationCids::new(key, generation).generate_cid();
        let mut p = vec![0x40];
        p.extend_from_slice(&cid[..]);
        p.resize(len, generation);
        p
    }

    #[tokio::test]
    async fn packets_of_an_earlier_generation_reach_its_process() {
        let dir = tempfile::tempdir().unwrap();
        // The old process's second endpoint, and another that reads another socket.
        let old = Forwarded::bind(dir.path(), 3, 1).unwrap();
        let other = Forwarded::bind(dir.path(), 3, 0).unwrap();
        let new = Forwarder::new(dir.path(), 4, b"key", 1).unwrap();
        let from: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        // A batch of four: ours, the old process's, a forged ID naming generation 3, and
        // the old process's again (shorter, last).
        let (ours, theirs) = (packet(b"key", 4, 20), packet(b"key", 3, 20));
        let mut forged = theirs.clone();
        forged[5] ^= 1;
        let last = packet(b"key", 3, 12);
        let mut batch = [&ours[..], &theirs, &forged, &last].concat();
        let meta = quinn::udp::RecvMeta {
            addr: from,
            len: batch.len(),
            stride: 20,
            ecn: None,
            dst_ip: None,
        };
        let kept = new.sift(&mut batch, &meta);
        assert_eq!(&batch[..kept], &[&ours[..], &forged].concat()[..]);
        let mut buf = [0u8; 256];
        let mut got = quinn::udp::RecvMeta::default();
        std::future::poll_fn(|cx| old.poll_recv(cx, &mut buf, &mut got))
            .await
            .unwrap();
        assert_eq!((got.addr, got.stride), (from, 20));
        assert_eq!(&buf[..got.len], &[&theirs[..], &last].concat()[..]);
        let nothing = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(other.poll_recv(cx, &mut buf, &mut got).is_pending())
        });
        assert!(nothing.await, "the endpoint of another socket got nothing");
        // Once the old process is gone its packets stay here.
        drop(old);
        let mut lone = theirs.clone();
        let meta = quinn::udp::RecvMeta {
            len: 20,
            stride: 20,
            ..meta
        };
        assert_eq!(new.sift(&mut lone, &meta), 20);
        assert_eq!(lone, theirs);
    }

    #[tokio::test]
    async fn a_second_bind_of_a_generation_keeps_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let first = Forwarded::bind(dir.path(), 9, 2).unwrap();
        let second = Forwarded::bind(dir.path(), 9, 2).unwrap();
        drop(first);
        assert!(forward_path(dir.path(), 9, 2).exists());
        drop(second);
        assert!(!forward_path(dir.path(), 9, 2).exists());
    }
}
