//! Hashing and randomness for state whose keys strangers choose.
//!
//! Every table keyed by outsider-chosen data (the flow index, the
//! mappings, the address-dependent filter, the per-pod use, the fragment
//! cache, the routed sessions) hashes with [`Keyed`]: foldhash keyed from
//! the operating system's randomness (`getrandom(2)`), a 64-bit shared
//! seed drawn once per process and a 64-bit seed per table. hashbrown's
//! default foldhash state, without `std`, derives its seeds from addresses
//! and a counter only, which an attacker who knows the binary can guess;
//! here they come from the kernel's CSPRNG, so colliding keys cannot be
//! computed offline. SipHash-1-3 (std's `RandomState`) was measured as the
//! alternative: see the README ("Keyed hashing") for the numbers and the
//! choice.
//!
//! [`os_random_u64`] also seeds the port choice (RFC 6056 wants outside
//! ports an off-path attacker cannot predict).
use std::hash::BuildHasher;
use std::sync::OnceLock;

use foldhash::fast::{FoldHasher, SeedableRandomState};
use foldhash::SharedSeed;

/// 64 bits from the operating system's randomness (`getrandom(2)`). If
/// the kernel cannot give any (no `getrandom` and no `/dev/urandom`, which
/// std itself needs for its `RandomState`), std's randomly keyed SipHash
/// state is used instead, which draws from the same source or aborts.
pub fn os_random_u64() -> u64 {
    getrandom::u64()
        .unwrap_or_else(|_| std::collections::hash_map::RandomState::new().hash_one(0u8))
}

/// The process-wide shared seed, drawn once.
fn shared_seed() -> &'static SharedSeed {
    static SEED: OnceLock<SharedSeed> = OnceLock::new();
    SEED.get_or_init(|| SharedSeed::from_u64(os_random_u64()))
}

/// `BuildHasher` for tables keyed by outsider-chosen data: foldhash with
/// seeds from the operating system's randomness (module docs).
#[derive(Clone, Debug)]
pub struct Keyed(SeedableRandomState);

impl Keyed {
    /// A state with a fresh per-table seed.
    pub fn new() -> Self {
        Keyed(SeedableRandomState::with_seed(
            os_random_u64(),
            shared_seed(),
        ))
    }
}

impl Default for Keyed {
    fn default() -> Self {
        Keyed::new()
    }
}

impl BuildHasher for Keyed {
    type Hasher = FoldHasher<'static>;
    #[inline]
    fn build_hasher(&self) -> Self::Hasher {
        self.0.build_hasher()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_between_tables_and_runs() {
        let (a, b) = (Keyed::new(), Keyed::new());
        let keys = 0..64u128;
        let differ = keys.filter(|k| a.hash_one(k) != b.hash_one(k)).count();
        assert!(differ >= 60, "two tables hash alike: {differ}/64 differ");
        assert_ne!(os_random_u64(), os_random_u64());
        // One state is stable (a table must find what it stored).
        assert_eq!(a.hash_one(7u128), a.hash_one(7u128));
    }
}
