//! The `[workers]` section: threads, busy polling, offload, pinning.
use super::{
    error::{at, Reason},
    reader::Table,
    values, ConfigError, WorkersConfig, MAX_BUSY_POLL, MAX_THREADS,
};

pub(super) struct Raw {
    threads: i64,
    busy_poll: String,
    offload: bool,
    io_uring: bool,
    pin: bool,
}

pub(super) fn read(mut t: Table<'_>) -> Result<Raw, ConfigError> {
    let raw = Raw {
        threads: t.int("threads")?,
        busy_poll: t.string("busy_poll")?,
        offload: t.bool("offload")?,
        io_uring: t.bool("io_uring")?,
        pin: t.bool("pin")?,
    };
    t.finish()?;
    Ok(raw)
}

pub(super) fn check(raw: Raw) -> Result<WorkersConfig, ConfigError> {
    let threads = values::bounded(raw.threads, 0..=MAX_THREADS, Some("one per core"))
        .map_err(at("workers.threads"))?;
    let busy_poll = values::duration_or_zero(&raw.busy_poll).map_err(at("workers.busy_poll"))?;
    if busy_poll > MAX_BUSY_POLL {
        return Err(at("workers.busy_poll")(Reason::TooLong {
            value: busy_poll,
            max: MAX_BUSY_POLL,
        }));
    }
    Ok(WorkersConfig {
        threads,
        busy_poll,
        offload: raw.offload,
        io_uring: raw.io_uring,
        pin: raw.pin,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::tests::{err, reason};
    use crate::config::{Config, Kind, Reason, WorkersConfig};

    #[test]
    fn workers_keys_from_file() {
        let c = Config::from_toml_str(
            "[workers]\nthreads = 4\nbusy_poll = \"1s\"\noffload = false\nio_uring = true\npin = true\n",
        )
        .unwrap();
        assert_eq!(
            c.workers,
            WorkersConfig {
                threads: 4,
                busy_poll: Duration::from_secs(1),
                offload: false,
                io_uring: true,
                pin: true,
            }
        );
        let c = Config::from_toml_str("[workers]\nbusy_poll = \"50us\"\n").unwrap();
        assert_eq!(c.workers.busy_poll, Duration::from_micros(50));
    }

    #[test]
    fn rejects_threads_too_large() {
        for (bad, value) in [("257", 257), ("-1", -1)] {
            let e = err(&format!("[workers]\nthreads = {bad}\n"));
            assert_eq!(
                reason(&e, "workers.threads"),
                &Reason::OutOfRange {
                    value,
                    min: 0,
                    max: 256,
                    zero_means: Some("one per core")
                }
            );
        }
        assert_eq!(
            err("[workers]\nthreads = 257\n").to_string(),
            "config key `workers.threads`: 257 is out of range; must be 0 (one per core) to 256"
        );
    }

    #[test]
    fn rejects_bad_busy_poll() {
        for bad in ["1s1us", "2s", "1m"] {
            let e = err(&format!("[workers]\nbusy_poll = \"{bad}\"\n"));
            assert!(matches!(
                reason(&e, "workers.busy_poll"),
                Reason::TooLong { max, .. } if *max == Duration::from_secs(1)
            ));
        }
        assert_eq!(
            err("[workers]\nbusy_poll = \"1m\"\n").to_string(),
            "config key `workers.busy_poll`: 1m is too long; must be at most 1s"
        );
        for bad in ["0", "-1s", "5x"] {
            let e = err(&format!("[workers]\nbusy_poll = \"{bad}\"\n"));
            assert!(matches!(
                reason(&e, "workers.busy_poll"),
                Reason::BadDuration { .. }
            ));
        }
    }

    #[test]
    fn rejects_non_boolean() {
        for bad in ["1", "\"yes\"", "\"TRUE\"", "\"true\""] {
            let e = err(&format!("[workers]\noffload = {bad}\n"));
            assert!(matches!(
                reason(&e, "workers.offload"),
                Reason::WrongType {
                    expected: Kind::Boolean,
                    ..
                }
            ));
        }
        assert_eq!(
            err("[workers]\noffload = 1\n").to_string(),
            "config key `workers.offload`: invalid type: expected true or false, found integer 1"
        );
    }
}
