//! `cargo xtask test --cross-kernel`: images made under one kernel, restored under another.
//!
//! A statically linked stasis and the static `vdso_calls` and `threads` fixtures go into one
//! work directory
//! per cell (`target/cross-kernel/<cell>/`), which is also the `--share` directory of the QEMU
//! guests (`run-in-kernel.sh` unpacks it at the same absolute path and copies new files back).
//! The same two shell scripts run on the host (dash) and in the guests (busybox sh):
//!
//! - `dump.sh SHARE [FLAGS]`: start the fixture as a daemon, wait for its pid file, dump it
//!   into `SHARE/img` (which kills it). A guest runs it with `--first-pid N`, N the start of a
//!   window of pids free on this machine and last reached by its pid counter, so the pids are
//!   free when the image is restored here.
//! - `restore.sh SHARE`: wait until the dumped pid is free, `stasis show` (the vDSO strategy),
//!   `stasis restore --detach`, let it run a second, SIGTERM it and wait for its verdict.
//!
//! The fixture calls every vDSO function through pointers it cached before the dump and
//! compares with the raw system calls; `--proxy` (image and restore kernels differ) makes it
//! also require stasis's vDSO proxy at the old `[vdso]` address. Beside it, in `mt/`, the
//! multi-threaded `threads` fixture (4 threads, each with its own registers, altstack, mask,
//! pending signal, scheduling, blocked in futex/nanosleep/read/poll/epoll) makes the same trip,
//! and in `pt/` the `tree` fixture: five processes with their groups, sessions, a pipe and a
//! file description shared across fork, dumped and restored as one tree. Kernels come from
//! `../shared/tools/fetch-kernel.sh` (cached in `$XKERNEL_CACHE` or `~/.cache/xkernel`).

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where a step runs: this machine's own kernel, or a guest booted with a Debian kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Host,
    Guest(&'static str),
}

/// The matrix: (image made under, restored under).
const MATRIX: &[(Kernel, Kernel)] = &[
    (Kernel::Guest("6.1"), Kernel::Guest("6.1")),
    (Kernel::Host, Kernel::Guest("6.1")),
    (Kernel::Host, Kernel::Guest("7.3")),
    (Kernel::Guest("6.1"), Kernel::Host),
    (Kernel::Guest("7.3"), Kernel::Guest("6.12")),
    (Kernel::Guest("6.12"), Kernel::Guest("7.3")),
];

/// run-in-kernel.sh's own guest timeout, and ours around it (the harness's boot and copies).
const GUEST_TIMEOUT: u64 = 180;
const STEP_TIMEOUT: Duration = Duration::from_secs(GUEST_TIMEOUT + 60);
/// How many pids, from the first, a guest that dumps may use (its script, the fixtures and
/// their threads and children, stasis, the harness's own commands).
const GUEST_PID_WINDOW: u32 = 400;
/// A guest's pid_max (the kernel's default for a few CPUs): its first pid stays below it.
const GUEST_PID_MAX: u32 = 32768;
/// The first pid for a guest that dumps: the start of a window of pids that no process on this
/// machine holds and that this machine's pid counter reaches last (just behind it), so the
/// image's pids are still free when it is restored here. (A fixed number was not: CI's own
/// shell once held a pid of the window when the cell 6.1 → host restored.)
fn guest_first_pid() -> u32 {
    let read = |f: &str| {
        std::fs::read_to_string(f)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
    };
    let last = read("/proc/sys/kernel/ns_last_pid").unwrap_or(0);
    let top = read("/proc/sys/kernel/pid_max")
        .unwrap_or(GUEST_PID_MAX)
        .min(GUEST_PID_MAX)
        - GUEST_PID_WINDOW
        - 1;
    let low = 1000;
    let span = top - low;
    let free =
        |s: u32| (s..s + GUEST_PID_WINDOW).all(|p| !Path::new(&format!("/proc/{p}")).exists());
    // Walk backwards from just behind the counter, wrapping within [low, top].
    let behind = last.saturating_sub(2 * GUEST_PID_WINDOW).clamp(low, top);
    (0..span / 64)
        .map(|k| low + (behind - low + span - (k * 64) % span) % span)
        .find(|&s| free(s))
        .unwrap_or(low)
}

/// At most this many CPUs in a guest (TCG runs one host thread per guest CPU).
const GUEST_MAX_CPUS: usize = 4;
/// glibc hardware capabilities that some hosts have and no guest CPU (QEMU TCG) does: glibc
/// picks its string functions by CPU at start-up, so a host-made image would run them in the
/// guest. (host /proc/cpuinfo flag, glibc's names for it.)
const HOST_ONLY_CAPS: &[(&str, &str)] = &[
    (
        "avx512f",
        "-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX512ER,-AVX512PF",
    ),
    // Transactional memory: glibc's *_rtm variants execute xtest, which TCG lacks.
    ("rtm", "-RTM"),
];

/// The GLIBC_TUNABLES that keep a host fixture to what the guests offer, if any is needed.
fn glibc_mask(host_flags: &[String]) -> Option<String> {
    let masked: Vec<&str> = HOST_ONLY_CAPS
        .iter()
        .filter(|(flag, _)| host_flags.iter().any(|f| f == flag))
        .map(|(_, caps)| *caps)
        .collect();
    (!masked.is_empty()).then(|| format!("glibc.cpu.hwcaps={}", masked.join(",")))
}
/// Lines of a failing step's output shown under the matrix.
const TAIL_LINES: usize = 40;

const DUMP_SH: &str = r#"# dump.sh SHARE [FIXTURE FLAGS]: start vdso_calls (in SHARE), the multi-threaded
# threads fixture (in SHARE/mt) and the tree fixture (in SHARE/pt), dump each into its img/
# (which kills it).
S=$1; shift
cd "$S" || exit 1
# One image key for the cell, made by the harness: the images are sealed with it in one
# kernel and checked with it in the other, as two machines sharing a key would.
export STASIS_KEY_FILE="$S/image.key"
fail() { echo "== FAIL: $*"; exit 1; }
echo "== dump under kernel $(uname -r); uptime $(cut -d' ' -f1 /proc/uptime) s"
# tree_pids PID: PID and every descendant, one per line
tree_pids() {
	echo "$1"
	for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do tree_pids "$c"; done
}
# dump_one DIR FIXTURE [FLAGS]
dump_one() {
	D=$1; F=$2; shift 2
	rm -rf "$D/img" "$D/pid" "$D/out"
	mkdir -p "$D/img" || fail "cannot create $D/img"
	"$S/$F" --pidfile "$D/pid" --out "$D/out" --daemon "$@" || fail "$F did not start (rc $?)"
	i=0
	while [ ! -s "$D/pid" ]; do
		i=$((i + 1)); [ $i -le 300 ] || fail "no pid file from $F after 30 s"
		sleep 0.1
	done
	PID=$(cat "$D/pid")
	echo "== $F pid $PID"
	sleep 0.5
	[ -d "/proc/$PID" ] || fail "$F (pid $PID) died before the dump: $(cat "$D/out" 2>/dev/null)"
	tree_pids "$PID" > "$D/pids"
	./stasis -v dump -t "$PID" -D "$D/img" || fail "stasis dump of $F failed (rc $?)"
	echo "== dump of $F OK; uptime $(cut -d' ' -f1 /proc/uptime) s"
}
dump_one "$S" vdso_calls "$@"
dump_one "$S/mt" threads --threads 4 --strict-epoll
dump_one "$S/pt" tree --dir "$S/pt"
"#;

const RESTORE_SH: &str = r#"# restore.sh SHARE: restore both images, let them run, SIGTERM them, print the verdicts.
S=$1
cd "$S" || exit 1
export STASIS_KEY_FILE="$S/image.key"
fail() { echo "== FAIL: $*"; exit 1; }
echo "== restore under kernel $(uname -r); uptime $(cut -d' ' -f1 /proc/uptime) s"
# restore_one DIR FIXTURE: restore DIR/img; leaves PID set
restore_one() {
	D=$1; F=$2
	PID=$(cat "$D/pid" 2>/dev/null)
	[ -n "$PID" ] || fail "no pid file from the dump of $F"
	rm -f "$D/out"
	# A killed process stays a zombie until its parent (init) reaps it.
	for P in $(cat "$D/pids" 2>/dev/null || echo "$PID"); do
		i=0
		while [ -d "/proc/$P" ]; do
			i=$((i + 1)); [ $i -le 100 ] || fail "pid $P is still in use here ($(cat /proc/$P/comm 2>/dev/null))"
			sleep 0.1
		done
	done
	./stasis show "$D/img" || echo "== stasis show failed (rc $?)"
	./stasis -v restore -D "$D/img" --detach || fail "stasis restore of $F failed (rc $?)"
	echo "== restored $F, pid $PID"
}
# verdict_of DIR FIXTURE PID: SIGTERM (unless it already answered), wait, print, 0 if PASS
verdict_of() {
	D=$1; F=$2; P=$3
	if [ ! -s "$D/out" ]; then
		[ -d "/proc/$P" ] || { sleep 0.5; [ -s "$D/out" ] || { dmesg | tail -n 5; fail "the restored $F (pid $P) is gone, without a verdict"; }; }
	fi
	[ -s "$D/out" ] || kill -TERM "$P" || fail "kill -TERM $P failed"
	i=0
	while [ ! -s "$D/out" ]; do
		i=$((i + 1)); [ $i -le 200 ] || fail "no verdict from $F 20 s after SIGTERM"
		sleep 0.1
	done
	echo "== verdict of $F: $(cat "$D/out")"
	case $(cat "$D/out") in PASS:*) return 0 ;; *) return 1 ;; esac
}
restore_one "$S" vdso_calls; P1=$PID
restore_one "$S/mt" threads; P2=$PID
restore_one "$S/pt" tree; P3=$PID
sleep 1
verdict_of "$S" vdso_calls "$P1"; R1=$?
verdict_of "$S/mt" threads "$P2"; R2=$?
verdict_of "$S/pt" tree "$P3"; R3=$?
[ $R1 -eq 0 ] && [ $R2 -eq 0 ] && [ $R3 -eq 0 ]
"#;

struct Setup {
    tools: PathBuf,
    work: PathBuf,
    stasis: PathBuf,
    fixture: PathBuf,
    /// The static multi-threaded fixture (`threads`), run beside `fixture` in every cell.
    threads_fixture: PathBuf,
    /// The static process-tree fixture (`tree`), likewise.
    tree_fixture: PathBuf,
    host_release: String,
    /// QEMU's `--cpu` for the guests, when the default does not suit this host.
    guest_cpu: Option<String>,
    /// The guests' CPU count: this host's, up to GUEST_MAX_CPUS (the fixture checks getcpu
    /// against the CPU count it saw before the dump).
    guest_cpus: usize,
    host_cpus: usize,
    /// This host has AVX-512, which QEMU's TCG guests lack.
    /// GLIBC_TUNABLES for host fixtures that will be restored in a guest.
    host_glibc_mask: Option<String>,
    /// Guest version → (kernel directory, its release).
    guests: Vec<(&'static str, PathBuf, String)>,
}

impl Setup {
    fn guest(&self, v: &str) -> &(&'static str, PathBuf, String) {
        self.guests
            .iter()
            .find(|g| g.0 == v)
            .expect("every guest kernel of the matrix was fetched")
    }

    fn release(&self, k: Kernel) -> &str {
        match k {
            Kernel::Host => &self.host_release,
            Kernel::Guest(v) => &self.guest(v).2,
        }
    }

    fn label(&self, k: Kernel) -> String {
        match k {
            Kernel::Host => format!("host {}", self.host_release),
            Kernel::Guest(_) => self.release(k).to_string(),
        }
    }
}

/// How one step (a dump or a restore) ended, with everything it printed.
struct Step {
    ok: bool,
    /// Why it failed (empty when it did not).
    reason: String,
    output: String,
    elapsed: Duration,
}

struct Cell {
    from: Kernel,
    to: Kernel,
    dir: PathBuf,
    strategy: String,
    pass: bool,
    reason: String,
    /// The failing step: its name and output.
    failed: Option<(String, String)>,
}

pub fn run() -> Result<()> {
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the cross-kernel test needs root (ptrace of any process, QEMU set-up)");
    }
    let setup = prepare()?;
    if let Some(cpu) = &setup.guest_cpu {
        println!("== guest CPU: {cpu} (this host has no protection keys)");
    }
    if let Some(mask) = &setup.host_glibc_mask {
        println!("== host fixtures start with GLIBC_TUNABLES={mask} (CPU features no guest has)");
    }
    println!(
        "== guests get {} CPUs (this host has {})",
        setup.guest_cpus, setup.host_cpus
    );
    // STASIS_CROSS_ONLY=6.1-to-6.1,host-to-7.3: only those cells (for debugging).
    let only = std::env::var("STASIS_CROSS_ONLY").unwrap_or_default();
    let matrix: Vec<(Kernel, Kernel)> = MATRIX
        .iter()
        .copied()
        .filter(|&(a, b)| only.is_empty() || only.split(',').any(|c| c == cell_name(a, b)))
        .collect();
    if matrix.is_empty() {
        bail!("STASIS_CROSS_ONLY={only} names no cell of the matrix");
    }
    let mut cells = Vec::new();
    for (i, &(from, to)) in matrix.iter().enumerate() {
        println!(
            "== [{}/{}] image made under {} → restored under {}",
            i + 1,
            matrix.len(),
            setup.label(from),
            setup.label(to)
        );
        let cell = run_cell(&setup, from, to)?;
        println!(
            "   {}{}",
            if cell.pass { "PASS" } else { "FAIL" },
            if cell.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", cell.reason)
            }
        );
        cells.push(cell);
    }
    print_matrix(&setup, &cells);
    for c in cells.iter().filter(|c| !c.pass) {
        if let Some((step, output)) = &c.failed {
            println!(
                "\n== {} → {}: last lines of the {step} (all of it: {}/{step}.log)",
                setup.label(c.from),
                setup.label(c.to),
                c.dir.display()
            );
            let lines: Vec<&str> = output.lines().collect();
            for l in &lines[lines.len().saturating_sub(TAIL_LINES)..] {
                println!("   | {l}");
            }
        }
    }
    let failed = cells.iter().filter(|c| !c.pass).count();
    println!(
        "\ncross-kernel: {} passed, {failed} failed in {:.0} s (work dirs under {})",
        cells.len() - failed,
        started.elapsed().as_secs_f64(),
        setup.work.display()
    );
    if failed > 0 {
        bail!("{failed} cross-kernel cell(s) failed");
    }
    Ok(())
}

/// Builds the static binaries and finds the kernels.
fn prepare() -> Result<Setup> {
    let root = crate::repo_root();
    let tools = match std::env::var_os("STASIS_XKERNEL_TOOLS") {
        Some(p) => PathBuf::from(p),
        None => root
            .parent()
            .context("the repository has no parent directory")?
            .join("shared/tools"),
    };
    for t in ["fetch-kernel.sh", "run-in-kernel.sh"] {
        if !tools.join(t).is_file() {
            bail!(
                "{} not found: the cross-kernel tools are expected in {} (a sibling `shared/tools` \
                 of the repository, or set STASIS_XKERNEL_TOOLS)",
                tools.join(t).display(),
                tools.display()
            );
        }
    }
    let work = root.join("target/cross-kernel");
    std::fs::create_dir_all(&work)?;

    println!("== building a static stasis");
    let target = "x86_64-unknown-linux-gnu";
    let mut b = crate::cargo();
    b.args(["build", "--release", "--bin", "stasis", "--target", target])
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    crate::run(b)?;
    let built = root.join("target").join(target).join("release/stasis");
    let stasis = work.join("stasis");
    let _ = std::fs::remove_file(&stasis);
    // A stripped copy: the guests copy it in through their initramfs.
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&stasis)
        .arg(&built)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !stripped {
        println!("   (strip failed; using the unstripped binary)");
        std::fs::copy(&built, &stasis).context("copying stasis")?;
    }
    if is_dynamic(&stasis)? {
        bail!(
            "{} is dynamically linked; the guests need a static binary",
            built.display()
        );
    }

    println!("== building the static vdso_calls and threads fixtures");
    let static_fixture = |name: &str| -> Result<PathBuf> {
        let exe = work.join(name);
        let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
        cc.current_dir(&root)
            .args(["-O1", "-g", "-static", "-pthread", "-mavx2", "-o"])
            .arg(&exe)
            .arg("tests/fixtures/lib/fixture.c")
            .arg(format!("tests/fixtures/{name}.c"));
        crate::run(cc)?;
        Ok(exe)
    };
    let fixture = static_fixture("vdso_calls")?;
    let threads_fixture = static_fixture("threads")?;
    let tree_fixture = static_fixture("tree")?;

    let mut versions: Vec<&'static str> = Vec::new();
    for &(a, b) in MATRIX {
        for k in [a, b] {
            if let Kernel::Guest(v) = k {
                if !versions.contains(&v) {
                    versions.push(v);
                }
            }
        }
    }
    let mut guests = Vec::new();
    for v in versions {
        let out = Command::new(tools.join("fetch-kernel.sh"))
            .arg(v)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running fetch-kernel.sh {v}"))?;
        if !out.status.success() {
            bail!("fetch-kernel.sh {v} failed ({})", out.status);
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !dir.is_dir() {
            bail!(
                "fetch-kernel.sh {v} printed {}, not a directory",
                dir.display()
            );
        }
        // The package directory is named after the kernel release (e.g. 6.1.0-57-cloud-amd64).
        let release = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| v.to_string());
        guests.push((v, dir, release));
    }
    let host_flags = host_cpu_flags();
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the host's kernel release")?
        .trim()
        .to_string();
    Ok(Setup {
        tools,
        work,
        stasis,
        fixture,
        threads_fixture,
        tree_fixture,
        host_release,
        guest_cpu: guest_cpu(&host_flags),
        host_glibc_mask: glibc_mask(&host_flags),
        guest_cpus: host_cpus.min(GUEST_MAX_CPUS),
        host_cpus,
        guests,
    })
}

fn host_cpu_flags() -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// The guests' CPU model: run-in-kernel.sh's default (`max,mpx=off,la57=off`, XCR0 0x207),
/// without protection keys when this host has none. The guest's XSAVE features must be a subset
/// of the host's for an image made in a guest to restore here: a guest task's PKRU state is
/// always in use (the kernel sets its default value), and a host without PKU cannot take it.
fn guest_cpu(host_flags: &[String]) -> Option<String> {
    if host_flags.iter().any(|f| f == "pku") {
        None
    } else {
        Some("max,mpx=off,la57=off,pku=off".into())
    }
}

/// Whether an ELF file has a PT_INTERP program header (a dynamically linked executable).
fn is_dynamic(path: &Path) -> Result<bool> {
    let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
    };
    if b.get(..4) != Some(b"\x7fELF".as_slice()) || b.get(4) != Some(&2) {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("{}: truncated ELF header", path.display());
    };
    for i in 0..phnum as usize {
        if u32_at(phoff as usize + i * phentsize as usize) == Some(3) {
            return Ok(true); // PT_INTERP
        }
    }
    Ok(false)
}

/// The cell's image key: 32 random bytes, root's alone (stasis refuses any other).
fn write_key(path: &Path) -> Result<()> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, &key)?;
    Ok(())
}

fn run_cell(setup: &Setup, from: Kernel, to: Kernel) -> Result<Cell> {
    let dir = setup.work.join(cell_name(from, to));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::copy(&setup.stasis, dir.join("stasis"))?;
    std::fs::copy(&setup.fixture, dir.join("vdso_calls"))?;
    std::fs::copy(&setup.threads_fixture, dir.join("threads"))?;
    std::fs::copy(&setup.tree_fixture, dir.join("tree"))?;
    std::fs::create_dir_all(dir.join("mt"))?;
    std::fs::create_dir_all(dir.join("pt"))?;
    std::fs::write(dir.join("dump.sh"), DUMP_SH)?;
    std::fs::write(dir.join("restore.sh"), RESTORE_SH)?;
    write_key(&dir.join("image.key"))?;
    let same = setup.release(from) == setup.release(to);
    let mut cell = Cell {
        from,
        to,
        dir: dir.clone(),
        strategy: "-".into(),
        pass: false,
        reason: String::new(),
        failed: None,
    };

    // Different kernels: the fixture requires the vDSO proxy; the same kernel: a remap.
    let flags: &[&str] = if same { &[] } else { &["--proxy"] };
    let dump = step(setup, from, &dir, "dump.sh", flags, true)?;
    println!(
        "   dump under {}: {} ({:.1} s)",
        setup.label(from),
        if dump.ok { "ok" } else { "FAILED" },
        dump.elapsed.as_secs_f64()
    );
    if !dump.ok {
        // A host fixture that outlived a failed dump is ours to stop.
        if from == Kernel::Host {
            kill_fixture(&dir);
        }
        cell.reason = format!("dump: {}", dump.reason);
        cell.failed = Some(("dump".into(), dump.output));
        return Ok(cell);
    }
    let restore = step(setup, to, &dir, "restore.sh", &[], false)?;
    println!(
        "   restore under {}: {} ({:.1} s)",
        setup.label(to),
        if restore.ok { "ok" } else { "FAILED" },
        restore.elapsed.as_secs_f64()
    );
    if to == Kernel::Host {
        kill_fixture(&dir);
    }
    cell.strategy = strategy(&restore.output);
    let read = |d: &Path| std::fs::read_to_string(d.join("out")).unwrap_or_default();
    let (verdict, mt, tree) = (read(&dir), read(&dir.join("mt")), read(&dir.join("pt")));
    let (verdict, mt, tree) = (verdict.trim(), mt.trim(), tree.trim());
    cell.pass = restore.ok
        && verdict.starts_with("PASS:")
        && mt.starts_with("PASS:")
        && tree.starts_with("PASS:");
    let short = |v: &str| {
        v.strip_prefix("PASS: ")
            .or_else(|| v.strip_prefix("FAIL: "))
            .unwrap_or(v)
            .to_string()
    };
    cell.reason = match (verdict.is_empty(), mt) {
        (true, _) => format!("restore: {}", restore.reason),
        (false, m) if m.starts_with("PASS:") && tree.starts_with("PASS:") => {
            let threads = m.split_whitespace().find(|w| w.starts_with("threads="));
            let procs = tree.split_whitespace().find(|w| w.starts_with("procs="));
            format!(
                "{}; {} ok; tree {} ok",
                short(verdict),
                threads.unwrap_or("threads"),
                procs.unwrap_or("")
            )
        }
        (false, m) if m.starts_with("PASS:") => {
            format!(
                "{}; tree: {}",
                short(verdict),
                if tree.is_empty() {
                    restore.reason.clone()
                } else {
                    short(tree)
                }
            )
        }
        (false, "") => format!("{}; threads: {}", short(verdict), restore.reason),
        (false, m) => format!("{}; threads: {}", short(verdict), short(m)),
    };
    if !cell.pass {
        cell.failed = Some(("restore".into(), restore.output));
    }
    Ok(cell)
}

fn cell_name(from: Kernel, to: Kernel) -> String {
    format!("{}-to-{}", short(from), short(to))
}

fn short(k: Kernel) -> &'static str {
    match k {
        Kernel::Host => "host",
        Kernel::Guest(v) => v,
    }
}

/// Runs `sh SCRIPT DIR FLAGS…` on the host or in a guest; its output goes to DIR/<script>.log.
fn step(
    setup: &Setup,
    k: Kernel,
    dir: &Path,
    script: &str,
    flags: &[&str],
    dumping: bool,
) -> Result<Step> {
    let log_path = dir.join(script.replace(".sh", ".log"));
    let mut cmd = match k {
        Kernel::Host => {
            let mut c = Command::new("/bin/sh");
            c.current_dir(dir);
            close_inherited_fds(&mut c);
            if let (true, Some(mask)) = (dumping, &setup.host_glibc_mask) {
                // glibc picks its string functions by CPU at start-up (AVX-512, RTM…), and
                // the guest CPU has not all of this host's features. Keep the fixture to what
                // the guests offer, as one must for any migration to a smaller CPU.
                c.env("GLIBC_TUNABLES", mask);
            }
            if !dumping && setup.host_cpus > setup.guest_cpus {
                // The restored process (it inherits stasis's affinity) runs only on CPUs a
                // guest-made image's process knows of.
                pin_to_first_cpus(&mut c, setup.guest_cpus);
            }
            c
        }
        Kernel::Guest(v) => {
            let mut c = Command::new(setup.tools.join("run-in-kernel.sh"));
            c.arg("--kernel")
                .arg(&setup.guest(v).1)
                .arg("--share")
                .arg(dir)
                .args(["--timeout", &GUEST_TIMEOUT.to_string()]);
            if let Some(cpu) = &setup.guest_cpu {
                c.args(["--cpu", cpu]);
            }
            c.args(["--smp", &setup.guest_cpus.to_string()]);
            if dumping {
                c.args(["--first-pid", &guest_first_pid().to_string()]);
            }
            c.args(["--", "/bin/sh"]);
            c
        }
    };
    cmd.arg(dir.join(script)).arg(dir).args(flags);
    let (code, elapsed) = run_logged(cmd, &log_path, STEP_TIMEOUT)?;
    let output = strip_ansi(&std::fs::read_to_string(&log_path).unwrap_or_default());
    let reason = match (k, code) {
        (_, Some(0)) => String::new(),
        (_, None) => format!("no result after {} s; stopped", STEP_TIMEOUT.as_secs()),
        (Kernel::Guest(_), Some(124)) => format!("the guest timed out ({GUEST_TIMEOUT} s)"),
        (Kernel::Guest(_), Some(125)) => format!(
            "run-in-kernel.sh failed (exit 125){}",
            last_line_with(&output, "run-in-kernel:")
                .map(|l| format!(": {l}"))
                .unwrap_or_default()
        ),
        (_, Some(c)) => {
            let marker = last_line_with(&output, "== FAIL: ")
                .map(|l| l.trim_start_matches("== FAIL: ").to_string())
                .unwrap_or_else(|| format!("{script} exited with {c}"));
            match last_line_with(&output, "stasis: ") {
                Some(e) if marker.starts_with("stasis ") => format!("{marker}: {e}"),
                _ => marker,
            }
        }
    };
    Ok(Step {
        ok: code == Some(0),
        reason,
        output,
        elapsed,
    })
}

/// Runs `cmd` in its own process group with stdout and stderr into `log`; kills the group
/// after `timeout`. Returns the exit code (None: timed out or killed by a signal).
fn run_logged(mut cmd: Command, log: &Path, timeout: Duration) -> Result<(Option<i32>, Duration)> {
    use std::os::unix::process::CommandExt;
    let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .process_group(0);
    let t = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status.code(), t.elapsed()));
        }
        if t.elapsed() > timeout {
            // SAFETY: signalling the process group of our own child, created above.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            return Ok((None, t.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Closes every descriptor above stderr in `cmd` before it starts: the host fixture would
/// otherwise carry whatever this process inherited (a jobserver pipe, a tool's fds) into its
/// image, and the guests have none of it.
fn close_inherited_fds(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only close_range (a system call) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
}

/// Makes `cmd` (and what it starts) run on CPUs 0..n only.
fn pin_to_first_cpus(cmd: &mut Command, n: usize) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only sched_setaffinity (async-signal-safe) on a cpu_set_t on the stack.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for cpu in 0..n {
                libc::CPU_SET(cpu, &mut set);
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Stops a host fixture of this cell that is still running (after a failure).
fn kill_fixture(dir: &Path) {
    for (d, name) in [
        (dir.to_path_buf(), "vdso_calls"),
        (dir.join("mt"), "threads"),
        (dir.join("pt"), "tree"),
    ] {
        let Some(pid) = std::fs::read_to_string(d.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // The threads fixture names its threads fx-thr-<i>; its leader is fx-thr-0.
        if comm.trim() == name || (name == "threads" && comm.trim().starts_with("fx-thr")) {
            // SAFETY: the pid is our fixture's (checked by name just above).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The vDSO strategy from `stasis show`'s "restore here: <strategy>: …" line.
fn strategy(output: &str) -> String {
    match last_line_with(output, "restore here: ") {
        Some(l) => {
            let s = l.trim_start().trim_start_matches("restore here: ");
            if s.starts_with("cannot restore here") {
                "refused".into()
            } else {
                s.split(':').next().unwrap_or(s).trim().to_string()
            }
        }
        None => "?".into(),
    }
}

fn last_line_with<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with(prefix))
}

/// Removes terminal colour sequences (stasis's log colours its stderr).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn print_matrix(setup: &Setup, cells: &[Cell]) {
    let rows: Vec<[String; 5]> = cells
        .iter()
        .map(|c| {
            [
                setup.label(c.from),
                setup.label(c.to),
                c.strategy.clone(),
                if c.pass { "PASS" } else { "FAIL" }.to_string(),
                c.reason.clone(),
            ]
        })
        .collect();
    let head = [
        "image kernel",
        "restore kernel",
        "strategy",
        "result",
        "reason",
    ];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, s) in width.iter_mut().zip(r) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |cols: [&str; 5]| {
        let mut s = String::new();
        for (i, c) in cols.iter().enumerate() {
            if i == 4 {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}  ", w = width[i]);
            }
        }
        s
    };
    println!("\n== cross-kernel matrix (image made under → restored under)");
    println!("{}", line(head));
    for r in &rows {
        println!("{}", line([&r[0], &r[1], &r[2], &r[3], &r[4]]));
    }
}
