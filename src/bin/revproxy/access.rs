//! `revproxy access allow|revoke|list`: who may reach which private name (default deny).

use clap::{Args, Subcommand};
use revproxy::ca::names::{name_matches, normalize_host};
use revproxy::ca::state::State;
use time::OffsetDateTime;

use crate::listing::{ListArgs, Listing};
use crate::state::StateArg;
use crate::{names_or_nothing, Failure};

#[derive(Subcommand)]
pub(crate) enum AccessCommand {
    /// Let AGENT reach NAME... with `revproxy-agent run --connect`; open streams follow
    /// changes within seconds. A NAME no agent (nor an unused token) is granted is refused
    /// as a likely typo, with the granted names closest to it, unless --force.
    Allow {
        #[command(flatten)]
        rule: Rule,
        /// Allow names no agent is granted yet (one that enrolls later with them)
        #[arg(long)]
        force: bool,
    },
    /// Take NAME... back from AGENT; its open streams to them are cut within seconds.
    Revoke(Rule),
    /// Show the access rules, by agent name. JSON: {"agent", "names"}.
    List(ListArgs),
}

/// The arguments of `allow` and `revoke`: an agent and the names it gains or loses.
#[derive(Args)]
pub(crate) struct Rule {
    #[command(flatten)]
    state: StateArg,
    #[arg(value_name = "AGENT")]
    agent: String,
    #[arg(value_name = "NAME", required = true)]
    names: Vec<String>,
}

impl AccessCommand {
    pub(crate) fn run(self) -> Result<(), Failure> {
        let now = OffsetDateTime::now_utc();
        match self {
            AccessCommand::Allow {
                rule:
                    Rule {
                        state,
                        agent,
                        names,
                    },
                force,
            } => {
                let ca = state.open()?;
                let known = Known::of(&ca.state().read()?, now.unix_timestamp());
                // Names that are not names at all are left to `allow_access` to refuse.
                let unknown: Vec<String> = (names.iter())
                    .filter_map(|n| normalize_host(n).ok())
                    .filter(|n| !known.covers(n))
                    .collect();
                if !unknown.is_empty() && !force {
                    return Err(Failure::usage(anyhow::anyhow!(
                        "{}; nothing changed (allow them anyway with --force, for an agent that enrolls with them later)",
                        unknown.iter().map(|n| known.unknown(n)).collect::<Vec<_>>().join("; ")
                    )));
                }
                let now = ca.allow_access(&agent, &names)?;
                for name in unknown {
                    eprintln!("note: no agent is granted {name} yet; {agent} reaches it once one enrolls with it");
                }
                eprintln!("{agent} may now reach: {}", now.join(" "));
            }
            AccessCommand::Revoke(Rule {
                state,
                agent,
                names,
            }) => {
                let left = state.open()?.revoke_access(&agent, &names)?;
                eprintln!("{agent} may now reach: {}", names_or_nothing(&left));
            }
            AccessCommand::List(ListArgs { state, agent, json }) => {
                let ca = state.open()?;
                let mut out = Listing::start(json, &format!("{:<20}  NAMES", "AGENT"))?;
                ca.each_access(agent.as_deref(), |agent, names| {
                    let text = || format!("{:<20}  {}", agent, names.join(","));
                    let json = || serde_json::json!({"agent": agent, "names": names});
                    out.row(text, json).map_err(Failure::from)
                })?;
                out.finish()?;
            }
        }
        Ok(())
    }
}

/// The names a mesh stream can reach: every agent's grant (private names, and public ones,
/// which the mesh reaches too) and those of tokens not yet used.
struct Known {
    private: Vec<String>,
    public: Vec<String>,
}

impl Known {
    fn of(state: &State, now: i64) -> Known {
        let open =
            (state.tokens.iter()).filter(|t| t.used.is_none() && !t.revoked && t.expires > now);
        let mut private: Vec<String> = (state.agents.values().flat_map(|g| &g.private))
            .chain(open.clone().flat_map(|t| &t.private_hosts))
            .cloned()
            .collect();
        let mut public: Vec<String> = (state.agents.values().flat_map(|g| &g.hosts))
            .chain(open.flat_map(|t| &t.hosts))
            .cloned()
            .collect();
        for names in [&mut private, &mut public] {
            names.sort();
            names.dedup();
        }
        Known { private, public }
    }

    /// Whether a rule for `rule` (a name or `*.suffix`) reaches some granted name: the
    /// rule covers it, or a granted wildcard covers the rule's name.
    fn covers(&self, rule: &str) -> bool {
        (self.private.iter().chain(&self.public))
            .any(|g| g == rule || name_matches(rule, g) || name_matches(g, rule))
    }

    /// Why `name` is refused, with the granted names closest to it.
    fn unknown(&self, name: &str) -> String {
        let mut close: Vec<(usize, &String)> = (self.private.iter().chain(&self.public))
            .map(|g| (distance(name, g), g))
            .filter(|(d, g)| *d <= 2.max(g.len() / 4))
            .collect();
        close.sort();
        close.dedup_by(|a, b| a.1 == b.1);
        let close: Vec<&str> = close.iter().take(3).map(|(_, g)| g.as_str()).collect();
        if !close.is_empty() {
            return format!(
                "no agent is granted {name}: did you mean {}?",
                close.join(" or ")
            );
        }
        match &self.private[..] {
            [] => format!("no agent is granted {name}, and no agent has a private name"),
            private => format!(
                "no agent is granted {name}; the private names are: {}",
                private
                    .iter()
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    }
}

/// Edit distance (insertions, deletions, substitutions and swaps of neighbours) between
/// two names.
fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut rows = vec![(0..=b.len()).collect::<Vec<usize>>()];
    for i in 1..=a.len() {
        let mut row = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            row[j] = (rows[i - 1][j] + 1)
                .min(row[j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                row[j] = row[j].min(rows[i - 2][j - 2] + 1);
            }
        }
        rows.push(row);
    }
    rows[a.len()][b.len()]
}
