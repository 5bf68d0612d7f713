//! The control thread: the gateway's own stack (smoltcp answers ARP and ICMP
//! echo), the authoritative neighbour table ([`super::neighbour`]: aging,
//! probing, a few packets held per unresolved next hop, Host Unreachable
//! when resolution fails). Nothing here is per transit packet.
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use smoltcp::wire::EthernetAddress;

use super::dhcp::{Change, LeaseState};
use super::failure::Failure;
use super::local::{Ask, DhcpEvent, LocalStack};
use super::neighbour::{ArpKind, Effect, Event, Params, Refused, Table};
use super::stats::{Counter, Counters};
use super::{Buf, CtrlMsg, Shared, Side, WorkerMsg};
use crate::device::Poller;
use crate::wire::icmp::IcmpRateLimit;
use crate::wire::{self, IcmpErrorKind};

/// While the raw uplink's link is down, the DHCP client starts discovery
/// over this often, so a lease follows soon after the link is back.
const LINK_DOWN_DISCOVER_MS: u64 = 1000;
/// The control thread writes on queue 0 of each device.
const QUEUE: usize = 0;
/// The neighbour timers run at most this often.
const TICK_MS: u64 = 100;
/// Destination Unreachable, Host Unreachable (RFC 792, RFC 1812 §5.2.7.1).
const HOST_UNREACHABLE: IcmpErrorKind = IcmpErrorKind {
    icmp_type: wire::ICMP_DEST_UNREACHABLE,
    code: 1,
    rest: 0,
};

pub(super) struct Control {
    shared: Arc<Shared>,
    c: Arc<Counters>,
    workers: Vec<Sender<WorkerMsg>>,
    rx: Receiver<CtrlMsg>,
    pod_stack: LocalStack,
    uplink_stack: LocalStack,
    /// The neighbour table; held frames carry their egress side.
    table: Table<(Side, Buf)>,
    /// Reused for the table's effects.
    effects: Vec<Effect<(Side, Buf)>>,
    ticked_ms: u64,
    /// Host Unreachable errors, as Linux's `icmp_msgs_per_sec`/`_burst`.
    icmp_limit: IcmpRateLimit,
    /// With `uplink.address = "dhcp"`: the lease in use (the client is a
    /// socket on `uplink_stack`).
    dhcp: Option<LeaseState>,
    /// The raw uplink's link was seen down (and the lease dropped for it),
    /// and when the DHCP client was last started over since.
    link_down: bool,
    link_down_retry_ms: u64,
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
        params: Params,
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
            dhcp: dhcp.map(|d| d.state),
            link_down: false,
            link_down_retry_ms: 0,
            table: Table::new(params, seed ^ 2),
            effects: Vec::new(),
            ticked_ms: 0,
            icmp_limit: IcmpRateLimit::new(
                IcmpRateLimit::KERNEL_PER_SEC,
                IcmpRateLimit::KERNEL_BURST,
            ),
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
            let mut out = std::mem::take(&mut self.effects);
            self.table
                .ask(a.uplink_gateway, self.shared.now_ms(), &mut out);
            self.carry_out(&mut out);
            self.effects = out;
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
            self.tick();
            self.dhcp_poll();
        }
    }

    fn handle(&mut self, msg: CtrlMsg) {
        match msg {
            CtrlMsg::Local { side, frame } => {
                self.shared.local.done(side, &frame);
                self.local(side, &frame);
            }
            CtrlMsg::Neighbour(e) => self.event(e),
            CtrlMsg::Resolve {
                side,
                next_hop,
                buf,
            } => {
                self.shared.resolving.fetch_sub(1, Ordering::Relaxed);
                self.resolve(side, next_hop, buf)
            }
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

    /// An ARP packet addressed to the gateway (a request for one of its
    /// addresses, a reply to its request) from `ip` with MAC `mac`.
    fn learn(&mut self, ip: Ipv4Addr, mac: EthernetAddress) {
        let now = self.shared.now_ms();
        let mut out = std::mem::take(&mut self.effects);
        self.table.arp(ip, mac, ArpKind::ToUs, now, &mut out);
        self.carry_out(&mut out);
        self.effects = out;
    }

    /// What a worker noticed about a neighbour.
    fn event(&mut self, e: Event) {
        let now = self.shared.now_ms();
        let mut out = std::mem::take(&mut self.effects);
        match e {
            Event::Used(ip) => self.table.used(ip, now),
            Event::Confirmed(ip, mac) => self.table.confirmed(ip, mac, now),
            Event::Arp { ip, mac, kind } => self.table.arp(ip, mac, kind, now, &mut out),
        }
        self.carry_out(&mut out);
        self.effects = out;
    }

    fn resolve(&mut self, side: Side, next_hop: Ipv4Addr, buf: Buf) {
        let now = self.shared.now_ms();
        let mut out = std::mem::take(&mut self.effects);
        self.table.resolve(next_hop, (side, buf), now, &mut out);
        self.carry_out(&mut out);
        self.effects = out;
    }

    /// The table's timers, at most every [`TICK_MS`].
    fn tick(&mut self) {
        let now = self.shared.now_ms();
        if now < self.ticked_ms + TICK_MS {
            return;
        }
        self.ticked_ms = now;
        let mut out = std::mem::take(&mut self.effects);
        self.table.tick(now, &mut out);
        self.carry_out(&mut out);
        self.effects = out;
        let (resolved, unresolved) = self.table.counts();
        self.shared
            .neighbours
            .store((resolved + unresolved) as u64, Ordering::Relaxed);
    }

    fn carry_out(&mut self, out: &mut Vec<Effect<(Side, Buf)>>) {
        for e in out.drain(..) {
            match e {
                Effect::Tell(ip, news) => {
                    for (k, w) in self.workers.iter().enumerate() {
                        // A worker's queue is bounded; the news is small and
                        // rare, so a full queue is waited on.
                        if w.send(WorkerMsg::Neighbour(ip, news)).is_ok() {
                            self.shared.wakers[k].wake();
                        }
                    }
                }
                Effect::Send(mac, (side, buf)) => self.send_to(side, mac, buf),
                Effect::Solicit { ip, to } => self.send_arp_request(self.side_of(ip), ip, to),
                Effect::SolicitLimited(_) => self.c.inc(Counter::ArpRequestsRateLimited),
                Effect::Unreachable((side, buf)) => {
                    self.c.inc(Counter::DropNeighbourUnresolved);
                    self.host_unreachable(side, buf);
                }
                Effect::Refused(why, (_, buf)) => {
                    self.c.inc(match why {
                        Refused::QueueFull => Counter::DropNeighbourQueueFull,
                        Refused::TableFull => Counter::DropNeighbourTableFull,
                    });
                    self.shared.pool.put(buf);
                }
                Effect::Learned(..) => self.c.inc(Counter::NeighboursLearned),
                Effect::Locked(_) => self.c.inc(Counter::NeighbourUpdatesLocked),
                Effect::Removed(_) => self.c.inc(Counter::NeighboursRemoved),
            }
        }
    }

    /// Which side an on-link address is on.
    fn side_of(&self, ip: Ipv4Addr) -> Side {
        if self.shared.addressing().pod_net.contains(ip) {
            Side::Pod
        } else {
            Side::Uplink
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

    /// Resolution of the next hop of `buf` (a packet on its way out of
    /// `egress`, translated) failed: its sender gets Host Unreachable, as
    /// from a Linux router (`arp_error_report`), within the rate limit.
    ///
    /// A packet a pod sent untranslated (pod to pod, or to an excluded
    /// destination) is answered here from the gateway's pod address. A
    /// translated one is quoted as it left, so the error is made as if the
    /// egress side had sent it and given to a worker, which translates it
    /// back to the sender (RFC 5508 REQ-3..5), as conntrack does for the
    /// kernel's own error.
    fn host_unreachable(&mut self, egress: Side, buf: Buf) {
        let frame = buf.frame();
        let Ok(wire::Classified::Ipv4(v)) = wire::classify(frame) else {
            return self.shared.pool.put(buf);
        };
        if !wire::may_send_icmp_error(&v) {
            return self.shared.pool.put(buf);
        }
        if !self.icmp_limit.allow(self.shared.now_ms()) {
            self.c.inc(Counter::IcmpErrorsRateLimited);
            return self.shared.pool.put(buf);
        }
        let a = self.shared.addressing();
        let mut out = [0u8; wire::ICMP_ERROR_FRAME_MAX];
        if a.pod_net.contains(v.src) {
            let n = wire::build_icmp_error(
                &mut out,
                frame,
                &v,
                a.pod_mac,
                a.pod_ip(),
                HOST_UNREACHABLE,
            );
            self.shared.pool.put(buf);
            self.c.inc(Counter::HostUnreachableSent);
            self.c.inc(Counter::IcmpErrorsSent);
            match self.shared.send_frame(Side::Pod, QUEUE, &out[..n]) {
                Ok(()) => self.c.inc(tx_counter(Side::Pod)),
                Err(_) => self.c.inc(Counter::TapWriteFails),
            }
            return;
        }
        // As if from the egress side: from the unreachable pod itself to the
        // remote (the worker rewrites the source to the outside address), or
        // from the gateway's pod address to our outside address (the worker
        // rewrites the destination to the pod).
        let from = match egress {
            Side::Pod => v.dst,
            Side::Uplink => a.pod_ip(),
        };
        let n = wire::build_icmp_error(&mut out, frame, &v, a.mac(egress), from, HOST_UNREACHABLE);
        wire::set_macs(&mut out[..n], a.mac(egress), a.mac(egress));
        self.shared.pool.put(buf);
        let Some(b) = self.shared.pool.frame(&out[..n]) else {
            return;
        };
        self.c.inc(Counter::HostUnreachableSent);
        match self.workers[0].try_send(WorkerMsg::Frame(egress, b)) {
            Ok(()) => self.shared.wakers[0].wake(),
            Err(e) => {
                if let WorkerMsg::Frame(_, b) = e.into_inner() {
                    self.shared.pool.put(b);
                }
            }
        }
    }

    /// An ARP request for `target`: broadcast, or unicast to `to` (a probe).
    fn send_arp_request(&self, side: Side, target: Ipv4Addr, to: Option<EthernetAddress>) {
        let a = self.shared.addressing();
        let mut out = [0u8; wire::ARP_FRAME_MAX];
        let n = wire::build_arp_request(&mut out, a.mac(side), a.ip(side), target);
        if let Some(mac) = to {
            wire::set_macs(&mut out[..n], mac, a.mac(side));
        }
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

/// A log line (info): the few DHCP events that change the outside
/// address, once each.
fn say(line: std::fmt::Arguments<'_>) {
    tracing::info!("{line}");
}

impl Control {
    /// With DHCP: lets the client send what is due and applies its news.
    fn dhcp_poll(&mut self) {
        if self.dhcp.is_none() {
            return;
        }
        let now = self.shared.now_ms();
        let down = self.shared.device(Side::Uplink, QUEUE).link_down();
        if down != self.link_down {
            self.link_down = down;
            self.link_down_retry_ms = now;
            if down {
                self.link_lost();
            } else {
                say(format_args!("uplink link up again (DHCP)"));
                self.uplink_stack.reset_dhcp();
            }
        } else if down && now >= self.link_down_retry_ms + LINK_DOWN_DISCOVER_MS {
            // Nothing is read while the link is down, so its coming back
            // shows only as an answer: discover again every second rather
            // than at the client's backoff (10 s and more).
            self.link_down_retry_ms = now;
            self.uplink_stack.reset_dhcp();
        }
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

    /// The raw uplink's link was set down (`NETDEV_DOWN`): as MASQUERADE
    /// does then, every flow on the address goes (the lease is given up
    /// and the client starts over, so a new lease is asked for when the
    /// link comes back).
    fn link_lost(&mut self) {
        say(format_args!(
            "uplink {} went down (DHCP): giving up the lease",
            self.shared.name(Side::Uplink)
        ));
        self.uplink_stack.reset_dhcp();
        let Some(state) = self.dhcp.as_mut() else {
            return;
        };
        let change = state.deconfigured();
        *self
            .shared
            .lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = state.current();
        if let Change::Readdress { old, new } = change {
            self.readdress(old, new);
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
            let mut out = std::mem::take(&mut self.effects);
            self.table.ask(gw, self.shared.now_ms(), &mut out);
            self.carry_out(&mut out);
            self.effects = out;
        }
    }
}
