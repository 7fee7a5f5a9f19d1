//! An endpoint per lane: the proxy's QUIC port is a group of UDP sockets sharing its
//! number (`SO_REUSEPORT`), one per lane, each read by an endpoint running on its lane, so
//! that a QUIC tunnel, its packets and its clients' streams stay on one thread as an h2
//! tunnel's do (`runtime::lanes`). The kernel would spread packets over the group by
//! address; a small classic BPF program on the group picks the socket by the second byte
//! of the packet's destination connection ID instead, and each endpoint issues only IDs
//! whose byte names its own socket ([`Steer`]). A packet goes to the endpoint that knows
//! its connection even when the agent's address changes (a NAT rebinding). A new
//! connection's Initial packets carry an ID the agent chose at random: they go to the
//! socket that byte names, all of them alike, and that endpoint keeps the connection.
//!
//! The group's order is the order its sockets were bound, which is the order an upgrade
//! hands them over in: the new process's endpoint `i` reads the socket the old one's
//! endpoint `i` read (`takeover.rs` pairs them).

use std::io;
use std::net::SocketAddr;

/// Which socket of a group of `count` an endpoint reads: the IDs it issues carry `index`
/// (modulo `count`) in their second byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Steer {
    pub(crate) index: u8,
    pub(crate) count: u8,
}

/// Most sockets in a group: the steering byte is one byte.
pub(crate) const MAX_GROUP: usize = 64;

impl Steer {
    /// An endpoint alone on its socket.
    pub(crate) const ALONE: Steer = Steer { index: 0, count: 1 };

    /// `random` made into a byte that names this socket (still random in its other bits).
    pub(crate) fn byte(self, random: u8) -> u8 {
        let count = u16::from(self.count.max(1));
        let slots = 256 / count;
        let byte = (u16::from(random) % slots) * count + u16::from(self.index) % count;
        byte as u8
    }
}

/// `count` UDP sockets bound to `addr` (a kernel-chosen port for port 0: the others then
/// join at the first's), steered by connection ID; one when `count` is 1. The first is
/// bound alone and allows sharing only once bound: a port some other group still holds
/// (a process not yet gone) is refused as taken, never joined.
pub(crate) fn bind_group(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    let first = bind(addr, false)?;
    if count > 1 && STEERS {
        socket2::SockRef::from(&first).set_reuse_port(true)?;
    }
    grow(first, count)
}

/// Whether this OS steers by connection ID (Linux's reuseport BPF); elsewhere the port
/// is one socket.
const STEERS: bool = cfg!(target_os = "linux");

/// `first` and, if it allows port sharing (bound with `SO_REUSEPORT`), `count - 1` more
/// sockets at its address, steered by connection ID. A socket bound without it stays
/// alone (a group of one).
pub(crate) fn grow(
    first: std::net::UdpSocket,
    count: usize,
) -> io::Result<Vec<std::net::UdpSocket>> {
    let count = count.clamp(1, MAX_GROUP);
    if count == 1 || !STEERS || !socket2::SockRef::from(&first).reuse_port()? {
        return Ok(vec![first]);
    }
    let at = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..count {
        group.push(bind(at, true)?);
    }
    attach(&group[0], count)?;
    Ok(group)
}

fn bind(addr: SocketAddr, shared: bool) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The group's program: the socket is the second byte of the destination connection ID
/// modulo `count` (a short header's ID starts at byte 1, a long header's at byte 6). The
/// program sees the UDP payload; a packet too short to hold the byte goes to socket 0.
/// With GRO the kernel may merge datagrams of one address and port before it picks a
/// socket, and the program sees the first: an agent's connection has a socket of its own,
/// so merged datagrams are one connection's.
#[cfg(target_os = "linux")]
fn program(count: usize) -> [libc::sock_filter; 7] {
    const LDB_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
    const MOD: u16 = (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16;
    const RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        op(LDB_ABS, 0, 0, 0),
        // Long header (first bit set): to 2, else to 4.
        op(JSET, 0, 2, 0x80),
        op(LDB_ABS, 0, 0, 7),
        op(JA, 0, 0, 1),
        op(LDB_ABS, 0, 0, 2),
        op(MOD, 0, 0, count as u32),
        op(RET_A, 0, 0, 0),
    ]
}

/// Puts [`program`] on the group `socket` belongs to.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn attach(socket: &std::net::UdpSocket, count: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut filter = program(count);
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel copies it.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    match done {
        0 => Ok(()),
        _ => {
            let e = io::Error::last_os_error();
            Err(io::Error::new(
                e.kind(),
                format!("cannot steer QUIC packets to their lanes (SO_ATTACH_REUSEPORT_CBPF): {e}"),
            ))
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn attach(_: &std::net::UdpSocket, _: usize) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steering_byte_names_its_socket_and_keeps_the_rest_random() {
        for count in 1..=MAX_GROUP as u8 {
            for index in 0..count {
                let steer = Steer { index, count };
                let mut seen = std::collections::HashSet::new();
                for random in 0..=u8::MAX {
                    let byte = steer.byte(random);
                    assert_eq!(byte % count, index, "count {count} index {index}");
                    seen.insert(byte);
                }
                // As many bytes as every socket has.
                assert_eq!(
                    seen.len(),
                    256 / usize::from(count),
                    "count {count} index {index}"
                );
            }
        }
    }

    /// A packet whose destination ID names socket `i` arrives on socket `i`, short and
    /// long headers alike, from any source address.
    #[test]
    fn the_kernel_steers_packets_by_connection_id() {
        let count = 3;
        let group = bind_group("127.0.0.1:0".parse().unwrap(), count).unwrap();
        assert_eq!(group.len(), count);
        let at = group[0].local_addr().unwrap();
        for socket in &group {
            assert_eq!(socket.local_addr().unwrap(), at);
            socket
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
        }
        for round in 0..4u8 {
            let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            for index in 0..count as u8 {
                let steer = Steer {
                    index,
                    count: count as u8,
                };
                let byte = steer.byte(round.wrapping_mul(37).wrapping_add(index));
                let short = [0x40, 0xaa, byte, 1, 2, 3, 4, 5, 6, round];
                let long = [0xc0, 0, 0, 0, 1, 8, 0xbb, byte, 1, 2, 3, round];
                for packet in [&short[..], &long[..]] {
                    sender.send_to(packet, at).unwrap();
                    let mut buf = [0u8; 64];
                    let (n, _) = group[usize::from(index)].recv_from(&mut buf).unwrap();
                    assert_eq!(&buf[..n], packet, "socket {index}, round {round}");
                }
            }
        }
    }

    #[test]
    fn a_port_a_live_group_holds_is_refused_not_joined() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let at = group[0].local_addr().unwrap();
        let taken = bind_group(at, 2).expect_err("the port is taken");
        assert_eq!(taken.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn a_socket_bound_without_port_sharing_stays_alone() {
        let alone = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(grow(alone, 4).unwrap().len(), 1);
    }
}
