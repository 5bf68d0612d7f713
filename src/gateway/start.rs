//! Starting a gateway, step by step: open the devices, build each worker's
//! shard (flow table, fragment cache, ICMP budget: a [`Core`]), spawn the
//! workers, spawn the control thread. Nothing here runs per packet.
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

use super::buf::{buffer_layout, Buf, Pool};
use super::control::{Control, DhcpSetup};
use super::datapath::{Core, CoreParts};
use super::dhcp::LeaseState;
use super::failure::guarded;
use super::stats::Counters;
use super::worker::{Links, Worker};
use super::{CtrlMsg, Gateway, GatewayError, Queues, Shared, Tuning, WorkerMsg};
use crate::config::{self, Config, Reason, UplinkKind};
use crate::device::steer::{self, SteerBy};
use crate::device::{
    raw, FrameIo, NetnsWatch, RawError, RawOptions, Tap, TapError, TapOptions, UringTap, Waker,
};
use crate::nat::frag::{FragCache, FragCacheConfig};
use crate::nat::{Filtering, FlowTable, TableConfig, Timeouts};
use crate::policy::{forwarded_ports, Addressing};
use crate::wire::icmp::IcmpRateLimit;

/// A freed outside port is not handed out again for this long (RFC 6888
/// REQ-8), so a remote host cannot mistake a new mapping for an old one.
const PORT_REUSE_DELAY_MS: u64 = 120_000;
/// Spare buffers the pool keeps.
const POOL_KEEP: usize = 1024;
/// Batches waiting for one worker before hand-offs to it are dropped.
const WORKER_QUEUE: usize = 1024;
/// Messages waiting for the control thread before the workers drop new
/// ones (counted as `drop_control_queue_full`). Local-stack frames are
/// bounded apart (`local::LOCAL_QUEUED` a side and kind) and small; each packet
/// waiting for a next hop holds a pool buffer (up to 64 KiB with offload),
/// so this bounds those to 32 MiB in the queue.
const CTRL_QUEUE: usize = 512;
/// Fragments and bytes one worker holds for datagrams whose first fragment
/// has not arrived (virtual reassembly, README "NAT behaviour"). The bytes
/// are the buffers' whole capacity, so this is the memory really pinned; a
/// held fragment is first copied out of its pool buffer (up to 64 KiB with
/// offload) into one of its own length. One source address holds at most a
/// quarter of either (`nat::frag::SOURCE_SHARE`).
const FRAGMENTS_HELD: usize = 256;
const FRAGMENT_BYTES_HELD: usize = 4 << 20;
/// Failures kept for the runner: the first one says why; a few more (every
/// worker seeing the same dead device) are kept, the rest dropped.
const FAILURES_KEPT: usize = 16;

/// TSO for IPv4 and IPv6 (with ECN) plus checksum offload: what we accept
/// from the kernel. UDP segmentation offload is left off: a UDP super-frame's
/// datagram boundaries could not be re-cut for a smaller egress MTU.
const OFFLOADS: u32 = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
/// UDP segmentation offload (both flags or neither: the kernel turns USO on
/// only with both), where the kernel has it (6.2; older ones refuse the
/// flags with EINVAL and the TAP keeps [`OFFLOADS`]).
const USO: u32 = libc::TUN_F_USO4 | libc::TUN_F_USO6;

/// Sets [`OFFLOADS`] on a TAP, with [`USO`] where the kernel takes it.
fn set_offloads(tap: &Tap) -> std::io::Result<()> {
    match tap.set_offload(OFFLOADS | USO) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => tap.set_offload(OFFLOADS),
        r => r,
    }
}

impl Tuning {
    fn from_config(config: &Config) -> Tuning {
        Tuning {
            offload: config.workers.offload,
            busy_poll: config.workers.busy_poll,
            io_uring: config.workers.io_uring,
            pin: config.workers.pin,
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// Seeds the port choice (RFC 6056: unpredictable outside ports) and the
/// local stack from the operating system's randomness.
fn seed() -> u64 {
    crate::nat::hash::os_random_u64()
}

pub(super) fn start(
    config: &Config,
    neighbours: super::neighbour::Params,
) -> Result<Gateway, GatewayError> {
    let tuning = Tuning::from_config(config);
    let n = match config.workers.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        t => t,
    };
    let shared = Arc::new(open_devices(config, n, tuning)?);
    let seed = seed();
    let mut counters: Vec<Arc<Counters>> = (0..=n).map(|_| Arc::default()).collect();
    let cores = build_shards(config, &shared, n, seed, &counters[..n])?;
    counters.push(shared.taps.counters.clone());
    let (ctrl_tx, ctrl_rx) = bounded(CTRL_QUEUE);
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| bounded(WORKER_QUEUE)).unzip();
    let mut gateway = Gateway {
        shared,
        counters,
        workers: senders,
        threads: Vec::new(),
    };
    spawn_workers(&mut gateway, cores, receivers, &ctrl_tx)?;
    let dhcp = config.uplink.address.fixed().is_none().then(|| DhcpSetup {
        state: LeaseState::new(
            config.pod.address,
            config.masquerade.iter().map(|r| r.source).collect(),
            config.uplink.gateway,
            config.uplink.dhcp_max_lease.map(ms),
        ),
        max_lease: config.uplink.dhcp_max_lease,
    });
    spawn_control(&mut gateway, ctrl_rx, seed, dhcp, neighbours)?;
    Ok(gateway)
}

/// Opens `n` queues of one TAP.
fn open_queues(
    name: &str,
    netns: Option<&std::path::Path>,
    mtu: u16,
    n: usize,
    offload: bool,
) -> Result<Vec<Tap>, TapError> {
    let opts = TapOptions {
        multi_queue: true,
        vnet_hdr: offload,
    };
    let first = Tap::open(name, netns, mtu, opts)?;
    let mut queues = Vec::with_capacity(n);
    for _ in 1..n {
        queues.push(first.open_queue()?);
    }
    queues.insert(0, first);
    Ok(queues)
}

/// The worker queues: with `uring`, each with its own io_uring where the
/// kernel gives one, plain read/write (and a warning) where it does not.
fn boxed(taps: Vec<Tap>, uring: bool) -> Queues {
    taps.into_iter()
        .map(|t| {
            if !uring {
                return Box::new(t) as Box<dyn FrameIo>;
            }
            match UringTap::new(t) {
                Ok(u) => Box::new(u) as Box<dyn FrameIo>,
                Err((t, e)) => {
                    use std::io::Write as _;
                    let _ = writeln!(
                        std::io::stderr(),
                        "tapnat: warning: no io_uring for {} ({e}); using read/write",
                        t.name()
                    );
                    Box::new(t)
                }
            }
        })
        .collect()
}

/// The uplink's queues (one per worker), its name, whether the kernel
/// steers its frames to their owners, and for a raw uplink its MAC and
/// what to warn about.
struct Uplink {
    queues: Queues,
    name: String,
    steering: bool,
    mac: Option<[u8; 6]>,
    warnings: Vec<String>,
}

/// Opens the uplink TAP with a queue per worker, its steering program and
/// offloads.
fn open_uplink_tap(config: &Config, n: usize, tuning: Tuning) -> Result<Uplink, GatewayError> {
    let uplink = &config.uplink;
    let q = open_queues(
        &uplink.tap,
        uplink.netns.as_deref(),
        uplink.mtu,
        n,
        tuning.offload,
    )
    .map_err(GatewayError::UplinkDevice)?;
    let steering = n > 1 && steer::attach(&q[0], SteerBy::DestinationPort).is_ok();
    if tuning.offload {
        set_offloads(&q[0]).map_err(|e| GatewayError::Offload("uplink", e))?;
    }
    Ok(Uplink {
        name: q[0].name().to_owned(),
        queues: boxed(q, tuning.io_uring),
        steering,
        mac: None,
        warnings: Vec::new(),
    })
}

/// Opens the raw uplink: an AF_PACKET socket per worker on
/// `uplink.interface`. A missing interface, or one with a kernel IPv4
/// address, is a config error naming the key.
fn open_uplink_raw(config: &Config, n: usize, tuning: Tuning) -> Result<Uplink, GatewayError> {
    let uplink = &config.uplink;
    let name = uplink.interface.as_deref().unwrap_or_default();
    let opts = RawOptions {
        sockets: n,
        mtu: uplink.mtu,
        vnet_hdr: tuning.offload,
        steer: true,
        io_uring: tuning.io_uring,
    };
    let (sockets, info) = raw::open(name, uplink.netns.as_deref(), opts).map_err(|e| match e {
        RawError::NoSuchInterface { name, netns } => {
            raw_config_error(Reason::NoSuchInterface { name, netns })
        }
        RawError::HasAddress { name, addr } => {
            let fix = flush_command(&name, uplink.netns.as_deref());
            raw_config_error(Reason::InterfaceHasAddress { name, addr, fix })
        }
        e => GatewayError::RawUplink(e),
    })?;
    let mut warnings = Vec::new();
    if let Some(e) = &info.no_ring {
        warnings.push(format!(
            "no io_uring for the raw uplink {} ({e}); using recvmsg/sendmsg",
            info.name
        ));
    }
    if info.forwarding {
        warnings.push(format!(
            "IPv4 forwarding is on in the namespace of the raw uplink {}: the kernel may route \
             frames that arrive there for addresses it does not own; turn it off there \
             (sysctl net.ipv4.conf.all.forwarding=0) unless something else needs it",
            info.name
        ));
    }
    Ok(Uplink {
        queues: sockets
            .into_iter()
            .map(|s| Box::new(s) as Box<dyn FrameIo>)
            .collect(),
        name: info.name,
        steering: info.steering,
        mac: Some(info.mac),
        warnings,
    })
}

fn raw_config_error(reason: Reason) -> GatewayError {
    GatewayError::Config(config::ConfigError::Invalid {
        key: "uplink.interface".into(),
        reason,
    })
}

/// The command that removes the kernel's IPv4 addresses from `name`.
fn flush_command(name: &str, netns: Option<&std::path::Path>) -> String {
    match netns {
        None => format!("ip addr flush dev {name}"),
        Some(p) => match p.strip_prefix("/run/netns") {
            Ok(ns) => format!("ip -n {} addr flush dev {name}", ns.display()),
            Err(_) => format!("nsenter --net={} ip addr flush dev {name}", p.display()),
        },
    }
}

/// Opens the pod TAP and the uplink with a queue per worker, attaches the
/// steering programs and turns on offloads; the result is what every
/// thread shares.
fn open_devices(config: &Config, n: usize, tuning: Tuning) -> Result<Shared, GatewayError> {
    let (pod, uplink) = (&config.pod, &config.uplink);
    // The raw uplink first: its checks are config errors, found before the
    // pod TAP is created.
    let up = match uplink.kind {
        UplinkKind::Tap => None,
        UplinkKind::Raw => Some(open_uplink_raw(config, n, tuning)?),
    };
    let pod_q = open_queues(&pod.tap, pod.netns.as_deref(), pod.mtu, n, tuning.offload)
        .map_err(GatewayError::PodDevice)?;
    let up = match up {
        Some(u) => u,
        None => open_uplink_tap(config, n, tuning)?,
    };
    // Steer each frame to its owner's queue in the kernel already; only a
    // hint (a frame on the wrong queue is handed over), so failure is fine.
    let steering = n > 1 && up.steering && steer::attach(&pod_q[0], SteerBy::SourcePort).is_ok();
    if tuning.offload {
        set_offloads(&pod_q[0]).map_err(|e| GatewayError::Offload("pod", e))?;
    }
    let (hdr, size) = buffer_layout(tuning.offload, usize::from(pod.mtu.max(uplink.mtu)));
    let names = [pod_q[0].name().to_owned(), up.name];
    let mut addressing = Addressing::from_config(config);
    if let Some(mac) = up.mac {
        // A raw uplink speaks with its interface's own MAC.
        addressing.uplink_mac = smoltcp::wire::EthernetAddress(mac);
    }
    let mut shared = Shared::new(
        addressing,
        boxed(pod_q, tuning.io_uring),
        up.queues,
        Pool::new(POOL_KEEP, size, hdr),
        tuning,
        steering,
    )?;
    shared.names = names;
    shared.warnings = up.warnings;
    let netns = [pod.netns.clone(), uplink.netns.clone()];
    let watched: Vec<(usize, &std::path::Path)> = netns
        .iter()
        .enumerate()
        .filter_map(|(i, p)| Some((i, p.as_deref()?)))
        .collect();
    shared.netns_watch = NetnsWatch::new(&watched)
        .map_err(GatewayError::NetnsWatch)?
        .map(|w| (w, netns));
    Ok(shared)
}

impl Shared {
    /// What the threads share, with a waker per worker and one for the
    /// control thread; `pod` and `uplink` hold one queue per worker.
    pub(super) fn new(
        addressing: Addressing,
        pod: Queues,
        uplink: Queues,
        pool: Pool,
        tuning: Tuning,
        steering: bool,
    ) -> Result<Shared, GatewayError> {
        let wakers = (0..pod.len())
            .map(|_| Waker::new())
            .collect::<Result<_, _>>()
            .map_err(GatewayError::Waker)?;
        let gauges = (0..pod.len()).map(|_| Default::default()).collect();
        Ok(Shared {
            addressing: std::sync::RwLock::new(Arc::new(addressing)),
            lease: std::sync::Mutex::new(None),
            pod,
            uplink,
            wakers,
            ctrl_waker: Waker::new().map_err(GatewayError::Waker)?,
            stop: AtomicBool::new(false),
            pool,
            start: Instant::now(),
            tuning,
            steering,
            names: ["pod".into(), "uplink".into()],
            warnings: Vec::new(),
            netns_watch: None,
            failures: bounded(FAILURES_KEPT),
            gauges,
            neighbours: AtomicU64::new(0),
            local: Default::default(),
            resolving: Default::default(),
            taps: Arc::default(),
            #[cfg(debug_assertions)]
            fault: std::sync::atomic::AtomicUsize::new(0),
        })
    }
}

/// One worker's share of a per-pod limit (0 = none stays none): the limit
/// `/ n` rounded up, so the pod's total across workers is at least it.
pub(crate) fn pod_share(limit: usize, n: usize) -> u32 {
    limit.div_ceil(n.max(1)).min(u32::MAX as usize) as u32
}

/// The flow table of worker `k` of `n`, with the port forwards it owns.
fn flow_table(config: &Config, k: usize, n: usize, seed: u64) -> Result<FlowTable, GatewayError> {
    let t = &config.nat.timeouts;
    let mut table = FlowTable::new(TableConfig {
        worker: k as u16,
        workers: n as u16,
        port_first: config.nat.ports.first,
        port_last: config.nat.ports.last,
        max_flows: config.nat.max_flows.div_ceil(n),
        max_flows_per_pod: pod_share(config.nat.max_flows_per_pod, n),
        ports_per_pod: pod_share(config.nat.ports_per_pod as usize, n),
        timeouts: Timeouts {
            tcp_established_ms: ms(t.tcp_established),
            tcp_transitory_ms: ms(t.tcp_transitory),
            udp_ms: ms(t.udp),
            icmp_ms: ms(t.icmp),
        },
        seed: seed.rotate_left(k as u32 * 7) ^ k as u64,
        filtering: match config.nat.filtering {
            config::Filtering::EndpointIndependent => Filtering::EndpointIndependent,
            config::Filtering::Address => Filtering::Address,
            config::Filtering::AddressAndPort => Filtering::AddressAndPort,
        },
        port_reuse_delay_ms: PORT_REUSE_DELAY_MS,
    });
    let uplink_addr = config
        .uplink
        .address
        .fixed()
        .map_or(std::net::Ipv4Addr::UNSPECIFIED, |net| net.addr);
    for (proto, ext, to, to_port) in forwarded_ports(&config.forward) {
        if usize::from(ext) % n == k {
            table
                // With DHCP the forwards wait on 0.0.0.0 (nobody's) and
                // move to each leased address (see `Worker::readdress`).
                .add_forward(proto, uplink_addr, ext, to, to_port)
                .map_err(|e| GatewayError::Forward(ext, e))?;
        }
    }
    Ok(table)
}

/// One [`Core`] per worker: its flow shard, fragment cache and share of
/// the ICMP error budget.
fn build_shards(
    config: &Config,
    shared: &Shared,
    n: usize,
    seed: u64,
    counters: &[Arc<Counters>],
) -> Result<Vec<Core>, GatewayError> {
    let nat = &config.nat;
    let share = |v: u32| (v / n as u32).max(1);
    let mut cores = Vec::with_capacity(n);
    for (k, c) in counters.iter().enumerate() {
        let icmp_limit = (nat.icmp_errors_per_sec > 0).then(|| {
            IcmpRateLimit::new(share(nat.icmp_errors_per_sec), share(nat.icmp_errors_burst))
        });
        let frags = (nat.fragments_max > 0).then(|| {
            FragCache::new(FragCacheConfig {
                max_datagrams: nat.fragments_max.div_ceil(n),
                max_held_fragments: FRAGMENTS_HELD,
                max_held_bytes: FRAGMENT_BYTES_HELD,
                timeout_ms: ms(nat.timeouts.fragment),
            })
            .charged_by(Buf::pinned)
            .held_as({
                let pool = shared.pool.clone();
                Box::new(move |b| pool.compact(b))
            })
        });
        cores.push(Core::new(CoreParts {
            worker: k,
            workers: n,
            addressing: shared.addressing(),
            table: flow_table(config, k, n, seed)?,
            frags,
            icmp_limit,
            pool: shared.pool.clone(),
            counters: c.clone(),
        }));
    }
    Ok(cores)
}

fn spawn_workers(
    gw: &mut Gateway,
    cores: Vec<Core>,
    receivers: Vec<Receiver<WorkerMsg>>,
    ctrl: &Sender<CtrlMsg>,
) -> Result<(), GatewayError> {
    for (k, (core, rx)) in cores.into_iter().zip(receivers).enumerate() {
        let links = Links {
            rx,
            peers: gw.workers.clone(),
            ctrl: ctrl.clone(),
        };
        let w = Worker::new(k, core, gw.shared.clone(), gw.counters[k].clone(), links);
        let shared = gw.shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("tapnat-w{k}"))
            .spawn(move || {
                guarded(&shared, format!("worker {k}"), || {
                    crate::sandbox::enter(crate::sandbox::Role::Worker);
                    w.run()
                })
            })
            .map_err(GatewayError::Thread)?;
        gw.threads.push(t);
    }
    Ok(())
}

fn spawn_control(
    gw: &mut Gateway,
    rx: Receiver<CtrlMsg>,
    seed: u64,
    dhcp: Option<DhcpSetup>,
    neighbours: super::neighbour::Params,
) -> Result<(), GatewayError> {
    let c = gw.counters[gw.workers.len()].clone();
    let ctl = Control::new(
        gw.shared.clone(),
        c,
        gw.workers.clone(),
        rx,
        seed,
        dhcp,
        neighbours,
    );
    let shared = gw.shared.clone();
    let t = std::thread::Builder::new()
        .name("tapnat-ctl".into())
        .spawn(move || {
            guarded(&shared, "control thread".into(), || {
                crate::sandbox::enter(crate::sandbox::Role::Control);
                ctl.run()
            })
        })
        .map_err(GatewayError::Thread)?;
    gw.threads.push(t);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::flush_command;
    use std::path::Path;

    #[test]
    fn the_fix_for_an_addressed_interface_names_its_namespace() {
        assert_eq!(flush_command("eth1", None), "ip addr flush dev eth1");
        assert_eq!(
            flush_command("eth1", Some(Path::new("/run/netns/up"))),
            "ip -n up addr flush dev eth1"
        );
        assert_eq!(
            flush_command("eth1", Some(Path::new("/proc/42/ns/net"))),
            "nsenter --net=/proc/42/ns/net ip addr flush dev eth1"
        );
    }
}
