// stasis workload (Node.js 18+): a setInterval timer drives the counter; every tick also sends
// one step of a running checksum to the libuv thread pool (crypto.pbkdf2 with a callback), so a
// pool thread does real work each tick besides V8's own platform threads.
//
// Usage: node ticker.js TICKS PIDFILE VERDICT [--corrupt data|map|worker]
//
// State it can verify, built deterministically at start:
//   * 4 MiB of xorshift32 data in a Buffer, with a SHA-256 per 64 KiB block; every tick
//     re-checks one block;
//   * a Map of 50 000 entries and an array of 50 000 small objects (V8 moves these around);
//   * the running checksum: step i = pbkdf2(acc || i, one 64 KiB block, 1 iteration, SHA-256),
//     run on the pool, one in flight at a time. On SIGTERM the chain is replayed with
//     pbkdf2Sync over freshly regenerated data and must match, and it must have advanced
//     within the last STALL_TICKS ticks.
//
// Each tick appends "tick <n>\n" to TICKS with one fs.writeSync on an O_APPEND fd. On SIGTERM
// (process.on) it verifies everything -- including that TICKS holds exactly tick 0 .. n-1 --
// appends "PASS: ..." or "FAIL: reason" to VERDICT and exits 0 or 1. The pid goes to PIDFILE
// (tmp + rename) once the timer runs. --corrupt KIND (harness self-test only) damages one kind
// of state at tick CORRUPT_AT, so verification must fail.
'use strict';

const fs = require('fs');
const crypto = require('crypto');

const SEED = 0x5715;
const DATA_BYTES = 4 << 20;
const BLOCK = 64 << 10;
const ENTRIES = 50000;
const TICK_MS = 100;
const STALL_TICKS = 20;
const CORRUPT_AT = 5;

const [ticksPath, pidfile, verdictPath, ...opts] = process.argv.slice(2);
if (!verdictPath) {
  console.error('usage: node ticker.js TICKS PIDFILE VERDICT [--corrupt KIND]');
  process.exit(2);
}
const corrupt = opts[0] === '--corrupt' ? opts[1] : null;
if (opts.length && !['data', 'map', 'worker'].includes(corrupt)) {
  console.error(`bad options: ${opts.join(' ')}`);
  process.exit(2);
}

function makeData() {
  const buf = Buffer.alloc(DATA_BYTES);
  const words = new Uint32Array(buf.buffer, buf.byteOffset, DATA_BYTES / 4);
  let x = SEED >>> 0;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    words[i] = x;
  }
  return buf;
}

const entry = (i) => `value-${i}-${((i * 2654435761) % 2 ** 32).toString(16)}`;
const blockOf = (buf, b) => buf.subarray(b * BLOCK, (b + 1) * BLOCK);
const sha = (buf) => crypto.createHash('sha256').update(buf).digest('hex');

function stepInput(data, acc, i) {
  const off = (i * 40503 * 4096) % (DATA_BYTES - BLOCK);
  const idx = Buffer.alloc(4);
  idx.writeUInt32LE(i);
  return [Buffer.concat([acc, idx]), data.subarray(off, off + BLOCK)];
}

const data = makeData();
const blockSha = [];
for (let b = 0; b < DATA_BYTES / BLOCK; b++) blockSha.push(sha(blockOf(data, b)));
const table = new Map();
const objects = [];
for (let i = 0; i < ENTRIES; i++) {
  table.set(`k${i}`, entry(i));
  objects.push({ i, sq: i * i, name: `o${i}` });
}

let acc = Buffer.alloc(32);
let steps = 0;
let inflight = false;
let workerError = null;

function kickStep() {
  if (inflight) return;
  inflight = true;
  const [password, salt] = stepInput(data, acc, steps);
  crypto.pbkdf2(password, salt, 1, 32, 'sha256', (err, key) => {
    inflight = false;
    if (err) {
      workerError = workerError || String(err);
      return;
    }
    acc = key;
    steps += 1;
  });
}

fs.writeFileSync(ticksPath, '');
const fd = fs.openSync(ticksPath, 'a');
let n = 0;
let failure = null;
let lastSteps = -1;
let lastProgress = 0;

function tick() {
  const line = `tick ${n}\n`;
  const written = fs.writeSync(fd, line);
  if (written !== line.length) throw new Error(`short write: ${written} of ${line.length}`);
  n += 1;
  const b = n % blockSha.length;
  if (!failure && sha(blockOf(data, b)) !== blockSha[b]) {
    failure = `data block ${b} changed (seen at tick ${n})`;
  }
  if (steps !== lastSteps) {
    lastSteps = steps;
    lastProgress = n;
  }
  if (corrupt && n === CORRUPT_AT) {
    if (corrupt === 'data') data[DATA_BYTES / 2 + 12345] ^= 0x40;
    else if (corrupt === 'map') table.set('k777', 'bogus');
    else acc = Buffer.from(acc.map((v, i) => (i === 0 ? v ^ 1 : v)));
  }
  kickStep();
}

function verify() {
  if (failure) return failure;
  if (workerError) return `a pbkdf2 step failed: ${workerError}`;
  if (n - lastProgress > STALL_TICKS) {
    return `the pool checksum made no progress since tick ${lastProgress} (now ${n})`;
  }
  const expected = makeData();
  if (!data.equals(expected)) {
    let off = 0;
    while (data[off] === expected[off]) off++;
    return `data differs at offset ${off}: ${data[off]}, expected ${expected[off]}`;
  }
  for (let b = 0; b < blockSha.length; b++) {
    if (sha(blockOf(expected, b)) !== blockSha[b]) return `block hash table entry ${b} is wrong`;
  }
  if (table.size !== ENTRIES) return `Map has ${table.size} entries, expected ${ENTRIES}`;
  for (let i = 0; i < ENTRIES; i++) {
    if (table.get(`k${i}`) !== entry(i)) {
      return `Map entry k${i} is ${JSON.stringify(table.get(`k${i}`))}, expected ${entry(i)}`;
    }
    const o = objects[i];
    if (!o || o.i !== i || o.sq !== i * i || o.name !== `o${i}`) {
      return `object ${i} is ${JSON.stringify(o)}`;
    }
  }
  let replay = Buffer.alloc(32);
  for (let i = 0; i < steps; i++) {
    const [password, salt] = stepInput(expected, replay, i);
    replay = crypto.pbkdf2Sync(password, salt, 1, 32, 'sha256');
  }
  if (!replay.equals(acc)) {
    return `checksum after ${steps} steps is ${acc.toString('hex')}, replay gives ${replay.toString('hex')}`;
  }
  const lines = fs.readFileSync(ticksPath, 'utf8').split('\n');
  if (lines.pop() !== '') return 'the tick file does not end with a newline';
  if (lines.length !== n) return `the tick file has ${lines.length} lines, the process wrote ${n} ticks`;
  for (let i = 0; i < lines.length; i++) {
    if (lines[i] !== `tick ${i}`) return `tick file line ${i + 1} is ${JSON.stringify(lines[i])}, expected "tick ${i}"`;
  }
  return null;
}

const timer = setInterval(tick, TICK_MS);
process.on('SIGTERM', () => {
  clearInterval(timer);
  let reason;
  try {
    reason = verify();
  } catch (e) {
    reason = `verification threw: ${e && e.stack ? e.stack.split('\n')[0] : e}`;
  }
  const line = reason === null
    ? `PASS: node ${process.version}: ${n} ticks, ${steps} pool checksum steps, ${DATA_BYTES >> 20} MiB data, ${ENTRIES} Map entries and objects`
    : `FAIL: ${reason}`;
  fs.appendFileSync(verdictPath, `${line}\n`);
  fs.closeSync(fd);
  process.exit(reason === null ? 0 : 1);
});

fs.writeFileSync(`${pidfile}.tmp`, `${process.pid}\n`);
fs.renameSync(`${pidfile}.tmp`, pidfile);
