//! Operations: what an operator or a script reads from a running gateway.
//!
//! This layer sits above [`crate::gateway`]: the control socket serves its
//! [`crate::gateway::Observer`], and the reports format its counters and flows.
pub mod report;
pub mod socket;
