//! The setups under test, each built in throwaway namespaces of the same
//! shape: a pod namespace (10.244.0.2/16, default route to a gateway) and an
//! external namespace holding the server 198.51.100.10 behind the next hop
//! 203.0.113.1. Dropping a [`Setup`] first stops what it started (processes
//! by PID, threads by flag and join), then deletes its namespaces.
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Config, UplinkKind};
use crate::device::{Poller, Tap, TapOptions};
use crate::lab::{
    Lab, Netns, EXT_ROUTER_IP, GATEWAY_POD_IP, GATEWAY_UPLINK_IP, POD_IP, RAW_UPLINK_IF, SERVER_IP,
};

use super::probe::Ends;

/// A running setup. Field order matters: `guard` is dropped before the namespaces.
pub struct Setup {
    guard: Option<Box<dyn std::any::Any>>,
    pub pod: Netns,
    pub ext: Netns,
    _more: Vec<Netns>,
    pub server: Ipv4Addr,
    /// One line saying what this setup is.
    pub note: String,
    /// The process that forwards (tapnat, pasta, slirp4netns), whose CPU
    /// time is measured; None when the forwarding is the kernel's or runs
    /// in this process.
    pub gateway_pid: Option<u32>,
}

impl Setup {
    pub fn ends(&self) -> Ends<'_> {
        Ends {
            pod: &self.pod,
            ext: &self.ext,
            server: self.server,
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        drop(self.guard.take());
    }
}

/// Why a setup did not run.
pub enum NotRun {
    /// A tool is missing or could not be installed: skip with this message.
    Skipped(String),
    /// Building it failed.
    Failed(io::Error),
}

impl From<io::Error> for NotRun {
    fn from(e: io::Error) -> Self {
        NotRun::Failed(e)
    }
}

/// Runs a command, turning a failure into an error carrying its stderr.
pub fn run_cmd(mut c: Command) -> io::Result<String> {
    let out = c.output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{:?}: {}",
            c,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `prog` runs (`prog --version`).
pub fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `PACKAGE VERSION` as dpkg knows it (pasta's own `--version` may say "unknown").
fn package_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", package])
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !v.is_empty()).then(|| format!("{package} {v}"))
}

/// `apt-get install -y PACKAGE`, announced first.
pub fn apt_install(package: &str, why: &str) -> io::Result<()> {
    println!("  {why}: installing the Debian package `{package}` (apt-get install -y {package})");
    let mut c = Command::new("apt-get");
    c.args(["install", "-y", "-q", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null());
    run_cmd(c).map(drop)
}

/// A child process we started, stopped by PID on drop: SIGTERM, then SIGKILL
/// after 5 s, and always waited for.
struct Proc {
    child: Child,
    log: Option<PathBuf>,
}

impl Proc {
    fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("sh")
                .args(["-c", &format!("kill -TERM {}", self.child.id())])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // SIGKILL to the same PID if it is still there (a no-op otherwise).
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(p) = &self.log {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tapnat-bench-{}-{name}", std::process::id()))
}

/// `kernel`: a router namespace between pod and ext, forwarding with
/// `ip_forward=1` and masquerading with an nftables rule, over veth pairs.
pub fn kernel() -> Result<Setup, NotRun> {
    if !have("nft") {
        println!("  nft not found; the kernel MASQUERADE setup needs it");
        if let Err(e) = apt_install("nftables", "kernel setup") {
            return Err(NotRun::Skipped(format!(
                "nft is missing and `apt-get install -y nftables` failed: {e}"
            )));
        }
    }
    let pod = Netns::new("bench-kernel-pod")?;
    let router = Netns::new("bench-kernel-rt")?;
    let ext = Netns::new("bench-kernel-ext")?;
    router.ip(&format!(
        "link add rt-pod type veth peer name eth0 netns {}",
        pod.name()
    ))?;
    router.ip(&format!(
        "link add rt-up type veth peer name eth0 netns {}",
        ext.name()
    ))?;
    pod.ip(&format!("addr add {POD_IP}/16 dev eth0"))?;
    pod.ip("link set eth0 up")?;
    pod.ip(&format!("route add default via {GATEWAY_POD_IP}"))?;
    router.ip(&format!("addr add {GATEWAY_POD_IP}/16 dev rt-pod"))?;
    router.ip(&format!("addr add {GATEWAY_UPLINK_IP}/24 dev rt-up"))?;
    router.ip("link set rt-pod up")?;
    router.ip("link set rt-up up")?;
    router.ip(&format!("route add default via {EXT_ROUTER_IP}"))?;
    ext.ip(&format!("addr add {EXT_ROUTER_IP}/24 dev eth0"))?;
    ext.ip("link set eth0 up")?;
    ext.ip(&format!("addr add {SERVER_IP}/32 dev lo"))?;
    let mut c = router.command("sysctl");
    c.args(["-qw", "net.ipv4.ip_forward=1"]);
    run_cmd(c)?;
    for args in [
        &["add", "table", "ip", "nat"][..],
        &[
            "add",
            "chain",
            "ip",
            "nat",
            "post",
            "{ type nat hook postrouting priority 100 ; }",
        ],
        &[
            "add",
            "rule",
            "ip",
            "nat",
            "post",
            "ip",
            "saddr",
            "10.244.0.0/16",
            "oif",
            "rt-up",
            "masquerade",
        ],
    ] {
        let mut c = router.command("nft");
        c.args(args);
        run_cmd(c)?;
    }
    Ok(Setup {
        guard: None,
        pod,
        ext,
        _more: vec![router],
        server: SERVER_IP,
        note: "router namespace: veth pairs, ip_forward=1, nftables masquerade (conntrack)".into(),
        gateway_pid: None,
    })
}

/// `tapnat`: the real gateway binary (`exe run --config FILE`; this one, or
/// a baseline build) with its TAPs in the pod and ext namespaces, `threads`
/// workers (0: one per core), on the default config otherwise.
pub fn tapnat(exe: &Path, threads: usize) -> Result<Setup, NotRun> {
    tapnat_with(exe, &format!("[workers]\nthreads = {threads}\n"), None)
}

/// [`tapnat`] with `more` appended to its config file (whole TOML tables)
/// and its control socket at `control` (default: none given, so the
/// gateway's own default path).
pub fn tapnat_with(exe: &Path, more: &str, control: Option<&Path>) -> Result<Setup, NotRun> {
    tapnat_on(exe, UplinkKind::Tap, more, control)
}

/// `tapnat-raw`: [`tapnat`] with a raw (AF_PACKET) uplink on one end of a
/// veth pair whose other end is in the ext namespace (see [`Lab`]).
pub fn tapnat_raw(exe: &Path, threads: usize) -> Result<Setup, NotRun> {
    tapnat_on(
        exe,
        UplinkKind::Raw,
        &format!("[workers]\nthreads = {threads}\n"),
        None,
    )
}

fn tapnat_on(
    exe: &Path,
    kind: UplinkKind,
    more: &str,
    control: Option<&Path>,
) -> Result<Setup, NotRun> {
    let lab = Lab::with_uplink("bench-tapnat", kind)?;
    let raw = match kind {
        UplinkKind::Tap => String::new(),
        UplinkKind::Raw => format!("kind = \"raw\"\ninterface = \"{RAW_UPLINK_IF}\"\n"),
    };
    let text = format!(
        "[pod]\nnetns = \"{}\"\n[uplink]\n{raw}netns = \"{}\"\n{more}",
        lab.pod.path().display(),
        lab.uplink_ns().path().display()
    );
    let threads = Config::from_toml_str(&text)
        .map(|c| c.workers.threads)
        .unwrap_or(0);
    let config = Config::from_toml_str(&text).map_err(|e| io::Error::other(e.to_string()))?;
    let conf_path = temp_path("tapnat.toml");
    std::fs::write(&conf_path, &text)?;
    let log = temp_path("tapnat.log");
    let mut cmd = Command::new(exe);
    cmd.args(["run", "--config"]).arg(&conf_path);
    if let Some(path) = control {
        cmd.arg("--control").arg(path);
    }
    let spawned = cmd
        .env_remove("TAPNAT_POD__TAP")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log)?)
        .spawn();
    let child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&conf_path);
            return Err(e.into());
        }
    };
    let proc = Proc {
        child,
        log: Some(log),
    };
    let wired = lab.wire_up(&config);
    let _ = std::fs::remove_file(&conf_path);
    if let Err(e) = wired {
        let text = proc.log_text();
        drop(proc);
        return Err(io::Error::other(format!("{e}; tapnat said: {}", text.trim())).into());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = if threads == 0 { cores } else { threads };
    let gateway_pid = Some(proc.child.id());
    let Lab { pod, ext, up, .. } = lab;
    let uplink = match kind {
        UplinkKind::Tap => "TAPs in pod/ext namespaces",
        UplinkKind::Raw => "pod TAP, raw AF_PACKET uplink on a veth to the ext namespace",
    };
    Ok(Setup {
        guard: Some(Box::new(proc)),
        pod,
        ext,
        _more: up.into_iter().collect(),
        server: SERVER_IP,
        note: format!(
            "`{} run --config FILE` process, {uplink}, {workers} worker(s) on {cores} core(s)",
            exe.display()
        ),
        gateway_pid,
    })
}

/// Threads copying frames unchanged between two TAPs, one per direction.
struct Copier {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Copier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Copies every frame from `from` to `to` until `stop` (checked every 100 ms).
fn copy_loop(from: Arc<Tap>, to: Arc<Tap>, stop: Arc<AtomicBool>) {
    use std::os::fd::AsRawFd;
    let mut poller = Poller::new();
    let slot = poller.add(from.as_raw_fd());
    // Room for a TSO super-frame with its virtio-net header.
    let mut buf = vec![0u8; 65536 + 128];
    while !stop.load(Ordering::Relaxed) {
        match poller.wait(Some(Duration::from_millis(100))) {
            Ok(0) => continue,
            Ok(_) if poller.readable(slot) => {}
            Ok(_) => continue,
            Err(_) => return,
        }
        // Drain a batch; WouldBlock ends it.
        for _ in 0..256 {
            match from.recv(&mut buf) {
                Ok(n) => {
                    let _ = to.send(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
    }
}

/// `tap-copy`: the ceiling for any TAP-to-TAP userspace gateway. Two TAPs
/// and two threads that copy each frame unchanged (no parsing, no NAT), so
/// pod and ext see one Ethernet segment: the pod is 10.244.0.2/16, ext is
/// 10.244.0.3/16 and the pod routes to the server via 10.244.0.3 directly.
///
/// With `offload`, both TAPs carry the virtio-net header with TSO and
/// checksum offload on (as tapnat's are by default), so 64 KiB super-frames
/// are copied whole: the ceiling for tapnat as it runs by default.
pub fn tap_copy(offload: bool) -> Result<Setup, NotRun> {
    let pod = Netns::new("bench-copy-pod")?;
    let ext = Netns::new("bench-copy-ext")?;
    let opts = TapOptions {
        multi_queue: false,
        vnet_hdr: offload,
    };
    let open = |name: &str, ns: &Netns| {
        let tap = Tap::open(name, Some(&ns.path()), 1500, opts)
            .map_err(|e| io::Error::other(format!("{e}: {:?}", std::error::Error::source(&e))))?;
        if offload {
            tap.set_offload(
                libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
            )?;
        }
        Ok::<_, io::Error>(Arc::new(tap))
    };
    let a = open("bcopy0", &pod)?;
    let b = open("bcopy1", &ext)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (from, to) in [(a.clone(), b.clone()), (b, a)] {
        let stop = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name("bench-tap-copy".into())
                .spawn(move || copy_loop(from, to, stop))?,
        );
    }
    let copier = Copier { stop, threads };
    let peer = Ipv4Addr::new(10, 244, 0, 3);
    pod.ip(&format!("addr add {POD_IP}/16 dev bcopy0"))?;
    pod.ip("link set bcopy0 up")?;
    pod.ip(&format!("route add default via {peer}"))?;
    ext.ip(&format!("addr add {peer}/16 dev bcopy1"))?;
    ext.ip("link set bcopy1 up")?;
    ext.ip(&format!("addr add {SERVER_IP}/32 dev lo"))?;
    Ok(Setup {
        guard: Some(Box::new(copier)),
        pod,
        ext,
        _more: vec![],
        server: SERVER_IP,
        note: if offload {
            "bare TAP-to-TAP copy with IFF_VNET_HDR + TSO (2 threads, no NAT): the ceiling for tapnat's default".into()
        } else {
            "bare TAP-to-TAP frame copy (2 threads, no NAT): the ceiling for a TAP gateway".into()
        },
        gateway_pid: None,
    })
}

/// `pasta` / `slirp4netns`: a userspace TCP/IP stack that terminates the
/// pod's connections and reopens them as sockets in the namespace it runs in.
///
/// For safety that namespace is an "outer" one created here, never the root
/// namespace: it has a stand-in uplink (203.0.113.10/24, default via
/// 203.0.113.1, as the host's interface would) and the server 198.51.100.10
/// on its loopback, so the server sees connections from the stack's sockets.
/// pasta is told to give the pod 10.244.0.2/16 via 10.244.0.1; slirp4netns
/// always configures its own subnet (the pod is 10.0.2.100/24 via 10.0.2.2).
/// Both run at MTU 1500. Both answer the pod's pings through ICMP "ping"
/// sockets, which `net.ipv4.ping_group_range` inside the outer namespace allows.
/// pasta or slirp4netns (`name`) with the pod interface at `mtu`.
pub fn userspace_stack(name: &str, mtu: u32, install: bool) -> Result<Setup, NotRun> {
    let (prog, package) = match name {
        "pasta" => ("pasta", "passt"),
        _ => ("slirp4netns", "slirp4netns"),
    };
    if !have(prog) {
        if !install {
            return Err(NotRun::Skipped(format!(
                "{prog} is not installed: `apt-get install {package}`, or run with --install"
            )));
        }
        if let Err(e) = apt_install(package, name) {
            return Err(NotRun::Skipped(format!("installing {package} failed: {e}")));
        }
    }
    let pod = Netns::new(&format!("bench-{name}-pod"))?;
    let outer = Netns::new(&format!("bench-{name}-outer"))?;
    // A veth pair with both ends here stands in for the host's uplink (the
    // dummy driver may be missing); nothing is ever sent out of it.
    outer.ip("link add up0 type veth peer name up1")?;
    outer.ip(&format!("addr add {GATEWAY_UPLINK_IP}/24 dev up0"))?;
    outer.ip("link set up1 up")?;
    outer.ip("link set up0 up")?;
    outer.ip(&format!("route add default via {EXT_ROUTER_IP}"))?;
    outer.ip(&format!("addr add {SERVER_IP}/32 dev lo"))?;
    let mut c = outer.command("sysctl");
    c.args(["-qw", "net.ipv4.ping_group_range=0 2147483647"]);
    run_cmd(c)?;
    let log = temp_path(&format!("{name}.log"));
    let ns_path = pod.path().display().to_string();
    let mut cmd = outer.command(prog);
    if name == "pasta" {
        // `--runas 0`: as root pasta otherwise switches to nobody and can no
        // longer join a namespace that root's user namespace owns.
        cmd.args([
            "-f",
            "-q",
            "-4",
            "--runas",
            "0",
            "--config-net",
            "-m",
            &mtu.to_string(),
        ])
        .args(["-a", &POD_IP.to_string(), "-n", "16"])
        .args(["-g", &GATEWAY_POD_IP.to_string()])
        .args(["-t", "none", "-u", "none", "-T", "none", "-U", "none"])
        .args(["--netns", &ns_path]);
    } else {
        cmd.args([
            "--configure",
            &format!("--mtu={mtu}"),
            "--disable-host-loopback",
        ])
        .args(["--netns-type=path", &ns_path, "tap0"]);
    }
    // `ip netns exec` execs the program, so the child's PID is pasta's / slirp4netns's.
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log)?)
        .spawn()?;
    let gateway_pid = Some(child.id());
    let proc = Proc {
        child,
        log: Some(log),
    };
    // Wait until the stack has configured the pod's interface and route.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pod
        .ip("route show default")
        .is_ok_and(|r| r.contains("via"))
    {
        if Instant::now() > deadline {
            let text = proc.log_text();
            drop(proc);
            return Err(io::Error::other(format!(
                "{prog} did not configure the pod namespace in 5 s: {}",
                text.trim()
            ))
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let version = package_version(package).unwrap_or_else(|| prog.to_string());
    let addr = pod
        .ip("-4 -o addr show scope global")
        .ok()
        .and_then(|t| {
            t.split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .map(str::to_string)
        })
        .unwrap_or_default();
    Ok(Setup {
        guard: Some(Box::new(proc)),
        pod,
        ext: outer,
        _more: vec![],
        server: SERVER_IP,
        note: format!(
            "{version}: pod {addr} at MTU {mtu}, sockets opened in an outer namespace holding the server"
        ),
        gateway_pid,
    })
}
