//! What the running proxy serves, as its embedders, health checks and tests ask it: a
//! read-only handle on the registry of live tunnels.

use std::sync::Arc;
use std::time::Duration;

use super::Registry;

/// What the running proxy serves, for embedders, health checks and tests.
#[derive(Clone, Debug)]
pub struct ProxyStatus {
    registry: Arc<Registry>,
}

impl ProxyStatus {
    pub(super) fn new(registry: Arc<Registry>) -> ProxyStatus {
        ProxyStatus { registry }
    }

    /// How many live tunnels serve `name` (to public clients or through the mesh).
    pub fn tunnels_for(&self, name: &str) -> usize {
        self.registry.lookup_mesh(name).all().count()
    }

    /// How many live tunnels agent `agent` holds (whether or not they serve any name).
    pub fn tunnels_of(&self, agent: &str) -> usize {
        self.registry
            .counts()
            .into_iter()
            .filter(|(a, _, _)| a == agent)
            .map(|(_, _, n)| n)
            .sum()
    }

    /// The ids of the tunnels `agent` holds now (draining ones included), oldest first.
    pub fn tunnel_ids_of(&self, agent: &str) -> Vec<u64> {
        let mut ids: Vec<u64> = (self.registry.snapshot().into_iter())
            .filter(|(t, _, _)| t.agent == agent)
            .map(|(t, _, _)| t.id)
            .collect();
        ids.sort();
        ids
    }

    /// Waits until agent `agent` holds `count` live tunnels, or `timeout` passes.
    pub async fn wait_for_agent(&self, agent: &str, count: usize, timeout: Duration) -> bool {
        self.wait_until(|| self.tunnels_of(agent) == count, timeout)
            .await
    }

    /// The transports (`"h2"`, `"quic"`) new streams for `name` go to, sorted: one per
    /// certificate, its newest tunnel's (older ones are only a fallback).
    pub fn transports_for(&self, name: &str) -> Vec<&'static str> {
        let mut certificates = std::collections::HashSet::new();
        let mut kinds: Vec<_> = (self.registry.lookup_mesh(name).all())
            .filter(|t| certificates.insert(t.serial.clone()))
            .map(|t| t.transport())
            .collect();
        kinds.sort_unstable();
        kinds
    }

    /// Waits until exactly `count` live tunnels serve `name`, or `timeout` passes; returns
    /// whether it happened.
    pub async fn wait_for_tunnels(&self, name: &str, count: usize, timeout: Duration) -> bool {
        self.wait_until(|| self.tunnels_for(name) == count, timeout)
            .await
    }

    /// Waits until the live tunnels serving `name` run on exactly `transports` (sorted, as
    /// [`Self::transports_for`] gives them), or `timeout` passes; returns whether it did.
    pub async fn wait_for_transports(
        &self,
        name: &str,
        transports: &[&str],
        timeout: Duration,
    ) -> bool {
        self.wait_until(|| self.transports_for(name) == transports, timeout)
            .await
    }

    async fn wait_until(&self, done: impl Fn() -> bool, timeout: Duration) -> bool {
        let mut changes = self.registry.subscribe();
        let wait = async {
            loop {
                if done() {
                    return;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}
