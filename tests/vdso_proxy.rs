//! The vDSO on restore: remap, proxy (forced on this one kernel), and the edge cases CRIU does
//! not handle. Each fixture checks its own state after restore.

mod common;

use common::*;

fn restore_with(d: &Daemon, n: u32, vdso: &str) {
    let img = d.image(n);
    let o = stasis(&[
        "restore",
        "-D",
        &img.to_string_lossy(),
        "--detach",
        "--vdso",
        vdso,
    ]);
    assert!(
        o.status.success(),
        "restore --vdso={vdso} of {} failed: {}",
        d.name,
        stderr_of(&o)
    );
    assert!(
        matches!(stasis_state(d.pid), 'S' | 'R'),
        "restored {} is not running",
        d.name
    );
}

fn maps_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
}

/// Every vDSO function through pointers cached before the dump, against the raw syscalls
/// (clock_getres exact), after a forced proxy; the old [vdso] address holds the proxy.
#[test]
fn proxied_vdso_answers_every_call() {
    if !require_root("proxied_vdso_answers_every_call") {
        return;
    }
    let d = Daemon::start("vdso_calls", &["--proxy"]);
    d.dump(1);
    restore_with(&d, 1, "proxy");
    let maps = maps_of(d.pid);
    assert_eq!(
        maps.matches("[vdso]").count(),
        1,
        "this kernel's vDSO is mapped too, once: {maps}"
    );
    assert_pass(&d.finish());
}

/// Proxied, dumped, proxied again, twice: stasis recognises its own proxy, so nothing piles up.
#[test]
fn proxy_is_repeatable_without_piling_up() {
    if !require_root("proxy_is_repeatable_without_piling_up") {
        return;
    }
    let d = Daemon::start("vdso_calls", &["--proxy"]);
    d.dump(1);
    restore_with(&d, 1, "proxy");
    let first = maps_of(d.pid).lines().count();
    for n in 2..=3 {
        d.dump(n);
        restore_with(&d, n, "proxy");
        let maps = maps_of(d.pid);
        assert_eq!(
            maps.lines().count(),
            first,
            "mappings grew after proxy round {n}:\n{maps}"
        );
        assert_eq!(maps.matches("[vdso]").count(), 1, "{maps}");
    }
    assert_pass(&d.finish());
}

/// A proxied process dumped again and restored on a kernel whose vDSO matches the one it
/// started with gets the real vDSO back at the original addresses.
#[test]
fn proxy_then_remap_comes_full_circle() {
    if !require_root("proxy_then_remap_comes_full_circle") {
        return;
    }
    let d = Daemon::start("vdso_calls", &[]);
    d.dump(1);
    restore_with(&d, 1, "proxy");
    d.dump(2);
    restore_with(&d, 2, "auto");
    let maps = maps_of(d.pid);
    assert!(
        !maps.contains("[anon:stasis-"),
        "no proxy left after the remap: {maps}"
    );
    let before = maps_of_image_vdso(&d, 1);
    for (name, start) in before {
        assert!(
            maps.lines()
                .any(|l| l.starts_with(&format!("{start:x}-")) && l.ends_with(&name)),
            "{name} not back at {start:#x}: {maps}"
        );
    }
    // The fixture (without --proxy) checks the kernel's areas are back at their addresses.
    assert_pass(&d.finish());
}

/// The vDSO areas an image recorded: (name, start).
fn maps_of_image_vdso(d: &Daemon, n: u32) -> Vec<(String, u64)> {
    let bytes = std::fs::read(d.image(n).join("vdso.img")).expect("vdso.img");
    let rec: serde_json::Value = serde_json::from_slice(&bytes[64..]).expect("vdso record");
    rec["areas"]
        .as_array()
        .expect("areas")
        .iter()
        .map(|a| {
            (
                a[0].as_str().unwrap_or_default().to_string(),
                a[1].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// `--vdso=remap` where the vDSOs differ must refuse cleanly, create nothing, and `show`
/// must say a proxy would be used and why. The image's vDSO is made to differ by editing
/// its record (a [vvar] of another size), re-sealing the record's checksums.
#[test]
fn remap_refused_when_impossible_and_show_explains() {
    if !require_root("remap_refused_when_impossible_and_show_explains") {
        return;
    }
    let d = Daemon::start("sleeper", &[]);
    d.dump(1);
    let img = d.image(1);
    edit_record(&img.join("vdso.img"), |rec| {
        let areas = rec["areas"].as_array_mut().expect("areas");
        let vvar = areas
            .iter_mut()
            .find(|a| a[0] == "[vvar]")
            .expect("a [vvar]");
        let start = vvar[1].as_u64().expect("start");
        vvar[2] = serde_json::json!(start + 4096);
    });

    let o = stasis(&["show", &img.to_string_lossy()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        text.contains("proxy") && text.contains("[vvar]"),
        "show must explain the proxy: {text}"
    );
    let o = stasis(&[
        "restore",
        "-D",
        &img.to_string_lossy(),
        "--detach",
        "--vdso",
        "remap",
        // The record was edited here on purpose: its MAC no longer holds.
        "--trust-image",
    ]);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("--vdso=remap is impossible"), "{e}");
    assert!(
        !std::path::Path::new(&format!("/proc/{}", d.pid)).exists(),
        "a process was left behind"
    );
}

/// A thread frozen inside a vDSO function (CRIU issue #512) resumes correctly, remapped and
/// proxied. The fixture calls clock_gettime back to back, so about 60% of dumps catch it
/// inside; rounds alternate remap and proxy until each mode has restored such an image at
/// least once (20 rounds at most: the odds of never catching it are ~1e-4).
#[test]
fn thread_inside_the_vdso_resumes_remapped_and_proxied() {
    if !require_root("thread_inside_the_vdso_resumes_remapped_and_proxied") {
        return;
    }
    let d = Daemon::start("vdso_spin", &[]);
    let (mut remapped, mut proxied) = (0, 0);
    for n in 1..=20u32 {
        let mode = if n % 2 == 0 { "proxy" } else { "auto" };
        let img = d.image(n);
        let o = stasis(&[
            "dump",
            "-t",
            &d.pid.to_string(),
            "-D",
            &img.to_string_lossy(),
            "-v",
        ]);
        assert!(o.status.success(), "{}", stderr_of(&o));
        let caught = stderr_of(&o).contains("stepped out of the vDSO");
        wait_gone(d.pid);
        restore_with(&d, n, mode);
        match (caught, mode) {
            (true, "proxy") => proxied += 1,
            (true, _) => remapped += 1,
            _ => {}
        }
        if remapped > 0 && proxied > 0 {
            break;
        }
    }
    assert!(
        remapped > 0 && proxied > 0,
        "the thread was never caught inside the vDSO (remap {remapped}, proxy {proxied}): the case was not exercised"
    );
    assert_pass(&d.finish());
}

/// vvar without a vDSO (as valgrind leaves a process; CRIU issue #488) comes back the same.
#[test]
fn vvar_without_vdso_comes_back_faithfully() {
    if !require_root("vvar_without_vdso_comes_back_faithfully") {
        return;
    }
    let d = Daemon::start("vdso_mover", &["--mode", "drop-vdso"]);
    d.dump(1);
    d.restore(1);
    let maps = maps_of(d.pid);
    assert!(!maps.contains("[vdso]"), "a [vdso] appeared: {maps}");
    assert_pass(&d.finish());
}

/// A process that unmapped its vDSO and every vvar area (zdtm vdso02) comes back without them.
#[test]
fn unmapped_vdso_stays_unmapped() {
    if !require_root("unmapped_vdso_stays_unmapped") {
        return;
    }
    let d = Daemon::start("vdso_mover", &["--mode", "unmap"]);
    d.dump(1);
    d.restore(1);
    let maps = maps_of(d.pid);
    assert!(
        !maps.contains("[vdso]") && !maps.contains("[vvar"),
        "{maps}"
    );
    assert_pass(&d.finish());
}

/// A process that moved its vDSO elsewhere comes back with it there.
#[test]
fn moved_vdso_comes_back_where_it_was_moved() {
    if !require_root("moved_vdso_comes_back_where_it_was_moved") {
        return;
    }
    let d = Daemon::start("vdso_mover", &["--mode", "move"]);
    d.dump(1);
    d.restore(1);
    assert_pass(&d.finish());
}
