//! NAT state: the per-worker flow table (sessions, port mappings, expiry).
//!
//! Everything here is pure: no fds, threads or clocks. Time is injected as
//! `now_ms: u64`, milliseconds since an arbitrary start chosen by the caller.
pub mod frag;
pub mod table;

pub use table::*;
