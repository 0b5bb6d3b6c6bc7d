"""Boot the nvme-dataplane guest under QEMU (QEMUMachine) and collect its results.

The guest (guest/init) writes `@@NVDP` records to its second serial port;
here that port is a socket chardev on one end of a socketpair made before
QEMU starts (so nothing is lost, and QEMU waits for nobody).  The console
(ttyS0) goes to a file, QEMU's own output to WORKDIR/NAME.log (QEMUMachine).
On every "@@NVDP SYNC <tag>" record a callback runs with the QEMUMachine
(the bench samples /proc/<pid>/task/*/stat, the unplug test talks QMP) and
then the guest is answered "ACK <tag>", so it only goes on once the host is done.
"""
import base64
import fcntl
import json
import os
import shlex
import socket
import subprocess
import sys
import time

from qemu.machine import QEMUMachine
from qemu.machine.machine import AbnormalShutdown, QEMUMachineError
from qemu.utils import kvm_available

from . import ROOT

GUEST_DIR = os.path.join(ROOT, "build", "guest")
LOCK = "/tmp/nvdp-heavy.lock"
FIRMWARE_DIRS = [os.path.join(GUEST_DIR, "fw"), "/usr/share/seabios",
                 "/usr/share/qemu", "/usr/lib/ipxe/qemu"]

_accel_cache = {}


def detect_accel(qemu):
    """'kvm' when KVM really boots the guest here, else 'tcg'.

    NVDP_ACCEL=kvm|tcg overrides.  QEMU's own qemu.utils.kvm_available() only
    checks /dev/kvm and the binary's `-accel help`; on this kind of machine
    /dev/kvm exists and even runs SeaBIOS while a Linux guest never gets
    anywhere (10 minutes of host system time, no console output).  So past
    kvm_available() the probe boots the real guest with a trivial job under
    KVM (45 s limit, under the heavy lock).  The answer is cached per host
    boot and kernel image in build/guest/accel-probe.json.
    """
    if os.environ.get("NVDP_ACCEL"):
        return os.environ["NVDP_ACCEL"]
    if qemu not in _accel_cache:
        _accel_cache[qemu] = _probe_kvm(qemu) if kvm_available("x86_64", qemu) else "tcg"
    return _accel_cache[qemu]


def _probe_kvm(qemu):
    boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
    st = os.stat(os.path.join(GUEST_DIR, "vmlinuz"))
    key = f"{boot_id} {st.st_size} {st.st_mtime}"
    cache = os.path.join(GUEST_DIR, "accel-probe.json")
    try:
        c = json.load(open(cache))
        if c.get("key") == key:
            return c["accel"]
    except (OSError, ValueError, KeyError):
        pass
    print("accel: probing KVM with a trivial guest boot (45 s at most)", flush=True)
    r = Guest(qemu, "nvdp_section probe echo kvm-ok\n", os.path.join(ROOT, "build", "guest-run"),
              "kvm-probe", accel="kvm", timeout=45).run()
    accel = "kvm" if r.ok and "kvm-ok" in r.sections.get("probe", "") else "tcg"
    print(f"accel: KVM probe {'booted' if accel == 'kvm' else 'failed (' + r.describe() + ')'}",
          flush=True)
    with open(cache, "w") as f:
        json.dump({"key": key, "accel": accel}, f)
    return accel


def unplug_steps(res, dev_id="dut"):
    """on_sync steps of a device_del test (guest and KVM tests): at SYNC
    "unplug", device_del DEV_ID; at "after", whether DEVICE_DELETED came
    (within 20 s), the run state, and whether query-pci still lists the
    device.  Answers, and any QMP failure ("error"), go into the dict RES."""
    def step(tag, machine):
        try:
            if tag == "unplug":
                res["del"] = machine.qmp("device_del", id=dev_id)
            elif tag == "after":
                try:
                    res["deleted"] = bool(machine.event_wait("DEVICE_DELETED", 20))
                except TimeoutError:
                    res["deleted"] = False
                res["status"] = machine.cmd("query-status").get("status")
                res["present"] = dev_id in json.dumps(machine.cmd("query-pci"))
        except Exception as e:      # noqa: BLE001 -- any QMP failure fails the case
            res["error"] = repr(e)
    return step


def device_help(qemu, driver):
    """Property names of -device DRIVER,help (empty set if unknown)."""
    r = subprocess.run([qemu, "-device", f"{driver},help"], capture_output=True, text=True)
    return {ln.strip().split("=", 1)[0] for ln in r.stdout.splitlines()
            if "=" in ln and not ln.strip().endswith("options:")}


class Result:
    def __init__(self, accel, cmdline):
        self.sections = {}      # name -> text
        self.rcs = {}           # name -> rc of the section's command
        self.logs = []
        self.status = None      # job exit status (None: no STATUS record)
        self.begun = self.ended = self.timed_out = False
        self.qemu_rc = None
        self.elapsed = 0.0
        self.accel = accel
        self.console = ""
        self.cmdline = cmdline  # QEMUMachine adds -display none -vga none and its QMP monitor

    @property
    def ok(self):
        return self.ended and self.status == 0 and self.qemu_rc == 0 and not self.timed_out

    def describe(self):
        return (f"accel={self.accel} qemu_rc={self.qemu_rc} begun={self.begun} "
                f"ended={self.ended} status={self.status} timed_out={self.timed_out} "
                f"elapsed={self.elapsed:.1f}s")


def _int(s):
    return int(s) if s.lstrip("-").isdigit() else None


class Guest:
    """One boot of the guest with a job script.

    qemu_args: extra QEMU arguments (devices, blockdevs, objects, -trace).
    """

    def __init__(self, qemu, job, workdir, name, qemu_args=(), smp=2, mem=1024,
                 accel=None, timeout=600, append="", job_via="fw_cfg"):
        self.qemu, self.job, self.workdir, self.name = qemu, job, workdir, name
        self.qemu_args = list(qemu_args)
        self.smp, self.mem, self.timeout, self.append = smp, mem, timeout, append
        self.accel = accel or detect_accel(qemu)
        self.job_via = job_via      # fw_cfg | cmdline (small jobs only)

    def args(self, results_fd, console, jobfile):
        for f in ("vmlinuz", "initramfs.cpio.gz"):
            if not os.path.exists(os.path.join(GUEST_DIR, f)):
                raise RuntimeError(f"{GUEST_DIR}/{f} missing: run `make guest`")
        append = f"console=ttyS0 quiet panic=-1 nvdp.sync=1 {self.append}".strip()
        if self.job_via == "cmdline":
            append += " nvdp.job=" + base64.b64encode(self.job.encode()).decode()
        args = ["-name", f"nvdp-{self.name},debug-threads=on", "-machine", "q35",
                "-accel", self.accel, "-smp", str(self.smp), "-m", str(self.mem),
                "-nodefaults", "-no-reboot", "-no-user-config"]
        args += ["-cpu", "host"] if self.accel == "kvm" else []
        args += [a for d in FIRMWARE_DIRS if os.path.isdir(d) for a in ("-L", d)]
        args += ["-kernel", os.path.join(GUEST_DIR, "vmlinuz"),
                 "-initrd", os.path.join(GUEST_DIR, "initramfs.cpio.gz"), "-append", append,
                 "-serial", f"file:{console}",
                 "-chardev", f"socket,id=nvdpres,fd={results_fd}", "-serial", "chardev:nvdpres"]
        if self.job_via == "fw_cfg":
            args += ["-fw_cfg", f"name=opt/nvdp/job,file={jobfile}"]
        return args + self.qemu_args

    def run(self, on_sync=None):
        """Boot under the heavy lock (never two heavy jobs at once), run the
        job, return its Result.  on_sync(tag, machine) runs on each SYNC."""
        os.makedirs(self.workdir, exist_ok=True)
        base = os.path.join(self.workdir, self.name)
        jobfile, console = base + ".job.sh", base + ".console.log"
        with open(jobfile, "w") as f:
            f.write(self.job)
        ours, theirs = socket.socketpair()
        os.set_inheritable(theirs.fileno(), True)     # QEMUMachine keeps inheritable fds
        args = self.args(theirs.fileno(), console, jobfile)
        res = Result(self.accel, [self.qemu] + args)
        with open(base + ".cmd", "w") as f:
            f.write(shlex.join(res.cmdline) + "\n")
        vm = QEMUMachine(self.qemu, args, name=self.name, base_temp_dir=self.workdir,
                         log_dir=self.workdir)
        with open(LOCK, "a") as lock, ours:
            fcntl.flock(lock, fcntl.LOCK_EX)
            t0 = time.monotonic()
            try:
                vm.launch()
                theirs.close()
                with open(base + ".results.txt", "wb") as raw:
                    self._read(vm, ours, raw, res, on_sync, t0)
                if res.timed_out:
                    vm.kill()
                else:
                    vm.wait(timeout=max(5, int(self.timeout - (time.monotonic() - t0))))
            except AbnormalShutdown:
                res.timed_out = True
            except QEMUMachineError as e:
                res.logs.append(f"QEMU: {str(e).strip()[:2000]}")
            finally:
                theirs.close()
                vm.shutdown(hard=True)
                res.qemu_rc = vm.exitcode()
                res.elapsed = time.monotonic() - t0
        try:
            res.console = open(console, errors="replace").read()
        except OSError:
            pass
        return res

    def _read(self, vm, sock, raw, res, on_sync, t0):
        buf, cur, curlines = b"", None, []
        while True:
            left = self.timeout - (time.monotonic() - t0)
            if left <= 0:
                res.timed_out = True
                return
            sock.settimeout(min(left, 1.0))
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            raw.write(data)
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                line = line.decode(errors="replace").rstrip("\r")
                if not line.startswith("@@NVDP "):
                    if cur is not None:
                        curlines.append(line)
                    continue
                kind, _, arg = line[7:].partition(" ")
                if kind == "SECTION":
                    cur, curlines = arg, []
                elif kind == "ENDSECTION":
                    name, _, rc = arg.rpartition(" ")
                    res.sections[name], res.rcs[name] = "\n".join(curlines) + "\n", _int(rc)
                    cur = None
                elif kind == "SYNC":
                    if on_sync:
                        on_sync(arg, vm)
                    try:
                        sock.sendall(f"ACK {arg}\n".encode())
                    except OSError:     # the guest is gone (powered off, killed)
                        return
                elif kind == "LOG":
                    res.logs.append(arg)
                elif kind == "STATUS":
                    res.status = _int(arg)
                else:
                    res.begun |= kind == "BEGIN"
                    res.ended |= kind == "END"


if __name__ == "__main__":
    # Ad-hoc: python3 -m nvdp.vm QEMU 'shell job' [extra qemu args...]
    # NVDP_JOB_VIA=cmdline passes the job on the kernel command line instead.
    r = Guest(sys.argv[1], sys.argv[2], os.path.join(ROOT, "build", "guest-run"), "adhoc",
              sys.argv[3:], job_via=os.environ.get("NVDP_JOB_VIA", "fw_cfg")).run()
    for k, v in r.sections.items():
        print(f"--- {k} (rc {r.rcs[k]})\n{v}", end="")
    print(r.describe())
    sys.exit(0 if r.ok else 1)
