//! A worker: reads its own queue of each device, hands every frame to its
//! [`Core`] and carries out the actions the core returns: writes to a
//! device, batches hand-offs to other workers, messages to the control
//! thread. All decisions are the core's; all I/O is here.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::control::tx_counter;
use super::datapath::{Action, Actions, Core, FragRewrite, Packet};
use super::failure::{device_gone, Failure};
use super::stats::{Counter, Counters};
use super::{Buf, CtrlMsg, Shared, Side, WorkerMsg};
use crate::device::Poller;
use crate::nat::frag::FragKey;
use crate::nat::TableStats;
use crate::wire::{self, ICMP_ERROR_FRAME_MAX};

/// Flow slots examined for expiry per wake-up: bounded work, never a stall.
const EXPIRE_BUDGET: usize = 256;
/// Frames read from one queue before looking at the other.
const READ_BURST: usize = 64;
/// Sleep at most this long in poll(2), so expiry keeps running when idle.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// A worker's channels: its inbox, every worker's inbox (its own included,
/// by index) and the control thread's.
pub(super) struct Links {
    pub rx: Receiver<WorkerMsg>,
    pub peers: Vec<Sender<WorkerMsg>>,
    pub ctrl: Sender<CtrlMsg>,
}

pub(super) struct Worker {
    k: usize,
    core: Core,
    shared: Arc<Shared>,
    c: Arc<Counters>,
    links: Links,
    /// What the core decided about the last frame, carried out at once.
    actions: Actions,
    /// Packets read here that other workers own, sent at the end of a burst.
    handoff: Vec<Vec<Packet>>,
    /// First-fragment rewrites for other workers, sent at the end of a burst.
    frag_news: Vec<(usize, FragKey, FragRewrite)>,
    wake_ctrl: bool,
    /// A buffer to read the next frame into.
    spare: Option<Buf>,
    /// The table's removal counts as last published to the counters.
    published: TableStats,
}

impl Worker {
    pub(super) fn new(
        k: usize,
        core: Core,
        shared: Arc<Shared>,
        c: Arc<Counters>,
        links: Links,
    ) -> Worker {
        let handoff = links.peers.iter().map(|_| Vec::new()).collect();
        Worker {
            k,
            core,
            shared,
            c,
            links,
            actions: Vec::new(),
            handoff,
            frag_news: Vec::new(),
            wake_ctrl: false,
            spare: None,
            published: TableStats::default(),
        }
    }

    pub(super) fn run(mut self) {
        if self.shared.tuning.pin {
            // Best effort: a CPU that is not there just leaves the thread unpinned.
            let _ = crate::device::sys::pin_current_thread(self.k);
        }
        let mut poller = Poller::new();
        let pod = poller.add(self.shared.pod[self.k].poll_fd());
        let uplink = poller.add(self.shared.uplink[self.k].poll_fd());
        let wake = poller.add(self.shared.wakers[self.k].as_raw_fd());
        let busy = self.shared.tuning.busy_poll;
        let mut spin_until = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            #[cfg(debug_assertions)]
            self.shared.fault_point(self.k);
            let timeout = if !busy.is_zero() && Instant::now() < spin_until {
                Duration::ZERO
            } else {
                IDLE_WAIT
            };
            if poller.wait(Some(timeout)).is_err() {
                continue;
            }
            let mut work = 0;
            if poller.readable(wake) {
                self.shared.wakers[self.k].drain();
                while let Ok(msg) = self.links.rx.try_recv() {
                    work += 1;
                    self.message(msg);
                }
            }
            if poller.readable(pod) {
                work += self.read_burst(Side::Pod);
            }
            if poller.readable(uplink) {
                work += self.read_burst(Side::Uplink);
            }
            self.flush();
            if work > 0 && !busy.is_zero() {
                spin_until = Instant::now() + busy;
            }
            let now = self.shared.now_ms();
            self.core.tick(now, EXPIRE_BUDGET, &mut self.actions);
            self.carry_out();
            self.publish();
        }
    }

    /// Once per loop iteration, never per packet: the gauges other threads
    /// read (live flows, fragment cache) and the flows the table removed
    /// since the last time (timeouts and evictions, counted by the table).
    fn publish(&mut self) {
        let g = &self.shared.gauges[self.k];
        g.flows
            .store(self.core.table().len() as u64, Ordering::Relaxed);
        let (tracked, held) = self
            .core
            .frag_stats()
            .map_or((0, 0), |f| (f.datagrams as u64, f.held as u64));
        g.fragments_tracked.store(tracked, Ordering::Relaxed);
        g.fragments_held.store(held, Ordering::Relaxed);
        let now = self.core.table().stats();
        if now != self.published {
            let was = std::mem::replace(&mut self.published, now);
            self.c.add(Counter::FlowsExpired, now.expired - was.expired);
            self.c
                .add(Counter::FlowsEvicted, now.early_dropped - was.early_dropped);
        }
    }

    fn message(&mut self, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Packets(batch) => {
                let now = self.shared.now_ms();
                for p in batch {
                    self.core.packet(p, now, &mut self.actions);
                    self.carry_out();
                }
            }
            WorkerMsg::Neighbour(ip, mac) => self.core.neighbour(ip, mac),
            WorkerMsg::Flows(reply) => {
                let _ = reply.send(self.core.flows());
            }
            WorkerMsg::FragTranslation(key, rewrite) => {
                let now = self.shared.now_ms();
                self.core
                    .first_fragment_seen(key, rewrite, now, &mut self.actions);
                self.carry_out();
            }
            WorkerMsg::Flush(pred, reply) => {
                let n = self.core.table_mut().remove_where(|f| pred(f));
                self.c.add(Counter::FlowsFlushed, n as u64);
                let _ = reply.send(n);
            }
            WorkerMsg::Forwards(change, reply) => self.change_forwards(&change, reply),
            WorkerMsg::Addressing(a) => self.core.set_addressing(a),
            WorkerMsg::Limits(l) => {
                self.core
                    .table_mut()
                    .set_limits(l.max_flows, l.timeouts, l.filtering);
                self.core.set_icmp_limit(l.icmp_limit);
            }
            WorkerMsg::PodLimits(flows, ports) => {
                self.core.table_mut().set_pod_limits(flows, ports);
            }
        }
    }

    /// An operator's change of the forwards (`tapnat forward`, reload).
    fn change_forwards(
        &mut self,
        c: &super::live::ForwardChange,
        reply: Sender<super::live::ForwardReply>,
    ) {
        let r = self
            .core
            .table_mut()
            .change_forwards(&c.remove, &c.add, c.ext_addr, c.dry_run);
        if let (Ok(n), false) = (&r, c.dry_run) {
            // The removed forwards' flows went with them.
            self.c.add(Counter::FlowsFlushed, *n as u64);
        }
        let _ = reply.send(r);
    }

    /// Reads up to [`READ_BURST`] frames from our queue of `side`.
    fn read_burst(&mut self, side: Side) -> usize {
        let now = self.shared.now_ms();
        let shared = self.shared.clone();
        let dev = shared.device(side, self.k);
        for n in 0..READ_BURST {
            let mut buf = self.spare.take().unwrap_or_else(|| self.shared.pool.get());
            match dev.read(buf.read_space()) {
                Ok(len) if buf.set_wire_len(len) => {
                    self.c.inc(match side {
                        Side::Pod => Counter::PodRxFrames,
                        Side::Uplink => Counter::UplinkRxFrames,
                    });
                    self.core.frame(side, buf, now, &mut self.actions);
                    self.carry_out();
                }
                Ok(_) => {
                    self.c.inc(Counter::DropRunt);
                    self.spare = Some(buf);
                }
                Err(e) => {
                    self.spare = Some(buf);
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) {
                        self.c.inc(Counter::TapReadFails);
                        // A dead fd stays dead: stop the gateway rather than
                        // spin on poll(2) reporting POLLERR for ever.
                        if device_gone(&e) {
                            let device = self.shared.name(side).to_owned();
                            self.shared.fail(Failure::DeviceGone {
                                side,
                                device,
                                error: e,
                            });
                        }
                    }
                    return n;
                }
            }
        }
        READ_BURST
    }

    /// A buffer is free again: keep it for the next read, or give it back.
    fn recycle(&mut self, buf: Buf) {
        if self.spare.is_none() {
            self.spare = Some(buf);
        } else {
            self.shared.pool.put(buf);
        }
    }

    /// Carries out every action the core queued, in order.
    fn carry_out(&mut self) {
        let mut actions = std::mem::take(&mut self.actions);
        for a in actions.drain(..) {
            self.act(a);
        }
        self.actions = actions;
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Send { side, buf } => {
                match self.shared.send_buf(side, self.k, &buf) {
                    Ok(()) => self.c.inc(tx_counter(side)),
                    Err(_) => self.c.inc(Counter::TapWriteFails),
                }
                self.recycle(buf);
            }
            Action::Drop { why, buf } => {
                self.c.inc(why);
                self.recycle(buf);
            }
            Action::HandOff { worker, packet } => self.handoff[worker].push(packet),
            Action::Local { side, buf } => self.tell_control(CtrlMsg::Local { side, buf }),
            Action::Resolve {
                side,
                next_hop,
                buf,
            } => self.tell_control(CtrlMsg::Resolve {
                side,
                next_hop,
                buf,
            }),
            Action::Seen { ip, mac } => self.tell_control(CtrlMsg::Seen(ip, mac)),
            Action::FragNews {
                worker,
                key,
                rewrite,
            } => self.frag_news.push((worker, key, rewrite)),
            Action::Reject {
                to,
                kind,
                why,
                view,
                buf,
            } => {
                self.c.inc(why);
                let a = &self.shared.addressing;
                let mut out = [0u8; ICMP_ERROR_FRAME_MAX];
                let n =
                    wire::build_icmp_error(&mut out, buf.frame(), &view, a.mac(to), a.ip(to), kind);
                // Counted before the write makes it visible, so that whoever
                // sees the error also sees the count.
                self.c.inc(Counter::IcmpErrorsSent);
                match self.shared.send_frame(to, self.k, &out[..n]) {
                    Ok(()) => self.c.inc(tx_counter(to)),
                    Err(_) => self.c.inc(Counter::TapWriteFails),
                }
                self.recycle(buf);
            }
        }
    }

    fn tell_control(&mut self, msg: CtrlMsg) {
        let _ = self.links.ctrl.send(msg);
        self.wake_ctrl = true;
    }

    /// Sends the handed-off batches and wakes whoever has news.
    fn flush(&mut self) {
        for j in 0..self.handoff.len() {
            if self.handoff[j].is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.handoff[j]);
            match self.links.peers[j].try_send(WorkerMsg::Packets(batch)) {
                Ok(()) => self.shared.wakers[j].wake(),
                Err(e) => {
                    if let WorkerMsg::Packets(b) = e.into_inner() {
                        self.c.add(Counter::DropHandoffFull, b.len() as u64);
                        for p in b {
                            self.shared.pool.put(p.buf);
                        }
                    }
                }
            }
        }
        for (j, key, rewrite) in std::mem::take(&mut self.frag_news) {
            if self.links.peers[j]
                .try_send(WorkerMsg::FragTranslation(key, rewrite))
                .is_ok()
            {
                self.shared.wakers[j].wake();
            }
        }
        if std::mem::take(&mut self.wake_ctrl) {
            self.shared.ctrl_waker.wake();
        }
    }
}

#[cfg(test)]
mod tests;
