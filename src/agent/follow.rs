//! Following the state directory: `revproxy-agent enroll` run into the directory of a
//! running agent (after a revocation, say) gives it a new identity, and the agent moves to
//! it without a restart, the way it moves to a renewed certificate: the new identity is
//! published on the same watch channel, each supervisor opens a tunnel with it and retires
//! the old one once the new one is up.
//!
//! The agent looks at the files' metadata every [`IDENTITY_CHECK`]; a change is read only
//! when the set is settled: no save under way (its commit journal absent), the same
//! metadata before and after the read, and a certificate that is for the key and signed
//! by the CA beside it. Otherwise it looks again next time.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use revproxy_ca::fsutil;
use tokio::sync::watch;
use tracing::{info, warn};

use super::identity::{Identity, AGENT_CERT_FILE, AGENT_INFO_FILE, AGENT_KEY_FILE, CA_CERT_FILE};

/// How often a running agent looks for a new identity in its state directory: a
/// re-enrolled agent is back within seconds, and a look is four `stat` calls.
pub const IDENTITY_CHECK: Duration = Duration::from_secs(2);

/// What a file looked like: inode, length and modification time (`None`: absent). An
/// atomic replacement changes the inode, so a rewrite within one timestamp tick shows too.
type Look = Option<(u64, u64, Option<SystemTime>)>;

/// The identity files' and the save journal's [`Look`]s. A save renames each file into
/// place after writing the journal and removes the journal last, so two equal looks
/// without a journal bracket a read no save was part of.
fn look(dir: &Path) -> [Look; 5] {
    use std::os::unix::fs::MetadataExt;
    [
        AGENT_KEY_FILE,
        AGENT_CERT_FILE,
        CA_CERT_FILE,
        AGENT_INFO_FILE,
        fsutil::COMMIT_FILE,
    ]
    .map(|name| {
        let meta = std::fs::metadata(dir.join(name)).ok()?;
        Some((meta.ino(), meta.len(), meta.modified().ok()))
    })
}

/// Publishes each new, settled identity found in `dir` on `identity`; runs until dropped.
pub(super) async fn follow_state_dir(
    identity: &watch::Sender<Arc<Identity>>,
    dir: &Path,
    every: Duration,
) {
    let mut seen = look(dir);
    loop {
        tokio::time::sleep(every).await;
        let before = look(dir);
        if before == seen || before[4].is_some() {
            continue; // nothing new, or a save under way
        }
        let read = Identity::read(dir);
        if look(dir) != before {
            continue; // changed while read: next time
        }
        seen = before;
        // Settled (no rename between the two looks), so a mismatch is not a torn read.
        let new = match read {
            Ok(new) if new.is_consistent() => new,
            Ok(_) => {
                warn!(dir = %dir.display(), "the state directory changed but its key, certificate and CA do not belong together; keeping the current identity");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "the state directory changed but holds no usable identity; keeping the current one");
                continue;
            }
        };
        let moved = identity.send_if_modified(|current| {
            if current.cert_pem == new.cert_pem {
                return false; // this agent's own renewal, already in use
            }
            *current = Arc::new(new.clone());
            true
        });
        if moved {
            info!(
                identity = %new.identity,
                hosts = %crate::runtime::logging::list(&new.hosts),
                valid_until = %crate::runtime::rfc3339(new.not_after),
                "a new identity was enrolled into the state directory; moving the tunnels to it"
            );
        }
    }
}
