//! The worker itself, driven through in-memory devices: frames injected on
//! one side come out translated on the other, errors the core decides are
//! built and written by the worker, and control-thread traffic goes to its
//! channel. No TAP, no root.
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver};

use super::*;
use crate::device::MemDevice;
use crate::gateway::datapath::tests::{
    dst, pod_ep, rig, src, up_ep, view, Setup, EXT, FORWARDED, GW, GW_MAC, ONE, ON_LINK, POD,
    REMOTE, TARGET,
};
use crate::gateway::{Queues, Tuning, WorkerGauges};
use crate::wire::{self, build, L4};

const WAIT: Duration = Duration::from_secs(5);

struct Running {
    pod: Arc<MemDevice>,
    uplink: Arc<MemDevice>,
    shared: Arc<Shared>,
    to_worker: Sender<WorkerMsg>,
    ctrl: Receiver<CtrlMsg>,
    c: Arc<Counters>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(s: Setup) -> Running {
        Running::start_with(s, None)
    }

    /// As [`Running::start`], with `pod_queue` read and written instead of
    /// the in-memory pod device; the worker runs guarded, as in a gateway.
    fn start_with(s: Setup, pod_queue: Option<Box<dyn crate::device::FrameIo>>) -> Running {
        Running::start_full(s, pod_queue, 1024)
    }

    /// As [`Running::start_with`], with a control queue of `ctrl_cap`.
    fn start_full(
        s: Setup,
        pod_queue: Option<Box<dyn crate::device::FrameIo>>,
        ctrl_cap: usize,
    ) -> Running {
        let r = rig(s);
        let pod = Arc::new(MemDevice::new().unwrap());
        let uplink = Arc::new(MemDevice::new().unwrap());
        let q = |d: &Arc<MemDevice>| -> Queues { vec![Box::new(d.clone())] };
        let pod_queues = match pod_queue {
            Some(d) => vec![d],
            None => q(&pod),
        };
        let tuning = Tuning {
            offload: false,
            busy_poll: Duration::ZERO,
            io_uring: false,
            pin: false,
        };
        let shared = Arc::new(
            Shared::new(
                (*r.a).clone(),
                pod_queues,
                q(&uplink),
                r.pool.clone(),
                tuning,
                false,
            )
            .unwrap(),
        );
        let (to_worker, rx) = bounded(16);
        let (ctrl_tx, ctrl) = bounded(ctrl_cap);
        let links = Links {
            rx,
            peers: vec![to_worker.clone()],
            ctrl: ctrl_tx,
        };
        let c = r.c.clone();
        let w = Worker::new(0, r.core, shared.clone(), c.clone(), links);
        let guard = shared.clone();
        let thread = Some(std::thread::spawn(move || {
            crate::gateway::failure::guarded(&guard, "worker 0".into(), || w.run())
        }));
        Running {
            pod,
            uplink,
            shared,
            to_worker,
            ctrl,
            c,
            thread,
        }
    }

    fn one_out(dev: &MemDevice) -> Vec<u8> {
        let mut got = dev.wait_written(1, WAIT);
        assert_eq!(got.len(), 1, "one frame written");
        got.pop().unwrap()
    }
}

impl Running {
    /// Stops the worker and waits for it, so its counters are final.
    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wakers[0].wake();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn frames_in_on_one_side_come_out_translated_on_the_other() {
    let mut w = Running::start(ONE);
    let a = w.shared.addressing();
    let q = build::udp(&pod_ep(&a, POD, REMOTE), 5353, 53, b"query", true);
    w.pod.inject(&q);
    let out = Running::one_out(&w.uplink);
    assert_eq!(src(&out), (EXT, 5353));
    assert_eq!(wire::macs(&out), (GW_MAC, a.uplink_mac));
    assert!(build::checksums_ok(&out));
    let reply = build::udp(&up_ep(&a, REMOTE, EXT), 53, 5353, b"answer", true);
    w.uplink.inject(&reply);
    let back = Running::one_out(&w.pod);
    assert_eq!(dst(&back), (POD, 5353));
    w.stop();
    assert_eq!(w.c.get(Counter::PodRxFrames), 1);
    assert_eq!(w.c.get(Counter::UplinkTxFrames), 1);
    assert_eq!(w.c.get(Counter::PodTxFrames), 1);
    // Data frames teach the control thread nothing about neighbours.
    assert!(w.ctrl.try_recv().is_err());
}

#[test]
fn local_frames_are_copied_small_and_a_full_control_queue_drops_never_blocks() {
    let mut w = Running::start_full(ONE, None, 2);
    let a = w.shared.addressing();
    let ping = build::icmp_echo(&up_ep(&a, REMOTE, EXT), true, 7, 1, &[1; 100]);
    for _ in 0..5 {
        w.uplink.inject(&ping);
    }
    eventually("the worker read all five", || {
        w.c.get(Counter::UplinkRxFrames) == 5
    });
    w.stop();
    assert_eq!(w.c.get(Counter::DropControlQueueFull), 3);
    // The two queued still hold their places; the refused gave theirs back.
    let echo = crate::gateway::local::Ask::Echo;
    assert_eq!(w.shared.local.queued(Side::Uplink, echo), 2);
    for _ in 0..2 {
        match w.ctrl.try_recv() {
            Ok(CtrlMsg::Local { side, frame }) => {
                assert_eq!(side, Side::Uplink);
                assert_eq!(&frame[..], &ping[..], "the frame alone, in its own buffer");
            }
            _ => panic!("not a local frame"),
        }
    }
    assert!(w.ctrl.try_recv().is_err());
}

#[test]
fn the_worker_writes_the_icmp_errors_the_core_decides() {
    let mut w = Running::start(ONE);
    let a = w.shared.addressing();
    let mut e = pod_ep(&a, POD, REMOTE);
    e.ttl = 1;
    w.pod.inject(&build::udp(&e, 1000, 53, b"q", true));
    let err = Running::one_out(&w.pod);
    let v = view(&err);
    assert_eq!((v.src, v.dst), (a.pod_ip(), POD));
    assert!(matches!(v.l4, L4::IcmpError { icmp_type: 11, .. }));
    w.stop();
    assert_eq!(w.c.get(Counter::IcmpErrorsSent), 1);
    assert_eq!(w.c.get(Counter::DropTtlExceeded), 1);
    assert!(w.uplink.take_written().is_empty());
}

#[test]
fn unknown_next_hops_and_local_frames_go_to_the_control_thread() {
    let w = Running::start(ONE);
    let a = w.shared.addressing();
    w.pod
        .inject(&build::udp(&pod_ep(&a, POD, ON_LINK), 5353, 53, b"q", true));
    let mut saw_resolve = false;
    while let Ok(m) = w.ctrl.recv_timeout(WAIT) {
        if let CtrlMsg::Resolve { side, next_hop, .. } = m {
            assert_eq!((side, next_hop), (Side::Uplink, ON_LINK));
            saw_resolve = true;
            break;
        }
    }
    assert!(saw_resolve);
    // Once the neighbour is announced, frames to it go straight out.
    w.to_worker
        .send(WorkerMsg::Neighbour(
            ON_LINK,
            crate::gateway::neighbour::News::Reachable(GW_MAC),
        ))
        .unwrap();
    // Messages are handled in order: once the flows come back, so has the
    // neighbour.
    let (tx, flows) = bounded(1);
    w.to_worker.send(WorkerMsg::Flows(tx)).unwrap();
    w.shared.wakers[0].wake();
    assert_eq!(flows.recv_timeout(WAIT).unwrap().len(), 1);
    w.pod.inject(&build::udp(
        &pod_ep(&a, POD, ON_LINK),
        5353,
        53,
        b"q2",
        true,
    ));
    let out = Running::one_out(&w.uplink);
    assert_eq!(dst(&out).0, ON_LINK);
    let ping = build::icmp_echo(&up_ep(&a, GW, EXT), true, 1, 1, b"");
    w.uplink.inject(&ping);
    loop {
        match w.ctrl.recv_timeout(WAIT) {
            Ok(CtrlMsg::Local { side, .. }) => break assert_eq!(side, Side::Uplink),
            Ok(_) => continue,
            Err(e) => panic!("no local frame: {e}"),
        }
    }
}

/// A queue whose device was deleted: poll(2) reports it (`POLLERR`, here an
/// eventfd kept readable) and every read fails with `EBADFD`, as the tun
/// driver does after `ip link del`.
struct Deleted(crate::device::Waker);

impl crate::device::FrameIo for Deleted {
    fn read(&self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::Error::from_raw_os_error(libc::EBADFD))
    }
    fn write(&self, _: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EBADFD))
    }
    fn poll_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

#[test]
fn a_deleted_device_stops_the_worker_and_is_reported_once_not_spun_on() {
    let gone = crate::device::Waker::new().unwrap();
    gone.wake();
    let mut w = Running::start_with(ONE, Some(Box::new(Deleted(gone))));
    let failures = w.shared.failures.1.clone();
    match failures.recv_timeout(WAIT) {
        Ok(crate::gateway::Failure::DeviceGone {
            side,
            device,
            error,
        }) => {
            assert_eq!(side, Side::Pod);
            assert_eq!(device, "pod");
            assert_eq!(error.raw_os_error(), Some(libc::EBADFD));
        }
        other => panic!("{other:?}"),
    }
    let t = w.thread.take().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while !t.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(t.is_finished(), "the worker stopped by itself");
    t.join().unwrap();
    assert!(w.shared.stop.load(Ordering::SeqCst));
    assert_eq!(w.c.get(Counter::TapReadFails), 1);
    assert!(failures.try_recv().is_err());
}

#[cfg(debug_assertions)]
#[test]
fn a_panicking_worker_is_reported_by_name_and_stops_the_gateway() {
    let mut w = Running::start(ONE);
    w.shared.fault.store(1, Ordering::Relaxed);
    w.shared.wakers[0].wake();
    match w.shared.failures.1.recv_timeout(WAIT) {
        Ok(crate::gateway::Failure::Panicked { thread, message }) => {
            assert_eq!(thread, "worker 0");
            assert_eq!(message, "test-only fault injected");
        }
        other => panic!("{other:?}"),
    }
    assert!(w.shared.stop.load(Ordering::SeqCst));
    // The panic was caught: the thread itself ends normally.
    w.thread.take().unwrap().join().unwrap();
}

/// Waits until `f` holds, checking as the worker's loop goes round.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !f() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_worker_counts_bytes_and_removed_flows_and_publishes_its_gauges() {
    let mut w = Running::start(Setup {
        max_flows: 1,
        ..ONE
    });
    let a = w.shared.addressing();
    let shared = w.shared.clone();
    let gauge =
        |which: fn(&WorkerGauges) -> &AtomicU64| which(&shared.gauges[0]).load(Ordering::Relaxed);
    // One flow each way: the IP lengths are counted (20 + 8 + payload).
    w.pod.inject(&build::udp(
        &pod_ep(&a, POD, REMOTE),
        5353,
        53,
        b"query",
        true,
    ));
    Running::one_out(&w.uplink);
    w.uplink.inject(&build::udp(
        &up_ep(&a, REMOTE, EXT),
        53,
        5353,
        b"answer",
        true,
    ));
    Running::one_out(&w.pod);
    assert_eq!(w.c.get(Counter::In2outBytes), 33);
    assert_eq!(w.c.get(Counter::Out2inBytes), 34);
    eventually("one live flow", || gauge(|g| &g.flows) == 1);
    // A second flow of the pod finds the one-flow table full; the first
    // (replied) flow cannot be dropped early, the second is refused.
    w.pod
        .inject(&build::udp(&pod_ep(&a, POD, REMOTE), 6000, 53, b"q", true));
    eventually("the table full", || w.c.get(Counter::DropTableFull) == 1);
    // A flush is counted with how many flows it removed.
    let (tx, rx) = bounded(1);
    let all: crate::gateway::live::FlowPredicate = Arc::new(|_| true);
    w.to_worker.send(WorkerMsg::Flush(all, tx)).unwrap();
    w.shared.wakers[0].wake();
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), 1);
    assert_eq!(w.c.get(Counter::FlowsFlushed), 1);
    eventually("no live flow", || gauge(|g| &g.flows) == 0);
    // An unreplied flow is evicted to make room for the next one, and the
    // table's own count of it reaches the counters.
    w.pod
        .inject(&build::udp(&pod_ep(&a, POD, REMOTE), 7000, 53, b"q", true));
    w.pod
        .inject(&build::udp(&pod_ep(&a, POD, REMOTE), 7001, 53, b"q", true));
    eventually("an eviction counted", || {
        w.c.get(Counter::FlowsEvicted) == 1
    });
    // A fragment that comes before its first fragment is held: the cache's
    // gauges show one datagram and one fragment.
    let mut big = build::udp(&pod_ep(&a, POD, REMOTE), 8000, 53, &[7u8; 3000], true);
    big[14 + 6] &= !0x40;
    big[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = wire::csum::checksum(&big[14..34]);
    big[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    let mut pieces = Vec::new();
    wire::fragment::fragment(&big, 1500, &mut |p: &[u8]| pieces.push(p.to_vec())).unwrap();
    w.pod.inject(&pieces[1]);
    eventually("a held fragment", || {
        gauge(|g| &g.fragments_tracked) == 1 && gauge(|g| &g.fragments_held) == 1
    });
    w.stop();
    assert_eq!(w.c.get(Counter::FlowsExpired), 0);
}

/// A pod queue that takes bursts ([`FrameIo::batches`]) through the trait's
/// own batch methods, over an in-memory device.
struct Bursts(Arc<MemDevice>);

impl crate::device::FrameIo for Bursts {
    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
    fn write(&self, frame: &[u8]) -> std::io::Result<()> {
        self.0.write(frame)
    }
    fn poll_fd(&self) -> std::os::fd::RawFd {
        self.0.poll_fd()
    }
    fn batches(&self) -> bool {
        true
    }
}

#[test]
fn a_batching_queue_is_read_in_bursts_and_written_together() {
    let pod = Arc::new(MemDevice::new().unwrap());
    let mut w = Running::start_with(ONE, Some(Box::new(Bursts(pod.clone()))));
    let a = w.shared.addressing();
    // More than one burst's worth, in order.
    let n = READ_BURST + 36;
    for i in 0..n {
        let port = 10000 + i as u16;
        pod.inject(&build::udp(&pod_ep(&a, POD, REMOTE), port, 53, b"q", true));
    }
    let out = w.uplink.wait_written(n, WAIT);
    assert_eq!(out.len(), n);
    for (i, f) in out.iter().enumerate() {
        assert_eq!(src(f).1, 10000 + i as u16, "frame {i} in order");
    }
    // The answers go out on the batching queue, through its outbox.
    for f in &out {
        let reply = build::udp(&up_ep(&a, REMOTE, EXT), 53, src(f).1, b"a", true);
        w.uplink.inject(&reply);
    }
    let back = pod.wait_written(n, WAIT);
    assert_eq!(back.len(), n);
    for (i, f) in back.iter().enumerate() {
        assert_eq!(dst(f), (POD, 10000 + i as u16));
    }
    w.stop();
    assert_eq!(w.c.get(Counter::PodRxFrames), n as u64);
    assert_eq!(w.c.get(Counter::UplinkTxFrames), n as u64);
    assert_eq!(w.c.get(Counter::PodTxFrames), n as u64);
    assert_eq!(w.c.get(Counter::TapWriteFails), 0);
}

#[test]
fn a_new_outside_address_flushes_the_old_ones_flows_and_moves_the_forwards() {
    let mut w = Running::start(ONE);
    let old = w.shared.addressing();
    w.pod.inject(&build::udp(
        &pod_ep(&old, POD, REMOTE),
        5353,
        53,
        b"q",
        true,
    ));
    assert_eq!(src(&Running::one_out(&w.uplink)), (EXT, 5353));
    // A DHCP lease hands out another address (same router).
    let new_ip = Ipv4Addr::new(203, 0, 113, 50);
    let mut new = old.with_uplink(Some((
        crate::net::Ipv4Net {
            addr: new_ip,
            prefix_len: 24,
        },
        GW,
    )));
    new.dhcp = true;
    w.to_worker
        .send(WorkerMsg::Addressing(Arc::new(new.clone())))
        .unwrap();
    w.shared.wakers[0].wake();
    let flows = || {
        let (tx, rx) = bounded(1);
        w.to_worker.send(WorkerMsg::Flows(tx)).unwrap();
        w.shared.wakers[0].wake();
        rx.recv_timeout(WAIT).unwrap()
    };
    assert!(flows().is_empty(), "{:?}", flows());
    // The old address's reply finds nothing; the same pod port leaves from
    // the new address.
    w.uplink
        .inject(&build::udp(&up_ep(&new, REMOTE, EXT), 53, 5353, b"a", true));
    w.pod.inject(&build::udp(
        &pod_ep(&new, POD, REMOTE),
        5353,
        53,
        b"q",
        true,
    ));
    assert_eq!(src(&Running::one_out(&w.uplink)).0, new_ip);
    // The forward is on the new address, and no longer on the old one.
    w.uplink.inject(&build::tcp(
        &up_ep(&new, REMOTE, EXT),
        40000,
        FORWARDED,
        wire::TCP_SYN,
        b"",
    ));
    w.uplink.inject(&build::tcp(
        &up_ep(&new, REMOTE, new_ip),
        40001,
        FORWARDED,
        wire::TCP_SYN,
        b"",
    ));
    let syn = Running::one_out(&w.pod);
    assert_eq!(dst(&syn), (TARGET, 80));
    assert_eq!(src(&syn), (REMOTE, 40001));
    w.stop();
    assert_eq!(w.c.get(Counter::FlowsAddressChange), 1);
    assert_eq!(w.c.get(Counter::DropNotForUs), 2, "two packets to {EXT}");
    assert!(w.pod.take_written().is_empty());
}
