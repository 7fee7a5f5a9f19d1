//! Reading an admin listener: a page, and one sample of its Prometheus exposition.
#![allow(dead_code)] // each test binary uses its own subset

use std::net::SocketAddr;

/// `GET path` on an admin listener: (status, body).
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, body) = revproxy::admin::client::get(&addr.to_string(), path)
        .await
        .unwrap();
    (status.as_u16(), body)
}

/// The value of the sample `name{labels}` (labels exactly as exposed, e.g.
/// `host="app.example.com"`, or empty) in a Prometheus text exposition.
pub fn sample(exposition: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    exposition.lines().find_map(|line| {
        let (k, v) = line.rsplit_once(' ')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}
