//! Stopping: the operating system's request to stop (SIGINT, SIGTERM), and a one-shot
//! broadcast signal ("stop accepting", "close tunnels", "retire this tunnel") that any
//! number of tasks can await.

use std::sync::Arc;

use tokio::sync::watch;

/// Fires once; every waiter, past and future, sees it.
#[derive(Clone, Debug)]
pub(crate) struct Trigger {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Trigger {
    fn default() -> Self {
        Trigger {
            tx: Arc::new(watch::channel(false).0),
        }
    }
}

impl Trigger {
    /// Fires the signal.
    pub(crate) fn fire(&self) {
        self.tx.send_replace(true);
    }

    /// Whether it has fired.
    pub(crate) fn is_fired(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once the signal has fired.
    pub(crate) async fn cancelled(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so this can only end by seeing `true`.
        let _ = rx.wait_for(|fired| *fired).await;
    }
}

/// Completes on SIGINT or SIGTERM: the future to hand to `Proxy::run` or `Agent::run`.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown signal received");
}
