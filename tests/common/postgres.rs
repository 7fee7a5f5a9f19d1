//! A PostgreSQL server of the test's own, for the stores several proxies share and the
//! mesh's database example.

use std::time::Duration;

use super::{free_port, stderr_lines, tool};

/// A PostgreSQL server of its own on 127.0.0.1, started by the test (as the `postgres`
/// user: the server refuses to run as root), trusting local connections. It can be
/// stopped and started again on the same data and port.
pub struct Postgres {
    child: Option<std::process::Child>,
    bin: std::path::PathBuf,
    pub port: u16,
    dir: tempfile::TempDir,
    /// Extra `-c` settings.
    settings: Vec<String>,
    /// Files the settings name.
    _files: Option<tempfile::TempDir>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_with(&[])
    }

    /// A server that also speaks TLS, with a certificate for `localhost` and 127.0.0.1
    /// from a CA of its own; returns it and that CA's certificate (PEM).
    pub fn start_with_tls() -> (Postgres, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_der(ca_cert.der(), &ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let files = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (
            files.path().join("server.crt"),
            files.path().join("server.key"),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        // The server reads them as its own user, and refuses a key others can read.
        let uid = std::process::Command::new("id")
            .args(["-u", "postgres"])
            .output()
            .unwrap();
        let uid: u32 = String::from_utf8(uid.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        for f in [&cert_file, &key_file, &files.path().to_path_buf()] {
            std::os::unix::fs::chown(f, Some(uid), None).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pg = Postgres::start_with(&[
            "ssl=on".to_string(),
            format!("ssl_cert_file={}", cert_file.display()),
            format!("ssl_key_file={}", key_file.display()),
        ]);
        let mut pg = pg;
        pg._files = Some(files);
        (pg, ca_cert.pem())
    }

    fn start_with(settings: &[String]) -> Postgres {
        use std::os::unix::fs::PermissionsExt;
        tool("psql");
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (scripts/test-tools.sh)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("postgres").exists())
            .expect("a PostgreSQL server binary");
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let init = Postgres::as_postgres(&bin.join("initdb"))
            .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        // PostgreSQL takes no port 0: ask the kernel for a free one and hand it over.
        let port = free_port("127.0.0.1");
        let mut pg = Postgres {
            child: None,
            bin,
            port,
            dir,
            settings: settings.to_vec(),
            _files: None,
        };
        pg.run();
        pg
    }

    fn as_postgres(program: &std::path::Path) -> std::process::Command {
        let mut cmd = std::process::Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    }

    /// Starts the server and waits (bounded) until it accepts connections.
    fn run(&mut self) {
        let mut child = Postgres::as_postgres(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-p", &self.port.to_string()])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let rx = stderr_lines(&mut child);
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("PostgreSQL started within 30 s");
            if line.contains("ready to accept connections") {
                break;
            }
        }
        self.child = Some(child);
    }

    /// Stops the server at once (`-m immediate`: no checkpoint, connections cut), as a
    /// crash or a lost machine would, and waits until it is gone.
    pub fn stop(&mut self) {
        let status = Postgres::as_postgres(&self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .output()
            .unwrap();
        assert!(status.status.success(), "pg_ctl stop: {status:?}");
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Starts it again after [`Self::stop`].
    pub fn restart(&mut self) {
        self.run();
    }

    /// A store URL for the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `sql` with psql and returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_with(&["-c", sql])
    }

    /// Runs the SQL script `file` (a `pg_dump`, say) with psql.
    pub fn psql_file(&self, file: &std::path::Path) -> String {
        self.psql_with(&["-f", file.to_str().expect("a UTF-8 path")])
    }

    fn psql_with(&self, what: &[&str]) -> String {
        let out = std::process::Command::new(tool("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(what)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}
