/*
 * The cost meter's workload: 4k reads and writes driven at an emulated
 * disk through qtest and the libqos drivers, the way a guest driver would
 * drive it, so that what QEMU spends per I/O can be counted (callgrind,
 * strace) without a guest, a vCPU or the host's load in the numbers.
 *
 *   cost [-d nvme|virtio-blk] [-n N] [-w WARMUP] -- QEMU-ARGS...
 *
 * QEMU-ARGS give the disk: an nvme controller at 04.0 or a virtio-blk-pci
 * at 05.0, on any backend (make cost uses null-co).  QTEST_QEMU_BINARY may
 * carry a wrapper in front of the binary (valgrind, strace).
 *
 * Phases, in this order, each of N I/Os after a warm-up of WARMUP:
 *   read-qd1, read-qd32, write-qd1, write-qd32
 * QD 1: submit one, wait for it, acknowledge it.  QD 32: submit 32 with
 * one doorbell (one notification decision), wait for all 32, acknowledge
 * them together (one CQ head doorbell / one used_event update), as a
 * guest's interrupt handler does with a batch; batches keep the device's
 * work independent of how fast this client polls.
 *
 * Phase boundaries, with the device idle:
 *   - the command in $COST_BOUNDARY, if set, runs with QEMU's pid and
 *     "start-NAME" or "end-NAME" appended, and must succeed (make cost:
 *     "callgrind_control --dump=", which cuts callgrind's counts of every
 *     thread there);
 *   - a line "PHASE name start-us end-us" (CLOCK_REALTIME) on stdout for
 *     time-stamped traces (strace -ttt);
 *   - counts the driver knows: "COUNT name key value" (MMIO doorbell
 *     writes, shadow doorbell writes).
 * Completions are polled in guest memory; the MSI-X messages still go to
 * guest RAM (interrupts are counted on the device's side: msix_notify()).
 *
 * nvme: MSI-X, one I/O queue pair of 256 entries on vector 1, Doorbell
 * Buffer Config when the controller offers it (Linux's eventidx rule;
 * MMIO-only doorbells otherwise, as a guest without DBBUF support).
 * virtio-blk: modern or transitional device, MSI-X, VIRTIO_RING_F_EVENT_IDX,
 * direct descriptor chains (header, data, status).
 *
 * Copyright (c) 2026 nvme-dataplane developers
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/bswap.h"
#include "libqtest.h"
#include "libqos/libqos-pc.h"
#include "libqos/nvme.h"
#include "libqos/virtio.h"
#include "libqos/virtio-pci.h"
#include "standard-headers/linux/virtio_blk.h"
#include "standard-headers/linux/virtio_ring.h"

#define NVME_DEVFN      QPCI_DEVFN(4, 0)
#define VIRTIO_DEVFN    QPCI_DEVFN(5, 0)
#define BS              4096
#define MAX_QD          32
#define NVME_QSIZE      256
#define TIMEOUT_US      (60 * G_USEC_PER_SEC)

typedef struct Disk Disk;

struct Disk {
    const char *name;
    QOSState *qs;
    QTestState *qts;
    uint64_t buf[MAX_QD];
    uint64_t mmio_db;           /* doorbell/notify writes to the device */
    uint64_t shadow_db;         /* shadow doorbell writes (nvme DBBUF) */

    /* nvme */
    QNvme *n;

    /* virtio-blk */
    QVirtioPCIDevice *vpci;
    QVirtQueue *vq;
    uint64_t hdr;               /* MAX_QD request headers */
    uint64_t status;            /* MAX_QD status bytes */
    uint16_t avail_idx;
    uint16_t last_used;

    /* submit @nr requests on slots 0..nr-1, then wait for all of them */
    void (*batch)(Disk *d, bool write, int nr, uint64_t lba);
};

/* ---- nvme ------------------------------------------------------------ */

static void nvme_batch(Disk *d, bool write, int nr, uint64_t lba)
{
    QNvme *n = d->n;
    uint64_t before = n->mmio_doorbells;
    gint64 end = g_get_monotonic_time() + TIMEOUT_US;
    NvmeCmd cmd;
    NvmeCqe cqe;
    int i, done = 0;

    for (i = 0; i < nr; i++) {
        qnvme_rw_cmd(n, &cmd, write ? NVME_CMD_WRITE : NVME_CMD_READ, 1,
                     (lba + i) * (BS / 512), BS / 512, d->buf[i]);
        qnvme_submit(n, 1, &cmd);
    }
    qnvme_sq_doorbell(n, 1);
    if (n->dbbuf) {
        d->shadow_db++;
    }
    while (done < nr) {
        if (!qnvme_poll_cqe(n, 1, &cqe)) {
            g_assert_cmpint(g_get_monotonic_time(), <, end);
            g_usleep(10);
            continue;
        }
        g_assert_cmphex(QNVME_STATUS(&cqe), ==, 0);
        done++;
    }
    qnvme_cq_doorbell(n, 1);
    if (n->dbbuf) {
        d->shadow_db++;
    }
    d->mmio_db += n->mmio_doorbells - before;
}

static void nvme_setup(Disk *d)
{
    QNvme *n = qnvme_init(d->qs->pcibus, &d->qs->alloc, NVME_DEVFN);
    g_autofree NvmeIdCtrl *id = g_new0(NvmeIdCtrl, 1);
    uint16_t nsq, ncq;

    d->n = n;
    qnvme_msix_enable(n);
    qnvme_enable(n, 32);
    g_assert_cmphex(qnvme_identify(n, NVME_ID_CNS_CTRL, 0, id), ==, 0);
    g_assert_cmphex(qnvme_set_num_queues(n, 1, 1, &nsq, &ncq), ==, 0);
    if (le16_to_cpu(id->oacs) & NVME_OACS_DBCS) {
        qnvme_dbbuf_config(n);
    }
    qnvme_create_queue_pair(n, 1, NVME_QSIZE, 1);
    d->batch = nvme_batch;
    printf("SETUP nvme doorbells=%s\n", n->dbbuf ? "shadow" : "mmio");
}

/* ---- virtio-blk ------------------------------------------------------ */

static void vblk_kick(Disk *d, uint16_t old)
{
    QVirtQueue *vq = d->vq;
    uint16_t ev;

    /* publish the avail index, then look at the device's avail_event */
    qtest_writew(d->qts, vq->avail + 2, d->avail_idx);
    ev = qtest_readw(d->qts, vq->used + 4 + 8 * vq->size);
    if (vring_need_event(ev, d->avail_idx, old)) {
        d->vpci->vdev.bus->virtqueue_kick(&d->vpci->vdev, vq);
        d->mmio_db++;
    }
}

static void vblk_batch(Disk *d, bool write, int nr, uint64_t lba)
{
    QVirtQueue *vq = d->vq;
    gint64 end = g_get_monotonic_time() + TIMEOUT_US;
    uint16_t old = d->avail_idx;
    int i, done = 0;

    for (i = 0; i < nr; i++) {
        struct virtio_blk_outhdr hdr = {
            .type = cpu_to_le32(write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN),
            .sector = cpu_to_le64((lba + i) * (BS / 512)),
        };
        struct vring_desc desc[3] = {
            { cpu_to_le64(d->hdr + 16 * i), cpu_to_le32(16),
              cpu_to_le16(VRING_DESC_F_NEXT), cpu_to_le16(3 * i + 1) },
            { cpu_to_le64(d->buf[i]), cpu_to_le32(BS),
              cpu_to_le16(VRING_DESC_F_NEXT |
                          (write ? 0 : VRING_DESC_F_WRITE)),
              cpu_to_le16(3 * i + 2) },
            { cpu_to_le64(d->status + i), cpu_to_le32(1),
              cpu_to_le16(VRING_DESC_F_WRITE), 0 },
        };
        uint16_t head = cpu_to_le16(3 * i);

        qtest_memwrite(d->qts, d->hdr + 16 * i, &hdr, sizeof(hdr));
        qtest_memwrite(d->qts, vq->desc + 16 * 3 * i, desc, sizeof(desc));
        qtest_memwrite(d->qts, vq->avail + 4 + 2 * (d->avail_idx % vq->size),
                       &head, 2);
        d->avail_idx++;
    }
    vblk_kick(d, old);

    while (done < nr) {
        uint16_t used;

        if (qtest_readw(d->qts, vq->used + 2) == d->last_used) {
            g_assert_cmpint(g_get_monotonic_time(), <, end);
            g_usleep(10);
            continue;
        }
        /* as virtblk_done(): take what was used, then ask for the next */
        do {
            used = qtest_readw(d->qts, vq->used + 2);
            while (d->last_used != used) {
                uint32_t id = qtest_readl(d->qts, vq->used + 4 +
                                          8 * (d->last_used % vq->size));

                g_assert_cmpint(id % 3, ==, 0);
                g_assert_cmpint(qtest_readb(d->qts, d->status + id / 3), ==,
                                VIRTIO_BLK_S_OK);
                d->last_used++;
                done++;
            }
            qtest_writew(d->qts, vq->avail + 4 + 2 * vq->size, d->last_used);
        } while (qtest_readw(d->qts, vq->used + 2) != d->last_used);
    }
}

static void vblk_setup(Disk *d)
{
    QPCIAddress addr = { .devfn = VIRTIO_DEVFN };
    QVirtioDevice *vdev;
    QVirtQueuePCI *vqpci;
    uint64_t features;

    d->vpci = virtio_pci_new(d->qs->pcibus, &addr);
    g_assert_nonnull(d->vpci);
    vdev = &d->vpci->vdev;
    qvirtio_pci_device_enable(d->vpci);
    qvirtio_start_device(vdev);
    features = qvirtio_get_features(vdev);
    g_assert_true(features & (1ull << VIRTIO_RING_F_EVENT_IDX));
    features &= ~(QVIRTIO_F_BAD_FEATURE |
                  (1ull << VIRTIO_RING_F_INDIRECT_DESC) |
                  (1ull << VIRTIO_BLK_F_SCSI));
    qvirtio_set_features(vdev, features);
    qpci_msix_enable(d->vpci->pdev);
    qvirtio_pci_set_msix_configuration_vector(d->vpci, &d->qs->alloc, 0);
    d->vq = qvirtqueue_setup(vdev, &d->qs->alloc, 0);
    g_assert_true(d->vq->event);
    g_assert_cmpint(d->vq->size, >=, 3 * MAX_QD);
    vqpci = container_of(d->vq, QVirtQueuePCI, vq);
    qvirtqueue_pci_msix_setup(d->vpci, vqpci, &d->qs->alloc, 1);
    qvirtio_set_driver_ok(vdev);

    d->hdr = guest_alloc(&d->qs->alloc, 16 * MAX_QD);
    d->status = guest_alloc(&d->qs->alloc, MAX_QD);
    /* used_event: interrupt for the first completion */
    qtest_writew(d->qts, d->vq->avail + 4 + 2 * d->vq->size, 0);
    d->batch = vblk_batch;
    printf("SETUP virtio-blk features=0x%" PRIx64 "\n", features);
}

/* ---- the workload ---------------------------------------------------- */

static void boundary(Disk *d, const char *what, const char *name)
{
    const char *cmd = getenv("COST_BOUNDARY");
    g_autofree char *c = NULL;

    if (cmd && *cmd) {
        c = g_strdup_printf("%s%s-%s %d >/dev/null", cmd, what, name,
                            qtest_pid(d->qts));
        g_assert_cmpint(system(c), ==, 0);
    }
}

static void phase(Disk *d, const char *name, bool write, int qd, int n,
                  int warmup)
{
    uint64_t db, sdb;
    gint64 t0;
    int i;

    for (i = 0; i < warmup; i += qd) {
        d->batch(d, write, qd, i % 1024);
    }
    boundary(d, "start", name);
    db = d->mmio_db;
    sdb = d->shadow_db;
    t0 = g_get_real_time();
    for (i = 0; i < n; i += qd) {
        d->batch(d, write, qd, i % 1024);
    }
    printf("PHASE %s %" PRId64 " %" PRId64 "\n", name, t0, g_get_real_time());
    boundary(d, "end", name);
    printf("COUNT %s ios %d\n", name, n);
    printf("COUNT %s mmio_doorbells %" PRIu64 "\n", name, d->mmio_db - db);
    printf("COUNT %s shadow_doorbells %" PRIu64 "\n", name,
           d->shadow_db - sdb);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    const char *dev = "nvme";
    int n = 2048, warmup = 256;
    g_autofree char *cmdline = NULL;
    Disk d = { 0 };
    int c, i;

    while ((c = getopt(argc, argv, "d:n:w:")) != -1) {
        switch (c) {
        case 'd':
            dev = optarg;
            break;
        case 'n':
            n = atoi(optarg);
            break;
        case 'w':
            warmup = atoi(optarg);
            break;
        default:
            fprintf(stderr, "usage: %s [-d nvme|virtio-blk] [-n N] "
                    "[-w WARMUP] -- QEMU-ARGS...\n", argv[0]);
            return 2;
        }
    }
    g_assert_cmpint(n % MAX_QD, ==, 0);
    cmdline = g_strjoinv(" ", argv + optind);
    d.qs = qtest_pc_boot("%s", cmdline);
    d.qts = d.qs->qts;
    printf("PID %d\n", qtest_pid(d.qts));
    for (i = 0; i < MAX_QD; i++) {
        d.buf[i] = guest_alloc(&d.qs->alloc, BS);
    }
    if (!strcmp(dev, "nvme")) {
        nvme_setup(&d);
    } else {
        vblk_setup(&d);
    }
    fflush(stdout);

    phase(&d, "read-qd1", false, 1, n, warmup);
    phase(&d, "read-qd32", false, MAX_QD, n, warmup);
    phase(&d, "write-qd1", true, 1, n, warmup);
    phase(&d, "write-qd32", true, MAX_QD, n, warmup);

    if (d.n) {
        qnvme_free(d.n);
    }
    /*
     * Let QEMU exit by itself: a wrapper (strace) would not pass on the
     * SIGTERM of qtest_shutdown(), and valgrind writes its last dump at exit
     */
    qtest_qmp_assert_success(d.qts, "{'execute': 'quit'}");
    qtest_wait_qemu(d.qts);
    qtest_shutdown(d.qs);
    return 0;
}
