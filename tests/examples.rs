//! Every example configuration in `examples/` parses and validates.

use revproxy::config::{AgentConfig, ProxyConfig};

#[test]
fn every_example_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("proxy") {
            ProxyConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.starts_with("agent") {
            AgentConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            panic!("{name}: example configs are named proxy*.toml or agent*.toml");
        }
        checked += 1;
    }
    assert!(checked >= 2, "found {checked} example configs");
}

#[test]
fn the_example_proxy_config_means_what_it_says() {
    let text = include_str!("../examples/proxy.toml");
    let config = ProxyConfig::from_toml(text).unwrap();
    let listeners = config.listeners().unwrap();
    assert_eq!(listeners.len(), 4);
    assert_eq!(
        config.routes().unwrap(),
        [("legacy.example.com".to_string(), "10.0.0.7:443".to_string())]
    );
}
