//! Helpers for tests that drive the `revproxy` and `revproxy-agent` binaries as an
//! operator would (included by path: `#[path = "common/cli.rs"] mod cli_helpers;`).
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

pub const PROXY: &str = env!("CARGO_BIN_EXE_revproxy");
pub const AGENT: &str = env!("CARGO_BIN_EXE_revproxy-agent");

pub fn run(bin: &str, args: &[&str], state: &Path) -> Output {
    Command::new(bin)
        .args(args)
        .env("REVPROXY_STATE", state)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `revproxy token create --name web-1 --host app.example.com --server SERVER` on `state`,
/// which must succeed: the token.
pub fn web_token(state: &Path, server: &str) -> String {
    let args = [
        "token",
        "create",
        "--name",
        "web-1",
        "--host",
        "app.example.com",
    ];
    let out = run(PROXY, &[&args[..], &["--server", server]].concat(), state);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// `revproxy serve` on port 0; returns the child and the address it listens on.
pub struct Serve(pub Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn serve(state: &Path) -> (Serve, String, Vec<String>) {
    serve_with(
        state,
        &["--agents", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
    )
}

/// `revproxy serve ARGS`; returns the child, its agent listener's address and what it said
/// before that listener was ready.
pub fn serve_with(state: &Path, args: &[&str]) -> (Serve, String, Vec<String>) {
    let mut child = Serve(
        Command::new(PROXY)
            .arg("serve")
            .args(args)
            .env("REVPROXY_STATE", state)
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line
            .contains("agent listener ready")
            .then(|| line.split("addr=").nth(1))
            .flatten()
        {
            let addr = rest.split_whitespace().next().unwrap().to_string();
            // Keep draining stderr so the proxy never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return (child, addr, seen);
        }
        seen.push(line);
    }
    panic!("serve exited without listening: {seen:?}");
}

/// Runs `bin args` until it exits with `code`, at most 10 s; returns its last output.
pub fn until_exit(bin: &str, args: &[&str], code: i32) -> Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = Command::new(bin).args(args).output().unwrap();
        if out.status.code() == Some(code) {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{bin} {args:?} did not exit {code}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// What the embedded store in `dir` holds: its version (every write moves it) and every
/// record. Equal before and after: nothing was written.
pub fn stored(dir: &std::path::Path) -> (u64, revproxy::ca::state::State) {
    use revproxy::ca::Store;
    let store = revproxy::ca::sqlite::SqliteStore::new(dir);
    (store.version().unwrap(), store.read().unwrap())
}
