use super::*;
use crate::wire::build::{self, Endpoints};

const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

fn view(frame: &[u8]) -> Ipv4View {
    match classify(frame) {
        Ok(Classified::Ipv4(v)) => v,
        other => panic!("not ipv4: {other:?}"),
    }
}

/// Out and back: in2out then out2in on the reply restores what the pod sent.
fn round_trip(mut out: Vec<u8>, mut reply: Vec<u8>, ext_port: u16) {
    let v = view(&out);
    let (sport, _) = v.ports().unwrap();
    translate(&mut out, &v, End::Src, EXT, ext_port, L4Csum::Full);
    assert!(build::checksums_ok(&out), "in2out checksum");
    let t = view(&out);
    assert_eq!(t.src, EXT);
    assert_eq!(t.ttl, v.ttl - 1);
    assert_eq!(t.ports().unwrap().0, ext_port);
    assert_eq!(t.dst, v.dst);

    // The reply comes to EXT:ext_port and must be restored to POD:sport.
    let rv = view(&reply);
    translate(&mut reply, &rv, End::Dst, POD, sport, L4Csum::Full);
    assert!(build::checksums_ok(&reply), "out2in checksum");
    let r = view(&reply);
    assert_eq!(r.dst, POD);
    match r.l4 {
        L4::IcmpEcho { id, .. } => assert_eq!(id, sport),
        _ => assert_eq!(r.ports().unwrap().1, sport),
    }
}

#[test]
fn tcp_translates_both_ways_with_valid_checksums() {
    let out = build::tcp(&Endpoints::new(POD, REMOTE), 40000, 80, TCP_SYN, b"");
    let reply = build::tcp(
        &Endpoints::new(REMOTE, EXT),
        80,
        61000,
        TCP_SYN | TCP_ACK,
        b"hello",
    );
    round_trip(out, reply, 61000);
}

#[test]
fn udp_translates_both_ways_with_valid_checksums() {
    let out = build::udp(&Endpoints::new(POD, REMOTE), 5353, 53, b"query", true);
    let reply = build::udp(&Endpoints::new(REMOTE, EXT), 53, 1234, b"answer!", true);
    round_trip(out, reply, 1234);
}

#[test]
fn udp_without_checksum_stays_without() {
    let mut out = build::udp(&Endpoints::new(POD, REMOTE), 5353, 53, b"q", false);
    let v = view(&out);
    translate(&mut out, &v, End::Src, EXT, 7000, L4Csum::Full);
    let l4 = v.l4_offset();
    assert_eq!(&out[l4 + 6..l4 + 8], &[0, 0]);
    assert!(build::checksums_ok(&out));
}

#[test]
fn udp_checksum_that_becomes_zero_is_sent_as_ffff() {
    // Search ports until the incremental result is 0; the wire value must be ffff.
    let out = build::udp(&Endpoints::new(POD, REMOTE), 5353, 53, b"q", true);
    let v = view(&out);
    let hit = (0..=u16::MAX).find_map(|p| {
        let mut f = out.clone();
        translate(&mut f, &v, End::Src, EXT, p, L4Csum::Full);
        let l4 = v.l4_offset();
        (f[l4 + 6..l4 + 8] == [0xff, 0xff]).then_some(f)
    });
    let f = hit.expect("some port yields a zero sum");
    assert!(build::checksums_ok(&f));
}

#[test]
fn icmp_echo_translates_id_both_ways() {
    let out = build::icmp_echo(&Endpoints::new(POD, REMOTE), true, 0x1234, 1, b"ping");
    let reply = build::icmp_echo(&Endpoints::new(REMOTE, EXT), false, 0x4321, 1, b"ping");
    round_trip(out, reply, 0x4321);
}

#[test]
fn ttl_word_decrements_with_valid_header_checksum() {
    let mut ep = Endpoints::new(POD, REMOTE);
    ep.ttl = 2;
    let mut f = build::udp(&ep, 1, 2, b"", true);
    let v = view(&f);
    translate(&mut f, &v, End::Src, EXT, 1, L4Csum::Full);
    assert_eq!(view(&f).ttl, 1);
}

#[test]
fn rejects_runts_and_truncations() {
    assert_eq!(classify(&[0u8; 13]), Err(Malformed::Runt));
    let good = build::tcp(&Endpoints::new(POD, REMOTE), 1, 2, TCP_SYN, b"");
    // Every truncation of a valid frame is rejected or classified, never a panic.
    for n in 0..good.len() {
        let r = classify(&good[..n]);
        assert!(r.is_err(), "truncated to {n} accepted: {r:?}");
    }
}

#[test]
fn rejects_bad_ip_headers() {
    let good = build::udp(&Endpoints::new(POD, REMOTE), 1, 2, b"abc", true);
    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    assert_eq!(classify(&bad_version), Err(Malformed::BadIpHeader));
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    assert_eq!(classify(&bad_ihl), Err(Malformed::BadIpHeader));
    let mut big_ihl = good.clone();
    big_ihl[14] = 0x4f;
    assert_eq!(classify(&big_ihl), Err(Malformed::BadIpHeader));
    let mut long_total = good.clone();
    long_total[16..18].copy_from_slice(&500u16.to_be_bytes());
    assert_eq!(classify(&long_total), Err(Malformed::BadIpHeader));
    let mut bad_csum = good.clone();
    bad_csum[24] ^= 0xff;
    assert_eq!(classify(&bad_csum), Err(Malformed::BadIpChecksum));
}

#[test]
fn rejects_bad_transport_headers() {
    let mut tcp = build::tcp(&Endpoints::new(POD, REMOTE), 1, 2, TCP_SYN, b"");
    tcp[34 + 12] = 4 << 4; // data offset below 5
    assert_eq!(classify(&tcp), Err(Malformed::BadL4Header));
    let mut udp = build::udp(&Endpoints::new(POD, REMOTE), 1, 2, b"abc", true);
    udp[34 + 4..34 + 6].copy_from_slice(&200u16.to_be_bytes());
    assert_eq!(classify(&udp), Err(Malformed::BadL4Header));
}

#[test]
fn other_ethertypes_are_reported() {
    let mut f = build::udp(&Endpoints::new(POD, REMOTE), 1, 2, b"", true);
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    assert_eq!(classify(&f), Ok(Classified::OtherEthertype(0x86dd)));
}

#[test]
fn padding_after_total_length_is_ignored() {
    let mut f = build::icmp_echo(&Endpoints::new(POD, REMOTE), true, 7, 1, b"");
    f.resize(60, 0xee);
    let v = view(&f);
    assert_eq!(v.total_len, 28);
    translate(&mut f, &v, End::Src, EXT, 9, L4Csum::Full);
    assert!(build::checksums_ok(&f));
}

#[test]
fn time_exceeded_quotes_the_packet_with_valid_checksums() {
    let mut ep = Endpoints::new(POD, REMOTE);
    ep.ttl = 1;
    let f = build::udp(&ep, 33434, 33434, &[0u8; 1000], true);
    let v = view(&f);
    assert!(may_send_icmp_error(&v));
    let mut out = [0u8; 600];
    let gw = Ipv4Addr::new(10, 244, 0, 1);
    let mac = EthernetAddress([0x02, 9, 9, 9, 9, 9]);
    let n = build_icmp_error(&mut out, &f, &v, mac, gw, IcmpErrorKind::TTL_EXCEEDED);
    assert_eq!(n, 14 + 576);
    let e = view(&out[..n]);
    assert_eq!((e.src, e.dst), (gw, POD));
    assert_eq!(
        e.l4,
        L4::IcmpError {
            icmp_type: ICMP_TIME_EXCEEDED,
            code: 0
        }
    );
    assert!(build::checksums_ok(&out[..n]));
    assert_eq!(&out[0..6], ep.src_mac.as_bytes());
    assert_eq!(&out[14 + 28..14 + 48], &f[14..34]);
}

#[test]
fn no_icmp_error_about_an_icmp_error() {
    let mut ep = Endpoints::new(POD, REMOTE);
    ep.ttl = 1;
    let f = build::udp(&ep, 1, 2, b"", true);
    let v = view(&f);
    let mut out = [0u8; 600];
    let n = build_icmp_error(
        &mut out,
        &f,
        &v,
        EthernetAddress([2, 0, 0, 0, 0, 9]),
        REMOTE,
        IcmpErrorKind::TTL_EXCEEDED,
    );
    assert!(!may_send_icmp_error(&view(&out[..n])));
}

#[test]
fn arp_request_round_trips() {
    let mut out = [0u8; 64];
    let mac = EthernetAddress([0x02, 1, 2, 3, 4, 5]);
    let n = build_arp_request(&mut out, mac, EXT, Ipv4Addr::new(203, 0, 113, 1));
    match classify(&out[..n]) {
        Ok(Classified::Arp(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            target_protocol_addr,
            ..
        })) => {
            assert_eq!(operation, ArpOperation::Request);
            assert_eq!(source_hardware_addr, mac);
            assert_eq!(target_protocol_addr, Ipv4Addr::new(203, 0, 113, 1));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut x: u64 = crate::wire::GOLDEN_RATIO_64;
    let base = build::tcp(&Endpoints::new(POD, REMOTE), 1, 2, TCP_SYN, b"data");
    for _ in 0..20000 {
        let mut f = base.clone();
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x as usize) % f.len();
            f[at] = (x >> 32) as u8;
        }
        let cut = (x >> 40) as usize % (f.len() + 1);
        f.truncate(cut);
        if let Ok(Classified::Ipv4(v)) = classify(&f) {
            if v.ttl > 1 {
                translate(&mut f, &v, End::Src, EXT, 5, L4Csum::Full);
            }
        }
    }
}

#[test]
fn partial_checksum_gets_only_the_address_delta() {
    for udp in [false, true] {
        let ep = Endpoints::new(POD, REMOTE);
        let mut f = if udp {
            build::udp(&ep, 40000, 53, b"payload", true)
        } else {
            build::tcp(&ep, 40000, 80, TCP_ACK, b"payload")
        };
        let l4 = 34;
        let at = l4 + if udp { 6 } else { 16 };
        let proto = if udp { PROTO_UDP } else { PROTO_TCP };
        // As the kernel hands it over with checksum offload: the plain pseudo-header sum.
        let ph = csum::pseudo_header(POD.octets(), REMOTE.octets(), proto, (f.len() - l4) as u16);
        f[at..at + 2].copy_from_slice(&(ph as u16).to_be_bytes());
        let v = view(&f);
        translate(&mut f, &v, End::Src, EXT, 61000, L4Csum::Partial);
        // Finish it as the offload engine would: sum from csum_start, complement.
        let c = csum::checksum(&f[l4..]);
        f[at..at + 2].copy_from_slice(&c.to_be_bytes());
        assert!(build::checksums_ok(&f), "udp={udp}");
        assert_eq!(view(&f).ports(), Some((61000, if udp { 53 } else { 80 })));
    }
}

#[test]
fn restore_ttl_undoes_a_translation_decrement() {
    let mut f = build::udp(&Endpoints::new(POD, REMOTE), 1, 2, b"x", true);
    let v = view(&f);
    translate(&mut f, &v, End::Src, EXT, 3, L4Csum::Full);
    restore_ttl(&mut f);
    let t = view(&f);
    assert_eq!(t.ttl, v.ttl);
    assert!(build::checksums_ok(&f));
}

#[test]
fn arp_reply_round_trips() {
    let mut out = [0u8; 64];
    let (mac, to) = (
        EthernetAddress([2, 1, 2, 3, 4, 5]),
        EthernetAddress([2, 9, 9, 9, 9, 9]),
    );
    let n = build_arp_reply(&mut out, mac, EXT, to, REMOTE);
    match classify(&out[..n]) {
        Ok(Classified::Arp(ArpRepr::EthernetIpv4 {
            operation,
            source_protocol_addr,
            target_hardware_addr,
            ..
        })) => {
            assert_eq!(
                (operation, source_protocol_addr, target_hardware_addr),
                (ArpOperation::Reply, EXT, to)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(&out[0..6], to.as_bytes());
}

#[test]
fn peek_names_the_flow_classify_finds_and_nothing_it_cannot() {
    let ep = Endpoints::new(
        Ipv4Addr::new(10, 244, 0, 2),
        Ipv4Addr::new(198, 51, 100, 10),
    );
    for f in [
        build::tcp(&ep, 40000, 443, TCP_SYN, b""),
        build::udp(&ep, 5353, 53, b"q", true),
        build::icmp_echo(&ep, true, 77, 1, b"p"),
        build::icmp_echo(&ep, false, 78, 1, b"p"),
    ] {
        let v = view(&f);
        let p = peek(&f).expect("peeked");
        assert_eq!((p.src, p.dst), (v.src, v.dst));
        assert_eq!(Some((p.sport, p.dport)), v.ports());
        assert_eq!(p.proto, f[IP + 9]);
    }
    let udp = build::udp(&ep, 5353, 53, b"q", true);
    // Truncated before the ports, not IPv4, a later fragment: nothing.
    assert_eq!(peek(&udp[..IP + 21]), None);
    assert_eq!(peek(&[]), None);
    let mut arp = udp.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(peek(&arp), None);
    let mut later = udp.clone();
    later[IP + 7] = 1;
    assert_eq!(peek(&later), None);
    // An ICMP error is no flow of its own.
    let mut err = build::icmp_echo(&ep, true, 77, 1, b"p");
    err[IP + 20] = ICMP_DEST_UNREACHABLE;
    assert_eq!(peek(&err), None);
}
