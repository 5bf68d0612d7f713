//! The `[[masquerade]]` and `[[snat]]` lists: which pod traffic is
//! translated, and to which uplink addresses.
use std::net::Ipv4Addr;

use super::{
    error::{at, AddressForm, Overlap, Reason, Reserved, Side},
    reader::Table,
    values::{self, net_of},
    ConfigError, MasqueradeRule, SnatRule, UplinkConfig, MAX_SNAT_POOL,
};
use crate::net::Ipv4Net;

/// `source` has no default: a rule without one means nothing.
pub(super) struct RawMasquerade {
    source: String,
    exclude: Vec<String>,
}

/// `source` and `to` have no default: a rule without them means nothing.
pub(super) struct RawSnat {
    source: String,
    to: String,
    exclude: Vec<String>,
}

pub(super) fn read_masquerade(mut t: Table<'_>) -> Result<RawMasquerade, ConfigError> {
    let raw = RawMasquerade {
        source: t.string("source")?,
        exclude: t.strings("exclude")?,
    };
    t.finish()?;
    Ok(raw)
}

pub(super) fn read_snat(mut t: Table<'_>) -> Result<RawSnat, ConfigError> {
    let raw = RawSnat {
        source: t.string("source")?,
        to: t.string("to")?,
        exclude: t.strings("exclude")?,
    };
    t.finish()?;
    Ok(raw)
}

pub(super) fn check_masquerade(
    raw: Vec<RawMasquerade>,
    uplink: &UplinkConfig,
) -> Result<Vec<MasqueradeRule>, ConfigError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, rule)| {
            Ok(MasqueradeRule {
                source: source(&format!("masquerade[{i}]"), &rule.source, uplink)?,
                exclude: exclude(&format!("masquerade[{i}]"), &rule.exclude)?,
            })
        })
        .collect()
}

/// The `[[snat]]` list, checked against the uplink and against each other.
pub(super) fn check_snat(
    raw: Vec<RawSnat>,
    uplink: &UplinkConfig,
) -> Result<Vec<SnatRule>, ConfigError> {
    let mut out: Vec<SnatRule> = Vec::with_capacity(raw.len());
    for (i, rule) in raw.into_iter().enumerate() {
        let entry = format!("snat[{i}]");
        let source = source(&entry, &rule.source, uplink)?;
        let to_key = format!("{entry}.to");
        let (to_first, to_last) = pool(&rule.to, uplink).map_err(at(&to_key))?;
        if let Some((j, other)) = out
            .iter()
            .enumerate()
            .find(|(_, o)| to_first <= o.to_last && o.to_first <= to_last)
        {
            return Err(at(to_key)(Reason::Overlaps {
                value: format!("pool {:?}", rule.to),
                with: Overlap::SnatPool(j),
                other: format!("{}-{}", other.to_first, other.to_last),
            }));
        }
        out.push(SnatRule {
            source,
            to_first,
            to_last,
            exclude: exclude(&entry, &rule.exclude)?,
        });
    }
    Ok(out)
}

/// `ENTRY.source`: a CIDR that leaves the uplink address out.
fn source(entry: &str, s: &str, uplink: &UplinkConfig) -> Result<Ipv4Net, ConfigError> {
    let key = format!("{entry}.source");
    let source = values::cidr(s).map_err(at(&key))?;
    // A leased address is checked when it comes (see `gateway::dhcp`).
    if let Some(address) = uplink.address.fixed() {
        if source.contains(address.addr) {
            return Err(at(key)(Reason::ContainsUplink {
                net: source,
                uplink: address.addr,
            }));
        }
    }
    Ok(source)
}

/// `ENTRY.exclude`: CIDRs.
fn exclude(entry: &str, list: &[String]) -> Result<Vec<Ipv4Net>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(j, s)| values::cidr(s).map_err(at(format!("{entry}.exclude[{j}]"))))
        .collect()
}

/// `snat[i].to`: `"A"` or `"A-B"`, at most [`MAX_SNAT_POOL`] host addresses
/// of the uplink subnet, not the uplink address or gateway.
fn pool(s: &str, uplink: &UplinkConfig) -> Result<(Ipv4Addr, Ipv4Addr), Reason> {
    let addr = |a: &str| values::ipv4(s, a, AddressForm::Pool);
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (first, last) = (addr(a)?, addr(b)?);
    if first > last {
        return Err(Reason::Reversed {
            input: s.to_string(),
            first,
            last,
        });
    }
    let count = u64::from(u32::from(last) - u32::from(first)) + 1;
    if count > u64::from(MAX_SNAT_POOL) {
        return Err(Reason::PoolTooLarge {
            input: s.to_string(),
            count,
            max: MAX_SNAT_POOL,
        });
    }
    let Some(address) = uplink.address.fixed() else {
        return Err(Reason::PoolWithDhcp);
    };
    let subnet = net_of(&address);
    if !subnet.contains(first) || !subnet.contains(last) {
        return Err(Reason::OutsideSubnet {
            value: format!("{s:?}"),
            side: Side::Uplink,
            subnet,
        });
    }
    let mut reserved = vec![
        (address.addr, Reserved::UplinkAddress),
        (uplink.gateway, Reserved::UplinkGateway),
    ];
    // /31 has no network or broadcast address (RFC 3021).
    if subnet.prefix_len < 31 {
        reserved.push((subnet.network(), Reserved::Network));
        reserved.push((subnet.broadcast(), Reserved::Broadcast));
    }
    match reserved
        .into_iter()
        .find(|(a, _)| (first..=last).contains(a))
    {
        Some((addr, what)) => Err(Reason::PoolIncludes {
            input: s.to_string(),
            addr,
            what,
        }),
        None => Ok((first, last)),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use crate::config::tests::{assert_mentions, err, net, reason};
    use crate::config::{
        AddressForm, Config, ConfigError, MasqueradeRule, Overlap, Reason, Reserved, SnatRule,
        DEFAULT_TOML,
    };

    /// The error for a config with one `[[snat]]`.
    fn snat_err(source: &str, to: &str) -> ConfigError {
        err(&format!("[[snat]]\nsource = \"{source}\"\nto = \"{to}\"\n"))
    }

    #[test]
    fn file_masquerade_replaces_default_list() {
        let c = Config::from_toml_str(
            "[[masquerade]]\nsource = \"10.244.1.0/24\"\n[[masquerade]]\nsource = \"10.244.2.0/24\"\nexclude = [\"10.0.0.0/8\", \"192.168.0.0/16\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.masquerade,
            vec![
                MasqueradeRule {
                    source: net("10.244.1.0/24"),
                    exclude: vec![],
                },
                MasqueradeRule {
                    source: net("10.244.2.0/24"),
                    exclude: vec![net("10.0.0.0/8"), net("192.168.0.0/16")],
                },
            ]
        );
    }

    #[test]
    fn snat_rules_parse() {
        let c = Config::from_toml_str(
            "[[snat]]\nsource = \"10.244.1.0/24\"\nto = \"203.0.113.20-203.0.113.29\"\nexclude = [\"10.244.0.0/16\"]\n\
             [[snat]]\nsource = \"10.244.2.0/24\"\nto = \"203.0.113.30\"\n\
             [[snat]]\nsource = \"10.244.3.0/24\"\nto = \"203.0.113.2-203.0.113.9\"\n",
        )
        .unwrap();
        assert_eq!(
            c.snat,
            vec![
                SnatRule {
                    source: net("10.244.1.0/24"),
                    to_first: Ipv4Addr::new(203, 0, 113, 20),
                    to_last: Ipv4Addr::new(203, 0, 113, 29),
                    exclude: vec![net("10.244.0.0/16")],
                },
                SnatRule {
                    source: net("10.244.2.0/24"),
                    to_first: Ipv4Addr::new(203, 0, 113, 30),
                    to_last: Ipv4Addr::new(203, 0, 113, 30),
                    exclude: vec![],
                },
                SnatRule {
                    source: net("10.244.3.0/24"),
                    to_first: Ipv4Addr::new(203, 0, 113, 2),
                    to_last: Ipv4Addr::new(203, 0, 113, 9),
                    exclude: vec![],
                },
            ]
        );
        // A file without [[masquerade]] keeps the default rule.
        let default = Config::from_toml_str(DEFAULT_TOML).unwrap();
        assert_eq!(c.masquerade, default.masquerade);
        assert!(c.warnings().is_empty());
        // A full 256-address pool on a wider uplink.
        let c = Config::from_toml_str(
            "[uplink]\naddress = \"198.51.100.10/22\"\ngateway = \"198.51.100.1\"\n[[snat]]\nsource = \"10.244.0.0/16\"\nto = \"198.51.101.0-198.51.101.255\"\n",
        )
        .unwrap();
        assert_eq!(c.snat[0].to_last, Ipv4Addr::new(198, 51, 101, 255));
    }

    #[test]
    fn rejects_bad_masquerade_exclude() {
        let e = err(
            "[[masquerade]]\nsource = \"10.244.0.0/16\"\nexclude = [\"10.0.0.0/8\", \"nope\"]\n",
        );
        assert!(matches!(
            reason(&e, "masquerade[0].exclude[1]"),
            Reason::BadCidr(_)
        ));
        assert_mentions(&e.to_string(), &["nope"]);
    }

    #[test]
    fn rejects_masquerade_source_containing_uplink() {
        let e = err("[[masquerade]]\nsource = \"0.0.0.0/0\"\nexclude = [\"10.244.0.0/16\"]\n");
        assert_eq!(
            reason(&e, "masquerade[0].source"),
            &Reason::ContainsUplink {
                net: net("0.0.0.0/0"),
                uplink: Ipv4Addr::new(203, 0, 113, 10),
            }
        );
        assert_eq!(
            e.to_string(),
            "config key `masquerade[0].source`: 0.0.0.0/0 contains the uplink address 203.0.113.10; translated replies would match the rule again"
        );
    }

    #[test]
    fn rejects_bad_snat_source() {
        let e = snat_err("10.244.1.0/33", "203.0.113.20");
        assert!(matches!(reason(&e, "snat[0].source"), Reason::BadCidr(_)));
        let e = snat_err("0.0.0.0/0", "203.0.113.20");
        assert!(matches!(
            reason(&e, "snat[0].source"),
            Reason::ContainsUplink { .. }
        ));
        let e = err(
            "[[snat]]\nsource = \"10.244.1.0/24\"\nto = \"203.0.113.20\"\nexclude = [\"nope\"]\n",
        );
        assert!(matches!(
            reason(&e, "snat[0].exclude[0]"),
            Reason::BadCidr(_)
        ));
    }

    #[test]
    fn rejects_bad_snat_pool_syntax() {
        for bad in [
            "",
            "nope",
            "203.0.113.20-",
            "203.0.113.20/30",
            "203.0.113.20-x",
        ] {
            let e = snat_err("10.244.1.0/24", bad);
            assert!(
                matches!(
                    reason(&e, "snat[0].to"),
                    Reason::BadAddress {
                        form: AddressForm::Pool,
                        ..
                    }
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            snat_err("10.244.1.0/24", "203.0.113.20-x").to_string(),
            "config key `snat[0].to`: \"203.0.113.20-x\": \"x\" is not an IPv4 address (write ADDRESS or FIRST-LAST)"
        );
    }

    #[test]
    fn rejects_unordered_snat_pool() {
        let e = snat_err("10.244.1.0/24", "203.0.113.29-203.0.113.20");
        assert!(matches!(reason(&e, "snat[0].to"), Reason::Reversed { .. }));
        assert_eq!(
            e.to_string(),
            "config key `snat[0].to`: \"203.0.113.29-203.0.113.20\": first address 203.0.113.29 is above last address 203.0.113.20"
        );
    }

    #[test]
    fn rejects_snat_pool_over_256() {
        let e = err(
            "[uplink]\naddress = \"198.51.100.10/22\"\ngateway = \"198.51.100.1\"\n[[snat]]\nsource = \"10.244.0.0/16\"\nto = \"198.51.101.0-198.51.102.0\"\n",
        );
        assert!(matches!(
            reason(&e, "snat[0].to"),
            Reason::PoolTooLarge {
                count: 257,
                max: 256,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "config key `snat[0].to`: \"198.51.101.0-198.51.102.0\" has 257 addresses; a pool has at most 256"
        );
    }

    #[test]
    fn rejects_snat_pool_outside_uplink_subnet() {
        let e = snat_err("10.244.1.0/24", "198.51.100.7");
        assert!(matches!(
            reason(&e, "snat[0].to"),
            Reason::OutsideSubnet { subnet, .. } if *subnet == net("203.0.113.0/24")
        ));
        let e = snat_err("10.244.1.0/24", "203.0.113.250-203.0.114.3");
        assert!(matches!(
            reason(&e, "snat[0].to"),
            Reason::OutsideSubnet { .. }
        ));
        assert_eq!(
            e.to_string(),
            "config key `snat[0].to`: \"203.0.113.250-203.0.114.3\" is outside the uplink subnet 203.0.113.0/24"
        );
    }

    #[test]
    fn rejects_snat_pool_with_reserved_address() {
        for (pool, what) in [
            ("203.0.113.5-203.0.113.15", Reserved::UplinkAddress),
            ("203.0.113.10", Reserved::UplinkAddress),
            ("203.0.113.1-203.0.113.4", Reserved::UplinkGateway),
            ("203.0.113.0", Reserved::Network),
            ("203.0.113.250-203.0.113.255", Reserved::Broadcast),
        ] {
            let e = snat_err("10.244.1.0/24", pool);
            assert!(
                matches!(reason(&e, "snat[0].to"), Reason::PoolIncludes { what: w, .. } if *w == what),
                "{pool}"
            );
        }
        assert_eq!(
            snat_err("10.244.1.0/24", "203.0.113.0").to_string(),
            "config key `snat[0].to`: \"203.0.113.0\" includes 203.0.113.0, the network address of the uplink subnet"
        );
    }

    #[test]
    fn rejects_overlapping_snat_pools() {
        let e = err(
            "[[snat]]\nsource = \"10.244.1.0/24\"\nto = \"203.0.113.20-203.0.113.29\"\n\
             [[snat]]\nsource = \"10.244.2.0/24\"\nto = \"203.0.113.29-203.0.113.40\"\n",
        );
        assert!(matches!(
            reason(&e, "snat[1].to"),
            Reason::Overlaps {
                with: Overlap::SnatPool(0),
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "config key `snat[1].to`: pool \"203.0.113.29-203.0.113.40\" overlaps snat[0].to 203.0.113.20-203.0.113.29; an address belongs to one rule"
        );
    }
}
