//! The device layer: TAP devices, the raw (AF_PACKET) uplink, network
//! namespaces and the poll(2) wrapper,
//! and the [`FrameIo`] seam the workers read and write frames through.
//!
//! Everything here owns system resources; [`sys`] is the only module in the crate
//! allowed to use `unsafe`, and every fd is wrapped in an `OwnedFd`/`File` as soon
//! as it exists.
pub mod io;
#[cfg(any(test, feature = "lab"))]
pub mod mem;
pub mod netns;
#[cfg(feature = "lab")]
pub mod packet;
pub mod poll;
pub mod raw;
pub mod steer;
pub mod sys;
pub mod tap;
pub mod uring;
pub mod watch;

pub use io::FrameIo;
#[cfg(any(test, feature = "lab"))]
pub use mem::MemDevice;
pub use netns::{run_in_netns, run_in_netns_file};
#[cfg(feature = "lab")]
pub use packet::PacketSocket;
pub use poll::{Poller, Waker};
pub use raw::{RawError, RawInfo, RawOptions, RawSocket};
pub use tap::{Tap, TapError, TapOptions, VNET_HDR_LEN};
pub use uring::UringTap;
pub use watch::NetnsWatch;
