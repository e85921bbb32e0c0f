//! Sockets: the sockets fixture (tests/fixtures/sockets.c: unix pairs of every type with data
//! queued both ways, shutdowns, a pair whose other end is closed, unix listeners on a path and
//! an abstract name, a bound socket whose file was deleted, TCP listeners on IPv4 and IPv6 with
//! options, UDP bound and connected, an epoll set over five kinds of files) checks itself after
//! two dump/restore trips; what stasis cannot save is refused, naming the pid and the thing,
//! and leaves the process as it was.

mod common;

use common::*;
use std::io::{Read, Write};

fn port(d: &Daemon, file: &str) -> u16 {
    std::fs::read_to_string(d.dir.path().join(file))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {file}"))
}

/// Whether something listens on 127.0.0.1:`port` (a connection is made and closed: only
/// call it when the listener's backlog may hold one).
fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn every_kind_of_socket_comes_back_with_its_state() {
    if !require_root("every_kind_of_socket_comes_back_with_its_state") {
        return;
    }
    let d = Daemon::start("sockets", &["--dir", "{dir}"]);
    let tcp4 = port(&d, "tcp4");
    for n in 1..=2 {
        d.dump(n);
        assert!(!listening(tcp4), "nobody listens while the process is away");
        let show = stasis(&["show", &d.image(n).to_string_lossy()]);
        let text = String::from_utf8_lossy(&show.stdout).into_owned();
        assert!(show.status.success(), "show: {}", stderr_of(&show));
        for needle in [
            format!("tcp 127.0.0.1:{tcp4} listening (backlog 9)"),
            "unix stream (unnamed) paired with socket".to_string(),
            "options SO_REUSEADDR, SO_RCVBUF, TCP_NODELAY".to_string(),
            "20 bytes queued".to_string(),
            "70007 bytes queued in 4 messages".to_string(),
            "connected, its peer closed; shut down for reading; shut down for writing; 9 bytes queued".to_string(),
            "(its file deleted)".to_string(),
            "(file mode 640".to_string(),
            "options SO_REUSEADDR".to_string(),
        ] {
            assert!(text.contains(&needle), "show lacks {needle:?}:\n{text}");
        }
        d.restore(n);
    }
    let v = assert_pass(&d.finish());
    assert!(detail(&v, "sockets") >= 30, "{v}");
}

/// The listener's port is taken again at once: a client that connects after the restore is
/// accepted and answered by the restored process.
#[test]
fn a_restored_tcp_listener_answers_a_client() {
    if !require_root("a_restored_tcp_listener_answers_a_client") {
        return;
    }
    let dir = tempdir::Dir::new("echo");
    let pidfile = dir.path().join("pid");
    let script = format!(
        "import socket,os\n\
         s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('127.0.0.1', 0)); s.listen(4)\n\
         open('{d}/port','w').write(str(s.getsockname()[1]))\n\
         open('{d}/pid.tmp','w').write(str(os.getpid())); os.rename('{d}/pid.tmp','{p}')\n\
         while True:\n\
         \x20   c,_=s.accept(); c.sendall(b'pid %d: ' % os.getpid() + c.recv(100)); c.close()\n",
        d = dir.path().display(),
        p = pidfile.display()
    );
    let mut child = python(&script, &pidfile, None, true);
    let pid = child.id() as i32;
    let port: u16 = std::fs::read_to_string(dir.path().join("port"))
        .expect("port")
        .trim()
        .parse()
        .expect("a port");
    let ask = |what: &str| -> String {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        c.write_all(what.as_bytes()).expect("send");
        let mut out = String::new();
        c.read_to_string(&mut out).expect("answer");
        out
    };
    assert_eq!(ask("before"), format!("pid {pid}: before"));
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    assert_eq!(ask("after"), format!("pid {pid}: after"));
    // SAFETY: the restored process has our child's pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid);
}

/// A Python process set up by `what` (with `D`, its work directory, and socket, os, signal,
/// time, select and array imported) that, on SIGTERM, runs `check` (statements that raise on
/// a difference) and writes "ok" or the exception into D/verdict. Returns it, its pid and D.
fn checked_python(
    what: &str,
    check: &str,
    stdio: Option<std::os::fd::RawFd>,
    new_session: bool,
) -> (std::process::Child, i32, tempdir::Dir) {
    let dir = tempdir::Dir::new("checked");
    let pidfile = dir.path().join("pid");
    let script = format!(
        "import socket,os,signal,time,select,array\n\
         D='{d}'\n\
         {what}\n\
         def term(*_):\n\
         \x20   try:\n\
         \x20       {check}\n\
         \x20       open(D+'/verdict','w').write('ok')\n\
         \x20   except Exception as ex:\n\
         \x20       open(D+'/verdict','w').write(repr(ex))\n\
         \x20   os._exit(0)\n\
         signal.signal(signal.SIGTERM, term)\n\
         open(D+'/pid.tmp','w').write(str(os.getpid())); os.rename(D+'/pid.tmp','{p}')\n\
         while True: time.sleep(1)\n",
        d = dir.path().display(),
        p = pidfile.display()
    );
    let child = python(&script, &pidfile, stdio, new_session);
    let pid = child.id() as i32;
    (child, pid, dir)
}

fn verdict_of(dir: &tempdir::Dir) -> String {
    std::fs::read_to_string(dir.path().join("verdict")).unwrap_or_default()
}

/// A python process holding `what` (its setup code); the dump must fail naming `needle` and
/// the pid, and the process must run on untraced with its sockets intact: on SIGTERM it runs
/// `check` and writes "ok" or the exception into DIR/verdict.
fn refused(what: &str, check: &str, needle: &str) {
    refused_with_stdio(what, check, needle, None)
}

fn refused_with_stdio(what: &str, check: &str, needle: &str, stdio: Option<std::os::fd::RawFd>) {
    let (mut child, pid, dir) = checked_python(what, check, stdio, false);
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    let e = stderr_of(&o);
    let state = stasis_state(pid);
    let tracer = tracer_of(pid);
    // SAFETY: our child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = child.wait();
    let verdict = verdict_of(&dir);
    assert_eq!(o.status.code(), Some(1), "{what}: {e}");
    assert_eq!(e.trim().lines().count(), 1, "one-line error: {e}");
    assert!(
        e.contains(&pid.to_string()) && e.contains(needle),
        "{what}: {e:?} should name the pid and {needle:?}"
    );
    assert!(!img.exists(), "a refused dump leaves no image");
    assert!(
        matches!(state, 'S' | 'R') && tracer == 0,
        "the refused process runs on, untraced"
    );
    assert_eq!(verdict, "ok", "{what}: the process's sockets were harmed");
}

#[test]
fn an_established_tcp_connection_is_refused() {
    if !require_root("an_established_tcp_connection_is_refused") {
        return;
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = l.local_addr().expect("addr").port();
    refused(
        &format!("c=socket.create_connection(('127.0.0.1', {port})); c.sendall(b'queued')"),
        "assert c.getpeername()[1] == {port}"
            .replace("{port}", &port.to_string())
            .as_str(),
        "TCP connection",
    );
    drop(l);
}

#[test]
fn a_unix_socket_connected_outside_is_refused() {
    if !require_root("a_unix_socket_connected_outside_is_refused") {
        return;
    }
    let dir = tempdir::Dir::new("outside");
    let path = dir.path().join("l.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).expect("listener");
    refused(
        &format!(
            "c=socket.socket(socket.AF_UNIX); c.connect('{}')",
            path.display()
        ),
        "c.send(b'x')",
        "is connected to",
    );
    drop(l);
    // A pair whose other end this test holds: the process has the first end as fds 0-2.
    let (mine, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
    refused_with_stdio(
        "pass",
        "os.write(1, b'x')",
        "outside the dumped processes",
        Some(std::os::fd::AsRawFd::as_raw_fd(&theirs)),
    );
    drop((mine, theirs));
}

#[test]
fn a_waiting_connection_and_fds_in_flight_are_refused() {
    if !require_root("a_waiting_connection_and_fds_in_flight_are_refused") {
        return;
    }
    refused(
        "s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(5)\nc=socket.create_connection(s.getsockname())",
        "a,_=s.accept(); a.close()",
        "waiting to be accepted",
    );
    refused(
        "a,b=socket.socketpair()\nr,w=os.pipe()\na.sendmsg([b'fd'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [r]))])",
        "m,anc,_,_=b.recvmsg(10, 64); assert m == b'fd' and len(anc) == 1, (m, anc)",
        "SCM_RIGHTS",
    );
    refused(
        "a,b=socket.socketpair()\nb.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)\na.send(b'creds')",
        "assert b.recv(10) == b'creds'",
        "SO_PASSCRED",
    );
}

/// A process tree sharing sockets, as a pre-forking server's master and worker do: a TCP
/// listener inherited across fork (one description in both) and a unix pair with one end in
/// each, with data queued both ways. After the restore the worker answers on the old port
/// with what the master had sent it, and the master reads what the worker had sent.
#[test]
fn sockets_shared_across_a_tree_come_back_shared() {
    if !require_root("sockets_shared_across_a_tree_come_back_shared") {
        return;
    }
    let dir = tempdir::Dir::new("socktree");
    let pidfile = dir.path().join("pid");
    let script = format!(
        "import socket,os,signal,time\n\
         D='{d}'\n\
         l=socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         l.bind(('127.0.0.1', 0)); l.listen(8)\n\
         a,b=socket.socketpair()\n\
         kid=os.fork()\n\
         if kid==0:\n\
         \x20   a.close(); b.send(b'from the worker')\n\
         \x20   while True:\n\
         \x20       c,_=l.accept(); m=c.recv(100)\n\
         \x20       c.sendall(b'worker %d: %s %s' % (os.getpid(), m, b.recv(100))); c.close()\n\
         b.close(); a.send(b'from the master')\n\
         def term(*_):\n\
         \x20   got=a.recv(100, socket.MSG_DONTWAIT)\n\
         \x20   open(D+'/verdict','w').write('ok' if got==b'from the worker' else repr(got))\n\
         \x20   os.kill(kid, 9); os.waitpid(kid, 0); os._exit(0)\n\
         signal.signal(signal.SIGTERM, term)\n\
         time.sleep(0.3)\n\
         open(D+'/port','w').write('%d %d' % (l.getsockname()[1], kid))\n\
         open(D+'/pid.tmp','w').write(str(os.getpid())); os.rename(D+'/pid.tmp','{p}')\n\
         while True: time.sleep(1)\n",
        d = dir.path().display(),
        p = pidfile.display()
    );
    let mut child = python(&script, &pidfile, None, true);
    let pid = child.id() as i32;
    let info = std::fs::read_to_string(dir.path().join("port")).expect("port");
    let mut it = info
        .split_whitespace()
        .map(|v| v.parse::<i32>().expect("a number"));
    let (port, kid) = (it.next().expect("port") as u16, it.next().expect("kid"));
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    wait_gone(kid);
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.write_all(b"hi").expect("send");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("answer");
    assert_eq!(out, format!("worker {kid}: hi from the master"));
    // SAFETY: the restored master has our child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_gone(pid);
    let verdict = std::fs::read_to_string(dir.path().join("verdict")).unwrap_or_default();
    assert_eq!(verdict, "ok", "the master's end of the pair");
}

/// An asyncio echo server (epoll and TCP, in Python) with a client connection (this test)
/// streaming a pattern through it both ways the whole time — also while the server is away,
/// and with both of the server's queues full when it is dumped (the client stops reading for
/// a while first). Dumped with `--tcp-established` and restored twice: the connection is
/// never reset, and every byte comes back once, in order.
#[test]
fn a_tcp_connection_carries_on_across_restores_without_a_byte_lost() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    if !require_root("a_tcp_connection_carries_on_across_restores_without_a_byte_lost") {
        return;
    }
    let (mut server, pid, port, dir) = echo_server("");
    let conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let pat = |i: u64| (i % 251) as u8;
    let (stop, pause) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let sent = Arc::new(AtomicU64::new(0));
    let mut w = conn.try_clone().expect("clone");
    let writer = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut block = vec![0u8; 8192];
            while !stop.load(Ordering::SeqCst) {
                let at = sent.load(Ordering::SeqCst);
                for (k, b) in block.iter_mut().enumerate() {
                    *b = pat(at + k as u64);
                }
                w.write_all(&block)
                    .map_err(|e| format!("write at {at}: {e}"))?;
                sent.fetch_add(block.len() as u64, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(())
        })
    };
    let got = Arc::new(AtomicU64::new(0));
    let mut r = conn.try_clone().expect("clone");
    let reader = {
        let (got, pause, stop, sent) = (got.clone(), pause.clone(), stop.clone(), sent.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut buf = vec![0u8; 65536];
            loop {
                if pause.load(Ordering::SeqCst) {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
                let at = got.load(Ordering::SeqCst);
                if stop.load(Ordering::SeqCst) && at == sent.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let n = r.read(&mut buf).map_err(|e| format!("read at {at}: {e}"))?;
                if n == 0 {
                    return Err(format!("EOF at {at}"));
                }
                if let Some(k) = (0..n).find(|&k| buf[k] != pat(at + k as u64)) {
                    return Err(format!("byte {} differs", at + k as u64));
                }
                got.fetch_add(n as u64, Ordering::SeqCst);
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    for n in 1..=2 {
        pause.store(true, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(500));
        let img = dir.path().join(format!("img{n}"));
        let o = stasis(&[
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            &img.to_string_lossy(),
            "--tcp-established",
        ]);
        assert!(o.status.success(), "dump {n}: {}", stderr_of(&o));
        let show = stasis(&["show", &img.to_string_lossy()]);
        let text = String::from_utf8_lossy(&show.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.contains("established:"))
            .unwrap_or_else(|| panic!("no established connection in the image:\n{text}"))
            .to_string();
        assert!(
            !line.contains(" 0 bytes to send"),
            "the send queue was full: {line}"
        );
        assert!(!line.contains("; 0 bytes queued"), "{line}");
        if n == 1 {
            // Ours to reap; a restored one is the restoring stasis's child, then init's.
            let _ = server.wait();
        }
        wait_gone(pid);
        std::thread::sleep(std::time::Duration::from_millis(500));
        let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
        assert!(o.status.success(), "restore {n}: {}", stderr_of(&o));
        assert!(no_lock_of(pid), "the restore released the network lock");
        pause.store(false, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(700));
    }
    stop.store(true, Ordering::SeqCst);
    let w = writer.join().expect("writer");
    let r = reader.join().expect("reader");
    // SAFETY: the restored server has our child's pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid);
    w.expect("the client wrote on");
    r.expect("the client read every byte back, in order");
    let total = sent.load(Ordering::SeqCst);
    assert_eq!(got.load(Ordering::SeqCst), total);
    assert!(total > 1 << 20, "{total} bytes went through");
}

/// Whether no network lock of a dump of `pid` is left in nftables.
fn no_lock_of(pid: i32) -> bool {
    let o = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .expect("nft");
    !String::from_utf8_lossy(&o.stdout).contains(&format!("stasis_{pid}_"))
}

/// Starts a Python asyncio echo server (`extra`: more setup code, run first); returns it, its
/// pid, port and work directory.
fn echo_server(extra: &str) -> (std::process::Child, i32, u16, tempdir::Dir) {
    echo_server_on("127.0.0.1", extra)
}

fn echo_server_on(host: &str, extra: &str) -> (std::process::Child, i32, u16, tempdir::Dir) {
    let dir = tempdir::Dir::new("echo");
    let pidfile = dir.path().join("pid");
    let script = format!(
        "import asyncio,os,socket\n\
         D='{d}'\n\
         {extra}\n\
         async def handle(r, w):\n\
         \x20   while True:\n\
         \x20       data = await r.read(65536)\n\
         \x20       if not data: break\n\
         \x20       w.write(data); await w.drain()\n\
         async def main():\n\
         \x20   s = await asyncio.start_server(handle, '{host}', 0)\n\
         \x20   open(D+'/port','w').write(str(s.sockets[0].getsockname()[1]))\n\
         \x20   open(D+'/pid.tmp','w').write(str(os.getpid())); os.rename(D+'/pid.tmp','{p}')\n\
         \x20   async with s: await s.serve_forever()\n\
         asyncio.run(main())\n",
        d = dir.path().display(),
        p = pidfile.display()
    );
    let child = python(&script, &pidfile, None, true);
    let pid = child.id() as i32;
    let port = std::fs::read_to_string(dir.path().join("port"))
        .expect("port")
        .trim()
        .parse()
        .expect("a port");
    (child, pid, port, dir)
}

/// One round trip on an echo connection.
fn echoes(c: &mut std::net::TcpStream, what: &[u8]) -> bool {
    let mut back = vec![0u8; what.len()];
    c.write_all(what).is_ok() && c.read_exact(&mut back).is_ok() && back == what
}

/// A dump that fails after the connections are locked (a child holds a netlink socket, found
/// after the parent's connection) takes them out of repair mode and removes the lock: the
/// connection works on.
#[test]
fn a_failed_dump_leaves_the_tcp_connection_working() {
    if !require_root("a_failed_dump_leaves_the_tcp_connection_working") {
        return;
    }
    let (mut server, pid, port, dir) = echo_server(
        "if os.fork()==0:\n    n=socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15)\n    import time; time.sleep(120); os._exit(0)",
    );
    let mut c = connect_echo("127.0.0.1", port);
    let img = dir.path().join("img");
    let o = dump_established(pid, &img);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("netlink"), "{e}");
    assert!(no_lock_of(pid), "the failed dump removed its lock");
    assert!(
        echoes(&mut c, b"after the failed dump"),
        "the connection works on"
    );
    // SAFETY: our child's process group (the server and its child).
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let _ = server.wait();
}

/// A restore that fails once the connections are being made (a unix socket's path is taken
/// by a live listener meanwhile) releases the lock, and leaves nothing bound.
#[test]
fn a_failed_restore_releases_the_network_lock() {
    if !require_root("a_failed_restore_releases_the_network_lock") {
        return;
    }
    let (mut server, pid, port, dir) =
        echo_server("u=socket.socket(socket.AF_UNIX); u.bind(D+'/u.sock'); u.listen(1)");
    // Held open through the dump: the connection the lock holds.
    let _conn = connect_echo("127.0.0.1", port);
    let img = dir.path().join("img");
    let o = dump_established(pid, &img);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    assert!(
        !no_lock_of(pid),
        "the lock holds the connection until the restore"
    );
    let _ = server.wait();
    let path = dir.path().join("u.sock");
    let _ = std::fs::remove_file(&path);
    let taken = std::os::unix::net::UnixListener::bind(&path).expect("a listener on the path");
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("in use"), "{e}");
    assert!(no_lock_of(pid), "the failed restore released the lock");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "no half-made task is left"
    );
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "nothing is left bound to the server's port"
    );
    drop(taken);
}

/// The events fixture (tests/fixtures/events.c): relative, absolute and expired timers, a
/// signalfd with a signal pending, a route netlink socket with its groups, an epoll set over
/// them, inotify watches with a gap in their numbers, a named pipe with data, after two trips.
#[test]
fn timers_signalfds_and_netlink_sockets_come_back() {
    if !require_root("timers_signalfds_and_netlink_sockets_come_back") {
        return;
    }
    let d = Daemon::start("events", &["--dir", "{dir}"]);
    for n in 1..=2 {
        d.dump(n);
        std::thread::sleep(std::time::Duration::from_millis(300));
        d.restore(n);
    }
    let v = assert_pass(&d.finish());
    assert!(detail(&v, "events") >= 10, "{v}");
}

/// `--tcp-close`: the connection comes back as a socket that is not connected (the program
/// gets an error on it, as after a reset) and the peer sees it closed at the dump.
#[test]
fn tcp_close_brings_a_connection_back_closed() {
    if !require_root("tcp_close_brings_a_connection_back_closed") {
        return;
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = l.local_addr().expect("addr").port();
    let dir = tempdir::Dir::new("tcpclose");
    let pidfile = dir.path().join("pid");
    let script = format!(
        "import socket,os,signal,time\n\
         D='{d}'\n\
         c=socket.create_connection(('127.0.0.1', {port}))\n\
         def term(*_):\n\
         \x20   try:\n\
         \x20       c.send(b'x'); r='the socket still sends'\n\
         \x20   except OSError as e:\n\
         \x20       r='ok' if c.fileno() >= 0 else 'no fd'\n\
         \x20   open(D+'/verdict','w').write(r); os._exit(0)\n\
         signal.signal(signal.SIGTERM, term)\n\
         open(D+'/pid.tmp','w').write(str(os.getpid())); os.rename(D+'/pid.tmp','{p}')\n\
         while True: time.sleep(1)\n",
        d = dir.path().display(),
        p = pidfile.display()
    );
    let mut child = python(&script, &pidfile, None, true);
    let pid = child.id() as i32;
    let (mut peer, _) = l.accept().expect("accept");
    let img = dir.path().join("img");
    let o = stasis(&[
        "dump",
        "-t",
        &pid.to_string(),
        "-D",
        &img.to_string_lossy(),
        "--tcp-close",
    ]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    let mut buf = [0u8; 8];
    assert!(
        matches!(peer.read(&mut buf), Ok(0) | Err(_)),
        "the peer sees the connection closed"
    );
    let show = stasis(&["show", &img.to_string_lossy()]);
    assert!(
        String::from_utf8_lossy(&show.stdout).contains("comes back closed (--tcp-close)"),
        "{}",
        String::from_utf8_lossy(&show.stdout)
    );
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    // SAFETY: the restored process has our child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_gone(pid);
    let verdict = std::fs::read_to_string(dir.path().join("verdict")).unwrap_or_default();
    assert_eq!(verdict, "ok");
}

/// The same over IPv6: a connection to ::1 comes back whole (the network lock's rules are
/// IPv6 ones).
#[test]
fn an_ipv6_tcp_connection_carries_on() {
    if !require_root("an_ipv6_tcp_connection_carries_on") {
        return;
    }
    let (mut server, pid, port, dir) = echo_server_on("::1", "");
    let mut c = connect_echo("::1", port);
    let img = dir.path().join("img");
    let o = dump_established(pid, &img);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = server.wait();
    // Sent while the server is away: held by the lock, sent again once it is back.
    c.write_all(b"while away").expect("send");
    let show = stasis(&["show", &img.to_string_lossy()]);
    let text = String::from_utf8_lossy(&show.stdout).into_owned();
    assert!(
        text.contains(&format!("tcp6 [::1]:{port} connected to [::1]:")),
        "{text}"
    );
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    let mut back = [0u8; 10];
    c.read_exact(&mut back)
        .expect("the echo of what was sent while away");
    assert_eq!(&back, b"while away");
    assert!(
        echoes(&mut c, b"after"),
        "the same connection after the restore"
    );
    // SAFETY: the restored server has our child's pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid);
}

/// A python process set up by `what` is dumped and restored; on SIGTERM it runs `check`
/// (Python statements that raise on a difference) and writes "ok" or the exception.
fn round_trip(what: &str, check: &str) {
    let (mut child, pid, dir) = checked_python(what, check, None, true);
    let img = dir.path().join("img");
    let tree = descendants(pid);
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    for p in tree {
        wait_gone(p);
    }
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    // SAFETY: the restored process has our child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_gone(pid);
    assert_eq!(verdict_of(&dir), "ok", "{what}");
}

/// An epoll instance registered in another (with a pipe and a socket in the inner one).
#[test]
fn an_epoll_inside_an_epoll_comes_back() {
    if !require_root("an_epoll_inside_an_epoll_comes_back") {
        return;
    }
    round_trip(
        "inner=select.epoll(); outer=select.epoll()\n\
         r,w=os.pipe(); os.write(w, b'x')\n\
         a,b=socket.socketpair(); b.send(b'y')\n\
         inner.register(r, select.EPOLLIN); inner.register(a.fileno(), select.EPOLLIN)\n\
         outer.register(inner.fileno(), select.EPOLLIN)",
        "assert [fd for fd, _ in outer.poll(0)] == [inner.fileno()]; assert sorted(fd for fd, _ in inner.poll(0)) == sorted([r, a.fileno()])",
    );
}

/// epoll registrations of a file closed at the registered number (it lives on at another),
/// and of one whose number now holds another file: both still report under their old
/// numbers, and the file now at that number is untouched.
#[test]
fn epoll_registrations_of_files_closed_since_come_back() {
    if !require_root("epoll_registrations_of_files_closed_since_come_back") {
        return;
    }
    round_trip(
        "e=select.epoll(); r,w=os.pipe(); os.write(w, b'x')\n\
         d=os.dup(r); d2=os.dup(r)\n\
         e.register(d, select.EPOLLIN); e.register(d2, select.EPOLLIN | select.EPOLLET); os.close(d)\n\
         a,b=socket.socketpair(); os.dup2(a.fileno(), d2); b.send(b'at d2')",
        "got=sorted(e.poll(0)); assert got == sorted([(d, select.EPOLLIN), (d2, select.EPOLLIN)]), got; assert os.read(d2, 10) == b'at d2'; assert os.read(r, 1) == b'x'",
    );
}

/// A client connected to a listener bound to a name the kernel chose (autobind) that has not
/// accepted it yet (the listener is in a child): refused, not taken for a pair whose other
/// end is gone.
#[test]
fn a_connection_not_yet_accepted_is_refused() {
    if !require_root("a_connection_not_yet_accepted_is_refused") {
        return;
    }
    refused(
        "l=socket.socket(socket.AF_UNIX); l.bind(''); l.listen(1); name=l.getsockname()\nif os.fork()==0:\n    time.sleep(60); os._exit(0)\nl.close(); c=socket.socket(socket.AF_UNIX); c.connect(name)",
        "c.send(b'x')",
        "not accepted it yet",
    );
}

/// A unix listener with two connections it has not accepted yet, from clients of the same
/// process (one bound to an abstract name): they connect again after the restore, in the same
/// order, and are accepted then, each with its client's address.
#[test]
fn connections_waiting_in_a_unix_backlog_come_back_in_order() {
    if !require_root("connections_waiting_in_a_unix_backlog_come_back_in_order") {
        return;
    }
    round_trip(
        "l=socket.socket(socket.AF_UNIX); l.bind(D+'/l.sock'); l.listen(4)\n\
         c1=socket.socket(socket.AF_UNIX); c1.bind('\\0stasis-cli1-%d' % os.getpid()); c1.connect(D+'/l.sock')\n\
         c2=socket.socket(socket.AF_UNIX); c2.connect(D+'/l.sock')",
        "a1,p1=l.accept(); a2,p2=l.accept(); assert p1 == b'\\0stasis-cli1-%d' % os.getpid(), (p1, p2); assert not p2, p2; c1.send(b'one'); c2.send(b'two'); assert (a1.recv(3), a2.recv(3)) == (b'one', b'two'); a2.send(b'back'); assert c2.recv(4) == b'back'",
    );
}

/// A client that already sent data to a listener that has not accepted it: the data sits in
/// a socket nobody can read without accepting it, so the dump refuses.
#[test]
fn a_waiting_connection_with_data_is_refused() {
    if !require_root("a_waiting_connection_with_data_is_refused") {
        return;
    }
    refused(
        "l=socket.socket(socket.AF_UNIX); l.bind(D+'/l.sock'); l.listen(1)\nc=socket.socket(socket.AF_UNIX); c.connect(D+'/l.sock'); c.send(b'early')",
        "a,_=l.accept(); assert a.recv(5) == b'early'",
        "has sent data",
    );
}

/// A unix connection a listener accepted, both ends in one process, with data queued both
/// ways: it comes back with its names (the accepted end has the listener's, the client sees
/// it as its peer), and the listener goes on accepting.
#[test]
fn an_accepted_unix_connection_comes_back_with_its_names() {
    if !require_root("an_accepted_unix_connection_comes_back_with_its_names") {
        return;
    }
    round_trip(
        "l=socket.socket(socket.AF_UNIX); l.bind(D+'/l.sock'); l.listen(4)\n\
         c=socket.socket(socket.AF_UNIX); c.connect(D+'/l.sock'); a,_=l.accept()\n\
         c.send(b'to the server'); a.send(b'to the client')",
        "assert a.getsockname() == D+'/l.sock' and c.getpeername() == D+'/l.sock', (a.getsockname(), c.getpeername()); assert a.recv(100) == b'to the server'; assert c.recv(100) == b'to the client'; n=socket.socket(socket.AF_UNIX); n.connect(D+'/l.sock'); b,_=l.accept(); n.send(b'new'); assert b.recv(3) == b'new'",
    );
}

/// Python's multiprocessing Manager: a manager process serving a dict over a unix socket
/// in a temporary directory, its parent connected to it. The tree is dumped and restored;
/// the parent then reads and writes the dict through the same connection.
#[test]
fn a_python_multiprocessing_manager_comes_back() {
    if !require_root("a_python_multiprocessing_manager_comes_back") {
        return;
    }
    round_trip(
        "import multiprocessing\n\
         m=multiprocessing.Manager(); d=m.dict(); d['before']=1",
        "assert d['before'] == 1; d['after']=2; assert dict(d) == {'before': 1, 'after': 2}, dict(d); m.shutdown()",
    );
}

/// The descendants of `pid` (its children's children too).
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let kids =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for k in kids
            .split_whitespace()
            .filter_map(|k| k.parse::<i32>().ok())
        {
            out.push(k);
            todo.push(k);
        }
    }
    out
}

/// `stasis dump -t PID -D IMG --tcp-established`.
fn dump_established(pid: i32, img: &std::path::Path) -> std::process::Output {
    stasis(&[
        "dump",
        "-t",
        &pid.to_string(),
        "-D",
        &img.to_string_lossy(),
        "--tcp-established",
    ])
}

/// A connection to an echo server on `host`, which echoes once before it is returned.
fn connect_echo(host: &str, port: u16) -> std::net::TcpStream {
    let mut c = std::net::TcpStream::connect((host, port)).expect("connect");
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    assert!(echoes(&mut c, b"before"));
    c
}

/// The tcpconn fixture: a connection with both ends in one process, 200 000 bytes in flight
/// one way (part of them never sent: the window is full) and 3000 the other, dumped with
/// `--tcp-established` and restored twice, over IPv4 and IPv6.
#[test]
fn a_tcp_connection_with_both_ends_in_the_process_comes_back() {
    if !require_root("a_tcp_connection_with_both_ends_in_the_process_comes_back") {
        return;
    }
    for args in [&[][..], &["--v6"][..]] {
        let d = Daemon::start("tcpconn", args);
        for n in 1..=2 {
            let img = d.image(n);
            let o = dump_established(d.pid, &img);
            assert!(o.status.success(), "dump {n} {args:?}: {}", stderr_of(&o));
            let show = stasis(&["show", &img.to_string_lossy()]);
            let text = String::from_utf8_lossy(&show.stdout).into_owned();
            assert_eq!(text.matches("established:").count(), 2, "{text}");
            wait_gone(d.pid);
            let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
            assert!(
                o.status.success(),
                "restore {n} {args:?}: {}",
                stderr_of(&o)
            );
        }
        let v = assert_pass(&d.finish());
        assert_eq!(detail(&v, "bytes"), 203_008, "{v}");
    }
}
