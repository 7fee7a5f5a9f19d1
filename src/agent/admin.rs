//! What the agent shows on its admin listener (`crate::admin` serves it): metrics, the
//! status document, readiness (a tunnel is up).

use std::sync::Arc;

use serde_json::json;
use tokio::sync::watch;

use super::identity::Identity;
use super::session::SessionCtx;

/// The agent's [`crate::admin::View`].
pub(super) struct AgentView {
    pub(super) ctx: Arc<SessionCtx>,
    /// The identity in use (renewals replace it).
    pub(super) identity: watch::Receiver<Arc<Identity>>,
}

impl crate::admin::View for AgentView {
    fn metrics(&self) -> String {
        let not_after = self.identity.borrow().not_after;
        self.ctx.metrics.render(not_after)
    }

    fn ready(&self) -> Result<(), crate::admin::NotReady> {
        if self.ctx.metrics.tunnels().is_empty() {
            Err(crate::admin::NotReady::NoTunnel)
        } else {
            Ok(())
        }
    }

    fn status(&self) -> serde_json::Value {
        let id = self.identity.borrow().clone();
        let services: Vec<_> = self
            .ctx
            .services
            .entries()
            .iter()
            .map(|service| {
                let name = &service.pattern;
                let (open, sent, received) = self.ctx.metrics.service_counts(name);
                json!({
                    "name": name,
                    "to": service.addr,
                    "proxy_protocol": service.proxy_protocol.map(|v| match v {
                        crate::wire::proxy_header::ProxyProtocol::V1 => "v1",
                        crate::wire::proxy_header::ProxyProtocol::V2 => "v2",
                    }),
                    "h2c": service.h2c,
                    "open_streams": open,
                    "sent_bytes": sent,
                    "received_bytes": received,
                })
            })
            .collect();
        json!({
            "role": "agent",
            "version": env!("CARGO_PKG_VERSION"),
            "now": time::OffsetDateTime::now_utc().unix_timestamp(),
            "agent": id.agent,
            "identity": id.identity,
            "server": self.ctx.server,
            "transport": format!("{:?}", self.ctx.transport).to_lowercase(),
            "certificate": {
                "serial": id.serial(),
                "not_after": id.not_after,
                "names": id.hosts,
            },
            "ready": self.ready().is_ok(),
            "tunnels": self.ctx.metrics.tunnels(),
            "services": services,
            "connect": self.ctx.up.status(),
        })
    }
}
