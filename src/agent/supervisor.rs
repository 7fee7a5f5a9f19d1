//! The supervisor: keeps one tunnel to one proxy up for as long as the agent runs (or
//! until the proxy leaves the list, `proxies.rs`).
//!
//! It reconnects with the one backoff after a failure, opens a new tunnel with a renewed
//! certificate and lets the old one drain (its open streams run to their end), and follows
//! the transport [`Choice`]: with `--transport auto` a tunnel on the fallback keeps
//! probing the better transport in the background, and when a probe connects that
//! connection becomes the tunnel and the old one drains. Every session lives in one
//! `JoinSet`, so dropping the agent ends them all.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn, Instrument};

use super::identity::Identity;
use super::pool::Pool;
use super::refusal;
use super::session::{connect, Session, SessionCtx, Target};
use crate::runtime::backoff::Backoff;
use crate::runtime::shutdown::Trigger;
use crate::tunnel::{AgentConn, Choice};

/// First reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// For this long after a tunnel that was up is lost, reconnect delays stay under
/// [`FAST_RECONNECT_MAX`]: a proxy that restarts (a crash, a host reboot) usually listens
/// again within seconds, and its agents should be back within a second of that, not after
/// a grown backoff. Past it the delays grow to [`BACKOFF_MAX`] as usual (the proxy is
/// really away; a fleet should not keep knocking every second).
const FAST_RECONNECT_FOR: Duration = Duration::from_secs(60);
/// The longest delay while reconnecting fast (drawn from its upper half, so a fleet
/// spreads over it): an attempt at a proxy that is not listening yet is a refused TCP
/// connection, cheap for both sides.
const FAST_RECONNECT_MAX: Duration = Duration::from_millis(500);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Keeps one tunnel to `target` up until `stop` fires, always as the current identity.
pub(super) async fn keep_tunnel_up(
    ctx: &Arc<SessionCtx>,
    target: Arc<Target>,
    mut renewed: watch::Receiver<Arc<Identity>>,
    stop: &Trigger,
) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    // When the last tunnel that was up ended.
    let mut lost_at: Option<tokio::time::Instant> = None;
    // When the proxy last closed a tunnel or went away (stopping or restarting): for
    // [`FAST_RECONNECT_FOR`] after it, failing to reach it is expected and logged at
    // debug; past that it warns again, as a proxy that never left would.
    let mut proxy_left: Option<tokio::time::Instant> = None;
    let mut choice = Choice::new(ctx.transport, ctx.quic_fallback_after);
    let mut sessions = JoinSet::new();
    // Tunnels on an old certificate or transport, retired as soon as the next tunnel is
    // up (not before: a client must always find one).
    let to_retire: Arc<Mutex<Vec<Trigger>>> = Arc::default();
    // A connection a probe made, and the identity it was made with.
    let mut preconnected: Option<(AgentConn, Arc<Identity>)> = None;
    // The extra tunnels beside the current one (`pool.rs`).
    let mut pool = Pool::new(ctx.extra_tunnel_idle);
    'connect: while !stop.is_fired() {
        pool.start_over(&to_retire);
        let id = renewed.borrow_and_update().clone();
        // A probe that raced a renewal used the old certificate: not that one.
        let ready = preconnected
            .take()
            .filter(|(_, used)| Arc::ptr_eq(used, &id))
            .map(|(conn, _)| conn);
        let kind = choice.next();
        let retire = Trigger::default();
        let moving = Trigger::default();
        let established = Arc::new(std::sync::OnceLock::new());
        let session = Session {
            ctx: ctx.clone(),
            target: target.clone(),
            kind,
            limit: choice.connect_limit(kind),
            preconnected: ready,
            identity: id.clone(),
            stop: stop.clone(),
            retire: retire.clone(),
            moving: moving.clone(),
            established: established.clone(),
            to_retire: to_retire.clone(),
            load: pool.load(),
            extra: false,
        };
        let span = tracing::info_span!("tunnel", server = %target.addr, proxy = %target.proxy.as_deref().unwrap_or("-"), transport = %kind.name());
        // The tunnel and its streams run together on the least loaded lane.
        let lane = ctx.lanes.pick();
        let current = sessions
            .spawn(async move { lane.run(session.run()).await }.instrument(span))
            .id();
        // A probe lives across loop turns, so nothing else happening cancels a handshake.
        let probing = choice.probe_while_on(kind);
        let (probe_kind, probe_limit) = match probing {
            Some(better) => (better, choice.connect_limit(better)),
            None => (kind, Duration::ZERO), // never polled
        };
        let new_probe = || {
            let (ctx, id, target) = (ctx.clone(), id.clone(), target.clone());
            Box::pin(async move {
                tokio::time::sleep(ctx.quic_reprobe).await;
                connect(&target, probe_kind, &id, probe_limit, false).await
            })
        };
        let mut probe = new_probe();
        let mut next_preconnected = None;
        let outcome = loop {
            tokio::select! {
                Some(done) = sessions.join_next_with_id() => match done {
                    Ok((task, r)) if task == current => break Ok(r),
                    Err(e) if e.id() == current => break Err(e),
                    // An extra tunnel, or a retired session that finished draining.
                    Ok((task, _)) => pool.ended(task),
                    Err(e) => pool.ended(e.id()),
                },
                // Streams open only on a tunnel that is up: crowded means it is.
                () = pool.crowded() => {
                    let extra = Session {
                        ctx: ctx.clone(),
                        target: target.clone(),
                        kind,
                        limit: choice.connect_limit(kind),
                        preconnected: None,
                        identity: id.clone(),
                        stop: stop.clone(),
                        retire: Trigger::default(),
                        moving: moving.clone(),
                        established: Arc::default(),
                        to_retire: to_retire.clone(),
                        load: pool.load(),
                        extra: true,
                    };
                    let (retire, established) = (extra.retire.clone(), extra.established.clone());
                    let span = tracing::info_span!("tunnel", server = %target.addr, proxy = %target.proxy.as_deref().unwrap_or("-"), transport = %kind.name(), extra = true);
                    let lane = ctx.lanes.pick();
                    let task = sessions.spawn(async move { lane.run(extra.run()).await }.instrument(span)).id();
                    pool.added(task, retire, established);
                }
                () = pool.next_check() => pool.check(),
                Ok(()) = renewed.changed() => {
                    info!("opening a tunnel with the renewed certificate; the old one drains once it is up");
                    to_retire.lock().expect("retire list").push(retire.clone());
                    backoff.reset();
                    continue 'connect;
                }
                // A new process took the proxy's sockets over (`serve --upgrade`): the
                // next tunnel reaches it, at once and without backoff.
                () = moving.cancelled() => {
                    info!("the proxy moved to a new process: opening a tunnel to it; this one drains once that is up");
                    to_retire.lock().expect("retire list").push(retire.clone());
                    backoff.reset();
                    continue 'connect;
                }
                probed = &mut probe, if probing.is_some() => match probed {
                    Ok(conn) => {
                        info!(transport = %probe_kind.name(), "this transport works again: new streams use it; the old tunnel drains");
                        choice.probe_worked();
                        next_preconnected = Some((conn, id.clone()));
                        to_retire.lock().expect("retire list").push(retire.clone());
                        break Ok(Ok(()));
                    }
                    Err(e) => {
                        debug!(transport = probe_kind.name(), error = %e, "still unavailable; staying on the fallback");
                        probe = new_probe();
                    }
                },
            }
        };
        if next_preconnected.is_some() {
            preconnected = next_preconnected;
            continue 'connect;
        }
        if moving.is_fired() && !stop.is_fired() {
            info!("the proxy moved to a new process: reconnecting at once");
            backoff.reset();
            continue 'connect;
        }
        // Up means it served a while: a proxy that completes the handshake and then refuses
        // the tunnel (over its limit, or the admission check) must not make the agent
        // retry at the shortest delay forever.
        let was_up = established
            .get()
            .is_some_and(|at: &tokio::time::Instant| at.elapsed() >= super::session::OVERLAP);
        // The proxy refused the certificate itself: only a new enrollment helps. Say so
        // once, then knock at the backoff's pace (up to its cap), not the fast one.
        let refused = match &outcome {
            Ok(Err(e)) if !was_up => refusal::refusal(&e.to_string()).map(|why| (why, e)),
            _ => None,
        };
        if let Some((why, e)) = refused {
            if ctx.told.first_for(&id.serial().unwrap_or_default()) {
                error!("{}", refusal::advice(why, &id, &ctx.state_dir));
            } else {
                debug!(error = %e, "the proxy still refuses this agent's certificate");
            }
            lost_at = None;
        } else {
            let came_up = established.get().is_some();
            if came_up {
                proxy_left = None;
            }
            // Connection failures while the proxy is expected back are no news.
            let expected = proxy_left.is_some_and(|at| at.elapsed() < FAST_RECONNECT_FOR);
            match outcome {
                // This agent is stopping: however its tunnel ended, that is no failure.
                Ok(r) if stop.is_fired() => {
                    if let Err(e) = r {
                        debug!(error = %e, "tunnel ended while shutting down");
                    }
                    break;
                }
                Ok(Ok(())) => {
                    info!("the proxy closed the tunnel; reconnecting");
                    proxy_left = Some(tokio::time::Instant::now());
                }
                Ok(Err(e)) if came_up && e.went_away() => {
                    info!(reason = %e, "the proxy went away (it stops or restarts); reconnecting");
                    proxy_left = Some(tokio::time::Instant::now());
                }
                Ok(Err(e)) if !was_up => {
                    if choice.failed(kind, &e, expected) {
                        continue; // the fallback, at once
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "tunnel failed"),
                Err(e) => warn!(error = %e, "tunnel task failed"),
            }
        }
        if was_up {
            ctx.told.forget();
            backoff.reset();
            choice.was_up(kind);
            lost_at = Some(tokio::time::Instant::now());
        }
        let mut delay = backoff.next_delay();
        if lost_at.is_some_and(|at| at.elapsed() < FAST_RECONNECT_FOR) {
            let jittered = 0.5 + (crate::runtime::random() % 1000) as f64 / 2000.0;
            delay = delay.min(FAST_RECONNECT_MAX.mul_f64(jittered));
        }
        debug!(delay = %crate::runtime::logging::duration(delay), "reconnecting after a pause");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            Ok(()) = renewed.changed() => {}
            () = stop.cancelled() => break,
        }
    }
    // Retired sessions saw `stop` too and end within the drain grace.
    while sessions.join_next().await.is_some() {}
}
