//! The flow table's hash index: a hash → slot numbers, in buckets of one
//! cache line each.
//!
//! Why not hashbrown's `HashTable` (which this replaced): a probe there
//! reads a group of control bytes and then, in another cache line, the
//! slot; and it has no way to ask for a bucket before probing it. Here a
//! bucket is one 64-byte line holding seven (fingerprint, slot) pairs, so
//! a probe of a large table costs one miss for the index, and
//! [`Index::prefetch`] can start that miss from the hash alone, a burst of
//! packets ahead of the probe (VPP's dual/quad loops do the same for its
//! bihash). [`Index::candidate`] then names the slot the probe will compare,
//! so the caller can prefetch the flow too.
//!
//! A key lives in its home bucket (`hash & mask`) or, when that is full, in
//! the next one with room (linear probing by bucket). Each bucket counts
//! the keys that passed it on the way to a later bucket (F14's overflow
//! counts), so a probe stops at the first bucket that never overflowed and
//! a removal needs no tombstone: it lowers the counts on its way back.
//! Fingerprints are the hash's high 32 bits with the low bit set (0 marks
//! an empty way); candidates are confirmed by the caller's `eq`.

use crate::device::sys::prefetch;

/// Pairs per bucket: seven 8-byte pairs and the overflow count fill a line.
const WAYS: usize = 7;
/// Most keys per bucket on average before the index doubles (6 of 7 ways,
/// 86 %, as F14's 12 of 14).
const MAX_PER_BUCKET: usize = 6;

#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Bucket {
    fps: [u32; WAYS],
    /// Keys whose home is this bucket or an earlier one, stored after it.
    overflow: u32,
    slots: [u32; WAYS],
    _pad: u32,
}

const _: () = assert!(std::mem::size_of::<Bucket>() == 64);

#[inline]
fn fingerprint(hash: u64) -> u32 {
    (hash >> 32) as u32 | 1
}

/// `n` empty buckets, on huge pages when there are many.
fn buckets(n: usize) -> Vec<Bucket> {
    let mut v = Vec::with_capacity(n);
    super::slab::huge_pages(&v);
    v.resize(n, Bucket::default());
    v
}

/// Slot numbers by hash.
pub(super) struct Index {
    buckets: Vec<Bucket>,
    mask: usize,
    len: usize,
}

impl Index {
    /// An index that holds `cap` keys before it first grows.
    pub(super) fn with_capacity(cap: usize) -> Self {
        let n = cap.div_ceil(MAX_PER_BUCKET).next_power_of_two().max(1);
        Index {
            buckets: buckets(n),
            mask: n - 1,
            len: 0,
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn home(&self, hash: u64) -> usize {
        hash as usize & self.mask
    }

    /// Starts bringing the home bucket of `hash` into the cache.
    #[inline]
    pub(super) fn prefetch(&self, hash: u64) {
        prefetch(&self.buckets[self.home(hash)]);
    }

    /// The first slot in the home bucket of `hash` whose fingerprint
    /// matches: the one [`Index::find`] will most likely compare (a hint:
    /// it may be another key's, or the key may sit in a later bucket).
    #[inline]
    pub(super) fn candidate(&self, hash: u64) -> Option<u32> {
        let b = &self.buckets[self.home(hash)];
        let f = fingerprint(hash);
        (0..WAYS).find(|&w| b.fps[w] == f).map(|w| b.slots[w])
    }

    /// The slot stored under `hash` for which `eq` holds.
    #[inline]
    pub(super) fn find(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let f = fingerprint(hash);
        let mut b = self.home(hash);
        // Bounded by the bucket count: overflow counts can, in theory, be
        // non-zero all the way round.
        for _ in 0..self.buckets.len() {
            let bucket = &self.buckets[b];
            for w in 0..WAYS {
                if bucket.fps[w] == f && eq(bucket.slots[w]) {
                    return Some(bucket.slots[w]);
                }
            }
            if bucket.overflow == 0 {
                return None;
            }
            b = (b + 1) & self.mask;
        }
        None
    }

    /// Stores `slot` under `hash` (the caller knows its key is not stored
    /// yet). `rehash` gives the hash of a stored slot, for growing.
    pub(super) fn insert(&mut self, hash: u64, slot: u32, rehash: impl Fn(u32) -> u64) {
        if self.len >= self.buckets.len() * MAX_PER_BUCKET {
            self.grow(rehash);
        }
        self.place(hash, slot);
        self.len += 1;
    }

    fn place(&mut self, hash: u64, slot: u32) {
        let f = fingerprint(hash);
        let mut b = self.home(hash);
        loop {
            let bucket = &mut self.buckets[b];
            if let Some(w) = bucket.fps.iter().position(|&x| x == 0) {
                bucket.fps[w] = f;
                bucket.slots[w] = slot;
                return;
            }
            // Full (the load bound leaves room somewhere): pass it.
            bucket.overflow += 1;
            b = (b + 1) & self.mask;
        }
    }

    fn grow(&mut self, rehash: impl Fn(u32) -> u64) {
        let n = self.buckets.len() * 2;
        let old = std::mem::replace(&mut self.buckets, buckets(n));
        self.mask = n - 1;
        for bucket in &old {
            for w in 0..WAYS {
                if bucket.fps[w] != 0 {
                    self.place(rehash(bucket.slots[w]), bucket.slots[w]);
                }
            }
        }
    }

    /// Removes `slot`, stored under `hash`; false if it was not there.
    pub(super) fn remove(&mut self, hash: u64, slot: u32) -> bool {
        let f = fingerprint(hash);
        let home = self.home(hash);
        let mut b = home;
        for passed in 0..self.buckets.len() {
            let bucket = &mut self.buckets[b];
            if let Some(w) = (0..WAYS).find(|&w| bucket.fps[w] == f && bucket.slots[w] == slot) {
                bucket.fps[w] = 0;
                for k in 0..passed {
                    self.buckets[(home + k) & self.mask].overflow -= 1;
                }
                self.len -= 1;
                return true;
            }
            if bucket.overflow == 0 {
                return false;
            }
            b = (b + 1) & self.mask;
        }
        false
    }

    /// Removes every slot (keeps the buckets).
    pub(super) fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
        self.len = 0;
    }

    /// Checks the overflow counts against the stored keys' probe paths.
    #[cfg(test)]
    pub(super) fn check(&self, rehash: impl Fn(u32) -> u64) {
        let mut want = vec![0u32; self.buckets.len()];
        let mut n = 0;
        for (b, bucket) in self.buckets.iter().enumerate() {
            for w in 0..WAYS {
                if bucket.fps[w] == 0 {
                    continue;
                }
                n += 1;
                let h = rehash(bucket.slots[w]);
                assert_eq!(bucket.fps[w], fingerprint(h));
                let mut k = self.home(h);
                while k != b {
                    want[k] += 1;
                    k = (k + 1) & self.mask;
                }
            }
        }
        assert_eq!(n, self.len);
        let have: Vec<u32> = self.buckets.iter().map(|b| b.overflow).collect();
        assert_eq!(have, want, "overflow counts");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A hash whose home bucket and fingerprint the test chooses: slots
    /// `s` with the same `s % homes` share a home bucket.
    fn hash_of(homes: u64) -> impl Fn(u32) -> u64 {
        move |s| (u64::from(s) * 0x9e37_79b9) << 32 | (u64::from(s) % homes)
    }

    #[test]
    fn finds_what_it_stores_and_nothing_else() {
        let h = hash_of(1 << 20);
        let mut ix = Index::with_capacity(16);
        for s in 0..1000 {
            ix.insert(h(s), s, &h);
        }
        ix.check(&h);
        assert_eq!(ix.len(), 1000);
        for s in 0..1000 {
            assert_eq!(ix.find(h(s), |x| x == s), Some(s));
            assert_eq!(
                ix.candidate(h(s)).map(|c| fingerprint(h(c))),
                Some(fingerprint(h(s)))
            );
        }
        assert_eq!(ix.find(h(5000), |x| x == 5000), None);
    }

    #[test]
    fn overflow_chains_are_followed_and_undone() {
        // Every key in one home bucket: 40 keys run over six buckets.
        let h = hash_of(1);
        let mut ix = Index::with_capacity(64);
        for s in 0..40 {
            ix.insert(h(s), s, &h);
        }
        ix.check(&h);
        assert!(ix.buckets[0].overflow > 0);
        for s in 0..40 {
            assert_eq!(ix.find(h(s), |x| x == s), Some(s), "slot {s}");
        }
        // Remove from the front: later keys stay findable, counts stay right.
        for s in 0..40 {
            assert!(ix.remove(h(s), s));
            assert!(!ix.remove(h(s), s), "removed twice");
            ix.check(&h);
            for t in s + 1..40 {
                assert_eq!(ix.find(h(t), |x| x == t), Some(t));
            }
        }
        assert_eq!(ix.len(), 0);
        assert!(ix.buckets.iter().all(|b| b.overflow == 0));
    }

    #[test]
    fn random_operations_match_a_map() {
        let h = hash_of(37);
        let mut ix = Index::with_capacity(1);
        let mut model: HashSet<u32> = HashSet::new();
        let mut s = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let slot = (s % 500) as u32;
            if model.remove(&slot) {
                assert!(ix.remove(h(slot), slot));
            } else {
                ix.insert(h(slot), slot, &h);
                model.insert(slot);
            }
        }
        ix.check(&h);
        assert_eq!(ix.len(), model.len());
        for slot in 0..500 {
            let found = ix.find(h(slot), |x| x == slot);
            assert_eq!(found.is_some(), model.contains(&slot), "slot {slot}");
        }
        ix.clear();
        assert_eq!(ix.len(), 0);
        assert_eq!(ix.find(h(1), |_| true), None);
    }
}
