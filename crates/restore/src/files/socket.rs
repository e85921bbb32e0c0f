//! Sockets, made again with their options, address and state. The two ends of an unnamed unix
//! pair come from one `socketpair` (made for whichever end is opened first, the other end
//! kept for its own description), and each end's queue is written into it from the other
//! end, message by message for datagrams. Shutdowns are applied once every descriptor is
//! placed, after every queue is written.
//!
//! A unix socket bound to a path needs its path free: the socket file the dumped socket made
//! is removed first, and so is any socket file nobody listens on any more (a restore made it
//! before, or the process was killed); any other file there makes the restore fail. The new
//! socket file gets the dumped mode and owner; one that was deleted is unlinked again.

use super::{check, set_status_flags, Open, OpenCx};
use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use stasis_image::model::*;
use stasis_sys::sock;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

pub(crate) struct Sock;
pub(crate) static SOCKET: Sock = Sock;

const SO_SNDBUFFORCE: i32 = 32;
const SO_RCVBUFFORCE: i32 = 33;

impl Open for Sock {
    /// A client its listener had not accepted connects once the listener is back, after the
    /// clients before it in the listener's backlog.
    fn after(&self, d: &FileDesc, cx: &OpenCx) -> Vec<u32> {
        let FileKind::Socket(s) = &d.kind else {
            return Vec::new();
        };
        if matches!(s.state, SockState::Listening { .. }) && s.unix.is_some() {
            // Its accepted connections are made first, through a listener of its name for
            // the moment.
            return cx
                .img
                .files
                .descs
                .iter()
                .filter(|x| {
                    matches!(&x.kind, FileKind::Socket(o) if o.local == s.local
                        && o.unix.as_ref().is_some_and(|u| u.accepted))
                })
                .map(|x| x.id)
                .collect();
        }
        if !s.unix.as_ref().is_some_and(|u| u.pending) {
            return Vec::new();
        }
        let socket_of = |inode: u64| {
            cx.img.files.descs.iter().find_map(|x| match &x.kind {
                FileKind::Socket(o) if o.inode == inode => Some(x.id),
                _ => None,
            })
        };
        for x in &cx.img.files.descs {
            let FileKind::Socket(l) = &x.kind else {
                continue;
            };
            let Some(backlog) = l.unix.as_ref().map(|u| &u.backlog) else {
                continue;
            };
            if let Some(at) = backlog.iter().position(|&c| c == s.inode) {
                let mut deps = vec![x.id];
                if let Some(before) = at.checked_sub(1).and_then(|b| socket_of(backlog[b])) {
                    deps.push(before);
                }
                return deps;
            }
        }
        Vec::new()
    }

    fn open(&self, d: &FileDesc, cx: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::Socket(s) = &d.kind else {
            unreachable!("dispatched by kind")
        };
        let fd = match (&s.unix, &s.tcp) {
            (Some(u), _) if s.state == SockState::Connected && !u.pending => pair_end(s, u, cx)?,
            (_, Some(t)) => tcp_conn(s, t, cx)?,
            _ => fresh(s)?,
        };
        set_status_flags(&fd, d.flags)?;
        Ok(fd)
    }

    fn after_place(&self, d: &FileDesc, fd: BorrowedFd<'_>, _: &OpenCx) -> Result<()> {
        let FileKind::Socket(s) = &d.kind else {
            unreachable!("dispatched by kind")
        };
        let how = match s.shutdown & 3 {
            1 => libc::SHUT_RD,
            2 => libc::SHUT_WR,
            3 => libc::SHUT_RDWR,
            _ => return Ok(()),
        };
        match sock::shutdown(fd, how) {
            Ok(()) | Err(Errno::ENOTCONN) => Ok(()),
            Err(e) => bail!("shutdown: {e}"),
        }
    }
}

/// One end of a unix pair: the pair is made for the first end opened.
fn pair_end(s: &Socket, u: &UnixSock, cx: &mut OpenCx) -> Result<OwnedFd> {
    let pair = |cx: &OpenCx| -> Result<(OwnedFd, OwnedFd)> {
        let (a, b) = check(sock::socketpair(s.sock_type), || "socketpair".into())?;
        Ok((cx.stage(a)?, cx.stage(b)?))
    };
    let (mine, other) = if u.pair_gone {
        let (a, b) = pair(cx)?;
        (a, b)
    } else {
        let Some(peer) = u.pair else {
            bail!("a connected unix socket without a peer");
        };
        if !cx.socks.contains_key(&s.inode) {
            let (a, b) = if u.accepted || u.client {
                // Made through a listener of that name, so each end has its name again.
                let (listener, client_name) = if u.accepted {
                    (&s.local, &s.remote)
                } else {
                    (&s.remote, &s.local)
                };
                let (acc, cli) = through_listener(s.sock_type, listener, client_name)
                    .with_context(|| {
                        format!(
                            "making the connection accepted by {}",
                            sockaddr_text(listener)
                        )
                    })?;
                let (acc, cli) = (cx.stage(acc)?, cx.stage(cli)?);
                if u.accepted {
                    (acc, cli)
                } else {
                    (cli, acc)
                }
            } else {
                pair(cx)?
            };
            cx.socks.insert(s.inode, a);
            cx.socks.insert(peer, b);
        }
        let (Some(a), Some(b)) = (cx.socks.get(&s.inode), cx.socks.get(&peer)) else {
            bail!("the ends of unix pair {}-{peer} do not match", s.inode);
        };
        let dup = |fd: &OwnedFd| super::dup_at_least(fd, cx.stage_base);
        (dup(a)?, dup(b)?)
    };
    if !s.local.is_empty() && !u.accepted && !u.client {
        // The name the kernel had given it (autobind), bound before anything is sent.
        check(sock::bind(&mine, &s.local), || {
            format!("binding to {}", sockaddr_text(&s.local))
        })?;
    }
    fill_queue(s, &other, cx).context("writing its queue")?;
    set_options(&mine, s)?;
    if s.peek_off >= 0 {
        check(
            sock::setsockopt_int(&mine, libc::SOL_SOCKET, libc::SO_PEEK_OFF, s.peek_off),
            || "SO_PEEK_OFF".into(),
        )?;
    }
    // A gone peer's end is dropped here: `mine` sees its peer closed, as dumped.
    drop(other);
    Ok(mine)
}

/// A connected pair as a listener named `listener` makes it: a listener of that name for the
/// moment (a path's old socket file, nobody's any more, is removed first; the new one goes
/// again after), a client (bound to `client_name` if it had one) that connects, and the end
/// the listener accepts. Returns (accepted end, client end).
fn through_listener(
    sock_type: i32,
    listener: &[u8],
    client_name: &[u8],
) -> Result<(OwnedFd, OwnedFd)> {
    let raw = listener.get(2..).unwrap_or_default();
    let path = (raw.first().is_some_and(|&c| c != 0)).then(|| {
        let bytes = raw.split(|&c| c == 0).next().unwrap_or_default();
        std::path::PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
    });
    let t = check(sock::socket(libc::AF_UNIX, sock_type, 0), || {
        "socket".into()
    })?;
    if let Some(p) = &path {
        if let Ok(m) = std::fs::symlink_metadata(p) {
            if !m.file_type().is_socket() || !stale_at(sock_type, listener) {
                bail!("{} is in use", p.display());
            }
            std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    check(sock::bind(&t, listener), || {
        "binding the listener's name".into()
    })?;
    let made = (|| -> Result<(OwnedFd, OwnedFd)> {
        check(sock::listen(&t, 1), || "listen".into())?;
        let c = check(sock::socket(libc::AF_UNIX, sock_type, 0), || {
            "socket".into()
        })?;
        if !client_name.is_empty() {
            check(sock::bind(&c, client_name), || {
                format!("binding the client to {}", sockaddr_text(client_name))
            })?;
        }
        check(sock::connect(&c, listener), || "connecting".into())?;
        let a = check(sock::accept(&t), || "accepting".into())?;
        Ok((a, c))
    })();
    drop(t);
    if let Some(p) = &path {
        let _ = std::fs::remove_file(p);
    }
    made
}

/// Whether nobody listens on the unix name `addr`.
fn stale_at(sock_type: i32, addr: &[u8]) -> bool {
    let Ok(probe) = sock::socket(libc::AF_UNIX, sock_type, 0) else {
        return false;
    };
    matches!(sock::connect(&probe, addr), Err(Errno::ECONNREFUSED))
}

/// Writes what `s` had queued into it, from the other end of its pair.
fn fill_queue(s: &Socket, from: &OwnedFd, cx: &OpenCx) -> Result<()> {
    let Some(data) = cx.data.socks.get(&s.inode) else {
        return Ok(());
    };
    if data.is_empty() {
        return Ok(());
    }
    // Room for it all in the sending end's buffer while it is written; then its own size.
    let before = sock::getsockopt_int(from, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap_or(0);
    let need = i32::try_from(data.len().saturating_mul(2) + (64 << 10)).unwrap_or(i32::MAX);
    if need > before {
        let _ = sock::setsockopt_int(from, libc::SOL_SOCKET, SO_SNDBUFFORCE, need / 2);
    }
    // A sender with SO_PASSCRED and no name would be given one (autobind): not while the
    // queue is written.
    let passcred = sock::getsockopt_int(from, libc::SOL_SOCKET, libc::SO_PASSCRED).unwrap_or(0);
    if passcred != 0 {
        check(
            sock::setsockopt_int(from, libc::SOL_SOCKET, libc::SO_PASSCRED, 0),
            || "clearing SO_PASSCRED".into(),
        )?;
    }
    let sent = if s.sock_type == libc::SOCK_STREAM {
        send_all(from, data)
    } else {
        let mut at = 0usize;
        s.queue.msgs.iter().try_for_each(|&m| {
            let Some(msg) = data.get(at..at + m as usize) else {
                bail!("the queue is shorter than its messages");
            };
            at += m as usize;
            let n = check(sock::send(from, msg), || "sending a queued message".into())?;
            if n != msg.len() {
                bail!("a queued message of {} bytes went out as {n}", msg.len());
            }
            Ok(())
        })
    };
    if need > before && before > 0 {
        let _ = sock::setsockopt_int(from, libc::SOL_SOCKET, SO_SNDBUFFORCE, before / 2);
    }
    if passcred != 0 {
        check(
            sock::setsockopt_int(from, libc::SOL_SOCKET, libc::SO_PASSCRED, passcred),
            || "setting SO_PASSCRED back".into(),
        )?;
    }
    sent
}

fn send_all(fd: &OwnedFd, mut data: &[u8]) -> Result<()> {
    while !data.is_empty() {
        let n = check(sock::send(fd, data), || "sending queued bytes".into())?;
        if n == 0 {
            bail!("the socket took no more bytes");
        }
        data = &data[n..];
    }
    Ok(())
}

/// A socket that is not one end of a unix pair: made, set, bound, listening or connected.
fn fresh(s: &Socket) -> Result<OwnedFd> {
    let fd = check(sock::socket(s.family, s.sock_type, s.protocol), || {
        format!("socket({}, {}, {})", s.family, s.sock_type, s.protocol)
    })?;
    set_options(&fd, s)?;
    if s.closed {
        return Ok(fd);
    }
    for &g in &s.groups {
        const NETLINK_ADD_MEMBERSHIP: i32 = 1;
        check(
            sock::setsockopt_int(&fd, libc::SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, g as i32),
            || format!("joining netlink group {g}"),
        )?;
    }
    if !s.local.is_empty() {
        match s.unix.as_ref().and_then(|u| u.file) {
            Some(f) => bind_path(&fd, s, &f)?,
            None => check(sock::bind(&fd, &s.local), || {
                format!("binding to {}", sockaddr_text(&s.local))
            })?,
        }
    }
    match s.state {
        SockState::Listening { backlog } => {
            let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
            check(sock::listen(&fd, backlog), || "listen".into())?;
        }
        SockState::Connected if !s.remote.is_empty() => {
            check(sock::connect(&fd, &s.remote), || {
                format!("connecting to {}", sockaddr_text(&s.remote))
            })?;
        }
        _ => {}
    }
    Ok(fd)
}

/// An established TCP connection, made again in repair mode: the sequence numbers are set
/// where each queue starts, the socket is bound and "connected" without a packet, given the
/// options, window and timestamp clock it had, and its queues are written back (what was sent
/// and not acknowledged as sent already). It leaves repair mode here; what had never been
/// sent goes out then. The network lock still holds the connection's packets until the
/// whole restore is done.
fn tcp_conn(s: &Socket, t: &TcpConn, cx: &OpenCx) -> Result<OwnedFd> {
    let fd = check(sock::socket(s.family, s.sock_type, s.protocol), || {
        "socket(TCP)".into()
    })?;
    let tcp = |name: i32, v: i32, what: &str| {
        check(
            sock::setsockopt_int(&fd, libc::IPPROTO_TCP, name, v),
            || what.to_string(),
        )
    };
    // Options first: repair mode lets the socket share its port (SO_REUSEADDR would undo
    // that), and leaving it forgets SO_REUSEADDR (set again below).
    set_options(&fd, s)?;
    tcp(
        sock::TCP_REPAIR,
        1,
        "entering repair mode (stasis needs CAP_NET_ADMIN)",
    )?;
    let recvq = cx.data.socks.get(&s.inode).map_or(&[][..], Vec::as_slice);
    let sendq = cx
        .data
        .tcp_send
        .get(&s.inode)
        .map_or(&[][..], Vec::as_slice);
    let unsent = (t.unsent as usize).min(sendq.len());
    tcp(
        sock::TCP_REPAIR_QUEUE,
        sock::TCP_SEND_QUEUE,
        "selecting the send queue",
    )?;
    tcp(
        sock::TCP_QUEUE_SEQ,
        t.snd_seq.wrapping_sub(sendq.len() as u32) as i32,
        "setting the send sequence",
    )?;
    tcp(
        sock::TCP_REPAIR_QUEUE,
        sock::TCP_RECV_QUEUE,
        "selecting the receive queue",
    )?;
    tcp(
        sock::TCP_QUEUE_SEQ,
        t.rcv_seq.wrapping_sub(recvq.len() as u32) as i32,
        "setting the receive sequence",
    )?;
    check(sock::bind(&fd, &s.local), || {
        format!("binding to {}", sockaddr_text(&s.local))
    })?;
    check(sock::connect(&fd, &s.remote), || {
        format!("connecting to {} in repair mode", sockaddr_text(&s.remote))
    })?;
    let mut opts: Vec<u8> = Vec::new();
    let mut opt = |code: u32, val: u32| {
        opts.extend_from_slice(&code.to_ne_bytes());
        opts.extend_from_slice(&val.to_ne_bytes());
    };
    opt(sock::TCPOPT_MSS, t.mss);
    if let Some((snd, rcv)) = t.wscale {
        opt(sock::TCPOPT_WINDOW, snd as u32 | (rcv as u32) << 16);
    }
    if t.sack {
        opt(sock::TCPOPT_SACK_PERM, 0);
    }
    if t.timestamps {
        opt(sock::TCPOPT_TIMESTAMP, 0);
    }
    check(
        sock::setsockopt(&fd, libc::IPPROTO_TCP, sock::TCP_REPAIR_OPTIONS, &opts),
        || "setting the connection's options".into(),
    )?;
    if t.timestamps {
        tcp(
            sock::TCP_TIMESTAMP,
            t.timestamp as i32,
            "setting the timestamp clock",
        )?;
    }
    // The buffers the kernel had grown for the connection, or room for its queues: a new
    // socket's are too small to take them back (they stay at that size, as CRIU's do).
    let room = |dumped: u32, queued: usize| {
        i32::try_from((dumped as usize).max(queued.saturating_mul(2) + (64 << 10)) / 2)
            .unwrap_or(i32::MAX / 2)
    };
    for (name, v) in [
        (SO_SNDBUFFORCE, room(t.bufs.0, sendq.len())),
        (SO_RCVBUFFORCE, room(t.bufs.1, recvq.len())),
    ] {
        check(sock::setsockopt_int(&fd, libc::SOL_SOCKET, name, v), || {
            "sizing the socket's buffers".into()
        })?;
    }
    tcp(
        sock::TCP_REPAIR_QUEUE,
        sock::TCP_RECV_QUEUE,
        "selecting the receive queue",
    )?;
    send_all(&fd, recvq).context("writing the receive queue")?;
    tcp(
        sock::TCP_REPAIR_QUEUE,
        sock::TCP_SEND_QUEUE,
        "selecting the send queue",
    )?;
    send_all(&fd, &sendq[..sendq.len() - unsent]).context("writing the send queue")?;
    // Checked against the receive sequence, which is the dumped one again only now.
    let window: Vec<u8> = t.window.iter().flat_map(|v| v.to_ne_bytes()).collect();
    check(
        sock::setsockopt(&fd, libc::IPPROTO_TCP, sock::TCP_REPAIR_WINDOW, &window),
        || "setting the window".into(),
    )?;
    tcp(
        sock::TCP_REPAIR_QUEUE,
        sock::TCP_NO_QUEUE,
        "leaving the queues",
    )?;
    tcp(sock::TCP_REPAIR, 0, "leaving repair mode")?;
    // Leaving repair mode cleared SO_REUSEADDR: set again (the others stay, and some, such as
    // IPV6_V6ONLY, cannot be set on a bound socket).
    if let Some(o) = s
        .opts
        .iter()
        .find(|o| (o.level, o.name) == (libc::SOL_SOCKET, libc::SO_REUSEADDR))
    {
        check(sock::setsockopt(&fd, o.level, o.name, &o.value), || {
            "setting SO_REUSEADDR again".into()
        })?;
    }
    send_all(&fd, &sendq[sendq.len() - unsent..]).context("sending what was never sent")?;
    Ok(fd)
}

/// Binds a unix socket to its path, as described in the module doc.
fn bind_path(fd: &OwnedFd, s: &Socket, f: &SockFile) -> Result<()> {
    let raw = s.local.get(2..).unwrap_or_default();
    let bytes = raw.split(|&c| c == 0).next().unwrap_or_default();
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(bytes));
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            let dumped = m.ino() == f.inode
                && kdev(libc::major(m.dev()), libc::minor(m.dev())) == f.dev
                && m.ctime() * 1_000_000_000 + m.ctime_nsec() == f.ctime_ns;
            if !dumped && !stale(s, &s.local) {
                bail!("{shown} is a socket someone listens on: the address is in use");
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the old socket file {shown}"))?;
        }
        Ok(_) => bail!("{shown} exists and is not a socket: the address is taken"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("{shown}: {e}"),
    }
    check(sock::bind(fd, &s.local), || format!("binding to {shown}"))?;
    if f.deleted {
        std::fs::remove_file(path).with_context(|| format!("unlinking {shown} again"))?;
        return Ok(());
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(f.mode & 0o7777))
        .with_context(|| format!("chmod of {shown}"))?;
    std::os::unix::fs::lchown(path, Some(f.uid), Some(f.gid))
        .with_context(|| format!("chown of {shown}"))?;
    Ok(())
}

/// Whether nobody listens on the unix socket file at `addr` any more.
fn stale(s: &Socket, addr: &[u8]) -> bool {
    let Ok(probe) = sock::socket(libc::AF_UNIX, s.sock_type, 0) else {
        return false;
    };
    matches!(sock::connect(&probe, addr), Err(Errno::ECONNREFUSED))
}

/// Sets every dumped option.
fn set_options(fd: &OwnedFd, s: &Socket) -> Result<()> {
    for o in &s.opts {
        let name = sock_opt_name(o.level, o.name).unwrap_or("?");
        let r = match (o.level, o.name) {
            (libc::SOL_SOCKET, n @ (libc::SO_SNDBUF | libc::SO_RCVBUF)) => {
                // The kernel reports twice what was set: set half, forced past the limits
                // the dumped socket was given room beyond.
                let v = int_of(&o.value) / 2;
                let force = if n == libc::SO_SNDBUF {
                    SO_SNDBUFFORCE
                } else {
                    SO_RCVBUFFORCE
                };
                sock::setsockopt_int(fd, libc::SOL_SOCKET, force, v)
                    .or_else(|_| sock::setsockopt_int(fd, libc::SOL_SOCKET, n, v))
            }
            (libc::SOL_SOCKET, libc::SO_BINDTODEVICE)
            | (libc::IPPROTO_TCP, libc::TCP_CONGESTION) => {
                let end = o
                    .value
                    .iter()
                    .position(|&c| c == 0)
                    .unwrap_or(o.value.len());
                sock::setsockopt(fd, o.level, o.name, &o.value[..end])
            }
            _ => sock::setsockopt(fd, o.level, o.name, &o.value),
        };
        check(r, || format!("setting {name}"))?;
    }
    Ok(())
}

fn int_of(v: &[u8]) -> i32 {
    v.get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, i32::from_ne_bytes)
}
