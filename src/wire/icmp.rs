//! ICMP errors through the NAT (RFC 5508 REQ-3/4/5, RFC 792, RFC 1191,
//! RFC 1812), Fragmentation Needed, and the rate limit for the errors the
//! gateway originates.
//!
//! An ICMP error (Destination Unreachable, Time Exceeded, Parameter Problem)
//! quotes the IPv4 header and at least the first 8 transport bytes of the
//! packet it is about. When that packet crossed the NAT, the quote carries the
//! translated addresses and ports, so the error has to be translated back:
//!
//! * **Out2In** — an error from the outside about a packet we masqueraded
//!   (quoted `src = ext_addr:ext_port`) is sent to the pod: the outer
//!   destination becomes the pod's address and the quoted source is restored to
//!   `pod_addr:pod_port` (RFC 5508 REQ-3, REQ-4).
//! * **In2Out** — an error a pod sends about an inbound packet we forwarded to
//!   it (quoted `dst = pod_addr:pod_port`) leaves from the gateway: the outer
//!   source becomes the gateway's address and the quoted destination is
//!   restored to `ext_addr:ext_port` (RFC 5508 REQ-5).
//!
//! [`parse_embedded`] validates the error and finds the quoted packet;
//! [`translate_error`] rewrites it in place with incremental checksum updates
//! (RFC 1624): outer IPv4 header, quoted IPv4 header, quoted transport
//! checksum when it lies inside the quote, and the outer ICMP checksum, which
//! covers every quoted byte that changed. Type, code and the second header word
//! (e.g. the next-hop MTU) are never changed.
//!
//! Nothing here allocates or panics, whatever the frame holds.
use std::net::Ipv4Addr;

use super::csum;
use super::packet::be16;
use super::{
    IcmpErrorKind, Ipv4View, ETH_HLEN, ICMP_DEST_UNREACHABLE, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST,
    ICMP_PARAMETER_PROBLEM, ICMP_TIME_EXCEEDED, L4, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
};

/// Offset of the outer IPv4 header in a frame.
const IP: usize = ETH_HLEN;
/// Bytes of ICMP header before the quoted datagram: type, code, checksum and
/// the second word (unused / pointer / next-hop MTU).
const ICMP_HLEN: usize = 8;
/// Transport bytes an ICMP error quotes at least (RFC 792): enough for the
/// TCP/UDP ports and the ICMP echo identifier.
const QUOTED_L4: usize = 8;
/// Destination Unreachable code 4: fragmentation needed and DF set (RFC 792).
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// Why an ICMP error is dropped instead of translated. Each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadIcmpError {
    /// The view is not an ICMP error (type 3, 11 or 12).
    NotIcmpError,
    /// The ICMP error is itself fragmented: its checksum can't be checked and
    /// the quote may be in another fragment.
    Fragmented,
    /// The ICMP checksum over the whole message does not verify (RFC 5508 REQ-3).
    BadIcmpChecksum,
    /// The quote is shorter than the quoted IPv4 header plus 8 transport bytes.
    Truncated,
    /// The quoted header is not IPv4, its IHL is below 5, or its total length
    /// is shorter than its header plus 8 transport bytes.
    BadInnerIpHeader,
    /// The quoted IPv4 header checksum does not verify (RFC 5508 REQ-3).
    BadInnerIpChecksum,
    /// The quoted packet is a non-first fragment: no ports to map it by.
    InnerFragment,
    /// The quoted packet is not TCP, UDP or an ICMP echo request/reply.
    UnsupportedInner,
}

/// The transport fields of the quoted packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddedL4 {
    Tcp {
        sport: u16,
        dport: u16,
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
}

/// The packet quoted inside an ICMP error, with frame offsets that
/// [`parse_embedded`] checked to be inside the outer datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedView {
    /// Offset of the quoted IPv4 header in the frame.
    pub ip_offset: usize,
    /// Quoted IPv4 header length in bytes (options included).
    pub ihl: usize,
    /// The quoted header's total length: may exceed what is quoted.
    pub total_len: usize,
    /// Bytes of the quoted packet present in the frame, from `ip_offset`:
    /// the quote, capped at `total_len`. At least `ihl + 8`.
    pub quoted_len: usize,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub l4: EmbeddedL4,
}

impl EmbeddedView {
    /// Offset of the quoted transport header in the frame.
    pub fn l4_offset(&self) -> usize {
        self.ip_offset.saturating_add(self.ihl)
    }

    /// The quoted source and destination ports; for ICMP echo the identifier
    /// twice (it is the mapped "port" on either side).
    pub fn ports(&self) -> (u16, u16) {
        match self.l4 {
            EmbeddedL4::Tcp { sport, dport } | EmbeddedL4::Udp { sport, dport } => (sport, dport),
            EmbeddedL4::IcmpEcho { id, .. } => (id, id),
        }
    }

    /// Offset of the quoted transport checksum in the frame, if the quote
    /// holds it. UDP and ICMP echo always do (it is in the first 8 bytes);
    /// TCP's lies at 16..18 and is often cut off.
    pub fn l4_csum_offset(&self) -> Option<usize> {
        let rel = match self.l4 {
            EmbeddedL4::Tcp { .. } => 16,
            EmbeddedL4::Udp { .. } => 6,
            EmbeddedL4::IcmpEcho { .. } => 2,
        };
        let end = self.ihl.checked_add(rel + 2)?;
        (end <= self.quoted_len).then(|| self.l4_offset().saturating_add(rel))
    }
}

/// Which side of an ICMP error to rewrite, and with what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorDir {
    /// An error from outside about a packet we masqueraded: outer destination
    /// (our external address) becomes the pod's address; the quoted source
    /// (`ext_addr:ext_port`) is restored to the pod's address and port
    /// (for a quoted ICMP echo, `new_inner_sport` is the pod's identifier).
    Out2In {
        new_outer_dst: Ipv4Addr,
        new_inner_src: Ipv4Addr,
        new_inner_sport: u16,
    },
    /// An error from a pod about an inbound packet we forwarded to it: outer
    /// source becomes the gateway's address; the quoted destination (the
    /// pod's address and port) is restored to the external address and port
    /// (for a quoted ICMP echo, `new_inner_dport` is the external identifier).
    In2Out {
        new_outer_src: Ipv4Addr,
        new_inner_dst: Ipv4Addr,
        new_inner_dport: u16,
    },
}

fn be32(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Validates the ICMP error in `frame` (whose [`classify`](super::classify)
/// view is `view`) and locates the packet it quotes.
///
/// Drops, as RFC 5508 REQ-3 asks, when the ICMP checksum over the whole
/// message or the quoted IPv4 header checksum is bad. Quoted IPv4 options are
/// skipped. The quoted transport checksum is not checked: the quote is usually
/// truncated. Never panics, even if `view` belongs to another frame.
pub fn parse_embedded(frame: &[u8], view: &Ipv4View) -> Result<EmbeddedView, BadIcmpError> {
    use BadIcmpError::*;
    if view.proto != PROTO_ICMP
        || !matches!(
            view.l4,
            L4::IcmpError {
                icmp_type: ICMP_DEST_UNREACHABLE | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM,
                ..
            }
        )
    {
        return Err(NotIcmpError);
    }
    if view.is_fragment {
        return Err(Fragmented);
    }
    let icmp_at = IP.checked_add(view.ihl).ok_or(Truncated)?;
    let end = IP.checked_add(view.total_len).ok_or(Truncated)?;
    let icmp = frame.get(icmp_at..end).ok_or(Truncated)?;
    if icmp.len() < ICMP_HLEN {
        return Err(Truncated);
    }
    if csum::sum(icmp) != 0xffff {
        return Err(BadIcmpChecksum);
    }
    let quote = &icmp[ICMP_HLEN..];
    if quote.len() < 20 {
        return Err(Truncated);
    }
    if quote[0] >> 4 != 4 {
        return Err(BadInnerIpHeader);
    }
    let ihl = usize::from(quote[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(BadInnerIpHeader);
    }
    if quote.len() < ihl {
        return Err(Truncated);
    }
    if csum::sum(&quote[..ihl]) != 0xffff {
        return Err(BadInnerIpChecksum);
    }
    let total_len = usize::from(be16(quote, 2));
    if total_len < ihl + QUOTED_L4 {
        return Err(BadInnerIpHeader);
    }
    if be16(quote, 6) & 0x1fff != 0 {
        return Err(InnerFragment);
    }
    if quote.len() < ihl + QUOTED_L4 {
        return Err(Truncated);
    }
    let proto = quote[9];
    let t = &quote[ihl..];
    let l4 = match proto {
        PROTO_TCP => EmbeddedL4::Tcp {
            sport: be16(t, 0),
            dport: be16(t, 2),
        },
        PROTO_UDP => EmbeddedL4::Udp {
            sport: be16(t, 0),
            dport: be16(t, 2),
        },
        PROTO_ICMP if t[0] == ICMP_ECHO_REQUEST || t[0] == ICMP_ECHO_REPLY => {
            EmbeddedL4::IcmpEcho {
                request: t[0] == ICMP_ECHO_REQUEST,
                id: be16(t, 4),
            }
        }
        _ => return Err(UnsupportedInner),
    };
    Ok(EmbeddedView {
        ip_offset: icmp_at + ICMP_HLEN,
        ihl,
        total_len,
        quoted_len: quote.len().min(total_len),
        proto,
        src: Ipv4Addr::from(be32(quote, 12)),
        dst: Ipv4Addr::from(be32(quote, 16)),
        l4,
    })
}

/// Whether `view` and `emb` describe positions inside a frame of `len` bytes
/// the way [`parse_embedded`] produces them (the quote starts an even number
/// of bytes into the ICMP message, so word-wise checksum updates line up).
fn fits(len: usize, view: &Ipv4View, emb: &EmbeddedView) -> Option<()> {
    let icmp_at = IP.checked_add(view.ihl)?;
    let end = IP.checked_add(view.total_len)?;
    let into = emb.ip_offset.checked_sub(icmp_at)?;
    let emb_end = emb.ip_offset.checked_add(emb.quoted_len)?;
    let min_quote = emb.ihl.checked_add(QUOTED_L4)?;
    (view.ihl >= 20
        && end <= len
        && into >= ICMP_HLEN
        && into % 2 == 0
        && emb.ihl >= 20
        && emb.ihl % 4 == 0
        && emb.quoted_len >= min_quote
        && emb_end <= end)
        .then_some(())
}

/// Rewrites the ICMP error in `frame` as `dir` says (see [`ErrorDir`]),
/// decrements the outer TTL, and patches the outer IPv4 checksum, the quoted
/// IPv4 checksum, the quoted transport checksum (TCP only if quoted, UDP only
/// if non-zero, ICMP echo always) and the outer ICMP checksum incrementally.
/// Type, code and the second ICMP word (e.g. the MTU) are kept.
///
/// `view` and `emb` must be what [`classify`](super::classify) and
/// [`parse_embedded`] returned for `frame`, and the caller has checked
/// `view.ttl > 1`. A pair that does not fit the frame leaves it untouched;
/// nothing panics.
pub fn translate_error(frame: &mut [u8], view: &Ipv4View, emb: &EmbeddedView, dir: ErrorDir) {
    if fits(frame.len(), view, emb).is_none() {
        return;
    }
    let icmp_at = IP + view.ihl;
    let inner_l4 = emb.l4_offset();
    let (outer_at, outer_new, inner_at, inner_new, port_at, port_new) = match dir {
        ErrorDir::Out2In {
            new_outer_dst,
            new_inner_src,
            new_inner_sport,
        } => (
            IP + 16,
            new_outer_dst,
            emb.ip_offset + 12,
            new_inner_src,
            inner_l4,
            new_inner_sport,
        ),
        ErrorDir::In2Out {
            new_outer_src,
            new_inner_dst,
            new_inner_dport,
        } => (
            IP + 12,
            new_outer_src,
            emb.ip_offset + 16,
            new_inner_dst,
            inner_l4 + 2,
            new_inner_dport,
        ),
    };
    let port_at = match emb.l4 {
        EmbeddedL4::IcmpEcho { .. } => inner_l4 + 4,
        EmbeddedL4::Tcp { .. } | EmbeddedL4::Udp { .. } => port_at,
    };
    let outer_new = outer_new.octets();
    let inner_new = inner_new.octets();

    // Outer IPv4 header: TTL (shares a word with the protocol) and one address.
    let old_outer = be32(frame, outer_at);
    let ttl_word = be16(frame, IP + 8);
    let new_ttl_word = ttl_word.wrapping_sub(0x0100);
    let mut ip_c = be16(frame, IP + 10);
    ip_c = csum::update16(ip_c, ttl_word, new_ttl_word);
    ip_c = csum::update32(ip_c, old_outer, outer_new);
    put16(frame, IP + 8, new_ttl_word);
    frame[outer_at..outer_at + 4].copy_from_slice(&outer_new);
    put16(frame, IP + 10, ip_c);

    // Everything below lies inside the ICMP message: each changed word also
    // goes into the outer ICMP checksum. All are at even offsets from its start.
    let mut icmp_c = be16(frame, icmp_at + 2);

    // Quoted IPv4 header: one address, and its checksum.
    let old_inner = be32(frame, inner_at);
    let old_inner_ip_c = be16(frame, emb.ip_offset + 10);
    let new_inner_ip_c = csum::update32(old_inner_ip_c, old_inner, inner_new);
    icmp_c = csum::update32(icmp_c, old_inner, inner_new);
    icmp_c = csum::update16(icmp_c, old_inner_ip_c, new_inner_ip_c);
    frame[inner_at..inner_at + 4].copy_from_slice(&inner_new);
    put16(frame, emb.ip_offset + 10, new_inner_ip_c);

    // Quoted transport checksum: TCP/UDP cover the address (pseudo-header)
    // and the port; ICMP echo only the identifier.
    let old_port = be16(frame, port_at);
    if let Some(at) = emb.l4_csum_offset() {
        let old_c = be16(frame, at);
        let new_c = match emb.l4 {
            EmbeddedL4::Tcp { .. } => csum::update16(
                csum::update32(old_c, old_inner, inner_new),
                old_port,
                port_new,
            ),
            EmbeddedL4::Udp { .. } if old_c == 0 => 0,
            EmbeddedL4::Udp { .. } => {
                match csum::update16(
                    csum::update32(old_c, old_inner, inner_new),
                    old_port,
                    port_new,
                ) {
                    0 => 0xffff,
                    c => c,
                }
            }
            EmbeddedL4::IcmpEcho { .. } => csum::update16(old_c, old_port, port_new),
        };
        icmp_c = csum::update16(icmp_c, old_c, new_c);
        put16(frame, at, new_c);
    }

    // Quoted port (or echo identifier).
    icmp_c = csum::update16(icmp_c, old_port, port_new);
    put16(frame, port_at, port_new);

    put16(frame, icmp_at + 2, icmp_c);
}

impl IcmpErrorKind {
    /// Destination Unreachable, fragmentation needed and DF set (type 3,
    /// code 4), with the next-hop MTU in the low 16 bits of the second word
    /// (RFC 1191 §4; the high 16 bits are unused and zero).
    pub const fn frag_needed(mtu: u16) -> IcmpErrorKind {
        IcmpErrorKind {
            icmp_type: ICMP_DEST_UNREACHABLE,
            code: ICMP_FRAG_NEEDED,
            rest: mtu as u32,
        }
    }
}

/// A token bucket for the ICMP errors the gateway originates (RFC 1812
/// §4.3.2.8 asks routers to rate-limit them).
///
/// tapnat keeps **one global bucket** (per worker): `per_sec` tokens a second,
/// holding at most `burst`; it starts full. This is the shape of Linux's global
/// limit `icmp_global_allow` (`net.ipv4.icmp_msgs_per_sec` = 1000,
/// `icmp_msgs_burst` = 50), which [`Default`] copies. The kernel also limits
/// per destination (`net.ipv4.icmp_ratelimit` = 1000 ms per token, burst
/// factor 6, via the inetpeer cache); tapnat does not, to keep no
/// per-destination state. Like the kernel (`icmpv4_mask_allow`), callers
/// should exempt Fragmentation Needed, which PMTU discovery depends on, and
/// limit only the types in `icmp_ratemask` (3, 4, 11, 12): see
/// [`IcmpRateLimit::applies_to`].
///
/// Pure: time comes in as `now_ms` from a monotonic clock. A clock that goes
/// backwards adds no tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpRateLimit {
    /// Tokens added per second.
    per_sec: u32,
    /// Capacity, in thousandths of a token.
    cap_milli: u64,
    /// Current level, in thousandths of a token.
    level_milli: u64,
    /// Time of the last refill.
    last_ms: Option<u64>,
}

impl IcmpRateLimit {
    /// Linux's `net.ipv4.icmp_msgs_per_sec` default.
    pub const KERNEL_PER_SEC: u32 = 1000;
    /// Linux's `net.ipv4.icmp_msgs_burst` default.
    pub const KERNEL_BURST: u32 = 50;
    /// One token, in the bucket's units.
    const TOKEN: u64 = 1000;

    /// A full bucket of `burst` tokens refilled at `per_sec` a second.
    /// `burst == 0` allows nothing; `per_sec == 0` allows only the burst.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        let cap_milli = u64::from(burst) * Self::TOKEN;
        IcmpRateLimit {
            per_sec,
            cap_milli,
            level_milli: cap_milli,
            last_ms: None,
        }
    }

    /// Takes a token if there is one at time `now_ms`.
    pub fn allow(&mut self, now_ms: u64) -> bool {
        if let Some(last) = self.last_ms {
            let elapsed = now_ms.saturating_sub(last);
            // per_sec tokens/s * elapsed ms = elapsed * per_sec thousandths.
            let added = elapsed.saturating_mul(u64::from(self.per_sec));
            self.level_milli = self.level_milli.saturating_add(added).min(self.cap_milli);
        }
        self.last_ms = Some(self.last_ms.map_or(now_ms, |last| last.max(now_ms)));
        if self.level_milli >= Self::TOKEN {
            self.level_milli -= Self::TOKEN;
            true
        } else {
            false
        }
    }

    /// Whether an error of `kind` goes through the limiter, as in Linux: the
    /// types in the default `icmp_ratemask` (Destination Unreachable, Source
    /// Quench, Time Exceeded, Parameter Problem), except Fragmentation Needed.
    pub fn applies_to(kind: IcmpErrorKind) -> bool {
        const RATEMASK: u32 = 0x1818;
        let limited = kind.icmp_type < 32 && RATEMASK & (1 << kind.icmp_type) != 0;
        limited && !(kind.icmp_type == ICMP_DEST_UNREACHABLE && kind.code == ICMP_FRAG_NEEDED)
    }
}

impl Default for IcmpRateLimit {
    fn default() -> Self {
        IcmpRateLimit::new(Self::KERNEL_PER_SEC, Self::KERNEL_BURST)
    }
}

#[cfg(test)]
mod tests;
