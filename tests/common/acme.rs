//! A real ACME server for the tests: Debian's `pebble` (Let's Encrypt's test CA), with
//! `pebble-challtestsrv` as the DNS it resolves names with (every name is 127.0.0.1), on
//! loopback ports of the test's own. Pebble validates against the proxy's listeners.

use std::path::PathBuf;
use std::time::Duration;

use super::{free_port, tool, Killed, OperatorCert};

/// One pebble and its DNS: ports and certificates chosen first ([`Pebble::new`], so that
/// the proxy can be configured with its directory), started once the proxy listens
/// ([`Pebble::start`]); killed when dropped.
pub struct Pebble {
    /// The directory URL (`https://127.0.0.1:PORT/dir`).
    pub directory: String,
    /// The CA of pebble's own HTTPS listeners (`[acme] ca_roots`).
    pub listener_ca: PathBuf,
    listener: OperatorCert,
    acme: u16,
    management: u16,
    running: Vec<Killed>,
}

/// What pebble is started with.
pub struct PebbleOptions {
    /// Where pebble validates HTTP-01 and TLS-ALPN-01: the proxy's HTTP and SNI ports.
    pub http_port: u16,
    pub tls_port: u16,
    /// Lifetime of the certificates it issues.
    pub validity: Duration,
}

impl Pebble {
    /// Its ports and listener certificate; nothing runs yet.
    pub fn new() -> Pebble {
        let listener = OperatorCert::new(&["127.0.0.1"]);
        let listener_ca = listener.dir.path().join("listener-ca.pem");
        std::fs::write(&listener_ca, &listener.ca_pem).unwrap();
        let acme = free_port("127.0.0.1");
        Pebble {
            directory: format!("https://127.0.0.1:{acme}/dir"),
            listener_ca,
            listener,
            acme,
            management: free_port("127.0.0.1"),
            running: Vec::new(),
        }
    }

    /// Starts the DNS, then pebble, and waits until pebble says its directory is up.
    pub fn start(&mut self, options: PebbleOptions) {
        let dns_addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        let mut challtestsrv = std::process::Command::new(tool("pebble-challtestsrv"))
            .args([
                "-management",
                &format!("127.0.0.1:{}", free_port("127.0.0.1")),
            ])
            .args(["-dns01", &dns_addr])
            // Answer only A queries (127.0.0.1): pebble would try an AAAA answer first.
            .args([
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-defaultIPv6",
                "",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start pebble-challtestsrv");
        let dns_lines = merged_lines(&mut challtestsrv);
        self.running.push(Killed(challtestsrv));
        wait_for_line(&dns_lines, "Starting management server");
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{}", self.acme),
            "managementListenAddress": format!("127.0.0.1:{}", self.management),
            "certificate": self.listener.cert(),
            "privateKey": self.listener.key(),
            "httpPort": options.http_port,
            "tlsPort": options.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": options.validity.as_secs(),
        }});
        let config_file = self.listener.dir.path().join("pebble.json");
        std::fs::write(&config_file, config.to_string()).unwrap();
        let mut pebble = std::process::Command::new(tool("pebble"))
            .arg("-config")
            .arg(&config_file)
            .args(["-dnsserver", &dns_addr])
            // Validate at once (not after up to 5 s), and take every good nonce.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start pebble");
        let lines = merged_lines(&mut pebble);
        self.running.push(Killed(pebble));
        wait_for_line(&lines, "ACME directory available");
    }

    /// `[acme]` for this pebble.
    pub fn settings(&self, challenge: revproxy::ChallengeKind) -> revproxy::AcmeSettings {
        revproxy::AcmeSettings {
            directory: self.directory.clone(),
            contact: vec!["mailto:ops@example.com".into()],
            roots: Some(revproxy::tls::read_roots(&self.listener_ca).unwrap()),
            eab: None,
            challenge,
        }
    }

    /// Pebble's root (it makes a new one each start): what verifies what it issues.
    pub fn root_pem(&self) -> String {
        let url = format!("https://127.0.0.1:{}/roots/0", self.management);
        let out = std::process::Command::new(tool("curl"))
            .args(["-sSf", "--cacert"])
            .arg(&self.listener_ca)
            .arg(url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A TLS client trusting pebble's root only, offering `alpn`.
    pub fn client(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        super::tls_client(&self.root_pem(), alpn)
    }
}

/// Stdout and stderr lines together (pebble logs on one or the other by version).
fn merged_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().expect("stdout is piped");
    super::lines_to(out, tx.clone());
    let err = child.stderr.take().expect("stderr is piped");
    super::lines_to(err, tx);
    rx
}

/// Waits (10 s at most) for a line containing `text`.
fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(text) => return,
            Ok(_) => {}
            Err(e) => panic!("no line with {text:?} within 10 s ({e})"),
        }
    }
}
