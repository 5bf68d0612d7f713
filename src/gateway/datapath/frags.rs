//! Fragments both ways (RFC 4787 REQ-13a, REQ-14/14a): virtual reassembly
//! of received fragments (a datagram's later fragments follow the rewrite
//! of its first; those arriving before it are held in the bounded cache)
//! and fragmenting a translated packet without DF that is too big for the
//! egress (RFC 791).
use std::net::Ipv4Addr;

use super::{Action, Actions, Core, FragRewrite};
use crate::gateway::buf::Buf;
use crate::gateway::classify::{frag_key, frag_port};
use crate::gateway::stats::Counter;
use crate::nat::frag::{FragKey, FragRefused, Later, Release};
use crate::policy::Side;
use crate::wire::vnet::VnetHdr;
use crate::wire::{self, csum, fragment, segment, Ipv4View, L4Csum};

impl Core {
    /// The first fragment of datagram `key` (tracked here) was translated,
    /// by this worker or another: record the rewrite and send the fragments
    /// that arrived before it.
    pub fn first_fragment_seen(
        &mut self,
        key: FragKey,
        rewrite: FragRewrite,
        now: u64,
        out: &mut Actions,
    ) {
        if let Some(frags) = &mut self.frags {
            let released = &mut self.released;
            frags.first_seen(key, rewrite, now, &mut |b, r| released.push((b, r)));
            self.drain_released(Some(rewrite), now, out);
        }
    }

    /// Handles buffers the fragment cache gave back: held fragments whose
    /// first fragment has now been seen go out rewritten like it; the others
    /// are dropped.
    pub(super) fn drain_released(
        &mut self,
        rewrite: Option<FragRewrite>,
        now: u64,
        out: &mut Actions,
    ) {
        // Taken out: a hairpinned fragment comes back in through the cache,
        // whose own releases must not be mixed with these.
        let mut released = std::mem::take(&mut self.released);
        while let Some((buf, why)) = released.pop() {
            match (why, rewrite) {
                (Release::Translate, Some(r)) => match wire::classify(buf.frame()) {
                    Ok(wire::Classified::Ipv4(view)) => {
                        self.rewrite_fragment(buf, &view, r, now, out)
                    }
                    _ => self.pool.put(buf),
                },
                _ => out.push(Action::Drop {
                    why: Counter::DropFragmentTimeout,
                    buf,
                }),
            }
        }
        self.released = released;
    }

    /// A non-first fragment: it follows its datagram's first fragment.
    pub(super) fn later_fragment(&mut self, buf: Buf, view: Ipv4View, now: u64, out: &mut Actions) {
        let Some(frags) = &mut self.frags else {
            let why = Counter::DropFragment;
            return out.push(Action::Drop { why, buf });
        };
        let key = frag_key(buf.frame(), &view);
        let released = &mut self.released;
        let answer = frags.later(key, buf, now, &mut |b, r| released.push((b, r)));
        self.drain_released(None, now, out);
        match answer {
            Later::Translate(rewrite, buf) => self.rewrite_fragment(buf, &view, rewrite, now, out),
            Later::Held => self.c.inc(Counter::FragmentsHeld),
            Later::Refused(buf, FragRefused::SourceShareFull) => out.push(Action::Drop {
                why: Counter::DropFragmentSourceShare,
                buf,
            }),
            Later::Refused(buf, _) => out.push(Action::Drop {
                why: Counter::DropFragmentCacheFull,
                buf,
            }),
        }
    }

    fn rewrite_fragment(
        &mut self,
        mut buf: Buf,
        view: &Ipv4View,
        r: FragRewrite,
        now: u64,
        out: &mut Actions,
    ) {
        if view.ttl <= 1 {
            // No ICMP error about a non-first fragment (RFC 1812 §4.3.2.7).
            let why = Counter::DropTtlExceeded;
            return out.push(Action::Drop { why, buf });
        }
        if VnetHdr::parse(buf.vnet()).unwrap_or_default().is_gso() {
            // Segmentation offload applies to whole TCP packets, never to a
            // fragment (offload_fit refuses a non-TCP super-frame the same way).
            let why = Counter::DropUnsupportedProtocol;
            return out.push(Action::Drop { why, buf });
        }
        super::trim_padding(&mut buf, view);
        wire::translate(buf.frame_mut(), view, r.end, r.addr, 0, L4Csum::Full);
        self.c.inc(Counter::FragmentsTranslated);
        if r.hairpin {
            // Like its first fragment: back in as from the uplink, where the
            // rewrite to the target recorded for the translated datagram
            // applies (or the fragment waits for it).
            return self.hairpin(buf, now, out);
        }
        let mtu = self.a.mtu(r.egress);
        if view.total_len > mtu {
            return self.emit_fragmented(r.egress, r.next_hop, buf, mtu, out);
        }
        self.emit(r.egress, r.next_hop, buf, out)
    }

    /// After the first fragment of a datagram was translated: tell the
    /// worker that tracks the datagram how its other fragments are rewritten.
    pub(super) fn first_fragment_done(
        &mut self,
        key: FragKey,
        rewrite: FragRewrite,
        now: u64,
        out: &mut Actions,
    ) {
        if self.frags.is_none() {
            return;
        }
        let owner = usize::from(frag_port(&key)) % self.n;
        if owner == self.k {
            self.first_fragment_seen(key, rewrite, now, out);
        } else {
            out.push(Action::FragNews {
                worker: owner,
                key,
                rewrite,
            });
        }
    }

    /// Cuts a translated UDP super-frame whose datagrams do not fit the
    /// egress MTU (DF clear) into its datagrams, each with a complete
    /// checksum, and sends each on, fragmented when it does not fit either.
    pub(super) fn emit_segmented(
        &mut self,
        side: Side,
        next_hop: Ipv4Addr,
        buf: Buf,
        mtu: usize,
        out: &mut Actions,
    ) {
        let gso = usize::from(VnetHdr::parse(buf.vnet()).unwrap_or_default().gso_size);
        let mut scratch = [0u8; wire::ETH_HLEN + 60 + 8 + fragment::MAX_IP_LEN];
        let frame = buf.frame();
        let cut = self.pieces_of(|mut to| segment::segment_udp(frame, gso, &mut scratch, &mut to));
        let Some(datagrams) = cut else {
            let why = Counter::DropBadL4Header;
            return out.push(Action::Drop { why, buf });
        };
        self.c.add(Counter::GsoSegmented, datagrams.len() as u64);
        self.pool.put(buf);
        for d in datagrams {
            if d.frame().len() - wire::ETH_HLEN > mtu {
                self.emit_fragmented(side, next_hop, d, mtu, out);
            } else {
                self.emit(side, next_hop, d, out);
            }
        }
    }

    /// The frames `cut` hands out, each copied into a pool buffer: all of
    /// them, or None (every buffer given back) when `cut` fails or one does
    /// not fit a buffer.
    fn pieces_of<E>(
        &mut self,
        cut: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<usize, E>,
    ) -> Option<Vec<Buf>> {
        let mut pieces = std::mem::take(&mut self.pieces);
        let pool = &self.pool;
        let mut fits = true;
        let ok = cut(&mut |piece: &[u8]| match pool.frame(piece) {
            Some(b) => pieces.push(b),
            None => fits = false,
        })
        .is_ok();
        if ok && fits {
            return Some(pieces);
        }
        for p in pieces.drain(..) {
            self.pool.put(p);
        }
        self.pieces = pieces;
        None
    }

    /// Splits a translated packet that does not fit the egress MTU (DF clear)
    /// into fragments (RFC 791), finishing an offloaded checksum first.
    pub(super) fn emit_fragmented(
        &mut self,
        side: Side,
        next_hop: Ipv4Addr,
        mut buf: Buf,
        mtu: usize,
        out: &mut Actions,
    ) {
        if let Ok(wire::Classified::Ipv4(v)) = wire::classify(buf.frame()) {
            let hdr = VnetHdr::parse(buf.vnet()).unwrap_or_default();
            if hdr.partial_csum_at(v.l4_offset()) {
                let at = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset);
                let end = wire::ETH_HLEN + v.total_len;
                let frame = buf.frame_mut();
                if at + 2 <= end {
                    let c = csum::checksum(&frame[v.l4_offset()..end]);
                    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
                }
            }
        }
        let frame = buf.frame();
        let Some(mut pieces) = self.pieces_of(|mut to| fragment::fragment(frame, mtu, &mut to))
        else {
            let why = Counter::DropTooBig;
            return out.push(Action::Drop { why, buf });
        };
        self.c.add(Counter::FragmentsCreated, pieces.len() as u64);
        for p in pieces.drain(..) {
            self.emit(side, next_hop, p, out);
        }
        self.pieces = pieces;
        self.pool.put(buf);
    }
}
