//! Answering the ACME server's challenges from what the store holds, on whichever proxy
//! it reaches: HTTP-01 on the HTTP listener, TLS-ALPN-01 (RFC 8737) on the SNI listener.
//! A connection is answered only when it asks for the pending challenge of its name;
//! anything else (the backend's own ACME client behind a passed-through name, say) is
//! routed as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use revproxy_ca::state::{Challenge, TlsRecord};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// RFC 8737's ALPN protocol.
pub(crate) const ALPN_ACME_TLS: &[u8] = b"acme-tls/1";
/// Most challenge certificates kept (names with a challenge pending at once).
const MAX_CHALLENGE_CERTS: usize = 256;
/// Where HTTP-01 asks (RFC 8555 section 8.3).
const HTTP01_PATH: &str = "/.well-known/acme-challenge/";

/// What a challenge connection gets.
pub(crate) enum Answer {
    /// The body of a `200` (HTTP-01: the key authorization).
    Http(String),
    /// The handshake with the challenge certificate (TLS-ALPN-01), then the end.
    Tls(Arc<rustls::ServerConfig>),
}

/// The TLS-ALPN-01 certificates of the pending challenges, by name: made once per
/// challenge (the ACME server validates from several places at once).
#[derive(Default)]
pub(crate) struct ChallengeCerts {
    made: Mutex<HashMap<String, (String, Arc<rustls::ServerConfig>)>>,
}

impl ChallengeCerts {
    /// The answer to `record`'s pending challenge, if the connection that sent `first`
    /// (its ClientHello when `tls`, else its HTTP request head) asks for it.
    pub(crate) fn answer(&self, record: &TlsRecord, tls: bool, first: &[u8]) -> Option<Answer> {
        match (record.acme.challenge.as_ref()?, tls) {
            (
                Challenge::Http01 {
                    token,
                    key_authorization,
                },
                false,
            ) => (http01_token(first)? == token.as_str())
                .then(|| Answer::Http(key_authorization.clone())),
            (Challenge::TlsAlpn01 { digest }, true) if offers_only_acme_tls(first) => {
                let made = |this: &Self| {
                    let all = this.made.lock().expect("challenge certificates");
                    (all.get(&record.name))
                        .filter(|(d, _)| d == digest)
                        .map(|(_, config)| config.clone())
                };
                if let Some(config) = made(self) {
                    return Some(Answer::Tls(config));
                }
                // Made outside the lock; at most one per pending challenge is kept.
                let config = match tls_alpn01_config(&record.name, digest) {
                    Ok(config) => config,
                    Err(e) => {
                        tracing::warn!(host = %record.name, error = %e, "cannot make the TLS-ALPN-01 challenge certificate");
                        return None;
                    }
                };
                let mut all = self.made.lock().expect("challenge certificates");
                if all.len() >= MAX_CHALLENGE_CERTS && !all.contains_key(&record.name) {
                    all.clear();
                }
                all.insert(record.name.clone(), (digest.clone(), config.clone()));
                Some(Answer::Tls(config))
            }
            _ => None,
        }
    }
}

/// The token an HTTP-01 validation asks for (`GET /.well-known/acme-challenge/TOKEN`,
/// origin or absolute form).
fn http01_token(head: &[u8]) -> Option<&str> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    request.parse(head).ok()?;
    if request.method != Some("GET") {
        return None;
    }
    let target = request.path?;
    let path = match target.strip_prefix("http://") {
        Some(rest) => &rest[rest.find('/')?..],
        None => target,
    };
    path.strip_prefix(HTTP01_PATH)
        .filter(|t| !t.is_empty() && !t.contains(['/', '?']))
}

/// Whether a ClientHello offers exactly `acme-tls/1` (RFC 8737 section 3: validation
/// hellos offer nothing else; a browser never does).
fn offers_only_acme_tls(hello: &[u8]) -> bool {
    let mut acceptor = rustls::server::Acceptor::default();
    if acceptor.read_tls(&mut &hello[..]).is_err() {
        return false;
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => (accepted.client_hello().alpn()).is_some_and(|mut offered| {
            offered.next() == Some(ALPN_ACME_TLS) && offered.next().is_none()
        }),
        _ => false,
    }
}

/// The RFC 8737 configuration for `name`: a self-signed certificate naming only it, with
/// the critical acmeIdentifier extension holding `digest_hex` (SHA-256 of the key
/// authorization), ALPN `acme-tls/1` only.
fn tls_alpn01_config(name: &str, digest_hex: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    let digest: [u8; 32] = revproxy_ca::hex::decode(digest_hex)
        .and_then(|d| d.try_into().ok())
        .ok_or("the stored digest is not 32 bytes of hex")?;
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    (params.custom_extensions).push(rcgen::CustomExtension::new_acme_identifier(&digest));
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let provider = crate::tls::provider();
    // Not CertifiedKey::from_der: its check that key and certificate match parses the
    // certificate with webpki, which refuses the critical extension this one must carry.
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())?;
    let signer = (provider.key_provider)
        .load_private_key(der)
        .map_err(|e| e.to_string())?;
    let certified = rustls::sign::CertifiedKey::new(vec![cert.der().clone()], signer);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![ALPN_ACME_TLS.to_vec()];
    Ok(Arc::new(config))
}

/// Completes a TLS-ALPN-01 validation's handshake (all it checks), then closes.
pub(crate) async fn answer_tls_alpn01(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    hello: Bytes,
) {
    if let Ok(mut tls) = super::super::accept(config, tcp, hello).await {
        let _ =
            tokio::time::timeout(super::super::handshake::HANDSHAKE_TIMEOUT, tls.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http01_tokens() {
        let ask = |head: &str| http01_token(head.as_bytes()).map(str::to_string);
        let get = "GET /.well-known/acme-challenge/abc_D-1 HTTP/1.1\r\nHost: a.example.com\r\n\r\n";
        assert_eq!(ask(get).as_deref(), Some("abc_D-1"));
        let absolute = "GET http://a.example.com:80/.well-known/acme-challenge/t HTTP/1.1\r\nHost: a.example.com\r\n\r\n";
        assert_eq!(ask(absolute).as_deref(), Some("t"));
        for other in [
            "POST /.well-known/acme-challenge/t HTTP/1.1\r\nHost: a\r\n\r\n",
            "HEAD /.well-known/acme-challenge/t HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /.well-known/acme-challenge/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /.well-known/acme-challenge/t/x HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n",
            "not http at all",
        ] {
            assert_eq!(ask(other), None, "{other:?}");
        }
    }

    #[test]
    fn challenge_certificates_carry_the_digest() {
        let digest = revproxy_ca::hex::encode(&[7u8; 32]);
        let config = tls_alpn01_config("a.example.com", &digest).unwrap();
        assert_eq!(config.alpn_protocols, vec![ALPN_ACME_TLS.to_vec()]);
        assert!(tls_alpn01_config("a.example.com", "abcd").is_err());
    }
}
