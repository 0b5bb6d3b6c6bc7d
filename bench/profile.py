"""Where does the time go?  perf profile of QEMU during one fio cell.

    PYTHONPATH=.:build/qemu/python python3 bench/profile.py \
        --configs nvme-iothread,virtio-blk-iothread --qd 1

Boots each configuration of nvdp/configs.py, runs one fio randread cell
(4k, libaio, direct) and records `perf record -g` of the QEMU process for
the middle of it; prints, per configuration, the IOPS of the cell and the
top symbols by host thread class (vCPU / main loop / IOThread), with the
report kept in build/profile/<config>.perf.txt.
"""
import argparse
import os
import subprocess

from nvdp import ROOT, bench, configs, fio, vm


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
    bench.ensure_image(image)
    for name in a.configs.split(","):
        cfg = configs.BY_NAME[name]
        cell = {"rw": "randread", "qd": a.qd, "numjobs": 1, "name": f"randread-qd{a.qd}"}
        data = os.path.join(out, f"{name}.perf.data")
        rec = {}

        def on_sync(tag, machine):
            if tag.startswith("begin"):
                rec["p"] = subprocess.Popen(
                    ["perf", "record", "-q", "-g", "-F", "499", "-p", str(machine.get_pid()),
                     "-o", data, "--", "sleep", str(max(2, a.runtime - 4))],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        qemu = os.path.join(ROOT, configs.QEMU_BINARIES[cfg.qemu])
        r = vm.Guest(qemu, bench.job_script(cfg, [cell], a.runtime), out, name,
                     cfg.qemu_args("native", image), timeout=240).run(on_sync)
        if "p" in rec:
            rec["p"].wait()
        f = fio.parse(r.sections.get(cell["name"]) or "")
        rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio",
                              "--sort", "comm,dso,sym", "-g", "none", "--percent-limit", "0.5"],
                             capture_output=True, text=True).stdout
        with open(os.path.join(out, f"{name}.perf.txt"), "w") as fp:
            fp.write(rep)
        print(f"== {name} QD {a.qd}: {r.describe()}")
        if f and f["ios"]:
            print(f"   fio: {f}")
        for ln in [ln for ln in rep.splitlines() if ln.strip() and not ln.startswith("#")][:a.top]:
            print("  " + ln.rstrip())


if __name__ == "__main__":
    main()
