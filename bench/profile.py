#!/usr/bin/python3
"""Where does the time go?  perf profile of QEMU during one fio cell.

    bench/profile.py --configs nvme-iothread,virtio-blk-iothread --qd 1

Boots each configuration of bench/configs.py, runs one fio randread cell
(4k, libaio, direct) and records `perf record -g` of the QEMU process for
the middle of it; prints, per configuration, the IOPS of the cell and the
top symbols by host thread class (vCPU / main loop / IOThread), with the
report kept in build/profile/<config>.perf.txt.
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "guest"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import vm          # noqa: E402
import configs     # noqa: E402
import run         # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", required=True)
    ap.add_argument("--qd", type=int, default=1)
    ap.add_argument("--runtime", type=int, default=12)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    out = os.path.join(ROOT, "build", "profile")
    os.makedirs(out, exist_ok=True)
    image = os.path.join(out, "disk.img")
    run.ensure_image(image)
    for name in a.configs.split(","):
        cfg = configs.BY_NAME[name]
        cell = {"rw": "randread", "qd": a.qd, "numjobs": 1, "name": f"randread-qd{a.qd}"}
        data = os.path.join(out, f"{name}.perf.data")
        rec = {}

        def on_sync(tag, pid):
            if tag.startswith("begin"):
                rec["p"] = subprocess.Popen(
                    ["perf", "record", "-q", "-g", "-F", "499", "-p", str(pid), "-o", data,
                     "--", "sleep", str(max(2, a.runtime - 4))],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        qemu = os.path.join(ROOT, configs.QEMU_BINARIES[cfg.qemu])
        g = vm.Guest(qemu, run.job_script(cfg, [cell], a.runtime), out, name,
                     cfg.qemu_args("native", image), timeout=240)
        r = g.run(on_sync=on_sync)
        if "p" in rec:
            rec["p"].wait()
        fio = run.fio_summary(r.sections.get(cell["name"]) or "")
        rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio",
                              "--sort", "comm,dso,sym", "-g", "none", "--percent-limit", "0.5"],
                             capture_output=True, text=True).stdout
        with open(os.path.join(out, f"{name}.perf.txt"), "w") as f:
            f.write(rep)
        print(f"== {name} QD {a.qd}: {r.describe()}")
        if fio:
            print(f"   fio: {fio}")
        lines = [ln for ln in rep.splitlines() if ln.strip() and not ln.startswith("#")]
        for ln in lines[:a.top]:
            print("  " + ln.rstrip())


if __name__ == "__main__":
    main()
