//! Device queues whose bursts go through io_uring: the reads of a burst are
//! submitted together and so are its writes, one `io_uring_enter` for each
//! instead of a `read(2)` or `write(2)` per frame. [`Ring`] is the batch
//! itself, for any queue read and written a frame per `read`/`write` (a TAP
//! queue, a raw uplink's packet socket); [`UringTap`] is a TAP queue with one.
//!
//! [`UringTap::new`] sets up a ring for one queue; when the kernel has no
//! io_uring (too old, disabled by `kernel.io_uring_disabled`, refused by a
//! seccomp filter) it hands the [`Tap`] back and the caller uses it with
//! plain `read(2)`/`write(2)`, as before.
//!
//! The TAP's fd stays non-blocking, so a read of an empty queue completes at
//! once with `EAGAIN` inside the same `io_uring_enter`, as `read(2)` would:
//! a burst of `n` reads on a queue holding `k < n` frames returns the `k`
//! frames, in order, and `n - k` empty reads. Multishot reads into a ring of
//! provided buffers would avoid the empty reads, but they fill buffers the
//! kernel picks, and the workers read into their own pool buffers; not done.
//!
//! Only the worker that owns the queue batches, and only bursts: a lone
//! frame costs less through `read(2)`/`write(2)` than through a batch, so
//! the worker reads frame by frame after a read that found at most one and
//! writes a lone frame directly; the control thread's frames and ICMP
//! errors always use `write(2)`. The ring is behind a mutex for `Sync`;
//! only its worker takes it.
use std::io;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use super::io::FrameIo;
use super::sys;
use super::tap::Tap;

/// Submission slots per ring: a whole read burst, or a write burst, in one
/// `io_uring_enter`.
pub const RING_ENTRIES: u32 = 64;

/// An io_uring for the bursts of one device queue (a TAP queue, a raw
/// uplink's packet socket): reads and writes of whole frames, a burst per
/// `io_uring_enter`. Behind a mutex for `Sync`; only the queue's worker
/// takes it.
pub struct Ring {
    ring: Mutex<io_uring::IoUring>,
    /// Results of the last batch, kept to avoid an allocation per burst.
    res: Mutex<Vec<i32>>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ring")
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ring {
    /// A ring of `entries` (a power of two; the kernel refuses 0 and more
    /// than 32768), restricted to reads and writes; an error where the
    /// kernel has no io_uring or refuses it.
    pub fn new(entries: u32) -> io::Result<Ring> {
        Ok(Ring {
            ring: Mutex::new(sys::uring_new(entries)?),
            res: Mutex::new(Vec::new()),
        })
    }

    /// Reads one frame from `fd` into each of `bufs` (the contract of
    /// [`FrameIo::read_batch`]): the number of frames read and the first
    /// error any read of the batch met (`WouldBlock` for an empty queue).
    pub fn read_batch(
        &self,
        fd: BorrowedFd<'_>,
        bufs: &mut [&mut [u8]],
        lens: &mut [usize],
    ) -> (usize, Option<io::Error>) {
        let mut res = lock(&self.res);
        res.clear();
        res.resize(bufs.len(), 0);
        sys::uring_read_batch(&mut lock(&self.ring), fd, bufs, &mut res);
        // The reads ran one after another while frames kept coming: an empty
        // one can be followed by one that found a frame, so each counts.
        let mut frames = 0;
        let mut first_err = None;
        for (i, &r) in res.iter().enumerate() {
            match result(r) {
                Ok(n) if n > 0 => {
                    lens[i] = n;
                    frames += 1;
                }
                Ok(_) => lens[i] = 0,
                Err(e) => {
                    lens[i] = 0;
                    first_err.get_or_insert(e);
                }
            }
        }
        (frames, first_err)
    }

    /// Writes each of `frames` whole to `fd`; how many were.
    pub fn write_batch(&self, fd: BorrowedFd<'_>, frames: &[&[u8]]) -> usize {
        let mut res = lock(&self.res);
        res.clear();
        res.resize(frames.len(), 0);
        sys::uring_write_batch(&mut lock(&self.ring), fd, frames, &mut res);
        res.iter()
            .zip(frames)
            .filter(|(&r, f)| result(r).is_ok_and(|n| n == f.len()))
            .count()
    }
}

/// One TAP queue with its own io_uring.
#[derive(Debug)]
pub struct UringTap {
    tap: Tap,
    ring: Ring,
}

impl UringTap {
    /// `tap` with a ring of [`RING_ENTRIES`], or `tap` back with the reason
    /// io_uring could not be set up.
    pub fn new(tap: Tap) -> Result<UringTap, (Tap, io::Error)> {
        UringTap::with_entries(tap, RING_ENTRIES)
    }

    /// [`UringTap::new`] with a ring of `entries` (see [`Ring::new`]).
    pub fn with_entries(tap: Tap, entries: u32) -> Result<UringTap, (Tap, io::Error)> {
        match Ring::new(entries) {
            Ok(ring) => Ok(UringTap { tap, ring }),
            Err(e) => Err((tap, e)),
        }
    }

    /// The queue underneath.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }
}

/// A completion result as `read(2)`/`write(2)` would have returned it.
fn result(r: i32) -> io::Result<usize> {
    usize::try_from(r).map_err(|_| io::Error::from_raw_os_error(-r))
}

impl FrameIo for UringTap {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.tap.recv(buf)
    }
    fn write(&self, frame: &[u8]) -> io::Result<()> {
        self.tap.send(frame)
    }
    fn poll_fd(&self) -> RawFd {
        self.tap.poll_fd()
    }
    fn batches(&self) -> bool {
        true
    }
    fn read_batch(&self, bufs: &mut [&mut [u8]], lens: &mut [usize]) -> io::Result<usize> {
        match self.ring.read_batch(self.tap.as_fd(), bufs, lens) {
            (0, Some(e)) => Err(e),
            (n, _) => Ok(n),
        }
    }
    fn write_batch(&self, frames: &[&[u8]]) -> usize {
        self.ring.write_batch(self.tap.as_fd(), frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_map_to_errors() {
        assert_eq!(result(60).unwrap(), 60);
        assert_eq!(
            result(-libc::EAGAIN).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(
            result(-libc::EBADF).unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
    }
}
