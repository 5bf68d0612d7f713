//! Builders for well-formed frames with correct checksums, for tests,
//! benches and fuzz seeds. Not used on the data path.
use std::net::Ipv4Addr;

use smoltcp::wire::EthernetAddress;

use super::csum;
use super::{ETH_HLEN, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

/// Source and destination of a test packet.
#[derive(Debug, Clone, Copy)]
pub struct Endpoints {
    pub src_mac: EthernetAddress,
    pub dst_mac: EthernetAddress,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
}

impl Endpoints {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Endpoints {
            src_mac: EthernetAddress([0x02, 0, 0, 0, 0, 1]),
            dst_mac: EthernetAddress([0x02, 0, 0, 0, 0, 2]),
            src,
            dst,
            ttl: 64,
        }
    }
}

/// An Ethernet + IPv4 frame around `l4` (whose checksum field the caller
/// fills via `l4_csum_at`, an offset in `l4`, or None for none).
fn frame(ep: &Endpoints, proto: u8, mut l4: Vec<u8>, l4_csum_at: Option<usize>) -> Vec<u8> {
    if let Some(at) = l4_csum_at {
        l4[at..at + 2].copy_from_slice(&[0, 0]);
        let mut c = match proto {
            PROTO_ICMP => csum::checksum(&l4),
            _ => {
                let ph =
                    csum::pseudo_header(ep.src.octets(), ep.dst.octets(), proto, l4.len() as u16);
                !(csum::fold(u64::from(ph) + u64::from(csum::sum(&l4))) as u16)
            }
        };
        if proto == PROTO_UDP && c == 0 {
            c = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let total = 20 + l4.len();
    let mut f = Vec::with_capacity(ETH_HLEN + total);
    f.extend_from_slice(ep.dst_mac.as_bytes());
    f.extend_from_slice(ep.src_mac.as_bytes());
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [
        0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, ep.ttl, proto, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[12..16].copy_from_slice(&ep.src.octets());
    ip[16..20].copy_from_slice(&ep.dst.octets());
    let c = csum::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// A TCP segment with `flags` and `payload`.
pub fn tcp(ep: &Endpoints, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    l4[4..8].copy_from_slice(&1000u32.to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = flags;
    l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
    l4.extend_from_slice(payload);
    frame(ep, PROTO_TCP, l4, Some(16))
}

/// A UDP datagram; `with_csum = false` sends checksum zero ("none").
pub fn udp(ep: &Endpoints, sport: u16, dport: u16, payload: &[u8], with_csum: bool) -> Vec<u8> {
    let mut l4 = vec![0u8; 8];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(payload);
    frame(ep, PROTO_UDP, l4, with_csum.then_some(6))
}

/// An ICMP echo request (or reply) with identifier `id`.
pub fn icmp_echo(ep: &Endpoints, request: bool, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![if request { 8 } else { 0 }, 0, 0, 0];
    l4.extend_from_slice(&id.to_be_bytes());
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(payload);
    frame(ep, PROTO_ICMP, l4, Some(2))
}

/// Verifies the IPv4 header checksum and the transport checksum of `frame`
/// by full recomputation. A UDP checksum of zero counts as valid.
pub fn checksums_ok(frame: &[u8]) -> bool {
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if csum::sum(&ip[..ihl]) != 0xffff {
        return false;
    }
    let l4 = &ip[ihl..total];
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    match ip[9] {
        PROTO_ICMP => csum::sum(l4) == 0xffff,
        PROTO_UDP if l4[6..8] == [0, 0] => true,
        proto @ (PROTO_TCP | PROTO_UDP) => {
            let ph = csum::pseudo_header(src, dst, proto, l4.len() as u16);
            csum::fold(u64::from(ph) + u64::from(csum::sum(l4))) == 0xffff
        }
        _ => true,
    }
}
