//! When flows end without a FIN or RST: idle timeouts, the incremental
//! sweep, and the early drop that makes room in a full table.
//!
//! * A flow is expired once `now_ms >= last_seen_ms + timeout` (see
//!   [`Flow::timeout_ms`]); lookups never return one, they remove it.
//! * The sweep walks the slots from a cursor that persists across calls, a
//!   bounded number per call and at most one lap, so its cost per call is
//!   fixed whatever the table's size.
//! * Early drop (like conntrack's `early_drop` of non-assured entries)
//!   looks at [`EARLY_DROP_SCAN`] slots from the sweep cursor: the first
//!   expired flow found goes, else the least recently seen unreplied one;
//!   replied flows are never evicted for a new one. A TCP flow whose
//!   handshake has not completed (SYN, or SYN and SYN-ACK, without the final
//!   ACK: a SYN flood at a forward, answered by the pod) counts as
//!   unreplied here, as conntrack's SYN_RECV is not assured.
//!
//! This part only chooses; the facade removes (a removal also touches the
//! mappings, the filter and the ports).

use super::slab::Slab;
use super::types::{Flow, FlowState, TcpState, Timeouts};

/// Slots examined for an expired or unreplied victim when the table is full
/// (conntrack's early_drop looks at a bounded number of buckets too).
pub const EARLY_DROP_SCAN: usize = 128;

/// Whether `f` is expired at `now_ms`.
#[inline]
pub(super) fn is_expired(f: &Flow, t: &Timeouts, now_ms: u64) -> bool {
    now_ms >= f.expires_at_ms(t)
}

/// Whether early drop may evict `f`: never replied, or a TCP handshake
/// that never completed.
#[inline]
fn evictable(f: &Flow) -> bool {
    !f.replied
        || matches!(
            f.state,
            FlowState::Tcp(TcpState::SynSent | TcpState::SynReceived)
        )
}

/// What early drop found to free a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Victim {
    /// An expired flow (counted as expired).
    Expired(usize),
    /// The least recently seen unreplied flow in reach (early dropped).
    Unreplied(usize),
}

/// The sweep cursor: the next slot to examine.
#[derive(Debug, Default)]
pub(super) struct Sweep {
    cursor: usize,
}

impl Sweep {
    /// Where a walk over `n` slots starts (the cursor, or 0 if the slab got
    /// shorter since, after a clear).
    #[inline]
    pub(super) fn start(&self, n: usize) -> usize {
        if self.cursor < n {
            self.cursor
        } else {
            0
        }
    }

    /// Where the next walk starts.
    #[inline]
    pub(super) fn set(&mut self, c: usize) {
        self.cursor = c;
    }

    /// The early-drop choice among the [`EARLY_DROP_SCAN`] slots from the
    /// cursor (the cursor does not move).
    pub(super) fn victim(&self, slab: &Slab, t: &Timeouts, now_ms: u64) -> Option<Victim> {
        let n = slab.slots();
        if n == 0 {
            return None;
        }
        let mut c = self.start(n);
        let mut victim: Option<(usize, u64)> = None;
        for _ in 0..EARLY_DROP_SCAN.min(n) {
            if slab.is_live(c) {
                let f = slab.flow(c);
                if is_expired(f, t, now_ms) {
                    return Some(Victim::Expired(c));
                }
                if evictable(f) && victim.is_none_or(|(_, seen)| f.last_seen_ms < seen) {
                    victim = Some((c, f.last_seen_ms));
                }
            }
            c = next(c, n);
        }
        victim.map(|(i, _)| Victim::Unreplied(i))
    }
}

/// The slot after `c` in a lap over `n` slots.
#[inline]
pub(super) fn next(c: usize, n: usize) -> usize {
    if c + 1 == n {
        0
    } else {
        c + 1
    }
}
