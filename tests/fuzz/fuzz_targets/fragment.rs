//! `wire::fragment::fragment` and `fragment_in` of a valid-ish packet at an
//! arbitrary MTU.
//!
//! Input: a 2-byte MTU (68 + the value, so 68..=65603), a flag byte, then
//! the frame. Unless flag bit 0 is set, the target makes the frame
//! valid-ish first: IPv4 ethertype, version 4, and (bit 1 clear) a total
//! length that fits the frame, then a correct header checksum — so most
//! inputs reach the splitting code instead of dying at the checksum.
//!
//! Invariants:
//! * No panic.
//! * Every emitted frame is `14 + total length` bytes, at most the MTU,
//!   has a valid IPv4 header checksum, a header of 20..=60 bytes, the
//!   original Ethernet header, identification, TTL, protocol and addresses.
//! * A packet that fits is emitted once, unchanged (minus padding).
//! * Otherwise (DF clear): the pieces are in increasing offset order, every
//!   piece but the last carries MF and a multiple of 8 data bytes, the last
//!   keeps the original MF; the first keeps the whole header; and the
//!   payloads placed at their offsets give back exactly the original
//!   payload, without gap or overlap.
//! * `fragment_in` with a scratch of exactly `14 + min(mtu, 65535)` bytes
//!   emits the same frames; with one byte less it either gives the same
//!   answer or `ScratchTooSmall` having emitted nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tapnat::wire::fragment::{
    frag_info, fragment, fragment_in, FragmentError, MAX_IP_LEN, MIN_MTU,
};

mod common;
use common::*;

fn collect(
    r: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<usize, FragmentError>,
) -> (Result<usize, FragmentError>, Vec<Vec<u8>>) {
    let mut v = Vec::new();
    let r = r(&mut |p: &[u8]| v.push(p.to_vec()));
    (r, v)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let mtu = MIN_MTU + usize::from(u16::from_be_bytes([data[0], data[1]]));
    let flags = data[2];
    let mut frame = data[3..].to_vec();
    if flags & 1 == 0 && frame.len() >= ETH_HLEN + 20 {
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut frame[ETH_HLEN..];
        ip[0] = 0x40 | (ip[0] & 0x0f).max(5);
        if flags & 2 == 0 {
            let total = ip.len().min(MAX_IP_LEN).max(ihl(ip).min(ip.len()));
            ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        }
        fix_ip_csum(ip);
    }

    let (r, pieces) = collect(|out| fragment(&frame, mtu, &mut |p: &[u8]| out(p)));

    // The caller-scratch variants agree.
    let mut scratch = vec![0u8; ETH_HLEN + mtu.min(MAX_IP_LEN)];
    let (r2, pieces2) =
        collect(|out| fragment_in(&frame, mtu, &mut scratch, &mut |p: &[u8]| out(p)));
    assert_eq!(r, r2);
    assert_eq!(pieces, pieces2);
    scratch.pop();
    let (r3, pieces3) =
        collect(|out| fragment_in(&frame, mtu, &mut scratch, &mut |p: &[u8]| out(p)));
    if r3 == Err(FragmentError::ScratchTooSmall) {
        assert!(pieces3.is_empty(), "emitted before refusing the scratch");
    } else {
        assert_eq!((r3, &pieces3), (r, &pieces));
    }

    let Ok(count) = r else {
        assert!(pieces.is_empty(), "emitted and then failed: {r:?}");
        return;
    };
    assert_eq!(count, pieces.len());
    assert!(count >= 1);

    let ip = &frame[ETH_HLEN..];
    let hl = ihl(ip);
    let total = usize::from(be16(ip, 2));
    let orig_flags = be16(ip, 6);
    let base = usize::from(orig_flags & 0x1fff) * 8;
    let orig_mf = orig_flags & 0x2000 != 0;
    let payload = &ip[hl..total];

    for p in &pieces {
        let pip = &p[ETH_HLEN..];
        assert_eq!(p[..ETH_HLEN], frame[..ETH_HLEN]);
        assert_eq!(
            pip.len(),
            usize::from(be16(pip, 2)),
            "frame length is 14 + total"
        );
        assert!(pip.len() <= mtu, "piece of {} > mtu {mtu}", pip.len());
        assert!(ip_header_ok(pip), "piece header checksum");
        assert!((20..=60).contains(&ihl(pip)) && ihl(pip) <= pip.len());
        assert_eq!(pip[0] >> 4, 4);
        assert_eq!(pip[4..6], ip[4..6], "identification");
        assert_eq!(pip[8..10], ip[8..10], "TTL and protocol");
        assert_eq!(pip[12..20], ip[12..20], "addresses");
        assert_eq!(pip[1], ip[1], "TOS");
    }

    if total <= mtu {
        assert_eq!(count, 1);
        assert_eq!(pieces[0], frame[..ETH_HLEN + total]);
        return;
    }
    assert_eq!(orig_flags & 0x4000, 0, "fragmented a DF packet");
    assert!(count >= 2, "a packet over the MTU came out whole");

    let mut rebuilt: Vec<u8> = Vec::with_capacity(payload.len());
    for (i, p) in pieces.iter().enumerate() {
        let info = frag_info(p).expect("piece is IPv4");
        let pip = &p[ETH_HLEN..];
        let data = &pip[ihl(pip)..];
        let last = i + 1 == pieces.len();
        assert!(!info.dont_frag);
        assert_eq!(info.id, be16(ip, 4));
        assert_eq!(be16(pip, 6) & 0x8000, orig_flags & 0x8000, "reserved bit");
        assert!(info.offset >= base, "offset below the original's");
        assert_eq!(
            info.offset - base,
            rebuilt.len(),
            "gap or overlap at piece {i}"
        );
        if last {
            assert_eq!(info.more, orig_mf, "last piece's MF");
        } else {
            assert!(info.more, "MF clear on piece {i}");
            assert_eq!(data.len() % 8, 0, "ragged piece {i}");
            assert!(!data.is_empty());
        }
        if i == 0 {
            assert_eq!(ihl(pip), hl, "first piece keeps the whole header");
            assert_eq!(pip[20..hl], ip[20..hl], "first piece keeps the options");
        }
        rebuilt.extend_from_slice(data);
    }
    assert_eq!(rebuilt, payload, "reassembled payload differs");
});
