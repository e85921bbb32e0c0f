// stasis workload (Java): a ticker thread and two worker threads, inside a JVM that has a dozen
// threads of its own (GC, JIT compilers, reference handler, signal dispatcher, ...).
//
// Usage: java Ticker TICKS PIDFILE VERDICT [--corrupt data|map|worker]
//
// State it can verify, built deterministically at start:
//   * 4 MiB of java.util.Random bytes (fixed seed), with a CRC-32 per 64 KiB block; every tick
//     re-checks one block;
//   * a HashMap of 50 000 entries (the GC moves it around);
//   * each worker's running checksum: every step chains a CRC-32 over one block of the data.
//     On SIGTERM the chains are replayed over freshly regenerated data and must match, and each
//     worker must have advanced within the last STALL_TICKS ticks.
//
// The ticker appends "tick <n>\n" to TICKS with one FileOutputStream.write (append mode) per
// line. SIGTERM runs the shutdown hook: it stops the threads, verifies everything -- including
// that TICKS holds exactly tick 0 .. n-1 -- appends "PASS: ..." or "FAIL: reason" to VERDICT and
// halts with status 0 or 1. The pid goes to PIDFILE (tmp + rename) once everything runs.
// --corrupt KIND (harness self-test only) damages one kind of state at tick CORRUPT_AT, so
// verification must fail.

import java.io.File;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.zip.CRC32;

public final class Ticker {
    static final long SEED = 0x5715;
    static final int DATA_BYTES = 4 << 20;
    static final int BLOCK = 64 << 10;
    static final int ENTRIES = 50_000;
    static final int WORKERS = 2;
    static final long TICK_MS = 100;
    static final long STEP_MS = 10;
    static final int STALL_TICKS = 20;
    static final int CORRUPT_AT = 5;

    static byte[] makeData() {
        byte[] d = new byte[DATA_BYTES];
        new Random(SEED).nextBytes(d);
        return d;
    }

    static String entry(int i) {
        return "value-" + i + "-" + Long.toHexString((i * 2654435761L) % (1L << 32));
    }

    static long crc(byte[] data, int off, int len) {
        CRC32 c = new CRC32();
        c.update(data, off, len);
        return c.getValue();
    }

    /** One step of worker id's running checksum: depends on every previous step. */
    static long step(byte[] data, int id, long acc, long i) {
        int off = (int) (((i * 40503 + id * 977L) * 4096) % (DATA_BYTES - BLOCK));
        CRC32 c = new CRC32();
        byte[] idx = (acc + ":" + id + ":" + i).getBytes(StandardCharsets.US_ASCII);
        c.update(idx, 0, idx.length);
        c.update(data, off, BLOCK);
        return c.getValue();
    }

    static final class Worker extends Thread {
        final int id;
        final byte[] data;
        volatile boolean halt;
        long steps;
        long acc;
        String error;

        Worker(int id, byte[] data) {
            super("checksum-worker-" + id);
            this.id = id;
            this.data = data;
        }

        synchronized long progress() {
            return steps;
        }

        @Override
        public void run() {
            try {
                while (!halt) {
                    synchronized (this) {
                        acc = step(data, id, acc, steps);
                        steps++;
                    }
                    Thread.sleep(STEP_MS);
                }
            } catch (Throwable e) {
                error = e.toString();
            }
        }
    }

    // Shared between the ticker thread and the shutdown hook (which joins the ticker first).
    static volatile boolean stopping;
    static volatile String failure;
    static volatile String tickerError;
    static int n;
    static long[] lastSteps = new long[WORKERS];
    static int[] lastProgress = new int[WORKERS];

    public static void main(String[] args) throws Exception {
        if (args.length != 3 && args.length != 5) {
            System.err.println("usage: java Ticker TICKS PIDFILE VERDICT [--corrupt data|map|worker]");
            System.exit(2);
        }
        File ticksPath = new File(args[0]);
        File pidfile = new File(args[1]);
        File verdictPath = new File(args[2]);
        String corrupt = args.length == 5 && args[3].equals("--corrupt") ? args[4] : null;
        if (args.length == 5 && !List.of("data", "map", "worker").contains(String.valueOf(corrupt))) {
            System.err.println("bad options: " + String.join(" ", args));
            System.exit(2);
        }

        byte[] data = makeData();
        long[] blockCrc = new long[DATA_BYTES / BLOCK];
        for (int b = 0; b < blockCrc.length; b++) {
            blockCrc[b] = crc(data, b * BLOCK, BLOCK);
        }
        Map<String, String> table = new HashMap<>();
        for (int i = 0; i < ENTRIES; i++) {
            table.put("k" + i, entry(i));
        }
        Worker[] workers = new Worker[WORKERS];
        for (int i = 0; i < WORKERS; i++) {
            workers[i] = new Worker(i, data);
            workers[i].start();
        }
        Arrays.fill(lastSteps, -1);

        new FileOutputStream(ticksPath).close();
        FileOutputStream out = new FileOutputStream(ticksPath, true);
        Thread ticker = new Thread(() -> {
            try {
                while (!stopping) {
                    out.write(("tick " + n + "\n").getBytes(StandardCharsets.US_ASCII));
                    n++;
                    int b = n % blockCrc.length;
                    if (failure == null && crc(data, b * BLOCK, BLOCK) != blockCrc[b]) {
                        failure = "data block " + b + " changed (seen at tick " + n + ")";
                    }
                    for (int i = 0; i < WORKERS; i++) {
                        long s = workers[i].progress();
                        if (s != lastSteps[i]) {
                            lastSteps[i] = s;
                            lastProgress[i] = n;
                        }
                    }
                    if (corrupt != null && n == CORRUPT_AT) {
                        switch (corrupt) {
                            case "data" -> data[DATA_BYTES / 2 + 12345] ^= 0x40;
                            case "map" -> table.put("k777", "bogus");
                            default -> {
                                synchronized (workers[1]) {
                                    workers[1].acc ^= 1;
                                }
                            }
                        }
                    }
                    Thread.sleep(TICK_MS);
                }
            } catch (Throwable e) {
                tickerError = e.toString();
            }
        }, "ticker");

        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            String reason;
            try {
                reason = verify(ticksPath, ticker, workers, data, blockCrc, table);
            } catch (Throwable e) {
                reason = "verification threw " + e;
            }
            String line = reason == null
                    ? "PASS: java " + System.getProperty("java.version") + ": " + n + " ticks, "
                            + WORKERS + " worker threads (steps " + Arrays.toString(lastSteps) + "), "
                            + (DATA_BYTES >> 20) + " MiB data, " + ENTRIES + " HashMap entries, "
                            + Thread.getAllStackTraces().size() + " Java threads"
                    : "FAIL: " + reason;
            int status = reason == null ? 0 : 1;
            try (FileOutputStream v = new FileOutputStream(verdictPath, true)) {
                v.write((line + "\n").getBytes(StandardCharsets.UTF_8));
            } catch (IOException e) {
                System.err.println("writing the verdict: " + e);
                status = 1;
            }
            Runtime.getRuntime().halt(status);
        }, "verifier"));

        ticker.start();
        File tmp = new File(pidfile.getPath() + ".tmp");
        try (FileOutputStream p = new FileOutputStream(tmp)) {
            p.write((ProcessHandle.current().pid() + "\n").getBytes(StandardCharsets.US_ASCII));
        }
        if (!tmp.renameTo(pidfile)) {
            throw new IOException("cannot rename " + tmp + " to " + pidfile);
        }
        ticker.join();
    }

    static String verify(File ticksPath, Thread ticker, Worker[] workers, byte[] data, long[] blockCrc,
            Map<String, String> table) throws Exception {
        stopping = true;
        ticker.join(5000);
        if (ticker.isAlive()) {
            return "the ticker thread did not stop within 5 s";
        }
        if (tickerError != null) {
            return "the ticker thread died: " + tickerError;
        }
        for (Worker w : workers) {
            w.halt = true;
            w.join(5000);
            if (w.isAlive()) {
                return "worker " + w.id + " did not stop within 5 s";
            }
            if (w.error != null) {
                return "worker " + w.id + " died: " + w.error;
            }
        }
        if (failure != null) {
            return failure;
        }
        for (int i = 0; i < workers.length; i++) {
            if (n - lastProgress[i] > STALL_TICKS) {
                return "worker " + i + " made no progress since tick " + lastProgress[i] + " (now " + n + ")";
            }
        }
        byte[] expected = makeData();
        int off = Arrays.mismatch(data, expected);
        if (off >= 0) {
            return "data differs at offset " + off + ": " + data[off] + ", expected " + expected[off];
        }
        for (int b = 0; b < blockCrc.length; b++) {
            if (crc(expected, b * BLOCK, BLOCK) != blockCrc[b]) {
                return "block CRC table entry " + b + " is wrong";
            }
        }
        if (table.size() != ENTRIES) {
            return "HashMap has " + table.size() + " entries, expected " + ENTRIES;
        }
        for (int i = 0; i < ENTRIES; i++) {
            String v = table.get("k" + i);
            if (!entry(i).equals(v)) {
                return "HashMap entry k" + i + " is " + v + ", expected " + entry(i);
            }
        }
        for (Worker w : workers) {
            long acc = 0;
            for (long i = 0; i < w.steps; i++) {
                acc = step(expected, w.id, acc, i);
            }
            if (acc != w.acc) {
                return "worker " + w.id + " checksum after " + w.steps + " steps is " + Long.toHexString(w.acc)
                        + ", replay gives " + Long.toHexString(acc);
            }
            lastSteps[w.id] = w.steps;
        }
        String text;
        try (FileInputStream in = new FileInputStream(ticksPath)) {
            text = new String(in.readAllBytes(), StandardCharsets.US_ASCII);
        }
        if (!text.endsWith("\n")) {
            return "the tick file does not end with a newline";
        }
        String[] lines = text.substring(0, text.length() - 1).split("\n", -1);
        if (lines.length != n) {
            return "the tick file has " + lines.length + " lines, the process wrote " + n + " ticks";
        }
        for (int i = 0; i < lines.length; i++) {
            if (!lines[i].equals("tick " + i)) {
                return "tick file line " + (i + 1) + " is \"" + lines[i] + "\", expected \"tick " + i + "\"";
            }
        }
        return null;
    }
}
