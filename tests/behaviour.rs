//! NAT behaviour beyond the basics (RFC 5508 ICMP errors, path MTU,
//! fragments), end to end with kernel peers, in a two-router topology:
//!
//! ```text
//!  pod ── tapnat ── ext (router 203.0.113.1, forwarding) ══ link MTU ══ far 192.0.2.2
//! ```
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tapnat::config::Config;
use tapnat::gateway::stats::Counter;
use tapnat::gateway::Gateway;
use tapnat::lab::{
    Echo, IcmpListener, Lab, Pinger, EXT_ROUTER_IP, FAR_IP, GATEWAY_POD_IP, GATEWAY_UPLINK_IP,
    POD_IP, SERVER_IP,
};

mod common;
use common::*;

/// Each test runs twice, as `NAME::tap` and `NAME::raw`: over an uplink
/// TAP and over a raw AF_PACKET uplink (a veth end in the gateway's uplink
/// namespace).
macro_rules! over_both_uplinks {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use tapnat::config::UplinkKind;
            use tapnat::lab::over_uplink;
            #[test]
            fn tap() {
                over_uplink(UplinkKind::Tap, super::$name);
            }
            #[test]
            fn raw() {
                over_uplink(UplinkKind::Raw, super::$name);
            }
        }
    )*};
}

over_both_uplinks!(
    traceroute_udp_icmp_and_tcp_through_the_gateway,
    icmp_error_for_no_flow_is_dropped,
    path_mtu_discovery_through_the_gateway,
    gateway_sends_fragmentation_needed_for_df_packets_too_big_for_the_uplink,
    gateway_fragments_packets_without_df_for_a_smaller_uplink,
    fragmented_udp_both_ways,
    gateway_icmp_errors_are_rate_limited,
    snat_pool_gives_each_pod_its_paired_address,
    excluded_destinations_are_routed_untranslated_with_replies,
    pod_to_pod_through_the_gateway_is_routed_back_out_of_the_pod_side,
    port_forward_reaches_the_pod_with_the_real_client_address,
    hairpin_to_the_pods_own_forward_uses_its_outside_mapping,
    filtering_modes_let_in_what_they_say,
    an_out_of_window_rst_from_outside_does_not_kill_the_flow,
    a_syn_flood_from_a_pod_cannot_push_out_established_flows,
    udp_forward_range_and_the_pods_port_unreachable_goes_back_translated,
    hairpin_between_pods_through_a_mapping,
    icmp_error_about_a_hairpinned_packet_goes_back_to_the_sender,
    fragmented_udp_routed_pod_to_pod_and_hairpinned_through_a_forward,
    a_pod_at_its_limits_is_refused_while_another_pods_flows_keep_working,
    udp_gso_sends_cross_whole_both_ways,
    udp_gso_sends_are_cut_into_their_datagrams_for_a_smaller_uplink,
);

/// A lab whose external namespace routes to a far host over a `link_mtu` link.
fn start_far(tag: &str, link_mtu: u16, tweak: impl FnOnce(&mut Config)) -> (Lab, Gateway) {
    let mut lab = Lab::new(tag).expect("namespaces");
    lab.add_far(tag, link_mtu).expect("far host");
    start_in(lab, tweak)
}

/// One traceroute probe of `mode` with `ttl` from the pod: who answered.
fn probe(lab: &Lab, icmp: &IcmpListener, mode: &str, ttl: u32, seq: u16) -> Option<Ipv4Addr> {
    let dport = 33434 + seq;
    match mode {
        "udp" => {
            let s = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 0));
            s.set_ttl(ttl).unwrap();
            let sport = s.local_addr().unwrap().port();
            s.send_to(b"trace", SocketAddrV4::new(FAR_IP, dport))
                .unwrap();
            icmp.error_for(17, sport, dport, T).unwrap().map(|e| e.from)
        }
        "tcp" => {
            let to = SocketAddrV4::new(FAR_IP, 7777);
            let r = lab
                .pod
                .run(move || {
                    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                    s.set_ttl_v4(ttl)?;
                    s.bind(&SocketAddrV4::new(POD_IP, 0).into())?;
                    let sport = s.local_addr()?.as_socket_ipv4().map_or(0, |a| a.port());
                    Ok::<_, std::io::Error>((
                        s.connect_timeout(&to.into(), Duration::from_millis(800)),
                        sport,
                    ))
                })
                .unwrap()
                .unwrap();
            match r {
                (Ok(()), _) => Some(FAR_IP),
                (Err(_), sport) => icmp.error_for(6, sport, 7777, T).unwrap().map(|e| e.from),
            }
        }
        _ => {
            let mut p = Pinger::new(&lab.pod).unwrap();
            match p.echo(FAR_IP, ttl, 32, T).unwrap() {
                Echo::Reply { from, .. } | Echo::Error { from, .. } => Some(from),
                Echo::Timeout => None,
            }
        }
    }
}

fn traceroute_udp_icmp_and_tcp_through_the_gateway() {
    if !root() {
        return;
    }
    let (lab, gw) = start_far("trace", 1500, |_| {});
    let far = lab.far.as_ref().unwrap();
    let _listener = common::tcp_listen(far, SocketAddrV4::new(FAR_IP, 7777));
    let icmp = IcmpListener::new(&lab.pod).unwrap();
    let want = [Some(GATEWAY_POD_IP), Some(EXT_ROUTER_IP), Some(FAR_IP)];
    let mut seq = 0;
    for mode in ["udp", "icmp", "tcp"] {
        let hops: Vec<_> = (1..=3)
            .map(|ttl| {
                seq += 1;
                probe(&lab, &icmp, mode, ttl, seq)
            })
            .collect();
        assert_eq!(
            hops,
            want,
            "traceroute -{mode}: {}",
            tapnat::ops::report::stats(&gw.stats())
        );
    }
    let s = gw.stats();
    // Hop 2 for each mode and the far host's port unreachable came back translated.
    assert!(
        s.get(Counter::IcmpErrorsTranslated) >= 4,
        "{}",
        tapnat::ops::report::stats(&s)
    );
    assert!(s.get(Counter::IcmpErrorsSent) >= 3);
}

fn icmp_error_for_no_flow_is_dropped() {
    if !root() {
        return;
    }
    let (lab, gw) = start("icmp-noflow", |_| {});
    // The external host pings the gateway, then sends it a forged port
    // unreachable quoting a UDP packet from 203.0.113.10:4444 it never sent.
    let mut p = Pinger::new(&lab.ext).unwrap();
    assert_eq!(p.ping(GATEWAY_UPLINK_IP, 1, T).unwrap().len(), 1);
    let quoted = tapnat::wire::build::udp(
        &tapnat::wire::build::Endpoints::new(GATEWAY_UPLINK_IP, SERVER_IP),
        4444,
        53,
        b"x",
        true,
    );
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[14..14 + 28]);
    let c = tapnat::wire::csum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let raw = lab
        .ext
        .run(|| Socket::new(Domain::IPV4, Type::RAW, Some(socket2::Protocol::ICMPV4)))
        .unwrap()
        .unwrap();
    raw.send_to(&icmp, &SocketAddrV4::new(GATEWAY_UPLINK_IP, 0).into())
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gw.stats().get(Counter::DropIcmpErrorNoFlow), 1);
    assert_eq!(gw.stats().get(Counter::PodTxFrames), 0);
}

fn path_mtu_discovery_through_the_gateway() {
    if !root() {
        return;
    }
    // The ext -> far link has MTU 1280; the pod's is 1500.
    let (lab, gw) = start_far("pmtu", 1280, |_| {});
    let far = lab.far.as_ref().unwrap();
    let listener = common::tcp_listen(far, SocketAddrV4::new(FAR_IP, 9000));
    const SIZE: usize = 4 << 20;
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 65536];
        while got < SIZE {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got += n;
        }
        s.write_all(b"ok").unwrap();
        got
    });
    let mut c = tcp_connect(&lab.pod, SocketAddrV4::new(FAR_IP, 9000)).unwrap();
    c.write_all(&vec![7u8; SIZE]).unwrap();
    let mut ok = [0u8; 2];
    c.read_exact(&mut ok).unwrap();
    assert_eq!(server.join().unwrap(), SIZE);
    // The router's Fragmentation Needed reached the pod, translated.
    let s = gw.stats();
    assert!(
        s.get(Counter::IcmpErrorsTranslated) >= 1,
        "{}",
        tapnat::ops::report::stats(&s)
    );
    let route = lab.pod.ip(&format!("route get {FAR_IP}")).unwrap();
    assert!(
        route.contains("mtu 1280"),
        "pod learned the path MTU: {route}"
    );
}

fn gateway_sends_fragmentation_needed_for_df_packets_too_big_for_the_uplink() {
    if !root() {
        return;
    }
    let (lab, gw) = start("fragneeded", |c| c.uplink.mtu = 1280);
    let icmp = IcmpListener::new(&lab.pod).unwrap();
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5000));
    let cli = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 41000));
    // Linux sets DF on UDP by default (IP_PMTUDISC_WANT).
    cli.send_to(&[1u8; 1400], SocketAddrV4::new(SERVER_IP, 5000))
        .unwrap();
    let e = icmp
        .error_for(17, 41000, 5000, T)
        .unwrap()
        .expect("an ICMP error");
    assert_eq!(
        (e.from, e.icmp_type, e.code, e.rest & 0xffff),
        (GATEWAY_POD_IP, 3, 4, 1280)
    );
    assert!(gw.stats().get(Counter::DropTooBig) >= 1);
    // The pod's kernel now knows; a datagram that fits still goes through.
    cli.send_to(&[2u8; 1000], SocketAddrV4::new(SERVER_IP, 5000))
        .unwrap();
    let mut b = [0u8; 2000];
    let (n, _) = srv.recv_from(&mut b).unwrap();
    assert_eq!(n, 1000);
}

fn gateway_fragments_packets_without_df_for_a_smaller_uplink() {
    if !root() {
        return;
    }
    let (lab, gw) = start("fragment", |c| c.uplink.mtu = 1280);
    // A locked route MTU makes the pod's kernel clear DF (RFC 1191 opt-out).
    lab.pod
        .ip("route replace default via 10.244.0.1 mtu lock 1500")
        .unwrap();
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5000));
    let cli = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 0));
    let data: Vec<u8> = (0..1400u32).map(|i| i as u8).collect();
    cli.send_to(&data, SocketAddrV4::new(SERVER_IP, 5000))
        .unwrap();
    let mut b = [0u8; 2000];
    let (n, peer) = srv.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], &data[..]);
    assert_eq!(peer.ip(), std::net::IpAddr::V4(GATEWAY_UPLINK_IP));
    assert!(gw.stats().get(Counter::FragmentsCreated) >= 2);
}

fn fragmented_udp_both_ways() {
    if !root() {
        return;
    }
    let (lab, gw) = start("frags", |_| {});
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 6000));
    let cli = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 0));
    for round in 0..5u8 {
        // 6000 bytes: the kernels fragment it on both sides (MTU 1500).
        let data: Vec<u8> = (0..6000u32).map(|i| (i as u8) ^ round).collect();
        cli.send_to(&data, SocketAddrV4::new(SERVER_IP, 6000))
            .unwrap();
        let mut b = vec![0u8; 9000];
        let (n, peer) = srv.recv_from(&mut b).unwrap();
        assert_eq!(&b[..n], &data[..], "round {round} outbound");
        assert_eq!(peer.ip(), std::net::IpAddr::V4(GATEWAY_UPLINK_IP));
        srv.send_to(&data, peer).unwrap();
        let (n, _) = cli.recv_from(&mut b).unwrap();
        assert_eq!(&b[..n], &data[..], "round {round} inbound");
    }
    let s = gw.stats();
    assert!(
        s.get(Counter::FragmentsTranslated) >= 40,
        "{}",
        tapnat::ops::report::stats(&s)
    );
    assert_eq!(s.get(Counter::DropFragmentTimeout), 0);
}

fn gateway_icmp_errors_are_rate_limited() {
    if !root() {
        return;
    }
    let (lab, gw) = start("ratelimit", |c| {
        c.nat.icmp_errors_per_sec = 2;
        c.nat.icmp_errors_burst = 2;
        c.workers.threads = 1;
    });
    let mut p = Pinger::new(&lab.pod).unwrap();
    let mut answered = 0;
    for _ in 0..20 {
        if let Echo::Error { .. } = p.echo(SERVER_IP, 1, 8, Duration::from_millis(50)).unwrap() {
            answered += 1;
        }
    }
    let s = gw.stats();
    assert!(answered <= 4, "{answered} Time Exceeded answers");
    assert!(
        s.get(Counter::IcmpErrorsRateLimited) >= 15,
        "{}",
        tapnat::ops::report::stats(&s)
    );
}

fn snat_pool_gives_each_pod_its_paired_address() {
    if !root() {
        return;
    }
    let (lab, gw) = start("snat", |c| {
        let toml = format!(
            "{}\n[[snat]]\nsource = \"10.244.0.0/24\"\nto = \"203.0.113.20-203.0.113.23\"\n",
            tapnat::config::DEFAULT_TOML
        );
        let snat = Config::from_toml_str(&toml).unwrap().snat;
        c.snat = snat;
    });
    let want = tapnat::gateway::paired_address(&gw.addressing().snat[0], POD_IP);
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5000));
    let cli = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 0));
    for i in 0..3u8 {
        cli.send_to(&[i], SocketAddrV4::new(SERVER_IP, 5000))
            .unwrap();
        let mut b = [0u8; 8];
        let (_, peer) = srv.recv_from(&mut b).unwrap();
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::V4(want),
            "the pod's paired pool address"
        );
        // The external kernel ARPs for the pool address to answer.
        srv.send_to(b"back", peer).unwrap();
        let r = cli.recv_from(&mut b);
        assert!(
            r.is_ok(),
            "{} {:?}",
            tapnat::ops::report::stats(&gw.stats()),
            lab.ext.ip("neigh show")
        );
        assert_eq!(&b[..r.unwrap().0], b"back");
    }
    let neigh = lab.ext.ip(&format!("neigh show {want}")).unwrap();
    let mac = gw.addressing().uplink_mac.to_string().replace('-', ":");
    assert!(neigh.contains(&mac), "{neigh}");
}

fn excluded_destinations_are_routed_untranslated_with_replies() {
    if !root() {
        return;
    }
    let (lab, gw) = start("route", |c| {
        c.masquerade[0]
            .exclude
            .push("198.51.100.0/24".parse().unwrap());
    });
    lab.ext
        .ip(&format!("route add 10.244.0.0/16 via {GATEWAY_UPLINK_IP}"))
        .unwrap();
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5000));
    let cli = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 40123));
    cli.send_to(b"hi", SocketAddrV4::new(SERVER_IP, 5000))
        .unwrap();
    let mut b = [0u8; 8];
    let (_, peer) = srv.recv_from(&mut b).unwrap();
    assert_eq!(
        peer,
        SocketAddrV4::new(POD_IP, 40123).into(),
        "not translated"
    );
    srv.send_to(b"back", peer).unwrap();
    let (n, _) = cli.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"back");
    // ICMP echo is routed too, its identifier untouched.
    let mut p = Pinger::new(&lab.pod).unwrap();
    assert_eq!(p.ping(SERVER_IP, 2, T).unwrap().len(), 2);
    // Unsolicited traffic to the pod from there is still not let in.
    let other = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5001));
    other
        .send_to(b"sneak", SocketAddrV4::new(POD_IP, 40123))
        .unwrap();
    cli.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(cli.recv_from(&mut b).is_err());
    let s = gw.stats();
    assert_eq!(
        s.get(Counter::RoutedPackets),
        6,
        "{}",
        tapnat::ops::report::stats(&s)
    );
    assert_eq!(s.get(Counter::FlowsCreated), 0);
    assert!(s.get(Counter::DropNoFlow) >= 1);
}

fn pod_to_pod_through_the_gateway_is_routed_back_out_of_the_pod_side() {
    if !root() {
        return;
    }
    let (mut lab, gw) = start("pod2pod", |_| {});
    lab.add_pod2("pod2pod", "tapnat0").unwrap();
    let pod2 = lab.pod2.as_ref().unwrap();
    // Each pod reaches the other through the gateway, as with /32 pod routes.
    lab.pod
        .ip(&format!(
            "route add {}/32 via {GATEWAY_POD_IP}",
            tapnat::lab::POD2_IP
        ))
        .unwrap();
    pod2.ip(&format!("route add {POD_IP}/32 via {GATEWAY_POD_IP}"))
        .unwrap();
    let a = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 7000));
    let b = udp_in(pod2, SocketAddrV4::new(tapnat::lab::POD2_IP, 7000));
    a.send_to(b"ping", SocketAddrV4::new(tapnat::lab::POD2_IP, 7000))
        .unwrap();
    let mut buf = [0u8; 8];
    let (n, peer) = b.recv_from(&mut buf).unwrap();
    assert_eq!(
        (&buf[..n], peer),
        (&b"ping"[..], SocketAddrV4::new(POD_IP, 7000).into())
    );
    b.send_to(b"pong", peer).unwrap();
    let (n, _) = a.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"pong");
    assert_eq!(gw.stats().get(Counter::RoutedPackets), 2);
}

/// Forward outside TCP 8080 to the pod's port 80, inside the default
/// `nat.ports` (the forwarded port is taken out of the dynamic pool).
fn with_forward(c: &mut Config) {
    use tapnat::config::{Forward, ForwardProtocol};
    use tapnat::net::PortRange;
    c.forward = vec![Forward {
        protocol: ForwardProtocol::Tcp,
        ports: PortRange {
            first: 8080,
            last: 8080,
        },
        to_addr: POD_IP,
        to_port: 80,
    }];
}

fn port_forward_reaches_the_pod_with_the_real_client_address() {
    if !root() {
        return;
    }
    let (lab, gw) = start("forward", with_forward);
    let listener = tcp_listen(&lab.pod, SocketAddrV4::new(POD_IP, 80));
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        writeln!(s, "{peer}").unwrap();
    });
    let mut c = tcp_connect(&lab.ext, SocketAddrV4::new(GATEWAY_UPLINK_IP, 8080)).unwrap();
    let mut seen = String::new();
    c.read_to_string(&mut seen).unwrap();
    server.join().unwrap();
    let local = c.local_addr().unwrap();
    assert_eq!(
        seen.trim(),
        local.to_string(),
        "the pod sees the real client"
    );
    // Unforwarded ports stay closed.
    let closed = lab.ext.run(|| {
        std::net::TcpStream::connect_timeout(
            &SocketAddrV4::new(GATEWAY_UPLINK_IP, 8081).into(),
            Duration::from_millis(500),
        )
    });
    assert!(closed.unwrap().is_err());
    assert!(gw.stats().get(Counter::FlowsCreated) >= 1);
}

fn hairpin_to_the_pods_own_forward_uses_its_outside_mapping() {
    if !root() {
        return;
    }
    let (lab, gw) = start("hairpin", with_forward);
    let listener = tcp_listen(&lab.pod, SocketAddrV4::new(POD_IP, 80));
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        writeln!(s, "{peer}").unwrap();
    });
    // The pod connects to the gateway's public address and forwarded port.
    let mut c = tcp_connect(&lab.pod, SocketAddrV4::new(GATEWAY_UPLINK_IP, 8080)).unwrap();
    let mut seen = String::new();
    c.read_to_string(&mut seen).unwrap();
    server.join().unwrap();
    let peer: SocketAddrV4 = seen.trim().parse().unwrap();
    assert_eq!(
        *peer.ip(),
        GATEWAY_UPLINK_IP,
        "source translated to the outside mapping"
    );
    assert!(gw.stats().get(Counter::Hairpinned) >= 3);
}

/// A pod UDP socket talks to one server; other remotes then try its mapping.
fn filtering_case(tag: &str, filtering: tapnat::config::Filtering) -> (bool, bool) {
    let (lab, _gw) = start(tag, |c| c.nat.filtering = filtering);
    let other_ip = Ipv4Addr::new(198, 51, 100, 11);
    lab.ext
        .ip(&format!("addr add {other_ip}/32 dev lo"))
        .unwrap();
    let pod = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 45000));
    pod.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5000));
    pod.send_to(b"open", SocketAddrV4::new(SERVER_IP, 5000))
        .unwrap();
    let mut b = [0u8; 16];
    let (_, mapping) = srv.recv_from(&mut b).unwrap();
    let mut reached = |from: SocketAddrV4| {
        let s = udp_in(&lab.ext, from);
        s.send_to(b"knock", mapping).unwrap();
        pod.recv_from(&mut b).is_ok()
    };
    (
        reached(SocketAddrV4::new(SERVER_IP, 5001)),
        reached(SocketAddrV4::new(other_ip, 5000)),
    )
}

fn filtering_modes_let_in_what_they_say() {
    if !root() {
        return;
    }
    use tapnat::config::Filtering::*;
    // (same address, other port) and (other address), per RFC 4787 §5.
    assert_eq!(filtering_case("eif", EndpointIndependent), (true, true));
    assert_eq!(filtering_case("adf", Address), (true, false));
    assert_eq!(filtering_case("apdf", AddressAndPort), (false, false));
}

fn an_out_of_window_rst_from_outside_does_not_kill_the_flow() {
    if !root() {
        return;
    }
    let (lab, gw) = start("rst", |_| {});
    let listener = tcp_listen(&lab.ext, SocketAddrV4::new(SERVER_IP, 7000));
    let mut c = tcp_connect(&lab.pod, SocketAddrV4::new(SERVER_IP, 7000)).unwrap();
    let (mut s, peer) = listener.accept().unwrap();
    let SocketAddr::V4(peer) = peer else {
        unreachable!()
    };
    c.write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    // A forged RST from the server's address with a sequence number far
    // outside the window, sent from the external namespace at the mapping.
    let mut ep = tapnat::wire::build::Endpoints::new(SERVER_IP, GATEWAY_UPLINK_IP);
    ep.src_mac = smoltcp::wire::EthernetAddress([2, 0, 0, 0, 0, 0x55]);
    ep.dst_mac = gw.addressing().uplink_mac;
    let mut rst = tapnat::wire::build::tcp(&ep, 7000, peer.port(), tapnat::wire::TCP_RST, b"");
    // Sequence 0x80000000 away from anything sent; fix the checksum after.
    rst[38..42].copy_from_slice(&0x8000_0000u32.wrapping_add(12345).to_be_bytes());
    rst[50..52].copy_from_slice(&[0, 0]);
    let ph =
        tapnat::wire::csum::pseudo_header(SERVER_IP.octets(), GATEWAY_UPLINK_IP.octets(), 6, 20);
    let c16 =
        !(tapnat::wire::csum::fold(u64::from(ph) + u64::from(tapnat::wire::csum::sum(&rst[34..])))
            as u16);
    rst[50..52].copy_from_slice(&c16.to_be_bytes());
    let raw = lab
        .ext
        .run(|| tapnat::device::PacketSocket::open("tapnat1"))
        .unwrap()
        .unwrap();
    raw.send(&rst).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(gw.stats().get(Counter::DropInvalidRst), 1);
    // The connection still works both ways.
    c.write_all(b"again").unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"again");
    s.write_all(b"reply").unwrap();
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"reply");
}

fn a_syn_flood_from_a_pod_cannot_push_out_established_flows() {
    if !root() {
        return;
    }
    let (lab, gw) = start("flood", |c| {
        c.nat.max_flows = 64;
        c.workers.threads = 1;
    });
    let listener = tcp_listen(&lab.ext, SocketAddrV4::new(SERVER_IP, 7000));
    let mut c = tcp_connect(&lab.pod, SocketAddrV4::new(SERVER_IP, 7000)).unwrap();
    let (mut s, _) = listener.accept().unwrap();
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    // 500 SYNs to a port nobody answers from (the ext kernel is told to drop
    // them), from a raw packet socket in the pod: half-open flows.
    lab.ext.ip("route add blackhole 198.51.100.99/32").unwrap();
    let raw = lab
        .pod
        .run(|| tapnat::device::PacketSocket::open("tapnat0"))
        .unwrap()
        .unwrap();
    let mut ep = tapnat::wire::build::Endpoints::new(POD_IP, Ipv4Addr::new(198, 51, 100, 99));
    ep.dst_mac = gw.addressing().pod_mac;
    for i in 0..500u16 {
        let syn = tapnat::wire::build::tcp(&ep, 20000 + i, 80, tapnat::wire::TCP_SYN, b"");
        raw.send(&syn).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let st = gw.stats();
    // Half-open flows were evicted early to make room for newer ones (the
    // table never held more than 64), and the connection was never one of them.
    assert!(
        st.get(Counter::FlowsCreated) > 64,
        "{}",
        tapnat::ops::report::stats(&st)
    );
    // The established connection is untouched.
    c.write_all(b"y").unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"y");
    assert!(gw.flows().len() <= 64);
}

fn udp_forward_range_and_the_pods_port_unreachable_goes_back_translated() {
    if !root() {
        return;
    }
    use tapnat::config::{Forward, ForwardProtocol};
    use tapnat::net::PortRange;
    let (lab, gw) = start("udpfwd", |c| {
        c.forward = vec![Forward {
            protocol: ForwardProtocol::Udp,
            ports: PortRange {
                first: 5300,
                last: 5309,
            },
            to_addr: POD_IP,
            to_port: 53,
        }];
    });
    // Outside 5301 is the pod's 54 (a range maps to a range).
    let pod = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 54));
    let client = udp_in(&lab.ext, SocketAddrV4::new(EXT_ROUTER_IP, 0));
    client
        .send_to(b"query", SocketAddrV4::new(GATEWAY_UPLINK_IP, 5301))
        .unwrap();
    let mut b = [0u8; 16];
    let (n, from) = pod.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"query");
    assert_eq!(
        from,
        client.local_addr().unwrap(),
        "the pod sees the real client"
    );
    pod.send_to(b"answer", from).unwrap();
    let (n, back) = client.recv_from(&mut b).unwrap();
    assert_eq!(
        (&b[..n], back),
        (
            &b"answer"[..],
            SocketAddrV4::new(GATEWAY_UPLINK_IP, 5301).into()
        )
    );
    // Outside 5302 is the pod's 55, where nothing listens: the pod's port
    // unreachable goes back to the client, translated (RFC 5508 REQ-5).
    let connected = udp_in(&lab.ext, SocketAddrV4::new(EXT_ROUTER_IP, 0));
    connected
        .connect(SocketAddrV4::new(GATEWAY_UPLINK_IP, 5302))
        .unwrap();
    connected.send(b"anyone?").unwrap();
    let e = connected.recv(&mut b).expect_err("port unreachable");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(gw.stats().get(Counter::IcmpErrorsTranslated) >= 1);
}

fn hairpin_between_pods_through_a_mapping() {
    if !root() {
        return;
    }
    let (mut lab, gw) = start("hairpin2", |c| {
        c.nat.filtering = tapnat::config::Filtering::EndpointIndependent;
    });
    lab.add_pod2("hairpin2", "tapnat0").unwrap();
    let pod2 = lab.pod2.as_ref().unwrap();
    // The pod opens a mapping by talking to a server.
    let a = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 46000));
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5000));
    a.send_to(b"open", SocketAddrV4::new(SERVER_IP, 5000))
        .unwrap();
    let mut buf = [0u8; 16];
    let (_, mapping) = srv.recv_from(&mut buf).unwrap();
    // The second pod reaches the first through its public mapping.
    let b = udp_in(pod2, SocketAddrV4::new(tapnat::lab::POD2_IP, 47000));
    b.send_to(b"hi", mapping).unwrap();
    let (n, from) = a.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hi");
    assert_eq!(
        from,
        SocketAddrV4::new(GATEWAY_UPLINK_IP, 47000).into(),
        "the sender's own mapping"
    );
    a.send_to(b"yo", from).unwrap();
    let (n, back) = b.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], back), (&b"yo"[..], mapping));
    assert!(gw.stats().get(Counter::Hairpinned) >= 2);
}

fn icmp_error_about_a_hairpinned_packet_goes_back_to_the_sender() {
    if !root() {
        return;
    }
    let (mut lab, gw) = start("hairpin-err", |c| {
        c.nat.filtering = tapnat::config::Filtering::EndpointIndependent;
    });
    lab.add_pod2("hairpin-err", "tapnat0").unwrap();
    let pod2 = lab.pod2.as_ref().unwrap();
    // The pod opens a mapping, then closes the socket behind it.
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5000));
    let mapping = {
        let a = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 46001));
        a.send_to(b"open", SocketAddrV4::new(SERVER_IP, 5000))
            .unwrap();
        let mut buf = [0u8; 8];
        srv.recv_from(&mut buf).unwrap().1
    };
    // The second pod sends to that mapping; the pod's kernel answers port
    // unreachable, which must come back to the second pod translated twice.
    let b = udp_in(pod2, SocketAddrV4::new(tapnat::lab::POD2_IP, 0));
    b.connect(mapping).unwrap();
    b.send(b"anyone?").unwrap();
    let mut buf = [0u8; 8];
    let e = b.recv(&mut buf).expect_err("port unreachable");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let s = gw.stats();
    assert!(
        s.get(Counter::Hairpinned) >= 2,
        "{}",
        tapnat::ops::report::stats(&s)
    );
    assert!(
        s.get(Counter::IcmpErrorsTranslated) >= 2,
        "{}",
        tapnat::ops::report::stats(&s)
    );
}

fn fragmented_udp_routed_pod_to_pod_and_hairpinned_through_a_forward() {
    if !root() {
        return;
    }
    use tapnat::config::{Forward, ForwardProtocol};
    use tapnat::lab::POD2_IP;
    use tapnat::net::PortRange;
    let (mut lab, gw) = start("frag-p2p", |c| {
        c.forward = vec![Forward {
            protocol: ForwardProtocol::Udp,
            ports: PortRange {
                first: 9000,
                last: 9000,
            },
            to_addr: POD2_IP,
            to_port: 9000,
        }];
    });
    lab.add_pod2("frag-p2p", "tapnat0").unwrap();
    let pod2 = lab.pod2.as_ref().unwrap();
    // Pod to pod through the gateway (as with /32 pod routes); locked route
    // MTUs make the kernels send DF-clear fragments.
    lab.pod
        .ip(&format!(
            "route add {POD2_IP}/32 via {GATEWAY_POD_IP} mtu lock 1500"
        ))
        .unwrap();
    lab.pod
        .ip("route replace default via 10.244.0.1 mtu lock 1500")
        .unwrap();
    pod2.ip(&format!(
        "route add {POD_IP}/32 via {GATEWAY_POD_IP} mtu lock 1500"
    ))
    .unwrap();
    let a = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 7000));
    let b = udp_in(pod2, SocketAddrV4::new(POD2_IP, 9000));
    let mut buf = vec![0u8; 9000];
    for round in 0..3u8 {
        // 3000 bytes over MTU 1500: three fragments each way.
        let data: Vec<u8> = (0..3000u32).map(|i| (i as u8) ^ round).collect();
        a.send_to(&data, SocketAddrV4::new(POD2_IP, 9000)).unwrap();
        let (n, peer) = b.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &data[..], "round {round} routed, whole");
        assert_eq!(peer, SocketAddrV4::new(POD_IP, 7000).into(), "untranslated");
        b.send_to(&data, peer).unwrap();
        let (n, _) = a.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &data[..], "round {round} routed back, whole");
        // Hairpinned: to the gateway's outside address and forwarded port.
        a.send_to(&data, SocketAddrV4::new(GATEWAY_UPLINK_IP, 9000))
            .unwrap();
        let (n, peer) = b.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &data[..], "round {round} hairpinned, whole");
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::V4(GATEWAY_UPLINK_IP),
            "the sender's outside mapping"
        );
    }
    let s = gw.stats();
    let report = tapnat::ops::report::stats(&s);
    assert!(s.get(Counter::FragmentsTranslated) >= 18, "{report}");
    assert!(s.get(Counter::Hairpinned) >= 9, "{report}");
    assert_eq!(s.get(Counter::DropFragmentTimeout), 0, "{report}");
}

fn a_pod_at_its_limits_is_refused_while_another_pods_flows_keep_working() {
    if !root() {
        return;
    }
    use std::net::UdpSocket;
    use std::time::Instant;
    use tapnat::lab::POD2_IP;
    const FLOWS: usize = 30;
    const PORTS: u32 = 20;
    let (mut lab, gw) = start("podlimit", |c| {
        // One worker: its shares are the whole limits.
        c.workers.threads = 1;
        c.nat.max_flows_per_pod = FLOWS;
        c.nat.ports_per_pod = PORTS;
    });
    lab.add_pod2("podlimit", "tapnat0").unwrap();
    let pod2 = lab.pod2.as_ref().unwrap();
    // A UDP echo server outside, bounded in time.
    let echo = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 7001));
    echo.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let echo_stop = stop.clone();
    let echo_thread = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut b = [0u8; 64];
        while !echo_stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((n, from)) = echo.recv_from(&mut b) {
                let _ = echo.send_to(&b[..n], from);
            }
        }
    });
    let echo_to = SocketAddrV4::new(SERVER_IP, 7001);
    let echo_once = |s: &UdpSocket| -> bool {
        let mut b = [0u8; 8];
        s.send_to(b"ping", echo_to).unwrap();
        matches!(s.recv_from(&mut b), Ok((4, _)))
    };
    let listener = tcp_listen(&lab.ext, SocketAddrV4::new(SERVER_IP, 7000));
    let accept = || {
        let (s, from) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (s, from)
    };
    // Pod B's connection, established before pod A starts.
    let mut b_conn = tcp_connect(pod2, SocketAddrV4::new(SERVER_IP, 7000)).unwrap();
    let (mut b_srv, _) = accept();
    b_conn.write_all(b"b").unwrap();
    let mut byte = [0u8; 1];
    b_srv.read_exact(&mut byte).unwrap();
    // Pod A: PORTS answered TCP connections take its share of TCP ports.
    let a_conns: Vec<_> = (0..PORTS)
        .map(|_| {
            let c = tcp_connect(&lab.pod, SocketAddrV4::new(SERVER_IP, 7000)).unwrap();
            (c, accept())
        })
        .collect();
    // One more needs a port it may not have, and none of its flows is
    // unanswered: refused.
    let refused = lab
        .pod
        .run(move || {
            std::net::TcpStream::connect_timeout(
                &SocketAddrV4::new(SERVER_IP, 7000).into(),
                Duration::from_millis(1500),
            )
        })
        .unwrap();
    assert!(refused.is_err(), "a connection past ports_per_pod");
    assert!(gw.stats().get(Counter::DropPodPortLimit) >= 1);
    // Answered UDP flows up to its flow limit (UDP has its own ports).
    let a_udp: Vec<UdpSocket> = (PORTS as usize..FLOWS)
        .map(|_| {
            let s = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 0));
            assert!(echo_once(&s), "a flow below the limit");
            s
        })
        .collect();
    // Pod A now creates flows as fast as it can: a fresh socket per
    // datagram, bounded in count and time. Every one that reaches the
    // gateway is refused (an unpaced burst may lose some at the pod's TAP
    // before the gateway reads them: those are not the gateway's to count).
    let rx_before = gw.stats().get(Counter::PodRxFrames);
    let flood = lab
        .pod
        .run(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut sent = 0u32;
            while sent < 2000 && Instant::now() < deadline {
                let s = UdpSocket::bind(SocketAddrV4::new(POD_IP, 0)).unwrap();
                s.send_to(b"flood", SocketAddrV4::new(SERVER_IP, 7001))
                    .unwrap();
                sent += 1;
            }
            sent
        })
        .unwrap();
    let delivered = || {
        let rx = gw.stats().get(Counter::PodRxFrames) - rx_before;
        rx.min(u64::from(flood))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.stats().get(Counter::DropPodFlowLimit) < delivered() * 9 / 10
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = gw.stats();
    let reached = delivered();
    assert!(
        reached >= 200,
        "{flood} sent, {reached} reached the gateway"
    );
    assert!(
        st.get(Counter::DropPodFlowLimit) >= reached * 9 / 10,
        "{flood} sent, {reached} reached the gateway: {}",
        tapnat::ops::report::stats(&st)
    );
    eprintln!(
        "flood: {flood} datagrams from fresh sockets; {}",
        tapnat::ops::report::stats(&st)
    );
    // It never holds more than its share.
    let a_flows = gw.flows().iter().filter(|f| f.inside.src == POD_IP).count();
    assert_eq!(a_flows, FLOWS);
    // Its own flows still work.
    assert!(echo_once(&a_udp[0]));
    // Pod B's established connection works, and its new flows succeed.
    b_conn.write_all(b"c").unwrap();
    b_srv.read_exact(&mut byte).unwrap();
    assert_eq!(&byte, b"c");
    let mut b_new = tcp_connect(pod2, SocketAddrV4::new(SERVER_IP, 7000)).unwrap();
    let (mut b_new_srv, from) = accept();
    assert_eq!(from.ip(), std::net::IpAddr::V4(GATEWAY_UPLINK_IP));
    b_new.write_all(b"d").unwrap();
    b_new_srv.read_exact(&mut byte).unwrap();
    for _ in 0..5 {
        let s = udp_in(pod2, SocketAddrV4::new(POD2_IP, 0));
        assert!(echo_once(&s), "pod B's new UDP flow");
    }
    // The refusals show in `tapnat stats`, per reason.
    let report = tapnat::ops::report::stats(&gw.stats());
    for counter in ["drop_pod_flow_limit", "drop_pod_port_limit"] {
        assert!(report.contains(counter), "{report}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    echo_thread.join().unwrap();
    drop(a_conns);
}

/// Sends `rounds` GSO buffers of `per` datagrams of `size` bytes from `tx`
/// to `to` (a `UDP_SEGMENT` socket: one send, one super-frame), each
/// datagram numbered in its first 4 bytes, and checks that `rx` receives
/// every datagram whole and in order.
fn gso_round_trip(tx: &std::net::UdpSocket, to: SocketAddr, rx: &std::net::UdpSocket, size: u16) {
    use std::os::fd::AsFd;
    const ROUNDS: u32 = 20;
    const PER: u32 = 40;
    tapnat::device::sys::set_udp_segment(tx.as_fd(), size).unwrap();
    socket2::SockRef::from(rx)
        .set_recv_buffer_size(4 << 20)
        .unwrap();
    let size = usize::from(size);
    let mut buf = vec![0u8; size * PER as usize];
    for round in 0..ROUNDS {
        for k in 0..PER {
            let d = &mut buf[k as usize * size..(k as usize + 1) * size];
            let n = round * PER + k;
            d.fill(n as u8);
            d[..4].copy_from_slice(&n.to_be_bytes());
        }
        tx.send_to(&buf, to).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut b = vec![0u8; 65536];
    for n in 0..ROUNDS * PER {
        let got = rx
            .recv(&mut b)
            .unwrap_or_else(|e| panic!("datagram {n}: {e}"));
        assert_eq!(got, size, "datagram {n} whole");
        assert_eq!(u32::from_be_bytes([b[0], b[1], b[2], b[3]]), n, "in order");
        assert!(
            b[4..got].iter().all(|&x| x == n as u8),
            "datagram {n} intact"
        );
    }
}

fn udp_gso_sends_cross_whole_both_ways() {
    if !root() {
        return;
    }
    let (lab, gw) = start("uso", |_| {});
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5300));
    let cli = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 0));
    // Out: the pod's super-frames cross as such (USO on the pod TAP).
    gso_round_trip(&cli, SocketAddrV4::new(SERVER_IP, 5300).into(), &srv, 1400);
    let out = gw.stats().get(Counter::GsoFrames);
    assert!(out >= 20, "{}", tapnat::ops::report::stats(&gw.stats()));
    // Back: the server answers with GSO sends to the mapping.
    cli.send_to(b"hi", SocketAddrV4::new(SERVER_IP, 5300))
        .unwrap();
    let mut b = [0u8; 16];
    let (_, peer) = srv.recv_from(&mut b).unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::V4(GATEWAY_UPLINK_IP));
    gso_round_trip(&srv, peer, &cli, 1200);
    let s = gw.stats();
    eprintln!("uso: {}", tapnat::ops::report::stats(&s));
    assert_eq!(s.get(Counter::GsoSegmented), 0);
    assert_eq!(s.get(Counter::FragmentsCreated), 0);
}

fn udp_gso_sends_are_cut_into_their_datagrams_for_a_smaller_uplink() {
    if !root() {
        return;
    }
    let (lab, gw) = start("uso-cut", |c| c.uplink.mtu = 1280);
    // A locked route MTU makes the pod's kernel clear DF (RFC 1191 opt-out).
    lab.pod
        .ip("route replace default via 10.244.0.1 mtu lock 1500")
        .unwrap();
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5301));
    let cli = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 0));
    // One datagram first, so that the next hop is resolved: the 80
    // fragments of a first super-frame would not all wait for it (32 frames
    // are held per unresolved neighbour).
    cli.send_to(b"hi", SocketAddrV4::new(SERVER_IP, 5301))
        .unwrap();
    let mut b = [0u8; 16];
    srv.recv_from(&mut b).unwrap();
    gso_round_trip(&cli, SocketAddrV4::new(SERVER_IP, 5301).into(), &srv, 1400);
    let s = gw.stats();
    eprintln!("uso-cut: {}", tapnat::ops::report::stats(&s));
    assert!(s.get(Counter::GsoFrames) >= 20);
    assert_eq!(s.get(Counter::GsoSegmented), 800);
    assert_eq!(s.get(Counter::FragmentsCreated), 1600);
    assert_eq!(s.get(Counter::DropNeighbourQueueFull), 0);
}
