//! `tapnat bench`: tapnat measured end to end against kernel MASQUERADE, a
//! bare TAP-to-TAP copy loop (the ceiling), pasta and slirp4netns, in one run.
//!
//! Every setup has the same shape: kernel sockets in a pod namespace
//! (10.244.0.2/16, default route to the gateway) talk to a server
//! 198.51.100.10 in an external namespace behind the next hop 203.0.113.1.
//! The probes ([`probe`]) are the kernel's own TCP, UDP and ICMP, so no
//! iperf3 is needed. Each metric is measured `reps` times per setup and the
//! median is reported, with min and max.
//!
//! Safety: everything runs in namespaces created here (removed on drop, also
//! on error), traffic only flows between them, and the root namespace's
//! routes, firewall and sysctls are never touched. Processes are stopped by
//! PID and waited for before their namespaces go.
use std::fmt::Write as _;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub mod probe;
pub mod setup;

use probe::Dir;
use setup::{NotRun, Setup};

/// The setups, in the order they run and are printed.
pub const SETUPS: [&str; 6] = [
    "kernel",
    "tapnat",
    "tap-copy",
    "tap-copy-tso",
    "pasta",
    "slirp4netns",
];

/// What `tapnat bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Measurements per metric and setup (the median is reported).
    pub reps: usize,
    /// Duration of each timed measurement.
    pub seconds: Duration,
    /// Setups to run (default: all of [`SETUPS`]).
    pub only: Vec<String>,
    /// Also write the results as JSON here.
    pub json: Option<PathBuf>,
    /// Install missing pasta / slirp4netns with apt-get.
    pub install: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            reps: 3,
            seconds: Duration::from_secs(3),
            only: SETUPS.iter().map(|s| s.to_string()).collect(),
            json: None,
            install: false,
        }
    }
}

/// The usage line for `tapnat --help`.
pub const USAGE: &str =
    "tapnat bench [--reps N] [--seconds S] [--only NAME[,NAME]] [--json FILE] [--install]";

impl BenchOptions {
    /// Parses the arguments after `bench`.
    pub fn from_args(args: &[String]) -> Result<BenchOptions, String> {
        let mut o = BenchOptions::default();
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
                    if let Some(u) = o.only.iter().find(|n| !SETUPS.contains(&n.as_str())) {
                        return Err(bad(&format!(
                            "unknown setup `{u}` (setups: {})",
                            SETUPS.join(", ")
                        )));
                    }
                }
                "--json" => o.json = Some(PathBuf::from(value)),
                _ => return Err(format!("unknown bench flag {flag} (usage: {USAGE})")),
            }
        }
        Ok(o)
    }
}

/// The metrics, in table order: (key for JSON, column header, higher is better).
const METRICS: [(&str, &str, bool); 7] = [
    ("tcp_up_gbps", "TCP pod→ext Gbit/s", true),
    ("tcp_down_gbps", "TCP ext→pod Gbit/s", true),
    ("tcp4_up_gbps", "TCP 4× pod→ext Gbit/s", true),
    ("udp64_pps", "UDP 64 B delivered/s", true),
    ("udp64_loss_pct", "UDP loss %", false),
    ("ping_rtt_us", "ping RTT µs", false),
    ("tcp_connects_per_s", "TCP connects/s", true),
];

/// One setup's samples: `samples[metric]` has one value per successful rep.
struct Outcome {
    name: String,
    note: String,
    samples: Vec<Vec<f64>>,
    errors: Vec<String>,
}

fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some((s[s.len() / 2], s[0], s[s.len() - 1]))
}

fn fmt_num(x: f64) -> String {
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
        let r = probe::tcp_streams(e, dir, streams, secs, 5201 + i as u16);
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
            put(3, Ok(u.delivered_per_s));
            put(4, Ok(u.loss_pct));
        }
        Err(err) => put(3, Err(err)),
    }
    put(5, probe::ping_rtt_us(e));
    put(6, probe::tcp_connects(e, secs, 5205));
    errors.append(&mut notes);
}

fn build(name: &str, install: bool) -> Result<Setup, NotRun> {
    match name {
        "kernel" => setup::kernel(),
        "tapnat" => setup::tapnat(),
        "tap-copy" => setup::tap_copy(false),
        "tap-copy-tso" => setup::tap_copy(true),
        "pasta" | "slirp4netns" => setup::userspace_stack(name, install),
        _ => Err(NotRun::Skipped(format!("unknown setup {name}"))),
    }
}

/// `tapnat bench`: builds each selected setup in turn, measures it, tears it
/// down, then prints a markdown table (and writes JSON if asked).
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
    for name in SETUPS.iter().filter(|n| opts.only.iter().any(|o| o == *n)) {
        println!("\n== {name}");
        let s = match build(name, opts.install) {
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
    Ok(())
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
    let header: Vec<&str> = METRICS.iter().map(|m| m.1).collect();
    let _ = writeln!(t, "| setup | {} |", header.join(" | "));
    let _ = writeln!(t, "|---|{}", "---:|".repeat(METRICS.len()));
    let med = |o: &Outcome, i: usize| stats(&o.samples[i]).map(|s| s.0);
    for o in outcomes {
        let cells: Vec<String> = (0..METRICS.len())
            .map(|i| med(o, i).map_or("–".into(), fmt_num))
            .collect();
        let _ = writeln!(t, "| {} | {} |", o.name, cells.join(" | "));
    }
    if let Some(us) = outcomes.iter().find(|o| o.name == "tapnat") {
        for o in outcomes.iter().filter(|o| o.name != "tapnat") {
            let cells: Vec<String> = (0..METRICS.len())
                .map(|i| match (med(us, i), med(o, i), METRICS[i].0) {
                    (_, _, "udp64_loss_pct") => "–".into(),
                    (Some(a), Some(b), _) if b != 0.0 => format!("{:.2}×", a / b),
                    _ => "–".into(),
                })
                .collect();
            let _ = writeln!(t, "| tapnat ÷ {} | {} |", o.name, cells.join(" | "));
        }
        let _ = writeln!(
            t,
            "\n(ratios: above 1 is better for tapnat except RTT, where below 1 is better)"
        );
    }
    let _ = writeln!(t, "\nmin–max:\n");
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

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

fn json(
    outcomes: &[Outcome],
    skipped: &[(String, String)],
    opts: &BenchOptions,
    command: &str,
) -> String {
    let mut j = String::new();
    let _ = write!(
        j,
        "{{\"command\":{},\"reps\":{},\"seconds\":{},\"setups\":[",
        json_str(command),
        opts.reps,
        opts.seconds.as_secs_f64()
    );
    for (k, o) in outcomes.iter().enumerate() {
        let _ = write!(
            j,
            "{}{{\"name\":{},\"note\":{},\"metrics\":{{",
            if k > 0 { "," } else { "" },
            json_str(&o.name),
            json_str(&o.note)
        );
        for (i, m) in METRICS.iter().enumerate() {
            let samples: Vec<String> = o.samples[i].iter().map(|x| json_num(*x)).collect();
            let (med, lo, hi) = stats(&o.samples[i]).map_or(
                ("null".into(), "null".into(), "null".into()),
                |(a, b, c)| (json_num(a), json_num(b), json_num(c)),
            );
            let _ = write!(
                j,
                "{}{}:{{\"median\":{med},\"min\":{lo},\"max\":{hi},\"samples\":[{}]}}",
                if i > 0 { "," } else { "" },
                json_str(m.0),
                samples.join(",")
            );
        }
        let errors: Vec<String> = o.errors.iter().map(|e| json_str(e)).collect();
        let _ = write!(j, "}},\"errors\":[{}]}}", errors.join(","));
    }
    j.push_str("],\"not_run\":[");
    let nr: Vec<String> = skipped
        .iter()
        .map(|(n, w)| format!("{{\"name\":{},\"reason\":{}}}", json_str(n), json_str(w)))
        .collect();
    j.push_str(&nr.join(","));
    j.push_str("]}\n");
    j
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
            "--reps 1 --seconds 0.5 --only kernel,tapnat --json out.json",
        ))
        .unwrap();
        assert_eq!(o.reps, 1);
        assert_eq!(o.seconds, Duration::from_millis(500));
        assert_eq!(o.only, ["kernel", "tapnat"]);
        assert_eq!(o.json, Some(PathBuf::from("out.json")));
        let d = BenchOptions::from_args(&[]).unwrap();
        assert_eq!(
            (d.reps, d.seconds.as_secs(), d.only.len()),
            (3, 3, SETUPS.len())
        );
        for bad in [
            "--reps 0",
            "--reps",
            "--only nope",
            "--seconds 1000",
            "--x 1",
        ] {
            assert!(BenchOptions::from_args(&args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn median_min_max() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(stats(&[]), None);
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
