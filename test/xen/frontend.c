/*
 * A blkif frontend for tapkit's `sim` Xen platform, written from XENSIM.md (version 1)
 * and Xen's public headers only: the ring is io/ring.h's macros over io/blkif.h's
 * structures, XenStore is libxenstore (XENSTORED_PATH), guest memory and the grant table
 * are files this program creates and maps MAP_SHARED, event channels are u32 port numbers
 * on D/evtchn.sock.
 *
 *   frontend DIR DOMID DEVID SCENARIO [options]
 *
 * Options: --abi 32|64, --order N (ring-page-order), --queues N, --persistent,
 * --seed N (data pattern), --count N (requests for wrap/bench), --qd N, --bs BYTES,
 * --random, --sectors N (disk sectors to use).
 *
 * Scenarios: rw, flush, discard, indirect, wrap, queues, hostile, overrun, reconnect,
 * readonly, bench. Each prints "ok SCENARIO ..." and exits 0, or prints "FAIL: ..."
 * and exits 1. Data written is pattern(offset, seed) so that the caller can check the
 * backend's disk afterwards.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define mb() __sync_synchronize()
#define rmb() __asm__ __volatile__("" ::: "memory")
#define wmb() __asm__ __volatile__("" ::: "memory")

#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/event_channel.h>
#include <xen/io/blkif.h>
#include <xen/io/protocols.h>
#include <xen/io/ring.h>
#include <xen/io/xenbus.h>
#include <xenstore.h>

/* The x86_32-abi structures (4-byte aligned u64s), as Linux blkback's common.h spells them. */
#pragma pack(push, 4)
struct req32 {
    uint8_t operation;
    uint8_t nr_segments;
    blkif_vdev_t handle;
    uint64_t id;
    blkif_sector_t sector_number;
    struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};
struct req32_discard {
    uint8_t operation;
    uint8_t flag;
    blkif_vdev_t handle;
    uint64_t id;
    blkif_sector_t sector_number;
    uint64_t nr_sectors;
};
struct req32_indirect {
    uint8_t operation;
    uint8_t indirect_op;
    uint16_t nr_segments;
    uint64_t id;
    blkif_sector_t sector_number;
    blkif_vdev_t handle;
    uint16_t _pad1;
    grant_ref_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    uint64_t _pad2;
};
struct rsp32 {
    uint64_t id;
    uint8_t operation;
    int16_t status;
};
#pragma pack(pop)
DEFINE_RING_TYPES(blkif_x86_32, struct req32, struct rsp32);

_Static_assert(sizeof(struct req32) == 108, "x86_32 request");
_Static_assert(sizeof(struct req32_indirect) == 64, "x86_32 indirect");
_Static_assert(sizeof(struct rsp32) == 12, "x86_32 response");
_Static_assert(sizeof(blkif_request_t) == 112, "x86_64 request");
_Static_assert(sizeof(blkif_response_t) == 16, "x86_64 response");

#define PAGE 4096
#define MEM_PAGES 8192   /* 32 MiB of guest memory */
#define GNT_ENTRIES 16384
#define TIMEOUT_MS 20000
#define MAX_QUEUES 4

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("FAIL: ", stdout);
    vprintf(fmt, ap);
    fputs("\n", stdout);
    va_end(ap);
    fflush(stdout);
    exit(1);
}

/* ---- guest memory and grants ------------------------------------------------ */

static uint8_t *mem;
static grant_entry_v1_t *gnt;
static unsigned next_page = 1, next_gref = 8; /* refs below 8 are reserved, as on Xen */
static int domid, devid;
static char dir[4096];

static void create_memory(void)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/dom%d", dir, domid);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/dom%d/memory", dir, domid);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, (off_t)MEM_PAGES * PAGE) < 0) fail("create %s: %s", path, strerror(errno));
    mem = mmap(NULL, (size_t)MEM_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mem == MAP_FAILED) fail("mmap memory: %s", strerror(errno));
    close(fd);
    snprintf(path, sizeof path, "%s/dom%d/grant-table", dir, domid);
    fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, GNT_ENTRIES * sizeof(grant_entry_v1_t)) < 0) fail("create %s: %s", path, strerror(errno));
    gnt = mmap(NULL, GNT_ENTRIES * sizeof(grant_entry_v1_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (gnt == MAP_FAILED) fail("mmap grant table: %s", strerror(errno));
    close(fd);
}

static void remove_memory(void)
{
    char path[4200];
    munmap(mem, (size_t)MEM_PAGES * PAGE);
    munmap(gnt, GNT_ENTRIES * sizeof(grant_entry_v1_t));
    snprintf(path, sizeof path, "%s/dom%d/memory", dir, domid);
    unlink(path);
    snprintf(path, sizeof path, "%s/dom%d/grant-table", dir, domid);
    unlink(path);
    snprintf(path, sizeof path, "%s/dom%d", dir, domid);
    rmdir(path);
}

static unsigned alloc_pages(unsigned n)
{
    if (next_page + n > MEM_PAGES) next_page = 1 + 64; /* recycle, keeping ring pages */
    unsigned p = next_page;
    next_page += n;
    return p;
}

static grant_ref_t grant_to(unsigned frame, int readonly, domid_t to)
{
    if (next_gref >= GNT_ENTRIES) next_gref = 1024; /* recycle, keeping the low refs */
    grant_ref_t ref = next_gref++;
    gnt[ref].domid = to;
    gnt[ref].frame = frame;
    wmb();
    gnt[ref].flags = GTF_permit_access | (readonly ? GTF_readonly : 0);
    return ref;
}

static grant_ref_t grant(unsigned frame, int readonly) { return grant_to(frame, readonly, 0); }

static uint8_t pattern(uint64_t offset, unsigned seed)
{
    return (uint8_t)((offset >> 9) * 31 + (offset & 511) + seed);
}

/* ---- event channels ---------------------------------------------------------- */

static int evfd = -1;

static void evtchn_connect(void)
{
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    snprintf(a.sun_path, sizeof a.sun_path, "%s/evtchn.sock", dir);
    evfd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(evfd, (struct sockaddr *)&a, sizeof a) < 0) fail("connect evtchn.sock: %s", strerror(errno));
    uint32_t hello = (uint32_t)domid;
    if (write(evfd, &hello, 4) != 4) fail("evtchn hello");
}

static void notify(evtchn_port_t port)
{
    uint32_t p = port;
    if (write(evfd, &p, 4) != 4) fail("evtchn notify: %s", strerror(errno));
}

/* Waits for any notification (or the timeout); returns 0 on timeout. */
static int wait_event(int ms)
{
    struct pollfd pfd = { .fd = evfd, .events = POLLIN };
    int r = poll(&pfd, 1, ms);
    if (r <= 0) return 0;
    uint32_t ports[256];
    ssize_t n = read(evfd, ports, sizeof ports);
    if (n <= 0) fail("event channel closed");
    return 1;
}

/* ---- XenStore ---------------------------------------------------------------- */

static struct xs_handle *xs;
static char fe[256], be[256];

static char *xs_get(const char *base, const char *key)
{
    char path[512];
    unsigned len;
    snprintf(path, sizeof path, "%s/%s", base, key);
    return xs_read(xs, XBT_NULL, path, &len);
}

static long xs_get_long(const char *base, const char *key, long dflt)
{
    char *v = xs_get(base, key);
    long r = v ? strtol(v, NULL, 10) : dflt;
    free(v);
    return r;
}

static void xs_put(xs_transaction_t t, const char *base, const char *key, const char *fmt, ...)
{
    char path[512], value[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(value, sizeof value, fmt, ap);
    va_end(ap);
    snprintf(path, sizeof path, "%s/%s", base, key);
    if (!xs_write(xs, t, path, value, strlen(value))) fail("xs_write %s: %s", path, strerror(errno));
}

static void set_state(int state)
{
    xs_put(XBT_NULL, fe, "state", "%d", state);
}

/* Waits until the backend's state is `want`, watching it (and re-reading on a timer). */
static void wait_backend_state(int want)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        long s = xs_get_long(be, "state", -1);
        if (s == want) return;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long ms = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (ms > TIMEOUT_MS) {
            char *err = xs_get(be, "error");
            fail("backend state %ld, waited for %d (error: %s)", s, want, err ? err : "none");
        }
        struct pollfd pfd = { .fd = xs_fileno(xs), .events = POLLIN };
        poll(&pfd, 1, 50);
        char **ev;
        unsigned n;
        while ((ev = xs_check_watch(xs)) != NULL) free(ev);
        (void)n;
    }
}

/* ---- the device ---------------------------------------------------------------- */

struct queue {
    blkif_front_ring_t r64;
    blkif_x86_32_front_ring_t r32;
    evtchn_port_t port;
    unsigned ring_page;
    grant_ref_t ring_refs[16];
};

static struct queue queues[MAX_QUEUES];
static int nqueues = 1, order = 0, abi32 = 0, persistent = 0;
static uint64_t disk_sectors;
static unsigned max_indirect;
static int16_t statuses[65536];
static uint8_t ops_seen[65536];
static int done_flags[65536];
static uint64_t next_id = 1;

#define WITH_RING(q, R, BODY)                                                          \
    do {                                                                               \
        if (abi32) {                                                                   \
            blkif_x86_32_front_ring_t *R = &(q)->r32;                                  \
            typedef struct req32 req_t;                                                \
            typedef struct req32_discard discard_t;                                    \
            typedef struct req32_indirect indirect_t;                                  \
            typedef struct rsp32 rsp_t;                                                \
            typedef struct blkif_x86_32_sring sring_t;                                 \
            BODY                                                                       \
        } else {                                                                       \
            blkif_front_ring_t *R = &(q)->r64;                                         \
            typedef blkif_request_t req_t;                                             \
            typedef blkif_request_discard_t discard_t;                                 \
            typedef blkif_request_indirect_t indirect_t;                               \
            typedef blkif_response_t rsp_t;                                            \
            typedef struct blkif_sring sring_t;                                        \
            BODY                                                                       \
        }                                                                              \
    } while (0)

static void setup_rings(void)
{
    unsigned pages = 1u << order;
    for (int q = 0; q < nqueues; q++) {
        struct queue *Q = &queues[q];
        Q->ring_page = alloc_pages(pages);
        void *sring = mem + (size_t)Q->ring_page * PAGE;
        memset(sring, 0, (size_t)pages * PAGE);
        WITH_RING(Q, R, {
            sring_t *s = sring;
            SHARED_RING_INIT(s);
            FRONT_RING_INIT(R, s, (size_t)pages * PAGE);
        });
        for (unsigned i = 0; i < pages; i++) Q->ring_refs[i] = grant(Q->ring_page + i, 0);
        Q->port = 10 + q;
    }
}

static void connect_device(void)
{
    wait_backend_state(XenbusStateInitWait);
    disk_sectors = xs_get_long(be, "sectors", 0);
    max_indirect = xs_get_long(be, "feature-max-indirect-segments", 0);
    if (order > xs_get_long(be, "max-ring-page-order", 0)) fail("backend does not offer ring order %d", order);
    if (nqueues > xs_get_long(be, "multi-queue-max-queues", 1)) fail("backend does not offer %d queues", nqueues);
    int use_persistent = persistent && xs_get_long(be, "feature-persistent", 0) == 1;
    setup_rings();
    for (;;) {
        xs_transaction_t t = xs_transaction_start(xs);
        if (!t) fail("xs_transaction_start: %s", strerror(errno));
        /* Keys of an earlier connection (another ring order or queue count) go first. */
        static const char *stale[] = { "ring-ref", "ring-page-order", "multi-queue-num-queues", "event-channel" };
        for (unsigned k = 0; k < sizeof stale / sizeof *stale; k++) {
            char path[512];
            snprintf(path, sizeof path, "%s/%s", fe, stale[k]);
            xs_rm(xs, t, path);
        }
        for (int k = 0; k < 16; k++) {
            char path[512];
            snprintf(path, sizeof path, "%s/ring-ref%d", fe, k);
            xs_rm(xs, t, path);
            snprintf(path, sizeof path, "%s/queue-%d", fe, k % MAX_QUEUES);
            xs_rm(xs, t, path);
        }
        for (int q = 0; q < nqueues; q++) {
            char base[300];
            if (nqueues > 1) snprintf(base, sizeof base, "%s/queue-%d", fe, q);
            else snprintf(base, sizeof base, "%s", fe);
            if (order == 0) xs_put(t, base, "ring-ref", "%u", queues[q].ring_refs[0]);
            else
                for (int i = 0; i < (1 << order); i++) {
                    char key[32];
                    snprintf(key, sizeof key, "ring-ref%d", i);
                    xs_put(t, base, key, "%u", queues[q].ring_refs[i]);
                }
            xs_put(t, base, "event-channel", "%u", queues[q].port);
        }
        if (order > 0) xs_put(t, fe, "ring-page-order", "%d", order);
        if (nqueues > 1) xs_put(t, fe, "multi-queue-num-queues", "%d", nqueues);
        xs_put(t, fe, "protocol", "%s", abi32 ? XEN_IO_PROTO_ABI_X86_32 : XEN_IO_PROTO_ABI_X86_64);
        xs_put(t, fe, "feature-persistent", "%d", use_persistent);
        xs_put(t, fe, "state", "%d", XenbusStateInitialised);
        if (xs_transaction_end(xs, t, 0)) break;
        if (errno != EAGAIN) fail("xs_transaction_end: %s", strerror(errno));
    }
    wait_backend_state(XenbusStateConnected);
    set_state(XenbusStateConnected);
}

static void close_device(void)
{
    set_state(XenbusStateClosing);
    wait_backend_state(XenbusStateClosing);
    set_state(XenbusStateClosed);
    wait_backend_state(XenbusStateClosed);
}

/* ---- requests ------------------------------------------------------------------ */

static int ring_free(struct queue *Q)
{
    int f = 0;
    WITH_RING(Q, R, { f = RING_FREE_REQUESTS(R); });
    return f;
}

static void push(struct queue *Q)
{
    int n = 0;
    WITH_RING(Q, R, { RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(R, n); });
    if (n) notify(Q->port);
}

/* Takes every response available on every queue; returns how many. */
static int reap(void)
{
    int got = 0;
    for (int q = 0; q < nqueues; q++) {
        struct queue *Q = &queues[q];
        WITH_RING(Q, R, {
            int more;
            do {
                RING_IDX rp = R->sring->rsp_prod;
                rmb();
                for (RING_IDX i = R->rsp_cons; i != rp; i++) {
                    rsp_t rsp;
                    memcpy(&rsp, RING_GET_RESPONSE(R, i), sizeof rsp);
                    if (rsp.id == 0 || rsp.id >= 65536 || done_flags[rsp.id]) fail("response with unexpected id %llu", (unsigned long long)rsp.id);
                    statuses[rsp.id] = rsp.status;
                    ops_seen[rsp.id] = rsp.operation;
                    done_flags[rsp.id] = 1;
                    got++;
                }
                R->rsp_cons = rp;
                RING_FINAL_CHECK_FOR_RESPONSES(R, more);
            } while (more);
        });
    }
    return got;
}

static uint64_t new_id(void)
{
    if (next_id >= 65536) {
        next_id = 1;
    }
    uint64_t id = next_id++;
    done_flags[id] = 0;
    return id;
}

/* Waits for the response to `id` and returns its status. */
static int16_t wait_for(uint64_t id)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    while (!done_flags[id]) {
        if (reap()) continue;
        wait_event(100);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000 > TIMEOUT_MS) fail("no response to request %llu", (unsigned long long)id);
    }
    return statuses[id];
}

struct seg { grant_ref_t gref; uint8_t first, last; };

/* Queues a direct request (no push). */
static uint64_t put_rw(struct queue *Q, uint8_t op, uint64_t sector, const struct seg *segs, int nseg)
{
    uint64_t id = new_id();
    WITH_RING(Q, R, {
        req_t *req = (req_t *)RING_GET_REQUEST(R, R->req_prod_pvt);
        memset(req, 0, sizeof *req);
        req->operation = op;
        req->nr_segments = nseg;
        req->handle = devid;
        req->id = id;
        req->sector_number = sector;
        for (int i = 0; i < nseg; i++) {
            req->seg[i].gref = segs[i].gref;
            req->seg[i].first_sect = segs[i].first;
            req->seg[i].last_sect = segs[i].last;
        }
        R->req_prod_pvt++;
    });
    return id;
}

static uint64_t put_discard(struct queue *Q, uint64_t sector, uint64_t count, int secure)
{
    uint64_t id = new_id();
    WITH_RING(Q, R, {
        discard_t *req = (discard_t *)RING_GET_REQUEST(R, R->req_prod_pvt);
        memset(req, 0, sizeof(req_t));
        req->operation = BLKIF_OP_DISCARD;
        req->flag = secure ? BLKIF_DISCARD_SECURE : 0;
        req->id = id;
        req->sector_number = sector;
        req->nr_sectors = count;
        R->req_prod_pvt++;
    });
    return id;
}

/* An indirect request of `nseg` whole-page segments starting at guest page `first_page`. */
static uint64_t put_indirect(struct queue *Q, uint8_t op, uint64_t sector, unsigned first_page, int nseg, int readonly_data)
{
    uint64_t id = new_id();
    int npages = (nseg + 511) / 512;
    unsigned ipage = alloc_pages(npages);
    struct blkif_request_segment *segs = (void *)(mem + (size_t)ipage * PAGE);
    for (int i = 0; i < nseg; i++) {
        segs[i].gref = grant(first_page + i, readonly_data);
        segs[i].first_sect = 0;
        segs[i].last_sect = 7;
    }
    WITH_RING(Q, R, {
        indirect_t *req = (indirect_t *)RING_GET_REQUEST(R, R->req_prod_pvt);
        memset(req, 0, sizeof(req_t));
        req->operation = BLKIF_OP_INDIRECT;
        req->indirect_op = op;
        req->nr_segments = nseg;
        req->id = id;
        req->sector_number = sector;
        req->handle = devid;
        for (int p = 0; p < npages; p++) req->indirect_grefs[p] = grant(ipage + p, 1);
        R->req_prod_pvt++;
    });
    return id;
}

/* Fills `pages` guest pages from `page` with the disk pattern for `sector`. */
static void fill(unsigned page, uint64_t sector, unsigned pages, unsigned seed)
{
    uint8_t *p = mem + (size_t)page * PAGE;
    for (size_t i = 0; i < (size_t)pages * PAGE; i++) p[i] = pattern(sector * 512 + i, seed);
}

static void check(unsigned page, uint64_t sector, unsigned pages, unsigned seed, const char *what)
{
    uint8_t *p = mem + (size_t)page * PAGE;
    for (size_t i = 0; i < (size_t)pages * PAGE; i++)
        if (p[i] != pattern(sector * 512 + i, seed)) fail("%s: byte %zu of sector %llu reads %u, expected %u", what, i, (unsigned long long)sector, p[i], pattern(sector * 512 + i, seed));
}

static void expect(uint64_t id, int16_t status, uint8_t op, const char *what)
{
    int16_t s = wait_for(id);
    if (s != status) fail("%s: status %d, expected %d", what, s, status);
    if (ops_seen[id] != op) fail("%s: response operation %u, expected %u", what, ops_seen[id], op);
}

/* Writes then reads `pages` pages at `sector` with 11-segment direct requests. */
static void rw_region(struct queue *Q, uint64_t sector, unsigned pages, unsigned seed)
{
    unsigned src = alloc_pages(pages), dst = alloc_pages(pages);
    fill(src, sector, pages, seed);
    memset(mem + (size_t)dst * PAGE, 0xee, (size_t)pages * PAGE);
    for (int pass = 0; pass < 2; pass++) {
        uint64_t ids[64];
        int n = 0;
        for (unsigned done = 0; done < pages;) {
            struct seg segs[BLKIF_MAX_SEGMENTS_PER_REQUEST];
            int nseg = 0;
            uint64_t at = sector + (uint64_t)done * 8;
            while (nseg < BLKIF_MAX_SEGMENTS_PER_REQUEST && done < pages) {
                unsigned page = (pass == 0 ? src : dst) + done;
                segs[nseg].gref = grant(page, pass == 0);
                segs[nseg].first = 0;
                segs[nseg].last = 7;
                nseg++;
                done++;
            }
            if (ring_free(Q) == 0 || n == 64) {
                push(Q);
                for (int i = 0; i < n; i++) expect(ids[i], BLKIF_RSP_OKAY, pass == 0 ? BLKIF_OP_WRITE : BLKIF_OP_READ, "rw");
                n = 0;
            }
            ids[n++] = put_rw(Q, pass == 0 ? BLKIF_OP_WRITE : BLKIF_OP_READ, at, segs, nseg);
        }
        push(Q);
        for (int i = 0; i < n; i++) expect(ids[i], BLKIF_RSP_OKAY, pass == 0 ? BLKIF_OP_WRITE : BLKIF_OP_READ, "rw");
    }
    check(dst, sector, pages, seed, "read back");
}

/* ---- scenarios --------------------------------------------------------------- */

static unsigned seed = 1;
static long count = 2000, qd = 32, bs = 4096, use_random = 0, sectors_used = 0;

static void scenario_rw(void)
{
    struct queue *Q = &queues[0];
    rw_region(Q, 0, 64, seed);          /* the first 256 KiB */
    rw_region(Q, 2048, 11, seed);       /* 1 MiB in */
    /* Sub-page segments: sectors 2..5 of a page, written at sector 4096 and read back. */
    unsigned page = alloc_pages(2);
    fill(page, 4096 - 2, 1, seed);
    struct seg s = { grant(page, 1), 2, 5 };
    uint64_t wid = put_rw(Q, BLKIF_OP_WRITE, 4096, &s, 1);
    push(Q);
    expect(wid, BLKIF_RSP_OKAY, BLKIF_OP_WRITE, "sub-page write");
    memset(mem + (size_t)(page + 1) * PAGE, 0, PAGE);
    struct seg r = { grant(page + 1, 0), 2, 5 };
    uint64_t id = put_rw(Q, BLKIF_OP_READ, 4096, &r, 1);
    push(Q);
    expect(id, BLKIF_RSP_OKAY, BLKIF_OP_READ, "sub-page read");
    if (memcmp(mem + (size_t)page * PAGE + 1024, mem + (size_t)(page + 1) * PAGE + 1024, 2048)) fail("sub-page data differs");
    /* A read past the end of the disk, and a write straddling it, are refused. */
    struct seg e = { grant(page + 1, 0), 0, 7 };
    id = put_rw(Q, BLKIF_OP_READ, disk_sectors - 4, &e, 1);
    push(Q);
    expect(id, BLKIF_RSP_ERROR, BLKIF_OP_READ, "read past the end");
    id = put_rw(Q, BLKIF_OP_READ, disk_sectors - 8, &e, 1);
    push(Q);
    expect(id, BLKIF_RSP_OKAY, BLKIF_OP_READ, "read of the last page");
    printf("ok rw %s\n", abi32 ? "x86_32-abi" : "x86_64-abi");
}

static void scenario_flush(void)
{
    struct queue *Q = &queues[0];
    rw_region(Q, 8192, 8, seed);
    uint64_t id = put_rw(Q, BLKIF_OP_FLUSH_DISKCACHE, 0, NULL, 0);
    push(Q);
    expect(id, BLKIF_RSP_OKAY, BLKIF_OP_FLUSH_DISKCACHE, "flush");
    /* A flush carrying data, and a barrier carrying data. */
    unsigned page = alloc_pages(2);
    fill(page, 8192 + 64, 1, seed);
    fill(page + 1, 8192 + 72, 1, seed);
    struct seg a = { grant(page, 1), 0, 7 }, b = { grant(page + 1, 1), 0, 7 };
    uint64_t f = put_rw(Q, BLKIF_OP_FLUSH_DISKCACHE, 8192 + 64, &a, 1);
    uint64_t w = put_rw(Q, BLKIF_OP_WRITE_BARRIER, 8192 + 72, &b, 1);
    uint64_t z = put_rw(Q, BLKIF_OP_WRITE_BARRIER, 0, NULL, 0);
    push(Q);
    expect(f, BLKIF_RSP_OKAY, BLKIF_OP_FLUSH_DISKCACHE, "flush with data");
    expect(w, BLKIF_RSP_OKAY, BLKIF_OP_WRITE_BARRIER, "barrier with data");
    expect(z, BLKIF_RSP_OKAY, BLKIF_OP_WRITE_BARRIER, "empty barrier");
    printf("ok flush\n");
}

static void scenario_discard(void)
{
    struct queue *Q = &queues[0];
    rw_region(Q, 16384, 16, seed);
    uint64_t d = put_discard(Q, 16384, 64, 0);
    uint64_t secure = put_discard(Q, 16384, 8, 1);
    uint64_t past = put_discard(Q, disk_sectors - 8, 16, 0);
    push(Q);
    expect(d, BLKIF_RSP_OKAY, BLKIF_OP_DISCARD, "discard");
    expect(secure, BLKIF_RSP_EOPNOTSUPP, BLKIF_OP_DISCARD, "secure discard");
    expect(past, BLKIF_RSP_ERROR, BLKIF_OP_DISCARD, "discard past the end");
    printf("ok discard\n");
}

static void scenario_indirect(void)
{
    struct queue *Q = &queues[0];
    if (max_indirect < 64) fail("backend offers %u indirect segments", max_indirect);
    unsigned nseg = max_indirect; /* 1 MiB with 256 */
    unsigned src = alloc_pages(nseg), dst = alloc_pages(nseg);
    uint64_t sector = 32768;
    fill(src, sector, nseg, seed);
    memset(mem + (size_t)dst * PAGE, 0, (size_t)nseg * PAGE);
    uint64_t w = put_indirect(Q, BLKIF_OP_WRITE, sector, src, nseg, 1);
    push(Q);
    expect(w, BLKIF_RSP_OKAY, BLKIF_OP_WRITE, "indirect write");
    uint64_t r = put_indirect(Q, BLKIF_OP_READ, sector, dst, nseg, 0);
    push(Q);
    expect(r, BLKIF_RSP_OKAY, BLKIF_OP_READ, "indirect read");
    check(dst, sector, nseg, seed, "indirect read back");
    /* Too many segments, and a flush as the inner operation, are refused. */
    uint64_t big = put_indirect(Q, BLKIF_OP_READ, sector, dst, nseg + 1, 0);
    push(Q);
    expect(big, BLKIF_RSP_ERROR, BLKIF_OP_READ, "indirect with too many segments");
    uint64_t fl = put_indirect(Q, BLKIF_OP_FLUSH_DISKCACHE, sector, dst, 1, 0);
    push(Q);
    expect(fl, BLKIF_RSP_ERROR, BLKIF_OP_FLUSH_DISKCACHE, "indirect flush");
    printf("ok indirect %u segments\n", nseg);
}

/* Keeps the ring full for `count` requests (a multi-page ring wraps many times). */
static void scenario_wrap(void)
{
    struct queue *Q = &queues[0];
    unsigned slots = 0;
    WITH_RING(Q, R, { slots = RING_SIZE(R); });
    unsigned src = alloc_pages(1);
    fill(src, 0, 1, seed);
    long sent = 0, answered = 0;
    uint64_t span = disk_sectors / 8 < 4096 ? disk_sectors / 8 : 4096;
    while (answered < count) {
        while (sent < count && ring_free(Q) > 0) {
            struct seg s = { grant(src, 0), 0, 7 };
            put_rw(Q, BLKIF_OP_READ, (uint64_t)(sent % span) * 8, &s, 1);
            sent++;
        }
        push(Q);
        int got = reap();
        if (!got) {
            if (!wait_event(TIMEOUT_MS)) fail("wrap: no responses after %ld", answered);
        }
        answered += got;
    }
    unsigned wraps = (unsigned)(count / slots);
    printf("ok wrap %ld requests over %u slots (%u wraps)\n", count, slots, wraps);
}

static void scenario_queues(void)
{
    if (nqueues < 2) fail("queues needs --queues 2 or more");
    for (int q = 0; q < nqueues; q++) rw_region(&queues[q], 65536 + (uint64_t)q * 1024, 22, seed + q);
    printf("ok queues %d\n", nqueues);
}

static void scenario_hostile(void)
{
    struct queue *Q = &queues[0];
    unsigned page = alloc_pages(2);
    memset(mem + (size_t)page * PAGE, 0x5a, 2 * PAGE);
    /* Not granted at all. */
    grant_ref_t none = next_gref++;
    gnt[none].flags = 0;
    gnt[none].frame = page;
    /* Granted to domain 7, not to the backend. */
    grant_ref_t other = grant_to(page, 0, 7);
    /* Read-only, used for a READ (the backend would have to write it). */
    grant_ref_t ro = grant(page, 1);
    /* Out of the table. */
    grant_ref_t far = GNT_ENTRIES + 5;
    grant_ref_t refs[4] = { none, other, ro, far };
    uint64_t ids[5];
    for (int i = 0; i < 4; i++) {
        struct seg s[2] = { { grant(page + 1, 0), 0, 7 }, { refs[i], 0, 7 } };
        ids[i] = put_rw(Q, BLKIF_OP_READ, 0, s, 2); /* the good segment first: nothing may be written */
    }
    struct seg bad = { grant(page, 0), 5, 2 }; /* first after last */
    ids[4] = put_rw(Q, BLKIF_OP_READ, 0, &bad, 1);
    push(Q);
    for (int i = 0; i < 5; i++) expect(ids[i], BLKIF_RSP_ERROR, BLKIF_OP_READ, "refused grant");
    for (size_t i = 0; i < 2 * PAGE; i++)
        if (mem[(size_t)page * PAGE + i] != 0x5a) fail("a refused read wrote guest memory at %zu", i);
    /* An unknown operation is not supported; later requests still succeed. */
    uint64_t unknown = new_id();
    WITH_RING(Q, R, {
        req_t *req = (req_t *)RING_GET_REQUEST(R, R->req_prod_pvt);
        memset(req, 0, sizeof *req);
        req->operation = 9;
        req->id = unknown;
        R->req_prod_pvt++;
    });
    push(Q);
    expect(unknown, BLKIF_RSP_EOPNOTSUPP, 9, "unknown operation");
    rw_region(Q, 0, 4, seed);
    printf("ok hostile\n");
}

static void scenario_overrun(void)
{
    struct queue *Q = &queues[0];
    unsigned slots = 0;
    WITH_RING(Q, R, {
        slots = RING_SIZE(R);
        R->req_prod_pvt += slots + 3;
        R->sring->req_prod = R->req_prod_pvt;
    });
    mb();
    notify(Q->port);
    wait_backend_state(XenbusStateClosing);
    char *err = xs_get(be, "error");
    if (!err) fail("no error node after an overrun");
    printf("ok overrun (%s)\n", err);
    free(err);
    set_state(XenbusStateClosed);
    wait_backend_state(XenbusStateClosed);
}

/* A read-only vbd: info says so, writes and discards are refused, reads succeed. */
static void scenario_readonly(void)
{
    struct queue *Q = &queues[0];
    if (!(xs_get_long(be, "info", 0) & VDISK_READONLY)) fail("info lacks VDISK_READONLY");
    if (xs_get_long(be, "feature-discard", 0) != 0) fail("a read-only vbd offers discard");
    unsigned page = alloc_pages(2);
    fill(page, 0, 1, seed);
    struct seg w = { grant(page, 1), 0, 7 }, r = { grant(page + 1, 0), 0, 7 };
    uint64_t wid = put_rw(Q, BLKIF_OP_WRITE, 0, &w, 1);
    uint64_t rid = put_rw(Q, BLKIF_OP_READ, 0, &r, 1);
    push(Q);
    expect(wid, BLKIF_RSP_ERROR, BLKIF_OP_WRITE, "write to a read-only vbd");
    expect(rid, BLKIF_RSP_OKAY, BLKIF_OP_READ, "read of a read-only vbd");
    printf("ok readonly\n");
}

static double seconds_since(struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) + (t.tv_nsec - t0->tv_nsec) / 1e9;
}

/* Reads `count` requests of `bs` bytes at queue depth `qd` (indirect when bs > 44 KiB). */
static void scenario_bench(void)
{
    struct queue *Q = &queues[0];
    unsigned pages = bs / PAGE;
    if (pages == 0 || pages > 256) fail("--bs must be 4096..1048576");
    int indirect = pages > BLKIF_MAX_SEGMENTS_PER_REQUEST;
    unsigned buf = alloc_pages(pages * qd);
    /* Grants for the buffers, made once (as a blkfront with persistent grants would). */
    static grant_ref_t refs[8192];
    for (unsigned i = 0; i < pages * qd; i++) refs[i] = grant(buf + i, 0);
    uint64_t span = (sectors_used ? sectors_used : disk_sectors) / 8 / pages;
    unsigned rnd = 12345;
    long sent = 0, answered = 0, inflight = 0;
    int slot_of[65536];
    int free_slots[1024], nfree = 0;
    for (int i = qd - 1; i >= 0; i--) free_slots[nfree++] = i;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (answered < count) {
        while (sent < count && inflight < qd && ring_free(Q) > 0) {
            int b = free_slots[--nfree];
            rnd = rnd * 1103515245 + 12345;
            uint64_t block = use_random ? (rnd >> 8) % span : (uint64_t)sent % span;
            uint64_t sector = block * pages * 8;
            uint64_t id;
            if (indirect) {
                id = new_id();
                unsigned ip = alloc_pages(1);
                struct blkif_request_segment *segs = (void *)(mem + (size_t)ip * PAGE);
                for (unsigned i = 0; i < pages; i++) {
                    segs[i].gref = refs[b * pages + i];
                    segs[i].first_sect = 0;
                    segs[i].last_sect = 7;
                }
                WITH_RING(Q, R, {
                    indirect_t *req = (indirect_t *)RING_GET_REQUEST(R, R->req_prod_pvt);
                    memset(req, 0, sizeof(req_t));
                    req->operation = BLKIF_OP_INDIRECT;
                    req->indirect_op = BLKIF_OP_READ;
                    req->nr_segments = pages;
                    req->id = id;
                    req->sector_number = sector;
                    req->indirect_grefs[0] = grant(ip, 1);
                    R->req_prod_pvt++;
                });
            } else {
                struct seg segs[BLKIF_MAX_SEGMENTS_PER_REQUEST];
                for (unsigned i = 0; i < pages; i++) segs[i] = (struct seg){ refs[b * pages + i], 0, 7 };
                id = put_rw(Q, BLKIF_OP_READ, sector, segs, pages);
            }
            slot_of[id] = b;
            sent++;
            inflight++;
        }
        push(Q);
        int before = answered;
        for (int q = 0; q < 1; q++) {
            WITH_RING(Q, R, {
                int more;
                do {
                    RING_IDX rp = R->sring->rsp_prod;
                    rmb();
                    for (RING_IDX i = R->rsp_cons; i != rp; i++) {
                        rsp_t *rsp = (rsp_t *)RING_GET_RESPONSE(R, i);
                        if (rsp->status != BLKIF_RSP_OKAY) fail("bench read failed: %d", rsp->status);
                        free_slots[nfree++] = slot_of[rsp->id];
                        answered++;
                        inflight--;
                    }
                    R->rsp_cons = rp;
                    RING_FINAL_CHECK_FOR_RESPONSES(R, more);
                } while (more);
            });
        }
        if (answered == before && !wait_event(TIMEOUT_MS)) fail("bench: stalled at %ld", answered);
    }
    double s = seconds_since(&t0);
    printf("ok bench bs=%ld qd=%ld %s: %ld requests in %.3f s, %.0f IOPS, %.1f MiB/s\n", bs, qd, use_random ? "random" : "sequential", count, s, count / s,
           count * (double)bs / s / 1048576);
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: frontend DIR DOMID DEVID SCENARIO [options]\n");
        return 2;
    }
    snprintf(dir, sizeof dir, "%s", argv[1]);
    domid = atoi(argv[2]);
    devid = atoi(argv[3]);
    const char *scenario = argv[4];
    for (int i = 5; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : "0";
        if (!strcmp(a, "--abi")) abi32 = atoi(v) == 32, i++;
        else if (!strcmp(a, "--order")) order = atoi(v), i++;
        else if (!strcmp(a, "--queues")) nqueues = atoi(v), i++;
        else if (!strcmp(a, "--persistent")) persistent = 1;
        else if (!strcmp(a, "--seed")) seed = atoi(v), i++;
        else if (!strcmp(a, "--count")) count = atol(v), i++;
        else if (!strcmp(a, "--qd")) qd = atol(v), i++;
        else if (!strcmp(a, "--bs")) bs = atol(v), i++;
        else if (!strcmp(a, "--sectors")) sectors_used = atol(v), i++;
        else if (!strcmp(a, "--random")) use_random = 1;
        else {
            fprintf(stderr, "unknown option %s\n", a);
            return 2;
        }
    }
    if (nqueues < 1 || nqueues > MAX_QUEUES || order < 0 || order > 4 || qd < 1 || qd > 256) fail("bad options");
    setvbuf(stdout, NULL, _IOLBF, 0);

    xs = xs_open(0);
    if (!xs) fail("xs_open: %s", strerror(errno));
    snprintf(fe, sizeof fe, "/local/domain/%d/device/vbd/%d", domid, devid);
    char *b = xs_get(fe, "backend");
    if (!b) fail("no %s/backend (attach the vbd first)", fe);
    snprintf(be, sizeof be, "%s", b);
    free(b);
    char wpath[512];
    snprintf(wpath, sizeof wpath, "%s/state", be);
    if (!xs_watch(xs, wpath, "be")) fail("xs_watch: %s", strerror(errno));

    create_memory();
    evtchn_connect();
    set_state(XenbusStateInitialising); /* a (re)booting guest starts here */
    connect_device();

    if (!strcmp(scenario, "rw")) scenario_rw();
    else if (!strcmp(scenario, "flush")) scenario_flush();
    else if (!strcmp(scenario, "discard")) scenario_discard();
    else if (!strcmp(scenario, "indirect")) scenario_indirect();
    else if (!strcmp(scenario, "wrap")) scenario_wrap();
    else if (!strcmp(scenario, "queues")) scenario_queues();
    else if (!strcmp(scenario, "hostile")) scenario_hostile();
    else if (!strcmp(scenario, "bench")) scenario_bench();
    else if (!strcmp(scenario, "readonly")) scenario_readonly();
    else if (!strcmp(scenario, "overrun")) {
        scenario_overrun();
        /* The backend serves again after Closed and Initialising. */
        set_state(XenbusStateInitialising);
        next_id = 1;
        connect_device();
        rw_region(&queues[0], 0, 4, seed);
        close_device();
        remove_memory();
        printf("ok served again after the overrun\n");
        return 0;
    } else if (!strcmp(scenario, "reconnect")) {
        rw_region(&queues[0], 0, 8, seed);
        close_device();
        /* A guest reboot: start over with fresh rings and the same device. */
        set_state(XenbusStateInitialising);
        next_id = 1;
        connect_device();
        unsigned dst = alloc_pages(8);
        struct seg s = { grant(dst, 0), 0, 7 };
        uint64_t id = put_rw(&queues[0], BLKIF_OP_READ, 0, &s, 1);
        push(&queues[0]);
        expect(id, BLKIF_RSP_OKAY, BLKIF_OP_READ, "read after reconnect");
        check(dst, 0, 1, seed, "data after reconnect");
        printf("ok reconnect\n");
    } else fail("unknown scenario %s", scenario);

    close_device();
    remove_memory();
    xs_close(xs);
    return 0;
}
