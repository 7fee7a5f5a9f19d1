//! A one-shot broadcast signal ("stop accepting", "close tunnels") that any number of
//! tasks can await.

use std::sync::Arc;

use tokio::sync::watch;

/// Fires once; every waiter, past and future, sees it.
#[derive(Clone, Debug)]
pub struct Trigger {
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
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }

    /// Whether it has fired.
    pub fn is_fired(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once the signal has fired.
    pub async fn cancelled(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so this can only end by seeing `true`.
        let _ = rx.wait_for(|fired| *fired).await;
    }
}
