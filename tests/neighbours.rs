//! End-to-end tests of the neighbour table with kernel peers: a pod and the
//! uplink next hop changing their MAC (with and without ARP), a pod
//! spoofing another's address, a pod sending to thousands of unused
//! addresses, and Host Unreachable when resolution fails.
//!
//! They need root (see tests/netns.rs). Every namespace is the test's own.
//! The heal times are printed (`heal:` lines, `--nocapture` shows them).
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smoltcp::wire::EthernetAddress;
use tapnat::config::{Config, Forward, ForwardProtocol};
use tapnat::device::PacketSocket;
use tapnat::gateway::stats::Counter;
use tapnat::gateway::Gateway;
use tapnat::lab::{
    IcmpListener, Lab, Netns, EXT_ROUTER_IP, GATEWAY_POD_IP, GATEWAY_UPLINK_IP, POD2_IP, POD_IP,
    SERVER_IP,
};
use tapnat::net::PortRange;
use tapnat::wire;

mod common;
use common::*;

/// How often a stream sends, and for how long at most.
const EVERY: Duration = Duration::from_millis(20);
const STREAM_MAX: u64 = 5_000;
/// "At once": the heal after an ARP must take less than this.
const AT_ONCE: Duration = Duration::from_secs(1);
/// Without any ARP from the changed neighbour.
const SILENT_LIMIT: Duration = Duration::from_secs(15);

fn udp_forward(port: u16, to: Ipv4Addr) -> Forward {
    Forward {
        protocol: ForwardProtocol::Udp,
        ports: PortRange {
            first: port,
            last: port,
        },
        to_addr: to,
        to_port: port,
    }
}

fn start_with(tag: &str, tweak: impl FnOnce(&mut Config)) -> (Lab, Gateway) {
    let lab = Lab::new(tag).expect("namespaces");
    let mut config = lab.config();
    config.workers.threads = 2;
    tweak(&mut config);
    let gw = Gateway::start(&config).expect("gateway starts");
    lab.wire_up(&config).expect("wire up");
    (lab, gw)
}

/// Datagrams carrying a sequence number, sent every [`EVERY`] from `sock`
/// to `to` by a thread, until stopped (or [`STREAM_MAX`] were sent).
struct Stream {
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Stream {
    fn new(sock: UdpSocket, to: SocketAddrV4) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicU64::new(0));
        let (s, q) = (stop.clone(), seq.clone());
        let thread = std::thread::spawn(move || {
            for i in 0..STREAM_MAX {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                q.store(i, Ordering::Relaxed);
                let _ = sock.send_to(&i.to_be_bytes(), to);
                std::thread::sleep(EVERY);
            }
        });
        Stream {
            stop,
            seq,
            thread: Some(thread),
        }
    }
    fn from(ns: &Netns, bind: SocketAddrV4, to: SocketAddrV4) -> Stream {
        let sock = ns.run(move || UdpSocket::bind(bind)).unwrap().unwrap();
        Stream::new(sock, to)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long until `rx` gets a datagram of `s` sent after now; None if none
/// within `limit`.
fn heal_time(rx: &UdpSocket, s: &Stream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mark = s.seq.load(Ordering::Relaxed) + 1;
    rx.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 64];
    while start.elapsed() < limit {
        if let Ok(n) = rx.recv(&mut buf) {
            if n == 8 && u64::from_be_bytes(buf[..8].try_into().unwrap()) >= mark {
                return Some(start.elapsed());
            }
        }
    }
    None
}

fn mac_of(ns: &Netns, dev: &str) -> EthernetAddress {
    let out = ns.ip(&format!("-o link show dev {dev}")).unwrap();
    let text = out.split("link/ether ").nth(1).expect("an Ethernet device");
    let mut m = [0u8; 6];
    for (i, h) in text
        .split_whitespace()
        .next()
        .unwrap()
        .split(':')
        .enumerate()
    {
        m[i] = u8::from_str_radix(h, 16).unwrap();
    }
    EthernetAddress(m)
}

/// Gives `dev` in `ns` a new MAC while it is up: the kernel sends no ARP
/// for it (arp_notify is off by default) and forgets its own neighbours.
fn change_mac(ns: &Netns, dev: &str, last: u8) -> EthernetAddress {
    let mac = EthernetAddress([0x02, 0x4e, 0x45, 0x49, 0x47, last]);
    let text = mac.to_string().replace('-', ":");
    ns.ip(&format!("link set dev {dev} address {text}"))
        .unwrap();
    assert_eq!(mac_of(ns, dev), mac);
    mac
}

/// A gratuitous ARP (a request with sender = target = `ip`) from `dev`,
/// as `arping -U` sends, through an AF_PACKET socket.
fn gratuitous_arp(ns: &Netns, dev: &str, ip: Ipv4Addr) {
    let mac = mac_of(ns, dev);
    let d = dev.to_owned();
    let sock = ns.run(move || PacketSocket::open(&d)).unwrap().unwrap();
    let mut out = [0u8; wire::ARP_FRAME_MAX];
    let n = wire::build_arp_request(&mut out, mac, ip, ip);
    sock.send(&out[..n]).unwrap();
}

/// The pod segment with a second pod, and pod-to-pod through the gateway
/// (as with /32 pod routes).
fn with_pod2(lab: &mut Lab, tag: &str) {
    lab.add_pod2(tag, "tapnat0").unwrap();
    lab.pod
        .ip(&format!("route add {POD2_IP}/32 via {GATEWAY_POD_IP}"))
        .unwrap();
}

/// Three ways traffic reaches pod2: a port forward (7000), another pod
/// through the gateway (7001), and the replies of pod2's own flow (7002).
struct ToPod2 {
    rx: Vec<(&'static str, UdpSocket)>,
    streams: Vec<Stream>,
}

impl ToPod2 {
    fn new(lab: &Lab) -> ToPod2 {
        let pod2 = lab.pod2.as_ref().unwrap();
        let fwd = udp_in(pod2, SocketAddrV4::new(POD2_IP, 7000));
        let p2p = udp_in(pod2, SocketAddrV4::new(POD2_IP, 7001));
        let flow = udp_in(pod2, SocketAddrV4::new(POD2_IP, 7002));
        let server = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 9100));
        flow.send_to(b"hello", SocketAddrV4::new(SERVER_IP, 9100))
            .unwrap();
        let mut buf = [0u8; 16];
        let (_, mapped) = server.recv_from(&mut buf).unwrap();
        let std::net::SocketAddr::V4(mapped) = mapped else {
            panic!("{mapped}")
        };
        assert_eq!(*mapped.ip(), GATEWAY_UPLINK_IP);
        let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
        let streams = vec![
            Stream::from(&lab.ext, any, SocketAddrV4::new(GATEWAY_UPLINK_IP, 7000)),
            Stream::from(&lab.pod, any, SocketAddrV4::new(POD2_IP, 7001)),
            Stream::new(server, mapped),
        ];
        ToPod2 {
            rx: vec![
                ("port forward", fwd),
                ("pod to pod", p2p),
                ("flow replies", flow),
            ],
            streams,
        }
    }

    /// Every stream arrives within `limit`; their heal times.
    fn heal(&self, what: &str, limit: Duration) -> Vec<Duration> {
        let mut times = Vec::new();
        for ((name, rx), s) in self.rx.iter().zip(&self.streams) {
            let t = heal_time(rx, s, limit)
                .unwrap_or_else(|| panic!("{what}: {name} not healed within {limit:?}"));
            eprintln!("heal: {what}: {name}: {} ms", t.as_millis());
            times.push(t);
        }
        times
    }

    /// No stream gets through for `d`: the change really broke them.
    fn broken(&self, what: &str, d: Duration) {
        let start = Instant::now();
        for ((name, rx), s) in self.rx.iter().zip(&self.streams) {
            let left = d
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(200));
            assert_eq!(heal_time(rx, s, left), None, "{what}: {name} still arrives");
        }
    }
}

#[test]
fn a_recreated_pod_is_reachable_again_at_once_when_it_sends_any_arp() {
    if !root() {
        return;
    }
    let (mut lab, gw) = start_with("nb-pod", |c| {
        c.forward = vec![udp_forward(7000, POD2_IP)];
    });
    with_pod2(&mut lab, "nb-pod");
    let to = ToPod2::new(&lab);
    to.heal("before", Duration::from_secs(3));
    let pod2 = lab.pod2.as_ref().unwrap();

    // A new MAC, then a gratuitous ARP.
    change_mac(pod2, "eth0", 1);
    to.broken("new MAC, no ARP yet", Duration::from_secs(1));
    let learned = gw.stats().get(Counter::NeighboursLearned);
    gratuitous_arp(pod2, "eth0", POD2_IP);
    for t in to.heal("new MAC, gratuitous ARP", AT_ONCE) {
        assert!(t < AT_ONCE, "{t:?}");
    }
    assert!(gw.stats().get(Counter::NeighboursLearned) > learned);

    // Another new MAC; the kernel's own request for the gateway, as it
    // sends when it has something for the gateway (here a datagram out).
    change_mac(pod2, "eth0", 2);
    to.broken("second new MAC, no ARP yet", Duration::from_secs(1));
    let out = udp_in(pod2, SocketAddrV4::new(POD2_IP, 7003));
    out.send_to(b"x", SocketAddrV4::new(SERVER_IP, 9101))
        .unwrap();
    for t in to.heal("new MAC, the pod's ARP request", AT_ONCE) {
        assert!(t < AT_ONCE, "{t:?}");
    }
}

#[test]
fn a_recreated_pod_that_sends_nothing_is_reachable_again_within_15_s() {
    if !root() {
        return;
    }
    let (mut lab, gw) = start_with("nb-pod-q", |c| {
        c.forward = vec![udp_forward(7000, POD2_IP)];
    });
    with_pod2(&mut lab, "nb-pod-q");
    let to = ToPod2::new(&lab);
    to.heal("before", Duration::from_secs(3));
    let pod2 = lab.pod2.as_ref().unwrap();
    let probes = gw.stats().get(Counter::ArpRequestsSent);
    let start = Instant::now();
    change_mac(pod2, "eth0", 3);
    to.broken("new MAC, silent", Duration::from_secs(1));
    to.heal("new MAC, silent", SILENT_LIMIT);
    let total = start.elapsed();
    eprintln!(
        "heal: silent pod, all three streams: {} ms",
        total.as_millis()
    );
    assert!(total < SILENT_LIMIT, "{total:?}");
    // Found by the gateway's own requests (unicast probes, then broadcast).
    assert!(gw.stats().get(Counter::ArpRequestsSent) > probes);
}

/// The pod's traffic to a server through the uplink next hop, and a change
/// of the next hop's MAC (a router failover).
fn uplink_next_hop_changes(tag: &str, garp: bool) -> Duration {
    let (lab, gw) = start_with(tag, |_| {});
    let rx = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 9200));
    let s = Stream::from(
        &lab.pod,
        SocketAddrV4::new(POD_IP, 0),
        SocketAddrV4::new(SERVER_IP, 9200),
    );
    assert!(heal_time(&rx, &s, Duration::from_secs(3)).is_some());
    let start = Instant::now();
    change_mac(&lab.ext, "tapnat1", 9);
    assert_eq!(heal_time(&rx, &s, Duration::from_secs(1)), None);
    let limit = if garp {
        gratuitous_arp(&lab.ext, "tapnat1", EXT_ROUTER_IP);
        AT_ONCE
    } else {
        SILENT_LIMIT
    };
    let t = heal_time(&rx, &s, limit).expect("the next hop's new MAC is followed");
    if garp {
        eprintln!(
            "heal: uplink next hop, gratuitous ARP: {} ms after it",
            t.as_millis()
        );
    } else {
        let total = start.elapsed().as_millis();
        eprintln!("heal: uplink next hop, silent: {total} ms after the change");
    }
    if !garp {
        assert!(start.elapsed() < SILENT_LIMIT);
    }
    assert!(gw.stats().get(Counter::NeighboursLearned) >= 2);
    t
}

#[test]
fn the_uplink_next_hop_changing_its_mac_is_followed_at_once_on_gratuitous_arp() {
    if root() {
        let t = uplink_next_hop_changes("nb-up", true);
        assert!(t < AT_ONCE, "{t:?}");
    }
}

#[test]
fn the_uplink_next_hop_changing_its_mac_silently_is_followed_within_15_s() {
    if root() {
        uplink_next_hop_changes("nb-up-q", false);
    }
}

#[test]
fn a_pod_spoofing_another_pods_address_cannot_redirect_its_traffic() {
    if !root() {
        return;
    }
    let (mut lab, gw) = start_with("nb-spoof", |c| {
        c.forward = vec![udp_forward(7000, POD_IP)];
    });
    lab.add_pod2("nb-spoof", "tapnat0").unwrap();
    let rx = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 7000));
    let s = Stream::from(
        &lab.ext,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        SocketAddrV4::new(GATEWAY_UPLINK_IP, 7000),
    );
    assert!(heal_time(&rx, &s, Duration::from_secs(3)).is_some());
    let pod2 = lab.pod2.as_ref().unwrap();
    let mac2 = mac_of(pod2, "eth0");
    let sock = pod2.run(|| PacketSocket::open("eth0")).unwrap().unwrap();
    let learned = gw.stats().get(Counter::NeighboursLearned);
    // For 2 s, IPv4 frames from pod2's MAC with the pod's address, every
    // 10 ms: to the outside, to the gateway, to pod2 itself.
    let a = gw.addressing().clone();
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(2) {
        for dst in [SERVER_IP, GATEWAY_POD_IP, POD2_IP] {
            let e = wire::build::Endpoints {
                src_mac: mac2,
                dst_mac: a.pod_mac,
                src: POD_IP,
                dst,
                ttl: 64,
            };
            let f = wire::build::udp(&e, 7000, 9, b"spoof", true);
            sock.send(&f).unwrap();
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(sent > 300);
    // The pod's traffic never stopped: a datagram sent now still arrives
    // at once, and the stream had no gap while the spoofer sent.
    let t = heal_time(&rx, &s, Duration::from_millis(500)).expect("still delivered to the pod");
    eprintln!(
        "spoof: the pod's next datagram after 2 s of spoofing: {} ms",
        t.as_millis()
    );
    // At most pod2 itself was learned (for the spoofed frames sent to it).
    assert!(gw.stats().get(Counter::NeighboursLearned) <= learned + 1);
    // pod2 received none of the pod's datagrams.
    let mut buf = [0u8; 2048];
    let mut redirected = 0;
    while let Ok(n) = sock.recv(&mut buf) {
        let f = &buf[..n];
        if let Ok(wire::Classified::Ipv4(v)) = wire::classify(f) {
            if v.dst == POD_IP && wire::macs(f).0 == mac2 {
                redirected += 1;
            }
        }
    }
    assert_eq!(redirected, 0);
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The bound on the gateway's growth while one pod sends to thousands of
/// unused pod addresses (the gateway runs in this test process).
const FLOOD_RSS_BOUND_KIB: u64 = 32 * 1024;

#[test]
fn a_pod_sending_to_thousands_of_unused_addresses_keeps_memory_bounded_and_others_working() {
    if !root() {
        return;
    }
    let (mut lab, gw) = start_with("nb-flood", |_| {});
    lab.add_pod2("nb-flood", "tapnat0").unwrap();
    // The unused addresses are reached through the gateway.
    lab.pod
        .ip(&format!("route add 10.244.128.0/17 via {GATEWAY_POD_IP}"))
        .unwrap();
    let pod2 = lab.pod2.as_ref().unwrap();
    let rx = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 9300));
    let other = Stream::from(
        pod2,
        SocketAddrV4::new(POD2_IP, 0),
        SocketAddrV4::new(SERVER_IP, 9300),
    );
    assert!(heal_time(&rx, &other, Duration::from_secs(3)).is_some());
    let before = rss_kib();
    let flood = lab
        .pod
        .run(|| UdpSocket::bind(SocketAddrV4::new(POD_IP, 0)))
        .unwrap()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let flooder = std::thread::spawn(move || {
        let start = Instant::now();
        let payload = [0u8; 1400];
        let mut n = 0u64;
        // 5 s or 2 million datagrams, whichever comes first, to 8192 addresses.
        while !st.load(Ordering::Relaxed)
            && start.elapsed() < Duration::from_secs(5)
            && n < 2_000_000
        {
            let i = (n % 8192) as u32;
            let dst = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 128, 0)) + i);
            let _ = flood.send_to(&payload, SocketAddrV4::new(dst, 9));
            n += 1;
        }
        n
    });
    // Meanwhile the other pod's stream keeps arriving and new flows work.
    let mut peak = before;
    let mut gaps = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        gaps.push(heal_time(&rx, &other, Duration::from_secs(1)).expect("the other pod works"));
        peak = peak.max(rss_kib());
    }
    let c = TcpProbe::connect(&lab, pod2);
    stop.store(true, Ordering::Relaxed);
    let sent = flooder.join().unwrap();
    peak = peak.max(rss_kib());
    let s = gw.stats();
    let report = tapnat::ops::report::stats(&s);
    eprintln!(
        "flood: {sent} datagrams to 8192 addresses in 5 s; RSS {before} KiB before, peak {peak} \
         KiB (+{} KiB); the other pod's datagram: median {} ms, max {} ms; a new TCP flow: {c}",
        peak - before,
        tapnat::lab::median(&gaps).as_millis(),
        gaps.iter().max().unwrap().as_millis(),
    );
    assert!(peak - before < FLOOD_RSS_BOUND_KIB, "{report}");
    assert!(s.get(Counter::ArpRequestsRateLimited) > 0, "{report}");
    assert!(
        s.get(Counter::DropNeighbourTableFull) + s.get(Counter::DropNeighbourQueueFull) > 0,
        "{report}"
    );
    assert!(gw.observer().neighbour_count() <= 1024 + 256);
}

/// A TCP connection from `ns` to a listener in the external namespace.
struct TcpProbe;

impl TcpProbe {
    fn connect(lab: &Lab, ns: &Netns) -> String {
        use std::io::{Read, Write};
        let l = tcp_listen(&lab.ext, SocketAddrV4::new(SERVER_IP, 9301));
        let start = Instant::now();
        let mut c = tcp_connect(ns, SocketAddrV4::new(SERVER_IP, 9301)).expect("a new flow");
        let (mut a, _) = l.accept().unwrap();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        a.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        format!("{} ms", start.elapsed().as_millis())
    }
}

#[test]
fn failed_resolution_gives_host_unreachable_at_the_sender() {
    if !root() {
        return;
    }
    const MISSING_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 200, 1);
    const MISSING_TARGET: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 99);
    const MISSING_OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 77);
    let (lab, gw) = start_with("nb-unreach", |c| {
        c.forward = vec![udp_forward(7100, MISSING_TARGET)];
    });
    lab.pod
        .ip(&format!("route add {MISSING_POD}/32 via {GATEWAY_POD_IP}"))
        .unwrap();
    let pod_icmp = IcmpListener::new(&lab.pod).unwrap();
    let ext_icmp = IcmpListener::new(&lab.ext).unwrap();
    let wait = Duration::from_secs(6);

    // Pod to an absent pod (routed, untranslated): from the gateway's pod address.
    let s = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 7200));
    let start = Instant::now();
    s.send_to(b"x", SocketAddrV4::new(MISSING_POD, 9)).unwrap();
    let e = pod_icmp
        .error_for(17, 7200, 9, wait)
        .unwrap()
        .expect("an error");
    eprintln!(
        "unreachable: pod to pod after {} ms: {e:?}",
        start.elapsed().as_millis()
    );
    assert_eq!((e.icmp_type, e.code), (3, 1));
    assert_eq!(e.from, GATEWAY_POD_IP);
    assert_eq!((e.quoted_src, e.quoted_dst), (POD_IP, MISSING_POD));
    // About 3 s: mcast_solicit broadcasts 1 s apart.
    assert!(start.elapsed() >= Duration::from_millis(2_500));

    // Outside to a forward whose target is absent (translated): the error
    // reaches the remote from the gateway's outside address, quoting the
    // packet as the remote sent it.
    let r = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 7300));
    r.send_to(b"x", SocketAddrV4::new(GATEWAY_UPLINK_IP, 7100))
        .unwrap();
    let e = ext_icmp
        .error_for(17, 7300, 7100, wait)
        .unwrap()
        .expect("an error");
    eprintln!("unreachable: forward: {e:?}");
    assert_eq!((e.icmp_type, e.code), (3, 1));
    assert_eq!(e.from, GATEWAY_UPLINK_IP);
    assert_eq!((e.quoted_src, e.quoted_dst), (SERVER_IP, GATEWAY_UPLINK_IP));

    // Pod to an absent host on the uplink subnet (masqueraded): the pod
    // gets it from the gateway's pod address, quoting its own packet.
    s.send_to(b"x", SocketAddrV4::new(MISSING_OUTSIDE, 9))
        .unwrap();
    let e = pod_icmp
        .error_for(17, 7200, 9, wait)
        .unwrap()
        .expect("an error");
    eprintln!("unreachable: masqueraded: {e:?}");
    assert_eq!((e.icmp_type, e.code), (3, 1));
    assert_eq!(e.from, GATEWAY_POD_IP);
    assert_eq!((e.quoted_src, e.quoted_dst), (POD_IP, MISSING_OUTSIDE));
    let st = gw.stats();
    assert!(st.get(Counter::HostUnreachableSent) >= 3);
    assert!(st.get(Counter::DropNeighbourUnresolved) >= 3);
}
