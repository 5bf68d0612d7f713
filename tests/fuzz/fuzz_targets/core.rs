//! The whole translation core (`gateway::Core`), one or two workers, driven
//! by a sequence of frames from both sides, clock steps, ticks and neighbour
//! updates. Hand-offs and fragment news go to the other worker, as the
//! worker threads route them.
//!
//! Input, read front to back with `arbitrary::Unstructured` (missing bytes
//! read as zero; `gen_seeds` writes it): 8 setup bytes (workers, offload,
//! fragment handling, timeouts, quarantine, ICMP limit, filtering, MTUs,
//! `max_flows` 1..=32, port range, fragment-cache bounds), then up to 64
//! operations, each an opcode byte `% 6`:
//! 0 raw frame (side, fix checksums?, vnet header if offload, u16 length, bytes);
//! 1 template (side, src, dst, protocol, ports, flags, TTL, IP flags, fragment
//!   offset, id, payload length, gso_size, up to 3 byte patches): Ethernet +
//!   IPv4 + TCP/UDP/echo/ICMP error, addresses and ports from the lab's
//!   (0xf0..0xfe: the outside port of a live flow; 0xff: any, read next);
//! 2 answer the last frame sent to a side (same protocol with swapped ends,
//!   or an ICMP error about it); 3 clock step; 4 tick; 5 neighbour news
//!   (reachable, stale or gone).
//!
//! Invariants after every operation: no panic; every `Send` and `Resolve`
//! frame classifies as IPv4, its header checksum verifies, its source MAC is
//! ours (`Send`), it fits the egress MTU (a TSO or USO super-frame: its
//! gso_size does), and an unfragmented one's transport checksum verifies unless it is
//! partial (offloaded) or the input's did not; `Reject` carries the packet
//! untouched and builds a valid ICMP error; every `Drop`/`Reject` reason is
//! a drop counter; hand-offs and news go to another worker; no table holds
//! more than `max_flows`. Buffers are counted by allocation size: none is
//! ever freed (the core must return each to an action, its cache or the
//! pool); at the end the fragment caches hold at most their bound, and after
//! a tick past every timeout every buffer is back in the pool.
#![no_main]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use arbitrary::Unstructured;
use common::*;
use libfuzzer_sys::fuzz_target;
use smoltcp::wire::EthernetAddress;
use tapnat::config::{Forward, ForwardProtocol, MasqueradeRule};
use tapnat::gateway::neighbour::News;
use tapnat::gateway::stats::Counters;
use tapnat::gateway::{Action, Addressing, Buf, Core, CoreParts, Pool, Side};
use tapnat::nat::frag::{FragCache, FragCacheConfig};
use tapnat::nat::{Filtering, FlowTable, Proto, TableConfig, Timeouts};
use tapnat::net::{Ipv4Net, PortRange};
use tapnat::policy::{forwarded_ports, mac_for};
use tapnat::wire::build::{self, Endpoints};
use tapnat::wire::icmp::IcmpRateLimit;
use tapnat::wire::vnet::{VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_TCPV4, GSO_UDP_L4, VNET_HDR_LEN};
use tapnat::wire::{self as w, Classified, IcmpErrorKind, L4};

/// Counts live allocations of exactly `BUF_SIZE` bytes: the pool's buffers.
struct Counting;
static BUF_SIZE: AtomicUsize = AtomicUsize::new(usize::MAX);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static FREES: AtomicUsize = AtomicUsize::new(0);
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() == BUF_SIZE.load(Relaxed) {
            ALLOCS.fetch_add(1, Relaxed);
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() == BUF_SIZE.load(Relaxed) {
            ALLOCS.fetch_add(1, Relaxed);
        }
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if l.size() == BUF_SIZE.load(Relaxed) {
            FREES.fetch_add(1, Relaxed);
        }
        System.dealloc(p, l)
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

const KEEP: usize = 1024;
/// `CORE_TRACE=1` prints every action (to check what a seed reaches).
static TRACE: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("CORE_TRACE").is_some());
const IP: fn(u8, u8, u8, u8) -> Ipv4Addr = Ipv4Addr::new;
const EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const GW_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 0xfe]);
const POD_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);
const PORTS: [u16; 10] = [40000, 40001, 53, 80, 443, 8080, 1024, 0, 65535, 33434];
const ADDRS: [[u8; 4]; 18] = [
    [10, 244, 0, 2],
    [10, 244, 0, 3],
    [10, 244, 0, 9],  // the forward's target
    [10, 244, 0, 1],  // the gateway, pod side
    [10, 244, 0, 77], // a pod no one has resolved
    [198, 51, 100, 10],
    [198, 51, 100, 11],
    [192, 0, 2, 7],    // excluded: routed
    [203, 0, 113, 10], // the gateway, uplink side
    [203, 0, 113, 1],  // the uplink gateway
    [203, 0, 113, 77], // on the uplink, unresolved
    [203, 0, 113, 255],
    [10, 244, 255, 255],
    [0, 0, 0, 0],
    [255, 255, 255, 255],
    [224, 0, 0, 1],
    [127, 0, 0, 1],
    [198, 51, 100, 1],
];

fn net(addr: Ipv4Addr, prefix_len: u8) -> Ipv4Net {
    Ipv4Net { addr, prefix_len }
}

struct World {
    cores: Vec<Core>,
    a: Arc<Addressing>,
    pool: Pool,
    hdr: usize,
    size: usize,
    /// The fragment caches' bounds on held buffers, summed.
    held_max: usize,
    now: u64,
    /// The last frame sent to each side (pod, uplink).
    last: [Option<Vec<u8>>; 2],
}

fn other(s: Side) -> Side {
    if s == Side::Pod {
        Side::Uplink
    } else {
        Side::Pod
    }
}

fn ix(s: Side) -> usize {
    usize::from(s == Side::Uplink)
}

fn side(b: u8) -> Side {
    if b & 1 == 0 {
        Side::Pod
    } else {
        Side::Uplink
    }
}

fn byte(u: &mut Unstructured) -> u8 {
    u.arbitrary().unwrap_or(0)
}
fn word(u: &mut Unstructured) -> u16 {
    u16::from_be_bytes([byte(u), byte(u)])
}

impl World {
    fn new(u: &mut Unstructured) -> World {
        let s: [u8; 8] = std::array::from_fn(|_| byte(u));
        let n = 1 + usize::from(s[0] & 1);
        let hdr = if s[0] & 2 != 0 { VNET_HDR_LEN } else { 0 };
        let uplink_mtu = [1500, 1280, 576, 9000][usize::from(s[1] & 3)];
        let pod_mtu = [1500, 9000, 576][usize::from(s[1] >> 4) % 3];
        let forward = [Forward {
            protocol: ForwardProtocol::Tcp,
            ports: PortRange {
                first: 8080,
                last: 8080,
            },
            to_addr: IP(10, 244, 0, 9),
            to_port: 80,
        }];
        let a = Arc::new(Addressing {
            pod_mac: mac_for(IP(10, 244, 0, 1), 0),
            pod_net: net(IP(10, 244, 0, 1), 16),
            pod_mtu,
            uplink_mac: mac_for(EXT, 1),
            uplink_net: net(EXT, 24),
            uplink_gateway: GW,
            dhcp: false,
            uplink_mtu,
            masquerade: vec![MasqueradeRule {
                source: net(IP(10, 244, 0, 0), 16),
                exclude: vec![net(IP(10, 244, 0, 0), 16), net(IP(192, 0, 2, 0), 24)],
            }],
            snat: vec![],
            forward_targets: forwarded_ports(&forward)
                .map(|(p, ext, to, to_port)| ((p, to, to_port), ext))
                .collect(),
        });
        // The production layout, made odd so no other allocation has its size.
        let size = if hdr > 0 {
            hdr + ETH_HLEN + 65535 + 64
        } else {
            (pod_mtu.max(uplink_mtu) + 64).max(2048)
        } | 1;
        BUF_SIZE.store(size, Relaxed);
        ALLOCS.store(0, Relaxed);
        FREES.store(0, Relaxed);
        let pool = Pool::new(KEEP, size, hdr);
        let short = s[0] & 8 != 0;
        let held_max = if s[0] & 4 == 0 {
            n * (usize::from(s[5] % 8) + 1)
        } else {
            0
        };
        let ms = |long: u64, short_ms: u64| if short { short_ms } else { long };
        let cores = (0..n)
            .map(|k| {
                let mut table = FlowTable::new(TableConfig {
                    worker: k as u16,
                    workers: n as u16,
                    port_first: 1024,
                    port_last: if s[3] == 0 {
                        65535
                    } else {
                        1024 + u16::from(s[3])
                    },
                    max_flows: usize::from(s[2] % 32) + 1,
                    // 0 (no limit) to 7 flows and 0 to 3 ports per pod.
                    max_flows_per_pod: u32::from(s[2] >> 5),
                    ports_per_pod: u32::from(s[2] >> 6),
                    timeouts: Timeouts {
                        tcp_established_ms: ms(7_440_000, 10_000),
                        tcp_transitory_ms: ms(240_000, 4_000),
                        udp_ms: ms(300_000, 3_000),
                        icmp_ms: ms(60_000, 1_000),
                    },
                    seed: 1,
                    filtering: [
                        Filtering::AddressAndPort,
                        Filtering::Address,
                        Filtering::EndpointIndependent,
                    ][usize::from(s[0] >> 6) % 3],
                    port_reuse_delay_ms: if s[0] & 16 != 0 { 120_000 } else { 0 },
                });
                if 8080 % n == k {
                    table
                        .add_forward(Proto::Tcp, EXT, 8080, IP(10, 244, 0, 9), 80)
                        .unwrap();
                }
                let mut core = Core::new(CoreParts {
                    worker: k,
                    workers: n,
                    addressing: a.clone(),
                    table,
                    frags: (s[0] & 4 == 0).then(|| {
                        FragCache::new(FragCacheConfig {
                            max_datagrams: usize::from(s[4] % 8) + 1,
                            max_held_fragments: usize::from(s[5] % 8) + 1,
                            max_held_bytes: (usize::from(s[6]) + 1) * 256,
                            timeout_ms: 2000,
                        })
                    }),
                    icmp_limit: (s[0] & 32 == 0)
                        .then(|| IcmpRateLimit::new(1, u32::from(s[7] % 8) + 1)),
                    pool: pool.clone(),
                    counters: Arc::new(Counters::default()),
                });
                for ip in [GW, IP(10, 244, 0, 2), IP(10, 244, 0, 3), IP(10, 244, 0, 9)] {
                    let mac = if ip == GW { GW_MAC } else { POD_MAC };
                    core.neighbour(ip, News::Reachable(mac));
                }
                core
            })
            .collect();
        World {
            cores,
            a,
            pool,
            hdr,
            size,
            held_max,
            now: 1000,
            last: [None, None],
        }
    }

    fn addr(&self, u: &mut Unstructured) -> Ipv4Addr {
        match byte(u) {
            0xff => Ipv4Addr::from(u32::from_be_bytes(std::array::from_fn(|_| byte(u)))),
            b => ADDRS[usize::from(b) % ADDRS.len()].into(),
        }
    }

    fn port(&self, u: &mut Unstructured) -> u16 {
        match byte(u) {
            0xff => word(u),
            b @ 0xf0.. => {
                let flows: Vec<_> = self.cores.iter().flat_map(|c| c.flows()).collect();
                flows
                    .get(usize::from(b - 0xf0) % flows.len().max(1))
                    .map_or(0, |f| f.ext_port)
            }
            b => PORTS[usize::from(b) % PORTS.len()],
        }
    }

    /// The Ethernet endpoints of a frame received on `side`.
    fn ep(&self, side: Side, src: Ipv4Addr, dst: Ipv4Addr) -> Endpoints {
        let mut e = Endpoints::new(src, dst);
        e.src_mac = if side == Side::Pod { POD_MAC } else { GW_MAC };
        e.dst_mac = self.a.mac(side);
        e
    }

    /// Op 1: a frame built from fuzzed fields. Returns it and its vnet header.
    fn template(&self, side: Side, u: &mut Unstructured) -> (Vec<u8>, [u8; VNET_HDR_LEN]) {
        let (src, dst) = (self.addr(u), self.addr(u));
        let proto = byte(u) % 5;
        let (sport, dport) = (self.port(u), self.port(u));
        let (flags, ttl, ipf) = (byte(u), byte(u), byte(u));
        let (off, id, plen, gso) = (word(u) & 0x1fff, word(u), usize::from(word(u)), word(u));
        let mut ep = self.ep(side, src, dst);
        ep.ttl = ttl;
        let room = if self.hdr > 0 {
            65535 - 60
        } else {
            self.size - 80
        };
        let payload = vec![0x5a; plen.min(room)];
        let mut f = match proto {
            0 => build::tcp(&ep, sport, dport, flags, &payload),
            1 => build::udp(&ep, sport, dport, &payload, flags & 1 == 0),
            2 | 3 => build::icmp_echo(&ep, proto == 2, sport, dport, &payload),
            _ => {
                // An error from `src` about a packet `dst` sent it.
                let mut inner_ep = self.ep(other(side), dst, src);
                inner_ep.src_mac = self.a.mac(side);
                let inner = match flags % 3 {
                    0 => build::tcp(&inner_ep, dport, sport, w::TCP_SYN, &[]),
                    1 => build::udp(&inner_ep, dport, sport, &payload[..plen.min(64)], true),
                    _ => build::icmp_echo(&inner_ep, true, dport, 1, &[]),
                };
                error_about(&inner, src, ep.src_mac, flags >> 2, gso)
            }
        };
        let ip = &mut f[ETH_HLEN..];
        if ipf & 1 == 0 {
            ip[6] &= !0x40;
        }
        if proto < 4 {
            ip[4..6].copy_from_slice(&id.to_be_bytes());
            let fo = u16::from(ipf & 1) << 14 | u16::from(ipf & 2) << 12 | off;
            ip[6..8].copy_from_slice(&fo.to_be_bytes());
        }
        for _ in 0..byte(u) % 4 {
            let at = usize::from(word(u)) % f.len();
            f[at] = byte(u);
        }
        if ipf & 4 == 0 {
            fix_frame(&mut f, true);
        }
        let mut v = [0u8; VNET_HDR_LEN];
        if ipf & 8 != 0 && proto < 2 {
            // A TSO super-frame, or a UDP one (USO) with its datagram size.
            let tcp = proto == 0;
            let h = VnetHdr {
                flags: if ipf & 16 != 0 { F_NEEDS_CSUM } else { 0 },
                gso_type: if tcp { GSO_TCPV4 } else { GSO_UDP_L4 },
                hdr_len: if tcp { 54 } else { 42 },
                gso_size: gso,
                csum_start: 34,
                csum_offset: if tcp { 16 } else { 6 },
            };
            h.write(&mut v);
        }
        (f, v)
    }

    /// Op 2: an answer from the far end to the last frame sent to `to`.
    fn answer(&self, to: Side, u: &mut Unstructured) -> Option<Vec<u8>> {
        let (kind, flags) = (byte(u), byte(u));
        let last = self.last[ix(to)].as_ref()?;
        let Ok(Classified::Ipv4(v)) = w::classify(last) else {
            return None;
        };
        let mut ep = self.ep(to, v.dst, v.src);
        ep.src_mac = EthernetAddress(last[..6].try_into().unwrap());
        if kind & 3 == 3 {
            return Some(error_about(last, v.dst, ep.src_mac, kind >> 2, 576));
        }
        let bump = u16::from(kind & 3 == 2); // from another port: filtering
        Some(match v.l4 {
            L4::Tcp { sport, dport, .. } => {
                build::tcp(&ep, dport.wrapping_add(bump), sport, flags, &[])
            }
            L4::Udp { sport, dport } => {
                build::udp(&ep, dport.wrapping_add(bump), sport, b"answer", true)
            }
            L4::IcmpEcho { id, .. } => build::icmp_echo(&ep, kind & 4 != 0, id, 1, &[]),
            _ => return None,
        })
    }

    /// Feeds a frame to the worker that reads it (by the fuzzer's choice).
    fn feed(&mut self, side: Side, frame: &[u8], vnet: &[u8], k: usize) {
        let mut buf = self.pool.get();
        let space = buf.read_space();
        let n = (self.hdr + frame.len()).min(space.len());
        space[..self.hdr].copy_from_slice(&vnet[..self.hdr]);
        space[self.hdr..n].copy_from_slice(&frame[..n - self.hdr]);
        assert!(buf.set_wire_len(n));
        // Transport checksums are checked on the way out only if they were right on the way in.
        let mut copy = buf.frame().to_vec();
        let l4_in =
            ip_packet_mut(&mut copy).is_some_and(|ip| be16(ip, 6) & 0x3fff == 0 && l4_ok(ip));
        let k = k % self.cores.len();
        if *TRACE {
            let v = VnetHdr::parse(buf.vnet());
            eprintln!("feed {side:?} to {k}: {:?} {v:?}", w::classify(buf.frame()));
        }
        // The worker warms a burst before deciding it: any frame at all.
        self.cores[k].warm(side, std::iter::once(buf.frame()));
        let now = self.now;
        self.run(k, l4_in, |c, out| c.frame(side, buf, now, out));
    }

    /// Runs `f` on core `k` and carries out every action, following
    /// hand-offs and news to the other core.
    fn run(&mut self, k: usize, l4_in: bool, f: impl FnOnce(&mut Core, &mut Vec<Action>)) {
        let mut out = Vec::new();
        f(&mut self.cores[k], &mut out);
        let mut q: VecDeque<(usize, Action)> = out.drain(..).map(|a| (k, a)).collect();
        while let Some((k, act)) = q.pop_front() {
            if *TRACE {
                eprintln!("t={} worker {k}: {act:?}", self.now);
            }
            match act {
                Action::Send { side, buf } => {
                    self.check_out(side, &buf, l4_in, true);
                    self.last[ix(side)] = Some(buf.frame().to_vec());
                    self.pool.put(buf);
                }
                Action::Resolve {
                    side,
                    buf,
                    next_hop,
                } => {
                    // corpus/core/seed-regression-hairpin-later-fragment-to-own-address
                    let own = self.a.is_local(next_hop) || self.a.is_outside(next_hop);
                    self.check_out(side, &buf, l4_in, false);
                    assert!(!own, "next hop {next_hop} is the gateway's");
                    self.pool.put(buf);
                }
                Action::Reject {
                    to,
                    kind,
                    why,
                    view,
                    buf,
                } => {
                    assert!(why.is_drop(), "reject reason {why:?}");
                    let seen = w::classify(buf.frame());
                    assert_eq!(seen, Ok(Classified::Ipv4(view)), "rejected packet changed");
                    let mut e = [0u8; w::ICMP_ERROR_FRAME_MAX];
                    let (mac, ip) = (self.a.mac(to), self.a.ip(to));
                    let n = w::build_icmp_error(&mut e, buf.frame(), &view, mac, ip, kind);
                    let ip = ip_packet_mut(&mut e[..n]).expect("ICMP error frame");
                    assert!(ip_header_ok(ip) && l4_ok(ip), "ICMP error checksums");
                    self.pool.put(buf);
                }
                Action::Drop { why, buf } => {
                    assert!(why.is_drop(), "drop reason {why:?}");
                    self.pool.put(buf);
                }
                Action::Local { buf, .. } => self.pool.put(buf),
                Action::Neighbour(_) => {}
                Action::HandOff { worker, packet } => {
                    assert!(
                        worker != k && worker < self.cores.len(),
                        "hand-off to {worker}"
                    );
                    self.cores[worker].packet(packet, self.now, &mut out);
                    q.extend(out.drain(..).map(|a| (worker, a)));
                }
                Action::FragNews {
                    worker,
                    key,
                    rewrite,
                } => {
                    assert!(worker != k && worker < self.cores.len(), "news to {worker}");
                    self.cores[worker].first_fragment_seen(key, rewrite, self.now, &mut out);
                    q.extend(out.drain(..).map(|a| (worker, a)));
                }
            }
        }
        for c in &self.cores {
            assert!(
                c.table().len() <= c.table().config().max_flows,
                "table over max_flows"
            );
            let per_pod = c.table().config().max_flows_per_pod as usize;
            if per_pod > 0 {
                let mut flows = std::collections::HashMap::new();
                for f in c.table().iter() {
                    *flows.entry(f.inside.src).or_insert(0usize) += 1;
                }
                assert!(
                    flows.values().all(|&n| n <= per_pod),
                    "a pod over max_flows_per_pod: {flows:?}"
                );
            }
        }
        self.no_buffer_freed();
    }

    fn check_out(&self, side: Side, buf: &Buf, l4_in: bool, sent: bool) {
        let f = buf.frame();
        let Ok(Classified::Ipv4(v)) = w::classify(f) else {
            panic!("emitted frame does not classify: {:?}", w::classify(f));
        };
        let ip = &f[ETH_HLEN..ETH_HLEN + v.total_len];
        assert!(ip_header_ok(ip), "IPv4 header checksum");
        if sent {
            assert_eq!(&f[6..12], self.a.mac(side).as_bytes(), "source MAC");
        }
        let mtu = self.a.mtu(side);
        let hdr = VnetHdr::parse(buf.vnet()).unwrap_or_default();
        if hdr.is_gso() {
            let l4_hlen = match (v.l4, hdr.gso_type & !GSO_ECN) {
                (L4::Tcp { hlen, .. }, GSO_TCPV4) => usize::from(hlen),
                (L4::Udp { .. }, GSO_UDP_L4) => 8,
                // corpus/core/seed-regression-gso-header-on-later-fragment
                _ => panic!("GSO frame neither TCP nor UDP of its type: {v:?} {hdr:?}"),
            };
            let seg = usize::from(hdr.gso_size);
            assert!(
                seg > 0 && v.ihl + l4_hlen + seg <= mtu,
                "gso_size {seg} over MTU {mtu}"
            );
        } else {
            assert!(v.total_len <= mtu, "{} B over the MTU {mtu}", v.total_len);
            // What the device writes: padding after the IP packet included
            // (corpus/core/seed-regression-padding-past-uplink-mtu).
            assert!(
                f.len() <= ETH_HLEN + mtu,
                "{}-byte frame, MTU {mtu}",
                f.len()
            );
        }
        if l4_in && !v.is_fragment && !hdr.partial_csum_at(v.l4_offset()) {
            assert!(l4_ok_after_update(ip), "transport checksum of {v:?}");
        }
    }

    fn no_buffer_freed(&self) {
        if ALLOCS.load(Relaxed) <= KEEP {
            assert_eq!(FREES.load(Relaxed), 0, "the core freed a buffer");
        }
    }

    /// Takes `n` buffers from the pool and returns how many had to be made.
    fn drain_pool(&self, n: usize) -> usize {
        let before = ALLOCS.load(Relaxed);
        let bufs: Vec<Buf> = (0..n).map(|_| self.pool.get()).collect();
        let made = ALLOCS.load(Relaxed) - before;
        bufs.into_iter().for_each(|b| self.pool.put(b));
        made
    }

    /// End of input: the caches hold at most their bound, and once every
    /// timeout has passed every buffer is back in the pool.
    fn finish(&mut self) {
        let held_max = self.held_max;
        if ALLOCS.load(Relaxed) > KEEP / 2 {
            return;
        }
        let live = ALLOCS.load(Relaxed) - FREES.load(Relaxed);
        let held = self.drain_pool(live);
        assert!(held <= held_max, "{held} buffers held, bound {held_max}");
        if *TRACE {
            eprintln!("buffers: {live} made, {held} held in caches (bound {held_max})");
        }
        self.now += 86_400_000;
        for k in 0..self.cores.len() {
            let now = self.now;
            self.run(k, false, |c, out| c.tick(now, usize::MAX, out));
        }
        let live = ALLOCS.load(Relaxed) - FREES.load(Relaxed);
        assert_eq!(
            self.drain_pool(live),
            0,
            "buffers not returned after expiry"
        );
    }
}

/// An ICMP error from `from` about the packet in `frame`.
fn error_about(frame: &[u8], from: Ipv4Addr, mac: EthernetAddress, k: u8, mtu: u16) -> Vec<u8> {
    let Ok(Classified::Ipv4(v)) = w::classify(frame) else {
        return frame.to_vec();
    };
    let kind = match k % 3 {
        0 => IcmpErrorKind {
            icmp_type: w::ICMP_DEST_UNREACHABLE,
            code: 3,
            rest: 0,
        },
        1 => IcmpErrorKind::frag_needed(mtu),
        _ => IcmpErrorKind::TTL_EXCEEDED,
    };
    let mut e = [0u8; w::ICMP_ERROR_FRAME_MAX];
    let n = w::build_icmp_error(&mut e, frame, &v, mac, from, kind);
    e[..n].to_vec()
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut world = World::new(&mut u);
    for _ in 0..64 {
        if u.is_empty() {
            break;
        }
        match byte(&mut u) % 6 {
            0 => {
                let (s, fix) = (side(byte(&mut u)), byte(&mut u));
                let v: [u8; VNET_HDR_LEN] = std::array::from_fn(|_| byte(&mut u));
                let len = usize::from(word(&mut u));
                let mut f = u.bytes(len.min(u.len())).unwrap_or(&[]).to_vec();
                if fix & 1 != 0 {
                    fix_frame(&mut f, fix & 2 != 0);
                }
                world.feed(s, &f, &v, usize::from(fix >> 4));
            }
            1 => {
                let (b, s) = (byte(&mut u), side(byte(&mut u)));
                let (f, v) = world.template(s, &mut u);
                world.feed(s, &f, &v, usize::from(b));
            }
            2 => {
                let (b, to) = (byte(&mut u), side(byte(&mut u)));
                if let Some(f) = world.answer(to, &mut u) {
                    world.feed(to, &f, &[0; VNET_HDR_LEN], usize::from(b));
                }
            }
            3 => {
                let (ms, secs) = (u64::from(word(&mut u)), byte(&mut u) & 1 != 0);
                world.now += if secs { ms * 1000 } else { ms };
            }
            4 => {
                let (k, budget) = (usize::from(byte(&mut u)), usize::from(byte(&mut u)));
                let now = world.now;
                let k = k % world.cores.len();
                world.run(k, false, |c, out| c.tick(now, budget, out));
            }
            _ => {
                let ip = world.addr(&mut u);
                let b = byte(&mut u);
                let mac = EthernetAddress([2, 0, 0, 0, 1, b]);
                let news = match b % 3 {
                    0 => News::Reachable(mac),
                    1 => News::Stale(mac),
                    _ => News::Gone,
                };
                world.cores.iter_mut().for_each(|c| c.neighbour(ip, news));
            }
        }
    }
    world.finish();
});
