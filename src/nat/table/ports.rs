//! Outside ports: which ones this worker owns, which are in use, how a new
//! mapping's port is chosen, and the quarantine of released ones.
//!
//! * Worker `k` of `N` owns the ports (and ICMP echo ids) `p` with
//!   `p % N == k`; nothing here ever hands out another worker's port.
//! * Choice (RFC 6056 style): keep the inside port when it is in range,
//!   owned and free (port preservation); otherwise a random owned free port
//!   (random start from a keyed PRF, [`PortRng`], then a linear scan over
//!   the owned ports), keeping the port
//!   class of RFC 4787 REQ-3a (below 1024 or not) as the module docs of
//!   [`super`] describe. ICMP ids use the whole id space and have no class.
//! * Quarantine (RFC 6888 REQ-8): with a reuse delay, a released TCP or UDP
//!   port waits in a FIFO (release order = deadline order, as the delay is
//!   fixed) with its bit still set, so nobody gets it meanwhile; the FIFO is
//!   drained at allocation and sweep time. ICMP ids are reused at once.

use super::types::{InKey, Proto};
use super::TableConfig;
use std::collections::VecDeque;
use std::net::Ipv4Addr;

/// 65536-bit set of outside ports in use for one protocol.
struct PortSet(Vec<u64>);

impl PortSet {
    fn new() -> Self {
        PortSet(vec![0; 65536 / 64])
    }
    #[inline]
    fn contains(&self, p: u16) -> bool {
        self.0[usize::from(p >> 6)] & (1 << (p & 63)) != 0
    }
    #[inline]
    fn insert(&mut self, p: u16) {
        self.0[usize::from(p >> 6)] |= 1 << (p & 63);
    }
    #[inline]
    fn remove(&mut self, p: u16) {
        self.0[usize::from(p >> 6)] &= !(1 << (p & 63));
    }
}

/// A released port in quarantine.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cooling {
    pub(super) until_ms: u64,
    pub(super) proto: Proto,
    pub(super) port: u16,
    /// Released by a deleted forward: a forward may take the port back.
    pub(super) forward: bool,
    /// The inside address the port stays charged to while it waits
    /// (0.0.0.0, never a pod's, for a forward's); see [`Cooling::owner`].
    owner: Ipv4Addr,
}

impl Cooling {
    /// The inside address the port stays charged to while it waits (none
    /// for a forward's).
    #[inline]
    pub(super) fn owner(&self) -> Option<Ipv4Addr> {
        (!self.owner.is_unspecified()).then_some(self.owner)
    }
}

/// The port choice's random numbers (RFC 6056 §3.3: an off-path attacker,
/// or a pod watching its own mappings, must not predict other ports):
/// SipHash-1-3, a keyed pseudorandom function, over a counter, keyed from
/// the seed (the gateway draws it from `getrandom(2)`; tests fix it). A
/// linear generator such as xorshift gives its state away after a few
/// outputs; a PRF's outputs say nothing of the next.
#[derive(Debug, Clone)]
pub(super) struct PortRng {
    key: siphasher::sip::SipHasher13,
    counter: u64,
}

impl PortRng {
    pub(super) fn new(seed: u64) -> Self {
        // Two key words from one seed (64 bits of entropy).
        let k1 = seed.rotate_left(29) ^ 0x9E37_79B9_7F4A_7C15;
        PortRng {
            key: siphasher::sip::SipHasher13::new_with_keys(seed, k1),
            counter: 0,
        }
    }

    /// Uniform-enough value in `0..n` (`n > 0`).
    #[inline]
    pub(super) fn below(&mut self, n: u32) -> u32 {
        use std::hash::Hasher;
        self.counter += 1;
        let mut h = self.key;
        h.write_u64(self.counter);
        (((h.finish() >> 32) * u64::from(n)) >> 32) as u32
    }
}

/// xorshift64* PRNG: cheap, deterministic from the seed (random test
/// operations).
#[cfg(test)]
#[derive(Debug, Clone)]
pub(super) struct XorShift(u64);

#[cfg(test)]
impl XorShift {
    pub(super) fn new(seed: u64) -> Self {
        // Zero is a fixed point of xorshift; mix the seed so any value works.
        let s = seed ^ 0x9E37_79B9_7F4A_7C15;
        XorShift(if s == 0 { 0x2545_F491_4F6C_DD1D } else { s })
    }
    #[inline]
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform-enough value in `0..n` (`n > 0`).
    #[inline]
    pub(super) fn below(&mut self, n: u32) -> u32 {
        (((self.next() >> 32) * u64::from(n)) >> 32) as u32
    }
}

/// The outside ports of one worker, per protocol.
pub(super) struct Ports {
    worker: u16,
    workers: u16,
    /// TCP/UDP dynamic range, inclusive.
    first: u16,
    last: u16,
    reuse_delay_ms: u64,
    /// In use: by a mapping, a forward, or in quarantine.
    used: [PortSet; 3],
    cooling: VecDeque<Cooling>,
    rng: PortRng,
}

impl Ports {
    pub(super) fn new(cfg: &TableConfig) -> Self {
        Ports {
            worker: cfg.worker,
            workers: cfg.workers,
            first: cfg.port_first,
            last: cfg.port_last,
            reuse_delay_ms: cfg.port_reuse_delay_ms,
            used: [PortSet::new(), PortSet::new(), PortSet::new()],
            cooling: VecDeque::new(),
            rng: PortRng::new(cfg.seed),
        }
    }

    /// Whether `port` belongs to this worker's slice.
    #[inline]
    pub(super) fn owns(&self, port: u16) -> bool {
        port % self.workers == self.worker
    }

    /// Whether `port` is in use (mapped, forwarded or quarantined).
    #[inline]
    pub(super) fn is_used(&self, proto: Proto, port: u16) -> bool {
        self.used[proto.index()].contains(port)
    }

    /// Takes `port` (a forward's) if it is free; `false` if in use.
    pub(super) fn reserve(&mut self, proto: Proto, port: u16) -> bool {
        if self.is_used(proto, port) {
            return false;
        }
        self.used[proto.index()].insert(port);
        true
    }

    /// Chooses and takes an outside port for a new mapping of `key`'s
    /// inside endpoint; `None` if every owned port of the class (and its
    /// fallback) is in use or quarantined.
    pub(super) fn alloc(&mut self, key: &InKey) -> Option<u16> {
        let p = self.choose(key)?;
        self.used[key.proto.index()].insert(p);
        Some(p)
    }

    fn choose(&mut self, key: &InKey) -> Option<u16> {
        let used = &self.used[key.proto.index()];
        let rng = &mut self.rng;
        let w = u32::from(self.workers);
        let k = u32::from(self.worker);
        let sp = key.sport;
        let owned = u32::from(sp) % w == k;
        if key.proto == Proto::Icmp {
            // RFC 5508 REQ-1a: ids are mapped independently of the remote;
            // the whole id space is usable and there is no class.
            if owned && !used.contains(sp) {
                return Some(sp);
            }
            return pick_port(used, rng, 0, 65535, w, k);
        }
        let (first, last) = (u32::from(self.first), u32::from(self.last));
        if owned && (first..=last).contains(&u32::from(sp)) && !used.contains(sp) {
            return Some(sp); // port preservation
        }
        // RFC 4787 REQ-3a port classes, within the configured range.
        let low = (first, last.min(1023));
        let high = (first.max(1024), last);
        if sp < 1024 {
            pick_port(used, rng, low.0, low.1, w, k)
                .or_else(|| pick_port(used, rng, high.0, high.1, w, k))
        } else if owned_count(high.0, high.1, w, k) > 0 {
            pick_port(used, rng, high.0, high.1, w, k)
        } else {
            pick_port(used, rng, low.0, low.1, w, k)
        }
    }

    /// Gives back a mapping's port at `now_ms`: TCP and UDP ports go into
    /// quarantine when there is a reuse delay (charged to `owner` until it
    /// ends), anything else is free at once. Returns whether it went into
    /// quarantine.
    pub(super) fn release(
        &mut self,
        proto: Proto,
        port: u16,
        now_ms: u64,
        owner: Option<Ipv4Addr>,
    ) -> bool {
        if self.reuse_delay_ms > 0 && proto != Proto::Icmp {
            // The delay is fixed, so the FIFO stays sorted by deadline.
            self.cooling.push_back(Cooling {
                until_ms: now_ms.saturating_add(self.reuse_delay_ms),
                proto,
                port,
                forward: false,
                owner: owner.unwrap_or(Ipv4Addr::UNSPECIFIED),
            });
            true
        } else {
            self.used[proto.index()].remove(port);
            false
        }
    }

    /// Takes out of quarantine the oldest `proto` port `owner` released
    /// whose class (below 1024 or not) is `low`'s, for a new mapping of the
    /// same pod: the bit stays set, the port is the caller's. A pod may
    /// reuse its own quarantined ports (RFC 6888 REQ-8 guards against a
    /// port going to another subscriber while remotes remember its old
    /// sessions; these would be the pod's own). O(position in the FIFO);
    /// the caller asks only when `owner` has such a port.
    pub(super) fn reclaim(&mut self, owner: Ipv4Addr, proto: Proto, low: bool) -> Option<u16> {
        let i = self.cooling.iter().position(|c| {
            c.proto == proto && !c.forward && c.owner == owner && (c.port < 1024) == low
        })?;
        self.cooling.remove(i).map(|c| c.port)
    }

    /// Takes back out of quarantine the port just released (the last one
    /// in), freeing it now; `false` if it is not the last one in. For the
    /// port of an unreplied flow its own pod evicts to reuse it: no remote
    /// ever answered on it, so there is no old session for a new one to
    /// meet (what the quarantine protects against).
    pub(super) fn recall(&mut self, proto: Proto, port: u16) -> bool {
        match self.cooling.back() {
            Some(c) if c.proto == proto && c.port == port && !c.forward => {
                self.cooling.pop_back();
                self.used[proto.index()].remove(port);
                true
            }
            _ => false,
        }
    }

    /// Ends the quarantines that are due at `now_ms`, telling `freed` the
    /// owner of each. A port that `held` says is taken again (by a forward)
    /// keeps its bit. Cheap when nothing is waiting.
    #[inline]
    pub(super) fn drain_cooling(
        &mut self,
        now_ms: u64,
        held: impl Fn(Proto, u16) -> bool,
        mut freed: impl FnMut(Ipv4Addr, Proto),
    ) {
        while let Some(c) = self.cooling.front() {
            if c.until_ms > now_ms {
                break;
            }
            if !held(c.proto, c.port) {
                self.used[c.proto.index()].remove(c.port);
            }
            if let Some(owner) = c.owner() {
                freed(owner, c.proto);
            }
            self.cooling.pop_front();
        }
    }

    /// Whether `port` waits in a quarantine a deleted forward started (and
    /// nothing took it since).
    pub(super) fn is_forward_cooling(&self, proto: Proto, port: u16) -> bool {
        self.cooling
            .iter()
            .rev()
            .find(|c| c.proto == proto && c.port == port)
            .is_some_and(|c| c.forward)
    }

    /// Gives back a deleted forward's port, as [`Ports::release`] does.
    pub(super) fn release_forward(&mut self, proto: Proto, port: u16, now_ms: u64) {
        self.release(proto, port, now_ms, None);
        if let Some(c) = self.cooling.back_mut() {
            if c.proto == proto && c.port == port {
                c.forward = true;
            }
        }
    }

    /// Number of ports in quarantine.
    pub(super) fn cooling_len(&self) -> usize {
        self.cooling.len()
    }

    /// The quarantine FIFO, oldest first.
    #[cfg(test)]
    pub(super) fn cooling(&self) -> impl Iterator<Item = &Cooling> {
        self.cooling.iter()
    }
}

/// Number of ports `p` in `lo..=hi` with `p % w == k`.
fn owned_count(lo: u32, hi: u32, w: u32, k: u32) -> u32 {
    if lo > hi {
        return 0;
    }
    let first = lo + (k + w - lo % w) % w;
    if first > hi {
        0
    } else {
        (hi - first) / w + 1
    }
}

/// A random free port `p` in `lo..=hi` with `p % w == k`: random start, then
/// a linear scan over the owned ports (RFC 6056 §3.3.2-like).
fn pick_port(used: &PortSet, rng: &mut PortRng, lo: u32, hi: u32, w: u32, k: u32) -> Option<u16> {
    let n = owned_count(lo, hi, w, k);
    if n == 0 {
        return None;
    }
    let first = lo + (k + w - lo % w) % w;
    let start = rng.below(n);
    for step in 0..n {
        let mut j = start + step;
        if j >= n {
            j -= n;
        }
        let p = (first + j * w) as u16;
        if !used.contains(p) {
            return Some(p);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_count_matches_a_count() {
        for w in 1..=5u32 {
            for k in 0..w {
                for (lo, hi) in [
                    (0, 0),
                    (0, 9),
                    (3, 17),
                    (1000, 1003),
                    (9, 3),
                    (65530, 65535),
                ] {
                    let n = (lo..=hi).filter(|p| p % w == k).count() as u32;
                    assert_eq!(owned_count(lo, hi, w, k), n, "{lo}..={hi} {k}/{w}");
                }
            }
        }
    }

    #[test]
    fn port_rng_is_keyed_uniform_and_deterministic_per_seed() {
        let draw = |seed| {
            let mut r = PortRng::new(seed);
            (0..4096).map(|_| r.below(16)).collect::<Vec<u32>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1), "one seed, one sequence (tests rely on it)");
        let b = draw(2);
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same < 400, "seeds 1 and 2 agree on {same} of 4096");
        let mut buckets = [0u32; 16];
        for v in &a {
            buckets[*v as usize] += 1;
        }
        // 256 expected each; a bad generator lands far outside.
        assert!(
            buckets.iter().all(|&n| (180..=340).contains(&n)),
            "{buckets:?}"
        );
        let mut r = PortRng::new(9);
        assert!((0..1000).all(|_| r.below(3) < 3));
        assert_eq!(r.below(1), 0);
    }

    #[test]
    fn pick_port_finds_the_last_free_owned_port() {
        let mut used = PortSet::new();
        let mut rng = PortRng::new(3);
        // Worker 1 of 3 in 10..=30 owns 10, 13, ..., 28; leave only 19.
        for p in (10..=30u16).filter(|p| p % 3 == 1 && *p != 19) {
            used.insert(p);
        }
        for _ in 0..20 {
            assert_eq!(pick_port(&used, &mut rng, 10, 30, 3, 1), Some(19));
        }
        used.insert(19);
        assert_eq!(pick_port(&used, &mut rng, 10, 30, 3, 1), None);
        assert_eq!(pick_port(&used, &mut rng, 11, 12, 3, 1), None);
    }

    #[test]
    fn drain_cooling_frees_due_ports_unless_held() {
        let mut p = Ports::new(&TableConfig {
            port_reuse_delay_ms: 100,
            ..crate::nat::table::tests::cfg(0, 1, 2000, 2003, 10)
        });
        assert!(p.reserve(Proto::Udp, 2000));
        assert!(p.reserve(Proto::Udp, 2001));
        assert!(!p.reserve(Proto::Udp, 2001));
        p.release(Proto::Udp, 2000, 0, None);
        p.release(Proto::Udp, 2001, 50, None);
        assert_eq!(p.cooling_len(), 2);
        p.drain_cooling(99, |_, _| false, |_, _| {});
        assert!(p.is_used(Proto::Udp, 2000) && p.is_used(Proto::Udp, 2001));
        p.drain_cooling(100, |_, _| false, |_, _| {});
        assert!(!p.is_used(Proto::Udp, 2000) && p.is_used(Proto::Udp, 2001));
        // Held meanwhile: the bit stays, the quarantine still ends.
        p.drain_cooling(
            150,
            |proto, port| (proto, port) == (Proto::Udp, 2001),
            |_, _| {},
        );
        assert!(p.is_used(Proto::Udp, 2001));
        assert_eq!(p.cooling_len(), 0);
        // ICMP ids are free at once.
        assert!(p.reserve(Proto::Icmp, 7));
        p.release(Proto::Icmp, 7, 0, None);
        assert!(!p.is_used(Proto::Icmp, 7));
    }
}
