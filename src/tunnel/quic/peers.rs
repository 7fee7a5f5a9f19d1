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
//! are sent to ([`Peers::saw`], on the socket; checked to be one this state directory
//! issued), kept once the tunnel is up ([`Peers::hold`]) until it ends.
//!
//! The table is written (`quic-peers/GENERATION` in the state directory, `0600`, a line
//! `ADDRESS ID` per tunnel) at most every [`WRITE_EVERY`] while it changes, and removed
//! when the process ends cleanly (its agents are told then). A file older than the idle
//! timeout names only tunnels that ended anyway and is not used.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
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

/// Handshakes seen and not yet up, at most; beyond it the table of them starts again (a
/// flood of forged handshake packets costs records, not memory).
const SEEN_CAP: usize = 4096;

/// A connection ID this proxy issued.
type Cid = [u8; CID_LEN];

/// The agents of this process's QUIC tunnels: address and the ID they send to. (As many
/// as the agent port holds tunnels: it bounds them.)
pub(crate) struct Peers {
    table: Mutex<Table>,
    dirty: AtomicBool,
    /// Tells IDs this process issued.
    ids: GenerationCids,
}

#[derive(Default)]
struct Table {
    /// From the handshake's packets, until the tunnel is up or fails.
    seen: HashMap<SocketAddr, Cid>,
    /// Tunnels up.
    held: HashMap<SocketAddr, Cid>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.table.lock().expect("peers lock");
        (f.debug_struct("Peers"))
            .field("seen", &table.seen.len())
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

    /// Looks at a received datagram: an Initial or Handshake packet (the agent's last ones
    /// in a handshake go to the ID the proxy chose) to an ID this process issued records
    /// its sender. Costs a branch for any other packet (short headers are all a tunnel's
    /// traffic).
    pub(crate) fn saw(&self, from: SocketAddr, packet: &[u8]) {
        let Some(&first) = packet.first() else {
            return;
        };
        // Long header, type Initial (0) or Handshake (2), an ID of our length.
        if first & 0x80 == 0 || (first >> 4) & 0x01 != 0 || packet.get(5) != Some(&(CID_LEN as u8))
        {
            return;
        }
        let Some(id) = packet.get(6..6 + CID_LEN) else {
            return;
        };
        if !self.ids.issued_here(id) {
            return;
        }
        let id: Cid = id.try_into().expect("CID_LEN bytes");
        let mut table = self.table.lock().expect("peers lock");
        if table.seen.len() >= SEEN_CAP && !table.seen.contains_key(&from) {
            table.seen.clear();
        }
        table.seen.insert(from, id);
    }

    /// Follows the handshake from `from`: [`Tracked::up`] keeps it (written) once it is a
    /// tunnel, and dropping the guard forgets it.
    pub(crate) fn track(self: &Arc<Self>, from: SocketAddr) -> Tracked {
        Tracked {
            peers: self.clone(),
            from,
        }
    }

    fn forget(&self, from: SocketAddr) {
        let mut table = self.table.lock().expect("peers lock");
        table.seen.remove(&from);
        if table.held.remove(&from).is_some() {
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// The table as written: a line `ADDRESS ID` (hex) per tunnel.
    fn render(&self) -> Vec<u8> {
        let table = self.table.lock().expect("peers lock");
        let mut out = Vec::with_capacity(table.held.len() * 48);
        for (addr, id) in &table.held {
            let _ = writeln!(out, "{addr} {}", hex(id));
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
const REFRESH: Duration = Duration::from_secs(5);

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
}

impl Tracked {
    /// The handshake became a tunnel: kept, and written, until this guard is dropped.
    pub(crate) fn up(&self) {
        let peers = &self.peers;
        let mut table = peers.table.lock().expect("peers lock");
        if let Some(id) = table.seen.remove(&self.from) {
            table.held.insert(self.from, id);
            peers.dirty.store(true, Ordering::Release);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.peers.forget(self.from);
    }
}

/// Where the process of `generation` keeps its table.
pub(crate) fn table_path(dir: &Path, generation: u8) -> std::io::Result<PathBuf> {
    let folder = dir.join(PEERS_DIR);
    revproxy_ca::fsutil::create_private_dir(&folder)?;
    Ok(folder.join(generation.to_string()))
}

/// Writes `contents` to `path` (`0600`) through a temporary file and a rename, so a
/// reader never sees half of it. No fsync: it matters after a process crash, when the
/// page cache survives, not after a machine's, when the tunnels are gone anyway.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
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
/// tunnels have timed out), each with its ID; the tables are removed (each is used once).
pub(crate) fn take_earlier(dir: &Path, fresh: Duration) -> Vec<(SocketAddr, Cid)> {
    let folder = dir.join(PEERS_DIR);
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return Vec::new();
    };
    let mut peers = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let recent = (entry.metadata().and_then(|m| m.modified()))
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age <= fresh);
        if recent {
            if let Ok(text) = std::fs::read_to_string(&path) {
                peers.extend(text.lines().filter_map(parse_line));
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    peers
}

fn parse_line(line: &str) -> Option<(SocketAddr, Cid)> {
    let (addr, hex_id) = line.split_once(' ')?;
    if hex_id.len() != 2 * CID_LEN {
        return None;
    }
    let mut id = [0u8; CID_LEN];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex_id.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some((addr.parse().ok()?, id))
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

/// Sends a stateless reset to each of `peers` (the agents of earlier processes' tables,
/// [`take_earlier`]) from `socket` (the agent port's UDP socket, whose address the agents
/// know), so they reconnect now. For a cold start only: after an upgrade the old
/// process's tunnels live.
pub(crate) async fn reset(
    peers: Vec<(SocketAddr, Cid)>,
    socket: std::net::UdpSocket,
    reset_key: ring::hmac::Key,
) {
    if peers.is_empty() {
        return;
    }
    let socket = match socket
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UdpSocket::from_std(socket))
    {
        Ok(socket) => socket,
        Err(e) => return warn!(error = %e, "cannot reset the last process's QUIC tunnels"),
    };
    let mut sent = 0usize;
    for (addr, id) in &peers {
        let packet = reset_packet(&reset_key, id);
        // Bounded: a peer that cannot be sent to is skipped.
        let send = socket.send_to(&packet, addr);
        match tokio::time::timeout(Duration::from_secs(1), send).await {
            Ok(Ok(_)) => sent += 1,
            Ok(Err(e)) => debug!(%addr, error = %e, "stateless reset not sent"),
            Err(_) => debug!(%addr, "stateless reset not sent in time"),
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

    /// A long-header packet of `kind` (0 Initial, 1 0-RTT, 2 Handshake, 3 Retry) to `id`.
    fn long_header(kind: u8, id: &[u8]) -> Vec<u8> {
        let mut packet = vec![0xc0 | (kind << 4), 0, 0, 0, 1, id.len() as u8];
        packet.extend_from_slice(id);
        packet.extend_from_slice(&[0u8; 40]);
        packet
    }

    fn issued(generation: u8) -> Cid {
        use quinn_proto::ConnectionIdGenerator;
        let id = GenerationCids::new(KEY, generation).generate_cid();
        id[..].try_into().unwrap()
    }

    #[test]
    fn only_handshakes_to_ids_this_process_issued_are_kept_and_only_while_the_tunnel_lives() {
        let peers = Arc::new(Peers::new(GenerationCids::new(KEY, 7)));
        let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
            "192.0.2.1:4000".parse().unwrap(),
            "192.0.2.2:4000".parse().unwrap(),
            "[2001:db8::3]:4000".parse().unwrap(),
        );
        let ours = issued(7);
        // Not recorded: a short header, a Retry or 0-RTT packet, an ID of an earlier
        // process, one with a bad signature.
        peers.saw(a, &[0x40, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        peers.saw(a, &long_header(3, &ours));
        peers.saw(a, &long_header(1, &ours));
        peers.saw(b, &long_header(2, &issued(6)));
        let mut forged = ours;
        forged[7] ^= 1;
        peers.saw(c, &long_header(2, &forged));
        for from in [a, b, c] {
            peers.track(from).up();
        }
        assert_eq!(peers.render(), b"");

        // Recorded: an Initial and then a Handshake (the last one wins), once up.
        let first = issued(7);
        let (tracked_a, tracked_c) = (peers.track(a), peers.track(c));
        peers.saw(a, &long_header(0, &first));
        peers.saw(a, &long_header(2, &ours));
        peers.saw(c, &long_header(2, &first));
        assert_eq!(
            peers.render(),
            b"",
            "nothing written before the tunnel is up"
        );
        tracked_a.up();
        tracked_c.up();
        let text = String::from_utf8(peers.render()).unwrap();
        let mut lines: Vec<_> = text.lines().filter_map(parse_line).collect();
        lines.sort();
        let mut want = vec![(a, ours), (c, first)];
        want.sort();
        assert_eq!(lines, want);
        assert!(peers.dirty.load(Ordering::Acquire));

        // A tunnel that ended is forgotten.
        drop(tracked_a);
        let text = String::from_utf8(peers.render()).unwrap();
        assert_eq!(
            text.lines().filter_map(parse_line).collect::<Vec<_>>(),
            vec![(c, first)]
        );
    }

    #[test]
    fn a_flood_of_handshakes_never_up_stays_bounded() {
        let peers = Peers::new(GenerationCids::new(KEY, 1));
        let id = issued(1);
        for port in 0..3 * SEEN_CAP as u32 {
            let from =
                SocketAddr::from(([10, (port >> 16) as u8, (port >> 8) as u8, port as u8], 1));
            peers.saw(from, &long_header(2, &id));
        }
        assert!(peers.table.lock().unwrap().seen.len() <= SEEN_CAP);
    }

    #[tokio::test]
    async fn the_table_is_written_private_read_once_and_ignored_when_stale() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let peers = Arc::new(Peers::new(GenerationCids::new(KEY, 3)));
        let from: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let id = issued(3);
        let tracked = peers.track(from);
        peers.saw(from, &long_header(2, &id));
        tracked.up();
        let path = table_path(dir.path(), 3).unwrap();
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
        let copy = table_path(dir.path(), 2).unwrap();
        std::fs::copy(&path, &copy).unwrap();
        let fresh = Duration::from_secs(27);
        let mut earlier = take_earlier(dir.path(), fresh);
        earlier.sort();
        assert_eq!(earlier, vec![(from, id), (from, id)], "both tables read");
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
        std::fs::write(&copy, format!("{from} {}\ngarbage\n", hex(&id))).unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(60);
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
    fn lines_that_are_not_an_address_and_an_id_are_skipped() {
        for line in [
            "",
            "127.0.0.1:1",
            "127.0.0.1:1 zz00000000000000",
            "nowhere 0011223344556677",
            "127.0.0.1:1 00112233445566",
            "127.0.0.1:1 001122334455667788",
        ] {
            assert_eq!(parse_line(line), None, "{line:?}");
        }
        assert_eq!(
            parse_line("[::1]:9 0011223344556677"),
            Some((
                "[::1]:9".parse().unwrap(),
                [0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]
            ))
        );
    }
}
