"""Boot the nvme-dataplane guest under QEMU and collect its results.

Used by bench/run.py and tests/guest/run.py (python3 stdlib only).

The guest (guest/init) writes its results to its second serial port; here
that port is a QEMU unix-socket chardev (server=on,wait=on: QEMU does not
start the guest before we are connected, so nothing is lost).  The console
(ttyS0) goes to a file.  On every "@@NVDP SYNC <tag>" record a callback runs
(the bench samples /proc/<pid>/task/*/stat there) and then the guest is
answered "ACK <tag>" so that it only goes on once the host has sampled.
"""
import base64
import json
import os
import shlex
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_DIR = os.path.join(ROOT, "build", "guest")
LOCK = "/tmp/nvdp-heavy.lock"
FIRMWARE_DIRS = [os.path.join(GUEST_DIR, "fw"), "/usr/share/seabios",
                 "/usr/share/qemu", "/usr/lib/ipxe/qemu"]

_accel_cache = {}


def detect_accel(qemu):
    """'kvm' when KVM really boots the guest here, else 'tcg'.

    NVDP_ACCEL=kvm|tcg overrides.  /dev/kvm can exist and even run SeaBIOS
    while a Linux guest never gets anywhere (seen on this kind of machine:
    10 minutes of host system time, no console output), so the probe boots
    the real guest with a trivial job under KVM (45 s limit, under the heavy
    lock).  The answer is cached per host boot and kernel image in
    build/guest/accel-probe.json.
    """
    forced = os.environ.get("NVDP_ACCEL")
    if forced:
        return forced
    if qemu in _accel_cache:
        return _accel_cache[qemu]
    accel = "tcg"
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        try:
            boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
        except OSError:
            boot_id = "?"
        st = os.stat(os.path.join(GUEST_DIR, "vmlinuz"))
        key = f"{boot_id} {st.st_size} {st.st_mtime}"
        cache = os.path.join(GUEST_DIR, "accel-probe.json")
        try:
            c = json.load(open(cache))
            if c.get("key") == key:
                accel = c["accel"]
                _accel_cache[qemu] = accel
                return accel
        except (OSError, ValueError, KeyError):
            pass
        print("accel: probing KVM with a trivial guest boot (45 s at most)", flush=True)
        g = Guest(qemu, "nvdp_section probe echo kvm-ok\n", os.path.join(ROOT, "build", "guest-run"),
                  "kvm-probe", accel="kvm", timeout=45)
        r = g.run()
        if r.ok and "kvm-ok" in r.sections.get("probe", ""):
            accel = "kvm"
        print(f"accel: KVM probe {'booted' if accel == 'kvm' else 'failed (' + r.describe() + ')'}",
              flush=True)
        with open(cache, "w") as f:
            json.dump({"key": key, "accel": accel}, f)
    _accel_cache[qemu] = accel
    return accel


def fw_args():
    args = []
    for d in FIRMWARE_DIRS:
        if os.path.isdir(d):
            args += ["-L", d]
    return args


def device_help(qemu, driver):
    """Property names of -device DRIVER,help (empty set if unknown)."""
    r = subprocess.run([qemu, "-device", f"{driver},help"], capture_output=True, text=True)
    props = set()
    for line in r.stdout.splitlines():
        line = line.strip()
        if "=" in line and not line.endswith("options:"):
            props.add(line.split("=", 1)[0])
    return props


class Result:
    def __init__(self):
        self.sections = {}      # name -> text
        self.rcs = {}           # name -> rc of the section's command
        self.logs = []
        self.syncs = []         # (tag, monotonic time)
        self.status = None      # job exit status (None: no STATUS record)
        self.begun = False
        self.ended = False
        self.qemu_rc = None
        self.timed_out = False
        self.elapsed = 0.0
        self.accel = None
        self.console = ""
        self.cmdline = []

    @property
    def ok(self):
        return self.ended and self.status == 0 and self.qemu_rc == 0 and not self.timed_out

    def describe(self):
        return (f"accel={self.accel} qemu_rc={self.qemu_rc} begun={self.begun} "
                f"ended={self.ended} status={self.status} timed_out={self.timed_out} "
                f"elapsed={self.elapsed:.1f}s")


class Guest:
    """One boot of the guest with a job script.

    qemu_args: extra QEMU arguments (devices, blockdevs, objects, -trace).
    """

    def __init__(self, qemu, job, workdir, name, qemu_args=(), smp=2, mem=1024,
                 accel=None, timeout=600, append="", lock=True, job_via="fw_cfg"):
        self.qemu = qemu
        self.job = job
        self.workdir = workdir
        self.name = name
        self.qemu_args = list(qemu_args)
        self.smp = smp
        self.mem = mem
        self.accel = accel or detect_accel(qemu)
        self.timeout = timeout
        self.append = append
        self.lock = lock
        self.job_via = job_via      # fw_cfg | cmdline (small jobs only)
        self.pid = None

    def command(self, sock, console, jobfile):
        for f in ("vmlinuz", "initramfs.cpio.gz"):
            if not os.path.exists(os.path.join(GUEST_DIR, f)):
                raise RuntimeError(f"{GUEST_DIR}/{f} missing: run `make guest`")
        cmd = [self.qemu, "-name", f"nvdp-{self.name},debug-threads=on",
               "-machine", "q35", "-accel", self.accel,
               "-smp", str(self.smp), "-m", str(self.mem),
               "-nodefaults", "-display", "none", "-no-reboot", "-no-user-config"]
        if self.accel == "kvm":
            cmd += ["-cpu", "host"]
        cmd += fw_args()
        cmd += ["-kernel", os.path.join(GUEST_DIR, "vmlinuz"),
                "-initrd", os.path.join(GUEST_DIR, "initramfs.cpio.gz"),
                "-append", f"console=ttyS0 quiet panic=-1 nvdp.sync=1 {self.append}".strip()
                + (" " + cmdline_job(self.job) if self.job_via == "cmdline" else ""),
                "-serial", f"file:{console}",
                "-chardev", f"socket,id=nvdpres,path={sock},server=on,wait=on",
                "-serial", "chardev:nvdpres"]
        if self.job_via == "fw_cfg":
            cmd += ["-fw_cfg", f"name=opt/nvdp/job,file={jobfile}"]
        return cmd + self.qemu_args

    def run(self, on_sync=None, on_start=None, verbose=False):
        os.makedirs(self.workdir, exist_ok=True)
        base = os.path.join(self.workdir, self.name)
        jobfile, console, raw = base + ".job.sh", base + ".console.log", base + ".results.txt"
        sock = f"/tmp/nvdp-{os.getpid()}-{self.name}.sock"
        with open(jobfile, "w") as f:
            f.write(self.job)
        for p in (sock, console):
            if os.path.exists(p):
                os.unlink(p)
        cmd = self.command(sock, console, jobfile)
        res = Result()
        res.accel = self.accel
        res.cmdline = cmd
        with open(base + ".cmd", "w") as f:
            f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        lockf = None
        if self.lock and not os.environ.get("NVDP_LOCK_HELD"):
            # flock /tmp/nvdp-heavy.lock: never two heavy jobs at once.
            lockf = open(LOCK, "a")
            import fcntl
            t0 = time.monotonic()
            fcntl.flock(lockf, fcntl.LOCK_EX)
            if time.monotonic() - t0 > 1 and verbose:
                print(f"  (waited {time.monotonic() - t0:.0f}s for {LOCK})", flush=True)
        try:
            self._run(cmd, sock, raw, res, on_sync, on_start)
        finally:
            if lockf:
                lockf.close()
            if os.path.exists(sock):
                os.unlink(sock)
        try:
            res.console = open(console, errors="replace").read()
        except OSError:
            res.console = ""
        return res

    def _run(self, cmd, sock, raw, res, on_sync, on_start):
        t0 = time.monotonic()
        stderr = open(os.path.join(self.workdir, self.name + ".stderr"), "w")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        self.pid = proc.pid
        s = None
        try:
            while s is None:
                if proc.poll() is not None:
                    break
                if time.monotonic() - t0 > 30:
                    raise RuntimeError("QEMU did not open its results socket")
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(sock)
                except OSError:
                    s.close()
                    s = None
                    time.sleep(0.02)
            if on_start and s is not None:
                on_start(proc.pid)
            buf = b""
            cur = None
            curlines = []
            with open(raw, "wb") as rawf:
                while s is not None:
                    left = self.timeout - (time.monotonic() - t0)
                    if left <= 0:
                        res.timed_out = True
                        break
                    s.settimeout(min(left, 1.0))
                    try:
                        data = s.recv(65536)
                    except socket.timeout:
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    rawf.write(data)
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        line = line.decode(errors="replace").rstrip("\r")
                        if line.startswith("@@NVDP "):
                            rec = line[7:]
                            kind, _, arg = rec.partition(" ")
                            if kind == "SECTION":
                                cur, curlines = arg, []
                            elif kind == "ENDSECTION":
                                name, _, rc = arg.rpartition(" ")
                                res.sections[name] = "\n".join(curlines) + "\n"
                                res.rcs[name] = int(rc) if rc.lstrip("-").isdigit() else None
                                cur = None
                            elif kind == "SYNC":
                                res.syncs.append((arg, time.monotonic()))
                                if on_sync:
                                    on_sync(arg, proc.pid)
                                s.sendall(f"ACK {arg}\n".encode())
                            elif kind == "LOG":
                                res.logs.append(arg)
                            elif kind == "BEGIN":
                                res.begun = True
                            elif kind == "STATUS":
                                res.status = int(arg) if arg.lstrip("-").isdigit() else None
                            elif kind == "END":
                                res.ended = True
                        elif cur is not None:
                            curlines.append(line)
            if res.timed_out and proc.poll() is None:
                proc.kill()
            try:
                res.qemu_rc = proc.wait(timeout=max(5, self.timeout - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                res.timed_out = True
                proc.kill()
                res.qemu_rc = proc.wait()
        finally:
            if s is not None:
                s.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stderr.close()
            res.elapsed = time.monotonic() - t0


def cmdline_job(script):
    """A job passed on the kernel command line (small scripts only)."""
    return "nvdp.job=" + base64.b64encode(script.encode()).decode()


if __name__ == "__main__":
    # Ad-hoc: python3 guest/vm.py QEMU 'shell job' [extra qemu args...]
    # NVDP_JOB_VIA=cmdline passes the job on the kernel command line instead.
    q, job = sys.argv[1], sys.argv[2]
    g = Guest(q, job, os.path.join(ROOT, "build", "guest-run"), "adhoc", sys.argv[3:],
              job_via=os.environ.get("NVDP_JOB_VIA", "fw_cfg"))
    r = g.run(verbose=True)
    for k, v in r.sections.items():
        print(f"--- {k} (rc {r.rcs[k]})\n{v}", end="")
    print(r.describe())
    sys.exit(0 if r.ok else 1)
