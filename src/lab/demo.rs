//! `tapnat demo`: the main job on the embedded default config, between two
//! throwaway namespaces, with real kernel peers on both sides.
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use crate::gateway::stats::Counter;
use crate::gateway::Gateway;
use crate::lab::{self, Lab, Pinger, GATEWAY_POD_IP, GATEWAY_UPLINK_IP, POD_IP, SERVER_IP};

const T: Duration = Duration::from_secs(2);

fn step(what: &str) {
    println!("\n== {what}");
}

/// A TCP server in `lab.ext` that answers each line with the peer address it saw.
fn tcp_server(lab: &Lab) -> io::Result<std::thread::JoinHandle<()>> {
    let listener = lab
        .ext
        .run(|| TcpListener::bind(SocketAddrV4::new(SERVER_IP, 8080)))??;
    Ok(std::thread::spawn(move || {
        if let Ok((mut s, peer)) = listener.accept() {
            let mut line = String::new();
            let _ = BufReader::new(&s).read_line(&mut line);
            let _ = writeln!(s, "hello from {SERVER_IP}:8080, you are {peer}");
        }
    }))
}

pub fn run() -> io::Result<()> {
    if !lab::is_root() {
        return Err(io::Error::other(
            "the demo creates network namespaces and TAP devices: run it as root",
        ));
    }
    let lab = Lab::new("demo")?;
    let config = lab.config();
    println!(
        "tapnat demo: pod namespace {} and external namespace {} (both removed at exit)",
        lab.pod.name(),
        lab.ext.name()
    );
    println!(
        "gateway on the embedded default config: pod {} {}, uplink {} {} via {}",
        config.pod.tap,
        config.pod.address,
        config.uplink.tap,
        config.uplink.address,
        config.uplink.gateway
    );
    let gw = Gateway::start(&config)
        .map_err(|e| io::Error::other(format!("{e}: {:?}", std::error::Error::source(&e))))?;
    lab.wire_up(&config)?;

    let mut ping = Pinger::new(&lab.pod)?;
    step(&format!(
        "pod {POD_IP}: ping the gateway {GATEWAY_POD_IP} (ARP, then ICMP echo answered by smoltcp)"
    ));
    let rtts = ping.ping(GATEWAY_POD_IP, 3, T)?;
    println!(
        "  {}/3 replies, median rtt {:?}",
        rtts.len(),
        lab::median(&rtts)
    );
    println!(
        "  pod's ARP entry: {}",
        lab.pod.ip(&format!("neigh show {GATEWAY_POD_IP}"))?.trim()
    );

    step(&format!(
        "pod: ping {SERVER_IP} in the external namespace, through the NAT"
    ));
    let rtts = ping.ping(SERVER_IP, 3, T)?;
    println!(
        "  {}/3 replies, median rtt {:?}",
        rtts.len(),
        lab::median(&rtts)
    );

    step(&format!("pod: TCP request to {SERVER_IP}:8080"));
    let server = tcp_server(&lab)?;
    let mut conn = lab
        .pod
        .run(|| TcpStream::connect_timeout(&SocketAddrV4::new(SERVER_IP, 8080).into(), T))??;
    conn.set_read_timeout(Some(T))?;
    println!(
        "  pod socket: {} -> {}",
        conn.local_addr()?,
        conn.peer_addr()?
    );
    writeln!(conn, "hello")?;
    let mut answer = String::new();
    BufReader::new(&conn).read_line(&mut answer)?;
    println!("  server answered: {}", answer.trim());
    println!("  (the server saw the uplink address {GATEWAY_UPLINK_IP}, not the pod's {POD_IP})");
    let _ = server.join();

    step(&format!("pod: UDP datagram to {SERVER_IP}:5353"));
    let usrv = lab
        .ext
        .run(|| UdpSocket::bind(SocketAddrV4::new(SERVER_IP, 5353)))??;
    let ucli = lab.pod.run(|| UdpSocket::bind("0.0.0.0:0"))??;
    ucli.set_read_timeout(Some(T))?;
    usrv.set_read_timeout(Some(T))?;
    ucli.send_to(b"ping", SocketAddrV4::new(SERVER_IP, 5353))?;
    let mut b = [0u8; 64];
    let (_, peer) = usrv.recv_from(&mut b)?;
    usrv.send_to(format!("you are {peer}").as_bytes(), peer)?;
    let (n, _) = ucli.recv_from(&mut b)?;
    println!(
        "  pod socket {} got: {}",
        ucli.local_addr()?,
        String::from_utf8_lossy(&b[..n])
    );

    step(&format!(
        "external: unsolicited TCP to {GATEWAY_UPLINK_IP}:8080 (no flow: dropped, no RST)"
    ));
    let before = gw.stats().get(Counter::DropToGateway) + gw.stats().get(Counter::DropNoFlow);
    let r = lab.ext.run(|| {
        TcpStream::connect_timeout(
            &SocketAddrV4::new(GATEWAY_UPLINK_IP, 8080).into(),
            Duration::from_millis(500),
        )
    })?;
    let after = gw.stats().get(Counter::DropToGateway) + gw.stats().get(Counter::DropNoFlow);
    println!(
        "  connect: {}; gateway dropped {} unsolicited segment(s)",
        match r {
            Ok(_) => "connected (unexpected!)".to_string(),
            Err(e) => e.to_string(),
        },
        after - before
    );

    step("flow table (like conntrack -L)");
    print!("{}", crate::ops::report::flows(&gw.flows()));
    step("counters");
    print!("{}", crate::ops::report::stats(&gw.stats()));
    gw.stop();
    println!("\ndone: gateway stopped, namespaces removed");
    Ok(())
}
