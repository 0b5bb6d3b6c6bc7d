#!/usr/bin/python3
"""Guest tests of the emulated NVMe controller (`make check-guest`).

One guest boot per nvme configuration of nvdp/configs.py that runs on the
patched QEMU (nvme, nvme-ioeventfd, and whatever later issues add); a
configuration whose properties the binary lacks is reported as skipped.
In each boot:
  - the guest sees /dev/nvme0n1;
  - `nvme id-ctrl` reports Doorbell Buffer Config support (OACS bit 8);
  - the guest driver configured the shadow doorbells (host-side QEMU trace
    event pci_nvme_dbbuf_config);
  - nvme-cli write + read of 4 KiB round-trips;
  - fio verify=crc32c write-then-read at QD 16 and at QD 64: exit 0, no
    error, exactly the expected bytes written and read back;
  - a controller reset (echo 1 > /sys/class/nvme/nvme0/reset_controller)
    while a verify run is writing: fio still verifies every block, the
    controller is live again and the shadow doorbells are configured again;
  - resets every 2 s during a QD 64 verify run: fio verifies every block;
  - (first configuration only) negative control: a block overwritten behind
    fio's back must make fio's verify fail, so the verify checks can fail.
A second boot per configuration, with the controller behind a PCIe root
port: `device_del` of the controller while fio runs at QD 64.  The guest
may see errors; QEMU must survive, remove the device and answer QMP.
A third boot for the configurations in ENOSPC_CONFIGS (with and without an
IOThread): the disk is a sparse raw file on a tmpfs too small for what fio
writes (werror=enospc, the default).  QEMU must stop the VM with
BLOCK_IO_ERROR (nospace) and io-status "nospace"; the test grows the
tmpfs and sends "cont"; fio verify=crc32c must then finish with 0 errors
and every byte written and read back.
Output: TAP (nvdp/tap.py) `ok N - name` / `not ok N - name`, then "N passed, N failed";
exit status 1 if anything failed.  A missing result is a failure.

Options: --configs a,b; --tests main,unplug,enospc; --qemu BINARY.  Per-boot logs
stay in build/guest-tests/.  Run from the repository root with
PYTHONPATH=.:build/qemu/python (the Makefile sets it).
"""
import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time

from qemu.qmp.legacy import QEMUMonitorProtocol

from nvdp import ROOT, configs, fio, vm
from nvdp.tap import Tap

MiB = 1 << 20
VERIFY = [("v16", 16, 0, 32 * MiB), ("v64", 64, 64 * MiB, 32 * MiB)]
RESET = ("reset", 16, 128 * MiB, 96 * MiB)
RESETS = ("resets", 64, 320 * MiB, 96 * MiB)   # reset every 2 s meanwhile
NEG = ("neg", 8, 256 * MiB, 4 * MiB)
# configurations with several IOThreads: one fio job per vCPU (the guest's
# two I/O queues, one in each IOThread), each on its own SIZE region
JOBS2 = ("vj2", 16, 416 * MiB, 32 * MiB)


def fio_args(name, qd, offset, size, **extra):
    opts = dict(offset=offset, size=size, verify="crc32c", do_verify=1, verify_fatal=1,
                randrepeat=0)
    return "--output-format=json " + fio.cmdline(name, "/dev/nvme0n1", "randwrite", qd,
                                                 **{**opts, **extra})


def job(negative, cfg=None):
    s = fio.wait_dev("/dev/nvme0n1") + [
         "nvdp_section devinfo sh -c 'cat /sys/block/nvme0n1/size /sys/class/nvme/nvme0/state'",
         "nvdp_section idctrl nvme id-ctrl /dev/nvme0 -o json",
         "dd if=/dev/urandom of=/tmp/w bs=4096 count=1 2>/dev/null",
         "nvdp_section nvmerw sh -c 'nvme write /dev/nvme0n1 -s 4096 -c 7 -z 4096 -d /tmp/w "
         "&& nvme read /dev/nvme0n1 -s 4096 -c 7 -z 4096 -d /tmp/r && cmp /tmp/w /tmp/r "
         "&& echo ROUNDTRIP-OK'"]
    for name, qd, off, size in VERIFY:
        s.append(f"nvdp_section {name} fio {fio_args(name, qd, off, size)}")
    if cfg is not None and cfg.iothreads > 1:
        name, qd, off, size = JOBS2
        s.append(f"nvdp_section {name} fio "
                 f"{fio_args(name, qd, off, size, numjobs=2, offset_increment=size)}")
    name, qd, off, size = RESET
    s += [f"fio {fio_args(name, qd, off, size)} >/tmp/reset.json 2>/tmp/reset.err &",
          "pid=$!",
          "sleep 3",
          "nvdp_section reset.ctl sh -c 'kill -0 '$pid' && echo FIO-RUNNING; "
          "echo 1 > /sys/class/nvme/nvme0/reset_controller && echo RESET-WRITTEN'",
          "wait $pid; frc=$?",
          "nvdp_section reset cat /tmp/reset.json",
          "nvdp_section reset.rc echo $frc",
          "cat /tmp/reset.err >&2",
          "i=0; while [ \"$(cat /sys/class/nvme/nvme0/state)\" != live ] && [ $i -lt 100 ]; "
          "do sleep 0.1; i=$((i+1)); done",
          "nvdp_section reset.state cat /sys/class/nvme/nvme0/state"]
    name, qd, off, size = RESETS
    s += [f"fio {fio_args(name, qd, off, size)} >/tmp/resets.json 2>/tmp/resets.err &",
          "pid=$!; n=0",
          "sleep 2",
          "while kill -0 $pid 2>/dev/null; do "
          "echo 1 > /sys/class/nvme/nvme0/reset_controller && n=$((n+1)); sleep 2; done",
          "wait $pid; frc=$?",
          "nvdp_section resets cat /tmp/resets.json",
          "nvdp_section resets.rc echo $frc",
          "nvdp_section resets.count echo $n",
          "cat /tmp/resets.err >&2",
          "nvdp_section dmesg dmesg"]
    if negative:
        name, qd, off, size = NEG
        s += [f"fio {fio_args(name, qd, off, size, do_verify=0)} >/dev/null 2>&1",
              # corrupt one 4 KiB block in the middle of the region, behind fio's back
              f"dd if=/dev/urandom of=/dev/nvme0n1 bs=4096 count=1 seek={(off + size // 2) // 4096} "
              "oflag=direct conv=notrunc 2>/dev/null",
              f"nvdp_section neg fio {fio_args(name, qd, off, size, verify_only=1)}"]
    return "\n".join(s) + "\nexit 0\n"


# (passed, diagnosis) for a verify run that must move exactly SIZE
fio_check = fio.verify_check


def test_config(t, cfg, qemu, negative, workdir):
    tracefile = os.path.join(workdir, f"{cfg.name}.trace")
    if os.path.exists(tracefile):
        os.unlink(tracefile)
    image = os.path.join(workdir, f"{cfg.name}.img")
    with open(image, "wb") as f:
        f.truncate(512 * MiB)
    args = cfg.qemu_args("native", image) + [
        "-trace", f"enable=pci_nvme_dbbuf_config,file={tracefile}",
        "-trace", f"enable=pci_nvme_sq_ctx,file={tracefile}"]
    t0 = time.monotonic()
    r = vm.Guest(qemu, job(negative, cfg), workdir, cfg.name, args, timeout=240).run()
    print(f"# {cfg.name}: {r.describe()}", flush=True)
    S, RC = r.sections, r.rcs
    P = f"{cfg.name}:"
    t.ok(r.ended and r.status == 0 and RC.get("devinfo") == 0,
         f"{P} guest boots and sees /dev/nvme0n1",
         r.describe() + "\n" + "\n".join(r.logs) + "\n" + r.console[-800:])
    # id-ctrl: OACS bit 8 = Doorbell Buffer Config
    oacs = None
    try:
        oacs = json.loads(S["idctrl"])["oacs"]
    except (KeyError, ValueError, TypeError):
        pass
    # dbcs=off: no Doorbell Buffer Config, MMIO doorbells only (Windows, BSDs)
    want_dbbuf = configs.props_dict(cfg.props).get("dbcs") != "off"
    t.ok(oacs is not None and bool(oacs & 0x100) == want_dbbuf,
         f"{P} nvme id-ctrl reports Doorbell Buffer Config (OACS bit 8) "
         f"{'set' if want_dbbuf else 'clear'}", f"oacs={oacs} rc={RC.get('idctrl')}")
    dbbuf = 0
    if os.path.exists(tracefile):
        dbbuf = sum(1 for line in open(tracefile, errors="replace")
                    if "pci_nvme_dbbuf_config" in line)
    t.ok(dbbuf >= 1 if want_dbbuf else dbbuf == 0,
         f"{P} guest driver {'enabled' if want_dbbuf else 'did not enable'} the shadow "
         f"doorbells (pci_nvme_dbbuf_config)", f"trace events: {dbbuf}")
    t.ok(RC.get("nvmerw") == 0 and "ROUNDTRIP-OK" in S.get("nvmerw", ""),
         f"{P} nvme-cli write + read round-trip", f"rc={RC.get('nvmerw')} {S.get('nvmerw')}")
    for name, qd, off, size in VERIFY:
        ok, d = fio_check(S.get(name), RC.get(name), size)
        t.ok(ok, f"{P} fio verify=crc32c write-then-read QD {qd}, {size // MiB} MiB", d)
    if cfg.iothreads > 1:
        name, qd, off, size = JOBS2
        ok, d = fio_check(S.get(name), RC.get(name), 2 * size)
        t.ok(ok, f"{P} fio verify=crc32c, 2 jobs (one per vCPU) at QD {qd}, "
             f"{size // MiB} MiB each", d)
        # "sqid 2 runs with cqid 2 in iothread1" (queue creation)
        text = open(tracefile, errors="replace").read() if os.path.exists(tracefile) else ""
        where = {th: sorted({int(m) for m in re.findall(
            rf"sqid (\d+) runs with cqid \d+ in {th}\b", text) if int(m) > 0})
            for th in cfg.iothread_ids()}
        t.ok(all(where.values()),
             f"{P} the guest's I/O queues run in each of the {cfg.iothreads} IOThreads "
             f"(pci_nvme_sq_ctx)", f"I/O SQs by IOThread: {where}")
    name, qd, off, size = RESET
    ctl = S.get("reset.ctl", "")
    try:
        frc = int(S.get("reset.rc", "").strip())
    except ValueError:
        frc = None
    ok, d = fio_check(S.get("reset"), frc, size)
    state = S.get("reset.state", "").strip()
    cond = (ok and "FIO-RUNNING" in ctl and "RESET-WRITTEN" in ctl and state == "live"
            and (dbbuf >= 2 if want_dbbuf else dbbuf == 0))
    t.ok(cond, f"{P} controller reset during a QD {qd} verify run loses nothing",
         f"{d}; ctl={ctl.split()} state={state} dbbuf_config events={dbbuf} (want >= 2)")
    name, qd, off, size = RESETS
    try:
        frc = int(S.get("resets.rc", "").strip())
        nres = int(S.get("resets.count", "").strip())
    except ValueError:
        frc = nres = None
    ok, d = fio_check(S.get(name), frc, size)
    t.ok(ok and nres is not None and nres >= 2,
         f"{P} resets every 2 s during a QD {qd} verify run lose nothing",
         f"{d}; resets={nres} (want >= 2)")
    if negative:
        name, qd, off, size = NEG
        f = fio.parse(S.get(name))
        t.ok(RC.get(name) not in (None, 0) and f and f["error"] != 0,
             f"{P} negative control: verify detects a corrupted block",
             f"rc={RC.get(name)} (want non-zero and a job error)")
    os.unlink(image)
    return time.monotonic() - t0


UNPLUG_FIO = "--output-format=json " + fio.cmdline(
    "unplug", "/dev/nvme0n1", "randwrite", 64, size="256M", time_based=True, runtime=60)


def unplug_job():
    return "\n".join(fio.wait_dev("/dev/nvme0n1") + [
        f"fio {UNPLUG_FIO} >/tmp/u.json 2>/tmp/u.err &",
        "pid=$!",
        "sleep 3",
        "nvdp_section unplug.before sh -c 'kill -0 '$pid' && echo FIO-RUNNING'",
        "nvdp_sync unplug",
        "i=0; while [ -e /sys/class/nvme/nvme0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done",
        "nvdp_section unplug.gone sh -c '[ -e /sys/class/nvme/nvme0 ] && echo STILL-THERE "
        "|| echo GONE'",
        # fio may sit on I/O the guest driver is still failing: do not let
        # the job wait for it without end (what is checked is QEMU's side)
        "kill $pid 2>/dev/null; i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 100 ]; "
        "do sleep 0.1; i=$((i+1)); done",
        "nvdp_sync after",
        "exit 0"]) + "\n"


def test_unplug(t, cfg, qemu, workdir):
    """device_del of the controller during I/O: QEMU survives, answers."""
    image = os.path.join(workdir, f"{cfg.name}-unplug.img")
    with open(image, "wb") as f:
        f.truncate(512 * MiB)
    # a hot-pluggable slot: a PCIe root port (q35's root bus is not)
    args = ["-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1"] + \
        cfg.qemu_args("native", image, dev_props="id=dut,bus=rp0")
    res = {}
    r = vm.Guest(qemu, unplug_job(), workdir, cfg.name + "-unplug", args,
                 timeout=240).run(on_sync=vm.unplug_steps(res))
    print(f"# {cfg.name}-unplug: {r.describe()}", flush=True)
    P = f"{cfg.name}:"
    d = (f"del={res.get('del')} deleted={res.get('deleted')} status={res.get('status')} "
         f"present={res.get('present')} error={res.get('error')} "
         f"before={r.sections.get('unplug.before', '').split()} "
         f"guest={r.sections.get('unplug.gone', '').split()} qemu_rc={r.qemu_rc}")
    t.ok("FIO-RUNNING" in r.sections.get("unplug.before", "")
         and "return" in (res.get("del") or {}) and res.get("deleted")
         and res.get("status") == "running" and res.get("present") is False
         and "GONE" in r.sections.get("unplug.gone", "") and r.ended
         and "error" not in res and r.qemu_rc == 0,
         f"{P} device_del during QD 64 I/O: device removed, QEMU alive and answering",
         d + "\n" + "\n".join(r.logs))
    os.unlink(image)


ENOSPC_CONFIGS = ("nvme", "nvme-iothread", "nvme-iothread-poll")
ENOSPC_FS, ENOSPC_FS_GROWN = 40 * MiB, 256 * MiB
ENOSPC_DISK = 256 * MiB
ENOSPC = ("enospc", 16, 0, 96 * MiB)      # more than ENOSPC_FS holds


def enospc_job():
    name, qd, off, size = ENOSPC
    return "\n".join(fio.wait_dev("/dev/nvme0n1") + [
        "nvdp_sync watch",
        f"nvdp_section {name} fio {fio_args(name, qd, off, size)}",
        "nvdp_sync after",
        "exit 0"]) + "\n"


def enospc_watch(qmp_path, mnt, res, done):
    """Host side, in a thread: wait for the VM to stop on ENOSPC (until DONE
    is set), record what QMP says, make room (grow the tmpfs), "cont"."""
    qmp = None
    try:
        qmp = QEMUMonitorProtocol(qmp_path)
        qmp.connect()
        t0 = time.monotonic()
        res["errors"] = []
        while not done.is_set():
            try:
                ev = qmp.pull_event(wait=0.5)
            except asyncio.TimeoutError:
                continue
            if ev["event"] == "BLOCK_IO_ERROR":
                res["errors"].append(ev["data"])
            elif ev["event"] == "STOP":
                break
        else:
            return      # the guest finished and QEMU never stopped
        res["stopped_after_s"] = round(time.monotonic() - t0, 1)
        res["status"] = qmp.cmd("query-status")["status"]
        res["io_status"] = [b.get("io-status") for b in qmp.cmd("query-block")]
        st = os.statvfs(mnt)
        res["fs_free_kib"] = st.f_bavail * st.f_frsize // 1024
        subprocess.run(["mount", "-o", f"remount,size={ENOSPC_FS_GROWN}", mnt], check=True)
        qmp.cmd("cont")
        res["resumed"] = qmp.cmd("query-status")["status"]
    except Exception as e:      # noqa: BLE001 -- any failure fails the case
        res["error"] = repr(e)
    finally:
        if qmp:
            try:
                qmp.close()
            except Exception:   # noqa: BLE001 -- QEMU may be gone already
                pass


def test_enospc(t, cfg, qemu, workdir):
    """The backend runs out of space during fio verify: pause, room, cont."""
    P = f"{cfg.name}:"
    mnt = os.path.join(workdir, f"{cfg.name}-enospc.mnt")
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["umount", mnt], capture_output=True)
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={ENOSPC_FS}", "tmpfs", mnt],
                       capture_output=True, text=True)
    if m.returncode != 0:
        t.skip(f"{P} werror=enospc pauses the VM", f"cannot mount a tmpfs: {m.stderr.strip()}")
        return
    try:
        image = os.path.join(mnt, "disk.img")
        with open(image, "wb") as f:
            f.truncate(ENOSPC_DISK)
        qmp_path = os.path.join(workdir, f"{cfg.name}-enospc.qmp")
        if os.path.exists(qmp_path):
            os.unlink(qmp_path)
        args = cfg.qemu_args("threads", image) + [
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        res, watch, done = {}, [], threading.Event()

        def on_sync(tag, machine):
            if tag == "watch":
                th = threading.Thread(target=enospc_watch, args=(qmp_path, mnt, res, done))
                th.start()
                watch.append(th)
            elif tag == "after":
                done.set()

        r = vm.Guest(qemu, enospc_job(), workdir, cfg.name + "-enospc", args,
                     timeout=300).run(on_sync=on_sync)
        done.set()
        if watch:
            watch[0].join(30)
        print(f"# {cfg.name}-enospc: {r.describe()} host={res}", flush=True)
        errs = res.get("errors", [])
        t.ok(res.get("status") == "io-error" and errs and all(
                 e.get("action") == "stop" and e.get("nospace") and e.get("operation") == "write"
                 for e in errs) and "nospace" in res.get("io_status", [])
             and res.get("resumed") == "running" and "error" not in res,
             f"{P} backend out of space: the VM stops (BLOCK_IO_ERROR nospace, io-status "
             f"nospace) and runs again after room is made and cont",
             f"host={res}\n" + "\n".join(r.logs))
        name, qd, off, size = ENOSPC
        ok, d = fio_check(r.sections.get(name), r.rcs.get(name), size)
        t.ok(ok and r.ended and r.qemu_rc == 0,
             f"{P} fio verify=crc32c across the pause: 0 errors, all "
             f"{size // MiB} MiB written and read back",
             f"{d} ended={r.ended} qemu_rc={r.qemu_rc}\n" + r.console[-800:])
    finally:
        subprocess.run(["umount", mnt], capture_output=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs")
    ap.add_argument("--tests", default="main,unplug,enospc",
                    help="which boots per configuration: main, unplug, enospc "
                    "(default all; enospc only for ENOSPC_CONFIGS)")
    ap.add_argument("--qemu", help="QEMU binary (default: the patched build); e.g. "
                    "build/stock/build/qemu-system-x86_64 to check the harness on the base")
    a = ap.parse_args()
    workdir = os.path.join(ROOT, "build", "guest-tests")
    os.makedirs(workdir, exist_ok=True)
    names = a.configs.split(",") if a.configs else None
    cfgs = [c for c in configs.CONFIGS if c.kind == "nvme" and c.qemu == "patched"
            and c.guest_tests
            and (names is None or c.name in names)]
    t = Tap("guest")
    if not cfgs:
        t.ok(False, "no nvme configuration selected")
    qemu = os.path.abspath(a.qemu) if a.qemu else \
        os.path.join(ROOT, configs.QEMU_BINARIES["patched"])
    if not os.access(qemu, os.X_OK):
        t.ok(False, f"{qemu} exists", "build QEMU first (make)")
        cfgs = []
    else:
        accel = vm.detect_accel(qemu)
        print(f"# accelerator: {accel}", flush=True)
    props = vm.device_help(qemu, "nvme") if cfgs else set()
    first = True
    for cfg in cfgs:
        miss = cfg.missing_props(props)
        if miss:
            t.skip(f"{cfg.name}: all", f"nvme has no property {', '.join(miss)}")
            continue
        if "main" in a.tests.split(","):
            dt = test_config(t, cfg, qemu, first, workdir)
            print(f"# {cfg.name}: {dt:.0f}s", flush=True)
            first = False
        if "unplug" in a.tests.split(","):
            test_unplug(t, cfg, qemu, workdir)
        if "enospc" in a.tests.split(",") and cfg.name in ENOSPC_CONFIGS:
            test_enospc(t, cfg, qemu, workdir)
    sys.exit(t.done())


if __name__ == "__main__":
    main()
