//! The frame-I/O seam between the workers and a device.
//!
//! A worker knows a device only as a [`FrameIo`]: read one frame, write one
//! frame, and an fd for poll(2) that is readable while frames may be
//! waiting. The TAP queue ([`super::Tap`]) implements it today; another kind
//! of device (an AF_PACKET uplink) is another implementation, not a fork of
//! the worker. `mem::MemDevice` (tests and the `lab` feature) keeps
//! frames in memory so the worker runs without devices or root.
//!
//! Contract: a frame is read and written whole, preceded by a virtio-net
//! header when the device was opened with one (the caller knows which);
//! `read` returns `ErrorKind::WouldBlock` when nothing is queued and never
//! blocks; `write` never blocks (a full device drops, as a TAP does). Both
//! take `&self`: one queue is shared by its worker and the control thread.
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use super::tap::Tap;

/// Whole frames in and out of one device queue.
pub trait FrameIo: Send + Sync {
    /// Reads one frame into `buf`, returning its length (truncated to
    /// `buf.len()`); `ErrorKind::WouldBlock` when none is queued.
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one whole frame.
    fn write(&self, frame: &[u8]) -> io::Result<()>;
    /// An fd that poll(2) reports readable while frames may be queued; it
    /// stays open as long as the device.
    fn poll_fd(&self) -> RawFd;
    /// Whether [`FrameIo::read_batch`] and [`FrameIo::write_batch`] cost
    /// less than a `read`/`write` per frame, so that the worker should
    /// gather a burst's frames and hand them over together.
    fn batches(&self) -> bool {
        false
    }
    /// Reads up to `bufs.len()` frames, at most one into each buffer, in
    /// the order of the buffers; `lens[i]` is the length of the frame in
    /// `bufs[i]`, 0 when that buffer got none (an empty queue or a failed
    /// read: one read may find nothing and a later one of the same batch a
    /// frame that came meanwhile). Returns how many frames were read, at
    /// least one; when none, the first read's error (`WouldBlock` for an
    /// empty queue).
    ///
    /// # Panics
    /// If `lens` is shorter than `bufs`.
    fn read_batch(&self, bufs: &mut [&mut [u8]], lens: &mut [usize]) -> io::Result<usize> {
        read_each(self, bufs, lens)
    }
    /// Writes each of `frames` whole; returns how many were written.
    fn write_batch(&self, frames: &[&[u8]]) -> usize {
        write_each(self, frames)
    }
    /// Whether the device's link was seen going down (set down by an
    /// administrator, `NETDEV_DOWN`) and has received nothing since; a TAP
    /// never says so.
    fn link_down(&self) -> bool {
        false
    }
}

/// [`FrameIo::read_batch`] as a `read` per frame (the default, and what a
/// device that batches only sometimes falls back to).
pub fn read_each<D: FrameIo + ?Sized>(
    dev: &D,
    bufs: &mut [&mut [u8]],
    lens: &mut [usize],
) -> io::Result<usize> {
    lens[..bufs.len()].fill(0);
    for (i, buf) in bufs.iter_mut().enumerate() {
        match dev.read(buf) {
            Ok(n) => lens[i] = n,
            Err(e) if i == 0 => return Err(e),
            // Frames come in order: after an empty read, the next
            // burst reads on.
            Err(_) => return Ok(i),
        }
    }
    Ok(bufs.len())
}

/// [`FrameIo::write_batch`] as a `write` per frame.
pub fn write_each<D: FrameIo + ?Sized>(dev: &D, frames: &[&[u8]]) -> usize {
    frames.iter().filter(|f| dev.write(f).is_ok()).count()
}

impl FrameIo for Tap {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
    fn write(&self, frame: &[u8]) -> io::Result<()> {
        self.send(frame)
    }
    fn poll_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

/// A shared device is still a device: the worker that reads a queue and a
/// test (or the control thread) that also holds it.
impl<T: FrameIo + ?Sized> FrameIo for std::sync::Arc<T> {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read(buf)
    }
    fn write(&self, frame: &[u8]) -> io::Result<()> {
        (**self).write(frame)
    }
    fn poll_fd(&self) -> RawFd {
        (**self).poll_fd()
    }
    fn batches(&self) -> bool {
        (**self).batches()
    }
    fn read_batch(&self, bufs: &mut [&mut [u8]], lens: &mut [usize]) -> io::Result<usize> {
        (**self).read_batch(bufs, lens)
    }
    fn write_batch(&self, frames: &[&[u8]]) -> usize {
        (**self).write_batch(frames)
    }
    fn link_down(&self) -> bool {
        (**self).link_down()
    }
}
