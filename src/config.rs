//! Configuration: the TOML file, `TAPNAT_` environment overrides, validation.
//!
//! The embedded default [`DEFAULT_TOML`] documents every key. Loading works in
//! three steps:
//!
//! 1. The file (or the embedded default) and the environment are merged by the
//!    `config` crate and deserialized into private `Raw*` structs. Every raw
//!    struct denies unknown fields and has a serde default equal to the
//!    embedded default, so a file may give only some keys.
//! 2. Shape errors from the `config` crate (unknown key, wrong type) are
//!    reworded so that each names its full key path ([`ConfigError::Shape`]).
//! 3. The raw strings (CIDRs, durations, port ranges) are parsed and checked
//!    into the typed [`Config`]; each failure names its key
//!    ([`ConfigError::Invalid`]).
//!
//! Nothing here touches devices or namespaces: a valid `Config` says what to
//! open, not that it can be opened.
use std::{
    collections::HashMap,
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::net::{Ipv4Net, Ipv4NetError, PortRange};

/// The documented default configuration, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../config/tapnat.toml");

/// Prefix of environment overrides (`TAPNAT_POD__TAP=tap9`).
const ENV_PREFIX: &str = "TAPNAT";

/// Keys that may be set from the environment and are taken as strings.
///
/// These are kept out of `try_parsing`: it would turn a tap named `1e3` into
/// `1000` and `TRUE` into `true`.
const ENV_STRING_KEYS: &[&str] = &[
    "pod.tap",
    "pod.address",
    "pod.netns",
    "uplink.kind",
    "uplink.tap",
    "uplink.address",
    "uplink.gateway",
    "uplink.netns",
    "nat.ports",
    "nat.filtering",
    "nat.timeouts.tcp_established",
    "nat.timeouts.tcp_transitory",
    "nat.timeouts.udp",
    "nat.timeouts.icmp",
    "nat.timeouts.fragment",
    "workers.busy_poll",
];

/// Keys that may be set from the environment and are numbers.
const ENV_NUMBER_KEYS: &[&str] = &[
    "pod.mtu",
    "uplink.mtu",
    "nat.max_flows",
    "nat.icmp_errors_per_sec",
    "nat.icmp_errors_burst",
    "nat.fragments_max",
    "workers.threads",
];

/// Keys that may be set from the environment and are booleans.
///
/// Taken as strings like [`ENV_STRING_KEYS`], so that only `true` and
/// `false` are accepted ([`Bool`]), not `TRUE`, `1` or `yes`.
const ENV_BOOL_KEYS: &[&str] = &["workers.offload", "workers.pin"];

/// Smallest MTU accepted: the IPv4 minimum datagram every host must accept
/// (RFC 791, "Every internet destination must be able to receive a datagram
/// of 576 octets").
pub const MIN_MTU: u16 = 576;
/// Largest MTU accepted (jumbo frames).
pub const MAX_MTU: u16 = 9000;
/// Most flows accepted in `nat.max_flows`.
pub const MAX_FLOWS_LIMIT: usize = 100_000_000;
/// Most worker threads accepted in `workers.threads`.
pub const MAX_THREADS: usize = 256;
/// Longest interface name Linux accepts (`IFNAMSIZ` - 1).
pub const MAX_TAP_NAME_LEN: usize = 15;
/// Most datagrams accepted in `nat.fragments_max`.
pub const MAX_FRAGMENTS_LIMIT: usize = 1_000_000;
/// Longest `workers.busy_poll` accepted.
pub const MAX_BUSY_POLL: Duration = Duration::from_secs(1);
/// Most addresses in one `[[snat]]` pool (`snat[i].to`).
pub const MAX_SNAT_POOL: u32 = 256;

/// RFC minimum idle timeouts; below them `Config::warnings` complains.
const RFC_MIN_TCP_ESTABLISHED: Duration = Duration::from_secs(7440);
const RFC_MIN_TCP_TRANSITORY: Duration = Duration::from_secs(240);
const RFC_MIN_UDP: Duration = Duration::from_secs(120);
const RFC_MIN_ICMP: Duration = Duration::from_secs(60);

/// Errors from loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML.
    #[error("cannot parse {origin} as TOML: {problem}")]
    Syntax { origin: String, problem: String },
    /// A key is unknown, missing or has the wrong type.
    #[error("config key `{key}`: {problem}")]
    Shape { key: String, problem: String },
    /// A `TAPNAT_` environment variable names no config key.
    #[error("environment variable `{var}`: `{key}` is not a config key that can be set from the environment")]
    UnknownEnv { var: String, key: String },
    /// A value has the right type but is not acceptable.
    #[error("config key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// How the uplink is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkKind {
    /// A TAP device tapnat creates or attaches to.
    Tap,
}

/// The `[pod]` table: the inside.
#[derive(Debug, Clone, PartialEq)]
pub struct PodConfig {
    pub tap: String,
    pub address: Ipv4Net,
    /// `None`: the namespace tapnat runs in.
    pub netns: Option<PathBuf>,
    pub mtu: u16,
}

/// The `[uplink]` table: the outside.
#[derive(Debug, Clone, PartialEq)]
pub struct UplinkConfig {
    pub kind: UplinkKind,
    pub tap: String,
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// `None`: the namespace tapnat runs in.
    pub netns: Option<PathBuf>,
    pub mtu: u16,
}

/// One `[[masquerade]]` rule: traffic from `source` to anywhere outside
/// every `exclude` prefix is translated to the uplink address.
#[derive(Debug, Clone, PartialEq)]
pub struct MasqueradeRule {
    pub source: Ipv4Net,
    pub exclude: Vec<Ipv4Net>,
}

/// One `[[snat]]` rule: traffic from `source` to anywhere outside every
/// `exclude` prefix is translated to an address of the pool
/// `to_first..=to_last` (at most [`MAX_SNAT_POOL`] addresses, all host
/// addresses of the uplink subnet other than the uplink address and
/// gateway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnatRule {
    pub source: Ipv4Net,
    pub to_first: Ipv4Addr,
    pub to_last: Ipv4Addr,
    pub exclude: Vec<Ipv4Net>,
}

/// The transport protocol of a `[[forward]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardProtocol {
    Tcp,
    Udp,
}

/// One `[[forward]]` (DNAT): `protocol` traffic to the uplink address on a
/// port in `ports` goes to `to_addr`, port `to_port + (port - ports.first)`.
///
/// Validated: `to_addr` is a host address of the pod subnet other than the
/// gateway's own; the target range ends at most at 65535; `ports` is
/// outside `nat.ports` and outside every other forward of the same protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub protocol: ForwardProtocol,
    pub ports: PortRange,
    pub to_addr: Ipv4Addr,
    /// The target port of `ports.first`.
    pub to_port: u16,
}

/// `nat.filtering`: which inbound packets a mapping lets through (RFC 4787
/// section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filtering {
    /// `"endpoint-independent"`: from any outside address and port.
    EndpointIndependent,
    /// `"address"`: from an outside address the inside endpoint has sent to.
    Address,
    /// `"address-and-port"`: from an outside address and port the inside
    /// endpoint has sent to.
    AddressAndPort,
}

/// The `[nat.timeouts]` table: idle times after which a flow is forgotten.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    pub tcp_established: Duration,
    pub tcp_transitory: Duration,
    pub udp: Duration,
    pub icmp: Duration,
    /// How long a datagram's fragments are tracked after its first one.
    pub fragment: Duration,
}

/// The `[nat]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct NatConfig {
    pub ports: PortRange,
    pub max_flows: usize,
    pub timeouts: Timeouts,
    pub filtering: Filtering,
    /// ICMP errors the gateway itself sends, per second; 0 = unlimited.
    pub icmp_errors_per_sec: u32,
    /// Burst of such errors allowed above the rate; at least 1 when the rate
    /// is limited.
    pub icmp_errors_burst: u32,
    /// Datagrams tracked while fragmented at once; 0 = fragments are dropped.
    pub fragments_max: usize,
}

/// The `[workers]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkersConfig {
    /// 0 = one per core; resolved when the workers start.
    pub threads: usize,
    /// Spin this long on empty reads before sleeping in poll; zero = never
    /// spin. At most [`MAX_BUSY_POLL`].
    pub busy_poll: Duration,
    /// Use `IFF_VNET_HDR` with TSO and checksum offload on the TAPs.
    pub offload: bool,
    /// Pin worker k to CPU k.
    pub pin: bool,
}

/// A complete, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub pod: PodConfig,
    pub uplink: UplinkConfig,
    pub masquerade: Vec<MasqueradeRule>,
    pub snat: Vec<SnatRule>,
    pub forward: Vec<Forward>,
    pub nat: NatConfig,
    pub workers: WorkersConfig,
}

impl Config {
    /// The file (or the embedded default when `None`) plus `TAPNAT_`
    /// environment overrides from the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        // Variables that are not valid Unicode cannot be ours; skip them.
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Self::load_with_env(path, &env)
    }

    /// As [`Config::load`], with the environment given explicitly; keys look
    /// like `"TAPNAT_POD__TAP"`. Variables without the prefix are ignored.
    pub fn load_with_env(path: Option<&Path>, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?,
                format!("config file {}", path.display()),
            ),
            None => (
                DEFAULT_TOML.to_string(),
                "the embedded default config".to_string(),
            ),
        };
        build(&text, &origin, env)
    }

    /// Parse and validate a TOML string, without the environment.
    pub fn from_toml_str(toml: &str) -> Result<Config, ConfigError> {
        build(toml, "config text", &[])
    }

    /// Human-readable warnings about a valid but questionable configuration:
    /// timeouts below the RFC minimums, no masquerade rule, a masquerade or
    /// SNAT rule that no pod traffic can match.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let t = &self.nat.timeouts;
        let checks = [
            (
                "nat.timeouts.tcp_established",
                t.tcp_established,
                RFC_MIN_TCP_ESTABLISHED,
                "RFC 5382 REQ-5",
            ),
            (
                "nat.timeouts.tcp_transitory",
                t.tcp_transitory,
                RFC_MIN_TCP_TRANSITORY,
                "RFC 5382 REQ-5",
            ),
            ("nat.timeouts.udp", t.udp, RFC_MIN_UDP, "RFC 4787 REQ-5"),
            ("nat.timeouts.icmp", t.icmp, RFC_MIN_ICMP, "RFC 5508 REQ-2"),
        ];
        for (key, value, min, rfc) in checks {
            if value < min {
                out.push(format!(
                    "config key `{key}`: {} is below the {}s minimum of {rfc}; idle flows will be dropped early",
                    format_duration(value),
                    min.as_secs()
                ));
            }
        }
        if self.masquerade.is_empty() && self.snat.is_empty() {
            out.push(
                "config key `masquerade`: no masquerade rule and no snat rule, so no pod traffic will be translated"
                    .to_string(),
            );
        }
        for (i, rule) in self.masquerade.iter().enumerate() {
            if !rule.source.overlaps(&self.pod.address) {
                out.push(format!(
                    "config key `masquerade[{i}].source`: {} does not overlap the pod subnet {}, so the rule matches no pod traffic",
                    rule.source, self.pod.address
                ));
            }
        }
        for (i, rule) in self.snat.iter().enumerate() {
            if !rule.source.overlaps(&self.pod.address) {
                out.push(format!(
                    "config key `snat[{i}].source`: {} does not overlap the pod subnet {}, so the rule matches no pod traffic",
                    rule.source, self.pod.address
                ));
            }
        }
        out
    }
}

/// Merge `text` and the `TAPNAT_` variables of `env`, deserialize, validate.
fn build(text: &str, origin: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut strings = HashMap::new();
    let mut numbers = HashMap::new();
    let prefix = format!("{}_", ENV_PREFIX.to_lowercase());
    for &(var, value) in env {
        let lower = var.to_lowercase();
        // Same rule as config::Environment: the prefix matches in any case.
        let Some(rest) = lower.strip_prefix(&prefix) else {
            continue;
        };
        let key = rest.replace("__", ".");
        if ENV_STRING_KEYS.contains(&key.as_str()) || ENV_BOOL_KEYS.contains(&key.as_str()) {
            strings.insert(var.to_string(), value.to_string());
        } else if ENV_NUMBER_KEYS.contains(&key.as_str()) {
            numbers.insert(var.to_string(), value.to_string());
        } else {
            return Err(ConfigError::UnknownEnv {
                var: var.to_string(),
                key,
            });
        }
    }
    let environment = |try_parsing, map| {
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(try_parsing)
            .source(Some(map))
    };
    let merged = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(environment(false, strings))
        .add_source(environment(true, numbers))
        .build()
        .map_err(|e| shape_error(e, origin))?;
    let raw: RawConfig = merged
        .try_deserialize()
        .map_err(|e| shape_error(e, origin))?;
    raw.validate()
}

/// Reword a `config` crate error so that it names the full key path.
///
/// The crate reports an unknown field as "unknown field `x`, expected one of
/// ... for key `pod`" and a type error as "invalid type: ... for key
/// `pod.mtu`"; we want "config key `pod.x`: ..." for both.
fn shape_error(err: config::ConfigError, origin: &str) -> ConfigError {
    use config::ConfigError as E;
    let join = |parent: Option<&str>, child: &str| match parent {
        Some(p) if !p.is_empty() => format!("{p}.{child}"),
        _ => child.to_string(),
    };
    match err {
        E::FileParse { cause, .. } => ConfigError::Syntax {
            origin: origin.to_string(),
            problem: cause.to_string(),
        },
        E::NotFound(key) => ConfigError::Shape {
            key: fix_path(&key),
            problem: "missing, and it has no default".to_string(),
        },
        E::Type {
            origin: source,
            unexpected,
            expected,
            key,
        } => ConfigError::Shape {
            key: key.map_or_else(|| "(top level)".to_string(), |k| fix_path(&k)),
            problem: hide_raw_names(&format!(
                "invalid type: {unexpected}, expected {expected}{}",
                source.map(|s| format!(" (from {s})")).unwrap_or_default()
            )),
        },
        E::At { error, key, .. } => message_error(
            &error.to_string(),
            key.map(|k| fix_path(&k)).as_deref(),
            &join,
        ),
        E::Message(msg) => message_error(&msg, None, &join),
        other => ConfigError::Shape {
            key: "(unknown)".to_string(),
            problem: other.to_string(),
        },
    }
}

/// serde names the expected struct ("expected struct RawPod"); say "a table".
fn hide_raw_names(msg: &str) -> String {
    match msg.find("struct Raw") {
        Some(start) => {
            let rest = &msg[start + "struct ".len()..];
            let end = rest
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(rest.len());
            format!("{}a table{}", &msg[..start], &rest[end..])
        }
        None => msg.to_string(),
    }
}

/// The `config` crate joins an index and a field without a dot
/// (`masquerade[0]source`); put it back (`masquerade[0].source`).
fn fix_path(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut after_index = false;
    for c in key.chars() {
        if after_index && c != '.' && c != '[' {
            out.push('.');
        }
        after_index = c == ']';
        out.push(c);
    }
    out
}

/// A serde message at `parent`: recognise "unknown field `x`" so the key
/// named is the unknown one.
fn message_error(
    msg: &str,
    parent: Option<&str>,
    join: &dyn Fn(Option<&str>, &str) -> String,
) -> ConfigError {
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((field, tail)) = rest.split_once('`') {
            let tail = tail.trim_start_matches(", ");
            return ConfigError::Shape {
                key: join(parent, field),
                problem: if tail.is_empty() {
                    "unknown key".to_string()
                } else {
                    format!("unknown key; {tail}")
                },
            };
        }
    }
    ConfigError::Shape {
        key: parent.unwrap_or("(top level)").to_string(),
        problem: hide_raw_names(msg),
    }
}

// ---- raw, serde-facing structs ------------------------------------------
//
// Defaults here must equal config/tapnat.toml; a test checks that an empty
// file and the embedded default give the same `Config`.

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    pod: RawPod,
    uplink: RawUplink,
    masquerade: Vec<RawMasquerade>,
    snat: Vec<RawSnat>,
    forward: Vec<RawForward>,
    nat: RawNat,
    workers: RawWorkers,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            pod: RawPod::default(),
            uplink: RawUplink::default(),
            masquerade: vec![RawMasquerade {
                source: "10.244.0.0/16".into(),
                exclude: vec!["10.244.0.0/16".into()],
            }],
            snat: Vec::new(),
            forward: Vec::new(),
            nat: RawNat::default(),
            workers: RawWorkers::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawPod {
    tap: String,
    address: String,
    netns: Option<String>,
    mtu: Int,
}

impl Default for RawPod {
    fn default() -> Self {
        RawPod {
            tap: "tapnat0".into(),
            address: "10.244.0.1/16".into(),
            netns: None,
            mtu: Int(1500),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawUplink {
    kind: String,
    tap: String,
    address: String,
    gateway: String,
    netns: Option<String>,
    mtu: Int,
}

impl Default for RawUplink {
    fn default() -> Self {
        RawUplink {
            kind: "tap".into(),
            tap: "tapnat1".into(),
            address: "203.0.113.10/24".into(),
            gateway: "203.0.113.1".into(),
            netns: None,
            mtu: Int(1500),
        }
    }
}

/// `source` has no default: a rule without one means nothing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMasquerade {
    source: String,
    #[serde(default)]
    exclude: Vec<String>,
}

/// `source` and `to` have no default: a rule without them means nothing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSnat {
    source: String,
    to: String,
    #[serde(default)]
    exclude: Vec<String>,
}

/// Every key is required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    protocol: String,
    port: PortSpec,
    to: String,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawNat {
    ports: String,
    max_flows: Int,
    filtering: String,
    icmp_errors_per_sec: Int,
    icmp_errors_burst: Int,
    fragments_max: Int,
    timeouts: RawTimeouts,
}

impl Default for RawNat {
    fn default() -> Self {
        RawNat {
            ports: "1024-65535".into(),
            max_flows: Int(262_144),
            filtering: "address".into(),
            icmp_errors_per_sec: Int(1000),
            icmp_errors_burst: Int(50),
            fragments_max: Int(1024),
            timeouts: RawTimeouts::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawTimeouts {
    tcp_established: String,
    tcp_transitory: String,
    udp: String,
    icmp: String,
    fragment: String,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            tcp_established: "7440s".into(),
            tcp_transitory: "240s".into(),
            udp: "300s".into(),
            icmp: "60s".into(),
            fragment: "2s".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawWorkers {
    threads: Int,
    busy_poll: String,
    offload: Bool,
    pin: Bool,
}

impl Default for RawWorkers {
    fn default() -> Self {
        RawWorkers {
            threads: Int(0),
            busy_poll: "0s".into(),
            offload: Bool(true),
            pin: Bool(false),
        }
    }
}

/// A boolean key. The `config` crate would take `1`, `"yes"` or `"on"` as
/// true; this accepts only booleans, and the strings `true` and `false`
/// (from the environment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bool(bool);

impl<'de> Deserialize<'de> for Bool {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Bool;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true or false")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Bool, E> {
                Ok(Bool(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Bool, E> {
                match v {
                    "true" => Ok(Bool(true)),
                    "false" => Ok(Bool(false)),
                    _ => Err(E::invalid_type(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `forward[i].port`: an integer or a `"FIRST-LAST"` string, kept as text
/// for [`port_range`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct PortSpec(String);

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a \"FIRST-LAST\" string")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortSpec, E> {
                Ok(PortSpec(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortSpec, E> {
                Ok(PortSpec(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortSpec, E> {
                Ok(PortSpec(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// An integer key. The `config` crate would round a float (`mtu = 1500.7`)
/// and turn `true` into 1; this accepts only integers, and strings that
/// parse as one (from the environment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Int(i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Int, E> {
                i64::try_from(v)
                    .map(Int)
                    .map_err(|_| E::custom(format!("integer {v} is too large")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Int, E> {
                v.trim()
                    .parse()
                    .map(Int)
                    .map_err(|_| E::invalid_type(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(Visitor)
    }
}

// ---- validation ----------------------------------------------------------

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let pod = PodConfig {
            tap: tap_name("pod.tap", self.pod.tap)?,
            address: host_address("pod.address", &self.pod.address)?,
            netns: netns("pod.netns", self.pod.netns)?,
            mtu: mtu("pod.mtu", self.pod.mtu.0)?,
        };
        let kind = match self.uplink.kind.as_str() {
            "tap" => UplinkKind::Tap,
            "raw" => {
                return Err(ConfigError::invalid(
                    "uplink.kind",
                    "\"raw\" (AF_PACKET on an existing interface) is not supported yet by this version; use \"tap\"",
                ))
            }
            other => {
                return Err(ConfigError::invalid(
                    "uplink.kind",
                    format!("unknown kind {other:?}; expected \"tap\""),
                ))
            }
        };
        let address = host_address("uplink.address", &self.uplink.address)?;
        let gateway: Ipv4Addr = self.uplink.gateway.parse().map_err(|_| {
            ConfigError::invalid(
                "uplink.gateway",
                format!("{:?} is not an IPv4 address", self.uplink.gateway),
            )
        })?;
        if !address.contains(gateway) {
            return Err(ConfigError::invalid(
                "uplink.gateway",
                format!(
                    "{gateway} is outside the uplink subnet {}",
                    net_of(&address)
                ),
            ));
        }
        if gateway == address.addr {
            return Err(ConfigError::invalid(
                "uplink.gateway",
                format!("{gateway} is the gateway's own uplink.address"),
            ));
        }
        let gw_net = Ipv4Net {
            addr: gateway,
            prefix_len: address.prefix_len,
        };
        if !gw_net.is_host_address() {
            return Err(ConfigError::invalid(
                "uplink.gateway",
                format!(
                    "{gateway} is the network or broadcast address of {}",
                    net_of(&address)
                ),
            ));
        }
        let uplink = UplinkConfig {
            kind,
            tap: tap_name("uplink.tap", self.uplink.tap)?,
            address,
            gateway,
            netns: netns("uplink.netns", self.uplink.netns)?,
            mtu: mtu("uplink.mtu", self.uplink.mtu.0)?,
        };
        if pod.address.overlaps(&uplink.address) {
            return Err(ConfigError::invalid(
                "uplink.address",
                format!(
                    "the uplink subnet {} overlaps the pod subnet {} (pod.address)",
                    net_of(&uplink.address),
                    net_of(&pod.address)
                ),
            ));
        }
        if pod.tap == uplink.tap && pod.netns == uplink.netns {
            return Err(ConfigError::invalid(
                "uplink.tap",
                format!(
                    "{:?} is also pod.tap, in the same network namespace",
                    uplink.tap
                ),
            ));
        }

        let mut masquerade = Vec::with_capacity(self.masquerade.len());
        for (i, rule) in self.masquerade.into_iter().enumerate() {
            let key = format!("masquerade[{i}].source");
            let source = cidr(&key, &rule.source)?;
            if source.contains(uplink.address.addr) {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "{source} contains the uplink address {}; translated replies would match the rule again",
                        uplink.address.addr
                    ),
                ));
            }
            let exclude = rule
                .exclude
                .iter()
                .enumerate()
                .map(|(j, s)| cidr(&format!("masquerade[{i}].exclude[{j}]"), s))
                .collect::<Result<Vec<_>, _>>()?;
            masquerade.push(MasqueradeRule { source, exclude });
        }

        let snat = snat_rules(self.snat, &uplink)?;

        let ports = port_range("nat.ports", &self.nat.ports)?;
        let max_flows = match usize::try_from(self.nat.max_flows.0) {
            Ok(n) if (1..=MAX_FLOWS_LIMIT).contains(&n) => n,
            _ => {
                return Err(ConfigError::invalid(
                    "nat.max_flows",
                    format!(
                        "{} is out of range; must be 1 to {MAX_FLOWS_LIMIT}",
                        self.nat.max_flows.0
                    ),
                ))
            }
        };
        let t = &self.nat.timeouts;
        let timeouts = Timeouts {
            tcp_established: duration("nat.timeouts.tcp_established", &t.tcp_established)?,
            tcp_transitory: duration("nat.timeouts.tcp_transitory", &t.tcp_transitory)?,
            udp: duration("nat.timeouts.udp", &t.udp)?,
            icmp: duration("nat.timeouts.icmp", &t.icmp)?,
            fragment: duration("nat.timeouts.fragment", &t.fragment)?,
        };
        let filtering = match self.nat.filtering.as_str() {
            "endpoint-independent" => Filtering::EndpointIndependent,
            "address" => Filtering::Address,
            "address-and-port" => Filtering::AddressAndPort,
            other => {
                return Err(ConfigError::invalid(
                    "nat.filtering",
                    format!(
                        "unknown filtering {other:?}; expected \"endpoint-independent\", \"address\" or \"address-and-port\""
                    ),
                ))
            }
        };
        let icmp_errors_per_sec =
            u32_key("nat.icmp_errors_per_sec", self.nat.icmp_errors_per_sec.0)?;
        let icmp_errors_burst = u32_key("nat.icmp_errors_burst", self.nat.icmp_errors_burst.0)?;
        if icmp_errors_per_sec != 0 && icmp_errors_burst == 0 {
            return Err(ConfigError::invalid(
                "nat.icmp_errors_burst",
                "0 would let no ICMP error through while nat.icmp_errors_per_sec limits the rate; \
                 use at least 1, or nat.icmp_errors_per_sec = 0 for no limit",
            ));
        }
        let fragments_max = match usize::try_from(self.nat.fragments_max.0) {
            Ok(n) if n <= MAX_FRAGMENTS_LIMIT => n,
            _ => {
                return Err(ConfigError::invalid(
                    "nat.fragments_max",
                    format!(
                        "{} is out of range; must be 0 (fragments are dropped) to {MAX_FRAGMENTS_LIMIT}",
                        self.nat.fragments_max.0
                    ),
                ))
            }
        };
        let forward = forwards(self.forward, &pod, ports)?;
        let threads = match usize::try_from(self.workers.threads.0) {
            Ok(n) if n <= MAX_THREADS => n,
            _ => {
                return Err(ConfigError::invalid(
                    "workers.threads",
                    format!(
                        "{} is out of range; must be 0 (one per core) to {MAX_THREADS}",
                        self.workers.threads.0
                    ),
                ))
            }
        };
        let busy_poll = duration_or_zero("workers.busy_poll", &self.workers.busy_poll)?;
        if busy_poll > MAX_BUSY_POLL {
            return Err(ConfigError::invalid(
                "workers.busy_poll",
                format!(
                    "{} is too long; must be at most {}",
                    format_duration(busy_poll),
                    format_duration(MAX_BUSY_POLL)
                ),
            ));
        }
        Ok(Config {
            pod,
            uplink,
            masquerade,
            snat,
            forward,
            nat: NatConfig {
                ports,
                max_flows,
                timeouts,
                filtering,
                icmp_errors_per_sec,
                icmp_errors_burst,
                fragments_max,
            },
            workers: WorkersConfig {
                threads,
                busy_poll,
                offload: self.workers.offload.0,
                pin: self.workers.pin.0,
            },
        })
    }
}

/// The `[[snat]]` list, checked against the uplink and against each other.
fn snat_rules(raw: Vec<RawSnat>, uplink: &UplinkConfig) -> Result<Vec<SnatRule>, ConfigError> {
    let mut out: Vec<SnatRule> = Vec::with_capacity(raw.len());
    for (i, rule) in raw.into_iter().enumerate() {
        let key = format!("snat[{i}].source");
        let source = cidr(&key, &rule.source)?;
        if source.contains(uplink.address.addr) {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "{source} contains the uplink address {}; translated replies would match the rule again",
                    uplink.address.addr
                ),
            ));
        }
        let key = format!("snat[{i}].to");
        let (to_first, to_last) = snat_pool(&key, &rule.to, uplink)?;
        for (j, other) in out.iter().enumerate() {
            if to_first <= other.to_last && other.to_first <= to_last {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "pool {:?} overlaps the pool of snat[{j}].to ({}-{}); an address belongs to one rule",
                        rule.to, other.to_first, other.to_last
                    ),
                ));
            }
        }
        let exclude = rule
            .exclude
            .iter()
            .enumerate()
            .map(|(j, s)| cidr(&format!("snat[{i}].exclude[{j}]"), s))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(SnatRule {
            source,
            to_first,
            to_last,
            exclude,
        });
    }
    Ok(out)
}

/// `snat[i].to`: `"A"` or `"A-B"`, at most [`MAX_SNAT_POOL`] host addresses
/// of the uplink subnet, not the uplink address or gateway.
fn snat_pool(
    key: &str,
    s: &str,
    uplink: &UplinkConfig,
) -> Result<(Ipv4Addr, Ipv4Addr), ConfigError> {
    let addr = |a: &str| -> Result<Ipv4Addr, ConfigError> {
        a.trim().parse().map_err(|_| {
            ConfigError::invalid(
                key,
                format!(
                    "{s:?}: {:?} is not an IPv4 address (write ADDRESS or FIRST-LAST)",
                    a.trim()
                ),
            )
        })
    };
    let (first, last) = match s.split_once('-') {
        Some((a, b)) => (addr(a)?, addr(b)?),
        None => {
            let a = addr(s)?;
            (a, a)
        }
    };
    if first > last {
        return Err(ConfigError::invalid(
            key,
            format!("{s:?}: first address {first} is above last address {last}"),
        ));
    }
    let count = u64::from(u32::from(last) - u32::from(first)) + 1;
    if count > u64::from(MAX_SNAT_POOL) {
        return Err(ConfigError::invalid(
            key,
            format!("{s:?} has {count} addresses; a pool has at most {MAX_SNAT_POOL}"),
        ));
    }
    let subnet = net_of(&uplink.address);
    if !subnet.contains(first) || !subnet.contains(last) {
        return Err(ConfigError::invalid(
            key,
            format!("{s:?} is outside the uplink subnet {subnet}"),
        ));
    }
    let mut reserved = vec![
        (uplink.address.addr, "the gateway's own uplink.address"),
        (uplink.gateway, "uplink.gateway"),
    ];
    // /31 has no network or broadcast address (RFC 3021).
    if subnet.prefix_len < 31 {
        reserved.push((subnet.network(), "the network address of the uplink subnet"));
        reserved.push((
            subnet.broadcast(),
            "the broadcast address of the uplink subnet",
        ));
    }
    for (a, what) in reserved {
        if (first..=last).contains(&a) {
            return Err(ConfigError::invalid(
                key,
                format!("{s:?} includes {a}, {what}"),
            ));
        }
    }
    Ok((first, last))
}

/// The `[[forward]]` list, checked against the pod subnet, `nat.ports` and
/// each other.
fn forwards(
    raw: Vec<RawForward>,
    pod: &PodConfig,
    nat_ports: PortRange,
) -> Result<Vec<Forward>, ConfigError> {
    let mut out: Vec<Forward> = Vec::with_capacity(raw.len());
    for (i, f) in raw.into_iter().enumerate() {
        let protocol = match f.protocol.as_str() {
            "tcp" => ForwardProtocol::Tcp,
            "udp" => ForwardProtocol::Udp,
            other => {
                return Err(ConfigError::invalid(
                    format!("forward[{i}].protocol"),
                    format!("unknown protocol {other:?}; expected \"tcp\" or \"udp\""),
                ))
            }
        };
        let port_key = format!("forward[{i}].port");
        let ports = port_range(&port_key, &f.port.0)?;
        if ports.overlaps(&nat_ports) {
            return Err(ConfigError::invalid(
                port_key,
                format!(
                    "{ports} overlaps nat.ports {nat_ports}; the NAT could hand a forwarded port to a \
                     translated flow. Shrink nat.ports to leave the forwarded ports out"
                ),
            ));
        }
        for (j, other) in out.iter().enumerate() {
            if other.protocol == protocol && other.ports.overlaps(&ports) {
                return Err(ConfigError::invalid(
                    port_key,
                    format!(
                        "{ports} overlaps forward[{j}].port {} of the same protocol",
                        other.ports
                    ),
                ));
            }
        }
        let to_key = format!("forward[{i}].to");
        let (to_addr, to_port) = forward_target(&to_key, &f.to, ports)?;
        let subnet = net_of(&pod.address);
        if !subnet.contains(to_addr) {
            return Err(ConfigError::invalid(
                to_key,
                format!("{to_addr} is outside the pod subnet {subnet}"),
            ));
        }
        if to_addr == pod.address.addr {
            return Err(ConfigError::invalid(
                to_key,
                format!("{to_addr} is the gateway's own pod.address"),
            ));
        }
        let host = Ipv4Net {
            addr: to_addr,
            prefix_len: subnet.prefix_len,
        };
        if !host.is_host_address() {
            return Err(ConfigError::invalid(
                to_key,
                format!("{to_addr} is the network or broadcast address of {subnet}"),
            ));
        }
        let to_last = u32::from(to_port) + u32::from(ports.last - ports.first);
        if to_last > u32::from(u16::MAX) {
            return Err(ConfigError::invalid(
                to_key,
                format!(
                    "{ports} ({} ports) from target port {to_port} would run to port {to_last}, past 65535",
                    u32::from(ports.last - ports.first) + 1
                ),
            ));
        }
        out.push(Forward {
            protocol,
            ports,
            to_addr,
            to_port,
        });
    }
    Ok(out)
}

/// `forward[i].to`: `"ADDRESS:PORT"` (the target of `ports.first`), or
/// `"ADDRESS"` to keep the same ports.
fn forward_target(key: &str, s: &str, ports: PortRange) -> Result<(Ipv4Addr, u16), ConfigError> {
    let (addr, port) = match s.split_once(':') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: Ipv4Addr = addr.parse().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("{s:?}: {addr:?} is not an IPv4 address (write ADDRESS:PORT or ADDRESS)"),
        )
    })?;
    let port = match port {
        None => ports.first,
        Some(p) => {
            let r = port_range(key, p)?;
            if r.first != r.last {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "{s:?}: give one target port, the one forward port {} maps to",
                        ports.first
                    ),
                ));
            }
            r.first
        }
    };
    Ok((addr, port))
}

fn u32_key(key: &str, value: i64) -> Result<u32, ConfigError> {
    u32::try_from(value).map_err(|_| {
        ConfigError::invalid(
            key,
            format!("{value} is out of range; must be 0 to {}", u32::MAX),
        )
    })
}

/// `net` with the host bits cleared, for messages.
fn net_of(net: &Ipv4Net) -> Ipv4Net {
    Ipv4Net {
        addr: net.network(),
        prefix_len: net.prefix_len,
    }
}

fn cidr(key: &str, s: &str) -> Result<Ipv4Net, ConfigError> {
    s.parse()
        .map_err(|e: Ipv4NetError| ConfigError::invalid(key, e.to_string()))
}

/// A CIDR whose address is a usable host address of its own prefix.
fn host_address(key: &str, s: &str) -> Result<Ipv4Net, ConfigError> {
    let net = cidr(key, s)?;
    if net.prefix_len == 0 {
        return Err(ConfigError::invalid(
            key,
            format!("{s:?}: prefix length 0 is not allowed for an interface address"),
        ));
    }
    if !net.is_host_address() {
        let which = if net.addr == net.network() {
            "network"
        } else {
            "broadcast"
        };
        return Err(ConfigError::invalid(
            key,
            format!("{s:?} is the {which} address of its subnet, not a host address"),
        ));
    }
    Ok(net)
}

fn tap_name(key: &str, name: String) -> Result<String, ConfigError> {
    let problem = if name.is_empty() {
        Some("must not be empty".to_string())
    } else if name.len() > MAX_TAP_NAME_LEN {
        Some(format!(
            "{name:?} is {} bytes; Linux interface names are at most {MAX_TAP_NAME_LEN}",
            name.len()
        ))
    } else if name == "." || name == ".." {
        Some(format!("{name:?} is not a valid interface name"))
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some(format!(
            "{name:?} contains '/', ':' or whitespace, which interface names cannot"
        ))
    } else {
        None
    };
    match problem {
        Some(p) => Err(ConfigError::invalid(key, p)),
        None => Ok(name),
    }
}

/// An empty string means "no namespace", so an environment variable can
/// clear a file's `netns`. Otherwise an absolute path: a bare `pod` is most
/// likely meant as `/run/netns/pod`, and a path relative to the working
/// directory would be a surprise.
fn netns(key: &str, raw: Option<String>) -> Result<Option<PathBuf>, ConfigError> {
    match raw.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) if Path::new(&s).is_absolute() => Ok(Some(PathBuf::from(s))),
        Some(s) => Err(ConfigError::invalid(
            key,
            format!("{s:?} is not an absolute path; write /run/netns/NAME or /proc/PID/ns/net"),
        )),
    }
}

fn mtu(key: &str, value: i64) -> Result<u16, ConfigError> {
    match u16::try_from(value) {
        Ok(v) if (MIN_MTU..=MAX_MTU).contains(&v) => Ok(v),
        _ => Err(ConfigError::invalid(
            key,
            format!("{value} is out of range; must be {MIN_MTU} to {MAX_MTU}"),
        )),
    }
}

fn port_range(key: &str, s: &str) -> Result<PortRange, ConfigError> {
    let port = |p: &str| -> Result<u16, ConfigError> {
        match p.trim().parse::<u16>() {
            Ok(0) => Err(ConfigError::invalid(
                key,
                format!("{s:?}: port 0 is not allowed"),
            )),
            Ok(n) => Ok(n),
            Err(_) => Err(ConfigError::invalid(
                key,
                format!("{s:?}: {:?} is not a port number 1 to 65535", p.trim()),
            )),
        }
    };
    let (first, last) = match s.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(s)?;
            (p, p)
        }
    };
    if first > last {
        return Err(ConfigError::invalid(
            key,
            format!("{s:?}: first port {first} is above last port {last}"),
        ));
    }
    Ok(PortRange { first, last })
}

/// A duration above zero.
fn duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    let d = duration_or_zero(key, s)?;
    if d.is_zero() {
        return Err(ConfigError::invalid(
            key,
            format!("duration {s:?} must be above zero"),
        ));
    }
    Ok(d)
}

/// A duration that may be zero (`"0s"`).
fn duration_or_zero(key: &str, s: &str) -> Result<Duration, ConfigError> {
    parse_duration(s).map_err(|p| {
        ConfigError::invalid(
            key,
            format!(
                "invalid duration {s:?}: {p} (write e.g. \"300s\", \"5m\", \"2h4m\", \"1500ms\")"
            ),
        )
    })
}

/// Parse `2h4m`, `300s`, `1500ms`, `50us`: numbers each followed by a unit
/// (h, m, s, ms, us), units in decreasing order, each at most once.
fn parse_duration(s: &str) -> Result<Duration, &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut last_rank = u8::MAX;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err("expected a number");
        }
        let n: u64 = rest[..digits].parse().map_err(|_| "number too large")?;
        rest = &rest[digits..];
        let (unit, rank, len) = if rest.starts_with("us") {
            (Duration::from_micros(1), 0, 2)
        } else if rest.starts_with("ms") {
            (Duration::from_millis(1), 1, 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 2, 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 3, 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 4, 1)
        } else if rest.is_empty() {
            return Err("missing unit (us, ms, s, m or h)");
        } else {
            return Err("unknown unit; use us, ms, s, m or h");
        };
        if rank >= last_rank {
            return Err("units must go from largest to smallest, each once");
        }
        last_rank = rank;
        rest = &rest[len..];
        let part = u32::try_from(n)
            .ok()
            .and_then(|n| unit.checked_mul(n))
            .ok_or("too large")?;
        total = total.checked_add(part).ok_or("too large")?;
    }
    Ok(total)
}

/// `7440s` -> `2h4m`, for messages.
fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() % 1_000_000 != 0 {
        return format!("{}us", d.as_micros());
    }
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    let mut out = String::new();
    for (n, unit) in [(s / 3600, "h"), (s % 3600 / 60, "m"), (s % 60, "s")] {
        if n != 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn expected_default() -> Config {
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
                address: net("203.0.113.10/24"),
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
                busy_poll: Duration::ZERO,
                offload: true,
                pin: false,
            },
        }
    }

    /// `nat.ports` shrunk so that forwards below 10000 are allowed.
    const FWD: &str = "[nat]\nports = \"10000-65535\"\n";

    /// The error message for a config with `FWD` and one `[[forward]]`.
    fn fwd_err(protocol: &str, port: &str, to: &str) -> String {
        err(&format!(
            "{FWD}[[forward]]\nprotocol = \"{protocol}\"\nport = {port}\nto = \"{to}\"\n"
        ))
    }

    /// The error message for a config with one `[[snat]]`.
    fn snat_err(source: &str, to: &str) -> String {
        err(&format!("[[snat]]\nsource = \"{source}\"\nto = \"{to}\"\n"))
    }

    /// The error message for `toml`, which must fail.
    fn err(toml: &str) -> String {
        match Config::from_toml_str(toml) {
            Ok(c) => panic!("accepted {toml:?} as {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn env_err(env: &[(&str, &str)]) -> String {
        match Config::load_with_env(None, env) {
            Ok(c) => panic!("accepted {env:?} as {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[track_caller]
    fn assert_mentions(msg: &str, parts: &[&str]) {
        for p in parts {
            assert!(msg.contains(p), "{msg:?} does not mention {p:?}");
        }
    }

    // ---- accepted configurations ----

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
    fn serde_defaults_equal_embedded_default() {
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
    fn empty_masquerade_list_is_allowed_with_warning() {
        let c = Config::from_toml_str("masquerade = []\n").unwrap();
        assert!(c.masquerade.is_empty());
        let w = c.warnings().join("\n");
        assert_mentions(&w, &["masquerade", "no masquerade rule"]);
    }

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
    fn durations_accepted() {
        for (s, want) in [
            ("300s", Duration::from_secs(300)),
            ("5m", Duration::from_secs(300)),
            ("2h4m", Duration::from_secs(7440)),
            ("1500ms", Duration::from_millis(1500)),
            ("2h", Duration::from_secs(7200)),
            ("1h2m3s4ms", Duration::from_millis(3_723_004)),
        ] {
            assert_eq!(parse_duration(s), Ok(want), "{s}");
        }
        assert_eq!(format_duration(Duration::from_secs(7440)), "2h4m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(parse_duration("50us"), Ok(Duration::from_micros(50)));
        assert_eq!(parse_duration("1ms500us"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(format_duration(Duration::from_micros(1500)), "1500us");
        assert_eq!(format_duration(Duration::ZERO), "0ms");
        assert!(parse_duration("5us1ms").is_err());
    }

    #[test]
    fn new_nat_and_workers_keys_from_file() {
        let c = Config::from_toml_str(
            "[nat]\nfiltering = \"endpoint-independent\"\nicmp_errors_per_sec = 0\nicmp_errors_burst = 0\nfragments_max = 0\n[nat.timeouts]\nfragment = \"15s\"\n[workers]\nbusy_poll = \"1s\"\noffload = false\npin = true\n",
        )
        .unwrap();
        let mut want = expected_default();
        want.nat.filtering = Filtering::EndpointIndependent;
        want.nat.icmp_errors_per_sec = 0;
        want.nat.icmp_errors_burst = 0;
        want.nat.fragments_max = 0;
        want.nat.timeouts.fragment = Duration::from_secs(15);
        want.workers.busy_poll = Duration::from_secs(1);
        want.workers.offload = false;
        want.workers.pin = true;
        assert_eq!(c, want);
        assert!(c.warnings().is_empty());
        let c = Config::from_toml_str(
            "[nat]\nfiltering = \"address-and-port\"\nicmp_errors_per_sec = 4294967295\n[workers]\nbusy_poll = \"50us\"\n",
        )
        .unwrap();
        assert_eq!(c.nat.filtering, Filtering::AddressAndPort);
        assert_eq!(c.nat.icmp_errors_per_sec, u32::MAX);
        assert_eq!(c.workers.busy_poll, Duration::from_micros(50));
    }

    #[test]
    fn forwards_parse() {
        let c = Config::from_toml_str(&format!(
            "{FWD}[[forward]]\nprotocol = \"tcp\"\nport = 8080\nto = \"10.244.0.2:80\"\n\
             [[forward]]\nprotocol = \"udp\"\nport = \"8000-8099\"\nto = \"10.244.3.4\"\n\
             [[forward]]\nprotocol = \"tcp\"\nport = \"8000-8079\"\nto = \"10.244.0.3:65456\"\n\
             [[forward]]\nprotocol = \"udp\"\nport = \"9999\"\nto = \"10.244.0.3:53\"\n"
        ))
        .unwrap();
        let range = |first, last| PortRange { first, last };
        assert_eq!(
            c.forward,
            vec![
                Forward {
                    protocol: ForwardProtocol::Tcp,
                    ports: range(8080, 8080),
                    to_addr: Ipv4Addr::new(10, 244, 0, 2),
                    to_port: 80,
                },
                Forward {
                    protocol: ForwardProtocol::Udp,
                    ports: range(8000, 8099),
                    to_addr: Ipv4Addr::new(10, 244, 3, 4),
                    to_port: 8000,
                },
                Forward {
                    protocol: ForwardProtocol::Tcp,
                    ports: range(8000, 8079),
                    to_addr: Ipv4Addr::new(10, 244, 0, 3),
                    to_port: 65456,
                },
                Forward {
                    protocol: ForwardProtocol::Udp,
                    ports: range(9999, 9999),
                    to_addr: Ipv4Addr::new(10, 244, 0, 3),
                    to_port: 53,
                },
            ]
        );
        assert_eq!(c.forward[1].ports.to_string(), "8000-8099");
        assert!(c.forward[1].ports.contains(8099));
        assert!(!c.forward[1].ports.contains(8100));
        assert!(c.warnings().is_empty());
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
        assert_eq!(c.masquerade, expected_default().masquerade);
        assert!(c.warnings().is_empty());
        // A full 256-address pool on a wider uplink.
        let c = Config::from_toml_str(
            "[uplink]\naddress = \"198.51.100.10/22\"\ngateway = \"198.51.100.1\"\n[[snat]]\nsource = \"10.244.0.0/16\"\nto = \"198.51.101.0-198.51.101.255\"\n",
        )
        .unwrap();
        assert_eq!(c.snat[0].to_last, Ipv4Addr::new(198, 51, 101, 255));
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
    fn every_env_key_is_settable() {
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
            ("nat.icmp_errors_per_sec", "0"),
            ("nat.icmp_errors_burst", "7"),
            ("nat.fragments_max", "0"),
            ("workers.threads", "3"),
            ("workers.offload", "false"),
            ("workers.pin", "true"),
        ];
        assert_eq!(
            vals.len(),
            ENV_STRING_KEYS.len() + ENV_NUMBER_KEYS.len() + ENV_BOOL_KEYS.len()
        );
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
        assert_ne!(c.workers, d.workers);
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
                pin: true,
            }
        );
    }

    #[test]
    fn env_bools_are_exactly_true_or_false() {
        for bad in ["TRUE", "1", "yes", "on", ""] {
            let msg = env_err(&[("TAPNAT_WORKERS__PIN", bad)]);
            assert_mentions(&msg, &["workers.pin", "true or false"]);
        }
        let c = Config::load_with_env(None, &[("TAPNAT_WORKERS__OFFLOAD", "false")]).unwrap();
        assert!(!c.workers.offload);
    }

    #[test]
    fn rejects_unknown_env_key() {
        let msg = env_err(&[("TAPNAT_POD__TAPP", "x")]);
        assert_mentions(&msg, &["TAPNAT_POD__TAPP", "pod.tapp"]);
        let msg = env_err(&[("TAPNAT_BOGUS", "1")]);
        assert_mentions(&msg, &["TAPNAT_BOGUS", "bogus"]);
    }

    #[test]
    fn rejects_bad_env_number() {
        let msg = env_err(&[("TAPNAT_WORKERS__THREADS", "many")]);
        assert_mentions(&msg, &["workers.threads", "many"]);
    }

    #[test]
    fn rejects_bad_env_value() {
        let msg = env_err(&[("TAPNAT_NAT__TIMEOUTS__UDP", "300")]);
        assert_mentions(&msg, &["nat.timeouts.udp", "missing unit"]);
    }

    // ---- shape errors ----

    #[test]
    fn rejects_forward_and_snat_missing_keys() {
        let msg = err("[[forward]]\nprotocol = \"tcp\"\nport = 80\n");
        assert_mentions(&msg, &["forward[0].to", "missing"]);
        let msg = err("[[snat]]\nsource = \"10.244.0.0/16\"\n");
        assert_mentions(&msg, &["snat[0].to", "missing"]);
        let msg = err("[[snat]]\nsource = \"10.244.0.0/16\"\nto = \"203.0.113.20\"\nexclud = []\n");
        assert_mentions(&msg, &["snat[0].exclud", "unknown key"]);
    }

    #[test]
    fn rejects_non_boolean() {
        for bad in ["1", "\"yes\"", "\"TRUE\""] {
            let msg = err(&format!("[workers]\noffload = {bad}\n"));
            assert_mentions(
                &msg,
                &["`workers.offload`", "invalid type", "true or false"],
            );
        }
    }

    #[test]
    fn rejects_bad_forward_port_type() {
        let msg = err(&format!(
            "{FWD}[[forward]]\nprotocol = \"tcp\"\nport = 80.5\nto = \"10.244.0.2\"\n"
        ));
        assert_mentions(&msg, &["forward[0].port", "invalid type"]);
    }

    #[test]
    fn rejects_bad_toml_syntax() {
        let msg = err("[pod\ntap = 1");
        assert_mentions(&msg, &["TOML"]);
    }

    #[test]
    fn rejects_unknown_top_level_key() {
        let msg = err("bogus = 1\n");
        assert_mentions(&msg, &["`bogus`", "unknown key"]);
    }

    #[test]
    fn rejects_unknown_nested_key() {
        let msg = err("[pod]\ntapp = \"x\"\n");
        assert_mentions(&msg, &["`pod.tapp`", "unknown key"]);
        let msg = err("[nat.timeouts]\ntcp = \"5s\"\n");
        assert_mentions(&msg, &["`nat.timeouts.tcp`", "unknown key"]);
        let msg = err("[[masquerade]]\nsource = \"10.244.0.0/16\"\nexclud = []\n");
        assert_mentions(&msg, &["masquerade[0].exclud", "unknown key"]);
    }

    #[test]
    fn rejects_wrong_type() {
        let msg = err("[pod]\nmtu = \"big\"\n");
        assert_mentions(&msg, &["`pod.mtu`", "invalid type"]);
        let msg = err("pod = 5\n");
        assert_mentions(&msg, &["pod", "invalid type"]);
        let msg = err("[[masquerade]]\nsource = \"10.244.0.0/16\"\nexclude = \"10.0.0.0/8\"\n");
        assert_mentions(&msg, &["masquerade[0].exclude", "invalid type"]);
    }

    #[test]
    fn rejects_non_integer_numbers() {
        for bad in ["1500.5", "true", "\"1500x\""] {
            let msg = err(&format!("[pod]\nmtu = {bad}\n"));
            assert_mentions(&msg, &["`pod.mtu`", "invalid type", "integer"]);
        }
        let msg = err("pod = 5\n");
        assert_mentions(&msg, &["`pod`", "expected a table"]);
    }

    #[test]
    fn rejects_relative_netns() {
        let msg = err("[uplink]\nnetns = \"ext\"\n");
        assert_mentions(&msg, &["uplink.netns", "absolute path"]);
    }

    #[test]
    fn rejects_masquerade_without_source() {
        let msg = err("[[masquerade]]\nexclude = []\n");
        assert_mentions(&msg, &["masquerade[0].source", "missing"]);
    }

    // ---- validation errors ----

    #[test]
    fn rejects_cidr_prefix_33() {
        let msg = err("[pod]\naddress = \"10.244.0.1/33\"\n");
        assert_eq!(
            msg,
            "config key `pod.address`: invalid CIDR \"10.244.0.1/33\": prefix length must be 0 to 32"
        );
    }

    #[test]
    fn rejects_cidr_garbage() {
        let msg = err("[uplink]\naddress = \"garbage\"\n");
        assert_mentions(&msg, &["uplink.address", "invalid CIDR", "garbage"]);
        let msg = err(
            "[[masquerade]]\nsource = \"10.244.0.0/16\"\nexclude = [\"10.0.0.0/8\", \"nope\"]\n",
        );
        assert_mentions(&msg, &["masquerade[0].exclude[1]", "nope"]);
    }

    #[test]
    fn rejects_network_and_broadcast_as_address() {
        let msg = err("[pod]\naddress = \"10.244.0.0/16\"\n");
        assert_mentions(&msg, &["pod.address", "network address"]);
        let msg = err("[pod]\naddress = \"10.244.255.255/16\"\n");
        assert_mentions(&msg, &["pod.address", "broadcast address"]);
        let msg = err("[pod]\naddress = \"10.244.0.1/0\"\n");
        assert_mentions(&msg, &["pod.address", "prefix length 0"]);
        // /31 has no network or broadcast address (RFC 3021).
        let c = Config::from_toml_str(
            "[uplink]\naddress = \"203.0.113.0/31\"\ngateway = \"203.0.113.1\"\n",
        )
        .unwrap();
        assert_eq!(c.uplink.address, net("203.0.113.0/31"));
    }

    #[test]
    fn rejects_bad_durations() {
        for bad in [
            "", "5", "-1s", "5x", "0s", "0h0m", "5s2m", "1m1m", "s", "1.5s", " 5s",
        ] {
            let msg = err(&format!("[nat.timeouts]\nicmp = \"{bad}\"\n"));
            assert_mentions(&msg, &["nat.timeouts.icmp", "duration"]);
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
            let msg = err(&format!("[nat]\nports = \"{bad}\"\n"));
            assert_mentions(&msg, &["nat.ports"]);
        }
    }

    #[test]
    fn rejects_gateway_outside_subnet() {
        let msg = err("[uplink]\ngateway = \"198.51.100.1\"\n");
        assert_mentions(&msg, &["uplink.gateway", "outside", "203.0.113.0/24"]);
    }

    #[test]
    fn rejects_gateway_equal_to_address() {
        let msg = err("[uplink]\ngateway = \"203.0.113.10\"\n");
        assert_mentions(&msg, &["uplink.gateway", "own"]);
        let msg = err("[uplink]\ngateway = \"203.0.113.255\"\n");
        assert_mentions(&msg, &["uplink.gateway", "broadcast"]);
        let msg = err("[uplink]\ngateway = \"nope\"\n");
        assert_mentions(&msg, &["uplink.gateway", "not an IPv4 address"]);
    }

    #[test]
    fn rejects_overlapping_subnets() {
        let msg = err("[uplink]\naddress = \"10.244.7.1/24\"\ngateway = \"10.244.7.254\"\n");
        assert_mentions(&msg, &["uplink.address", "overlaps", "10.244.0.0/16"]);
    }

    #[test]
    fn rejects_raw_kind() {
        let msg = err("[uplink]\nkind = \"raw\"\n");
        assert_mentions(&msg, &["uplink.kind", "not supported yet"]);
        let msg = err("[uplink]\nkind = \"tun\"\n");
        assert_mentions(&msg, &["uplink.kind", "tun"]);
    }

    #[test]
    fn rejects_bad_mtu() {
        for bad in ["575", "9001", "-1", "70000"] {
            let msg = err(&format!("[uplink]\nmtu = {bad}\n"));
            assert_mentions(&msg, &["uplink.mtu", "576 to 9000"]);
        }
    }

    #[test]
    fn rejects_bad_tap_name() {
        for bad in ["", "a/b", "a b", "a:1", "sixteen-bytes-xx", "..", "tab\t"] {
            let msg = err(&format!("[pod]\ntap = \"{bad}\"\n"));
            assert_mentions(&msg, &["pod.tap"]);
        }
        assert!(Config::from_toml_str("[pod]\ntap = \"fifteen-bytes-x\"\n").is_ok());
    }

    #[test]
    fn rejects_same_tap_in_same_netns() {
        let msg = err("[pod]\ntap = \"t\"\n[uplink]\ntap = \"t\"\n");
        assert_mentions(&msg, &["uplink.tap", "pod.tap"]);
    }

    #[test]
    fn rejects_threads_too_large() {
        let msg = err("[workers]\nthreads = 257\n");
        assert_mentions(&msg, &["workers.threads", "256"]);
        let msg = err("[workers]\nthreads = -1\n");
        assert_mentions(&msg, &["workers.threads"]);
    }

    #[test]
    fn rejects_bad_max_flows() {
        for bad in ["0", "100000001", "-5"] {
            let msg = err(&format!("[nat]\nmax_flows = {bad}\n"));
            assert_mentions(&msg, &["nat.max_flows"]);
        }
    }

    #[test]
    fn rejects_masquerade_source_containing_uplink() {
        let msg = err("[[masquerade]]\nsource = \"0.0.0.0/0\"\nexclude = [\"10.244.0.0/16\"]\n");
        assert_mentions(&msg, &["masquerade[0].source", "203.0.113.10"]);
    }

    #[test]
    fn rejects_bad_filtering() {
        for bad in ["", "endpoint_independent", "Address", "port"] {
            let msg = err(&format!("[nat]\nfiltering = \"{bad}\"\n"));
            assert_mentions(&msg, &["nat.filtering", "address-and-port"]);
        }
        let msg = env_err(&[("TAPNAT_NAT__FILTERING", "none")]);
        assert_mentions(&msg, &["nat.filtering", "none"]);
    }

    #[test]
    fn rejects_bad_icmp_error_limits() {
        for key in ["icmp_errors_per_sec", "icmp_errors_burst"] {
            for bad in ["-1", "4294967296"] {
                let msg = err(&format!("[nat]\n{key} = {bad}\n"));
                assert_mentions(&msg, &[&format!("nat.{key}"), "0 to 4294967295"]);
            }
        }
        let msg = err("[nat]\nicmp_errors_burst = 0\n");
        assert_mentions(&msg, &["nat.icmp_errors_burst", "nat.icmp_errors_per_sec"]);
    }

    #[test]
    fn rejects_bad_fragments_max() {
        for bad in ["-1", "1000001"] {
            let msg = err(&format!("[nat]\nfragments_max = {bad}\n"));
            assert_mentions(&msg, &["nat.fragments_max", "1000000"]);
        }
    }

    #[test]
    fn rejects_bad_fragment_timeout() {
        for bad in ["0s", "2", ""] {
            let msg = err(&format!("[nat.timeouts]\nfragment = \"{bad}\"\n"));
            assert_mentions(&msg, &["nat.timeouts.fragment", "duration"]);
        }
    }

    #[test]
    fn rejects_bad_busy_poll() {
        for bad in ["1s1us", "2s", "1m"] {
            let msg = err(&format!("[workers]\nbusy_poll = \"{bad}\"\n"));
            assert_mentions(&msg, &["workers.busy_poll", "at most 1s"]);
        }
        for bad in ["0", "-1s", "5x"] {
            let msg = err(&format!("[workers]\nbusy_poll = \"{bad}\"\n"));
            assert_mentions(&msg, &["workers.busy_poll", "invalid duration"]);
        }
    }

    #[test]
    fn rejects_bad_forward_protocol() {
        let msg = fwd_err("icmp", "80", "10.244.0.2");
        assert_mentions(&msg, &["forward[0].protocol", "icmp"]);
        let msg = fwd_err("TCP", "80", "10.244.0.2");
        assert_mentions(&msg, &["forward[0].protocol", "\"tcp\""]);
    }

    #[test]
    fn rejects_bad_forward_port() {
        for bad in ["0", "70000", "-5", "\"9000-8000\"", "\"a\"", "\"\""] {
            let msg = fwd_err("tcp", bad, "10.244.0.2");
            assert_mentions(&msg, &["forward[0].port"]);
        }
    }

    #[test]
    fn rejects_bad_forward_target() {
        for bad in [
            "nope",
            "10.244.0.2:",
            "10.244.0.2:0",
            "10.244.0.2:x",
            "10.244.0.2:80-90",
            ":80",
        ] {
            let msg = fwd_err("tcp", "80", bad);
            assert_mentions(&msg, &["forward[0].to"]);
        }
    }

    #[test]
    fn rejects_forward_target_outside_pod_subnet() {
        let msg = fwd_err("tcp", "80", "10.245.0.2:80");
        assert_mentions(
            &msg,
            &["forward[0].to", "outside the pod subnet", "10.244.0.0/16"],
        );
        let msg = fwd_err("tcp", "80", "203.0.113.10:80");
        assert_mentions(&msg, &["forward[0].to", "outside the pod subnet"]);
    }

    #[test]
    fn rejects_forward_to_gateway_pod_address() {
        let msg = fwd_err("udp", "53", "10.244.0.1:53");
        assert_mentions(&msg, &["forward[0].to", "pod.address"]);
        let msg = fwd_err("udp", "53", "10.244.255.255");
        assert_mentions(&msg, &["forward[0].to", "broadcast"]);
        let msg = fwd_err("udp", "53", "10.244.0.0");
        assert_mentions(&msg, &["forward[0].to", "network"]);
    }

    #[test]
    fn rejects_forward_target_range_past_65535() {
        let msg = fwd_err("tcp", "\"8000-8099\"", "10.244.0.2:65500");
        assert_mentions(&msg, &["forward[0].to", "65535", "65599"]);
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
                "{FWD}[[forward]]\nprotocol = \"tcp\"\nport = {p1}\nto = \"10.244.0.2\"\n\
                 [[forward]]\nprotocol = \"{proto2}\"\nport = {p2}\nto = \"10.244.0.3\"\n"
            ))
        };
        let msg = two("\"8000-8099\"", "8099", "tcp").unwrap_err().to_string();
        assert_mentions(&msg, &["forward[1].port", "forward[0].port", "8000-8099"]);
        let msg = two("443", "443", "tcp").unwrap_err().to_string();
        assert_mentions(&msg, &["forward[1].port", "forward[0].port"]);
        // Different protocols may share a port; adjacent ranges are fine.
        assert!(two("443", "443", "udp").is_ok());
        assert!(two("\"8000-8099\"", "\"8100-8199\"", "tcp").is_ok());
    }

    #[test]
    fn rejects_forward_inside_nat_ports() {
        let msg = err("[[forward]]\nprotocol = \"tcp\"\nport = 8080\nto = \"10.244.0.2:80\"\n");
        assert_mentions(&msg, &["forward[0].port", "nat.ports", "1024-65535"]);
        let msg = fwd_err("udp", "\"9990-10000\"", "10.244.0.2");
        assert_mentions(&msg, &["forward[0].port", "nat.ports", "10000-65535"]);
    }

    #[test]
    fn rejects_bad_snat_source() {
        let msg = snat_err("10.244.1.0/33", "203.0.113.20");
        assert_mentions(&msg, &["snat[0].source", "invalid CIDR"]);
        let msg = snat_err("0.0.0.0/0", "203.0.113.20");
        assert_mentions(&msg, &["snat[0].source", "203.0.113.10"]);
        let msg = err(
            "[[snat]]\nsource = \"10.244.1.0/24\"\nto = \"203.0.113.20\"\nexclude = [\"nope\"]\n",
        );
        assert_mentions(&msg, &["snat[0].exclude[0]", "nope"]);
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
            let msg = snat_err("10.244.1.0/24", bad);
            assert_mentions(&msg, &["snat[0].to", "not an IPv4 address"]);
        }
    }

    #[test]
    fn rejects_unordered_snat_pool() {
        let msg = snat_err("10.244.1.0/24", "203.0.113.29-203.0.113.20");
        assert_mentions(&msg, &["snat[0].to", "above"]);
    }

    #[test]
    fn rejects_snat_pool_over_256() {
        let msg = err(
            "[uplink]\naddress = \"198.51.100.10/22\"\ngateway = \"198.51.100.1\"\n[[snat]]\nsource = \"10.244.0.0/16\"\nto = \"198.51.101.0-198.51.102.0\"\n",
        );
        assert_mentions(&msg, &["snat[0].to", "257 addresses", "256"]);
    }

    #[test]
    fn rejects_snat_pool_outside_uplink_subnet() {
        let msg = snat_err("10.244.1.0/24", "198.51.100.7");
        assert_mentions(&msg, &["snat[0].to", "outside", "203.0.113.0/24"]);
        let msg = snat_err("10.244.1.0/24", "203.0.113.250-203.0.114.3");
        assert_mentions(&msg, &["snat[0].to", "outside"]);
    }

    #[test]
    fn rejects_snat_pool_with_reserved_address() {
        for (pool, what) in [
            ("203.0.113.5-203.0.113.15", "uplink.address"),
            ("203.0.113.10", "uplink.address"),
            ("203.0.113.1-203.0.113.4", "uplink.gateway"),
            ("203.0.113.0", "network address"),
            ("203.0.113.250-203.0.113.255", "broadcast address"),
        ] {
            let msg = snat_err("10.244.1.0/24", pool);
            assert_mentions(&msg, &["snat[0].to", what]);
        }
    }

    #[test]
    fn rejects_overlapping_snat_pools() {
        let msg = err(
            "[[snat]]\nsource = \"10.244.1.0/24\"\nto = \"203.0.113.20-203.0.113.29\"\n\
             [[snat]]\nsource = \"10.244.2.0/24\"\nto = \"203.0.113.29-203.0.113.40\"\n",
        );
        assert_mentions(
            &msg,
            &["snat[1].to", "snat[0].to", "203.0.113.20-203.0.113.29"],
        );
    }

    #[test]
    fn rejects_unreadable_file() {
        let e =
            Config::load_with_env(Some(Path::new("/nonexistent/tapnat.toml")), &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert_mentions(&e.to_string(), &["/nonexistent/tapnat.toml"]);
    }

    // ---- warnings ----

    #[test]
    fn warns_udp_below_rfc_4787() {
        let c = Config::from_toml_str("[nat.timeouts]\nudp = \"5s\"\n").unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_mentions(&w[0], &["udp", "RFC 4787"]);
    }

    #[test]
    fn warns_stray_snat_rule_and_not_for_snat_only() {
        let c = Config::from_toml_str(
            "masquerade = []\n[[snat]]\nsource = \"192.168.0.0/16\"\nto = \"203.0.113.20\"\n",
        )
        .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_mentions(&w[0], &["snat[0].source", "matches no pod traffic"]);
    }

    #[test]
    fn warns_other_timeouts_and_stray_rule() {
        let c = Config::from_toml_str(
            "[nat.timeouts]\ntcp_established = \"1h\"\ntcp_transitory = \"1m\"\nicmp = \"10s\"\n[[masquerade]]\nsource = \"192.168.0.0/16\"\n",
        )
        .unwrap();
        let w = c.warnings().join("\n");
        assert_mentions(
            &w,
            &[
                "tcp_established",
                "tcp_transitory",
                "icmp",
                "RFC 5382",
                "RFC 5508",
                "masquerade[0].source",
            ],
        );
    }
}
