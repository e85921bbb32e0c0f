//! Terminals of a shell job (`--shell-job`): a program in a tmux pane, dumped, then restored
//! from another pane, comes back on that pane's terminal in the foreground, with its terminal
//! modes (raw, no echo) — it takes a keystroke at once, without Enter — and `stasis restore`
//! (which waits for it) ends with its exit status. tmux, top and the terminal are real.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmux server of our own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(tag: &str) -> Tmux {
        let t = Tmux {
            socket: format!("stasis-{tag}-{}", std::process::id()),
        };
        // A session whose first window outlives the programs in the others.
        t.run(&[
            "new-session",
            "-d",
            "-s",
            "s",
            "-x",
            "100",
            "-y",
            "30",
            "sleep 600",
        ]);
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket]).env("TERM", "xterm");
        only_stdio(&mut c);
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let o = self.cmd().args(args).output().expect("running tmux");
        assert!(o.status.success(), "tmux {args:?}: {}", stderr_of(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Opens a window running `command`; returns (window id, the pane's pid).
    fn window(&self, command: &str) -> (String, i32) {
        let out = self.run(&[
            "new-window",
            "-t",
            "s:",
            "-P",
            "-F",
            "#{window_id} #{pane_pid}",
            command,
        ]);
        let mut w = out.split_whitespace();
        let id = w.next().expect("window id").to_string();
        let pid = w.next().and_then(|p| p.parse().ok()).expect("pane pid");
        (id, pid)
    }

    /// Types `text` literally (tmux would take a trailing `;` as a command separator), then
    /// the keys named in `then` ("Enter", "Escape").
    fn type_keys(&self, window: &str, text: &str, then: &[&str]) {
        let (body, semicolon) = match text.strip_suffix(';') {
            Some(b) => (b, true),
            None => (text, false),
        };
        if !body.is_empty() {
            self.run(&["send-keys", "-t", window, "-l", body]);
        }
        if semicolon {
            // `\;` is tmux's escape for a literal semicolon argument.
            self.run(&["send-keys", "-t", window, "\\;"]);
        }
        for k in then {
            self.run(&["send-keys", "-t", window, k]);
        }
    }

    /// Waits until `window` shows `text`.
    fn await_text(&self, window: &str, text: &str) {
        let t = Instant::now();
        while !self.screen(window).contains(text) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "timed out waiting for {text:?} on {window}, which shows:\n{}",
                self.screen(window)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn screen(&self, window: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", window])
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn top_in_tmux_comes_back_on_another_pane_and_takes_keystrokes_at_once() {
    if !require_root("top_in_tmux_comes_back_on_another_pane_and_takes_keystrokes_at_once") {
        return;
    }
    if which("tmux").is_none() || which("top").is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "tmux and top must be installed under CI (.ci/run installs them)"
        );
        eprintln!("SKIPPED top_in_tmux…: tmux or top is not installed (not under CI)");
        return;
    }
    let dir = tempdir::Dir::new("tmux-top");
    let tmux = Tmux::start("top");
    let (first, pid) = tmux.window("top -d 0.3");
    tmux.await_text(&first, "Tasks:");
    assert_eq!(comm(pid), "top");
    let img = dir.path().join("img");
    let o = stasis(&[
        "dump",
        "-t",
        &pid.to_string(),
        "-D",
        &img.to_string_lossy(),
        "--shell-job",
    ]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    gone_or_explain(pid);

    let rc = dir.path().join("rc");
    let (second, _) = tmux.window(&format!(
        "{} restore --shell-job -D {}; echo rc=$? > {}; sleep 600",
        stasis_bin(),
        img.display(),
        rc.display()
    ));
    wait_for(
        "the restored top on the new pane",
        Duration::from_secs(10),
        || comm(pid) == "top" && tracer_of(pid) == 0 && tmux.screen(&second).contains("Tasks:"),
    );
    // Its controlling terminal is the new pane's, and it is the terminal's foreground group.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<i64> = stat[stat.rfind(')').map_or(0, |i| i + 2)..]
        .split_whitespace()
        .skip(1)
        .take(6)
        .map(|v| v.parse().unwrap_or(-2))
        .collect();
    // ppid, pgrp, session, tty_nr, tpgid
    assert!(
        f.len() == 6 && f[3] != 0 && f[4] == f[1],
        "top's stat after restore: {stat}"
    );
    // top redraws every 0.3 s: it runs. One key, no Enter: its raw mode came back with it.
    std::thread::sleep(Duration::from_millis(700));
    tmux.run(&["send-keys", "-t", &second, "q"]);
    wait_for("top to quit on 'q'", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{pid}")).exists() || comm(pid) != "top"
    });
    wait_for("stasis restore to end", Duration::from_secs(10), || {
        rc.exists()
    });
    std::thread::sleep(Duration::from_millis(50));
    let status = std::fs::read_to_string(&rc).unwrap_or_default();
    assert_eq!(
        status.trim(),
        "rc=0",
        "stasis restore ends with top's exit status"
    );
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(bin))
            .find(|f| f.is_file())
    })
}

/// Dumps the program in `window` (pid `pid`) and restores it on a new pane; returns once it
/// runs again there, with the pane and the file `stasis restore` writes its exit status to.
fn move_to_new_pane(tmux: &Tmux, dir: &Path, pid: i32) -> (String, std::path::PathBuf) {
    let name = comm(pid);
    let img = dir.join("img");
    let o = stasis(&[
        "dump",
        "-t",
        &pid.to_string(),
        "-D",
        &img.to_string_lossy(),
        "--shell-job",
    ]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    gone_or_explain(pid);
    // The rest of a tree (a pipeline's members) is reaped by init: every pid must be free.
    let shown = stasis(&["show", "--json", &img.to_string_lossy()]);
    let v: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("show --json");
    for p in v["tree"].as_array().into_iter().flatten() {
        if let Some(p) = p
            .as_str()
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
        {
            wait_gone(p);
        }
    }
    let rc = dir.join("rc");
    let (pane, _) = tmux.window(&format!(
        "{} restore --shell-job -D {}; echo rc=$? > {}; sleep 600",
        stasis_bin(),
        img.display(),
        rc.display()
    ));
    // Restored, not merely created: while the new task prepares itself it is still stasis
    // (its name too), and untraced before it is seized.
    let t = Instant::now();
    while !(comm(pid) == name && tracer_of(pid) == 0) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for the restored program: pid {pid} is {:?} ({}), {}; the pane shows:\n{}",
            comm(pid),
            stasis_state(pid),
            std::fs::read_to_string(&rc).unwrap_or_else(|_| "stasis restore has not ended".into()),
            tmux.screen(&pane)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (pane, rc)
}

fn needs(bins: &[&str], test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    if let Some(b) = bins.iter().find(|b| which(b).is_none()) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{b} must be installed under CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED {test}: {b} is not installed (not under CI)");
        return false;
    }
    true
}

fn exit_status(rc: &Path) -> String {
    wait_for("stasis restore to end", Duration::from_secs(10), || {
        rc.exists()
    });
    std::thread::sleep(Duration::from_millis(50));
    std::fs::read_to_string(rc)
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// vim with an unsaved buffer: after the trip its buffer is still there, it is edited further
/// and saved, and the file holds both edits.
#[test]
fn vim_in_tmux_keeps_its_unsaved_buffer_and_saves_it_after_restore() {
    let test = "vim_in_tmux_keeps_its_unsaved_buffer_and_saves_it_after_restore";
    if !needs(&["tmux", "vim"], test) {
        return;
    }
    let dir = tempdir::Dir::new("tmux-vim");
    let file = dir.path().join("notes.txt");
    let tmux = Tmux::start("vim");
    let (first, pid) = tmux.window(&format!("vim -n -u NONE -i NONE {}", file.display()));
    tmux.await_text(&first, "notes.txt");
    tmux.type_keys(&first, "ihello before", &["Escape"]);
    tmux.await_text(&first, "hello before");
    assert!(!file.exists(), "nothing saved yet");
    let (pane, rc) = move_to_new_pane(&tmux, dir.path(), pid);
    // A redraw (^L) shows the buffer it kept.
    tmux.run(&["send-keys", "-t", &pane, "C-l"]);
    tmux.await_text(&pane, "hello before");
    tmux.run(&[
        "send-keys",
        "-t",
        &pane,
        "A and after",
        "Escape",
        ":wq",
        "Enter",
    ]);
    assert_eq!(exit_status(&rc), "rc=0");
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    assert_eq!(text, "hello before and after\n");
}

/// The sqlite3 shell with an open write transaction: after the trip a second writer is still
/// locked out, and the transaction commits.
#[test]
fn sqlite3_in_tmux_keeps_its_transaction_and_commits_after_restore() {
    let test = "sqlite3_in_tmux_keeps_its_transaction_and_commits_after_restore";
    if !needs(&["tmux", "sqlite3"], test) {
        return;
    }
    let dir = tempdir::Dir::new("tmux-sqlite");
    let db = dir.path().join("t.db");
    let tmux = Tmux::start("sqlite");
    let (first, pid) = tmux.window(&format!("sqlite3 {}", db.display()));
    tmux.await_text(&first, "sqlite>");
    for line in [
        "create table t(x);",
        "begin immediate;",
        "insert into t values (42);",
        "select 'inside', count(*) from t;",
    ] {
        tmux.type_keys(&first, line, &["Enter"]);
    }
    tmux.await_text(&first, "inside|1");
    let locked_out = || {
        let o = Command::new("sqlite3")
            .arg(&db)
            .arg("begin immediate; rollback;")
            .output()
            .expect("sqlite3");
        String::from_utf8_lossy(&o.stderr).contains("locked")
    };
    assert!(
        locked_out(),
        "a second writer is locked out before the dump"
    );
    let (pane, rc) = move_to_new_pane(&tmux, dir.path(), pid);
    assert!(locked_out(), "and after the restore");
    for line in ["commit;", "select 'after', count(*) from t;"] {
        tmux.type_keys(&pane, line, &["Enter"]);
    }
    tmux.await_text(&pane, "after|1");
    tmux.type_keys(&pane, ".quit", &["Enter"]);
    assert_eq!(exit_status(&rc), "rc=0");
    let o = Command::new("sqlite3")
        .arg(&db)
        .arg("select x from t;")
        .output()
        .expect("sqlite3");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "42", "committed");
}

/// Waits for the dumped pid to be reaped by its parent (the tmux server). A tmux server whose
/// child dies while traced sometimes misses the SIGCHLD (it happens with `strace -p` and a
/// `kill -9` alike, nothing of stasis's): after a second the parent gets one more, from us.
/// Says what it and its parent are doing if it is still not reaped.
fn gone_or_explain(pid: i32) {
    let t = Instant::now();
    let mut nudged = false;
    while Path::new(&format!("/proc/{pid}")).exists() {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let ppid: i32 = st
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if !nudged && ppid > 1 && t.elapsed() > Duration::from_secs(1) {
            // SAFETY: a SIGCHLD to this test's own tmux server.
            unsafe { libc::kill(ppid, libc::SIGCHLD) };
            nudged = true;
        }
        if t.elapsed() > Duration::from_secs(10) {
            let pst = std::fs::read_to_string(format!("/proc/{ppid}/status")).unwrap_or_default();
            panic!("pid {pid} was not reaped:\n{st}\nits parent {ppid}:\n{pst}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The terminal on fds 0-2 and again on fd 5, in raw mode: after the trip every one of them is
/// the new pane's terminal, its modes are the raw ones (a single key arrives without Enter),
/// and the program is in the terminal's foreground group.
#[test]
fn a_terminal_on_fd_5_in_raw_mode_comes_back_raw() {
    let test = "a_terminal_on_fd_5_in_raw_mode_comes_back_raw";
    if !needs(&["tmux"], test) {
        return;
    }
    let dir = tempdir::Dir::new("tmux-raw");
    let (pidfile, out) = (dir.path().join("pid"), dir.path().join("out"));
    let tmux = Tmux::start("raw");
    let (first, pid) = tmux.window(&format!(
        "{} --pidfile {} --out {}",
        fixture_bin("ttymodes").display(),
        pidfile.display(),
        out.display()
    ));
    wait_for("the fixture to be ready", Duration::from_secs(10), || {
        pidfile.exists() && tmux.screen(&first).contains("ttymodes ready")
    });
    let (pane, rc) = move_to_new_pane(&tmux, dir.path(), pid);
    tmux.type_keys(&pane, "x", &[]);
    tmux.await_text(&pane, "got x");
    // SAFETY: signalling the fixture.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_for("the verdict", Duration::from_secs(10), || {
        std::fs::read_to_string(&out).is_ok_and(|v| v.ends_with('\n'))
    });
    let v = assert_pass(&std::fs::read_to_string(&out).unwrap_or_default());
    assert!(v.contains("keys=x "), "{v}");
    assert_eq!(exit_status(&rc), "rc=0");
}

/// A shell pipeline on a terminal (a tree of a shell, a counting subshell, `sleep`s and `cat`):
/// dumped as a shell job, restored on another pane, it carries on counting there from where
/// it was.
#[test]
fn a_shell_pipeline_in_tmux_carries_on_on_another_pane() {
    let test = "a_shell_pipeline_in_tmux_carries_on_on_another_pane";
    if !needs(&["tmux", "bash"], test) {
        return;
    }
    let dir = tempdir::Dir::new("tmux-pipeline");
    let tmux = Tmux::start("pipeline");
    let (first, pid) =
        tmux.window("bash -c 'i=0; while :; do echo line $i; i=$((i+1)); sleep 0.1; done | cat'");
    let numbers = |screen: String| -> Vec<u64> {
        screen
            .lines()
            .filter_map(|l| l.strip_prefix("line ")?.trim().parse().ok())
            .collect()
    };
    wait_for("the pipeline to count", Duration::from_secs(10), || {
        numbers(tmux.screen(&first)).len() >= 3
    });
    let seen = numbers(tmux.screen(&first)).last().copied().unwrap_or(0);
    let (pane, _) = move_to_new_pane(&tmux, dir.path(), pid);
    wait_for("counting on the new pane", Duration::from_secs(10), || {
        numbers(tmux.screen(&pane)).len() >= 5
    });
    let after = numbers(tmux.screen(&pane));
    assert!(
        after[0] > seen && after[0] <= seen + 20,
        "it carries on from {seen}, not from the start: {after:?}"
    );
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{after:?}");
}

/// A process whose controlling terminal would not come back — here `sleep` under `script`,
/// with its standard descriptors away from the terminal, so only the controlling terminal
/// ties it to the pty — is refused in one line, naming the pid, and runs on untraced; as a
/// shell job it is dumped (the job's terminal, the restoring stasis's, takes the place).
#[test]
fn a_controlling_terminal_that_would_not_come_back_refuses_the_dump() {
    if !needs(
        &["script"],
        "a_controlling_terminal_that_would_not_come_back_refuses_the_dump",
    ) {
        return;
    }
    let dir = tempdir::Dir::new("ctty");
    let pidfile = dir.path().join("pid");
    let mut script = Command::new("script");
    let mut script = only_stdio(&mut script)
        .args([
            "-q",
            "-c",
            &format!(
                "sh -c 'echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 60' </dev/null >/dev/null 2>&1",
                p = pidfile.display()
            ),
            "/dev/null",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("running script");
    wait_for("the sleeper under script", Duration::from_secs(10), || {
        pidfile.exists()
    });
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("the sleeper's pid");
    wait_for("the sleeper to exec", Duration::from_secs(10), || {
        comm(pid) == "sleep"
    });
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    assert!(
        e.contains(&pid.to_string())
            && e.contains("controlling terminal")
            && e.contains("--shell-job"),
        "{e}"
    );
    assert!(!img.exists(), "no image left");
    assert_eq!(tracer_of(pid), 0, "untraced");
    assert!(matches!(stasis_state(pid), 'S' | 'R'), "runs on");
    let o = stasis(&[
        "dump",
        "-t",
        &pid.to_string(),
        "-D",
        &img.to_string_lossy(),
        "--shell-job",
        "--leave-running",
    ]);
    assert!(o.status.success(), "as a shell job: {}", stderr_of(&o));
    let _ = script.kill();
    let _ = script.wait();
    // SAFETY: ending the sleeper this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}
