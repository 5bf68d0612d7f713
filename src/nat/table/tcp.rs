//! TCP tracking of one flow: the flag-driven state machine and the
//! sequence-space bookkeeping that validates RSTs.
//!
//! Both are written from the *initiator's* point of view (conntrack's
//! "original direction"): the side whose SYN opened the flow. For a flow
//! created by [`super::FlowTable::create`] that is the inside host; for one
//! created by [`super::FlowTable::inbound`] (endpoint-independent or
//! address-dependent filtering, or a static forward) it is the remote host.
//!
//! # State machine
//!
//! Driven by the SYN/ACK/FIN/RST flags of segments whose RST (if any)
//! passed the validation below; the flag history lives in the slot's tag
//! bits. A valid RST closes the flow from any state.
//!
//! ```text
//!                     create() / inbound()
//!                        |
//!                        v
//!   +----------------> SynSent --SYN or SYN+ACK from--> SynReceived
//!   |  SYN from          |           responder           |
//!   |  initiator         | ACK from responder,           | ACK w/o SYN either way,
//!   |  (reopen)          | no SYN seen                   | or SYN+ACK both ways
//!   |                    | (mid-stream pickup)           | (simultaneous open)
//!   |                    v                               |
//!   |               Established <------------------------+
//!   |                    |
//!   |                    | FIN one way (also from SynReceived)
//!   |                    v
//!   |                 FinWait --FIN the other way--> Closing
//!   |                                                  |
//!   +--------------------------------------------------+
//!   +-- Closed <-- valid RST either way, from any state
//! ```
//!
//! # RST validation (RFC 5961 §3.2, RFC 5382 / RFC 7857 §2.2)
//!
//! Per direction the table keeps `end` (the highest `seq + payload + SYN +
//! FIN` sent), `ack` (the highest acknowledgment sent) and `win` (the last
//! raw window advertised). Window scaling (RFC 7323) is negotiated in SYN
//! options the table never sees, so every window is assumed to carry the
//! largest legal shift, 14. A RST from sender `S` to receiver `R` is valid
//! when:
//!
//! * `S` has sent nothing tracked yet (a RST answering a SYN, e.g. a
//!   refused connection): it must carry an ACK with
//!   `ack` in `[end[R] - 65535, end[R]]` (RFC 793 SYN-SENT: "the RST is
//!   acceptable if the ACK field acknowledges the SYN"; the slack allows
//!   data sent with the SYN). If `R` has sent nothing tracked either, there
//!   is nothing to check and the RST is accepted.
//! * otherwise its `seq` must lie (modulo 2^32) in `[lo, hi]` with
//!   * `lo = ack[R]`: `R`'s RCV.NXT is at least the highest ACK it sent, and
//!     an endpoint ignores a RST below RCV.NXT anyway (RFC 5961 §3.2).
//!     Before `R` has sent an ACK, `lo = end[S] - 65535`.
//!   * `hi = max(end[S], ack[R] + win[R] * 2^14)`: a genuine RST carries
//!     `S`'s SND.NXT (or the ACK of the segment it answers), which is at
//!     most what `S` sent through us, or — if some of `S`'s segments were
//!     lost before reaching the gateway — at most the right edge of the
//!     window `R` offered, whatever its scale. Before `R` has sent an ACK,
//!     the edge is `end[S] + 65535`.
//!
//! So no RST that the receiving endpoint would accept is ever dropped, for
//! any window scale up to 14 (the price of not parsing options: the
//! accepted range can be up to 2^30 wide when a host advertises a full
//! 16-bit window; an attacker still needs the exact 4-tuple, including the
//! random outside port). A RST that fails the check is dropped by the
//! caller and changes nothing in the flow (no refresh, no counters, no
//! state), like conntrack's "invalid rst".

use super::slab::tag;
use super::types::{Direction, TcpFlags, TcpSeg, TcpState};

/// Sequence-space bookkeeping of one flow; index 0 = sent In2Out (by the
/// inside host), 1 = sent Out2In (by the remote host).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct SeqTrack {
    end: [u32; 2],
    ack: [u32; 2],
    win: [u16; 2],
    /// `END_KNOWN << d` and `ACK_KNOWN << d` bits.
    known: u8,
}

const END_KNOWN: u8 = 1;
const ACK_KNOWN: u8 = 4;

/// Largest window shift of RFC 7323 §2.3.
const MAX_WSCALE: u32 = 14;
/// Slack used before a side's window is known: one unscaled window.
const SLACK: u32 = 65535;

#[inline]
fn dir_index(dir: Direction) -> usize {
    match dir {
        Direction::In2Out => 0,
        Direction::Out2In => 1,
    }
}

/// `a` is after `b` in sequence space (RFC 1982 serial arithmetic).
#[inline]
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// `x` lies in the closed, possibly wrapping, range `[lo, hi]`.
#[inline]
fn within(x: u32, lo: u32, hi: u32) -> bool {
    x.wrapping_sub(lo) <= hi.wrapping_sub(lo)
}

impl SeqTrack {
    /// Whether a RST sent in `dir` is acceptable (see the module docs).
    pub(super) fn rst_acceptable(&self, dir: Direction, seg: &TcpSeg) -> bool {
        let s = dir_index(dir);
        let r = 1 - s;
        let known = |bit: u8, d: usize| self.known & (bit << d) != 0;
        if !known(END_KNOWN, s) {
            if !known(END_KNOWN, r) {
                return true;
            }
            let end_r = self.end[r];
            return seg.flags.ack && within(seg.ack, end_r.wrapping_sub(SLACK), end_r);
        }
        let end_s = self.end[s];
        let (lo, edge) = if known(ACK_KNOWN, r) {
            let a = self.ack[r];
            (a, a.wrapping_add(u32::from(self.win[r]) << MAX_WSCALE))
        } else {
            (end_s.wrapping_sub(SLACK), end_s.wrapping_add(SLACK))
        };
        let hi = if after(end_s, edge) { end_s } else { edge };
        within(seg.seq, lo, hi)
    }

    /// Records a segment sent in `dir` (not a RST: a RST ends the
    /// connection and carries nothing to track).
    fn update(&mut self, dir: Direction, seg: &TcpSeg) {
        if seg.flags.rst {
            return;
        }
        let d = dir_index(dir);
        let end = seg
            .seq
            .wrapping_add(seg.payload_len)
            .wrapping_add(u32::from(seg.flags.syn) + u32::from(seg.flags.fin));
        // `end` only moves forward, and never past the right edge of the
        // window the other side offered (conntrack's `td_maxend` check): a
        // spoofed segment far ahead must not widen the RST range. A reopen
        // (new SYN after RST or FIN/FIN) starts from a fresh `SeqTrack`.
        let r = 1 - d;
        let edge_ok = self.known & (ACK_KNOWN << r) == 0
            || !after(
                end,
                self.ack[r].wrapping_add(u32::from(self.win[r]) << MAX_WSCALE),
            );
        if self.known & (END_KNOWN << d) == 0 || (after(end, self.end[d]) && edge_ok) {
            self.end[d] = end;
            self.known |= END_KNOWN << d;
        }
        if seg.flags.ack {
            if self.known & (ACK_KNOWN << d) == 0 || !after(self.ack[d], seg.ack) {
                self.ack[d] = seg.ack;
                self.win[d] = seg.window;
            }
            self.known |= ACK_KNOWN << d;
        }
    }
}

/// Feeds a segment (already found acceptable) to a flow in state `s`:
/// one state machine step over the flag history in `tags`, then the
/// sequence tracking, restarted when the step reopened the tuple. Returns
/// the new state.
#[inline]
pub(super) fn track(
    s: TcpState,
    tags: &mut u8,
    seqs: &mut SeqTrack,
    dir: Direction,
    seg: &TcpSeg,
) -> TcpState {
    let (st, reopened) = next(s, tags, dir, seg.flags);
    if reopened {
        *seqs = SeqTrack::default();
    }
    seqs.update(dir, seg);
    st
}

/// One step of the TCP state machine; `tags` holds the flag history (bits
/// relative to the initiator, see [`tag`]). Returns the new state and
/// whether the step reopened the tuple (a fresh SYN from the initiator
/// after RST or FIN/FIN), in which case the caller resets the sequence
/// tracking.
fn next(s: TcpState, tags: &mut u8, dir: Direction, fl: TcpFlags) -> (TcpState, bool) {
    use TcpState::*;
    let origin_out = *tags & tag::ORIGIN_OUT != 0;
    // The segment comes from the responder.
    let resp = (dir == Direction::Out2In) != origin_out;
    if fl.rst {
        return (Closed, false);
    }
    let fin = |tags: &mut u8| {
        *tags |= if resp { tag::FIN_RESP } else { tag::FIN_INIT };
        if *tags & (tag::FIN_INIT | tag::FIN_RESP) == tag::FIN_INIT | tag::FIN_RESP {
            Closing
        } else {
            FinWait
        }
    };
    let st = match s {
        // A fresh SYN from the initiator reuses the tuple (like TIME_WAIT
        // reuse).
        Closed | Closing if fl.syn && !fl.ack && !resp => {
            *tags = tag::LIVE | tag::SYN_INIT | (*tags & tag::ORIGIN_OUT);
            return (SynSent, true);
        }
        Closed => Closed,
        SynSent if fl.syn => {
            if resp {
                // SYN+ACK, or a bare SYN: simultaneous open (RFC 5382 REQ-2).
                if fl.ack {
                    *tags |= tag::SYNACK_RESP;
                }
                SynReceived
            } else {
                *tags |= tag::SYN_INIT;
                SynSent
            }
        }
        // Flow created mid-stream (no SYN seen): the responder's ACK shows
        // the connection is alive, like conntrack's tcp_loose pickup.
        SynSent if resp && fl.ack && *tags & tag::SYN_INIT == 0 => {
            if fl.fin {
                fin(tags)
            } else {
                Established
            }
        }
        SynSent => SynSent,
        SynReceived if fl.syn => {
            if fl.ack {
                *tags |= if resp {
                    tag::SYNACK_RESP
                } else {
                    tag::SYNACK_INIT
                };
            }
            if *tags & (tag::SYNACK_INIT | tag::SYNACK_RESP) == tag::SYNACK_INIT | tag::SYNACK_RESP
            {
                Established
            } else {
                SynReceived
            }
        }
        SynReceived if fl.fin => fin(tags),
        SynReceived if fl.ack => Established,
        SynReceived => SynReceived,
        Established | FinWait | Closing if fl.fin => fin(tags),
        Established | FinWait | Closing => s,
    };
    (st, false)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{tseg as seg, ACK, RST, RSTACK, SYN, SYNACK};
    use super::*;

    #[test]
    fn serial_helpers() {
        assert!(after(1, 0));
        assert!(after(0, u32::MAX));
        assert!(!after(0, 0));
        assert!(!after(u32::MAX, 0));
        assert!(within(5, 5, 5));
        assert!(within(0, u32::MAX - 1, 3));
        assert!(!within(4, u32::MAX - 1, 3));
        assert!(!within(u32::MAX - 2, u32::MAX - 1, 3));
    }

    #[test]
    fn rst_answering_a_syn() {
        let mut t = SeqTrack::default();
        // Nothing known: accepted.
        assert!(t.rst_acceptable(Direction::Out2In, &seg(RST, 9, 0, 0, 0)));
        t.update(Direction::In2Out, &seg(SYN, 100_000, 0, 65535, 0));
        // Refused connection: RST+ACK acknowledging the SYN.
        assert!(t.rst_acceptable(Direction::Out2In, &seg(RSTACK, 0, 100_001, 0, 0)));
        // No ACK, or an ACK of something never sent: not acceptable.
        assert!(!t.rst_acceptable(Direction::Out2In, &seg(RST, 0, 100_001, 0, 0)));
        assert!(!t.rst_acceptable(Direction::Out2In, &seg(RSTACK, 0, 100_002, 0, 0)));
        assert!(!t.rst_acceptable(Direction::Out2In, &seg(RSTACK, 0, 5, 0, 0)));
    }

    #[test]
    fn rst_window_bounds_wrap() {
        // Sequence numbers straddling 2^32.
        let isn_in = u32::MAX - 10;
        let isn_out = u32::MAX - 100;
        let mut t = SeqTrack::default();
        t.update(Direction::In2Out, &seg(SYN, isn_in, 0, 1000, 0));
        t.update(
            Direction::Out2In,
            &seg(SYNACK, isn_out, isn_in.wrapping_add(1), 2000, 0),
        );
        // Before the inside host has ACKed: +-65535 around end[out].
        let end_out = isn_out.wrapping_add(1);
        assert!(t.rst_acceptable(Direction::Out2In, &seg(RST, end_out, 0, 0, 0)));
        assert!(t.rst_acceptable(
            Direction::Out2In,
            &seg(RST, end_out.wrapping_add(65535), 0, 0, 0)
        ));
        assert!(!t.rst_acceptable(
            Direction::Out2In,
            &seg(RST, end_out.wrapping_add(65536), 0, 0, 0)
        ));
        t.update(
            Direction::In2Out,
            &seg(ACK, isn_in.wrapping_add(1), end_out, 1, 0),
        );
        // Window 1 at scale 14: [end_out, end_out + 16384].
        assert!(t.rst_acceptable(Direction::Out2In, &seg(RST, end_out, 0, 0, 0)));
        assert!(t.rst_acceptable(
            Direction::Out2In,
            &seg(RST, end_out.wrapping_add(16384), 0, 0, 0)
        ));
        assert!(!t.rst_acceptable(
            Direction::Out2In,
            &seg(RST, end_out.wrapping_add(16385), 0, 0, 0)
        ));
        assert!(!t.rst_acceptable(
            Direction::Out2In,
            &seg(RST, end_out.wrapping_sub(1), 0, 0, 0)
        ));
    }

    #[test]
    fn old_ack_does_not_move_back() {
        let mut t = SeqTrack::default();
        t.update(Direction::In2Out, &seg(ACK, 100, 5000, 10, 0));
        t.update(Direction::In2Out, &seg(ACK, 100, 4000, 20, 0)); // reordered
        assert_eq!(t.ack[0], 5000);
        assert_eq!(t.win[0], 10);
        t.update(Direction::In2Out, &seg(ACK, 100, 5000, 0, 0)); // zero window
        assert_eq!(t.win[0], 0);
        t.update(Direction::In2Out, &seg(ACK, 50, 5000, 0, 10)); // old data
        assert_eq!(t.end[0], 100);
        // The other side offered [0, 10 << 14]: data beyond it is ignored.
        t.update(Direction::Out2In, &seg(ACK, 4000, 0, 10, 0));
        t.update(Direction::In2Out, &seg(ACK, 163_830, 5000, 0, 10));
        assert_eq!(t.end[0], 163_840);
        t.update(Direction::In2Out, &seg(ACK, 163_840, 5000, 0, 1));
        assert_eq!(t.end[0], 163_840);
    }
}
