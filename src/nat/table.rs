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
//! # Parts
//!
//! [`FlowTable`] is a facade over parts that each own one concern and know
//! nothing of each other; the facade keeps them in step (a removed flow
//! unrefs its mapping, which may release its port, and ends its filtering
//! session):
//!
//! * `types`: the plain data of the API: keys, flows, segments, the
//!   configuration, the errors and the counters.
//! * `slab`: the slots of the flows, the free list and the one hash index
//!   (inside key -> slot).
//! * `mappings`: the endpoint-independent mappings, refcounted by their
//!   flows, and their reverse index (outside port -> inside endpoint).
//! * `filter`: the [`Filtering`] decision and, for address-dependent
//!   filtering, the sessions per (mapping, remote address).
//! * `ports`: the worker's port slice, port choice and the quarantine.
//! * `tcp`: the TCP state machine and the RST validation.
//! * `expiry`: timeouts, the sweep cursor and the early-drop choice.
//! * `pods`: what each inside address (pod) holds, its limits, and which
//!   of its own flows go first.
//!
//! # Counters
//!
//! The table counts only what no caller can see: flows removed because
//! they timed out and flows evicted by early drop ([`TableStats`]). Every
//! refusal comes back as a [`CreateError`], an [`InboundError`] or a
//! [`Verdict`], and every new flow as an `Ok`, for the caller to count
//! (the gateway keeps a counter per reason); [`FlowTable::expire`] also
//! returns what it removed.
//!
//! # Events
//!
//! While recording is on ([`FlowTable::set_recording`], off by default),
//! the table notes every flow created and removed, with why it went
//! ([`EndReason`]), and every dynamic mapping acquired and released, in a
//! journal of at most [`JOURNAL_MAX`] entries that the caller drains
//! ([`FlowTable::drain_events`]); what does not fit is counted
//! ([`FlowTable::events_lost`]). Off, each creation and removal costs one
//! branch; the journal is reserved once when recording starts, so no
//! packet allocates.
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
//!   or UDP port released by its mapping stays unusable for that long for
//!   every other pod (inside address); its own pod takes it back only when
//!   it is at its port share or no port is free (its oldest one first; the
//!   `pods` part). Released ports wait in a FIFO (release order = expiry
//!   order, as the delay is fixed) that is drained at allocation and sweep
//!   time; while they wait their bit stays set in the port set, so if only
//!   quarantined ports of other pods are left the create fails with
//!   [`CreateError::PortsExhausted`]. ICMP ids are reused
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
//! [`CreateError::TableFull`] (the caller counts it). "Replied" means
//! the responder (the side that did not open the flow) has sent a packet,
//! so a SYN flood from either side only ever evicts its own kind.
//!
//! Per pod (inside address; the `pods` part's docs): at most
//! `max_flows_per_pod` flows (those opened from outside included) and
//! `ports_per_pod` outside ports per protocol (quarantined ones included).
//! At the flow limit the pod's own oldest unreplied flow or closed TCP
//! connection (RST, or FIN both ways) goes; at the port limit, or when no
//! port is free, the pod takes back its own oldest quarantined port, else
//! its oldest such flow that is its mapping's only one goes and its port is
//! reused at once; else the create fails with
//! [`CreateError::PodFlowLimit`], [`CreateError::PodPortLimit`] or
//! [`CreateError::PortsExhausted`]. In a full table, a pod holding at least
//! an even share (`max_flows` / pods with flows) loses its own unreplied
//! flows before early drop is tried; a pod below it tries early drop first.
//!
//! # TCP state machine
//!
//! Driven by the SYN/ACK/FIN/RST flags of segments, from the initiator's
//! point of view (the inside host for [`FlowTable::create`], the remote one
//! for [`FlowTable::inbound`]). RSTs are validated against the tracked
//! sequence space first: an out-of-window RST gets
//! [`Verdict::DropInvalidRst`] and changes nothing. A valid one closes the
//! flow, which then lives for the transitory timeout (RFC 5382 REQ-5 /
//! RFC 7857 §2.2 keep the mapping that long after a RST). The `tcp` part's
//! docs draw the transitions and give the RST rule.
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
//! TCP/UDP port. Per pod with anything charged: one map entry (about 56
//! bytes) and its victim queue, one 14-byte inside key per flow (at most
//! 2 x its flows + 16 before it is compacted).

mod expiry;
mod filter;
mod index;
mod live;
mod mappings;
mod pods;
mod ports;
mod slab;
mod tcp;
mod types;
mod types_events;

pub use expiry::EARLY_DROP_SCAN;
pub use filter::Filtering;
pub use types::{
    CreateError, Direction, Flow, FlowId, FlowState, ForwardError, InKey, InboundError, OutKey,
    Proto, TableConfig, TableStats, TcpFlags, TcpSeg, TcpState, Timeouts, Verdict,
};
pub use types_events::{EndReason, TableEvent, JOURNAL_MAX};

use expiry::{Sweep, Victim};
use filter::Filter;
use mappings::{MapKey, Mappings};
use pods::Pods;
use ports::Ports;
use slab::{tag, Slab};
use std::fmt;
use std::net::Ipv4Addr;

/// The flow table of one worker. See the module docs for the contract.
pub struct FlowTable {
    cfg: TableConfig,
    slab: Slab,
    mappings: Mappings,
    filter: Filter,
    ports: Ports,
    pods: Pods,
    sweep: Sweep,
    /// Latest `now_ms` seen (for calls without one, like `remove`).
    clock_ms: u64,
    stats: TableStats,
    /// Flow and mapping starts and ends, noted while `recording`.
    journal: Vec<TableEvent>,
    recording: bool,
    /// Events that did not fit in the journal.
    events_lost: u64,
}

impl fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowTable")
            .field("worker", &self.cfg.worker)
            .field("workers", &self.cfg.workers)
            .field("len", &self.slab.len())
            .field("slots", &self.slab.slots())
            .field("mappings", &self.mappings.len())
            .field("cooling", &self.ports.cooling_len())
            .field("stats", &self.stats)
            .finish()
    }
}

/// Initial capacity cap: big tables grow on demand instead of reserving
/// `max_flows` up front.
const INITIAL_CAPACITY_CAP: usize = 1 << 16;
/// Keys a warm-up stage handles before the next stage starts: enough to
/// overlap many misses, few enough that the first bucket is still cached
/// when the second stage reaches it.
const WARM_BURST: usize = 32;

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
            slab: Slab::with_capacity(cap),
            mappings: Mappings::new(cfg.workers, map_cap),
            filter: Filter::new(cfg.filtering),
            ports: Ports::new(&cfg),
            pods: Pods::new(cfg.max_flows_per_pod, cfg.ports_per_pod),
            sweep: Sweep::default(),
            clock_ms: 0,
            stats: TableStats::default(),
            journal: Vec::new(),
            recording: false,
            events_lost: 0,
            cfg,
        }
    }

    /// The configuration this table was built with.
    pub fn config(&self) -> &TableConfig {
        &self.cfg
    }

    #[inline]
    fn is_expired(&self, i: usize, now_ms: u64) -> bool {
        expiry::is_expired(self.slab.flow(i), &self.cfg.timeouts, now_ms)
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
        let i = self.slab.find(key)?;
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

    /// Warms the cache for a burst of outbound lookups: the index buckets
    /// of all of `keys` first, then the flow slots they name, so the cache
    /// misses of the burst overlap instead of following one another (VPP's
    /// dual/quad loops). A hint: it changes nothing, and the lookups that
    /// follow ([`FlowTable::lookup_in2out`]) find the same flows either way.
    pub fn warm_in2out(&self, keys: &[InKey]) {
        for chunk in keys.chunks(WARM_BURST) {
            let mut hashes = [0u64; WARM_BURST];
            for (h, k) in hashes.iter_mut().zip(chunk) {
                *h = self.slab.hash(k);
                self.slab.prefetch(*h);
            }
            for (&h, k) in hashes.iter().zip(chunk) {
                self.slab.prefetch_flow(h, k.proto == Proto::Tcp);
            }
        }
    }

    /// [`FlowTable::warm_in2out`] for inbound lookups: the mappings'
    /// reverse-index entries of all of `keys` first (they name the inside
    /// key), then the index buckets, then the flow slots.
    pub fn warm_out2in(&self, keys: &[OutKey]) {
        for chunk in keys.chunks(WARM_BURST) {
            for k in chunk {
                self.mappings.prefetch_owner(k.proto, k.eport);
            }
            let mut hashes = [None; WARM_BURST];
            for (h, k) in hashes.iter_mut().zip(chunk) {
                if let Some((src, sport)) = self.mappings.last_owner(k.proto, k.eport) {
                    let hash = self.slab.hash(&InKey {
                        proto: k.proto,
                        src,
                        sport,
                        dst: k.remote,
                        dport: k.rport,
                    });
                    self.slab.prefetch(hash);
                    *h = Some(hash);
                }
            }
            for (h, k) in hashes.iter().zip(chunk) {
                if let Some(h) = *h {
                    self.slab.prefetch_flow(h, k.proto == Proto::Tcp);
                }
            }
        }
    }

    /// Slot of the flow whose [`Flow::out_key`] is `key`. The outside port
    /// names the mapping (while a mapping has flows, the reverse index holds
    /// its inside endpoint for its port), which gives the inside key; the
    /// flow found must then have the key's outside address and port (the
    /// reverse index may be stale, and flows of one mapping may use
    /// different outside addresses).
    #[inline]
    fn find_out(&self, key: &OutKey) -> Option<usize> {
        let (src, sport) = self.mappings.last_owner(key.proto, key.eport)?;
        let inside = InKey {
            proto: key.proto,
            src,
            sport,
            dst: key.remote,
            dport: key.rport,
        };
        let i = self.slab.find(&inside)?;
        let f = self.slab.flow(i);
        (f.ext_port == key.eport && f.ext_addr == key.ext).then_some(i)
    }

    #[inline]
    fn check_live(&mut self, i: usize, now_ms: u64) -> Option<FlowId> {
        if self.is_expired(i, now_ms) {
            self.expire_slot(i, now_ms);
            None
        } else {
            Some(FlowId(i as u32))
        }
    }

    /// A lookup hit an expired flow: remove it (kept out of line, so the
    /// lookup path stays small).
    #[cold]
    #[inline(never)]
    fn expire_slot(&mut self, i: usize, now_ms: u64) {
        self.tick(now_ms);
        self.remove_slot_for(i, EndReason::Timeout);
        self.stats.expired += 1;
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
        if let Some(i) = self.slab.find(key) {
            if let Some(id) = self.check_live(i, now_ms) {
                return Ok(id);
            }
        }
        self.tick(now_ms);
        self.admit(key.src, now_ms)?;
        self.end_quarantines(now_ms);
        let existed = self.recording && self.mappings.contains(&(key.proto, key.src, key.sport));
        let (ext_addr, ext_port) = self.acquire_mapping(key, ext_addr)?;
        if self.recording && !existed {
            self.note(TableEvent::MappingNew {
                proto: key.proto,
                inside: (key.src, key.sport),
                outside: (ext_addr, ext_port),
            });
        }
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
        let Some(mk) = self.mappings.owner_of(key.proto, key.eport) else {
            return Err(InboundError::NoMapping);
        };
        let m = *self.mappings.get(&mk).expect("owner has a mapping");
        if m.ext_addr != key.ext || (m.refs == 0 && !m.forward) {
            return Err(InboundError::NoMapping);
        }
        if !m.forward && !self.filter.allows(key.proto, key.eport, key.remote) {
            return Err(InboundError::Filtered);
        }
        if key.proto == Proto::Tcp && !(flags.syn && !flags.ack && !flags.rst) {
            return Err(InboundError::NotSyn);
        }
        let inside = InKey {
            proto: key.proto,
            src: mk.1,
            sport: mk.2,
            dst: key.remote,
            dport: key.rport,
        };
        if let Some(i) = self.slab.find(&inside) {
            // The inside endpoint already talks to this remote through
            // another outside address (the masquerade address changed).
            if self.check_live(i, now_ms).is_some() {
                return Err(InboundError::Filtered);
            }
        }
        self.tick(now_ms);
        // Pin the mapping so that making room cannot release it.
        self.mappings.pin(&mk);
        if let Err(e) = self.admit(inside.src, now_ms) {
            self.unref_mapping(mk);
            return Err(match e {
                CreateError::PodFlowLimit => InboundError::PodFlowLimit,
                _ => InboundError::TableFull,
            });
        }
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
        let i = self.slab.insert(flow, tag::LIVE | origin);
        self.pods.flow_added(inside, &self.slab);
        // No overloading means out keys are unique: two inside endpoints
        // never share (proto, ext port), and one endpoint's flows differ in
        // (remote, rport).
        debug_assert_eq!(self.find_out(&flow.out_key()), Some(i as usize));
        self.filter
            .session_added(inside.proto, ext_port, inside.dst);
        if self.recording {
            self.note(TableEvent::FlowNew(flow));
        }
        FlowId(i)
    }

    /// Table full: frees one slot by removing an expired flow, else evicting
    /// the least recently seen unreplied flow among the next
    /// [`EARLY_DROP_SCAN`] slots from the sweep cursor.
    fn make_room(&mut self, now_ms: u64) -> bool {
        match self.sweep.victim(&self.slab, &self.cfg.timeouts, now_ms) {
            Some(Victim::Expired(i)) => {
                self.remove_slot_for(i, EndReason::Timeout);
                self.stats.expired += 1;
                true
            }
            Some(Victim::Unreplied(i)) => {
                self.remove_slot_for(i, EndReason::Evicted);
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
        debug_assert!(self.slab.is_live(id.0 as usize), "stale FlowId");
        self.slab.flow(id.0 as usize)
    }

    /// Whether the flow was opened from outside ([`FlowTable::inbound`]).
    #[inline]
    pub fn opened_inbound(&self, id: FlowId) -> bool {
        self.slab.tag(id.0 as usize) & tag::ORIGIN_OUT != 0
    }

    /// Account a packet of `len` bytes in `dir` at `now_ms`. For TCP, first
    /// validate a RST against the tracked sequence space (the `tcp` part's
    /// docs): an invalid one returns [`Verdict::DropInvalidRst`] and changes
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
        debug_assert!(self.slab.is_live(i), "stale FlowId");
        let (f, t, sq) = self.slab.slot_mut(i);
        let is_tcp = matches!(f.state, FlowState::Tcp(_));
        if is_tcp && seg.flags.rst && !sq.rst_acceptable(dir, &seg) {
            return Verdict::DropInvalidRst;
        }
        f.last_seen_ms = now_ms;
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
            f.state = FlowState::Tcp(tcp::track(s, t, sq, dir, &seg));
        }
        self.tick(now_ms);
        Verdict::Accept
    }

    /// Incremental expiry: examine at most `budget` slots (and at most one
    /// full lap) from a sweeping cursor, removing expired flows; returns the
    /// number removed. Also ends due port quarantines.
    pub fn expire(&mut self, now_ms: u64, budget: usize) -> usize {
        self.tick(now_ms);
        self.end_quarantines(now_ms);
        let n = self.slab.slots();
        if n == 0 {
            return 0;
        }
        let mut c = self.sweep.start(n);
        let mut removed = 0;
        for _ in 0..budget.min(n) {
            if self.slab.is_live(c) && self.is_expired(c, now_ms) {
                self.remove_slot_for(c, EndReason::Timeout);
                removed += 1;
            }
            c = expiry::next(c, n);
        }
        self.sweep.set(c);
        self.stats.expired += removed as u64;
        removed
    }

    /// Removes a live flow now (e.g. the masquerade address went away),
    /// releasing its mapping if it was the last flow of it (into quarantine,
    /// timed from the latest `now_ms` the table has seen). Not counted as
    /// expired; an event records it as [`EndReason::AddressChange`].
    ///
    /// # Panics
    /// If `id` is out of range or not live.
    pub fn remove(&mut self, id: FlowId) {
        assert!(self.slab.is_live(id.0 as usize), "stale FlowId");
        self.remove_slot_for(id.0 as usize, EndReason::AddressChange);
    }

    /// Removes every flow and dynamic mapping (link down / address change);
    /// their TCP/UDP ports go into quarantine. Forwards and counters are
    /// kept.
    pub fn clear(&mut self) {
        if self.recording {
            self.note_clear();
        }
        self.slab.clear();
        self.filter.clear();
        self.pods.clear_flows();
        let (ports, pods, now_ms) = (&mut self.ports, &mut self.pods, self.clock_ms);
        self.mappings.clear_dynamic(|mk, port| {
            if ports.release(mk.0, port, now_ms, Some(mk.1)) {
                pods.port_cooling(mk.1, mk.0);
            } else {
                pods.port_freed(mk.1, mk.0);
            }
        });
        self.sweep.set(0);
    }

    /// Ends the port quarantines that are due (a cheap front check when
    /// none is). A forward added meanwhile keeps its port.
    #[inline]
    fn end_quarantines(&mut self, now_ms: u64) {
        let (mappings, pods) = (&self.mappings, &mut self.pods);
        self.ports.drain_cooling(
            now_ms,
            |proto, port| mappings.owner_of(proto, port).is_some(),
            |owner, proto| pods.cooling_ended(owner, proto),
        );
    }

    /// Drops one flow of a mapping, giving its port back if that was the
    /// last one of a dynamic mapping.
    fn unref_mapping(&mut self, mk: MapKey) {
        let ext_addr = match self.recording {
            true => self.mappings.get(&mk).map(|m| m.ext_addr),
            false => None,
        };
        if let Some(port) = self.mappings.unref(mk) {
            if self.ports.release(mk.0, port, self.clock_ms, Some(mk.1)) {
                self.pods.port_cooling(mk.1, mk.0);
            } else {
                self.pods.port_freed(mk.1, mk.0);
            }
            if let Some(addr) = ext_addr {
                self.note(TableEvent::MappingEnd {
                    proto: mk.0,
                    inside: (mk.1, mk.2),
                    outside: (addr, port),
                });
            }
        }
    }

    /// Removes every flow translated to `addr` (the outside address went
    /// away: a new DHCP lease, or none), releasing their mappings as
    /// [`FlowTable::remove`] does; events record [`EndReason::AddressChange`].
    pub fn remove_address(&mut self, addr: std::net::Ipv4Addr) -> usize {
        let victims: Vec<usize> = (0..self.slab.slots())
            .filter(|&i| self.slab.is_live(i) && self.slab.flow(i).ext_addr == addr)
            .collect();
        for &i in &victims {
            self.remove_slot_for(i, EndReason::AddressChange);
        }
        victims.len()
    }

    /// Removes slot `i` as an operator's flush does (the parts that remove
    /// flows for other reasons name them: [`FlowTable::remove_slot_for`]).
    fn remove_slot(&mut self, i: usize) {
        self.remove_slot_for(i, EndReason::Flush);
    }

    fn remove_slot_for(&mut self, i: usize, why: EndReason) {
        let f = self.slab.remove(i);
        self.pods.flow_removed(f.inside.src);
        self.filter
            .session_removed(f.inside.proto, f.ext_port, f.inside.dst);
        if self.recording {
            self.note(TableEvent::FlowEnd(f, EndReason::of(&f, why)));
        }
        self.unref_mapping((f.inside.proto, f.inside.src, f.inside.sport));
    }

    /// Notes an event if the journal has room, else counts it lost.
    #[inline]
    fn note(&mut self, e: TableEvent) {
        if self.journal.len() < JOURNAL_MAX {
            self.journal.push(e);
        } else {
            self.events_lost += 1;
        }
    }

    /// The events of [`FlowTable::clear`]: every flow, then every dynamic
    /// mapping (once each), ends by an address change.
    #[cold]
    fn note_clear(&mut self) {
        let flows: Vec<Flow> = self.slab.iter().copied().collect();
        let mut seen = hashbrown::HashSet::new();
        for f in flows {
            self.note(TableEvent::FlowEnd(f, EndReason::AddressChange));
            let mk = (f.inside.proto, f.inside.src, f.inside.sport);
            if self.mappings.forward_of(&mk).is_none() && seen.insert(mk) {
                self.note(TableEvent::MappingEnd {
                    proto: mk.0,
                    inside: (mk.1, mk.2),
                    outside: (f.ext_addr, f.ext_port),
                });
            }
        }
    }

    /// Turns the journal on or off (module docs, "Events"); turning it off
    /// empties it.
    pub fn set_recording(&mut self, on: bool) {
        if on && !self.recording {
            self.journal.reserve_exact(JOURNAL_MAX);
        }
        if !on {
            self.journal.clear();
        }
        self.recording = on;
    }

    /// Whether the journal is on.
    #[inline]
    pub fn recording(&self) -> bool {
        self.recording
    }

    /// Hands every noted event to `f`, oldest first, and empties the
    /// journal (keeping its room).
    pub fn drain_events(&mut self, f: impl FnMut(TableEvent)) {
        self.journal.drain(..).for_each(f);
    }

    /// Events that did not fit in the journal since the table was made.
    pub fn events_lost(&self) -> u64 {
        self.events_lost
    }

    /// Number of live flows (some may be expired but not yet swept).
    #[inline]
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.slab.len() == 0
    }

    /// Number of mappings (= outside ports in use, quarantined ones
    /// excluded), static forwards included.
    pub fn mappings_len(&self) -> usize {
        self.mappings.len()
    }

    /// Number of outside ports in quarantine.
    pub fn cooling_len(&self) -> usize {
        self.ports.cooling_len()
    }

    /// Live flows in slab order (including expired ones not yet swept).
    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.slab.iter()
    }

    /// Snapshot of the counters (module docs, "Counters").
    pub fn stats(&self) -> TableStats {
        self.stats
    }
}

#[cfg(test)]
mod tests;
