//! What the agent counts and knows about itself, for its admin listener: `/metrics`
//! (Prometheus text format), `/status` and `/ready`.
//!
//! Labels are bounded: `service` is a name pattern from the agent's own service map,
//! `transport` is `h2` or `quic`, `reason` a fixed set.

use std::sync::{Arc, Mutex};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use crate::admin::metrics::{counter, encode, gauge, register_process};
use crate::tunnel::StreamCounters;

/// Seconds to connect to a backend: loopback to the 10 s connect timeout.
const DIAL_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 10.0,
];

/// Every metric of the agent, and its live tunnels.
pub(crate) struct AgentMetrics {
    registry: Registry,
    streams: IntCounterVec,
    open_streams: IntGaugeVec,
    received: IntCounterVec,
    sent: IntCounterVec,
    refused: IntCounterVec,
    dial_errors: IntCounterVec,
    dial_seconds: HistogramVec,
    tunnels_gauge: IntGaugeVec,
    connects: IntCounterVec,
    connect_failures: IntCounterVec,
    cert_expiry: IntGauge,
    /// Held while the scrape-time gauges are rebuilt and encoded.
    rendering: Mutex<()>,
    tunnels: Mutex<Vec<LiveTunnel>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// One tunnel of this agent that is up.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct LiveTunnel {
    #[serde(skip)]
    id: u64,
    pub(crate) transport: &'static str,
    /// Unix seconds.
    pub(crate) since: i64,
    /// Retired (a newer tunnel took over); its open streams finish.
    pub(crate) draining: bool,
}

/// A tunnel's place in [`AgentMetrics`]' list; removed when dropped.
pub(crate) struct TunnelGuard {
    metrics: Arc<AgentMetrics>,
    id: u64,
}

impl TunnelGuard {
    /// The tunnel was retired: it takes no new streams.
    pub(crate) fn draining(&self) {
        let mut tunnels = self.metrics.tunnels.lock().expect("tunnel list");
        if let Some(t) = tunnels.iter_mut().find(|t| t.id == self.id) {
            t.draining = true;
        }
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        let mut tunnels = self.metrics.tunnels.lock().expect("tunnel list");
        tunnels.retain(|t| t.id != self.id);
    }
}

impl AgentMetrics {
    pub(crate) fn new() -> AgentMetrics {
        let registry = Registry::new();
        register_process(&registry);
        let r = &registry;
        let dial_seconds = HistogramVec::new(
            HistogramOpts::new(
                "revproxy_agent_backend_dial_seconds",
                "Time to connect to a backend, by service.",
            )
            .buckets(DIAL_BUCKETS.to_vec()),
            &["service"],
        )
        .expect("valid metric");
        r.register(Box::new(dial_seconds.clone()))
            .expect("registered once");
        let cert_expiry = IntGauge::new(
            "revproxy_agent_certificate_expiry_timestamp_seconds",
            "Expiry of the certificate the agent uses now, Unix seconds.",
        )
        .expect("valid metric");
        r.register(Box::new(cert_expiry.clone()))
            .expect("registered once");
        AgentMetrics {
            streams: counter(
                r,
                "revproxy_agent_streams_total",
                "Streams joined to a backend, by service.",
                &["service"],
            ),
            open_streams: gauge(
                r,
                "revproxy_agent_open_streams",
                "Streams joined to a backend right now, by service.",
                &["service"],
            ),
            received: counter(
                r,
                "revproxy_agent_received_bytes_total",
                "Bytes sent by backends (toward clients), by service; moves while streams are open.",
                &["service"],
            ),
            sent: counter(
                r,
                "revproxy_agent_sent_bytes_total",
                "Bytes written to backends (from clients), by service; moves while streams are open.",
                &["service"],
            ),
            refused: counter(
                r,
                "revproxy_agent_streams_refused_total",
                "Streams the agent refused, by reason: unknown_name, dial_failed.",
                &["reason"],
            ),
            dial_errors: counter(
                r,
                "revproxy_agent_backend_dial_errors_total",
                "Failed connections to a backend, by service.",
                &["service"],
            ),
            dial_seconds,
            tunnels_gauge: gauge(
                r,
                "revproxy_agent_tunnels",
                "Tunnels up, by transport (draining ones included).",
                &["transport"],
            ),
            connects: counter(
                r,
                "revproxy_agent_tunnel_connects_total",
                "Tunnels established, by transport.",
                &["transport"],
            ),
            connect_failures: counter(
                r,
                "revproxy_agent_tunnel_connect_failures_total",
                "Failed attempts to establish a tunnel, by transport.",
                &["transport"],
            ),
            cert_expiry,
            registry,
            rendering: Mutex::new(()),
            tunnels: Mutex::default(),
            next_id: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Makes sure each service has its series from the start (at zero until traffic).
    pub(crate) fn ensure_services<'a>(&self, services: impl Iterator<Item = &'a str>) {
        for service in services {
            let labels = [service];
            self.streams.with_label_values(&labels);
            self.open_streams.with_label_values(&labels);
            self.received.with_label_values(&labels);
            self.sent.with_label_values(&labels);
            self.dial_errors.with_label_values(&labels);
        }
    }

    /// A stream for `service` joined to its backend after `dial` seconds: counts it, and
    /// returns where its bytes are counted (read from the backend = sent toward clients).
    pub(crate) fn stream(&self, service: &str, dial: f64) -> StreamCounters {
        self.dial_seconds
            .with_label_values(&[service])
            .observe(dial);
        self.streams.with_label_values(&[service]).inc();
        StreamCounters::new(
            self.received.with_label_values(&[service]),
            self.sent.with_label_values(&[service]),
            self.open_streams.with_label_values(&[service]),
        )
    }

    /// The backend of `service` could not be reached.
    pub(crate) fn dial_failed(&self, service: &str) {
        self.dial_errors.with_label_values(&[service]).inc();
        self.refused.with_label_values(&["dial_failed"]).inc();
    }

    /// A stream for a name this agent does not serve.
    pub(crate) fn unknown_name(&self) {
        self.refused.with_label_values(&["unknown_name"]).inc();
    }

    pub(crate) fn connect_failed(&self, transport: &str) {
        self.connect_failures.with_label_values(&[transport]).inc();
    }

    /// A tunnel is up on `transport`; it is listed until the guard is dropped.
    pub(crate) fn tunnel_up(self: &Arc<Self>, transport: &'static str) -> TunnelGuard {
        self.connects.with_label_values(&[transport]).inc();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.tunnels.lock().expect("tunnel list").push(LiveTunnel {
            id,
            transport,
            since: time::OffsetDateTime::now_utc().unix_timestamp(),
            draining: false,
        });
        TunnelGuard {
            metrics: self.clone(),
            id,
        }
    }

    /// The tunnels up now, oldest first.
    pub(crate) fn tunnels(&self) -> Vec<LiveTunnel> {
        self.tunnels.lock().expect("tunnel list").clone()
    }

    /// Open streams and bytes so far for `service` (one of [`Self::ensure_services`]).
    pub(crate) fn service_counts(&self, service: &str) -> (i64, u64, u64) {
        (
            self.open_streams.with_label_values(&[service]).get(),
            self.sent.with_label_values(&[service]).get(),
            self.received.with_label_values(&[service]).get(),
        )
    }

    /// The text exposition; `cert_not_after` is the current certificate's expiry.
    pub(crate) fn render(&self, cert_not_after: i64) -> String {
        let _one_at_a_time = self.rendering.lock().expect("render lock");
        self.cert_expiry.set(cert_not_after);
        self.tunnels_gauge.reset();
        for t in self.tunnels() {
            self.tunnels_gauge.with_label_values(&[t.transport]).inc();
        }
        encode(&self.registry)
    }
}
