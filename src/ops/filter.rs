//! Which flows a listing (or a flush) applies to: the
//! `conntrack -L` selectors `--proto`, `--src`, `--dst`, `--port`.
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::record::{proto_name, FlowRecord};
use crate::nat::Flow;

/// Flow selectors; an absent one matches everything. All given ones must
/// match (as conntrack combines its options).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFilter {
    /// `tcp`, `udp` or `icmp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// The original source (the pod's address, or the remote client of a
    /// forward), like `conntrack --src`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<Ipv4Addr>,
    /// The original destination, like `conntrack --dst`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<Ipv4Addr>,
    /// Any port of the flow: inside source, destination, or outside port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// Why a selector on the command line is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("`{flag}` needs a value")]
    MissingValue { flag: String },
    #[error("`{flag} {value}`: {problem}")]
    BadValue {
        flag: String,
        value: String,
        problem: &'static str,
    },
}

impl FlowFilter {
    /// Takes `flag` (with its value from `value`) if it is a selector;
    /// returns `Ok(false)` for any other flag.
    pub fn take(&mut self, flag: &str, value: Option<&String>) -> Result<bool, FilterError> {
        if !matches!(
            flag,
            "--proto" | "-p" | "--src" | "-s" | "--dst" | "-d" | "--port"
        ) {
            return Ok(false);
        }
        let value = value.ok_or_else(|| FilterError::MissingValue { flag: flag.into() })?;
        let bad = |problem| FilterError::BadValue {
            flag: flag.into(),
            value: value.clone(),
            problem,
        };
        match flag {
            "--proto" | "-p" => {
                let p = value.to_ascii_lowercase();
                if !matches!(p.as_str(), "tcp" | "udp" | "icmp") {
                    return Err(bad("expected tcp, udp or icmp"));
                }
                self.proto = Some(p);
            }
            "--src" | "-s" => {
                self.src = Some(value.parse().map_err(|_| bad("not an IPv4 address"))?)
            }
            "--dst" | "-d" => {
                self.dst = Some(value.parse().map_err(|_| bad("not an IPv4 address"))?)
            }
            _ => self.port = Some(value.parse().map_err(|_| bad("not a port 0-65535"))?),
        }
        Ok(true)
    }

    /// Whether the flow `f` is selected: [`FlowFilter::matches`] of its
    /// record, without building one (a flush runs this in the workers over
    /// every flow).
    pub fn matches_flow(&self, f: &Flow) -> bool {
        let i = &f.inside;
        self.proto
            .as_deref()
            .is_none_or(|p| p == proto_name(i.proto))
            && self.src.is_none_or(|a| a == i.src)
            && self.dst.is_none_or(|a| a == i.dst)
            && self
                .port
                .is_none_or(|p| p == i.sport || p == i.dport || p == f.ext_port)
    }

    /// Whether `f` is selected.
    pub fn matches(&self, f: &FlowRecord) -> bool {
        self.proto.as_deref().is_none_or(|p| p == f.proto)
            && self.src.is_none_or(|a| a == f.src)
            && self.dst.is_none_or(|a| a == f.dst)
            && self
                .port
                .is_none_or(|p| p == f.sport || p == f.dport || p == f.ext_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        proto: &str,
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        ext_port: u16,
    ) -> FlowRecord {
        FlowRecord {
            proto: proto.into(),
            state: String::new(),
            src: src.into(),
            sport,
            dst: dst.into(),
            dport,
            ext_addr: [203, 0, 113, 10].into(),
            ext_port,
            replied: false,
            packets_in2out: 0,
            packets_out2in: 0,
            bytes_in2out: 0,
            bytes_out2in: 0,
        }
    }

    fn filter(args: &[&str]) -> Result<FlowFilter, FilterError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut f = FlowFilter::default();
        let mut i = 0;
        while i < args.len() {
            assert!(f.take(&args[i], args.get(i + 1))?, "{} not taken", args[i]);
            i += 2;
        }
        Ok(f)
    }

    #[test]
    fn empty_filter_matches_everything() {
        assert!(FlowFilter::default().matches(&rec(
            "udp",
            [10, 244, 0, 2],
            1,
            [8, 8, 8, 8],
            53,
            1
        )));
    }

    #[test]
    fn each_selector_narrows() {
        let r = rec("tcp", [10, 244, 0, 2], 40000, [192, 0, 2, 1], 80, 40001);
        assert!(filter(&["--proto", "TCP"]).unwrap().matches(&r));
        assert!(!filter(&["-p", "udp"]).unwrap().matches(&r));
        assert!(filter(&["--src", "10.244.0.2"]).unwrap().matches(&r));
        assert!(!filter(&["-s", "10.244.0.3"]).unwrap().matches(&r));
        assert!(filter(&["--dst", "192.0.2.1"]).unwrap().matches(&r));
        assert!(!filter(&["-d", "192.0.2.2"]).unwrap().matches(&r));
        for p in ["40000", "80", "40001"] {
            assert!(filter(&["--port", p]).unwrap().matches(&r), "port {p}");
        }
        assert!(!filter(&["--port", "81"]).unwrap().matches(&r));
        assert!(!filter(&["-p", "tcp", "--port", "81"]).unwrap().matches(&r));
    }

    #[test]
    fn bad_selectors_are_named() {
        assert!(matches!(
            filter(&["--proto", "sctp"]),
            Err(FilterError::BadValue { .. })
        ));
        assert!(matches!(
            filter(&["--src", "10.0.0"]),
            Err(FilterError::BadValue { .. })
        ));
        assert!(matches!(
            filter(&["--port", "70000"]),
            Err(FilterError::BadValue { .. })
        ));
        let mut f = FlowFilter::default();
        assert_eq!(
            f.take("--dst", None),
            Err(FilterError::MissingValue {
                flag: "--dst".into()
            })
        );
        assert_eq!(f.take("--count", None), Ok(false));
    }

    #[test]
    fn round_trips_through_json() {
        let f = filter(&["-p", "udp", "--port", "53"]).unwrap();
        let text = serde_json::to_string(&f).unwrap();
        assert_eq!(text, r#"{"proto":"udp","port":53}"#);
        assert_eq!(serde_json::from_str::<FlowFilter>(&text).unwrap(), f);
    }
}
