//! Flow table benches: create, in2out/out2in lookup hits at 10k and 1M live
//! flows (one at a time, and a warmed burst of 32 at a time), the expiry sweep, and the candidate hashers for tables keyed by
//! outsider-chosen data (hashbrown's default foldhash, foldhash keyed from
//! OS randomness as [`tapnat::nat::hash::Keyed`], std's SipHash-1-3).
//!
//! Run: `cargo bench --bench nat -- --warm-up-time 1 --measurement-time 3`.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use tapnat::nat::{Filtering, FlowTable, InKey, OutKey, Proto, TableConfig, Timeouts};

const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const TIMEOUTS: Timeouts = Timeouts {
    tcp_established_ms: 7_440_000,
    tcp_transitory_ms: 240_000,
    udp_ms: 300_000,
    icmp_ms: 60_000,
};
/// Lookups per criterion iteration (amortises the loop and the key fetch).
const BATCH: usize = 1024;
/// Lookups per warmed burst (a worker's read takes up to 32 frames).
const BURST: usize = 32;

fn config(max_flows: usize) -> TableConfig {
    TableConfig {
        worker: 0,
        workers: 1,
        port_first: 1024,
        port_last: 65535,
        max_flows,
        max_flows_per_pod: 0,
        ports_per_pod: 0,
        timeouts: TIMEOUTS,
        seed: 1,
        filtering: Filtering::EndpointIndependent,
        port_reuse_delay_ms: 0,
    }
}

/// Key number `i`: 8192 inside endpoints (EIM caps a table at one outside
/// port per endpoint), each talking to `i / 8192`-th remote.
fn key(i: u32) -> InKey {
    let ep = i % 8192;
    let dst = i / 8192;
    InKey {
        proto: Proto::Tcp,
        src: Ipv4Addr::from(0x0a00_0000 | (ep >> 8)),
        sport: 20_000 + (ep & 0xff) as u16,
        dst: Ipv4Addr::from(0xcb00_0000 | dst),
        dport: 443,
    }
}

/// A table holding `n` live flows plus their in/out keys in a shuffled order.
fn filled(n: u32) -> (FlowTable, Vec<InKey>, Vec<OutKey>) {
    let mut t = FlowTable::new(config(n as usize + 1_000_000));
    let mut ins = Vec::with_capacity(n as usize);
    for i in 0..n {
        let k = key(i);
        t.create(&k, EXT, 0).expect("create");
        ins.push(k);
    }
    // Deterministic shuffle so lookups hit random slots and buckets.
    let mut s = 0x1234_5678_9abc_def0u64;
    for i in (1..ins.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ins.swap(i, (s % (i as u64 + 1)) as usize);
    }
    let outs = ins
        .iter()
        .map(|k| {
            let id = t.lookup_in2out(k, 0).unwrap();
            t.get(id).out_key()
        })
        .collect();
    (t, ins, outs)
}

fn sizes() -> [(u32, &'static str); 2] {
    [(10_000, "10k"), (1_000_000, "1M")]
}

/// A group timing `BATCH` lookups of `keys` (in order, wrapping round), a
/// burst of `BURST` per call of `run`.
fn burst_group<K>(
    c: &mut Criterion,
    name: &str,
    label: &str,
    t: &mut FlowTable,
    keys: &[K],
    mut run: impl FnMut(&mut FlowTable, &[K]),
) {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut pos = 0usize;
    g.bench_function(BenchmarkId::from_parameter(label), |b| {
        b.iter(|| {
            let mut done = 0;
            while done < BATCH {
                let burst = &keys[pos..(pos + BURST).min(keys.len())];
                run(t, burst);
                done += burst.len();
                pos = (pos + burst.len()) % keys.len();
            }
        })
    });
    g.finish();
}

fn bench_table(c: &mut Criterion) {
    for (n, label) in sizes() {
        let setup = Instant::now();
        let (mut t, ins, outs) = filled(n);
        eprintln!("setup {label}: {:?}", setup.elapsed());

        let mut g = c.benchmark_group("nat_lookup_in2out");
        g.throughput(Throughput::Elements(BATCH as u64));
        let mut pos = 0usize;
        g.bench_with_input(BenchmarkId::from_parameter(label), &n, |b, _| {
            b.iter(|| {
                for _ in 0..BATCH {
                    black_box(t.lookup_in2out(&ins[pos], 1));
                    pos += 1;
                    if pos == ins.len() {
                        pos = 0;
                    }
                }
            })
        });
        g.finish();

        let mut g = c.benchmark_group("nat_lookup_out2in");
        g.throughput(Throughput::Elements(BATCH as u64));
        let mut pos = 0usize;
        g.bench_with_input(BenchmarkId::from_parameter(label), &n, |b, _| {
            b.iter(|| {
                for _ in 0..BATCH {
                    black_box(t.lookup_out2in(&outs[pos], 1));
                    pos += 1;
                    if pos == outs.len() {
                        pos = 0;
                    }
                }
            })
        });
        g.finish();

        // The same lookups a burst of 32 at a time, each burst warmed first
        // (`FlowTable::warm_*`: buckets, then slots, prefetched), as a
        // worker does with the frames of one read.
        burst_group(
            c,
            "nat_lookup_in2out_burst",
            label,
            &mut t,
            &ins,
            |t, keys| {
                t.warm_in2out(keys);
                for k in keys {
                    black_box(t.lookup_in2out(k, 1));
                }
            },
        );
        burst_group(
            c,
            "nat_lookup_out2in_burst",
            label,
            &mut t,
            &outs,
            |t, keys| {
                t.warm_out2in(keys);
                for k in keys {
                    black_box(t.lookup_out2in(k, 1));
                }
            },
        );

        // Create: new inside endpoints (so each allocates an outside port),
        // timed in chunks, then removed untimed to keep the table at `n`.
        let fresh: Vec<InKey> = (0..BATCH as u32)
            .map(|i| InKey {
                proto: Proto::Udp,
                src: Ipv4Addr::from(0x0a80_0000 | i),
                sport: 30_000 + i as u16,
                dst: Ipv4Addr::new(192, 0, 2, 1),
                dport: 53,
            })
            .collect();
        let mut ids = Vec::with_capacity(BATCH);
        let mut g = c.benchmark_group("nat_create");
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::from_parameter(label), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let chunk = left.min(BATCH as u64) as usize;
                    let start = Instant::now();
                    for k in &fresh[..chunk] {
                        ids.push(t.create(k, EXT, 1).unwrap());
                    }
                    total += start.elapsed();
                    for id in ids.drain(..) {
                        t.remove(id);
                    }
                    left -= chunk as u64;
                }
                total
            })
        });
        g.finish();
        drop(t);
    }

    // Sweep cost per slot examined: nothing expired (the steady state) and
    // everything expired (removal cost), on a 10k-flow table.
    let n = 10_000u32;
    let (mut t, _, _) = filled(n);
    let mut g = c.benchmark_group("nat_expire");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(BenchmarkId::new("none_expired", "10k"), |b| {
        b.iter(|| black_box(t.expire(1, BATCH)))
    });
    g.throughput(Throughput::Elements(u64::from(n)));
    g.bench_function(BenchmarkId::new("all_expired", "10k"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut t = FlowTable::new(config(n as usize));
                for i in 0..n {
                    t.create(&key(i), EXT, 0).unwrap();
                }
                let start = Instant::now();
                black_box(t.expire(u64::MAX, usize::MAX));
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();
}

/// One flow-index hash (a packed 104-bit inside key, as the slab hashes
/// it) with each candidate state.
fn bench_hashers(c: &mut Criterion) {
    use std::hash::BuildHasher;
    let keys: Vec<u128> = (0..BATCH as u32)
        .map(|i| {
            let k = key(i.wrapping_mul(2_654_435_761) % 1_000_000);
            u128::from(k.proto as u8) << 96
                | u128::from(u32::from(k.src)) << 64
                | u128::from(k.sport) << 48
                | u128::from(u32::from(k.dst)) << 16
                | u128::from(k.dport)
        })
        .collect();
    fn run<S: BuildHasher>(
        g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        name: &str,
        s: S,
        keys: &[u128],
    ) {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut acc = 0u64;
                for k in keys {
                    acc ^= s.hash_one(black_box(k));
                }
                black_box(acc)
            })
        });
    }
    let mut g = c.benchmark_group("hash_key");
    g.throughput(Throughput::Elements(BATCH as u64));
    run(
        &mut g,
        "foldhash_default",
        hashbrown::DefaultHashBuilder::default(),
        &keys,
    );
    run(
        &mut g,
        "foldhash_keyed",
        tapnat::nat::hash::Keyed::new(),
        &keys,
    );
    run(
        &mut g,
        "siphash13_std",
        std::collections::hash_map::RandomState::new(),
        &keys,
    );
    g.finish();
}

/// Create for many flows of one pod (distinct source ports), the common
/// case; `nat_create` gives every flow a pod of its own (the worst case
/// for the per-pod accounting).
fn bench_create_one_pod(c: &mut Criterion) {
    let (mut t, _, _) = filled(10_000);
    let fresh: Vec<InKey> = (0..BATCH as u32)
        .map(|i| InKey {
            proto: Proto::Udp,
            src: Ipv4Addr::new(10, 200, 0, 1),
            sport: 30_000 + i as u16,
            dst: Ipv4Addr::new(192, 0, 2, 1),
            dport: 53,
        })
        .collect();
    let mut ids = Vec::with_capacity(BATCH);
    let mut g = c.benchmark_group("nat_create_one_pod");
    g.throughput(Throughput::Elements(1));
    g.bench_function("10k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let chunk = left.min(BATCH as u64) as usize;
                let start = Instant::now();
                for k in &fresh[..chunk] {
                    ids.push(t.create(k, EXT, 1).unwrap());
                }
                total += start.elapsed();
                for id in ids.drain(..) {
                    t.remove(id);
                }
                left -= chunk as u64;
            }
            total
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench_table, bench_hashers, bench_create_one_pod
}
criterion_main!(benches);
