//! How a running gateway fails: whole, never half.
//!
//! A gateway thread that panics, or a device that goes away under a worker,
//! is reported once on the gateway's failure channel
//! ([`super::Gateway::failures`]) and raises the shared stop flag, so every
//! other thread ends too instead of the gateway running on with one shard (a
//! 1/N slice of the outside ports) black-holed, or with workers spinning on
//! a dead fd. Whoever runs the gateway (`tapnat run`) waits on the channel
//! beside its signals, stops the gateway, which closes every queue (a TAP the
//! gateway created disappears with its last fd), and exits non-zero.
use std::any::Any;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

use super::{Shared, Side};

/// Why a running gateway stopped by itself.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A gateway thread panicked; `thread` says which ("worker 1",
    /// "control thread").
    #[error("{thread} panicked: {message}")]
    Panicked { thread: String, message: String },
    /// A device's queue failed as only a device that is gone does: the TAP
    /// was deleted (`ip link del`), so the tun driver reports `POLLERR` and
    /// reads fail with `EBADFD`.
    #[error("{} TAP {device} went away", side_name(*side))]
    DeviceGone {
        side: Side,
        device: String,
        #[source]
        error: io::Error,
    },
    /// The network namespace a device lives in was deleted (its name is
    /// gone; the TAP in it can no longer be reached by anyone).
    #[error("{} TAP {device} went away: its namespace {} was deleted", side_name(*side), netns.display())]
    NamespaceGone {
        side: Side,
        device: String,
        netns: std::path::PathBuf,
    },
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Pod => "pod",
        Side::Uplink => "uplink",
    }
}

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_owned()
    }
}

/// Who a thread of the `tapnat` process is, from the name it was spawned
/// with ("worker 1" for `tapnat-w1`); `None` for a thread that is not ours.
pub fn thread_role(name: &str) -> Option<String> {
    let rest = name.strip_prefix("tapnat-")?;
    Some(match rest {
        "ctl" => "control thread".to_owned(),
        "control" => "control socket thread".to_owned(),
        "client" => "control socket client thread".to_owned(),
        "metrics" => "metrics thread".to_owned(),
        "scrape" => "metrics client thread".to_owned(),
        w => match w.strip_prefix('w').and_then(|k| k.parse::<usize>().ok()) {
            Some(k) => format!("worker {k}"),
            None => name.to_owned(),
        },
    })
}

/// Whether a read error means the device is gone rather than a passing
/// condition: after `ip link del` the tun driver detaches every queue, and
/// reads fail with `EBADFD` (measured on Linux 6.18: `POLLERR` from poll(2),
/// then `EBADFD` from read(2)); `EIO`, `ENODEV`, `ENXIO` and `EBADF` are
/// taken the same way (a closed or unusable fd never recovers).
pub(super) fn device_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::EIO | libc::ENODEV | libc::ENXIO | libc::EBADF)
    )
}

impl Shared {
    /// Reports `failure` (the first one is what the gateway's runner sees;
    /// later ones are a consequence) and stops every thread.
    pub(super) fn fail(&self, failure: Failure) {
        // Stop first, so that whoever sees the failure also sees the stop.
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.failures.0.try_send(failure);
        for w in &self.wakers {
            w.wake();
        }
        self.ctrl_waker.wake();
    }
}

/// Runs a gateway thread's body; a panic in it is reported as
/// [`Failure::Panicked`] and stops the whole gateway.
pub(super) fn guarded(shared: &Shared, thread: String, body: impl FnOnce()) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(body)) {
        shared.fail(Failure::Panicked {
            thread,
            message: panic_message(&*payload),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_named_by_their_role() {
        assert_eq!(thread_role("tapnat-w1").as_deref(), Some("worker 1"));
        assert_eq!(thread_role("tapnat-ctl").as_deref(), Some("control thread"));
        assert_eq!(
            thread_role("tapnat-metrics").as_deref(),
            Some("metrics thread")
        );
        assert_eq!(thread_role("main"), None);
    }

    #[test]
    fn panic_messages_are_read_from_both_payload_kinds() {
        let p = catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(&*p), "plain");
        let p = catch_unwind(|| panic!("formatted {}", 7)).unwrap_err();
        assert_eq!(panic_message(&*p), "formatted 7");
    }

    #[test]
    fn only_dead_fd_errors_mean_the_device_is_gone() {
        for errno in [libc::EBADFD, libc::EIO, libc::ENODEV, libc::EBADF] {
            assert!(device_gone(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [libc::EAGAIN, libc::EINTR, libc::ENOBUFS, libc::EINVAL] {
            assert!(
                !device_gone(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
    }
}
