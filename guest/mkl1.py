#!/usr/bin/python3
"""Build the L1 guest of `make check-kvm`: a Debian kernel that is a KVM host.

    guest/mkl1.py [OUTDIR]          (default build/kvm-l1)

Outputs:
  OUTDIR/vmlinuz            linux-image-amd64's kernel (the guest's kernel)
  OUTDIR/initramfs.cpio.gz  busybox, the /init of guest/init-l1, and the
                            modules it loads: virtio_pci, 9p over virtio,
                            ccp, kvm, kvm_amd, kvm_intel (with dependencies)
  OUTDIR/manifest.json      package versions, modules

Like guest/mkimage.sh (whose functions it uses: apt-get download,
dpkg-deb -x, module dependencies from .modinfo), nothing is installed on
the host; debs and extracted packages already in build/guest are reused.
Cached: OUTDIR/stamp holds a hash of the package versions and of this
file, guest/init-l1 and guest/mkimage.py; FORCE=1 rebuilds.
"""
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("mkimage", os.path.join(HERE, "mkimage.py"))
mk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mk)

TOP = ["linux-image-amd64", "busybox-static"]
# loaded by /init in this order (each after its dependencies); init skips
# the kvm_amd/kvm_intel that does not match the CPU
MODULES = ["virtio_pci", "9pnet_virtio", "9p", "ccp", "kvm_amd", "kvm_intel"]
SCRIPT_INPUTS = ["mkl1.py", "init-l1", "mkimage.py"]
GUEST_OUT = os.path.join(os.path.dirname(HERE), "build", "guest")


def log(msg):
    print(f"mkl1: {msg}", flush=True)


class Debs(mk.Debs):
    """mkimage's Debs, also looking into build/guest's debs and extracts."""

    def deb_path(self, pkg, ver):
        p = super().deb_path(pkg, ver)
        if p:
            return p
        q = ver.replace(":", "%3a")
        hits = glob.glob(os.path.join(GUEST_OUT, "debs", f"{pkg}_{q}_*.deb"))
        return hits[0] if hits else None

    def extract(self, pkg):
        ver = mk.candidate(pkg)
        d = os.path.join(GUEST_OUT, "extract", f"{pkg}_{(ver or '').replace(':', '%3a')}")
        if ver and os.path.exists(d + ".done") and pkg not in self.extracted:
            self.extracted[pkg] = (ver, d)
        return super().extract(pkg)


def kernel_package():
    kdeps = mk.parse_depends(mk.show_field("linux-image-amd64", "Depends"))
    pkg = next((g[0] for g in kdeps if g[0].startswith("linux-image-")), None)
    if not pkg:
        mk.die("cannot find the kernel package of linux-image-amd64: apt-get update?")
    return pkg


def module_order(kmod, names):
    """[(name, path relative to kmod)] for NAMES and their dependencies,
    dependencies first; built-in modules left out."""
    builtin = {mk.modname(m) for m in open(os.path.join(kmod, "modules.builtin")).read().split()}
    ko = {}
    for dirpath, _, files in os.walk(os.path.join(kmod, "kernel")):
        for f in files:
            if ".ko" in f:
                ko[mk.modname(f)] = os.path.relpath(os.path.join(dirpath, f), kmod)
    seq = []

    def visit(name, stack=()):
        if name in builtin or name in seq:
            return
        if name not in ko:
            mk.die(f"kernel module {name} is neither built in nor a module")
        if name in stack:
            mk.die(f"module dependency cycle at {name}")
        for key, val in mk.modinfo(os.path.join(kmod, ko[name])):
            if key == "depends":
                for d in filter(None, val.split(",")):
                    visit(mk.modname(d), stack + (name,))
        seq.append(name)

    for n in names:
        visit(n)
    return [(n, ko[n]) for n in seq]


def build(out, debs, kernel_pkg):
    root = os.path.join(out, "root.new")
    shutil.rmtree(root, ignore_errors=True)
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc/l1", "proc", "sys", "dev", "tmp", "host"]:
        os.makedirs(os.path.join(root, d))
    manifest = {"packages": {}, "modules": []}
    bb = debs.extract("busybox-static")
    shutil.copy2(os.path.join(bb, "bin/busybox"), os.path.join(root, "bin/busybox"))
    for a in mk.run([os.path.join(root, "bin/busybox"), "--list-full"]).stdout.split():
        p = os.path.join(root, a)
        if a in ("bin/busybox", "linuxrc") or os.path.lexists(p):
            continue
        os.makedirs(os.path.dirname(p), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(root, "bin/busybox"), os.path.dirname(p)), p)
    k = debs.extract(kernel_pkg)
    kvers = os.listdir(os.path.join(k, "lib/modules"))
    if len(kvers) != 1:
        mk.die(f"expected one kernel version in {kernel_pkg}, got {kvers}")
    kver = kvers[0]
    kmod = os.path.join(k, "lib/modules", kver)
    with open(os.path.join(root, "etc/l1/modules"), "w") as f:
        for name, rel in module_order(kmod, MODULES):
            dst = os.path.join(root, "lib/modules", kver, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(kmod, rel), dst)
            f.write(f"{name} /lib/modules/{kver}/{rel}\n")
            manifest["modules"].append(name)
    shutil.copy2(os.path.join(HERE, "init-l1"), os.path.join(root, "init"))
    os.chmod(os.path.join(root, "init"), 0o755)
    for pkg in ["busybox-static", kernel_pkg]:
        manifest["packages"][pkg] = debs.extracted[pkg][0]
    manifest["kernel_version"] = kver
    mk.write_initramfs(root, out)
    shutil.copy2(os.path.join(k, "boot", f"vmlinuz-{kver}"), os.path.join(out, "vmlinuz"))
    shutil.rmtree(os.path.join(out, "root"), ignore_errors=True)
    os.replace(root, os.path.join(out, "root"))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    log(f"kernel {kver}; modules {' '.join(manifest['modules'])}; wrote {out}/vmlinuz and "
        f"{out}/initramfs.cpio.gz ({os.path.getsize(os.path.join(out, 'initramfs.cpio.gz')) >> 10} KiB)")


def input_hash(pkgs):
    h = hashlib.sha256()
    for f in SCRIPT_INPUTS:
        h.update(f.encode() + b"\0" + open(os.path.join(HERE, f), "rb").read() + b"\0")
    for p, v in sorted(mk.candidates(sorted(pkgs)).items()):
        h.update(f"{p}={v}\n".encode())
    return h.hexdigest()


def main():
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "build/kvm-l1")
    os.makedirs(out, exist_ok=True)
    kernel_pkg = kernel_package()
    pkgs = set(TOP) | {kernel_pkg}
    stamp = os.path.join(out, "stamp")
    outputs = [os.path.join(out, f) for f in ["vmlinuz", "initramfs.cpio.gz", "manifest.json"]]
    if os.environ.get("FORCE") != "1" and os.path.exists(stamp) and all(map(os.path.exists, outputs)) \
            and open(stamp).read().strip() == input_hash(pkgs):
        log(f"{out} is up to date")
        return
    log(f"building the L1 guest in {out} (kernel package {kernel_pkg})")
    build(out, Debs(out), kernel_pkg)
    with open(stamp, "w") as f:
        f.write(input_hash(pkgs) + "\n")


if __name__ == "__main__":
    main()
