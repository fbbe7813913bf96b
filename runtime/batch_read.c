/* Batched positional reads for the FlashReader: n requests (offset, length, destination) as one call from
 * Python (which releases the GIL), either
 *  - xpuc_aio_batch: Linux native AIO from the calling thread, `depth` requests in flight on one submission
 *    queue (O_DIRECT files; PowerInfer-2 issues its reads from one core), or
 *  - xpuc_pread_batch: `threads` POSIX threads each issuing blocking preads (any file, any kernel).
 * After the reads, records are copied out of the read spans. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__linux__)
#include <linux/aio_abi.h>
#endif

typedef struct {
    int fd, n, next, err;
    const int64_t *off, *len, *want;
    uint8_t *const *dst;
    int64_t err_off, err_got;
    pthread_mutex_t mu;
} batch_t;

static void *worker(void *arg) {
    batch_t *b = (batch_t *)arg;
    for (;;) {
        pthread_mutex_lock(&b->mu);
        int i = b->err ? b->n : b->next++;
        pthread_mutex_unlock(&b->mu);
        if (i >= b->n) return NULL;
        int64_t done = 0;
        while (done < b->len[i]) {
            ssize_t got = pread(b->fd, b->dst[i] + done, (size_t)(b->len[i] - done), (off_t)(b->off[i] + done));
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) {
                if (done >= b->want[i]) break; /* end of file after the bytes that matter */
                pthread_mutex_lock(&b->mu);
                if (!b->err) {
                    b->err = got < 0 ? errno : -1;
                    b->err_off = b->off[i];
                    b->err_got = done;
                }
                pthread_mutex_unlock(&b->mu);
                return NULL;
            }
            done += got;
            if (got % 4096) { /* O_DIRECT reads only come back short at the end of the file */
                if (done >= b->want[i]) break;
            }
        }
    }
}

/* Returns 0, an errno value, or -1 for a short read; err_info = {offset, bytes read} of the failure. */
int xpuc_pread_batch(int fd, int n, const int64_t *off, const int64_t *len, const int64_t *want,
                     uint8_t *const *dst, int threads, int64_t *err_info) {
    batch_t b = {fd, n, 0, 0, off, len, want, dst, 0, 0, PTHREAD_MUTEX_INITIALIZER};
    pthread_t tid[64];
    int t = threads < 1 ? 1 : (threads > 64 ? 64 : threads);
    if (t > n) t = n;
    int started = 0;
    for (int k = 1; k < t; k++)
        if (pthread_create(&tid[started], NULL, worker, &b) == 0) started++;
    worker(&b);
    for (int k = 0; k < started; k++) pthread_join(tid[k], NULL);
    err_info[0] = b.err_off;
    err_info[1] = b.err_got;
    return b.err;
}

#if defined(__linux__) && defined(SYS_io_setup)
/* One AIO context per thread, grown to the deepest queue asked for (io_setup is a system call). */
static __thread aio_context_t aio_ctx = 0;
static __thread int aio_cap = 0;

static int aio_context(int depth) {
    if (aio_ctx && aio_cap >= depth) return 0;
    if (aio_ctx) syscall(SYS_io_destroy, aio_ctx);
    aio_ctx = 0;
    aio_cap = 0;
    if (syscall(SYS_io_setup, depth, &aio_ctx) < 0) {
        aio_ctx = 0;
        return errno;
    }
    aio_cap = depth;
    return 0;
}

uint32_t xpuc_crc32(const uint8_t *p, int64_t n);

/* Records read by one batch: request i holds records rec_begin[i] .. rec_begin[i+1]-1, record k at rec_src[k]
 * (inside request i's span), to be checked against crc[k] (when crc is given) and copied to rec_dst[k]. */
typedef struct {
    const int64_t *begin;
    uint8_t *const *src, *const *dst;
    int64_t nbytes;
    const uint32_t *crc;
} records_t;

/* Check and copy out request i's records; returns the first bad record's index or -1. */
static int64_t copy_out(const records_t *r, int i) {
    for (int64_t k = r->begin[i]; k < r->begin[i + 1]; k++) {
        if (r->crc && xpuc_crc32(r->src[k], r->nbytes) != r->crc[k]) return k;
        memcpy(r->dst[k], r->src[k], (size_t)r->nbytes);
    }
    return -1;
}

static int aio_batch(int fd, int n, const int64_t *off, const int64_t *len, const int64_t *want,
                     uint8_t *const *dst, int depth, int64_t *err_info, const records_t *rec);

/* Returns 0, an errno value, -1 for a short read, or -2 when native AIO is not available here (ENOSYS, the
 * system's aio-max-nr reached): the caller falls back to xpuc_pread_batch. err_info as xpuc_pread_batch. */
int xpuc_aio_batch(int fd, int n, const int64_t *off, const int64_t *len, const int64_t *want,
                   uint8_t *const *dst, int depth, int64_t *err_info) {
    return aio_batch(fd, n, off, len, want, dst, depth, err_info, NULL);
}

/* As xpuc_aio_batch, and each request's records are checked and copied out as soon as it completes, while the
 * other requests are in flight (the checksums' CPU time hides behind the device's); -3: record err_info[0]
 * fails its checksum. */
int xpuc_aio_batch_records(int fd, int n, const int64_t *off, const int64_t *len, const int64_t *want,
                           uint8_t *const *dst, int depth, int64_t *err_info, const int64_t *rec_begin,
                           uint8_t *const *rec_src, uint8_t *const *rec_dst, int64_t rec_bytes, const uint32_t *crc) {
    records_t r = {rec_begin, rec_src, rec_dst, rec_bytes, crc};
    return aio_batch(fd, n, off, len, want, dst, depth, err_info, &r);
}

static int aio_batch(int fd, int n, const int64_t *off, const int64_t *len, const int64_t *want,
                     uint8_t *const *dst, int depth, int64_t *err_info, const records_t *rec) {
    if (n <= 0) return 0;
    int d = depth < 1 ? 1 : (depth > 256 ? 256 : depth);
    if (d > n) d = n;
    int e = aio_context(d < 32 ? 32 : d);
    if (e) return -2;
    struct iocb *cb = calloc((size_t)n, sizeof(struct iocb));
    int64_t *done = calloc((size_t)n, sizeof(int64_t));
    int *ready = malloc(sizeof(int) * (size_t)n); /* requests to (re)submit, a stack */
    struct iocb **sub = malloc(sizeof(struct iocb *) * (size_t)d);
    struct io_event ev[256];
    int rc = 0, next = 0, nready = 0, inflight = 0, finished = 0;
    if (!cb || !done || !ready || !sub) {
        rc = ENOMEM;
        goto out;
    }
    while (finished < n) {
        int k = 0;
        while (inflight + k < d && (nready > 0 || next < n)) {
            int i = nready > 0 ? ready[--nready] : next++;
            memset(&cb[i], 0, sizeof(cb[i]));
            cb[i].aio_data = (uint64_t)i;
            cb[i].aio_lio_opcode = IOCB_CMD_PREAD;
            cb[i].aio_fildes = (uint32_t)fd;
            cb[i].aio_buf = (uint64_t)(uintptr_t)(dst[i] + done[i]);
            cb[i].aio_nbytes = (uint64_t)(len[i] - done[i]);
            cb[i].aio_offset = off[i] + done[i];
            sub[k++] = &cb[i];
        }
        int at = 0;
        while (at < k) {
            long got = syscall(SYS_io_submit, aio_ctx, (long)(k - at), sub + at);
            if (got < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN && inflight > 0) break; /* reap first, the rest waits in `ready` */
                rc = errno;
                goto drain;
            }
            at += (int)got;
            inflight += (int)got;
        }
        for (int j = k - 1; j >= at; j--) ready[nready++] = (int)sub[j]->aio_data;
        long got;
        do {
            got = syscall(SYS_io_getevents, aio_ctx, 1L, (long)d, ev, NULL);
        } while (got < 0 && errno == EINTR);
        if (got < 0) {
            rc = errno;
            goto drain;
        }
        for (long j = 0; j < got; j++) {
            int i = (int)ev[j].data;
            long long res = (long long)ev[j].res;
            inflight--;
            if (res < 0) {
                if (res == -EINTR || res == -EAGAIN) {
                    ready[nready++] = i;
                    continue;
                }
                if (!rc) {
                    rc = (int)-res;
                    err_info[0] = off[i];
                    err_info[1] = done[i];
                }
                continue;
            }
            done[i] += res;
            if (done[i] >= len[i] || res == 0 || res % 4096) { /* whole, or the end of the file */
                if (done[i] < want[i] && !rc) {
                    rc = -1;
                    err_info[0] = off[i];
                    err_info[1] = done[i];
                }
                finished++;
                if (rec && !rc) {
                    int64_t bad = copy_out(rec, i);
                    if (bad >= 0) {
                        rc = -3;
                        err_info[0] = bad;
                        err_info[1] = 0;
                    }
                }
            } else {
                ready[nready++] = i; /* a partial read: the rest */
            }
        }
        if (rc) goto drain;
    }
    goto out;
drain: /* an error: wait for what is still in flight (its buffers belong to the caller) */
    while (inflight > 0) {
        long got = syscall(SYS_io_getevents, aio_ctx, 1L, (long)d, ev, NULL);
        if (got < 0 && errno != EINTR) break;
        if (got > 0) inflight -= (int)got;
    }
out:
    free(cb);
    free(done);
    free(ready);
    free(sub);
    return rc;
}
#else
int xpuc_aio_batch(int fd, int n, const int64_t *off, const int64_t *len, const int64_t *want,
                   uint8_t *const *dst, int depth, int64_t *err_info) {
    (void)fd; (void)n; (void)off; (void)len; (void)want; (void)dst; (void)depth; (void)err_info;
    return -2;
}
int xpuc_aio_batch_records(int fd, int n, const int64_t *off, const int64_t *len, const int64_t *want,
                           uint8_t *const *dst, int depth, int64_t *err_info, const int64_t *rec_begin,
                           uint8_t *const *rec_src, uint8_t *const *rec_dst, int64_t rec_bytes, const uint32_t *crc) {
    (void)fd; (void)n; (void)off; (void)len; (void)want; (void)dst; (void)depth; (void)err_info;
    (void)rec_begin; (void)rec_src; (void)rec_dst; (void)rec_bytes; (void)crc;
    return -2;
}
#endif

/* CRC-32 (the zlib/PNG polynomial, reflected 0xEDB88320), slicing by 8. */
static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

uint32_t xpuc_crc32(const uint8_t *p, int64_t n) {
    pthread_once(&crc_once, crc_init);
    uint32_t c = 0xFFFFFFFFu;
    while (n >= 8) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        a ^= c; /* little-endian hosts (x86-64, AArch64) */
        c = crc_table[7][a & 0xFF] ^ crc_table[6][(a >> 8) & 0xFF] ^ crc_table[5][(a >> 16) & 0xFF] ^
            crc_table[4][a >> 24] ^ crc_table[3][b & 0xFF] ^ crc_table[2][(b >> 8) & 0xFF] ^
            crc_table[1][(b >> 16) & 0xFF] ^ crc_table[0][b >> 24];
        p += 8;
        n -= 8;
    }
    while (n-- > 0) c = crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* dst[k][0:nbytes] = src[k][0:nbytes] for k < n; when crc is given, checks each record's CRC-32 and returns the
 * index of the first mismatch (or -1 when all match). */
int64_t xpuc_copy_records(int n, uint8_t *const *src, uint8_t *const *dst, int64_t nbytes, const uint32_t *crc) {
    for (int k = 0; k < n; k++) {
        if (crc && xpuc_crc32(src[k], nbytes) != crc[k]) return k;
        memcpy(dst[k], src[k], (size_t)nbytes);
    }
    return -1;
}
