use std::net::Ipv4Addr;

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, Ipv4Packet,
};

use super::csum;

/// Length of an Ethernet II header.
pub const ETH_HLEN: usize = 14;
/// Offset of the IPv4 header in a frame.
const IP: usize = ETH_HLEN;
/// IP protocol numbers.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// TCP flag bits (RFC 9293 §3.1).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// ICMP types (RFC 792).
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Largest datagram an ICMP error we originate may be (RFC 1812 §4.3.2.3).
pub const ICMP_ERROR_MAX: usize = 576;
/// A buffer that holds any frame [`build_icmp_error`] writes: an Ethernet
/// header plus [`ICMP_ERROR_MAX`] bytes of IPv4.
pub const ICMP_ERROR_FRAME_MAX: usize = ETH_HLEN + ICMP_ERROR_MAX;
/// A buffer that holds an ARP frame [`build_arp_request`] or
/// [`build_arp_reply`] writes (42 bytes, padded to the Ethernet minimum).
pub const ARP_FRAME_MAX: usize = 64;

/// Why a frame could not be parsed. Each has a drop counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than an Ethernet header.
    Runt,
    /// An ARP frame that is truncated or not Ethernet/IPv4 ARP.
    BadArp,
    /// Version is not 4, IHL < 5, or the header/total length do not fit.
    BadIpHeader,
    /// The IPv4 header checksum does not verify.
    BadIpChecksum,
    /// The transport header is truncated or its own length field is wrong.
    BadL4Header,
}

/// What the transport layer of an IPv4 packet is, as far as NAT cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        /// The header length in bytes (data offset × 4), checked: at least
        /// 20 and within the packet.
        hlen: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP echo request or reply: the identifier plays the port's part.
    IcmpEcho {
        request: bool,
        id: u16,
    },
    /// An ICMP error message (destination unreachable, time exceeded, ...).
    IcmpError {
        icmp_type: u8,
        code: u8,
    },
    /// Any other ICMP type.
    IcmpOther {
        icmp_type: u8,
    },
    /// A non-first fragment: no transport header to read.
    Fragment,
    /// Another IP protocol.
    Other,
}

/// Offsets and fields of a valid IPv4 packet inside an Ethernet frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4View {
    /// IPv4 header length in bytes.
    pub ihl: usize,
    /// The IPv4 total length (the frame may carry padding after it).
    pub total_len: usize,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub dont_frag: bool,
    /// More-fragments set or a non-zero offset.
    pub is_fragment: bool,
    pub l4: L4,
}

impl Ipv4View {
    /// Offset of the transport header in the frame.
    pub fn l4_offset(&self) -> usize {
        IP + self.ihl
    }
    /// The transport (or echo id) ports, source first, when there are any.
    pub fn ports(&self) -> Option<(u16, u16)> {
        match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => Some((sport, dport)),
            L4::IcmpEcho { id, .. } => Some((id, 0)),
            _ => None,
        }
    }
}

/// The flow a frame most likely belongs to, read without validating
/// anything: protocol, addresses, and ports (an echo's identifier as the
/// source port and 0 as the destination, as [`Ipv4View::ports`]). For
/// prefetching a burst's flows only: a frame this names may still be one
/// [`classify`] refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peek {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

/// [`Peek`]s at an Ethernet frame: None unless it looks like an IPv4 TCP,
/// UDP or ICMP echo packet (not a later fragment) with its ports present.
#[inline]
pub fn peek(frame: &[u8]) -> Option<Peek> {
    let ip = frame.get(IP..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return None;
    }
    let l4 = ip.get(usize::from(ip[0] & 0x0f) * 4..)?;
    let be16 = |b: &[u8], at: usize| Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]));
    let (sport, dport) = match ip[9] {
        PROTO_TCP | PROTO_UDP => (be16(l4, 0)?, be16(l4, 2)?),
        PROTO_ICMP if matches!(l4.first(), Some(&(ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY))) => {
            (be16(l4, 4)?, 0)
        }
        _ => return None,
    };
    Some(Peek {
        proto: ip[9],
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport,
        dport,
    })
}

/// A classified frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classified {
    Arp(ArpRepr),
    Ipv4(Ipv4View),
    /// An ethertype we do not handle (IPv6, VLAN, LLDP, ...).
    OtherEthertype(u16),
}

/// The destination and source MAC of a frame (must be at least [`ETH_HLEN`] long).
pub fn macs(frame: &[u8]) -> (EthernetAddress, EthernetAddress) {
    (
        EthernetAddress::from_bytes(&frame[0..6]),
        EthernetAddress::from_bytes(&frame[6..12]),
    )
}

/// Overwrites the destination and source MAC of a frame.
pub fn set_macs(frame: &mut [u8], dst: EthernetAddress, src: EthernetAddress) {
    frame[0..6].copy_from_slice(dst.as_bytes());
    frame[6..12].copy_from_slice(src.as_bytes());
}

/// Parses an Ethernet frame far enough to route and translate it.
pub fn classify(frame: &[u8]) -> Result<Classified, Malformed> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| Malformed::Runt)?;
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            let arp = ArpPacket::new_checked(eth.payload()).map_err(|_| Malformed::BadArp)?;
            ArpRepr::parse(&arp)
                .map(Classified::Arp)
                .map_err(|_| Malformed::BadArp)
        }
        EthernetProtocol::Ipv4 => parse_ipv4(&frame[IP..]).map(Classified::Ipv4),
        other => Ok(Classified::OtherEthertype(u16::from(other))),
    }
}

fn parse_ipv4(buf: &[u8]) -> Result<Ipv4View, Malformed> {
    if buf.len() < 20 || buf[0] >> 4 != 4 {
        return Err(Malformed::BadIpHeader);
    }
    let ip = Ipv4Packet::new_checked(buf).map_err(|_| Malformed::BadIpHeader)?;
    let ihl = usize::from(ip.header_len());
    if ihl < 20 {
        return Err(Malformed::BadIpHeader);
    }
    if !ip.verify_checksum() {
        return Err(Malformed::BadIpChecksum);
    }
    let total_len = usize::from(ip.total_len());
    let proto = u8::from(ip.next_header());
    let is_fragment = ip.more_frags() || ip.frag_offset() != 0;
    let l4buf = &buf[ihl..total_len];
    let l4 = if ip.frag_offset() != 0 {
        L4::Fragment
    } else {
        parse_l4(proto, l4buf, is_fragment)?
    };
    Ok(Ipv4View {
        ihl,
        total_len,
        proto,
        src: ip.src_addr(),
        dst: ip.dst_addr(),
        ttl: ip.hop_limit(),
        dont_frag: ip.dont_frag(),
        is_fragment,
        l4,
    })
}

/// The big-endian 16-bit field at `at` (the caller checked the bounds).
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// `first_fragment`: only the headers are present, the payload continues elsewhere,
/// so length fields that cover the payload cannot be checked.
fn parse_l4(proto: u8, l4: &[u8], first_fragment: bool) -> Result<L4, Malformed> {
    match proto {
        PROTO_TCP => {
            if l4.len() < 20 {
                return Err(Malformed::BadL4Header);
            }
            let off = usize::from(l4[12] >> 4) * 4;
            if off < 20 || off > l4.len() {
                return Err(Malformed::BadL4Header);
            }
            Ok(L4::Tcp {
                sport: be16(l4, 0),
                dport: be16(l4, 2),
                flags: l4[13],
                hlen: off as u8,
            })
        }
        PROTO_UDP => {
            if l4.len() < 8 {
                return Err(Malformed::BadL4Header);
            }
            let len = usize::from(be16(l4, 4));
            if !first_fragment && (len < 8 || len > l4.len()) {
                return Err(Malformed::BadL4Header);
            }
            Ok(L4::Udp {
                sport: be16(l4, 0),
                dport: be16(l4, 2),
            })
        }
        PROTO_ICMP => {
            if l4.len() < 8 {
                return Err(Malformed::BadL4Header);
            }
            Ok(match l4[0] {
                ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY => L4::IcmpEcho {
                    request: l4[0] == ICMP_ECHO_REQUEST,
                    id: be16(l4, 4),
                },
                t @ (ICMP_DEST_UNREACHABLE | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM) => {
                    L4::IcmpError {
                        icmp_type: t,
                        code: l4[1],
                    }
                }
                t => L4::IcmpOther { icmp_type: t },
            })
        }
        _ => Ok(L4::Other),
    }
}

/// Which end of a packet a translation rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Source address and port (outbound masquerade, in2out).
    Src,
    /// Destination address and port (inbound reply, out2in).
    Dst,
}

/// What the transport checksum field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Csum {
    /// A complete checksum (or zero for "no UDP checksum").
    Full,
    /// Only the pseudo-header sum, not complemented: checksum offload
    /// (virtio `NEEDS_CSUM`, Linux `CHECKSUM_PARTIAL`) will finish it. An
    /// address change is applied to it; a port change must not be.
    Partial,
}

/// Rewrites one end's address and port (for ICMP echo: the identifier) of the
/// packet in `frame`, decrements the TTL, and patches the IPv4 and transport
/// checksums incrementally. The caller has checked `view.ttl > 1`.
///
/// A zero UDP checksum means "none" (RFC 768) and stays zero; a computed zero
/// is sent as 0xffff.
pub fn translate(
    frame: &mut [u8],
    view: &Ipv4View,
    end: End,
    addr: Ipv4Addr,
    port: u16,
    l4csum: L4Csum,
) {
    let l4 = view.l4_offset();
    let (addr_at, port_at) = match end {
        End::Src => (IP + 12, l4),
        End::Dst => (IP + 16, l4 + 2),
    };
    let old_addr: [u8; 4] = frame[addr_at..addr_at + 4].try_into().unwrap_or([0; 4]);
    let new_addr = addr.octets();

    // IPv4 header: TTL (shares a word with the protocol) and the address.
    let ttl_word = be16(frame, IP + 8);
    let new_ttl_word = ttl_word.wrapping_sub(0x0100);
    let mut ip_csum = be16(frame, IP + 10);
    ip_csum = csum::update16(ip_csum, ttl_word, new_ttl_word);
    ip_csum = csum::update32(ip_csum, old_addr, new_addr);
    frame[IP + 8..IP + 10].copy_from_slice(&new_ttl_word.to_be_bytes());
    frame[addr_at..addr_at + 4].copy_from_slice(&new_addr);
    frame[IP + 10..IP + 12].copy_from_slice(&ip_csum.to_be_bytes());

    match view.l4 {
        L4::Tcp { .. } | L4::Udp { .. } if l4csum == L4Csum::Partial => {
            let at = l4
                + if matches!(view.l4, L4::Tcp { .. }) {
                    16
                } else {
                    6
                };
            // A plain sum: subtracting the old address and adding the new one is
            // the complemented form of the RFC 1624 update.
            let c = !csum::update32(!be16(frame, at), old_addr, new_addr);
            frame[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
            frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        L4::Tcp { .. } => {
            let at = l4 + 16;
            let mut c = be16(frame, at);
            c = csum::update32(c, old_addr, new_addr);
            c = csum::update16(c, be16(frame, port_at), port);
            frame[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
            frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        L4::Udp { .. } => {
            let at = l4 + 6;
            let old = be16(frame, at);
            if old != 0 {
                let mut c = csum::update32(old, old_addr, new_addr);
                c = csum::update16(c, be16(frame, port_at), port);
                if c == 0 {
                    c = 0xffff;
                }
                frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
            }
            frame[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
        }
        L4::IcmpEcho { .. } => {
            // The ICMP checksum has no pseudo-header: only the identifier counts.
            let id_at = l4 + 4;
            let c = csum::update16(be16(frame, l4 + 2), be16(frame, id_at), port);
            frame[id_at..id_at + 2].copy_from_slice(&port.to_be_bytes());
            frame[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
        }
        // Fragments and other protocols: address only, nothing else to patch.
        L4::IcmpError { .. } | L4::IcmpOther { .. } | L4::Fragment | L4::Other => {}
    }
}

/// Whether the gateway may originate an ICMP error about this packet
/// (RFC 1812 §4.3.2.7): not about an ICMP error, a non-first fragment, or a
/// packet from a broadcast, multicast or unspecified source.
pub fn may_send_icmp_error(view: &Ipv4View) -> bool {
    !matches!(view.l4, L4::IcmpError { .. } | L4::Fragment)
        && !view.src.is_broadcast()
        && !view.src.is_multicast()
        && !view.src.is_unspecified()
}

/// The type, code and second header word of an ICMP error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpErrorKind {
    pub icmp_type: u8,
    pub code: u8,
    pub rest: u32,
}

impl IcmpErrorKind {
    /// Time Exceeded, TTL exceeded in transit (RFC 792).
    pub const TTL_EXCEEDED: IcmpErrorKind = IcmpErrorKind {
        icmp_type: ICMP_TIME_EXCEEDED,
        code: 0,
        rest: 0,
    };
}

/// Writes into `out` an Ethernet frame carrying an ICMP error of `icmp_type`
/// and `code` about the packet in `offending` (whose view is `view`), sent from
/// `our_ip`/`our_mac` back to the packet's source MAC and address. `rest` is
/// the second header word (e.g. the next-hop MTU for Fragmentation Needed).
/// Quotes as much of the offending datagram as fits in 576 bytes (RFC 1812
/// §4.3.2.3). Returns the frame length; `out` must hold at least 590 bytes.
pub fn build_icmp_error(
    out: &mut [u8],
    offending: &[u8],
    view: &Ipv4View,
    our_mac: EthernetAddress,
    our_ip: Ipv4Addr,
    error: IcmpErrorKind,
) -> usize {
    let IcmpErrorKind {
        icmp_type,
        code,
        rest,
    } = error;
    let quote = view.total_len.min(ICMP_ERROR_MAX - 28);
    let ip_len = 28 + quote;
    let len = ETH_HLEN + ip_len;
    let (_, peer_mac) = macs(offending);
    set_macs(out, peer_mac, our_mac);
    out[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut out[IP..len];
    ip[..20].copy_from_slice(&[
        0x45, 0, 0, 0, 0, 0, 0, 0, 64, PROTO_ICMP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[12..16].copy_from_slice(&our_ip.octets());
    ip[16..20].copy_from_slice(&view.src.octets());
    let c = csum::checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = &mut ip[20..];
    icmp[0] = icmp_type;
    icmp[1] = code;
    icmp[2..4].copy_from_slice(&[0, 0]);
    icmp[4..8].copy_from_slice(&rest.to_be_bytes());
    icmp[8..8 + quote].copy_from_slice(&offending[IP..IP + quote]);
    let c = csum::checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    len
}

/// Writes a broadcast ARP request "who has `target`? tell `our_ip`" into
/// `out` (at least 42 bytes) and returns its length.
pub fn build_arp_request(
    out: &mut [u8],
    our_mac: EthernetAddress,
    our_ip: Ipv4Addr,
    target: Ipv4Addr,
) -> usize {
    let len = ETH_HLEN + 28;
    set_macs(out, EthernetAddress::BROADCAST, our_mac);
    out[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: our_mac,
        source_protocol_addr: our_ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    repr.emit(&mut ArpPacket::new_unchecked(&mut out[ETH_HLEN..len]));
    len
}

/// Writes an ARP reply "`our_ip` is at `our_mac`" to `to_mac`/`to_ip` into
/// `out` (at least 42 bytes) and returns its length.
pub fn build_arp_reply(
    out: &mut [u8],
    our_mac: EthernetAddress,
    our_ip: Ipv4Addr,
    to_mac: EthernetAddress,
    to_ip: Ipv4Addr,
) -> usize {
    let len = ETH_HLEN + 28;
    set_macs(out, to_mac, our_mac);
    out[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: our_mac,
        source_protocol_addr: our_ip,
        target_hardware_addr: to_mac,
        target_protocol_addr: to_ip,
    };
    repr.emit(&mut ArpPacket::new_unchecked(&mut out[ETH_HLEN..len]));
    len
}

/// Adds one to the TTL, patching the header checksum: undoes the decrement
/// of [`translate`] for a packet that is translated twice on one pass
/// through the gateway (hairpinning), so the TTL drops by one in all.
pub fn restore_ttl(frame: &mut [u8]) {
    let word = be16(frame, IP + 8);
    if word >> 8 == 0xff {
        return;
    }
    let new = word + 0x0100;
    let c = csum::update16(be16(frame, IP + 10), word, new);
    frame[IP + 8..IP + 10].copy_from_slice(&new.to_be_bytes());
    frame[IP + 10..IP + 12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests;
