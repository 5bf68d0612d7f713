//! The raw uplink: AF_PACKET sockets on an existing interface (a second
//! NIC, a macvlan of the host's NIC with no address, one end of a veth
//! pair), one socket per worker, as the TAP has one queue per worker.
//!
//! - **Fanout.** With more than one worker the sockets join one
//!   `PACKET_FANOUT` group. Where the kernel loads it, an eBPF fanout
//!   program ([`super::steer::fanout_program`]) picks the socket by the
//!   frame's destination port (or echo identifier), so an inbound frame
//!   lands on its owner's socket as the TAP's steering does; otherwise the
//!   group hashes by flow (`PACKET_FANOUT_HASH`) and a frame read by
//!   another worker is handed over. Either way it is only a hint. After the
//!   link goes down and up the kernel relinks the members in another order,
//!   which only costs hand-offs.
//! - **Offloads.** Every socket has `PACKET_VNET_HDR`: a frame is read with
//!   its virtio-net header, so a GRO'd (or, from a veth peer, a TSO)
//!   super-frame comes in whole and a partial checksum is marked, and a
//!   pod TAP's TSO super-frame is written as one GSO packet that the
//!   kernel or the NIC segments. When the gateway runs without offload
//!   (`workers.offload = false`, buffers without a header) the header is
//!   read into a separate buffer: a partial checksum is completed here, and
//!   a super-frame (which such buffers cannot hold) is refused with
//!   `InvalidData`, counted by the worker as a read failure; turn GRO off on
//!   the interface (`ethtool -K IF gro off`) in that case.
//! - **Own sends.** `PACKET_IGNORE_OUTGOING` (and the fanout group's
//!   `PACKET_FANOUT_FLAG_IGNORE_OUTGOING` where the kernel has it) keep the
//!   gateway's own transmissions out of its sockets; a frame the kernel
//!   still reports as `PACKET_OUTGOING` (or `PACKET_OTHERHOST`) is skipped.
//! - **Batching.** With `io_uring` (and the virtio-net header, the default)
//!   each socket has a [`Ring`], as a TAP queue does: a burst's frames are
//!   read straight into the worker's pool buffers with one `io_uring_enter`
//!   (a `read` per frame, `RWF_NOWAIT`), a burst's writes go out with
//!   another. A plain `read` has no packet type, so a classic BPF filter on
//!   every socket drops `PACKET_OUTGOING` and `PACKET_OTHERHOST` frames in
//!   the kernel before they are queued. Lone frames still take one
//!   `recvmsg`/`sendmsg` each. (A `recvmmsg` read-ahead into the socket's
//!   own buffers, copied out one per read, was measured and dropped before
//!   this: the extra copy of each 64 KiB super-frame halved inbound TCP.)
//! - **Link state.** The kernel reports `ENETDOWN` once when the link goes
//!   down or the interface is deleted, and a deleted interface sends an
//!   rtnetlink `RTM_DELLINK` (also when it was down already): each socket's
//!   poll fd is an epoll of the packet socket and a link-notification
//!   socket, and a read that finds either checks whether the interface is
//!   still there. Gone: the read fails with `ENODEV`, which stops the
//!   gateway as a deleted TAP does. Only down: `WouldBlock`, and the
//!   sockets receive again when the link comes back up.
//!
//! The gateway uses the interface's MAC. The interface must carry no kernel
//! IPv4 address ([`RawError::HasAddress`]): the kernel and tapnat would both
//! answer on it.
use std::io::{self, IoSlice, IoSliceMut};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::steer::{self, SteerBy};
use super::uring::{Ring, RING_ENTRIES};
use super::{sys, FrameIo};
use crate::wire::csum;
use crate::wire::vnet::{VnetHdr, F_NEEDS_CSUM, VNET_HDR_LEN};

/// Socket buffers asked for (as root, past `rmem_max`): a few dozen 64 KiB
/// super-frames per socket.
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// How long a read that saw `ENETDOWN` waits for a deleted interface to
/// leave the namespace's list (deletion brings the link down first).
const GONE_GRACE: Duration = Duration::from_millis(200);

/// Why the raw uplink could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("failed to open network namespace {}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No interface of that name in the namespace.
    #[error("no interface {name:?} in {netns}")]
    NoSuchInterface { name: String, netns: String },
    /// The interface carries a kernel IPv4 address.
    #[error("interface {name:?} has the kernel IPv4 address {addr}")]
    HasAddress { name: String, addr: Ipv4Addr },
    /// A socket call or ioctl failed; `step` says which.
    #[error("interface {name:?}: {step} failed")]
    Step {
        name: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What the gateway learns about the interface when it opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawInfo {
    pub name: String,
    pub index: libc::c_int,
    pub mac: [u8; 6],
    /// Whether IPv4 forwarding is on in the interface's namespace (the
    /// kernel would route what arrives for addresses it does not have).
    pub forwarding: bool,
    /// Whether the fanout group steers by destination port (eBPF).
    pub steering: bool,
    /// Why the sockets read and write frame by frame although
    /// [`RawOptions::io_uring`] asked for rings (the kernel refused one).
    pub no_ring: Option<String>,
}

/// How to open the raw uplink.
#[derive(Debug, Clone, Copy)]
pub struct RawOptions {
    /// Sockets: one per worker.
    pub sockets: usize,
    /// The MTU to give the interface when it has another one.
    pub mtu: u16,
    /// Whether the caller's frames carry a virtio-net header (offload on).
    pub vnet_hdr: bool,
    /// Try to steer inbound frames by destination port.
    pub steer: bool,
    /// Give each socket an io_uring for bursts (with `vnet_hdr` only: a
    /// frame without one is read in two parts); where the kernel refuses
    /// one, that socket reads and writes frame by frame.
    pub io_uring: bool,
}

/// One AF_PACKET socket of the raw uplink.
#[derive(Debug)]
pub struct RawSocket {
    fd: OwnedFd,
    /// Link notifications of the interface's namespace.
    links: OwnedFd,
    /// Epoll of `fd` and `links`: what the worker polls.
    ep: OwnedFd,
    index: libc::c_int,
    /// Whether the caller's frames carry the virtio-net header.
    vnet_hdr: bool,
    /// Shared by the interface's sockets: its link went down (`ENETDOWN`
    /// with the interface still there) and nothing was read since.
    down: Arc<AtomicBool>,
    /// Bursts go through this ring when there is one.
    ring: Option<Ring>,
}

/// Opens the raw uplink on interface `name` of `netns` (or of the calling
/// thread's namespace): checks it, brings it up, and opens the sockets.
pub fn open(
    name: &str,
    netns: Option<&Path>,
    opts: RawOptions,
) -> Result<(Vec<RawSocket>, RawInfo), RawError> {
    let owned = name.to_owned();
    let where_ = netns.map_or_else(
        || "tapnat's network namespace".to_owned(),
        |p| format!("network namespace {}", p.display()),
    );
    match netns {
        None => open_here(&owned, &where_, opts),
        Some(path) => {
            let p = path.to_path_buf();
            super::run_in_netns(path, move || open_here(&owned, &where_, opts))
                .map_err(|source| RawError::Netns { path: p, source })?
        }
    }
}

fn open_here(
    name: &str,
    netns: &str,
    opts: RawOptions,
) -> Result<(Vec<RawSocket>, RawInfo), RawError> {
    let step = |step: &'static str| {
        move |source: io::Error| RawError::Step {
            name: name.to_owned(),
            step,
            source,
        }
    };
    let ctl = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .map_err(step("a control socket"))?;
    let index = sys::if_index(ctl.as_fd(), name)
        .map_err(step("looking up the interface"))?
        .ok_or_else(|| RawError::NoSuchInterface {
            name: name.to_owned(),
            netns: netns.to_owned(),
        })?;
    if let Some(addr) =
        sys::if_ipv4_addr(ctl.as_fd(), name).map_err(step("reading its IPv4 address"))?
    {
        return Err(RawError::HasAddress {
            name: name.to_owned(),
            addr,
        });
    }
    // Read by this thread, so in the interface's namespace.
    let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/forwarding")
        .is_ok_and(|s| s.trim() != "0");
    let mac = sys::if_hwaddr(ctl.as_fd(), name).map_err(step("reading its MAC"))?;
    let mtu = sys::if_mtu(ctl.as_fd(), name).map_err(step("reading its MTU"))?;
    if mtu != libc::c_int::from(opts.mtu) {
        sys::set_mtu(ctl.as_fd(), name, opts.mtu).map_err(step("setting its MTU"))?;
    }
    sys::bring_up(ctl.as_fd(), name).map_err(step("bringing it up"))?;
    let mut sockets = Vec::with_capacity(opts.sockets);
    let down = Arc::new(AtomicBool::new(false));
    let mut no_ring = None;
    for _ in 0..opts.sockets.max(1) {
        let (socket, ring_err) =
            RawSocket::open(index, opts, down.clone()).map_err(step("opening a socket"))?;
        if let Some(e) = ring_err {
            no_ring.get_or_insert(e.to_string());
        }
        sockets.push(socket);
    }
    let steering = if sockets.len() > 1 {
        join_fanout(&sockets, opts.steer).map_err(step("joining a fanout group"))?
    } else {
        false
    };
    let info = RawInfo {
        name: name.to_owned(),
        index,
        mac,
        forwarding,
        steering,
        no_ring,
    };
    Ok((sockets, info))
}

/// Puts every socket in one new fanout group (member k is socket k), with
/// the eBPF steering program when `steer` and the kernel allow; returns
/// whether it steers.
fn join_fanout(sockets: &[RawSocket], steer: bool) -> io::Result<bool> {
    let prog = if steer {
        sys::bpf_load_socket_filter(&steer::fanout_program(SteerBy::DestinationPort)).ok()
    } else {
        None
    };
    let kind = if prog.is_some() {
        libc::PACKET_FANOUT_EBPF
    } else {
        libc::PACKET_FANOUT_HASH
    };
    let first = sockets[0].fd.as_fd();
    let unique = |flags: libc::c_uint| {
        let arg = (kind | flags | libc::PACKET_FANOUT_FLAG_UNIQUEID) << 16;
        sys::setsockopt_int(
            first,
            libc::SOL_PACKET,
            libc::PACKET_FANOUT,
            arg as libc::c_int,
        )
    };
    // A kernel without the ignore-outgoing flag refuses it; the sockets'
    // own PACKET_IGNORE_OUTGOING and the pkttype check still hold.
    let mut flags = libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING;
    if unique(flags).is_err() {
        flags = 0;
        unique(flags)?;
    }
    let id = sys::getsockopt_int(first, libc::SOL_PACKET, libc::PACKET_FANOUT)? & 0xffff;
    let arg = (id as libc::c_uint) | ((kind | flags) << 16);
    for s in &sockets[1..] {
        sys::setsockopt_int(
            s.fd.as_fd(),
            libc::SOL_PACKET,
            libc::PACKET_FANOUT,
            arg as libc::c_int,
        )?;
    }
    Ok(match prog {
        // The group keeps its own reference to the program.
        Some(p) => sys::setsockopt_int(
            first,
            libc::SOL_PACKET,
            libc::PACKET_FANOUT_DATA,
            p.as_raw_fd(),
        )
        .is_ok(),
        None => false,
    })
}

impl RawSocket {
    /// One socket, and why it has no ring when it was to have one.
    fn open(
        index: libc::c_int,
        opts: RawOptions,
        down: Arc<AtomicBool>,
    ) -> io::Result<(RawSocket, Option<io::Error>)> {
        let fd = sys::packet_socket_unbound()?;
        let b = fd.as_fd();
        sys::setsockopt_int(b, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
        sys::setsockopt_int(b, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1)?;
        // Before the bind, so that no frame is queued unfiltered.
        sys::packet_drop_not_ours(b)?;
        // Best effort: the defaults (rmem_default) still work, just drop sooner.
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if sys::setsockopt_int(b, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
                let _ = sys::setsockopt_int(b, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
            }
        }
        sys::packet_bind(b, index)?;
        let links = sys::netlink_link_events()?;
        let ep = sys::epoll_of(&[fd.as_fd(), links.as_fd()])?;
        let (ring, ring_err) = match opts.io_uring && opts.vnet_hdr {
            true => match Ring::new(RING_ENTRIES) {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(e)),
            },
            false => (None, None),
        };
        let socket = RawSocket {
            fd,
            links,
            ep,
            index,
            vnet_hdr: opts.vnet_hdr,
            down,
            ring,
        };
        Ok((socket, ring_err))
    }

    /// Nothing queued: drains the link notifications; when there were
    /// some, whether the interface is gone (`ENODEV`) or still there.
    fn idle(&self) -> io::Error {
        let mut buf = [0u8; 8192];
        let mut news = false;
        loop {
            match sys::read(self.links.as_fd(), &mut buf) {
                Ok(_) => news = true,
                // ENOBUFS: notifications were lost; look anyway.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => news = true,
                Err(_) => break,
            }
        }
        if news && matches!(sys::if_name_of(self.fd.as_fd(), self.index), Ok(None)) {
            return io::Error::from_raw_os_error(libc::ENODEV);
        }
        io::ErrorKind::WouldBlock.into()
    }

    /// What a failed read means: `ENETDOWN`, a link down or an interface
    /// gone; an empty queue, perhaps one whose interface went away.
    fn read_error(&self, e: io::Error) -> io::Error {
        match e {
            e if e.raw_os_error() == Some(libc::ENETDOWN) => self.down_or_gone(),
            e if e.kind() == io::ErrorKind::WouldBlock => self.idle(),
            e => e,
        }
    }

    /// A frame was read: the link is up again.
    fn received(&self) {
        if self.down.load(Ordering::Relaxed) {
            self.down.store(false, Ordering::Relaxed);
        }
    }

    /// `ENETDOWN`: the link went down, or the interface is being deleted.
    fn down_or_gone(&self) -> io::Error {
        let deadline = Instant::now() + GONE_GRACE;
        loop {
            match sys::if_name_of(self.fd.as_fd(), self.index) {
                Ok(None) => return io::Error::from_raw_os_error(libc::ENODEV),
                Ok(Some(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                // Still there: only down. The kernel rebinds on link up.
                Ok(Some(_)) | Err(_) => {
                    self.down.store(true, Ordering::Relaxed);
                    return io::ErrorKind::WouldBlock.into();
                }
            }
        }
    }
}

/// Completes a partial transport checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`)
/// in `frame`, as the kernel's `skb_checksum_help` does: the field holds
/// the pseudo-header sum; the sum from `csum_start` on, complemented, goes
/// there. Returns false when the header points outside the frame.
pub fn complete_checksum(hdr: &VnetHdr, frame: &mut [u8]) -> bool {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if start >= frame.len() || at + 2 > frame.len() {
        return false;
    }
    let c = csum::checksum(&frame[start..]);
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

impl FrameIo for RawSocket {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut h = [0u8; VNET_HDR_LEN];
            let got = if self.vnet_hdr {
                sys::packet_recv(self.fd.as_fd(), &mut [IoSliceMut::new(buf)])
            } else {
                sys::packet_recv(
                    self.fd.as_fd(),
                    &mut [IoSliceMut::new(&mut h), IoSliceMut::new(buf)],
                )
            };
            let (n, pkttype) = got.map_err(|e| self.read_error(e))?;
            self.received();
            if matches!(pkttype, libc::PACKET_OUTGOING | libc::PACKET_OTHERHOST) {
                continue;
            }
            if self.vnet_hdr {
                return Ok(n);
            }
            let n = n.saturating_sub(VNET_HDR_LEN).min(buf.len());
            let hdr = VnetHdr::parse(&h).unwrap_or_default();
            if hdr.is_gso() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a super-frame on a raw uplink without offload",
                ));
            }
            if hdr.flags & F_NEEDS_CSUM != 0 && !complete_checksum(&hdr, &mut buf[..n]) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a partial checksum outside the frame",
                ));
            }
            return Ok(n);
        }
    }

    fn write(&self, frame: &[u8]) -> io::Result<()> {
        let zero = [0u8; VNET_HDR_LEN];
        let sent = if self.vnet_hdr {
            sys::packet_send(self.fd.as_fd(), &[IoSlice::new(frame)])
        } else {
            sys::packet_send(self.fd.as_fd(), &[IoSlice::new(&zero), IoSlice::new(frame)])
        };
        sent.map(drop)
    }

    fn poll_fd(&self) -> RawFd {
        self.ep.as_raw_fd()
    }

    fn batches(&self) -> bool {
        self.ring.is_some()
    }

    fn read_batch(&self, bufs: &mut [&mut [u8]], lens: &mut [usize]) -> io::Result<usize> {
        let Some(ring) = &self.ring else {
            return super::io::read_each(self, bufs, lens);
        };
        let (n, err) = ring.read_batch(self.fd.as_fd(), bufs, lens);
        match err {
            Some(e) if n == 0 => return Err(self.read_error(e)),
            // Reported once, so looked at even when the batch found frames.
            Some(e) if e.raw_os_error() == Some(libc::ENETDOWN) => {
                let e = self.down_or_gone();
                if e.raw_os_error() == Some(libc::ENODEV) {
                    return Err(e);
                }
            }
            _ => self.received(),
        }
        Ok(n)
    }

    fn write_batch(&self, frames: &[&[u8]]) -> usize {
        match &self.ring {
            Some(ring) => ring.write_batch(self.fd.as_fd(), frames),
            None => super::io::write_each(self, frames),
        }
    }

    fn link_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_a_partial_udp_checksum() {
        // IPv4 + UDP 10.0.0.1:1 -> 10.0.0.2:2, payload "hi", checksum field
        // holding the pseudo-header sum as a sender with offload leaves it.
        let mut f = vec![0u8; 14 + 20 + 8 + 2];
        f[14] = 0x45;
        f[14 + 9] = 17;
        f[14 + 12..14 + 16].copy_from_slice(&[10, 0, 0, 1]);
        f[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 2]);
        let u = 14 + 20;
        f[u..u + 8].copy_from_slice(&[0, 1, 0, 2, 0, 10, 0, 0]);
        f[u + 8..].copy_from_slice(b"hi");
        let pseudo = csum::pseudo_header([10, 0, 0, 1], [10, 0, 0, 2], 17, 10);
        f[u + 6..u + 8].copy_from_slice(&(csum::fold(u64::from(pseudo)) as u16).to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: u as u16,
            csum_offset: 6,
            ..Default::default()
        };
        assert!(complete_checksum(&hdr, &mut f));
        // A complete checksum sums (with the pseudo header) to 0xffff.
        let total = csum::fold(u64::from(csum::sum(&f[u..])) + u64::from(pseudo));
        assert_eq!(total, 0xffff);
    }

    #[test]
    fn refuses_a_checksum_offset_past_the_frame() {
        let mut f = vec![0u8; 40];
        for (start, offset) in [(40, 0), (30, 9), (u16::MAX, u16::MAX)] {
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: start,
                csum_offset: offset,
                ..Default::default()
            };
            assert!(!complete_checksum(&hdr, &mut f), "{start} {offset}");
        }
    }
}
