//! Several proxies: the agent keeps one tunnel to each proxy that shares its proxy's
//! store, so that any of them can route any client and losing one loses only the streams
//! that ran through it.
//!
//! It asks for the list (`GET /v1/proxies`, with its certificate) at start and every
//! [`PROXY_REFRESH`]: from the configured server first, else from the proxies it knows.
//! The list is remembered in [`PROXIES_FILE`], so a restarted agent goes straight to every
//! proxy. Each proxy gets a supervisor of its own that dials the address the proxy
//! advertises and requires the proxy's id in its certificate (two addresses behind one
//! load balancer are not two proxies). With no list (a proxy on a file store, or one that
//! predates this), one supervisor dials the configured server, as before. When the list
//! changes, supervisors of proxies that left stop once a tunnel to a proxy the change
//! added is up (at once when it added none), so clients always find a tunnel, and a list
//! of addresses this agent cannot reach never takes down the tunnels it has.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use super::identity::Identity;
use super::session::{SessionCtx, Target};
use super::supervisor::keep_tunnel_up;
use crate::runtime::shutdown::Trigger;
use crate::wire::enroll::{ProxiesReply, ProxyAddr, PROXIES_PATH};

/// Where the agent remembers the proxies to keep a tunnel to.
pub const PROXIES_FILE: &str = "proxies.json";
/// How often the agent asks for the list of proxies (each time up to a tenth sooner, so a
/// fleet started together does not ask together). Rarely: each ask is a TLS handshake
/// with the proxy, and a proxy tells its agents the list itself when it changes and when
/// a tunnel comes up; the ask catches what both missed. (Every 60 s, 10,000 agents cost a
/// proxy more than all their idle tunnels together.)
pub const PROXY_REFRESH: Duration = Duration::from_secs(600);
/// Most proxies an agent keeps a tunnel to; more in an answer is a misconfiguration.
const MAX_PROXIES: usize = 64;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Remembered {
    proxies: Vec<ProxyAddr>,
}

/// Keeps a tunnel to every proxy on the list (or to the configured server when there is
/// no list) until `stop` fires.
pub(super) async fn keep_tunnels_up(
    ctx: Arc<SessionCtx>,
    identity: watch::Receiver<Arc<Identity>>,
    state_dir: PathBuf,
    refresh: Duration,
    stop: Trigger,
) {
    let (list_tx, list_rx) = watch::channel(load(&state_dir));
    tokio::join!(
        learn(&ctx, identity.clone(), &state_dir, refresh, list_tx, &stop),
        manage(&ctx, identity, list_rx, &stop),
    );
}

/// The tunnels `list` asks for.
fn targets(ctx: &SessionCtx, list: &[ProxyAddr]) -> Vec<Target> {
    if list.is_empty() {
        return vec![Target {
            addr: ctx.server.clone(),
            proxy: None,
        }];
    }
    list.iter()
        .map(|p| Target {
            addr: p.address.clone(),
            proxy: Some(p.id.clone()),
        })
        .collect()
}

/// One supervisor per target of the current list. Every task lives in one `JoinSet`, so
/// dropping this (the agent killed) ends every tunnel with it.
async fn manage(
    ctx: &Arc<SessionCtx>,
    identity: watch::Receiver<Arc<Identity>>,
    mut list: watch::Receiver<Vec<ProxyAddr>>,
    stop: &Trigger,
) {
    let mut running: HashMap<Target, Trigger> = HashMap::new();
    let mut tasks = JoinSet::new();
    loop {
        let wanted = targets(ctx, &list.borrow_and_update());
        let leaving: Vec<(Target, Trigger)> = running
            .extract_if(|target, _| !wanted.contains(target))
            .collect();
        let mut added = Vec::new();
        for target in wanted {
            if running.contains_key(&target) {
                continue;
            }
            added.push(target.clone());
            let own = Trigger::default();
            let span = tracing::info_span!("proxy", addr = %target.addr);
            let (ctx, identity, fired) = (ctx.clone(), identity.clone(), own.clone());
            let supervised = Arc::new(target.clone());
            tasks.spawn(
                async move { keep_tunnel_up(&ctx, supervised, identity, &fired).await }
                    .instrument(span),
            );
            running.insert(target, own);
        }
        if !leaving.is_empty() {
            let mut up = ctx.tunnels_up.subscribe();
            let gone = crate::runtime::logging::list(leaving.iter().map(|(t, _)| &t.addr));
            info!(
                proxies = %gone,
                "no longer keeping a tunnel to these once a new one is up; they drain"
            );
            let stopping = stop.clone();
            tasks.spawn(async move {
                if !added.is_empty() {
                    // A client must always find a tunnel: one to a new proxy first.
                    let new_one_up =
                        up.wait_for(|counts| added.iter().any(|t| counts.contains_key(t)));
                    tokio::select! {
                        _ = new_one_up => {}
                        () = stopping.cancelled() => {}
                    }
                }
                for (_, own) in leaving {
                    own.fire();
                }
            });
        }
        loop {
            tokio::select! {
                changed = list.changed() => {
                    if changed.is_err() {
                        return finish(running, tasks).await;
                    }
                    break;
                }
                () = stop.cancelled() => return finish(running, tasks).await,
                Some(_) = tasks.join_next() => {} // a drained supervisor or a handover
            }
        }
    }
}

/// Stops every supervisor and waits for them to drain.
async fn finish(running: HashMap<Target, Trigger>, mut tasks: JoinSet<()>) {
    for own in running.values() {
        own.fire();
    }
    while tasks.join_next().await.is_some() {}
}

/// Asks for the list now and every `refresh`, and hands on every change; a list a proxy
/// sends over a tunnel (`tunnel/control.rs`) counts as an answer, at once.
async fn learn(
    ctx: &SessionCtx,
    identity: watch::Receiver<Arc<Identity>>,
    state_dir: &Path,
    refresh: Duration,
    list: watch::Sender<Vec<ProxyAddr>>,
    stop: &Trigger,
) {
    let mut told = ctx.proxies_told.subscribe();
    let mut failing = false;
    loop {
        let id = identity.borrow().clone();
        let mut candidates = vec![ctx.server.clone()];
        for p in list.borrow().iter() {
            if !candidates.contains(&p.address) {
                candidates.push(p.address.clone());
            }
        }
        let mut learned = None;
        for addr in &candidates {
            match fetch(addr, &id).await {
                Ok(proxies) => {
                    learned = Some(proxies);
                    break;
                }
                Err(e) => debug!(server = %addr, error = %e, "cannot ask for the proxy list here"),
            }
        }
        match learned {
            Some(proxies) => {
                failing = false;
                adopt(state_dir, &list, proxies);
            }
            None if !failing => {
                failing = true;
                warn!("cannot learn the proxy list from any proxy; keeping the last one")
            }
            None => {}
        }
        let next_poll = tokio::time::sleep(jittered(refresh));
        tokio::pin!(next_poll);
        loop {
            tokio::select! {
                () = &mut next_poll => break,
                () = stop.cancelled() => return,
                Ok(()) = told.changed() => {
                    let sent = told.borrow_and_update().clone();
                    match parse(&sent) {
                        Ok(proxies) => adopt(state_dir, &list, proxies),
                        Err(e) => warn!(error = %e, "a proxy sent a proxy list this agent cannot use; ignored"),
                    }
                }
            }
        }
    }
}

/// `every`, less up to a tenth of it at random.
fn jittered(every: Duration) -> Duration {
    let tenth = every.as_millis() as u64 / 10;
    every - Duration::from_millis(crate::runtime::random() % tenth.max(1))
}

/// Takes `proxies` as the list if it differs from the one in `list`: remembered, and
/// handed to the supervisors.
fn adopt(state_dir: &Path, list: &watch::Sender<Vec<ProxyAddr>>, proxies: Vec<ProxyAddr>) {
    if *list.borrow() == proxies {
        return;
    }
    info!(proxies = %crate::runtime::logging::list(proxies.iter().map(|p| format!("{}@{}", p.id, p.address))),
          "proxies to keep a tunnel to");
    if let Err(e) = save(state_dir, &proxies) {
        warn!(error = %e, "cannot remember the proxy list");
    }
    list.send_replace(proxies);
}

/// The list in a `GET /v1/proxies` answer, checked.
fn parse(body: &[u8]) -> Result<Vec<ProxyAddr>, String> {
    let reply: ProxiesReply =
        serde_json::from_slice(body).map_err(|e| format!("unreadable proxy list: {e}"))?;
    checked(reply.proxies)
}

/// Asks the proxy at `addr` for the list. A proxy that does not know the request (older)
/// or has no peers answers with an empty list: the configured server then.
async fn fetch(addr: &str, id: &Identity) -> Result<Vec<ProxyAddr>, String> {
    let creds = id.credentials().map_err(|e| e.to_string())?;
    let config = creds
        .client_config(crate::tls::ALPN_HTTP1)
        .map_err(|e| e.to_string())?;
    let request = Request::get(PROXIES_PATH)
        .header(http::header::HOST, addr)
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    let (status, body) = super::enroll::call(addr, &creds.pin.to_string(), config, request)
        .await
        .map_err(|e| e.to_string())?;
    match status {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Ok(Vec::new()),
        other => {
            return Err(format!(
                "the proxy answered {other}: {}",
                String::from_utf8_lossy(&body)
            ))
        }
    }
    parse(&body)
}

/// The list, if every entry is a valid id and address and there are not too many;
/// repeated ids count once. Sorted by id.
fn checked(list: Vec<ProxyAddr>) -> Result<Vec<ProxyAddr>, String> {
    if list.len() > MAX_PROXIES {
        return Err(format!(
            "the proxy list names {} proxies, more than {MAX_PROXIES}",
            list.len()
        ));
    }
    let mut proxies = Vec::new();
    for p in list {
        let valid_id = !p.id.is_empty()
            && p.id.len() <= 64
            && p.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid_id || revproxy_ca::validate_server(&p.address).is_err() {
            return Err(format!("the proxy list holds an invalid entry {p:?}"));
        }
        if !proxies.iter().any(|q: &ProxyAddr| q.id == p.id) {
            proxies.push(p);
        }
    }
    proxies.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(proxies)
}

fn load(state_dir: &Path) -> Vec<ProxyAddr> {
    let path = state_dir.join(PROXIES_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<Remembered>(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|r| checked(r.proxies))
        {
            Ok(proxies) => proxies,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring an unreadable proxy list");
                Vec::new()
            }
        },
        Err(_) => Vec::new(),
    }
}

fn save(state_dir: &Path, proxies: &[ProxyAddr]) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(&Remembered {
        proxies: proxies.to_vec(),
    })
    .expect("list serializes");
    revproxy_ca::fsutil::write_atomic(
        &state_dir.join(PROXIES_FILE),
        &bytes,
        revproxy_ca::fsutil::PRIVATE_FILE_MODE,
    )
}
