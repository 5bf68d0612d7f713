//! Cutting a UDP GSO super-frame (`VIRTIO_NET_HDR_GSO_UDP_L4`) into the
//! datagrams it stands for, as the kernel's `__udp_gso_segment` does.
//!
//! A sender using `UDP_SEGMENT` (QUIC stacks do) hands its kernel one buffer
//! of many datagrams of `gso_size` payload bytes each (the last may be
//! shorter); with USO on the TAP the gateway receives them as one frame: one
//! IPv4 header, one UDP header whose length covers the whole payload, and a
//! partial checksum. The datagram boundaries are the application's, so such
//! a frame may not be re-cut at another size (unlike a TCP super-frame):
//! when its datagrams do not fit the egress MTU, they are cut out here, each
//! a whole datagram with its own headers and a complete checksum, and each
//! then follows the ordinary rules (fragmented, or refused with DF).
use super::csum;
use super::ETH_HLEN;

/// Why a frame could not be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("not an unfragmented IPv4 UDP frame with consistent lengths")]
    Malformed,
    #[error("segment size 0")]
    ZeroSize,
    #[error("more than {MAX_SEGMENTS} datagrams")]
    TooMany,
}

/// The most datagrams one super-frame may hold (the kernel's `UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 128;

/// Cuts the UDP super-frame `frame` (Ethernet, IPv4 without fragmentation,
/// UDP) into datagrams of `gso_size` payload bytes, handing each whole
/// Ethernet frame to `out` in order. Each gets the IPv4 header of the
/// original with its total length, the identification incremented per
/// datagram (as Linux does) and its header checksum; and the UDP header
/// with its length and a complete checksum (RFC 768; 0 sent as 0xffff)
/// whatever the original's checksum state. `scratch` must hold
/// `14 + 60 + 8 + gso_size` bytes. Returns the number of datagrams.
pub fn segment_udp(
    frame: &[u8],
    gso_size: usize,
    scratch: &mut [u8],
    out: &mut impl FnMut(&[u8]),
) -> Result<usize, SegmentError> {
    if gso_size == 0 {
        return Err(SegmentError::ZeroSize);
    }
    let ip = frame.get(ETH_HLEN..).ok_or(SegmentError::Malformed)?;
    if frame[12..14] != [0x08, 0x00] || ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
        return Err(SegmentError::Malformed);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    // MF or an offset: a fragment, not a super-frame.
    if ihl < 20 || total < ihl + 8 || total > ip.len() || frag & 0x3fff != 0 {
        return Err(SegmentError::Malformed);
    }
    let payload = &ip[ihl + 8..total];
    let count = payload.len().div_ceil(gso_size).max(1);
    if count > MAX_SEGMENTS {
        return Err(SegmentError::TooMany);
    }
    let hdrs = ETH_HLEN + ihl + 8;
    if scratch.len() < hdrs + gso_size.min(payload.len()) {
        return Err(SegmentError::Malformed);
    }
    let (src, dst) = (
        [ip[12], ip[13], ip[14], ip[15]],
        [ip[16], ip[17], ip[18], ip[19]],
    );
    let id = u16::from_be_bytes([ip[4], ip[5]]);
    scratch[..hdrs].copy_from_slice(&frame[..hdrs]);
    for k in 0..count {
        // An empty payload is one empty datagram.
        let data =
            &payload[(k * gso_size).min(payload.len())..((k + 1) * gso_size).min(payload.len())];
        let udp_len = 8 + data.len();
        let ip_len = ihl + udp_len;
        let s = &mut scratch[..ETH_HLEN + ip_len];
        let iph = &mut s[ETH_HLEN..ETH_HLEN + ihl];
        iph[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        iph[4..6].copy_from_slice(&id.wrapping_add(k as u16).to_be_bytes());
        iph[10..12].fill(0);
        let c = csum::checksum(iph);
        iph[10..12].copy_from_slice(&c.to_be_bytes());
        let l4 = ETH_HLEN + ihl;
        s[l4 + 4..l4 + 6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        s[l4 + 6..l4 + 8].fill(0);
        s[l4 + 8..].copy_from_slice(data);
        let acc = u64::from(csum::pseudo_header(src, dst, 17, udp_len as u16))
            + u64::from(csum::sum(&s[l4..]));
        let c = !(csum::fold(acc) as u16);
        let c = if c == 0 { 0xffff } else { c };
        s[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
        out(s);
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::build::{self, Endpoints};
    use std::net::Ipv4Addr;

    fn datagrams(frame: &[u8], gso: usize) -> Vec<Vec<u8>> {
        let mut scratch = vec![0u8; 14 + 60 + 8 + gso];
        let mut v = Vec::new();
        segment_udp(frame, gso, &mut scratch, &mut |f: &[u8]| v.push(f.to_vec())).unwrap();
        v
    }

    fn verifies(f: &[u8]) -> bool {
        let ip = &f[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let udp = &ip[ihl..total];
        let ph = csum::pseudo_header(
            [ip[12], ip[13], ip[14], ip[15]],
            [ip[16], ip[17], ip[18], ip[19]],
            17,
            udp.len() as u16,
        );
        csum::sum(&ip[..ihl]) == 0xffff
            && csum::fold(u64::from(ph) + u64::from(csum::sum(udp))) == 0xffff
            && usize::from(u16::from_be_bytes([udp[4], udp[5]])) == udp.len()
    }

    #[test]
    fn a_super_frame_becomes_its_datagrams_in_order() {
        let ep = Endpoints::new(
            Ipv4Addr::new(10, 244, 0, 2),
            Ipv4Addr::new(198, 51, 100, 10),
        );
        let payload: Vec<u8> = (0..3500u32).map(|i| (i % 251) as u8).collect();
        let frame = build::udp(&ep, 40000, 443, &payload, true);
        let d = datagrams(&frame, 1200);
        assert_eq!(d.len(), 3);
        let mut joined = Vec::new();
        for (k, f) in d.iter().enumerate() {
            assert!(verifies(f), "datagram {k} checksums");
            let id = u16::from_be_bytes([f[18], f[19]]);
            assert_eq!(
                id,
                u16::from_be_bytes([frame[18], frame[19]]).wrapping_add(k as u16)
            );
            // DF and addresses as the original.
            assert_eq!(f[20], frame[20]);
            assert_eq!(f[26..34], frame[26..34]);
            assert_eq!(f[34..38], frame[34..38], "ports");
            joined.extend_from_slice(&f[42..]);
        }
        assert_eq!(d[0].len() - 42, 1200);
        assert_eq!(d[2].len() - 42, 1100);
        assert_eq!(joined, payload);
    }

    #[test]
    fn a_frame_that_is_one_datagram_or_none_at_all() {
        let ep = Endpoints::new(
            Ipv4Addr::new(10, 244, 0, 2),
            Ipv4Addr::new(198, 51, 100, 10),
        );
        let one = build::udp(&ep, 1, 2, b"hello", true);
        let d = datagrams(&one, 1200);
        assert_eq!(d, vec![one.clone()]);
        let empty = build::udp(&ep, 1, 2, b"", true);
        assert_eq!(datagrams(&empty, 1200), vec![empty.clone()]);
        let mut scratch = [0u8; 2000];
        let mut none = |_: &[u8]| panic!("nothing to emit");
        assert_eq!(
            segment_udp(&one, 0, &mut scratch, &mut none),
            Err(SegmentError::ZeroSize)
        );
        let tcp = build::tcp(&ep, 1, 2, crate::wire::TCP_ACK, b"x");
        assert_eq!(
            segment_udp(&tcp, 100, &mut scratch, &mut none),
            Err(SegmentError::Malformed)
        );
        assert_eq!(
            segment_udp(&one[..30], 100, &mut scratch, &mut none),
            Err(SegmentError::Malformed)
        );
        let big = build::udp(&ep, 1, 2, &[0u8; 2000], true);
        assert_eq!(
            segment_udp(&big, 10, &mut scratch, &mut none),
            Err(SegmentError::TooMany)
        );
    }
}
