//! `nat::frag::FragCache` driven by an arbitrary sequence of operations.
//!
//! The input decodes (with `arbitrary`) into small bounds and a list of
//! `first_seen` / `later` / `expire` calls on a few datagram keys, with a
//! clock that only moves forward.
//!
//! Invariants, checked after every operation:
//! * No panic.
//! * The documented bounds: at most `max_datagrams` entries,
//!   `max_held_fragments` held buffers and `max_held_bytes` held bytes.
//! * The gauges tell the truth: `held` and `held_bytes` equal the number and
//!   bytes of the buffers handed in and not yet handed back, and
//!   `held_total == released + timed_out_fragments + evicted_fragments + held`.
//! * Ownership: every buffer handed in comes back exactly once (at once, or
//!   later through an `out` callback), and the cache never drops one itself
//!   (a live-buffer count, decremented in `Drop`, always equals the
//!   buffers the cache holds). At the end `expire(u64::MAX)` hands back
//!   every held buffer and leaves the cache empty.
//! * Answers are consistent: `Translate(t)` carries the `t` of the latest
//!   `first_seen` of that key, within `timeout_ms` of the latest call about
//!   that key; buffers released for translation by `first_seen(key)` are
//!   that key's; `later` only ever hands back timed-out buffers.
#![no_main]

use std::cell::Cell;
use std::collections::HashMap;
use std::net::Ipv4Addr;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tapnat::nat::frag::{FragCache, FragCacheConfig, FragKey, Later, Release};

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
}

/// A buffer tagged with its serial number; counts the live ones.
#[derive(Debug, PartialEq, Eq)]
struct Buf {
    tag: u32,
    data: Vec<u8>,
}

impl Buf {
    fn new(tag: u32, len: usize) -> Buf {
        LIVE.with(|l| l.set(l.get() + 1));
        Buf {
            tag,
            data: vec![0; len],
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        LIVE.with(|l| l.set(l.get() - 1));
    }
}

impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

#[derive(Debug, Arbitrary)]
struct Bounds {
    max_datagrams: u8,
    max_held_fragments: u8,
    max_held_bytes: u16,
    timeout_ms: u16,
    /// Bounds far beyond what the ops can reach (clamping code paths).
    huge: bool,
}

#[derive(Debug, Arbitrary)]
enum Op {
    First {
        key: u8,
        t: u16,
        dt: u16,
    },
    Later {
        key: u8,
        len: u16,
        dt: u16,
    },
    Expire {
        dt: u16,
    },
    /// A long pause (up to ~65 s), so that everything may time out.
    Sleep {
        s: u8,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    bounds: Bounds,
    ops: Vec<Op>,
}

fn key(k: u8) -> FragKey {
    // 16 keys: 4 ids x 2 protocols x 2 sources.
    FragKey {
        src: Ipv4Addr::new(10, 244, 0, 2 + (k >> 3 & 1)),
        dst: Ipv4Addr::new(198, 51, 100, 10),
        proto: if k & 4 == 0 { 17 } else { 6 },
        id: u16::from(k & 3),
    }
}

#[derive(Default)]
struct Model {
    /// tag -> (key index, length) of every buffer the cache holds.
    held: HashMap<u32, (u8, usize)>,
    held_bytes: usize,
    /// Per key: the latest first_seen translation, and the time of the
    /// latest call about the key.
    last_t: HashMap<u8, u16>,
    last_call: HashMap<u8, u64>,
}

impl Model {
    /// A buffer came back through a callback: it must be one the cache held.
    fn back(&mut self, b: Buf, why: Release, releasing_for: Option<u8>) {
        let Some((k, len)) = self.held.remove(&b.tag) else {
            panic!("buffer {} handed back but not held (twice?)", b.tag);
        };
        assert_eq!(len, b.data.len());
        self.held_bytes -= len;
        if why == Release::Translate {
            assert_eq!(Some(k), releasing_for, "buffer released for the wrong key");
        }
    }
}

fuzz_target!(|input: Input| {
    let b = &input.bounds;
    let cfg = if b.huge {
        FragCacheConfig {
            max_datagrams: usize::MAX - usize::from(b.max_datagrams),
            max_held_fragments: usize::MAX - usize::from(b.max_held_fragments),
            max_held_bytes: usize::MAX - usize::from(b.max_held_bytes),
            timeout_ms: u64::MAX - u64::from(b.timeout_ms),
        }
    } else {
        FragCacheConfig {
            max_datagrams: usize::from(b.max_datagrams % 12),
            max_held_fragments: usize::from(b.max_held_fragments % 24),
            max_held_bytes: usize::from(b.max_held_bytes),
            timeout_ms: u64::from(b.timeout_ms),
        }
    };
    let live_at_start = LIVE.with(Cell::get);
    let mut c: FragCache<u16, Buf> = FragCache::new(cfg);
    let mut m = Model::default();
    let mut now: u64 = 0;
    let mut serial: u32 = 0;

    for op in input.ops.iter().take(2000) {
        match *op {
            Op::First { key: k, t, dt } => {
                now = now.saturating_add(u64::from(dt));
                let k = k % 16;
                c.first_seen(key(k), t, now, &mut |b, why| m.back(b, why, Some(k)));
                m.last_t.insert(k, t);
                m.last_call.insert(k, now);
            }
            Op::Later { key: k, len, dt } => {
                now = now.saturating_add(u64::from(dt));
                let k = k % 16;
                let len = usize::from(len % 4096);
                serial += 1;
                let buf = Buf::new(serial, len);
                // Held buffers handed back here are timed out, never translated.
                let mut back = Vec::new();
                let r = c.later(key(k), buf, now, &mut |b, why| back.push((b, why)));
                for (b, why) in back {
                    assert_eq!(why, Release::TimedOut, "later() released {why:?}");
                    m.back(b, why, None);
                }
                match r {
                    Later::Translate(t, b) => {
                        assert_eq!(b.tag, serial, "translated another buffer");
                        assert_eq!(Some(&t), m.last_t.get(&k), "stale translation");
                        let last = m.last_call[&k];
                        assert!(
                            now < last.saturating_add(cfg.timeout_ms),
                            "translated by an expired entry: now {now}, last {last}"
                        );
                    }
                    Later::Refused(b, _) => assert_eq!(b.tag, serial, "refused another buffer"),
                    Later::Held => {
                        m.held.insert(serial, (k, len));
                        m.held_bytes += len;
                    }
                }
                m.last_call.insert(k, now);
            }
            Op::Expire { dt } => {
                now = now.saturating_add(u64::from(dt));
                c.expire(now, &mut |b, why| {
                    assert_eq!(why, Release::TimedOut);
                    m.back(b, why, None)
                });
            }
            Op::Sleep { s } => now = now.saturating_add(u64::from(s) * 1000),
        }

        let s = c.stats();
        assert!(s.datagrams <= cfg.max_datagrams, "{s:?}");
        assert!(s.held <= cfg.max_held_fragments, "{s:?}");
        assert!(s.held_bytes <= cfg.max_held_bytes, "{s:?}");
        assert_eq!(s.datagrams, c.len());
        assert_eq!(s.held, m.held.len(), "held gauge: {s:?}");
        assert_eq!(s.held_bytes, m.held_bytes, "held bytes gauge: {s:?}");
        assert_eq!(
            s.held_total,
            s.released + s.timed_out_fragments + s.evicted_fragments + s.held as u64,
            "{s:?}"
        );
        // Only the buffers the cache holds are alive: none was dropped inside.
        assert_eq!(
            LIVE.with(Cell::get) - live_at_start,
            m.held.len(),
            "a buffer was dropped or leaked"
        );
        if s.held > 0 {
            assert!(s.datagrams > 0, "held fragments without an entry: {s:?}");
        }
    }

    c.expire(u64::MAX, &mut |b, why| {
        assert_eq!(why, Release::TimedOut);
        m.back(b, why, None)
    });
    assert!(
        m.held.is_empty(),
        "{} buffers never came back",
        m.held.len()
    );
    assert!(c.is_empty());
    let s = c.stats();
    assert_eq!((s.held, s.held_bytes, s.datagrams), (0, 0, 0));
    drop(c);
    assert_eq!(LIVE.with(Cell::get), live_at_start);
});
