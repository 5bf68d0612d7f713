//! Running code inside another network namespace without moving the caller.
//!
//! `setns(CLONE_NEWNET)` changes only the calling *thread*. We therefore spawn a
//! short-lived thread, move it into the target namespace, run the closure there and
//! let the thread exit. The caller's thread never changes namespace.
//!
//! Sockets and TAP fds keep the namespace they were created in for their whole
//! life, so anything `f` creates (a listening socket, a TAP fd) can be returned and
//! used from any thread afterwards.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use super::sys;

/// Run `f` on a fresh thread that has entered the network namespace at `path`
/// (`/run/netns/NAME` or `/proc/PID/ns/net`), and return its result.
///
/// Errors: opening `path`, spawning the thread, or `setns` itself (for example
/// `EINVAL` when `path` is not a network namespace, `EPERM` without
/// `CAP_SYS_ADMIN`). If `f` panics, the panic is resumed on the calling thread.
pub fn run_in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let ns = File::open(path)?;
    run_in_netns_file(ns, f)
}

/// [`run_in_netns`] with the namespace already opened (so a caller can keep the
/// namespace file and re-enter it later even if its bind mount goes away).
/// `ns` is closed when the thread ends.
pub fn run_in_netns_file<T: Send + 'static>(
    ns: File,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let handle = std::thread::Builder::new()
        .name("tapnat-netns".into())
        .spawn(move || -> io::Result<T> {
            sys::setns_net(ns.as_fd())?;
            drop(ns);
            Ok(f())
        })?;
    match handle.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_path_is_an_error() {
        let err = run_in_netns(Path::new("/nonexistent/tapnat/netns"), || ()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn non_namespace_file_is_rejected() {
        // /proc/self/stat is not a namespace file: setns must refuse it (EINVAL
        // as root; an unprivileged caller may get EPERM first), and the closure
        // must not run.
        let err = run_in_netns(Path::new("/proc/self/stat"), || panic!("closure ran")).unwrap_err();
        assert!(
            matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::EPERM)),
            "{err:?}"
        );
    }

    #[test]
    fn own_namespace_runs_closure() {
        // Entering the namespace we are already in needs CAP_SYS_ADMIN; skip without it.
        match run_in_netns(Path::new("/proc/self/ns/net"), || 42) {
            Ok(v) => assert_eq!(v, 42),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e:?}"),
        }
    }
}
