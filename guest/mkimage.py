#!/usr/bin/python3
"""Build the nvme-dataplane guest (kernel + initramfs) from Debian packages.

Called by guest/mkimage.sh; see there for the outputs.  Only `apt-get
download` and `dpkg-deb -x` are used: nothing is installed on the host.

The shared-library closure of fio and nvme-cli is resolved inside the image
root: every DT_NEEDED soname is looked up in the packages named by the
Depends of the package owning the object (what dpkg-shlibdeps wrote), and
finally checked with the image's own dynamic loader (`ld.so --list` with
--inhibit-cache and --library-path set to the image root only).  Any library
that resolves outside the image root, or not at all, is a hard error.
"""
import glob
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

ARCH_TRIPLET = "x86_64-linux-gnu"
# Top-level packages.  linux-image-amd64 is a metapackage: its Depends names
# the real kernel package.
TOP = ["linux-image-amd64", "busybox-static", "fio", "nvme-cli", "qemu-system-data"]
# Programs taken into the image with their library closure: (package, path).
PROGRAMS = [("fio", "usr/bin/fio"), ("nvme-cli", "usr/sbin/nvme")]
# Kernel modules wanted (module names); their dependencies come from the
# modules' own depends= (what depmod writes to modules.dep).  Built-in ones
# are skipped.  AUTOLOAD ones are loaded by /init at boot, in dependency
# order; the others are loaded on demand by the job (nvdp_modprobe).
MODULES = ["qemu_fw_cfg", "nvme_core", "nvme", "virtio_pci", "virtio_blk", "null_blk"]
AUTOLOAD = ["qemu_fw_cfg", "nvme", "virtio_pci", "virtio_blk"]
# Option ROMs QEMU needs for -kernel boot that Debian ships only in
# qemu-system-data (not installed on the host).
FIRMWARE = ["linuxboot_dma.bin", "linuxboot.bin", "kvmvapic.bin"]

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT_INPUTS = ["mkimage.sh", "mkimage.py", "init"]


def log(msg):
    print(f"mkimage: {msg}", flush=True)


def die(msg):
    print(f"mkimage: ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(cmd, **kw):
    kw.setdefault("check", True)
    kw.setdefault("text", True)
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(cmd, **kw)


# ---------------------------------------------------------------- apt
_policy = {}


def candidates(pkgs):
    """Candidate versions (what `apt-get download` fetches) of PKGS."""
    todo = [p for p in pkgs if p not in _policy]
    if todo:
        out = run(["apt-cache", "policy"] + todo).stdout
        cur = None
        for line in out.splitlines():
            m = re.match(r"^(\S+):$", line)
            if m:
                cur = m.group(1)
                continue
            m = re.match(r"^\s+Candidate:\s+(\S+)", line)
            if m and cur:
                _policy[cur] = None if m.group(1) == "(none)" else m.group(1)
        for p in todo:
            _policy.setdefault(p, None)
    return {p: _policy[p] for p in pkgs}


def candidate(pkg):
    return candidates([pkg])[pkg]


def show_field(pkg, field):
    out = run(["apt-cache", "show", "--no-all-versions", pkg]).stdout
    m = re.search(rf"^{field}: (.*)$", out, re.M)
    return m.group(1) if m else ""


def parse_depends(s):
    """'a (>= 1), b | c' -> [['a'], ['b', 'c']] (names only)."""
    groups = []
    for grp in s.split(","):
        grp = grp.strip()
        if not grp:
            continue
        alts = []
        for alt in grp.split("|"):
            name = alt.strip().split(" ")[0].split(":")[0]
            if name:
                alts.append(name)
        groups.append(alts)
    return groups


class Debs:
    def __init__(self, out):
        self.debdir = os.path.join(out, "debs")
        self.xdir = os.path.join(out, "extract")
        os.makedirs(self.debdir, exist_ok=True)
        os.makedirs(self.xdir, exist_ok=True)
        self.extracted = {}  # pkg -> (version, dir)

    def deb_path(self, pkg, ver):
        q = ver.replace(":", "%3a")
        hits = glob.glob(os.path.join(self.debdir, f"{pkg}_{q}_*.deb"))
        return hits[0] if hits else None

    def fetch(self, pkg):
        ver = candidate(pkg)
        if not ver:
            die(f"no candidate version for package {pkg}: is apt's package list "
                f"present (apt-get update)?")
        path = self.deb_path(pkg, ver)
        if not path:
            log(f"apt-get download {pkg}={ver}")
            r = run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                     f"{pkg}={ver}"], cwd=self.debdir, stderr=subprocess.STDOUT,
                    check=False)
            path = self.deb_path(pkg, ver)
            if r.returncode != 0 or not path:
                die(f"apt-get download {pkg}={ver} failed:\n{r.stdout}")
        return ver, path

    def extract(self, pkg):
        if pkg in self.extracted:
            return self.extracted[pkg][1]
        ver, path = self.fetch(pkg)
        d = os.path.join(self.xdir, f"{pkg}_{ver.replace(':', '%3a')}")
        if not os.path.exists(d + ".done"):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            run(["dpkg-deb", "-x", path, d])
            open(d + ".done", "w").close()
        self.extracted[pkg] = (ver, d)
        return d

    def depends(self, pkg):
        """First installable alternative of each Depends/Pre-Depends group."""
        ver, path = self.fetch(pkg)
        fields = run(["dpkg-deb", "-f", path, "Pre-Depends", "Depends"]).stdout
        deps = []
        for line in fields.splitlines():
            if ":" not in line:
                continue
            for alts in parse_depends(line.split(":", 1)[1]):
                cands = candidates(alts)
                for a in alts:
                    if cands[a]:
                        deps.append(a)
                        break
        return deps


# ---------------------------------------------------------------- ELF
def elf_info(path):
    """(is_elf, needed sonames, interpreter) using readelf."""
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            return False, [], None
    out = run(["readelf", "-d", "-l", "-W", path], stderr=subprocess.DEVNULL,
              check=False).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    m = re.search(r"Requesting program interpreter: ([^\]]+)\]", out)
    return True, needed, (m.group(1) if m else None)


def modinfo(path):
    """The .modinfo section of a kernel module as a list of (key, value)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        die(f"{path}: not an ELF64 module (compressed?)")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def sh(i):
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
    stro = sh(shstrndx)[4]
    for i in range(shnum):
        s = sh(i)
        name = data[stro + s[0]:data.index(b"\0", stro + s[0])].decode()
        if name == ".modinfo":
            raw = data[s[4]:s[4] + s[5]]
            items = []
            for kv in raw.split(b"\0"):
                if b"=" in kv:
                    k, v = kv.decode(errors="replace").split("=", 1)
                    items.append((k, v))
            return items
    return []


def modname(s):
    return os.path.basename(s).split(".ko")[0].replace("-", "_")


# ---------------------------------------------------------------- build
def build(out, debs, kernel_pkg):
    root = os.path.join(out, "root.new")
    shutil.rmtree(root, ignore_errors=True)
    libdir = f"usr/lib/{ARCH_TRIPLET}"
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", libdir, "usr/lib64", "etc/nvdp/deps",
              "proc", "sys", "dev", "tmp", "run", "mnt", "var/tmp", "root"]:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.symlink("usr/lib", os.path.join(root, "lib"))
    os.symlink("usr/lib64", os.path.join(root, "lib64"))
    os.symlink(f"../lib/{ARCH_TRIPLET}/ld-linux-x86-64.so.2",
               os.path.join(root, "usr/lib64/ld-linux-x86-64.so.2"))
    manifest = {"packages": {}, "libraries": {}, "modules": {}, "builtin": []}

    def note(pkg):
        manifest["packages"][pkg] = debs.extracted[pkg][0] if pkg in debs.extracted \
            else candidate(pkg)

    # busybox and its applet links
    bb = debs.extract("busybox-static")
    note("busybox-static")
    shutil.copy2(os.path.join(bb, "bin/busybox"), os.path.join(root, "bin/busybox"))
    applets = run([os.path.join(root, "bin/busybox"), "--list-full"]).stdout.split()
    for a in applets:
        p = os.path.join(root, a)
        if a in ("bin/busybox", "linuxrc") or os.path.lexists(p):
            continue
        os.makedirs(os.path.dirname(p), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(root, "bin/busybox"), os.path.dirname(p)), p)

    # programs and their library closure
    index = {}       # soname/filename -> (pkg, path in extract dir)
    indexed = set()

    def index_pkg(pkg):
        if pkg in indexed:
            return
        indexed.add(pkg)
        d = debs.extract(pkg)
        for sub in ["lib", "usr/lib", "lib64", "usr/lib64"]:
            top = os.path.join(d, sub)
            for dirpath, dirnames, files in os.walk(top):
                for f in files + [x for x in dirnames if os.path.islink(os.path.join(dirpath, x))]:
                    if ".so" in f:
                        index.setdefault(f, (pkg, os.path.join(dirpath, f)))

    def find(soname, owner):
        if soname in index:
            return index[soname]
        # BFS over the owner's Depends (shlibdeps put the provider there),
        # then their Depends, a few levels deep.
        seen, frontier = {owner}, [owner]
        for depth in range(4):
            nxt = []
            for p in frontier:
                for dep in debs.depends(p):
                    if dep in seen:
                        continue
                    seen.add(dep)
                    nxt.append(dep)
                    index_pkg(dep)
                    if soname in index:
                        return index[soname]
            frontier = nxt
        return None

    queue = []
    for pkg, path in PROGRAMS:
        d = debs.extract(pkg)
        note(pkg)
        dst = os.path.join(root, path)
        shutil.copy2(os.path.join(d, path), dst)
        queue.append((dst, pkg))
    interps = set()
    while queue:
        obj, owner = queue.pop(0)
        is_elf, needed, interp = elf_info(obj)
        if interp:
            interps.add(interp)
        for so in needed:
            dst = os.path.join(root, libdir, so)
            if os.path.exists(dst):
                continue
            hit = find(so, owner)
            if not hit:
                die(f"{os.path.relpath(obj, root)} needs {so}: not found in the Depends "
                    f"closure of {owner}")
            pkg, src = hit
            note(pkg)
            real = os.path.realpath(src)
            if not real.startswith(os.path.realpath(debs.xdir) + os.sep):
                die(f"{so} from {pkg} resolves outside the extracted package: {real}")
            shutil.copy2(real, dst)
            manifest["libraries"][so] = pkg
            queue.append((dst, pkg))

    # check with the image's own loader, host paths excluded
    ldso = os.path.join(root, libdir, "ld-linux-x86-64.so.2")
    if not os.path.exists(ldso):
        die("the image has no ld-linux-x86-64.so.2")
    for interp in interps:
        p = os.path.realpath(os.path.join(root, interp.lstrip("/")))
        if not p.startswith(os.path.realpath(root) + os.sep) or not os.path.exists(p):
            die(f"program interpreter {interp} does not resolve inside the image root")
    rootabs = os.path.realpath(root)
    bad = []
    for pkg, path in PROGRAMS:
        r = run([ldso, "--inhibit-cache", "--library-path", os.path.join(rootabs, libdir),
                 "--list", os.path.join(rootabs, path)], env={"PATH": "/usr/bin:/bin"},
                stderr=subprocess.STDOUT, check=False)
        if r.returncode != 0:
            die(f"ld.so --list {path} failed:\n{r.stdout}")
        for line in r.stdout.splitlines():
            line = line.strip()
            if "not found" in line:
                bad.append(f"{path}: {line}")
                continue
            m = re.match(r"(\S+) => (\S+) \(0x", line)
            if m and not os.path.realpath(m.group(2)).startswith(rootabs + os.sep):
                bad.append(f"{path}: {m.group(1)} resolves OUTSIDE the image root: {m.group(2)}")
    if bad:
        die("library closure is not self-contained:\n  " + "\n  ".join(bad))
    log(f"library closure: {len(manifest['libraries'])} libraries from "
        f"{len(set(manifest['libraries'].values()))} packages, all inside the image root")

    # kernel and modules
    k = debs.extract(kernel_pkg)
    note(kernel_pkg)
    kvers = os.listdir(os.path.join(k, "lib/modules"))
    if len(kvers) != 1:
        die(f"expected one kernel version in {kernel_pkg}, got {kvers}")
    kver = kvers[0]
    kmod = os.path.join(k, "lib/modules", kver)
    builtin = {modname(l) for l in open(os.path.join(kmod, "modules.builtin")).read().split()}
    ko = {}
    for dirpath, _, files in os.walk(os.path.join(kmod, "kernel")):
        for f in files:
            if ".ko" in f:
                ko[modname(f)] = os.path.relpath(os.path.join(dirpath, f), kmod)
    deps = {}

    def mdeps(name):
        if name not in deps:
            info = modinfo(os.path.join(kmod, ko[name]))
            ds = []
            for key, val in info:
                if key == "depends":
                    ds += [modname(x) for x in val.split(",") if x]
                elif key == "softdep":
                    m = re.search(r"pre:\s*([^:]*?)(\s+post:|$)", val)
                    if m:
                        ds += [modname(x) for x in m.group(1).split() if modname(x) in ko]
            deps[name] = [d for d in ds if d not in builtin]
        return deps[name]

    def order(name, acc, stack=()):
        if name in acc or name in builtin:
            return
        if name not in ko:
            die(f"kernel module {name} is neither built in nor a module of {kver}")
        if name in stack:
            die(f"module dependency cycle at {name}")
        for d in mdeps(name):
            order(d, acc, stack + (name,))
        acc.append(name)

    mroot = os.path.join(root, "lib/modules", kver)
    for name in MODULES:
        if name in builtin:
            manifest["builtin"].append(name)
            open(os.path.join(root, "etc/nvdp/deps", name), "w").close()
            continue
        seq = []
        order(name, seq)
        with open(os.path.join(root, "etc/nvdp/deps", name), "w") as f:
            for m in seq:
                f.write(f"{m} /lib/modules/{kver}/{ko[m]}\n")
        for m in seq:
            dst = os.path.join(mroot, ko[m])
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(kmod, ko[m]), dst)
            manifest["modules"][m] = {"path": ko[m], "depends": mdeps(m)}
    with open(os.path.join(mroot, "modules.dep"), "w") as f:
        for m, info in sorted(manifest["modules"].items()):
            dl = []
            order(m, dl)
            f.write(f"{info['path']}: " + " ".join(ko[d] for d in reversed(dl[:-1])) + "\n")
    shutil.copy2(os.path.join(kmod, "modules.builtin"), mroot)
    with open(os.path.join(root, "etc/nvdp/autoload"), "w") as f:
        f.write("\n".join(AUTOLOAD) + "\n")
    log(f"kernel {kver}: modules {' '.join(manifest['modules'])}; built in: "
        f"{' '.join(manifest['builtin']) or '-'}")

    # small /etc and the init
    open(os.path.join(root, "etc/passwd"), "w").write("root:x:0:0:root:/root:/bin/sh\n")
    open(os.path.join(root, "etc/group"), "w").write("root:x:0:\n")
    shutil.copy2(os.path.join(HERE, "init"), os.path.join(root, "init"))
    os.chmod(os.path.join(root, "init"), 0o755)
    manifest["kernel_version"] = kver
    with open(os.path.join(root, "etc/nvdp/manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)

    # firmware for -kernel boot
    qd = debs.extract("qemu-system-data")
    note("qemu-system-data")
    fw = os.path.join(out, "fw")
    os.makedirs(fw, exist_ok=True)
    for f in FIRMWARE:
        shutil.copy2(os.path.join(qd, "usr/share/qemu", f), os.path.join(fw, f))

    write_initramfs(root, out)
    shutil.copy2(os.path.join(k, "boot", f"vmlinuz-{kver}"), os.path.join(out, "vmlinuz"))
    shutil.rmtree(os.path.join(out, "root"), ignore_errors=True)
    os.replace(root, os.path.join(out, "root"))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    size = os.path.getsize(os.path.join(out, "initramfs.cpio.gz"))
    log(f"wrote {out}/vmlinuz and {out}/initramfs.cpio.gz ({size >> 20} MiB)")
    return manifest


def input_hash(pkgs):
    h = hashlib.sha256()
    for f in SCRIPT_INPUTS:
        h.update(f.encode() + b"\0" + open(os.path.join(HERE, f), "rb").read() + b"\0")
    for p, v in sorted(candidates(sorted(pkgs)).items()):
        h.update(f"{p}={v}\n".encode())
    return h.hexdigest()


def write_initramfs(root, out):
    """OUT/initramfs.cpio.gz from the tree ROOT (sorted, owned by root)."""
    tmp = os.path.join(out, "initramfs.cpio.gz.new")
    files = run(["find", ".", "-mindepth", "1"], cwd=root).stdout.split("\n")
    files = sorted(f for f in files if f)
    with open(tmp, "wb") as o:
        cp = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
                              cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        gz = subprocess.Popen(["gzip", "-1", "-n"], stdin=cp.stdout, stdout=o)
        cp.stdout.close()
        cp.stdin.write(("\n".join(files) + "\n").encode())
        cp.stdin.close()
        if cp.wait() != 0 or gz.wait() != 0:
            die("cpio | gzip failed")
    os.replace(tmp, os.path.join(out, "initramfs.cpio.gz"))

def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "build/guest"
    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    kdeps = parse_depends(show_field("linux-image-amd64", "Depends"))
    kernel_pkg = next((g[0] for g in kdeps if g[0].startswith("linux-image-")), None)
    if not kernel_pkg:
        die("cannot find the kernel package of linux-image-amd64: apt-get update?")
    pkgs = set(TOP) | {kernel_pkg}
    stamp = os.path.join(out, "stamp")
    mpath = os.path.join(out, "manifest.json")
    outputs = [os.path.join(out, f) for f in ["vmlinuz", "initramfs.cpio.gz", "fw/linuxboot_dma.bin"]]
    if os.environ.get("FORCE") != "1" and os.path.exists(mpath) and os.path.exists(stamp) \
            and all(map(os.path.exists, outputs)):
        prev = set(json.load(open(mpath))["packages"])
        if open(stamp).read().strip() == input_hash(pkgs | prev):
            log(f"{out} is up to date")
            return
    log(f"building the guest in {out} (kernel package {kernel_pkg})")
    debs = Debs(out)
    manifest = build(out, debs, kernel_pkg)
    with open(stamp, "w") as f:
        f.write(input_hash(pkgs | set(manifest["packages"])) + "\n")


if __name__ == "__main__":
    main()
