//! The accept loop every listener runs: take a connection, hold a permit for it (a bound
//! on connections at once), run its handler in a tracked task; on stop, stop accepting,
//! give open connections a grace period, then abort what is left.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{warn, Instrument};

use crate::runtime::shutdown::Trigger;

/// Something connections are accepted from: a TCP listener, or the QUIC endpoint.
pub(super) trait Acceptor: Send + 'static {
    /// One accepted connection, not yet handled.
    type Conn: Send + 'static;

    /// The next connection and its peer; `None` once the acceptor is closed.
    fn accept(&mut self) -> impl Future<Output = Option<(Self::Conn, SocketAddr)>> + Send;

    /// Turns away a connection over the limit (dropping it closes it).
    fn refuse(conn: Self::Conn) {
        drop(conn);
    }

    /// Takes no more connections; open ones go on.
    fn stop(self);
}

impl Acceptor for TcpListener {
    type Conn = TcpStream;

    async fn accept(&mut self) -> Option<(TcpStream, SocketAddr)> {
        loop {
            match TcpListener::accept(self).await {
                Ok(conn) => return Some(conn),
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn stop(self) {
        drop(self);
    }
}

/// Accepts connections until `stop` fires, at most as many at once as `permits` allows,
/// running `handle` for each in a tracked task; then lets them finish for `grace` and
/// aborts the rest.
pub(super) async fn serve<A, F, Fut>(
    mut acceptor: A,
    stop: Trigger,
    permits: Arc<Semaphore>,
    grace: Duration,
    handle: F,
) where
    A: Acceptor,
    F: Fn(A::Conn, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = acceptor.accept() => {
                let Some((conn, peer)) = accepted else { break };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    warn!(%peer, "at the connection limit; refusing");
                    A::refuse(conn);
                    continue;
                };
                let span = tracing::debug_span!("conn", %peer);
                let work = handle(conn, peer);
                tasks.spawn(async move {
                    work.await;
                    drop(permit);
                }.instrument(span));
            }
        }
    }
    acceptor.stop();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        warn!(
            open = tasks.len(),
            "connections still open after the grace period; closing them"
        );
        tasks.abort_all();
    }
}
