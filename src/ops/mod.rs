//! Operations: what an operator or a script reads from, and changes in, a
//! running gateway.
//!
//! This layer sits above [`crate::gateway`]: the control socket serves its
//! [`crate::gateway::Observer`], the metrics endpoint its counters, and the
//! reports format both for people (text) and scripts (JSON, Prometheus).
//! [`live`] holds what an operator changes while it runs (flushes, forwards,
//! a reload), carried to the workers over their channels.
pub mod capture;
pub mod events;
pub mod filter;
pub mod live;
pub mod maplog;
pub mod metrics;
pub mod record;
pub mod report;
pub mod socket;
