"""The bench report: results.json, results.md (legend + table), chart.png.

summarize_dir(DIR) rebuilds all three from DIR/meta.json (written when the
run starts) and DIR/raw/*.json (one per boot): at the end of a run, after
an interrupted one, or to redraw (`python3 -m nvdp.bench --replot DIR`).
"""
import glob
import json
import os
import statistics
import subprocess
import time

from . import ROOT, configs

THREAD_CLASSES = ["vcpu", "main", "iothread", "other"]


def cells(mx):
    """The fio cells of a matrix {"rw": [...], "qd": [...], "numjobs": [...]}."""
    return [{"rw": rw, "qd": qd, "numjobs": nj, "name": f"{rw}-qd{qd}-j{nj}"}
            for rw in mx["rw"] for nj in mx["numjobs"] for qd in mx["qd"]]


def med(xs):
    xs = [x for x in xs if x is not None]
    return (statistics.median(xs), min(xs), max(xs)) if xs else None


def fmt(m, digits=0, pct=False):
    if m is None:
        return "-"
    f = (lambda v: f"{v * 100:.0f}%") if pct else (lambda v: f"{v:,.{digits}f}")
    return f"{f(m[0])} ({f(m[1])}–{f(m[2])})"


def _cell(recs, key, name):
    return ((recs.get(key) or {}).get("cells") or {}).get(name) or {}


def summarize(runs, counts, meta):
    """Rows for results.md / results.json: per (backend, cell, config) the
    medians over passes; ratios against the baseline of the same pass."""
    rows = []
    baseline, passes = meta["baseline"], range(meta["passes"])
    for backend in meta["matrix"]["backends"]:
        for c in cells(meta["matrix"]):
            for name in meta["configs"]:
                good = [x for x in (_cell(runs, (p, name, backend), c["name"]) for p in passes)
                        if x.get("fio")]
                row = {"backend": backend, "cell": c["name"], "rw": c["rw"], "qd": c["qd"],
                       "numjobs": c["numjobs"], "config": name, "n": len(good)}
                row["iops"] = med([x["fio"]["iops"] for x in good])
                for k in ("lat_mean_us", "lat_p50_us", "lat_p99_us"):
                    row[k] = med([x["fio"][k] for x in good])
                for k in THREAD_CLASSES + ["total"]:
                    row["cpu_" + k] = med([x["cpu_us_per_io"][k] for x in good])
                # each IOThread's own share ("IO iothread0", ...)
                # (not QEMU's monitor IOThread, "IO mon_iothread")
                ios = sorted({t for x in good for t in (x.get("cpu_by_thread") or {})
                              if t.startswith("IO ") and t != "IO mon_iothread"})
                row["cpu_per_iothread"] = {
                    t[3:]: med([(x["cpu_by_thread"].get(t, 0.0)) / x["fio"]["ios"] * 1e6
                                for x in good]) for t in ios}
                row["irqs_per_io"] = med([x.get("irqs_per_io") for x in good])
                row["vcpu_writes_per_io"] = med([x.get("vcpu_writes_per_io") for x in good])
                ratios = []
                for p in passes if baseline else ():
                    a, b = (_cell(runs, (p, n, backend), c["name"]).get("fio")
                            for n in (name, baseline))
                    if a and b and b["iops"]:
                        ratios.append(a["iops"] / b["iops"])
                row["ratio"] = med(ratios)
                cc = _cell(counts, (name, backend), c["name"])
                row["doorbells_per_io"] = cc.get("doorbells_per_io")
                row["count_pass_iops"] = cc["fio"]["iops"] if cc.get("fio") else None
                rows.append(row)
    return rows


LEGEND = (
    "Cells are median (min–max) over passes.  *vs base*: IOPS ratio against {baseline} "
    "of the same pass and backend, median (min–max) of the per-pass ratios.  Latency: "
    "completion latency in µs (for randrw the larger of the read and write percentiles).  "
    "*CPU µs/IO*: host CPU time of the QEMU process per I/O, total and split vCPU / main "
    "loop / iothread / other threads.  *irq/IO*: guest interrupts on the device's lines "
    "per I/O.  *db/IO*: doorbell writes per I/O, from the separate counting pass (the "
    "trace events and property overrides of the table above), whose IOPS are shown as "
    "*count IOPS* to judge how much tracing perturbs the run; '-' where the doorbells take "
    "the eventfd path only (virtio-blk with an iothread requires ioeventfd=on).  *vCPU "
    "wr/IO*: write(2) syscalls of the vCPU threads per I/O (from /proc/PID/task/TID/io, "
    "measured in the normal passes): with ioeventfd=on these are the eventfd kicks, i.e. "
    "the doorbells taking the eventfd path, plus event-loop wake-ups.\n")
HEADER = ("| backend | rw | QD | jobs | config | IOPS | vs base | mean µs | p50 µs | p99 µs "
          "| CPU µs/IO total | vcpu / main / iothr / other | irq/IO | vCPU wr/IO | db/IO "
          "| count IOPS |")


def write_markdown(path, rows, meta):
    L = ["# nvme-dataplane benchmark\n",
         f"{meta['date']}, accelerator **{meta['accel']}**, guest {meta['smp']} vCPUs, "
         f"{meta['passes']} passes, {meta['runtime']} s per cell, fio 4k libaio direct=1.  "
         f"Host: {meta['host']}.\n"]
    if meta["accel"] == "tcg":
        L.append("**Under TCG one cell varies 10–30 % from pass to pass and sometimes 2x.** "
                 "Read the medians with their min–max and compare ratios taken within "
                 "a pass, not absolute numbers across runs.\n")
    L.append("Configurations (nvdp/configs.py):\n")
    L.append(configs.markdown([configs.BY_NAME[n] for n in meta["configs"]],
                              [tuple(s) for s in meta["skipped"]]))
    L += [LEGEND.format(baseline=meta["baseline"] or "n/a"), HEADER,
          "|" + "---|" * (HEADER.count("|") - 1)]
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
    split = [r for r in rows if len(r.get("cpu_per_iothread") or {}) > 1]
    if split:
        L += ["", "CPU µs/IO of each IOThread, for the configurations with several "
              "(median over passes):", "",
              "| backend | rw | QD | jobs | config | per IOThread |", "|---|---|---|---|---|---|"]
        for r in split:
            per = " / ".join(f"{t} {m[0]:.1f}" for t, m in r["cpu_per_iothread"].items() if m)
            L.append(f"| {r['backend']} | {r['rw']} | {r['qd']} | {r['numjobs']} "
                     f"| {r['config']} | {per} |")
    L.append("")
    L.append(f"Raw data: {meta['outdir']}/raw/*.json (fio json, per-thread CPU, "
             "/proc/interrupts, QEMU command lines).  Chart: chart.png.\n")
    L += cost_section()
    with open(path, "w") as f:
        f.write("\n".join(L))


def cost_section():
    """The cost meter's latest tables (make cost: build/cost/results.md),
    counts per I/O that do not depend on the host's load, next to the
    guest's numbers; a note to run it where there is none."""
    p = os.path.join(ROOT, "build", "cost", "results.md")
    if not os.path.exists(p):
        return ["## Cost meter\n", "No `make cost` results in build/cost/ yet: run "
                "`make cost` for instructions, syscalls, doorbells and interrupts per I/O.\n"]
    text = open(p).read()
    body = text.split("\n", 1)[1] if text.startswith("# ") else text
    return [f"## Cost meter (make cost, {time.ctime(os.path.getmtime(p))})\n", body]


def write_chart(outdir, rows, meta):
    """IOPS and p99 against QD, one series per configuration (gnuplot), for
    the first backend and numjobs.  The PNG's path, or None."""
    mx = meta["matrix"]
    backend, nj, qds, n = mx["backends"][0], mx["numjobs"][0], mx["qd"], len(mx["rw"])
    dat = os.path.join(outdir, "chart-data")
    os.makedirs(dat, exist_ok=True)
    plots = {}
    for rw in mx["rw"]:
        for name in meta["configs"]:
            fn = os.path.join(dat, f"{rw}-{name}.dat")
            with open(fn, "w") as f:
                for r in rows:
                    if (r["backend"], r["rw"], r["numjobs"], r["config"]) == \
                            (backend, rw, nj, name) and r["iops"]:
                        f.write(" ".join(map(str, [r["qd"], *r["iops"], *r["lat_p99_us"]])) + "\n")
            for what, cols in (("iops", "1:2:3:4"), ("p99", "1:5:6:7")):
                plots.setdefault((what, rw), []).append(
                    f"'{fn}' using {cols} with yerrorlines title '{name}'")
    png = os.path.join(outdir, "chart.png")
    terms = subprocess.run(["gnuplot", "-e", "set terminal"], capture_output=True, text=True)
    g = [f"set terminal pngcairo size {560 * n},900 font ',9'"
         if "pngcairo" in terms.stdout + terms.stderr else f"set terminal png size {560 * n},900",
         f"set output '{png}'",
         f"set multiplot layout 2,{n} title 'nvme-dataplane bench ({backend}, numjobs={nj}; "
         f"median, bars min-max)'",
         "set termoption noenhanced", "set logscale x 2", "set xlabel 'queue depth'",
         "set grid", "set key below font ',8'",
         "set xtics (" + ", ".join(f"'{q}' {q}" for q in qds) + ")",
         f"set xrange [{min(qds) * 0.7}:{max(qds) * 1.4}]"]
    for what, title, ylabel in (("iops", "IOPS (log scale)", "IOPS"),
                                ("p99", "p99 completion latency", "p99 (us)")):
        for rw in mx["rw"]:
            g += [f"set title '{rw}: {title}'", f"set ylabel '{ylabel}'", "set logscale y",
                  "set yrange [*:*]", "plot " + ", ".join(plots[what, rw]), "unset logscale y"]
    g.append("unset multiplot")
    script = os.path.join(outdir, "chart.gp")
    with open(script, "w") as f:
        f.write("\n".join(g) + "\n")
    r = subprocess.run(["gnuplot", script], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"bench: gnuplot failed: {r.stderr.strip()[:500]}", flush=True)
        return None
    return png


def summarize_dir(outdir):
    """Write DIR/results.{json,md} and chart.png from DIR/meta.json (or, for
    runs older than meta.json, results.json's meta) and DIR/raw/*.json.
    Returns (rows, png path or None)."""
    p = os.path.join(outdir, "meta.json")
    meta = json.load(open(p)) if os.path.exists(p) else \
        json.load(open(os.path.join(outdir, "results.json")))["meta"]
    runs, counts = {}, {}
    for fn in sorted(glob.glob(os.path.join(outdir, "raw", "*.json"))):
        rec = json.load(open(fn))
        if rec["counting"]:
            counts[rec["config"], rec["backend"]] = rec
        else:   # raw records older than "pass": the tag p<N>-config-backend
            p = rec.get("pass", int(os.path.basename(fn).split("-")[0][1:]) - 1)
            runs[p, rec["config"], rec["backend"]] = rec
    rows = summarize(runs, counts, meta)
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    write_markdown(os.path.join(outdir, "results.md"), rows, meta)
    return rows, write_chart(outdir, rows, meta)
