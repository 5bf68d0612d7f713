//! The neighbour table's state machine, as Linux's neighbour reachability
//! (RFC 1122 §2.3.2.1; `net/core/neighbour.c`, `net/ipv4/arp.c`; the
//! sysctls in `Documentation/networking/ip-sysctl.rst`):
//!
//! ```text
//!  (none) ──packet──> INCOMPLETE ──ARP──> REACHABLE ──reachable_time──> STALE
//!                     mcast_solicit            ^  ^                       │ used
//!                     broadcasts, then         │  └──confirmed── DELAY <──┘
//!                     FAILED: removed,         │                   │ delay_first_probe_time
//!                     Host Unreachable         └────ARP reply──── PROBE (ucast_solicit
//!                                                                   │  unicast requests)
//!                                      INCOMPLETE (broadcast) <─────┘ no answer
//! ```
//!
//! An entry is created only by ARP addressed to the gateway (a request for
//! one of its addresses, a reply to its own request) or by a packet that
//! needs it (INCOMPLETE, no MAC yet); its MAC is changed only by ARP, never
//! by a data frame. ARP overheard on the link (a request for somebody else,
//! a gratuitous ARP) updates an existing entry only, as Linux's
//! `arp_process` does with `arp_accept = 0`. A different MAC replaces the
//! entry's only after `locktime` since its last change (gratuitous ARP
//! always does), so two answers back to back do not flap it. Traffic from
//! the neighbour with the entry's MAC confirms it (keeps it REACHABLE).
//!
//! Everything is bounded: resolved entries (`gc_thresh3`), unresolved ones,
//! frames held per unresolved entry (`unres_qlen`) and in all, and the
//! broadcast requests sent per second. Pure: time is the `now` argument
//! (milliseconds), randomness a seeded generator, and every consequence is
//! an [`Effect`] the caller carries out.
use std::collections::VecDeque;
use std::net::Ipv4Addr;

use hashbrown::HashMap;
use smoltcp::wire::EthernetAddress;

/// The timers and bounds; [`Params::LINUX`] are the kernel's defaults,
/// [`Params::TAPNAT`] the gateway's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// `base_reachable_time_ms`: REACHABLE lasts a random 0.5–1.5× this.
    pub base_reachable_ms: u64,
    /// `delay_first_probe_time`: STALE and used, wait this long for a
    /// confirmation before probing.
    pub delay_first_probe_ms: u64,
    /// `retrans_time_ms`: between two requests for one neighbour.
    pub retrans_ms: u64,
    /// `ucast_solicit`: unicast requests to a known MAC before giving it up.
    pub ucast_solicit: u32,
    /// `mcast_solicit`: broadcast requests before resolution fails.
    pub mcast_solicit: u32,
    /// `locktime`: a different MAC is taken only this long after the last
    /// change (a gratuitous ARP is taken at once).
    pub locktime_ms: u64,
    /// `gc_stale_time`: a STALE entry nobody used for this long is removed.
    pub gc_stale_ms: u64,
    /// `gc_thresh3`: at most this many entries with a MAC.
    pub max_entries: usize,
    /// At most this many unresolved (INCOMPLETE) entries.
    pub max_unresolved: usize,
    /// `unres_qlen`: frames held per unresolved entry.
    pub unres_qlen: usize,
    /// Frames held for every unresolved entry together.
    pub max_held: usize,
    /// Broadcast requests a second, and the burst allowed.
    pub broadcasts_per_sec: u32,
    pub broadcast_burst: u32,
}

impl Params {
    /// Linux's defaults (`net.ipv4.neigh.default.*`); the bounds on
    /// unresolved entries, held frames and broadcasts are ours (Linux has
    /// none beyond `gc_thresh3` and `unres_qlen_bytes`).
    pub const LINUX: Params = Params {
        base_reachable_ms: 30_000,
        delay_first_probe_ms: 5_000,
        retrans_ms: 1_000,
        ucast_solicit: 3,
        mcast_solicit: 3,
        locktime_ms: 1_000,
        gc_stale_ms: 60_000,
        max_entries: 1024,
        max_unresolved: 256,
        // Linux holds up to unres_qlen_bytes (212992) per entry, about 100
        // full frames: enough for a fragmented datagram or a burst.
        unres_qlen: 32,
        max_held: 128,
        broadcasts_per_sec: 100,
        broadcast_burst: 100,
    };
}

impl Params {
    /// tapnat's defaults: Linux's, but REACHABLE for 2.5–7.5 s
    /// (`base_reachable_time` 5 s, Linux 30 s) and DELAY 3 s (Linux 5 s),
    /// so that a neighbour whose MAC changed without a word (a pod
    /// re-created, a router failed over) is found again within
    /// 7.5 + 3 + 3 = 13.5 s of the change, not Linux's 53 s. Frames from a
    /// neighbour's own MAC confirm it (the first one after it went STALE:
    /// one message to the control thread per REACHABLE period), so only a
    /// neighbour that sends nothing back is probed, with 3 unicast ARP
    /// requests at most every few seconds.
    pub const TAPNAT: Params = Params {
        base_reachable_ms: 5_000,
        delay_first_probe_ms: 3_000,
        ..Params::LINUX
    };
}

impl Default for Params {
    fn default() -> Params {
        Params::TAPNAT
    }
}

/// Where an entry is in its life (Linux's `NUD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No MAC yet: `sent` broadcast requests so far, the next at `next`.
    Incomplete { sent: u32, next: u64 },
    /// Confirmed; goes STALE at `until`.
    Reachable { until: u64 },
    /// Not confirmed lately; still used. Removed after `gc_stale_ms` unused.
    Stale { since: u64 },
    /// Used while STALE: probing starts at `until` unless confirmed first.
    Delay { until: u64 },
    /// `sent` unicast requests to the MAC so far, the next at `next`.
    Probe { sent: u32, next: u64 },
}

/// How an ARP packet relates to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpKind {
    /// A request for one of the gateway's addresses or a reply to its own
    /// request: creates or updates the sender's entry, and confirms it.
    ToUs,
    /// A request for somebody else overheard on the link: updates an
    /// existing entry (to STALE when the MAC changes), creates none.
    Overheard,
    /// A gratuitous ARP (sender address = target address): as `Overheard`,
    /// but replaces a MAC even within the lock time.
    Gratuitous,
}

/// What the workers' copies should know about an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum News {
    /// Use this MAC; it is confirmed.
    Reachable(EthernetAddress),
    /// Use this MAC, and report the first use and the first frame from it.
    Stale(EthernetAddress),
    /// Forget the address: frames for it come to the control thread.
    Gone,
}

/// What a worker noticed, for the control thread's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// It sent a frame using an entry it was told is STALE.
    Used(Ipv4Addr),
    /// A frame came from `ip` with source MAC `mac`, an entry told STALE.
    Confirmed(Ipv4Addr, EthernetAddress),
    /// ARP on the link that is not addressed to the gateway (those go to
    /// its own stack): may update an existing entry.
    Arp {
        ip: Ipv4Addr,
        mac: EthernetAddress,
        kind: ArpKind,
    },
}

/// Why the table let go of a frame without sending it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The entry already holds `unres_qlen` frames, or all entries
    /// together `max_held`.
    QueueFull,
    /// No room for another unresolved entry.
    TableFull,
}

/// What the caller must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect<F> {
    /// Tell every worker.
    Tell(Ipv4Addr, News),
    /// Send a held (or just given) frame to this MAC.
    Send(EthernetAddress, F),
    /// Send an ARP request for `ip`: unicast to `to`, or broadcast.
    Solicit {
        ip: Ipv4Addr,
        to: Option<EthernetAddress>,
    },
    /// A broadcast request held back by the rate limit.
    SolicitLimited(Ipv4Addr),
    /// Resolution failed: answer the frame's sender with Host Unreachable.
    Unreachable(F),
    /// Count and free the frame.
    Refused(Refused, F),
    /// A neighbour was learned or its MAC changed.
    Learned(Ipv4Addr, EthernetAddress),
    /// A different MAC for `ip` refused within the lock time.
    Locked(Ipv4Addr),
    /// An entry was removed (failed resolution, or unused and stale).
    Removed(Ipv4Addr),
}

struct Entry<F> {
    mac: Option<EthernetAddress>,
    state: State,
    /// When the MAC last changed (for `locktime`).
    updated: u64,
    held: VecDeque<F>,
}

/// The table. `F` is a held frame (the gateway's buffer and side).
pub struct Table<F> {
    p: Params,
    entries: HashMap<Ipv4Addr, Entry<F>>,
    resolved: usize,
    unresolved: usize,
    held: usize,
    rng: u64,
    /// Broadcast budget, in thousandths of a request, refilled at `last`.
    tokens_milli: u64,
    last: u64,
}

impl<F> Table<F> {
    pub fn new(p: Params, seed: u64) -> Table<F> {
        Table {
            p,
            entries: HashMap::new(),
            resolved: 0,
            unresolved: 0,
            held: 0,
            rng: seed | 1,
            tokens_milli: u64::from(p.broadcast_burst) * 1000,
            last: 0,
        }
    }

    pub fn params(&self) -> &Params {
        &self.p
    }

    /// Entries with a MAC, and unresolved ones.
    pub fn counts(&self) -> (usize, usize) {
        (self.resolved, self.unresolved)
    }

    /// Frames held for unresolved entries.
    pub fn held(&self) -> usize {
        self.held
    }

    pub fn state(&self, ip: Ipv4Addr) -> Option<(Option<EthernetAddress>, State)> {
        self.entries.get(&ip).map(|e| (e.mac, e.state))
    }

    /// The MAC to send to now, if any.
    pub fn mac(&self, ip: Ipv4Addr) -> Option<EthernetAddress> {
        self.entries.get(&ip).and_then(|e| e.mac)
    }

    /// Every address with a MAC, for a worker that starts late.
    pub fn known(&self) -> impl Iterator<Item = (Ipv4Addr, EthernetAddress)> + '_ {
        self.entries
            .iter()
            .filter_map(|(ip, e)| Some((*ip, e.mac?)))
    }

    fn reachable_until(&mut self, now: u64) -> u64 {
        // xorshift64*: a uniform factor in [0.5, 1.5), as neigh_rand_reach_time.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let base = self.p.base_reachable_ms.max(1);
        now + base / 2 + self.rng % base
    }

    fn may_broadcast(&mut self, now: u64) -> bool {
        let elapsed = now.saturating_sub(self.last);
        self.last = self.last.max(now);
        let cap = u64::from(self.p.broadcast_burst) * 1000;
        self.tokens_milli = (self.tokens_milli
            + elapsed.saturating_mul(u64::from(self.p.broadcasts_per_sec)))
        .min(cap);
        if self.tokens_milli >= 1000 {
            self.tokens_milli -= 1000;
            true
        } else {
            false
        }
    }

    fn broadcast(&mut self, ip: Ipv4Addr, now: u64, out: &mut Vec<Effect<F>>) {
        if self.may_broadcast(now) {
            out.push(Effect::Solicit { ip, to: None });
        } else {
            out.push(Effect::SolicitLimited(ip));
        }
    }

    /// A frame for `ip`, whose MAC the worker that translated it did not
    /// know: sent at once if the table knows it, else held (within the
    /// bounds) while `ip` is resolved.
    pub fn resolve(&mut self, ip: Ipv4Addr, frame: F, now: u64, out: &mut Vec<Effect<F>>) {
        if let Some(e) = self.entries.get_mut(&ip) {
            if let Some(mac) = e.mac {
                out.push(Effect::Send(mac, frame));
                return self.used(ip, now);
            }
            if e.held.len() >= self.p.unres_qlen || self.held >= self.p.max_held {
                return out.push(Effect::Refused(Refused::QueueFull, frame));
            }
            e.held.push_back(frame);
            self.held += 1;
            return;
        }
        if self.unresolved >= self.p.max_unresolved {
            return out.push(Effect::Refused(Refused::TableFull, frame));
        }
        let mut held = VecDeque::new();
        if self.held < self.p.max_held && self.p.unres_qlen > 0 {
            held.push_back(frame);
            self.held += 1;
        } else {
            out.push(Effect::Refused(Refused::QueueFull, frame));
        }
        self.entries.insert(
            ip,
            Entry {
                mac: None,
                state: State::Incomplete {
                    sent: 1,
                    next: now + self.p.retrans_ms,
                },
                updated: now,
                held,
            },
        );
        self.unresolved += 1;
        self.broadcast(ip, now, out);
    }

    /// Asks for `ip` once, with nothing held and no entry made (the uplink
    /// next hop at start, whose link may not be up yet): the answer, if
    /// any, creates the entry; a packet for it meanwhile starts a
    /// resolution of its own at once.
    pub fn ask(&mut self, ip: Ipv4Addr, now: u64, out: &mut Vec<Effect<F>>) {
        if !self.entries.contains_key(&ip) {
            self.broadcast(ip, now, out);
        }
    }

    /// A worker used a STALE entry: wait for a confirmation, then probe.
    pub fn used(&mut self, ip: Ipv4Addr, now: u64) {
        if let Some(e) = self.entries.get_mut(&ip) {
            if let State::Stale { .. } = e.state {
                e.state = State::Delay {
                    until: now + self.p.delay_first_probe_ms,
                };
            }
        }
    }

    /// Traffic came from `ip` with source MAC `mac`: if that is the
    /// entry's MAC, the neighbour is reachable.
    pub fn confirmed(&mut self, ip: Ipv4Addr, mac: EthernetAddress, now: u64) {
        let until = self.reachable_until(now);
        if let Some(e) = self.entries.get_mut(&ip) {
            if e.mac == Some(mac) {
                e.state = State::Reachable { until };
            }
        }
    }

    /// An ARP packet from `ip` with sender MAC `mac`.
    pub fn arp(
        &mut self,
        ip: Ipv4Addr,
        mac: EthernetAddress,
        kind: ArpKind,
        now: u64,
        out: &mut Vec<Effect<F>>,
    ) {
        let until = self.reachable_until(now);
        let state = match kind {
            ArpKind::ToUs => State::Reachable { until },
            ArpKind::Overheard | ArpKind::Gratuitous => State::Stale { since: now },
        };
        let Some(e) = self.entries.get_mut(&ip) else {
            if kind != ArpKind::ToUs || !self.make_room(now, out) {
                return;
            }
            self.entries.insert(
                ip,
                Entry {
                    mac: Some(mac),
                    state,
                    updated: now,
                    held: VecDeque::new(),
                },
            );
            self.resolved += 1;
            out.push(Effect::Learned(ip, mac));
            return out.push(Effect::Tell(ip, News::Reachable(mac)));
        };
        match e.mac {
            None => {
                // INCOMPLETE: any ARP from it resolves it (Linux takes an
                // overheard one too); the held frames go out.
                e.mac = Some(mac);
                e.state = state;
                e.updated = now;
                self.unresolved -= 1;
                self.resolved += 1;
                self.held -= e.held.len();
                out.push(Effect::Learned(ip, mac));
                out.push(Effect::Tell(ip, news(mac, state)));
                for f in e.held.drain(..) {
                    out.push(Effect::Send(mac, f));
                }
            }
            Some(old) if old == mac => {
                // The same MAC: a reply or request to us confirms; overheard
                // ARP leaves the state as it is (neigh_update keeps a
                // connected state for the same address).
                if kind == ArpKind::ToUs {
                    e.state = state;
                }
            }
            Some(_) => {
                let unlocked = now >= e.updated + self.p.locktime_ms;
                if !(unlocked || kind == ArpKind::Gratuitous) {
                    return out.push(Effect::Locked(ip));
                }
                e.mac = Some(mac);
                e.state = state;
                e.updated = now;
                out.push(Effect::Learned(ip, mac));
                out.push(Effect::Tell(ip, news(mac, state)));
            }
        }
    }

    /// Room for one more entry with a MAC: the stalest unused entry goes
    /// when the table is full; false when there is none to let go.
    fn make_room(&mut self, now: u64, out: &mut Vec<Effect<F>>) -> bool {
        if self.resolved < self.p.max_entries {
            return true;
        }
        let victim = self
            .entries
            .iter()
            .filter_map(|(ip, e)| match e.state {
                State::Stale { since } => Some((since, *ip)),
                _ => None,
            })
            .min();
        let Some((_, ip)) = victim else {
            return false;
        };
        self.remove(ip, now, out);
        true
    }

    fn remove(&mut self, ip: Ipv4Addr, _now: u64, out: &mut Vec<Effect<F>>) {
        let Some(mut e) = self.entries.remove(&ip) else {
            return;
        };
        if e.mac.is_some() {
            self.resolved -= 1;
            out.push(Effect::Tell(ip, News::Gone));
        } else {
            self.unresolved -= 1;
            self.held -= e.held.len();
            for f in e.held.drain(..) {
                out.push(Effect::Unreachable(f));
            }
        }
        out.push(Effect::Removed(ip));
    }

    /// The timers: call often (every few hundred milliseconds at most).
    pub fn tick(&mut self, now: u64, out: &mut Vec<Effect<F>>) {
        let mut due = Vec::new();
        for (ip, e) in &self.entries {
            let at = match e.state {
                State::Incomplete { next, .. } | State::Probe { next, .. } => next,
                State::Reachable { until } | State::Delay { until } => until,
                State::Stale { since } => since + self.p.gc_stale_ms,
            };
            if now >= at {
                due.push(*ip);
            }
        }
        for ip in due {
            self.expire(ip, now, out);
        }
    }

    fn expire(&mut self, ip: Ipv4Addr, now: u64, out: &mut Vec<Effect<F>>) {
        let p = self.p;
        let Some(e) = self.entries.get_mut(&ip) else {
            return;
        };
        match (e.state, e.mac) {
            (State::Incomplete { sent, .. }, _) => {
                if sent >= p.mcast_solicit {
                    return self.remove(ip, now, out);
                }
                e.state = State::Incomplete {
                    sent: sent + 1,
                    next: now + p.retrans_ms,
                };
                self.broadcast(ip, now, out);
            }
            (State::Reachable { .. }, Some(mac)) => {
                e.state = State::Stale { since: now };
                out.push(Effect::Tell(ip, News::Stale(mac)));
            }
            (State::Stale { .. }, Some(_)) => self.remove(ip, now, out),
            (State::Delay { .. }, Some(mac)) => {
                e.state = State::Probe {
                    sent: 1,
                    next: now + p.retrans_ms,
                };
                out.push(Effect::Solicit { ip, to: Some(mac) });
            }
            (State::Probe { sent, .. }, Some(mac)) if sent < p.ucast_solicit => {
                e.state = State::Probe {
                    sent: sent + 1,
                    next: now + p.retrans_ms,
                };
                out.push(Effect::Solicit { ip, to: Some(mac) });
            }
            (State::Probe { .. }, Some(_)) => {
                // The MAC did not answer: forget it and ask everybody.
                if self.unresolved >= p.max_unresolved {
                    return self.remove(ip, now, out);
                }
                e.mac = None;
                e.state = State::Incomplete {
                    sent: 1,
                    next: now + p.retrans_ms,
                };
                self.resolved -= 1;
                self.unresolved += 1;
                out.push(Effect::Tell(ip, News::Gone));
                self.broadcast(ip, now, out);
            }
            (_, None) => self.remove(ip, now, out),
        }
    }
}

fn news(mac: EthernetAddress, state: State) -> News {
    match state {
        State::Reachable { .. } => News::Reachable(mac),
        _ => News::Stale(mac),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);
    const M1: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
    const M2: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

    /// A table and a fake clock.
    struct Rig {
        t: Table<u32>,
        now: u64,
        out: Vec<Effect<u32>>,
    }

    impl Rig {
        fn new(p: Params) -> Rig {
            Rig {
                t: Table::new(p, 7),
                now: 1_000,
                out: Vec::new(),
            }
        }
        fn take(&mut self) -> Vec<Effect<u32>> {
            std::mem::take(&mut self.out)
        }
        /// Advances the clock to `ms` in 100 ms ticks, collecting effects.
        fn run_to(&mut self, ms: u64) -> Vec<Effect<u32>> {
            while self.now < ms {
                self.now = (self.now + 100).min(ms);
                self.t.tick(self.now, &mut self.out);
            }
            self.take()
        }
        fn arp(&mut self, ip: Ipv4Addr, mac: EthernetAddress, k: ArpKind) -> Vec<Effect<u32>> {
            self.t.arp(ip, mac, k, self.now, &mut self.out);
            self.take()
        }
        fn resolve(&mut self, ip: Ipv4Addr, f: u32) -> Vec<Effect<u32>> {
            self.t.resolve(ip, f, self.now, &mut self.out);
            self.take()
        }
        fn state(&self, ip: Ipv4Addr) -> Option<State> {
            self.t.state(ip).map(|s| s.1)
        }
        /// When the state of `ip` next changes from what it is now (ms).
        fn time_in_state(&mut self, ip: Ipv4Addr) -> u64 {
            let start = self.now;
            let kind = std::mem::discriminant(&self.state(ip).unwrap());
            while self.state(ip).map(|s| std::mem::discriminant(&s)) == Some(kind) {
                self.now += 10;
                self.t.tick(self.now, &mut self.out);
            }
            self.now - start
        }
    }

    #[test]
    fn asking_makes_no_entry_and_the_answer_does() {
        let mut r = Rig::new(Params::LINUX);
        r.t.ask(A, r.now, &mut r.out);
        assert_eq!(r.take(), [Effect::Solicit { ip: A, to: None }]);
        assert_eq!(r.t.state(A), None);
        // A packet meanwhile asks again at once.
        assert_eq!(r.resolve(A, 1), [Effect::Solicit { ip: A, to: None }]);
        let e = r.arp(A, M1, ArpKind::ToUs);
        assert!(e.contains(&Effect::Send(M1, 1)), "{e:?}");
    }

    #[test]
    fn resolution_holds_frames_then_sends_them_on_the_reply() {
        let mut r = Rig::new(Params::LINUX);
        assert_eq!(r.resolve(A, 1), [Effect::Solicit { ip: A, to: None }]);
        assert_eq!(r.resolve(A, 2), []);
        assert_eq!(
            r.arp(A, M1, ArpKind::ToUs),
            [
                Effect::Learned(A, M1),
                Effect::Tell(A, News::Reachable(M1)),
                Effect::Send(M1, 1),
                Effect::Send(M1, 2)
            ]
        );
        assert_eq!(r.t.held(), 0);
        assert_eq!(r.t.counts(), (1, 0));
        assert_eq!(r.resolve(A, 3), [Effect::Send(M1, 3)]);
    }

    #[test]
    fn failed_resolution_broadcasts_mcast_solicit_times_then_answers_unreachable() {
        let mut r = Rig::new(Params {
            unres_qlen: 3,
            ..Params::LINUX
        });
        let start = r.now;
        assert_eq!(r.resolve(A, 1), [Effect::Solicit { ip: A, to: None }]);
        r.resolve(A, 2);
        r.resolve(A, 3);
        assert_eq!(r.resolve(A, 4), [Effect::Refused(Refused::QueueFull, 4)]);
        let e = r.run_to(start + 2_999);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e.iter().all(|e| *e == Effect::Solicit { ip: A, to: None }));
        let e = r.run_to(start + 3_000);
        assert_eq!(
            e,
            [
                Effect::Unreachable(1),
                Effect::Unreachable(2),
                Effect::Unreachable(3),
                Effect::Removed(A)
            ]
        );
        assert_eq!(r.t.counts(), (0, 0));
        assert_eq!(r.t.held(), 0);
    }

    #[test]
    fn reachable_lasts_half_to_one_and_a_half_base_then_stale() {
        let mut r = Rig::new(Params::LINUX);
        let mut seen = Vec::new();
        for i in 0..40u8 {
            let ip = Ipv4Addr::new(10, 244, 1, i);
            r.arp(ip, M1, ArpKind::ToUs);
            let t = r.time_in_state(ip);
            assert!((15_000..=45_010).contains(&t), "{t}");
            assert!(matches!(r.state(ip), Some(State::Stale { .. })));
            assert!(r.take().contains(&Effect::Tell(ip, News::Stale(M1))));
            seen.push(t);
        }
        seen.sort();
        assert!(seen[39] - seen[0] > 10_000, "randomised: {seen:?}");
    }

    #[test]
    fn stale_used_delays_then_probes_unicast_and_a_reply_makes_it_reachable() {
        let mut r = Rig::new(Params::LINUX);
        r.arp(A, M1, ArpKind::ToUs);
        r.run_to(r.now + 45_100);
        assert!(matches!(r.state(A), Some(State::Stale { .. })));
        // A worker used it: DELAY for delay_first_probe_time.
        r.t.used(A, r.now);
        assert_eq!(r.time_in_state(A), 5_000);
        let e = r.take();
        assert_eq!(
            e,
            [Effect::Solicit {
                ip: A,
                to: Some(M1)
            }]
        );
        // Still sent to M1 while probing.
        assert_eq!(r.resolve(A, 9), [Effect::Send(M1, 9)]);
        r.arp(A, M1, ArpKind::ToUs);
        assert!(matches!(r.state(A), Some(State::Reachable { .. })));
    }

    #[test]
    fn confirmation_by_traffic_keeps_it_reachable_and_needs_the_same_mac() {
        let mut r = Rig::new(Params::LINUX);
        r.arp(A, M1, ArpKind::ToUs);
        r.run_to(r.now + 45_100);
        r.t.used(A, r.now);
        r.t.confirmed(A, M2, r.now);
        assert!(matches!(r.state(A), Some(State::Delay { .. })));
        r.t.confirmed(A, M1, r.now);
        assert!(matches!(r.state(A), Some(State::Reachable { .. })));
        assert_eq!(r.take(), []);
    }

    #[test]
    fn a_silent_mac_change_is_found_by_probing_then_broadcast() {
        let p = Params::LINUX;
        let mut r = Rig::new(p);
        r.arp(A, M1, ArpKind::ToUs);
        r.run_to(r.now + 45_100);
        r.t.used(A, r.now);
        let t0 = r.now;
        r.time_in_state(A); // DELAY
        r.time_in_state(A); // PROBE: 3 unicast requests
        let e = r.take();
        let unicast = e
            .iter()
            .filter(|e| {
                **e == Effect::Solicit {
                    ip: A,
                    to: Some(M1),
                }
            })
            .count();
        assert_eq!(unicast, 3, "{e:?}");
        assert_eq!(r.now - t0, 5_000 + 3_000);
        assert!(e.contains(&Effect::Tell(A, News::Gone)));
        assert!(e.contains(&Effect::Solicit { ip: A, to: None }));
        assert!(matches!(r.state(A), Some(State::Incomplete { .. })));
        // The new MAC answers the broadcast; frames held meanwhile go to it.
        assert_eq!(r.resolve(A, 5), []);
        let e = r.arp(A, M2, ArpKind::ToUs);
        assert!(e.contains(&Effect::Send(M2, 5)), "{e:?}");
        assert_eq!(r.t.mac(A), Some(M2));
    }

    #[test]
    fn a_data_frame_never_creates_or_changes_an_entry_and_overheard_arp_creates_none() {
        let mut r = Rig::new(Params::LINUX);
        // Overheard ARP for somebody else: no entry.
        assert_eq!(r.arp(A, M1, ArpKind::Overheard), []);
        assert_eq!(r.arp(A, M1, ArpKind::Gratuitous), []);
        assert_eq!(r.t.state(A), None);
        // Traffic with another MAC does not change a known one.
        r.arp(A, M1, ArpKind::ToUs);
        r.t.confirmed(A, M2, r.now);
        assert_eq!(r.t.mac(A), Some(M1));
    }

    #[test]
    fn locktime_keeps_the_first_answer_but_gratuitous_arp_wins_at_once() {
        let mut r = Rig::new(Params::LINUX);
        r.arp(A, M1, ArpKind::ToUs);
        assert_eq!(r.arp(A, M2, ArpKind::ToUs), [Effect::Locked(A)]);
        assert_eq!(r.arp(A, M2, ArpKind::Overheard), [Effect::Locked(A)]);
        assert_eq!(r.t.mac(A), Some(M1));
        r.now += 1_000;
        assert_eq!(
            r.arp(A, M2, ArpKind::Overheard),
            [Effect::Learned(A, M2), Effect::Tell(A, News::Stale(M2))]
        );
        assert_eq!(
            r.arp(A, M1, ArpKind::Gratuitous),
            [Effect::Learned(A, M1), Effect::Tell(A, News::Stale(M1))]
        );
    }

    #[test]
    fn stale_unused_entries_are_removed_after_gc_stale_time() {
        let mut r = Rig::new(Params::LINUX);
        r.arp(A, M1, ArpKind::ToUs);
        r.time_in_state(A);
        r.take();
        assert_eq!(r.time_in_state(A), 60_000);
        assert_eq!(r.take(), [Effect::Tell(A, News::Gone), Effect::Removed(A)]);
        assert_eq!(r.t.counts(), (0, 0));
    }

    #[test]
    fn every_bound_holds_under_a_flood_of_unused_addresses() {
        let p = Params::LINUX;
        let mut r = Rig::new(p);
        r.arp(B, M1, ArpKind::ToUs);
        let (mut solicits, mut limited, mut full) = (0, 0, 0);
        for i in 0..20_000u32 {
            let ip = Ipv4Addr::from(0x0af4_0000 + 10 + i);
            for e in r.resolve(ip, i) {
                match e {
                    Effect::Solicit { .. } => solicits += 1,
                    Effect::SolicitLimited(_) => limited += 1,
                    Effect::Refused(Refused::TableFull, _) => full += 1,
                    Effect::Refused(Refused::QueueFull, _) => {}
                    e => panic!("{e:?}"),
                }
            }
            assert!(r.t.counts().1 <= p.max_unresolved);
            assert!(r.t.held() <= p.max_held);
        }
        assert_eq!(solicits, p.broadcast_burst);
        assert_eq!(solicits + limited, p.max_unresolved as u32);
        assert_eq!(full, 20_000 - p.max_unresolved as u32);
        // The known neighbour is untouched and still served.
        assert_eq!(r.resolve(B, 1), [Effect::Send(M1, 1)]);
        // After mcast_solicit retransmissions they all fail and are gone.
        let e = r.run_to(r.now + 3_000);
        let unreachable = e
            .iter()
            .filter(|e| matches!(e, Effect::Unreachable(_)))
            .count();
        assert_eq!(unreachable, p.max_held);
        assert_eq!(r.t.counts(), (1, 0));
        assert_eq!(r.t.held(), 0);
    }

    #[test]
    fn a_full_table_lets_the_stalest_entry_go_and_refuses_when_none_is_stale() {
        let p = Params {
            max_entries: 2,
            ..Params::LINUX
        };
        let mut r = Rig::new(p);
        r.arp(A, M1, ArpKind::ToUs);
        r.arp(B, M1, ArpKind::ToUs);
        let c = Ipv4Addr::new(10, 244, 0, 4);
        assert_eq!(r.arp(c, M2, ArpKind::ToUs), []);
        assert_eq!(r.t.state(c), None);
        r.run_to(r.now + 45_100);
        r.t.used(B, r.now);
        let e = r.arp(c, M2, ArpKind::ToUs);
        assert_eq!(e[..2], [Effect::Tell(A, News::Gone), Effect::Removed(A)]);
        assert_eq!(r.t.mac(c), Some(M2));
        assert_eq!(r.t.counts(), (2, 0));
    }
}
