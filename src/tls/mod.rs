//! TLS for the agent port, both ends: `server.rs` is the proxy's (its renewable
//! certificate, the client-certificate verifier with the revocation check), `client.rs` the
//! agent's (the pinned-CA verifier). What a certificate says is read by
//! [`revproxy_ca::CertSummary`], the one X.509 reader.
//!
//! One crypto provider (ring) and TLS 1.3 only: both ends are ours, so there is nothing
//! older to talk to. The agent never uses the system trust store: it accepts the proxy only
//! if the proxy's chain ends in a CA whose public key matches a pin it holds (from the
//! token when enrolling, from `ca.crt` afterwards).

mod client;
mod server;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub use client::{agent_client_config, pinned_client_config, quic_client_config};
pub(crate) use client::{find_pin_mismatch, Credentials};
pub(crate) use server::{
    admin_listener_config, agent_listener_config, offers_h2, tunnel_listener_config, ServerCert,
};

/// ALPN id of the enrollment (and later renewal) API: HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN id of h2 tunnels.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of QUIC tunnels (UDP, same port number as the agent listener).
pub const ALPN_QUIC: &[u8] = b"revproxy-quic/1";
/// ALPN of an h2 agent's mesh channel: HTTP/2 with the agent as client, for the streams it
/// opens to reach private names.
pub(crate) const ALPN_CONNECT: &[u8] = b"revproxy-connect/1";
/// ALPN of an agent's extra h2 tunnel: one it adds beside its tunnel while that one's
/// streams near their limit, and closes when they are few again (`docs/protocol.md`).
/// The proxy spreads streams over it and the tunnel it joins, and admits it only while
/// the agent's tunnels are busy.
pub(crate) const ALPN_H2_EXTRA: &[u8] = b"revproxy-h2-extra/1";
/// ALPN of an agent's extra QUIC tunnel (as [`ALPN_H2_EXTRA`]).
pub(crate) const ALPN_QUIC_EXTRA: &[u8] = b"revproxy-quic-extra/1";

/// Why a TLS setup step failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} holds no usable PEM {kind}")]
    Pem { what: String, kind: &'static str },
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier configuration failed: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0:?} is not a valid host name")]
    ServerName(String),
}

/// The crypto provider used everywhere in revproxy.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The crypto provider with the cipher suites whose hash is SHA-256 first (AES-128-GCM,
/// ChaCha20), chosen over the client's order: most clients list AES-256-GCM-SHA384 first,
/// and SHA-384 (the handshake's transcript and key schedule) runs without the CPU's SHA
/// extensions in ring, where SHA-256 uses them. Measured with bench/tls.py: 6% of the
/// proxy's CPU in a handshake-bound run was SHA-512 blocks (docs/benchmarks.md). The
/// tunnels use it too (the agent port and agents): AES-128-GCM moved a single h2 stream
/// 22% faster than AES-256-GCM, a QUIC one 7%.
pub(crate) fn suites_by_speed() -> Arc<rustls::crypto::CryptoProvider> {
    let mut fast = (*provider()).clone();
    fast.cipher_suites
        .sort_by_key(|s| format!("{:?}", s.suite()).ends_with("SHA384"));
    Arc::new(fast)
}

/// Parses every certificate in a PEM text.
pub(crate) fn certs_from_pem(
    pem: &str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem {
            what: what.into(),
            kind: "certificate",
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: what.into(),
            kind: "certificate",
        });
    }
    Ok(certs)
}

/// Parses a PEM private key.
pub(crate) fn key_from_pem(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::Pem {
        what: what.into(),
        kind: "private key",
    })
}

/// The server name to send for a `host:port` address (an IP address or a DNS name).
pub(crate) fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(host.to_string()))
}

/// Largest certificate or key file an operator may give (a chain of a few certificates is
/// a few KiB).
pub const MAX_PEM_FILE: u64 = 1024 * 1024;

/// Reads an operator's certificate or key file: a regular file (not a FIFO or a device,
/// which could block or never end) of at most [`MAX_PEM_FILE`] bytes.
pub fn read_pem_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let shown = path.display();
    // Looked at before opening: opening a FIFO would wait for a writer.
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if text.len() as u64 > MAX_PEM_FILE {
        return Err(format!(
            "{shown} is larger than {MAX_PEM_FILE} bytes, too large for a certificate or key"
        ));
    }
    Ok(text)
}

/// Where Debian's ca-certificates keeps the system's trusted roots.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Reads a PEM file of trusted roots (`[acme] ca_roots`, or the system's).
pub fn read_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let pem = read_pem_file(path)?;
    let certs = certs_from_pem(&pem, "the roots file").map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _unusable) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{} holds no usable certificate", path.display()));
    }
    Ok(roots)
}

/// Checks that `key_pem` is the private key of the first certificate in `chain_pem`, and
/// that rustls can serve them (`revproxy tls terminate --cert --key`). Returns the chain's
/// certificates alone, as PEM: what is stored (a file that holds the key as well would
/// otherwise put the key in the store unsealed).
pub fn check_cert_and_key(chain_pem: &str, key_pem: &str) -> Result<String, TlsError> {
    use base64::Engine as _;
    let chain = certs_from_pem(chain_pem, "the certificate file")?;
    let mut certs_only = String::new();
    for cert in &chain {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        certs_only.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            certs_only.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            certs_only.push('\n');
        }
        certs_only.push_str("-----END CERTIFICATE-----\n");
    }
    let certified = rustls::sign::CertifiedKey::from_der(
        chain,
        key_from_pem(key_pem, "the key file")?,
        &provider(),
    )?;
    certified.keys_match()?;
    Ok(certs_only)
}
