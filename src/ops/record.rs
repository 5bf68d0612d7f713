//! What the control socket carries: flows and counters as plain,
//! serializable records, independent of the flow table's in-memory layout.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::config::{Forward, ForwardProtocol};
use crate::gateway::stats::{Counter, Snapshot};
use crate::nat::{Flow, FlowState, Proto};

/// One flow as `tapnat flows -o json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// `tcp`, `udp` or `icmp`.
    pub proto: String,
    /// The TCP state (`Established`, ...); empty for UDP and ICMP.
    pub state: String,
    /// Original source (inside address, or the remote client of a forward).
    pub src: Ipv4Addr,
    /// Original source port (the echo id for ICMP).
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    /// The outside address and port the remote host sees.
    pub ext_addr: Ipv4Addr,
    pub ext_port: u16,
    /// The responder has answered (unreplied flows are evicted first).
    pub replied: bool,
    pub packets_in2out: u64,
    pub packets_out2in: u64,
    pub bytes_in2out: u64,
    pub bytes_out2in: u64,
}

/// The protocol's name as conntrack and the config spell it.
pub fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
    }
}

impl From<&Flow> for FlowRecord {
    fn from(f: &Flow) -> FlowRecord {
        let i = &f.inside;
        FlowRecord {
            proto: proto_name(i.proto).into(),
            state: match f.state {
                FlowState::Tcp(t) => format!("{t:?}"),
                FlowState::Udp | FlowState::Icmp => String::new(),
            },
            src: i.src,
            sport: i.sport,
            dst: i.dst,
            dport: i.dport,
            ext_addr: f.ext_addr,
            ext_port: f.ext_port,
            replied: f.replied,
            packets_in2out: f.packets_in2out,
            packets_out2in: f.packets_out2in,
            bytes_in2out: f.bytes_in2out,
            bytes_out2in: f.bytes_out2in,
        }
    }
}

/// Every counter by its stable name (zeros included), as
/// `tapnat stats -o json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsRecord {
    pub counters: BTreeMap<String, u64>,
    /// Packets and bytes per `[[snat]]` and `[[masquerade]]` rule.
    #[serde(default)]
    pub rules: Vec<RuleRecord>,
    /// With `uplink.address = "dhcp"` only: the lease in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpRecord>,
}

/// The DHCP client's state, as `tapnat stats` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpRecord {
    /// `None` (JSON `null`): no lease, outbound traffic is dropped.
    pub lease: Option<LeaseRecord>,
}

/// One DHCP lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The outside address with the leased subnet's prefix (`A.B.C.D/N`).
    pub address: String,
    /// The next hop.
    pub router: Ipv4Addr,
    /// The DHCP server that granted it.
    pub server: Ipv4Addr,
    /// Seconds until the lease ends (it is renewed at about half of it).
    pub secs_left: u64,
}

impl DhcpRecord {
    /// A running gateway's DHCP state; `None` with a fixed address.
    pub fn of(observer: &crate::gateway::Observer) -> Option<DhcpRecord> {
        if !observer.addressing().dhcp {
            return None;
        }
        let now = observer.now_ms();
        Some(DhcpRecord {
            lease: observer.lease().map(|l| LeaseRecord {
                address: l.address.to_string(),
                router: l.router,
                server: l.server,
                secs_left: l.secs_left(now),
            }),
        })
    }
}

impl From<&Snapshot> for StatsRecord {
    fn from(s: &Snapshot) -> StatsRecord {
        StatsRecord {
            counters: Counter::ALL
                .iter()
                .map(|c| (c.name().to_string(), s.get(*c)))
                .collect(),
            dhcp: None,
            rules: Vec::new(),
        }
    }
}

/// One NAT rule's traffic: packets (and their IP bytes) translated for the
/// pod addresses it covers, both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRecord {
    /// `snat[I]` or `masquerade[I]`, as a config error would name it.
    pub rule: String,
    /// The rule's `source`.
    pub source: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The rules' counters of `s`, named by `snat` and `masquerade` (the
/// rules running now: counters go by position, SNAT rules first).
pub fn rule_records(
    s: &Snapshot,
    snat: &[crate::config::SnatRule],
    masquerade: &[crate::config::MasqueradeRule],
) -> Vec<RuleRecord> {
    let named = snat
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("snat[{i}]"), r.source.to_string()))
        .chain(
            masquerade
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("masquerade[{i}]"), r.source.to_string())),
        );
    named
        .enumerate()
        .take(crate::gateway::stats::RULES_COUNTED)
        .map(|(k, (rule, source))| {
            let (packets, bytes) = s.rule(k);
            RuleRecord {
                rule,
                source,
                packets,
                bytes,
            }
        })
        .collect()
}

/// One forward as `tapnat forward list -o json` prints it: the three keys
/// of a `[[forward]]` entry, written as the config writes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRecord {
    /// `tcp` or `udp`.
    pub protocol: String,
    /// A port (`"8080"`) or range (`"8000-8099"`) on the uplink address.
    pub port: String,
    /// `"ADDR:PORT"`: the target of the first port.
    pub to: String,
}

impl From<&Forward> for ForwardRecord {
    fn from(f: &Forward) -> ForwardRecord {
        ForwardRecord {
            protocol: forward_protocol_name(f.protocol).into(),
            port: f.ports.to_string(),
            to: format!("{}:{}", f.to_addr, f.to_port),
        }
    }
}

/// `tcp` or `udp`, as the config spells it.
pub fn forward_protocol_name(p: ForwardProtocol) -> &'static str {
    match p {
        ForwardProtocol::Tcp => "tcp",
        ForwardProtocol::Udp => "udp",
    }
}
