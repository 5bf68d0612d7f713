//! What an operator changes in a running gateway: `tapnat flush`, `tapnat
//! forward add|del|list` (and, through the same forward set, a reload).
//!
//! [`Live`] holds the running forward set and the rules the workers
//! classify with; one change at a time (a mutex, taken by control-socket
//! clients and the reload, never by a worker). A change is checked by the
//! config's rules first, then carried to the workers
//! ([`Observer::change_forwards`]), all or nothing.
//!
//! A deleted forward takes its established flows with it. The kernel keeps
//! a deleted DNAT rule's conntrack entries until they expire; here a
//! forward's flows hang off its mapping, and a mapping left to its flows
//! would keep admitting new connections from the same remote address under
//! address-dependent filtering, so "deleted" would not mean "no longer
//! delivered". Its port goes into the reuse-delay quarantine, which a
//! forward (not a masqueraded flow) may take back at once.
use std::sync::{Arc, Mutex, MutexGuard};

use super::events::EventHub;
use super::filter::FlowFilter;
use super::maplog::MapLog;
use super::record::forward_protocol_name;
use crate::config::{self, Config, Forward};
use crate::gateway::{Addressing, FlowPredicate, ForwardRefused, Observer};
use crate::nat::{Filtering, ForwardError, Timeouts};
use crate::policy::forwarded_ports;

/// A running gateway's changeable state.
pub struct Live {
    observer: Observer,
    state: Mutex<State>,
    /// `tapnat events` subscribers and the mapping log.
    events: EventHub,
}

struct State {
    /// The config running now; `forward` is the running forward set.
    config: Config,
    /// Forwards added with `tapnat forward add` (a reload removes those its
    /// file lacks: the file wins, as with `iptables-restore`).
    run_time: Vec<Forward>,
    /// The rules the workers classify with (the forwards' steering).
    addressing: Arc<Addressing>,
}

/// Forwards in `old` and not in `new` (to remove), and in `new` and not in
/// `old` (to add). A forward whose target changed is in both.
pub fn diff_forwards(old: &[Forward], new: &[Forward]) -> (Vec<Forward>, Vec<Forward>) {
    let gone = old.iter().filter(|f| !new.contains(f)).copied().collect();
    let added = new.iter().filter(|f| !old.contains(f)).copied().collect();
    (gone, added)
}

/// Two forwards of `set` whose targets share an endpoint: one inside
/// endpoint has one outside port (endpoint-independent mapping, RFC 4787
/// REQ-1), so it can be the target of one forward only.
pub fn target_clash(set: &[Forward]) -> Option<String> {
    let targets = |f: &Forward| {
        let first = u32::from(f.to_port);
        (first, first + u32::from(f.ports.last - f.ports.first))
    };
    for (i, a) in set.iter().enumerate() {
        for b in &set[i + 1..] {
            let ((a0, a1), (b0, b1)) = (targets(a), targets(b));
            if a.protocol == b.protocol && a.to_addr == b.to_addr && a0 <= b1 && b0 <= a1 {
                return Some(format!(
                    "{} forward {}: {}:{} is already the target of {} {}",
                    forward_protocol_name(b.protocol),
                    b.ports,
                    b.to_addr,
                    b.to_port.max(a0 as u16),
                    forward_protocol_name(a.protocol),
                    a.ports
                ));
            }
        }
    }
    None
}

/// The flows a flush with `filter` removes: those `tapnat flows` with the
/// same selectors lists.
pub fn flush_predicate(filter: &FlowFilter) -> FlowPredicate {
    let filter = filter.clone();
    Arc::new(move |f| filter.matches_flow(f))
}

/// A sentence for a forward the workers refused.
fn refusal(r: ForwardRefused, added: &[Forward]) -> String {
    match r {
        ForwardRefused::Table { port, why } => {
            let proto = added
                .iter()
                .find(|f| f.ports.contains(port))
                .map_or("", |f| forward_protocol_name(f.protocol));
            match why {
                ForwardError::PortInUse => format!(
                    "{proto} port {port} is in use by a masqueraded flow (or waits out its \
                     reuse delay); flush it or choose another port"
                ),
                ForwardError::InsideInUse => format!(
                    "{proto} port {port}: its target already has a masqueraded flow from that \
                     port; flush it first"
                ),
                other => format!("{proto} port {port}: {other}"),
            }
        }
        ForwardRefused::NoAnswer => "a worker did not answer; nothing changed".into(),
    }
}

impl Live {
    /// The state of a gateway just started with `config`, with the events
    /// thread started (writing `maplog`, opened from `config.log`).
    pub fn new(
        observer: Observer,
        config: &Config,
        maplog: Option<MapLog>,
    ) -> std::io::Result<Live> {
        let addressing = observer.addressing();
        let events = EventHub::start(observer.taps().clone(), maplog)?;
        Ok(Live {
            observer,
            state: Mutex::new(State {
                config: config.clone(),
                run_time: Vec::new(),
                addressing,
            }),
            events,
        })
    }

    /// Every NAT rule's counters now, named as the running config names
    /// them.
    pub fn rule_records(
        &self,
        s: &crate::gateway::stats::Snapshot,
    ) -> Vec<super::record::RuleRecord> {
        let st = self.state();
        super::record::rule_records(s, &st.config.snat, &st.config.masquerade)
    }

    /// `tapnat events` subscriptions.
    pub fn events(&self) -> &EventHub {
        &self.events
    }

    /// SIGHUP: reopens the mapping log as the running config's `[log]`
    /// says (the same file for a rotation, another, or none). On failure
    /// the log as it was keeps running.
    pub fn reopen_log(&self) -> Result<(), String> {
        let log = self.state().config.log.clone();
        match &log.mappings {
            None => {
                self.events.set_maplog(None);
                Ok(())
            }
            Some(path) => match MapLog::open(path, log.destinations) {
                Ok(m) => {
                    self.events.set_maplog(Some(m));
                    Ok(())
                }
                Err(e) => Err(format!("log.mappings: cannot open {}: {e}", path.display())),
            },
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panicked holder left whole values behind (every change is
        // applied to the workers before the state is written).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The read-only view of the gateway.
    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    /// Removes the flows `filter` selects (`conntrack -D`; every flow when
    /// it is empty, `conntrack -F`). Forwards stay. Returns how many.
    pub fn flush(&self, filter: &FlowFilter) -> usize {
        self.observer.flush(flush_predicate(filter))
    }

    /// The running forwards, in the order they were configured or added.
    pub fn forwards(&self) -> Vec<Forward> {
        self.state().config.forward.clone()
    }

    /// `tapnat forward add PROTO PORT TO`: checked like a `[[forward]]`
    /// entry against the running set, then added in every worker.
    pub fn forward_add(&self, protocol: &str, port: &str, to: &str) -> Result<Forward, String> {
        let mut st = self.state();
        let f = config::parse_forward(protocol, port, to, &st.config.forward, &st.config.pod)
            .map_err(|e| e.to_string())?;
        let mut new = st.config.forward.clone();
        new.push(f);
        self.set_forwards(&mut st, new)?;
        st.run_time.push(f);
        Ok(f)
    }

    /// `tapnat forward del PROTO PORT`: the forward on exactly this port
    /// or range; its flows are removed with it. Returns it and how many
    /// flows went.
    pub fn forward_del(&self, protocol: &str, port: &str) -> Result<(Forward, usize), String> {
        let mut st = self.state();
        let (p, ports) = config::parse_forward_key(protocol, port).map_err(|e| e.to_string())?;
        let Some(i) = st
            .config
            .forward
            .iter()
            .position(|f| f.protocol == p && f.ports == ports)
        else {
            let within = st
                .config
                .forward
                .iter()
                .find(|f| f.protocol == p && f.ports.overlaps(&ports));
            return Err(match within {
                Some(f) => format!(
                    "no {protocol} forward on exactly {ports}; the forward is on {}",
                    f.ports
                ),
                None => format!("no {protocol} forward on {ports}"),
            });
        };
        let mut new = st.config.forward.clone();
        let gone = new.remove(i);
        let flushed = self.set_forwards(&mut st, new)?;
        st.run_time.retain(|f| *f != gone);
        Ok((gone, flushed))
    }

    /// Makes `new` the running forward set: removes what is gone, adds
    /// what is new, all or nothing. Returns the flows of removed forwards.
    fn set_forwards(&self, st: &mut State, new: Vec<Forward>) -> Result<usize, String> {
        if let Some(clash) = target_clash(&new) {
            return Err(clash);
        }
        let (gone, added) = diff_forwards(&st.config.forward, &new);
        let mut a = (*st.addressing).clone();
        a.forward_targets = forwarded_ports(&new)
            .map(|(proto, ext, to, to_port)| ((proto, to, to_port), ext))
            .collect();
        let a = Arc::new(a);
        let remove: Vec<_> = forwarded_ports(&gone).collect();
        let add: Vec<_> = forwarded_ports(&added).collect();
        let flushed = self
            .observer
            .change_forwards(&remove, &add, a.clone())
            .map_err(|r| refusal(r, &added))?;
        st.addressing = a;
        st.config.forward = new;
        Ok(flushed)
    }
}

/// What a reload applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The keys whose new value runs now.
    pub changed: Vec<&'static str>,
    pub forwards_added: usize,
    pub forwards_removed: usize,
    /// Forwards added with `tapnat forward add` that the file lacks, gone.
    pub run_time_removed: Vec<Forward>,
}

/// Why a reload applied nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadRefused {
    /// These changed keys need a restart.
    Restart(Vec<&'static str>),
    /// The new forward set does not fit the running gateway.
    Forwards(String),
}

fn table_timeouts(t: &config::Timeouts) -> Timeouts {
    let ms = |d: std::time::Duration| d.as_millis().min(u128::from(u64::MAX)) as u64;
    Timeouts {
        tcp_established_ms: ms(t.tcp_established),
        tcp_transitory_ms: ms(t.tcp_transitory),
        udp_ms: ms(t.udp),
        icmp_ms: ms(t.icmp),
    }
}

fn table_filtering(f: config::Filtering) -> Filtering {
    match f {
        config::Filtering::EndpointIndependent => Filtering::EndpointIndependent,
        config::Filtering::Address => Filtering::Address,
        config::Filtering::AddressAndPort => Filtering::AddressAndPort,
    }
}

impl Live {
    /// Applies a re-read config, all or nothing: a changed key that needs a
    /// restart refuses the whole reload, as does a forward set the tables
    /// cannot take; otherwise forwards (the file's set replaces the running
    /// one, run-time additions included), masquerade rules, timeouts,
    /// filtering, the ICMP error limits, `max_flows` and the per-pod limits take their new
    /// values.
    pub fn reload(&self, new: Config) -> Result<Reloaded, ReloadRefused> {
        let mut st = self.state();
        // The running forwards may include run-time ones: compare the rest
        // against the config as it was started or last reloaded.
        let mut base = st.config.clone();
        base.forward.retain(|f| !st.run_time.contains(f));
        let mut changed = config::changed_keys(&base, &new);
        let refused = config::restart_keys(&changed);
        if !refused.is_empty() {
            return Err(ReloadRefused::Restart(refused));
        }
        let run_time_removed: Vec<Forward> = st
            .run_time
            .iter()
            .filter(|f| !new.forward.contains(f))
            .copied()
            .collect();
        if !run_time_removed.is_empty() && !changed.contains(&"forward") {
            changed.push("forward");
        }
        let (gone, added) = diff_forwards(&st.config.forward, &new.forward);
        if !gone.is_empty() || !added.is_empty() {
            self.set_forwards(&mut st, new.forward.clone())
                .map_err(ReloadRefused::Forwards)?;
        }
        st.run_time.clear();
        let n = &new.nat;
        let o = &st.config.nat;
        if n.max_flows != o.max_flows
            || n.timeouts != o.timeouts
            || n.filtering != o.filtering
            || (n.icmp_errors_per_sec, n.icmp_errors_burst)
                != (o.icmp_errors_per_sec, o.icmp_errors_burst)
        {
            self.observer.set_limits(
                n.max_flows,
                table_timeouts(&n.timeouts),
                table_filtering(n.filtering),
                (n.icmp_errors_per_sec, n.icmp_errors_burst),
            );
        }
        if (n.max_flows_per_pod, n.ports_per_pod) != (o.max_flows_per_pod, o.ports_per_pod) {
            self.observer
                .set_pod_limits(n.max_flows_per_pod, n.ports_per_pod);
        }
        if new.masquerade != st.config.masquerade {
            let mut a = (*st.addressing).clone();
            a.masquerade = new.masquerade.clone();
            let a = Arc::new(a);
            self.observer.set_addressing(a.clone());
            st.addressing = a;
        }
        st.config = new;
        Ok(Reloaded {
            changed,
            forwards_added: added.len(),
            forwards_removed: gone.len(),
            run_time_removed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ForwardProtocol;
    use crate::net::PortRange;
    use crate::ops::record::FlowRecord;
    use std::net::Ipv4Addr;

    fn fwd(protocol: ForwardProtocol, first: u16, last: u16, to: u8, to_port: u16) -> Forward {
        Forward {
            protocol,
            ports: PortRange { first, last },
            to_addr: Ipv4Addr::new(10, 244, 0, to),
            to_port,
        }
    }

    #[test]
    fn diff_finds_gone_new_and_retargeted_forwards() {
        use ForwardProtocol::{Tcp, Udp};
        let old = [
            fwd(Tcp, 8080, 8080, 2, 80),
            fwd(Udp, 53, 53, 3, 53),
            fwd(Tcp, 9000, 9009, 4, 9000),
        ];
        let new = [
            fwd(Tcp, 9000, 9009, 4, 9000),
            fwd(Tcp, 8080, 8080, 5, 80),
            fwd(Udp, 5353, 5353, 3, 53),
        ];
        let (gone, added) = diff_forwards(&old, &new);
        assert_eq!(gone, vec![old[0], old[1]]);
        assert_eq!(added, vec![new[1], new[2]]);
        assert_eq!(diff_forwards(&old, &old), (vec![], vec![]));
        assert_eq!(diff_forwards(&[], &old).1, old.to_vec());
        assert_eq!(diff_forwards(&old, &[]).0, old.to_vec());
    }

    #[test]
    fn flush_predicate_selects_as_the_listing_does() {
        use crate::nat::{Flow, FlowState, InKey, Proto};
        let flow = |proto, dport| Flow {
            inside: InKey {
                proto,
                src: Ipv4Addr::new(10, 244, 0, 2),
                sport: 40000,
                dst: Ipv4Addr::new(198, 51, 100, 10),
                dport,
            },
            ext_addr: Ipv4Addr::new(203, 0, 113, 10),
            ext_port: 40001,
            state: FlowState::Udp,
            replied: true,
            last_seen_ms: 0,
            packets_in2out: 0,
            packets_out2in: 0,
            bytes_in2out: 0,
            bytes_out2in: 0,
        };
        let (udp, tcp) = (flow(Proto::Udp, 53), flow(Proto::Tcp, 443));
        // The same choice as the listing's, for every selector.
        let filters = [
            FlowFilter::default(),
            FlowFilter {
                proto: Some("tcp".into()),
                ..Default::default()
            },
            FlowFilter {
                src: Some(Ipv4Addr::new(10, 244, 0, 2)),
                port: Some(53),
                ..Default::default()
            },
            FlowFilter {
                dst: Some(Ipv4Addr::new(198, 51, 100, 11)),
                ..Default::default()
            },
            FlowFilter {
                port: Some(40000),
                ..Default::default()
            },
        ];
        for filter in &filters {
            for f in [&udp, &tcp] {
                assert_eq!(
                    flush_predicate(filter)(f),
                    filter.matches(&FlowRecord::from(f)),
                    "{filter:?} {f:?}"
                );
            }
        }
        let all = flush_predicate(&FlowFilter::default());
        assert!(all(&udp) && all(&tcp));
        let only_udp = flush_predicate(&FlowFilter {
            proto: Some("udp".into()),
            ..Default::default()
        });
        assert!(only_udp(&udp) && !only_udp(&tcp));
        let by_port = flush_predicate(&FlowFilter {
            port: Some(40001),
            dst: Some(Ipv4Addr::new(198, 51, 100, 10)),
            ..Default::default()
        });
        assert!(by_port(&udp) && by_port(&tcp));
        let other_src = flush_predicate(&FlowFilter {
            src: Some(Ipv4Addr::new(10, 244, 0, 3)),
            ..Default::default()
        });
        assert!(!other_src(&udp));
    }

    #[test]
    fn one_target_endpoint_one_forward() {
        use ForwardProtocol::{Tcp, Udp};
        let a = fwd(Tcp, 9000, 9003, 2, 8000);
        assert_eq!(target_clash(&[a, fwd(Tcp, 8081, 8081, 2, 8004)]), None);
        assert_eq!(target_clash(&[a, fwd(Udp, 8081, 8081, 2, 8001)]), None);
        assert_eq!(target_clash(&[a, fwd(Tcp, 8081, 8081, 3, 8001)]), None);
        assert_eq!(
            target_clash(&[a, fwd(Tcp, 7000, 7000, 2, 8001)]).as_deref(),
            Some("tcp forward 7000: 10.244.0.2:8001 is already the target of tcp 9000-9003")
        );
        assert!(target_clash(&[fwd(Tcp, 7000, 7009, 2, 7995), a]).is_some());
    }

    #[test]
    fn refusals_name_protocol_and_port() {
        let added = [fwd(ForwardProtocol::Udp, 8000, 8099, 2, 8000)];
        let r = ForwardRefused::Table {
            port: 8042,
            why: ForwardError::PortInUse,
        };
        assert!(refusal(r, &added).starts_with("udp port 8042 is in use by a masqueraded flow"));
        assert_eq!(
            refusal(ForwardRefused::NoAnswer, &added),
            "a worker did not answer; nothing changed"
        );
    }
}
