//! The slots of the flow table and its one hash index.
//!
//! A slot holds a [`Flow`] (64 bytes), a 1-byte [`tag`] and a 24-byte
//! [`SeqTrack`], in three parallel vectors so that a lookup touches one
//! cache line per flow. A [`FlowId`](super::FlowId) is a slot number;
//! freed slots are reused (LIFO) and the vectors never shrink: their
//! length is the high-water mark of live flows.
//!
//! The index ([`Index`]) maps an inside key to its slot. Its buckets hold
//! only a fingerprint and the 4-byte slot number; candidates are compared
//! through the slab (`flows[i].inside`). There is no outbound index: an
//! [`OutKey`](super::OutKey) names its mapping through the mappings'
//! reverse index, which gives the inside key.
//!
//! [`Slab::prefetch`] and [`Slab::prefetch_flow`] are the two stages of a
//! burst lookup: the index bucket of every key of a burst first, then the
//! slot each bucket names, so that the misses of a burst overlap.

use super::index::Index;
use super::tcp::SeqTrack;
use super::types::{Flow, InKey};
use crate::device::sys::prefetch;
use crate::nat::hash::Keyed;
use std::hash::BuildHasher;

/// Per-slot tag bits: liveness plus the TCP flag history the state machine
/// needs (kept out of [`Flow`] so its public layout stays plain data). The
/// SYN/FIN bits are relative to the initiator.
pub(super) mod tag {
    pub const LIVE: u8 = 1 << 0;
    pub const SYN_INIT: u8 = 1 << 1;
    pub const SYNACK_INIT: u8 = 1 << 2;
    pub const SYNACK_RESP: u8 = 1 << 3;
    pub const FIN_INIT: u8 = 1 << 4;
    pub const FIN_RESP: u8 = 1 << 5;
    /// The flow was opened from outside ([`super::super::FlowTable::inbound`]).
    pub const ORIGIN_OUT: u8 = 1 << 6;
}

/// A flow on a cache line of its own: a lookup reads the key and the
/// timestamps, the packet's accounting writes the counters, and with the
/// vector's 16-byte alignment nearly every flow would straddle two lines.
#[derive(Clone, Copy)]
#[repr(align(64))]
struct Line(Flow);

const _: () = assert!(std::mem::size_of::<Line>() == 64);

/// Live flows by slot, indexed by inside key.
pub(super) struct Slab {
    flows: Vec<Line>,
    tags: Vec<u8>,
    seqs: Vec<SeqTrack>,
    free: Vec<u32>,
    /// Live flows by inside key: slot numbers only.
    index: Index,
    /// Keyed from OS randomness (inbound keys are chosen by strangers).
    hasher: Keyed,
    live: usize,
}

impl Slab {
    pub(super) fn with_capacity(cap: usize) -> Self {
        Slab {
            flows: Vec::with_capacity(cap),
            tags: Vec::with_capacity(cap),
            seqs: Vec::with_capacity(cap),
            free: Vec::new(),
            index: Index::with_capacity(cap),
            hasher: Keyed::new(),
            live: 0,
        }
    }

    /// Slot of the flow (live, or expired but not swept) with inside key
    /// `key`.
    #[inline]
    pub(super) fn find(&self, key: &InKey) -> Option<usize> {
        let flows = &self.flows;
        self.index
            .find(self.hash(key), |i| flows[i as usize].0.inside == *key)
            .map(|i| i as usize)
    }

    /// The index hash of `key` (keyed: see [`Keyed`]).
    #[inline]
    pub(super) fn hash(&self, key: &InKey) -> u64 {
        in_hash(&self.hasher, key)
    }

    /// First stage of a burst lookup: starts fetching the index bucket of
    /// the key whose [`Slab::hash`] is `hash`.
    #[inline]
    pub(super) fn prefetch(&self, hash: u64) {
        self.index.prefetch(hash);
    }

    /// Second stage, once the bucket is (likely) cached: starts fetching
    /// the slot it names for `hash`: the flow and its tag, and for `tcp`
    /// the sequence tracking (what the packet reads and updates).
    #[inline]
    pub(super) fn prefetch_flow(&self, hash: u64, tcp: bool) {
        let Some(i) = self.index.candidate(hash) else {
            return;
        };
        let i = i as usize;
        if let (Some(f), Some(t)) = (self.flows.get(i), self.tags.get(i)) {
            prefetch(f);
            prefetch(t);
            if tcp {
                if let Some(s) = self.seqs.get(i) {
                    prefetch(s);
                }
            }
        }
    }

    /// The flow in slot `i` (live or not).
    #[inline]
    pub(super) fn flow(&self, i: usize) -> &Flow {
        &self.flows[i].0
    }

    #[inline]
    pub(super) fn tag(&self, i: usize) -> u8 {
        self.tags[i]
    }

    #[inline]
    pub(super) fn is_live(&self, i: usize) -> bool {
        self.tags[i] & tag::LIVE != 0
    }

    /// Everything a packet updates in slot `i`.
    #[inline]
    pub(super) fn slot_mut(&mut self, i: usize) -> (&mut Flow, &mut u8, &mut SeqTrack) {
        (&mut self.flows[i].0, &mut self.tags[i], &mut self.seqs[i])
    }

    /// Stores a new live flow whose inside key is not indexed yet; returns
    /// its slot.
    pub(super) fn insert(&mut self, flow: Flow, t: u8) -> u32 {
        debug_assert!(self.find(&flow.inside).is_none(), "index collision");
        let i = match self.free.pop() {
            Some(i) => {
                self.flows[i as usize] = Line(flow);
                self.tags[i as usize] = t;
                self.seqs[i as usize] = SeqTrack::default();
                i
            }
            None => {
                let i = self.flows.len() as u32;
                let cap = self.flows.capacity();
                self.flows.push(Line(flow));
                self.tags.push(t);
                self.seqs.push(SeqTrack::default());
                if self.flows.capacity() != cap {
                    self.grew();
                }
                i
            }
        };
        let (hasher, flows) = (&self.hasher, &self.flows);
        self.index.insert(in_hash(hasher, &flow.inside), i, |j| {
            in_hash(hasher, &flows[j as usize].0.inside)
        });
        self.live += 1;
        i
    }

    /// The vectors were reallocated: large ones ask for huge pages again
    /// (see [`huge_pages`]).
    #[cold]
    fn grew(&self) {
        huge_pages(&self.flows);
        huge_pages(&self.tags);
        huge_pages(&self.seqs);
    }

    /// Frees live slot `i`; returns the flow it held.
    pub(super) fn remove(&mut self, i: usize) -> Flow {
        let f = self.flows[i].0;
        let removed = self.index.remove(self.hash(&f.inside), i as u32);
        debug_assert!(removed, "live flow not indexed");
        self.tags[i] = 0;
        self.free.push(i as u32);
        self.live -= 1;
        f
    }

    /// Frees every slot.
    pub(super) fn clear(&mut self) {
        self.flows.clear();
        self.tags.clear();
        self.seqs.clear();
        self.free.clear();
        self.index.clear();
        self.live = 0;
    }

    /// Number of live flows.
    #[inline]
    pub(super) fn len(&self) -> usize {
        self.live
    }

    /// Number of slots, live or free (the sweep's lap).
    #[inline]
    pub(super) fn slots(&self) -> usize {
        self.flows.len()
    }

    /// Live flows in slot order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.flows
            .iter()
            .zip(&self.tags)
            .filter(|(_, t)| **t & tag::LIVE != 0)
            .map(|(f, _)| &f.0)
    }

    /// The sequence tracking of slot `i`.
    #[cfg(test)]
    pub(super) fn seq(&self, i: usize) -> SeqTrack {
        self.seqs[i]
    }

    /// Checks the slab's own invariants: the live count, the free list and
    /// that the index holds exactly the live slots.
    #[cfg(test)]
    pub(super) fn check(&self) {
        let live: Vec<usize> = (0..self.slots()).filter(|&i| self.is_live(i)).collect();
        assert_eq!(live.len(), self.live);
        assert_eq!(self.index.len(), self.live);
        assert_eq!(self.free.len() + self.live, self.flows.len());
        for &i in &live {
            assert_eq!(self.find(&self.flows[i].0.inside), Some(i));
        }
        for &i in &self.free {
            assert_eq!(self.tags[i as usize], 0);
        }
        self.index
            .check(|j| in_hash(&self.hasher, &self.flows[j as usize].0.inside));
    }
}

/// Hash of an inside key, packed into 104 bits first (one `u128` write).
#[inline]
fn in_hash(hasher: &Keyed, k: &InKey) -> u64 {
    hasher.hash_one(
        u128::from(k.proto as u8) << 96
            | u128::from(u32::from(k.src)) << 64
            | u128::from(k.sport) << 48
            | u128::from(u32::from(k.dst)) << 16
            | u128::from(k.dport),
    )
}

/// Asks for transparent huge pages for `v` once it is large (at least 4 MiB,
/// two huge pages): a lookup in a large table reads random slots, and with
/// 4 KiB pages each one is also a TLB miss. A hint; a refusal changes nothing.
pub(super) fn huge_pages<T>(v: &Vec<T>) {
    if v.capacity() * std::mem::size_of::<T>() >= 4 << 20 {
        let _ = crate::device::sys::advise_huge_pages(v);
    }
}
