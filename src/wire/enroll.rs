//! The agent API on the wire: `POST /v1/enroll` (a token and a CSR), `POST /v1/renew`
//! (mTLS with the current certificate, and a CSR) and `GET /v1/proxies` (mTLS: the
//! proxies to keep a tunnel to), JSON bodies over TLS on the agent port (ALPN
//! `http/1.1`). Documented in `docs/protocol.md`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Path of the enrollment endpoint.
pub const ENROLL_PATH: &str = "/v1/enroll";
/// Path of the renewal endpoint (mTLS: the agent presents its current certificate).
pub const RENEW_PATH: &str = "/v1/renew";
/// Path of the proxy list (mTLS, GET): the proxies sharing this one's store, each of which
/// the agent keeps a tunnel to.
pub const PROXIES_PATH: &str = "/v1/proxies";
/// Largest request body the proxy reads.
pub const MAX_REQUEST_BODY: usize = 64 * 1024;
/// Largest response body the agent reads.
pub const MAX_RESPONSE_BODY: usize = 256 * 1024;

/// The agent's request.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollBody {
    /// The token's public id.
    pub token_id: String,
    /// The token's secret, base64url.
    pub secret: String,
    /// PKCS#10 certificate signing request, PEM.
    pub csr: String,
}

impl fmt::Debug for EnrollBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollBody")
            .field("token_id", &self.token_id)
            .field("secret", &"***")
            .finish_non_exhaustive()
    }
}

/// The proxy's answer to `GET /v1/proxies`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxiesReply {
    /// The id of the proxy that answered.
    pub proxy: String,
    /// Every proxy serving from the same store that advertises an address, the one that
    /// answered included. Empty when the proxy has no peers to tell of (a file store).
    pub proxies: Vec<ProxyAddr>,
}

/// One proxy agents can reach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyAddr {
    /// Its id: its server certificate names `spiffe://TRUST_DOMAIN/proxy/ID`.
    pub id: String,
    /// Its agent listener, `host:port`.
    pub address: String,
}

/// The agent's renewal request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    /// PKCS#10 certificate signing request for the new key, PEM.
    pub csr: String,
}

/// The proxy's answer to a successful enrollment or renewal (HTTP 200).
#[derive(Debug, Serialize, Deserialize)]
pub struct EnrollReply {
    /// Agent name (the certificate's CN).
    pub agent: String,
    /// SPIFFE identity (the certificate's URI SAN).
    pub identity: String,
    /// Names the agent may serve (the certificate's DNS SANs).
    pub hosts: Vec<String>,
    /// Certificate serial, hex.
    pub serial: String,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: i64,
    /// The agent certificate, PEM.
    pub certificate: String,
    /// The CA certificate, PEM.
    pub ca: String,
    /// Of `hosts`, those granted privately: the agent serves them only to mesh streams
    /// (which carry a caller). Absent from proxies before it, and when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub private: Vec<String>,
}

/// The body of every error answer (HTTP 4xx/5xx).
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Stable machine-readable code, e.g. `token_used`.
    pub error: String,
    /// One sentence for the operator.
    pub message: String,
    /// For refusals that pass with time (`too_early`, `rate_limited`): seconds to wait
    /// before asking again, as in the `Retry-After` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}
