//! `uplink.address = "dhcp"` against a real DHCP server: dnsmasq in the
//! external namespace, on the uplink TAP's kernel side. The gateway gets a
//! lease (the server records it), translates to it, forwards a port on it;
//! then the server is restarted with another range, refuses the renewal
//! (a NAK: it is authoritative and the address is outside its range), and
//! the gateway moves to a new address: the flows on the old one are
//! flushed, new ones and the forward use the new one.
mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{root, tcp_connect, tcp_listen, udp_in, T};
use tapnat::config::{Forward, ForwardProtocol, UplinkAddress, UplinkKind};
use tapnat::gateway::dhcp::Lease;
use tapnat::gateway::stats::Counter;
use tapnat::gateway::Gateway;
use tapnat::lab::{Lab, Netns, POD_IP, RAW_PEER_IF, RAW_UPLINK_IF, SERVER_IP};
use tapnat::net::PortRange;
use tapnat::ops::live::Live;
use tapnat::ops::report;
use tapnat::ops::socket::{respond, Request, Response};

/// The DHCP server's address on the uplink, and so the leases' router.
const ROUTER: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// The lease time the gateway accepts at most: it renews after 3 s.
const MAX_LEASE: Duration = Duration::from_secs(6);
const FORWARDED: u16 = 8080;

/// A dnsmasq serving DHCP only, in a namespace; killed by PID on drop.
struct Dnsmasq {
    child: Child,
    dir: PathBuf,
}

impl Dnsmasq {
    fn start(ns: &Netns, dev: &str, first: u8, last: u8, tag: &str) -> Dnsmasq {
        let dir = std::env::temp_dir().join(format!("tapnat-dhcp-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let range = format!("--dhcp-range=100.64.0.{first},100.64.0.{last},255.255.255.0,2m");
        let child = ns
            .command("dnsmasq")
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--port=0",
                "--user=root",
                "--bind-interfaces",
                "--dhcp-authoritative",
                "--no-ping",
                &format!("--interface={dev}"),
                &range,
                &format!("--dhcp-leasefile={}", dir.join("leases").display()),
                &format!("--pid-file={}", dir.join("pid").display()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq starts");
        Dnsmasq { child, dir }
    }

    /// The lease file's text (address and MAC of every lease it granted).
    fn leases(&self) -> String {
        std::fs::read_to_string(self.dir.join("leases")).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        // `ip netns exec` execs dnsmasq: the child's PID is dnsmasq's.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether dnsmasq is installed, installing Debian's `dnsmasq-base` first
/// when it is not. The tests of this file run in parallel: one install at
/// a time (a second `apt-get` would fail on dpkg's lock), and a fresh
/// machine's empty package lists are fetched when the first try fails.
fn have_dnsmasq() -> bool {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let found = || {
        Command::new("sh")
            .args(["-c", "command -v dnsmasq"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if found() {
        return true;
    }
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !apt(&["install", "-y", "dnsmasq-base"]) {
        apt(&["update"]);
        apt(&["install", "-y", "dnsmasq-base"]);
    }
    found()
}

/// Waits (bounded) until the gateway's lease satisfies `ok`.
fn wait_lease(gw: &Gateway, within: Duration, ok: impl Fn(&Lease) -> bool) -> Lease {
    let deadline = Instant::now() + within;
    loop {
        if let Some(l) = gw.lease().filter(|l| ok(l)) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no such lease within {within:?}; now {:?}\n{}",
            gw.lease(),
            report::stats(&gw.stats())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The source address the external server sees for a datagram from the pod.
fn udp_source_seen(lab: &Lab, pod: &std::net::UdpSocket, server: &std::net::UdpSocket) -> Ipv4Addr {
    let to = SocketAddrV4::new(SERVER_IP, 7000);
    let mut buf = [0u8; 64];
    for _ in 0..10 {
        pod.send_to(b"hello", to).unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        if let Ok((_, from)) = server.recv_from(&mut buf) {
            let std::net::SocketAddr::V4(from) = from else {
                panic!("v6 from {from}");
            };
            return *from.ip();
        }
    }
    let _ = lab;
    panic!("the server saw nothing from the pod");
}

fn tcp_peer_seen(lab: &Lab, listener: &std::net::TcpListener) -> (std::net::TcpStream, Ipv4Addr) {
    let mut client = tcp_connect(&lab.pod, SocketAddrV4::new(SERVER_IP, 7001)).expect("connects");
    let (mut conn, peer) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    conn.set_read_timeout(Some(T)).unwrap();
    conn.read_exact(&mut b).unwrap();
    let std::net::SocketAddr::V4(peer) = peer else {
        panic!("v6 peer {peer}");
    };
    (client, *peer.ip())
}

/// From the external namespace, to the forwarded port on `addr`: the pod's
/// listener answers or the connection fails.
fn forward_reaches_pod(lab: &Lab, pod_listener: &std::net::TcpListener, addr: Ipv4Addr) -> bool {
    let to = SocketAddrV4::new(addr, FORWARDED);
    let Ok(mut s) = lab
        .ext
        .run(move || std::net::TcpStream::connect_timeout(&to.into(), Duration::from_secs(1)))
        .unwrap()
    else {
        return false;
    };
    pod_listener.set_nonblocking(false).unwrap();
    let (mut conn, _) = pod_listener.accept().unwrap();
    s.write_all(b"fwd").unwrap();
    let mut b = [0u8; 3];
    conn.set_read_timeout(Some(T)).unwrap();
    conn.read_exact(&mut b).is_ok() && &b == b"fwd"
}

#[test]
fn the_outside_address_follows_the_dhcp_lease_and_old_flows_are_flushed() {
    if !root() {
        return;
    }
    assert!(
        have_dnsmasq(),
        "dnsmasq is missing and `apt-get install -y dnsmasq-base` did not install it"
    );
    let started = Instant::now();
    let lab = Lab::new("dhcp").expect("namespaces");
    let mut config = lab.config();
    config.workers.threads = 2;
    config.uplink.address = UplinkAddress::Dhcp;
    config.uplink.gateway = ROUTER;
    config.uplink.dhcp_max_lease = Some(MAX_LEASE);
    config.forward = vec![Forward {
        protocol: ForwardProtocol::Tcp,
        ports: PortRange {
            first: FORWARDED,
            last: FORWARDED,
        },
        to_addr: POD_IP,
        to_port: 80,
    }];
    let gw = Gateway::start(&config).expect("gateway starts");
    // The external side gets ROUTER/24 on the uplink TAP (see `wire_up`).
    lab.wire_up(&config).expect("wire up");
    let up = config.uplink.tap.clone();

    // No lease yet: the pod's packets are dropped and counted.
    let pod_udp = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 5000));
    let server_udp = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 7000));
    pod_udp
        .send_to(b"too early", SocketAddrV4::new(SERVER_IP, 7000))
        .unwrap();
    let deadline = Instant::now() + T;
    while gw.stats().get(Counter::DropNoLease) == 0 {
        assert!(Instant::now() < deadline, "no drop_no_lease counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let live = Live::new(gw.observer(), &config, None).expect("events thread");
    let stats = || match respond(Request::Stats, &live) {
        Response::Stats(s) => s,
        other => panic!("{other:?}"),
    };
    let text = report::stats_lines(&stats());
    assert!(text.starts_with("uplink lease: none (DHCP)"), "{text}");
    assert!(report::json(&stats()).contains("\"lease\": null"));

    let first = Dnsmasq::start(&lab.ext, &up, 50, 59, "a");
    let lease = wait_lease(&gw, Duration::from_secs(15), |_| true);
    let a1 = lease.address.addr;
    assert!(
        (50..=59).contains(&a1.octets()[3]) && lease.address.prefix_len == 24,
        "{lease:?}"
    );
    assert_eq!((lease.router, lease.server), (ROUTER, ROUTER));
    assert!(lease.secs_left(gw.observer().now_ms()) <= MAX_LEASE.as_secs());
    // The server recorded the lease, with the gateway's uplink MAC.
    let mac = gw.addressing().uplink_mac.to_string().replace('-', ":");
    let leases = first.leases();
    assert!(
        leases.contains(&a1.to_string()) && leases.to_lowercase().contains(&mac.to_lowercase()),
        "lease file lacks {a1} {mac}:\n{leases}"
    );
    // What `tapnat stats` prints (text and JSON), from the socket's handler.
    let text = report::stats_lines(&stats());
    assert!(
        text.starts_with(&format!(
            "uplink lease: {a1}/24 via {ROUTER} from {ROUTER}, "
        )),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&report::json(&stats())).unwrap();
    assert_eq!(json["dhcp"]["lease"]["address"], format!("{a1}/24"));
    assert!(json["dhcp"]["lease"]["secs_left"].as_u64().unwrap() <= MAX_LEASE.as_secs());

    // Flows on the first address: UDP and TCP, and the forward on it.
    assert_eq!(udp_source_seen(&lab, &pod_udp, &server_udp), a1);
    let listener = tcp_listen(&lab.ext, SocketAddrV4::new(SERVER_IP, 7001));
    let (_old_tcp, peer) = tcp_peer_seen(&lab, &listener);
    assert_eq!(peer, a1);
    let pod_listener = tcp_listen(&lab.pod, SocketAddrV4::new(POD_IP, 80));
    assert!(
        forward_reaches_pod(&lab, &pod_listener, a1),
        "forward on {a1}"
    );
    let on = |addr: Ipv4Addr| gw.flows().iter().filter(|f| f.ext_addr == addr).count();
    assert!(on(a1) >= 3, "flows: {:?}", gw.flows());
    let renewals_before = gw.stats().get(Counter::UplinkAddressChanges);
    assert_eq!(renewals_before, 1, "one address so far");

    // Renewals with the same server keep the address and the flows.
    std::thread::sleep(MAX_LEASE);
    assert_eq!(gw.lease().map(|l| l.address.addr), Some(a1));
    assert_eq!(gw.stats().get(Counter::FlowsAddressChange), 0);

    // Another range: the renewal is refused, the gateway moves.
    drop(first);
    let second = Dnsmasq::start(&lab.ext, &up, 100, 109, "b");
    let lease = wait_lease(&gw, Duration::from_secs(20), |l| l.address.addr != a1);
    let a2 = lease.address.addr;
    assert!((100..=109).contains(&a2.octets()[3]), "{lease:?}");
    assert!(
        second.leases().contains(&a2.to_string()),
        "{}",
        second.leases()
    );
    let s = gw.stats();
    assert!(
        s.get(Counter::FlowsAddressChange) >= 3,
        "flows_address_change {}",
        s.get(Counter::FlowsAddressChange)
    );
    assert!(s.get(Counter::UplinkAddressChanges) >= 2);
    assert_eq!(on(a1), 0, "flows left on {a1}: {:?}", gw.flows());

    // New flows, the same pod socket included, leave from the new address;
    // the forward is on it, and no longer on the old one.
    assert_eq!(udp_source_seen(&lab, &pod_udp, &server_udp), a2);
    let (_new_tcp, peer) = tcp_peer_seen(&lab, &listener);
    assert_eq!(peer, a2);
    assert!(
        forward_reaches_pod(&lab, &pod_listener, a2),
        "forward on {a2}"
    );
    lab.ext
        .ip(&format!("neigh replace {a1} lladdr {mac} dev {up}"))
        .unwrap();
    assert!(
        !forward_reaches_pod(&lab, &pod_listener, a1),
        "forward still on {a1}"
    );
    let text = report::stats_lines(&stats());
    assert!(text.contains("flows_address_change"), "{text}");
    assert!(
        text.starts_with(&format!("uplink lease: {a2}/24 via {ROUTER}")),
        "{text}"
    );
    drop(second);
    drop(live);
    gw.stop();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

/// A raw uplink set down (`ip link set DEV down`, the kernel's
/// `NETDEV_DOWN`) with `uplink.address = "dhcp"`: as MASQUERADE does, the
/// flows on the address are flushed (the lease is given up); the gateway
/// keeps running, and when the link is back it gets a lease again and
/// translates new flows to it.
#[test]
fn a_raw_uplink_going_down_flushes_its_flows_and_leases_again_when_up() {
    if !root() {
        return;
    }
    assert!(
        have_dnsmasq(),
        "dnsmasq is missing and `apt-get install -y dnsmasq-base` did not install it"
    );
    let started = Instant::now();
    let lab = Lab::with_uplink("dhcp-raw", UplinkKind::Raw).expect("namespaces");
    let mut config = lab.config();
    config.workers.threads = 2;
    config.uplink.address = UplinkAddress::Dhcp;
    config.uplink.gateway = ROUTER;
    config.uplink.dhcp_max_lease = Some(MAX_LEASE);
    let gw = Gateway::start(&config).expect("gateway starts");
    lab.wire_up(&config).expect("wire up");
    let _server = Dnsmasq::start(&lab.ext, RAW_PEER_IF, 60, 69, "raw");
    let a1 = wait_lease(&gw, Duration::from_secs(15), |_| true)
        .address
        .addr;
    let pod_udp = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 5001));
    let server_udp = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 7000));
    assert_eq!(udp_source_seen(&lab, &pod_udp, &server_udp), a1);
    assert_eq!(gw.stats().get(Counter::FlowsAddressChange), 0);

    let down_at = Instant::now();
    lab.uplink_ns()
        .ip(&format!("link set {RAW_UPLINK_IF} down"))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.lease().is_some() || gw.stats().get(Counter::FlowsAddressChange) == 0 {
        assert!(
            Instant::now() < deadline,
            "link down: lease {:?}, {}",
            gw.lease(),
            report::stats(&gw.stats())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("link down: flows flushed after {:?}", down_at.elapsed());
    assert!(gw.flows().iter().all(|f| f.ext_addr != a1));

    lab.uplink_ns()
        .ip(&format!("link set {RAW_UPLINK_IF} up"))
        .unwrap();
    let up_at = Instant::now();
    let a2 = wait_lease(&gw, Duration::from_secs(20), |_| true)
        .address
        .addr;
    eprintln!("link up: leased {a2} after {:?}", up_at.elapsed());
    assert_eq!(udp_source_seen(&lab, &pod_udp, &server_udp), a2);
    gw.stop();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
