//! The restorer's plan for one task, in the order the kernel needs it: the new task's own
//! mappings go, the vDSO moves into place, every dumped VMA is mapped and filled, then mm
//! fields, the other threads, the leader's per-thread and the process-wide state, file locks,
//! and credentials last. Each step's system calls
//! come from the module that knows that resource (`mm`, `vdso`); this file only orders them.

use crate::fds::{same_file, Helpers};
use crate::plan::{Arg::D, Arg::V, Plan};
use crate::vdso::{free_range_in, VdsoPlan};
use crate::{mm, thread, vdso};
use anyhow::{bail, Result};
use stasis_abi::{EXPECT_ANY, EXPECT_ARG4, EXPECT_OK};
use stasis_image::model::*;
use stasis_image::Image;

/// The leader's work, in two plans: `before` maps everything; the host then fills the memory
/// registered with the userfaultfd (`host_runs`, if any); `after` does the rest.
pub(crate) struct Rebuild {
    pub before: Plan,
    pub host_runs: Vec<PageRun>,
    /// With `--lazy-pages`: the runs left registered for the lazy server (`lazy.rs`).
    pub lazy_runs: Vec<PageRun>,
    pub after: Plan,
}

pub(crate) fn build(
    img: &Image,
    h: &Helpers,
    vdso: &VdsoPlan,
    child_maps: &[stasis_proc::Vma],
    child_rseq: Option<(u64, u32, u32)>,
    fill: mm::Fill,
    lazy: bool,
) -> Result<Rebuild> {
    let mut p = Plan::new();
    // 1. The child's rseq area is about to disappear: unregister it first, or the kernel
    //    would fault writing the cpu id into unmapped memory on the next return to user.
    if let Some((addr, len, sig)) = child_rseq {
        p.op(
            libc::SYS_rseq,
            [V(addr), V(len as u64), V(1), V(sig as u64), V(0), V(0)],
            EXPECT_OK,
            "unregister the new task's rseq",
        );
    }
    // 2. Unmap the child's own memory (it was a copy of stasis), all but the vDSO set.
    for v in child_maps {
        if stasis_abi::is_vdso_area_name(&v.name) || v.name == b"[vsyscall]" {
            continue;
        }
        p.op(
            libc::SYS_munmap,
            [V(v.start), V(v.len()), V(0), V(0), V(0), V(0)],
            EXPECT_OK,
            format!("unmap stasis's {v}"),
        );
    }
    // 3. The vDSO: each special mapping moves whole, first to a scratch range (targets may
    //    overlap where another runtime area still is), then to its dumped address.
    match vdso {
        VdsoPlan::Remap { moves, drop } => {
            for (s, e) in drop {
                p.op(
                    libc::SYS_munmap,
                    [V(*s), V(e - s), V(0), V(0), V(0), V(0)],
                    EXPECT_OK,
                    "unmap the runtime [vdso] (the process had none)",
                );
            }
            let span: u64 = moves.iter().map(|m| m.2).sum();
            let mut busy: Vec<(u64, u64)> = img.mm.vmas.iter().map(|v| (v.start, v.end)).collect();
            busy.extend(child_maps.iter().map(|v| (v.start, v.end)));
            let scratch = free_range_in(&mut busy, span)?;
            p.reserved.push((scratch, scratch + span));
            let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
            let mut at = scratch;
            for (name, from, len, _) in moves {
                p.op(
                    libc::SYS_mremap,
                    [V(*from), V(*len), V(*len), V(flags), V(at), V(0)],
                    EXPECT_ARG4,
                    format!("move {name} aside"),
                );
                at += len;
            }
            let mut at = scratch;
            for (name, _, len, to) in moves {
                p.op(
                    libc::SYS_mremap,
                    [V(at), V(*len), V(*len), V(flags), V(*to), V(0)],
                    EXPECT_ARG4,
                    format!("move {name} to {to:#x}"),
                );
                at += len;
            }
        }
        VdsoPlan::Proxy { runtime, .. } => vdso::proxy(&mut p, img, runtime, child_maps)?,
        VdsoPlan::Unmap { areas } => {
            for (s, e) in areas {
                p.op(
                    libc::SYS_munmap,
                    [V(*s), V(e - s), V(0), V(0), V(0), V(0)],
                    EXPECT_OK,
                    "unmap the runtime vDSO (the process had none)",
                );
            }
        }
    }
    // 4. Every dumped VMA, its pages, its final protection. Private anonymous memory is
    //    filled by the host between the two plans, when the task has a userfaultfd.
    for v in &img.mm.vmas {
        mm::map_vma(&mut p, v, h, fill)?;
    }
    let before = std::mem::replace(&mut p, Plan::new());
    let mut host_runs = Vec::new();
    let mut lazy_runs = Vec::new();
    for v in img.mm.vmas.iter().filter(|v| mm::host_fills(v, fill)) {
        // Locked memory is filled at once (mlock would fault it all in, waiting on pages
        // nobody serves yet); the rest, lazily, stays registered.
        let lazily = lazy && v.advice & ADVICE_LOCKED == 0;
        if lazily {
            lazy_runs.extend(v.pages.iter().copied());
        } else {
            host_runs.extend(v.pages.iter().copied());
        }
        mm::after_host_fill(&mut p, v, fill, lazily);
    }
    // 5. mm fields (code/data/brk/stack/args/env), auxv and the exe link in one call.
    let f = &img.mm.fields;
    let auxv = p.put_u64s(&img.mm.auxv);
    let mut map = vec![
        f.start_code,
        f.end_code,
        f.start_data,
        f.end_data,
        f.start_brk,
        f.brk,
        f.start_stack,
        f.arg_start,
        f.arg_end,
        f.env_start,
        f.env_end,
        0,
    ];
    let auxv_size = (img.mm.auxv.len() * 8) as u64;
    // The kernel refuses to replace the exe link while the old exe is still mapped (EBUSY).
    // When the dumped program is the very binary the new task started as (stasis), the
    // link is already right: pass -1 to leave it.
    let exe_fd = if same_file(img.mm.exe.as_path(), std::path::Path::new("/proc/self/exe")) {
        u32::MAX
    } else {
        h.exe_fd as u32
    };
    map.push(auxv_size | ((exe_fd as u64) << 32));
    let map_arg = p.put_u64s(&map);
    let D(map_off) = map_arg else {
        unreachable!("put returns data")
    };
    let D(auxv_off) = auxv else {
        unreachable!("put returns data")
    };
    p.fixups.push((map_off + 11 * 8, auxv_off));
    p.op(
        libc::SYS_prctl,
        [
            V(libc::PR_SET_MM as u64),
            V(libc::PR_SET_MM_MAP as u64),
            map_arg,
            V(13 * 8),
            V(0),
            V(0),
        ],
        EXPECT_OK,
        "PR_SET_MM_MAP (mm fields, auxv, exe)",
    );
    // 6. The other threads, with their tids: they start traced and stopped (the host traces
    //    clones) and run their own plans (`thread::plan`) once this one is done. They exist
    //    before the timers, which may be aimed at one of them (SIGEV_THREAD_ID).
    for c in &img.cores[1..] {
        thread::create(&mut p, c.tid);
    }
    // 7. The leader's own per-thread state.
    thread::own_state(&mut p, img.inventory.pid, img.leader());
    // 8. Process-wide state: timers, pending signals, limits.
    let pr = &img.process;
    for (which, t) in pr.itimers.iter().enumerate() {
        if t.value_sec != 0 || t.value_usec != 0 {
            let tv = p.put_u64s(&[
                t.interval_sec as u64,
                t.interval_usec as u64,
                t.value_sec as u64,
                t.value_usec as u64,
            ]);
            p.op(
                libc::SYS_setitimer,
                [V(which as u64), tv, V(0), V(0), V(0), V(0)],
                EXPECT_OK,
                format!("setitimer {which}"),
            );
        }
    }
    posix_timers(&mut p, &pr.posix_timers)?;
    let pid = img.inventory.pid as u64;
    for s in &pr.shared_pending {
        let info = p.put(&s.siginfo);
        p.op(
            libc::SYS_rt_sigqueueinfo,
            [V(pid), V(s.signo as u64), info, V(0), V(0), V(0)],
            EXPECT_OK,
            format!("queue pending signal {}", s.signo),
        );
    }
    for l in &pr.rlimits {
        let r = p.put_u64s(&[l.cur, l.max]);
        p.op(
            libc::SYS_prlimit64,
            [V(0), V(l.resource as u64), r, V(0), V(0), V(0)],
            EXPECT_OK,
            format!("rlimit {}", l.resource),
        );
    }
    if pr.child_subreaper {
        p.op(
            libc::SYS_prctl,
            [
                V(libc::PR_SET_CHILD_SUBREAPER as u64),
                V(1),
                V(0),
                V(0),
                V(0),
                V(0),
            ],
            EXPECT_OK,
            "child subreaper",
        );
    }
    // The flock a mapping holds, through the mapping's descriptor, before it is closed.
    crate::files::lock::take_back_mapped(&mut p, &img.files.mapped_locks, h)?;
    // 9. Close the helpers and the handshake pipe.
    for fd in h.numbers().into_iter().filter(|&fd| fd != h.ready_fd) {
        p.op(
            libc::SYS_close,
            [V(fd as u64), V(0), V(0), V(0), V(0), V(0)],
            EXPECT_ANY,
            format!("close helper fd {fd}"),
        );
    }
    // 10. File locks, now that no descriptor of the task will be closed any more.
    crate::files::lock::take_back(&mut p, &img.files.locks);
    // 10b. Named files at an offset are positioned again, now that the process's state is
    // back: a generated file (/proc/locks, /proc/self/maps) read half-way through keeps its
    // place in records as well as bytes, and seq_file counts records when it is seeked. The
    // host's seek at open was made while the text was the restorer's, not the process's; a
    // seek to 0 first makes the kernel count again. For an ordinary file it is the same offset.
    reposition_named(&mut p, &img.files);
    // 11. Credentials last: dropping them earlier would forbid the calls above.
    thread::credentials(&mut p, img.leader(), pr.dumpable);
    thread::parent_death_signal(&mut p, img.leader());
    Ok(Rebuild {
        before,
        host_runs,
        lazy_runs,
        after: p,
    })
}

fn reposition_named(p: &mut Plan, files: &Files) {
    let mut done = std::collections::HashSet::new();
    for f in &files.fds {
        let Some(d) = files.desc(f.desc) else {
            continue;
        };
        if !matches!(d.kind, FileKind::Path { .. }) || d.pos == 0 || !done.insert(f.desc) {
            continue;
        }
        for pos in [0, d.pos] {
            // The host's seek at open already set this offset or met a file that cannot
            // seek (ESPIPE, O_PATH), which fails both of these calls alike.
            p.op(
                libc::SYS_lseek,
                [
                    V(f.fd as u64),
                    V(pos),
                    V(libc::SEEK_SET as u64),
                    V(0),
                    V(0),
                    V(0),
                ],
                EXPECT_ANY,
                format!("position fd {} at {pos}", f.fd),
            );
        }
    }
}

/// POSIX timers with their old ids. With PR_TIMER_CREATE_RESTORE_IDS (6.15+) each
/// timer_create takes the id it is given; before, ids come in sequence from 0 in the new
/// task, so fillers are created to reach each id and deleted afterwards.
fn posix_timers(p: &mut Plan, timers: &[PosixTimer]) -> Result<()> {
    const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
    if timers.is_empty() {
        return Ok(());
    }
    let mut sorted = timers.to_vec();
    sorted.sort_by_key(|t| t.id);
    // SAFETY: querying the setting for ourselves (GET = 2) changes nothing.
    let by_id = unsafe { libc::prctl(PR_TIMER_CREATE_RESTORE_IDS as i32, 2, 0, 0, 0) } >= 0;
    if by_id {
        p.op(
            libc::SYS_prctl,
            [V(PR_TIMER_CREATE_RESTORE_IDS), V(1), V(0), V(0), V(0), V(0)],
            EXPECT_OK,
            "timer ids: restore mode on",
        );
    }
    let mut next = 0i32;
    let mut fillers = Vec::new();
    for t in &sorted {
        if !by_id {
            if t.id < next {
                bail!("POSIX timer ids out of order");
            }
            while next < t.id {
                // SIGEV_NONE filler to advance the kernel's id counter.
                let sev = p.put_u64s(&[0, 1u64 << 32, 0, 0, 0, 0, 0, 0]);
                let slot = p.put(&[0u8; 8]);
                p.op(
                    libc::SYS_timer_create,
                    [V(libc::CLOCK_MONOTONIC as u64), sev, slot, V(0), V(0), V(0)],
                    EXPECT_OK,
                    format!("filler timer {next}"),
                );
                fillers.push(next);
                next += 1;
            }
            next = t.id + 1;
        }
        // struct sigevent: sigev_value, sigev_signo, sigev_notify, sigev_notify_thread_id.
        let sev = p.put_u64s(&[
            t.sigval,
            (t.signo as u32 as u64) | ((t.notify as u32 as u64) << 32),
            t.tid as u32 as u64,
            0,
            0,
            0,
            0,
            0,
        ]);
        let slot = p.put(&(t.id as i64).to_le_bytes());
        p.op(
            libc::SYS_timer_create,
            [V(t.clock as u64), sev, slot, V(0), V(0), V(0)],
            EXPECT_OK,
            format!("create POSIX timer {}", t.id),
        );
        if t.value_sec != 0 || t.value_nsec != 0 {
            let its = p.put_u64s(&[
                t.interval_sec as u64,
                t.interval_nsec as u64,
                t.value_sec as u64,
                t.value_nsec as u64,
            ]);
            p.op(
                libc::SYS_timer_settime,
                [V(t.id as u64), V(0), its, V(0), V(0), V(0)],
                EXPECT_OK,
                format!("arm POSIX timer {}", t.id),
            );
        }
    }
    for id in fillers {
        p.op(
            libc::SYS_timer_delete,
            [V(id as u64), V(0), V(0), V(0), V(0), V(0)],
            EXPECT_OK,
            format!("delete filler timer {id}"),
        );
    }
    if by_id {
        p.op(
            libc::SYS_prctl,
            [V(PR_TIMER_CREATE_RESTORE_IDS), V(0), V(0), V(0), V(0), V(0)],
            EXPECT_OK,
            "timer ids: restore mode off",
        );
    }
    Ok(())
}
