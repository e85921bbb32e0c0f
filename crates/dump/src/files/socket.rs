//! Sockets. The dump takes a copy of the target's descriptor (`pidfd_getfd`: the same socket)
//! and asks it directly — family, type, addresses, options, TCP state — and asks the kernel's
//! socket diagnostics what only they know about a unix socket (its peer, its bound file, its
//! listener's backlog). The receive queue is read without consuming it, from a peek offset
//! that is put back afterwards.
//!
//! Restored: unix sockets of every type, unbound, bound to a path or an abstract name, or
//! listening; unnamed connected pairs (`socketpair`) whose two ends are both dumped, or whose
//! other end is closed, with what each end has queued; TCP and UDP sockets, IPv4 and IPv6,
//! listening or bound, with their options. Refused, naming the pid and the fd: a socket
//! connected to a peer outside the dumped processes, a connection waiting in a listener's
//! backlog, TCP connections, file descriptors or credentials in a queue, other families.
//! A UDP socket's queued datagrams are dropped, with a warning: stasis cannot send them
//! again from their senders' addresses, and UDP promises no delivery.

use super::{append_padded, Cx, Kind, Probe};
use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use stasis_image::model::*;
use stasis_sys::sock;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

pub(crate) struct Sock;
pub(crate) static SOCKET: Sock = Sock;

/// A queue larger than this is refused (a socket's buffer is far smaller unless forced).
const MAX_QUEUE: u64 = 256 << 20;
const SHUT_RD_BIT: u8 = 1;
const SHUT_WR_BIT: u8 = 2;

impl Kind for Sock {
    fn claims(&self, p: &Probe) -> bool {
        p.file_type() == libc::S_IFSOCK
    }

    fn dump(&self, p: &Probe, cx: &mut Cx) -> Result<FileKind> {
        let here = || format!("fd {} of pid {}", p.fd, p.pid);
        let fd = stasis_sys::fs::pidfd_open(p.pid)
            .and_then(|pidfd| stasis_sys::fs::pidfd_getfd(&pidfd, p.fd))
            .map_err(|e| anyhow::anyhow!("{}: copying the socket: {e}", here()))?;
        let int = |level, name| {
            sock::getsockopt_int(&fd, level, name)
                .map_err(|e| anyhow::anyhow!("{}: getsockopt {level}:{name}: {e}", here()))
        };
        let family = int(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
        let sock_type = int(libc::SOL_SOCKET, libc::SO_TYPE)?;
        let protocol = int(libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
        // Only sockets whose queue is read have a peek offset worth keeping.
        let peek_off = match family {
            libc::AF_UNIX => int(libc::SOL_SOCKET, libc::SO_PEEK_OFF)?,
            _ => -1,
        };
        match family {
            libc::AF_UNIX | libc::AF_INET | libc::AF_INET6 => {}
            libc::AF_NETLINK if protocol == libc::NETLINK_ROUTE => {}
            libc::AF_NETLINK => bail!(
                "{} is a netlink socket of protocol {protocol}; not supported yet (route sockets are)",
                here()
            ),
            libc::AF_PACKET => bail!("{} is a packet socket; not supported", here()),
            f => bail!("{} is a socket of family {f}; not supported", here()),
        }
        let mut s = Socket {
            inode: p.meta.ino(),
            family,
            sock_type,
            protocol,
            state: SockState::Unconnected,
            local: Vec::new(),
            remote: Vec::new(),
            unix: None,
            shutdown: 0,
            opts: options(&fd, family, sock_type, protocol)
                .with_context(|| format!("{}: reading its options", here()))?,
            peek_off,
            queue: SockQueue::default(),
            tcp: None,
            closed: false,
            groups: Vec::new(),
        };
        match family {
            libc::AF_UNIX => unix(p, &fd, &mut s, cx)?,
            libc::AF_NETLINK => netlink(p, &fd, &mut s)?,
            _ => inet(p, &fd, &mut s, cx)?,
        }
        Ok(FileKind::Socket(Box::new(s)))
    }
}

fn unix(p: &Probe, fd: &OwnedFd, s: &mut Socket, cx: &mut Cx) -> Result<()> {
    let here = || format!("fd {} of pid {}", p.fd, p.pid);
    let d = sock::unix_diag(s.inode).map_err(|e| {
        anyhow::anyhow!(
            "{}: asking the kernel about unix socket {} (sock_diag): {e}",
            here(),
            s.inode
        )
    })?;
    s.shutdown = d.shutdown & (SHUT_RD_BIT | SHUT_WR_BIT);
    let mut u = UnixSock {
        pair: None,
        pair_gone: false,
        file: None,
        pending: false,
        backlog: Vec::new(),
        accepted: false,
        client: false,
    };
    if let Some(name) = d.name.as_ref().filter(|n| !n.is_empty()) {
        s.local = sock::address(fd, false)
            .map_err(|e| anyhow::anyhow!("{}: getsockname: {e}", here()))?;
        if name[0] != 0 {
            u.file = Some(socket_file(p, name, d.vfs)?);
        }
    }
    if d.state == sock::TCP_LISTEN {
        if d.icons.len() != d.rqlen.0 as usize {
            bail!(
                "{}: the unix listener {} has {} connection(s) waiting, the kernel names {}",
                here(),
                sockaddr_text(&s.local),
                d.rqlen.0,
                d.icons.len()
            );
        }
        // Their clients connect again once it is back (`tree::settle_sockets` checks they
        // are this process's).
        u.backlog = d.icons.iter().map(|&i| i as u64).collect();
        s.state = SockState::Listening { backlog: d.rqlen.1 };
    } else if d.state == sock::TCP_ESTABLISHED
        && d.peer == 0
        && sock::address(fd, true).is_ok_and(|a| a.len() > 2)
    {
        // Its peer has no inode: a connection a listener has not accepted yet.
        s.remote = sock::address(fd, true).unwrap_or_default();
        if d.rqlen.1 > 0 {
            bail!(
                "{}: the unix socket has sent data ({} bytes of buffer) to the listener {}, which has not accepted it yet; not supported yet",
                here(),
                d.rqlen.1,
                sockaddr_text(&s.remote)
            );
        }
        s.state = SockState::Connected;
        u.pending = true;
    } else if d.state == sock::TCP_ESTABLISHED {
        // Named ends (an accepted connection and its client, or a pair the kernel named)
        // are sorted out by `tree::settle_sockets`, which sees both ends.
        s.remote = sock::address(fd, true).unwrap_or_default();
        if s.remote.len() <= 2 {
            s.remote.clear();
        }
        if s.sock_type == libc::SOCK_DGRAM && !s.remote.is_empty() && !autobound(&s.remote) {
            bail!(
                "{}: a unix datagram socket connected to {}; not supported yet",
                here(),
                sockaddr_text(&s.remote)
            );
        }
        s.state = SockState::Connected;
        if d.peer == 0 {
            u.pair_gone = true;
        } else {
            u.pair = Some(d.peer as u64);
        }
    }
    s.unix = Some(u);
    // A stream or seqpacket socket has a queue only once connected; a datagram one always.
    if s.state == SockState::Connected || s.sock_type == libc::SOCK_DGRAM {
        s.queue = queue(fd, (p.pid, p.fd), s, cx)
            .with_context(|| format!("{}: reading its queue", here()))?;
    }
    Ok(())
}

/// The socket file of a path name: its mode and owner, and whether it is still there.
fn socket_file(p: &Probe, name: &[u8], vfs: Option<(u32, u32)>) -> Result<SockFile> {
    let here = || format!("fd {} of pid {}", p.fd, p.pid);
    let path = name.split(|&c| c == 0).next().unwrap_or(name);
    if path.first() != Some(&b'/') {
        bail!(
            "{}: the unix socket is bound to the relative path {:?}; not supported yet",
            here(),
            String::from_utf8_lossy(path)
        );
    }
    let Some((ino, dev)) = vfs else {
        bail!(
            "{}: the kernel does not say which file the unix socket made",
            here()
        );
    };
    let path =
        std::path::Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(path));
    let kdev_of = |m: &std::fs::Metadata| kdev(libc::major(m.dev()), libc::minor(m.dev()));
    // The kernel's own dev_t (major << 20 | minor), as sock_diag reports it.
    let dev = kdev(dev >> 20, dev & 0xfffff);
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.ino() == ino as u64 && kdev_of(&m) == dev => Ok(SockFile {
            dev,
            inode: ino as u64,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            deleted: false,
        }),
        // Unlinked (or replaced by another file): the socket keeps its name, without a file.
        _ => Ok(SockFile {
            dev,
            inode: ino as u64,
            mode: 0o777,
            uid: 0,
            gid: 0,
            ctime_ns: 0,
            deleted: true,
        }),
    }
}

fn inet(p: &Probe, fd: &OwnedFd, s: &mut Socket, cx: &mut Cx) -> Result<()> {
    let here = || format!("fd {} of pid {}", p.fd, p.pid);
    s.local =
        sock::address(fd, false).map_err(|e| anyhow::anyhow!("{}: getsockname: {e}", here()))?;
    if port_of(&s.local) == 0 {
        s.local.clear();
    }
    match (s.sock_type, s.protocol) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => {
            let mut info = [0u8; 104];
            sock::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)
                .map_err(|e| anyhow::anyhow!("{}: TCP_INFO: {e}", here()))?;
            let u32_at = |at: usize| {
                u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]])
            };
            match info[0] {
                10 => {
                    // tcp_info's unacked and sacked are a listener's backlog in use and size.
                    let (waiting, backlog) = (u32_at(24), u32_at(28));
                    if waiting > 0 {
                        bail!(
                            "{}: the TCP listener {} has {waiting} connection(s) waiting to be accepted; not supported yet",
                            here(),
                            sockaddr_text(&s.local)
                        );
                    }
                    s.state = SockState::Listening { backlog };
                }
                7 => {}
                1 if cx.tcp_established => {
                    s.remote = sock::address(fd, true)
                        .map_err(|e| anyhow::anyhow!("{}: getpeername: {e}", here()))?;
                    s.state = SockState::Connected;
                    let copy = fd.try_clone().with_context(|| format!("{}: dup", here()))?;
                    // Its id once `collect` records it, right after this returns.
                    cx.tcp_pending
                        .push((cx.files.descs.len() as u32, p.fd, copy));
                }
                1 if cx.tcp_close => {
                    s.remote = sock::address(fd, true).unwrap_or_default();
                    s.closed = true;
                }
                1 => {
                    let peer = sock::address(fd, true).unwrap_or_default();
                    bail!(
                        "{}: TCP connection {} → {}; dump with --tcp-established to keep it (the network lock holds it until the restore), or --tcp-close to have it come back closed",
                        here(),
                        sockaddr_text(&s.local),
                        sockaddr_text(&peer)
                    );
                }
                st => {
                    let peer = sock::address(fd, true).unwrap_or_default();
                    bail!(
                        "{}: TCP connection {} → {} ({}); only established connections are supported yet",
                        here(),
                        sockaddr_text(&s.local),
                        sockaddr_text(&peer),
                        tcp_state(st)
                    );
                }
            }
        }
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => {
            match sock::address(fd, true) {
                Ok(peer) => {
                    s.remote = peer;
                    s.state = SockState::Connected;
                }
                Err(Errno::ENOTCONN) => {}
                Err(e) => bail!("{}: getpeername: {e}", here()),
            }
            let queued = pending_bytes(fd);
            if queued > 0 {
                tracing::warn!(
                    pid = p.pid,
                    fd = p.fd,
                    "the UDP socket {} had datagrams queued ({queued} bytes); they are not saved",
                    sockaddr_text(&s.local)
                );
            }
        }
        (t, pr) => bail!(
            "{}: an inet socket of type {t}, protocol {pr}; not supported yet",
            here()
        ),
    }
    Ok(())
}

/// A route netlink socket: its port id and groups; nothing may wait in its queue (the
/// kernel's messages could not be sent again).
fn netlink(p: &Probe, fd: &OwnedFd, s: &mut Socket) -> Result<()> {
    let here = || format!("fd {} of pid {}", p.fd, p.pid);
    s.local =
        sock::address(fd, false).map_err(|e| anyhow::anyhow!("{}: getsockname: {e}", here()))?;
    if s.local.get(4..8).is_some_and(|pid| pid == [0; 4]) {
        // Not bound yet (a port id is given at the first bind or send).
        s.local.clear();
    }
    let mut groups = [0u8; 128];
    const NETLINK_LIST_MEMBERSHIPS: i32 = 9;
    let n = sock::getsockopt(fd, libc::SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, &mut groups)
        .map_err(|e| anyhow::anyhow!("{}: NETLINK_LIST_MEMBERSHIPS: {e}", here()))?;
    for (w, word) in groups[..n].chunks_exact(4).enumerate() {
        let bits = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
        s.groups.extend(
            (0..32)
                .filter(|b| bits & (1 << b) != 0)
                .map(|b| w as u32 * 32 + b + 1),
        );
    }
    let queued = pending_bytes(fd);
    if queued > 0 {
        bail!(
            "{}: the netlink socket has {queued} bytes of the kernel's messages waiting to be read; they could not come back",
            here()
        );
    }
    Ok(())
}

/// Bytes waiting to be read (`SIOCINQ`), 0 if unknown.
fn pending_bytes(fd: &OwnedFd) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(fd), libc::FIONREAD, &mut n) };
    if r == 0 {
        n
    } else {
        0
    }
}

/// An abstract name of the kind the kernel picks itself: a NUL and five hex digits.
pub(crate) fn autobound(addr: &[u8]) -> bool {
    let name = addr.get(2..).unwrap_or_default();
    name.len() == 6 && name[0] == 0 && name[1..].iter().all(u8::is_ascii_hexdigit)
}

fn port_of(addr: &[u8]) -> u16 {
    addr.get(2..4)
        .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]))
}

fn tcp_state(st: u8) -> &'static str {
    match st {
        1 => "established",
        2 => "SYN sent",
        3 => "SYN received",
        4 => "FIN wait 1",
        5 => "FIN wait 2",
        6 => "time wait",
        8 => "close wait",
        9 => "last ACK",
        11 => "closing",
        _ => "another state",
    }
}

/// Every option of [`SOCK_OPTS`] that applies to this kind of socket and differs from what a
/// new socket of the same kind has.
fn options(fd: &OwnedFd, family: i32, ty: i32, protocol: i32) -> Result<Vec<SockOpt>> {
    let connected_tcp = protocol == libc::IPPROTO_TCP && {
        let mut info = [0u8; 8];
        sock::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info).is_ok()
            && !matches!(info[0], 7 | 10)
    };
    let fresh = sock::socket(family, ty, protocol).ok();
    let mut out = Vec::new();
    for &(level, name, _) in SOCK_OPTS {
        let applies = match (level, name) {
            // Multicast is for datagrams only (a stream socket refuses to be set).
            (libc::IPPROTO_IP, libc::IP_MULTICAST_TTL | libc::IP_MULTICAST_LOOP) => {
                family == libc::AF_INET && ty == libc::SOCK_DGRAM
            }
            // A connection's buffers grow by themselves (autotuning) and its segment size is
            // the one agreed with the peer (restored with it): setting them would pin them.
            (libc::SOL_SOCKET, libc::SO_SNDBUF | libc::SO_RCVBUF)
            | (libc::IPPROTO_TCP, libc::TCP_MAXSEG)
                if connected_tcp =>
            {
                false
            }
            (libc::SOL_SOCKET, _) => true,
            (libc::IPPROTO_IP, _) => family == libc::AF_INET,
            (libc::IPPROTO_IPV6, _) => family == libc::AF_INET6,
            (libc::IPPROTO_TCP, _) => protocol == libc::IPPROTO_TCP && ty == libc::SOCK_STREAM,
            _ => false,
        };
        if !applies {
            continue;
        }
        let mut v = [0u8; 64];
        let Ok(n) = sock::getsockopt(fd, level, name, &mut v) else {
            continue;
        };
        let mut f = [0u8; 64];
        let same = fresh
            .as_ref()
            .and_then(|fr| sock::getsockopt(fr.as_fd(), level, name, &mut f).ok())
            .is_some_and(|m| f[..m] == v[..n]);
        if !same {
            out.push(SockOpt {
                level,
                name,
                value: v[..n].to_vec(),
            });
        }
    }
    Ok(out)
}

/// The receive queue, read from the start without consuming it; the peek offset is put
/// back as it was.
/// `target`: the pid and fd number the socket has in the dumped process (the guardian is told,
/// so that the offset goes back even if this stasis dies in the middle).
fn queue(fd: &OwnedFd, target: (i32, i32), s: &Socket, cx: &mut Cx) -> Result<SockQueue> {
    let stream = s.sock_type == libc::SOCK_STREAM;
    stasis_infect::guardian::note_peek_off(target.0, target.1, s.inode, s.peek_off)?;
    sock::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)
        .map_err(|e| anyhow::anyhow!("SO_PEEK_OFF: {e}"))?;
    let read = read_queue(fd, stream);
    let put_back = sock::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, s.peek_off);
    let (data, msgs) = read?;
    put_back.map_err(|e| anyhow::anyhow!("putting SO_PEEK_OFF back: {e}"))?;
    stasis_infect::guardian::note_peek_off_back(target.0, s.inode)?;
    let passcred = s
        .opts
        .iter()
        .any(|o| o.level == libc::SOL_SOCKET && o.name == libc::SO_PASSCRED);
    if passcred && !data.is_empty() {
        bail!("messages are queued on a socket with SO_PASSCRED: their senders' credentials would not come back; not supported yet");
    }
    let (data_off, len) = append_padded(cx.pages, &data)?;
    Ok(SockQueue {
        data_off,
        len,
        msgs,
    })
}

fn read_queue(fd: &OwnedFd, stream: bool) -> Result<(Vec<u8>, Vec<u32>)> {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut data, mut msgs) = (Vec::new(), Vec::new());
    // Bytes of the current datagram read so far.
    let mut partial = 0u64;
    while let Some(p) = sock::peek(fd, &mut buf).map_err(|e| anyhow::anyhow!("MSG_PEEK: {e}"))? {
        if p.rights {
            bail!("file descriptors are in flight in its queue (SCM_RIGHTS); not supported yet");
        }
        if p.ctrunc && !p.creds {
            bail!("its queue holds control data stasis cannot read");
        }
        if stream && p.copied == 0 {
            break;
        }
        data.extend_from_slice(&buf[..p.copied]);
        if data.len() as u64 > MAX_QUEUE {
            bail!("more than {MAX_QUEUE} bytes are queued");
        }
        if !stream {
            partial += p.copied as u64;
            if p.len <= p.copied {
                msgs.push(u32::try_from(partial).context("a datagram longer than 4 GiB")?);
                partial = 0;
            }
        }
    }
    Ok((data, msgs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_datagrams_and_streams_without_consuming() {
        let (a, b) = sock::socketpair(libc::SOCK_SEQPACKET).expect("socketpair");
        let big = vec![7u8; 100_000];
        sock::send(&b, b"first").expect("send");
        sock::send(&b, &big).expect("send");
        sock::send(&b, b"").expect("send");
        sock::setsockopt_int(&a, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).expect("peek off");
        let (data, msgs) = read_queue(&a, false).expect("reads");
        assert_eq!(msgs, vec![5, 100_000, 0]);
        assert_eq!(data.len(), 100_005);
        let (s1, s2) = sock::socketpair(libc::SOCK_STREAM).expect("socketpair");
        sock::send(&s2, b"abc").expect("send");
        sock::send(&s2, b"def").expect("send");
        sock::setsockopt_int(&s1, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).expect("peek off");
        let (data, msgs) = read_queue(&s1, true).expect("reads");
        assert_eq!((data.as_slice(), msgs.len()), (&b"abcdef"[..], 0));
        // Nothing was consumed.
        let (again, _) = {
            sock::setsockopt_int(&s1, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).expect("peek off");
            read_queue(&s1, true).expect("reads")
        };
        assert_eq!(again, b"abcdef");
    }
}
