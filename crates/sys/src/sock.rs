//! Socket glue: the kernel's socket diagnostics for unix sockets (`NETLINK_SOCK_DIAG`: a
//! socket's peer, its bound file, its queue lengths, what is waiting in a listener's backlog,
//! its shutdown state), raw socket options and addresses as bytes (an image keeps them as the
//! kernel gave them), and reading a socket's queue without consuming it (`MSG_PEEK` from a
//! peek offset).

use nix::errno::Errno;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;

const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_VFS: u32 = 0x02;
const UDIAG_SHOW_PEER: u32 = 0x04;
const UDIAG_SHOW_ICONS: u32 = 0x08;
const UDIAG_SHOW_RQLEN: u32 = 0x10;

const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_ICONS: u16 = 3;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

/// `struct unix_diag_req`.
#[repr(C)]
struct UnixDiagReq {
    family: u8,
    protocol: u8,
    pad: u16,
    states: u32,
    ino: u32,
    show: u32,
    cookie: [u32; 2],
}

#[repr(C)]
struct Request {
    hdr: libc::nlmsghdr,
    req: UnixDiagReq,
}

/// What the kernel says about one unix socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnixDiag {
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub sock_type: u8,
    /// The TCP-like state the kernel keeps (TCP_LISTEN = 10, TCP_ESTABLISHED = 1, TCP_CLOSE = 7).
    pub state: u8,
    /// The name it is bound to, as bound (`sun_path`; abstract names start with a NUL).
    pub name: Option<Vec<u8>>,
    /// The socket file a path name made: (inode, device as the kernel encodes it).
    pub vfs: Option<(u32, u32)>,
    /// The inode of the socket it is connected to (0: none).
    pub peer: u32,
    /// A listener's connections not accepted yet: the inodes of their client ends.
    pub icons: Vec<u32>,
    /// A listener: (connections waiting, backlog). Else: (bytes or the next datagram's
    /// length waiting to be read, bytes sent and not yet read by the peer).
    pub rqlen: (u32, u32),
    /// `RCV_SHUTDOWN` (1) and `SEND_SHUTDOWN` (2).
    pub shutdown: u8,
}

pub const TCP_LISTEN: u8 = 10;
pub const TCP_ESTABLISHED: u8 = 1;

/// Asks the kernel about the unix socket with inode `ino` (in this network namespace).
pub fn unix_diag(ino: u64) -> Result<UnixDiag, Errno> {
    let ino = u32::try_from(ino).map_err(|_| Errno::EINVAL)?;
    // SAFETY: socket() with constant arguments; on success the descriptor is ours.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    let nl = Errno::result(raw).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })?;
    let req = Request {
        hdr: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<Request>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: libc::NLM_F_REQUEST as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        req: UnixDiagReq {
            family: libc::AF_UNIX as u8,
            protocol: 0,
            pad: 0,
            states: !0,
            ino,
            show: UDIAG_SHOW_NAME
                | UDIAG_SHOW_VFS
                | UDIAG_SHOW_PEER
                | UDIAG_SHOW_ICONS
                | UDIAG_SHOW_RQLEN,
            // INET_DIAG_NOCOOKIE: look the socket up by inode alone.
            cookie: [!0, !0],
        },
    };
    // SAFETY: sends the bytes of a plain-old-data request to our netlink socket.
    let r = unsafe {
        libc::send(
            nl.as_raw_fd(),
            (&req as *const Request).cast(),
            std::mem::size_of::<Request>(),
            0,
        )
    };
    Errno::result(r)?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: receives into our buffer of that length.
    let n = unsafe { libc::recv(nl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = Errno::result(n)? as usize;
    parse_unix_reply(&buf[..n])
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// One reply: a `unix_diag_msg` and its attributes, or a netlink error.
fn parse_unix_reply(b: &[u8]) -> Result<UnixDiag, Errno> {
    const NLMSG_HDR: usize = 16;
    const MSG: usize = 16;
    let len = u32_at(b, 0).ok_or(Errno::EPROTO)? as usize;
    let kind = u16_at(b, 4).ok_or(Errno::EPROTO)?;
    let b = b.get(..len).ok_or(Errno::EPROTO)?;
    if kind == libc::NLMSG_ERROR as u16 {
        let code = u32_at(b, NLMSG_HDR).ok_or(Errno::EPROTO)? as i32;
        return Err(Errno::from_raw(-code));
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(Errno::EPROTO);
    }
    let msg = b.get(NLMSG_HDR..NLMSG_HDR + MSG).ok_or(Errno::EPROTO)?;
    let mut d = UnixDiag {
        sock_type: msg[1],
        state: msg[2],
        ..UnixDiag::default()
    };
    let mut at = NLMSG_HDR + MSG;
    while at + 4 <= b.len() {
        let alen = u16_at(b, at).ok_or(Errno::EPROTO)? as usize;
        let akind = u16_at(b, at + 2).ok_or(Errno::EPROTO)? & 0x3fff;
        if alen < 4 {
            return Err(Errno::EPROTO);
        }
        let v = b.get(at + 4..at + alen).ok_or(Errno::EPROTO)?;
        match akind {
            UNIX_DIAG_NAME => d.name = Some(v.to_vec()),
            UNIX_DIAG_VFS => {
                d.vfs = Some((
                    u32_at(v, 0).ok_or(Errno::EPROTO)?,
                    u32_at(v, 4).ok_or(Errno::EPROTO)?,
                ))
            }
            UNIX_DIAG_PEER => d.peer = u32_at(v, 0).ok_or(Errno::EPROTO)?,
            UNIX_DIAG_ICONS => {
                d.icons = v
                    .chunks_exact(4)
                    .filter_map(|c| c.try_into().ok().map(u32::from_ne_bytes))
                    .collect()
            }
            UNIX_DIAG_RQLEN => {
                d.rqlen = (
                    u32_at(v, 0).ok_or(Errno::EPROTO)?,
                    u32_at(v, 4).ok_or(Errno::EPROTO)?,
                )
            }
            UNIX_DIAG_SHUTDOWN => d.shutdown = *v.first().ok_or(Errno::EPROTO)?,
            _ => {}
        }
        at += alen.next_multiple_of(4);
    }
    Ok(d)
}

/// `getsockopt` into `buf`; the length the kernel filled.
pub fn getsockopt(fd: impl AsFd, level: i32, name: i32, buf: &mut [u8]) -> Result<usize, Errno> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most len bytes into buf and updates len.
    let r = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    Errno::result(r).map(|_| (len as usize).min(buf.len()))
}

/// An int-valued socket option.
pub fn getsockopt_int(fd: impl AsFd, level: i32, name: i32) -> Result<i32, Errno> {
    let mut b = [0u8; 4];
    getsockopt(fd, level, name, &mut b)?;
    Ok(i32::from_ne_bytes(b))
}

/// `setsockopt` with the option's bytes.
pub fn setsockopt(fd: impl AsFd, level: i32, name: i32, value: &[u8]) -> Result<(), Errno> {
    // SAFETY: the kernel reads value.len() bytes from value.
    let r = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    Errno::result(r).map(drop)
}

pub fn setsockopt_int(fd: impl AsFd, level: i32, name: i32, v: i32) -> Result<(), Errno> {
    crate::fault::point();
    setsockopt(fd, level, name, &v.to_ne_bytes())
}

/// The local (`peer` false) or remote address, as the kernel's `struct sockaddr` bytes.
pub fn address(fd: impl AsFd, peer: bool) -> Result<Vec<u8>, Errno> {
    // SAFETY: sockaddr_storage is plain old data; zeroes are a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let f = if peer {
        libc::getpeername
    } else {
        libc::getsockname
    };
    // SAFETY: the kernel writes at most len bytes of address into ss.
    let r = unsafe {
        f(
            fd.as_fd().as_raw_fd(),
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    Errno::result(r)?;
    let len = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: ss is len bytes of initialized memory (at most its size).
    let bytes = unsafe {
        std::slice::from_raw_parts((&ss as *const libc::sockaddr_storage).cast::<u8>(), len)
    };
    Ok(bytes.to_vec())
}

fn with_sockaddr<T>(
    addr: &[u8],
    f: impl FnOnce(*const libc::sockaddr, libc::socklen_t) -> T,
) -> Result<T, Errno> {
    if addr.len() > std::mem::size_of::<libc::sockaddr_storage>() || addr.len() < 2 {
        return Err(Errno::EINVAL);
    }
    // SAFETY: zeroed plain old data, then filled with at most its size.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // SAFETY: addr.len() ≤ the size of ss (checked above).
    unsafe {
        std::ptr::copy_nonoverlapping(
            addr.as_ptr(),
            (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(),
            addr.len(),
        )
    };
    Ok(f(
        (&ss as *const libc::sockaddr_storage).cast(),
        addr.len() as libc::socklen_t,
    ))
}

/// `bind` to an address given as `struct sockaddr` bytes.
pub fn bind(fd: impl AsFd, addr: &[u8]) -> Result<(), Errno> {
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: bind reads len bytes of a valid sockaddr.
    let r = with_sockaddr(addr, |a, l| unsafe { libc::bind(fd, a, l) })?;
    Errno::result(r).map(drop)
}

/// `connect` to an address given as `struct sockaddr` bytes.
pub fn connect(fd: impl AsFd, addr: &[u8]) -> Result<(), Errno> {
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: connect reads len bytes of a valid sockaddr.
    let r = with_sockaddr(addr, |a, l| unsafe { libc::connect(fd, a, l) })?;
    Errno::result(r).map(drop)
}

/// A new socket, close-on-exec.
pub fn socket(family: i32, ty: i32, protocol: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: socket() takes integers; on success the descriptor is ours.
    let r = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, protocol) };
    Errno::result(r).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A connected pair of unix sockets, close-on-exec.
pub fn socketpair(ty: i32) -> Result<(OwnedFd, OwnedFd), Errno> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into fds; on success both are ours.
    let r =
        unsafe { libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    Errno::result(r)?;
    // SAFETY: both are fresh descriptors.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `accept4`, close-on-exec: the connection waiting first.
pub fn accept(fd: impl AsFd) -> Result<OwnedFd, Errno> {
    // SAFETY: accept4 without an address; on success the descriptor is ours.
    let r = unsafe {
        libc::accept4(
            fd.as_fd().as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    Errno::result(r).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn listen(fd: impl AsFd, backlog: i32) -> Result<(), Errno> {
    // SAFETY: listen takes integers.
    Errno::result(unsafe { libc::listen(fd.as_fd().as_raw_fd(), backlog) }).map(drop)
}

pub fn shutdown(fd: impl AsFd, how: i32) -> Result<(), Errno> {
    // SAFETY: shutdown takes integers.
    Errno::result(unsafe { libc::shutdown(fd.as_fd().as_raw_fd(), how) }).map(drop)
}

/// `send` without blocking; the bytes taken.
pub fn send(fd: impl AsFd, data: &[u8]) -> Result<usize, Errno> {
    // SAFETY: the kernel reads data.len() bytes of data.
    let r = unsafe {
        libc::send(
            fd.as_fd().as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    Errno::result(r).map(|n| n as usize)
}

/// Copies what waits in a TCP queue (the one repair mode selected) into `buf` without
/// consuming it (`MSG_PEEK | MSG_DONTWAIT`); the bytes copied.
pub fn peek_stream(fd: impl AsFd, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: the kernel writes at most buf.len() bytes into buf.
    let r = unsafe {
        libc::recv(
            fd.as_fd().as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match Errno::result(r) {
        Ok(n) => Ok(n as usize),
        Err(Errno::EAGAIN) => Ok(0),
        Err(e) => Err(e),
    }
}

/// An int-sized socket ioctl (`SIOCINQ`, `SIOCOUTQ`, `SIOCOUTQNSD`).
pub fn ioctl_int(fd: impl AsFd, request: u64) -> Result<i32, Errno> {
    let mut v: libc::c_int = 0;
    // SAFETY: these requests write one int.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), request as _, &mut v) };
    Errno::result(r).map(|_| v)
}

pub const SIOCINQ: u64 = 0x541b;
pub const SIOCOUTQ: u64 = 0x5411;
pub const SIOCOUTQNSD: u64 = 0x894b;

/// TCP repair mode (`linux/tcp.h`).
pub const TCP_REPAIR: i32 = 19;
pub const TCP_REPAIR_QUEUE: i32 = 20;
pub const TCP_QUEUE_SEQ: i32 = 21;
pub const TCP_REPAIR_OPTIONS: i32 = 22;
pub const TCP_TIMESTAMP: i32 = 24;
pub const TCP_REPAIR_WINDOW: i32 = 29;
pub const TCP_NO_QUEUE: i32 = 0;
pub const TCP_RECV_QUEUE: i32 = 1;
pub const TCP_SEND_QUEUE: i32 = 2;
pub const TCPOPT_MSS: u32 = 2;
pub const TCPOPT_WINDOW: u32 = 3;
pub const TCPOPT_SACK_PERM: u32 = 4;
pub const TCPOPT_TIMESTAMP: u32 = 8;

/// What one `MSG_PEEK` read found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peeked {
    /// Bytes copied into the buffer.
    pub copied: usize,
    /// What the kernel returned with `MSG_TRUNC`: for a datagram, the length of what is left
    /// of it from the peek offset (more than `copied` when the buffer was too short).
    pub len: usize,
    /// File descriptors were attached (`SCM_RIGHTS`); the copies the peek made are closed.
    pub rights: bool,
    /// Credentials were attached (`SCM_CREDENTIALS`).
    pub creds: bool,
    /// Control data did not fit the buffer given.
    pub ctrunc: bool,
}

/// Reads what waits in the socket's receive queue at its peek offset without consuming it
/// (`MSG_PEEK | MSG_DONTWAIT | MSG_TRUNC`); `None` at the end of the queue (EAGAIN, or 0 from
/// a stream whose peer shut down).
pub fn peek(fd: impl AsFd, buf: &mut [u8]) -> Result<Option<Peeked>, Errno> {
    let mut ctrl = [0u64; 128];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; zeroes are a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&ctrl);
    // SAFETY: the kernel writes into the buffers msg points at, within their lengths.
    let r = unsafe {
        libc::recvmsg(
            fd.as_fd().as_raw_fd(),
            &mut msg,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_TRUNC | libc::MSG_CMSG_CLOEXEC,
        )
    };
    let len = match Errno::result(r) {
        Ok(n) => n as usize,
        Err(Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut p = Peeked {
        copied: len.min(buf.len()),
        len,
        rights: false,
        creds: false,
        ctrunc: msg.msg_flags & libc::MSG_CTRUNC != 0,
    };
    // SAFETY: walking the control messages the kernel wrote into ctrl, by the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                p.rights = true;
                let data = libc::CMSG_DATA(c).cast::<i32>();
                let n = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..n {
                    libc::close(data.add(i).read_unaligned());
                }
            }
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS {
                p.creds = true;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Some(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ino(fd: &OwnedFd) -> u64 {
        let f = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("stat");
        f.ino()
    }

    #[test]
    fn diag_names_the_peer_and_the_queue() {
        let (a, b) = socketpair(libc::SOCK_STREAM).expect("socketpair");
        assert_eq!(send(&b, b"hello").expect("send"), 5);
        let d = unix_diag(ino(&a)).expect("unix_diag");
        assert_eq!(d.sock_type, libc::SOCK_STREAM as u8);
        assert_eq!(d.peer as u64, ino(&b));
        assert_eq!(d.rqlen.0, 5);
        assert_eq!(d.name, None);
    }

    #[test]
    fn peek_reads_without_consuming_from_the_peek_offset() {
        let (a, b) = socketpair(libc::SOCK_DGRAM).expect("socketpair");
        send(&b, b"one").expect("send");
        send(&b, b"three").expect("send");
        setsockopt_int(&a, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).expect("peek off");
        let mut buf = [0u8; 2];
        let p = peek(&a, &mut buf).expect("peek").expect("a datagram");
        assert_eq!((p.copied, p.len), (2, 3));
        let p = peek(&a, &mut buf).expect("peek").expect("the rest of it");
        assert_eq!((p.copied, p.len, buf[0]), (1, 1, b'e'));
        let mut big = [0u8; 16];
        let p = peek(&a, &mut big).expect("peek").expect("the second");
        assert_eq!(&big[..p.copied], b"three");
        assert_eq!(peek(&a, &mut big).expect("peek"), None);
        // Still all there.
        let d = unix_diag(ino(&a)).expect("unix_diag");
        assert_eq!(d.rqlen.0, 3, "the first datagram's length");
    }
}
