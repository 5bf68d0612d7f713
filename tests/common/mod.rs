//! Shared by the end-to-end tests: root gating, a started lab, socket helpers.
#![allow(dead_code)]
use std::net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use tapnat::config::Config;
use tapnat::gateway::Gateway;
use tapnat::lab::{self, Lab, Netns};

pub const T: Duration = Duration::from_secs(3);

/// The binary under test.
pub fn tapnat() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_tapnat"))
}

/// A config file in the temp directory, removed on drop.
pub struct TempConfig(pub std::path::PathBuf);

impl TempConfig {
    pub fn new(tag: &str, text: &str) -> TempConfig {
        let p = std::env::temp_dir().join(format!("tapnat-{tag}-{}.toml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        TempConfig(p)
    }
    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Root or skip; under CI, root or fail.
pub fn root() -> bool {
    if lab::is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root (CI is set, so it fails instead of skipping)");
    }
    eprintln!("skipped: needs root");
    false
}

/// A lab and a gateway on the default config (two workers, then `tweak`), wired up.
pub fn start(tag: &str, tweak: impl FnOnce(&mut Config)) -> (Lab, Gateway) {
    start_in(Lab::new(tag).expect("namespaces"), tweak)
}

/// A gateway on `lab`'s default config (two workers, then `tweak`), wired up.
pub fn start_in(lab: Lab, tweak: impl FnOnce(&mut Config)) -> (Lab, Gateway) {
    let mut config = lab.config();
    config.workers.threads = 2;
    tweak(&mut config);
    let gw = Gateway::start(&config).expect("gateway starts");
    lab.wire_up(&config).expect("wire up");
    (lab, gw)
}

pub fn udp_in(ns: &Netns, addr: SocketAddrV4) -> UdpSocket {
    let s = ns.run(move || UdpSocket::bind(addr)).unwrap().unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

pub fn tcp_listen(ns: &Netns, addr: SocketAddrV4) -> TcpListener {
    ns.run(move || TcpListener::bind(addr)).unwrap().unwrap()
}

pub fn tcp_connect(ns: &Netns, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    let s = ns
        .run(move || TcpStream::connect_timeout(&to.into(), T))
        .unwrap()?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

/// A process a test started (a `tapnat run`, with stderr piped), stopped
/// by PID on drop (SIGTERM, then SIGKILL after 5 s) and waited for, also
/// when the test fails. Its stderr is collected as it comes.
pub struct Spawned {
    pub child: std::process::Child,
    err: std::sync::Arc<std::sync::Mutex<String>>,
    /// Print the collected stderr once it has stopped (for diagnosis).
    pub echo_on_drop: bool,
}

impl Spawned {
    pub fn new(mut child: std::process::Child) -> Spawned {
        use std::io::{BufRead, BufReader};
        let err = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let err = err.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut e = err.lock().unwrap();
                    e.push_str(&line);
                    e.push('\n');
                }
            });
        }
        Spawned {
            child,
            err,
            echo_on_drop: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill SIG PID`, which must succeed.
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig}");
    }

    /// What it wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits up to `within` until stderr holds `needle` `times` times.
    pub fn wait_stderr_within(&self, needle: &str, times: usize, within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            let e = self.stderr();
            if e.matches(needle).count() >= times {
                return e;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?} x{times} in:\n{e}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How the process ended, waiting up to 5 s.
    pub fn ended(&mut self) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status();
            if self.ended().is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if self.echo_on_drop {
            eprintln!("gateway stderr:\n{}", self.stderr());
        }
    }
}
