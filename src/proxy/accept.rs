//! The accept loop every listener runs: take a connection, hold a permit for it (a bound
//! on connections at once) and a slot of its source address (a bound per source, so one
//! host cannot take every permit), run its handler in a tracked task; on stop, stop
//! accepting, give open connections a grace period, then abort what is left.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, warn, Instrument};

use crate::runtime::shutdown::Trigger;

/// Something connections are accepted from: a TCP listener, or the QUIC endpoint.
pub(super) trait Acceptor: Send + 'static {
    /// One accepted connection, not yet handled.
    type Conn: Send + 'static;

    /// The next connection and its peer; `None` once the acceptor is closed.
    fn accept(&mut self) -> impl Future<Output = Option<(Self::Conn, SocketAddr)>> + Send;

    /// Turns away a connection over the limit (dropping it closes it).
    fn refuse(conn: Self::Conn) {
        drop(conn);
    }

    /// Takes no more connections; open ones go on.
    fn stop(self);
}

impl Acceptor for TcpListener {
    type Conn = TcpStream;

    async fn accept(&mut self) -> Option<(TcpStream, SocketAddr)> {
        loop {
            match TcpListener::accept(self).await {
                Ok(conn) => return Some(conn),
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn stop(self) {
        drop(self);
    }
}

/// Who counts as one source: an IPv4 address (also when it arrives v4-mapped on a
/// dual-stack listener), or an IPv6 /64, which one host or household usually holds whole.
pub(super) fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// The wider network a source belongs to: an IPv4 /24 or an IPv6 /48 (one site's
/// allocation), for caps that many addresses of one network share.
pub(super) fn prefix_key(ip: IpAddr) -> IpAddr {
    match source_key(ip) {
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & !0xff).into()),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 80) - 1)).into()),
    }
}

/// How many connections each source has, bounded per source (see [`source_key`]) and,
/// where a cap is set, per wider prefix ([`prefix_key`]).
#[derive(Debug)]
pub(super) struct PerSource {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
    /// Most connections at once from one prefix, and how many each has.
    prefix_max: Option<usize>,
    prefixes: Mutex<HashMap<IpAddr, usize>>,
    /// Sources not counted here: trusted load balancers, whose clients are counted once
    /// their PROXY header says who they are (`public.rs`).
    exempt: std::sync::RwLock<Vec<crate::route::Cidr>>,
}

/// One connection's place in its source's count; given back when dropped.
#[derive(Debug)]
pub(super) struct SourceSlot {
    owner: Arc<PerSource>,
    /// `None` for an exempt source: nothing to give back.
    ip: Option<IpAddr>,
    /// Its prefix, when prefixes are counted.
    prefix: Option<IpAddr>,
}

/// Why a source got no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Full {
    /// The address (or IPv6 /64) holds its share.
    Source,
    /// Its /24 (IPv6 /48) holds its share.
    Prefix,
}

impl PerSource {
    /// At most `max` connections per source, not counting sources in `exempt`.
    pub(super) fn with_exempt(max: usize, exempt: Vec<crate::route::Cidr>) -> Arc<PerSource> {
        Arc::new(PerSource {
            max,
            counts: Mutex::default(),
            prefix_max: None,
            prefixes: Mutex::default(),
            exempt: std::sync::RwLock::new(exempt),
        })
    }

    /// At most `max` connections per source, and also bounding each prefix ([`prefix_key`]) to
    /// `prefix_max` connections at once.
    pub(super) fn with_prefix_cap(max: usize, prefix_max: usize) -> Arc<PerSource> {
        Arc::new(PerSource {
            max,
            counts: Mutex::default(),
            prefix_max: Some(prefix_max),
            prefixes: Mutex::default(),
            exempt: std::sync::RwLock::new(Vec::new()),
        })
    }

    /// Replaces the exempt sources (a reload).
    pub(super) fn set_exempt(&self, exempt: Vec<crate::route::Cidr>) {
        *self.exempt.write().expect("exempt sources") = exempt;
    }

    /// A slot for one more connection from `ip`'s source, unless it (or its prefix) has
    /// its most already.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Result<SourceSlot, Full> {
        if (self.exempt.read().expect("exempt sources"))
            .iter()
            .any(|net| net.contains(ip))
        {
            return Ok(SourceSlot {
                owner: self.clone(),
                ip: None,
                prefix: None,
            });
        }
        let prefix = match self.prefix_max {
            Some(most) => {
                let prefix = prefix_key(ip);
                let mut prefixes = self.prefixes.lock().expect("per-prefix counts");
                let count = prefixes.entry(prefix).or_insert(0);
                if *count >= most {
                    return Err(Full::Prefix);
                }
                *count += 1;
                Some(prefix)
            }
            None => None,
        };
        // Counted in its prefix already: if the address has no room, this gives it back.
        let mut in_prefix = SourceSlot {
            owner: self.clone(),
            ip: None,
            prefix,
        };
        let mut slot = self.take_counted(ip).ok_or(Full::Source)?;
        slot.prefix = in_prefix.prefix.take();
        Ok(slot)
    }

    /// A slot for `ip`'s source, counted even if it is exempt: for the client a trusted
    /// load balancer's header names.
    pub(super) fn take_counted(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let ip = source_key(ip);
        let mut counts = self.counts.lock().expect("per-source counts");
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            owner: self.clone(),
            ip: Some(ip),
            prefix: None,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        // The maps hold only sources and prefixes with connections.
        let give_back = |map: &Mutex<HashMap<IpAddr, usize>>, key: IpAddr| {
            let mut counts = map.lock().expect("per-source counts");
            if let Some(count) = counts.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&key);
                }
            }
        };
        if let Some(ip) = self.ip {
            give_back(&self.owner.counts, ip);
        }
        if let Some(prefix) = self.prefix {
            give_back(&self.owner.prefixes, prefix);
        }
    }
}

/// Says a refusal at warn at most once per source per [`REFUSAL_LOG_EVERY`], with how
/// many went unsaid since; the rest at debug. A flood from many connections then costs
/// the log a line per source and interval, not a line per connection.
#[derive(Debug, Default)]
pub(super) struct RefusalLog {
    last: Mutex<HashMap<IpAddr, (std::time::Instant, u64)>>,
}

/// Least time between two warnings about one source's refused connections.
pub(super) const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// Sources the refusal log remembers at once; past that, new ones are refused quietly
/// until old entries expire (a flood from that many sources is one event to the log).
const REFUSAL_LOG_SOURCES: usize = 4096;

impl RefusalLog {
    /// `Some(unsaid)` if a refusal from `ip` is to be said now (with how many were not
    /// since the last time), `None` if it goes to debug.
    pub(super) fn loud(&self, ip: IpAddr) -> Option<u64> {
        let key = source_key(ip);
        let now = std::time::Instant::now();
        let mut last = self.last.lock().expect("refusal log");
        if let Some((at, unsaid)) = last.get_mut(&key) {
            if now.duration_since(*at) < REFUSAL_LOG_EVERY {
                *unsaid += 1;
                return None;
            }
            let said = *unsaid;
            (*at, *unsaid) = (now, 0);
            return Some(said);
        }
        if last.len() >= REFUSAL_LOG_SOURCES {
            last.retain(|_, (at, _)| now.duration_since(*at) < REFUSAL_LOG_EVERY);
            if last.len() >= REFUSAL_LOG_SOURCES {
                return None;
            }
        }
        last.insert(key, (now, 0));
        Some(0)
    }
}

/// What an accept loop counts (metrics); the default counts nothing.
#[derive(Clone, Default)]
pub(super) struct AcceptCounters {
    pub(super) accepted: Option<prometheus::IntCounter>,
    /// Turned away: the listener held its most connections.
    pub(super) over_limit: Option<prometheus::IntCounter>,
    /// Turned away: the source (or its prefix) held its share.
    pub(super) over_source: Option<prometheus::IntCounter>,
    /// Where refusals are said (at most once per source and interval).
    pub(super) log: Arc<RefusalLog>,
}

fn count(counter: &Option<prometheus::IntCounter>) {
    if let Some(c) = counter {
        c.inc();
    }
}

/// When an accept loop stops accepting, and when its connections must end.
#[derive(Clone, Debug, Default)]
pub(super) struct Stopping {
    /// Stop accepting; open connections run on (a listener removed by a reload).
    pub(super) accepting: Trigger,
    /// Shutdown: stop accepting, give open connections the grace period, then close them.
    pub(super) shutdown: Trigger,
    /// Fired by the loop once it accepts no more (an upgrade waits for it before moving
    /// agents, so that no late connection lands in the old process).
    pub(super) stopped: Trigger,
}

impl Stopping {
    /// One trigger for both.
    pub(super) fn at(stop: &Trigger) -> Stopping {
        Stopping {
            accepting: stop.clone(),
            shutdown: stop.clone(),
            stopped: Trigger::default(),
        }
    }
}

/// Accepts connections until `stop` says so, at most as many at once as `permits` allows
/// and as `per_source` allows from one address, running `handle` for each in a tracked
/// task (it gets the source slot, to hold as long as the bound should apply). Then the
/// connections run on until shutdown, which gives them `grace` and aborts the rest.
pub(super) async fn serve<A, F, Fut>(
    mut acceptor: A,
    stop: Stopping,
    permits: Arc<Semaphore>,
    per_source: Arc<PerSource>,
    grace: Duration,
    counters: AcceptCounters,
    handle: F,
) where
    A: Acceptor,
    F: Fn(A::Conn, SocketAddr, SourceSlot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.accepting.cancelled() => break,
            () = stop.shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = acceptor.accept() => {
                let Some((conn, peer)) = accepted else { break };
                count(&counters.accepted);
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    match counters.log.loud(peer.ip()) {
                        Some(unsaid) => warn!(%peer, unsaid, "at the connection limit; refusing (further refusals from this source for {REFUSAL_LOG_EVERY:?} at debug)"),
                        None => debug!(%peer, "at the connection limit; refusing"),
                    }
                    count(&counters.over_limit);
                    A::refuse(conn);
                    continue;
                };
                let slot = match per_source.take(peer.ip()) {
                    Ok(slot) => slot,
                    Err(full) => {
                        debug!(%peer, max = per_source.max, ?full, "at the limit for this source; refusing");
                        count(&counters.over_source);
                        A::refuse(conn);
                        continue;
                    }
                };
                let span = tracing::debug_span!("conn", %peer);
                let work = handle(conn, peer, slot);
                // With the loop's subscriber: a loop on a lane carries its caller's.
                let work = crate::runtime::holding::Holding::new(work, permit);
                tasks.spawn(crate::runtime::lanes::with_subscriber(work.instrument(span)));
            }
        }
    }
    acceptor.stop();
    stop.stopped.fire();
    // Until shutdown, open connections run to their end.
    tokio::select! {
        () = async { while tasks.join_next().await.is_some() {} } => return,
        () = stop.shutdown.cancelled() => {}
    }
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        warn!(
            open = tasks.len(),
            "connections still open after the grace period; closing them"
        );
        tasks.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_is_an_ipv4_address_or_an_ipv6_64() {
        let per = PerSource::with_exempt(2, Vec::new());
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let (_x, _y) = (per.take(a).unwrap(), per.take(b).unwrap());
        assert!(per.take(a).is_err(), "a third from the same /64");
        assert!(per.take(c).is_ok(), "another /64 is another source");
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let slot = per.take(v4).unwrap();
        let _m = per.take(mapped).unwrap();
        assert!(
            per.take(v4).is_err(),
            "v4-mapped counts as the same IPv4 address"
        );
        drop(slot);
        assert!(per.take(v4).is_ok(), "a slot is given back when dropped");
    }

    #[test]
    fn a_prefix_cap_bounds_many_addresses_of_one_network() {
        let per = PerSource::with_prefix_cap(2, 3);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let held: Vec<_> = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
            .iter()
            .map(|a| per.take(ip(a)).unwrap())
            .collect();
        assert_eq!(per.take(ip("192.0.2.4")).err(), Some(Full::Prefix));
        assert!(per.take(ip("192.0.3.4")).is_ok(), "another /24");
        // An address at its own cap gives its prefix slot back.
        let per = PerSource::with_prefix_cap(1, 3);
        let _one = per.take(ip("2001:db8:1::1")).unwrap();
        assert_eq!(per.take(ip("2001:db8:1::1")).err(), Some(Full::Source));
        let _two = per.take(ip("2001:db8:1:5::1")).unwrap();
        let _three = per.take(ip("2001:db8:1:6::1")).unwrap();
        assert_eq!(
            per.take(ip("2001:db8:1:7::1")).err(),
            Some(Full::Prefix),
            "one /48"
        );
        assert!(per.take(ip("2001:db8:2::1")).is_ok());
        drop(held);
    }

    #[test]
    fn refusals_are_said_once_per_source_and_interval() {
        let log = RefusalLog::default();
        let (a, b) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert_eq!(log.loud(a), Some(0));
        assert_eq!(log.loud(a), None);
        assert_eq!(log.loud(a), None);
        assert_eq!(log.loud(b), Some(0), "another source is said");
    }
}
