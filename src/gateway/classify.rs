//! Where a frame goes: decided once per frame, from its headers and the
//! gateway's addressing alone (pure, so it is unit-tested without devices).
use smoltcp::wire::{ArpRepr, EthernetAddress};

use super::neighbour::ArpKind;
use super::stats::Counter;
use super::{Addressing, Egress, Side};
use crate::nat::frag::FragKey;
use crate::nat::Proto;
use crate::wire::{self, fragment, icmp, Classified, Ipv4View, L4};

/// The fate of one received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Count and drop.
    Drop(Counter),
    /// ARP for one of the gateway's addresses, or an ICMP echo request to
    /// one: for the gateway's own stack.
    Local,
    /// Transit IPv4, to be translated by the worker owning `port`
    /// (`port % workers`): outbound by inside source port (or echo id),
    /// inbound by outside destination port (or echo id). `egress` is the
    /// policy decided here once: for a pod-side packet, what
    /// [`Addressing::egress`] says (never `Refuse`: those are dropped); for
    /// an uplink one, `Route` for a reply to a routed session (addressed to
    /// no outside address) and `Nat(dst)` otherwise.
    Transit {
        port: u16,
        view: Ipv4View,
        egress: Egress,
    },
}

/// The worker that tracks a fragmented datagram is `frag_port(key) % N`:
/// non-first fragments carry no ports, so they are steered by their
/// datagram's identity instead (RFC 791: source, destination, protocol, id).
pub fn frag_port(key: &FragKey) -> u16 {
    let x = u64::from(u32::from(key.src))
        ^ u64::from(u32::from(key.dst)).rotate_left(29)
        ^ (u64::from(key.id) << 8)
        ^ u64::from(key.proto);
    let h = x.wrapping_mul(wire::GOLDEN_RATIO_64);
    (h >> 48) as u16
}

/// The fragment key of an IPv4 packet, read before any rewrite.
pub fn frag_key(frame: &[u8], view: &Ipv4View) -> FragKey {
    FragKey {
        src: view.src,
        dst: view.dst,
        proto: view.proto,
        id: fragment::frag_info(frame).map_or(0, |f| f.id),
    }
}

/// What a frame shows of a neighbour, beside its fate. Nothing here ever
/// creates a neighbour entry or changes its MAC except ARP (see
/// [`super::neighbour`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// An IPv4 frame from the pod side: its source address and MAC, which
    /// can only confirm an entry with that very MAC.
    Frame(std::net::Ipv4Addr, EthernetAddress),
    /// ARP from an on-link sender that is not addressed to the gateway
    /// (ARP that is goes to its own stack, which learns from it).
    Arp(std::net::Ipv4Addr, EthernetAddress, ArpKind),
}

pub type Sighting = Option<Seen>;

/// Decides what to do with `frame`, received on `side`.
pub fn classify(a: &Addressing, side: Side, frame: &[u8]) -> (Disposition, Sighting) {
    use Disposition::*;
    let view = match wire::classify(frame) {
        Err(m) => return (Drop(Counter::malformed(m)), None),
        Ok(Classified::OtherEthertype(_)) => return (Drop(Counter::DropOtherEthertype), None),
        Ok(Classified::Arp(repr)) => return arp(a, side, repr),
        Ok(Classified::Ipv4(v)) => v,
    };
    let (dst_mac, src_mac) = wire::macs(frame);
    if dst_mac != a.mac(side) && !dst_mac.is_broadcast() {
        return (Drop(Counter::DropNotForUs), None);
    }
    match side {
        Side::Pod => {
            let seen = (a.pod_net.contains(view.src) && view.src != a.pod_ip())
                .then_some(Seen::Frame(view.src, src_mac));
            (pod(a, view, frame), seen)
        }
        Side::Uplink => (uplink(a, view, frame), None),
    }
}

/// A non-first fragment goes to the worker tracking its datagram.
fn later_fragment(frame: &[u8], view: Ipv4View, egress: Egress) -> Disposition {
    Disposition::Transit {
        port: frag_port(&frag_key(frame, &view)),
        view,
        egress,
    }
}

fn for_gateway(view: &Ipv4View) -> Disposition {
    match view.l4 {
        L4::IcmpEcho { request: true, .. } if !view.is_fragment => Disposition::Local,
        // RFC 5382 REQ-4: no RST, no port unreachable from the gateway itself.
        _ => Disposition::Drop(Counter::DropToGateway),
    }
}

/// An ICMP error from outside goes to the owner of the flow it quotes: the
/// quoted source port is our outside port.
fn icmp_error_in(frame: &[u8], view: Ipv4View, egress: Egress) -> Disposition {
    match icmp::parse_embedded(frame, &view) {
        Ok(emb) => Disposition::Transit {
            port: emb.ports().0,
            view,
            egress,
        },
        Err(_) => Disposition::Drop(Counter::DropBadIcmpError),
    }
}

fn pod(a: &Addressing, view: Ipv4View, frame: &[u8]) -> Disposition {
    use Disposition::*;
    // A pod may not speak as the gateway, as an outside (uplink or pool)
    // address, or from a subnet's network or broadcast address: replies
    // would be addressed to the gateway itself.
    if a.is_local(view.src) || a.is_outside(view.src) || a.is_subnet_edge(view.src) {
        return Drop(Counter::DropSpoofedSource);
    }
    if view.dst == a.pod_ip() {
        return for_gateway(&view);
    }
    if view.dst.is_broadcast() || view.dst.is_multicast() || view.dst == a.pod_net.broadcast() {
        return Drop(Counter::DropNoRoute);
    }
    let egress = a.egress(view.src, view.dst);
    if egress == Egress::Refuse {
        return Drop(Counter::DropSpoofedSource);
    }
    // DHCP without a lease: nothing leaves by the uplink (pod to pod still
    // goes).
    if !a.has_address() && !a.pod_net.contains(view.dst) {
        return Drop(Counter::DropNoLease);
    }
    // Echo to the uplink address is the gateway's; TCP and UDP to an outside
    // address are hairpinned by the worker.
    if view.dst == a.uplink_ip() && matches!(view.l4, L4::IcmpEcho { request: true, .. }) {
        return Local;
    }
    match view.l4 {
        L4::Tcp { sport, .. } => Transit {
            port: a.steer(Proto::Tcp, view.src, sport),
            view,
            egress,
        },
        L4::Udp { sport, .. } => Transit {
            port: a.steer(Proto::Udp, view.src, sport),
            view,
            egress,
        },
        L4::IcmpEcho { id: port, .. } => Transit { port, view, egress },
        L4::Fragment => later_fragment(frame, view, egress),
        // About a packet that came in to the pod: the quoted destination is
        // the pod's port, which has the same owner as its outside port (or
        // is a forward's target, steered like the forward).
        L4::IcmpError { .. } => match icmp::parse_embedded(frame, &view) {
            Ok(emb) => {
                let (_, port) = emb.ports();
                let port = match emb.l4 {
                    icmp::EmbeddedL4::Tcp { .. } => a.steer(Proto::Tcp, emb.dst, port),
                    icmp::EmbeddedL4::Udp { .. } => a.steer(Proto::Udp, emb.dst, port),
                    icmp::EmbeddedL4::IcmpEcho { .. } => port,
                };
                Transit { port, view, egress }
            }
            Err(_) => Drop(Counter::DropBadIcmpError),
        },
        L4::IcmpOther { .. } | L4::Other => Drop(Counter::DropUnsupportedProtocol),
    }
}

/// With `uplink.address = "dhcp"`: a DHCP server's reply (UDP 67 -> 68) to
/// the client, broadcast or to the address it offers or leased. Without a
/// lease any destination will do: an offer goes to the address offered.
fn dhcp_reply(a: &Addressing, view: &Ipv4View) -> bool {
    a.dhcp
        && !view.is_fragment
        && matches!(
            view.l4,
            L4::Udp {
                sport: 67,
                dport: 68,
                ..
            }
        )
        && (!a.has_address()
            || view.dst == a.uplink_ip()
            || view.dst.is_broadcast()
            || view.dst == a.uplink_net.broadcast())
}

fn uplink(a: &Addressing, view: Ipv4View, frame: &[u8]) -> Disposition {
    use Disposition::*;
    if dhcp_reply(a, &view) {
        return Local;
    }
    let routed_back = !a.is_outside(view.dst) && a.egress(view.dst, view.src) == Egress::Route;
    if !a.is_outside(view.dst) && !routed_back {
        return Drop(Counter::DropNotForUs);
    }
    let egress = if routed_back {
        Egress::Route
    } else {
        Egress::Nat(view.dst)
    };
    match view.l4 {
        L4::IcmpEcho { request: true, .. } if view.dst == a.uplink_ip() => for_gateway(&view),
        L4::IcmpEcho { request: true, .. } if !routed_back => Drop(Counter::DropToGateway),
        L4::IcmpEcho { id: port, .. }
        | L4::Tcp { dport: port, .. }
        | L4::Udp { dport: port, .. } => Transit { port, view, egress },
        L4::Fragment => later_fragment(frame, view, egress),
        // About a packet we sent: the quoted source is our outside port.
        L4::IcmpError { .. } => icmp_error_in(frame, view, egress),
        L4::IcmpOther { .. } | L4::Other => Drop(Counter::DropToGateway),
    }
}

fn arp(a: &Addressing, side: Side, repr: ArpRepr) -> (Disposition, Sighting) {
    let ArpRepr::EthernetIpv4 {
        source_hardware_addr: mac,
        source_protocol_addr: ip,
        target_protocol_addr: target,
        ..
    } = repr
    else {
        return (Disposition::Drop(Counter::DropBadArp), None);
    };
    let ours = match side {
        Side::Pod => a.is_local(target),
        Side::Uplink => a.is_outside(target),
    };
    if ours {
        return (Disposition::Local, None);
    }
    // ARP replies to our own requests are addressed to us, so `ours` holds
    // for them; anything else is somebody else's conversation, which may
    // still update the sender's entry, as in Linux's arp_process.
    let on_link = a.net(side).contains(ip) && ip != a.ip(side) && mac.is_unicast();
    let kind = if ip == target {
        ArpKind::Gratuitous
    } else {
        ArpKind::Overheard
    };
    let seen = on_link.then_some(Seen::Arp(ip, mac, kind));
    (Disposition::Drop(Counter::DropArpIgnored), seen)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::config::{Config, DEFAULT_TOML};
    use crate::wire::build::{self, Endpoints};

    fn addressing() -> Addressing {
        Addressing::from_config(&Config::from_toml_str(DEFAULT_TOML).unwrap())
    }

    fn ep(a: &Addressing, side: Side, src: [u8; 4], dst: [u8; 4]) -> Endpoints {
        let mut e = Endpoints::new(Ipv4Addr::from(src), Ipv4Addr::from(dst));
        e.dst_mac = a.mac(side);
        e
    }

    #[test]
    fn outbound_goes_to_the_owner_of_the_inside_port() {
        let a = addressing();
        let f = build::tcp(
            &ep(&a, Side::Pod, [10, 244, 0, 2], [198, 51, 100, 10]),
            4242,
            80,
            2,
            b"",
        );
        let (d, seen) = classify(&a, Side::Pod, &f);
        assert!(
            matches!(d, Disposition::Transit { port: 4242, .. }),
            "{d:?}"
        );
        assert!(
            matches!(seen, Some(Seen::Frame(ip, _)) if ip == Ipv4Addr::new(10, 244, 0, 2)),
            "{seen:?}"
        );
    }

    #[test]
    fn inbound_goes_to_the_owner_of_the_outside_port() {
        let a = addressing();
        let f = build::udp(
            &ep(&a, Side::Uplink, [198, 51, 100, 10], [203, 0, 113, 10]),
            53,
            31337,
            b"x",
            true,
        );
        assert!(matches!(
            classify(&a, Side::Uplink, &f).0,
            Disposition::Transit { port: 31337, .. }
        ));
        let e = build::icmp_echo(
            &ep(&a, Side::Uplink, [198, 51, 100, 10], [203, 0, 113, 10]),
            false,
            77,
            1,
            b"",
        );
        assert!(matches!(
            classify(&a, Side::Uplink, &e).0,
            Disposition::Transit { port: 77, .. }
        ));
    }

    #[test]
    fn echo_requests_to_the_gateway_are_local_other_traffic_is_dropped_silently() {
        let a = addressing();
        let ping = build::icmp_echo(
            &ep(&a, Side::Uplink, [198, 51, 100, 10], [203, 0, 113, 10]),
            true,
            1,
            1,
            b"",
        );
        assert_eq!(classify(&a, Side::Uplink, &ping).0, Disposition::Local);
        let ping = build::icmp_echo(
            &ep(&a, Side::Pod, [10, 244, 0, 2], [10, 244, 0, 1]),
            true,
            1,
            1,
            b"",
        );
        assert_eq!(classify(&a, Side::Pod, &ping).0, Disposition::Local);
        let syn = build::tcp(
            &ep(&a, Side::Pod, [10, 244, 0, 2], [10, 244, 0, 1]),
            1,
            22,
            2,
            b"",
        );
        assert_eq!(
            classify(&a, Side::Pod, &syn).0,
            Disposition::Drop(Counter::DropToGateway)
        );
    }

    #[test]
    fn spoofed_excluded_foreign_and_broadcast_are_dropped() {
        let a = addressing();
        let cases = [
            (
                Side::Pod,
                [172, 31, 0, 5],
                [198, 51, 100, 10],
                Counter::DropSpoofedSource,
            ),
            (
                Side::Pod,
                [10, 244, 0, 2],
                [255, 255, 255, 255],
                Counter::DropNoRoute,
            ),
            (
                Side::Uplink,
                [198, 51, 100, 10],
                [10, 244, 0, 2],
                Counter::DropNotForUs,
            ),
        ];
        for (side, src, dst, want) in cases {
            let f = build::udp(&ep(&a, side, src, dst), 1, 2, b"", true);
            assert_eq!(
                classify(&a, side, &f).0,
                Disposition::Drop(want),
                "{src:?} -> {dst:?}"
            );
        }
        let mut other_mac = ep(&a, Side::Pod, [10, 244, 0, 2], [198, 51, 100, 10]);
        other_mac.dst_mac = EthernetAddress([2, 1, 1, 1, 1, 1]);
        let f = build::udp(&other_mac, 1, 2, b"", true);
        assert_eq!(
            classify(&a, Side::Pod, &f).0,
            Disposition::Drop(Counter::DropNotForUs)
        );
    }

    #[test]
    fn the_egress_is_decided_once_and_travels_with_the_packet() {
        let a = addressing();
        let pod = [10, 244, 0, 2];
        let routed = build::udp(&ep(&a, Side::Pod, pod, [10, 244, 0, 3]), 5, 6, b"", true);
        assert!(matches!(
            classify(&a, Side::Pod, &routed).0,
            Disposition::Transit {
                port: 5,
                egress: Egress::Route,
                ..
            }
        ));
        let out = build::udp(&ep(&a, Side::Pod, pod, [198, 51, 100, 1]), 5, 6, b"", true);
        assert!(matches!(
            classify(&a, Side::Pod, &out).0,
            Disposition::Transit { egress: Egress::Nat(ip), .. } if ip == a.uplink_ip()
        ));
        let reply = build::udp(
            &ep(&a, Side::Uplink, [198, 51, 100, 1], [203, 0, 113, 10]),
            6,
            5,
            b"",
            true,
        );
        assert!(matches!(
            classify(&a, Side::Uplink, &reply).0,
            Disposition::Transit { egress: Egress::Nat(ip), .. } if ip == a.uplink_ip()
        ));
    }

    #[test]
    fn arp_for_the_gateway_is_local_and_other_arp_is_seen_as_overheard_or_gratuitous() {
        let a = addressing();
        let mut out = [0u8; 64];
        let pod_mac = EthernetAddress([2, 0, 0, 0, 0, 9]);
        let n =
            wire::build_arp_request(&mut out, pod_mac, Ipv4Addr::new(10, 244, 0, 2), a.pod_ip());
        let (d, seen) = classify(&a, Side::Pod, &out[..n]);
        assert_eq!(d, Disposition::Local);
        // The gateway's own stack learns from it, not the worker.
        assert_eq!(seen, None);
        let pod = Ipv4Addr::new(10, 244, 0, 2);
        let n = wire::build_arp_request(&mut out, pod_mac, pod, Ipv4Addr::new(10, 244, 0, 3));
        assert_eq!(
            classify(&a, Side::Pod, &out[..n]),
            (
                Disposition::Drop(Counter::DropArpIgnored),
                Some(Seen::Arp(pod, pod_mac, ArpKind::Overheard))
            )
        );
        let n = wire::build_arp_request(&mut out, pod_mac, pod, pod);
        assert_eq!(
            classify(&a, Side::Pod, &out[..n]).1,
            Some(Seen::Arp(pod, pod_mac, ArpKind::Gratuitous))
        );
        // Off-link senders and the gateway's own address teach nothing.
        let n = wire::build_arp_request(&mut out, pod_mac, a.pod_ip(), a.pod_ip());
        assert_eq!(classify(&a, Side::Pod, &out[..n]).1, None);
        let far = Ipv4Addr::new(192, 0, 2, 1);
        let n = wire::build_arp_request(&mut out, pod_mac, far, far);
        assert_eq!(classify(&a, Side::Pod, &out[..n]).1, None);
    }

    fn dhcp_addressing() -> Addressing {
        let mut c = Config::from_toml_str(DEFAULT_TOML).unwrap();
        c.uplink.address = crate::config::UplinkAddress::Dhcp;
        Addressing::from_config(&c)
    }

    #[test]
    fn without_a_lease_nothing_leaves_and_no_arp_is_answered_but_dhcp_replies_come_in() {
        let a = dhcp_addressing();
        assert!(a.dhcp && !a.has_address());
        let out = build::udp(
            &ep(&a, Side::Pod, [10, 244, 0, 2], [198, 51, 100, 1]),
            5,
            6,
            b"",
            true,
        );
        assert_eq!(
            classify(&a, Side::Pod, &out).0,
            Disposition::Drop(Counter::DropNoLease)
        );
        // Pod to pod needs no lease.
        let routed = build::udp(
            &ep(&a, Side::Pod, [10, 244, 0, 2], [10, 244, 0, 3]),
            5,
            6,
            b"",
            true,
        );
        assert!(matches!(
            classify(&a, Side::Pod, &routed).0,
            Disposition::Transit { .. }
        ));
        // An offer, unicast to the address offered.
        let offer = build::udp(
            &ep(&a, Side::Uplink, [192, 0, 2, 1], [192, 0, 2, 50]),
            67,
            68,
            b"x",
            true,
        );
        assert_eq!(classify(&a, Side::Uplink, &offer).0, Disposition::Local);
        let not_dhcp = build::udp(
            &ep(&a, Side::Uplink, [192, 0, 2, 1], [192, 0, 2, 50]),
            53,
            68,
            b"x",
            true,
        );
        assert_eq!(
            classify(&a, Side::Uplink, &not_dhcp).0,
            Disposition::Drop(Counter::DropNotForUs)
        );
        let mut arp = [0u8; 64];
        let n = wire::build_arp_request(
            &mut arp,
            EthernetAddress([2, 0, 0, 0, 0, 9]),
            Ipv4Addr::new(192, 0, 2, 1),
            Ipv4Addr::UNSPECIFIED,
        );
        assert_eq!(
            classify(&a, Side::Uplink, &arp[..n]).0,
            Disposition::Drop(Counter::DropArpIgnored)
        );
        // The same frames once leased: translated, and DHCP only to us.
        let leased = a.with_uplink(Some((
            "192.0.2.50/24".parse().unwrap(),
            Ipv4Addr::new(192, 0, 2, 1),
        )));
        assert!(matches!(
            classify(&leased, Side::Pod, &out).0,
            Disposition::Transit { egress: Egress::Nat(ip), .. } if ip == Ipv4Addr::new(192, 0, 2, 50)
        ));
        assert_eq!(
            classify(&leased, Side::Uplink, &offer).0,
            Disposition::Local
        );
        let n = wire::build_arp_request(
            &mut arp,
            EthernetAddress([2, 0, 0, 0, 0, 9]),
            Ipv4Addr::new(192, 0, 2, 1),
            Ipv4Addr::new(192, 0, 2, 50),
        );
        assert_eq!(
            classify(&leased, Side::Uplink, &arp[..n]).0,
            Disposition::Local
        );
        let elsewhere = build::udp(
            &ep(&a, Side::Uplink, [192, 0, 2, 1], [192, 0, 2, 51]),
            67,
            68,
            b"x",
            true,
        );
        assert_eq!(
            classify(&leased, Side::Uplink, &elsewhere).0,
            Disposition::Drop(Counter::DropNotForUs)
        );
        // A fixed address never takes DHCP replies for the local stack.
        assert!(matches!(
            classify(
                &addressing(),
                Side::Uplink,
                &build::udp(
                    &ep(
                        &addressing(),
                        Side::Uplink,
                        [203, 0, 113, 1],
                        [203, 0, 113, 10]
                    ),
                    67,
                    68,
                    b"x",
                    true,
                )
            )
            .0,
            Disposition::Transit { port: 68, .. }
        ));
    }
}
