#!/usr/bin/python3
"""The KVM path of the patched QEMU, nested (`make check-kvm`).

This machine has no usable /dev/kvm, so the test brings its own KVM host:

  L0 (here)  the patched qemu-system-x86_64 under TCG (-cpu max emulates
             AMD SVM with nested paging) boots L1: build/kvm-l1 (the Debian
             kernel of the guest image, an initramfs from guest/mkl1.py
             whose /init is guest/init-l1);
  L1         loads kvm and kvm_amd, mounts this machine's root read-only
             over virtio-9p and a writable 9p share (build/kvm-check/share,
             at the same path), chroots into the root and runs this script
             with --inside: the SAME QEMU binary, python and harness;
  L2         the project's guest (build/guest) booted by nvdp.vm.Guest
             with -accel kvm -cpu host, once per case of CASES below (one
             L1 boot, the L2 runs one after the other inside it): the
             configurations with irq-eventfd on of nvdp/configs.py
             (nvme-iothread, nvme-iothread-poll, nvme-irqfd: main loop,
             ioeventfd=on,irq-eventfd=on) and nvme-iothread with a single
             MSI-X vector (msix_qsize=1: Linux then puts the admin CQ and
             its one I/O CQ on vector 0; with fewer vectors than CPUs it
             makes fewer I/O queues, it never puts two I/O CQs on one
             vector).  In L2: fio randwrite verify=crc32c at QD 16 while
             cpu1 goes offline and online again every ~100 ms.

QEMU's trace of each L2 QEMU (pci_nvme_irq*, pci_nvme_err_irq*,
kvm_irqchip_*) and everything else lands in the share (one folder per
case); then, here, per case:
  - L1 has /dev/kvm, nested virtualization and nested paging (otherwise the
    whole test is reported as SKIP, with the reason; checked once);
  - L2 boots under KVM and its job ends;
  - pci_nvme_irq_eventfd_init says "kvm-irqfd", I/O CQ vectors get KVM
    irqfds attached, L2 takes the interrupts, no pci_nvme_err_irq_vector,
    and KVM delivered them: at most 10 % of the eventfd signals were
    handled by the main loop instead (pci_nvme_irq_vector_notify: a vector
    masked or detached at the time);
  - fio's verify is clean (exact bytes written and read back, no error);
  - the offline/online cycles ran, and QEMU updated the vectors' MSI routes
    or irqfds (pci_nvme_irq_vector_route/_irqfd, kvm_irqchip_update_msi_route,
    kvm_irqchip_commit_routes) while they did;
  - shared vector (case nvme-iothread-1vec): in L2's /proc/interrupts an
    nvme I/O queue shares its interrupt with another nvme queue, and the
    trace has that vector (0) used by an I/O CQ with its irqfd attached and
    raised directly (admin CQ).  Its interrupt is not a managed one: the job
    moves it to cpu1 before each offline, so that every cycle migrates it.
Output: TAP (nvdp/tap.py), "kvm: N passed, N failed".  Files: build/kvm-check/.

L2's disk image is a file on L1's tmpfs, opened buffered with aio=threads
(tmpfs has no O_DIRECT; the configuration's own cache.direct=on,aio=native
on the 9p share instead managed ~20 I/Os per second here and timed out).

--count measures instead of testing: per I/O under KVM, for the bench
configurations of COUNT_CONFIGS (nvme, nvme-iothread, nvme-iothread-poll,
virtio-blk-iothread), fio 4k randread at QD 1 and QD 16 in L2 while L1's
tracefs records kvm:kvm_mmio and kvm:kvm_fast_mmio (kept when the address
lies in one of the disk's BARs: its doorbell or notify writes, each a VM
exit), kvm:kvm_userspace_exit (MMIO exits that went on to QEMU's vCPU
thread, any device) and kvm:kvm_msi_set_irq (MSI injections: irqfd or
QEMU), switched on and off by the guest's sync points around fio; L2's own
count of its disk interrupts (/proc/interrupts).  Output: a table (markdown,
build/kvm-check/counts.md) and TAP lines that only check that every run
happened.

Options: --cases A,B (names of CASES, or of nvme configurations of
nvdp/configs.py; default: all of CASES; --config NAME: one), --size-mib N
(fio's region per case, default 16), --l2-timeout S (per case, default
200), --timeout S (for L1, default 60 + (L2's + 30) per case),
--l1-cpu MODEL (L1's -cpu, default max; "max,-svm"
shows the SKIP path), --l1-smp N (L1's vCPUs, 1 or 2, default 2; maxcpus
stays 2).  Run from the repository root with
PYTHONPATH=.:build/qemu/python (the Makefile sets it); build/kvm-l1 must be
built (guest/mkl1.py; the Makefile does it).
"""
import argparse
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nvdp import ROOT, configs, fio, vm   # noqa: E402
from nvdp.tap import Tap                  # noqa: E402

MiB = 1 << 20
L1_DIR = os.path.join(ROOT, "build", "kvm-l1")
WORK = os.path.join(ROOT, "build", "kvm-check")
SHARE = os.path.join(WORK, "share")
TRACE_EVENTS = ["pci_nvme_irq*", "pci_nvme_err_irq*", "kvm_irqchip_*"]
# what an MSI route / irqfd update of an nvme vector leaves in the trace
UPDATE_EVENTS = ("pci_nvme_irq_vector_route", "pci_nvme_irq_vector_irqfd",
                 "kvm_irqchip_update_msi_route", "kvm_irqchip_commit_routes",
                 "kvm_irqchip_add_msi_route")
CPU1 = "/sys/devices/system/cpu/cpu1/online"
# the L2 runs: name -> (configuration of nvdp/configs.py, device properties
# added for this run, what it is about); all with irq-eventfd on
CASES = {
    "nvme-iothread": ("nvme-iothread", "", "I/O CQs raised from the IOThread"),
    "nvme-iothread-poll": ("nvme-iothread-poll", "", "the same, IOThread polling"),
    "nvme-irqfd": ("nvme-irqfd", "", "main loop, ioeventfd=on,irq-eventfd=on"),
    "nvme-iothread-1vec": ("nvme-iothread", "msix_qsize=1",
                           "one MSI-X vector: admin CQ and I/O CQ share vector 0"),
}
SHARED = {"nvme-iothread-1vec"}     # cases that must show a shared vector
# stress cases: controller resets during QD 64 verify, driver unbind/bind
# (MSI-X off and on), device_del during I/O; the controller on a PCIe root
# port (hot-pluggable) with id "dut"
STRESS = {
    "nvme-iothread-stress": ("nvme-iothread", "resets at QD 64, unbind/bind, device_del"),
    "nvme-iothread-poll-stress": ("nvme-iothread-poll", "the same, IOThread polling"),
}
for _n, (_c, _d) in STRESS.items():
    CASES[_n] = (_c, "", _d)


def case(name):
    """(configuration, extra props, description) of a case or configuration name."""
    if name in CASES:
        return CASES[name]
    return (name, "", "") if name in configs.BY_NAME else None


def device_args(name, image):
    """L2's QEMU arguments of a case, with its disk on L1's tmpfs."""
    cname, extra, _ = case(name)
    args = configs.BY_NAME[cname].qemu_args("native", image)
    i = args.index("-blockdev") + 1     # tmpfs: no O_DIRECT, so no aio=native
    args[i] = f"node-name=disk0,driver=file,filename={image},cache.direct=off,aio=threads"
    if extra:
        args[args.index("-device") + 1] += "," + extra
    if name in STRESS:                  # a hot-pluggable slot for device_del
        args[args.index("-device") + 1] += ",id=dut,bus=rp0"
        args = ["-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1"] + args
    return args


def stress_job():
    """L2's job of a STRESS case."""
    v = dict(verify="crc32c", do_verify=1, verify_fatal=1, randrepeat=0)
    resets = fio.cmdline("resets", "/dev/nvme0n1", "randwrite", 64, size="16M", **v)
    rebind = fio.cmdline("rebind", "/dev/nvme0n1", "randwrite", 16, size="8M", **v)
    unplug = fio.cmdline("unplug", "/dev/nvme0n1", "randwrite", 64, size="16M",
                         time_based=True, runtime=60)
    return "\n".join(fio.wait_dev("/dev/nvme0n1") + [
        # 1. controller resets while fio verifies at QD 64
        f"fio --output-format=json {resets} >/tmp/r.json 2>/tmp/r.err &",
        "pid=$!; n=0; sleep 1",
        "while kill -0 $pid 2>/dev/null; do",
        "  echo 1 >/sys/class/nvme/nvme0/reset_controller 2>/dev/null && n=$((n+1)); sleep 1",
        "done",
        "wait $pid; frc=$?",
        "nvdp_section resets cat /tmp/r.json",
        "nvdp_section resets.rc echo $frc",
        "nvdp_section resets.count echo $n",
        "cat /tmp/r.err >&2",
        "i=0; while [ \"$(cat /sys/class/nvme/nvme0/state)\" != live ] && [ $i -lt 100 ]; "
        "do sleep 0.1; i=$((i+1)); done",
        # 2. driver unbind and bind: MSI-X disabled, enabled again
        "bdf=$(basename $(readlink -f /sys/class/nvme/nvme0/device))",
        "nvdp_sync unbind",
        "echo $bdf >/sys/bus/pci/drivers/nvme/unbind; sleep 1",
        "nvdp_sync rebind",
        "echo $bdf >/sys/bus/pci/drivers/nvme/bind",
        "nvdp_wait_dev /dev/nvme0n1 60 || nvdp_log 'no /dev/nvme0n1 after bind'",
        "nvdp_irqs rebind.irq0",
        "nvdp_section rebind fio --output-format=json " + rebind,
        "nvdp_irqs rebind.irq1",
        # 3. device_del during I/O
        f"fio --output-format=json {unplug} >/dev/null 2>&1 &",
        "pid=$!; sleep 2",
        "nvdp_section unplug.before sh -c 'kill -0 '$pid' && echo FIO-RUNNING'",
        "nvdp_sync unplug",
        "i=0; while [ -e /sys/class/nvme/nvme0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done",
        "nvdp_section unplug.gone sh -c '[ -e /sys/class/nvme/nvme0 ] && echo STILL-THERE "
        "|| echo GONE'",
        "kill $pid 2>/dev/null; i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 100 ]; "
        "do sleep 0.1; i=$((i+1)); done",
        "nvdp_sync after",
        "nvdp_section dmesg dmesg",
        "exit 0"]) + "\n"


# ------------------------------------------------------------------ L2 (run in L1)
def l2_job(size, pin=False):
    """L2's job.  pin: before each offline, move the nvme interrupts that can
    be moved (not the managed per-CPU ones: EIO) to cpu1, so that the offline
    migrates them every cycle (an unmanaged shared vector otherwise moves at
    most once)."""
    f = fio.cmdline("v16", "/dev/nvme0n1", "randwrite", 16, size=size, verify="crc32c",
                    do_verify=1, verify_fatal=1, randrepeat=0)
    return "\n".join(fio.wait_dev("/dev/nvme0n1") + [
        "nvdp_section cpus cat /sys/devices/system/cpu/online",
        "nvdp_irqs irq0",
        f"fio --output-format=json {f} >/tmp/f.json 2>/tmp/f.err &",
        "pid=$!",
        "nvdp_sync cycles-begin",
        # cpu1 offline and online again every ~100 ms while fio runs
        "n=0; bad=0",
        "irqs=$(grep nvme0q /proc/interrupts | cut -d: -f1)",
        "while kill -0 $pid 2>/dev/null; do",
    ] + ([
        "  for i in $irqs; do echo 2 >/proc/irq/$i/smp_affinity 2>/dev/null; done",
        "  sleep 0.02",
    ] if pin else []) + [
        f"  if echo 0 >{CPU1}; then sleep 0.05; echo 1 >{CPU1} && n=$((n+1)) || bad=$((bad+1));",
        "  else bad=$((bad+1)); fi",
        "  sleep 0.05",
        "done",
        f"echo 1 >{CPU1} 2>/dev/null",
        "nvdp_sync cycles-end",
        "wait $pid; frc=$?",
        "nvdp_section fio cat /tmp/f.json",
        "nvdp_section fio.rc echo $frc",
        "nvdp_section cycles echo $n $bad",
        "cat /tmp/f.err >&2",
        "nvdp_irqs irq1",
        "nvdp_section dmesg dmesg",
        "exit 0"]) + "\n"


def inside(a):
    """In L1's chroot: boot L2 under KVM once per case, leave everything in
    the share (SHARE/CASE/)."""
    qemu = os.path.join(ROOT, configs.QEMU_BINARIES["patched"])
    rc = 0
    for name in a.cases.split(","):
        try:
            (run_count_l2 if a.count else run_l2)(a, qemu, name)
        except Exception as e:      # report it, go on with the next case
            print(f"L2 {name}: {type(e).__name__}: {e}", flush=True)
            rc = 1
    return rc


def run_l2(a, qemu, name):
    work = os.path.join("/tmp/kvm-l2", name)
    out = os.path.join(a.share, name)
    os.makedirs(work, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    trace = os.path.join(work, "l2.trace")
    image = os.path.join(work, "l2.img")
    with open(image, "wb") as f:
        f.truncate(2 * a.size_mib * MiB)
    args = device_args(name, image)
    for e in TRACE_EVENTS:          # each -trace sets the file again (None: stderr)
        args += ["-trace", f"enable={e},file={trace}"]
    # every vCPU reset with the state before it: L2 exiting with status 0 in
    # the middle of a job (README, Known issues) is a guest reset under
    # -no-reboot; this shows where L2 was (a triple fault leaves no console
    # message)
    args += ["-d", "cpu_reset", "-D", os.path.join(work, "l2.cpu-reset.log")]
    marks = {}
    qmp = {}
    unplug = vm.unplug_steps(qmp)   # STRESS: device_del, and what QEMU says after

    def on_sync(tag, machine):
        marks[tag] = os.path.getsize(trace) if os.path.exists(trace) else 0
        unplug(tag, machine)

    job = stress_job() if name in STRESS else l2_job(f"{a.size_mib}M", pin=name in SHARED)
    g = vm.Guest(qemu, job, work, "l2", args, accel="kvm", append=a.l2_append,
                 timeout=a.l2_timeout + (120 if name in STRESS else 0))
    r = g.run(on_sync=on_sync)
    os.unlink(image)
    print(f"L2 {name}:", shlex.join(r.cmdline), flush=True)
    print(f"L2 {name}:", r.describe(), flush=True)
    res = dict(describe=r.describe(), ok=r.ok, accel=r.accel, ended=r.ended, status=r.status,
               qemu_rc=r.qemu_rc, timed_out=r.timed_out, elapsed=r.elapsed, sections=r.sections,
               rcs=r.rcs, logs=r.logs, marks=marks, size=a.size_mib * MiB, cmdline=r.cmdline,
               qmp=qmp)
    for f in os.listdir(work):
        if os.path.isfile(os.path.join(work, f)):
            shutil.copy(os.path.join(work, f), os.path.join(out, f))
    with open(os.path.join(out, "l2-result.json"), "w") as f:
        json.dump(res, f, indent=1)


# ------------------------------------------------------------------ counts (--count)
COUNT_CONFIGS = ["nvme", "nvme-iothread", "nvme-iothread-poll", "virtio-blk-iothread"]
COUNT_RUNS = [("qd1", 1, 1500), ("qd16", 16, 4000)]    # (tag, iodepth, I/Os)
KVM_EVENTS = ["kvm/kvm_mmio", "kvm/kvm_fast_mmio", "kvm/kvm_userspace_exit",
              "kvm/kvm_msi_set_irq"]
TRACEFS = "/sys/kernel/tracing"


def count_job(cfg):
    dev = cfg.guest_dev
    return "\n".join(fio.wait_dev(dev) + [
        f"nvdp_fio {tag} " + fio.cmdline(tag, dev, "randread", qd, size="64M",
                                         number_ios=n, randrepeat=0)
        + " || true" for tag, qd, n in COUNT_RUNS] + ["exit 0"]) + "\n"


def tracefs(path, val):
    with open(os.path.join(TRACEFS, path), "w") as f:
        f.write(val)


def disk_bars(machine, kind):
    """[(start, end)] of the memory BARs of the L2 disk (query-pci)."""
    out = []
    for bus in machine.qmp("query-pci")["return"]:
        for d in bus["devices"]:
            ident = (d["id"]["vendor"], d["id"]["device"])
            if (kind == "nvme" and d["class_info"]["class"] == 0x0108) or \
                    (kind == "virtio-blk" and ident in ((0x1af4, 0x1001), (0x1af4, 0x1042))):
                out += [(r["address"], r["address"] + r["size"]) for r in d["regions"]
                        if r["type"] == "memory"]
    return out


def run_count_l2(a, qemu, name):
    """In L1: one L2 boot of configuration NAME, kvm trace windows around fio."""
    cfg = configs.BY_NAME[name]
    work = os.path.join("/tmp/kvm-l2", name)
    out = os.path.join(a.share, name)
    os.makedirs(work, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    image = os.path.join(work, "l2.img")
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    if not os.path.isdir(os.path.join(TRACEFS, "events")):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=False)
    tracefs("tracing_on", "0")
    tracefs("buffer_size_kb", "65536")
    for e in KVM_EVENTS:
        tracefs(f"events/{e}/enable", "1")
    meta = {"bars": [], "kind": cfg.kind}

    def on_sync(tag, machine):
        what, _, run = tag.partition(" ")
        if what == "begin":
            meta["bars"] = disk_bars(machine, cfg.kind)
            tracefs("trace", "")
            tracefs("tracing_on", "1")
        elif what == "end":
            tracefs("tracing_on", "0")
            shutil.copy(os.path.join(TRACEFS, "trace"), os.path.join(out, f"{run}.ktrace"))

    g = vm.Guest(qemu, count_job(cfg), work, "l2", device_args(name, image), accel="kvm",
                 timeout=a.l2_timeout)
    r = g.run(on_sync=on_sync)
    os.unlink(image)
    print(f"L2 {name}:", r.describe(), flush=True)
    with open(os.path.join(out, "l2-result.json"), "w") as f:
        json.dump(dict(describe=r.describe(), ok=r.ok, accel=r.accel, sections=r.sections,
                       meta=meta, cmdline=r.cmdline), f, indent=1)


GPA_RE = re.compile(r"gpa 0x([0-9a-f]+)")


def count_run(text, bars):
    """Counts of one trace window."""
    c = dict(mmio_w=0, mmio_r=0, fast=0, user_mmio=0, msi=0)
    for ln in text.splitlines():
        if "kvm_msi_set_irq:" in ln:
            c["msi"] += 1
        elif "kvm_userspace_exit:" in ln:
            c["user_mmio"] += "KVM_EXIT_MMIO" in ln
        elif "kvm_mmio:" in ln or "kvm_fast_mmio:" in ln:
            m = GPA_RE.search(ln)
            if not m or not any(lo <= int(m.group(1), 16) < hi for lo, hi in bars):
                continue
            if "kvm_fast_mmio:" in ln:
                c["fast"] += 1
            elif "mmio write" in ln:
                c["mmio_w"] += 1
            elif "read" in ln:
                c["mmio_r"] += 1
    return c


def irq_delta(sections, run, pattern):
    def total(text):
        n = 0
        for ln in (text or "").splitlines():
            f = ln.split()
            if f and re.search(pattern, ln):
                n += sum(int(x) for x in f[1:] if x.isdigit())
        return n
    return total(sections.get(f"{run}.irq1")) - total(sections.get(f"{run}.irq0"))


def check_counts(t, a):
    rows = []
    for name in a.cases.split(","):
        cfg = configs.BY_NAME[name]
        try:
            res = json.loads(read("l2-result.json", name) or "null")
        except ValueError:
            res = None
        t.ok(bool(res and res["accel"] == "kvm"), f"{name}: L2 booted under KVM",
             res["describe"] if res else "no l2-result.json")
        if not res:
            continue
        for run, qd, n in COUNT_RUNS:
            f = fio.parse(res["sections"].get(run, ""))
            text = read(f"{run}.ktrace", name)
            ok = bool(f and f["ios"] and not f["error"] and text is not None and
                      res["meta"]["bars"])
            t.ok(ok, f"{name} {run}: fio ran, the kvm trace window was recorded",
                 f"fio={f} trace={'yes' if text is not None else 'no'} "
                 f"bars={res['meta']['bars']}")
            if not ok:
                continue
            c = count_run(text, res["meta"]["bars"])
            ios = f["ios"]
            irqs = irq_delta(res["sections"], run, cfg.irq_pattern)
            rows.append((name, qd, ios, f["iops"], (c["mmio_w"] + c["fast"]) / ios,
                         c["fast"] / ios, c["mmio_r"] / ios, c["user_mmio"] / ios,
                         c["msi"] / ios, irqs / ios))
    L = ["| config | QD | I/Os | IOPS | doorbell exits/IO (of which fast MMIO) | "
         "BAR reads/IO | MMIO exits to QEMU/IO (any device) | MSI injections/IO | "
         "L2 disk interrupts/IO |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.0f} | {r[4]:.2f} ({r[5]:.2f}) | "
                 f"{r[6]:.2f} | {r[7]:.2f} | {r[8]:.2f} | {r[9]:.2f} |")
    md = "\n".join(L) + "\n"
    with open(os.path.join(WORK, "counts.md"), "w") as f:
        f.write(md)
    for ln in L:
        print(f"# {ln}", flush=True)


# ------------------------------------------------------------------ L0 (here)
def l1_job(a):
    inner = ["/usr/bin/python3", os.path.abspath(__file__), "--inside", "--share", SHARE,
             "--cases", a.cases, "--size-mib", str(a.size_mib),
             "--l2-timeout", str(a.l2_timeout), "--l2-append", a.l2_append] + \
        (["--count"] if a.count else [])
    return "\n".join([
        "export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PYTHONDONTWRITEBYTECODE=1",
        f"export PYTHONPATH={ROOT}:{ROOT}/build/qemu/python",
        f"cd {ROOT}",
        "echo \"L1: $(uname -r), $(nproc) cpus, /dev/kvm: $(ls -l /dev/kvm)\"",
        "t0=$(date +%s)",
        shlex.join(inner),
        "rc=$?",
        "echo \"L1: inside job rc=$rc in $(( $(date +%s) - t0 ))s\"",
        "exit $rc"]) + "\n"


def boot_l1(a, qemu):
    for f in ("vmlinuz", "initramfs.cpio.gz"):
        if not os.path.exists(os.path.join(L1_DIR, f)):
            raise SystemExit(f"{L1_DIR}/{f} missing: run guest/mkl1.py (make check-kvm does)")
    shutil.rmtree(SHARE, ignore_errors=True)
    os.makedirs(SHARE)
    with open(os.path.join(SHARE, "l1-job.sh"), "w") as f:
        f.write(l1_job(a))
    console = os.path.join(WORK, "l1.console.log")
    cmd = [qemu, "-name", "nvdp-kvm-l1", "-machine", "q35", "-accel", "tcg,thread=multi",
           "-cpu", a.l1_cpu, "-smp", f"{a.l1_smp},maxcpus=2", "-m", "4G", "-nodefaults", "-no-user-config",
           "-no-reboot", "-display", "none"]
    cmd += [x for d in vm.FIRMWARE_DIRS if os.path.isdir(d) for x in ("-L", d)]
    cmd += ["-kernel", os.path.join(L1_DIR, "vmlinuz"),
            "-initrd", os.path.join(L1_DIR, "initramfs.cpio.gz"),
            "-append", f"console=ttyS0 panic=-1 nvdp.share={SHARE}",
            "-serial", f"file:{console}",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                       "multidevs=remap",
            "-virtfs", f"local,path={SHARE},mount_tag=results,security_model=none,"
                       "multidevs=remap"]
    with open(os.path.join(WORK, "l1.cmd"), "w") as f:
        f.write(shlex.join(cmd) + "\n")
    print(f"# L1: {shlex.join(cmd)}", flush=True)
    with open(vm.LOCK, "a") as lock, open(os.path.join(WORK, "l1.log"), "w") as log:
        fcntl.flock(lock, fcntl.LOCK_EX)     # one heavy VM at a time (nvdp.vm)
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            rc = p.wait(timeout=a.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
            timed_out = True
        return rc, timed_out, time.monotonic() - t0


def read(name, sub=""):
    try:
        return open(os.path.join(SHARE, sub, name), errors="replace").read()
    except OSError:
        return None


def tail(text, n=12):
    return "\n".join((text or "").splitlines()[-n:])


def shared_nvme_irqs(text):
    """/proc/interrupts lines of one interrupt shared by several nvme queues,
    one of them an I/O queue (names "nvme0q0, nvme0q1")."""
    out = []
    for ln in text.splitlines():
        q = re.findall(r"nvme0q(\d+)", ln)
        if len(q) > 1 and any(x != "0" for x in q):
            out.append(" ".join(ln.split()))
    return out


def nvme_io_irqs(text):
    """Sum of the nvme I/O queue interrupts (nvme0q1...) of a /proc/interrupts."""
    n = 0
    for ln in text.splitlines():
        f = ln.split()
        if f and re.fullmatch(r"nvme0q[1-9]\d*", f[-1]):
            n += sum(int(x) for x in f[1:] if x.isdigit())
    return n


def check(t, a, rc, timed_out, elapsed):
    console = open(os.path.join(WORK, "l1.console.log"), errors="replace").read() \
        if os.path.exists(os.path.join(WORK, "l1.console.log")) else ""
    print(f"# L1: qemu rc={rc} timed_out={timed_out} elapsed={elapsed:.0f}s", flush=True)
    status = read("l1-status")
    if status is None:
        t.ok(False, "L1 boots and mounts the 9p shares",
             f"rc={rc} timed_out={timed_out}\n{tail(console)}\n{tail(read('l1.log') or '')}")
        return
    dmesg = read("l1-dmesg.txt") or ""
    kvm_lines = [ln for ln in dmesg.splitlines()
                 if re.search(r"\b(kvm|SVM|VMX|ccp)\b", ln) and "command line" not in ln.lower()]
    for ln in kvm_lines:
        print(f"# L1 dmesg: {ln}", flush=True)
    if "kvm yes" not in status:
        l1 = [ln.split("nvdp-l1: ", 1)[1] for ln in console.splitlines() if "nvdp-l1: " in ln]
        t.skip("KVM in L1", "L1 has no /dev/kvm: " + "; ".join(
            (l1[:1] or ["L1 said nothing"]) + (kvm_lines[-4:] or ["no kvm lines in its dmesg"])))
        return
    nested = "Nested Virtualization enabled" in dmesg
    npt = "Nested Paging enabled" in dmesg
    t.ok(nested and npt, "L1 (TCG, -cpu max) has /dev/kvm with nested virtualization and "
         "nested paging", "\n".join(kvm_lines[-6:]))
    joblog = read("l1-job.log") or ""
    for ln in joblog.splitlines():
        if ln.startswith(("L1:", "L2")):
            print(f"# {ln[:400]}", flush=True)
    if a.count:
        check_counts(t, a)
        return
    for name in a.cases.split(","):
        (check_stress if name in STRESS else check_case)(t, name, status, joblog, console)


def check_case(t, name, status, joblog, console):
    """The TAP cases of one L2 run (files in SHARE/NAME/)."""
    res = None
    try:
        res = json.loads(read("l2-result.json", name) or "null")
    except ValueError:
        pass
    cname, extra, _ = case(name)
    what = cname + (f" + {extra}" if extra else "")
    if not res:
        t.ok(False, f"{name}: L2 ({what}) boots under KVM in L1",
             f"no {name}/l2-result.json; l1-status={status.split()}"
             f"\n{tail(joblog)}\n{tail(console)}")
        return
    S, RC = res["sections"], res["rcs"]
    queues = re.findall(r"nvme nvme0: (\S+ default/read/poll queues)", S.get("dmesg", ""))
    print(f"# {name}: L2 {res['describe']}; {', '.join(queues) or 'no queue line in dmesg'}",
          flush=True)
    t.ok(res["accel"] == "kvm" and res["ended"] and res["status"] == 0
         and RC.get("cpus") == 0 and S.get("cpus", "").strip() == "0-1",
         f"{name}: L2 ({what}) boots under KVM with 2 vCPUs and its job ends",
         f"{res['describe']} cpus={S.get('cpus', '').strip()}\n" + "\n".join(res["logs"])
         + "\n" + tail(read("l2.console.log", name)))
    trace = read("l2.trace", name) or ""
    lines = trace.splitlines()
    init = [ln for ln in lines if "pci_nvme_irq_eventfd_init" in ln]
    t.ok(any("kvm-irqfd" in ln for ln in init),
         f"{name}: pci_nvme_irq_eventfd_init ... kvm-irqfd (I/O CQ interrupts through KVM "
         "irqfds)",
         f"{init or 'no pci_nvme_irq_eventfd_init in ' + str(len(lines)) + ' trace lines'}")
    attached = [ln for ln in lines if "pci_nvme_irq_vector_irqfd" in ln and "attached 1" in ln]
    errs = [ln for ln in lines if "pci_nvme_err_irq" in ln]
    signalled = sum("pci_nvme_irq_eventfd " in ln for ln in lines)
    notified = sum("pci_nvme_irq_vector_notify" in ln for ln in lines)
    print(f"# {name}: trace: {len(lines)} lines, {len(attached)} irqfd attaches, {signalled} "
          f"eventfd signals, {notified} handled by the main loop, {len(errs)} errors",
          flush=True)
    irqs = nvme_io_irqs(S.get("irq1", "")) - nvme_io_irqs(S.get("irq0", ""))
    print(f"# {name}: L2: {irqs} nvme I/O queue interrupts during fio (/proc/interrupts "
          "nvme0q1..)", flush=True)
    # the main loop handles an eventfd only while its vector is masked or
    # detached (cpu1 going offline); KVM delivers the rest
    t.ok(attached and signalled and irqs > 0 and not errs and notified * 10 <= signalled,
         f"{name}: I/O CQ vectors get KVM irqfds attached, are signalled through them, KVM "
         "delivers (main loop <= 10 %) and L2 takes the interrupts, no irq errors",
         f"attached={len(attached)} signalled={signalled} main-loop={notified} "
         f"guest irqs={irqs} errors={errs[:5]}")
    if name in SHARED:
        # L2: one interrupt for several nvme queues; QEMU: a vector both an
        # I/O CQ's (irqfd attached) and raised directly (the admin CQ)
        shared = shared_nvme_irqs(S.get("irq1", ""))
        vecs = {}
        for ev, key in (("pci_nvme_irq_vector_use", "io"), ("pci_nvme_irq_msix", "direct"),
                        ("pci_nvme_irq_vector_irqfd", "irqfd")):
            vecs[key] = {int(x) for x in re.findall(
                rf"^{ev} .*?vector (\d+)" + (r" .*attached 1$" if key == "irqfd" else ""),
                trace, re.M)}
        both = vecs["io"] & vecs["direct"] & vecs["irqfd"]
        for ln in shared:
            print(f"# {name}: L2 /proc/interrupts: {ln}", flush=True)
        print(f"# {name}: vectors of I/O CQs {sorted(vecs['io'])}, with irqfd attached "
              f"{sorted(vecs['irqfd'])}, raised directly (admin CQ) {sorted(vecs['direct'])}",
              flush=True)
        t.ok(bool(shared and both),
             f"{name}: L2 shares one interrupt between nvme queues (/proc/interrupts), QEMU "
             f"signals that vector through an I/O CQ's irqfd and directly",
             f"shared lines={shared} vectors={vecs}\n"
             + "\n".join(ln for ln in S.get("irq1", "").splitlines() if "nvme" in ln))
    size = res["size"]
    f = fio.parse(S.get("fio") or "")
    try:
        frc = int(S.get("fio.rc", "").strip())
    except ValueError:
        frc = None
    d = "no fio output" if f is None else \
        f"rc={frc} error={f['error']} written={f['write_bytes']} read={f['read_bytes']} " \
        f"expected={size} each, {f['iops']:.0f} IOPS"
    print(f"# {name}: fio: {d}", flush=True)
    t.ok(f is not None and frc == 0 and f["error"] == 0 and f["write_bytes"] == size
         and f["read_bytes"] == size,
         f"{name}: fio verify=crc32c randwrite QD 16, {size // MiB} MiB, under cpu1 "
         "offline/online: clean", d)
    try:
        ncyc, nbad = (int(x) for x in S.get("cycles", "").split())
    except ValueError:
        ncyc = nbad = None
    m = res["marks"]
    b, e = m.get("cycles-begin"), m.get("cycles-end")
    window = trace.encode()[b:e].decode(errors="replace").splitlines() if b is not None \
        and e is not None else []
    upd = {ev: sum(ev + " " in ln or ln.endswith(ev) for ln in window) for ev in UPDATE_EVENTS}
    print(f"# {name}: cycles: {ncyc} offline/online ({nbad} failed); during them: "
          + ", ".join(f"{k} {v}" for k, v in upd.items()), flush=True)
    t.ok(ncyc is not None and ncyc >= 3 and nbad == 0,
         f"{name}: cpu1 offline/online every ~100 ms in L2 during the I/O",
         f"cycles={ncyc} failed={nbad}")
    t.ok(sum(upd.values()) >= 1,
         f"{name}: MSI route / irqfd updates of nvme vectors while cpu1 goes offline/online",
         f"trace window {b}..{e} bytes, {len(window)} lines: {upd}")


def check_stress(t, name, status, joblog, console):
    """The TAP cases of a STRESS run."""
    try:
        res = json.loads(read("l2-result.json", name) or "null")
    except ValueError:
        res = None
    if not res:
        t.ok(False, f"{name}: L2 boots under KVM in L1",
             f"no {name}/l2-result.json; l1-status={status.split()}\n{tail(joblog)}")
        return
    S = res["sections"]
    t.ok(res["accel"] == "kvm" and res["ended"] and res["status"] == 0,
         f"{name}: L2 ({case(name)[0]}) boots under KVM and its job ends",
         f"{res['describe']}\n" + "\n".join(res["logs"]) + "\n"
         + tail(read("l2.console.log", name)))
    trace = read("l2.trace", name) or ""
    marks = res["marks"]

    def window(a, b=None):
        return trace[marks.get(a, len(trace)):marks.get(b, len(trace)) if b else len(trace)]

    def fio_ok(sec, size):
        f = fio.parse(S.get(sec) or "")
        rc = (S.get(sec + ".rc") or "").strip()
        return (f is not None and f["error"] == 0 and f["write_bytes"] == size
                and rc in ("", "0") and res["rcs"].get(sec) in (None, 0)), f
    ok, f = fio_ok("resets", 16 * MiB)
    n = (S.get("resets.count") or "").strip()
    t.ok(ok and n.isdigit() and int(n) >= 2,
         f"{name}: fio verify at QD 64 clean while the controller is reset every second",
         f"resets={n} fio={f}")
    unb, reb = window("unbind", "rebind"), window("rebind", "unplug")
    detached = len(re.findall(r"pci_nvme_irq_vector_irqfd .*attached 0", unb)) + \
        len(re.findall(r"pci_nvme_irq_vector_unuse", unb))
    attached = len(re.findall(r"pci_nvme_irq_vector_irqfd .*attached 1", reb))
    signalled = reb.count("pci_nvme_irq_eventfd ")
    irqs = nvme_io_irqs(S.get("rebind.irq1", "")) - nvme_io_irqs(S.get("rebind.irq0", ""))
    ok, f = fio_ok("rebind", 8 * MiB)
    t.ok(ok and detached and attached and signalled and irqs > 0,
         f"{name}: driver unbind/bind (MSI-X off and on): irqfds detached, attached again, "
         "fio verify clean through them",
         f"detached/unused={detached} attached={attached} signalled={signalled} "
         f"guest irqs={irqs} fio={f}")
    q = res.get("qmp") or {}
    gone = window("unplug")
    unused = len(re.findall(r"pci_nvme_irq_vector_unuse", gone))
    t.ok("FIO-RUNNING" in S.get("unplug.before", "") and "return" in (q.get("del") or {})
         and q.get("deleted") and q.get("status") == "running" and q.get("present") is False
         and "GONE" in S.get("unplug.gone", "") and res["qemu_rc"] == 0 and "error" not in q
         and unused > 0,
         f"{name}: device_del during QD 64 I/O: removed, vectors released, QEMU alive",
         f"qmp={q} guest={S.get('unplug.gone', '').split()} qemu_rc={res['qemu_rc']} "
         f"vector unuse events after device_del={unused}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated: of {', '.join(CASES)} or nvme configurations of "
                         "nvdp/configs.py (default: all cases)")
    ap.add_argument("--config", help="one nvme configuration (same as --cases NAME)")
    ap.add_argument("--size-mib", type=int, default=16, help="fio's region per case")
    ap.add_argument("--timeout", type=int, help="L1's limit in seconds "
                    "(default 60 + (L2's + 30) per case)")
    ap.add_argument("--l2-timeout", type=int, default=200, help="per case")
    ap.add_argument("--l1-cpu", default="max",
                    help="L1's -cpu (default max; max,-svm checks the SKIP path)")
    ap.add_argument("--l1-smp", type=int, default=2, choices=(1, 2),
                    help="L1's vCPUs (default 2; maxcpus is 2 either way)")
    ap.add_argument("--l2-append", default="",
                    help="more of L2's kernel command line (e.g. ignore_loglevel)")
    ap.add_argument("--count", action="store_true",
                    help="measure exits and injections per I/O instead (see above)")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--share", default=SHARE, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.config:
        a.cases = a.config
    elif a.count and a.cases == ",".join(CASES):
        a.cases = ",".join(COUNT_CONFIGS)
    if a.inside:
        sys.exit(inside(a))
    names = a.cases.split(",")
    if a.timeout is None:
        a.timeout = 60 + (a.l2_timeout + 30) * len(names)
    t = Tap("kvm")
    qemu = os.path.join(ROOT, configs.QEMU_BINARIES["patched"])
    bad = [n for n in names if case(n) is None or configs.BY_NAME[case(n)[0]].qemu != "patched"
           or configs.BY_NAME[case(n)[0]].kind != "nvme" and not a.count]
    if bad:
        t.ok(False, f"cases {', '.join(bad)} exist and are nvme ones on the patched QEMU",
             f"cases: {', '.join(CASES)}, or an nvme configuration of nvdp/configs.py")
    elif not os.access(qemu, os.X_OK):
        t.ok(False, f"{qemu} exists", "build QEMU first (make)")
    else:
        have = vm.device_help(qemu, "nvme") | vm.device_help(qemu, "virtio-blk-pci")
        missing = {n: [k for k in configs.props_dict(
            ",".join(filter(None, [configs.BY_NAME[case(n)[0]].props, case(n)[1]])))
            if k not in have] for n in names}
        for n in [n for n in names if missing[n]]:
            t.skip(f"{n}: all", f"nvme has no property {', '.join(missing[n])}")
        a.cases = ",".join(n for n in names if not missing[n])
        if a.cases:
            os.makedirs(WORK, exist_ok=True)
            rc, timed_out, elapsed = boot_l1(a, qemu)
            check(t, a, rc, timed_out, elapsed)
            print(f"# total {elapsed:.0f}s; files in {os.path.relpath(WORK, ROOT)}/",
                  flush=True)
    if t.skipped and not t.passed and not t.failed:
        print(f"1..{t.n}\nkvm: SKIP (nothing ran: see the # SKIP line)")
        sys.exit(0)
    sys.exit(t.done())


if __name__ == "__main__":
    main()
