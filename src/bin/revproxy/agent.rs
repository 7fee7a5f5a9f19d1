//! `revproxy agent set-hosts`: the names an enrolled agent may serve, without a new
//! certificate; says which take effect now and which its certificate lacks.

use clap::Subcommand;
use revproxy::ca::names::name_matches;
use revproxy::ca::state::State;
use time::OffsetDateTime;

use crate::state::StateArg;
use crate::{names_or_nothing, note_private_under_public, Failure};

#[derive(Subcommand)]
pub(crate) enum AgentCommand {
    /// Set the names AGENT may serve publicly. Only names its certificate carries take
    /// effect (live tunnels follow within seconds, without reconnecting); the others need
    /// a new certificate, which only a new token gives (renewals keep a certificate's
    /// names), and the command says which are which.
    SetHosts {
        #[command(flatten)]
        state: StateArg,
        /// Agent name
        #[arg(value_name = "AGENT")]
        agent: String,
        /// Names it may serve from now on (none: it serves nothing)
        #[arg(value_name = "NAME")]
        hosts: Vec<String>,
    },
}

impl AgentCommand {
    pub(crate) fn run(self, now: OffsetDateTime) -> Result<(), Failure> {
        match self {
            AgentCommand::SetHosts {
                state,
                agent,
                hosts,
            } => {
                let ca = state.open()?;
                let hosts = ca.set_hosts(&agent, &hosts)?;
                let effect = Effect::of(&ca.state().read()?, &agent, &hosts, now);
                eprint!("{}", effect.report(&agent, &state));
                note_private_under_public(&ca, now, &hosts);
            }
        }
        Ok(())
    }
}

/// What a public grant does with the certificate the agent holds now (its newest one
/// neither revoked nor expired), as the proxy decides it: a tunnel serves publicly the
/// certificate's names that the public grant covers and the agent's private grant does
/// not.
struct Effect {
    /// The granted names that take effect now, each with the certificate's names it
    /// serves (the name itself, or those a wildcard covers).
    now: Vec<(String, Vec<String>)>,
    /// Granted names the agent's private grant covers: they stay private.
    private: Vec<String>,
    /// Granted names its certificate does not carry (none, if it has no valid one).
    missing: Vec<String>,
    /// The agent's private names, for the token that would add the missing ones.
    private_grant: Vec<String>,
    /// Serial of the certificate looked at.
    serial: Option<String>,
}

impl Effect {
    fn of(state: &State, agent: &str, granted: &[String], now: OffsetDateTime) -> Effect {
        let now = now.unix_timestamp();
        let cert = (state.certs.iter())
            .filter(|c| c.agent == agent && c.revoked_at.is_none() && now < c.not_after)
            .max_by_key(|c| c.not_before);
        let carried: &[String] = cert.map_or(&[], |c| &c.hosts);
        let private_grant = (state.agents.get(agent))
            .map(|g| g.private.clone())
            .unwrap_or_default();
        let covers = |pattern: &str, name: &str| pattern == name || name_matches(pattern, name);
        let mut effect = Effect {
            now: Vec::new(),
            private: Vec::new(),
            missing: Vec::new(),
            private_grant,
            serial: cert.map(|c| c.serial.clone()),
        };
        for name in granted {
            let served: Vec<String> = (carried.iter())
                .filter(|h| covers(name, h))
                .filter(|h| !effect.private_grant.iter().any(|p| covers(p, h)))
                .cloned()
                .collect();
            if !served.is_empty() {
                effect.now.push((name.clone(), served));
            } else if effect.private_grant.iter().any(|p| covers(p, name)) {
                effect.private.push(name.clone());
            } else {
                effect.missing.push(name.clone());
            }
        }
        effect
    }

    /// What the operator reads: the grant, then what it does and what it cannot do yet.
    fn report(&self, agent: &str, state: &StateArg) -> String {
        let all: Vec<String> = (self.now.iter().map(|(n, _)| n.clone()))
            .chain(self.private.iter().cloned())
            .chain(self.missing.iter().cloned())
            .collect();
        let mut out = format!("{agent} is granted: {}\n", names_or_nothing(&all));
        if !self.now.is_empty() {
            let shown: Vec<String> = (self.now.iter())
                .map(|(name, served)| match served[..] {
                    [ref one] if one == name => name.clone(),
                    _ => format!("{name} (as {})", served.join(" ")),
                })
                .collect();
            out += &format!(
                "  in effect now (its certificate carries them; live tunnels follow within seconds): {}\n",
                shown.join(" ")
            );
        }
        if !self.private.is_empty() {
            out += &format!(
                "  not public: {} (granted to {agent} privately; a private grant wins)\n",
                self.private.join(" ")
            );
        }
        if self.missing.is_empty() {
            return out;
        }
        let why = match &self.serial {
            Some(serial) => format!("not in {agent}'s certificate, serial {serial}"),
            None => format!("{agent} has no valid certificate"),
        };
        out += &format!(
            "  not served: {} ({why}). Renewals keep a certificate's names; only a new token gives a certificate with them, and enrolling with it replaces {agent}'s grant with the token's names:\n",
            self.missing.join(" ")
        );
        let mut command = String::from("revproxy token create");
        if let Some(dir) = &state.state {
            command += &format!(" --state {}", dir.display());
        }
        command += &format!(" --name {agent}");
        let public = (self.now.iter().map(|(n, _)| n)).chain(&self.missing);
        for name in public {
            command += &match revproxy::ca::ports::GrantedPort::of(name) {
                Some(port) => format!(" {}", port.flag()),
                None => format!(" --host {name}"),
            };
        }
        for name in &self.private_grant {
            command += &format!(" --private-host {name}");
        }
        out += &format!("    {command}\n");
        out += "    then on the agent's machine: revproxy-agent enroll --token TOKEN (into its state directory; a running agent picks the new certificate up)\n";
        out
    }
}
