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
//!
//! Module map: [`datapath`] is the translation core (decisions, no I/O);
//! `worker` reads frames, calls the core and carries out its actions; the
//! `control` thread runs the gateway's own stack (`local`) and resolves
//! neighbours; `classify` decides once where a frame goes; `start` opens the
//! devices and spawns the threads. The policy (egress, paired pool
//! addresses, steering) is [`crate::policy`].
mod buf;
mod classify;
mod control;
pub mod datapath;
pub mod dhcp;
pub(crate) mod failure;
mod live;
mod local;
pub mod neighbour;
mod start;
pub mod stats;
pub mod taps;
mod worker;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::device::{FrameIo, TapError, Waker};
use crate::nat::frag::FragKey;
use crate::nat::Flow;
pub use crate::policy::{paired_address, Addressing, Egress, Side};
pub use buf::{Buf, Pool};
pub use classify::Disposition;
pub use datapath::{Action, Core, CoreParts, FragRewrite, Packet};
pub use failure::{panic_message, thread_role, Failure};
pub use live::{
    FlowPredicate, ForwardChange, ForwardPort, ForwardRefused, ForwardReply, TableLimits,
};
use stats::{Counters, Snapshot};

/// To a worker.
pub enum WorkerMsg {
    /// Packets this worker owns, read by another.
    Packets(Vec<Packet>),
    /// A neighbour was learned, changed, went stale or was removed.
    Neighbour(Ipv4Addr, neighbour::News),
    /// A frame the control thread made (an ICMP error to translate back
    /// to its sender): handle it as if it had been read on `Side`.
    Frame(Side, Buf),
    /// Send a copy of the flow table.
    Flows(Sender<Vec<Flow>>),
    /// The first fragment of a datagram this worker tracks was translated:
    /// apply the same rewrite to its other fragments.
    FragTranslation(FragKey, FragRewrite),
    /// Remove the flows the predicate selects; answer how many.
    Flush(live::FlowPredicate, Sender<usize>),
    /// Change the forwards this worker owns (see [`live`]).
    Forwards(Arc<live::ForwardChange>, Sender<live::ForwardReply>),
    /// Rules changed at run time: classify with these from now on.
    Addressing(Arc<Addressing>),
    /// The flow table's limits changed at run time (a reload).
    Limits(live::TableLimits),
    /// The per-pod limits changed at run time: this worker's shares of
    /// `nat.max_flows_per_pod` and `nat.ports_per_pod`.
    PodLimits(u32, u32),
}

/// To the control thread.
pub enum CtrlMsg {
    /// A frame for the gateway's own stack (ARP for it, echo request to
    /// it), copied out of its pool buffer; it holds a place in
    /// [`Shared::local`] until handled.
    Local {
        side: Side,
        frame: local::LocalFrame,
    },
    /// What a worker noticed about a neighbour (ARP overheard, a stale
    /// entry used or confirmed).
    Neighbour(neighbour::Event),
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
    /// Read and write the worker queues in bursts through io_uring.
    pub io_uring: bool,
    /// Pin worker k to CPU k.
    pub pin: bool,
}

/// Frames the gateway makes itself (ARP, ICMP errors, echo replies on a
/// 1500-byte link) are put behind a zeroed virtio-net header on the stack;
/// larger ones (echo replies on a jumbo link) on the heap.
const OWN_FRAME_STACK: usize = 2048;

/// Frames in flight from the workers to the control thread for resolution:
/// with the frames it holds (see [`neighbour::Params::max_held`]), this
/// bounds the buffers a pod sending to unused addresses can pin.
const RESOLVING_MAX: usize = 64;

/// One queue of each device per worker.
type Queues = Vec<Box<dyn FrameIo>>;

/// What the workers and the control thread share.
pub(crate) struct Shared {
    /// The addressing now: replaced whole on a reload or a new DHCP lease
    /// (never read per packet: each worker's core has its own copy, sent
    /// with `WorkerMsg::Addressing`). See [`Shared::publish_addressing`].
    addressing: RwLock<Arc<Addressing>>,
    /// The DHCP lease in use (`uplink.address = "dhcp"`), as the control
    /// thread last stored it.
    lease: Mutex<Option<dhcp::Lease>>,
    /// Queue k of each device belongs to worker k; the control thread
    /// writes on queue 0.
    pod: Queues,
    uplink: Queues,
    wakers: Vec<Waker>,
    ctrl_waker: Waker,
    stop: AtomicBool,
    pool: Pool,
    start: Instant,
    tuning: Tuning,
    /// Whether the kernel steers frames to their owner's queue (eBPF).
    steering: bool,
    /// The pod and uplink device names, for messages.
    names: [String; 2],
    /// What the runner should warn about (said once, at start).
    warnings: Vec<String>,
    /// The devices' namespaces (pod, uplink), watched by the control thread
    /// for deletion; `None` when neither can be watched.
    netns_watch: Option<(crate::device::NetnsWatch, [Option<std::path::PathBuf>; 2])>,
    /// Why the gateway stopped by itself (see [`failure`]); bounded, the
    /// first failure is the one that matters.
    failures: (Sender<Failure>, Receiver<Failure>),
    /// Worker k's gauges, stored by the worker once per loop iteration
    /// (relaxed): gauges that cost no worker a stall.
    gauges: Vec<WorkerGauges>,
    /// Entries of the control thread's (authoritative) neighbour table,
    /// stored by it once per loop iteration.
    neighbours: AtomicU64,
    /// Frames queued for the local stack, per side (bounded).
    local: local::LocalBudget,
    /// Frames on their way to the control thread to be resolved (at most
    /// [`RESOLVING_MAX`]; a worker drops the ones beyond).
    resolving: std::sync::atomic::AtomicUsize,
    /// Copies for `tapnat events` and `tapnat capture` (off when unused).
    taps: Arc<taps::Taps>,
    /// TEST-ONLY fault hook (debug builds only, never in a release binary):
    /// thread index + 1 (workers 0..N, then the control thread) that is to
    /// panic at its next loop iteration; 0 = none. See `Gateway::inject_panic`.
    #[cfg(debug_assertions)]
    fault: std::sync::atomic::AtomicUsize,
}

/// TEST-ONLY: the bit of `Shared::fault` that asks for a forbidden system
/// call rather than a panic.
#[cfg(debug_assertions)]
const SYSCALL_FAULT: usize = 1 << (usize::BITS - 1);

/// What one worker publishes for other threads (see `Worker::publish`).
#[derive(Default)]
struct WorkerGauges {
    /// Live flows in its table.
    flows: AtomicU64,
    /// Datagrams its fragment cache tracks.
    fragments_tracked: AtomicU64,
    /// Fragments its cache holds until their first fragment comes.
    fragments_held: AtomicU64,
}

impl Shared {
    /// The addressing now.
    fn addressing(&self) -> Arc<Addressing> {
        self.addressing
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
    /// Replaces the addressing with what `make` builds from the current one
    /// and sends it to every worker, holding the lock until all are sent
    /// so that two publishers (a reload, a lease change) reach every worker
    /// in the order they stored. Workers never take this lock, and the
    /// control thread's channel is unbounded, so the sends cannot wait on
    /// the lock. Returns the old and the new addressing.
    fn publish_addressing(
        &self,
        workers: &[Sender<WorkerMsg>],
        make: impl FnOnce(&Addressing) -> Addressing,
    ) -> (Arc<Addressing>, Arc<Addressing>) {
        let mut cur = self
            .addressing
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let new = Arc::new(make(&cur));
        let old = std::mem::replace(&mut *cur, new.clone());
        for (k, w) in workers.iter().enumerate() {
            if w.send(WorkerMsg::Addressing(new.clone())).is_ok() {
                self.wakers[k].wake();
            }
        }
        (old, new)
    }
    fn name(&self, side: Side) -> &str {
        match side {
            Side::Pod => &self.names[0],
            Side::Uplink => &self.names[1],
        }
    }
    /// TEST-ONLY fault hook: panics if thread `index` was asked to (debug
    /// builds only; a release build has no such check).
    /// With [`SYSCALL_FAULT`] set, the thread makes a system call outside
    /// every seccomp list instead (see `crate::sandbox`).
    #[cfg(debug_assertions)]
    fn fault_point(&self, index: usize) {
        let f = self.fault.load(Ordering::Relaxed);
        if f & !SYSCALL_FAULT == index + 1 {
            self.fault.store(0, Ordering::Relaxed);
            if f & SYSCALL_FAULT != 0 {
                let ppid = crate::sandbox::forbidden_syscall();
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "tapnat: test-only fault: getppid() = {ppid}, no seccomp filter stopped it"
                );
                return;
            }
            panic!("test-only fault injected");
        }
    }
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
    fn device(&self, side: Side, queue: usize) -> &dyn FrameIo {
        match side {
            Side::Pod => &*self.pod[queue],
            Side::Uplink => &*self.uplink[queue],
        }
    }
    /// Writes a buffer (header and frame) to `side`'s queue `queue`.
    fn send_buf(&self, side: Side, queue: usize, buf: &Buf) -> std::io::Result<()> {
        self.capture_out(side, buf.frame());
        self.device(side, queue).write(buf.wire())
    }
    /// A frame written to `side`, for a running capture (one relaxed load
    /// when none runs).
    #[inline]
    fn capture_out(&self, side: Side, frame: &[u8]) {
        let cap = &self.taps.capture;
        if cap.sides() & taps::side_bit(side) != 0 {
            cap.offer(side, taps::Way::Out, frame, &self.taps.counters);
        }
    }
    /// Writes a frame the gateway made itself (no offload metadata).
    fn send_frame(&self, side: Side, queue: usize, frame: &[u8]) -> std::io::Result<()> {
        self.capture_out(side, frame);
        let hdr = self.pool.hdr();
        if hdr == 0 {
            return self.device(side, queue).write(frame);
        }
        let mut b = [0u8; OWN_FRAME_STACK];
        let n = hdr + frame.len();
        if n > b.len() {
            let mut v = vec![0u8; n];
            v[hdr..].copy_from_slice(frame);
            return self.device(side, queue).write(&v);
        }
        b[hdr..n].copy_from_slice(frame);
        self.device(side, queue).write(&b[..n])
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot open the pod device")]
    PodDevice(#[source] TapError),
    #[error("cannot open the uplink device")]
    UplinkDevice(#[source] TapError),
    #[error("cannot open the raw uplink")]
    RawUplink(#[source] crate::device::RawError),
    /// The config does not fit the system (a raw uplink's interface is
    /// missing or has a kernel address): found before any device is touched.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot turn on offloads on the {0} device")]
    Offload(&'static str, #[source] std::io::Error),
    #[error("cannot create a wake-up eventfd")]
    Waker(#[source] std::io::Error),
    #[error("cannot watch the devices' namespaces")]
    NetnsWatch(#[source] std::io::Error),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot set up the forward of port {0}")]
    Forward(u16, #[source] crate::nat::ForwardError),
}

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

    /// Live flows in every worker's table, as each worker last published
    /// it (at most one loop iteration old); unlike [`Observer::flows`] it
    /// copies nothing and stalls no worker.
    pub fn flow_count(&self) -> u64 {
        self.sum_gauges(|g| &g.flows)
    }

    /// Datagrams tracked and fragments held by every worker's fragment
    /// cache, published like [`Observer::flow_count`].
    pub fn fragment_counts(&self) -> (u64, u64) {
        (
            self.sum_gauges(|g| &g.fragments_tracked),
            self.sum_gauges(|g| &g.fragments_held),
        )
    }

    /// Entries of the neighbour table (both sides, resolved and still
    /// resolving), as the control thread last published it.
    pub fn neighbour_count(&self) -> u64 {
        self.shared.neighbours.load(Ordering::Relaxed)
    }

    /// The DHCP lease in use and the gateway clock (ms) to read its time
    /// left against; `None` without a lease.
    pub fn lease(&self) -> Option<dhcp::Lease> {
        *self
            .shared
            .lease
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The gateway clock (ms since start), as [`dhcp::Lease`] times are.
    pub fn now_ms(&self) -> u64 {
        self.shared.now_ms()
    }

    /// Where `tapnat events` and `tapnat capture` take their copies.
    pub fn taps(&self) -> &Arc<taps::Taps> {
        &self.shared.taps
    }

    fn sum_gauges(&self, field: impl Fn(&WorkerGauges) -> &AtomicU64) -> u64 {
        self.shared
            .gauges
            .iter()
            .map(|g| field(g).load(Ordering::Relaxed))
            .sum()
    }
}

impl Gateway {
    /// Opens both devices and starts the workers and the control thread.
    /// The config must have been validated (see `Config::load`).
    pub fn start(config: &crate::config::Config) -> Result<Gateway, GatewayError> {
        start::start(config, neighbour::Params::TAPNAT)
    }

    /// The gateway's addresses, MACs and rules now.
    pub fn addressing(&self) -> Arc<Addressing> {
        self.shared.addressing()
    }

    /// The DHCP lease in use (`uplink.address = "dhcp"`); `None` without
    /// one or with a fixed address.
    pub fn lease(&self) -> Option<dhcp::Lease> {
        self.observer().lease()
    }

    /// Warnings found while opening the devices (e.g. IPv4 forwarding on
    /// in a raw uplink's namespace), for the runner to print.
    pub fn warnings(&self) -> &[String] {
        &self.shared.warnings
    }

    /// The uplink device's name: the TAP, or a raw uplink's interface.
    pub fn uplink_name(&self) -> &str {
        &self.shared.names[1]
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

    /// Live flows in every worker's table (see [`Observer::flow_count`]).
    pub fn flow_count(&self) -> u64 {
        self.observer().flow_count()
    }

    /// Why the gateway stopped by itself: a gateway thread panicked or a
    /// device went away. Nothing arrives while it runs well; once something
    /// has, every thread is stopping and the runner should call
    /// [`Gateway::stop`] and exit non-zero.
    pub fn failures(&self) -> Receiver<Failure> {
        self.shared.failures.1.clone()
    }

    /// TEST-ONLY fault hook, compiled into debug builds only (a release
    /// binary has no such method and no check in any loop): makes thread
    /// `index` panic at its next loop iteration, worker k for `index < N`,
    /// the control thread for `index == N`. The end-to-end tests use it
    /// (through `tapnat run`'s SIGUSR2, also debug-only) to prove that a
    /// panic stops the whole gateway.
    #[cfg(debug_assertions)]
    pub fn inject_panic(&self, index: usize) {
        self.shared.fault.store(index + 1, Ordering::Relaxed);
        match self.shared.wakers.get(index) {
            Some(w) => w.wake(),
            None => self.shared.ctrl_waker.wake(),
        }
    }

    /// TEST-ONLY fault hook, debug builds only, like
    /// [`Gateway::inject_panic`]: thread `index` makes a system call that no
    /// seccomp list allows, so that the end-to-end tests (through `tapnat
    /// run`'s SIGPWR, also debug-only) see the filter kill the process.
    #[cfg(debug_assertions)]
    pub fn inject_forbidden_syscall(&self, index: usize) {
        self.shared
            .fault
            .store((index + 1) | SYSCALL_FAULT, Ordering::Relaxed);
        match self.shared.wakers.get(index) {
            Some(w) => w.wake(),
            None => self.shared.ctrl_waker.wake(),
        }
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
