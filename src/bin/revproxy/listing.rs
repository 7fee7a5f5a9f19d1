//! How the `list` subcommands print: a table, or with `--json` one JSON array. Each row is
//! written as it is read, through one buffer, so a list of 100,000 tokens is never held
//! whole as text; a reader that goes away (`| head`) ends the listing quietly.

use std::io::{self, BufWriter, Stdout, Write};

use clap::Args;

use crate::state::StateArg;

/// What every `list` takes: where the state is, one agent's records only, JSON.
#[derive(Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    pub(crate) state: StateArg,
    /// Only this agent's records
    #[arg(long, value_name = "NAME")]
    pub(crate) agent: Option<String>,
    /// One JSON array of objects, one a row (docs/operations.md names their fields)
    #[arg(long)]
    pub(crate) json: bool,
}

/// Rows on their way to stdout.
pub(crate) struct Listing {
    out: BufWriter<Stdout>,
    json: bool,
    /// Rows written so far.
    rows: usize,
    /// The reader went away: the remaining rows are dropped.
    closed: bool,
}

impl Listing {
    /// Starts a table under `header`, or a JSON array.
    pub(crate) fn start(json: bool, header: &str) -> io::Result<Listing> {
        let mut listing = Listing {
            out: BufWriter::with_capacity(64 * 1024, io::stdout()),
            json,
            rows: 0,
            closed: false,
        };
        let opening = if json { "[" } else { header };
        listing.write(|out| writeln!(out, "{opening}"))?;
        Ok(listing)
    }

    /// Writes one row: `text` in a table, `json` in the array.
    pub(crate) fn row(
        &mut self,
        text: impl FnOnce() -> String,
        json: impl FnOnce() -> serde_json::Value,
    ) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let first = self.rows == 0;
        self.rows += 1;
        if self.json {
            let value = json();
            self.write(|out| {
                if !first {
                    writeln!(out, ",")?;
                }
                serde_json::to_writer(&mut *out, &value).map_err(io::Error::other)
            })
        } else {
            let line = text();
            self.write(|out| writeln!(out, "{line}"))
        }
    }

    /// Ends the array and flushes.
    pub(crate) fn finish(mut self) -> io::Result<()> {
        if self.json {
            let close = if self.rows == 0 { "]" } else { "\n]" };
            self.write(|out| writeln!(out, "{close}"))?;
        }
        self.write(|out| out.flush())
    }

    fn write(
        &mut self,
        step: impl FnOnce(&mut BufWriter<Stdout>) -> io::Result<()>,
    ) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        match step(&mut self.out) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => other,
        }
    }
}

/// A time as the lists show it (RFC 3339, UTC).
pub(crate) fn time(unix: i64) -> String {
    revproxy::runtime::rfc3339(unix)
}
