//! `tapnat`: command line. Thin: arguments -> Config -> Gateway -> ExitCode.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crossbeam_channel::{select, unbounded, Receiver, Sender};
#[cfg(debug_assertions)]
use libc::SIGPWR;
use sd_notify::NotifyState;
#[cfg(debug_assertions)]
use signal_hook::consts::SIGUSR2;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;
use tapnat::config::{Config, ConfigError, Reason};
use tapnat::gateway::{panic_message, thread_role, Failure, Gateway, GatewayError};
use tapnat::ops::capture::{self, CaptureSpec};
use tapnat::ops::events::EventRecord;
use tapnat::ops::filter::FlowFilter;
use tapnat::ops::live::{Live, ReloadRefused};
use tapnat::ops::maplog::MapLog;
use tapnat::ops::metrics::{self, Gauges, MetricsServer};
use tapnat::ops::report::{self, Format};
use tapnat::ops::socket::{self, Access, Request, Response};
use tapnat::sandbox::{self, Role, SandboxError};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "\
tapnat: a userspace IPv4 masquerading NAT gateway between two TAP devices

usage:
  tapnat run [--config FILE] [--control PATH]
                                run the gateway in the foreground (no FILE: the embedded default);
                                SIGINT/SIGTERM stop it, SIGUSR1 prints flows and counters, SIGHUP
                                re-reads FILE and applies what can change live; it answers
                                `tapnat flows|stats` on the control socket PATH (default: control.socket)
  tapnat flows [--proto P] [--src A] [--dst A] [--port N] [--count] [-o json]
               [--config FILE | --control PATH]
                                the running gateway's flow table (like conntrack -L)
  tapnat stats [-o json|prometheus] [--config FILE | --control PATH]
                                the running gateway's counters, drops by reason
  tapnat flush [--proto P] [--src A] [--dst A] [--port N] [-o json] [--config FILE | --control PATH]
                                remove the selected flows, every flow without selectors (like
                                conntrack -D / -F); forwards stay
  tapnat forward add PROTO PORT[-LAST] ADDR[:PORT] | del PROTO PORT[-LAST] | list [-o json]
                 [--config FILE | --control PATH]
                                add, delete or list port forwards of the running gateway, checked
                                as [[forward]] entries are; a deleted forward's flows go with it
  tapnat events [-o json] [--config FILE | --control PATH]
                                one line per flow created and destroyed, with the reason (like
                                conntrack -E), until interrupted
  tapnat capture [--side pod|uplink|both] [--count N] [--seconds S] -w FILE|-
                 [--config FILE | --control PATH]
                                record frames as the gateway reads and writes them into a pcap
                                file (`-w -`: stdout, e.g. into `tcpdump -r -`)
  tapnat check [--config FILE]  validate a config and print warnings, touching no device
  tapnat demo                   build a throwaway pod and external namespace, run the gateway
                                between them and show traffic being translated (needs root)
  tapnat default-config         print the embedded default config
  tapnat bench [--reps N] [--seconds S] [--only NAME[,NAME]] [--json FILE] [--svg FILE]
               [--baseline EXE] [--install]
                                measure tapnat against kernel MASQUERADE, a bare TAP copy, pasta, slirp4netns (root)
  tapnat soak [--minutes M] [--interval S] [--connects-per-s N] [--udp-burst N]
                                a bounded run with churning flows: resident memory and live flows over time (root)

exit status: 0 clean stop, 64 bad command line, 69 a device could not be opened (or no gateway
  answers), 70 a thread of the running gateway panicked, 71 no signal handlers or cannot drop
  privileges, 74 a device (or its namespace) went away under the running gateway, 77 refused by
  the gateway, 78 bad config; killed by SIGSYS: a system call outside its seccomp filter

environment: TAPNAT_SECTION__KEY=value overrides a key (e.g. TAPNAT_POD__TAP=tap9);
  TAPNAT_LOG sets which messages are shown: error, warn, info (default), debug, trace, or
  tracing's filter directives (e.g. `tapnat=debug`)";

/// A report on stderr as it is (SIGUSR1's listing, the final counters);
/// a closed or full stderr is ignored, never fatal (`eprint!` would
/// panic). Messages go through `tracing` instead.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

/// Why tapnat exited unsuccessfully; each maps to its own exit code.
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}\n\n{USAGE}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("cannot drop privileges")]
    Sandbox(#[source] SandboxError),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot write the capture")]
    Write(#[source] std::io::Error),
    #[cfg(feature = "lab")]
    #[error("demo failed: {0}")]
    Demo(String),
    #[cfg(feature = "lab")]
    #[error("benchmark failed")]
    Bench(#[source] std::io::Error),
    #[cfg(feature = "lab")]
    #[error("soak failed")]
    Soak(#[source] std::io::Error),
    #[error("cannot reach the control socket")]
    Control(#[source] std::io::Error),
    #[error("the gateway refused: {0}")]
    Refused(String),
    /// A thread of the running gateway panicked: "worker 1 panicked at
    /// FILE:LINE:COL: MESSAGE".
    #[error("{0}")]
    Panicked(String),
    /// A device went away under the running gateway (or a thread panicked,
    /// when the panic hook's report was not there first).
    #[error(transparent)]
    Failed(Failure),
    /// The gateway understood a change (`forward add`, `forward del`) and
    /// refused it.
    #[error("{0}")]
    Rejected(String),
}

impl MainError {
    /// sysexits(3) codes, as listed in the usage text: 70 (`EX_SOFTWARE`)
    /// for a panicked thread, 74 (`EX_IOERR`) for a device that went away,
    /// so a supervisor tells them from a device that never opened (69).
    fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            MainError::Usage(_) => 64,
            MainError::Config(_) | MainError::Gateway(GatewayError::Config(_)) => 78,
            MainError::Gateway(_) => 69,
            MainError::Signals(_) | MainError::Sandbox(_) => 71,
            MainError::Thread(_) => 71,
            MainError::Write(_) => 74,
            #[cfg(feature = "lab")]
            MainError::Demo(_) | MainError::Bench(_) | MainError::Soak(_) => 1,
            MainError::Control(_) => 69,
            MainError::Refused(_) => 77,
            MainError::Panicked(_) | MainError::Failed(Failure::Panicked { .. }) => 70,
            MainError::Failed(Failure::DeviceGone { .. } | Failure::NamespaceGone { .. }) => 74,
            MainError::Rejected(_) => 1,
        })
    }
}

/// The options of a command line, wherever they stand among its words.
#[derive(Default)]
struct Flags {
    config: Option<PathBuf>,
    control: Option<PathBuf>,
    /// `-o text|json|prometheus`.
    output: Option<Format>,
    /// `--proto`, `--src`, `--dst`, `--port`.
    filter: FlowFilter,
    /// `--count`: only the number of matching flows.
    count: bool,
}

/// Which options a command takes besides `--config`/`--control`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Takes {
    /// `tapnat run`, `tapnat check`.
    Config,
    /// `tapnat stats`: `-o`.
    Output,
    /// `tapnat flows`: `-o` and the flow selectors.
    Flows,
}

fn flags(args: &[String], takes: Takes) -> Result<Flags, MainError> {
    let usage = |m: String| MainError::Usage(m);
    let mut f = Flags::default();
    let mut it = args.iter().peekable();
    while let Some(flag) = it.next() {
        let client = takes != Takes::Config;
        match flag.as_str() {
            "--count" if takes == Takes::Flows => {
                f.count = true;
                continue;
            }
            "-o" | "--output" if client => {
                let v = it
                    .next()
                    .ok_or_else(|| usage(format!("`{flag}` needs a value")))?;
                let format = Format::parse(v)
                    .filter(|o| *o != Format::Prometheus || takes == Takes::Output)
                    .ok_or_else(|| usage(format!("`{flag} {v}`: unknown output format")))?;
                f.output = Some(format);
                continue;
            }
            _ => {}
        }
        if takes == Takes::Flows {
            match f.filter.take(flag, it.peek().copied()) {
                Ok(true) => {
                    it.next();
                    continue;
                }
                Ok(false) => {}
                Err(e) => return Err(usage(e.to_string())),
            }
        }
        let slot = match flag.as_str() {
            "--config" | "-c" => &mut f.config,
            "--control" => &mut f.control,
            _ => return Err(usage(format!("unexpected argument `{flag}`"))),
        };
        let Some(value) = it.next() else {
            return Err(usage(format!("`{flag}` needs a value")));
        };
        if slot.replace(PathBuf::from(value)).is_some() {
            return Err(usage(format!("`{flag}` given twice")));
        }
    }
    Ok(f)
}

/// The control socket a client asks: `--control PATH`, else
/// `control.socket` of the `--config FILE` the gateway was started with,
/// else the default.
fn control_path(f: &Flags) -> Result<PathBuf, MainError> {
    if let Some(path) = &f.control {
        return Ok(path.clone());
    }
    match &f.config {
        Some(_) => Ok(load(f)?.control.socket),
        None => Ok(PathBuf::from(socket::DEFAULT_PATH)),
    }
}

/// Who may use the control socket, from `control.group`; a group that does
/// not exist is a config error (exit 78), found before any device is opened.
fn control_access(config: &Config) -> Result<Access, MainError> {
    match &config.control.group {
        None => Ok(Access::Owner),
        Some(name) => socket::group_access(name).map_err(|_| {
            MainError::Config(ConfigError::Invalid {
                key: "control.group".into(),
                reason: Reason::NoSuchGroup { name: name.clone() },
            })
        }),
    }
}

/// The user `run.run_as` names; one that does not exist is a config error
/// (exit 78), found before any device is opened.
fn run_as(config: &Config) -> Result<Option<sandbox::User>, MainError> {
    let Some(name) = &config.run.run_as else {
        return Ok(None);
    };
    sandbox::lookup_user(name).map(Some).map_err(|_| {
        MainError::Config(ConfigError::Invalid {
            key: "run.run_as".into(),
            reason: Reason::NoSuchUser { name: name.clone() },
        })
    })
}

/// `tapnat flows` and `tapnat stats`: ask the gateway, print its answer.
fn client(what: &str, args: &[String]) -> Result<(), MainError> {
    let takes = if what == "flows" {
        Takes::Flows
    } else {
        Takes::Output
    };
    let f = flags(args, takes)?;
    let request = if what == "flows" {
        Request::Flows {
            filter: f.filter.clone(),
        }
    } else {
        Request::Stats
    };
    let output = f.output.unwrap_or(Format::Text);
    let text = match socket::ask(&control_path(&f)?, &request).map_err(MainError::Control)? {
        Response::Error(e) => return Err(MainError::Refused(e)),
        Response::Flows(flows) if f.count => match output {
            Format::Json => report::json(&serde_json::json!({ "count": flows.len() })),
            _ => format!("{}\n", flows.len()),
        },
        Response::Flows(flows) => match output {
            Format::Json => report::json(&flows),
            _ => report::flow_lines(&flows),
        },
        Response::Stats(stats) => match output {
            Format::Json => report::json(&stats),
            Format::Prometheus => report::stats_prometheus(&stats),
            Format::Text => report::stats_lines(&stats),
        },
        other => return Err(unexpected(&other)),
    };
    print!("{text}");
    Ok(())
}

/// An answer that does not fit the request (a gateway of another version).
fn unexpected(r: &Response) -> MainError {
    MainError::Control(std::io::Error::other(format!(
        "unexpected answer from the gateway: {r:?}"
    )))
}

/// Asks the gateway `f` names; an error answer is the command's failure.
fn ask(f: &Flags, request: &Request) -> Result<Response, MainError> {
    match socket::ask(&control_path(f)?, request).map_err(MainError::Control)? {
        Response::Error(e) => Err(MainError::Refused(e)),
        Response::Failed(e) => Err(MainError::Rejected(e)),
        r => Ok(r),
    }
}

/// `tapnat flush [--proto P] [--src A] [--dst A] [--port N] [-o json]`:
/// like `conntrack -D` with selectors, `conntrack -F` without.
fn flush(args: &[String]) -> Result<(), MainError> {
    let f = flags(args, Takes::Flows)?;
    if f.count {
        return Err(MainError::Usage("`tapnat flush` takes no `--count`".into()));
    }
    let request = Request::Flush {
        filter: f.filter.clone(),
    };
    let n = match ask(&f, &request)? {
        Response::Flushed(n) => n,
        other => return Err(unexpected(&other)),
    };
    match f.output.unwrap_or(Format::Text) {
        Format::Json => print!("{}", report::json(&serde_json::json!({ "flushed": n }))),
        _ => println!("{n} flow(s) flushed"),
    }
    Ok(())
}

/// `tapnat forward add PROTO PORT TO | del PROTO PORT | list [-o json]`,
/// with `--config FILE` or `--control PATH` anywhere on the line.
fn forward(args: &[String]) -> Result<(), MainError> {
    let mut words = Vec::new();
    let mut options = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a.starts_with('-') {
            options.push(a.clone());
            if matches!(
                a.as_str(),
                "--config" | "-c" | "--control" | "-o" | "--output"
            ) {
                options.extend(it.next().cloned());
            }
        } else {
            words.push(a.as_str());
        }
    }
    let f = flags(&options, Takes::Output)?;
    if f.output == Some(Format::Prometheus) {
        return Err(MainError::Usage(
            "`-o prometheus`: unknown output format".into(),
        ));
    }
    let request =
        match words.as_slice() {
            ["add", protocol, port, to] => Request::ForwardAdd {
                protocol: protocol.to_string(),
                port: port.to_string(),
                to: to.to_string(),
            },
            ["del", protocol, port] => Request::ForwardDel {
                protocol: protocol.to_string(),
                port: port.to_string(),
            },
            ["list"] => Request::ForwardList,
            _ => return Err(MainError::Usage(
                "expected `forward add PROTO PORT TO`, `forward del PROTO PORT` or `forward list`"
                    .into(),
            )),
        };
    let json = f.output == Some(Format::Json);
    match ask(&f, &request)? {
        Response::Forwards(list) if json => print!("{}", report::json(&list)),
        Response::Forwards(list) => print!("{}", report::forward_lines(&list)),
        Response::Forward {
            forward,
            flows_flushed,
        } if json => print!(
            "{}",
            report::json(
                &serde_json::json!({ "forward": forward, "flows_flushed": flows_flushed })
            )
        ),
        Response::Forward {
            forward,
            flows_flushed,
        } => {
            let what = if words[0] == "add" {
                "added"
            } else {
                "deleted"
            };
            let flushed = if words[0] == "del" {
                format!("; {flows_flushed} flow(s) flushed with it")
            } else {
                String::new()
            };
            println!(
                "forward {what}: {} {} -> {}{flushed}",
                forward.protocol, forward.port, forward.to
            );
        }
        other => return Err(unexpected(&other)),
    }
    Ok(())
}

/// `tapnat events [-o json]`: every flow created and destroyed from now
/// on, one line each (like `conntrack -E`), until interrupted or the
/// gateway stops.
fn events(args: &[String]) -> Result<(), MainError> {
    use std::io::{BufRead as _, Write as _};
    let f = flags(args, Takes::Output)?;
    if f.output == Some(Format::Prometheus) {
        return Err(MainError::Usage(
            "`-o prometheus`: unknown output format".into(),
        ));
    }
    let json = f.output == Some(Format::Json);
    let (first, reader) = socket::open_stream(&control_path(&f)?, &socket::Request::Events)
        .map_err(MainError::Control)?;
    match first {
        Response::Subscribed => {}
        Response::Error(e) => return Err(MainError::Refused(e)),
        other => return Err(unexpected(&other)),
    }
    let mut out = std::io::stdout().lock();
    for line in reader.lines() {
        let line = line.map_err(MainError::Control)?;
        let r: EventRecord = match serde_json::from_str(&line) {
            Ok(Response::Event(r)) => r,
            Ok(other) => return Err(unexpected(&other)),
            Err(e) => return Err(MainError::Control(std::io::Error::other(e))),
        };
        let text = if json {
            serde_json::to_string(&r).unwrap_or_default()
        } else {
            r.line()
        };
        // A reader that went away (`| head`) ends the command quietly.
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// `tapnat capture [--side pod|uplink|both] [--count N] [--seconds S]
/// -w FILE|-`.
fn capture_cmd(args: &[String]) -> Result<(), MainError> {
    let usage = |m: String| MainError::Usage(m);
    let mut spec = CaptureSpec {
        side: "both".into(),
        count: None,
        seconds: None,
    };
    let mut to: Option<String> = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| usage(format!("`{a}` needs a value")))
        };
        match a.as_str() {
            "--side" => spec.side = value()?,
            "--count" => {
                let v = value()?;
                spec.count =
                    Some(v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        usage(format!("`--count {v}`: expected a positive number"))
                    })?);
            }
            "--seconds" => {
                let v = value()?;
                spec.seconds = Some(
                    v.parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .ok_or_else(|| usage(format!("`--seconds {v}`: expected seconds > 0")))?,
                );
            }
            "-w" => to = Some(value()?),
            _ => {
                rest.push(a.clone());
                if matches!(a.as_str(), "--config" | "-c" | "--control") {
                    rest.extend(it.next().cloned());
                }
            }
        }
    }
    if spec.sides().is_none() {
        return Err(usage(format!(
            "`--side {}`: expected pod, uplink or both",
            spec.side
        )));
    }
    let Some(to) = to else {
        return Err(usage("`tapnat capture` needs `-w FILE` (or `-w -`)".into()));
    };
    let f = flags(&rest, Takes::Config)?;
    let request = socket::Request::Capture { spec };
    let (first, mut reader) =
        socket::open_stream(&control_path(&f)?, &request).map_err(MainError::Control)?;
    match first {
        Response::Capturing => {}
        Response::Error(e) => return Err(MainError::Refused(e)),
        Response::Failed(e) => return Err(MainError::Rejected(e)),
        other => return Err(unexpected(&other)),
    }
    let n = if to == "-" {
        capture::copy_records(&mut reader, &mut std::io::stdout().lock())
    } else {
        let mut file = std::fs::File::create(&to).map_err(MainError::Write)?;
        capture::copy_records(&mut reader, &mut file)
    };
    match n {
        Ok(n) => {
            tracing::info!("capture: {n} frame(s) written to {to}");
            Ok(())
        }
        // `-w -` into a reader that stopped (`tcpdump -c`) ends it quietly.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(MainError::Write(e)),
    }
}

/// SIGHUP: re-reads `--config FILE` and applies what can change live, all
/// or nothing; every outcome is one or more `tapnat: reload:` lines.
fn reload(f: &Flags, live: &Live) {
    let Some(path) = &f.config else {
        tracing::warn!("reload: started without --config, no file to re-read; nothing changed");
        reopen_log(live);
        return;
    };
    let config = match Config::load(Some(path)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload: {e}; nothing changed");
            reopen_log(live);
            return;
        }
    };
    for w in config.warnings() {
        tracing::warn!("reload: {w}");
    }
    match live.reload(config) {
        Ok(r) if r.changed.is_empty() => tracing::info!("reload: {} unchanged", path.display()),
        Ok(r) => {
            tracing::info!(
                "reload: applied {} ({} forward(s) added, {} removed)",
                r.changed.join(", "),
                r.forwards_added,
                r.forwards_removed
            );
            for fwd in &r.run_time_removed {
                let rec = tapnat::ops::record::ForwardRecord::from(fwd);
                tracing::warn!(
                    "reload: forward {} {} -> {} was added at run time and is not in {}: \
                     removed (the file wins, as with iptables-restore)",
                    rec.protocol,
                    rec.port,
                    rec.to,
                    path.display()
                );
            }
        }
        Err(ReloadRefused::Restart(keys)) => {
            for k in keys {
                tracing::error!("reload: {k} cannot change while running; restart to apply");
            }
            tracing::error!("reload: nothing changed");
        }
        Err(ReloadRefused::Forwards(why)) => {
            tracing::error!("reload: forward: {why}; nothing changed");
        }
    }
    reopen_log(live);
}

/// SIGHUP: the mapping log is reopened (log rotation), as the running
/// config's `[log]` says.
fn reopen_log(live: &Live) {
    if let Err(e) = live.reopen_log() {
        tracing::error!("reload: {e}; the mapping log stays as it was");
    }
}

fn load(f: &Flags) -> Result<Config, MainError> {
    let config = Config::load(f.config.as_deref())?;
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    Ok(config)
}

/// What the main thread of `tapnat run` waits for besides the gateway's
/// own failures.
enum Event {
    Signal(i32),
    /// A panic in one of tapnat's threads, as the panic hook saw it.
    Panicked(String),
}

/// Reports a panic in any tapnat thread (gateway, control socket, metrics)
/// to the main thread as one line, instead of the default hook's text; the
/// main thread then stops the gateway and exits 70. A panic elsewhere (the
/// main thread) gets the default hook.
fn report_panics(events: Sender<Event>) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        match thread.name().and_then(thread_role) {
            Some(role) => {
                let at = info
                    .location()
                    .map(|l| format!(" at {l}"))
                    .unwrap_or_default();
                let message = panic_message(info.payload());
                let _ = events.send(Event::Panicked(format!("{role} panicked{at}: {message}")));
            }
            None => default_hook(info),
        }
    }));
}

/// Forwards signals into `events` on a thread of their own, so that the
/// main thread waits for a signal and a gateway failure at once.
fn forward_signals(mut signals: Signals, events: Sender<Event>) -> Result<(), MainError> {
    std::thread::Builder::new()
        .name("tapnat-signals".into())
        .spawn(move || {
            sandbox::enter(Role::Signals);
            for sig in signals.forever() {
                if events.send(Event::Signal(sig)).is_err() {
                    break;
                }
            }
        })
        .map(drop)
        .map_err(MainError::Signals)
}

/// Waits until a signal asks the gateway to stop (`Ok`) or it failed by
/// itself (`Err`); SIGUSR1 prints flows and counters on the way.
fn wait(gw: &Gateway, events: &Receiver<Event>, reload: impl Fn()) -> Result<(), MainError> {
    let failures = gw.failures();
    loop {
        select! {
            recv(events) -> e => match e {
                Ok(Event::Signal(SIGHUP)) => reload(),
                Ok(Event::Signal(SIGUSR1)) => {
                    say_raw!("{}", report::flows(&gw.flows()));
                    say_raw!("{}", report::stats(&gw.stats()));
                }
                // TEST-ONLY fault hook (debug builds only): SIGUSR2 makes
                // the last worker panic; see `Gateway::inject_panic`.
                #[cfg(debug_assertions)]
                Ok(Event::Signal(SIGUSR2)) => gw.inject_panic(gw.workers() - 1),
                // TEST-ONLY, likewise: SIGPWR makes the last worker make a
                // system call outside its seccomp filter.
                #[cfg(debug_assertions)]
                Ok(Event::Signal(SIGPWR)) => gw.inject_forbidden_syscall(gw.workers() - 1),
                Ok(Event::Signal(_)) | Err(_) => return Ok(()),
                Ok(Event::Panicked(text)) => return Err(MainError::Panicked(text)),
            },
            recv(failures) -> f => {
                let Ok(f) = f else { return Ok(()) };
                // The panic hook's line names the place as well; prefer it.
                if let Failure::Panicked { .. } = f {
                    let hooked = events.try_iter().find_map(|e| match e {
                        Event::Panicked(text) => Some(text),
                        Event::Signal(_) => None,
                    });
                    if let Some(text) = hooked {
                        return Err(MainError::Panicked(text));
                    }
                }
                return Err(MainError::Failed(f));
            },
        }
    }
}

fn run(args: &[String]) -> Result<(), MainError> {
    let f = flags(args, Takes::Config)?;
    let config = load(&f)?;
    let access = control_access(&config)?;
    // A mapping log that cannot be written is a config error, found before
    // any device is opened.
    let maplog = match &config.log.mappings {
        None => None,
        Some(path) => Some(MapLog::open(path, config.log.destinations).map_err(|e| {
            MainError::Config(ConfigError::Invalid {
                key: "log.mappings".into(),
                reason: Reason::CannotOpen {
                    path: path.display().to_string(),
                    error: e.to_string(),
                },
            })
        })?),
    };
    // Every thread locks itself down as it starts, the main thread once the
    // sockets are bound (see `tapnat::sandbox`).
    sandbox::prepare(run_as(&config)?, config.run.seccomp).map_err(MainError::Sandbox)?;
    #[cfg(not(debug_assertions))]
    let signals = Signals::new([SIGINT, SIGTERM, SIGUSR1, SIGHUP]).map_err(MainError::Signals)?;
    #[cfg(debug_assertions)]
    let signals = Signals::new([SIGINT, SIGTERM, SIGUSR1, SIGHUP, SIGUSR2, SIGPWR])
        .map_err(MainError::Signals)?;
    let signal_handle = signals.handle();
    let (events_tx, events) = unbounded();
    report_panics(events_tx.clone());
    forward_signals(signals, events_tx)?;
    let gw = Gateway::start(&config)?;
    let path = f
        .control
        .clone()
        .unwrap_or_else(|| config.control.socket.clone());
    // The gateway runs without its control socket rather than not at all.
    let live = Arc::new(Live::new(gw.observer(), &config, maplog).map_err(MainError::Thread)?);
    let _control = match socket::ControlSocket::serve(&path, access, live.clone()) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("no control socket at {}: {e}", path.display());
            None
        }
    };
    // Likewise without its metrics endpoint.
    let limit = config.nat.max_flows as u64;
    let _metrics = config.metrics.listen.and_then(|addr| {
        let observer = gw.observer();
        let live = live.clone();
        match MetricsServer::serve(addr.into(), move || {
            let (fragments_tracked, fragments_held) = observer.fragment_counts();
            let gauges = Gauges {
                entries: observer.flow_count(),
                limit,
                fragments_tracked,
                fragments_held,
                neighbours: observer.neighbour_count(),
                dhcp_lease_seconds: observer.addressing().dhcp.then(|| {
                    observer
                        .lease()
                        .map_or(0, |l| l.secs_left(observer.now_ms()))
                }),
            };
            let stats = observer.stats();
            let mut out = metrics::exposition(&stats, Some(gauges));
            metrics::rules(&mut out, &live.rule_records(&stats));
            out
        }) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("no metrics at {addr}: {e}");
                None
            }
        }
    });
    for w in gw.warnings() {
        tracing::warn!("{w}");
    }
    // Set up: the main thread gives up its privilege last.
    sandbox::try_enter(Role::Main).map_err(MainError::Sandbox)?;
    let a = gw.addressing();
    // With DHCP the address and next hop come later (logged then).
    let (uplink_addr, via) = if a.has_address() {
        (a.uplink_net.to_string(), a.uplink_gateway.to_string())
    } else {
        ("dhcp".to_string(), "the lease's router".to_string())
    };
    tracing::info!(
        "running: pod {} {} ({}), uplink {} {} ({}) via {}; {} worker(s){}",
        config.pod.tap,
        a.pod_net,
        a.pod_mac,
        gw.uplink_name(),
        uplink_addr,
        a.uplink_mac,
        via,
        gw.workers(),
        if gw.workers() > 1 && !gw.steering() {
            " (no eBPF queue steering: a new flow's first packets may take a hand-off)"
        } else {
            ""
        }
    );
    // systemd `Type=notify`: ready once the devices are up and the workers
    // run (a no-op without $NOTIFY_SOCKET).
    let status = format!("forwarding {} -> {}", a.pod_net, uplink_addr);
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    let outcome = wait(&gw, &events, || reload(&f, &live));
    signal_handle.close();
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    let stats = gw.stats();
    // Every thread stops and every queue closes, so a TAP the gateway
    // created goes away, on a failure as on a signal.
    gw.stop();
    outcome?;
    say_raw!("{}", report::stats(&stats));
    tracing::info!("stopped");
    Ok(())
}

/// Messages as `tapnat: [warning: |error: |debug: |trace: ]MESSAGE`, one
/// a line on stderr, no timestamps (a service's journal adds them).
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => "error: ",
            tracing::Level::WARN => "warning: ",
            tracing::Level::INFO => "",
            tracing::Level::DEBUG => "debug: ",
            tracing::Level::TRACE => "trace: ",
        };
        write!(w, "tapnat: {level}")?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Messages on stderr at the levels `TAPNAT_LOG` names (default info);
/// a bad filter falls back to info, with a warning. A closed or full
/// stderr loses messages and is otherwise ignored.
fn init_logging() {
    let (filter, bad) = match std::env::var("TAPNAT_LOG") {
        Err(_) => (EnvFilter::new("info"), None),
        Ok(v) => match EnvFilter::try_new(&v) {
            Ok(f) => (f, None),
            Err(e) => (
                EnvFilter::new("info"),
                Some(format!("TAPNAT_LOG={v:?}: {e}; using info")),
            ),
        },
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .event_format(Plain)
        .try_init();
    if let Some(bad) = bad {
        tracing::warn!("{bad}");
    }
}

fn main() -> ExitCode {
    init_logging();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("check") => flags(&args[1..], Takes::Config)
            .and_then(|f| load(&f))
            .map(|c| {
                println!(
                    "config ok: {} masquerade rule(s), {} snat rule(s), {} forward(s)",
                    c.masquerade.len(),
                    c.snat.len(),
                    c.forward.len()
                );
            }),
        Some(what @ ("flows" | "stats")) => client(what, &args[1..]),
        Some("flush") => flush(&args[1..]),
        Some("forward") => forward(&args[1..]),
        Some("events") => events(&args[1..]),
        Some("capture") => capture_cmd(&args[1..]),
        #[cfg(feature = "lab")]
        Some("demo") if args.len() == 1 => {
            tapnat::lab::demo::run().map_err(|e| MainError::Demo(e.to_string()))
        }
        #[cfg(feature = "lab")]
        Some("soak") => tapnat::lab::soak::SoakOptions::from_args(&args[1..])
            .map_err(MainError::Usage)
            .and_then(|o| tapnat::lab::soak::run(o).map_err(MainError::Soak)),
        #[cfg(feature = "lab")]
        Some("bench") => tapnat::lab::bench::BenchOptions::from_args(&args[1..])
            .map_err(MainError::Usage)
            .and_then(|o| tapnat::lab::bench::run(o).map_err(MainError::Bench)),
        Some("default-config") => {
            print!("{}", tapnat::config::DEFAULT_TOML);
            Ok(())
        }
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some("-V" | "--version") => {
            println!("tapnat {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some(other) => Err(MainError::Usage(format!("unknown command `{other}`"))),
        None => Err(MainError::Usage("no command given".into())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut text = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                text.push_str(&format!("\n  caused by: {s}"));
                src = s.source();
            }
            tracing::error!("{text}");
            e.exit_code()
        }
    }
}
