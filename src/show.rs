//! `stasis show DIR`: what an image holds, checked as thoroughly as a restore would check it.

use anyhow::Result;
use serde::Serialize;
use stasis_image::model::FileKind;

#[derive(Serialize)]
struct Summary<'a> {
    pid: i32,
    comm: String,
    kernel: &'a str,
    created: u64,
    threads: &'a [i32],
    /// The job-control signal that had stopped the process, if it was stopped.
    stopped_by: Option<i32>,
    /// One line per thread: tid, name, uid, where it stopped.
    thread_details: Vec<String>,
    vmas: usize,
    pages: u64,
    page_bytes: u64,
    /// A pre-dump: memory only, a parent for later dumps.
    pre_dump: bool,
    /// Pages taken from parent images (of `pages`), and those images, nearest first.
    parent_pages: u64,
    parents: Vec<String>,
    fds: Vec<String>,
    locks: Vec<String>,
    vdso: Vec<String>,
    vdso_symbols: usize,
    vdso_strategy: String,
    mappings: Vec<String>,
    /// The process tree, one line per process, indented by depth (the root alone for an
    /// image of one process).
    tree: Vec<String>,
}

pub fn show(dir: &std::path::Path, json: bool) -> Result<()> {
    let all = stasis_image::load_tree(dir)?;
    let tree = draw_tree(&all);
    let img = &all.root;
    let pages: u64 = img
        .mm
        .vmas
        .iter()
        .flat_map(|v| &v.pages)
        .map(|r| r.pages)
        .sum();
    let strategy = match stasis_restore::VdsoPlan::decide(&img.vdso, stasis_restore::VdsoMode::Auto)
    {
        Ok(plan) => plan.describe(),
        Err(e) => format!("cannot restore here: {e:#}"),
    };
    let s = Summary {
        pid: img.inventory.pid,
        comm: img.inventory.comm.to_string(),
        kernel: &img.inventory.kernel,
        created: img.inventory.created,
        threads: &img.inventory.threads,
        stopped_by: img.process.job_stop,
        thread_details: img
            .cores
            .iter()
            .map(|c| {
                let in_syscall = (c.gpr.orig_rax as i64) >= 0;
                format!(
                    "{} {:?} uid {} {}",
                    c.tid,
                    c.comm,
                    c.creds.uids[1],
                    if in_syscall {
                        format!("in system call {}", c.gpr.orig_rax)
                    } else {
                        format!("at {:#x}", c.gpr.rip)
                    }
                )
            })
            .collect(),
        vmas: img.mm.vmas.len(),
        pages,
        page_bytes: img.pages.data_len(),
        pre_dump: img.inventory.pre_dump,
        parent_pages: img
            .mm
            .vmas
            .iter()
            .flat_map(|v| &v.pages)
            .filter(|r| r.src != 0)
            .map(|r| r.pages)
            .sum(),
        parents: img
            .inventory
            .parents
            .iter()
            .map(|p| {
                format!(
                    "{} (image {}, {} pages)",
                    p.dir,
                    p.image_id,
                    p.page_data_len / 4096
                )
            })
            .collect(),
        fds: img
            .files
            .fds
            .iter()
            .map(|f| {
                let desc = img.files.desc(f.desc);
                format!(
                    "{}{}: #{} {}",
                    f.fd,
                    if f.cloexec { " (cloexec)" } else { "" },
                    f.desc,
                    desc.map_or("?".into(), |d| match &d.kind {
                        FileKind::Socket(s) => format!("{s} flags {:#o}", d.flags),
                        k => format!("{k:?} flags {:#o} pos {}", d.flags, d.pos),
                    })
                )
            })
            .collect(),
        locks: img.files.locks.iter().map(|l| l.to_string()).collect(),
        vdso: img
            .vdso
            .areas
            .iter()
            .map(|a| format!("{} {:#x}-{:#x}", a.0, a.1, a.2))
            .collect(),
        vdso_symbols: img.vdso.symbols.len(),
        vdso_strategy: strategy,
        mappings: img
            .mm
            .vmas
            .iter()
            .map(|v| {
                format!(
                    "{:#014x}-{:#014x} {} {} pages {}",
                    v.start,
                    v.end,
                    stasis_proc::prot_string(v.prot),
                    v.pages.iter().map(|r| r.pages).sum::<u64>(),
                    v.name
                )
            })
            .collect(),
        tree,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "image of pid {} ({}) made under kernel {}",
        s.pid, s.comm, s.kernel
    );
    if s.pre_dump {
        println!(
            "  a pre-dump: memory only, the parent of the dumps after it (not restored itself)"
        );
    }
    if let Some(sig) = s.stopped_by {
        println!("  stopped by job control (signal {sig}): comes back stopped");
    }
    if s.tree.len() > 1 {
        println!(
            "  process tree ({} processes; this image describes the first):",
            s.tree.len()
        );
        for t in &s.tree {
            println!("    {t}");
        }
    }
    println!("  threads: {}", s.threads.len());
    for t in &s.thread_details {
        println!("    {t}");
    }
    println!(
        "  memory: {} VMAs, {} pages dumped ({:.1} MiB of page data)",
        s.vmas,
        s.pages,
        s.page_bytes as f64 / (1 << 20) as f64
    );
    if !s.parents.is_empty() {
        println!(
            "  {} of the pages are unchanged since, and read from, the parent images:",
            s.parent_pages
        );
        for p in &s.parents {
            println!("    {p}");
        }
    }
    for m in &s.mappings {
        println!("    {m}");
    }
    println!("  files (fd: #open file description):");
    for f in &s.fds {
        println!("    {f}");
    }
    if !s.locks.is_empty() {
        println!("  file locks:");
        for l in &s.locks {
            println!("    {l}");
        }
    }
    println!("  vDSO: {} ({} symbols)", s.vdso.join(", "), s.vdso_symbols);
    println!("  restore here: {}", s.vdso_strategy);
    Ok(())
}

/// One line per process, each child under its parent, indented by depth.
fn draw_tree(all: &stasis_image::TreeImage) -> Vec<String> {
    fn line(img: &stasis_image::Image, depth: usize) -> String {
        let pr = &img.process;
        let n = img.cores.len();
        format!(
            "{}{} {} (group {}, session {}, {n} thread{}{})",
            "  ".repeat(depth),
            img.inventory.pid,
            img.inventory.comm,
            pr.pgid,
            pr.sid,
            if n == 1 { "" } else { "s" },
            if pr.job_stop.is_some() {
                ", stopped"
            } else {
                ""
            }
        )
    }
    fn below(all: &stasis_image::TreeImage, parent: i32, depth: usize, out: &mut Vec<String>) {
        for z in all.zombies.iter().filter(|z| z.ppid == parent) {
            out.push(format!(
                "{}{} (zombie, wait status {:#x}; group {}, session {})",
                "  ".repeat(depth),
                z.pid,
                z.status,
                z.pgid,
                z.sid
            ));
        }
        for (t, img) in all.tasks.iter().filter(|(t, _)| t.ppid == parent) {
            out.push(line(img, depth));
            below(all, t.pid, depth + 1, out);
        }
    }
    let mut out = vec![line(&all.root, 0)];
    below(all, all.root.inventory.pid, 1, &mut out);
    out
}
