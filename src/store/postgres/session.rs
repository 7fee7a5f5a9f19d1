//! One store call on a synchronous thread: [`Session::wait`] runs each query on the
//! store's runtime and waits for it, within the call's deadline, so that a change written
//! as plain code ([`Tx`](revproxy_ca::records::Tx)) reads and writes rows one query at a
//! time. After a query fails, the session refuses the rest at once and the connection is
//! made again for the next call.

use std::future::Future;

use revproxy_ca::CaError;
use tokio::time::Instant;

use super::{pg_reason, OP_TIMEOUT};

/// Why a query gave no answer: the database's error, or a record it holds that does not
/// parse.
pub(super) enum Fault {
    Pg(tokio_postgres::Error),
    Corrupt(String),
}

impl From<tokio_postgres::Error> for Fault {
    fn from(e: tokio_postgres::Error) -> Self {
        Fault::Pg(e)
    }
}

/// The queries of one call, on one connection.
pub(super) struct Session {
    runtime: tokio::runtime::Handle,
    deadline: Instant,
    /// The store, as messages name it.
    described: String,
    /// Why the connection is no longer usable, once a query failed or timed out.
    pub(super) failed: Option<String>,
}

impl Session {
    pub(super) fn new(runtime: tokio::runtime::Handle, described: String) -> Session {
        Session {
            runtime,
            deadline: Instant::now() + OP_TIMEOUT,
            described,
            failed: None,
        }
    }

    /// Gives the queries from now on `time` in all, in place of what was left.
    pub(super) fn allow(&mut self, time: std::time::Duration) {
        self.deadline = Instant::now() + time;
    }

    /// Runs `query` on the store's runtime and waits for its answer, at most until the
    /// call's deadline. The caller's thread must not be one of a runtime's.
    pub(super) fn wait<T, E: Into<Fault>>(
        &mut self,
        query: impl Future<Output = Result<T, E>>,
    ) -> Result<T, CaError> {
        if let Some(reason) = &self.failed {
            return Err(self.unavailable(reason.clone()));
        }
        let deadline = self.deadline;
        let answer = self
            .runtime
            .block_on(async { tokio::time::timeout_at(deadline, query).await });
        match answer {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.fault(e.into())),
            Err(_) => {
                let reason = format!("no answer within {} s", OP_TIMEOUT.as_secs());
                self.failed = Some(reason.clone());
                Err(self.unavailable(reason))
            }
        }
    }

    /// What `fault` means to the caller; a database error also ends the session.
    pub(super) fn fault(&mut self, fault: Fault) -> CaError {
        match fault {
            Fault::Corrupt(reason) => CaError::CorruptState {
                path: self.described.clone().into(),
                reason,
            },
            Fault::Pg(e) => {
                let reason = pg_reason(&e);
                self.failed = Some(reason.clone());
                self.unavailable(reason)
            }
        }
    }

    fn unavailable(&self, reason: String) -> CaError {
        CaError::StoreUnavailable {
            store: self.described.clone(),
            reason,
        }
    }
}
