//! Configuration: the TOML file, `TAPNAT_` environment overrides, validation.
//!
//! The embedded default [`DEFAULT_TOML`] documents every key and is the only
//! place a default value is written. Loading works in three steps:
//!
//! 1. **Layers** (`layers`): the embedded default is parsed, the user's file
//!    is merged on top of it (tables key by key, a list replaced whole), and
//!    the `TAPNAT_` variables sit above both.
//! 2. **Shape** (`reader`): each section reads its keys from the merged
//!    table by name and type into a plain raw struct; an environment value is
//!    parsed as the type of the key it sets. A key that no section reads (in
//!    the file or as a variable), a missing key or a wrong type is an error
//!    naming the full key path.
//! 3. **Meaning**: each section (`pod`, `uplink`, `rules` for masquerade and
//!    SNAT, `forward`, `nat`, `workers`) checks its raw values into the typed
//!    [`Config`], and against the sections it depends on.
//!
//! Every error is a [`ConfigError`]; one about a key carries a [`Reason`].
//!
//! The `toml` crate parses; nothing else is needed. A layered-config crate
//! would merge sources for us, but it also coerces types (`1` for `true`, a
//! rounded float for an integer), names keys in its own words and needs the
//! environment's keys listed to type them; undoing that cost more code than
//! the table merge, the typed reads and the unknown-key check here.
//! Nothing here touches devices or namespaces: a valid `Config` says what to
//! open, not that it can be opened.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::net::{Ipv4Net, PortRange};

mod diff;
mod error;
mod forward;
mod layers;
mod nat;
mod ops;
mod pod;
mod reader;
mod rules;
mod run;
#[cfg(test)]
mod tests;
mod uplink;
mod values;
mod warnings;
mod workers;

pub use diff::{changed_keys, restart_keys, LIVE_KEYS};
pub use error::{
    AddressForm, ConfigError, DurationProblem, Kind, NameProblem, Overlap, Reason, Reserved, Side,
};
pub use forward::{parse_forward, parse_forward_key};

/// The documented default configuration, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../../config/tapnat.toml");

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

/// How the uplink is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkKind {
    /// A TAP device tapnat creates or attaches to.
    Tap,
    /// AF_PACKET sockets on an existing interface (`uplink.interface`).
    Raw,
}

/// `uplink.address`: a fixed address, or one a DHCPv4 server leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkAddress {
    /// `"203.0.113.10/24"`: the address with the uplink subnet's prefix.
    Static(Ipv4Net),
    /// `"dhcp"`: the address, prefix and next hop come from a lease.
    Dhcp,
}

impl UplinkAddress {
    /// The fixed address, `None` with DHCP.
    pub fn fixed(&self) -> Option<Ipv4Net> {
        match *self {
            UplinkAddress::Static(net) => Some(net),
            UplinkAddress::Dhcp => None,
        }
    }
}

impl std::fmt::Display for UplinkAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UplinkAddress::Static(net) => write!(f, "{net}"),
            UplinkAddress::Dhcp => f.write_str("dhcp"),
        }
    }
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
    /// The existing interface of a raw uplink (`Some` exactly when `kind`
    /// is [`UplinkKind::Raw`]), in `netns` when that is set.
    pub interface: Option<String>,
    pub address: UplinkAddress,
    /// The next hop; with [`UplinkAddress::Dhcp`] only a fallback for a
    /// lease that names no router (and only when inside the leased subnet).
    pub gateway: Ipv4Addr,
    /// Not a config key: caps the lease time the DHCP server grants, so
    /// that renewals come sooner (the end-to-end test sets it, as dnsmasq
    /// grants no lease under 2 minutes). `None`: the server's lease time.
    pub dhcp_max_lease: Option<std::time::Duration>,
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
/// outside every other forward of the same protocol. It may lie inside
/// `nat.ports`: the flow table reserves forwarded ports, so the dynamic
/// pool never hands one to a masqueraded flow.
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
    /// Most flows one pod (inside address) holds at once; 0 = no limit.
    pub max_flows_per_pod: usize,
    /// Most outside ports (per protocol) one pod holds at once, in
    /// mappings or quarantine; 0 = no limit.
    pub ports_per_pod: u32,
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
    /// Read and write the TAP queues in bursts through io_uring (read/write
    /// when the kernel has none).
    pub io_uring: bool,
    /// Pin worker k to CPU k.
    pub pin: bool,
}

/// The `[control]` table: the control socket `tapnat flows|stats` ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// Where the socket is created (an absolute path).
    pub socket: PathBuf,
    /// A group whose members may use the socket too (mode 0660); `None`:
    /// root and the gateway's own user only (mode 0600).
    pub group: Option<String>,
}

/// The `[metrics]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics at `http://ADDR/metrics`; `None`: off.
    pub listen: Option<std::net::SocketAddrV4>,
}

/// The `[run]` table: privilege after set-up (see `crate::sandbox`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    /// Switch to this user (and its primary group) once set up; `None`:
    /// stay root, without capabilities.
    pub run_as: Option<String>,
    /// Install a seccomp filter per thread.
    pub seccomp: bool,
}

/// The `[log]` table: the mapping log (RFC 6888 REQ-12).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogConfig {
    /// Append one JSON line per mapping made and released to this file
    /// (an absolute path); `None`: no mapping log.
    pub mappings: Option<PathBuf>,
    /// Also log each session (flow) with its destination.
    pub destinations: bool,
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
    pub control: ControlConfig,
    pub metrics: MetricsConfig,
    pub run: RunConfig,
    pub log: LogConfig,
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
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                let origin = format!("config file {}", path.display());
                build(Some((&text, &origin)), env)
            }
            None => build(None, env),
        }
    }

    /// Parse and validate a TOML string over the embedded default, without
    /// the environment.
    pub fn from_toml_str(toml: &str) -> Result<Config, ConfigError> {
        build(Some((toml, "config text")), &[])
    }
}

/// The raw values of every section, read but not yet checked.
struct Raw {
    pod: pod::Raw,
    uplink: uplink::Raw,
    masquerade: Vec<rules::RawMasquerade>,
    snat: Vec<rules::RawSnat>,
    forward: Vec<forward::Raw>,
    nat: nat::Raw,
    workers: workers::Raw,
    control: ops::RawControl,
    metrics: ops::RawMetrics,
    run: run::Raw,
    log: ops::RawLog,
}

/// Layer the embedded default, `user` (text, origin) and the `TAPNAT_`
/// variables of `env`; read every section; check it.
fn build(user: Option<(&str, &str)>, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let table = layers::file_layers(user)?;
    let env = layers::Env::new(env);
    let raw = read(reader::Table::root(&table, &env))?;
    env.finish()?;
    let pod = pod::check(raw.pod)?;
    let uplink = uplink::check(raw.uplink, &pod)?;
    let masquerade = rules::check_masquerade(raw.masquerade, &uplink)?;
    let snat = rules::check_snat(raw.snat, &uplink)?;
    let nat = nat::check(raw.nat)?;
    let forward = forward::check(raw.forward, &pod)?;
    let workers = workers::check(raw.workers)?;
    let control = ops::check_control(raw.control)?;
    let metrics = ops::check_metrics(raw.metrics)?;
    let run = run::check(raw.run)?;
    let log = ops::check_log(raw.log)?;
    Ok(Config {
        pod,
        uplink,
        masquerade,
        snat,
        forward,
        nat,
        workers,
        control,
        metrics,
        run,
        log,
    })
}

/// Every section's keys, in the order of the default file.
fn read(mut root: reader::Table<'_>) -> Result<Raw, ConfigError> {
    let raw = Raw {
        pod: pod::read(root.table("pod")?)?,
        uplink: uplink::read(root.table("uplink")?)?,
        masquerade: root
            .tables("masquerade")?
            .into_iter()
            .map(rules::read_masquerade)
            .collect::<Result<_, _>>()?,
        snat: root
            .tables("snat")?
            .into_iter()
            .map(rules::read_snat)
            .collect::<Result<_, _>>()?,
        forward: root
            .tables("forward")?
            .into_iter()
            .map(forward::read)
            .collect::<Result<_, _>>()?,
        nat: nat::read(root.table("nat")?)?,
        workers: workers::read(root.table("workers")?)?,
        control: ops::read_control(root.table("control")?)?,
        metrics: ops::read_metrics(root.table("metrics")?)?,
        run: run::read(root.table("run")?)?,
        log: ops::read_log(root.table("log")?)?,
    };
    root.finish()?;
    Ok(raw)
}
