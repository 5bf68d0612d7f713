//! Least privilege after set-up (README "Security model"): the real
//! `tapnat run` between kernel peers in namespaces holds no capability,
//! has no_new_privs and a seccomp filter in every thread, still forwards
//! ping, TCP and UDP and answers its control socket, metrics, SIGHUP and
//! SIGUSR1, and dies of SIGSYS on a system call outside its filter.
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tapnat::config::UplinkKind;
use tapnat::lab::{Lab, Pinger, POD_IP, RAW_UPLINK_IF, SERVER_IP};

mod common;
use common::{root, tapnat, tcp_connect, tcp_listen, udp_in, Spawned, TempConfig};

/// A `tapnat run` we started (through `sh -c 'ulimit -c 0; exec ...'`, so
/// a SIGSYS leaves no core file and the PID stays the same): [`Spawned`],
/// whose waits here allow 10 s.
struct Running(Spawned);

impl std::ops::Deref for Running {
    type Target = Spawned;
    fn deref(&self) -> &Spawned {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Spawned {
        &mut self.0
    }
}

impl Running {
    fn start(config: &TempConfig, control: &std::path::Path) -> Running {
        let child = Command::new("sh")
            .args([
                "-c",
                "ulimit -c 0; exec \"$0\" run --config \"$1\" --control \"$2\"",
            ])
            .arg(env!("CARGO_BIN_EXE_tapnat"))
            .arg(config.path())
            .arg(control)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let r = Running(Spawned::new(child));
        r.wait_stderr("tapnat: running", 1);
        r
    }

    /// Waits up to 10 s until stderr holds `needle` `times` times.
    fn wait_stderr(&self, needle: &str, times: usize) -> String {
        self.0
            .wait_stderr_within(needle, times, Duration::from_secs(10))
    }
}

/// A control socket path of this test, removed on drop (a gateway running
/// as another user cannot remove its root-owned socket from /tmp).
struct SocketPath(PathBuf);

impl SocketPath {
    fn new(tag: &str) -> SocketPath {
        SocketPath(
            std::env::temp_dir().join(format!("tapnat-sandbox-{tag}-{}.sock", std::process::id())),
        )
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The config of a gateway between `lab`'s namespaces with two workers and
/// `extra` appended.
fn config_text(lab: &Lab, extra: &str) -> String {
    format!(
        "[pod]\nnetns = \"{}\"\n[uplink]\nnetns = \"{}\"\n[workers]\nthreads = 2\n{extra}",
        lab.pod.path().display(),
        lab.ext.path().display(),
    )
}

/// Starts the gateway and wires the lab up.
fn start(lab: &Lab, file: &TempConfig, text: &str, control: &SocketPath) -> Running {
    let running = Running::start(file, &control.0);
    let config = tapnat::config::Config::from_toml_str(text).unwrap();
    lab.wire_up(&config).unwrap();
    running
}

/// `key: value` lines of one `/proc/.../status` file.
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .trim()
        .to_owned()
}

/// (thread name, status text) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = e.unwrap().path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // a client thread that just ended
        };
        out.push((comm.trim().to_owned(), status));
    }
    out
}

const NO_CAPS: &str = "0000000000000000";

/// Every thread of `pid` has no_new_privs, the given seccomp mode and no
/// capability in any set; the thread names seen.
fn assert_locked_down(pid: u32, seccomp: &str) -> Vec<String> {
    let all = threads(pid);
    for (name, s) in &all {
        assert_eq!(status_field(s, "NoNewPrivs"), "1", "{name}");
        assert_eq!(status_field(s, "Seccomp"), seccomp, "{name}");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(s, set), NO_CAPS, "{name} {set}");
        }
    }
    all.into_iter().map(|(n, _)| n).collect()
}

/// A pod UDP socket sends to the server's echo socket and gets the echo.
fn udp_round_trip(lab: &Lab, port: u16) -> bool {
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5000));
    let pod = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, port));
    pod.send_to(b"ping", SocketAddrV4::new(SERVER_IP, 5000))
        .unwrap();
    let mut b = [0u8; 16];
    let Ok((n, from)) = srv.recv_from(&mut b) else {
        return false;
    };
    srv.send_to(&b[..n], from).unwrap();
    matches!(pod.recv_from(&mut b), Ok((4, _)))
}

/// A TCP connection from the pod to the server carries bytes both ways.
fn tcp_round_trip(lab: &Lab) -> bool {
    let l = tcp_listen(&lab.ext, SocketAddrV4::new(SERVER_IP, 8080));
    let Ok(mut c) = tcp_connect(&lab.pod, SocketAddrV4::new(SERVER_IP, 8080)) else {
        return false;
    };
    let (mut s, _) = l.accept().unwrap();
    c.write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    s.write_all(b"world").unwrap();
    c.read_exact(&mut b).unwrap();
    &b == b"world"
}

fn pings(lab: &Lab) -> usize {
    Pinger::new(&lab.pod)
        .unwrap()
        .ping(SERVER_IP, 2, Duration::from_secs(2))
        .unwrap()
        .len()
}

/// `tapnat ARGS --control PATH`; must succeed.
fn ask(control: &SocketPath, args: &[&str]) -> String {
    let out = tapnat()
        .args(args)
        .arg("--control")
        .arg(&control.0)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// GET /metrics on `port` of loopback.
fn scrape(port: u16) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

/// A loopback port for this test's metrics endpoint (bound once by the
/// gateway; a port in use shows up as a warning and a failed scrape).
fn metrics_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn a_running_gateway_holds_no_privilege_and_still_does_everything() {
    if !root() {
        return;
    }
    let lab = Lab::new("sbx-run").unwrap();
    let port = metrics_port();
    // workers.pin: the workers pin themselves under their filters.
    let text = config_text(
        &lab,
        &format!("pin = true\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let file = TempConfig::new("sbx-run", &text);
    let control = SocketPath::new("run");
    let mut gw = start(&lab, &file, &text, &control);
    let pid = gw.pid();

    let names = assert_locked_down(pid, "2");
    for role in [
        "tapnat",
        "tapnat-signals",
        "tapnat-w0",
        "tapnat-w1",
        "tapnat-ctl",
        "tapnat-control",
        "tapnat-metrics",
        "tapnat-events",
    ] {
        assert!(names.iter().any(|n| n == role), "no {role} in {names:?}");
    }
    let main = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_field(&main, "Uid"), "0\t0\t0\t0");

    // Everything the end-to-end tests send still goes through.
    assert_eq!(pings(&lab), 2, "{}", gw.stderr());
    assert!(tcp_round_trip(&lab), "{}", gw.stderr());
    assert!(udp_round_trip(&lab, 40000), "{}", gw.stderr());
    // The control socket, in every request kind a client thread serves.
    assert!(ask(&control, &["stats"]).starts_with("counters:"));
    assert!(ask(&control, &["flows", "-o", "json"]).contains("10.244.0.2"));
    ask(
        &control,
        &["forward", "add", "tcp", "8081", "10.244.0.2:80"],
    );
    assert!(ask(&control, &["forward", "list"]).contains("8081"));
    ask(&control, &["forward", "del", "tcp", "8081"]);
    ask(&control, &["flush"]);
    // Metrics, through a scrape thread.
    let m = scrape(port);
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(m.contains("tapnat_"), "{m}");
    // SIGUSR1 prints flows and counters; SIGHUP re-reads the file.
    gw.signal("-USR1");
    gw.wait_stderr("flows", 1);
    std::fs::write(&file.0, format!("{text}[nat]\nmax_flows = 5000\n")).unwrap();
    gw.signal("-HUP");
    gw.wait_stderr("tapnat: reload: applied nat.max_flows", 1);
    // Still forwarding after all that; every thread still locked down.
    assert!(udp_round_trip(&lab, 40001), "{}", gw.stderr());
    assert_locked_down(pid, "2");
    // A clean stop goes through the filters too.
    gw.signal("-TERM");
    let status = gw.ended().expect("stops");
    assert_eq!(status.code(), Some(0), "{status:?}: {}", gw.stderr());
    assert!(gw.stderr().contains("tapnat: stopped"), "{}", gw.stderr());
}

#[test]
fn a_gateway_on_a_raw_uplink_is_locked_down_and_forwards() {
    if !root() {
        return;
    }
    let lab = Lab::with_uplink("sbx-raw", UplinkKind::Raw).unwrap();
    let text = format!(
        "[pod]\nnetns = \"{}\"\n[uplink]\nkind = \"raw\"\ninterface = \"{RAW_UPLINK_IF}\"\n\
         netns = \"{}\"\n[workers]\nthreads = 2\n",
        lab.pod.path().display(),
        lab.uplink_ns().path().display(),
    );
    let file = TempConfig::new("sbx-raw", &text);
    let control = SocketPath::new("raw");
    let mut gw = start(&lab, &file, &text, &control);
    assert_locked_down(gw.pid(), "2");
    // AF_PACKET reads and writes, the link watch and fanout steering, all
    // under the workers' and the control thread's filters.
    assert_eq!(pings(&lab), 2, "{}", gw.stderr());
    assert!(tcp_round_trip(&lab), "{}", gw.stderr());
    assert!(udp_round_trip(&lab, 40002), "{}", gw.stderr());
    assert_locked_down(gw.pid(), "2");
    gw.signal("-TERM");
    let status = gw.ended().expect("stops");
    assert_eq!(status.code(), Some(0), "{status:?}: {}", gw.stderr());
}

#[test]
fn run_as_switches_every_thread_to_the_user_and_its_group() {
    if !root() {
        return;
    }
    let nobody = tapnat::sandbox::lookup_user("nobody").expect("a user nobody");
    let lab = Lab::new("sbx-user").unwrap();
    let text = config_text(&lab, "[run]\nrun_as = \"nobody\"\n");
    let file = TempConfig::new("sbx-user", &text);
    let control = SocketPath::new("user");
    let mut gw = start(&lab, &file, &text, &control);
    let pid = gw.pid();
    assert_locked_down(pid, "2");
    let (uid, gid) = (nobody.uid.to_string(), nobody.gid.to_string());
    for (name, s) in threads(pid) {
        assert_eq!(
            status_field(&s, "Uid"),
            [&*uid, &uid, &uid, &uid].join("\t"),
            "{name}"
        );
        assert_eq!(
            status_field(&s, "Gid"),
            [&*gid, &gid, &gid, &gid].join("\t"),
            "{name}"
        );
        assert_eq!(status_field(&s, "Groups"), gid, "{name}");
    }
    assert_eq!(pings(&lab), 2, "{}", gw.stderr());
    assert!(tcp_round_trip(&lab), "{}", gw.stderr());
    assert!(udp_round_trip(&lab, 40002), "{}", gw.stderr());
    // Root may still ask it (the socket was made before the switch).
    assert!(ask(&control, &["stats"]).starts_with("counters:"));
    gw.signal("-TERM");
    let status = gw.ended().expect("stops");
    assert_eq!(status.code(), Some(0), "{status:?}: {}", gw.stderr());
}

/// The fault hook (SIGPWR: the last worker calls getppid(2), which no
/// list allows) exists in debug builds only, which is what `cargo test`
/// runs.
#[cfg(debug_assertions)]
#[test]
fn a_system_call_outside_the_filter_kills_the_process_with_sigsys() {
    if !root() {
        return;
    }
    let lab = Lab::new("sbx-kill").unwrap();
    let text = config_text(&lab, "");
    let file = TempConfig::new("sbx-kill", &text);
    let control = SocketPath::new("kill");
    let mut gw = start(&lab, &file, &text, &control);
    assert_eq!(pings(&lab), 2, "{}", gw.stderr());
    gw.signal("-PWR");
    let status = gw.ended().expect("killed");
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "{status:?}: {}",
        gw.stderr()
    );
    // The devices went with the process.
    std::thread::sleep(Duration::from_millis(200));
    assert!(lab.pod.ip("link show tapnat0").is_err(), "pod TAP left");
}

#[cfg(debug_assertions)]
#[test]
fn seccomp_false_leaves_the_filters_out_but_not_the_rest() {
    if !root() {
        return;
    }
    let lab = Lab::new("sbx-off").unwrap();
    let text = config_text(&lab, "[run]\nseccomp = false\n");
    let file = TempConfig::new("sbx-off", &text);
    let control = SocketPath::new("off");
    let mut gw = start(&lab, &file, &text, &control);
    assert_locked_down(gw.pid(), "0");
    gw.signal("-PWR");
    gw.wait_stderr("test-only fault: getppid() = ", 1);
    assert_eq!(pings(&lab), 2, "{}", gw.stderr());
    gw.signal("-TERM");
    let status = gw.ended().expect("stops");
    assert_eq!(status.code(), Some(0), "{status:?}: {}", gw.stderr());
}

#[test]
fn an_unknown_run_as_user_is_a_config_error_before_any_device() {
    let file = TempConfig::new(
        "sbx-nouser",
        "[pod]\ntap = \"tapsbx0\"\n[run]\nrun_as = \"no-such-user-here\"\n",
    );
    let out = tapnat()
        .args(["run", "--config", file.path()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config key `run.run_as`: no user \"no-such-user-here\" on this system"),
        "{err}"
    );
    assert!(!std::path::Path::new("/sys/class/net/tapsbx0").exists());
}
