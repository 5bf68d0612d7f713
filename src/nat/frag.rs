//! Virtual reassembly of IPv4 fragments for the NAT (RFC 4787 REQ-14/14a).
//!
//! Fragments after the first carry no transport header, so the NAT cannot
//! find their flow. Like VPP's shallow virtual reassembly
//! (`ip4_sv_reass.c`), the cache remembers, per datagram, the translation
//! decided for its first fragment (offset 0) and applies it to the other
//! fragments, without ever reassembling bytes. Fragments that overtake the
//! first are held (bounded) and handed back when the first arrives.
//!
//! # Contract
//!
//! * Pure: no fds, threads or clocks. Time is `now_ms`, milliseconds since
//!   an arbitrary start; it must not go backwards (if it does, nothing
//!   breaks, but entries may outlive their timeout until the oldest expires).
//! * A datagram is identified by [`FragKey`] (RFC 791: source, destination,
//!   protocol, identification), taken from the packet *before* it is
//!   translated. One cache per direction, or a `T` that records the
//!   direction: an in2out and an out2in datagram could share a key only if a
//!   pod's address equals a remote one, but keeping them apart costs nothing.
//! * Buffer ownership: every buffer given to [`FragCache::later`] comes back
//!   exactly once (as the buffer [`FragCache::held_as`] made of it, if
//!   set): at once in the [`Later`] answer, or later through the
//!   `out` callback of [`FragCache::first_seen`] (to translate, or dropped
//!   because its entry was evicted or timed out), [`FragCache::later`]
//!   (dropped: a timed-out entry reclaimed) or [`FragCache::expire`]. The
//!   cache never drops a `B` itself, so a pooled buffer type does not leak.
//! * An entry lives until `timeout_ms` after the last fragment of its
//!   datagram that touched it (each fragment refreshes it), as in VPP: the
//!   last fragment (MF = 0) does not end it, because fragments may still be
//!   duplicated or reordered behind it. A datagram is expired once
//!   `now_ms >= last_ms + timeout_ms`, and an expired entry is never used.
//! * Duplicates are not detected: a duplicate held fragment is held twice
//!   and released twice (the receiver's reassembly discards it), a duplicate
//!   first fragment just refreshes the translation.
//!
//! # Bounds (resource exhaustion, RFC 4787 REQ-14a)
//!
//! * At most `max_datagrams` entries. A first fragment in a full cache
//!   evicts the least recently used entry (counted; its held fragments come
//!   back as [`Release::Evicted`]). A non-first fragment of an unknown
//!   datagram in a full cache only reclaims an expired entry, otherwise it is
//!   refused: orphan fragments (which anyone outside can forge) must not push
//!   out the entries of datagrams whose first fragment was translated.
//! * At most `max_held_fragments` buffers and `max_held_bytes` bytes held in
//!   total; beyond, fragments are refused and counted. A held buffer is
//!   charged what it pins: its length by default, or what the cache's
//!   `charge` function says ([`FragCache::charged_by`]: the gateway charges
//!   a pool buffer's whole capacity, not the frame in it).
//! * No single source address holds more than `1/`[`SOURCE_SHARE`] of
//!   either held bound (at least one fragment): one sender of orphan
//!   fragments cannot take the cache from the others
//!   ([`FragRefused::SourceShareFull`]). An orphan entry always holds a
//!   fragment, so this bounds the entries one source creates too.
//! * Memory: the entry slab and the held-slot slab grow on demand and never
//!   beyond `max_datagrams` and `max_held_fragments` slots; the index is a
//!   hashbrown map of at most `max_datagrams` `(FragKey, u32)` buckets, the
//!   free list at most `max_datagrams` `u32`s. An entry is
//!   `size_of::<FragKey>() (12) + size_of::<Option<T>>() + 24` bytes rounded
//!   up to 8 (40 for a `u16` translation, 48 for a `u32`), an index bucket
//!   16 bytes plus a control byte (load factor <= 7/8, power-of-two bucket
//!   counts), a held slot `size_of::<Option<B>>() + 12` rounded up to 8 (40
//!   for a boxed slice plus a length). The defaults (1024 datagrams, 256
//!   held) cost about 90 KiB at most, besides the held buffers themselves,
//!   which the caller's buffer pool must be sized for, and a per-source map
//!   of at most `max_held_fragments` `(Ipv4Addr, Share)` buckets. Nothing is allocated
//!   once the slabs reached their high-water mark.
//! * Each call costs O(1) plus the buffers it hands back; [`FragCache::expire`]
//!   walks the LRU list from its oldest end and stops at the first live entry.
use crate::nat::hash::Keyed;
use hashbrown::HashMap;
use std::fmt;
use std::net::Ipv4Addr;

/// Identifies one datagram's fragments (RFC 791 §3.2): source, destination,
/// protocol and identification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub id: u16,
}

/// Limits of a [`FragCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragCacheConfig {
    /// Datagrams remembered at once (entries). 0 disables the cache.
    pub max_datagrams: usize,
    /// Fragments held, waiting for their first fragment, over all datagrams.
    pub max_held_fragments: usize,
    /// Bytes (`B::as_ref().len()`) held over all datagrams.
    pub max_held_bytes: usize,
    /// An entry is forgotten this long after its last fragment.
    pub timeout_ms: u64,
}

impl Default for FragCacheConfig {
    /// 1024 datagrams (VPP's `max_reassemblies`), 256 held fragments up to
    /// 512 KiB, 2 s timeout (between VPP's 100 ms and Linux's 30 s
    /// `ipfrag_time`: a datagram's fragments normally arrive back to back).
    fn default() -> Self {
        FragCacheConfig {
            max_datagrams: 1024,
            max_held_fragments: 256,
            max_held_bytes: 512 * 1024,
            timeout_ms: 2_000,
        }
    }
}

/// The answer to a non-first fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Later<T, B> {
    /// The first fragment was seen: translate the buffer with `T`.
    Translate(T, B),
    /// Held until the first fragment arrives ([`FragCache::first_seen`]
    /// hands it back) or its datagram times out or is evicted.
    Held,
    /// Not held because a bound was hit: drop it (the reason is counted).
    Refused(B, FragRefused),
}

/// Why a non-first fragment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragRefused {
    /// `max_datagrams` entries, none expired.
    DatagramsFull,
    /// `max_held_fragments` fragments held.
    HeldFragmentsFull,
    /// Holding it would exceed `max_held_bytes`.
    HeldBytesFull,
    /// Its source address already holds its share (see [`SOURCE_SHARE`]).
    SourceShareFull,
}

/// What to do with a held buffer the cache hands back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Its first fragment arrived: translate it with the `T` just given.
    Translate,
    /// Its datagram timed out: drop it.
    TimedOut,
    /// Its datagram was evicted to make room for another: drop it.
    Evicted,
}

/// Counters and gauges of a [`FragCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FragStats {
    /// Entries now (gauge).
    pub datagrams: usize,
    /// Fragments held now (gauge).
    pub held: usize,
    /// Bytes held now (gauge).
    pub held_bytes: usize,
    /// Entries created (by a first fragment or a held one).
    pub created: u64,
    /// Non-first fragments answered with a translation at once.
    pub translated: u64,
    /// Fragments ever held.
    pub held_total: u64,
    /// Held fragments handed back to be translated.
    pub released: u64,
    /// Entries forgotten after their timeout.
    pub timed_out: u64,
    /// Held fragments dropped with a timed-out entry.
    pub timed_out_fragments: u64,
    /// Live entries evicted to make room for a first fragment.
    pub evicted: u64,
    /// Held fragments dropped with an evicted entry.
    pub evicted_fragments: u64,
    /// Fragments refused with [`FragRefused::DatagramsFull`].
    pub refused_datagrams_full: u64,
    /// Fragments refused with [`FragRefused::HeldFragmentsFull`].
    pub refused_fragments_full: u64,
    /// Fragments refused with [`FragRefused::HeldBytesFull`].
    pub refused_bytes_full: u64,
    /// Fragments refused with [`FragRefused::SourceShareFull`].
    pub refused_source_share: u64,
    /// First fragments not remembered because `max_datagrams` is 0.
    pub not_cached: u64,
}

/// A source address holds at most this fraction (1/N) of the held bounds.
pub const SOURCE_SHARE: usize = 4;

/// "No index" in the intrusive lists.
const NIL: u32 = u32::MAX;
/// Slab indices are `u32`; `NIL` is reserved.
const MAX_SLOTS: usize = (u32::MAX - 1) as usize;
/// Slabs start this small and grow on demand (never beyond their bound).
const INITIAL_SLOTS: usize = 64;

struct Entry<T> {
    key: FragKey,
    t: Option<T>,
    last_ms: u64,
    /// LRU neighbours (towards the oldest, towards the newest).
    prev: u32,
    next: u32,
    /// Held fragments, oldest first.
    held_head: u32,
    held_tail: u32,
}

struct HeldSlot<B> {
    buf: Option<B>,
    len: usize,
    next: u32,
}

/// The virtual-reassembly cache. See the module docs for the contract.
pub struct FragCache<T, B> {
    cfg: FragCacheConfig,
    max_datagrams: usize,
    max_held: usize,
    index: HashMap<FragKey, u32, Keyed>,
    entries: Vec<Entry<T>>,
    free_entries: Vec<u32>,
    /// Least recently used entry (the next to expire or evict).
    lru_head: u32,
    lru_tail: u32,
    held: Vec<HeldSlot<B>>,
    /// Free held slots, linked through `next`.
    free_held: u32,
    /// What each source address holds now (only sources holding some).
    sources: HashMap<Ipv4Addr, Share>,
    /// Per-source bounds: fragments, bytes.
    share: (usize, usize),
    /// What a held buffer is charged.
    charge: fn(&B) -> usize,
    /// What a buffer is turned into before it is held.
    shrink: Option<Shrink<B>>,
    stats: FragStats,
}

/// Turns a buffer to be held into a smaller one (see [`FragCache::held_as`]).
pub type Shrink<B> = Box<dyn FnMut(B) -> B + Send>;

/// Fragments and bytes one source address holds.
#[derive(Debug, Clone, Copy, Default)]
struct Share {
    fragments: usize,
    bytes: usize,
}

impl<T, B> fmt::Debug for FragCache<T, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FragCache")
            .field("cfg", &self.cfg)
            .field("stats", &self.stats)
            .finish()
    }
}

/// Pushes onto a slab, growing it by at most doubling and never past `max`
/// slots (so its capacity stays within the bound).
fn push_bounded<X>(v: &mut Vec<X>, x: X, max: usize) {
    if v.len() == v.capacity() {
        let extra = v
            .capacity()
            .max(INITIAL_SLOTS)
            .min(max.saturating_sub(v.len()))
            .max(1);
        v.reserve_exact(extra);
    }
    v.push(x);
}

impl<T: Copy, B: AsRef<[u8]>> FragCache<T, B> {
    /// An empty cache. Bounds above `u32::MAX - 1` are clamped to it.
    pub fn new(cfg: FragCacheConfig) -> Self {
        let max_datagrams = cfg.max_datagrams.min(MAX_SLOTS);
        let max_held = cfg.max_held_fragments.min(MAX_SLOTS);
        let share = (
            (max_held / SOURCE_SHARE).max(1),
            cfg.max_held_bytes / SOURCE_SHARE,
        );
        FragCache {
            cfg,
            max_datagrams,
            max_held,
            index: HashMap::with_capacity_and_hasher(
                max_datagrams.min(INITIAL_SLOTS),
                Keyed::new(),
            ),
            entries: Vec::with_capacity(max_datagrams.min(INITIAL_SLOTS)),
            free_entries: Vec::new(),
            lru_head: NIL,
            lru_tail: NIL,
            held: Vec::with_capacity(max_held.min(INITIAL_SLOTS)),
            free_held: NIL,
            sources: HashMap::new(),
            share,
            charge: |b| b.as_ref().len(),
            shrink: None,
            stats: FragStats::default(),
        }
    }

    /// Charges each held buffer `charge(buf)` bytes instead of its length
    /// (the memory it pins: a pool buffer's capacity).
    pub fn charged_by(mut self, charge: fn(&B) -> usize) -> Self {
        self.charge = charge;
        self
    }

    /// Turns a fragment that is to be held into `shrink(buf)` first (a copy
    /// in a smaller buffer), charged as such; it is that buffer that comes
    /// back. Called only once the fragment passed the held-count bound and
    /// its source's share of it, so a flood at a full cache costs no copy.
    pub fn held_as(mut self, shrink: Shrink<B>) -> Self {
        self.shrink = Some(shrink);
        self
    }

    pub fn config(&self) -> &FragCacheConfig {
        &self.cfg
    }

    /// Entries (datagrams) remembered now.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn stats(&self) -> FragStats {
        FragStats {
            datagrams: self.index.len(),
            ..self.stats
        }
    }

    /// The first fragment (offset 0, MF set) of the datagram `key` was
    /// translated with `t`: remember `t` for the rest of the datagram, and
    /// hand the fragments held for it to `out` with [`Release::Translate`],
    /// in arrival order. `out` may also receive the held fragments of an
    /// entry evicted or reclaimed to make room ([`Release::Evicted`],
    /// [`Release::TimedOut`]). A repeated first fragment replaces `t`.
    pub fn first_seen(
        &mut self,
        key: FragKey,
        t: T,
        now_ms: u64,
        out: &mut impl FnMut(B, Release),
    ) {
        if let Some(i) = self.find(&key, now_ms, out) {
            self.entries[i as usize].t = Some(t);
            self.touch(i, now_ms);
            self.release_held(i, Release::Translate, out);
            return;
        }
        if !self.make_room(true, now_ms, out) {
            self.stats.not_cached += 1;
            return;
        }
        if self.alloc_entry(key, Some(t), now_ms).is_none() {
            self.stats.not_cached += 1;
        }
    }

    /// A non-first fragment (offset > 0) of the datagram `key`: its
    /// translation if the first fragment was seen; else hold `buf` until it
    /// is, within the bounds, or refuse it. `out` receives the held
    /// fragments of a timed-out entry this call reclaims
    /// ([`Release::TimedOut`]).
    pub fn later(
        &mut self,
        key: FragKey,
        buf: B,
        now_ms: u64,
        out: &mut impl FnMut(B, Release),
    ) -> Later<T, B> {
        let found = self.find(&key, now_ms, out);
        if let Some(i) = found {
            if let Some(t) = self.entries[i as usize].t {
                self.touch(i, now_ms);
                self.stats.translated += 1;
                return Later::Translate(t, buf);
            }
        }
        if self.stats.held >= self.max_held {
            self.stats.refused_fragments_full += 1;
            return Later::Refused(buf, FragRefused::HeldFragmentsFull);
        }
        let mine = self.sources.get(&key.src).copied().unwrap_or_default();
        if mine.fragments >= self.share.0 {
            self.stats.refused_source_share += 1;
            return Later::Refused(buf, FragRefused::SourceShareFull);
        }
        let buf = match &mut self.shrink {
            Some(f) => f(buf),
            None => buf,
        };
        let len = (self.charge)(&buf);
        let too_many_bytes = match self.stats.held_bytes.checked_add(len) {
            Some(b) => b > self.cfg.max_held_bytes,
            None => true,
        };
        if too_many_bytes {
            self.stats.refused_bytes_full += 1;
            return Later::Refused(buf, FragRefused::HeldBytesFull);
        }
        if mine.bytes.saturating_add(len) > self.share.1 {
            self.stats.refused_source_share += 1;
            return Later::Refused(buf, FragRefused::SourceShareFull);
        }
        let i = match found {
            Some(i) => {
                self.touch(i, now_ms);
                i
            }
            None => {
                let room = self.make_room(false, now_ms, out);
                match room.then(|| self.alloc_entry(key, None, now_ms)).flatten() {
                    Some(i) => i,
                    None => {
                        self.stats.refused_datagrams_full += 1;
                        return Later::Refused(buf, FragRefused::DatagramsFull);
                    }
                }
            }
        };
        match self.hold(i, buf, len) {
            Ok(()) => Later::Held,
            Err(buf) => {
                self.stats.refused_fragments_full += 1;
                Later::Refused(buf, FragRefused::HeldFragmentsFull)
            }
        }
    }

    /// Forgets the datagrams idle for `timeout_ms` and hands their held
    /// fragments to `out` ([`Release::TimedOut`]). Returns the number of
    /// entries removed. `expire(u64::MAX, ..)` empties the cache.
    pub fn expire(&mut self, now_ms: u64, out: &mut impl FnMut(B, Release)) -> usize {
        let mut removed = 0;
        while self.lru_head != NIL && self.is_expired(self.lru_head, now_ms) {
            self.remove_entry(self.lru_head, Release::TimedOut, out);
            removed += 1;
        }
        removed
    }

    fn is_expired(&self, i: u32, now_ms: u64) -> bool {
        let last = self.entries[i as usize].last_ms;
        now_ms >= last.saturating_add(self.cfg.timeout_ms)
    }

    /// The live entry of `key`, reclaiming it if it has expired.
    fn find(
        &mut self,
        key: &FragKey,
        now_ms: u64,
        out: &mut impl FnMut(B, Release),
    ) -> Option<u32> {
        let i = *self.index.get(key)?;
        if self.is_expired(i, now_ms) {
            self.remove_entry(i, Release::TimedOut, out);
            return None;
        }
        Some(i)
    }

    /// Makes room for one more entry: reclaims the oldest if it has expired,
    /// or (`evict_live`) evicts it anyway. False when the cache stays full.
    fn make_room(
        &mut self,
        evict_live: bool,
        now_ms: u64,
        out: &mut impl FnMut(B, Release),
    ) -> bool {
        if self.index.len() < self.max_datagrams {
            return true;
        }
        let oldest = self.lru_head;
        if oldest == NIL {
            return false;
        }
        if self.is_expired(oldest, now_ms) {
            self.remove_entry(oldest, Release::TimedOut, out);
            true
        } else if evict_live {
            self.remove_entry(oldest, Release::Evicted, out);
            true
        } else {
            false
        }
    }

    fn alloc_entry(&mut self, key: FragKey, t: Option<T>, now_ms: u64) -> Option<u32> {
        if self.index.len() >= self.max_datagrams {
            return None;
        }
        let e = Entry {
            key,
            t,
            last_ms: now_ms,
            prev: NIL,
            next: NIL,
            held_head: NIL,
            held_tail: NIL,
        };
        let i = match self.free_entries.pop() {
            Some(i) => {
                self.entries[i as usize] = e;
                i
            }
            None => {
                let i = u32::try_from(self.entries.len())
                    .ok()
                    .filter(|&i| i != NIL)?;
                push_bounded(&mut self.entries, e, self.max_datagrams);
                i
            }
        };
        self.index.insert(key, i);
        self.link_newest(i);
        self.stats.created += 1;
        Some(i)
    }

    /// Removes a live entry, handing its held fragments to `out` with `why`
    /// and counting it under `why`.
    fn remove_entry(&mut self, i: u32, why: Release, out: &mut impl FnMut(B, Release)) {
        self.unlink(i);
        let e = &mut self.entries[i as usize];
        e.t = None;
        let key = e.key;
        self.index.remove(&key);
        self.release_held(i, why, out);
        self.free_entries.push(i);
        match why {
            Release::TimedOut => self.stats.timed_out += 1,
            Release::Evicted => self.stats.evicted += 1,
            Release::Translate => {}
        }
    }

    /// Hands all held fragments of entry `i` to `out` with `why`.
    fn release_held(&mut self, i: u32, why: Release, out: &mut impl FnMut(B, Release)) {
        let src = self.entries[i as usize].key.src;
        let mut h = self.entries[i as usize].held_head;
        self.entries[i as usize].held_head = NIL;
        self.entries[i as usize].held_tail = NIL;
        while h != NIL {
            let slot = &mut self.held[h as usize];
            let next = slot.next;
            let buf = slot.buf.take();
            let len = slot.len;
            slot.next = self.free_held;
            self.free_held = h;
            h = next;
            self.stats.held = self.stats.held.saturating_sub(1);
            self.stats.held_bytes = self.stats.held_bytes.saturating_sub(len);
            if let Some(sh) = self.sources.get_mut(&src) {
                sh.fragments = sh.fragments.saturating_sub(1);
                sh.bytes = sh.bytes.saturating_sub(len);
                if sh.fragments == 0 {
                    self.sources.remove(&src);
                }
            }
            match why {
                Release::Translate => self.stats.released += 1,
                Release::TimedOut => self.stats.timed_out_fragments += 1,
                Release::Evicted => self.stats.evicted_fragments += 1,
            }
            if let Some(b) = buf {
                out(b, why);
            }
        }
    }

    /// Appends `buf` to entry `i`'s held list; gives it back if no slot is free.
    fn hold(&mut self, i: u32, buf: B, len: usize) -> Result<(), B> {
        let slot = |buf| HeldSlot {
            buf: Some(buf),
            len,
            next: NIL,
        };
        let h = if self.free_held != NIL {
            let h = self.free_held;
            self.free_held = self.held[h as usize].next;
            self.held[h as usize] = slot(buf);
            h
        } else {
            match u32::try_from(self.held.len()) {
                Ok(h) if h != NIL && self.held.len() < self.max_held => {
                    push_bounded(&mut self.held, slot(buf), self.max_held);
                    h
                }
                _ => return Err(buf),
            }
        };
        let e = &mut self.entries[i as usize];
        if e.held_tail == NIL {
            e.held_head = h;
        } else {
            let tail = e.held_tail;
            self.held[tail as usize].next = h;
        }
        self.entries[i as usize].held_tail = h;
        let sh = self
            .sources
            .entry(self.entries[i as usize].key.src)
            .or_default();
        sh.fragments += 1;
        sh.bytes += len;
        self.stats.held += 1;
        self.stats.held_bytes += len;
        self.stats.held_total += 1;
        Ok(())
    }

    fn touch(&mut self, i: u32, now_ms: u64) {
        self.entries[i as usize].last_ms = now_ms;
        if self.lru_tail != i {
            self.unlink(i);
            self.link_newest(i);
        }
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let e = &self.entries[i as usize];
            (e.prev, e.next)
        };
        if prev == NIL {
            self.lru_head = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            self.lru_tail = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
        let e = &mut self.entries[i as usize];
        e.prev = NIL;
        e.next = NIL;
    }

    fn link_newest(&mut self, i: u32) {
        let tail = self.lru_tail;
        {
            let e = &mut self.entries[i as usize];
            e.prev = tail;
            e.next = NIL;
        }
        if tail == NIL {
            self.lru_head = i;
        } else {
            self.entries[tail as usize].next = i;
        }
        self.lru_tail = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Cache = FragCache<u16, Vec<u8>>;

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
    const R: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
    const T: u64 = 1_000;

    fn key(id: u16) -> FragKey {
        FragKey {
            src: A,
            dst: R,
            proto: 17,
            id,
        }
    }

    fn cfg(datagrams: usize, fragments: usize, bytes: usize) -> FragCacheConfig {
        FragCacheConfig {
            max_datagrams: datagrams,
            max_held_fragments: fragments,
            max_held_bytes: bytes,
            timeout_ms: T,
        }
    }

    fn cache() -> Cache {
        Cache::new(cfg(8, 16, 1 << 20))
    }

    /// A buffer tagged with a number, `len` bytes long.
    fn buf(tag: u8, len: usize) -> Vec<u8> {
        vec![tag; len.max(1)]
    }

    /// Collects what a call hands back.
    #[derive(Default)]
    struct Sink(Vec<(u8, Release)>);

    impl Sink {
        fn f(&mut self) -> impl FnMut(Vec<u8>, Release) + '_ {
            |b, r| self.0.push((b[0], r))
        }
        fn take(&mut self) -> Vec<(u8, Release)> {
            std::mem::take(&mut self.0)
        }
    }

    fn first(c: &mut Cache, id: u16, t: u16, now: u64) -> Vec<(u8, Release)> {
        let mut s = Sink::default();
        c.first_seen(key(id), t, now, &mut s.f());
        s.take()
    }

    fn later(c: &mut Cache, id: u16, tag: u8, now: u64) -> Later<u16, Vec<u8>> {
        let mut s = Sink::default();
        let r = c.later(key(id), buf(tag, 100), now, &mut s.f());
        assert!(s.0.is_empty(), "unexpected release {:?}", s.0);
        r
    }

    fn expire(c: &mut Cache, now: u64) -> Vec<(u8, Release)> {
        let mut s = Sink::default();
        c.expire(now, &mut s.f());
        s.take()
    }

    #[test]
    fn in_order_fragments_get_the_first_ones_translation() {
        let mut c = cache();
        assert!(first(&mut c, 1, 4000, 0).is_empty());
        assert_eq!(later(&mut c, 1, 2, 1), Later::Translate(4000, buf(2, 100)));
        assert_eq!(later(&mut c, 1, 3, 2), Later::Translate(4000, buf(3, 100)));
        let s = c.stats();
        assert_eq!(
            (s.datagrams, s.created, s.translated, s.held_total),
            (1, 1, 2, 0)
        );
    }

    #[test]
    fn out_of_order_fragments_are_held_then_released_in_arrival_order() {
        let mut c = cache();
        assert_eq!(later(&mut c, 1, 3, 0), Later::Held);
        assert_eq!(later(&mut c, 1, 2, 1), Later::Held);
        assert_eq!((c.stats().held, c.stats().held_bytes), (2, 200));
        assert_eq!(
            first(&mut c, 1, 4000, 2),
            vec![(3, Release::Translate), (2, Release::Translate)]
        );
        // Nothing is held twice; a straggler is translated at once.
        assert_eq!(later(&mut c, 1, 4, 3), Later::Translate(4000, buf(4, 100)));
        assert!(expire(&mut c, u64::MAX).is_empty());
        let s = c.stats();
        assert_eq!(
            (s.held, s.held_bytes, s.held_total, s.released),
            (0, 0, 2, 2)
        );
        assert_eq!((s.created, s.translated, s.timed_out), (1, 1, 1));
    }

    #[test]
    fn interleaved_datagrams_stay_apart() {
        let mut c = cache();
        assert_eq!(later(&mut c, 1, 10, 0), Later::Held);
        assert_eq!(later(&mut c, 2, 20, 0), Later::Held);
        assert_eq!(later(&mut c, 1, 11, 1), Later::Held);
        assert_eq!(later(&mut c, 2, 21, 1), Later::Held);
        assert_eq!(
            first(&mut c, 2, 2000, 2),
            vec![(20, Release::Translate), (21, Release::Translate)]
        );
        assert_eq!(later(&mut c, 1, 12, 3), Later::Held);
        assert_eq!(
            later(&mut c, 2, 22, 3),
            Later::Translate(2000, buf(22, 100))
        );
        assert_eq!(
            first(&mut c, 1, 1000, 4),
            vec![
                (10, Release::Translate),
                (11, Release::Translate),
                (12, Release::Translate)
            ]
        );
        // A different protocol or address is a different datagram.
        let mut other = key(1);
        other.proto = 6;
        let mut s = Sink::default();
        assert_eq!(c.later(other, buf(30, 8), 5, &mut s.f()), Later::Held);
        other.proto = 17;
        other.src = R;
        assert_eq!(c.later(other, buf(31, 8), 5, &mut s.f()), Later::Held);
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn duplicates_are_held_twice_and_a_repeated_first_replaces_the_translation() {
        let mut c = cache();
        assert_eq!(later(&mut c, 1, 5, 0), Later::Held);
        assert_eq!(later(&mut c, 1, 5, 0), Later::Held);
        assert_eq!(
            first(&mut c, 1, 7, 1),
            vec![(5, Release::Translate), (5, Release::Translate)]
        );
        assert!(first(&mut c, 1, 8, 2).is_empty());
        assert_eq!(later(&mut c, 1, 5, 3), Later::Translate(8, buf(5, 100)));
        assert_eq!(later(&mut c, 1, 5, 3), Later::Translate(8, buf(5, 100)));
        assert_eq!(c.stats().created, 1);
    }

    #[test]
    fn timeout_hands_back_every_held_buffer() {
        let mut c = cache();
        assert_eq!(later(&mut c, 1, 1, 0), Later::Held);
        assert_eq!(later(&mut c, 2, 3, 100), Later::Held);
        assert!(first(&mut c, 3, 9, 200).is_empty());
        assert_eq!(later(&mut c, 1, 2, 500), Later::Held); // refreshes 1
        assert!(expire(&mut c, 100 + T - 1).is_empty());
        // 2 (last seen 100) and 3 (200) expire; 1 (last seen 500) stays.
        assert_eq!(expire(&mut c, 200 + T), vec![(3, Release::TimedOut)]);
        assert_eq!(c.len(), 1);
        assert!(expire(&mut c, 500 + T - 1).is_empty());
        assert_eq!(
            expire(&mut c, 500 + T),
            vec![(1, Release::TimedOut), (2, Release::TimedOut)]
        );
        assert!(c.is_empty());
        let s = c.stats();
        assert_eq!(
            (s.timed_out, s.timed_out_fragments, s.held, s.held_bytes),
            (3, 3, 0, 0)
        );
        assert_eq!(
            s.held_total,
            s.released + s.timed_out_fragments + s.evicted_fragments
        );
    }

    #[test]
    fn an_expired_entry_is_never_used_and_the_key_can_be_reused() {
        let mut c = cache();
        assert!(first(&mut c, 1, 100, 0).is_empty());
        // The caller has not swept yet: the lookup itself reclaims the entry,
        // so the new datagram with the same key waits for its own first.
        assert_eq!(later(&mut c, 1, 1, T), Later::Held);
        assert_eq!(c.stats().timed_out, 1);
        assert_eq!(first(&mut c, 1, 200, T + 1), vec![(1, Release::Translate)]);
        assert_eq!(
            later(&mut c, 1, 2, T + 2),
            Later::Translate(200, buf(2, 100))
        );
        // After a sweep too.
        assert!(expire(&mut c, 2 * T + 2).is_empty());
        assert!(c.is_empty());
        assert_eq!(later(&mut c, 1, 3, 2 * T + 3), Later::Held);
        // A stale held fragment reclaimed by a lookup comes back as timed out.
        let mut s = Sink::default();
        c.first_seen(key(1), 300, 3 * T + 3, &mut s.f());
        assert_eq!(s.take(), vec![(3, Release::TimedOut)]);
        assert_eq!(
            later(&mut c, 1, 4, 3 * T + 4),
            Later::Translate(300, buf(4, 100))
        );
        assert_eq!(c.stats().timed_out, 3);
    }

    #[test]
    fn full_cache_refuses_orphans_but_evicts_the_oldest_for_a_first_fragment() {
        let mut c = Cache::new(cfg(2, 16, 1 << 20));
        assert_eq!(later(&mut c, 1, 1, 0), Later::Held);
        assert_eq!(later(&mut c, 2, 2, 1), Later::Held);
        assert_eq!(
            later(&mut c, 3, 3, 2),
            Later::Refused(buf(3, 100), FragRefused::DatagramsFull)
        );
        // Touching 1 makes 2 the oldest.
        assert_eq!(later(&mut c, 1, 4, 3), Later::Held);
        assert_eq!(first(&mut c, 3, 30, 4), vec![(2, Release::Evicted)]);
        assert_eq!(later(&mut c, 3, 5, 5), Later::Translate(30, buf(5, 100)));
        // An expired oldest entry is reclaimed for an orphan.
        let mut s = Sink::default();
        assert_eq!(c.later(key(4), buf(6, 10), 3 + T, &mut s.f()), Later::Held);
        assert_eq!(
            s.take(),
            vec![(1, Release::TimedOut), (4, Release::TimedOut)]
        );
        let st = c.stats();
        assert_eq!(
            (st.refused_datagrams_full, st.evicted, st.evicted_fragments),
            (1, 1, 1)
        );
        assert_eq!(
            (st.timed_out, st.timed_out_fragments, st.datagrams),
            (1, 2, 2)
        );
    }

    /// Datagram `id` from source 10.0.0.`src`.
    fn key_from(src: u8, id: u16) -> FragKey {
        FragKey {
            src: Ipv4Addr::new(10, 0, 0, src),
            ..key(id)
        }
    }

    #[test]
    fn held_fragment_and_byte_bounds_refuse_and_count() {
        // Each source may hold 3 fragments and 250 bytes (a quarter).
        let mut c = Cache::new(cfg(16, 12, 1000));
        let mut s = Sink::default();
        let mut held = |c: &mut Cache, src: u8, tag: u8, len: usize| {
            c.later(key_from(src, u16::from(src)), buf(tag, len), 0, &mut s.f())
        };
        for src in 1..=4 {
            assert_eq!(held(&mut c, src, src, 100), Later::Held);
            assert_eq!(held(&mut c, src, src + 10, 100), Later::Held);
        }
        assert_eq!(held(&mut c, 5, 5, 50), Later::Held);
        assert_eq!(held(&mut c, 5, 15, 50), Later::Held);
        assert_eq!(held(&mut c, 6, 6, 50), Later::Held);
        assert_eq!(
            held(&mut c, 7, 7, 51),
            Later::Refused(buf(7, 51), FragRefused::HeldBytesFull)
        );
        assert_eq!(held(&mut c, 7, 17, 50), Later::Held);
        assert_eq!(
            held(&mut c, 9, 9, 1),
            Later::Refused(buf(9, 1), FragRefused::HeldFragmentsFull)
        );
        // A refused orphan creates no entry.
        assert_eq!(c.len(), 7);
        // Known datagrams are unaffected by the held bounds.
        c.first_seen(key_from(2, 2), 20, 1, &mut s.f());
        assert_eq!(
            s.take(),
            vec![(2, Release::Translate), (12, Release::Translate)]
        );
        assert_eq!(
            c.later(key_from(2, 2), buf(6, 1000), 1, &mut s.f()),
            Later::Translate(20, buf(6, 1000))
        );
        // Room again once released.
        assert_eq!(
            c.later(key_from(9, 9), buf(7, 100), 1, &mut s.f()),
            Later::Held
        );
        let st = c.stats();
        assert_eq!((st.refused_bytes_full, st.refused_fragments_full), (1, 1));
        assert_eq!(st.refused_source_share, 0);
        assert_eq!((st.held, st.held_bytes), (11, 6 * 100 + 4 * 50 + 100));
        assert!(s.0.is_empty());
    }

    #[test]
    fn one_source_holds_at_most_its_share() {
        let mut c = Cache::new(cfg(16, 16, 1 << 20));
        let mut s = Sink::default();
        // A quarter of 16 fragments, over any number of datagrams.
        for id in 0..4 {
            assert_eq!(
                c.later(key_from(1, id), buf(1, 10), 0, &mut s.f()),
                Later::Held
            );
        }
        assert_eq!(
            c.later(key_from(1, 9), buf(2, 10), 0, &mut s.f()),
            Later::Refused(buf(2, 10), FragRefused::SourceShareFull)
        );
        assert_eq!(c.len(), 4, "a refused orphan made no entry");
        assert_eq!(
            c.later(key_from(2, 9), buf(3, 10), 0, &mut s.f()),
            Later::Held
        );
        // Its share comes back as its fragments leave.
        c.first_seen(key_from(1, 0), 5, 1, &mut s.f());
        assert_eq!(s.take(), vec![(1, Release::Translate)]);
        assert_eq!(
            c.later(key_from(1, 9), buf(4, 10), 1, &mut s.f()),
            Later::Held
        );
        assert_eq!(c.stats().refused_source_share, 1);
        // Bytes too, charged as the cache is told: 600 of a 1000-byte share.
        let mut c = Cache::new(cfg(16, 16, 4000)).charged_by(|_| 600);
        assert_eq!(
            c.later(key_from(1, 1), buf(1, 1), 0, &mut s.f()),
            Later::Held
        );
        assert_eq!(
            c.later(key_from(1, 2), buf(2, 1), 0, &mut s.f()),
            Later::Refused(buf(2, 1), FragRefused::SourceShareFull)
        );
        assert_eq!(c.stats().held_bytes, 600);
        assert_eq!(
            c.later(key_from(2, 2), buf(3, 1), 0, &mut s.f()),
            Later::Held
        );
        assert_eq!(expire(&mut c, u64::MAX).len(), 2);
        assert_eq!(c.stats().held_bytes, 0);
        assert!(c.sources.is_empty(), "no source left behind");
    }

    #[test]
    fn held_buffers_are_shrunk_first_and_charged_as_shrunk() {
        let mut c = Cache::new(cfg(8, 1, 1 << 20))
            .held_as(Box::new(|mut b: Vec<u8>| {
                b.truncate(10);
                b
            }))
            .charged_by(|b| b.len());
        let mut s = Sink::default();
        assert_eq!(c.later(key(1), buf(1, 500), 0, &mut s.f()), Later::Held);
        assert_eq!(c.stats().held_bytes, 10);
        // Refused at the count bound: handed back as given, not shrunk.
        assert_eq!(
            c.later(key(2), buf(2, 500), 0, &mut s.f()),
            Later::Refused(buf(2, 500), FragRefused::HeldFragmentsFull)
        );
        c.first_seen(key(1), 1, 0, &mut |b, _| assert_eq!(b, buf(1, 10)));
    }

    #[test]
    fn zero_bounds_disable_the_cache_without_panicking() {
        let mut c = Cache::new(cfg(0, 0, 0));
        assert!(first(&mut c, 1, 1, 0).is_empty());
        assert_eq!(
            later(&mut c, 1, 1, 0),
            Later::Refused(buf(1, 100), FragRefused::HeldFragmentsFull)
        );
        assert_eq!(c.stats().not_cached, 1);
        let mut c = Cache::new(cfg(0, 4, 1000));
        assert_eq!(
            later(&mut c, 1, 1, 0),
            Later::Refused(buf(1, 100), FragRefused::DatagramsFull)
        );
        let mut c = Cache::new(cfg(usize::MAX, usize::MAX, usize::MAX));
        c.cfg.timeout_ms = u64::MAX;
        assert_eq!(later(&mut c, 1, 1, u64::MAX), Later::Held);
        assert_eq!(expire(&mut c, u64::MAX), vec![(1, Release::TimedOut)]);
    }

    #[test]
    fn slot_sizes_match_the_module_docs() {
        assert_eq!(std::mem::size_of::<FragKey>(), 12);
        assert_eq!(std::mem::size_of::<Entry<u16>>(), 40);
        assert_eq!(std::mem::size_of::<Entry<u32>>(), 48);
        assert_eq!(std::mem::size_of::<HeldSlot<(Box<[u8]>, usize)>>(), 40);
    }

    /// Random operations: every buffer given comes back exactly once, the
    /// bounds hold, the gauges match, and the slabs never outgrow them.
    #[test]
    fn random_operations_never_leak_or_exceed_bounds() {
        let mut rng = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let config = cfg(16, 24, 24 * 700);
        let mut c: FragCache<u16, Vec<u8>> = FragCache::new(config);
        let outstanding = std::cell::RefCell::new(std::collections::HashSet::new());
        let back = |b: Vec<u8>, _r: Release| {
            let tag = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            assert!(
                outstanding.borrow_mut().remove(&tag),
                "buffer {tag} returned twice"
            );
        };
        let mut now = 0u64;
        for n in 0..200_000u32 {
            now += next() % 20;
            let id = (next() % 40) as u16;
            match next() % 10 {
                0..=1 => c.first_seen(key(id), id, now, &mut { back }),
                2 => {
                    c.expire(now, &mut { back });
                }
                _ => {
                    let mut b = n.to_be_bytes().to_vec();
                    b.resize(4 + (next() % 1000) as usize, 0);
                    outstanding.borrow_mut().insert(n);
                    match c.later(key(id), b, now, &mut { back }) {
                        Later::Translate(t, b) => {
                            assert_eq!(t, id);
                            back(b, Release::Translate);
                        }
                        Later::Refused(b, _) => back(b, Release::Translate),
                        Later::Held => {}
                    }
                }
            }
            let s = c.stats();
            assert!(s.datagrams <= config.max_datagrams);
            assert!(s.held <= config.max_held_fragments);
            assert!(s.held_bytes <= config.max_held_bytes);
            assert!(c.entries.capacity() <= config.max_datagrams);
            assert!(c.held.capacity() <= config.max_held_fragments);
            assert_eq!(
                s.held_total,
                s.released + s.timed_out_fragments + s.evicted_fragments + s.held as u64
            );
        }
        c.expire(u64::MAX, &mut { back });
        let left = outstanding.borrow().len();
        assert_eq!(left, 0, "leaked {left} buffers");
        assert!(c.is_empty());
        let s = c.stats();
        assert_eq!((s.held, s.held_bytes), (0, 0));
        assert!(s.released > 0 && s.timed_out > 0 && s.evicted > 0);
        assert!(s.refused_datagrams_full + s.refused_fragments_full + s.refused_bytes_full > 0);
    }
}
