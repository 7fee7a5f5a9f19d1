//! `revproxy tls terminate|passthrough|list`: the names whose TLS the proxies terminate
//! (DESIGN.md section 10), in the shared state so every proxy agrees.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use revproxy::ca::state::TlsSource;
use revproxy::ca::OwnCert;
use revproxy::runtime::rfc3339;
use time::OffsetDateTime;

use crate::listing::Listing;
use crate::state::StateArg;
use crate::Failure;

/// `tls list` warns of a certificate this close to its expiry.
const EXPIRY_WARNING_DAYS: i64 = 14;

#[derive(Subcommand)]
pub(crate) enum TlsCommand {
    /// Terminate TLS for NAME... at the proxies: clients get the certificate from the
    /// proxy, the agent's backend gets plaintext. The certificate is ordered from ACME by
    /// the proxies with [acme] in their configuration; with --cert and --key, the
    /// operator's own (a proxy that can read the files serves them again when they change).
    /// Exact names only, each granted to some agent for public serving. Plain HTTP to them
    /// is redirected to https (308) unless --keep-http.
    Terminate(TerminateArgs),
    /// Pass NAME... through again: TLS end to end, to the agent's backend (the default).
    Passthrough {
        #[command(flatten)]
        state: StateArg,
        #[arg(value_name = "NAME", required = true)]
        names: Vec<String>,
    },
    /// The terminated names: where each certificate comes from, when it expires, the last
    /// error. JSON: {"name", "source", "not_after", "last_error"}.
    List {
        #[command(flatten)]
        state: StateArg,
        /// One JSON array of objects, one a name
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(crate) struct TerminateArgs {
    #[command(flatten)]
    state: StateArg,
    #[arg(value_name = "NAME", required = true)]
    names: Vec<String>,
    /// The certificate chain to serve (PEM, the name's certificate first)
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Its private key (PEM)
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Serve plain HTTP to these names as before instead of redirecting it to https
    #[arg(long)]
    keep_http: bool,
}

impl TlsCommand {
    pub(crate) fn run(self, now: OffsetDateTime) -> Result<(), Failure> {
        match self {
            TlsCommand::Terminate(args) => args.run(now),
            TlsCommand::Passthrough { state, names } => {
                let passed = state.open()?.tls_passthrough(&names)?;
                eprintln!(
                    "passed through again (TLS end to end): {}",
                    passed.join(" ")
                );
                Ok(())
            }
            TlsCommand::List { state, json } => list(&state, json, now),
        }
    }
}

impl TerminateArgs {
    fn run(self, now: OffsetDateTime) -> Result<(), Failure> {
        let own = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(read_own(cert, key)?),
            _ => None,
        };
        let ca = self.state.open()?;
        let records = ca.tls_terminate(
            &self.names,
            own.as_ref(),
            self.keep_http,
            now.unix_timestamp(),
        )?;
        let redirect = match self.keep_http {
            true => "",
            false => "; plain HTTP to it is redirected to https",
        };
        for r in &records {
            let until = r.not_after.map(rfc3339);
            match (&self.cert, until) {
                (Some(cert), Some(until)) => eprintln!(
                    "{}: TLS terminated at the proxies with {} (valid until {until}); its backend now gets plaintext{redirect}",
                    r.name,
                    cert.display(),
                ),
                (None, Some(until)) => eprintln!(
                    "{}: TLS terminated at the proxies with its ACME certificate (valid until {until}){redirect}",
                    r.name
                ),
                (_, None) => eprintln!(
                    "{}: a proxy with [acme] orders its certificate now; until it is issued, its TLS clients are refused (`revproxy tls list` shows progress and errors){redirect}",
                    r.name
                ),
            }
        }
        Ok(())
    }
}

/// The operator's certificate and key, read and checked against each other. The paths
/// are kept as given, made absolute (not resolved: certbot's `live/` names are links that
/// move to each renewal's files).
fn read_own(cert: &Path, key: &Path) -> Result<OwnCert, Failure> {
    let read = |path: &Path| -> Result<(String, String), Failure> {
        let text =
            revproxy::tls::read_pem_file(path).map_err(|e| Failure::usage(anyhow::anyhow!(e)))?;
        let absolute = std::path::absolute(path)
            .map_err(|e| Failure::usage(anyhow::anyhow!("cannot read {}: {e}", path.display())))?;
        let absolute = absolute.to_str().map(str::to_owned).ok_or_else(|| {
            Failure::usage(anyhow::anyhow!("{} is not a UTF-8 path", path.display()))
        })?;
        Ok((text, absolute))
    };
    let (chain_pem, cert_path) = read(cert)?;
    let (key_pem, key_path) = read(key)?;
    let chain_pem = revproxy::tls::check_cert_and_key(&chain_pem, &key_pem).map_err(|e| {
        Failure::usage(anyhow::anyhow!(
            "{} and {} cannot be served together: {e}",
            cert.display(),
            key.display()
        ))
    })?;
    Ok(OwnCert {
        chain_pem,
        key_pem,
        cert_path,
        key_path,
    })
}

fn list(state: &StateArg, json: bool, now: OffsetDateTime) -> Result<(), Failure> {
    let ca = state.open()?;
    let header = format!(
        "{:<32}  {:<6}  {:<20}  LAST ERROR",
        "NAME", "SOURCE", "NOT AFTER"
    );
    let mut out = Listing::start(json, &header)?;
    let now = now.unix_timestamp();
    ca.each_tls(|r| {
        let not_after = r.not_after.map(rfc3339);
        if let Some(at) = r.not_after {
            let days = (at - now) / 86_400;
            if at <= now {
                eprintln!(
                    "warning: the certificate of {} expired at {}",
                    r.name,
                    rfc3339(at)
                );
            } else if days < EXPIRY_WARNING_DAYS {
                eprintln!(
                    "warning: the certificate of {} expires in {days} days, at {}{}",
                    r.name,
                    rfc3339(at),
                    match &r.source {
                        TlsSource::File { cert, .. } => format!(": replace {cert}"),
                        TlsSource::Acme => {
                            ": its renewal has not succeeded yet (see LAST ERROR)".into()
                        }
                    }
                );
            }
        }
        let text = || {
            format!(
                "{:<32}  {:<6}  {:<20}  {}",
                r.name,
                r.source.label(),
                not_after.as_deref().unwrap_or("-"),
                r.last_error.as_deref().unwrap_or("-")
            )
        };
        let json = || {
            serde_json::json!({
                "name": r.name,
                "source": r.source.label(),
                "not_after": not_after,
                "last_error": r.last_error,
            })
        };
        out.row(text, json).map_err(Failure::from)
    })?;
    out.finish()?;
    Ok(())
}
