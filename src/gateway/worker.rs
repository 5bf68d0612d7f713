//! A worker: reads its own queue of each TAP, owns one flow-table shard and
//! the outside ports `p % N == k`, translates in place and writes out.
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use hashbrown::HashMap;
use smoltcp::wire::EthernetAddress;

use super::classify::{classify, frag_key, frag_port, Disposition};
use super::control::tx_counter;
use super::stats::{Counter, Counters};
use super::{Buf, CtrlMsg, Egress, FragRewrite, Packet, Shared, Side, WorkerMsg};
use crate::device::Poller;
use crate::nat::frag::{FragCache, FragKey, Later, Release};
use crate::nat::{
    CreateError, Direction, FlowId, FlowTable, InKey, InboundError, OutKey, Proto, TcpFlags,
    TcpSeg, Verdict,
};
use crate::wire::icmp::{self, EmbeddedL4, ErrorDir, IcmpRateLimit};
use crate::wire::vnet::VnetHdr;
use crate::wire::{self, csum, fragment, End, IcmpErrorKind, Ipv4View, L4Csum, L4};

/// Flow slots examined for expiry per wake-up: bounded work, never a stall.
const EXPIRE_BUDGET: usize = 256;
/// Frames read from one queue before looking at the other.
const READ_BURST: usize = 64;
/// Sleep at most this long in poll(2), so expiry keeps running when idle.
const IDLE_WAIT: Duration = Duration::from_millis(100);

pub(super) struct Worker {
    k: usize,
    table: FlowTable,
    shared: Arc<Shared>,
    c: Arc<Counters>,
    rx: Receiver<WorkerMsg>,
    peers: Vec<Sender<WorkerMsg>>,
    ctrl: Sender<CtrlMsg>,
    /// Next-hop MACs, as the control thread announces them.
    neighbours: HashMap<Ipv4Addr, EthernetAddress>,
    /// Pod (address, MAC) pairs already reported to the control thread.
    reported: HashMap<Ipv4Addr, EthernetAddress>,
    /// Packets read here that other workers own, sent at the end of a burst.
    handoff: Vec<Vec<Packet>>,
    wake_ctrl: bool,
    /// A buffer to read the next frame into.
    spare: Option<Buf>,
    /// This worker's share of the gateway's ICMP error budget.
    icmp_limit: Option<IcmpRateLimit>,
    /// Datagrams whose fragments this worker tracks (`frag_port % N == k`);
    /// None when fragment handling is off.
    frags: Option<FragCache<FragRewrite, Buf>>,
    /// Buffers the fragment cache handed back, processed after each call.
    released: Vec<(Buf, Release)>,
    /// First-fragment rewrites for other workers, sent at the end of a burst.
    frag_news: Vec<(usize, FragKey, FragRewrite)>,
    /// Routed (untranslated, excluded-destination) sessions, by their pod-side
    /// key, with the time last seen: only replies to these come back in.
    routed: HashMap<InKey, u64>,
    routed_swept_ms: u64,
}

/// What the router checks decided about a packet to forward.
#[derive(Debug, Clone, Copy)]
struct Fit {
    /// The form of the transport checksum (offloaded or complete).
    csum: L4Csum,
    /// Larger than the egress MTU without DF: fragment it.
    split: bool,
    mtu: usize,
}

/// At most this many routed sessions per worker.
const ROUTED_MAX: usize = 65536;

fn tcp_flags(flags: u8) -> TcpFlags {
    TcpFlags {
        syn: flags & wire::TCP_SYN != 0,
        ack: flags & wire::TCP_ACK != 0,
        fin: flags & wire::TCP_FIN != 0,
        rst: flags & wire::TCP_RST != 0,
    }
}

/// The TCP fields the flow table tracks (`classify` checked the header).
fn tcp_seg(frame: &[u8], v: &Ipv4View) -> TcpSeg {
    let L4::Tcp { flags, .. } = v.l4 else {
        return TcpSeg::NONE;
    };
    let l4 = &frame[v.l4_offset()..];
    let be32 = |at: usize| u32::from_be_bytes([l4[at], l4[at + 1], l4[at + 2], l4[at + 3]]);
    let hlen = usize::from(l4[12] >> 4) * 4;
    TcpSeg {
        flags: tcp_flags(flags),
        seq: be32(4),
        ack: be32(8),
        window: u16::from_be_bytes([l4[14], l4[15]]),
        payload_len: v.total_len.saturating_sub(v.ihl + hlen) as u32,
    }
}

fn proto(l4: &L4) -> Option<Proto> {
    match l4 {
        L4::Tcp { .. } => Some(Proto::Tcp),
        L4::Udp { .. } => Some(Proto::Udp),
        L4::IcmpEcho { .. } => Some(Proto::Icmp),
        _ => None,
    }
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        k: usize,
        table: FlowTable,
        frags: Option<FragCache<FragRewrite, Buf>>,
        icmp_limit: Option<IcmpRateLimit>,
        shared: Arc<Shared>,
        c: Arc<Counters>,
        rx: Receiver<WorkerMsg>,
        peers: Vec<Sender<WorkerMsg>>,
        ctrl: Sender<CtrlMsg>,
    ) -> Worker {
        let handoff = peers.iter().map(|_| Vec::new()).collect();
        Worker {
            k,
            table,
            shared,
            c,
            rx,
            peers,
            ctrl,
            neighbours: HashMap::new(),
            reported: HashMap::new(),
            handoff,
            wake_ctrl: false,
            spare: None,
            icmp_limit,
            frags,
            released: Vec::new(),
            frag_news: Vec::new(),
            routed: HashMap::new(),
            routed_swept_ms: 0,
        }
    }

    pub(super) fn run(mut self) {
        if self.shared.tuning.pin {
            // Best effort: a CPU that is not there just leaves the thread unpinned.
            let _ = crate::device::sys::pin_current_thread(self.k);
        }
        let mut poller = Poller::new();
        let pod = poller.add(self.shared.pod[self.k].as_raw_fd());
        let uplink = poller.add(self.shared.uplink[self.k].as_raw_fd());
        let wake = poller.add(self.shared.wakers[self.k].as_raw_fd());
        let busy = self.shared.tuning.busy_poll;
        let mut spin_until = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let timeout = if !busy.is_zero() && Instant::now() < spin_until {
                Duration::ZERO
            } else {
                IDLE_WAIT
            };
            if poller.wait(Some(timeout)).is_err() {
                continue;
            }
            let mut work = 0;
            if poller.readable(wake) {
                self.shared.wakers[self.k].drain();
                while let Ok(msg) = self.rx.try_recv() {
                    work += 1;
                    self.message(msg);
                }
            }
            if poller.readable(pod) {
                work += self.read_burst(Side::Pod);
            }
            if poller.readable(uplink) {
                work += self.read_burst(Side::Uplink);
            }
            self.flush();
            if work > 0 && !busy.is_zero() {
                spin_until = Instant::now() + busy;
            }
            let now = self.shared.now_ms();
            self.table.expire(now, EXPIRE_BUDGET);
            self.sweep_routed(now);
            if let Some(frags) = &mut self.frags {
                let released = &mut self.released;
                frags.expire(now, &mut |b, r| released.push((b, r)));
                self.drain_released(None);
            }
        }
    }

    fn message(&mut self, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Packets(batch) => {
                let now = self.shared.now_ms();
                for p in batch {
                    if let Some(b) = self.transit(p.from, p.buf, p.view, now) {
                        self.shared.pool.put(b);
                    }
                }
            }
            WorkerMsg::Neighbour(ip, mac) => {
                self.neighbours.insert(ip, mac);
            }
            WorkerMsg::Flows(reply) => {
                let _ = reply.send(self.table.iter().copied().collect());
            }
            WorkerMsg::FragTranslation(key, rewrite) => {
                self.first_fragment_seen(key, rewrite, self.shared.now_ms());
            }
        }
    }

    /// Records how a datagram's first fragment was rewritten and sends the
    /// fragments that arrived before it.
    fn first_fragment_seen(&mut self, key: FragKey, rewrite: FragRewrite, now: u64) {
        if let Some(frags) = &mut self.frags {
            let released = &mut self.released;
            frags.first_seen(key, rewrite, now, &mut |b, r| released.push((b, r)));
            self.drain_released(Some(rewrite));
        }
    }

    /// Handles buffers the fragment cache gave back: held fragments whose
    /// first fragment has now been seen go out rewritten like it; the others
    /// are dropped.
    fn drain_released(&mut self, rewrite: Option<FragRewrite>) {
        while let Some((buf, why)) = self.released.pop() {
            let back = match (why, rewrite) {
                (Release::Translate, Some(r)) => match wire::classify(buf.frame()) {
                    Ok(wire::Classified::Ipv4(view)) => self.rewrite_fragment(buf, &view, r),
                    _ => Some(buf),
                },
                _ => {
                    self.c.inc(Counter::DropFragmentTimeout);
                    Some(buf)
                }
            };
            if let Some(b) = back {
                self.shared.pool.put(b);
            }
        }
    }

    /// A non-first fragment: it follows its datagram's first fragment.
    fn later_fragment(&mut self, buf: Buf, view: Ipv4View, now: u64) -> Option<Buf> {
        let Some(frags) = &mut self.frags else {
            self.c.inc(Counter::DropFragment);
            return Some(buf);
        };
        let key = frag_key(buf.frame(), &view);
        let released = &mut self.released;
        let answer = frags.later(key, buf, now, &mut |b, r| released.push((b, r)));
        self.drain_released(None);
        match answer {
            Later::Translate(rewrite, buf) => self.rewrite_fragment(buf, &view, rewrite),
            Later::Held => {
                self.c.inc(Counter::FragmentsHeld);
                None
            }
            Later::Refused(buf, _) => {
                self.c.inc(Counter::DropFragmentCacheFull);
                Some(buf)
            }
        }
    }

    fn rewrite_fragment(&mut self, mut buf: Buf, view: &Ipv4View, r: FragRewrite) -> Option<Buf> {
        if view.ttl <= 1 {
            // No ICMP error about a non-first fragment (RFC 1812 §4.3.2.7).
            self.c.inc(Counter::DropTtlExceeded);
            return Some(buf);
        }
        wire::translate(buf.frame_mut(), view, r.end, r.addr, 0, L4Csum::Full);
        self.c.inc(Counter::FragmentsTranslated);
        let mtu = self.shared.addressing.mtu(r.egress);
        if view.total_len > mtu {
            return self.emit_fragmented(r.egress, r.next_hop, buf, mtu);
        }
        self.emit(r.egress, r.next_hop, buf)
    }

    /// After the first fragment of a datagram was translated: tell the
    /// worker that tracks the datagram how its other fragments are rewritten.
    fn first_fragment_done(&mut self, key: FragKey, rewrite: FragRewrite, now: u64) {
        if self.frags.is_none() {
            return;
        }
        let owner = usize::from(frag_port(&key)) % self.peers.len();
        if owner == self.k {
            self.first_fragment_seen(key, rewrite, now);
        } else {
            self.frag_news.push((owner, key, rewrite));
        }
    }

    /// Splits a translated packet that does not fit the egress MTU (DF clear)
    /// into fragments (RFC 791), finishing an offloaded checksum first.
    fn emit_fragmented(
        &mut self,
        side: Side,
        next_hop: Ipv4Addr,
        mut buf: Buf,
        mtu: usize,
    ) -> Option<Buf> {
        if let Ok(wire::Classified::Ipv4(v)) = wire::classify(buf.frame()) {
            let hdr = VnetHdr::parse(buf.vnet()).unwrap_or_default();
            if hdr.partial_csum_at(v.l4_offset()) {
                let at = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset);
                let end = wire::ETH_HLEN + v.total_len;
                let frame = buf.frame_mut();
                if at + 2 <= end {
                    let c = csum::checksum(&frame[v.l4_offset()..end]);
                    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
                }
            }
        }
        let mut pieces = Vec::new();
        let pool = &self.shared.pool;
        let result = fragment::fragment(buf.frame(), mtu, &mut |piece: &[u8]| {
            let mut b = pool.get();
            b.data[..b.hdr].fill(0);
            let end = b.hdr + piece.len();
            b.data[b.hdr..end].copy_from_slice(piece);
            b.len = end;
            pieces.push(b);
        });
        if result.is_err() {
            self.c.inc(Counter::DropTooBig);
            for p in pieces {
                self.shared.pool.put(p);
            }
            return Some(buf);
        }
        self.c.add(Counter::FragmentsCreated, pieces.len() as u64);
        for p in pieces {
            if let Some(b) = self.emit(side, next_hop, p) {
                self.shared.pool.put(b);
            }
        }
        Some(buf)
    }

    /// Reads up to [`READ_BURST`] frames from our queue of `side`.
    fn read_burst(&mut self, side: Side) -> usize {
        let now = self.shared.now_ms();
        for n in 0..READ_BURST {
            let mut buf = self.spare.take().unwrap_or_else(|| self.shared.pool.get());
            buf.len = buf.data.len();
            match self.shared.tap(side, self.k).recv(&mut buf.data) {
                Ok(len) if len >= buf.hdr => {
                    buf.len = len;
                    self.c.inc(match side {
                        Side::Pod => Counter::PodRxFrames,
                        Side::Uplink => Counter::UplinkRxFrames,
                    });
                    self.spare = self.frame(side, buf, now);
                }
                Ok(_) => {
                    self.c.inc(Counter::DropRunt);
                    self.spare = Some(buf);
                }
                Err(e) => {
                    self.spare = Some(buf);
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) {
                        self.c.inc(Counter::TapReadFails);
                    }
                    return n;
                }
            }
        }
        READ_BURST
    }

    /// One received frame. Returns the buffer when it can be reused.
    fn frame(&mut self, side: Side, buf: Buf, now: u64) -> Option<Buf> {
        let (disposition, seen) = classify(&self.shared.addressing, side, buf.frame());
        if let Some((ip, mac)) = seen {
            if self.reported.get(&ip) != Some(&mac) {
                self.reported.insert(ip, mac);
                let _ = self.ctrl.send(CtrlMsg::Seen(ip, mac));
                self.wake_ctrl = true;
            }
        }
        match disposition {
            Disposition::Drop(why) => {
                self.c.inc(why);
                Some(buf)
            }
            Disposition::Local => {
                let _ = self.ctrl.send(CtrlMsg::Local { side, buf });
                self.wake_ctrl = true;
                None
            }
            Disposition::Transit { port, view } => {
                let owner = usize::from(port) % self.peers.len();
                if owner == self.k {
                    self.transit(side, buf, view, now)
                } else {
                    self.c.inc(Counter::HandedOff);
                    self.handoff[owner].push(Packet {
                        buf,
                        view,
                        from: side,
                    });
                    None
                }
            }
        }
    }

    /// Accounts a packet to its flow (state, counters, timeout); false when
    /// the table refuses it (an out-of-window RST), which is counted.
    fn account(&mut self, id: FlowId, dir: Direction, buf: &Buf, v: &Ipv4View, now: u64) -> bool {
        let verdict = self
            .table
            .account(id, dir, tcp_seg(buf.frame(), v), v.total_len, now);
        if verdict == Verdict::DropInvalidRst {
            self.c.inc(Counter::DropInvalidRst);
            return false;
        }
        true
    }

    /// Sends the handed-off batches and wakes whoever has news.
    fn flush(&mut self) {
        for j in 0..self.handoff.len() {
            if self.handoff[j].is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.handoff[j]);
            match self.peers[j].try_send(WorkerMsg::Packets(batch)) {
                Ok(()) => self.shared.wakers[j].wake(),
                Err(e) => {
                    if let WorkerMsg::Packets(b) = e.into_inner() {
                        self.c.add(Counter::DropHandoffFull, b.len() as u64);
                        for p in b {
                            self.shared.pool.put(p.buf);
                        }
                    }
                }
            }
        }
        for (j, key, rewrite) in std::mem::take(&mut self.frag_news) {
            if self.peers[j]
                .try_send(WorkerMsg::FragTranslation(key, rewrite))
                .is_ok()
            {
                self.shared.wakers[j].wake();
            }
        }
        if std::mem::take(&mut self.wake_ctrl) {
            self.shared.ctrl_waker.wake();
        }
    }

    fn transit(&mut self, side: Side, buf: Buf, view: Ipv4View, now: u64) -> Option<Buf> {
        match (side, view.l4) {
            (_, L4::IcmpError { .. }) => self.icmp_error(side, buf, view, now),
            (_, L4::Fragment) => self.later_fragment(buf, view, now),
            (Side::Pod, _) => self.in2out(buf, view, now),
            (Side::Uplink, _) => self.out2in(buf, view, now),
        }
    }

    /// Sends an ICMP error of `kind` about `buf` back where it came from, from
    /// our address on that side, within the rate limit; then drops `buf`
    /// counting `why`.
    fn reject(
        &mut self,
        from: Side,
        buf: Buf,
        view: &Ipv4View,
        kind: IcmpErrorKind,
        why: Counter,
    ) -> Option<Buf> {
        self.c.inc(why);
        if !wire::may_send_icmp_error(view) {
            return Some(buf);
        }
        if let Some(limit) = &mut self.icmp_limit {
            if IcmpRateLimit::applies_to(kind) && !limit.allow(self.shared.now_ms()) {
                self.c.inc(Counter::IcmpErrorsRateLimited);
                return Some(buf);
            }
        }
        let a = &self.shared.addressing;
        let mut out = [0u8; 640];
        let n = wire::build_icmp_error(&mut out, buf.frame(), view, a.mac(from), a.ip(from), kind);
        // Counted before the write makes it visible, so that whoever sees
        // the error also sees the count.
        self.c.inc(Counter::IcmpErrorsSent);
        match self.shared.send_frame(from, self.k, &out[..n]) {
            Ok(()) => self.c.inc(tx_counter(from)),
            Err(_) => self.c.inc(Counter::TapWriteFails),
        }
        Some(buf)
    }

    /// An ICMP error about a flow (RFC 5508 REQ-3..5): from outside about a
    /// packet we masqueraded, or from a pod about a packet it was sent. The
    /// quoted packet finds the flow; the outer and quoted headers are both
    /// rewritten. Errors neither refresh nor end a flow (RFC 5508 REQ-6).
    fn icmp_error(&mut self, side: Side, mut buf: Buf, v: Ipv4View, now: u64) -> Option<Buf> {
        let Ok(emb) = icmp::parse_embedded(buf.frame(), &v) else {
            self.c.inc(Counter::DropBadIcmpError);
            return Some(buf);
        };
        if v.ttl <= 1 {
            // Never an error about an error.
            self.c.inc(Counter::DropTtlExceeded);
            return Some(buf);
        }
        let (proto, icmp) = match emb.l4 {
            EmbeddedL4::Tcp { .. } => (Proto::Tcp, false),
            EmbeddedL4::Udp { .. } => (Proto::Udp, false),
            EmbeddedL4::IcmpEcho { .. } => (Proto::Icmp, true),
        };
        let (qs, qd) = emb.ports();
        let (dir, egress, next_hop) = match side {
            Side::Uplink => {
                // We sent ext:qs -> remote:qd; the error comes back to ext.
                let key = OutKey {
                    proto,
                    remote: emb.dst,
                    rport: if icmp { 0 } else { qd },
                    ext: emb.src,
                    eport: qs,
                };
                let Some(id) = self.table.lookup_out2in(&key, now) else {
                    self.c.inc(Counter::DropIcmpErrorNoFlow);
                    return Some(buf);
                };
                let inside = self.table.get(id).inside;
                let dir = ErrorDir::Out2In {
                    new_outer_dst: inside.src,
                    new_inner_src: inside.src,
                    new_inner_sport: inside.sport,
                };
                (dir, Side::Pod, inside.src)
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
                let Some(id) = self.table.lookup_in2out(&key, now) else {
                    self.c.inc(Counter::DropIcmpErrorNoFlow);
                    return Some(buf);
                };
                let f = self.table.get(id);
                let dir = ErrorDir::In2Out {
                    new_outer_src: f.ext_addr,
                    new_inner_dst: f.ext_addr,
                    new_inner_dport: f.ext_port,
                };
                (
                    dir,
                    Side::Uplink,
                    self.shared.addressing.uplink_next_hop(v.dst),
                )
            }
        };
        icmp::translate_error(buf.frame_mut(), &v, &emb, dir);
        self.c.inc(Counter::IcmpErrorsTranslated);
        if side == Side::Pod && self.shared.addressing.is_outside(v.dst) {
            // About a hairpinned packet: the error goes back to the pod that
            // sent it, through that pod's mapping (RFC 5508 REQ-7).
            return self.hairpin(buf, now);
        }
        self.emit(egress, next_hop, buf)
    }

    /// Checks the egress MTU. A TSO super-frame is let through with its
    /// segment size cut to fit (TCP may be segmented anywhere); a packet with
    /// DF set must fit as it is; one without DF will be fragmented. Returns
    /// the checksum form of the L4 field and whether to fragment.
    fn offload_fit(
        &mut self,
        buf: &mut Buf,
        view: &Ipv4View,
        mtu: usize,
    ) -> Result<(L4Csum, bool), Counter> {
        let hdr = VnetHdr::parse(buf.vnet()).unwrap_or_default();
        if hdr.is_gso() {
            let L4::Tcp { .. } = view.l4 else {
                return Err(Counter::DropUnsupportedProtocol);
            };
            self.c.inc(Counter::GsoFrames);
            let l4 = view.l4_offset();
            let tcp_hdr = usize::from(buf.frame()[l4 + 12] >> 4) * 4;
            let max_seg = mtu.saturating_sub(view.ihl + tcp_hdr);
            if usize::from(hdr.gso_size) > max_seg {
                let mut h = hdr;
                h.gso_size = max_seg as u16;
                h.write(buf.vnet_mut());
            }
        } else if view.total_len > mtu && view.dont_frag {
            return Err(Counter::DropTooBig);
        }
        let csum = if hdr.partial_csum_at(view.l4_offset()) {
            L4Csum::Partial
        } else {
            L4Csum::Full
        };
        Ok((csum, !hdr.is_gso() && view.total_len > mtu))
    }

    /// The router's checks before a packet is forwarded to `egress`: TTL
    /// (Time Exceeded back to `from`), then the egress MTU. On refusal, the
    /// buffer to reuse (if any) is the error.
    fn forwardable(
        &mut self,
        from: Side,
        egress: Side,
        mut buf: Buf,
        v: &Ipv4View,
    ) -> Result<(Buf, Fit), Option<Buf>> {
        if v.ttl <= 1 {
            return Err(self.reject(
                from,
                buf,
                v,
                IcmpErrorKind::TTL_EXCEEDED,
                Counter::DropTtlExceeded,
            ));
        }
        let mtu = self.shared.addressing.mtu(egress);
        match self.offload_fit(&mut buf, v, mtu) {
            Ok((csum, split)) => Ok((buf, Fit { csum, split, mtu })),
            Err(why) => Err(self.too_big(from, buf, v, mtu, why)),
        }
    }

    /// Sends a translated packet, fragmenting it first when it must be.
    fn send_on(&mut self, side: Side, next_hop: Ipv4Addr, buf: Buf, fit: Fit) -> Option<Buf> {
        if fit.split {
            return self.emit_fragmented(side, next_hop, buf, fit.mtu);
        }
        self.emit(side, next_hop, buf)
    }

    /// A packet that does not fit the egress MTU: with DF set, Fragmentation
    /// Needed with the MTU goes back (RFC 1191, RFC 4787 REQ-13).
    fn too_big(
        &mut self,
        from: Side,
        buf: Buf,
        v: &Ipv4View,
        mtu: usize,
        why: Counter,
    ) -> Option<Buf> {
        if why == Counter::DropTooBig && v.dont_frag {
            let kind = IcmpErrorKind::frag_needed(mtu as u16);
            return self.reject(from, buf, v, kind, why);
        }
        self.c.inc(why);
        Some(buf)
    }

    fn in2out(&mut self, buf: Buf, v: Ipv4View, now: u64) -> Option<Buf> {
        let (Some(proto), Some((sport, dport))) = (proto(&v.l4), v.ports()) else {
            self.c.inc(Counter::DropUnsupportedProtocol);
            return Some(buf);
        };
        let ext_addr = match self.shared.addressing.egress(v.src, v.dst) {
            Egress::Nat(addr) => addr,
            Egress::Route => return self.route_out(buf, v, proto, (sport, dport), now),
            Egress::Refuse => {
                self.c.inc(Counter::DropSpoofedSource);
                return Some(buf);
            }
        };
        let (mut buf, fit) = match self.forwardable(Side::Pod, Side::Uplink, buf, &v) {
            Ok(x) => x,
            Err(back) => return back,
        };
        let key = InKey {
            proto,
            src: v.src,
            sport,
            dst: v.dst,
            dport,
        };
        let flags = match v.l4 {
            L4::Tcp { flags, .. } => tcp_flags(flags),
            _ => TcpFlags::default(),
        };
        let id = match self.table.lookup_in2out(&key, now) {
            Some(id) => id,
            None => {
                // Only a SYN, an echo request or a UDP datagram starts a flow.
                let refused = match v.l4 {
                    L4::Tcp { .. } if !flags.syn || flags.ack => Some(Counter::DropTcpNotSyn),
                    L4::IcmpEcho { request: false, .. } => Some(Counter::DropIcmpNoFlow),
                    _ => None,
                };
                if let Some(why) = refused {
                    self.c.inc(why);
                    return Some(buf);
                }
                match self.table.create(&key, ext_addr, now) {
                    Ok(id) => {
                        self.c.inc(Counter::FlowsCreated);
                        id
                    }
                    Err(e) => {
                        self.c.inc(match e {
                            CreateError::TableFull => Counter::DropTableFull,
                            CreateError::PortsExhausted => Counter::DropPortsExhausted,
                        });
                        return Some(buf);
                    }
                }
            }
        };
        if !self.account(id, Direction::In2Out, &buf, &v, now) {
            return Some(buf);
        }
        let f = self.table.get(id);
        let (ext_addr, ext_port) = (f.ext_addr, f.ext_port);
        let next_hop = self.shared.addressing.uplink_next_hop(v.dst);
        if v.is_fragment {
            let rewrite = FragRewrite {
                end: End::Src,
                addr: ext_addr,
                egress: Side::Uplink,
                next_hop,
            };
            self.first_fragment_done(frag_key(buf.frame(), &v), rewrite, now);
        }
        wire::translate(buf.frame_mut(), &v, End::Src, ext_addr, ext_port, fit.csum);
        self.c.inc(Counter::In2outPackets);
        if self.shared.addressing.is_outside(v.dst) {
            return self.hairpin(buf, now);
        }
        self.send_on(Side::Uplink, next_hop, buf, fit)
    }

    fn out2in(&mut self, buf: Buf, v: Ipv4View, now: u64) -> Option<Buf> {
        let (Some(proto), Some((sport, dport))) = (proto(&v.l4), v.ports()) else {
            self.c.inc(Counter::DropUnsupportedProtocol);
            return Some(buf);
        };
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
        let flags = match v.l4 {
            L4::Tcp { flags, .. } => tcp_flags(flags),
            _ => TcpFlags::default(),
        };
        let id = match self.table.lookup_out2in(&key, now) {
            Some(id) => id,
            None if !self.shared.addressing.is_outside(v.dst) => {
                return self.route_in(buf, v, proto, (sport, dport), now);
            }
            // No session: a forward, or a mapping that the filtering lets
            // this remote reach (RFC 4787 REQ-8, RFC 5382 REQ-3), opens one.
            None => match self.table.inbound(&key, flags, now) {
                Ok(id) => {
                    self.c.inc(Counter::FlowsCreated);
                    id
                }
                Err(e) => {
                    self.c.inc(match e {
                        InboundError::NoMapping | InboundError::NotSyn => Counter::DropNoFlow,
                        InboundError::Filtered => Counter::DropFiltered,
                        InboundError::TableFull => Counter::DropTableFull,
                    });
                    return Some(buf);
                }
            },
        };
        let (mut buf, fit) = match self.forwardable(Side::Uplink, Side::Pod, buf, &v) {
            Ok(x) => x,
            Err(back) => return back,
        };
        if !self.account(id, Direction::Out2In, &buf, &v, now) {
            return Some(buf);
        }
        let inside = self.table.get(id).inside;
        if v.is_fragment {
            let rewrite = FragRewrite {
                end: End::Dst,
                addr: inside.src,
                egress: Side::Pod,
                next_hop: inside.src,
            };
            self.first_fragment_done(frag_key(buf.frame(), &v), rewrite, now);
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
        self.send_on(Side::Pod, inside.src, buf, fit)
    }

    /// A pod's packet to an outside address (its own or another pod's
    /// mapping, or a forward), already translated like any outbound packet:
    /// it turns around here as if it had arrived on the uplink (RFC 4787
    /// REQ-9, RFC 5382 REQ-8), with the TTL decremented once in all.
    fn hairpin(&mut self, mut buf: Buf, now: u64) -> Option<Buf> {
        self.c.inc(Counter::Hairpinned);
        let a = &self.shared.addressing;
        let (uplink_mac, pod_mac) = (a.uplink_mac, a.pod_mac);
        wire::set_macs(buf.frame_mut(), uplink_mac, pod_mac);
        wire::restore_ttl(buf.frame_mut());
        self.frame(Side::Uplink, buf, now)
    }

    /// Forwards a pod's packet to an excluded destination untranslated, as a
    /// router would, remembering the session so that its replies come back.
    fn route_out(
        &mut self,
        buf: Buf,
        v: Ipv4View,
        proto: Proto,
        ports: (u16, u16),
        now: u64,
    ) -> Option<Buf> {
        let a = &self.shared.addressing;
        let (egress, next_hop) = if a.pod_net.contains(v.dst) {
            (Side::Pod, v.dst)
        } else {
            (Side::Uplink, a.uplink_next_hop(v.dst))
        };
        let (mut buf, fit) = match self.forwardable(Side::Pod, egress, buf, &v) {
            Ok(x) => x,
            Err(back) => return back,
        };
        if egress == Side::Uplink {
            let key = InKey {
                proto,
                src: v.src,
                sport: ports.0,
                dst: v.dst,
                dport: ports.1,
            };
            if self.routed.len() >= ROUTED_MAX && !self.routed.contains_key(&key) {
                self.c.inc(Counter::DropTableFull);
                return Some(buf);
            }
            self.routed.insert(key, now);
        }
        // Same address and port: only the TTL (and its checksum) change.
        wire::translate(buf.frame_mut(), &v, End::Src, v.src, ports.0, fit.csum);
        self.c.inc(Counter::RoutedPackets);
        self.send_on(egress, next_hop, buf, fit)
    }

    /// A reply to a routed session, coming back in untranslated.
    fn route_in(
        &mut self,
        buf: Buf,
        v: Ipv4View,
        proto: Proto,
        ports: (u16, u16),
        now: u64,
    ) -> Option<Buf> {
        let (sport, dport) = match v.l4 {
            L4::IcmpEcho { id, .. } => (0, id),
            _ => ports,
        };
        let key = InKey {
            proto,
            src: v.dst,
            sport: dport,
            dst: v.src,
            dport: sport,
        };
        let Some(seen) = self.routed.get_mut(&key) else {
            self.c.inc(Counter::DropNoFlow);
            return Some(buf);
        };
        *seen = now;
        let (mut buf, fit) = match self.forwardable(Side::Uplink, Side::Pod, buf, &v) {
            Ok(x) => x,
            Err(back) => return back,
        };
        // Same address and port (or echo id): only the TTL changes.
        wire::translate(buf.frame_mut(), &v, End::Dst, v.dst, dport, fit.csum);
        self.c.inc(Counter::RoutedPackets);
        self.send_on(Side::Pod, v.dst, buf, fit)
    }

    /// Forgets idle routed sessions, once a second.
    fn sweep_routed(&mut self, now: u64) {
        if self.routed.is_empty() || now < self.routed_swept_ms + 1000 {
            return;
        }
        self.routed_swept_ms = now;
        let t = self.table.config().timeouts;
        self.routed.retain(|k, seen| {
            let idle = match k.proto {
                Proto::Tcp => t.tcp_established_ms,
                Proto::Udp => t.udp_ms,
                Proto::Icmp => t.icmp_ms,
            };
            now < *seen + idle
        });
    }

    /// Writes a translated frame to our queue of `side`, or hands it to the
    /// control thread to resolve the next hop first.
    fn emit(&mut self, side: Side, next_hop: Ipv4Addr, mut buf: Buf) -> Option<Buf> {
        let Some(&mac) = self.neighbours.get(&next_hop) else {
            let _ = self.ctrl.send(CtrlMsg::Resolve {
                side,
                next_hop,
                buf,
            });
            self.wake_ctrl = true;
            return None;
        };
        wire::set_macs(buf.frame_mut(), mac, self.shared.addressing.mac(side));
        match self.shared.send_buf(side, self.k, &buf) {
            Ok(()) => self.c.inc(tx_counter(side)),
            Err(_) => self.c.inc(Counter::TapWriteFails),
        }
        Some(buf)
    }
}
