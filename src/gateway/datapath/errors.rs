//! ICMP errors: translating the ones about a flow (RFC 5508 REQ-3..7) and
//! deciding the ones the gateway itself sends (Time Exceeded, RFC 1812
//! §5.3.1; Fragmentation Needed, RFC 1191), within the rate limit
//! (RFC 1812 §4.3.2.8).
use super::{Action, Actions, Core};

/// An ICMP error the gateway means to send instead of forwarding a packet.
#[derive(Debug, Clone, Copy)]
pub(super) struct Refusal {
    /// Back where the packet came from.
    pub to: Side,
    pub kind: IcmpErrorKind,
    /// The drop counted whether or not the error goes out.
    pub why: Counter,
}

use crate::gateway::buf::Buf;
use crate::gateway::stats::Counter;
use crate::nat::{InKey, OutKey, Proto};
use crate::policy::Side;
use crate::wire::icmp::{self, EmbeddedL4, ErrorDir, IcmpRateLimit};
use crate::wire::{self, IcmpErrorKind, Ipv4View};

impl Core {
    /// Refuses `buf` counting `r.why`, with an ICMP error of `r.kind` back
    /// to `r.to` when one may be sent (never about an error or a non-first
    /// fragment, never to a broadcast source) and the rate limit allows it.
    pub(super) fn reject(
        &mut self,
        r: Refusal,
        buf: Buf,
        view: &Ipv4View,
        now: u64,
        out: &mut Actions,
    ) {
        let why = r.why;
        if !wire::may_send_icmp_error(view) {
            return out.push(Action::Drop { why, buf });
        }
        if let Some(limit) = &mut self.icmp_limit {
            if IcmpRateLimit::applies_to(r.kind) && !limit.allow(now) {
                self.c.inc(Counter::IcmpErrorsRateLimited);
                return out.push(Action::Drop { why, buf });
            }
        }
        out.push(Action::Reject {
            to: r.to,
            kind: r.kind,
            why,
            view: *view,
            buf,
        });
    }

    /// An ICMP error about a flow (RFC 5508 REQ-3..5): from outside about a
    /// packet we masqueraded, or from a pod about a packet it was sent. The
    /// quoted packet finds the flow; the outer and quoted headers are both
    /// rewritten. Errors neither refresh nor end a flow (RFC 5508 REQ-6):
    /// they are looked up, never accounted.
    pub(super) fn icmp_error(
        &mut self,
        side: Side,
        mut buf: Buf,
        v: Ipv4View,
        now: u64,
        out: &mut Actions,
    ) {
        let Ok(emb) = icmp::parse_embedded(buf.frame(), &v) else {
            let why = Counter::DropBadIcmpError;
            return out.push(Action::Drop { why, buf });
        };
        if v.ttl <= 1 {
            // Never an error about an error.
            let why = Counter::DropTtlExceeded;
            return out.push(Action::Drop { why, buf });
        }
        let (proto, icmp) = match emb.l4 {
            EmbeddedL4::Tcp { .. } => (Proto::Tcp, false),
            EmbeddedL4::Udp { .. } => (Proto::Udp, false),
            EmbeddedL4::IcmpEcho { .. } => (Proto::Icmp, true),
        };
        let (qs, qd) = emb.ports();
        let found = match side {
            Side::Uplink => {
                // We sent ext:qs -> remote:qd; the error comes back to ext.
                let key = OutKey {
                    proto,
                    remote: emb.dst,
                    rport: if icmp { 0 } else { qd },
                    ext: emb.src,
                    eport: qs,
                };
                self.table.lookup_out2in(&key, now).map(|id| {
                    let inside = self.table.get(id).inside;
                    let dir = ErrorDir::Out2In {
                        new_outer_dst: inside.src,
                        new_inner_src: inside.src,
                        new_inner_sport: inside.sport,
                    };
                    (dir, Side::Pod, inside.src)
                })
            }
            Side::Pod => {
                // The pod was sent remote:qs -> pod:qd and complains about it.
                let key = InKey {
                    proto,
                    src: emb.dst,
                    sport: qd,
                    dst: emb.src,
                    dport: if icmp { 0 } else { qs },
                };
                self.table.lookup_in2out(&key, now).map(|id| {
                    let f = self.table.get(id);
                    let dir = ErrorDir::In2Out {
                        new_outer_src: f.ext_addr,
                        new_inner_dst: f.ext_addr,
                        new_inner_dport: f.ext_port,
                    };
                    (dir, Side::Uplink, self.a.uplink_next_hop(v.dst))
                })
            }
        };
        let Some((dir, egress, next_hop)) = found else {
            let why = Counter::DropIcmpErrorNoFlow;
            return out.push(Action::Drop { why, buf });
        };
        icmp::translate_error(buf.frame_mut(), &v, &emb, dir);
        self.c.inc(Counter::IcmpErrorsTranslated);
        if side == Side::Pod && self.a.is_outside(v.dst) {
            // About a hairpinned packet: the error goes back to the pod that
            // sent it, through that pod's mapping (RFC 5508 REQ-7).
            return self.hairpin(buf, now, out);
        }
        self.emit(egress, next_hop, buf, out)
    }
}
