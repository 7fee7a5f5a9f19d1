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

/// The systemd units in `examples/systemd/` carry what the operations guide promises, and
/// `systemd-analyze verify` (where installed) finds nothing wrong with them, not even a
/// warning, once they point at the binaries this build made.
#[test]
fn systemd_units_verify() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd");
    let out = tempfile::tempdir().unwrap();
    for (unit, bin) in [
        ("revproxy.service", env!("CARGO_BIN_EXE_revproxy")),
        (
            "revproxy-agent.service",
            env!("CARGO_BIN_EXE_revproxy-agent"),
        ),
    ] {
        let text = std::fs::read_to_string(dir.join(unit)).unwrap();
        for key in [
            "StateDirectory=",
            "StateDirectoryMode=0700",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "LimitNOFILE=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "RestrictAddressFamilies=",
        ] {
            assert!(text.contains(key), "{unit} lacks {key}");
        }
        let name = unit.trim_end_matches(".service");
        let local = text.replace(&format!("/usr/local/bin/{name} "), &format!("{bin} "));
        assert_ne!(local, text, "{unit} starts /usr/local/bin/{name}");
        std::fs::write(out.path().join(unit), local).unwrap();
    }
    assert!(std::fs::read_to_string(dir.join("revproxy.service"))
        .unwrap()
        .contains("AmbientCapabilities=CAP_NET_BIND_SERVICE"));
    let verified = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(out.path().join("revproxy.service"))
        .arg(out.path().join("revproxy-agent.service"))
        .output();
    match verified {
        Ok(o) => {
            let said = String::from_utf8_lossy(&o.stderr);
            assert!(
                o.status.success() && said.trim().is_empty(),
                "systemd-analyze verify: {said}"
            );
        }
        Err(e) => eprintln!("systemd-analyze is not installed ({e}); only the keys were checked"),
    }
}
