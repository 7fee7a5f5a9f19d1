//! From a store URL to connection settings: libpq's `sslmode` and `sslrootcert`, whether
//! the database is on this machine, and the URL as shown (never its password).
//! Connecting is not here: nothing in this file touches the network.

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::Config;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::{self, RootCertError};
use super::OP_TIMEOUT;

/// What is wrong with a store URL; shown after "invalid store URL: ".
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error(
        "expected postgres://USER@HOST/DATABASE (the state directory's file store needs no URL)"
    )]
    NotPostgres,
    /// tokio-postgres refused the URL.
    #[error("{0}")]
    Syntax(tokio_postgres::Error),
    #[error("bad percent escape in {0:?}")]
    PercentEscape(String),
    #[error("{0:?} is not UTF-8")]
    NotUtf8(String),
    #[error("the database is not on this machine: give sslmode=verify-full&sslrootcert=FILE (the CA of its certificate), or sslmode=disable to send the state unencrypted")]
    NotLocal,
    #[error("TLS to the database needs sslrootcert=FILE: revproxy verifies the database's certificate against it")]
    NoRootCert,
    #[error("sslmode={0} is not supported; use verify-full (with sslrootcert=FILE) or disable")]
    SslMode(String),
    #[error(transparent)]
    RootCert(#[from] RootCertError),
}

/// The connection settings and TLS of `url`, by the rules [`PgStore::open`] states.
///
/// [`PgStore::open`]: super::PgStore::open
pub(super) fn parse(url: &str) -> Result<(Config, MakeRustlsConnect), UrlError> {
    let (url, sslmode, rootcert) = split_tls_params(url)?;
    let mut config = Config::from_str(&url).map_err(UrlError::Syntax)?;
    let local = is_local(&config);
    // libpq's variable for a password kept out of the URL (and so out of `ps`).
    if config.get_password().is_none() {
        if let Ok(password) = std::env::var("PGPASSWORD") {
            config.password(password);
        }
    }
    let tls = match (sslmode.as_deref(), rootcert) {
        (Some("disable"), _) => None,
        (Some("require" | "verify-full") | None, Some(path)) => Some(tls::verified(&path)?),
        (None, None) if local => None,
        (None | Some("prefer" | "allow"), None) => return Err(UrlError::NotLocal),
        (Some("require" | "verify-full" | "verify-ca"), None) => return Err(UrlError::NoRootCert),
        (Some(other), _) => return Err(UrlError::SslMode(other.into())),
    };
    config.ssl_mode(if tls.is_some() {
        SslMode::Require
    } else {
        SslMode::Disable
    });
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(OP_TIMEOUT / 2);
    }
    // A database that stops answering (a frozen machine, a cut cable) is noticed by
    // the socket, not only by the next query's timeout.
    config.tcp_user_timeout(OP_TIMEOUT);
    config.keepalives_idle(Duration::from_secs(5));
    config.keepalives_interval(Duration::from_secs(2));
    config.keepalives_retries(3);
    if config.get_application_name().is_none() {
        config.application_name("revproxy");
    }
    Ok((config, tls.unwrap_or_else(tls::off)))
}

/// Whether every host the configuration names is this machine: a Unix socket, a loopback
/// address, or `localhost` resolving to loopback only. `hostaddr` (the address actually
/// dialed) counts too.
fn is_local(config: &Config) -> bool {
    use std::net::ToSocketAddrs;
    let loopback_name = |name: &str| match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            name == "localhost"
                && ("localhost", 0)
                    .to_socket_addrs()
                    .is_ok_and(|mut addrs| addrs.all(|a| a.ip().is_loopback()))
        }
    };
    !config.get_hosts().is_empty()
        && config.get_hosts().iter().all(|h| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => loopback_name(name),
        })
        && config.get_hostaddrs().iter().all(|ip| ip.is_loopback())
}

/// `postgres://user@host:port/db`, never the password.
pub(super) fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

/// Takes libpq's `sslmode` and `sslrootcert` out of the URL's query (tokio-postgres knows
/// neither `verify-full` nor `sslrootcert`).
fn split_tls_params(url: &str) -> Result<(String, Option<String>, Option<String>), UrlError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None, None));
    };
    let (mut sslmode, mut rootcert, mut rest) = (None, None, Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", v)) => sslmode = Some(v.to_string()),
            Some(("sslrootcert", v)) => rootcert = Some(percent_decode(v)?),
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, sslmode, rootcert))
}

fn percent_decode(v: &str) -> Result<String, UrlError> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = v
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| UrlError::PercentEscape(v.into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError::NotUtf8(v.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PgStore;
    use revproxy_ca::Store;

    #[test]
    fn urls_and_tls_modes() {
        let (url, mode, root) =
            split_tls_params("postgres://u:p@db:5433/x?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3")
                .unwrap();
        assert_eq!(url, "postgres://u:p@db:5433/x?connect_timeout=3");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        // Beyond loopback without TLS, only on purpose.
        let e = PgStore::open("postgres://u@db.example.com/x").unwrap_err();
        assert!(e.to_string().contains("sslmode=verify-full"), "{e}");
        let e = PgStore::open("postgres://u@db.example.com/x?sslmode=require").unwrap_err();
        assert!(e.to_string().contains("sslrootcert"), "{e}");
        let store = PgStore::open("postgres://u:secret@127.0.0.1:5433/x").unwrap();
        assert_eq!(store.describe(), "postgres://u@127.0.0.1:5433/x");
        assert!(!format!("{store:?}").contains("secret"));
        assert!(PgStore::open("postgres://u@db.example.com/x?sslmode=disable").is_ok());
        // The address dialed counts, not only the name.
        let e = PgStore::open("postgres://u@localhost/x?hostaddr=203.0.113.9").unwrap_err();
        assert!(e.to_string().contains("sslmode=verify-full"), "{e}");
        assert!(PgStore::open("postgres://u@localhost/x?hostaddr=127.0.0.1").is_ok());
    }
}
