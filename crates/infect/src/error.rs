use nix::errno::Errno;

/// Every way freezing, infecting or curing a process can fail. Messages name the pid (or
/// thread) and say what the user can do.
#[derive(Debug, thiserror::Error)]
pub enum InfectError {
    #[error("invalid pid {0}: a pid must be a positive number")]
    InvalidPid(i32),
    #[error("no process with pid {0}")]
    NoProcess(i32),
    #[error("pid {0} is stasis itself; it cannot freeze itself")]
    SelfTarget(i32),
    #[error("pid {0} is a zombie (it has exited and waits for its parent to reap it)")]
    Zombie(i32),
    #[error("pid {0} is a kernel thread; only user processes can be frozen")]
    KernelThread(i32),
    #[error("pid {pid} is already traced by pid {tracer} (a debugger or another checkpointer)")]
    AlreadyTraced { pid: i32, tracer: i32 },
    #[error("not permitted to trace pid {0} (run as its owner or as root with CAP_SYS_PTRACE)")]
    PermissionDenied(i32),
    #[error("pid {0} is not a thread-group leader; give the process id")]
    NotLeader(i32),
    #[error("pid {pid} {what}; stasis handles only 64-bit x86 processes")]
    NotX86_64 { pid: i32, what: String },
    #[error("pid {pid} exited while stasis was working on it ({how})")]
    TargetGone { pid: i32, how: String },
    #[error("ptrace {op} on thread {tid}: {errno}")]
    Ptrace {
        op: &'static str,
        tid: i32,
        errno: Errno,
    },
    #[error("pid {0} has no executable mapping to inject system calls from")]
    NoInjectionSite(i32),
    #[error("injected {name} in pid {pid} failed: {errno}")]
    RemoteSyscall {
        pid: i32,
        name: &'static str,
        errno: Errno,
    },
    #[error(
        "pid {pid}: unexpected stop while running injected code (signal {sig}, event {event})"
    )]
    UnexpectedStop { pid: i32, sig: i32, event: i32 },
    #[error("pid {pid}: the parasite faulted with signal {sig} at {addr:#x}")]
    ParasiteFault { pid: i32, sig: i32, addr: u64 },
    #[error("pid {pid}: the parasite did not answer within {ms} ms")]
    ParasiteTimeout { pid: i32, ms: u64 },
    #[error("pid {pid}: bad reply from the parasite: {why}")]
    BadReply { pid: i32, why: String },
    #[error("pid {pid}: the parasite reported {status} (errno {errno})")]
    ParasiteStatus {
        pid: i32,
        status: String,
        errno: i32,
    },
    #[error("bad parasite blob: {0}")]
    BadBlob(String),
    // The OS error is in the message, not also a `source` (a chain would print it twice).
    #[error("{what} of pid {pid}: {err}")]
    Io {
        pid: i32,
        what: &'static str,
        err: std::io::Error,
    },
    #[error(transparent)]
    Proc(#[from] stasis_proc::ProcError),
}

pub type Result<T> = std::result::Result<T, InfectError>;
