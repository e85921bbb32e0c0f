//! Incremental dumps: `stasis pre-dump` saves a running process's memory and tracks its writes
//! (userfaultfd write protection in async mode, read back with `PAGEMAP_SCAN`); a dump with
//! `--prev-images-dir` then writes only the pages written since, and takes the others from
//! the image before it. The fixture (tests/fixtures/phases.c) changes its memory in steps
//! between the dumps — pages written, a mapping unmapped, one mapped where it was, one moved
//! with mremap, pages dropped with MADV_DONTNEED — and knows what every page must hold: the
//! process restored from the last image of a chain of three checks all of its memory.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Pages (written, in parents) from a dump's summary line.
fn page_counts(summary: &str) -> (u64, u64) {
    let num_before = |key: &str| -> u64 {
        let i = summary
            .find(key)
            .unwrap_or_else(|| panic!("no {key:?} in {summary:?}"));
        summary[..i]
            .split_whitespace()
            .last()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no count before {key:?} in {summary:?}"))
    };
    let written = num_before(" pages (");
    let parent = if summary.contains(" unchanged (") {
        num_before(" unchanged (")
    } else {
        0
    };
    (written, parent)
}

fn run(args: &[&str]) -> String {
    let o = stasis(args);
    let e = stderr_of(&o);
    assert!(o.status.success(), "stasis {args:?}: {e}");
    e
}

/// The holders of memory trackers for `pid` (`stasis __hold-uffd PID …`).
fn holders_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.get(1) == Some(&&b"__hold-uffd"[..])
            && args.get(2) == Some(&pid.to_string().as_bytes())
        {
            out.push(p);
        }
    }
    out
}

fn wait_no_holder(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !holders_of(pid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "a tracker holder of pid {pid} stayed: {:?}",
            holders_of(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

const MIB: u64 = 64;
const PAGES_PER_MIB: u64 = 256;

#[test]
fn a_chain_of_three_dumps_writes_only_what_changed_and_restores_exactly() {
    if !require_root("a_chain_of_three_dumps_writes_only_what_changed_and_restores_exactly") {
        return;
    }
    let d = Daemon::start("phases", &["--mib", "64", "--phase-file", "{dir}/phase"]);
    let pid = d.pid.to_string();
    let (img1, img2, img3) = (d.image(1), d.image(2), d.image(3));
    let first = run(&["pre-dump", "-t", &pid, "-D", &s(&img1)]);
    let (w1, p1) = page_counts(&first);
    assert_eq!(p1, 0, "{first}");
    // A 64 MiB + B 4 + D 2 + E 2, and the rest of the process.
    assert!(w1 >= 72 * PAGES_PER_MIB, "{first}");
    assert_eq!(
        holders_of(d.pid).len(),
        1,
        "one tracker holder after the pre-dump"
    );
    assert_eq!(tracer_of(d.pid), 0, "traced after the pre-dump");

    // Phase 2: every 8th page of A (2048 pages), all of the new C (1024), half of E dropped.
    next_phase(&d, 2);
    let second = run(&[
        "pre-dump",
        "-t",
        &pid,
        "-D",
        &s(&img2),
        "--prev-images-dir",
        "../img1",
    ]);
    let (w2, p2) = page_counts(&second);
    let changed2 = MIB * PAGES_PER_MIB / 8 + 1024;
    assert!(w2 >= changed2, "fewer pages written than changed: {second}");
    assert!(
        w2 < changed2 + 256,
        "pages written again that did not change: {second}"
    );
    assert!(p2 >= MIB * PAGES_PER_MIB * 7 / 8, "{second}");

    // Phase 3: every 5th page of A, a new mapping where B was, D moved, a third of C, a
    // dropped page of E written again. The last dump kills the process.
    next_phase(&d, 3);
    let third = run(&[
        "dump",
        "-t",
        &pid,
        "-D",
        &s(&img3),
        "--prev-images-dir",
        "../img2",
    ]);
    let (w3, p3) = page_counts(&third);
    // D moved: all of it (512 pages) is written again, its mapping no longer tracked.
    let changed3 = MIB * PAGES_PER_MIB / 5 + 512 + 512 + 342 + 1;
    assert!(w3 >= changed3, "fewer pages written than changed: {third}");
    assert!(
        w3 < changed3 + 256,
        "pages written again that did not change: {third}"
    );
    assert!(p3 > 0, "{third}");
    wait_gone(d.pid);
    wait_no_holder(d.pid);

    // A pre-dump is memory only: never restored itself.
    let o = stasis(&["restore", "-D", &s(&img1), "--detach"]);
    assert!(!o.status.success());
    assert!(stderr_of(&o).contains("is a pre-dump"), "{}", stderr_of(&o));

    // A broken chain is refused before anything is made: a parent's page altered, or gone.
    let pages1 = img1.join("pages.img");
    let orig = std::fs::read(&pages1).expect("pages.img");
    let mut bad = orig.clone();
    let at = bad.len() - 100;
    bad[at] ^= 0x40;
    std::fs::write(&pages1, &bad).expect("write");
    let o = stasis(&["restore", "-D", &s(&img3), "--detach"]);
    assert!(!o.status.success(), "a damaged parent was restored");
    let e = stderr_of(&o);
    assert!(e.contains("chain is broken") && e.contains("img1"), "{e}");
    assert!(
        !Path::new(&format!("/proc/{}", d.pid)).exists(),
        "a process was made: {e}"
    );
    std::fs::write(&pages1, &orig).expect("write");
    let moved = d.dir.path().join("img2-moved");
    std::fs::rename(&img2, &moved).expect("rename");
    let o = stasis(&["restore", "-D", &s(&img3), "--detach"]);
    assert!(
        !o.status.success(),
        "a chain without its middle was restored"
    );
    let e = stderr_of(&o);
    assert!(e.contains("chain is broken") && e.contains("img2"), "{e}");
    assert!(
        !Path::new(&format!("/proc/{}", d.pid)).exists(),
        "a process was made: {e}"
    );
    std::fs::rename(&moved, &img2).expect("rename");

    // Whole, the chain gives the process its exact memory: it checks every page.
    d.restore(3);
    next_phase(&d, 4);
    let v = assert_pass(&d.finish_keep());
    assert_eq!(detail(&v, "phase"), 4, "{v}");
}

#[test]
fn without_a_tracker_every_page_is_dumped_and_tracking_ends_with_a_plain_dump() {
    if !require_root("without_a_tracker_every_page_is_dumped_and_tracking_ends_with_a_plain_dump") {
        return;
    }
    let d = Daemon::start("phases", &["--mib", "16", "--phase-file", "{dir}/phase"]);
    let pid = d.pid.to_string();
    let (img1, img2, img3, img4) = (d.image(1), d.image(2), d.image(3), d.image(4));
    run(&["pre-dump", "-t", &pid, "-D", &s(&img1)]);
    next_phase(&d, 2);
    // A --leave-running dump without --track-mem still uses the tracker, then ends it: the
    // process's memory is no longer registered, no holder is left.
    let second = run(&[
        "dump",
        "-t",
        &pid,
        "-D",
        &s(&img2),
        "--leave-running",
        "--prev-images-dir",
        "../img1",
    ]);
    assert!(page_counts(&second).1 > 0, "{second}");
    wait_no_holder(d.pid);
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", d.pid)).expect("smaps");
    assert!(
        !smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw")),
        "memory still registered with a userfaultfd after tracking ended"
    );
    // No tracker: an incremental dump says so and writes every page.
    next_phase(&d, 3);
    let o = stasis(&[
        "dump",
        "-t",
        &pid,
        "-D",
        &s(&img3),
        "--leave-running",
        "--prev-images-dir",
        "../img2",
    ]);
    let third = stderr_of(&o);
    assert!(o.status.success(), "{third}");
    assert!(third.contains("was not tracked since"), "{third}");
    assert_eq!(
        page_counts(&third).1,
        0,
        "pages taken from an untracked parent: {third}"
    );
    // --track-mem starts a tracker again, and the next dump uses it.
    run(&[
        "dump",
        "-t",
        &pid,
        "-D",
        &s(&img4),
        "--leave-running",
        "--track-mem",
    ]);
    assert_eq!(holders_of(d.pid).len(), 1);
    next_phase(&d, 4);
    let img5 = d.image(5);
    let fifth = run(&[
        "dump",
        "-t",
        &pid,
        "-D",
        &s(&img5),
        "--prev-images-dir",
        "../img4",
    ]);
    assert!(page_counts(&fifth).1 > 0, "{fifth}");
    wait_gone(d.pid);
    wait_no_holder(d.pid);
    for n in [3, 5] {
        d.restore(n);
        let v = assert_pass(&d.finish_keep());
        assert_eq!(detail(&v, "phase"), if n == 3 { 3 } else { 4 }, "{v}");
        wait_gone(d.pid);
    }
}

#[test]
fn a_tree_is_pre_dumped_and_dumped_incrementally() {
    if !require_root("a_tree_is_pre_dumped_and_dumped_incrementally") {
        return;
    }
    let d = Daemon::start(
        "phases",
        &["--mib", "16", "--fork", "--phase-file", "{dir}/phase"],
    );
    let pid = d.pid.to_string();
    let children = children_of(d.pid);
    assert_eq!(children.len(), 1, "the fixture's child: {children:?}");
    let (img1, img2, img3) = (d.image(1), d.image(2), d.image(3));
    let first = run(&["pre-dump", "-t", &pid, "-D", &s(&img1)]);
    assert!(first.contains("2 processes"), "{first}");
    assert_eq!(
        holders_of(children[0]).len(),
        1,
        "the child's memory is tracked too"
    );
    next_phase(&d, 2);
    let second = run(&[
        "pre-dump",
        "-t",
        &pid,
        "-D",
        &s(&img2),
        "--prev-images-dir",
        "../img1",
    ]);
    let (_, p2) = page_counts(&second);
    // Both processes' unchanged A pages (7/8 of 16 MiB each) come from the parents.
    assert!(p2 >= 2 * 16 * PAGES_PER_MIB * 7 / 8, "{second}");
    next_phase(&d, 3);
    let third = run(&[
        "dump",
        "-t",
        &pid,
        "-D",
        &s(&img3),
        "--prev-images-dir",
        "../img2",
    ]);
    assert!(third.contains("2 processes"), "{third}");
    assert!(
        page_counts(&third).1 >= 2 * 16 * PAGES_PER_MIB / 2,
        "{third}"
    );
    wait_gone(d.pid);
    wait_gone(children[0]);
    d.restore(3);
    next_phase(&d, 4);
    let v = assert_pass(&d.finish_keep());
    assert_eq!(detail(&v, "phase"), 4, "{v}");
}
