//! `tapnat bench`: tapnat measured end to end against kernel MASQUERADE, a
//! bare TAP-to-TAP copy loop (the ceiling), pasta and slirp4netns (at MTU
//! 1500 like tapnat, and at their own default 65520), in one run.
//!
//! Every setup has the same shape: kernel sockets in a pod namespace
//! (10.244.0.2/16, default route to the gateway) talk to a server
//! 198.51.100.10 in an external namespace behind the next hop 203.0.113.1.
//! The probes ([`probe`]) are the kernel's own TCP, UDP and ICMP, so no
//! iperf3 is needed. Each metric is measured `reps` times per setup and the
//! median is reported, with min and max; `--svg` draws the medians.
//!
//! Safety: everything runs in namespaces created here (removed on drop, also
//! on error), traffic only flows between them, and the root namespace's
//! routes, firewall and sysctls are never touched. Processes are stopped by
//! PID and waited for before their namespaces go.
use std::fmt::Write as _;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub mod chart;
pub mod probe;
pub mod setup;

use probe::{CpuSample, Dir};
use setup::{NotRun, Setup};

/// The setups a full run measures, in the order they run and are printed
/// (the `tapnat-wK` workers sweep is added for K below the core count).
pub const SETUPS: [&str; 10] = [
    "kernel",
    "tapnat",
    "tapnat-rw",
    "tapnat-raw",
    "tap-copy",
    "tap-copy-tso",
    "pasta",
    "pasta-65520",
    "slirp4netns",
    "slirp4netns-65520",
];

/// Largest worker count `tapnat-wK` accepts.
const MAX_SWEEP: usize = 64;

/// Every setup of a default run on a machine with `cores` cores: [`SETUPS`]
/// with `tapnat-w1` .. `tapnat-w{cores-1}` after `tapnat` (which runs one
/// worker per core).
pub fn default_setups(cores: usize) -> Vec<String> {
    let mut v: Vec<String> = SETUPS.iter().map(|s| s.to_string()).collect();
    let sweep = (1..cores.min(MAX_SWEEP + 1)).map(|k| format!("tapnat-w{k}"));
    v.splice(4..4, sweep);
    v
}

/// The worker count of a `tapnat-wK` setup name.
fn sweep_workers(name: &str) -> Option<usize> {
    let k: usize = name.strip_prefix("tapnat-w")?.parse().ok()?;
    (1..=MAX_SWEEP).contains(&k).then_some(k)
}

fn known_setup(name: &str) -> bool {
    SETUPS.contains(&name) || name == "baseline" || sweep_workers(name).is_some()
}

/// What `tapnat bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Measurements per metric and setup (the median is reported).
    pub reps: usize,
    /// Duration of each timed measurement.
    pub seconds: Duration,
    /// Setups to run, in order (default: [`default_setups`]).
    pub only: Vec<String>,
    /// Also write the results as JSON here.
    pub json: Option<PathBuf>,
    /// Also draw the medians as an SVG chart here.
    pub svg: Option<PathBuf>,
    /// Another tapnat binary, measured in the same run as setup `baseline`.
    pub baseline: Option<PathBuf>,
    /// Install missing pasta / slirp4netns with apt-get.
    pub install: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        BenchOptions {
            reps: 3,
            seconds: Duration::from_secs(3),
            only: default_setups(cores),
            json: None,
            svg: None,
            baseline: None,
            install: false,
        }
    }
}

/// The usage line for `tapnat --help`.
pub const USAGE: &str = "tapnat bench [--reps N] [--seconds S] [--only NAME[,NAME]] [--json FILE] \
                         [--svg FILE] [--baseline EXE] [--install]";

impl BenchOptions {
    /// Parses the arguments after `bench`.
    pub fn from_args(args: &[String]) -> Result<BenchOptions, String> {
        let mut o = BenchOptions::default();
        let mut only_given = false;
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--install" {
                o.install = true;
                continue;
            }
            let value = it
                .next()
                .ok_or_else(|| format!("{flag} needs a value (usage: {USAGE})"))?;
            let bad = |what: &str| format!("{flag} {value}: {what}");
            match flag.as_str() {
                "--reps" => {
                    o.reps = value.parse().map_err(|_| bad("not a count"))?;
                    if !(1..=100).contains(&o.reps) {
                        return Err(bad("reps must be 1 to 100"));
                    }
                }
                "--seconds" => {
                    let s: f64 = value.parse().map_err(|_| bad("not a number"))?;
                    if !(0.1..=60.0).contains(&s) {
                        return Err(bad("seconds must be 0.1 to 60"));
                    }
                    o.seconds = Duration::from_secs_f64(s);
                }
                "--only" => {
                    o.only = value.split(',').map(str::to_string).collect();
                    only_given = true;
                    if let Some(u) = o.only.iter().find(|n| !known_setup(n)) {
                        return Err(bad(&format!(
                            "unknown setup `{u}` (setups: {}, tapnat-wK, baseline)",
                            SETUPS.join(", ")
                        )));
                    }
                }
                "--json" => o.json = Some(PathBuf::from(value)),
                "--svg" => o.svg = Some(PathBuf::from(value)),
                "--baseline" => o.baseline = Some(PathBuf::from(value)),
                _ => return Err(format!("unknown bench flag {flag} (usage: {USAGE})")),
            }
        }
        let wants_baseline = o.only.iter().any(|n| n == "baseline");
        match (&o.baseline, wants_baseline) {
            (Some(_), false) if !only_given || o.only.iter().any(|n| n == "tapnat") => {
                // Right after tapnat, so the two run under the same conditions.
                let at = o
                    .only
                    .iter()
                    .position(|n| n == "tapnat")
                    .map_or(0, |i| i + 1);
                o.only.insert(at, "baseline".into());
            }
            (None, true) => return Err("setup `baseline` needs --baseline EXE".into()),
            _ => {}
        }
        Ok(o)
    }
}

/// The metrics, in table order: (key for JSON, column header, higher is better).
pub const METRICS: [(&str, &str, bool); 14] = [
    ("tcp_up_gbps", "TCP pod→ext Gbit/s", true),
    ("tcp_down_gbps", "TCP ext→pod Gbit/s", true),
    ("tcp4_up_gbps", "TCP 4× pod→ext Gbit/s", true),
    ("udp64_pps", "UDP 64 B delivered/s", true),
    ("udp64_loss_pct", "UDP loss %", false),
    ("udp_gso_gbps", "UDP GSO 1400 B pod→ext Gbit/s", true),
    ("tcp_connects_per_s", "TCP connects/s", true),
    ("ping_rtt_us", "ping RTT µs", false),
    ("ping_5ms_us", "ping every 5 ms µs", false),
    ("ping_200ms_us", "ping every 200 ms µs", false),
    ("rr_p50_us", "TCP 1 B req/resp p50 µs", false),
    ("rr_p99_us", "TCP 1 B req/resp p99 µs", false),
    ("gw_cpu_pct", "gateway CPU % of a core, TCP up", false),
    ("host_cpu_pct", "machine CPU %, TCP up", false),
];

/// The first table (throughput) has the metrics before this index; the
/// second (latency and CPU) the rest.
const FIRST_TABLE: usize = 7;

/// A metric that is not a speed: it gets no ratio.
fn no_ratio(key: &str) -> bool {
    matches!(key, "udp64_loss_pct" | "host_cpu_pct")
}

/// Index of a metric by key.
fn metric(key: &str) -> usize {
    METRICS
        .iter()
        .position(|m| m.0 == key)
        .expect("a metric of METRICS")
}

/// Echoes in each paced-ping measurement: (interval, count).
const PACED: [(&str, Duration, usize); 2] = [
    ("ping_5ms_us", Duration::from_millis(5), 50),
    ("ping_200ms_us", Duration::from_millis(200), 10),
];

/// One setup's samples: `samples[metric]` has one value per successful rep.
pub struct Outcome {
    pub name: String,
    pub note: String,
    pub samples: Vec<Vec<f64>>,
    pub errors: Vec<String>,
}

impl Outcome {
    /// The median of a metric, if it was measured.
    pub fn median(&self, i: usize) -> Option<f64> {
        stats(&self.samples[i]).map(|s| s.0)
    }
}

/// (median, min, max).
fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some((s[s.len() / 2], s[0], s[s.len() - 1]))
}

pub fn fmt_num(x: f64) -> String {
    if x.abs() >= 1000.0 {
        format!("{:.0}", x)
    } else if x.abs() >= 10.0 {
        format!("{:.1}", x)
    } else {
        format!("{:.2}", x)
    }
}

/// Runs every metric once on `setup`, appending to `samples`.
fn measure_once(s: &Setup, secs: Duration, samples: &mut [Vec<f64>], errors: &mut Vec<String>) {
    let e = s.ends();
    let mut notes = Vec::new();
    let mut put = |i: usize, r: io::Result<f64>| match r {
        Ok(v) => samples[i].push(v),
        Err(err) => errors.push(format!("{}: {err}", METRICS[i].0)),
    };
    let tcp = [(Dir::Up, 1), (Dir::Down, 1), (Dir::Up, 4)];
    for (i, (dir, streams)) in tcp.into_iter().enumerate() {
        let before = (i == 0).then(|| CpuSample::now(s.gateway_pid));
        let r = probe::tcp_streams(e, dir, streams, secs, 5201 + i as u16);
        if let Some(before) = before {
            let (gw, host) = before.until(&CpuSample::now(s.gateway_pid));
            if let Some(gw) = gw {
                put(metric("gw_cpu_pct"), Ok(gw));
            }
            if let Some(host) = host {
                put(metric("host_cpu_pct"), Ok(host));
            }
        }
        if let Ok(t) = &r {
            if t.late_fins > 0 {
                // Not an error, but worth knowing: the rate is counted to the last byte.
                notes.push(format!(
                    "{}: {} stream(s) without FIN 2 s after the sender finished",
                    METRICS[i].0, t.late_fins
                ));
            }
        }
        put(i, r.map(|t| t.gbps));
    }
    match probe::udp_flood(e, secs, 5204) {
        Ok(u) => {
            put(metric("udp64_pps"), Ok(u.delivered_per_s));
            put(metric("udp64_loss_pct"), Ok(u.loss_pct));
        }
        Err(err) => put(metric("udp64_pps"), Err(err)),
    }
    put(metric("udp_gso_gbps"), probe::udp_gso_bulk(e, secs, 5207));
    put(
        metric("tcp_connects_per_s"),
        probe::tcp_connects(e, secs, 5205),
    );
    put(metric("ping_rtt_us"), probe::ping_rtt_us(e));
    for (key, interval, count) in PACED {
        put(metric(key), probe::paced_ping_us(e, interval, count));
    }
    match probe::tcp_rr(e, secs, 5206) {
        Ok(l) => {
            put(metric("rr_p50_us"), Ok(l.p50_us));
            put(metric("rr_p99_us"), Ok(l.p99_us));
        }
        Err(err) => put(metric("rr_p50_us"), Err(err)),
    }
    errors.append(&mut notes);
}

fn build(name: &str, opts: &BenchOptions) -> Result<Setup, NotRun> {
    let this = || std::env::current_exe().map_err(NotRun::Failed);
    match name {
        "kernel" => setup::kernel(),
        "tapnat" => setup::tapnat(&this()?, 0),
        "tapnat-raw" => setup::tapnat_raw(&this()?, 0),
        // The same gateway with `workers.io_uring = false`: read/write per
        // frame, the lever's before.
        "tapnat-rw" => {
            setup::tapnat_with(&this()?, "[workers]\nthreads = 0\nio_uring = false\n", None)
        }
        "baseline" => match &opts.baseline {
            Some(exe) => setup::tapnat(exe, 0),
            None => Err(NotRun::Skipped("no --baseline EXE given".into())),
        },
        "tap-copy" => setup::tap_copy(false),
        "tap-copy-tso" => setup::tap_copy(true),
        "pasta" | "slirp4netns" => setup::userspace_stack(name, 1500, opts.install),
        "pasta-65520" | "slirp4netns-65520" => {
            setup::userspace_stack(name.trim_end_matches("-65520"), 65520, opts.install)
        }
        _ => match sweep_workers(name) {
            Some(k) => setup::tapnat(&this()?, k),
            None => Err(NotRun::Skipped(format!("unknown setup {name}"))),
        },
    }
}

/// `tapnat bench`: builds each selected setup in turn, measures it, tears it
/// down, then prints markdown tables (and writes JSON and SVG if asked).
pub fn run(opts: BenchOptions) -> io::Result<()> {
    if !crate::lab::is_root() {
        return Err(io::Error::other(
            "the benchmark creates network namespaces and TAP devices: run it as root",
        ));
    }
    let command: Vec<String> = std::env::args().collect();
    let command = command.join(" ");
    let started = Instant::now();
    println!("tapnat bench: {command}");
    println!(
        "{} rep(s) of {:.1} s per timed measurement; setups: {}",
        opts.reps,
        opts.seconds.as_secs_f64(),
        opts.only.join(", ")
    );
    let mut outcomes = Vec::new();
    let mut skipped = Vec::new();
    for name in &opts.only {
        println!("\n== {name}");
        let s = match build(name, &opts) {
            Ok(s) => s,
            Err(NotRun::Skipped(why)) => {
                println!("  skipped: {why}");
                skipped.push((name.to_string(), why));
                continue;
            }
            Err(NotRun::Failed(e)) => {
                println!("  failed to set up: {e}");
                skipped.push((name.to_string(), format!("setup failed: {e}")));
                continue;
            }
        };
        println!("  {}", s.note);
        if !probe::reachable(s.ends(), Duration::from_secs(10))? {
            println!("  the server is not reachable from the pod; skipping");
            skipped.push((name.to_string(), "server not reachable".into()));
            continue;
        }
        let mut samples = vec![Vec::new(); METRICS.len()];
        let mut errors = Vec::new();
        for rep in 0..opts.reps {
            measure_once(&s, opts.seconds, &mut samples, &mut errors);
            let last: Vec<String> = samples
                .iter()
                .map(|v| v.last().map_or("-".into(), |x| fmt_num(*x)))
                .collect();
            println!("  rep {}: {}", rep + 1, last.join(" | "));
        }
        for e in &errors {
            println!("  warning: {e}");
        }
        outcomes.push(Outcome {
            name: name.to_string(),
            note: s.note.clone(),
            samples,
            errors,
        });
        drop(s);
    }
    let table = table(&outcomes, &opts, &command);
    println!("\n{table}");
    for (name, why) in &skipped {
        println!("not run: {name}: {why}");
    }
    println!("total time {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = &opts.json {
        std::fs::write(path, json(&outcomes, &skipped, &opts, &command))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &opts.svg {
        std::fs::write(path, chart::svg(&outcomes, &opts, &command))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// One markdown table of the metrics `range`: medians, then tapnat's ratio
/// to every other setup.
fn medians_table(t: &mut String, outcomes: &[Outcome], range: std::ops::Range<usize>) {
    let header: Vec<&str> = METRICS[range.clone()].iter().map(|m| m.1).collect();
    let _ = writeln!(t, "| setup | {} |", header.join(" | "));
    let _ = writeln!(t, "|---|{}", "---:|".repeat(range.len()));
    for o in outcomes {
        let cells: Vec<String> = range
            .clone()
            .map(|i| o.median(i).map_or("–".into(), fmt_num))
            .collect();
        let _ = writeln!(t, "| {} | {} |", o.name, cells.join(" | "));
    }
    if let Some(us) = outcomes.iter().find(|o| o.name == "tapnat") {
        for o in outcomes.iter().filter(|o| o.name != "tapnat") {
            let cells: Vec<String> = range
                .clone()
                .map(|i| match (us.median(i), o.median(i)) {
                    _ if no_ratio(METRICS[i].0) => "–".into(),
                    (Some(a), Some(b)) if b != 0.0 => format!("{:.2}×", a / b),
                    _ => "–".into(),
                })
                .collect();
            let _ = writeln!(t, "| tapnat ÷ {} | {} |", o.name, cells.join(" | "));
        }
    }
}

/// The markdown report: medians, tapnat's ratio to each other setup, min–max.
fn table(outcomes: &[Outcome], opts: &BenchOptions, command: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "command: `{command}`");
    let _ = writeln!(
        t,
        "median of {} rep(s), {:.1} s per timed measurement\n",
        opts.reps,
        opts.seconds.as_secs_f64()
    );
    medians_table(&mut t, outcomes, 0..FIRST_TABLE);
    let _ = writeln!(t);
    medians_table(&mut t, outcomes, FIRST_TABLE..METRICS.len());
    let _ = writeln!(
        t,
        "\n(ratios: above 1 is better for tapnat in throughput, below 1 in latency and CPU)"
    );
    let _ = writeln!(t, "\nmin–max:\n");
    let header: Vec<&str> = METRICS.iter().map(|m| m.1).collect();
    let _ = writeln!(t, "| setup | {} |", header.join(" | "));
    let _ = writeln!(t, "|---|{}", "---:|".repeat(METRICS.len()));
    for o in outcomes {
        let cells: Vec<String> = (0..METRICS.len())
            .map(|i| {
                stats(&o.samples[i]).map_or("–".into(), |(_, lo, hi)| {
                    format!("{}–{}", fmt_num(lo), fmt_num(hi))
                })
            })
            .collect();
        let _ = writeln!(t, "| {} | {} |", o.name, cells.join(" | "));
    }
    let _ = writeln!(t, "\nsetups:");
    for o in outcomes {
        let _ = writeln!(t, "- {}: {}", o.name, o.note);
    }
    t
}

/// A number for JSON: NaN and infinities have no JSON form.
fn num(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn json(
    outcomes: &[Outcome],
    skipped: &[(String, String)],
    opts: &BenchOptions,
    command: &str,
) -> String {
    use serde_json::{json, Map, Value};
    let setups: Vec<Value> = outcomes
        .iter()
        .map(|o| {
            let metrics: Map<String, Value> = METRICS
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let (med, lo, hi) = stats(&o.samples[i])
                        .map_or((Value::Null, Value::Null, Value::Null), |(a, b, c)| {
                            (num(a), num(b), num(c))
                        });
                    let samples: Vec<Value> = o.samples[i].iter().map(|x| num(*x)).collect();
                    let v = json!({"median": med, "min": lo, "max": hi, "samples": samples});
                    (m.0.to_string(), v)
                })
                .collect();
            json!({"name": o.name, "note": o.note, "metrics": metrics, "errors": o.errors})
        })
        .collect();
    let not_run: Vec<Value> = skipped
        .iter()
        .map(|(n, w)| json!({"name": n, "reason": w}))
        .collect();
    let doc = json!({
        "command": command,
        "reps": opts.reps,
        "seconds": opts.seconds.as_secs_f64(),
        "setups": setups,
        "not_run": not_run,
    });
    let mut s = serde_json::to_string(&doc).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn parses_flags_and_rejects_bad_ones() {
        let o = BenchOptions::from_args(&args(
            "--reps 1 --seconds 0.5 --only kernel,tapnat,tapnat-w1 --json out.json --svg c.svg",
        ))
        .unwrap();
        assert_eq!(o.reps, 1);
        assert_eq!(o.seconds, Duration::from_millis(500));
        assert_eq!(o.only, ["kernel", "tapnat", "tapnat-w1"]);
        assert_eq!(o.json, Some(PathBuf::from("out.json")));
        assert_eq!(o.svg, Some(PathBuf::from("c.svg")));
        let d = BenchOptions::from_args(&[]).unwrap();
        assert_eq!((d.reps, d.seconds.as_secs()), (3, 3));
        assert!(d.only.len() >= SETUPS.len());
        for bad in [
            "--reps 0",
            "--reps",
            "--only nope",
            "--only tapnat-w0",
            "--only baseline",
            "--seconds 1000",
            "--x 1",
        ] {
            assert!(BenchOptions::from_args(&args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn baseline_runs_right_after_tapnat() {
        let o =
            BenchOptions::from_args(&args("--only kernel,tapnat --baseline /old/tapnat")).unwrap();
        assert_eq!(o.only, ["kernel", "tapnat", "baseline"]);
        let o = BenchOptions::from_args(&args("--baseline /old/tapnat")).unwrap();
        let at = o.only.iter().position(|n| n == "tapnat").unwrap();
        assert_eq!(o.only[at + 1], "baseline");
    }

    #[test]
    fn workers_sweep_below_the_core_count() {
        assert_eq!(default_setups(1).len(), SETUPS.len());
        let four = default_setups(4);
        assert_eq!(
            &four[1..7],
            [
                "tapnat",
                "tapnat-rw",
                "tapnat-raw",
                "tapnat-w1",
                "tapnat-w2",
                "tapnat-w3"
            ]
        );
        assert_eq!(sweep_workers("tapnat-w3"), Some(3));
        assert_eq!(sweep_workers("tapnat-wx"), None);
    }

    #[test]
    fn median_min_max() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(stats(&[]), None);
    }

    #[test]
    fn json_report_parses_back() {
        let mut samples = vec![Vec::new(); METRICS.len()];
        samples[0] = vec![1.0, 3.0, 2.0];
        samples[1] = vec![f64::NAN];
        let o = Outcome {
            name: "tapnat".into(),
            note: "a \"note\"".into(),
            samples,
            errors: vec!["x".into()],
        };
        let text = json(
            &[o],
            &[("pasta".into(), "missing".into())],
            &BenchOptions::default(),
            "c",
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["setups"][0]["metrics"]["tcp_up_gbps"]["median"], 2.0);
        assert!(v["setups"][0]["metrics"]["tcp_down_gbps"]["median"].is_null());
        assert_eq!(v["setups"][0]["note"], "a \"note\"");
        assert_eq!(v["not_run"][0]["name"], "pasta");
    }
}
