//! The translation core: one worker's decisions about frames, with no I/O.
//!
//! [`Core::frame`] takes a received frame and pushes what to do with it onto
//! an [`Actions`] queue the caller owns and reuses (boringtun's `noise`
//! returns a `TunnResult`; a VPP node picks a `next` and a drop reason). The
//! core never reads a clock (time is the `now` argument, in milliseconds),
//! never touches a device, a channel or a thread; it owns one flow-table
//! shard, the fragment cache of the datagrams this worker tracks, the routed
//! sessions, a copy of the neighbour table and this worker's share of the
//! ICMP error budget. The worker carries the actions out.
//!
//! Contract:
//! - Every buffer given to the core comes back exactly once: in an action
//!   (to write, hand over, send to the control thread, count as a drop), held
//!   in the fragment cache (and later released as an action), or returned to
//!   the pool.
//! - A frame usually yields one action; a fragmented packet, released
//!   fragments or a first fragment's news yield several, in order.
//! - Drops carry a [`Counter`] (a `Copy` reason); the caller counts it. Events
//!   that are not the frame's fate (flows created, packets translated) are
//!   counted by the core in its [`Counters`] block.
//! - The steady state allocates nothing per packet: the queue, the scratch
//!   vectors and the buffers are reused.
//!
//! Router behaviour on the way: TTL decrement and Time Exceeded (RFC 1812
//! §5.3.1), Fragmentation Needed for DF packets too big for the egress
//! (RFC 1191, RFC 4787 REQ-13) and fragmenting the others (REQ-13a), a TSO
//! super-frame's segment size cut to the egress MTU, and a global ICMP error
//! rate limit (RFC 1812 §4.3.2.8) with Fragmentation Needed exempt.
mod errors;
mod frags;
mod translate;

use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::nat::hash::Keyed;
use hashbrown::HashMap;
use smoltcp::wire::EthernetAddress;

use super::buf::{Buf, Pool};
use super::classify::{classify, Disposition, Seen};
use super::neighbour::{Event, News};
use super::stats::{Counter, Counters};
use crate::nat::frag::{FragCache, FragKey, Release};
use crate::nat::{Flow, FlowTable, InKey, OutKey, Proto, TcpFlags, TcpSeg};
use crate::policy::{Addressing, Egress, Side};
use crate::wire::icmp::IcmpRateLimit;
use crate::wire::vnet::{VnetHdr, GSO_ECN, GSO_TCPV4, GSO_UDP_L4};
use crate::wire::{self, End, IcmpErrorKind, Ipv4View, L4Csum, L4};
use errors::Refusal;
use translate::Transport;

/// At most this many routed sessions per worker.
const ROUTED_MAX: usize = 65536;
/// Routed sessions are swept for idleness at most this often.
const ROUTED_SWEEP_MS: u64 = 1000;
/// A routed session never answered is forgotten after this much idleness
/// (like conntrack's unreplied UDP and ICMP, 30 s), whatever its transport's
/// timeout: a pod cannot hold the table with one-packet sessions.
const ROUTED_UNANSWERED_MS: u64 = 30_000;

/// A routed session: when it last saw a packet, and whether a reply came.
#[derive(Debug, Clone, Copy)]
struct Routed {
    seen_ms: u64,
    answered: bool,
}

/// How the non-first fragments of a datagram are rewritten: the address at
/// one end (they carry no ports; a routed datagram keeps its own), and where
/// they go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragRewrite {
    pub end: End,
    pub addr: Ipv4Addr,
    pub egress: Side,
    pub next_hop: Ipv4Addr,
    /// The first fragment was hairpinned (a pod's datagram to an outside
    /// address): after the source rewrite the fragment turns around the
    /// same way, as if it had arrived on the uplink, and follows the
    /// rewrite the first fragment recorded there (destination to the
    /// target, egress pod side, the target as next hop). `egress` and
    /// `next_hop` are unused then.
    pub hairpin: bool,
}

/// A transit packet handed from the worker that read it to its owner, with
/// what classification found out about it.
pub struct Packet {
    pub buf: Buf,
    pub view: Ipv4View,
    pub from: Side,
    pub egress: Egress,
}

/// What to do with a frame (or a piece of one): the core's verdict.
pub enum Action {
    /// Write `buf` to our queue of `side`; its MACs are set.
    Send { side: Side, buf: Buf },
    /// Worker `worker` owns this packet: hand it over.
    HandOff { worker: usize, packet: Packet },
    /// For the gateway's own stack (ARP for it, echo to it): the control thread.
    Local { side: Side, buf: Buf },
    /// Translated, but the MAC of `next_hop` is unknown: the control thread
    /// resolves it and sends the frame to `side`.
    Resolve {
        side: Side,
        next_hop: Ipv4Addr,
        buf: Buf,
    },
    /// Count `why`, send an ICMP error of `kind` about `buf` (whose headers
    /// `view` describes, untouched) back to `to` from the gateway's address
    /// there, and free `buf`. The rate limit was already applied.
    Reject {
        to: Side,
        kind: IcmpErrorKind,
        why: Counter,
        view: Ipv4View,
        buf: Buf,
    },
    /// Count `why` and free `buf`.
    Drop { why: Counter, buf: Buf },
    /// Tell the control thread's neighbour table (an entry told STALE was
    /// used or confirmed, ARP overheard on the link).
    Neighbour(Event),
    /// Worker `worker` tracks the fragments of datagram `key`: tell it how
    /// the first fragment was rewritten.
    FragNews {
        worker: usize,
        key: FragKey,
        rewrite: FragRewrite,
    },
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Send { side, buf } => write!(f, "Send({side:?}, {} B)", buf.frame().len()),
            Action::HandOff { worker, .. } => write!(f, "HandOff({worker})"),
            Action::Local { side, .. } => write!(f, "Local({side:?})"),
            Action::Resolve { side, next_hop, .. } => write!(f, "Resolve({side:?}, {next_hop})"),
            Action::Reject { to, kind, why, .. } => write!(f, "Reject({to:?}, {kind:?}, {why:?})"),
            Action::Drop { why, .. } => write!(f, "Drop({why:?})"),
            Action::Neighbour(e) => write!(f, "Neighbour({e:?})"),
            Action::FragNews { worker, key, .. } => write!(f, "FragNews({worker}, {key:?})"),
        }
    }
}

/// The queue of actions a call pushes onto; owned by the caller and reused.
pub type Actions = Vec<Action>;

/// What the router checks decided about a packet to forward.
#[derive(Debug, Clone, Copy)]
struct Fit {
    /// The form of the transport checksum (offloaded or complete).
    csum: L4Csum,
    /// Larger than the egress MTU without DF: fragment it.
    split: bool,
    /// A UDP super-frame whose datagrams do not fit the egress MTU (without
    /// DF): cut it into its datagrams, then fragment each.
    segment: bool,
    mtu: usize,
}

/// Everything one worker's core is made of.
pub struct CoreParts {
    /// This worker's index and the number of workers.
    pub worker: usize,
    pub workers: usize,
    pub addressing: Arc<Addressing>,
    /// The flow shard: outside ports `p % workers == worker`.
    pub table: FlowTable,
    /// The fragment cache; None when fragment handling is off.
    pub frags: Option<FragCache<FragRewrite, Buf>>,
    /// This worker's share of the ICMP error budget; None for no limit.
    pub icmp_limit: Option<IcmpRateLimit>,
    /// Where buffers for fragments come from and go back to.
    pub pool: Pool,
    pub counters: Arc<Counters>,
}

/// One worker's translation state. See the module docs for the contract.
pub struct Core {
    k: usize,
    n: usize,
    a: Arc<Addressing>,
    table: FlowTable,
    frags: Option<FragCache<FragRewrite, Buf>>,
    icmp_limit: Option<IcmpRateLimit>,
    pool: Pool,
    c: Arc<Counters>,
    /// Next-hop MACs, as the control thread announces them (its table is
    /// the authority; this is a copy).
    neighbours: HashMap<Ipv4Addr, Known, Keyed>,
    /// The uplink gateway's entry, the next hop of nearly every outbound
    /// packet, kept aside (not in `neighbours`) so those skip the map.
    gateway: Option<Known>,
    /// Entries whose confirmation is still to be reported (stale ones):
    /// while zero, received frames cost no neighbour lookup.
    watching: usize,
    /// Routed (untranslated, excluded-destination) sessions, by their pod-side
    /// key, with the time last seen: only replies to these come back in.
    /// Keyed from OS randomness: pods and remotes choose these keys.
    routed: HashMap<InKey, Routed, Keyed>,
    routed_swept_ms: u64,
    /// Scratch keys for [`Core::warm`].
    warm_in: Vec<InKey>,
    warm_out: Vec<OutKey>,
    /// Buffers the fragment cache handed back, processed after each call.
    released: Vec<(Buf, Release)>,
    /// Fragments of one packet being cut, before they are sent.
    pieces: Vec<Buf>,
    /// The pod address whose rule was looked up last, and the rule's
    /// position (for the per-rule counters): a burst from one pod skips
    /// the rule scan. Cleared when the rules change.
    rule_memo: Option<(Ipv4Addr, Option<usize>)>,
}

/// A worker's copy of one neighbour entry.
#[derive(Debug, Clone, Copy)]
struct Known {
    mac: EthernetAddress,
    /// Told STALE: report the first frame sent with it ...
    report_use: bool,
    /// ... and the first frame received from it with this MAC.
    report_confirm: bool,
}

fn tcp_flags(flags: u8) -> TcpFlags {
    TcpFlags {
        syn: flags & wire::TCP_SYN != 0,
        ack: flags & wire::TCP_ACK != 0,
        fin: flags & wire::TCP_FIN != 0,
        rst: flags & wire::TCP_RST != 0,
    }
}

/// The TCP header fields the flow table tracks, read once per packet from
/// the header `classify` checked (its length is in the view).
#[inline(always)]
fn tcp_seg(frame: &[u8], v: &Ipv4View) -> TcpSeg {
    let L4::Tcp { flags, hlen, .. } = v.l4 else {
        return TcpSeg::NONE;
    };
    let l4 = &frame[v.l4_offset()..];
    let be32 = |at: usize| u32::from_be_bytes([l4[at], l4[at + 1], l4[at + 2], l4[at + 3]]);
    TcpSeg {
        flags: tcp_flags(flags),
        seq: be32(4),
        ack: be32(8),
        window: u16::from_be_bytes([l4[14], l4[15]]),
        payload_len: v.total_len.saturating_sub(v.ihl + usize::from(hlen)) as u32,
    }
}

impl Core {
    pub fn new(p: CoreParts) -> Core {
        Core {
            k: p.worker,
            n: p.workers,
            a: p.addressing,
            table: p.table,
            frags: p.frags,
            icmp_limit: p.icmp_limit,
            pool: p.pool,
            c: p.counters,
            neighbours: HashMap::with_hasher(Keyed::new()),
            gateway: None,
            watching: 0,
            routed: HashMap::with_hasher(Keyed::new()),
            routed_swept_ms: 0,
            warm_in: Vec::new(),
            warm_out: Vec::new(),
            released: Vec::new(),
            pieces: Vec::new(),
            rule_memo: None,
        }
    }

    /// This worker's flow shard.
    pub fn table(&self) -> &FlowTable {
        &self.table
    }

    /// Warms the cache for a burst of frames read from `side` before they
    /// are decided one by one: the flow of each (as [`crate::wire::peek`]
    /// names it) is prefetched, a stage at a time for the whole burst
    /// ([`FlowTable::warm_in2out`]), so a large table's cache misses
    /// overlap. A hint: decisions are the same with or without it.
    pub fn warm<'f>(&mut self, side: Side, frames: impl IntoIterator<Item = &'f [u8]>) {
        let proto = |p| match p {
            crate::wire::PROTO_TCP => Some(Proto::Tcp),
            crate::wire::PROTO_UDP => Some(Proto::Udp),
            crate::wire::PROTO_ICMP => Some(Proto::Icmp),
            _ => None,
        };
        let peeked = frames
            .into_iter()
            .filter_map(crate::wire::peek)
            .filter_map(|p| Some((proto(p.proto)?, p)));
        match side {
            Side::Pod => {
                self.warm_in.clear();
                self.warm_in.extend(peeked.map(|(proto, p)| InKey {
                    proto,
                    src: p.src,
                    sport: p.sport,
                    dst: p.dst,
                    dport: p.dport,
                }));
                self.table.warm_in2out(&self.warm_in);
            }
            Side::Uplink => {
                self.warm_out.clear();
                self.warm_out.extend(peeked.map(|(proto, p)| {
                    // An echo reply names its mapping by its identifier.
                    let (eport, rport) = match proto {
                        Proto::Icmp => (p.sport, 0),
                        _ => (p.dport, p.sport),
                    };
                    OutKey {
                        proto,
                        remote: p.src,
                        rport,
                        ext: p.dst,
                        eport,
                    }
                }));
                self.table.warm_out2in(&self.warm_out);
            }
        }
    }

    /// This worker's flow shard, for an operator's change (flush, forwards).
    pub fn table_mut(&mut self) -> &mut FlowTable {
        &mut self.table
    }

    /// This worker's fragment cache now, if fragments are handled.
    pub fn frag_stats(&self) -> Option<crate::nat::frag::FragStats> {
        self.frags.as_ref().map(FragCache::stats)
    }

    /// The addressing this core translates with.
    pub fn addressing(&self) -> &Arc<Addressing> {
        &self.a
    }

    /// Rules changed at run time (forwards' steering, a new lease): the
    /// next frame is classified with `a`.
    pub fn set_addressing(&mut self, a: Arc<Addressing>) {
        if a.uplink_gateway != self.a.uplink_gateway {
            // Another next hop (a new DHCP lease): the entry kept aside is
            // the new one's, if known; the old one's goes back to the map.
            if let Some(k) = self.gateway.take() {
                self.neighbours.insert(self.a.uplink_gateway, k);
            }
            self.gateway = self.neighbours.remove(&a.uplink_gateway);
        }
        self.a = a;
        self.rule_memo = None;
    }

    /// This worker's share of the ICMP error budget changed at run time.
    pub fn set_icmp_limit(&mut self, limit: Option<IcmpRateLimit>) {
        self.icmp_limit = limit;
    }

    /// A copy of every flow of this shard.
    pub fn flows(&self) -> Vec<Flow> {
        self.table.iter().copied().collect()
    }

    /// News of a neighbour from the control thread's table.
    pub fn neighbour(&mut self, ip: Ipv4Addr, news: News) {
        let gateway = ip == self.a.uplink_gateway;
        let old = if gateway {
            self.gateway.take()
        } else {
            self.neighbours.remove(&ip)
        };
        if old.is_some_and(|k| k.report_confirm) {
            self.watching -= 1;
        }
        let new = match news {
            News::Reachable(mac) => Known {
                mac,
                report_use: false,
                report_confirm: false,
            },
            News::Stale(mac) => {
                self.watching += 1;
                Known {
                    mac,
                    report_use: true,
                    report_confirm: true,
                }
            }
            News::Gone => return,
        };
        if gateway {
            self.gateway = Some(new);
        } else {
            self.neighbours.insert(ip, new);
        }
    }

    /// The MAC this worker uses for `ip`, if any.
    pub fn neighbour_mac(&self, ip: Ipv4Addr) -> Option<EthernetAddress> {
        if ip == self.a.uplink_gateway {
            return self.gateway.map(|k| k.mac);
        }
        self.neighbours.get(&ip).map(|k| k.mac)
    }

    /// One frame received on `side`.
    pub fn frame(&mut self, side: Side, buf: Buf, now: u64, out: &mut Actions) {
        let (disposition, seen) = classify(&self.a, side, buf.frame());
        match seen {
            Some(Seen::Frame(ip, mac)) if self.watching > 0 => {
                if let Some(k) = self.neighbours.get_mut(&ip) {
                    if k.report_confirm && k.mac == mac {
                        k.report_confirm = false;
                        self.watching -= 1;
                        out.push(Action::Neighbour(Event::Confirmed(ip, mac)));
                    }
                }
            }
            // The same MAC overheard changes nothing in the table.
            Some(Seen::Arp(ip, mac, kind)) if self.neighbour_mac(ip) != Some(mac) => {
                out.push(Action::Neighbour(Event::Arp { ip, mac, kind }));
            }
            _ => {}
        }
        // Only a frame that parsed (Transit) is known to have its MACs.
        let transit = matches!(disposition, Disposition::Transit { .. });
        if side == Side::Uplink && self.watching > 0 && transit {
            // The uplink next hop's frames carry other sources' addresses:
            // its MAC confirms it.
            if let Some(k) = &mut self.gateway {
                let mac = wire::macs(buf.frame()).1;
                if k.report_confirm && k.mac == mac {
                    k.report_confirm = false;
                    self.watching -= 1;
                    let ip = self.a.uplink_gateway;
                    out.push(Action::Neighbour(Event::Confirmed(ip, mac)));
                }
            }
        }
        self.dispatch(side, disposition, buf, now, out);
    }

    /// A packet another worker read and handed to this one.
    pub fn packet(&mut self, p: Packet, now: u64, out: &mut Actions) {
        self.transit(p.from, p.buf, p.view, p.egress, now, out);
    }

    /// Periodic work: expiry of flows (at most `budget` slots), routed
    /// sessions and held fragments.
    pub fn tick(&mut self, now: u64, budget: usize, out: &mut Actions) {
        self.table.expire(now, budget);
        self.sweep_routed(now);
        if let Some(frags) = &mut self.frags {
            let released = &mut self.released;
            frags.expire(now, &mut |b, r| released.push((b, r)));
            self.drain_released(None, now, out);
        }
    }

    fn dispatch(&mut self, side: Side, d: Disposition, buf: Buf, now: u64, out: &mut Actions) {
        match d {
            Disposition::Drop(why) => out.push(Action::Drop { why, buf }),
            Disposition::Local => out.push(Action::Local { side, buf }),
            Disposition::Transit { port, view, egress } => {
                let owner = usize::from(port) % self.n;
                if owner == self.k {
                    self.transit(side, buf, view, egress, now, out);
                } else {
                    self.c.inc(Counter::HandedOff);
                    let packet = Packet {
                        buf,
                        view,
                        from: side,
                        egress,
                    };
                    out.push(Action::HandOff {
                        worker: owner,
                        packet,
                    });
                }
            }
        }
    }

    fn transit(
        &mut self,
        side: Side,
        buf: Buf,
        view: Ipv4View,
        egress: Egress,
        now: u64,
        out: &mut Actions,
    ) {
        if self.a.is_subnet_edge(view.dst) {
            // A subnet's network or broadcast address: no next hop to resolve.
            let why = Counter::DropNoRoute;
            return out.push(Action::Drop { why, buf });
        }
        match view.l4 {
            L4::IcmpError { .. } => return self.icmp_error(side, buf, view, now, out),
            L4::Fragment => return self.later_fragment(buf, view, now, out),
            _ => {}
        }
        let Some(t) = Transport::of(&view) else {
            let why = Counter::DropUnsupportedProtocol;
            return out.push(Action::Drop { why, buf });
        };
        match side {
            Side::Pod => self.in2out(buf, view, t, egress, now, out),
            Side::Uplink => self.out2in(buf, view, t, egress, now, out),
        }
    }

    /// Checks the egress MTU. A TSO super-frame is let through with its
    /// segment size cut to fit (TCP may be segmented anywhere); a UDP
    /// super-frame (USO) whose datagrams fit goes whole, else its datagrams
    /// are cut out to be fragmented, or refused with DF, one by one (their
    /// boundaries are the sender's; Linux's `ip_finish_output_gso` does the
    /// same); a packet with DF set must fit as it is; one without DF will be
    /// fragmented. Returns the checksum form of the L4 field, whether to
    /// fragment and whether to segment.
    #[inline(always)]
    fn offload_fit(
        &self,
        buf: &mut Buf,
        view: &Ipv4View,
        mtu: usize,
    ) -> Result<(L4Csum, bool, bool), Counter> {
        let hdr = VnetHdr::parse(buf.vnet()).unwrap_or_default();
        let mut segment = false;
        if hdr.is_gso() {
            match (view.l4, hdr.gso_type & !GSO_ECN) {
                (L4::Tcp { hlen, .. }, GSO_TCPV4) if hdr.gso_size > 0 => {
                    let max_seg = mtu.saturating_sub(view.ihl + usize::from(hlen));
                    if usize::from(hdr.gso_size) > max_seg {
                        let mut h = hdr;
                        h.gso_size = max_seg as u16;
                        h.write(buf.vnet_mut());
                    }
                }
                (L4::Udp { .. }, GSO_UDP_L4) if hdr.gso_size > 0 => {
                    if view.ihl + 8 + usize::from(hdr.gso_size) > mtu {
                        if view.dont_frag {
                            return Err(Counter::DropTooBig);
                        }
                        segment = true;
                    }
                }
                // Another type for the protocol, or a segment size of 0
                // (corpus/core/seed-regression-gso-size-zero; tun refuses
                // such a frame on write).
                _ => return Err(Counter::DropUnsupportedProtocol),
            }
            self.c.inc(Counter::GsoFrames);
        } else if view.total_len > mtu && view.dont_frag {
            return Err(Counter::DropTooBig);
        }
        let csum = if hdr.partial_csum_at(view.l4_offset()) {
            L4Csum::Partial
        } else {
            L4Csum::Full
        };
        Ok((csum, !hdr.is_gso() && view.total_len > mtu, segment))
    }

    /// The router's checks before a packet is forwarded to `egress`: TTL
    /// (Time Exceeded back to `from`), then the egress MTU. On refusal the
    /// verdict is pushed and None returned.
    #[inline(always)]
    fn forwardable(
        &mut self,
        from: Side,
        egress: Side,
        mut buf: Buf,
        v: &Ipv4View,
        now: u64,
        out: &mut Actions,
    ) -> Option<(Buf, Fit)> {
        if v.ttl <= 1 {
            let r = Refusal {
                to: from,
                kind: IcmpErrorKind::TTL_EXCEEDED,
                why: Counter::DropTtlExceeded,
            };
            self.reject(r, buf, v, now, out);
            return None;
        }
        trim_padding(&mut buf, v);
        let mtu = self.a.mtu(egress);
        match self.offload_fit(&mut buf, v, mtu) {
            Ok((csum, split, segment)) => Some((
                buf,
                Fit {
                    csum,
                    split,
                    segment,
                    mtu,
                },
            )),
            // Too big with DF set: Fragmentation Needed with the MTU goes
            // back (RFC 1191, RFC 4787 REQ-13).
            Err(why) if why == Counter::DropTooBig && v.dont_frag => {
                let kind = IcmpErrorKind::frag_needed(mtu as u16);
                self.reject(
                    Refusal {
                        to: from,
                        kind,
                        why,
                    },
                    buf,
                    v,
                    now,
                    out,
                );
                None
            }
            Err(why) => {
                out.push(Action::Drop { why, buf });
                None
            }
        }
    }

    /// Sends a translated packet, fragmenting it first when it must be.
    #[inline]
    fn send_on(&mut self, side: Side, next_hop: Ipv4Addr, buf: Buf, fit: Fit, out: &mut Actions) {
        if fit.segment {
            return self.emit_segmented(side, next_hop, buf, fit.mtu, out);
        }
        if fit.split {
            return self.emit_fragmented(side, next_hop, buf, fit.mtu, out);
        }
        self.emit(side, next_hop, buf, out);
    }

    /// A translated frame to `side`: its MACs set when the next hop is
    /// known, else for the control thread to resolve.
    #[inline]
    fn emit(&mut self, side: Side, next_hop: Ipv4Addr, mut buf: Buf, out: &mut Actions) {
        let known = if next_hop == self.a.uplink_gateway {
            self.gateway.as_mut()
        } else {
            self.neighbours.get_mut(&next_hop)
        };
        let Some(k) = known else {
            out.push(Action::Resolve {
                side,
                next_hop,
                buf,
            });
            return;
        };
        if k.report_use {
            k.report_use = false;
            out.push(Action::Neighbour(Event::Used(next_hop)));
        }
        let mac = k.mac;
        wire::set_macs(buf.frame_mut(), mac, self.a.mac(side));
        out.push(Action::Send { side, buf });
    }

    /// Forgets idle routed sessions, once a second.
    fn sweep_routed(&mut self, now: u64) {
        if self.routed.is_empty() || now < self.routed_swept_ms + ROUTED_SWEEP_MS {
            return;
        }
        self.routed_swept_ms = now;
        let t = self.table.config().timeouts;
        self.routed.retain(|k, r| {
            let idle = match k.proto {
                crate::nat::Proto::Tcp => t.tcp_established_ms,
                crate::nat::Proto::Udp => t.udp_ms,
                crate::nat::Proto::Icmp => t.icmp_ms,
            };
            let idle = if r.answered {
                idle
            } else {
                idle.min(ROUTED_UNANSWERED_MS)
            };
            now < r.seen_ms.saturating_add(idle)
        });
    }
}

/// Cuts the Ethernet padding after the IP packet (a pod may pad a short
/// frame; a larger pod MTU allows more): only the packet itself is
/// forwarded, as a router does, so the padding never leaks to the other
/// side and never pushes a frame past the egress MTU.
#[inline(always)]
fn trim_padding(buf: &mut Buf, v: &Ipv4View) {
    let end = buf.vnet().len() + wire::ETH_HLEN + v.total_len;
    if buf.wire().len() > end {
        buf.set_wire_len(end);
    }
}

#[cfg(test)]
pub(super) mod tests;
