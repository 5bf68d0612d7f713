//! The per-packet hot path without I/O: classification, checksum updates,
//! in-place translation per protocol and frame size, and the whole step a
//! worker takes for a packet of an established flow: the real translation
//! core ([`Core::frame`], the function the worker calls), from the received
//! frame to the `Send` action with the MACs set.
//!
//! Run: `cargo bench --bench datapath -- --warm-up-time 1 --measurement-time 3`.
use std::hint::black_box;
use std::net::Ipv4Addr;

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smoltcp::wire::EthernetAddress;
use tapnat::config::MasqueradeRule;
use tapnat::gateway::stats::{Counters, Snapshot};
use tapnat::gateway::{Action, Addressing, Core, CoreParts, Pool, Side};
use tapnat::nat::{Filtering, FlowTable, InKey, Proto, TableConfig, Timeouts};
use tapnat::net::Ipv4Net;
use tapnat::policy::mac_for;
use tapnat::wire::build::{self, Endpoints};
use tapnat::wire::{self, csum, Classified, End, L4Csum};

const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const GW_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 0xfe]);

/// Pods 10.244.0.0/16 masquerading behind EXT, as the default config has it.
fn addressing() -> Addressing {
    let net = |addr, prefix_len| Ipv4Net { addr, prefix_len };
    Addressing {
        pod_mac: mac_for(Ipv4Addr::new(10, 244, 0, 1), 0),
        pod_net: net(Ipv4Addr::new(10, 244, 0, 1), 16),
        pod_mtu: 1500,
        uplink_mac: mac_for(EXT, 1),
        uplink_net: net(EXT, 24),
        uplink_gateway: GW,
        uplink_mtu: 1500,
        dhcp: false,
        masquerade: vec![MasqueradeRule {
            source: net(Ipv4Addr::new(10, 244, 0, 0), 16),
            exclude: vec![net(Ipv4Addr::new(10, 244, 0, 0), 16)],
        }],
        snat: Vec::new(),
        forward_targets: Default::default(),
    }
}

/// A one-worker table with the default timeouts.
fn table(max_flows: usize, filtering: Filtering) -> FlowTable {
    FlowTable::new(TableConfig {
        worker: 0,
        workers: 1,
        port_first: 1024,
        port_last: 65535,
        max_flows,
        max_flows_per_pod: 0,
        ports_per_pod: 0,
        timeouts: Timeouts {
            tcp_established_ms: 7_440_000,
            tcp_transitory_ms: 240_000,
            udp_ms: 300_000,
            icmp_ms: 60_000,
        },
        seed: 7,
        filtering,
        port_reuse_delay_ms: 0,
    })
}

fn frame(proto: &str, size: usize) -> Vec<u8> {
    let ep = Endpoints::new(POD, REMOTE);
    let payload = vec![0x5a; size.saturating_sub(14 + 20 + 20)];
    match proto {
        "tcp" => build::tcp(&ep, 40000, 443, wire::TCP_ACK, &payload),
        "udp" => build::udp(&ep, 40000, 53, &payload, true),
        _ => build::icmp_echo(&ep, true, 40000, 1, &payload),
    }
}

fn view(f: &[u8]) -> wire::Ipv4View {
    match wire::classify(f) {
        Ok(Classified::Ipv4(v)) => v,
        _ => unreachable!(),
    }
}

fn checksums(c: &mut Criterion) {
    let mut g = c.benchmark_group("csum");
    g.throughput(Throughput::Elements(1));
    g.bench_function("update32+update16", |b| {
        b.iter(|| {
            let c = csum::update32(
                black_box(0x1234),
                black_box([10, 244, 0, 2]),
                black_box([203, 0, 113, 10]),
            );
            csum::update16(c, black_box(40000), black_box(61000))
        })
    });
    for size in [64usize, 1500] {
        let data = vec![0xa5u8; size];
        g.bench_with_input(BenchmarkId::new("full", size), &data, |b, d| {
            b.iter(|| csum::checksum(black_box(d)))
        });
    }
    g.finish();
}

fn classify(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    g.throughput(Throughput::Elements(1));
    for proto in ["tcp", "udp", "icmp"] {
        let f = frame(proto, 64);
        g.bench_with_input(BenchmarkId::new(proto, 64), &f, |b, f| {
            b.iter(|| wire::classify(black_box(f)))
        });
    }
    g.finish();
}

fn translate(c: &mut Criterion) {
    let mut g = c.benchmark_group("translate");
    g.throughput(Throughput::Elements(1));
    for proto in ["tcp", "udp", "icmp"] {
        for size in [64usize, 1500] {
            let mut f = frame(proto, size);
            let v = view(&f);
            // Alternate between two rewrites so the TTL and checksums keep changing
            // without running out (restore_ttl undoes the decrement).
            g.bench_function(BenchmarkId::new(proto, size), |b| {
                b.iter(|| {
                    wire::translate(black_box(&mut f), &v, End::Src, EXT, 61000, L4Csum::Full);
                    wire::restore_ttl(&mut f);
                })
            });
        }
    }
    g.finish();
}

/// The worker's whole decision for a packet of a live flow, in a table of
/// `n` flows: [`Core::frame`] (classify, policy, TTL/MTU checks, lookup,
/// account, translate, next-hop MAC), the per-packet cost a worker adds to
/// the I/O.
fn packet(c: &mut Criterion) {
    packet_group(c, "in2out_packet", &[10_000, 1_000_000], false);
}

/// [`packet`] while another thread sums the counters 1000 times a second
/// (a metrics scrape reads the same per-worker counters, far less often).
fn packet_scraped(c: &mut Criterion) {
    packet_group(c, "in2out_packet_scraped", &[10_000], true);
}

/// A one-worker [`Core`] whose table holds `n` UDP flows (4096 inside
/// endpoints, each to many remotes: flow `i` is [`flow_frame`]`(i)`), with
/// the uplink gateway's MAC known.
fn loaded_core(n: u32, pool: &Pool, counters: &Arc<Counters>) -> (Core, Arc<Addressing>) {
    let mut t = table(n as usize + 10, Filtering::AddressAndPort);
    for i in 0..n {
        let k = InKey {
            proto: Proto::Udp,
            src: flow_src(i),
            sport: 40000,
            dst: flow_dst(i),
            dport: 53,
        };
        t.create(&k, EXT, 0).unwrap();
    }
    let a = Arc::new(addressing());
    let mut core = Core::new(CoreParts {
        worker: 0,
        workers: 1,
        addressing: a.clone(),
        table: t,
        frags: None,
        icmp_limit: None,
        pool: pool.clone(),
        counters: counters.clone(),
    });
    core.neighbour(GW, tapnat::gateway::neighbour::News::Reachable(GW_MAC));
    (core, a)
}

/// Inside address of flow `i`: 10.244.0.2 on (not the network's own
/// address nor the gateway's).
fn flow_src(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0af4_0002 + (i % 4096))
}

fn flow_dst(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xc633_0000 | (i / 4096))
}

/// The 64-byte UDP frame a pod sends on flow `i` of [`loaded_core`].
fn flow_frame(a: &Addressing, i: u32) -> Vec<u8> {
    let mut ep = Endpoints::new(flow_src(i), flow_dst(i));
    ep.dst_mac = a.pod_mac;
    build::udp(&ep, 40000, 53, &[0u8; 18], true)
}

fn packet_group(c: &mut Criterion, name: &str, sizes: &[u32], scraped: bool) {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(1));
    for &n in sizes {
        let pool = Pool::new(8, 2048, 0);
        let counters = Arc::new(Counters::default());
        let (mut core, a) = loaded_core(n, &pool, &counters);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let scraper = scraped.then(|| {
            let (stop, counters) = (stop.clone(), counters.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    black_box(Snapshot::sum([&*counters]));
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
        });
        let orig = flow_frame(&a, 7);
        let mut spare = pool.frame(&orig);
        let mut out = Vec::new();
        g.bench_function(BenchmarkId::new("udp_64B_flows", n), |b| {
            b.iter(|| {
                let mut buf = spare.take().unwrap();
                // A fresh copy of the received frame (a 64-byte copy, as a read would).
                buf.frame_mut().copy_from_slice(&orig);
                core.frame(Side::Pod, black_box(buf), 1, &mut out);
                for action in out.drain(..) {
                    if let Action::Send { buf, .. } = action {
                        spare = Some(black_box(buf));
                    }
                }
            })
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = scraper {
            let _ = t.join();
        }
    }
    g.finish();
}

/// [`packet`] for a burst of 32 frames of random flows (what one read of a
/// busy queue brings), decided one by one as they come (`cold`) and after
/// [`Core::warm`] prefetched the burst's flows (`warmed`, what the worker
/// does): at 1 M flows nearly every flow is a cache miss.
fn packet_burst(c: &mut Criterion) {
    const BURST: usize = 32;
    let mut g = c.benchmark_group("in2out_packet_burst");
    g.throughput(Throughput::Elements(BURST as u64));
    for n in [10_000u32, 1_000_000] {
        let pool = Pool::new(2 * BURST, 2048, 0);
        let counters = Arc::new(Counters::default());
        let (mut core, a) = loaded_core(n, &pool, &counters);
        // 4096 frames of flows spread over the whole table, in random order.
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let frames: Vec<Vec<u8>> = (0..4096)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                flow_frame(&a, (s % u64::from(n)) as u32)
            })
            .collect();
        let mut bufs: Vec<_> = (0..BURST)
            .map(|_| pool.frame(&frames[0]).unwrap())
            .collect();
        let mut out = Vec::new();
        for warmed in [false, true] {
            let id = BenchmarkId::new(if warmed { "warmed" } else { "cold" }, n);
            let mut pos = 0;
            g.bench_function(id, |b| {
                b.iter(|| {
                    for buf in &mut bufs {
                        buf.frame_mut().copy_from_slice(&frames[pos]);
                        pos = (pos + 1) % frames.len();
                    }
                    if warmed {
                        core.warm(Side::Pod, bufs.iter().map(|b| b.frame()));
                    }
                    for buf in bufs.drain(..) {
                        core.frame(Side::Pod, black_box(buf), 1, &mut out);
                    }
                    for action in out.drain(..) {
                        if let Action::Send { buf, .. } = action {
                            bufs.push(black_box(buf));
                        }
                    }
                    assert_eq!(bufs.len(), BURST, "every frame sent");
                })
            });
        }
    }
    g.finish();
}

/// Resident memory of this process in bytes (VmRSS).
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .unwrap_or(0)
        * 1024
}

/// Not a timing: prints what one live flow costs in resident memory, with a
/// table sized for (and filled with) a million flows.
fn memory(_: &mut Criterion) {
    const N: u32 = 1_000_000;
    let before = rss();
    let mut t = table(N as usize, Filtering::Address);
    for i in 0..N {
        let k = InKey {
            proto: Proto::Tcp,
            src: Ipv4Addr::from(0x0af4_0000 | (i % 8192)),
            sport: 40000,
            dst: Ipv4Addr::from(0xc633_0000 | (i / 8192)),
            dport: 443,
        };
        t.create(&k, EXT, 0).unwrap();
    }
    let total = rss();
    let used = total.saturating_sub(before);
    eprintln!(
        "memory: {} live flows use {:.1} MiB resident: {} bytes per flow \
         (process: {:.1} MiB)",
        t.len(),
        used as f64 / (1 << 20) as f64,
        used / u64::from(N),
        total as f64 / (1 << 20) as f64
    );
    black_box(&t);
}

criterion_group!(
    benches,
    memory,
    checksums,
    classify,
    translate,
    packet,
    packet_scraped,
    packet_burst
);
criterion_main!(benches);
