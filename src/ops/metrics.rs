//! Prometheus metrics: the text exposition format (version 0.0.4) of the
//! gateway's counters, and a minimal HTTP listener serving it at
//! `GET /metrics`.
//!
//! Names follow the Prometheus conventions: every counter ends in `_total`,
//! one metric per meaning with labels for the variants (`side`,
//! `direction`, `reason`), and the table size mirrors node_exporter's
//! conntrack collector (`node_nf_conntrack_entries`,
//! `node_nf_conntrack_entries_limit`).
//!
//! The families:
//! - `tapnat_frames_total{side, direction="rx"|"tx"}`: frames per device.
//! - `tapnat_packets_total{direction="in2out"|"out2in"}`: packets
//!   translated; `tapnat_bytes_total{direction}`: their IP bytes (a TSO
//!   super-frame counts its whole length).
//! - `tapnat_drops_total{reason}`: frames dropped, one reason per `drop_`
//!   counter.
//! - `tapnat_flows_created_total`, and
//!   `tapnat_flows_destroyed_total{reason="timeout"|"evicted"|"flush"|"address_change"}`:
//!   flows that expired, were evicted unreplied to make room in a full table
//!   (conntrack's early drop), were removed by an operator (`tapnat
//!   flush`, a forward removed with its flows), or lost their outside
//!   address (`uplink.address = "dhcp"`: a new lease or none).
//! - `tapnat_<counter>_total` for every other counter of `tapnat stats`.
//! - Gauges: `tapnat_conntrack_entries`, `tapnat_conntrack_entries_limit`,
//!   `tapnat_fragments_tracked` (datagrams in the fragment caches),
//!   `tapnat_fragments_held` (fragments waiting for their first fragment),
//!   `tapnat_neighbours` (the neighbour table's entries); each at most one
//!   loop iteration of its thread old. With `uplink.address = "dhcp"` also
//!   `tapnat_dhcp_lease_seconds` (time left on the lease, 0 without one).
//!
//! The listener is written by hand rather than taken from an HTTP crate: it
//! serves one read-only path, one request per connection, and needs no
//! async runtime; each connection gets its own short-lived thread with read
//! and write timeouts, and at most [`MAX_CLIENTS`] run at once, so a stuck
//! scraper can neither block another nor pile up threads.
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::gateway::stats::{Counter, Snapshot};

/// Connections served at once; more are closed at once.
pub const MAX_CLIENTS: usize = 8;
/// How long a client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// The gauges of a running gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gauges {
    /// Live flows.
    pub entries: u64,
    /// The flow table's bound (`nat.max_flows`).
    pub limit: u64,
    /// Datagrams the fragment caches track.
    pub fragments_tracked: u64,
    /// Fragments held until their datagram's first fragment comes.
    pub fragments_held: u64,
    /// Entries of the neighbour table.
    pub neighbours: u64,
    /// With `uplink.address = "dhcp"`: seconds left on the lease (0: none).
    pub dhcp_lease_seconds: Option<u64>,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The `(side, direction)` labels of a frame counter.
fn frame_labels(c: Counter) -> Option<(&'static str, &'static str)> {
    Some(match c {
        Counter::PodRxFrames => ("pod", "rx"),
        Counter::PodTxFrames => ("pod", "tx"),
        Counter::UplinkRxFrames => ("uplink", "rx"),
        Counter::UplinkTxFrames => ("uplink", "tx"),
        _ => return None,
    })
}

/// The `direction` label of a translated-packet counter.
fn packet_direction(c: Counter) -> Option<&'static str> {
    match c {
        Counter::In2outPackets => Some("in2out"),
        Counter::Out2inPackets => Some("out2in"),
        _ => None,
    }
}

/// The `direction` label of a translated-bytes counter.
fn bytes_direction(c: Counter) -> Option<&'static str> {
    match c {
        Counter::In2outBytes => Some("in2out"),
        Counter::Out2inBytes => Some("out2in"),
        _ => None,
    }
}

/// The `reason` label of a destroyed-flows counter.
fn destroy_reason(c: Counter) -> Option<&'static str> {
    match c {
        Counter::FlowsExpired => Some("timeout"),
        Counter::FlowsEvicted => Some("evicted"),
        Counter::FlowsFlushed => Some("flush"),
        Counter::FlowsAddressChange => Some("address_change"),
        _ => None,
    }
}

/// One family whose series are the counters `label` names, with that
/// label's value.
fn labelled(
    out: &mut String,
    s: &Snapshot,
    name: &str,
    help: &str,
    key: &str,
    label: fn(Counter) -> Option<&'static str>,
) {
    family(out, name, "counter", help);
    for c in Counter::ALL {
        if let Some(v) = label(*c) {
            let _ = writeln!(out, "{name}{{{key}=\"{v}\"}} {}", s.get(*c));
        }
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// The rules' counters: `tapnat_rule_packets_total{rule, source}` and
/// `tapnat_rule_bytes_total{rule, source}`, appended to `out`.
pub fn rules(out: &mut String, rules: &[crate::ops::record::RuleRecord]) {
    family(
        out,
        "tapnat_rule_packets_total",
        "counter",
        "Packets translated under each NAT rule (both directions).",
    );
    for r in rules {
        let _ = writeln!(
            out,
            "tapnat_rule_packets_total{{rule=\"{}\",source=\"{}\"}} {}",
            r.rule, r.source, r.packets
        );
    }
    family(
        out,
        "tapnat_rule_bytes_total",
        "counter",
        "IP bytes translated under each NAT rule (both directions).",
    );
    for r in rules {
        let _ = writeln!(
            out,
            "tapnat_rule_bytes_total{{rule=\"{}\",source=\"{}\"}} {}",
            r.rule, r.source, r.bytes
        );
    }
}

/// The whole exposition: every counter (zeros included, so a series exists
/// before its first event) and the table gauges when known.
pub fn exposition(s: &Snapshot, gauges: Option<Gauges>) -> String {
    let mut out = String::new();
    if let Some(g) = gauges {
        let o = &mut out;
        gauge(
            o,
            "tapnat_conntrack_entries",
            "Live flows in the NAT table.",
            g.entries,
        );
        gauge(
            o,
            "tapnat_conntrack_entries_limit",
            "The flow table's bound (nat.max_flows).",
            g.limit,
        );
        gauge(
            o,
            "tapnat_fragments_tracked",
            "Fragmented datagrams the fragment caches track.",
            g.fragments_tracked,
        );
        gauge(
            o,
            "tapnat_fragments_held",
            "Fragments held until their datagram's first fragment arrives.",
            g.fragments_held,
        );
        gauge(
            o,
            "tapnat_neighbours",
            "Entries of the neighbour (IP to MAC) table.",
            g.neighbours,
        );
        if let Some(left) = g.dhcp_lease_seconds {
            gauge(
                o,
                "tapnat_dhcp_lease_seconds",
                "Seconds left on the uplink's DHCP lease (0: no lease).",
                left,
            );
        }
    }
    family(
        &mut out,
        "tapnat_frames_total",
        "counter",
        "Frames read (rx) and written (tx) per device.",
    );
    for c in Counter::ALL {
        if let Some((side, dir)) = frame_labels(*c) {
            let _ = writeln!(
                out,
                "tapnat_frames_total{{side=\"{side}\",direction=\"{dir}\"}} {}",
                s.get(*c)
            );
        }
    }
    labelled(
        &mut out,
        s,
        "tapnat_packets_total",
        "Packets translated, by direction.",
        "direction",
        packet_direction,
    );
    labelled(
        &mut out,
        s,
        "tapnat_bytes_total",
        "IP bytes of the packets translated, by direction.",
        "direction",
        bytes_direction,
    );
    labelled(
        &mut out,
        s,
        "tapnat_flows_destroyed_total",
        "Flows removed, by reason: timed out, evicted from a full table, flushed, outside address gone.",
        "reason",
        destroy_reason,
    );
    family(
        &mut out,
        "tapnat_drops_total",
        "counter",
        "Frames dropped, by reason.",
    );
    for c in Counter::ALL.iter().filter(|c| c.is_drop()) {
        let reason = c.name().trim_start_matches("drop_");
        let _ = writeln!(
            out,
            "tapnat_drops_total{{reason=\"{reason}\"}} {}",
            s.get(*c)
        );
    }
    for c in Counter::ALL {
        let labelled = frame_labels(*c).is_some()
            || packet_direction(*c).is_some()
            || bytes_direction(*c).is_some()
            || destroy_reason(*c).is_some();
        if c.is_drop() || labelled {
            continue;
        }
        let name = format!("tapnat_{}_total", c.name());
        family(
            &mut out,
            &name,
            "counter",
            &format!("The gateway's {} counter.", c.name()),
        );
        let _ = writeln!(out, "{name} {}", s.get(*c));
    }
    out
}

/// A listening metrics endpoint; it serves until the process exits.
pub struct MetricsServer {
    addr: SocketAddr,
}

impl MetricsServer {
    /// Binds `addr` and serves `GET /metrics` with whatever `render`
    /// returns at the time of each request.
    pub fn serve(
        addr: SocketAddr,
        render: impl Fn() -> String + Send + Sync + 'static,
    ) -> io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let render = Arc::new(render);
        let busy = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("tapnat-metrics".into())
            .spawn(move || {
                crate::sandbox::enter(crate::sandbox::Role::Metrics);
                for conn in listener.incoming().flatten() {
                    if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                        busy.fetch_sub(1, Ordering::AcqRel);
                        continue; // dropping `conn` closes it
                    }
                    let (render, busy) = (render.clone(), busy.clone());
                    let spawned = std::thread::Builder::new()
                        .name("tapnat-scrape".into())
                        .spawn(move || {
                            let _ = answer(conn, &*render);
                            busy.fetch_sub(1, Ordering::AcqRel);
                        });
                    if spawned.is_err() {
                        // The closure (and its decrement) never ran.
                        continue;
                    }
                }
            })?;
        Ok(MetricsServer { addr })
    }

    /// The bound address (the port, when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

fn answer(conn: TcpStream, render: &dyn Fn() -> String) -> io::Result<()> {
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut reader = BufReader::new(&conn).take(8192);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Read the headers up to the empty line, so the client sees a clean close.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request.split_whitespace();
    let (status, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", render()),
        (Some("GET"), Some(_)) => ("404 Not Found", "only /metrics is served\n".to_string()),
        _ => ("405 Method Not Allowed", "only GET is served\n".to_string()),
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::stats::Counters;

    fn snapshot() -> Snapshot {
        let c = Counters::default();
        c.add(Counter::PodRxFrames, 7);
        c.add(Counter::In2outPackets, 5);
        c.add(Counter::DropBadIpChecksum, 2);
        c.add(Counter::FlowsCreated, 3);
        c.add(Counter::Out2inBytes, 1500);
        c.add(Counter::FlowsEvicted, 6);
        c.add(Counter::FlowsFlushed, 1);
        Snapshot::sum([&c])
    }

    /// Every sample line is `name{labels} value` with a declared family,
    /// counters end in `_total`, and no family is declared twice.
    fn check_format(text: &str) {
        let mut families = std::collections::HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(
                    families
                        .insert(name.to_string(), kind.to_string())
                        .is_none(),
                    "{name} twice"
                );
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "{name}");
                }
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
            let name = series.split('{').next().unwrap();
            assert!(families.contains_key(name), "{name} has no # TYPE");
            assert!(
                name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "{name}"
            );
        }
    }

    #[test]
    fn exposition_is_well_formed_and_carries_the_values() {
        let mut text = exposition(
            &snapshot(),
            Some(Gauges {
                entries: 4,
                limit: 262144,
                fragments_tracked: 2,
                fragments_held: 3,
                neighbours: 5,
                dhcp_lease_seconds: Some(57),
            }),
        );
        let c = Counters::default();
        c.rule(1, 84);
        let masq = |src: &str| crate::config::MasqueradeRule {
            source: src.parse().unwrap(),
            exclude: vec![],
        };
        let named = crate::ops::record::rule_records(
            &Snapshot::sum([&c]),
            &[],
            &[masq("10.244.0.0/24"), masq("10.244.1.0/24")],
        );
        rules(&mut text, &named);
        check_format(&text);
        for want in [
            "tapnat_rule_packets_total{rule=\"masquerade[0]\",source=\"10.244.0.0/24\"} 0\n",
            "tapnat_rule_packets_total{rule=\"masquerade[1]\",source=\"10.244.1.0/24\"} 1\n",
            "tapnat_rule_bytes_total{rule=\"masquerade[1]\",source=\"10.244.1.0/24\"} 84\n",
            "tapnat_conntrack_entries 4\n",
            "tapnat_conntrack_entries_limit 262144\n",
            "tapnat_frames_total{side=\"pod\",direction=\"rx\"} 7\n",
            "tapnat_frames_total{side=\"uplink\",direction=\"tx\"} 0\n",
            "tapnat_packets_total{direction=\"in2out\"} 5\n",
            "tapnat_drops_total{reason=\"bad_ip_checksum\"} 2\n",
            "tapnat_drops_total{reason=\"runt\"} 0\n",
            "tapnat_flows_created_total 3\n",
            "tapnat_bytes_total{direction=\"in2out\"} 0\n",
            "tapnat_bytes_total{direction=\"out2in\"} 1500\n",
            "tapnat_flows_destroyed_total{reason=\"timeout\"} 0\n",
            "tapnat_flows_destroyed_total{reason=\"evicted\"} 6\n",
            "tapnat_flows_destroyed_total{reason=\"flush\"} 1\n",
            "tapnat_fragments_tracked 2\n",
            "tapnat_fragments_held 3\n",
            "tapnat_neighbours 5\n",
            "tapnat_dhcp_lease_seconds 57\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        let drops = text
            .lines()
            .filter(|l| l.starts_with("tapnat_drops_total{"))
            .count();
        assert_eq!(drops, Counter::ALL.iter().filter(|c| c.is_drop()).count());
        // The labelled counters are not also exposed one family each.
        for gone in [
            "tapnat_in2out_bytes_total",
            "tapnat_flows_expired_total",
            "tapnat_flows_evicted_total",
            "tapnat_flows_flushed_total",
        ] {
            assert!(!text.contains(gone), "{gone} in\n{text}");
        }
    }

    #[test]
    fn served_over_http() {
        let server = MetricsServer::serve("127.0.0.1:0".parse().unwrap(), || {
            exposition(&snapshot(), None)
        })
        .unwrap();
        let get = |path: &str| {
            let mut c = TcpStream::connect(server.local_addr()).unwrap();
            write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        };
        let ok = get("/metrics");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        let body = ok.split_once("\r\n\r\n").unwrap().1;
        check_format(body);
        assert!(body.contains("tapnat_flows_created_total 3\n"));
        assert!(get("/").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn a_stuck_client_does_not_block_a_scrape() {
        let server =
            MetricsServer::serve("127.0.0.1:0".parse().unwrap(), || "x 1\n".into()).unwrap();
        // Connects and never sends a request.
        let _stuck = TcpStream::connect(server.local_addr()).unwrap();
        let mut c = TcpStream::connect(server.local_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        write!(c, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.ends_with("\r\n\r\nx 1\n"), "{out}");
    }
}
