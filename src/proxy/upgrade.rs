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

/// Hands `sockets` to `successor` and waits for it to serve, off the async threads.
/// The task's answer: whether the successor serves now.
pub(super) fn hand_over(
    mut successor: Successor,
    sockets: Vec<(Described, OwnedFd)>,
) -> JoinHandle<Result<bool, HandoverError>> {
    info!(
        pid = successor.pid,
        sockets = sockets.len(),
        "a new process asks for the listening sockets; handing them over"
    );
    tokio::task::spawn_blocking(move || {
        successor.hand_over(&sockets)?;
        // Our copies stay open until the successor serves: until then we accept.
        successor.wait_ready(handover::READY_TIMEOUT)
    })
}

/// Completes when the hand-over under way does; never without one.
pub(super) async fn finished(
    under_way: &mut Option<JoinHandle<Result<bool, HandoverError>>>,
) -> bool {
    let Some(task) = under_way else {
        return std::future::pending().await;
    };
    let outcome = task.await;
    *under_way = None;
    match outcome {
        Ok(Ok(true)) => true,
        Ok(Ok(false)) => {
            warn!("the new process ended before it served; this one goes on serving");
            false
        }
        Ok(Err(e)) => {
            warn!(error = %e, "socket hand-over failed; this process goes on serving");
            false
        }
        Err(e) => {
            warn!(error = %e, "socket hand-over task failed; this process goes on serving");
            false
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
    quic: Option<&(quinn::Endpoint, crate::tunnel::quic::proxy::StopReading)>,
) {
    // Every datagram is the new process's from now on; our closes still go out.
    if let Some((_, stop_reading)) = quic {
        stop_reading.fire();
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
    // Mesh channels take no new streams; their agents dial the new process.
    shared.moving.fire();
    let tunnels: Vec<_> = (shared.registry.snapshot().into_iter())
        .filter(|(_, _, draining)| !draining)
        .map(|(t, _, _)| t)
        .collect();
    let count = tunnels.len();
    let mut told = tokio::task::JoinSet::new();
    for tunnel in tunnels {
        told.spawn(async move { tunnel.tell_moving().await });
    }
    while told.join_next().await.is_some() {}
    // QUIC connections still in their handshake go too: the UDP socket is the new
    // process's now.
    if let Some((endpoint, _)) = quic {
        endpoint.close(
            quinn::VarInt::from_u32(crate::tunnel::quic::code::MOVING),
            b"proxy moving to a new process",
        );
    }
    info!(tunnels = count, "agents told to move to the new process");
}
