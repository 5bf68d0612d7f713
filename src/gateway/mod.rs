//! The running gateway: devices, the poll loop and the worker threads.
//!
//! ```text
//!  pod TAP ──┐                         ┌─> worker 0: flow shard 0, ports p % N == 0 ─┐
//!            ├─> io thread: classify ──┼─> ...                                        ├─> write to the egress TAP
//!  uplink ───┘        │                └─> worker N-1                                 ┘
//!                     └─> smoltcp (ARP, ICMP echo for the gateway), neighbours, ARP resolution
//! ```
//!
//! The io thread reads both devices, classifies each frame once and hands
//! transit packets in batches to their owning worker over crossbeam
//! channels: outbound to `inside_port % N`, inbound to `outside_port % N`.
//! Worker k allocates only outside ports with `port % N == k`, so each worker
//! owns its flow-table shard outright and no lock is taken per packet.
//! Workers write translated frames straight to the egress device. A frame
//! whose next hop has no known MAC goes back to the io thread, which ARPs
//! for it, holds a few packets, and tells every worker the answer.
mod io;
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

use crate::control::config::{Config, Ipv4Net, MasqueradeRule};
use crate::device::{Tap, TapError, TapOptions, Waker};
use crate::nat::{Filtering, Flow, FlowTable, TableConfig, Timeouts};
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
}

impl Addressing {
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
    /// Whether an address is one of the gateway's own.
    pub fn is_local(&self, ip: Ipv4Addr) -> bool {
        ip == self.pod_ip() || ip == self.uplink_ip()
    }
    /// Whether a pod-side packet from `src` to `dst` is masqueraded
    /// (first matching source wins; its excludes apply).
    pub fn masquerades(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Option<bool> {
        self.masquerade
            .iter()
            .find(|r| r.source.contains(src))
            .map(|r| !r.exclude.iter().any(|e| e.contains(dst)))
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

/// A frame buffer. Buffers circulate between the io thread and the workers
/// through [`Pool`], so the steady state allocates nothing per packet.
pub struct Buf {
    data: Box<[u8]>,
    len: usize,
}

impl Buf {
    pub fn frame(&self) -> &[u8] {
        &self.data[..self.len]
    }
    pub fn frame_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

/// A bounded free list of buffers shared by all threads.
#[derive(Clone)]
pub struct Pool {
    free_tx: Sender<Buf>,
    free_rx: Receiver<Buf>,
    size: usize,
}

impl Pool {
    fn new(count: usize, size: usize) -> Pool {
        let (free_tx, free_rx) = bounded(count);
        for _ in 0..count {
            let _ = free_tx.try_send(Buf {
                data: vec![0; size].into_boxed_slice(),
                len: 0,
            });
        }
        Pool {
            free_tx,
            free_rx,
            size,
        }
    }
    /// A buffer with its full capacity as length, ready to be read into.
    pub fn get(&self) -> Buf {
        let mut b = self.free_rx.try_recv().unwrap_or_else(|_| Buf {
            data: vec![0; self.size].into_boxed_slice(),
            len: 0,
        });
        b.len = b.data.len();
        b
    }
    pub fn put(&self, b: Buf) {
        let _ = self.free_tx.try_send(b);
    }
}

/// A transit packet handed from the io thread to its owning worker.
pub struct Packet {
    pub buf: Buf,
    pub view: crate::wire::Ipv4View,
    pub from: Side,
}

/// io thread -> worker.
pub enum WorkerMsg {
    Packets(Vec<Packet>),
    /// A neighbour was learned or changed.
    Neighbour(Ipv4Addr, EthernetAddress),
    /// Send a copy of the flow table.
    Flows(Sender<Vec<Flow>>),
}

/// worker -> io thread.
pub enum CtrlMsg {
    /// A translated frame whose next hop's MAC the worker does not know.
    Resolve {
        side: Side,
        next_hop: Ipv4Addr,
        buf: Buf,
    },
}

/// What a worker thread and the io thread share.
pub(crate) struct Shared {
    addressing: Addressing,
    pod: Tap,
    uplink: Tap,
    waker: Waker,
    stop: AtomicBool,
    pool: Pool,
    start: Instant,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
    fn tap(&self, side: Side) -> &Tap {
        match side {
            Side::Pod => &self.pod,
            Side::Uplink => &self.uplink,
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot open the pod device")]
    PodDevice(#[source] TapError),
    #[error("cannot open the uplink device")]
    UplinkDevice(#[source] TapError),
    #[error("cannot create the wake-up eventfd")]
    Waker(#[source] std::io::Error),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
}

/// A running gateway. Dropping it stops it.
pub struct Gateway {
    shared: Arc<Shared>,
    counters: Vec<Arc<Counters>>,
    workers: Vec<Sender<WorkerMsg>>,
    threads: Vec<JoinHandle<()>>,
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

impl Gateway {
    /// Opens both devices and starts the io thread and the workers.
    /// The config must have been validated (see `Config::load`).
    pub fn start(config: &Config) -> Result<Gateway, GatewayError> {
        let opts = TapOptions::default();
        let pod = Tap::open(
            &config.pod.tap,
            config.pod.netns.as_deref(),
            config.pod.mtu,
            opts,
        )
        .map_err(GatewayError::PodDevice)?;
        let uplink = Tap::open(
            &config.uplink.tap,
            config.uplink.netns.as_deref(),
            config.uplink.mtu,
            opts,
        )
        .map_err(GatewayError::UplinkDevice)?;
        let addressing = Addressing {
            pod_mac: mac_for(config.pod.address.addr, 0),
            pod_net: config.pod.address,
            pod_mtu: usize::from(config.pod.mtu),
            uplink_mac: mac_for(config.uplink.address.addr, 1),
            uplink_net: config.uplink.address,
            uplink_gateway: config.uplink.gateway,
            uplink_mtu: usize::from(config.uplink.mtu),
            masquerade: config.masquerade.clone(),
        };
        let n = match config.workers.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t => t,
        };
        let buf_size = (usize::from(config.pod.mtu.max(config.uplink.mtu)) + 64).max(2048);
        let shared = Arc::new(Shared {
            addressing,
            pod,
            uplink,
            waker: Waker::new().map_err(GatewayError::Waker)?,
            stop: AtomicBool::new(false),
            pool: Pool::new(4096, buf_size),
            start: Instant::now(),
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
        let mut workers = Vec::new();
        let mut threads = Vec::new();
        let seed = seed();
        for k in 0..n {
            let table = FlowTable::new(TableConfig {
                worker: k as u16,
                workers: n as u16,
                port_first: config.nat.ports.first,
                port_last: config.nat.ports.last,
                max_flows: config.nat.max_flows.div_ceil(n),
                timeouts,
                seed: seed.rotate_left(k as u32 * 7) ^ k as u64,
                // Today's behaviour until the config maps its own settings.
                filtering: Filtering::AddressAndPort,
                port_reuse_delay_ms: 0,
            });
            let (tx, rx) = bounded(1024);
            let c = Arc::new(Counters::default());
            let w = worker::Worker::new(table, shared.clone(), c.clone(), rx, ctrl_tx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("tapnat-w{k}"))
                    .spawn(move || w.run())
                    .map_err(GatewayError::Thread)?,
            );
            counters.push(c);
            workers.push(tx);
        }
        let c = Arc::new(Counters::default());
        let io = io::IoLoop::new(shared.clone(), c.clone(), workers.clone(), ctrl_rx, seed);
        threads.push(
            std::thread::Builder::new()
                .name("tapnat-io".into())
                .spawn(move || io.run())
                .map_err(GatewayError::Thread)?,
        );
        counters.push(c);
        Ok(Gateway {
            shared,
            counters,
            workers,
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

    /// The sum of every thread's counters now.
    pub fn stats(&self) -> Snapshot {
        Snapshot::sum(self.counters.iter().map(|c| &**c))
    }

    /// A copy of every worker's flow table.
    pub fn flows(&self) -> Vec<Flow> {
        let mut all = Vec::new();
        for w in &self.workers {
            let (tx, rx) = bounded(1);
            if w.send(WorkerMsg::Flows(tx)).is_ok() {
                if let Ok(mut f) = rx.recv_timeout(Duration::from_secs(2)) {
                    all.append(&mut f);
                }
            }
        }
        all
    }

    /// Stops every thread and closes the devices (a TAP the gateway created
    /// disappears with its last fd).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.waker.wake();
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
