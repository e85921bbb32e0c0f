//! `stasis dump` and `stasis restore` on real processes. Each fixture checks its own state
//! after restore and reports PASS or FAIL with the reason.

mod common;

use common::*;

fn roundtrip(name: &str, args: &[&str]) -> String {
    let d = Daemon::start(name, args);
    d.dump(1);
    d.restore(1);
    assert_pass(&d.finish())
}

#[test]
fn sleeper_comes_back() {
    if require_root("sleeper_comes_back") {
        roundtrip("sleeper", &[]);
    }
}

#[test]
fn same_image_restored_twice() {
    if !require_root("same_image_restored_twice") {
        return;
    }
    let d = Daemon::start("sleeper", &[]);
    d.dump(1);
    d.restore(1);
    // SAFETY: killing the first copy.
    unsafe { libc::kill(d.pid, libc::SIGKILL) };
    wait_gone(d.pid);
    d.restore(1);
    assert_pass(&d.finish());
}

#[test]
fn dump_restore_dump_restore() {
    if !require_root("dump_restore_dump_restore") {
        return;
    }
    let d = Daemon::start("sleeper", &[]);
    d.dump(1);
    d.restore(1);
    d.dump(2);
    d.restore(2);
    assert_pass(&d.finish());
}

#[test]
fn leave_running_keeps_the_process() {
    if !require_root("leave_running_keeps_the_process") {
        return;
    }
    let d = Daemon::start("sleeper", &[]);
    let img = d.image(1);
    let o = stasis(&[
        "dump",
        "-t",
        &d.pid.to_string(),
        "-D",
        &img.to_string_lossy(),
        "--leave-running",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        matches!(stasis_state(d.pid), 'S' | 'R'),
        "the process should still run"
    );
    // Its pid is taken: a restore must refuse cleanly and create nothing.
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr_of(&o).contains("in use"), "{}", stderr_of(&o));
    assert_pass(&d.finish());
}

#[test]
fn restore_without_detach_waits_and_passes_the_exit_status() {
    if !require_root("restore_without_detach_waits_and_passes_the_exit_status") {
        return;
    }
    let d = Daemon::start("sleeper", &[]);
    d.dump(1);
    let mut restore = std::process::Command::new(stasis_bin())
        .args(["restore", "-D", &d.image(1).to_string_lossy()])
        .spawn()
        .expect("stasis restore");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stasis_state(d.pid) == '?' || tracer_of(d.pid) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the restored process never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let pid = d.pid;
    let verdict = d.finish();
    let status = restore.wait().expect("waiting for stasis restore");
    assert_pass(&verdict);
    assert_eq!(
        status.code(),
        Some(0),
        "stasis restore exits with the restored process's status (pid {pid})"
    );
}

#[test]
fn vdso_calls_through_cached_pointers_agree_with_syscalls() {
    if require_root("vdso_calls_through_cached_pointers_agree_with_syscalls") {
        roundtrip("vdso_calls", &[]);
    }
}

#[test]
fn memory_of_every_vma_kind_comes_back() {
    if require_root("memory_of_every_vma_kind_comes_back") {
        roundtrip("memory", &[]);
    }
}

// ---- bad images: refused before anything is created ------------------------------------------

/// Dumps a sleeper, damages the image with `damage`, and checks the restore is refused with a
/// message containing `needle`, leaving no process behind.
fn refused_after(needle: &str, damage: impl Fn(&std::path::Path)) {
    let d = Daemon::start("sleeper", &[]);
    d.dump(1);
    let img = d.image(1);
    damage(&img);
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "one-line error: {e}");
    assert!(
        e.to_lowercase().contains(needle),
        "{e:?} should mention {needle:?}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{}", d.pid)).exists(),
        "a process was left at pid {}",
        d.pid
    );
}

fn flip(path: &std::path::Path, off: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open image file");
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).expect("read");
    b[0] ^= 0x40;
    f.write_all_at(&b, off).expect("write");
}

/// Rewrites a u32 header field of a record file and re-seals the header checksum, so only
/// that field is wrong.
fn set_header_u32(path: &std::path::Path, off: usize, value: u32) {
    let mut bytes = std::fs::read(path).expect("read record");
    bytes[off..off + 4].copy_from_slice(&value.to_le_bytes());
    let mut header = bytes[..64].to_vec();
    header[40..48].fill(0);
    let sum = xxhash_rust::xxh3::xxh3_64(&header);
    bytes[40..48].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(path, bytes).expect("write record");
}

#[test]
fn bad_checksum_is_refused() {
    if require_root("bad_checksum_is_refused") {
        refused_after("checksum", |img| flip(&img.join("mm.img"), 100));
    }
}

#[test]
fn bad_page_data_is_refused() {
    if require_root("bad_page_data_is_refused") {
        refused_after("checksum", |img| flip(&img.join("pages.img"), 4096 + 17));
    }
}

#[test]
fn truncated_page_file_is_refused() {
    if require_root("truncated_page_file_is_refused") {
        refused_after("truncated", |img| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(img.join("pages.img"))
                .expect("open");
            let len = f.metadata().expect("stat").len();
            f.set_len(len - 4096).expect("truncate");
        });
    }
}

#[test]
fn missing_file_is_refused() {
    if require_root("missing_file_is_refused") {
        refused_after("files.img", |img| {
            std::fs::remove_file(img.join("files.img")).expect("remove")
        });
    }
}

#[test]
fn other_format_version_is_refused() {
    if require_root("other_format_version_is_refused") {
        refused_after("version", |img| {
            set_header_u32(&img.join("inventory.img"), 8, 99)
        });
    }
}

#[test]
fn other_architecture_is_refused() {
    if require_root("other_architecture_is_refused") {
        refused_after("arch", |img| {
            set_header_u32(&img.join("process.img"), 12, 2)
        });
    }
}

#[test]
fn registers_gprs_ymm_x87_and_flags_come_back() {
    if require_root("registers_gprs_ymm_x87_and_flags_come_back") {
        roundtrip("registers", &[]);
    }
}

#[test]
fn signals_handlers_altstack_pending_timers_and_blocked_calls_come_back() {
    if require_root("signals_handlers_altstack_pending_timers_and_blocked_calls_come_back") {
        roundtrip("signals", &[]);
    }
}

#[test]
fn files_offsets_flags_deleted_files_pipes_cwd_umask_come_back() {
    if require_root("files_offsets_flags_deleted_files_pipes_cwd_umask_come_back") {
        roundtrip("files", &[]);
    }
}

#[test]
fn glibc_rseq_and_robust_mutex_still_work() {
    if require_root("glibc_rseq_and_robust_mutex_still_work") {
        roundtrip("glibc", &[]);
    }
}

/// A process whose program is stasis itself (the kernel refused to reset the exe link: EBUSY)
/// and whose stdout and stderr are one pipe leading outside: after restore it must keep
/// writing into that same pipe, carrying on from where it was.
#[test]
fn workload_keeps_writing_to_an_outside_pipe_after_restore() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    if !require_root("workload_keeps_writing_to_an_outside_pipe_after_restore") {
        return;
    }
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let mut lines = BufReader::new(std::fs::File::from(r)).lines();
    let w2 = w.try_clone().expect("dup");
    // SAFETY: setsid and close_range in the child: the workload gets its own session, like a
    // service, and only its standard descriptors (not whatever the test runner leaked).
    let mut child = unsafe {
        std::process::Command::new(stasis_bin())
            .arg("demo-workload")
            .stdin(std::process::Stdio::null())
            .stdout(w.try_clone().expect("dup"))
            .stderr(w2)
            .pre_exec(|| {
                libc::setsid();
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                Ok(())
            })
            .spawn()
            .expect("start the workload")
    };
    let pid = child.id() as i32;
    let tick = |line: &str| -> u64 {
        line.split("tick ")
            .nth(1)
            .and_then(|t| t.split(',').next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no tick in {line:?}"))
    };
    let mut last = 0;
    for _ in 0..2 {
        last = tick(&lines.next().expect("a line").expect("read"));
    }
    let dir = tempdir::Dir::new("outside-pipe");
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let _ = child.wait();
    // Lines written before the dump may still be buffered in the pipe.
    let status = std::process::Command::new(stasis_bin())
        .args(["restore", "-D", &img.to_string_lossy(), "--detach"])
        .stdout(w.try_clone().expect("dup"))
        .stderr(w)
        .status()
        .expect("stasis restore");
    assert!(status.success(), "restore failed ({status})");
    let mut after = Vec::new();
    for _ in 0..6 {
        let line = lines.next().expect("a line after restore").expect("read");
        assert!(line.contains(&format!("pid {pid}")), "{line}");
        after.push(tick(&line));
    }
    // SAFETY: stopping the restored workload.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(
        after.windows(2).all(|p| p[1] == p[0] + 1),
        "ticks must follow each other: {after:?}"
    );
    assert!(
        *after.last().unwrap_or(&0) > last + 2,
        "the restored workload went on ticking after {last}: {after:?}"
    );
}

/// Pages that were only read map the kernel's zero page: pagemap calls them present, but they
/// hold nothing. They must not be dumped (nor become real memory on restore).
#[test]
fn zero_pages_are_not_dumped() {
    if !require_root("zero_pages_are_not_dumped") {
        return;
    }
    let d = Daemon::start("sleeper", &["--read-zero", "32"]);
    let img = d.image(1);
    let o = stasis(&[
        "dump",
        "-t",
        &d.pid.to_string(),
        "-D",
        &img.to_string_lossy(),
        "--leave-running",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let o = stasis(&["show", &img.to_string_lossy(), "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("show --json");
    let pages = r["pages"].as_u64().expect("pages");
    assert!(
        pages < 1024,
        "{pages} pages dumped: the 8192 zero-mapped pages were dumped as data"
    );
    assert_pass(&d.finish());
}

/// An image made on a machine whose clocks are ahead (up longer, as when restoring after a
/// reboot): the restored process gets a time namespace whose offsets keep CLOCK_MONOTONIC and
/// CLOCK_BOOTTIME from going backwards, and its own clock checks (vdso_calls) still pass.
#[test]
fn clocks_behind_are_shifted_with_a_time_namespace() {
    if !require_root("clocks_behind_are_shifted_with_a_time_namespace") {
        return;
    }
    let d = Daemon::start("vdso_calls", &[]);
    d.dump(1);
    let ahead = 1000 * 1_000_000_000u64;
    edit_record(&d.image(1).join("inventory.img"), |inv| {
        for k in ["monotonic_ns", "boottime_ns"] {
            let v = inv[k].as_u64().expect(k);
            inv[k] = serde_json::json!(v + ahead);
        }
    });
    // Edited on purpose (its MAC no longer holds): restored as trusted.
    let o = stasis(&[
        "restore",
        "-D",
        &d.image(1).to_string_lossy(),
        "--detach",
        "--trust-image",
    ]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    let offsets =
        std::fs::read_to_string(format!("/proc/{}/timens_offsets", d.pid)).expect("timens_offsets");
    let secs = |clock: &str| -> u64 {
        offsets
            .lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                let c = w.next()?;
                (c == clock
                    || (clock == "monotonic" && c == "1")
                    || (clock == "boottime" && c == "7"))
                    .then(|| w.next()?.parse().ok())?
            })
            .unwrap_or(0)
    };
    // 1000 s ahead, minus the seconds between the dump and the restore.
    assert!(
        secs("monotonic") >= 990 && secs("boottime") >= 990,
        "offsets not set: {offsets}"
    );
    assert_pass(&d.finish());
}

/// Two views of one MAP_SHARED anonymous object stay one object (a write through one shows
/// through the other), and untouched pages of a private file mapping still follow the file.
#[test]
fn shared_anonymous_views_stay_one_object() {
    if require_root("shared_anonymous_views_stay_one_object") {
        let d = roundtrip("memory", &["--strict"]);
        assert!(d.contains("strict"), "{d}");
    }
}

/// A process whose binary was deleted while it ran (as after a package upgrade): the file's
/// contents are dumped once and recreated, unlinked, under the old name on restore; the
/// restored process runs on, and /proc still shows its exe and mappings as "(deleted)".
#[test]
fn process_running_a_deleted_binary_comes_back() {
    use std::os::unix::process::CommandExt;
    if !require_root("process_running_a_deleted_binary_comes_back") {
        return;
    }
    let dir = tempdir::Dir::new("deleted-exe");
    let exe = dir.path().join("sleeper-copy");
    std::fs::copy(fixture_bin("sleeper"), &exe).expect("copy the fixture");
    let (pidfile, out) = (dir.path().join("pid"), dir.path().join("out"));
    // SAFETY: close_range is async-signal-safe; only the standard descriptors go along.
    let status = unsafe {
        std::process::Command::new(&exe).pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    }
    .arg("--pidfile")
    .arg(&pidfile)
    .arg("--out")
    .arg(&out)
    .arg("--daemon")
    .status()
    .expect("start the copy");
    assert!(status.success());
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    std::fs::remove_file(&exe).expect("delete the running binary");
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    wait_gone(pid);
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    let link = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe link");
    assert_eq!(
        link.to_string_lossy(),
        format!("{} (deleted)", exe.display())
    );
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    assert!(
        maps.contains(&format!("{} (deleted)", exe.display())),
        "{maps}"
    );
    assert!(!exe.exists(), "the recreated file must not keep a name");
    // SAFETY: asking the restored fixture for its verdict.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&out).is_ok_and(|v| v.ends_with('\n')) {
        assert!(std::time::Instant::now() < deadline, "no verdict");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_pass(&std::fs::read_to_string(&out).unwrap_or_default());
}

/// The parasite rewrites the first bytes of the first executable mapping while it runs (its
/// injection site), and memory is copied while the parasite works: that page must reach the
/// image with the program's own bytes. Once a process has been infected the page is a private
/// copy (dumped as data); a second dump must save it as the program has it.
#[test]
fn the_injection_site_reaches_the_image_unchanged() {
    if !require_root("the_injection_site_reaches_the_image_unchanged") {
        return;
    }
    let d = Daemon::start("sleeper", &[]);
    let pid = d.pid.to_string();
    for n in 1..=2 {
        let img = d.image(n);
        let o = stasis(&[
            "dump",
            "-t",
            &pid,
            "-D",
            &img.to_string_lossy(),
            "--leave-running",
        ]);
        assert!(o.status.success(), "{}", stderr_of(&o));
    }
    // The second image: the site's page was a private copy by then.
    let img = d.image(2);
    let bytes = std::fs::read(img.join("mm.img")).expect("mm.img");
    let mm: serde_json::Value = serde_json::from_slice(&bytes[64..]).expect("mm JSON");
    let vma = mm["vmas"]
        .as_array()
        .expect("vmas")
        .iter()
        .find(|v| v["prot"].as_u64().unwrap_or(0) & 4 != 0)
        .expect("an executable mapping");
    let start = vma["start"].as_u64().expect("start");
    let run = vma["pages"]
        .as_array()
        .expect("pages")
        .iter()
        .find(|r| r["addr"].as_u64() == Some(start))
        .expect("the site's page was dumped (a private copy since the first infection)");
    let file_off = run["file_off"].as_u64().expect("file_off");
    let mut saved = [0u8; 16];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(img.join("pages.img")).expect("pages.img");
        f.read_exact_at(&mut saved, file_off).expect("read");
    }
    let path = vma["backing"]["path"].as_str().expect("a file mapping");
    let offset = vma["backing"]["offset"].as_u64().expect("offset");
    let mut original = [0u8; 16];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(path).expect("the program's file");
        f.read_exact_at(&mut original, offset).expect("read");
    }
    assert_eq!(
        saved, original,
        "the image holds the program's own bytes at {start:#x}"
    );
    assert_pass(&d.finish());
}

/// Registers no 64-bit user process can run with (a 32-bit code segment, I/O privilege in
/// the flags, interrupts off, an instruction pointer in kernel space), written into an image
/// and re-sealed, are refused before anything is created.
#[test]
fn registers_a_user_process_cannot_have_are_refused() {
    if !require_root("registers_a_user_process_cannot_have_are_refused") {
        return;
    }
    for (field, value) in [
        ("cs", 0x23u64),
        ("eflags", 0x3202),
        ("eflags", 0x2),
        ("rip", 0xffff_ffff_8100_0000),
    ] {
        refused_after("thread", |img| {
            let core = std::fs::read_dir(img)
                .expect("image")
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("core-"))
                })
                .expect("a core record");
            edit_record(&core, |c| c["gpr"][field] = serde_json::json!(value));
        });
    }
    // And a reserved header field that is not zero, with the header re-sealed.
    refused_after("reserved", |img| set_header_u32(&img.join("mm.img"), 20, 1));
}

/// Image authentication: an image this host's root dumped carries a MAC (mac.img) and
/// restores; the same image with its credentials edited (to another uid: the fixture runs as
/// root; a user's own image edited to uid 0 is the attack) — every checksum re-sealed,
/// as anyone who reads the documented format can — is refused before anything is created, as
/// is one without its MAC; `--trust-image` takes them as they are.
#[test]
fn an_altered_or_unauthenticated_image_is_refused() {
    if !require_root("an_altered_or_unauthenticated_image_is_refused") {
        return;
    }
    let d = Daemon::start("sleeper", &[]);
    d.dump(1);
    let img = d.image(1);
    assert!(img.join("mac.img").exists(), "the dump sealed the image");
    let core = std::fs::read_dir(&img)
        .expect("image")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("core-"))
        })
        .expect("a core record");
    let original = std::fs::read(&core).expect("core");
    edit_record(&core, |c| {
        c["creds"]["uids"] = serde_json::json!([4242, 4242, 4242, 4242])
    });
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("not authenticated") && e.contains("altered"),
        "{e}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{}", d.pid)).exists(),
        "nothing was created"
    );
    std::fs::write(&core, &original).expect("core");
    let mac = std::fs::read(img.join("mac.img")).expect("mac");
    std::fs::remove_file(img.join("mac.img")).expect("rm mac");
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("carries no MAC"), "{e}");
    let o = stasis(&[
        "restore",
        "-D",
        &img.to_string_lossy(),
        "--detach",
        "--trust-image",
    ]);
    assert!(o.status.success(), "--trust-image: {}", stderr_of(&o));
    // SAFETY: the restored sleeper has the fixture's pid.
    unsafe { libc::kill(d.pid, libc::SIGKILL) };
    wait_gone(d.pid);
    std::fs::write(img.join("mac.img"), mac).expect("mac back");
    d.restore(1);
    assert_pass(&d.finish());
}

/// A name from an image of any length (a 100 000-character path) gives an error line of
/// bounded length, its middle left out and said so.
#[test]
fn a_huge_name_in_an_image_gives_a_short_error() {
    if !require_root("a_huge_name_in_an_image_gives_a_short_error") {
        return;
    }
    let d = Daemon::start("sleeper", &[]);
    d.dump(1);
    let huge = format!("/{}", "x".repeat(100_000));
    edit_record(&d.image(1).join("files.img"), |f| {
        f["descs"][0]["kind"]["path"] = serde_json::json!(huge);
    });
    let o = stasis(&[
        "restore",
        "-D",
        &d.image(1).to_string_lossy(),
        "-d",
        "--trust-image",
    ]);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{}", &e[..e.len().min(300)]);
    assert!(e.len() < 2500, "an error line of {} bytes", e.len());
    assert!(
        e.contains("characters left out"),
        "{}",
        &e[..e.len().min(300)]
    );
}

/// A process of another user, with a file open and another mapped. Between the dump and a
/// root restore that user swaps each name for a symbolic link to a file only root may read:
/// the restore refuses (the process gets no access it lacked). A replacement the user may
/// read is given (it is what the process could open itself); the very files come back as ever.
#[test]
fn a_file_swapped_since_the_dump_is_opened_with_the_process_s_own_rights() {
    if !require_root("a_file_swapped_since_the_dump_is_opened_with_the_process_s_own_rights") {
        return;
    }
    use std::os::unix::process::CommandExt;
    let dir = tempdir::Dir::new("swapped");
    let home = dir.path().join("home");
    let secret = dir.path().join("secret");
    std::fs::create_dir(&home).expect("home");
    std::fs::write(home.join("data.txt"), "the user's data\n").expect("data");
    std::fs::write(home.join("table.bin"), vec![1u8; 8192]).expect("table");
    std::fs::write(&secret, "root's alone\n").expect("secret");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for f in ["", "data.txt", "table.bin"] {
        std::os::unix::fs::chown(home.join(f), Some(65534), Some(65534)).expect("chown");
    }
    let script = r#"
import mmap, os, sys, time
d = sys.argv[1]
f = open(d + '/data.txt')
t = open(d + '/table.bin', 'rb')
m = mmap.mmap(t.fileno(), 8192, prot=mmap.PROT_READ)
t.close()
open(d + '/pid', 'w').write(str(os.getpid()))
while True:
    time.sleep(1)
"#;
    let start = || {
        let mut c = std::process::Command::new("/usr/bin/python3");
        c.args(["-c", script])
            .arg(&home)
            .uid(65534)
            .gid(65534)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                libc::setsid();
                Ok(())
            });
        }
        let _ = std::fs::remove_file(home.join("pid"));
        let child = c.spawn().expect("python3 as nobody");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !home.join("pid").exists() {
            assert!(std::time::Instant::now() < deadline, "python did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child
    };
    let mut child = start();
    let pid = child.id() as i32;
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    wait_gone(pid);
    let restore = || stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    let kill = |pid: i32| {
        // SAFETY: killing the process we restored.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_gone(pid);
    };
    for name in ["data.txt", "table.bin"] {
        let real = home.join(name);
        let kept = dir.path().join(format!("{name}.kept"));
        std::fs::rename(&real, &kept).expect("rename");
        std::os::unix::fs::symlink(&secret, &real).expect("symlink");
        let o = restore();
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(1), "swapped {name}: {e}");
        assert!(
            e.contains("cannot open it itself") && e.contains(name),
            "swapped {name}: {e}"
        );
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        // A replacement the user may read: given, as the process could open it itself.
        std::fs::remove_file(&real).expect("unlink");
        std::fs::copy(&kept, &real).expect("copy");
        std::os::unix::fs::chown(&real, Some(65534), Some(65534)).expect("chown");
        let o = restore();
        assert!(o.status.success(), "replaced {name}: {}", stderr_of(&o));
        kill(pid);
        // The very file: as ever.
        std::fs::remove_file(&real).expect("unlink");
        std::fs::rename(&kept, &real).expect("rename back");
    }
    let o = restore();
    assert!(o.status.success(), "the very files: {}", stderr_of(&o));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    assert!(status.contains("Uid:\t65534"), "{status}");
    kill(pid);
}

/// A timed futex wait that an earlier stop interrupted is resumed by the kernel through
/// `restart_syscall`, whose state dies with the task. Dumped while it waits there (after
/// `stasis vdso` stopped it once), the restored thread must wait again and time out
/// (ETIMEDOUT), not fail with EINTR.
#[test]
fn a_wait_resumed_after_an_earlier_stop_waits_again_after_restore() {
    if !require_root("a_wait_resumed_after_an_earlier_stop_waits_again_after_restore") {
        return;
    }
    let dir = tempdir::Dir::new("restart-syscall");
    let pidfile = dir.path().join("pid");
    let verdict = dir.path().join("verdict");
    let script = format!(
        r#"import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
class TS(ctypes.Structure):
    _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]
word = ctypes.c_int(0)
ts = TS(3, 0)
open('{p}.tmp', 'w').write(str(os.getpid())); os.rename('{p}.tmp', '{p}')
r = libc.syscall(202, ctypes.byref(word), 0, 0, ctypes.byref(ts), 0, 0)
e = ctypes.get_errno()
open('{v}.tmp', 'w').write('%d %d\n' % (r, e)); os.rename('{v}.tmp', '{v}')
"#,
        p = pidfile.display(),
        v = verdict.display()
    );
    let mut child = python(&script, &pidfile, None, true);
    let pid = child.id() as i32;
    let syscall = || std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !syscall().starts_with("202 ") {
        assert!(
            std::time::Instant::now() < deadline,
            "it never waited: {}",
            syscall()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Stopped and let go once: the wait goes on in restart_syscall.
    let o = stasis(&["vdso", "-t", &pid.to_string()]);
    assert!(o.status.success(), "vdso: {}", stderr_of(&o));
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        syscall().starts_with("219 "),
        "not in restart_syscall: {}",
        syscall()
    );
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    wait_gone(pid);
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let v = loop {
        if let Ok(v) = std::fs::read_to_string(&verdict) {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no verdict (state {})",
            stasis_state(pid)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(
        v.trim(),
        format!("-1 {}", libc::ETIMEDOUT),
        "the restored wait's end"
    );
    wait_gone(pid);
}
