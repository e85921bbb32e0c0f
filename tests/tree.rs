//! Process trees: `stasis dump -t PID` takes the process and every descendant; the restore
//! brings them all back with their pids, parents, process groups and sessions, the open file
//! descriptions they share (one offset), the pipes between them (with the data in flight),
//! their private memory (each its own), their parent-death signals, a stopped member stopped.
//! The fixture checks itself (tests/fixtures/tree.c); these tests also look from outside.

mod common;

use common::*;

/// pid → (ppid, pgid, sid, state) for `pid` and every descendant.
fn tree_of(root: i32) -> std::collections::BTreeMap<i32, (i32, i32, i32, char)> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        let s = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let Some(i) = s.rfind(')') else { continue };
        let f: Vec<&str> = s[i + 2..].split_whitespace().collect();
        let num = |k: usize| f.get(k).and_then(|v| v.parse().ok()).unwrap_or(-1);
        let state = f.first().and_then(|v| v.chars().next()).unwrap_or('?');
        out.insert(p, (num(1), num(2), num(3), state));
        for t in std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            todo.extend(
                kids.split_whitespace()
                    .filter_map(|k| k.parse::<i32>().ok()),
            );
        }
    }
    out
}

fn shape(root: i32) -> Vec<(i32, i32, i32, i32)> {
    tree_of(root)
        .into_iter()
        .map(|(p, (pp, g, s, _))| (p, pp, g, s))
        .collect()
}

fn wait_for_tree(root: i32, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tree_of(root).len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the tree of {root} did not grow to {n}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_tree_with_groups_sessions_pipes_and_shared_files_comes_back() {
    if !require_root("a_tree_with_groups_sessions_pipes_and_shared_files_comes_back") {
        return;
    }
    let d = Daemon::start("tree", &[]);
    wait_for_tree(d.pid, 5);
    let before = shape(d.pid);
    assert_eq!(before.len(), 5, "{before:?}");
    for n in 1..=2 {
        let img = d.image(n);
        let o = stasis(&[
            "dump",
            "-t",
            &d.pid.to_string(),
            "-D",
            &img.to_string_lossy(),
        ]);
        assert!(o.status.success(), "dump {n}: {}", stderr_of(&o));
        assert!(stderr_of(&o).contains("5 processes"), "{}", stderr_of(&o));
        for (p, ..) in &before {
            wait_gone(*p);
        }
        let o = stasis(&["restore", "-D", &img.to_string_lossy(), "-d"]);
        assert!(o.status.success(), "restore {n}: {}", stderr_of(&o));
        let after = shape(d.pid);
        assert_eq!(
            after, before,
            "pids, parents, groups and sessions after restore {n}"
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let v = assert_pass(&d.finish());
    assert_eq!(detail(&v, "procs"), 5, "{v}");
    assert!(detail(&v, "counter") > 10, "{v}");
}

/// A stopped member of the tree (SIGSTOP) comes back stopped, the others running; continued,
/// it carries on, and the tree's verdict is a pass.
#[test]
fn a_stopped_child_comes_back_stopped() {
    if !require_root("a_stopped_child_comes_back_stopped") {
        return;
    }
    let d = Daemon::start("tree", &["--stop-child"]);
    wait_for_tree(d.pid, 5);
    let stopped = || -> Vec<i32> {
        tree_of(d.pid)
            .into_iter()
            .filter(|(_, v)| v.3 == 'T')
            .map(|(p, _)| p)
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stopped().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the child did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let s = stopped();
    assert_eq!(s.len(), 1, "{s:?}");
    let img = d.image(1);
    let o = stasis(&[
        "dump",
        "-t",
        &d.pid.to_string(),
        "-D",
        &img.to_string_lossy(),
    ]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let shown = stasis(&["show", &img.to_string_lossy()]);
    let text = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(text.contains("process tree (5 processes"), "{text}");
    assert!(
        text.contains(&format!("{} tree (group", s[0])) && text.contains(", stopped)"),
        "{text}"
    );
    wait_gone(d.pid);
    for p in &s {
        wait_gone(*p);
    }
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "-d"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(stopped(), s, "the same child is stopped, the others run");
    // SAFETY: continuing the fixture's child.
    unsafe { libc::kill(s[0], libc::SIGCONT) };
    let v = assert_pass(&d.finish());
    assert_eq!(detail(&v, "procs"), 5, "{v}");
}

/// What a tree shares but stasis cannot restore yet is refused before anything is touched,
/// naming the pid and the thing: a descriptor table shared by two processes (CLONE_FILES), a
/// parent-death signal on the root (its parent is not in the image).
#[test]
fn a_shared_fd_table_or_a_root_parent_death_signal_refuses_the_dump() {
    if !require_root("a_shared_fd_table_or_a_root_parent_death_signal_refuses_the_dump") {
        return;
    }
    for (what, needle) in [
        (
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nc = libc.syscall(56, 0x400 | 17, 0, 0, 0, 0)\nif c == 0:\n    time.sleep(60); os._exit(0)",
            "descriptor table",
        ),
        (
            "import ctypes\nctypes.CDLL(None).prctl(1, 15, 0, 0, 0)",
            "parent-death signal",
        ),
    ] {
        let dir = tempdir::Dir::new("tree-refused");
        let pidfile = dir.path().join("pid");
        let script = format!(
            "import os, time, mmap\n{what}\nopen('{p}.tmp','w').write(str(os.getpid())); os.rename('{p}.tmp','{p}')\ntime.sleep(60)\n",
            p = pidfile.display()
        );
        let mut child = python(&script, &pidfile, None, true);
        let _reap = KillTree(child.id() as i32);
        let pid = child.id() as i32;
        let before = tree_of(pid);
        let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &dir.path().join("img").to_string_lossy()]);
        let e = stderr_of(&o);
        // A sleeper let go by ptrace runs for a moment (its sleep restarts): the tree must be
        // back as it was soon, not at the very instant the dump exits. A task left stopped,
        // traced or gone never matches.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut after = tree_of(pid);
        while after != before && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            after = tree_of(pid);
        }
        let traced: Vec<(i32, i32)> = after
            .iter()
            .filter(|(_, v)| v.3 != 'Z')
            .map(|(p, _)| (*p, tracer_of(*p)))
            .collect();
        for p in after.keys() {
            // SAFETY: killing the processes this test started.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        let _ = child.wait();
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
        assert!(e.contains(needle) && e.contains("not supported"), "{e}");
        assert_eq!(after, before, "the tree runs on as it was");
        for (p, t) in traced {
            assert_eq!(t, 0, "pid {p} is not traced");
        }
    }
}

/// Zombie children (one exited with status 7, one killed by SIGTERM, neither waited for) come
/// back as zombies of their parent, which then reaps them with those very statuses.
#[test]
fn zombies_come_back_and_are_reaped_with_their_status() {
    if !require_root("zombies_come_back_and_are_reaped_with_their_status") {
        return;
    }
    let dir = tempdir::Dir::new("tree-zombies");
    let pidfile = dir.path().join("pid");
    let go = dir.path().join("go");
    let result = dir.path().join("result");
    let script = format!(
        r#"import os, time, signal
a = os.fork()
if a == 0: os._exit(7)
b = os.fork()
if b == 0:
    os.kill(os.getpid(), signal.SIGTERM); time.sleep(10); os._exit(1)
time.sleep(0.3)
open('{p}.tmp','w').write(str(os.getpid())); os.rename('{p}.tmp','{p}')
while not os.path.exists('{go}'): time.sleep(0.02)
_, sa = os.waitpid(a, 0)
_, sb = os.waitpid(b, 0)
ok = os.WIFEXITED(sa) and os.WEXITSTATUS(sa) == 7 and os.WIFSIGNALED(sb) and os.WTERMSIG(sb) == signal.SIGTERM
open('{r}','w').write(('OK' if ok else 'FAIL') + ' %d %d %x %x' % (a, b, sa, sb))
"#,
        p = pidfile.display(),
        go = go.display(),
        r = result.display()
    );
    let mut child = python(&script, &pidfile, None, true);
    let pid = child.id() as i32;
    let _reap = KillTree(pid);
    let before = tree_of(pid);
    let zombies: Vec<i32> = before
        .iter()
        .filter(|(_, v)| v.3 == 'Z')
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(zombies.len(), 2, "{before:?}");
    dump_and_restore(&mut child, &dir.path().join("img"), || ());
    assert_eq!(
        comparable(pid, tree_of(pid)),
        comparable(pid, before),
        "the same tree, zombies included"
    );
    std::fs::write(&go, b"").expect("go");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !result.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no result from the restored parent"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    let r = std::fs::read_to_string(&result).unwrap_or_default();
    assert!(r.starts_with("OK"), "{r}");
}

/// A process forking short-lived children as fast as it can (each exits with a status its
/// parent checks when it reaps it): the freeze catches whatever is there — live children,
/// zombies — twenty times running on, then once for good; restored, it carries on.
#[test]
fn a_process_forking_all_the_time_is_frozen_whole_and_carries_on() {
    if !require_root("a_process_forking_all_the_time_is_frozen_whole_and_carries_on") {
        return;
    }
    let dir = tempdir::Dir::new("tree-churn");
    let pidfile = dir.path().join("pid");
    let ticks = dir.path().join("ticks");
    let script = format!(
        r#"import os, time
f = os.open('{t}', os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
open('{p}.tmp','w').write(str(os.getpid())); os.rename('{p}.tmp','{p}')
n = 0
kids = {{}}
while True:
    c = os.fork()
    if c == 0:
        time.sleep(0.003); os._exit(n % 7)
    kids[c] = n % 7
    while kids:
        p, st = os.waitpid(-1, os.WNOHANG)
        if p == 0: break
        if not os.WIFEXITED(st) or os.WEXITSTATUS(st) != kids.pop(p):
            os.write(f, b'BAD %d %x\n' % (p, st))
    n += 1
    os.write(f, b'%d\n' % n)
    time.sleep(0.001)
"#,
        t = ticks.display(),
        p = pidfile.display()
    );
    let mut child = python(&script, &pidfile, None, true);
    let pid = child.id() as i32;
    let _reap = KillTree(pid);
    let lines = || std::fs::read_to_string(&ticks).unwrap_or_default();
    let mut sizes = Vec::new();
    for n in 1..=20 {
        let img = dir.path().join(format!("img{n}"));
        let o = stasis(&[
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            &img.to_string_lossy(),
            "--leave-running",
        ]);
        assert!(o.status.success(), "dump {n}: {}", stderr_of(&o));
        let e = stderr_of(&o);
        sizes.push(
            e.split(" processes")
                .next()
                .and_then(|s| s.rsplit(' ').next())
                .unwrap_or("1")
                .to_string(),
        );
        assert_eq!(tracer_of(pid), 0, "released after dump {n}");
    }
    let at_dump = dump_and_restore(&mut child, &dir.path().join("last"), || {
        lines().lines().count()
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let text = lines();
    let after = tree_of(pid);
    for p in after.keys() {
        // SAFETY: killing the processes this test started.
        unsafe { libc::kill(*p, libc::SIGKILL) };
    }
    assert!(
        !text.contains("BAD"),
        "a child's status came back wrong: {text}"
    );
    let counts: Vec<u64> = text.lines().filter_map(|l| l.parse().ok()).collect();
    assert!(
        counts.len() > at_dump + 20,
        "it carries on: {} lines at the dump, {} now",
        at_dump,
        counts.len()
    );
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "the count is continuous"
    );
    eprintln!("processes per dump: {}", sizes.join(" "));
}

/// Every pid of an image's tree, from `stasis show --json` (each line starts with the pid).
fn image_pids(img: &std::path::Path) -> Vec<i32> {
    let o = stasis(&["show", "--json", &img.to_string_lossy()]);
    assert!(o.status.success(), "show: {}", stderr_of(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("show --json");
    v["tree"]
        .as_array()
        .expect("tree")
        .iter()
        .filter_map(|l| l.as_str()?.split_whitespace().next()?.parse().ok())
        .collect()
}

/// A process group whose leader has exited (the first of a pipeline), and a session whose
/// leader has exited (its member came back to the root, a child subreaper): both are made again
/// by helper tasks with the old numbers, and every member comes back in them, with its parent.
#[test]
fn groups_and_sessions_whose_leader_exited_come_back() {
    if !require_root("groups_and_sessions_whose_leader_exited_come_back") {
        return;
    }
    let dir = tempdir::Dir::new("tree-lost-leaders");
    let pidfile = dir.path().join("pid");
    let script = format!(
        r#"import os, time, ctypes
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
L = os.fork()
if L == 0:
    os.setpgid(0, 0); time.sleep(0.3); os._exit(0)
os.setpgid(L, L)
M = os.fork()
if M == 0:
    time.sleep(60); os._exit(0)
os.setpgid(M, L)
S = os.fork()
if S == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(60); os._exit(0)
    os._exit(0)
os.waitpid(L, 0); os.waitpid(S, 0)
time.sleep(0.2)
open('{p}.tmp','w').write(str(os.getpid())); os.rename('{p}.tmp','{p}')
while True:
    try: os.waitpid(-1, 0)
    except ChildProcessError: time.sleep(0.1)
"#,
        p = pidfile.display()
    );
    let mut child = python(&script, &pidfile, None, true);
    let pid = child.id() as i32;
    let _reap = KillTree(pid);
    let before = tree_of(pid);
    assert_eq!(before.len(), 3, "{before:?}");
    dump_and_restore(&mut child, &dir.path().join("img"), || ());
    assert_eq!(
        comparable(pid, tree_of(pid)),
        comparable(pid, before),
        "pids, parents, groups and sessions"
    );
}

/// Dumps (kills) the tree of `child`, waits until every pid of the image is free again,
/// notes `between` while it is away, and restores it (detached). Returns what `between` saw.
fn dump_and_restore<T>(
    child: &mut std::process::Child,
    img: &std::path::Path,
    between: impl FnOnce() -> T,
) -> T {
    let pid = child.id().to_string();
    let o = stasis(&["dump", "-t", &pid, "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    for p in image_pids(img) {
        wait_gone(p);
    }
    let seen = between();
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "-d"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    seen
}

/// A tree as `tree_of` gives it, without what may differ across a restore: the root's parent
/// (outside the image) and running versus sleeping (a matter of the moment; zombie or stopped
/// is not).
fn comparable(
    root: i32,
    mut t: std::collections::BTreeMap<i32, (i32, i32, i32, char)>,
) -> std::collections::BTreeMap<i32, (i32, i32, i32, char)> {
    if let Some(r) = t.get_mut(&root) {
        r.0 = 0;
    }
    for v in t.values_mut() {
        if matches!(v.3, 'R' | 'S' | 'D') {
            v.3 = 'S';
        }
    }
    t
}

/// Python's multiprocessing (fork): two workers count in a `Value` under a `Lock`, each also
/// in its own slot of an `Array`. Both live in deleted files in /dev/shm that all three
/// processes map (the heap arena, the semaphore). After a dump (killed) and a restore the
/// three share them again: the count goes on, and under the lock it is always the sum of the
/// workers' slots (a copy per process would stop the count the parent sees; a lock that no
/// longer excludes would lose increments).
#[test]
fn python_multiprocessing_shares_its_value_and_lock_again_after_restore() {
    if !require_root("python_multiprocessing_shares_its_value_and_lock_again_after_restore") {
        return;
    }
    let dir = tempdir::Dir::new("mp");
    let pidfile = dir.path().join("pid");
    let state = dir.path().join("state");
    let script = format!(
        r#"
import multiprocessing as mp, os, time
def work(k, v, a, lock):
    while True:
        with lock:
            v.value += 1
            a[k] += 1
        time.sleep(0.002)
mp.set_start_method('fork')
v = mp.Value('q', 0, lock=False)
a = mp.Array('q', 2, lock=False)
lock = mp.Lock()
for k in range(2):
    mp.Process(target=work, args=(k, v, a, lock), daemon=True).start()
open('{p}.tmp', 'w').write(str(os.getpid())); os.rename('{p}.tmp', '{p}')
while True:
    time.sleep(0.05)
    with lock:
        n, s = v.value, a[0] + a[1]
    open('{s}.tmp', 'w').write('%d %d' % (n, s)); os.rename('{s}.tmp', '{s}')
"#,
        p = pidfile.display(),
        s = state.display()
    );
    let mut child = python(&script, &pidfile, None, true);
    let pid = child.id() as i32;
    let _reap = KillTree(pid);
    let read = || -> (u64, u64) {
        let t = std::fs::read_to_string(&state).unwrap_or_default();
        let mut it = t.split_whitespace().map(|x| x.parse().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    let wait_past = |n: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let (v, s) = read();
            assert_eq!(v, s, "the count is the sum of the workers' counts");
            if v > n {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the count stays at {v}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    wait_past(50);
    let workers = children_of(pid);
    assert_eq!(workers.len(), 2, "{workers:?}");
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    for w in &workers {
        wait_gone(*w);
    }
    let (at_dump, _) = read();
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    assert_eq!(children_of(pid), workers, "both workers are back");
    let maps = |p: i32| -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{p}/maps"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("/dev/shm/"))
            .map(|l| l.split_whitespace().skip(4).collect::<Vec<_>>().join(" "))
            .collect()
    };
    let shared = maps(pid);
    assert_eq!(shared.len(), 2, "the arena and the semaphore: {shared:?}");
    for w in &workers {
        assert_eq!(maps(*w), shared, "worker {w} maps the very same files");
    }
    wait_past(at_dump + 200);
}
