//! The layers a configuration is read from, lowest first: the embedded
//! default, the user's file, the `TAPNAT_` environment.
//!
//! The first two are TOML tables merged key by key ([`merge`]): a table in
//! the upper layer merges into the table below, anything else (a value, an
//! array, so also a `[[masquerade]]` list) replaces it whole. The
//! environment is a set of strings keyed by dotted path ([`Env`]); a value
//! takes the type the key is read as (see `reader`), so `TAPNAT_POD__MTU=1400`
//! is an integer and `TAPNAT_POD__TAP=1400` a string.
use std::cell::Cell;

use super::{ConfigError, DEFAULT_TOML};

/// Prefix of environment overrides (`TAPNAT_POD__TAP=tap9`), in any case.
const ENV_PREFIX: &str = "tapnat_";
/// Separator between the levels of a key path in a variable name.
const ENV_SEPARATOR: &str = "__";

/// Parse `text` as TOML; `origin` names it in the error.
fn parse(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            origin: origin.to_string(),
            problem: e.to_string().trim_end().to_string(),
        })
}

/// The embedded default with `user` (text and where it came from) merged
/// on top.
pub(super) fn file_layers(user: Option<(&str, &str)>) -> Result<toml::Table, ConfigError> {
    let mut table = parse(DEFAULT_TOML, "the embedded default config")?;
    if let Some((text, origin)) = user {
        merge(&mut table, parse(text, origin)?);
    }
    Ok(table)
}

/// Merge `upper` into `lower`: tables key by key, everything else replaced.
pub(super) fn merge(lower: &mut toml::Table, upper: toml::Table) {
    for (key, value) in upper {
        match (lower.get_mut(&key), value) {
            (Some(toml::Value::Table(below)), toml::Value::Table(above)) => merge(below, above),
            (_, value) => {
                lower.insert(key, value);
            }
        }
    }
}

/// One `TAPNAT_` variable.
#[derive(Debug)]
pub(super) struct EnvVar {
    /// The variable's name as given, for messages.
    pub(super) var: String,
    /// The key path it sets: `TAPNAT_NAT__TIMEOUTS__UDP` -> `nat.timeouts.udp`.
    key: String,
    pub(super) value: String,
    /// Whether a key was read from it; an unread one names no settable key.
    read: Cell<bool>,
}

/// The `TAPNAT_` variables of an environment, the top layer.
#[derive(Debug, Default)]
pub(super) struct Env(Vec<EnvVar>);

impl Env {
    /// The variables of `vars` whose name starts with `TAPNAT_` in any case;
    /// the rest are not ours.
    pub(super) fn new(vars: &[(&str, &str)]) -> Env {
        Env(vars
            .iter()
            .filter_map(|&(var, value)| {
                let lower = var.to_lowercase();
                // `TAPNAT_LOG` sets the message levels, not a key.
                if lower == "tapnat_log" {
                    return None;
                }
                let path = lower.strip_prefix(ENV_PREFIX)?;
                Some(EnvVar {
                    var: var.to_string(),
                    key: path.replace(ENV_SEPARATOR, "."),
                    value: value.to_string(),
                    read: Cell::new(false),
                })
            })
            .collect())
    }

    /// The variable that sets `key`; it and any other for the same key are
    /// marked as read. With the same key given twice (in different case)
    /// the last wins.
    pub(super) fn take(&self, key: &str) -> Option<&EnvVar> {
        let mut found = None;
        for var in self.0.iter().filter(|v| v.key == key) {
            var.read.set(true);
            found = Some(var);
        }
        found
    }

    /// After every key was read: a variable no key was read from is an error.
    pub(super) fn finish(&self) -> Result<(), ConfigError> {
        match self.0.iter().find(|v| !v.read.get()) {
            Some(v) => Err(ConfigError::UnknownEnv {
                var: v.var.clone(),
                key: v.key.clone(),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> toml::Table {
        s.parse().unwrap()
    }

    #[test]
    fn merge_tables_by_key_and_replaces_the_rest() {
        let mut lower =
            table("a = 1\nlist = [1, 2]\n[t]\nx = 1\ny = 2\n[t.u]\nz = 3\n[[r]]\ns = 1\n");
        merge(
            &mut lower,
            table(
                "list = [3]\nnew = true\n[t]\ny = 20\n[t.u]\nw = 4\n[[r]]\ns = 2\n[[r]]\ns = 3\n",
            ),
        );
        assert_eq!(
            lower,
            table(
                "a = 1\nlist = [3]\nnew = true\n[t]\nx = 1\ny = 20\n[t.u]\nz = 3\nw = 4\n[[r]]\ns = 2\n[[r]]\ns = 3\n"
            )
        );
        // A value replaces a table, and the other way round.
        let mut lower = table("[t]\nx = 1\n");
        merge(&mut lower, table("t = 5\n"));
        assert_eq!(lower, table("t = 5\n"));
    }

    #[test]
    fn env_takes_prefixed_variables_in_any_case() {
        let env = Env::new(&[
            ("TAPNAT_POD__TAP", "a"),
            ("tapnat_pod__mtu", "1400"),
            ("TAPNATX", "not ours"),
            ("PATH", "/usr/bin"),
        ]);
        assert_eq!(env.take("pod.tap").map(|v| v.value.as_str()), Some("a"));
        assert_eq!(
            env.take("pod.mtu").map(|v| v.var.as_str()),
            Some("tapnat_pod__mtu")
        );
        assert!(env.take("pod.netns").is_none());
        assert!(env.finish().is_ok());
        let env = Env::new(&[("TAPNAT_POD__TAP", "a"), ("tapnat_pod__tap", "b")]);
        assert_eq!(env.take("pod.tap").map(|v| v.value.as_str()), Some("b"));
        assert!(env.finish().is_ok());
        let env = Env::new(&[("TAPNAT_POD__TAPP", "x")]);
        assert!(matches!(
            env.finish(),
            Err(ConfigError::UnknownEnv { var, key }) if var == "TAPNAT_POD__TAPP" && key == "pod.tapp"
        ));
    }
}
