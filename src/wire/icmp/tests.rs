use smoltcp::wire::EthernetAddress;

use super::*;
use crate::wire::build::{self, Endpoints};
use crate::wire::{
    build_icmp_error, classify, translate, Classified, End, L4Csum, TCP_ACK, TCP_SYN,
};

const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The pod's port (or echo identifier) and its external mapping.
const POD_PORT: u16 = 40000;
const EXT_PORT: u16 = 61000;
const REMOTE_PORT: u16 = 5000;
/// Ethernet padding after the outer datagram: must never be touched.
const PAD: [u8; 8] = [0xa5; 8];

fn view(frame: &[u8]) -> Ipv4View {
    match classify(frame) {
        Ok(Classified::Ipv4(v)) => v,
        other => panic!("not ipv4: {other:?}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Tcp,
    UdpCsum,
    UdpNoCsum,
    Echo,
}
const INNERS: [Inner; 4] = [Inner::Tcp, Inner::UdpCsum, Inner::UdpNoCsum, Inner::Echo];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Out2In,
    In2Out,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quote {
    /// The whole quoted packet.
    Full,
    /// Header plus exactly 8 transport bytes (RFC 792 minimum).
    Min8,
    /// Header plus 18 transport bytes: just includes the TCP checksum.
    Tcp18,
}

impl Quote {
    fn len(self, ihl: usize, total: usize) -> usize {
        match self {
            Quote::Full => total,
            Quote::Min8 => ihl + 8,
            Quote::Tcp18 => (ihl + 18).min(total),
        }
    }
}

fn kind(icmp_type: u8, code: u8, rest: u32) -> IcmpErrorKind {
    IcmpErrorKind {
        icmp_type,
        code,
        rest,
    }
}

/// Every error type/code the NAT translates.
fn kinds() -> Vec<IcmpErrorKind> {
    let mut k: Vec<_> = [0, 1, 2, 3, 9, 10, 13]
        .into_iter()
        .map(|c| kind(ICMP_DEST_UNREACHABLE, c, 0))
        .collect();
    k.push(IcmpErrorKind::frag_needed(1400));
    k.push(kind(ICMP_TIME_EXCEEDED, 0, 0));
    k.push(kind(ICMP_TIME_EXCEEDED, 1, 0));
    // Parameter problem: the pointer (to the quoted TTL) is the first byte.
    k.push(kind(ICMP_PARAMETER_PROBLEM, 0, 8 << 24));
    k
}

/// A packet of `inner` kind from `src:sport` to `dst:dport`; for ICMP echo
/// the identifier is `sport` if `request`, else `dport`.
fn packet(inner: Inner, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let ep = Endpoints::new(src, dst);
    match inner {
        Inner::Tcp => build::tcp(&ep, sport, dport, TCP_SYN | TCP_ACK, b"some tcp payload"),
        Inner::UdpCsum => build::udp(&ep, sport, dport, b"udp payload.", true),
        Inner::UdpNoCsum => build::udp(&ep, sport, dport, b"no checksum", false),
        Inner::Echo if sport == REMOTE_PORT => {
            build::icmp_echo(&ep, false, dport, 7, b"ping payload")
        }
        Inner::Echo => build::icmp_echo(&ep, true, sport, 7, b"ping payload"),
    }
}

/// (what the pod sent, what left the gateway) for an outbound flow.
fn outbound(inner: Inner) -> (Vec<u8>, Vec<u8>) {
    let orig = packet(inner, POD, REMOTE, POD_PORT, 80);
    let mut sent = orig.clone();
    let v = view(&sent);
    translate(&mut sent, &v, End::Src, EXT, EXT_PORT, L4Csum::Full);
    (orig, sent)
}

/// (what the remote sent, what the gateway forwarded to the pod) for an
/// inbound packet (a reply or a port forward) to `EXT:EXT_PORT`.
fn inbound(inner: Inner) -> (Vec<u8>, Vec<u8>) {
    let orig = packet(inner, REMOTE, EXT, REMOTE_PORT, EXT_PORT);
    let mut fwd = orig.clone();
    let v = view(&fwd);
    translate(&mut fwd, &v, End::Dst, POD, POD_PORT, L4Csum::Full);
    (orig, fwd)
}

/// Recomputes the IPv4 header checksum of the header at `at`.
fn fix_ip_csum(buf: &mut [u8], at: usize) {
    let ihl = usize::from(buf[at] & 0x0f) * 4;
    buf[at + 10..at + 12].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&buf[at..at + ihl]);
    buf[at + 10..at + 12].copy_from_slice(&c.to_be_bytes());
}

/// Inserts 4 bytes of IPv4 options (NOP NOP NOP EOL) into a frame: IHL 6.
/// The transport checksum is unchanged (the pseudo-header length is too).
fn with_options(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..ETH_HLEN + 20].to_vec();
    f.extend_from_slice(&[1, 1, 1, 0]);
    f.extend_from_slice(&frame[ETH_HLEN + 20..]);
    f[ETH_HLEN] = 0x46;
    let total = u16::from_be_bytes([f[16], f[17]]) + 4;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ip_csum(&mut f, ETH_HLEN);
    f
}

/// An Ethernet frame with an ICMP error `kind` from `src` to `dst` quoting
/// `quote` (IP bytes), with correct outer checksums.
fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, kind: IcmpErrorKind, quote: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    let total = (20 + ICMP_HLEN + quote.len()) as u16;
    let mut ip = [
        0x45, 0, 0, 0, 0, 0, 0, 0, 64, PROTO_ICMP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    f.extend_from_slice(&ip);
    fix_ip_csum(&mut f, ETH_HLEN);
    f.extend_from_slice(&[kind.icmp_type, kind.code, 0, 0]);
    f.extend_from_slice(&kind.rest.to_be_bytes());
    f.extend_from_slice(quote);
    fix_icmp_csum(&mut f);
    f
}

/// Recomputes the outer ICMP checksum of an error frame (outer IHL 5..15).
fn fix_icmp_csum(f: &mut [u8]) {
    let at = ETH_HLEN + usize::from(f[ETH_HLEN] & 0x0f) * 4;
    let end = ETH_HLEN + usize::from(u16::from_be_bytes([f[16], f[17]]));
    f[at + 2..at + 4].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&f[at..end]);
    f[at + 2..at + 4].copy_from_slice(&c.to_be_bytes());
}

/// Offset and length of the quote in a well-formed error frame.
fn quote_range(f: &[u8]) -> (usize, usize) {
    let at = ETH_HLEN + usize::from(f[ETH_HLEN] & 0x0f) * 4 + ICMP_HLEN;
    let end = ETH_HLEN + usize::from(u16::from_be_bytes([f[16], f[17]]));
    (at, end - at)
}

/// Full recomputation of every checksum of an error frame: outer IPv4, outer
/// ICMP, quoted IPv4 header, and the quoted transport checksum when the
/// whole quoted packet is present.
fn all_checksums_ok(f: &[u8]) -> bool {
    if !build::checksums_ok(f) {
        return false;
    }
    let (at, len) = quote_range(f);
    let q = &f[at..at + len];
    let ihl = usize::from(q[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([q[2], q[3]]));
    if csum::sum(&q[..ihl]) != 0xffff {
        return false;
    }
    if len >= total {
        let mut inner = vec![0u8; ETH_HLEN];
        inner.extend_from_slice(&q[..total]);
        return build::checksums_ok(&inner);
    }
    true
}

/// Checksums equal up to one's-complement zero (0x0000 vs 0xffff).
fn same_csum(a: &[u8], b: &[u8]) -> bool {
    a == b || (a == [0, 0] && b == [0xff, 0xff]) || (a == [0xff, 0xff] && b == [0, 0])
}

/// The quoted packet after translation must be the original (pre-NAT)
/// packet, except for the TTL the gateway decremented.
fn assert_restored(quote: &[u8], orig: &[u8], ttl: u8, l4_csum_at: Option<usize>) {
    let mut want = orig[ETH_HLEN..].to_vec();
    want[8] = ttl;
    fix_ip_csum(&mut want, 0);
    let want = &want[..quote.len()];
    for (i, (a, b)) in quote.iter().zip(want).enumerate() {
        if Some(i) == l4_csum_at || Some(i + 1) == l4_csum_at || i == 10 || i == 11 {
            continue;
        }
        assert_eq!(a, b, "quoted byte {i} differs");
    }
    assert!(same_csum(&quote[10..12], &want[10..12]), "inner ip csum");
    if let Some(c) = l4_csum_at {
        assert!(
            same_csum(&quote[c..c + 2], &want[c..c + 2]),
            "inner l4 csum"
        );
    }
}

fn dir_for(dir: Dir) -> ErrorDir {
    match dir {
        Dir::Out2In => ErrorDir::Out2In {
            new_outer_dst: POD,
            new_inner_src: POD,
            new_inner_sport: POD_PORT,
        },
        Dir::In2Out => ErrorDir::In2Out {
            new_outer_src: EXT,
            new_inner_dst: EXT,
            new_inner_dport: EXT_PORT,
        },
    }
}

/// Builds the error for (dir, inner, kind, quote), translates it, and checks
/// everything. Returns the translated frame (without padding).
fn check_case(dir: Dir, inner: Inner, k: IcmpErrorKind, quote: Quote, options: bool) -> Vec<u8> {
    let ctx = format!("{dir:?} {inner:?} {k:?} {quote:?} options={options}");
    let (mut orig, mut sent) = match dir {
        Dir::Out2In => outbound(inner),
        Dir::In2Out => inbound(inner),
    };
    if options {
        orig = with_options(&orig);
        sent = with_options(&sent);
    }
    let ihl = usize::from(sent[ETH_HLEN] & 0x0f) * 4;
    let ql = quote.len(ihl, sent.len() - ETH_HLEN);
    let q = &sent[ETH_HLEN..ETH_HLEN + ql];
    let (osrc, odst) = match dir {
        Dir::Out2In => (ROUTER, EXT),
        Dir::In2Out => (POD, REMOTE),
    };
    let mut f = icmp_error(osrc, odst, k, q);
    let n = f.len();
    f.extend_from_slice(&PAD);
    assert!(all_checksums_ok(&f[..n]), "fixture {ctx}");

    let v = view(&f);
    let e = parse_embedded(&f, &v).unwrap_or_else(|err| panic!("{ctx}: {err:?}"));
    let sv = view(&sent);
    assert_eq!(
        (e.src, e.dst, e.proto, e.ihl),
        (sv.src, sv.dst, sv.proto, ihl),
        "{ctx}"
    );
    assert_eq!(e.total_len, sv.total_len, "{ctx}");
    assert_eq!(e.quoted_len, ql, "{ctx}");
    let expect_ports = match (dir, inner) {
        (Dir::Out2In, Inner::Echo) => (EXT_PORT, EXT_PORT),
        (Dir::Out2In, _) => (EXT_PORT, 80),
        (Dir::In2Out, Inner::Echo) => (POD_PORT, POD_PORT),
        (Dir::In2Out, _) => (REMOTE_PORT, POD_PORT),
    };
    assert_eq!(e.ports(), expect_ports, "{ctx}");
    let csum_quoted = e.l4_csum_offset().is_some();
    assert_eq!(csum_quoted, inner != Inner::Tcp || ql >= ihl + 18, "{ctx}");

    translate_error(&mut f, &v, &e, dir_for(dir));

    assert_eq!(&f[n..], &PAD, "padding touched {ctx}");
    let f = f[..n].to_vec();
    let t = view(&f);
    assert_eq!(t.l4, v.l4, "type/code {ctx}");
    assert_eq!(t.ttl, v.ttl - 1, "{ctx}");
    let icmp = t.l4_offset();
    assert_eq!(
        &f[icmp + 4..icmp + 8],
        &k.rest.to_be_bytes(),
        "rest word {ctx}"
    );
    match dir {
        Dir::Out2In => assert_eq!((t.src, t.dst), (ROUTER, POD), "{ctx}"),
        Dir::In2Out => assert_eq!((t.src, t.dst), (EXT, REMOTE), "{ctx}"),
    }
    assert!(all_checksums_ok(&f), "checksums {ctx}");

    let e2 = parse_embedded(&f, &t).unwrap_or_else(|err| panic!("{ctx}: {err:?}"));
    let ov = view(&orig);
    assert_eq!((e2.src, e2.dst), (ov.src, ov.dst), "{ctx}");
    let restored = match (dir, inner) {
        (Dir::Out2In, Inner::Echo) => (POD_PORT, POD_PORT),
        (Dir::Out2In, _) => (POD_PORT, 80),
        (Dir::In2Out, Inner::Echo) => (EXT_PORT, EXT_PORT),
        (Dir::In2Out, _) => (REMOTE_PORT, EXT_PORT),
    };
    assert_eq!(e2.ports(), restored, "{ctx}");
    let l4_csum_rel = e2.l4_csum_offset().map(|at| at - e2.ip_offset);
    let (qa, qn) = quote_range(&f);
    assert_restored(&f[qa..qa + qn], &orig, sv.ttl, l4_csum_rel);
    f
}

#[test]
fn every_type_code_proto_and_direction_translates_with_valid_checksums() {
    let mut n = 0;
    for dir in [Dir::Out2In, Dir::In2Out] {
        for inner in INNERS {
            for k in kinds() {
                for quote in [Quote::Full, Quote::Min8, Quote::Tcp18] {
                    check_case(dir, inner, k, quote, false);
                    n += 1;
                }
            }
        }
    }
    assert_eq!(n, 2 * 4 * 11 * 3);
}

#[test]
fn quoted_ip_options_are_skipped() {
    for dir in [Dir::Out2In, Dir::In2Out] {
        for inner in INNERS {
            for quote in [Quote::Full, Quote::Min8, Quote::Tcp18] {
                let f = check_case(dir, inner, kind(3, 3, 0), quote, true);
                let e = parse_embedded(&f, &view(&f)).unwrap();
                assert_eq!(e.ihl, 24);
                assert_eq!(e.l4_offset(), e.ip_offset + 24);
            }
        }
    }
}

#[test]
fn frag_needed_keeps_the_mtu() {
    let k = IcmpErrorKind::frag_needed(1400);
    assert_eq!((k.icmp_type, k.code, k.rest), (3, 4, 1400));
    let f = check_case(Dir::Out2In, Inner::Tcp, k, Quote::Full, false);
    let at = view(&f).l4_offset();
    assert_eq!(u16::from_be_bytes([f[at + 6], f[at + 7]]), 1400);
    assert_eq!(&f[at + 4..at + 6], &[0, 0]);
}

#[test]
fn frag_needed_built_by_the_gateway_parses() {
    // The gateway's own Fragmentation Needed to a pod about a too-big packet.
    let mut ep = Endpoints::new(POD, REMOTE);
    ep.ttl = 64;
    let big = build::udp(&ep, POD_PORT, 53, &[7u8; 1400], true);
    let v = view(&big);
    let mut out = [0u8; 600];
    let gw = Ipv4Addr::new(10, 244, 0, 1);
    let mac = EthernetAddress([2, 9, 9, 9, 9, 9]);
    let k = IcmpErrorKind::frag_needed(1280);
    let n = build_icmp_error(&mut out, &big, &v, mac, gw, k);
    let f = &out[..n];
    assert!(all_checksums_ok(f));
    let ev = view(f);
    assert_eq!(
        ev.l4,
        L4::IcmpError {
            icmp_type: 3,
            code: 4
        }
    );
    let e = parse_embedded(f, &ev).unwrap();
    assert_eq!((e.src, e.dst, e.ports()), (POD, REMOTE, (POD_PORT, 53)));
    assert_eq!(e.total_len, 1428);
    assert_eq!(e.quoted_len, 548);
    assert_eq!(
        &f[ev.l4_offset() + 4..ev.l4_offset() + 8],
        &[0, 0, 0x05, 0x00]
    );
}

#[test]
fn build_icmp_error_quote_translates() {
    // A router's Time Exceeded built by the packet.rs builder (548-byte quote).
    for inner in INNERS {
        let (orig, sent) = outbound(inner);
        let sv = view(&sent);
        let mut out = [0u8; 600];
        let mac = EthernetAddress([2, 7, 7, 7, 7, 7]);
        let n = build_icmp_error(
            &mut out,
            &sent,
            &sv,
            mac,
            ROUTER,
            IcmpErrorKind::TTL_EXCEEDED,
        );
        let mut f = out[..n].to_vec();
        let v = view(&f);
        assert_eq!(v.dst, EXT);
        let e = parse_embedded(&f, &v).unwrap();
        translate_error(&mut f, &v, &e, dir_for(Dir::Out2In));
        assert!(all_checksums_ok(&f), "{inner:?}");
        let t = view(&f);
        assert_eq!(t.dst, POD);
        let e2 = parse_embedded(&f, &t).unwrap();
        assert_eq!(e2.src, POD);
        assert_eq!(e2.ports().0, POD_PORT);
        let (qa, qn) = quote_range(&f);
        let rel = e2.l4_csum_offset().map(|at| at - e2.ip_offset);
        assert_restored(&f[qa..qa + qn], &orig, sv.ttl, rel);
    }
}

#[test]
fn tcp_checksum_outside_the_quote_is_not_patched() {
    let (_, sent) = outbound(Inner::Tcp);
    let q = &sent[ETH_HLEN..ETH_HLEN + 28];
    let mut f = icmp_error(ROUTER, EXT, kind(3, 1, 0), q);
    let n = f.len();
    // Padding where the TCP checksum would be: must stay as is.
    f.extend_from_slice(&[0xee; 12]);
    let v = view(&f);
    let e = parse_embedded(&f, &v).unwrap();
    assert_eq!(e.quoted_len, 28);
    assert_eq!(e.l4_csum_offset(), None);
    let before = f[e.ip_offset + 20..].to_vec();
    translate_error(&mut f, &v, &e, dir_for(Dir::Out2In));
    assert_eq!(&f[n..], &[0xee; 12]);
    assert!(all_checksums_ok(&f[..n]));
    // Only the source port changed among the 8 transport bytes.
    assert_eq!(
        &f[e.ip_offset + 20..e.ip_offset + 22],
        &POD_PORT.to_be_bytes()
    );
    assert_eq!(&f[e.ip_offset + 22..], &before[2..]);
}

#[test]
fn udp_zero_checksum_stays_zero_and_computed_zero_is_ffff() {
    let f = check_case(
        Dir::Out2In,
        Inner::UdpNoCsum,
        kind(3, 3, 0),
        Quote::Full,
        false,
    );
    let e = parse_embedded(&f, &view(&f)).unwrap();
    let at = e.l4_offset() + 6;
    assert_eq!(&f[at..at + 2], &[0, 0]);

    // Search ports until the quoted UDP checksum comes out as zero.
    let (_, sent) = outbound(Inner::UdpCsum);
    let base = icmp_error(ROUTER, EXT, kind(3, 3, 0), &sent[ETH_HLEN..]);
    let v = view(&base);
    let e = parse_embedded(&base, &v).unwrap();
    let at = e.l4_offset() + 6;
    let hit = (0..=u16::MAX).find_map(|p| {
        let mut f = base.clone();
        let d = ErrorDir::Out2In {
            new_outer_dst: POD,
            new_inner_src: POD,
            new_inner_sport: p,
        };
        translate_error(&mut f, &v, &e, d);
        (f[at..at + 2] == [0xff, 0xff]).then_some(f)
    });
    let f = hit.expect("some port gives a zero sum");
    assert!(all_checksums_ok(&f));
}

#[test]
fn rejects_bad_outer_icmp_checksum() {
    let (_, sent) = outbound(Inner::UdpCsum);
    let good = icmp_error(ROUTER, EXT, kind(3, 3, 0), &sent[ETH_HLEN..]);
    let v = view(&good);
    assert!(parse_embedded(&good, &v).is_ok());
    // A flipped bit anywhere in the ICMP message, checksum field included.
    for at in v.l4_offset()..good.len() {
        let mut f = good.clone();
        f[at] ^= 0x10;
        assert_eq!(
            parse_embedded(&f, &v),
            Err(BadIcmpError::BadIcmpChecksum),
            "byte {at}"
        );
    }
}

#[test]
fn rejects_bad_inner_ip_checksum() {
    let (_, mut sent) = outbound(Inner::Tcp);
    sent[ETH_HLEN + 8] -= 1; // TTL changed, header checksum left stale
    let f = icmp_error(ROUTER, EXT, kind(11, 0, 0), &sent[ETH_HLEN..]);
    assert_eq!(
        parse_embedded(&f, &view(&f)),
        Err(BadIcmpError::BadInnerIpChecksum)
    );
}

#[test]
fn rejects_truncated_quotes() {
    let (_, sent) = outbound(Inner::Tcp);
    let ip = &sent[ETH_HLEN..];
    for n in 0..28 {
        let f = icmp_error(ROUTER, EXT, kind(3, 1, 0), &ip[..n]);
        assert_eq!(
            parse_embedded(&f, &view(&f)),
            Err(BadIcmpError::Truncated),
            "{n} bytes"
        );
    }
    let f = icmp_error(ROUTER, EXT, kind(3, 1, 0), &ip[..28]);
    assert!(parse_embedded(&f, &view(&f)).is_ok());
    // With options: 24-byte header, so 31 bytes are still too few.
    let opt = with_options(&sent);
    let ip = &opt[ETH_HLEN..];
    for n in [20, 23, 24, 31] {
        let f = icmp_error(ROUTER, EXT, kind(3, 1, 0), &ip[..n]);
        assert_eq!(
            parse_embedded(&f, &view(&f)),
            Err(BadIcmpError::Truncated),
            "{n} bytes"
        );
    }
    let f = icmp_error(ROUTER, EXT, kind(3, 1, 0), &ip[..32]);
    assert_eq!(parse_embedded(&f, &view(&f)).unwrap().ihl, 24);
}

#[test]
fn rejects_bad_inner_headers() {
    let (_, sent) = outbound(Inner::UdpCsum);
    let mut ip = sent[ETH_HLEN..].to_vec();
    type Mutation = fn(&mut Vec<u8>);
    let cases: [(Mutation, BadIcmpError); 6] = [
        (|q| q[0] = 0x65, BadIcmpError::BadInnerIpHeader),
        (|q| q[0] = 0x44, BadIcmpError::BadInnerIpHeader),
        (
            |q| q[2..4].copy_from_slice(&27u16.to_be_bytes()),
            BadIcmpError::BadInnerIpHeader,
        ),
        (|q| q[7] = 1, BadIcmpError::InnerFragment),
        (|q| q[9] = 47, BadIcmpError::UnsupportedInner),
        // An ICMP error about an ICMP error (not echo).
        (
            |q| {
                q[9] = PROTO_ICMP;
                q[20] = ICMP_TIME_EXCEEDED;
            },
            BadIcmpError::UnsupportedInner,
        ),
    ];
    for (i, (mutate, want)) in cases.into_iter().enumerate() {
        let mut q = ip.clone();
        mutate(&mut q);
        fix_ip_csum(&mut q, 0);
        let f = icmp_error(ROUTER, EXT, kind(3, 3, 0), &q);
        assert_eq!(parse_embedded(&f, &view(&f)), Err(want), "case {i}");
    }
    // A quoted first fragment (MF set, offset 0) still has its ports.
    ip[6] |= 0x20;
    fix_ip_csum(&mut ip, 0);
    let f = icmp_error(ROUTER, EXT, kind(3, 3, 0), &ip);
    assert!(parse_embedded(&f, &view(&f)).is_ok());
}

#[test]
fn inner_total_length_may_exceed_the_quote() {
    let (_, sent) = outbound(Inner::Tcp);
    let sv = view(&sent);
    let f = icmp_error(ROUTER, EXT, kind(3, 4, 576), &sent[ETH_HLEN..ETH_HLEN + 30]);
    let e = parse_embedded(&f, &view(&f)).unwrap();
    assert_eq!((e.total_len, e.quoted_len), (sv.total_len, 30));
}

#[test]
fn rejects_non_errors_and_fragmented_errors() {
    let echo = build::icmp_echo(&Endpoints::new(REMOTE, EXT), true, 1, 1, b"x");
    assert_eq!(
        parse_embedded(&echo, &view(&echo)),
        Err(BadIcmpError::NotIcmpError)
    );
    let udp = build::udp(&Endpoints::new(REMOTE, EXT), 1, 2, b"x", true);
    assert_eq!(
        parse_embedded(&udp, &view(&udp)),
        Err(BadIcmpError::NotIcmpError)
    );
    let (_, sent) = outbound(Inner::Tcp);
    let mut f = icmp_error(ROUTER, EXT, kind(3, 3, 0), &sent[ETH_HLEN..]);
    f[ETH_HLEN + 6] |= 0x20; // more fragments
    fix_ip_csum(&mut f, ETH_HLEN);
    assert_eq!(parse_embedded(&f, &view(&f)), Err(BadIcmpError::Fragmented));
}

#[test]
fn mismatched_views_never_panic() {
    let (_, sent) = outbound(Inner::Tcp);
    let f = icmp_error(ROUTER, EXT, kind(3, 3, 0), &sent[ETH_HLEN..]);
    let v = view(&f);
    let e = parse_embedded(&f, &v).unwrap();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..5000 {
        let mut bv = v;
        let mut be = e;
        let pick = |r: u64| match r % 4 {
            0 => r as usize,
            1 => usize::MAX - (r as usize % 8),
            _ => (r as usize) % 200,
        };
        bv.ihl = pick(next());
        bv.total_len = pick(next());
        be.ip_offset = pick(next());
        be.ihl = pick(next());
        be.quoted_len = pick(next());
        let cut = (next() as usize) % (f.len() + 1);
        let mut g = f[..cut].to_vec();
        let _ = parse_embedded(&g, &bv);
        translate_error(&mut g, &bv, &be, dir_for(Dir::Out2In));
        translate_error(&mut g, &v, &be, dir_for(Dir::In2Out));
        translate_error(&mut g, &bv, &e, dir_for(Dir::Out2In));
    }
}

/// Outer IPv4, outer ICMP and quoted IPv4 checksums (the quoted transport
/// checksum of a mutated frame may be anything: it is never checked).
fn core_checksums_ok(f: &[u8], v: &Ipv4View, e: &EmbeddedView) -> bool {
    let end = ETH_HLEN + v.total_len;
    csum::sum(&f[ETH_HLEN..ETH_HLEN + v.ihl]) == 0xffff
        && csum::sum(&f[v.l4_offset()..end]) == 0xffff
        && csum::sum(&f[e.ip_offset..e.ip_offset + e.ihl]) == 0xffff
}

/// Recomputes whatever checksums of a mutated frame can be found in bounds.
fn try_fix(f: &mut [u8]) {
    if f.len() < ETH_HLEN + 20 {
        return;
    }
    let ihl = usize::from(f[ETH_HLEN] & 0x0f) * 4;
    let end = ETH_HLEN + usize::from(u16::from_be_bytes([f[16], f[17]]));
    if ihl < 20 || end > f.len() || ETH_HLEN + ihl + ICMP_HLEN + 20 > end {
        return;
    }
    let q = ETH_HLEN + ihl + ICMP_HLEN;
    let qihl = usize::from(f[q] & 0x0f) * 4;
    if qihl >= 20 && q + qihl <= end {
        fix_ip_csum(f, q);
    }
    let at = ETH_HLEN + ihl;
    f[at + 2..at + 4].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&f[at..end]);
    f[at + 2..at + 4].copy_from_slice(&c.to_be_bytes());
    fix_ip_csum(f, ETH_HLEN);
}

#[test]
fn random_mutations_never_panic() {
    let mut bases = Vec::new();
    for inner in INNERS {
        for dir in [Dir::Out2In, Dir::In2Out] {
            let (_, sent) = match dir {
                Dir::Out2In => outbound(inner),
                Dir::In2Out => inbound(inner),
            };
            for s in [sent.clone(), with_options(&sent)] {
                let ihl = usize::from(s[ETH_HLEN] & 0x0f) * 4;
                for ql in [s.len() - ETH_HLEN, ihl + 8] {
                    bases.push(icmp_error(
                        ROUTER,
                        EXT,
                        kind(3, 3, 0),
                        &s[ETH_HLEN..ETH_HLEN + ql],
                    ));
                }
            }
        }
    }
    let mut x: u64 = crate::wire::GOLDEN_RATIO_64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut parsed, mut translated) = (0, 0);
    for i in 0..20_000 {
        let mut f = bases[i % bases.len()].clone();
        for _ in 0..1 + next() % 4 {
            let r = next();
            // Mostly the headers (outer + ICMP + quoted IP + 8), sometimes anywhere.
            let span = if r % 3 == 0 {
                f.len()
            } else {
                f.len().min(ETH_HLEN + 20 + 8 + 24 + 8)
            };
            let at = (r >> 8) as usize % span;
            f[at] = (r >> 32) as u8;
        }
        let r = next();
        if r % 4 == 0 {
            f.truncate((r >> 8) as usize % (f.len() + 1));
        } else if r % 4 == 1 {
            f.extend_from_slice(&PAD);
        }
        if next() % 2 == 0 {
            try_fix(&mut f);
        }
        let Ok(Classified::Ipv4(v)) = classify(&f) else {
            continue;
        };
        let Ok(e) = parse_embedded(&f, &v) else {
            continue;
        };
        parsed += 1;
        if v.ttl <= 1 {
            continue;
        }
        for dir in [Dir::Out2In, Dir::In2Out] {
            let mut g = f.clone();
            translate_error(&mut g, &v, &e, dir_for(dir));
            translated += 1;
            assert!(core_checksums_ok(&g, &v, &e), "iteration {i}");
            let t = view(&g);
            assert_eq!(t.l4, v.l4);
            assert!(parse_embedded(&g, &t).is_ok(), "iteration {i}");
        }
    }
    // The mutations must reach the translation, not just the checksum check.
    assert!(parsed > 2000, "only {parsed} parsed");
    assert!(translated > 2000, "only {translated} translated");
}

#[test]
fn rate_limit_bursts_then_refills() {
    let mut rl = IcmpRateLimit::new(10, 5);
    let t0 = 1_000_000;
    for i in 0..5 {
        assert!(rl.allow(t0), "burst {i}");
    }
    assert!(!rl.allow(t0));
    // 10 per second: one token every 100 ms, accrued in fractions.
    assert!(!rl.allow(t0 + 50));
    assert!(rl.allow(t0 + 100));
    assert!(!rl.allow(t0 + 150));
    assert!(rl.allow(t0 + 200));
    // A long pause refills to the burst, not beyond.
    let t1 = t0 + 3_600_000;
    for i in 0..5 {
        assert!(rl.allow(t1), "refill {i}");
    }
    assert!(!rl.allow(t1));
    // A clock going backwards adds nothing, and does not move time back.
    assert!(!rl.allow(t0));
    assert!(!rl.allow(t1 + 50));
    assert!(rl.allow(t1 + 100));
}

#[test]
fn rate_limit_steady_rate_and_edges() {
    let mut rl = IcmpRateLimit::default();
    // Three tries a millisecond against 1000/s: the burst of 50, then one a
    // millisecond (the first millisecond refills nothing).
    let allowed = (0..10_000u64)
        .flat_map(|ms| [ms; 3])
        .filter(|&ms| rl.allow(ms))
        .count();
    assert_eq!(allowed, 50 + 9_999);
    let mut none = IcmpRateLimit::new(1000, 0);
    assert!(!(0..100).any(|ms| none.allow(ms)));
    let mut once = IcmpRateLimit::new(0, 3);
    assert_eq!((0..100_000).filter(|&ms| once.allow(ms)).count(), 3);
    let mut huge = IcmpRateLimit::new(u32::MAX, u32::MAX);
    assert!(huge.allow(0));
    assert!(huge.allow(u64::MAX));
}

#[test]
fn rate_limit_applies_like_the_kernel_ratemask() {
    assert!(IcmpRateLimit::applies_to(IcmpErrorKind::TTL_EXCEEDED));
    assert!(IcmpRateLimit::applies_to(kind(3, 13, 0)));
    assert!(IcmpRateLimit::applies_to(kind(12, 0, 0)));
    assert!(!IcmpRateLimit::applies_to(IcmpErrorKind::frag_needed(1500)));
    assert!(!IcmpRateLimit::applies_to(kind(0, 0, 0)));
    assert!(!IcmpRateLimit::applies_to(kind(200, 0, 0)));
}
