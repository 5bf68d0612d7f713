//! An in-memory [`FrameIo`]: frames injected by a test are read by the
//! worker, frames the worker writes are collected for the test. Readiness is
//! an eventfd ([`Waker`]), so the worker's poll(2) loop runs unchanged.
//! For tests and the `lab` feature only; it is not a product device.
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::io::FrameIo;
use super::poll::Waker;

/// A device queue in memory.
pub struct MemDevice {
    rx: Mutex<VecDeque<Vec<u8>>>,
    tx: Mutex<Vec<Vec<u8>>>,
    written: Condvar,
    ready: Waker,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemDevice {
    pub fn new() -> io::Result<MemDevice> {
        Ok(MemDevice {
            rx: Mutex::new(VecDeque::new()),
            tx: Mutex::new(Vec::new()),
            written: Condvar::new(),
            ready: Waker::new()?,
        })
    }

    /// Queues `frame` (header included, if the reader expects one) to be read.
    pub fn inject(&self, frame: &[u8]) {
        let mut rx = lock(&self.rx);
        rx.push_back(frame.to_vec());
        self.ready.wake();
    }

    /// Every frame written so far, oldest first; clears the record.
    pub fn take_written(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *lock(&self.tx))
    }

    /// Waits until at least `n` frames were written or `timeout` passes,
    /// then takes every frame written so far.
    pub fn wait_written(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let until = Instant::now() + timeout;
        let mut tx = lock(&self.tx);
        while tx.len() < n {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            tx = self
                .written
                .wait_timeout(tx, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        std::mem::take(&mut *tx)
    }
}

impl FrameIo for MemDevice {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = lock(&self.rx);
        let Some(frame) = rx.pop_front() else {
            // Drained under the lock, so an inject after this wakes again.
            self.ready.drain();
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
    fn write(&self, frame: &[u8]) -> io::Result<()> {
        lock(&self.tx).push(frame.to_vec());
        self.written.notify_all();
        Ok(())
    }
    fn poll_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Poller;

    #[test]
    fn frames_in_and_out_with_readiness() {
        let d = MemDevice::new().unwrap();
        let mut p = Poller::new();
        let slot = p.add(d.poll_fd());
        assert_eq!(p.wait(Some(Duration::ZERO)).unwrap(), 0);
        d.inject(&[1, 2, 3]);
        p.wait(Some(Duration::ZERO)).unwrap();
        assert!(p.readable(slot));
        let mut buf = [0u8; 2];
        assert_eq!(d.read(&mut buf).unwrap(), 2, "truncated like a TAP read");
        assert_eq!(buf, [1, 2]);
        let e = d.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        p.wait(Some(Duration::ZERO)).unwrap();
        assert!(!p.readable(slot), "not readable once drained");
        d.write(&[9]).unwrap();
        assert_eq!(d.wait_written(1, Duration::from_secs(1)), vec![vec![9]]);
        assert!(d.take_written().is_empty());
    }
}
