/*
 * _slowfs: a FUSE passthrough of one directory whose fsync costs a fixed delay.
 *
 *     _slowfs MOUNTPOINT -o backing=DIR,delay_us=N [-f] [other FUSE options]
 *
 * Built and run by scripts/slowdisk, which attaches a filesystem image living on this mount
 * to a loop device: the loop driver turns every cache flush of the filesystem above it into
 * an fsync of the image, and here each fsync (or fdatasync) first does the real one, then
 * sleeps N microseconds, like a disk whose cache flush is slow (a rotating disk, a network
 * block device). Reads and writes cost nothing extra.
 *
 * Only what a loop-attached image needs is implemented: files in the top directory, opened,
 * read, written, truncated, fsynced; no rename, unlink, links or permissions changes.
 *
 * /.stats is a virtual file: the fsync and fdatasync calls served so far, and the delay.
 */
#define FUSE_USE_VERSION 31

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#define STATS_PATH "/.stats"
/* fi->fh of an open /.stats: no real descriptor is ever this large */
#define STATS_FH ((uint64_t)-1)

static struct slowfs {
	char *backing;          /* -o backing=DIR */
	unsigned long delay_us; /* -o delay_us=N */
	int dirfd;              /* the backing directory: every path is resolved from it */
	unsigned long n_fsync, n_fdatasync; /* updated atomically: FUSE runs ops on many threads */
} S = {.dirfd = -1};

static const struct fuse_opt OPTS[] = {
	{"backing=%s", offsetof(struct slowfs, backing), 0},
	{"delay_us=%lu", offsetof(struct slowfs, delay_us), 0},
	FUSE_OPT_END,
};

/* FUSE paths start with "/"; *at() calls want them relative to the backing directory.
 * Resolving from a held descriptor keeps working after libfuse chdirs to "/" (daemon mode). */
static const char *rel(const char *path)
{
	return path[1] ? path + 1 : ".";
}

static int stats_text(char *buf, size_t size)
{
	return snprintf(buf, size, "fsync %lu\nfdatasync %lu\ndelay_us %lu\n",
			__atomic_load_n(&S.n_fsync, __ATOMIC_RELAXED),
			__atomic_load_n(&S.n_fdatasync, __ATOMIC_RELAXED), S.delay_us);
}

static int sf_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	if (strcmp(path, STATS_PATH) == 0) {
		memset(st, 0, sizeof(*st));
		/* size 0, read with direct_io (see sf_open): the text's length changes */
		st->st_mode = S_IFREG | 0444;
		st->st_nlink = 1;
		return 0;
	}
	int r = fi ? fstat((int)fi->fh, st) : fstatat(S.dirfd, rel(path), st, AT_SYMLINK_NOFOLLOW);
	return r < 0 ? -errno : 0;
}

static int sf_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
		      struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
	(void)off, (void)fi, (void)flags;
	int fd = openat(S.dirfd, rel(path), O_RDONLY | O_DIRECTORY);
	if (fd < 0)
		return -errno;
	DIR *d = fdopendir(fd);
	if (!d) {
		int e = errno;
		close(fd);
		return -e;
	}
	/* offset 0 to fill(): libfuse buffers the whole listing, enough for one directory */
	for (struct dirent *e; (e = readdir(d));)
		if (fill(buf, e->d_name, NULL, 0, 0))
			break;
	closedir(d);
	return 0;
}

static int sf_open(const char *path, struct fuse_file_info *fi)
{
	if (strcmp(path, STATS_PATH) == 0) {
		fi->fh = STATS_FH;
		fi->direct_io = 1; /* every read comes here: no page cache, no size limit */
		return 0;
	}
	int fd = openat(S.dirfd, rel(path), fi->flags);
	if (fd < 0)
		return -errno;
	fi->fh = (uint64_t)fd;
	return 0;
}

static int sf_create(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	int fd = openat(S.dirfd, rel(path), fi->flags | O_CREAT, mode);
	if (fd < 0)
		return -errno;
	fi->fh = (uint64_t)fd;
	return 0;
}

static int sf_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)path;
	if (fi->fh == STATS_FH) {
		char text[128];
		int n = stats_text(text, sizeof(text));
		if (off >= n)
			return 0;
		size_t k = (size_t)(n - off) < size ? (size_t)(n - off) : size;
		memcpy(buf, text + off, k);
		return (int)k;
	}
	/* pread/pwrite take the offset as an argument: threads sharing the descriptor are safe */
	ssize_t n = pread((int)fi->fh, buf, size, off);
	return n < 0 ? -errno : (int)n;
}

static int sf_write(const char *path, const char *buf, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	(void)path;
	if (fi->fh == STATS_FH)
		return -EBADF;
	ssize_t n = pwrite((int)fi->fh, buf, size, off);
	return n < 0 ? -errno : (int)n;
}

static int sf_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
	if (fi)
		return ftruncate((int)fi->fh, size) < 0 ? -errno : 0;
	int fd = openat(S.dirfd, rel(path), O_WRONLY);
	if (fd < 0)
		return -errno;
	int r = ftruncate(fd, size) < 0 ? -errno : 0;
	close(fd);
	return r;
}

/* close(2) on our side costs nothing: the data went to the backing file with pwrite already,
 * and a write error was reported then; only fsync is meant to be slow. */
static int sf_flush(const char *path, struct fuse_file_info *fi)
{
	(void)path, (void)fi;
	return 0;
}

static int sf_release(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	if (fi->fh != STATS_FH)
		close((int)fi->fh);
	return 0;
}

static int sf_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
	(void)path;
	if (fi->fh == STATS_FH)
		return 0;
	/* The real flush first, so what the caller is told is durable is; then the extra cost. */
	int fd = (int)fi->fh;
	if ((datasync ? fdatasync(fd) : fsync(fd)) < 0)
		return -errno;
	__atomic_fetch_add(datasync ? &S.n_fdatasync : &S.n_fsync, 1, __ATOMIC_RELAXED);
	struct timespec t = {.tv_sec = (time_t)(S.delay_us / 1000000),
			     .tv_nsec = (long)(S.delay_us % 1000000) * 1000};
	/* a signal must not shorten the delay: sleep on for what is left */
	while (nanosleep(&t, &t) < 0 && errno == EINTR)
		;
	return 0;
}

static int sf_statfs(const char *path, struct statvfs *sv)
{
	(void)path;
	return fstatvfs(S.dirfd, sv) < 0 ? -errno : 0;
}

static void sf_destroy(void *data)
{
	(void)data;
	char text[128];
	stats_text(text, sizeof(text));
	fprintf(stderr, "_slowfs: unmounted after:\n%s", text);
}

static const struct fuse_operations OPS = {
	.getattr = sf_getattr,
	.readdir = sf_readdir,
	.open = sf_open,
	.create = sf_create,
	.read = sf_read,
	.write = sf_write,
	.truncate = sf_truncate,
	.flush = sf_flush,
	.release = sf_release,
	.fsync = sf_fsync,
	.statfs = sf_statfs,
	.destroy = sf_destroy,
};

int main(int argc, char *argv[])
{
	struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
	/* takes our two options out of args; the rest (mount point, -f, ...) goes to libfuse */
	if (fuse_opt_parse(&args, &S, OPTS, NULL) < 0)
		return 1;
	if (!S.backing) {
		fprintf(stderr, "usage: %s MOUNTPOINT -o backing=DIR[,delay_us=N] [FUSE options]\n",
			argv[0]);
		return 1;
	}
	S.dirfd = open(S.backing, O_RDONLY | O_DIRECTORY);
	if (S.dirfd < 0) {
		perror(S.backing);
		return 1;
	}
	int r = fuse_main(args.argc, args.argv, &OPS, NULL);
	fuse_opt_free_args(&args);
	return r;
}
