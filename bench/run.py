#!/usr/bin/python3
"""nvme-dataplane benchmark runner (`make bench`).  python3 stdlib only.

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
  doorbell MMIO writes per I/O: a separate counting pass (one per config
    and backend) with QEMU trace events (configs.py doorbell_events) logged
    to a file.  The eventfd path of ioeventfd=on bypasses the MMIO handler
    and its trace point, so the counting pass sets count_props
    (ioeventfd=off); its IOPS are reported next to the measured ones as the
    perturbation of that pass.

Output: build/bench/<stamp>/raw/*.json (everything per boot),
build/bench/results.md, results.json and chart.png (latest run; also in
the stamp directory).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "guest"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import vm          # noqa: E402
import configs     # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
THREAD_CLASSES = ["vcpu", "main", "iothread", "other"]


def log(msg):
    print(f"bench: {msg}", flush=True)


def classify(comm):
    if re.match(r"CPU \d+/(TCG|KVM)", comm):
        return "vcpu"
    if comm.startswith("IO "):
        return "iothread"
    if comm.startswith("qemu-system"):
        return "main"
    return "other"


def sample_threads(pid):
    """{tid: [comm, cpu seconds]} for all threads of PID."""
    out = {}
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        return out
    for tid in tids:
        try:
            stat = open(f"{base}/{tid}/stat").read()
            comm = open(f"{base}/{tid}/comm").read().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # fields[0] is field 3 (state): utime = field 14, stime = field 15
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        syscw = 0
        try:
            m = re.search(r"^syscw: (\d+)", open(f"{base}/{tid}/io").read(), re.M)
            syscw = int(m.group(1)) if m else 0
        except OSError:
            pass
        out[tid] = [comm, cpu, syscw]
    return out


def cpu_delta(before, after):
    """CPU seconds by thread class between two samples (new threads count
    from zero, exited ones are lost: QEMU's long-lived threads do not exit)."""
    d = {c: 0.0 for c in THREAD_CLASSES}
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
    total = 0
    rx = re.compile(pattern)
    lines = text.splitlines()
    ncpu = len(lines[0].split()) if lines else 0
    for line in lines[1:]:
        parts = line.split()
        if len(parts) < ncpu + 2 or not parts[0].endswith(":"):
            continue
        name = " ".join(parts[ncpu + 1:])
        if rx.search(name):
            total += sum(int(x) for x in parts[1:ncpu + 1] if x.isdigit())
    return total


def fio_summary(text):
    """IOPS, latency (us) and I/O count from fio's json; None if unusable."""
    try:
        j = json.loads(text[text.index("{"):])
    except (ValueError, KeyError):
        return None
    jobs = j.get("jobs") or []
    if not jobs:
        return None
    iops = ios = 0
    mean_w = 0.0
    p50 = p99 = 0.0
    err = 0
    for job in jobs:
        err |= job.get("error", 0)
        for d in ("read", "write"):
            s = job.get(d, {})
            n = s.get("total_ios", 0)
            if not n:
                continue
            iops += s.get("iops", 0.0)
            ios += n
            c = s.get("clat_ns", {})
            mean_w += c.get("mean", 0.0) * n
            pct = c.get("percentile", {})
            p50 = max(p50, pct.get("50.000000", 0) / 1000.0)
            p99 = max(p99, pct.get("99.000000", 0) / 1000.0)
    if not ios:
        return None
    return {"iops": iops, "ios": ios, "lat_mean_us": mean_w / ios / 1000.0,
            "lat_p50_us": p50, "lat_p99_us": p99, "error": err}


class Matrix:
    def __init__(self, rws, qds, numjobs, runtime, smp):
        self.rws, self.qds, self.numjobs, self.runtime = rws, qds, numjobs, runtime
        self.smp = smp

    def cells(self):
        for rw in self.rws:
            for nj in self.numjobs:
                for qd in self.qds:
                    yield {"rw": rw, "qd": qd, "numjobs": nj,
                           "name": f"{rw}-qd{qd}-j{nj}"}


def job_script(cfg, cells, runtime):
    dev = cfg.guest_dev
    s = ["set -u"]
    if cfg.kind == "null_blk":
        s.append(f"nvdp_modprobe null_blk {cfg.modparams} || exit 3")
    s.append(f"nvdp_wait_dev {dev} 60 || {{ nvdp_log 'no {dev}'; exit 3; }}")
    s.append(f"nvdp_section devinfo sh -c 'cat /sys/block/{os.path.basename(dev)}/size; "
             f"ls /sys/block/{os.path.basename(dev)}/mq; cat /proc/interrupts'")
    s.append("rc=0")
    for c in cells:
        rw = c["rw"]
        args = [f"--name={c['name']}", f"--filename={dev}", "--direct=1",
                "--ioengine=libaio", f"--rw={rw}", "--bs=4k", f"--iodepth={c['qd']}",
                f"--numjobs={c['numjobs']}", "--group_reporting", "--time_based",
                f"--runtime={runtime}", "--randrepeat=0", "--norandommap",
                "--size=900M"]
        if rw == "randrw":
            args.append("--rwmixread=70")
        s.append(f"nvdp_fio {c['name']} {' '.join(args)} || rc=1")
    s.append("exit $rc")
    return "\n".join(s) + "\n"


def run_boot(cfg, backend, matrix, outdir, tag, image, counting=False, runtime=None):
    """Boot once, run all cells.  Returns the raw record (also written)."""
    qemu = os.path.join(ROOT, configs.QEMU_BINARIES[cfg.qemu])
    cells = list(matrix.cells())
    args = cfg.qemu_args(backend, image, counting=counting)
    tracefile = None
    if counting:
        tracefile = os.path.join(outdir, f"{tag}.trace")
        if os.path.exists(tracefile):
            os.unlink(tracefile)
        for ev in cfg.doorbell_events:
            args += ["-trace", f"enable={ev},file={tracefile}"]
    samples = {}
    tracecounts = {}
    state = {"off": 0, "counts": {e: 0 for e in cfg.doorbell_events}, "rest": b""}

    def read_trace():
        if not tracefile or not os.path.exists(tracefile):
            return dict(state["counts"])
        with open(tracefile, "rb") as f:
            f.seek(state["off"])
            data = state["rest"] + f.read()
            state["off"] = f.tell()
        lines = data.split(b"\n")
        state["rest"] = lines.pop()
        for line in lines:
            for e in cfg.doorbell_events:
                if e.encode() in line:
                    # one line per write, or "count N" writes at once
                    m = re.search(rb" count (\d+)", line)
                    state["counts"][e] += int(m.group(1)) if m else 1
                    break
        return dict(state["counts"])

    def on_sync(tag_, pid):
        samples[tag_] = {"t": time.monotonic(), "threads": sample_threads(pid)}
        if counting:
            tracecounts[tag_] = read_trace()

    g = vm.Guest(qemu, job_script(cfg, cells, runtime or matrix.runtime),
                 os.path.join(outdir, "boots"), tag, args, smp=matrix.smp,
                 timeout=90 + len(cells) * ((runtime or matrix.runtime) + 2) * 4)
    r = g.run(on_sync=on_sync)
    rec = {"config": cfg.name, "backend": backend, "counting": counting,
           "accel": r.accel, "qemu": qemu, "cmdline": r.cmdline, "ok": r.ok,
           "describe": r.describe(), "elapsed": r.elapsed, "cells": {},
           "devinfo": r.sections.get("devinfo", "")}
    for c in cells:
        n = c["name"]
        cell = dict(c)
        fs = fio_summary(r.sections.get(n, "")) if r.rcs.get(n) == 0 else None
        cell["fio"] = fs
        cell["fio_json"] = r.sections.get(n)
        b, e = samples.get(f"begin {n}"), samples.get(f"end {n}")
        if fs and b and e:
            d, names, vw = cpu_delta(b["threads"], e["threads"])
            cell["vcpu_writes_per_io"] = vw / fs["ios"]
            cell["wall_s"] = e["t"] - b["t"]
            cell["cpu_s"] = d
            cell["cpu_by_thread"] = names
            cell["cpu_us_per_io"] = {k: v / fs["ios"] * 1e6 for k, v in d.items()}
            cell["cpu_us_per_io"]["total"] = sum(d.values()) / fs["ios"] * 1e6
            i0 = irq_counts(r.sections.get(n + ".irq0"), cfg.irq_pattern)
            i1 = irq_counts(r.sections.get(n + ".irq1"), cfg.irq_pattern)
            cell["irqs"] = i1 - i0
            cell["irqs_per_io"] = (i1 - i0) / fs["ios"] if cfg.irq_pattern else None
            if counting:
                tb, te = tracecounts.get(f"begin {n}"), tracecounts.get(f"end {n}")
                if tb is not None and te is not None:
                    dd = {k: te[k] - tb[k] for k in te}
                    cell["doorbells"] = dd
                    cell["doorbells_per_io"] = sum(dd.values()) / fs["ios"]
        else:
            cell["error"] = f"no result for {n} (rc {r.rcs.get(n)}; {r.describe()})"
        rec["cells"][n] = cell
    os.makedirs(os.path.join(outdir, "raw"), exist_ok=True)
    with open(os.path.join(outdir, "raw", tag + ".json"), "w") as f:
        json.dump(rec, f, indent=1)
    if tracefile and os.path.exists(tracefile):
        os.unlink(tracefile)        # can be large; the counts are in the json
    return rec


def med(xs):
    xs = [x for x in xs if x is not None]
    return (statistics.median(xs), min(xs), max(xs)) if xs else None


def fmt(m, digits=0, pct=False):
    if m is None:
        return "-"
    f = (lambda v: f"{v * 100:.0f}%") if pct else (lambda v: f"{v:,.{digits}f}")
    return f"{f(m[0])} ({f(m[1])}–{f(m[2])})"


def summarize(runs, counts, matrix, cfgs, backends, baseline, passes):
    """Rows for results.md / results.json."""
    rows = []
    for backend in backends:
        for c in matrix.cells():
            for cfg in cfgs:
                per_pass = [runs.get((p, cfg.name, backend)) for p in range(passes)]
                cells = [r["cells"][c["name"]] if r else None for r in per_pass]
                good = [x for x in cells if x and x.get("fio")]
                row = {"backend": backend, "cell": c["name"], "rw": c["rw"], "qd": c["qd"],
                       "numjobs": c["numjobs"], "config": cfg.name, "n": len(good)}
                row["iops"] = med([x["fio"]["iops"] for x in good])
                for k in ("lat_mean_us", "lat_p50_us", "lat_p99_us"):
                    row[k] = med([x["fio"][k] for x in good])
                for k in THREAD_CLASSES + ["total"]:
                    row["cpu_" + k] = med([x["cpu_us_per_io"][k] for x in good])
                row["irqs_per_io"] = med([x.get("irqs_per_io") for x in good])
                row["vcpu_writes_per_io"] = med([x.get("vcpu_writes_per_io") for x in good])
                ratios = []
                if baseline:
                    for p in range(passes):
                        a = runs.get((p, cfg.name, backend))
                        b = runs.get((p, baseline, backend))
                        fa = a and a["cells"][c["name"]].get("fio")
                        fb = b and b["cells"][c["name"]].get("fio")
                        if fa and fb and fb["iops"]:
                            ratios.append(fa["iops"] / fb["iops"])
                row["ratio"] = med(ratios)
                cr = counts.get((cfg.name, backend))
                cc = cr["cells"][c["name"]] if cr else None
                row["doorbells_per_io"] = cc.get("doorbells_per_io") if cc else None
                row["count_pass_iops"] = cc["fio"]["iops"] if cc and cc.get("fio") else None
                rows.append(row)
    return rows


def write_markdown(path, rows, meta, cfgs, skipped, baseline):
    L = []
    L.append("# nvme-dataplane benchmark\n")
    L.append(f"{meta['date']}, accelerator **{meta['accel']}**, guest {meta['smp']} vCPUs, "
             f"{meta['passes']} passes, {meta['runtime']} s per cell, fio 4k libaio direct=1.  "
             f"Host: {meta['host']}.\n")
    if meta["accel"] == "tcg":
        L.append("**Under TCG one cell varies 10–30 % from pass to pass and sometimes 2x.** "
                 "Read the medians with their min–max and compare ratios taken within "
                 "a pass, not absolute numbers across runs.\n")
    L.append("Configurations (bench/configs.py):\n")
    L.append("| name | what |\n|---|---|")
    for c in cfgs:
        L.append(f"| {c.name}{' (baseline)' if c.name == baseline else ''} | {c.desc} |")
    for name, why in skipped:
        L.append(f"| ~~{name}~~ | skipped: {why} |")
    L.append("")
    L.append("Cells are median (min–max) over passes.  *vs base*: IOPS ratio against "
             f"{baseline or 'n/a'} of the same pass and backend, median (min–max) of the "
             "per-pass ratios.  Latency: completion latency in µs (for randrw the larger "
             "of the read and write percentiles).  *CPU µs/IO*: host CPU time of the QEMU "
             "process per I/O, total and split vCPU / main loop / iothread / other "
             "threads.  *irq/IO*: guest interrupts on the device's lines per I/O.  "
             "*db/IO*: doorbell MMIO writes per I/O, from the separate counting pass "
             "(trace events, ioeventfd forced off), whose IOPS are shown as *count IOPS* "
             "to judge how much tracing perturbs the run; '-' where the doorbells take the "
             "eventfd path only (virtio-blk with an iothread requires ioeventfd=on).  "
             "*vCPU wr/IO*: write(2) syscalls of the vCPU threads per I/O (from "
             "/proc/PID/task/TID/io, measured in the normal passes): with ioeventfd=on "
             "these are the eventfd kicks, i.e. the doorbells taking the eventfd path, "
             "plus event-loop wake-ups.\n")
    hdr = ("| backend | rw | QD | jobs | config | IOPS | vs base | mean µs | p50 µs | p99 µs "
           "| CPU µs/IO total | vcpu / main / iothr / other | irq/IO | vCPU wr/IO | db/IO "
           "| count IOPS |")
    L.append(hdr)
    L.append("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        split = " / ".join(f"{r['cpu_' + k][0]:.1f}" if r['cpu_' + k] else "-"
                           for k in THREAD_CLASSES)
        db = "-" if r["doorbells_per_io"] is None else f"{r['doorbells_per_io']:.2f}"
        cnt = "-" if r["count_pass_iops"] is None else f"{r['count_pass_iops']:,.0f}"
        L.append(f"| {r['backend']} | {r['rw']} | {r['qd']} | {r['numjobs']} | {r['config']} "
                 f"| {fmt(r['iops'])} | {fmt(r['ratio'], pct=True)} "
                 f"| {fmt(r['lat_mean_us'], 0)} | {fmt(r['lat_p50_us'], 0)} "
                 f"| {fmt(r['lat_p99_us'], 0)} | {fmt(r['cpu_total'], 1)} | {split} "
                 f"| {fmt(r['irqs_per_io'], 2)} | {fmt(r['vcpu_writes_per_io'], 2)} | {db} | {cnt} |")
    L.append("")
    L.append(f"Raw data: {meta['outdir']}/raw/*.json (fio json, per-thread CPU, "
             "/proc/interrupts, QEMU command lines).  Chart: chart.png.\n")
    with open(path, "w") as f:
        f.write("\n".join(L))


def write_chart(outdir, rows, cfgs, matrix, backend):
    """IOPS and p99 against QD, one series per configuration (gnuplot)."""
    nj = matrix.numjobs[0]
    dat = os.path.join(outdir, "chart-data")
    os.makedirs(dat, exist_ok=True)
    plots_iops, plots_p99 = {}, {}
    for rw in matrix.rws:
        for cfg in cfgs:
            fn = os.path.join(dat, f"{rw}-{cfg.name}.dat")
            with open(fn, "w") as f:
                for r in rows:
                    if (r["backend"], r["rw"], r["numjobs"], r["config"]) == \
                            (backend, rw, nj, cfg.name) and r["iops"]:
                        f.write(f"{r['qd']} {r['iops'][0]} {r['iops'][1]} {r['iops'][2]} "
                                f"{r['lat_p99_us'][0]} {r['lat_p99_us'][1]} "
                                f"{r['lat_p99_us'][2]}\n")
            plots_iops.setdefault(rw, []).append(
                f"'{fn}' using 1:2:3:4 with yerrorlines title '{cfg.name}'")
            plots_p99.setdefault(rw, []).append(
                f"'{fn}' using 1:5:6:7 with yerrorlines title '{cfg.name}'")
    png = os.path.join(outdir, "chart.png")
    n = len(matrix.rws)
    g = [f"set terminal pngcairo size {560 * n},900 font ',9'" if has_pngcairo()
         else f"set terminal png size {560 * n},900",
         f"set output '{png}'",
         f"set multiplot layout 2,{n} title 'nvme-dataplane bench ({backend}, numjobs={nj}; "
         f"median, bars min-max)'",
         "set termoption noenhanced", "set logscale x 2", "set xlabel 'queue depth'",
         "set grid", "set key below font ',8'", "set xtics (" +
         ", ".join(f"'{q}' {q}" for q in matrix.qds) + ")",
         f"set xrange [{min(matrix.qds) * 0.7}:{max(matrix.qds) * 1.4}]"]
    for rw in matrix.rws:
        g += [f"set title '{rw}: IOPS (log scale)'", "set ylabel 'IOPS'", "set logscale y",
              "set yrange [*:*]", "plot " + ", ".join(plots_iops[rw]), "unset logscale y"]
    for rw in matrix.rws:
        g += [f"set title '{rw}: p99 completion latency'", "set ylabel 'p99 (us)'",
              "set logscale y", "set yrange [*:*]", "plot " + ", ".join(plots_p99[rw]),
              "unset logscale y"]
    g.append("unset multiplot")
    script = os.path.join(outdir, "chart.gp")
    with open(script, "w") as f:
        f.write("\n".join(g) + "\n")
    r = subprocess.run(["gnuplot", script], capture_output=True, text=True)
    if r.returncode != 0:
        log(f"gnuplot failed: {r.stderr.strip()[:500]}")
        return None
    return png


def has_pngcairo():
    r = subprocess.run(["gnuplot", "-e", "set terminal"], capture_output=True, text=True)
    return "pngcairo" in (r.stdout + r.stderr)


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


def from_raw(outdir):
    """Rebuild the summary of a run from its raw records (e.g. interrupted)."""
    import glob
    runs, counts, order, backends, cells, accel, runtime = {}, {}, [], [], None, "?", 0
    passes = 0
    for fn in sorted(glob.glob(os.path.join(outdir, "raw", "*.json"))):
        rec = json.load(open(fn))
        tag = os.path.basename(fn)[:-5]
        if rec["config"] not in order:
            order.append(rec["config"])
        if rec["backend"] not in backends:
            backends.append(rec["backend"])
        accel = rec["accel"]
        if rec["counting"]:
            counts[(rec["config"], rec["backend"])] = rec
            continue
        p = int(tag.split("-")[0][1:]) - 1
        passes = max(passes, p + 1)
        runs[(p, rec["config"], rec["backend"])] = rec
        cells = cells or list(rec["cells"].values())
    if not cells:
        sys.exit(f"bench: no raw records in {outdir}/raw")
    rws = list(dict.fromkeys(c["rw"] for c in cells))
    qds = list(dict.fromkeys(c["qd"] for c in cells))
    njs = list(dict.fromkeys(c["numjobs"] for c in cells))
    for c in cells:
        if c.get("wall_s"):
            runtime = round(c["wall_s"])
    matrix = Matrix(rws, qds, njs, runtime, 2)
    cfgs = [c for c in configs.CONFIGS if c.name in order]
    baseline = next((c.name for c in cfgs if c.baseline), None)
    rows = summarize(runs, counts, matrix, cfgs, backends, baseline, passes)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "accel": accel, "smp": 2,
            "passes": passes, "runtime": f"~{runtime} (wall per cell)",
            "outdir": os.path.relpath(outdir, ROOT), "host": "(from raw records)",
            "configs": [c.name for c in cfgs], "skipped": [], "baseline": baseline,
            "matrix": {"rw": rws, "qd": qds, "numjobs": njs, "backends": backends}}
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    write_markdown(os.path.join(outdir, "results.md"), rows, meta, cfgs, [], baseline)
    write_chart(outdir, rows, cfgs, matrix, backends[0])
    log(f"summarized {len(runs)} boots ({passes} passes) + {len(counts)} counting boots "
        f"into {outdir}/results.md")


def replot(outdir):
    j = json.load(open(os.path.join(outdir, "results.json")))
    meta, rows = j["meta"], j["rows"]
    for r in rows:
        for k, v in r.items():
            if isinstance(v, list):
                r[k] = tuple(v)
    mx = meta["matrix"]
    matrix = Matrix(mx["rw"], mx["qd"], mx["numjobs"], meta["runtime"], meta["smp"])
    cfgs = [configs.BY_NAME[n] for n in meta["configs"] if n in configs.BY_NAME]
    write_markdown(os.path.join(outdir, "results.md"), rows, meta, cfgs,
                   [tuple(x) for x in meta["skipped"]], meta["baseline"])
    png = write_chart(outdir, rows, cfgs, matrix, mx["backends"][0])
    log(f"rewrote {outdir}/results.md" + (f" and {png}" if png else ""))


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
    ap.add_argument("--from-raw", metavar="DIR",
                    help="summarize DIR/raw/*.json of a (possibly interrupted) run into "
                    "DIR/results.md, results.json and chart.png")
    ap.add_argument("--replot", metavar="DIR",
                    help="only rewrite results.md and chart.png of a finished run DIR")
    a = ap.parse_args()
    if a.replot:
        replot(a.replot)
        return
    if a.from_raw:
        from_raw(a.from_raw)
        return

    full = a.full
    rws = (a.rw or ("randread,randwrite,randrw" if full else "randread,randwrite")).split(",")
    qds = [int(x) for x in (a.qd or ("1,4,16,64" if full else "1,16,64")).split(",")]
    numjobs = [int(x) for x in (a.numjobs or (f"1,{a.smp}" if full else "1")).split(",")]
    backends = (a.backends or ("native,io_uring,null" if full else "native")).split(",")
    runtime = a.runtime or (10 if full else 3)
    matrix = Matrix(rws, qds, numjobs, runtime, a.smp)
    for b in backends:
        if b not in configs.BACKENDS:
            sys.exit(f"bench: unknown backend {b}; known: {', '.join(configs.BACKENDS)}")

    if a.configs:
        names = a.configs.split(",")
        unknown = [n for n in names if n not in configs.BY_NAME]
        if unknown:
            sys.exit(f"bench: unknown configuration(s) {', '.join(unknown)}; known: "
                     f"{', '.join(configs.BY_NAME)}")
        wanted = [configs.BY_NAME[n] for n in names]
    else:
        wanted = [c for c in configs.CONFIGS if full or c.quick]

    cfgs, skipped, helps = [], [], {}
    for c in wanted:
        q = os.path.join(ROOT, configs.QEMU_BINARIES[c.qemu])
        if not os.access(q, os.X_OK):
            skipped.append((c.name, f"{configs.QEMU_BINARIES[c.qemu]} not built"
                            + (" (make stock)" if c.qemu == "stock" else "")))
            continue
        if c.driver:
            key = (q, c.driver)
            if key not in helps:
                helps[key] = vm.device_help(q, c.driver)
            miss = c.missing_props(helps[key])
            if miss:
                skipped.append((c.name, f"{c.driver} of this binary has no property "
                                f"{', '.join(miss)}"))
                continue
        cfgs.append(c)
    for n, why in skipped:
        log(f"SKIP {n}: {why}")
    if not cfgs:
        sys.exit("bench: no configuration to run")
    baseline = next((c.name for c in cfgs if c.baseline), None)
    if not baseline:
        log("no baseline configuration (stock-nvme) in this run: no ratios")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    outdir = os.path.join(a.out, stamp)
    os.makedirs(outdir, exist_ok=True)
    image = os.path.join(a.out, "disk.img")
    fstype = ensure_image(image) if any(b != "null" for b in backends) else "-"
    accel = vm.detect_accel(os.path.join(ROOT, configs.QEMU_BINARIES[cfgs[0].qemu]))
    log(f"accelerator: {accel}; image {image} on {fstype}; output {outdir}")
    ncells = len(list(matrix.cells()))
    boots = [(p, i, b) for p in range(a.passes) for i in range(len(cfgs)) for b in backends]
    todo_count = [] if a.no_count else [(c, b) for c in cfgs for b in backends
                                        if c.doorbell_events]
    count_runtime = max(2, runtime // 2)
    boot_overhead = 15.0
    est_boot = boot_overhead + ncells * (runtime + 1.5)
    est_count = boot_overhead + ncells * (count_runtime + 1.5)
    log(f"{len(cfgs)} configs x {len(backends)} backends x {a.passes} passes = {len(boots)} "
        f"boots of {ncells} cells ({runtime} s each) + {len(todo_count)} counting boots; "
        f"estimated {(len(boots) * est_boot + len(todo_count) * est_count) / 60:.0f} min")

    runs, counts = {}, {}
    t_start = time.monotonic()
    done_s, done_n = 0.0, 0
    total = len(boots) + len(todo_count)

    def eta(k):
        per = done_s / done_n if done_n else est_boot
        return (total - k) * per

    k = 0
    for p in range(a.passes):
        order = cfgs[p % len(cfgs):] + cfgs[:p % len(cfgs)]     # rotate per pass
        for cfg in order:
            for b in backends:
                k += 1
                log(f"[{k}/{total}] pass {p + 1}/{a.passes} {cfg.name} ({b}): {ncells} cells; "
                    f"~{eta(k - 1) / 60:.1f} min left")
                t0 = time.monotonic()
                rec = run_boot(cfg, b, matrix, outdir, f"p{p + 1}-{cfg.name}-{b}", image)
                done_s += rec["elapsed"]      # boot time, without waits for the lock
                done_n += 1
                runs[(p, cfg.name, b)] = rec
                bad = [n for n, c in rec["cells"].items() if not c.get("fio")]
                ios = ", ".join(f"{c['qd']}:{c['fio']['iops']:.0f}" for c in
                                rec["cells"].values() if c.get("fio"))
                log(f"    {'ok' if rec['ok'] and not bad else 'FAILED ' + rec['describe']} "
                    f"{rec['elapsed']:.0f}s; IOPS by QD {ios}" +
                    (f"; missing {', '.join(bad)}" if bad else ""))
    for cfg, b in todo_count:
        k += 1
        log(f"[{k}/{total}] counting pass {cfg.name} ({b}): trace "
            f"{','.join(cfg.doorbell_events)}; ~{eta(k - 1) / 60:.1f} min left")
        t0 = time.monotonic()
        rec = run_boot(cfg, b, matrix, outdir, f"count-{cfg.name}-{b}", image,
                       counting=True, runtime=count_runtime)
        done_s += rec["elapsed"]
        done_n += 1
        counts[(cfg.name, b)] = rec
        dbs = ", ".join(f"{c['qd']}:{c.get('doorbells_per_io', float('nan')):.2f}"
                        for c in rec["cells"].values() if c.get("fio"))
        log(f"    {'ok' if rec['ok'] else 'FAILED ' + rec['describe']} doorbells/IO by QD {dbs}")

    rows = summarize(runs, counts, matrix, cfgs, backends, baseline, a.passes)
    import platform
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "accel": accel, "smp": a.smp,
            "passes": a.passes, "runtime": runtime, "outdir": os.path.relpath(outdir, ROOT),
            "host": f"{platform.node()} {os.cpu_count()} CPUs {platform.release()}",
            "configs": [c.name for c in cfgs], "skipped": skipped, "baseline": baseline,
            "matrix": {"rw": rws, "qd": qds, "numjobs": numjobs, "backends": backends},
            "wall_s": time.monotonic() - t_start}
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    write_markdown(os.path.join(outdir, "results.md"), rows, meta, cfgs, skipped, baseline)
    png = write_chart(outdir, rows, cfgs, matrix, backends[0])
    for fn in ("results.md", "results.json", "chart.png"):
        src = os.path.join(outdir, fn)
        if os.path.exists(src):
            subprocess.run(["cp", src, os.path.join(a.out, fn)], check=True)
    failed = sum(1 for r in rows if not r["iops"])
    log(f"done in {(time.monotonic() - t_start) / 60:.1f} min: {a.out}/results.md"
        + (f", {a.out}/chart.png" if png else "") +
        (f"; {failed} cells without any result" if failed else ""))
    sys.exit(1 if failed == len(rows) else 0)


if __name__ == "__main__":
    main()
