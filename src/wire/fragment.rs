//! Fragmenting IPv4 packets to fit a link MTU (RFC 791 §3.2, RFC 1812
//! §5.2.6), and reading the fragmentation fields.
//!
//! # Contract
//!
//! * Input: an untrusted Ethernet frame (14-byte header, then IPv4). Any
//!   input gives a typed [`FragmentError`] or fragments; never a panic.
//!   Bytes after the IPv4 total length (Ethernet padding) are ignored.
//! * Output: each fragment is handed to the callback as a complete Ethernet
//!   frame (same MAC addresses and ethertype) in a scratch buffer that is
//!   reused for the next one, in increasing offset order. Nothing is
//!   allocated: [`fragment`] uses a stack scratch, [`fragment_in`] the
//!   caller's.
//! * The TTL is left as it is (the caller has decremented it already), and
//!   so are the identification, TOS, protocol and addresses; each fragment's
//!   header checksum is recomputed in full (a header is at most 60 bytes).
//! * Offsets stay relative to the original datagram: fragmenting a fragment
//!   adds its own offset, and keeps MF on its last piece if it had MF.
//! * Options (RFC 791 §3.1): the first piece keeps the whole header; the
//!   other pieces carry only the options whose copied flag is set, padded
//!   with End of Option List to a multiple of 4 bytes, as RFC 791 §3.2 asks.
//!   A header whose options do not parse is refused rather than guessed at.

use thiserror::Error;

use super::csum;
use super::ETH_HLEN;

/// The MTU every IPv4 module must pass without further fragmentation
/// (RFC 791 §3.2: "Every internet module must be able to forward a datagram
/// of 68 octets without further fragmentation").
pub const MIN_MTU: usize = 68;

/// The largest IPv4 datagram (the total length field is 16 bits).
pub const MAX_IP_LEN: usize = 65535;

/// Why a frame was not fragmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FragmentError {
    /// Not an IPv4 frame, or its version, header length or total length do
    /// not fit the frame.
    #[error("not a well-formed IPv4 frame")]
    Malformed,
    /// The IPv4 header checksum does not verify (fragmenting would launder it).
    #[error("the IPv4 header checksum does not verify")]
    BadChecksum,
    /// The IPv4 options do not parse.
    #[error("the IPv4 options do not parse")]
    BadOptions,
    /// Offset plus length would go past 65535 bytes.
    #[error("the fragment ends past the largest IPv4 datagram")]
    TooLong,
    /// DF is set and the packet is bigger than the MTU: the caller sends an
    /// ICMP Fragmentation Needed with the MTU instead (RFC 1191, RFC 4787 REQ-13).
    #[error("the packet has DF set and is bigger than the MTU")]
    DontFragment,
    /// The MTU is below [`MIN_MTU`].
    #[error("the MTU is below 68 bytes")]
    MtuTooSmall,
    /// [`fragment_in`]'s scratch buffer cannot hold a fragment frame.
    #[error("the scratch buffer cannot hold a fragment")]
    ScratchTooSmall,
}

/// The fragmentation fields of an IPv4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragInfo {
    /// Identification.
    pub id: u16,
    /// Fragment offset in bytes (the field times 8).
    pub offset: usize,
    /// More Fragments.
    pub more: bool,
    /// Don't Fragment.
    pub dont_frag: bool,
}

impl FragInfo {
    /// A piece of a larger datagram (MF set or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        self.more || self.offset != 0
    }
}

const DF: u16 = 0x4000;
const MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;
/// Option types (RFC 791 §3.1): End of Option List and No Operation.
const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
/// The copied flag of an option type.
const OPT_COPIED: u8 = 0x80;

/// The fragmentation fields of the IPv4 packet in `frame`, or None when the
/// frame is too short to hold an IPv4 header or is not IPv4. The rest of the
/// header is not checked ([`super::classify`] does that).
pub fn frag_info(frame: &[u8]) -> Option<FragInfo> {
    let ip = frame.get(ETH_HLEN..ETH_HLEN + 20)?;
    if frame[12..14] != [0x08, 0x00] || ip[0] >> 4 != 4 {
        return None;
    }
    let flags = u16::from_be_bytes([ip[6], ip[7]]);
    Some(FragInfo {
        id: u16::from_be_bytes([ip[4], ip[5]]),
        offset: usize::from(flags & OFFSET_MASK) * 8,
        more: flags & MF != 0,
        dont_frag: flags & DF != 0,
    })
}

/// Splits the IPv4 packet in `frame` into fragments whose IP total length is
/// at most `mtu`, handing each (as an Ethernet frame) to `out`. Returns the
/// number of frames emitted. A packet that already fits is emitted once,
/// unchanged (without Ethernet padding), whatever its DF bit.
pub fn fragment(
    frame: &[u8],
    mtu: usize,
    out: &mut impl FnMut(&[u8]),
) -> Result<usize, FragmentError> {
    let mut scratch = [0u8; ETH_HLEN + MAX_IP_LEN];
    fragment_in(frame, mtu, &mut scratch, out)
}

/// [`fragment`] with a caller-provided scratch buffer, which must hold
/// `14 + min(mtu, 65535)` bytes.
pub fn fragment_in(
    frame: &[u8],
    mtu: usize,
    scratch: &mut [u8],
    out: &mut impl FnMut(&[u8]),
) -> Result<usize, FragmentError> {
    if mtu < MIN_MTU {
        return Err(FragmentError::MtuTooSmall);
    }
    let ip = frame.get(ETH_HLEN..).ok_or(FragmentError::Malformed)?;
    if frame[12..14] != [0x08, 0x00] || ip.len() < 20 || ip[0] >> 4 != 4 {
        return Err(FragmentError::Malformed);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || total < ihl || total > ip.len() {
        return Err(FragmentError::Malformed);
    }
    let header = &ip[..ihl];
    if csum::sum(header) != 0xffff {
        return Err(FragmentError::BadChecksum);
    }
    if total <= mtu {
        out(&frame[..ETH_HLEN + total]);
        return Ok(1);
    }
    let flags = u16::from_be_bytes([ip[6], ip[7]]);
    if flags & DF != 0 {
        return Err(FragmentError::DontFragment);
    }
    let base_offset = usize::from(flags & OFFSET_MASK) * 8;
    let original_mf = flags & MF != 0;
    let data = &ip[ihl..total];
    if base_offset + data.len() > MAX_IP_LEN {
        return Err(FragmentError::TooLong);
    }
    // The header of the pieces after the first: the copied options only.
    let mut rest_header = [0u8; 60];
    let rest_ihl = copied_options(header, &mut rest_header)?;
    // Each piece: the largest multiple of 8 bytes of data that fits
    // (mtu >= 68 and a header <= 60 bytes leave at least 8).
    let first_max = (mtu - ihl) & !7;
    let rest_max = (mtu - rest_ihl) & !7;
    if scratch.len() < ETH_HLEN + mtu.min(MAX_IP_LEN) {
        return Err(FragmentError::ScratchTooSmall);
    }
    scratch[..ETH_HLEN].copy_from_slice(&frame[..ETH_HLEN]);

    let mut pos = 0;
    let mut count = 0;
    while pos < data.len() {
        let (hdr, max) = if pos == 0 {
            (header, first_max)
        } else {
            (&rest_header[..rest_ihl], rest_max)
        };
        let n = max.min(data.len() - pos);
        let last = pos + n == data.len();
        let len = hdr.len() + n;
        let piece = &mut scratch[ETH_HLEN..ETH_HLEN + len];
        piece[..hdr.len()].copy_from_slice(hdr);
        piece[hdr.len()..].copy_from_slice(&data[pos..pos + n]);
        // Fits: len <= mtu and len <= the original total length.
        piece[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        // < 8192: base_offset + pos < base_offset + data.len() <= 65535.
        let mut f = ((base_offset + pos) / 8) as u16 & OFFSET_MASK;
        if !last || original_mf {
            f |= MF;
        }
        f |= flags & !(MF | DF | OFFSET_MASK); // the reserved bit, unchanged
        piece[6..8].copy_from_slice(&f.to_be_bytes());
        piece[10..12].copy_from_slice(&[0, 0]);
        let c = csum::checksum(&piece[..hdr.len()]);
        piece[10..12].copy_from_slice(&c.to_be_bytes());
        out(&scratch[..ETH_HLEN + len]);
        pos += n;
        count += 1;
    }
    Ok(count)
}

/// Writes into `out` the header for non-first fragments: the 20 fixed bytes
/// of `header` with the options whose copied flag is set, padded with EOL
/// to a multiple of 4, and the IHL fixed up. Returns its length.
fn copied_options(header: &[u8], out: &mut [u8; 60]) -> Result<usize, FragmentError> {
    out[..20].copy_from_slice(&header[..20]);
    let opts = &header[20..];
    let mut len = 20;
    let mut i = 0;
    while i < opts.len() {
        let t = opts[i];
        let size = match t {
            OPT_EOL => break,
            OPT_NOP => 1,
            _ => match opts.get(i + 1) {
                Some(&l) if l >= 2 && i + usize::from(l) <= opts.len() => usize::from(l),
                _ => return Err(FragmentError::BadOptions),
            },
        };
        if t & OPT_COPIED != 0 {
            out[len..len + size].copy_from_slice(&opts[i..i + size]);
            len += size;
        }
        i += size;
    }
    let padded = len.div_ceil(4) * 4;
    out[len..padded].fill(OPT_EOL);
    out[0] = 0x40 | (padded / 4) as u8;
    Ok(padded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::build::{self, Endpoints};
    use crate::wire::{classify, Classified, Ipv4View, L4};
    use std::net::Ipv4Addr;

    const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
    const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
    const IP: usize = ETH_HLEN;

    fn view(frame: &[u8]) -> Ipv4View {
        match classify(frame) {
            Ok(Classified::Ipv4(v)) => v,
            other => panic!("not ipv4: {other:?}"),
        }
    }

    fn fix_ip_checksum(frame: &mut [u8]) {
        let ihl = usize::from(frame[IP] & 0x0f) * 4;
        frame[IP + 10..IP + 12].copy_from_slice(&[0, 0]);
        let c = csum::checksum(&frame[IP..IP + ihl]);
        frame[IP + 10..IP + 12].copy_from_slice(&c.to_be_bytes());
    }

    fn set_flags(frame: &mut [u8], flags: u16) {
        frame[IP + 6..IP + 8].copy_from_slice(&flags.to_be_bytes());
        fix_ip_checksum(frame);
    }

    /// A UDP datagram of `total` IP bytes, DF clear, payload bytes 0, 1, 2...
    fn udp(total: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..total - 28).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut f = build::udp(&Endpoints::new(POD, REMOTE), 40000, 53, &payload, true);
        set_flags(&mut f, 0);
        f
    }

    fn split(frame: &[u8], mtu: usize) -> Result<Vec<Vec<u8>>, FragmentError> {
        let mut v = Vec::new();
        fragment(frame, mtu, &mut |f: &[u8]| v.push(f.to_vec()))?;
        Ok(v)
    }

    /// Checks every piece and rebuilds the datagram from them (with the
    /// first piece's header); returns it and each piece's (offset, len, MF).
    fn reassemble(pieces: &[Vec<u8>], mtu: usize) -> (Vec<u8>, Vec<(usize, usize, bool)>) {
        let mut data = Vec::new();
        let mut shape = Vec::new();
        for p in pieces {
            let v = view(p); // also verifies the IP checksum
            let info = frag_info(p).unwrap();
            assert!(v.total_len <= mtu, "piece of {} > mtu {mtu}", v.total_len);
            assert_eq!(p.len(), ETH_HLEN + v.total_len);
            assert_eq!(p[..ETH_HLEN], pieces[0][..ETH_HLEN]);
            assert!(v.is_fragment);
            assert!(!info.dont_frag);
            if info.offset == 0 {
                assert!(matches!(v.l4, L4::Udp { .. }));
            } else {
                assert_eq!(v.l4, L4::Fragment);
            }
            let payload = &p[ETH_HLEN + v.ihl..];
            assert_eq!(info.offset, data.len(), "contiguous, in order");
            if info.more {
                assert_eq!(payload.len() % 8, 0, "only the last may be ragged");
            }
            data.extend_from_slice(payload);
            shape.push((info.offset, v.total_len, info.more));
        }
        let first = &pieces[0];
        let ihl = usize::from(first[IP] & 0x0f) * 4;
        let mut whole = first[..ETH_HLEN + ihl].to_vec();
        whole.extend_from_slice(&data);
        let total = (whole.len() - ETH_HLEN) as u16;
        whole[IP + 2..IP + 4].copy_from_slice(&total.to_be_bytes());
        set_flags(&mut whole, 0);
        (whole, shape)
    }

    #[test]
    fn udp_4000_at_1500_and_576_reassembles_to_the_original() {
        let orig = udp(4000);
        for (mtu, expect) in [
            // 1480 data bytes per piece: 1480 + 1480 + 1020 (3980 = 8 + 3972).
            (
                1500,
                vec![(0, 1500, true), (1480, 1500, true), (2960, 1040, false)],
            ),
            // 552 per piece: 7 x 552 + 116.
            (
                576,
                vec![
                    (0, 572, true),
                    (552, 572, true),
                    (1104, 572, true),
                    (1656, 572, true),
                    (2208, 572, true),
                    (2760, 572, true),
                    (3312, 572, true),
                    (3864, 136, false),
                ],
            ),
        ] {
            let pieces = split(&orig, mtu).unwrap();
            let (whole, shape) = reassemble(&pieces, mtu);
            assert_eq!(shape, expect, "mtu {mtu}");
            assert_eq!(whole, orig, "mtu {mtu}");
            assert!(build::checksums_ok(&whole));
            assert!(matches!(
                view(&whole).l4,
                L4::Udp {
                    sport: 40000,
                    dport: 53
                }
            ));
            // Identification, TTL, addresses and protocol are kept.
            for p in &pieces {
                assert_eq!(p[IP + 4..IP + 6], orig[IP + 4..IP + 6]);
                assert_eq!(p[IP + 8..IP + 10], orig[IP + 8..IP + 10]);
                assert_eq!(p[IP + 12..IP + 20], orig[IP + 12..IP + 20]);
            }
        }
    }

    #[test]
    fn minimum_mtu_and_caller_scratch() {
        let orig = udp(1000);
        let pieces = split(&orig, MIN_MTU).unwrap();
        assert_eq!(pieces.len(), 980usize.div_ceil(48));
        let (whole, _) = reassemble(&pieces, MIN_MTU);
        assert_eq!(whole, orig);

        let mut scratch = [0u8; ETH_HLEN + 576];
        let mut n = 0;
        assert_eq!(
            fragment_in(&orig, 576, &mut scratch, &mut |_| n += 1),
            Ok(2)
        );
        assert_eq!(n, 2);
        assert_eq!(
            fragment_in(&orig, 577, &mut scratch, &mut |_| n += 1),
            Err(FragmentError::ScratchTooSmall)
        );
        assert_eq!(n, 2, "nothing emitted on error");
    }

    #[test]
    fn a_packet_that_fits_is_emitted_unchanged_without_padding() {
        let mut orig = build::udp(&Endpoints::new(POD, REMOTE), 1, 2, b"hi", true);
        let df = orig.clone();
        orig.extend_from_slice(&[0; 30]); // Ethernet padding
        assert_eq!(split(&orig, 1500).unwrap(), vec![df.clone()]);
        assert_eq!(split(&df, 30), Err(FragmentError::MtuTooSmall));
    }

    #[test]
    fn df_and_small_mtu_are_refused() {
        let mut f = udp(4000);
        set_flags(&mut f, DF);
        assert_eq!(split(&f, 1500), Err(FragmentError::DontFragment));
        // The builder's default (DF set) too.
        let f = build::udp(&Endpoints::new(POD, REMOTE), 1, 2, &[0; 2000], true);
        assert_eq!(split(&f, 1500), Err(FragmentError::DontFragment));
        assert_eq!(split(&udp(4000), 67), Err(FragmentError::MtuTooSmall));
        assert_eq!(split(&udp(4000), 0), Err(FragmentError::MtuTooSmall));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let good = udp(2000);
        let mut bad_csum = good.clone();
        bad_csum[IP + 10] ^= 1;
        assert_eq!(split(&bad_csum, 576), Err(FragmentError::BadChecksum));
        let mut v6 = good.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(split(&v6, 576), Err(FragmentError::Malformed));
        assert_eq!(split(&good[..30], 576), Err(FragmentError::Malformed));
        assert_eq!(split(&good[..1000], 576), Err(FragmentError::Malformed));
        let mut long = good.clone();
        set_flags(&mut long, 8000); // offset 64000 + 1980 bytes > 65535
        assert_eq!(split(&long, 576), Err(FragmentError::TooLong));
        assert_eq!(frag_info(&good[..33]), None);
        assert_eq!(frag_info(&v6), None);
    }

    #[test]
    fn fragmenting_a_fragment_keeps_offsets_relative_to_the_original() {
        let orig = udp(4000);
        let at_1500 = split(&orig, 1500).unwrap();
        // Split each 1500-byte piece again at 576, as a second router would.
        let mut pieces = Vec::new();
        for p in &at_1500 {
            pieces.extend(split(p, 576).unwrap());
        }
        let (whole, shape) = reassemble(&pieces, 576);
        assert_eq!(whole, orig);
        assert!(build::checksums_ok(&whole));
        // Only the very last piece has MF clear; the middle ones keep the
        // MF of the fragment they came from.
        let mf: Vec<bool> = shape.iter().map(|s| s.2).collect();
        assert_eq!(mf.iter().filter(|m| !**m).count(), 1);
        assert!(!mf[mf.len() - 1]);
        assert_eq!(shape[3].0, 1480, "second 1500-byte piece starts at 1480");
    }

    /// A header with options: a copied one (Loose Source Route, 0x83, 7
    /// bytes), a NOP and a non-copied one (Record Route, 0x07, 7 bytes),
    /// then EOL padding: 20 + 16 = 36 bytes.
    fn with_options(total: usize) -> Vec<u8> {
        let plain = udp(total - 16);
        let opts = [
            0x83, 7, 4, 192, 0, 2, 1, OPT_NOP, 0x07, 7, 4, 0, 0, 0, 0, OPT_EOL,
        ];
        let mut f = plain[..IP + 20].to_vec();
        f.extend_from_slice(&opts);
        f.extend_from_slice(&plain[IP + 20..]);
        f[IP] = 0x40 | 9;
        f[IP + 2..IP + 4].copy_from_slice(&(total as u16).to_be_bytes());
        fix_ip_checksum(&mut f);
        f
    }

    #[test]
    fn only_copied_options_go_into_later_fragments() {
        let orig = with_options(1500);
        assert_eq!(view(&orig).ihl, 36);
        let pieces = split(&orig, 576).unwrap();
        assert_eq!(view(&pieces[0]).ihl, 36);
        assert_eq!(pieces[0][IP + 20..IP + 36], orig[IP + 20..IP + 36]);
        for p in &pieces[1..] {
            let v = view(p);
            assert_eq!(v.ihl, 28);
            assert_eq!(p[IP + 20..IP + 28], [0x83, 7, 4, 192, 0, 2, 1, OPT_EOL]);
        }
        // First: (576 - 36) & !7 = 536 bytes; then (576 - 28) & !7 = 544.
        let (whole, shape) = reassemble(&pieces, 576);
        assert_eq!(shape[1].0, 536);
        assert_eq!(shape[2].0, 536 + 544);
        assert_eq!(whole, orig);
        assert!(build::checksums_ok(&whole));

        let mut bad = orig.clone();
        bad[IP + 21] = 40; // option length past the header
        fix_ip_checksum(&mut bad);
        assert_eq!(split(&bad, 576), Err(FragmentError::BadOptions));
        bad[IP + 21] = 1; // option length below 2
        fix_ip_checksum(&mut bad);
        assert_eq!(split(&bad, 576), Err(FragmentError::BadOptions));
    }

    #[test]
    fn random_inputs_never_panic_and_outputs_are_well_formed() {
        let mut rng = crate::wire::GOLDEN_RATIO_64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let seeds = [udp(4000), udp(100), with_options(3000), udp(65535)];
        let mut ok = 0;
        for i in 0..20_000 {
            let mut f = match i % 3 {
                // Pure noise, with an IPv4 ethertype half the time.
                0 => {
                    let mut f: Vec<u8> = (0..next() % 200).map(|_| next() as u8).collect();
                    if f.len() > 15 && next() % 2 == 0 {
                        f[12..14].copy_from_slice(&[8, 0]);
                        f[14] = 0x40 | (f[14] & 0x0f);
                    }
                    f
                }
                // A valid frame with a few bytes flipped, maybe truncated.
                _ => {
                    let mut f = seeds[(next() % 4) as usize].clone();
                    for _ in 0..next() % 4 {
                        let at = (next() as usize) % f.len().min(80);
                        f[at] = next() as u8;
                    }
                    if next() % 4 == 0 {
                        f.truncate((next() as usize) % f.len());
                    }
                    f
                }
            };
            let hdr_fits = f.len() > IP && f.len() >= IP + usize::from(f[IP] & 0x0f).max(5) * 4;
            if hdr_fits && next() % 2 == 0 {
                fix_ip_checksum(&mut f);
            }
            let mtu = match next() % 3 {
                0 => (next() % 2000) as usize,
                1 => 68 + (next() % 100) as usize,
                _ => (next() % 70000) as usize,
            };
            let mut pieces = Vec::new();
            if fragment(&f, mtu, &mut |p: &[u8]| pieces.push(p.to_vec())).is_ok() {
                ok += 1;
                for p in &pieces {
                    let total = usize::from(u16::from_be_bytes([p[IP + 2], p[IP + 3]]));
                    assert_eq!(p.len(), ETH_HLEN + total);
                    assert!(total <= mtu.max(MIN_MTU));
                    let ihl = usize::from(p[IP] & 0x0f) * 4;
                    assert_eq!(csum::sum(&p[IP..IP + ihl]), 0xffff);
                }
            }
        }
        assert!(ok > 1000, "only {ok} inputs were fragmented");
    }
}
