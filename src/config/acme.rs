//! The proxy's `[acme]` table (DESIGN.md sections 6 and 10): where terminated names'
//! certificates are ordered, and how.

use std::path::PathBuf;

use base64::Engine as _;
use serde::Deserialize;

use super::ConfigError;
use crate::edge::{AcmeSettings, ChallengeKind};
use crate::route::ListenerKind;

/// `[acme]` as written.
#[derive(Deserialize)]
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

impl std::fmt::Debug for AcmeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the EAB key.
        f.debug_struct("AcmeConfig")
            .field("directory", &self.directory)
            .field("contact", &self.contact)
            .field("ca_roots", &self.ca_roots)
            .field("eab_kid", &self.eab_kid)
            .field("challenge", &self.challenge)
            .finish_non_exhaustive()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyConfig;

    fn settings(text: &str) -> Result<Option<AcmeSettings>, String> {
        let config = ProxyConfig::from_toml(text).map_err(|e| e.to_string())?;
        config.acme_settings().map_err(|e| e.to_string())
    }

    #[test]
    fn acme_tables() {
        let le = "directory = \"https://acme-v02.api.letsencrypt.org/directory\"";
        let both = "sni = \"0.0.0.0:443\"\nhttp = \"0.0.0.0:80\"\n";
        let s = settings(&format!(
            "{both}[acme]\n{le}\ncontact = \"ops@example.com\"\n"
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            s.challenge,
            ChallengeKind::TlsAlpn01,
            "an SNI listener: TLS-ALPN-01"
        );
        assert_eq!(s.contact, ["mailto:ops@example.com"]);
        assert!(s.roots.is_none() && s.eab.is_none());
        let http_only = "http = \"0.0.0.0:80\"\n";
        let s = settings(&format!("{http_only}[acme]\n{le}\n"))
            .unwrap()
            .unwrap();
        assert_eq!(s.challenge, ChallengeKind::Http01);
        let s = settings(&format!(
            "{both}[acme]\n{le}\ncontact = [\"mailto:a@example.com\", \"b@example.com\"]\nchallenge = \"http-01\"\neab_kid = \"kid-1\"\neab_hmac_key = \"c2VjcmV0\"\n"
        ))
        .unwrap()
        .unwrap();
        assert_eq!(s.contact, ["mailto:a@example.com", "mailto:b@example.com"]);
        assert_eq!(s.eab, Some(("kid-1".into(), b"secret".to_vec())));
        assert!(
            !format!("{s:?}").contains("c2VjcmV0"),
            "the EAB key is never shown"
        );
        assert!(settings(both).unwrap().is_none());

        for (bad, says) in [
            (
                format!("{both}[acme]\ndirectory = \"http://ca.example/dir\"\n"),
                "https://",
            ),
            (
                format!("{both}[acme]\n{le}\neab_kid = \"k\"\n"),
                "go together",
            ),
            (
                format!("{both}[acme]\n{le}\neab_kid = \"k\"\neab_hmac_key = \"not base64!\"\n"),
                "base64url",
            ),
            (
                format!("{both}[acme]\n{le}\ncontact = \"nobody\"\n"),
                "e-mail",
            ),
            (
                format!("{http_only}[acme]\n{le}\nchallenge = \"tls-alpn-01\"\n"),
                "SNI listener",
            ),
            (
                format!("{both}[acme]\n{le}\nchallenge = \"dns-01\"\n"),
                "unknown variant",
            ),
            (
                format!("{both}[acme]\n{le}\nca_roots = \"/nonexistent/roots.pem\"\n"),
                "ca_roots",
            ),
            (
                format!("{both}[acme]\n{le}\nemail = \"a@b\"\n"),
                "unknown field",
            ),
        ] {
            let error = settings(&bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
            assert!(
                !error.contains("c2VjcmV0") && !error.contains("not base64!"),
                "{error}"
            );
        }
    }
}
