#!/usr/bin/python3
"""Generate the generic-fuzz seed corpus for the nvme configurations.

Writes fuzz/seeds/common/*.bin (or the directory given as argument).  The
output is deterministic: the same bytes on every run.  Run with
``--describe`` to print the operations of each seed instead.

Input format (QEMU tests/qtest/fuzz/generic_fuzz.c)
---------------------------------------------------
An input is a list of operations separated by b"FUZZ".  The first byte of an
operation is the opcode (taken modulo 10), the rest are its operands, read
with memcpy() into a C struct (x86-64 layout, padding included):

  3 OP_WRITE       {u8 size; u8 base; (2 pad) u32 offset; u64 value}
                   size%4: 0=b 1=w 2=l 3=q.  base selects the base'th
                   matched MemoryRegion range in address_space_memory's
                   flat view, in address order, modulo their number;
                   offset is taken modulo the range size.  For nvme the
                   ranges are 0 = "nvme" (BAR0 registers + doorbells),
                   1 = "msix-table", 2 = "msix-pba".
  5 OP_PCI_WRITE   {u8 size; u8 base; u8 offset; (1 pad) u32 value}
                   config space write through 0xcf8/0xcfc.
  7 OP_ADD_DMA_PATTERN  {u8 index; u8 stride; u8 data[]}
  8 OP_CLEAR_DMA_PATTERNS  (also resets the pattern index to 0)

Before each input generic-fuzz maps every BAR of the matched PCI devices and
enables memory decoding and bus mastering, so an input starts with the
registers directly.  After each operation the main loop runs until idle
(BHs, ioeventfds, null-co completions), so one doorbell write executes the
commands it covers synchronously.

DMA: guest RAM starts empty.  Every DMA read of guest RAM by the device
(pci_dma_read/ldl_le_pci_dma and address_space_map, which the block layer
uses for data buffers in both directions) calls fuzz_dma_read_cb(), which,
if any pattern is defined, fills exactly the bytes being read with
pattern[i] repeated from the start of the read (data[0] lands at the read
address), then advances i = (i + 1) % number_of_patterns.  A read that
overlaps a range already filled since the last operation is not refilled
and does not advance i (QEMU_AVOID_DOUBLE_FETCH, set for predefined
configs).  Device DMA writes do not interact with patterns, but a later
read refills the range.  So each doorbell write below is preceded by
"clear patterns" and one pattern per DMA read the device will make, in
order.  With Doorbell Buffer Config active the reads per command are:

  SQ doorbell:  shadow SQ tail (4 bytes), SQE (64), [data buffer map],
                shadow SQ tail again (same range: not refilled),
                shadow CQ head (4, from nvme_post_cqes)
  CQ doorbell:  shadow CQ head only with ioeventfd=on (nvme_cq_notifier)
"""

import os
import struct
import sys

SEPARATOR = b"FUZZ"

OP_WRITE = 3
OP_PCI_WRITE = 5
OP_ADD_DMA_PATTERN = 7
OP_CLEAR_DMA_PATTERNS = 8

SIZE_L = 2                  # op_write/op_pci_write size codes
SIZE_W = 1

REGION_NVME = 0             # matched MemoryRegion ranges, in address order
REGION_MSIX_TABLE = 1

# NVMe controller registers (BAR0)
REG_CC = 0x14
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
DB_BASE = 0x1000            # CAP.DSTRD = 0

CC_EN = 1
CC_IOSQES_IOCQES = (6 << 16) | (4 << 20)

MSIX_CAP = 0x40             # first free capability slot (PM 0x60, PCIe 0x80)

# guest physical memory layout (512M guest, all page aligned)
ASQ = 0x100000
ACQ = 0x101000
IOCQ = 0x102000
IOSQ = 0x103000
DBS = 0x104000              # shadow doorbells
EIS = 0x105000              # event indexes
DATA = 0x106000
DBS2 = 0x107000             # second Doorbell Buffer Config
EIS2 = 0x108000

QSIZE = 16                  # entries, admin and I/O queues
NSID = 1

ADM_CREATE_SQ = 0x01
ADM_CREATE_CQ = 0x05
ADM_DBBUF_CONFIG = 0x7C
NVM_WRITE = 0x01
NVM_READ = 0x02


def sq_db(qid):
    return DB_BASE + (2 * qid) * 4


def cq_db(qid):
    return DB_BASE + (2 * qid + 1) * 4


def sqe(opcode, cid, nsid=0, prp1=0, prp2=0, cdw10=0, cdw11=0, cdw12=0,
        cdw13=0, cdw14=0, cdw15=0):
    """A 64-byte submission queue entry."""
    e = struct.pack("<BBHIQQQQIIIIII", opcode, 0, cid, nsid, 0, 0, prp1, prp2,
                    cdw10, cdw11, cdw12, cdw13, cdw14, cdw15)
    assert len(e) == 64
    return e


def dword(v):
    return struct.pack("<I", v)


class Seed:
    def __init__(self, name, doc):
        self.name = name
        self.doc = doc
        self.ops = []            # (bytes, description)

    def _op(self, data, desc):
        assert SEPARATOR not in data, (self.name, desc)
        self.ops.append((data, desc))

    # -- raw operations -------------------------------------------------
    def write(self, region, offset, value, size=SIZE_L, what=""):
        data = struct.pack("<BBBxxIQ", OP_WRITE, size, region, offset, value)
        self._op(data, "write%s region %d +0x%x = 0x%x %s" %
                 ("bwlq"[size], region, offset, value, what))

    def pci_write(self, offset, value, size=SIZE_L, what=""):
        data = struct.pack("<BBBBxI", OP_PCI_WRITE, size, 0, offset, value)
        self._op(data, "pci config write%s 0x%x = 0x%x %s" %
                 ("bwl"[size], offset, value, what))

    def clear_dma(self):
        self._op(bytes([OP_CLEAR_DMA_PATTERNS]), "clear DMA patterns")

    def dma(self, data, what):
        self._op(bytes([OP_ADD_DMA_PATTERN, 0, 0]) + data,
                 "DMA pattern %d bytes: %s" % (len(data), what))

    # -- NVMe helpers ---------------------------------------------------
    def reg(self, offset, value, what):
        self.write(REGION_NVME, offset, value, SIZE_L, what)

    def enable(self):
        self.reg(REG_AQA, ((QSIZE - 1) << 16) | (QSIZE - 1), "AQA")
        self.reg(REG_ASQ, ASQ, "ASQ")
        self.reg(REG_ASQ + 4, 0, "ASQ hi")
        self.reg(REG_ACQ, ACQ, "ACQ")
        self.reg(REG_ACQ + 4, 0, "ACQ hi")
        self.reg(REG_CC, CC_IOSQES_IOCQES | CC_EN, "CC.EN=1")

    def disable(self):
        self.reg(REG_CC, CC_IOSQES_IOCQES, "CC.EN=0")

    def ring_sq(self, qid, tail, reads):
        """Queue the DMA patterns for `reads`, then write the SQ tail."""
        self.clear_dma()
        for data, what in reads:
            self.dma(data, what)
        self.reg(sq_db(qid), tail, "SQ%d tail doorbell" % qid)

    def ring_cq(self, qid, head, reads=()):
        self.clear_dma()
        for data, what in reads:
            self.dma(data, what)
        self.reg(cq_db(qid), head, "CQ%d head doorbell" % qid)

    def bytes(self):
        return SEPARATOR.join(d for d, _ in self.ops)


class Ctrl:
    """Tracks queue state so the DMA patterns can be computed."""

    def __init__(self, seed, dbbuf=False):
        self.s = seed
        self.dbbuf = dbbuf       # shadow doorbells active?
        self.tail = {0: 0, 1: 0}
        self.cid = 0

    def submit(self, qid, cmd, data_buffer=False, what=""):
        """Place one command at the tail of SQ `qid` and ring its doorbell."""
        self.tail[qid] = (self.tail[qid] + 1) % QSIZE
        new_tail = self.tail[qid]
        shadow_tail = (dword(new_tail), "shadow SQ%d tail = %d" %
                       (qid, new_tail))
        shadow_head = (dword(0), "shadow CQ%d head = 0" % qid)
        is_dbbuf = qid == 0 and cmd[0] == ADM_DBBUF_CONFIG
        reads = []
        if self.dbbuf:
            reads.append(shadow_tail)        # nvme_process_sq() start
        reads.append((cmd, what))            # the SQE
        if data_buffer:
            reads.append((bytes(range(0x20, 0x60)), "data buffer"))
        # After the command nvme_process_sq() reads the shadow tail again:
        # a new range after (each) Doorbell Buffer Config, which moves it
        # to dbs (the seeds always use fresh addresses), else the same range
        # as above, which is not refilled and takes no pattern.
        if is_dbbuf:
            reads.append(shadow_tail)
        if self.dbbuf or is_dbbuf:
            reads.append(shadow_head)        # nvme_post_cqes()
        self.s.ring_sq(qid, new_tail, reads)
        if cmd[0] == ADM_DBBUF_CONFIG and qid == 0:
            self.dbbuf = True

    def next_cid(self):
        self.cid += 1
        return self.cid

    # -- commands -------------------------------------------------------
    def dbbuf_config(self, dbs=DBS, eis=EIS):
        self.submit(0, sqe(ADM_DBBUF_CONFIG, self.next_cid(), prp1=dbs,
                           prp2=eis),
                    what="Doorbell Buffer Config dbs=0x%x eis=0x%x" %
                    (dbs, eis))

    def create_cq(self, qid=1, vector=0):
        self.submit(0, sqe(ADM_CREATE_CQ, self.next_cid(), prp1=IOCQ,
                           cdw10=((QSIZE - 1) << 16) | qid,
                           cdw11=(vector << 16) | 0x3),   # IEN | PC
                    what="Create I/O CQ %d vector %d" % (qid, vector))

    def create_sq(self, qid=1, cqid=1):
        self.submit(0, sqe(ADM_CREATE_SQ, self.next_cid(), prp1=IOSQ,
                           cdw10=((QSIZE - 1) << 16) | qid,
                           cdw11=(cqid << 16) | 0x1),     # PC
                    what="Create I/O SQ %d cq %d" % (qid, cqid))

    def rw(self, opcode, qid=1, slba=0):
        self.submit(qid, sqe(opcode, self.next_cid(), nsid=NSID, prp1=DATA,
                             cdw10=slba & 0xffffffff, cdw11=slba >> 32,
                             cdw12=0),                   # NLB 0: one block
                    data_buffer=True,
                    what="%s slba %d, 1 block" %
                    ("Write" if opcode == NVM_WRITE else "Read", slba))

    def cq_head(self, qid, head):
        reads = []
        if self.dbbuf and qid != 0:
            # only read with ioeventfd=on (nvme_cq_notifier)
            reads.append((dword(head), "shadow CQ%d head = %d" % (qid, head)))
        self.s.ring_cq(qid, head, reads)


def io(c):
    c.rw(NVM_WRITE, slba=0)
    c.rw(NVM_READ, slba=0)
    c.cq_head(1, 2)


def seeds():
    out = []

    s = Seed("nvme-01-enable", "set AQA/ASQ/ACQ, CC.EN=1")
    s.enable()
    out.append(s)

    s = Seed("nvme-02-io-mmio-doorbells",
             "enable, Create I/O CQ+SQ, Write, Read, CQ doorbells; "
             "no shadow doorbells")
    s.enable()
    c = Ctrl(s)
    c.create_cq()
    c.create_sq()
    c.cq_head(0, 2)
    io(c)
    out.append(s)

    s = Seed("nvme-03-dbbuf-io",
             "enable, Doorbell Buffer Config, Create I/O CQ+SQ, Write, Read, "
             "CQ doorbells")
    s.enable()
    c = Ctrl(s)
    c.dbbuf_config()
    c.create_cq()
    c.create_sq()
    c.cq_head(0, 3)
    io(c)
    out.append(s)

    s = Seed("nvme-04-dbbuf-twice-disable",
             "enable, Doorbell Buffer Config, Create I/O CQ+SQ, Doorbell "
             "Buffer Config again, CQ1 head doorbell, CC.EN=0, CQ1/SQ1 "
             "doorbells after the reset (use-after-free with ioeventfd=on "
             "before 'fix use-after-free on repeated Doorbell Buffer Config')")
    s.enable()
    c = Ctrl(s)
    c.dbbuf_config()
    c.create_cq()
    c.create_sq()
    c.dbbuf_config(DBS2, EIS2)
    c.cq_head(1, 0)
    s.disable()
    s.clear_dma()
    s.reg(cq_db(1), 0, "CQ1 head doorbell after reset")
    s.reg(sq_db(1), 1, "SQ1 tail doorbell after reset")
    out.append(s)

    s = Seed("nvme-05-msix-dbbuf-io",
             "MSI-X enabled (vectors 0, 1 unmasked), enable, Doorbell Buffer "
             "Config, Create I/O CQ (vector 1) + SQ, Write, Read, "
             "CQ doorbells")
    s.pci_write(MSIX_CAP, 0x80000000, SIZE_L, "MSI-X enable")
    for vec in (0, 1):
        base = vec * 16
        s.write(REGION_MSIX_TABLE, base + 0, 0xFEE00000, SIZE_L,
                "MSI-X vector %d address" % vec)
        s.write(REGION_MSIX_TABLE, base + 4, 0, SIZE_L,
                "MSI-X vector %d address hi" % vec)
        s.write(REGION_MSIX_TABLE, base + 8, 0x40 + vec, SIZE_L,
                "MSI-X vector %d data" % vec)
        s.write(REGION_MSIX_TABLE, base + 12, 0, SIZE_L,
                "MSI-X vector %d unmask" % vec)
    s.enable()
    c = Ctrl(s)
    c.dbbuf_config()
    c.create_cq(vector=1)
    c.create_sq()
    c.cq_head(0, 3)
    io(c)
    out.append(s)

    return out


def main(argv):
    describe = "--describe" in argv
    args = [a for a in argv if a != "--describe"]
    outdir = args[0] if args else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "seeds", "common")
    all_seeds = seeds()
    if describe:
        for s in all_seeds:
            print("%s.bin: %s" % (s.name, s.doc))
            for _, desc in s.ops:
                print("    " + desc)
        return 0
    os.makedirs(outdir, exist_ok=True)
    for s in all_seeds:
        path = os.path.join(outdir, s.name + ".bin")
        with open(path, "wb") as f:
            f.write(s.bytes())
        print("%s (%d bytes)" % (path, len(s.bytes())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
