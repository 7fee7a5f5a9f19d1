//! The old process's side of `serve --upgrade` (the socket exchange itself is
//! `runtime::handover`): hand the listening sockets to a successor that asks, and once it
//! serves, accept nothing more and tell the agents to move to it. The new process's side
//! is small: it confirms when it serves, and for [`HOLD`] it holds clients whose agents
//! have not moved yet (`public.rs`).

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::reload::PublicListeners;
use super::Shared;
use crate::runtime::handover::{self, Described, HandoverError, Role, Successor};
use crate::tunnel::quic::proxy::ReadSwitch;

/// After an upgrade, how long the new process holds a client whose name has no tunnel
/// yet, waiting for its agent to move over (they move within a second; `OPEN_TIMEOUT`,
/// 15 s, bounds the whole open anyway).
pub(super) const HOLD: Duration = Duration::from_secs(10);
/// How long the old process waits for its accept loops to stop before moving the agents.
const STOP_ACCEPTING_TIMEOUT: Duration = Duration::from_secs(2);

/// A second descriptor of a listening socket, described for the hand-over.
pub(super) fn described(
    role: Role,
    socket: &impl AsFd,
    addr: std::net::SocketAddr,
) -> std::io::Result<(Described, OwnedFd)> {
    Ok((
        Described { role, addr },
        socket.as_fd().try_clone_to_owned()?,
    ))
}

/// The next successor asking for the sockets; never completes without a listener.
pub(super) async fn next_successor(
    listener: Option<&handover::Listener>,
) -> std::io::Result<Successor> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Everything a successor gets: the fixed sockets and the public listeners.
pub(super) fn sockets(
    fixed: &[(Described, OwnedFd)],
    public: &PublicListeners,
) -> std::io::Result<Vec<(Described, OwnedFd)>> {
    let mut all = (fixed.iter())
        .map(|(d, fd)| Ok((*d, fd.try_clone()?)))
        .collect::<std::io::Result<Vec<_>>>()?;
    all.extend(public.sockets()?);
    Ok(all)
}

/// A hand-over under way: the task that sends the sockets and waits for "ready". Its
/// answer: `None` if the successor does not serve, or whether it forwards this process's
/// QUIC packets.
pub(super) struct HandingOver {
    task: JoinHandle<Result<Option<bool>, HandoverError>>,
    /// The connection to the successor, to end the exchange early.
    aborter: std::os::unix::net::UnixStream,
}

impl HandingOver {
    /// Ends the exchange (this process stops for another reason): the task's blocking
    /// calls return and its descriptors close.
    pub(super) fn abort(self) {
        let _ = self.aborter.shutdown(std::net::Shutdown::Both);
        drop(self.task);
    }
}

/// Hands `sockets` to `successor` and waits for it to serve, off the async threads.
/// The task's answer: whether the successor serves now (and was told "go"), and whether
/// it forwards this process's QUIC packets (`quic/takeover.rs`). The QUIC endpoint
/// (`quic`) stops reading its socket before the successor is told "go": never do both
/// read it.
pub(super) fn hand_over(
    mut successor: Successor,
    sockets: Vec<(Described, OwnedFd)>,
    quic: Option<ReadSwitch>,
) -> std::io::Result<HandingOver> {
    info!(
        pid = successor.pid,
        sockets = sockets.len(),
        "a new process asks for the listening sockets; handing them over"
    );
    let aborter = successor.aborter()?;
    let task = tokio::task::spawn_blocking(move || {
        successor.hand_over(&sockets)?;
        // Our copies stay open until the successor serves: until then we accept.
        let Some(ready) = successor.wait_ready(handover::READY_TIMEOUT)? else {
            return Ok(None);
        };
        if let Some(switch) = &quic {
            switch.pause();
        }
        if !successor.go() {
            if let Some(switch) = &quic {
                switch.resume();
            }
            return Ok(None);
        }
        let takes_over = ready.takes_over && quic.as_ref().is_some_and(ReadSwitch::takes_over);
        Ok(Some(takes_over))
    });
    Ok(HandingOver { task, aborter })
}

/// Completes when the hand-over under way does (see [`HandingOver`]); never without one.
pub(super) async fn finished(under_way: &mut Option<HandingOver>) -> Option<bool> {
    let Some(handing) = under_way else {
        return std::future::pending().await;
    };
    let outcome = (&mut handing.task).await;
    *under_way = None;
    match outcome {
        Ok(Ok(Some(takes_over))) => Some(takes_over),
        Ok(Ok(None)) => {
            warn!("the new process ended before it served; this one goes on serving");
            None
        }
        Ok(Err(e)) => {
            warn!(error = %e, "socket hand-over failed; this process goes on serving");
            None
        }
        Err(e) => {
            warn!(error = %e, "socket hand-over task failed; this process goes on serving");
            None
        }
    }
}

/// After the successor said it serves: stop accepting everywhere (and wait until no loop
/// will accept again, so that no agent reconnecting lands here), then tell every agent
/// to move. Open client connections run on; the caller drains them.
pub(super) async fn step_aside(
    shared: &Shared,
    public: &PublicListeners,
    agents_stopped: &crate::runtime::shutdown::Trigger,
    quic: Option<&(Vec<quinn::Endpoint>, ReadSwitch)>,
    takes_over: bool,
) {
    // Every datagram is the new process's from now on; our closes still go out.
    if let Some((_, switch)) = quic {
        switch.pause();
    }
    let stopped = async {
        public.stop_accepting().await;
        agents_stopped.cancelled().await;
    };
    if tokio::time::timeout(STOP_ACCEPTING_TIMEOUT, stopped)
        .await
        .is_err()
    {
        warn!(
            "accept loops did not stop within {STOP_ACCEPTING_TIMEOUT:?}; moving the agents anyway"
        );
    }
    // Every tunnel's task tells its agent (one that registers later too, at once), and
    // mesh channels take no new streams: their agents dial the new process.
    shared.moving.fire();
    let count = (shared.registry.snapshot().into_iter())
        .filter(|(_, _, draining)| !draining)
        .count();
    // The new process forwards our QUIC tunnels' packets here (`quic/takeover.rs`), and
    // they move as h2 tunnels do. Without that, every QUIC connection goes now, those
    // still in their handshake too: the UDP socket is the new process's.
    if let Some((endpoints, _)) = quic {
        if !takes_over {
            for endpoint in endpoints {
                endpoint.close(
                    quinn::VarInt::from_u32(crate::tunnel::quic::code::MOVING),
                    b"proxy moving to a new process",
                );
            }
        }
    }
    info!(tunnels = count, "agents told to move to the new process");
}
