//! An AF_PACKET socket on an existing interface: whole Ethernet frames in and
//! out. The tests use it as a raw peer that can send frames the kernel's own
//! stack never would (runts, bad headers).
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use super::sys;

/// A non-blocking packet socket bound to one interface.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens a socket on interface `name` of the calling thread's network
    /// namespace (use [`super::run_in_netns`] to open one elsewhere).
    pub fn open(name: &str) -> io::Result<PacketSocket> {
        let ctl = std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| {
            // A namespace with only loopback down still lets us make an unbound socket.
            std::net::UdpSocket::bind("127.0.0.1:0")
        })?;
        let index = sys::if_index(ctl.as_fd(), name)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no interface {name}"))
        })?;
        Ok(PacketSocket {
            fd: sys::packet_socket(index)?,
        })
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        sys::write(self.fd.as_fd(), frame).map(|_| ())
    }

    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        sys::read(self.fd.as_fd(), buf)
    }
}

impl AsFd for PacketSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
