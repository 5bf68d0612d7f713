//! `tapnat events`: flows created and destroyed, like `conntrack -E`, and
//! the mapping log, both fed by one thread (`tapnat-events`) that takes
//! the workers' events off their queue ([`super::tap`]) and fans them
//! out. A subscriber has a bounded queue of its own; one that does not
//! keep up loses events, counted in `events_lost`, and slows nobody.
use std::fmt::Write as _;
use std::io;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use serde::{Deserialize, Serialize};

use super::maplog::MapLog;
use super::record::proto_name;
use crate::gateway::stats::Counter;
use crate::gateway::taps::{Stamped, Taps};
use crate::nat::{Flow, FlowState, Proto, TableEvent};

/// Events waiting for one subscriber.
const SUBSCRIBER_QUEUE: usize = 4096;

/// One flow event as `tapnat events -o json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// `new` or `destroy`.
    pub event: String,
    /// Unix seconds (microsecond resolution).
    pub time: f64,
    /// `tcp`, `udp` or `icmp`.
    pub proto: String,
    /// The TCP state (`SynSent`, ...); empty for UDP and ICMP.
    pub state: String,
    pub src: Ipv4Addr,
    /// The source port (the echo id for ICMP).
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    /// The outside address and port (or echo id) the remote host sees.
    pub ext_addr: Ipv4Addr,
    pub ext_port: u16,
    /// Why it was destroyed: `timeout`, `fin`, `rst`, `flush`, `evicted`
    /// or `address-change`; absent for `new`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub packets_in2out: u64,
    pub packets_out2in: u64,
    pub bytes_in2out: u64,
    pub bytes_out2in: u64,
}

impl EventRecord {
    /// The record of a flow event; None for a mapping event.
    pub fn of(s: &Stamped) -> Option<EventRecord> {
        let (event, f, reason) = match &s.event {
            TableEvent::FlowNew(f) => ("new", f, None),
            TableEvent::FlowEnd(f, why) => ("destroy", f, Some(why.name().to_string())),
            TableEvent::MappingNew { .. } | TableEvent::MappingEnd { .. } => return None,
        };
        Some(EventRecord::flow(event, s.unix_us, f, reason))
    }

    fn flow(event: &str, unix_us: u64, f: &Flow, reason: Option<String>) -> EventRecord {
        let i = &f.inside;
        EventRecord {
            event: event.into(),
            time: unix_us as f64 / 1e6,
            proto: proto_name(i.proto).into(),
            state: match f.state {
                FlowState::Tcp(t) => format!("{t:?}"),
                FlowState::Udp | FlowState::Icmp => String::new(),
            },
            src: i.src,
            sport: i.sport,
            dst: i.dst,
            dport: i.dport,
            ext_addr: f.ext_addr,
            ext_port: f.ext_port,
            reason,
            packets_in2out: f.packets_in2out,
            packets_out2in: f.packets_out2in,
            bytes_in2out: f.bytes_in2out,
            bytes_out2in: f.bytes_out2in,
        }
    }

    /// One line in the manner of `conntrack -E`:
    /// `[NEW] tcp src=A dst=B sport=P dport=Q [translated src=X sport=Y]`,
    /// `[DESTROY] ... packets=OUT/IN bytes=OUT/IN reason=R` (ICMP shows
    /// `id=` for the ports).
    pub fn line(&self) -> String {
        let mut s = String::new();
        let tag = if self.event == "new" {
            "[NEW]"
        } else {
            "[DESTROY]"
        };
        let _ = write!(s, "{tag} {} src={} dst={}", self.proto, self.src, self.dst);
        if self.proto == proto_name(Proto::Icmp) {
            let _ = write!(
                s,
                " id={} [translated src={} id={}]",
                self.sport, self.ext_addr, self.ext_port
            );
        } else {
            let _ = write!(
                s,
                " sport={} dport={} [translated src={} sport={}]",
                self.sport, self.dport, self.ext_addr, self.ext_port
            );
        }
        if let Some(r) = &self.reason {
            let _ = write!(
                s,
                " packets={}/{} bytes={}/{} reason={r}",
                self.packets_in2out, self.packets_out2in, self.bytes_in2out, self.bytes_out2in
            );
        }
        s
    }
}

struct Inner {
    taps: Arc<Taps>,
    subscribers: Mutex<Vec<Sender<Stamped>>>,
    maplog: Mutex<Option<MapLog>>,
}

impl Inner {
    fn maplog(&self) -> MutexGuard<'_, Option<MapLog>> {
        self.maplog.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn subscribers(&self) -> MutexGuard<'_, Vec<Sender<Stamped>>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The events thread and its readers.
#[derive(Clone)]
pub struct EventHub {
    inner: Arc<Inner>,
}

/// A `tapnat events` subscription; dropping it unsubscribes.
pub struct Subscription {
    rx: Receiver<Stamped>,
    inner: Arc<Inner>,
}

impl Subscription {
    pub fn events(&self) -> &Receiver<Stamped> {
        &self.rx
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // The events thread drops our sender when it next finds it closed;
        // the tables stop journaling at once if we were the last reader.
        self.inner.taps.events.want(false);
    }
}

impl EventHub {
    /// Starts the events thread over `taps`, writing `maplog` if given.
    pub fn start(taps: Arc<Taps>, maplog: Option<MapLog>) -> io::Result<EventHub> {
        if maplog.is_some() {
            taps.events.want(true);
        }
        let inner = Arc::new(Inner {
            taps,
            subscribers: Mutex::new(Vec::new()),
            maplog: Mutex::new(maplog),
        });
        let rx = inner.taps.events.receiver();
        let thread_inner = inner.clone();
        std::thread::Builder::new()
            .name("tapnat-events".into())
            .spawn(move || {
                crate::sandbox::enter(crate::sandbox::Role::Events);
                fan_out(&thread_inner, &rx)
            })?;
        Ok(EventHub { inner })
    }

    /// A new subscriber of every flow event from now on.
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = bounded(SUBSCRIBER_QUEUE);
        self.inner.subscribers().push(tx);
        self.inner.taps.events.want(true);
        Subscription {
            rx,
            inner: self.inner.clone(),
        }
    }

    /// Replaces the mapping log by `log` (None: no log): on SIGHUP, with
    /// the same file reopened for rotation.
    pub fn set_maplog(&self, log: Option<MapLog>) {
        let mut m = self.inner.maplog();
        match (m.is_some(), log.is_some()) {
            (false, true) => self.inner.taps.events.want(true),
            (true, false) => self.inner.taps.events.want(false),
            _ => {}
        }
        if let Some(old) = m.as_mut() {
            old.flush();
        }
        *m = log;
    }

    /// The running mapping log's settings, to reopen it.
    pub fn maplog_settings(&self) -> Option<(std::path::PathBuf, bool)> {
        self.inner.maplog().as_ref().map(MapLog::settings)
    }
}

/// The events thread: every event to every subscriber (dropped and
/// counted for one whose queue is full) and to the mapping log.
fn fan_out(inner: &Inner, rx: &Receiver<Stamped>) {
    while let Ok(first) = rx.recv() {
        let mut lost = 0;
        {
            let mut subs = inner.subscribers();
            let mut log = inner.maplog();
            for e in std::iter::once(first).chain(rx.try_iter()) {
                if EventRecord::of(&e).is_some() {
                    subs.retain(|s| match s.try_send(e) {
                        Ok(()) => true,
                        Err(TrySendError::Full(_)) => {
                            lost += 1;
                            true
                        }
                        Err(TrySendError::Disconnected(_)) => false,
                    });
                }
                if let Some(l) = log.as_mut() {
                    l.write(&e);
                }
            }
            if let Some(l) = log.as_mut() {
                l.flush();
            }
        }
        inner.taps.counters.add(Counter::EventsLost, lost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::{EndReason, InKey, TcpState};

    fn flow(proto: Proto) -> Flow {
        Flow {
            inside: InKey {
                proto,
                src: Ipv4Addr::new(10, 244, 0, 2),
                sport: 40000,
                dst: Ipv4Addr::new(198, 51, 100, 10),
                dport: if proto == Proto::Icmp { 0 } else { 80 },
            },
            ext_addr: Ipv4Addr::new(203, 0, 113, 10),
            ext_port: 40001,
            state: match proto {
                Proto::Tcp => FlowState::Tcp(TcpState::SynSent),
                Proto::Udp => FlowState::Udp,
                Proto::Icmp => FlowState::Icmp,
            },
            replied: false,
            last_seen_ms: 0,
            packets_in2out: 3,
            packets_out2in: 2,
            bytes_in2out: 180,
            bytes_out2in: 120,
        }
    }

    #[test]
    fn lines_look_like_conntrack() {
        let new = Stamped {
            unix_us: 1_500_000,
            event: TableEvent::FlowNew(flow(Proto::Tcp)),
        };
        let r = EventRecord::of(&new).unwrap();
        assert_eq!(r.time, 1.5);
        assert_eq!(
            r.line(),
            "[NEW] tcp src=10.244.0.2 dst=198.51.100.10 sport=40000 dport=80 \
             [translated src=203.0.113.10 sport=40001]"
        );
        let end = Stamped {
            unix_us: 0,
            event: TableEvent::FlowEnd(flow(Proto::Icmp), EndReason::Timeout),
        };
        let r = EventRecord::of(&end).unwrap();
        assert_eq!(
            r.line(),
            "[DESTROY] icmp src=10.244.0.2 dst=198.51.100.10 id=40000 \
             [translated src=203.0.113.10 id=40001] packets=3/2 bytes=180/120 reason=timeout"
        );
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""reason":"timeout""#), "{json}");
        assert_eq!(serde_json::from_str::<EventRecord>(&json).unwrap(), r);
        let mapping = Stamped {
            unix_us: 0,
            event: TableEvent::MappingNew {
                proto: Proto::Udp,
                inside: (Ipv4Addr::new(10, 244, 0, 2), 5),
                outside: (Ipv4Addr::new(203, 0, 113, 10), 5),
            },
        };
        assert!(EventRecord::of(&mapping).is_none());
    }

    #[test]
    fn a_slow_subscriber_loses_events_and_they_are_counted() {
        let taps = Arc::new(Taps::default());
        let hub = EventHub::start(taps.clone(), None).unwrap();
        assert!(!taps.events.wanted());
        let slow = hub.subscribe();
        let fast = hub.subscribe();
        assert!(taps.events.wanted());
        let n = SUBSCRIBER_QUEUE + 100;
        let mut got = 0;
        for i in 0..n {
            let e = Stamped {
                unix_us: i as u64,
                event: TableEvent::FlowNew(flow(Proto::Udp)),
            };
            assert!(taps.events.offer(e));
            while fast.events().try_recv().is_ok() {
                got += 1;
            }
            if i % 512 == 0 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got < n && std::time::Instant::now() < deadline {
            if fast
                .events()
                .recv_timeout(std::time::Duration::from_millis(50))
                .is_ok()
            {
                got += 1;
            }
        }
        assert_eq!(got, n, "a subscriber that keeps up gets every event");
        assert_eq!(slow.events().len(), SUBSCRIBER_QUEUE);
        assert_eq!(taps.counters.get(Counter::EventsLost), 100);
        drop(slow);
        drop(fast);
        assert!(!taps.events.wanted());
    }
}
