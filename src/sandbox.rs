//! Least privilege after set-up: once the devices are open and the sockets
//! bound, every thread of `tapnat run` sets `PR_SET_NO_NEW_PRIVS`, drops
//! every capability (bounding, ambient, inheritable, permitted, effective),
//! switches to `run.run_as` if given, and installs a seccomp filter that
//! allows only the system calls its role makes (README "Security model").
//!
//! Capabilities, credentials, no_new_privs and seccomp filters all belong
//! to a thread on Linux, not to the process, so each thread does this
//! itself as the first thing it runs ([`enter`]), and the main thread does
//! it last ([`try_enter`]), after it has spawned every thread that needs
//! its privilege. A thread spawned by a sandboxed thread (a control socket
//! or metrics client) inherits its parent's state and filter, so the
//! parent's list covers the child too. The user is switched with the raw
//! system calls, per thread: glibc's `setresuid` would signal every thread
//! to switch, and the threads already sandboxed may not.
//!
//! Nothing happens unless [`prepare`] was called (only `tapnat run` does):
//! the library's users (tests, `tapnat demo`, `tapnat bench`) run as they
//! are.
//!
//! A call outside a thread's list kills the whole process with `SIGSYS`
//! (`SECCOMP_RET_KILL_PROCESS`): a gateway that lost a thread is no
//! gateway, and the supervisor restarts it. `run.seccomp = false` leaves
//! the filters out (for strace, or when a change adds a call).
//!
//! The lists were found by running the end-to-end tests (`tests/ops.rs`,
//! `tests/cli.rs`, `tests/sandbox.rs`) under `strace -f`, one list per thread
//! role in `allowed`. To extend one: trace the new code the same way
//! (`strace -ff -o /tmp/t -p PID`; each thread's trace starts with its
//! `prctl(PR_SET_NAME, "tapnat-...")`), add the calls to its role with a
//! comment, and run `cargo test --test sandbox`.
use std::collections::BTreeMap;
use std::sync::OnceLock;

use caps::{CapSet, Capability};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a thread does, and so which system calls it may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The main thread of `tapnat run` once set up: waits for signals and
    /// failures, re-reads the config on SIGHUP, notifies systemd, stops.
    Main,
    /// `tapnat-signals`: forwards signals to the main thread.
    Signals,
    /// `tapnat-wK`: reads, translates and writes frames.
    Worker,
    /// `tapnat-ctl`: the gateway's own stack, neighbours, namespace watch.
    Control,
    /// `tapnat-control` and the `tapnat-client` threads it spawns.
    ControlSocket,
    /// `tapnat-metrics` and the `tapnat-scrape` threads it spawns.
    Metrics,
    /// `tapnat-events`: copies flow events to `tapnat events` subscribers
    /// and writes the mapping log (opened by the main thread).
    Events,
}

const ROLES: [Role; 7] = [
    Role::Main,
    Role::Signals,
    Role::Worker,
    Role::Control,
    Role::ControlSocket,
    Role::Metrics,
    Role::Events,
];

/// Why the process could not lock itself down.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot build the seccomp filter: {0}")]
    Filter(#[from] seccompiler::BackendError),
    #[error("cannot install the seccomp filter: {0}")]
    Apply(#[from] seccompiler::Error),
    #[error("cannot drop capabilities: {0}")]
    Caps(#[from] caps::errors::CapsError),
    #[error("cannot switch to uid {uid} gid {gid}")]
    User {
        uid: u32,
        gid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("the sandbox was prepared twice")]
    Twice,
}

/// A user to switch to: uid and primary gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

/// The uid and primary gid of the user called `name` in `/etc/passwd`.
pub fn lookup_user(name: &str) -> std::io::Result<User> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    parse_passwd(name, &passwd).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no user {name:?} in /etc/passwd"),
        )
    })
}

fn parse_passwd(name: &str, passwd: &str) -> Option<User> {
    let f: Vec<&str> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[0] == name)?;
    Some(User {
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
    })
}

/// What every thread applies at [`enter`].
struct Plan {
    user: Option<User>,
    /// One compiled filter per role; `None`: `run.seccomp = false`.
    filters: Option<BTreeMap<Role, BpfProgram>>,
}

static PLAN: OnceLock<Plan> = OnceLock::new();

/// Makes every later [`enter`] lock its thread down: switch to `user`,
/// drop capabilities, no_new_privs, and (with `seccomp`) the role's filter.
/// Call once, before spawning any thread; the filters are compiled here,
/// so a filter that cannot be built fails before any device is opened.
pub fn prepare(user: Option<User>, seccomp: bool) -> Result<(), SandboxError> {
    let filters = if seccomp {
        let pid = std::process::id();
        let mut m = BTreeMap::new();
        for role in ROLES {
            m.insert(role, filter(role, pid)?);
        }
        Some(m)
    } else {
        None
    };
    PLAN.set(Plan { user, filters })
        .map_err(|_| SandboxError::Twice)
}

/// [`try_enter`] for a thread that has no way to report an error but to
/// stop: it panics, which stops the gateway (exit 70) rather than letting
/// it run with more privilege than documented.
pub fn enter(role: Role) {
    if let Err(e) = try_enter(role) {
        panic!("cannot drop privileges ({role:?} thread): {e}");
    }
}

/// Locks the calling thread down for `role` (nothing unless [`prepare`]
/// was called).
pub fn try_enter(role: Role) -> Result<(), SandboxError> {
    let Some(plan) = PLAN.get() else {
        return Ok(());
    };
    // The bounding set first: dropping from it needs CAP_SETPCAP, which the
    // switch of user takes away. Without CAP_SETPCAP (not started as root)
    // it stays; no_new_privs already keeps an exec from using it.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)? {
        caps::clear(None, CapSet::Bounding)?;
    }
    if let Some(u) = plan.user {
        crate::device::sys::set_thread_ids(u.uid, u.gid).map_err(|source| SandboxError::User {
            uid: u.uid,
            gid: u.gid,
            source,
        })?;
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::clear(None, CapSet::Effective)?;
    caps::clear(None, CapSet::Permitted)?;
    match &plan.filters {
        // apply_filter sets PR_SET_NO_NEW_PRIVS itself.
        Some(f) => seccompiler::apply_filter(&f[&role])?,
        None => crate::device::sys::set_no_new_privs().map_err(SandboxError::NoNewPrivs)?,
    }
    Ok(())
}

/// TEST-ONLY (debug builds): a system call that no role's list allows
/// (`getppid`); with the filters on the process dies of SIGSYS here.
#[cfg(debug_assertions)]
pub fn forbidden_syscall() -> u32 {
    std::os::unix::process::parent_id()
}

/// An allow-list entry: a system call, unconditionally or only with
/// argument `arg` equal to `value`.
enum Allow {
    Any(libc::c_long),
    ArgEq(libc::c_long, u8, u64),
}
use Allow::{Any, ArgEq};

/// What every thread needs: Rust std and glibc (memory, locks, thread
/// exit, the stack-overflow guard's `sigaltstack`), the panic machinery
/// (a panic message on stderr, `abort` on a double panic) and
/// signal-hook's handler, which runs in whichever thread a signal lands on
/// and writes a byte to its socket pair (`sendto`, then `rt_sigreturn`).
/// `write` also wakes other threads through their eventfds.
fn common(pid: u32) -> Vec<Allow> {
    let mut v = vec![
        // Memory: malloc arenas, thread stacks, guard pages.
        Any(libc::SYS_brk),
        Any(libc::SYS_mmap),
        Any(libc::SYS_munmap),
        Any(libc::SYS_mremap),
        Any(libc::SYS_mprotect),
        Any(libc::SYS_madvise),
        // Locks, channels, parking, condition variables.
        Any(libc::SYS_futex),
        Any(libc::SYS_sched_yield),
        // std::thread and glibc's pthread internals.
        Any(libc::SYS_sched_getaffinity),
        Any(libc::SYS_gettid),
        Any(libc::SYS_getpid),
        Any(libc::SYS_rt_sigprocmask),
        Any(libc::SYS_rt_sigreturn),
        Any(libc::SYS_sigaltstack),
        Any(libc::SYS_restart_syscall),
        Any(libc::SYS_exit),
        Any(libc::SYS_exit_group),
        // abort() on a double panic signals its own thread only.
        ArgEq(libc::SYS_tgkill, 0, u64::from(pid)),
        // Time (normally the vDSO), sleeps, hash seeds.
        Any(libc::SYS_clock_gettime),
        Any(libc::SYS_clock_nanosleep),
        Any(libc::SYS_nanosleep),
        Any(libc::SYS_getrandom),
        // stderr, eventfd wake-ups, dropping descriptors.
        Any(libc::SYS_write),
        Any(libc::SYS_close),
        // signal-hook's handler: send(fd, "X", 1, MSG_DONTWAIT).
        Any(libc::SYS_sendto),
        // glibc's malloc reads /proc/sys/vm/overcommit_memory (read-only,
        // O_CLOEXEC; then `read`, in every role's list) the first time it
        // shrinks a thread arena's heap: a worker freeing memory after a
        // flood was killed here.
        ArgEq(
            libc::SYS_openat,
            2,
            (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
        ),
    ];
    v.extend(poll());
    v
}

/// poll(2) where the architecture has it, ppoll(2) everywhere.
fn poll() -> Vec<Allow> {
    vec![
        #[cfg(target_arch = "x86_64")]
        Any(libc::SYS_poll),
        Any(libc::SYS_ppoll),
    ]
}

/// A thread that spawns threads (one per client), and what the new thread
/// does before its own code runs, under its parent's filter.
fn spawns() -> Vec<Allow> {
    vec![
        Any(libc::SYS_clone3),
        Any(libc::SYS_clone),
        Any(libc::SYS_rseq),
        Any(libc::SYS_set_robust_list),
        // std names the new thread; no other prctl.
        ArgEq(libc::SYS_prctl, 0, libc::PR_SET_NAME as u64),
    ]
}

/// A thread that serves stream-socket clients: accept, read the request
/// (with timeouts), write the answer.
fn serves() -> Vec<Allow> {
    vec![
        Any(libc::SYS_accept4),
        Any(libc::SYS_accept),
        Any(libc::SYS_read),
        Any(libc::SYS_recvfrom),
        Any(libc::SYS_setsockopt),
        Any(libc::SYS_fcntl),
        Any(libc::SYS_shutdown),
    ]
}

/// A raw (AF_PACKET) uplink's frames (`recvmsg`/`sendmsg` with the
/// virtio-net header), and on a link notification (read from its netlink
/// socket) the interface's name by index, to tell a deleted interface from
/// one that went down (`ioctl(SIOCGIFNAME)`, and no other ioctl).
fn raw_uplink() -> Vec<Allow> {
    vec![
        Any(libc::SYS_recvmsg),
        Any(libc::SYS_sendmsg),
        ArgEq(libc::SYS_ioctl, 1, libc::SIOCGIFNAME),
    ]
}

/// The system calls `role` may make, beyond [`common`]. Each list is what
/// the threads of that role were seen to make under `strace -f`, plus the
/// variants libc/std may use for the same thing (`accept`/`accept4`,
/// `poll`/`ppoll`, `statx`/`newfstatat`).
///
/// Calls the features being written would add (say so in the role when
/// they land): a pcap capture or event stream over the control socket
/// writes on a client's socket (`write`/`sendto`, here already) and, for a
/// capture file, `openat` + `write` in the thread that opens it; a mapping
/// log reopened on SIGHUP needs `openat` (here in [`Role::Main`]) and
/// `write`/`fdatasync` where it is written; a DHCP client needs `socket`
/// (AF_INET, SOCK_DGRAM), `bind`, `setsockopt`, `sendto`, `recvfrom` in its
/// thread, or nothing new if it speaks through the TAP; an AF_PACKET
/// uplink opened before set-up needs `recvfrom`/`sendto` or
/// `recvmmsg`/`sendmmsg` in [`Role::Worker`] (and `poll`, here already).
fn allowed(role: Role) -> Vec<Allow> {
    match role {
        Role::Main => vec![
            // SIGHUP: re-read the config file.
            Any(libc::SYS_openat),
            Any(libc::SYS_read),
            Any(libc::SYS_lseek),
            Any(libc::SYS_statx),
            Any(libc::SYS_newfstatat),
            Any(libc::SYS_fstat),
            Any(libc::SYS_fcntl),
            // sd_notify: a datagram to $NOTIFY_SOCKET (READY, STOPPING).
            ArgEq(libc::SYS_socket, 0, libc::AF_UNIX as u64),
            Any(libc::SYS_connect),
            Any(libc::SYS_sendmsg),
            // At stop: remove the control socket.
            #[cfg(target_arch = "x86_64")]
            Any(libc::SYS_unlink),
            Any(libc::SYS_unlinkat),
            Any(libc::SYS_geteuid),
            Any(libc::SYS_getuid),
        ],
        Role::Signals => vec![
            // signal-hook's iterator: wait on its socket pair.
            Any(libc::SYS_read),
            Any(libc::SYS_recvfrom),
            Any(libc::SYS_fcntl),
        ],
        Role::Worker => vec![
            // Frames from the TAP queues, wake-ups from the eventfd.
            Any(libc::SYS_read),
            Any(libc::SYS_readv),
            Any(libc::SYS_writev),
            // workers.io_uring: a burst's reads or writes through the
            // queue's ring (set up before the filter; the ring itself is
            // restricted to reads and writes, see `device::sys::uring_new`).
            Any(libc::SYS_io_uring_enter),
            // workers.pin: pin this thread to its CPU.
            Any(libc::SYS_sched_setaffinity),
        ]
        .into_iter()
        .chain(raw_uplink())
        .collect(),
        Role::Control => vec![
            // Frames for the gateway's own stack, wake-ups, inotify events.
            Any(libc::SYS_read),
            // Whether a watched namespace path still exists.
            Any(libc::SYS_statx),
            Any(libc::SYS_newfstatat),
        ]
        .into_iter()
        .chain(raw_uplink())
        .collect(),
        Role::ControlSocket => {
            let mut v = spawns();
            v.extend(serves());
            // The client's credentials (SO_PEERCRED).
            v.push(Any(libc::SYS_getsockopt));
            v
        }
        // Channels (futex), the log's `write`, the clock: all in `common`.
        Role::Events => Vec::new(),
        Role::Metrics => {
            let mut v = spawns();
            v.extend(serves());
            v
        }
    }
}

/// The compiled filter of `role` in process `pid`: its lists allowed,
/// anything else kills the process.
fn filter(role: Role, pid: u32) -> Result<BpfProgram, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for a in common(pid).into_iter().chain(allowed(role)) {
        match a {
            // An empty rule list allows the call whatever its arguments.
            Any(nr) => {
                rules.insert(nr, Vec::new());
            }
            ArgEq(nr, arg, value) => {
                let cond =
                    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)?;
                let entry = rules.entry(nr).or_default();
                entry.push(SeccompRule::new(vec![cond])?);
            }
        }
    }
    let arch: TargetArch = std::env::consts::ARCH.try_into()?;
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )?;
    Ok(f.try_into()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles() {
        for role in ROLES {
            let f = filter(role, 1234).unwrap();
            assert!(!f.is_empty(), "{role:?}");
        }
    }

    #[test]
    fn the_test_fault_call_is_in_no_list() {
        for role in ROLES {
            for a in common(1).into_iter().chain(allowed(role)) {
                let nr = match a {
                    // The raw uplink's interface-name lookup, and only it.
                    ArgEq(libc::SYS_ioctl, 1, v) if v == libc::SIOCGIFNAME => continue,
                    Any(nr) | ArgEq(nr, ..) => nr,
                };
                assert_ne!(nr, libc::SYS_getppid, "{role:?}");
                // Nothing that changes credentials, loads code or escapes.
                for never in [
                    libc::SYS_execve,
                    libc::SYS_setresuid,
                    libc::SYS_capset,
                    libc::SYS_setns,
                    libc::SYS_ptrace,
                    libc::SYS_bpf,
                    libc::SYS_ioctl,
                ] {
                    assert_ne!(nr, never, "{role:?}");
                }
            }
        }
    }

    #[test]
    fn passwd_lines_give_uid_and_primary_gid() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/usr/sbin/nologin\nbad:x:q:1::/:\n";
        assert_eq!(
            parse_passwd("nobody", passwd),
            Some(User {
                uid: 65534,
                gid: 65534
            })
        );
        assert_eq!(parse_passwd("nob", passwd), None);
        assert_eq!(parse_passwd("bad", passwd), None);
    }
}
