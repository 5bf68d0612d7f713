//! The gateway's own IP stack: smoltcp answers ARP and ICMP echo for the
//! gateway's addresses. Only those frames are fed to it (never `any_ip`), so
//! it never sends a RST or a port unreachable for traffic that has no flow
//! (RFC 5382 REQ-4). With `uplink.address = "dhcp"` the uplink stack also
//! runs smoltcp's DHCPv4 client, fed the DHCP replies the classifier picks.
//!
//! # Bounds
//!
//! A frame for the local stack is copied out of its pool buffer into one of
//! its own length ([`LocalFrame`]) before it is queued for the control
//! thread, and at most [`LOCAL_QUEUED`] such frames wait per side and kind,
//! ARP or not ([`LocalBudget`]): a flood at the gateway's address pins at
//! most `4 x LOCAL_QUEUED` frames of at most the MTU, and an echo flood
//! never takes the places of the ARP requests. Answers are rate-limited
//! per side, ARP and echo apart ([`ReplyLimit`]), so that an echo flood
//! neither makes the gateway a traffic amplifier nor starves the ARP
//! answers its neighbours need.
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use crate::policy::Side;

/// A frame for the local stack, copied into a buffer of its own length.
pub type LocalFrame = Box<[u8]>;

/// Frames waiting for the local stack, per side and kind (ARP, the rest).
pub const LOCAL_QUEUED: usize = 128;
/// Answers (echo replies, or ARP replies) per second and side, and the
/// burst allowed above that rate.
pub const REPLIES_PER_SEC: u64 = 1000;
pub const REPLY_BURST: u64 = 200;

/// Counts the frames queued for the local stack, per side and kind, so a
/// worker can refuse one more without asking the control thread. Shared by
/// every thread (relaxed atomics: a bound, not a ledger).
#[derive(Debug, Default)]
pub struct LocalBudget {
    queued: [AtomicUsize; 4],
}

fn index(side: Side, ask: Ask) -> usize {
    let s = match side {
        Side::Pod => 0,
        Side::Uplink => 2,
    };
    s + match ask {
        Ask::Arp => 0,
        Ask::Echo => 1,
    }
}

impl LocalBudget {
    /// Takes a place for `frame` on `side`; false when [`LOCAL_QUEUED`] of
    /// its kind are already waiting there.
    pub fn take(&self, side: Side, frame: &[u8]) -> bool {
        let q = &self.queued[index(side, Ask::of(frame))];
        if q.fetch_add(1, Ordering::Relaxed) >= LOCAL_QUEUED {
            q.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }
    /// Gives back the place of `frame`: handled, or not queued after all.
    pub fn done(&self, side: Side, frame: &[u8]) {
        let _ = self.queued[index(side, Ask::of(frame))].fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |n| n.checked_sub(1),
        );
    }
    /// Frames of kind `ask` waiting on `side` now.
    #[cfg(test)]
    pub fn queued(&self, side: Side, ask: Ask) -> usize {
        self.queued[index(side, ask)].load(Ordering::Relaxed)
    }
}

/// A token bucket: `rate` tokens a second up to `burst`, kept in
/// thousandths of a token so that rounding never grows it.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    milli: u64,
    rate: u64,
    burst_milli: u64,
    last_ms: u64,
}

impl TokenBucket {
    /// Full at first.
    pub fn new(rate: u64, burst: u64, now_ms: u64) -> TokenBucket {
        let burst_milli = burst.saturating_mul(1000);
        TokenBucket {
            milli: burst_milli,
            rate,
            burst_milli,
            last_ms: now_ms,
        }
    }
    /// Takes a token if there is one.
    pub fn allow(&mut self, now_ms: u64) -> bool {
        let dt = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        // rate tokens/s = rate milli-tokens/ms.
        self.milli = self
            .milli
            .saturating_add(dt.saturating_mul(self.rate))
            .min(self.burst_milli);
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }
}

/// What an answer is to, for [`ReplyLimit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// An ARP request (answered by an ARP reply).
    Arp,
    /// Anything else the local stack answers (ICMP echo).
    Echo,
}

impl Ask {
    /// The kind of a frame for the local stack, by its ethertype (ARP
    /// requests and replies alike are [`Ask::Arp`] here).
    pub fn of(frame: &[u8]) -> Ask {
        if frame.get(12..14) == Some(&[0x08, 0x06]) {
            Ask::Arp
        } else {
            Ask::Echo
        }
    }
}

/// The answers one side's stack gives: a bucket for ARP, one for echo.
#[derive(Debug, Clone)]
pub struct ReplyLimit {
    arp: TokenBucket,
    echo: TokenBucket,
}

impl ReplyLimit {
    pub fn new(rate: u64, burst: u64, now_ms: u64) -> ReplyLimit {
        let b = TokenBucket::new(rate, burst, now_ms);
        ReplyLimit { arp: b, echo: b }
    }
    /// Whether one more answer of kind `ask` may go out now.
    pub fn allow(&mut self, ask: Ask, now_ms: u64) -> bool {
        match ask {
            Ask::Arp => self.arp.allow(now_ms),
            Ask::Echo => self.echo.allow(now_ms),
        }
    }
}

/// A smoltcp device fed from a queue: the poll loop pushes received frames,
/// smoltcp's replies collect in `tx` for the loop to write out.
struct QueueDevice {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
    mtu: usize,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut Vec<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

impl phy::Device for QueueDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        // With offload on, the kernel hands a TAP UDP datagrams with only a
        // partial checksum (virtio NEEDS_CSUM), which smoltcp would reject;
        // the only UDP fed here is DHCP (picked by port), so the UDP
        // checksum is computed on what smoltcp sends, not verified.
        caps.checksum.udp = smoltcp::phy::Checksum::Tx;
        caps
    }
}

/// One side's local stack (one smoltcp interface).
pub struct LocalStack {
    iface: Interface,
    dev: QueueDevice,
    sockets: SocketSet<'static>,
    limit: ReplyLimit,
    /// The DHCPv4 client, with `uplink.address = "dhcp"` (uplink stack only).
    dhcp: Option<smoltcp::iface::SocketHandle>,
}

impl LocalStack {
    /// `addrs` are (address, prefix length); `gateway` is the default route.
    pub fn new(
        mac: EthernetAddress,
        addrs: &[(Ipv4Addr, u8)],
        gateway: Option<Ipv4Addr>,
        mtu: usize,
        now_ms: u64,
        seed: u64,
    ) -> LocalStack {
        let mut dev = QueueDevice {
            rx: VecDeque::new(),
            tx: Vec::new(),
            mtu,
        };
        let mut cfg = IfaceConfig::new(HardwareAddress::Ethernet(mac));
        cfg.random_seed = seed;
        let mut iface = Interface::new(cfg, &mut dev, Instant::from_millis(now_ms as i64));
        iface.update_ip_addrs(|ips| {
            for &(a, len) in addrs {
                // Capacity is IFACE_MAX_ADDR_COUNT (>= 2); we add at most two.
                let _ = ips.push(IpCidr::new(IpAddress::Ipv4(a), len));
            }
        });
        if let Some(gw) = gateway {
            // Fails only when the route table is full; it is empty here.
            let _ = iface.routes_mut().add_default_ipv4_route(gw);
        }
        LocalStack {
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            limit: ReplyLimit::new(REPLIES_PER_SEC, REPLY_BURST, now_ms),
            dhcp: None,
        }
    }

    /// Whether this side may give one more answer of kind `ask` now (see
    /// [`ReplyLimit`]); the caller drops the frame unanswered when not.
    pub fn allow(&mut self, ask: Ask, now_ms: u64) -> bool {
        self.limit.allow(ask, now_ms)
    }

    /// Feeds one frame and returns the frames smoltcp wants sent.
    pub fn input(&mut self, frame: &[u8], now_ms: u64) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.dev.rx.push_back(frame.to_vec());
        self.iface.poll(
            Instant::from_millis(now_ms as i64),
            &mut self.dev,
            &mut self.sockets,
        );
        self.dev.tx.drain(..)
    }
}

/// What the DHCP client reported (`None` from [`LocalStack::dhcp_event`]:
/// nothing new).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpEvent {
    /// A lease was granted or renewed.
    Configured(super::dhcp::Offer),
    /// The lease is gone (a NAK, or it ran out).
    Deconfigured,
}

/// Room for the last DHCP packet received (smoltcp hands it back with each
/// event; the lease time is read from it). A DHCP message from dnsmasq is
/// a few hundred bytes; 576 is the least a client must accept (RFC 2131).
const DHCP_PACKET_MAX: usize = 1500;

impl LocalStack {
    /// Runs smoltcp's DHCPv4 client on this stack. The lease time is capped
    /// at `max_lease` when given (renewal comes at half of it).
    pub fn start_dhcp(&mut self, max_lease: Option<std::time::Duration>) {
        let mut socket = smoltcp::socket::dhcpv4::Socket::new();
        socket.set_max_lease_duration(
            max_lease.map(|d| smoltcp::time::Duration::from_millis(d.as_millis() as u64)),
        );
        // One buffer per gateway for its lifetime: the socket set is
        // 'static, so is the buffer it borrows.
        socket.set_receive_packet_buffer(Box::leak(vec![0u8; DHCP_PACKET_MAX].into_boxed_slice()));
        self.dhcp = Some(self.sockets.add(socket));
    }

    /// Starts the DHCP client over (the link went down): the lease is
    /// forgotten and discovery begins again.
    pub fn reset_dhcp(&mut self) {
        if let Some(h) = self.dhcp {
            self.sockets
                .get_mut::<smoltcp::socket::dhcpv4::Socket>(h)
                .reset();
        }
    }

    /// Lets smoltcp send what is due (DHCP discovery, renewal, retries)
    /// and returns the frames to write.
    pub fn poll(&mut self, now_ms: u64) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.iface.poll(
            Instant::from_millis(now_ms as i64),
            &mut self.dev,
            &mut self.sockets,
        );
        self.dev.tx.drain(..)
    }

    /// The DHCP client's news since the last call.
    pub fn dhcp_event(&mut self) -> Option<DhcpEvent> {
        use smoltcp::socket::dhcpv4::{Event, Socket};
        use smoltcp::wire::DhcpRepr;
        let handle = self.dhcp?;
        let socket = self.sockets.get_mut::<Socket>(handle);
        Some(match socket.poll()? {
            Event::Deconfigured => DhcpEvent::Deconfigured,
            Event::Configured(c) => {
                let lease_secs = c
                    .packet
                    .as_ref()
                    .and_then(|p| DhcpRepr::parse(p).ok())
                    .and_then(|r| r.lease_duration);
                DhcpEvent::Configured(super::dhcp::Offer {
                    address: crate::net::Ipv4Net {
                        addr: c.address.address(),
                        prefix_len: c.address.prefix_len(),
                    },
                    router: c.router,
                    server: c.server.identifier,
                    lease_secs,
                })
            }
        })
    }

    /// Replaces the stack's addresses and default route (a new lease, or
    /// none).
    pub fn set_addrs(&mut self, addrs: &[(Ipv4Addr, u8)], gateway: Option<Ipv4Addr>) {
        self.iface.update_ip_addrs(|ips| {
            ips.clear();
            for &(a, len) in addrs {
                let _ = ips.push(IpCidr::new(IpAddress::Ipv4(a), len));
            }
        });
        self.iface.routes_mut().remove_default_ipv4_route();
        if let Some(gw) = gateway {
            let _ = self.iface.routes_mut().add_default_ipv4_route(gw);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_gives_its_burst_then_its_rate() {
        let mut b = TokenBucket::new(1000, 10, 0);
        assert_eq!((0..100).filter(|_| b.allow(0)).count(), 10);
        assert!(!b.allow(0));
        // 1000/s = one a millisecond.
        assert_eq!((0..100).filter(|_| b.allow(5)).count(), 5);
        // Never above the burst, however long idle; time going back is harmless.
        assert_eq!((0..100).filter(|_| b.allow(1_000_000)).count(), 10);
        assert!(!b.allow(10));
    }

    #[test]
    fn slow_rates_accumulate_fractions() {
        let mut b = TokenBucket::new(3, 1, 0);
        assert!(b.allow(0));
        assert!(!b.allow(300));
        assert!(b.allow(334));
    }

    #[test]
    fn kinds_have_their_own_buckets() {
        let mut l = ReplyLimit::new(1, 2, 0);
        for _ in 0..2 {
            assert!(l.allow(Ask::Echo, 0));
        }
        assert!(!l.allow(Ask::Echo, 0));
        assert!(l.allow(Ask::Arp, 0));
    }

    #[test]
    fn budget_refuses_past_its_bound_and_recovers() {
        let mut echo = [0u8; 60];
        echo[12..14].copy_from_slice(&[0x08, 0x00]);
        let mut arp = [0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!((Ask::of(&echo), Ask::of(&arp)), (Ask::Echo, Ask::Arp));
        assert_eq!(Ask::of(&[]), Ask::Echo);
        let b = LocalBudget::default();
        for _ in 0..LOCAL_QUEUED {
            assert!(b.take(Side::Uplink, &echo));
        }
        assert!(!b.take(Side::Uplink, &echo));
        assert_eq!(b.queued(Side::Uplink, Ask::Echo), LOCAL_QUEUED);
        assert!(b.take(Side::Uplink, &arp), "ARP has its own places");
        assert!(b.take(Side::Pod, &echo), "the other side is apart");
        b.done(Side::Uplink, &echo);
        assert!(b.take(Side::Uplink, &echo));
        let c = LocalBudget::default();
        c.done(Side::Pod, &arp);
        assert_eq!(c.queued(Side::Pod, Ask::Arp), 0, "never below zero");
    }
}
