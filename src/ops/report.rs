//! Human-readable flow and counter listings (`conntrack -L` and
//! `iptables -L -v` in spirit).
use std::fmt::Write;

use crate::gateway::stats::Snapshot;
use crate::nat::{Flow, FlowState, Proto};

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
    }
}

/// One line per flow: the inside tuple, the outside tuple as the remote host
/// sees it, state and counters.
pub fn flows(flows: &[Flow]) -> String {
    let mut s = format!("flows: {}\n", flows.len());
    for f in flows {
        let i = &f.inside;
        let state = match f.state {
            FlowState::Tcp(t) => format!("{t:?}"),
            FlowState::Udp | FlowState::Icmp => String::new(),
        };
        let _ = writeln!(
            s,
            "  {:<4} {:<11} {}:{} -> {}:{}  as {}:{}  packets {}/{} bytes {}/{}{}",
            proto_name(i.proto),
            state,
            i.src,
            i.sport,
            i.dst,
            i.dport,
            f.ext_addr,
            f.ext_port,
            f.packets_in2out,
            f.packets_out2in,
            f.bytes_in2out,
            f.bytes_out2in,
            if f.replied { "  [replied]" } else { "" },
        );
    }
    s
}

/// Every non-zero counter, one per line.
pub fn stats(s: &Snapshot) -> String {
    let mut out = String::from("counters:\n");
    for (name, v) in s.nonzero() {
        let _ = writeln!(out, "  {name:<28} {v}");
    }
    out
}
