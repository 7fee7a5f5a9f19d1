//! Telling a tunnel's streams that the agent acknowledged a narrower window.
//!
//! h2 narrows its open streams' receive windows when the agent acknowledges the
//! `SETTINGS_INITIAL_WINDOW_SIZE` the budget asked for (`proxy.rs`'s `drive`), and only
//! checks whether a stream owes the agent a `WINDOW_UPDATE` when the stream releases
//! capacity. A stream that had released everything it received, with credit not yet
//! returned (h2 holds it back until it reaches half the remaining window), and whose
//! window the narrowing took to zero or below, would wait for data forever: the agent may
//! not send, and the proxy has nothing more to release. Such a stream releases nothing
//! once more (`release_capacity(0)`) when told the narrowing took effect, which makes h2
//! check again and send the credit it owes.

use std::task::{ready, Context, Poll};

use tokio::sync::watch;
use tokio_util::sync::ReusableBoxFuture;

/// The tunnel's side: [`Narrowed::settled`] once the agent acknowledged a narrower window.
pub(crate) type Narrowed = watch::Sender<()>;

/// A stream's side: ready once each time the tunnel's window narrowing took effect;
/// pending forever once the tunnel is gone, or on tunnels whose windows never narrow.
pub(crate) struct Settled(Option<ReusableBoxFuture<'static, Option<watch::Receiver<()>>>>);

/// A new tunnel's two sides: the stream side is cloned into [`Settled`] for each stream.
pub(crate) fn channel() -> (Narrowed, watch::Receiver<()>) {
    watch::channel(())
}

impl Settled {
    /// Listens from now on (a narrowing that took effect before needs no re-check here:
    /// the stream was opened after it).
    pub(crate) fn new(tunnel: &watch::Receiver<()>) -> Settled {
        let mut rx = tunnel.clone();
        rx.mark_unchanged();
        Settled(Some(ReusableBoxFuture::new(changed(rx))))
    }

    /// For streams whose windows never narrow (the agent's end).
    pub(crate) fn never() -> Settled {
        Settled(None)
    }

    /// Ready once per narrowing that took effect since the last time it was.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(wait) = &mut self.0 else {
            return Poll::Pending;
        };
        match ready!(wait.poll(cx)) {
            Some(rx) => {
                wait.set(changed(rx));
                Poll::Ready(())
            }
            None => {
                self.0 = None;
                Poll::Pending
            }
        }
    }

    /// Has `recv` check whether it owes its tunnel credit, if a narrowing took effect
    /// since the last call (see the module docs); never waits.
    pub(crate) fn recheck(&mut self, cx: &mut Context<'_>, recv: &mut h2::RecvStream) {
        while self.poll(cx).is_ready() {
            // Releasing nothing cannot fail: it is never more than what is in flight.
            let _ = recv.flow_control().release_capacity(0);
        }
    }
}

/// Waits for the next change; `None` once the tunnel is gone.
async fn changed(mut rx: watch::Receiver<()>) -> Option<watch::Receiver<()>> {
    rx.changed().await.ok().map(|()| rx)
}
