//! The proxy's background tasks, each named and owned: the state watch (revocations and
//! grants reach live tunnels within seconds), the heartbeat in a shared store (how proxies
//! and their agents know each other), the server certificate's renewal, and the operator's
//! certificate files of terminated names (`crate::edge`).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::Shared;
use crate::runtime::memory;
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
        metrics.revoked(s.revoked.iter().filter(|r| !known.contains(*r)).count());
        known.clone_from(&s.revoked);
        drop(known);
        registry.apply(s);
        mesh.apply(s);
    }));
    if shared.ca.state().shared() {
        tasks.spawn(heartbeat(shared.clone()));
    }
    let state = shared.state.clone();
    tasks.spawn(crate::edge::follow_files(shared.ca.clone(), move || {
        state.get().tls.values().cloned().collect()
    }));
    if let Some(settings) = shared.acme.clone() {
        tasks.spawn(crate::edge::order_certificates(orders(&shared, settings)));
    }
    tasks.spawn(give_back_memory(shared.clone()));
    tasks.spawn(renew_server_cert(shared));
    Background { _tasks: tasks }
}

/// How often the proxy looks whether a wave of tunnels came up ([`give_back_memory`]).
const GIVE_BACK_EVERY: Duration = Duration::from_secs(10);

/// After the beat: the looks fall between keep-alive bursts (multiples of 15 s), not on one.
const GIVE_BACK_OFFSET: Duration = Duration::from_millis(2500);

/// Tunnels up since memory was last given back that make it worth giving back again.
const GIVE_BACK_AFTER: u64 = 100;

/// Tunnels up since memory was last given back that make it worth giving back even while
/// they still arrive at the same pace (a long storm, steady churn).
const GIVE_BACK_ANYWAY: u64 = 10 * GIVE_BACK_AFTER;

/// Whether to give memory back, given the tunnels up since it was last given back
/// (`since`), at the last look (`lately`), and at the busiest look since (`peak`): once a
/// wave is over, its pace fallen to a quarter of its peak. Given back in the middle of a
/// wave, the memory would be taken again at once; but a wave that does not end (churn, a
/// storm of many minutes) gets it every [`GIVE_BACK_ANYWAY`] tunnels.
fn wave_over(since: u64, lately: u64, peak: u64) -> bool {
    since >= GIVE_BACK_ANYWAY || (since >= GIVE_BACK_AFTER && lately <= peak / 4)
}

/// Once a wave of tunnels came up (a fleet reconnecting, a storm of handshakes), gives the
/// memory their handshakes used back to the system (`runtime::memory::give_back_free`).
/// Looks every [`GIVE_BACK_EVERY`], between keep-alive bursts; an idle proxy never gives
/// back. Only tunnels coming up count: memory freed by tunnels going, or by refused
/// handshakes alone, waits for the next wave.
async fn give_back_memory(shared: Arc<Shared>) {
    let beat = crate::runtime::beat::Beat::new(GIVE_BACK_EVERY);
    let mut last = shared.metrics.tunnels_connected();
    let (mut given_at, mut peak) = (last, 0);
    loop {
        tokio::time::sleep(beat.wait() + GIVE_BACK_OFFSET).await;
        let now = shared.metrics.tunnels_connected();
        let (lately, since) = (now.saturating_sub(last), now.saturating_sub(given_at));
        last = now;
        peak = peak.max(lately);
        if !wave_over(since, lately, peak) {
            continue;
        }
        (given_at, peak) = (now, 0);
        let given = tokio::task::spawn_blocking(|| {
            let before = memory::resident();
            let started = std::time::Instant::now();
            memory::give_back_free();
            (before, memory::resident(), started.elapsed())
        })
        .await;
        if let Ok((Some(before), Some(after), took)) = given {
            debug!(
                resident_mib = after >> 20,
                given_back_mib = before.saturating_sub(after) >> 20,
                took = %crate::runtime::logging::duration(took),
                "a wave of tunnels came up; free memory given back"
            );
        }
    }
}

/// What ordering ACME certificates needs from this proxy.
fn orders(shared: &Arc<Shared>, settings: crate::edge::AcmeSettings) -> crate::edge::Orders {
    let (records, served, metrics) = (shared.clone(), shared.clone(), shared.metrics.clone());
    crate::edge::Orders {
        ca: shared.ca.clone(),
        me: shared.me.id.clone(),
        settings,
        records: Box::new(move || records.state.get().tls.values().cloned().collect()),
        served: Box::new(move |name| {
            let state = served.state.get();
            !state.covers_private(name)
                && (state.public.values()).any(|hosts| {
                    hosts
                        .iter()
                        .any(|p| revproxy_ca::names::name_matches(p, name))
                })
        }),
        counted: Box::new(move |result| metrics.acme_order(result)),
    }
}

/// How often a proxy on a shared store says it is alive and reads who else is: well
/// within the store's staleness bound (`PROXY_STALE_SECS`, 30 s).
pub(super) const HEARTBEAT: Duration = Duration::from_secs(5);

/// Announces this proxy in the shared store and keeps the list of its peers; tells the
/// agents on its tunnels when the list changes.
async fn heartbeat(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    // Telling the agents of the newest change; a newer change replaces it.
    let mut telling: JoinSet<()> = JoinSet::new();
    loop {
        tick.tick().await;
        while telling.try_join_next().is_some() {}
        let (store, me, beating) = (shared.ca.state().clone(), shared.me.clone(), shared.clone());
        let beat = tokio::task::spawn_blocking(move || {
            if !beating.withdrawn.load(std::sync::atomic::Ordering::SeqCst) {
                store.announce(&me)?;
            }
            store.proxies()
        })
        .await;
        match beat {
            Ok(Ok(peers)) => {
                failing = false;
                let mut known = shared.peers.write().expect("peers lock");
                if *known != peers {
                    info!(proxies = %crate::runtime::logging::list(peers.iter().map(|p| &p.id)), "proxies sharing the store");
                    *known = peers;
                    drop(known);
                    telling.abort_all();
                    telling.spawn(tell_agents(shared.clone()));
                }
            }
            Ok(Err(e)) if !failing => {
                failing = true;
                warn!(error = %e, "cannot announce this proxy in the store; will try again")
            }
            Ok(Err(_)) => {}
            Err(e) => warn!(error = %e, "heartbeat task failed"),
        }
    }
}

/// Most agents told of a change in the proxy list at once.
const TELL_AT_ONCE: usize = 256;

/// Tells the agent of each tunnel (its own ones; extra tunnels share their agent) which
/// proxies share the store now, so that it opens a tunnel to one that joined within
/// seconds, not at its next poll (`tunnel/control.rs`).
async fn tell_agents(shared: Arc<Shared>) {
    let Some(list) = list_to_tell(&shared) else {
        return warn!("the proxy list is too long to send to agents; they poll for it");
    };
    let tunnels = shared.registry.own_tunnels();
    let total = tunnels.len();
    let (mut told, mut running) = (0usize, JoinSet::new());
    for tunnel in tunnels {
        if running.len() >= TELL_AT_ONCE {
            told += usize::from(matches!(running.join_next().await, Some(Ok(true))));
        }
        let list = list.clone();
        running.spawn(async move { tunnel.tell_proxies(list).await });
    }
    while let Some(done) = running.join_next().await {
        told += usize::from(matches!(done, Ok(true)));
    }
    if total > 0 {
        info!(told, tunnels = total, "told the agents of the proxy list");
    }
}

/// The proxy list as agents are told it; `None` if it is too long to tell.
fn list_to_tell(shared: &Shared) -> Option<bytes::Bytes> {
    let list = serde_json::to_vec(&super::enroll::proxy_list(shared)).expect("list serializes");
    (list.len() <= crate::tunnel::control::MAX_PROXY_LIST).then(|| bytes::Bytes::from(list))
}

/// Tells the agent of a tunnel that just came up which proxies share the store: one
/// whose tunnels were all down when they last changed missed that telling, and polls for
/// the list only every [`crate::agent::PROXY_REFRESH`]. On a shared store only.
pub(super) fn tell_new_tunnel(shared: &Arc<Shared>, tunnel: &Arc<super::tunnel::Tunnel>) {
    if tunnel.extra || !shared.ca.state().shared() {
        return;
    }
    let Some(list) = list_to_tell(shared) else {
        return;
    };
    let tunnel = tunnel.clone();
    crate::runtime::lanes::spawn(async move {
        tunnel.tell_proxies(list).await;
    });
}

/// Takes this proxy off the shared store's list (at shutdown), so agents stop dialing it
/// at once rather than when its heartbeat goes stale.
pub(super) async fn withdraw(shared: &Arc<Shared>) {
    if !shared.ca.state().shared() {
        return;
    }
    shared
        .withdrawn
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (store, id) = (shared.ca.state().clone(), shared.me.id.clone());
    match tokio::task::spawn_blocking(move || store.withdraw(&id)).await {
        Ok(Ok(())) => info!("withdrawn from the store's list of proxies"),
        Ok(Err(e)) => {
            warn!(error = %e, "cannot withdraw this proxy from the store; it drops off within a minute")
        }
        Err(e) => warn!(error = %e, "withdraw task failed"),
    }
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
        let advertised = shared.me.address.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            ca.server_identity(
                time::OffsetDateTime::now_utc(),
                advertised.as_deref().map(super::builder::advertised_host),
            )
        })
        .await;
        let (chain, key) = match loaded {
            Ok(Ok(identity)) => (identity.chain_pem, identity.key_pem),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_given_back_once_a_wave_of_tunnels_is_over() {
        // A fleet reconnecting: not while it pours in, once it trickles.
        assert!(!wave_over(300, 300, 300));
        assert!(!wave_over(900, 300, 300), "at the same pace");
        assert!(wave_over(950, 50, 300));
        assert!(wave_over(900, 0, 300));
        // Too few to be a wave.
        assert!(!wave_over(GIVE_BACK_AFTER - 1, 0, 50));
        // A wave that does not end.
        assert!(!wave_over(GIVE_BACK_ANYWAY - 1, 10, 10));
        assert!(wave_over(GIVE_BACK_ANYWAY, 10, 10));
    }
}
