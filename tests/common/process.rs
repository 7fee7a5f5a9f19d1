//! The third-party programs a test starts: installed on demand, on free ports, signalled,
//! killed when the test ends.

/// Makes sure a program the test drives is installed (`scripts/test-tools.sh` installs
/// what is missing) and returns its name.
pub fn tool(name: &str) -> &str {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-tools.sh");
        let status = std::process::Command::new("bash")
            .arg(script)
            .status()
            .expect("run scripts/test-tools.sh");
        assert!(status.success(), "scripts/test-tools.sh failed");
    });
    name
}

/// A child process killed (and reaped) when the test ends.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends signal `name` (`HUP`, `KILL`) to process `pid`.
pub fn signal(pid: u32, name: &str) {
    let sent = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{name} {pid}");
}

/// A port on `ip` the kernel says is free now, for programs that take no port 0 (nginx,
/// HAProxy, PostgreSQL) and for configuration files a reload compares by address.
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
