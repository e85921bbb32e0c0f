//! The servers of `cargo xtask test --programs`: real servers nobody here wrote, driven by
//! their real clients, dumped (killed) and restored twice each, then compared with CRIU on the
//! same server in the same run.
//!
//! - **redis**: `redis-server` (threads, epoll, TCP) with 10 000 keys, and one `redis-cli`
//!   kept running the whole time, fed commands on its stdin. Dumped with `--tcp-established`:
//!   after each restore the same `redis-cli` asks again, and `CLIENT ID` proves it is still the
//!   same connection (a reconnect gets a new id); the keys are all there (`DBSIZE`, values),
//!   a key written after a restore is there after the next, and a new `redis-cli` connects.
//! - **http.server**: `python3 -m http.server`, asked for a file by `curl`; while it is away
//!   `curl` is refused; after each restore `curl` gets the file again.
//! - **nginx**: a master and two workers (a process tree sharing the listening socket, unix
//!   socket pairs and shared memory between master and workers), asked by `curl`; after each
//!   restore the same pids answer.
//!
//! - **asyncio echo**: a Python asyncio echo server (epoll, TCP) with one client connection
//!   (this harness) kept open throughout: before each dump a line is sent and left unread, so
//!   it is in flight or queued when the server is dumped with `--tcp-established`; after the
//!   restore its echo comes back first, then a fresh round trip, on the same connection (the
//!   client's port never changes, and it never reconnects).
//!
//! - **socketpair**: a Python program holding a stream socketpair with data queued both ways
//!   and a datagram pair with messages queued; after two trips it reads everything back on
//!   SIGTERM (byte for byte, message boundaries kept) and writes its verdict.
//!
//! Then the same server is started afresh and `criu dump` (the peer, CRIU 4.1.1) is tried on
//! it with `--tcp-established`: the detail says whether CRIU could dump it, and if not, its
//! first error.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Server {
    Redis,
    PythonHttp,
    Nginx,
    AsyncioEcho,
    SocketPair,
}

const CYCLES: usize = 2;
const KEYS: usize = 10_000;
const DEAD_TIME: Duration = Duration::from_millis(500);

/// One server's whole run; Ok: a one-line summary.
pub(crate) fn cycle(which: Server, stasis: &Path, dir: &Path) -> Result<String> {
    let port = free_port()?;
    let mut s = start(which, dir, port)?;
    let r = exercise(which, stasis, dir, port, &mut s);
    s.stop();
    let detail = r?;
    let criu = compare_with_criu(which, dir)?;
    Ok(format!("{detail}; {criu}"))
}

/// A running server: its pids (the root first), and the client kept open (redis).
struct Running {
    root: i32,
    client: Option<Cli>,
    conn: Option<BufReader<std::net::TcpStream>>,
}

impl Running {
    /// Kills the whole tree (and the client) and reaps what is ours.
    fn stop(&mut self) {
        if let Some(c) = self.client.as_mut() {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        for p in tree(self.root).into_iter().rev() {
            // SAFETY: kill with a pid and a signal.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        let _ = reap_gone(&[self.root], Duration::from_secs(5));
    }
}

/// A `redis-cli` fed one command per line on its stdin, answering one line each.
struct Cli {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Cli {
    fn start(port: u16) -> Result<Cli> {
        let mut child = own_fds_only(&mut Command::new("redis-cli"))
            .args(["-p", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-cli")?;
        let out = BufReader::new(child.stdout.take().context("redis-cli's stdout")?);
        Ok(Cli { child, out })
    }

    fn ask(&mut self, cmd: &str) -> Result<String> {
        let stdin = self.child.stdin.as_mut().context("redis-cli's stdin")?;
        writeln!(stdin, "{cmd}").context("writing to redis-cli")?;
        stdin.flush()?;
        let mut line = String::new();
        self.out
            .read_line(&mut line)
            .context("reading redis-cli's answer")?;
        if line.is_empty() {
            bail!("redis-cli exited (asked {cmd:?})");
        }
        Ok(line.trim().to_string())
    }
}

/// Closes every descriptor above stderr in `cmd` before it runs: a server must not inherit
/// ours (a dump would find a pipe to the outside).
pub(crate) fn own_fds_only(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: only close_range (a system call) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    }
}

fn start(which: Server, dir: &Path, port: u16) -> Result<Running> {
    let pidfile = dir.join("server.pid");
    let _ = std::fs::remove_file(&pidfile);
    match which {
        Server::Redis => redis_server(dir, port, &pidfile, &[])?,
        Server::PythonHttp => {
            let www = dir.join("www");
            std::fs::create_dir_all(&www)?;
            std::fs::write(www.join("index.html"), PAGE)?;
            let log = std::fs::File::create(dir.join("http.log"))?;
            let child = daemon(
                Command::new("python3")
                    .args([
                        "-m",
                        "http.server",
                        &port.to_string(),
                        "--bind",
                        "127.0.0.1",
                    ])
                    .current_dir(&www)
                    .stdout(log.try_clone()?)
                    .stderr(log),
            )?;
            std::fs::write(&pidfile, child.to_string())?;
        }
        Server::SocketPair => {
            let log = std::fs::File::create(dir.join("pair.log"))?;
            let child = daemon(
                Command::new("python3")
                    .args(["-c", PAIR])
                    .arg(dir.join("verdict"))
                    .stdout(log.try_clone()?)
                    .stderr(log),
            )?;
            std::fs::write(&pidfile, child.to_string())?;
        }
        Server::AsyncioEcho => {
            let log = std::fs::File::create(dir.join("echo.log"))?;
            let child = daemon(
                Command::new("python3")
                    .args(["-c", ECHO, &port.to_string()])
                    .stdout(log.try_clone()?)
                    .stderr(log),
            )?;
            std::fs::write(&pidfile, child.to_string())?;
        }
        Server::Nginx => {
            let www = dir.join("www");
            std::fs::create_dir_all(&www)?;
            std::fs::write(www.join("index.html"), PAGE)?;
            let conf = dir.join("nginx.conf");
            std::fs::write(
                &conf,
                format!(
                    "worker_processes 2;\npid {pid};\nerror_log {d}/error.log;\n\
                     events {{ worker_connections 64; }}\n\
                     http {{ access_log {d}/access.log; client_body_temp_path {d}/body;\n\
                     proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
                     server {{ listen 127.0.0.1:{port}; root {www}; }} }}\n",
                    pid = pidfile.display(),
                    d = dir.display(),
                    www = www.display()
                ),
            )?;
            let st = own_fds_only(&mut Command::new("nginx"))
                .arg("-c")
                .arg(&conf)
                .args(["-g", "user root;"])
                .stdin(Stdio::null())
                .status()
                .context("starting nginx")?;
            if !st.success() {
                bail!(
                    "nginx did not start ({st}); see {}",
                    dir.join("error.log").display()
                );
            }
        }
    }
    let root = wait_pidfile(&pidfile, Duration::from_secs(15))?;
    if which == Server::SocketPair {
        // Set up once its signal handler is there (it listens on nothing).
        std::thread::sleep(Duration::from_millis(500));
    } else {
        wait_listening(port, Duration::from_secs(15))?;
    }
    if which == Server::Nginx {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tree(root).len() < 3 {
            if Instant::now() > deadline {
                bail!(
                    "nginx has {} processes, not a master and 2 workers",
                    tree(root).len()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut run = Running {
        root,
        client: None,
        conn: None,
    };
    if which == Server::AsyncioEcho {
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).context("connecting")?;
        c.set_read_timeout(Some(Duration::from_secs(20)))?;
        run.conn = Some(BufReader::new(c));
    }
    if which == Server::Redis {
        load_keys(port)?;
        run.client = Some(Cli::start(port)?);
    }
    Ok(run)
}

/// Starts a redis-server on 127.0.0.1:`port` with nothing saved to disk, daemonized (its pid in
/// `pidfile`), its log in `dir`, and `extra` options.
pub(crate) fn redis_server(dir: &Path, port: u16, pidfile: &Path, extra: &[&str]) -> Result<()> {
    let st = own_fds_only(&mut Command::new("redis-server"))
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "yes"])
        .args(extra)
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .arg("--pidfile")
        .arg(pidfile)
        .stdin(Stdio::null())
        .status()
        .context("starting redis-server (apt-get install redis-server)")?;
    if !st.success() {
        bail!("redis-server did not start ({st})");
    }
    Ok(())
}

const PAGE: &str = "<html><body>stasis was here</body></html>\n";

/// Socket pairs with data queued both ways; on SIGTERM, the verdict into argv[1].
const PAIR: &str = "import socket, os, signal, sys, time
a, b = socket.socketpair()
a.send(b'to b ' * 1000)
b.send(b'to a ' * 2000)
c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
for i in range(5):
    d.send(b'datagram %d' % i)
def exactly(s, n):
    got = b''
    while len(got) < n:
        part = s.recv(n - len(got), socket.MSG_DONTWAIT)
        if not part:
            break
        got += part
    return got
def term(*_):
    why = []
    if exactly(b, 5000) != b'to b ' * 1000:
        why.append('b lost what a sent')
    if exactly(a, 10000) != b'to a ' * 2000:
        why.append('a lost what b sent')
    for i in range(5):
        if c.recv(100, socket.MSG_DONTWAIT) != b'datagram %d' % i:
            why.append('datagram %d' % i)
    try:
        c.recv(100, socket.MSG_DONTWAIT)
        why.append('a datagram too many')
    except BlockingIOError:
        pass
    open(sys.argv[1], 'w').write('FAIL: ' + ', '.join(why) if why else 'PASS')
    os._exit(0)
signal.signal(signal.SIGTERM, term)
while True:
    time.sleep(1)
";

/// An asyncio echo server on 127.0.0.1:argv[1].
const ECHO: &str = "import asyncio, sys
async def handle(r, w):
    while True:
        data = await r.read(65536)
        if not data:
            break
        w.write(data)
        await w.drain()
    w.close()
async def main():
    s = await asyncio.start_server(handle, '127.0.0.1', int(sys.argv[1]))
    async with s:
        await s.serve_forever()
asyncio.run(main())
";

/// Starts a command in a session of its own, detached from us but our child (we are the
/// subreaper); its pid.
fn daemon(cmd: &mut Command) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null());
    // SAFETY: only setsid and close_range (system calls) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the server")?;
    i32::try_from(child.id()).context("pid out of range")
}

fn load_keys(port: u16) -> Result<()> {
    let mut cli = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("redis-cli for loading")?;
    {
        let stdin = cli.stdin.as_mut().context("stdin")?;
        let mut text = String::new();
        for i in 0..KEYS {
            text.push_str(&format!("SET key{i} value-{i}\n"));
        }
        stdin.write_all(text.as_bytes())?;
    }
    drop(cli.stdin.take());
    let st = cli.wait()?;
    if !st.success() {
        bail!("loading the keys: redis-cli {st}");
    }
    Ok(())
}

/// Whatever the server is, proves it serves as it did (before the first dump and after each
/// restore); returns what was seen.
fn check(which: Server, port: u16, run: &mut Running, round: usize) -> Result<String> {
    match which {
        Server::Redis => {
            let cli = run.client.as_mut().context("no redis-cli")?;
            let size = cli.ask("DBSIZE")?;
            let want = (KEYS + round).to_string();
            if size != want {
                bail!("DBSIZE is {size}, want {want}");
            }
            for i in [0, 4321, KEYS - 1] {
                let v = cli.ask(&format!("GET key{i}"))?;
                if v != format!("value-{i}") {
                    bail!("GET key{i} = {v:?}");
                }
            }
            for r in 0..round {
                let v = cli.ask(&format!("GET after{r}"))?;
                if v != format!("restore-{r}") {
                    bail!("GET after{r} = {v:?}: a write made after restore {r} was lost");
                }
            }
            if cli.ask(&format!("SET after{round} restore-{round}"))? != "OK" {
                bail!("SET after a restore failed");
            }
            let id = cli.ask("CLIENT ID")?;
            let fresh = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "GET", "key77"])
                .output()
                .context("a new redis-cli")?;
            if String::from_utf8_lossy(&fresh.stdout).trim() != "value-77" {
                bail!("a new redis-cli connection did not get key77");
            }
            Ok(id)
        }
        Server::SocketPair => Ok(format!("{:?}", tree(run.root))),
        Server::AsyncioEcho => {
            let c = run.conn.as_mut().context("no connection")?;
            let mut line = String::new();
            if round > 0 {
                c.read_line(&mut line)
                    .context("reading the echo of the line in flight")?;
                if line != format!("in flight {round}\n") {
                    bail!("the line in flight came back as {line:?}");
                }
                line.clear();
            }
            c.get_mut()
                .write_all(format!("ping {round}\n").as_bytes())?;
            c.read_line(&mut line).context("reading an echo")?;
            if line != format!("ping {round}\n") {
                bail!("echo {line:?}");
            }
            Ok(format!("client port {}", c.get_ref().local_addr()?.port()))
        }
        Server::PythonHttp | Server::Nginx => {
            let got = curl(port)?;
            if got != PAGE {
                bail!("curl got {got:?}");
            }
            let mut pids = tree(run.root);
            pids.sort_unstable();
            Ok(format!("{pids:?}"))
        }
    }
}

fn curl(port: u16) -> Result<String> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-m",
            "5",
            &format!("http://127.0.0.1:{port}/index.html"),
        ])
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!("curl failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn exercise(
    which: Server,
    stasis: &Path,
    dir: &Path,
    port: u16,
    run: &mut Running,
) -> Result<String> {
    let first = check(which, port, run, 0).context("before the first dump")?;
    let mut times = Vec::new();
    for n in 1..=CYCLES {
        let img = dir.join(format!("img{n}"));
        let pids = tree(run.root);
        if let Some(c) = run.conn.as_mut() {
            c.get_mut()
                .write_all(format!("in flight {n}\n").as_bytes())
                .context("sending the line in flight")?;
        }
        let t = Instant::now();
        let mut args: Vec<String> = vec!["dump".into(), "-t".into(), run.root.to_string()];
        args.extend(["-D".into(), img.to_string_lossy().into_owned()]);
        if matches!(which, Server::Redis | Server::AsyncioEcho) {
            args.push("--tcp-established".into());
        }
        stasis_cmd(stasis, &args, &dir.join(format!("dump{n}.err")))?;
        let dumped = t.elapsed();
        reap_gone(&pids, Duration::from_secs(15))?;
        if matches!(which, Server::PythonHttp | Server::Nginx) && curl(port).is_ok() {
            bail!("something still answers on port {port} after dump {n}");
        }
        std::thread::sleep(DEAD_TIME);
        let t = Instant::now();
        stasis_cmd(
            stasis,
            &[
                "restore".into(),
                "-D".into(),
                img.to_string_lossy().into_owned(),
                "--detach".into(),
            ],
            &dir.join(format!("restore{n}.err")),
        )?;
        let restored = t.elapsed();
        times.push(format!(
            "dump {:.0} ms, restore {:.0} ms",
            dumped.as_secs_f64() * 1e3,
            restored.as_secs_f64() * 1e3
        ));
        let seen = check(which, port, run, n).with_context(|| format!("after restore {n}"))?;
        if seen != first {
            bail!(
                "after restore {n}: {} {seen}, before the dumps {first}",
                match which {
                    Server::Redis => "CLIENT ID (the same connection?)",
                    Server::AsyncioEcho => "the connection's",
                    _ => "pids",
                }
            );
        }
    }
    if which == Server::SocketPair {
        // SAFETY: kill with a pid and a signal.
        unsafe { libc::kill(run.root, libc::SIGTERM) };
        reap_gone(&[run.root], Duration::from_secs(15))?;
        let verdict = std::fs::read_to_string(dir.join("verdict")).unwrap_or_default();
        if verdict != "PASS" {
            bail!("its verdict: {verdict:?}");
        }
    }
    let what = match which {
        Server::Redis => {
            format!("{KEYS} keys, the same redis-cli connection (id {first}) throughout")
        }
        Server::PythonHttp => "curl answered".to_string(),
        Server::Nginx => format!("curl answered by the same master and workers {first}"),
        Server::AsyncioEcho => {
            format!("one connection ({first}) throughout, a line in flight at each dump echoed")
        }
        Server::SocketPair => "both pairs' queues read back whole: PASS".to_string(),
    };
    Ok(format!("{what}; {}", times.join("; ")))
}

fn stasis_cmd(stasis: &Path, args: &[String], err: &Path) -> Result<()> {
    let out = Command::new(stasis)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running stasis {}", args.join(" ")))?;
    std::fs::write(err, &out.stderr)?;
    if !out.status.success() {
        bail!(
            "stasis {} failed ({}): {}",
            args[0],
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// CRIU (the peer) on a fresh copy of the same server: whether it dumps it.
fn compare_with_criu(which: Server, dir: &Path) -> Result<String> {
    let Some(criu) = find_criu() else {
        return Ok("CRIU not available to compare".into());
    };
    let dir = dir.join("criu");
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let mut run = start(which, &dir, port)?;
    let img = dir.join("img");
    std::fs::create_dir_all(&img)?;
    let out = Command::new(&criu)
        .args([
            "dump",
            "-t",
            &run.root.to_string(),
            "--tcp-established",
            "-o",
            "dump.log",
            "-v2",
        ])
        .arg("-D")
        .arg(&img)
        .stdin(Stdio::null())
        .output()
        .context("running criu")?;
    let log = std::fs::read_to_string(img.join("dump.log")).unwrap_or_default();
    run.stop();
    if out.status.success() {
        return Ok("CRIU 4.1.1 dumped it too".into());
    }
    // CRIU carries on after failing to raise its own descriptor limit here: that line is
    // not why it failed.
    let first = log
        .lines()
        .find(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE for self"))
        .unwrap_or("no error line in its log")
        .trim()
        .to_string();
    Ok(format!("CRIU 4.1.1 cannot dump it: {first}"))
}

pub(crate) fn find_criu() -> Option<PathBuf> {
    let script = crate::repo_root().join("../shared/tools/peer-criu.sh");
    if script.exists() {
        let out = Command::new("bash")
            .arg(&script)
            .arg("--print-path")
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && path.exists() {
            return Some(path);
        }
    }
    crate::bench_cr::find_criu(None)
}

/// A TCP port nobody uses now.
pub(crate) fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

pub(crate) fn wait_pidfile(path: &Path, timeout: Duration) -> Result<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            bail!("no pid in {} after {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn wait_listening(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `pid` and its descendants, parents first.
fn tree(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        let kids =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        out.extend(
            kids.split_whitespace()
                .filter_map(|k| k.parse::<i32>().ok()),
        );
        i += 1;
    }
    out.retain(|p| Path::new(&format!("/proc/{p}")).exists());
    out
}

/// Waits until every pid is gone, reaping those that are our children (we are the subreaper).
pub(crate) fn reap_gone(pids: &[i32], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        for &p in pids {
            let mut st = 0;
            // SAFETY: waitpid on a pid with WNOHANG.
            unsafe { libc::waitpid(p, &mut st, libc::WNOHANG) };
        }
        if pids
            .iter()
            .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("pids {pids:?} are still there after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
