//! Telling systemd how the service is doing (`sd_notify`, `Type=notify`): `READY=1` once
//! every listener accepts, and from a process that took the sockets over (`serve
//! --upgrade`) also `MAINPID=`, so that systemd follows the new process while the old one
//! drains and exits. Without `$NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Says the service is ready; `main` also names this process as the service's main one.
pub(crate) fn ready(main: bool) {
    let message = match main {
        true => format!("MAINPID={}\nREADY=1\n", std::process::id()),
        false => "READY=1\n".to_string(),
    };
    if let Err(e) = send(&message) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

fn send(message: &str) -> std::io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => send_abstract(&socket, name, message)?,
        None => {
            socket.send_to(message.as_bytes(), &path)?;
        }
    }
    Ok(())
}

/// To an abstract socket name (Linux only).
#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &[u8], message: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(message.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &str) -> std::io::Result<()> {
    Err(std::io::Error::other("abstract socket names need Linux"))
}
