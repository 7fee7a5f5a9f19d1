//! TLS terminated at the proxy with the operator's own certificate (`revproxy tls
//! terminate NAME --cert --key`): a real proxy and agent, the CLI an operator runs, TLS
//! clients that verify the chain (rustls, and curl), and a backend that speaks plaintext.
//! Passthrough names are untouched; the refusals say why and change nothing.

#[path = "terminate/acme.rs"]
mod acme;
#[path = "terminate/backends.rs"]
mod backends;
#[path = "common/cli.rs"]
mod cli_helpers;
mod common;

use std::path::{Path, PathBuf};

use cli_helpers::{run, stderr, stdout, PROXY};
use common::*;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAME: &str = "app.example.com";

/// The arguments of `tls terminate NAME --cert FILE --key FILE`, then `extra`.
fn terminate_args(name: &str, cert: &Path, key: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["terminate", name, "--cert"].map(String::from).into();
    args.push(cert.to_str().unwrap().into());
    args.push("--key".into());
    args.push(key.to_str().unwrap().into());
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// `revproxy tls ARGS...` on the proxy's state, which must succeed: its stderr.
fn tls(state: &Path, args: &[impl AsRef<str>]) -> String {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = run(PROXY, &[&["tls"], &args[..]].concat(), state);
    assert!(out.status.success(), "tls {args:?}: {}", stderr(&out));
    stderr(&out)
}

/// `revproxy tls ARGS...`, which must be refused as bad input (exit 2): its stderr.
fn tls_refused(state: &Path, args: &[impl AsRef<str>]) -> String {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = run(PROXY, &[&["tls"], &args[..]].concat(), state);
    assert_eq!(out.status.code(), Some(2), "tls {args:?}: {}", stderr(&out));
    stderr(&out)
}

/// The proxy completes the handshake with the operator's certificate and the backend
/// gets the client's plaintext: an echo backend that first says `plain:` sends it back
/// through the proxy's TLS, byte for byte (a megabyte, both ways). Before `tls terminate`
/// and after `tls passthrough` the same name is passed through to the backend untouched
/// (it sees the ClientHello, which a TLS client cannot take for an answer).
async fn a_terminated_name_serves_the_operators_certificate_and_plaintext_goes_down(t: Transport) {
    let proxy = TestProxy::start().await;
    let state = proxy.dir.path();
    let agent_dir = enroll_agent(&proxy, "web-1", &[NAME]).await;
    let backend = echo_backend(b"plain:").await;
    let _agent = start_agent(agent_dir.path(), &[(NAME, backend)], on(t));
    let pki = OperatorCert::new(&[NAME]);
    let client = pki.client(&[b"http/1.1"]);
    // Passed through: the backend is no TLS server.
    eventually("the agent serves the name", || async {
        round_trip(proxy.http, &http_head(NAME), b"")
            .await
            .is_ok_and(|b| b.starts_with(b"plain:"))
    })
    .await;
    assert!(tls_round_trip(proxy.sni, &client, NAME, b"x")
        .await
        .is_err());

    let said = tls(state, &terminate_args(NAME, &pki.cert(), &pki.key(), &[]));
    assert!(said.contains("TLS terminated"), "{said}");
    let data = pattern(1 << 20, 7);
    eventually("the proxy terminates the name", || async {
        tls_round_trip(proxy.sni, &client, NAME, b"ping")
            .await
            .is_ok_and(|back| back == b"plain:ping")
    })
    .await;
    let back = tls_round_trip(proxy.sni, &client, NAME, &data)
        .await
        .unwrap();
    assert_eq!(&back[..6], b"plain:");
    assert!(back[6..] == data[..], "a megabyte came back exact");
    // What was negotiated: HTTP/1.1 (the only protocol offered), TLS 1.3.
    let session = connect_tls(proxy.sni, &client, NAME).await.unwrap();
    assert_eq!(session.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        session.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    drop(session);

    let said = tls(state, &["passthrough", NAME]);
    assert!(said.contains(NAME), "{said}");
    let hello = client_hello(NAME);
    eventually("the name is passed through again", || async {
        round_trip(proxy.sni, &hello, b"")
            .await
            .is_ok_and(|b| b.starts_with(b"plain:") && b[6..] == hello[..])
    })
    .await;
}

/// A small HTTP/1.1 backend: answers every request with 200 and the request line it got.
async fn http_backend() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head);
                let line = line.lines().next().unwrap_or("").to_string();
                let body = format!("backend got: {line}\n");
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(response.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

/// curl verifies the chain the proxy serves against the operator's CA and gets the
/// backend's plaintext answer; plain HTTP to the name is redirected to https with its
/// path (308) unless `--keep-http`; `tls list` shows the name, text and JSON.
#[tokio::test]
async fn curl_verifies_the_chain_and_plain_http_is_redirected() {
    let curl = tool("curl");
    let proxy = TestProxy::start().await;
    let state = proxy.dir.path();
    let agent_dir = enroll_agent(&proxy, "web-1", &[NAME]).await;
    let backend = http_backend().await;
    let _agent = start_agent(agent_dir.path(), &[(NAME, backend)], |b| b);
    let pki = OperatorCert::new(&[NAME]);
    let ca_file = pki.dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let (cert, key) = (pki.cert(), pki.key());
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    tls(state, &["terminate", NAME, "--cert", cert, "--key", key]);
    let resolve = format!("{NAME}:{}:127.0.0.1", proxy.sni.port());
    let url = format!("https://{NAME}:{}/hello?x=1", proxy.sni.port());
    // Run apart: the proxy runs on this test's thread.
    let curl_https = || {
        let mut command = std::process::Command::new(curl);
        command
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&ca_file)
            .args(["--resolve", &resolve, &url]);
        tokio::task::spawn_blocking(move || command.output().unwrap())
    };
    eventually(
        "curl gets the backend's answer over the proxy's TLS",
        || async {
            let out = curl_https().await.unwrap();
            String::from_utf8_lossy(&out.stdout) == "backend got: GET /hello?x=1 HTTP/1.1\n"
        },
    )
    .await;

    // Plain HTTP: sent to https, path kept.
    let redirect = round_trip(
        proxy.http,
        format!("GET /a/b?c=d HTTP/1.1\r\nHost: {NAME}\r\n\r\n").as_bytes(),
        b"",
    )
    .await
    .unwrap();
    let redirect = String::from_utf8_lossy(&redirect);
    assert!(redirect.starts_with("HTTP/1.1 308 "), "{redirect}");
    assert!(
        redirect.contains(&format!("location: https://{NAME}/a/b?c=d\r\n")),
        "{redirect}"
    );
    // --keep-http: plain HTTP is served as before.
    tls(
        state,
        &terminate_args(NAME, &pki.cert(), &pki.key(), &["--keep-http"]),
    );
    eventually("plain HTTP is served again", || async {
        round_trip(proxy.http, &http_head(NAME), b"")
            .await
            .is_ok_and(|b| b.starts_with(b"HTTP/1.1 200 OK"))
    })
    .await;

    let out = run(PROXY, &["tls", "list"], state);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.contains(NAME) && text.contains(" file "), "{text}");
    let out = run(PROXY, &["tls", "list", "--json"], state);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &list.as_array().unwrap()[0];
    assert_eq!(row["name"], NAME);
    assert_eq!(row["source"], "file");
    assert!(row["last_error"].is_null());
    let not_after = row["not_after"].as_str().unwrap();
    assert!(
        not_after.ends_with('Z') && not_after.len() == 20,
        "{not_after}"
    );
}

/// What is refused, changing nothing: a name no agent is granted, a wildcard, a private
/// name, a certificate for other names, a key that is not the certificate's, one flag
/// without the other, passing through a name that is not terminated. The key is never
/// in the store in the clear.
#[tokio::test]
async fn refusals_change_nothing_and_the_key_is_sealed_in_the_store() {
    let proxy = TestProxy::start().await;
    let state = proxy.dir.path();
    let _agent_dir = enroll_agent(&proxy, "web-1", &[NAME, "*.apps.example.com"]).await;
    let pki = OperatorCert::new(&[NAME, "other.example.com"]);
    let other = OperatorCert::new(&[NAME]);
    let (cert, key) = (pki.cert(), pki.key());
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let with = |name: &str| terminate_args(name, &pki.cert(), &pki.key(), &[]);
    let said = tls_refused(state, &with("other.example.com"));
    assert!(
        said.contains("no agent is granted other.example.com"),
        "{said}"
    );
    let said = tls_refused(state, &with("*.apps.example.com"));
    assert!(said.contains("wildcard"), "{said}");
    // A name under a granted wildcard is granted; this certificate does not cover it.
    let said = tls_refused(state, &with("x.apps.example.com"));
    assert!(said.contains("not for x.apps.example.com"), "{said}");
    let said = tls_refused(state, &terminate_args(NAME, &pki.cert(), &other.key(), &[]));
    assert!(said.contains("cannot be served together"), "{said}");
    let said = tls_refused(state, &["terminate", NAME, "--cert", cert]);
    assert!(said.contains("--key"), "{said}");
    let said = tls_refused(state, &["passthrough", NAME]);
    assert!(said.contains("not terminated"), "{said}");
    let now = time::OffsetDateTime::now_utc();
    let expired = OperatorCert::expiring(&[NAME], now - time::Duration::days(1));
    let args = terminate_args(NAME, &expired.cert(), &expired.key(), &[]);
    let said = tls_refused(state, &args);
    assert!(said.contains("expired"), "{said}");
    let out = run(PROXY, &["tls", "list", "--json"], state);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list, serde_json::json!([]), "nothing was recorded");

    // Given a file that holds the key as well (as some tools keep them), the store gets
    // the certificates only.
    let combined = pki.dir.path().join("combined.pem");
    std::fs::write(
        &combined,
        std::fs::read_to_string(pki.cert()).unwrap() + &pki.key_pem(),
    )
    .unwrap();
    let combined = combined.to_str().unwrap();
    tls(
        state,
        &["terminate", NAME, "--cert", combined, "--key", key],
    );
    // The key's PEM body is nowhere in the store's files.
    let key_pem = pki.key_pem();
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    // (The end: the start of every P-256 key's PKCS#8 is the same.)
    let needle = &body[body.len() - 40..];
    for entry in std::fs::read_dir(state).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} holds the key in the clear",
                path.display()
            );
        }
    }
    let record = proxy.ca.state().read().unwrap().tls[NAME].clone();
    assert!(record.key_sealed.unwrap().starts_with("v1."));

    // A certificate that expires within 14 days: `tls list` warns, naming the file.
    let soon = OperatorCert::expiring(&[NAME], now + time::Duration::days(5));
    let (soon_cert, soon_key) = (soon.cert(), soon.key());
    let (soon_cert, soon_key) = (soon_cert.to_str().unwrap(), soon_key.to_str().unwrap());
    tls(
        state,
        &["terminate", NAME, "--cert", soon_cert, "--key", soon_key],
    );
    let listed = tls(state, &["list"]);
    assert!(
        listed.contains(&format!("warning: the certificate of {NAME} expires in "))
            && listed.contains(soon_cert),
        "{listed}"
    );
}

/// Certificate files kept as certbot keeps them: `live/NAME` are links to the newest
/// renewal's files, `archive/NAMEn`.
struct Certbot {
    dir: tempfile::TempDir,
    renewals: std::cell::Cell<u32>,
}

impl Certbot {
    fn new(pki: &OperatorCert) -> Certbot {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("live")).unwrap();
        std::fs::create_dir(dir.path().join("archive")).unwrap();
        let certbot = Certbot {
            dir,
            renewals: std::cell::Cell::new(0),
        };
        certbot.renewed(pki);
        certbot
    }

    fn live(&self, file: &str) -> PathBuf {
        self.dir.path().join("live").join(file)
    }

    /// Copies `pki`'s files in as the next renewal and points the links at them (each link
    /// replaced by a rename, as certbot does).
    fn renewed(&self, pki: &OperatorCert) {
        let n = self.renewals.get() + 1;
        self.renewals.set(n);
        for (from, name) in [(pki.cert(), "fullchain"), (pki.key(), "privkey")] {
            let archived = self
                .dir
                .path()
                .join("archive")
                .join(format!("{name}{n}.pem"));
            std::fs::copy(from, &archived).unwrap();
            let link = self.live(&format!("{name}.pem"));
            let new_link = self.live(&format!("{name}.pem.new"));
            std::os::unix::fs::symlink(&archived, &new_link).unwrap();
            std::fs::rename(&new_link, &link).unwrap();
        }
    }
}

/// The certificate a TLS client to `name` is served.
async fn served_cert(
    sni: std::net::SocketAddr,
    with: &tokio_rustls::TlsConnector,
    name: &str,
) -> Option<Vec<u8>> {
    let session = connect_tls(sni, with, name).await.ok()?;
    Some(session.get_ref().1.peer_certificates()?[0].to_vec())
}

/// The operator replaces the files (a renewal): every handshake after gets the new
/// certificate, with no command run. Files that do not go together (a certificate with
/// another key) are noted in `tls list` and the certificate served stays.
#[tokio::test]
async fn renewed_files_are_served_and_a_broken_pair_keeps_the_old_certificate() {
    let (admin, admin_addr) = local_listener();
    let proxy = TestProxy::start_with(|b| b.admin_listener(admin)).await;
    let state = proxy.dir.path();
    let agent_dir = enroll_agent(&proxy, "web-1", &[NAME]).await;
    let backend = echo_backend(b"").await;
    let _agent = start_agent(agent_dir.path(), &[(NAME, backend)], |b| b);
    let pki = OperatorCert::new(&[NAME]);
    let client = pki.client(&[b"http/1.1"]);
    let first = std::fs::read_to_string(pki.cert()).unwrap();
    let first = rustls::pki_types::CertificateDer::from_pem_slice(first.as_bytes()).unwrap();
    // As certbot keeps them: live/ names are links to each renewal's files in archive/.
    let certbot = Certbot::new(&pki);
    let (cert, key) = (certbot.live("fullchain.pem"), certbot.live("privkey.pem"));
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    tls(state, &["terminate", NAME, "--cert", cert, "--key", key]);
    eventually("the first certificate is served", || async {
        served_cert(proxy.sni, &client, NAME).await.as_deref() == Some(&first[..])
    })
    .await;

    let renewed = pki.renew();
    certbot.renewed(&pki);
    eventually("the renewed certificate is served", || async {
        served_cert(proxy.sni, &client, NAME).await == Some(renewed.clone())
    })
    .await;
    // Its expiry, in the metrics and in /status.
    let not_after = revproxy::ca::CertSummary::from_der(&renewed)
        .unwrap()
        .not_after;
    let (_, metrics) = admin_get(admin_addr, "/metrics").await;
    assert_eq!(
        sample(
            &metrics,
            "revproxy_tls_certificate_expiry_timestamp_seconds",
            &format!("name=\"{NAME}\"")
        ),
        Some(not_after as f64)
    );
    let (_, status) = admin_get(admin_addr, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        status["tls"],
        serde_json::json!([{"name": NAME, "source": "file", "not_after": not_after,
                            "keep_http": false, "last_error": null}])
    );

    // A certificate with a key that is not its own: noted, not served.
    let key_before = std::fs::read(pki.key()).unwrap();
    let _ = pki.renew();
    std::fs::write(pki.key(), key_before).unwrap();
    certbot.renewed(&pki);
    eventually("the broken pair is noted", || async {
        let out = run(PROXY, &["tls", "list", "--json"], state);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        list[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot be served together"))
    })
    .await;
    assert_eq!(served_cert(proxy.sni, &client, NAME).await, Some(renewed));
}

over_both_transports!(a_terminated_name_serves_the_operators_certificate_and_plaintext_goes_down);
