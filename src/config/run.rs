//! The `[run]` section: what the running process keeps of its privilege
//! once it is set up (see `crate::sandbox`).
use super::{
    error::{at, Reason},
    reader::Table,
    ConfigError, RunConfig,
};

pub(super) struct Raw {
    run_as: Option<String>,
    seccomp: bool,
}

pub(super) fn read(mut t: Table<'_>) -> Result<Raw, ConfigError> {
    let raw = Raw {
        run_as: t.opt_string("run_as")?,
        seccomp: t.bool("seccomp")?,
    };
    t.finish()?;
    Ok(raw)
}

/// The name's shape only; whether the user exists is looked up when
/// `tapnat run` starts (still before any device is opened).
pub(super) fn check(raw: Raw) -> Result<RunConfig, ConfigError> {
    let run_as = match raw.run_as {
        None => None,
        Some(name) if name.is_empty() => None,
        Some(name) => {
            let bad = name
                .chars()
                .any(|c| c == ':' || c == '/' || c.is_whitespace() || c.is_control());
            if bad {
                return Err(at("run.run_as")(Reason::BadUserName { name }));
            }
            Some(name)
        }
    };
    Ok(RunConfig {
        run_as,
        seccomp: raw.seccomp,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{err, reason};
    use crate::config::{Config, Reason, RunConfig, DEFAULT_TOML};

    #[test]
    fn defaults_and_keys() {
        let d = Config::from_toml_str(DEFAULT_TOML).unwrap();
        assert_eq!(
            d.run,
            RunConfig {
                run_as: None,
                seccomp: true
            }
        );
        let c = Config::from_toml_str("[run]\nrun_as = \"nobody\"\nseccomp = false\n").unwrap();
        assert_eq!(c.run.run_as.as_deref(), Some("nobody"));
        assert!(!c.run.seccomp);
        let c = Config::from_toml_str("[run]\nrun_as = \"\"\n").unwrap();
        assert_eq!(c.run.run_as, None);
    }

    #[test]
    fn rejects_bad_values() {
        for bad in ["a b", "x:y", "../x"] {
            let e = err(&format!("[run]\nrun_as = \"{bad}\"\n"));
            assert!(
                matches!(reason(&e, "run.run_as"), Reason::BadUserName { .. }),
                "{bad:?}"
            );
        }
        assert_eq!(
            err("[run]\nrun_as = \"a b\"\n").to_string(),
            "config key `run.run_as`: \"a b\" is not a user name"
        );
        assert!(matches!(
            reason(&err("[run]\nseccomp = 1\n"), "run.seccomp"),
            Reason::WrongType { .. }
        ));
    }
}
