//! The change feed: each change sends `NOTIFY revproxy_state` with its commit, and a
//! connection of its own `LISTEN`s and wakes the proxy. Proxies also poll the version
//! ([`Store::version`](revproxy_ca::Store::version)), so a lost notification (a listening
//! connection cut) costs at most one poll. The changes themselves are in `queries.rs`.
//!
//! Any role that can connect to the database may `NOTIFY` the channel (PostgreSQL has no
//! privilege for it), so a notification is only a hint to check the version: its payload
//! is never read, and a flood of them wakes the proxy at most once per
//! [`WAKE_AT_MOST_EVERY`].

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio_postgres::{AsyncMessage, Config, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{debug, info, warn};

use super::{pg_reason, PgStore, OP_TIMEOUT};

/// The channel changes are announced on.
const CHANNEL: &str = "revproxy_state";
/// Least time between two wakes from notifications: the first after a quiet spell wakes at
/// once (a revocation reaches every proxy in milliseconds), the others within this time
/// are folded into one wake at its end. A role flooding the channel then costs each proxy
/// five version checks a second, where each notification used to cost one.
const WAKE_AT_MOST_EVERY: Duration = Duration::from_millis(200);

/// Announces `version` to the listeners when `tx` commits.
pub(super) async fn notify(
    tx: &Transaction<'_>,
    version: i64,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&CHANNEL, &version.to_string()],
    )
    .await
    .map(|_| ())
}

impl PgStore {
    /// Starts listening for changes on the store's runtime, in place of any listener
    /// started before: what [`Store::on_change`](revproxy_ca::Store::on_change) does.
    pub(super) fn listen_for_changes(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        let mut listening = self.listening.lock().expect("listen task lock");
        if let Some(old) = listening.take() {
            old.abort();
        }
        *listening = Some(self.runtime().spawn(listen(
            self.config.clone(),
            self.tls.clone(),
            self.described.clone(),
            wake,
        )));
    }
}

/// Keeps a connection that `LISTEN`s and calls `wake` after notifications (at most once
/// per [`WAKE_AT_MOST_EVERY`]) and after every (re)connection (a notification may have been
/// missed while there was none).
async fn listen(
    config: Config,
    tls: MakeRustlsConnect,
    described: String,
    wake: Arc<dyn Fn() + Send + Sync>,
) {
    let mut backoff =
        crate::runtime::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut was_down = false;
    loop {
        match tokio::time::timeout(OP_TIMEOUT, config.connect(tls.clone())).await {
            Ok(Ok((client, mut connection))) => {
                let on_message = wake.clone();
                let mut driver = tokio::spawn(async move {
                    // When the last wake was, and whether a notification came since.
                    let (mut woke, mut owed) = (None::<Instant>, false);
                    loop {
                        let due = async {
                            match woke.filter(|_| owed) {
                                Some(at) => tokio::time::sleep_until(at + WAKE_AT_MOST_EVERY).await,
                                None => std::future::pending().await,
                            }
                        };
                        tokio::select! {
                            message = std::future::poll_fn(|cx| connection.poll_message(cx)) => {
                                match message {
                                    Some(Ok(AsyncMessage::Notification(_))) => owed = true,
                                    Some(Ok(_)) => continue,
                                    Some(Err(e)) => return pg_reason(&e),
                                    None => return "the database closed the connection".into(),
                                }
                                if woke.is_some_and(|at| at.elapsed() < WAKE_AT_MOST_EVERY) {
                                    continue;
                                }
                            }
                            () = due => {}
                        }
                        woke = Some(Instant::now());
                        owed = false;
                        on_message();
                    }
                });
                let sql = format!("LISTEN {CHANNEL}");
                let listen = client.batch_execute(&sql);
                match tokio::time::timeout(OP_TIMEOUT, listen).await {
                    Ok(Ok(())) => {
                        if was_down {
                            info!(store = %described, "listening for state changes again");
                        }
                        backoff.reset();
                        wake(); // whatever changed while nobody listened
                        let why = (&mut driver).await.unwrap_or_else(|e| e.to_string());
                        warn!(store = %described, reason = %why,
                              "lost the store's change notifications; polling until listening again");
                    }
                    Ok(Err(e)) => {
                        warn!(store = %described, reason = %pg_reason(&e), "cannot LISTEN for state changes")
                    }
                    Err(_) => {
                        warn!(store = %described, "cannot LISTEN for state changes: no answer")
                    }
                }
                driver.abort();
            }
            Ok(Err(e)) if !was_down => {
                warn!(store = %described, reason = %pg_reason(&e), "cannot connect to listen for state changes")
            }
            Ok(Err(e)) => {
                debug!(store = %described, reason = %pg_reason(&e), "still cannot connect")
            }
            Err(_) => debug!(store = %described, "connecting to listen timed out"),
        }
        was_down = true;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
