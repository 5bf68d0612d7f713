//! Tests of the flow table through its facade, with a consistency check
//! of every part against the others. `rfc` covers the RFC 4787 / 5382 /
//! 6888 / 7857 behaviour, the other files one concern each.

use super::*;
use mappings::Mapping;
use ports::{Cooling, XorShift};
use tcp::SeqTrack;

mod eim;
mod expiry_drop;
mod ops;
mod pods;
mod property;
mod rfc;
mod tcp_states;

pub(super) const T: Timeouts = Timeouts {
    tcp_established_ms: 7_440_000,
    tcp_transitory_ms: 240_000,
    udp_ms: 300_000,
    icmp_ms: 60_000,
};

pub(super) fn cfg(worker: u16, workers: u16, first: u16, last: u16, max: usize) -> TableConfig {
    TableConfig {
        worker,
        workers,
        port_first: first,
        port_last: last,
        max_flows: max,
        max_flows_per_pod: 0,
        ports_per_pod: 0,
        timeouts: T,
        seed: 42,
        filtering: Filtering::AddressAndPort,
        port_reuse_delay_ms: 0,
    }
}

fn seg(flags: TcpFlags) -> TcpSeg {
    TcpSeg {
        flags,
        ..TcpSeg::NONE
    }
}

/// Accounts a segment with zero sequence fields; it must be accepted.
fn acc(t: &mut FlowTable, id: FlowId, dir: Direction, flags: TcpFlags, len: usize, now: u64) {
    assert_eq!(t.account(id, dir, seg(flags), len, now), Verdict::Accept);
}

fn table() -> FlowTable {
    FlowTable::new(cfg(0, 1, 1024, 65535, 1000))
}

const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

fn ik(proto: Proto, src: u8, sport: u16, dst: u8, dport: u16) -> InKey {
    InKey {
        proto,
        src: Ipv4Addr::new(10, 0, 0, src),
        sport,
        dst: Ipv4Addr::new(203, 0, 113, dst),
        dport,
    }
}

pub(super) const SYN: TcpFlags = TcpFlags::SYN;
pub(super) const SYNACK: TcpFlags = TcpFlags::SYN_ACK;
pub(super) const ACK: TcpFlags = TcpFlags::ACK;
pub(super) const FINACK: TcpFlags = TcpFlags::FIN_ACK;
pub(super) const RST: TcpFlags = TcpFlags::RST;
pub(super) const RSTACK: TcpFlags = TcpFlags::RST_ACK;
pub(super) const NONE: TcpFlags = TcpFlags::NONE;

/// A TCP segment with every field given.
pub(super) fn tseg(flags: TcpFlags, seq: u32, ack: u32, window: u16, payload_len: u32) -> TcpSeg {
    TcpSeg {
        flags,
        seq,
        ack,
        window,
        payload_len,
    }
}

/// The inside host's three-way handshake through `id`, 60-byte segments.
fn handshake(t: &mut FlowTable, id: FlowId, now: u64) {
    acc(t, id, Direction::In2Out, SYN, 60, now);
    acc(t, id, Direction::Out2In, SYNACK, 60, now);
    acc(t, id, Direction::In2Out, ACK, 60, now);
}

fn tcp_state(t: &FlowTable, id: FlowId) -> TcpState {
    match t.get(id).state {
        FlowState::Tcp(s) => s,
        s => panic!("not tcp: {s:?}"),
    }
}

/// Checks every part against the slab and each other: the index, the
/// mappings' refcounts and reverse index, the filter's sessions and the
/// port sets with the quarantine.
fn check_consistent(t: &FlowTable) {
    t.slab.check();
    let live: Vec<usize> = (0..t.slab.slots()).filter(|&i| t.slab.is_live(i)).collect();
    assert_eq!(live.len(), t.len());
    let mut refs: hashbrown::HashMap<MapKey, u32> = hashbrown::HashMap::new();
    let mut port_owner: hashbrown::HashMap<(Proto, u16), MapKey> = hashbrown::HashMap::new();
    let mut remotes: hashbrown::HashMap<(Proto, u16, Ipv4Addr), u32> = hashbrown::HashMap::new();
    for &i in &live {
        let f = t.slab.flow(i);
        assert_eq!(t.slab.find(&f.inside), Some(i));
        assert_eq!(t.find_out(&f.out_key()), Some(i));
        let mk = (f.inside.proto, f.inside.src, f.inside.sport);
        *refs.entry(mk).or_default() += 1;
        *remotes
            .entry((f.inside.proto, f.ext_port, f.inside.dst))
            .or_default() += 1;
        let m = *t.mappings.get(&mk).expect("flow without mapping");
        assert_eq!(m.ext_port, f.ext_port);
        // No overloading: one owner per (proto, port).
        let owner = port_owner.entry((f.inside.proto, f.ext_port)).or_insert(mk);
        assert_eq!(*owner, mk, "port overloaded");
        assert_eq!(
            u32::from(f.ext_port) % u32::from(t.cfg.workers),
            u32::from(t.cfg.worker)
        );
        if f.inside.proto != Proto::Icmp && !m.forward {
            assert!((t.cfg.port_first..=t.cfg.port_last).contains(&f.ext_port));
        }
    }
    let forwards = t.mappings.iter().filter(|(_, m)| m.forward).count();
    assert_eq!(forwards, t.forwards_len());
    for mk in refs.keys() {
        assert!(t.mappings.contains(mk));
    }
    for (mk, m) in t.mappings.iter() {
        assert_eq!(refs.get(mk).copied().unwrap_or(0), m.refs);
        assert!(m.forward || m.refs > 0);
        assert_eq!(t.mappings.owner_of(mk.0, m.ext_port), Some(*mk));
    }
    if t.cfg.filtering == Filtering::Address {
        assert_eq!(remotes, t.filter.sessions());
    } else {
        assert!(t.filter.sessions().is_empty());
    }
    for proto in [Proto::Icmp, Proto::Tcp, Proto::Udp] {
        let used = (0..=65535u16)
            .filter(|&p| t.ports.is_used(proto, p))
            .count();
        let mapped = t.mappings.iter().filter(|(k, _)| k.0 == proto).count();
        let cooling: std::collections::HashSet<u16> = t
            .ports
            .cooling()
            .filter(|c| c.proto == proto && t.mappings.owner_of(proto, c.port).is_none())
            .map(|c| c.port)
            .collect();
        for &p in &cooling {
            assert!(t.ports.is_used(proto, p));
        }
        assert_eq!(used, mapped + cooling.len(), "port set of {proto:?}");
    }
    // Per-pod use: the live flows of each inside address, and its dynamic
    // mappings plus the quarantined ports it released.
    let mut flows: hashbrown::HashMap<Ipv4Addr, u32> = hashbrown::HashMap::new();
    for &i in &live {
        *flows.entry(t.slab.flow(i).inside.src).or_default() += 1;
    }
    let mut charged: hashbrown::HashMap<Ipv4Addr, [u32; 3]> = hashbrown::HashMap::new();
    for (mk, _) in t.mappings.iter().filter(|(_, m)| !m.forward) {
        charged.entry(mk.1).or_default()[mk.0.index()] += 1;
    }
    let mut cooling: hashbrown::HashMap<Ipv4Addr, [u32; 3]> = hashbrown::HashMap::new();
    for c in t.ports.cooling() {
        if let Some(owner) = c.owner() {
            charged.entry(owner).or_default()[c.proto.index()] += 1;
            cooling.entry(owner).or_default()[c.proto.index()] += 1;
        }
    }
    let got: hashbrown::HashMap<Ipv4Addr, [u32; 3]> = t
        .pods
        .cooling_by_pod()
        .filter(|&(_, p)| p != [0; 3])
        .collect();
    assert_eq!(got, cooling, "quarantined ports per pod");
    let got: hashbrown::HashMap<Ipv4Addr, u32> =
        t.pods.flows_by_pod().filter(|&(_, n)| n > 0).collect();
    assert_eq!(got, flows, "flows per pod");
    let got: hashbrown::HashMap<Ipv4Addr, [u32; 3]> = t
        .pods
        .ports_by_pod()
        .filter(|&(_, p)| p != [0; 3])
        .collect();
    charged.retain(|_, p| *p != [0; 3]);
    assert_eq!(got, charged, "ports per pod");
    // The quarantine FIFO is sorted by deadline.
    let mut last = 0;
    for c in t.ports.cooling() {
        assert!(c.until_ms >= last);
        last = c.until_ms;
    }
}

/// What a table call did to the flows, from the table's own state: the
/// change in live flows and in the removal counters. A `create` or
/// `inbound` removes flows only by expiry or early drop, so the flows it
/// created are `len` after minus before plus what it removed.
#[derive(Debug, Clone, Copy)]
struct Before {
    len: usize,
    stats: TableStats,
}

impl Before {
    fn of(t: &FlowTable) -> Before {
        Before {
            len: t.len(),
            stats: t.stats(),
        }
    }

    /// Flows created since `self` (no `remove` or `expire` in between).
    fn created(self, t: &FlowTable) -> u64 {
        let s = t.stats();
        let removed = s.expired - self.stats.expired + s.early_dropped - self.stats.early_dropped;
        (t.len() as u64 + removed)
            .checked_sub(self.len as u64)
            .expect("flows vanished")
    }
}

/// Live flows opened from outside ([`FlowTable::inbound`]).
fn inbound_flows(t: &FlowTable) -> usize {
    (0..t.slab.slots())
        .filter(|&i| t.slab.is_live(i) && t.opened_inbound(FlowId(i as u32)))
        .count()
}

#[test]
fn flow_is_compact() {
    assert_eq!(std::mem::size_of::<InKey>(), 14);
    assert_eq!(std::mem::size_of::<OutKey>(), 14);
    assert_eq!(std::mem::size_of::<Flow>(), 64);
    assert_eq!(std::mem::size_of::<SeqTrack>(), 24);
    assert_eq!(std::mem::size_of::<(MapKey, Mapping)>(), 20);
    assert_eq!(std::mem::size_of::<Cooling>(), 16);
    assert_eq!(std::mem::size_of::<TcpSeg>(), 20);
    assert_eq!(std::mem::size_of::<(InKey, u32)>(), 20);
    assert_eq!(std::mem::size_of::<(OutKey, u32)>(), 20);
}

#[test]
fn insert_and_lookup_both_ways() {
    let mut t = table();
    let k = ik(Proto::Udp, 2, 5000, 9, 53);
    assert_eq!(t.lookup_in2out(&k, 0), None);
    let before = Before::of(&t);
    let id = t.create(&k, EXT, 0).unwrap();
    assert_eq!(t.lookup_in2out(&k, 1), Some(id));
    let f = *t.get(id);
    assert_eq!(f.inside, k);
    assert_eq!(f.ext_addr, EXT);
    assert_eq!(f.ext_port, 5000); // preserved
    assert_eq!(f.state, FlowState::Udp);
    assert!(!f.replied);
    let ok = OutKey {
        proto: Proto::Udp,
        remote: k.dst,
        rport: 53,
        ext: EXT,
        eport: 5000,
    };
    assert_eq!(f.out_key(), ok);
    assert_eq!(t.lookup_out2in(&ok, 1), Some(id));
    // Other keys miss.
    assert_eq!(t.lookup_out2in(&OutKey { rport: 54, ..ok }, 1), None);
    assert_eq!(
        t.lookup_out2in(
            &OutKey {
                proto: Proto::Tcp,
                ..ok
            },
            1
        ),
        None
    );
    assert_eq!(t.lookup_in2out(&InKey { dport: 54, ..k }, 1), None);
    // Creating an existing key returns it.
    assert_eq!(t.create(&k, EXT, 2), Ok(id));
    assert_eq!(t.len(), 1);
    assert_eq!(before.created(&t), 1);
    acc(&mut t, id, Direction::In2Out, NONE, 100, 3);
    acc(&mut t, id, Direction::Out2In, NONE, 40, 4);
    let f = t.get(id);
    assert_eq!(
        (
            f.packets_in2out,
            f.bytes_in2out,
            f.packets_out2in,
            f.bytes_out2in
        ),
        (1, 100, 1, 40)
    );
    assert!(f.replied);
    assert_eq!(f.last_seen_ms, 4);
    assert_eq!(t.iter().count(), 1);
    check_consistent(&t);
}

#[test]
fn ids_reused_and_clear() {
    let mut t = table();
    let a = t.create(&ik(Proto::Udp, 2, 5000, 9, 53), EXT, 0).unwrap();
    t.remove(a);
    let b = t.create(&ik(Proto::Tcp, 3, 5000, 9, 53), EXT, 0).unwrap();
    assert_eq!(a, b);
    t.clear();
    assert!(t.is_empty());
    assert_eq!(t.iter().count(), 0);
    check_consistent(&t);
    assert!(t.create(&ik(Proto::Tcp, 3, 5000, 9, 53), EXT, 0).is_ok());
}
