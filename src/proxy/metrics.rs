//! What the proxy counts, for `/metrics` on the admin listener (Prometheus text format).
//!
//! Counters on the data path are taken once per connection (a label lookup) and then
//! moved with one relaxed atomic add per chunk, so byte counts move while a stream is
//! open. Label values come only from bounded sets: listener addresses and route names from
//! the configuration, agent names and granted name patterns from the CA state, and fixed
//! reasons. A client's own SNI or `Host` never becomes a label (a wildcard grant is counted
//! under its pattern, `*.example.com`).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Registry,
};

use super::registry::Registry as Tunnels;
use super::state::{Snapshot, StoreHealth};
use crate::admin::metrics::{counter, encode, gauge, register_process};
use crate::tunnel::StreamCounters;

/// Why a public connection was not routed (the `reason` label).
#[derive(Clone, Copy, Debug)]
pub(super) enum Refused {
    /// No agent is granted the name and no static route has it.
    NoRoute,
    /// An agent is granted the name but none is connected.
    Offline,
    /// Every agent that could serve it failed to open a stream in time.
    Unavailable,
    /// A TLS client that sent no server name.
    NoServerName,
    /// Nothing to route on arrived within the peek timeout.
    PeekTimeout,
    /// The first bytes were neither a usable ClientHello nor an HTTP request head.
    BadHead,
    /// The client closed before saying where to go.
    ClientClosed,
    /// Its source address holds its share of connections.
    SourceLimit,
    /// The listener holds its most connections.
    ConnectionLimit,
    /// A static route's backend did not accept.
    BackendDown,
    /// A terminated name's client did not complete its TLS handshake.
    Handshake,
    /// A terminated name has no certificate to serve (yet).
    NoCertificate,
}

impl Refused {
    pub(super) fn label(self) -> &'static str {
        match self {
            Refused::NoRoute => "no_route",
            Refused::Offline => "offline",
            Refused::Unavailable => "unavailable",
            Refused::NoServerName => "no_server_name",
            Refused::PeekTimeout => "peek_timeout",
            Refused::BadHead => "bad_head",
            Refused::ClientClosed => "client_closed",
            Refused::SourceLimit => "source_limit",
            Refused::ConnectionLimit => "connection_limit",
            Refused::BackendDown => "backend_down",
            Refused::Handshake => "tls_handshake",
            Refused::NoCertificate => "no_certificate",
        }
    }
}

/// Every metric of the proxy.
pub(super) struct ProxyMetrics {
    registry: Registry,
    accepted: IntCounterVec,
    routed: IntCounterVec,
    refused: IntCounterVec,
    reloads: IntCounterVec,
    upgrades: IntCounterVec,
    open_seconds: HistogramVec,
    received: IntCounterVec,
    sent: IntCounterVec,
    open_streams: IntGaugeVec,
    tunnels: IntGaugeVec,
    tunnel_streams: IntGaugeVec,
    tunnel_connects: IntCounterVec,
    tunnel_disconnects: IntCounterVec,
    tunnel_refusals: IntCounterVec,
    agent_port_refused: IntCounterVec,
    enrollments: IntCounterVec,
    renewals: IntCounterVec,
    revocations: IntCounter,
    mesh: IntCounterVec,
    cert_expiry: IntGaugeVec,
    tls_expiry: IntGaugeVec,
    acme_orders: IntCounterVec,
    store_up: IntGauge,
    store_last_ok: IntGauge,
    store_checks: IntCounterVec,
    store_went_back: IntCounter,
    stream_window: IntGauge,
    receiving_streams: IntGauge,
    stream_buffer_budget: IntGauge,
    udp_datagrams: IntCounterVec,
    udp_dropped: IntCounterVec,
    /// Held while the scrape-time gauges are rebuilt and encoded.
    rendering: std::sync::Mutex<()>,
}

/// Seconds to open a stream: from a millisecond on loopback to the 15 s open deadline.
const OPEN_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0,
];

impl ProxyMetrics {
    pub(super) fn new() -> ProxyMetrics {
        let registry = Registry::new();
        register_process(&registry);
        let r = &registry;
        let open_seconds = HistogramVec::new(
            HistogramOpts::new(
                "revproxy_stream_open_seconds",
                "Time from asking an agent for a stream to its answer, by transport.",
            )
            .buckets(OPEN_BUCKETS.to_vec()),
            &["transport"],
        )
        .expect("valid metric");
        r.register(Box::new(open_seconds.clone()))
            .expect("registered once");
        let revocations = IntCounter::new(
            "revproxy_revocations_total",
            "Certificates this proxy saw revoked while running.",
        )
        .expect("valid metric");
        r.register(Box::new(revocations.clone()))
            .expect("registered once");
        let new_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            r.register(Box::new(g.clone())).expect("registered once");
            g
        };
        let store_up = new_gauge(
            "revproxy_store_up",
            "1 when the last check of the state store succeeded, else 0 (routing goes on from memory either way).",
        );
        let store_last_ok = new_gauge(
            "revproxy_store_last_ok_timestamp_seconds",
            "When the state store last answered a check, Unix seconds.",
        );
        let store_went_back = IntCounter::new(
            "revproxy_store_went_back_total",
            "Times the state store's version went back (a restored backup, another database): the proxy keeps its newer state and refuses changes until restarted.",
        )
        .expect("valid metric");
        r.register(Box::new(store_went_back.clone()))
            .expect("registered once");
        let stream_window = new_gauge(
            "revproxy_stream_window_bytes",
            "The receive window each stream gets from the agent: 2 MiB, or narrower so that all streams at once fit the stream buffer budget.",
        );
        let receiving_streams = new_gauge(
            "revproxy_receiving_streams",
            "Streams receiving from tunnels (client and mesh), which share the stream buffer budget.",
        );
        let stream_buffer_budget = new_gauge(
            "revproxy_stream_buffer_budget_bytes",
            "The stream buffer budget (stream_buffer_budget): what all streams may hold at once.",
        );
        ProxyMetrics {
            stream_window,
            receiving_streams,
            stream_buffer_budget,
            store_up,
            store_last_ok,
            store_went_back,
            udp_datagrams: counter(
                r,
                "revproxy_udp_datagrams_total",
                "Datagrams carried on granted UDP ports, by port and direction: up (from clients) or down (to them).",
                &["port", "direction"],
            ),
            udp_dropped: counter(
                r,
                "revproxy_udp_dropped_total",
                "Datagrams from clients of granted UDP ports dropped, by port and reason: queue_full, flow_limit, no_agent.",
                &["port", "reason"],
            ),
            store_checks: counter(
                r,
                "revproxy_store_checks_total",
                "Checks of the state store's version (the poll, change notifications, reloads requests forced), by result: ok, or error.",
                &["result"],
            ),
            accepted: counter(
                r,
                "revproxy_connections_accepted_total",
                "Public connections accepted, by listener address.",
                &["listener"],
            ),
            routed: counter(
                r,
                "revproxy_connections_routed_total",
                "Public connections joined to a backend, by the name pattern that routed them.",
                &["host"],
            ),
            refused: counter(
                r,
                "revproxy_connections_refused_total",
                "Public connections not routed, by reason.",
                &["reason"],
            ),
            reloads: counter(
                r,
                "revproxy_config_reloads_total",
                "Configuration reloads (SIGHUP), by result: ok, or error (the running configuration stays).",
                &["result"],
            ),
            upgrades: counter(
                r,
                "revproxy_upgrades_total",
                "Socket hand-overs to a successor (serve --upgrade), counted by the old process: handed_over, or failed (it goes on serving).",
                &["result"],
            ),
            open_seconds,
            received: counter(
                r,
                "revproxy_received_bytes_total",
                "Bytes received from clients, public ones and agents reaching a private name through the mesh, by name pattern; moves while streams are open.",
                &["host"],
            ),
            sent: counter(
                r,
                "revproxy_sent_bytes_total",
                "Bytes sent to clients, public ones and agents reaching a private name through the mesh, by name pattern; moves while streams are open.",
                &["host"],
            ),
            open_streams: gauge(
                r,
                "revproxy_open_streams",
                "Streams joined to a backend right now, by name pattern: public connections and mesh streams.",
                &["host"],
            ),
            tunnels: gauge(
                r,
                "revproxy_tunnels",
                "Tunnels up, by agent and transport (draining ones included).",
                &["agent", "transport"],
            ),
            tunnel_streams: gauge(
                r,
                "revproxy_tunnel_streams",
                "Streams being opened or open on each live tunnel, by agent and tunnel id (an agent adds tunnels as its streams near 1,023 a tunnel).",
                &["agent", "tunnel"],
            ),
            tunnel_connects: counter(
                r,
                "revproxy_tunnel_connects_total",
                "Tunnels registered, by transport.",
                &["transport"],
            ),
            tunnel_disconnects: counter(
                r,
                "revproxy_tunnel_disconnects_total",
                "Tunnels ended, by reason: agent (closed by the agent or lost), revoked, expired, shutdown, upgrade (the agent moved to the new process).",
                &["reason"],
            ),
            tunnel_refusals: counter(
                r,
                "revproxy_tunnel_refusals_total",
                "Tunnels refused after their handshake, by reason.",
                &["reason"],
            ),
            agent_port_refused: counter(
                r,
                "revproxy_agent_port_refused_total",
                "Connections the agent port turned away before any exchange, by the budget that was full: connection_limit, source_limit, handshakes, enrollments.",
                &["reason"],
            ),
            enrollments: counter(
                r,
                "revproxy_enrollments_total",
                "Enrollment requests, by outcome (ok, or the error code answered).",
                &["outcome"],
            ),
            renewals: counter(
                r,
                "revproxy_renewals_total",
                "Renewal requests, by outcome (ok, or the error code answered).",
                &["outcome"],
            ),
            revocations,
            mesh: counter(
                r,
                "revproxy_mesh_streams_total",
                "Streams agents opened to reach a name, by outcome: ok, no_access, unknown, offline, unavailable, revoked, bad_name.",
                &["outcome"],
            ),
            tls_expiry: gauge(
                r,
                "revproxy_tls_certificate_expiry_timestamp_seconds",
                "Expiry of the certificate served for each name whose TLS the proxies terminate, Unix seconds.",
                &["name"],
            ),
            acme_orders: counter(
                r,
                "revproxy_acme_orders_total",
                "Certificate orders this proxy made to the ACME CA, by result: valid (issued), invalid (the CA refused: a failed validation, a rate limit), error (the CA could not be asked, or took too long).",
                &["result"],
            ),
            cert_expiry: gauge(
                r,
                "revproxy_agent_certificate_expiry_timestamp_seconds",
                "Latest expiry among each agent's valid certificates, Unix seconds.",
                &["agent"],
            ),
            registry,
            rendering: std::sync::Mutex::new(()),
        }
    }

    /// The stream buffer budget of `limit` bytes, counted into these metrics.
    pub(super) fn stream_buffer_budget(&self, limit: u64) -> crate::tunnel::Budget {
        (self.stream_buffer_budget).set(i64::try_from(limit).unwrap_or(i64::MAX));
        let gauges = crate::tunnel::Gauges {
            window: self.stream_window.clone(),
            streams: self.receiving_streams.clone(),
        };
        crate::tunnel::Budget::new(limit, Some(gauges))
    }

    /// Where a granted UDP port counts its datagrams.
    pub(super) fn udp(&self, port: u16) -> super::udp::UdpMetrics {
        use super::udp::Dropped;
        let port = port.to_string();
        let dropped =
            |reason: Dropped| self.udp_dropped.with_label_values(&[&port, reason.label()]);
        super::udp::UdpMetrics {
            up: self.udp_datagrams.with_label_values(&[&port, "up"]),
            down: self.udp_datagrams.with_label_values(&[&port, "down"]),
            dropped: [
                dropped(Dropped::QueueFull),
                dropped(Dropped::FlowLimit),
                dropped(Dropped::NoAgent),
            ],
        }
    }

    pub(super) fn accepted(&self, listener: &str) -> IntCounter {
        self.accepted.with_label_values(&[listener])
    }

    pub(super) fn refused(&self, reason: Refused) -> IntCounter {
        self.refused.with_label_values(&[reason.label()])
    }

    /// A connection routed under `pattern`: counts it, and returns where its stream counts
    /// its bytes (received from the client = read from its socket).
    pub(super) fn routed(&self, pattern: &str) -> StreamCounters {
        self.routed.with_label_values(&[pattern]).inc();
        StreamCounters::new(
            self.received.with_label_values(&[pattern]),
            self.sent.with_label_values(&[pattern]),
            self.open_streams.with_label_values(&[pattern]),
        )
    }

    /// A mesh stream joined under `pattern` (counted apart in `revproxy_mesh_streams_total`):
    /// where its bytes count, the caller being the client, as a public client's do.
    pub(super) fn mesh_stream(&self, pattern: &str) -> StreamCounters {
        StreamCounters::new(
            self.received.with_label_values(&[pattern]),
            self.sent.with_label_values(&[pattern]),
            self.open_streams.with_label_values(&[pattern]),
        )
    }

    /// Open streams, bytes received and bytes sent so far under `pattern` (see
    /// [`Self::ensure_names`]).
    pub(super) fn name_counts(&self, pattern: &str) -> (i64, u64, u64) {
        (
            self.open_streams.with_label_values(&[pattern]).get(),
            self.received.with_label_values(&[pattern]).get(),
            self.sent.with_label_values(&[pattern]).get(),
        )
    }

    pub(super) fn open_time(&self, transport: &str) -> Histogram {
        self.open_seconds.with_label_values(&[transport])
    }

    pub(super) fn tunnel_up(&self, transport: &str) {
        self.tunnel_connects.with_label_values(&[transport]).inc();
    }

    /// Tunnels that came up since the process started, on either transport.
    pub(super) fn tunnels_connected(&self) -> u64 {
        use prometheus::core::Collector;
        self.tunnel_connects
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    pub(super) fn tunnel_down(&self, reason: &str) {
        self.tunnel_disconnects.with_label_values(&[reason]).inc();
    }

    pub(super) fn tunnel_refused(&self, reason: &str) {
        self.tunnel_refusals.with_label_values(&[reason]).inc();
    }

    /// The counter of agent-port connections turned away for `reason`.
    pub(super) fn agent_port_refused(&self, reason: &str) -> IntCounter {
        self.agent_port_refused.with_label_values(&[reason])
    }

    pub(super) fn enrollment(&self, outcome: &str) {
        self.enrollments.with_label_values(&[outcome]).inc();
    }

    pub(super) fn renewal(&self, outcome: &str) {
        self.renewals.with_label_values(&[outcome]).inc();
    }

    /// Counts a certificate order's result (`valid`, `invalid`, `error`).
    pub(super) fn acme_order(&self, result: &str) {
        self.acme_orders.with_label_values(&[result]).inc();
    }

    pub(super) fn mesh(&self, outcome: &str) {
        self.mesh.with_label_values(&[outcome]).inc();
    }

    /// Makes the reload series exist at zero.
    pub(super) fn ensure_reloads(&self) {
        for result in ["ok", "error"] {
            self.reloads.with_label_values(&[result]);
        }
        for result in ["handed_over", "failed"] {
            self.upgrades.with_label_values(&[result]);
        }
        for result in ["valid", "invalid", "error"] {
            self.acme_orders.with_label_values(&[result]);
        }
    }

    /// Counts a hand-over to a successor.
    pub(super) fn upgraded(&self, ok: bool) {
        self.upgrades
            .with_label_values(&[if ok { "handed_over" } else { "failed" }])
            .inc();
    }

    /// Counts a reload.
    pub(super) fn reloaded(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    pub(super) fn revoked(&self, count: usize) {
        self.revocations.inc_by(count as u64);
    }

    /// Makes sure every name that can be served has its series (at zero until traffic
    /// comes), so that what `/metrics` shows does not depend on who asked what before.
    pub(super) fn ensure_names<'a>(&self, names: impl Iterator<Item = &'a String>) {
        for name in names {
            let labels = [name.as_str()];
            self.routed.with_label_values(&labels);
            self.received.with_label_values(&labels);
            self.sent.with_label_values(&labels);
            self.open_streams.with_label_values(&labels);
        }
    }

    /// The text exposition, with the gauges read from the live tunnels, the state and the
    /// store's health just now. Renders one at a time: the scrape-time gauges are reset
    /// and refilled, the store's counters brought up to what `store` counted.
    pub(super) fn render(
        &self,
        tunnels: &Tunnels,
        state: &Snapshot,
        store: &StoreHealth,
    ) -> String {
        let _one_at_a_time = self.rendering.lock().expect("render lock");
        self.store_up.set(i64::from(store.up));
        self.store_last_ok.set(store.last_ok);
        for (result, count) in [("ok", store.checks.0), ("error", store.checks.1)] {
            let counter = self.store_checks.with_label_values(&[result]);
            counter.inc_by(count.saturating_sub(counter.get()));
        }
        let went_back = u64::from(store.went_back);
        (self.store_went_back).inc_by(went_back.saturating_sub(self.store_went_back.get()));
        self.tunnels.reset();
        for (agent, transport, count) in tunnels.counts() {
            self.tunnels
                .with_label_values(&[&agent, transport])
                .set(count as i64);
        }
        self.tunnel_streams.reset();
        for (tunnel, _, _) in tunnels.snapshot() {
            self.tunnel_streams
                .with_label_values(&[&tunnel.agent, &tunnel.id.to_string()])
                .set(tunnel.streams() as i64);
        }
        self.cert_expiry.reset();
        for (agent, not_after) in &state.expiry {
            self.cert_expiry.with_label_values(&[agent]).set(*not_after);
        }
        self.tls_expiry.reset();
        for (name, record) in &state.tls {
            if let Some(not_after) = record.not_after {
                self.tls_expiry.with_label_values(&[name]).set(not_after);
            }
        }
        encode(&self.registry)
    }
}
