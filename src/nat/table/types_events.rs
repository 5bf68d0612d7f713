//! The events the flow table notes for its subscribers (module docs of
//! [`super`], "Events"): plain data, like `types`.

use super::types::{Flow, FlowState, Proto, TcpState};
use std::net::Ipv4Addr;

/// Events a table holds between two drains; more are counted and lost.
pub const JOURNAL_MAX: usize = 4096;

/// Why a flow was removed (`conntrack -E` prints a DESTROY for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Idle for its timeout (not closed by FIN or RST first).
    Timeout,
    /// Closed by FIN, then timed out (the transitory timeout).
    Fin,
    /// Closed by a valid RST, then timed out.
    Rst,
    /// Removed by an operator (`tapnat flush`, a forward deleted).
    Flush,
    /// Evicted unreplied to make room in a full table (early drop).
    Evicted,
    /// Its outside address went away.
    AddressChange,
}

impl EndReason {
    /// The reason for `f`, removed for `why`: a TCP flow that times out
    /// after a FIN or a RST ended by that.
    pub fn of(f: &Flow, why: EndReason) -> EndReason {
        match (why, f.state) {
            (EndReason::Timeout, FlowState::Tcp(TcpState::Closed)) => EndReason::Rst,
            (EndReason::Timeout, FlowState::Tcp(TcpState::FinWait | TcpState::Closing)) => {
                EndReason::Fin
            }
            _ => why,
        }
    }

    /// The stable name printed in events and logs.
    pub fn name(self) -> &'static str {
        match self {
            EndReason::Timeout => "timeout",
            EndReason::Fin => "fin",
            EndReason::Rst => "rst",
            EndReason::Flush => "flush",
            EndReason::Evicted => "evicted",
            EndReason::AddressChange => "address-change",
        }
    }
}

/// A flow or a mapping started or ended.
#[derive(Debug, Clone, Copy)]
pub enum TableEvent {
    /// A flow was created (as it was then: unreplied, no packets counted).
    FlowNew(Flow),
    /// A flow was removed, with its final counters.
    FlowEnd(Flow, EndReason),
    /// A dynamic mapping (inside endpoint -> outside endpoint) was made.
    MappingNew {
        proto: Proto,
        inside: (Ipv4Addr, u16),
        outside: (Ipv4Addr, u16),
    },
    /// A dynamic mapping was released (its port goes into quarantine).
    MappingEnd {
        proto: Proto,
        inside: (Ipv4Addr, u16),
        outside: (Ipv4Addr, u16),
    },
}

#[cfg(test)]
mod tests {
    use super::super::{
        Direction, Filtering, FlowTable, InKey, TableConfig, TcpFlags, TcpSeg, Timeouts,
    };
    use super::*;

    fn table() -> FlowTable {
        FlowTable::new(TableConfig {
            worker: 0,
            workers: 1,
            port_first: 1024,
            port_last: 65535,
            max_flows: 2,
            max_flows_per_pod: 0,
            ports_per_pod: 0,
            timeouts: Timeouts {
                tcp_established_ms: 10_000,
                tcp_transitory_ms: 1_000,
                udp_ms: 1_000,
                icmp_ms: 1_000,
            },
            seed: 1,
            filtering: Filtering::AddressAndPort,
            port_reuse_delay_ms: 0,
        })
    }

    fn key(proto: Proto, sport: u16) -> InKey {
        InKey {
            proto,
            src: Ipv4Addr::new(10, 0, 0, 2),
            sport,
            dst: Ipv4Addr::new(203, 0, 113, 9),
            dport: 80,
        }
    }

    const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    fn drain(t: &mut FlowTable) -> Vec<String> {
        let mut v = Vec::new();
        t.drain_events(|e| {
            v.push(match e {
                TableEvent::FlowNew(f) => format!("new {}", f.inside.sport),
                TableEvent::FlowEnd(f, why) => format!("end {} {}", f.inside.sport, why.name()),
                TableEvent::MappingNew { inside, .. } => format!("map {}", inside.1),
                TableEvent::MappingEnd { inside, .. } => format!("unmap {}", inside.1),
            })
        });
        v
    }

    #[test]
    fn a_closed_tcp_flow_ends_by_its_fin_or_rst() {
        let mut f = Flow {
            inside: key(Proto::Tcp, 1),
            ext_addr: EXT,
            ext_port: 1,
            state: FlowState::Tcp(TcpState::FinWait),
            replied: true,
            last_seen_ms: 0,
            packets_in2out: 0,
            packets_out2in: 0,
            bytes_in2out: 0,
            bytes_out2in: 0,
        };
        assert_eq!(EndReason::of(&f, EndReason::Timeout), EndReason::Fin);
        f.state = FlowState::Tcp(TcpState::Closing);
        assert_eq!(EndReason::of(&f, EndReason::Timeout), EndReason::Fin);
        f.state = FlowState::Tcp(TcpState::Closed);
        assert_eq!(EndReason::of(&f, EndReason::Timeout), EndReason::Rst);
        // Flushed or evicted says so, whatever the state.
        assert_eq!(EndReason::of(&f, EndReason::Flush), EndReason::Flush);
        f.state = FlowState::Tcp(TcpState::Established);
        assert_eq!(EndReason::of(&f, EndReason::Timeout), EndReason::Timeout);
        f.state = FlowState::Udp;
        assert_eq!(EndReason::of(&f, EndReason::Evicted), EndReason::Evicted);
    }

    #[test]
    fn nothing_is_journaled_unless_recording() {
        let mut t = table();
        t.create(&key(Proto::Udp, 5000), EXT, 0).unwrap();
        t.expire(5_000, 100);
        assert!(drain(&mut t).is_empty());
        assert!(!t.recording());
    }

    #[test]
    fn starts_and_ends_with_their_reasons() {
        let mut t = table();
        t.set_recording(true);
        // UDP: created, then timed out by the sweep.
        t.create(&key(Proto::Udp, 5000), EXT, 0).unwrap();
        t.expire(5_000, 100);
        assert_eq!(
            drain(&mut t),
            ["map 5000", "new 5000", "end 5000 timeout", "unmap 5000"]
        );
        // TCP closed by a RST, then timed out: ended by the RST.
        let k = key(Proto::Tcp, 6000);
        let id = t.create(&k, EXT, 6_000).unwrap();
        let syn = TcpSeg {
            flags: TcpFlags::SYN,
            seq: 100,
            ..TcpSeg::NONE
        };
        let _ = t.account(id, Direction::In2Out, syn, 60, 6_000);
        let rst = TcpSeg {
            flags: TcpFlags::RST_ACK,
            seq: 0,
            ack: 101,
            ..TcpSeg::NONE
        };
        let _ = t.account(id, Direction::Out2In, rst, 40, 6_001);
        t.expire(20_000, 100);
        let ev = drain(&mut t);
        assert_eq!(ev[2], "end 6000 rst", "{ev:?}");
        // Flushed; and evicted unreplied when the table is full (2 flows).
        t.create(&key(Proto::Udp, 7000), EXT, 30_000).unwrap();
        t.create(&key(Proto::Udp, 7001), EXT, 30_001).unwrap();
        t.create(&key(Proto::Udp, 7002), EXT, 30_002).unwrap();
        let ev = drain(&mut t);
        assert!(ev.contains(&"end 7000 evicted".to_string()), "{ev:?}");
        assert_eq!(t.remove_where(|f| f.inside.sport == 7001), 1);
        assert_eq!(drain(&mut t), ["end 7001 flush", "unmap 7001"]);
        // The outside address went away (a new DHCP lease).
        assert_eq!(t.remove_address(std::net::Ipv4Addr::new(192, 0, 2, 99)), 0);
        assert_eq!(t.remove_address(EXT), 1);
        assert_eq!(drain(&mut t), ["end 7002 address-change", "unmap 7002"]);
        // Off again: the journal is emptied and stays so.
        t.create(&key(Proto::Udp, 7003), EXT, 30_003).unwrap();
        t.set_recording(false);
        t.create(&key(Proto::Udp, 7004), EXT, 30_004).ok();
        assert!(drain(&mut t).is_empty());
        assert_eq!(t.events_lost(), 0);
    }

    #[test]
    fn a_full_journal_counts_what_it_loses() {
        let mut t = FlowTable::new(TableConfig {
            max_flows: JOURNAL_MAX,
            ..table().config().clone()
        });
        t.set_recording(true);
        for p in 0..JOURNAL_MAX as u16 {
            t.create(&key(Proto::Udp, 2000 + p), EXT, 0).unwrap();
        }
        // Two events (mapping, flow) per create: half of them fit.
        assert_eq!(t.events_lost(), JOURNAL_MAX as u64);
        assert_eq!(drain(&mut t).len(), JOURNAL_MAX);
    }
}
