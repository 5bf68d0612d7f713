//! The worker itself, driven through in-memory devices: frames injected on
//! one side come out translated on the other, errors the core decides are
//! built and written by the worker, and control-thread traffic goes to its
//! channel. No TAP, no root.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver};

use super::*;
use crate::device::MemDevice;
use crate::gateway::datapath::tests::{
    dst, pod_ep, rig, src, up_ep, view, Setup, EXT, GW, GW_MAC, ONE, ON_LINK, POD, REMOTE,
};
use crate::gateway::{Queues, Tuning};
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
        let r = rig(s);
        let pod = Arc::new(MemDevice::new().unwrap());
        let uplink = Arc::new(MemDevice::new().unwrap());
        let q = |d: &Arc<MemDevice>| -> Queues { vec![Box::new(d.clone())] };
        let tuning = Tuning {
            offload: false,
            busy_poll: Duration::ZERO,
            pin: false,
        };
        let shared = Arc::new(
            Shared::new(
                (*r.a).clone(),
                q(&pod),
                q(&uplink),
                r.pool.clone(),
                tuning,
                false,
            )
            .unwrap(),
        );
        let (to_worker, rx) = bounded(16);
        let (ctrl_tx, ctrl) = unbounded();
        let links = Links {
            rx,
            peers: vec![to_worker.clone()],
            ctrl: ctrl_tx,
        };
        let c = r.c.clone();
        let w = Worker::new(0, r.core, shared.clone(), c.clone(), links);
        let thread = Some(std::thread::spawn(move || w.run()));
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
    let a = w.shared.addressing.clone();
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
    // The pod was reported to the control thread.
    assert!(matches!(
        w.ctrl.recv_timeout(WAIT),
        Ok(CtrlMsg::Seen(POD, _))
    ));
}

#[test]
fn the_worker_writes_the_icmp_errors_the_core_decides() {
    let mut w = Running::start(ONE);
    let a = w.shared.addressing.clone();
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
    let a = w.shared.addressing.clone();
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
        .send(WorkerMsg::Neighbour(ON_LINK, GW_MAC))
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
