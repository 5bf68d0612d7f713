//! Operating a running gateway from the command line: `tapnat flush`,
//! `tapnat forward add|del|list` and a reload on SIGHUP, with the real
//! binary between kernel peers in namespaces.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tapnat::lab::{Lab, Pinger, GATEWAY_UPLINK_IP, POD_IP, SERVER_IP};

mod common;
use common::{root, tapnat, tcp_connect, tcp_listen, udp_in, Spawned, TempConfig};

/// A `tapnat run` we started: [`Spawned`], whose waits here allow 5 s.
struct Running(Spawned);

impl std::ops::Deref for Running {
    type Target = Spawned;
    fn deref(&self) -> &Spawned {
        &self.0
    }
}

impl Running {
    fn new(child: std::process::Child) -> Running {
        Running(Spawned::new(child))
    }

    /// Waits up to 5 s until stderr holds `needle` `times` times.
    fn wait_stderr(&self, needle: &str, times: usize) -> String {
        self.0
            .wait_stderr_within(needle, times, Duration::from_secs(5))
    }

    /// Stops it and returns what it wrote on stderr.
    fn stop(self) -> String {
        self.signal("-TERM");
        self.wait_stderr("tapnat: stopped", 1)
    }
}

/// The control socket of the gateway `config_text(_, tag, _)` describes.
fn control_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tapnat-ops-{tag}-{}.sock", std::process::id()))
}

/// The config text of a gateway between `lab`'s namespaces with two workers
/// (so a range or a steered target crosses workers), its control socket in
/// the temp dir, and `extra` appended.
fn config_text(lab: &Lab, tag: &str, extra: &str) -> String {
    let control = control_path(tag);
    format!(
        "[pod]\nnetns = \"{}\"\n[uplink]\nnetns = \"{}\"\n[workers]\nthreads = 2\n\
         [control]\nsocket = \"{}\"\n{extra}",
        lab.pod.path().display(),
        lab.ext.path().display(),
        control.display()
    )
}

/// Starts `tapnat run --config FILE` (stderr piped) and wires the lab up.
fn run(lab: &Lab, file: &TempConfig, text: &str) -> Running {
    let child = tapnat()
        .args(["run", "--config", file.path()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let running = Running::new(child);
    let config = tapnat::config::Config::from_toml_str(text).unwrap();
    lab.pod
        .wait_for_link("tapnat0", Duration::from_secs(2))
        .unwrap();
    lab.ext
        .wait_for_link("tapnat1", Duration::from_secs(2))
        .unwrap();
    lab.wire_up(&config).unwrap();
    // The control socket is up once `flows` answers.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !tapnat()
        .args(["flows", "--count", "--config", file.path()])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    running
}

fn cli(args: &[&str]) -> Output {
    tapnat().args(args).output().unwrap()
}

/// A client command that must succeed; its stdout.
fn ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn count(file: &TempConfig, proto: Option<&str>) -> usize {
    let mut args = vec!["flows", "--count", "--config", file.path()];
    if let Some(p) = proto {
        args.extend(["--proto", p]);
    }
    ok(&args).trim().parse().unwrap()
}

/// A pod UDP socket on `port` sends to the server's echo socket and gets
/// the echo back.
fn udp_round_trip(lab: &Lab, srv: &std::net::UdpSocket, port: u16) -> bool {
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

#[test]
fn flush_removes_the_selected_flows_and_traffic_resumes() {
    if !root() {
        return;
    }
    let lab = Lab::new("ops-flush").unwrap();
    let text = config_text(&lab, "flush", "");
    let file = TempConfig::new("flush", &text);
    let gw = run(&lab, &file, &text);
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5000));
    for port in [41000, 41001, 41002] {
        assert!(udp_round_trip(&lab, &srv, port), "udp {port}");
    }
    let listener = tcp_listen(&lab.ext, SocketAddrV4::new(SERVER_IP, 7000));
    let _tcp = tcp_connect(&lab.pod, SocketAddrV4::new(SERVER_IP, 7000)).unwrap();
    let (_accepted, _) = listener.accept().unwrap();
    let mut pinger = Pinger::new(&lab.pod).unwrap();
    assert_eq!(
        pinger
            .ping(SERVER_IP, 1, Duration::from_secs(2))
            .unwrap()
            .len(),
        1
    );
    assert_eq!(count(&file, None), 5);
    assert_eq!(count(&file, Some("udp")), 3);
    // Only the UDP flows go.
    assert_eq!(
        ok(&["flush", "--proto", "udp", "--config", file.path()]),
        "3 flow(s) flushed\n"
    );
    assert_eq!(count(&file, Some("udp")), 0);
    assert_eq!(count(&file, Some("tcp")), 1);
    assert_eq!(count(&file, Some("icmp")), 1);
    // A selector that matches nothing flushes nothing.
    assert_eq!(
        ok(&["flush", "--config", file.path(), "--port", "9"]),
        "0 flow(s) flushed\n"
    );
    // Without selectors: everything, like conntrack -F.
    let flushed: serde_json::Value =
        serde_json::from_str(&ok(&["flush", "-o", "json", "--config", file.path()])).unwrap();
    assert_eq!(flushed["flushed"], 2, "{flushed}");
    assert_eq!(count(&file, None), 0);
    // New flows work afterwards (a flushed port waits out its reuse delay,
    // so the same pod port gets another outside port).
    assert!(udp_round_trip(&lab, &srv, 41000), "udp after flush");
    assert!(udp_round_trip(&lab, &srv, 41003), "new udp after flush");
    assert_eq!(count(&file, Some("udp")), 2);
    let stats: serde_json::Value =
        serde_json::from_str(&ok(&["stats", "-o", "json", "--config", file.path()])).unwrap();
    assert!(
        stats["counters"]["flows_created"].as_u64().unwrap() >= 7,
        "{stats}"
    );
    let err = gw.stop();
    assert!(err.contains("tapnat: stopped"), "{err}");
}

/// A TCP server in the pod on `port` that answers every connection with
/// one line and keeps reading: the line then an echo of what it gets.
fn pod_server(lab: &Lab, port: u16) {
    let listener = tcp_listen(&lab.pod, SocketAddrV4::new(POD_IP, port));
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.write_all(b"hello\n");
                let mut b = [0u8; 256];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Connects from the external namespace to the gateway's `port`; reads the
/// greeting.
fn connect_forward(lab: &Lab, port: u16) -> std::io::Result<TcpStream> {
    let addr = SocketAddrV4::new(GATEWAY_UPLINK_IP, port);
    let mut s = lab
        .ext
        .run(move || TcpStream::connect_timeout(&addr.into(), Duration::from_millis(700)))
        .unwrap()?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut hello = [0u8; 6];
    s.read_exact(&mut hello)?;
    assert_eq!(&hello, b"hello\n");
    Ok(s)
}

fn echo(s: &mut TcpStream, what: &[u8]) {
    s.write_all(what).unwrap();
    let mut b = vec![0u8; what.len()];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b, what);
}

#[test]
fn forward_added_and_deleted_at_run_time() {
    if !root() {
        return;
    }
    let lab = Lab::new("ops-fwd").unwrap();
    let text = config_text(&lab, "fwd", "");
    let file = TempConfig::new("fwd", &text);
    let gw = run(&lab, &file, &text);
    pod_server(&lab, 80);
    pod_server(&lab, 8000);
    let p = file.path();
    assert!(connect_forward(&lab, 8081).is_err(), "not forwarded yet");
    assert_eq!(
        ok(&[
            "forward",
            "add",
            "tcp",
            "8081",
            "10.244.0.2:80",
            "--config",
            p
        ]),
        "forward added: tcp 8081 -> 10.244.0.2:80\n"
    );
    // The other order of arguments works too; a range spread over both
    // workers.
    ok(&[
        "forward",
        "--config",
        p,
        "add",
        "tcp",
        "9000-9003",
        "10.244.0.2:8000",
    ]);
    // One target endpoint has one outside port (endpoint-independent
    // mapping): a second forward to it is refused.
    let twice = cli(&[
        "forward",
        "add",
        "tcp",
        "7000",
        "10.244.0.2:8001",
        "--config",
        p,
    ]);
    assert_eq!(twice.status.code(), Some(1), "{twice:?}");
    assert!(
        String::from_utf8_lossy(&twice.stderr).contains(
            "forward.to`: 10.244.0.2:8001 is already the target of forward[1] (9000-9003)"
        ),
        "{twice:?}"
    );
    let mut c = connect_forward(&lab, 8081).unwrap();
    echo(&mut c, b"through 8081");
    // Hairpin: the pod reaches its own run-time forward on the outside
    // address.
    let mut h = tcp_connect(&lab.pod, SocketAddrV4::new(GATEWAY_UPLINK_IP, 8081)).unwrap();
    let mut hello = [0u8; 6];
    h.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello\n");
    echo(&mut h, b"hairpin");
    drop(h);
    for port in 9000..=9003 {
        if port == 9000 {
            let mut r = connect_forward(&lab, port).unwrap();
            echo(&mut r, b"range");
        } else {
            // 9001.. map onto pod ports 8001.., where nothing listens: the
            // pod's RST comes back through the NAT.
            let addr = SocketAddrV4::new(GATEWAY_UPLINK_IP, port);
            let refused = lab
                .ext
                .run(move || TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2)))
                .unwrap();
            assert_eq!(
                refused.unwrap_err().kind(),
                std::io::ErrorKind::ConnectionRefused,
                "port {port}"
            );
        }
    }
    // Checked by the config's rules: overlap, target outside the pod subnet.
    let overlap = cli(&["forward", "add", "tcp", "8081", "10.244.0.3", "--config", p]);
    assert_eq!(overlap.status.code(), Some(1), "{overlap:?}");
    let err = String::from_utf8_lossy(&overlap.stderr);
    assert!(
        err.contains("forward.port") && err.contains("overlaps"),
        "{err}"
    );
    let outside = cli(&["forward", "add", "udp", "53", "192.0.2.1:53", "--config", p]);
    assert_eq!(outside.status.code(), Some(1), "{outside:?}");
    assert!(String::from_utf8_lossy(&outside.stderr).contains("forward.to"));
    // A port a masqueraded flow holds is refused with a clear message.
    let pod_udp = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 40000));
    pod_udp
        .send_to(b"x", SocketAddrV4::new(SERVER_IP, 5000))
        .unwrap();
    let flows: serde_json::Value = serde_json::from_str(&ok(&[
        "flows", "--proto", "udp", "-o", "json", "--config", p,
    ]))
    .unwrap();
    let held = flows[0]["ext_port"].as_u64().unwrap().to_string();
    let busy = cli(&["forward", "add", "udp", &held, "10.244.0.3", "--config", p]);
    assert_eq!(busy.status.code(), Some(1), "{busy:?}");
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use by a masqueraded flow"),
        "{busy:?}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&ok(&["forward", "list", "-o", "json", "--config", p])).unwrap();
    assert_eq!(
        list,
        serde_json::json!([
            {"protocol": "tcp", "port": "8081", "to": "10.244.0.2:80"},
            {"protocol": "tcp", "port": "9000-9003", "to": "10.244.0.2:8000"},
        ])
    );
    let text_list = ok(&["forward", "list", "--config", p]);
    assert!(text_list.starts_with("forwards: 2\n"), "{text_list}");
    // Delete: only the exact port or range; its flows (the open connection
    // and the hairpinned one) go with it.
    let part = cli(&["forward", "del", "tcp", "9001", "--config", p]);
    assert_eq!(part.status.code(), Some(1), "{part:?}");
    assert!(String::from_utf8_lossy(&part.stderr).contains("9000-9003"));
    let del = ok(&["forward", "del", "tcp", "8081", "--config", p]);
    assert!(
        del.starts_with("forward deleted: tcp 8081 -> 10.244.0.2:80; 2 flow(s) flushed"),
        "{del}"
    );
    assert!(connect_forward(&lab, 8081).is_err(), "still delivered");
    let mut r = connect_forward(&lab, 9000).unwrap();
    echo(&mut r, b"the range stays");
    ok(&["forward", "del", "tcp", "9000-9003", "--config", p]);
    let list: serde_json::Value =
        serde_json::from_str(&ok(&["forward", "list", "-o", "json", "--config", p])).unwrap();
    assert_eq!(list, serde_json::json!([]));
    // Added again at once (its port is in quarantine, which a forward may
    // take back), and delivered again.
    ok(&[
        "forward",
        "add",
        "tcp",
        "8081",
        "10.244.0.2:80",
        "--config",
        p,
    ]);
    let mut c = connect_forward(&lab, 8081).unwrap();
    echo(&mut c, b"back");
    drop(gw);
}

#[test]
fn sighup_applies_the_file_and_refuses_what_needs_a_restart() {
    if !root() {
        return;
    }
    let lab = Lab::new("ops-hup").unwrap();
    let text = config_text(&lab, "hup", "");
    let file = TempConfig::new("hup", &text);
    let gw = run(&lab, &file, &text);
    let p = file.path();
    pod_server(&lab, 80);
    // A masqueraded TCP connection from the pod that stays up throughout.
    let listener = tcp_listen(&lab.ext, SocketAddrV4::new(SERVER_IP, 7000));
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut b = [0u8; 256];
        while let Ok(n) = s.read(&mut b) {
            if n == 0 || s.write_all(&b[..n]).is_err() {
                break;
            }
        }
    });
    let mut conn = tcp_connect(&lab.pod, SocketAddrV4::new(SERVER_IP, 7000)).unwrap();
    echo(&mut conn, b"before");
    // A forward added at run time, not in the file.
    ok(&[
        "forward",
        "add",
        "tcp",
        "8082",
        "10.244.0.2:80",
        "--config",
        p,
    ]);
    connect_forward(&lab, 8082).unwrap();
    // The file gains a forward (to the same target: the run-time one goes,
    // so the target is free for it) and a timeout.
    let forward = "[[forward]]\nprotocol = \"tcp\"\nport = 8081\nto = \"10.244.0.2:80\"\n";
    let grown = format!("{text}{forward}[nat.timeouts]\nudp = \"2s\"\n");
    std::fs::write(&file.0, &grown).unwrap();
    gw.signal("-HUP");
    let err = gw.wait_stderr("tapnat: reload: applied", 1);
    assert!(
        err.contains("applied forward, nat.timeouts.udp (1 forward(s) added, 1 removed)"),
        "{err}"
    );
    assert!(
        err.contains("forward tcp 8082 -> 10.244.0.2:80 was added at run time")
            && err.contains("the file wins"),
        "{err}"
    );
    let mut c = connect_forward(&lab, 8081).unwrap();
    echo(&mut c, b"new forward");
    assert!(
        connect_forward(&lab, 8082).is_err(),
        "run-time forward kept"
    );
    echo(&mut conn, b"after the reload");
    // The new UDP timeout holds for new flows (the default is 300 s).
    let pod_udp = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, 42000));
    pod_udp
        .send_to(b"x", SocketAddrV4::new(SERVER_IP, 5000))
        .unwrap();
    assert_eq!(count(&file, Some("udp")), 1);
    std::thread::sleep(Duration::from_millis(2600));
    assert_eq!(count(&file, Some("udp")), 0, "udp flow outlived 2 s");
    let list: serde_json::Value =
        serde_json::from_str(&ok(&["forward", "list", "-o", "json", "--config", p])).unwrap();
    assert_eq!(
        list,
        serde_json::json!([{"protocol": "tcp", "port": "8081", "to": "10.244.0.2:80"}])
    );
    // A change that needs a restart refuses the whole reload: the forward
    // added beside it is not applied either.
    let more = "[[forward]]\nprotocol = \"udp\"\nport = 5353\nto = \"10.244.0.2:53\"\n";
    let moved = grown.replace("[pod]\n", "[pod]\ntap = \"tapnat9\"\n") + more;
    std::fs::write(&file.0, moved).unwrap();
    gw.signal("-HUP");
    let err = gw.wait_stderr("tapnat: error: reload: nothing changed", 1);
    assert!(
        err.contains(
            "tapnat: error: reload: pod.tap cannot change while running; restart to apply"
        ),
        "{err}"
    );
    // A file that does not parse changes nothing either.
    std::fs::write(&file.0, format!("{grown}[[forward]\n")).unwrap();
    gw.signal("-HUP");
    let err = gw.wait_stderr("nothing changed", 2);
    assert!(err.contains(&format!("config file {p}")), "{err}");
    // (Clients cannot read the broken file: they ask by the socket's path.)
    let control = control_path("hup");
    let control = control.to_str().unwrap();
    let list: serde_json::Value = serde_json::from_str(&ok(&[
        "forward",
        "list",
        "-o",
        "json",
        "--control",
        control,
    ]))
    .unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert!(lab.pod.ip("link show tapnat0").is_ok());
    echo(&mut conn, b"after the refusals");
    echo(&mut c, b"forward after the refusals");
    let mut c2 = connect_forward(&lab, 8081).unwrap();
    echo(&mut c2, b"a new connection");
    let err = gw.stop();
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn sighup_applies_a_new_masquerade_exclusion() {
    if !root() {
        return;
    }
    let lab = Lab::new("ops-masq").unwrap();
    let text = config_text(&lab, "masq", "");
    let file = TempConfig::new("masq", &text);
    let gw = run(&lab, &file, &text);
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5000));
    let seen_from = |port: u16| {
        let cli = udp_in(&lab.pod, SocketAddrV4::new(POD_IP, port));
        cli.send_to(b"hi", SocketAddrV4::new(SERVER_IP, 5000))
            .unwrap();
        let mut b = [0u8; 8];
        let (_, peer) = srv.recv_from(&mut b).unwrap();
        peer
    };
    let before = seen_from(43000);
    assert_eq!(before.ip(), std::net::IpAddr::V4(GATEWAY_UPLINK_IP));
    // The server's network becomes an excluded (routed) destination.
    let rules = "[[masquerade]]\nsource = \"10.244.0.0/16\"\n\
                 exclude = [\"10.244.0.0/16\", \"198.51.100.0/24\"]\n";
    std::fs::write(&file.0, format!("{text}{rules}")).unwrap();
    gw.signal("-HUP");
    let err = gw.wait_stderr("tapnat: reload: applied", 1);
    assert!(err.contains("applied masquerade ("), "{err}");
    let after = seen_from(43001);
    assert_eq!(
        after,
        SocketAddrV4::new(POD_IP, 43001).into(),
        "not routed untranslated after the reload"
    );
    gw.stop();
}

/// A client command left running (`tapnat events`, `tapnat capture`), its
/// stdout collected line by line; killed by PID and waited for on drop.
struct Streaming {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Streaming {
    fn new(args: &[&str]) -> Streaming {
        let mut child = tapnat()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        Streaming { child, lines }
    }

    /// Waits up to `secs` for a line that `pred` accepts; returns it.
    fn wait_line(&self, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no such line in {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON lines of a file (none if it is missing).
fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn events_show_new_and_destroyed_flows_and_the_mapping_log_rotates() {
    if !root() {
        return;
    }
    let lab = Lab::new("ops-ev").unwrap();
    let log = std::env::temp_dir().join(format!("tapnat-ops-maplog-{}.json", std::process::id()));
    let rotated = log.with_extension("json.1");
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&rotated);
    let extra = format!(
        "[nat.timeouts]\nudp = \"2s\"\n[log]\nmappings = \"{}\"\n",
        log.display()
    );
    let text = config_text(&lab, "ev", &extra);
    let file = TempConfig::new("ev", &text);
    let gw = run(&lab, &file, &text);
    let p = file.path();
    let json = Streaming::new(&["events", "-o", "json", "--config", p]);
    let text_events =
        Streaming::new(&["events", "--control", control_path("ev").to_str().unwrap()]);
    // Subscribed once the tables journal: within a worker loop iteration.
    std::thread::sleep(Duration::from_millis(500));
    let srv = udp_in(&lab.ext, SocketAddrV4::new(SERVER_IP, 5000));
    assert!(udp_round_trip(&lab, &srv, 42000));
    let is = |l: &str, event: &str, sport: u16| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["event"] == event && v["sport"] == sport && v["proto"] == "udp"
    };
    let new: serde_json::Value =
        serde_json::from_str(&json.wait_line(5, |l| is(l, "new", 42000))).unwrap();
    assert_eq!(new["src"], POD_IP.to_string(), "{new}");
    assert_eq!(new["dst"], SERVER_IP.to_string(), "{new}");
    assert_eq!(new["dport"], 5000, "{new}");
    assert_eq!(new["ext_addr"], GATEWAY_UPLINK_IP.to_string(), "{new}");
    assert!(new.get("reason").is_none(), "{new}");
    let ext_port = new["ext_port"].as_u64().unwrap();
    // The flow expires after 2 s idle.
    let gone: serde_json::Value =
        serde_json::from_str(&json.wait_line(8, |l| is(l, "destroy", 42000))).unwrap();
    assert_eq!(gone["reason"], "timeout", "{gone}");
    assert_eq!(gone["packets_in2out"], 1, "{gone}");
    assert_eq!(gone["packets_out2in"], 1, "{gone}");
    // The text form, like conntrack -E.
    text_events.wait_line(2, |l| {
        l == format!(
            "[NEW] udp src={POD_IP} dst={SERVER_IP} sport=42000 dport=5000 \
             [translated src={GATEWAY_UPLINK_IP} sport={ext_port}]"
        )
    });
    text_events.wait_line(2, |l| {
        l.starts_with("[DESTROY] udp src=10.244.0.2") && l.ends_with("reason=timeout")
    });
    // A flushed flow says so.
    assert!(udp_round_trip(&lab, &srv, 42001));
    json.wait_line(5, |l| is(l, "new", 42001));
    ok(&["flush", "--port", "42001", "--config", p]);
    let flushed: serde_json::Value =
        serde_json::from_str(&json.wait_line(5, |l| is(l, "destroy", 42001))).unwrap();
    assert_eq!(flushed["reason"], "flush", "{flushed}");
    // The mapping log: made and released, no destination.
    let lines = json_lines(&log);
    let of = |event: &str, port: u16| {
        lines
            .iter()
            .find(|l| l["event"] == event && l["inside"] == format!("{POD_IP}:{port}"))
            .cloned()
            .unwrap_or_else(|| panic!("no {event} for {port} in {lines:?}"))
    };
    let made = of("mapping-new", 42000);
    assert_eq!(
        made["outside"],
        format!("{GATEWAY_UPLINK_IP}:{ext_port}"),
        "{made}"
    );
    assert_eq!(made["proto"], "udp");
    assert!(made["time"].as_f64().unwrap() > 1.7e9, "{made}");
    of("mapping-end", 42000);
    of("mapping-end", 42001);
    assert!(
        lines.iter().all(|l| l.get("destination").is_none()),
        "{lines:?}"
    );
    // Rotation: moved away, SIGHUP, and new mappings go to a new file.
    std::fs::rename(&log, &rotated).unwrap();
    gw.signal("-HUP");
    gw.wait_stderr("tapnat: reload:", 1);
    assert!(udp_round_trip(&lab, &srv, 42002));
    json.wait_line(5, |l| is(l, "new", 42002));
    let deadline = Instant::now() + Duration::from_secs(3);
    while json_lines(&log).is_empty() {
        assert!(Instant::now() < deadline, "nothing in the reopened log");
        std::thread::sleep(Duration::from_millis(20));
    }
    let fresh = json_lines(&log);
    assert_eq!(fresh[0]["event"], "mapping-new", "{fresh:?}");
    assert_eq!(fresh[0]["inside"], format!("{POD_IP}:42002"), "{fresh:?}");
    assert!(
        json_lines(&rotated)
            .iter()
            .all(|l| l["inside"] != format!("{POD_IP}:42002")),
        "written to the rotated file"
    );
    // log.destinations changes live: sessions are logged with theirs.
    std::fs::write(&file.0, format!("{text}destinations = true\n")).unwrap();
    gw.signal("-HUP");
    let err = gw.wait_stderr("tapnat: reload: applied log.destinations", 1);
    assert!(!err.contains("error"), "{err}");
    assert!(udp_round_trip(&lab, &srv, 42003));
    let deadline = Instant::now() + Duration::from_secs(3);
    let session = loop {
        let found = json_lines(&log)
            .into_iter()
            .find(|l| l["event"] == "session-new" && l["inside"] == format!("{POD_IP}:42003"));
        if let Some(l) = found {
            break l;
        }
        assert!(Instant::now() < deadline, "no session line");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        session["destination"],
        format!("{SERVER_IP}:5000"),
        "{session}"
    );
    // Nothing was lost with readers that keep up; the rules counted it.
    let stats: serde_json::Value =
        serde_json::from_str(&ok(&["stats", "-o", "json", "--config", p])).unwrap();
    assert_eq!(stats["counters"]["events_lost"], 0, "{stats}");
    let rule = &stats["rules"][0];
    assert_eq!(rule["rule"], "masquerade[0]", "{stats}");
    assert!(rule["packets"].as_u64().unwrap() >= 6, "{stats}");
    assert!(rule["bytes"].as_u64().unwrap() >= 6 * 32, "{stats}");
    let text_stats = ok(&["stats", "--config", p]);
    assert!(
        text_stats.contains("rules:\n  masquerade[0]"),
        "{text_stats}"
    );
    let prom = ok(&["stats", "-o", "prometheus", "--config", p]);
    let line = prom
        .lines()
        .find(|l| l.starts_with("tapnat_rule_packets_total{rule=\"masquerade[0]\""))
        .unwrap_or_else(|| panic!("{prom}"));
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(n, rule["packets"].as_u64().unwrap());
    drop(json);
    drop(text_events);
    let err = gw.stop();
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&rotated);
}

/// The records of a classic pcap file (little-endian, microseconds):
/// the link type and each frame. Written here, not taken from the
/// gateway's writer, so the test checks the format itself.
fn read_pcap(bytes: &[u8]) -> (u32, Vec<Vec<u8>>) {
    assert!(bytes.len() >= 24, "no pcap header");
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    assert_eq!(u32_at(bytes, 0), 0xa1b2_c3d4, "magic");
    assert_eq!(&bytes[4..8], &[2, 0, 4, 0], "version 2.4");
    let link = u32_at(bytes, 20);
    let mut frames = Vec::new();
    let mut at = 24;
    while at < bytes.len() {
        let incl = u32_at(bytes, at + 8) as usize;
        let orig = u32_at(bytes, at + 12) as usize;
        assert_eq!(incl, orig, "frame cut");
        frames.push(bytes[at + 16..at + 16 + incl].to_vec());
        at += 16 + incl;
    }
    assert_eq!(at, bytes.len(), "trailing bytes");
    (link, frames)
}

/// (ICMP type, source, destination) of an Ethernet frame carrying an
/// IPv4 ICMP echo request or reply.
fn echo_of(frame: &[u8]) -> Option<(u8, std::net::Ipv4Addr, std::net::Ipv4Addr)> {
    if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 1 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let ty = frame[14 + ihl];
    let ip =
        |at: usize| std::net::Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
    matches!(ty, 0 | 8).then(|| (ty, ip(14 + 12), ip(14 + 16)))
}

#[test]
fn capture_records_frames_before_and_after_translation() {
    if !root() {
        return;
    }
    let lab = Lab::new("ops-cap").unwrap();
    let text = config_text(&lab, "cap", "");
    let file = TempConfig::new("cap", &text);
    let gw = run(&lab, &file, &text);
    let p = file.path();
    let mut pinger = Pinger::new(&lab.pod).unwrap();
    // Neighbours resolved first (the capture would see the ARP too).
    assert_eq!(
        pinger
            .ping(SERVER_IP, 1, Duration::from_secs(2))
            .unwrap()
            .len(),
        1
    );
    let pcap = std::env::temp_dir().join(format!("tapnat-ops-cap-{}.pcap", std::process::id()));
    let pcap_s = pcap.to_str().unwrap().to_string();
    let mut both = tapnat()
        .args([
            "capture",
            "--side",
            "both",
            "--seconds",
            "3",
            "-w",
            &pcap_s,
            "--config",
            p,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // One capture at a time.
    let second = cli(&["capture", "-w", "-", "--config", p]);
    assert_eq!(second.status.code(), Some(1), "{second:?}");
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("a capture is already running"),
        "{second:?}"
    );
    assert_eq!(
        pinger
            .ping(SERVER_IP, 2, Duration::from_secs(2))
            .unwrap()
            .len(),
        2
    );
    let status = both.wait().unwrap();
    assert!(status.success(), "{status}");
    let (link, frames) = read_pcap(&std::fs::read(&pcap).unwrap());
    assert_eq!(link, 1, "Ethernet");
    let echoes: Vec<_> = frames.iter().filter_map(|f| echo_of(f)).collect();
    let n = |ty: u8, src, dst| echoes.iter().filter(|e| **e == (ty, src, dst)).count();
    // Read from the pod, before translation; written to the uplink, after.
    assert_eq!(n(8, POD_IP, SERVER_IP), 2, "{echoes:?}");
    assert_eq!(n(8, GATEWAY_UPLINK_IP, SERVER_IP), 2, "{echoes:?}");
    // The replies: read from the uplink, written to the pod translated back.
    assert_eq!(n(0, SERVER_IP, GATEWAY_UPLINK_IP), 2, "{echoes:?}");
    assert_eq!(n(0, SERVER_IP, POD_IP), 2, "{echoes:?}");
    assert_eq!(echoes.len(), 8, "{echoes:?}");
    // tcpdump, where it is installed, reads the file as well.
    if let Ok(out) = Command::new("tcpdump").args(["-n", "-r", &pcap_s]).output() {
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("ICMP echo request"), "{text}");
    }
    // `-w -` and `--count`: one side only, stops after N frames.
    let mut pod_only = tapnat()
        .args([
            "capture", "--side", "uplink", "--count", "2", "-w", "-", "--config", p,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        pinger
            .ping(SERVER_IP, 1, Duration::from_secs(2))
            .unwrap()
            .len(),
        1
    );
    let mut out = Vec::new();
    pod_only
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    assert!(pod_only.wait().unwrap().success());
    let (_, frames) = read_pcap(&out);
    let echoes: Vec<_> = frames.iter().filter_map(|f| echo_of(f)).collect();
    assert_eq!(
        echoes,
        [
            (8, GATEWAY_UPLINK_IP, SERVER_IP),
            (0, SERVER_IP, GATEWAY_UPLINK_IP)
        ],
        "uplink side only"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&ok(&["stats", "-o", "json", "--config", p])).unwrap();
    assert!(
        stats["counters"]["capture_frames"].as_u64().unwrap() >= 10,
        "{stats}"
    );
    assert_eq!(stats["counters"]["capture_lost"], 0, "{stats}");
    let _ = std::fs::remove_file(&pcap);
    let err = gw.stop();
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_mapping_log_that_cannot_be_opened_is_a_config_error() {
    let file = TempConfig::new(
        "maplog-bad",
        "[log]\nmappings = \"/nonexistent-tapnat-dir/m.json\"\n[pod]\ntap = \"tapnatbad0\"\n",
    );
    let out = cli(&["run", "--config", file.path()]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("log.mappings") && err.contains("/nonexistent-tapnat-dir/m.json"),
        "{err}"
    );
    // Found before any device was opened.
    assert!(!std::path::Path::new("/sys/class/net/tapnatbad0").exists());
}

#[test]
fn messages_follow_tapnat_log_and_a_closed_stderr_is_not_fatal() {
    // A UDP timeout below RFC 4787's minimum is a warning.
    let file = TempConfig::new("log-levels", "[nat.timeouts]\nudp = \"2s\"\n");
    let warned = |level: Option<&str>| {
        let mut cmd = tapnat();
        cmd.args(["check", "--config", file.path()]);
        match level {
            Some(l) => cmd.env("TAPNAT_LOG", l),
            None => cmd.env_remove("TAPNAT_LOG"),
        };
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let default = warned(None);
    assert!(
        default.starts_with("tapnat: warning: ") && default.contains("nat.timeouts.udp"),
        "{default}"
    );
    assert_eq!(warned(Some("error")), "");
    assert_eq!(warned(Some("warn")), default);
    // stderr is a pipe whose reader is gone (the write end of `true`'s
    // stdin, after it exited): every write fails with EPIPE, and the
    // command still ends with its own status, not a panic (101).
    for args in [
        vec!["check", "--config", file.path()],
        vec!["no-such-command"],
    ] {
        let mut reader = Command::new("true").stdin(Stdio::piped()).spawn().unwrap();
        let broken = reader.stdin.take().unwrap();
        reader.wait().unwrap();
        let status = tapnat()
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(broken))
            .status()
            .unwrap();
        let want = if args[0] == "check" { 0 } else { 64 };
        assert_eq!(status.code(), Some(want), "{args:?}");
    }
}
