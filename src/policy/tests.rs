use std::net::Ipv4Addr;

use super::*;
use crate::net::PortRange;

fn net(a: [u8; 4], len: u8) -> Ipv4Net {
    Ipv4Net {
        addr: Ipv4Addr::from(a),
        prefix_len: len,
    }
}

/// Pods 10.244.0.0/16 masquerade to 203.0.113.10 except towards the pod
/// network itself and 192.0.2.0/24; 10.244.1.0/24 uses a four-address pool.
fn addressing() -> Addressing {
    let forwards = [Forward {
        protocol: ForwardProtocol::Tcp,
        ports: PortRange {
            first: 8080,
            last: 8082,
        },
        to_addr: Ipv4Addr::new(10, 244, 0, 9),
        to_port: 80,
    }];
    Addressing {
        pod_mac: mac_for(Ipv4Addr::new(10, 244, 0, 1), 0),
        pod_net: net([10, 244, 0, 1], 16),
        pod_mtu: 1500,
        uplink_mac: mac_for(Ipv4Addr::new(203, 0, 113, 10), 1),
        uplink_net: net([203, 0, 113, 10], 24),
        uplink_gateway: Ipv4Addr::new(203, 0, 113, 1),
        uplink_mtu: 1500,
        dhcp: false,
        masquerade: vec![MasqueradeRule {
            source: net([10, 244, 0, 0], 16),
            exclude: vec![net([10, 244, 0, 0], 16), net([192, 0, 2, 0], 24)],
        }],
        snat: vec![SnatRule {
            source: net([10, 244, 1, 0], 24),
            to_first: Ipv4Addr::new(203, 0, 113, 20),
            to_last: Ipv4Addr::new(203, 0, 113, 23),
            exclude: vec![net([10, 244, 0, 0], 16)],
        }],
        forward_targets: forwarded_ports(&forwards)
            .map(|(proto, ext, to, to_port)| ((proto, to, to_port), ext))
            .collect(),
    }
}

const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

#[test]
fn masquerade_routes_excluded_and_refuses_foreign_sources() {
    let a = addressing();
    let pod = Ipv4Addr::new(10, 244, 0, 2);
    assert_eq!(a.egress(pod, REMOTE), Egress::Nat(a.uplink_ip()));
    assert_eq!(a.egress(pod, Ipv4Addr::new(10, 244, 0, 3)), Egress::Route);
    assert_eq!(a.egress(pod, Ipv4Addr::new(192, 0, 2, 7)), Egress::Route);
    assert_eq!(
        a.egress(Ipv4Addr::new(172, 16, 0, 2), REMOTE),
        Egress::Refuse
    );
}

#[test]
fn snat_rules_come_first_with_their_own_excludes() {
    let a = addressing();
    let pod = Ipv4Addr::new(10, 244, 1, 5);
    let Egress::Nat(addr) = a.egress(pod, REMOTE) else {
        panic!("not translated")
    };
    assert!((Ipv4Addr::new(203, 0, 113, 20)..=Ipv4Addr::new(203, 0, 113, 23)).contains(&addr));
    assert!(a.is_outside(addr));
    // The SNAT rule's excludes decide, not the masquerade rule's.
    assert_eq!(a.egress(pod, Ipv4Addr::new(10, 244, 0, 3)), Egress::Route);
    assert_eq!(
        a.egress(pod, Ipv4Addr::new(192, 0, 2, 7)),
        Egress::Nat(addr)
    );
}

#[test]
fn paired_address_is_fixed_per_pod_and_uses_the_whole_pool() {
    let a = addressing();
    let rule = &a.snat[0];
    let mut used = std::collections::HashSet::new();
    for host in 1..=200u8 {
        let pod = Ipv4Addr::new(10, 244, 1, host);
        let addr = paired_address(rule, pod);
        assert_eq!(addr, paired_address(rule, pod));
        assert_eq!(a.egress(pod, REMOTE), Egress::Nat(addr));
        used.insert(addr);
    }
    assert_eq!(used.len(), 4);
    let one = SnatRule {
        to_last: rule.to_first,
        ..rule.clone()
    };
    assert_eq!(
        paired_address(&one, Ipv4Addr::new(10, 244, 1, 9)),
        one.to_first
    );
}

#[test]
fn forward_targets_steer_to_the_forwarded_port() {
    let a = addressing();
    let target = Ipv4Addr::new(10, 244, 0, 9);
    assert_eq!(a.steer(Proto::Tcp, target, 80), 8080);
    assert_eq!(a.steer(Proto::Tcp, target, 82), 8082);
    assert_eq!(a.steer(Proto::Tcp, target, 83), 83);
    assert_eq!(a.steer(Proto::Udp, target, 80), 80);
    assert_eq!(a.steer(Proto::Tcp, Ipv4Addr::new(10, 244, 0, 8), 80), 80);
}

#[test]
fn forwarded_ports_expand_ranges() {
    let f = [Forward {
        protocol: ForwardProtocol::Udp,
        ports: PortRange {
            first: 5000,
            last: 5002,
        },
        to_addr: Ipv4Addr::new(10, 244, 0, 4),
        to_port: 6000,
    }];
    let all: Vec<_> = forwarded_ports(&f).collect();
    let to = Ipv4Addr::new(10, 244, 0, 4);
    assert_eq!(
        all,
        [
            (Proto::Udp, 5000, to, 6000),
            (Proto::Udp, 5001, to, 6001),
            (Proto::Udp, 5002, to, 6002)
        ]
    );
}

#[test]
fn uplink_next_hop_is_on_link_or_the_gateway() {
    let a = addressing();
    let on_link = Ipv4Addr::new(203, 0, 113, 77);
    assert_eq!(a.uplink_next_hop(on_link), on_link);
    assert_eq!(a.uplink_next_hop(REMOTE), a.uplink_gateway);
}

#[test]
fn local_and_outside_addresses() {
    let a = addressing();
    assert!(a.is_local(a.pod_ip()) && a.is_local(a.uplink_ip()));
    assert!(!a.is_local(Ipv4Addr::new(203, 0, 113, 20)));
    assert!(a.is_outside(Ipv4Addr::new(203, 0, 113, 23)));
    assert!(!a.is_outside(Ipv4Addr::new(203, 0, 113, 24)));
    assert_eq!(a.mac(Side::Pod), EthernetAddress([2, 0x7a, 10, 244, 0, 1]));
    assert_eq!(
        a.mac(Side::Uplink),
        EthernetAddress([2, 0x7b, 203, 0, 113, 10])
    );
}
