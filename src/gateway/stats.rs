//! Counters: what happened to every frame, by thread, without locks.
//!
//! Each thread owns one [`Counters`] block (cache-line aligned so threads do
//! not share lines) and bumps it with relaxed atomics; readers sum the blocks.
//! Per-packet events are counted, never logged.
use std::sync::atomic::{AtomicU64, Ordering};

use crate::wire::Malformed;

macro_rules! counters {
    (
        events { $( $(#[$edoc:meta])* $event:ident = $etext:literal, )* }
        drops { $( $(#[$ddoc:meta])* $drop:ident = $dtext:literal, )* }
    ) => {
        /// Everything the data path counts: events, then drops by reason.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Counter {
            $( $(#[$edoc])* $event, )*
            $( $(#[$ddoc])* $drop, )*
        }

        impl Counter {
            /// Every counter, in declaration order.
            pub const ALL: &'static [Counter] = &[$(Counter::$event,)* $(Counter::$drop,)*];
            /// The counter's stable name, as printed by `tapnat stats`.
            pub fn name(self) -> &'static str {
                match self {
                    $(Counter::$event => $etext,)*
                    $(Counter::$drop => $dtext,)*
                }
            }
            /// Whether this counts packets or frames dropped (the `drops`
            /// section; each name starts with `drop_`).
            pub fn is_drop(self) -> bool {
                match self {
                    $(Counter::$event => false,)*
                    $(Counter::$drop => true,)*
                }
            }
        }
    };
}

counters! {
events {
    /// Frames read from the pod TAP.
    PodRxFrames = "pod_rx_frames",
    /// Frames read from the uplink.
    UplinkRxFrames = "uplink_rx_frames",
    /// Frames written to the pod TAP.
    PodTxFrames = "pod_tx_frames",
    /// Frames written to the uplink.
    UplinkTxFrames = "uplink_tx_frames",
    /// Reads that failed with something other than "would block".
    TapReadFails = "tap_read_fails",
    /// Writes that failed.
    TapWriteFails = "tap_write_fails",
    /// Packets masqueraded pod -> uplink.
    In2outPackets = "in2out_packets",
    /// Replies reverse-translated uplink -> pod.
    Out2inPackets = "out2in_packets",
    /// IP bytes of the packets masqueraded pod -> uplink (a TSO super-frame
    /// counts its whole length).
    In2outBytes = "in2out_bytes",
    /// IP bytes of the replies reverse-translated uplink -> pod.
    Out2inBytes = "out2in_bytes",
    /// Segmentation-offload super-frames translated (TCP TSO, UDP USO; each
    /// up to 64 KiB).
    GsoFrames = "gso_frames",
    /// Datagrams cut out of UDP super-frames whose datagrams did not fit the
    /// egress MTU (each then fragmented).
    GsoSegmented = "gso_segmented",
    /// ICMP errors about a flow, translated (both directions).
    IcmpErrorsTranslated = "icmp_errors_translated",
    /// Non-first fragments rewritten like their datagram's first fragment.
    FragmentsTranslated = "fragments_translated",
    /// Non-first fragments held until their first fragment arrived.
    FragmentsHeld = "fragments_held",
    /// Fragments the gateway made from packets too big for the egress MTU.
    FragmentsCreated = "fragments_created",
    /// Pod packets to an outside address, turned around (hairpinning).
    Hairpinned = "hairpinned",
    /// Packets routed untranslated (excluded destinations and their replies).
    RoutedPackets = "routed_packets",
    /// Packets read by one worker and handed to the worker that owns them.
    HandedOff = "handed_off",
    /// Flows created.
    FlowsCreated = "flows_created",
    /// Flows removed because they timed out (by a lookup, a sweep, or to
    /// make room in a full table).
    FlowsExpired = "flows_expired",
    /// Unreplied flows evicted to make room in a full table (early drop).
    FlowsEvicted = "flows_evicted",
    /// Flows removed by an operator: `tapnat flush`, or with a forward
    /// removed at run time.
    FlowsFlushed = "flows_flushed",
    /// Flows removed because the outside address they used went away (a
    /// new DHCP lease, or the lease lost), as MASQUERADE flushes them.
    FlowsAddressChange = "flows_address_change",
    /// Changes of the outside address by DHCP (a first lease, a new
    /// address, a lost lease).
    UplinkAddressChanges = "uplink_address_changes",
    /// ARP and ICMP echo frames handed to the gateway's own stack.
    LocalStackFrames = "local_stack_frames",
    /// ICMP errors the gateway originated (Time Exceeded).
    IcmpErrorsSent = "icmp_errors_sent",
    /// ARP requests the gateway sent to resolve a next hop or a pod.
    ArpRequestsSent = "arp_requests_sent",
    /// Neighbours (IP -> MAC) learned or changed, always by ARP.
    NeighboursLearned = "neighbours_learned",
    /// A different MAC for a neighbour refused within the lock time (1 s).
    NeighbourUpdatesLocked = "neighbour_updates_locked",
    /// Neighbour entries removed: resolution failed, or stale and unused.
    NeighboursRemoved = "neighbours_removed",
    /// Broadcast ARP requests held back by their rate limit.
    ArpRequestsRateLimited = "arp_requests_rate_limited",
    /// Host Unreachable errors sent because a next hop did not resolve.
    HostUnreachableSent = "host_unreachable_sent",
    /// An ICMP error the gateway would have sent, held back by the rate limit.
    IcmpErrorsRateLimited = "icmp_errors_rate_limited",
    /// Flow and mapping events a slow `tapnat events` or mapping log lost.
    EventsLost = "events_lost",
    /// Frames copied to a running `tapnat capture`.
    CaptureFrames = "capture_frames",
    /// Frames a slow `tapnat capture` lost (its queue was full).
    CaptureLost = "capture_lost",
}
drops {
    /// Outbound while `uplink.address = "dhcp"` has no lease yet.
    DropNoLease = "drop_no_lease",
    /// Shorter than an Ethernet header.
    DropRunt = "drop_runt",
    /// Truncated or non-IPv4 ARP.
    DropBadArp = "drop_bad_arp",
    /// Bad IPv4 version, IHL or lengths.
    DropBadIpHeader = "drop_bad_ip_header",
    /// IPv4 header checksum wrong.
    DropBadIpChecksum = "drop_bad_ip_checksum",
    /// Truncated or inconsistent TCP/UDP/ICMP header.
    DropBadL4Header = "drop_bad_l4_header",
    /// An ethertype other than IPv4 and ARP (IPv6, VLAN, ...).
    DropOtherEthertype = "drop_other_ethertype",
    /// Unicast to another MAC, or to an address that is not ours on the uplink.
    DropNotForUs = "drop_not_for_us",
    /// ARP that the gateway neither answers nor learns from.
    DropArpIgnored = "drop_arp_ignored",
    /// From the pod side with a source outside every masquerade source.
    DropSpoofedSource = "drop_spoofed_source",
    /// From a masquerade source to an excluded or unroutable destination.
    DropNoRoute = "drop_no_route",
    /// A transport the NAT does not translate (not TCP, UDP or ICMP echo).
    DropUnsupportedProtocol = "drop_unsupported_protocol",
    /// A fragment while fragment handling is off (`nat.fragments_max = 0`).
    DropFragment = "drop_fragment",
    /// A held fragment whose first fragment never came (timeout or eviction).
    DropFragmentTimeout = "drop_fragment_timeout",
    /// A fragment refused because the fragment cache was full.
    DropFragmentCacheFull = "drop_fragment_cache_full",
    /// TCP, UDP or other traffic to the gateway's own address with no flow
    /// (RFC 5382 REQ-4: no RST, no port unreachable).
    DropToGateway = "drop_to_gateway",
    /// Inbound to a mapping from a remote the filtering does not let in.
    DropFiltered = "drop_filtered",
    /// Inbound with no flow (unsolicited).
    DropNoFlow = "drop_no_flow",
    /// Outbound TCP without a flow that is not a SYN.
    DropTcpNotSyn = "drop_tcp_not_syn",
    /// A TCP RST outside the receiver's window (the flow is unchanged).
    DropInvalidRst = "drop_invalid_rst",
    /// Outbound ICMP echo reply or other ICMP with no flow.
    DropIcmpNoFlow = "drop_icmp_no_flow",
    /// An ICMP error whose quoted packet matches no flow.
    DropIcmpErrorNoFlow = "drop_icmp_error_no_flow",
    /// An ICMP error with a bad checksum or an unusable quoted packet.
    DropBadIcmpError = "drop_bad_icmp_error",
    /// TTL ran out here.
    DropTtlExceeded = "drop_ttl_exceeded",
    /// Larger than the egress MTU.
    DropTooBig = "drop_too_big",
    /// The flow table was full (after early drop).
    DropTableFull = "drop_table_full",
    /// No outside port left in this worker's slice.
    DropPortsExhausted = "drop_ports_exhausted",
    /// A new flow of a pod at `nat.max_flows_per_pod` with no unreplied
    /// flow of its own to give up.
    DropPodFlowLimit = "drop_pod_flow_limit",
    /// A new mapping of a pod at `nat.ports_per_pod` with no unreplied flow
    /// of its own whose port could go.
    DropPodPortLimit = "drop_pod_port_limit",
    /// The next hop did not answer ARP in time.
    DropNeighbourUnresolved = "drop_neighbour_unresolved",
    /// The owning worker's hand-off queue was full.
    DropHandoffFull = "drop_handoff_full",
    /// Too many packets already waiting for one next hop, or for all.
    DropNeighbourQueueFull = "drop_neighbour_queue_full",
    /// The control thread's queue was full (a flood): the frame or news
    /// for it was dropped by the worker.
    DropControlQueueFull = "drop_control_queue_full",
    /// Too many frames of that kind (ARP, echo) already waiting for the
    /// gateway's own stack on that side.
    DropLocalQueueFull = "drop_local_queue_full",
    /// An echo request or ARP request to the gateway beyond the reply rate
    /// limit of its side.
    DropLocalRateLimited = "drop_local_rate_limited",
    /// A fragment refused because its source already holds its share of
    /// the fragment cache.
    DropFragmentSourceShare = "drop_fragment_source_share",
    /// No room for another unresolved next hop.
    DropNeighbourTableFull = "drop_neighbour_table_full",
}
}

impl Counter {
    /// The counter for a malformed frame.
    pub fn malformed(m: Malformed) -> Counter {
        match m {
            Malformed::Runt => Counter::DropRunt,
            Malformed::BadArp => Counter::DropBadArp,
            Malformed::BadIpHeader => Counter::DropBadIpHeader,
            Malformed::BadIpChecksum => Counter::DropBadIpChecksum,
            Malformed::BadL4Header => Counter::DropBadL4Header,
        }
    }
}

/// Rules with their own packet and byte counters: SNAT rules then
/// masquerade rules, by position; a rule past these is not counted alone.
pub const RULES_COUNTED: usize = 32;

/// One thread's counters.
#[repr(align(128))]
pub struct Counters {
    values: [AtomicU64; Counter::ALL.len()],
    /// Per rule (see [`RULES_COUNTED`]): packets, then bytes, both ways.
    rules: [[AtomicU64; 2]; RULES_COUNTED],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
            rules: std::array::from_fn(|_| [AtomicU64::new(0), AtomicU64::new(0)]),
        }
    }
}

impl Counters {
    #[inline]
    pub fn add(&self, c: Counter, n: u64) {
        self.values[c as usize].fetch_add(n, Ordering::Relaxed);
    }
    #[inline]
    pub fn inc(&self, c: Counter) {
        self.add(c, 1);
    }
    pub fn get(&self, c: Counter) -> u64 {
        self.values[c as usize].load(Ordering::Relaxed)
    }
    /// One packet of `bytes` translated under rule `rule` (SNAT rules
    /// first, then masquerade rules); a rule past [`RULES_COUNTED`] is
    /// not counted.
    #[inline]
    pub fn rule(&self, rule: usize, bytes: u64) {
        if let Some([p, b]) = self.rules.get(rule) {
            p.fetch_add(1, Ordering::Relaxed);
            b.fetch_add(bytes, Ordering::Relaxed);
        }
    }
    /// Rule `rule`'s (packets, bytes).
    pub fn rule_counts(&self, rule: usize) -> (u64, u64) {
        self.rules.get(rule).map_or((0, 0), |[p, b]| {
            (p.load(Ordering::Relaxed), b.load(Ordering::Relaxed))
        })
    }
}

/// A point-in-time sum of every thread's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    values: Vec<u64>,
    /// (packets, bytes) per rule position (see [`RULES_COUNTED`]).
    rules: Vec<(u64, u64)>,
}

impl Snapshot {
    pub fn sum<'a>(blocks: impl IntoIterator<Item = &'a Counters>) -> Snapshot {
        let mut values = vec![0; Counter::ALL.len()];
        let mut rules = vec![(0, 0); RULES_COUNTED];
        for b in blocks {
            for (v, c) in values.iter_mut().zip(Counter::ALL) {
                *v += b.get(*c);
            }
            for (i, r) in rules.iter_mut().enumerate() {
                let (p, n) = b.rule_counts(i);
                r.0 += p;
                r.1 += n;
            }
        }
        Snapshot { values, rules }
    }
    /// Rule `rule`'s (packets, bytes) by position: SNAT rules, then
    /// masquerade rules.
    pub fn rule(&self, rule: usize) -> (u64, u64) {
        self.rules.get(rule).copied().unwrap_or((0, 0))
    }
    pub fn get(&self, c: Counter) -> u64 {
        self.values[c as usize]
    }
    /// (name, value) of every non-zero counter.
    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Counter::ALL
            .iter()
            .map(|c| (c.name(), self.get(*c)))
            .filter(|(_, v)| *v != 0)
    }
    /// Sum of every drop counter.
    pub fn drops(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_drop())
            .map(|c| self.get(*c))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_snapshots_sum_threads() {
        let mut names: Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Counter::ALL.len());
        for c in Counter::ALL {
            assert_eq!(c.is_drop(), c.name().starts_with("drop_"), "{}", c.name());
        }
        let (a, b) = (Counters::default(), Counters::default());
        a.inc(Counter::DropRunt);
        b.add(Counter::DropRunt, 2);
        b.inc(Counter::In2outPackets);
        a.rule(1, 100);
        b.rule(1, 50);
        b.rule(RULES_COUNTED, 7);
        let s = Snapshot::sum([&a, &b]);
        assert_eq!(s.rule(1), (2, 150));
        assert_eq!(s.rule(0), (0, 0));
        assert_eq!(s.rule(RULES_COUNTED), (0, 0));
        assert_eq!(s.get(Counter::DropRunt), 3);
        assert_eq!(s.drops(), 3);
        assert_eq!(s.nonzero().count(), 2);
    }
}
