//! Fairness between pods: what each inside address (a pod) holds in this
//! shard, its limits, and which of its own flows go first when it is at a
//! limit.
//!
//! * Flows: every live flow of the table is charged to its inside source
//!   address, those opened from outside (a forward's sessions) included.
//! * Ports: every dynamic mapping (one outside port or echo id) is charged
//!   to its inside address, per protocol, and a released TCP/UDP port stays
//!   charged while it is in quarantine (a pod that churns through ports
//!   cannot park more than its share there). A pod at its share, or finding
//!   no free port, takes back its own oldest quarantined port (RFC 6888
//!   REQ-8 keeps a port from another subscriber while remotes may remember
//!   it; these are the pod's own), so a pod opening and closing connections
//!   fast is bounded, never starved. Static forwards are charged to nobody
//!   (the operator chose them).
//! * Victims: each pod keeps its flows in creation order, lazily cleaned (a
//!   flow removed, or an answered UDP/ICMP flow, is dropped when met). When
//!   the pod is at a limit, or out of ports, or the shard is full and the
//!   pod holds at least an even share of it, the pod's oldest evictable
//!   flow goes first: unreplied, or a TCP connection that is over (RST, or
//!   FIN both ways, kept by RFC 7857 only against late segments). An
//!   answered UDP/ICMP flow or an open TCP connection is never chosen. The queue is compacted (stale and repeated entries dropped)
//!   once it holds more than twice the pod's live flows plus 16, so it
//!   stays within a constant factor of them at O(1) amortized cost.
//!
//! A pod with nothing charged has no entry. This part only counts and
//! chooses; the facade removes.

use super::slab::Slab;
use super::types::{CreateError, Flow, FlowState, InKey, Proto, TcpState};
use super::types_events::EndReason;
use super::FlowTable;
use crate::nat::hash::Keyed;
use hashbrown::hash_map::Entry;
use hashbrown::HashMap;
use std::collections::VecDeque;
use std::net::Ipv4Addr;

/// Queue entries examined for a victim that frees a port (its mapping's
/// only flow), past the dead ones dropped on the way.
pub(super) const PORT_VICTIM_SCAN: usize = 64;

/// Emptied queues of forgotten pods kept for the next new pod (a pod that
/// comes and goes with its one flow costs no allocation), at most this
/// many, each of at most [`SPARE_CAP`] entries.
const SPARE_MAX: usize = 16;
const SPARE_CAP: usize = 64;

#[derive(Debug, Default)]
struct PodUse {
    flows: u32,
    /// Per protocol ([`Proto::index`]): mappings plus quarantined ports.
    ports: [u32; 3],
    /// Per protocol: of `ports`, those in quarantine.
    cooling: [u32; 3],
    /// Inside keys of the pod's flows in creation order (some stale).
    order: VecDeque<InKey>,
}

impl PodUse {
    fn is_idle(&self) -> bool {
        self.flows == 0 && self.ports == [0; 3]
    }
}

/// Per-pod use and limits of one shard.
pub(super) struct Pods {
    /// Most flows one pod may hold here; 0 = no limit.
    max_flows: u32,
    /// Most outside ports (per protocol) one pod may hold here; 0 = none.
    max_ports: u32,
    map: HashMap<Ipv4Addr, PodUse, Keyed>,
    /// Pods holding at least one flow.
    active: usize,
    /// Emptied queues to reuse ([`SPARE_MAX`]).
    spare: Vec<VecDeque<InKey>>,
}

impl Pods {
    pub(super) fn new(max_flows: u32, max_ports: u32) -> Self {
        Pods {
            max_flows,
            max_ports,
            map: HashMap::with_hasher(Keyed::new()),
            active: 0,
            spare: Vec::new(),
        }
    }

    /// New limits (a reload); what pods hold already stays.
    pub(super) fn set_limits(&mut self, max_flows: u32, max_ports: u32) {
        self.max_flows = max_flows;
        self.max_ports = max_ports;
    }

    /// Whether `pod` holds its share of flows.
    #[inline]
    pub(super) fn at_flow_limit(&self, pod: Ipv4Addr) -> bool {
        self.max_flows != 0
            && self
                .map
                .get(&pod)
                .is_some_and(|u| u.flows >= self.max_flows)
    }

    /// Whether `pod` holds its share of `proto` ports.
    #[inline]
    pub(super) fn at_port_limit(&self, pod: Ipv4Addr, proto: Proto) -> bool {
        self.max_ports != 0
            && self
                .map
                .get(&pod)
                .is_some_and(|u| u.ports[proto.index()] >= self.max_ports)
    }

    /// A new flow of `key.src`; `slab` (which holds it already) lets the
    /// queue be compacted.
    pub(super) fn flow_added(&mut self, key: InKey, slab: &Slab) {
        let spare = &mut self.spare;
        let u = self.map.entry(key.src).or_insert_with(|| PodUse {
            order: spare.pop().unwrap_or_default(),
            ..PodUse::default()
        });
        if u.flows == 0 {
            self.active += 1;
        }
        u.flows += 1;
        u.order.push_back(key);
        if u.order.len() > 2 * u.flows as usize + 16 {
            // Keep each live unreplied flow once (a key that died and came
            // back has older entries too), oldest first.
            let mut seen = hashbrown::HashSet::with_capacity(u.flows as usize);
            u.order
                .retain(|k| slab.find(k).is_some_and(|i| kept(slab.flow(i))) && seen.insert(*k));
        }
    }

    /// A flow of `pod` removed.
    pub(super) fn flow_removed(&mut self, pod: Ipv4Addr) {
        if let Entry::Occupied(mut e) = self.map.entry(pod) {
            let u = e.get_mut();
            if u.flows == 1 {
                self.active -= 1;
            }
            u.flows = u.flows.saturating_sub(1);
            if u.flows == 0 {
                u.order.clear();
            }
            forget_if_idle(e, &mut self.spare);
        }
    }

    /// Whether `pod` holds at least an even share of a shard of
    /// `max_flows` (that bound divided by the pods holding flows).
    #[inline]
    pub(super) fn over_share(&self, pod: Ipv4Addr, max_flows: usize) -> bool {
        let flows = self.map.get(&pod).map_or(0, |u| u.flows as usize);
        flows > 0 && flows.saturating_mul(self.active.max(1)) >= max_flows
    }

    /// `pod` took a `proto` port for a new mapping.
    pub(super) fn port_taken(&mut self, pod: Ipv4Addr, proto: Proto) {
        let spare = &mut self.spare;
        let u = self.map.entry(pod).or_insert_with(|| PodUse {
            order: spare.pop().unwrap_or_default(),
            ..PodUse::default()
        });
        u.ports[proto.index()] += 1;
    }

    /// A `proto` port charged to `pod` is free (released with no
    /// quarantine).
    pub(super) fn port_freed(&mut self, pod: Ipv4Addr, proto: Proto) {
        if let Entry::Occupied(mut e) = self.map.entry(pod) {
            let p = &mut e.get_mut().ports[proto.index()];
            *p = p.saturating_sub(1);
            forget_if_idle(e, &mut self.spare);
        }
    }

    /// A `proto` port of `pod` went into quarantine (still charged).
    pub(super) fn port_cooling(&mut self, pod: Ipv4Addr, proto: Proto) {
        if let Some(u) = self.map.get_mut(&pod) {
            u.cooling[proto.index()] += 1;
        }
    }

    /// The quarantine of a `proto` port of `pod` ended (or was cut short):
    /// the port is free.
    pub(super) fn cooling_ended(&mut self, pod: Ipv4Addr, proto: Proto) {
        if let Entry::Occupied(mut e) = self.map.entry(pod) {
            let u = e.get_mut();
            let c = &mut u.cooling[proto.index()];
            *c = c.saturating_sub(1);
            let p = &mut u.ports[proto.index()];
            *p = p.saturating_sub(1);
            forget_if_idle(e, &mut self.spare);
        }
    }

    /// Whether `pod` has a `proto` port in quarantine.
    #[inline]
    pub(super) fn has_cooling(&self, pod: Ipv4Addr, proto: Proto) -> bool {
        self.map
            .get(&pod)
            .is_some_and(|u| u.cooling[proto.index()] > 0)
    }

    /// `pod` took one of its own quarantined `proto` ports for a new
    /// mapping (still charged, no longer in quarantine).
    pub(super) fn cooling_reclaimed(&mut self, pod: Ipv4Addr, proto: Proto) {
        if let Some(u) = self.map.get_mut(&pod) {
            let c = &mut u.cooling[proto.index()];
            *c = c.saturating_sub(1);
        }
    }

    /// The slot of `pod`'s oldest evictable flow (unreplied, or a TCP
    /// connection that is over: RST seen, or FIN both ways), or with
    /// `frees_port` the oldest evictable `proto` flow that is its mapping's
    /// only flow (`only_flow` says), so that removing it gives a port back.
    /// Looks at most at [`PORT_VICTIM_SCAN`] live entries from the front of
    /// the queue: dead ones are dropped on the way, live ones that do not
    /// fit go to the back (an open TCP connection may close later), so the
    /// cost per call is bounded and repeated calls cover the whole queue.
    /// The victim's entry is taken out.
    pub(super) fn victim(
        &mut self,
        pod: Ipv4Addr,
        slab: &Slab,
        frees_port: Option<Proto>,
        only_flow: impl Fn(&InKey) -> bool,
    ) -> Option<usize> {
        let u = self.map.get_mut(&pod)?;
        let mut seen = 0;
        while seen < PORT_VICTIM_SCAN {
            let k = u.order.pop_front()?;
            let Some(i) = slab.find(&k) else {
                continue; // removed since: each dead entry is dropped once
            };
            let f = slab.flow(i);
            let fits = match frees_port {
                None => true,
                Some(proto) => k.proto == proto && only_flow(&k),
            };
            if evictable(f) && fits {
                return Some(i);
            }
            if kept(f) {
                u.order.push_back(k);
            }
            seen += 1;
        }
        None
    }

    /// Forgets every flow (the table was cleared); ports stay charged as
    /// the facade releases them.
    pub(super) fn clear_flows(&mut self) {
        for u in self.map.values_mut() {
            u.flows = 0;
            u.order.clear();
        }
        self.active = 0;
        self.map.retain(|_, u| !u.is_idle());
    }

    /// `(flows, ports per protocol)` charged to `pod`.
    #[cfg(test)]
    pub(super) fn usage(&self, pod: Ipv4Addr) -> (u32, [u32; 3]) {
        self.map
            .get(&pod)
            .map_or((0, [0; 3]), |u| (u.flows, u.ports))
    }

    /// Entries in `pod`'s victim queue.
    #[cfg(test)]
    pub(super) fn queue_len(&self, pod: Ipv4Addr) -> usize {
        self.map.get(&pod).map_or(0, |u| u.order.len())
    }

    /// Every pod with something charged, and its flows.
    #[cfg(test)]
    pub(super) fn flows_by_pod(&self) -> impl Iterator<Item = (Ipv4Addr, u32)> + '_ {
        self.map.iter().map(|(a, u)| (*a, u.flows))
    }

    /// Every pod's ports charged per protocol.
    #[cfg(test)]
    pub(super) fn ports_by_pod(&self) -> impl Iterator<Item = (Ipv4Addr, [u32; 3])> + '_ {
        self.map.iter().map(|(a, u)| (*a, u.ports))
    }

    /// Every pod's quarantined ports per protocol.
    #[cfg(test)]
    pub(super) fn cooling_by_pod(&self) -> impl Iterator<Item = (Ipv4Addr, [u32; 3])> + '_ {
        self.map.iter().map(|(a, u)| (*a, u.cooling))
    }
}

/// Forgets a pod with nothing charged, keeping its emptied queue for the
/// next new pod.
#[inline]
fn forget_if_idle(
    e: hashbrown::hash_map::OccupiedEntry<'_, Ipv4Addr, PodUse, Keyed>,
    spare: &mut Vec<VecDeque<InKey>>,
) {
    if e.get().is_idle() {
        let mut order = e.remove().order;
        if spare.len() < SPARE_MAX && order.capacity() <= SPARE_CAP {
            order.clear();
            spare.push(order);
        }
    }
}

/// Whether a pod's own new flow may push `f` out: no answer yet, or a
/// TCP connection that is over (RST, or FIN both ways; RFC 7857 keeps
/// those only for the transitory timeout, against late segments), or one
/// whose handshake never completed (a SYN flood at a forward to this pod,
/// answered by the pod: not assured, as early drop in the table treats it
/// too). An answered UDP or ICMP flow and an open TCP connection never go.
#[inline]
fn evictable(f: &Flow) -> bool {
    !f.replied
        || matches!(
            f.state,
            FlowState::Tcp(
                TcpState::Closed | TcpState::Closing | TcpState::SynSent | TcpState::SynReceived
            )
        )
}

/// Whether `f` stays in its pod's queue: evictable now, or a TCP
/// connection that may close later.
#[inline]
fn kept(f: &Flow) -> bool {
    evictable(f) || matches!(f.state, FlowState::Tcp(_))
}

impl FlowTable {
    /// Room for one more flow of `pod`: at its flow limit, its own oldest
    /// unreplied flow goes, or the flow is refused. In a full table, a pod
    /// holding at least an even share of it (`max_flows` / pods with flows)
    /// gives up its own oldest unreplied flow first, then early drop (an
    /// expired flow, else the least recently seen unreplied one in reach,
    /// most likely of the pod holding most) is tried; a pod below its share
    /// tries early drop first and its own flows last. Replied flows are
    /// never evicted for a new one.
    pub(super) fn admit(&mut self, pod: Ipv4Addr, now_ms: u64) -> Result<(), CreateError> {
        if self.pods.at_flow_limit(pod) && !self.evict_own(pod) {
            return Err(CreateError::PodFlowLimit);
        }
        if self.slab.len() >= self.cfg.max_flows {
            let own_first = self.pods.over_share(pod, self.cfg.max_flows);
            let room = (own_first && self.evict_own(pod))
                || self.make_room(now_ms)
                || (!own_first && self.evict_own(pod));
            if !room {
                return Err(CreateError::TableFull);
            }
        }
        Ok(())
    }

    /// Evicts `pod`'s oldest unreplied flow, if it has one.
    fn evict_own(&mut self, pod: Ipv4Addr) -> bool {
        let Some(i) = self.pods.victim(pod, &self.slab, None, |_| true) else {
            return false;
        };
        self.remove_slot_for(i, EndReason::Evicted);
        self.stats.early_dropped += 1;
        true
    }

    /// Evicts `pod`'s oldest unreplied `proto` flow that is the only flow
    /// of its mapping, and frees that port now (no quarantine: nobody
    /// answered on it), if it has one.
    fn evict_for_port(&mut self, pod: Ipv4Addr, proto: Proto) -> bool {
        let mappings = &self.mappings;
        let only_flow = |k: &InKey| {
            mappings
                .get(&(k.proto, k.src, k.sport))
                .is_some_and(|m| m.refs == 1 && !m.forward)
        };
        let Some(i) = self.pods.victim(pod, &self.slab, Some(proto), only_flow) else {
            return false;
        };
        let port = self.slab.flow(i).ext_port;
        self.remove_slot_for(i, EndReason::Evicted);
        if self.ports.recall(proto, port) {
            self.pods.cooling_ended(pod, proto);
        }
        self.stats.early_dropped += 1;
        true
    }

    /// The mapping of `key`'s inside endpoint, made with a new port if it
    /// has none: a free port of the pool while the pod is below its port
    /// limit; else (at the limit, or no port free) one of the pod's own
    /// quarantined ports, else the port of one of its own unreplied flows
    /// (the only flow of its mapping), else the flow is refused.
    pub(super) fn acquire_mapping(
        &mut self,
        key: &InKey,
        ext_addr: Ipv4Addr,
    ) -> Result<(Ipv4Addr, u16), CreateError> {
        let mk = (key.proto, key.src, key.sport);
        let (pod, proto) = (key.src, key.proto);
        if self.mappings.contains(&mk) {
            let got = self.mappings.acquire(mk, ext_addr, || None);
            return got.ok_or(CreateError::PortsExhausted);
        }
        let at_limit = self.pods.at_port_limit(pod, proto);
        if !at_limit {
            let ports = &mut self.ports;
            if let Some(got) = self.mappings.acquire(mk, ext_addr, || ports.alloc(key)) {
                self.pods.port_taken(pod, proto);
                return Ok(got);
            }
        }
        if self.pods.has_cooling(pod, proto) {
            let ports = &mut self.ports;
            let low = key.sport < 1024 && proto != Proto::Icmp;
            let reclaim = || ports.reclaim(pod, proto, low);
            if let Some(got) = self.mappings.acquire(mk, ext_addr, reclaim) {
                self.pods.cooling_reclaimed(pod, proto);
                return Ok(got);
            }
        }
        if self.evict_for_port(pod, proto) {
            let ports = &mut self.ports;
            if let Some(got) = self.mappings.acquire(mk, ext_addr, || ports.alloc(key)) {
                self.pods.port_taken(pod, proto);
                return Ok(got);
            }
        }
        Err(if at_limit {
            CreateError::PodPortLimit
        } else {
            CreateError::PortsExhausted
        })
    }
}
