//! Linux TAP devices (`/dev/net/tun` with `IFF_TAP | IFF_NO_PI`).
//!
//! Contract:
//! - One [`Tap::recv`] returns one Ethernet frame (no packet-info header; with
//!   [`TapOptions::vnet_hdr`] the frame is preceded by a [`VNET_HDR_LEN`]-byte
//!   `struct virtio_net_hdr`). A frame longer than the buffer is truncated by the
//!   kernel, so size buffers for `mtu + 14` (+ the vnet header). The fd is
//!   non-blocking: an empty queue is `ErrorKind::WouldBlock`.
//! - One [`Tap::send`] writes one whole frame; the kernel never writes part of one.
//! - Both take `&self`: several threads may send on the same `Tap` (each write is
//!   one syscall and is atomic for TAP). Reads from several threads are also safe but
//!   each frame goes to only one reader.
//! - Lifetime: the kernel removes a non-persistent TAP when its last fd is closed,
//!   so dropping the last [`Tap`] (the first queue and every [`Tap::open_queue`]
//!   queue) deletes the device, its addresses and routes. A device made persistent
//!   by someone else (`ip tuntap add ... `) stays; we only attach to it.
//! - Namespaces: [`Tap::open`] can create the device in another network namespace.
//!   The calling thread's own namespace never changes: the work runs on a
//!   short-lived thread (see [`super::netns`]). The fd stays bound to that
//!   namespace and can be used from any thread.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

use socket2::{Domain, Socket, Type};

use super::netns::run_in_netns_file;
use super::sys::{self, IfNameError, MAX_IFNAME_LEN};

/// Path of the TUN/TAP clone device.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// Length of the `struct virtio_net_hdr` (linux/virtio_net.h, defined with its
/// layout in [`crate::wire::vnet`]) that prefixes every frame when
/// [`TapOptions::vnet_hdr`] is set. We set this size explicitly with
/// `TUNSETVNETHDRSZ`; no offloads are enabled, so on receive the header is all
/// zero (`VIRTIO_NET_HDR_GSO_NONE`, no checksum flags) unless the caller enables
/// offloads with [`Tap::set_offload`]. On send, prefix a zeroed header.
pub use crate::wire::vnet::VNET_HDR_LEN;

/// The transmit queue length given to every TAP we open (`txqueuelen`).
///
/// On a TAP this is the length of each queue's ring of frames waiting for
/// the reader (`dev->tx_queue_len` sizes tun's per-queue `ptr_ring`), and
/// the one place frames sent towards the gateway are lost: tun never stops
/// the device's queue when its ring is full, so the qdisc in front of it
/// never holds anything back and the sender never blocks; a full ring drops
/// the frame (the device's `tx_dropped`). The kernel's default, 1000, drops
/// a burst of 64-byte datagrams once the sender is a few milliseconds ahead
/// of the gateway; 4096 holds four times that. Each held frame pins its
/// buffer, so the ring is not made larger than that: a sender faster than
/// the gateway for longer than the ring lasts loses the excess whatever its
/// size (the bench's sustained UDP flood).
///
/// The socket send buffer of the tun file (`TUNSETSNDBUF`, for frames the
/// gateway writes) is left at the kernel's default, `INT_MAX`: it never
/// limits.
pub const TX_QUEUE_LEN: u32 = 4096;

/// How to open a TAP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapOptions {
    /// `IFF_MULTI_QUEUE`: allow more queues with [`Tap::open_queue`]. Must match
    /// how an existing persistent device was created, or `TUNSETIFF` fails.
    pub multi_queue: bool,
    /// `IFF_VNET_HDR`: every frame carries a [`VNET_HDR_LEN`]-byte virtio-net header.
    pub vnet_hdr: bool,
}

impl TapOptions {
    /// The `ifr_flags` for TUNSETIFF.
    fn flags(self) -> libc::c_short {
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if self.multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        if self.vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        // All IFF_* tun flags fit in 16 bits (linux/if_tun.h); ifr_flags is a short.
        flags as libc::c_short
    }
}

/// A failed step while opening a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit in `ifr_name`.
    #[error("interface name {name:?} is longer than {MAX_IFNAME_LEN} bytes")]
    NameTooLong { name: String },
    /// The name is empty or has a byte the kernel rejects.
    #[error("interface name {name:?} is empty or contains '/', ':', whitespace or NUL")]
    InvalidName { name: String },
    /// The namespace file could not be opened.
    #[error("failed to open network namespace {}", path.display())]
    OpenNetns { path: PathBuf, source: io::Error },
    /// Spawning the helper thread or `setns` failed.
    #[error("failed to enter network namespace {}", path.display())]
    EnterNetns { path: PathBuf, source: io::Error },
    /// The AF_INET socket used for interface ioctls could not be created.
    #[error("failed to create a control socket for interface ioctls")]
    ControlSocket { source: io::Error },
    /// SIOCGIFINDEX failed with something other than "no such device".
    #[error("failed to look up interface {name}")]
    LookupDevice { name: String, source: io::Error },
    /// `/dev/net/tun` could not be opened (module not loaded, no permission...).
    #[error("failed to open {TUN_DEVICE}")]
    OpenTunDevice { source: io::Error },
    /// TUNSETIFF failed (no CAP_NET_ADMIN, name taken by a non-TAP device, flags
    /// not matching an existing persistent device, queue busy...).
    #[error("failed to create or attach TAP device {name}")]
    CreateDevice { name: String, source: io::Error },
    /// TUNSETVNETHDRSZ failed.
    #[error("failed to set the virtio-net header size of {name}")]
    SetVnetHdrSize { name: String, source: io::Error },
    /// SIOCSIFMTU failed (for example an MTU below 68).
    #[error("failed to set the MTU of {name} to {mtu}")]
    SetMtu {
        name: String,
        mtu: u16,
        source: io::Error,
    },
    /// SIOCSIFTXQLEN failed.
    #[error("failed to set the transmit queue length of {name} to {qlen}")]
    SetTxQueueLen {
        name: String,
        qlen: u32,
        source: io::Error,
    },
    /// SIOCGIFFLAGS/SIOCSIFFLAGS failed.
    #[error("failed to bring {name} up")]
    BringUp { name: String, source: io::Error },
    /// F_SETFL O_NONBLOCK failed.
    #[error("failed to make the fd of {name} non-blocking")]
    SetNonBlocking { name: String, source: io::Error },
    /// [`Tap::open_queue`] on a TAP opened without [`TapOptions::multi_queue`].
    #[error("TAP {name} was not opened with multi_queue, so it cannot have more queues")]
    NotMultiQueue { name: String },
    /// Duplicating the kept namespace fd for [`Tap::open_queue`] failed.
    #[error("failed to duplicate the network namespace fd of {name}")]
    DupNetns { name: String, source: io::Error },
}

/// One queue of a TAP device. See the module docs for the contract.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
    opts: TapOptions,
    /// The namespace the device lives in (`None`: the opener's), kept open so
    /// [`Tap::open_queue`] can re-enter it even if its bind mount is removed.
    netns: Option<NetnsRef>,
}

/// An open network namespace and the path it was opened from (for messages).
#[derive(Debug)]
struct NetnsRef {
    path: PathBuf,
    file: File,
}

fn name_error(name: &str, err: IfNameError) -> TapError {
    match err {
        IfNameError::TooLong => TapError::NameTooLong { name: name.into() },
        IfNameError::Empty | IfNameError::BadByte => TapError::InvalidName { name: name.into() },
    }
}

fn check_name(name: &str) -> Result<(), TapError> {
    sys::ifreq_for(name)
        .map(drop)
        .map_err(|e| name_error(name, e))
}

/// Open `/dev/net/tun` and TUNSETIFF it as `name`; returns the fd and the name
/// the kernel reports back. Runs in the current thread's namespace.
fn attach(name: &str, opts: TapOptions) -> Result<(File, String), TapError> {
    let mut ifr = sys::ifreq_for(name).map_err(|e| name_error(name, e))?;
    ifr.ifr_ifru.ifru_flags = opts.flags();
    // std opens with O_CLOEXEC; the File owns the fd from here on.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_DEVICE)
        .map_err(|source| TapError::OpenTunDevice { source })?;
    sys::tun_set_iff(file.as_fd(), &mut ifr).map_err(|source| TapError::CreateDevice {
        name: name.into(),
        source,
    })?;
    let name = sys::ifreq_name(&ifr);
    if opts.vnet_hdr {
        sys::tun_set_vnet_hdr_sz(file.as_fd(), VNET_HDR_LEN as libc::c_int).map_err(|source| {
            TapError::SetVnetHdrSize {
                name: name.clone(),
                source,
            }
        })?;
    }
    sys::set_nonblocking(file.as_fd()).map_err(|source| TapError::SetNonBlocking {
        name: name.clone(),
        source,
    })?;
    Ok((file, name))
}

/// Create or attach the first queue, set the MTU and bring the link up. Runs in
/// the current thread's namespace.
fn open_here(name: &str, mtu: u16, opts: TapOptions) -> Result<Tap, TapError> {
    let ctl = Socket::new(Domain::IPV4, Type::DGRAM, None)
        .map_err(|source| TapError::ControlSocket { source })?;
    // Racy if someone else creates the same name at the same moment; `created` is
    // informational only (the kernel alone decides when the device goes away).
    let existed = sys::if_index(ctl.as_fd(), name)
        .map_err(|source| TapError::LookupDevice {
            name: name.into(),
            source,
        })?
        .is_some();
    let (file, name) = attach(name, opts)?;
    sys::set_mtu(ctl.as_fd(), &name, mtu).map_err(|source| TapError::SetMtu {
        name: name.clone(),
        mtu,
        source,
    })?;
    sys::set_tx_queue_len(ctl.as_fd(), &name, TX_QUEUE_LEN).map_err(|source| {
        TapError::SetTxQueueLen {
            name: name.clone(),
            qlen: TX_QUEUE_LEN,
            source,
        }
    })?;
    sys::bring_up(ctl.as_fd(), &name).map_err(|source| TapError::BringUp {
        name: name.clone(),
        source,
    })?;
    Ok(Tap {
        file,
        name,
        created: !existed,
        opts,
        netns: None,
    })
}

impl Tap {
    /// Create (or attach to an existing persistent) TAP `name` with
    /// `IFF_TAP | IFF_NO_PI` (+ `opts`), inside the network namespace at `netns`
    /// (`/run/netns/NAME` or `/proc/PID/ns/net`) when given, else in the caller's
    /// namespace. Sets the link's MTU, brings it up (in that namespace) and makes
    /// the fd non-blocking.
    ///
    /// The calling thread's namespace is never changed: with `netns`, the work
    /// runs on a short-lived thread. A panic there cannot happen short of a bug; it
    /// would be resumed here.
    pub fn open(
        name: &str,
        netns: Option<&Path>,
        mtu: u16,
        opts: TapOptions,
    ) -> Result<Tap, TapError> {
        check_name(name)?;
        let Some(path) = netns else {
            return open_here(name, mtu, opts);
        };
        let open_err = |source| TapError::OpenNetns {
            path: path.into(),
            source,
        };
        let ns = File::open(path).map_err(open_err)?;
        let keep = ns.try_clone().map_err(open_err)?;
        let owned_name = name.to_owned();
        let mut tap = run_in_netns_file(ns, move || open_here(&owned_name, mtu, opts)).map_err(
            |source| TapError::EnterNetns {
                path: path.into(),
                source,
            },
        )??;
        tap.netns = Some(NetnsRef {
            path: path.into(),
            file: keep,
        });
        Ok(tap)
    }

    /// Open one more queue of this multi-queue TAP (`IFF_MULTI_QUEUE`): another fd
    /// on the same device, in the same namespace, non-blocking. The kernel spreads
    /// received frames over the queues by flow hash; any queue may send.
    /// The device lives until the last queue is dropped.
    pub fn open_queue(&self) -> Result<Tap, TapError> {
        if !self.opts.multi_queue {
            return Err(TapError::NotMultiQueue {
                name: self.name.clone(),
            });
        }
        let opts = self.opts;
        let name = self.name.clone();
        let (file, netns) = match &self.netns {
            None => (attach(&name, opts)?.0, None),
            Some(ns) => {
                let dup = || {
                    ns.file.try_clone().map_err(|source| TapError::DupNetns {
                        name: name.clone(),
                        source,
                    })
                };
                let for_thread = dup()?;
                let keep = dup()?;
                let thread_name = name.clone();
                let file = run_in_netns_file(for_thread, move || attach(&thread_name, opts))
                    .map_err(|source| TapError::EnterNetns {
                        path: ns.path.clone(),
                        source,
                    })??
                    .0;
                let netns = NetnsRef {
                    path: ns.path.clone(),
                    file: keep,
                };
                (file, Some(netns))
            }
        };
        Ok(Tap {
            file,
            name,
            created: false,
            opts,
            netns,
        })
    }

    /// The interface name (as reported back by the kernel).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the device did not exist before [`Tap::open`] (always `false` for
    /// [`Tap::open_queue`]). Informational: a non-persistent device goes away
    /// with its last fd either way.
    pub fn created(&self) -> bool {
        self.created
    }

    /// The options the TAP was opened with.
    pub fn options(&self) -> TapOptions {
        self.opts
    }

    /// Bytes of virtio-net header before each frame: [`VNET_HDR_LEN`] with
    /// [`TapOptions::vnet_hdr`], else 0.
    pub fn vnet_hdr_len(&self) -> usize {
        if self.opts.vnet_hdr {
            VNET_HDR_LEN
        } else {
            0
        }
    }

    /// `TUNSETOFFLOAD` with `TUN_F_*` flags (libc::TUN_F_CSUM, ...). Only
    /// meaningful with [`TapOptions::vnet_hdr`], where the header then describes
    /// partial checksums and GSO.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        sys::tun_set_offload(self.file.as_fd(), flags)
    }

    /// Read one frame into `buf`; `ErrorKind::WouldBlock` when none is queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        sys::read(self.file.as_fd(), buf)
    }

    /// Write one whole frame. `ErrorKind::WouldBlock` is not expected (TAP writes
    /// do not block), but callers should treat it as a drop.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let n = sys::write(self.file.as_fd(), frame)?;
        if n == frame.len() {
            Ok(())
        } else {
            // The tun driver accepts whole frames or fails; a short count would be a kernel bug.
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to TAP device",
            ))
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn tap_is_send_sync() {
        assert_send_sync::<Tap>();
    }

    #[test]
    fn flags_follow_options() {
        let base = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        assert_eq!(TapOptions::default().flags(), base);
        let all = TapOptions {
            multi_queue: true,
            vnet_hdr: true,
        };
        assert_eq!(
            all.flags(),
            base | (libc::IFF_MULTI_QUEUE | libc::IFF_VNET_HDR) as libc::c_short
        );
    }

    #[test]
    fn name_too_long_is_rejected_before_any_syscall() {
        let name = "x".repeat(MAX_IFNAME_LEN + 1);
        // A netns path that does not exist proves no step after validation ran.
        let err = Tap::open(
            &name,
            Some(Path::new("/nonexistent")),
            1500,
            TapOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, TapError::NameTooLong { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("interface name {name:?} is longer than 15 bytes")
        );
    }

    #[test]
    fn invalid_names_are_rejected() {
        for name in ["", "a/b", "a b"] {
            let err = Tap::open(name, None, 1500, TapOptions::default()).unwrap_err();
            assert!(
                matches!(err, TapError::InvalidName { .. }),
                "{name:?}: {err:?}"
            );
        }
    }

    #[test]
    fn missing_netns_is_open_netns_error() {
        let err = Tap::open(
            "t0",
            Some(Path::new("/nonexistent/ns")),
            1500,
            TapOptions::default(),
        )
        .unwrap_err();
        match err {
            TapError::OpenNetns { path, source } => {
                assert_eq!(path, Path::new("/nonexistent/ns"));
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }
}
