//! The proxy's background tasks, each named and owned: the state watch (revocations and
//! grants reach live tunnels within seconds) and the server certificate's renewal.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::{info, warn};

use super::Shared;
use crate::tls;

/// The running background tasks; dropping this stops them.
pub(super) struct Background {
    _tasks: JoinSet<()>,
}

/// Starts the background tasks.
pub(super) fn start(shared: Arc<Shared>) -> Background {
    let mut tasks = JoinSet::new();
    let registry = shared.registry.clone();
    let metrics = shared.metrics.clone();
    let mesh = shared.mesh.clone();
    // Revocations are counted against what this watch saw last (admission may reload the
    // state in between).
    let known = std::sync::Mutex::new(shared.state.get().revoked.clone());
    tasks.spawn(shared.state.clone().watch(move |s| {
        let mut known = known.lock().expect("revoked set");
        metrics.revoked(s.revoked.difference(&known).count());
        known.clone_from(&s.revoked);
        drop(known);
        registry.apply(s);
        mesh.apply(s);
    }));
    tasks.spawn(renew_server_cert(shared));
    Background { _tasks: tasks }
}

/// How often the proxy checks whether its own server certificate is due for renewal.
pub(super) const SERVER_CERT_CHECK: Duration = Duration::from_secs(3600);

/// Reissues the agent listener's certificate when a third of its lifetime is left, and
/// serves the new one from the next handshake on: a proxy that runs for years never
/// presents an expired certificate.
async fn renew_server_cert(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SERVER_CERT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is now; `build` has just checked
    loop {
        tick.tick().await;
        let ca = shared.ca.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            ca.server_identity(time::OffsetDateTime::now_utc())
        })
        .await;
        let (chain, key) = match loaded {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot check the server certificate; will try again");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "server certificate check failed");
                continue;
            }
        };
        let served = shared.server_cert.current_der();
        if tls::certs_from_pem(&chain, "server.crt")
            .is_ok_and(|c| c[0].as_ref() != served.as_slice())
        {
            match shared.server_cert.replace(&chain, &key) {
                Ok(()) => info!("server certificate renewed"),
                Err(e) => warn!(error = %e, "cannot load the renewed server certificate"),
            }
        }
    }
}
