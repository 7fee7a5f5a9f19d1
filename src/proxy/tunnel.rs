//! One live tunnel to an agent as the registry holds it: who it belongs to, the [`Link`] to
//! open streams on, and its stream slots. The proxy counts a tunnel's streams itself (from
//! the moment one is asked for until it ends) and takes a slot before it asks: a tunnel
//! whose slots are taken is passed over for another of the same agent that has one, or
//! waited on, instead of queueing opens inside the tunnel where no other tunnel could
//! take them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::admit::Peer;
use crate::tunnel::{Link, OpenError, OpenRequest, TunnelStream, MAX_STREAMS};

/// One live tunnel to an agent.
pub(super) struct Tunnel {
    pub(super) id: u64,
    /// Agent name (certificate CN).
    pub(super) agent: String,
    /// Serial of the certificate the agent connected with, hex.
    pub(super) serial: String,
    /// DNS names in the agent's certificate: the most it may ever serve.
    pub(super) cert_hosts: Vec<String>,
    /// End of the certificate's validity, Unix seconds.
    pub(super) not_after: i64,
    /// Where the agent connected from.
    pub(super) peer: std::net::SocketAddr,
    /// When the tunnel came up, Unix seconds.
    pub(super) since: i64,
    /// An extra tunnel: one the agent added beside its tunnel while that one was busy
    /// ([`crate::tls::ALPN_H2_EXTRA`]); it shares the load of the tunnel it joined.
    pub(super) extra: bool,
    link: Link,
    slots: Slots,
    /// Where the tunnel runs (the lane its connection runs on, either transport), and its client
    /// streams are spliced too.
    pub(super) lane: crate::runtime::lanes::Lane,
    /// Notified to close the tunnel (revocation).
    pub(super) close: tokio::sync::Notify,
    /// The agent retired this tunnel (GOAWAY): no new streams, but it stays on record so
    /// that a revocation still closes it and its open streams.
    pub(super) draining: AtomicBool,
    /// What the agent said of its services' protocols, by name (asked once each; bounded
    /// by the names its certificate grants, wildcards aside, and cleared at 1,024).
    h2c_answers: std::sync::Mutex<H2cAnswers>,
}

/// What an agent said of its services' protocols, by name: whether it speaks h2c, and
/// until when a failed question's "no" stands (`None`: an answer, for good).
type H2cAnswers = std::collections::HashMap<String, (bool, Option<tokio::time::Instant>)>;

/// How long a failed question about a service's protocols is not asked again.
const H2C_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("id", &self.id)
            .field("agent", &self.agent)
            .field("extra", &self.extra)
            .field("streams", &self.streams())
            .finish_non_exhaustive()
    }
}

/// What a new tunnel is: who, on what, from where, and whether it is an extra one.
pub(super) struct NewTunnel {
    pub(super) id: u64,
    pub(super) who: Peer,
    pub(super) link: Link,
    pub(super) peer: std::net::SocketAddr,
    pub(super) extra: bool,
    /// Notified whenever a slot frees on a tunnel that had none ([`Registry::room`]).
    ///
    /// [`Registry::room`]: super::registry::Registry::room
    pub(super) room: Arc<tokio::sync::Notify>,
}

impl Tunnel {
    pub(super) fn new(new: NewTunnel) -> Tunnel {
        let most = match &new.link {
            Link::H2(..) => MAX_STREAMS as usize,
            Link::Quic(_) => crate::tunnel::quic::PROXY_STREAMS as usize,
        };
        Tunnel {
            id: new.id,
            agent: new.who.agent,
            serial: new.who.serial,
            cert_hosts: new.who.cert_hosts,
            not_after: new.who.not_after,
            peer: new.peer,
            since: time::OffsetDateTime::now_utc().unix_timestamp(),
            extra: new.extra,
            link: new.link,
            slots: Slots {
                used: Arc::new(AtomicUsize::new(0)),
                room: new.room,
                most,
            },
            lane: crate::runtime::lanes::Lane::here(),
            close: tokio::sync::Notify::new(),
            draining: AtomicBool::new(false),
            h2c_answers: std::sync::Mutex::default(),
        }
    }

    /// Which transport the tunnel runs on, for logs and status.
    pub(super) fn transport(&self) -> &'static str {
        self.link.kind().name()
    }

    /// The QUIC connection of a QUIC tunnel (a UDP flow's datagrams ride it).
    pub(super) fn quic_connection(&self) -> Option<&quinn::Connection> {
        match &self.link {
            Link::Quic(conn) => Some(conn),
            Link::H2(..) => None,
        }
    }

    /// Streams being opened or open on this tunnel now.
    pub(super) fn streams(&self) -> usize {
        self.slots.used.load(Ordering::Relaxed)
    }

    /// Whether it routes new streams (its agent did not retire it).
    pub(super) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Takes one of the tunnel's stream slots ([`MAX_STREAMS`] on h2,
    /// [`PROXY_STREAMS`](crate::tunnel::quic::PROXY_STREAMS) on QUIC), if one is free; it
    /// is given back as the returned [`Slot`] drops.
    pub(super) fn claim(&self) -> Option<Slot> {
        let used = &self.slots.used;
        let most = self.slots.most;
        let mut now = used.load(Ordering::Relaxed);
        loop {
            if now >= most {
                return None;
            }
            match used.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    return Some(Slot {
                        used: used.clone(),
                        room: self.slots.room.clone(),
                        most,
                    })
                }
                Err(actual) => now = actual,
            }
        }
    }

    /// Tells the agent that a new process serves this proxy now.
    pub(super) async fn tell_moving(&self) {
        self.link.tell_moving().await;
    }

    /// Closes a QUIC tunnel whose agent did not move when told (see [`Link::close_moving`]).
    pub(super) fn close_moving(&self) {
        self.link.close_moving();
    }

    /// Tells the agent which proxies share the store now; says whether it took it.
    pub(super) async fn tell_proxies(&self, list: bytes::Bytes) -> bool {
        self.link.tell_proxies(list).await
    }

    /// Whether the agent's service for `name` speaks h2c: asked on first need, the answer
    /// remembered for the tunnel's life; a question that failed is not asked again for
    /// [`H2C_RETRY`] (the answer meanwhile is no).
    pub(super) async fn speaks_h2c(&self, name: &str) -> bool {
        if let Some(said) = self.known_h2c(name) {
            return said;
        }
        let now = tokio::time::Instant::now();
        let said = self.link.speaks_h2c(name).await;
        let mut known = self.h2c_answers.lock().expect("h2c answers");
        if known.len() >= 1024 {
            known.clear();
        }
        let until = said.is_none().then(|| now + H2C_RETRY);
        known.insert(name.to_string(), (said.unwrap_or(false), until));
        said.unwrap_or(false)
    }

    /// What [`Self::speaks_h2c`] would answer without asking, if it would.
    pub(super) fn known_h2c(&self, name: &str) -> Option<bool> {
        let known = self.h2c_answers.lock().expect("h2c answers");
        let &(said, until) = known.get(name)?;
        until
            .is_none_or(|until| until > tokio::time::Instant::now())
            .then_some(said)
    }

    /// Opens a stream for a client on a slot taken with [`Self::claim`]; the caller
    /// bounds the wait and holds the slot until the stream ends.
    pub(super) async fn open(
        &self,
        req: &OpenRequest<'_>,
        _slot: &Slot,
    ) -> Result<TunnelStream, OpenError> {
        self.link.open(req).await
    }
}

/// A tunnel's stream slots.
struct Slots {
    used: Arc<AtomicUsize>,
    room: Arc<tokio::sync::Notify>,
    /// How many it has.
    most: usize,
}

/// One stream's slot on a tunnel, held while the stream is opened and open.
#[derive(Debug)]
pub(super) struct Slot {
    used: Arc<AtomicUsize>,
    room: Arc<tokio::sync::Notify>,
    most: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let was = self.used.fetch_sub(1, Ordering::AcqRel);
        if was >= self.most {
            // The tunnel had no slot free: whoever waits for one may take this.
            self.room.notify_waiters();
        }
    }
}
