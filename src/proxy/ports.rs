//! Granted public ports (DESIGN.md section 11): the proxy listens on a port in its
//! configured range while some live tunnel serves it (its agent's certificate and grant
//! hold `tcp:PORT` or `udp:PORT`). Every TCP connection there is a stream to such an
//! agent, routed as by a `[[listener]] to = NAME` with the name `tcp:PORT`; every client
//! address on a UDP port is a flow (`udp.rs`). The sockets themselves are kept by
//! [`PublicListeners`]; this decides which ports to listen on. At an upgrade the TCP
//! listeners are handed to the successor with the other listeners: it keeps them while its
//! agents move there, and their clients wait for them. A UDP port's socket is closed as
//! the old process stops accepting, and the successor binds it within [`RETRY`].

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use revproxy_ca::ports::{GrantedPort, PortRange};
use tokio::time::Instant;
use tracing::{info, warn};

use super::reload::PublicListeners;
use super::udp::UdpLimits;
use super::Registry;

/// How long a port stays open after its last tunnel left: a client that comes then waits
/// up to [`CLIENT_WAIT`] for the agent to be back (a restart, a transport change) rather
/// than being closed at once. A revocation still closes the port within its check and
/// this.
const LINGER: Duration = Duration::from_secs(1);
/// How long a client of a granted port that no tunnel serves waits for one.
pub(super) const CLIENT_WAIT: Duration = Duration::from_secs(5);
/// Between tries to bind a port that could not be bound (in use by another process, or
/// by the process this one is taking over from).
const RETRY: Duration = Duration::from_secs(1);

/// Where granted ports listen, and what is under way with them.
#[derive(Debug)]
pub(super) struct GrantedPorts {
    range: PortRange,
    bind: IpAddr,
    udp: UdpLimits,
    /// Ports no tunnel serves any more, and when to stop listening on them.
    closing: HashMap<GrantedPort, Instant>,
    /// Ports that could not be bound (said once until they are).
    failing: BTreeSet<GrantedPort>,
    /// Ports agents hold outside the range (said once).
    outside: BTreeSet<GrantedPort>,
}

impl GrantedPorts {
    pub(super) fn new(range: PortRange, bind: IpAddr, udp: UdpLimits) -> GrantedPorts {
        GrantedPorts {
            range,
            bind,
            udp,
            closing: HashMap::new(),
            failing: BTreeSet::new(),
            outside: BTreeSet::new(),
        }
    }

    /// A granted port's listener taken over from the process this one upgraded: kept
    /// until `until` (the agents moving here meanwhile; their clients wait for them) and
    /// [`LINGER`] after, unless a tunnel serves it by then.
    pub(super) fn adopted(&mut self, port: u16, until: Instant) {
        self.closing.insert(GrantedPort::tcp(port), until + LINGER);
    }

    /// Listens on what the live tunnels serve now and stops listening on what none has
    /// served for [`LINGER`]. Returns when to look again without a registry change.
    pub(super) fn sync(
        &mut self,
        registry: &Registry,
        public: &mut PublicListeners,
    ) -> Option<Instant> {
        let now = Instant::now();
        let (served, outside): (BTreeSet<GrantedPort>, BTreeSet<GrantedPort>) = registry
            .ports()
            .into_iter()
            .partition(|p| self.range.contains(p.port));
        for port in outside.difference(&self.outside) {
            warn!(%port, range = %self.range, "an agent is granted a port outside this proxy's ports range: not listened on here");
        }
        self.outside = outside;
        for port in public.granted_ports() {
            if !served.contains(&port) {
                self.closing.entry(port).or_insert(now + LINGER);
            }
        }
        self.closing
            .retain(|port, at| !served.contains(port) && now < *at);
        let wanted: BTreeSet<GrantedPort> =
            served.iter().chain(self.closing.keys()).copied().collect();
        let failed = public.sync_granted(&wanted, self.bind, self.udp);
        let failed_ports: BTreeSet<GrantedPort> = failed.iter().map(|(p, _)| *p).collect();
        for (port, error) in &failed {
            if !self.failing.contains(port) {
                warn!(%port, bind = %self.bind, %error, "cannot listen on a granted port; trying again every second");
            }
        }
        for port in self.failing.difference(&failed_ports) {
            if wanted.contains(port) {
                info!(%port, "listening on the granted port now");
            }
        }
        self.failing = failed_ports;
        let linger = self.closing.values().min().copied();
        let retry = (!self.failing.is_empty()).then(|| now + RETRY);
        linger.into_iter().chain(retry).min()
    }
}
