//! `tapnat soak`: a bounded long run with churning flows, reporting the
//! gateway's resident memory and live flows over time.
//!
//! The real binary runs between throwaway namespaces with short timeouts
//! (UDP and ICMP 5 s, TCP transitory 10 s), while the pod keeps opening and
//! closing TCP connections, sends UDP bursts from fresh ports and pings.
//! After the churn stops, sampling goes on for a drain period long enough
//! for every flow to expire, so the report shows whether memory and the
//! table come back down. Every loop is bounded by the run's duration and by
//! a count; everything created is removed on drop, also on error.
use std::io::{self, Read};
use std::net::{SocketAddrV4, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::bench::setup::{self, NotRun, Setup};
use super::{Pinger, SERVER_IP};
use crate::ops::socket::{self, Request, Response};

/// What `tapnat soak` was asked to do.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// How long the churn runs.
    pub duration: Duration,
    /// Time between samples.
    pub interval: Duration,
    /// TCP connections opened (and reset) per second, at most.
    pub connects_per_s: u32,
    /// UDP datagrams per burst, each from a fresh port (one new flow each).
    pub udp_burst: u32,
}

impl Default for SoakOptions {
    fn default() -> Self {
        SoakOptions {
            duration: Duration::from_secs(300),
            interval: Duration::from_secs(10),
            connects_per_s: 500,
            udp_burst: 50,
        }
    }
}

/// The usage line for `tapnat --help`.
pub const USAGE: &str =
    "tapnat soak [--minutes M] [--interval S] [--connects-per-s N] [--udp-burst N]";

/// Longest churn accepted, so a typo cannot start a day-long run.
const MAX_DURATION: Duration = Duration::from_secs(2 * 3600);
/// Sampling goes on this long after the churn, past the longest timeout.
const DRAIN: Duration = Duration::from_secs(30);
/// Between UDP bursts and between echoes.
const TICK: Duration = Duration::from_millis(100);

impl SoakOptions {
    /// Parses the arguments after `soak`.
    pub fn from_args(args: &[String]) -> Result<SoakOptions, String> {
        let mut o = SoakOptions::default();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| format!("{flag} needs a value (usage: {USAGE})"))?;
            let bad = |what: &str| format!("{flag} {value}: {what}");
            let number = || value.parse::<f64>().map_err(|_| bad("not a number"));
            match flag.as_str() {
                "--minutes" => {
                    let d = Duration::try_from_secs_f64(number()? * 60.0)
                        .map_err(|_| bad("not a duration"))?;
                    if d.is_zero() || d > MAX_DURATION {
                        return Err(bad("minutes must be above 0 and at most 120"));
                    }
                    o.duration = d;
                }
                "--interval" => {
                    let s = number()?;
                    if !(1.0..=600.0).contains(&s) {
                        return Err(bad("interval must be 1 to 600 seconds"));
                    }
                    o.interval = Duration::from_secs_f64(s);
                }
                "--connects-per-s" => {
                    o.connects_per_s = value.parse().map_err(|_| bad("not a count"))?;
                    if !(1..=10_000).contains(&o.connects_per_s) {
                        return Err(bad("connects per second must be 1 to 10000"));
                    }
                }
                "--udp-burst" => {
                    o.udp_burst = value.parse().map_err(|_| bad("not a count"))?;
                    if !(1..=1000).contains(&o.udp_burst) {
                        return Err(bad("udp burst must be 1 to 1000"));
                    }
                }
                _ => return Err(format!("unknown soak flag {flag} (usage: {USAGE})")),
            }
        }
        Ok(o)
    }
}

/// One sample: seconds since start, resident memory, live flows, flows
/// created so far.
#[derive(Debug, Clone, Copy)]
struct Sample {
    t: f64,
    rss_kib: u64,
    flows: usize,
    created: u64,
}

/// `VmRSS` of `pid`, in KiB.
fn rss_kib(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::other("no VmRSS"))
}

fn sample(pid: u32, control: &std::path::Path, start: Instant) -> io::Result<Sample> {
    let flows = match socket::ask(
        control,
        &Request::Flows {
            filter: Default::default(),
        },
    )? {
        Response::Flows(f) => f.len(),
        other => return Err(io::Error::other(format!("unexpected answer {other:?}"))),
    };
    let created = match socket::ask(control, &Request::Stats)? {
        Response::Stats(s) => s.counters.get("flows_created").copied().unwrap_or(0),
        other => return Err(io::Error::other(format!("unexpected answer {other:?}"))),
    };
    Ok(Sample {
        t: start.elapsed().as_secs_f64(),
        rss_kib: rss_kib(pid)?,
        flows,
        created,
    })
}

/// The churn: runs inside the pod namespace until `stop` or `until`.
fn churn(
    s: &Setup,
    o: &SoakOptions,
    stop: Arc<AtomicBool>,
    until: Instant,
    sent: Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<io::Result<()>>> {
    let mut threads = Vec::new();
    let tcp_to = SocketAddrV4::new(SERVER_IP, 7001);
    let udp_to = SocketAddrV4::new(SERVER_IP, 7002);
    let pace = Duration::from_secs_f64(1.0 / f64::from(o.connects_per_s));
    let burst = o.udp_burst;
    let max = (o.duration.as_secs_f64() * f64::from(o.connects_per_s)) as u64 + 1;
    let pod = s.pod.path();
    {
        let (stop, sent) = (stop.clone(), sent.clone());
        let pod = pod.clone();
        threads.push(std::thread::spawn(move || {
            crate::device::run_in_netns(&pod, move || -> io::Result<()> {
                // TCP: connect, then close with an RST (SO_LINGER 0): each a
                // flow that goes transitory and expires.
                for _ in 0..max {
                    if stop.load(Ordering::Relaxed) || Instant::now() >= until {
                        break;
                    }
                    let t = Instant::now();
                    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                    sock.set_linger(Some(Duration::ZERO))?;
                    if sock
                        .connect_timeout(&tcp_to.into(), Duration::from_secs(1))
                        .is_ok()
                    {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(sock);
                    if let Some(rest) = pace.checked_sub(t.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
                Ok(())
            })?
        }));
    }
    {
        let (stop, sent) = (stop.clone(), sent.clone());
        let pod = pod.clone();
        let ticks = o.duration.as_millis() as u64 / TICK.as_millis() as u64 + 1;
        threads.push(std::thread::spawn(move || {
            crate::device::run_in_netns(&pod, move || -> io::Result<()> {
                // UDP: bursts from fresh ports, each a new flow the server answers.
                for _ in 0..ticks {
                    if stop.load(Ordering::Relaxed) || Instant::now() >= until {
                        break;
                    }
                    for _ in 0..burst {
                        let u = UdpSocket::bind("0.0.0.0:0")?;
                        if u.send_to(b"soak", udp_to).is_ok() {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(TICK);
                }
                Ok(())
            })?
        }));
    }
    {
        let stop = stop.clone();
        let mut pinger = match Pinger::new(&s.pod) {
            Ok(p) => p,
            Err(e) => {
                threads.push(std::thread::spawn(move || Err(e)));
                return threads;
            }
        };
        let ticks = o.duration.as_millis() as u64 / TICK.as_millis() as u64 + 1;
        threads.push(std::thread::spawn(move || {
            for _ in 0..ticks {
                if stop.load(Ordering::Relaxed) || Instant::now() >= until {
                    break;
                }
                pinger.ping(SERVER_IP, 1, Duration::from_millis(500))?;
                std::thread::sleep(TICK);
            }
            Ok(())
        }));
    }
    threads
}

/// The servers in the external namespace: a TCP acceptor and a UDP echo,
/// both ending at `stop` (checked every 100 ms).
fn servers(s: &Setup, stop: Arc<AtomicBool>) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
    let (tcp, udp) = s.ext.run(|| -> io::Result<(TcpListener, UdpSocket)> {
        let l = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        l.set_reuse_address(true)?;
        l.bind(&SocketAddrV4::new(SERVER_IP, 7001).into())?;
        l.listen(1024)?;
        let u = UdpSocket::bind(SocketAddrV4::new(SERVER_IP, 7002))?;
        Ok((l.into(), u))
    })??;
    tcp.set_nonblocking(true)?;
    udp.set_read_timeout(Some(TICK))?;
    let stop2 = stop.clone();
    Ok(vec![
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.read(&mut [0u8; 16]);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }),
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        }),
    ])
}

/// `tapnat soak`: runs the churn, prints one line per sample and a summary.
pub fn run(o: SoakOptions) -> io::Result<()> {
    if !super::is_root() {
        return Err(io::Error::other(
            "the soak creates network namespaces: run it as root",
        ));
    }
    let control: PathBuf =
        std::env::temp_dir().join(format!("tapnat-soak-{}.sock", std::process::id()));
    let more = "[nat.timeouts]\nudp = \"5s\"\nicmp = \"5s\"\ntcp_transitory = \"10s\"\ntcp_established = \"60s\"\n";
    let exe = std::env::current_exe()?;
    let s = match setup::tapnat_with(&exe, more, Some(&control)) {
        Ok(s) => s,
        Err(NotRun::Failed(e)) => return Err(e),
        Err(NotRun::Skipped(why)) => return Err(io::Error::other(why)),
    };
    let pid = s
        .gateway_pid
        .ok_or_else(|| io::Error::other("no gateway process"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !control.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "tapnat soak: {:.0} s of churn, then {} s of drain; {}",
        o.duration.as_secs_f64(),
        DRAIN.as_secs(),
        s.note
    );
    println!(
        "churn: {} TCP connects/s (reset at once), {} UDP flows every {} ms, one ping every {} ms",
        o.connects_per_s,
        o.udp_burst,
        TICK.as_millis(),
        TICK.as_millis()
    );
    let start = Instant::now();
    let baseline = sample(pid, &control, start)?;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let server_threads = servers(&s, stop.clone())?;
    let until = start + o.duration;
    let churners = churn(&s, &o, stop.clone(), until, sent.clone());
    println!("\n| t s | phase | RSS MiB | live flows | flows created |");
    println!("|---:|---|---:|---:|---:|");
    let mut samples = vec![baseline];
    let print = |x: &Sample, phase: &str| {
        println!(
            "| {:.0} | {phase} | {:.1} | {} | {} |",
            x.t,
            x.rss_kib as f64 / 1024.0,
            x.flows,
            x.created
        )
    };
    print(&baseline, "start");
    let end = until + DRAIN;
    let mut next = start + o.interval;
    while next <= end {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let phase = if Instant::now() < until {
            "churn"
        } else {
            "drain"
        };
        let x = sample(pid, &control, start)?;
        print(&x, phase);
        samples.push(x);
        next += o.interval;
    }
    stop.store(true, Ordering::Relaxed);
    let mut churn_errors = Vec::new();
    for t in churners {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => churn_errors.push(e.to_string()),
            Err(_) => churn_errors.push("a churn thread panicked".into()),
        }
    }
    for t in server_threads {
        let _ = t.join();
    }
    let last = *samples.last().expect("the baseline at least");
    let peak_rss = samples.iter().map(|x| x.rss_kib).max().unwrap_or(0);
    let peak_flows = samples.iter().map(|x| x.flows).max().unwrap_or(0);
    println!(
        "\nsummary: RSS {:.1} MiB at start, {:.1} MiB at peak, {:.1} MiB at the end; \
         live flows peaked at {peak_flows}, {} at the end; {} flows created; {} connects and datagrams sent",
        baseline.rss_kib as f64 / 1024.0,
        peak_rss as f64 / 1024.0,
        last.rss_kib as f64 / 1024.0,
        last.flows,
        last.created,
        sent.load(Ordering::Relaxed)
    );
    for e in &churn_errors {
        println!("warning: churn: {e}");
    }
    drop(s);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn parses_and_bounds_its_flags() {
        let o = SoakOptions::from_args(&args(
            "--minutes 0.5 --interval 2 --connects-per-s 100 --udp-burst 10",
        ))
        .unwrap();
        assert_eq!(o.duration, Duration::from_secs(30));
        assert_eq!(o.interval, Duration::from_secs(2));
        assert_eq!((o.connects_per_s, o.udp_burst), (100, 10));
        for bad in [
            "--minutes 0",
            "--minutes 500",
            "--interval 0",
            "--connects-per-s 0",
            "--udp-burst x",
            "--nope 1",
            "--minutes",
        ] {
            assert!(SoakOptions::from_args(&args(bad)).is_err(), "{bad}");
        }
    }
}
