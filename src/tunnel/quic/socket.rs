//! The proxy's QUIC socket as quinn sees it: read or not ([`ReadSwitch`]: during an
//! upgrade only one process reads), and the takeover of `takeover.rs` (the new process
//! forwards the packets of earlier generations; the old one reads those in place of the
//! UDP socket once it stepped aside).

use std::sync::Arc;
use std::time::Duration;

use super::peers::Peers;
use super::steer::Steer;
use super::takeover::{Forwarded, Forwarder};
use crate::runtime::shutdown::Trigger;

/// Whether an endpoint reads its UDP socket; it sends either way. During an upgrade both
/// processes hold the same socket, and a datagram goes to whichever reads first: the old
/// process would swallow an agent's first reconnect packet (costing it a retransmission,
/// a second at QUIC's initial timeout), the new one packets of the old one's live
/// tunnels. So only one reads at a time: the new process from the moment the old one
/// has let go, which stops reading then (its closes still go out) and from then on reads
/// what the new one forwards of its tunnels' packets (`takeover.rs`).
/// One switch works every endpoint of the port's group (`steer.rs`) together.
#[derive(Clone, Debug)]
pub(crate) struct ReadSwitch(Arc<[Arc<SwitchState>]>);

#[derive(Debug)]
struct SwitchState {
    reading: std::sync::atomic::AtomicBool,
    /// The endpoint's task, parked while reading is off.
    waiting: std::sync::Mutex<Option<std::task::Waker>>,
    /// Fired when the endpoint let go of the socket (its task ended).
    closed: Trigger,
    /// Where this process's packets come from once it stepped aside.
    forwarded: std::sync::Mutex<Option<Arc<Forwarded>>>,
    takeover: Takeover,
}

/// This process's generation, the state directory its forwarding sockets live in, the
/// connection-ID key (to forward only IDs this state directory's processes issued),
/// which socket of the port's group the endpoint reads, and the table of its tunnels'
/// agents that a process started after a crash resets (`peers.rs`).
#[derive(Clone)]
pub(crate) struct Takeover {
    pub(crate) dir: std::path::PathBuf,
    pub(crate) generation: u8,
    pub(crate) key: Vec<u8>,
    pub(crate) steer: Steer,
    pub(crate) peers: Arc<Peers>,
}

impl std::fmt::Debug for Takeover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (f.debug_struct("Takeover"))
            .field("dir", &self.dir)
            .field("generation", &self.generation)
            .field("steer", &self.steer)
            .finish_non_exhaustive()
    }
}

/// The endpoint's socket: `socket` behind a [`ReadSwitch`] (reading from the start, or
/// once the old process let go), forwarding earlier generations' packets if `forwarding`
/// (a process that took the socket over).
pub(crate) fn switchable(
    socket: std::net::UdpSocket,
    reading: bool,
    takeover: Takeover,
) -> std::io::Result<(Arc<dyn quinn::AsyncUdpSocket>, ReadSwitch)> {
    let forwarder = match reading {
        true => None,
        false => Some(Forwarder::new(
            &takeover.dir,
            takeover.generation,
            &takeover.key,
            takeover.steer.index,
        )?),
    };
    let switch = Arc::new(SwitchState {
        reading: std::sync::atomic::AtomicBool::new(reading),
        waiting: std::sync::Mutex::new(None),
        closed: Trigger::default(),
        forwarded: std::sync::Mutex::new(None),
        takeover,
    });
    let socket = Arc::new(Switchable {
        inner: quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)?,
        switch: switch.clone(),
        forwarder,
        _closed: FiresOnDrop(switch.clone()),
    });
    Ok((socket, ReadSwitch(Arc::new([switch]))))
}

impl ReadSwitch {
    /// One switch for the endpoints of all of `switches`.
    pub(crate) fn join(switches: impl IntoIterator<Item = ReadSwitch>) -> ReadSwitch {
        let all: Vec<_> = (switches.into_iter())
            .flat_map(|s| s.0.iter().cloned().collect::<Vec<_>>())
            .collect();
        ReadSwitch(all.into())
    }

    /// Makes ready to read this process's packets from its successor (before the
    /// successor reads the UDP socket): binds this generation's forwarding socket of each
    /// endpoint. Bound once: a hand-over that failed leaves them for the next one.
    pub(crate) fn prepare_takeover(&self) -> std::io::Result<()> {
        for state in self.0.iter() {
            let mut forwarded = state.forwarded.lock().expect("forwarded lock");
            if forwarded.is_none() {
                let takeover = &state.takeover;
                let index = takeover.steer.index;
                let bound = Forwarded::bind(&takeover.dir, takeover.generation, index)?;
                *forwarded = Some(Arc::new(bound));
            }
        }
        Ok(())
    }

    /// Whether this process reads its packets from its successor once it steps aside
    /// (every endpoint does).
    pub(crate) fn takes_over(&self) -> bool {
        (self.0.iter()).all(|state| state.forwarded.lock().expect("forwarded lock").is_some())
    }

    /// Stops reading the UDP sockets (the datagrams stay for the other process); reads
    /// what it forwards instead, if [`Self::prepare_takeover`] was called.
    pub(crate) fn pause(&self) {
        for state in self.0.iter() {
            (state.reading).store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// Reads again.
    pub(crate) fn resume(&self) {
        for state in self.0.iter() {
            (state.reading).store(true, std::sync::atomic::Ordering::Release);
            if let Some(waker) = state.waiting.lock().expect("switch lock").take() {
                waker.wake();
            }
        }
    }

    /// Completes once every endpoint has closed its socket, which it does when every handle
    /// to it is dropped and its connections are gone; `false` if that took longer than
    /// `within`. The endpoint's tasks (its driver, its connections') are spawned, so
    /// their end is not the caller's to see otherwise, and they may run on other threads:
    /// a proxy started again at once on the same port needs the port free.
    pub(crate) async fn closed(&self, within: Duration) -> bool {
        let all = async {
            for state in self.0.iter() {
                state.closed.cancelled().await;
            }
        };
        tokio::time::timeout(within, all).await.is_ok()
    }
}

/// The UDP socket as quinn sees it, with a [`ReadSwitch`] on the receiving side.
#[derive(Debug)]
struct Switchable {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    switch: Arc<SwitchState>,
    /// In a process that took the socket over: sends earlier generations' packets on.
    forwarder: Option<Forwarder>,
    /// Dropped after `inner` (fields drop in order), when the socket is closed: every
    /// poller of `inner` holds this `Switchable` too ([`Poller`]).
    _closed: FiresOnDrop,
}

/// Fires [`SwitchState::closed`] when dropped.
#[derive(Debug)]
struct FiresOnDrop(Arc<SwitchState>);

impl Drop for FiresOnDrop {
    fn drop(&mut self) {
        self.0.closed.fire();
    }
}

/// A poller of the socket, which keeps its [`Switchable`] until it is dropped itself.
#[derive(Debug)]
struct Poller {
    /// Dropped first (fields drop in order).
    inner: std::pin::Pin<Box<dyn quinn::UdpPoller>>,
    _socket: Arc<Switchable>,
}

impl quinn::UdpPoller for Poller {
    fn poll_writable(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.get_mut().inner.as_mut().poll_writable(cx)
    }
}

impl Switchable {
    fn reading(&self) -> bool {
        (self.switch.reading).load(std::sync::atomic::Ordering::Acquire)
    }
}

impl quinn::AsyncUdpSocket for Switchable {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(Poller {
            inner: self.inner.clone().create_io_poller(),
            _socket: self,
        })
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if !self.reading() {
            let forwarded = self
                .switch
                .forwarded
                .lock()
                .expect("forwarded lock")
                .clone();
            if let (Some(forwarded), Some(buf), Some(meta)) =
                (forwarded, bufs.first_mut(), meta.first_mut())
            {
                return forwarded.poll_recv(cx, buf, meta).map_ok(|()| 1);
            }
            *self.switch.waiting.lock().expect("switch lock") = Some(cx.waker().clone());
            // Switched back on meanwhile: its wake-up may have found no waker.
            if !self.reading() {
                return std::task::Poll::Pending;
            }
        }
        let count = std::task::ready!(self.inner.poll_recv(cx, bufs, meta))?;
        for (buf, meta) in bufs.iter().zip(meta.iter()).take(count) {
            // A handshake's datagrams start with its long-header packets (a GRO batch
            // of them is one handshake's: the first is enough).
            (self.switch.takeover.peers).saw(meta.addr, meta.dst_ip, &buf[..meta.len]);
        }
        if let Some(forwarder) = &self.forwarder {
            for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()).take(count) {
                meta.len = forwarder.sift(buf, meta);
            }
        }
        std::task::Poll::Ready(Ok(count))
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
