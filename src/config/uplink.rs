//! The `[uplink]` section: the outside TAP, the gateway's uplink address and
//! its next hop, checked against the pod side.
use super::{
    error::{at, AddressForm, Overlap, Reason, Side},
    reader::Table,
    values::{self, net_of},
    ConfigError, PodConfig, UplinkAddress, UplinkConfig, UplinkKind, MAX_MTU, MIN_MTU,
};

pub(super) struct Raw {
    kind: String,
    tap: String,
    interface: Option<String>,
    address: String,
    gateway: String,
    netns: Option<String>,
    mtu: i64,
}

pub(super) fn read(mut t: Table<'_>) -> Result<Raw, ConfigError> {
    let raw = Raw {
        kind: t.string("kind")?,
        tap: t.string("tap")?,
        interface: t.opt_string("interface")?,
        address: t.string("address")?,
        gateway: t.string("gateway")?,
        netns: t.opt_string("netns")?,
        mtu: t.int("mtu")?,
    };
    t.finish()?;
    Ok(raw)
}

pub(super) fn check(raw: Raw, pod: &PodConfig) -> Result<UplinkConfig, ConfigError> {
    let kind = match raw.kind.as_str() {
        "tap" => UplinkKind::Tap,
        "raw" => UplinkKind::Raw,
        _ => {
            return Err(at("uplink.kind")(Reason::UnknownValue {
                value: raw.kind,
                expected: &["tap", "raw"],
            }))
        }
    };
    // An empty string clears a file's `interface` (from the environment).
    let interface = raw.interface.filter(|s| !s.is_empty());
    let interface = match (kind, interface) {
        (UplinkKind::Raw, None) => return Err(at("uplink.interface")(Reason::RawNeedsInterface)),
        (UplinkKind::Raw, Some(name)) => {
            Some(values::tap_name(name).map_err(at("uplink.interface"))?)
        }
        (UplinkKind::Tap, Some(name)) => {
            return Err(at("uplink.interface")(Reason::InterfaceWithTap { name }))
        }
        (UplinkKind::Tap, None) => None,
    };
    let address = address(&raw.address, pod)?;
    let gateway = match address {
        UplinkAddress::Static(net) => next_hop(&raw.gateway, &net),
        // Only a fallback for a lease without a router: checked against
        // the leased subnet when there is one.
        UplinkAddress::Dhcp => values::ipv4(&raw.gateway, &raw.gateway, AddressForm::Address),
    }
    .map_err(at("uplink.gateway"))?;
    let uplink = UplinkConfig {
        kind,
        tap: values::tap_name(raw.tap).map_err(at("uplink.tap"))?,
        interface,
        address,
        gateway,
        dhcp_max_lease: None,
        netns: values::netns(raw.netns).map_err(at("uplink.netns"))?,
        mtu: values::bounded(raw.mtu, MIN_MTU..=MAX_MTU, None).map_err(at("uplink.mtu"))?,
    };
    if uplink.kind == UplinkKind::Tap && pod.tap == uplink.tap && pod.netns == uplink.netns {
        return Err(at("uplink.tap")(Reason::SameTap { name: uplink.tap }));
    }
    Ok(uplink)
}

/// `uplink.address`: `"dhcp"`, or a host address with its prefix that
/// does not overlap the pod subnet.
fn address(s: &str, pod: &PodConfig) -> Result<UplinkAddress, ConfigError> {
    if s == "dhcp" {
        return Ok(UplinkAddress::Dhcp);
    }
    let address = values::host_address(s).map_err(at("uplink.address"))?;
    if pod.address.overlaps(&address) {
        return Err(at("uplink.address")(Reason::Overlaps {
            value: net_of(&address).to_string(),
            with: Overlap::PodSubnet,
            other: net_of(&pod.address).to_string(),
        }));
    }
    Ok(UplinkAddress::Static(address))
}

/// `uplink.gateway`: a host of the uplink subnet other than the gateway's
/// own address.
fn next_hop(s: &str, address: &crate::net::Ipv4Net) -> Result<std::net::Ipv4Addr, Reason> {
    let gateway = values::ipv4(s, s, AddressForm::Address)?;
    if !address.contains(gateway) {
        return Err(Reason::OutsideSubnet {
            value: gateway.to_string(),
            side: Side::Uplink,
            subnet: net_of(address),
        });
    }
    if gateway == address.addr {
        return Err(Reason::OwnAddress {
            addr: gateway,
            side: Side::Uplink,
        });
    }
    values::host_of(gateway, address)?;
    Ok(gateway)
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{assert_mentions, err, net, reason};
    use crate::config::{Config, Overlap, Reason, Side};

    #[test]
    fn rejects_cidr_garbage() {
        let e = err("[uplink]\naddress = \"garbage\"\n");
        assert!(matches!(reason(&e, "uplink.address"), Reason::BadCidr(_)));
        assert_mentions(&e.to_string(), &["invalid CIDR", "garbage"]);
    }

    #[test]
    fn rejects_gateway_outside_subnet() {
        let e = err("[uplink]\ngateway = \"198.51.100.1\"\n");
        assert_eq!(
            reason(&e, "uplink.gateway"),
            &Reason::OutsideSubnet {
                value: "198.51.100.1".into(),
                side: Side::Uplink,
                subnet: net("203.0.113.0/24"),
            }
        );
        assert_eq!(
            e.to_string(),
            "config key `uplink.gateway`: 198.51.100.1 is outside the uplink subnet 203.0.113.0/24"
        );
    }

    #[test]
    fn rejects_gateway_equal_to_address() {
        let e = err("[uplink]\ngateway = \"203.0.113.10\"\n");
        assert!(matches!(
            reason(&e, "uplink.gateway"),
            Reason::OwnAddress {
                side: Side::Uplink,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "config key `uplink.gateway`: 203.0.113.10 is the gateway's own uplink.address"
        );
        let e = err("[uplink]\ngateway = \"203.0.113.255\"\n");
        assert!(matches!(
            reason(&e, "uplink.gateway"),
            Reason::NotHost { .. }
        ));
        assert_mentions(&e.to_string(), &["broadcast"]);
        let e = err("[uplink]\ngateway = \"nope\"\n");
        assert!(matches!(
            reason(&e, "uplink.gateway"),
            Reason::BadAddress { .. }
        ));
        assert_mentions(&e.to_string(), &["not an IPv4 address"]);
    }

    #[test]
    fn rejects_overlapping_subnets() {
        let e = err("[uplink]\naddress = \"10.244.7.1/24\"\ngateway = \"10.244.7.254\"\n");
        assert!(matches!(
            reason(&e, "uplink.address"),
            Reason::Overlaps {
                with: Overlap::PodSubnet,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "config key `uplink.address`: 10.244.7.0/24 overlaps pod.address 10.244.0.0/16; the two subnets must not share an address"
        );
        // /31 has no network or broadcast address (RFC 3021).
        let c = Config::from_toml_str(
            "[uplink]\naddress = \"203.0.113.0/31\"\ngateway = \"203.0.113.1\"\n",
        )
        .unwrap();
        assert_eq!(
            c.uplink.address,
            crate::config::UplinkAddress::Static(net("203.0.113.0/31"))
        );
    }

    #[test]
    fn raw_kind_needs_an_interface_and_tap_kind_takes_none() {
        let e = err("[uplink]\nkind = \"raw\"\n");
        assert_eq!(reason(&e, "uplink.interface"), &Reason::RawNeedsInterface);
        assert_mentions(&e.to_string(), &["uplink.interface", "eth1"]);
        let e = err("[uplink]\nkind = \"raw\"\ninterface = \"a/b\"\n");
        assert!(matches!(
            reason(&e, "uplink.interface"),
            Reason::BadTapName { .. }
        ));
        let e = err("[uplink]\ninterface = \"eth1\"\n");
        assert_eq!(
            reason(&e, "uplink.interface"),
            &Reason::InterfaceWithTap {
                name: "eth1".into()
            }
        );
        let c = Config::from_toml_str(
            "[uplink]\nkind = \"raw\"\ninterface = \"eth1\"\nnetns = \"/run/netns/up\"\n",
        )
        .unwrap();
        assert_eq!(c.uplink.kind, crate::config::UplinkKind::Raw);
        assert_eq!(c.uplink.interface.as_deref(), Some("eth1"));
        // The pod TAP may share a name with an unused uplink.tap.
        Config::from_toml_str(
            "[pod]\ntap = \"t\"\n[uplink]\ntap = \"t\"\nkind = \"raw\"\ninterface = \"eth1\"\n",
        )
        .unwrap();
        let e = err("[uplink]\nkind = \"tun\"\n");
        assert!(
            matches!(reason(&e, "uplink.kind"), Reason::UnknownValue { value, .. } if value == "tun")
        );
        assert_eq!(
            e.to_string(),
            "config key `uplink.kind`: unknown value \"tun\"; expected \"tap\" or \"raw\""
        );
    }

    #[test]
    fn rejects_bad_mtu() {
        for (bad, value) in [("575", 575), ("9001", 9001), ("-1", -1), ("70000", 70000)] {
            let e = err(&format!("[uplink]\nmtu = {bad}\n"));
            assert_eq!(
                reason(&e, "uplink.mtu"),
                &Reason::OutOfRange {
                    value,
                    min: 576,
                    max: 9000,
                    zero_means: None
                }
            );
        }
        assert_eq!(
            err("[uplink]\nmtu = 575\n").to_string(),
            "config key `uplink.mtu`: 575 is out of range; must be 576 to 9000"
        );
    }

    #[test]
    fn rejects_relative_netns() {
        let e = err("[uplink]\nnetns = \"ext\"\n");
        assert!(matches!(
            reason(&e, "uplink.netns"),
            Reason::RelativeNetns { .. }
        ));
        assert_eq!(
            e.to_string(),
            "config key `uplink.netns`: \"ext\" is not an absolute path; write /run/netns/NAME or /proc/PID/ns/net"
        );
    }

    #[test]
    fn rejects_same_tap_in_same_netns() {
        let e = err("[pod]\ntap = \"t\"\n[uplink]\ntap = \"t\"\n");
        assert_eq!(
            reason(&e, "uplink.tap"),
            &Reason::SameTap { name: "t".into() }
        );
        assert_eq!(
            e.to_string(),
            "config key `uplink.tap`: \"t\" is also pod.tap, in the same network namespace"
        );
    }

    #[test]
    fn dhcp_address_and_its_limits() {
        use crate::config::UplinkAddress;
        let c = Config::from_toml_str("[uplink]\naddress = \"dhcp\"\n").unwrap();
        assert_eq!(c.uplink.address, UplinkAddress::Dhcp);
        assert_eq!(c.uplink.address.to_string(), "dhcp");
        // The gateway is only a fallback: not checked against a subnet.
        let c = Config::from_toml_str("[uplink]\naddress = \"dhcp\"\ngateway = \"192.0.2.1\"\n")
            .unwrap();
        assert_eq!(c.uplink.gateway, std::net::Ipv4Addr::new(192, 0, 2, 1));
        let e = err("[uplink]\naddress = \"dhcp\"\ngateway = \"nope\"\n");
        assert!(matches!(
            reason(&e, "uplink.gateway"),
            Reason::BadAddress { .. }
        ));
        let e = err(
            "[uplink]\naddress = \"dhcp\"\n[[snat]]\nsource = \"10.244.1.0/24\"\nto = \"192.0.2.9\"\n",
        );
        assert_eq!(reason(&e, "snat[0].to"), &Reason::PoolWithDhcp);
        assert_mentions(&e.to_string(), &["fixed uplink.address", "dhcp"]);
        let e = err("[uplink]\naddress = \"DHCP\"\n");
        assert!(matches!(reason(&e, "uplink.address"), Reason::BadCidr(_)));
    }
}
