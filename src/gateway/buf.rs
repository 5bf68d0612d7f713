//! Frame buffers and the pool they circulate through.
//!
//! A [`Buf`] holds one frame as the device reads and writes it: the
//! virtio-net header (when offload is on) followed by the Ethernet frame.
//! A worker reads into a spare buffer and reuses it after writing, so the
//! steady state allocates nothing per packet; buffers only pass through the
//! bounded [`Pool`] when they change thread (a hand-off, the control thread)
//! or when the gateway makes frames of its own (fragments).
use crossbeam_channel::{bounded, Receiver, Sender};

use crate::wire::fragment::MAX_IP_LEN;
use crate::wire::vnet::VNET_HDR_LEN;
use crate::wire::ETH_HLEN;

/// Slack past the largest frame, so that an oversized read is seen as one
/// (the device returns at most the buffer's length).
const FRAME_SLACK: usize = 64;
/// The smallest buffer without offload: any frame of a 1500-byte MTU link.
const MIN_FRAME_BUF: usize = 2048;

/// The header length and buffer size for a device: with offload, a TSO
/// super-frame of up to 64 KiB of IP plus its Ethernet and virtio-net
/// headers; without, the larger MTU plus an Ethernet header, at least
/// [`MIN_FRAME_BUF`].
pub fn buffer_layout(offload: bool, max_mtu: usize) -> (usize, usize) {
    if offload {
        (
            VNET_HDR_LEN,
            VNET_HDR_LEN + ETH_HLEN + MAX_IP_LEN + FRAME_SLACK,
        )
    } else {
        (0, (max_mtu + FRAME_SLACK).max(MIN_FRAME_BUF))
    }
}

/// A frame buffer: `data[..hdr]` is the virtio-net header (when offload is
/// on), `data[hdr..len]` the Ethernet frame.
pub struct Buf {
    data: Box<[u8]>,
    len: usize,
    hdr: usize,
}

impl Buf {
    pub fn frame(&self) -> &[u8] {
        &self.data[self.hdr..self.len]
    }
    pub fn frame_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.hdr..self.len]
    }
    /// The virtio-net header bytes (empty without offload).
    pub fn vnet(&self) -> &[u8] {
        &self.data[..self.hdr]
    }
    pub fn vnet_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.hdr]
    }
    /// The memory this buffer pins (its whole capacity, whatever the frame's
    /// length): what the fragment cache charges for holding it.
    pub fn pinned(&self) -> usize {
        self.data.len()
    }
    /// A copy of the header and frame in a buffer of their own length, when
    /// that is less than half the capacity (a fragment to be held, so that
    /// it does not pin a 64 KiB super-frame buffer); None when not worth it.
    /// A compact buffer never goes back to a [`Pool`] (it would be read
    /// into): [`Pool::put`] drops it.
    pub fn compact_copy(&self) -> Option<Buf> {
        if self.len.saturating_mul(2) > self.data.len() {
            return None;
        }
        Some(Buf {
            data: self.wire().into(),
            len: self.len,
            hdr: self.hdr,
        })
    }
    /// Header and frame, as the device reads and writes them.
    pub fn wire(&self) -> &[u8] {
        &self.data[..self.len]
    }
    /// The whole capacity, to read a header and frame into; follow with
    /// [`Buf::set_wire_len`].
    pub fn read_space(&mut self) -> &mut [u8] {
        self.len = self.data.len();
        &mut self.data
    }
    /// Sets the length of header plus frame after a read. False (and the
    /// buffer unchanged) when `len` is shorter than the header or longer
    /// than the buffer.
    pub fn set_wire_len(&mut self, len: usize) -> bool {
        if len < self.hdr || len > self.data.len() {
            return false;
        }
        self.len = len;
        true
    }
    /// Replaces the contents with `frame` behind a zeroed virtio-net header
    /// (a frame the gateway made: no offload metadata). False when it does
    /// not fit.
    pub fn set_frame(&mut self, frame: &[u8]) -> bool {
        let end = self.hdr + frame.len();
        if end > self.data.len() {
            return false;
        }
        self.data[..self.hdr].fill(0);
        self.data[self.hdr..end].copy_from_slice(frame);
        self.len = end;
        true
    }
}

impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        self.wire()
    }
}

/// A bounded free list of buffers shared by all threads; allocates on demand
/// and keeps at most `keep` spare buffers.
#[derive(Clone)]
pub struct Pool {
    free_tx: Sender<Buf>,
    free_rx: Receiver<Buf>,
    size: usize,
    hdr: usize,
}

impl Pool {
    /// Buffers of `size` bytes with a `hdr`-byte virtio-net header.
    pub fn new(keep: usize, size: usize, hdr: usize) -> Pool {
        let (free_tx, free_rx) = bounded(keep);
        Pool {
            free_tx,
            free_rx,
            size,
            hdr,
        }
    }
    /// A buffer with its full capacity as length, ready to be read into.
    pub fn get(&self) -> Buf {
        let mut b = self.free_rx.try_recv().unwrap_or_else(|_| Buf {
            data: vec![0; self.size].into_boxed_slice(),
            len: 0,
            hdr: self.hdr,
        });
        b.len = b.data.len();
        b
    }
    /// Takes a buffer back for reuse; one that is not this pool's size (a
    /// [`Buf::compact`]ed one) is dropped.
    pub fn put(&self, b: Buf) {
        if self.owns(&b) {
            let _ = self.free_tx.try_send(b);
        }
    }
    /// Whether `b` is a whole buffer of this pool's size, fit to read into.
    pub fn owns(&self, b: &Buf) -> bool {
        b.data.len() == self.size && b.hdr == self.hdr
    }
    /// Bytes of virtio-net header before each frame.
    pub fn hdr(&self) -> usize {
        self.hdr
    }
    /// `b`, or its compact copy (see [`Buf::compact_copy`]) with `b` back
    /// in the pool.
    pub fn compact(&self, b: Buf) -> Buf {
        match b.compact_copy() {
            Some(small) => {
                self.put(b);
                small
            }
            None => b,
        }
    }
    /// A buffer holding `frame` behind a zeroed header; None when too big.
    pub fn frame(&self, frame: &[u8]) -> Option<Buf> {
        let mut b = self.get();
        if b.set_frame(frame) {
            Some(b)
        } else {
            self.put(b);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_frame_split_and_bounds_are_checked() {
        let pool = Pool::new(2, 64, VNET_HDR_LEN);
        let mut b = pool.get();
        assert_eq!(b.read_space().len(), 64);
        assert!(!b.set_wire_len(VNET_HDR_LEN - 1));
        assert!(!b.set_wire_len(65));
        assert!(b.set_wire_len(VNET_HDR_LEN + 20));
        assert_eq!(b.frame().len(), 20);
        assert_eq!(b.vnet().len(), VNET_HDR_LEN);
        b.vnet_mut()[0] = 1;
        assert!(b.set_frame(&[7; 30]));
        assert_eq!(b.vnet(), &[0; VNET_HDR_LEN]);
        assert_eq!(b.frame(), &[7; 30]);
        assert_eq!(b.wire().len(), VNET_HDR_LEN + 30);
        assert!(!b.set_frame(&[0; 60]));
        assert!(pool.frame(&[0; 60]).is_none());
        pool.put(b);
        assert_eq!(
            pool.get().wire().len(),
            64,
            "a reused buffer is whole again"
        );
    }

    #[test]
    fn compacted_buffers_keep_their_frame_and_never_reenter_the_pool() {
        let pool = Pool::new(4, 4096, VNET_HDR_LEN);
        let b = pool.frame(&[9; 100]).unwrap();
        assert_eq!(b.pinned(), 4096);
        let small = pool.compact(b);
        assert_eq!(small.pinned(), VNET_HDR_LEN + 100);
        assert_eq!(small.frame(), &[9; 100]);
        assert_eq!(small.vnet(), &[0; VNET_HDR_LEN]);
        assert!(!pool.owns(&small));
        pool.put(small);
        assert_eq!(pool.get().wire().len(), 4096, "a pool buffer, whole");
        // More than half full: kept as it is.
        let big = pool.compact(pool.frame(&[1; 3000]).unwrap());
        assert_eq!(big.pinned(), 4096);
        assert!(pool.owns(&big));
    }

    #[test]
    fn layouts_fit_a_super_frame_or_the_mtu() {
        assert_eq!(buffer_layout(true, 1500), (10, 10 + 14 + 65535 + 64));
        assert_eq!(buffer_layout(false, 1500), (0, 2048));
        assert_eq!(buffer_layout(false, 9000), (0, 9064));
    }
}
