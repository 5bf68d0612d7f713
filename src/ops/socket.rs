//! The control socket: a Unix stream socket on which a running gateway
//! answers `tapnat flows` (like `conntrack -L`), `tapnat stats` (like
//! `iptables -L -n -v`), `tapnat flush` (like `conntrack -D`/`-F`) and
//! `tapnat forward add|del|list` (like `iptables -t nat -A|-D|-L` of DNAT
//! rules).
//!
//! One request per connection: a JSON [`Request`] on one line, answered by a
//! JSON [`Response`]; the client renders it (text, JSON, Prometheus).
//!
//! Who may ask: the socket file is created mode 0600 (owner only), or 0660
//! and owned by a group when [`Access::Group`] is given; every connection's
//! peer credentials (`SO_PEERCRED`) are checked as well, so only root, the
//! gateway's own user and, with a group, its members are answered. A path
//! that exists is replaced only if it is a socket nobody answers on. Each
//! client is served on its own thread with timeouts, at most
//! [`MAX_CLIENTS`] at once, so a slow or stuck client blocks no other one.
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::capture::{self, CaptureSpec};
use super::events::EventRecord;
use super::filter::FlowFilter;
use super::live::Live;
use super::record::{DhcpRecord, FlowRecord, ForwardRecord, StatsRecord};
use crate::device::sys;

/// Where `tapnat run` listens and the client commands ask by default.
pub const DEFAULT_PATH: &str = "/run/tapnat.sock";
/// Clients served at once; more are closed at once.
pub const MAX_CLIENTS: usize = 16;
/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request, or to read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// A request, one JSON object on one line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// The flows the filter selects.
    Flows {
        #[serde(default)]
        filter: FlowFilter,
    },
    /// Every counter.
    Stats,
    /// Remove the flows the filter selects (all of them when it is empty).
    Flush {
        #[serde(default)]
        filter: FlowFilter,
    },
    /// Add a forward: the three keys of a `[[forward]]` entry.
    #[serde(rename = "forward-add")]
    ForwardAdd {
        protocol: String,
        port: String,
        to: String,
    },
    /// Delete the forward on exactly this port or range.
    #[serde(rename = "forward-del")]
    ForwardDel { protocol: String, port: String },
    /// The running forwards.
    #[serde(rename = "forward-list")]
    ForwardList,
    /// Every flow event from now on, one [`Response::Event`] a line,
    /// after a [`Response::Subscribed`].
    Events,
    /// A pcap stream of frames: a [`Response::Capturing`] line, then the
    /// file's bytes.
    Capture { spec: CaptureSpec },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    Flows(Vec<FlowRecord>),
    Stats(StatsRecord),
    /// How many flows a flush removed.
    Flushed(usize),
    /// The running forwards.
    Forwards(Vec<ForwardRecord>),
    /// The forward added or deleted, and the flows deleted with it.
    Forward {
        forward: ForwardRecord,
        flows_flushed: usize,
    },
    /// Events follow, one a line.
    Subscribed,
    /// A flow created or destroyed.
    Event(EventRecord),
    /// The pcap stream follows.
    Capturing,
    /// The request was understood and refused (a forward that does not
    /// fit, one that is not there), with the reason.
    Failed(String),
    /// The request was not answered (no access, not understood).
    Error(String),
}

/// Who besides root and the gateway's own user may use the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Nobody else: mode 0600.
    Owner,
    /// Members of this group (by gid, and the uids listed as its members):
    /// mode 0660, group-owned.
    Group { gid: u32, member_uids: Vec<u32> },
}

impl Access {
    fn mode(&self) -> u32 {
        match self {
            Access::Owner => 0o600,
            Access::Group { .. } => 0o660,
        }
    }

    /// Whether a peer with these credentials is answered.
    pub fn admits(&self, uid: u32, gid: u32, own_uid: u32) -> bool {
        uid == 0
            || uid == own_uid
            || match self {
                Access::Owner => false,
                Access::Group {
                    gid: g,
                    member_uids,
                } => gid == *g || member_uids.contains(&uid),
            }
    }
}

/// A listening control socket; the socket file is removed on drop.
pub struct ControlSocket {
    path: PathBuf,
}

/// Makes `path` free for a new socket: absent, or a stale socket removed.
fn clear_path(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            ),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another tapnat answers on {}", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

impl ControlSocket {
    /// Binds `path` with the mode and owner `access` asks for (set before
    /// the socket listens, so nobody can connect under looser permissions),
    /// and serves requests on a background thread while the process runs.
    pub fn serve(path: &Path, access: Access, live: Arc<Live>) -> io::Result<ControlSocket> {
        clear_path(path)?;
        let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
        sock.bind(&socket2::SockAddr::unix(path)?)?;
        let bound = ControlSocket {
            path: path.to_owned(),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode()))?;
        if let Access::Group { gid, .. } = access {
            std::os::unix::fs::chown(path, None, Some(gid))?;
        }
        sock.listen(MAX_CLIENTS as i32)?;
        let listener = UnixListener::from(OwnedFd::from(sock));
        let own_uid = sys::geteuid();
        let busy = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("tapnat-control".into())
            .spawn(move || {
                crate::sandbox::enter(crate::sandbox::Role::ControlSocket);
                for conn in listener.incoming().flatten() {
                    if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                        busy.fetch_sub(1, Ordering::AcqRel);
                        continue; // dropping `conn` closes it
                    }
                    let (live, busy, access) = (live.clone(), busy.clone(), access.clone());
                    let spawned = std::thread::Builder::new()
                        .name("tapnat-client".into())
                        .spawn(move || {
                            let _ = serve_client(conn, &access, own_uid, &live);
                            busy.fetch_sub(1, Ordering::AcqRel);
                        });
                    if spawned.is_err() {
                        continue; // the closure and its decrement never ran
                    }
                }
            })?;
        Ok(bound)
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn send(mut conn: &UnixStream, r: &Response) -> io::Result<()> {
    let mut text = serde_json::to_vec(r).map_err(io::Error::other)?;
    text.push(b'\n');
    conn.write_all(&text)
}

fn read_request(conn: &UnixStream) -> io::Result<String> {
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(conn)
        .take(MAX_REQUEST)
        .read_line(&mut line)?;
    Ok(line)
}

/// What the gateway answers to `request`.
pub fn respond(request: Request, live: &Live) -> Response {
    let observer = live.observer();
    match request {
        Request::Flows { filter } => Response::Flows(
            observer
                .flows()
                .iter()
                .map(FlowRecord::from)
                .filter(|f| filter.matches(f))
                .collect(),
        ),
        Request::Stats => {
            let s = observer.stats();
            let mut r = StatsRecord::from(&s);
            r.rules = live.rule_records(&s);
            r.dhcp = DhcpRecord::of(observer);
            Response::Stats(r)
        }
        Request::Flush { filter } => Response::Flushed(live.flush(&filter)),
        Request::ForwardAdd { protocol, port, to } => {
            match live.forward_add(&protocol, &port, &to) {
                Ok(f) => Response::Forward {
                    forward: ForwardRecord::from(&f),
                    flows_flushed: 0,
                },
                Err(e) => Response::Failed(e),
            }
        }
        Request::ForwardDel { protocol, port } => match live.forward_del(&protocol, &port) {
            Ok((f, flows_flushed)) => Response::Forward {
                forward: ForwardRecord::from(&f),
                flows_flushed,
            },
            Err(e) => Response::Failed(e),
        },
        Request::ForwardList => {
            Response::Forwards(live.forwards().iter().map(ForwardRecord::from).collect())
        }
        Request::Events | Request::Capture { .. } => {
            Response::Error("a stream is not answered in one line".into())
        }
    }
}

/// Whether the client closed its end (or it broke); checked while a
/// stream has nothing to send.
/// A non-blocking peek (`recv(MSG_DONTWAIT | MSG_PEEK)`): no `ioctl`
/// (`FIONBIO`), which the client threads' seccomp filter leaves out.
fn peer_gone(conn: &UnixStream) -> bool {
    let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    let r =
        socket2::SockRef::from(conn).recv_with_flags(&mut b, libc::MSG_DONTWAIT | libc::MSG_PEEK);
    match r {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// `tapnat events`: every flow event until the client goes away (or is
/// stuck for the write timeout; its queue loses events meanwhile).
fn stream_events(conn: &UnixStream, live: &Live) -> io::Result<()> {
    let sub = live.events().subscribe();
    send(conn, &Response::Subscribed)?;
    loop {
        match sub.events().recv_timeout(Duration::from_secs(1)) {
            Ok(e) => {
                if let Some(r) = EventRecord::of(&e) {
                    send(conn, &Response::Event(r))?;
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if peer_gone(conn) {
                    return Ok(());
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// `tapnat capture`: the pcap stream until its count or time is up or the
/// client goes away.
fn stream_capture(conn: &UnixStream, live: &Live, spec: &CaptureSpec) -> io::Result<()> {
    let tap = &live.observer().taps().capture;
    let mut line = serde_json::to_vec(&Response::Capturing).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut out = Preamble {
        first: Some(line),
        conn,
    };
    match capture::stream(tap, spec, &mut out, || peer_gone(conn)) {
        Ok(_) => Ok(()),
        Err(why) => send(conn, &Response::Failed(why)),
    }
}

/// The connection, with a line to write before the first bytes (so that a
/// capture that cannot start answers with its reason instead).
struct Preamble<'a> {
    first: Option<Vec<u8>>,
    conn: &'a UnixStream,
}

impl Write for Preamble<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(first) = self.first.take() {
            (&*self.conn).write_all(&first)?;
        }
        (&*self.conn).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&*self.conn).flush()
    }
}

/// One connection: the request is read even from a peer that is refused,
/// since closing with unread data would reset the connection before the
/// client saw why.
fn serve_client(conn: UnixStream, access: &Access, own_uid: u32, live: &Live) -> io::Result<()> {
    let cred = sys::peer_cred(conn.as_fd())?;
    let line = read_request(&conn)?;
    let response = if !access.admits(cred.uid, cred.gid, own_uid) {
        Response::Error(format!("uid {} may not use this socket", cred.uid))
    } else {
        match serde_json::from_str::<Request>(&line) {
            Ok(Request::Events) => return stream_events(&conn, live),
            Ok(Request::Capture { spec }) => return stream_capture(&conn, live, &spec),
            Ok(request) => respond(request, live),
            Err(e) => Response::Error(format!("bad request: {e}")),
        }
    };
    send(&conn, &response)
}

/// Asks the gateway listening on `path`.
pub fn ask(path: &Path, request: &Request) -> io::Result<Response> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("no tapnat answers on {}: {e}", path.display()),
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut text = serde_json::to_vec(request).map_err(io::Error::other)?;
    text.push(b'\n');
    conn.write_all(&text)?;
    let mut out = Vec::new();
    conn.read_to_end(&mut out)?;
    serde_json::from_slice(&out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Asks the gateway on `path` for a stream: its first answer, and the
/// connection to read the rest from (no read timeout: a stream may be
/// quiet for long).
pub fn open_stream(
    path: &Path,
    request: &Request,
) -> io::Result<(Response, BufReader<UnixStream>)> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("no tapnat answers on {}: {e}", path.display()),
        )
    })?;
    let mut text = serde_json::to_vec(request).map_err(io::Error::other)?;
    text.push(b'\n');
    conn.write_all(&text)?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let first =
        serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((first, reader))
}

/// The gid and member uids of the group called `name`, read from
/// `/etc/group` and `/etc/passwd` (members are listed by user name).
pub fn group_access(name: &str) -> io::Result<Access> {
    let groups = std::fs::read_to_string("/etc/group")?;
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    parse_group(name, &groups, &passwd).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no group {name:?} in /etc/group"),
        )
    })
}

fn parse_group(name: &str, groups: &str, passwd: &str) -> Option<Access> {
    let fields = groups
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[0] == name)?;
    let gid = fields[2].parse().ok()?;
    let members: Vec<&str> = fields[3].split(',').filter(|m| !m.is_empty()).collect();
    let member_uids = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 3 && members.contains(&f[0]))
        .filter_map(|f| f[2].parse().ok())
        .collect();
    Some(Access::Group { gid, member_uids })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        let r = Request::Flows {
            filter: FlowFilter {
                port: Some(53),
                ..Default::default()
            },
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"cmd":"flows","filter":{"port":53}}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"flows"}"#).unwrap(),
            Request::Flows {
                filter: FlowFilter::default()
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"stats"}"#).unwrap(),
            Request::Stats
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        for (r, text) in [
            (
                Request::Flush {
                    filter: FlowFilter {
                        proto: Some("udp".into()),
                        ..Default::default()
                    },
                },
                r#"{"cmd":"flush","filter":{"proto":"udp"}}"#,
            ),
            (
                Request::ForwardAdd {
                    protocol: "tcp".into(),
                    port: "8000-8099".into(),
                    to: "10.244.0.2".into(),
                },
                r#"{"cmd":"forward-add","protocol":"tcp","port":"8000-8099","to":"10.244.0.2"}"#,
            ),
            (
                Request::ForwardDel {
                    protocol: "udp".into(),
                    port: "53".into(),
                },
                r#"{"cmd":"forward-del","protocol":"udp","port":"53"}"#,
            ),
            (Request::ForwardList, r#"{"cmd":"forward-list"}"#),
            (Request::Events, r#"{"cmd":"events"}"#),
            (
                Request::Capture {
                    spec: CaptureSpec {
                        side: "both".into(),
                        count: Some(4),
                        seconds: None,
                    },
                },
                r#"{"cmd":"capture","spec":{"side":"both","count":4}}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&r).unwrap(), text);
            assert_eq!(serde_json::from_str::<Request>(text).unwrap(), r);
        }
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"flush"}"#).unwrap(),
            Request::Flush {
                filter: FlowFilter::default()
            }
        );
        let e = Response::Error("x".into());
        assert_eq!(
            serde_json::from_str::<Response>(&serde_json::to_string(&e).unwrap()).unwrap(),
            e
        );
    }

    #[test]
    fn access_admits_root_owner_and_group() {
        assert!(Access::Owner.admits(0, 0, 1000));
        assert!(Access::Owner.admits(1000, 1000, 1000));
        assert!(!Access::Owner.admits(65534, 65534, 1000));
        let g = Access::Group {
            gid: 50,
            member_uids: vec![1001],
        };
        assert!(g.admits(1002, 50, 0));
        assert!(g.admits(1001, 1001, 0));
        assert!(!g.admits(1003, 1003, 0));
        assert_eq!(Access::Owner.mode(), 0o600);
        assert_eq!(g.mode(), 0o660);
    }

    #[test]
    fn group_parsed_with_members() {
        let groups = "root:x:0:\ntapnat:x:990:alice,bob\n";
        let passwd = "root:x:0:0::/root:/bin/sh\nalice:x:1001:1001::/h:/bin/sh\nbob:x:1002:100::/h:/bin/sh\n";
        assert_eq!(
            parse_group("tapnat", groups, passwd),
            Some(Access::Group {
                gid: 990,
                member_uids: vec![1001, 1002]
            })
        );
        assert_eq!(parse_group("nope", groups, passwd), None);
    }

    #[test]
    fn a_file_at_the_path_is_not_replaced() {
        let dir = std::env::temp_dir().join(format!("tapnat-sock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-a-socket");
        std::fs::write(&file, b"keep me").unwrap();
        let err = clear_path(&file).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        clear_path(&stale).unwrap();
        assert!(!stale.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
