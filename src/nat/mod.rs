//! NAT state: the per-worker flow table (sessions, port mappings, expiry)
//! and the fragment cache.
//!
//! Everything here is pure: no fds, threads or clocks. Time is injected as
//! `now_ms: u64`, milliseconds since an arbitrary start chosen by the caller.
//! [`table`] is a facade ([`FlowTable`]) over parts that each own one
//! concern (slots and index, mappings, filtering, ports, TCP tracking,
//! expiry); its items are re-exported here.
pub mod frag;
pub mod hash;
pub mod table;

pub use table::*;
