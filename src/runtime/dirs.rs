//! Default state directories.
//!
//! `--state` wins, then `REVPROXY_STATE` (both handled by the CLI), then a per-user data
//! directory: `$XDG_DATA_HOME/<app>`, else `$HOME/.local/share/<app>`, else
//! `/var/lib/<app>` for a service account without a home.

use std::path::PathBuf;

/// The default state directory of the proxy.
pub fn proxy_state_dir() -> PathBuf {
    data_dir("revproxy")
}

/// The default state directory of the agent.
pub fn agent_state_dir() -> PathBuf {
    data_dir("revproxy-agent")
}

fn data_dir(app: &str) -> PathBuf {
    let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(xdg) = non_empty("XDG_DATA_HOME") {
        PathBuf::from(xdg).join(app)
    } else if let Some(home) = non_empty("HOME") {
        PathBuf::from(home).join(".local/share").join(app)
    } else {
        PathBuf::from("/var/lib").join(app)
    }
}
