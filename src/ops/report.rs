//! Listings for people and scripts: flows like `conntrack -L`, counters
//! like `iptables -L -v`, as text, JSON, or Prometheus text.
use std::fmt::Write;

use super::metrics;
use super::record::{DhcpRecord, FlowRecord, ForwardRecord, RuleRecord, StatsRecord};
use crate::gateway::stats::{Counter, Counters, Snapshot};
use crate::nat::Flow;

/// The output format a client command asked for with `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Prometheus,
}

impl Format {
    /// `-o text|json|prometheus`.
    pub fn parse(s: &str) -> Option<Format> {
        Some(match s {
            "text" => Format::Text,
            "json" => Format::Json,
            "prometheus" => Format::Prometheus,
            _ => return None,
        })
    }
}

/// One line per flow: the inside tuple, the outside tuple as the remote host
/// sees it, state and counters.
pub fn flow_lines(flows: &[FlowRecord]) -> String {
    let mut s = format!("flows: {}\n", flows.len());
    for f in flows {
        let _ = writeln!(
            s,
            "  {:<4} {:<11} {}:{} -> {}:{}  as {}:{}  packets {}/{} bytes {}/{}{}",
            f.proto,
            f.state,
            f.src,
            f.sport,
            f.dst,
            f.dport,
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

/// [`flow_lines`] of a gateway's own flows.
pub fn flows(flows: &[Flow]) -> String {
    flow_lines(&flows.iter().map(FlowRecord::from).collect::<Vec<_>>())
}

/// The DHCP lease (with `uplink.address = "dhcp"`), then every non-zero
/// counter, one per line, in declaration order.
pub fn stats_lines(s: &StatsRecord) -> String {
    let mut out = String::new();
    if let Some(d) = &s.dhcp {
        out.push_str(&lease_line(d));
    }
    out.push_str("counters:\n");
    for c in Counter::ALL {
        match s.counters.get(c.name()) {
            Some(&v) if v != 0 => {
                let _ = writeln!(out, "  {:<28} {v}", c.name());
            }
            _ => {}
        }
    }
    out.push_str(&rule_lines(&s.rules));
    out
}

/// One line per NAT rule with its packets and bytes (like the counters
/// of `iptables -t nat -L -v`); nothing without rules.
pub fn rule_lines(rules: &[RuleRecord]) -> String {
    if rules.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "rules:
",
    );
    for r in rules {
        let _ = writeln!(
            out,
            "  {:<14} {:<18} packets {} bytes {}",
            r.rule, r.source, r.packets, r.bytes
        );
    }
    out
}

/// `uplink lease: ADDR/N via ROUTER from SERVER, S s left`, or that there
/// is none.
pub fn lease_line(d: &DhcpRecord) -> String {
    match &d.lease {
        Some(l) => format!(
            "uplink lease: {} via {} from {}, {} s left\n",
            l.address, l.router, l.server, l.secs_left
        ),
        None => "uplink lease: none (DHCP); outbound traffic is dropped\n".to_string(),
    }
}

/// [`stats_lines`] of a snapshot taken in this process.
pub fn stats(s: &Snapshot) -> String {
    stats_lines(&StatsRecord::from(s))
}

/// A snapshot rebuilt from a record that came over the socket (counters it
/// does not name stay zero).
pub fn snapshot_of(s: &StatsRecord) -> Snapshot {
    let c = Counters::default();
    for k in Counter::ALL {
        if let Some(&v) = s.counters.get(k.name()) {
            c.add(*k, v);
        }
    }
    Snapshot::sum([&c])
}

/// Counters in the Prometheus text format, as `GET /metrics` serves them.
pub fn stats_prometheus(s: &StatsRecord) -> String {
    let mut out = metrics::exposition(&snapshot_of(s), None);
    metrics::rules(&mut out, &s.rules);
    out
}

/// Pretty JSON with a final newline.
pub fn json<T: serde::Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// One line per forward, like `iptables -t nat -L` shows DNAT rules.
pub fn forward_lines(forwards: &[ForwardRecord]) -> String {
    let mut s = format!("forwards: {}\n", forwards.len());
    for f in forwards {
        let _ = writeln!(s, "  {:<4} {:<11} -> {}", f.protocol, f.port, f.to);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_survive_the_record_and_print_in_order() {
        let c = Counters::default();
        c.add(Counter::DropNoFlow, 2);
        c.add(Counter::PodRxFrames, 9);
        let snap = Snapshot::sum([&c]);
        let rec = StatsRecord::from(&snap);
        assert_eq!(rec.counters.len(), Counter::ALL.len());
        assert_eq!(snapshot_of(&rec), snap);
        let text = stats(&snap);
        let rx = text.find("pod_rx_frames").unwrap();
        let drop = text.find("drop_no_flow").unwrap();
        assert!(rx < drop, "{text}");
        assert_eq!(text.lines().count(), 3);
        let back: StatsRecord = serde_json::from_str(&json(&rec)).unwrap();
        assert_eq!(back, rec);
    }

    #[test]
    fn the_lease_is_shown_first_and_survives_json() {
        use super::super::record::LeaseRecord;
        let mut rec = StatsRecord::from(&Snapshot::sum([&Counters::default()]));
        let plain = json(&rec);
        assert!(!plain.contains("dhcp"), "{plain}");
        rec.dhcp = Some(DhcpRecord { lease: None });
        assert!(stats_lines(&rec).starts_with("uplink lease: none (DHCP)"));
        rec.dhcp = Some(DhcpRecord {
            lease: Some(LeaseRecord {
                address: "192.0.2.50/24".into(),
                router: "192.0.2.1".parse().unwrap(),
                server: "192.0.2.1".parse().unwrap(),
                secs_left: 42,
            }),
        });
        assert!(stats_lines(&rec).starts_with(
            "uplink lease: 192.0.2.50/24 via 192.0.2.1 from 192.0.2.1, 42 s left\ncounters:\n"
        ));
        let back: StatsRecord = serde_json::from_str(&json(&rec)).unwrap();
        assert_eq!(back, rec);
    }

    #[test]
    fn formats_parse() {
        assert_eq!(Format::parse("json"), Some(Format::Json));
        assert_eq!(Format::parse("prometheus"), Some(Format::Prometheus));
        assert_eq!(Format::parse("text"), Some(Format::Text));
        assert_eq!(Format::parse("yaml"), None);
    }
}
