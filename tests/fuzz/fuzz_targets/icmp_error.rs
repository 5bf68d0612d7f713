//! `wire::parse_embedded` then `wire::translate_error` on arbitrary frames,
//! in both directions.
//!
//! Input: 11 parameter bytes (a flag byte, then the new outer address, the
//! new inner address and the new inner port), then the frame. Flag bits:
//! 0 the direction (In2Out when set); 1 keep the frame's checksums as they
//! are (otherwise the quoted header's, the ICMP and the outer header's are
//! made correct first, so that mutations get past them); 2 also make the
//! quoted transport checksum correct; 7 use views made up from the input.
//!
//! Invariants:
//! * Nothing panics, whatever the frame (also with a view and an embedded
//!   view made up from the input, which `translate_error` must refuse or
//!   survive).
//! * An accepted error's quoted packet lies inside the outer datagram and
//!   inside the frame.
//! * After translation the frame classifies again, the outer IPv4 header
//!   checksum, the ICMP checksum over the whole message and the quoted IPv4
//!   header checksum verify (full recomputation), `parse_embedded` accepts it
//!   again with the rewritten addresses and port, and a quoted transport
//!   checksum that verified before (whole packet quoted) still verifies.
//!   Type, code and the second ICMP word are kept.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use tapnat::wire::{
    classify, parse_embedded, translate_error, Classified, EmbeddedL4, EmbeddedView, ErrorDir,
    Ipv4View, L4,
};

mod common;
use common::*;

fn made_up_views(p: &[u8], len: usize) -> (Ipv4View, EmbeddedView) {
    let n = |i: usize| usize::from(be16(p, i % (p.len() - 1)));
    let view = Ipv4View {
        ihl: n(0) % 80,
        total_len: n(2),
        proto: 1,
        src: Ipv4Addr::from(0),
        dst: Ipv4Addr::from(0),
        ttl: 2,
        dont_frag: false,
        is_fragment: false,
        l4: L4::IcmpError {
            icmp_type: 3,
            code: 0,
        },
    };
    let emb = EmbeddedView {
        ip_offset: n(4) % (len + 8),
        ihl: n(6) % 80,
        total_len: n(8),
        quoted_len: n(9) % (len + 8),
        proto: 17,
        src: Ipv4Addr::from(0),
        dst: Ipv4Addr::from(0),
        l4: match p[0] % 3 {
            0 => EmbeddedL4::Tcp { sport: 1, dport: 2 },
            1 => EmbeddedL4::Udp { sport: 1, dport: 2 },
            _ => EmbeddedL4::IcmpEcho {
                request: true,
                id: 1,
            },
        },
    };
    (view, emb)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 11 {
        return;
    }
    let (p, frame) = data.split_at(11);
    let mut frame = frame.to_vec();
    if p[0] & 2 == 0 {
        fix_icmp_error(&mut frame, p[0] & 4 != 0);
    }
    let frame = &frame[..];
    let outer = Ipv4Addr::new(p[1], p[2], p[3], p[4]);
    let inner = Ipv4Addr::new(p[5], p[6], p[7], p[8]);
    let port = u16::from_be_bytes([p[9], p[10]]);
    let dir = if p[0] & 1 == 0 {
        ErrorDir::Out2In {
            new_outer_dst: outer,
            new_inner_src: inner,
            new_inner_sport: port,
        }
    } else {
        ErrorDir::In2Out {
            new_outer_src: outer,
            new_inner_dst: inner,
            new_inner_dport: port,
        }
    };

    if p[0] & 0x80 != 0 {
        // Views that do not belong to the frame: never a panic.
        let (view, emb) = made_up_views(data, frame.len());
        let _ = parse_embedded(frame, &view);
        let mut f = frame.to_vec();
        translate_error(&mut f, &view, &emb, dir);
        return;
    }

    let Ok(Classified::Ipv4(v)) = classify(frame) else {
        return;
    };
    let Ok(e) = parse_embedded(frame, &v) else {
        return;
    };

    // The quote lies inside the outer datagram and the frame.
    let icmp_at = ETH_HLEN + v.ihl;
    let end = ETH_HLEN + v.total_len;
    assert!(end <= frame.len());
    assert_eq!(e.ip_offset, icmp_at + 8, "{e:?}");
    assert!(e.ihl >= 20 && e.ihl % 4 == 0, "{e:?}");
    assert!(e.quoted_len >= e.ihl + 8, "{e:?}");
    assert!(e.quoted_len <= e.total_len, "{e:?}");
    assert!(e.ip_offset + e.quoted_len <= end, "{e:?} in {v:?}");
    let q = &frame[e.ip_offset..e.ip_offset + e.quoted_len];
    assert!(ip_header_ok(q));
    assert_eq!(ihl(q), e.ihl);
    assert_eq!(usize::from(be16(q, 2)), e.total_len);
    assert_eq!(e.ports(), {
        let t = &q[e.ihl..];
        match e.l4 {
            EmbeddedL4::IcmpEcho { .. } => (be16(t, 4), be16(t, 4)),
            _ => (be16(t, 0), be16(t, 2)),
        }
    });
    if let Some(at) = e.l4_csum_offset() {
        assert!(at + 2 <= e.ip_offset + e.quoted_len);
    }
    let whole_quote = e.quoted_len == e.total_len;
    let inner_l4_was_ok = whole_quote && l4_ok(q);

    let mut f = frame.to_vec();
    translate_error(&mut f, &v, &e, dir);
    assert_eq!(f.len(), frame.len());

    let t = match classify(&f) {
        Ok(Classified::Ipv4(t)) => t,
        other => panic!("translated error does not classify: {other:?} (was {v:?})"),
    };
    assert_eq!((t.ihl, t.total_len, t.l4), (v.ihl, v.total_len, v.l4));
    assert_eq!(t.ttl, v.ttl.wrapping_sub(1));
    let ip = &f[ETH_HLEN..end];
    assert!(ip_header_ok(ip), "outer IPv4 checksum");
    assert!(l4_ok(ip), "ICMP checksum after translation: {v:?} {e:?}");
    // Type, code and the second word unchanged.
    assert_eq!(f[icmp_at..icmp_at + 2], frame[icmp_at..icmp_at + 2]);
    assert_eq!(f[icmp_at + 4..icmp_at + 8], frame[icmp_at + 4..icmp_at + 8]);

    let e2 = match parse_embedded(&f, &t) {
        Ok(e2) => e2,
        Err(err) => panic!("translated error does not parse: {err:?} (was {e:?})"),
    };
    let q2 = &f[e2.ip_offset..e2.ip_offset + e2.quoted_len];
    assert!(ip_header_ok(q2), "quoted IPv4 checksum");
    let (sport, dport) = e2.ports();
    match dir {
        ErrorDir::Out2In { .. } => {
            assert_eq!((t.dst, t.src), (outer, v.src));
            assert_eq!((e2.src, e2.dst), (inner, e.dst));
            match e2.l4 {
                EmbeddedL4::IcmpEcho { .. } => assert_eq!(sport, port),
                _ => assert_eq!((sport, dport), (port, e.ports().1)),
            }
        }
        ErrorDir::In2Out { .. } => {
            assert_eq!((t.src, t.dst), (outer, v.dst));
            assert_eq!((e2.src, e2.dst), (e.src, inner));
            match e2.l4 {
                EmbeddedL4::IcmpEcho { .. } => assert_eq!(dport, port),
                _ => assert_eq!((sport, dport), (e.ports().0, port)),
            }
        }
    }
    if inner_l4_was_ok {
        assert!(l4_ok_after_update(q2), "quoted transport checksum: {e:?}");
    }
});
