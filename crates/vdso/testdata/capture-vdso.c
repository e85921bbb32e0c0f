/*
 * capture-vdso: save the running kernel's vDSO image and the special-mapping
 * layout of the current process, for use as test data.
 *
 * Build: gcc -static -O2 -Wall -o capture-vdso capture-vdso.c
 * Usage: capture-vdso OUTDIR [TAG]
 *
 * Writes, with TAG defaulting to `uname -r`:
 *   OUTDIR/vdso-TAG.maps   every [vvar*] and [vdso] line of /proc/self/maps, verbatim
 *   OUTDIR/vdso-TAG.so     the bytes of the [vdso] mapping, start to end, read from memory
 *   OUTDIR/vdso-TAG.uname  the kernel release (what `uname -r` prints) plus a newline
 * and prints a short summary on stdout.  Exits non-zero on any failure.
 *
 * Typical use under another kernel (see /work/shared/tools/README.md):
 *   run-in-kernel.sh --kernel "$(fetch-kernel.sh 6.1)" --share /tmp/cap -- \
 *       /tmp/cap/capture-vdso /tmp/cap 6.1
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/utsname.h>
#include <unistd.h>

static void die(const char *what)
{
	fprintf(stderr, "capture-vdso: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void write_file(const char *path, const void *buf, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		die(path);
	const char *p = buf;
	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die(path);
		}
		p += n;
		len -= (size_t)n;
	}
	if (close(fd) < 0)
		die(path);
}

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: %s OUTDIR [TAG]\n", argv[0]);
		return 2;
	}
	const char *dir = argv[1];
	struct utsname u;
	if (uname(&u) < 0)
		die("uname");
	const char *tag = argc > 2 ? argv[2] : u.release;

	/* Read /proc/self/maps once, into memory, before opening any output file
	 * (so the maps we record are the ones of this very state). */
	static char maps[1 << 20];
	size_t mlen = 0;
	int fd = open("/proc/self/maps", O_RDONLY);
	if (fd < 0)
		die("/proc/self/maps");
	for (;;) {
		ssize_t n = read(fd, maps + mlen, sizeof(maps) - 1 - mlen);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("read /proc/self/maps");
		}
		if (n == 0)
			break;
		mlen += (size_t)n;
	}
	close(fd);
	maps[mlen] = '\0';

	/* Keep the [vvar*] and [vdso] lines verbatim; remember the [vdso] range. */
	static char out[1 << 16];
	size_t olen = 0;
	unsigned long vs = 0, ve = 0;
	for (char *line = maps; *line;) {
		char *nl = strchr(line, '\n');
		size_t len = nl ? (size_t)(nl - line) + 1 : strlen(line);
		char *name = memchr(line, '[', len);
		if (name && (!strncmp(name, "[vvar", 5) || !strncmp(name, "[vdso]", 6))) {
			if (olen + len >= sizeof(out)) {
				fprintf(stderr, "capture-vdso: too many lines\n");
				return 1;
			}
			memcpy(out + olen, line, len);
			olen += len;
			if (!nl)
				out[olen++] = '\n';
			if (!strncmp(name, "[vdso]", 6) && sscanf(line, "%lx-%lx", &vs, &ve) != 2) {
				fprintf(stderr, "capture-vdso: bad [vdso] line\n");
				return 1;
			}
		}
		line += len;
	}
	if (!vs || ve <= vs) {
		fprintf(stderr, "capture-vdso: no [vdso] mapping in /proc/self/maps\n");
		return 1;
	}
	unsigned long aux = getauxval(AT_SYSINFO_EHDR);
	if (aux != vs)
		fprintf(stderr, "capture-vdso: warning: AT_SYSINFO_EHDR %#lx != [vdso] start %#lx\n", aux, vs);
	if (memcmp((void *)vs, ELFMAG, SELFMAG)) {
		fprintf(stderr, "capture-vdso: [vdso] does not start with an ELF header\n");
		return 1;
	}

	char path[4096];
	snprintf(path, sizeof(path), "%s/vdso-%s.maps", dir, tag);
	write_file(path, out, olen);
	snprintf(path, sizeof(path), "%s/vdso-%s.so", dir, tag);
	write_file(path, (const void *)vs, ve - vs);
	snprintf(path, sizeof(path), "%s/vdso-%s.uname", dir, tag);
	char rel[sizeof(u.release) + 1];
	int rlen = snprintf(rel, sizeof(rel), "%s\n", u.release);
	write_file(path, rel, (size_t)rlen);

	printf("uname: %s\n", u.release);
	printf("vdso: %#lx-%#lx (%lu bytes)\n", vs, ve, ve - vs);
	fwrite(out, 1, olen, stdout);
	return 0;
}
