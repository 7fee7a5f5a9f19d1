//! `revproxy operator create|list|revoke`: operators' certificates for a non-loopback admin.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use revproxy::admin::client::{OPERATOR_CA_FILE, OPERATOR_CERT_FILE, OPERATOR_KEY_FILE};
use revproxy::ca::{fsutil, Ca};
use revproxy::config::parse_duration;
use time::OffsetDateTime;

use crate::state::StateArg;
use crate::{report_revoked, Failure};

#[derive(Subcommand)]
pub(crate) enum OperatorCommand {
    /// Issue an operator certificate and write it, its key (0600) and the CA certificate
    /// into DIR.
    Create {
        #[command(flatten)]
        state: StateArg,
        /// Operator name (letters, digits, '.', '_', '-')
        #[arg(long, value_name = "NAME")]
        name: String,
        /// Directory to write operator.crt, operator.key and ca.crt into (created 0700)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Lifetime of the certificate (at most 366d)
        #[arg(long, value_name = "DURATION", default_value = "90d", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// List operator certificates with their state.
    List(StateArg),
    /// Revoke an operator certificate by serial, or every certificate of an operator.
    Revoke {
        #[command(flatten)]
        state: StateArg,
        /// Serial (hex, as `operator list` shows it) or operator name
        #[arg(value_name = "SERIAL_OR_NAME")]
        what: String,
    },
}

impl OperatorCommand {
    pub(crate) fn run(self, now: OffsetDateTime) -> Result<(), Failure> {
        match self {
            OperatorCommand::Create {
                state,
                name,
                out,
                ttl,
            } => create(&state.open()?, &name, &out, ttl, now)?,
            OperatorCommand::List(state) => {
                let ca = state.open()?;
                println!(
                    "{:<40}  {:<20}  {:<8}  NOT AFTER",
                    "SERIAL", "OPERATOR", "STATE"
                );
                for o in ca.list_operators(now)? {
                    println!(
                        "{:<40}  {:<20}  {:<8}  {}",
                        o.serial,
                        o.name,
                        o.state,
                        revproxy::runtime::rfc3339(o.not_after)
                    );
                }
            }
            OperatorCommand::Revoke { state, what } => {
                report_revoked(&what, &state.open()?.revoke_operator(&what, now)?);
            }
        }
        Ok(())
    }
}

/// Issues a certificate for operator `name` into the private directory `out`; a
/// certificate whose files could not all be written is revoked again.
fn create(
    ca: &Ca,
    name: &str,
    out: &Path,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<(), Failure> {
    if out.join(OPERATOR_KEY_FILE).exists() {
        return Err(Failure::usage(anyhow::anyhow!(
            "{} already holds an operator key; choose another --out directory",
            out.display()
        )));
    }
    // The directory first: it must be private before a key goes in, and nothing is
    // recorded for a certificate that could not be written.
    fsutil::create_private_dir(out).with_context(|| format!("cannot create {}", out.display()))?;
    if let Some(mode) =
        fsutil::exposed_mode(out).with_context(|| format!("cannot read {}", out.display()))?
    {
        return Err(Failure::usage(anyhow::anyhow!(
            "{} can be read by group or others (mode {mode:03o}); run `chmod 700 {}` or choose another --out",
            out.display(),
            out.display()
        )));
    }
    let issued = ca.create_operator(name, ttl, now)?;
    let write = |file: &str, text: &str, mode: u32| {
        fsutil::write_atomic(&out.join(file), text.as_bytes(), mode)
            .with_context(|| format!("cannot write {}", out.display()))
    };
    let written = write(
        OPERATOR_KEY_FILE,
        &issued.key_pem,
        fsutil::PRIVATE_FILE_MODE,
    )
    .and_then(|()| {
        write(
            OPERATOR_CERT_FILE,
            &issued.cert_pem,
            fsutil::PUBLIC_FILE_MODE,
        )
    })
    .and_then(|()| write(OPERATOR_CA_FILE, &issued.ca_pem, fsutil::PUBLIC_FILE_MODE));
    if let Err(e) = written {
        // Its key is lost: the certificate must not stay usable.
        let _ = ca.revoke_operator(&issued.serial, now);
        return Err(e.into());
    }
    println!("{}", issued.identity);
    eprintln!(
        "operator certificate {serial} for {identity}, valid until {until}, in {dir}\n  \
         revproxy status --admin https://PROXY:7444 --operator {dir}\n  \
         Prometheus: tls_config {{ ca_file: {dir}/{OPERATOR_CA_FILE}, cert_file: {dir}/{OPERATOR_CERT_FILE}, key_file: {dir}/{OPERATOR_KEY_FILE} }}",
        serial = issued.serial,
        identity = issued.identity,
        until = revproxy::runtime::rfc3339(issued.not_after),
        dir = out.display(),
    );
    Ok(())
}
