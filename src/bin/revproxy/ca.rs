//! `revproxy ca init`, and the notes printed whenever a CA is created (here or by `serve`).
//! On a state directory that has a CA already, `ca init --san` adds names to the proxy's
//! server certificate instead: the CA key, and so the pin, stay.

use anyhow::anyhow;
use clap::Subcommand;
use revproxy::ca::{self, Ca, InitOptions, NamesAdded};
use time::OffsetDateTime;

use crate::state::{store_failure, StateArg};
use crate::Failure;

#[derive(Subcommand)]
pub(crate) enum CaCommand {
    /// Create the CA and the proxy's server certificate; on an existing CA, add the --san
    /// names to the server certificate (same CA key, same pin).
    Init {
        #[command(flatten)]
        state: StateArg,
        /// DNS name or IP address agents use to reach the proxy (repeatable) [default: localhost, 127.0.0.1]
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// SPIFFE trust domain of agent identities (only for a new CA) [default: revproxy.local]
        #[arg(long, value_name = "NAME")]
        trust_domain: Option<String>,
    },
}

impl CaCommand {
    pub(crate) fn run(self, now: OffsetDateTime) -> Result<(), Failure> {
        match self {
            CaCommand::Init {
                state,
                sans,
                trust_domain,
            } => {
                let dir = state.dir();
                if dir.join(ca::CA_KEY_FILE).exists() {
                    return add_names(&state, &sans, trust_domain.as_deref(), now);
                }
                let mut opts = InitOptions::default();
                if let Some(trust_domain) = trust_domain {
                    opts.trust_domain = trust_domain;
                }
                if !sans.is_empty() {
                    opts.sans = sans;
                }
                let store =
                    revproxy::store::open(&dir, state.store.as_deref()).map_err(store_failure)?;
                let ca = Ca::init_in(&dir, store, &opts, now)?;
                println!("{}", ca.pin());
                print_init_notes(&ca);
            }
        }
        Ok(())
    }
}

/// `ca init` where a CA exists: adds `sans` to the server certificate, and refuses what
/// only a new CA could do (another trust domain) or nothing to do at all.
fn add_names(
    state: &StateArg,
    sans: &[String],
    trust_domain: Option<&str>,
    now: OffsetDateTime,
) -> Result<(), Failure> {
    let ca = state.open()?;
    let dir = ca.dir().display().to_string();
    if let Some(wanted) = trust_domain.filter(|t| !t.eq_ignore_ascii_case(ca.trust_domain())) {
        return Err(anyhow!(
            "the CA in {dir} has the trust domain {have}, and a trust domain cannot change: it is in the CA and in every agent's identity. A CA for {wanted} is a new CA (a new pin, every agent enrolls again): move {dir} away, keeping its ca.key as a backup, and run `revproxy ca init --trust-domain {wanted}` again",
            have = ca.trust_domain(),
        )
        .into());
    }
    if sans.is_empty() {
        return Err(anyhow!(
            "a CA already exists in {dir}; refusing to overwrite it. To add names to the proxy's server certificate, give them with --san NAME; to start over, move {dir} away (keeping a backup of its ca.key)"
        )
        .into());
    }
    let NamesAdded {
        added,
        sans,
        reissued,
    } = ca.add_server_names(sans, now)?;
    println!("{}", ca.pin());
    if added.is_empty() && !reissued {
        eprintln!(
            "The CA in {dir} is kept (pin {pin}) and its server certificate names all of these already: nothing changed.",
            pin = ca.pin()
        );
        return Ok(());
    }
    eprintln!(
        "Added {added} to the proxy's server certificate; the CA in {dir} is kept (same key, same pin {pin}).\n  server.crt was reissued and names {all}.\n  Tokens name {server} unless --server says otherwise.\n  A proxy running on this state directory serves the new certificate after its next hourly check, or at once when restarted (`revproxy serve --upgrade` restarts without dropping anything).",
        pin = ca.pin(),
        added = match added.is_empty() {
            true => "the names it lacked".to_string(),
            false => added.join(", "),
        },
        all = sans.join(", "),
        server = ca.default_server()?.address(),
    );
    Ok(())
}

/// Where the new CA is, its pin, what to back up and the next command (on stderr).
pub(crate) fn print_init_notes(ca: &Ca) {
    eprintln!(
        "CA created in {dir}\n  CA pin: {pin}\n  Back up {dir}/ca.key now: if it is lost, every agent must enroll again.\n  Next: revproxy token create --state {dir} --name AGENT --host NAME",
        dir = ca.dir().display(),
        pin = ca.pin()
    );
}
