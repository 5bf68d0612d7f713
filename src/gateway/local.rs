//! The gateway's own IP stack: smoltcp answers ARP and ICMP echo for the
//! gateway's addresses. Only those frames are fed to it (never `any_ip`), so
//! it never sends a RST or a port unreachable for traffic that has no flow
//! (RFC 5382 REQ-4). With `uplink.address = "dhcp"` the uplink stack also
//! runs smoltcp's DHCPv4 client, fed the DHCP replies the classifier picks.
use std::collections::VecDeque;
use std::net::Ipv4Addr;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

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
            dhcp: None,
        }
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
