//! NAT policy: what happens to a packet by its addresses alone, and which
//! worker owns it. Pure: no fds, threads or clocks; built once from a
//! validated config; replaced whole (never changed in place) on a reload or,
//! with `uplink.address = "dhcp"`, when the lease changes.
//!
//! - [`Addressing::egress`]: SNAT rules first, then masquerade rules; the first
//!   rule whose source matches decides, its excludes included (like an
//!   iptables chain with the SNAT rules above the MASQUERADE ones). A source
//!   no rule matches is refused (anti-spoofing).
//! - [`paired_address`]: "paired" pooling (RFC 4787 REQ-2), a fixed hash of
//!   the pod address picks its pool address, so it survives restarts.
//! - [`Addressing::steer`]: the port whose owner (`port % N`) handles a
//!   pod-side packet; a port forward's target is steered to the owner of the
//!   forwarded port, where the forward's sessions live.
//! - [`Addressing::uplink_next_hop`]: on-link destinations directly, the rest
//!   via the uplink gateway.
use std::net::Ipv4Addr;

use smoltcp::wire::EthernetAddress;

use crate::config::{Config, Forward, ForwardProtocol, MasqueradeRule, SnatRule};
use crate::nat::Proto;
use crate::net::Ipv4Net;
use crate::wire::GOLDEN_RATIO_64;

/// Which device a frame came from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Pod,
    Uplink,
}

/// The gateway's addresses and rules. A value never changes; a new one
/// replaces it (a reload, a new DHCP lease).
#[derive(Debug, Clone)]
pub struct Addressing {
    pub pod_mac: EthernetAddress,
    pub pod_net: Ipv4Net,
    pub pod_mtu: usize,
    pub uplink_mac: EthernetAddress,
    /// The outside address with the uplink subnet's prefix; with DHCP and no
    /// lease `0.0.0.0/32`, which is nobody's (see [`Addressing::has_address`]).
    pub uplink_net: Ipv4Net,
    pub uplink_gateway: Ipv4Addr,
    pub uplink_mtu: usize,
    /// `uplink.address = "dhcp"`: the uplink address comes from a lease.
    pub dhcp: bool,
    pub masquerade: Vec<MasqueradeRule>,
    pub snat: Vec<SnatRule>,
    /// Port forwards' targets: (protocol, pod address, pod port) -> outside
    /// port. A pod-side packet from a target is steered to the worker that
    /// owns the outside port, where its forward's sessions live.
    pub forward_targets: hashbrown::HashMap<(Proto, Ipv4Addr, u16), u16>,
}

/// What happens to a pod-side packet, by source and destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Translate the source to this outside address.
    Nat(Ipv4Addr),
    /// A NAT source going to an excluded destination: route it untranslated.
    Route,
    /// The source is no NAT source: not forwarded (anti-spoofing).
    Refuse,
}

impl Addressing {
    /// The addressing a validated config describes; MACs are derived from the
    /// addresses so they stay the same across restarts.
    /// With DHCP the uplink MAC is derived from the pod address instead, so
    /// it does not change with the lease and the server hands the same
    /// address back after a restart.
    pub fn from_config(config: &Config) -> Addressing {
        let (uplink_mac, uplink_net) = match config.uplink.address.fixed() {
            Some(net) => (mac_for(net.addr, 1), net),
            None => (mac_for(config.pod.address.addr, 1), NO_ADDRESS),
        };
        Addressing {
            pod_mac: mac_for(config.pod.address.addr, 0),
            pod_net: config.pod.address,
            pod_mtu: usize::from(config.pod.mtu),
            uplink_mac,
            uplink_net,
            uplink_gateway: config.uplink.gateway,
            uplink_mtu: usize::from(config.uplink.mtu),
            dhcp: config.uplink.address.fixed().is_none(),
            masquerade: config.masquerade.clone(),
            snat: config.snat.clone(),
            forward_targets: forwarded_ports(&config.forward)
                .map(|(proto, ext, to, to_port)| ((proto, to, to_port), ext))
                .collect(),
        }
    }
    /// The same rules with another uplink address and next hop (a new
    /// lease), or with none (`None`: the lease was lost).
    pub fn with_uplink(&self, lease: Option<(Ipv4Net, Ipv4Addr)>) -> Addressing {
        let (net, gateway) = lease.unwrap_or((NO_ADDRESS, self.uplink_gateway));
        Addressing {
            uplink_net: net,
            uplink_gateway: gateway,
            ..self.clone()
        }
    }
    /// Whether the uplink has an address (always, unless DHCP has no lease).
    pub fn has_address(&self) -> bool {
        self.uplink_net != NO_ADDRESS
    }
    pub fn pod_ip(&self) -> Ipv4Addr {
        self.pod_net.addr
    }
    pub fn uplink_ip(&self) -> Ipv4Addr {
        self.uplink_net.addr
    }
    pub fn mac(&self, side: Side) -> EthernetAddress {
        match side {
            Side::Pod => self.pod_mac,
            Side::Uplink => self.uplink_mac,
        }
    }
    pub fn ip(&self, side: Side) -> Ipv4Addr {
        match side {
            Side::Pod => self.pod_ip(),
            Side::Uplink => self.uplink_ip(),
        }
    }
    pub fn net(&self, side: Side) -> Ipv4Net {
        match side {
            Side::Pod => self.pod_net,
            Side::Uplink => self.uplink_net,
        }
    }
    pub fn mtu(&self, side: Side) -> usize {
        match side {
            Side::Pod => self.pod_mtu,
            Side::Uplink => self.uplink_mtu,
        }
    }
    /// Whether an address is one of the gateway's own (it answers ping on these).
    pub fn is_local(&self, ip: Ipv4Addr) -> bool {
        ip == self.pod_ip() || (ip == self.uplink_ip() && self.has_address())
    }

    /// Whether an address is one the NAT translates to: the uplink address
    /// or an address of a SNAT pool. The gateway answers ARP for all of them.
    pub fn is_outside(&self, ip: Ipv4Addr) -> bool {
        (ip == self.uplink_ip() && self.has_address())
            || self
                .snat
                .iter()
                .any(|r| (r.to_first..=r.to_last).contains(&ip))
    }

    /// What to do with a pod-side packet from `src` to `dst`. SNAT rules are
    /// tried first, then masquerade rules; the first rule whose source
    /// matches decides, its excludes included.
    pub fn egress(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Egress {
        let excluded = |ex: &[Ipv4Net]| ex.iter().any(|e| e.contains(dst));
        if let Some(r) = self.snat.iter().find(|r| r.source.contains(src)) {
            if excluded(&r.exclude) {
                return Egress::Route;
            }
            return Egress::Nat(paired_address(r, src));
        }
        match self.masquerade.iter().find(|r| r.source.contains(src)) {
            Some(r) if excluded(&r.exclude) => Egress::Route,
            Some(_) => Egress::Nat(self.uplink_ip()),
            None => Egress::Refuse,
        }
    }

    /// The port whose owner handles a pod-side packet from `src:port`: the
    /// outside port of a forward when `src:port` is its target, else `port`.
    pub fn steer(&self, proto: Proto, src: Ipv4Addr, port: u16) -> u16 {
        if self.forward_targets.is_empty() {
            return port;
        }
        self.forward_targets
            .get(&(proto, src, port))
            .copied()
            .unwrap_or(port)
    }

    /// Whether `ip` is the network or broadcast address of the pod or the
    /// uplink subnet (a /31 or /32 has neither, RFC 3021): no host has it,
    /// so a packet to it is dropped rather than resolved.
    pub fn is_subnet_edge(&self, ip: Ipv4Addr) -> bool {
        [self.pod_net, self.uplink_net]
            .iter()
            .any(|n| n.prefix_len < 31 && (ip == n.network() || ip == n.broadcast()))
    }

    /// The next hop on the uplink for `dst`.
    pub fn uplink_next_hop(&self, dst: Ipv4Addr) -> Ipv4Addr {
        if self.uplink_net.contains(dst) {
            dst
        } else {
            self.uplink_gateway
        }
    }
}

/// The uplink "address" while DHCP has no lease.
pub const NO_ADDRESS: Ipv4Net = Ipv4Net {
    addr: Ipv4Addr::UNSPECIFIED,
    prefix_len: 32,
};

/// Every forwarded port: (protocol, outside port, target address, target port).
pub fn forwarded_ports(
    forwards: &[Forward],
) -> impl Iterator<Item = (Proto, u16, Ipv4Addr, u16)> + '_ {
    forwards.iter().flat_map(|f| {
        let proto = match f.protocol {
            ForwardProtocol::Tcp => Proto::Tcp,
            ForwardProtocol::Udp => Proto::Udp,
        };
        (f.ports.first..=f.ports.last)
            .map(move |p| (proto, p, f.to_addr, f.to_port + (p - f.ports.first)))
    })
}

/// The pool address a pod address always gets ("paired" pooling, RFC 4787
/// REQ-2): a fixed hash of the pod address, so it also survives restarts.
pub fn paired_address(rule: &SnatRule, src: Ipv4Addr) -> Ipv4Addr {
    let first = u32::from(rule.to_first);
    let size = u32::from(rule.to_last) - first + 1;
    let h = (u64::from(u32::from(src)).wrapping_mul(GOLDEN_RATIO_64) >> 32) as u32;
    Ipv4Addr::from(first + h % size)
}

/// A locally administered MAC derived from an address, so restarts keep it.
pub fn mac_for(ip: Ipv4Addr, side: u8) -> EthernetAddress {
    let o = ip.octets();
    EthernetAddress([0x02, 0x7a ^ side, o[0], o[1], o[2], o[3]])
}

#[cfg(test)]
mod tests;
