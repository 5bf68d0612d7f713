//! The `[control]`, `[metrics]` and `[log]` sections: how operators reach
//! a running gateway and what it records.
use std::net::SocketAddrV4;
use std::path::PathBuf;

use super::{
    error::{at, Reason},
    reader::Table,
    ConfigError, ControlConfig, LogConfig, MetricsConfig,
};

pub(super) struct RawControl {
    socket: String,
    group: Option<String>,
}

pub(super) fn read_control(mut t: Table<'_>) -> Result<RawControl, ConfigError> {
    let raw = RawControl {
        socket: t.string("socket")?,
        group: t.opt_string("group")?,
    };
    t.finish()?;
    Ok(raw)
}

pub(super) fn check_control(raw: RawControl) -> Result<ControlConfig, ConfigError> {
    let socket = PathBuf::from(&raw.socket);
    if !socket.is_absolute() {
        return Err(at("control.socket")(Reason::RelativePath {
            path: raw.socket,
        }));
    }
    if let Some(name) = &raw.group {
        let bad = name.is_empty()
            || name
                .chars()
                .any(|c| c == ':' || c == '/' || c.is_whitespace() || c.is_control());
        if bad {
            return Err(at("control.group")(Reason::BadGroupName {
                name: name.clone(),
            }));
        }
    }
    Ok(ControlConfig {
        socket,
        group: raw.group,
    })
}

pub(super) struct RawMetrics {
    listen: Option<String>,
}

pub(super) fn read_metrics(mut t: Table<'_>) -> Result<RawMetrics, ConfigError> {
    let raw = RawMetrics {
        listen: t.opt_string("listen")?,
    };
    t.finish()?;
    Ok(raw)
}

pub(super) fn check_metrics(raw: RawMetrics) -> Result<MetricsConfig, ConfigError> {
    let listen = match raw.listen {
        None => None,
        Some(s) => Some(
            s.parse::<SocketAddrV4>()
                .map_err(|_| at("metrics.listen")(Reason::BadListen { input: s.clone() }))?,
        ),
    };
    Ok(MetricsConfig { listen })
}

pub(super) struct RawLog {
    mappings: Option<String>,
    destinations: bool,
}

pub(super) fn read_log(mut t: Table<'_>) -> Result<RawLog, ConfigError> {
    let raw = RawLog {
        mappings: t.opt_string("mappings")?,
        destinations: t.bool("destinations")?,
    };
    t.finish()?;
    Ok(raw)
}

pub(super) fn check_log(raw: RawLog) -> Result<LogConfig, ConfigError> {
    let mappings = match raw.mappings {
        None => None,
        Some(path) if !path.starts_with('/') => {
            return Err(at("log.mappings")(Reason::RelativePath { path }));
        }
        Some(path) => Some(PathBuf::from(path)),
    };
    Ok(LogConfig {
        mappings,
        destinations: raw.destinations,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::config::tests::{err, reason};
    use crate::config::{Config, Reason, DEFAULT_TOML};

    #[test]
    fn defaults_and_keys() {
        let d = Config::from_toml_str(DEFAULT_TOML).unwrap();
        assert_eq!(d.control.socket, PathBuf::from("/run/tapnat.sock"));
        assert_eq!(d.control.group, None);
        assert_eq!(d.metrics.listen, None);
        let c = Config::from_toml_str(
            "[control]\nsocket = \"/tmp/t.sock\"\ngroup = \"tapnat\"\n[metrics]\nlisten = \"127.0.0.1:9469\"\n",
        )
        .unwrap();
        assert_eq!(c.control.socket, PathBuf::from("/tmp/t.sock"));
        assert_eq!(c.control.group.as_deref(), Some("tapnat"));
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9469".parse().unwrap()));
        assert_eq!(d.log, crate::config::LogConfig::default());
        let l = Config::from_toml_str("[log]\nmappings = \"/var/log/m\"\ndestinations = true\n")
            .unwrap();
        assert_eq!(l.log.mappings, Some(PathBuf::from("/var/log/m")));
        assert!(l.log.destinations);
    }

    #[test]
    fn rejects_bad_values() {
        let e = err("[log]\nmappings = \"m.json\"\n");
        assert_eq!(
            reason(&e, "log.mappings"),
            &Reason::RelativePath {
                path: "m.json".into()
            }
        );
        let e = err("[control]\nsocket = \"tapnat.sock\"\n");
        assert_eq!(
            reason(&e, "control.socket"),
            &Reason::RelativePath {
                path: "tapnat.sock".into()
            }
        );
        for bad in ["", "a b", "x:y"] {
            let e = err(&format!("[control]\ngroup = \"{bad}\"\n"));
            assert!(
                matches!(reason(&e, "control.group"), Reason::BadGroupName { .. }),
                "{bad:?}"
            );
        }
        for bad in ["9469", "localhost:9469", "127.0.0.1", "[::1]:9469"] {
            let e = err(&format!("[metrics]\nlisten = \"{bad}\"\n"));
            assert!(
                matches!(reason(&e, "metrics.listen"), Reason::BadListen { .. }),
                "{bad:?}"
            );
        }
        assert_eq!(
            err("[metrics]\nlisten = \"9469\"\n").to_string(),
            "config key `metrics.listen`: \"9469\" is not an IPv4 ADDRESS:PORT (write e.g. \"127.0.0.1:9469\")"
        );
    }
}
