//! Shared harness for integration tests that drive real processes with real ptrace.
//!
//! Fixture protocol (see tests/fixtures/lib/fixture.h): a fixture sets up its state, writes its
//! pid to `--pidfile`, and keeps checking itself; on SIGTERM it verifies everything once more and
//! writes `PASS: …` or `FAIL: reason` to `--out`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// Privileged tests need root (ptrace of any process, CAP_CHECKPOINT_RESTORE). Outside CI they
/// may skip, saying why; under CI (`CI=true`) not being root is a failure.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!("{test}: privileged test run under CI without root");
    }
    eprintln!(
        "SKIP {test}: needs root (ptrace, CAP_CHECKPOINT_RESTORE); not under CI, so skipping"
    );
    // libtest hides the output of passing tests; `cargo xtask test` reads this log instead.
    if let Some(log) = std::env::var_os("STASIS_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}: needs root; not under CI");
        }
    }
    false
}

pub fn stasis_bin() -> &'static str {
    env!("CARGO_BIN_EXE_stasis")
}

pub fn fixture_bin(name: &str) -> PathBuf {
    Path::new(env!("OUT_DIR")).join("fixtures").join(name)
}

/// A command for fixture `name` that starts with only its standard descriptors: whatever the
/// test runner's environment leaked (a CI runner's pipe, a shell's extra descriptor) would
/// otherwise be part of every image, and a pipe with an outside end is refused by design.
pub fn fixture_command(name: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(fixture_bin(name));
    // SAFETY: close_range is async-signal-safe; it runs in the child before exec.
    unsafe {
        c.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    c
}

/// A running fixture; killed on drop if the test did not finish it.
pub struct Fixture {
    pub child: Child,
    pub pid: i32,
    pub dir: tempdir::Dir,
}

pub mod tempdir {
    use std::path::{Path, PathBuf};

    /// A temporary directory removed on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let base = std::env::temp_dir();
            for n in 0..1000u32 {
                let p = base.join(format!("stasis-test-{tag}-{}-{n}", std::process::id()));
                if std::fs::create_dir(&p).is_ok() {
                    return Dir(p);
                }
            }
            panic!("cannot create a temporary directory in {}", base.display());
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Fixture {
    /// Starts fixture `name` with extra `args` (`{dir}` in an argument stands for the fixture's
    /// own temporary directory) and waits for its pid file.
    pub fn start(name: &str, args: &[&str]) -> Fixture {
        let dir = tempdir::Dir::new(name);
        let pidfile = dir.path().join("pid");
        let out = dir.path().join("out");
        let child = fixture_command(name)
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--out")
            .arg(&out)
            .args(
                args.iter()
                    .map(|a| a.replace("{dir}", &dir.path().to_string_lossy())),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("starting fixture {name}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Ok(s) = std::fs::read_to_string(&pidfile) {
                if let Ok(pid) = s.trim().parse::<i32>() {
                    break pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "fixture {name} did not write its pid file"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        Fixture { child, pid, dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Sends SIGTERM and returns the fixture's verdict line (`PASS: …` / `FAIL: …`).
    pub fn finish(mut self) -> String {
        // SAFETY: kill on a pid we started.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("fixture pid {} did not finish after SIGTERM", self.pid);
                }
            }
        }
        std::fs::read_to_string(self.path("out"))
            .unwrap_or_else(|_| "FAIL: no verdict written".into())
    }

    /// The fixture's current state letter from /proc (e.g. 'S', 'R').
    pub fn state(&self) -> char {
        stasis_state(self.pid)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn stasis_state(pid: i32) -> char {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    s.rfind(')')
        .and_then(|i| s[i + 2..].chars().next())
        .unwrap_or('?')
}

/// The children of every thread of `pid`, dead or alive, sorted.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    out.sort();
    out
}

/// Makes `cmd` start its program with only the standard descriptors: nothing the test (or the
/// environment it runs in) has open reaches a process that may be dumped.
pub fn only_stdio(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: close_range is async-signal-safe; it runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    }
}

/// Kills a process and all its descendants (as they are when dropped) on drop.
pub struct KillTree(pub i32);

impl Drop for KillTree {
    fn drop(&mut self) {
        let mut todo = vec![self.0];
        while let Some(p) = todo.pop() {
            todo.extend(children_of(p));
            // SAFETY: killing processes the test started.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
}

pub fn tracer_of(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(-1)
}

/// Runs `stasis ARGS…` and returns its output.
pub fn stasis(args: &[&str]) -> Output {
    Command::new(stasis_bin())
        .args(args)
        .output()
        .expect("running stasis")
}

pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the fixture's verdict is PASS and returns the details after "PASS: ".
pub fn assert_pass(verdict: &str) -> String {
    let v = verdict.trim();
    assert!(v.starts_with("PASS"), "fixture verdict: {v}");
    v.trim_start_matches("PASS")
        .trim_start_matches(':')
        .trim()
        .to_string()
}

/// Parses `key=value` pairs of a PASS line.
pub fn detail(details: &str, key: &str) -> u64 {
    details
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {details:?}"))
}

/// A fixture started with `--daemon`: reparented away from the harness, as a dumped and
/// restored process is. Its verdict is read from its out file.
pub struct Daemon {
    pub pid: i32,
    pub dir: tempdir::Dir,
    pub name: String,
}

impl Daemon {
    pub fn start(name: &str, args: &[&str]) -> Daemon {
        let dir = tempdir::Dir::new(name);
        let pidfile = dir.path().join("pid");
        let status = fixture_command(name)
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--out")
            .arg(dir.path().join("out"))
            .arg("--daemon")
            .args(
                args.iter()
                    .map(|a| a.replace("{dir}", &dir.path().to_string_lossy())),
            )
            .status()
            .unwrap_or_else(|e| panic!("starting fixture {name}: {e}"));
        assert!(
            status.success(),
            "fixture {name} did not get ready ({status}); its verdict: {}",
            std::fs::read_to_string(dir.path().join("out"))
                .unwrap_or_else(|_| "none written".into())
                .trim()
        );
        let pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("fixture {name}: no pid file"));
        Daemon {
            pid,
            dir,
            name: name.to_string(),
        }
    }

    pub fn image(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("img{n}"))
    }

    /// `stasis dump -t PID -D img<n>`; asserts success and that the process is gone.
    pub fn dump(&self, n: u32) {
        let img = self.image(n);
        let o = stasis(&[
            "dump",
            "-t",
            &self.pid.to_string(),
            "-D",
            &img.to_string_lossy(),
        ]);
        assert!(
            o.status.success(),
            "dump of {} failed: {}",
            self.name,
            stderr_of(&o)
        );
        wait_gone(self.pid);
    }

    /// `stasis dump -t PID -D img<n> --leave-running`; asserts success and that the process
    /// runs on, untraced.
    pub fn dump_leave_running(&self, n: u32) {
        let img = self.image(n);
        let o = stasis(&[
            "dump",
            "-t",
            &self.pid.to_string(),
            "-D",
            &img.to_string_lossy(),
            "--leave-running",
        ]);
        assert!(
            o.status.success(),
            "dump {n} of {} failed: {}",
            self.name,
            stderr_of(&o)
        );
        assert_eq!(tracer_of(self.pid), 0, "still traced after dump {n}");
    }

    /// `stasis restore -D img<n> --detach`; asserts success and that the process runs.
    pub fn restore(&self, n: u32) {
        let img = self.image(n);
        let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
        assert!(
            o.status.success(),
            "restore of {} failed: {}",
            self.name,
            stderr_of(&o)
        );
        let st = stasis_state(self.pid);
        assert!(
            matches!(st, 'S' | 'R' | 'D'),
            "restored {} is in state {st}; its verdict: {}",
            self.name,
            std::fs::read_to_string(self.dir.path().join("out"))
                .unwrap_or_else(|_| "none written".into())
                .trim()
        );
        assert_eq!(
            tracer_of(self.pid),
            0,
            "restored {} is still traced",
            self.name
        );
    }

    /// SIGTERM, then the verdict the fixture writes.
    pub fn finish(self) -> String {
        self.finish_keep()
    }

    /// `finish`, keeping the daemon's directory (its images) for another restore.
    pub fn finish_keep(&self) -> String {
        let out = self.dir.path().join("out");
        let _ = std::fs::remove_file(&out);
        // SAFETY: signalling the fixture's pid.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(v) = std::fs::read_to_string(&out) {
                if v.ends_with('\n') {
                    return v;
                }
            }
            if Instant::now() > deadline {
                return format!(
                    "FAIL: no verdict from {} (state {})",
                    self.name,
                    stasis_state(self.pid)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: best-effort cleanup of the fixture's pid if the test failed half-way.
        if stasis_state(self.pid) != '?' && stasis_state(self.pid) != 'Z' {
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}

/// Moves the `phases` fixture to its next phase and waits until it says it got there.
pub fn next_phase(d: &Daemon, phase: u32) {
    // SAFETY: signalling the fixture's pid.
    unsafe { libc::kill(d.pid, libc::SIGUSR1) };
    let file = d.dir.path().join("phase");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&file).ok().as_deref() != Some(&format!("{phase}\n")) {
        assert!(
            Instant::now() < deadline,
            "the fixture did not reach phase {phase}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `pid` has disappeared entirely (a killed daemon stays a zombie until init
/// reaps it, which takes a moment here): restoring needs the pid free.
pub fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "pid {pid} did not go away");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Rewrites a record's JSON payload and re-seals its checksums (the image format's own rules).
pub fn edit_record(path: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).expect("record");
    let mut v: serde_json::Value = serde_json::from_slice(&bytes[64..]).expect("record JSON");
    edit(&mut v);
    let payload = serde_json::to_vec(&v).expect("JSON");
    let mut header = bytes[..64].to_vec();
    header[24..32].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    header[32..40].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
    header[40..48].fill(0);
    let sum = xxhash_rust::xxh3::xxh3_64(&header);
    header[40..48].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(path, [header, payload].concat()).expect("write record");
}

/// Starts `python3 -c script` with only the standard descriptors (`stdio`: fds 0-2, or
/// /dev/null), in a session of its own if `new_session`, and waits until it wrote its pid to
/// `pidfile`.
pub fn python(
    script: &str,
    pidfile: &std::path::Path,
    stdio: Option<std::os::fd::RawFd>,
    new_session: bool,
) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", script]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = stdio {
                for n in 0..=2 {
                    libc::dup2(fd, n);
                }
            }
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            if new_session {
                libc::setsid();
            }
            Ok(())
        });
    }
    if stdio.is_none() {
        // Not the test's own pipes: a restored process takes over stasis's stdio, and would
        // keep the test's output pipe open.
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    let child = cmd.spawn().expect("python3");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !pidfile.exists() {
        assert!(std::time::Instant::now() < deadline, "python did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}
