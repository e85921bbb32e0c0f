//! `cargo xtask fuzz [--iterations N] [--seed S] [--replay DIR]`: a structure-aware fuzzer of
//! images, run against the real `stasis restore` as root.
//!
//! A real program (Python with a file open for writing, an appending log, a shared file
//! mapping, a deleted file, a pipe and a socket pair with data queued, a second thread, a
//! signal handler) is dumped once. Each iteration copies that image, changes one to three
//! values of its decoded records (numbers to boundaries, strings to long ones or to paths of
//! root-only "canary" files, arrays shortened, duplicated or reordered, fields removed), writes
//! the records back with their checksums made anew and seals the image with the host key — an
//! attacker who can write an image and have it trusted — then restores it. Every run must end
//! in one of:
//!
//! - refused: a non-zero exit with a message, and no process of the image exists; or
//! - restored: exit 0, and the process (restored `--leave-stopped`) has the threads and
//!   descriptors the image says;
//!
//! and never in a panic (exit 101, "panicked at"), a crash (a signal), a hang (no exit within
//! 30 s), or a write outside the restored process (the program's files and the canaries are
//! hashed before and after). A finding is written to `target/fuzz-findings/` as the list of
//! mutations that made it; `--replay DIR` runs such lists again (`tests/fuzz-corpus` holds the
//! ones found and fixed, replayed by CI).

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HANG: Duration = Duration::from_secs(30);

const TARGET: &str = r#"
import os, sys, time, mmap, socket, threading, signal
d = sys.argv[1]
f = open(d + '/data.txt', 'r+'); f.seek(3)
a = open(d + '/append.log', 'a')
m = open(d + '/shared.bin', 'r+b'); mm = mmap.mmap(m.fileno(), 8192, mmap.MAP_SHARED)
dl = open(d + '/deleted.bin', 'w+'); dl.write('x' * 5000); dl.flush(); os.unlink(d + '/deleted.bin')
r, w = os.pipe(); os.write(w, b'in flight ' * 10)
s1, s2 = socket.socketpair(); s1.send(b'queued')
t = threading.Thread(target=lambda: time.sleep(10 ** 6), daemon=True); t.start()
signal.signal(signal.SIGUSR1, lambda *a: None)
open(d + '/pid', 'w').write(str(os.getpid()))
while True:
    time.sleep(1)
"#;

#[derive(clap::Args)]
pub struct Args {
    /// Mutated images to restore.
    #[arg(long, default_value_t = 1000)]
    iterations: u64,
    /// Seed of the mutations (a run is repeatable with the same seed and base image).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Replay the mutation lists (*.json) in this directory instead of making new ones.
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Print every run's mutations and outcome.
    #[arg(long)]
    verbose: bool,
}

/// One change to one record: the value at a JSON pointer replaced, or an array or object
/// entry removed or duplicated.
#[derive(Clone, Debug)]
struct Mutation {
    file: String,
    pointer: String,
    op: Op,
}

#[derive(Clone, Debug)]
enum Op {
    Set(Value),
    Remove,
    Duplicate,
    Swap(usize),
}

impl Mutation {
    fn to_json(&self) -> Value {
        let (op, arg) = match &self.op {
            Op::Set(v) => ("set", v.clone()),
            Op::Remove => ("remove", Value::Null),
            Op::Duplicate => ("duplicate", Value::Null),
            Op::Swap(i) => ("swap", Value::from(*i as u64)),
        };
        serde_json::json!({"file": self.file, "pointer": self.pointer, "op": op, "arg": arg})
    }

    fn from_json(v: &Value) -> Option<Mutation> {
        let op = match v.get("op")?.as_str()? {
            "set" => Op::Set(v.get("arg")?.clone()),
            "remove" => Op::Remove,
            "duplicate" => Op::Duplicate,
            "swap" => Op::Swap(v.get("arg")?.as_u64()? as usize),
            _ => return None,
        };
        Some(Mutation {
            file: v.get("file")?.as_str()?.to_string(),
            pointer: v.get("pointer")?.as_str()?.to_string(),
            op,
        })
    }

    /// Applies the mutation to `root`; false if the pointer no longer leads anywhere.
    fn apply(&self, root: &mut Value) -> bool {
        let (parent_ptr, key) = match self.pointer.rfind('/') {
            Some(i) => (&self.pointer[..i], &self.pointer[i + 1..]),
            None => return false,
        };
        if let Op::Set(v) = &self.op {
            return match root.pointer_mut(&self.pointer) {
                Some(slot) => {
                    *slot = v.clone();
                    true
                }
                None => false,
            };
        }
        let Some(parent) = root.pointer_mut(parent_ptr) else {
            return false;
        };
        match (parent, &self.op) {
            (Value::Array(a), op) => {
                let Ok(i) = key.parse::<usize>() else {
                    return false;
                };
                if i >= a.len() {
                    return false;
                }
                match op {
                    Op::Remove => {
                        a.remove(i);
                    }
                    Op::Duplicate => {
                        let v = a[i].clone();
                        a.insert(i, v);
                    }
                    Op::Swap(j) => {
                        let j = j % a.len();
                        a.swap(i, j);
                    }
                    Op::Set(_) => {}
                }
                true
            }
            (Value::Object(o), Op::Remove) => o.remove(key).is_some(),
            _ => false,
        }
    }
}

/// xorshift64*: small, fast, repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Every node of `v` with its JSON pointer.
fn nodes(v: &Value, at: String, out: &mut Vec<(String, Value)>) {
    out.push((at.clone(), v.clone()));
    match v {
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                nodes(x, format!("{at}/{i}"), out);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                nodes(
                    x,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        _ => {}
    }
}

struct Sandbox {
    dir: PathBuf,
    canaries: Vec<PathBuf>,
}

impl Sandbox {
    /// Content, size and mtime of every file that nothing may write.
    fn snapshot(&self) -> BTreeMap<PathBuf, (u64, i64, Vec<u8>)> {
        use std::os::unix::fs::MetadataExt;
        let mut files: Vec<PathBuf> = ["data.txt", "append.log", "shared.bin"]
            .iter()
            .map(|f| self.dir.join(f))
            .collect();
        files.extend(self.canaries.iter().cloned());
        files
            .into_iter()
            .map(|p| {
                let m = std::fs::metadata(&p).ok();
                let content = std::fs::read(&p).unwrap_or_default();
                let (len, mtime) = m.map_or((0, 0), |m| {
                    (m.len(), m.mtime_nsec() + m.mtime() * 1_000_000_000)
                });
                (p, (len, mtime, content))
            })
            .collect()
    }
}

fn mutate_value(rng: &mut Rng, v: &Value, canaries: &[PathBuf]) -> Value {
    match v {
        Value::Number(n) => {
            let neg = n.as_i64().is_some_and(|i| i < 0);
            let cur = n
                .as_u64()
                .or_else(|| n.as_i64().map(|i| i as u64))
                .unwrap_or(0);
            // Mostly values the field's type can hold (so the record still decodes and the
            // value reaches the code that uses it), sometimes anything.
            let small = cur <= u32::MAX as u64 && !neg;
            let picks: Vec<u64> = if small && rng.below(4) != 0 {
                vec![
                    0,
                    1,
                    2,
                    u32::MAX as u64,
                    i32::MAX as u64,
                    1 << 31,
                    4095,
                    4096,
                    65536,
                    cur.wrapping_add(1),
                    cur.saturating_sub(1),
                    cur ^ (1 << rng.below(32)),
                    rng.next() & 0xffff_ffff,
                    rng.next() & 0xff,
                ]
            } else {
                vec![
                    0,
                    1,
                    u64::MAX,
                    i64::MIN as u64,
                    u32::MAX as u64,
                    1 << 32,
                    1 << 47,
                    0x7fff_ffff_ffff,
                    0xffff_8000_0000_0000,
                    1 << 63,
                    cur.wrapping_add(1),
                    cur.wrapping_sub(1),
                    cur.wrapping_add(4096),
                    cur ^ (1 << rng.below(64)),
                    rng.next(),
                ]
            };
            let x = picks[rng.below(picks.len())];
            if (neg || rng.below(8) == 0) && x <= i64::MAX as u64 {
                Value::from(-(x as i64))
            } else {
                Value::from(x)
            }
        }
        Value::String(s) => {
            let canary = canaries[rng.below(canaries.len())]
                .to_string_lossy()
                .to_string();
            match rng.below(8) {
                0 => Value::from(""),
                1 => Value::from("x".repeat(100_000)),
                2 | 3 => Value::from(canary),
                4 => Value::from(format!("{s}/../../{}", canary.trim_start_matches('/'))),
                5 => Value::from("/proc/self/mem"),
                6 => Value::from(format!("{s}\u{0}")),
                _ => {
                    let mut b: Vec<char> = s.chars().collect();
                    if !b.is_empty() {
                        let i = rng.below(b.len());
                        b[i] = char::from(b'a' + (rng.below(26) as u8));
                    }
                    Value::from(b.into_iter().collect::<String>())
                }
            }
        }
        Value::Bool(b) => Value::from(!b),
        Value::Null => {
            if rng.below(2) == 0 {
                Value::from(0)
            } else {
                Value::from("/")
            }
        }
        Value::Array(a) => {
            if a.is_empty() || rng.below(2) == 0 {
                Value::Array(Vec::new())
            } else {
                Value::Array(a.iter().cloned().cycle().take(a.len() * 2).collect())
            }
        }
        Value::Object(_) => Value::Null,
    }
}

/// The record files of an image (every task's), relative to its root.
fn records(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(dir) = std::fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let p = rel.join(&name);
            if e.path().is_dir() {
                stack.push(p);
            } else if name.ends_with(".img") && name != "pages.img" && name != "mac.img" {
                out.push(p.to_string_lossy().to_string());
            }
        }
    }
    out.sort();
    out
}

fn random_mutations(rng: &mut Rng, base: &Path, canaries: &[PathBuf]) -> Result<Vec<Mutation>> {
    let files = records(base);
    let n = 1 + rng.below(3);
    let mut out = Vec::new();
    for _ in 0..n {
        let file = files[rng.below(files.len())].clone();
        let (_, payload) = stasis_image::read_raw_record(&base.join(&file))?;
        let v: Value = serde_json::from_slice(&payload)?;
        let mut all = Vec::new();
        nodes(&v, String::new(), &mut all);
        // Not the root itself.
        let (pointer, node) = all[1 + rng.below(all.len() - 1)].clone();
        let op = match rng.below(10) {
            0 => Op::Remove,
            1 => Op::Duplicate,
            2 => Op::Swap(rng.below(64)),
            _ => Op::Set(mutate_value(rng, &node, canaries)),
        };
        out.push(Mutation {
            file: portable_name(base, &file),
            pointer,
            op,
        });
    }
    Ok(out)
}

/// The threads' records of the image at `root`, in the order of their ids.
fn cores(root: &Path) -> Vec<String> {
    let mut cores: Vec<String> = records(root)
        .into_iter()
        .filter(|f| f.starts_with("core-"))
        .collect();
    cores.sort_by_key(|c| {
        c.trim_start_matches("core-")
            .trim_end_matches(".img")
            .parse::<u64>()
            .unwrap_or(0)
    });
    cores
}

/// A record's name that holds for another dump of the same program: a thread's `core-TID.img`
/// becomes `core#N.img`, N its place among the process's threads.
fn portable_name(base: &Path, file: &str) -> String {
    match cores(base).iter().position(|c| c == file) {
        Some(i) => format!("core#{i}.img"),
        None => file.to_string(),
    }
}

/// The other way round, in the image at `root`.
fn actual_name(root: &Path, file: &str) -> String {
    let Some(i) = file
        .strip_prefix("core#")
        .and_then(|r| r.strip_suffix(".img"))
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return file.to_string();
    };
    cores(root)
        .get(i)
        .cloned()
        .unwrap_or_else(|| file.to_string())
}

/// Copies the base image to `work` (pages.img hard-linked: restore only reads it), applies
/// `muts` and seals it. False if no mutation applied.
fn prepare(base: &Path, work: &Path, muts: &[Mutation], key: &[u8; 32]) -> Result<bool> {
    let _ = std::fs::remove_dir_all(work);
    copy_image(base, work)?;
    let mut applied = false;
    for m in muts {
        let path = work.join(actual_name(work, &m.file));
        let Ok((kind, payload)) = stasis_image::read_raw_record(&path) else {
            continue;
        };
        let mut v: Value = serde_json::from_slice(&payload)?;
        if m.apply(&mut v) {
            applied = true;
            stasis_image::write_raw_record(&path, kind, &serde_json::to_vec(&v)?)?;
        }
    }
    stasis_image::auth::seal(work, key)?;
    Ok(applied)
}

fn copy_image(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(to).with_context(|| format!("creating {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_image(&e.path(), &dst)?;
        } else if e.file_name() == "pages.img" {
            std::fs::hard_link(e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), &dst)?;
        }
    }
    Ok(())
}

#[derive(Default)]
struct Counts {
    refused: u64,
    restored: u64,
    restored_wrong: u64,
    /// Restored, then dead before it could be looked at: the image's own state killed it
    /// (an alarm due at once, a pending signal or registers a mutation made fatal), by cause.
    died: BTreeMap<String, u64>,
    leftovers: u64,
    /// Files of the process's own written by the kernel for it (see the loop).
    own_writes: u64,
    created_on_refusal: u64,
    panics: u64,
    crashes: u64,
    hangs: u64,
    writes: u64,
    not_applied: u64,
}

/// The pids an image names (root and tree), read from the unmutated base.
fn image_pids(base: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for f in records(base) {
        if f.ends_with("inventory.img") {
            if let Ok((_, p)) = stasis_image::read_raw_record(&base.join(&f)) {
                if let Ok(v) = serde_json::from_slice::<Value>(&p) {
                    if let Some(pid) = v.get("pid").and_then(Value::as_i64) {
                        pids.push(pid as i32);
                    }
                }
            }
        }
    }
    pids
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rfind(')')
                .and_then(|i| s.get(i + 2..i + 3))
                .is_some_and(|st| st != "Z" && st != "X")
        })
        .unwrap_or(false)
}

/// After a `--leave-stopped` restore: waits (up to 1 s) until `pid` is stopped or dead — a
/// process that a signal of its own image kills (a fault in a thread whose registers a mutation
/// changed) runs a moment while it dies. True once it is stopped.
fn settles_stopped(pid: i32) -> bool {
    let t = Instant::now();
    loop {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| Some(s.get(s.rfind(')')? + 2..s.rfind(')')? + 3)?.to_string()));
        match st.as_deref() {
            Some("T") => return true,
            None | Some("Z") | Some("X") => return false,
            _ if t.elapsed() > Duration::from_secs(1) => return true,
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Kills and reaps whatever holds `pids` (we are a subreaper: restored processes are ours).
/// False if one is still there after 10 s.
fn clear(pids: &[i32]) -> bool {
    for &p in pids {
        // SAFETY: signalling a pid of the image we restored.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for &p in pids {
        while Path::new(&format!("/proc/{p}")).exists() && Instant::now() < deadline {
            // SAFETY: reaping a child (or nothing).
            unsafe { libc::waitpid(p, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) };
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // Anything else reparented to us.
    // SAFETY: reaping any child without blocking.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) } > 0 {}
    pids.iter()
        .all(|p| !Path::new(&format!("/proc/{p}")).exists())
}

/// How a restored process that is no longer there ended (it is ours to reap: a subreaper's).
fn death_of(pid: i32) -> Option<String> {
    let mut status = 0;
    // SAFETY: waitpid on a pid with a valid status pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
    if r != pid {
        return None;
    }
    Some(if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        format!("exit {}", libc::WEXITSTATUS(status))
    })
}

/// Whether the restored process has what the (mutated) image says: its threads and fds. It
/// was restored `--leave-stopped`: nothing of its own has run yet.
fn check_restored(work: &Path, pid: i32) -> Result<(), String> {
    let read = |f: &str| -> Option<Value> {
        let (_, p) = stasis_image::read_raw_record(&work.join(f)).ok()?;
        serde_json::from_slice(&p).ok()
    };
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.get(s.rfind(')')? + 2..s.rfind(')')? + 3)?.to_string()))
        .unwrap_or_else(|| "gone".into());
    if state != "T" {
        return Err(format!(
            "pid {pid} is {state}, not stopped as --leave-stopped leaves it"
        ));
    }
    let inv = read("inventory.img").ok_or("no inventory")?;
    let files = read("files.img").ok_or("no files record")?;
    let mut want_threads: Vec<i64> = inv
        .get("threads")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default();
    want_threads.sort();
    let mut threads: Vec<i64> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("task dir: {e}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    threads.sort();
    if threads != want_threads {
        return Err(format!(
            "threads {threads:?}, the image says {want_threads:?}"
        ));
    }
    let mut want_fds: Vec<i64> = files
        .get("fds")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|f| f.get("fd")?.as_i64()).collect())
        .unwrap_or_default();
    want_fds.sort();
    let mut fds: Vec<i64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| format!("fd dir: {e}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort();
    if fds != want_fds {
        return Err(format!("fds {fds:?}, the image says {want_fds:?}"));
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask fuzz restores images as root: run it as root");
    }
    let repo = crate::repo_root();
    let mut b = crate::cargo();
    b.args(["build", "--release", "--quiet", "--bin", "stasis"]);
    crate::run(b)?;
    let stasis = repo.join("target/release/stasis");
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    let top = std::env::temp_dir().join(format!("stasis-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&top);
    let sandbox = Sandbox {
        dir: top.join("sandbox"),
        canaries: vec![top.join("canary/secret"), top.join("canary/bin/tool")],
    };
    std::fs::create_dir_all(&sandbox.dir)?;
    std::fs::create_dir_all(top.join("canary/bin"))?;
    std::fs::write(sandbox.dir.join("data.txt"), "the program's data\n")?;
    std::fs::write(sandbox.dir.join("append.log"), "log line\n")?;
    std::fs::write(sandbox.dir.join("shared.bin"), vec![7u8; 8192])?;
    for c in &sandbox.canaries {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(c, "root's alone\n")?;
        std::fs::set_permissions(c, std::fs::Permissions::from_mode(0o600))?;
    }
    let key =
        stasis_image::auth::host_key(true)?.context("the host image key cannot be read or made")?;

    // The base image: the program, dumped (killed).
    let mut py = Command::new("python3");
    py.args(["-c", TARGET])
        .arg(&sandbox.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        py.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            libc::setsid();
            Ok(())
        });
    }
    let mut child = py.spawn().context("python3")?;
    let pidfile = sandbox.dir.join("pid");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the fuzz target did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let base = top.join("base");
    let o = Command::new(&stasis)
        .args(["dump", "-t", &child.id().to_string(), "-D"])
        .arg(&base)
        .output()?;
    if !o.status.success() {
        let _ = child.kill();
        bail!(
            "dumping the fuzz target: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let _ = child.wait();
    let pids = image_pids(&base);
    let comm = "python3";
    let mut before = sandbox.snapshot();
    let findings = repo.join("target/fuzz-findings");

    // The mutation lists to run.
    let lists: Vec<(String, Vec<Mutation>)> = match &args.replay {
        Some(dir) => {
            let mut v = Vec::new();
            let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            names.sort();
            for p in names {
                let j: Value = serde_json::from_slice(&std::fs::read(&p)?)?;
                let muts = j
                    .get("mutations")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Mutation::from_json).collect())
                    .unwrap_or_default();
                v.push((p.display().to_string(), muts));
            }
            v
        }
        None => Vec::new(),
    };
    let total = if args.replay.is_some() {
        lists.len() as u64
    } else {
        args.iterations
    };

    let mut c = Counts::default();
    let mut rng = Rng(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let work = top.join("work");
    let t0 = Instant::now();
    let mut log_every = Instant::now();
    for i in 0..total {
        let (name, muts) = match args.replay {
            Some(_) => lists[i as usize].clone(),
            None => (
                format!("seed {} iteration {i}", args.seed),
                random_mutations(&mut rng, &base, &sandbox.canaries)?,
            ),
        };
        if !clear(&pids) {
            bail!("pids {pids:?} of the image are taken before iteration {i}");
        }
        if !prepare(&base, &work, &muts, &key)? {
            c.not_applied += 1;
            continue;
        }
        let mut cmd = Command::new(&stasis);
        cmd.args(["restore", "--detach", "--leave-stopped", "-D"])
            .arg(&work)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setsid between fork and exec, so a hang can be killed as a group.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut run = cmd.spawn().context("stasis restore")?;
        let started = Instant::now();
        let status = loop {
            if let Some(st) = run.try_wait()? {
                break Some(st);
            }
            if started.elapsed() > HANG {
                // SAFETY: killing the session we made for this run.
                unsafe { libc::kill(-(run.id() as i32), libc::SIGKILL) };
                let _ = run.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let mut err = String::new();
        if let Some(mut e) = run.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        let verdict: Option<String> = match status {
            None => {
                c.hangs += 1;
                Some(format!("hang: no exit within {HANG:?}"))
            }
            Some(st) if st.signal().is_some() => {
                c.crashes += 1;
                Some(format!("crash: {st}: {err}"))
            }
            Some(_) if err.contains("panicked at") => {
                c.panics += 1;
                Some(format!("panic: {err}"))
            }
            Some(st) if st.success() && !settles_stopped(pids[0]) => {
                // A pending signal with a lower number than SIGSTOP (an alarm due at once, a
                // handler reset by the mutation) is delivered before the stop.
                let how = death_of(pids[0]).unwrap_or_else(|| "unknown".into());
                *c.died.entry(how).or_default() += 1;
                None
            }
            Some(st) if st.success() => match check_restored(&work, pids[0]) {
                Ok(()) => {
                    c.restored += 1;
                    None
                }
                Err(why) => {
                    c.restored_wrong += 1;
                    Some(format!("restored, but not as the image says: {why}"))
                }
            },
            Some(st) if st.code() == Some(101) => {
                c.panics += 1;
                Some(format!("panic: {err}"))
            }
            Some(_) => {
                std::thread::sleep(Duration::from_millis(5));
                // Another program may have been given the number since (pids wrap here).
                let ours = |p: i32| {
                    alive(p)
                        && std::fs::read_to_string(format!("/proc/{p}/comm"))
                            .is_ok_and(|c| c.trim() == comm)
                };
                if let Some(p) = pids.iter().copied().find(|&p| ours(p)) {
                    c.created_on_refusal += 1;
                    Some(format!("refused, but pid {p} exists: {err}"))
                } else {
                    c.refused += 1;
                    None
                }
            }
        };
        if args.verbose {
            let what: Vec<String> = muts
                .iter()
                .map(|m| {
                    let s = format!("{} {} {:?}", m.file, m.pointer, m.op);
                    s.chars().take(120).collect()
                })
                .collect();
            let first: String = err.lines().next().unwrap_or("").chars().take(200).collect();
            println!(
                "{name}: {what:?} -> {:?} {first}",
                status.and_then(|s| s.code())
            );
        }
        let cleared = clear(&pids);
        let after = sandbox.snapshot();
        let wrote = before
            .iter()
            .filter(|(p, v)| after.get(*p) != Some(v))
            .map(|(p, _)| p.clone())
            .collect::<Vec<_>>();
        // The kernel itself writes to addresses a process registers — its rseq area, its
        // robust futex list, its clear-child-tid word (at exit: the SIGKILL below) — so a
        // mutation that points one of them into the process's own shared file mapping
        // writes that file for the process, as it would for the dumped one: its own doing.
        let kernel_addr = muts.iter().any(|m| {
            ["/rseq", "/robust_list", "/clear_child_tid"]
                .iter()
                .any(|k| m.pointer.contains(k))
        });
        let (own, wrote): (Vec<PathBuf>, Vec<PathBuf>) = wrote
            .into_iter()
            .partition(|p| kernel_addr && p.starts_with(&sandbox.dir));
        if !own.is_empty() {
            c.own_writes += 1;
        }
        let mut verdicts: Vec<String> = verdict.into_iter().collect();
        if !cleared {
            c.leftovers += 1;
            verdicts.push(format!(
                "a process of the image is still there 10 s after SIGKILL: {pids:?}"
            ));
        }
        if !wrote.is_empty() {
            c.writes += 1;
            verdicts.push(format!("wrote {wrote:?}"));
        }
        if !own.is_empty() || !wrote.is_empty() {
            // Put the files back for the next iteration, and look at them afresh.
            for (p, (_, _, content)) in &before {
                let _ = std::fs::write(p, content);
            }
            before = sandbox.snapshot();
        }
        if !verdicts.is_empty() {
            let v = verdicts.join("; ");
            let line: String = v.chars().take(400).collect();
            println!("FINDING {name}: {line}");
            std::fs::create_dir_all(&findings)?;
            let body = serde_json::json!({
                "found": name,
                "verdict": line,
                "mutations": muts.iter().map(Mutation::to_json).collect::<Vec<_>>(),
            });
            std::fs::write(
                findings.join(format!("finding-{}-{i}.json", args.seed)),
                serde_json::to_vec_pretty(&body)?,
            )?;
        }
        if log_every.elapsed() > Duration::from_secs(30) {
            log_every = Instant::now();
            println!("fuzz: {}/{total} in {:.0?}", i + 1, t0.elapsed());
        }
    }
    let _ = std::fs::remove_dir_all(&top);
    let bad = c.panics
        + c.crashes
        + c.hangs
        + c.writes
        + c.restored_wrong
        + c.created_on_refusal
        + c.leftovers;
    let died: u64 = c.died.values().sum();
    println!(
        "fuzz: {total} mutated images in {:.1?}: {} refused, {} restored as the image says, {died} restored and dead at once of their own state ({:?}), {} not applicable; {} panics, {} crashes, {} hangs, {} writes outside the restored process ({} to its own files by the kernel at an address the mutation gave), {} restored wrong, {} refused after creating a process, {} left over",
        t0.elapsed(),
        c.refused,
        c.restored,
        c.died,
        c.not_applied,
        c.panics,
        c.crashes,
        c.hangs,
        c.writes,
        c.own_writes,
        c.restored_wrong,
        c.created_on_refusal,
        c.leftovers
    );
    if bad > 0 {
        bail!("{bad} findings (see target/fuzz-findings/)");
    }
    Ok(())
}
