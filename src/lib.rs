//! tapnat: a userspace IPv4 masquerading NAT gateway between two TAP devices.
//!
//! Layers, bottom to top; each uses only the ones before it in this list:
//!
//! - [`net`]: plain network types (`Ipv4Net`, `PortRange`).
//! - [`config`]: the configuration file, environment overrides, validation.
//! - [`wire`], [`nat`]: pure packet parsing and rewriting, the flow table and
//!   the fragment cache; no fds, threads or clocks.
//! - [`policy`]: NAT policy by addresses alone (egress choice, paired pool
//!   addresses, steering to the owning worker); pure.
//! - [`device`]: every system call, and the `FrameIo` seam devices offer the
//!   workers; its `sys` module is the only place with `unsafe`.
//! - [`sandbox`]: least privilege once set up (capabilities, `run.run_as`,
//!   no_new_privs, a seccomp list per thread role), entered by each thread.
//! - [`gateway`]: the translation core (`gateway::datapath`, decisions with
//!   no I/O), the workers that carry its actions out, and the control thread.
//! - [`ops`]: the control socket, flow filters, reports and Prometheus
//!   metrics, reading a running gateway.
//! - [`lab`] (feature `lab`, on by default): throwaway namespaces and
//!   kernel-socket probes for `tapnat demo`, `tapnat bench`, `tapnat soak`
//!   and the tests.
//!   The product library builds without it (`--no-default-features`).
pub mod config;
pub mod device;
pub mod gateway;
#[cfg(feature = "lab")]
pub mod lab;
pub mod nat;
pub mod net;
pub mod ops;
pub mod policy;
pub mod sandbox;
pub mod wire;
