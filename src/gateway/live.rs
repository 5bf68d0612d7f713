//! Operator changes to a running gateway, carried to every worker over its
//! channel: a flush of the flows a predicate selects (`tapnat flush`), a
//! change of the forwards (`tapnat forward add|del`, a reload) and new
//! rules for classification. Each worker applies its share between two
//! frames, so no lock is taken on the data path.
//!
//! A forward change spans workers (a port range is spread over them by
//! `port % N`), so it is made in two rounds: every worker first checks its
//! share (a dry run), then applies it; each worker's share is all or
//! nothing. Only a dynamic mapping created between the rounds can make the
//! second fail, and then the workers that did apply are given the inverse
//! change, so the set stays as it was. The forwards' steering (the
//! addressing) is sent to every worker after the tables changed.
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Sender};

use super::{Addressing, Observer, WorkerMsg};
use crate::nat::{Filtering, Flow, ForwardError, Proto, Timeouts};
use crate::wire::icmp::IcmpRateLimit;

/// Which flows a flush removes.
pub type FlowPredicate = Arc<dyn Fn(&Flow) -> bool + Send + Sync>;

/// A forwarded port: (protocol, outside port, target address, target port).
pub type ForwardPort = (Proto, u16, Ipv4Addr, u16);

/// One worker's answer to a [`ForwardChange`]: flows that went with
/// removed forwards, or the first port it refused.
pub type ForwardReply = Result<usize, (u16, ForwardError)>;

/// Forwards to remove and add; each worker takes the ports it owns.
pub struct ForwardChange {
    pub remove: Vec<(Proto, u16)>,
    pub add: Vec<ForwardPort>,
    pub ext_addr: Ipv4Addr,
    pub dry_run: bool,
}

/// The flow table's limits, as a reload changes them.
#[derive(Debug, Clone, Copy)]
pub struct TableLimits {
    /// One worker's share of `nat.max_flows`.
    pub max_flows: usize,
    pub timeouts: Timeouts,
    pub filtering: Filtering,
    /// One worker's share of the ICMP error budget; None for no limit.
    pub icmp_limit: Option<IcmpRateLimit>,
}

/// How long a worker may take to answer an operator's request.
const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Why a forward change was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardRefused {
    #[error("port {port}: {why}")]
    Table { port: u16, why: ForwardError },
    #[error("a worker did not answer")]
    NoAnswer,
}

impl Observer {
    /// Sends every worker the message `make` builds and collects the
    /// answers (`None` for a worker that did not answer in time).
    fn ask_workers<T>(&self, make: impl Fn(Sender<T>) -> WorkerMsg) -> Vec<Option<T>> {
        let mut waiting = Vec::new();
        for (k, w) in self.workers.iter().enumerate() {
            let (tx, rx) = bounded(1);
            if w.send(make(tx)).is_ok() {
                self.shared.wakers[k].wake();
                waiting.push(Some(rx));
            } else {
                waiting.push(None);
            }
        }
        waiting
            .into_iter()
            .map(|rx| rx.and_then(|rx| rx.recv_timeout(ANSWER_WAIT).ok()))
            .collect()
    }

    /// Removes the flows `pred` selects from every worker's table, both
    /// directions at once; their ports go into quarantine as on expiry.
    /// Forwards stay. Returns how many flows were removed.
    pub fn flush(&self, pred: FlowPredicate) -> usize {
        self.ask_workers(|tx| WorkerMsg::Flush(pred.clone(), tx))
            .into_iter()
            .flatten()
            .sum()
    }

    /// The gateway's addressing now.
    pub fn addressing(&self) -> Arc<Addressing> {
        self.shared.addressing()
    }

    /// Every worker classifies with `a`'s rules from its next frame on; the
    /// uplink address and next hop stay the running ones (with DHCP they
    /// follow the lease, not the caller's copy).
    pub fn set_addressing(&self, a: Arc<Addressing>) {
        self.shared
            .publish_addressing(&self.workers, |cur| Addressing {
                uplink_net: cur.uplink_net,
                uplink_gateway: cur.uplink_gateway,
                ..(*a).clone()
            });
    }

    /// Every worker takes these limits; `max_flows` and the ICMP error
    /// rate and burst (per second; rate 0 = no limit) are the whole
    /// gateway's, shared as at start (`max_flows / N` rounded up, the
    /// rate and burst `/ N`, at least 1). A worker's ICMP token bucket
    /// starts afresh.
    pub fn set_limits(
        &self,
        max_flows: usize,
        timeouts: Timeouts,
        filtering: Filtering,
        icmp_errors: (u32, u32),
    ) {
        let n = self.workers.len().max(1);
        let share = |v: u32| (v / n as u32).max(1);
        let (rate, burst) = icmp_errors;
        let l = TableLimits {
            max_flows: max_flows.div_ceil(n),
            timeouts,
            filtering,
            icmp_limit: (rate > 0).then(|| IcmpRateLimit::new(share(rate), share(burst))),
        };
        for (k, w) in self.workers.iter().enumerate() {
            if w.send(WorkerMsg::Limits(l)).is_ok() {
                self.shared.wakers[k].wake();
            }
        }
    }

    /// Every worker takes its share of the per-pod limits (`/ N` rounded
    /// up; 0 = no limit), for new flows and mappings from now on.
    pub fn set_pod_limits(&self, max_flows_per_pod: usize, ports_per_pod: u32) {
        let n = self.workers.len().max(1);
        let flows = super::start::pod_share(max_flows_per_pod, n);
        let ports = super::start::pod_share(ports_per_pod as usize, n);
        for (k, w) in self.workers.iter().enumerate() {
            if w.send(WorkerMsg::PodLimits(flows, ports)).is_ok() {
                self.shared.wakers[k].wake();
            }
        }
    }

    /// Removes the forwarded ports `remove` (with their flows) and adds
    /// `add` in every worker's table, all or nothing (module docs); then
    /// steers with `addressing`, whose `forward_targets` must describe the
    /// new set. Returns the number of flows that went with removed ports.
    pub fn change_forwards(
        &self,
        remove: &[ForwardPort],
        add: &[ForwardPort],
        addressing: Arc<Addressing>,
    ) -> Result<usize, ForwardRefused> {
        // With DHCP each worker puts the forwards on its current address
        // instead (see `Worker::change_forwards`).
        let ext_addr = self.shared.addressing().uplink_ip();
        let change = |remove: &[ForwardPort], add: &[ForwardPort], dry_run| {
            Arc::new(ForwardChange {
                remove: remove.iter().map(|&(p, port, _, _)| (p, port)).collect(),
                add: add.to_vec(),
                ext_addr,
                dry_run,
            })
        };
        let first_refusal = |answers: &[Option<ForwardReply>]| {
            answers.iter().find_map(|a| match a {
                None => Some(ForwardRefused::NoAnswer),
                Some(Err((port, why))) => Some(ForwardRefused::Table {
                    port: *port,
                    why: *why,
                }),
                Some(Ok(_)) => None,
            })
        };
        let check = change(remove, add, true);
        let answers = self.ask_workers(|tx| WorkerMsg::Forwards(check.clone(), tx));
        if let Some(refused) = first_refusal(&answers) {
            return Err(refused);
        }
        let apply = change(remove, add, false);
        let answers = self.ask_workers(|tx| WorkerMsg::Forwards(apply.clone(), tx));
        if let Some(refused) = first_refusal(&answers) {
            // Undo it where it was made: every worker takes only its own
            // ports, so the ones that refused are given nothing they lack.
            let undo = change(add, remove, false);
            for (k, a) in answers.iter().enumerate() {
                if matches!(a, Some(Ok(_))) {
                    let (tx, rx) = bounded(1);
                    if self.workers[k]
                        .send(WorkerMsg::Forwards(undo.clone(), tx))
                        .is_ok()
                    {
                        self.shared.wakers[k].wake();
                        let _ = rx.recv_timeout(ANSWER_WAIT);
                    }
                }
            }
            return Err(refused);
        }
        self.set_addressing(addressing);
        Ok(answers.into_iter().flatten().flatten().sum())
    }
}
