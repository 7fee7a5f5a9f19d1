//! `revproxy status`: a running proxy's status from its admin listener, as a report or JSON.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use revproxy::admin::client::{self, Target};

use crate::Failure;

#[derive(Args)]
pub(crate) struct StatusArgs {
    /// The proxy's admin listener: HOST:PORT, or https://HOST:PORT with --operator
    #[arg(long, value_name = "ADDR", default_value_t = revproxy::config::DEFAULT_ADMIN.to_string())]
    admin: String,
    /// Directory with an operator certificate (from `revproxy operator create`), for
    /// an https:// admin listener
    #[arg(long, value_name = "DIR")]
    operator: Option<PathBuf>,
    /// Print the status document as JSON, for scripts
    #[arg(long)]
    json: bool,
}

impl StatusArgs {
    pub(crate) fn run(self) -> Result<(), Failure> {
        let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
        let target = Target::new(&self.admin, self.operator.as_deref()).map_err(Failure::usage)?;
        print!(
            "{}",
            runtime.block_on(client::status_text(&target, self.json))?
        );
        Ok(())
    }
}
