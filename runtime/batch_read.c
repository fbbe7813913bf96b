/* Batched positional reads for the FlashReader: n requests (offset, length, destination) issued by up to
 * `threads` POSIX threads, so that a whole batch is one call from Python (which releases the GIL) and the
 * device sees `threads` requests in flight. After the reads, records are copied out of the read spans. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

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
