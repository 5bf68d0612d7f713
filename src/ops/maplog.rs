//! The mapping log (`[log] mappings = "FILE"`): one JSON line per mapping
//! made and released, for accountability with little volume (RFC 6888
//! REQ-12, REQ-14: who had which outside address and port, when). With
//! `log.destinations = true` each session is logged too, with its
//! destination. Written by the events thread, never by a worker; reopened
//! on SIGHUP so that the file can be rotated.
//!
//! Lines (times in Unix seconds, microsecond resolution):
//!
//! ```text
//! {"event":"mapping-new","time":1764640000.123456,"proto":"udp","inside":"10.244.0.2:40000","outside":"203.0.113.10:40000"}
//! {"event":"mapping-end","time":...,"proto":"udp","inside":"...","outside":"..."}
//! {"event":"session-new","time":...,"proto":"udp","inside":"...","outside":"...","destination":"198.51.100.10:53"}
//! {"event":"session-end",...,"destination":"...","reason":"timeout"}
//! ```
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::record::proto_name;
use crate::gateway::taps::Stamped;
use crate::nat::TableEvent;

/// One line of the log.
#[derive(Debug, Serialize)]
struct Line<'a> {
    event: &'a str,
    time: f64,
    proto: &'a str,
    inside: String,
    outside: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// An open mapping log.
pub struct MapLog {
    path: PathBuf,
    destinations: bool,
    out: BufWriter<File>,
    /// A write failed: said once, not per line.
    failed: bool,
}

/// `ADDR:PORT` (for ICMP the echo id stands for the port).
fn endpoint((addr, port): (Ipv4Addr, u16)) -> String {
    format!("{addr}:{port}")
}

impl MapLog {
    /// Opens (creating, mode 0640) `path` for appending.
    pub fn open(path: &Path, destinations: bool) -> io::Result<MapLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)?;
        Ok(MapLog {
            path: path.to_owned(),
            destinations,
            out: BufWriter::new(file),
            failed: false,
        })
    }

    /// The path and `destinations` it was opened with.
    pub fn settings(&self) -> (PathBuf, bool) {
        (self.path.clone(), self.destinations)
    }

    /// The line for an event, if this log records it.
    fn line(&self, s: &Stamped) -> Option<String> {
        let time = s.unix_us as f64 / 1e6;
        let (event, proto, inside, outside, dest, reason) = match &s.event {
            TableEvent::MappingNew {
                proto,
                inside,
                outside,
            } => ("mapping-new", *proto, *inside, *outside, None, None),
            TableEvent::MappingEnd {
                proto,
                inside,
                outside,
            } => ("mapping-end", *proto, *inside, *outside, None, None),
            TableEvent::FlowNew(f) if self.destinations => (
                "session-new",
                f.inside.proto,
                (f.inside.src, f.inside.sport),
                (f.ext_addr, f.ext_port),
                Some((f.inside.dst, f.inside.dport)),
                None,
            ),
            TableEvent::FlowEnd(f, why) if self.destinations => (
                "session-end",
                f.inside.proto,
                (f.inside.src, f.inside.sport),
                (f.ext_addr, f.ext_port),
                Some((f.inside.dst, f.inside.dport)),
                Some(why.name()),
            ),
            TableEvent::FlowNew(_) | TableEvent::FlowEnd(..) => return None,
        };
        let line = Line {
            event,
            time,
            proto: proto_name(proto),
            inside: endpoint(inside),
            outside: endpoint(outside),
            destination: dest.map(endpoint),
            reason,
        };
        serde_json::to_string(&line).ok()
    }

    /// Appends the event's line, if this log records it.
    pub fn write(&mut self, s: &Stamped) {
        let Some(mut line) = self.line(s) else {
            return;
        };
        line.push('\n');
        if let Err(e) = self.out.write_all(line.as_bytes()) {
            self.fail(&e);
        }
    }

    /// Pushes buffered lines to the file.
    pub fn flush(&mut self) {
        if let Err(e) = self.out.flush() {
            self.fail(&e);
        }
    }

    fn fail(&mut self, e: &io::Error) {
        if !std::mem::replace(&mut self.failed, true) {
            tracing::error!(
                "mapping log {}: {e}; lines are being lost",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::{EndReason, Flow, FlowState, InKey, Proto};

    #[test]
    fn mappings_always_sessions_only_with_destinations() {
        let dir = std::env::temp_dir().join(format!("tapnat-maplog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.json"), dir.join("b.json"));
        let flow = Flow {
            inside: InKey {
                proto: Proto::Udp,
                src: Ipv4Addr::new(10, 244, 0, 2),
                sport: 5000,
                dst: Ipv4Addr::new(198, 51, 100, 10),
                dport: 53,
            },
            ext_addr: Ipv4Addr::new(203, 0, 113, 10),
            ext_port: 5000,
            state: FlowState::Udp,
            replied: true,
            last_seen_ms: 0,
            packets_in2out: 1,
            packets_out2in: 1,
            bytes_in2out: 60,
            bytes_out2in: 60,
        };
        let events = [
            TableEvent::MappingNew {
                proto: Proto::Udp,
                inside: (flow.inside.src, 5000),
                outside: (flow.ext_addr, 5000),
            },
            TableEvent::FlowNew(flow),
            TableEvent::FlowEnd(flow, EndReason::Timeout),
            TableEvent::MappingEnd {
                proto: Proto::Udp,
                inside: (flow.inside.src, 5000),
                outside: (flow.ext_addr, 5000),
            },
        ];
        for (path, dest) in [(&a, false), (&b, true)] {
            let mut log = MapLog::open(path, dest).unwrap();
            for (i, e) in events.iter().enumerate() {
                log.write(&Stamped {
                    unix_us: 1_000_000 * (i as u64 + 1),
                    event: *e,
                });
            }
            log.flush();
        }
        let lines = |p: &Path| -> Vec<serde_json::Value> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let plain = lines(&a);
        assert_eq!(plain.len(), 2);
        assert_eq!(plain[0]["event"], "mapping-new");
        assert_eq!(plain[0]["inside"], "10.244.0.2:5000");
        assert_eq!(plain[0]["outside"], "203.0.113.10:5000");
        assert_eq!(plain[0]["proto"], "udp");
        assert_eq!(plain[0]["time"], 1.0);
        assert_eq!(plain[1]["event"], "mapping-end");
        assert!(plain.iter().all(|l| l.get("destination").is_none()));
        let full = lines(&b);
        assert_eq!(full.len(), 4);
        assert_eq!(full[1]["event"], "session-new");
        assert_eq!(full[1]["destination"], "198.51.100.10:53");
        assert_eq!(full[2]["reason"], "timeout");
        // Appends: a reopened log keeps what was there.
        MapLog::open(&a, false).unwrap();
        assert_eq!(lines(&a).len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
