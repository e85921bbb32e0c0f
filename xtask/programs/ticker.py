"""stasis workload (Python 3): a main thread that ticks and a threading.Thread worker.

Usage: python3 ticker.py TICKS PIDFILE VERDICT [--single-thread] [--corrupt data|map|worker]
                         [--sqlite DB --journal delete|wal]

State it can verify, built deterministically at start:
  * 4 MiB of pseudo-random bytes (random.Random(SEED).randbytes) in a bytearray, with a
    CRC-32 per 64 KiB block; the main thread re-checks one block every tick;
  * a dict of 50 000 entries;
  * the worker's running checksum: every STEP_S it chains a CRC-32 over one block of the data
    (steps and acc under a lock). On SIGTERM the chain is replayed from scratch against freshly
    regenerated data and must give the same value, and the worker must have advanced within the
    last STALL_TICKS ticks (so it really runs after a restore).

The main thread appends "tick <n>\\n" to TICKS every TICK_S with one os.write on an O_APPEND fd.
On SIGTERM (the handler only sets a flag) it stops the worker, verifies everything -- including
that TICKS holds exactly "tick 0" .. "tick <n-1>" -- and appends "PASS: ..." or "FAIL: reason" to
VERDICT, exit status 0 or 1. The pid goes to PIDFILE (tmp + rename) once everything runs.

--sqlite DB: the ticks also go into an sqlite database, inside one transaction held open from
start to SIGTERM (BEGIN IMMEDIATE: the file locks that keep every other writer out are held all
along, across dumps and restores); one row per tick. On SIGTERM the transaction is committed
(it must succeed) and a second connection must read back exactly rows 0 .. n-1. --journal picks
sqlite's journal mode: `delete` (a rollback journal; locks on the database file) or `wal` (the
write-ahead log; locks on the -shm file, which is also mapped shared).

--single-thread (harness self-test only): no worker thread; the main thread does the worker's
steps itself. --corrupt KIND (harness self-test only): damage one kind of state at tick
CORRUPT_AT, so verification must fail.
"""

import os
import random
import signal
import sys
import threading
import time
import zlib

SEED = 0x5715
DATA_BYTES = 4 << 20
BLOCK = 64 << 10
ENTRIES = 50_000
TICK_S = 0.1
STEP_S = 0.02
STALL_TICKS = 20
CORRUPT_AT = 5

stopping = False


def on_sigterm(_signum, _frame):
    global stopping
    stopping = True


def make_data():
    return bytearray(random.Random(SEED).randbytes(DATA_BYTES))


def entry(i):
    return "value-%d-%x" % (i, (i * 2654435761) % (1 << 32))


def step(data, acc, i):
    """One step of the running checksum: depends on every previous step and on the data."""
    off = (i * 40503 * 4096) % (DATA_BYTES - BLOCK)
    acc = zlib.crc32(i.to_bytes(8, "little"), acc)
    return zlib.crc32(memoryview(data)[off : off + BLOCK], acc)


class Worker(threading.Thread):
    def __init__(self, data):
        super().__init__(name="checksum-worker", daemon=True)
        self.data = data
        self.lock = threading.Lock()
        self.steps = 0
        self.acc = 0
        self.halt = threading.Event()
        self.error = None

    def one_step(self):
        with self.lock:
            self.acc = step(self.data, self.acc, self.steps)
            self.steps += 1

    def progress(self):
        with self.lock:
            return self.steps

    def run(self):
        try:
            while not self.halt.is_set():
                self.one_step()
                time.sleep(STEP_S)
        except BaseException as e:  # noqa: BLE001 - reported in the verdict
            self.error = repr(e)


def write_all(fd, text):
    b = text.encode()
    n = os.write(fd, b)
    if n != len(b):
        raise OSError("short write: %d of %d bytes" % (n, len(b)))


def verify(ticks_path, n, data, block_crc, table, worker, threaded, failures, last_progress):
    if failures:
        return failures[0]
    if threaded:
        worker.halt.set()
        worker.join(5.0)
        if worker.is_alive():
            return "the worker thread did not stop within 5 s"
        if worker.error:
            return "the worker thread died: " + worker.error
    if n - last_progress > STALL_TICKS:
        return "the worker made no progress since tick %d (now %d)" % (last_progress, n)
    expected = make_data()
    if len(data) != DATA_BYTES:
        return "data is %d bytes, expected %d" % (len(data), DATA_BYTES)
    if data != expected:
        off = next(i for i in range(DATA_BYTES) if data[i] != expected[i])
        return "data differs at offset %d: %#x, expected %#x" % (off, data[off], expected[off])
    for b, crc in enumerate(block_crc):
        if zlib.crc32(expected[b * BLOCK : (b + 1) * BLOCK]) != crc:
            return "block CRC table entry %d is wrong" % b
    if len(table) != ENTRIES:
        return "dict has %d entries, expected %d" % (len(table), ENTRIES)
    for i in range(ENTRIES):
        if table.get("k%d" % i) != entry(i):
            return "dict entry k%d is %r, expected %r" % (i, table.get("k%d" % i), entry(i))
    acc = 0
    for i in range(worker.steps):
        acc = step(expected, acc, i)
    if acc != worker.acc:
        return "worker checksum after %d steps is %#x, replay gives %#x" % (
            worker.steps,
            worker.acc,
            acc,
        )
    with open(ticks_path, "rb") as f:
        lines = f.read().decode(errors="replace").split("\n")
    if lines[-1] != "":
        return "the tick file does not end with a newline: %r" % lines[-1][-40:]
    lines.pop()
    if len(lines) != n:
        return "the tick file has %d lines, the process wrote %d ticks" % (len(lines), n)
    for i, line in enumerate(lines):
        if line != "tick %d" % i:
            return "tick file line %d is %r, expected 'tick %d'" % (i + 1, line, i)
    return None


def open_db(path, journal):
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
    got = db.execute("PRAGMA journal_mode=%s" % journal).fetchone()[0]
    if got.lower() != journal:
        raise RuntimeError("journal mode %r, asked for %r" % (got, journal))
    db.execute("CREATE TABLE IF NOT EXISTS ticks (n INTEGER PRIMARY KEY, at REAL)")
    db.execute("BEGIN IMMEDIATE")
    return db


def verify_db(db, path, n):
    import sqlite3

    try:
        db.execute("COMMIT")
    except sqlite3.Error as e:
        return "COMMIT of the transaction held since start failed: %s" % e
    db.close()
    other = sqlite3.connect(path, isolation_level=None, timeout=5)
    rows = [r[0] for r in other.execute("SELECT n FROM ticks ORDER BY n")]
    other.close()
    if rows != list(range(n)):
        return "the database holds %d rows (first %r, last %r) after COMMIT, expected 0..%d" % (
            len(rows),
            rows[:1],
            rows[-1:],
            n - 1,
        )
    return None


def main():
    args = sys.argv[1:]
    threaded = "--single-thread" not in args
    corrupt = None
    if "--corrupt" in args:
        corrupt = args[args.index("--corrupt") + 1]
        if corrupt not in ("data", "map", "worker"):
            sys.exit("unknown --corrupt kind %r" % corrupt)
    ticks_path, pidfile, verdict_path = args[0], args[1], args[2]
    db_path = args[args.index("--sqlite") + 1] if "--sqlite" in args else None
    journal = args[args.index("--journal") + 1] if "--journal" in args else "delete"

    signal.signal(signal.SIGTERM, on_sigterm)
    data = make_data()
    block_crc = [zlib.crc32(data[o : o + BLOCK]) for o in range(0, DATA_BYTES, BLOCK)]
    table = {"k%d" % i: entry(i) for i in range(ENTRIES)}
    worker = Worker(data)
    if threaded:
        worker.start()

    db = open_db(db_path, journal) if db_path else None
    fd = os.open(ticks_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % os.getpid())
    os.rename(tmp, pidfile)

    n = 0
    failures = []
    last_steps, last_progress = -1, 0
    while not stopping:
        write_all(fd, "tick %d\n" % n)
        if db is not None:
            db.execute("INSERT INTO ticks VALUES (?, ?)", (n, time.time()))
        n += 1
        b = n % len(block_crc)
        if zlib.crc32(data[b * BLOCK : (b + 1) * BLOCK]) != block_crc[b] and not failures:
            failures.append("data block %d changed (seen at tick %d)" % (b, n))
        if not threaded:
            worker.one_step()
        steps = worker.progress()
        if steps != last_steps:
            last_steps, last_progress = steps, n
        if corrupt and n == CORRUPT_AT:
            if corrupt == "data":
                data[DATA_BYTES // 2 + 12345] ^= 0x40
            elif corrupt == "map":
                table["k777"] = "bogus"
            else:
                with worker.lock:
                    worker.acc ^= 1
        time.sleep(TICK_S)

    reason = verify(
        ticks_path, n, data, block_crc, table, worker, threaded, failures, last_progress
    )
    if reason is None and db is not None:
        reason = verify_db(db, db_path, n)
    if reason is None:
        line = "PASS: python %s%s: %d ticks, %d worker steps, %d MiB data, %d dict entries" % (
            sys.version.split()[0],
            " sqlite (%s journal) committed %d rows" % (journal, n) if db is not None else "",
            n,
            worker.steps,
            DATA_BYTES >> 20,
            ENTRIES,
        )
    else:
        line = "FAIL: " + reason
    with open(verdict_path, "a") as f:
        f.write(line + "\n")
    os.close(fd)
    sys.exit(0 if reason is None else 1)


if __name__ == "__main__":
    main()
