//! The plain data of the flow table's API: keys, handles, flow records,
//! TCP segment summaries, the configuration, the errors and the counters.
//! No behaviour beyond small accessors; the parts of the table
//! ([`super::FlowTable`]) share these types.

use super::Filtering;
use std::fmt;
use std::net::Ipv4Addr;

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
    pub(super) fn index(self) -> usize {
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
pub struct FlowId(pub(super) u32);

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

/// What [`super::FlowTable::account`] needs to know of a TCP segment. For UDP and
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

/// What the caller must do with a packet after [`super::FlowTable::account`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Translate and forward it.
    Accept,
    /// A RST outside the receiver's window: drop it; the flow is unchanged
    /// (the caller counts it).
    DropInvalidRst,
}

/// Idle timeouts in milliseconds, counted from a flow's `last_seen_ms`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub tcp_established_ms: u64,
    pub tcp_transitory_ms: u64,
    pub udp_ms: u64,
    pub icmp_ms: u64,
}

/// One session: the inside flow and its outside rewrite.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    pub inside: InKey,
    pub ext_addr: Ipv4Addr,
    pub ext_port: u16,
    pub state: FlowState,
    /// The responder (the side that did not open the flow: the remote host
    /// for a [`super::FlowTable::create`]d flow, the inside host for an
    /// [`super::FlowTable::inbound`] one) has sent a packet (conntrack's
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
    /// This shard's bound on the live flows of one inside address (a pod),
    /// those opened from outside included; 0 = no bound.
    pub max_flows_per_pod: u32,
    /// This shard's bound on the outside ports (per protocol; ICMP echo
    /// ids count as ports) one inside address holds in mappings or in
    /// quarantine; 0 = no bound.
    pub ports_per_pod: u32,
    pub timeouts: Timeouts,
    /// Seed of the port-choice PRNG (deterministic in tests).
    pub seed: u64,
    /// Inbound packets with no session (module docs).
    pub filtering: Filtering,
    /// Quarantine of a released TCP/UDP outside port (RFC 6888 REQ-8 asks
    /// 120 s); 0 disables it.
    pub port_reuse_delay_ms: u64,
}

/// Why [`super::FlowTable::create`] refused a flow; the caller counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateError {
    /// `max_flows` live flows and no expired or unreplied one to evict.
    TableFull,
    /// No free (and not quarantined) outside port owned by this worker in
    /// the range, and no unreplied flow of this pod whose port could go.
    PortsExhausted,
    /// The pod holds `max_flows_per_pod` flows, none of them unreplied.
    PodFlowLimit,
    /// The pod holds `ports_per_pod` ports of the protocol (mappings and
    /// quarantined ports), and no unreplied flow whose port could go.
    PodPortLimit,
}

/// Why [`super::FlowTable::inbound`] opened no session for an inbound packet; the
/// caller drops it (and, after RFC 5382 REQ-4's 6 s, may answer with ICMP)
/// and counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundError {
    /// No live mapping or forward on the packet's `(proto, ext addr, ext
    /// port)` (or an ICMP packet).
    NoMapping,
    /// A mapping exists but [`Filtering`] refuses this remote, or the
    /// session it would open clashes with an existing one.
    Filtered,
    /// TCP without SYN, or with SYN+ACK: never opens a session.
    NotSyn,
    /// As [`CreateError::TableFull`].
    TableFull,
    /// As [`CreateError::PodFlowLimit`], for the pod the session goes to.
    PodFlowLimit,
}

/// Why [`super::FlowTable::add_forward`] refused a forward.
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

/// Flows that ended without the caller seeing it happen (module docs,
/// "Counters"): everything else the table does comes back as a result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Flows removed because they timed out (by a lookup, a sweep, or to
    /// make room in a full table).
    pub expired: u64,
    /// Unreplied flows evicted to make room in a full table, or for a new
    /// flow of a pod at one of its limits (its own unreplied flows).
    pub early_dropped: u64,
}
