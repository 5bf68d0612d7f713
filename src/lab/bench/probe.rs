//! The measurements: kernel sockets in the pod namespace talking to a server
//! in the external namespace, through whatever sits between them.
//!
//! Every loop is bounded twice: by time (the measurement's duration plus a
//! fixed grace) and by a count far above what any setup reaches, so a stalled
//! path ends a measurement with an error instead of hanging the benchmark.
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::lab::{self, Netns, Pinger};

/// Size of one write in the TCP stream tests.
pub const TCP_BUF: usize = 128 << 10;
/// UDP payload in the packet-rate test.
pub const UDP_PAYLOAD: usize = 64;
/// Echo requests in the RTT test.
pub const PINGS: usize = 50;

/// How long a stalled socket may block before the measurement fails.
const STALL: Duration = Duration::from_secs(10);

/// The two ends of a setup: kernel sockets are opened inside these.
#[derive(Debug, Clone, Copy)]
pub struct Ends<'a> {
    pub pod: &'a Netns,
    pub ext: &'a Netns,
    pub server: Ipv4Addr,
}

/// Direction of a bulk TCP transfer. The pod always opens the connection
/// (a NAT admits no unsolicited inbound connection); `Down` has the server send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Up,
    Down,
}

fn listen(ends: Ends<'_>, port: u16) -> io::Result<TcpListener> {
    let addr = SocketAddrV4::new(ends.server, port);
    let l = ends.ext.run(move || -> io::Result<TcpListener> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        Ok(s.into())
    })??;
    Ok(l)
}

/// Accepts `n` connections within `timeout`.
fn accept_n(l: &TcpListener, n: usize, timeout: Duration) -> io::Result<Vec<TcpStream>> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                v.push(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("accepted {} of {n} connections", v.len()),
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(v)
}

/// Names a socket timeout for what it is: no progress for [`STALL`].
fn stalled(what: &'static str) -> impl Fn(io::Error) -> io::Error {
    move |e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} stalled: no progress for {} s", STALL.as_secs()),
        ),
        _ => io::Error::new(e.kind(), format!("{what}: {e}")),
    }
}

/// Writes [`TCP_BUF`] buffers for `secs` (and at most a count no link reaches), then FIN.
fn send_for(mut s: TcpStream, secs: Duration) -> io::Result<u64> {
    s.set_write_timeout(Some(STALL))?;
    let buf = vec![0x5au8; TCP_BUF];
    let max_writes = (secs.as_secs_f64() * 200_000.0) as u64 + 1;
    let deadline = Instant::now() + secs;
    let mut sent = 0u64;
    for _ in 0..max_writes {
        if Instant::now() >= deadline {
            break;
        }
        s.write_all(&buf).map_err(stalled("TCP sender"))?;
        sent += TCP_BUF as u64;
    }
    s.shutdown(Shutdown::Write)?;
    Ok(sent)
}

/// How long a receiver waits for the FIN once every sender has finished.
const FIN_GRACE: Duration = Duration::from_secs(2);

/// What one receiver saw.
struct Received {
    bytes: u64,
    /// When the connection was handed to the receiver.
    start: Instant,
    /// When the last data byte arrived.
    last: Instant,
    /// Whether the FIN arrived within [`FIN_GRACE`] of the senders finishing.
    fin: bool,
}

/// Reads until EOF, or until [`FIN_GRACE`] after `senders_left` reached 0
/// (a stack that delays the FIN is measured up to its last data byte, not
/// charged for the wait). No data for [`STALL`] while senders run is an error.
fn recv_all(mut s: TcpStream, senders_left: &AtomicUsize) -> io::Result<Received> {
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let start = Instant::now();
    let mut last = start;
    let mut senders_done: Option<Instant> = None;
    let mut buf = vec![0u8; TCP_BUF];
    let mut bytes = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                return Ok(Received {
                    bytes,
                    start,
                    last,
                    fin: true,
                })
            }
            Ok(n) => {
                bytes += n as u64;
                last = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if senders_left.load(Ordering::Acquire) == 0 {
                    let t = *senders_done.get_or_insert_with(Instant::now);
                    if t.elapsed() > FIN_GRACE {
                        return Ok(Received {
                            bytes,
                            start,
                            last,
                            fin: false,
                        });
                    }
                } else if last.elapsed() > STALL {
                    return Err(stalled("TCP receiver")(e));
                }
            }
            Err(e) => return Err(stalled("TCP receiver")(e)),
        }
    }
}

/// A bulk TCP result.
#[derive(Debug, Clone, Copy)]
pub struct TcpResult {
    /// All receivers' bytes over the time from the first connection handed
    /// over to the last data byte, in Gbit/s.
    pub gbps: f64,
    /// Streams whose FIN had not arrived [`FIN_GRACE`] after the sender finished.
    pub late_fins: usize,
}

/// `streams` parallel TCP connections from the pod to the server, data
/// flowing in `dir` for `secs`.
pub fn tcp_streams(
    ends: Ends<'_>,
    dir: Dir,
    streams: usize,
    secs: Duration,
    port: u16,
) -> io::Result<TcpResult> {
    let l = listen(ends, port)?;
    let to = SocketAddr::V4(SocketAddrV4::new(ends.server, port));
    let mut clients = Vec::with_capacity(streams);
    for _ in 0..streams {
        clients.push(
            ends.pod
                .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(3)))??,
        );
    }
    let servers = accept_n(&l, streams, Duration::from_secs(3))?;
    let (senders, receivers) = match dir {
        Dir::Up => (clients, servers),
        Dir::Down => (servers, clients),
    };
    let left = AtomicUsize::new(senders.len());
    let results = std::thread::scope(|sc| {
        let left = &left;
        let tx: Vec<_> = senders
            .into_iter()
            .map(|s| {
                sc.spawn(move || {
                    let r = send_for(s, secs);
                    left.fetch_sub(1, Ordering::Release);
                    r
                })
            })
            .collect();
        let rx: Vec<_> = receivers
            .into_iter()
            .map(|s| sc.spawn(move || recv_all(s, left)))
            .collect();
        let sent: io::Result<Vec<u64>> = tx
            .into_iter()
            .map(|h| h.join().expect("sender thread"))
            .collect();
        let got = rx
            .into_iter()
            .map(|h| h.join().expect("receiver thread"))
            .collect::<io::Result<Vec<_>>>();
        sent.and(got)
    })?;
    let bytes: u64 = results.iter().map(|r| r.bytes).sum();
    let start = results.iter().map(|r| r.start).min().expect("one stream");
    let end = results.iter().map(|r| r.last).max().expect("one stream");
    Ok(TcpResult {
        gbps: bytes as f64 * 8.0 / end.duration_since(start).as_secs_f64() / 1e9,
        late_fins: results.iter().filter(|r| !r.fin).count(),
    })
}

/// UDP packet rate pod -> server.
#[derive(Debug, Clone, Copy)]
pub struct UdpResult {
    /// Datagrams received per second of sending.
    pub delivered_per_s: f64,
    /// Percent of the datagrams the sender's kernel accepted that never arrived.
    pub loss_pct: f64,
}

/// The pod blasts [`UDP_PAYLOAD`]-byte datagrams at the server for `secs`
/// (at most 5 M per second of duration); the server counts what arrives.
pub fn udp_flood(ends: Ends<'_>, secs: Duration, port: u16) -> io::Result<UdpResult> {
    let b = udp_blast(ends, secs, port, UDP_PAYLOAD, None)?;
    Ok(UdpResult {
        delivered_per_s: b.received as f64 / b.elapsed.as_secs_f64(),
        loss_pct: 100.0 * (b.sent.saturating_sub(b.received)) as f64 / b.sent as f64,
    })
}

/// Payload bytes of each datagram of [`udp_gso_bulk`] (a QUIC-sized one).
pub const GSO_DATAGRAM: u16 = 1400;
/// Datagrams per send of [`udp_gso_bulk`].
const GSO_PER_SEND: usize = 40;

/// Bulk UDP as a QUIC stack sends it: `UDP_SEGMENT` sends of
/// [`GSO_PER_SEND`] datagrams of [`GSO_DATAGRAM`] bytes from the pod, the
/// server reading with `UDP_GRO` (coalesced where the path kept the
/// super-frame); Gbit/s of UDP payload delivered.
pub fn udp_gso_bulk(ends: Ends<'_>, secs: Duration, port: u16) -> io::Result<f64> {
    let len = usize::from(GSO_DATAGRAM) * GSO_PER_SEND;
    let b = udp_blast(ends, secs, port, len, Some(GSO_DATAGRAM))?;
    Ok(b.bytes as f64 * 8.0 / b.elapsed.as_secs_f64() / 1e9)
}

/// What [`udp_blast`] counted.
struct Blast {
    /// Sends the sender's kernel accepted (datagrams without GSO).
    sent: u64,
    /// Reads at the server and the bytes they returned.
    received: u64,
    bytes: u64,
    elapsed: Duration,
}

/// The pod sends `len`-byte buffers (cut into `gso`-byte datagrams by
/// `UDP_SEGMENT` when given, the server then reading with `UDP_GRO`) at the
/// server for `secs`, as fast as it can (at most 5 M sends per second of
/// duration); the server counts what arrives until 300 ms after the end.
fn udp_blast(
    ends: Ends<'_>,
    secs: Duration,
    port: u16,
    len: usize,
    gso: Option<u16>,
) -> io::Result<Blast> {
    use std::os::fd::AsFd;
    let addr = SocketAddrV4::new(ends.server, port);
    let rx = ends.ext.run(move || UdpSocket::bind(addr))??;
    rx.set_read_timeout(Some(Duration::from_millis(100)))?;
    let tx = ends.pod.run(|| UdpSocket::bind("0.0.0.0:0"))??;
    tx.connect(addr)?;
    if let Some(size) = gso {
        crate::device::sys::set_udp_segment(tx.as_fd(), size)?;
        crate::device::sys::set_udp_gro(rx.as_fd(), true)?;
        socket2::SockRef::from(&rx).set_recv_buffer_size(4 << 20)?;
    }
    let done = AtomicBool::new(false);
    let ((received, bytes), sent, elapsed) = std::thread::scope(|sc| {
        let counter = sc.spawn(|| {
            let mut buf = vec![0u8; 65536];
            let (mut n, mut bytes) = (0u64, 0u64);
            let hard = Instant::now() + secs + Duration::from_secs(5);
            let mut idle_since: Option<Instant> = None;
            while Instant::now() < hard {
                match rx.recv(&mut buf) {
                    Ok(got) => {
                        n += 1;
                        bytes += got as u64;
                        idle_since = None;
                    }
                    Err(_) if done.load(Ordering::Relaxed) => {
                        // The sender is done: stop after 300 ms without a datagram.
                        let t = *idle_since.get_or_insert_with(Instant::now);
                        if t.elapsed() > Duration::from_millis(300) {
                            break;
                        }
                    }
                    Err(_) => {}
                }
            }
            (n, bytes)
        });
        let payload = vec![0u8; len];
        let max = (secs.as_secs_f64() * 5e6) as u64 + 1;
        let start = Instant::now();
        let deadline = start + secs;
        let mut sent = 0u64;
        let mut i = 0u64;
        while i < max {
            // Check the clock every 64 sends: the loop is what is being measured.
            if i % 64 == 0 && Instant::now() >= deadline {
                break;
            }
            i += 1;
            if tx.send(&payload).is_ok() {
                sent += 1;
            }
        }
        let elapsed = start.elapsed();
        done.store(true, Ordering::Relaxed);
        (counter.join().expect("udp counter"), sent, elapsed)
    });
    if sent == 0 {
        return Err(io::Error::other("no UDP datagram could be sent"));
    }
    Ok(Blast {
        sent,
        received,
        bytes,
        elapsed,
    })
}

/// Median ICMP echo round trip from the pod to the server, in microseconds.
pub fn ping_rtt_us(ends: Ends<'_>) -> io::Result<f64> {
    let mut p = Pinger::new(ends.pod)?;
    let rtts = p.ping(ends.server, PINGS, Duration::from_secs(1))?;
    if rtts.len() < PINGS / 2 {
        return Err(io::Error::other(format!(
            "only {} of {PINGS} echo replies",
            rtts.len()
        )));
    }
    Ok(lab::median(&rtts).as_secs_f64() * 1e6)
}

/// Whether one echo reply comes back within `timeout` (used to wait for a setup).
pub fn reachable(ends: Ends<'_>, timeout: Duration) -> io::Result<bool> {
    let mut p = Pinger::new(ends.pod)?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !p
            .ping(ends.server, 1, Duration::from_millis(500))?
            .is_empty()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// TCP connections per second: the pod connects and closes (with an RST,
/// `SO_LINGER` 0, so no TIME_WAIT exhausts the ports) in a loop for `secs`,
/// the server accepts and closes.
pub fn tcp_connects(ends: Ends<'_>, secs: Duration, port: u16) -> io::Result<f64> {
    let l = listen(ends, port)?;
    let l: Socket = l.into();
    l.set_read_timeout(Some(Duration::from_millis(100)))?;
    let to = SocketAddrV4::new(ends.server, port).into();
    let stop = AtomicBool::new(false);
    let (ok, failed, elapsed) = std::thread::scope(|sc| {
        let acceptor = sc.spawn(|| {
            // Bounded: at most secs + 10 s, whatever the client does.
            let hard = Instant::now() + secs + Duration::from_secs(10);
            while !stop.load(Ordering::Relaxed) && Instant::now() < hard {
                let _ = l.accept();
            }
        });
        let r = ends.pod.run(move || {
            let max = (secs.as_secs_f64() * 200_000.0) as u64 + 1;
            let start = Instant::now();
            let (mut ok, mut failed) = (0u64, 0u64);
            for _ in 0..max {
                if start.elapsed() >= secs || failed > 100 {
                    break;
                }
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                s.set_linger(Some(Duration::ZERO))?;
                match s.connect_timeout(&to, Duration::from_secs(1)) {
                    Ok(()) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            Ok::<_, io::Error>((ok, failed, start.elapsed()))
        });
        stop.store(true, Ordering::Relaxed);
        acceptor.join().expect("acceptor thread");
        r
    })??;
    if failed > 100 {
        return Err(io::Error::other(format!(
            "{failed} connects failed ({ok} succeeded)"
        )));
    }
    Ok(ok as f64 / elapsed.as_secs_f64())
}

/// Round trips in the request/response test (bounded by time as well).
pub const RR_MAX: usize = 200_000;

/// Percentiles of a set of round trips, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// The `p`-th percentile (0..=100) of `v` by nearest rank; `v` is sorted here.
pub fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Request/response latency as an RPC feels it: one TCP connection, the pod
/// writes one byte and waits for the server's one-byte answer, back to back
/// for `secs` (at most [`RR_MAX`] round trips).
pub fn tcp_rr(ends: Ends<'_>, secs: Duration, port: u16) -> io::Result<Latency> {
    let l = listen(ends, port)?;
    let to = SocketAddrV4::new(ends.server, port);
    std::thread::scope(|sc| {
        let server = sc.spawn(|| -> io::Result<()> {
            let mut s = accept_n(&l, 1, STALL)?.pop().expect("one connection");
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(STALL))?;
            let mut b = [0u8; 1];
            // Ends when the client closes (read returns 0) or stalls.
            while s.read(&mut b)? == 1 {
                s.write_all(&b)?;
            }
            Ok(())
        });
        let client = ends.pod.run(move || -> io::Result<Vec<Duration>> {
            let mut s = TcpStream::connect_timeout(&to.into(), STALL)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(STALL))?;
            let mut rtts = Vec::with_capacity(1 << 16);
            let start = Instant::now();
            let mut b = [7u8; 1];
            while rtts.len() < RR_MAX && start.elapsed() < secs {
                let t = Instant::now();
                s.write_all(&b)?;
                s.read_exact(&mut b).map_err(stalled("tcp_rr reply"))?;
                rtts.push(t.elapsed());
            }
            Ok(rtts)
        });
        let served = server.join().expect("rr server thread");
        let mut rtts = client??;
        served?;
        if rtts.is_empty() {
            return Err(io::Error::other("no request/response round trip"));
        }
        Ok(Latency {
            p50_us: percentile(&mut rtts, 50.0).as_secs_f64() * 1e6,
            p99_us: percentile(&mut rtts, 99.0).as_secs_f64() * 1e6,
        })
    })
}

/// Median echo round trip with `interval` of idle time between echoes, as
/// an interactive user or a heartbeat sends them: the path is cold each time.
pub fn paced_ping_us(ends: Ends<'_>, interval: Duration, count: usize) -> io::Result<f64> {
    let mut p = Pinger::new(ends.pod)?;
    let mut rtts = Vec::with_capacity(count);
    for _ in 0..count {
        std::thread::sleep(interval);
        rtts.extend(p.ping(ends.server, 1, Duration::from_secs(1))?);
    }
    if rtts.len() < count / 2 {
        return Err(io::Error::other(format!(
            "only {} of {count} paced echo replies",
            rtts.len()
        )));
    }
    Ok(lab::median(&rtts).as_secs_f64() * 1e6)
}

/// CPU time used, read from `/proc`: one process's (user + system), and
/// the whole machine's busy and total time, all in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    pub process: Option<u64>,
    pub busy: u64,
    pub total: u64,
    pub at: Option<Instant>,
}

/// Clock ticks per second of `/proc` times (`sysconf(_SC_CLK_TCK)`, 100 on
/// every Linux architecture tapnat builds for).
const CLK_TCK: f64 = 100.0;

fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, the 12th and 13th after ")".
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are the 4th and 5th columns.
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

impl CpuSample {
    pub fn now(pid: Option<u32>) -> CpuSample {
        let (busy, total) = machine_ticks().unwrap_or_default();
        CpuSample {
            process: pid.and_then(process_ticks),
            busy,
            total,
            at: Some(Instant::now()),
        }
    }

    /// (the process's CPU as % of one core, the machine's as % of all of
    /// its cores) between `self` and the later sample `end`.
    pub fn until(&self, end: &CpuSample) -> (Option<f64>, Option<f64>) {
        let wall = match (self.at, end.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        let process = match (self.process, end.process) {
            (Some(a), Some(b)) if wall > 0.0 => Some(100.0 * (b - a) as f64 / CLK_TCK / wall),
            _ => None,
        };
        let total = end.total.saturating_sub(self.total);
        let machine =
            (total > 0).then(|| 100.0 * end.busy.saturating_sub(self.busy) as f64 / total as f64);
        (process, machine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        assert_eq!(percentile(&mut v, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&mut v, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&mut v, 100.0), Duration::from_micros(100));
        assert_eq!(
            percentile(&mut [Duration::from_micros(3)], 99.0),
            Duration::from_micros(3)
        );
        assert_eq!(percentile(&mut [], 50.0), Duration::ZERO);
    }

    #[test]
    fn cpu_of_this_process_is_read() {
        let a = CpuSample::now(Some(std::process::id()));
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(300) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        let (p, m) = a.until(&CpuSample::now(Some(std::process::id())));
        let p = p.unwrap();
        assert!((5.0..=250.0).contains(&p), "{p}% of a core while spinning");
        assert!(m.unwrap() > 0.0);
    }
}
