//! in2out, out2in, hairpinning and routed (excluded-destination) sessions.
//!
//! Sessions: a miss looks for a mapping (outbound: only a SYN, an echo
//! request or a UDP datagram creates one; inbound: a forward or a mapping
//! the filtering lets the remote reach, RFC 4787 REQ-8, RFC 5382 REQ-3);
//! accounting drives the TCP state and may refuse an out-of-window RST.
use super::{tcp_seg, Action, Actions, Core, FragRewrite};
use crate::gateway::buf::Buf;
use crate::gateway::classify::{classify, frag_key};
use crate::gateway::stats::Counter;
use crate::nat::{CreateError, Direction, FlowId, InKey, InboundError, OutKey, Proto, Verdict};
use crate::policy::{Addressing, Egress, Side};
use crate::wire::{self, End, Ipv4View, L4};

/// The protocol and ports (or echo id, as the source port) of a packet NAT
/// can translate.
#[derive(Debug, Clone, Copy)]
pub(super) struct Transport {
    proto: Proto,
    sport: u16,
    dport: u16,
}

impl Transport {
    /// None for a protocol without ports or echo id.
    pub(super) fn of(v: &Ipv4View) -> Option<Transport> {
        let proto = match v.l4 {
            L4::Tcp { .. } => Proto::Tcp,
            L4::Udp { .. } => Proto::Udp,
            L4::IcmpEcho { .. } => Proto::Icmp,
            _ => return None,
        };
        let (sport, dport) = v.ports()?;
        Some(Transport {
            proto,
            sport,
            dport,
        })
    }
}

impl Core {
    /// Accounts a packet to its flow (state, counters, timeout); false when
    /// the table refuses it (an out-of-window RST).
    #[inline]
    fn account(
        &mut self,
        id: FlowId,
        dir: Direction,
        seg: crate::nat::TcpSeg,
        v: &Ipv4View,
        now: u64,
    ) -> bool {
        let verdict = self.table.account(id, dir, seg, v.total_len, now);
        verdict != Verdict::DropInvalidRst
    }

    pub(super) fn in2out(
        &mut self,
        buf: Buf,
        v: Ipv4View,
        t: Transport,
        egress: Egress,
        now: u64,
        out: &mut Actions,
    ) {
        let Transport {
            proto,
            sport,
            dport,
        } = t;
        let ext_addr = match egress {
            Egress::Nat(addr) => addr,
            Egress::Route => return self.route_out(buf, v, t, now, out),
            Egress::Refuse => {
                let why = Counter::DropSpoofedSource;
                return out.push(Action::Drop { why, buf });
            }
        };
        let Some((mut buf, fit)) = self.forwardable(Side::Pod, Side::Uplink, buf, &v, now, out)
        else {
            return;
        };
        let key = InKey {
            proto,
            src: v.src,
            sport,
            dst: v.dst,
            dport,
        };
        let seg = tcp_seg(buf.frame(), &v);
        let id = match self.table.lookup_in2out(&key, now) {
            Some(id) => id,
            None => {
                // Only a SYN, an echo request or a UDP datagram starts a flow.
                let refused = match v.l4 {
                    L4::Tcp { .. } if !seg.flags.syn || seg.flags.ack => {
                        Some(Counter::DropTcpNotSyn)
                    }
                    L4::IcmpEcho { request: false, .. } => Some(Counter::DropIcmpNoFlow),
                    _ => None,
                };
                if let Some(why) = refused {
                    return out.push(Action::Drop { why, buf });
                }
                match self.table.create(&key, ext_addr, now) {
                    Ok(id) => {
                        self.c.inc(Counter::FlowsCreated);
                        id
                    }
                    Err(e) => {
                        let why = match e {
                            CreateError::TableFull => Counter::DropTableFull,
                            CreateError::PortsExhausted => Counter::DropPortsExhausted,
                            CreateError::PodFlowLimit => Counter::DropPodFlowLimit,
                            CreateError::PodPortLimit => Counter::DropPodPortLimit,
                        };
                        return out.push(Action::Drop { why, buf });
                    }
                }
            }
        };
        if !self.account(id, Direction::In2Out, seg, &v, now) {
            let why = Counter::DropInvalidRst;
            return out.push(Action::Drop { why, buf });
        }
        let f = self.table.get(id);
        let (ext_addr, ext_port) = (f.ext_addr, f.ext_port);
        let hairpin = self.a.is_outside(v.dst);
        let next_hop = self.a.uplink_next_hop(v.dst);
        if v.is_fragment {
            let rewrite = FragRewrite {
                end: End::Src,
                addr: ext_addr,
                egress: Side::Uplink,
                next_hop,
                hairpin,
            };
            self.first_fragment_done(frag_key(buf.frame(), &v), rewrite, now, out);
        }
        wire::translate(buf.frame_mut(), &v, End::Src, ext_addr, ext_port, fit.csum);
        self.c.inc(Counter::In2outPackets);
        self.c.add(Counter::In2outBytes, v.total_len as u64);
        self.count_rule(key.src, v.total_len);
        if hairpin {
            return self.hairpin(buf, now, out);
        }
        self.send_on(Side::Uplink, next_hop, buf, fit, out)
    }

    pub(super) fn out2in(
        &mut self,
        buf: Buf,
        v: Ipv4View,
        t: Transport,
        egress: Egress,
        now: u64,
        out: &mut Actions,
    ) {
        let Transport {
            proto,
            sport,
            dport,
        } = t;
        let key = match v.l4 {
            L4::IcmpEcho { id, .. } => OutKey {
                proto,
                remote: v.src,
                rport: 0,
                ext: v.dst,
                eport: id,
            },
            _ => OutKey {
                proto,
                remote: v.src,
                rport: sport,
                ext: v.dst,
                eport: dport,
            },
        };
        let seg = tcp_seg(buf.frame(), &v);
        let id = match self.table.lookup_out2in(&key, now) {
            Some(id) => id,
            // Classification found it addressed to no outside address: a
            // reply to a routed session.
            None if egress == Egress::Route => {
                return self.route_in(buf, v, t, now, out);
            }
            // No session: a forward, or a mapping that the filtering lets
            // this remote reach (RFC 4787 REQ-8, RFC 5382 REQ-3), opens one.
            None => match self.table.inbound(&key, seg.flags, now) {
                Ok(id) => {
                    self.c.inc(Counter::FlowsCreated);
                    id
                }
                Err(e) => {
                    let why = match e {
                        InboundError::NoMapping | InboundError::NotSyn => Counter::DropNoFlow,
                        InboundError::Filtered => Counter::DropFiltered,
                        InboundError::TableFull => Counter::DropTableFull,
                        InboundError::PodFlowLimit => Counter::DropPodFlowLimit,
                    };
                    return out.push(Action::Drop { why, buf });
                }
            },
        };
        let Some((mut buf, fit)) = self.forwardable(Side::Uplink, Side::Pod, buf, &v, now, out)
        else {
            return;
        };
        if !self.account(id, Direction::Out2In, seg, &v, now) {
            let why = Counter::DropInvalidRst;
            return out.push(Action::Drop { why, buf });
        }
        let inside = self.table.get(id).inside;
        if v.is_fragment {
            let rewrite = FragRewrite {
                end: End::Dst,
                addr: inside.src,
                egress: Side::Pod,
                next_hop: inside.src,
                hairpin: false,
            };
            self.first_fragment_done(frag_key(buf.frame(), &v), rewrite, now, out);
        }
        wire::translate(
            buf.frame_mut(),
            &v,
            End::Dst,
            inside.src,
            inside.sport,
            fit.csum,
        );
        self.c.inc(Counter::Out2inPackets);
        self.c.add(Counter::Out2inBytes, v.total_len as u64);
        self.count_rule(inside.src, v.total_len);
        self.send_on(Side::Pod, inside.src, buf, fit, out)
    }

    /// A pod's packet to an outside address (its own or another pod's
    /// mapping, or a forward), already translated like any outbound packet:
    /// it turns around here as if it had arrived on the uplink (RFC 4787
    /// REQ-9, RFC 5382 REQ-8), with the TTL decremented once in all. Only
    /// the uplink classification runs again (the addresses changed); no
    /// pod sighting, and the owner may be another worker.
    pub(super) fn hairpin(&mut self, mut buf: Buf, now: u64, out: &mut Actions) {
        self.c.inc(Counter::Hairpinned);
        wire::set_macs(buf.frame_mut(), self.a.uplink_mac, self.a.pod_mac);
        wire::restore_ttl(buf.frame_mut());
        let (d, _) = classify(&self.a, Side::Uplink, buf.frame());
        self.dispatch(Side::Uplink, d, buf, now, out);
    }

    /// Forwards a pod's packet to an excluded destination untranslated, as a
    /// router would, remembering the session so that its replies come back.
    fn route_out(&mut self, buf: Buf, v: Ipv4View, t: Transport, now: u64, out: &mut Actions) {
        let (egress, next_hop) = if self.a.pod_net.contains(v.dst) {
            (Side::Pod, v.dst)
        } else {
            (Side::Uplink, self.a.uplink_next_hop(v.dst))
        };
        let Some((mut buf, fit)) = self.forwardable(Side::Pod, egress, buf, &v, now, out) else {
            return;
        };
        if egress == Side::Uplink {
            let key = InKey {
                proto: t.proto,
                src: v.src,
                sport: t.sport,
                dst: v.dst,
                dport: t.dport,
            };
            if self.routed.len() >= super::ROUTED_MAX && !self.routed.contains_key(&key) {
                let why = Counter::DropTableFull;
                return out.push(Action::Drop { why, buf });
            }
            self.routed
                .entry(key)
                .and_modify(|r| r.seen_ms = now)
                .or_insert(super::Routed {
                    seen_ms: now,
                    answered: false,
                });
        }
        if v.is_fragment {
            self.routed_fragment(&buf, &v, egress, next_hop, now, out);
        }
        // Same address and port: only the TTL (and its checksum) change.
        wire::translate(buf.frame_mut(), &v, End::Src, v.src, t.sport, fit.csum);
        self.c.inc(Counter::RoutedPackets);
        self.send_on(egress, next_hop, buf, fit, out)
    }

    /// A reply to a routed session, coming back in untranslated.
    fn route_in(&mut self, buf: Buf, v: Ipv4View, t: Transport, now: u64, out: &mut Actions) {
        let (sport, dport) = match v.l4 {
            L4::IcmpEcho { id, .. } => (0, id),
            _ => (t.sport, t.dport),
        };
        let key = InKey {
            proto: t.proto,
            src: v.dst,
            sport: dport,
            dst: v.src,
            dport: sport,
        };
        let Some(r) = self.routed.get_mut(&key) else {
            let why = Counter::DropNoFlow;
            return out.push(Action::Drop { why, buf });
        };
        r.seen_ms = now;
        r.answered = true;
        let Some((mut buf, fit)) = self.forwardable(Side::Uplink, Side::Pod, buf, &v, now, out)
        else {
            return;
        };
        if v.is_fragment {
            self.routed_fragment(&buf, &v, Side::Pod, v.dst, now, out);
        }
        // Same address and port (or echo id): only the TTL changes.
        wire::translate(buf.frame_mut(), &v, End::Dst, v.dst, dport, fit.csum);
        self.c.inc(Counter::RoutedPackets);
        self.send_on(Side::Pod, v.dst, buf, fit, out)
    }

    /// The first fragment of a routed datagram is on its way: its later
    /// fragments follow it untranslated (the rewrite keeps the source
    /// address), to the same egress and next hop.
    fn routed_fragment(
        &mut self,
        buf: &Buf,
        v: &Ipv4View,
        egress: Side,
        next_hop: std::net::Ipv4Addr,
        now: u64,
        out: &mut Actions,
    ) {
        let rewrite = FragRewrite {
            end: End::Src,
            addr: v.src,
            egress,
            next_hop,
            hairpin: false,
        };
        self.first_fragment_done(frag_key(buf.frame(), v), rewrite, now, out);
    }
}

impl Core {
    /// Counts a translated packet of `len` bytes under the rule of pod
    /// address `src` (the last address's rule is remembered).
    #[inline]
    fn count_rule(&mut self, src: std::net::Ipv4Addr, len: usize) {
        let rule = match self.rule_memo {
            Some((a, r)) if a == src => r,
            _ => {
                let r = rule_of(&self.a, src);
                self.rule_memo = Some((src, r));
                r
            }
        };
        if let Some(r) = rule {
            self.c.rule(r, len as u64);
        }
    }
}

/// The position of the rule that translates pod address `src`, for its
/// counters: SNAT rules first, then masquerade rules (the order
/// [`Addressing::egress`] tries them in).
#[inline]
fn rule_of(a: &Addressing, src: std::net::Ipv4Addr) -> Option<usize> {
    match a.snat.iter().position(|r| r.source.contains(src)) {
        Some(i) => Some(i),
        None => a
            .masquerade
            .iter()
            .position(|r| r.source.contains(src))
            .map(|i| i + a.snat.len()),
    }
}
