//! A worker: owns one flow-table shard and the outside ports `p % N == k`,
//! translates the packets the io thread hands it and writes them out.
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hashbrown::HashMap;
use smoltcp::wire::EthernetAddress;

use super::io::tx_counter;
use super::stats::{Counter, Counters};
use super::{Buf, CtrlMsg, Packet, Shared, Side, WorkerMsg};
use crate::nat::{
    CreateError, Direction, FlowTable, InKey, OutKey, Proto, TcpFlags, TcpSeg, Verdict,
};
use crate::wire::{self, End, IcmpErrorKind, L4};

/// Flow slots examined for expiry per wake-up: bounded work, never a stall.
const EXPIRE_BUDGET: usize = 256;

pub(super) struct Worker {
    table: FlowTable,
    shared: Arc<Shared>,
    c: Arc<Counters>,
    rx: Receiver<WorkerMsg>,
    ctrl: Sender<CtrlMsg>,
    neighbours: HashMap<Ipv4Addr, EthernetAddress>,
}

fn tcp_flags(flags: u8) -> TcpFlags {
    TcpFlags {
        syn: flags & wire::TCP_SYN != 0,
        ack: flags & wire::TCP_ACK != 0,
        fin: flags & wire::TCP_FIN != 0,
        rst: flags & wire::TCP_RST != 0,
    }
}

/// The TCP fields the flow table tracks (`classify` checked the header).
fn tcp_seg(frame: &[u8], v: &wire::Ipv4View, flags: TcpFlags) -> TcpSeg {
    let l4 = &frame[v.l4_offset()..];
    let be32 = |at: usize| u32::from_be_bytes([l4[at], l4[at + 1], l4[at + 2], l4[at + 3]]);
    let hlen = usize::from(l4[12] >> 4) * 4;
    TcpSeg {
        flags,
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
    pub(super) fn new(
        table: FlowTable,
        shared: Arc<Shared>,
        c: Arc<Counters>,
        rx: Receiver<WorkerMsg>,
        ctrl: Sender<CtrlMsg>,
    ) -> Worker {
        Worker {
            table,
            shared,
            c,
            rx,
            ctrl,
            neighbours: HashMap::new(),
        }
    }

    pub(super) fn run(mut self) {
        loop {
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(msg) => self.handle(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let now = self.shared.now_ms();
            self.table.expire(now, EXPIRE_BUDGET);
        }
    }

    fn handle(&mut self, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Packets(batch) => {
                let now = self.shared.now_ms();
                for p in batch {
                    match p.from {
                        Side::Pod => self.in2out(p, now),
                        Side::Uplink => self.out2in(p, now),
                    }
                }
            }
            WorkerMsg::Neighbour(ip, mac) => {
                self.neighbours.insert(ip, mac);
            }
            WorkerMsg::Flows(reply) => {
                let _ = reply.send(self.table.iter().copied().collect());
            }
        }
    }

    fn drop_buf(&self, buf: Buf, why: Counter) {
        self.c.inc(why);
        self.shared.pool.put(buf);
    }

    /// Time Exceeded back to where the packet came from, from our address on that side.
    fn ttl_exceeded(&self, p: Packet) {
        let a = &self.shared.addressing;
        if wire::may_send_icmp_error(&p.view) {
            let mut out = [0u8; 640];
            let n = wire::build_icmp_error(
                &mut out,
                p.buf.frame(),
                &p.view,
                a.mac(p.from),
                a.ip(p.from),
                IcmpErrorKind::TTL_EXCEEDED,
            );
            match self.shared.tap(p.from).send(&out[..n]) {
                Ok(()) => {
                    self.c.inc(Counter::IcmpErrorsSent);
                    self.c.inc(tx_counter(p.from));
                }
                Err(_) => self.c.inc(Counter::TapWriteFails),
            }
        }
        self.drop_buf(p.buf, Counter::DropTtlExceeded);
    }

    fn in2out(&mut self, mut p: Packet, now: u64) {
        let v = p.view;
        let (Some(proto), Some((sport, dport))) = (proto(&v.l4), v.ports()) else {
            return self.drop_buf(p.buf, Counter::DropUnsupportedProtocol);
        };
        if v.ttl <= 1 {
            return self.ttl_exceeded(p);
        }
        let a = &self.shared.addressing;
        if v.total_len > a.uplink_mtu {
            return self.drop_buf(p.buf, Counter::DropTooBig);
        }
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
                // Only a SYN or an echo request (or any UDP) starts a flow.
                match v.l4 {
                    L4::Tcp { .. } if !flags.syn || flags.ack => {
                        return self.drop_buf(p.buf, Counter::DropTcpNotSyn)
                    }
                    L4::IcmpEcho { request: false, .. } => {
                        return self.drop_buf(p.buf, Counter::DropIcmpNoFlow)
                    }
                    _ => {}
                }
                match self.table.create(&key, a.uplink_ip(), now) {
                    Ok(id) => {
                        self.c.inc(Counter::FlowsCreated);
                        id
                    }
                    Err(CreateError::TableFull) => {
                        return self.drop_buf(p.buf, Counter::DropTableFull)
                    }
                    Err(CreateError::PortsExhausted) => {
                        return self.drop_buf(p.buf, Counter::DropPortsExhausted)
                    }
                }
            }
        };
        let seg = match v.l4 {
            L4::Tcp { .. } => tcp_seg(p.buf.frame(), &v, flags),
            _ => TcpSeg::NONE,
        };
        if self
            .table
            .account(id, Direction::In2Out, seg, v.total_len, now)
            == Verdict::DropInvalidRst
        {
            return self.drop_buf(p.buf, Counter::DropInvalidRst);
        }
        let f = self.table.get(id);
        let (ext_addr, ext_port) = (f.ext_addr, f.ext_port);
        wire::translate(p.buf.frame_mut(), &v, End::Src, ext_addr, ext_port);
        self.c.inc(Counter::In2outPackets);
        let next_hop = a.uplink_next_hop(v.dst);
        self.emit(Side::Uplink, next_hop, p.buf);
    }

    fn out2in(&mut self, mut p: Packet, now: u64) {
        let v = p.view;
        let (Some(proto), Some((sport, dport))) = (proto(&v.l4), v.ports()) else {
            return self.drop_buf(p.buf, Counter::DropUnsupportedProtocol);
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
        let Some(id) = self.table.lookup_out2in(&key, now) else {
            return self.drop_buf(p.buf, Counter::DropNoFlow);
        };
        if v.ttl <= 1 {
            return self.ttl_exceeded(p);
        }
        if v.total_len > self.shared.addressing.pod_mtu {
            return self.drop_buf(p.buf, Counter::DropTooBig);
        }
        let seg = match v.l4 {
            L4::Tcp { flags, .. } => tcp_seg(p.buf.frame(), &v, tcp_flags(flags)),
            _ => TcpSeg::NONE,
        };
        if self
            .table
            .account(id, Direction::Out2In, seg, v.total_len, now)
            == Verdict::DropInvalidRst
        {
            return self.drop_buf(p.buf, Counter::DropInvalidRst);
        }
        let inside = self.table.get(id).inside;
        wire::translate(p.buf.frame_mut(), &v, End::Dst, inside.src, inside.sport);
        self.c.inc(Counter::Out2inPackets);
        self.emit(Side::Pod, inside.src, p.buf);
    }

    /// Writes a translated frame to `side`, or asks the io thread to resolve
    /// the next hop first.
    fn emit(&self, side: Side, next_hop: Ipv4Addr, mut buf: Buf) {
        let Some(&mac) = self.neighbours.get(&next_hop) else {
            if self
                .ctrl
                .send(CtrlMsg::Resolve {
                    side,
                    next_hop,
                    buf,
                })
                .is_ok()
            {
                self.shared.waker.wake();
            }
            return;
        };
        wire::set_macs(buf.frame_mut(), mac, self.shared.addressing.mac(side));
        match self.shared.tap(side).send(buf.frame()) {
            Ok(()) => self.c.inc(tx_counter(side)),
            Err(_) => self.c.inc(Counter::TapWriteFails),
        }
        self.shared.pool.put(buf);
    }
}
