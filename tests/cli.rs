//! The command line: `tapnat run --config FILE` and `tapnat check`, as users'
//! scripts call them.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tapnat::lab::{Lab, Pinger, SERVER_IP};

mod common;
use common::{root, tapnat, TempConfig};

#[test]
fn check_accepts_the_default_and_rejects_bad_keys_by_name() {
    let out = tapnat()
        .arg("check")
        .env_remove("TAPNAT_POD__TAP")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (tag, text, key) in [
        (
            "cidr",
            "[pod]\naddress = \"10.244.0.1/33\"\n",
            "pod.address",
        ),
        ("unknown", "[pod]\ntapp = \"x\"\n", "pod.tapp"),
        (
            "duration",
            "[nat.timeouts]\nudp = \"5 parsecs\"\n",
            "nat.timeouts.udp",
        ),
    ] {
        let f = TempConfig::new(tag, text);
        let out = tapnat()
            .args(["check", "--config"])
            .arg(&f.0)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{tag}: {err}");
        assert!(err.contains(key), "{tag}: {err}");
    }
    let out = tapnat()
        .arg("check")
        .env("TAPNAT_NAT__PORTZ", "1-2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TAPNAT_NAT__PORTZ"));
}

#[test]
fn flows_without_a_running_gateway_says_so() {
    let out = tapnat()
        .args(["flows", "--control", "/nonexistent/tapnat.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("no tapnat answers on /nonexistent/tapnat.sock"));
}

#[test]
fn bad_config_touches_no_device() {
    if !root() {
        return;
    }
    let lab = Lab::new("cli-bad").unwrap();
    let text = format!(
        "[pod]\nnetns = \"{}\"\n[uplink]\nnetns = \"{}\"\ngateway = \"198.51.100.1\"\n",
        lab.pod.path().display(),
        lab.ext.path().display()
    );
    let f = TempConfig::new("bad-gw", &text);
    let out = tapnat()
        .args(["run", "--config"])
        .arg(&f.0)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("uplink.gateway"), "{err}");
    assert!(
        lab.pod.ip("link show tapnat0").is_err(),
        "a device was created"
    );
    assert!(
        lab.ext.ip("link show tapnat1").is_err(),
        "a device was created"
    );
}

#[test]
fn run_forwards_then_sigterm_exits_0_and_removes_devices() {
    if !root() {
        return;
    }
    let lab = Lab::new("cli-run").unwrap();
    let text = format!(
        "[pod]\nnetns = \"{}\"\n[uplink]\nnetns = \"{}\"\n[workers]\nthreads = 1\n",
        lab.pod.path().display(),
        lab.ext.path().display()
    );
    let f = TempConfig::new("run", &text);
    let control = std::env::temp_dir().join(format!("tapnat-cli-{}.sock", std::process::id()));
    // Stands in for systemd's notify socket.
    let notify_path =
        std::env::temp_dir().join(format!("tapnat-cli-{}.notify", std::process::id()));
    let _ = std::fs::remove_file(&notify_path);
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut child = tapnat()
        .args(["run", "--config"])
        .arg(&f.0)
        .arg("--control")
        .arg(&control)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let config = tapnat::config::Config::from_toml_str(&text).unwrap();
    // Both devices exist, inside their namespaces, within a second of start.
    let started = Instant::now();
    let appeared = lab
        .pod
        .wait_for_link("tapnat0", Duration::from_secs(1))
        .and_then(|_| lab.ext.wait_for_link("tapnat1", Duration::from_secs(1)));
    let up_in = started.elapsed();
    let mut ready = [0u8; 256];
    let ready = notify
        .recv(&mut ready)
        .map(|n| String::from_utf8_lossy(&ready[..n]).into_owned());
    let _ = std::fs::remove_file(&notify_path);
    let wired = appeared.and_then(|_| lab.wire_up(&config));
    let mut pinger = Pinger::new(&lab.pod).unwrap();
    let replies = wired.is_ok().then(|| {
        pinger
            .ping(SERVER_IP, 3, Duration::from_secs(2))
            .unwrap()
            .len()
    });
    // The control socket answers `tapnat stats` and `tapnat flows`.
    let ask = |args: &[&str]| {
        let out = tapnat()
            .args(args)
            .arg("--control")
            .arg(&control)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A client that connects and never sends keeps nobody else waiting.
    let stuck = std::os::unix::net::UnixStream::connect(&control);
    let (stats, flows) = (ask(&["stats"]), ask(&["flows"]));
    let stats_json = ask(&["stats", "-o", "json"]);
    let stats_prom = ask(&["stats", "-o", "prometheus"]);
    let flows_json = ask(&["flows", "-o", "json", "--src", "10.244.0.2"]);
    let counts = [
        ask(&["flows", "--count", "--proto", "icmp"]),
        ask(&["flows", "--proto", "udp", "--count"]),
    ];
    drop(stuck);
    // The socket is its owner's only, and a peer that gets past the file
    // mode is still refused by its credentials.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&control).map(|m| m.permissions().mode() & 0o777);
    let _ = std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666));
    let nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_tapnat"))
        .args(["stats", "--control"])
        .arg(&control)
        .output();
    // SIGTERM to the child we started, by PID.
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    if let Err(e) = wired {
        panic!("wire up: {e}");
    }
    assert!(up_in < Duration::from_secs(1), "devices took {up_in:?}");
    assert_eq!(replies.unwrap(), 3, "{err}");
    let status = status.expect("tapnat exits within 5 s of SIGTERM");
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("in2out_packets"), "{err}");
    assert!(
        stats
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["in2out_packets", "3"]),
        "{stats}"
    );
    assert!(
        flows.contains("icmp") && flows.contains("10.244.0.2"),
        "{flows}"
    );
    let stats_json: serde_json::Value = serde_json::from_str(&stats_json).unwrap();
    assert_eq!(stats_json["counters"]["in2out_packets"], 3, "{stats_json}");
    assert!(
        stats_prom.contains("tapnat_packets_total{direction=\"in2out\"} 3\n"),
        "{stats_prom}"
    );
    let flows_json: serde_json::Value = serde_json::from_str(&flows_json).unwrap();
    assert_eq!(flows_json[0]["proto"], "icmp", "{flows_json}");
    assert_eq!(flows_json[0]["src"], "10.244.0.2", "{flows_json}");
    assert_eq!(flows_json[0]["ext_addr"], "203.0.113.10", "{flows_json}");
    assert_eq!(counts, ["1\n", "0\n"]);
    assert_eq!(mode.unwrap(), 0o600);
    let ready = ready.expect("READY=1 on $NOTIFY_SOCKET");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    let nobody = nobody.unwrap();
    assert_eq!(nobody.status.code(), Some(77), "{nobody:?}");
    assert!(
        String::from_utf8_lossy(&nobody.stderr).contains("uid 65534 may not use"),
        "{nobody:?}"
    );
    assert!(!control.exists(), "control socket left behind");
    assert!(
        lab.pod.ip("link show tapnat0").is_err(),
        "pod TAP left behind"
    );
    assert!(
        lab.ext.ip("link show tapnat1").is_err(),
        "uplink TAP left behind"
    );
}

#[test]
fn bench_runs_tapnat_and_the_copy_ceiling_and_cleans_up() {
    if !root() {
        return;
    }
    let tmp = std::env::temp_dir();
    let json_path = tmp.join(format!("tapnat-bench-{}.json", std::process::id()));
    let svg_path = tmp.join(format!("tapnat-bench-{}.svg", std::process::id()));
    let child = tapnat()
        .args([
            "bench",
            "--only",
            "tapnat,tap-copy-tso",
            "--reps",
            "1",
            "--seconds",
            "1",
            "--json",
        ])
        .arg(&json_path)
        .arg("--svg")
        .arg(&svg_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = text
        .lines()
        .find(|l| l.starts_with("| tapnat |"))
        .unwrap_or_else(|| panic!("no tapnat row in:\n{text}"));
    // TCP pod->ext throughput is a positive number of Gbit/s.
    let gbit: f64 = row.split('|').nth(2).unwrap().trim().parse().unwrap();
    assert!(gbit > 0.1, "{row}");
    assert!(text.contains("| tapnat ÷ tap-copy-tso |"), "{text}");
    // The JSON has every metric, latency and the gateway's CPU among them.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json_path);
    let tapnat = &json["setups"][0];
    assert_eq!(tapnat["name"], "tapnat", "{json}");
    for key in [
        "rr_p50_us",
        "rr_p99_us",
        "ping_5ms_us",
        "ping_200ms_us",
        "gw_cpu_pct",
    ] {
        let v = tapnat["metrics"][key]["median"].as_f64();
        assert!(v.is_some_and(|v| v > 0.0), "{key}: {json}");
    }
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let _ = std::fs::remove_file(&svg_path);
    assert!(
        svg.starts_with("<svg ") && svg.contains("tap-copy-tso"),
        "{svg}"
    );
    let left = tapnat::lab::ip(&["netns", "list"]).unwrap();
    // Its namespaces are named tapnat-bench-…-PID-N.
    let ours = format!("-{pid}-");
    assert!(
        !left
            .lines()
            .any(|l| l.starts_with("tapnat-bench-") && l.contains(&ours)),
        "namespaces left behind: {left}"
    );
}

/// A `tapnat run` we started, stopped by PID on drop (SIGTERM, then SIGKILL
/// after 5 s) and waited for, also when the test fails.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return; // exited already (and reaped): its PID is no longer ours
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free TCP port on loopback (bound and released; the gateway binds it
/// again a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP GET on loopback; the whole answer.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

/// The value of the sample `series` (name and labels) in a Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn clients_find_the_gateway_by_its_config_and_metrics_count_traffic() {
    if !root() {
        return;
    }
    let lab = Lab::new("cli-ops").unwrap();
    let control = std::env::temp_dir().join(format!("tapnat-cli-ops-{}.sock", std::process::id()));
    let port = free_port();
    let text = format!(
        "[pod]\nnetns = \"{}\"\n[uplink]\nnetns = \"{}\"\n[workers]\nthreads = 1\n\
         [control]\nsocket = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
        lab.pod.path().display(),
        lab.ext.path().display(),
        control.display()
    );
    let f = TempConfig::new("ops", &text);
    let run = Running(
        tapnat()
            .args(["run", "--config"])
            .arg(&f.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let config = tapnat::config::Config::from_toml_str(&text).unwrap();
    lab.pod
        .wait_for_link("tapnat0", Duration::from_secs(2))
        .unwrap();
    lab.ext
        .wait_for_link("tapnat1", Duration::from_secs(2))
        .unwrap();
    lab.wire_up(&config).unwrap();
    let scrape = || {
        let answer = http_get(port, "/metrics");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        answer.split_once("\r\n\r\n").unwrap().1.to_string()
    };
    let in2out = "tapnat_packets_total{direction=\"in2out\"}";
    let before = sample(&scrape(), in2out).expect("an in2out series");
    let mut pinger = Pinger::new(&lab.pod).unwrap();
    let replies = pinger.ping(SERVER_IP, 3, Duration::from_secs(2)).unwrap();
    assert_eq!(replies.len(), 3);
    let after = scrape();
    assert_eq!(sample(&after, in2out), Some(before + 3.0), "{after}");
    // The live-flow gauge (each worker's published count, no table copy).
    assert_eq!(
        sample(&after, "tapnat_conntrack_entries"),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, "tapnat_conntrack_entries_limit"),
        Some(262144.0),
        "{after}"
    );
    assert!(
        after.contains("# TYPE tapnat_drops_total counter"),
        "{after}"
    );
    // `Pinger::ping` sends 56 bytes of payload: 84-byte IP packets, each
    // way, and nothing else was translated.
    for dir in ["in2out", "out2in"] {
        let bytes = format!("tapnat_bytes_total{{direction=\"{dir}\"}}");
        assert_eq!(sample(&after, &bytes), Some(3.0 * 84.0), "{after}");
    }
    for reason in ["timeout", "evicted", "flush"] {
        let destroyed = format!("tapnat_flows_destroyed_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&after, &destroyed), Some(0.0), "{after}");
    }
    assert_eq!(sample(&after, "tapnat_fragments_tracked"), Some(0.0));
    assert_eq!(sample(&after, "tapnat_fragments_held"), Some(0.0));
    // Gauges are published once per loop iteration of their thread: wait
    // for the one that matters rather than race its store.
    let settled = |series: &str, ok: &dyn Fn(f64) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let text = scrape();
            match sample(&text, series) {
                Some(v) if ok(v) => return text,
                _ if Instant::now() > deadline => panic!("{series} never settled:\n{text}"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    };
    // At least the uplink's next hop, resolved for the pings.
    settled("tapnat_neighbours", &|n| n >= 1.0);
    assert!(http_get(port, "/").starts_with("HTTP/1.1 404"));
    // `--config FILE` finds the socket, before or after the other arguments.
    let ask = |args: &[&str]| {
        let out = tapnat().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let path = f.0.to_str().unwrap();
    assert_eq!(ask(&["flows", "--count", "--config", path]), "1\n");
    assert_eq!(
        ask(&["flows", "--config", path, "--proto", "icmp", "--count"]),
        "1\n"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&ask(&["stats", "--config", path, "-o", "json"])).unwrap();
    assert_eq!(stats["counters"]["in2out_packets"], 3, "{stats}");
    assert_eq!(stats["counters"]["in2out_bytes"], 3 * 84, "{stats}");
    // A flush is counted as the flows' end, and empties the table.
    assert_eq!(ask(&["flush", "--config", path]), "1 flow(s) flushed\n");
    let flushed = settled("tapnat_conntrack_entries", &|n| n == 0.0);
    assert_eq!(
        sample(&flushed, "tapnat_flows_destroyed_total{reason=\"flush\"}"),
        Some(1.0),
        "{flushed}"
    );
    drop(run);
    assert!(!control.exists(), "control socket left behind");
}

/// How a `tapnat run` that was made to fail ended.
struct Ended {
    /// `None`: still running `within` after the fault (then killed).
    code: Option<i32>,
    /// From the fault to the exit.
    took: Duration,
    stderr: String,
}

/// Runs `tapnat run` with two workers between `lab`'s namespaces, waits for
/// both TAPs, calls `fault` with the child's PID and waits up to `within`
/// for it to exit.
fn run_until_it_fails(lab: &Lab, tag: &str, within: Duration, fault: impl FnOnce(u32)) -> Ended {
    let control =
        std::env::temp_dir().join(format!("tapnat-cli-{tag}-{}.sock", std::process::id()));
    let text = format!(
        "[pod]\nnetns = \"{}\"\n[uplink]\nnetns = \"{}\"\n[workers]\nthreads = 2\n\
         [control]\nsocket = \"{}\"\n",
        lab.pod.path().display(),
        lab.ext.path().display(),
        control.display()
    );
    let f = TempConfig::new(tag, &text);
    let mut run = Running(
        tapnat()
            .args(["run", "--config"])
            .arg(&f.0)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    lab.pod
        .wait_for_link("tapnat0", Duration::from_secs(2))
        .unwrap();
    lab.ext
        .wait_for_link("tapnat1", Duration::from_secs(2))
        .unwrap();
    // Running, with its control socket up: the threads are all started.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !control.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    fault(run.0.id());
    let code = loop {
        if let Some(s) = run.0.try_wait().unwrap() {
            break s.code();
        }
        if started.elapsed() > within {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = started.elapsed();
    let mut stderr = String::new();
    if code.is_some() {
        if let Some(mut e) = run.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
    }
    drop(run);
    Ended { code, took, stderr }
}

/// Whether `dev` is gone from `ns` within a few seconds.
fn link_gone(ns: &tapnat::lab::Netns, dev: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if ns.ip(&format!("link show {dev}")).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The test-only fault hook (SIGUSR2 makes the last worker panic) exists in
/// debug builds only, which is what `cargo test` runs.
#[cfg(debug_assertions)]
#[test]
fn a_panicking_worker_stops_the_whole_gateway_with_status_70() {
    if !root() {
        return;
    }
    let lab = Lab::new("cli-panic").unwrap();
    let end = run_until_it_fails(&lab, "panic", Duration::from_secs(5), |pid| {
        let _ = Command::new("kill")
            .args(["-USR2", &pid.to_string()])
            .status();
    });
    eprintln!("stopped {:?} after the fault", end.took);
    assert_eq!(end.code, Some(70), "{}", end.stderr);
    assert!(
        end.stderr
            .lines()
            .any(|l| l.starts_with("tapnat: error: worker 1 panicked at ")
                && l.ends_with(": test-only fault injected")),
        "{}",
        end.stderr
    );
    // One message, not the default hook's as well.
    assert!(!end.stderr.contains("RUST_BACKTRACE"), "{}", end.stderr);
    assert!(link_gone(&lab.pod, "tapnat0"), "pod TAP left behind");
    assert!(link_gone(&lab.ext, "tapnat1"), "uplink TAP left behind");
}

#[test]
fn deleting_the_pod_tap_stops_the_gateway_within_2s_with_status_74() {
    if !root() {
        return;
    }
    let lab = Lab::new("cli-podgone").unwrap();
    let end = run_until_it_fails(&lab, "podgone", Duration::from_secs(2), |_| {
        lab.pod.ip("link del tapnat0").unwrap();
    });
    eprintln!("stopped {:?} after ip link del", end.took);
    assert_eq!(end.code, Some(74), "{:?}: {}", end.took, end.stderr);
    assert!(
        end.stderr
            .contains("tapnat: error: pod TAP tapnat0 went away"),
        "{}",
        end.stderr
    );
    assert!(link_gone(&lab.ext, "tapnat1"), "uplink TAP left behind");
}

#[test]
fn deleting_the_uplink_namespace_stops_the_gateway_within_2s_with_status_74() {
    if !root() {
        return;
    }
    let lab = Lab::new("cli-nsgone").unwrap();
    let ext = lab.ext.name().to_owned();
    let end = run_until_it_fails(&lab, "nsgone", Duration::from_secs(2), |_| {
        tapnat::lab::ip(&["netns", "del", &ext]).unwrap();
    });
    eprintln!("stopped {:?} after ip netns del", end.took);
    assert_eq!(end.code, Some(74), "{:?}: {}", end.took, end.stderr);
    assert!(
        end.stderr
            .contains("tapnat: error: uplink TAP tapnat1 went away: its namespace"),
        "{}",
        end.stderr
    );
    assert!(link_gone(&lab.pod, "tapnat0"), "pod TAP left behind");
}
