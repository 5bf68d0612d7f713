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
use super::{Addressing, Buf, CtrlMsg, Shared, Side, WorkerMsg};
use crate::device::Poller;
use crate::nat::frag::FragKey;
use crate::nat::TableStats;
use crate::wire::vnet::{GSO_ECN, GSO_UDP_L4};
use crate::wire::{self, ICMP_ERROR_FRAME_MAX};

/// Flow slots examined for expiry per wake-up: bounded work, never a stall.
const EXPIRE_BUDGET: usize = 256;
/// Frames read from one queue before looking at the other.
const READ_BURST: usize = 64;

/// The [`Worker::batch`] from which reads go through a batch: the last
/// read found at least 4 frames. Measured against 2 (`tapnat bench`, same
/// run, medians of 3): the same UDP 64 B rate (446 k against 451 k/s),
/// connects/s 14593 against 13496 (within the run's ±8 %), ping equal.
const BURST_FROM: usize = 8;

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
    /// Whether our queue of each side (pod, uplink) takes bursts
    /// ([`crate::device::FrameIo::batches`]): its frames are then read
    /// [`Worker::batch`] at a time into `stash`, and frames to send to it
    /// wait in `outbox` until the burst is done.
    batching: [bool; 2],
    /// Buffers to read the next batch into (batching only).
    stash: Vec<Buf>,
    /// A batch's frames between its read and its decisions, and the
    /// buffers it did not fill (kept, not reallocated, between batches).
    got: Vec<Buf>,
    spare_reads: Vec<Buf>,
    /// Frames to send, by side (pod, uplink), written together (batching only).
    outbox: [Vec<Buf>; 2],
    /// Reads to ask for in the next batch, by side: twice what the last
    /// read found, 2 to [`READ_BURST`]; below [`BURST_FROM`] the next read
    /// goes frame by frame.
    batch: [usize; 2],
    /// UDP super-frames the current read has found.
    read_uso: usize,
    /// The table's removal counts as last published to the counters.
    published: TableStats,
    /// The table's lost events as last published.
    events_lost: u64,
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
            batching: [false; 2],
            stash: Vec::new(),
            got: Vec::new(),
            spare_reads: Vec::new(),
            outbox: [Vec::new(), Vec::new()],
            batch: [2, 2],
            read_uso: 0,
            published: TableStats::default(),
            events_lost: 0,
        }
    }

    pub(super) fn run(mut self) {
        if self.shared.tuning.pin {
            // Best effort: a CPU that is not there just leaves the thread unpinned.
            let _ = crate::device::sys::pin_current_thread(self.k);
        }
        self.batching = [
            self.shared.pod[self.k].batches(),
            self.shared.uplink[self.k].batches(),
        ];
        let mut poller = Poller::new();
        let pod = poller.add(self.shared.pod[self.k].poll_fd());
        let uplink = poller.add(self.shared.uplink[self.k].poll_fd());
        let wake = poller.add(self.shared.wakers[self.k].as_raw_fd());
        // Adaptive polling: for `busy` after the last frame or message, poll
        // without sleeping, so that the answer to what was just forwarded
        // (a request's response, the next segment) costs no sleep and
        // wake-up; then sleep in poll(2) again, so an idle worker burns no CPU.
        let busy = self.shared.tuning.busy_poll;
        let mut spin_until = Instant::now();
        let mut ticked = u64::MAX;
        while !self.shared.stop.load(Ordering::Relaxed) {
            #[cfg(debug_assertions)]
            self.shared.fault_point(self.k);
            let spinning = !busy.is_zero() && Instant::now() < spin_until;
            let timeout = if spinning { Duration::ZERO } else { IDLE_WAIT };
            let ready = match poller.wait(Some(timeout)) {
                Ok(n) => n,
                Err(_) => continue,
            };
            if ready == 0 && spinning {
                std::hint::spin_loop();
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
                work += self.read_any(Side::Pod);
            }
            if poller.readable(uplink) {
                work += self.read_any(Side::Uplink);
            }
            self.send_outbox();
            self.flush();
            if work > 0 && !busy.is_zero() {
                spin_until = Instant::now() + busy;
            }
            // Expiry and the gauges after work, and otherwise once per
            // millisecond at most: a spinning worker does not scan the
            // table on every empty poll.
            let now = self.shared.now_ms();
            if work > 0 || now != ticked {
                ticked = now;
                self.core.tick(now, EXPIRE_BUDGET, &mut self.actions);
                self.carry_out();
                self.send_outbox();
                self.publish();
            }
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
        self.hand_over_events();
    }

    /// Once per loop iteration: the table journals flow events only while
    /// someone reads them (`tapnat events`, the mapping log), and what it
    /// journaled goes to the events thread without waiting; what does not
    /// fit is counted lost.
    fn hand_over_events(&mut self) {
        let tap = &self.shared.taps.events;
        let table = self.core.table_mut();
        let wanted = tap.wanted();
        if wanted != table.recording() {
            table.set_recording(wanted);
        }
        if !wanted {
            return;
        }
        let lost = table.events_lost();
        if lost != self.events_lost {
            self.c.add(Counter::EventsLost, lost - self.events_lost);
            self.events_lost = lost;
        }
        let unix_us = super::taps::unix_micros();
        let c = &self.c;
        table.drain_events(|event| {
            if !tap.offer(super::taps::Stamped { unix_us, event }) {
                c.inc(Counter::EventsLost);
            }
        });
    }

    fn message(&mut self, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Packets(batch) => {
                let now = self.shared.now_ms();
                if batch.len() > 1 {
                    for side in [Side::Pod, Side::Uplink] {
                        let frames = batch.iter().filter(|p| p.from == side);
                        self.core.warm(side, frames.map(|p| p.buf.frame()));
                    }
                }
                for p in batch {
                    self.core.packet(p, now, &mut self.actions);
                    self.carry_out();
                }
            }
            WorkerMsg::Neighbour(ip, news) => self.core.neighbour(ip, news),
            WorkerMsg::Frame(side, buf) => {
                let now = self.shared.now_ms();
                self.core.frame(side, buf, now, &mut self.actions);
                self.carry_out();
            }
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
            WorkerMsg::Addressing(a) => self.readdress(a),
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
        // With DHCP the address may have changed since the change was
        // made: forwards go on the address this worker translates to now.
        let ext_addr = match self.core.addressing() {
            a if a.dhcp => a.uplink_ip(),
            _ => c.ext_addr,
        };
        let r = self
            .core
            .table_mut()
            .change_forwards(&c.remove, &c.add, ext_addr, c.dry_run);
        if let (Ok(n), false) = (&r, c.dry_run) {
            // The removed forwards' flows went with them.
            self.c.add(Counter::FlowsFlushed, *n as u64);
        }
        let _ = reply.send(r);
    }

    /// Reads what is queued on `side`: a batch when the queue takes them
    /// and the last read found at least four frames (a flood), else frame
    /// by frame, since a few frames cost less through read(2) than through
    /// a batch (the request/response case).
    fn read_any(&mut self, side: Side) -> usize {
        let i = side_index(side);
        if !self.batching[i] {
            return self.read_burst(side);
        }
        self.read_uso = 0;
        let n = if self.batch[i] >= BURST_FROM {
            self.read_batch(side)
        } else {
            self.read_burst(side)
        };
        // Mostly UDP super-frames (USO): frame by frame, which measured
        // faster for them (`tapnat bench`, UDP GSO bulk 26 against 22 Gbit/s
        // through batches); TCP super-frames gain nothing from it.
        self.batch[i] = if n > 0 && 2 * self.read_uso >= n {
            2
        } else {
            (2 * n).clamp(2, READ_BURST)
        };
        self.send_outbox();
        n
    }

    /// Reads one batch from our queue of `side` (a queue that
    /// [`crate::device::FrameIo::batches`]), hands every frame to the core
    /// and sends what it decided together.
    fn read_batch(&mut self, side: Side) -> usize {
        let now = self.shared.now_ms();
        let shared = self.shared.clone();
        let dev = shared.device(side, self.k);
        let want = self.batch[side_index(side)];
        if let Some(b) = self.spare.take() {
            self.stash.push(b);
        }
        while self.stash.len() < want {
            self.stash.push(self.shared.pool.get());
        }
        let mut lens = [0usize; READ_BURST];
        let first = self.stash.len() - want;
        let read = {
            let mut bufs: Vec<&mut [u8]> = self.stash[first..]
                .iter_mut()
                .map(Buf::read_space)
                .collect();
            dev.read_batch(&mut bufs, &mut lens[..want])
        };
        let n = match read {
            Ok(n) => n,
            Err(e) => {
                self.read_failed(side, e);
                0
            }
        };
        if n == 0 {
            return 0;
        }
        // One load per batch: is a capture taking this side's frames?
        let capture = shared.taps.capture.sides() & super::taps::side_bit(side) != 0;
        let mut got = std::mem::take(&mut self.got);
        for (mut buf, &len) in self.stash.drain(first..).zip(&lens[..want]) {
            if len == 0 {
                // No frame in this one (a read after an empty one can still
                // find a frame that came meanwhile, so look at them all).
                self.spare_reads.push(buf);
            } else if buf.set_wire_len(len) {
                got.push(buf);
            } else {
                self.c.inc(Counter::DropRunt);
                self.spare_reads.push(buf);
            }
        }
        self.stash.append(&mut self.spare_reads);
        // The whole batch's flows prefetched before the first is decided.
        if got.len() > 1 {
            self.core.warm(side, got.iter().map(Buf::frame));
        }
        for buf in got.drain(..) {
            self.received(side, buf, now, capture);
        }
        self.got = got;
        n
    }

    /// Whether the last read of each side found fewer than four frames: no
    /// burst is going on, so frames are written as they are decided.
    fn lone(&self) -> bool {
        self.batch.iter().all(|&b| b < BURST_FROM)
    }

    /// Writes the frames waiting in the outbox, a side at a time: one
    /// frame with write(2), more as one batch.
    fn send_outbox(&mut self) {
        for side in [Side::Pod, Side::Uplink] {
            let i = side_index(side);
            if self.outbox[i].is_empty() {
                continue;
            }
            let out = std::mem::take(&mut self.outbox[i]);
            for buf in &out {
                self.shared.capture_out(side, buf.frame());
            }
            let dev = self.shared.device(side, self.k);
            let ok = match &out[..] {
                [one] => usize::from(dev.write(one.wire()).is_ok()),
                all => {
                    let frames: Vec<&[u8]> = all.iter().map(Buf::wire).collect();
                    dev.write_batch(&frames)
                }
            };
            self.c.add(tx_counter(side), ok as u64);
            self.c.add(Counter::TapWriteFails, (out.len() - ok) as u64);
            for buf in out {
                self.recycle(buf);
            }
        }
    }

    /// Counts a failed read other than an empty queue; a dead device stops
    /// the gateway.
    fn read_failed(&mut self, side: Side, e: std::io::Error) {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ) {
            return;
        }
        self.c.inc(Counter::TapReadFails);
        // A dead fd stays dead: stop the gateway rather than spin on
        // poll(2) reporting POLLERR for ever.
        if device_gone(&e) {
            let device = self.shared.name(side).to_owned();
            self.shared.fail(Failure::DeviceGone {
                side,
                device,
                error: e,
            });
        }
    }

    /// New addressing (a reload, a DHCP lease). When the outside address
    /// changed, every flow on the old one is flushed (MASQUERADE's
    /// `masq_inet_event`) and the forwards move to the new one (to
    /// `0.0.0.0`, nobody's, while there is no lease). Counted
    /// `flows_address_change`.
    fn readdress(&mut self, a: Arc<Addressing>) {
        let old = self.core.addressing().clone();
        if old.uplink_ip() != a.uplink_ip() {
            let gone = old.uplink_ip();
            let table = self.core.table_mut();
            let mut n = if old.has_address() {
                table.remove_address(gone)
            } else {
                0
            };
            let ports: Vec<_> = a
                .forward_targets
                .iter()
                .map(|(&(proto, to, to_port), &ext)| (proto, ext, to, to_port))
                .collect();
            let remove: Vec<_> = ports.iter().map(|&(p, ext, _, _)| (p, ext)).collect();
            // The same ports, freed and taken back at once: nothing else
            // can hold them, so this is not refused.
            if let Ok(k) = table.change_forwards(&remove, &ports, a.uplink_ip(), false) {
                n += k;
            }
            self.c.add(Counter::FlowsAddressChange, n as u64);
        }
        self.core.set_addressing(a);
    }

    /// Reads up to [`READ_BURST`] frames from our queue of `side`.
    fn read_burst(&mut self, side: Side) -> usize {
        let now = self.shared.now_ms();
        let shared = self.shared.clone();
        let dev = shared.device(side, self.k);
        // One load per burst: is a capture taking this side's frames?
        let capture = shared.taps.capture.sides() & super::taps::side_bit(side) != 0;
        for n in 0..READ_BURST {
            let mut buf = self.spare.take().unwrap_or_else(|| self.shared.pool.get());
            match dev.read(buf.read_space()) {
                Ok(len) if buf.set_wire_len(len) => self.received(side, buf, now, capture),
                Ok(_) => {
                    self.c.inc(Counter::DropRunt);
                    self.spare = Some(buf);
                }
                Err(e) => {
                    self.spare = Some(buf);
                    self.read_failed(side, e);
                    return n;
                }
            }
        }
        READ_BURST
    }

    /// A frame read from `side`: counted, offered to a running capture
    /// (`capture`: one load per burst said one runs), decided by the core
    /// and carried out.
    fn received(&mut self, side: Side, buf: Buf, now: u64, capture: bool) {
        if buf
            .vnet()
            .get(1)
            .is_some_and(|&t| t & !GSO_ECN == GSO_UDP_L4)
        {
            self.read_uso += 1;
        }
        self.c.inc(match side {
            Side::Pod => Counter::PodRxFrames,
            Side::Uplink => Counter::UplinkRxFrames,
        });
        if capture {
            let taps = &self.shared.taps;
            taps.capture
                .offer(side, super::taps::Way::In, buf.frame(), &taps.counters);
        }
        self.core.frame(side, buf, now, &mut self.actions);
        self.carry_out();
    }

    /// A buffer is free again: keep it for the next read, or give it back.
    fn recycle(&mut self, buf: Buf) {
        if self.spare.is_none() && self.shared.pool.owns(&buf) {
            self.spare = Some(buf);
        } else if self.batching.contains(&true)
            && self.stash.len() < READ_BURST
            && self.shared.pool.owns(&buf)
        {
            self.stash.push(buf);
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
            // Gathered for one batch write during bursts; while every
            // read finds one frame at a time (request/response), written
            // at once, as the outbox would cost the frame an empty read
            // first (about 1 µs of round trip, 10 % of connects/s).
            Action::Send { side, buf } if self.batching[side_index(side)] && !self.lone() => {
                self.outbox[side_index(side)].push(buf);
            }
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
            Action::Local { side, buf } => self.queue_local(side, buf),
            Action::Resolve {
                side,
                next_hop,
                buf,
            } => {
                let resolving = &self.shared.resolving;
                if resolving.fetch_add(1, Ordering::Relaxed) >= super::RESOLVING_MAX {
                    resolving.fetch_sub(1, Ordering::Relaxed);
                    self.c.inc(Counter::DropNeighbourQueueFull);
                    return self.recycle(buf);
                }
                self.tell_control(CtrlMsg::Resolve {
                    side,
                    next_hop,
                    buf,
                })
            }
            Action::Neighbour(e) => self.tell_control(CtrlMsg::Neighbour(e)),
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
                let a = self.core.addressing().clone();
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

    /// Queues a frame for the gateway's own stack: copied into a buffer of
    /// its own length (the pool buffer is reused at once), within the
    /// side's bound of waiting frames.
    fn queue_local(&mut self, side: Side, buf: Buf) {
        if !self.shared.local.take(side, buf.frame()) {
            self.c.inc(Counter::DropLocalQueueFull);
            return self.recycle(buf);
        }
        let frame = buf.frame().into();
        self.recycle(buf);
        self.tell_control(CtrlMsg::Local { side, frame });
    }

    /// Never blocks: when the control thread's queue is full the message is
    /// dropped (its buffer recycled) and counted.
    fn tell_control(&mut self, msg: CtrlMsg) {
        match self.links.ctrl.try_send(msg) {
            Ok(()) => {}
            Err(e) => {
                self.c.inc(Counter::DropControlQueueFull);
                match e.into_inner() {
                    CtrlMsg::Local { side, frame } => self.shared.local.done(side, &frame),
                    CtrlMsg::Resolve { buf, .. } => self.recycle(buf),
                    CtrlMsg::Neighbour(_) => {}
                }
            }
        }
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

fn side_index(side: Side) -> usize {
    match side {
        Side::Pod => 0,
        Side::Uplink => 1,
    }
}

#[cfg(test)]
mod tests;
