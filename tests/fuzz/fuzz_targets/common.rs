//! Checks shared by the fuzz targets: full recomputation of the checksums
//! the data path only ever patches incrementally.
#![allow(dead_code)]

use tapnat::wire::csum;

pub const ETH_HLEN: usize = tapnat::wire::ETH_HLEN;
pub const PROTO_ICMP: u8 = tapnat::wire::PROTO_ICMP;
pub const PROTO_TCP: u8 = tapnat::wire::PROTO_TCP;
pub const PROTO_UDP: u8 = tapnat::wire::PROTO_UDP;

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The IPv4 header length of the packet starting at `ip[0]`.
pub fn ihl(ip: &[u8]) -> usize {
    usize::from(ip[0] & 0x0f) * 4
}

/// Whether the IPv4 header at the start of `ip` has a valid checksum.
pub fn ip_header_ok(ip: &[u8]) -> bool {
    let n = ihl(ip);
    n >= 20 && ip.len() >= n && csum::sum(&ip[..n]) == 0xffff
}

/// Whether the transport checksum of a complete (unfragmented, wholly
/// present) IPv4 packet `ip` (exactly its total length) verifies. The
/// transport length is the IP payload length, as the pseudo-header of the
/// receiver uses. A zero UDP checksum ("none") counts as valid; protocols
/// other than TCP, UDP and ICMP always do.
pub fn l4_ok(ip: &[u8]) -> bool {
    let n = ihl(ip);
    let l4 = &ip[n..];
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    match ip[9] {
        PROTO_ICMP => csum::sum(l4) == 0xffff,
        PROTO_UDP if l4.len() >= 8 && l4[6..8] == [0, 0] => true,
        proto @ (PROTO_TCP | PROTO_UDP) => {
            let Ok(len) = u16::try_from(l4.len()) else {
                return false;
            };
            let ph = csum::pseudo_header(src, dst, proto, len);
            csum::fold(u64::from(ph) + u64::from(csum::sum(l4))) == 0xffff
        }
        _ => true,
    }
}

/// Writes a correct IPv4 header checksum into the header at `ip[0]`, if the
/// header fits in `ip`.
pub fn fix_ip_csum(ip: &mut [u8]) {
    let n = ihl(ip).max(20);
    if ip.len() < n {
        return;
    }
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&ip[..n]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}
