//! The running gateway: devices, workers and the control thread.
//!
//! ```text
//!  pod TAP, queue k ───┐                                         ┌─> pod TAP, queue k
//!                      ├─> worker k: classify, translate in place ┤
//!  uplink TAP, queue k ┘   (flow shard k, outside ports p%N == k) └─> uplink TAP, queue k
//!        │  frames owned by worker j ──crossbeam batch + eventfd──> worker j
//!        └─ ARP / echo for the gateway, unknown next hops ──> control thread:
//!              smoltcp (ARP, ICMP echo), neighbour table, ARP resolution
//! ```
//!
//! Both TAPs are multi-queue (`IFF_MULTI_QUEUE`) with one queue per worker,
//! and, with offload on, carry a virtio-net header so that 64 KiB TCP
//! super-frames pass through with one header rewrite (see [`crate::wire::vnet`]).
//! Worker k reads its own queues and owns the outside ports (and ICMP ids)
//! with `port % N == k` plus the flows on them: outbound packets belong to
//! `inside_port % N`, inbound ones to `outside_port % N`. A frame read by its
//! owner is translated in place and written straight back out; one read by
//! another worker is handed over in a batch. The kernel's TUN flow steering
//! sends a flow's frames to the queue its replies were last written on, so
//! after the first packets nearly every frame is read by its owner. No lock
//! is taken per packet.
mod classify;
mod control;
mod local;
pub mod stats;
mod worker;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use smoltcp::wire::EthernetAddress;

use crate::config::{self, Config, ForwardProtocol, MasqueradeRule, SnatRule};
use crate::device::steer::{self, SteerBy};
use crate::device::{Tap, TapError, TapOptions, Waker};
use crate::nat::frag::{FragCache, FragCacheConfig};
use crate::nat::{Filtering, Flow, FlowTable, Proto, TableConfig, Timeouts};
use crate::net::Ipv4Net;
use crate::wire::icmp::IcmpRateLimit;
use crate::wire::vnet::VNET_HDR_LEN;
pub use classify::Disposition;
use stats::{Counters, Snapshot};

/// Which device a frame came from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Pod,
    Uplink,
}

/// The gateway's addresses and rules; immutable while it runs.
#[derive(Debug, Clone)]
pub struct Addressing {
    pub pod_mac: EthernetAddress,
    pub pod_net: Ipv4Net,
    pub pod_mtu: usize,
    pub uplink_mac: EthernetAddress,
    pub uplink_net: Ipv4Net,
    pub uplink_gateway: Ipv4Addr,
    pub uplink_mtu: usize,
    pub masquerade: Vec<MasqueradeRule>,
    pub snat: Vec<SnatRule>,
    /// Port forwards' targets: (protocol, pod address, pod port) -> outside
    /// port. A pod-side packet from a target is steered to the worker that
    /// owns the outside port, where its forward's sessions live.
    pub forward_targets: hashbrown::HashMap<(Proto, Ipv4Addr, u16), u16>,
}

/// What happens to a pod-side packet, by source and destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Translate the source to this outside address.
    Nat(Ipv4Addr),
    /// A NAT source going to an excluded destination: route it untranslated.
    Route,
    /// The source is no NAT source: not forwarded (anti-spoofing).
    Refuse,
}

impl Addressing {
    /// The addressing a validated config describes; MACs are derived from the
    /// addresses so they stay the same across restarts.
    pub fn from_config(config: &Config) -> Addressing {
        Addressing {
            pod_mac: mac_for(config.pod.address.addr, 0),
            pod_net: config.pod.address,
            pod_mtu: usize::from(config.pod.mtu),
            uplink_mac: mac_for(config.uplink.address.addr, 1),
            uplink_net: config.uplink.address,
            uplink_gateway: config.uplink.gateway,
            uplink_mtu: usize::from(config.uplink.mtu),
            masquerade: config.masquerade.clone(),
            snat: config.snat.clone(),
            forward_targets: forwarded_ports(config)
                .map(|(proto, ext, to, to_port)| ((proto, to, to_port), ext))
                .collect(),
        }
    }
    pub fn pod_ip(&self) -> Ipv4Addr {
        self.pod_net.addr
    }
    pub fn uplink_ip(&self) -> Ipv4Addr {
        self.uplink_net.addr
    }
    pub fn mac(&self, side: Side) -> EthernetAddress {
        match side {
            Side::Pod => self.pod_mac,
            Side::Uplink => self.uplink_mac,
        }
    }
    pub fn ip(&self, side: Side) -> Ipv4Addr {
        match side {
            Side::Pod => self.pod_ip(),
            Side::Uplink => self.uplink_ip(),
        }
    }
    pub fn net(&self, side: Side) -> Ipv4Net {
        match side {
            Side::Pod => self.pod_net,
            Side::Uplink => self.uplink_net,
        }
    }
    pub fn mtu(&self, side: Side) -> usize {
        match side {
            Side::Pod => self.pod_mtu,
            Side::Uplink => self.uplink_mtu,
        }
    }
    /// Whether an address is one of the gateway's own (it answers ping on these).
    pub fn is_local(&self, ip: Ipv4Addr) -> bool {
        ip == self.pod_ip() || ip == self.uplink_ip()
    }

    /// Whether an address is one the NAT translates to: the uplink address
    /// or an address of a SNAT pool. The gateway answers ARP for all of them.
    pub fn is_outside(&self, ip: Ipv4Addr) -> bool {
        ip == self.uplink_ip()
            || self
                .snat
                .iter()
                .any(|r| (r.to_first..=r.to_last).contains(&ip))
    }

    /// What to do with a pod-side packet from `src` to `dst`. SNAT rules are
    /// tried first, then masquerade rules; the first rule whose source
    /// matches decides, its excludes included (like an iptables chain with
    /// the SNAT rules above the MASQUERADE ones).
    pub fn egress(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Egress {
        let excluded = |ex: &[Ipv4Net]| ex.iter().any(|e| e.contains(dst));
        if let Some(r) = self.snat.iter().find(|r| r.source.contains(src)) {
            if excluded(&r.exclude) {
                return Egress::Route;
            }
            return Egress::Nat(paired_address(r, src));
        }
        match self.masquerade.iter().find(|r| r.source.contains(src)) {
            Some(r) if excluded(&r.exclude) => Egress::Route,
            Some(_) => Egress::Nat(self.uplink_ip()),
            None => Egress::Refuse,
        }
    }

    /// The port whose owner handles a pod-side packet from `src:port`: the
    /// outside port of a forward when `src:port` is its target, else `port`.
    pub fn steer(&self, proto: Proto, src: Ipv4Addr, port: u16) -> u16 {
        if self.forward_targets.is_empty() {
            return port;
        }
        self.forward_targets
            .get(&(proto, src, port))
            .copied()
            .unwrap_or(port)
    }

    /// The next hop on the uplink for `dst`.
    pub fn uplink_next_hop(&self, dst: Ipv4Addr) -> Ipv4Addr {
        if self.uplink_net.contains(dst) {
            dst
        } else {
            self.uplink_gateway
        }
    }
}

/// Every forwarded port: (protocol, outside port, target address, target port).
fn forwarded_ports(config: &Config) -> impl Iterator<Item = (Proto, u16, Ipv4Addr, u16)> + '_ {
    config.forward.iter().flat_map(|f| {
        let proto = match f.protocol {
            ForwardProtocol::Tcp => Proto::Tcp,
            ForwardProtocol::Udp => Proto::Udp,
        };
        (f.ports.first..=f.ports.last)
            .map(move |p| (proto, p, f.to_addr, f.to_port + (p - f.ports.first)))
    })
}

/// The pool address a pod address always gets ("paired" pooling, RFC 4787
/// REQ-2): a fixed hash of the pod address, so it also survives restarts.
pub fn paired_address(rule: &SnatRule, src: Ipv4Addr) -> Ipv4Addr {
    let first = u32::from(rule.to_first);
    let size = u32::from(rule.to_last) - first + 1;
    let h = (u64::from(u32::from(src)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32;
    Ipv4Addr::from(first + h % size)
}

/// A frame buffer: `data[..hdr]` is the virtio-net header (when offload is
/// on), `data[hdr..len]` the Ethernet frame. Buffers circulate through
/// [`Pool`], so the steady state allocates nothing per packet.
pub struct Buf {
    data: Box<[u8]>,
    len: usize,
    hdr: usize,
}

impl Buf {
    pub fn frame(&self) -> &[u8] {
        &self.data[self.hdr..self.len]
    }
    pub fn frame_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.hdr..self.len]
    }
    /// The virtio-net header bytes (empty without offload).
    pub fn vnet(&self) -> &[u8] {
        &self.data[..self.hdr]
    }
    pub fn vnet_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.hdr]
    }
    /// Header and frame, as the device reads and writes them.
    fn wire(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        self.wire()
    }
}

/// A bounded free list of buffers shared by all threads; allocates on demand
/// and keeps at most `keep` spare buffers.
#[derive(Clone)]
pub struct Pool {
    free_tx: Sender<Buf>,
    free_rx: Receiver<Buf>,
    size: usize,
    hdr: usize,
}

impl Pool {
    fn new(keep: usize, size: usize, hdr: usize) -> Pool {
        let (free_tx, free_rx) = bounded(keep);
        Pool {
            free_tx,
            free_rx,
            size,
            hdr,
        }
    }
    /// A buffer with its full capacity as length, ready to be read into.
    pub fn get(&self) -> Buf {
        let mut b = self.free_rx.try_recv().unwrap_or_else(|_| Buf {
            data: vec![0; self.size].into_boxed_slice(),
            len: 0,
            hdr: self.hdr,
        });
        b.len = b.data.len();
        b
    }
    pub fn put(&self, b: Buf) {
        let _ = self.free_tx.try_send(b);
    }
}

/// A transit packet handed from the worker that read it to its owner.
pub struct Packet {
    pub buf: Buf,
    pub view: crate::wire::Ipv4View,
    pub from: Side,
}

/// To a worker.
pub enum WorkerMsg {
    /// Packets this worker owns, read by another.
    Packets(Vec<Packet>),
    /// A neighbour was learned or changed.
    Neighbour(Ipv4Addr, EthernetAddress),
    /// Send a copy of the flow table.
    Flows(Sender<Vec<Flow>>),
    /// The first fragment of a datagram this worker tracks was translated:
    /// apply the same rewrite to its other fragments.
    FragTranslation(crate::nat::frag::FragKey, FragRewrite),
}

/// How the non-first fragments of a datagram are rewritten: the address at
/// one end (they carry no ports), and where they go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragRewrite {
    pub end: crate::wire::End,
    pub addr: Ipv4Addr,
    pub egress: Side,
    pub next_hop: Ipv4Addr,
}

/// To the control thread.
pub enum CtrlMsg {
    /// A frame for the gateway's own stack (ARP for it, echo request to it).
    Local { side: Side, buf: Buf },
    /// A pod-side (address, MAC) the worker has not seen before.
    Seen(Ipv4Addr, EthernetAddress),
    /// A translated frame whose next hop's MAC the worker does not know.
    Resolve {
        side: Side,
        next_hop: Ipv4Addr,
        buf: Buf,
    },
}

/// Performance settings.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Open the TAPs with IFF_VNET_HDR and TSO/checksum offload.
    pub offload: bool,
    /// Spin this long on empty queues before sleeping in poll(2).
    pub busy_poll: Duration,
    /// Pin worker k to CPU k.
    pub pin: bool,
}

impl Tuning {
    fn from_config(config: &Config) -> Tuning {
        Tuning {
            offload: config.workers.offload,
            busy_poll: config.workers.busy_poll,
            pin: config.workers.pin,
        }
    }
}

/// What the workers and the control thread share.
pub(crate) struct Shared {
    addressing: Addressing,
    /// Queue k of each TAP belongs to worker k; the control thread writes on queue 0.
    pod: Vec<Tap>,
    uplink: Vec<Tap>,
    wakers: Vec<Waker>,
    ctrl_waker: Waker,
    stop: AtomicBool,
    pool: Pool,
    start: Instant,
    tuning: Tuning,
    /// Whether the kernel steers frames to their owner's queue (eBPF).
    steering: bool,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
    fn tap(&self, side: Side, queue: usize) -> &Tap {
        match side {
            Side::Pod => &self.pod[queue],
            Side::Uplink => &self.uplink[queue],
        }
    }
    fn hdr(&self) -> usize {
        self.pool.hdr
    }
    /// Writes a buffer (header and frame) to `side`'s queue `queue`.
    fn send_buf(&self, side: Side, queue: usize, buf: &Buf) -> std::io::Result<()> {
        self.tap(side, queue).send(buf.wire())
    }
    /// Writes a frame the gateway made itself (no offload metadata).
    fn send_frame(&self, side: Side, queue: usize, frame: &[u8]) -> std::io::Result<()> {
        if self.hdr() == 0 {
            return self.tap(side, queue).send(frame);
        }
        let mut b = [0u8; 2048];
        let n = VNET_HDR_LEN + frame.len();
        if n > b.len() {
            let mut v = vec![0u8; n];
            v[VNET_HDR_LEN..].copy_from_slice(frame);
            return self.tap(side, queue).send(&v);
        }
        b[VNET_HDR_LEN..n].copy_from_slice(frame);
        self.tap(side, queue).send(&b[..n])
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot open the pod device")]
    PodDevice(#[source] TapError),
    #[error("cannot open the uplink device")]
    UplinkDevice(#[source] TapError),
    #[error("cannot turn on offloads on the {0} device")]
    Offload(&'static str, #[source] std::io::Error),
    #[error("cannot create a wake-up eventfd")]
    Waker(#[source] std::io::Error),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot set up the forward of port {0}")]
    Forward(u16, #[source] crate::nat::ForwardError),
}

/// A freed outside port is not handed out again for this long (RFC 6888
/// REQ-8), so a remote host cannot mistake a new mapping for an old one.
const PORT_REUSE_DELAY_MS: u64 = 120_000;

/// A running gateway. Dropping it stops it.
pub struct Gateway {
    shared: Arc<Shared>,
    counters: Vec<Arc<Counters>>,
    workers: Vec<Sender<WorkerMsg>>,
    threads: Vec<JoinHandle<()>>,
}

/// A read-only view of a running gateway (counters and flow table) that
/// other threads can hold, e.g. the control socket.
#[derive(Clone)]
pub struct Observer {
    shared: Arc<Shared>,
    counters: Vec<Arc<Counters>>,
    workers: Vec<Sender<WorkerMsg>>,
}

impl Observer {
    /// The sum of every thread's counters now.
    pub fn stats(&self) -> Snapshot {
        Snapshot::sum(self.counters.iter().map(|c| &**c))
    }

    /// A copy of every worker's flow table (empty once the gateway stopped).
    pub fn flows(&self) -> Vec<Flow> {
        let mut all = Vec::new();
        for (k, w) in self.workers.iter().enumerate() {
            let (tx, rx) = bounded(1);
            if w.send(WorkerMsg::Flows(tx)).is_ok() {
                self.shared.wakers[k].wake();
                if let Ok(mut f) = rx.recv_timeout(Duration::from_secs(2)) {
                    all.append(&mut f);
                }
            }
        }
        all
    }
}

/// A locally administered MAC derived from an address, so restarts keep it.
fn mac_for(ip: Ipv4Addr, side: u8) -> EthernetAddress {
    let o = ip.octets();
    EthernetAddress([0x02, 0x7a ^ side, o[0], o[1], o[2], o[3]])
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
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

/// TSO for IPv4 and IPv6 (with ECN) plus checksum offload: what we accept
/// from the kernel. UDP segmentation offload is left off: a UDP super-frame's
/// datagram boundaries could not be re-cut for a smaller egress MTU.
const OFFLOADS: u32 = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;

impl Gateway {
    /// Opens both devices and starts the workers and the control thread.
    /// The config must have been validated (see `Config::load`).
    pub fn start(config: &Config) -> Result<Gateway, GatewayError> {
        let tuning = Tuning::from_config(config);
        let n = match config.workers.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t => t,
        };
        let pod = open_queues(
            &config.pod.tap,
            config.pod.netns.as_deref(),
            config.pod.mtu,
            n,
            tuning.offload,
        )
        .map_err(GatewayError::PodDevice)?;
        let uplink = open_queues(
            &config.uplink.tap,
            config.uplink.netns.as_deref(),
            config.uplink.mtu,
            n,
            tuning.offload,
        )
        .map_err(GatewayError::UplinkDevice)?;
        // Steer each frame to its owner's queue in the kernel already; only a
        // hint (a frame on the wrong queue is handed over), so failure is fine.
        let steering = n > 1
            && steer::attach(&pod[0], SteerBy::SourcePort).is_ok()
            && steer::attach(&uplink[0], SteerBy::DestinationPort).is_ok();
        if tuning.offload {
            pod[0]
                .set_offload(OFFLOADS)
                .map_err(|e| GatewayError::Offload("pod", e))?;
            uplink[0]
                .set_offload(OFFLOADS)
                .map_err(|e| GatewayError::Offload("uplink", e))?;
        }
        let (hdr, buf_size) = if tuning.offload {
            // A TSO super-frame: up to 64 KiB of IP plus Ethernet and header.
            (VNET_HDR_LEN, VNET_HDR_LEN + 14 + 65535 + 64)
        } else {
            (
                0,
                (usize::from(config.pod.mtu.max(config.uplink.mtu)) + 64).max(2048),
            )
        };
        let mut wakers = Vec::with_capacity(n);
        for _ in 0..n {
            wakers.push(Waker::new().map_err(GatewayError::Waker)?);
        }
        let shared = Arc::new(Shared {
            addressing: Addressing::from_config(config),
            pod,
            uplink,
            wakers,
            ctrl_waker: Waker::new().map_err(GatewayError::Waker)?,
            stop: AtomicBool::new(false),
            pool: Pool::new(1024, buf_size, hdr),
            start: Instant::now(),
            tuning,
            steering,
        });
        let t = &config.nat.timeouts;
        let timeouts = Timeouts {
            tcp_established_ms: ms(t.tcp_established),
            tcp_transitory_ms: ms(t.tcp_transitory),
            udp_ms: ms(t.udp),
            icmp_ms: ms(t.icmp),
        };
        let (ctrl_tx, ctrl_rx) = unbounded();
        let mut counters = Vec::new();
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..n {
            let (tx, rx) = bounded(1024);
            senders.push(tx);
            receivers.push(rx);
        }
        let mut threads = Vec::new();
        let seed = seed();
        for (k, rx) in receivers.into_iter().enumerate() {
            let table = FlowTable::new(TableConfig {
                worker: k as u16,
                workers: n as u16,
                port_first: config.nat.ports.first,
                port_last: config.nat.ports.last,
                max_flows: config.nat.max_flows.div_ceil(n),
                timeouts,
                seed: seed.rotate_left(k as u32 * 7) ^ k as u64,
                filtering: match config.nat.filtering {
                    config::Filtering::EndpointIndependent => Filtering::EndpointIndependent,
                    config::Filtering::Address => Filtering::Address,
                    config::Filtering::AddressAndPort => Filtering::AddressAndPort,
                },
                port_reuse_delay_ms: PORT_REUSE_DELAY_MS,
            });
            let mut table = table;
            for (proto, ext, to, to_port) in forwarded_ports(config) {
                if usize::from(ext) % n == k {
                    table
                        .add_forward(proto, config.uplink.address.addr, ext, to, to_port)
                        .map_err(|e| GatewayError::Forward(ext, e))?;
                }
            }
            let c = Arc::new(Counters::default());
            let per_sec = config.nat.icmp_errors_per_sec;
            let icmp_limit = (per_sec > 0).then(|| {
                let share = |v: u32| (v / n as u32).max(1);
                IcmpRateLimit::new(share(per_sec), share(config.nat.icmp_errors_burst))
            });
            let frags = (config.nat.fragments_max > 0).then(|| {
                FragCache::new(FragCacheConfig {
                    max_datagrams: config.nat.fragments_max.div_ceil(n),
                    max_held_fragments: 256,
                    max_held_bytes: 4 << 20,
                    timeout_ms: ms(config.nat.timeouts.fragment),
                })
            });
            let w = worker::Worker::new(
                k,
                table,
                frags,
                icmp_limit,
                shared.clone(),
                c.clone(),
                rx,
                senders.clone(),
                ctrl_tx.clone(),
            );
            threads.push(
                std::thread::Builder::new()
                    .name(format!("tapnat-w{k}"))
                    .spawn(move || w.run())
                    .map_err(GatewayError::Thread)?,
            );
            counters.push(c);
        }
        let c = Arc::new(Counters::default());
        let ctl = control::Control::new(shared.clone(), c.clone(), senders.clone(), ctrl_rx, seed);
        threads.push(
            std::thread::Builder::new()
                .name("tapnat-ctl".into())
                .spawn(move || ctl.run())
                .map_err(GatewayError::Thread)?,
        );
        counters.push(c);
        Ok(Gateway {
            shared,
            counters,
            workers: senders,
            threads,
        })
    }

    /// The gateway's addresses, MACs and rules.
    pub fn addressing(&self) -> &Addressing {
        &self.shared.addressing
    }

    /// How many worker threads translate packets.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Whether the kernel steers each frame to its owner's queue (an eBPF
    /// program on each TAP; needs more than one worker and BPF support).
    pub fn steering(&self) -> bool {
        self.shared.steering
    }

    /// Whether the TAPs carry offloaded (TSO, partial checksum) frames.
    pub fn offload(&self) -> bool {
        self.shared.tuning.offload
    }

    /// The sum of every thread's counters now.
    pub fn stats(&self) -> Snapshot {
        self.observer().stats()
    }

    /// A copy of every worker's flow table.
    pub fn flows(&self) -> Vec<Flow> {
        self.observer().flows()
    }

    /// A view of the counters and flows for another thread.
    pub fn observer(&self) -> Observer {
        Observer {
            shared: self.shared.clone(),
            counters: self.counters.clone(),
            workers: self.workers.clone(),
        }
    }

    /// Stops every thread and closes the devices (a TAP the gateway created
    /// disappears with its last queue).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for w in &self.shared.wakers {
            w.wake();
        }
        self.shared.ctrl_waker.wake();
        self.workers.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown();
    }
}
