//! The `[[forward]]` list: port forwards (DNAT) from the uplink address to
//! pods, checked against the pod subnet, `nat.ports` and each other.
use std::net::Ipv4Addr;

use super::{
    error::{at, AddressForm, Overlap, Reason, Side},
    reader::Table,
    values::{self, net_of},
    ConfigError, Forward, ForwardProtocol, PodConfig,
};
use crate::net::PortRange;

/// Every key is required.
pub(super) struct Raw {
    protocol: String,
    port: String,
    to: String,
}

pub(super) fn read(mut t: Table<'_>) -> Result<Raw, ConfigError> {
    let raw = Raw {
        protocol: t.string("protocol")?,
        port: t.ports("port")?,
        to: t.string("to")?,
    };
    t.finish()?;
    Ok(raw)
}

pub(super) fn check(raw: Vec<Raw>, pod: &PodConfig) -> Result<Vec<Forward>, ConfigError> {
    let mut out: Vec<Forward> = Vec::with_capacity(raw.len());
    for (i, f) in raw.into_iter().enumerate() {
        let fwd = check_one(&format!("forward[{i}]"), f, &out, pod)?;
        out.push(fwd);
    }
    Ok(out)
}

/// One forward added at run time (`tapnat forward add PROTO PORT TO`),
/// checked by the rules of a `[[forward]]` entry against the running set
/// `existing`; errors name the keys `forward.protocol`, `forward.port` and
/// `forward.to`.
pub fn parse_forward(
    protocol: &str,
    port: &str,
    to: &str,
    existing: &[Forward],
    pod: &PodConfig,
) -> Result<Forward, ConfigError> {
    let raw = Raw {
        protocol: protocol.into(),
        port: port.into(),
        to: to.into(),
    };
    check_one("forward", raw, existing, pod)
}

/// The protocol and port (or range) of a forward, as `tapnat forward del
/// PROTO PORT` names it.
pub fn parse_forward_key(
    protocol: &str,
    port: &str,
) -> Result<(ForwardProtocol, PortRange), ConfigError> {
    let p = protocol_of(protocol).map_err(at("forward.protocol"))?;
    let ports = values::ports(port).map_err(at("forward.port"))?;
    Ok((p, ports))
}

fn protocol_of(s: &str) -> Result<ForwardProtocol, Reason> {
    match s {
        "tcp" => Ok(ForwardProtocol::Tcp),
        "udp" => Ok(ForwardProtocol::Udp),
        _ => Err(Reason::UnknownValue {
            value: s.into(),
            expected: &["tcp", "udp"],
        }),
    }
}

/// Entry `name` (`forward[i]`) checked against the ones before it.
fn check_one(name: &str, f: Raw, out: &[Forward], pod: &PodConfig) -> Result<Forward, ConfigError> {
    let protocol = protocol_of(&f.protocol).map_err(at(format!("{name}.protocol")))?;
    let port_key = format!("{name}.port");
    let ports = values::ports(&f.port).map_err(at(&port_key))?;
    // A forward may lie inside nat.ports: the table reserves its ports,
    // so the dynamic pool never hands them to a masqueraded flow (as
    // iptables' DNAT beside MASQUERADE needs no port planning).
    let clash = out
        .iter()
        .enumerate()
        .find(|(_, o)| o.protocol == protocol && o.ports.overlaps(&ports))
        .map(|(j, o)| (Overlap::Forward(j), o.ports));
    if let Some((with, other)) = clash {
        return Err(at(port_key)(Reason::Overlaps {
            value: ports.to_string(),
            with,
            other: other.to_string(),
        }));
    }
    let (to_addr, to_port) = target(&f.to, ports, pod).map_err(at(format!("{name}.to")))?;
    let span = |first: u16, ports: PortRange| {
        let first = u32::from(first);
        (first, first + u32::from(ports.last - ports.first))
    };
    let (t0, t1) = span(to_port, ports);
    let shared = out.iter().enumerate().find(|(_, o)| {
        let (o0, o1) = span(o.to_port, o.ports);
        o.protocol == protocol && o.to_addr == to_addr && t0 <= o1 && o0 <= t1
    });
    if let Some((j, o)) = shared {
        return Err(at(format!("{name}.to"))(Reason::TargetInUse {
            addr: to_addr,
            port: t0.max(u32::from(o.to_port)) as u16,
            other: j,
            ports: o.ports,
        }));
    }
    Ok(Forward {
        protocol,
        ports,
        to_addr,
        to_port,
    })
}

/// `forward[i].to`: `"ADDRESS:PORT"` (the target of `ports.first`), or
/// `"ADDRESS"` to keep the same ports; ADDRESS a host of the pod subnet
/// other than the gateway's, and the target ports ending by 65535.
fn target(s: &str, ports: PortRange, pod: &PodConfig) -> Result<(Ipv4Addr, u16), Reason> {
    let (addr, port) = match s.split_once(':') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let to_addr = values::ipv4(s, addr, AddressForm::Target)?;
    let to_port = match port {
        None => ports.first,
        Some(p) => {
            let r = values::ports(p)?;
            if r.first != r.last {
                return Err(Reason::TargetRange {
                    input: s.to_string(),
                    first: ports.first,
                });
            }
            r.first
        }
    };
    let subnet = net_of(&pod.address);
    if !subnet.contains(to_addr) {
        return Err(Reason::OutsideSubnet {
            value: to_addr.to_string(),
            side: Side::Pod,
            subnet,
        });
    }
    if to_addr == pod.address.addr {
        return Err(Reason::OwnAddress {
            addr: to_addr,
            side: Side::Pod,
        });
    }
    values::host_of(to_addr, &subnet)?;
    let to_last = u32::from(to_port) + u32::from(ports.last - ports.first);
    if to_last > u32::from(u16::MAX) {
        return Err(Reason::TargetPastEnd {
            ports,
            to_port,
            to_last,
        });
    }
    Ok((to_addr, to_port))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use crate::config::tests::{err, net, reason};
    use crate::config::{
        AddressForm, Config, ConfigError, Forward, ForwardProtocol, Kind, Overlap, Reason, Side,
    };
    use crate::net::{PortRange, PortRangeError};

    /// The error for a config with one `[[forward]]`.
    fn fwd_err(protocol: &str, port: &str, to: &str) -> ConfigError {
        err(&format!(
            "[[forward]]\nprotocol = \"{protocol}\"\nport = {port}\nto = \"{to}\"\n"
        ))
    }

    #[test]
    fn forwards_parse() {
        let c = Config::from_toml_str(
            "[[forward]]\nprotocol = \"tcp\"\nport = 8080\nto = \"10.244.0.2:80\"\n\
             [[forward]]\nprotocol = \"udp\"\nport = \"8000-8099\"\nto = \"10.244.3.4\"\n\
             [[forward]]\nprotocol = \"tcp\"\nport = \"8000-8079\"\nto = \"10.244.0.3:65456\"\n\
             [[forward]]\nprotocol = \"udp\"\nport = \"9999\"\nto = \"10.244.0.3:53\"\n",
        )
        .unwrap();
        let range = |first, last| PortRange { first, last };
        let fwd = |protocol, ports, to_addr, to_port| Forward {
            protocol,
            ports,
            to_addr,
            to_port,
        };
        assert_eq!(
            c.forward,
            vec![
                fwd(
                    ForwardProtocol::Tcp,
                    range(8080, 8080),
                    Ipv4Addr::new(10, 244, 0, 2),
                    80
                ),
                fwd(
                    ForwardProtocol::Udp,
                    range(8000, 8099),
                    Ipv4Addr::new(10, 244, 3, 4),
                    8000
                ),
                fwd(
                    ForwardProtocol::Tcp,
                    range(8000, 8079),
                    Ipv4Addr::new(10, 244, 0, 3),
                    65456
                ),
                fwd(
                    ForwardProtocol::Udp,
                    range(9999, 9999),
                    Ipv4Addr::new(10, 244, 0, 3),
                    53
                ),
            ]
        );
        assert!(c.warnings().is_empty());
    }

    #[test]
    fn a_run_time_forward_is_checked_like_an_entry() {
        let c = Config::from_toml_str(
            "[[forward]]\nprotocol = \"tcp\"\nport = \"8000-8099\"\nto = \"10.244.0.2\"\n",
        )
        .unwrap();
        let f = crate::config::parse_forward("udp", "8080", "10.244.0.2:80", &c.forward, &c.pod)
            .unwrap();
        assert_eq!(
            (f.protocol, f.ports, f.to_addr, f.to_port),
            (
                ForwardProtocol::Udp,
                PortRange {
                    first: 8080,
                    last: 8080
                },
                Ipv4Addr::new(10, 244, 0, 2),
                80
            )
        );
        let e = crate::config::parse_forward("tcp", "8080", "10.244.0.3", &c.forward, &c.pod)
            .unwrap_err();
        assert!(matches!(
            reason(&e, "forward.port"),
            Reason::Overlaps { .. }
        ));
        let e = crate::config::parse_forward("tcp", "9000", "192.0.2.1", &c.forward, &c.pod)
            .unwrap_err();
        assert!(matches!(
            reason(&e, "forward.to"),
            Reason::OutsideSubnet { .. }
        ));
        // 8000-8099 already targets 10.244.0.2:8000-8099.
        let e = crate::config::parse_forward("tcp", "7000", "10.244.0.2:8050", &c.forward, &c.pod)
            .unwrap_err();
        assert!(matches!(
            reason(&e, "forward.to"),
            Reason::TargetInUse {
                port: 8050,
                other: 0,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "config key `forward.to`: 10.244.0.2:8050 is already the target of forward[0] \
             (8000-8099); a pod endpoint is the target of one forward"
        );
        crate::config::parse_forward("udp", "7000", "10.244.0.2:8050", &c.forward, &c.pod).unwrap();
        crate::config::parse_forward("tcp", "7000", "10.244.0.2:8100", &c.forward, &c.pod).unwrap();
        let e =
            crate::config::parse_forward("sctp", "9000", "10.244.0.2", &[], &c.pod).unwrap_err();
        assert!(matches!(
            reason(&e, "forward.protocol"),
            Reason::UnknownValue { .. }
        ));
        assert_eq!(
            crate::config::parse_forward_key("tcp", "8000-8099").unwrap(),
            (
                ForwardProtocol::Tcp,
                PortRange {
                    first: 8000,
                    last: 8099
                }
            )
        );
        let e = crate::config::parse_forward_key("tcp", "0").unwrap_err();
        assert!(matches!(reason(&e, "forward.port"), Reason::BadPorts(_)));
    }

    #[test]
    fn rejects_two_forwards_to_one_target() {
        let e = err(
            "[[forward]]\nprotocol = \"tcp\"\nport = 8080\nto = \"10.244.0.2:80\"\n\
             [[forward]]\nprotocol = \"tcp\"\nport = 8081\nto = \"10.244.0.2:80\"\n",
        );
        assert!(matches!(
            reason(&e, "forward[1].to"),
            Reason::TargetInUse {
                port: 80,
                other: 0,
                ..
            }
        ));
    }

    #[test]
    fn rejects_bad_forward_protocol() {
        for bad in ["icmp", "TCP"] {
            let e = fwd_err(bad, "80", "10.244.0.2");
            assert!(matches!(
                reason(&e, "forward[0].protocol"),
                Reason::UnknownValue { value, expected: ["tcp", "udp"] } if value == bad
            ));
        }
        assert_eq!(
            fwd_err("icmp", "80", "10.244.0.2").to_string(),
            "config key `forward[0].protocol`: unknown value \"icmp\"; expected \"tcp\" or \"udp\""
        );
    }

    #[test]
    fn rejects_bad_forward_port() {
        for bad in ["0", "70000", "-5", "\"9000-8000\"", "\"a\"", "\"\""] {
            let e = fwd_err("tcp", bad, "10.244.0.2");
            assert!(
                matches!(reason(&e, "forward[0].port"), Reason::BadPorts(_)),
                "{bad}"
            );
        }
        let e = fwd_err("tcp", "0", "10.244.0.2");
        assert!(matches!(
            reason(&e, "forward[0].port"),
            Reason::BadPorts(PortRangeError::Zero { .. })
        ));
        let e = fwd_err("tcp", "80.5", "10.244.0.2");
        assert!(matches!(
            reason(&e, "forward[0].port"),
            Reason::WrongType {
                expected: Kind::Ports,
                ..
            }
        ));
    }

    #[test]
    fn rejects_bad_forward_target() {
        for (bad, address) in [
            ("nope", true),
            (":80", true),
            ("10.244.0.2:", false),
            ("10.244.0.2:0", false),
            ("10.244.0.2:x", false),
        ] {
            let e = fwd_err("tcp", "80", bad);
            let r = reason(&e, "forward[0].to");
            if address {
                assert!(
                    matches!(
                        r,
                        Reason::BadAddress {
                            form: AddressForm::Target,
                            ..
                        }
                    ),
                    "{bad}: {r:?}"
                );
            } else {
                assert!(matches!(r, Reason::BadPorts(_)), "{bad}: {r:?}");
            }
        }
        let e = fwd_err("tcp", "80", "10.244.0.2:80-90");
        assert!(matches!(
            reason(&e, "forward[0].to"),
            Reason::TargetRange { first: 80, .. }
        ));
        assert_eq!(
            e.to_string(),
            "config key `forward[0].to`: \"10.244.0.2:80-90\": give one target port, the one forward port 80 maps to"
        );
    }

    #[test]
    fn rejects_forward_target_outside_pod_subnet() {
        for bad in ["10.245.0.2:80", "203.0.113.10:80"] {
            let e = fwd_err("tcp", "80", bad);
            assert!(matches!(
                reason(&e, "forward[0].to"),
                Reason::OutsideSubnet { side: Side::Pod, subnet, .. } if *subnet == net("10.244.0.0/16")
            ));
        }
        assert_eq!(
            fwd_err("tcp", "80", "10.245.0.2:80").to_string(),
            "config key `forward[0].to`: 10.245.0.2 is outside the pod subnet 10.244.0.0/16"
        );
    }

    #[test]
    fn rejects_forward_to_gateway_pod_address() {
        let e = fwd_err("udp", "53", "10.244.0.1:53");
        assert!(matches!(
            reason(&e, "forward[0].to"),
            Reason::OwnAddress {
                side: Side::Pod,
                ..
            }
        ));
        for bad in ["10.244.255.255", "10.244.0.0"] {
            let e = fwd_err("udp", "53", bad);
            assert!(matches!(
                reason(&e, "forward[0].to"),
                Reason::NotHost { .. }
            ));
        }
        assert_eq!(
            fwd_err("udp", "53", "10.244.255.255").to_string(),
            "config key `forward[0].to`: 10.244.255.255 is the broadcast address of 10.244.0.0/16, not a host address"
        );
    }

    #[test]
    fn rejects_forward_target_range_past_65535() {
        let e = fwd_err("tcp", "\"8000-8099\"", "10.244.0.2:65500");
        assert!(matches!(
            reason(&e, "forward[0].to"),
            Reason::TargetPastEnd {
                to_port: 65500,
                to_last: 65599,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "config key `forward[0].to`: 8000-8099 (100 ports) from target port 65500 would run to port 65599, past 65535"
        );
        // Keeping the same ports always fits.
        assert!(Config::from_toml_str(
            "[nat]\nports = \"1024-2047\"\n[[forward]]\nprotocol = \"tcp\"\nport = \"60000-65535\"\nto = \"10.244.0.2\"\n"
        )
        .is_ok());
    }

    #[test]
    fn rejects_overlapping_forwards_of_one_protocol() {
        let two = |p1: &str, p2: &str, proto2: &str| {
            Config::from_toml_str(&format!(
                "[[forward]]\nprotocol = \"tcp\"\nport = {p1}\nto = \"10.244.0.2\"\n\
                 [[forward]]\nprotocol = \"{proto2}\"\nport = {p2}\nto = \"10.244.0.3\"\n"
            ))
        };
        for (p1, p2) in [("\"8000-8099\"", "8099"), ("443", "443")] {
            let e = two(p1, p2, "tcp").unwrap_err();
            assert!(matches!(
                reason(&e, "forward[1].port"),
                Reason::Overlaps {
                    with: Overlap::Forward(0),
                    ..
                }
            ));
        }
        assert_eq!(
            two("\"8000-8099\"", "8099", "tcp").unwrap_err().to_string(),
            "config key `forward[1].port`: 8099 overlaps forward[0].port 8000-8099 of the same protocol"
        );
        // Different protocols may share a port; adjacent ranges are fine.
        assert!(two("443", "443", "udp").is_ok());
        assert!(two("\"8000-8099\"", "\"8100-8199\"", "tcp").is_ok());
    }

    #[test]
    fn forwards_inside_nat_ports_are_accepted() {
        // The iptables habit: DNAT on 8080 beside MASQUERADE, default pool.
        let c = Config::from_toml_str(
            "[[forward]]\nprotocol = \"tcp\"\nport = 8080\nto = \"10.244.0.2:80\"\n",
        )
        .unwrap();
        assert_eq!(
            c.nat.ports,
            PortRange {
                first: 1024,
                last: 65535
            }
        );
        assert_eq!(
            c.forward[0].ports,
            PortRange {
                first: 8080,
                last: 8080
            }
        );
        let c = Config::from_toml_str(
            "[[forward]]\nprotocol = \"udp\"\nport = \"9990-10010\"\nto = \"10.244.0.2\"\n",
        )
        .unwrap();
        assert_eq!(
            c.forward[0].ports,
            PortRange {
                first: 9990,
                last: 10010
            }
        );
    }
}
