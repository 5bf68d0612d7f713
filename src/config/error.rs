//! What can be wrong with a configuration: [`ConfigError`] names the key,
//! [`Reason`] says why, as a value that tests and callers can match.
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use crate::net::{Ipv4Net, Ipv4NetError, PortRange, PortRangeError};

use super::values::format_duration;

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
    /// A key (`pod.mtu`, `forward[1].to`) is unknown, missing, has the wrong
    /// type or a value that is not acceptable.
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: Reason },
    /// A `TAPNAT_` environment variable names no key that can be set from
    /// the environment (an unknown key, a table or a list).
    #[error("environment variable `{var}`: `{key}` is not a config key that can be set from the environment")]
    UnknownEnv { var: String, key: String },
}

/// `map_err(at(key))`: attach the key a [`Reason`] is about.
pub(super) fn at(key: impl Into<String>) -> impl FnOnce(Reason) -> ConfigError {
    let key = key.into();
    move |reason| ConfigError::Invalid { key, reason }
}

/// Why a key's value is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    // ---- shape: the TOML does not fit the keys ----
    /// No such key here; `known` are the keys this table has.
    #[error("unknown key; expected one of {}", list(known))]
    UnknownKey { known: Vec<&'static str> },
    /// A key without a default (in a `[[masquerade]]`, `[[snat]]` or
    /// `[[forward]]` entry) is not given.
    #[error("missing; this key has no default")]
    Missing,
    /// The value is of another TOML type; `found` describes it (and names
    /// the environment variable it came from).
    #[error("invalid type: expected {expected}, found {found}")]
    WrongType { expected: Kind, found: String },

    // ---- a value that is not what it should be ----
    /// Not a CIDR.
    #[error(transparent)]
    BadCidr(Ipv4NetError),
    /// Not a port or port range.
    #[error(transparent)]
    BadPorts(PortRangeError),
    /// `part` of `input` is not an IPv4 address.
    #[error("{input:?}: {part:?} is not an IPv4 address (write {form})")]
    BadAddress {
        input: String,
        part: String,
        form: AddressForm,
    },
    /// Not a duration.
    #[error(
        "invalid duration {input:?}: {problem} (write e.g. \"300s\", \"5m\", \"2h4m\", \"1500ms\")"
    )]
    BadDuration {
        input: String,
        problem: DurationProblem,
    },
    /// A duration that must be above zero is zero.
    #[error("duration {input:?} must be above zero")]
    ZeroDuration { input: String },
    /// A duration above its limit.
    #[error("{} is too long; must be at most {}", format_duration(*value), format_duration(*max))]
    TooLong { value: Duration, max: Duration },
    /// An integer outside `min..=max`; `zero_means` explains a 0 minimum.
    #[error("{value} is out of range; must be {min}{} to {max}", zero_means.map(|z| format!(" ({z})")).unwrap_or_default())]
    OutOfRange {
        value: i64,
        min: i64,
        max: i64,
        zero_means: Option<&'static str>,
    },
    /// Not one of the words this key takes.
    #[error("unknown value {value:?}; expected {}", alternatives(expected))]
    UnknownValue {
        value: String,
        expected: &'static [&'static str],
    },
    /// A SNAT pool while `uplink.address = "dhcp"`: the pool must lie in the
    /// uplink subnet, which only a lease names.
    #[error("a SNAT pool needs a fixed uplink.address (its subnet); with uplink.address = \"dhcp\" use [[masquerade]]")]
    PoolWithDhcp,
    /// `uplink.kind = "raw"` without `uplink.interface`.
    #[error("missing; uplink.kind = \"raw\" needs the name of an existing interface (e.g. interface = \"eth1\")")]
    RawNeedsInterface,
    /// `uplink.interface` with `uplink.kind = "tap"`.
    #[error("{name:?} is only used with uplink.kind = \"raw\"; remove it, or set kind = \"raw\"")]
    InterfaceWithTap { name: String },
    /// The raw uplink's interface does not exist (checked when the gateway
    /// starts, before any device is touched).
    #[error("no interface {name:?} in {netns}; create it, or name an existing one")]
    NoSuchInterface { name: String, netns: String },
    /// The raw uplink's interface carries a kernel IPv4 address, so the
    /// kernel and tapnat would both answer on it.
    #[error("{name:?} has the kernel IPv4 address {addr}: the kernel and tapnat would both answer ARP and traffic on it; remove it with `{fix}`")]
    InterfaceHasAddress {
        name: String,
        addr: std::net::Ipv4Addr,
        /// The command that removes it (`ip [-n NS] addr flush dev NAME`).
        fix: String,
    },
    /// The raw uplink's interface could not be used (a socket or ioctl failed).
    #[error("cannot use interface {name:?}: {problem}")]
    InterfaceUnusable { name: String, problem: String },
    /// Not a usable Linux interface name.
    #[error("{name:?} {problem}")]
    BadTapName { name: String, problem: NameProblem },
    /// A namespace path that is not absolute.
    #[error("{path:?} is not an absolute path; write /run/netns/NAME or /proc/PID/ns/net")]
    RelativeNetns { path: String },
    /// A socket path that is not absolute.
    #[error("{path:?} is not an absolute path")]
    RelativePath { path: String },
    /// Not a user or group name (empty, or with `:`, `/` or whitespace).
    #[error("{name:?} is not a group name")]
    BadGroupName { name: String },
    /// Not a user name (with `:`, `/` or whitespace).
    #[error("{name:?} is not a user name")]
    BadUserName { name: String },
    /// No user of that name in the system's user database.
    #[error("no user {name:?} on this system")]
    NoSuchUser { name: String },
    /// A file the gateway writes (the mapping log) that cannot be opened.
    #[error("cannot open {path:?} for appending: {error}")]
    CannotOpen { path: String, error: String },
    /// No group of that name in the system's group database.
    #[error("no group {name:?} on this system")]
    NoSuchGroup { name: String },
    /// Not `ADDRESS:PORT`.
    #[error("{input:?} is not an IPv4 ADDRESS:PORT (write e.g. \"127.0.0.1:9469\")")]
    BadListen { input: String },
    /// An interface address with prefix length 0.
    #[error("prefix length 0 is not allowed for an interface address")]
    ZeroPrefix,
    /// The network or broadcast address of `subnet`, where a host is needed.
    #[error("{addr} is the {} address of {subnet}, not a host address", if *addr == subnet.network() { "network" } else { "broadcast" })]
    NotHost { addr: Ipv4Addr, subnet: Ipv4Net },
    /// `value` (an address or a pool) lies outside the `side` subnet.
    #[error("{value} is outside the {side} subnet {subnet}")]
    OutsideSubnet {
        value: String,
        side: Side,
        subnet: Ipv4Net,
    },
    /// The gateway's own `pod.address` or `uplink.address`.
    #[error("{addr} is the gateway's own {side}.address")]
    OwnAddress { addr: Ipv4Addr, side: Side },
    /// `value` shares addresses or ports with `other`, the value of `with`.
    #[error("{value} overlaps {with} {other}{}", with.note())]
    Overlaps {
        value: String,
        with: Overlap,
        other: String,
    },
    /// `uplink.tap` equals `pod.tap` in the same namespace.
    #[error("{name:?} is also pod.tap, in the same network namespace")]
    SameTap { name: String },
    /// A rule's `source` contains the uplink address.
    #[error(
        "{net} contains the uplink address {uplink}; translated replies would match the rule again"
    )]
    ContainsUplink { net: Ipv4Net, uplink: Ipv4Addr },
    /// `FIRST-LAST` with `FIRST` above `LAST`.
    #[error("{input:?}: first address {first} is above last address {last}")]
    Reversed {
        input: String,
        first: Ipv4Addr,
        last: Ipv4Addr,
    },
    /// An SNAT pool of more than `max` addresses.
    #[error("{input:?} has {count} addresses; a pool has at most {max}")]
    PoolTooLarge { input: String, count: u64, max: u32 },
    /// An SNAT pool that includes an address it may not hand out.
    #[error("{input:?} includes {addr}, {what}")]
    PoolIncludes {
        input: String,
        addr: Ipv4Addr,
        what: Reserved,
    },
    /// A forward target `ADDRESS:FIRST-LAST`; it takes one port.
    #[error("{input:?}: give one target port, the one forward port {first} maps to")]
    TargetRange { input: String, first: u16 },
    /// A forward whose target ports would run past 65535.
    #[error("{ports} ({} ports) from target port {to_port} would run to port {to_last}, past 65535", u32::from(ports.last - ports.first) + 1)]
    TargetPastEnd {
        ports: PortRange,
        to_port: u16,
        to_last: u32,
    },
    /// A forward target already the target of another forward of the
    /// protocol: one pod endpoint has one outside port (RFC 4787 REQ-1).
    #[error("{addr}:{port} is already the target of forward[{other}] ({ports}); a pod endpoint is the target of one forward")]
    TargetInUse {
        addr: std::net::Ipv4Addr,
        port: u16,
        other: usize,
        ports: PortRange,
    },
    /// `nat.icmp_errors_burst = 0` while the rate is limited.
    #[error("0 would let no ICMP error through while nat.icmp_errors_per_sec limits the rate; use at least 1, or nat.icmp_errors_per_sec = 0 for no limit")]
    ZeroBurst,
}

/// The TOML type a key takes, for [`Reason::WrongType`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Kind {
    #[error("a string")]
    String,
    #[error("an integer")]
    Integer,
    #[error("true or false")]
    Boolean,
    #[error("a table")]
    Table,
    #[error("an array of tables")]
    Tables,
    #[error("an array of strings")]
    Strings,
    #[error("a port number or a \"FIRST-LAST\" string")]
    Ports,
}

/// The forms an address is written in, for [`Reason::BadAddress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressForm {
    /// `uplink.gateway`.
    #[error("a.b.c.d")]
    Address,
    /// `snat[i].to`.
    #[error("ADDRESS or FIRST-LAST")]
    Pool,
    /// `forward[i].to`.
    #[error("ADDRESS:PORT or ADDRESS")]
    Target,
}

/// Which side a subnet or address is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Side {
    #[error("pod")]
    Pod,
    #[error("uplink")]
    Uplink,
}

/// Addresses an SNAT pool may not include.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reserved {
    #[error("the gateway's own uplink.address")]
    UplinkAddress,
    #[error("uplink.gateway")]
    UplinkGateway,
    #[error("the network address of the uplink subnet")]
    Network,
    #[error("the broadcast address of the uplink subnet")]
    Broadcast,
}

/// The key a value overlaps, for [`Reason::Overlaps`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overlap {
    /// The uplink subnet overlaps the pod subnet.
    #[error("pod.address")]
    PodSubnet,
    /// An SNAT pool overlaps the pool of `snat[i]`.
    #[error("snat[{0}].to")]
    SnatPool(usize),
    /// A forward's ports overlap those of `forward[i]`, same protocol.
    #[error("forward[{0}].port")]
    Forward(usize),
}

impl Overlap {
    /// What the overlap means for the user.
    fn note(&self) -> &'static str {
        match self {
            Overlap::PodSubnet => "; the two subnets must not share an address",
            Overlap::SnatPool(_) => "; an address belongs to one rule",
            Overlap::Forward(_) => " of the same protocol",
        }
    }
}

/// Why a string is not an interface name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    #[error("is empty; an interface needs a name")]
    Empty,
    #[error("is {len} bytes; Linux interface names are at most {max}")]
    TooLong { len: usize, max: usize },
    #[error("is not a valid interface name")]
    Dots,
    #[error("contains '/', ':' or whitespace, which interface names cannot")]
    BadChar,
}

/// Why a string is not a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DurationProblem {
    #[error("empty")]
    Empty,
    #[error("expected a number")]
    NoNumber,
    #[error("missing unit (us, ms, s, m or h)")]
    MissingUnit,
    #[error("unknown unit; use us, ms, s, m or h")]
    UnknownUnit,
    #[error("units must go from largest to smallest, each once")]
    UnitOrder,
    #[error("too large")]
    TooLarge,
}

/// `` `a`, `b`, `c` ``.
fn list(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `"a"`, `"a" or "b"`, `"a", "b" or "c"`.
fn alternatives(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}
