//! End-to-end tests: the gateway between two network namespaces, with the
//! kernel's own TCP, UDP, ICMP and ARP on both sides.
//!
//! They need root. Without it they print a skip line, except when `CI` is
//! set: then they fail. Each test builds its own uniquely named namespaces
//! (removed on drop, also on failure) and only sends traffic between them.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tapnat::config::{Config, UplinkKind};
use tapnat::device::PacketSocket;
use tapnat::gateway::stats::Counter;
use tapnat::gateway::Gateway;
use tapnat::lab::{self, Echo, Lab, Pinger, GATEWAY_POD_IP, GATEWAY_UPLINK_IP, POD_IP, SERVER_IP};
use tapnat::nat::Proto;

mod common;
use common::*;

/// Each end-to-end test body runs twice: over a TAP uplink (`NAME::tap`)
/// and over a raw AF_PACKET uplink on one end of a veth pair (`NAME::raw`).
macro_rules! over_both_uplinks {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[test]
            fn tap() {
                if root() {
                    super::$name(UplinkKind::Tap);
                }
            }
            #[test]
            fn raw() {
                if root() {
                    super::$name(UplinkKind::Raw);
                }
            }
        }
    )*};
}

over_both_uplinks!(
    arp_and_ping_both_gateway_addresses,
    ping_through_the_nat,
    tcp_request_response_and_20_mb_both_ways,
    tcp_20_mb_without_offload_and_one_worker,
    udp_request_response,
    same_pod_port_to_two_servers_gets_one_outside_port,
    unsolicited_inbound_is_not_delivered,
    spoofed_source_is_not_forwarded,
    ttl_1_gets_time_exceeded_from_the_gateway,
    malformed_frames_are_counted_and_traffic_still_flows,
    frames_are_steered_to_their_owners_queue,
);

/// A lab with this uplink kind and a gateway on its default config (two
/// workers, then `tweak`), wired up.
fn start_kind(kind: UplinkKind, tag: &str, tweak: impl FnOnce(&mut Config)) -> (Lab, Gateway) {
    start_in(Lab::with_uplink(tag, kind).expect("namespaces"), tweak)
}

fn arp_and_ping_both_gateway_addresses(kind: UplinkKind) {
    let (lab, gw) = start_kind(kind, "ping-gw", |_| {});
    let mut pod = Pinger::new(&lab.pod).unwrap();
    let mut ext = Pinger::new(&lab.ext).unwrap();
    assert_eq!(pod.ping(GATEWAY_POD_IP, 3, T).unwrap().len(), 3);
    assert_eq!(ext.ping(GATEWAY_UPLINK_IP, 3, T).unwrap().len(), 3);
    // The pod can ping the gateway's outside address too, as with a kernel router.
    assert_eq!(pod.ping(GATEWAY_UPLINK_IP, 1, T).unwrap().len(), 1);
    // Real ARP: both kernels resolved the gateway to its MACs.
    let a = gw.addressing();
    let mac = |m: smoltcp::wire::EthernetAddress| m.to_string().replace('-', ":");
    let pod_neigh = lab.pod.ip(&format!("neigh show {GATEWAY_POD_IP}")).unwrap();
    assert!(pod_neigh.contains(&mac(a.pod_mac)), "{pod_neigh}");
    let ext_neigh = lab
        .ext
        .ip(&format!("neigh show {GATEWAY_UPLINK_IP}"))
        .unwrap();
    assert!(ext_neigh.contains(&mac(a.uplink_mac)), "{ext_neigh}");
    if kind == UplinkKind::Raw {
        // A raw uplink speaks with its interface's own MAC.
        let link = lab
            .uplink_ns()
            .ip(&format!("link show dev {}", lab::RAW_UPLINK_IF))
            .unwrap();
        assert!(link.contains(&mac(a.uplink_mac)), "{link}");
    }
    assert!(gw.stats().get(Counter::LocalStackFrames) >= 8);
    assert_eq!(gw.stats().get(Counter::In2outPackets), 0);
}

fn ping_through_the_nat(kind: UplinkKind) {
    let (lab, gw) = start_kind(kind, "ping-nat", |_| {});
    let mut pod = Pinger::new(&lab.pod).unwrap();
    assert_eq!(pod.ping(SERVER_IP, 5, T).unwrap().len(), 5);
    let flows = gw.flows();
    let f = flows
        .iter()
        .find(|f| f.inside.proto == Proto::Icmp)
        .expect("an ICMP flow");
    assert_eq!(f.inside.src, POD_IP);
    assert_eq!(f.ext_addr, GATEWAY_UPLINK_IP);
    assert_eq!((f.packets_in2out, f.packets_out2in), (5, 5));
    let s = gw.stats();
    assert_eq!(s.get(Counter::In2outPackets), 5);
    assert_eq!(s.get(Counter::Out2inPackets), 5);
}

/// A deterministic byte stream to send and verify.
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8
}

fn tcp_request_response_and_20_mb_both_ways(kind: UplinkKind) {
    tcp_transfer(kind, "tcp", |_| {});
}

fn tcp_20_mb_without_offload_and_one_worker(kind: UplinkKind) {
    tcp_transfer(kind, "tcp-plain", |c| {
        c.workers.offload = false;
        c.workers.threads = 1;
    });
}

fn tcp_transfer(kind: UplinkKind, tag: &str, tweak: impl FnOnce(&mut Config)) {
    const SIZE: usize = 20 << 20;
    let (lab, gw) = start_kind(kind, tag, tweak);
    let listener = tcp_listen(&lab.ext, SocketAddrV4::new(SERVER_IP, 8080));
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // Upload: count and verify every byte.
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        let mut ok = true;
        while got < SIZE {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "eof after {got}");
            ok &= buf[..n]
                .iter()
                .enumerate()
                .all(|(i, b)| *b == pattern(got + i));
            got += n;
        }
        writeln!(s, "{peer} {got} {ok}").unwrap();
        // Download: send the pattern back.
        let data: Vec<u8> = (0..SIZE).map(pattern).collect();
        s.write_all(&data).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    });
    let mut c = tcp_connect(&lab.pod, SocketAddrV4::new(SERVER_IP, 8080)).unwrap();
    let local = c.local_addr().unwrap();
    let data: Vec<u8> = (0..SIZE).map(pattern).collect();
    c.write_all(&data).unwrap();
    let mut r = BufReader::new(c);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    let peer: SocketAddrV4 = words[0].parse().unwrap();
    assert_eq!(
        *peer.ip(),
        GATEWAY_UPLINK_IP,
        "the server sees the uplink address"
    );
    assert_eq!(words[1..], [SIZE.to_string().as_str(), "true"]);
    let mut back = Vec::with_capacity(SIZE);
    r.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), SIZE);
    assert!(back.iter().enumerate().all(|(i, b)| *b == pattern(i)));
    server.join().unwrap();
    // Port preservation: the pod's ephemeral port was free outside.
    assert_eq!(peer.port(), local.port());
    let f = gw
        .flows()
        .into_iter()
        .find(|f| f.inside.proto == Proto::Tcp)
        .expect("tcp flow");
    assert!(f.replied);
    assert!(f.bytes_in2out as usize > SIZE && f.bytes_out2in as usize > SIZE);
    if gw.offload() {
        // The kernel handed over TSO super-frames and they went through whole.
        assert!(gw.stats().get(Counter::GsoFrames) > 0);
    } else {
        assert_eq!(gw.stats().get(Counter::GsoFrames), 0);
    }
    assert_eq!(
        gw.stats().drops() - gw.stats().get(Counter::DropOtherEthertype),
        0,
        "{:?}",
        tapnat::ops::report::stats(&gw.stats())
    );
}

fn udp_request_response(kind: UplinkKind) {
    let (lab, gw) = start_kind(kind, "udp", |_| {});
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5353));
    let cli = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 40000));
    for i in 0..10u8 {
        cli.send_to(&[i; 100], SocketAddrV4::new(SERVER_IP, 5353))
            .unwrap();
        let mut b = [0u8; 200];
        let (n, peer) = srv.recv_from(&mut b).unwrap();
        assert_eq!(
            (&b[..n], peer.ip()),
            (&[i; 100][..], std::net::IpAddr::V4(GATEWAY_UPLINK_IP))
        );
        assert_eq!(peer.port(), 40000, "port preserved");
        srv.send_to(&[i + 1; 50], peer).unwrap();
        let (n, from) = cli.recv_from(&mut b).unwrap();
        assert_eq!(&b[..n], &[i + 1; 50][..]);
        assert_eq!(from, SocketAddrV4::new(SERVER_IP, 5353).into());
    }
    assert_eq!(gw.stats().get(Counter::FlowsCreated), 1);
}

fn same_pod_port_to_two_servers_gets_one_outside_port(kind: UplinkKind) {
    let (lab, _gw) = start_kind(kind, "eim", |_| {});
    let other = Ipv4Addr::new(198, 51, 100, 11);
    lab.ext.ip(&format!("addr add {other}/32 dev lo")).unwrap();
    // UDP: one socket, two destinations.
    let a = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 7000));
    let b = udp_in(&lab.ext, SocketAddrV4::new(other, 7001));
    let cli = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 0));
    cli.send_to(b"a", SocketAddrV4::new(SERVER_IP, 7000))
        .unwrap();
    cli.send_to(b"b", SocketAddrV4::new(other, 7001)).unwrap();
    let mut buf = [0u8; 8];
    let (_, pa) = a.recv_from(&mut buf).unwrap();
    let (_, pb) = b.recv_from(&mut buf).unwrap();
    assert_eq!(pa, pb, "endpoint-independent mapping for UDP");
    // TCP: two sockets bound to the same pod port (SO_REUSEADDR), two servers.
    let la = tcp_listen(&lab.ext, SocketAddrV4::new(SERVER_IP, 7100));
    let lb = tcp_listen(&lab.ext, SocketAddrV4::new(other, 7101));
    let port = 45678;
    let conn = |to: SocketAddrV4| {
        lab.pod
            .run(move || {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                s.set_reuse_address(true)?;
                s.bind(&SocketAddrV4::new(POD_IP, port).into())?;
                s.connect_timeout(&to.into(), T)?;
                Ok::<_, std::io::Error>(TcpStream::from(s))
            })
            .unwrap()
            .unwrap()
    };
    let _c1 = conn(SocketAddrV4::new(SERVER_IP, 7100));
    let _c2 = conn(SocketAddrV4::new(other, 7101));
    let (_, p1) = la.accept().unwrap();
    let (_, p2) = lb.accept().unwrap();
    assert_eq!(p1, p2, "endpoint-independent mapping for TCP");
    assert_eq!(p1.port(), port);
}

fn unsolicited_inbound_is_not_delivered(kind: UplinkKind) {
    let (lab, gw) = start_kind(kind, "unsolicited", |_| {});
    let pod_udp = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 9000));
    pod_udp
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let pod_tcp = tcp_listen(&lab.pod, SocketAddrV4::new(POD_IP, 9000));
    pod_tcp.set_nonblocking(true).unwrap();
    // To the gateway's outside address, where no flow exists...
    let ext_udp = udp_in(&lab.ext, SocketAddrV4::new(lab::EXT_ROUTER_IP, 0));
    ext_udp
        .send_to(b"x", SocketAddrV4::new(GATEWAY_UPLINK_IP, 9000))
        .unwrap();
    let r = lab
        .ext
        .run(|| {
            TcpStream::connect_timeout(
                &SocketAddrV4::new(GATEWAY_UPLINK_IP, 9000).into(),
                Duration::from_millis(700),
            )
        })
        .unwrap();
    let e = r.expect_err("no connection");
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::TimedOut,
        "no RST from the gateway: {e}"
    );
    // ...and straight at the pod's address, routed via the gateway.
    lab.ext
        .ip(&format!("route add 10.244.0.0/16 via {GATEWAY_UPLINK_IP}"))
        .unwrap();
    ext_udp
        .send_to(b"y", SocketAddrV4::new(POD_IP, 9000))
        .unwrap();
    let mut b = [0u8; 8];
    assert!(
        pod_udp.recv_from(&mut b).is_err(),
        "nothing reaches the pod"
    );
    assert!(pod_tcp.accept().is_err());
    let s = gw.stats();
    assert!(
        s.get(Counter::DropNoFlow) >= 2,
        "{}",
        tapnat::ops::report::stats(&s)
    );
    assert!(
        s.get(Counter::DropNotForUs) >= 1,
        "{}",
        tapnat::ops::report::stats(&s)
    );
    assert_eq!(s.get(Counter::PodTxFrames), 0);
    assert!(gw.flows().is_empty());
}

fn spoofed_source_is_not_forwarded(kind: UplinkKind) {
    let (lab, gw) = start_kind(kind, "spoof", |_| {});
    // Resolve the gateway first: the spoofed address is off the pod subnet.
    assert_eq!(
        Pinger::new(&lab.pod)
            .unwrap()
            .ping(GATEWAY_POD_IP, 1, T)
            .unwrap()
            .len(),
        1
    );
    let spoofed = Ipv4Addr::new(172, 31, 0, 5);
    lab.pod
        .ip(&format!("addr add {spoofed}/32 dev tapnat0"))
        .unwrap();
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5353));
    srv.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let cli = udp_in(&lab.pod, SocketAddrV4::new(spoofed, 0));
    for _ in 0..3 {
        cli.send_to(b"spoof", SocketAddrV4::new(SERVER_IP, 5353))
            .unwrap();
    }
    let mut b = [0u8; 16];
    assert!(srv.recv_from(&mut b).is_err(), "spoofed packet forwarded");
    assert_eq!(gw.stats().get(Counter::DropSpoofedSource), 3);
    // A legitimate source still works.
    let ok = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 0));
    ok.send_to(b"ok", SocketAddrV4::new(SERVER_IP, 5353))
        .unwrap();
    srv.set_read_timeout(Some(T)).unwrap();
    assert!(srv.recv_from(&mut b).is_ok());
}

fn ttl_1_gets_time_exceeded_from_the_gateway(kind: UplinkKind) {
    let (lab, gw) = start_kind(kind, "ttl", |_| {});
    let mut pod = Pinger::new(&lab.pod).unwrap();
    // Warm up ARP so the answer is about TTL only.
    assert_eq!(pod.ping(GATEWAY_POD_IP, 1, T).unwrap().len(), 1);
    match pod.echo(SERVER_IP, 1, 56, T).unwrap() {
        Echo::Error {
            from,
            icmp_type,
            code,
        } => {
            assert_eq!((from, icmp_type, code), (GATEWAY_POD_IP, 11, 0));
        }
        other => panic!("expected Time Exceeded, got {other:?}"),
    }
    assert_eq!(gw.stats().get(Counter::IcmpErrorsSent), 1);
    assert_eq!(gw.stats().get(Counter::DropTtlExceeded), 1);
    // TTL 2 is enough to reach the server one hop beyond the gateway.
    assert!(matches!(
        pod.echo(SERVER_IP, 2, 56, T).unwrap(),
        Echo::Reply { .. }
    ));
}

fn malformed_frames_are_counted_and_traffic_still_flows(kind: UplinkKind) {
    let (lab, gw) = start_kind(kind, "malformed", |_| {});
    let raw = lab
        .pod
        .run(|| PacketSocket::open("tapnat0"))
        .unwrap()
        .unwrap();
    let gw_mac = gw.addressing().pod_mac;
    let eth = |ethertype: u16, payload: &[u8]| {
        let mut f = gw_mac.as_bytes().to_vec();
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let good = tapnat::wire::build::udp(
        &tapnat::wire::build::Endpoints::new(POD_IP, SERVER_IP),
        1000,
        53,
        b"abcd",
        true,
    );
    let ip = &good[14..];
    let mut bad_ihl = ip.to_vec();
    bad_ihl[0] = 0x43;
    let mut bad_len = ip.to_vec();
    bad_len[2..4].copy_from_slice(&4000u16.to_be_bytes());
    let mut bad_csum = ip.to_vec();
    bad_csum[10] ^= 0x55;
    let mut bad_udp = ip.to_vec();
    bad_udp[24..26].copy_from_slice(&3u16.to_be_bytes());
    let frames: Vec<(Vec<u8>, Counter)> = vec![
        (eth(0x0800, &[]), Counter::DropBadIpHeader),
        (eth(0x0800, &bad_ihl), Counter::DropBadIpHeader),
        (eth(0x0800, &bad_len), Counter::DropBadIpHeader),
        (eth(0x0800, &bad_csum), Counter::DropBadIpChecksum),
        (eth(0x0800, &bad_udp), Counter::DropBadL4Header),
        (eth(0x0806, &[0, 1, 8, 0]), Counter::DropBadArp),
        (eth(0x88b5, &[0xde, 0xad]), Counter::DropOtherEthertype),
    ];
    let before = gw.stats();
    for (f, _) in &frames {
        raw.send(f).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = gw.stats();
    for (f, c) in &frames {
        assert!(
            after.get(*c) > before.get(*c),
            "{} not counted for frame {f:02x?}",
            c.name()
        );
    }
    // The same from outside, on the uplink, to the gateway's uplink MAC.
    let ext_raw = lab
        .ext
        .run(|| PacketSocket::open("tapnat1"))
        .unwrap()
        .unwrap();
    let up_mac = gw.addressing().uplink_mac;
    let ext_eth = |ethertype: u16, payload: &[u8]| {
        let mut f = up_mac.as_bytes().to_vec();
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x78]);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let inbound = tapnat::wire::build::udp(
        &tapnat::wire::build::Endpoints::new(SERVER_IP, GATEWAY_UPLINK_IP),
        53,
        1000,
        b"abcd",
        true,
    );
    let mut in_bad_csum = inbound[14..].to_vec();
    in_bad_csum[10] ^= 0x55;
    let mut in_bad_ihl = inbound[14..].to_vec();
    in_bad_ihl[0] = 0x43;
    let frames: Vec<(Vec<u8>, Counter)> = vec![
        (ext_eth(0x0800, &in_bad_ihl), Counter::DropBadIpHeader),
        (ext_eth(0x0800, &in_bad_csum), Counter::DropBadIpChecksum),
        (ext_eth(0x0806, &[0, 1, 8, 0]), Counter::DropBadArp),
        (ext_eth(0x88b5, &[0xde, 0xad]), Counter::DropOtherEthertype),
    ];
    let before = gw.stats();
    for (f, _) in &frames {
        ext_raw.send(f).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = gw.stats();
    for (f, c) in &frames {
        assert!(
            after.get(*c) > before.get(*c),
            "{} not counted for uplink frame {f:02x?}",
            c.name()
        );
    }
    // The gateway is alive and still translating.
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 53));
    let cli = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 0));
    cli.send_to(b"still", SocketAddrV4::new(SERVER_IP, 53))
        .unwrap();
    let mut b = [0u8; 8];
    let (n, _) = srv.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"still");
    let mut pod = Pinger::new(&lab.pod).unwrap();
    assert_eq!(pod.ping(SERVER_IP, 2, T).unwrap().len(), 2);
}

fn frames_are_steered_to_their_owners_queue(kind: UplinkKind) {
    let (lab, gw) = start_kind(kind, "steer", |_| {});
    assert!(gw.steering(), "the eBPF steering program was not attached");
    // Many short UDP flows from different ports: with steering, none of
    // their first packets needs a hand-off between workers.
    let srv = udp_in(&lab.ext, std::net::SocketAddrV4::new(SERVER_IP, 5000));
    for _ in 0..40 {
        let c = udp_in(&lab.pod, std::net::SocketAddrV4::new(POD_IP, 0));
        c.send_to(b"x", std::net::SocketAddrV4::new(SERVER_IP, 5000))
            .unwrap();
        let mut b = [0u8; 4];
        let (_, peer) = srv.recv_from(&mut b).unwrap();
        srv.send_to(b"y", peer).unwrap();
        c.recv_from(&mut b).unwrap();
    }
    let s = gw.stats();
    assert_eq!(
        s.get(Counter::HandedOff),
        0,
        "{}",
        tapnat::ops::report::stats(&s)
    );
    assert_eq!(s.get(Counter::In2outPackets), 40);
}

// ---- the raw uplink's own checks and life cycle ----

/// A raw-uplink lab, its config and the namespace of the gateway's interface.
fn raw_lab(tag: &str) -> (Lab, Config) {
    let lab = Lab::with_uplink(tag, UplinkKind::Raw).expect("namespaces");
    let mut config = lab.config();
    config.workers.threads = 2;
    (lab, config)
}

/// `tapnat run` on `config` (written to a file), expecting it to refuse:
/// its exit status and stderr. No device of the pod side is created.
fn run_refused(tag: &str, config: &Config, lab: &Lab) -> (i32, String) {
    let text = format!(
        "[pod]\nnetns = \"{}\"\n[uplink]\nkind = \"raw\"\ninterface = \"{}\"\nnetns = \"{}\"\n[control]\nsocket = \"{}\"\n",
        lab.pod.path().display(),
        config.uplink.interface.as_deref().unwrap(),
        lab.uplink_ns().path().display(),
        std::env::temp_dir()
            .join(format!("tapnat-{tag}-{}.sock", std::process::id()))
            .display(),
    );
    let file = TempConfig::new(tag, &text);
    let out = tapnat()
        .args(["run", "--config", file.path()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn raw_uplink_with_a_kernel_address_is_refused_naming_the_key_and_the_fix() {
    if !root() {
        return;
    }
    let (lab, config) = raw_lab("raw-addr");
    let up = lab.uplink_ns();
    up.ip(&format!(
        "addr add 192.0.2.77/24 dev {}",
        lab::RAW_UPLINK_IF
    ))
    .unwrap();
    let e = Gateway::start(&config).err().expect("refused");
    let text = e.to_string();
    assert!(
        matches!(
            &e,
            tapnat::gateway::GatewayError::Config(tapnat::config::ConfigError::Invalid { key, .. })
                if key == "uplink.interface"
        ),
        "{text}"
    );
    let fix = format!("ip -n {} addr flush dev {}", up.name(), lab::RAW_UPLINK_IF);
    assert!(text.contains(&fix) && text.contains("192.0.2.77"), "{text}");
    let (code, stderr) = run_refused("raw-addr", &config, &lab);
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("uplink.interface") && stderr.contains(&fix),
        "{stderr}"
    );
    // Nothing was created on the pod side.
    assert!(lab.pod.ip("link show dev tapnat0").is_err());
}

#[test]
fn raw_uplink_on_a_missing_interface_is_refused_naming_the_key() {
    if !root() {
        return;
    }
    let (lab, mut config) = raw_lab("raw-missing");
    config.uplink.interface = Some("nosuch0".into());
    let e = Gateway::start(&config).err().expect("refused");
    assert!(
        matches!(
            &e,
            tapnat::gateway::GatewayError::Config(tapnat::config::ConfigError::Invalid { key, .. })
                if key == "uplink.interface"
        ),
        "{e}"
    );
    let (code, stderr) = run_refused("raw-missing", &config, &lab);
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("uplink.interface") && stderr.contains("no interface \"nosuch0\""),
        "{stderr}"
    );
}

#[test]
fn raw_uplink_warns_when_its_namespace_forwards() {
    if !root() {
        return;
    }
    let (lab, config) = raw_lab("raw-fwd");
    let status = lab
        .uplink_ns()
        .command("sh")
        .args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        .status()
        .unwrap();
    assert!(status.success());
    let gw = Gateway::start(&config).expect("starts");
    assert_eq!(gw.warnings().len(), 1, "{:?}", gw.warnings());
    assert!(gw.warnings()[0].contains("forwarding"));
    gw.stop();
    // Without forwarding: no warning.
    let (lab2, config2) = raw_lab("raw-nofwd");
    let gw = Gateway::start(&config2).expect("starts");
    assert!(gw.warnings().is_empty(), "{:?}", gw.warnings());
    drop((lab, lab2));
}

#[test]
fn raw_uplink_keeps_running_over_link_down_and_stops_when_the_interface_goes() {
    if !root() {
        return;
    }
    let (lab, gw) = start_kind(UplinkKind::Raw, "raw-life", |_| {});
    let failures = gw.failures();
    let mut pod = Pinger::new(&lab.pod).unwrap();
    assert_eq!(pod.ping(SERVER_IP, 2, T).unwrap().len(), 2);
    let up = lab.uplink_ns();
    up.ip(&format!("link set {} down", lab::RAW_UPLINK_IF))
        .unwrap();
    assert!(
        failures.recv_timeout(Duration::from_secs(1)).is_err(),
        "a link going down stopped the gateway"
    );
    up.ip(&format!("link set {} up", lab::RAW_UPLINK_IF))
        .unwrap();
    // Traffic flows again once the link is back (the veth needs a moment).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pod
        .ping(SERVER_IP, 1, Duration::from_millis(500))
        .unwrap()
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no traffic after link up"
        );
    }
    // Deleted while down: the kernel's ENETDOWN came with the link going
    // down, the deletion only says so on rtnetlink.
    up.ip(&format!("link set {} down", lab::RAW_UPLINK_IF))
        .unwrap();
    assert!(failures.recv_timeout(Duration::from_millis(500)).is_err());
    let deleted = std::time::Instant::now();
    up.ip(&format!("link del {}", lab::RAW_UPLINK_IF)).unwrap();
    let f = failures
        .recv_timeout(Duration::from_secs(2))
        .expect("the gateway stops within 2 s when its interface is deleted");
    assert!(
        matches!(&f, tapnat::gateway::Failure::DeviceGone { device, .. } if device == lab::RAW_UPLINK_IF),
        "{f}"
    );
    assert!(deleted.elapsed() < Duration::from_secs(2));
    gw.stop();
}

#[test]
fn raw_uplink_stops_when_its_namespace_is_deleted() {
    if !root() {
        return;
    }
    let (lab, gw) = start_kind(UplinkKind::Raw, "raw-nsgone", |_| {});
    let failures = gw.failures();
    assert_eq!(
        Pinger::new(&lab.pod)
            .unwrap()
            .ping(SERVER_IP, 1, T)
            .unwrap()
            .len(),
        1
    );
    let ns = lab.uplink_ns().name().to_owned();
    lab::ip(&["netns", "del", &ns]).unwrap();
    let f = failures
        .recv_timeout(Duration::from_secs(2))
        .expect("the gateway stops within 2 s when its uplink namespace is deleted");
    assert!(
        matches!(&f, tapnat::gateway::Failure::NamespaceGone { device, .. } if device == lab::RAW_UPLINK_IF),
        "{f}"
    );
    gw.stop();
}
