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
    // A transport header too short to hold its own checksum field is not a
    // packet whose checksum can be right (a fuzzer finds a 9-byte "TCP"
    // header whose sum happens to come out right).
    let min = match ip[9] {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMP => 8,
        _ => 0,
    };
    if l4.len() < min {
        return false;
    }
    match ip[9] {
        PROTO_ICMP => csum::sum(l4) == 0xffff,
        PROTO_UDP if l4[6..8] == [0, 0] => true,
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

/// [`l4_ok`] for a packet whose checksum was updated incrementally (RFC 1624
/// eqn. 3), which yields 0x0000 rather than 0xffff when every other word the
/// checksum covers is zero. Only an ICMP message can be all zero (TCP and UDP
/// checksums cover the protocol number): an echo reply with identifier,
/// sequence number and payload all zero. Linux's `csum_replace2` gives the
/// same answer, and its receivers then reject that checksum; tapnat does as
/// the kernel's NAT does, so the fuzz targets accept it.
pub fn l4_ok_after_update(ip: &[u8]) -> bool {
    l4_ok(ip) || (ip[9] == PROTO_ICMP && ip[ihl(ip)..].iter().all(|&b| b == 0))
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

/// Writes a correct transport checksum into the complete IPv4 packet `ip`
/// (exactly its total length): TCP, UDP (never zero: 0xffff) or ICMP.
pub fn fix_l4_csum(ip: &mut [u8]) {
    let n = ihl(ip);
    if n < 20 || ip.len() < n {
        return;
    }
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    let proto = ip[9];
    let l4 = &mut ip[n..];
    let at = match proto {
        PROTO_ICMP => 2,
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        _ => return,
    };
    if l4.len() < at + 2 {
        return;
    }
    l4[at..at + 2].copy_from_slice(&[0, 0]);
    let mut c = if proto == PROTO_ICMP {
        csum::checksum(l4)
    } else {
        let Ok(len) = u16::try_from(l4.len()) else {
            return;
        };
        let ph = csum::pseudo_header(src, dst, proto, len);
        !(csum::fold(u64::from(ph) + u64::from(csum::sum(l4))) as u16)
    };
    if proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// The IPv4 packet of an Ethernet frame, cut at its total length, when the
/// ethertype, version, header and total length fit the frame.
pub fn ip_packet_mut(frame: &mut [u8]) -> Option<&mut [u8]> {
    if frame.len() < ETH_HLEN + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &mut frame[ETH_HLEN..];
    let n = ihl(ip);
    let total = usize::from(be16(ip, 2));
    if ip[0] >> 4 != 4 || n < 20 || total < n || total > ip.len() {
        return None;
    }
    Some(&mut ip[..total])
}

/// Gives an IPv4 frame correct checksums (the header's, and with `l4` the
/// transport's, for an unfragmented packet), so that the fuzzer's
/// mutations get past them.
pub fn fix_frame(frame: &mut [u8], l4: bool) {
    let Some(ip) = ip_packet_mut(frame) else {
        return;
    };
    if l4 && be16(ip, 6) & 0x3fff == 0 {
        fix_l4_csum(ip);
    }
    fix_ip_csum(ip);
}

/// Gives an ICMP error frame correct checksums from the inside out: the
/// quoted IPv4 header (and with `inner_l4` the quoted transport checksum,
/// when the whole quoted packet is there), the ICMP message, the outer
/// IPv4 header.
pub fn fix_icmp_error(frame: &mut [u8], inner_l4: bool) {
    let Some(ip) = ip_packet_mut(frame) else {
        return;
    };
    let n = ihl(ip);
    if ip.len() < n + 8 {
        return;
    }
    {
        let icmp = &mut ip[n..];
        let quote = &mut icmp[8..];
        if quote.len() >= 20 && quote[0] >> 4 == 4 {
            let qn = ihl(quote);
            if qn >= 20 && quote.len() >= qn {
                let qt = usize::from(be16(quote, 2));
                if inner_l4 && qt >= qn && qt <= quote.len() {
                    fix_l4_csum(&mut quote[..qt]);
                }
                fix_ip_csum(quote);
            }
        }
        icmp[2..4].copy_from_slice(&[0, 0]);
        let c = csum::checksum(icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
    }
    fix_ip_csum(ip);
}
