"""THE table of named device configurations (bench and guest tests).

Adding a configuration is one line in CONFIGS below, e.g.

    nvme("nvme-irqfd", "ioeventfd=on,irq-eventfd=on"),
    nvme("nvme-iothread", "ioeventfd=on", iothread="poll-max-ns=0"),

Every nvme(...) configuration that runs on the patched QEMU is also covered
by the guest tests (tests/guest/run.py: fio verify, nvme-cli, reset).  The
bench and the tests skip, with a note, a configuration whose device
properties the QEMU binary does not have (`-device DRIVER,help`).

Fields:
  qemu       "patched" (build/qemu/build) or "stock" (build/stock/build,
             the unpatched nvme-dataplane-base; `make stock`)
  props      device properties as "k=v,k=v" (checked against DRIVER,help)
  iothread   None, or the properties of `-object iothread,id=iothread0,...`;
             the thread is then named "IO iothread0" on the host
  quick      part of the default `make bench` matrix
  guest_tests  (nvme, patched) also run by the guest tests; False for
             variants that only differ in tuning
  baseline   the configuration that ratios are computed against
"""

QEMU_BINARIES = {
    "patched": "build/qemu/build/qemu-system-x86_64",
    "stock": "build/stock/build/qemu-system-x86_64",
}

# Backends of the emulated disk.  IMAGE is a raw image file on a real
# filesystem (not tmpfs), preallocated; see bench/run.py.
BACKENDS = {
    "native": "driver=file,filename={image},cache.direct=on,aio=native",
    "io_uring": "driver=file,filename={image},cache.direct=on,aio=io_uring",
    "null": "driver=null-co,size=1G,read-zeroes=off",
}


class Config:
    def __init__(self, name, kind, driver, props="", iothread=None, qemu="patched",
                 quick=True, baseline=False, desc="", guest_dev=None, irq_pattern=None,
                 doorbell_events=(), count_props="", guest_tests=True):
        self.name = name
        self.kind = kind            # nvme | virtio-blk | null_blk
        self.driver = driver        # -device driver (None: no device)
        self.props = props
        self.iothread = iothread
        self.qemu = qemu
        self.quick = quick
        self.baseline = baseline
        self.desc = desc
        self.guest_dev = guest_dev
        self.irq_pattern = irq_pattern      # regex on /proc/interrupts names
        self.doorbell_events = list(doorbell_events)
        self.count_props = count_props      # props overridden in the count pass
        self.guest_tests = guest_tests      # nvme: also covered by tests/guest

    def prop_dict(self, counting=False):
        d = {}
        for kv in filter(None, self.props.split(",")):
            k, _, v = kv.partition("=")
            d[k] = v
        if counting:
            for kv in filter(None, self.count_props.split(",")):
                k, _, v = kv.partition("=")
                d[k] = v
        return d

    def missing_props(self, supported):
        """Device properties this configuration needs that the binary lacks."""
        if not self.driver:
            return []
        return [k for k in self.prop_dict() if k not in supported]

    def qemu_args(self, backend="native", image=None, counting=False):
        args = []
        if self.iothread is not None:
            args += ["-object", ",".join(filter(None, ["iothread,id=iothread0", self.iothread]))]
        if not self.driver:
            return args
        args += ["-blockdev", "node-name=disk0," + BACKENDS[backend].format(image=image)]
        props = ",".join(f"{k}={v}" for k, v in self.prop_dict(counting).items())
        dev = {"nvme": f"nvme,serial=nvdp0001,drive=disk0",
               "virtio-blk": "virtio-blk-pci,drive=disk0"}[self.kind]
        args += ["-device", ",".join(filter(None, [dev, props]))]
        return args


NVME_MMIO_DOORBELLS = ["pci_nvme_mmio_doorbell_sq", "pci_nvme_mmio_doorbell_cq"]
# doorbell writes collected by an ioeventfd (patched QEMU): "count N"
NVME_IOEVENTFD_DOORBELLS = ["pci_nvme_ioeventfd_doorbell_sq", "pci_nvme_ioeventfd_doorbell_cq"]


def with_iothread(props, iothread):
    """Device properties plus iothread=iothread0 when there is one."""
    if iothread is None:
        return props
    return ",".join(filter(None, [props, "iothread=iothread0"]))


def nvme(name, props="", iothread=None, **kw):
    props = with_iothread(props, iothread)
    kw.setdefault("desc", f"-device nvme{',' + props if props else ''}"
                  + (f" + iothread {iothread}" if iothread else ""))
    if iothread is None:
        # count MMIO doorbells with ioeventfd=off, as stock QEMU can
        count = dict(doorbell_events=NVME_MMIO_DOORBELLS, count_props="ioeventfd=off")
    else:
        # iothread needs ioeventfd=on: count what the ioeventfds collect
        count = dict(doorbell_events=NVME_MMIO_DOORBELLS + NVME_IOEVENTFD_DOORBELLS)
    return Config(name, "nvme", "nvme", props, iothread=iothread, guest_dev="/dev/nvme0n1",
                  irq_pattern=r"nvme0q\d+", **count, **kw)


def virtio_blk(name, props="", iothread=None, **kw):
    props = with_iothread(props, iothread)
    kw.setdefault("desc", f"-device virtio-blk-pci{',' + props if props else ''}"
                  + (f" + iothread {iothread}" if iothread else ""))
    # virtio-blk refuses iothread with ioeventfd=off, and the eventfd path
    # has no trace point: no counting pass for iothread configurations.
    return Config(name, "virtio-blk", "virtio-blk-pci", props, iothread=iothread,
                  guest_dev="/dev/vda", irq_pattern=r"virtio\d+-req",
                  doorbell_events=[] if iothread is not None else ["virtio_pci_notify_write"],
                  count_props="ioeventfd=off", **kw)


def null_blk(name, params="queue_mode=2 irqmode=0 gb=1 bs=4096 submit_queues=2", **kw):
    kw.setdefault("desc", f"guest null_blk ({params}), no emulated disk: the ceiling")
    c = Config(name, "null_blk", None, guest_dev="/dev/nullb0", irq_pattern=None, **kw)
    c.modparams = params
    return c


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
    virtio_blk("virtio-blk"),
    virtio_blk("virtio-blk-iothread", iothread="poll-max-ns=0"),
    virtio_blk("virtio-blk-iothread-poll", iothread="poll-max-ns=32768", quick=False),
    virtio_blk("virtio-blk-iothread-poll1ms", iothread="poll-max-ns=1000000", quick=False),
    null_blk("null_blk"),
]

BY_NAME = {c.name: c for c in CONFIGS}
