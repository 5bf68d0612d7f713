//! `tapnat`: command line. Thin: arguments -> Config -> Gateway -> ExitCode.
use std::path::PathBuf;
use std::process::ExitCode;

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;
use tapnat::config::{Config, ConfigError};
use tapnat::gateway::{Gateway, GatewayError};

const USAGE: &str = "\
tapnat: a userspace IPv4 masquerading NAT gateway between two TAP devices

usage:
  tapnat run [--config FILE] [--control PATH]
                                run the gateway in the foreground (no FILE: the embedded default);
                                SIGINT/SIGTERM stop it, SIGUSR1 prints flows and counters; it answers
                                `tapnat flows|stats` on the control socket PATH (default /run/tapnat.sock)
  tapnat flows [--control PATH] the running gateway's flow table (like conntrack -L)
  tapnat stats [--control PATH] the running gateway's counters, drops by reason
  tapnat check [--config FILE]  validate a config and print warnings, touching no device
  tapnat demo                   build a throwaway pod and external namespace, run the gateway
                                between them and show traffic being translated (needs root)
  tapnat default-config         print the embedded default config
  tapnat bench [--reps N] [--seconds S] [--only NAME[,NAME]] [--json FILE] [--install]
                                measure tapnat against kernel MASQUERADE, a bare TAP copy, pasta, slirp4netns (root)

environment: TAPNAT_SECTION__KEY=value overrides a key (e.g. TAPNAT_POD__TAP=tap9)";

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
    #[cfg(feature = "lab")]
    #[error("demo failed: {0}")]
    Demo(String),
    #[cfg(feature = "lab")]
    #[error("benchmark failed")]
    Bench(#[source] std::io::Error),
    #[error("cannot reach the control socket")]
    Control(#[source] std::io::Error),
}

impl MainError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            MainError::Usage(_) => 64,
            MainError::Config(_) => 78,
            MainError::Gateway(_) => 69,
            MainError::Signals(_) => 71,
            #[cfg(feature = "lab")]
            MainError::Demo(_) | MainError::Bench(_) => 1,
            MainError::Control(_) => 69,
        })
    }
}

/// `--config FILE` and `--control PATH`, each at most once, when `allowed`.
#[derive(Default)]
struct Flags {
    config: Option<PathBuf>,
    control: Option<PathBuf>,
}

fn flags(args: &[String], allowed: &[&str]) -> Result<Flags, MainError> {
    let mut f = Flags::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--config" | "-c" if allowed.contains(&"--config") => &mut f.config,
            "--control" if allowed.contains(&"--control") => &mut f.control,
            _ => return Err(MainError::Usage(format!("unexpected argument `{flag}`"))),
        };
        let Some(value) = it.next() else {
            return Err(MainError::Usage(format!("`{flag}` needs a value")));
        };
        if slot.replace(PathBuf::from(value)).is_some() {
            return Err(MainError::Usage(format!("`{flag}` given twice")));
        }
    }
    Ok(f)
}

fn control_path(f: &Flags) -> PathBuf {
    f.control
        .clone()
        .unwrap_or_else(|| PathBuf::from(tapnat::ops::socket::DEFAULT_PATH))
}

fn load(f: &Flags) -> Result<Config, MainError> {
    let config = Config::load(f.config.as_deref())?;
    for w in config.warnings() {
        eprintln!("tapnat: warning: {w}");
    }
    Ok(config)
}

fn run(args: &[String]) -> Result<(), MainError> {
    let f = flags(args, &["--config", "--control"])?;
    let config = load(&f)?;
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGUSR1]).map_err(MainError::Signals)?;
    let gw = Gateway::start(&config)?;
    let path = control_path(&f);
    // The gateway runs without its control socket rather than not at all.
    let _control = match tapnat::ops::socket::ControlSocket::serve(&path, gw.observer()) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!(
                "tapnat: warning: no control socket at {}: {e}",
                path.display()
            );
            None
        }
    };
    let a = gw.addressing();
    eprintln!(
        "tapnat: running: pod {} {} ({}), uplink {} {} ({}) via {}; {} worker(s){}",
        config.pod.tap,
        a.pod_net,
        a.pod_mac,
        config.uplink.tap,
        a.uplink_net,
        a.uplink_mac,
        a.uplink_gateway,
        gw.workers(),
        if gw.workers() > 1 && !gw.steering() {
            " (no eBPF queue steering: a new flow's first packets may take a hand-off)"
        } else {
            ""
        }
    );
    for sig in signals.forever() {
        if sig == SIGUSR1 {
            eprint!("{}", tapnat::ops::report::flows(&gw.flows()));
            eprint!("{}", tapnat::ops::report::stats(&gw.stats()));
            continue;
        }
        break;
    }
    let stats = gw.stats();
    gw.stop();
    eprint!("{}", tapnat::ops::report::stats(&stats));
    eprintln!("tapnat: stopped");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("check") => flags(&args[1..], &["--config"])
            .and_then(|f| load(&f))
            .map(|c| {
                println!(
                    "config ok: {} masquerade rule(s), {} snat rule(s), {} forward(s)",
                    c.masquerade.len(),
                    c.snat.len(),
                    c.forward.len()
                );
            }),
        Some(what @ ("flows" | "stats")) => flags(&args[1..], &["--control"]).and_then(|f| {
            let text =
                tapnat::ops::socket::ask(&control_path(&f), what).map_err(MainError::Control)?;
            print!("{text}");
            Ok(())
        }),
        #[cfg(feature = "lab")]
        Some("demo") if args.len() == 1 => {
            tapnat::lab::demo::run().map_err(|e| MainError::Demo(e.to_string()))
        }
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
            eprintln!("tapnat: error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            e.exit_code()
        }
    }
}
