//! The QUIC tunnels a proxy process holds, written down so that a process started after a
//! crash can end them at once. An agent keeps a QUIC tunnel alive with a packet every
//! [`KEEPALIVE`](super::KEEPALIVE) (seconds apart, so that idle tunnels cost the proxy
//! almost nothing); a restarted proxy would learn of it only at its next keep-alive, which
//! it answers with a stateless reset. Instead the new process sends every agent of the
//! last one a stateless reset as it starts, so the agents reconnect within a round trip
//! of it listening.
//!
//! A reset names no connection: the agent recognises it by its last 16 bytes, the token
//! for the connection ID it sends to (quinn's `ResetToken`: the first 16 bytes of the
//! HMAC-SHA256 of the ID under the endpoint's reset key, kept in the state directory),
//! coming from the proxy's address. So what is kept per tunnel is the agent's address and
//! that ID, which the proxy chose in the handshake: the ID an agent's Handshake packets
//! are sent to ([`Peers::saw`], on the socket, for a handshake the agent port took on;
//! checked to be one this process issued), kept once the tunnel is up ([`Tracked::up`])
//! until it ends, with the proxy's address the agent sends to.
//!
//! The table is written (`quic-peers/GENERATION` in the state directory, `0600`, a line
//! `AGENT_ADDRESS ID [PROXY_IP]` per tunnel) at most every [`WRITE_EVERY`] while it
//! changes, marked current every [`REFRESH`] while it does not, and removed when the
//! process ends cleanly (its agents are told then). A file older than the idle timeout
//! (and a refresh) names only tunnels that ended anyway and is not used.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info, warn};

use super::takeover::{GenerationCids, CID_LEN};
use crate::runtime::shutdown::Trigger;

/// The folder of the tables in the state directory.
const PEERS_DIR: &str = "quic-peers";

/// How often a changed table is written at most: a crash loses at most the tunnels that
/// came up this long before it (their agents find the new process at their next
/// keep-alive instead).
pub(crate) const WRITE_EVERY: Duration = Duration::from_millis(250);

/// A connection ID this proxy issued.
type Cid = [u8; CID_LEN];

/// A tunnel's agent as kept: its address, the ID it sends to, and the proxy's address it
/// sends to (where the proxy listens on a wildcard address, the reset must come from
/// the address the agent knows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Peer {
    pub(crate) agent: SocketAddr,
    pub(crate) id: Cid,
    pub(crate) local: Option<IpAddr>,
}

/// The agents of this process's QUIC tunnels: address and the ID they send to. (As many
/// as the agent port holds tunnels and handshakes: it bounds them.)
pub(crate) struct Peers {
    table: Mutex<Table>,
    dirty: AtomicBool,
    /// Tells IDs this process issued.
    ids: GenerationCids,
}

#[derive(Default)]
struct Table {
    /// Handshakes under way ([`Peers::track`]), with what their packets said once seen.
    pending: HashMap<SocketAddr, Option<(Cid, Option<IpAddr>)>>,
    /// Tunnels up.
    held: HashMap<SocketAddr, (Cid, Option<IpAddr>)>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.table.lock().expect("peers lock");
        (f.debug_struct("Peers"))
            .field("pending", &table.pending.len())
            .field("held", &table.held.len())
            .finish()
    }
}

impl Peers {
    /// A table for the IDs `ids` issues.
    pub(crate) fn new(ids: GenerationCids) -> Peers {
        Peers {
            table: Mutex::default(),
            dirty: AtomicBool::new(false),
            ids,
        }
    }

    /// Looks at a received datagram (`to`: the proxy's address it was sent to): the ID of
    /// a Handshake packet in it (the agent's Handshake packets all go to the ID the proxy
    /// chose, which it then keeps) is recorded for a handshake being tracked from that
    /// address. A datagram that does not start with a long header (all of a tunnel's
    /// traffic) costs a branch.
    pub(crate) fn saw(&self, from: SocketAddr, to: Option<IpAddr>, datagram: &[u8]) {
        if datagram.first().is_none_or(|first| first & 0x80 == 0) {
            return;
        }
        let Some(id) = handshake_id(datagram) else {
            return;
        };
        if !self.ids.issued_here(id) {
            return;
        }
        let id: Cid = id.try_into().expect("CID_LEN bytes");
        let mut table = self.table.lock().expect("peers lock");
        if let Some(slot) = table.pending.get_mut(&from) {
            *slot = Some((id, to));
        }
    }

    /// Follows the handshake from `from` (before the proxy answers it, so before any of
    /// its Handshake packets): [`Tracked::up`] keeps it (written) once it is a tunnel, and
    /// dropping the guard forgets it.
    pub(crate) fn track(self: &Arc<Self>, from: SocketAddr) -> Tracked {
        (self.table.lock().expect("peers lock").pending).insert(from, None);
        Tracked {
            peers: self.clone(),
            from,
            kept: None,
        }
    }

    /// The table as written: a line `ADDRESS ID` (hex) per tunnel.
    fn render(&self) -> Vec<u8> {
        let table = self.table.lock().expect("peers lock");
        let mut out = Vec::with_capacity(table.held.len() * 64);
        for (addr, (id, local)) in &table.held {
            let _ = match local {
                Some(local) => writeln!(out, "{addr} {} {local}", hex(id)),
                None => writeln!(out, "{addr} {}", hex(id)),
            };
        }
        out
    }

    /// Writes the table to `path` while it changes (at most every [`WRITE_EVERY`]), and
    /// marks it current every [`REFRESH`] while it does not (a table older than the idle
    /// timeout is not used), until `stop`; then removes the file (a clean end tells the
    /// agents itself).
    pub(crate) async fn keep(self: Arc<Self>, path: PathBuf, stop: Trigger) {
        let mut tick = tokio::time::interval(WRITE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut failed, mut written_at) = (false, None::<tokio::time::Instant>);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            let dirty = self.dirty.swap(false, Ordering::AcqRel);
            let stale = written_at.is_some_and(|at| at.elapsed() >= REFRESH);
            if !dirty && !stale {
                continue;
            }
            let (peers, at) = (self.clone(), path.clone());
            let done = tokio::task::spawn_blocking(move || match dirty {
                true => write_private(&at, &peers.render()),
                false => touch(&at),
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            match done {
                Ok(()) => (failed, written_at) = (false, Some(tokio::time::Instant::now())),
                Err(e) if !failed => {
                    failed = true;
                    warn!(path = %path.display(), error = %e, "cannot write the QUIC tunnels' table; after a crash their agents find the restarted proxy at their next keep-alive instead of at once");
                }
                Err(_) => {}
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}

/// How often an unchanged table is marked current (well within the idle timeout).
pub(crate) const REFRESH: Duration = Duration::from_secs(5);

/// Marks `path` as written now.
fn touch(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::options().write(true).open(path)?;
    file.set_modified(std::time::SystemTime::now())
}

/// A handshake followed by [`Peers`]: forgotten when dropped (the tunnel ended, or the
/// handshake failed).
pub(crate) struct Tracked {
    peers: Arc<Peers>,
    from: SocketAddr,
    /// What [`Self::up`] kept, to forget exactly that.
    kept: Option<Cid>,
}

impl Tracked {
    /// The handshake became a tunnel: kept, and written, until this guard is dropped.
    pub(crate) fn up(&mut self) {
        let peers = &self.peers;
        let mut table = peers.table.lock().expect("peers lock");
        if let Some(Some(seen)) = table.pending.remove(&self.from) {
            table.held.insert(self.from, seen);
            self.kept = Some(seen.0);
            peers.dirty.store(true, Ordering::Release);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let peers = &self.peers;
        let mut table = peers.table.lock().expect("peers lock");
        match self.kept {
            // Only its own entry: another tunnel may hold the address now.
            Some(kept) => {
                if table
                    .held
                    .get(&self.from)
                    .is_some_and(|(id, _)| *id == kept)
                {
                    table.held.remove(&self.from);
                    peers.dirty.store(true, Ordering::Release);
                }
            }
            None => {
                table.pending.remove(&self.from);
            }
        }
    }
}

/// The ID of the first Handshake packet among the long-header packets coalesced in
/// `datagram` (RFC 9000 section 17.2: first byte, version, the IDs with their lengths,
/// an Initial's token, the length of the rest of the packet).
fn handshake_id(datagram: &[u8]) -> Option<&[u8]> {
    let mut at = 0;
    while let Some(&first) = datagram.get(at) {
        if first & 0x80 == 0 {
            return None;
        }
        let kind = (first >> 4) & 0x03;
        let mut p = at + 5;
        let dcid_len = usize::from(*datagram.get(p)?);
        let dcid = datagram.get(p + 1..p + 1 + dcid_len)?;
        if kind == 2 {
            return (dcid_len == CID_LEN).then_some(dcid);
        }
        // Initial (0) or 0-RTT (1) go on to the next packet; a Retry (3) is the proxy's.
        if kind == 3 {
            return None;
        }
        p += 1 + dcid_len;
        p += 1 + usize::from(*datagram.get(p)?);
        if kind == 0 {
            let (token_len, n) = varint(datagram.get(p..)?)?;
            p += n + usize::try_from(token_len).ok()?;
        }
        let (len, n) = varint(datagram.get(p..)?)?;
        at = p.checked_add(n)?.checked_add(usize::try_from(len).ok()?)?;
    }
    None
}

/// A QUIC variable-length integer at the start of `bytes`, and its length.
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let first = *bytes.first()?;
    let len = 1usize << (first >> 6);
    let mut value = u64::from(first & 0x3f);
    for byte in bytes.get(1..len)? {
        value = (value << 8) | u64::from(*byte);
    }
    Some((value, len))
}

/// Where the process of `generation` keeps its table (its folder is made at the first
/// write).
pub(crate) fn table_path(dir: &Path, generation: u8) -> PathBuf {
    dir.join(PEERS_DIR).join(generation.to_string())
}

/// Writes `contents` to `path` (`0600`) through a temporary file and a rename, so a
/// reader never sees half of it. No fsync: it matters after a process crash, when the
/// page cache survives, not after a machine's, when the tunnels are gone anyway.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(folder) = path.parent() {
        revproxy_ca::fsutil::create_private_dir(folder)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// The agents of earlier processes' tables in `dir` (those written within `fresh`: older
/// tunnels have timed out); the tables are removed (each is used once).
pub(crate) fn take_earlier(dir: &Path, fresh: Duration) -> Vec<Peer> {
    let folder = dir.join(PEERS_DIR);
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return Vec::new();
    };
    let mut peers = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let recent = (entry.metadata().and_then(|m| m.modified()))
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age <= fresh);
        let table = path.extension().is_none_or(|e| e != "tmp");
        if recent && table {
            if let Ok(text) = std::fs::read_to_string(&path) {
                peers.extend(text.lines().filter_map(parse_line));
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    peers
}

/// A line of a table: `AGENT_ADDRESS ID [PROXY_IP]`.
fn parse_line(line: &str) -> Option<Peer> {
    let mut words = line.split(' ');
    let (agent, hex_id, local) = (words.next()?, words.next()?, words.next());
    if hex_id.len() != 2 * CID_LEN || words.next().is_some() {
        return None;
    }
    let mut id = [0u8; CID_LEN];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex_id.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let local = match local {
        Some(ip) => Some(ip.parse().ok()?),
        None => None,
    };
    Some(Peer {
        agent: agent.parse().ok()?,
        id,
        local,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stateless reset for the connection the agent sends to `id` (RFC 9000 section 10.3):
/// a short-header first byte, unpredictable bytes, and the ID's token under `reset_key`
/// (as quinn derives it). 41 bytes: as long as quinn's own smallest that cannot be told
/// from a real packet.
pub(crate) fn reset_packet(reset_key: &ring::hmac::Key, id: &Cid) -> [u8; 41] {
    use ring::rand::SecureRandom;
    let mut packet = [0u8; 41];
    let _ = ring::rand::SystemRandom::new().fill(&mut packet[..25]);
    packet[0] = 0b0100_0000 | (packet[0] >> 2);
    let token = ring::hmac::sign(reset_key, id);
    packet[25..].copy_from_slice(&token.as_ref()[..16]);
    packet
}

/// Resets sent back to back, then a pause: 1,000 a second, 10,000 agents in 10 s.
const RESET_BATCH: usize = 50;
const RESET_PAUSE: Duration = Duration::from_millis(50);

/// Sends a stateless reset to each of `peers` (the agents of earlier processes' tables,
/// [`take_earlier`]) from `socket` (the agent port's UDP socket), each from the proxy's
/// address its agent sent to, so they reconnect now. For a cold start only: after an
/// upgrade the old process's tunnels live.
pub(crate) async fn reset(
    peers: Vec<Peer>,
    socket: std::net::UdpSocket,
    reset_key: ring::hmac::Key,
) {
    if peers.is_empty() {
        return;
    }
    let opened = socket.set_nonblocking(true).and_then(|()| {
        let state = quinn::udp::UdpSocketState::new((&socket).into())?;
        Ok((tokio::net::UdpSocket::from_std(socket)?, state))
    });
    let (socket, state) = match opened {
        Ok(opened) => opened,
        Err(e) => return warn!(error = %e, "cannot reset the last process's QUIC tunnels"),
    };
    let mut sent = 0usize;
    for (n, peer) in peers.iter().enumerate() {
        // Paced: a fleet reset at once would send its handshakes at once, more than the
        // socket's buffer holds, and lost ones wait out QUIC's retransmission backoff.
        if n > 0 && n % RESET_BATCH == 0 {
            tokio::time::sleep(RESET_PAUSE).await;
        }
        let packet = reset_packet(&reset_key, &peer.id);
        let transmit = quinn::udp::Transmit {
            destination: peer.agent,
            ecn: None,
            contents: &packet,
            segment_size: None,
            src_ip: peer.local,
        };
        // Bounded: a peer that cannot be sent to is skipped.
        let send = socket.async_io(tokio::io::Interest::WRITABLE, || {
            state.send((&socket).into(), &transmit)
        });
        match tokio::time::timeout(Duration::from_secs(1), send).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(e)) => debug!(agent = %peer.agent, error = %e, "stateless reset not sent"),
            Err(_) => debug!(agent = %peer.agent, "stateless reset not sent in time"),
        }
    }
    info!(
        agents = peers.len(),
        sent, "told the QUIC agents of the last process to reconnect (stateless resets)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"connection id key for the tests";

    /// A long-header packet of `kind` (0 Initial, 1 0-RTT, 2 Handshake, 3 Retry) to `id`,
    /// with `payload` bytes after its length field.
    fn long_header(kind: u8, id: &[u8], payload: usize) -> Vec<u8> {
        let mut packet = vec![0xc0 | (kind << 4), 0, 0, 0, 1, id.len() as u8];
        packet.extend_from_slice(id);
        packet.extend_from_slice(&[4, 9, 9, 9, 9]); // the sender's ID
        if kind == 0 {
            packet.extend_from_slice(&[0x40, 3, 7, 7, 7]); // a 3-byte token, 2-byte varint
        }
        packet.extend_from_slice(&[0x40 | (payload >> 8) as u8, payload as u8]);
        packet.extend(std::iter::repeat_n(0u8, payload));
        packet
    }

    fn issued(generation: u8) -> Cid {
        use quinn_proto::ConnectionIdGenerator;
        let id = GenerationCids::new(KEY, generation).generate_cid();
        id[..].try_into().unwrap()
    }

    fn held(peers: &Peers) -> Vec<Peer> {
        let text = String::from_utf8(peers.render()).unwrap();
        let mut lines: Vec<_> = text.lines().filter_map(parse_line).collect();
        lines.sort();
        lines
    }

    #[test]
    fn the_handshake_id_is_kept_for_a_tracked_handshake_once_up_and_only_while_it_lives() {
        let peers = Arc::new(Peers::new(GenerationCids::new(KEY, 7)));
        let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
            "192.0.2.1:4000".parse().unwrap(),
            "192.0.2.2:4000".parse().unwrap(),
            "[2001:db8::3]:4000".parse().unwrap(),
        );
        let local: Option<IpAddr> = Some("198.51.100.9".parse().unwrap());
        let (ours, retry) = (issued(7), issued(7));
        let (mut tracked_a, mut tracked_b, mut tracked_c) =
            (peers.track(a), peers.track(b), peers.track(c));
        // Not recorded: a short header; a Retry; an Initial alone (to the Retry's ID); an
        // ID of an earlier process; one with a bad signature; an untracked sender.
        peers.saw(a, local, &[0x40, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        peers.saw(a, local, &long_header(3, &ours, 20));
        peers.saw(a, local, &long_header(0, &retry, 20));
        peers.saw(b, local, &long_header(2, &issued(6), 20));
        let mut forged = ours;
        forged[7] ^= 1;
        peers.saw(c, local, &long_header(2, &forged, 20));
        peers.saw(
            "192.0.2.99:1".parse().unwrap(),
            local,
            &long_header(2, &ours, 20),
        );
        tracked_b.up();
        assert_eq!(held(&peers), vec![], "nothing to keep yet");

        // Recorded: the Handshake packet coalesced after an Initial; a late Initial to
        // the Retry's ID after it changes nothing; nothing is written before it is up.
        let mut coalesced = long_header(0, &retry, 300);
        coalesced.extend(long_header(2, &ours, 100));
        peers.saw(a, local, &coalesced);
        peers.saw(a, local, &long_header(0, &retry, 20));
        let other = issued(7);
        peers.saw(c, None, &long_header(2, &other, 20));
        assert_eq!(held(&peers), vec![]);
        tracked_a.up();
        tracked_c.up();
        let mut want = vec![
            Peer {
                agent: a,
                id: ours,
                local,
            },
            Peer {
                agent: c,
                id: other,
                local: None,
            },
        ];
        want.sort();
        assert_eq!(held(&peers), want);
        assert!(peers.dirty.load(Ordering::Acquire));

        // A handshake from an address a tunnel holds (a NAT reusing a port) that fails
        // does not take the tunnel's entry with it.
        drop(peers.track(a));
        assert_eq!(held(&peers).len(), 2);
        // A tunnel that ended is forgotten.
        drop(tracked_a);
        assert_eq!(
            held(&peers),
            vec![Peer {
                agent: c,
                id: other,
                local: None
            }]
        );
        drop((tracked_b, tracked_c));
        assert_eq!(held(&peers), vec![]);
        let table = peers.table.lock().unwrap();
        assert!(table.pending.is_empty() && table.held.is_empty());
    }

    #[test]
    fn malformed_long_headers_are_read_safely() {
        let id = issued(1);
        let mut packet = long_header(0, &id, 10);
        for cut in 0..packet.len() {
            assert_eq!(handshake_id(&packet[..cut]), None);
        }
        // A length field running past the end, and an 8-byte varint.
        let last = packet.len() - 12;
        packet[last] = 0xff;
        assert_eq!(handshake_id(&packet), None);
        assert_eq!(varint(&[0xc0, 0, 0, 0, 0, 0, 1, 2]), Some((258, 8)));
        assert_eq!(varint(&[0x25]), Some((0x25, 1)));
    }

    #[tokio::test]
    async fn the_table_is_written_private_read_once_and_ignored_when_stale() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let peers = Arc::new(Peers::new(GenerationCids::new(KEY, 3)));
        let from: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let id = issued(3);
        let mut tracked = peers.track(from);
        peers.saw(from, None, &long_header(2, &id, 20));
        tracked.up();
        let path = table_path(dir.path(), 3);
        let stop = Trigger::default();
        let keeping = tokio::spawn(peers.clone().keep(path.clone(), stop.clone()));
        // Written within a tick or two.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            assert!(tokio::time::Instant::now() < deadline, "table not written");
            tokio::time::sleep(WRITE_EVERY / 5).await;
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let folder = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(folder.permissions().mode() & 0o777, 0o700);

        // An unchanged table is marked current, so a crash after a quiet hour still
        // finds it fresh.
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        (std::fs::File::options().write(true).open(&path).unwrap())
            .set_modified(old)
            .unwrap();
        let deadline = tokio::time::Instant::now() + REFRESH * 3;
        while std::fs::metadata(&path).unwrap().modified().unwrap() < old + Duration::from_secs(60)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "table not marked current"
            );
            tokio::time::sleep(WRITE_EVERY).await;
        }

        // A copy as a crashed process would leave it: read once, then gone.
        let copy = table_path(dir.path(), 2);
        std::fs::copy(&path, &copy).unwrap();
        let fresh = Duration::from_secs(27);
        let earlier = take_earlier(dir.path(), fresh);
        let peer = Peer {
            agent: from,
            id,
            local: None,
        };
        assert_eq!(earlier, vec![peer, peer], "both tables read");
        assert!(!copy.exists() && !path.exists());

        // A clean end removes this process's table.
        drop(tracked);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "table not written again"
            );
            tokio::time::sleep(WRITE_EVERY / 5).await;
        }
        stop.fire();
        keeping.await.unwrap();
        assert!(!path.exists(), "removed at a clean end");

        // A table older than the idle timeout names only tunnels that ended anyway.
        std::fs::write(&copy, format!("{from} {} 127.0.0.1\ngarbage\n", hex(&id))).unwrap();
        (std::fs::File::options().write(true).open(&copy).unwrap())
            .set_modified(old)
            .unwrap();
        assert!(take_earlier(dir.path(), fresh).is_empty());
        assert!(!copy.exists());
    }

    #[test]
    fn a_reset_looks_like_a_short_header_packet_and_ends_with_the_ids_token() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"reset key");
        let id = issued(9);
        let (one, two) = (reset_packet(&key, &id), reset_packet(&key, &id));
        assert_eq!(one[0] & 0xc0, 0x40, "short header, fixed bit set");
        let token = ring::hmac::sign(&key, &id);
        assert_eq!(one[25..], token.as_ref()[..16]);
        assert_eq!(one[25..], two[25..]);
        assert_ne!(one[1..25], two[1..25], "the rest is unpredictable");
    }

    #[test]
    fn lines_that_are_not_an_address_an_id_and_maybe_an_ip_are_skipped() {
        for line in [
            "",
            "127.0.0.1:1",
            "127.0.0.1:1 zz00000000000000",
            "nowhere 0011223344556677",
            "127.0.0.1:1 00112233445566",
            "127.0.0.1:1 001122334455667788",
            "127.0.0.1:1 0011223344556677 nowhere",
            "127.0.0.1:1 0011223344556677 127.0.0.1 more",
        ] {
            assert_eq!(parse_line(line), None, "{line:?}");
        }
        let id = [0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77];
        assert_eq!(
            parse_line("[::1]:9 0011223344556677"),
            Some(Peer {
                agent: "[::1]:9".parse().unwrap(),
                id,
                local: None
            })
        );
        assert_eq!(
            parse_line("10.0.0.1:9 0011223344556677 10.0.0.2"),
            Some(Peer {
                agent: "10.0.0.1:9".parse().unwrap(),
                id,
                local: Some("10.0.0.2".parse().unwrap())
            })
        );
    }
}
