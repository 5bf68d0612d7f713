//! The slots of the flow table and its one hash index.
//!
//! A slot holds a [`Flow`] (64 bytes), a 1-byte [`tag`] and a 24-byte
//! [`SeqTrack`], in three parallel vectors so that a lookup touches one
//! cache line per flow. A [`FlowId`](super::FlowId) is a slot number;
//! freed slots are reused (LIFO) and the vectors never shrink: their
//! length is the high-water mark of live flows.
//!
//! The index maps an inside key to its slot. Its buckets hold only the
//! 4-byte slot number (plus hashbrown's control byte); candidates are
//! compared through the slab (`flows[i].inside`). There is no outbound
//! index: an [`OutKey`](super::OutKey) names its mapping through the
//! mappings' reverse index, which gives the inside key.

use super::tcp::SeqTrack;
use super::types::{Flow, InKey};
use crate::nat::hash::Keyed;
use hashbrown::HashTable;
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

/// Live flows by slot, indexed by inside key.
pub(super) struct Slab {
    flows: Vec<Flow>,
    tags: Vec<u8>,
    seqs: Vec<SeqTrack>,
    free: Vec<u32>,
    /// Live flows by inside key: slot numbers only.
    index: HashTable<u32>,
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
            index: HashTable::with_capacity(cap),
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
            .find(in_hash(&self.hasher, key), |&i| {
                flows[i as usize].inside == *key
            })
            .map(|&i| i as usize)
    }

    /// The flow in slot `i` (live or not).
    #[inline]
    pub(super) fn flow(&self, i: usize) -> &Flow {
        &self.flows[i]
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
        (&mut self.flows[i], &mut self.tags[i], &mut self.seqs[i])
    }

    /// Stores a new live flow whose inside key is not indexed yet; returns
    /// its slot.
    pub(super) fn insert(&mut self, flow: Flow, t: u8) -> u32 {
        debug_assert!(self.find(&flow.inside).is_none(), "index collision");
        let i = match self.free.pop() {
            Some(i) => {
                self.flows[i as usize] = flow;
                self.tags[i as usize] = t;
                self.seqs[i as usize] = SeqTrack::default();
                i
            }
            None => {
                let i = self.flows.len() as u32;
                self.flows.push(flow);
                self.tags.push(t);
                self.seqs.push(SeqTrack::default());
                i
            }
        };
        let (hasher, flows) = (&self.hasher, &self.flows);
        self.index
            .insert_unique(in_hash(hasher, &flow.inside), i, |&j| {
                in_hash(hasher, &flows[j as usize].inside)
            });
        self.live += 1;
        i
    }

    /// Frees live slot `i`; returns the flow it held.
    pub(super) fn remove(&mut self, i: usize) -> Flow {
        let f = self.flows[i];
        match self
            .index
            .find_entry(in_hash(&self.hasher, &f.inside), |&j| j as usize == i)
        {
            Ok(e) => {
                e.remove();
            }
            Err(_) => debug_assert!(false, "live flow not indexed"),
        }
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
            .map(|(f, _)| f)
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
            assert_eq!(self.find(&self.flows[i].inside), Some(i));
        }
        for &i in &self.free {
            assert_eq!(self.tags[i as usize], 0);
        }
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
