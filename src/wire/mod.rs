//! Frame parsing, in-place header rewrites and checksum arithmetic.
//!
//! Parsing uses `smoltcp::wire` for the checked views; the rewrite functions
//! patch bytes in place and update checksums incrementally (RFC 1624), so a
//! translated frame costs a few dozen byte writes whatever its size.
//!
//! Input rules: every function takes an untrusted frame and either returns a
//! typed [`Malformed`] reason or a view whose offsets are in bounds for that
//! frame. The rewrite functions must only be given a frame together with the
//! view that [`classify`] returned for it; they never panic on such a pair.
pub mod build;
pub mod csum;
pub mod fragment;
pub mod icmp;
mod packet;
pub mod segment;
pub mod vnet;

pub use icmp::{
    parse_embedded, translate_error, BadIcmpError, EmbeddedL4, EmbeddedView, ErrorDir,
    IcmpRateLimit,
};
pub use packet::*;

/// 2^64 divided by the golden ratio: the multiplier of Fibonacci hashing
/// (Knuth, TAOCP vol. 3, 6.4), which spreads consecutive keys over the high
/// bits. Used for paired pool addresses, fragment steering and test data.
pub const GOLDEN_RATIO_64: u64 = 0x9e37_79b9_7f4a_7c15;
