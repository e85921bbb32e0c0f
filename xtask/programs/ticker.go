// stasis workload (Go, standard library only): goroutines spread over several OS threads.
//
// Usage: ticker TICKS PIDFILE VERDICT [--corrupt data|map|worker]
//
// GOMAXPROCS is at least 4. WORKERS goroutines each keep a running checksum: every step chains
// a CRC-32 over one 64 KiB block of the data; worker 0 is locked to an OS thread of its own
// (runtime.LockOSThread), the others run wherever the scheduler puts them, next to sysmon and
// the GC workers. One more goroutine writes the counter. State it can verify, built
// deterministically at start:
//   - 4 MiB of math/rand data (fixed seed), with a CRC-32 per 64 KiB block; every tick
//     re-checks one block;
//   - a map of 50 000 entries;
//   - each worker's chain: on SIGTERM it is replayed over freshly regenerated data and must
//     match, and every worker must have advanced within the last stallTicks ticks.
//
// Each tick appends "tick <n>\n" to TICKS with one os.File.Write on an O_APPEND file. On
// SIGTERM (signal.Notify) it stops every goroutine, verifies everything -- including that TICKS
// holds exactly tick 0 .. n-1 -- appends "PASS: ..." or "FAIL: reason" to VERDICT and exits 0 or
// 1. The pid goes to PIDFILE (tmp + rename) once everything runs. --corrupt KIND (harness
// self-test only) damages one kind of state at tick corruptAt, so verification must fail.
package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math/rand"
	"os"
	"os/signal"
	"runtime"
	"sync"
	"syscall"
	"time"
)

const (
	seed       = 0x5715
	dataBytes  = 4 << 20
	block      = 64 << 10
	entries    = 50000
	workers    = 4
	tickEvery  = 100 * time.Millisecond
	stepEvery  = 10 * time.Millisecond
	stallTicks = 20
	corruptAt  = 5
)

type worker struct {
	id    int
	mu    sync.Mutex
	steps uint64
	acc   uint32
}

func makeData() []byte {
	d := make([]byte, dataBytes)
	rand.New(rand.NewSource(seed)).Read(d)
	return d
}

func entry(i int) string { return fmt.Sprintf("value-%d-%x", i, (uint64(i)*2654435761)%(1<<32)) }

// step is one step of worker id's running checksum: it depends on every previous step.
func step(data []byte, id int, acc uint32, i uint64) uint32 {
	off := ((i*40503 + uint64(id)*977) * 4096) % (dataBytes - block)
	var idx [12]byte
	binary.LittleEndian.PutUint64(idx[:8], i)
	binary.LittleEndian.PutUint32(idx[8:], uint32(id))
	acc = crc32.Update(acc, crc32.IEEETable, idx[:])
	return crc32.Update(acc, crc32.IEEETable, data[off:off+block])
}

func (w *worker) progress() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.steps
}

func (w *worker) run(data []byte, stop <-chan struct{}, wg *sync.WaitGroup) {
	defer wg.Done()
	if w.id == 0 {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
	}
	for {
		select {
		case <-stop:
			return
		default:
		}
		w.mu.Lock()
		w.acc = step(data, w.id, w.acc, w.steps)
		w.steps++
		w.mu.Unlock()
		time.Sleep(stepEvery)
	}
}

type ticker struct {
	f            *os.File
	n            int
	failure      string
	lastSteps    []uint64
	lastProgress []int
}

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: ticker TICKS PIDFILE VERDICT [--corrupt data|map|worker]")
		os.Exit(2)
	}
	ticksPath, pidfile, verdictPath := os.Args[1], os.Args[2], os.Args[3]
	corrupt := ""
	if len(os.Args) == 6 && os.Args[4] == "--corrupt" {
		corrupt = os.Args[5]
	}
	if len(os.Args) != 4 && corrupt != "data" && corrupt != "map" && corrupt != "worker" {
		fmt.Fprintf(os.Stderr, "bad options: %q\n", os.Args[4:])
		os.Exit(2)
	}
	if runtime.GOMAXPROCS(0) < 4 {
		runtime.GOMAXPROCS(4)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)

	data := makeData()
	blockCRC := make([]uint32, dataBytes/block)
	for b := range blockCRC {
		blockCRC[b] = crc32.ChecksumIEEE(data[b*block : (b+1)*block])
	}
	table := make(map[string]string, entries)
	for i := 0; i < entries; i++ {
		table[fmt.Sprintf("k%d", i)] = entry(i)
	}

	f, err := os.OpenFile(ticksPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND|os.O_TRUNC, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	ws := make([]*worker, workers)
	for i := range ws {
		ws[i] = &worker{id: i}
		wg.Add(1)
		go ws[i].run(data, stop, &wg)
	}
	t := &ticker{f: f, lastSteps: make([]uint64, workers), lastProgress: make([]int, workers)}
	tickerDone := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				tickerDone <- nil
				return
			default:
			}
			line := []byte(fmt.Sprintf("tick %d\n", t.n))
			if k, err := t.f.Write(line); err != nil || k != len(line) {
				tickerDone <- fmt.Errorf("writing tick %d: %d of %d bytes: %v", t.n, k, len(line), err)
				return
			}
			t.n++
			b := t.n % len(blockCRC)
			if t.failure == "" && crc32.ChecksumIEEE(data[b*block:(b+1)*block]) != blockCRC[b] {
				t.failure = fmt.Sprintf("data block %d changed (seen at tick %d)", b, t.n)
			}
			for i, w := range ws {
				if s := w.progress(); s != t.lastSteps[i] {
					t.lastSteps[i], t.lastProgress[i] = s, t.n
				}
			}
			if corrupt != "" && t.n == corruptAt {
				switch corrupt {
				case "data":
					data[dataBytes/2+12345] ^= 0x40
				case "map":
					table["k777"] = "bogus"
				case "worker":
					ws[1].mu.Lock()
					ws[1].acc ^= 1
					ws[1].mu.Unlock()
				}
			}
			time.Sleep(tickEvery)
		}
	}()

	tmp := pidfile + ".tmp"
	if err := os.WriteFile(tmp, []byte(fmt.Sprintf("%d\n", os.Getpid())), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := os.Rename(tmp, pidfile); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}

	var reason string
	select {
	case <-sigs:
		close(stop)
		reason = verify(ticksPath, data, blockCRC, table, ws, t, tickerDone, &wg)
	case err := <-tickerDone:
		reason = fmt.Sprintf("the ticker stopped: %v", err)
	}
	line := fmt.Sprintf("PASS: %s: %d ticks, %d worker goroutines (steps %v), %d MiB data, %d map entries, GOMAXPROCS %d",
		runtime.Version(), t.n, workers, t.lastSteps, dataBytes>>20, entries, runtime.GOMAXPROCS(0))
	status := 0
	if reason != "" {
		line, status = "FAIL: "+reason, 1
	}
	v, err := os.OpenFile(verdictPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err == nil {
		_, err = v.Write([]byte(line + "\n"))
		v.Close()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "writing the verdict:", err)
		status = 1
	}
	os.Exit(status)
}

func verify(ticksPath string, data []byte, blockCRC []uint32, table map[string]string, ws []*worker, t *ticker, tickerDone <-chan error, wg *sync.WaitGroup) string {
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	timeout := time.After(5 * time.Second)
	select {
	case err := <-tickerDone:
		if err != nil {
			return fmt.Sprintf("the ticker stopped: %v", err)
		}
	case <-timeout:
		return "the ticker goroutine did not stop within 5 s"
	}
	select {
	case <-allDone:
	case <-timeout:
		return "the worker goroutines did not stop within 5 s"
	}
	if t.failure != "" {
		return t.failure
	}
	for i := range ws {
		if t.n-t.lastProgress[i] > stallTicks {
			return fmt.Sprintf("worker %d made no progress since tick %d (now %d)", i, t.lastProgress[i], t.n)
		}
	}
	expected := makeData()
	if !bytes.Equal(data, expected) {
		off := 0
		for data[off] == expected[off] {
			off++
		}
		return fmt.Sprintf("data differs at offset %d: %#x, expected %#x", off, data[off], expected[off])
	}
	for b, c := range blockCRC {
		if crc32.ChecksumIEEE(expected[b*block:(b+1)*block]) != c {
			return fmt.Sprintf("block CRC table entry %d is wrong", b)
		}
	}
	if len(table) != entries {
		return fmt.Sprintf("map has %d entries, expected %d", len(table), entries)
	}
	for i := 0; i < entries; i++ {
		k := fmt.Sprintf("k%d", i)
		if table[k] != entry(i) {
			return fmt.Sprintf("map entry %s is %q, expected %q", k, table[k], entry(i))
		}
	}
	for _, w := range ws {
		var acc uint32
		for i := uint64(0); i < w.steps; i++ {
			acc = step(expected, w.id, acc, i)
		}
		if acc != w.acc {
			return fmt.Sprintf("worker %d checksum after %d steps is %#x, replay gives %#x", w.id, w.steps, w.acc, acc)
		}
		t.lastSteps[w.id] = w.steps
	}
	text, err := os.ReadFile(ticksPath)
	if err != nil {
		return fmt.Sprintf("reading the tick file: %v", err)
	}
	if len(text) == 0 || text[len(text)-1] != '\n' {
		return "the tick file does not end with a newline"
	}
	lines := bytes.Split(text[:len(text)-1], []byte("\n"))
	if len(lines) != t.n {
		return fmt.Sprintf("the tick file has %d lines, the process wrote %d ticks", len(lines), t.n)
	}
	for i, l := range lines {
		if string(l) != fmt.Sprintf("tick %d", i) {
			return fmt.Sprintf("tick file line %d is %q, expected \"tick %d\"", i+1, l, i)
		}
	}
	return ""
}
