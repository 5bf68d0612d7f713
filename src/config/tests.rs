//! Tests of the whole load: the embedded default, layering, the
//! environment, shape errors; and the helpers the section tests share.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use super::*;

pub(super) fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// What the README's config reference documents as the defaults. This is
/// the check that `config/tapnat.toml` says what the README says, not a
/// second source of defaults: the program never uses it.
pub(super) fn expected_default() -> Config {
    Config {
        pod: PodConfig {
            tap: "tapnat0".into(),
            address: net("10.244.0.1/16"),
            netns: None,
            mtu: 1500,
        },
        uplink: UplinkConfig {
            kind: UplinkKind::Tap,
            tap: "tapnat1".into(),
            interface: None,
            address: crate::config::UplinkAddress::Static(net("203.0.113.10/24")),
            dhcp_max_lease: None,
            gateway: Ipv4Addr::new(203, 0, 113, 1),
            netns: None,
            mtu: 1500,
        },
        masquerade: vec![MasqueradeRule {
            source: net("10.244.0.0/16"),
            exclude: vec![net("10.244.0.0/16")],
        }],
        snat: vec![],
        forward: vec![],
        nat: NatConfig {
            ports: PortRange {
                first: 1024,
                last: 65535,
            },
            max_flows: 262_144,
            max_flows_per_pod: 16_384,
            ports_per_pod: 4096,
            timeouts: Timeouts {
                tcp_established: Duration::from_secs(7440),
                tcp_transitory: Duration::from_secs(240),
                udp: Duration::from_secs(300),
                icmp: Duration::from_secs(60),
                fragment: Duration::from_secs(2),
            },
            filtering: Filtering::Address,
            icmp_errors_per_sec: 1000,
            icmp_errors_burst: 50,
            fragments_max: 1024,
        },
        workers: WorkersConfig {
            threads: 0,
            busy_poll: Duration::from_micros(50),
            offload: true,
            io_uring: true,
            pin: false,
        },
        control: ControlConfig {
            socket: PathBuf::from("/run/tapnat.sock"),
            group: None,
        },
        metrics: MetricsConfig { listen: None },
        run: RunConfig {
            run_as: None,
            seccomp: true,
        },
        log: super::LogConfig::default(),
    }
}

/// The error for `toml`, which must fail.
#[track_caller]
pub(super) fn err(toml: &str) -> ConfigError {
    match Config::from_toml_str(toml) {
        Ok(c) => panic!("accepted {toml:?} as {c:?}"),
        Err(e) => e,
    }
}

/// The error for the embedded default under `env`, which must fail.
#[track_caller]
fn env_err(env: &[(&str, &str)]) -> ConfigError {
    match Config::load_with_env(None, env) {
        Ok(c) => panic!("accepted {env:?} as {c:?}"),
        Err(e) => e,
    }
}

/// The reason of `e`, which must be about `key`.
#[track_caller]
pub(super) fn reason<'e>(e: &'e ConfigError, key: &str) -> &'e Reason {
    match e {
        ConfigError::Invalid { key: k, reason } if k == key => reason,
        other => panic!("expected an error about `{key}`, got {other:?}"),
    }
}

#[track_caller]
pub(super) fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{msg:?} does not mention {p:?}");
    }
}

// ---- the default and layering ----

#[test]
fn embedded_default_parses_to_expected() {
    assert_eq!(
        Config::from_toml_str(DEFAULT_TOML).unwrap(),
        expected_default()
    );
    assert_eq!(
        Config::load_with_env(None, &[]).unwrap(),
        expected_default()
    );
    assert!(expected_default().warnings().is_empty());
}

#[test]
fn empty_file_is_the_default() {
    assert_eq!(Config::from_toml_str("").unwrap(), expected_default());
}

#[test]
fn partial_file_gets_defaults() {
    let c = Config::from_toml_str(
        "[pod]\ntap = \"p0\"\n[nat.timeouts]\nudp = \"2h4m\"\n[workers]\nthreads = 4\n",
    )
    .unwrap();
    let mut want = expected_default();
    want.pod.tap = "p0".into();
    want.nat.timeouts.udp = Duration::from_secs(7440);
    want.workers.threads = 4;
    assert_eq!(c, want);
}

#[test]
fn rejects_unreadable_file() {
    let e = Config::load_with_env(Some(Path::new("/nonexistent/tapnat.toml")), &[]).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert_mentions(&e.to_string(), &["/nonexistent/tapnat.toml"]);
}

// ---- environment ----

#[test]
fn env_overrides_string_number_and_timeout() {
    let c = Config::load_with_env(
        None,
        &[
            ("TAPNAT_POD__TAP", "tap9"),
            ("TAPNAT_UPLINK__MTU", "9000"),
            ("TAPNAT_NAT__TIMEOUTS__UDP", "5s"),
            ("TAPNAT_NAT__TIMEOUTS__TCP_ESTABLISHED", "3h"),
            ("TAPNAT_NAT__MAX_FLOWS", "1000"),
            ("TAPNAT_WORKERS__THREADS", "2"),
            ("TAPNAT_POD__NETNS", "/run/netns/pod"),
            ("PATH", "/usr/bin"),
            ("TAPNATX", "not ours"),
            ("TAPNAT_LOG", "debug"),
        ],
    )
    .unwrap();
    assert_eq!(c.pod.tap, "tap9");
    assert_eq!(c.uplink.mtu, 9000);
    assert_eq!(c.nat.timeouts.udp, Duration::from_secs(5));
    assert_eq!(
        c.nat.timeouts.tcp_established,
        Duration::from_secs(3 * 3600)
    );
    assert_eq!(c.nat.max_flows, 1000);
    assert_eq!(c.workers.threads, 2);
    assert_eq!(c.pod.netns, Some(PathBuf::from("/run/netns/pod")));
}

#[test]
fn env_numeric_looking_strings_stay_strings() {
    for name in ["1500", "1e3", "TRUE", "0x10", "1.50"] {
        let c = Config::load_with_env(None, &[("TAPNAT_POD__TAP", name)]).unwrap();
        assert_eq!(c.pod.tap, name);
    }
    let c = Config::load_with_env(None, &[("TAPNAT_NAT__PORTS", "8080")]).unwrap();
    assert_eq!(
        c.nat.ports,
        PortRange {
            first: 8080,
            last: 8080
        }
    );
}

#[test]
fn env_overrides_file() {
    let dir = std::env::temp_dir().join(format!("tapnat-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.toml");
    std::fs::write(
        &path,
        "[pod]\ntap = \"fromfile\"\nnetns = \"/run/netns/x\"\nmtu = 1400\n",
    )
    .unwrap();
    let c = Config::load_with_env(
        Some(&path),
        &[("TAPNAT_POD__MTU", "1300"), ("TAPNAT_POD__NETNS", "")],
    )
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(c.pod.tap, "fromfile");
    assert_eq!(c.pod.mtu, 1300);
    assert_eq!(c.pod.netns, None);
}

#[test]
fn every_scalar_key_is_settable_from_env() {
    let vals = [
        ("pod.tap", "p"),
        ("pod.address", "10.244.0.2/16"),
        ("pod.netns", "/run/netns/p"),
        ("uplink.kind", "tap"),
        ("uplink.tap", "u"),
        ("uplink.address", "203.0.113.9/24"),
        ("uplink.gateway", "203.0.113.2"),
        ("uplink.netns", "/run/netns/u"),
        ("nat.ports", "2000-3000"),
        ("nat.timeouts.tcp_established", "3h"),
        ("nat.timeouts.tcp_transitory", "5m"),
        ("nat.timeouts.udp", "10m"),
        ("nat.timeouts.icmp", "2m"),
        ("nat.timeouts.fragment", "5s"),
        ("nat.filtering", "address-and-port"),
        ("workers.busy_poll", "50us"),
        ("pod.mtu", "1400"),
        ("uplink.mtu", "1400"),
        ("nat.max_flows", "10"),
        ("nat.max_flows_per_pod", "5"),
        ("nat.ports_per_pod", "0"),
        ("nat.icmp_errors_per_sec", "0"),
        ("nat.icmp_errors_burst", "7"),
        ("nat.fragments_max", "0"),
        ("workers.threads", "3"),
        ("workers.offload", "false"),
        ("workers.io_uring", "false"),
        ("workers.pin", "true"),
        ("control.socket", "/tmp/t.sock"),
        ("control.group", "tapnat"),
        ("metrics.listen", "127.0.0.1:9469"),
        ("run.run_as", "nobody"),
        ("run.seccomp", "false"),
        ("log.mappings", "/tmp/m.json"),
        ("log.destinations", "true"),
    ];
    // Every scalar key of the embedded default (and the keys it leaves
    // out, whose absence means "none") is in the list above.
    let mut scalars: Vec<String> = [
        "pod.netns",
        "uplink.netns",
        "control.group",
        "metrics.listen",
        "run.run_as",
        "log.mappings",
    ]
    .map(String::from)
    .to_vec();
    fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in t {
            let key = format!("{prefix}{k}");
            match v {
                toml::Value::Table(sub) => walk(&format!("{key}."), sub, out),
                toml::Value::Array(_) => {}
                _ => out.push(key),
            }
        }
    }
    walk("", &DEFAULT_TOML.parse().unwrap(), &mut scalars);
    let mut listed: Vec<String> = vals.iter().map(|(k, _)| k.to_string()).collect();
    scalars.sort();
    listed.sort();
    assert_eq!(listed, scalars);

    let names: Vec<String> = vals
        .iter()
        .map(|(k, _)| format!("TAPNAT_{}", k.replace('.', "__").to_uppercase()))
        .collect();
    let env: Vec<(&str, &str)> = names
        .iter()
        .map(String::as_str)
        .zip(vals.iter().map(|v| v.1))
        .collect();
    let c = Config::load_with_env(None, &env).unwrap();
    let d = expected_default();
    assert_ne!(c.pod, d.pod);
    assert_ne!(c.uplink, d.uplink);
    assert_ne!(c.nat.ports, d.nat.ports);
    assert_ne!(c.nat.max_flows, d.nat.max_flows);
    assert_eq!((c.nat.max_flows_per_pod, c.nat.ports_per_pod), (5, 0));
    assert_eq!(c.nat.timeouts.icmp, Duration::from_secs(120));
    assert_eq!(c.nat.timeouts.fragment, Duration::from_secs(5));
    assert_eq!(c.nat.filtering, Filtering::AddressAndPort);
    assert_eq!(c.nat.icmp_errors_per_sec, 0);
    assert_eq!(c.nat.icmp_errors_burst, 7);
    assert_eq!(c.nat.fragments_max, 0);
    assert_eq!(
        c.workers,
        WorkersConfig {
            threads: 3,
            busy_poll: Duration::from_micros(50),
            offload: false,
            io_uring: false,
            pin: true,
        }
    );
    assert_eq!(c.control.socket, PathBuf::from("/tmp/t.sock"));
    assert_eq!(c.control.group.as_deref(), Some("tapnat"));
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9469".parse().unwrap()));
}

#[test]
fn env_bools_are_exactly_true_or_false() {
    for bad in ["TRUE", "1", "yes", "on", ""] {
        let e = env_err(&[("TAPNAT_WORKERS__PIN", bad)]);
        assert_eq!(
            reason(&e, "workers.pin"),
            &Reason::WrongType {
                expected: Kind::Boolean,
                found: format!("TAPNAT_WORKERS__PIN={bad:?}"),
            }
        );
    }
    let c = Config::load_with_env(None, &[("TAPNAT_WORKERS__OFFLOAD", "false")]).unwrap();
    assert!(!c.workers.offload);
}

#[test]
fn rejects_unknown_env_key() {
    for (var, key) in [
        ("TAPNAT_POD__TAPP", "pod.tapp"),
        ("TAPNAT_BOGUS", "bogus"),
        // Tables and lists are not settable from the environment.
        ("TAPNAT_POD", "pod"),
        ("TAPNAT_MASQUERADE", "masquerade"),
        ("TAPNAT_MASQUERADE__0__SOURCE", "masquerade.0.source"),
        ("TAPNAT_FORWARD", "forward"),
    ] {
        let e = env_err(&[(var, "x")]);
        assert!(
            matches!(&e, ConfigError::UnknownEnv { var: v, key: k } if v == var && k == key),
            "{e:?}"
        );
    }
    assert_eq!(
        env_err(&[("TAPNAT_POD__TAPP", "x")]).to_string(),
        "environment variable `TAPNAT_POD__TAPP`: `pod.tapp` is not a config key that can be set from the environment"
    );
}

#[test]
fn rejects_bad_env_number() {
    let e = env_err(&[("TAPNAT_WORKERS__THREADS", "many")]);
    assert!(matches!(
        reason(&e, "workers.threads"),
        Reason::WrongType {
            expected: Kind::Integer,
            ..
        }
    ));
    assert_eq!(
        e.to_string(),
        "config key `workers.threads`: invalid type: expected an integer, found TAPNAT_WORKERS__THREADS=\"many\""
    );
}

#[test]
fn rejects_bad_env_value() {
    let e = env_err(&[("TAPNAT_NAT__TIMEOUTS__UDP", "300")]);
    assert!(matches!(
        reason(&e, "nat.timeouts.udp"),
        Reason::BadDuration {
            problem: DurationProblem::MissingUnit,
            ..
        }
    ));
}

// ---- shape errors ----

#[test]
fn rejects_forward_and_snat_missing_keys() {
    let e = err("[[forward]]\nprotocol = \"tcp\"\nport = 80\n");
    assert_eq!(reason(&e, "forward[0].to"), &Reason::Missing);
    let e = err("[[snat]]\nsource = \"10.244.0.0/16\"\n");
    assert_eq!(reason(&e, "snat[0].to"), &Reason::Missing);
    let e = err("[[masquerade]]\nexclude = []\n");
    assert_eq!(reason(&e, "masquerade[0].source"), &Reason::Missing);
    assert_eq!(
        e.to_string(),
        "config key `masquerade[0].source`: missing; this key has no default"
    );
}

#[test]
fn rejects_bad_toml_syntax() {
    let e = err("[pod\ntap = 1");
    assert!(matches!(&e, ConfigError::Syntax { origin, .. } if origin == "config text"));
    assert_mentions(&e.to_string(), &["cannot parse config text as TOML"]);
}

#[test]
fn rejects_unknown_keys_by_full_path() {
    for (text, key) in [
        ("bogus = 1\n", "bogus"),
        ("[pod]\ntapp = \"x\"\n", "pod.tapp"),
        ("[nat.timeouts]\ntcp = \"5s\"\n", "nat.timeouts.tcp"),
        (
            "[[masquerade]]\nsource = \"10.244.0.0/16\"\nexclud = []\n",
            "masquerade[0].exclud",
        ),
        (
            "[[snat]]\nsource = \"10.244.0.0/16\"\nto = \"203.0.113.20\"\nexclud = []\n",
            "snat[0].exclud",
        ),
    ] {
        let e = err(text);
        assert!(
            matches!(reason(&e, key), Reason::UnknownKey { .. }),
            "{text:?}"
        );
    }
    assert_eq!(
        err("[pod]\ntapp = \"x\"\n").to_string(),
        "config key `pod.tapp`: unknown key; expected one of `tap`, `address`, `netns`, `mtu`"
    );
}

#[test]
fn rejects_wrong_type() {
    let e = err("[pod]\nmtu = \"big\"\n");
    assert_eq!(
        reason(&e, "pod.mtu"),
        &Reason::WrongType {
            expected: Kind::Integer,
            found: "string \"big\"".into()
        }
    );
    assert_eq!(
        e.to_string(),
        "config key `pod.mtu`: invalid type: expected an integer, found string \"big\""
    );
    let e = err("pod = 5\n");
    assert_eq!(
        e.to_string(),
        "config key `pod`: invalid type: expected a table, found integer 5"
    );
    let e = err("[[masquerade]]\nsource = \"10.244.0.0/16\"\nexclude = \"10.0.0.0/8\"\n");
    assert!(matches!(
        reason(&e, "masquerade[0].exclude"),
        Reason::WrongType {
            expected: Kind::Strings,
            ..
        }
    ));
    let e = err("[[masquerade]]\nsource = \"10.244.0.0/16\"\nexclude = [\"10.0.0.0/8\", 5]\n");
    assert!(matches!(
        reason(&e, "masquerade[0].exclude[1]"),
        Reason::WrongType {
            expected: Kind::String,
            ..
        }
    ));
    let e = err("masquerade = [1]\n");
    assert!(matches!(
        reason(&e, "masquerade[0]"),
        Reason::WrongType {
            expected: Kind::Table,
            ..
        }
    ));
    let e = err("[masquerade]\nsource = \"10.244.0.0/16\"\n");
    assert!(matches!(
        reason(&e, "masquerade"),
        Reason::WrongType {
            expected: Kind::Tables,
            ..
        }
    ));
}

#[test]
fn rejects_non_integer_numbers() {
    // No coercion: a float is not rounded, a boolean is not 1, a string of
    // digits in the file is a string.
    for bad in ["1500.5", "true", "\"1500x\"", "\"1500\""] {
        let e = err(&format!("[pod]\nmtu = {bad}\n"));
        assert!(
            matches!(
                reason(&e, "pod.mtu"),
                Reason::WrongType {
                    expected: Kind::Integer,
                    ..
                }
            ),
            "{bad}"
        );
    }
}
