//! The io thread: reads both devices, classifies, dispatches, and runs the
//! gateway's own stack and neighbour resolution.
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use hashbrown::HashMap;
use smoltcp::wire::{ArpOperation, ArpRepr, EthernetAddress};

use super::local::LocalStack;
use super::stats::{Counter, Counters};
use super::{Buf, CtrlMsg, Packet, Shared, Side, WorkerMsg};
use crate::device::Poller;
use crate::wire::{self, Classified, Ipv4View, L4};

/// Frames read from one device before looking at the other.
const READ_BATCH: usize = 64;
/// Packets held per unresolved next hop (the kernel's unres_qlen is similar).
const PENDING_MAX: usize = 32;
/// ARP retry interval and attempts before the held packets are dropped.
const ARP_RETRY_MS: u64 = 1000;
const ARP_TRIES: u32 = 3;

struct Pending {
    side: Side,
    frames: VecDeque<Buf>,
    last_request_ms: u64,
    tries: u32,
}

pub(super) struct IoLoop {
    shared: Arc<Shared>,
    c: Arc<Counters>,
    workers: Vec<Sender<WorkerMsg>>,
    batches: Vec<Vec<Packet>>,
    ctrl: Receiver<CtrlMsg>,
    pod_stack: LocalStack,
    uplink_stack: LocalStack,
    neighbours: HashMap<Ipv4Addr, EthernetAddress>,
    pending: HashMap<Ipv4Addr, Pending>,
}

impl IoLoop {
    pub(super) fn new(
        shared: Arc<Shared>,
        c: Arc<Counters>,
        workers: Vec<Sender<WorkerMsg>>,
        ctrl: Receiver<CtrlMsg>,
        seed: u64,
    ) -> IoLoop {
        let a = &shared.addressing;
        let now = shared.now_ms();
        let pod_stack = LocalStack::new(
            a.pod_mac,
            &[(a.pod_ip(), a.pod_net.prefix_len), (a.uplink_ip(), 32)],
            None,
            a.pod_mtu,
            now,
            seed,
        );
        let uplink_stack = LocalStack::new(
            a.uplink_mac,
            &[(a.uplink_ip(), a.uplink_net.prefix_len)],
            Some(a.uplink_gateway),
            a.uplink_mtu,
            now,
            seed ^ 1,
        );
        let batches = workers
            .iter()
            .map(|_| Vec::with_capacity(READ_BATCH))
            .collect();
        IoLoop {
            shared,
            c,
            workers,
            batches,
            ctrl,
            pod_stack,
            uplink_stack,
            neighbours: HashMap::new(),
            pending: HashMap::new(),
        }
    }

    pub(super) fn run(mut self) {
        let mut poller = Poller::new();
        let pod_slot = poller.add(self.shared.pod.as_raw_fd());
        let uplink_slot = poller.add(self.shared.uplink.as_raw_fd());
        let wake_slot = poller.add(self.shared.waker.as_raw_fd());
        // Ask for the next hop's MAC at once, so the first packet out does not wait.
        let gw = self.shared.addressing.uplink_gateway;
        self.send_arp_request(Side::Uplink, gw);
        while !self.shared.stop.load(Ordering::Relaxed) {
            if poller.wait(Some(Duration::from_millis(250))).is_err() {
                self.c.inc(Counter::TapReadFails);
                continue;
            }
            if poller.readable(wake_slot) {
                self.shared.waker.drain();
            }
            if poller.readable(pod_slot) {
                self.read_side(Side::Pod);
            }
            if poller.readable(uplink_slot) {
                self.read_side(Side::Uplink);
            }
            self.flush_batches();
            while let Ok(msg) = self.ctrl.try_recv() {
                self.control(msg);
            }
            self.retry_pending();
        }
    }

    fn read_side(&mut self, side: Side) {
        for _ in 0..READ_BATCH {
            let mut buf = self.shared.pool.get();
            match self.shared.tap(side).recv(&mut buf.data) {
                Ok(n) => {
                    buf.len = n;
                    self.c.inc(match side {
                        Side::Pod => Counter::PodRxFrames,
                        Side::Uplink => Counter::UplinkRxFrames,
                    });
                    self.frame(side, buf);
                }
                Err(e) => {
                    self.shared.pool.put(buf);
                    if e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::Interrupted {
                        self.c.inc(Counter::TapReadFails);
                    }
                    return;
                }
            }
        }
    }

    fn drop_buf(&self, buf: Buf, why: Counter) {
        self.c.inc(why);
        self.shared.pool.put(buf);
    }

    /// Classifies one frame and sends it where it belongs.
    fn frame(&mut self, side: Side, buf: Buf) {
        let a = &self.shared.addressing;
        let view = match wire::classify(buf.frame()) {
            Err(m) => return self.drop_buf(buf, Counter::malformed(m)),
            Ok(Classified::OtherEthertype(_)) => {
                return self.drop_buf(buf, Counter::DropOtherEthertype)
            }
            Ok(Classified::Arp(repr)) => return self.arp(side, buf, repr),
            Ok(Classified::Ipv4(v)) => v,
        };
        let (dst_mac, src_mac) = wire::macs(buf.frame());
        if dst_mac != a.mac(side) && !dst_mac.is_broadcast() {
            return self.drop_buf(buf, Counter::DropNotForUs);
        }
        match side {
            Side::Pod => {
                if a.pod_net.contains(view.src) {
                    self.learn(view.src, src_mac);
                }
                let a = &self.shared.addressing;
                if a.is_local(view.dst) {
                    return self.for_gateway(side, buf, &view);
                }
                if view.dst.is_broadcast()
                    || view.dst.is_multicast()
                    || view.dst == a.pod_net.broadcast()
                {
                    return self.drop_buf(buf, Counter::DropNoRoute);
                }
                match a.masquerades(view.src, view.dst) {
                    None => return self.drop_buf(buf, Counter::DropSpoofedSource),
                    Some(false) => return self.drop_buf(buf, Counter::DropNoRoute),
                    Some(true) => {}
                }
                match view.l4 {
                    L4::Tcp { sport, .. } | L4::Udp { sport, .. } => {
                        self.dispatch(sport, side, buf, view)
                    }
                    L4::IcmpEcho { id, .. } => self.dispatch(id, side, buf, view),
                    L4::Fragment => self.drop_buf(buf, Counter::DropFragment),
                    L4::IcmpError { .. } | L4::IcmpOther { .. } | L4::Other => {
                        self.drop_buf(buf, Counter::DropUnsupportedProtocol)
                    }
                }
            }
            Side::Uplink => {
                if view.dst != a.uplink_ip() {
                    return self.drop_buf(buf, Counter::DropNotForUs);
                }
                match view.l4 {
                    L4::IcmpEcho { request: true, .. } => self.for_gateway(side, buf, &view),
                    L4::IcmpEcho { request: false, id } => self.dispatch(id, side, buf, view),
                    L4::Tcp { dport, .. } | L4::Udp { dport, .. } => {
                        self.dispatch(dport, side, buf, view)
                    }
                    L4::Fragment => self.drop_buf(buf, Counter::DropFragment),
                    L4::IcmpError { .. } => self.drop_buf(buf, Counter::DropIcmpError),
                    L4::IcmpOther { .. } | L4::Other => self.drop_buf(buf, Counter::DropToGateway),
                }
            }
        }
    }

    fn dispatch(&mut self, port: u16, from: Side, buf: Buf, view: Ipv4View) {
        let k = usize::from(port) % self.workers.len();
        self.batches[k].push(Packet { buf, view, from });
        if self.batches[k].len() >= READ_BATCH {
            self.flush(k);
        }
    }

    fn flush(&mut self, k: usize) {
        let batch = std::mem::replace(&mut self.batches[k], Vec::with_capacity(READ_BATCH));
        if let Err(e) = self.workers[k].send(WorkerMsg::Packets(batch)) {
            // Only when the worker has gone (shutdown): give the buffers back.
            if let WorkerMsg::Packets(b) = e.into_inner() {
                for p in b {
                    self.shared.pool.put(p.buf);
                }
            }
        }
    }

    fn flush_batches(&mut self) {
        for k in 0..self.batches.len() {
            if !self.batches[k].is_empty() {
                self.flush(k);
            }
        }
    }

    /// ICMP echo requests to the gateway's own addresses go to smoltcp;
    /// anything else addressed to the gateway is dropped silently (RFC 5382 REQ-4).
    fn for_gateway(&mut self, side: Side, buf: Buf, view: &Ipv4View) {
        match view.l4 {
            L4::IcmpEcho { request: true, .. } if !view.is_fragment => self.local(side, buf),
            _ => self.drop_buf(buf, Counter::DropToGateway),
        }
    }

    fn local(&mut self, side: Side, buf: Buf) {
        self.c.inc(Counter::LocalStackFrames);
        let now = self.shared.now_ms();
        let stack = match side {
            Side::Pod => &mut self.pod_stack,
            Side::Uplink => &mut self.uplink_stack,
        };
        let tap = self.shared.tap(side);
        let mut sent = 0;
        for out in stack.input(buf.frame(), now) {
            if tap.send(&out).is_ok() {
                sent += 1;
            } else {
                self.c.inc(Counter::TapWriteFails);
            }
        }
        self.c.add(tx_counter(side), sent);
        self.shared.pool.put(buf);
    }

    fn arp(&mut self, side: Side, buf: Buf, repr: ArpRepr) {
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = repr
        else {
            return self.drop_buf(buf, Counter::DropBadArp);
        };
        let a = &self.shared.addressing;
        let net = a.net(side);
        let ours = target_protocol_addr == a.ip(side)
            || (side == Side::Pod && target_protocol_addr == a.uplink_ip());
        let learnable = net.contains(source_protocol_addr)
            && source_protocol_addr != a.ip(side)
            && source_hardware_addr.is_unicast();
        if learnable
            && (ours
                || operation == ArpOperation::Reply
                || self.pending.contains_key(&source_protocol_addr))
        {
            self.learn(source_protocol_addr, source_hardware_addr);
        }
        if ours {
            self.local(side, buf);
        } else {
            self.drop_buf(buf, Counter::DropArpIgnored);
        }
    }

    /// Records a neighbour; on news, tells every worker and releases held packets.
    fn learn(&mut self, ip: Ipv4Addr, mac: EthernetAddress) {
        if self.neighbours.get(&ip) == Some(&mac) {
            return;
        }
        self.neighbours.insert(ip, mac);
        self.c.inc(Counter::NeighboursLearned);
        for w in &self.workers {
            let _ = w.send(WorkerMsg::Neighbour(ip, mac));
        }
        if let Some(p) = self.pending.remove(&ip) {
            for buf in p.frames {
                self.send_to(p.side, mac, buf);
            }
        }
    }

    fn send_to(&self, side: Side, mac: EthernetAddress, mut buf: Buf) {
        wire::set_macs(buf.frame_mut(), mac, self.shared.addressing.mac(side));
        match self.shared.tap(side).send(buf.frame()) {
            Ok(()) => self.c.inc(tx_counter(side)),
            Err(_) => self.c.inc(Counter::TapWriteFails),
        }
        self.shared.pool.put(buf);
    }

    fn control(&mut self, msg: CtrlMsg) {
        match msg {
            CtrlMsg::Resolve {
                side,
                next_hop,
                buf,
            } => {
                if let Some(&mac) = self.neighbours.get(&next_hop) {
                    return self.send_to(side, mac, buf);
                }
                let now = self.shared.now_ms();
                let p = self.pending.entry(next_hop).or_insert_with(|| Pending {
                    side,
                    frames: VecDeque::new(),
                    last_request_ms: 0,
                    tries: 0,
                });
                if p.frames.len() >= PENDING_MAX {
                    self.c.inc(Counter::DropNeighbourQueueFull);
                    self.shared.pool.put(buf);
                } else {
                    p.frames.push_back(buf);
                }
                if p.tries == 0 {
                    p.tries = 1;
                    p.last_request_ms = now;
                    self.send_arp_request(side, next_hop);
                }
            }
        }
    }

    fn retry_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let now = self.shared.now_ms();
        let mut ask = Vec::new();
        let mut dropped = Vec::new();
        for (ip, p) in self.pending.iter_mut() {
            if now.saturating_sub(p.last_request_ms) < ARP_RETRY_MS {
                continue;
            }
            if p.tries >= ARP_TRIES {
                dropped.push(*ip);
            } else {
                p.tries += 1;
                p.last_request_ms = now;
                ask.push((p.side, *ip));
            }
        }
        for ip in dropped {
            if let Some(p) = self.pending.remove(&ip) {
                self.c
                    .add(Counter::DropNeighbourUnresolved, p.frames.len() as u64);
                for b in p.frames {
                    self.shared.pool.put(b);
                }
            }
        }
        for (side, ip) in ask {
            self.send_arp_request(side, ip);
        }
    }

    fn send_arp_request(&self, side: Side, target: Ipv4Addr) {
        let a = &self.shared.addressing;
        let mut out = [0u8; 64];
        let n = wire::build_arp_request(&mut out, a.mac(side), a.ip(side), target);
        match self.shared.tap(side).send(&out[..n]) {
            Ok(()) => {
                self.c.inc(Counter::ArpRequestsSent);
                self.c.inc(tx_counter(side));
            }
            Err(_) => self.c.inc(Counter::TapWriteFails),
        }
    }
}

pub(super) fn tx_counter(side: Side) -> Counter {
    match side {
        Side::Pod => Counter::PodTxFrames,
        Side::Uplink => Counter::UplinkTxFrames,
    }
}
