//! tapnat: a userspace IPv4 masquerading NAT gateway between two TAP devices.
//!
//! Layers point one way: `wire` and `nat` are pure (no fds, threads or clocks),
//! `device` owns every system call (its `sys` module is the only place with
//! `unsafe`), `gateway` runs the workers and the control thread, `control`
//! holds the configuration and the control socket. `lab`, `demo`, `bench` and
//! `report` serve the command line, the tests and the benchmark.
pub mod bench;
pub mod control;
pub mod demo;
pub mod device;
pub mod gateway;
pub mod lab;
pub mod nat;
pub mod report;
pub mod wire;
