//! Pseudo-terminals a program made itself (as script, tmux and expect do): the pty comes back
//! with its number, modes, window size and every queued byte, in both directions, and a
//! child session has it as its controlling terminal again, in the foreground. The fixture
//! checks itself (tests/fixtures/pty.c); `script` is the real program. The tests here run one
//! at a time (`one_at_a_time`), so a number freed by a dump is free for its restore.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// The tests here make ptys and check their numbers: one at a time, so that no test's pty
/// takes a number another one's restore wants back.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn a_pty_pair_with_data_both_ways_and_a_session_on_it_comes_back() {
    if !require_root("a_pty_pair_with_data_both_ways_and_a_session_on_it_comes_back") {
        return;
    }
    let _one = one_at_a_time();
    let d = Daemon::start("pty", &[]);
    let kids = children_of(d.pid);
    assert_eq!(kids.len(), 1, "the fixture's child session: {kids:?}");
    // Twice left running: the dump takes the queues out and must put them back exactly.
    d.dump_leave_running(1);
    d.dump_leave_running(2);
    assert_eq!(stasis_state(d.pid), 'S', "runs on");
    d.dump(3);
    wait_gone(kids[0]);
    d.restore(3);
    assert_eq!(children_of(d.pid), kids, "the child session is back");
    let v = assert_pass(&d.finish());
    assert!(detail(&v, "iterations") > 0, "{v}");
}

/// `script` running a counter: the tree (script, the shell it runs on the pty's slave as a
/// session leader, its `sleep`s) is dumped and killed, then restored; the counter goes on in
/// script's output, with no number missing or repeated.
#[test]
fn script_running_a_counter_carries_on_after_restore() {
    if !require_root("script_running_a_counter_carries_on_after_restore") {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir::Dir::new("script");
    let out = dir.path().join("out");
    let img = dir.path().join("img");
    let counter = "i=0; while :; do i=$((i+1)); echo n$i; sleep 0.05; done";
    // setsid: a session of its own, away from whatever terminal the tests run on.
    let mut cmd = std::process::Command::new("setsid");
    only_stdio(&mut cmd);
    cmd.args([
        "script",
        "-q",
        "-f",
        "-E",
        "never",
        "-c",
        counter,
        "/dev/null",
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::fs::File::create(&out).expect("creating the output file"))
    .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("running script");
    let pid = child.id() as i32;
    let _reap = KillTree(pid);
    let numbers = |text: &str| -> Vec<u64> {
        text.split(['\r', '\n'])
            .filter_map(|l| l.strip_prefix('n').and_then(|n| n.parse().ok()))
            .collect()
    };
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    let wait_for = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while numbers(&read()).len() < n {
            assert!(Instant::now() < deadline, "script printed: {:?}", read());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(5);
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        tree.extend(children_of(tree[i]));
        i += 1;
    }
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let before = numbers(&read()).len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        numbers(&read()).len(),
        before,
        "nothing counts on after the dump"
    );
    let _ = child.wait();
    for p in &tree[1..] {
        wait_gone(*p);
    }
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    wait_for(before + 10);
    let got = numbers(&read());
    let want: Vec<u64> = (1..=got.len() as u64).collect();
    assert_eq!(got, want, "the counter goes on from where it was");
    // SAFETY: ending the restored script.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}
