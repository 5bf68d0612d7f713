//! `wire::segment::segment_udp`: a UDP super-frame (USO) cut into its
//! datagrams, for a valid-ish frame and an arbitrary segment size.
//!
//! Input: a 2-byte segment size, a flag byte, then the frame. Unless flag
//! bit 0 is set, the target makes the frame valid-ish first: IPv4
//! ethertype, version 4, protocol UDP, no fragment bits, a total length
//! that fits the frame, then a correct header checksum.
//!
//! Invariants:
//! * No panic, whatever the input.
//! * On success: every datagram is `14 + total length` bytes, with a valid
//!   IPv4 header checksum, the original header but for length, id (the
//!   original's plus its index) and checksum; a UDP length equal to its
//!   payload plus 8, a UDP checksum that verifies, and at most `size`
//!   payload bytes (all but the last exactly `size`); their payloads in
//!   order give back the original payload; the count is what was returned.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tapnat::wire::segment::segment_udp;

mod common;
use common::*;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let size = usize::from(u16::from_be_bytes([data[0], data[1]]));
    let flags = data[2];
    let mut frame = data[3..].to_vec();
    if flags & 1 == 0 && frame.len() >= ETH_HLEN + 28 {
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut frame[ETH_HLEN..];
        ip[0] = 0x45;
        ip[6] &= 0x40;
        ip[7] = 0;
        ip[9] = PROTO_UDP;
        let total = ip.len().min(65535);
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        fix_ip_csum(ip);
    }
    let mut scratch = vec![0u8; ETH_HLEN + 60 + 8 + size];
    let mut out = Vec::new();
    let Ok(n) = segment_udp(&frame, size, &mut scratch, &mut |d: &[u8]| out.push(d.to_vec()))
    else {
        return;
    };
    assert_eq!(n, out.len());
    let ip = &frame[ETH_HLEN..];
    let hl = ihl(ip);
    let total = usize::from(be16(ip, 2));
    let payload = &ip[hl + 8..total];
    let mut joined = Vec::new();
    for (k, d) in out.iter().enumerate() {
        let dip = &d[ETH_HLEN..];
        assert_eq!(d[..ETH_HLEN], frame[..ETH_HLEN], "Ethernet header");
        assert_eq!(d.len(), ETH_HLEN + usize::from(be16(dip, 2)), "frame length");
        assert!(ip_header_ok(dip), "IPv4 header checksum");
        assert_eq!(ihl(dip), hl);
        assert_eq!(be16(dip, 4), be16(ip, 4).wrapping_add(k as u16), "id");
        assert_eq!(dip[6..10], ip[6..10], "flags, TTL, protocol");
        assert_eq!(dip[12..hl], ip[12..hl], "addresses and options");
        assert!(l4_ok(dip), "UDP checksum of datagram {k}");
        let udp = &dip[hl..];
        assert_eq!(usize::from(be16(udp, 4)), udp.len(), "UDP length");
        assert_eq!(udp[..4], ip[hl..hl + 4], "ports");
        let data = &udp[8..];
        assert!(data.len() <= size);
        if k + 1 < out.len() {
            assert_eq!(data.len(), size, "every datagram but the last is full");
        }
        joined.extend_from_slice(data);
    }
    assert_eq!(joined, payload, "the payload, in order");
});
