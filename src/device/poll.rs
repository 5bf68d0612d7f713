//! A thin wrapper over poll(2) on a fixed set of fds, and an eventfd [`Waker`].
//!
//! The set is small and fixed at startup (one or two TAP queues and a waker per
//! worker), so poll(2) costs no more than epoll here and needs no registration state
//! in the kernel. The [`Poller`] does not own the fds it watches: the caller must
//! keep them open while they are registered. A closed fd shows up as `POLLNVAL`,
//! which [`Poller::readable`] reports as readable so the caller's read fails with
//! `EBADF` instead of the loop spinning.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use super::sys;

/// The events that make [`Poller::readable`] true.
const READY: libc::c_short = libc::POLLIN | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;

/// A fixed set of fds polled for `POLLIN`.
#[derive(Debug, Default)]
pub struct Poller {
    fds: Vec<libc::pollfd>,
}

impl Poller {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Watch `fd` for input; returns its slot index for [`Poller::readable`].
    /// The fd is borrowed, not owned: keep it open while the poller is in use.
    pub fn add(&mut self, fd: RawFd) -> usize {
        self.fds.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        self.fds.len() - 1
    }

    /// Block until some fd is ready or `timeout` passes (`None`: no timeout).
    /// Returns how many slots are ready; `Ok(0)` on timeout or when a signal
    /// interrupted the wait (`EINTR`), so the caller can check its shutdown flag.
    /// A timeout is rounded up to whole milliseconds, so a non-zero timeout never
    /// turns into a busy poll.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        let timeout_ms = match timeout {
            None => -1,
            Some(d) => {
                let ms = d.as_nanos().div_ceil(1_000_000);
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        };
        for p in &mut self.fds {
            p.revents = 0;
        }
        match sys::poll(&mut self.fds, timeout_ms) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                for p in &mut self.fds {
                    p.revents = 0;
                }
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the last [`Poller::wait`] found `slot` readable, in error, hung up,
    /// or closed (`POLLIN | POLLERR | POLLHUP | POLLNVAL`).
    ///
    /// # Panics
    /// If `slot` was not returned by [`Poller::add`].
    pub fn readable(&self, slot: usize) -> bool {
        self.fds[slot].revents & READY != 0
    }

    /// How many fds are registered.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether no fd is registered.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

/// An eventfd used to wake a thread blocked in [`Poller::wait`] from another thread.
///
/// Register [`Waker::as_raw_fd`] in the poller; after a wakeup, call
/// [`Waker::drain`] so the next wait blocks again. Several `wake` calls before a
/// `drain` coalesce into one wakeup.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// A new non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            fd: sys::eventfd_nonblocking()?,
        })
    }

    /// Make the eventfd readable. Never blocks; a failure can only mean the
    /// counter is saturated (`EAGAIN`), which means it is already readable, so
    /// errors are ignored.
    pub fn wake(&self) {
        let _ = sys::write(self.fd.as_fd(), &1u64.to_ne_bytes());
    }

    /// Reset the eventfd to not readable. One read clears the whole counter.
    pub fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = sys::read(self.fd.as_fd(), &mut buf);
    }

    /// The raw eventfd, for [`Poller::add`].
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Waker {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn waker_is_send_sync() {
        assert_send_sync::<Waker>();
    }

    #[test]
    fn timeout_expires_with_nothing_ready() {
        let waker = Waker::new().unwrap();
        let mut poller = Poller::new();
        let slot = poller.add(waker.as_raw_fd());
        let start = Instant::now();
        assert_eq!(poller.wait(Some(Duration::from_millis(30))).unwrap(), 0);
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(!poller.readable(slot));
    }

    #[test]
    fn sub_millisecond_timeout_rounds_up() {
        let mut poller = Poller::new();
        let start = Instant::now();
        assert_eq!(poller.wait(Some(Duration::from_micros(10))).unwrap(), 0);
        assert!(start.elapsed() >= Duration::from_millis(1));
    }

    #[test]
    fn wake_then_drain() {
        let waker = Waker::new().unwrap();
        let other = Waker::new().unwrap();
        let mut poller = Poller::new();
        let a = poller.add(other.as_raw_fd());
        let b = poller.add(waker.as_raw_fd());
        waker.wake();
        waker.wake();
        assert_eq!(poller.wait(Some(Duration::ZERO)).unwrap(), 1);
        assert!(!poller.readable(a));
        assert!(poller.readable(b));
        waker.drain();
        assert_eq!(poller.wait(Some(Duration::ZERO)).unwrap(), 0);
        assert!(!poller.readable(b));
    }
}
