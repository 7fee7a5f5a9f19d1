//! The proxy's `[acme]` table (DESIGN.md sections 6 and 10): where terminated names'
//! certificates are ordered, and how.

use std::path::PathBuf;

use base64::Engine as _;
use serde::Deserialize;

use super::ConfigError;
use crate::edge::{AcmeSettings, ChallengeKind};
use crate::route::ListenerKind;

/// `[acme]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The ACME server's directory URL (https), e.g. Let's Encrypt's
    /// `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory: String,
    /// Who the CA may write to: `"ops@example.com"` or a list (`mailto:` is added).
    #[serde(default)]
    pub contact: Contacts,
    /// PEM file of the roots trusted for the ACME server's own HTTPS, instead of the
    /// system's (a test CA such as pebble).
    pub ca_roots: Option<PathBuf>,
    /// External account binding, when the CA requires one: its key id and its base64url
    /// HMAC key (never logged).
    pub eab_kid: Option<String>,
    pub eab_hmac_key: Option<String>,
    /// `tls-alpn-01` (default when an SNI listener exists) or `http-01`.
    pub challenge: Option<ChallengeKind>,
}

/// One contact or several.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
pub enum Contacts {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl AcmeConfig {
    /// The settings the proxy runs with, checked against its public listeners; reads
    /// `ca_roots`.
    pub fn settings(&self, listeners: &[ListenerKind]) -> Result<AcmeSettings, ConfigError> {
        let bad = |why: String| ConfigError::Invalid(format!("[acme] {why}"));
        if !self.directory.starts_with("https://") {
            return Err(bad(format!(
                "directory {:?} is not an https:// URL (ACME servers are reached over HTTPS)",
                self.directory
            )));
        }
        self.directory
            .parse::<http::Uri>()
            .map_err(|e| bad(format!("directory {:?}: {e}", self.directory)))?;
        let contact = match &self.contact {
            Contacts::None => Vec::new(),
            Contacts::One(c) => vec![c.clone()],
            Contacts::Many(c) => c.clone(),
        };
        let contact = (contact.into_iter())
            .map(|c| match c.strip_prefix("mailto:").unwrap_or(&c) {
                a if a.contains('@') && !a.contains(char::is_whitespace) => {
                    Ok(format!("mailto:{a}"))
                }
                _ => Err(bad(format!("contact {c:?} is not an e-mail address"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let eab = match (&self.eab_kid, &self.eab_hmac_key) {
            (None, None) => None,
            (Some(kid), Some(key)) => {
                let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(key.trim_end_matches('='))
                    .map_err(|_| bad("eab_hmac_key is not base64url (as the CA gave it)".into()))?;
                Some((kid.clone(), key))
            }
            _ => return Err(bad("eab_kid and eab_hmac_key go together".into())),
        };
        let has = |k: &ListenerKind| listeners.iter().any(|l| l == k);
        let challenge = match self.challenge {
            Some(c) => c,
            None if has(&ListenerKind::Sni) => ChallengeKind::TlsAlpn01,
            None => ChallengeKind::Http01,
        };
        let (needed, what) = match challenge {
            ChallengeKind::TlsAlpn01 => (ListenerKind::Sni, "an SNI listener (port 443)"),
            ChallengeKind::Http01 => (ListenerKind::Http, "an HTTP listener (port 80)"),
        };
        if !has(&needed) {
            return Err(bad(format!(
                "challenge {} needs {what}: the CA checks it there",
                challenge.name()
            )));
        }
        let roots = match &self.ca_roots {
            None => None,
            Some(path) => Some(
                crate::tls::read_roots(path)
                    .map_err(|e| bad(format!("ca_roots {}: {e}", path.display())))?,
            ),
        };
        Ok(AcmeSettings {
            directory: self.directory.clone(),
            contact,
            roots,
            eab,
            challenge,
        })
    }
}
