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
