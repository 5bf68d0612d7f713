//! `wire::classify` on arbitrary frames, and the in-place rewrites that the
//! module contract says are safe on any (frame, classify view) pair.
//!
//! Invariants:
//! * `classify` never panics.
//! * An IPv4 view's offsets lie inside the frame: the header (of `ihl`
//!   bytes, at least 20) and the total length fit, and the transport header
//!   the view reports (TCP 20+ bytes, UDP/ICMP 8) lies inside the total
//!   length; its ports, flags and echo id are the frame's bytes there.
//! * The reported header checksum verifies, version is 4.
//! * `translate` (both ends, both checksum modes), `restore_ttl` and
//!   `build_icmp_error` on that pair never panic; after `translate` the
//!   frame still classifies as IPv4 with the same shape; the IPv4 header
//!   checksum verifies; a transport checksum that verified before (full
//!   mode, unfragmented packet) still verifies; the ICMP error built about
//!   the packet classifies and all its checksums verify.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use tapnat::wire::{
    build_icmp_error, classify, may_send_icmp_error, restore_ttl, translate, Classified, End,
    IcmpErrorKind, L4Csum, L4,
};

mod common;
use common::*;

fuzz_target!(|data: &[u8]| {
    // The first 7 bytes choose the rewrite (new address, new port, a flag
    // byte: bit 0 the end, bit 1 partial checksums, bit 2 fix the IPv4
    // header checksum first, bit 3 the transport checksum too); the rest is
    // the frame.
    if data.len() < 7 {
        let _ = classify(data);
        return;
    }
    let (params, frame) = data.split_at(7);
    let mut frame = frame.to_vec();
    if params[6] & 4 != 0 {
        // Correct checksums, so that mutations get past them.
        fix_frame(&mut frame, params[6] & 8 != 0);
    }
    let frame = &frame[..];
    let addr = Ipv4Addr::new(params[0], params[1], params[2], params[3]);
    let port = u16::from_be_bytes([params[4], params[5]]);
    let end = if params[6] & 1 == 0 {
        End::Src
    } else {
        End::Dst
    };
    let mode = if params[6] & 2 == 0 {
        L4Csum::Full
    } else {
        L4Csum::Partial
    };

    let Ok(Classified::Ipv4(v)) = classify(frame) else {
        return;
    };

    // Offsets in bounds.
    assert!(v.ihl >= 20 && v.ihl <= 60 && v.ihl % 4 == 0, "{v:?}");
    assert!(v.ihl <= v.total_len, "{v:?}");
    assert!(
        ETH_HLEN + v.total_len <= frame.len(),
        "{v:?} in {}",
        frame.len()
    );
    assert_eq!(v.l4_offset(), ETH_HLEN + v.ihl);
    let ip = &frame[ETH_HLEN..ETH_HLEN + v.total_len];
    assert_eq!(ip[0] >> 4, 4);
    assert_eq!(ihl(ip), v.ihl);
    assert_eq!(usize::from(be16(ip, 2)), v.total_len);
    assert!(ip_header_ok(ip), "checksum of {v:?}");
    assert_eq!(v.proto, ip[9]);
    assert_eq!(v.ttl, ip[8]);
    let flags = be16(ip, 6);
    assert_eq!(v.dont_frag, flags & 0x4000 != 0);
    assert_eq!(v.is_fragment, flags & 0x3fff != 0);
    let l4 = &ip[v.ihl..];
    match v.l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            hlen,
        } => {
            assert!(l4.len() >= 20 && usize::from(l4[12] >> 4) * 4 <= l4.len());
            assert_eq!((sport, dport, flags), (be16(l4, 0), be16(l4, 2), l4[13]));
            assert_eq!(usize::from(hlen), usize::from(l4[12] >> 4) * 4);
        }
        L4::Udp { sport, dport } => {
            assert!(l4.len() >= 8);
            assert_eq!((sport, dport), (be16(l4, 0), be16(l4, 2)));
        }
        L4::IcmpEcho { request, id } => {
            assert!(l4.len() >= 8);
            assert_eq!((request, id), (l4[0] == 8, be16(l4, 4)));
        }
        L4::IcmpError { icmp_type, code } => {
            assert!(l4.len() >= 8);
            assert_eq!((icmp_type, code), (l4[0], l4[1]));
        }
        L4::IcmpOther { icmp_type } => {
            assert!(l4.len() >= 8);
            assert_eq!(icmp_type, l4[0]);
        }
        L4::Fragment => assert!(flags & 0x1fff != 0),
        L4::Other => {}
    }
    let whole = !v.is_fragment;
    let l4_was_ok = whole && l4_ok(ip);

    // The ICMP error the gateway would send about it.
    if may_send_icmp_error(&v) {
        let mut out = [0u8; 590];
        let n = build_icmp_error(
            &mut out,
            frame,
            &v,
            tapnat::wire::build::Endpoints::new(addr, addr).src_mac,
            addr,
            IcmpErrorKind::TTL_EXCEEDED,
        );
        assert!(n <= out.len());
        let err = &out[..n];
        match classify(err) {
            Ok(Classified::Ipv4(e)) => {
                assert!(matches!(e.l4, L4::IcmpError { .. }), "{e:?}");
                assert_eq!(ETH_HLEN + e.total_len, n);
                assert!(l4_ok(&err[ETH_HLEN..]), "ICMP checksum of the error");
            }
            other => panic!("built ICMP error does not classify: {other:?}"),
        }
    }

    // The rewrite, as the worker does it.
    let mut f = frame.to_vec();
    translate(&mut f, &v, end, addr, port, mode);
    assert_eq!(f.len(), frame.len());
    let t = match classify(&f) {
        Ok(Classified::Ipv4(t)) => t,
        other => panic!("translated frame does not classify: {other:?} (was {v:?})"),
    };
    assert_eq!(
        (t.ihl, t.total_len, t.proto, t.is_fragment),
        (v.ihl, v.total_len, v.proto, v.is_fragment)
    );
    assert_eq!(t.ttl, v.ttl.wrapping_sub(1));
    let tip = &f[ETH_HLEN..ETH_HLEN + t.total_len];
    let moved = match end {
        End::Src => t.src,
        End::Dst => t.dst,
    };
    assert_eq!(moved, addr);
    match (end, t.l4) {
        (End::Src, L4::Tcp { sport, .. } | L4::Udp { sport, .. }) => assert_eq!(sport, port),
        (End::Dst, L4::Tcp { dport, .. } | L4::Udp { dport, .. }) => assert_eq!(dport, port),
        (_, L4::IcmpEcho { id, .. }) => assert_eq!(id, port),
        _ => {}
    }
    if l4_was_ok && mode == L4Csum::Full {
        assert!(
            l4_ok_after_update(tip),
            "transport checksum broken by translate: {v:?}"
        );
    }

    // Hairpin: the TTL goes back up, the header checksum stays valid.
    restore_ttl(&mut f);
    let ip2 = &f[ETH_HLEN..ETH_HLEN + v.total_len];
    assert!(ip_header_ok(ip2));
    assert_eq!(ip2[8], if v.ttl == 0 { 0xff } else { v.ttl });
});
