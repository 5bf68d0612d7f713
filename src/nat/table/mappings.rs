//! Endpoint-independent mappings (RFC 4787 REQ-1, RFC 5382 REQ-1, RFC 5508
//! REQ-1a) and their reverse index.
//!
//! A mapping ties an inside endpoint `(proto, addr, port)` to one outside
//! port; it is refcounted by its flows and dynamic ones go away with their
//! last flow (the caller then releases the port). A static forward is a
//! mapping that is never released.
//!
//! The reverse index (`owners`) answers "which inside endpoint holds
//! outside port `p`" without a second hash table: per protocol, a dense
//! array with one 8-byte slot per port of this worker's slice (`p /
//! workers`), holding the endpoint last given `p` as `addr << 16 | port`.
//! It is never cleared: an entry counts only while that endpoint's mapping
//! still has the port (see [`Mappings::owner_of`]), so a release writes
//! nothing to it, and the inbound lookup reads it without a division.

use super::types::Proto;
use crate::nat::hash::Keyed;
use hashbrown::hash_map::Entry;
use hashbrown::HashMap;
use std::net::Ipv4Addr;

/// Inside endpoint of an endpoint-independent mapping.
pub(super) type MapKey = (Proto, Ipv4Addr, u16);

#[derive(Debug, Clone, Copy)]
pub(super) struct Mapping {
    /// Outside address of the mapping's latest flow (the forward's address
    /// for a forward): inbound packets must be sent to it.
    pub(super) ext_addr: Ipv4Addr,
    pub(super) ext_port: u16,
    pub(super) refs: u32,
    /// A static forward: permanent, never released.
    pub(super) forward: bool,
}

/// The mappings of one worker and their reverse index.
pub(super) struct Mappings {
    map: HashMap<MapKey, Mapping, Keyed>,
    /// Per protocol: slot `port / workers` holds the inside endpoint last
    /// given `port` (module docs).
    owners: [Vec<u64>; 3],
    workers: u16,
    /// `ceil(2^32 / workers)`: `port * owner_div >> 32 == port / workers`
    /// for every `u16` port (no division on the inbound lookup path).
    owner_div: u64,
}

impl Mappings {
    pub(super) fn new(workers: u16, cap: usize) -> Self {
        Mappings {
            map: HashMap::with_capacity_and_hasher(cap, Keyed::new()),
            owners: std::array::from_fn(|_| vec![0; 65536 / usize::from(workers) + 1]),
            workers,
            owner_div: (1u64 << 32).div_ceil(u64::from(workers)),
        }
    }

    /// The inside endpoint last given outside `port`, unchecked: it may be
    /// stale (its mapping gone or moved to another port). For the lookup
    /// path, which checks the flow it finds anyway.
    #[inline]
    pub(super) fn last_owner(&self, proto: Proto, port: u16) -> Option<(Ipv4Addr, u16)> {
        let slot = (u64::from(port) * self.owner_div) >> 32;
        debug_assert_eq!(slot, u64::from(port / self.workers));
        let v = *self.owners[proto.index()].get(slot as usize)?;
        Some((Ipv4Addr::from((v >> 16) as u32), v as u16))
    }

    /// Starts fetching the reverse-index entry of outside `port` (the
    /// first stage of a burst of inbound lookups).
    #[inline]
    pub(super) fn prefetch_owner(&self, proto: Proto, port: u16) {
        let slot = (u64::from(port) * self.owner_div) >> 32;
        if let Some(v) = self.owners[proto.index()].get(slot as usize) {
            crate::device::sys::prefetch(v);
        }
    }

    /// The inside endpoint whose mapping (or forward) currently holds
    /// outside `port`, if any.
    #[inline]
    pub(super) fn owner_of(&self, proto: Proto, port: u16) -> Option<MapKey> {
        let v = *self.owners[proto.index()].get(usize::from(port / self.workers))?;
        let mk = (proto, Ipv4Addr::from((v >> 16) as u32), v as u16);
        match self.map.get(&mk) {
            Some(m) if m.ext_port == port => Some(mk),
            _ => None,
        }
    }

    #[inline]
    pub(super) fn get(&self, mk: &MapKey) -> Option<&Mapping> {
        self.map.get(mk)
    }

    /// Counts one more flow on `mk`'s mapping, creating it on a port from
    /// `alloc` if there is none; returns the `(ext addr, ext port)` the flow
    /// gets, or `None` if a port was needed and `alloc` had none. A dynamic
    /// mapping takes `ext_addr` as its address; a forward keeps its own.
    #[inline]
    pub(super) fn acquire(
        &mut self,
        mk: MapKey,
        ext_addr: Ipv4Addr,
        alloc: impl FnOnce() -> Option<u16>,
    ) -> Option<(Ipv4Addr, u16)> {
        match self.map.entry(mk) {
            Entry::Occupied(mut e) => {
                let m = e.get_mut();
                m.refs += 1;
                if !m.forward {
                    m.ext_addr = ext_addr;
                }
                Some((m.ext_addr, m.ext_port))
            }
            Entry::Vacant(e) => {
                let p = alloc()?;
                e.insert(Mapping {
                    ext_addr,
                    ext_port: p,
                    refs: 1,
                    forward: false,
                });
                set_owner(&mut self.owners, self.workers, mk, p);
                Some((ext_addr, p))
            }
        }
    }

    /// Counts one more flow on an existing mapping.
    pub(super) fn pin(&mut self, mk: &MapKey) {
        self.map.get_mut(mk).expect("mapping").refs += 1;
    }

    /// Drops one flow of `mk`'s mapping; returns the outside port if that
    /// released a dynamic mapping (the caller gives the port back).
    pub(super) fn unref(&mut self, mk: MapKey) -> Option<u16> {
        let Entry::Occupied(mut e) = self.map.entry(mk) else {
            debug_assert!(false, "flow without mapping");
            return None;
        };
        let m = e.get_mut();
        m.refs -= 1;
        if m.refs == 0 && !m.forward {
            Some(e.remove().ext_port)
        } else {
            None
        }
    }

    /// Adds a static forward of `mk` on `ext_addr:ext_port`; the caller has
    /// checked that neither side is in use.
    pub(super) fn add_forward(&mut self, mk: MapKey, ext_addr: Ipv4Addr, ext_port: u16) {
        debug_assert!(!self.map.contains_key(&mk), "inside endpoint in use");
        self.map.insert(
            mk,
            Mapping {
                ext_addr,
                ext_port,
                refs: 0,
                forward: true,
            },
        );
        set_owner(&mut self.owners, self.workers, mk, ext_port);
    }

    /// Removes the forward of `mk` (its flows are gone already); the caller
    /// releases its port.
    pub(super) fn remove_forward(&mut self, mk: &MapKey) {
        debug_assert!(self.map.get(mk).is_some_and(|m| m.forward && m.refs == 0));
        self.map.remove(mk);
    }

    /// Whether the inside endpoint has a mapping or forward.
    pub(super) fn contains(&self, mk: &MapKey) -> bool {
        self.map.contains_key(mk)
    }

    /// The forward whose target is `mk`, as `(ext addr, ext port)`.
    pub(super) fn forward_of(&self, mk: &MapKey) -> Option<(Ipv4Addr, u16)> {
        match self.map.get(mk) {
            Some(m) if m.forward => Some((m.ext_addr, m.ext_port)),
            _ => None,
        }
    }

    /// Number of static forwards.
    pub(super) fn forwards_len(&self) -> usize {
        self.map.values().filter(|m| m.forward).count()
    }

    /// Number of mappings, forwards included.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Removes every dynamic mapping, handing its port to `release`;
    /// forwards stay, with no flows.
    pub(super) fn clear_dynamic(&mut self, mut release: impl FnMut(MapKey, u16)) {
        self.map.retain(|mk, m| {
            if m.forward {
                m.refs = 0;
                return true;
            }
            release(*mk, m.ext_port);
            false
        });
    }

    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = (&MapKey, &Mapping)> {
        self.map.iter()
    }
}

/// Records `mk` as the owner of outside `port` (owned by this worker).
#[inline]
fn set_owner(owners: &mut [Vec<u64>; 3], workers: u16, mk: MapKey, port: u16) {
    owners[mk.0.index()][usize::from(port / workers)] =
        u64::from(u32::from(mk.1)) << 16 | u64::from(mk.2);
}
