/*
 * memhold: the benchmark workload. Fills N MiB of private anonymous memory with distinct
 * content (every 8-byte word depends on its index, so no two pages are alike), reports
 * "READY pid=P" in a state file, then naps. On SIGUSR1 it verifies every word and reports
 * "OK pid=P" or "BAD pid=P words=W", so a benchmark can prove the restored copy is intact.
 * With THREADS > 1 it runs that many threads in all (the others nap in nanosleep too, each
 * holding a word of its own that is verified with the memory). With PROCESSES > 1 it is a
 * tree: the first process forks PROCESSES - 1 children before anything else, and each of
 * them holds MIB / PROCESSES of its own distinct memory and THREADS threads; on SIGUSR1 the
 * first one asks each child to verify (STATE_FILE.<k>) and reports for all.
 *
 * With MEMHOLD_TICK=1 in the environment, one more thread wakes every millisecond and keeps
 * the longest gap between two wake-ups: what a freeze looks like from inside. On SIGUSR2 it
 * writes "GAP us=<longest>" to STATE_FILE.gap and starts over.
 *
 * On SIGHUP (the first process only) it rewrites the first MEMHOLD_REWRITE_MIB MiB (16 by
 * default) of its memory with the next generation (each word XORed with it: still distinct),
 * then writes "REWRITTEN gen=<g>" to STATE_FILE.rw; verification expects the generation.
 *
 *   memhold MIB STATE_FILE [THREADS [PROCESSES]]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t verify_now;

#define MAX_THREADS 1024
static volatile uint64_t thread_word[MAX_THREADS];

/* A helper thread: keeps its own word and naps. */
static void *napper(void *arg)
{
	uintptr_t id = (uintptr_t)arg;
	struct timespec nap = { 0, 10 * 1000 * 1000 };

	thread_word[id] = 0x5ea7ull << 32 | id;
	for (;;)
		nanosleep(&nap, NULL);
	return NULL;
}

static volatile sig_atomic_t gap_now;
static const char *gap_path;

static void on_usr2(int sig)
{
	(void)sig;
	gap_now = 1;
}

static uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

static void state(const char *path, const char *line);

/* The ticker: the longest time between two of its 1 ms naps. */
static void *ticker(void *arg)
{
	struct timespec nap = { 0, 1000 * 1000 };
	uint64_t last = now_us(), longest = 0;

	(void)arg;
	for (;;) {
		uint64_t t;

		nanosleep(&nap, NULL);
		t = now_us();
		if (t - last > longest)
			longest = t - last;
		last = t;
		if (gap_now) {
			char line[64];

			gap_now = 0;
			snprintf(line, sizeof(line), "GAP us=%llu\n", (unsigned long long)longest);
			state(gap_path, line);
			longest = 0;
		}
	}
	return NULL;
}

static volatile sig_atomic_t rewrite_now;

static void on_hup(int sig)
{
	(void)sig;
	rewrite_now = 1;
}

static void on_usr1(int sig)
{
	(void)sig;
	verify_now = 1;
}

static uint64_t word(uint64_t i)
{
	uint64_t x = i + 0x243f6a8885a308d3ull;

	x ^= x >> 31;
	x *= 0x7fb5d329728ea185ull;
	return x ^ (x >> 27);
}

/* Replaces the state file atomically: readers never see half a line. */
static void state(const char *path, const char *line)
{
	char tmp[4096];
	int fd;

	snprintf(tmp, sizeof(tmp), "%s.new", path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0)
		return;
	if (write(fd, line, strlen(line)) < 0)
		return;
	close(fd);
	rename(tmp, path);
}

int main(int argc, char **argv)
{
	struct timespec nap = { 0, 10 * 1000 * 1000 };
	char line[128];
	uint64_t *mem;
	size_t words, i;
	long threads = argc > 3 ? strtol(argv[3], NULL, 10) : 1;
	long procs = argc > 4 ? strtol(argv[4], NULL, 10) : 1;
	pid_t kids[64];
	long me = 0;
	char own_state[4096];

	if (argc < 3 || argc > 5 || threads < 1 || threads > MAX_THREADS || procs < 1 || procs > 64) {
		fprintf(stderr, "usage: memhold MIB STATE_FILE [THREADS [PROCESSES]]\n");
		return 2;
	}
	signal(SIGUSR1, on_usr1);
	signal(SIGHUP, on_hup);
	for (long k = 1; k < procs; k++) {
		kids[k] = fork();
		if (kids[k] < 0)
			return 1;
		if (kids[k] == 0) {
			me = k;
			break;
		}
	}
	if (me)
		snprintf(own_state, sizeof(own_state), "%s.%ld", argv[2], me);
	else
		snprintf(own_state, sizeof(own_state), "%s", argv[2]);
	words = (strtoull(argv[1], NULL, 10) << 17) / (uint64_t)procs; /* MiB / 8 bytes */
	mem = mmap(NULL, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return 1;
	for (i = 0; i < words; i++)
		mem[i] = word(i + (uint64_t)me * words);
	for (long t = 1; t < threads; t++) {
		pthread_t th;

		if (pthread_create(&th, NULL, napper, (void *)(uintptr_t)t))
			return 1;
	}
	for (long t = 1; t < threads; t++)
		while (thread_word[t] != (0x5ea7ull << 32 | (uint64_t)t))
			nanosleep(&nap, NULL);
	if (!me && getenv("MEMHOLD_TICK")) {
		static char path[4200];
		pthread_t th;

		snprintf(path, sizeof(path), "%s.gap", argv[2]);
		gap_path = path;
		signal(SIGUSR2, on_usr2);
		if (pthread_create(&th, NULL, ticker, NULL))
			return 1;
	}
	if (me) {
		snprintf(line, sizeof(line), "READY pid=%d\n", getpid());
		state(own_state, line);
	} else {
		/* Ready when every child is. */
		for (long k = 1; k < procs; k++) {
			char path[4200];
			struct stat st;

			snprintf(path, sizeof(path), "%s.%ld", argv[2], k);
			while (stat(path, &st))
				nanosleep(&nap, NULL);
			unlink(path);
		}
		snprintf(line, sizeof(line), "READY pid=%d\n", getpid());
		state(argv[2], line);
	}
	size_t rewrite_words = getenv("MEMHOLD_REWRITE_MIB")
				       ? strtoull(getenv("MEMHOLD_REWRITE_MIB"), NULL, 10) << 17
				       : 16 << 17;
	uint64_t gen = 0;

	if (rewrite_words > words)
		rewrite_words = words;
	for (;;) {
		size_t bad = 0;

		nanosleep(&nap, NULL);
		if (rewrite_now && !me) {
			char rw[4200];

			rewrite_now = 0;
			gen++;
			for (i = 0; i < rewrite_words; i++)
				mem[i] = word(i) ^ (gen * 0x9e3779b97f4a7c15ull);
			snprintf(rw, sizeof(rw), "%s.rw", argv[2]);
			snprintf(line, sizeof(line), "REWRITTEN gen=%llu\n", (unsigned long long)gen);
			state(rw, line);
		}
		if (!verify_now)
			continue;
		verify_now = 0;
		for (long k = 1; !me && k < procs; k++)
			kill(kids[k], SIGUSR1);
		for (i = 0; i < words; i++)
			bad += mem[i] != (word(i + (uint64_t)me * words) ^
					  (i < rewrite_words ? gen * 0x9e3779b97f4a7c15ull : 0));
		for (long t = 1; t < threads; t++)
			bad += thread_word[t] != (0x5ea7ull << 32 | (uint64_t)t);
		for (long k = 1; !me && k < procs; k++) {
			char path[4200], got[128] = "";
			int fd = -1;

			snprintf(path, sizeof(path), "%s.%ld", argv[2], k);
			for (int tries = 0; tries < 60000 && fd < 0; tries++) {
				fd = open(path, O_RDONLY);
				if (fd < 0)
					nanosleep(&nap, NULL);
			}
			if (fd < 0 || read(fd, got, sizeof(got) - 1) < 2 || strncmp(got, "OK", 2))
				bad++;
			if (fd >= 0)
				close(fd);
			unlink(path);
		}
		if (bad)
			snprintf(line, sizeof(line), "BAD pid=%d words=%zu\n", getpid(), bad);
		else
			snprintf(line, sizeof(line), "OK pid=%d\n", getpid());
		state(own_state, line);
	}
}
