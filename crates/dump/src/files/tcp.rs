//! Established TCP connections (`--tcp-established`). Once every descriptor of a process is
//! read, its connections are locked (`NetLock`: their packets are dropped both ways, so the
//! peer sees neither a reset nor an answer), each socket is put in repair mode, and what the
//! kernel keeps of the connection is read: both sequence numbers, both queues (without
//! consuming them), the options agreed with the peer, the window and the timestamp clock.
//!
//! The sockets stay in repair mode: when the dumped processes are killed, a socket in repair
//! mode closes without a word to the peer. The lock stays until the restore has the
//! connections back; the image names it. A dump that fails takes every socket out of repair
//! mode and removes the lock, so the connections carry on as if nothing happened.

use super::Cx;
use anyhow::{bail, Context, Result};
use stasis_image::model::*;
use stasis_sys::netlock;
use stasis_sys::sock;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

/// Bytes a queue may hold at most (far above any socket buffer the kernel allows unforced).
const MAX_QUEUE: usize = 256 << 20;

/// The lock over every connection a dump holds, and the sockets it put in repair mode.
pub(crate) struct NetLock {
    pid: i32,
    table: Option<String>,
    repaired: Vec<OwnedFd>,
    committed: bool,
}

impl NetLock {
    pub fn new(pid: i32) -> NetLock {
        NetLock {
            pid,
            table: None,
            repaired: Vec::new(),
            committed: false,
        }
    }

    /// The lock's name, once it holds a connection.
    pub fn table(&self) -> Option<String> {
        self.table.clone()
    }

    fn hold(&mut self, tuples: &[netlock::Tuple]) -> Result<()> {
        let create = self.table.is_none();
        let table = self
            .table
            .get_or_insert_with(|| netlock::new_name(self.pid))
            .clone();
        if create {
            stasis_infect::guardian::note_net_lock(self.pid, &table)?;
        }
        netlock::lock(&table, create, tuples).map_err(|e| {
            if create {
                self.table = None;
            }
            anyhow::anyhow!("locking the TCP connections of pid {}: {e}", self.pid)
        })
    }

    /// The processes go on (`--leave-running`) or the dump failed: every socket leaves repair
    /// mode and the lock goes.
    pub fn release(&mut self) {
        for fd in self.repaired.drain(..) {
            if let Err(e) = sock::setsockopt_int(&fd, libc::IPPROTO_TCP, sock::TCP_REPAIR, 0) {
                tracing::error!("taking a TCP socket out of repair mode: {e}");
            }
        }
        if let Some(t) = self.table.take() {
            if let Err(e) = netlock::unlock(&t) {
                tracing::error!("removing the network lock {t}: {e}");
            }
        }
        let _ = stasis_infect::guardian::note_net_released();
    }

    /// The processes are killed: their sockets close in repair mode (silently) once our
    /// copies go too.
    pub fn killed(&mut self) {
        self.repaired.clear();
    }

    /// The image is written: the lock stays for the restore.
    pub fn commit(&mut self) {
        self.committed = true;
    }
}

impl Drop for NetLock {
    fn drop(&mut self) {
        if !self.committed {
            self.release();
        }
    }
}

/// An address and port from `struct sockaddr` bytes.
fn endpoint(a: &[u8]) -> Option<(IpAddr, u16)> {
    let family = u16::from_ne_bytes([*a.first()?, *a.get(1)?]);
    let port = u16::from_be_bytes([*a.get(2)?, *a.get(3)?]);
    match family as i32 {
        libc::AF_INET => {
            let b: [u8; 4] = a.get(4..8)?.try_into().ok()?;
            Some((IpAddr::from(b), port))
        }
        libc::AF_INET6 => {
            let b: [u8; 16] = a.get(8..24)?.try_into().ok()?;
            Some((IpAddr::from(b), port))
        }
        _ => None,
    }
}

/// Locks and reads every established connection `collect` found in this process.
pub(crate) fn settle(pid: i32, cx: &mut Cx) -> Result<()> {
    let pending = std::mem::take(&mut cx.tcp_pending);
    if pending.is_empty() {
        return Ok(());
    }
    let mut tuples = Vec::new();
    for (id, nr, _) in &pending {
        let Some(FileKind::Socket(s)) = cx.files.desc(*id).map(|d| &d.kind) else {
            bail!("pid {pid}: a TCP connection's description is missing");
        };
        match (endpoint(&s.local), endpoint(&s.remote)) {
            (Some(l), Some(r)) => tuples.push((l, r)),
            _ => bail!("fd {nr} of pid {pid}: a TCP connection without addresses"),
        }
    }
    cx.net.hold(&tuples)?;
    for (id, nr, fd) in pending {
        let here = || format!("fd {nr} of pid {pid} (TCP connection)");
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .with_context(|| format!("{}: its inode", here()))?;
        stasis_infect::guardian::note_repair(pid, nr, inode)?;
        sock::setsockopt_int(&fd, libc::IPPROTO_TCP, sock::TCP_REPAIR, 1).map_err(|e| {
            anyhow::anyhow!(
                "{}: entering repair mode: {e} (stasis needs CAP_NET_ADMIN)",
                here()
            )
        })?;
        cx.net
            .repaired
            .push(fd.try_clone().with_context(|| format!("{}: dup", here()))?);
        let got = read(&fd).with_context(here)?;
        let (data_off, len) = super::append_padded(cx.pages, &got.recvq)?;
        let (send_off, send_len) = super::append_padded(cx.pages, &got.sendq)?;
        let Some(FileKind::Socket(s)) = cx
            .files
            .descs
            .iter_mut()
            .find(|d| d.id == id)
            .map(|d| &mut d.kind)
        else {
            bail!("{}: its description is missing", here());
        };
        s.queue = SockQueue {
            data_off,
            len,
            msgs: Vec::new(),
        };
        let mut t = got.conn;
        t.send = SockQueue {
            data_off: send_off,
            len: send_len,
            msgs: Vec::new(),
        };
        s.tcp = Some(t);
    }
    Ok(())
}

/// What repair mode shows of one connection.
struct Read {
    conn: TcpConn,
    sendq: Vec<u8>,
    recvq: Vec<u8>,
}

/// One connection in repair mode: its state, its send queue, its receive queue.
fn read(fd: &OwnedFd) -> Result<Read> {
    let set = |name, v| {
        sock::setsockopt_int(fd, libc::IPPROTO_TCP, name, v)
            .map_err(|e| anyhow::anyhow!("setsockopt TCP {name}: {e}"))
    };
    let get = |name| {
        sock::getsockopt_int(fd, libc::IPPROTO_TCP, name)
            .map_err(|e| anyhow::anyhow!("getsockopt TCP {name}: {e}"))
    };
    let ioctl = |req, what: &str| {
        sock::ioctl_int(fd, req)
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))
            .and_then(|n| usize::try_from(n).context("a negative queue length"))
    };
    if sock::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF).is_ok_and(|v| v >= 0) {
        bail!("it has a peek offset (SO_PEEK_OFF); not supported yet");
    }
    // The lock stops new packets, but one already past it may still be taken in (data, an
    // acknowledgement) while the connection is read: the sequence numbers and queues are read
    // until two readings in a row agree, so they describe one moment.
    let counters = || -> Result<(u32, usize, u32, usize, usize)> {
        set(sock::TCP_REPAIR_QUEUE, sock::TCP_RECV_QUEUE)?;
        let rcv_seq = get(sock::TCP_QUEUE_SEQ)? as u32;
        let inq = ioctl(sock::SIOCINQ, "SIOCINQ")?;
        set(sock::TCP_REPAIR_QUEUE, sock::TCP_SEND_QUEUE)?;
        let snd_seq = get(sock::TCP_QUEUE_SEQ)? as u32;
        let outq = ioctl(sock::SIOCOUTQ, "SIOCOUTQ")?;
        let unsent = ioctl(sock::SIOCOUTQNSD, "SIOCOUTQNSD")?;
        Ok((rcv_seq, inq, snd_seq, outq, unsent))
    };
    let mut tries = 0;
    let (rcv_seq, recvq, snd_seq, sendq, unsent) = loop {
        let before = counters()?;
        let (_, inq, _, outq, _) = before;
        set(sock::TCP_REPAIR_QUEUE, sock::TCP_RECV_QUEUE)?;
        let recvq = peek_exactly(fd, inq);
        set(sock::TCP_REPAIR_QUEUE, sock::TCP_SEND_QUEUE)?;
        let sendq = peek_exactly(fd, outq);
        let same = counters()? == before;
        tries += 1;
        match (recvq, sendq) {
            (Ok(recvq), Ok(sendq)) if same => break (before.0, recvq, before.2, sendq, before.4),
            (recvq, sendq) if tries > 100 => {
                recvq.context("reading the receive queue")?;
                sendq.context("reading the send queue")?;
                bail!("its state kept changing while it was read, under the network lock");
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    };
    let outq = sendq.len();
    set(sock::TCP_REPAIR_QUEUE, sock::TCP_NO_QUEUE)?;
    let mut info = [0u8; 104];
    sock::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)
        .map_err(|e| anyhow::anyhow!("TCP_INFO: {e}"))?;
    if info[0] != 1 {
        bail!("it left the established state while it was read");
    }
    let options = info[5];
    let mss = get(libc::TCP_MAXSEG)? as u32;
    let timestamp = get(sock::TCP_TIMESTAMP)? as u32;
    let mut w = [0u8; 20];
    sock::getsockopt(fd, libc::IPPROTO_TCP, sock::TCP_REPAIR_WINDOW, &mut w)
        .map_err(|e| anyhow::anyhow!("TCP_REPAIR_WINDOW: {e}"))?;
    let mut window = [0u32; 5];
    for (i, v) in window.iter_mut().enumerate() {
        *v = u32::from_ne_bytes([w[i * 4], w[i * 4 + 1], w[i * 4 + 2], w[i * 4 + 3]]);
    }
    let conn = TcpConn {
        snd_seq,
        rcv_seq,
        mss,
        timestamps: options & 1 != 0,
        sack: options & 2 != 0,
        wscale: (options & 4 != 0).then_some((info[6] & 0xf, info[6] >> 4)),
        timestamp,
        window,
        send: SockQueue::default(),
        unsent: u32::try_from(unsent.min(outq)).unwrap_or(0),
        bufs: (
            sock::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap_or(0) as u32,
            sock::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap_or(0) as u32,
        ),
    };
    Ok(Read { conn, sendq, recvq })
}

/// The `len` bytes of the selected queue, peeked in one read (the send queue can only be read
/// whole).
fn peek_exactly(fd: &OwnedFd, len: usize) -> Result<Vec<u8>> {
    if len > MAX_QUEUE {
        bail!("{len} bytes are queued, more than {MAX_QUEUE}");
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; len];
    let n = sock::peek_stream(fd, &mut buf).map_err(|e| anyhow::anyhow!("MSG_PEEK: {e}"))?;
    if n != len {
        bail!("{n} bytes read of the {len} queued");
    }
    Ok(buf)
}
