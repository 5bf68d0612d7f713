//! Throwaway network namespaces and kernel-socket probes, for `tapnat demo`,
//! the end-to-end tests and the benchmark.
//!
//! Everything here creates its own uniquely named namespaces and removes them
//! on drop. Traffic only ever flows between those namespaces: the root
//! namespace's routes, firewall and sysctls are never touched. Probes are
//! real kernel sockets opened inside a namespace (see
//! [`crate::device::run_in_netns`]), so the peers on both sides of the
//! gateway are the kernel's own TCP, UDP, ICMP and ARP.
pub mod bench;
pub mod demo;
pub mod soak;

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{Config, UplinkKind, DEFAULT_TOML};
use crate::device::run_in_netns;

/// The pod's address in the standard topology.
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// The gateway's pod-side address (embedded default).
pub const GATEWAY_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The gateway's uplink address (embedded default).
pub const GATEWAY_UPLINK_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The external namespace's address on the uplink: the gateway's next hop.
pub const EXT_ROUTER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// A server address in the external namespace, off the uplink subnet, so
/// traffic to it uses the next hop.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

/// The far host, one router beyond the external namespace.
pub const FAR_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The external namespace's address towards the far host.
pub const FAR_ROUTER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`, returning stdout or an error carrying stderr.
pub fn ip(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process runs as root (namespaces and TAPs need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A network namespace this process created; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `tapnat-TAG-PID-N` with its loopback up.
    pub fn new(tag: &str) -> io::Result<Netns> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("tapnat-{tag}-{}-{n}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, as the config's `netns` key takes it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME ARGS` (ARGS split on whitespace).
    pub fn ip(&self, args: &str) -> io::Result<String> {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend(args.split_whitespace());
        ip(&v)
    }

    /// Runs `f` on a thread inside this namespace; sockets it opens stay here.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        run_in_netns(&self.path(), f)
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Waits until link `dev` exists here.
    pub fn wait_for_link(&self, dev: &str, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ip(&format!("link show dev {dev}")).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("link {dev} did not appear in {}", self.name),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The standard topology: a pod namespace and an external namespace, the
/// gateway's two TAPs created inside them.
///
/// ```text
///  pod ns: tapnat0 10.244.0.2/16 ── tapnat ── ext ns: tapnat1 203.0.113.1/24, lo 198.51.100.10
///          default via 10.244.0.1     10.244.0.1 / 203.0.113.10
/// ```
///
/// With a raw uplink ([`UplinkKind::Raw`]) the gateway's uplink is instead
/// [`RAW_UPLINK_IF`], one end of a veth pair in a third namespace (`up`,
/// the gateway's uplink namespace, no address on it), whose other end is
/// `tapnat1` in the external namespace:
///
/// ```text
///  ... tapnat ── up ns: uplink0 (AF_PACKET, no address) ══ veth ══ ext ns: tapnat1 203.0.113.1/24
/// ```
#[derive(Debug)]
pub struct Lab {
    pub pod: Netns,
    pub ext: Netns,
    /// How the gateway's uplink is attached.
    pub uplink: UplinkKind,
    /// With a raw uplink: the namespace holding the gateway's end of the
    /// veth pair ([`RAW_UPLINK_IF`]).
    pub up: Option<Netns>,
    /// A host beyond the external namespace, after [`Lab::add_far`].
    pub far: Option<Netns>,
    /// A second pod on the pod segment, after [`Lab::add_pod2`].
    pub pod2: Option<Netns>,
}

/// The second pod's address.
pub const POD2_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);

/// The gateway's raw uplink interface in a raw-uplink lab.
pub const RAW_UPLINK_IF: &str = "uplink0";
/// The external namespace's end of a raw-uplink lab's veth pair.
pub const RAW_PEER_IF: &str = "tapnat1";

/// The uplink kind a plain [`Lab::new`] builds: the one [`over_uplink`]
/// set for this thread, else `TAPNAT_LAB_UPLINK=raw` in the environment
/// runs every test (and the demo) over a raw uplink.
pub fn uplink_from_env() -> UplinkKind {
    if let Some(kind) = THREAD_UPLINK.with(std::cell::Cell::get) {
        return kind;
    }
    match std::env::var("TAPNAT_LAB_UPLINK").as_deref() {
        Ok("raw") => UplinkKind::Raw,
        _ => UplinkKind::Tap,
    }
}

thread_local! {
    static THREAD_UPLINK: std::cell::Cell<Option<UplinkKind>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every [`Lab::new`] on this thread building `kind` of
/// uplink: one test body run over a TAP and over a raw uplink.
pub fn over_uplink<T>(kind: UplinkKind, f: impl FnOnce() -> T) -> T {
    let before = THREAD_UPLINK.with(|c| c.replace(Some(kind)));
    struct Restore(Option<UplinkKind>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_UPLINK.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

impl Lab {
    /// A lab whose uplink kind is [`uplink_from_env`] (a TAP by default).
    pub fn new(tag: &str) -> io::Result<Lab> {
        Lab::with_uplink(tag, uplink_from_env())
    }

    /// A lab with the given uplink kind; with a raw uplink the veth pair
    /// exists at once (the gateway needs the interface to start).
    pub fn with_uplink(tag: &str, uplink: UplinkKind) -> io::Result<Lab> {
        let mut lab = Lab {
            pod: Netns::new(&format!("{tag}-pod"))?,
            ext: Netns::new(&format!("{tag}-ext"))?,
            uplink,
            up: None,
            far: None,
            pod2: None,
        };
        if uplink == UplinkKind::Raw {
            let up = Netns::new(&format!("{tag}-up"))?;
            up.ip(&format!(
                "link add {RAW_UPLINK_IF} type veth peer name {RAW_PEER_IF} netns {}",
                lab.ext.name()
            ))?;
            lab.up = Some(up);
        }
        Ok(lab)
    }

    /// The namespace the gateway's uplink device lives in: the external
    /// one for a TAP, the `up` one for a raw uplink.
    pub fn uplink_ns(&self) -> &Netns {
        self.up.as_ref().unwrap_or(&self.ext)
    }

    /// Puts a second pod on the pod segment: a bridge in the pod namespace
    /// joins the gateway's TAP and a veth to the second pod, whose address is
    /// [`POD2_IP`]. Call after [`Lab::wire_up`].
    pub fn add_pod2(&mut self, tag: &str, pod_tap: &str) -> io::Result<()> {
        let pod2 = Netns::new(&format!("{tag}-pod2"))?;
        let p = &self.pod;
        p.ip("link add br0 type bridge")?;
        p.ip(&format!(
            "link add topod2 type veth peer name eth0 netns {}",
            pod2.name()
        ))?;
        p.ip(&format!("addr flush dev {pod_tap}"))?;
        p.ip(&format!("link set {pod_tap} master br0"))?;
        p.ip("link set topod2 master br0")?;
        p.ip("link set topod2 up")?;
        p.ip("link set br0 up")?;
        p.ip(&format!("addr add {POD_IP}/16 dev br0"))?;
        p.ip(&format!("route replace default via {GATEWAY_POD_IP}"))?;
        pod2.ip(&format!("addr add {POD2_IP}/16 dev eth0"))?;
        pod2.ip("link set eth0 up")?;
        pod2.ip(&format!("route add default via {GATEWAY_POD_IP}"))?;
        self.pod2 = Some(pod2);
        Ok(())
    }

    /// Makes the external namespace a router to a far host over a link of
    /// `link_mtu` (for traceroute and path-MTU tests):
    ///
    /// ```text
    ///  ... tapnat ── ext ns (203.0.113.1, forwarding) ══ mtu ══ far ns 192.0.2.2
    /// ```
    pub fn add_far(&mut self, tag: &str, link_mtu: u16) -> io::Result<()> {
        let far = Netns::new(&format!("{tag}-far"))?;
        self.ext.ip(&format!(
            "link add tofar mtu {link_mtu} type veth peer name toext mtu {link_mtu} netns {}",
            far.name()
        ))?;
        self.ext
            .ip(&format!("addr add {FAR_ROUTER_IP}/24 dev tofar"))?;
        self.ext.ip("link set tofar up")?;
        far.ip(&format!("addr add {FAR_IP}/24 dev toext"))?;
        far.ip("link set toext up")?;
        // The far host advertises the MSS of a 1500-byte MTU, as a host whose
        // own link is wider than the path would: the small link is in the middle.
        far.ip(&format!(
            "route add default via {FAR_ROUTER_IP} advmss 1460"
        ))?;
        // Forwarding inside the external namespace only (a process there writes it).
        let status = self
            .ext
            .command("sh")
            .args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
            .status()?;
        if !status.success() {
            return Err(io::Error::other(
                "cannot enable forwarding in the external namespace",
            ));
        }
        self.far = Some(far);
        Ok(())
    }

    /// The embedded default config, with the devices placed in this lab's
    /// namespaces (and, for a raw uplink, `uplink.kind = "raw"` on
    /// [`RAW_UPLINK_IF`]).
    pub fn config(&self) -> Config {
        let mut c =
            Config::from_toml_str(DEFAULT_TOML).expect("the embedded default config is valid");
        c.pod.netns = Some(self.pod.path());
        c.uplink.netns = Some(self.uplink_ns().path());
        if self.uplink == UplinkKind::Raw {
            c.uplink.kind = UplinkKind::Raw;
            c.uplink.interface = Some(RAW_UPLINK_IF.to_owned());
        }
        c
    }

    /// The external namespace's end of the uplink link: the uplink TAP,
    /// or the raw uplink's veth peer.
    pub fn ext_uplink_if<'a>(&self, config: &'a Config) -> &'a str {
        match self.uplink {
            UplinkKind::Tap => &config.uplink.tap,
            UplinkKind::Raw => RAW_PEER_IF,
        }
    }

    /// Once the gateway has created its TAPs: addresses and routes on the
    /// kernel side of each, as a pod and an upstream router would have them.
    pub fn wire_up(&self, config: &Config) -> io::Result<()> {
        let (pod_tap, up_tap) = (&config.pod.tap, self.ext_uplink_if(config));
        self.pod.wait_for_link(pod_tap, Duration::from_secs(5))?;
        self.ext.wait_for_link(up_tap, Duration::from_secs(5))?;
        let pod_prefix = config.pod.address.prefix_len;
        // With DHCP the external side is the lab's DHCP server, on
        // uplink.gateway/24 (the leases it hands out are in that subnet).
        let up_prefix = config.uplink.address.fixed().map_or(24, |n| n.prefix_len);
        self.pod
            .ip(&format!("addr add {POD_IP}/{pod_prefix} dev {pod_tap}"))?;
        self.pod.ip(&format!("link set {pod_tap} up"))?;
        self.pod.ip(&format!(
            "route add default via {}",
            config.pod.address.addr
        ))?;
        self.ext.ip(&format!(
            "addr add {}/{up_prefix} dev {up_tap}",
            config.uplink.gateway
        ))?;
        if self.uplink == UplinkKind::Raw && !config.workers.offload {
            // A gateway without offload reads frames of at most the MTU: the
            // veth peer must send no TSO super-frames (as a NIC without GRO).
            self.ext.ip(&format!("link set {up_tap} gso_max_segs 1"))?;
        }
        self.ext.ip(&format!("link set {up_tap} up"))?;
        self.ext.ip(&format!("addr add {SERVER_IP}/32 dev lo"))?;
        Ok(())
    }
}

/// What came back for one ICMP echo request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// An echo reply from `from` after `rtt`.
    Reply { from: Ipv4Addr, rtt: Duration },
    /// An ICMP error about our request (e.g. Time Exceeded).
    Error {
        from: Ipv4Addr,
        icmp_type: u8,
        code: u8,
    },
    /// Nothing matching within the timeout.
    Timeout,
}

/// Sends ICMP echo requests from a raw socket in `ns`.
pub struct Pinger {
    sock: Socket,
    id: u16,
    seq: u16,
}

impl Pinger {
    pub fn new(ns: &Netns) -> io::Result<Pinger> {
        let sock = ns.run(|| Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)))??;
        let id = (std::process::id() as u16)
            ^ (NEXT.fetch_add(1, Ordering::Relaxed) as u16).rotate_left(8);
        Ok(Pinger { sock, id, seq: 0 })
    }

    /// One echo request to `dst` with `ttl`, waiting up to `timeout`.
    pub fn echo(
        &mut self,
        dst: Ipv4Addr,
        ttl: u32,
        payload: usize,
        timeout: Duration,
    ) -> io::Result<Echo> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = vec![8u8, 0, 0, 0];
        req.extend_from_slice(&self.id.to_be_bytes());
        req.extend_from_slice(&self.seq.to_be_bytes());
        req.extend((0..payload).map(|i| i as u8));
        let c = crate::wire::csum::checksum(&req);
        req[2..4].copy_from_slice(&c.to_be_bytes());
        self.sock.set_ttl_v4(ttl)?;
        let start = Instant::now();
        self.sock.send_to(&req, &SocketAddrV4::new(dst, 0).into())?;
        Ok(
            recv_matching(&self.sock, timeout, |pkt| self.parse(pkt, start))?
                .unwrap_or(Echo::Timeout),
        )
    }

    fn parse(&self, pkt: &[u8], start: Instant) -> Option<Echo> {
        let ihl = usize::from(pkt.first()? & 0x0f) * 4;
        let from = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
        let icmp = pkt.get(ihl..)?;
        let (t, code) = (*icmp.first()?, *icmp.get(1)?);
        let ours = |m: &[u8]| {
            m.get(4..8) == Some(&[self.id.to_be_bytes(), self.seq.to_be_bytes()].concat()[..])
        };
        match t {
            0 if ours(icmp) => Some(Echo::Reply {
                from,
                rtt: start.elapsed(),
            }),
            3 | 11 | 12 => {
                let inner = icmp.get(8..)?;
                let ihl2 = usize::from(inner.first()? & 0x0f) * 4;
                let q = inner.get(ihl2..)?;
                (q.first() == Some(&8) && ours(q)).then_some(Echo::Error {
                    from,
                    icmp_type: t,
                    code,
                })
            }
            _ => None,
        }
    }

    /// `count` echoes; the round-trip times of those answered.
    pub fn ping(
        &mut self,
        dst: Ipv4Addr,
        count: usize,
        timeout: Duration,
    ) -> io::Result<Vec<Duration>> {
        let mut rtts = Vec::new();
        for _ in 0..count {
            if let Echo::Reply { rtt, .. } = self.echo(dst, 64, 56, timeout)? {
                rtts.push(rtt);
            }
        }
        Ok(rtts)
    }
}

/// An ICMP error seen by an [`IcmpListener`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpSeen {
    pub from: Ipv4Addr,
    pub icmp_type: u8,
    pub code: u8,
    /// The second header word (the next-hop MTU of Fragmentation Needed).
    pub rest: u32,
    /// The quoted packet's source and destination.
    pub quoted_src: Ipv4Addr,
    pub quoted_dst: Ipv4Addr,
}

/// Receives every ICMP message arriving in a namespace (a raw socket), to
/// see the errors that probes from ordinary sockets provoke.
pub struct IcmpListener {
    sock: Socket,
}

impl IcmpListener {
    pub fn new(ns: &Netns) -> io::Result<IcmpListener> {
        let sock = ns.run(|| Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)))??;
        Ok(IcmpListener { sock })
    }

    /// Waits for an ICMP error quoting a `proto` packet with these ports
    /// (for ICMP echo, `sport` is the identifier and `dport` is ignored).
    pub fn error_for(
        &self,
        proto: u8,
        sport: u16,
        dport: u16,
        timeout: Duration,
    ) -> io::Result<Option<IcmpSeen>> {
        recv_matching(&self.sock, timeout, |pkt| {
            parse_error(pkt, proto, sport, dport)
        })
    }
}

fn parse_error(pkt: &[u8], proto: u8, sport: u16, dport: u16) -> Option<IcmpSeen> {
    let ihl = usize::from(pkt.first()? & 0x0f) * 4;
    let icmp = pkt.get(ihl..)?;
    if !matches!(icmp.first()?, 3 | 11 | 12) {
        return None;
    }
    let inner = icmp.get(8..)?;
    let ihl2 = usize::from(inner.first()? & 0x0f) * 4;
    if *inner.get(9)? != proto {
        return None;
    }
    let l4 = inner.get(ihl2..ihl2 + 8)?;
    let be = |i: usize| u16::from_be_bytes([l4[i], l4[i + 1]]);
    let ours = if proto == 1 {
        be(4) == sport
    } else {
        be(0) == sport && be(2) == dport
    };
    ours.then(|| IcmpSeen {
        from: Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
        icmp_type: icmp[0],
        code: icmp[1],
        rest: u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
        quoted_src: Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]),
        quoted_dst: Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]),
    })
}

/// Reads datagrams from `sock` until `parse` accepts one or `timeout`
/// passes (then None).
fn recv_matching<T>(
    sock: &Socket,
    timeout: Duration,
    mut parse: impl FnMut(&[u8]) -> Option<T>,
) -> io::Result<Option<T>> {
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Ok(None);
        }
        sock.set_read_timeout(Some(left))?;
        let n = match (&*sock).read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        if let Some(t) = parse(&buf[..n]) {
            return Ok(Some(t));
        }
    }
}

/// The median of some durations (zero when empty).
pub fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}
