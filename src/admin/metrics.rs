//! Helpers both programs' metrics share: registering a family, the process metrics every
//! exposition carries, and the text encoding.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// A counter family registered in `registry`.
pub(crate) fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

/// A gauge family registered in `registry`.
pub(crate) fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

/// Registers `revproxy_build_info` and `revproxy_start_time_seconds` in `registry`.
pub(crate) fn register_process(registry: &Registry) {
    let info = gauge(
        registry,
        "revproxy_build_info",
        "Always 1; the version of the running program.",
        &["version"],
    );
    info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    let start = IntGauge::new(
        "revproxy_start_time_seconds",
        "When the process started, Unix seconds.",
    )
    .expect("valid metric");
    start.set(time::OffsetDateTime::now_utc().unix_timestamp());
    registry.register(Box::new(start)).expect("registered once");
}

/// `registry` in the Prometheus text format.
pub(crate) fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus::TextEncoder::new()
        .encode_utf8(&registry.gather(), &mut out)
        .expect("text encoding into a String does not fail");
    out
}
