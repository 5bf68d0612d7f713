//! Where the data path hands copies to the operator's tools (the ops
//! layer reads them): flow events (for `tapnat events` and the mapping
//! log) and captured frames (for `tapnat capture`). Both are off unless
//! someone listens, and then
//! bounded: the data path never waits for a reader and never allocates
//! for one that is not there.
//!
//! * Events: a worker's flow table journals flow and mapping starts and
//!   ends while [`EventTap::wanted`] (one relaxed load per loop iteration,
//!   not per packet); the worker moves the journal into one bounded
//!   channel per loop iteration, and what does not fit is counted
//!   (`events_lost`).
//! * Capture: [`CaptureTap::sides`] is one relaxed load per read burst and
//!   per frame written; only while a capture runs is a frame copied into
//!   a bounded channel, and a full channel counts the frame lost
//!   (`capture_lost`).
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::gateway::stats::{Counter, Counters};
use crate::nat::TableEvent;
use crate::policy::Side;

/// Events waiting between the workers and the events thread.
const EVENT_QUEUE: usize = 65536;
/// Frames waiting between the data path and a capture's writer...
const CAPTURE_QUEUE: usize = 4096;
/// ...and their bytes at most (TSO super-frames are up to 64 KiB each).
const CAPTURE_BYTES: usize = 16 << 20;

/// Microseconds since the Unix epoch now.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A table event with the wall-clock time it was handed over (within one
/// worker loop iteration, at most 0.1 s, of when it happened).
#[derive(Debug, Clone, Copy)]
pub struct Stamped {
    pub unix_us: u64,
    pub event: TableEvent,
}

/// The events' way out of the workers.
pub struct EventTap {
    /// Readers now: subscribers of `tapnat events` plus the mapping log.
    wanted: AtomicUsize,
    tx: Sender<Stamped>,
    rx: Receiver<Stamped>,
}

impl EventTap {
    /// Whether anyone reads events (the tables journal only then).
    #[inline]
    pub fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Relaxed) != 0
    }

    /// One more (or one fewer) reader.
    pub(crate) fn want(&self, more: bool) {
        if more {
            self.wanted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.wanted.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Hands an event over without waiting; false if the queue was full.
    #[inline]
    pub fn offer(&self, e: Stamped) -> bool {
        self.tx.try_send(e).is_ok()
    }

    /// The events thread's end of the queue.
    pub(crate) fn receiver(&self) -> Receiver<Stamped> {
        self.rx.clone()
    }
}

/// Which way a captured frame went through the gateway's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Read from the device (before translation).
    In,
    /// Written to the device (after translation).
    Out,
}

/// One captured frame (Ethernet, as on the device).
#[derive(Debug, Clone)]
pub struct Captured {
    pub unix_us: u64,
    pub side: Side,
    pub way: Way,
    pub frame: Vec<u8>,
}

/// The bit of `side` in [`CaptureTap::sides`].
#[inline]
pub fn side_bit(side: Side) -> u8 {
    match side {
        Side::Pod => 1,
        Side::Uplink => 2,
    }
}

/// The frames' way out of the data path.
pub struct CaptureTap {
    /// The sides a running capture records ([`side_bit`]); 0: none runs.
    sides: AtomicU8,
    /// A capture runs (one at a time).
    busy: AtomicBool,
    /// Bytes of the frames in the queue (bounded by [`CAPTURE_BYTES`]).
    queued: AtomicUsize,
    tx: Sender<Captured>,
    rx: Receiver<Captured>,
}

impl CaptureTap {
    /// The sides being captured, 0 when no capture runs: the only thing
    /// the data path reads when none does.
    #[inline]
    pub fn sides(&self) -> u8 {
        self.sides.load(Ordering::Relaxed)
    }

    /// Copies `frame` for the capture, or counts it lost if the capture's
    /// queue is full. Call only when [`CaptureTap::sides`] has `side`.
    #[cold]
    pub fn offer(&self, side: Side, way: Way, frame: &[u8], c: &Counters) {
        let len = frame.len();
        if self.queued.fetch_add(len, Ordering::Relaxed) + len > CAPTURE_BYTES {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return c.inc(Counter::CaptureLost);
        }
        let f = Captured {
            unix_us: unix_micros(),
            side,
            way,
            frame: frame.to_vec(),
        };
        match self.tx.try_send(f) {
            Ok(()) => c.inc(Counter::CaptureFrames),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(len, Ordering::Relaxed);
                c.inc(Counter::CaptureLost)
            }
        }
    }

    /// The next queued frame, its bytes no longer counted.
    fn take(&self, wait: std::time::Duration) -> Result<Captured, RecvTimeoutError> {
        let f = self.rx.recv_timeout(wait)?;
        self.queued.fetch_sub(f.frame.len(), Ordering::Relaxed);
        Ok(f)
    }

    /// Empties the queue.
    fn drain(&self) {
        while self.take(std::time::Duration::ZERO).is_ok() {}
    }

    /// Starts a capture of `sides`; None if one runs already. The capture
    /// ends when the returned guard drops.
    pub fn start(self: &Arc<Self>, sides: u8) -> Option<CaptureRun> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return None;
        }
        // Whatever an earlier capture left behind is not ours.
        self.drain();
        self.sides.store(sides, Ordering::Relaxed);
        Some(CaptureRun { tap: self.clone() })
    }
}

/// A running capture; dropping it stops the copying.
pub struct CaptureRun {
    tap: Arc<CaptureTap>,
}

impl CaptureRun {
    /// The next captured frame (in the order they were handed over),
    /// waiting up to `wait`.
    pub fn next(&self, wait: std::time::Duration) -> Result<Captured, RecvTimeoutError> {
        self.tap.take(wait)
    }
}

impl Drop for CaptureRun {
    fn drop(&mut self) {
        self.tap.sides.store(0, Ordering::Relaxed);
        self.tap.drain();
        self.tap.busy.store(false, Ordering::Release);
    }
}

/// The taps of one gateway, shared by its threads and the ops threads.
pub struct Taps {
    pub events: EventTap,
    pub capture: Arc<CaptureTap>,
    /// Counted off the data path (events a slow subscriber lost, frames
    /// captured from the control thread): summed with the threads' counters.
    pub counters: Arc<Counters>,
}

impl Default for Taps {
    fn default() -> Taps {
        let (tx, rx) = bounded(EVENT_QUEUE);
        let (ctx, crx) = bounded(CAPTURE_QUEUE);
        Taps {
            events: EventTap {
                wanted: AtomicUsize::new(0),
                tx,
                rx,
            },
            capture: Arc::new(CaptureTap {
                sides: AtomicU8::new(0),
                busy: AtomicBool::new(false),
                queued: AtomicUsize::new(0),
                tx: ctx,
                rx: crx,
            }),
            counters: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_copies_only_while_running_and_counts_what_does_not_fit() {
        let taps = Taps::default();
        let c = Counters::default();
        assert_eq!(taps.capture.sides(), 0);
        let run = taps.capture.start(side_bit(Side::Pod)).unwrap();
        assert!(taps.capture.start(3).is_none(), "one capture at a time");
        assert_eq!(taps.capture.sides(), 1);
        for _ in 0..CAPTURE_QUEUE + 5 {
            taps.capture.offer(Side::Pod, Way::In, &[1, 2, 3], &c);
        }
        assert_eq!(c.get(Counter::CaptureFrames), CAPTURE_QUEUE as u64);
        assert_eq!(c.get(Counter::CaptureLost), 5);
        assert_eq!(run.next(ZERO).unwrap().frame, vec![1, 2, 3]);
        drop(run);
        assert_eq!(taps.capture.sides(), 0);
        let again = taps.capture.start(3).unwrap();
        assert!(again.next(ZERO).is_err(), "a new capture starts empty");
    }

    const ZERO: std::time::Duration = std::time::Duration::ZERO;

    #[test]
    fn captured_bytes_are_bounded_too() {
        let taps = Taps::default();
        let c = Counters::default();
        let run = taps.capture.start(3).unwrap();
        let big = vec![0u8; 64 << 10];
        for _ in 0..300 {
            taps.capture.offer(Side::Uplink, Way::Out, &big, &c);
        }
        // 16 MiB of 64 KiB frames: 256 kept, the rest lost.
        assert_eq!(c.get(Counter::CaptureFrames), 256);
        assert_eq!(c.get(Counter::CaptureLost), 44);
        // Taking one makes room for one.
        run.next(ZERO).unwrap();
        taps.capture.offer(Side::Uplink, Way::Out, &big, &c);
        assert_eq!(c.get(Counter::CaptureFrames), 257);
        drop(run);
        assert_eq!(taps.capture.queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn events_are_wanted_while_someone_reads() {
        let taps = Taps::default();
        assert!(!taps.events.wanted());
        taps.events.want(true);
        taps.events.want(true);
        taps.events.want(false);
        assert!(taps.events.wanted());
        taps.events.want(false);
        assert!(!taps.events.wanted());
    }
}
