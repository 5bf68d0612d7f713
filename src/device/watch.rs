//! Noticing that a device's network namespace was deleted.
//!
//! A TAP's queues pin the namespace they were opened in (each tun socket
//! holds a reference to it), so `ip netns del` — the usual end of a sandbox
//! — removes only the namespace's name: the namespace, and the TAP in it,
//! live on unreachable, and the queues report nothing (measured: no
//! `POLLERR`, no read error). Like pasta, we watch the directory that holds
//! the namespace's bind mount (`/run/netns`) with inotify, and take the
//! disappearance of the name as the end of the device. Paths under `/proc`
//! (`/proc/PID/ns/net`) cannot be watched this way and are not watched.
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use super::sys;

/// Watches some namespace paths for removal.
#[derive(Debug)]
pub struct NetnsWatch {
    fd: OwnedFd,
    /// The watched paths, by the caller's index.
    paths: Vec<(usize, PathBuf)>,
}

impl NetnsWatch {
    /// Watches each `(index, path)` (a path under `/proc` is skipped);
    /// `None` when there is nothing to watch.
    pub fn new(paths: &[(usize, &Path)]) -> io::Result<Option<NetnsWatch>> {
        let paths: Vec<(usize, PathBuf)> = paths
            .iter()
            .filter(|(_, p)| !p.starts_with("/proc") && p.parent().is_some())
            .map(|(i, p)| (*i, p.to_path_buf()))
            .collect();
        if paths.is_empty() {
            return Ok(None);
        }
        let fd = sys::inotify_nonblocking()?;
        for (_, p) in &paths {
            if let Some(dir) = p.parent() {
                sys::inotify_add_watch(fd.as_fd(), dir, libc::IN_DELETE | libc::IN_MOVED_FROM)?;
            }
        }
        Ok(Some(NetnsWatch { fd, paths }))
    }

    /// An fd that poll(2) reports readable when something in a watched
    /// directory was removed.
    pub fn poll_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Drains the pending events and returns the index of the first watched
    /// path that no longer exists.
    pub fn gone(&self) -> Option<usize> {
        let mut buf = [0u8; 4096];
        while matches!(sys::read(self.fd.as_fd(), &mut buf), Ok(n) if n > 0) {}
        self.paths
            .iter()
            .find(|(_, p)| !p.exists())
            .map(|(i, _)| *i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_removed_path_is_reported_and_a_kept_one_is_not() {
        let dir = std::env::temp_dir().join(format!("tapnat-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, "").unwrap();
        std::fs::write(&b, "").unwrap();
        let w = NetnsWatch::new(&[(0, &a), (1, &b)]).unwrap().unwrap();
        let mut poller = super::super::Poller::new();
        let slot = poller.add(w.poll_fd());
        assert_eq!(poller.wait(Some(Duration::ZERO)).unwrap(), 0);
        assert_eq!(w.gone(), None);
        std::fs::remove_file(&b).unwrap();
        assert_eq!(poller.wait(Some(Duration::from_secs(1))).unwrap(), 1);
        assert!(poller.readable(slot));
        assert_eq!(w.gone(), Some(1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn proc_paths_are_not_watched() {
        let w = NetnsWatch::new(&[(0, Path::new("/proc/1/ns/net"))]).unwrap();
        assert!(w.is_none());
    }
}
