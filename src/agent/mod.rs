//! The agent: enrollment now; the tunnel client and backend forwarding build on the
//! identity stored here.

mod enroll;
mod identity;
pub mod renew;
mod run;

pub use enroll::{enroll, EnrollClientError};
pub use identity::{
    Identity, IdentityError, AGENT_CERT_FILE, AGENT_INFO_FILE, AGENT_KEY_FILE, CA_CERT_FILE,
};
pub use run::{Agent, AgentBuilder, AgentError, ServiceMap, Transport};
