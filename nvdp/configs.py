"""THE table of named device configurations (bench, guest tests, README).

Adding a configuration is one line in CONFIGS below, e.g.

    nvme("nvme-irqfd", "ioeventfd=on,irq-eventfd=on"),
    nvme("nvme-iothread", "ioeventfd=on", iothread="poll-max-ns=0"),

Every nvme(...) configuration that runs on the patched QEMU is also covered
by the guest tests (tests/guest/run.py: fio verify, nvme-cli, reset).  The
bench and the tests skip, with a note, a configuration whose device
properties the QEMU binary does not have (`-device DRIVER,help`).

`python3 -m nvdp.configs --markdown` prints the table (the bench report's
legend is the same table); `--update bench/README.md` rewrites it there.

Fields:
  qemu       "patched" (build/qemu/build) or "stock" (build/stock/build,
             the unpatched nvme-dataplane-base; `make stock`)
  props      device properties as "k=v,k=v" (checked against DRIVER,help)
  iothread   None, or the properties of `-object iothread,id=iothread0,...`;
             the thread is then named "IO iothread0" on the host
  iothreads  how many such IOThreads (iothread0, iothread1, ...); more than
             one: the device spreads its queues over them, round-robin
             (nvme iothread-queue-mapping, virtio-blk iothread-vq-mapping;
             -device in JSON)
  quick      part of the default `make bench` matrix
  guest_tests  (nvme, patched) also run by the guest tests; False for
             variants that only differ in tuning
  baseline   the configuration that ratios are computed against
  doorbell_events, count_props  the bench's doorbell counting pass: these
             trace events, with these properties overridden
"""
import argparse
import json
import os
import re
from dataclasses import dataclass, replace

QEMU_BINARIES = {
    "patched": "build/qemu/build/qemu-system-x86_64",
    "stock": "build/stock/build/qemu-system-x86_64",
}

# Backends of the emulated disk.  IMAGE is a raw image file on a real
# filesystem (not tmpfs), preallocated; see nvdp/bench.py.
BACKENDS = {
    "native": "driver=file,filename={image},cache.direct=on,aio=native",
    "io_uring": "driver=file,filename={image},cache.direct=on,aio=io_uring",
    "null": "driver=null-co,size=1G,read-zeroes=off",
    # the page cache, for file systems without O_DIRECT (tmpfs)
    "threads": "driver=file,filename={image},aio=threads",
}


# the property that spreads a device's queues over several IOThreads
MAPPING_PROP = {"nvme": "iothread-queue-mapping", "virtio-blk": "iothread-vq-mapping"}


def props_dict(props):
    return dict(kv.partition("=")[::2] for kv in filter(None, props.split(",")))


@dataclass
class Config:
    name: str
    kind: str                   # nvme | virtio-blk | null_blk
    driver: str = None          # -device driver (None: no device)
    props: str = ""
    iothread: str = None
    iothreads: int = 1
    qemu: str = "patched"
    quick: bool = True
    baseline: bool = False
    desc: str = ""
    guest_dev: str = None
    irq_pattern: str = None     # regex on /proc/interrupts names
    doorbell_events: tuple = ()
    count_props: str = ""       # props overridden in the counting pass
    guest_tests: bool = True    # nvme: also covered by tests/guest
    modparams: str = ""         # null_blk module parameters

    def missing_props(self, supported):
        """Device properties this configuration needs that the binary lacks."""
        if not self.driver:
            return []
        need = list(props_dict(self.props))
        if self.iothreads > 1:
            need.append(MAPPING_PROP[self.kind])
        return [k for k in need if k not in supported]

    def iothread_ids(self):
        return [] if self.iothread is None else [f"iothread{i}" for i in range(self.iothreads)]

    def qemu_args(self, backend="native", image=None, counting=False, dev_props=""):
        """Arguments for this configuration; DEV_PROPS ("k=v,...") are
        added to the device's (an id, a bus)."""
        args = []
        for i in self.iothread_ids():
            args += ["-object", ",".join(filter(None, [f"iothread,id={i}", self.iothread]))]
        if not self.driver:
            return args
        props = props_dict(self.props)
        if counting:
            props.update(props_dict(self.count_props))
        props.update(props_dict(dev_props))
        dev = {"nvme": "nvme,serial=nvdp0001,drive=disk0",
               "virtio-blk": "virtio-blk-pci,drive=disk0"}[self.kind]
        blockdev = ["-blockdev", "node-name=disk0," + BACKENDS[backend].format(image=image)]
        if self.iothreads > 1:
            return args + blockdev + ["-device", self.device_json(dev, props)]
        return args + blockdev + ["-device", ",".join([dev] + [f"{k}={v}" for k, v in props.items()])]

    def device_json(self, dev, props):
        """-device in JSON (a queue mapping is a list of objects): numbers as
        numbers, on/off as booleans."""
        d = {"driver": dev.split(",")[0]}
        for k, v in list(props_dict(",".join(dev.split(",")[1:])).items()) + list(props.items()):
            d[k] = int(v) if v.isdigit() else {"on": True, "off": False}.get(v, v)
        d[MAPPING_PROP[self.kind]] = [{"iothread": i} for i in self.iothread_ids()]
        return json.dumps(d, separators=(",", ":"))


NVME_MMIO_DOORBELLS = ("pci_nvme_mmio_doorbell_sq", "pci_nvme_mmio_doorbell_cq")
# doorbell writes collected by an ioeventfd (patched QEMU): "count N"
NVME_IOEVENTFD_DOORBELLS = ("pci_nvme_ioeventfd_doorbell_sq", "pci_nvme_ioeventfd_doorbell_cq")


def _device(kind, driver, name, props, iothread, kw):
    n = kw.get("iothreads", 1)
    if iothread is not None and n == 1:
        props = ",".join(filter(None, [props, "iothread=iothread0"]))
    mapping = MAPPING_PROP[kind]
    kw.setdefault("desc", f"-device {driver}{',' + props if props else ''}"
                  + (f" + iothread {iothread}" if iothread and n == 1 else "")
                  + (f" + {mapping} over {n} iothreads {iothread}" if n > 1 else ""))
    return Config(name, kind, driver, props, iothread=iothread, **kw)


def nvme(name, props="", iothread=None, **kw):
    if iothread is None:
        # count MMIO doorbells with ioeventfd=off, as stock QEMU can
        kw.update(doorbell_events=NVME_MMIO_DOORBELLS, count_props="ioeventfd=off")
    else:
        # iothread needs ioeventfd=on: count what the ioeventfds collect
        kw.update(doorbell_events=NVME_MMIO_DOORBELLS + NVME_IOEVENTFD_DOORBELLS)
    return _device("nvme", "nvme", name, props, iothread,
                   dict(guest_dev="/dev/nvme0n1", irq_pattern=r"nvme0q\d+", **kw))


def virtio_blk(name, props="", iothread=None, **kw):
    # virtio-blk refuses iothread with ioeventfd=off, and the eventfd path
    # has no trace point: no counting pass for iothread configurations.
    if iothread is None:
        kw.update(doorbell_events=("virtio_pci_notify_write",), count_props="ioeventfd=off")
    return _device("virtio-blk", "virtio-blk-pci", name, props, iothread,
                   dict(guest_dev="/dev/vda", irq_pattern=r"virtio\d+-req", **kw))


def null_blk(name, params="queue_mode=2 irqmode=0 gb=1 bs=4096 submit_queues=2", **kw):
    kw.setdefault("desc", f"guest null_blk ({params}), no emulated disk: the ceiling")
    return Config(name, "null_blk", guest_dev="/dev/nullb0", modparams=params, **kw)


CONFIGS = [
    nvme("stock-nvme", qemu="stock", baseline=True,
         desc="-device nvme on unpatched QEMU 10.0.13 (nvme-dataplane-base)"),
    nvme("nvme"),
    nvme("nvme-ioeventfd", "ioeventfd=on"),
    nvme("nvme-irqfd", "ioeventfd=on,irq-eventfd=on"),
    nvme("nvme-iothread", "ioeventfd=on", iothread="poll-max-ns=0"),
    nvme("nvme-iothread-poll", "ioeventfd=on", iothread="poll-max-ns=32768", quick=False),
    nvme("nvme-iothread-poll1ms", "ioeventfd=on", iothread="poll-max-ns=1000000",
         quick=False, guest_tests=False),
    # MMIO doorbells only (no Doorbell Buffer Config, as Windows, the BSDs
    # and SPDK): every doorbell handed from the vCPU to the IOThread;
    # ioeventfd left to its default (on with iothread)
    nvme("nvme-iothread-dbcs-off", "dbcs=off", iothread="poll-max-ns=0", quick=False),
    nvme("nvme-iothread-poll-dbcs-off", "dbcs=off", iothread="poll-max-ns=32768",
         quick=False),
    # the queues over two IOThreads (round-robin: with 2 vCPUs, one queue
    # pair, or virtqueue, per vCPU in each)
    nvme("nvme-iothreads2", "ioeventfd=on", iothread="poll-max-ns=0", iothreads=2,
         quick=False),
    virtio_blk("virtio-blk"),
    virtio_blk("virtio-blk-iothread", iothread="poll-max-ns=0"),
    virtio_blk("virtio-blk-iothread-poll", iothread="poll-max-ns=32768", quick=False),
    virtio_blk("virtio-blk-iothread-poll1ms", iothread="poll-max-ns=1000000", quick=False),
    virtio_blk("virtio-blk-iothreads2", iothread="poll-max-ns=0", iothreads=2, quick=False),
    null_blk("null_blk"),
]

# An A/B run against another build of the patched QEMU (the series before
# a change, say): NVDP_QEMU_BEFORE=/path/to/qemu-system-x86_64 adds
# "<name>-before" twins of the nvme configurations with an IOThread, to
# pick with --configs next to the originals, in the same interleaved run.
if os.environ.get("NVDP_QEMU_BEFORE"):
    QEMU_BINARIES["before"] = os.environ["NVDP_QEMU_BEFORE"]
    CONFIGS += [replace(c, name=c.name + "-before", qemu="before", quick=False,
                        desc=c.desc + " (NVDP_QEMU_BEFORE)", guest_tests=False)
                for c in list(CONFIGS) if c.kind == "nvme" and c.iothread is not None]

BY_NAME = {c.name: c for c in CONFIGS}


def markdown(cfgs=CONFIGS, skipped=(), baseline=None):
    """The table of configurations: the bench report's legend, the README's table."""
    L = ["| name | what | db/IO counting pass | make bench | guest tests |",
         "|---|---|---|---|---|"]
    for c in cfgs:
        count = "; ".join(filter(None, [c.count_props, ", ".join(c.doorbell_events)])) or "-"
        tests = "yes" if c.kind == "nvme" and c.qemu == "patched" and c.guest_tests else "-"
        L.append(f"| {c.name}{' (baseline)' if c.baseline else ''} | {c.desc} | {count} "
                 f"| {'quick' if c.quick else 'FULL=1'} | {tests} |")
    L += [f"| ~~{name}~~ | skipped: {why} | | | |" for name, why in skipped]
    return "\n".join(L) + "\n"


BEGIN, END = "<!-- configs: python3 -m nvdp.configs --update", "<!-- end configs -->"


def main():
    ap = argparse.ArgumentParser(description="the table of configurations")
    ap.add_argument("--markdown", action="store_true", help="print it as markdown")
    ap.add_argument("--update", metavar="FILE", help=f"rewrite it between {BEGIN}... and {END}")
    a = ap.parse_args()
    if a.update:
        text = open(a.update).read()
        rx = re.compile(re.escape(BEGIN) + r".*?-->\n.*?" + re.escape(END), re.S)
        if not rx.search(text):
            raise SystemExit(f"{a.update}: no '{BEGIN} FILE -->' ... '{END}' markers")
        new = rx.sub(lambda m: m.group(0).split("\n", 1)[0] + "\n" + markdown() + END, text)
        open(a.update, "w").write(new)
    else:
        print(markdown(), end="")


if __name__ == "__main__":
    main()
