//! `cargo xtask bench redis`: dump (`--tcp-established`, the process killed) and restore of a
//! redis-server holding N MiB of values with C client connections open, and how long the
//! connections are held by the network lock (from the start of the dump to the end of the
//! restore, with nothing in between but waiting for the killed server to be gone). After each
//! restore every connection must still answer `PING` and the keys must all be there. CRIU is
//! tried on the same server in the same run; where it cannot dump it, the output says why.

use crate::servers::{find_criu, free_port, own_fds_only, reap_gone, wait_listening, wait_pidfile};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bytes per value (`DEBUG POPULATE`).
const VALUE: u64 = 4096;

pub fn run(mib: u64, conns: usize, runs: usize) -> Result<()> {
    if runs == 0 || mib == 0 {
        bail!("--runs and --mib must be at least 1");
    }
    let repo = crate::repo_root();
    let mut b = crate::cargo();
    b.args(["build", "--release", "--quiet", "--bin", "stasis"]);
    crate::run(b).context("building stasis")?;
    let stasis = repo.join("target/release/stasis");
    let dir = repo.join("target/bench-redis");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // Killed and restored servers become our children: reap them.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        bail!(
            "PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        );
    }
    let keys = mib * (1 << 20) / VALUE;
    let port = free_port()?;
    let pid = start(&dir, port, keys)?;
    let mut clients: Vec<Client> = (0..conns)
        .map(|_| Client::connect(port))
        .collect::<Result<_>>()?;
    for c in clients.iter_mut() {
        c.expect("PING", "+PONG")?;
    }
    println!(
        "redis-server pid {pid}: {keys} values of {VALUE} bytes ({mib} MiB), {conns} client connections"
    );
    let (mut dumps, mut restores, mut held) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..runs {
        let img = dir.join(format!("img{n}"));
        let t0 = Instant::now();
        let out = Command::new(&stasis)
            .args(["dump", "-t", &pid.to_string(), "--tcp-established", "-D"])
            .arg(&img)
            .output()?;
        let dumped = t0.elapsed();
        if !out.status.success() {
            bail!(
                "stasis dump: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        reap_gone(&[pid], Duration::from_secs(20))?;
        let t1 = Instant::now();
        let out = Command::new(&stasis)
            .args(["restore", "--detach", "-D"])
            .arg(&img)
            .output()?;
        let restored = t1.elapsed();
        let hold = t0.elapsed();
        if !out.status.success() {
            bail!(
                "stasis restore: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for (i, c) in clients.iter_mut().enumerate() {
            c.expect("PING", "+PONG")
                .with_context(|| format!("connection {i} after restore {n}"))?;
        }
        clients[0].expect("DBSIZE", &format!(":{keys}"))?;
        println!(
            "  run {n}: dump {:.0} ms, restore {:.0} ms, connections held {:.0} ms",
            ms(dumped),
            ms(restored),
            ms(hold)
        );
        dumps.push(dumped);
        restores.push(restored);
        held.push(hold);
        let _ = std::fs::remove_dir_all(&img);
    }
    println!(
        "stasis   median of {runs}: dump {:.0} ms, restore {:.0} ms, connections held {:.0} ms (all {conns} answered after every restore)",
        ms(median(&mut dumps)),
        ms(median(&mut restores)),
        ms(median(&mut held))
    );
    drop(clients);
    let criu = criu_on(&dir, pid)?;
    println!("criu     {criu}");
    // SAFETY: kill with a pid and a signal.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    reap_gone(&[pid], Duration::from_secs(10))?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn start(dir: &Path, port: u16, keys: u64) -> Result<i32> {
    let pidfile = dir.join("redis.pid");
    crate::servers::redis_server(
        dir,
        port,
        &pidfile,
        &["--enable-debug-command", "yes", "--maxclients", "1000"],
    )?;
    let pid = wait_pidfile(&pidfile, Duration::from_secs(15))?;
    wait_listening(port, Duration::from_secs(15))?;
    let mut c = Client::connect(port)?;
    c.expect(&format!("DEBUG POPULATE {keys} key {VALUE}"), "+OK")?;
    Ok(pid)
}

/// One connection speaking RESP's inline commands.
struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Client {
    fn connect(port: u16) -> Result<Client> {
        let w = TcpStream::connect(("127.0.0.1", port)).context("connecting to redis")?;
        w.set_read_timeout(Some(Duration::from_secs(60)))?;
        let r = BufReader::new(w.try_clone()?);
        Ok(Client { w, r })
    }

    fn expect(&mut self, cmd: &str, want: &str) -> Result<()> {
        self.w.write_all(format!("{cmd}\r\n").as_bytes())?;
        let mut line = String::new();
        self.r
            .read_line(&mut line)
            .context("reading redis's answer")?;
        if line.trim_end() != want {
            bail!("{cmd}: redis answered {:?}, want {want:?}", line.trim_end());
        }
        Ok(())
    }
}

/// CRIU on the same server, with one connection open: its result.
fn criu_on(dir: &Path, pid: i32) -> Result<String> {
    let Some(criu) = find_criu() else {
        return Ok("not available to compare".into());
    };
    let img = dir.join("criu");
    std::fs::create_dir_all(&img)?;
    let t = Instant::now();
    let out = own_fds_only(&mut Command::new(&criu))
        .args([
            "dump",
            "-t",
            &pid.to_string(),
            "--tcp-established",
            "--leave-running",
            "-o",
            "dump.log",
            "-v2",
        ])
        .arg("-D")
        .arg(&img)
        .stdin(Stdio::null())
        .output()
        .context("running criu")?;
    let took = t.elapsed();
    let log = std::fs::read_to_string(img.join("dump.log")).unwrap_or_default();
    if out.status.success() {
        return Ok(format!(
            "CRIU 4.1.1 dumped it (--leave-running) in {:.0} ms",
            ms(took)
        ));
    }
    let first = log
        .lines()
        .find(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE for self"))
        .unwrap_or("no error line in its log")
        .trim()
        .to_string();
    Ok(format!(
        "CRIU 4.1.1 cannot dump this server on this kernel: {first}"
    ))
}
