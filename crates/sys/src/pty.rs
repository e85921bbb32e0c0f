//! Pseudo-terminals: the ioctls on a master and its slave, and taking the data queued in a
//! pty out and putting it back exactly, which the dump (it must leave the pty as it was) and
//! the restore (a new pty gets the old one's queues) share.
//!
//! A pty queues data in two places: what the slave's program wrote and the master's holder
//! has not read yet (the master's input, raw: the master's own modes are fixed and raw), and
//! what was typed at the master and the slave's program has not read yet (the slave's input,
//! already through the slave's line discipline: mapped, echoed, and in canonical mode cut
//! into lines). The first is put back by writing it to the slave with output processing off.
//! The second is put back by writing it to the master with the line discipline told to leave
//! every byte alone (no mapping, no signals, no erase or kill characters) but still to end
//! lines where they ended, line by line, and to echo each byte once with output processing
//! off: the echo coming back at the master is how the writer knows the kernel (which moves
//! the data on in a worker of its own) has taken it all in before the modes are set back.
//! The echoes are then read away, and the master's own queue written back after them.
//!
//! Not kept: an `^V` (literal next) typed but not followed yet, and output stopped with `^S`
//! (`put_back` fails then: the echo never comes).

use crate::fs::{tty_get_attr, tty_set_attr, KERNEL_TERMIOS_LEN};
use nix::errno::Errno;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

pub type Termios = [u8; KERNEL_TERMIOS_LEN];

const IFLAG: usize = 0;
const OFLAG: usize = 4;
const LFLAG: usize = 12;
const CC: usize = 17;

fn word(t: &Termios, at: usize) -> u32 {
    u32::from_ne_bytes([t[at], t[at + 1], t[at + 2], t[at + 3]])
}

fn set_word(t: &mut Termios, at: usize, v: u32) {
    t[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn cc(t: &Termios, i: usize) -> u8 {
    t[CC + i]
}

/// Whether the modes are canonical (input in lines).
pub fn canonical(t: &Termios) -> bool {
    word(t, LFLAG) & libc::ICANON != 0
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong) -> Result<i32, Errno> {
    let mut v: libc::c_int = 0;
    // SAFETY: each request used with this writes one int.
    let r = unsafe { libc::ioctl(fd, req, &mut v) };
    Errno::result(r).map(|_| v)
}

fn ioctl_set_int(fd: RawFd, req: libc::c_ulong, v: i32) -> Result<(), Errno> {
    // SAFETY: each request used with this reads one int.
    let r = unsafe { libc::ioctl(fd, req, &v) };
    Errno::result(r).map(drop)
}

/// The pty's number (`/dev/pts/N`), asked of its master.
pub fn index(master: RawFd) -> Result<u32, Errno> {
    ioctl_int(master, libc::TIOCGPTN).map(|v| v as u32)
}

/// Whether the slave is still locked (`unlockpt` not called).
pub fn locked(master: RawFd) -> Result<bool, Errno> {
    ioctl_int(master, libc::TIOCGPTLCK).map(|v| v != 0)
}

pub fn unlock(master: RawFd) -> Result<(), Errno> {
    ioctl_set_int(master, libc::TIOCSPTLCK, 0)
}

/// Packet mode (`TIOCPKT`) of a master.
pub fn packet(master: RawFd) -> Result<bool, Errno> {
    ioctl_int(master, libc::TIOCGPKT).map(|v| v != 0)
}

pub fn set_packet(master: RawFd, on: bool) -> Result<(), Errno> {
    ioctl_set_int(master, libc::TIOCPKT, on as i32)
}

/// `TIOCEXCL` on this end.
pub fn exclusive(fd: RawFd) -> Result<bool, Errno> {
    ioctl_int(fd, libc::TIOCGEXCL).map(|v| v != 0)
}

pub fn set_exclusive(fd: RawFd) -> Result<(), Errno> {
    // SAFETY: TIOCEXCL takes no argument.
    let r = unsafe { libc::ioctl(fd, libc::TIOCEXCL) };
    Errno::result(r).map(drop)
}

/// The window size (rows, columns, x pixels, y pixels).
pub fn winsize(fd: RawFd) -> Result<[u16; 4], Errno> {
    let mut w = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one struct winsize.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut w) };
    Errno::result(r).map(|_| [w.ws_row, w.ws_col, w.ws_xpixel, w.ws_ypixel])
}

pub fn set_winsize(fd: RawFd, w: [u16; 4]) -> Result<(), Errno> {
    let w = libc::winsize {
        ws_row: w[0],
        ws_col: w[1],
        ws_xpixel: w[2],
        ws_ypixel: w[3],
    };
    // SAFETY: TIOCSWINSZ reads one struct winsize.
    let r = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &w) };
    Errno::result(r).map(drop)
}

/// The session whose controlling terminal the pty is, asked of its master (None: no session).
pub fn session(master: RawFd) -> Result<Option<i32>, Errno> {
    match ioctl_int(master, libc::TIOCGSID) {
        Ok(s) => Ok(Some(s)),
        Err(Errno::ENOTTY) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The foreground process group, asked of the master (0: none).
pub fn foreground(master: RawFd) -> Result<i32, Errno> {
    ioctl_int(master, libc::TIOCGPGRP)
}

/// Makes the terminal `slave` is open on the caller's controlling terminal (the caller leads
/// a session without one).
pub fn make_controlling(slave: RawFd) -> Result<(), Errno> {
    // SAFETY: TIOCSCTTY takes an int by value (0: do not steal it from another session).
    let r = unsafe { libc::ioctl(slave, libc::TIOCSCTTY, 0) };
    Errno::result(r).map(drop)
}

/// Sets the foreground process group of the caller's controlling terminal (`fd` is open on it).
pub fn set_foreground(fd: RawFd, pgid: i32) -> Result<(), Errno> {
    ioctl_set_int(fd, libc::TIOCSPGRP, pgid)
}

/// Opens the slave of `master` (`TIOCGPTPEER`), with `flags` (O_NOCTTY is always added).
pub fn open_slave(master: RawFd, flags: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: TIOCGPTPEER takes the open flags by value and returns a new descriptor.
    let r = unsafe { libc::ioctl(master, libc::TIOCGPTPEER, flags | libc::O_NOCTTY) };
    // SAFETY: on success r is a new descriptor of ours.
    Errno::result(r).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Bytes queued for reading on `fd` (in canonical mode: of complete lines only).
pub fn queued(fd: RawFd) -> Result<usize, Errno> {
    ioctl_int(fd, libc::FIONREAD).map(|v| v.max(0) as usize)
}

/// `poll` for `events` without waiting; the kernel also moves on data still in its worker's
/// buffer when nothing is ready.
fn ready(fd: RawFd, events: i16) -> Result<i16, Errno> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one pollfd, no wait.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    Errno::result(r).map(|_| p.revents)
}

fn read_some(fd: RawFd, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        // SAFETY: reading into buf, at most its length.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match Errno::result(r) {
            Err(Errno::EINTR) => continue,
            other => return other.map(|n| n as usize),
        }
    }
}

fn write_all(fd: RawFd, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        // SAFETY: writing from data, at most its length.
        let r = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        match Errno::result(r) {
            Ok(n) => data = &data[n as usize..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One line of the slave's canonical input: its bytes (with the `\n` or end-of-line
/// character that ended it), or ended by the end-of-file character (not among its bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub len: usize,
    pub eof: bool,
}

/// A pty's queues, as `take` finds them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Queues {
    /// The slave's input: the complete lines (`lines`, in canonical mode), then the rest.
    pub input: Vec<u8>,
    pub lines: Vec<Line>,
    /// The master's input (what the slave's program wrote).
    pub output: Vec<u8>,
}

/// Most a pty queues in each direction (the line discipline's buffer is 4 KiB); more is
/// refused by `take` and by the image check.
pub const MAX_QUEUE: usize = 64 * 1024;

/// What stops `take` or `put_back`.
#[derive(Debug)]
pub enum QueueError {
    Sys(Errno),
    PacketStatus,
    TooMuch,
    Stuck,
}

impl From<Errno> for QueueError {
    fn from(e: Errno) -> Self {
        QueueError::Sys(e)
    }
}

impl std::fmt::Display for QueueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueError::Sys(e) => write!(f, "{}", std::io::Error::from(*e)),
            QueueError::PacketStatus => {
                f.write_str("its master has a packet-mode status byte waiting to be read")
            }
            QueueError::TooMuch => write!(f, "more than {MAX_QUEUE} bytes are queued in it"),
            QueueError::Stuck => f.write_str(
                "the line discipline did not take the data back in time (output stopped with ^S?)",
            ),
        }
    }
}

impl std::error::Error for QueueError {}

/// Takes every byte queued in the pty out (`master` and `slave` are open on it; `packet`: the
/// master is in packet mode). The slave's modes are changed for a moment (to read the last,
/// unfinished line of canonical input) and set back. Call `put_back` with the result.
pub fn take(master: RawFd, slave: RawFd, packet: bool) -> Result<Queues, QueueError> {
    if packet && ready(master, libc::POLLPRI)? & libc::POLLPRI != 0 {
        return Err(QueueError::PacketStatus);
    }
    let mut q = Queues::default();
    let mut buf = vec![0u8; 4096 + 1];
    // The master's input: until poll (which moves on what the kernel still holds) finds none.
    while ready(master, libc::POLLIN)? & libc::POLLIN != 0 {
        let n = queued(master)?;
        if n == 0 {
            break;
        }
        let want = (n + packet as usize).min(buf.len());
        let got = read_some(master, &mut buf[..want])?;
        let data = if packet {
            match buf[..got].split_first() {
                Some((0, rest)) => rest,
                _ => return Err(QueueError::PacketStatus),
            }
        } else {
            &buf[..got]
        };
        if got == 0 {
            break;
        }
        q.output.extend_from_slice(data);
        if q.output.len() > MAX_QUEUE {
            return Err(QueueError::TooMuch);
        }
    }
    let t = tty_get_attr(slave)?;
    if canonical(&t) {
        // One read, one line; poll says whether another line (or end-of-file mark) is there.
        let ends = [
            b'\n',
            cc(&t, libc::VEOL),
            if word(&t, LFLAG) & libc::IEXTEN != 0 {
                cc(&t, libc::VEOL2)
            } else {
                0
            },
        ];
        while ready(slave, libc::POLLIN)? & libc::POLLIN != 0 {
            let got = read_some(slave, &mut buf)?;
            let line = &buf[..got];
            let eof = line.last().is_none_or(|c| *c == 0 || !ends.contains(c));
            q.input.extend_from_slice(line);
            q.lines.push(Line { len: got, eof });
            if q.input.len() > MAX_QUEUE {
                return Err(QueueError::TooMuch);
            }
        }
    }
    // What is left (all of it, in non-canonical mode): read with the line discipline
    // non-canonical and not waiting for anything, then the modes set back.
    let mut raw = t;
    set_word(&mut raw, LFLAG, word(&t, LFLAG) & !libc::ICANON);
    raw[CC + libc::VMIN] = 0;
    raw[CC + libc::VTIME] = 0;
    tty_set_attr(slave, &raw)?;
    let rest = (|| -> Result<(), QueueError> {
        loop {
            let got = read_some(slave, &mut buf)?;
            if got == 0 {
                return Ok(());
            }
            q.input.extend_from_slice(&buf[..got]);
            if q.input.len() > MAX_QUEUE {
                return Err(QueueError::TooMuch);
            }
        }
    })();
    tty_set_attr(slave, &t)?;
    rest?;
    Ok(q)
}

/// Puts `q` into the pty (whose queues are empty) and leaves the slave with modes `t`.
pub fn put_back(
    master: RawFd,
    slave: RawFd,
    t: &Termios,
    packet: bool,
    q: &Queues,
) -> Result<(), QueueError> {
    if packet {
        // Echoes read back below come without status bytes; set again at the end.
        set_packet(master, false)?;
    }
    let r = put_back_unpacketed(master, slave, t, q);
    // Set before packet mode: a change of the flow-control modes in packet mode queues a
    // status byte, which the process never had.
    let modes = tty_set_attr(slave, t);
    if packet {
        set_packet(master, true)?;
    }
    r?;
    modes?;
    Ok(())
}

fn put_back_unpacketed(
    master: RawFd,
    slave: RawFd,
    t: &Termios,
    q: &Queues,
) -> Result<(), QueueError> {
    if !q.input.is_empty() {
        // Every byte as it is, lines ended where they ended, each byte echoed once, raw. The
        // flow-control characters stay as they are (they never reach the queue).
        let mut feed = *t;
        let i = word(t, IFLAG)
            & !(libc::ICRNL
                | libc::INLCR
                | libc::IGNCR
                | libc::IUCLC
                | libc::ISTRIP
                | libc::PARMRK
                | libc::INPCK);
        set_word(&mut feed, IFLAG, i);
        set_word(&mut feed, OFLAG, word(t, OFLAG) & !libc::OPOST);
        let l = (word(t, LFLAG) & !(libc::ISIG | libc::ECHOCTL | libc::ECHONL | libc::FLUSHO))
            | libc::ECHO;
        let l = l & !libc::PENDIN;
        set_word(&mut feed, LFLAG, l);
        for c in [
            libc::VERASE,
            libc::VKILL,
            libc::VWERASE,
            libc::VREPRINT,
            libc::VLNEXT,
            libc::VDISCARD,
            libc::VEOF,
        ] {
            feed[CC + c] = 0;
        }
        let mut at = 0;
        let mut chunks: Vec<(&[u8], bool)> = Vec::new();
        for line in &q.lines {
            let end = (at + line.len).min(q.input.len());
            chunks.push((&q.input[at..end], line.eof));
            at = end;
        }
        if at < q.input.len() {
            chunks.push((&q.input[at..], false));
        }
        let eof_char = cc(t, libc::VEOF);
        for (bytes, eof) in chunks {
            let mut this = feed;
            let mut out = bytes.to_vec();
            if eof {
                if eof_char == 0 {
                    return Err(QueueError::Stuck);
                }
                this[CC + libc::VEOF] = eof_char;
                out.push(eof_char);
            }
            tty_set_attr(slave, &this)?;
            write_all(master, &out)?;
            // The end-of-file character is not echoed.
            wait_queued(master, slave, bytes.len())?;
            discard(master, bytes.len())?;
        }
    }
    if !q.output.is_empty() {
        let mut plain = *t;
        set_word(&mut plain, OFLAG, word(t, OFLAG) & !libc::OPOST);
        tty_set_attr(slave, &plain)?;
        write_all(slave, &q.output)?;
        wait_queued(master, slave, q.output.len())?;
    }
    Ok(())
}

/// Waits until the master has `n` bytes to read.
fn wait_queued(master: RawFd, slave: RawFd, n: usize) -> Result<(), QueueError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        // poll moves on what the kernel's worker still holds, on both sides.
        let _ = ready(slave, libc::POLLIN);
        let _ = ready(master, libc::POLLIN);
        if queued(master)? >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(QueueError::Stuck);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Reads `n` bytes (echoes) away from the master.
fn discard(master: RawFd, mut n: usize) -> Result<(), QueueError> {
    let mut buf = [0u8; 4096];
    while n > 0 {
        let got = read_some(master, &mut buf[..n.min(4096)])?;
        if got == 0 {
            return Err(QueueError::Stuck);
        }
        n -= got;
    }
    Ok(())
}

/// Opens a new pty (`/dev/ptmx`), numbered `want` if that number is free (ptys are numbered
/// lowest free first, so the ones opened on the way are closed again). Returns the master,
/// unlocked, and its number.
pub fn open_numbered(want: u32) -> Result<(OwnedFd, u32), Errno> {
    let open = || -> Result<OwnedFd, Errno> {
        let fd = nix::fcntl::open(
            "/dev/ptmx",
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        Ok(fd)
    };
    let mut on_the_way = Vec::new();
    let first = open()?;
    let mut got = index(first.as_raw_fd())?;
    let mut fd = first;
    // Bounded: an image may name any number, and every pty opened on the way is one other
    // programs cannot have meanwhile.
    while got < want && on_the_way.len() < 256 {
        let next = open()?;
        let n = index(next.as_raw_fd())?;
        on_the_way.push(std::mem::replace(&mut fd, next));
        got = n;
    }
    if got != want {
        // Taken: the first one made, the lowest free number, is as good as any.
        on_the_way.push(fd);
        let keep = on_the_way.remove(0);
        got = index(keep.as_raw_fd())?;
        fd = keep;
    }
    drop(on_the_way);
    unlock(fd.as_raw_fd())?;
    Ok((fd, got))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        let (m, _) = open_numbered(0).expect("a pty");
        let s = open_slave(m.as_raw_fd(), libc::O_RDWR | libc::O_NONBLOCK).expect("its slave");
        (m, s)
    }

    /// Types `text` at the master and waits for its `echoed` bytes of echo.
    fn typed(m: &OwnedFd, s: &OwnedFd, text: &[u8], echoed: usize) {
        write_all(m.as_raw_fd(), text).expect("typing");
        wait_queued(m.as_raw_fd(), s.as_raw_fd(), echoed).expect("the echo");
    }

    #[test]
    fn queues_come_out_and_go_back_exactly_in_canonical_mode() {
        let (m, s) = pair();
        let (m2, s2) = pair();
        typed(&m, &s, b"one\ntwo\nthr", 13);
        write_all(s.as_raw_fd(), b"out put\n").expect("writing");
        std::thread::sleep(Duration::from_millis(50));
        let t = tty_get_attr(s.as_raw_fd()).expect("modes");
        let q = take(m.as_raw_fd(), s.as_raw_fd(), false).expect("take");
        assert_eq!(
            q.lines,
            vec![Line { len: 4, eof: false }, Line { len: 4, eof: false }]
        );
        assert!(q.input.ends_with(b"thr"), "{q:?}");
        // Echo of what was typed, then the output (\n made \r\n by the slave's modes).
        assert!(q.output.ends_with(b"out put\r\n"), "{q:?}");
        put_back(m2.as_raw_fd(), s2.as_raw_fd(), &t, false, &q).expect("put back");
        let again = take(m2.as_raw_fd(), s2.as_raw_fd(), false).expect("take again");
        assert_eq!(again, q);
    }

    #[test]
    fn a_line_ended_by_end_of_file_survives() {
        let (m, s) = pair();
        typed(&m, &s, b"ab\x04cd\nx", 6);
        let (m2, s2) = pair();
        let t = tty_get_attr(s.as_raw_fd()).expect("modes");
        let q = take(m.as_raw_fd(), s.as_raw_fd(), false).expect("take");
        assert_eq!(
            q.lines,
            vec![Line { len: 2, eof: true }, Line { len: 3, eof: false }]
        );
        assert_eq!(q.input, b"abcd\nx");
        put_back(m2.as_raw_fd(), s2.as_raw_fd(), &t, false, &q).expect("put back");
        let again = take(m2.as_raw_fd(), s2.as_raw_fd(), false).expect("take again");
        assert_eq!(again.lines, q.lines);
        assert_eq!(again.input, q.input);
    }
}
