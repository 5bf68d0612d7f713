//! Floods at a running `tapnat` (the real binary, two workers, between
//! kernel peers in namespaces): an echo flood at the outside address,
//! orphan fragments from outside, a SYN flood at a port forward. Each runs
//! for a bounded time and count, samples the gateway's resident memory
//! (`VmRSS` of the child process) throughout, and asserts that it stays
//! under a stated bound, that the flood was refused where the bounds say
//! (counters), and that a pod's established TCP connection and its new
//! flows (TCP connects, UDP round trips) keep working the whole time.
//!
//! The floods run one at a time (a lock): two cores are shared by the
//! flooder, the gateway and the victim.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tapnat::lab::{
    Echo, Lab, Netns, Pinger, EXT_ROUTER_IP, GATEWAY_POD_IP, GATEWAY_UPLINK_IP, POD2_IP, POD_IP,
    SERVER_IP,
};
use tapnat::ops::socket::{self, Request, Response};
use tapnat::wire::build::{self, Endpoints};

mod common;
use common::{root, tapnat, tcp_connect, udp_in, Spawned, TempConfig};

/// How long each flood lasts, and the most packets it sends.
const FLOOD: Duration = Duration::from_secs(4);
const FLOOD_MAX_PACKETS: u64 = 5_000_000;

/// The rate of the floods that share the victim's path (fragments, SYNs):
/// what a debug build of the gateway reads on this machine while the
/// victim runs, so that the kernel's TAP queue in front of it does not
/// drop the victim's own packets (link congestion, which no gateway can
/// prevent) and what is measured is the gateway's bounds. The echo flood
/// is unpaced.
const FLOOD_PPS: u64 = 60_000;

/// One flood at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A `tapnat run` we started ([`Spawned`], its stderr printed once it
/// stopped) with its control socket and config file.
struct Running {
    gw: Spawned,
    control: PathBuf,
    _file: TempConfig,
}

impl Running {
    fn pid(&self) -> u32 {
        self.gw.pid()
    }

    fn stats(&self) -> std::collections::BTreeMap<String, u64> {
        match socket::ask(&self.control, &Request::Stats).expect("stats") {
            Response::Stats(s) => s.counters,
            other => panic!("unexpected answer {other:?}"),
        }
    }
}

/// Starts `tapnat run` between `lab`'s namespaces (two workers, a control
/// socket, `extra` appended to the config) and wires the lab up.
fn run(lab: &Lab, tag: &str, extra: &str) -> Running {
    let control =
        std::env::temp_dir().join(format!("tapnat-flood-{tag}-{}.sock", std::process::id()));
    let text = format!(
        "[pod]\nnetns = \"{}\"\n[uplink]\nnetns = \"{}\"\n[workers]\nthreads = 2\n\
         [control]\nsocket = \"{}\"\n{extra}",
        lab.pod.path().display(),
        lab.ext.path().display(),
        control.display()
    );
    let file = TempConfig::new(&format!("flood-{tag}"), &text);
    let child = tapnat()
        .args(["run", "--config", file.path()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut gw = Spawned::new(child);
    gw.echo_on_drop = true;
    let running = Running {
        gw,
        control,
        _file: file,
    };
    let config = tapnat::config::Config::from_toml_str(&text).unwrap();
    lab.pod
        .wait_for_link("tapnat0", Duration::from_secs(3))
        .unwrap();
    lab.ext
        .wait_for_link("tapnat1", Duration::from_secs(3))
        .unwrap();
    lab.wire_up(&config).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while socket::ask(&running.control, &Request::Stats).is_err() {
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    running
}

/// `VmRSS` of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples `pid`'s resident memory every 10 ms until stopped; the peak.
struct RssWatch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl RssWatch {
    fn new(pid: u32) -> RssWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssWatch {
            stop,
            peak,
            thread: Some(thread),
        }
    }
    fn peak_kib(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Echo servers in the external namespace (TCP on 7101, UDP on 7102), on
/// until dropped.
struct Servers {
    stop: Arc<AtomicBool>,
}

const TCP_ECHO: SocketAddrV4 = SocketAddrV4::new(SERVER_IP, 7101);
const UDP_ECHO: SocketAddrV4 = SocketAddrV4::new(SERVER_IP, 7102);

impl Servers {
    fn new(ext: &Netns) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let tcp = ext.run(|| TcpListener::bind(TCP_ECHO)).unwrap().unwrap();
        tcp.set_nonblocking(true).unwrap();
        let udp = ext.run(|| UdpSocket::bind(UDP_ECHO)).unwrap().unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let s = stop.clone();
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((c, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || echo_tcp(c, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut b = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut b) {
                    let _ = udp.send_to(&b[..n], from);
                }
            }
        });
        Servers { stop }
    }
}

fn echo_tcp(mut c: TcpStream, stop: &AtomicBool) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
    let mut b = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match c.read(&mut b) {
            Ok(0) => return,
            Ok(n) => {
                if c.write_all(&b[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn round_trip(s: &mut TcpStream, what: &[u8]) -> std::io::Result<()> {
    s.write_all(what)?;
    let mut back = vec![0u8; what.len()];
    s.read_exact(&mut back)?;
    if back != what {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// One UDP datagram of `len` bytes to the echo server and back, from a new
/// socket (a new flow); three tries of a second each.
fn udp_round_trip(pod: &Netns, len: usize, tag: u32) -> Result<(), String> {
    let s = udp_in(pod, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut msg = vec![0u8; len];
    msg[..4].copy_from_slice(&tag.to_be_bytes());
    let mut b = vec![0u8; len + 1];
    for _ in 0..3 {
        s.send_to(&msg, UDP_ECHO).map_err(|e| e.to_string())?;
        if let Ok((n, _)) = s.recv_from(&mut b) {
            if b[..n] == msg[..] {
                return Ok(());
            }
        }
    }
    Err(format!("no UDP echo of {len} bytes"))
}

/// What the victim pod saw while the flood ran.
#[derive(Debug, Default)]
struct Victim {
    established_round_trips: u32,
    new_tcp: u32,
    new_udp: u32,
    failures: Vec<String>,
}

/// The victim pod, until `until`: a round trip on its established
/// connection every 100 ms; a new TCP connection (with a round trip) and a
/// new UDP flow (`udp_len` bytes; above the MTU, it is fragmented) every
/// 300 ms.
fn victim(lab: &Lab, established: &mut TcpStream, until: Instant, udp_len: usize) -> Victim {
    let mut v = Victim::default();
    let mut next_new = Instant::now();
    let mut n = 0u32;
    while Instant::now() < until {
        n += 1;
        match round_trip(established, &n.to_be_bytes()) {
            Ok(()) => v.established_round_trips += 1,
            Err(e) => v.failures.push(format!("established connection: {e}")),
        }
        if Instant::now() >= next_new {
            next_new = Instant::now() + Duration::from_millis(300);
            match tcp_connect(&lab.pod, TCP_ECHO).and_then(|mut s| round_trip(&mut s, b"new")) {
                Ok(()) => v.new_tcp += 1,
                Err(e) => v.failures.push(format!("new TCP connection: {e}")),
            }
            match udp_round_trip(&lab.pod, udp_len, n) {
                Ok(()) => v.new_udp += 1,
                Err(e) => v.failures.push(format!("new UDP flow: {e}")),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    v
}

/// A raw IPv4 socket in `ns` (IP_HDRINCL): sends whole IP packets.
fn raw_socket(ns: &Netns) -> Socket {
    ns.run(|| {
        Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
    })
    .unwrap()
    .unwrap()
}

/// Sends packets `make(i)` (whole IP packets) from `ns` to their
/// destination, at most `pps` a second (0: as fast as the socket takes
/// them), for [`FLOOD`] or [`FLOOD_MAX_PACKETS`], whichever ends first, on
/// a thread; the number sent.
fn flood(ns: &Netns, pps: u64, make: impl Fn(u64) -> Vec<u8> + Send + 'static) -> JoinHandle<u64> {
    let sock = raw_socket(ns);
    std::thread::spawn(move || {
        let start = Instant::now();
        let until = start + FLOOD;
        let mut sent = 0u64;
        let mut i = 0u64;
        while i < FLOOD_MAX_PACKETS && Instant::now() < until {
            if pps > 0 && i % 64 == 0 {
                let due = start + Duration::from_secs_f64(i as f64 / pps as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            let p = make(i);
            i += 1;
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            let to = SockAddr::from(SocketAddrV4::new(dst, 0));
            if sock.send_to(&p, &to).is_ok() {
                sent += 1;
            }
        }
        sent
    })
}

/// The IP packet of a frame made by `build` (without its Ethernet header).
fn ip_of(frame: Vec<u8>) -> Vec<u8> {
    frame[14..].to_vec()
}

/// A small xorshift for spoofed addresses and ports.
fn mix(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// What one flood test measured.
struct Measured {
    baseline_kib: u64,
    peak_kib: u64,
    sent: u64,
    victim: Victim,
    counters: std::collections::BTreeMap<String, u64>,
    elapsed: Duration,
}

/// Runs one flood against a fresh gateway (from outside, or from a second
/// pod if `setup` adds one): an established victim connection first, then
/// the flood with the victim and the memory watch alongside; asserts the victim never failed and the peak stayed under
/// `bound_mib`.
fn flood_test(
    tag: &str,
    extra: &str,
    pps: u64,
    udp_len: usize,
    bound_mib: u64,
    make: impl Fn(u64) -> Vec<u8> + Send + 'static,
    setup: impl FnOnce(&mut Lab),
) -> Option<(Lab, Measured)> {
    if !root() {
        return None;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new(tag).expect("namespaces");
    let started = Instant::now();
    let gw = run(&lab, tag, extra);
    let _servers = Servers::new(&lab.ext);
    setup(&mut lab);
    let mut established = tcp_connect(&lab.pod, TCP_ECHO).expect("victim connects");
    established
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    round_trip(&mut established, b"hello").expect("victim round trip");
    udp_round_trip(&lab.pod, udp_len, 0).expect("victim UDP before the flood");
    std::thread::sleep(Duration::from_millis(200));
    let baseline_kib = rss_kib(gw.pid());
    let watch = RssWatch::new(gw.pid());
    // From a second pod when `setup` added one, else from outside.
    let flooder = flood(lab.pod2.as_ref().unwrap_or(&lab.ext), pps, make);
    let v = victim(
        &lab,
        &mut established,
        Instant::now() + FLOOD + Duration::from_millis(300),
        udp_len,
    );
    let sent = flooder.join().expect("flooder");
    // The victim still works after the flood, too.
    round_trip(&mut established, b"after").expect("victim round trip after the flood");
    let peak_kib = watch.peak_kib();
    let counters = gw.stats();
    let elapsed = started.elapsed();
    eprintln!(
        "{tag}: sent {sent} packets in {FLOOD:?} (limit {pps}/s, 0 = none); gateway RSS {:.1} MiB before, peak {:.1} MiB \
         (bound {bound_mib} MiB); victim: {} established round trips, {} new TCP, {} new UDP, \
         {} failures",
        baseline_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
        v.established_round_trips,
        v.new_tcp,
        v.new_udp,
        v.failures.len()
    );
    let nonzero: Vec<_> = counters.iter().filter(|(_, v)| **v != 0).collect();
    eprintln!("{tag}: counters {nonzero:?}");
    assert!(
        v.failures.is_empty(),
        "the victim pod failed during the flood: {:?}",
        v.failures
    );
    assert!(
        v.established_round_trips >= 3 && v.new_tcp >= 2 && v.new_udp >= 2,
        "the victim did too little: {v:?}"
    );
    assert!(sent > 10_000, "the flood sent only {sent} packets");
    assert!(
        peak_kib < bound_mib * 1024,
        "gateway RSS peaked at {peak_kib} KiB, over {bound_mib} MiB"
    );
    drop(gw);
    Some((
        lab,
        Measured {
            baseline_kib,
            peak_kib,
            sent,
            victim: v,
            counters,
            elapsed,
        },
    ))
}

/// The gateway's memory bound under any of these floods. The pool keeps up
/// to 1024 spare buffers of 64 KiB (offload on), of which a flood of small
/// frames touches a page or two each; the rest is the binary, the threads'
/// stacks and the tables.
const BOUND_MIB: u64 = 48;

#[test]
fn echo_flood_at_the_outside_address_is_rate_limited_and_bounded() {
    let make = |i: u64| {
        let ep = Endpoints::new(EXT_ROUTER_IP, GATEWAY_UPLINK_IP);
        ip_of(build::icmp_echo(
            &ep,
            true,
            (i >> 16) as u16,
            i as u16,
            &[0x55; 1000],
        ))
    };
    // A pod pings the gateway's pod-side address during the flood: that
    // side has its own reply budget; ARP has its own on each side.
    type Pings = Arc<Mutex<Option<JoinHandle<(u32, u32)>>>>;
    let pinger: Pings = Arc::default();
    let p = pinger.clone();
    let Some((_lab, m)) = flood_test("fl-echo", "", 0, 1000, BOUND_MIB, make, move |lab| {
        // Twice during the flood the upstream router forgets the gateway's
        // MAC and must ask again, its ARP request among the echo flood.
        let ext = lab.ext.name().to_owned();
        std::thread::spawn(move || {
            for _ in 0..2 {
                std::thread::sleep(FLOOD / 3);
                let _ = Command::new("ip")
                    .args(["-n", &ext, "neigh", "flush", "dev", "tapnat1"])
                    .status();
            }
        });
        let mut pinger = Pinger::new(&lab.pod).unwrap();
        *p.lock().unwrap() = Some(std::thread::spawn(move || {
            let until = Instant::now() + FLOOD;
            let (mut asked, mut answered) = (0, 0);
            while Instant::now() < until {
                asked += 1;
                let r = pinger.echo(GATEWAY_POD_IP, 64, 56, Duration::from_secs(1));
                if let Ok(Echo::Reply { .. }) = r {
                    answered += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (asked, answered)
        }));
    }) else {
        return;
    };
    let (asked, answered) = pinger.lock().unwrap().take().unwrap().join().unwrap();
    eprintln!("fl-echo: pod pings of the gateway: {answered}/{asked} answered");
    assert!(asked >= 10 && answered >= asked - 1, "{answered}/{asked}");
    let c = |n: &str| m.counters.get(n).copied().unwrap_or(0);
    assert!(c("drop_local_rate_limited") > 0, "nothing was rate-limited");
    // Answered: at most the rate over the gateway's whole life plus the
    // bursts, on both sides and of both kinds (ARP, echo).
    let secs = m.elapsed.as_secs() + 1;
    let most = 4 * (200 + 1000 * secs);
    assert!(
        c("local_stack_frames") <= most,
        "{} frames answered, more than {most}",
        c("local_stack_frames")
    );
    assert!(
        m.sent > c("local_stack_frames") * 2,
        "the flood was not a flood"
    );
    let _ = (m.baseline_kib, m.peak_kib, &m.victim);
}

/// A non-first fragment (offset 800 bytes, the last) of a UDP datagram
/// from `src` whose first fragment never comes.
fn orphan(src: Ipv4Addr, id: u16) -> Vec<u8> {
    let ep = Endpoints::new(src, GATEWAY_UPLINK_IP);
    let mut p = ip_of(build::udp(&ep, 4000, 5000, &[0xaa; 1000], false));
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&100u16.to_be_bytes());
    p[10..12].copy_from_slice(&[0, 0]);
    p
}

#[test]
fn orphan_fragments_from_one_source_take_only_its_share() {
    // The victim's UDP datagrams are 3000 bytes: its own fragments cross
    // the cache (some held, when a later fragment overtakes the first
    // through the hand-off between workers) while one source floods it.
    let make = |i: u64| orphan(EXT_ROUTER_IP, mix(i) as u16);
    let Some((_lab, m)) = flood_test("fl-frag1", "", FLOOD_PPS, 3000, BOUND_MIB, make, |_| {})
    else {
        return;
    };
    let c = |n: &str| m.counters.get(n).copied().unwrap_or(0);
    assert!(c("fragments_held") > 0, "no orphan was held");
    assert!(
        c("drop_fragment_source_share") > m.sent / 2,
        "the source was not held to its share"
    );
    assert!(
        c("fragments_translated") > 0,
        "the victim's fragments crossed"
    );
}

#[test]
fn orphan_fragments_from_many_sources_are_refused_and_bounded() {
    // Spoofed sources, one fragment each, fill the cache's held budget: a
    // fragment held for anyone else is refused until they time out (2 s),
    // as in Linux's reassembly under a fragment flood. The victim's
    // unfragmented flows are unaffected, and memory stays bounded.
    let make = |i: u64| {
        let r = mix(i);
        let src = Ipv4Addr::new(100, 64 + (r >> 8 & 63) as u8, (r >> 16) as u8, r as u8);
        orphan(src, (r >> 24) as u16)
    };
    let Some((_lab, m)) = flood_test("fl-fragn", "", FLOOD_PPS, 1000, BOUND_MIB, make, |_| {})
    else {
        return;
    };
    let c = |n: &str| m.counters.get(n).copied().unwrap_or(0);
    assert!(c("fragments_held") > 0, "no orphan was held");
    assert!(
        c("drop_fragment_cache_full") > m.sent / 2,
        "most orphans are refused"
    );
}

#[test]
fn syn_flood_at_a_forward_is_bounded() {
    // Forward 8080 to a pod listening on 80 (it answers every SYN, with
    // SYN cookies once its backlog is full), SYNs from spoofed sources. A
    // table of 32768 flows (16384 a worker) fills within the flood however
    // slowly this machine lets the gateway read.
    let extra = "[[forward]]\nprotocol = \"tcp\"\nport = 8080\nto = \"10.244.0.2:80\"\n\
                 [nat]\nports = \"10000-65535\"\nmax_flows = 32768\n";
    let make = |i: u64| {
        let r = mix(i);
        let src = Ipv4Addr::new(100, 64 + (r >> 8 & 63) as u8, (r >> 16) as u8, r as u8);
        let ep = Endpoints::new(src, GATEWAY_UPLINK_IP);
        ip_of(build::tcp(
            &ep,
            1024 + (r >> 32) as u16 % 60000,
            8080,
            0x02,
            &[],
        ))
    };
    let listener: Arc<Mutex<Option<TcpListener>>> = Arc::default();
    let l = listener.clone();
    let Some((_lab, m)) = flood_test(
        "fl-syn",
        extra,
        // Every SYN is answered by the pod (a SYN-ACK back out through the
        // gateway): two frames a packet, so half the rate keeps the
        // gateway's load at FLOOD_PPS (at the full rate the victim's own
        // packets were dropped at the TAPs in front of a saturated debug
        // build, failing 1 run in 5 before the burst prefetch and 3 in 4
        // after it on this machine, from link congestion, not the table).
        FLOOD_PPS / 2,
        1000,
        BOUND_MIB,
        make,
        move |lab| {
            let addr = SocketAddrV4::new(POD_IP, 80);
            *l.lock().unwrap() = Some(
                lab.pod
                    .run(move || TcpListener::bind(addr))
                    .unwrap()
                    .unwrap(),
            );
        },
    ) else {
        return;
    };
    let c = |n: &str| m.counters.get(n).copied().unwrap_or(0);
    assert!(c("flows_created") > 1000, "the SYNs made no flows");
    // The forward's shard filled (its share of nat.max_flows) with flows
    // the pod answered but no one completed; early drop took those, so the
    // victim's new flows on that shard were still created.
    assert!(
        c("flows_evicted") > 0,
        "the shard never filled: {}",
        c("flows_created")
    );
    assert_eq!(c("drop_table_full"), 0);
    drop(listener);
}

#[test]
fn a_pod_creating_flows_as_fast_as_it_can_is_bounded() {
    // A second pod sends one UDP datagram from each of 60000 source ports
    // in turn at FLOOD_PPS (unpaced, it fills the pod link's queue that the
    // victim shares, and half of every pod's frames are lost before the
    // gateway: link congestion): every one a new flow. It hits
    // its per-pod flow and port limits (its own unreplied flows go first);
    // the victim pod's established connection and new flows keep working.
    let make = |i: u64| {
        let ep = Endpoints::new(POD2_IP, SERVER_IP);
        ip_of(build::udp(&ep, 1024 + (i % 60000) as u16, 9, b"x", true))
    };
    let Some((_lab, m)) = flood_test("fl-pod", "", FLOOD_PPS, 1000, BOUND_MIB, make, |lab| {
        lab.add_pod2("fl-pod", "tapnat0").expect("second pod")
    }) else {
        return;
    };
    let c = |n: &str| m.counters.get(n).copied().unwrap_or(0);
    assert!(c("flows_created") > 1000, "the flood made no flows");
    assert!(
        c("drop_pod_flow_limit") + c("drop_pod_port_limit") + c("flows_evicted") > 0,
        "the second pod never reached its limits"
    );
    assert_eq!(c("drop_table_full"), 0);
}
