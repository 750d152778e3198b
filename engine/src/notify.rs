//! systemd's readiness protocol (`sd_notify`) for the services: `hb daemon` and `hb proxy` under
//! `Type=notify` say `READY=1` once they listen and `STOPPING=1` as they stop.
//!
//! The socket's address is taken out of the environment at start, before any thread exists, so
//! no child inherits it: the daemon's mount servers must not speak for it, and runc, seeing
//! `NOTIFY_SOCKET`, would wait for a container's own readiness message. (The `sd-notify` crate
//! reads the variable at each call, and unsetting it later, with threads running, is unsound:
//! hence these few lines.)

use std::ffi::OsString;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;

static SOCKET: OnceLock<OsString> = OnceLock::new();

/// Takes `NOTIFY_SOCKET` out of the environment. Call while the process is single-threaded.
pub fn adopt() {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) {
        std::env::remove_var("NOTIFY_SOCKET");
        let _ = SOCKET.set(path);
    }
}

/// `READY=1` with a status line for `systemctl status`.
pub fn ready(status: &str) {
    send(&format!("READY=1\nMAINPID={}\nSTATUS={}\n", std::process::id(), one_line(status)));
}

/// `STOPPING=1`.
pub fn stopping() {
    send("STOPPING=1\n");
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// Best effort: a service manager that went away is no reason to stop serving.
fn send(msg: &str) {
    let Some(path) = SOCKET.get() else { return };
    let sent = address(path).and_then(|addr| UnixDatagram::unbound()?.send_to_addr(msg.as_bytes(), &addr));
    if let Err(e) = sent {
        tracing::warn!(socket = ?path, error = %e, "cannot notify the service manager");
    }
}

/// A path, or an abstract name written `@name`.
fn address(path: &OsString) -> std::io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abstract_and_path_addresses() {
        use std::os::linux::net::SocketAddrExt;
        let a = address(&OsString::from("@/org/freedesktop/systemd1/notify/1")).unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"/org/freedesktop/systemd1/notify/1"[..]));
        let p = address(&OsString::from("/run/systemd/notify")).unwrap();
        assert_eq!(p.as_pathname(), Some(std::path::Path::new("/run/systemd/notify")));
    }
}
