//! `config::Config::from_toml_str` on arbitrary UTF-8.
//!
//! Invariants: no panic (errors are fine, and their messages format); a
//! config that loads gives its `warnings()` without panicking, and formats
//! with `Debug`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tapnat::config::Config;

fuzz_target!(|text: &str| {
    match Config::from_toml_str(text) {
        Ok(cfg) => {
            let _ = cfg.warnings();
            let _ = format!("{cfg:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
