//! Handing listening sockets from a running process to its successor (`revproxy serve
//! --upgrade`), the way nginx and pingora upgrade: the running process listens on a Unix
//! socket in its state directory ([`SOCKET_NAME`], mode 0600, and only a peer of the same
//! user is answered); the successor connects, asks, and receives every listening socket
//! as a file descriptor (`SCM_RIGHTS`) with a JSON list saying what each one is. Both
//! processes then hold the same sockets, so the kernel's accept queues never close: the
//! old process accepts until the successor says it serves ([`Confirmation::ready`]),
//! then stops, and no connection is refused in between.
//!
//! The exchange, on one Unix stream connection:
//!
//! ```text
//! successor -> running   "revproxy upgrade 1\n"
//! running -> successor   one message: JSON [{"role": ..., "addr": ...}, ...] + the fds
//! successor -> running   "ready\n"   (once it accepts on all of them)
//! running -> successor   "go\n"      (it steps aside now)
//! ```
//!
//! A successor that fails or goes silent changes nothing: the running process keeps
//! serving, and tries again for the next successor. A successor that hears no "go" (the
//! running process gave up on it) stops, so two processes never go on serving side by
//! side. The successor listens under a name of its own until "go", then takes
//! [`SOCKET_NAME`], so a successor that fails leaves the running process upgradable.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The hand-over socket's name in the state directory.
pub const SOCKET_NAME: &str = "upgrade.sock";
/// Time either side allows the other for each step of the exchange before the answer to
/// "ready" (the successor opens its CA and store meanwhile, which [`READY_TIMEOUT`] bounds).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the running process waits for its successor to say it serves.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Most sockets handed over at once: the most the kernel passes in one message. A proxy
/// has its agent port, a QUIC socket per lane (at most 64), admin, the public listeners
/// and the granted ports.
pub const MAX_SOCKETS: usize = 253;
/// Largest description accepted (the JSON list of [`MAX_SOCKETS`] entries fits easily).
const MAX_DESCRIPTION: usize = 64 * 1024;
const REQUEST: &[u8] = b"revproxy upgrade 1\n";
const READY: &[u8] = b"ready\n";
/// Said right after [`READY`] by a successor that forwards the QUIC packets of earlier
/// processes (`tunnel/quic/takeover.rs`); a running process before it reads only
/// [`READY`], and one after it closes its QUIC tunnels the old way without it.
const TAKEOVER: &[u8] = b"quic-takeover\n";
const GO: &[u8] = b"go\n";

/// What a handed-over socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The agent listener (TCP: enrollment and h2 tunnels).
    Agents,
    /// QUIC tunnels (UDP).
    Quic,
    /// The admin listener.
    Admin,
    /// A public listener.
    Public,
}

/// One socket as the running process describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Described {
    pub role: Role,
    pub addr: SocketAddr,
}

/// `agents:127.0.0.1:7443`, `quic:…`, `admin:…`, `public:…`, as logs list them.
impl std::fmt::Display for Described {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let role = match self.role {
            Role::Agents => "agents",
            Role::Quic => "quic",
            Role::Admin => "admin",
            Role::Public => "public",
        };
        write!(f, "{role}:{}", self.addr)
    }
}

/// Why a hand-over could not start or complete.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("no running proxy to take over at {}: {source} (start without --upgrade)", path.display())]
    NotRunning {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another `revproxy serve` is running on this state directory ({}); stop it first, or start this one with --upgrade to take its sockets over", path.display())]
    AlreadyRunning { path: PathBuf },
    #[error("cannot listen for upgrades on {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket hand-over failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the running proxy's hand-over is not one this version reads: {0}")]
    Protocol(String),
    #[error("the running proxy did not step aside (it gave up waiting, or ended)")]
    NotReleased,
}

/// The running process's end: where successors ask for the sockets.
#[derive(Debug)]
pub struct Listener {
    inner: tokio::net::UnixListener,
    path: PathBuf,
    /// The socket file's inode, so that only our own file is removed at the end (a
    /// successor replaces it with its own).
    ino: u64,
}

impl Listener {
    /// Listens on [`SOCKET_NAME`] in `dir` (mode 0600). A socket there that answers means
    /// another process serves this directory: refused. One that does not is left from a
    /// process that died, and is replaced. Needs a tokio runtime.
    pub fn bind(dir: &Path) -> Result<Listener, HandoverError> {
        let path = dir.join(SOCKET_NAME);
        if UnixStream::connect(&path).is_ok() {
            return Err(HandoverError::AlreadyRunning { path });
        }
        Self::listen(path)
    }

    /// Listens in `dir` under a name of this process's own, for a process that takes the
    /// sockets over: [`Listener::take_name`] moves it to [`SOCKET_NAME`] once the running
    /// process has let go.
    pub fn pending(dir: &Path) -> Result<Listener, HandoverError> {
        Self::listen(dir.join(format!("{SOCKET_NAME}.{}", std::process::id())))
    }

    /// Takes [`SOCKET_NAME`] over from the process this one replaced (which keeps its
    /// socket, nameless, until it exits).
    pub fn take_name(&mut self) -> std::io::Result<()> {
        let name = self.path.with_file_name(SOCKET_NAME);
        if self.path != name {
            std::fs::rename(&self.path, &name)?;
            self.path = name;
        }
        Ok(())
    }

    fn listen(path: PathBuf) -> Result<Listener, HandoverError> {
        let bind_error = |source| HandoverError::Bind {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(bind_error(e)),
            _ => {}
        }
        let listener = UnixListener::bind(&path).map_err(bind_error)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_error)?;
        let ino = std::fs::metadata(&path).map_err(bind_error)?.ino();
        listener.set_nonblocking(true).map_err(bind_error)?;
        let inner = tokio::net::UnixListener::from_std(listener).map_err(bind_error)?;
        Ok(Listener { inner, path, ino })
    }

    /// The next successor: a connection from a process of this user (or root) that asks
    /// for the sockets within [`EXCHANGE_TIMEOUT`]. Others are turned away and logged; a
    /// connection that asks nothing (another `serve` checking whether one runs here) is
    /// let go quietly. Not cancel-safe: keep the future across `select!` turns.
    pub async fn accept(&self) -> std::io::Result<Successor> {
        use tokio::io::AsyncReadExt;
        loop {
            let (mut stream, _) = self.inner.accept().await?;
            let pid = match peer_of_this_user(&stream) {
                Ok(pid) => pid,
                Err(refused) => {
                    tracing::warn!(%refused, "an upgrade was asked by another user; refused");
                    continue;
                }
            };
            let mut request = [0u8; REQUEST.len()];
            let asked =
                tokio::time::timeout(EXCHANGE_TIMEOUT, stream.read_exact(&mut request)).await;
            match asked {
                Ok(Ok(_)) if request == REQUEST => {}
                Ok(Ok(_)) => {
                    tracing::warn!(pid, "an unknown upgrade request; refused");
                    continue;
                }
                // Only looking (a `serve` checking for a running proxy), or gone.
                Ok(Err(_)) | Err(_) => {
                    tracing::debug!(pid, "a connection to the upgrade socket asked nothing");
                    continue;
                }
            }
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
            stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
            return Ok(Successor { stream, pid });
        }
    }
}

/// The peer's process id if it runs as this user or root; otherwise who it is, for the
/// log. (Elsewhere than Linux the socket's mode, 0600 in a 0700 directory, is the guard.)
#[cfg(target_os = "linux")]
fn peer_of_this_user(stream: &tokio::net::UnixStream) -> Result<i32, String> {
    let cred = rustix::net::sockopt::socket_peercred(stream).map_err(|e| e.to_string())?;
    let pid = cred.pid.as_raw_nonzero().get();
    if cred.uid == rustix::process::getuid() || cred.uid.is_root() {
        Ok(pid)
    } else {
        Err(format!("uid {} (pid {pid})", cred.uid.as_raw()))
    }
}

#[cfg(not(target_os = "linux"))]
fn peer_of_this_user(_: &tokio::net::UnixStream) -> Result<i32, String> {
    Ok(0)
}

impl Drop for Listener {
    fn drop(&mut self) {
        // A successor's socket has taken the name by now: leave it.
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A process asking for the sockets. Its methods block (within [`EXCHANGE_TIMEOUT`] per
/// step); run them off the async threads.
#[derive(Debug)]
pub struct Successor {
    stream: UnixStream,
    /// Its process id, for the log.
    pub pid: i32,
}

impl Successor {
    /// A second handle on the connection: shutting it down ends a hand-over under way
    /// (its blocking calls return) when the running process stops for another reason.
    pub fn aborter(&self) -> std::io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// Sends `sockets` with their description.
    pub fn hand_over(&mut self, sockets: &[(Described, OwnedFd)]) -> Result<(), HandoverError> {
        if sockets.len() > MAX_SOCKETS {
            return Err(HandoverError::Protocol(format!(
                "{} sockets, more than the {MAX_SOCKETS} one hand-over carries",
                sockets.len()
            )));
        }
        let described: Vec<Described> = sockets.iter().map(|(d, _)| *d).collect();
        let body = serde_json::to_vec(&described).expect("a list of sockets serializes");
        let fds: Vec<_> = sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(HandoverError::Protocol("descriptors do not fit".into()));
        }
        // The length first, so the reader knows when the description is complete; the
        // descriptors ride on the first byte.
        let len = (body.len() as u32).to_be_bytes();
        let sent = rustix::net::sendmsg(
            &self.stream,
            &[IoSlice::new(&len), IoSlice::new(&body)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(std::io::Error::from)?;
        let total = len.len() + body.len();
        if sent < total {
            let mut rest = len.to_vec();
            rest.extend_from_slice(&body);
            self.stream.write_all(&rest[sent..])?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for the successor to say it serves. `Ok(None)`: it closed
    /// the connection or said something else (it failed; the running process goes on).
    /// Then [`Self::go`] lets it serve.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Option<Ready>, HandoverError> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut answer = [0u8; READY.len()];
        match self.stream.read_exact(&mut answer) {
            Ok(()) if answer == READY => {}
            Ok(()) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        // Sent with "ready" in one write, if at all: a moment is plenty.
        self.stream
            .set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut more = [0u8; TAKEOVER.len()];
        let takes_over = self.stream.read_exact(&mut more).is_ok() && more == TAKEOVER;
        Ok(Some(Ready { takes_over }))
    }

    /// Answers "go": from then on the caller must step aside. `false`: the successor did
    /// not hear it (it failed; the running process goes on).
    pub fn go(&mut self) -> bool {
        self.stream.write_all(GO).is_ok()
    }
}

/// What a successor said with "ready".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    /// It forwards the QUIC packets of this process's tunnels to it.
    pub takes_over: bool,
}

/// The successor's end: the sockets received, until it has taken what it needs.
#[derive(Debug)]
pub struct Inherited {
    sockets: Vec<(Described, Option<OwnedFd>)>,
    stream: UnixStream,
}

/// Asks the process serving the state directory `dir` for its listening sockets. Blocks
/// (within [`EXCHANGE_TIMEOUT`] per step).
pub fn take_over(dir: &Path) -> Result<Inherited, HandoverError> {
    let path = dir.join(SOCKET_NAME);
    let stream = UnixStream::connect(&path).map_err(|source| HandoverError::NotRunning {
        path: path.clone(),
        source,
    })?;
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
    (&stream).write_all(REQUEST)?;
    let mut len = [0u8; 4];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut len)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if got.bytes == 0 {
        return Err(HandoverError::Protocol(
            "the running proxy closed the connection without an answer".into(),
        ));
    }
    if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(HandoverError::Protocol(format!(
            "more than {MAX_SOCKETS} sockets were sent"
        )));
    }
    (&stream).read_exact(&mut len[got.bytes..])?;
    let body_len = u32::from_be_bytes(len) as usize;
    if body_len > MAX_DESCRIPTION {
        return Err(HandoverError::Protocol(format!(
            "a description of {body_len} bytes"
        )));
    }
    let mut body = vec![0u8; body_len];
    (&stream).read_exact(&mut body)?;
    let described: Vec<Described> =
        serde_json::from_slice(&body).map_err(|e| HandoverError::Protocol(e.to_string()))?;
    if described.len() != fds.len() {
        return Err(HandoverError::Protocol(format!(
            "{} sockets described, {} received",
            described.len(),
            fds.len()
        )));
    }
    Ok(Inherited {
        sockets: described
            .into_iter()
            .zip(fds.into_iter().map(Some))
            .collect(),
        stream,
    })
}

/// Whether a socket described at `have` serves a wish for `want`: the same address, or
/// (for a wish with port 0, "any port") the same IP.
fn serves(have: SocketAddr, want: SocketAddr) -> bool {
    have == want || (want.port() == 0 && have.ip() == want.ip())
}

impl Inherited {
    /// What was received, for the log.
    pub fn described(&self) -> Vec<Described> {
        self.sockets.iter().map(|(d, _)| *d).collect()
    }

    fn take(&mut self, role: Role, want: SocketAddr) -> Option<OwnedFd> {
        self.sockets
            .iter_mut()
            .find(|(d, fd)| fd.is_some() && d.role == role && serves(d.addr, want))
            .and_then(|(_, fd)| fd.take())
    }

    /// The TCP listener for `role` at `want`, if one was handed over; checked to be one
    /// listening there.
    pub fn tcp(
        &mut self,
        role: Role,
        want: SocketAddr,
    ) -> std::io::Result<Option<std::net::TcpListener>> {
        let Some(fd) = self.take(role, want) else {
            return Ok(None);
        };
        let listener = std::net::TcpListener::from(fd);
        let at = listener.local_addr()?;
        if !serves(at, want) {
            return Err(std::io::Error::other(format!(
                "the socket handed over for {want} listens on {at}"
            )));
        }
        listener.set_nonblocking(true)?;
        Ok(Some(listener))
    }

    /// The next UDP socket for QUIC at `want`, if one more was handed over: the QUIC
    /// port's group comes in its order, one socket per call.
    pub fn udp(&mut self, want: SocketAddr) -> std::io::Result<Option<std::net::UdpSocket>> {
        let Some(fd) = self.take(Role::Quic, want) else {
            return Ok(None);
        };
        let socket = std::net::UdpSocket::from(fd);
        let at = socket.local_addr()?;
        if !serves(at, want) {
            return Err(std::io::Error::other(format!(
                "the socket handed over for udp {want} is bound to {at}"
            )));
        }
        Ok(Some(socket))
    }

    /// Closes what was not taken (listeners the configuration no longer has) and returns
    /// the way to tell the running process that this one serves.
    pub fn finish(self) -> (Confirmation, Vec<Described>) {
        let unused = (self.sockets.into_iter())
            .filter(|(_, fd)| fd.is_some())
            .map(|(d, _)| d)
            .collect();
        (Confirmation(self.stream), unused)
    }
}

/// Tells the running process that its successor serves.
#[derive(Debug)]
pub struct Confirmation(UnixStream);

impl Confirmation {
    /// Says "ready" (and that it forwards the QUIC packets of the running process's
    /// tunnels, if `takes_over`) and waits (within [`EXCHANGE_TIMEOUT`]) for "go": the
    /// running process stops accepting and moves its agents here. Any other outcome means
    /// it did not let go, and this process must not go on serving. Blocks.
    pub fn ready(mut self, takes_over: bool) -> Result<(), HandoverError> {
        let said = match takes_over {
            true => [READY, TAKEOVER].concat(),
            false => READY.to_vec(),
        };
        self.0.write_all(&said)?;
        let mut answer = [0u8; GO.len()];
        match self.0.read_exact(&mut answer) {
            Ok(()) if answer == GO => Ok(()),
            _ => Err(HandoverError::NotReleased),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listening_sockets_cross_to_a_successor_and_keep_their_queue() {
        let dir = tempfile::tempdir().unwrap();
        let listener = Listener::bind(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(SOCKET_NAME))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_addr = udp.local_addr().unwrap();
        // A client queued before the hand-over is accepted after it.
        let mut early = std::net::TcpStream::connect(tcp_addr).unwrap();
        early.write_all(b"queued").unwrap();

        let dir_path = dir.path().to_path_buf();
        let successor = std::thread::spawn(move || {
            let mut inherited = take_over(&dir_path).unwrap();
            let listener = inherited
                .tcp(Role::Public, "127.0.0.1:0".parse().unwrap())
                .unwrap()
                .expect("the public listener");
            let socket = inherited.udp(udp_addr).unwrap().expect("the UDP socket");
            assert!(inherited.tcp(Role::Agents, tcp_addr).unwrap().is_none());
            let (confirm, unused) = inherited.finish();
            assert!(unused.is_empty());
            confirm.ready(true).unwrap();
            (listener, socket)
        });
        let mut asked = listener.accept().await.unwrap();
        let sockets = vec![
            (
                Described {
                    role: Role::Public,
                    addr: tcp_addr,
                },
                tcp.as_fd().try_clone_to_owned().unwrap(),
            ),
            (
                Described {
                    role: Role::Quic,
                    addr: udp_addr,
                },
                udp.as_fd().try_clone_to_owned().unwrap(),
            ),
        ];
        let ready = tokio::task::spawn_blocking(move || {
            asked.hand_over(&sockets)?;
            let ready = asked.wait_ready(Duration::from_secs(10))?;
            Ok::<_, HandoverError>((ready, asked.go()))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(ready, (Some(Ready { takes_over: true }), true));
        let (taken, socket) = successor.join().unwrap();
        drop(tcp); // the old process's copy goes; the successor's still listens
        taken.set_nonblocking(false).unwrap();
        let (mut conn, _) = taken.accept().unwrap();
        let mut got = [0u8; 6];
        conn.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"queued");
        assert_eq!(socket.local_addr().unwrap(), udp_addr);
        assert!(matches!(
            Listener::bind(dir.path()),
            Err(HandoverError::AlreadyRunning { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_look_is_no_request_and_the_name_moves_only_once_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let running = Listener::bind(dir.path()).unwrap();
        // `serve` checking whether one runs here: connects and goes.
        drop(UnixStream::connect(dir.path().join(SOCKET_NAME)).unwrap());
        let path = dir.path().to_path_buf();
        let successor = std::thread::spawn(move || {
            let (confirm, unused) = take_over(&path).unwrap().finish();
            assert_eq!(unused.len(), 1, "a socket it did not take is closed");
            confirm.ready(false)
        });
        let mut asked = running.accept().await.unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sockets = vec![(
            Described {
                role: Role::Public,
                addr: tcp.local_addr().unwrap(),
            },
            tcp.as_fd().try_clone_to_owned().unwrap(),
        )];
        let let_go = tokio::task::spawn_blocking(move || {
            asked.hand_over(&sockets)?;
            let ready = asked.wait_ready(Duration::from_secs(10))?;
            Ok::<_, HandoverError>(ready == Some(Ready { takes_over: false }) && asked.go())
        })
        .await
        .unwrap()
        .unwrap();
        assert!(let_go);
        successor.join().unwrap().expect("told to go");

        // The successor listens under its own name until then, and takes the name after.
        let mut next = Listener::pending(dir.path()).unwrap();
        let own = dir
            .path()
            .join(format!("{SOCKET_NAME}.{}", std::process::id()));
        assert!(own.exists());
        next.take_name().unwrap();
        assert!(!own.exists());
        drop(running);
        assert!(
            dir.path().join(SOCKET_NAME).exists(),
            "the old process leaves the new one's socket"
        );
        drop(next);
        assert!(!dir.path().join(SOCKET_NAME).exists());
    }

    #[test]
    fn without_a_running_process_there_is_nothing_to_take_over() {
        let dir = tempfile::tempdir().unwrap();
        let err = take_over(dir.path()).unwrap_err();
        assert!(matches!(err, HandoverError::NotRunning { .. }), "{err}");
        assert!(err.to_string().contains("without --upgrade"), "{err}");
    }

    #[tokio::test]
    async fn a_stale_socket_from_a_dead_process_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        drop(UnixListener::bind(dir.path().join(SOCKET_NAME)).unwrap());
        let listener = Listener::bind(dir.path()).unwrap();
        drop(listener);
        assert!(
            !dir.path().join(SOCKET_NAME).exists(),
            "removed when the process ends"
        );
    }
}
