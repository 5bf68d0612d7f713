//! Integration tests for the device layer against the real kernel.
//!
//! Most tests need root (CAP_NET_ADMIN and CAP_SYS_ADMIN for `ip netns` and setns).
//! Without root they print a skip line and pass, except when `CI` is set: then
//! they fail, so a CI run can never silently skip them.
//!
//! Every test works in its own network namespace `tapnat-dev-<pid>-<n>`, which a
//! Drop guard deletes even when the test fails. Nothing touches the root
//! namespace's links, routes, firewall or sysctls, and no traffic leaves the test
//! namespaces.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr,
};
use tapnat::device::{run_in_netns, Poller, Tap, TapOptions, Waker, VNET_HDR_LEN};

/// Whether the effective uid is 0, read from /proc (no unsafe in tests).
fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0")
}

/// `true` when the test may run. Not root: fail under `CI`, else skip.
fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root, and CI is set, so it must not be skipped");
    }
    eprintln!("skipping {test}: needs root");
    false
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .output()
        .expect("failed to run ip(8)")
}

fn ip_ok(args: &[&str]) -> String {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace that exists for the guard's lifetime.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "tapnat-dev-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip_ok(&["netns", "add", &name]);
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n NAME args...`
    fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn ip_ok(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip_ok(&all)
    }

    fn link_exists(&self, dev: &str) -> bool {
        self.ip(&["-o", "link", "show", dev]).status.success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = ip(&["netns", "del", &self.name]);
        if !out.status.success() {
            eprintln!(
                "warning: ip netns del {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Poll `cond` every 10 ms for up to 1 s.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn tap_is_created_in_netns_up_with_mtu_and_removed_on_drop() {
    if !require_root("tap_is_created_in_netns_up_with_mtu_and_removed_on_drop") {
        return;
    }
    let ns = Netns::new();
    let tap = Tap::open("tdev0", Some(&ns.path()), 1400, TapOptions::default()).unwrap();
    assert_eq!(tap.name(), "tdev0");
    assert!(tap.created());

    let line = ns.ip_ok(&["-o", "link", "show", "tdev0"]);
    assert!(line.contains(" mtu 1400 "), "{line}");
    let flags = line
        .split('<')
        .nth(1)
        .and_then(|rest| rest.split('>').next())
        .unwrap_or("");
    assert!(flags.split(',').any(|f| f == "UP"), "{line}");
    // Not in the caller's namespace (the test runs in the root namespace).
    assert!(!ip(&["-o", "link", "show", "tdev0"]).status.success());

    // Non-blocking: nothing queued yet may mean WouldBlock or an IPv6 frame the
    // kernel sent on link-up; it must never block.
    let mut buf = [0u8; 2048];
    let _ = tap.recv(&mut buf);

    drop(tap);
    assert!(
        eventually(|| !ns.link_exists("tdev0")),
        "tdev0 survived the drop of its fd"
    );
}

const OUR_MAC: EthernetAddress = EthernetAddress([0x02, 0x00, 0x5e, 0x10, 0x20, 0x30]);
const OUR_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const KERNEL_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// An ARP request "who has KERNEL_IP? tell OUR_IP", preceded by `hdr` zero bytes.
fn arp_request(hdr: usize) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: OUR_MAC,
        source_protocol_addr: OUR_IP,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: KERNEL_IP,
    };
    let eth = EthernetRepr {
        src_addr: OUR_MAC,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut bytes = vec![0u8; hdr + eth.buffer_len() + arp.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut bytes[hdr..]);
    eth.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    bytes
}

/// Whether `frame` (after `hdr` bytes) is the kernel's ARP reply to [`arp_request`].
fn is_arp_reply(frame: &[u8], hdr: usize) -> bool {
    let Some(frame) = frame.get(hdr..) else {
        return false;
    };
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    if eth.ethertype() != EthernetProtocol::Arp || eth.dst_addr() != OUR_MAC {
        return false;
    }
    let Ok(arp) = ArpPacket::new_checked(eth.payload()).and_then(|p| ArpRepr::parse(&p)) else {
        return false;
    };
    matches!(arp, ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_protocol_addr,
        target_hardware_addr,
        target_protocol_addr,
        ..
    } if source_protocol_addr == KERNEL_IP && target_hardware_addr == OUR_MAC && target_protocol_addr == OUR_IP)
}

/// Send an ARP request into the namespace through `tap` and wait (2 s at most)
/// for the kernel's reply on it.
fn arp_round_trip(tap: &Tap) {
    let hdr = tap.vnet_hdr_len();
    tap.send(&arp_request(hdr)).unwrap();

    let mut poller = Poller::new();
    let slot = poller.add(std::os::fd::AsRawFd::as_raw_fd(tap));
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = vec![0u8; 2048];
    let mut seen = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no ARP reply within 2 s ({seen} other frames seen)"
        );
        poller.wait(Some(left)).unwrap();
        if !poller.readable(slot) {
            continue;
        }
        loop {
            match tap.recv(&mut buf) {
                Ok(n) => {
                    if is_arp_reply(&buf[..n], hdr) {
                        return;
                    }
                    seen += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("recv failed: {e}"),
            }
        }
    }
}

#[test]
fn frames_flow_both_ways() {
    if !require_root("frames_flow_both_ways") {
        return;
    }
    let ns = Netns::new();
    let tap = Tap::open("tdev0", Some(&ns.path()), 1400, TapOptions::default()).unwrap();
    ns.ip_ok(&["addr", "add", "192.0.2.1/24", "dev", "tdev0"]);
    arp_round_trip(&tap);
}

#[test]
fn frames_flow_with_vnet_hdr() {
    if !require_root("frames_flow_with_vnet_hdr") {
        return;
    }
    let ns = Netns::new();
    let opts = TapOptions {
        vnet_hdr: true,
        ..TapOptions::default()
    };
    let tap = Tap::open("tdev0", Some(&ns.path()), 1400, opts).unwrap();
    assert_eq!(tap.vnet_hdr_len(), VNET_HDR_LEN);
    ns.ip_ok(&["addr", "add", "192.0.2.1/24", "dev", "tdev0"]);
    arp_round_trip(&tap);
}

#[test]
fn multi_queue_device_lives_until_last_queue_drops() {
    if !require_root("multi_queue_device_lives_until_last_queue_drops") {
        return;
    }
    let ns = Netns::new();
    let opts = TapOptions {
        multi_queue: true,
        ..TapOptions::default()
    };
    let q0 = Tap::open("tdev0", Some(&ns.path()), 1400, opts).unwrap();
    let q1 = q0.open_queue().unwrap();
    assert_eq!(q1.name(), "tdev0");
    assert!(!q1.created());
    // Both queues can send into the namespace.
    ns.ip_ok(&["addr", "add", "192.0.2.1/24", "dev", "tdev0"]);
    q0.send(&arp_request(0)).unwrap();
    q1.send(&arp_request(0)).unwrap();

    drop(q0);
    thread::sleep(Duration::from_millis(50));
    assert!(
        ns.link_exists("tdev0"),
        "device vanished while a queue was open"
    );
    let q2 = q1.open_queue().unwrap();
    drop(q1);
    drop(q2);
    assert!(
        eventually(|| !ns.link_exists("tdev0")),
        "tdev0 survived its last queue"
    );
}

#[test]
fn open_queue_needs_multi_queue() {
    if !require_root("open_queue_needs_multi_queue") {
        return;
    }
    let ns = Netns::new();
    let tap = Tap::open("tdev0", Some(&ns.path()), 1400, TapOptions::default()).unwrap();
    let err = tap.open_queue().unwrap_err();
    assert!(
        matches!(err, tapnat::device::TapError::NotMultiQueue { .. }),
        "{err:?}"
    );
}

#[test]
fn bad_mtu_is_set_mtu_error() {
    if !require_root("bad_mtu_is_set_mtu_error") {
        return;
    }
    let ns = Netns::new();
    // 67 is below the IPv4 minimum of 68 (RFC 791); the kernel refuses it for Ethernet.
    let err = Tap::open("tdev0", Some(&ns.path()), 67, TapOptions::default()).unwrap_err();
    assert!(
        matches!(err, tapnat::device::TapError::SetMtu { mtu: 67, .. }),
        "{err:?}"
    );
    // The fd was dropped with the error, so the device is gone again.
    assert!(eventually(|| !ns.link_exists("tdev0")));
}

fn own_netns() -> PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").unwrap()
}

#[test]
fn run_in_netns_binds_where_the_address_exists() {
    if !require_root("run_in_netns_binds_where_the_address_exists") {
        return;
    }
    let ns = Netns::new();
    ns.ip_ok(&["link", "set", "lo", "up"]);
    ns.ip_ok(&["addr", "add", "192.0.2.77/32", "dev", "lo"]);
    let addr: SocketAddr = (Ipv4Addr::new(192, 0, 2, 77), 0).into();

    // 192.0.2.0/24 is TEST-NET-1 (RFC 5737): it exists only inside our namespace.
    let err = TcpListener::bind(addr).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrNotAvailable, "{err:?}");

    let before = own_netns();
    let listener = run_in_netns(&ns.path(), move || TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    assert_eq!(own_netns(), before, "the calling thread changed namespace");
    let bound = listener.local_addr().unwrap();

    // A socket created in the namespace reaches it; the listener is used from here.
    let client = run_in_netns(&ns.path(), move || TcpStream::connect(bound))
        .unwrap()
        .unwrap();
    let (_conn, peer) = listener.accept().unwrap();
    assert_eq!(peer, client.local_addr().unwrap());
}

#[test]
fn run_in_netns_resumes_panics() {
    if !require_root("run_in_netns_resumes_panics") {
        return;
    }
    let ns = Netns::new();
    let path = ns.path();
    let result = std::panic::catch_unwind(move || {
        let _ = run_in_netns(&path, || panic!("boom"));
    });
    assert!(result.is_err());
}

#[test]
fn waker_ends_wait_from_another_thread() {
    let waker = Arc::new(Waker::new().unwrap());
    let mut poller = Poller::new();
    let slot = poller.add(waker.as_raw_fd());

    let remote = Arc::clone(&waker);
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        remote.wake();
    });
    let start = Instant::now();
    let n = poller.wait(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(n, 1);
    assert!(poller.readable(slot));
    assert!(start.elapsed() < Duration::from_secs(5));
    t.join().unwrap();

    waker.drain();
    let start = Instant::now();
    assert_eq!(poller.wait(Some(Duration::from_millis(50))).unwrap(), 0);
    assert!(!poller.readable(slot));
    assert!(start.elapsed() >= Duration::from_millis(50));
}
