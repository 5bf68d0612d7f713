//! The control socket: a Unix stream socket on which a running gateway
//! answers `flows` (like `conntrack -L`) and `stats` (like
//! `iptables -L -n -v`), one request line per connection, with the same
//! text that `tapnat flows` / `tapnat stats` print.
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::gateway::Observer;

/// Where `tapnat run` listens and `tapnat flows|stats` ask by default.
pub const DEFAULT_PATH: &str = "/run/tapnat.sock";

/// A listening control socket; the socket file is removed on drop.
pub struct ControlSocket {
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path` (replacing a stale socket file nobody answers on) and
    /// serves requests on a background thread for as long as the process runs.
    pub fn serve(path: &Path, observer: Observer) -> io::Result<ControlSocket> {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another tapnat answers on {}", path.display()),
            ));
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::thread::Builder::new()
            .name("tapnat-control".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let _ = answer(conn, &observer);
                }
            })?;
        Ok(ControlSocket {
            path: path.to_owned(),
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn answer(mut conn: UnixStream, observer: &Observer) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&conn).take(64).read_line(&mut line)?;
    let text = match line.trim() {
        "flows" => crate::ops::report::flows(&observer.flows()),
        "stats" => crate::ops::report::stats(&observer.stats()),
        other => format!("error: unknown request `{other}` (flows, stats)\n"),
    };
    conn.write_all(text.as_bytes())
}

/// Asks the gateway listening on `path` for `what` ("flows" or "stats").
pub fn ask(path: &Path, what: &str) -> io::Result<String> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("no tapnat answers on {}: {e}", path.display()),
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(conn, "{what}")?;
    let mut out = String::new();
    conn.read_to_string(&mut out)?;
    Ok(out)
}
