//! Filtering of inbound packets that match no session (RFC 4787 §5, REQ-8;
//! RFC 5382 REQ-3): whether a remote may open a session on a live mapping.
//!
//! Endpoint-independent and address-and-port-dependent filtering need no
//! state. Address-dependent filtering needs to know whether a mapping
//! already has a session with a remote address: a counter per `(proto, ext
//! port, remote address)`, kept only in that mode, in one 9-byte bucket (a
//! packed `u64` and its control byte) per distinct pair.

use super::types::Proto;
use crate::nat::hash::Keyed;
use hashbrown::{hash_table, HashTable};
use std::hash::BuildHasher;
use std::net::Ipv4Addr;

/// Filtering of inbound packets that match no session (RFC 4787 §5, REQ-8;
/// RFC 5382 REQ-3). See the module docs of [`super`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Filtering {
    /// Any remote may reach a live mapping (most transparent; RFC 4787
    /// REQ-8 recommends it).
    EndpointIndependent,
    /// Only a remote address the mapping already has a session with.
    Address,
    /// Only the exact remote address and port of a session (conntrack's
    /// behaviour).
    #[default]
    AddressAndPort,
}

/// The filtering mode and, for address-dependent filtering, the sessions
/// per (mapping, remote address).
pub(super) struct Filter {
    mode: Filtering,
    /// Per protocol, packed as `addr << 32 | port << 16 | (sessions - 1)`
    /// (see [`remote_entry`]). Empty unless `mode` is
    /// [`Filtering::Address`].
    remotes: [HashTable<u64>; 3],
    /// Keyed from OS randomness (remote addresses are chosen by strangers).
    hasher: Keyed,
}

impl Filter {
    pub(super) fn new(mode: Filtering) -> Self {
        Filter {
            mode,
            remotes: std::array::from_fn(|_| HashTable::new()),
            hasher: Keyed::new(),
        }
    }

    /// Whether `remote` may open a session on the live dynamic mapping on
    /// `(proto, port)`.
    #[inline]
    pub(super) fn allows(&self, proto: Proto, port: u16, remote: Ipv4Addr) -> bool {
        match self.mode {
            Filtering::EndpointIndependent => true,
            Filtering::Address => {
                let k = remote_entry(port, remote) >> 16;
                self.remotes[proto.index()]
                    .find(self.hasher.hash_one(k), |&e| e >> 16 == k)
                    .is_some()
            }
            Filtering::AddressAndPort => false,
        }
    }

    /// A session of the mapping on `(proto, port)` with `remote` started.
    #[inline]
    pub(super) fn session_added(&mut self, proto: Proto, port: u16, remote: Ipv4Addr) {
        if self.mode != Filtering::Address {
            return;
        }
        let e = remote_entry(port, remote);
        let k = e >> 16;
        let hasher = &self.hasher;
        match self.remotes[proto.index()].entry(
            hasher.hash_one(k),
            |&x| x >> 16 == k,
            |&x| hasher.hash_one(x >> 16),
        ) {
            hash_table::Entry::Occupied(mut o) => {
                // One mapping's sessions with one remote address differ
                // only in the remote port: at most 65536 of them.
                debug_assert!(*o.get() & 0xffff != 0xffff, "remote count overflow");
                *o.get_mut() += 1;
            }
            hash_table::Entry::Vacant(v) => {
                v.insert(e);
            }
        }
    }

    /// A session of the mapping on `(proto, port)` with `remote` ended.
    #[inline]
    pub(super) fn session_removed(&mut self, proto: Proto, port: u16, remote: Ipv4Addr) {
        if self.mode != Filtering::Address {
            return;
        }
        let k = remote_entry(port, remote) >> 16;
        match self.remotes[proto.index()].find_entry(self.hasher.hash_one(k), |&x| x >> 16 == k) {
            Ok(mut o) => {
                if *o.get() & 0xffff == 0 {
                    o.remove();
                } else {
                    *o.get_mut() -= 1;
                }
            }
            Err(_) => debug_assert!(false, "uncounted remote"),
        }
    }

    /// Forgets every session.
    pub(super) fn clear(&mut self) {
        for r in &mut self.remotes {
            r.clear();
        }
    }

    /// The counters unpacked, as (proto, ext port, remote) -> sessions.
    #[cfg(test)]
    pub(super) fn sessions(&self) -> hashbrown::HashMap<(Proto, u16, Ipv4Addr), u32> {
        let mut m = hashbrown::HashMap::new();
        for (proto, r) in [Proto::Icmp, Proto::Tcp, Proto::Udp]
            .into_iter()
            .zip(&self.remotes)
        {
            for &e in r {
                let key = (proto, (e >> 16) as u16, Ipv4Addr::from((e >> 32) as u32));
                assert!(m.insert(key, (e & 0xffff) as u32 + 1).is_none());
            }
        }
        m
    }
}

/// A `remotes` entry for one session: the key is the upper 48 bits, the
/// low 16 bits count the sessions minus one.
#[inline]
fn remote_entry(port: u16, remote: Ipv4Addr) -> u64 {
    u64::from(u32::from(remote)) << 32 | u64::from(port) << 16
}
