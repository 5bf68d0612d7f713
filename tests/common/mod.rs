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
