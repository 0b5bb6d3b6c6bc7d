"""nvme-dataplane benchmark runner (`make bench`, `python3 -m nvdp.bench`).

For every (pass, configuration, backend) it boots the guest once and runs all
fio cells of the matrix in it.  Configurations are interleaved within each
pass (the order rotates from pass to pass), so slow drift of the host hits
all configurations alike; ratios against the baseline are taken per pass
(same pass, same backend, same cell) and then summarized as median (min-max).

Per cell:
  IOPS, mean/p50/p99 completion latency (fio, in the guest);
  host CPU seconds per I/O by QEMU thread class, from
    /proc/<qemu pid>/task/*/stat (utime+stime) sampled when the guest says
    "begin"/"end" around fio (the guest waits for the host's ACK, so the
    window is exactly fio's process lifetime, including its ~0.1-0.3 s of
    start-up and tear-down);
  guest interrupts per I/O: /proc/interrupts before/after, the device's
    lines only (configs.py irq_pattern);
  doorbell writes per I/O: a separate counting pass (one per config and
    backend) with QEMU trace events (configs.py doorbell_events) logged to a
    file.  The eventfd path of ioeventfd=on bypasses the MMIO handler and
    its trace point, so the counting pass sets count_props (ioeventfd=off)
    where the device allows it; its IOPS are reported next to the measured
    ones as the perturbation of that pass.

Output: build/bench/<stamp>/meta.json and raw/*.json (everything per boot),
build/bench/results.md, results.json and chart.png (latest run; also in
the stamp directory); see nvdp/report.py.
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

from . import ROOT, configs, fio, report, vm

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"bench: {msg}", flush=True)


def classify(comm):
    if re.match(r"CPU \d+/(TCG|KVM)", comm):
        return "vcpu"
    if comm.startswith("IO "):
        return "iothread"
    return "main" if comm.startswith("qemu-system") else "other"


def sample_threads(pid):
    """{tid: [comm, cpu seconds, write syscalls]} for all threads of PID."""
    out = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base) if os.path.isdir(base) else []:
        try:
            stat = open(f"{base}/{tid}/stat").read()
            comm = open(f"{base}/{tid}/comm").read().strip()
            m = re.search(r"^syscw: (\d+)", open(f"{base}/{tid}/io").read(), re.M)
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # fields[0] is field 3 (state): utime = field 14, stime = field 15
        out[tid] = [comm, (int(fields[11]) + int(fields[12])) / CLK_TCK, int(m.group(1)) if m else 0]
    return out


def cpu_delta(before, after):
    """CPU seconds by thread class and by thread name, and the vCPU threads'
    write syscalls, between two samples (new threads count from zero, exited
    ones are lost: QEMU's long-lived threads do not exit)."""
    d = {c: 0.0 for c in report.THREAD_CLASSES}
    names = {}
    vcpu_writes = 0
    for tid, (comm, cpu, syscw) in after.items():
        prev = before.get(tid, [comm, 0.0, 0])
        d[classify(comm)] += max(0.0, cpu - prev[1])
        names[comm] = names.get(comm, 0.0) + max(0.0, cpu - prev[1])
        if classify(comm) == "vcpu":
            vcpu_writes += max(0, syscw - prev[2])
    return d, names, vcpu_writes


def irq_counts(text, pattern):
    """Sum of all CPUs' counts of /proc/interrupts lines whose name matches."""
    if not pattern or not text:
        return 0
    lines = text.splitlines()
    ncpu = len(lines[0].split()) if lines else 0
    total = 0
    for parts in (line.split() for line in lines[1:]):
        if len(parts) >= ncpu + 2 and parts[0].endswith(":") and \
                re.search(pattern, " ".join(parts[ncpu + 1:])):
            total += sum(int(x) for x in parts[1:ncpu + 1] if x.isdigit())
    return total


class TraceCounter:
    """Counts of trace EVENTS in FILE so far (read incrementally): one line
    per write, or "count N" writes at once."""

    def __init__(self, path, events):
        self.path, self.off, self.rest = path, 0, b""
        self.counts = {e: 0 for e in events}

    def read(self):
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                f.seek(self.off)
                *lines, self.rest = (self.rest + f.read()).split(b"\n")
                self.off = f.tell()
            for line in lines:
                e = next((e for e in self.counts if e.encode() in line), None)
                if e:
                    m = re.search(rb" count (\d+)", line)
                    self.counts[e] += int(m.group(1)) if m else 1
        return dict(self.counts)


def job_script(cfg, cells, runtime):
    dev = cfg.guest_dev
    blk = os.path.basename(dev)
    s = fio.wait_dev(dev)
    if cfg.kind == "null_blk":
        s.insert(1, f"nvdp_modprobe null_blk {cfg.modparams} || exit 3")
    s += [f"nvdp_section devinfo sh -c 'cat /sys/block/{blk}/size; "
          f"ls /sys/block/{blk}/mq; cat /proc/interrupts'", "rc=0"]
    for c in cells:
        args = fio.cmdline(c["name"], dev, c["rw"], c["qd"], numjobs=c["numjobs"],
                           group_reporting=True, time_based=True, runtime=runtime,
                           randrepeat=0, norandommap=True, size="900M",
                           rwmixread=70 if c["rw"] == "randrw" else None)
        s.append(f"nvdp_fio {c['name']} {args} || rc=1")
    return "\n".join(s + ["exit $rc"]) + "\n"


def run_boot(cfg, backend, meta, outdir, tag, image, p=None, runtime=None):
    """Boot once, run all cells (a counting pass if P is None).  Returns the
    raw record (also written to OUTDIR/raw/TAG.json)."""
    counting = p is None
    runtime = runtime or meta["runtime"]
    qemu = os.path.join(ROOT, configs.QEMU_BINARIES[cfg.qemu])
    cells = report.cells(meta["matrix"])
    args = cfg.qemu_args(backend, image, counting=counting)
    trace = None
    if counting:
        trace = TraceCounter(os.path.join(outdir, f"{tag}.trace"), cfg.doorbell_events)
        if os.path.exists(trace.path):
            os.unlink(trace.path)
        args += [a for ev in cfg.doorbell_events for a in ("-trace", f"enable={ev},file={trace.path}")]
    samples = {}

    def on_sync(tag_, machine):
        samples[tag_] = {"t": time.monotonic(), "threads": sample_threads(machine.get_pid()),
                         "trace": trace and trace.read()}

    r = vm.Guest(qemu, job_script(cfg, cells, runtime), os.path.join(outdir, "boots"), tag,
                 args, smp=meta["smp"], timeout=90 + len(cells) * (runtime + 2) * 4).run(on_sync)
    rec = {"config": cfg.name, "backend": backend, "counting": counting, "pass": p,
           "accel": r.accel, "qemu": qemu, "cmdline": r.cmdline, "ok": r.ok,
           "describe": r.describe(), "elapsed": r.elapsed, "cells": {},
           "devinfo": r.sections.get("devinfo", "")}
    for c in cells:
        n = c["name"]
        fs = fio.parse(r.sections.get(n, "")) if r.rcs.get(n) == 0 else None
        cell = rec["cells"][n] = dict(c, fio=fs if fs and fs["ios"] else None,
                                      fio_json=r.sections.get(n))
        b, e = samples.get(f"begin {n}"), samples.get(f"end {n}")
        if not (cell["fio"] and b and e):
            cell["error"] = f"no result for {n} (rc {r.rcs.get(n)}; {r.describe()})"
            continue
        ios = fs["ios"]
        d, names, vw = cpu_delta(b["threads"], e["threads"])
        irqs = (irq_counts(r.sections.get(n + ".irq1"), cfg.irq_pattern)
                - irq_counts(r.sections.get(n + ".irq0"), cfg.irq_pattern))
        cell.update(vcpu_writes_per_io=vw / ios, wall_s=e["t"] - b["t"], cpu_s=d,
                    cpu_by_thread=names, irqs=irqs,
                    irqs_per_io=irqs / ios if cfg.irq_pattern else None,
                    cpu_us_per_io=dict({k: v / ios * 1e6 for k, v in d.items()},
                                       total=sum(d.values()) / ios * 1e6))
        if counting and b["trace"] is not None and e["trace"] is not None:
            cell["doorbells"] = {k: e["trace"][k] - b["trace"][k] for k in e["trace"]}
            cell["doorbells_per_io"] = sum(cell["doorbells"].values()) / ios
    os.makedirs(os.path.join(outdir, "raw"), exist_ok=True)
    with open(os.path.join(outdir, "raw", tag + ".json"), "w") as f:
        json.dump(rec, f, indent=1)
    if trace and os.path.exists(trace.path):
        os.unlink(trace.path)        # can be large; the counts are in the json
    return rec


def ensure_image(path, size_mb=1024):
    """A preallocated raw image on a real filesystem (not tmpfs)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fstype = subprocess.run(["stat", "-f", "-c", "%T", os.path.dirname(path)],
                            capture_output=True, text=True).stdout.strip()
    if fstype in ("tmpfs", "ramfs"):
        sys.exit(f"bench: {os.path.dirname(path)} is on {fstype}; the image must be on a "
                 "real filesystem")
    if not os.path.exists(path) or os.path.getsize(path) != size_mb << 20:
        log(f"writing {size_mb} MiB image {path} ({fstype})")
        with open(path + ".tmp", "wb") as f:
            blk = os.urandom(1 << 20)
            for _ in range(size_mb):
                f.write(blk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    return fstype


def select(names, full):
    """(configurations to run, [(name, why skipped)])."""
    if names:
        unknown = [n for n in names.split(",") if n not in configs.BY_NAME]
        if unknown:
            sys.exit(f"bench: unknown configuration(s) {', '.join(unknown)}; known: "
                     f"{', '.join(configs.BY_NAME)}")
        wanted = [configs.BY_NAME[n] for n in names.split(",")]
    else:
        wanted = [c for c in configs.CONFIGS if full or c.quick]
    cfgs, skipped, helps = [], [], {}
    for c in wanted:
        q = os.path.join(ROOT, configs.QEMU_BINARIES[c.qemu])
        if not os.access(q, os.X_OK):
            skipped.append((c.name, f"{configs.QEMU_BINARIES[c.qemu]} not built"
                            + (" (make stock)" if c.qemu == "stock" else "")))
            continue
        if c.driver and (q, c.driver) not in helps:
            helps[q, c.driver] = vm.device_help(q, c.driver)
        miss = c.missing_props(helps.get((q, c.driver)))
        if miss:
            skipped.append((c.name, f"{c.driver} of this binary has no property "
                            f"{', '.join(miss)}"))
            continue
        cfgs.append(c)
    return cfgs, skipped


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="the whole matrix")
    ap.add_argument("--configs", help="comma-separated configuration names")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--runtime", type=int, help="seconds per cell")
    ap.add_argument("--rw", help="e.g. randread,randwrite,randrw")
    ap.add_argument("--qd", help="e.g. 1,4,16,64")
    ap.add_argument("--numjobs", help="e.g. 1,2")
    ap.add_argument("--backends", help="native,io_uring,null")
    ap.add_argument("--no-count", action="store_true", help="skip the doorbell counting pass")
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "bench"))
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--replot", "--from-raw", metavar="DIR",
                    help="(re)write DIR/results.md, results.json and chart.png of a finished "
                    "or interrupted run from DIR/meta.json and DIR/raw/*.json")
    a = ap.parse_args()
    if a.replot:
        rows, png = report.summarize_dir(a.replot)
        return log(f"wrote {a.replot}/results.md" + (f" and {png}" if png else ""))

    full = a.full
    mx = {"rw": (a.rw or ("randread,randwrite,randrw" if full else "randread,randwrite")).split(","),
          "qd": [int(x) for x in (a.qd or ("1,4,16,64" if full else "1,16,64")).split(",")],
          "numjobs": [int(x) for x in (a.numjobs or (f"1,{a.smp}" if full else "1")).split(",")],
          "backends": (a.backends or ("native,io_uring,null" if full else "native")).split(",")}
    runtime = a.runtime or (10 if full else 3)
    for b in mx["backends"]:
        if b not in configs.BACKENDS:
            sys.exit(f"bench: unknown backend {b}; known: {', '.join(configs.BACKENDS)}")
    cfgs, skipped = select(a.configs, full)
    for n, why in skipped:
        log(f"SKIP {n}: {why}")
    if not cfgs:
        sys.exit("bench: no configuration to run")
    baseline = next((c.name for c in cfgs if c.baseline), None)
    if not baseline:
        log("no baseline configuration (stock-nvme) in this run: no ratios")

    outdir = os.path.join(a.out, time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(outdir, exist_ok=True)
    image = os.path.join(a.out, "disk.img")
    fstype = ensure_image(image) if any(b != "null" for b in mx["backends"]) else "-"
    accel = vm.detect_accel(os.path.join(ROOT, configs.QEMU_BINARIES[cfgs[0].qemu]))
    log(f"accelerator: {accel}; image {image} on {fstype}; output {outdir}")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "accel": accel, "smp": a.smp,
            "passes": a.passes, "runtime": runtime, "outdir": os.path.relpath(outdir, ROOT),
            "host": f"{platform.node()} {os.cpu_count()} CPUs {platform.release()}",
            "configs": [c.name for c in cfgs], "skipped": skipped, "baseline": baseline,
            "matrix": mx}
    with open(os.path.join(outdir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)

    ncells = len(report.cells(mx))
    boots = [(p, c, b) for p in range(a.passes)      # rotate the order per pass
             for c in cfgs[p % len(cfgs):] + cfgs[:p % len(cfgs)] for b in mx["backends"]]
    todo_count = [] if a.no_count else [(c, b) for c in cfgs for b in mx["backends"]
                                        if c.doorbell_events]
    count_runtime = max(2, runtime // 2)
    est_boot = 15.0 + ncells * (runtime + 1.5)
    est_count = 15.0 + ncells * (count_runtime + 1.5)
    log(f"{len(cfgs)} configs x {len(mx['backends'])} backends x {a.passes} passes = "
        f"{len(boots)} boots of {ncells} cells ({runtime} s each) + {len(todo_count)} counting "
        f"boots; estimated {(len(boots) * est_boot + len(todo_count) * est_count) / 60:.0f} min")

    t_start = time.monotonic()
    done_s = 0.0                    # boot times, without waits for the lock
    total = len(boots) + len(todo_count)
    for k, (p, cfg, b) in enumerate(boots + [(None, c, b) for c, b in todo_count], 1):
        left = (total - k + 1) * (done_s / (k - 1) if k > 1 else est_boot) / 60
        if p is not None:
            log(f"[{k}/{total}] pass {p + 1}/{a.passes} {cfg.name} ({b}): {ncells} cells; "
                f"~{left:.1f} min left")
            rec = run_boot(cfg, b, meta, outdir, f"p{p + 1}-{cfg.name}-{b}", image, p)
            bad = [n for n, c in rec["cells"].items() if not c.get("fio")]
            ios = ", ".join(f"{c['qd']}:{c['fio']['iops']:.0f}" for c in
                            rec["cells"].values() if c.get("fio"))
            log(f"    {'ok' if rec['ok'] and not bad else 'FAILED ' + rec['describe']} "
                f"{rec['elapsed']:.0f}s; IOPS by QD {ios}" +
                (f"; missing {', '.join(bad)}" if bad else ""))
        else:
            log(f"[{k}/{total}] counting pass {cfg.name} ({b}): trace "
                f"{','.join(cfg.doorbell_events)}; ~{left:.1f} min left")
            rec = run_boot(cfg, b, meta, outdir, f"count-{cfg.name}-{b}", image,
                           runtime=count_runtime)
            dbs = ", ".join(f"{c['qd']}:{c.get('doorbells_per_io', float('nan')):.2f}"
                            for c in rec["cells"].values() if c.get("fio"))
            log(f"    {'ok' if rec['ok'] else 'FAILED ' + rec['describe']} doorbells/IO by QD {dbs}")
        done_s += rec["elapsed"]

    meta["wall_s"] = time.monotonic() - t_start
    with open(os.path.join(outdir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    rows, png = report.summarize_dir(outdir)
    for fn in ("results.md", "results.json", "chart.png"):
        if os.path.exists(os.path.join(outdir, fn)):
            shutil.copy(os.path.join(outdir, fn), os.path.join(a.out, fn))
    failed = sum(1 for r in rows if not r["iops"])
    log(f"done in {meta['wall_s'] / 60:.1f} min: {a.out}/results.md"
        + (f", {a.out}/chart.png" if png else "") +
        (f"; {failed} cells without any result" if failed else ""))
    sys.exit(1 if failed == len(rows) else 0)


if __name__ == "__main__":
    main()
