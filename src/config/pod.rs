//! The `[pod]` section: the inside TAP and the gateway's pod address.
use super::{error::at, reader::Table, values, ConfigError, PodConfig, MAX_MTU, MIN_MTU};

pub(super) struct Raw {
    tap: String,
    address: String,
    netns: Option<String>,
    mtu: i64,
}

pub(super) fn read(mut t: Table<'_>) -> Result<Raw, ConfigError> {
    let raw = Raw {
        tap: t.string("tap")?,
        address: t.string("address")?,
        netns: t.opt_string("netns")?,
        mtu: t.int("mtu")?,
    };
    t.finish()?;
    Ok(raw)
}

pub(super) fn check(raw: Raw) -> Result<PodConfig, ConfigError> {
    Ok(PodConfig {
        tap: values::tap_name(raw.tap).map_err(at("pod.tap"))?,
        address: values::host_address(&raw.address).map_err(at("pod.address"))?,
        netns: values::netns(raw.netns).map_err(at("pod.netns"))?,
        mtu: values::bounded(raw.mtu, MIN_MTU..=MAX_MTU, None).map_err(at("pod.mtu"))?,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::config::tests::{err, reason};
    use crate::config::{Config, NameProblem, Reason};
    use crate::net::Ipv4NetError;

    #[test]
    fn netns_paths() {
        let c = Config::from_toml_str(
            "[pod]\nnetns = \"/run/netns/pod\"\n[uplink]\nnetns = \"/proc/1/ns/net\"\n",
        )
        .unwrap();
        assert_eq!(c.pod.netns, Some(PathBuf::from("/run/netns/pod")));
        assert_eq!(c.uplink.netns, Some(PathBuf::from("/proc/1/ns/net")));
        // The same tap name is fine in different namespaces.
        let c = Config::from_toml_str(
            "[pod]\ntap = \"t\"\nnetns = \"/run/netns/a\"\n[uplink]\ntap = \"t\"\n",
        )
        .unwrap();
        assert_eq!(c.pod.tap, c.uplink.tap);
    }

    #[test]
    fn rejects_cidr_prefix_33() {
        let e = err("[pod]\naddress = \"10.244.0.1/33\"\n");
        assert_eq!(
            e.to_string(),
            "config key `pod.address`: invalid CIDR \"10.244.0.1/33\": prefix length must be 0 to 32"
        );
        assert!(matches!(
            reason(&e, "pod.address"),
            Reason::BadCidr(Ipv4NetError::Invalid { .. })
        ));
    }

    #[test]
    fn rejects_network_and_broadcast_as_address() {
        let e = err("[pod]\naddress = \"10.244.0.0/16\"\n");
        assert_eq!(
            e.to_string(),
            "config key `pod.address`: 10.244.0.0 is the network address of 10.244.0.0/16, not a host address"
        );
        let e = err("[pod]\naddress = \"10.244.255.255/16\"\n");
        assert!(matches!(reason(&e, "pod.address"), Reason::NotHost { .. }));
        assert!(e.to_string().contains("broadcast address"));
        let e = err("[pod]\naddress = \"10.244.0.1/0\"\n");
        assert_eq!(reason(&e, "pod.address"), &Reason::ZeroPrefix);
        assert_eq!(
            e.to_string(),
            "config key `pod.address`: prefix length 0 is not allowed for an interface address"
        );
    }

    #[test]
    fn rejects_bad_tap_name() {
        use NameProblem::*;
        for (bad, want) in [
            ("", Empty),
            ("a/b", BadChar),
            ("a b", BadChar),
            ("a:1", BadChar),
            ("tab\t", BadChar),
            ("sixteen-bytes-xx", TooLong { len: 16, max: 15 }),
            ("..", Dots),
        ] {
            let e = err(&format!("[pod]\ntap = \"{bad}\"\n"));
            assert_eq!(
                reason(&e, "pod.tap"),
                &Reason::BadTapName {
                    name: bad.to_string(),
                    problem: want
                }
            );
        }
        assert!(Config::from_toml_str("[pod]\ntap = \"fifteen-bytes-x\"\n").is_ok());
        assert_eq!(
            err("[pod]\ntap = \"sixteen-bytes-xx\"\n").to_string(),
            "config key `pod.tap`: \"sixteen-bytes-xx\" is 16 bytes; Linux interface names are at most 15"
        );
    }
}
