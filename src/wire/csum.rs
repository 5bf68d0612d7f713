//! Internet checksums (RFC 1071) and their incremental update (RFC 1624).
//!
//! The data path never recomputes a checksum over a payload: it patches the
//! stored one with the difference between the old and new header words, as
//! RFC 1624 eqn. 3 says: `HC' = ~(~HC + ~m + m')`.

/// One's-complement sum of `data` as big-endian 16-bit words, folded to 16 bits
/// but not complemented. An odd trailing byte is padded with zero.
pub fn sum(data: &[u8]) -> u32 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = chunks.remainder() {
        acc += u64::from(*b) << 8;
    }
    fold(acc)
}

/// Folds a wide one's-complement accumulator to 16 bits.
pub fn fold(mut acc: u64) -> u32 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u32
}

/// The Internet checksum of `data`: the complement of its one's-complement sum.
pub fn checksum(data: &[u8]) -> u16 {
    !(sum(data) as u16)
}

/// The IPv4 pseudo-header sum (RFC 793 §3.1, RFC 768) for an L4 checksum.
pub fn pseudo_header(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u32 {
    let acc = u64::from(sum(&src)) + u64::from(sum(&dst)) + u64::from(proto) + u64::from(l4_len);
    fold(acc)
}

/// Incrementally updates checksum `csum` for a 16-bit word changing from
/// `old` to `new` (RFC 1624 eqn. 3).
#[inline]
pub fn update16(csum: u16, old: u16, new: u16) -> u16 {
    let acc = u64::from(!csum) + u64::from(!old) + u64::from(new);
    !(fold(acc) as u16)
}

/// Incrementally updates `csum` for a 32-bit field (an IPv4 address) changing.
#[inline]
pub fn update32(csum: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let acc = u64::from(!csum)
        + u64::from(!u16::from_be_bytes([old[0], old[1]]))
        + u64::from(!u16::from_be_bytes([old[2], old[3]]))
        + u64::from(u16::from_be_bytes([new[0], new[1]]))
        + u64::from(u16::from_be_bytes([new[2], new[3]]));
    !(fold(acc) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the sum of 0001 f203 f4f5 f6f7 is ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum(&data), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    #[test]
    fn incremental_matches_full_recomputation() {
        let mut data: Vec<u8> = (0..40u8).map(|b| b.wrapping_mul(37)).collect();
        for (i, (o, n)) in [
            (0x1234u16, 0xffffu16),
            (0, 0),
            (0xffff, 0),
            (0xabcd, 0x0001),
        ]
        .into_iter()
        .enumerate()
        {
            let at = 2 * i + 4;
            data[at..at + 2].copy_from_slice(&o.to_be_bytes());
            let before = checksum(&data);
            data[at..at + 2].copy_from_slice(&n.to_be_bytes());
            let after = update16(before, o, n);
            // One's complement has two zeros; compare as sums that verify.
            let mut with = data.clone();
            with.extend_from_slice(&after.to_be_bytes());
            assert_eq!(sum(&with), 0xffff, "case {i}");
        }
    }

    #[test]
    fn address_update_matches_full_recomputation() {
        let mut hdr = [
            0x45u8, 0, 0, 28, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 244, 0, 2, 198, 51, 100, 10,
        ];
        let c = checksum(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        let new = [203, 0, 113, 10];
        let updated = update32(c, [10, 244, 0, 2], new);
        hdr[12..16].copy_from_slice(&new);
        hdr[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, checksum(&hdr));
    }
}
