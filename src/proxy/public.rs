//! One public connection, top to bottom: read its first bytes for a name (`peek.rs`; or
//! the listener's fixed target) -> route (the registry's live tunnels, then a static
//! route) -> open a stream on a tunnel (the next agent if one refuses) -> splice. A static
//! `tcp://` route is joined in `static_route.rs`; a connection that cannot be served is
//! told why where its protocol allows (`replies.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::accept::{PerSource, SourceSlot};
use super::lookup::lookup;
use super::metrics::Refused;
use super::peek::{http_host, peek, read_proxy_header, sni_name};
use super::registry::{Found, Tunnel};
use super::reload::Settings;
use super::replies::{
    acme_challenge_answer, http_error, redirect_to_https, tell_unrouted, ConnId, Reply,
    ALERT_INTERNAL_ERROR, ALERT_UNRECOGNIZED_NAME,
};
use super::static_route::{connect_static, forward_tcp, header_for, Prelude};
use super::Shared;
use crate::edge::{Answer, Client};
use crate::route::{ListenerKind, Target};
use crate::tunnel::{OpenError, OpenRequest};
use crate::wire::proxy_header::Origin;

/// Time allowed to open a stream on a tunnel (the agent dials its backend meanwhile).
pub(super) const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a name may be served, tried in order.
enum Candidate<'a> {
    /// A tunnel of an agent granted the name, and the pattern it was granted (the name,
    /// or the wildcard covering it): the label its traffic is counted under.
    Agent(&'a Arc<Tunnel>, &'a str),
    /// A static `tcp://` route's backend, `host:port`.
    Static(&'a str),
}

/// What became of one connection: the access log line.
#[derive(Default)]
struct Access {
    host: Option<String>,
    /// The agent (or `tcp://` backend) that served it.
    served_by: Option<String>,
    /// `ok`, or why it was not routed (the reasons of the refusal metric).
    outcome: &'static str,
    /// Bytes from the client, and to it.
    up: u64,
    down: u64,
}

impl Access {
    /// Not routed, for `why`: counted and noted.
    fn refuse(&mut self, metrics: &super::metrics::ProxyMetrics, why: Refused) {
        metrics.refused(why).inc();
        self.outcome = why.label();
    }

    /// Joined to a backend; `moved` is (up, down) once it ended.
    fn served(&mut self, by: String, moved: Option<(u64, u64)>) {
        self.served_by = Some(by);
        self.outcome = "ok";
        if let Some((up, down)) = moved {
            (self.up, self.down) = (up, down);
        }
    }
}

/// Serves one public connection, and logs what became of it: at info with access logging
/// on, else at debug.
pub(super) async fn serve(
    shared: Arc<Shared>,
    kind: ListenerKind,
    mut tcp: TcpStream,
    mut peer: SocketAddr,
    // Held for the whole connection: it counts against the per-source limit.
    _source: SourceSlot,
    per_source: Arc<PerSource>,
) {
    // Logged with every line about this connection and sent with every refusal, so an
    // operator can find the details a client is not told.
    let id = ConnId::new();
    let started = std::time::Instant::now();
    let mut access = Access::default();
    // The settings in force when the connection came; a reload meanwhile applies to the
    // next one.
    let settings = shared.settings();
    let mut arrival = Arrival {
        peer,
        id,
        server: tcp.local_addr().ok(),
        early: BytesMut::new(),
        settings: settings.clone(),
    };
    // A trusted load balancer's connection starts with a PROXY header naming the client:
    // from here on that is the client, counted against its own source's share.
    let mut _client_slot = None;
    let mut admitted = true;
    if settings
        .trusted_proxies
        .iter()
        .any(|net| net.contains(peer.ip()))
    {
        match read_proxy_header(&mut tcp, settings.peek_timeout).await {
            Ok((client, server, rest)) => {
                arrival.early = rest;
                // A header naming no client (a health check) counts against the
                // balancer itself.
                let counted = client.unwrap_or(peer);
                match per_source.take_counted(counted.ip()) {
                    Some(slot) => _client_slot = Some(slot),
                    None => {
                        debug!(balancer = %peer, client = %counted, conn = %id, "the client holds its share of connections; closing");
                        access.refuse(&shared.metrics, Refused::SourceLimit);
                        admitted = false;
                    }
                }
                if let Some(client) = client {
                    debug!(balancer = %peer, %client, conn = %id, "client named by a PROXY header");
                    peer = client;
                    arrival.peer = client;
                    arrival.server = server.or(arrival.server);
                }
            }
            Err(None) => {
                // Connected and closed without a byte: a plain TCP health check.
                access.refuse(&shared.metrics, Refused::ClientClosed);
                admitted = false;
            }
            Err(Some(reason)) => {
                warn!(%peer, conn = %id, %reason, "a trusted source sent no valid PROXY header; closing");
                access.refuse(&shared.metrics, Refused::BadHead);
                admitted = false;
            }
        }
    }
    if admitted {
        handle(&shared, kind, tcp, arrival, &mut access).await;
    }
    let ms = started.elapsed().as_millis() as u64;
    let (host, by) = (
        access.host.as_deref().unwrap_or("-"),
        access.served_by.as_deref().unwrap_or("-"),
    );
    let outcome = access.outcome;
    let (up, down) = (access.up, access.down);
    if shared.access_log {
        info!(target: "revproxy::access", conn = %id, %peer, host = %host, agent = %by, outcome = %outcome, up, down, ms, "connection");
    } else {
        debug!(target: "revproxy::access", conn = %id, %peer, host = %host, agent = %by, outcome = %outcome, up, down, ms, "connection");
    }
}

/// A public connection as it arrived: who, where, and what was read of it already.
struct Arrival {
    /// The client (named by a trusted balancer's PROXY header, if one came first).
    peer: SocketAddr,
    id: ConnId,
    /// The address the client connected to.
    server: Option<SocketAddr>,
    /// Bytes read after a PROXY header, before anything else.
    early: BytesMut,
    /// The settings in force when it came.
    settings: Arc<Settings>,
}

/// Finds the connection's name, looks it up and hands it to [`dispatch`] on its tunnel's
/// lane; or serves a fixed `tcp://` listener; or tells the client why it cannot be served.
async fn handle(
    shared: &Arc<Shared>,
    kind: ListenerKind,
    mut tcp: TcpStream,
    arrival: Arrival,
    access: &mut Access,
) {
    let _ = tcp.set_nodelay(true);
    access.outcome = "client_closed";
    if let ListenerKind::Fixed(Target::Tcp(addr)) = &kind {
        return Box::pin(serve_fixed_tcp(shared, tcp, addr, arrival, access)).await;
    }
    let (peer, id, server) = (arrival.peer, arrival.id, arrival.server);
    let settings = arrival.settings.clone();
    // Each phase's state in a box of its own, freed when it is over: what a connection
    // holds while its stream is open is only the splice's (measured: 18 KiB per held
    // connection on the proxy with these inline, 13 boxed; docs/benchmarks.md).
    let peeking = Box::pin(read_name(shared, &kind, &mut tcp, arrival, access));
    let Some((name, peeked, reply)) = peeking.await else {
        return;
    };
    access.host = Some(name.clone());
    let state = shared.state.get();
    // The ACME server validating a terminated name's pending challenge: answered here.
    let (tls, silent) = (matches!(reply, Reply::Tls), matches!(reply, Reply::Silent));
    let record = (state.tls.get(&name)).filter(|_| !silent);
    if let Some(answer) = shared.terminator.challenge(record, tls, &peeked) {
        drop(state);
        access.outcome = "acme_challenge";
        return match answer {
            Answer::Http(body) => acme_challenge_answer(tcp, &body, id).await,
            Answer::Tls(config) => crate::edge::answer_tls_alpn01(config, tcp, peeked).await,
        };
    }
    // A name whose TLS this proxy terminates: its handshake is completed here, and plain
    // HTTP to it is sent to https. (A private name is refused by the lookup below as any
    // unknown name is, whatever is on record for it.)
    let record = match state.covers_private(&name) {
        true => None,
        false => state.tls.get(&name).cloned(),
    };
    let terminate = match (record, &reply) {
        (Some(record), Reply::Http) if !record.keep_http => {
            access.outcome = "redirect";
            return redirect_to_https(tcp, &name, &peeked, id).await;
        }
        (Some(record), Reply::Tls) => {
            match (shared.terminator).config(&record, |n| state.tls.contains_key(n)) {
                Ok(config) => Some(config),
                Err(reason) => {
                    debug!(%peer, conn = %id, host = %name, %reason, "no certificate to terminate TLS with");
                    access.refuse(&shared.metrics, Refused::NoCertificate);
                    let _ = tcp.write_all(&ALERT_INTERNAL_ERROR).await;
                    return;
                }
            }
        }
        _ => None,
    };
    drop(state);
    let wildcard = name
        .split_once('.')
        .map(|(_, parent)| format!("*.{parent}"))
        .unwrap_or_default();
    let (found, route) = match Box::pin(lookup(shared, &name, &settings, peer, id)).await {
        Ok(found) => found,
        Err(offline) => {
            if offline {
                debug!(%peer, conn = %id, host = %name, "agent for this name is offline");
                access.refuse(&shared.metrics, Refused::Offline);
            } else {
                debug!(%peer, conn = %id, host = %name, "no route");
                access.refuse(&shared.metrics, Refused::NoRoute);
            }
            return tell_unrouted(&mut tcp, &name, reply, offline, id).await;
        }
    };
    // `h2` too when every agent that would serve the name says its service speaks h2c.
    let terminate = match terminate {
        Some(c) if found.all_speak_h2c(&name).await => Some(c.h2.clone()),
        other => other.map(|c| c.http1.clone()),
    };
    let routed = Routed {
        route,
        terminate,
        name,
        wildcard,
        found,
        peeked,
        reply,
        peer,
        id,
        server,
        settings,
    };
    // Opened and spliced where the first tunnel runs (`runtime::lanes`): the open wakes no
    // other thread. The client's socket moves there unless it was accepted there; if that
    // tunnel refuses it and the next one runs on another lane, it moves once more (and
    // stays counted in the first lane's load until it ends).
    let lane = (routed.found.exact.iter())
        .chain(&routed.found.wildcard)
        .next()
        .map(|t| t.lane.clone());
    match lane {
        Some(lane) => {
            let (on, mut taken) = (shared.clone(), std::mem::take(access));
            let on_lane = lane.take().run_with(tcp, move |tcp| async move {
                dispatch(&on, tcp, routed, &mut taken).await;
                taken
            });
            match on_lane.await {
                Ok(done) => *access = done,
                Err(e) => {
                    warn!(%peer, conn = %id, error = %e, "could not move a connection to its tunnel's lane; dropped");
                    access.refuse(&shared.metrics, Refused::Unavailable);
                }
            }
        }
        // A static route only: served here. Boxed, so that the state of every
        // connection's task does not hold room for it.
        None => Box::pin(dispatch(shared, tcp, routed, access)).await,
    }
}

/// A listener fixed to `tcp://addr`: joined to that backend, nothing read first.
async fn serve_fixed_tcp(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    addr: &str,
    arrival: Arrival,
    access: &mut Access,
) {
    let (peer, id) = (arrival.peer, arrival.id);
    let deadline = tokio::time::Instant::now() + crate::runtime::CONNECT_TIMEOUT;
    let Some(backend) = connect_static(addr, peer, id, deadline).await else {
        return access.refuse(&shared.metrics, Refused::BackendDown);
    };
    let counters = shared.metrics.routed(&format!("tcp://{addr}"));
    access.served(format!("tcp://{addr}"), None);
    let origin = Origin {
        client: Some(peer),
        server: arrival.server,
        ..Origin::default()
    };
    let first = Prelude {
        header: header_for(&arrival.settings, addr, &origin),
        peeked: arrival.early.freeze(),
    };
    let moved = forward_tcp(tcp, backend, addr, first, peer, id, counters).await;
    access.served(format!("tcp://{addr}"), moved);
}

/// The name a connection asks for, the bytes read to find it, and how a refusal is told;
/// `None` once the client was told it gave none (or closed, or took too long).
async fn read_name(
    shared: &Shared,
    kind: &ListenerKind,
    tcp: &mut TcpStream,
    arrival: Arrival,
    access: &mut Access,
) -> Option<(String, Bytes, Reply)> {
    let (peer, id, metrics) = (arrival.peer, arrival.id, &shared.metrics);
    let timeout = arrival.settings.peek_timeout;
    match kind {
        ListenerKind::Fixed(Target::Name(name)) => {
            Some((name.clone(), arrival.early.freeze(), Reply::Silent))
        }
        ListenerKind::Fixed(Target::Tcp(_)) => None,
        ListenerKind::Sni => match peek(tcp, arrival.early, timeout, sni_name).await {
            Ok((Some(name), bytes)) => Some((name, bytes, Reply::Tls)),
            Ok((None, _)) => {
                debug!(%peer, conn = %id, "TLS client sent no server name; no route");
                access.refuse(metrics, Refused::NoServerName);
                let _ = tcp.write_all(&ALERT_UNRECOGNIZED_NAME).await;
                None
            }
            Err(e) => {
                debug!(%peer, conn = %id, error = %e, "no usable ClientHello; closing");
                access.refuse(metrics, e.why);
                None
            }
        },
        ListenerKind::Http => match peek(tcp, arrival.early, timeout, http_host).await {
            Ok((name, bytes)) => Some((name, bytes, Reply::Http)),
            Err(e) => {
                debug!(%peer, conn = %id, error = %e, "no usable HTTP request head; closing");
                access.refuse(metrics, e.why);
                if e.answerable {
                    http_error(tcp, 400, "Bad Request", &e.reason, id).await;
                }
                None
            }
        },
    }
}

/// A connection whose name was read and looked up, with somewhere to go.
struct Routed {
    name: String,
    /// The TLS configuration to complete its handshake with, when its TLS ends here.
    terminate: Option<Arc<rustls::ServerConfig>>,
    /// The wildcard covering the name (`*.parent`).
    wildcard: String,
    found: Found,
    /// A static route for the name.
    route: Option<String>,
    /// What was read to find the name: it goes first.
    peeked: Bytes,
    reply: Reply,
    peer: SocketAddr,
    id: ConnId,
    server: Option<SocketAddr>,
    settings: Arc<Settings>,
}

/// Opens a stream on the first candidate that takes it (agents granted the exact name,
/// the static route, agents holding a wildcard) and joins the client to it; or tells the
/// client the name cannot be served. A connection whose TLS ends here completes its
/// handshake first, and sends its plaintext (its ClientHello stays here).
async fn dispatch(shared: &Arc<Shared>, tcp: TcpStream, routed: Routed, access: &mut Access) {
    let metrics = &shared.metrics;
    let Routed {
        name,
        terminate,
        wildcard,
        found,
        route,
        peeked,
        reply,
        peer,
        id,
        server: arrival_server,
        settings,
    } = routed;
    let (client, peeked) = match terminate {
        None => (Client::Plain(tcp), peeked),
        Some(config) => match Box::pin(crate::edge::accept(config, tcp, peeked)).await {
            Ok(tls) => (Client::Tls(Box::new(tls)), Bytes::new()),
            Err(e) => {
                debug!(%peer, conn = %id, host = %name, error = %e, "TLS handshake failed");
                return access.refuse(metrics, Refused::Handshake);
            }
        },
    };
    // One deadline for the whole search, however many agents refuse or stay silent.
    let deadline = tokio::time::Instant::now() + OPEN_TIMEOUT;
    let request = OpenRequest {
        name: &name,
        client: peer,
        server: arrival_server,
        early: &peeked,
        caller: None,
        tls: client.tls_facts(),
    };
    // A client that agreed on h2 goes only to the agents asked whether they speak h2c.
    let h2 = request
        .tls
        .as_ref()
        .is_some_and(|t| t.alpn.as_deref() == Some("h2"));
    let wildcards = (!h2 || found.exact.is_empty()).then_some(&found.wildcard);
    let candidates = (found.exact.iter().map(|t| Candidate::Agent(t, &name)))
        .chain(route.as_deref().map(Candidate::Static))
        .chain((wildcards.into_iter().flatten()).map(|t| Candidate::Agent(t, &wildcard)));
    for candidate in candidates {
        let (t, pattern) = match candidate {
            // A static route takes the client's bytes as they came (passed through).
            Candidate::Static(_) if matches!(client, Client::Tls(_)) => continue,
            Candidate::Agent(t, pattern) => (t, pattern),
            Candidate::Static(addr) => {
                match Box::pin(connect_static(addr, peer, id, deadline)).await {
                    Some(backend) => {
                        let Client::Plain(tcp) = client else {
                            continue;
                        };
                        let counters = metrics.routed(&name);
                        let origin = Origin {
                            client: Some(peer),
                            server: arrival_server,
                            name: Some(name.clone()),
                            ..Origin::default()
                        };
                        let first = Prelude {
                            header: header_for(&settings, addr, &origin),
                            peeked,
                        };
                        let forwarding = forward_tcp(tcp, backend, addr, first, peer, id, counters);
                        let moved = Box::pin(forwarding).await;
                        return access.served(format!("tcp://{addr}"), moved);
                    }
                    None => continue,
                }
            }
        };
        let asked = std::time::Instant::now();
        // A slot on this tunnel, or on another its agent added beside it.
        let Some((t, slot)) = shared.registry.claim(t, deadline).await else {
            if tokio::time::Instant::now() < deadline {
                continue; // retired meanwhile, and its pool full
            }
            warn!(%peer, conn = %id, host = %name, agent = %t.agent, tunnel = t.id, "every stream of the agent's tunnels stayed taken for {OPEN_TIMEOUT:?}");
            break;
        };
        let t = &t;
        match tokio::time::timeout_at(deadline, Box::pin(t.open(&request, &slot))).await {
            Ok(Ok(stream)) => {
                metrics
                    .open_time(t.transport())
                    .observe(asked.elapsed().as_secs_f64());
                debug!(%peer, conn = %id, host = %name, agent = %t.agent, tunnel = t.id, "stream open");
                let counters = metrics.routed(pattern);
                // The peeked bytes went out with the open request.
                counters.read(peeked.len());
                let limits = settings.stream_limits.clone();
                let moved = match client {
                    // Spliced where the tunnel runs, so that the client's bytes and the
                    // tunnel's frames never wake a task on another thread. (On the
                    // tunnel's lane already, the connection was counted in its load when
                    // it came.)
                    Client::Plain(tcp) if t.lane.is_current() => {
                        Box::pin(stream.splice(tcp, limits, counters)).await
                    }
                    Client::Plain(tcp) => {
                        let on_lane = (t.lane.take())
                            .run_with(tcp, move |tcp| stream.splice(tcp, limits, counters));
                        match on_lane.await {
                            Ok(moved) => moved,
                            Err(e) => {
                                warn!(%peer, conn = %id, host = %name, error = %e, "could not move a connection to its tunnel's lane; dropped");
                                return access.refuse(metrics, Refused::Unavailable);
                            }
                        }
                    }
                    // A TLS session stays where its handshake ran.
                    Client::Tls(tls) => {
                        let reset = |tls| Client::Tls(tls).reset();
                        Box::pin(stream.splice_io(tls, limits, counters, reset)).await
                    }
                };
                if let Some(e) = &moved.error {
                    debug!(%peer, conn = %id, host = %name, error = %e, "stream ended with an error");
                }
                // The client's view: what it sent went up (the peeked bytes first, with
                // the open request), what it got came down.
                let moved = Some((moved.up + peeked.len() as u64, moved.down));
                return access.served(t.agent.clone(), moved);
            }
            Ok(Err(e @ OpenError::Aborted { .. })) => {
                debug!(%peer, conn = %id, host = %name, agent = %t.agent, tunnel = t.id, error = %e, "stream reset before its answer; resetting the client");
                client.reset();
                access.served(t.agent.clone(), Some((peeked.len() as u64, 0)));
                access.outcome = "reset";
                return;
            }
            Ok(Err(e)) => {
                if e.tunnel_is_gone() {
                    // A draining agent: route nothing new to it; its open streams finish.
                    shared.registry.retire(t.id);
                }
                warn!(%peer, conn = %id, host = %name, agent = %t.agent, tunnel = t.id, error = %e, "could not open a stream; trying the next agent");
            }
            Err(_) => {
                warn!(%peer, conn = %id, host = %name, agent = %t.agent, tunnel = t.id, "no agent answered within {OPEN_TIMEOUT:?}");
                break;
            }
        }
    }
    // The client learns only that the name cannot be served now; the log above has why,
    // under the connection id the answer carries.
    access.refuse(metrics, Refused::Unavailable);
    let reason = format!("{name} cannot be served right now");
    match (client, reply) {
        // Its TLS ended here: HTTP/1.1 inside gets the answer; h2 only the end.
        (Client::Tls(mut tls), _) if !h2 => {
            http_error(&mut tls, 503, "Service Unavailable", &reason, id).await
        }
        (Client::Tls(mut tls), _) => {
            let _ = tls.shutdown().await;
        }
        (Client::Plain(mut tcp), Reply::Tls) => {
            let _ = tcp.write_all(&ALERT_INTERNAL_ERROR).await;
        }
        (Client::Plain(mut tcp), Reply::Http) => {
            http_error(&mut tcp, 503, "Service Unavailable", &reason, id).await
        }
        (Client::Plain(_), Reply::Silent) => {}
    }
}
