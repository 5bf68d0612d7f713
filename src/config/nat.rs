//! The `[nat]` section and its `[nat.timeouts]`: ports, flow limits (of
//! the table and of each pod),
//! filtering, the gateway's ICMP error budget, fragments, idle timeouts.
use super::{
    error::{at, Reason},
    reader::Table,
    values, ConfigError, Filtering, NatConfig, Timeouts, MAX_FLOWS_LIMIT, MAX_FRAGMENTS_LIMIT,
};

pub(super) struct Raw {
    ports: String,
    max_flows: i64,
    max_flows_per_pod: i64,
    ports_per_pod: i64,
    filtering: String,
    icmp_errors_per_sec: i64,
    icmp_errors_burst: i64,
    fragments_max: i64,
    timeouts: RawTimeouts,
}

struct RawTimeouts {
    tcp_established: String,
    tcp_transitory: String,
    udp: String,
    icmp: String,
    fragment: String,
}

pub(super) fn read(mut t: Table<'_>) -> Result<Raw, ConfigError> {
    let raw = Raw {
        ports: t.string("ports")?,
        max_flows: t.int("max_flows")?,
        max_flows_per_pod: t.int("max_flows_per_pod")?,
        ports_per_pod: t.int("ports_per_pod")?,
        filtering: t.string("filtering")?,
        icmp_errors_per_sec: t.int("icmp_errors_per_sec")?,
        icmp_errors_burst: t.int("icmp_errors_burst")?,
        fragments_max: t.int("fragments_max")?,
        timeouts: read_timeouts(t.table("timeouts")?)?,
    };
    t.finish()?;
    Ok(raw)
}

fn read_timeouts(mut t: Table<'_>) -> Result<RawTimeouts, ConfigError> {
    let raw = RawTimeouts {
        tcp_established: t.string("tcp_established")?,
        tcp_transitory: t.string("tcp_transitory")?,
        udp: t.string("udp")?,
        icmp: t.string("icmp")?,
        fragment: t.string("fragment")?,
    };
    t.finish()?;
    Ok(raw)
}

/// The words `nat.filtering` takes, in the order of [`Filtering`].
const FILTERINGS: &[&str] = &["endpoint-independent", "address", "address-and-port"];

pub(super) fn check(raw: Raw) -> Result<NatConfig, ConfigError> {
    let ports = values::ports(&raw.ports).map_err(at("nat.ports"))?;
    let max_flows =
        values::bounded(raw.max_flows, 1..=MAX_FLOWS_LIMIT, None).map_err(at("nat.max_flows"))?;
    let max_flows_per_pod = values::bounded(
        raw.max_flows_per_pod,
        0..=MAX_FLOWS_LIMIT,
        Some("no per-pod limit"),
    )
    .map_err(at("nat.max_flows_per_pod"))?;
    let ports_per_pod = values::bounded(raw.ports_per_pod, 0..=65535u32, Some("no per-pod limit"))
        .map_err(at("nat.ports_per_pod"))?;
    let timeouts = check_timeouts(&raw.timeouts)?;
    let filtering = match raw.filtering.as_str() {
        "endpoint-independent" => Filtering::EndpointIndependent,
        "address" => Filtering::Address,
        "address-and-port" => Filtering::AddressAndPort,
        _ => {
            return Err(at("nat.filtering")(Reason::UnknownValue {
                value: raw.filtering,
                expected: FILTERINGS,
            }))
        }
    };
    let icmp_errors_per_sec = values::bounded(raw.icmp_errors_per_sec, 0..=u32::MAX, None)
        .map_err(at("nat.icmp_errors_per_sec"))?;
    let icmp_errors_burst = values::bounded(raw.icmp_errors_burst, 0..=u32::MAX, None)
        .map_err(at("nat.icmp_errors_burst"))?;
    if icmp_errors_per_sec != 0 && icmp_errors_burst == 0 {
        return Err(at("nat.icmp_errors_burst")(Reason::ZeroBurst));
    }
    let fragments_max = values::bounded(
        raw.fragments_max,
        0..=MAX_FRAGMENTS_LIMIT,
        Some("fragments are dropped"),
    )
    .map_err(at("nat.fragments_max"))?;
    Ok(NatConfig {
        ports,
        max_flows,
        max_flows_per_pod,
        ports_per_pod,
        timeouts,
        filtering,
        icmp_errors_per_sec,
        icmp_errors_burst,
        fragments_max,
    })
}

/// Every timeout above zero; below the RFC minimums is only a warning.
fn check_timeouts(t: &RawTimeouts) -> Result<Timeouts, ConfigError> {
    let d = |key: &str, s: &str| values::duration(s).map_err(at(format!("nat.timeouts.{key}")));
    Ok(Timeouts {
        tcp_established: d("tcp_established", &t.tcp_established)?,
        tcp_transitory: d("tcp_transitory", &t.tcp_transitory)?,
        udp: d("udp", &t.udp)?,
        icmp: d("icmp", &t.icmp)?,
        fragment: d("fragment", &t.fragment)?,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::tests::{err, expected_default, reason};
    use crate::config::{Config, DurationProblem, Filtering, Reason};
    use crate::net::{PortRange, PortRangeError};

    #[test]
    fn ports_single_and_range() {
        let c = Config::from_toml_str("[nat]\nports = \"40000\"\n").unwrap();
        assert_eq!(
            c.nat.ports,
            PortRange {
                first: 40000,
                last: 40000
            }
        );
        let c = Config::from_toml_str("[nat]\nports = \"1-65535\"\n").unwrap();
        assert_eq!(
            c.nat.ports,
            PortRange {
                first: 1,
                last: 65535
            }
        );
    }

    #[test]
    fn new_nat_keys_from_file() {
        let c = Config::from_toml_str(
            "[nat]\nfiltering = \"endpoint-independent\"\nicmp_errors_per_sec = 0\nicmp_errors_burst = 0\nfragments_max = 0\n[nat.timeouts]\nfragment = \"15s\"\n",
        )
        .unwrap();
        let mut want = expected_default();
        want.nat.filtering = Filtering::EndpointIndependent;
        want.nat.icmp_errors_per_sec = 0;
        want.nat.icmp_errors_burst = 0;
        want.nat.fragments_max = 0;
        want.nat.timeouts.fragment = Duration::from_secs(15);
        assert_eq!(c, want);
        assert!(c.warnings().is_empty());
        let c = Config::from_toml_str(
            "[nat]\nfiltering = \"address-and-port\"\nicmp_errors_per_sec = 4294967295\n",
        )
        .unwrap();
        assert_eq!(c.nat.filtering, Filtering::AddressAndPort);
        assert_eq!(c.nat.icmp_errors_per_sec, u32::MAX);
    }

    #[test]
    fn rejects_bad_durations() {
        use DurationProblem::*;
        for (bad, problem) in [
            ("", Some(Empty)),
            ("5", Some(MissingUnit)),
            ("-1s", Some(NoNumber)),
            ("5x", Some(UnknownUnit)),
            ("5s2m", Some(UnitOrder)),
            ("1m1m", Some(UnitOrder)),
            ("s", Some(NoNumber)),
            ("1.5s", Some(UnknownUnit)),
            (" 5s", Some(NoNumber)),
            ("0s", None),
            ("0h0m", None),
        ] {
            let e = err(&format!("[nat.timeouts]\nicmp = \"{bad}\"\n"));
            let want = match problem {
                Some(problem) => Reason::BadDuration {
                    input: bad.to_string(),
                    problem,
                },
                None => Reason::ZeroDuration {
                    input: bad.to_string(),
                },
            };
            assert_eq!(reason(&e, "nat.timeouts.icmp"), &want, "{bad:?}");
        }
        assert_eq!(
            err("[nat.timeouts]\nicmp = \"5x\"\n").to_string(),
            "config key `nat.timeouts.icmp`: invalid duration \"5x\": unknown unit; use us, ms, s, m or h \
             (write e.g. \"300s\", \"5m\", \"2h4m\", \"1500ms\")"
        );
        assert_eq!(
            err("[nat.timeouts]\nicmp = \"0s\"\n").to_string(),
            "config key `nat.timeouts.icmp`: duration \"0s\" must be above zero"
        );
    }

    #[test]
    fn rejects_bad_fragment_timeout() {
        for bad in ["0s", "2", ""] {
            let e = err(&format!("[nat.timeouts]\nfragment = \"{bad}\"\n"));
            assert!(matches!(
                reason(&e, "nat.timeouts.fragment"),
                Reason::BadDuration { .. } | Reason::ZeroDuration { .. }
            ));
        }
    }

    #[test]
    fn rejects_bad_port_ranges() {
        for bad in [
            "0",
            "0-100",
            "2000-1000",
            "1024-65536",
            "70000",
            "",
            "a-b",
            "1-2-3",
        ] {
            let e = err(&format!("[nat]\nports = \"{bad}\"\n"));
            assert!(
                matches!(reason(&e, "nat.ports"), Reason::BadPorts(_)),
                "{bad}"
            );
        }
        let e = err("[nat]\nports = \"2000-1000\"\n");
        assert!(matches!(
            reason(&e, "nat.ports"),
            Reason::BadPorts(PortRangeError::Reversed { .. })
        ));
        assert_eq!(
            e.to_string(),
            "config key `nat.ports`: \"2000-1000\": first port 2000 is above last port 1000"
        );
    }

    #[test]
    fn rejects_bad_max_flows() {
        for (bad, value) in [("0", 0), ("100000001", 100_000_001), ("-5", -5)] {
            let e = err(&format!("[nat]\nmax_flows = {bad}\n"));
            assert_eq!(
                reason(&e, "nat.max_flows"),
                &Reason::OutOfRange {
                    value,
                    min: 1,
                    max: 100_000_000,
                    zero_means: None
                }
            );
        }
    }

    #[test]
    fn per_pod_limits_from_file_and_their_bounds() {
        let c =
            Config::from_toml_str("[nat]\nmax_flows_per_pod = 0\nports_per_pod = 65535\n").unwrap();
        assert_eq!((c.nat.max_flows_per_pod, c.nat.ports_per_pod), (0, 65535));
        for (key, bad, value, max) in [
            ("max_flows_per_pod", "-1", -1, 100_000_000),
            ("max_flows_per_pod", "100000001", 100_000_001, 100_000_000),
            ("ports_per_pod", "-1", -1, 65535),
            ("ports_per_pod", "65536", 65536, 65535),
        ] {
            let e = err(&format!("[nat]\n{key} = {bad}\n"));
            assert_eq!(
                reason(&e, &format!("nat.{key}")),
                &Reason::OutOfRange {
                    value,
                    min: 0,
                    max,
                    zero_means: Some("no per-pod limit")
                }
            );
        }
        assert_eq!(
            err("[nat]\nports_per_pod = 70000\n").to_string(),
            "config key `nat.ports_per_pod`: 70000 is out of range; must be 0 (no per-pod limit) to 65535"
        );
        let e = err("[nat]\nmax_flows_per_pod = \"many\"\n");
        assert!(e.to_string().contains("nat.max_flows_per_pod"), "{e}");
    }

    #[test]
    fn rejects_bad_filtering() {
        for bad in ["", "endpoint_independent", "Address", "port"] {
            let e = err(&format!("[nat]\nfiltering = \"{bad}\"\n"));
            assert!(matches!(
                reason(&e, "nat.filtering"),
                Reason::UnknownValue { value, .. } if value == bad
            ));
        }
        assert_eq!(
            err("[nat]\nfiltering = \"port\"\n").to_string(),
            "config key `nat.filtering`: unknown value \"port\"; expected \"endpoint-independent\", \
             \"address\" or \"address-and-port\""
        );
        let e = Config::load_with_env(None, &[("TAPNAT_NAT__FILTERING", "none")]).unwrap_err();
        assert!(matches!(
            reason(&e, "nat.filtering"),
            Reason::UnknownValue { value, .. } if value == "none"
        ));
    }

    #[test]
    fn rejects_bad_icmp_error_limits() {
        for key in ["icmp_errors_per_sec", "icmp_errors_burst"] {
            for (bad, value) in [("-1", -1), ("4294967296", 4_294_967_296)] {
                let e = err(&format!("[nat]\n{key} = {bad}\n"));
                assert_eq!(
                    reason(&e, &format!("nat.{key}")),
                    &Reason::OutOfRange {
                        value,
                        min: 0,
                        max: 4_294_967_295,
                        zero_means: None
                    }
                );
            }
        }
        let e = err("[nat]\nicmp_errors_burst = 0\n");
        assert_eq!(reason(&e, "nat.icmp_errors_burst"), &Reason::ZeroBurst);
        assert_eq!(
            e.to_string(),
            "config key `nat.icmp_errors_burst`: 0 would let no ICMP error through while \
             nat.icmp_errors_per_sec limits the rate; use at least 1, or nat.icmp_errors_per_sec = 0 \
             for no limit"
        );
    }

    #[test]
    fn rejects_bad_fragments_max() {
        for (bad, value) in [("-1", -1), ("1000001", 1_000_001)] {
            let e = err(&format!("[nat]\nfragments_max = {bad}\n"));
            assert!(matches!(
                reason(&e, "nat.fragments_max"),
                Reason::OutOfRange { value: v, max: 1_000_000, .. } if *v == value
            ));
        }
        assert_eq!(
            err("[nat]\nfragments_max = -1\n").to_string(),
            "config key `nat.fragments_max`: -1 is out of range; must be 0 (fragments are dropped) to 1000000"
        );
    }
}
