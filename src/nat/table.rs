//! The flow table of one worker: masquerading sessions, their outside ports,
//! static forwards, inbound filtering and expiry.
//!
//! # Contract
//!
//! * One `FlowTable` per worker thread, no locks. Worker `k` of `N` owns the
//!   outside ports (and ICMP echo ids) `p` with `p % N == k`; this table only
//!   ever hands out such ports, and only accepts forwards on them.
//! * Pure: no fds, threads or clocks. Every time-dependent call takes
//!   `now_ms`, milliseconds since an arbitrary start; it must not go backwards.
//! * A [`FlowId`] is the index of a slab slot and is reused after its flow is
//!   removed. An id is valid until the next call that may remove flows:
//!   [`FlowTable::lookup_in2out`], [`FlowTable::lookup_out2in`] (they drop an
//!   expired flow they hit), [`FlowTable::create`] and
//!   [`FlowTable::inbound`] (early drop), [`FlowTable::expire`],
//!   [`FlowTable::remove`] and [`FlowTable::clear`].
//!   [`FlowTable::get`] and [`FlowTable::account`] panic on an out-of-range
//!   id; a stale in-range id is a caller bug (checked in debug builds only).
//!
//! # Mapping behaviour
//!
//! * Endpoint-independent mapping (RFC 4787 REQ-1, RFC 5382 REQ-1, RFC 5508
//!   REQ-1a for ICMP ids): all flows of one inside endpoint
//!   `(proto, src, sport)` share one outside port. The mapping is refcounted
//!   by its flows and its port is released when the last one goes.
//! * Port preservation when the inside port is in range, owned by this worker
//!   and free; otherwise a random owned free port (RFC 6056 style: random
//!   start, linear scan), keeping the port class of RFC 4787 REQ-3a:
//!   0-1023 stays below 1024 while such ports exist (falling back to the
//!   rest of the range); 1024-65535 never gets a privileged port unless the
//!   configured range has no port >= 1024 for this worker.
//! * No port overloading (RFC 4787 REQ-3, RFC 5382 REQ-7): an outside port
//!   maps to at most one inside endpoint per protocol.
//! * Port quarantine (RFC 6888 REQ-8): with `port_reuse_delay_ms > 0`, a TCP
//!   or UDP port released by its mapping stays unusable — for every inside
//!   endpoint, its previous owner included — for that long. Released ports
//!   wait in a FIFO (release order = expiry order, as the delay is fixed)
//!   that is drained at allocation and sweep time; while they wait their bit
//!   stays set in the port set, so if only quarantined ports are left the
//!   create fails with [`CreateError::PortsExhausted`]. ICMP ids are reused
//!   at once (echo ids carry no connection state worth protecting).
//!
//! # Inbound packets without a session: filtering and forwards
//!
//! The fast path is [`FlowTable::lookup_out2in`] (exact 5-tuple). On a miss
//! the caller asks [`FlowTable::inbound`], which may create a session whose
//! initiator is the remote host:
//!
//! * A static forward ([`FlowTable::add_forward`], DNAT) on `(proto, ext
//!   addr, ext port)` always opens a session towards its inside target.
//! * Otherwise a live mapping on `(proto, ext addr, ext port)` is needed
//!   and [`Filtering`] (RFC 4787 REQ-8, RFC 5382 REQ-3) decides: endpoint
//!   independent = any remote; address dependent = a remote address the
//!   mapping already has a session with; address and port dependent = never
//!   (a session would have matched the 5-tuple).
//! * TCP needs a SYN without ACK; nothing else ever creates a session
//!   (RFC 5382 REQ-4 leaves an unsolicited SYN unanswered, the caller drops
//!   it). ICMP never creates inbound sessions.
//!
//! A mapping is "live" while it has flows that are not yet removed; a flow
//! that has timed out but not been swept yet still counts (the sweep cursor
//! removes it within one lap). The address-dependent check uses a counter
//! per `(proto, ext port, remote address)`, kept only in that mode.
//!
//! A forward is a permanent mapping of its target endpoint: its port is
//! reserved (never allocated dynamically, never released, kept by
//! [`FlowTable::clear`]) and outbound flows of the target that miss get it
//! too, with the forward's address (so replies to a new connection keep the
//! forwarded port, RFC 4787 REQ-1); [`FlowTable::forward_for_inside`]
//! exposes it for the caller's steering.
//!
//! # Limits
//!
//! `max_flows` is a hard bound. When it is reached, [`FlowTable::create`]
//! and [`FlowTable::inbound`] scan [`EARLY_DROP_SCAN`] slots from the sweep
//! cursor: the first expired flow found is removed (counted as expired),
//! else the least recently seen unreplied flow is evicted (`early_dropped`,
//! like conntrack's `early_drop` of non-assured entries); replied flows are
//! never evicted for a new one. Otherwise the create fails with
//! [`CreateError::TableFull`] and `table_full` counts it. "Replied" means
//! the responder (the side that did not open the flow) has sent a packet,
//! so a SYN flood from either side only ever evicts its own kind.
//!
//! # TCP state machine
//!
//! Driven by the SYN/ACK/FIN/RST flags of segments, from the initiator's
//! point of view (the inside host for [`FlowTable::create`], the remote one
//! for [`FlowTable::inbound`]). RSTs are validated against the tracked
//! sequence space first (see the `tcp` submodule's docs): an out-of-window
//! RST gets [`Verdict::DropInvalidRst`] and changes nothing. A valid one
//! closes the flow, which then lives for the transitory timeout
//! (RFC 5382 REQ-5 / RFC 7857 §2.2 keep the mapping that long after a RST).
//!
//! ```text
//!                     create() / inbound()
//!                        |
//!                        v
//!   +----------------> SynSent --SYN or SYN+ACK from--> SynReceived
//!   |  SYN from          |           responder           |
//!   |  initiator         | ACK from responder,           | ACK w/o SYN either way,
//!   |  (reopen)          | no SYN seen                   | or SYN+ACK both ways
//!   |                    | (mid-stream pickup)           | (simultaneous open)
//!   |                    v                               |
//!   |               Established <------------------------+
//!   |                    |
//!   |                    | FIN one way (also from SynReceived)
//!   |                    v
//!   |                 FinWait --FIN the other way--> Closing
//!   |                                                  |
//!   +--------------------------------------------------+
//!   +-- Closed <-- valid RST either way, from any state
//! ```
//!
//! Timeouts, counted from `last_seen_ms`: Established uses
//! `tcp_established_ms`, every other TCP state `tcp_transitory_ms`
//! (RFC 5382 REQ-5: >= 2 h 4 min and 4 min); UDP `udp_ms` (RFC 4787 REQ-5),
//! ICMP `icmp_ms` (RFC 5508 REQ-2). A flow is expired once
//! `now_ms >= last_seen_ms + timeout`; an expired flow is never returned by
//! a lookup.
//!
//! # Memory
//!
//! A [`Flow`] is 64 bytes; each slot adds a 1-byte tag (liveness, TCP flag
//! history, who opened the flow) and a 24-byte sequence record (kept apart
//! so the lookup path touches one cache line per flow). There is one hash
//! index, inside key -> slot, whose buckets hold only the 4-byte slot
//! number (plus hashbrown's control byte; candidates are compared through
//! the slab), so a live flow costs about 64 + 1 + 24 + 5 = 94 bytes, plus
//! the index's slack (load factor <= 7/8, power-of-two bucket counts: 5 to
//! 11.4 bytes per flow in all) and, per inside endpoint, one 21-byte
//! mapping bucket. Inbound lookups need no second index: the outside port
//! names the mapping through the reverse index (outside port -> mapping),
//! which yields the inside key. That reverse index is a dense array of 8
//! bytes per owned port and protocol, `3 x 8 x 65536 / workers` bytes
//! reserved up front (pages are committed as ports get used); a release
//! writes nothing to it. Address-dependent filtering adds one 9-byte bucket
//! (a packed `u64` and its control byte) per distinct (mapping, remote
//! address). The slab never shrinks: its length is the high-water mark of
//! live flows. The quarantine FIFO holds at most one 16-byte entry per
//! TCP/UDP port.

mod tcp;

use hashbrown::hash_map::Entry;
use hashbrown::{hash_table, DefaultHashBuilder, HashMap, HashTable};
use std::collections::VecDeque;
use std::fmt;
use std::hash::BuildHasher;
use std::net::Ipv4Addr;
use tcp::SeqTrack;

/// IP protocol of a flow; the discriminant is the IP protocol number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Proto {
    Icmp = 1,
    Tcp = 6,
    Udp = 17,
}

impl Proto {
    /// Dense index for per-protocol arrays.
    fn index(self) -> usize {
        match self {
            Proto::Icmp => 0,
            Proto::Tcp => 1,
            Proto::Udp => 2,
        }
    }
}

/// A flow as the pod side sees it: inside source -> remote destination.
/// For ICMP echo, `sport` = echo id, `dport` = 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InKey {
    pub proto: Proto,
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
}

/// A flow as the uplink sees an inbound packet: remote source -> outside
/// (ext) destination. For ICMP, `rport` = 0, `eport` = mapped id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OutKey {
    pub proto: Proto,
    pub remote: Ipv4Addr,
    pub rport: u16,
    pub ext: Ipv4Addr,
    pub eport: u16,
}

/// Handle of a live flow: its slab index. Reused after the flow is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowId(u32);

impl FlowId {
    /// The slab index (stable while the flow lives; useful as a label).
    pub fn index(self) -> u32 {
        self.0
    }
}

/// Direction of a packet: from the pod side out, or from the uplink in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    In2Out,
    Out2In,
}

/// TCP connection state as seen from the flags, named from the initiator's
/// point of view (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// The initiator's SYN (or nothing yet) seen.
    SynSent,
    /// The responder answered with a SYN.
    SynReceived,
    Established,
    /// One side sent FIN.
    FinWait,
    /// Both sides sent FIN.
    Closing,
    /// A valid RST seen.
    Closed,
}

/// Protocol state of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    Tcp(TcpState),
    Udp,
    Icmp,
}

/// TCP flags of a segment, as booleans (SYN, ACK, FIN, RST).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

impl TcpFlags {
    const fn of(syn: bool, ack: bool, fin: bool, rst: bool) -> TcpFlags {
        TcpFlags { syn, ack, fin, rst }
    }
    pub const NONE: TcpFlags = TcpFlags::of(false, false, false, false);
    pub const SYN: TcpFlags = TcpFlags::of(true, false, false, false);
    pub const SYN_ACK: TcpFlags = TcpFlags::of(true, true, false, false);
    pub const ACK: TcpFlags = TcpFlags::of(false, true, false, false);
    pub const FIN_ACK: TcpFlags = TcpFlags::of(false, true, true, false);
    pub const RST: TcpFlags = TcpFlags::of(false, false, false, true);
    pub const RST_ACK: TcpFlags = TcpFlags::of(false, true, false, true);
}

/// What [`FlowTable::account`] needs to know of a TCP segment. For UDP and
/// ICMP flows it is ignored: pass [`TcpSeg::NONE`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpSeg {
    pub flags: TcpFlags,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful when `flags.ack`).
    pub ack: u32,
    /// Raw (unscaled) window field.
    pub window: u16,
    /// TCP payload bytes (IP total length - IP header - TCP header).
    pub payload_len: u32,
}

impl TcpSeg {
    /// No TCP segment (UDP, ICMP).
    pub const NONE: TcpSeg = TcpSeg {
        flags: TcpFlags {
            syn: false,
            ack: false,
            fin: false,
            rst: false,
        },
        seq: 0,
        ack: 0,
        window: 0,
        payload_len: 0,
    };
}

/// What the caller must do with a packet after [`FlowTable::account`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Translate and forward it.
    Accept,
    /// A RST outside the receiver's window: drop it; the flow is unchanged
    /// (counted in [`TableStats::invalid_rst`]).
    DropInvalidRst,
}

/// Filtering of inbound packets that match no session (RFC 4787 §5, REQ-8;
/// RFC 5382 REQ-3). See the module docs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Filtering {
    /// Any remote may reach a live mapping (most transparent; RFC 4787
    /// REQ-8 recommends it).
    EndpointIndependent,
    /// Only a remote address the mapping already has a session with.
    Address,
    /// Only the exact remote address and port of a session (conntrack's
    /// behaviour).
    #[default]
    AddressAndPort,
}

/// Idle timeouts in milliseconds, counted from a flow's `last_seen_ms`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub tcp_established_ms: u64,
    pub tcp_transitory_ms: u64,
    pub udp_ms: u64,
    pub icmp_ms: u64,
}

/// Configuration of one worker's table.
#[derive(Debug, Clone)]
pub struct TableConfig {
    /// This table is worker `worker` of `workers` (>= 1, `worker < workers`).
    pub worker: u16,
    pub workers: u16,
    /// TCP/UDP outside port range, inclusive (ICMP ids use 0..=65535).
    pub port_first: u16,
    pub port_last: u16,
    /// This shard's bound on live flows.
    pub max_flows: usize,
    pub timeouts: Timeouts,
    /// Seed of the port-choice PRNG (deterministic in tests).
    pub seed: u64,
    /// Inbound packets with no session (module docs).
    pub filtering: Filtering,
    /// Quarantine of a released TCP/UDP outside port (RFC 6888 REQ-8 asks
    /// 120 s); 0 disables it.
    pub port_reuse_delay_ms: u64,
}

/// One session: the inside flow and its outside rewrite.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    pub inside: InKey,
    pub ext_addr: Ipv4Addr,
    pub ext_port: u16,
    pub state: FlowState,
    /// The responder (the side that did not open the flow: the remote host
    /// for a [`FlowTable::create`]d flow, the inside host for an
    /// [`FlowTable::inbound`] one) has sent a packet (conntrack's
    /// "assured"-ish); unreplied flows are evicted first.
    pub replied: bool,
    pub last_seen_ms: u64,
    pub packets_in2out: u64,
    pub packets_out2in: u64,
    pub bytes_in2out: u64,
    pub bytes_out2in: u64,
}

impl Flow {
    /// The key under which this flow's packets arrive from the uplink.
    #[inline]
    pub fn out_key(&self) -> OutKey {
        OutKey {
            proto: self.inside.proto,
            remote: self.inside.dst,
            rport: self.inside.dport,
            ext: self.ext_addr,
            eport: self.ext_port,
        }
    }

    /// The idle timeout that applies in the current state.
    #[inline]
    pub fn timeout_ms(&self, t: &Timeouts) -> u64 {
        match self.state {
            FlowState::Tcp(TcpState::Established) => t.tcp_established_ms,
            FlowState::Tcp(_) => t.tcp_transitory_ms,
            FlowState::Udp => t.udp_ms,
            FlowState::Icmp => t.icmp_ms,
        }
    }

    /// First instant at which the flow counts as expired.
    #[inline]
    pub fn expires_at_ms(&self, t: &Timeouts) -> u64 {
        self.last_seen_ms.saturating_add(self.timeout_ms(t))
    }
}

/// Why [`FlowTable::create`] refused a flow. Each has a counter in
/// [`TableStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateError {
    /// `max_flows` live flows and no expired or unreplied one to evict.
    TableFull,
    /// No free (and not quarantined) outside port owned by this worker in
    /// the range.
    PortsExhausted,
}

/// Why [`FlowTable::inbound`] opened no session for an inbound packet; the
/// caller drops it (and, after RFC 5382 REQ-4's 6 s, may answer with ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundError {
    /// No live mapping or forward on the packet's `(proto, ext addr, ext
    /// port)` (or an ICMP packet). Not counted by the table.
    NoMapping,
    /// A mapping exists but [`Filtering`] refuses this remote, or the
    /// session it would open clashes with an existing one
    /// (`inbound_filtered`).
    Filtered,
    /// TCP without SYN, or with SYN+ACK: never opens a session
    /// (`inbound_filtered`).
    NotSyn,
    /// As [`CreateError::TableFull`] (`table_full`).
    TableFull,
}

/// Why [`FlowTable::add_forward`] refused a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardError {
    /// `ext_port % workers != worker`: another worker's table owns it.
    NotOwned,
    /// Only TCP and UDP can be forwarded.
    Icmp,
    /// The outside port is used by a mapping or another forward (or is
    /// quarantined).
    PortInUse,
    /// The inside endpoint already has a mapping (live flows) or forward.
    InsideInUse,
}

impl fmt::Display for ForwardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ForwardError::NotOwned => "outside port belongs to another worker",
            ForwardError::Icmp => "only TCP and UDP can be forwarded",
            ForwardError::PortInUse => "outside port is in use",
            ForwardError::InsideInUse => "inside endpoint already has a mapping",
        })
    }
}

impl std::error::Error for ForwardError {}

/// Counters of the table's slow-path events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Flows created (by [`FlowTable::create`] or [`FlowTable::inbound`]).
    pub created: u64,
    /// Of `created`, sessions opened from outside by [`FlowTable::inbound`].
    pub inbound_created: u64,
    /// Flows removed because they timed out (by a lookup, a sweep, or to
    /// make room in a full table).
    pub expired: u64,
    /// Unreplied flows evicted to make room in a full table.
    pub early_dropped: u64,
    /// Creates refused with [`CreateError::TableFull`] or
    /// [`InboundError::TableFull`].
    pub table_full: u64,
    /// Creates refused with [`CreateError::PortsExhausted`].
    pub ports_exhausted: u64,
    /// Inbound packets to a live mapping refused by filtering or for lack
    /// of a SYN ([`InboundError::Filtered`], [`InboundError::NotSyn`]).
    pub inbound_filtered: u64,
    /// RSTs refused by [`FlowTable::account`] ([`Verdict::DropInvalidRst`]).
    pub invalid_rst: u64,
}

/// Slots examined for an expired or unreplied victim when the table is full
/// (conntrack's early_drop looks at a bounded number of buckets too).
pub const EARLY_DROP_SCAN: usize = 128;

/// Per-slot tag bits: liveness plus the TCP flag history the state machine
/// needs (kept out of [`Flow`] so its public layout stays plain data). The
/// SYN/FIN bits are relative to the initiator.
mod tag {
    pub const LIVE: u8 = 1 << 0;
    pub const SYN_INIT: u8 = 1 << 1;
    pub const SYNACK_INIT: u8 = 1 << 2;
    pub const SYNACK_RESP: u8 = 1 << 3;
    pub const FIN_INIT: u8 = 1 << 4;
    pub const FIN_RESP: u8 = 1 << 5;
    /// The flow was opened from outside ([`super::FlowTable::inbound`]).
    pub const ORIGIN_OUT: u8 = 1 << 6;
}

/// Inside endpoint of an endpoint-independent mapping.
type MapKey = (Proto, Ipv4Addr, u16);

#[derive(Debug, Clone, Copy)]
struct Mapping {
    /// Outside address of the mapping's latest flow (the forward's address
    /// for a forward): inbound packets must be sent to it.
    ext_addr: Ipv4Addr,
    ext_port: u16,
    refs: u32,
    /// A static forward: permanent, never released.
    forward: bool,
}

/// A released port in quarantine.
#[derive(Debug, Clone, Copy)]
struct Cooling {
    until_ms: u64,
    proto: Proto,
    port: u16,
}

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

/// xorshift64* PRNG for port choice: cheap, deterministic from the seed.
#[derive(Debug, Clone)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
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
    fn below(&mut self, n: u32) -> u32 {
        (((self.next() >> 32) * u64::from(n)) >> 32) as u32
    }
}

/// The flow table of one worker. See the module docs for the contract.
pub struct FlowTable {
    cfg: TableConfig,
    flows: Vec<Flow>,
    tags: Vec<u8>,
    seqs: Vec<SeqTrack>,
    free: Vec<u32>,
    /// Live flows by inside key: slab indices only, compared through the
    /// slab (`flows[i].inside`). There is no outbound index: an [`OutKey`]
    /// names its mapping through `owners`, which gives the inside key (see
    /// [`FlowTable::find_out`]).
    in_index: HashTable<u32>,
    /// Randomly seeded (inbound keys are chosen by strangers); hashes the
    /// keys of `in_index` and `remotes`.
    hasher: DefaultHashBuilder,
    /// `ceil(2^32 / workers)`: `port * owner_div >> 32 == port / workers`
    /// for every `u16` port (no division on the inbound lookup path).
    owner_div: u64,
    mappings: HashMap<MapKey, Mapping>,
    /// Reverse index of `mappings`, per protocol: slot `port / workers`
    /// holds the inside endpoint (`addr << 16 | port`) last given `port`.
    /// Never cleared: an entry counts only while that endpoint's mapping
    /// still has the port (see [`owner_of`]), so a release writes nothing.
    owners: [Vec<u64>; 3],
    /// Address-dependent filtering only: sessions per (ext port, remote
    /// address), per protocol, packed as `addr << 32 | port << 16 |
    /// (sessions - 1)` (see [`remote_entry`]).
    remotes: [HashTable<u64>; 3],
    ports: [PortSet; 3],
    cooling: VecDeque<Cooling>,
    /// Latest `now_ms` seen (for calls without one, like `remove`).
    clock_ms: u64,
    cursor: usize,
    live: usize,
    rng: XorShift,
    stats: TableStats,
}

impl fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowTable")
            .field("worker", &self.cfg.worker)
            .field("workers", &self.cfg.workers)
            .field("len", &self.live)
            .field("slots", &self.flows.len())
            .field("mappings", &self.mappings.len())
            .field("cooling", &self.cooling.len())
            .field("stats", &self.stats)
            .finish()
    }
}

/// Initial capacity cap: big tables grow on demand instead of reserving
/// `max_flows` up front.
const INITIAL_CAPACITY_CAP: usize = 1 << 16;

/// Initial capacity cap of the mappings (one per inside endpoint, usually
/// far fewer than flows): a 21-byte bucket each, and all of a reserved
/// table's pages get touched.
const INITIAL_MAPPINGS_CAP: usize = 1 << 12;

impl FlowTable {
    /// Creates an empty table.
    ///
    /// # Panics
    /// If `workers == 0`, `worker >= workers`, `port_first > port_last` or
    /// `max_flows > u32::MAX` (the config layer validates these first).
    pub fn new(cfg: TableConfig) -> Self {
        assert!(cfg.workers >= 1, "workers must be >= 1");
        assert!(cfg.worker < cfg.workers, "worker must be < workers");
        assert!(
            cfg.port_first <= cfg.port_last,
            "port_first must be <= port_last"
        );
        assert!(
            cfg.max_flows <= u32::MAX as usize,
            "max_flows must fit in u32"
        );
        let cap = cfg.max_flows.min(INITIAL_CAPACITY_CAP);
        let map_cap = cap.min(INITIAL_MAPPINGS_CAP);
        FlowTable {
            flows: Vec::with_capacity(cap),
            tags: Vec::with_capacity(cap),
            seqs: Vec::with_capacity(cap),
            free: Vec::new(),
            in_index: HashTable::with_capacity(cap),
            hasher: DefaultHashBuilder::default(),
            owner_div: (1u64 << 32).div_ceil(u64::from(cfg.workers)),
            mappings: HashMap::with_capacity(map_cap),
            owners: std::array::from_fn(|_| vec![0; 65536 / usize::from(cfg.workers) + 1]),
            remotes: std::array::from_fn(|_| HashTable::new()),
            ports: [PortSet::new(), PortSet::new(), PortSet::new()],
            cooling: VecDeque::new(),
            clock_ms: 0,
            cursor: 0,
            live: 0,
            rng: XorShift::new(cfg.seed),
            stats: TableStats::default(),
            cfg,
        }
    }

    /// The configuration this table was built with.
    pub fn config(&self) -> &TableConfig {
        &self.cfg
    }

    #[inline]
    fn is_expired(&self, i: usize, now_ms: u64) -> bool {
        now_ms >= self.flows[i].expires_at_ms(&self.cfg.timeouts)
    }

    #[inline]
    fn tick(&mut self, now_ms: u64) {
        if now_ms > self.clock_ms {
            self.clock_ms = now_ms;
        }
    }

    /// Find the live flow for an outbound packet; an expired flow is removed
    /// and `None` returned.
    #[inline]
    pub fn lookup_in2out(&mut self, key: &InKey, now_ms: u64) -> Option<FlowId> {
        let i = self.find_in(key)?;
        self.check_live(i, now_ms)
    }

    /// Find the live flow for an inbound packet (exact 5-tuple); an expired
    /// flow is removed and `None` returned. On `None` the caller asks
    /// [`FlowTable::inbound`].
    #[inline]
    pub fn lookup_out2in(&mut self, key: &OutKey, now_ms: u64) -> Option<FlowId> {
        let i = self.find_out(key)?;
        self.check_live(i, now_ms)
    }

    /// Slot of the flow (live or expired but not swept) with inside key
    /// `key`.
    #[inline]
    fn find_in(&self, key: &InKey) -> Option<usize> {
        let flows = &self.flows;
        self.in_index
            .find(in_hash(&self.hasher, key), |&i| {
                flows[i as usize].inside == *key
            })
            .map(|&i| i as usize)
    }

    /// Slot of the flow whose [`Flow::out_key`] is `key`. The outside port
    /// names the mapping (`owners`: while a mapping has flows, its port's
    /// owner slot holds its inside endpoint), which gives the inside key;
    /// the flow found must then have the key's outside address and port
    /// (the owner slot may be stale, and flows of one mapping may use
    /// different outside addresses).
    #[inline]
    fn find_out(&self, key: &OutKey) -> Option<usize> {
        let slot = (u64::from(key.eport) * self.owner_div) >> 32;
        debug_assert_eq!(slot, u64::from(key.eport / self.cfg.workers));
        let v = *self.owners[key.proto.index()].get(slot as usize)?;
        let inside = InKey {
            proto: key.proto,
            src: Ipv4Addr::from((v >> 16) as u32),
            sport: v as u16,
            dst: key.remote,
            dport: key.rport,
        };
        let i = self.find_in(&inside)?;
        let f = &self.flows[i];
        (f.ext_port == key.eport && f.ext_addr == key.ext).then_some(i)
    }

    #[inline]
    fn check_live(&mut self, i: usize, now_ms: u64) -> Option<FlowId> {
        if self.is_expired(i, now_ms) {
            self.tick(now_ms);
            self.remove_slot(i);
            self.stats.expired += 1;
            None
        } else {
            Some(FlowId(i as u32))
        }
    }

    /// Create a flow for an outbound packet that missed (see the module docs
    /// for the mapping rules and the `max_flows` bound). The new flow starts
    /// in `SynSent` (TCP), `Udp` or `Icmp`, unreplied, with zero counters and
    /// `last_seen_ms = now_ms`; call [`FlowTable::account`] for the packet.
    ///
    /// If `key` already has a live flow, its id is returned and nothing is
    /// created. A reused mapping keeps its port but the flow uses the given
    /// `ext_addr` (so a changed masquerade address takes effect at once) —
    /// except a forward target's mapping, whose flows use the forward's
    /// address.
    pub fn create(
        &mut self,
        key: &InKey,
        ext_addr: Ipv4Addr,
        now_ms: u64,
    ) -> Result<FlowId, CreateError> {
        if let Some(i) = self.find_in(key) {
            if let Some(id) = self.check_live(i, now_ms) {
                return Ok(id);
            }
        }
        self.tick(now_ms);
        if self.live >= self.cfg.max_flows && !self.make_room(now_ms) {
            self.stats.table_full += 1;
            return Err(CreateError::TableFull);
        }
        let pi = key.proto.index();
        // Quarantines that ended (a cheap front check when none did).
        if !self.cooling.is_empty() {
            Self::drain_cooling(
                &mut self.cooling,
                &mut self.ports,
                &self.mappings,
                &self.owners,
                self.cfg.workers,
                now_ms,
            );
        }
        let (ext_addr, ext_port) = match self.mappings.entry((key.proto, key.src, key.sport)) {
            Entry::Occupied(mut e) => {
                let m = e.get_mut();
                m.refs += 1;
                if !m.forward {
                    m.ext_addr = ext_addr;
                }
                (m.ext_addr, m.ext_port)
            }
            Entry::Vacant(e) => {
                let Some(p) = Self::alloc_port(&self.cfg, &self.ports[pi], &mut self.rng, key)
                else {
                    self.stats.ports_exhausted += 1;
                    return Err(CreateError::PortsExhausted);
                };
                self.ports[pi].insert(p);
                e.insert(Mapping {
                    ext_addr,
                    ext_port: p,
                    refs: 1,
                    forward: false,
                });
                set_owner(
                    &mut self.owners,
                    self.cfg.workers,
                    (key.proto, key.src, key.sport),
                    p,
                );
                (ext_addr, p)
            }
        };
        Ok(self.insert_flow(*key, ext_addr, ext_port, 0, now_ms))
    }

    /// Find or open the session for an inbound packet that missed
    /// [`FlowTable::lookup_out2in`] (module docs: filtering and forwards).
    /// `flags` are the packet's TCP flags (ignored for UDP). A live session
    /// matching `key` is returned as is. A new session's inside key is
    /// `(proto, mapping's inside endpoint -> key.remote:key.rport)`; it
    /// starts in `SynSent` (TCP, initiator = the remote), unreplied; call
    /// [`FlowTable::account`] for the packet.
    pub fn inbound(
        &mut self,
        key: &OutKey,
        flags: TcpFlags,
        now_ms: u64,
    ) -> Result<FlowId, InboundError> {
        if let Some(i) = self.find_out(key) {
            if let Some(id) = self.check_live(i, now_ms) {
                return Ok(id);
            }
        }
        if key.proto == Proto::Icmp {
            return Err(InboundError::NoMapping);
        }
        let Some(mk) = owner_of(
            &self.mappings,
            &self.owners,
            self.cfg.workers,
            key.proto,
            key.eport,
        ) else {
            return Err(InboundError::NoMapping);
        };
        let m = self.mappings[&mk];
        if m.ext_addr != key.ext || (m.refs == 0 && !m.forward) {
            return Err(InboundError::NoMapping);
        }
        if !m.forward {
            let allowed = match self.cfg.filtering {
                Filtering::EndpointIndependent => true,
                Filtering::Address => self.has_remote(key.proto, key.eport, key.remote),
                Filtering::AddressAndPort => false,
            };
            if !allowed {
                self.stats.inbound_filtered += 1;
                return Err(InboundError::Filtered);
            }
        }
        if key.proto == Proto::Tcp && !(flags.syn && !flags.ack && !flags.rst) {
            self.stats.inbound_filtered += 1;
            return Err(InboundError::NotSyn);
        }
        let inside = InKey {
            proto: key.proto,
            src: mk.1,
            sport: mk.2,
            dst: key.remote,
            dport: key.rport,
        };
        if let Some(i) = self.find_in(&inside) {
            // The inside endpoint already talks to this remote through
            // another outside address (the masquerade address changed).
            if self.check_live(i, now_ms).is_some() {
                self.stats.inbound_filtered += 1;
                return Err(InboundError::Filtered);
            }
        }
        self.tick(now_ms);
        // Pin the mapping so that making room cannot release it.
        self.mappings.get_mut(&mk).expect("mapping").refs += 1;
        if self.live >= self.cfg.max_flows && !self.make_room(now_ms) {
            self.unref_mapping(mk);
            self.stats.table_full += 1;
            return Err(InboundError::TableFull);
        }
        self.stats.inbound_created += 1;
        Ok(self.insert_flow(inside, m.ext_addr, m.ext_port, tag::ORIGIN_OUT, now_ms))
    }

    /// Stores a new flow; its mapping already counts it.
    fn insert_flow(
        &mut self,
        inside: InKey,
        ext_addr: Ipv4Addr,
        ext_port: u16,
        origin: u8,
        now_ms: u64,
    ) -> FlowId {
        let flow = Flow {
            inside,
            ext_addr,
            ext_port,
            state: match inside.proto {
                Proto::Tcp => FlowState::Tcp(TcpState::SynSent),
                Proto::Udp => FlowState::Udp,
                Proto::Icmp => FlowState::Icmp,
            },
            replied: false,
            last_seen_ms: now_ms,
            packets_in2out: 0,
            packets_out2in: 0,
            bytes_in2out: 0,
            bytes_out2in: 0,
        };
        let t = tag::LIVE | origin;
        debug_assert!(self.find_in(&inside).is_none(), "index collision");
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
        self.in_index
            .insert_unique(in_hash(hasher, &inside), i, |&j| {
                in_hash(hasher, &flows[j as usize].inside)
            });
        // No overloading means out keys are unique: two inside endpoints
        // never share (proto, ext port), and one endpoint's flows differ in
        // (remote, rport).
        debug_assert_eq!(self.find_out(&flow.out_key()), Some(i as usize));
        if self.cfg.filtering == Filtering::Address {
            self.add_remote(inside.proto, ext_port, inside.dst);
        }
        self.live += 1;
        self.stats.created += 1;
        FlowId(i)
    }

    /// Adds a static forward (DNAT): inbound `proto` packets to
    /// `ext_addr:ext_port` with no session open one towards
    /// `inside_addr:inside_port` (TCP: on a SYN only), whatever the
    /// [`Filtering`]. The outside port is reserved for good; it may lie
    /// outside the dynamic port range. See the module docs.
    pub fn add_forward(
        &mut self,
        proto: Proto,
        ext_addr: Ipv4Addr,
        ext_port: u16,
        inside_addr: Ipv4Addr,
        inside_port: u16,
    ) -> Result<(), ForwardError> {
        if ext_port % self.cfg.workers != self.cfg.worker {
            return Err(ForwardError::NotOwned);
        }
        if proto == Proto::Icmp {
            return Err(ForwardError::Icmp);
        }
        let pi = proto.index();
        let mk = (proto, inside_addr, inside_port);
        if self.mappings.contains_key(&mk) {
            return Err(ForwardError::InsideInUse);
        }
        if self.ports[pi].contains(ext_port) {
            return Err(ForwardError::PortInUse);
        }
        self.ports[pi].insert(ext_port);
        self.mappings.insert(
            mk,
            Mapping {
                ext_addr,
                ext_port,
                refs: 0,
                forward: true,
            },
        );
        set_owner(&mut self.owners, self.cfg.workers, mk, ext_port);
        Ok(())
    }

    /// The forward whose target is `inside_addr:inside_port`, as `(ext
    /// addr, ext port)`: a pod-side packet from it that misses belongs to
    /// the worker owning that port, and [`FlowTable::create`] there maps it
    /// onto the forward port.
    pub fn forward_for_inside(
        &self,
        proto: Proto,
        inside_addr: Ipv4Addr,
        inside_port: u16,
    ) -> Option<(Ipv4Addr, u16)> {
        match self.mappings.get(&(proto, inside_addr, inside_port)) {
            Some(m) if m.forward => Some((m.ext_addr, m.ext_port)),
            _ => None,
        }
    }

    /// Number of static forwards.
    pub fn forwards_len(&self) -> usize {
        self.mappings.values().filter(|m| m.forward).count()
    }

    /// Releases quarantined ports whose time is up.
    fn drain_cooling(
        cooling: &mut VecDeque<Cooling>,
        ports: &mut [PortSet; 3],
        mappings: &HashMap<MapKey, Mapping>,
        owners: &[Vec<u64>; 3],
        workers: u16,
        now_ms: u64,
    ) {
        while let Some(c) = cooling.front() {
            if c.until_ms > now_ms {
                break;
            }
            // A forward added meanwhile keeps the port.
            if owner_of(mappings, owners, workers, c.proto, c.port).is_none() {
                ports[c.proto.index()].remove(c.port);
            }
            cooling.pop_front();
        }
    }

    /// Chooses an outside port for a new mapping of `key`'s inside endpoint.
    fn alloc_port(
        cfg: &TableConfig,
        used: &PortSet,
        rng: &mut XorShift,
        key: &InKey,
    ) -> Option<u16> {
        let w = u32::from(cfg.workers);
        let k = u32::from(cfg.worker);
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
        let (first, last) = (u32::from(cfg.port_first), u32::from(cfg.port_last));
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

    /// Table full: frees one slot by removing an expired flow, else evicting
    /// the least recently seen unreplied flow among the next
    /// [`EARLY_DROP_SCAN`] slots from the sweep cursor.
    fn make_room(&mut self, now_ms: u64) -> bool {
        let n = self.flows.len();
        if n == 0 {
            return false;
        }
        let mut c = if self.cursor < n { self.cursor } else { 0 };
        let mut victim: Option<(usize, u64)> = None;
        for _ in 0..EARLY_DROP_SCAN.min(n) {
            if self.tags[c] & tag::LIVE != 0 {
                if self.is_expired(c, now_ms) {
                    self.remove_slot(c);
                    self.stats.expired += 1;
                    return true;
                }
                let f = &self.flows[c];
                if !f.replied && victim.is_none_or(|(_, seen)| f.last_seen_ms < seen) {
                    victim = Some((c, f.last_seen_ms));
                }
            }
            c += 1;
            if c == n {
                c = 0;
            }
        }
        match victim {
            Some((i, _)) => {
                self.remove_slot(i);
                self.stats.early_dropped += 1;
                true
            }
            None => false,
        }
    }

    /// The flow behind a live id.
    ///
    /// # Panics
    /// If `id` is out of range (never handed out by this table).
    #[inline]
    pub fn get(&self, id: FlowId) -> &Flow {
        debug_assert!(self.tags[id.0 as usize] & tag::LIVE != 0, "stale FlowId");
        &self.flows[id.0 as usize]
    }

    /// Whether the flow was opened from outside ([`FlowTable::inbound`]).
    #[inline]
    pub fn opened_inbound(&self, id: FlowId) -> bool {
        self.tags[id.0 as usize] & tag::ORIGIN_OUT != 0
    }

    /// Account a packet of `len` bytes in `dir` at `now_ms`. For TCP, first
    /// validate a RST against the tracked sequence space (the `tcp`
    /// submodule's docs): an invalid one returns
    /// [`Verdict::DropInvalidRst`], counts `invalid_rst` and changes
    /// nothing. Otherwise refresh `last_seen_ms`, bump the counters, set
    /// `replied` on a packet from the responder, and for TCP feed the
    /// segment to the state machine and the sequence tracking. `seg` is
    /// ignored for UDP and ICMP flows ([`TcpSeg::NONE`]).
    ///
    /// Callers decide what refreshes: ICMP errors about a flow should not be
    /// accounted (RFC 4787 REQ-12, RFC 5508 REQ-6).
    ///
    /// # Panics
    /// If `id` is out of range.
    #[inline]
    pub fn account(
        &mut self,
        id: FlowId,
        dir: Direction,
        seg: TcpSeg,
        len: usize,
        now_ms: u64,
    ) -> Verdict {
        let i = id.0 as usize;
        debug_assert!(self.tags[i] & tag::LIVE != 0, "stale FlowId");
        let f = &mut self.flows[i];
        let is_tcp = matches!(f.state, FlowState::Tcp(_));
        if is_tcp && seg.flags.rst && !self.seqs[i].rst_acceptable(dir, &seg) {
            self.stats.invalid_rst += 1;
            return Verdict::DropInvalidRst;
        }
        f.last_seen_ms = now_ms;
        let t = &mut self.tags[i];
        match dir {
            Direction::In2Out => {
                f.packets_in2out += 1;
                f.bytes_in2out += len as u64;
            }
            Direction::Out2In => {
                f.packets_out2in += 1;
                f.bytes_out2in += len as u64;
            }
        }
        if (dir == Direction::Out2In) != (*t & tag::ORIGIN_OUT != 0) {
            f.replied = true;
        }
        if let FlowState::Tcp(s) = f.state {
            let (st, reopened) = tcp::next(s, t, dir, seg.flags);
            f.state = FlowState::Tcp(st);
            let sq = &mut self.seqs[i];
            if reopened {
                *sq = SeqTrack::default();
            }
            sq.update(dir, &seg);
        }
        if now_ms > self.clock_ms {
            self.clock_ms = now_ms;
        }
        Verdict::Accept
    }

    /// Incremental expiry: examine at most `budget` slots (and at most one
    /// full lap) from a sweeping cursor, removing expired flows; returns the
    /// number removed. Also ends due port quarantines.
    pub fn expire(&mut self, now_ms: u64, budget: usize) -> usize {
        self.tick(now_ms);
        if !self.cooling.is_empty() {
            Self::drain_cooling(
                &mut self.cooling,
                &mut self.ports,
                &self.mappings,
                &self.owners,
                self.cfg.workers,
                now_ms,
            );
        }
        let n = self.flows.len();
        if n == 0 {
            return 0;
        }
        let mut c = if self.cursor < n { self.cursor } else { 0 };
        let mut removed = 0;
        for _ in 0..budget.min(n) {
            if self.tags[c] & tag::LIVE != 0 && self.is_expired(c, now_ms) {
                self.remove_slot(c);
                removed += 1;
            }
            c += 1;
            if c == n {
                c = 0;
            }
        }
        self.cursor = c;
        self.stats.expired += removed as u64;
        removed
    }

    /// Removes a live flow now (e.g. the masquerade address went away),
    /// releasing its mapping if it was the last flow of it (into quarantine,
    /// timed from the latest `now_ms` the table has seen). Not counted as
    /// expired.
    ///
    /// # Panics
    /// If `id` is out of range or not live.
    pub fn remove(&mut self, id: FlowId) {
        assert!(self.tags[id.0 as usize] & tag::LIVE != 0, "stale FlowId");
        self.remove_slot(id.0 as usize);
    }

    /// Removes every flow and dynamic mapping (link down / address change);
    /// their TCP/UDP ports go into quarantine. Forwards and counters are
    /// kept.
    pub fn clear(&mut self) {
        self.flows.clear();
        self.tags.clear();
        self.seqs.clear();
        self.free.clear();
        self.in_index.clear();
        for r in &mut self.remotes {
            r.clear();
        }
        let delay = self.cfg.port_reuse_delay_ms;
        let until_ms = self.clock_ms.saturating_add(delay);
        let (ports, cooling) = (&mut self.ports, &mut self.cooling);
        self.mappings.retain(|mk, m| {
            if m.forward {
                m.refs = 0;
                return true;
            }
            if delay > 0 && mk.0 != Proto::Icmp {
                cooling.push_back(Cooling {
                    until_ms,
                    proto: mk.0,
                    port: m.ext_port,
                });
            } else {
                ports[mk.0.index()].remove(m.ext_port);
            }
            false
        });
        self.cursor = 0;
        self.live = 0;
    }

    /// Drops one reference to a mapping, releasing a dynamic one at zero.
    fn unref_mapping(&mut self, mk: MapKey) {
        let Entry::Occupied(mut e) = self.mappings.entry(mk) else {
            debug_assert!(false, "flow without mapping");
            return;
        };
        let m = e.get_mut();
        m.refs -= 1;
        if m.refs == 0 && !m.forward {
            let port = e.remove().ext_port;
            if self.cfg.port_reuse_delay_ms > 0 && mk.0 != Proto::Icmp {
                // The delay is fixed, so the FIFO stays sorted by deadline.
                self.cooling.push_back(Cooling {
                    until_ms: self.clock_ms.saturating_add(self.cfg.port_reuse_delay_ms),
                    proto: mk.0,
                    port,
                });
            } else {
                self.ports[mk.0.index()].remove(port);
            }
        }
    }

    fn remove_slot(&mut self, i: usize) {
        let f = self.flows[i];
        match self
            .in_index
            .find_entry(in_hash(&self.hasher, &f.inside), |&j| j as usize == i)
        {
            Ok(e) => {
                e.remove();
            }
            Err(_) => debug_assert!(false, "live flow not indexed"),
        }
        if self.cfg.filtering == Filtering::Address {
            self.sub_remote(f.inside.proto, f.ext_port, f.inside.dst);
        }
        self.unref_mapping((f.inside.proto, f.inside.src, f.inside.sport));
        self.tags[i] = 0;
        self.free.push(i as u32);
        self.live -= 1;
    }

    /// Whether the mapping on `(proto, port)` has a session with `remote`
    /// (address-dependent filtering).
    #[inline]
    fn has_remote(&self, proto: Proto, port: u16, remote: Ipv4Addr) -> bool {
        let k = remote_entry(port, remote) >> 16;
        self.remotes[proto.index()]
            .find(self.hasher.hash_one(k), |&e| e >> 16 == k)
            .is_some()
    }

    /// Counts a session of the mapping on `(proto, port)` with `remote`.
    fn add_remote(&mut self, proto: Proto, port: u16, remote: Ipv4Addr) {
        let e = remote_entry(port, remote);
        let k = e >> 16;
        let hasher = &self.hasher;
        match self.remotes[proto.index()].entry(
            hasher.hash_one(k),
            |&x| x >> 16 == k,
            |&x| hasher.hash_one(x >> 16),
        ) {
            hash_table::Entry::Occupied(mut o) => {
                // One mapping's sessions with one remote address differ
                // only in the remote port: at most 65536 of them.
                debug_assert!(*o.get() & 0xffff != 0xffff, "remote count overflow");
                *o.get_mut() += 1;
            }
            hash_table::Entry::Vacant(v) => {
                v.insert(e);
            }
        }
    }

    /// Uncounts a session of the mapping on `(proto, port)` with `remote`.
    fn sub_remote(&mut self, proto: Proto, port: u16, remote: Ipv4Addr) {
        let k = remote_entry(port, remote) >> 16;
        match self.remotes[proto.index()].find_entry(self.hasher.hash_one(k), |&x| x >> 16 == k) {
            Ok(mut o) => {
                if *o.get() & 0xffff == 0 {
                    o.remove();
                } else {
                    *o.get_mut() -= 1;
                }
            }
            Err(_) => debug_assert!(false, "uncounted remote"),
        }
    }

    /// Number of live flows (some may be expired but not yet swept).
    #[inline]
    pub fn len(&self) -> usize {
        self.live
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Number of mappings (= outside ports in use, quarantined ones
    /// excluded), static forwards included.
    pub fn mappings_len(&self) -> usize {
        self.mappings.len()
    }

    /// Number of outside ports in quarantine.
    pub fn cooling_len(&self) -> usize {
        self.cooling.len()
    }

    /// Live flows in slab order (including expired ones not yet swept).
    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.flows
            .iter()
            .zip(&self.tags)
            .filter(|(_, t)| **t & tag::LIVE != 0)
            .map(|(f, _)| f)
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> TableStats {
        self.stats
    }
}

/// Hash of an inside key, packed into 104 bits first (one `u128` write).
#[inline]
fn in_hash(hasher: &DefaultHashBuilder, k: &InKey) -> u64 {
    hasher.hash_one(
        u128::from(k.proto as u8) << 96
            | u128::from(u32::from(k.src)) << 64
            | u128::from(k.sport) << 48
            | u128::from(u32::from(k.dst)) << 16
            | u128::from(k.dport),
    )
}

/// A `remotes` entry for one session: the key is the upper 48 bits, the
/// low 16 bits count the sessions minus one.
#[inline]
fn remote_entry(port: u16, remote: Ipv4Addr) -> u64 {
    u64::from(u32::from(remote)) << 32 | u64::from(port) << 16
}

/// Records `mk` as the owner of outside `port` (owned by this worker).
#[inline]
fn set_owner(owners: &mut [Vec<u64>; 3], workers: u16, mk: MapKey, port: u16) {
    owners[mk.0.index()][usize::from(port / workers)] =
        u64::from(u32::from(mk.1)) << 16 | u64::from(mk.2);
}

/// The inside endpoint whose mapping (or forward) currently holds outside
/// `port`, if any.
#[inline]
fn owner_of(
    mappings: &HashMap<MapKey, Mapping>,
    owners: &[Vec<u64>; 3],
    workers: u16,
    proto: Proto,
    port: u16,
) -> Option<MapKey> {
    let v = *owners[proto.index()].get(usize::from(port / workers))?;
    let mk = (proto, Ipv4Addr::from((v >> 16) as u32), v as u16);
    match mappings.get(&mk) {
        Some(m) if m.ext_port == port => Some(mk),
        _ => None,
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
fn pick_port(used: &PortSet, rng: &mut XorShift, lo: u32, hi: u32, w: u32, k: u32) -> Option<u16> {
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

    mod rfc;

    const T: Timeouts = Timeouts {
        tcp_established_ms: 7_440_000,
        tcp_transitory_ms: 240_000,
        udp_ms: 300_000,
        icmp_ms: 60_000,
    };

    fn cfg(worker: u16, workers: u16, first: u16, last: u16, max: usize) -> TableConfig {
        TableConfig {
            worker,
            workers,
            port_first: first,
            port_last: last,
            max_flows: max,
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

    const SYN: TcpFlags = TcpFlags::SYN;
    const SYNACK: TcpFlags = TcpFlags::SYN_ACK;
    const ACK: TcpFlags = TcpFlags::ACK;
    const FINACK: TcpFlags = TcpFlags::FIN_ACK;
    const RST: TcpFlags = TcpFlags::RST;
    const NONE: TcpFlags = TcpFlags::NONE;

    fn tcp_state(t: &FlowTable, id: FlowId) -> TcpState {
        match t.get(id).state {
            FlowState::Tcp(s) => s,
            s => panic!("not tcp: {s:?}"),
        }
    }

    /// Checks every index against the slab, the mappings and the port sets.
    fn check_consistent(t: &FlowTable) {
        let live: Vec<usize> = (0..t.flows.len())
            .filter(|&i| t.tags[i] & tag::LIVE != 0)
            .collect();
        assert_eq!(live.len(), t.len());
        assert_eq!(t.in_index.len(), t.len());
        assert_eq!(t.free.len() + t.len(), t.flows.len());
        let mut refs: hashbrown::HashMap<MapKey, u32> = hashbrown::HashMap::new();
        let mut port_owner: hashbrown::HashMap<(Proto, u16), MapKey> = hashbrown::HashMap::new();
        let mut remotes: hashbrown::HashMap<(Proto, u16, Ipv4Addr), u32> =
            hashbrown::HashMap::new();
        for &i in &live {
            let f = &t.flows[i];
            assert_eq!(t.find_in(&f.inside), Some(i));
            assert_eq!(t.find_out(&f.out_key()), Some(i));
            let mk = (f.inside.proto, f.inside.src, f.inside.sport);
            *refs.entry(mk).or_default() += 1;
            *remotes
                .entry((f.inside.proto, f.ext_port, f.inside.dst))
                .or_default() += 1;
            let m = t.mappings[&mk];
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
        let forwards = t.mappings.values().filter(|m| m.forward).count();
        assert_eq!(forwards, t.forwards_len());
        for mk in refs.keys() {
            assert!(t.mappings.contains_key(mk));
        }
        for (mk, m) in &t.mappings {
            assert_eq!(refs.get(mk).copied().unwrap_or(0), m.refs);
            assert!(m.forward || m.refs > 0);
            assert_eq!(
                owner_of(&t.mappings, &t.owners, t.cfg.workers, mk.0, m.ext_port),
                Some(*mk)
            );
        }
        if t.cfg.filtering == Filtering::Address {
            assert_eq!(remotes, t.remotes_map());
        } else {
            assert!(t.remotes_map().is_empty());
        }
        for (pi, proto) in [Proto::Icmp, Proto::Tcp, Proto::Udp]
            .into_iter()
            .enumerate()
        {
            let used = (0..=65535u16).filter(|&p| t.ports[pi].contains(p)).count();
            let mapped = t.mappings.keys().filter(|k| k.0 == proto).count();
            let cooling: std::collections::HashSet<u16> = t
                .cooling
                .iter()
                .filter(|c| {
                    c.proto == proto
                        && owner_of(&t.mappings, &t.owners, t.cfg.workers, proto, c.port).is_none()
                })
                .map(|c| c.port)
                .collect();
            for &p in &cooling {
                assert!(t.ports[pi].contains(p));
            }
            assert_eq!(used, mapped + cooling.len(), "port set of {proto:?}");
        }
        // The quarantine FIFO is sorted by deadline.
        let mut last = 0;
        for c in &t.cooling {
            assert!(c.until_ms >= last);
            last = c.until_ms;
        }
        for &i in &t.free {
            assert_eq!(t.tags[i as usize], 0);
        }
    }

    impl FlowTable {
        /// `remotes` unpacked, as (proto, ext port, remote) -> sessions.
        fn remotes_map(&self) -> hashbrown::HashMap<(Proto, u16, Ipv4Addr), u32> {
            let mut m = hashbrown::HashMap::new();
            for (proto, r) in [Proto::Icmp, Proto::Tcp, Proto::Udp]
                .into_iter()
                .zip(&self.remotes)
            {
                for &e in r {
                    let key = (proto, (e >> 16) as u16, Ipv4Addr::from((e >> 32) as u32));
                    assert!(m.insert(key, (e & 0xffff) as u32 + 1).is_none());
                }
            }
            m
        }
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
        assert_eq!(t.stats().created, 1);
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
    fn icmp_id_mapping() {
        let mut t = FlowTable::new(cfg(1, 4, 1024, 65535, 100));
        let k = ik(Proto::Icmp, 2, 0x1235, 9, 0); // 0x1235 % 4 == 1
        let id = t.create(&k, EXT, 0).unwrap();
        assert_eq!(t.get(id).ext_port, 0x1235);
        assert_eq!(t.get(id).state, FlowState::Icmp);
        let ok = OutKey {
            proto: Proto::Icmp,
            remote: k.dst,
            rport: 0,
            ext: EXT,
            eport: 0x1235,
        };
        assert_eq!(t.lookup_out2in(&ok, 0), Some(id));
        // An id outside the port range and not owned: remapped, any value owned.
        let k2 = ik(Proto::Icmp, 3, 4, 9, 0);
        let id2 = t.create(&k2, EXT, 0).unwrap();
        assert_eq!(t.get(id2).ext_port % 4, 1);
        // Same id from another host: not overloaded.
        let k3 = ik(Proto::Icmp, 4, 0x1235, 9, 0);
        let id3 = t.create(&k3, EXT, 0).unwrap();
        assert_ne!(t.get(id3).ext_port, 0x1235);
        check_consistent(&t);
    }

    #[test]
    fn eim_same_inside_endpoint_shares_port() {
        let mut t = FlowTable::new(cfg(0, 2, 1024, 65535, 100));
        let a = t.create(&ik(Proto::Udp, 2, 4001, 9, 53), EXT, 0).unwrap(); // 4001 odd: not owned
        let b = t.create(&ik(Proto::Udp, 2, 4001, 10, 123), EXT, 0).unwrap();
        let c = t.create(&ik(Proto::Udp, 2, 4001, 9, 54), EXT, 0).unwrap();
        let p = t.get(a).ext_port;
        assert_eq!(t.get(b).ext_port, p);
        assert_eq!(t.get(c).ext_port, p);
        assert_eq!(p % 2, 0);
        assert_eq!(t.mappings_len(), 1);
        // TCP from the same endpoint is a separate mapping (per proto), and
        // may well preserve the same number.
        let d = t.create(&ik(Proto::Tcp, 2, 4002, 9, 80), EXT, 0).unwrap();
        assert_eq!(t.get(d).ext_port, 4002);
        assert_eq!(t.mappings_len(), 2);
        check_consistent(&t);
    }

    #[test]
    fn different_inside_endpoints_never_share_port() {
        let mut t = FlowTable::new(cfg(0, 1, 1024, 65535, 10_000));
        let mut seen = std::collections::HashSet::new();
        for src in 1..=50u8 {
            for proto in [Proto::Tcp, Proto::Udp, Proto::Icmp] {
                // All use the same inside port: only the first keeps it.
                let id = t.create(&ik(proto, src, 5555, 9, 80), EXT, 0).unwrap();
                assert!(seen.insert((proto, t.get(id).ext_port)));
            }
        }
        let kept = t.iter().filter(|f| f.ext_port == 5555).count();
        assert_eq!(kept, 3); // once per proto
        check_consistent(&t);
    }

    #[test]
    fn port_preservation_and_worker_slice() {
        let mut t = FlowTable::new(cfg(2, 3, 2000, 3000, 100));
        // 2501 % 3 == 2: owned, in range, free -> kept.
        let a = t.create(&ik(Proto::Tcp, 2, 2501, 9, 80), EXT, 0).unwrap();
        assert_eq!(t.get(a).ext_port, 2501);
        // Taken by another endpoint: another port of the slice, in range.
        for src in 3..40 {
            let b = t.create(&ik(Proto::Tcp, src, 2501, 9, 80), EXT, 0).unwrap();
            let p = t.get(b).ext_port;
            assert_ne!(p, 2501);
            assert_eq!(p % 3, 2);
            assert!((2000..=3000).contains(&p));
        }
        // Not owned by this worker (2500 % 3 == 1): remapped into the slice.
        let c = t.create(&ik(Proto::Tcp, 2, 2500, 9, 80), EXT, 0).unwrap();
        assert_eq!(t.get(c).ext_port % 3, 2);
        // Out of range: remapped into the range.
        let d = t.create(&ik(Proto::Udp, 2, 5003, 9, 80), EXT, 0).unwrap();
        assert!((2000..=3000).contains(&t.get(d).ext_port));
        check_consistent(&t);
    }

    #[test]
    fn port_class_kept() {
        // Range spans both classes.
        let mut t = FlowTable::new(cfg(0, 1, 500, 2000, 2000));
        let a = t.create(&ik(Proto::Tcp, 2, 800, 9, 80), EXT, 0).unwrap();
        assert_eq!(t.get(a).ext_port, 800);
        for src in 3..200 {
            let id = t.create(&ik(Proto::Tcp, src, 800, 9, 80), EXT, 0).unwrap();
            assert!((500..1024).contains(&t.get(id).ext_port), "low class lost");
            let id = t.create(&ik(Proto::Udp, src, 3000, 9, 80), EXT, 0).unwrap();
            assert!(
                (1024..=2000).contains(&t.get(id).ext_port),
                "high class lost"
            );
        }
        // Low class exhausted: falls back to high ports.
        let mut t = FlowTable::new(cfg(0, 1, 1020, 1100, 2000));
        for src in 1..=4 {
            let id = t.create(&ik(Proto::Tcp, src, 1021, 9, 80), EXT, 0).unwrap();
            assert!((1020..1024).contains(&t.get(id).ext_port));
        }
        let id = t.create(&ik(Proto::Tcp, 5, 1021, 9, 80), EXT, 0).unwrap();
        assert!((1024..=1100).contains(&t.get(id).ext_port));
        // High class never gets a low port while the range has high ports.
        let mut t = FlowTable::new(cfg(0, 1, 1020, 1024, 2000));
        let id = t.create(&ik(Proto::Tcp, 1, 5000, 9, 80), EXT, 0).unwrap();
        assert_eq!(t.get(id).ext_port, 1024);
        assert_eq!(
            t.create(&ik(Proto::Tcp, 2, 5000, 9, 80), EXT, 0),
            Err(CreateError::PortsExhausted)
        );
        // A range with only low ports: used for high inside ports too.
        let mut t = FlowTable::new(cfg(0, 1, 600, 601, 2000));
        let id = t.create(&ik(Proto::Udp, 1, 5000, 9, 80), EXT, 0).unwrap();
        assert!((600..=601).contains(&t.get(id).ext_port));
    }

    #[test]
    fn ports_exhausted() {
        // Ports 2000..=2009, worker 1 of 2 owns the 5 odd ones.
        let mut t = FlowTable::new(cfg(1, 2, 2000, 2009, 100));
        let mut ports = Vec::new();
        for src in 1..=5 {
            let id = t.create(&ik(Proto::Udp, src, 7000, 9, 53), EXT, 0).unwrap();
            ports.push(t.get(id).ext_port);
        }
        ports.sort();
        assert_eq!(ports, vec![2001, 2003, 2005, 2007, 2009]);
        assert_eq!(
            t.create(&ik(Proto::Udp, 6, 7000, 9, 53), EXT, 0),
            Err(CreateError::PortsExhausted)
        );
        assert_eq!(t.stats().ports_exhausted, 1);
        // A known endpoint still gets new flows on its mapping.
        assert!(t.create(&ik(Proto::Udp, 1, 7000, 10, 53), EXT, 0).is_ok());
        // Other protocols have their own ports.
        assert!(t.create(&ik(Proto::Tcp, 6, 7000, 9, 53), EXT, 0).is_ok());
        // Freeing one makes room again.
        let id = t.lookup_in2out(&ik(Proto::Udp, 3, 7000, 9, 53), 0).unwrap();
        t.remove(id);
        assert!(t.create(&ik(Proto::Udp, 6, 7000, 9, 53), EXT, 0).is_ok());
        check_consistent(&t);
    }

    #[test]
    fn expiry_per_protocol() {
        for (proto, timeout) in [
            (Proto::Udp, T.udp_ms),
            (Proto::Icmp, T.icmp_ms),
            (Proto::Tcp, T.tcp_transitory_ms),
        ] {
            let mut t = table();
            let k = ik(proto, 2, 5000, 9, if proto == Proto::Icmp { 0 } else { 80 });
            let id = t.create(&k, EXT, 1000).unwrap();
            let ok = t.get(id).out_key();
            assert_eq!(t.get(id).expires_at_ms(&T), 1000 + timeout);
            assert_eq!(t.lookup_in2out(&k, 1000 + timeout - 1), Some(id));
            assert_eq!(t.lookup_out2in(&ok, 1000 + timeout - 1), Some(id));
            // Refresh moves the deadline.
            acc(&mut t, id, Direction::In2Out, SYN, 60, 2000);
            assert_eq!(t.lookup_out2in(&ok, 2000 + timeout - 1), Some(id));
            assert_eq!(t.lookup_out2in(&ok, 2000 + timeout), None);
            assert_eq!(t.lookup_in2out(&k, 2000 + timeout), None);
            assert!(t.is_empty());
            assert_eq!(t.stats().expired, 1);
            assert_eq!(t.mappings_len(), 0);
            check_consistent(&t);
        }
        // TCP established uses the long timeout.
        let mut t = table();
        let k = ik(Proto::Tcp, 2, 5000, 9, 443);
        let id = t.create(&k, EXT, 0).unwrap();
        acc(&mut t, id, Direction::In2Out, SYN, 60, 0);
        acc(&mut t, id, Direction::Out2In, SYNACK, 60, 0);
        acc(&mut t, id, Direction::In2Out, ACK, 52, 0);
        assert_eq!(tcp_state(&t, id), TcpState::Established);
        assert_eq!(t.lookup_in2out(&k, T.tcp_established_ms - 1), Some(id));
        assert_eq!(t.lookup_in2out(&k, T.tcp_established_ms), None);
    }

    #[test]
    fn tcp_normal_open_and_close() {
        let mut t = table();
        let k = ik(Proto::Tcp, 2, 5000, 9, 443);
        let id = t.create(&k, EXT, 0).unwrap();
        assert_eq!(tcp_state(&t, id), TcpState::SynSent);
        acc(&mut t, id, Direction::In2Out, SYN, 60, 0);
        assert_eq!(tcp_state(&t, id), TcpState::SynSent);
        acc(&mut t, id, Direction::In2Out, SYN, 60, 0); // retransmit
        assert_eq!(tcp_state(&t, id), TcpState::SynSent);
        acc(&mut t, id, Direction::In2Out, ACK, 60, 0); // odd, no effect
        assert_eq!(tcp_state(&t, id), TcpState::SynSent);
        acc(&mut t, id, Direction::Out2In, SYNACK, 60, 0);
        assert_eq!(tcp_state(&t, id), TcpState::SynReceived);
        acc(&mut t, id, Direction::Out2In, SYNACK, 60, 0); // retransmit
        assert_eq!(tcp_state(&t, id), TcpState::SynReceived);
        acc(&mut t, id, Direction::In2Out, ACK, 52, 0);
        assert_eq!(tcp_state(&t, id), TcpState::Established);
        acc(&mut t, id, Direction::Out2In, ACK, 1500, 0);
        assert_eq!(tcp_state(&t, id), TcpState::Established);
        acc(&mut t, id, Direction::In2Out, FINACK, 52, 0);
        assert_eq!(tcp_state(&t, id), TcpState::FinWait);
        acc(&mut t, id, Direction::In2Out, FINACK, 52, 0); // retransmitted FIN
        assert_eq!(tcp_state(&t, id), TcpState::FinWait);
        acc(&mut t, id, Direction::Out2In, ACK, 52, 10);
        assert_eq!(tcp_state(&t, id), TcpState::FinWait);
        assert_eq!(t.get(id).expires_at_ms(&T), 10 + T.tcp_transitory_ms);
        acc(&mut t, id, Direction::Out2In, FINACK, 52, 20);
        assert_eq!(tcp_state(&t, id), TcpState::Closing);
        acc(&mut t, id, Direction::In2Out, ACK, 52, 30);
        assert_eq!(tcp_state(&t, id), TcpState::Closing);
        // FIN/FIN: transitory timeout.
        assert_eq!(t.lookup_in2out(&k, 30 + T.tcp_transitory_ms - 1), Some(id));
        assert_eq!(t.lookup_in2out(&k, 30 + T.tcp_transitory_ms), None);
    }

    #[test]
    fn tcp_simultaneous_open() {
        let mut t = table();
        let id = t.create(&ik(Proto::Tcp, 2, 5000, 9, 443), EXT, 0).unwrap();
        acc(&mut t, id, Direction::In2Out, SYN, 60, 0);
        acc(&mut t, id, Direction::Out2In, SYN, 60, 0);
        assert_eq!(tcp_state(&t, id), TcpState::SynReceived);
        acc(&mut t, id, Direction::In2Out, SYNACK, 60, 0);
        assert_eq!(tcp_state(&t, id), TcpState::SynReceived);
        acc(&mut t, id, Direction::Out2In, SYNACK, 60, 0);
        assert_eq!(tcp_state(&t, id), TcpState::Established);

        // Variant: the ACK arrives before the second SYN+ACK.
        let id = t.create(&ik(Proto::Tcp, 2, 5001, 9, 443), EXT, 0).unwrap();
        acc(&mut t, id, Direction::In2Out, SYN, 60, 0);
        acc(&mut t, id, Direction::Out2In, SYN, 60, 0);
        acc(&mut t, id, Direction::Out2In, SYNACK, 60, 0);
        assert_eq!(tcp_state(&t, id), TcpState::SynReceived);
        acc(&mut t, id, Direction::In2Out, ACK, 60, 0);
        assert_eq!(tcp_state(&t, id), TcpState::Established);
    }

    #[test]
    fn tcp_fin_from_outside_first_and_rst() {
        let mut t = table();
        let k = ik(Proto::Tcp, 2, 5000, 9, 443);
        let id = t.create(&k, EXT, 0).unwrap();
        for (d, f) in [
            (Direction::In2Out, SYN),
            (Direction::Out2In, SYNACK),
            (Direction::In2Out, ACK),
        ] {
            acc(&mut t, id, d, f, 60, 0);
        }
        acc(&mut t, id, Direction::Out2In, FINACK, 52, 0);
        assert_eq!(tcp_state(&t, id), TcpState::FinWait);
        acc(&mut t, id, Direction::Out2In, FINACK, 52, 0);
        assert_eq!(tcp_state(&t, id), TcpState::FinWait);
        acc(&mut t, id, Direction::In2Out, FINACK, 52, 0);
        assert_eq!(tcp_state(&t, id), TcpState::Closing);

        // RST from either side -> Closed with the transitory timeout.
        for dir in [Direction::In2Out, Direction::Out2In] {
            let k = ik(
                Proto::Tcp,
                3,
                if dir == Direction::In2Out { 6000 } else { 6001 },
                9,
                443,
            );
            let id = t.create(&k, EXT, 0).unwrap();
            for (d, f) in [
                (Direction::In2Out, SYN),
                (Direction::Out2In, SYNACK),
                (Direction::In2Out, ACK),
            ] {
                acc(&mut t, id, d, f, 60, 0);
            }
            assert_eq!(tcp_state(&t, id), TcpState::Established);
            acc(&mut t, id, dir, RST, 40, 100);
            assert_eq!(tcp_state(&t, id), TcpState::Closed);
            acc(&mut t, id, Direction::In2Out, ACK, 40, 100);
            assert_eq!(tcp_state(&t, id), TcpState::Closed);
            assert_eq!(t.get(id).expires_at_ms(&T), 100 + T.tcp_transitory_ms);
            // A new SYN from inside reopens the tuple.
            acc(&mut t, id, Direction::In2Out, SYN, 60, 100);
            assert_eq!(tcp_state(&t, id), TcpState::SynSent);
            acc(&mut t, id, Direction::Out2In, SYNACK, 60, 100);
            acc(&mut t, id, Direction::In2Out, ACK, 60, 100);
            assert_eq!(tcp_state(&t, id), TcpState::Established);
        }
    }

    #[test]
    fn tcp_midstream_pickup() {
        let mut t = table();
        let id = t.create(&ik(Proto::Tcp, 2, 5000, 9, 443), EXT, 0).unwrap();
        acc(&mut t, id, Direction::In2Out, ACK, 60, 0);
        assert_eq!(tcp_state(&t, id), TcpState::SynSent);
        acc(&mut t, id, Direction::Out2In, ACK, 60, 0);
        assert_eq!(tcp_state(&t, id), TcpState::Established);
        // But not when a SYN was sent (a bare ACK back is not a handshake).
        let id = t.create(&ik(Proto::Tcp, 2, 5001, 9, 443), EXT, 0).unwrap();
        acc(&mut t, id, Direction::In2Out, SYN, 60, 0);
        acc(&mut t, id, Direction::Out2In, ACK, 60, 0);
        assert_eq!(tcp_state(&t, id), TcpState::SynSent);
    }

    #[test]
    fn max_flows_early_drop_then_table_full() {
        let mut t = FlowTable::new(cfg(0, 1, 1024, 65535, 4));
        let mut ids = Vec::new();
        for i in 0..4u16 {
            ids.push(
                t.create(&ik(Proto::Udp, 2, 5000 + i, 9, 53), EXT, u64::from(i))
                    .unwrap(),
            );
        }
        // Reply to all but the second one (created at t=1).
        for (n, &id) in ids.iter().enumerate() {
            if n != 1 {
                acc(&mut t, id, Direction::Out2In, NONE, 10, 10);
            }
        }
        let k = ik(Proto::Udp, 3, 6000, 9, 53);
        let id = t.create(&k, EXT, 20).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t.stats().early_dropped, 1);
        assert_eq!(t.lookup_in2out(&ik(Proto::Udp, 2, 5001, 9, 53), 20), None);
        assert_eq!(t.mappings_len(), 4);
        // Now every flow but the new one is replied; reply to it as well.
        acc(&mut t, id, Direction::Out2In, NONE, 10, 20);
        assert_eq!(
            t.create(&ik(Proto::Udp, 4, 6000, 9, 53), EXT, 20),
            Err(CreateError::TableFull)
        );
        assert_eq!(t.stats().table_full, 1);
        assert_eq!(t.len(), 4);
        // An expired flow is reclaimed before anything is evicted.
        let late = 10 + T.udp_ms;
        let id = t
            .create(&ik(Proto::Udp, 4, 6000, 9, 53), EXT, late)
            .unwrap();
        assert_eq!(t.stats().expired, 1);
        assert_eq!(t.stats().early_dropped, 1);
        assert_eq!(t.get(id).last_seen_ms, late);
        check_consistent(&t);
    }

    #[test]
    fn early_drop_picks_oldest_unreplied() {
        let mut t = FlowTable::new(cfg(0, 1, 1024, 65535, 3));
        t.create(&ik(Proto::Udp, 2, 5000, 9, 53), EXT, 5).unwrap();
        t.create(&ik(Proto::Udp, 2, 5001, 9, 53), EXT, 1).unwrap();
        t.create(&ik(Proto::Udp, 2, 5002, 9, 53), EXT, 3).unwrap();
        t.create(&ik(Proto::Udp, 3, 5003, 9, 53), EXT, 6).unwrap();
        assert_eq!(t.lookup_in2out(&ik(Proto::Udp, 2, 5001, 9, 53), 6), None);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn max_flows_zero() {
        let mut t = FlowTable::new(cfg(0, 1, 1024, 65535, 0));
        assert_eq!(
            t.create(&ik(Proto::Udp, 2, 5000, 9, 53), EXT, 0),
            Err(CreateError::TableFull)
        );
    }

    #[test]
    fn mapping_released_with_last_flow() {
        let mut t = FlowTable::new(cfg(0, 1, 1024, 65535, 100));
        let a = t.create(&ik(Proto::Udp, 2, 5000, 9, 53), EXT, 0).unwrap();
        let b = t
            .create(&ik(Proto::Udp, 2, 5000, 10, 53), EXT, 100)
            .unwrap();
        assert_eq!(t.get(a).ext_port, 5000);
        assert_eq!(t.get(b).ext_port, 5000);
        // Another endpoint wanting 5000 can't have it.
        let c = t.create(&ik(Proto::Udp, 3, 5000, 9, 53), EXT, 200).unwrap();
        let pc = t.get(c).ext_port;
        assert_ne!(pc, 5000);
        // First flow expires: the mapping (and port) stay.
        assert_eq!(t.expire(T.udp_ms, usize::MAX), 1);
        assert_eq!(t.mappings_len(), 2);
        assert!(t.ports[Proto::Udp.index()].contains(5000));
        // New flow of the endpoint still gets 5000.
        let d = t
            .create(&ik(Proto::Udp, 2, 5000, 11, 53), EXT, T.udp_ms)
            .unwrap();
        assert_eq!(t.get(d).ext_port, 5000);
        t.remove(b);
        assert!(t.ports[Proto::Udp.index()].contains(5000));
        t.remove(d);
        assert!(!t.ports[Proto::Udp.index()].contains(5000));
        assert_eq!(t.mappings_len(), 1);
        // Now a different endpoint can be preserved onto 5000.
        let e = t
            .create(&ik(Proto::Udp, 4, 5000, 9, 53), EXT, T.udp_ms)
            .unwrap();
        assert_eq!(t.get(e).ext_port, 5000);
        check_consistent(&t);
    }

    #[test]
    fn expire_honours_budget() {
        let mut t = FlowTable::new(cfg(0, 1, 1024, 65535, 1000));
        for i in 0..100u16 {
            // Even ones at t=0, odd ones at t=100_000.
            let now = if i % 2 == 0 { 0 } else { 100_000 };
            t.create(&ik(Proto::Udp, 2, 2000 + i, 9, 53), EXT, now)
                .unwrap();
        }
        assert_eq!(t.expire(T.udp_ms - 1, usize::MAX), 0);
        let now = T.udp_ms; // even ones expired
        assert_eq!(t.expire(now, 0), 0);
        let mut removed = 0;
        let mut calls = 0;
        while removed < 50 {
            let r = t.expire(now, 7);
            assert!(r <= 7);
            removed += r;
            calls += 1;
            assert!(calls < 100);
        }
        assert_eq!(calls, 15); // the last expired slot (98) is examined by call ceil(99 / 7) = 15
        assert_eq!(removed, 50);
        assert_eq!(t.len(), 50);
        assert_eq!(t.stats().expired, 50);
        // Budget larger than the slab: one lap only.
        assert_eq!(t.expire(now, 1_000_000), 0);
        assert_eq!(t.expire(100_000 + T.udp_ms, 1_000_000), 50);
        assert!(t.is_empty());
        assert_eq!(t.mappings_len(), 0);
        check_consistent(&t);
        t.clear();
        assert_eq!(t.expire(0, 10), 0);
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

    #[test]
    fn ext_addr_change_keeps_port() {
        let mut t = table();
        let a = t.create(&ik(Proto::Udp, 2, 5000, 9, 53), EXT, 0).unwrap();
        let new = Ipv4Addr::new(198, 51, 100, 2);
        let b = t.create(&ik(Proto::Udp, 2, 5000, 10, 53), new, 0).unwrap();
        assert_eq!(t.get(a).ext_addr, EXT);
        assert_eq!(t.get(b).ext_addr, new);
        assert_eq!(t.get(b).ext_port, t.get(a).ext_port);
        let ok = t.get(b).out_key();
        assert_eq!(t.lookup_out2in(&ok, 0), Some(b));
        check_consistent(&t);
    }

    #[test]
    fn property_random_ops_keep_indexes_consistent() {
        let mut total = TableStats::default();
        for (worker, workers, filtering, delay) in [
            (0, 1, Filtering::AddressAndPort, 0),
            (1, 3, Filtering::Address, 3_000),
            (0, 2, Filtering::EndpointIndependent, 500),
        ] {
            let mut t = FlowTable::new(TableConfig {
                seed: 7,
                filtering,
                port_reuse_delay_ms: delay,
                ..cfg(worker, workers, 1000, 1120, 150)
            });
            // A forward inside the dynamic range and one outside it.
            let fwd = (1000..1003).find(|p| p % workers == worker).unwrap();
            t.add_forward(Proto::Tcp, EXT, fwd, Ipv4Addr::new(10, 0, 0, 5), 80)
                .unwrap();
            t.add_forward(
                Proto::Udp,
                EXT,
                3000 + worker,
                Ipv4Addr::new(10, 0, 0, 5),
                53,
            )
            .unwrap();
            let mut rng = XorShift::new(99);
            let mut now = 0u64;
            for step in 0..5000 {
                // Mostly small steps (the table fills up), sometimes a jump
                // past some timeouts.
                now += u64::from(if rng.below(500) == 0 {
                    rng.below(400_000)
                } else {
                    rng.below(50)
                });
                let proto = [Proto::Tcp, Proto::Udp, Proto::Icmp][rng.below(3) as usize];
                let k = ik(
                    proto,
                    rng.below(30) as u8,
                    990 + rng.below(40) as u16,
                    rng.below(4) as u8,
                    80,
                );
                match rng.below(10) {
                    0..=4 => match t.create(&k, EXT, now) {
                        Ok(id) => {
                            assert_eq!(t.get(id).inside, k);
                            let flags = TcpFlags {
                                syn: true,
                                ..TcpFlags::default()
                            };
                            acc(&mut t, id, Direction::In2Out, flags, 60, now);
                            // Most flows get an answer (so the table can be
                            // full of replied flows), some never do.
                            if rng.below(8) != 0 {
                                acc(&mut t, id, Direction::Out2In, SYNACK, 60, now);
                            }
                        }
                        Err(CreateError::PortsExhausted) => {}
                        Err(CreateError::TableFull) => assert_eq!(t.len(), 150),
                    },
                    5 => {
                        if let Some(id) = t.lookup_in2out(&k, now) {
                            acc(&mut t, id, Direction::Out2In, SYNACK, 60, now);
                        }
                    }
                    6 => {
                        if let Some(id) = t.lookup_in2out(&k, now) {
                            t.remove(id);
                        }
                    }
                    7 => {
                        t.expire(now, rng.below(50) as usize);
                    }
                    8 => {
                        // Inbound to a random port of the slice (or a
                        // forward) from a random remote.
                        let eport = match rng.below(4) {
                            0 => fwd,
                            1 => 3000 + worker,
                            _ => 1000 + rng.below(121) as u16,
                        };
                        let proto = if rng.below(2) == 0 {
                            Proto::Tcp
                        } else {
                            Proto::Udp
                        };
                        let key = OutKey {
                            proto,
                            remote: Ipv4Addr::new(203, 0, 113, rng.below(4) as u8),
                            rport: 80 + rng.below(3) as u16,
                            ext: EXT,
                            eport,
                        };
                        let flags = if rng.below(2) == 0 { SYN } else { ACK };
                        if let Ok(id) = t.inbound(&key, flags, now) {
                            assert_eq!(t.get(id).out_key(), key);
                            acc(&mut t, id, Direction::Out2In, flags, 60, now);
                        }
                    }
                    _ => {
                        // Remove a random live flow by slot.
                        let n = t.flows.len();
                        if n > 0 {
                            let i = rng.below(n as u32) as usize;
                            if t.tags[i] & tag::LIVE != 0 {
                                t.remove(FlowId(i as u32));
                            }
                        }
                    }
                }
                if step % 97 == 0 {
                    check_consistent(&t);
                }
                // Lookups never return expired flows.
                if let Some(id) = t.lookup_in2out(&k, now) {
                    assert!(now < t.get(id).expires_at_ms(&T));
                    let ok = t.get(id).out_key();
                    assert_eq!(t.lookup_out2in(&ok, now), Some(id));
                }
            }
            check_consistent(&t);
            let st = t.stats();
            total.created += st.created;
            total.expired += st.expired;
            total.early_dropped += st.early_dropped;
            total.table_full += st.table_full;
            total.ports_exhausted += st.ports_exhausted;
            total.inbound_created += st.inbound_created;
            total.inbound_filtered += st.inbound_filtered;
        }
        // The loops reach every slow path.
        let t = total;
        assert!(
            t.created > 0 && t.expired > 0 && t.early_dropped > 0,
            "{t:?}"
        );
        assert!(t.table_full > 0 && t.ports_exhausted > 0, "{t:?}");
        assert!(t.inbound_created > 0 && t.inbound_filtered > 0, "{t:?}");
    }
}
