//! Changes to a table that is in use: static forwards added, changed and
//! removed (at start and at run time), limits and timeouts changed on
//! reload, flows flushed by a predicate. Each keeps the parts (slab,
//! mappings, filter, ports) in step as `create` and `remove` do.
use std::net::Ipv4Addr;

use super::*;

impl FlowTable {
    /// Adds a static forward (DNAT): inbound `proto` packets to
    /// `ext_addr:ext_port` with no session open one towards
    /// `inside_addr:inside_port` (TCP: on a SYN only), whatever the
    /// [`Filtering`]. The outside port is reserved for good; it may lie
    /// outside the dynamic port range. See the module docs.
    pub fn add_forward(
        &mut self,
        proto: Proto,
        ext_addr: Ipv4Addr,
        ext_port: u16,
        inside_addr: Ipv4Addr,
        inside_port: u16,
    ) -> Result<(), ForwardError> {
        self.can_add_forward(proto, ext_port, inside_addr, inside_port)?;
        // A port a deleted forward left in quarantine may be forwarded again
        // at once (its bit stays set, and the quarantine's end leaves a held
        // port alone); any other port is reserved now.
        if !self.ports.is_used(proto, ext_port) {
            self.ports.reserve(proto, ext_port);
        }
        self.mappings
            .add_forward((proto, inside_addr, inside_port), ext_addr, ext_port);
        Ok(())
    }

    /// Whether [`FlowTable::add_forward`] would accept this forward now.
    pub fn can_add_forward(
        &self,
        proto: Proto,
        ext_port: u16,
        inside_addr: Ipv4Addr,
        inside_port: u16,
    ) -> Result<(), ForwardError> {
        if !self.ports.owns(ext_port) {
            return Err(ForwardError::NotOwned);
        }
        if proto == Proto::Icmp {
            return Err(ForwardError::Icmp);
        }
        if self.mappings.contains(&(proto, inside_addr, inside_port)) {
            return Err(ForwardError::InsideInUse);
        }
        let free = !self.ports.is_used(proto, ext_port)
            || (self.mappings.owner_of(proto, ext_port).is_none()
                && self.ports.is_forward_cooling(proto, ext_port));
        if free {
            Ok(())
        } else {
            Err(ForwardError::PortInUse)
        }
    }

    /// Removes the static forward on `(proto, ext_port)`, with every flow of
    /// it (a deleted DNAT rule's connections are flushed with it, so the
    /// mapping cannot keep admitting new inbound connections); the port goes
    /// into quarantine as a released mapping's does, though a forward may
    /// take it back at once (`forward del` then `add`, or a reload that
    /// changes a forward's target). Returns the number of
    /// flows removed, or `None` if no forward holds the port.
    pub fn remove_forward(&mut self, proto: Proto, ext_port: u16) -> Option<usize> {
        let mk = self.mappings.owner_of(proto, ext_port)?;
        self.mappings.forward_of(&mk)?;
        let flushed = self.remove_where(|f| (f.inside.proto, f.inside.src, f.inside.sport) == mk);
        self.mappings.remove_forward(&mk);
        self.ports.release_forward(proto, ext_port, self.clock_ms);
        Some(flushed)
    }

    /// Removes the forwards on `remove` and adds those of `add` (each a
    /// `(proto, ext port, target addr, target port)`), only the ports this
    /// table owns, all or nothing: every add is checked against the table
    /// as it will be once the removes are done, and on the first refusal
    /// nothing changes. With `dry_run` only the check is made. Returns the
    /// flows of removed forwards that went with them.
    pub fn change_forwards(
        &mut self,
        remove: &[(Proto, u16)],
        add: &[(Proto, u16, Ipv4Addr, u16)],
        ext_addr: Ipv4Addr,
        dry_run: bool,
    ) -> Result<usize, (u16, ForwardError)> {
        let remove: Vec<(Proto, u16)> = remove
            .iter()
            .copied()
            .filter(|&(proto, port)| {
                self.ports.owns(port)
                    && self
                        .mappings
                        .owner_of(proto, port)
                        .is_some_and(|mk| self.mappings.forward_of(&mk).is_some())
            })
            .collect();
        let freed: Vec<MapKey> = remove
            .iter()
            .filter_map(|&(proto, port)| self.mappings.owner_of(proto, port))
            .collect();
        let add: Vec<_> = add
            .iter()
            .copied()
            .filter(|&(_, port, _, _)| self.ports.owns(port))
            .collect();
        for &(proto, port, addr, to) in &add {
            match self.can_add_forward(proto, port, addr, to) {
                Ok(()) => {}
                Err(ForwardError::PortInUse) if remove.contains(&(proto, port)) => {}
                Err(ForwardError::InsideInUse) if freed.contains(&(proto, addr, to)) => {}
                Err(e) => return Err((port, e)),
            }
        }
        if dry_run {
            return Ok(0);
        }
        let mut flushed = 0;
        for &(proto, port) in &remove {
            flushed += self.remove_forward(proto, port).unwrap_or(0);
        }
        for &(proto, port, addr, to) in &add {
            self.add_forward(proto, ext_addr, port, addr, to)
                .map_err(|e| (port, e))?;
        }
        Ok(flushed)
    }

    /// New limits at run time (a reload): `max_flows` bounds new flows only
    /// (a table above it keeps its flows, evicting or refusing as when
    /// full), timeouts apply to every flow from its next expiry check, and
    /// a new filtering mode counts the live sessions afresh.
    ///
    /// # Panics
    /// If `max_flows > u32::MAX` (the config layer validates it first).
    pub fn set_limits(&mut self, max_flows: usize, timeouts: Timeouts, filtering: Filtering) {
        assert!(max_flows <= u32::MAX as usize, "max_flows must fit in u32");
        self.cfg.max_flows = max_flows;
        self.cfg.timeouts = timeouts;
        if filtering != self.cfg.filtering {
            self.cfg.filtering = filtering;
            let mut filter = Filter::new(filtering);
            for f in self.slab.iter() {
                filter.session_added(f.inside.proto, f.ext_port, f.inside.dst);
            }
            self.filter = filter;
        }
    }

    /// New per-pod limits at run time (a reload), this shard's shares of
    /// them (0 = no limit): they bound new flows and mappings only; a pod
    /// above a lowered limit keeps what it holds, losing its own unreplied
    /// flows first as it opens new ones.
    pub fn set_pod_limits(&mut self, max_flows_per_pod: u32, ports_per_pod: u32) {
        self.cfg.max_flows_per_pod = max_flows_per_pod;
        self.cfg.ports_per_pod = ports_per_pod;
        self.pods.set_limits(max_flows_per_pod, ports_per_pod);
    }

    /// Removes every live flow `pred` selects, as [`FlowTable::remove`]
    /// does (both directions at once, the last flow of a dynamic mapping
    /// sends its port into quarantine); forwards stay. Returns how many
    /// were removed. Like `conntrack -D` (or `-F` for a predicate that is
    /// always true).
    pub fn remove_where(&mut self, mut pred: impl FnMut(&Flow) -> bool) -> usize {
        let victims: Vec<usize> = (0..self.slab.slots())
            .filter(|&i| self.slab.is_live(i) && pred(self.slab.flow(i)))
            .collect();
        for &i in &victims {
            self.remove_slot(i);
        }
        victims.len()
    }

    /// The forward whose target is `inside_addr:inside_port`, as `(ext
    /// addr, ext port)`: a pod-side packet from it that misses belongs to
    /// the worker owning that port, and [`FlowTable::create`] there maps it
    /// onto the forward port.
    pub fn forward_for_inside(
        &self,
        proto: Proto,
        inside_addr: Ipv4Addr,
        inside_port: u16,
    ) -> Option<(Ipv4Addr, u16)> {
        self.mappings.forward_of(&(proto, inside_addr, inside_port))
    }

    /// Number of static forwards.
    pub fn forwards_len(&self) -> usize {
        self.mappings.forwards_len()
    }
}
