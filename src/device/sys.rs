//! Raw system calls for the device layer: the only module in tapnat with `unsafe`.
//!
//! Every function here is a safe wrapper around one system call (or one ioctl).
//! File descriptors are taken as [`BorrowedFd`], so the caller keeps ownership,
//! and any new descriptor is wrapped in an [`OwnedFd`] before the function returns.
//! Constants and structs come from `libc` (its `linux/if_tun.h` and `linux/if.h`
//! bindings); nothing here is hand-typed.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Why an interface name cannot be copied into `ifreq.ifr_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfNameError {
    /// The name is empty.
    Empty,
    /// The name does not fit in `IFNAMSIZ - 1` bytes (one byte is kept for the NUL).
    TooLong,
    /// The name has a byte the kernel rejects (NUL, `/`, `:` or whitespace; see
    /// `dev_valid_name` in net/core/dev.c), or is `.` or `..`.
    BadByte,
}

/// Longest interface name the kernel accepts, in bytes (`IFNAMSIZ` minus the NUL).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

/// A zeroed `ifreq` whose `ifr_name` holds `name`, NUL-terminated.
pub fn ifreq_for(name: &str) -> Result<libc::ifreq, IfNameError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err(IfNameError::Empty);
    }
    if bytes.len() > MAX_IFNAME_LEN {
        return Err(IfNameError::TooLong);
    }
    if name == "."
        || name == ".."
        || bytes
            .iter()
            .any(|&b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return Err(IfNameError::BadByte);
    }
    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers,
    // sockaddrs and one raw pointer); the all-zero bit pattern is valid for each.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // The rest of ifr_name is already zero, so the name is NUL-terminated.
    Ok(ifr)
}

/// The interface name stored in `ifr.ifr_name`, up to its first NUL.
pub fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `ioctl(fd, TUNSETIFF, ifr)`: create or attach the TUN/TAP device named in `ifr`
/// with the flags in `ifr.ifr_ifru.ifru_flags`. The kernel writes the final name back.
///
/// The device is created in the network namespace `fd` was opened in (see
/// `tun_set_iff` in drivers/net/tun.c, which uses the tun file's socket netns).
pub fn tun_set_iff(fd: BorrowedFd<'_>, ifr: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `fd` is a live descriptor for the whole call, and TUNSETIFF reads and
    // writes exactly one `struct ifreq`, which `ifr` points to and which outlives the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, ifr as *mut libc::ifreq) })?;
    Ok(())
}

/// `ioctl(fd, TUNSETVNETHDRSZ, &size)`: the length of the virtio-net header
/// that prefixes every frame read or written on an `IFF_VNET_HDR` device.
pub fn tun_set_vnet_hdr_sz(fd: BorrowedFd<'_>, size: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is live; TUNSETVNETHDRSZ reads one `int` through the pointer,
    // which points to a local that outlives the call.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETVNETHDRSZ,
            &size as *const libc::c_int,
        )
    })?;
    Ok(())
}

/// `ioctl(fd, TUNSETOFFLOAD, flags)`: which `TUN_F_*` offloads the kernel may hand us.
pub fn tun_set_offload(fd: BorrowedFd<'_>, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: `fd` is live; TUNSETOFFLOAD takes its argument by value (an unsigned
    // long), not through a pointer, so no memory is accessed.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) })?;
    Ok(())
}

/// `setsockopt(sock, SOL_UDP, UDP_SEGMENT, size)`: every send on the UDP
/// socket `sock` is cut into datagrams of `size` payload bytes, by the
/// kernel or, with USO, by whoever takes the super-frame (a QUIC stack's
/// GSO sends; used by the tests and the benchmark).
pub fn set_udp_segment(sock: BorrowedFd<'_>, size: u16) -> io::Result<()> {
    setsockopt_int(sock, libc::SOL_UDP, libc::UDP_SEGMENT, size.into())
}

/// `setsockopt(sock, SOL_UDP, UDP_GRO, on)`: the UDP socket `sock` takes
/// datagrams of one flow coalesced, one read for a super-frame that
/// arrived whole (the receiving side of [`set_udp_segment`]).
pub fn set_udp_gro(sock: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    setsockopt_int(sock, libc::SOL_UDP, libc::UDP_GRO, on.into())
}

/// `ioctl(sock, SIOCGIFINDEX, ifr)`: the interface index, or `None` when no
/// interface of that name exists in the socket's network namespace.
pub fn if_index(sock: BorrowedFd<'_>, name: &str) -> io::Result<Option<libc::c_int>> {
    let mut ifr = ifreq_for(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `sock` is live; SIOCGIFINDEX reads the name from and writes the index
    // into the `ifreq` that `ifr` points to, which outlives the call.
    let ret = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFINDEX,
            &mut ifr as *mut libc::ifreq,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENODEV) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    // SAFETY: the kernel filled the `ifru_ifindex` member of the union on success,
    // and every bit pattern is a valid `c_int` anyway.
    Ok(Some(unsafe { ifr.ifr_ifru.ifru_ifindex }))
}

/// `ioctl(sock, SIOCSIFMTU, ifr)` on any socket of the interface's namespace.
pub fn set_mtu(sock: BorrowedFd<'_>, name: &str, mtu: u16) -> io::Result<()> {
    let mut ifr = ifreq_for(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    ifr.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
    // SAFETY: `sock` is live; SIOCSIFMTU reads one `ifreq` (name and mtu) from the
    // pointer, which points to a local that outlives the call.
    cvt(unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCSIFMTU,
            &mut ifr as *mut libc::ifreq,
        )
    })?;
    Ok(())
}

/// `ioctl(sock, SIOCSIFTXQLEN, ifr)`: the interface's transmit queue length.
/// On a TUN/TAP device this is also the size of each queue's `ptr_ring`, the
/// frames the kernel holds for the reader before it drops (drivers/net/tun.c
/// resizes the rings on the change).
pub fn set_tx_queue_len(sock: BorrowedFd<'_>, name: &str, qlen: u32) -> io::Result<()> {
    let mut ifr = ifreq_for(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    ifr.ifr_ifru.ifru_ifindex =
        libc::c_int::try_from(qlen).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `sock` is live; SIOCSIFTXQLEN reads one `ifreq` (name and the
    // `ifr_qlen` int, the same union member as `ifru_ifindex`) from the
    // pointer, which points to a local that outlives the call.
    cvt(unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCSIFTXQLEN,
            &mut ifr as *mut libc::ifreq,
        )
    })?;
    Ok(())
}

/// Set `IFF_UP` on the interface (SIOCGIFFLAGS, then SIOCSIFFLAGS), keeping its other flags.
pub fn bring_up(sock: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let mut ifr = ifreq_for(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `sock` is live; SIOCGIFFLAGS reads the name from and writes the flags
    // into the `ifreq` that `ifr` points to, which outlives the call.
    cvt(unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFFLAGS,
            &mut ifr as *mut libc::ifreq,
        )
    })?;
    // SAFETY: SIOCGIFFLAGS succeeded, so the kernel wrote `ifru_flags`; any bit
    // pattern is a valid `c_short` anyway.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS only reads the `ifreq`.
    cvt(unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCSIFFLAGS,
            &mut ifr as *mut libc::ifreq,
        )
    })?;
    Ok(())
}

/// Set `O_NONBLOCK` on `fd` (F_GETFL, then F_SETFL), keeping its other status flags.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is live; F_GETFL takes no argument and touches no memory.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: `fd` is live; F_SETFL takes an int by value.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    }
    Ok(())
}

/// `setns(fd, CLONE_NEWNET)`: move the *calling thread* into the network
/// namespace `fd` refers to (a file from /run/netns/NAME or /proc/PID/ns/net).
pub fn setns_net(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is live; setns takes only integers and touches no memory of ours.
    cvt(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) })?;
    Ok(())
}

/// `eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)`, owned at once.
pub fn eventfd_nonblocking() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes only integers; it returns a new descriptor or -1.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by eventfd, is open, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new non-blocking, close-on-exec inotify instance.
pub fn inotify_nonblocking() -> io::Result<OwnedFd> {
    // SAFETY: inotify_init1 takes only flags; it returns a new descriptor or -1.
    let fd = cvt(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by inotify_init1, is open, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `inotify_add_watch(2)`: watch `path` for the events in `mask`.
pub fn inotify_add_watch(fd: BorrowedFd<'_>, path: &std::path::Path, mask: u32) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `fd` is live and `c` is a NUL-terminated string that outlives the call.
    cvt(unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) })?;
    Ok(())
}

/// `read(2)` into `buf`.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `fd` is live and `buf` is valid for writes of `buf.len()` bytes for
    // the whole call.
    cvt_size(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// `write(2)` from `buf`.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `fd` is live and `buf` is valid for reads of `buf.len()` bytes for
    // the whole call.
    cvt_size(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
}

/// `poll(2)` over `fds`; `timeout_ms < 0` waits forever. Returns how many
/// entries have a non-zero `revents`.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    let nfds = libc::nfds_t::try_from(fds.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `fds` is valid for reads and writes of `fds.len()` pollfd entries for
    // the whole call, and `nfds` is exactly that length.
    let n = cvt(unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout_ms) })?;
    Ok(n as usize)
}

#[cfg(feature = "lab")]
/// `socket(AF_PACKET, SOCK_RAW, ETH_P_ALL)` bound to interface `ifindex` of the
/// calling thread's namespace: sends and receives whole Ethernet frames.
pub fn packet_socket(ifindex: libc::c_int) -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket takes only integers; it returns a new descriptor or -1.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::c_int::from(proto),
        )
    })?;
    // SAFETY: `fd` was just returned by socket, is open, and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as libc::c_ushort;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex;
    // SAFETY: `sll` is a valid sockaddr_ll that outlives the call and the length
    // passed is exactly its size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// Pins the calling thread to CPU `cpu` (`sched_setaffinity(0, ...)`).
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE, checked above, so CPU_SET stays in bounds.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t that outlives the call and the size passed is its size.
    cvt(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}

/// One eBPF instruction (`struct bpf_insn`, linux/bpf.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfInsn {
    pub code: u8,
    /// Destination register in the low nibble, source in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// The `BPF_PROG_LOAD` part of `union bpf_attr` (linux/bpf.h); the kernel
/// accepts a shorter attr as long as the bytes it knows beyond it are zero.
#[repr(C)]
#[derive(Default)]
struct BpfProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// `BPF_PROG_LOAD` (linux/bpf.h `enum bpf_cmd`).
const BPF_PROG_LOAD: libc::c_long = 5;
/// `BPF_PROG_TYPE_SOCKET_FILTER` (linux/bpf.h `enum bpf_prog_type`): the type
/// TUN runs as a queue-steering program.
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// `TUNSETSTEERINGEBPF` = `_IOR('T', 224, int)` (linux/if_tun.h); not in libc.
const TUNSETSTEERINGEBPF: libc::c_ulong = 0x8004_54e0;

/// Loads a socket-filter eBPF program; the fd owns it.
pub fn bpf_load_socket_filter(insns: &[BpfInsn]) -> io::Result<OwnedFd> {
    let license = b"GPL\0";
    let attr = BpfProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: u32::try_from(insns.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid, fully initialised prefix of `union bpf_attr`
    // for BPF_PROG_LOAD whose pointers (`insns`, `license`) point to live
    // memory of the stated sizes for the whole call; the size passed is its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const BpfProgLoadAttr,
            std::mem::size_of::<BpfProgLoadAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `ioctl(tap, TUNSETSTEERINGEBPF, &prog)`: the device's queue for a frame it
/// hands to userspace becomes the program's return value modulo the number
/// of queues. The kernel keeps its own reference to the program.
pub fn tun_set_steering_ebpf(fd: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let prog_fd: libc::c_int = prog.as_raw_fd();
    // SAFETY: `fd` is live; TUNSETSTEERINGEBPF reads one int through the
    // pointer, which points to `prog_fd`, alive for the whole call.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            TUNSETSTEERINGEBPF as _,
            &prog_fd as *const libc::c_int,
        )
    })?;
    Ok(())
}

/// The credentials (pid, uid, gid) of the process at the other end of a
/// connected Unix socket, as the kernel recorded them at `connect(2)`
/// (`SO_PEERCRED`, unix(7)).
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` holds the size
    // of `cred`, so the kernel writes at most that many bytes; `fd` is a live
    // descriptor borrowed for the call.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(cred)
}

/// The calling process's effective user id.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// A new io_uring of `entries` submission slots (a power of two), with the
/// completion work deferred to our own `io_uring_enter` where the kernel has
/// it (`IORING_SETUP_COOP_TASKRUN`, 5.19), plainly otherwise.
///
/// The ring takes only `IORING_OP_READ` and `IORING_OP_WRITE`, with no SQE
/// flags (`IORING_REGISTER_RESTRICTIONS`, 5.10): work submitted through a
/// ring is not seen by the thread's seccomp filter, so without this the
/// ring would be a way around it (an `openat` or `connect` as an SQE).
pub fn uring_new(entries: u32) -> io::Result<io_uring::IoUring> {
    let ring = io_uring::IoUring::builder()
        .setup_coop_taskrun()
        .setup_r_disabled()
        .build(entries)
        .or_else(|_| {
            io_uring::IoUring::builder()
                .setup_r_disabled()
                .build(entries)
        })?;
    let mut only = [
        io_uring::register::Restriction::sqe_op(io_uring::opcode::Read::CODE),
        io_uring::register::Restriction::sqe_op(io_uring::opcode::Write::CODE),
    ];
    ring.submitter().register_restrictions(&mut only)?;
    ring.submitter().register_enable_rings()?;
    Ok(ring)
}

/// Reads one frame into each of `bufs` from `fd` through `ring`: one
/// `io_uring_enter` per `ring`-full, waiting for every read to complete.
/// `res[i]` is what `read(2)` would have returned for `bufs[i]` (a length,
/// or `-errno`: `-EAGAIN` when nothing was queued any more).
///
/// # Panics
/// If `res` is shorter than `bufs`.
pub fn uring_read_batch(
    ring: &mut io_uring::IoUring,
    fd: BorrowedFd<'_>,
    bufs: &mut [&mut [u8]],
    res: &mut [i32],
) {
    let fd = io_uring::types::Fd(fd.as_raw_fd());
    let res = &mut res[..bufs.len()];
    let entries = bufs.iter_mut().map(|b| {
        let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
        // Offset -1: the file position, as read(2) (tun ignores it).
        // RWF_NOWAIT: an empty queue completes with EAGAIN at once; without
        // it io_uring would arm a poll and the read wait for a frame (it
        // does not go by the fd's O_NONBLOCK).
        io_uring::opcode::Read::new(fd, b.as_mut_ptr(), len)
            .offset(u64::MAX)
            .rw_flags(libc::RWF_NOWAIT)
            .build()
    });
    // SAFETY: every entry points into one of `bufs`, which stay borrowed
    // (mutably, so nothing else touches them) until `uring_run` returns, and
    // it returns only once the kernel has completed every entry it was given.
    unsafe { uring_run(ring, entries, res) }
}

/// Writes each of `frames` to `fd` through `ring` (see [`uring_read_batch`]);
/// `res[i]` is what `write(2)` would have returned for `frames[i]`.
///
/// # Panics
/// If `res` is shorter than `frames`.
pub fn uring_write_batch(
    ring: &mut io_uring::IoUring,
    fd: BorrowedFd<'_>,
    frames: &[&[u8]],
    res: &mut [i32],
) {
    let fd = io_uring::types::Fd(fd.as_raw_fd());
    let res = &mut res[..frames.len()];
    let entries = frames.iter().map(|f| {
        let len = u32::try_from(f.len()).unwrap_or(u32::MAX);
        // RWF_NOWAIT: never wait (a TAP write does not block anyway).
        io_uring::opcode::Write::new(fd, f.as_ptr(), len)
            .offset(u64::MAX)
            .rw_flags(libc::RWF_NOWAIT)
            .build()
    });
    // SAFETY: every entry points into one of `frames`, borrowed until
    // `uring_run` returns, which is after the kernel completed every entry.
    unsafe { uring_run(ring, entries, res) }
}

/// Submits `entries` (one per slot of `res`) in ring-sized chunks and waits,
/// chunk by chunk, until every one has completed; `res[i]` gets the result
/// of the `i`-th entry.
///
/// # Safety
/// Every buffer an entry points to must stay valid, and not be accessed
/// otherwise, until this function returns. This function upholds its side:
/// it does not return while the kernel may still use an entry. If the kernel
/// refuses the ring itself (an `io_uring_enter` error other than EINTR,
/// EAGAIN or EBUSY, which cannot happen for a well-formed ring we own),
/// entries may be in flight with no way to wait for them, so the process
/// aborts rather than let the kernel write into freed memory.
unsafe fn uring_run(
    ring: &mut io_uring::IoUring,
    entries: impl Iterator<Item = io_uring::squeue::Entry>,
    res: &mut [i32],
) {
    let mut entries = entries.enumerate().peekable();
    while entries.peek().is_some() {
        let mut pushed = 0usize;
        {
            let mut sq = ring.submission();
            while !sq.is_full() {
                let Some((i, e)) = entries.next() else { break };
                let e = e.user_data(i as u64);
                // SAFETY: the caller keeps the entry's buffer valid until we
                // return; the queue is not full, so the push succeeds.
                if unsafe { sq.push(&e) }.is_err() {
                    break;
                }
                pushed += 1;
            }
        }
        let mut done = 0usize;
        while done < pushed {
            match ring.submit_and_wait(pushed - done) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    use std::io::Write as _;
                    let _ = writeln!(
                        std::io::stderr(),
                        "tapnat: io_uring_enter failed with entries in flight: {e}"
                    );
                    std::process::abort();
                }
            }
            for cqe in ring.completion() {
                if let Some(slot) = usize::try_from(cqe.user_data())
                    .ok()
                    .and_then(|i| res.get_mut(i))
                {
                    *slot = cqe.result();
                }
                done += 1;
            }
        }
    }
}

/// Switches the calling thread (only it: the raw system calls, not glibc's
/// wrappers, which signal every thread to do the same) to `uid` and `gid`,
/// with `gid` as its only group. Needs CAP_SETGID and CAP_SETUID; the
/// switch from uid 0 clears the thread's permitted and effective
/// capabilities.
pub fn set_thread_ids(uid: u32, gid: u32) -> io::Result<()> {
    let groups = [gid as libc::gid_t];
    // SAFETY: setgroups(2) reads `groups.len()` gids from a live array of
    // that many; the syscall takes no other memory.
    cvt(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) } as i32)?;
    // SAFETY: setresgid(2) and setresuid(2) take three integers and touch
    // no memory of ours.
    cvt(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) } as i32)?;
    // SAFETY: as above.
    cvt(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) } as i32)?;
    Ok(())
}

/// `PR_SET_NO_NEW_PRIVS` for the calling thread (and the threads it
/// spawns): no exec can grant privilege again.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl(2) with PR_SET_NO_NEW_PRIVS takes integers only.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    Ok(())
}

/// `socket(AF_PACKET, SOCK_RAW, 0)`: non-blocking, close-on-exec, and bound
/// to no protocol yet, so it receives nothing until [`packet_bind`].
pub fn packet_socket_unbound() -> io::Result<OwnedFd> {
    // SAFETY: socket takes only integers; it returns a new descriptor or -1.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: `fd` was just returned by socket, is open, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Attaches a classic BPF filter to a packet socket that drops, before
/// they are queued, frames of packet type `PACKET_OUTGOING` (our own
/// sends) and `PACKET_OTHERHOST` (unicast to another MAC, seen in
/// promiscuous mode): a plain `read` of the socket, which reports no
/// packet type, then returns only frames the gateway may take.
pub fn packet_drop_not_ours(fd: BorrowedFd<'_>) -> io::Result<()> {
    let op = |code: u32, jt: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf: 0,
        k,
    };
    let mut prog = [
        // A = skb->pkt_type
        op(
            libc::BPF_LD | libc::BPF_B | libc::BPF_ABS,
            0,
            (libc::SKF_AD_OFF + libc::SKF_AD_PKTTYPE) as u32,
        ),
        // Jumps count from the next instruction: both go to the drop.
        op(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            2,
            u32::from(libc::PACKET_OTHERHOST),
        ),
        op(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            1,
            u32::from(libc::PACKET_OUTGOING),
        ),
        // Keep the whole frame.
        op(libc::BPF_RET | libc::BPF_K, 0, u32::MAX),
        op(libc::BPF_RET | libc::BPF_K, 0, 0),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: `fd` is live; the kernel reads one sock_fprog through the
    // pointer and `len` instructions through its `filter`, both alive for
    // the call (it copies the program).
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// `bind(2)` a packet socket to interface `ifindex` for every protocol
/// (`ETH_P_ALL`): from now on it receives the interface's frames.
pub fn packet_bind(fd: BorrowedFd<'_>, ifindex: libc::c_int) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as libc::c_ushort;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = ifindex;
    // SAFETY: `fd` is live, `sll` is a valid sockaddr_ll that outlives the
    // call and the length passed is exactly its size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// `setsockopt(fd, level, name, &value, sizeof(int))`.
pub fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `fd` is live; the kernel reads exactly `sizeof(int)` bytes from
    // the pointer, which points to `value`, alive for the whole call.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// `getsockopt(fd, level, name)` of an `int` option.
pub fn getsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is live; `value` and `len` are valid for writes and `len`
    // holds the size of `value`, so the kernel writes at most that much.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// `ioctl(sock, SIOCGIFHWADDR)`: the interface's hardware (MAC) address.
pub fn if_hwaddr(sock: BorrowedFd<'_>, name: &str) -> io::Result<[u8; 6]> {
    let mut ifr = ifreq_for(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `sock` is live; SIOCGIFHWADDR reads the name from and writes a
    // sockaddr into the `ifreq` that `ifr` points to, which outlives the call.
    cvt(unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFHWADDR,
            &mut ifr as *mut libc::ifreq,
        )
    })?;
    // SAFETY: the ioctl succeeded, so the kernel wrote `ifru_hwaddr`; a
    // sockaddr is plain old data, valid for any bit pattern.
    let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, &b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = b as u8;
    }
    Ok(mac)
}

/// `ioctl(sock, SIOCGIFMTU)`: the interface's MTU.
pub fn if_mtu(sock: BorrowedFd<'_>, name: &str) -> io::Result<libc::c_int> {
    let mut ifr = ifreq_for(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `sock` is live; SIOCGIFMTU reads the name from and writes the MTU
    // into the `ifreq` that `ifr` points to, which outlives the call.
    cvt(unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFMTU,
            &mut ifr as *mut libc::ifreq,
        )
    })?;
    // SAFETY: the ioctl succeeded, so the kernel wrote `ifru_mtu`; any bit
    // pattern is a valid `c_int`.
    Ok(unsafe { ifr.ifr_ifru.ifru_mtu })
}

/// `ioctl(sock, SIOCGIFADDR)`: the interface's (first) IPv4 address, or
/// `None` when it has none. `sock` must be an AF_INET socket.
pub fn if_ipv4_addr(sock: BorrowedFd<'_>, name: &str) -> io::Result<Option<std::net::Ipv4Addr>> {
    let mut ifr = ifreq_for(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `sock` is live; SIOCGIFADDR reads the name from and writes a
    // sockaddr into the `ifreq` that `ifr` points to, which outlives the call.
    let ret = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFADDR,
            &mut ifr as *mut libc::ifreq,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    // SAFETY: the ioctl succeeded, so the kernel wrote `ifru_addr`, an
    // AF_INET sockaddr; a sockaddr is plain old data.
    let sa = unsafe { ifr.ifr_ifru.ifru_addr };
    // sockaddr_in: family (2 bytes), port (2), then the address.
    let d = sa.sa_data;
    Ok(Some(std::net::Ipv4Addr::new(
        d[2] as u8, d[3] as u8, d[4] as u8, d[5] as u8,
    )))
}

/// `ioctl(sock, SIOCGIFNAME)`: the name of interface `index` in the
/// socket's namespace, or `None` when there is no such interface.
pub fn if_name_of(sock: BorrowedFd<'_>, index: libc::c_int) -> io::Result<Option<String>> {
    // SAFETY: `ifreq` is plain old data; the all-zero bit pattern is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    ifr.ifr_ifru.ifru_ifindex = index;
    // SAFETY: `sock` is live; SIOCGIFNAME reads the index from and writes the
    // name into the `ifreq` that `ifr` points to, which outlives the call.
    let ret = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFNAME,
            &mut ifr as *mut libc::ifreq,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENODEV) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    Ok(Some(ifreq_name(&ifr)))
}

/// `recvmsg(2)` on a packet socket, scattering one frame over `bufs`;
/// returns its length and its `sll_pkttype` (`PACKET_HOST`,
/// `PACKET_OUTGOING`, ...).
pub fn packet_recv(fd: BorrowedFd<'_>, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<(usize, u8)> {
    // SAFETY: sockaddr_ll and msghdr are plain old data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // `IoSliceMut` is ABI-compatible with `struct iovec` on Unix (std docs).
    msg.msg_iov = bufs.as_mut_ptr().cast();
    msg.msg_iovlen = bufs.len() as _;
    // SAFETY: `fd` is live; `msg` points to `sll` (of the stated length) and
    // to `bufs.len()` iovecs, each valid for writes of its length, all alive
    // for the whole call.
    let n = cvt_size(unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) })?;
    Ok((n, sll.sll_pkttype))
}

/// `sendmsg(2)` of one frame gathered from `bufs` on a bound packet socket.
pub fn packet_send(fd: BorrowedFd<'_>, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: msghdr is plain old data; all-zero is valid (no name, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is ABI-compatible with `struct iovec` on Unix (std docs); the
    // kernel only reads through a sendmsg iovec.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    // SAFETY: `fd` is live; `msg` points to `bufs.len()` iovecs, each valid
    // for reads of its length for the whole call.
    cvt_size(unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) })
}

/// A non-blocking rtnetlink socket of the calling thread's namespace that
/// receives the link notifications (`RTMGRP_LINK`: a link added, changed
/// or deleted).
pub fn netlink_link_events() -> io::Result<OwnedFd> {
    // SAFETY: socket takes only integers; it returns a new descriptor or -1.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        )
    })?;
    // SAFETY: `fd` was just returned by socket, is open, and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
    let mut nl: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    nl.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    nl.nl_groups = libc::RTMGRP_LINK as u32;
    // SAFETY: `nl` is a valid sockaddr_nl that outlives the call and the
    // length passed is exactly its size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&nl as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// A new close-on-exec epoll instance watching each of `fds` for input
/// (level-triggered): poll(2) reports it readable while any of them is.
pub fn epoll_of(fds: &[BorrowedFd<'_>]) -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 takes only flags; it returns a new descriptor or -1.
    let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    // SAFETY: `ep` was just returned by epoll_create1 and nothing else owns it.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    for (i, fd) in fds.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: both descriptors are live; EPOLL_CTL_ADD reads one
        // epoll_event through the pointer, which points to `ev`, alive for
        // the call.
        cvt(unsafe {
            libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev)
        })?;
    }
    Ok(ep)
}

/// Asks the CPU to bring the cache line holding `*r` into its caches: a
/// hint with no effect on what the program computes (the flow table's
/// burst lookups). Not a system call, but here because the intrinsic is
/// `unsafe` (for its target feature, not for memory). A no-op on
/// architectures other than x86_64.
#[inline(always)]
pub fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of the x86_64 baseline, so PREFETCHT0 exists on
    // every CPU this runs on; a prefetch never faults and never writes, and
    // the address comes from a live reference anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (r as *const T).cast(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}

/// Asks the kernel to back the allocation of `v` (its whole capacity) with
/// transparent huge pages (`madvise(MADV_HUGEPAGE)` on the page-aligned
/// part): the flow table's large vectors are read at random, and with 4 KiB
/// pages nearly every lookup of a large table also misses the TLB. A hint:
/// contents are unchanged; where THP is off or the kernel refuses, the error
/// is returned and the memory stays as it was.
pub fn advise_huge_pages<T>(v: &Vec<T>) -> io::Result<()> {
    const PAGE: usize = 4096;
    let start = v.as_ptr() as usize;
    let end = start + v.capacity() * std::mem::size_of::<T>();
    let (lo, hi) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
    if hi <= lo {
        return Ok(());
    }
    // SAFETY: [lo, hi) lies inside the allocation `v` owns (rounded inwards
    // to pages), and MADV_HUGEPAGE changes only how the kernel backs those
    // pages, never what they hold; no Rust reference is invalidated.
    cvt(unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_ring_runs_reads_and_writes_and_refuses_everything_else() {
        let mut ring = match uring_new(8) {
            Ok(r) => r,
            // No io_uring in this kernel, or disabled: nothing to restrict.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => return,
            Err(e) => panic!("{e}"),
        };
        let fd = eventfd_nonblocking().unwrap();
        let mut res = [0i32; 1];
        uring_write_batch(&mut ring, fd.as_fd(), &[&1u64.to_ne_bytes()], &mut res);
        assert_eq!(res[0], 8, "a write through the ring");
        let mut buf = [0u8; 8];
        uring_read_batch(&mut ring, fd.as_fd(), &mut [&mut buf[..]], &mut res);
        assert_eq!(res[0], 8, "a read through the ring");
        // Any other operation is refused by the ring's restrictions.
        let nop = io_uring::opcode::Nop::new().build().user_data(0);
        // SAFETY: a NOP points to no memory.
        unsafe { uring_run(&mut ring, std::iter::once(nop), &mut res) };
        assert_eq!(res[0], -libc::EACCES, "a NOP through a restricted ring");
    }

    #[test]
    fn ifreq_copies_name_and_terminates_it() {
        let ifr = ifreq_for("tap0").unwrap();
        assert_eq!(
            &ifr.ifr_name[..5],
            &[b't' as libc::c_char, b'a' as _, b'p' as _, b'0' as _, 0]
        );
        assert!(ifr.ifr_name[4..].iter().all(|&c| c == 0));
        assert_eq!(ifreq_name(&ifr), "tap0");
    }

    #[test]
    fn ifreq_accepts_longest_name() {
        let name = "a".repeat(MAX_IFNAME_LEN);
        let ifr = ifreq_for(&name).unwrap();
        assert_eq!(ifr.ifr_name[MAX_IFNAME_LEN], 0);
        assert_eq!(ifreq_name(&ifr), name);
    }

    #[test]
    fn ifreq_rejects_too_long_name() {
        let name = "a".repeat(MAX_IFNAME_LEN + 1);
        assert_eq!(ifreq_for(&name).unwrap_err(), IfNameError::TooLong);
    }

    #[test]
    fn ifreq_rejects_empty_name() {
        assert_eq!(ifreq_for("").unwrap_err(), IfNameError::Empty);
    }

    #[test]
    fn ifreq_rejects_bad_bytes() {
        for name in ["a/b", "a:b", "a b", "a\0b", ".", "..", "a\tb"] {
            assert_eq!(
                ifreq_for(name).unwrap_err(),
                IfNameError::BadByte,
                "{name:?}"
            );
        }
    }

    #[test]
    fn eventfd_read_write_round_trip() {
        let fd = eventfd_nonblocking().unwrap();
        let mut buf = [0u8; 8];
        let err = read(fd.as_fd(), &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(write(fd.as_fd(), &2u64.to_ne_bytes()).unwrap(), 8);
        assert_eq!(read(fd.as_fd(), &mut buf).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(buf), 2);
    }
}
