//! The control thread: the gateway's own stack (smoltcp answers ARP and ICMP
//! echo), the authoritative neighbour table, and ARP resolution with a few
//! packets held per unresolved next hop. Nothing here is per transit packet.
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use hashbrown::HashMap;
use smoltcp::wire::EthernetAddress;

use super::dhcp::{Change, LeaseState};
use super::failure::Failure;
use super::local::{Ask, DhcpEvent, LocalStack};
use super::stats::{Counter, Counters};
use super::{Buf, CtrlMsg, Shared, Side, WorkerMsg};
use crate::device::Poller;
use crate::wire;

/// Packets held per unresolved next hop (the kernel's unres_qlen is similar).
const PENDING_MAX: usize = 32;
/// ARP retry interval and attempts before the held packets are dropped.
const ARP_RETRY_MS: u64 = 1000;
const ARP_TRIES: u32 = 3;
/// The control thread writes on queue 0 of each device.
const QUEUE: usize = 0;

struct Pending {
    side: Side,
    frames: VecDeque<Buf>,
    last_request_ms: u64,
    tries: u32,
}

pub(super) struct Control {
    shared: Arc<Shared>,
    c: Arc<Counters>,
    workers: Vec<Sender<WorkerMsg>>,
    rx: Receiver<CtrlMsg>,
    pod_stack: LocalStack,
    uplink_stack: LocalStack,
    neighbours: HashMap<Ipv4Addr, EthernetAddress>,
    pending: HashMap<Ipv4Addr, Pending>,
    /// With `uplink.address = "dhcp"`: the lease in use (the client is a
    /// socket on `uplink_stack`).
    dhcp: Option<LeaseState>,
}

/// `uplink.address = "dhcp"`: the lease checks and the lease-time cap.
pub(super) struct DhcpSetup {
    pub(super) state: LeaseState,
    pub(super) max_lease: Option<Duration>,
}

pub(super) fn tx_counter(side: Side) -> Counter {
    match side {
        Side::Pod => Counter::PodTxFrames,
        Side::Uplink => Counter::UplinkTxFrames,
    }
}

impl Control {
    pub(super) fn new(
        shared: Arc<Shared>,
        c: Arc<Counters>,
        workers: Vec<Sender<WorkerMsg>>,
        rx: Receiver<CtrlMsg>,
        seed: u64,
        dhcp: Option<DhcpSetup>,
    ) -> Control {
        let a = shared.addressing();
        let now = shared.now_ms();
        let pod_stack =
            LocalStack::new(a.pod_mac, &pod_stack_addrs(&a), None, a.pod_mtu, now, seed);
        let (addrs, gateway) = uplink_stack_addrs(&a);
        let mut uplink_stack =
            LocalStack::new(a.uplink_mac, &addrs, gateway, a.uplink_mtu, now, seed ^ 1);
        if let Some(d) = &dhcp {
            uplink_stack.start_dhcp(d.max_lease);
        }
        Control {
            shared,
            c,
            workers,
            rx,
            pod_stack,
            uplink_stack,
            neighbours: HashMap::new(),
            pending: HashMap::new(),
            dhcp: dhcp.map(|d| d.state),
        }
    }

    pub(super) fn run(mut self) {
        let mut poller = Poller::new();
        let wake = poller.add(self.shared.ctrl_waker.as_raw_fd());
        let shared = self.shared.clone();
        let watch = shared
            .netns_watch
            .as_ref()
            .map(|(w, paths)| (poller.add(w.poll_fd()), w, paths));
        // Ask for the next hop's MAC at once, so the first packet out does not wait.
        let a = self.shared.addressing();
        if a.has_address() {
            self.send_arp_request(Side::Uplink, a.uplink_gateway);
        }
        while !self.shared.stop.load(Ordering::Relaxed) {
            #[cfg(debug_assertions)]
            self.shared.fault_point(self.workers.len());
            let _ = poller.wait(Some(Duration::from_millis(250)));
            if poller.readable(wake) {
                self.shared.ctrl_waker.drain();
            }
            if let Some((slot, w, paths)) = watch {
                if poller.readable(slot) {
                    if let Some(i) = w.gone() {
                        let side = if i == 0 { Side::Pod } else { Side::Uplink };
                        self.shared.fail(Failure::NamespaceGone {
                            side,
                            device: self.shared.name(side).to_owned(),
                            netns: paths[i].clone().unwrap_or_default(),
                        });
                    }
                }
            }
            while let Ok(msg) = self.rx.try_recv() {
                self.handle(msg);
            }
            self.retry_pending();
            self.dhcp_poll();
            self.shared
                .neighbours
                .store(self.neighbours.len() as u64, Ordering::Relaxed);
        }
    }

    fn handle(&mut self, msg: CtrlMsg) {
        match msg {
            CtrlMsg::Local { side, frame } => {
                self.shared.local.done(side, &frame);
                self.local(side, &frame);
            }
            CtrlMsg::Seen(ip, mac) => self.learn(ip, mac),
            CtrlMsg::Resolve {
                side,
                next_hop,
                buf,
            } => self.resolve(side, next_hop, buf),
        }
    }

    /// Feeds an ARP or echo frame to smoltcp; learns the ARP sender.
    ///
    /// smoltcp answers ARP only from senders inside the interface's subnet
    /// and knows nothing of SNAT pool addresses, while Linux answers any
    /// request for a local address (`arp_ignore = 0`), and a kernel next hop
    /// asks with whatever source address its packet has (a server's loopback
    /// address, say). Those requests are answered here.
    ///
    /// Every request (ARP or echo) takes a token of its side's reply limit
    /// (`local::ReplyLimit`) first; without one it is dropped unanswered
    /// (`drop_local_rate_limited`). ARP replies to the gateway are always
    /// learned from.
    fn local(&mut self, side: Side, frame: &[u8]) {
        let now = self.shared.now_ms();
        let ask = match wire::classify(frame) {
            Ok(wire::Classified::Arp(smoltcp::wire::ArpRepr::EthernetIpv4 {
                operation,
                source_hardware_addr: mac,
                source_protocol_addr: ip,
                target_protocol_addr: target,
                ..
            })) => {
                let a = self.shared.addressing();
                let on_link = a.net(side).contains(ip) && ip != a.ip(side);
                if on_link && mac.is_unicast() {
                    self.learn(ip, mac);
                }
                let stack = match side {
                    Side::Pod => &mut self.pod_stack,
                    Side::Uplink => &mut self.uplink_stack,
                };
                let request = operation == smoltcp::wire::ArpOperation::Request;
                if request && !stack.allow(Ask::Arp, now) {
                    self.c.inc(Counter::DropLocalRateLimited);
                    return;
                }
                let smoltcp_has =
                    target == a.ip(side) || (side == Side::Pod && target == a.uplink_ip());
                if !(on_link && smoltcp_has) {
                    self.c.inc(Counter::LocalStackFrames);
                    if request && mac.is_unicast() {
                        let mut out = [0u8; wire::ARP_FRAME_MAX];
                        let n = wire::build_arp_reply(&mut out, a.mac(side), target, mac, ip);
                        match self.shared.send_frame(side, QUEUE, &out[..n]) {
                            Ok(()) => self.c.inc(tx_counter(side)),
                            Err(_) => self.c.inc(Counter::TapWriteFails),
                        }
                    }
                    return;
                }
                None
            }
            _ => Some(Ask::Echo),
        };
        let stack = match side {
            Side::Pod => &mut self.pod_stack,
            Side::Uplink => &mut self.uplink_stack,
        };
        if let Some(ask) = ask {
            if !stack.allow(ask, now) {
                self.c.inc(Counter::DropLocalRateLimited);
                return;
            }
        }
        self.c.inc(Counter::LocalStackFrames);
        let mut sent = 0;
        for out in stack.input(frame, now) {
            match self.shared.send_frame(side, QUEUE, &out) {
                Ok(()) => sent += 1,
                Err(_) => self.c.inc(Counter::TapWriteFails),
            }
        }
        self.c.add(tx_counter(side), sent);
    }

    /// Records a neighbour; on news, tells every worker and releases held packets.
    fn learn(&mut self, ip: Ipv4Addr, mac: EthernetAddress) {
        if self.neighbours.get(&ip) == Some(&mac) {
            return;
        }
        self.neighbours.insert(ip, mac);
        self.c.inc(Counter::NeighboursLearned);
        for (k, w) in self.workers.iter().enumerate() {
            if w.send(WorkerMsg::Neighbour(ip, mac)).is_ok() {
                self.shared.wakers[k].wake();
            }
        }
        if let Some(p) = self.pending.remove(&ip) {
            for buf in p.frames {
                self.send_to(p.side, mac, buf);
            }
        }
    }

    fn send_to(&self, side: Side, mac: EthernetAddress, mut buf: Buf) {
        wire::set_macs(buf.frame_mut(), mac, self.shared.addressing().mac(side));
        match self.shared.send_buf(side, QUEUE, &buf) {
            Ok(()) => self.c.inc(tx_counter(side)),
            Err(_) => self.c.inc(Counter::TapWriteFails),
        }
        self.shared.pool.put(buf);
    }

    fn resolve(&mut self, side: Side, next_hop: Ipv4Addr, buf: Buf) {
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
        let a = self.shared.addressing();
        let mut out = [0u8; wire::ARP_FRAME_MAX];
        let n = wire::build_arp_request(&mut out, a.mac(side), a.ip(side), target);
        match self.shared.send_frame(side, QUEUE, &out[..n]) {
            Ok(()) => {
                self.c.inc(Counter::ArpRequestsSent);
                self.c.inc(tx_counter(side));
            }
            Err(_) => self.c.inc(Counter::TapWriteFails),
        }
    }
}

/// The pod stack answers ping on the gateway's pod address and on the
/// outside address (when there is one).
fn pod_stack_addrs(a: &super::Addressing) -> Vec<(Ipv4Addr, u8)> {
    let mut v = vec![(a.pod_ip(), a.pod_net.prefix_len)];
    if a.has_address() {
        v.push((a.uplink_ip(), 32));
    }
    v
}

/// The uplink stack's address and default route; none without a lease.
fn uplink_stack_addrs(a: &super::Addressing) -> (Vec<(Ipv4Addr, u8)>, Option<Ipv4Addr>) {
    if a.has_address() {
        (
            vec![(a.uplink_ip(), a.uplink_net.prefix_len)],
            Some(a.uplink_gateway),
        )
    } else {
        (Vec::new(), None)
    }
}

/// A line on stderr (a closed stderr is ignored): the few DHCP events
/// that change the outside address, once each.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "tapnat: {line}");
}

impl Control {
    /// With DHCP: lets the client send what is due and applies its news.
    fn dhcp_poll(&mut self) {
        if self.dhcp.is_none() {
            return;
        }
        let now = self.shared.now_ms();
        let mut sent = 0;
        for out in self.uplink_stack.poll(now) {
            match self.shared.send_frame(Side::Uplink, QUEUE, &out) {
                Ok(()) => sent += 1,
                Err(_) => self.c.inc(Counter::TapWriteFails),
            }
        }
        self.c.add(tx_counter(Side::Uplink), sent);
        while let Some(event) = self.uplink_stack.dhcp_event() {
            let Some(state) = self.dhcp.as_mut() else {
                return;
            };
            let change = match event {
                DhcpEvent::Configured(offer) => {
                    let (change, refused) = state.configured(offer, now);
                    if let Some(why) = refused {
                        say(format_args!(
                            "DHCP lease of {} not used: {why}",
                            offer.address
                        ));
                    }
                    change
                }
                DhcpEvent::Deconfigured => state.deconfigured(),
            };
            let lease = state.current();
            *self
                .shared
                .lease
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = lease;
            if let Change::Readdress { old, new } = change {
                self.readdress(old, new);
            }
        }
    }

    /// The outside address or next hop changed: both stacks and every
    /// worker take the new one (the workers flush the flows on the old
    /// address and move the forwards, see `Worker::readdress`).
    fn readdress(
        &mut self,
        old: Option<crate::net::Ipv4Net>,
        new: Option<(crate::net::Ipv4Net, Ipv4Addr)>,
    ) {
        let (_, a) = self
            .shared
            .publish_addressing(&self.workers, |cur| cur.with_uplink(new));
        let (addrs, gateway) = uplink_stack_addrs(&a);
        self.uplink_stack.set_addrs(&addrs, gateway);
        self.pod_stack.set_addrs(&pod_stack_addrs(&a), None);
        self.c.inc(Counter::UplinkAddressChanges);
        match (old, new) {
            (None, Some((net, gw))) => say(format_args!("uplink address {net} via {gw} (DHCP)")),
            (Some(o), Some((net, gw))) if o.addr != net.addr => say(format_args!(
                "uplink address changed from {o} to {net} via {gw} (DHCP): flows on {} flushed",
                o.addr
            )),
            (Some(_), Some((_, gw))) => say(format_args!("uplink next hop now {gw} (DHCP)")),
            (Some(o), None) => say(format_args!(
                "uplink DHCP lease of {o} lost: flows on {} flushed; outbound traffic is dropped until a new lease",
                o.addr
            )),
            (None, None) => {}
        }
        if let Some((_, gw)) = new {
            self.send_arp_request(Side::Uplink, gw);
        }
    }
}
